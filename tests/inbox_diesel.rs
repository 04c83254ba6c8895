//! The inbox on a diesel connection (`cargo test --features diesel --test inbox_diesel`):
//! the same answers as on a `postgres` transaction, across a slot boundary, and the errors.

mod common;
#[path = "common/inbox.rs"]
mod helpers;

use diesel::{Connection, PgConnection, RunQueryDsl};

use common::pool;
use helpers::{built, deliver, fresh_schema, TestClock, MINUTE};
use troutbox::{Error, Inbox, Received};

#[test]
fn receive_on_a_diesel_connection() {
    let pool = pool(2);
    let schema = "inbox_diesel";
    let window = 10 * MINUTE;
    fresh_schema(schema, &pool);
    let boundary = 2_100_000_000 / window * window;
    let before = TestClock::at(boundary - 1);
    let early = built(schema, &pool, Some(window), Some(&before));
    early.migrate().unwrap();
    let plain = built(schema, &pool, Some(window), None);
    let mut conn = PgConnection::establish(&common::url()).unwrap();
    let receive = |conn: &mut PgConnection, inbox: &Inbox, id: &str| {
        conn.transaction(|conn| {
            troutbox::inbox::diesel::receive(inbox, conn, "c", id)
                .map_err(diesel::result::Error::from)
        })
        .unwrap()
    };
    assert_eq!(receive(&mut conn, &plain, "d1"), Received::First);
    assert_eq!(receive(&mut conn, &plain, "d1"), Received::Duplicate);
    // Across a boundary, with the clock given as a parameter.
    let after = TestClock::at(boundary + 1);
    let late = built(schema, &pool, Some(window), Some(&after));
    assert_eq!(receive(&mut conn, &early, "d2"), Received::First);
    assert_eq!(receive(&mut conn, &late, "d2"), Received::Duplicate);
    // Both clients see each other's entries.
    assert_eq!(deliver(&plain, &pool, "c", "d1"), Received::Duplicate);

    // REPEATABLE READ: an entry committed after the snapshot is a retryable error,
    // and diesel's own SerializationFailure once converted back.
    let outcome = conn.build_transaction().repeatable_read().run(|conn| {
        diesel::sql_query("SELECT 1").execute(conn)?; // the snapshot
        assert_eq!(deliver(&plain, &pool, "c", "d4"), Received::First);
        let err = troutbox::inbox::diesel::receive(&plain, conn, "c", "d4").unwrap_err();
        assert!(err.is_retryable(), "{err}");
        Err::<(), _>(diesel::result::Error::from(err))
    });
    assert!(
        matches!(
            outcome,
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::SerializationFailure,
                _
            ))
        ),
        "{outcome:?}"
    );

    let err = troutbox::inbox::diesel::receive(&plain, &mut conn, "", "x").unwrap_err();
    assert!(matches!(err, Error::InvalidMessageId { .. }), "{err}");
    let forever = built(schema, &pool, None, None);
    let err = troutbox::inbox::diesel::receive(&forever, &mut conn, "c", "d3").unwrap_err();
    assert!(matches!(err, Error::InboxWindowMismatch { .. }), "{err}");
}
