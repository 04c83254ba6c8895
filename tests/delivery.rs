//! Delivery semantics against a real PostgreSQL server: committed => delivered, rolled back
//! => never, retries with backoff, dead letters, panics, many relays, shutdown.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{count, eventually, ids_with_key, pool, store, Deliveries, PATIENCE};
use troutbox::{Backoff, Batch, Error, NewMessage, Outbox, PgPool, Retention};

fn fast_backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(50), Duration::from_millis(200))
}

#[test]
fn committed_is_delivered_and_rolled_back_never_is() {
    let pool = pool(4);
    let store = store("committed_rolled_back", &pool);
    let outbox = Outbox::builder(store)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    conn.batch_execute("CREATE TABLE committed_rolled_back.orders (id bigint)")
        .unwrap();

    let mut committed = Vec::new();
    for i in 0..20i64 {
        let mut tx = conn.transaction().unwrap();
        tx.execute(
            "INSERT INTO committed_rolled_back.orders VALUES ($1)",
            &[&i],
        )
        .unwrap();
        let value = format!("order {i}");
        outbox
            .add_message(&mut tx, &format!("order-{i}"), value.as_bytes())
            .unwrap();
        if i % 4 == 3 {
            tx.rollback().unwrap();
        } else {
            tx.commit().unwrap();
            committed.push(value.into_bytes());
        }
    }
    let deliveries = Deliveries::new();
    let mut handle = outbox.start(deliveries.sender()).unwrap();
    assert!(deliveries.wait_for(committed.len(), PATIENCE));
    // The relay drained the table: anything rolled back would have shown up by now.
    assert!(eventually(PATIENCE, || count(
        &pool,
        "SELECT count(*) FROM committed_rolled_back.outbox_messages"
    ) == 0));
    handle.shutdown().unwrap();
    let mut values = deliveries.values();
    values.sort();
    committed.sort();
    assert_eq!(values, committed);
    assert_eq!(deliveries.duplicates(), 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM committed_rolled_back.orders"),
        15
    );
}

