//! The producer side against a real server: what is stored, what is refused before the
//! database, and that a refused message leaves the caller's transaction usable.

mod common;

use common::{count, ids_with_key, pool, store, Deliveries, PATIENCE};
use troutbox::{Error, NewMessage, Outbox, MAX_KEY_LEN};

#[test]
fn headers_keys_and_values_round_trip_exactly() {
    let pool = pool(4);
    let store = store("round_trip", &pool);
    let outbox = Outbox::builder(store).build().unwrap();
    let mut conn = pool.get().unwrap();
    let odd = "quote \" backslash \\ comma , braces {} NULL";
    let value: Vec<u8> = (0..=255u8).collect();
    outbox
        .add(
            &mut *conn,
            &NewMessage::new("ключ/🔑", &value)
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .header(odd, odd)
                .header("dup", "1")
                .header("dup", ""),
        )
        .unwrap();
    let id = ids_with_key(&pool, "round_trip", "ключ/🔑")[0];
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let s = seen.clone();
    let deliveries = Deliveries::new();
    let d = deliveries.clone();
    let mut handle = outbox
        .start(move |batch: &mut troutbox::Batch| -> Result<(), String> {
            let m = &batch.messages()[0];
            *s.lock().unwrap() = Some(Seen {
                id: m.id(),
                key: m.key().to_owned(),
                value: m.value().to_vec(),
                headers: m.headers().to_vec(),
                first_dup: m.header("dup").map(str::to_owned),
                attempts: m.attempts(),
                created_at: m.created_at(),
            });
            d.record(batch);
            Ok(())
        })
        .unwrap();
    assert!(deliveries.wait_for(1, PATIENCE));
    handle.shutdown().unwrap();
    let m = seen.lock().unwrap().take().unwrap();
    assert_eq!(m.id, id);
    assert_eq!(m.key, "ключ/🔑");
    assert_eq!(m.value, value.as_slice());
    assert_eq!(m.attempts, 0);
    let headers: Vec<(&str, &str)> = m
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        headers,
        [
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ),
            (odd, odd),
            ("dup", "1"),
            ("dup", ""),
        ]
    );
    assert_eq!(m.first_dup.as_deref(), Some("1"));
    let age = time::OffsetDateTime::now_utc() - m.created_at;
    assert!(
        age < time::Duration::minutes(5) && age > -time::Duration::minutes(5),
        "{age}"
    );
}

#[test]
fn add_messages_inserts_many_in_order_in_one_call() {
    let pool = pool(4);
    let store = store("add_many", &pool);
    let outbox = Outbox::builder(store).build().unwrap();
    let mut conn = pool.get().unwrap();
    let values: Vec<String> = (0..1000).map(|i| format!("v{i}")).collect();
    let mut tx = conn.transaction().unwrap();
    let added = outbox
        .add_messages(
            &mut tx,
            values.iter().enumerate().map(|(i, v)| {
                let m = NewMessage::new("k", v.as_bytes());
                if i % 2 == 0 {
                    m.header("n", "even")
                } else {
                    m
                }
            }),
        )
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(added, 1000);
    // Ids are drawn in the order given.
    let rows = conn
        .query(
            "SELECT value, headers FROM add_many.outbox_messages ORDER BY id",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 1000);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, Vec<u8>>(0), values[i].as_bytes());
        let headers: Vec<String> = row.get(1);
        assert_eq!(headers.is_empty(), i % 2 == 1);
    }
    assert_eq!(outbox.add_messages(&mut *conn, Vec::new()).unwrap(), 0);
}

