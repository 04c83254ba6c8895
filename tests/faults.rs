//! Fault injection against real PostgreSQL servers: a relay killed with SIGKILL, the server
//! restarted, connections terminated, a hung Sender, many relays, a poison message. Each
//! scenario prints a `FIGURES` line (run with `--nocapture` to see them; RELIABILITY.md
//! records the last run).
//!
//! Scenarios that stop the server use a server of their own, so the rest of the suite,
//! running in parallel on the shared server, is unaffected.

mod common;

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{count, eventually, store, Deliveries, PATIENCE};
use r2d2_postgres::PostgresConnectionManager;
use troutbox::testing::TempPostgres;
use troutbox::{Batch, Error, NewMessage, Outbox, PgPool, PgStore};

/// Environment variable that turns this test binary into a relay child process.
const CHILD_SCHEMA: &str = "TROUTBOX_FAULTS_CHILD_SCHEMA";
const KILL_BATCH: usize = 50;

fn random_below(n: u64) -> u64 {
    RandomState::new().hash_one(Instant::now()) % n
}

fn pool_for(url: &str, max_size: u32, application_name: &str) -> PgPool {
    let mut config: postgres::Config = url.parse().unwrap();
    config.application_name(application_name);
    r2d2::Pool::builder()
        .max_size(max_size)
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(PostgresConnectionManager::new(config, postgres::NoTls))
}

fn create_deliveries_table(pool: &PgPool, schema: &str) {
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE \"{schema}\".deliveries (msg_id bigint NOT NULL, value bytea NOT NULL)"
        ))
        .unwrap();
}

/// A Sender whose record of deliveries survives the relay: it commits each batch's ids and
/// values to `schema.deliveries` before returning, like a broker that has acknowledged.
fn durable_sender(
    pool: PgPool,
    schema: &str,
) -> impl FnMut(&mut Batch) -> Result<(), Error> + Clone + Send + 'static {
    let insert = format!(
        "INSERT INTO \"{schema}\".deliveries (msg_id, value) SELECT * FROM unnest($1::int8[], $2::bytea[])"
    );
    move |batch: &mut Batch| {
        let ids: Vec<i64> = batch.iter().map(|m| m.id()).collect();
        let values: Vec<&[u8]> = batch.iter().map(|m| m.value()).collect();
        let mut conn = pool.get().map_err(|source| Error::Pool {
            context: "recording deliveries",
            source,
        })?;
        conn.execute(&insert, &[&ids, &values])
            .map_err(|error| Error::Database {
                context: "recording deliveries",
                error,
            })?;
        Ok(())
    }
}

/// (delivered values, duplicate deliveries) from `schema.deliveries`.
fn durable_deliveries(pool: &PgPool, schema: &str) -> (HashSet<Vec<u8>>, i64) {
    let mut conn = pool.get().unwrap();
    let rows = conn
        .query(
            &format!("SELECT DISTINCT value FROM \"{schema}\".deliveries"),
            &[],
        )
        .unwrap();
    let values = rows.iter().map(|r| r.get(0)).collect();
    let dups: i64 = conn
        .query_one(
            &format!("SELECT count(*) - count(DISTINCT msg_id) FROM \"{schema}\".deliveries"),
            &[],
        )
        .unwrap()
        .get(0);
    (values, dups)
}