#[test]
fn partial_failure_retries_only_the_failed_ones_with_backoff() {
    let pool = pool(4);
    let store = store("partial_failure", &pool);
    let outbox = Outbox::builder(store)
        .backoff(
            Backoff::exponential(Duration::from_secs(60), Duration::from_secs(600))
                .without_jitter(),
        )
        .build()
        .unwrap();
    let added = outbox
        .add_messages(
            &mut *pool.get().unwrap(),
            (0..10).map(|_| NewMessage::new("k", b"v")),
        )
        .unwrap();
    assert_eq!(added, 10);
    let ids = ids_with_key(&pool, "partial_failure", "k");
    let failing: Vec<i64> = ids.iter().copied().filter(|id| id % 3 == 0).collect();
    let f = failing.clone();
    let deliveries = Deliveries::new();
    let d = deliveries.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            d.record(batch);
            for m in batch.iter_mut() {
                if f.contains(&m.id()) {
                    m.mark_failed("broker rejected it");
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(deliveries.wait_for(10, PATIENCE));
    assert!(eventually(PATIENCE, || count(
        &pool,
        "SELECT count(*) FROM partial_failure.outbox_messages"
    ) == failing.len() as i64));
    handle.shutdown().unwrap();
    let rows = pool
        .get()
        .unwrap()
        .query(
            "SELECT id, attempts, last_error, state, available_at > now() + interval '50 seconds'
             FROM partial_failure.outbox_messages ORDER BY id",
            &[],
        )
        .unwrap();
    let got: Vec<(i64, i32, String, String, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let expected: Vec<(i64, i32, String, String, bool)> = failing
        .iter()
        .map(|id| {
            (
                *id,
                1,
                "broker rejected it".to_string(),
                "pending".to_string(),
                true,
            )
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(
        deliveries.duplicates(),
        0,
        "a message was retried before its backoff"
    );
}

#[test]
fn poison_message_dies_after_max_retries_and_does_not_block_the_others() {
    let pool = pool(4);
    let store = store("poison", &pool);
    let outbox = Outbox::builder(store.clone())
        .max_retries(2)
        .batch_size(10)
        .backoff(fast_backoff())
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    outbox.add_message(&mut *conn, "poison", b"bad").unwrap();
    for _ in 0..1000 {
        outbox.add_message(&mut *conn, "good", b"good").unwrap();
    }
    let poison = ids_with_key(&pool, "poison", "poison")[0];
    let good = ids_with_key(&pool, "poison", "good");
    let sent = Arc::new(Mutex::new(Vec::new()));
    let s = sent.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            for m in batch.iter_mut() {
                if m.key() == "poison" {
                    m.mark_failed(format!("cannot encode (attempt {})", m.attempts() + 1));
                } else {
                    s.lock().unwrap().push(m.id());
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || store.backlog().unwrap().dead == 1));
    handle.shutdown().unwrap();
    let mut sent = sent.lock().unwrap().clone();
    sent.sort();
    assert_eq!(sent, good);
    let dead = store.dead_messages(10, None).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id(), poison);
    assert_eq!(dead[0].message.attempts(), 3);
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("cannot encode (attempt 3)")
    );
    assert_eq!(store.backlog().unwrap().pending, 0);

    // Re-queued, it starts over and, now that the Sender accepts it, is delivered.
    assert_eq!(store.requeue_dead(&[poison]).unwrap(), 1);
    let deliveries = Deliveries::new();
    let mut handle = outbox.start(deliveries.sender()).unwrap();
    assert!(deliveries.wait_for(1, PATIENCE));
    handle.shutdown().unwrap();
    assert_eq!(deliveries.count_of(poison), 1);
}

#[test]
fn a_panicking_sender_does_not_kill_the_worker() {
    let pool = pool(4);
    let store = store("panicking", &pool);
    let errors = Arc::new(AtomicUsize::new(0));
    let e = errors.clone();
    let outbox = Outbox::builder(store)
        .backoff(fast_backoff())
        .poll_interval(Duration::from_millis(10))
        .error_handler(move |err| {
            if matches!(err, Error::SenderPanicked { .. }) {
                e.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    outbox.add_message(&mut *conn, "k", b"v").unwrap();
    let id = ids_with_key(&pool, "panicking", "k")[0];
    let deliveries = Deliveries::new();
    let d = deliveries.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            if batch.iter().any(|m| m.attempts() == 0 && m.key() == "k") {
                panic!("bug in the sender");
            }
            d.record(batch);
            Ok(())
        })
        .unwrap();
    assert!(deliveries.wait_for(1, PATIENCE));
    outbox.add_message(&mut *conn, "later", b"later").unwrap();
    assert!(deliveries.wait_for(2, PATIENCE));
    handle.shutdown().unwrap();
    assert_eq!(deliveries.count_of(id), 1);
    assert!(errors.load(Ordering::SeqCst) >= 1);
}

#[test]
fn two_relays_with_several_threads_deliver_everything_exactly_once() {
    const N: usize = 10_000;
    let pool = pool(16);
    let store = store("two_relays", &pool);
    let build = || {
        Outbox::builder(store.clone())
            .workers(3)
            .batch_size(50)
            .poll_interval(Duration::from_millis(10))
            .build()
            .unwrap()
    };
    let (a, b) = (build(), build());
    let deliveries = Deliveries::new();
    let mut relay_a = a.start(deliveries.sender()).unwrap();
    let mut relay_b = b.start(deliveries.sender()).unwrap();
    // Producers run while the relays deliver, from two threads, through both outboxes.
    let producers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|outbox| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut conn = pool.get().unwrap();
                for chunk in 0..(N / 2 / 50) {
                    let mut tx = conn.transaction().unwrap();
                    for i in 0..50 {
                        let value = format!("{chunk}-{i}");
                        outbox.add_message(&mut tx, "k", value.as_bytes()).unwrap();
                    }
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    assert!(
        deliveries.wait_for(N, PATIENCE * 2),
        "delivered {}",
        deliveries.distinct()
    );
    relay_a.shutdown().unwrap();
    relay_b.shutdown().unwrap();
    assert_eq!(deliveries.distinct(), N);
    assert_eq!(deliveries.duplicates(), 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM two_relays.outbox_messages"),
        0
    );
}

/// Sessions of `application_name` inside a transaction: a claim held while its Sender runs.
fn in_transaction(pool: &PgPool, application_name: &str) -> i64 {
    pool.get()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
            &[&application_name],
        )
        .unwrap()
        .get(0)
}

/// What a held Sender shares with its test.
#[derive(Clone)]
struct Hold {
    /// One clone per copy of the Sender: two per running worker (the Sender and its pristine
    /// copy), so the count says how many workers are still running.
    token: Arc<()>,
    entered: crossbeam_channel::Sender<()>,
    go: crossbeam_channel::Receiver<()>,
    first: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<i64>>>,
    deliveries: Arc<Deliveries>,
}

impl Hold {
    fn new(
        deliveries: &Arc<Deliveries>,
    ) -> (
        Hold,
        crossbeam_channel::Receiver<()>,
        crossbeam_channel::Sender<()>,
    ) {
        let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
        let hold = Hold {
            token: Arc::new(()),
            entered: entered_tx,
            go: go_rx,
            first: Arc::new(AtomicBool::new(true)),
            held: Arc::default(),
            deliveries: deliveries.clone(),
        };
        (hold, entered_rx, go_tx)
    }

    /// A Sender that holds the first batch it gets until `go` (the hang guard is far beyond
    /// any test's wait), then records it; every other batch is recorded at once.
    fn sender(&self) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static {
        let hold = self.clone();
        move |batch: &mut Batch| {
            // Captures the whole token (a closure captures only the fields it uses).
            let _alive = &hold.token;
            if hold.first.swap(false, Ordering::SeqCst) {
                hold.held
                    .lock()
                    .unwrap()
                    .extend(batch.iter().map(|m| m.id()));
                let _ = hold.entered.try_send(());
                let _ = hold.go.recv_timeout(PATIENCE * 4);
            }
            hold.deliveries.record(batch);
            Ok(())
        }
    }

    fn held(&self) -> Vec<i64> {
        self.held.lock().unwrap().clone()
    }

    /// Copies of the Sender still alive, the test's own `Hold` not counted.
    fn copies(&self) -> usize {
        Arc::strong_count(&self.token) - 1
    }
}

/// Releases the held batch once the stop is certain to have been given (the copies of
/// `hold` drop to those of one worker, `busy`, plus this thread's: the idle worker has
/// ended, and only the stop ends a worker), after a window in which the stopping call must
/// not return, since a batch is in the Sender. Returns true if it did return.
fn release_when_stopping(
    hold: &Hold,
    go: crossbeam_channel::Sender<()>,
    returned: Arc<AtomicBool>,
) -> std::thread::JoinHandle<bool> {
    let hold = hold.clone();
    std::thread::spawn(move || {
        // This thread's Hold, and the busy worker's two copies.
        assert!(
            eventually(PATIENCE, || hold.copies() <= 3),
            "the idle worker never stopped"
        );
        // An observation window, not a synchronisation: a correct stop never returns within
        // it, a stop that does not wait for the batch returns at once.
        eventually(Duration::from_millis(500), || {
            returned.load(Ordering::SeqCst)
        });
        let early = returned.load(Ordering::SeqCst);
        go.send(()).unwrap();
        early
    })
}

#[test]
fn shutdown_with_a_batch_in_flight_finishes_it_and_loses_nothing() {
    let pool = pool(6);
    let store = store("shutdown_in_flight", &pool);
    let outbox = Outbox::builder(store)
        .batch_size(5)
        .workers(2)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    for i in 0..12 {
        outbox
            .add_message(&mut *conn, &format!("k{i}"), b"v")
            .unwrap();
    }
    let deliveries = Deliveries::new();
    let (hold, entered, go) = Hold::new(&deliveries);
    let mut handle = outbox.start(hold.sender()).unwrap();
    entered.recv_timeout(PATIENCE).unwrap();
    // One worker holds the first batch; the other delivers the 7 others and goes idle.
    assert!(deliveries.wait_for(7, PATIENCE));
    let held = hold.held();
    assert_eq!(held.len(), 5);

    let returned = Arc::new(AtomicBool::new(false));
    let releaser = release_when_stopping(&hold, go, returned.clone());
    handle.shutdown().unwrap();
    returned.store(true, Ordering::SeqCst);
    assert!(
        !releaser.join().unwrap(),
        "shutdown returned while a batch was in the Sender"
    );
    assert_eq!(hold.copies(), 0, "a worker outlived the shutdown");
    // The batch in flight was delivered once and settled (deleted) before shutdown returned.
    for id in &held {
        assert_eq!(deliveries.count_of(*id), 1);
    }
    assert_eq!(deliveries.distinct(), 12);
    assert_eq!(deliveries.duplicates(), 0);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM shutdown_in_flight.outbox_messages"
        ),
        0
    );
    assert_eq!(handle.stats().sent, 12);
}

#[test]
fn dropping_the_handle_while_the_sender_is_blocked_settles_the_batch_delivered_once() {
    let pool = pool(6);
    let store = store("drop_in_flight", &pool);
    let outbox = Outbox::builder(store)
        .batch_size(5)
        .workers(2)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    outbox
        .add_messages(
            &mut *pool.get().unwrap(),
            (0..5).map(|_| NewMessage::new("k", b"v")),
        )
        .unwrap();
    let deliveries = Deliveries::new();
    let (hold, entered, go) = Hold::new(&deliveries);
    let handle = outbox.start(hold.sender()).unwrap();
    entered.recv_timeout(PATIENCE).unwrap();
    let returned = Arc::new(AtomicBool::new(false));
    let releaser = release_when_stopping(&hold, go, returned.clone());
    drop(handle);
    returned.store(true, Ordering::SeqCst);
    assert!(
        !releaser.join().unwrap(),
        "drop returned while a batch was in the Sender"
    );
    assert_eq!(hold.copies(), 0, "a worker outlived the drop");
    assert_eq!(deliveries.distinct(), 5);
    assert_eq!(deliveries.duplicates(), 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM drop_in_flight.outbox_messages"),
        0,
        "the batch was not settled before drop returned"
    );
}

#[test]
fn dropping_the_handle_with_a_sender_stuck_for_good_returns_after_the_shutdown_timeout() {
    const SHUTDOWN: Duration = Duration::from_millis(300);
    let pool = pool(4);
    let store = store("drop_stuck", &pool);
    let outbox = Outbox::builder(store)
        .shutdown_timeout(SHUTDOWN)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    outbox
        .add_message(&mut *pool.get().unwrap(), "k", b"v")
        .unwrap();
    let deliveries = Deliveries::new();
    let (hold, entered, go) = Hold::new(&deliveries);
    let handle = outbox.start(hold.sender()).unwrap();
    entered.recv_timeout(PATIENCE).unwrap();
    let (dropped_tx, dropped_rx) = crossbeam_channel::bounded::<Duration>(1);
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        drop(handle);
        dropped_tx.send(started.elapsed()).unwrap();
    });
    // Hang guard only: the Sender never returns on its own.
    let took = dropped_rx
        .recv_timeout(PATIENCE)
        .expect("drop hung on a stuck Sender");
    assert!(took >= SHUTDOWN, "drop returned after {took:?}");
    assert_eq!(hold.copies(), 2, "the stuck worker is left running");
    assert_eq!(deliveries.distinct(), 0);
    // Let go: the detached worker settles its batch and ends.
    go.send(()).unwrap();
    assert!(eventually(PATIENCE, || hold.copies() == 0));
    assert_eq!(deliveries.distinct(), 1);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM drop_stuck.outbox_messages"),
        0
    );
}

