//! The end-to-end harness of the inbox tests (`tests/inbox_e2e_kafka.rs`,
//! `tests/inbox_e2e_rabbitmq.rs`): producers commit messages through the outbox, a relay
//! child process sends them to a real broker and is SIGKILLed again and again, a consumer
//! child process applies each message to a table through the inbox and is SIGKILLed too,
//! before its database commit and between that commit and its acknowledgement. Then every
//! committed message must have been applied exactly once.
//!
//! The children are the test binary itself, run on an ignored test that reads
//! [`ROLE`]; each broker's test supplies the relay's Sender and the consumer's loop.
//! Included with `#[path]` by those tests, next to `mod common`.

#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r2d2_postgres::PostgresConnectionManager;
use troutbox::{Inbox, Outbox, PgPool, PgStore, Received};

/// What a child process is: `relay` or `consumer`.
pub const ROLE: &str = "TROUTBOX_E2E_ROLE";
/// The schema of the run.
pub const SCHEMA: &str = "TROUTBOX_E2E_SCHEMA";
/// The broker's address.
pub const BROKER: &str = "TROUTBOX_E2E_BROKER";
/// A consumer child stops at its `STOP_AFTER`-th message...
pub const STOP_AFTER: &str = "TROUTBOX_E2E_STOP_AFTER";
/// ... `before` its database commit or `after` it (before its acknowledgement).
pub const STOP_AT: &str = "TROUTBOX_E2E_STOP_AT";

/// Printed by a relay child once its relay runs.
pub const READY: &str = "troutbox-e2e-ready";
/// Printed by a consumer child at its stop point, where it waits for its SIGKILL.
pub const STOPPED: &str = "troutbox-e2e-stopped";
/// Printed by a consumer child for each message the inbox found a duplicate.
pub const DUPLICATE: &str = "troutbox-e2e-duplicate";

/// The consumer name in the inbox.
pub const CONSUMER: &str = "e2e";

pub fn random_below(n: u64) -> u64 {
    RandomState::new().hash_one(Instant::now()) % n
}

pub fn pool_for(url: &str, max_size: u32) -> PgPool {
    r2d2::Pool::builder()
        .max_size(max_size)
        .connection_timeout(Duration::from_secs(10))
        .build_unchecked(PostgresConnectionManager::new(
            url.parse().unwrap(),
            postgres::NoTls,
        ))
}

/// The run's outbox: fresh schema, migrated, with the consumer's table and the inbox.
pub fn setup(pool: &PgPool, schema: &str) -> Outbox {
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
             CREATE TABLE {schema}.applied (n int8 PRIMARY KEY, times int4 NOT NULL)"
        ))
        .unwrap();
    let store = PgStore::new(pool.clone()).schema(schema);
    store.migrate().unwrap();
    inbox(pool, schema).migrate().unwrap();
    Outbox::builder(store).build().unwrap()
}

pub fn outbox(pool: &PgPool, schema: &str) -> Outbox {
    Outbox::builder(PgStore::new(pool.clone()).schema(schema))
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap()
}

pub fn inbox(pool: &PgPool, schema: &str) -> Inbox {
    Inbox::builder(pool.clone())
        .schema(schema)
        .window(Duration::from_secs(3600))
        .build()
        .unwrap()
}

/// Commits messages `from..to` (the value is the number), 5 per transaction.
pub fn produce(outbox: &Outbox, pool: &PgPool, from: i64, to: i64) {
    let mut conn = pool.get().unwrap();
    for chunk in (from..to).collect::<Vec<_>>().chunks(5) {
        let mut tx = conn.transaction().unwrap();
        for n in chunk {
            outbox
                .add_message(&mut tx, &format!("k{}", n % 7), n.to_string().as_bytes())
                .unwrap();
        }
        tx.commit().unwrap();
    }
}

/// Where a consumer child stops for its kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopAt {
    Before,
    After,
}

