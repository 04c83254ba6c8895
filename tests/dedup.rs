//! Message identity across outboxes (issue 13): `Message::dedup_key` is unique across
//! tables, schemas and databases, and never changes for a message, retries included.

mod common;

use std::sync::{Arc, Mutex};

use common::{pool, PATIENCE};
use troutbox::{Batch, Error, Outbox, PgPool, PgStore};

/// Relays `store` until `n` messages were seen; the Sender fails each message's first
/// attempt. Returns (id, dedup_key, outbox_id) per attempt.
fn relay_failing_once(store: &PgStore, n: usize) -> Vec<(i64, String, String)> {
    let seen: Arc<Mutex<Vec<(i64, String, String)>>> = Arc::default();
    let s = seen.clone();
    let outbox = common::fast_outbox(store).build().unwrap();
    let mut handle = outbox
        .start(move |batch: &mut Batch| {
            let mut s = s.lock().unwrap();
            for m in batch.iter_mut() {
                s.push((m.id(), m.dedup_key(), m.outbox_id().to_owned()));
                if m.attempts() == 0 {
                    m.mark_failed("first attempt fails");
                }
            }
            Ok::<(), String>(())
        })
        .unwrap();
    assert!(common::eventually(PATIENCE, || seen.lock().unwrap().len() >= n));
    handle.shutdown().unwrap();
    let seen = seen.lock().unwrap().clone();
    seen
}

fn add_one(store: &PgStore, pool: &PgPool) {
    let outbox = Outbox::builder(store.clone()).build().unwrap();
    outbox
        .add_message(&mut *pool.get().unwrap(), "k", b"v")
        .unwrap();
}

#[test]
fn dedup_keys_differ_across_tables_and_never_change_for_a_message() {
    let pool = pool(6);
    let a = common::store("dedup_a", &pool);
    let b = common::store("dedup_b", &pool);
    add_one(&a, &pool);
    add_one(&b, &pool);
    let seen_a = relay_failing_once(&a, 2);
    let seen_b = relay_failing_once(&b, 2);

    // Same id in both tables (each table's first message)...
    assert_eq!(seen_a[0].0, seen_b[0].0);
    // ...different identities, each the same on the retry as on the first attempt.
    assert_eq!(
        seen_a[0].1, seen_a[1].1,
        "a retry keeps the message's identity"
    );
    assert_eq!(seen_b[0].1, seen_b[1].1);
    assert_ne!(
        seen_a[0].1, seen_b[0].1,
        "two tables never share an identity"
    );
    for (id, key, outbox) in [&seen_a[0], &seen_b[0]] {
        assert_eq!(key, &format!("{outbox}:{id}"));
        // A UUID in its text form, as the table recorded it.
        assert_eq!(outbox.len(), 36, "{outbox}");
        assert_eq!(outbox.matches('-').count(), 4, "{outbox}");
    }
    let recorded: String = pool
        .get()
        .unwrap()
        .query_one(
            "SELECT outbox_id::text FROM dedup_a.troutbox_tables WHERE table_name = 'outbox_messages'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(seen_a[0].2, recorded);

    // Migrating again keeps it; so does a new relay.
    a.migrate().unwrap();
    add_one(&a, &pool);
    let again = relay_failing_once(&a, 1);
    assert_eq!(again[0].2, recorded);
}

#[test]
fn a_table_from_before_identities_gets_one_when_migrated() {
    let pool = pool(6);
    let store = common::store("dedup_upgrade", &pool);
    add_one(&store, &pool);
    // The table as version 3 left it: no identity column (and no later migration).
    pool.get()
        .unwrap()
        .batch_execute(
            "ALTER TABLE dedup_upgrade.troutbox_tables DROP COLUMN outbox_id;
             DELETE FROM dedup_upgrade.troutbox_migrations WHERE version >= 4;
             UPDATE dedup_upgrade.outbox_messages SET state = 'dead', last_error = 'gave up'",
        )
        .unwrap();
    // Dead letters stay readable, without an identity.
    let dead = store.dead_messages(10, None).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.outbox_id(), "");
    // A relay is refused until the table is migrated, with an error that says so.
    let outbox = Outbox::builder(store.clone()).build().unwrap();
    match outbox.start(|_: &mut Batch| Ok::<(), String>(())) {
        Err(Error::OutdatedSchema { table }) => assert!(table.contains("dedup_upgrade")),
        other => panic!("expected OutdatedSchema, got {:?}", other.map(|_| ())),
    }
    store.migrate().unwrap();
    assert_eq!(store.requeue_all_dead().unwrap(), 1);
    let seen = relay_failing_once(&store, 2);
    assert_eq!(seen[0].2.len(), 36);
    assert_eq!(seen[0].1, seen[1].1);
    assert_eq!(
        store.dead_messages(10, None).unwrap().len(),
        0,
        "the message was delivered after its retry"
    );
}
