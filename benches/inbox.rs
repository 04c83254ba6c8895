//! What the inbox costs, in one run against one durable PostgreSQL server:
//! `cargo bench --bench inbox`.
//!
//! Prints one JSON line per scenario on stdout,
//! `{"scenario": "...", "value": N, "unit": "...", "reference": N, "ratio": N}`:
//!
//! - `receive_tx_per_s_1_client` / `_4_clients`: transactions per second, each
//!   `Inbox::receive` (7-day window, partitioned) plus a one-row side effect (an INSERT),
//!   committed; reference = the same transaction with a raw `INSERT ... ON CONFLICT DO
//!   NOTHING` into an equivalent plain table (primary key (consumer, message_id)) instead of
//!   `receive`. Both send their statements the same way (`execute` with text, so one prepare
//!   round trip each). Rounds alternate between the two, so that both see the same server.
//!   Goal: ratio >= 0.9.
//! - `prepared_receive_tx_per_s_1_client`: the same on one connection with every statement
//!   prepared once, `Inbox::prepare` against the raw statement prepared the same way.
//! - `bytes_per_message_at_1m`: table plus index bytes per message with 1,000,000 messages
//!   received (two entries each), reference = the raw table holding the same 1,000,000.
//! - `maintenance_drop_ms_at_1m`: one maintenance run dropping the partitions that hold those
//!   1,000,000 messages, reference = deleting the same number of rows from the raw table by
//!   a `DELETE` (what row-by-row retention would cost, before vacuum).
//!
//! `DATABASE_URL` uses a server of your own (the schema `bench_inbox` is dropped and
//! created); otherwise a throw-away one starts with `fsync=on`. `TROUTBOX_BENCH_SCALE`
//! multiplies the counts (default 1; 0.05 for a quick check).

use std::sync::Arc;
use std::time::{Duration, Instant};

use r2d2_postgres::PostgresConnectionManager;
use time::OffsetDateTime;
use troutbox::testing::TempPostgres;
use troutbox::{Inbox, PgPool};

const SCHEMA: &str = "bench_inbox";

