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

use amiquip::{
    AmqpValue, Connection, ConsumerMessage, ConsumerOptions, ExchangeDeclareOptions, ExchangeType,
    FieldTable, QueueDeclareOptions,
};
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

    // Topology belongs to the application: the sender only publishes.
    let mut amqp = Connection::insecure_open(&amqp_url)?;
    let channel = amqp.open_channel(None)?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let exchange = channel.exchange_declare(ExchangeType::Direct, EXCHANGE, durable)?;
    let queue = channel.queue_declare(
        QUEUE,
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
    )?;
    queue.bind(&exchange, ROUTING_KEY, FieldTable::new())?;
    // The queue is the example's own: start from empty so that a broker of your own shows
    // exactly this run's messages.
    queue.purge()?;

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
    let consumer = queue.consume(ConsumerOptions::default())?;
    let mut seen = HashSet::new();
    while seen.len() < ORDERS as usize {
        let delivery = match consumer.receiver().recv_timeout(Duration::from_secs(30))? {
            ConsumerMessage::Delivery(delivery) => delivery,
            other => return Err(format!("consumer ended: {other:?}").into()),
        };
        let id = delivery.properties.message_id().clone().unwrap_or_default();
        let order = match delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.get("order-id"))
        {
            Some(AmqpValue::LongString(order)) => order.clone(),
            other => format!("{other:?}"),
        };
        if seen.insert(id.clone()) {
            println!(
                "consumed message-id={id} routing-key={} body={} order-id header={order}",
                delivery.routing_key,
                String::from_utf8_lossy(&delivery.body),
            );
        } else {
            println!("skipped duplicate message-id={id}");
        }
        consumer
            .ack(delivery)
            .map_err(|e| format!("acknowledging a delivery: {e}"))?;
    }
    relay.shutdown()?;
    // Cancel and wait for the broker's confirmation before closing: a consumer merely
    // dropped is cancelled in the background, and closing the connection meanwhile races
    // with the I/O thread (amiquip: "i/o loop thread tried to communicate with a
    // nonexistent client").
    consumer
        .cancel()
        .map_err(|e| format!("cancelling the consumer: {e}"))?;
    amqp.close()
        .map_err(|e| format!("closing the consumer's connection: {e}"))?;

    let backlog = outbox.store().backlog()?;
    println!(
        "done: {ORDERS} committed, {} consumed, {} pending, {} dead",
        seen.len(),
        backlog.pending,
        backlog.dead
    );
    Ok(())
}
