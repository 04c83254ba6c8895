//! What only the MariaDB backend has to get right (the behaviour both backends share is
//! `tests/backends.rs`): `max_allowed_packet` against `add_messages`.

use troutbox::mariadb::mysql::prelude::Queryable;
use troutbox::mariadb::mysql::TxOpts;
use troutbox::mariadb::{pool, MariaDbOutbox, MariaDbStore};
use troutbox::testing::TempMariaDb;
use troutbox::{Error, NewMessage};

/// A server whose `max_allowed_packet` is 1 MiB: `add_messages` of 3 MB goes in statements
/// that fit it, and a message that cannot fit is refused before anything is sent, with the
/// transaction still usable.
#[test]
fn add_messages_fits_max_allowed_packet_and_refuses_what_cannot() {
    let server = TempMariaDb::builder()
        .setting("max_allowed_packet", "1M")
        .start()
        .unwrap();
    let pool = pool(&server.url(), 4).unwrap();
    let outbox = MariaDbOutbox::builder(MariaDbStore::new(pool.clone()))
        .max_value_size(4 << 20)
        .build()
        .unwrap();
    outbox.migrate().unwrap();
    let values: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 300_000]).collect();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.start_transaction(TxOpts::default()).unwrap();
    let added = outbox
        .add_messages(&mut tx, values.iter().map(|v| NewMessage::new("k", v)))
        .unwrap();
    assert_eq!(added, 10);
    let big = vec![7u8; 2 << 20];
    let refused = outbox.add_message(&mut tx, "k", &big).unwrap_err();
    assert!(
        matches!(&refused, Error::Unsupported { reason, .. } if reason.contains("max_allowed_packet")),
        "{refused}"
    );
    tx.commit().unwrap();
    let stored: Vec<(i64, i64)> = conn
        .query("SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM outbox_messages")
        .unwrap();
    assert_eq!(stored, vec![(10, 3_000_000)]);
}
