//! Per-key ordering (`OutboxBuilder::per_key_ordering(true)`) against a real PostgreSQL
//! server: the producer's half, and the outboxes that would break the order.
//!
//! The guarantee the `tests/ordering*.rs` files prove, for an outbox whose every write goes
//! through `add_message` / `add_messages`:
//!
//! 1. the ids of one key follow the commit order of their transactions (the producer takes a
//!    per-key lock before the id is drawn): this file;
//! 2. a message of key K reaches the Sender only after every lower-id message of K was sent,
//!    made dead, or skipped, with any number of relays (`ordering_relay.rs`), through kills,
//!    lost sessions and send timeouts (`ordering_crashes.rs`);
//! 3. delivery stays at least once: a duplicate may come late, but the *first* deliveries of
//!    each key are in id order (checked on every run of every file);
//! 4. a failing message blocks its own key, and only its key, and `PgStore::blocked_keys`
//!    shows it (`ordering_blocking.rs`).
//!
//! Here: ids follow commit order, with several keys per call and through savepoints; an
//! outbox whose mode does not match its table's, or a table whose id sequence is cached, is
//! refused.
//!
//! Each test works in its own schema, named after the test, so that they run in parallel.
//! Nothing here waits with a sleep for something to happen: tests poll a condition with a
//! deadline (`common::eventually`), wait on a channel or a condition variable, or watch the
//! server (`pg_stat_activity`, `pg_locks`). The scaffolding is in `tests/common/ordered.rs`.

mod common;
#[path = "common/ordered.rs"]
mod ordered;

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::{count, eventually, pool, store, PATIENCE};
use ordered::{
    assert_in_order_once, finish, ordered, ordered_in, published, relay_all, rows, sending,
    waits_for_advisory_lock, Log,
};
use troutbox::{Batch, Error, NewMessage, Outbox};

// ---------------------------------------------------------------------------------------------
// 1. Ids follow commit order
// ---------------------------------------------------------------------------------------------

/// Why: ids are drawn at INSERT and become visible at COMMIT. Without the per-key lock, T1
/// inserts K (id 10), T2 inserts K (id 11) and commits first: a relay delivers 11 before 10
/// is even visible, against the commit order. With the lock, T2 waits for T1 before it draws
/// its id. Here
/// the interleaving is forced, step by step: T1 adds K and stays open; T2 adds K and must wait
/// (seen in `pg_locks`, not guessed); T1 then draws another id (another key), so a T2 that had
/// drawn its id before waiting would hold a lower id than T1's second message; T1 commits, T2
/// goes on. T2's id must be above both of T1's, and the relay must deliver K in that order.
#[test]
fn ids_and_deliveries_follow_commit_order() {
    const SCHEMA: &str = "ordering_commit_order";
    let (pool, _, outbox) = ordered_in(SCHEMA, 8, |b| b);

    // T1: adds K, transaction left open.
    let mut c1 = pool.get().unwrap();
    let mut t1 = c1.transaction().unwrap();
    outbox.add_message(&mut t1, "K", b"t1-K").unwrap();

    // T2: on its own connection and thread, adds K too.
    let (pid_tx, pid_rx) = crossbeam_channel::bounded::<i32>(1);
    let t2 = {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        std::thread::spawn(move || -> Result<(), Error> {
            let mut c2 = pool.get().unwrap();
            let pid: i32 = c2.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
            pid_tx.send(pid).unwrap();
            let mut t2 = c2.transaction().unwrap();
            outbox.add_message(&mut t2, "K", b"t2-K")?;
            t2.commit().unwrap();
            Ok(())
        })
    };
    let pid2 = pid_rx.recv_timeout(PATIENCE).unwrap();
    assert!(
        eventually(PATIENCE, || waits_for_advisory_lock(&pool, pid2)),
        "T2's add_message of K never waited for T1's per-key lock"
    );
    assert!(!t2.is_finished(), "T2 finished while T1 holds K");

    // T1 draws another id while T2 waits, then commits.
    outbox.add_message(&mut t1, "other", b"t1-other").unwrap();
    t1.commit().unwrap();
    t2.join().unwrap().unwrap();

    let rows = rows(&pool, SCHEMA);
    let id = |value: &str| rows.iter().find(|r| r.2 == value).unwrap().0;
    assert!(
        id("t2-K") > id("t1-K") && id("t2-K") > id("t1-other"),
        "T2 committed last but its id is not the highest: {rows:?}"
    );

    let entries = relay_all(&outbox, 3, &pool, SCHEMA);
    assert_eq!(published(&entries, "K"), ["t1-K", "t2-K"]);
    assert_in_order_once(&entries);
}

