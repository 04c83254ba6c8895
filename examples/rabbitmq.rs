//! Relay an outbox to RabbitMQ with publisher confirms, then read the messages back.
//!
//! Run with `cargo run --example rabbitmq --features rabbitmq`.
//!
//! - PostgreSQL: `DATABASE_URL`, or a throw-away server from the system's binaries.
//! - RabbitMQ: `AMQP_URL` (for example `amqp://guest:guest@localhost:5672/%2f`), or a
//!   throw-away broker started from the system's `rabbitmq-server` on a free port
//!   (Debian/Ubuntu: `apt-get install rabbitmq-server`; nothing needs to be running).
//!
//! It declares a durable exchange `troutbox.example` and a durable queue `troutbox.orders`
//! bound to it with the routing key `order`, commits five orders with their messages, relays
//! them with [`RabbitSender`], and consumes them back, deduplicating on `message-id` as a
//! real consumer should.

#[path = "../tests/common/rabbit.rs"]
mod rabbit;

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use r2d2_postgres::PostgresConnectionManager;
use troutbox::rabbitmq::RabbitSender;
use troutbox::{NewMessage, Outbox, PgStore};

const EXCHANGE: &str = "troutbox.example";
const QUEUE: &str = "troutbox.orders";
const ROUTING_KEY: &str = "order";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A broker of your own, or a private one that lives as long as this program.
    let (amqp_url, _private_broker) = match std::env::var("AMQP_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let broker = rabbit::TempRabbit::start()?;
            println!("started a throw-away RabbitMQ on port {}", broker.port());
            (broker.url(), Some(broker))
        }
    };

    // Topology belongs to the application: the sender only publishes. This side of the
    // example uses lapin (the client RabbitSender is built on) on a runtime of its own.
    let amqp = rabbit::Amqp::connect(&amqp_url, Duration::from_secs(10))?;
    let channel = &amqp.channel;
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    amqp.block_on(channel.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Direct,
        durable_exchange,
        FieldTable::default(),
    ))?;
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    amqp.block_on(channel.queue_declare(QUEUE.into(), durable_queue, FieldTable::default()))?;
    amqp.block_on(channel.queue_bind(
        QUEUE.into(),
        EXCHANGE.into(),
        ROUTING_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))?;
    // The queue is the example's own: start from empty so that a broker of your own shows
    // exactly this run's messages.
    amqp.block_on(channel.queue_purge(QUEUE.into(), QueuePurgeOptions::default()))?;

    // The outbox, next to the business table.
    let pool = r2d2::Pool::new(PostgresConnectionManager::new(
        troutbox::testing::database_url()?.parse()?,
        postgres::NoTls,
    ))?;
    let store = PgStore::new(pool.clone()).schema("rabbitmq_example");
    store.migrate()?;
    let mut conn = pool.get()?;
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS rabbitmq_example.orders (id bigint PRIMARY KEY);
         TRUNCATE rabbitmq_example.orders",
    )?;
    let outbox = Outbox::builder(store).build()?;

    const ORDERS: i64 = 5;
    for id in 1..=ORDERS {
        let mut tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO rabbitmq_example.orders (id) VALUES ($1)",
            &[&id],
        )?;
        let body = format!("{{\"order\":{id}}}");
        let order = id.to_string();
        let message = NewMessage::new(ROUTING_KEY, body.as_bytes()).header("order-id", &order);
        outbox.add(&mut tx, &message)?;
        tx.commit()?;
    }
    println!("committed {ORDERS} orders with their messages");

    // The relay: each worker publishes its batches and marks a message sent only once
    // RabbitMQ has confirmed it.
    let sender = RabbitSender::builder(amqp_url.as_str())
        .exchange(EXCHANGE)
        .confirm_timeout(Duration::from_secs(10))
        .build()?;
    let mut relay = outbox.start(sender)?;

    // A consumer: at-least-once delivery means it keeps the ids it has processed and skips
    // repeats. (A real one stores them with its own effects, in the same transaction.)
    let mut consumer = amqp.block_on(channel.basic_consume(
        QUEUE.into(),
        "troutbox-example".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))?;
    let mut seen = HashSet::new();
    while seen.len() < ORDERS as usize {
        let next = amqp.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), rabbit::next(&mut consumer)).await
        });
        let delivery = match next {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => return Err("the consumer was cancelled".into()),
            Err(_) => return Err("no delivery within 30 s".into()),
        };
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        let order = match delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("order-id"))
        {
            Some(AMQPValue::LongString(order)) => order.to_string(),
            other => format!("{other:?}"),
        };
        if seen.insert(id.clone()) {
            println!(
                "consumed message-id={id} routing-key={} body={} order-id header={order}",
                delivery.routing_key,
                String::from_utf8_lossy(&delivery.data),
            );
        } else {
            println!("skipped duplicate message-id={id}");
        }
        amqp.block_on(delivery.ack(BasicAckOptions::default()))
            .map_err(|e| format!("acknowledging a delivery: {e}"))?;
    }
    relay.shutdown()?;
    amqp.block_on(channel.basic_cancel("troutbox-example".into(), BasicCancelOptions::default()))
        .map_err(|e| format!("cancelling the consumer: {e}"))?;
    amqp.close();

    let backlog = outbox.store().backlog()?;
    println!(
        "done: {ORDERS} committed, {} consumed, {} pending, {} dead",
        seen.len(),
        backlog.pending,
        backlog.dead
    );
    Ok(())
}
