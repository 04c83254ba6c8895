//! Shared scaffolding for the integration tests: one real PostgreSQL server per test binary
//! (`DATABASE_URL`, or a throw-away one), one schema per test so tests run in parallel.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use r2d2_postgres::PostgresConnectionManager;
use troutbox::{Backoff, Batch, Message, Outbox, OutboxBuilder, PgPool, PgStore, Retention};

/// The `troutbox` command line (built with the `cli` feature only).
#[cfg(feature = "cli")]
pub mod cli;

/// How long a test waits for something that should happen within milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn url() -> String {
    troutbox::testing::database_url().unwrap_or_else(|e| panic!("{e}"))
}

pub fn pool(max_size: u32) -> PgPool {
    let config = url().parse().expect("valid DATABASE_URL");
    r2d2::Pool::builder()
        .max_size(max_size)
        .connection_timeout(Duration::from_secs(10))
        .build(PostgresConnectionManager::new(config, postgres::NoTls))
        .expect("pool")
}

/// A pool whose connections carry `application_name`, so that the server's views
/// (`pg_stat_activity`, `pg_locks`) tell them apart.
pub fn named_pool(max_size: u32, application_name: &str) -> PgPool {
    let mut config: postgres::Config = url().parse().expect("valid DATABASE_URL");
    config.application_name(application_name);
    r2d2::Pool::builder()
        .max_size(max_size)
        .connection_timeout(Duration::from_secs(10))
        .build(PostgresConnectionManager::new(config, postgres::NoTls))
        .expect("pool")
}

/// Retries after 10 ms, then 20 ms, without jitter: a relay whose retries a test waits for.
pub fn fast_backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(10), Duration::from_millis(20)).without_jitter()
}

/// An outbox on `store` for a relay a test waits on: [`fast_backoff`] and a poll every 5 ms.
/// The test adds its own options (`max_retries`, `workers`, ...).
pub fn fast_outbox(store: &PgStore) -> OutboxBuilder {
    Outbox::builder(store.clone())
        .backoff(fast_backoff())
        .poll_interval(Duration::from_millis(5))
}

/// A migrated store in a fresh schema named after the test.
pub fn store(schema: &str, pool: &PgPool) -> PgStore {
    fresh(PgStore::new(pool.clone()).schema(schema), schema, pool)
}

/// A migrated store with `retention` (`Retention::keep_sent`: a partitioned table) in a
/// fresh schema named after the test.
pub fn keep_sent_store(schema: &str, pool: &PgPool, retention: Retention) -> PgStore {
    fresh(
        PgStore::new(pool.clone())
            .schema(schema)
            .retention(retention),
        schema,
        pool,
    )
}

/// `store` migrated, after its schema was dropped.
fn fresh(store: PgStore, schema: &str, pool: &PgPool) -> PgStore {
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .unwrap();
    store.migrate().unwrap();
    store
}

/// Partitions of `schema`.`table` (names as given, quoted), from the catalog, sorted.
pub fn partitions(pool: &PgPool, schema: &str, table: &str) -> Vec<String> {
    let mut names: Vec<String> = pool
        .get()
        .unwrap()
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = to_regclass($1)",
            &[&format!("\"{schema}\".\"{table}\"")],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

/// Creates the login role `role` with `password` unless it exists. Roles are cluster-wide
/// and the tests of a binary run in parallel: the loser of a race to create one is fine.
pub fn login_role(pool: &PgPool, role: &str, password: &str) {
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "DO $$ BEGIN
               CREATE ROLE {role} LOGIN PASSWORD '{password}';
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
             END $$"
        ))
        .unwrap();
}

/// Runs a query returning one bigint.
pub fn count(pool: &PgPool, sql: &str) -> i64 {
    pool.get().unwrap().query_one(sql, &[]).unwrap().get(0)
}

/// What a recording Sender has seen: per message id, how many times it was delivered, its
/// key and its value.
#[derive(Default)]
pub struct Deliveries {
    state: Mutex<HashMap<i64, Seen>>,
    changed: Condvar,
}

impl Deliveries {
    pub fn new() -> Arc<Deliveries> {
        Arc::new(Deliveries::default())
    }

    pub fn record(&self, batch: &Batch) {
        let mut state = self.state.lock().unwrap();
        for m in batch.iter() {
            let entry = state.entry(m.id()).or_insert_with(|| Seen {
                times: 0,
                key: m.key().to_owned(),
                value: m.value().to_vec(),
            });
            entry.times += 1;
        }
        drop(state);
        self.changed.notify_all();
    }

