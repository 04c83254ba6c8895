//! The Kafka Sender against a real Kafka-protocol broker and against librdkafka's mock
//! cluster (`cargo test --features kafka --test kafka`).
//!
//! The real broker is a private `tansu` on free loopback ports (see `common/tansu.rs`),
//! reached through a gate that can cut every connection and refuse new ones while the broker
//! keeps its data; what arrived is read back with a real librdkafka consumer. Faults tansu
//! cannot play (a request refused by the broker, a slow broker) come from
//! `rdkafka::mocking::MockCluster`, which needs no broker installed.

mod common;
#[path = "common/kafka_records.rs"]
mod kafka_records;
#[path = "common/tansu.rs"]
mod tansu;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use troutbox::kafka::{KafkaSender, KafkaSenderError};
use troutbox::{Backoff, Batch, Message, NewMessage, Outbox, PgStore, Sender, Status};

use common::{count, eventually, pool, store, PATIENCE};
use kafka_records::{consume, read_all, Record};
use tansu::TempTansu;

fn broker() -> TempTansu {
    TempTansu::start().unwrap_or_else(|e| panic!("{e}"))
}

/// Per key, whether the first deliveries of its messages are in `seq` order within one
/// partition; returns the number of order violations and the keys found in two partitions.
fn order_violations(records: &[Record]) -> (usize, usize) {
    let mut by_partition: HashMap<i32, Vec<&Record>> = HashMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let mut partitions_of_key: HashMap<&str, std::collections::HashSet<i32>> = HashMap::new();
    let mut violations = 0;
    for list in by_partition.values_mut() {
        list.sort_by_key(|r| r.offset);
        let mut seen = std::collections::HashSet::new();
        let mut last_seq: HashMap<&str, usize> = HashMap::new();
        for r in list.iter() {
            partitions_of_key
                .entry(r.key.as_str())
                .or_default()
                .insert(r.partition);
            if !seen.insert(r.id()) {
                continue; // a duplicate: only first deliveries count
            }
            let seq: usize = r.header("seq").unwrap().parse().unwrap();
            if let Some(&prev) = last_seq.get(r.key.as_str()) {
                if seq < prev {
                    violations += 1;
                }
            }
            last_seq.insert(&r.key, seq);
        }
    }
    let split = partitions_of_key.values().filter(|p| p.len() > 1).count();
    (violations, split)
}