// ---------------------------------------------------------------------------------------------
// 2. Several keys per call
// ---------------------------------------------------------------------------------------------

/// Why: a transaction adding several keys takes several per-key locks; two producers taking
/// them in opposite orders would deadlock (PostgreSQL would fail one of them after
/// `deadlock_timeout`). One producer adds [A, B, C], the other [C, B, A], in one
/// `add_messages` call per transaction (the second through a `PreparedProducer`, both with
/// `notify(true)`), started together each round (a barrier), for many rounds, with a relay
/// running: no error at all, and every key delivered in id order, each producer's rounds in
/// order.
#[test]
fn several_keys_in_one_call_in_both_orders_never_deadlock() {
    const SCHEMA: &str = "ordering_multi_key";
    const ROUNDS: usize = 150;
    let pool = pool(10);
    let store = store(SCHEMA, &pool);
    // With notify(true): the INSERTs then carry the signal's CTE next to the locks'.
    let outbox = ordered(&store, |b| b.batch_size(20).notify(true));
    let log = Log::new();
    let handle = outbox.start(sending(&log)).unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let producers: Vec<_> = [("p1", ["A", "B", "C"]), ("p2", ["C", "B", "A"])]
        .into_iter()
        .map(|(name, keys)| {
            let (pool, outbox, barrier, errors) = (
                pool.clone(),
                outbox.clone(),
                barrier.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                let mut conn = pool.get().unwrap();
                // p2 adds through statements prepared on its connection (the other INSERT path).
                let prepared = (name == "p2").then(|| outbox.prepare(&mut *conn).unwrap());
                for round in 0..ROUNDS {
                    let values: Vec<String> = keys
                        .iter()
                        .map(|k| format!("{name}-{round:03}-{k}"))
                        .collect();
                    barrier.wait();
                    let mut tx = conn.transaction().unwrap();
                    let msgs = keys
                        .iter()
                        .zip(&values)
                        .map(|(k, v)| NewMessage::new(k, v.as_bytes()));
                    let added = match &prepared {
                        Some(p) => p.add_messages(&mut tx, msgs),
                        None => outbox.add_messages(&mut tx, msgs),
                    }
                    .map_err(|e| e.to_string());
                    let done = added.and_then(|_| tx.commit().map_err(|e| e.to_string()));
                    if let Err(e) = done {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("{name} round {round}: {e}"));
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{errors:#?}");
    let entries = finish(handle, &log, ROUNDS * 6, &pool, SCHEMA);
    assert_in_order_once(&entries);
    for key in ["A", "B", "C"] {
        let of_key = published(&entries, key);
        assert_eq!(of_key.len(), ROUNDS * 2);
        for name in ["p1", "p2"] {
            let mine: Vec<&String> = of_key.iter().filter(|v| v.starts_with(name)).collect();
            let expected: Vec<String> = (0..ROUNDS)
                .map(|r| format!("{name}-{r:03}-{key}"))
                .collect();
            assert_eq!(mine, expected.iter().collect::<Vec<_>>(), "key {key}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Savepoints
// ---------------------------------------------------------------------------------------------

/// Why: PostgreSQL releases a lock taken after a savepoint when that savepoint is rolled back,
/// so an ordered transaction that adds K in a savepoint, rolls it back, and adds K again must
/// take K's lock again (a library that remembered "K already locked in this transaction"
/// would not, and its id would not follow commit order). Step by step: T1 adds K in a
/// savepoint; T2 adds K and waits; T1 rolls the savepoint back and T2 goes on (it holds K
/// now, uncommitted); T1 adds K again and must wait for T2 (seen in `pg_locks`); T2 commits,
/// then T1. K's ids, and its deliveries, are T2's then T1's; the rolled-back one is gone.
#[test]
fn a_rolled_back_savepoint_keeps_the_order() {
    const SCHEMA: &str = "ordering_savepoint";
    let (pool, _, outbox) = ordered_in(SCHEMA, 8, |b| b);

    let mut c1 = pool.get().unwrap();
    let pid1: i32 = c1.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let mut t1 = c1.transaction().unwrap();
    outbox.add_message(&mut t1, "other", b"t1-other").unwrap();

    // T1 adds K inside a savepoint, before T2 exists.
    let mut sp = t1.savepoint("before_k").unwrap();
    outbox.add_message(&mut sp, "K", b"t1-rolled-back").unwrap();

    let (pid_tx, pid_rx) = crossbeam_channel::bounded::<i32>(1);
    let (added_tx, added_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let t2 = {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        std::thread::spawn(move || {
            let mut c2 = pool.get().unwrap();
            let pid: i32 = c2.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
            pid_tx.send(pid).unwrap();
            let mut t2 = c2.transaction().unwrap();
            outbox.add_message(&mut t2, "K", b"t2").unwrap();
            added_tx.send(()).unwrap();
            go_rx.recv_timeout(PATIENCE).unwrap();
            t2.commit().unwrap();
        })
    };
    let pid2 = pid_rx.recv_timeout(PATIENCE).unwrap();
    assert!(
        eventually(PATIENCE, || waits_for_advisory_lock(&pool, pid2)),
        "T2 never waited for K's lock, held by T1's savepoint"
    );
    assert!(
        added_rx.try_recv().is_err(),
        "T2 added K while T1's savepoint held it"
    );
    sp.rollback().unwrap();
    added_rx
        .recv_timeout(PATIENCE)
        .expect("T2 still waits after the savepoint that took K's lock was rolled back");
    std::thread::scope(|s| {
        let adding = s.spawn(|| outbox.add_message(&mut t1, "K", b"t1-kept"));
        assert!(
            eventually(PATIENCE, || waits_for_advisory_lock(&pool, pid1)),
            "T1's second add_message of K did not wait for T2, which holds K"
        );
        go_tx.send(()).unwrap();
        adding.join().unwrap().unwrap();
    });
    t2.join().unwrap();
    t1.commit().unwrap();

    let k: Vec<String> = rows(&pool, SCHEMA)
        .into_iter()
        .filter(|r| r.1 == "K")
        .map(|r| r.2)
        .collect();
    assert_eq!(k, ["t2", "t1-kept"], "K's ids do not follow commit order");
    let entries = relay_all(&outbox, 3, &pool, SCHEMA);
    assert_eq!(published(&entries, "K"), ["t2", "t1-kept"]);
    assert_in_order_once(&entries);
}

// ---------------------------------------------------------------------------------------------
// 4. Mode mismatch
// ---------------------------------------------------------------------------------------------

/// Why: one unordered producer (no per-key lock) or one unordered relay (any order) on an
/// ordered table silently loses the order for everyone. Both directions must be refused by
/// `start` and by `add_message` / `add_messages` (which then insert nothing): an unordered
/// outbox on an ordered table, and an ordered outbox on a table migrated only by
/// `PgStore::migrate` (unordered) until `Outbox::migrate` converts it.
#[test]
fn an_outbox_whose_ordering_does_not_match_the_table_is_refused() {
    let pool = pool(8);
    let is_mismatch = |result: Result<(), Error>, declared: bool, table: &str| match result {
        Err(Error::OrderingMismatch {
            table: t,
            declared: d,
            recorded: r,
        }) => {
            assert_eq!((t.as_str(), d, r), (table, declared, !declared));
        }
        other => panic!("expected OrderingMismatch (declared {declared}), got {other:?}"),
    };
    let log = Log::new();

    // An unordered outbox on an ordered table.
    let store_o = store("ordering_mismatch_ordered", &pool);
    let _ordered = ordered(&store_o, |b| b);
    let table = store_o.qualified_table();
    let unordered = Outbox::builder(store_o.clone()).build().unwrap();
    is_mismatch(unordered.start(sending(&log)).map(|_| ()), false, &table);
    let mut conn = pool.get().unwrap();
    is_mismatch(unordered.add_message(&mut *conn, "K", b"x"), false, &table);
    is_mismatch(
        unordered
            .add_messages(&mut *conn, [NewMessage::new("K", b"y")])
            .map(|_| ()),
        false,
        &table,
    );
    // Its migrate refuses too: a table never goes back to unordered.
    is_mismatch(unordered.migrate(), false, &table);
    let rows_o = "SELECT count(*) FROM ordering_mismatch_ordered.outbox_messages";
    assert_eq!(count(&pool, rows_o), 0);

    // An ordered outbox on a table only `PgStore::migrate` has seen.
    let store_u = store("ordering_mismatch_unordered", &pool);
    let table = store_u.qualified_table();
    let outbox = Outbox::builder(store_u.clone())
        .per_key_ordering(true)
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    is_mismatch(outbox.start(sending(&log)).map(|_| ()), true, &table);
    is_mismatch(outbox.add_message(&mut *conn, "K", b"x"), true, &table);
    let mut tx = conn.transaction().unwrap();
    is_mismatch(
        outbox
            .add_messages(&mut tx, [NewMessage::new("K", b"y")])
            .map(|_| ()),
        true,
        &table,
    );
    tx.rollback().unwrap();
    let rows_u = "SELECT count(*) FROM ordering_mismatch_unordered.outbox_messages";
    assert_eq!(count(&pool, rows_u), 0);

    // Converted by the ordered outbox's migrate: now it works, and the unordered one is out.
    outbox.migrate().unwrap();
    outbox
        .add_message(&mut *conn, "K", b"after-migrate")
        .unwrap();
    let entries = relay_all(&outbox, 1, &pool, "ordering_mismatch_unordered");
    assert_eq!(published(&entries, "K"), ["after-migrate"]);
    let late_unordered = Outbox::builder(store_u.clone()).build().unwrap();
    is_mismatch(
        late_unordered.add_message(&mut *conn, "K", b"z"),
        false,
        &table,
    );
}

/// Why (issue 21, item 7): an id sequence with `CACHE` above 1 (set by hand, or by a tool)
/// hands each session its own block of ids, so the ids of one key no longer follow the
/// commit order, which the ordered relay relies on. Ordering is refused on such a table, at
/// migrate and at start, with the statement that fixes it.
#[test]
fn per_key_ordering_is_refused_on_a_cached_id_sequence() {
    const SCHEMA: &str = "ordering_id_cache";
    let pool = pool(4);
    let store = store(SCHEMA, &pool);
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "ALTER TABLE {SCHEMA}.outbox_messages ALTER COLUMN id SET CACHE 20"
        ))
        .unwrap();
    let outbox = Outbox::builder(store.clone())
        .per_key_ordering(true)
        .build()
        .unwrap();
    let err = outbox.migrate().unwrap_err();
    assert!(matches!(err, Error::IdCached { cache: 20, .. }), "{err}");
    assert!(err.to_string().contains("SET CACHE 1"), "{err}");
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "ALTER TABLE {SCHEMA}.outbox_messages ALTER COLUMN id SET CACHE 1"
        ))
        .unwrap();
    outbox.migrate().unwrap();
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "ALTER TABLE {SCHEMA}.outbox_messages ALTER COLUMN id SET CACHE 5"
        ))
        .unwrap();
    let err = outbox
        .start(|_: &mut Batch| -> Result<(), String> { Ok(()) })
        .expect_err("an ordered relay started on a cached sequence");
    assert!(matches!(err, Error::IdCached { cache: 5, .. }), "{err}");
}