    /// A Sender that records every batch and reports success.
    pub fn sender(
        self: &Arc<Self>,
    ) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static {
        let me = self.clone();
        move |batch: &mut Batch| {
            me.record(batch);
            Ok(())
        }
    }

    /// A Sender that records every batch, marks failed with `error` the messages `fails`
    /// picks (it sees their attempts so far), and reports success for the batch.
    pub fn sender_failing(
        self: &Arc<Self>,
        error: &'static str,
        fails: impl Fn(&Message) -> bool + Clone + Send + 'static,
    ) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static {
        let me = self.clone();
        move |batch: &mut Batch| {
            me.record(batch);
            for m in batch.iter_mut() {
                if fails(m) {
                    m.mark_failed(error);
                }
            }
            Ok(())
        }
    }

    pub fn distinct(&self) -> usize {
        self.state.lock().unwrap().len()
    }

    pub fn duplicates(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .values()
            .map(|s| s.times - 1)
            .sum()
    }

    pub fn count_of(&self, id: i64) -> usize {
        self.state.lock().unwrap().get(&id).map_or(0, |s| s.times)
    }

    pub fn values(&self) -> Vec<Vec<u8>> {
        self.state
            .lock()
            .unwrap()
            .values()
            .map(|s| s.value.clone())
            .collect()
    }

    /// The key of every delivery (a message delivered twice gives its key twice), sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .state
            .lock()
            .unwrap()
            .values()
            .flat_map(|s| std::iter::repeat_n(s.key.clone(), s.times))
            .collect();
        keys.sort();
        keys
    }

    /// Waits until at least `n` distinct messages were delivered; false on timeout.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.len() < n)
            .unwrap();
        state.len() >= n
    }
}

/// One message as a recording Sender saw it.
struct Seen {
    times: usize,
    key: String,
    value: Vec<u8>,
}

/// Polls `check` until it is true or `timeout` passes: for conditions that live in the
/// database, where there is no signal to wait on.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ids of the messages with `key` in `schema`'s outbox table, in id order.
pub fn ids_with_key(pool: &PgPool, schema: &str, key: &str) -> Vec<i64> {
    pool.get()
        .unwrap()
        .query(
            &format!("SELECT id FROM \"{schema}\".outbox_messages WHERE key = $1 ORDER BY id"),
            &[&key],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The notification channel of `schema`'s default outbox table, computed the way the crate
/// documents it.
pub fn channel(pool: &PgPool, schema: &str) -> String {
    pool.get()
        .unwrap()
        .query_one(
            &format!(
                "SELECT 'troutbox_' || to_hex(hashtextextended('\"{schema}\".\"outbox_messages\"', 0))"
            ),
            &[],
        )
        .unwrap()
        .get(0)
}

/// A private server that counts the statements it runs (`pg_stat_statements`), with a pool
/// on it. For tests that must know how many statements carried the notification signal,
/// which no listener can tell: PostgreSQL folds the identical notifications of one
/// transaction into one.
pub fn counting_server(pool_size: u32) -> (troutbox::testing::TempPostgres, PgPool) {
    let server = troutbox::testing::TempPostgres::builder()
        .setting("shared_preload_libraries", "pg_stat_statements")
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = r2d2::Pool::builder()
        .max_size(pool_size)
        .build(PostgresConnectionManager::new(
            server.url().parse().unwrap(),
            postgres::NoTls,
        ))
        .unwrap();
    pool.get()
        .unwrap()
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .unwrap();
    (server, pool)
}

/// On a [`counting_server`]: how many statements carrying the notification signal
/// (`pg_notify`) have run, committed or not. Not the migration that defines the SQL
/// producer function, whose body holds a `pg_notify` call too.
pub fn signals_sent(pool: &PgPool) -> i64 {
    count(
        pool,
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements
         WHERE query LIKE '%pg_notify(%' AND query NOT LIKE '%pg_stat_statements%'
           AND query NOT LIKE '%CREATE OR REPLACE FUNCTION%'",
    )
}

/// The most signals an outbox may send over `elapsed` of producing: one per coalescing
/// window of 5 ms (`NOTIFY_COALESCE`), and one more for the window it started in.
pub fn signals_allowed(elapsed: Duration) -> i64 {
    1 + (elapsed.as_micros() / 5_000) as i64
}
