//! Bounded bytes, not only rows (issue 11): what one message and one `add_messages` call may
//! hold, refused with a typed error before any round trip, the caller's transaction left
//! usable; and retry delays that the database can store.

mod common;

use std::time::Duration;

use common::{count, pool, store};
use troutbox::{
    Backoff, Error, NewMessage, Outbox, MAX_BACKOFF, MAX_BYTES_PER_CALL, MAX_HEADERS,
    MAX_HEADER_BYTES, MAX_MESSAGES_PER_CALL,
};

#[test]
fn headers_and_calls_are_bounded_in_count_and_bytes() {
    const SCHEMA: &str = "limits_bytes";
    let pool = pool(2);
    let store = store(SCHEMA, &pool);
    let outbox = Outbox::builder(store).build().unwrap();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();

    // One header too many.
    let mut many = NewMessage::new("k", b"v");
    for _ in 0..=MAX_HEADERS {
        many = many.header("h", "v");
    }
    let err = outbox.add(&mut tx, &many).unwrap_err();
    assert!(matches!(err, Error::InvalidHeader { .. }), "{err}");
    // Headers over their byte limit (each header small, together too large).
    let big = "x".repeat(MAX_HEADER_BYTES / 2);
    let heavy = NewMessage::new("k", b"v")
        .header("a", &big)
        .header("b", &big);
    let err = outbox.add(&mut tx, &heavy).unwrap_err();
    assert!(matches!(err, Error::InvalidHeader { .. }), "{err}");
    assert!(err.to_string().contains("64 KiB"), "{err}");

    // One message too many in one call.
    let keys: Vec<String> = (0..=MAX_MESSAGES_PER_CALL)
        .map(|i| format!("k{i}"))
        .collect();
    let err = outbox
        .add_messages(&mut tx, keys.iter().map(|k| NewMessage::new(k, b"v")))
        .unwrap_err();
    assert!(
        matches!(err, Error::CallTooLarge { max, .. } if max == MAX_MESSAGES_PER_CALL),
        "{err}"
    );
    // Too many bytes in one call: values of 1 MiB each (the default max_value_size), one
    // buffer borrowed by every message.
    let value = vec![b'x'; 1 << 20];
    let n = MAX_BYTES_PER_CALL / value.len() + 1;
    let err = outbox
        .add_messages(&mut tx, (0..n).map(|_| NewMessage::new("k", &value)))
        .unwrap_err();
    assert!(
        matches!(err, Error::CallTooLarge { max, .. } if max == MAX_BYTES_PER_CALL),
        "{err}"
    );

    // Nothing reached the database: the transaction is still usable, and empty.
    outbox.add_message(&mut tx, "k", b"ok").unwrap();
    tx.commit().unwrap();
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {SCHEMA}.outbox_messages")
        ),
        1
    );
}

#[test]
fn a_retry_delay_the_database_cannot_store_is_refused() {
    let pool = pool(2);
    let store = store("limits_backoff", &pool);
    for max in [Duration::MAX, MAX_BACKOFF + Duration::from_secs(1)] {
        let err = Outbox::builder(store.clone())
            .backoff(Backoff::exponential(Duration::from_secs(1), max))
            .build()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidConfig {
                    option: "backoff",
                    ..
                }
            ),
            "{err}"
        );
    }
    Outbox::builder(store)
        .backoff(Backoff::exponential(Duration::from_secs(1), MAX_BACKOFF))
        .build()
        .unwrap();
}

/// Relays `outbox` until `n` messages were sent; returns each batch's (ids, keys, value bytes).
fn batches_of(outbox: &troutbox::Outbox, n: usize) -> Vec<Vec<(i64, String, usize)>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut relay = outbox
        .start(move |batch: &mut troutbox::Batch| {
            s.lock().unwrap().push(
                batch
                    .iter()
                    .map(|m| (m.id(), m.key().to_owned(), m.value().len()))
                    .collect::<Vec<_>>(),
            );
            Ok::<(), String>(())
        })
        .unwrap();
    assert!(common::eventually(common::PATIENCE, || seen
        .lock()
        .unwrap()
        .iter()
        .map(Vec::len)
        .sum::<usize>()
        >= n));
    relay.shutdown().unwrap();
    let batches = seen.lock().unwrap().clone();
    batches
}

