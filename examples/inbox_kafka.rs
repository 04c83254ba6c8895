//! A synchronous Kafka consumer with an exactly-once effect: each record is applied in a
//! PostgreSQL transaction that also records its message id in the [`Inbox`], and its offset
//! is committed to Kafka only after that transaction committed.
//!
//! Run with `cargo run --example inbox_kafka --features kafka`.
//!
//! - PostgreSQL: `DATABASE_URL`, or a throw-away server from the system's binaries.
//! - Kafka: `KAFKA_BROKERS` (the topic `troutbox.payments` must exist there, or the broker
//!   must create topics on first use), or a throw-away [tansu](https://crates.io/crates/tansu)
//!   broker (`cargo install tansu --locked --features dynostore`).
//!
//! It commits six orders through the outbox, relays them to Kafka with [`KafkaSender`], and
//! consumes them with an rdkafka `BaseConsumer` (no async runtime). The first consumer
//! "crashes" right after the database commit of its fourth record, before committing that
//! record's offset: the next consumer of the group gets the record again, and the inbox
//! answers `Duplicate`, so the payment is applied once.

#[path = "../tests/common/tansu.rs"]
mod tansu;

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use troutbox::kafka::KafkaSender;
use troutbox::{Inbox, Outbox, PgPool, PgStore, Received};

const TOPIC: &str = "troutbox.payments";
const GROUP: &str = "troutbox-inbox-example";
const SCHEMA: &str = "inbox_kafka_example";
const ORDERS: i64 = 6;

/// A consumer of the group, on every partition of the topic, from the group's committed
/// offsets (the beginning when there are none).
fn consumer(brokers: &str) -> Result<BaseConsumer, Box<dyn std::error::Error>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", GROUP)
        // Offsets are committed by hand, after the database commit, never before.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(TOPIC), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    for topic in metadata.topics() {
        for partition in topic.partitions() {
            assignment.add_partition_offset(TOPIC, partition.id(), Offset::Stored)?;
        }
    }
    if assignment.count() == 0 {
        return Err(format!("topic {TOPIC} has no partitions: create it first").into());
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Applies one record exactly once: the inbox entry and the payment commit together.
fn apply(
    pool: &PgPool,
    inbox: &Inbox,
    record: &BorrowedMessage<'_>,
) -> Result<Received, Box<dyn std::error::Error>> {
    let message_id = troutbox::inbox::kafka::message_id(record)?;
    let order: i64 = std::str::from_utf8(record.payload().unwrap_or_default())?.parse()?;
    let mut conn = pool.get()?;
    let mut tx = conn.transaction()?;
    let received = inbox.receive(&mut tx, "payments", message_id)?;
    if received == Received::First {
        tx.execute(
            &format!(
                "INSERT INTO {SCHEMA}.payments (order_id, applied) VALUES ($1, 1)
                 ON CONFLICT (order_id) DO UPDATE SET applied = payments.applied + 1"
            ),
            &[&order],
        )?;
    }
    tx.commit()?;
    Ok(received)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (brokers, _private_broker) = match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) if !brokers.is_empty() => (brokers, None),
        _ => {
            let broker = tansu::TempTansu::start()?;
            broker.create_topic(TOPIC, 3)?;
            println!(
                "started a throw-away tansu broker at {}",
                broker.bootstrap()
            );
            (broker.bootstrap(), Some(broker))
        }
    };

    let pool = troutbox::pool(troutbox::testing::database_url()?.parse()?, 8)?;
    pool.get()?.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA};
         CREATE TABLE {SCHEMA}.payments (order_id bigint PRIMARY KEY, applied int NOT NULL)"
    ))?;

    // Producer side: orders committed with their messages, relayed to Kafka.
    let store = PgStore::new(pool.clone()).schema(SCHEMA);
    store.migrate()?;
    let outbox = Outbox::builder(store.clone()).build()?;
    for order in 1..=ORDERS {
        let mut conn = pool.get()?;
        let mut tx = conn.transaction()?;
        outbox.add_message(
            &mut tx,
            &format!("order-{order}"),
            order.to_string().as_bytes(),
        )?;
        tx.commit()?;
    }
    let mut sender = KafkaSender::builder(brokers.as_str()).topic(TOPIC);
    if _private_broker.is_some() {
        // tansu (in memory) cannot serve a fetch that starts inside a record batch: one
        // record per batch, so that a consumer can resume at any committed offset. A real
        // Kafka broker needs nothing of the kind.
        sender = sender.set("batch.num.messages", "1");
    }
    let sender = sender.build()?;
    let mut relay = outbox.start(sender)?;

    // Consumer side: the inbox, in the consumer's database.
    let inbox = Inbox::builder(pool.clone())
        .schema(SCHEMA)
        .window(Duration::from_secs(86_400))
        .build()?;
    inbox.migrate()?;
    let _maintenance = inbox.start_maintenance(Duration::from_secs(600))?;

    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut applied, mut duplicates) = (0, 0);
    for round in 1.. {
        // Each round is one consumer process; the first dies after 4 records.
        let consumer = consumer(&brokers)?;
        let mut handled = 0;
        // Until every order is applied and the crashed consumer's record came back.
        while applied < ORDERS || duplicates == 0 {
            if Instant::now() > deadline {
                return Err(format!("only {applied} of {ORDERS} orders applied in 60 s").into());
            }
            let Some(record) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let record = record?;
            let received = apply(&pool, &inbox, &record)?;
            handled += 1;
            match received {
                Received::First => applied += 1,
                Received::Duplicate => duplicates += 1,
            }
            println!(
                "consumer {round}: partition {} offset {}: {received:?}",
                record.partition(),
                record.offset()
            );
            if round == 1 && handled == 4 {
                println!("consumer {round}: crashes after its database commit, before committing the offset");
                break;
            }
            // Only now, after the database commit: the offset.
            consumer.commit_message(&record, CommitMode::Sync)?;
        }
        if applied == ORDERS && duplicates > 0 {
            break;
        }
    }
    relay.shutdown()?;

    let once: i64 = pool
        .get()?
        .query_one(
            &format!("SELECT count(*) FROM {SCHEMA}.payments WHERE applied = 1"),
            &[],
        )?
        .get(0);
    println!("done: {ORDERS} orders, {once} applied exactly once, {duplicates} duplicate(s) absorbed by the inbox");
    if once != ORDERS {
        return Err("an order was not applied exactly once".into());
    }
    Ok(())
}
