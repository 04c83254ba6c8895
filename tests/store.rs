//! The store against a real server: migrations, identifiers, configuration, connection
//! failures.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{pool, store};
use r2d2_postgres::PostgresConnectionManager;
use troutbox::{Backoff, Error, Outbox, PgStore};

#[test]
fn migrate_is_idempotent_and_safe_from_many_threads_at_once() {
    let pool = pool(10);
    pool.get()
        .unwrap()
        .batch_execute("DROP SCHEMA IF EXISTS concurrent_migrate CASCADE")
        .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = PgStore::new(pool.clone()).schema("concurrent_migrate");
            std::thread::spawn(move || store.migrate())
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    PgStore::new(pool.clone())
        .schema("concurrent_migrate")
        .migrate()
        .unwrap();
    let versions: i64 = pool
        .get()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM concurrent_migrate.troutbox_migrations",
            &[],
        )
        .unwrap()
        .get(0);
    // One row per migration of the one table: versions 1 to 5, each applied once.
    assert_eq!(versions, 5);
}

#[test]
fn hostile_identifiers_are_rejected_and_never_reach_sql() {
    let pool = pool(4);
    let store = store("hostile_names", &pool);
    let mut conn = pool.get().unwrap();
    conn.batch_execute("CREATE TABLE hostile_names.x (id int)")
        .unwrap();
    let long = "a".repeat(64);
    let cases = [
        ("", "table"),
        (long.as_str(), "table"),
        ("a\"b", "table"),
        ("a;b", "table"),
        ("a b", "table"),
        ("\"; DROP TABLE hostile_names.x; --", "table"),
        ("x; DROP TABLE hostile_names.x", "schema"),
    ];
    for (name, what) in cases {
        let candidate = if what == "table" {
            store.clone().table(name)
        } else {
            store.clone().schema(name)
        };
        let err = candidate.migrate().unwrap_err();
        assert!(
            matches!(err, Error::InvalidIdentifier { .. }),
            "{name:?}: {err}"
        );
        let err = Outbox::builder(candidate.clone()).build().unwrap_err();
        assert!(
            matches!(err, Error::InvalidIdentifier { .. }),
            "{name:?}: {err}"
        );
        assert!(candidate.validate().is_err());
        assert!(candidate.dead_messages(1, None).is_err());
    }
    // 52 bytes leaves no room for the index names: refused rather than silently truncated.
    assert!(store.clone().table(&"t".repeat(52)).validate().is_err());
    assert!(store.clone().table(&"t".repeat(51)).validate().is_ok());
    let exists: bool = conn
        .query_one("SELECT to_regclass('hostile_names.x') IS NOT NULL", &[])
        .unwrap()
        .get(0);
    assert!(exists, "table x was dropped");
}

