//! troutbox next to the hand-written SQL that does the same work, against one durable
//! PostgreSQL server, in one run: `cargo bench --bench throughput`.
//!
//! Prints one JSON line per scenario on stdout,
//! `{"scenario": "...", "value": N, "unit": "...", "reference": N, "ratio": N}`, where
//! `reference` is what the raw-SQL reference (or the stated baseline) achieved in the same run
//! and `ratio` is `value / reference`. Progress and diagnostics go to stderr. BENCHMARKS.md
//! has the figures of a full run and what they mean.
//!
//! Environment:
//! - `DATABASE_URL`: a server of your own; otherwise a throw-away one is started with
//!   `fsync=on` (and the default `synchronous_commit=on`), so commits are durable, as in
//!   production. The bench creates and drops the schemas `bench_lib`, `bench_ref`,
//!   `bench_biz`, `bench_ordered`, `bench_keep_lib` and `bench_keep_ref` on it.
//! - `TROUTBOX_BENCH_SCALE`: multiplies every message count and duration (default 1). Use
//!   0.1 while developing; only a full run gives figures worth quoting.
//! - `TROUTBOX_BENCH_ONLY`: comma-separated groups to run (`rss`, `burn_down`, `pinned`,
//!   `never_analyzed`, `keep_sent`, `producer`, `add_messages`, `latency`, `notify`,
//!   `ordered`, `batch_bytes`); all by default. `pinned` needs `burn_down` for its
//!   clean reference.
//! - `TROUTBOX_BENCH_BURN_DOWN`: burn-down (and keep-sent) configurations to run, as
//!   `batchxworkers` (`100x1,1000x2`); all four by default.
//! - `TROUTBOX_BENCH_LADDER=0`: skips the ladders, the `ladder_*` lines that step raw SQL
//!   towards what the library sends to show where a difference comes from.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use postgres::types::{ToSql, Type};
use r2d2_postgres::PostgresConnectionManager;
use troutbox::testing::TempPostgres;
use troutbox::{Batch, NewMessage, Outbox, PgPool, PgStore, Retention};

/// The library's table lives here ...
const LIB_SCHEMA: &str = "bench_lib";
/// ... and the raw-SQL reference's identical table (same migration) here.
const REF_SCHEMA: &str = "bench_ref";
/// The producers' business table.
const BIZ_SCHEMA: &str = "bench_biz";
/// The ordered outbox's table (`per_key_ordering(true)`), next to the library's unordered one.
const ORD_SCHEMA: &str = "bench_ordered";
/// Keep-sent mode (`Retention::keep_sent`): the library's table ...
const KEEP_LIB_SCHEMA: &str = "bench_keep_lib";
/// ... and the raw reference's identical one.
const KEEP_REF_SCHEMA: &str = "bench_keep_ref";
/// Message values are 200 bytes, as in DESIGN.md section 5.
const VALUE_LEN: usize = 200;
/// Workers (at most 2) + producers (at most 8) + the bench's own connections, with room.
const POOL_SIZE: u32 = 16;
/// Messages per `add_messages` call and per raw multi-row INSERT.
const ROWS_PER_CALL: usize = 100;
/// Runs per side and burn-down configuration; the best counts.
const BURN_DOWN_ROUNDS: usize = 3;
/// Slices per mode in the producer and `add_messages` scenarios; the best counts.
const SLICE_ROUNDS: usize = 4;

/// How a producer transaction adds its outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Produce {
    /// `Outbox::add_message`.
    Library,
    /// The equivalent INSERT as a prepared statement.
    Reference,
    /// The library's own INSERT text, sent unprepared (parse, bind, execute in one round trip)
    /// as the library does, without the library around it.
    Unprepared,
    /// `Outbox::prepare` once per connection, then `PreparedProducer::add_message`.
    Prepared,
}

impl Produce {
    fn name(self) -> &'static str {
        match self {
            Produce::Library => "library",
            Produce::Reference => "reference",
            Produce::Unprepared => "unprepared",
            Produce::Prepared => "prepared",
        }
    }
}

/// How a 100-row insert is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// `Outbox::add_messages`.
    Library,
    /// A prepared multi-row `INSERT ... VALUES ($1, $2), ($3, $4), ...`.
    Values,
    /// A prepared `INSERT ... SELECT * FROM unnest($1, $2)`.
    Unnest,
    /// The library's own statement text, prepared.
    LibrarySqlPrepared,
    /// `Outbox::prepare` once per connection, then `PreparedProducer::add_messages`.
    LibraryPrepared,
}

impl Insert {
    fn name(self) -> &'static str {
        match self {
            Insert::Library => "library",
            Insert::Values => "multi-row VALUES",
            Insert::Unnest => "unnest",
            Insert::LibrarySqlPrepared => "library SQL prepared",
            Insert::LibraryPrepared => "library prepared",
        }
    }
}

/// The ladders (raw SQL stepped towards what the library sends, to attribute a gap) run
/// unless `TROUTBOX_BENCH_LADDER=0`.
fn ladder_enabled() -> bool {
    std::env::var("TROUTBOX_BENCH_LADDER").map_or(true, |v| v != "0")
}

/// The raw claim statements of the burn-down, from the reference to the library's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawShape {
    /// `DELETE ... WHERE id IN (SELECT id ... ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED)
    /// RETURNING ...` with a literal `n`, in autocommit: one round trip per batch.
    Reference,
    /// The same with `LIMIT $1`, as the library prepares it.
    ParamLimit,
    /// The library's claim statement (pending index, due time, `LIMIT $1`), in autocommit.
    PendingIndex,
    /// The library's claim statement and round trips: `BEGIN; SET LOCAL ...`, the claim,
    /// `COMMIT`.
    LibraryRoundTrips,
}

impl RawShape {
    fn name(self) -> &'static str {
        match self {
            RawShape::Reference => "reference",
            RawShape::ParamLimit => "param_limit",
            RawShape::PendingIndex => "pending_index",
            RawShape::LibraryRoundTrips => "round_trips",
        }
    }

    fn param_limit(self) -> bool {
        self != RawShape::Reference
    }

    fn pending_index(self) -> bool {
        matches!(self, RawShape::PendingIndex | RawShape::LibraryRoundTrips)
    }

    fn transaction(self) -> bool {
        self == RawShape::LibraryRoundTrips
    }
}

fn main() {
    let started = Instant::now();
    let scale: f64 = std::env::var("TROUTBOX_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(1.0);
    let only: Option<Vec<String>> = std::env::var("TROUTBOX_BENCH_ONLY")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| s.split(',').map(|g| g.trim().to_owned()).collect());
    let runs = |group: &str| only.as_ref().is_none_or(|o| o.iter().any(|g| g == group));

    // Held until the end of main, where it is stopped and removed.
    let mut temp_server = None;
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            eprintln!("starting a throw-away PostgreSQL server with fsync=on ...");
            let server = TempPostgres::builder()
                .setting("fsync", "on")
                .setting("synchronous_commit", "on")
                .start()
                .unwrap_or_else(|e| panic!("{e}"));
            let url = server.url();
            temp_server = Some(server);
            url
        }
    };
    eprintln!(
        "server ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let bench = Bench::new(&url, scale);
    bench.describe_server();
    eprintln!("scale {scale}");

    if runs("rss") {
        bench.rss();
    }
    // The clean burn-down at batch 100 and 1 worker, (library, reference): the pinned
    // horizon's baseline.
    let mut clean_b100_w1 = None;
    if runs("burn_down") {
        clean_b100_w1 = Some(bench.burn_down());
    }
    if runs("pinned") {
        bench.pinned_horizon(clean_b100_w1);
    }
    if runs("never_analyzed") {
        bench.never_analyzed();
    }
    if runs("keep_sent") {
        bench.keep_sent();
    }
    if runs("producer") {
        bench.producer_overhead();
    }
    if runs("add_messages") {
        bench.add_messages_batch();
    }
    if runs("latency") {
        bench.latency();
    }
    if runs("notify") {
        bench.notify();
    }
    if runs("ordered") {
        bench.ordered();
    }
    if runs("batch_bytes") {
        bench.batch_bytes();
    }
    bench.drop_schemas();
    let measured = started.elapsed();
    drop(bench);
    if let Some(mut server) = temp_server.take() {
        // Stop it here, reaping the process, then drop it to remove its directory. Dropping
        // a running TempPostgres lets its watchdog wait out its 30 s limit on the exited
        // server, which stays a zombie until this process reaps it.
        if let Err(e) = server.stop_server() {
            eprintln!("stopping the server: {e}");
        }
    }
    eprintln!(
        "bench wall time: {:.1} s ({:.1} s until the last scenario, the rest stopping and removing the server)",
        started.elapsed().as_secs_f64(),
        measured.as_secs_f64()
    );
}

