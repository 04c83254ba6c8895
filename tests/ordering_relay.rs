//! Per-key ordering against a real PostgreSQL server, guarantee 2 without faults: a relay
//! hands a key to one Sender at a time, in id order, whatever else runs. Two relays never
//! hold one key at once; idle transactions holding an xid (in this database or another) do
//! not stall delivery; the same holds on a `keep_sent` (partitioned) table.
//!
//! The guarantees and the other files: see `tests/ordering.rs`. The few sleeps here are
//! workload shapes (a Sender's broker latency), and each says so.

mod common;
#[path = "common/ordered.rs"]
mod ordered;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{count, eventually, pool, store, PATIENCE};
use ordered::{
    add_pairs, assert_in_order_once, distinct, finish, ordered, ordered_in, published,
    publishing_sender, sending, table_state, wait_published, Log,
};
use troutbox::{Batch, Message};

// ---------------------------------------------------------------------------------------------
// 1. Claim exclusion
// ---------------------------------------------------------------------------------------------

/// Why: `ORDER BY ... FOR UPDATE SKIP LOCKED` alone hands the next message of a key to a
/// second relay while the first still holds the previous one. Two outboxes on the same table
/// (as two processes would have), two workers each, small batches, a hot key of 200 messages
/// and three cooler keys, some committed before the relays start and some while they run. The
/// Sender keeps a per-key in-flight count: a batch arriving for a key that is in flight is a
/// violation. Without faults every message is published exactly once, in id order per key.
#[test]
fn two_relays_never_hold_the_same_key_at_once() {
    const SCHEMA: &str = "ordering_exclusion";
    const HOT: usize = 200;
    const COOL: usize = 50;
    let pool = pool(20);
    let store = store(SCHEMA, &pool);
    let outbox_a = ordered(&store, |b| b.batch_size(5).workers(2));
    let outbox_b = ordered(&store, |b| b.batch_size(5).workers(2));

    // Half of everything before the relays start, the other half while they run.
    let produce = |range: std::ops::Range<usize>| {
        let mut conn = pool.get().unwrap();
        for chunk in range.collect::<Vec<_>>().chunks(10) {
            let mut tx = conn.transaction().unwrap();
            let mut msgs: Vec<(String, String)> = Vec::new();
            for &i in chunk {
                msgs.push(("hot".into(), format!("hot-{i:03}")));
                if i < COOL * 2 && i % 2 == 0 {
                    for c in 0..3 {
                        msgs.push((format!("cool-{c}"), format!("cool-{c}-{:03}", i / 2)));
                    }
                }
            }
            add_pairs(&outbox_a, &mut tx, &msgs);
            tx.commit().unwrap();
        }
    };
    produce(0..HOT / 2);

    let log = Log::new();
    let in_flight: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let batches: Arc<Mutex<HashMap<&'static str, usize>>> = Arc::default();
    let sender = |relay: &'static str| {
        let (log, in_flight, violations, batches) = (
            log.clone(),
            in_flight.clone(),
            violations.clone(),
            batches.clone(),
        );
        move |batch: &mut Batch| -> Result<(), String> {
            *batches.lock().unwrap().entry(relay).or_default() += 1;
            let keys: HashSet<String> = batch.iter().map(|m| m.key().to_owned()).collect();
            {
                let mut held = in_flight.lock().unwrap();
                for key in &keys {
                    let n = held.entry(key.clone()).or_default();
                    if *n > 0 {
                        let ids: Vec<i64> = batch.iter().map(|m| m.id()).collect();
                        violations.lock().unwrap().push(format!(
                            "relay {relay} got a batch of key {key} while another batch of it was in flight: {ids:?}"
                        ));
                    }
                    *n += 1;
                }
            }
            for m in batch.iter_mut() {
                log.push(m);
                m.mark_sent();
            }
            // A broker round trip (workload, not synchronisation): it widens the window in
            // which another relay could claim the same key.
            std::thread::sleep(Duration::from_millis(2));
            let mut held = in_flight.lock().unwrap();
            for key in &keys {
                *held.get_mut(key).unwrap() -= 1;
            }
            Ok(())
        }
    };
    let mut a = outbox_a.start(sender("a")).unwrap();
    let mut b = outbox_b.start(sender("b")).unwrap();
    produce(HOT / 2..HOT);
    let total = HOT + 3 * COOL;
    let all = log.wait_distinct(total, PATIENCE * 2);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    let entries = log.entries();
    println!(
        "FIGURES ordering_exclusion: messages={total} published={} batches={:?}",
        entries.len(),
        batches.lock().unwrap()
    );
    assert!(all, "{} of {total} delivered", distinct(&entries));
    let violations = violations.lock().unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
    assert_in_order_once(&entries);
    let hot: Vec<String> = (0..HOT).map(|i| format!("hot-{i:03}")).collect();
    assert_eq!(published(&entries, "hot"), hot);
    for c in 0..3 {
        let cool: Vec<String> = (0..COOL).map(|i| format!("cool-{c}-{i:03}")).collect();
        assert_eq!(published(&entries, &format!("cool-{c}")), cool);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Idle transactions
// ---------------------------------------------------------------------------------------------

/// Why: ordering schemes built on xid or xmin high-water marks stall while any transaction
/// holding an xid stays open, anywhere in the cluster. Here one session sits idle in a
/// transaction that holds an xid, one more does the same in another database, and another sits in an uncommitted ordered producer
/// transaction of key "held" (holding that key's lock): every other key must still be
/// delivered, in order, while both stay open; "held" follows once its transaction commits.
#[test]
fn an_idle_transaction_holding_an_xid_does_not_stall_ordered_delivery() {
    const SCHEMA: &str = "ordering_idle_xid";
    let (pool, _, outbox) = ordered_in(SCHEMA, 10, |b| b.batch_size(7));

    let mut idle = pool.get().unwrap();
    let mut idle_tx = idle.transaction().unwrap();
    let idle_pid: i32 = idle_tx
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let _xid: i64 = idle_tx
        .query_one("SELECT txid_current()", &[])
        .unwrap()
        .get(0);
    // The same in another database of the cluster: xids and the xmin horizon are shared by
    // all databases.
    let other_db = "troutbox_ordering_idle_xid";
    let mut admin = pool.get().unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {other_db} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {other_db}"))
        .unwrap();
    drop(admin);
    let mut other_config: postgres::Config = common::url().parse().unwrap();
    other_config.dbname(other_db);
    let mut other = other_config.connect(postgres::NoTls).unwrap();
    let mut other_tx = other.transaction().unwrap();
    let other_pid: i32 = other_tx
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let _other_xid: i64 = other_tx
        .query_one("SELECT txid_current()", &[])
        .unwrap()
        .get(0);
    let mut held = pool.get().unwrap();
    let mut held_tx = held.transaction().unwrap();
    outbox.add_message(&mut held_tx, "held", b"held-0").unwrap();

    let mut conn = pool.get().unwrap();
    for round in 0..10 {
        let mut tx = conn.transaction().unwrap();
        let values: Vec<(String, String)> = (0..5)
            .map(|k| (format!("k{k}"), format!("k{k}-{round}")))
            .collect();
        add_pairs(&outbox, &mut tx, &values);
        tx.commit().unwrap();
    }
    let log = Log::new();
    let handle = outbox.start(sending(&log)).unwrap();
    wait_published(&log, 50, &pool, SCHEMA);
    // Both transactions were open all along.
    let still_idle = count(
        &pool,
        &format!(
            "SELECT count(*) FROM pg_stat_activity
             WHERE pid IN ({idle_pid}, {other_pid}) AND state = 'idle in transaction'
               AND backend_xid IS NOT NULL"
        ),
    );
    assert_eq!(still_idle, 2);
    assert!(published(&log.entries(), "held").is_empty());
    held_tx.commit().unwrap();
    let entries = finish(handle, &log, 51, &pool, SCHEMA);
    idle_tx.rollback().unwrap();
    other_tx.rollback().unwrap();
    drop(other);
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP DATABASE IF EXISTS {other_db} WITH (FORCE)"))
        .unwrap();
    for k in 0..5 {
        let expected: Vec<String> = (0..10).map(|r| format!("k{k}-{r}")).collect();
        assert_eq!(published(&entries, &format!("k{k}")), expected);
    }
    assert_eq!(published(&entries, "held"), ["held-0"]);
}

// ---------------------------------------------------------------------------------------------
// 3. Keep-sent retention
// ---------------------------------------------------------------------------------------------

/// Why: with `Retention::keep_sent` a claim marks rows sent by UPDATE (on a partitioned
/// table) instead of deleting them, and sent rows stay: the ordered claim must take a sent
/// row for settled (it is no key's head), see a claimed head as pending in other snapshots,
/// and put failed rows back in place. Two relays, three keys, every message whose id is a
/// multiple of 5 refused on its first attempt: per key, publications in id order, each
/// message once, all kept as 'sent'.
#[test]
fn keep_sent_retention_keeps_the_order_too() {
    const SCHEMA: &str = "ordering_keep_sent";
    const PER_KEY: usize = 60;
    let pool = pool(16);
    let retention = troutbox::Retention::keep_sent(Duration::from_secs(3600));
    let store = common::keep_sent_store(SCHEMA, &pool, retention);
    let outbox_a = ordered(&store, |b| b.batch_size(8).workers(2));
    let outbox_b = ordered(&store, |b| b.batch_size(8).workers(2));
    let mut conn = pool.get().unwrap();
    for chunk in 0..PER_KEY / 10 {
        let mut tx = conn.transaction().unwrap();
        let msgs: Vec<(String, String)> = (chunk * 10..chunk * 10 + 10)
            .flat_map(|i| (0..3).map(move |k| (format!("k{k}"), format!("k{k}-{i:02}"))))
            .collect();
        add_pairs(&outbox_a, &mut tx, &msgs);
        tx.commit().unwrap();
    }
    let log = Log::new();
    let fail =
        |m: &Message| (m.id() % 5 == 0 && m.attempts() == 0).then(|| "refused once".to_owned());
    let mut a = outbox_a.start(publishing_sender(&log, fail)).unwrap();
    let mut b = outbox_b.start(publishing_sender(&log, fail)).unwrap();
    let total = 3 * PER_KEY;
    let all = log.wait_distinct(total, PATIENCE);
    let sent = format!("SELECT count(*) FROM {SCHEMA}.outbox_messages WHERE state = 'sent'");
    let kept = eventually(PATIENCE, || count(&pool, &sent) == total as i64);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    let entries = log.entries();
    assert!(all && kept, "{}", table_state(&pool, SCHEMA));
    assert!(
        entries.iter().any(|d| !d.ok),
        "no message was refused: the test proves nothing"
    );
    assert_in_order_once(&entries);
    for k in 0..3 {
        let expected: Vec<String> = (0..PER_KEY).map(|i| format!("k{k}-{i:02}")).collect();
        assert_eq!(published(&entries, &format!("k{k}")), expected);
    }
}