#[test]
fn a_sender_stuck_past_the_shutdown_timeout_is_reported_redelivered_and_not_settled_twice() {
    const APP: &str = "delivery-stuck-past-shutdown";
    let pool = common::named_pool(6, APP);
    let admin = common::pool(2);
    let store = store("stuck_past_shutdown", &pool);
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e = errors.clone();
    let outbox = Outbox::builder(store)
        .send_timeout(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_millis(200))
        .poll_interval(Duration::from_millis(10))
        .error_handler(move |err| e.lock().unwrap().push(err.to_string()))
        .build()
        .unwrap();
    outbox
        .add_messages(
            &mut *pool.get().unwrap(),
            (0..3).map(|_| NewMessage::new("k", b"v")),
        )
        .unwrap();
    let ids = ids_with_key(&pool, "stuck_past_shutdown", "k");
    let stuck_deliveries = Deliveries::new();
    let (hold, entered, go) = Hold::new(&stuck_deliveries);
    let mut stuck = outbox.start(hold.sender()).unwrap();
    entered.recv_timeout(PATIENCE).unwrap();
    assert_eq!(hold.held(), ids);

    let err = stuck.shutdown().unwrap_err();
    assert!(
        matches!(err, Error::ShutdownTimedOut { running: 1 }),
        "{err}"
    );
    // The server ends the claim at the send timeout; a new relay then delivers the batch.
    assert!(eventually(PATIENCE, || in_transaction(&admin, APP) == 0));
    let deliveries = Deliveries::new();
    let mut fresh = outbox.start(deliveries.sender()).unwrap();
    assert!(deliveries.wait_for(3, PATIENCE));
    assert!(eventually(PATIENCE, || count(
        &pool,
        "SELECT count(*) FROM stuck_past_shutdown.outbox_messages"
    ) == 0));
    fresh.shutdown().unwrap();
    assert_eq!(fresh.stats().sent, 3);

    // The stuck Sender finally returns: its outcome must not be applied on top.
    go.send(()).unwrap();
    assert!(
        eventually(PATIENCE, || hold.copies() == 0),
        "the detached worker never ended"
    );
    assert_eq!(stuck_deliveries.distinct(), 3);
    let late = stuck.stats();
    assert_eq!(
        (late.sent, late.failed, late.retried, late.dead),
        (0, 0, 0, 0),
        "the lost claim was settled again"
    );
    assert!(
        errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("the outcome of 3 message(s) was not recorded")),
        "{:?}",
        errors.lock().unwrap()
    );
    for id in ids {
        assert_eq!(deliveries.count_of(id), 1);
    }
    assert_eq!(
        count(
            &pool,
            "SELECT (SELECT count(*) FROM stuck_past_shutdown.outbox_messages_claims WHERE claim_id > 0)
                  + (SELECT count(*) FROM stuck_past_shutdown.outbox_messages_charges)"
        ),
        0
    );
}

