//! Least privilege: a producer role with nothing but INSERT on three columns of the outbox
//! table (and SELECT on
//! the schema's table of ordering modes) can add
//! messages, and a relay role with only what relaying needs can relay. The GRANT statements
//! here are the ones docs/permissions.md documents.

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

/// A relay on `store` (one retry, fast backoff) whose Sender records every batch and fails
/// the messages `fails_first` picks on their first attempt, so that the retry path runs with
/// the role's grants too.
fn relay_failing_once(
    store: &PgStore,
    fails_first: impl Fn(&troutbox::Message) -> bool + Clone + Send + 'static,
) -> (troutbox::Handle, std::sync::Arc<Deliveries>) {
    let relay = common::fast_outbox(store).max_retries(1).build().unwrap();
    let deliveries = Deliveries::new();
    let failing = deliveries.sender_failing("first attempt fails", move |m| {
        fails_first(m) && m.attempts() == 0
    });
    let handle = relay.start(failing).unwrap();
    (handle, deliveries)
}

#[test]
fn producer_with_insert_only_and_relay_with_minimal_grants() {
    let owner = pool(4);
    store(SCHEMA, &owner); // fresh schema, migrated by the owner
    let mut admin = owner.get().unwrap();
    // Roles are cluster-wide: create them once, (re)grant on this run's fresh schema.
    for role in [PRODUCER, RELAY] {
        common::login_role(&owner, role, PASSWORD);
    }
    admin
        .batch_execute(&format!(
            "CREATE TABLE {SCHEMA}.orders (id bigint);
             GRANT USAGE ON SCHEMA {SCHEMA} TO {PRODUCER}, {RELAY};
             GRANT INSERT ON {SCHEMA}.orders TO {PRODUCER};
             -- producer: exactly what docs/permissions.md documents
             GRANT INSERT (key, value, headers) ON {SCHEMA}.outbox_messages TO {PRODUCER};
             -- both: the table's ordering mode, read once per outbox
             GRANT SELECT ON {SCHEMA}.troutbox_tables TO {PRODUCER}, {RELAY};
             -- relay: exactly what docs/permissions.md documents
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
    // Nor can it choose the columns the relay relies on: an id ahead of the sequence (which
    // would make later producers' transactions fail), a state, attempts, a retry time.
    for column in ["id", "state", "attempts", "available_at", "created_at"] {
        let value = match column {
            "state" => "'dead'",
            "available_at" | "created_at" => "now()",
            _ => "1000000",
        };
        let err = conn
            .execute(
                &format!(
                    "INSERT INTO {SCHEMA}.outbox_messages (key, value, {column}) VALUES ('k', 'v', {value})"
                ),
                &[],
            )
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{column}: {err}"
        );
    }
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
    // Fail "paid" once so the relay also exercises the retry path (re-insert) with its grants.
    let (mut handle, deliveries) = relay_failing_once(&relay_store, |m| m.value() == b"paid");
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

/// Keep-sent retention: the relay marks rows sent and puts failures back with UPDATE, so its
/// documented grant has no INSERT or DELETE on the table; partition maintenance runs DDL,
/// which only the table's owner (or a member of the owning role) may run: the relay role's
/// attempt is refused with a privilege error, the owner's succeeds.
#[test]
fn keep_sent_relay_grants_and_maintenance_by_the_owner() {
    const KEEP: &str = "least_privilege_keep";
    let owner = pool(4);
    owner
        .get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {KEEP} CASCADE"))
        .unwrap();
    let retention = troutbox::Retention::keep_sent(Duration::from_secs(7 * 86_400));
    let owner_store = PgStore::new(owner.clone())
        .schema(KEEP)
        .retention(retention);
    owner_store.migrate().unwrap();
    common::login_role(&owner, RELAY, PASSWORD);
    let mut admin = owner.get().unwrap();
    admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {KEEP} TO {RELAY};
             -- relay, keep_sent: exactly what docs/permissions.md documents
             GRANT SELECT, UPDATE ON {KEEP}.outbox_messages TO {RELAY};
             GRANT SELECT, INSERT, DELETE ON {KEEP}.outbox_messages_claims, {KEEP}.outbox_messages_charges TO {RELAY};
             GRANT SELECT ON {KEEP}.troutbox_tables TO {RELAY};"
        ))
        .unwrap();
    let producer = Outbox::builder(owner_store.clone()).build().unwrap();
    for key in ["a", "b"] {
        producer.add_message(&mut *admin, key, b"v").unwrap();
    }

    let relay_store = PgStore::new(pool_as(RELAY))
        .schema(KEEP)
        .retention(retention);
    let (mut handle, deliveries) = relay_failing_once(&relay_store, |m| m.key() == "a");
    assert!(deliveries.wait_for(2, PATIENCE));
    assert!(common::eventually(PATIENCE, || relay_store
        .backlog()
        .unwrap()
        .sent
        == 2));
    handle.shutdown().unwrap();

    let err = relay_store.run_maintenance_once().unwrap_err();
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(
        text.contains("must be owner") || text.contains("permission denied"),
        "{text}"
    );
    owner_store.run_maintenance_once().unwrap();
}
