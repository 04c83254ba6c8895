//! Independence from server settings: a role whose defaults are `SERIALIZABLE`, a 100 ms
//! `statement_timeout`, a 20 ms `lock_timeout` and a 1 s `idle_in_transaction_session_timeout`
//! runs concurrent migrations, the relay (with retries) and partition maintenance exactly as
//! a role with the server's defaults does. Every transaction troutbox opens states what it
//! relies on.

mod common;

use std::time::Duration;

use common::{count, eventually, pool, Deliveries, PATIENCE};
use r2d2_postgres::PostgresConnectionManager;
use troutbox::{Backoff, NewMessage, Outbox, PgPool, PgStore, Retention};

const ROLE: &str = "troutbox_test_strict";
const PASSWORD: &str = "troutbox-test";

/// A pool of connections as a role with hostile defaults (created once per cluster).
fn strict_pool() -> PgPool {
    static ROLE_READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ROLE_READY.get_or_init(|| {
        pool(1)
            .get()
            .unwrap()
            .batch_execute(&format!(
                "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
                 CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}';
               END IF;
             END $$;
             ALTER ROLE {ROLE} SET default_transaction_isolation = 'serializable';
             ALTER ROLE {ROLE} SET statement_timeout = '100ms';
             ALTER ROLE {ROLE} SET lock_timeout = '20ms';
             ALTER ROLE {ROLE} SET idle_in_transaction_session_timeout = '1s';"
            ))
            .unwrap();
    });
    let mut config: postgres::Config = common::url().parse().unwrap();
    config.user(ROLE).password(PASSWORD);
    r2d2::Pool::builder()
        .max_size(12)
        .connection_timeout(Duration::from_secs(10))
        .build(PostgresConnectionManager::new(config, postgres::NoTls))
        .unwrap()
}

/// The role really has the hostile defaults (otherwise the test proves nothing).
fn assert_hostile(pool: &PgPool) {
    let mut conn = pool.get().unwrap();
    let row = conn
        .query_one(
            "SELECT current_setting('default_transaction_isolation'), current_setting('lock_timeout')",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "serializable");
    assert_eq!(row.get::<_, String>(1), "20ms");
}

/// Eight `migrate()` calls at once on a fresh schema, as the strict role.
fn migrate_concurrently(strict: &PgPool, schema: &str, retention: Retention) -> PgStore {
    pool(1)
        .get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = PgStore::new(strict.clone())
                .schema(schema)
                .retention(retention);
            std::thread::spawn(move || store.migrate())
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    PgStore::new(strict.clone())
        .schema(schema)
        .retention(retention)
}

/// Commits 2,000 messages as the strict role and relays them with two workers and a Sender
/// that fails each message once: every message delivered, each retried once, none dead.
fn relay_everything(strict: &PgPool, store: PgStore, schema: &str) {
    let outbox = Outbox::builder(store.clone())
        .workers(2)
        .batch_size(100)
        .backoff(Backoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(10),
        ))
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let mut conn = strict.get().unwrap();
    for chunk in 0..20 {
        let mut tx = conn.transaction().unwrap();
        let values: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("{chunk}-{i}").into_bytes())
            .collect();
        outbox
            .add_messages(&mut tx, values.iter().map(|v| NewMessage::new("k", v)))
            .unwrap();
        tx.commit().unwrap();
    }
    let deliveries = Deliveries::new();
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let e = errors.clone();
    let outbox = common::fast_outbox(&store)
        .workers(2)
        .error_handler(move |err| e.lock().unwrap().push(err.to_string()))
        .build()
        .unwrap();
    let mut handle = outbox
        .start(deliveries.sender_failing("first attempt fails", |m| m.attempts() == 0))
        .unwrap();
    let pending = format!("SELECT count(*) FROM {schema}.outbox_messages WHERE state = 'pending'");
    let admin = pool(2);
    assert!(eventually(PATIENCE, || count(&admin, &pending) == 0));
    handle.shutdown().unwrap();
    let stats = handle.stats();
    let errors = errors.lock().unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(deliveries.distinct(), 2_000);
    assert_eq!((stats.sent, stats.retried, stats.dead), (2_000, 2_000, 0));
}

#[test]
fn a_serializable_role_with_tight_timeouts_migrates_and_relays() {
    let strict = strict_pool();
    assert_hostile(&strict);
    let store = migrate_concurrently(&strict, "settings_delete", Retention::delete_on_send());
    relay_everything(&strict, store, "settings_delete");
}

#[test]
fn a_serializable_role_with_tight_timeouts_keeps_and_maintains_partitions() {
    let strict = strict_pool();
    assert_hostile(&strict);
    let retention = Retention::keep_sent(Duration::from_secs(3600));
    let store = migrate_concurrently(&strict, "settings_keep", retention);
    relay_everything(&strict, store.clone(), "settings_keep");
    let report = store.run_maintenance_once().unwrap();
    assert!(!report.locked_out);
    let sent = count(
        &pool(1),
        "SELECT count(*) FROM settings_keep.outbox_messages WHERE state = 'sent'",
    );
    assert_eq!(sent, 2_000);
}