#[test]
fn a_sender_outliving_the_send_timeout_releases_its_rows_and_its_dropped_outcome_is_reported() {
    const APP: &str = "delivery-send-timeout";
    let pool = common::named_pool(6, APP);
    let admin = common::pool(2);
    let store = store("send_timeout", &pool);
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e = errors.clone();
    let outbox = Outbox::builder(store)
        .send_timeout(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(10))
        .error_handler(move |err| e.lock().unwrap().push(err.to_string()))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    outbox.add_message(&mut *conn, "hung", b"v").unwrap();
    let hung_id = ids_with_key(&pool, "send_timeout", "hung")[0];

    // Relay A hangs in its Sender until released.
    let hung_deliveries = Deliveries::new();
    let (hold, entered, go) = Hold::new(&hung_deliveries);
    let mut relay_a = outbox.start(hold.sender()).unwrap();
    entered.recv_timeout(PATIENCE).unwrap();

    // Once the server ends A's transaction, relay B claims the same message.
    let deliveries = Deliveries::new();
    let mut relay_b = outbox.start(deliveries.sender()).unwrap();
    assert!(deliveries.wait_for(1, PATIENCE));
    assert_eq!(deliveries.count_of(hung_id), 1);
    assert!(eventually(PATIENCE, || in_transaction(&admin, APP) == 0));
    relay_b.shutdown().unwrap();
    assert_eq!(relay_b.stats().sent, 1);

    // A's late outcome finds the row settled by B: nothing is applied, and it says so.
    go.send(()).unwrap();
    relay_a.shutdown().unwrap();
    assert_eq!(hung_deliveries.count_of(hung_id), 1);
    assert_eq!(
        relay_a.stats().sent,
        0,
        "A's late outcome counted a row B settled"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM send_timeout.outbox_messages"),
        0
    );
    let errors = errors.lock().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("the outcome of 1 message(s) was not recorded")),
        "the dropped outcome was not reported: {errors:?}"
    );
}