fn scale() -> f64 {
    std::env::var("TROUTBOX_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn scaled(n: f64) -> i64 {
    ((n * scale()) as i64).max(100)
}

fn emit(scenario: &str, value: f64, unit: &str, reference: f64) {
    println!(
        "{{\"scenario\": \"{scenario}\", \"value\": {value:.3}, \"unit\": \"{unit}\", \"reference\": {reference:.3}, \"ratio\": {:.3}}}",
        value / reference
    );
}

/// One consumer transaction: the dedup step (`inbox` or the raw statement) and one effect.
fn transaction(pool: &PgPool, inbox: Option<&Inbox>, id: &str, n: i64) {
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    let first = match inbox {
        Some(inbox) => inbox.receive(&mut tx, "bench", id).unwrap().is_first(),
        None => {
            tx.execute(
                &format!(
                    "INSERT INTO {SCHEMA}.raw_inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
                ),
                &[&"bench", &id],
            )
            .unwrap()
                == 1
        }
    };
    assert!(first);
    tx.execute(
        &format!("INSERT INTO {SCHEMA}.effects (n, side) VALUES ($1, $2)"),
        &[&n, &inbox.is_some()],
    )
    .unwrap();
    tx.commit().unwrap();
}

/// Transactions per second over `rounds` alternating rounds of `per_round` transactions
/// per client: (inbox, raw).
fn throughput(
    pool: &PgPool,
    inbox: &Inbox,
    clients: usize,
    rounds: usize,
    per_round: i64,
) -> (f64, f64) {
    let mut elapsed = [Duration::ZERO; 2];
    let mut next = 0i64;
    for round in 0..rounds * 2 {
        let side = round % 2; // 0: inbox, 1: raw
        let start = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let (pool, inbox) = (pool.clone(), inbox.clone());
                let base = next + c as i64 * per_round;
                std::thread::spawn(move || {
                    for i in base..base + per_round {
                        let id = format!("0d9c7e2a-5f7b-4c1e-9a51-3b8f0e6d2c41:{clients}:{i}");
                        transaction(&pool, (side == 0).then_some(&inbox), &id, i);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        elapsed[side] += start.elapsed();
        next += clients as i64 * per_round;
    }
    let total = (rounds as i64 * clients as i64 * per_round) as f64;
    (
        total / elapsed[0].as_secs_f64(),
        total / elapsed[1].as_secs_f64(),
    )
}

/// [`throughput`] with each client on one connection and its statements prepared on it:
/// `Inbox::prepare` against the raw statement prepared the same way.
fn throughput_prepared(pool: &PgPool, inbox: &Inbox, rounds: usize, per_round: i64) -> (f64, f64) {
    let mut elapsed = [Duration::ZERO; 2];
    let mut conn = pool.get().unwrap();
    let prepared = inbox.prepare(&mut *conn).unwrap();
    let raw = conn
        .prepare(&format!(
            "INSERT INTO {SCHEMA}.raw_inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        ))
        .unwrap();
    let effect = conn
        .prepare(&format!(
            "INSERT INTO {SCHEMA}.effects (n, side) VALUES ($1, $2)"
        ))
        .unwrap();
    let mut next = 0i64;
    for round in 0..rounds * 2 {
        let side = round % 2; // 0: inbox, 1: raw
        let start = Instant::now();
        for i in next..next + per_round {
            let id = format!("0d9c7e2a-5f7b-4c1e-9a51-3b8f0e6d2c41:prepared:{i}");
            let mut tx = conn.transaction().unwrap();
            let first = if side == 0 {
                prepared.receive(&mut tx, "bench", &id).unwrap().is_first()
            } else {
                tx.execute(&raw, &[&"bench", &id]).unwrap() == 1
            };
            assert!(first);
            tx.execute(&effect, &[&i, &(side == 0)]).unwrap();
            tx.commit().unwrap();
        }
        elapsed[side] += start.elapsed();
        next += per_round;
    }
    let total = (rounds as i64 * per_round) as f64;
    (
        total / elapsed[0].as_secs_f64(),
        total / elapsed[1].as_secs_f64(),
    )
}

fn bytes(pool: &PgPool, sql: &str) -> i64 {
    pool.get().unwrap().query_one(sql, &[]).unwrap().get(0)
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
    let pool: PgPool = r2d2::Pool::builder()
        .max_size(8)
        .build(PostgresConnectionManager::new(
            url.parse().unwrap(),
            postgres::NoTls,
        ))
        .unwrap();
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA};
             CREATE TABLE {SCHEMA}.raw_inbox (consumer text NOT NULL, message_id text NOT NULL,
                 received_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                 PRIMARY KEY (consumer, message_id));
             CREATE TABLE {SCHEMA}.effects (n int8 NOT NULL, side boolean NOT NULL)"
        ))
        .unwrap();
    let inbox = Inbox::builder(pool.clone()).schema(SCHEMA).build().unwrap();
    inbox.migrate().unwrap();

    let per_round = scaled(1_000.0);
    let (inboxed, raw) = throughput(&pool, &inbox, 1, 4, per_round);
    emit("receive_tx_per_s_1_client", inboxed, "tx/s", raw);
    let (inboxed, raw) = throughput(&pool, &inbox, 4, 4, per_round / 4);
    emit("receive_tx_per_s_4_clients", inboxed, "tx/s", raw);
    let (inboxed, raw) = throughput_prepared(&pool, &inbox, 4, per_round);
    emit("prepared_receive_tx_per_s_1_client", inboxed, "tx/s", raw);

    // 1,000,000 messages received in one slot (3,600 s window), written in SQL as receive
    // writes them (two entries each), on a clock that maintenance then moves past them.
    let window = 3_600i64;
    let start = OffsetDateTime::now_utc().unix_timestamp() / window * window;
    let clock = Arc::new(std::sync::Mutex::new(start));
    let c = clock.clone();
    let windowed = Inbox::builder(pool.clone())
        .schema(SCHEMA)
        .table("inbox_1m")
        .window(Duration::from_secs(window as u64))
        .clock(move || OffsetDateTime::from_unix_timestamp(*c.lock().unwrap()).unwrap())
        .build()
        .unwrap();
    windowed.migrate().unwrap();
    let n = scaled(1_000_000.0);
    let mut conn = pool.get().unwrap();
    conn.execute(
        &format!(
            "INSERT INTO {SCHEMA}.inbox_1m (consumer, message_id, slot, window_secs)
             SELECT 'bench', '0d9c7e2a-5f7b-4c1e-9a51-3b8f0e6d2c41:' || g, to_timestamp($2::int8) - k * interval '{window} seconds', {window}
             FROM generate_series(1, $1::int8) g, (VALUES (0), (1)) AS s(k)"
        ),
        &[&n, &start],
    )
    .unwrap();
    conn.execute(
        &format!(
            "INSERT INTO {SCHEMA}.raw_inbox (consumer, message_id)
             SELECT 'bulk', '0d9c7e2a-5f7b-4c1e-9a51-3b8f0e6d2c41:' || g FROM generate_series(1, $1::int8) g"
        ),
        &[&n],
    )
    .unwrap();
    conn.batch_execute(&format!("VACUUM ANALYZE {SCHEMA}.raw_inbox"))
        .unwrap();
    let partitions: i64 = bytes(
        &pool,
        &format!(
            "SELECT sum(pg_total_relation_size(i.inhrelid))::int8 FROM pg_inherits i
             WHERE i.inhparent = '{SCHEMA}.inbox_1m'::regclass"
        ),
    );
    // The raw table also holds the throughput scenario's rows: count its bulk share.
    let raw_rows: i64 = bytes(&pool, &format!("SELECT count(*) FROM {SCHEMA}.raw_inbox"));
    let raw_bytes = bytes(
        &pool,
        &format!("SELECT pg_total_relation_size('{SCHEMA}.raw_inbox')::int8"),
    ) as f64
        * n as f64
        / raw_rows as f64;
    emit(
        "bytes_per_message_at_1m",
        partitions as f64 / n as f64,
        "bytes",
        raw_bytes / n as f64,
    );

    *clock.lock().unwrap() = start + 2 * window + 60 + window;
    let started = Instant::now();
    let report = windowed.run_maintenance_once().unwrap();
    let dropping = started.elapsed();
    assert!(report.dropped.len() >= 2, "{report:?}");
    let started = Instant::now();
    let deleted = conn
        .execute(
            &format!("DELETE FROM {SCHEMA}.raw_inbox WHERE consumer = 'bulk'"),
            &[],
        )
        .unwrap();
    let deleting = started.elapsed();
    assert_eq!(deleted as i64, n);
    emit(
        "maintenance_drop_ms_at_1m",
        dropping.as_secs_f64() * 1e3,
        "ms",
        deleting.as_secs_f64() * 1e3,
    );
    eprintln!("maintenance report: {report:?}");
}
