//! Delivery semantics against a real PostgreSQL server: committed => delivered, rolled back
//! => never, retries with backoff, dead letters, panics, many relays, shutdown.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{count, eventually, ids_with_key, pool, store, Deliveries, PATIENCE};
use troutbox::{Backoff, Batch, Error, NewMessage, Outbox};

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

#[test]
fn shutdown_with_a_batch_in_flight_finishes_it_and_loses_nothing() {
    let pool = pool(4);
    let store = store("shutdown_in_flight", &pool);
    let outbox = Outbox::builder(store).batch_size(5).build().unwrap();
    let mut conn = pool.get().unwrap();
    for i in 0..12 {
        outbox
            .add_message(&mut *conn, &format!("k{i}"), b"v")
            .unwrap();
    }
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
    let deliveries = Deliveries::new();
    let d = deliveries.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            let _ = entered_tx.try_send(());
            let _ = go_rx.recv();
            d.record(batch);
            Ok(())
        })
        .unwrap();
    entered_rx.recv_timeout(PATIENCE).unwrap();
    go_tx.send(()).unwrap();
    handle.shutdown().unwrap();
    // The batch in flight was delivered and deleted; the rest is still there, untouched.
    assert_eq!(deliveries.distinct(), 5);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM shutdown_in_flight.outbox_messages"
        ),
        7
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM shutdown_in_flight.outbox_messages WHERE attempts > 0"
        ),
        0
    );

    // A new relay delivers the rest.
    let mut handle = outbox.start(deliveries.sender()).unwrap();
    assert!(deliveries.wait_for(12, PATIENCE));
    handle.shutdown().unwrap();
    assert_eq!(deliveries.duplicates(), 0);
}

#[test]
fn a_sender_outliving_the_send_timeout_releases_its_rows_and_its_late_outcome_counts() {
    let pool = pool(6);
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
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let mut relay_a = outbox
        .start(move |_: &mut Batch| -> Result<(), String> {
            let _ = entered_tx.try_send(());
            let _ = go_rx.recv();
            Ok(())
        })
        .unwrap();
    entered_rx.recv_timeout(PATIENCE).unwrap();

    // Once the server ends A's transaction, relay B can claim the same message.
    let deliveries = Deliveries::new();
    let mut relay_b = outbox.start(deliveries.sender()).unwrap();
    assert!(deliveries.wait_for(1, PATIENCE));
    assert_eq!(deliveries.count_of(hung_id), 1);
    relay_b.shutdown().unwrap();

    go_tx.send(()).unwrap();
    relay_a.shutdown().unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM send_timeout.outbox_messages"),
        0
    );
    let errors = errors.lock().unwrap();
    assert!(!errors.is_empty(), "the lost transaction was not reported");
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