/// Prints one result line. `ratio` is `value / reference` whatever the direction of
/// "better"; BENCHMARKS.md says which way each target points.
fn emit(scenario: &str, value: f64, unit: &str, reference: f64) {
    let ratio = if reference != 0.0 {
        value / reference
    } else {
        f64::NAN
    };
    println!(
        "{{\"scenario\": \"{scenario}\", \"value\": {}, \"unit\": \"{unit}\", \"reference\": {}, \"ratio\": {}}}",
        number(value, 2),
        number(reference, 2),
        number(ratio, 3)
    );
}

/// A JSON number: no NaN or infinity (JSON has none), whole numbers for large rates.
fn number(x: f64, decimals: usize) -> String {
    if !x.is_finite() {
        "null".to_owned()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.decimals$}")
    }
}

/// A 200-byte value that differs per message, so nothing downstream can shortcut identical
/// payloads.
fn value_for(i: u64) -> Vec<u8> {
    let mut v = format!("{i:020}").into_bytes();
    v.resize(VALUE_LEN, b'x');
    v
}

struct Bench {
    pool: PgPool,
    lib: PgStore,
    reference: PgStore,
    scale: f64,
    /// CHECKPOINT needs superuser or pg_checkpoint; on a server of your own it may be refused.
    can_checkpoint: AtomicBool,
    config: postgres::Config,
}

impl Bench {
    fn new(url: &str, scale: f64) -> Bench {
        let config: postgres::Config = url.parse().expect("a valid DATABASE_URL");
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .connection_timeout(Duration::from_secs(30))
            .build(PostgresConnectionManager::new(
                config.clone(),
                postgres::NoTls,
            ))
            .expect("a connection pool");
        let bench = Bench {
            config,
            lib: PgStore::new(pool.clone()).schema(LIB_SCHEMA),
            reference: PgStore::new(pool.clone()).schema(REF_SCHEMA),
            pool,
            scale,
            can_checkpoint: AtomicBool::new(true),
        };
        bench.drop_schemas();
        bench.lib.migrate().expect("migrating the library's table");
        bench
            .reference
            .migrate()
            .expect("migrating the reference table");
        let lib = bench.lib.qualified_table();
        let reference = bench.reference.qualified_table();
        // Autovacuum wakes once a minute and would land inside some runs and not others;
        // every run starts from a freshly filled, vacuumed table instead, so library and
        // reference meet the same conditions.
        bench.exec(&format!(
            "ALTER TABLE {lib} SET (autovacuum_enabled = off);
             ALTER TABLE {reference} SET (autovacuum_enabled = off);
             CREATE SCHEMA {BIZ_SCHEMA};
             CREATE TABLE {BIZ_SCHEMA}.orders (
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 customer text NOT NULL,
                 total bigint NOT NULL);"
        ));
        bench
    }

    fn drop_schemas(&self) {
        self.exec(&format!(
            "DROP SCHEMA IF EXISTS {LIB_SCHEMA} CASCADE;
             DROP SCHEMA IF EXISTS {REF_SCHEMA} CASCADE;
             DROP SCHEMA IF EXISTS {BIZ_SCHEMA} CASCADE;
             DROP SCHEMA IF EXISTS {ORD_SCHEMA} CASCADE;
             DROP SCHEMA IF EXISTS {KEEP_LIB_SCHEMA} CASCADE;
             DROP SCHEMA IF EXISTS {KEEP_REF_SCHEMA} CASCADE;"
        ));
    }

