//! Outbox → Kafka end to end against librdkafka producing the same messages directly, in one
//! run against one broker: `cargo bench --bench kafka --features kafka`.
//!
//! Prints one JSON line per scenario on stdout,
//! `{"scenario": "...", "value": N, "unit": "msg/s", "reference": N, "ratio": N}`:
//!
//! - `kafka_outbox_batch_100`, `kafka_outbox_batch_1000`: messages/s from a backlog of
//!   committed messages in the outbox to Kafka, every message acknowledged by the broker
//!   (`KafkaSender`, one relay worker, batches of 100 or 1,000: claim, enqueue, wait for the
//!   delivery reports, settle);
//! - reference: one librdkafka producer with the same settings (idempotent, `acks=all`)
//!   producing the same messages (key, 200-byte value, the same headers) as fast as it can,
//!   then waiting for every delivery report. Measured right before each outbox run.
//! - `..._vs_noop_sender`: the same outbox run against the same relay with a no-op Sender
//!   (every message sent at once, nothing published): the outbox's own ceiling on this
//!   machine, so the ratio is what the Kafka Sender costs on top of it.
//! - `kafka_outbox_batch_100_4_workers`, `kafka_outbox_batch_1000_2_workers`: the same with
//!   four or two relay workers (one producer each), whose batches overlap.
//!
//! The broker is a throw-away tansu (`cargo install tansu --locked --features dynostore`)
//! with in-memory storage, on loopback; `KAFKA_BROKERS` uses a broker of your own (the topic
//! `troutbox-bench` must exist). `DATABASE_URL` uses a PostgreSQL server of your own
//! (schema `bench_kafka` is dropped and created); otherwise a throw-away one starts with
//! `fsync=on`. `TROUTBOX_BENCH_SCALE` multiplies the message count (default 1: 50,000 per
//! run).

#[path = "../tests/common/tansu.rs"]
mod tansu;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use r2d2_postgres::PostgresConnectionManager;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use troutbox::kafka::KafkaSender;
use troutbox::testing::TempPostgres;
use troutbox::{Batch, NewMessage, Outbox, PgPool, PgStore, Sender, Status};

static SEND_NANOS: AtomicU64 = AtomicU64::new(0);

const TOPIC: &str = "troutbox-bench";
const SCHEMA: &str = "bench_kafka";

fn scale() -> f64 {
    std::env::var("TROUTBOX_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn emit(scenario: &str, value: f64, reference: f64) {
    println!(
        "{{\"scenario\": \"{scenario}\", \"value\": {value:.1}, \"unit\": \"msg/s\", \"reference\": {reference:.1}, \"ratio\": {:.3}}}",
        value / reference
    );
}

/// CPU seconds used so far by this process (the relay or the reference producer, with
/// librdkafka's threads), by the PostgreSQL server it started and by the broker it started
/// (every process descended from this one, by name), read from `/proc`: where a run's work
/// goes on a machine whose cores they all share. Processes of other programs do not count.
fn cpu() -> [f64; 3] {
    let ticks = 100.0; // USER_HZ: 100 on Linux whatever the kernel's tick rate
    let read = |pid: &str| -> Option<(String, u32, f64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (head, rest) = stat.rsplit_once(") ")?;
        let comm = head.split_once(" (")?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let used: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some((comm, ppid, used / ticks))
    };
    let me = std::process::id();
    let procs: Vec<(u32, String, u32, f64)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid: u32 = name.parse().ok()?;
            let (comm, ppid, used) = read(&name)?;
            Some((pid, comm, ppid, used))
        })
        .collect();
    let descends = |mut pid: u32| {
        for _ in 0..8 {
            let Some(p) = procs.iter().find(|p| p.0 == pid) else {
                return false;
            };
            if p.2 == me {
                return true;
            }
            pid = p.2;
        }
        false
    };
    let mut out = [0.0; 3];
    for (pid, comm, _, used) in &procs {
        if *pid == me {
            out[0] += used;
        } else if descends(*pid) && comm.starts_with("postgres") {
            out[1] += used;
        } else if descends(*pid) && comm.starts_with("tansu") {
            out[2] += used;
        }
    }
    out
}

