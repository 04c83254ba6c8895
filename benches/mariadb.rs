//! troutbox on MariaDB next to raw MariaDB statements doing the same work, on one server,
//! in one run: `cargo bench --bench mariadb --features mariadb`.
//!
//! Prints one JSON line per scenario on stdout,
//! `{"scenario": "...", "value": N, "unit": "...", "reference": N, "ratio": N}`, with the
//! raw statements' figure of the same run as `reference`. Each side runs several rounds,
//! alternated, and the best counts. BENCHMARKS.md ("MariaDB") has a run's figures.
//!
//! - Drain: a backlog of 200-byte messages relayed to a Sender that does nothing, by the
//!   library (defaults but the batch size, one worker), against the raw claim from one
//!   client: `START TRANSACTION; SELECT ... ORDER BY ... LIMIT n FOR UPDATE SKIP LOCKED`, then
//!   `DELETE ... WHERE id IN (...); COMMIT`, two round trips per batch; and the same raw loop
//!   resuming each claim after the previous full batch (`_vs_resuming`), as the library
//!   does while a backlog drains.
//! - Producer: one-message transactions (`add_message` then COMMIT) against a prepared
//!   INSERT then COMMIT, and 100 messages per transaction (`add_messages`) against one
//!   multi-row INSERT, from one client.
//!
//! Environment: `MARIADB_URL` for a server of your own (the bench creates and drops its
//! tables `bench_lib*` and `bench_ref` there), otherwise a throw-away server with the
//! durable defaults (`innodb_flush_log_at_trx_commit=1`). `TROUTBOX_BENCH_SCALE` multiplies
//! the message counts (default 1; 0.1 while developing).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use troutbox::mariadb::mysql::prelude::Queryable;
use troutbox::mariadb::mysql::{TxOpts, Value};
use troutbox::mariadb::{pool, MariaDbOutbox, MariaDbPool, MariaDbStore};
use troutbox::testing::TempMariaDb;
use troutbox::{Batch, NewMessage};

const VALUE_LEN: usize = 200;
const ROUNDS: usize = 3;

fn emit(scenario: &str, value: f64, unit: &str, reference: f64) {
    println!(
        "{{\"scenario\": \"{scenario}\", \"value\": {value:.0}, \"unit\": \"{unit}\", \"reference\": {reference:.0}, \"ratio\": {:.3}}}",
        value / reference
    );
}

struct Bench {
    pool: MariaDbPool,
    scale: f64,
}

impl Bench {
    fn exec(&self, sql: &str) {
        self.pool.get().unwrap().query_drop(sql).unwrap();
    }

    /// Like [`exec`](Self::exec), for cleanup of what may not exist yet.
    fn try_exec(&self, sql: &str) {
        let _ = self.pool.get().unwrap().query_drop(sql);
    }

    fn n(&self, n: u64) -> u64 {
        ((n as f64 * self.scale) as u64).max(1000)
    }

    /// `table` holds `n` pending 200-byte messages (inserted 1,000 per statement).
    fn fill(&self, table: &str, n: u64) {
        let mut conn = self.pool.get().unwrap();
        conn.query_drop(format!("DELETE FROM {table}")).unwrap();
        let value = vec![b'x'; VALUE_LEN];
        let mut left = n;
        while left > 0 {
            let rows = left.min(1000) as usize;
            let marks = vec!["('k', ?, '', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"; rows].join(",");
            let params: Vec<Value> = (0..rows).map(|_| Value::Bytes(value.clone())).collect();
            conn.exec_drop(
                format!("INSERT INTO {table} (`key`, value, headers, created_at, available_at) VALUES {marks}"),
                params,
            )
            .unwrap();
            left -= rows as u64;
        }
    }