    fn exec(&self, sql: &str) {
        self.pool
            .get()
            .expect("a connection")
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn count(&self, table: &str) -> i64 {
        self.pool
            .get()
            .expect("a connection")
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .expect("count")
            .get(0)
    }

    fn scaled(&self, n: u64) -> u64 {
        ((n as f64 * self.scale) as u64).max(1_000)
    }

    fn seconds(&self, s: f64) -> Duration {
        Duration::from_secs_f64((s * self.scale).max(0.5))
    }

    fn describe_server(&self) {
        let mut c = self.pool.get().expect("a connection");
        let version: String = c.query_one("SELECT version()", &[]).unwrap().get(0);
        eprintln!("server: {version}");
        for name in [
            "fsync",
            "synchronous_commit",
            "wal_sync_method",
            "full_page_writes",
            "shared_buffers",
            "max_wal_size",
            "checkpoint_timeout",
        ] {
            let row = c.query_one(&format!("SHOW {name}"), &[]).unwrap();
            let value: String = row.get(0);
            eprintln!("  {name} = {value}");
        }
    }

    /// Empties `table` and fills it with `n` messages in one statement, server-side. With
    /// `settle`, also vacuums (hint bits, visibility map, statistics) and checkpoints, so the
    /// run that follows pays the same full-page writes whichever table it works on.
    fn fill(&self, table: &str, n: u64, settle: bool) {
        let t = Instant::now();
        let mut c = self.pool.get().expect("a connection");
        c.batch_execute(&format!("TRUNCATE {table}")).unwrap();
        c.execute(
            &format!(
                "INSERT INTO {table} (key, value)
                 SELECT 'key-' || (g % 1000), convert_to(rpad(g::text, {VALUE_LEN}, 'x'), 'UTF8')
                 FROM generate_series(1::int8, $1::int8) AS g"
            ),
            &[&i64::try_from(n).unwrap()],
        )
        .expect("filling the table");
        if settle {
            c.batch_execute(&format!("VACUUM (ANALYZE) {table}"))
                .expect("vacuum");
            self.checkpoint(&mut c);
        }
        eprintln!(
            "  filled {table} with {n} messages in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    fn checkpoint(&self, c: &mut postgres::Client) {
        if self.can_checkpoint.load(Ordering::Relaxed) {
            if let Err(e) = c.batch_execute("CHECKPOINT") {
                eprintln!("  CHECKPOINT refused ({e}); runs will be noisier");
                self.can_checkpoint.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Runs a relay on the library's table until the Sender has seen `expected` messages or
    /// `limit` passes. Returns messages seen and the time from `start` until `shutdown`
    /// returned (so the last batch's COMMIT is included).
    fn relay_drain(
        &self,
        batch_size: usize,
        workers: usize,
        expected: u64,
        limit: Duration,
    ) -> (u64, Duration) {
        let outbox = Outbox::builder(self.lib.clone())
            .batch_size(batch_size)
            .workers(workers)
            .build()
            .expect("valid options");
        self.drain_with(outbox, expected, limit)
    }

    /// Runs a relay of `outbox` until the Sender has seen `expected` messages or `limit`
    /// passes (see [`relay_drain`](Self::relay_drain)).
    fn drain_with(&self, outbox: Outbox, expected: u64, limit: Duration) -> (u64, Duration) {
        let seen = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let sender = {
            let seen = seen.clone();
            move |batch: &mut Batch| -> Result<(), Infallible> {
                let n = batch.len() as u64;
                if seen.fetch_add(n, Ordering::Relaxed) + n >= expected {
                    let _ = done_tx.try_send(());
                }
                Ok(())
            }
        };
        let start = Instant::now();
        let mut handle = outbox.start(sender).expect("starting the relay");
        let drained = done_rx.recv_timeout(limit).is_ok();
        handle.shutdown().expect("relay shutdown");
        let elapsed = start.elapsed();
        let seen = seen.load(Ordering::Relaxed);
        if !drained {
            eprintln!(
                "  relay stopped at the {:.0} s limit after {seen} of {expected} messages",
                limit.as_secs_f64()
            );
        }
        (seen, elapsed)
    }

    /// A raw-SQL burn-down of the reference table on `conns` connections, each looping one
    /// prepared claim+delete statement until the table is empty. [`RawShape::Reference`] is
    /// the reference proper; the other shapes take it step by step towards what the library
    /// sends, to attribute the difference.
    fn raw_drain(&self, shape: RawShape, batch_size: usize, conns: usize) -> (u64, Duration) {
        let t = self.reference.qualified_table();
        // The literal LIMIT is what a person writing the statement for one batch size would
        // write, and lets the server reuse one plan; `LIMIT $1` is planned anew each time.
        let limit = if shape.param_limit() {
            "$1".to_owned()
        } else {
            batch_size.to_string()
        };
        let select = if shape.pending_index() {
            format!(
                "SELECT id FROM {t} WHERE state = 'pending' AND available_at <= now()
                 ORDER BY available_at, id LIMIT {limit} FOR UPDATE SKIP LOCKED"
            )
        } else {
            format!("SELECT id FROM {t} ORDER BY id LIMIT {limit} FOR UPDATE SKIP LOCKED")
        };
        let sql = format!(
            "DELETE FROM {t} WHERE id IN ({select})
             RETURNING id, key, value, headers, created_at, attempts"
        );
        self.raw_loop(sql, shape, batch_size, conns)
    }

    /// Runs the raw claim statement `sql` (with `LIMIT $1` when `shape` says so) on `conns`
    /// connections at once until it returns nothing; the rows and the time it took.
    fn raw_loop(
        &self,
        sql: String,
        shape: RawShape,
        batch_size: usize,
        conns: usize,
    ) -> (u64, Duration) {
        let barrier = Arc::new(Barrier::new(conns + 1));
        let threads: Vec<JoinHandle<u64>> = (0..conns)
            .map(|_| {
                let pool = self.pool.clone();
                let barrier = barrier.clone();
                let sql = sql.clone();
                thread::spawn(move || {
                    let mut c = pool.get().expect("a connection");
                    let types: &[Type] = if shape.param_limit() {
                        &[Type::INT8]
                    } else {
                        &[]
                    };
                    let claim = c.prepare_typed(&sql, types).expect("prepare");
                    let n = batch_size as i64;
                    let params: &[&(dyn ToSql + Sync)] =
                        if shape.param_limit() { &[&n] } else { &[] };
                    barrier.wait();
                    let mut total = 0u64;
                    loop {
                        if shape.transaction() {
                            c.batch_execute(
                                "BEGIN; SET LOCAL idle_in_transaction_session_timeout = 30000",
                            )
                            .expect("begin");
                        }
                        let rows = c.query(&claim, params).expect("claim");
                        if shape.transaction() {
                            c.batch_execute("COMMIT").expect("commit");
                        }
                        if rows.is_empty() {
                            return total;
                        }
                        // Read what a Sender would need to know, as the relay does.
                        for row in &rows {
                            let _id: i64 = row.get(0);
                        }
                        total += rows.len() as u64;
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let total = threads.into_iter().map(|t| t.join().unwrap()).sum();
        (total, start.elapsed())
    }

    /// Burn-down of a pre-filled backlog, library vs reference, at batch 100 and 1,000 with
    /// 1 and 2 workers. Returns both rates at batch 100, 1 worker.
    ///
    /// Each side runs `BURN_DOWN_ROUNDS` times, alternating, each time on a freshly filled,
    /// vacuumed and checkpointed table, and the best run of each side counts: on a shared
    /// 2-core machine every disturbance only ever slows a run down.
    fn burn_down(&self) -> (f64, f64) {
        let n = self.scaled(200_000);
        let mut b100_w1 = (f64::NAN, f64::NAN);
        for batch in [100usize, 1000] {
            for workers in [1usize, 2] {
                let scenario = format!("burn_down_b{batch}_w{workers}");
                if !self.burn_down_selected(batch, workers) {
                    continue;
                }
                eprintln!("{scenario}: {n} messages");
                let (mut lib_best, mut raw_best) = (0.0f64, 0.0f64);
                for round in 0..BURN_DOWN_ROUNDS {
                    let lib_first = round % 2 == 0;
                    for library in [lib_first, !lib_first] {
                        if library {
                            lib_best = lib_best.max(self.library_burn_down(batch, workers, n));
                        } else {
                            raw_best = raw_best.max(self.raw_burn_down(
                                RawShape::Reference,
                                batch,
                                workers,
                                n,
                            ));
                        }
                    }
                }
                emit(&scenario, lib_best, "msg/s", raw_best);
                if batch == 100 && workers == 1 {
                    b100_w1 = (lib_best, raw_best);
                    if ladder_enabled() {
                        self.ladder(n, raw_best, lib_best);
                    }
                }
            }
        }
        b100_w1
    }

    /// `TROUTBOX_BENCH_BURN_DOWN=100x1,1000x2` restricts the burn-down configurations (for
    /// profiling one of them).
    /// `batch_bytes_b{batch}`: the drain with the default bound on a batch's bytes (the
    /// claim sizes its rows) against the same relay with the bound off
    /// (`max_batch_bytes(usize::MAX)`, the claim of earlier versions), 1 worker, best of
    /// the rounds, alternating. The messages are small, so the bound never cuts a batch:
    /// this is the price of the sizing step alone.
    fn batch_bytes(&self) {
        let n = self.scaled(200_000);
        for batch in [100usize, 1000] {
            let scenario = format!("batch_bytes_b{batch}");
            eprintln!("{scenario}: {n} messages");
            let (mut bounded, mut unbounded) = (0.0f64, 0.0f64);
            for round in 0..BURN_DOWN_ROUNDS {
                let first = round % 2 == 0;
                for bound in [first, !first] {
                    let lib = self.lib.qualified_table();
                    self.fill(&lib, n, true);
                    let mut builder = Outbox::builder(self.lib.clone()).batch_size(batch);
                    if !bound {
                        builder = builder.max_batch_bytes(usize::MAX);
                    }
                    let outbox = builder.build().expect("valid options");
                    let (seen, t) = self.drain_with(outbox, n, Duration::from_secs(120));
                    assert_eq!(self.count(&lib), 0, "the relay drained everything");
                    let rate = seen as f64 / t.as_secs_f64();
                    eprintln!(
                        "    {:<9} {rate:>8.0} msg/s",
                        if bound { "bounded" } else { "unbounded" }
                    );
                    if bound {
                        bounded = bounded.max(rate);
                    } else {
                        unbounded = unbounded.max(rate);
                    }
                }
            }
            emit(&scenario, bounded, "msg/s", unbounded);
        }
    }

    fn burn_down_selected(&self, batch: usize, workers: usize) -> bool {
        match std::env::var("TROUTBOX_BENCH_BURN_DOWN") {
            Ok(list) if !list.is_empty() => list
                .split(',')
                .any(|c| c.trim() == format!("{batch}x{workers}")),
            _ => true,
        }
    }

    fn library_burn_down(&self, batch: usize, workers: usize, n: u64) -> f64 {
        let lib = self.lib.qualified_table();
        self.fill(&lib, n, true);
        let (seen, t) = self.relay_drain(batch, workers, n, Duration::from_secs(120));
        assert_eq!(self.count(&lib), 0, "the relay drained everything");
        let rate = seen as f64 / t.as_secs_f64();
        eprintln!("    library   {rate:>8.0} msg/s ({:.2} s)", t.as_secs_f64());
        rate
    }

    fn raw_burn_down(&self, shape: RawShape, batch: usize, workers: usize, n: u64) -> f64 {
        self.fill(&self.reference.qualified_table(), n, true);
        let (drained, t) = self.raw_drain(shape, batch, workers);
        assert_eq!(drained, n, "the raw statement drained everything");
        let rate = drained as f64 / t.as_secs_f64();
        eprintln!(
            "    {:<9} {rate:>8.0} msg/s ({:.2} s)",
            shape.name(),
            t.as_secs_f64()
        );
        rate
    }

    /// The burn-down ladder: raw SQL taken from the reference to the library's exact
    /// statements and round trips, one step at a time, at batch 100 and 1 worker; the steps
    /// between `reference` and `library` attribute the gap.
    fn ladder(&self, n: u64, reference: f64, library: f64) {
        eprintln!("ladder at batch 100, 1 connection (best of {BURN_DOWN_ROUNDS}):");
        for shape in [
            RawShape::ParamLimit,
            RawShape::PendingIndex,
            RawShape::LibraryRoundTrips,
        ] {
            let best = (0..BURN_DOWN_ROUNDS)
                .map(|_| self.raw_burn_down(shape, 100, 1, n))
                .fold(0.0, f64::max);
            emit(
                &format!("ladder_b100_w1_{}", shape.name()),
                best,
                "msg/s",
                reference,
            );
        }
        emit("ladder_b100_w1_library", library, "msg/s", reference);
    }

    /// The burn-down at batch 100, 1 worker, while another session sits idle in a
    /// transaction that has an xid: neither vacuum nor the index scans' own marking of dead
    /// entries can remove what the relay deletes. Reference: the same burn-down without it.
    /// The ladder runs the raw reference statement under the same pin, to show what the
    /// pin does to SQL alone.
    fn pinned_horizon(&self, clean: Option<(f64, f64)>) {
        let n = self.scaled(200_000);
        let (clean_lib, clean_raw) = clean.unwrap_or((f64::NAN, f64::NAN));
        eprintln!("pinned_horizon: {n} messages");
        let lib = self.lib.qualified_table();
        self.fill(&lib, n, true);
        let pin = self.pin_horizon();
        let (seen, elapsed) = self.relay_drain(100, 1, n, self.seconds(60.0));
        drop(pin);
        let rate = seen as f64 / elapsed.as_secs_f64();
        eprintln!(
            "    library   {rate:>8.0} msg/s ({seen} in {:.2} s)",
            elapsed.as_secs_f64()
        );
        emit("pinned_horizon", rate, "msg/s", clean_lib);
        // Leave nothing behind for the next scenario.
        self.exec(&format!("TRUNCATE {lib}"));
        let reference = self.reference.qualified_table();
        self.fill(&reference, n, true);
        let pin = self.pin_horizon();
        let (drained, t) = self.raw_drain(RawShape::Reference, 100, 1);
        drop(pin);
        let raw = drained as f64 / t.as_secs_f64();
        eprintln!(
            "    reference {raw:>8.0} msg/s ({drained} in {:.2} s)",
            t.as_secs_f64()
        );
        // The library and the raw reference under the same pin.
        emit("pinned_horizon_vs_reference", rate, "msg/s", raw);
        emit("ladder_pinned_horizon_reference", raw, "msg/s", clean_raw);
    }

    /// Keep-sent mode (`Retention::keep_sent`, a table partitioned by day that keeps sent
    /// messages): the claim marks rows sent instead of deleting them. Reference: the same by
    /// hand on an identical table (same migration), one `UPDATE ... SET state = 'sent'` of
    /// the first due pending rows (`FOR UPDATE SKIP LOCKED`, by the pending index, literal
    /// `LIMIT`) per batch in autocommit. Batch 100 and 1,000, 1 and 2 workers, best of the
    /// rounds, alternating, each on a freshly filled and vacuumed table.
    fn keep_sent(&self) {
        let keep = Retention::keep_sent(Duration::from_secs(7 * 86_400));
        let lib = PgStore::new(self.pool.clone())
            .schema(KEEP_LIB_SCHEMA)
            .retention(keep);
        let reference = PgStore::new(self.pool.clone())
            .schema(KEEP_REF_SCHEMA)
            .retention(keep);
        lib.migrate().expect("migrating the keep-sent table");
        reference
            .migrate()
            .expect("migrating the keep-sent reference");
        let n = self.scaled(200_000);
        let (lib_table, ref_table) = (lib.qualified_table(), reference.qualified_table());
        for batch in [100usize, 1000] {
            for workers in [1usize, 2] {
                if !self.burn_down_selected(batch, workers) {
                    continue;
                }
                let scenario = format!("keep_sent_b{batch}_w{workers}");
                eprintln!("{scenario}: {n} messages");
                let (mut lib_best, mut raw_best) = (0.0f64, 0.0f64);
                for round in 0..BURN_DOWN_ROUNDS {
                    let lib_first = round % 2 == 0;
                    for library in [lib_first, !lib_first] {
                        if library {
                            self.fill(&lib_table, n, true);
                            let outbox = Outbox::builder(lib.clone())
                                .batch_size(batch)
                                .workers(workers)
                                .build()
                                .expect("valid options");
                            let (seen, t) = self.drain_with(outbox, n, Duration::from_secs(120));
                            let rate = seen as f64 / t.as_secs_f64();
                            eprintln!("    library   {rate:>8.0} msg/s ({:.2} s)", t.as_secs_f64());
                            lib_best = lib_best.max(rate);
                        } else {
                            self.fill(&ref_table, n, true);
                            let sql = format!(
                                "UPDATE {ref_table} AS m SET state = 'sent', sent_at = now()
                                 FROM (SELECT id, created_at FROM {ref_table}
                                       WHERE state = 'pending' AND available_at <= now()
                                       ORDER BY available_at, id LIMIT {batch}
                                       FOR UPDATE SKIP LOCKED) AS c
                                 WHERE m.id = c.id AND m.created_at = c.created_at
                                 RETURNING m.id, m.key, m.value, m.headers, m.created_at, m.attempts"
                            );
                            let (drained, t) =
                                self.raw_loop(sql, RawShape::Reference, batch, workers);
                            assert_eq!(drained, n, "the raw statement drained everything");
                            let rate = drained as f64 / t.as_secs_f64();
                            eprintln!("    reference {rate:>8.0} msg/s ({:.2} s)", t.as_secs_f64());
                            raw_best = raw_best.max(rate);
                        }
                    }
                }
                let pending = self.count(&format!("{lib_table} WHERE state = 'pending'"));
                assert_eq!(pending, 0, "the relay drained everything");
                emit(&scenario, lib_best, "msg/s", raw_best);
            }
        }
    }

    /// Backlogs as production builds them: 100,000 and 1,000,000 messages added through
    /// `add_messages` (1,000 per transaction) into a table created just before, with
    /// autovacuum off on it, never vacuumed nor analyzed (every new outbox; every backlog
    /// that grows faster than autovacuum runs). The raw reference gets the same treatment.
    /// Then the 100,000 backlog again with a pinned horizon on top, on both sides.
    fn never_analyzed(&self) {
        let mut b100 = (f64::NAN, f64::NAN);
        for nominal in [100_000u64, 1_000_000] {
            let n = self.scaled(nominal);
            // A 1,000,000 fill takes seconds per side: one round each.
            let rounds = if nominal > 100_000 {
                1
            } else {
                BURN_DOWN_ROUNDS
            };
            for batch in [100usize, 1000] {
                let scenario = format!("never_analyzed_{}k_b{batch}", nominal / 1000);
                eprintln!("{scenario}: {n} messages, {rounds} round(s)");
                let (mut lib_best, mut raw_best) = (0.0f64, 0.0f64);
                for round in 0..rounds {
                    let lib_first = round % 2 == 0;
                    for library in [lib_first, !lib_first] {
                        if library {
                            lib_best = lib_best.max(self.never_analyzed_library(batch, n, false));
                        } else {
                            raw_best = raw_best.max(self.never_analyzed_raw(batch, n, false));
                        }
                    }
                }
                emit(&scenario, lib_best, "msg/s", raw_best);
                if nominal == 100_000 && batch == 100 {
                    b100 = (lib_best, raw_best);
                }
            }
        }
        let n = self.scaled(100_000);
        eprintln!("never_analyzed_100k_b100_pinned: {n} messages");
        let lib = self.never_analyzed_library(100, n, true);
        let raw = self.never_analyzed_raw(100, n, true);
        emit("never_analyzed_100k_b100_pinned", lib, "msg/s", raw);
        emit("never_analyzed_pinned_vs_unpinned", lib, "msg/s", b100.0);
        emit(
            "ladder_never_analyzed_reference_pinned_vs_unpinned",
            raw,
            "msg/s",
            b100.1,
        );
    }

    fn never_analyzed_library(&self, batch: usize, n: u64, pinned: bool) -> f64 {
        self.recreate(&self.lib, LIB_SCHEMA);
        self.fill_through_outbox(&self.lib, n);
        let pin = pinned.then(|| self.pin_horizon());
        let (seen, t) = self.relay_drain(batch, 1, n, Duration::from_secs(300));
        drop(pin);
        assert_eq!(
            self.count(&self.lib.qualified_table()),
            0,
            "the relay drained everything"
        );
        let rate = seen as f64 / t.as_secs_f64();
        eprintln!("    library   {rate:>8.0} msg/s ({:.2} s)", t.as_secs_f64());
        rate
    }

    fn never_analyzed_raw(&self, batch: usize, n: u64, pinned: bool) -> f64 {
        self.recreate(&self.reference, REF_SCHEMA);
        self.fill_through_outbox(&self.reference, n);
        let pin = pinned.then(|| self.pin_horizon());
        let (drained, t) = self.raw_drain(RawShape::Reference, batch, 1);
        drop(pin);
        assert_eq!(drained, n, "the raw statement drained everything");
        let rate = drained as f64 / t.as_secs_f64();
        eprintln!("    reference {rate:>8.0} msg/s ({:.2} s)", t.as_secs_f64());
        rate
    }

    /// Drops `store`'s schema and migrates it again, with autovacuum off on the new table:
    /// no statistics at all, not even those an earlier ANALYZE left behind a TRUNCATE.
    fn recreate(&self, store: &PgStore, schema: &str) {
        self.exec(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        store.migrate().expect("migrating");
        self.exec(&format!(
            "ALTER TABLE {} SET (autovacuum_enabled = off)",
            store.qualified_table()
        ));
    }

    /// Adds `n` messages through `Outbox::add_messages`, 1,000 per transaction, then
    /// checkpoints (so the drain that follows pays the same full-page writes on each side).
    fn fill_through_outbox(&self, store: &PgStore, n: u64) {
        let t = Instant::now();
        let outbox = Outbox::builder(store.clone()).build().expect("options");
        let mut c = self.pool.get().expect("a connection");
        let mut i = 0u64;
        while i < n {
            let chunk = (n - i).min(1_000);
            let values: Vec<Vec<u8>> = (i..i + chunk).map(value_for).collect();
            let mut tx = c.transaction().expect("begin");
            outbox
                .add_messages(
                    &mut tx,
                    values.iter().enumerate().map(|(j, v)| {
                        NewMessage::new(if j % 2 == 0 { "key-a" } else { "key-b" }, v)
                    }),
                )
                .expect("add_messages");
            tx.commit().expect("commit");
            i += chunk;
        }
        self.checkpoint(&mut c);
        eprintln!(
            "  added {n} messages to {} in {:.1} s",
            store.qualified_table(),
            t.elapsed().as_secs_f64()
        );
    }

    /// A session idle in a transaction that holds an xid, until the guard is dropped.
    fn pin_horizon(&self) -> HorizonPin {
        let mut conn = self.pool.get().expect("a connection");
        conn.batch_execute("BEGIN; SELECT txid_current();")
            .expect("pinning the horizon");
        HorizonPin(conn)
    }

    /// Peak resident memory of this process while a relay (defaults: batch 100, 1 worker)
    /// drains 200,000 and then 1,000,000 messages, sampled every 50 ms. Runs first, before
    /// the other scenarios have grown the heap.
    fn rss(&self) {
        let lib = self.lib.qualified_table();
        let baseline = rss_kib();
        let mut peaks = Vec::new();
        for nominal in [200_000u64, 1_000_000] {
            let n = self.scaled(nominal);
            eprintln!("rss: {n} messages");
            self.fill(&lib, n, false);
            let sampler = RssSampler::start();
            let (seen, elapsed) = self.relay_drain(100, 1, n, Duration::from_secs(180));
            let peak = sampler.finish();
            eprintln!(
                "  drained {seen} in {:.1} s, peak VmRSS {:.1} MB (before the relay: {:.1} MB)",
                elapsed.as_secs_f64(),
                mib(peak),
                mib(baseline)
            );
            peaks.push(peak);
        }
        emit("rss_mb_200k", mib(peaks[0]), "MB", mib(baseline));
        emit("rss_mb_1m", mib(peaks[1]), "MB", mib(peaks[0]));
    }

    /// Producer transactions: BEGIN, one business INSERT, one outbox message, COMMIT; the
    /// library's `add_message` against the same INSERT as a prepared statement, 1 and 8
    /// threads. The modes alternate in short slices, so a disturbance (another process, a
    /// checkpoint) falls on all of them.
    fn producer_overhead(&self) {
        let outbox = Outbox::builder(self.lib.clone()).build().expect("options");
        for threads in [1usize, 8] {
            let scenario = format!("producer_overhead_c{threads}");
            eprintln!("{scenario}");
            // At 1 thread the ladder adds the library's own statement sent unprepared by
            // hand, which splits the difference into server-side parsing and planning
            // (reference to ladder) and the library's client-side work (ladder to library).
            let mut modes = vec![Produce::Library, Produce::Reference, Produce::Prepared];
            if threads == 1 && ladder_enabled() {
                modes.push(Produce::Unprepared);
            }
            let rates = self.alternate(&modes, self.seconds(1.25), |mode, slice| {
                self.produce(&outbox, mode, threads, slice)
            });
            for (mode, rate) in modes.iter().zip(&rates) {
                eprintln!("  {:<10} {rate:>8.0} tx/s", mode.name());
            }
            emit(&scenario, rates[0], "tx/s", rates[1]);
            emit(&format!("{scenario}_prepared"), rates[2], "tx/s", rates[1]);
            if modes.len() > 3 {
                emit(
                    &format!("ladder_{scenario}_unprepared"),
                    rates[3],
                    "tx/s",
                    rates[1],
                );
            }
        }
    }

    /// Runs `run(mode, slice)` for every mode, `SLICE_ROUNDS` rounds in alternating order,
    /// each on emptied tables; returns each mode's best count per second. As in the
    /// burn-down, the best slice is the least disturbed one on a shared machine.
    fn alternate<M: Copy>(
        &self,
        modes: &[M],
        slice: Duration,
        run: impl Fn(M, Duration) -> (u64, f64),
    ) -> Vec<f64> {
        let mut best = vec![0.0f64; modes.len()];
        for round in 0..SLICE_ROUNDS {
            for step in 0..modes.len() {
                let i = if round % 2 == 0 {
                    step
                } else {
                    modes.len() - 1 - step
                };
                self.truncate_outboxes();
                let (n, t) = run(modes[i], slice);
                best[i] = best[i].max(n as f64 / t);
            }
        }
        best
    }

    fn truncate_outboxes(&self) {
        self.exec(&format!(
            "TRUNCATE {}, {}, {BIZ_SCHEMA}.orders",
            self.lib.qualified_table(),
            self.reference.qualified_table()
        ));
    }

    /// One slice of producer transactions on `threads` connections; returns commits and
    /// seconds.
    fn produce(
        &self,
        outbox: &Outbox,
        mode: Produce,
        threads: usize,
        slice: Duration,
    ) -> (u64, f64) {
        let raw_sql = format!(
            "INSERT INTO {} (key, value) VALUES ($1, $2)",
            self.reference.qualified_table()
        );
        // The library's own statement text (see src/store/postgres/sql/produce.rs), headers included, on the
        // library's table.
        let unprepared_sql = format!(
            "INSERT INTO {} (key, value, headers) VALUES ($1, $2, $3)",
            self.lib.qualified_table()
        );
        let barrier = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<JoinHandle<u64>> = (0..threads)
            .map(|_| {
                let pool = self.pool.clone();
                let outbox = outbox.clone();
                let barrier = barrier.clone();
                let (raw_sql, unprepared_sql) = (raw_sql.clone(), unprepared_sql.clone());
                thread::spawn(move || {
                    let mut c = pool.get().expect("a connection");
                    let business = c
                        .prepare(&format!(
                            "INSERT INTO {BIZ_SCHEMA}.orders (customer, total) VALUES ($1, $2)"
                        ))
                        .expect("prepare");
                    let raw = c
                        .prepare_typed(&raw_sql, &[Type::TEXT, Type::BYTEA])
                        .expect("prepare");
                    let no_headers: Vec<&str> = Vec::new();
                    let prepared = outbox.prepare(&mut *c).expect("prepare the producer");
                    barrier.wait();
                    let end = Instant::now() + slice;
                    let mut commits = 0u64;
                    while Instant::now() < end {
                        let key = format!("order-{commits}");
                        let value = value_for(commits);
                        let mut tx = c.transaction().expect("begin");
                        tx.execute(&business, &[&key, &(commits as i64)])
                            .expect("business insert");
                        match mode {
                            Produce::Library => outbox
                                .add_message(&mut tx, &key, &value)
                                .expect("add_message"),
                            Produce::Prepared => prepared
                                .add_message(&mut tx, &key, &value)
                                .expect("prepared add_message"),
                            Produce::Reference => {
                                tx.execute(&raw, &[&key, &value]).expect("raw insert");
                            }
                            Produce::Unprepared => {
                                tx.execute_typed(
                                    &unprepared_sql,
                                    &[
                                        (&key, Type::TEXT),
                                        (&value, Type::BYTEA),
                                        (&no_headers, Type::TEXT_ARRAY),
                                    ],
                                )
                                .expect("unprepared insert");
                            }
                        }
                        tx.commit().expect("commit");
                        commits += 1;
                    }
                    commits
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let commits = handles.into_iter().map(|h| h.join().unwrap()).sum();
        (commits, start.elapsed().as_secs_f64())
    }

    /// Rows/s of `add_messages` with 100 messages per call (each call its own autocommit
    /// transaction), 2 threads, against the best of two hand-written equivalents: a prepared
    /// multi-row `INSERT ... VALUES (..), (..)` and a prepared `INSERT ... SELECT FROM
    /// unnest`. The ladder adds the library's own statement, prepared.
    fn add_messages_batch(&self) {
        eprintln!("add_messages_batch");
        let outbox = Outbox::builder(self.lib.clone()).build().expect("options");
        let mut modes = vec![
            Insert::Library,
            Insert::Values,
            Insert::Unnest,
            Insert::LibraryPrepared,
        ];
        if ladder_enabled() {
            modes.push(Insert::LibrarySqlPrepared);
        }
        let rates = self.alternate(&modes, self.seconds(1.0), |mode, slice| {
            self.insert_batches(&outbox, mode, 2, slice)
        });
        for (mode, rate) in modes.iter().zip(&rates) {
            eprintln!("  {:<20} {rate:>8.0} rows/s", mode.name());
        }
        let reference = rates[1].max(rates[2]);
        emit("add_messages_batch", rates[0], "rows/s", reference);
        emit("add_messages_batch_prepared", rates[3], "rows/s", reference);
        if modes.len() > 4 {
            emit(
                "ladder_add_messages_library_sql_prepared",
                rates[4],
                "rows/s",
                reference,
            );
        }
    }

    /// One slice of 100-row inserts on `threads` connections; returns rows and seconds.
    fn insert_batches(
        &self,
        outbox: &Outbox,
        mode: Insert,
        threads: usize,
        slice: Duration,
    ) -> (u64, f64) {
        let t = self.reference.qualified_table();
        let placeholders: Vec<String> = (0..ROWS_PER_CALL)
            .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
            .collect();
        let sql = match mode {
            Insert::Library | Insert::LibraryPrepared => String::new(),
            Insert::Values => format!(
                "INSERT INTO {t} (key, value) VALUES {}",
                placeholders.join(", ")
            ),
            Insert::Unnest => format!(
                "INSERT INTO {t} (key, value) SELECT * FROM unnest($1::text[], $2::bytea[])"
            ),
            // The library's own statement text for messages without headers (see
            // src/store/postgres/sql/produce.rs, `many_plain`).
            Insert::LibrarySqlPrepared => format!(
                "INSERT INTO {t} (key, value)
                 SELECT k, v
                 FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(k, v, n)
                 ORDER BY n"
            ),
        };
        let barrier = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<JoinHandle<u64>> = (0..threads)
            .map(|thread_no| {
                let pool = self.pool.clone();
                let outbox = outbox.clone();
                let barrier = barrier.clone();
                let sql = sql.clone();
                thread::spawn(move || {
                    let mut c = pool.get().expect("a connection");
                    let stmt = (!matches!(mode, Insert::Library | Insert::LibraryPrepared))
                        .then(|| c.prepare(&sql).expect("prepare"));
                    let prepared = outbox.prepare(&mut *c).expect("prepare the producer");
                    let keys: Vec<String> = (0..ROWS_PER_CALL)
                        .map(|i| format!("key-{thread_no}-{i}"))
                        .collect();
                    let values: Vec<Vec<u8>> = (0..ROWS_PER_CALL as u64).map(value_for).collect();
                    let slices: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
                    let mut flat: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(2 * ROWS_PER_CALL);
                    for (k, v) in keys.iter().zip(&values) {
                        flat.push(k);
                        flat.push(v);
                    }
                    barrier.wait();
                    let end = Instant::now() + slice;
                    let mut rows = 0u64;
                    while Instant::now() < end {
                        rows += match (mode, &stmt) {
                            (Insert::Library, _) => outbox
                                .add_messages(
                                    &mut *c,
                                    keys.iter().zip(&values).map(|(k, v)| NewMessage::new(k, v)),
                                )
                                .expect("add_messages"),
                            (Insert::LibraryPrepared, _) => prepared
                                .add_messages(
                                    &mut *c,
                                    keys.iter().zip(&values).map(|(k, v)| NewMessage::new(k, v)),
                                )
                                .expect("prepared add_messages"),
                            (Insert::Values, Some(stmt)) => c.execute(stmt, &flat).expect("insert"),
                            (Insert::Unnest, Some(stmt)) => {
                                c.execute(stmt, &[&keys, &slices]).expect("insert")
                            }
                            (Insert::LibrarySqlPrepared, Some(stmt)) => {
                                c.execute(stmt, &[&keys, &slices]).expect("insert")
                            }
                            _ => unreachable!("every raw mode has a statement"),
                        };
                    }
                    rows
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let rows = handles.into_iter().map(|h| h.join().unwrap()).sum();
        (rows, start.elapsed().as_secs_f64())
    }

    /// Commit-to-Sender latency at ~1,000 msg/s with a relay on default settings: producers
    /// on the relay's own `Outbox` (its in-process wake-up applies), then producers on a
    /// separate `Outbox`, as another process would be (only polling finds their messages).
    /// Then the relay's query rate while idle.
    fn latency(&self) {
        let poll_ms = troutbox::DEFAULT_POLL_INTERVAL.as_secs_f64() * 1000.0;
        let duration = Duration::from_secs_f64((12.0 * self.scale).max(2.0));
        eprintln!(
            "latency: ~1000 msg/s for {:.0} s, relay on defaults (poll interval {poll_ms} ms)",
            duration.as_secs_f64()
        );
        let lat = self.latency_run(true, false, 4, Duration::from_millis(4), duration);
        emit("latency_p50", percentile(&lat, 0.5), "ms", poll_ms);
        emit("latency_p99", percentile(&lat, 0.99), "ms", poll_ms);

        let duration = Duration::from_secs_f64((6.0 * self.scale).max(2.0));
        eprintln!(
            "latency without the in-process wake-up (producers on another Outbox): {:.0} s",
            duration.as_secs_f64()
        );
        let lat = self.latency_run(false, false, 4, Duration::from_millis(4), duration);
        emit(
            "latency_p50_no_wakeup",
            percentile(&lat, 0.5),
            "ms",
            poll_ms,
        );
        emit(
            "latency_p99_no_wakeup",
            percentile(&lat, 0.99),
            "ms",
            poll_ms,
        );
        self.idle_rate(
            "relay_idle_xact_per_s",
            troutbox::DEFAULT_POLL_INTERVAL,
            false,
        );
    }

    /// `notify(true)` side by side with the default: what it costs producers (1 and 8
    /// threads, `add_message`; `add_messages` on 2 threads), what it gives a relay in another
    /// process (latency at 1,000 msg/s and at one message every 500 ms, producers on another
    /// `Outbox`), and the idle relay's rate. Also the idle rate at a 10 ms poll interval: what
    /// a user who shortens the interval instead pays.
    fn notify(&self) {
        let plain = Outbox::builder(self.lib.clone()).build().expect("options");
        let loud = Outbox::builder(self.lib.clone())
            .notify(true)
            .build()
            .expect("options");
        let pick = |notify: bool| if notify { &loud } else { &plain };
        // A listener on the channel, as a relay with notify keeps one: a notifying commit
        // signals the listening backends. It never reads; the queue holds far more than a
        // run adds.
        let mut listening = self.pool.get().expect("a connection");
        let channel: String = listening
            .query_one(
                "SELECT 'troutbox_' || to_hex(hashtextextended($1, 0))",
                &[&self.lib.qualified_table()],
            )
            .expect("the channel name")
            .get(0);
        listening
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .expect("LISTEN");
        for threads in [1usize, 8] {
            eprintln!("notify_producer_c{threads}");
            let modes = [
                (false, Produce::Library),
                (true, Produce::Library),
                (false, Produce::Prepared),
                (true, Produce::Prepared),
            ];
            let rates = self.alternate(&modes, self.seconds(1.25), |(notify, mode), slice| {
                self.produce(pick(notify), mode, threads, slice)
            });
            eprintln!(
                "  add_message without {:>8.0} tx/s, with {:>8.0}; prepared without {:>8.0}, with {:>8.0}",
                rates[0], rates[1], rates[2], rates[3]
            );
            emit(
                &format!("notify_producer_c{threads}"),
                rates[1],
                "tx/s",
                rates[0],
            );
            emit(
                &format!("notify_producer_c{threads}_prepared"),
                rates[3],
                "tx/s",
                rates[2],
            );
        }
        eprintln!("notify_add_messages");
        let rates = self.alternate(&[false, true], self.seconds(1.0), |notify, slice| {
            self.insert_batches(pick(notify), Insert::Library, 2, slice)
        });
        emit("notify_add_messages", rates[1], "rows/s", rates[0]);
        let runs = [
            ("1000_per_s", 4u32, Duration::from_millis(4), 6.0),
            ("every_500ms", 1, Duration::from_millis(500), 20.0),
        ];
        for (name, producers, period, seconds) in runs {
            let duration = Duration::from_secs_f64((seconds * self.scale).max(5.0));
            eprintln!(
                "notify_latency_{name}: {:.0} s each, producers on another Outbox",
                duration.as_secs_f64()
            );
            let off = self.latency_run(false, false, producers, period, duration);
            let on = self.latency_run(false, true, producers, period, duration);
            for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
                emit(
                    &format!("notify_latency_{name}_{label}"),
                    percentile(&on, q),
                    "ms",
                    percentile(&off, q),
                );
            }
        }
        let _ = listening.batch_execute("UNLISTEN *");
        drop(listening);
        self.idle_rate(
            "relay_idle_xact_per_s_notify",
            troutbox::DEFAULT_POLL_INTERVAL,
            true,
        );
        self.idle_rate(
            "relay_idle_xact_per_s_poll_10ms",
            Duration::from_millis(10),
            false,
        );
    }

    /// One latency run: `producers` threads each committing one message every `period`,
    /// with the relay on the producers' own `Outbox` (`wake_up`) or on another one, both with
    /// `notify` as given. Returns the sorted commit-to-Sender latencies in ms.
    fn latency_run(
        &self,
        wake_up: bool,
        notify: bool,
        producers: u32,
        period: Duration,
        duration: Duration,
    ) -> Vec<f64> {
        self.latency_run_on(
            &self.lib, false, wake_up, notify, producers, period, duration,
        )
    }

    /// [`latency_run`](Self::latency_run) on `store`; with `ordered`, an ordered outbox whose
    /// producers each add to one key of their own (every message waits for the previous one
    /// of its key to be sent).
    #[allow(clippy::too_many_arguments)]
    fn latency_run_on(
        &self,
        store: &PgStore,
        ordered: bool,
        wake_up: bool,
        notify: bool,
        producers: u32,
        period: Duration,
        duration: Duration,
    ) -> Vec<f64> {
        self.exec(&format!("TRUNCATE {}", store.qualified_table()));
        let build = || {
            Outbox::builder(store.clone())
                .notify(notify)
                .per_key_ordering(ordered)
                .build()
                .expect("options")
        };
        let relay_outbox = build();
        let producer_outbox = if wake_up {
            relay_outbox.clone()
        } else {
            build()
        };

        // Both sides record an Instant per message, keyed by its unique value (`add_message`
        // does not return the id); the difference is taken afterwards, so it does not matter
        // which side gets there first.
        let delivered: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let seen = Arc::new(AtomicU64::new(0));
        let sender = {
            let delivered = delivered.clone();
            let seen = seen.clone();
            move |batch: &mut Batch| -> Result<(), Infallible> {
                let now = Instant::now();
                let mut map = delivered.lock().unwrap();
                for m in batch.iter() {
                    map.entry(String::from_utf8_lossy(m.value()).into_owned())
                        .or_insert(now);
                }
                seen.fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(())
            }
        };
        let mut handle = relay_outbox.start(sender).expect("starting the relay");

        // Each producer on a fixed schedule of one commit per `period`, offset by 1 ms from
        // each other (4 producers, 4 ms: a steady 1,000 msg/s, whatever one commit costs).
        let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let barrier = Arc::new(Barrier::new(producers as usize));
        let handles: Vec<JoinHandle<()>> = (0..producers)
            .map(|p| {
                let pool = self.pool.clone();
                let outbox = producer_outbox.clone();
                let committed = committed.clone();
                let barrier = barrier.clone();
                thread::spawn(move || {
                    let mut c = pool.get().expect("a connection");
                    barrier.wait();
                    let start = Instant::now() + Duration::from_millis(u64::from(p));
                    let mut k = 0u32;
                    loop {
                        let due = start + period * k;
                        if due >= start + duration {
                            break;
                        }
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                        let id = format!("latency-{p}-{k}");
                        let key = if ordered {
                            format!("latency-{p}")
                        } else {
                            id.clone()
                        };
                        let mut tx = c.transaction().expect("begin");
                        outbox
                            .add_message(&mut tx, &key, id.as_bytes())
                            .expect("add_message");
                        tx.commit().expect("commit");
                        let at = Instant::now();
                        committed.lock().unwrap().insert(id, at);
                        k += 1;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let produced = committed.lock().unwrap().len() as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.load(Ordering::Relaxed) < produced && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        handle.shutdown().expect("relay shutdown");
        let mut lat: Vec<f64> = {
            let committed = committed.lock().unwrap();
            let delivered = delivered.lock().unwrap();
            committed
                .iter()
                .filter_map(|(key, c)| {
                    delivered
                        .get(key)
                        .map(|d| d.saturating_duration_since(*c).as_secs_f64() * 1000.0)
                })
                .collect()
        };
        assert_eq!(lat.len() as u64, produced, "every message was delivered");
        lat.sort_by(f64::total_cmp);
        eprintln!(
            "  {produced} messages in {:.1} s ({:.0}/s): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            duration.as_secs_f64(),
            produced as f64 / duration.as_secs_f64(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            lat[lat.len() - 1]
        );
        lat
    }

    /// Transactions per second of an idle relay (defaults) polling an empty table.
    ///
    /// Counted by the server in `pg_stat_database`. The relay gets a database of its own so
    /// that nothing else is counted, and since a backend publishes its counters at most
    /// about once a second, the rate is taken between two moments the counter moved: between
    /// two publications the count is exact.
    fn idle_rate(&self, scenario: &str, poll: Duration, notify: bool) {
        const IDLE_DB: &str = "troutbox_bench_idle";
        let poll_ms = poll.as_secs_f64() * 1000.0;
        eprintln!("{scenario}: an idle relay (poll interval {poll_ms} ms, notify {notify}), in database {IDLE_DB}");
        // Separate statements: CREATE DATABASE refuses to run inside the implicit transaction
        // of a multi-statement string.
        let created = {
            let mut c = self.pool.get().expect("a connection");
            c.batch_execute(&format!("DROP DATABASE IF EXISTS {IDLE_DB} WITH (FORCE)"))
                .and_then(|()| c.batch_execute(&format!("CREATE DATABASE {IDLE_DB}")))
        };
        if let Err(e) = created {
            eprintln!("  cannot create a database ({e}); idle rate not measured");
            emit(scenario, f64::NAN, "xact/s", 1000.0 / poll_ms);
            return;
        }
        let mut config = self.config.clone();
        config.dbname(IDLE_DB);
        let pool = r2d2::Pool::builder()
            .max_size(3)
            .build(PostgresConnectionManager::new(config, postgres::NoTls))
            .expect("a connection pool");
        let store = PgStore::new(pool.clone());
        store.migrate().expect("migrating");
        let outbox = Outbox::builder(store)
            .poll_interval(poll)
            .notify(notify)
            .build()
            .expect("options");
        let mut handle = outbox
            .start(|_: &mut Batch| -> Result<(), Infallible> { Ok(()) })
            .expect("starting the relay");
        // Let the adaptive polling settle at the poll interval.
        thread::sleep(Duration::from_millis(1500));
        let mut c = self.pool.get().expect("a connection");
        let window = Duration::from_secs_f64((8.0 * self.scale).max(4.0));
        let start = Instant::now();
        let mut changes: Vec<(Instant, i64)> = Vec::new();
        let mut last = None;
        while start.elapsed() < window {
            let v: i64 = c
                .query_one(
                    "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database
                     WHERE datname = $1",
                    &[&IDLE_DB],
                )
                .expect("pg_stat_database")
                .get(0);
            if last.is_some_and(|l| l != v) {
                changes.push((Instant::now(), v));
            }
            last = Some(v);
            thread::sleep(Duration::from_millis(20));
        }
        handle.shutdown().expect("relay shutdown");
        drop(outbox);
        drop(pool);
        let rate = match (changes.first(), changes.last()) {
            (Some((t0, v0)), Some((t1, v1))) if t1 > t0 => {
                let secs = t1.duration_since(*t0).as_secs_f64();
                eprintln!(
                    "  {} transactions in {secs:.2} s between counter updates (each poll: 1 transaction, 3 round trips)",
                    v1 - v0
                );
                (v1 - v0) as f64 / secs
            }
            _ => f64::NAN,
        };
        emit(scenario, rate, "xact/s", 1000.0 / poll_ms);
        let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {IDLE_DB} WITH (FORCE)"));
    }
}

/// The `p` quantile of sorted values (nearest rank).
impl Bench {
    /// Per-key ordering next to the unordered relay, in one run (BENCHMARKS.md, "Per-key
    /// ordering"): drain rates with many keys (10,000) and with 5 hot keys, batch 100, 1 and
    /// 2 workers; producer throughput with the per-key lock, many keys and 5 hot keys, 1 and
    /// 8 threads; latency of ordered keys under steady load.
    ///
    /// Both tables are filled the same way and never analyzed (`CHECKPOINT` only), the
    /// state a backlog is in when it matters.
    fn ordered(&self) {
        let ordered_store = PgStore::new(self.pool.clone()).schema(ORD_SCHEMA);
        let build = |store: &PgStore, ordered: bool| {
            Outbox::builder(store.clone())
                .per_key_ordering(ordered)
                .batch_size(100)
                .build()
                .expect("options")
        };
        build(&ordered_store, true)
            .migrate()
            .expect("migrating the ordered table");
        let ord = ordered_store.qualified_table();
        let lib = self.lib.qualified_table();
        self.exec(&format!("ALTER TABLE {ord} SET (autovacuum_enabled = off)"));

        let n = self.scaled(50_000);
        for (label, keys) in [("many_keys", 10_000u64), ("hot_keys", 5)] {
            for workers in [1usize, 2] {
                let scenario = format!("ordered_drain_{label}_b100_w{workers}");
                eprintln!("{scenario}: {n} messages over {keys} keys");
                let mut best = [0.0f64; 2];
                for round in 0..2 {
                    for step in 0..2 {
                        let ordered = (round + step) % 2 == 1;
                        let (store, table) = if ordered {
                            (&ordered_store, &ord)
                        } else {
                            (&self.lib, &lib)
                        };
                        self.fill_keys(table, n, keys);
                        let outbox = Outbox::builder(store.clone())
                            .per_key_ordering(ordered)
                            .batch_size(100)
                            .workers(workers)
                            .build()
                            .expect("options");
                        let (seen, t) = self.drain_with(outbox, n, Duration::from_secs(600));
                        let rate = seen as f64 / t.as_secs_f64();
                        eprintln!(
                            "  {} {rate:>8.0} msg/s",
                            if ordered { "ordered  " } else { "unordered" }
                        );
                        let i = usize::from(ordered);
                        best[i] = best[i].max(rate);
                    }
                }
                emit(&scenario, best[1], "msg/s", best[0]);
            }
        }
        self.exec(&format!("TRUNCATE {ord}, {lib}"));

        let plain = build(&self.lib, false);
        let ordered = build(&ordered_store, true);
        for threads in [1usize, 8] {
            for (label, hot) in [("many_keys", None), ("hot_keys", Some(5u64))] {
                let scenario = format!("ordered_producer_{label}_c{threads}");
                eprintln!("{scenario}");
                let rates = self.alternate(&[false, true], self.seconds(1.25), |ord, slice| {
                    self.exec(&format!("TRUNCATE {}", ordered_store.qualified_table()));
                    let outbox = if ord { &ordered } else { &plain };
                    self.produce_keys(outbox, threads, hot, slice)
                });
                eprintln!(
                    "  unordered {:>8.0} tx/s, ordered {:>8.0} tx/s",
                    rates[0], rates[1]
                );
                emit(&scenario, rates[1], "tx/s", rates[0]);
            }
        }

        let duration = Duration::from_secs_f64((8.0 * self.scale).max(2.0));
        eprintln!(
            "ordered latency: 4 keys, one producer each, ~1000 msg/s for {:.0} s",
            duration.as_secs_f64()
        );
        let poll_ms = troutbox::DEFAULT_POLL_INTERVAL.as_secs_f64() * 1000.0;
        let unordered = self.latency_run_on(
            &self.lib,
            false,
            true,
            false,
            4,
            Duration::from_millis(4),
            duration,
        );
        let lat = self.latency_run_on(
            &ordered_store,
            true,
            true,
            false,
            4,
            Duration::from_millis(4),
            duration,
        );
        emit(
            "ordered_latency_p50",
            percentile(&lat, 0.5),
            "ms",
            percentile(&unordered, 0.5),
        );
        emit(
            "ordered_latency_p99",
            percentile(&lat, 0.99),
            "ms",
            percentile(&unordered, 0.99),
        );
        eprintln!("  (reference: the unordered relay in the same run; poll interval {poll_ms} ms)");
    }

    /// Empties `table` and fills it with `n` messages over `keys` keys, interleaved (message
    /// `g` has key `g % keys`), then checkpoints, without VACUUM or ANALYZE.
    fn fill_keys(&self, table: &str, n: u64, keys: u64) {
        let mut c = self.pool.get().expect("a connection");
        c.batch_execute(&format!("TRUNCATE {table}")).unwrap();
        c.execute(
            &format!(
                "INSERT INTO {table} (key, value)
                 SELECT 'key-' || (g % $2::int8), convert_to(rpad(g::text, {VALUE_LEN}, 'x'), 'UTF8')
                 FROM generate_series(1::int8, $1::int8) AS g"
            ),
            &[&i64::try_from(n).unwrap(), &i64::try_from(keys).unwrap()],
        )
        .expect("filling the table");
        self.checkpoint(&mut c);
    }

    /// One slice of one-message producer transactions on `threads` connections through
    /// `outbox`: a new key per transaction, or one of `hot` keys; returns commits and seconds.
    fn produce_keys(
        &self,
        outbox: &Outbox,
        threads: usize,
        hot: Option<u64>,
        slice: Duration,
    ) -> (u64, f64) {
        let barrier = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<JoinHandle<u64>> = (0..threads)
            .map(|thread_no| {
                let pool = self.pool.clone();
                let outbox = outbox.clone();
                let barrier = barrier.clone();
                thread::spawn(move || {
                    let mut c = pool.get().expect("a connection");
                    barrier.wait();
                    let end = Instant::now() + slice;
                    let mut commits = 0u64;
                    while Instant::now() < end {
                        let key = match hot {
                            Some(hot) => format!("hot-{}", (commits + thread_no as u64) % hot),
                            None => format!("key-{thread_no}-{commits}"),
                        };
                        let mut tx = c.transaction().expect("begin");
                        outbox
                            .add_message(&mut tx, &key, &value_for(commits))
                            .expect("add_message");
                        tx.commit().expect("commit");
                        commits += 1;
                    }
                    commits
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let commits = handles.into_iter().map(|h| h.join().unwrap()).sum();
        (commits, start.elapsed().as_secs_f64())
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (sorted.len() as f64 * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// An open transaction with an xid; rolled back on drop, before the connection goes back to
/// the pool.
struct HorizonPin(r2d2::PooledConnection<PostgresConnectionManager<postgres::NoTls>>);

impl Drop for HorizonPin {
    fn drop(&mut self) {
        self.0
            .batch_execute("ROLLBACK")
            .expect("releasing the horizon");
    }
}

/// Peak VmRSS, sampled every 50 ms by a thread of its own.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib()));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(50));
                }
            })
        };
        RssSampler { stop, peak, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.peak.load(Ordering::Relaxed).max(rss_kib())
    }
}

/// This process's resident set, in KiB (0 where /proc is missing).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