/// A consumer child's stop point, from its environment; `None` in the parent.
pub fn stop_point() -> Option<(usize, StopAt)> {
    let after: usize = std::env::var(STOP_AFTER).ok()?.parse().ok()?;
    let at = match std::env::var(STOP_AT).ok()?.as_str() {
        "before" => StopAt::Before,
        _ => StopAt::After,
    };
    Some((after, at))
}

fn announce_and_wait(line: &str) -> ! {
    // Straight to the file descriptor: the test harness captures `eprintln!`.
    let mut stderr = std::io::stderr();
    let _ = writeln!(stderr, "{line}");
    let _ = stderr.flush();
    loop {
        std::thread::park(); // until the parent's SIGKILL
    }
}

pub fn announce(line: &str) {
    let mut stderr = std::io::stderr();
    let _ = writeln!(stderr, "{line}");
    let _ = stderr.flush();
}

/// Applies message `n` (id `message_id`) through the inbox: the counter of `n` goes up by
/// one on a first delivery, in the transaction that records it. `handled` counts the
/// messages this process has applied; at the stop point the process waits for its kill,
/// before or after the commit. Returns what the inbox said; the caller acknowledges then.
pub fn apply(
    pool: &PgPool,
    inbox: &Inbox,
    schema: &str,
    message_id: &str,
    n: i64,
    handled: usize,
    stop: Option<(usize, StopAt)>,
) -> Received {
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    let received = inbox.receive(&mut tx, CONSUMER, message_id).unwrap();
    if received == Received::First {
        tx.execute(
            &format!(
                "INSERT INTO {schema}.applied (n, times) VALUES ($1, 1)
                 ON CONFLICT (n) DO UPDATE SET times = applied.times + 1"
            ),
            &[&n],
        )
        .unwrap();
    }
    if stop == Some((handled, StopAt::Before)) {
        announce_and_wait(STOPPED);
    }
    tx.commit().unwrap();
    if stop == Some((handled, StopAt::After)) {
        announce_and_wait(STOPPED);
    }
    if received == Received::Duplicate {
        announce(DUPLICATE);
    }
    received
}

/// How many distinct messages were applied.
pub fn applied(pool: &PgPool, schema: &str) -> i64 {
    crate::common::count(pool, &format!("SELECT count(*) FROM {schema}.applied"))
}

/// A child process of the test binary running the ignored test `entry` in `role`, whose
/// stderr lines arrive on a channel.
pub struct ChildProcess {
    child: Child,
    pub lines: crossbeam_channel::Receiver<String>,
}

impl ChildProcess {
    pub fn spawn(entry: &str, role: &str, env: &[(&str, String)]) -> ChildProcess {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([entry, "--exact", "--ignored", "--test-threads=1"])
            .env(ROLE, role)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        ChildProcess { child, lines: rx }
    }

    /// Waits up to `patience` for the line `wanted`; false if it did not come.
    pub fn wait_for(&self, wanted: &str, patience: Duration, seen: &mut Vec<String>) -> bool {
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line == wanted;
                    seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// SIGKILL, then the rest of its output.
    pub fn kill(mut self, seen: &mut Vec<String>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader thread ends with the pipe.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            seen.push(line);
        }
    }
}

/// What the supervisors did.
#[derive(Default)]
pub struct Kills {
    pub relay: AtomicUsize,
    /// Consumer children killed, wherever they were.
    pub consumer: AtomicUsize,
    pub relay_ready: AtomicUsize,
    pub consumer_before: AtomicUsize,
    pub consumer_after: AtomicUsize,
    /// Consumer children killed without reaching their stop point (nothing left to read).
    pub consumer_unstopped: AtomicUsize,
    pub duplicates: AtomicUsize,
}

