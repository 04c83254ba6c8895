//! `troutbox relay` with its Kafka sink, against a private tansu broker and real PostgreSQL
//! databases (`cargo test --features cli,kafka --test relay_service_kafka`): two databases,
//! producers calling the SQL producer function (in one of them `examples/sql_producer.py`,
//! Python with psycopg), the service SIGKILLed and restarted, then everything read back from
//! the topic with a real consumer; and a broker that is not there at start.

mod common;
#[path = "common/kafka_records.rs"]
mod kafka_records;
#[path = "common/service.rs"]
mod service;
#[path = "common/tansu.rs"]
mod tansu;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::PATIENCE;
use kafka_records::read_all;
use service::{config_file, Service};
use tansu::TempTansu;

#[test]
fn two_databases_to_tansu_through_kills_lose_nothing_and_keep_order() {
    let tansu = TempTansu::start().unwrap_or_else(|e| panic!("{e}"));
    tansu.create_topic("relayed", 3).unwrap();
    let run = service::two_databases_through_kills(
        "relay_kafka",
        &format!(
            "[sink.kafka]\nbrokers = \"{}\"\ntopic = \"relayed\"\ndelivery_timeout = \"5s\"",
            tansu.bootstrap()
        ),
        // The Kafka sender connects on its first batch: kill a service that got that far.
        "first messages sent",
        4,
        Duration::from_secs(120),
        // Database b's producer is the Python program of docs/sql-producer.md.
        true,
    );
    let service::KillRun {
        committed_a,
        committed_b,
        kills,
        left_for_the_last_run,
        ..
    } = run;
    // The killed runs were at work: they delivered part of what was committed.
    assert!(
        (left_for_the_last_run as usize) < committed_a.len() + committed_b.len(),
        "the killed runs delivered nothing"
    );
    let committed = committed_a.len() + committed_b.len();
    let records = read_all(&tansu.bootstrap(), "relayed", 3, committed);
    let values: HashSet<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    let lost: Vec<&String> = committed_a
        .iter()
        .chain(&committed_b)
        .filter(|v| !values.contains(*v))
        .collect();
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(values.len(), committed, "something rolled back arrived");
    // Source a is ordered: per key (one partition each), the first arrival of each message
    // in id order. Its ids are the second part of the message-id header.
    let mut firsts: HashSet<&str> = HashSet::new();
    let mut last_id: HashMap<(i32, &str), i64> = HashMap::new();
    let mut violations = Vec::new();
    for r in &records {
        if !r.value.starts_with(b"a-") || !firsts.insert(r.id()) {
            continue;
        }
        let id: i64 = r.id().rsplit(':').next().unwrap().parse().unwrap();
        if let Some(previous) = last_id.insert((r.partition, r.key.as_str()), id) {
            if previous > id {
                violations.push(format!("key {}: {id} after {previous}", r.key));
            }
        }
    }
    assert!(violations.is_empty(), "{violations:?}");
    println!(
        "FIGURES relay service to tansu: {} + {} committed, {kills} kills, {} left for the last run, {} records ({} duplicates), 0 lost, 0 order violations",
        committed_a.len(),
        committed_b.len(),
        left_for_the_last_run,
        records.len(),
        records.len() - committed
    );
}

#[test]
fn a_broker_that_is_not_there_at_start_is_one_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = config_file(
        "kafka_unreachable",
        &format!(
            "[sink.kafka]
             brokers = \"127.0.0.1:{port}\"
             topic = \"t\"
             [[source]]
             name = \"a\"
             database_url = \"host=127.0.0.1 dbname=x\""
        ),
    );
    let mut service = Service::start(&config, &[]);
    let status = service.wait(PATIENCE).expect("exits");
    let log = service.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("the sink's broker cannot be reached")
            && log.contains(&format!("127.0.0.1:{port}")),
        "{log}"
    );
    assert_eq!(log.lines().count(), 1, "{log}");
}