#[test]
fn case_and_custom_names_are_kept_exactly() {
    const SCHEMA: &str = "Custom_Schema";
    let pool = pool(6);
    pool.get()
        .unwrap()
        .batch_execute(
            "DROP SCHEMA IF EXISTS \"Custom_Schema\" CASCADE; DROP SCHEMA IF EXISTS custom_schema CASCADE",
        )
        .unwrap();
    let store = PgStore::new(pool.clone()).schema(SCHEMA).table("Events");
    store.migrate().unwrap();
    assert_eq!(store.qualified_table(), "\"Custom_Schema\".\"Events\"");
    let outbox = Outbox::builder(store.clone())
        .max_retries(1)
        .backoff(Backoff::exponential(
            Duration::from_millis(10),
            Duration::from_millis(20),
        ))
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    for key in ["ok", "flaky", "doomed"] {
        outbox.add_message(&mut *conn, key, b"v").unwrap();
    }
    assert_eq!(store.backlog().unwrap().pending, 3);

    // Relay, retry and dead letter through the exact names.
    let sent = Arc::new(Mutex::new(Vec::new()));
    let s = sent.clone();
    let mut handle = outbox
        .start(move |batch: &mut troutbox::Batch| -> Result<(), String> {
            for m in batch.iter_mut() {
                match (m.key(), m.attempts()) {
                    ("flaky", 0) | ("doomed", _) => m.mark_failed("no"),
                    _ => s.lock().unwrap().push(m.key().to_string()),
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(common::eventually(common::PATIENCE, || {
        let b = store.backlog().unwrap();
        b.pending == 0 && b.dead == 1
    }));
    handle.shutdown().unwrap();
    let mut sent = sent.lock().unwrap().clone();
    sent.sort();
    assert_eq!(sent, ["flaky", "ok"]);
    let rows = |sql: &str| -> i64 { common::count(&pool, sql) };
    assert_eq!(
        rows("SELECT count(*) FROM \"Custom_Schema\".\"Events\" WHERE state = 'dead' AND key = 'doomed' AND attempts = 2"),
        1
    );

    // Requeue and purge reach the same table.
    let dead = store.dead_messages(10, None).unwrap();
    assert_eq!(dead.len(), 1);
    let doomed = dead[0].message.id();
    assert_eq!(store.requeue_dead(&[doomed]).unwrap(), 1);
    assert_eq!(
        rows("SELECT count(*) FROM \"Custom_Schema\".\"Events\" WHERE state = 'pending' AND attempts = 0"),
        1
    );
    conn.execute(
        "UPDATE \"Custom_Schema\".\"Events\" SET state = 'dead' WHERE id = $1",
        &[&doomed],
    )
    .unwrap();
    assert_eq!(store.purge_dead(&[doomed]).unwrap(), 1);
    assert_eq!(rows("SELECT count(*) FROM \"Custom_Schema\".\"Events\""), 0);

    // The catalog holds exactly these names: no lower-case twin of the schema, and every
    // object of the schema named after "Events", none after "events".
    let schemas: Vec<String> = conn
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE lower(nspname) = 'custom_schema'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(schemas, [SCHEMA]);
    let objects: Vec<String> = conn
        .query(
            "SELECT relname::text FROM pg_class
             WHERE relnamespace = '\"Custom_Schema\"'::regnamespace ORDER BY relname",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        objects.iter().any(|o| o == "Events")
            && objects.iter().any(|o| o == "Events_claims")
            && objects.iter().any(|o| o == "Events_charges"),
        "{objects:?}"
    );
    assert!(
        !objects.iter().any(|o| o.contains("events")),
        "lower-case twin in {objects:?}"
    );
    let elsewhere = rows(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relname::text LIKE 'events%' AND n.nspname::text <> 'Custom_Schema'
           AND lower(n.nspname) = 'custom_schema'",
    );
    assert_eq!(elsewhere, 0);
}

#[test]
fn invalid_options_are_errors_not_panics() {
    let pool = pool(1);
    let store = PgStore::new(pool);
    let cases: Vec<(&str, troutbox::OutboxBuilder)> = vec![
        ("batch_size", Outbox::builder(store.clone()).batch_size(0)),
        (
            "batch_size",
            Outbox::builder(store.clone()).batch_size(10_001),
        ),
        (
            "max_retries",
            Outbox::builder(store.clone()).max_retries(10_001),
        ),
        (
            "backoff",
            Outbox::builder(store.clone())
                .backoff(Backoff::exponential(Duration::ZERO, Duration::from_secs(1))),
        ),
        (
            "backoff",
            Outbox::builder(store.clone()).backoff(Backoff::exponential(
                Duration::from_secs(2),
                Duration::from_secs(1),
            )),
        ),
        (
            "poll_interval",
            Outbox::builder(store.clone()).poll_interval(Duration::ZERO),
        ),
        (
            "send_timeout",
            Outbox::builder(store.clone()).send_timeout(Duration::from_millis(1)),
        ),
        (
            "send_timeout",
            Outbox::builder(store.clone()).send_timeout(Duration::from_secs(u64::MAX / 4)),
        ),
        ("workers", Outbox::builder(store.clone()).workers(0)),
        ("workers", Outbox::builder(store.clone()).workers(65)),
        (
            "shutdown_timeout",
            Outbox::builder(store.clone()).shutdown_timeout(Duration::ZERO),
        ),
        (
            "max_value_size",
            Outbox::builder(store.clone()).max_value_size(0),
        ),
    ];
    for (option, builder) in cases {
        match builder.build() {
            Err(Error::InvalidConfig {
                option: got,
                reason,
            }) => {
                assert_eq!(got, option);
                assert!(!reason.is_empty());
            }
            other => panic!("{option}: expected InvalidConfig, got {other:?}"),
        }
    }
    assert!(Outbox::builder(store).build().is_ok());
}

#[test]
fn an_unreachable_database_is_a_typed_error_not_a_hang() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!("host=127.0.0.1 port={port} user=nobody dbname=nobody connect_timeout=1")
        .parse()
        .unwrap();
    let pool = r2d2::Pool::builder()
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(PostgresConnectionManager::new(config, postgres::NoTls));
    let store = PgStore::new(pool);
    // The outcome is asserted; the time only as a hang guard (a bound in seconds would fail
    // on a loaded machine, and the pool's own timeout is r2d2's, not ours to test).
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let started = Instant::now();
        let migrate = store.migrate();
        let outbox = Outbox::builder(store).build().unwrap();
        let start = outbox
            .start(|_: &mut troutbox::Batch| -> Result<(), String> { Ok(()) })
            .map(|_| ());
        let _ = done_tx.send((migrate, start, started.elapsed()));
    });
    let (migrate, start, took) = done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("migrate and start hung on an unreachable database");
    println!(
        "FIGURES unreachable_database: migrate_and_start_ms={}",
        took.as_millis()
    );
    let err = migrate.unwrap_err();
    assert!(matches!(err, Error::Pool { .. }), "{err}");
    assert!(err.is_connection_error());
    let err = start.unwrap_err();
    assert!(matches!(err, Error::Pool { .. }), "{err}");
}
