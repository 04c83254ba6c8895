//! The relay service against the library's relay in-process, in one run against one
//! PostgreSQL server: `cargo bench --features cli --bench relay_service`.
//!
//! Prints one JSON line per scenario on stdout,
//! `{"scenario": "...", "value": N, "unit": "...", "reference": N, "ratio": N}`:
//!
//! - `service_drain`: messages/s `troutbox relay` drains from a backlog to its `discard`
//!   sink (1 worker, batches of 100), reference = `Outbox::start` with a no-op Sender on the
//!   same kind of backlog in this process. Target: ratio >= 0.95.
//! - `two_sources_drain`: messages/s the service drains from two backlogs (two tables of one
//!   database, one source each) together, reference = `service_drain`'s one source.
//!
//! Each figure is the median of 5 rounds, each round running the three drains in turn. Each
//! drain is timed from the moment the relay runs (the service's `source NAME: relaying`
//! line, `start` returning in-process) until no pending message is left (polled every 5 ms).
//!
//! `DATABASE_URL` uses a server of your own (schemas `bench_service_*` are dropped and
//! created); otherwise a throw-away one starts. `TROUTBOX_BENCH_SCALE` multiplies the
//! message counts (default 1: 100,000 per backlog; 0.1 for a quick check).

use std::convert::Infallible;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use troutbox::{Batch, NewMessage, Outbox, PgPool, PgStore};

fn messages() -> usize {
    let scale: f64 = std::env::var("TROUTBOX_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((100_000.0 * scale) as usize).max(1_000)
}

fn emit(scenario: &str, value: f64, unit: &str, reference: f64) {
    println!(
        "{{\"scenario\": \"{scenario}\", \"value\": {value:.3}, \"unit\": \"{unit}\", \"reference\": {reference:.3}, \"ratio\": {:.3}}}",
        value / reference
    );
}

/// A fresh schema with a migrated table holding `n` pending messages of 200 bytes.
fn backlog(pool: &PgPool, schema: &str, n: usize) -> PgStore {
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
    let store = PgStore::new(pool.clone()).schema(schema);
    store.migrate().unwrap();
    let outbox = Outbox::builder(store.clone()).build().unwrap();
    let value = [b'v'; 200];
    let keys: Vec<String> = (0..n).map(|i| format!("key-{}", i % 1000)).collect();
    let mut conn = pool.get().unwrap();
    for chunk in keys.chunks(10_000) {
        outbox
            .add_messages(&mut *conn, chunk.iter().map(|k| NewMessage::new(k, &value)))
            .unwrap();
    }
    conn.batch_execute(&format!("VACUUM ANALYZE {schema}.outbox_messages"))
        .unwrap();
    store
}

/// Waits until none of `schemas` has a pending message.
fn wait_drained(pool: &PgPool, schemas: &[&str]) {
    let mut conn = pool.get().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    for schema in schemas {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.outbox_messages WHERE state = 'pending')"
        );
        while conn.query_one(&sql, &[]).unwrap().get::<_, bool>(0) {
            assert!(
                Instant::now() < deadline,
                "{schema} did not drain in 10 minutes"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// messages/s of the library's relay in this process.
fn in_process(pool: &PgPool, n: usize) -> f64 {
    let store = backlog(pool, "bench_service_in_process", n);
    let outbox = Outbox::builder(store).batch_size(100).build().unwrap();
    let mut handle = outbox
        .start(|_: &mut Batch| Ok::<(), Infallible>(()))
        .unwrap();
    let started = Instant::now();
    wait_drained(pool, &["bench_service_in_process"]);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    handle.shutdown().unwrap();
    rate
}

/// messages/s of `troutbox relay` with one source per schema, together.
fn service(pool: &PgPool, url: &str, schemas: &[&str], n: usize) -> f64 {
    for schema in schemas {
        backlog(pool, schema, n);
    }
    let mut config = String::from("[sink.discard]\n");
    for schema in schemas {
        config.push_str(&format!(
            "[[source]]\nname = \"{schema}\"\ndatabase_url_env = \"BENCH_URL\"\nschema = \"{schema}\"\nbatch_size = 100\n"
        ));
    }
    let path = std::env::temp_dir().join(format!("troutbox-bench-{}.toml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_troutbox"))
        .args(["relay", "--config"])
        .arg(&path)
        .env("BENCH_URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The clock starts when the last source logs that it relays.
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines();
    let mut relaying = 0;
    while relaying < schemas.len() {
        let line = lines.next().expect("the service ended early").unwrap();
        relaying += usize::from(line.contains(": relaying "));
    }
    let started = Instant::now();
    std::thread::spawn(move || lines.for_each(drop));
    wait_drained(pool, schemas);
    let rate = (n * schemas.len()) as f64 / started.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "the service stopped with {status}");
    let _ = std::fs::remove_file(&path);
    rate
}

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let url = troutbox::testing::database_url().unwrap_or_else(|e| panic!("{e}"));
    let pool = troutbox::pool(url.parse().unwrap(), 4).unwrap();
    let n = messages();
    // Rounds alternate the contenders, and each figure is a median: on a shared machine a
    // single pair of drains was seen anywhere between 0.70x and 1.09x.
    let (mut library, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        library.push(in_process(&pool, n));
        one.push(service(&pool, &url, &["bench_service_one"], n));
        two.push(service(
            &pool,
            &url,
            &["bench_service_a", "bench_service_b"],
            n,
        ));
    }
    eprintln!("in-process {library:.0?}, service {one:.0?}, two sources {two:.0?} msg/s");
    let (library, one, two) = (median(library), median(one), median(two));
    emit("service_drain", one, "msg/s", library);
    emit("two_sources_drain", two, "msg/s", one);
}

/// Rounds of the three drains.
const ROUNDS: usize = 5;
