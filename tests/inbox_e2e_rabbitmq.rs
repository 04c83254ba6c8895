//! End to end through RabbitMQ (a private broker): outbox -> relay -> RabbitMQ -> consumer
//! (manual acks) -> inbox, with the relay and the consumer SIGKILLed again and again (the
//! consumer before its database commit, and between that commit and its ack); every
//! committed message must be applied exactly once (`cargo test --features rabbitmq --test
//! inbox_e2e_rabbitmq -- --nocapture` prints the figures). See `common/e2e.rs`.

mod common;
#[path = "common/e2e.rs"]
mod e2e;
#[path = "common/rabbit.rs"]
mod rabbit;

use std::time::Duration;

use common::PATIENCE;
use e2e::StopAt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use rabbit::{next, Amqp, TempRabbit};
use troutbox::rabbitmq::RabbitSender;
use troutbox::Received;

const EXCHANGE: &str = "troutbox.inbox-e2e";
const QUEUE: &str = "troutbox.inbox-e2e";
const ENTRY: &str = "e2e_child";

fn sender(url: &str) -> RabbitSender {
    RabbitSender::builder(url.to_owned())
        .exchange(EXCHANGE)
        .confirm_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// A durable exchange and queue, bound for every key the producers use (`k0` to `k6`).
fn declare(url: &str) {
    let amqp = Amqp::connect(url, PATIENCE).unwrap();
    let channel = &amqp.channel;
    amqp.block_on(channel.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    ))
    .unwrap();
    amqp.block_on(channel.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    ))
    .unwrap();
    for key in 0..7 {
        amqp.block_on(channel.queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            format!("k{key}").as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .unwrap();
    }
    amqp.close();
}

/// Consumes the queue with manual acks, applying each delivery through the inbox and
/// acknowledging it after the database commit, until `done`. Returns the duplicates the
/// inbox absorbed.
fn consume(
    url: &str,
    schema: &str,
    stop: Option<(usize, StopAt)>,
    done: &dyn Fn() -> bool,
) -> usize {
    let db = std::env::var("DATABASE_URL").unwrap_or_else(|_| common::url());
    let pool = e2e::pool_for(&db, 2);
    let inbox = e2e::inbox(&pool, schema);
    let amqp = Amqp::connect(url, PATIENCE).unwrap();
    amqp.block_on(amqp.channel.basic_qos(20, BasicQosOptions::default()))
        .unwrap();
    let mut consumer = amqp
        .block_on(amqp.channel.basic_consume(
            QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .unwrap();
    let (mut handled, mut duplicates) = (0, 0);
    while !done() {
        let waited = amqp.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), next(&mut consumer)).await
        });
        let delivery = match waited {
            Ok(Some(delivery)) => delivery.unwrap(),
            Ok(None) => panic!("the consumer was cancelled"),
            Err(_) => continue,
        };
        let id = troutbox::inbox::rabbitmq::message_id(&delivery)
            .unwrap()
            .to_owned();
        let n: i64 = std::str::from_utf8(&delivery.data)
            .unwrap()
            .parse()
            .unwrap();
        handled += 1;
        if e2e::apply(&pool, &inbox, schema, &id, n, handled, stop) == Received::Duplicate {
            duplicates += 1;
        }
        amqp.block_on(delivery.acker.ack(BasicAckOptions::default()))
            .unwrap();
    }
    amqp.close();
    duplicates
}

#[test]
#[ignore = "entry point of the child processes of rabbitmq_exactly_once_through_relay_and_consumer_kills"]
fn e2e_child() {
    let role = std::env::var(e2e::ROLE).expect("a child process of the end-to-end test");
    let schema = std::env::var(e2e::SCHEMA).unwrap();
    let url = std::env::var(e2e::BROKER).unwrap();
    match role.as_str() {
        "relay" => {
            let db = std::env::var("DATABASE_URL").unwrap();
            let pool = e2e::pool_for(&db, 3);
            let _relay = e2e::outbox(&pool, &schema).start(sender(&url)).unwrap();
            e2e::announce(e2e::READY);
            loop {
                std::thread::park(); // until the parent's SIGKILL
            }
        }
        _ => {
            consume(&url, &schema, e2e::stop_point(), &|| false);
        }
    }
}

#[test]
fn rabbitmq_exactly_once_through_relay_and_consumer_kills() {
    const SCHEMA: &str = "inbox_e2e_rabbitmq";
    const MESSAGES: i64 = 300;
    const MIN_KILLS: usize = 6;
    let broker = TempRabbit::start().unwrap_or_else(|e| panic!("{e}"));
    let amqp_url = broker.url();
    declare(&amqp_url);
    let url = common::url();
    let env = vec![
        ("DATABASE_URL", url.clone()),
        (e2e::SCHEMA, SCHEMA.to_owned()),
        (e2e::BROKER, amqp_url.clone()),
    ];
    e2e::exactly_once_through_kills(
        "inbox_e2e_rabbitmq",
        ENTRY,
        env,
        &url,
        SCHEMA,
        MESSAGES,
        MIN_KILLS,
        |outbox| outbox.start(sender(&amqp_url)).unwrap(),
        |done| consume(&amqp_url, SCHEMA, None, done),
    );
}
