//! Least privilege: a producer role with nothing but INSERT on the outbox table (and SELECT on
//! the schema's table of ordering modes) can add
//! messages, and a relay role with only what relaying needs can relay. The GRANT statements
//! here are the ones the README's "Permissions" section documents.

mod common;

use std::time::Duration;

use common::{pool, store, Deliveries, PATIENCE};
use r2d2_postgres::PostgresConnectionManager;
use troutbox::{Outbox, PgPool, PgStore};

const SCHEMA: &str = "least_privilege";
const PRODUCER: &str = "troutbox_test_producer";
const RELAY: &str = "troutbox_test_relay";
const PASSWORD: &str = "troutbox-test";

fn pool_as(role: &str) -> PgPool {
    let mut config: postgres::Config = common::url().parse().unwrap();
    config.user(role).password(PASSWORD);
    r2d2::Pool::builder()
        .max_size(3)
        .connection_timeout(Duration::from_secs(10))
        .build(PostgresConnectionManager::new(config, postgres::NoTls))
        .unwrap()
}

#[test]
fn producer_with_insert_only_and_relay_with_minimal_grants() {
    let owner = pool(4);
    store(SCHEMA, &owner); // fresh schema, migrated by the owner
    let mut admin = owner.get().unwrap();
    // Roles are cluster-wide: create them once, (re)grant on this run's fresh schema.
    for role in [PRODUCER, RELAY] {
        admin
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                     CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}';
                   END IF;
                 END $$"
            ))
            .unwrap();
    }
    admin
        .batch_execute(&format!(
            "CREATE TABLE {SCHEMA}.orders (id bigint);
             GRANT USAGE ON SCHEMA {SCHEMA} TO {PRODUCER}, {RELAY};
             GRANT INSERT ON {SCHEMA}.orders TO {PRODUCER};
             -- producer: exactly what the README documents
             GRANT INSERT ON {SCHEMA}.outbox_messages TO {PRODUCER};
             -- both: the table's ordering mode, read once per outbox
             GRANT SELECT ON {SCHEMA}.troutbox_tables TO {PRODUCER}, {RELAY};
             -- relay: exactly what the README documents
             GRANT SELECT, INSERT, UPDATE, DELETE ON {SCHEMA}.outbox_messages TO {RELAY};
             GRANT SELECT, INSERT, DELETE ON {SCHEMA}.outbox_messages_claims, {SCHEMA}.outbox_messages_charges TO {RELAY};"
        ))
        .unwrap();

    let producer_pool = pool_as(PRODUCER);
    let producer = Outbox::builder(PgStore::new(producer_pool.clone()).schema(SCHEMA))
        .build()
        .unwrap();
    let mut conn = producer_pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    tx.execute(&format!("INSERT INTO {SCHEMA}.orders VALUES (1)"), &[])
        .unwrap();
    producer.add_message(&mut tx, "order-1", b"paid").unwrap();
    producer
        .add_messages(&mut tx, [troutbox::NewMessage::new("order-1", b"shipped")])
        .unwrap();
    tx.commit().unwrap();
    // The producer cannot read the outbox, so it really holds nothing but INSERT.
    let err = conn
        .query_one(
            &format!("SELECT count(*) FROM {SCHEMA}.outbox_messages"),
            &[],
        )
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );

    let relay_store = PgStore::new(pool_as(RELAY)).schema(SCHEMA);
    let relay = Outbox::builder(relay_store.clone())
        .max_retries(1)
        .backoff(troutbox::Backoff::exponential(
            Duration::from_millis(10),
            Duration::from_millis(20),
        ))
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let deliveries = Deliveries::new();
    let d = deliveries.clone();
    // Fail "paid" once so the relay also exercises the retry path (re-insert) with its grants.
    let mut handle = relay
        .start(move |batch: &mut troutbox::Batch| -> Result<(), String> {
            for m in batch.iter_mut() {
                if m.value() == b"paid" && m.attempts() == 0 {
                    m.mark_failed("first attempt fails");
                }
            }
            d.record(batch);
            Ok(())
        })
        .unwrap();
    assert!(deliveries.wait_for(2, PATIENCE));
    assert!(common::eventually(PATIENCE, || relay_store
        .backlog()
        .unwrap()
        .pending
        == 0));
    handle.shutdown().unwrap();
    assert_eq!(
        deliveries.duplicates(),
        1,
        "the failed message was retried once"
    );
    // The relay role can also operate the dead-letter tools.
    assert_eq!(relay_store.requeue_all_dead().unwrap(), 0);
}