/// Prints the CPU time a run of `n` messages used, per message, from `before` (see [`cpu`]),
/// and returns the total in microseconds per message.
fn report_cpu(what: &str, n: usize, before: [f64; 3]) -> f64 {
    let after = cpu();
    let us = |i: usize| (after[i] - before[i]) * 1e6 / n as f64;
    let total = us(0) + us(1) + us(2);
    eprintln!(
        "  {what}: CPU per message {total:.1} µs: this process {:.1}, PostgreSQL {:.1}, broker {:.1} (2 cores: at most {:.0} msg/s)",
        us(0),
        us(1),
        us(2),
        2e6 / total
    );
    total
}

fn key(i: usize) -> String {
    format!("customer-{}", i % 100)
}

fn value() -> Vec<u8> {
    vec![b'x'; 200]
}

/// Fills the outbox with `n` committed messages (1,000 per transaction), each with one
/// header, like a producer would, then vacuums the table.
fn fill(pool: &PgPool, outbox: &Outbox, n: usize) {
    let mut conn = pool.get().unwrap();
    let value = value();
    for start in (0..n).step_by(1000) {
        let end = (start + 1000).min(n);
        let keys: Vec<String> = (start..end).map(key).collect();
        let seqs: Vec<String> = (start..end).map(|i| i.to_string()).collect();
        let mut tx = conn.transaction().unwrap();
        outbox
            .add_messages(
                &mut tx,
                keys.iter()
                    .zip(&seqs)
                    .map(|(k, s)| NewMessage::new(k, &value).header("seq", s)),
            )
            .unwrap();
        tx.commit().unwrap();
    }
    conn.batch_execute(&format!("VACUUM ANALYZE {SCHEMA}.outbox_messages"))
        .unwrap();
}

/// The reference: one producer, the same settings and messages, every delivery report in.
fn direct(brokers: &str, n: usize) -> f64 {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .create()
        .unwrap();
    let value = value();
    // Connections and metadata first, as the relay's producer has them after its first batch.
    producer
        .send(
            BaseRecord::<str, [u8]>::to(TOPIC)
                .key("warm-up")
                .payload(&value),
        )
        .unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    let started = Instant::now();
    for i in 0..n {
        let k = key(i);
        let id = format!("00000000-0000-0000-0000-000000000000:{i}");
        let seq = i.to_string();
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: "message-id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "seq",
                value: Some(seq.as_str()),
            });
        let mut record = BaseRecord::to(TOPIC)
            .key(k.as_str())
            .payload(value.as_slice())
            .headers(headers)
            .timestamp(1_700_000_000_000);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    // Queue full: let reports come in.
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

