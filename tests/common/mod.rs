//! Shared scaffolding for the integration tests: one real PostgreSQL server per test binary
//! (`DATABASE_URL`, or a throw-away one), one schema per test so tests run in parallel.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use r2d2_postgres::PostgresConnectionManager;
use troutbox::{Batch, PgPool, PgStore};

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

/// A migrated store in a fresh schema named after the test.
pub fn store(schema: &str, pool: &PgPool) -> PgStore {
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .unwrap();
    let store = PgStore::new(pool.clone()).schema(schema);
    store.migrate().unwrap();
    store
}

/// Runs a query returning one bigint.
pub fn count(pool: &PgPool, sql: &str) -> i64 {
    pool.get().unwrap().query_one(sql, &[]).unwrap().get(0)
}

/// What a recording Sender has seen: delivery count per message id, and the values.
#[derive(Default)]
pub struct Deliveries {
    state: Mutex<HashMap<i64, (usize, Vec<u8>)>>,
    changed: Condvar,
}

impl Deliveries {
    pub fn new() -> Arc<Deliveries> {
        Arc::new(Deliveries::default())
    }

    pub fn record(&self, batch: &Batch) {
        let mut state = self.state.lock().unwrap();
        for m in batch.iter() {
            let entry = state.entry(m.id()).or_insert((0, m.value().to_vec()));
            entry.0 += 1;
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

    pub fn distinct(&self) -> usize {
        self.state.lock().unwrap().len()
    }

    pub fn duplicates(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .values()
            .map(|(n, _)| n - 1)
            .sum()
    }

    pub fn count_of(&self, id: i64) -> usize {
        self.state.lock().unwrap().get(&id).map_or(0, |(n, _)| *n)
    }

    pub fn values(&self) -> Vec<Vec<u8>> {
        self.state
            .lock()
            .unwrap()
            .values()
            .map(|(_, v)| v.clone())
            .collect()
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
/// (`pg_notify`) have run, committed or not.
pub fn signals_sent(pool: &PgPool) -> i64 {
    count(
        pool,
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements
         WHERE query LIKE '%pg_notify(%' AND query NOT LIKE '%pg_stat_statements%'",
    )
}

/// The most signals an outbox may send over `elapsed` of producing: one per coalescing
/// window of 5 ms (`NOTIFY_COALESCE`), and one more for the window it started in.
pub fn signals_allowed(elapsed: Duration) -> i64 {
    1 + (elapsed.as_micros() / 5_000) as i64
}
