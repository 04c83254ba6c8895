//! `troutbox relay` with its RabbitMQ sink, against a private RabbitMQ broker and a real
//! PostgreSQL database (`cargo test --features cli,rabbitmq --test relay_service_rabbitmq`):
//! messages committed through the SQL producer function arrive in the queue, once each, and
//! the service stops with status 0.

mod common;
#[path = "common/rabbit.rs"]
mod rabbit;
#[path = "common/service.rs"]
mod service;

use common::{eventually, PATIENCE};
use rabbit::{queue_count, TempRabbit};
use service::{config_file, fresh_database, url_of, Service};
use troutbox::PgStore;

#[test]
fn committed_messages_reach_the_queue_once_each() {
    let rabbit = TempRabbit::start().unwrap_or_else(|e| panic!("{e}"));
    // The default exchange routes a message to the queue named by its routing key, which
    // the RabbitMQ sink takes from the message's key.
    assert_eq!(queue_count(&rabbit.url(), "relayed", false), 0);
    let pool = fresh_database("relay_svc_rabbit", 4);
    PgStore::new(pool.clone()).migrate().unwrap();
    let mut conn = pool.get().unwrap();
    for i in 0..300 {
        let mut tx = conn.transaction().unwrap();
        tx.execute(
            "SELECT public.outbox_messages_add('relayed', convert_to($1, 'UTF8'))",
            &[&format!("m-{i}")],
        )
        .unwrap();
        if i % 10 == 9 {
            tx.rollback().unwrap();
        } else {
            tx.commit().unwrap();
        }
    }
    let config = config_file(
        "rabbit",
        "[sink.rabbitmq]
         url_env = \"BROKER_URL\"
         [[source]]
         name = \"r\"
         database_url_env = \"SOURCE_URL\"
         poll_interval = \"10ms\"",
    );
    let mut service = Service::start(
        &config,
        &[
            ("BROKER_URL", rabbit.url()),
            ("SOURCE_URL", url_of("relay_svc_rabbit")),
        ],
    );
    assert!(
        eventually(PATIENCE, || PgStore::new(pool.clone())
            .backlog()
            .unwrap()
            .pending
            == 0),
        "{}",
        service.log()
    );
    service.signal("TERM");
    let status = service.wait(PATIENCE).expect("stops");
    assert_eq!(status.code(), Some(0), "{}", service.log());
    // Confirmed by the broker before each batch was settled: all there, none twice.
    assert_eq!(
        queue_count(&rabbit.url(), "relayed", true),
        270,
        "{}",
        service.log()
    );
}