/// A claim lost at the send timeout with no other relay about: the Sender's late outcome
/// is applied on the side connection, once.
fn late_outcome_without_a_competing_relay(schema: &str, keep: bool) {
    let app = format!("delivery-{schema}");
    let pool = common::named_pool(4, &app);
    let admin = common::pool(2);
    let store = if keep {
        let retention = Retention::keep_sent(Duration::from_secs(3600));
        common::keep_sent_store(schema, &pool, retention)
    } else {
        common::store(schema, &pool)
    };
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e = errors.clone();
    let outbox = Outbox::builder(store)
        .send_timeout(Duration::from_millis(300))
        .max_retries(3)
        .backoff(
            Backoff::exponential(Duration::from_secs(60), Duration::from_secs(600))
                .without_jitter(),
        )
        .poll_interval(Duration::from_millis(10))
        .error_handler(move |err| e.lock().unwrap().push(err.to_string()))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    outbox.add_message(&mut *conn, "ok", b"v").unwrap();
    outbox.add_message(&mut *conn, "fail", b"v").unwrap();
    let ok = ids_with_key(&pool, schema, "ok")[0];
    let fail = ids_with_key(&pool, schema, "fail")[0];

    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            // Only the first call is held: a second one would be a redelivery.
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                let _ = entered_tx.try_send(());
                let _ = go_rx.recv_timeout(PATIENCE * 2);
            }
            for m in batch.iter_mut() {
                if m.key() == "fail" {
                    m.mark_failed("broker said no, late");
                } else {
                    m.mark_sent();
                }
            }
            Ok(())
        })
        .unwrap();
    entered_rx.recv_timeout(PATIENCE).unwrap();
    // The claim is open; the server ends it at the send timeout.
    assert_eq!(in_transaction(&admin, &app), 1);
    assert!(eventually(PATIENCE, || {
        in_transaction(&admin, &app) == 0
        && count(
            &admin,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND state <> 'idle'")
        ) == 0
    }));
    go_tx.send(()).unwrap();
    let settled =
        format!("SELECT count(*) FROM {schema}.outbox_messages WHERE id = {fail} AND attempts > 0");
    assert!(eventually(PATIENCE, || count(&pool, &settled) == 1
        && handle.stats().failed == 1));
    handle.shutdown().unwrap();

    let client = &mut *conn;
    let rows = client
        .query(
            &format!(
                "SELECT id, state, attempts, last_error, available_at > now() + interval '50 seconds'
                 FROM {schema}.outbox_messages ORDER BY id"
            ),
            &[],
        )
        .unwrap();
    let got: Vec<(i64, String, i32, Option<String>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let failed = (
        fail,
        "pending".to_string(),
        1,
        Some("broker said no, late".to_string()),
        true,
    );
    if keep {
        let sent: (i64, String, i32, Option<String>) =
            (got[0].0, got[0].1.clone(), got[0].2, got[0].3.clone());
        assert_eq!(sent, (ok, "sent".to_string(), 0, None));
        assert_eq!(got[1], failed);
    } else {
        assert_eq!(got, [failed], "the sent row was not removed exactly once");
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.sent, stats.failed, stats.retried, stats.dead),
        (1, 1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the batch was sent again");
    assert_eq!(
        count(
            &pool,
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.outbox_messages_claims WHERE claim_id > 0)
                      + (SELECT count(*) FROM {schema}.outbox_messages_charges)"
            )
        ),
        0
    );
    // Recorded in full: no outcome was dropped.
    let errors = errors.lock().unwrap();
    assert!(
        !errors.iter().any(|e| e.contains("was not recorded")),
        "{errors:?}"
    );
}