/// The acceptance test: 10,000 messages committed through an outbox with per-key
/// ordering, relayed by 2 workers, while the broker becomes unreachable twice (every
/// connection cut, new ones refused) and is frozen once (SIGSTOP: requests accepted, never
/// answered). All must arrive; after deduplication on message-id each exactly once; the first
/// deliveries of each key in commit order within one partition.
#[test]
fn ten_thousand_messages_survive_broker_outages_in_key_order() {
    const TOTAL: usize = 10_000;
    const PER_TX: usize = 100;
    const KEYS: usize = 40;
    const TOPIC: &str = "orders";
    const PARTITIONS: i32 = 4;
    const BATCH: usize = 250;
    let started = Instant::now();
    let tansu = broker();
    tansu.create_topic(TOPIC, PARTITIONS as u32).unwrap();

    let pool = pool(8);
    let store: PgStore = store("kafka_outages", &pool);
    let failed_batches = Arc::new(AtomicUsize::new(0));
    let outbox = Outbox::builder(store)
        .per_key_ordering(true)
        .batch_size(BATCH)
        .workers(2)
        .max_retries(10_000)
        .backoff(Backoff::exponential(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ))
        .send_timeout(Duration::from_secs(15))
        .error_handler({
            let failures = failed_batches.clone();
            move |_| {
                failures.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    outbox.migrate().unwrap(); // makes the table ordered
    let (received, stop_consumer, consumer) = consume(&tansu.bootstrap(), TOPIC, PARTITIONS);
    let sender = KafkaSender::builder(tansu.bootstrap())
        .topic(TOPIC)
        .delivery_timeout(Duration::from_secs(3))
        .set("reconnect.backoff.max.ms", "200")
        .build()
        .unwrap();
    let mut relay = outbox.start(sender).unwrap();

    let producer = {
        let (outbox, pool) = (outbox.clone(), pool.clone());
        std::thread::spawn(move || {
            let mut conn = pool.get().unwrap();
            for start in (0..TOTAL).step_by(PER_TX) {
                let seqs: Vec<String> = (start..start + PER_TX).map(|i| i.to_string()).collect();
                let keys: Vec<String> = (start..start + PER_TX)
                    .map(|i| format!("customer-{}", i % KEYS))
                    .collect();
                let bodies: Vec<String> = seqs.iter().map(|s| format!("order {s}")).collect();
                let mut tx = conn.transaction().unwrap();
                let messages = (0..PER_TX).map(|i| {
                    NewMessage::new(&keys[i], bodies[i].as_bytes()).header("seq", &seqs[i])
                });
                outbox.add_messages(&mut tx, messages).unwrap();
                tx.commit().unwrap();
                // Spread over about 30 s, so that every fault below strikes while messages
                // are being committed and relayed.
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };

    // Mid-run, each until it fails a batch: unreachable after 15 % arrived, frozen after
    // 40 %, unreachable again after 65 %.
    let mut faults = Vec::new();
    for (threshold, how) in [
        (TOTAL * 15 / 100, "unreachable"),
        (TOTAL * 40 / 100, "frozen"),
        (TOTAL * 65 / 100, "unreachable"),
    ] {
        assert!(
            received.wait_for(threshold, Duration::from_secs(180)),
            "only {} of {threshold} messages arrived before the fault",
            received.distinct()
        );
        let seen = received.distinct();
        let errors_before = failed_batches.load(Ordering::SeqCst);
        match how {
            "frozen" => tansu.pause(),
            _ => tansu.gate().down(),
        }
        // The fault lasts until it has failed a batch in flight (not vacuous), at least 2 s.
        let began = Instant::now();
        let hit = eventually(Duration::from_secs(60), || {
            failed_batches.load(Ordering::SeqCst) > errors_before
                && began.elapsed() >= Duration::from_secs(2)
        });
        let lasted = began.elapsed();
        match how {
            "frozen" => tansu.resume(),
            _ => tansu.gate().up().unwrap(),
        }
        assert!(hit, "the {how} broker failed no batch in 60 s");
        let errors_during = failed_batches.load(Ordering::SeqCst) - errors_before;
        faults.push(format!(
            "{how} {lasted:.1?} after {seen} delivered ({errors_during} relay errors during it)"
        ));
    }
    producer.join().unwrap();

    let table = "kafka_outages.outbox_messages";
    assert!(
        eventually(Duration::from_secs(180), || count(
            &pool,
            &format!("SELECT count(*) FROM {table}")
        ) == 0),
        "the outbox did not drain: {} left",
        count(&pool, &format!("SELECT count(*) FROM {table}"))
    );
    relay.shutdown().unwrap();
    // Late copies of timed-out batches may still land: give them a moment, so the
    // duplicate count is final.
    std::thread::sleep(Duration::from_secs(2));
    stop_consumer.store(true, Ordering::SeqCst);
    consumer.join().unwrap();

    // What the topic holds, read afresh from the beginning (the consumer above only paces
    // the faults).
    let records = read_all(&tansu.bootstrap(), TOPIC, PARTITIONS, TOTAL);
    let mut by_id: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in &records {
        by_id.entry(r.id()).or_default().push(r);
    }
    assert_eq!(by_id.len(), TOTAL, "distinct message-ids");
    let mut seqs = vec![false; TOTAL];
    for (id, copies) in &by_id {
        assert!(
            id.rsplit_once(':')
                .is_some_and(|(outbox, id)| outbox.len() == 36 && id.parse::<i64>().is_ok()),
            "message-id {id:?} is not a dedup key (<outbox id>:<id>)"
        );
        let seq: usize = copies[0].header("seq").unwrap().parse().unwrap();
        assert_eq!(copies[0].value, format!("order {seq}").as_bytes());
        assert_eq!(copies[0].key, format!("customer-{}", seq % KEYS));
        assert!(!seqs[seq], "two message-ids carry seq {seq}");
        seqs[seq] = true;
    }
    assert!(seqs.iter().all(|&s| s));
    let duplicates = records.len() - TOTAL;
    let (violations, split) = order_violations(&records);
    assert_eq!(split, 0, "a key's messages went to two partitions");
    assert_eq!(violations, 0, "first deliveries out of key order");
    let failed = failed_batches.load(Ordering::SeqCst);
    // Duplicates come only from batches whose reports were lost in a fault: at most one
    // batch per failed send.
    assert!(
        duplicates <= failed * BATCH,
        "{duplicates} duplicates, more than {failed} failed batches of {BATCH} could cause"
    );
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {table} WHERE state = 'dead'")
        ),
        0
    );
    eprintln!(
        "FIGURES kafka outages: {TOTAL} committed over {KEYS} keys, {} delivered distinct, {duplicates} duplicates, 0 order violations, {failed} relay errors, faults: {}; {} consumer errors; {:.1?} in all",
        by_id.len(),
        faults.join("; "),
        received.errors.load(Ordering::SeqCst),
        started.elapsed()
    );
}

/// A real restart of the broker process (SIGKILL, then started again). The installed tansu
/// keeps its data in memory, so the restarted broker has lost every message and every
/// producer id: what can be checked is that the sender notices (its idempotent producer is
/// unknown now, or its connection dead), replaces what it must, and delivers everything
/// committed after the restart, with nothing left in the outbox.
#[test]
fn after_a_real_broker_restart_the_sender_recovers() {
    const N: usize = 100;
    let mut tansu = broker();
    tansu.create_topic("restarted", 2).unwrap();
    let pool = pool(4);
    let store: PgStore = store("kafka_restart", &pool);
    let table = "kafka_restart.outbox_messages";
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let outbox = Outbox::builder(store)
        .max_retries(1_000)
        .backoff(Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_millis(300),
        ))
        .error_handler({
            let errors = errors.clone();
            move |e| errors.lock().unwrap().push(with_causes(e))
        })
        .build()
        .unwrap();
    let sender = KafkaSender::builder(tansu.bootstrap())
        .topic("restarted")
        .delivery_timeout(Duration::from_secs(2))
        .set("reconnect.backoff.max.ms", "200")
        .build()
        .unwrap();
    let mut relay = outbox.start(sender).unwrap();
    let mut conn = pool.get().unwrap();
    let add = |conn: &mut postgres::Client, from: usize| {
        for i in from..from + N {
            outbox
                .add_message(conn, &format!("k{}", i % 7), format!("{i}").as_bytes())
                .unwrap();
        }
    };
    add(&mut conn, 0);
    let (before, stop, consumer) = consume(&tansu.bootstrap(), "restarted", 2);
    assert!(before.wait_for(N, PATIENCE));
    stop.store(true, Ordering::SeqCst);
    consumer.join().unwrap();

    tansu.kill().unwrap();
    tansu.start_again().unwrap();
    tansu.create_topic("restarted", 2).unwrap();
    let restarted = Instant::now();
    add(&mut conn, N);
    assert!(
        eventually(Duration::from_secs(60), || count(
            &pool,
            &format!("SELECT count(*) FROM {table}")
        ) == 0),
        "the outbox did not drain after the restart: {:?}",
        errors.lock().unwrap()
    );
    let drained = restarted.elapsed();
    relay.shutdown().unwrap();
    let records = read_all(&tansu.bootstrap(), "restarted", 2, N);
    let values: std::collections::HashSet<Vec<u8>> =
        records.iter().map(|r| r.value.clone()).collect();
    for i in N..2 * N {
        assert!(
            values.contains(format!("{i}").as_bytes()),
            "message {i} missing"
        );
    }
    let errors = errors.lock().unwrap();
    eprintln!(
        "FIGURES kafka real restart: {N} messages after the restart all delivered, outbox drained {drained:.1?} after the broker was back; {} relay errors: {:?}",
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>()
    );
}

/// The broker unreachable for longer than the send timeout: every attempt fails within the
/// delivery timeout (the relay keeps its claim), the messages are retried, then delivered
/// once the broker is back.
#[test]
fn an_unreachable_broker_is_retried_then_delivered() {
    const N: usize = 50;
    let tansu = broker();
    tansu.create_topic("retried", 1).unwrap();
    let pool = pool(4);
    let store: PgStore = store("kafka_unreachable", &pool);
    let table = "kafka_unreachable.outbox_messages";
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let send_timeout = Duration::from_secs(2);
    let outbox = Outbox::builder(store)
        .max_retries(1_000)
        .backoff(Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ))
        .send_timeout(send_timeout)
        .error_handler({
            let errors = errors.clone();
            move |e| errors.lock().unwrap().push(with_causes(e))
        })
        .build()
        .unwrap();
    tansu.gate().down();
    let mut conn = pool.get().unwrap();
    for i in 0..N {
        outbox
            .add_message(&mut *conn, "k", format!("{i}").as_bytes())
            .unwrap();
    }
    let sender = KafkaSender::builder(tansu.bootstrap())
        .topic("retried")
        .delivery_timeout(Duration::from_millis(800))
        .set("reconnect.backoff.max.ms", "200")
        .build()
        .unwrap();
    let down = Instant::now();
    let mut relay = outbox.start(sender).unwrap();
    // Every message fails at least twice while the broker is away (bounded: PATIENCE).
    let failed_twice = eventually(PATIENCE, || {
        count(&pool, &format!("SELECT min(attempts)::int8 FROM {table}")) >= 2
    });
    let away = down.elapsed();
    let attempts: i64 = count(&pool, &format!("SELECT min(attempts)::int8 FROM {table}"));
    let pending = count(&pool, &format!("SELECT count(*) FROM {table}"));
    let last_error: String = conn
        .query_one(&format!("SELECT last_error FROM {table} LIMIT 1"), &[])
        .unwrap()
        .get(0);
    tansu.gate().up().unwrap();
    let (received, stop, consumer) = consume(&tansu.bootstrap(), "retried", 1);
    assert!(
        received.wait_for(N, PATIENCE),
        "not delivered after the broker returned"
    );
    let back = down.elapsed();
    assert!(eventually(PATIENCE, || count(
        &pool,
        &format!("SELECT count(*) FROM {table}")
    ) == 0));
    relay.shutdown().unwrap();
    stop.store(true, Ordering::SeqCst);
    consumer.join().unwrap();
    let errors = errors.lock().unwrap();
    assert_eq!(
        pending, N as i64,
        "a message left the outbox while the broker was away"
    );
    assert!(failed_twice, "{attempts} attempts in {away:?}");
    assert!(
        last_error.contains("delivery timeout") || last_error.contains("no delivery report"),
        "{last_error}"
    );
    assert!(
        errors.iter().any(|e| e.contains("did not arrive")),
        "{errors:?}"
    );
    let timeouts_past_send_timeout = errors.iter().filter(|e| e.contains("send timeout")).count();
    assert_eq!(timeouts_past_send_timeout, 0, "{errors:?}");
    eprintln!(
        "FIGURES kafka unreachable: {N} messages, broker away {:.1?} (send_timeout {send_timeout:?}, delivery_timeout 800ms), at least {attempts} attempts each meanwhile, 0 left the outbox, all {N} delivered {:.1?} after it went away; last_error meanwhile: {last_error:?}; first relay error: {:?}",
        away,
        back,
        errors.first()
    );
}

/// What one message looks like on the wire (key, value, headers, timestamp, message-id,
/// topic by route), and the ways a message is refused: over the size limit, routed nowhere.
#[test]
fn mapping_routing_and_an_oversized_message() {
    let tansu = broker();
    tansu.create_topic("mapped", 2).unwrap();
    tansu.create_topic("other", 1).unwrap();
    let pool = pool(4);
    let store: PgStore = store("kafka_mapping", &pool);
    let table = "kafka_mapping.outbox_messages";
    let outbox = Outbox::builder(store)
        .max_retries(0) // a refused message is dead at once, with the reason kept
        .max_value_size(1024 * 1024)
        .error_handler(|_| {})
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    outbox
        .add(
            &mut tx,
            &NewMessage::new("order-42", b"payload")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .header("tag", "a")
                .header("tag", "b")
                .header("message-id", "forged")
                .header("topic", "mapped"),
        )
        .unwrap();
    outbox
        .add(
            &mut tx,
            &NewMessage::new("k", b"to other").header("topic", "other"),
        )
        .unwrap();
    outbox.add_message(&mut tx, "k", b"nowhere").unwrap();
    outbox
        .add(
            &mut tx,
            &NewMessage::new("k", &vec![b'x'; 20_000]).header("topic", "mapped"),
        )
        .unwrap();
    for i in 0..5 {
        outbox
            .add(
                &mut tx,
                &NewMessage::new("small", format!("{i}").as_bytes()).header("topic", "mapped"),
            )
            .unwrap();
    }
    tx.commit().unwrap();
    let rows: Vec<(i64, time::OffsetDateTime)> = conn
        .query(
            &format!("SELECT id, created_at FROM {table} ORDER BY id"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let (received, stop, consumer) = consume(&tansu.bootstrap(), "mapped", 2);
    let (other, stop_other, consumer_other) = consume(&tansu.bootstrap(), "other", 1);
    let sender = KafkaSender::builder(tansu.bootstrap())
        .route(|msg: &Message| msg.header("topic").map(str::to_owned))
        // The producer's own limit: tansu enforces none.
        .set("message.max.bytes", "10000")
        .build()
        .unwrap();
    let mut relay = outbox.start(sender).unwrap();
    assert!(received.wait_for(6, PATIENCE));
    assert!(other.wait_for(1, PATIENCE));
    assert!(eventually(PATIENCE, || count(
        &pool,
        &format!("SELECT count(*) FROM {table} WHERE state = 'dead'")
    ) == 2));
    relay.shutdown().unwrap();
    stop.store(true, Ordering::SeqCst);
    stop_other.store(true, Ordering::SeqCst);
    consumer.join().unwrap();
    consumer_other.join().unwrap();

    let records = received.snapshot();
    let first = records
        .iter()
        .find(|r| r.value == b"payload")
        .expect("the mapped message");
    assert_eq!(first.key, "order-42");
    assert!(
        first.id().ends_with(&format!(":{}", rows[0].0)),
        "{first:?}"
    );
    let names: Vec<&str> = first.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["message-id", "traceparent", "tag", "tag", "topic"],
        "the forged message-id is left out, the rest kept in order"
    );
    assert_eq!(
        first.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    let tags: Vec<&str> = first
        .headers
        .iter()
        .filter(|(n, _)| n == "tag")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(tags, ["a", "b"]);
    let created_ms = (rows[0].1.unix_timestamp_nanos() / 1_000_000) as i64;
    assert_eq!(first.timestamp, Some(created_ms));
    // One key, one partition, in order.
    let small: Vec<&Record> = records.iter().filter(|r| r.key == "small").collect();
    assert_eq!(small.len(), 5);
    assert!(small.iter().all(|r| r.partition == small[0].partition));
    let values: Vec<&[u8]> = small.iter().map(|r| r.value.as_slice()).collect();
    assert_eq!(values, [b"0", b"1", b"2", b"3", b"4"]);
    assert_eq!(other.snapshot()[0].value, b"to other");

    let errors: HashMap<i64, String> = conn
        .query(
            &format!("SELECT id, last_error FROM {table} WHERE state = 'dead'"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(errors[&rows[2].0].contains("routed nowhere"), "{errors:?}");
    assert!(
        errors[&rows[3].0].contains("too large"),
        "{:?}",
        errors[&rows[3].0]
    );
    eprintln!(
        "FIGURES kafka mapping: oversized message dead with {:?}; unrouted with {:?}",
        errors[&rows[3].0], errors[&rows[2].0]
    );
}

// ---- librdkafka's mock cluster: no broker installed needed ----

fn mock_sender(cluster: &MockCluster<'_, impl rdkafka::ClientContext>, topic: &str) -> KafkaSender {
    KafkaSender::builder(cluster.bootstrap_servers())
        .topic(topic)
        .delivery_timeout(Duration::from_secs(5))
        .set("retry.backoff.ms", "10")
        .build()
        .unwrap()
}

fn batch(n: i64, key: &str) -> Batch {
    Batch::for_test((1..=n).map(|i| Message::for_test(i, key, format!("{i}").as_bytes())))
}

fn statuses(batch: &Batch) -> Vec<Status> {
    batch.iter().map(|m| m.status().clone()).collect()
}

/// Retriable broker errors (not enough replicas, a dropped connection) are retried by
/// librdkafka inside the delivery timeout: every message ends sent, none failed.
#[test]
fn mock_retriable_request_errors_are_retried_inside_the_batch() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 2, 1).unwrap();
    let mut sender = mock_sender(&cluster, "t");
    let mut warmup = batch(1, "w");
    sender.send(&mut warmup).unwrap();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    let mut b = batch(20, "k");
    sender.send(&mut b).unwrap();
    assert!(
        statuses(&b).iter().all(|s| *s == Status::Sent),
        "{:?}",
        statuses(&b)
    );
}

/// A batch leaves as soon as it is enqueued, whatever `linger.ms`: the sender flushes it
/// (one request per partition leader, instead of the first messages alone while the rest are
/// enqueued). With a linger of 10 s, a batch waiting it out would take 10 s.
#[test]
fn a_batch_is_sent_at_once_whatever_the_linger() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 2, 1).unwrap();
    let mut sender = KafkaSender::builder(cluster.bootstrap_servers())
        .topic("t")
        .delivery_timeout(Duration::from_secs(30))
        .set("linger.ms", "10000")
        .build()
        .unwrap();
    for round in 0..3 {
        let mut b = batch(50, &format!("k{round}"));
        let started = std::time::Instant::now();
        sender.send(&mut b).unwrap();
        let took = started.elapsed();
        assert!(
            statuses(&b).iter().all(|s| *s == Status::Sent),
            "{:?}",
            statuses(&b)
        );
        // The first batch also connects and fetches metadata (milliseconds here).
        assert!(
            took < Duration::from_secs(5),
            "batch {round} took {took:?}: it waited for the linger"
        );
    }
}

/// A broker that refuses a produce request for good: its messages are failed with the
/// broker's reason; the next batch goes through.
#[test]
fn mock_a_refused_request_fails_its_messages_with_the_brokers_reason() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    let mut sender = mock_sender(&cluster, "t");
    let mut warmup = batch(1, "w");
    sender.send(&mut warmup).unwrap();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    // One message: one produce request, the one the cluster refuses (with linger.ms=0 a
    // batch of several may go out in several requests, and only the first is refused).
    let mut refused = batch(1, "k");
    // Per-message refusals are marks, not a batch error.
    sender.send(&mut refused).unwrap();
    for status in statuses(&refused) {
        match status {
            Status::Failed(reason) => assert!(reason.contains("too large"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    let mut next = batch(3, "k");
    sender.send(&mut next).unwrap();
    assert!(statuses(&next).iter().all(|s| *s == Status::Sent));
}

/// A broker that is down: the batch fails within the delivery timeout, every message marked
/// failed, the error naming the client's last error; once the broker is up the same sender
/// delivers.
#[test]
fn mock_a_broker_down_fails_the_batch_within_the_delivery_timeout() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    let mut sender = KafkaSender::builder(cluster.bootstrap_servers())
        .topic("t")
        .delivery_timeout(Duration::from_millis(1500))
        .set("reconnect.backoff.max.ms", "100")
        .build()
        .unwrap();
    let mut warmup = batch(1, "w");
    sender.send(&mut warmup).unwrap();
    cluster.broker_down(-1).unwrap();
    let mut b = batch(10, "k");
    let started = Instant::now();
    let result = sender.send(&mut b);
    let took = started.elapsed();
    let err = result.unwrap_err();
    // Bounded by the delivery timeout (1.5 s), not by the sender's default (10 s) nor the
    // client's (5 minutes): 6 s tells them apart and leaves a loaded 2-core machine room;
    // the figure is printed.
    eprintln!("kafka broker down: the batch failed after {took:?} (delivery timeout 1.5 s)");
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(
        matches!(err, KafkaSenderError::DeliveryTimeout { .. }),
        "{err}"
    );
    for status in statuses(&b) {
        assert!(matches!(status, Status::Failed(_)), "{status:?}");
    }
    cluster.broker_up(-1).unwrap();
    let mut again = batch(10, "k");
    assert!(eventually(Duration::from_secs(20), || {
        again = batch(10, "k");
        sender.send(&mut again).is_ok()
    }));
    assert!(statuses(&again).iter().all(|s| *s == Status::Sent));
    eprintln!("FIGURES kafka mock broker down: batch of 10 failed after {took:?}: {err}");
}

/// A broker slower than the delivery timeout: the first batch's reports come late, after
/// the batch was settled as failed. They must not be taken for the next batch's messages.
#[test]
fn mock_late_reports_of_an_earlier_batch_are_ignored() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    let mut sender = KafkaSender::builder(cluster.bootstrap_servers())
        .topic("t")
        .delivery_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    // Connecting and the first metadata may take longer than 300 ms on a loaded machine.
    assert!(eventually(Duration::from_secs(20), || sender
        .send(&mut batch(1, "w"))
        .is_ok()));
    cluster
        .broker_round_trip_time(-1, Duration::from_millis(1500))
        .unwrap();
    let mut slow = batch(5, "k");
    assert!(sender.send(&mut slow).is_err());
    assert!(statuses(&slow)
        .iter()
        .all(|s| matches!(s, Status::Failed(_))));
    cluster
        .broker_round_trip_time(-1, Duration::from_millis(0))
        .unwrap();
    // Later batches of the same producer (same tags counter) go on until the five late
    // reports of the first batch have arrived and been ignored. Were one taken for a later
    // batch's message, it would not be counted as ignored, and this would time out.
    let mut sender_next = sender;
    let late_before = late_reports_ignored();
    let mut next = Batch::for_test((1..=5).map(|i| Message::for_test(i, "k", b"next")));
    let mut result = Ok(());
    assert!(
        eventually(Duration::from_secs(20), || {
            next = Batch::for_test((1..=5).map(|i| Message::for_test(i, "k", b"next")));
            result = sender_next.send(&mut next).map_err(|e| e.to_string());
            result.is_ok() && late_reports_ignored() - late_before >= 5
        }),
        "{} late reports ignored of 5 (the last send: {result:?})",
        late_reports_ignored() - late_before
    );
    assert!(statuses(&next).iter().all(|s| *s == Status::Sent));
}

/// How many late delivery reports the KafkaSenders of this process have ignored, as they
/// log them (at debug level, counted by a logger of this test binary).
fn late_reports_ignored() -> usize {
    static IGNORED: AtomicUsize = AtomicUsize::new(0);
    struct Counter;
    impl log::Log for Counter {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            if record
                .args()
                .to_string()
                .starts_with("ignoring a late Kafka delivery report")
            {
                IGNORED.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn flush(&self) {}
    }
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        static COUNTER: Counter = Counter;
        if log::set_logger(&COUNTER).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
    });
    IGNORED.load(Ordering::SeqCst)
}

#[test]
fn guarantee_breaking_properties_are_refused() {
    for (name, value) in [
        ("enable.idempotence", "false"),
        ("acks", "1"),
        ("request.required.acks", "0"),
        ("max.in.flight.requests.per.connection", "6"),
        ("max.in.flight", "100"),
        ("retries", "0"),
        ("delivery.report.only.error", "true"),
        ("queuing.strategy", "lifo"),
        ("transactional.id", "t"),
        ("bootstrap.servers", "elsewhere:9092"),
        ("no.such.property", "1"),
        ("linger.ms", "soon"),
    ] {
        let err = KafkaSender::builder("localhost:9092")
            .topic("t")
            .set(name, value)
            .build()
            .unwrap_err();
        assert!(
            matches!(&err, KafkaSenderError::InvalidConfig { option, .. } if option == name),
            "{name}={value}: {err}"
        );
    }
    for (name, value) in [
        ("acks", "all"),
        ("acks", "-1"),
        ("max.in.flight", "1"),
        ("enable.idempotence", "true"),
        ("linger.ms", "20"),
        ("compression.type", "gzip"),
        ("partitioner", "murmur2_random"),
    ] {
        let built = KafkaSender::builder("localhost:9092")
            .topic("t")
            .set(name, value)
            .build();
        assert!(built.is_ok(), "{name}={value}: {:?}", built.err());
    }
}

/// An error and its causes on one line: troutbox's errors keep their cause in `source`.
fn with_causes(e: &troutbox::Error) -> String {
    let mut text = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}