#[test]
fn a_batch_holds_at_most_max_batch_bytes_unless_one_message_is_larger() {
    let pool = pool(6);
    for ordered in [false, true] {
        let schema = format!("limits_batch_bytes_{ordered}");
        let store = store(&schema, &pool);
        let outbox = Outbox::builder(store)
            .per_key_ordering(ordered)
            .batch_size(100)
            .max_batch_bytes(10_000)
            .max_value_size(100_000)
            .build()
            .unwrap();
        outbox.migrate().unwrap();
        // 40 messages of 3,000 bytes over three keys, one of 50,000 in the middle.
        let mut conn = pool.get().unwrap();
        let mut tx = conn.transaction().unwrap();
        for i in 0..41 {
            let size = if i == 20 { 50_000 } else { 3_000 };
            outbox
                .add_message(&mut tx, &format!("k{}", i % 3), &vec![b'x'; size])
                .unwrap();
        }
        tx.commit().unwrap();
        drop(conn);

        let batches = batches_of(&outbox, 41);
        let all: Vec<i64> = batches.iter().flatten().map(|m| m.0).collect();
        assert_eq!(all.len(), 41, "each message once: {batches:?}");
        for batch in &batches {
            let bytes: usize = batch.iter().map(|m| m.2).sum();
            assert!(
                bytes <= 10_000 || batch.len() == 1,
                "ordered={ordered}: a batch of {} messages holds {bytes} bytes",
                batch.len()
            );
        }
        // The large one went alone, and the bound cut batches short (3 of 3,000 fit).
        assert!(batches.iter().any(|b| b.len() == 1 && b[0].2 == 50_000));
        assert!(batches.iter().all(|b| b.len() <= 3), "{batches:?}");
        // Each key's messages in id order.
        for key in ["k0", "k1", "k2"] {
            let ids: Vec<i64> = batches
                .iter()
                .flatten()
                .filter(|m| m.1 == key)
                .map(|m| m.0)
                .collect();
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            assert_eq!(ids, sorted, "ordered={ordered}: key {key} out of order");
        }
    }
}

#[test]
fn max_batch_bytes_zero_is_refused_and_max_turns_the_bound_off() {
    let pool = pool(4);
    let store = store("limits_batch_bytes_off", &pool);
    let err = Outbox::builder(store.clone())
        .max_batch_bytes(0)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max_batch_bytes"), "{err}");
    let outbox = Outbox::builder(store)
        .batch_size(100)
        .max_batch_bytes(usize::MAX)
        .build()
        .unwrap();
    outbox
        .add_messages(
            &mut *pool.get().unwrap(),
            (0..30).map(|_| NewMessage::new("k", &[b'x'; 3_000])),
        )
        .unwrap();
    let batches = batches_of(&outbox, 30);
    assert_eq!(batches.len(), 1, "unbounded: one batch of 30");
}

#[test]
fn dead_summaries_list_what_dead_messages_do_without_the_values() {
    let pool = pool(4);
    let store = store("limits_dead_summaries", &pool);
    let outbox = Outbox::builder(store.clone())
        .max_value_size(2 << 20)
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    for (key, size) in [("big", 1 << 20), ("small", 10), ("empty", 0)] {
        outbox
            .add_message(&mut *conn, key, &vec![b'v'; size])
            .unwrap();
    }
    conn.batch_execute(
        "UPDATE limits_dead_summaries.outbox_messages SET state = 'dead', last_error = 'gave up'",
    )
    .unwrap();
    let summaries = store.dead_summaries(10, None).unwrap();
    let whole: Vec<troutbox::DeadSummary> = store
        .dead_messages(10, None)
        .unwrap()
        .iter()
        .map(|d| d.summary())
        .collect();
    assert_eq!(summaries, whole);
    let sizes: Vec<(&str, u64)> = summaries
        .iter()
        .map(|s| (s.key.as_str(), s.value_bytes))
        .collect();
    assert_eq!(sizes, [("empty", 0), ("small", 10), ("big", 1 << 20)]);
    // Paging by id, newest first.
    let older = store.dead_summaries(10, Some(summaries[0].id)).unwrap();
    assert_eq!(older, summaries[1..]);
}
