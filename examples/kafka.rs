//! Relay an outbox to Kafka through an idempotent producer, then read the messages back.
//!
//! Run with `cargo run --example kafka --features kafka`.
//!
//! - PostgreSQL: `DATABASE_URL`, or a throw-away server from the system's binaries.
//! - Kafka: `KAFKA_BROKERS` (for example `localhost:9092`; the topic `troutbox.orders` must
//!   exist there, or the broker must create topics on first use), or a throw-away
//!   [tansu](https://crates.io/crates/tansu) broker on a free loopback port (install it with
//!   `cargo install tansu --locked --features dynostore`).
//!
//! It commits five orders with their messages (two of them for the same customer, so they
//! share a key and a partition), relays them with [`KafkaSender`], and consumes them back
//! with a plain librdkafka consumer, deduplicating on the `message-id` header as a real
//! consumer should.

#[path = "../tests/common/tansu.rs"]
mod tansu;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use r2d2_postgres::PostgresConnectionManager;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use troutbox::kafka::KafkaSender;
use troutbox::{NewMessage, Outbox, PgStore};

const TOPIC: &str = "troutbox.orders";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A broker of your own, or a private one that lives as long as this program.
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

    // The consumer starts where the topic ends now, so that a broker of your own shows
    // exactly this run's messages.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "troutbox-example")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(TOPIC), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!("topic {TOPIC} has no partitions: create it first").into());
    }
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let (_, high) = consumer.fetch_watermarks(TOPIC, partition, Duration::from_secs(10))?;
        assignment.add_partition_offset(TOPIC, partition, Offset::Offset(high))?;
    }
    consumer.assign(&assignment)?;

    // The outbox, next to the business table.
    let pool = r2d2::Pool::new(PostgresConnectionManager::new(
        troutbox::testing::database_url()?.parse()?,
        postgres::NoTls,
    ))?;
    let store = PgStore::new(pool.clone()).schema("kafka_example");
    store.migrate()?;
    let mut conn = pool.get()?;
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS kafka_example.orders (id bigint PRIMARY KEY, customer text);
         TRUNCATE kafka_example.orders",
    )?;
    let outbox = Outbox::builder(store).build()?;

    const ORDERS: i64 = 5;
    for id in 1..=ORDERS {
        let customer = format!("customer-{}", id.min(4)); // orders 4 and 5: one customer
        let mut tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO kafka_example.orders (id, customer) VALUES ($1, $2)",
            &[&id, &customer],
        )?;
        let body = format!("{{\"order\":{id}}}");
        let order = id.to_string();
        // The key picks the partition: one customer's orders stay in order.
        let message = NewMessage::new(&customer, body.as_bytes()).header("order-id", &order);
        outbox.add(&mut tx, &message)?;
        tx.commit()?;
    }
    println!("committed {ORDERS} orders with their messages");

    // The relay: each worker enqueues a batch and marks a message sent only on its own
    // delivery report (acks=all, idempotent producer).
    let sender = KafkaSender::builder(brokers.as_str())
        .topic(TOPIC)
        .delivery_timeout(Duration::from_secs(10))
        .build()?;
    let mut relay = outbox.start(sender)?;

    // A consumer: at-least-once delivery means it keeps the ids it has processed and skips
    // repeats. (A real one stores them with its own effects, in the same transaction.)
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < ORDERS as usize {
        if Instant::now() > deadline {
            return Err(
                format!("only {} of {ORDERS} messages consumed in 60 s", seen.len()).into(),
            );
        }
        let Some(delivery) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let delivery = delivery?;
        let mut id = String::new();
        let mut order = String::new();
        if let Some(headers) = delivery.headers() {
            for header in headers.iter() {
                let value = String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned();
                match header.key {
                    "message-id" => id = value,
                    "order-id" => order = value,
                    _ => {}
                }
            }
        }
        let key = String::from_utf8_lossy(delivery.key().unwrap_or_default()).into_owned();
        if seen.insert(id.clone()) {
            println!(
                "consumed message-id={id} key={key} partition={} offset={} body={} order-id header={order}",
                delivery.partition(),
                delivery.offset(),
                String::from_utf8_lossy(delivery.payload().unwrap_or_default()),
            );
        } else {
            println!("skipped duplicate message-id={id}");
        }
    }
    relay.shutdown()?;

    let backlog = outbox.store().backlog()?;
    println!(
        "done: {ORDERS} committed, {} consumed, {} pending, {} dead",
        seen.len(),
        backlog.pending,
        backlog.dead
    );
    Ok(())
}
