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