#[test]
fn bad_input_is_refused_before_the_database_and_the_transaction_stays_usable() {
    let pool = pool(4);
    let store = store("bad_input", &pool);
    let outbox = Outbox::builder(store).max_value_size(1024).build().unwrap();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();

    let err = outbox.add_message(&mut tx, "a\0b", b"v").unwrap_err();
    assert!(
        matches!(err, Error::KeyContainsNul { position: 1 }),
        "{err}"
    );
    let long_key = "k".repeat(MAX_KEY_LEN + 1);
    let err = outbox.add_message(&mut tx, &long_key, b"v").unwrap_err();
    assert!(matches!(err, Error::KeyTooLong { .. }), "{err}");
    let err = outbox.add_message(&mut tx, "k", &[0u8; 1025]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ValueTooLarge {
                len: 1025,
                max: 1024
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_value_size"), "{err}");
    let err = outbox
        .add(&mut tx, &NewMessage::new("k", b"v").header("h", "x\0y"))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidHeader { .. }), "{err}");
    let err = outbox
        .add(&mut tx, &NewMessage::new("k", b"v").header("", "x"))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidHeader { .. }), "{err}");
    // One bad message in a batch: none is added.
    let err = outbox
        .add_messages(
            &mut tx,
            [NewMessage::new("ok", b"v"), NewMessage::new("bad\0", b"v")],
        )
        .unwrap_err();
    assert!(matches!(err, Error::KeyContainsNul { .. }), "{err}");

    // Nothing reached the server, so the transaction is not aborted: it still works.
    outbox.add_message(&mut tx, "k", &[7u8; 1024]).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM bad_input.outbox_messages"),
        1
    );
}

#[test]
fn adding_to_a_table_that_was_never_migrated_says_so() {
    let pool = pool(2);
    let _ = store("never_migrated_probe", &pool);
    let store = troutbox::PgStore::new(pool.clone())
        .schema("never_migrated_probe")
        .table("nope");
    let outbox = Outbox::builder(store).build().unwrap();
    let err = outbox
        .add_message(&mut *pool.get().unwrap(), "k", b"v")
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err}");
    assert!(err.to_string().contains("migrate()"), "{err}");
    let err = outbox
        .start(|_: &mut troutbox::Batch| -> Result<(), String> { Ok(()) })
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err}");
}

#[test]
fn a_prepared_producer_adds_the_same_rows_on_its_own_connection() {
    let pool = pool(4);
    let store = store("prepared_producer", &pool);
    let outbox = Outbox::builder(store.clone()).build().unwrap();
    let mut conn = pool.get().unwrap();
    let producer = outbox.prepare(&mut *conn).unwrap();

    let mut tx = conn.transaction().unwrap();
    producer.add_message(&mut tx, "one", b"1").unwrap();
    producer
        .add(&mut tx, &NewMessage::new("two", b"2").header("h", "v"))
        .unwrap();
    assert_eq!(
        producer
            .add_messages(
                &mut tx,
                [
                    NewMessage::new("three", b"3"),
                    NewMessage::new("four", b"4")
                ]
            )
            .unwrap(),
        2
    );
    // Refused before the database, as without preparing.
    assert!(matches!(
        producer.add_message(&mut tx, "nul\0", b"x").unwrap_err(),
        Error::KeyContainsNul { .. }
    ));
    tx.commit().unwrap();
    let mut tx = conn.transaction().unwrap();
    producer.add_message(&mut tx, "rolled back", b"x").unwrap();
    tx.rollback().unwrap();

    let rows = conn
        .query(
            "SELECT key, value, headers FROM prepared_producer.outbox_messages ORDER BY id",
            &[],
        )
        .unwrap();
    let got: Vec<(String, Vec<u8>, Vec<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("one".into(), b"1".to_vec(), vec![]),
            ("two".into(), b"2".to_vec(), vec!["h".into(), "v".into()]),
            ("three".into(), b"3".to_vec(), vec![]),
            ("four".into(), b"4".to_vec(), vec![]),
        ]
    );

    // On another connection the statement does not exist: a database error, no panic.
    let mut other = pool.get().unwrap();
    let err = producer.add_message(&mut *other, "k", b"v").unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
}

/// What the Sender saw of a message (`Message` is not `Clone`, so a Sender cannot duplicate
/// one inside its batch).
struct Seen {
    id: i64,
    key: String,
    value: Vec<u8>,
    headers: Vec<(String, String)>,
    first_dup: Option<String>,
    attempts: u32,
    created_at: time::OffsetDateTime,
}