    fn library_drain(&self, batch: usize, n: u64) -> f64 {
        self.fill("bench_lib", n);
        let outbox =
            MariaDbOutbox::builder(MariaDbStore::new(self.pool.clone()).table("bench_lib"))
                .batch_size(batch)
                .build()
                .unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let seen = count.clone();
        let started = Instant::now();
        let mut handle = outbox
            .start(move |b: &mut Batch| -> Result<(), std::io::Error> {
                seen.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(())
            })
            .unwrap();
        while count.load(Ordering::Relaxed) < n {
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = started.elapsed();
        handle.shutdown().unwrap();
        n as f64 / took.as_secs_f64()
    }

    /// The raw claim loop. `resume`: each claim starts after the last row of the previous
    /// full batch, as the library's does while a backlog drains, instead of from the head
    /// of the index, where the entries of deleted rows wait for InnoDB's purge and every
    /// claim steps over them again.
    fn raw_drain(&self, batch: usize, n: u64, resume: bool) -> f64 {
        self.fill("bench_ref", n);
        let mut conn = self.pool.get().unwrap();
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .unwrap();
        // The best hand-written claim: prepared, through the pending index (without the
        // hint MariaDB may sort the whole backlog instead), its transaction opened in the
        // round trip of the previous COMMIT.
        let select = "SELECT id, `key`, value, headers, created_at, attempts, available_at
             FROM bench_ref FORCE INDEX (bench_ref_pending_idx)
             WHERE state = 'pending' AND available_at <= UTC_TIMESTAMP(6)";
        let order =
            format!("ORDER BY state, available_at, id LIMIT {batch} FOR UPDATE SKIP LOCKED");
        let head = conn.prep(format!("{select} {order}")).unwrap();
        let after = conn
            .prep(format!(
                "{select} AND (available_at > ? OR (available_at = ? AND id > ?)) {order}"
            ))
            .unwrap();
        type Row = (i64, Vec<u8>, Vec<u8>, Vec<u8>, Value, i64, Value);
        let started = Instant::now();
        let mut done = 0u64;
        let mut mark: Option<(Value, i64)> = None;
        conn.query_drop("START TRANSACTION").unwrap();
        while done < n {
            let rows: Vec<Row> = match &mark {
                Some((at, id)) if resume => conn.exec(&after, (at.clone(), at.clone(), *id)),
                _ => conn.exec(&head, ()),
            }
            .unwrap();
            mark = (rows.len() == batch)
                .then(|| rows.last().map(|r| (r.6.clone(), r.0)))
                .flatten();
            if rows.is_empty() {
                conn.query_drop("COMMIT; START TRANSACTION").unwrap();
                continue;
            }
            let list: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
            conn.query_drop(format!(
                "DELETE FROM bench_ref WHERE id IN ({}); COMMIT; START TRANSACTION",
                list.join(",")
            ))
            .unwrap();
            done += rows.len() as u64;
        }
        conn.query_drop("COMMIT; SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .unwrap();
        n as f64 / started.elapsed().as_secs_f64()
    }

    fn library_produce(&self, outbox: &MariaDbOutbox, per_tx: usize, n: u64) -> f64 {
        let mut conn = self.pool.get().unwrap();
        let value = vec![b'x'; VALUE_LEN];
        let started = Instant::now();
        let mut done = 0u64;
        while done < n {
            let mut tx = conn.start_transaction(TxOpts::default()).unwrap();
            if per_tx == 1 {
                outbox.add_message(&mut tx, "k", &value).unwrap();
            } else {
                outbox
                    .add_messages(&mut tx, (0..per_tx).map(|_| NewMessage::new("k", &value)))
                    .unwrap();
            }
            tx.commit().unwrap();
            done += per_tx as u64;
        }
        n as f64 / started.elapsed().as_secs_f64()
    }

    fn raw_produce(&self, per_tx: usize, n: u64) -> f64 {
        let mut conn = self.pool.get().unwrap();
        let value = vec![b'x'; VALUE_LEN];
        let marks = vec!["(?, ?, '', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"; per_tx].join(",");
        let insert = format!(
            "INSERT INTO bench_ref (`key`, value, headers, created_at, available_at) VALUES {marks}"
        );
        let started = Instant::now();
        let mut done = 0u64;
        while done < n {
            let mut tx = conn.start_transaction(TxOpts::default()).unwrap();
            let params: Vec<Value> = (0..per_tx)
                .flat_map(|_| [Value::from("k"), Value::Bytes(value.clone())])
                .collect();
            tx.exec_drop(&insert, params).unwrap();
            tx.commit().unwrap();
            done += per_tx as u64;
        }
        n as f64 / started.elapsed().as_secs_f64()
    }
}

fn main() {
    let scale: f64 = std::env::var("TROUTBOX_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let (_server, url) = match std::env::var("MARIADB_URL") {
        Ok(url) if !url.is_empty() => (None, url),
        _ => {
            eprintln!("starting a throw-away MariaDB server (durable defaults) ...");
            let server = TempMariaDb::start().expect("a MariaDB server");
            let url = server.url();
            (Some(server), url)
        }
    };
    let bench = Bench {
        pool: pool(&url, 8).unwrap(),
        scale,
    };
    let version: Option<String> = bench
        .pool
        .get()
        .unwrap()
        .query_first("SELECT VERSION()")
        .unwrap();
    eprintln!("server: MariaDB {}", version.unwrap_or_default());
    bench.exec("DROP TABLE IF EXISTS bench_lib, bench_lib_claims, bench_lib_charges, bench_lib_key_locks, bench_ref");
    bench.try_exec("DELETE FROM troutbox_tables WHERE table_name = 'bench_lib'");
    bench.try_exec("DELETE FROM troutbox_migrations WHERE table_name = 'bench_lib'");
    let outbox = MariaDbOutbox::builder(MariaDbStore::new(bench.pool.clone()).table("bench_lib"))
        .build()
        .unwrap();
    outbox.migrate().unwrap();
    // The reference's table: the same columns and indexes, its pending index named for it.
    bench.exec("CREATE TABLE bench_ref LIKE bench_lib");
    bench.exec("ALTER TABLE bench_ref RENAME INDEX bench_lib_pending_idx TO bench_ref_pending_idx");

    for batch in [100usize, 1000] {
        let n = bench.n(100_000);
        eprintln!("drain_b{batch}: {n} messages, best of {ROUNDS}");
        let (mut lib, mut raw, mut resume) = (0f64, 0f64, 0f64);
        for _ in 0..ROUNDS {
            let l = bench.library_drain(batch, n);
            let r = bench.raw_drain(batch, n, false);
            let p = bench.raw_drain(batch, n, true);
            eprintln!(
                "    library {l:>8.0} msg/s   reference {r:>8.0} msg/s   reference resuming {p:>8.0} msg/s"
            );
            lib = lib.max(l);
            raw = raw.max(r);
            resume = resume.max(p);
        }
        emit(&format!("mariadb_drain_b{batch}_w1"), lib, "msg/s", raw);
        emit(
            &format!("mariadb_drain_b{batch}_w1_vs_resuming"),
            lib,
            "msg/s",
            resume,
        );
    }
    for per_tx in [1usize, 100] {
        let n = bench.n(if per_tx == 1 { 5_000 } else { 100_000 });
        eprintln!("produce_{per_tx}_per_tx: {n} messages, best of {ROUNDS}");
        let (mut lib, mut raw) = (0f64, 0f64);
        for _ in 0..ROUNDS {
            bench.exec("DELETE FROM bench_lib");
            bench.exec("DELETE FROM bench_ref");
            let l = bench.library_produce(&outbox, per_tx, n);
            let r = bench.raw_produce(per_tx, n);
            eprintln!("    library {l:>8.0} msg/s   reference {r:>8.0} msg/s");
            lib = lib.max(l);
            raw = raw.max(r);
        }
        emit(
            &format!("mariadb_produce_{per_tx}_per_tx"),
            lib,
            "msg/s",
            raw,
        );
    }
    bench.exec("DROP TABLE IF EXISTS bench_lib, bench_lib_claims, bench_lib_charges, bench_lib_key_locks, bench_ref");
}
