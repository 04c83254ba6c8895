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
//! - `producer_p99_ms_during_maintenance`: p99 latency of a producer's one-message INSERT
//!   (autocommit) while 4 producers commit, 2 relay workers drain, and maintenance creates
//!   and drops partitions every 200 ms (1-minute partitions and window on a clock 20x fast);
//!   reference = the same load with no maintenance running. p50 and max go to stderr.
//!
//! `TROUTBOX_BENCH_ONLY=maintenance` runs the last scenario alone.
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
    if std::env::var("TROUTBOX_BENCH_ONLY").as_deref() == Ok("maintenance") {
        producer_latency_during_maintenance(&url);
        return;
    }
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
    producer_latency_during_maintenance(&url);
}

/// Producer INSERT latencies (ms, sorted) over `load`, with 4 producers and 2 relay workers,
/// maintenance churning partitions every 200 ms when `maintain`.
fn producer_latencies(url: &str, schema: &str, maintain: bool, load: Duration) -> Vec<f64> {
    let pool = r2d2::Pool::builder()
        .max_size(12)
        .build(PostgresConnectionManager::new(
            url.parse().unwrap(),
            postgres::NoTls,
        ))
        .unwrap();
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
    let (start, started) = (OffsetDateTime::now_utc(), Instant::now());
    let store = PgStore::new(pool.clone())
        .schema(schema)
        .retention(
            Retention::keep_sent(Duration::from_secs(60))
                .partition_interval(Duration::from_secs(60))
                .partitions_ahead(1),
        )
        .maintenance_clock(move || start + started.elapsed() * 20);
    store.migrate().unwrap();
    let outbox = Outbox::builder(store.clone())
        .workers(2)
        .batch_size(50)
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let mut relay = outbox
        .start(|_: &mut Batch| Ok::<(), Infallible>(()))
        .unwrap();
    let deadline = Instant::now() + load;
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (outbox, pool) = (outbox.clone(), pool.clone());
            std::thread::spawn(move || {
                let mut conn = pool.get().unwrap();
                let mut times = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let t = Instant::now();
                    outbox
                        .add_message(
                            &mut *conn,
                            &format!("k{}", n % 8),
                            format!("p{p}-{n}").as_bytes(),
                        )
                        .unwrap();
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                    std::thread::sleep(Duration::from_millis(2));
                }
                times
            })
        })
        .collect();
    let (mut runs, mut deferred) = (0, 0);
    while maintain && Instant::now() < deadline {
        let report = store.run_maintenance_once().unwrap();
        runs += 1;
        deferred += report.deferred.len();
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut times: Vec<f64> = producers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    relay.shutdown().unwrap();
    times.sort_by(f64::total_cmp);
    if maintain {
        eprintln!("maintenance: {runs} runs, {deferred} steps deferred");
    }
    times
}

fn producer_latency_during_maintenance(url: &str) {
    let load = Duration::from_secs_f64((20.0 * scale()).max(5.0));
    let pct = |t: &[f64], q: f64| t[((t.len() - 1) as f64 * q) as usize];
    let quiet = producer_latencies(url, "bench_retention_quiet", false, load);
    let busy = producer_latencies(url, "bench_retention_churn", true, load);
    for (name, t) in [
        ("no maintenance", &quiet),
        ("maintenance every 200 ms", &busy),
    ] {
        eprintln!(
            "{name}: {} INSERTs, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            t.len(),
            pct(t, 0.5),
            pct(t, 0.99),
            t[t.len() - 1]
        );
    }
    emit(
        "producer_p99_ms_during_maintenance",
        pct(&busy, 0.99),
        "ms",
        pct(&quiet, 0.99),
    );
}