#[test]
fn a_late_outcome_without_a_competing_relay_is_applied_once_in_delete_mode() {
    late_outcome_without_a_competing_relay("late_outcome_delete", false);
}

#[test]
fn a_late_outcome_without_a_competing_relay_is_applied_once_in_keep_mode() {
    late_outcome_without_a_competing_relay("late_outcome_keep", true);
}

#[test]
fn a_row_committed_behind_a_draining_relay_is_not_left_until_the_end() {
    // While a backlog drains in full batches the relay resumes after its last position; a
    // message whose transaction started earlier (so it sorts before that position) but
    // committed later must still be picked up soon, not only once the backlog is gone.
    const N: i64 = 20_000;
    let pool = pool(4);
    let store = store("behind_the_mark", &pool);
    let outbox = Outbox::builder(store)
        .batch_size(10)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut slow = pool.get().unwrap();
    let mut late_tx = slow.transaction().unwrap();
    outbox.add_message(&mut late_tx, "late", b"v").unwrap();
    pool.get()
        .unwrap()
        .execute(
            "INSERT INTO behind_the_mark.outbox_messages (key, value)
             SELECT 'bulk', '\\x00'::bytea FROM generate_series(1, $1::int8)",
            &[&N],
        )
        .unwrap();

    let delivered = Arc::new(AtomicUsize::new(0));
    let late_seen_at = Arc::new(Mutex::new(None));
    let (d, l) = (delivered.clone(), late_seen_at.clone());
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            if batch.iter().any(|m| m.key() == "late") {
                *l.lock().unwrap() = Some(d.load(Ordering::SeqCst));
            }
            d.fetch_add(batch.len(), Ordering::SeqCst);
            // Some work per batch, so draining the backlog takes several seconds.
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || delivered.load(Ordering::SeqCst) >= 1_000));
    late_tx.commit().unwrap();
    let committed_at = delivered.load(Ordering::SeqCst);
    assert!(eventually(PATIENCE, || delivered.load(Ordering::SeqCst)
        as i64
        > N));
    handle.shutdown().unwrap();
    let seen_at = late_seen_at
        .lock()
        .unwrap()
        .expect("late message delivered");
    assert!(
        committed_at < (N as usize) / 2 && seen_at < (N as usize) * 3 / 4,
        "late message committed after {committed_at} deliveries, delivered after {seen_at} of {N}"
    );
}