/// Drains `n` committed messages to Kafka through the relay; messages/s, and the CPU time
/// the drain used per message (µs, see [`cpu`]).
/// With `kafka` false, the same relay with a no-op Sender (every message sent at once): what
/// the outbox alone costs, for the diagnosis on stderr.
fn relay(
    pool: &PgPool,
    brokers: &str,
    n: usize,
    batch: usize,
    workers: usize,
    to_kafka: bool,
) -> (f64, f64) {
    let store = PgStore::new(pool.clone()).schema(SCHEMA);
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .unwrap();
    store.migrate().unwrap();
    let outbox = Outbox::builder(store)
        .batch_size(batch)
        .workers(workers)
        .poll_interval(Duration::from_millis(1))
        .build()
        .unwrap();
    fill(pool, &outbox, n);
    let kafka = KafkaSender::builder(brokers).topic(TOPIC).build().unwrap();
    // One sender per worker, each with its producer connected (a first batch outside the
    // measurement), as the reference's producer is: a relay runs for long, and creating a
    // producer (connections, metadata, producer id) is a one-off half second here. The relay
    // clones its Sender per worker, unconnected: the workers share these instead.
    let senders: Arc<Vec<Mutex<KafkaSender>>> = Arc::new(
        (0..workers)
            .map(|_| {
                let mut sender = kafka.clone();
                let mut warm = Batch::for_test([troutbox::Message::for_test(0, "warm-up", b"w")]);
                sender.send(&mut warm).unwrap();
                Mutex::new(sender)
            })
            .collect(),
    );
    let sent = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let s = sent.clone();
    let target = n as u64;
    let cpu_before = cpu();
    let started = Instant::now();
    let mut handle = outbox
        .start(move |batch: &mut Batch| {
            let t = Instant::now();
            let mut sender = senders
                .iter()
                .find_map(|m| m.try_lock().ok())
                .expect("a free sender per worker");
            let result = if to_kafka { sender.send(batch) } else { Ok(()) };
            drop(sender);
            SEND_NANOS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            // Marked sent, or unmarked with Ok (the no-op Sender): sent.
            let ok = batch
                .iter()
                .filter(|m| !matches!(m.status(), Status::Failed(_)))
                .count() as u64;
            if s.fetch_add(ok, Ordering::Relaxed) + ok >= target {
                let _ = done_tx.try_send(());
            }
            result
        })
        .unwrap();
    done_rx.recv_timeout(Duration::from_secs(300)).unwrap();
    let elapsed = started.elapsed();
    let what = if to_kafka {
        "outbox -> Kafka"
    } else {
        "no-op relay"
    };
    let cpu_used = report_cpu(&format!("{what}, batch {batch} x{workers}"), n, cpu_before);
    handle.shutdown().unwrap();
    let stats = handle.stats();
    eprintln!(
        "  batch {batch} x{workers}: {:.1?} in all, {:.1?} in send, mean batch {:?}",
        elapsed,
        Duration::from_nanos(SEND_NANOS.swap(0, Ordering::Relaxed)),
        stats.batch_duration.mean()
    );
    drop(kafka);
    (n as f64 / elapsed.as_secs_f64(), cpu_used)
}

fn main() {
    let n = ((50_000.0 * scale()) as usize).max(1_000);
    let _server;
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            _server = TempPostgres::builder()
                .setting("fsync", "on")
                .start()
                .unwrap();
            _server.url()
        }
    };
    let _broker;
    let brokers = match std::env::var("KAFKA_BROKERS") {
        Ok(b) if !b.is_empty() => b,
        _ => {
            let broker = tansu::TempTansu::start().unwrap_or_else(|e| panic!("{e}"));
            broker.create_topic(TOPIC, 4).unwrap();
            let b = broker.bootstrap();
            _broker = broker;
            b
        }
    };
    let pool = r2d2::Pool::builder()
        .max_size(10)
        .build(PostgresConnectionManager::new(
            url.parse().unwrap(),
            postgres::NoTls,
        ))
        .unwrap();
    for (scenario, batch, workers) in [
        ("kafka_outbox_batch_100", 100, 1),
        ("kafka_outbox_batch_100_4_workers", 100, 4),
        ("kafka_outbox_batch_1000", 1000, 1),
        ("kafka_outbox_batch_1000_2_workers", 1000, 2),
    ] {
        let before = cpu();
        let reference = direct(&brokers, n);
        report_cpu("librdkafka alone", n, before);
        let (value, kafka_cpu) = relay(&pool, &brokers, n, batch, workers, true);
        let (noop, noop_cpu) = relay(&pool, &brokers, n, batch, workers, false);
        eprintln!("{scenario}: {n} messages, outbox {value:.0} msg/s, direct {reference:.0} msg/s; the same relay with a no-op Sender {noop:.0} msg/s");
        emit(scenario, value, reference);
        emit(&format!("{scenario}_vs_noop_sender"), value, noop);
        println!(
            "{{\"scenario\": \"{scenario}_cpu_per_message\", \"value\": {kafka_cpu:.1}, \"unit\": \"us\", \"reference\": {noop_cpu:.1}, \"ratio\": {:.3}}}",
            kafka_cpu / noop_cpu
        );
    }
}