/// Commits messages with unique values from one thread until `stop`, rolling back about one
/// transaction in ten. Returns (committed values, rolled-back values, errors seen).
fn produce(
    outbox: &Outbox,
    pool: &PgPool,
    tag: &str,
    per_tx: usize,
    stop: &dyn Fn(usize) -> bool,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<Error>) {
    let (mut committed, mut rolled_back, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0usize;
    while !stop(committed.len()) {
        let attempt = || -> Result<(Vec<Vec<u8>>, bool), Error> {
            let mut conn = pool.get().map_err(|source| Error::Pool {
                context: "test producer",
                source,
            })?;
            let mut tx = conn.transaction().map_err(|error| Error::Database {
                context: "test producer",
                error,
            })?;
            let values: Vec<Vec<u8>> = (0..per_tx)
                .map(|j| format!("{tag}-{i}-{j}").into_bytes())
                .collect();
            outbox.add_messages(&mut tx, values.iter().map(|v| NewMessage::new(tag, v)))?;
            let rollback = random_below(10) == 0;
            let end = if rollback { tx.rollback() } else { tx.commit() };
            end.map_err(|error| Error::Database {
                context: "test producer",
                error,
            })?;
            Ok((values, rollback))
        };
        match attempt() {
            Ok((values, true)) => rolled_back.extend(values),
            Ok((values, false)) => committed.extend(values),
            // A failed commit may or may not have committed: such values are in neither list.
            Err(e) => errors.push(e),
        }
        i += 1;
    }
    (committed, rolled_back, errors)
}

/// What the relay child writes once its relay runs.
const CHILD_READY: &str = "troutbox-child-relay-ready";

#[test]
#[ignore = "entry point of the relay child process spawned by relay_killed_with_sigkill_loses_nothing: fails when run on its own"]
fn child_relay_process() {
    let schema = std::env::var(CHILD_SCHEMA).unwrap_or_else(|_| {
        panic!(
            "{CHILD_SCHEMA} is unset: this is the relay child process of \
             relay_killed_with_sigkill_loses_nothing, not a test to run on its own"
        )
    });
    let url = std::env::var("DATABASE_URL").expect("the parent passes DATABASE_URL");
    let pool = pool_for(&url, 3, "faults-child-relay");
    let store = PgStore::new(pool.clone()).schema(&schema);
    let outbox = Outbox::builder(store)
        .batch_size(KILL_BATCH)
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let _handle = outbox.start(durable_sender(pool, &schema)).unwrap();
    // Straight to the file descriptor (the test harness captures `eprintln!`): the parent
    // times its kill from here.
    use std::io::Write;
    let mut stderr = std::io::stderr();
    let _ = writeln!(stderr, "{CHILD_READY}");
    let _ = stderr.flush();
    loop {
        // Runs until the parent kills this process.
        std::thread::park();
    }
}

#[test]
fn relay_killed_with_sigkill_loses_nothing() {
    const SCHEMA: &str = "faults_sigkill";
    const KILLS: usize = 12;
    const TARGET: usize = 10_000; // committed messages per producer thread
    let url = common::url();
    let pool = pool_for(&url, 8, "faults-sigkill");
    let store = store(SCHEMA, &pool);
    create_deliveries_table(&pool, SCHEMA);
    let outbox = Outbox::builder(store.clone()).build().unwrap();

    let producers: Vec<_> = (0..2)
        .map(|t| {
            let (outbox, pool) = (outbox.clone(), pool.clone());
            std::thread::spawn(move || {
                produce(&outbox, &pool, &format!("p{t}"), 5, &|n| n >= TARGET)
            })
        })
        .collect();

    let exe = std::env::current_exe().unwrap();
    let delivered_so_far = format!("SELECT count(*) FROM {SCHEMA}.deliveries");
    let mut kills = 0;
    let mut children_that_delivered = 0;
    // Children started while messages were waiting: once the producers are done and the
    // outbox is drained, a child has nothing to deliver before its kill.
    let mut children_with_work = 0;
    let pending = format!("SELECT count(*) FROM {SCHEMA}.outbox_messages");
    let mut child_output = Vec::new();
    while kills < KILLS || producers.iter().any(|p| !p.is_finished()) {
        let before = count(&pool, &delivered_so_far);
        if count(&pool, &pending) > 0 {
            children_with_work += 1;
        }
        let mut child = Command::new(&exe)
            .args([
                "child_relay_process",
                "--exact",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_SCHEMA, SCHEMA)
            .env("DATABASE_URL", &url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The child says when its relay has started (connections made, statements
        // prepared: a debug build's SCRAM handshakes alone can take longer than the kill
        // window). Its stderr is read to the end on a thread, which reports that line.
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<()>(1);
        let stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut text = String::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line == CHILD_READY {
                    let _ = ready_tx.try_send(());
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let _ = ready_rx.recv_timeout(PATIENCE);
        // The kill lands at a random moment of the running relay's life: that is the fault.
        // (A sleep here is the fault's timing, not a synchronisation.)
        std::thread::sleep(Duration::from_millis(random_below(450)));
        let exited_on_its_own = child.try_wait().unwrap();
        child.kill().unwrap(); // SIGKILL
        let output = child.wait_with_output().unwrap();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            reader.join().unwrap()
        );
        assert!(
            exited_on_its_own.is_none(),
            "relay child exited before it was killed ({exited_on_its_own:?}):\n{output}"
        );
        child_output.push(output);
        // The durable table says whether this child delivered anything before it died.
        if count(&pool, &delivered_so_far) > before {
            children_that_delivered += 1;
        }
        kills += 1;
    }
    let by_children = count(&pool, &delivered_so_far);
    let mut committed = Vec::new();
    let mut rolled_back = Vec::new();
    for p in producers {
        let (c, r, errors) = p.join().unwrap();
        assert!(
            errors.is_empty(),
            "producer errors without faults: {errors:?}"
        );
        committed.extend(c);
        rolled_back.extend(r);
    }

    let drain_started = Instant::now();
    let mut last = outbox.start(durable_sender(pool.clone(), SCHEMA)).unwrap();
    let table = format!("SELECT count(*) FROM {SCHEMA}.outbox_messages");
    assert!(eventually(PATIENCE * 4, || count(&pool, &table) == 0));
    last.shutdown().unwrap();
    let drain = drain_started.elapsed();

    let (delivered, duplicates) = durable_deliveries(&pool, SCHEMA);
    let lost = committed.iter().filter(|v| !delivered.contains(*v)).count();
    let phantom = rolled_back
        .iter()
        .filter(|v| delivered.contains(*v))
        .count();
    println!(
        "FIGURES relay_killed: committed={} rolled_back={} kills={kills} children_with_work={children_with_work} children_that_delivered={children_that_delivered} delivered_by_children={by_children} lost={lost} rolled_back_delivered={phantom} duplicates={duplicates} (bound {}) final_drain_ms={}",
        committed.len(),
        rolled_back.len(),
        KILL_BATCH * kills,
        drain.as_millis()
    );
    // The killed children did the work: if they all failed at start-up, the final relay
    // would deliver everything and the checks below would hold without any kill.
    assert!(
        by_children > 0 && children_that_delivered * 4 >= children_with_work,
        "{children_that_delivered} of {children_with_work} children with messages waiting delivered \
         ({by_children} deliveries); last output:\n{}",
        child_output.last().map(String::as_str).unwrap_or_default()
    );
    assert_eq!(lost, 0, "committed messages lost");
    assert_eq!(phantom, 0, "rolled-back messages delivered");
    assert_eq!(delivered.len(), committed.len());
    assert!(
        duplicates as usize <= KILL_BATCH * kills,
        "{duplicates} duplicates"
    );
}

/// Runs producers and a relay against a private server while `fault` strikes; returns the
/// figures line. The relay must report errors, never panic, and deliver every committed
/// message in the end.
fn survive(
    name: &str,
    expected_recoveries: usize,
    fault: impl FnOnce(&mut TempPostgres, &Deliveries) -> Vec<Duration>,
) {
    let mut server = TempPostgres::start().unwrap();
    let url = server.url();
    let pool = pool_for(&url, 6, "faults-producer");
    let relay_pool = pool_for(&url, 3, "faults-relay");
    let store = PgStore::new(pool.clone());
    store.migrate().unwrap();
    let errors = Arc::new(AtomicUsize::new(0));
    let e = errors.clone();
    let relay = Outbox::builder(PgStore::new(relay_pool))
        .poll_interval(Duration::from_millis(10))
        .error_handler(move |_| {
            e.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let producer = Outbox::builder(store.clone()).build().unwrap();
    let deliveries = Deliveries::new();
    let mut handle = relay.start(deliveries.sender()).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let producer_thread = {
        let (stop, pool, producer) = (stop.clone(), pool.clone(), producer.clone());
        std::thread::spawn(move || {
            produce(&producer, &pool, "m", 10, &|_| stop.load(Ordering::SeqCst))
        })
    };
    assert!(deliveries.wait_for(500, PATIENCE));
    let recoveries = fault(&mut server, &deliveries);
    stop.store(true, Ordering::SeqCst);
    let (committed, rolled_back, producer_errors) = producer_thread.join().unwrap();
    assert!(eventually(PATIENCE, || store
        .backlog()
        .is_ok_and(|b| b.pending == 0)));
    handle.shutdown().unwrap(); // Err(WorkerPanicked) if a worker had panicked

    let delivered: HashSet<Vec<u8>> = deliveries.values().into_iter().collect();
    let lost = committed.iter().filter(|v| !delivered.contains(*v)).count();
    let phantom = rolled_back
        .iter()
        .filter(|v| delivered.contains(*v))
        .count();
    println!(
        "FIGURES {name}: committed={} lost={lost} rolled_back_delivered={phantom} duplicates={} relay_errors_reported={} producer_errors={} recovery_ms={:?}",
        committed.len(),
        deliveries.duplicates(),
        errors.load(Ordering::SeqCst),
        producer_errors.len(),
        recoveries.iter().map(Duration::as_millis).collect::<Vec<_>>()
    );
    assert_eq!(lost, 0, "committed messages lost");
    assert_eq!(phantom, 0, "rolled-back messages delivered");
    assert!(
        errors.load(Ordering::SeqCst) > 0,
        "the faults were not reported"
    );
    for e in &producer_errors {
        assert!(e.is_connection_error(), "producer got {e}");
    }
    // Recovery times are figures, not asserts: `time_to_progress` bounds each wait only
    // as a hang guard (PATIENCE).
    assert_eq!(recoveries.len(), expected_recoveries);
}

/// Waits for the relay to deliver something it had not delivered at `since`.
fn time_to_progress(deliveries: &Deliveries, from: Instant) -> Duration {
    let before = deliveries.distinct();
    assert!(
        deliveries.wait_for(before + 1, PATIENCE),
        "relay did not resume"
    );
    from.elapsed()
}

#[test]
fn server_restarted_twice_the_relay_resumes_on_its_own() {
    survive("server_restarted", 2, |server, deliveries| {
        let mut recoveries = Vec::new();
        for _ in 0..2 {
            server.stop_server().unwrap(); // fast shutdown: every session is ended
                                           // The outage lasts a while so producers and relay both meet it.
            std::thread::sleep(Duration::from_millis(1500));
            server.start_server().unwrap();
            recoveries.push(time_to_progress(deliveries, Instant::now()));
            let seen = deliveries.distinct();
            assert!(deliveries.wait_for(seen + 200, PATIENCE));
        }
        recoveries
    });
}

#[test]
fn relay_connections_terminated_mid_run_lose_nothing() {
    survive("connections_terminated", 5, |server, deliveries| {
        let admin = pool_for(&server.url(), 1, "faults-admin");
        let mut recoveries = Vec::new();
        for _ in 0..5 {
            let terminated: i64 = admin
                .get()
                .unwrap()
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE application_name = 'faults-relay'",
                    &[],
                )
                .unwrap()
                .get(0);
            assert!(terminated > 0);
            recoveries.push(time_to_progress(deliveries, Instant::now()));
            let seen = deliveries.distinct();
            assert!(deliveries.wait_for(seen + 200, PATIENCE));
        }
        recoveries
    });
}

#[test]
fn a_hung_sender_blocks_only_its_own_batch() {
    const HUNG_BATCH: usize = 10;
    let pool = common::pool(8);
    let store = store("faults_hung", &pool);
    // A send timeout far beyond the test's wait: the server never releases the hung batch
    // while the others are delivered, so only SKIP LOCKED can let them through.
    let outbox = Outbox::builder(store.clone())
        .batch_size(HUNG_BATCH)
        .send_timeout(PATIENCE * 10)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    outbox
        .add_messages(
            &mut *conn,
            (0..1000)
                .map(|i| NewMessage::new("k", if i < HUNG_BATCH { b"first" } else { b"rest" })),
        )
        .unwrap();

    let deliveries = Deliveries::new();
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let hung_ids = Arc::new(Mutex::new(Vec::new()));
    let (d, h) = (deliveries.clone(), hung_ids.clone());
    let mut hung_relay = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            h.lock().unwrap().extend(batch.iter().map(|m| m.id()));
            let _ = entered_tx.try_send(());
            // Far past the send timeout, until the test lets go.
            let _ = go_rx.recv();
            d.record(batch);
            Ok(())
        })
        .unwrap();
    entered_rx.recv_timeout(PATIENCE).unwrap();

    let started = Instant::now();
    let mut healthy = outbox.start(deliveries.sender()).unwrap();
    assert!(
        deliveries.wait_for(1000 - HUNG_BATCH, PATIENCE),
        "the others were blocked"
    );
    let others = started.elapsed();
    let hung: HashSet<i64> = hung_ids.lock().unwrap().iter().copied().collect();
    assert_eq!(hung.len(), HUNG_BATCH);
    assert!(
        hung.iter().all(|id| deliveries.count_of(*id) == 0),
        "a message of the hung batch was delivered while it hung"
    );
    healthy.shutdown().unwrap();
    // Released, the hung Sender returns Ok and its batch is settled: delivered once.
    go_tx.send(()).unwrap();
    hung_relay.shutdown().unwrap();

    println!(
        "FIGURES hung_sender: messages=1000 hung_batch={} delivered={} duplicates={} others_delivered_ms={} (send_timeout {} s, never reached)",
        hung.len(),
        deliveries.distinct(),
        deliveries.duplicates(),
        others.as_millis(),
        (PATIENCE * 10).as_secs()
    );
    assert_eq!(deliveries.distinct(), 1000);
    assert_eq!(deliveries.duplicates(), 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM faults_hung.outbox_messages"),
        0
    );
}

#[test]
fn four_relays_fifty_thousand_messages_none_lost_none_twice() {
    const N: usize = 50_000;
    let pool = common::pool(24);
    let store = store("faults_four_relays", &pool);
    let deliveries = Deliveries::new();
    let mut relays: Vec<_> = (0..4)
        .map(|_| {
            Outbox::builder(store.clone())
                .workers(3)
                .batch_size(100)
                .poll_interval(Duration::from_millis(10))
                .build()
                .unwrap()
                .start(deliveries.sender())
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    let producer = Outbox::builder(store).build().unwrap();
    let mut conn = pool.get().unwrap();
    for chunk in 0..(N / 1000) {
        let values: Vec<String> = (0..1000).map(|i| format!("{chunk}-{i}")).collect();
        producer
            .add_messages(
                &mut *conn,
                values.iter().map(|v| NewMessage::new("k", v.as_bytes())),
            )
            .unwrap();
    }
    assert!(
        deliveries.wait_for(N, PATIENCE * 4),
        "delivered {}",
        deliveries.distinct()
    );
    let elapsed = started.elapsed();
    for relay in &mut relays {
        relay.shutdown().unwrap();
    }
    println!(
        "FIGURES four_relays: relays=4 workers_each=3 messages={N} delivered={} duplicates={} seconds={:.1}",
        deliveries.distinct(),
        deliveries.duplicates(),
        elapsed.as_secs_f64()
    );
    assert_eq!(deliveries.distinct(), N);
    assert_eq!(deliveries.duplicates(), 0);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM faults_four_relays.outbox_messages"
        ),
        0
    );
}

#[test]
fn poison_message_ends_dead_with_its_bounded_error_and_the_rest_flows() {
    let pool = common::pool(4);
    let store = store("faults_poison", &pool);
    let outbox = Outbox::builder(store.clone())
        .max_retries(3)
        .backoff(troutbox::Backoff::exponential(
            Duration::from_millis(20),
            Duration::from_millis(100),
        ))
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    outbox
        .add_messages(
            &mut *conn,
            (0..1001).map(|i| NewMessage::new(if i == 500 { "poison" } else { "good" }, b"v")),
        )
        .unwrap();
    let long_error = format!("{}\0tail", "broker refused: ".repeat(400));
    let deliveries = Deliveries::new();
    let d = deliveries.clone();
    let started = Instant::now();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            for m in batch.iter_mut() {
                if m.key() == "poison" {
                    m.mark_failed(&long_error);
                }
            }
            d.record(batch);
            Ok(())
        })
        .unwrap();
    assert!(deliveries.wait_for(1001, PATIENCE));
    let good_done = started.elapsed();
    assert!(eventually(PATIENCE, || store.backlog().unwrap().dead == 1));
    handle.shutdown().unwrap();
    let dead = store.dead_messages(10, None).unwrap();
    assert_eq!(dead.len(), 1);
    let error = dead[0].last_error.clone().unwrap();
    println!(
        "FIGURES poison: good=1000 good_delivered_ms={} poison_attempts={} error_bytes_stored={}",
        good_done.as_millis(),
        dead[0].message.attempts(),
        error.len()
    );
    assert_eq!(dead[0].message.key(), "poison");
    assert_eq!(dead[0].message.attempts(), 4);
    assert!(error.len() <= troutbox::MAX_ERROR_TEXT && error.starts_with("broker refused: "));
    assert_eq!(store.backlog().unwrap().pending, 0);
}