/// Runs the relay and consumer children of `entry`, killing each again and again, until
/// `stop` is set and at least `min_kills` of each kind happened. `env` is passed to both.
pub fn supervise(
    entry: &'static str,
    env: Vec<(&'static str, String)>,
    stop: Arc<AtomicBool>,
    min_kills: usize,
    kills: Arc<Kills>,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    let relay = {
        let (env, stop, kills) = (env.clone(), stop.clone(), kills.clone());
        std::thread::spawn(move || {
            let mut log = Vec::new();
            while !stop.load(Ordering::SeqCst) || kills.relay.load(Ordering::SeqCst) < min_kills {
                let child = ChildProcess::spawn(entry, "relay", &env);
                if child.wait_for(READY, crate::common::PATIENCE, &mut log) {
                    kills.relay_ready.fetch_add(1, Ordering::SeqCst);
                }
                // The kill lands at a random moment of the running relay's first seconds:
                // that is the fault (a sleep here is its timing, not a synchronisation).
                // Seconds, not milliseconds: a broker client's first batch waits for its
                // connection and producer id, which a debug build on a busy machine takes
                // a second or more to get.
                std::thread::sleep(Duration::from_millis(random_below(2_500)));
                child.kill(&mut log);
                kills.relay.fetch_add(1, Ordering::SeqCst);
            }
            log
        })
    };
    let consumer = std::thread::spawn(move || {
        let mut log = Vec::new();
        let mut round = 0usize;
        let consumer_kills = |k: &Kills| {
            k.consumer_before.load(Ordering::SeqCst) + k.consumer_after.load(Ordering::SeqCst)
        };
        // Once stopped, a child finds nothing left to read when everything is applied:
        // then it never reaches its stop point, and more rounds are useless.
        let unstopped = |k: &Kills| k.consumer_unstopped.load(Ordering::SeqCst);
        let mut unstopped_at_stop = None;
        loop {
            if stop.load(Ordering::SeqCst) {
                let since = *unstopped_at_stop.get_or_insert(unstopped(&kills));
                if consumer_kills(&kills) >= min_kills || unstopped(&kills) >= since + 2 {
                    break;
                }
            }
            // Alternately before and after the database commit.
            let at = ["before", "after"][round & 1];
            round += 1;
            let mut env = env.clone();
            env.push((STOP_AFTER, (1 + random_below(15)).to_string()));
            env.push((STOP_AT, at.to_owned()));
            let child = ChildProcess::spawn(entry, "consumer", &env);
            let mut seen = Vec::new();
            let stopped = child.wait_for(STOPPED, Duration::from_secs(20), &mut seen);
            child.kill(&mut seen);
            let duplicates = seen.iter().filter(|l| *l == DUPLICATE).count();
            kills.duplicates.fetch_add(duplicates, Ordering::SeqCst);
            match (stopped, at) {
                (true, "before") => kills.consumer_before.fetch_add(1, Ordering::SeqCst),
                (true, _) => kills.consumer_after.fetch_add(1, Ordering::SeqCst),
                (false, _) => kills.consumer_unstopped.fetch_add(1, Ordering::SeqCst),
            };
            kills.consumer.fetch_add(1, Ordering::SeqCst);
            log.extend(seen.into_iter().filter(|l| l != DUPLICATE));
        }
        log
    });
    vec![relay, consumer]
}

/// The faulty phase of an end-to-end run: relay and consumer children of `entry` killed
/// again and again (see [`supervise`]) while `messages` are committed through `outbox` in
/// ten slices, each slice waiting for a relay and a consumer child to be killed, so that
/// the children have work all along. Returns the kills and the children's output.
pub fn produce_under_kills(
    entry: &'static str,
    env: Vec<(&'static str, String)>,
    outbox: &Outbox,
    pool: &PgPool,
    messages: i64,
    min_kills: usize,
) -> (Arc<Kills>, Vec<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(Kills::default());
    let supervisors = supervise(entry, env, stop.clone(), min_kills, kills.clone());
    for slice in 0..10 {
        produce(
            outbox,
            pool,
            slice * messages / 10,
            (slice + 1) * messages / 10,
        );
        let (relay_kills, consumer_kills) = (
            kills.relay.load(Ordering::SeqCst),
            kills.consumer.load(Ordering::SeqCst),
        );
        assert!(crate::common::eventually(
            crate::common::PATIENCE * 2,
            || {
                kills.relay.load(Ordering::SeqCst) > relay_kills
                    && kills.consumer.load(Ordering::SeqCst) > consumer_kills
            }
        ));
    }
    stop.store(true, Ordering::SeqCst);
    let mut logs = Vec::new();
    for s in supervisors {
        logs.extend(s.join().unwrap());
    }
    (kills, logs)
}

/// The rest of an end-to-end run, the same for every broker: children killed while the
/// messages are committed ([`produce_under_kills`]); then, without faults, a relay started by
/// `start_relay` drains the outbox and `consume_rest` applies what is left (it returns the
/// duplicates it met, and stops when `done` says everything is applied). Asserts every
/// committed message applied exactly once, and that the faults were real: killed children
/// relayed and applied, consumers died before and after their commit, and the broker carried
/// duplicates that the inbox absorbed. Prints the figures as `FIGURES {name}: ...`.
#[allow(clippy::too_many_arguments)]
pub fn exactly_once_through_kills(
    name: &str,
    entry: &'static str,
    env: Vec<(&'static str, String)>,
    url: &str,
    schema: &str,
    messages: i64,
    min_kills: usize,
    start_relay: impl FnOnce(&Outbox) -> troutbox::Handle,
    consume_rest: impl FnOnce(&dyn Fn() -> bool) -> usize,
) {
    let pool = pool_for(url, 6);
    let outbox = setup(&pool, schema);
    let (kills, logs) = produce_under_kills(entry, env, &outbox, &pool, messages, min_kills);

    // Afterwards, without faults: a relay drains what is left, a consumer applies the rest.
    let outbox_left = format!("SELECT count(*) FROM {schema}.outbox_messages");
    let relayed_by_children = messages - crate::common::count(&pool, &outbox_left);
    let applied_by_children = applied(&pool, schema);
    let mut relay = start_relay(&self::outbox(&pool, schema));
    assert!(crate::common::eventually(
        crate::common::PATIENCE * 4,
        || crate::common::count(&pool, &outbox_left) == 0
    ));
    relay.shutdown().unwrap();
    let check = pool_for(url, 1);
    let final_duplicates = consume_rest(&|| applied(&check, schema) >= messages);

    let (once, missing, more) = verdict(&pool, schema, messages);
    let absorbed = kills.duplicates.load(Ordering::SeqCst) + final_duplicates;
    println!(
        "FIGURES {name}: committed={messages} applied_once={once} missing={missing} applied_more_than_once={more} \
         relay_kills={} (ready {}) consumer_kills_before_db_commit={} consumer_kills_after_db_commit={} consumer_kills_elsewhere={} \
         relayed_by_killed_relays={relayed_by_children} applied_by_killed_consumers={applied_by_children} duplicates_absorbed_by_inbox={absorbed}",
        kills.relay.load(Ordering::SeqCst),
        kills.relay_ready.load(Ordering::SeqCst),
        kills.consumer_before.load(Ordering::SeqCst),
        kills.consumer_after.load(Ordering::SeqCst),
        kills.consumer_unstopped.load(Ordering::SeqCst),
    );
    let tail: Vec<_> = logs.iter().rev().take(20).collect();
    assert_eq!(
        (once, missing, more),
        (messages, 0, 0),
        "children's last lines: {tail:?}"
    );
    assert!(
        relayed_by_children > 0 && applied_by_children > 0,
        "{tail:?}"
    );
    assert!(kills.consumer_before.load(Ordering::SeqCst) > 0);
    assert!(kills.consumer_after.load(Ordering::SeqCst) > 0);
    assert!(absorbed > 0, "no duplicate reached the inbox");
}

/// The verdict: (applied exactly once, missing, applied more than once).
pub fn verdict(pool: &PgPool, schema: &str, committed: i64) -> (i64, i64, i64) {
    let once = crate::common::count(
        pool,
        &format!("SELECT count(*) FROM {schema}.applied WHERE times = 1"),
    );
    let more = crate::common::count(
        pool,
        &format!("SELECT count(*) FROM {schema}.applied WHERE times > 1"),
    );
    let present = crate::common::count(
        pool,
        &format!("SELECT count(*) FROM {schema}.applied WHERE n >= 0 AND n < {committed}"),
    );
    (once, committed - present, more)
}
