//! The relay's counters against the rows: after a run with failures, retries and dead
//! messages, every counter equals the transitions the database committed, and the backlog
//! equals a direct SQL count.

mod common;

use std::time::Duration;

use common::{count, eventually, pool, store, Deliveries, PATIENCE};
use troutbox::{Batch, NewMessage};

#[test]
fn counters_equal_committed_row_transitions() {
    let pool = pool(4);
    let store = store("observability_counters", &pool);
    let outbox = common::fast_outbox(&store)
        .batch_size(20)
        .max_retries(2)
        .build()
        .unwrap();
    // 100 messages: 10 fail once then succeed, 5 always fail (dead after 3 attempts).
    let keys: Vec<&str> = (0..100)
        .map(|i| match i % 20 {
            0 | 10 => "flaky",
            5 => "doomed",
            _ => "fine",
        })
        .collect();
    let mut conn = pool.get().unwrap();
    outbox
        .add_messages(&mut *conn, keys.iter().map(|k| NewMessage::new(k, b"v")))
        .unwrap();
    let deliveries = Deliveries::new();
    let d = deliveries.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            d.record(batch);
            for m in batch.iter_mut() {
                match (m.key(), m.attempts()) {
                    ("flaky", 0) | ("doomed", _) => m.mark_failed("no"),
                    _ => m.mark_sent(),
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || store.backlog().unwrap().dead == 5
        && store.backlog().unwrap().pending == 0));
    handle.shutdown().unwrap();
    let stats = handle.stats();

    // What the database holds now.
    let remaining = count(
        &pool,
        "SELECT count(*) FROM observability_counters.outbox_messages",
    );
    let dead = count(
        &pool,
        "SELECT count(*) FROM observability_counters.outbox_messages WHERE state = 'dead'",
    );
    let dead_attempts = count(
        &pool,
        "SELECT sum(attempts) FROM observability_counters.outbox_messages WHERE state = 'dead'",
    );
    assert_eq!(stats.sent, 100 - remaining as u64, "sent = rows removed");
    assert_eq!(stats.dead, dead as u64, "dead = rows in state dead");
    // Every failure of a dead message is in its attempts; the flaky ones failed once each.
    assert_eq!(stats.failed, dead_attempts as u64 + 10);
    assert_eq!(stats.retried, stats.failed - stats.dead);
    assert_eq!((stats.sent, stats.retried, stats.dead), (95, 20, 5));
    assert!(stats.batches >= 3);
    assert_eq!(stats.errors, 0);
    assert!(
        stats.batch_duration.count == stats.batches && stats.batch_duration.max > Duration::ZERO
    );
    // One latency per hand-over: 100 first attempts, then 10 flaky + 5 × 2 doomed retries.
    assert_eq!(stats.send_latency.count, 120);

    let backlog = store.backlog().unwrap();
    assert_eq!(
        backlog.pending,
        count(
            &pool,
            "SELECT count(*) FROM observability_counters.outbox_messages WHERE state = 'pending'"
        )
    );
    assert_eq!(backlog.dead, dead);
    assert_eq!(backlog.oldest_pending, None);
}
