//! What retention costs, in one run against one durable PostgreSQL server:
//! `cargo bench --bench retention`.
//!
//! Prints one JSON line per scenario on stdout,
//! `{"scenario": "...", "value": N, "unit": "...", "reference": N, "ratio": N}`:
//!
//! - `keep_sent_burn_down`: messages/s a relay drains with `Retention::keep_sent` (claims mark
//!   rows sent), reference = the same relay with `Retention::delete_on_send` (claims delete).
//!   This is the evidence behind the default.
//! - `retained_5m_batch_ms`: mean batch time (claim + no-op send + commit) while draining
//!   pending messages from a keep-sent table that retains 5,000,000 sent messages, reference =
//!   the same on a keep-sent table that retains none. Target: within 1.2x.
//!
//! `DATABASE_URL` uses a server of your own (schemas `bench_retention_*` are dropped and
//! created); otherwise a throw-away one starts with `fsync=on`. `TROUTBOX_BENCH_SCALE`
//! multiplies the message counts (default 1; 0.05 for a quick check).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r2d2_postgres::PostgresConnectionManager;
use time::OffsetDateTime;
use troutbox::testing::TempPostgres;
use troutbox::{Batch, Outbox, PgPool, PgStore, Retention};

const BATCH: usize = 100;

fn scale() -> f64 {
    std::env::var("TROUTBOX_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn scaled(n: f64) -> i64 {
    ((n * scale()) as i64).max(1_000)
}

fn emit(scenario: &str, value: f64, unit: &str, reference: f64) {
    println!(
        "{{\"scenario\": \"{scenario}\", \"value\": {value:.3}, \"unit\": \"{unit}\", \"reference\": {reference:.3}, \"ratio\": {:.3}}}",
        value / reference
    );
}

fn store(pool: &PgPool, schema: &str, retention: Retention) -> PgStore {
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
    // Partitions from six days ago to two days ahead, so back-dated retained rows land in
    // real partitions rather than DEFAULT.
    let six_days_ago = OffsetDateTime::now_utc() - time::Duration::days(6);
    let store = PgStore::new(pool.clone())
        .schema(schema)
        .retention(retention)
        .maintenance_clock(move || six_days_ago);
    store.migrate().unwrap();
    store
}

/// Fills the table with `n` pending 200-byte messages in SQL, then vacuums it.
fn fill_pending(pool: &PgPool, schema: &str, n: i64) {
    let mut conn = pool.get().unwrap();
    conn.execute(
        &format!(
            "INSERT INTO {schema}.outbox_messages (key, value)
             SELECT 'k' || g, convert_to(repeat('x', 200), 'UTF8') FROM generate_series(1, $1::int8) g"
        ),
        &[&n],
    )
    .unwrap();
    conn.batch_execute(&format!("VACUUM ANALYZE {schema}.outbox_messages"))
        .unwrap();
}

/// Drains the table with a one-worker relay and a no-op Sender; (messages/s, mean batch ms).
fn drain(store: &PgStore, n: i64) -> (f64, f64) {
    let outbox = Outbox::builder(store.clone())
        .batch_size(BATCH)
        .poll_interval(Duration::from_millis(1))
        .build()
        .unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let s = seen.clone();
    let target = n as u64;
    let started = Instant::now();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), Infallible> {
            if s.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64 >= target {
                let _ = done_tx.try_send(());
            }
            Ok(())
        })
        .unwrap();
    done_rx.recv_timeout(Duration::from_secs(600)).unwrap();
    let elapsed = started.elapsed();
    handle.shutdown().unwrap();
    let stats = handle.stats();
    let mean_ms = stats
        .batch_duration
        .mean()
        .unwrap_or_default()
        .as_secs_f64()
        * 1e3;
    (n as f64 / elapsed.as_secs_f64(), mean_ms)
}

fn main() {
    let _server;
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            _server = TempPostgres::builder()
                .setting("fsync", "on")
                .setting("max_wal_size", "4GB")
                .start()
                .unwrap();
            _server.url()
        }
    };
    let pool = r2d2::Pool::builder()
        .max_size(4)
        .build(PostgresConnectionManager::new(
            url.parse().unwrap(),
            postgres::NoTls,
        ))
        .unwrap();
    let keep = Retention::keep_sent(Duration::from_secs(7 * 86_400)).partitions_ahead(8);

    // Delete vs keep, same backlog, same relay.
    let n = scaled(100_000.0);
    let delete_store = store(&pool, "bench_retention_delete", Retention::delete_on_send());
    fill_pending(&pool, "bench_retention_delete", n);
    let (delete_rate, _) = drain(&delete_store, n);
    eprintln!("delete_on_send: {delete_rate:.0} msg/s");
    let keep_store = store(&pool, "bench_retention_keep", keep);
    fill_pending(&pool, "bench_retention_keep", n);
    let (keep_rate, empty_batch_ms) = drain(&keep_store, n);
    eprintln!("keep_sent: {keep_rate:.0} msg/s, {empty_batch_ms:.3} ms per batch");
    emit("keep_sent_burn_down", keep_rate, "msg/s", delete_rate);

    // The same drain with millions of sent messages retained in the table.
    let retained = scaled(5_000_000.0);
    let big = store(&pool, "bench_retention_big", keep);
    let started = Instant::now();
    pool.get()
        .unwrap()
        .execute(
            "INSERT INTO bench_retention_big.outbox_messages (key, value, created_at, state, sent_at)
             SELECT 'k' || g, convert_to(repeat('x', 200), 'UTF8'),
                    now() - interval '5 days' * (g::float8 / $1::int8), 'sent', now()
             FROM generate_series(1, $1::int8) g",
            &[&retained],
        )
        .unwrap();
    eprintln!(
        "retained {retained} sent messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    fill_pending(&pool, "bench_retention_big", n);
    let (big_rate, big_batch_ms) = drain(&big, n);
    eprintln!(
        "keep_sent with {retained} retained: {big_rate:.0} msg/s, {big_batch_ms:.3} ms per batch"
    );
    // Fresh empty keep-sent table for the reference, filled and drained the same way.
    let empty = store(&pool, "bench_retention_keep", keep);
    fill_pending(&pool, "bench_retention_keep", n);
    let (_, empty_batch_ms) = drain(&empty, n);
    emit(
        &format!("retained_{}k_batch_ms", retained / 1000),
        big_batch_ms,
        "ms",
        empty_batch_ms,
    );
    for schema in [
        "bench_retention_delete",
        "bench_retention_keep",
        "bench_retention_big",
    ] {
        let _ = pool
            .get()
            .unwrap()
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    }
}
