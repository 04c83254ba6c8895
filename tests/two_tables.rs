//! Two outbox tables in one schema, against a real server: migrated at the same time, and
//! then every operation on one (relay, dead letters, requeue, purge, backlog, the
//! maintenance lock) touches only its own table. Both tables draw ids from their own
//! identity, so the same ids exist in both: an operation reaching the wrong table would
//! find rows there.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::{count, eventually, partitions, pool, Deliveries, PATIENCE};
use troutbox::{Backlog, Outbox, PgPool, PgStore, Retention};

const SCHEMA: &str = "two_tables";

/// The stores of one schema, built from one store whose SQL was already prepared: naming
/// the table afterwards must still give each its own table.
fn stores(pool: &PgPool) -> (PgStore, PgStore, PgStore, PgStore) {
    let base = PgStore::new(pool.clone()).schema(SCHEMA);
    base.validate().unwrap();
    let keep = || Retention::keep_sent(Duration::from_secs(7 * 86_400)).partitions_ahead(2);
    (
        base.clone().table("alpha"),
        base.clone().table("beta"),
        base.clone().table("gamma").retention(keep()),
        base.table("delta").retention(keep()),
    )
}

/// (state, count) of each state present in `table`, read with SQL.
fn states(pool: &PgPool, table: &str) -> BTreeMap<String, i64> {
    pool.get()
        .unwrap()
        .query(
            &format!("SELECT state, count(*) FROM {SCHEMA}.{table} GROUP BY state"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Ids of the rows of `table` in `state`, in order.
fn ids(pool: &PgPool, table: &str, state: &str) -> Vec<i64> {
    pool.get()
        .unwrap()
        .query(
            &format!("SELECT id FROM {SCHEMA}.{table} WHERE state = $1 ORDER BY id"),
            &[&state],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn map(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(s, n)| (s.to_string(), *n)).collect()
}

/// A relay of `store` that fails keys starting with "bad" (no retry) and records every
/// delivery.
fn relay(store: &PgStore) -> (Outbox, troutbox::Handle, Arc<Deliveries>) {
    let outbox = common::fast_outbox(store).max_retries(0).build().unwrap();
    let deliveries = Deliveries::new();
    let failing = deliveries.sender_failing("no route", |m| m.key().starts_with("bad"));
    let handle = outbox.start(failing).unwrap();
    (outbox, handle, deliveries)
}

fn add(store: &PgStore, pool: &PgPool, keys: &[&str]) {
    let outbox = Outbox::builder(store.clone()).build().unwrap();
    let mut conn = pool.get().unwrap();
    for key in keys {
        outbox.add_message(&mut *conn, key, b"v").unwrap();
    }
}

fn pending_dead(b: &Backlog) -> (i64, i64) {
    (b.pending, b.dead)
}

#[test]
fn two_tables_in_one_schema_touch_only_their_own_rows() {
    let pool = pool(16);
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .unwrap();
    let (alpha, beta, gamma, delta) = stores(&pool);

    // Four tables, two of them keep-sent, migrated at the same moment from four threads.
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = [&alpha, &beta, &gamma, &delta]
        .into_iter()
        .map(|store| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                store.migrate()
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let mut conn = pool.get().unwrap();
    let versions: Vec<(String, i32, i64)> = conn
        .query(
            &format!(
                "SELECT table_name, max(version), count(*) FROM {SCHEMA}.troutbox_migrations \
                 GROUP BY table_name ORDER BY table_name"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let each = |t: &str| (t.to_string(), 5, 5);
    assert_eq!(
        versions,
        vec![each("alpha"), each("beta"), each("delta"), each("gamma")],
        "each table's versions 1 to 5, each applied once"
    );
    let kinds: Vec<(String, String)> = conn
        .query(
            "SELECT c.relname::text, c.relkind::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname IN ('alpha', 'beta', 'gamma', 'delta', 'outbox_messages') \
             ORDER BY 1",
            &[&SCHEMA],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let kind = |t: &str, k: &str| (t.to_string(), k.to_string());
    assert_eq!(
        kinds,
        vec![
            kind("alpha", "r"),
            kind("beta", "r"),
            kind("delta", "p"),
            kind("gamma", "p")
        ],
        "no table under the default name"
    );

    // The same ids in both tables: alpha 1-5 (4 and 5 fail), beta 1-4 (4 fails).
    add(&alpha, &pool, &["a-1", "a-2", "a-3", "bad-a4", "bad-a5"]);
    add(&beta, &pool, &["b-1", "b-2", "b-3", "bad-b4"]);
    assert_eq!(ids(&pool, "alpha", "pending"), vec![1, 2, 3, 4, 5]);
    assert_eq!(ids(&pool, "beta", "pending"), vec![1, 2, 3, 4]);
    assert_eq!(pending_dead(&alpha.backlog().unwrap()), (5, 0));
    assert_eq!(pending_dead(&beta.backlog().unwrap()), (4, 0));

    // Alpha's relay alone: it drains alpha, and beta's rows wait untouched.
    let (_alpha_outbox, mut alpha_handle, alpha_seen) = relay(&alpha);
    assert!(eventually(PATIENCE, || states(&pool, "alpha") == map(&[("dead", 2)])));
    alpha_handle.shutdown().unwrap();
    assert_eq!(alpha_seen.keys(), ["a-1", "a-2", "a-3", "bad-a4", "bad-a5"]);
    assert_eq!(states(&pool, "beta"), map(&[("pending", 4)]));
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {SCHEMA}.beta WHERE attempts > 0")
        ),
        0
    );
    // Backlog: each its own.
    assert_eq!(pending_dead(&alpha.backlog().unwrap()), (0, 2));
    assert_eq!(pending_dead(&beta.backlog().unwrap()), (4, 0));

    // Beta's relay: drains beta, leaves alpha's dead rows as they are.
    let (_beta_outbox, mut beta_handle, beta_seen) = relay(&beta);
    assert!(eventually(PATIENCE, || states(&pool, "beta") == map(&[("dead", 1)])));
    beta_handle.shutdown().unwrap();
    assert_eq!(beta_seen.keys(), ["b-1", "b-2", "b-3", "bad-b4"]);
    assert_eq!(ids(&pool, "alpha", "dead"), vec![4, 5]);
    assert_eq!(ids(&pool, "beta", "dead"), vec![4]);
    assert_eq!(pending_dead(&alpha.backlog().unwrap()), (0, 2));
    assert_eq!(pending_dead(&beta.backlog().unwrap()), (0, 1));

    // Dead letters: each lists its own.
    let keys = |store: &PgStore| -> Vec<String> {
        store
            .dead_messages(10, None)
            .unwrap()
            .iter()
            .map(|d| d.message.key().to_string())
            .collect()
    };
    assert_eq!(keys(&alpha), ["bad-a5", "bad-a4"]);
    assert_eq!(keys(&beta), ["bad-b4"]);

    // Requeue with alpha's dead ids, on beta: only beta's id 4 comes back.
    assert_eq!(beta.requeue_dead(&[4, 5]).unwrap(), 1);
    assert_eq!(states(&pool, "beta"), map(&[("pending", 1)]));
    assert_eq!(ids(&pool, "alpha", "dead"), vec![4, 5]);
    assert_eq!(beta.requeue_all_dead().unwrap(), 0, "beta has no dead left");
    assert_eq!(ids(&pool, "alpha", "dead"), vec![4, 5]);
    assert_eq!(alpha.requeue_all_dead().unwrap(), 2);
    assert_eq!(states(&pool, "alpha"), map(&[("pending", 2)]));
    assert_eq!(states(&pool, "beta"), map(&[("pending", 1)]));

    // Purge: both tables have a dead id 4 again; purging it from alpha leaves beta's.
    for table in ["alpha", "beta"] {
        conn.batch_execute(&format!(
            "UPDATE {SCHEMA}.{table} SET state = 'dead', available_at = now() - interval '1 day'"
        ))
        .unwrap();
    }
    assert_eq!(alpha.purge_dead(&[4]).unwrap(), 1);
    assert_eq!(ids(&pool, "alpha", "dead"), vec![5]);
    assert_eq!(ids(&pool, "beta", "dead"), vec![4]);
    let an_hour_ago = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    assert_eq!(beta.purge_dead_before(an_hour_ago).unwrap(), 1);
    assert_eq!(states(&pool, "beta"), map(&[]));
    assert_eq!(ids(&pool, "alpha", "dead"), vec![5]);

    // Maintenance of one table never holds up another's. This test locks gamma's DEFAULT
    // partition, which gamma's maintenance locks to create a partition: the run waits
    // 100 ms, puts the step off and holds nothing meanwhile, while delta's run does its
    // work (their furthest partitions ahead were dropped); gamma's next run does it.
    let furthest = |table: &str| -> String {
        partitions(&pool, SCHEMA, table)
            .into_iter()
            .filter(|p| *p != format!("{table}_default"))
            .max()
            .unwrap()
    };
    let (gamma_ahead, delta_ahead) = (furthest("gamma"), furthest("delta"));
    conn.batch_execute(&format!(
        "DROP TABLE {SCHEMA}.{gamma_ahead}; DROP TABLE {SCHEMA}.{delta_ahead}"
    ))
    .unwrap();
    let mut blocker = pool.get().unwrap();
    let mut blocker_tx = blocker.transaction().unwrap();
    blocker_tx
        .batch_execute(&format!(
            "LOCK TABLE {SCHEMA}.gamma_default IN ACCESS EXCLUSIVE MODE"
        ))
        .unwrap();
    // Gamma's run cannot get its lock in time: it puts the step off, and holds nothing.
    let report = gamma.run_maintenance_once().unwrap();
    assert!(!report.locked_out, "{report:?}");
    assert!(report.created.is_empty(), "{report:?}");
    assert_eq!(
        report.deferred,
        vec!["gamma_default".to_string(), gamma_ahead.clone()],
        "reading DEFAULT and creating the partition ahead both put off"
    );
    // Delta is another table: its maintenance goes on.
    let report = delta.run_maintenance_once().unwrap();
    assert!(!report.locked_out, "{report:?}");
    assert_eq!(report.created, vec![delta_ahead.clone()]);
    blocker_tx.rollback().unwrap();
    let report = gamma.run_maintenance_once().unwrap();
    assert!(!report.locked_out, "{report:?}");
    assert_eq!(report.created, vec![gamma_ahead.clone()]);
    assert!(report.deferred.is_empty(), "{report:?}");

    // The lock is the table's: an instance holding gamma's key locks out gamma only.
    let mut other = pool.get().unwrap();
    let mut other_tx = other.transaction().unwrap();
    let held: bool = other_tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!("troutbox:maintain:\"{SCHEMA}\".\"gamma\"")],
        )
        .unwrap()
        .get(0);
    assert!(held);
    assert!(gamma.run_maintenance_once().unwrap().locked_out);
    assert!(!delta.run_maintenance_once().unwrap().locked_out);
    other_tx.rollback().unwrap();
    assert!(!gamma.run_maintenance_once().unwrap().locked_out);
}

/// What the server said to this process's connections (tokio-postgres logs notices at info
/// level), counted by a logger of this test binary.
fn server_notices() -> Vec<String> {
    static NOTICES: Mutex<Vec<String>> = Mutex::new(Vec::new());
    struct Recorder;
    impl log::Log for Recorder {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            let target = record.target();
            if target.starts_with("postgres") || target.starts_with("tokio_postgres") {
                NOTICES.lock().unwrap().push(record.args().to_string());
            }
        }
        fn flush(&self) {}
    }
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        static RECORDER: Recorder = Recorder;
        log::set_logger(&RECORDER).expect("the only logger of this binary");
        log::set_max_level(log::LevelFilter::Info);
    });
    NOTICES.lock().unwrap().clone()
}

#[test]
fn migrating_a_second_table_and_again_makes_the_server_say_nothing() {
    let pool = pool(2);
    // The recorder sees the server's notices: a control.
    let before = server_notices().len();
    pool.get()
        .unwrap()
        .batch_execute("DROP TABLE IF EXISTS two_tables_quiet_control")
        .unwrap();
    assert!(
        server_notices()[before..]
            .iter()
            .any(|n| n.contains("two_tables_quiet_control")),
        "a notice went unrecorded"
    );
    let before = server_notices();
    // Each kind of table, twice: plain, keeping sent messages in partitions, ordered.
    for _ in 0..2 {
        let store = |table| {
            PgStore::new(pool.clone())
                .schema("two_tables_quiet")
                .table(table)
        };
        store("quiet_plain").migrate().unwrap();
        store("quiet_kept")
            .retention(Retention::keep_sent(Duration::from_secs(3600)))
            .migrate()
            .unwrap();
        Outbox::builder(store("quiet_ordered"))
            .per_key_ordering(true)
            .build()
            .unwrap()
            .migrate()
            .unwrap();
    }
    let notices: Vec<String> = server_notices().into_iter().skip(before.len()).collect();
    // Other tests of this binary run meanwhile (their schemas dropped with CASCADE make
    // notices): only what a migration can say counts, about these tables or the registry
    // of tables every migration updates (it said `column "outbox_id" of relation
    // "troutbox_tables" already exists, skipping` at each migration before).
    let ours: Vec<&String> = notices
        .iter()
        .filter(|n| {
            [
                "two_tables_quiet",
                "quiet_",
                "troutbox_tables",
                "already exists",
            ]
            .iter()
            .any(|word| n.contains(word))
        })
        .collect();
    assert!(
        ours.is_empty(),
        "the server's notices were logged: {ours:?}"
    );
}
