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

/// Every cause in `err`'s chain appears once when the whole chain is printed: no message
/// repeats the text of its source (the convention documented on `troutbox::Error`).
fn assert_no_repeated_cause(err: &(dyn std::error::Error + 'static)) {
    let mut current = err;
    while let Some(cause) = current.source() {
        let (outer, inner) = (current.to_string(), cause.to_string());
        assert!(
            !outer.contains(&inner),
            "{outer:?} repeats its source {inner:?}"
        );
        current = cause;
    }
}

#[test]
fn no_error_repeats_its_cause() {
    let pool = pool(6);
    let store = store("errors_chain", &pool);
    let outbox = Outbox::builder(store).build().unwrap();

    // A server error: the message is whole, and `postgres()` gives the crate's error.
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    assert!(tx.batch_execute("SELECT 1/0").is_err());
    let err = outbox.add_message(&mut tx, "k", b"v").unwrap_err();
    assert_no_repeated_cause(&err);
    assert!(std::error::Error::source(&err).is_none(), "{err:?}");
    let code = err.postgres().and_then(|e| e.code()).map(|c| c.code());
    assert_eq!(code, Some("25P02"));
    drop(tx);

    // No connection from the pool: r2d2's error is the source, not in the message.
    let config: postgres::Config = "host=127.0.0.1 port=1 user=nobody connect_timeout=1"
        .parse()
        .unwrap();
    let unreachable = r2d2::Pool::builder()
        .connection_timeout(std::time::Duration::from_millis(300))
        .build_unchecked(r2d2_postgres::PostgresConnectionManager::new(
            config,
            postgres::NoTls,
        ));
    let err = troutbox::PgStore::new(unreachable).migrate().unwrap_err();
    assert!(matches!(err, Error::Pool { .. }), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    assert_no_repeated_cause(&err);

    // A Sender's error, as the error handler gets it.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Error>::new()));
    let s = seen.clone();
    let outbox = Outbox::builder(common::store("errors_chain_sender", &pool))
        .max_retries(0)
        .error_handler(move |e| {
            if matches!(e, Error::Sender { .. }) {
                s.lock().unwrap().push(Error::SenderPanicked {
                    batch_size: 0,
                    message: format!("{e}|{}", std::error::Error::source(e).unwrap()),
                });
            }
        })
        .build()
        .unwrap();
    outbox.add_message(&mut *conn, "k", b"v").unwrap();
    drop(conn);
    let mut relay = outbox
        .start(|_: &mut troutbox::Batch| Err::<(), _>("broker said no"))
        .unwrap();
    assert!(common::eventually(common::PATIENCE, || !seen
        .lock()
        .unwrap()
        .is_empty()));
    relay.shutdown().unwrap();
    let recorded = match &seen.lock().unwrap()[0] {
        Error::SenderPanicked { message, .. } => message.clone(),
        _ => unreachable!(),
    };
    let (outer, source) = recorded.split_once('|').unwrap();
    assert_eq!(source, "broker said no");
    assert!(!outer.contains(source), "{outer:?}");

    // The throw-away server's errors keep their I/O cause as the source.
    let err = troutbox::testing::TempPostgres::builder()
        .setting("no_such_setting", "1")
        .start()
        .unwrap_err();
    assert_no_repeated_cause(&err);
}

/// Why (issue 22, first hour, point 2): the README's programs return errors from
/// `fn main() -> Result<(), Box<dyn Error>>`, which prints `{:?}`. The derived Debug showed
/// a `DbError { severity: ..., routine: Some("parserOpenTable") }` dump where the Display
/// says what to do ("call PgStore::migrate() once"). What `main` prints must lead with it.
#[test]
fn what_main_prints_is_the_message_with_its_hint() {
    let pool = common::pool(2);
    pool.get()
        .unwrap()
        .batch_execute("DROP SCHEMA IF EXISTS errors_never_migrated CASCADE")
        .unwrap();
    let store = troutbox::PgStore::new(pool.clone()).schema("errors_never_migrated");
    let outbox = troutbox::Outbox::builder(store).build().unwrap();
    let err = outbox
        .add_message(&mut *pool.get().unwrap(), "k", b"v")
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err}");
    let boxed: Box<dyn std::error::Error> = Box::new(err);
    let printed = format!("{boxed:?}");
    assert!(printed.starts_with(&boxed.to_string()), "{printed}");
    assert!(printed.contains("migrate()"), "{printed}");
    assert!(!printed.contains("routine"), "{printed}");
}

/// Environment variable that makes this binary the child of
/// `without_a_logger_the_default_handler_writes_to_stderr`.
const SILENT_CHILD_SCHEMA: &str = "TROUTBOX_ERRORS_SILENT_CHILD";

#[test]
#[ignore = "entry point of the child process of without_a_logger_the_default_handler_writes_to_stderr"]
fn silent_child() {
    let schema = std::env::var(SILENT_CHILD_SCHEMA).expect("run by its parent test only");
    let pool = pool(3);
    let outbox = Outbox::builder(troutbox::PgStore::new(pool.clone()).schema(&schema))
        .poll_interval(std::time::Duration::from_millis(5))
        .build()
        .unwrap();
    // No logger, no error handler: the defaults a new program has.
    let mut handle = outbox
        .start(|_: &mut troutbox::Batch| -> Result<(), String> { Err("broker down".into()) })
        .unwrap();
    while handle.stats().failed == 0 {
        std::thread::sleep(std::time::Duration::from_millis(10)); // polling a counter
    }
    handle.shutdown().unwrap();
}

/// Why (issue 22, first hour, point 4): with no logger installed, the default error handler
/// logged into the void: a program written from the README saw nothing while its Sender
/// failed every batch. Without a logger it now writes to standard error.
#[test]
fn without_a_logger_the_default_handler_writes_to_stderr() {
    const SCHEMA: &str = "errors_silent";
    let pool = pool(2);
    let store = store(SCHEMA, &pool);
    Outbox::builder(store)
        .build()
        .unwrap()
        .add_message(&mut *pool.get().unwrap(), "k", b"v")
        .unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["silent_child", "--exact", "--ignored", "--nocapture"])
        .env(SILENT_CHILD_SCHEMA, SCHEMA)
        .env("DATABASE_URL", common::url())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("troutbox relay: sender failed a batch of 1 message(s): broker down"),
        "{stderr}"
    );
}
