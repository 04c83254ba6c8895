//! End to end through Kafka (a private tansu broker): outbox -> relay -> Kafka -> consumer
//! -> inbox, with the relay and the consumer SIGKILLed again and again; every committed
//! message must be applied exactly once (`cargo test --features kafka --test
//! inbox_e2e_kafka -- --nocapture` prints the figures). See `common/e2e.rs`.

mod common;
#[path = "common/e2e.rs"]
mod e2e;
#[path = "common/tansu.rs"]
mod tansu;

use std::time::Duration;

use e2e::StopAt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use troutbox::kafka::KafkaSender;
use troutbox::Received;

const TOPIC: &str = "troutbox.inbox-e2e";
const PARTITIONS: i32 = 3;
const ENTRY: &str = "e2e_child";

fn sender(brokers: &str) -> KafkaSender {
    KafkaSender::builder(brokers)
        .topic(TOPIC)
        // tansu (in memory) cannot serve a fetch that starts inside a record batch: one
        // record per batch, so that a consumer resumes at any committed offset.
        .set("batch.num.messages", "1")
        .delivery_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Consumes the topic as the group from its committed offsets, applying each record
/// through the inbox and committing its offset after the database commit, until `done`.
/// Returns the duplicates the inbox absorbed.
fn consume(
    brokers: &str,
    schema: &str,
    stop: Option<(usize, StopAt)>,
    done: &dyn Fn() -> bool,
) -> usize {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| common::url());
    let pool = e2e::pool_for(&url, 2);
    let inbox = e2e::inbox(&pool, schema);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "troutbox-inbox-e2e")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset(TOPIC, partition, Offset::Stored)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let (mut handled, mut duplicates) = (0, 0);
    while !done() {
        let Some(record) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let Ok(record) = record else { continue };
        let id = troutbox::inbox::kafka::message_id(&record)
            .unwrap()
            .to_owned();
        let n: i64 = std::str::from_utf8(record.payload().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        handled += 1;
        if e2e::apply(&pool, &inbox, schema, &id, n, handled, stop) == Received::Duplicate {
            duplicates += 1;
        }
        consumer.commit_message(&record, CommitMode::Sync).unwrap();
    }
    duplicates
}

#[test]
#[ignore = "entry point of the child processes of kafka_exactly_once_through_relay_and_consumer_kills"]
fn e2e_child() {
    let role = std::env::var(e2e::ROLE).expect("a child process of the end-to-end test");
    let schema = std::env::var(e2e::SCHEMA).unwrap();
    let brokers = std::env::var(e2e::BROKER).unwrap();
    match role.as_str() {
        "relay" => {
            let url = std::env::var("DATABASE_URL").unwrap();
            let pool = e2e::pool_for(&url, 3);
            let _relay = e2e::outbox(&pool, &schema).start(sender(&brokers)).unwrap();
            e2e::announce(e2e::READY);
            loop {
                std::thread::park(); // until the parent's SIGKILL
            }
        }
        _ => {
            consume(&brokers, &schema, e2e::stop_point(), &|| false);
        }
    }
}

#[test]
fn kafka_exactly_once_through_relay_and_consumer_kills() {
    const SCHEMA: &str = "inbox_e2e_kafka";
    const MESSAGES: i64 = 300;
    const MIN_KILLS: usize = 6;
    let broker = tansu::TempTansu::start().unwrap_or_else(|e| panic!("{e}"));
    broker.create_topic(TOPIC, PARTITIONS as u32).unwrap();
    let brokers = broker.bootstrap();
    let url = common::url();
    let env = vec![
        ("DATABASE_URL", url.clone()),
        (e2e::SCHEMA, SCHEMA.to_owned()),
        (e2e::BROKER, brokers.clone()),
    ];
    e2e::exactly_once_through_kills(
        "inbox_e2e_kafka",
        ENTRY,
        env,
        &url,
        SCHEMA,
        MESSAGES,
        MIN_KILLS,
        |outbox| outbox.start(sender(&brokers)).unwrap(),
        |done| consume(&brokers, SCHEMA, None, done),
    );
}
