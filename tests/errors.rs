//! Errors that say what happened (issue 13): a server error shows the server's message and
//! SQLSTATE, not just "db error"; only a lost connection is a connection error.

mod common;

use common::{pool, store};
use troutbox::{Error, Outbox};

#[test]
fn a_server_error_says_what_the_server_said_and_is_not_a_connection_error() {
    let pool = pool(2);
    let store = store("errors_server", &pool);
    let outbox = Outbox::builder(store).build().unwrap();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    // Abort the transaction with a statement of our own, then add a message in it.
    assert!(tx.batch_execute("SELECT 1/0").is_err());
    let err = outbox.add_message(&mut tx, "k", b"v").unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("current transaction is aborted") && text.contains("SQLSTATE 25P02"),
        "{text}"
    );
    assert!(!err.is_connection_error(), "{text}");
}

#[test]
fn a_lost_connection_is_a_connection_error() {
    let pool = pool(2);
    let store = store("errors_connection", &pool);
    let outbox = Outbox::builder(store).build().unwrap();
    let mut victim = pool.get().unwrap();
    // The same table check once, so that the next call goes straight to the INSERT.
    outbox.add_message(&mut *victim, "k", b"v").unwrap();
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    pool.get()
        .unwrap()
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    // The backend exits on its own schedule: the first call after it did fails.
    let mut failure = None;
    assert!(common::eventually(common::PATIENCE, || {
        failure = outbox.add_message(&mut *victim, "k", b"v").err();
        failure.is_some()
    }));
    let err = failure.unwrap();
    assert!(err.is_connection_error(), "{err}");
}
