//! Per-key ordering against a real PostgreSQL server, guarantee 4: a failing message blocks
//! its own key, and only its key, until it succeeds, dies or is skipped, and
//! `PgStore::blocked_keys` shows it. The messages behind it in a batch (its followers) are
//! neither published nor charged an attempt, whether the Sender marks them failed or leaves
//! them unmarked, and also when the batch's outcome is recorded late.
//!
//! The guarantees and the other files: see `tests/ordering.rs`.

mod common;
#[path = "common/ordered.rs"]
mod ordered;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{count, eventually, pool, store, PATIENCE};
use ordered::{
    add_pairs, add_values, assert_in_order_once, attempts, finish, id_of, keyed_by_prefix,
    numbered, order_violations, ordered, ordered_in, published, publishing_sender, refusing,
    table_state, text, Log,
};
use troutbox::{Backoff, Batch};

// ---------------------------------------------------------------------------------------------
// 1. Failure blocking, dead and skipped heads
// ---------------------------------------------------------------------------------------------

/// Why: a failed message goes back with a later retry time, and in an unordered relay the
/// next message of its key, already due, overtakes it. Here K-2 is refused until the test
/// lets it through (after at least 3 failures): meanwhile K-0 and K-1 are delivered, every
/// message of keys A and B is delivered (only K is blocked), nothing after K-2 is, its
/// followers are not charged, and `blocked_keys` names K, its head and the error. Once K-2
/// succeeds, K resumes in order.
#[test]
fn a_failing_message_blocks_only_its_key_until_it_succeeds() {
    const SCHEMA: &str = "ordering_failure_blocks";
    let (pool, store, outbox) = ordered_in(SCHEMA, 8, |b| b.batch_size(10).workers(2));
    let mut conn = pool.get().unwrap();
    let mut values: Vec<(String, String)> = Vec::new();
    for i in 0..10 {
        values.push(("K".into(), format!("K-{i}")));
        for key in ["A", "B"] {
            values.push((key.into(), format!("{key}-{}", 2 * i)));
            values.push((key.into(), format!("{key}-{}", 2 * i + 1)));
        }
    }
    // In three transactions, K's messages spread over them.
    for chunk in values.chunks(17) {
        let mut tx = conn.transaction().unwrap();
        add_pairs(&outbox, &mut tx, chunk);
        tx.commit().unwrap();
    }
    let x = id_of(&pool, SCHEMA, "K-2");

    let log = Log::new();
    let released = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let (r, f) = (released.clone(), failures.clone());
    let handle = outbox
        .start(publishing_sender(&log, move |m| {
            if m.value() == b"K-2" && !r.load(Ordering::SeqCst) {
                f.fetch_add(1, Ordering::SeqCst);
                Some("broker refused K-2".into())
            } else {
                None
            }
        }))
        .unwrap();

    // Blocked: K-2 failed 3 times, and everything not behind it went through.
    let others_done = || {
        let e = log.entries();
        ["A", "B"].iter().all(|k| published(&e, k).len() == 20) && published(&e, "K").len() >= 2
    };
    assert!(
        eventually(PATIENCE, || failures.load(Ordering::SeqCst) >= 3
            && others_done()),
        "failures={} entries={:?}",
        failures.load(Ordering::SeqCst),
        log.entries()
    );
    let blocked = store.blocked_keys(10).unwrap();
    let entries = log.entries();
    assert_eq!(
        published(&entries, "K"),
        ["K-0", "K-1"],
        "a message of K was delivered while K-2 was failing"
    );
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    let k = &blocked[0];
    assert_eq!((k.key.as_str(), k.head_id), ("K", x), "{k:?}");
    assert!(k.attempts >= 1, "{k:?}");
    assert_eq!(k.last_error.as_deref(), Some("broker refused K-2"), "{k:?}");
    assert_eq!(k.waiting, 7, "{k:?}");
    // The messages behind K-2 were handed back each time, never charged.
    let charged = count(
        &pool,
        &format!(
            "SELECT count(*) FROM {SCHEMA}.outbox_messages WHERE key = 'K' AND id > {x} AND attempts > 0"
        ),
    );
    assert_eq!(charged, 0, "{}", table_state(&pool, SCHEMA));

    // Let K-2 through: K resumes, in order.
    released.store(true, Ordering::SeqCst);
    let entries = finish(handle, &log, 50, &pool, SCHEMA);
    assert_eq!(published(&entries, "K"), numbered("K", 10));
    assert_in_order_once(&entries);
    assert!(store.blocked_keys(10).unwrap().is_empty());
}

/// Why: a message that will never succeed must not block its key forever: once it has used
/// its retries it is dead, and the key's later messages flow, in order, and only after it died.
#[test]
fn a_dead_head_unblocks_its_key() {
    const SCHEMA: &str = "ordering_dead_head";
    let (pool, store, outbox) = ordered_in(SCHEMA, 8, |b| b.batch_size(10).max_retries(2));
    let mut conn = pool.get().unwrap();
    add_values(&outbox, &mut *conn, "K", &numbered("K", 5));
    let log = Log::new();
    let handle = outbox.start(refusing(&log, "K-1")).unwrap();
    let entries = finish(handle, &log, 4, &pool, SCHEMA);
    assert_eq!(published(&entries, "K"), ["K-0", "K-2", "K-3", "K-4"]);
    // max_retries(2): three failures, then dead; and every failure came before K-2.
    let failed = entries.iter().filter(|d| !d.ok && d.value == "K-1").count();
    assert_eq!(failed, 3, "{entries:?}");
    let last_failure = entries.iter().rposition(|d| !d.ok).unwrap();
    let first_k2 = entries
        .iter()
        .position(|d| d.ok && d.value == "K-2")
        .unwrap();
    assert!(last_failure < first_k2, "{entries:?}");
    let row = conn
        .query_one(
            &format!("SELECT convert_from(value, 'UTF8'), attempts, last_error FROM {SCHEMA}.outbox_messages WHERE state = 'dead'"),
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, Option<String>>(2)
        ),
        ("K-1".into(), 3, Some("K-1 refused".into()))
    );
    assert!(store.blocked_keys(10).unwrap().is_empty());
}

/// Why: an operator must be able to see a stuck key and give up on the message that blocks
/// it. K-1 fails forever: `blocked_keys` lists K (head K-1, attempts, last error, 3 waiting),
/// and not the key F that flows; K-2.. wait. `skip_message` refuses ids that are not pending,
/// then skips K-1 (retried while a relay happens to hold it): K-1 is dead with "skipped", K-2..
/// flow in order, and no key is blocked any more.
#[test]
fn a_skipped_head_unblocks_its_key_and_blocked_keys_shows_it() {
    const SCHEMA: &str = "ordering_skip";
    let (pool, store, outbox) = ordered_in(SCHEMA, 8, |b| {
        b.batch_size(10).max_retries(10_000).backoff(
            Backoff::exponential(Duration::from_millis(50), Duration::from_millis(100))
                .without_jitter(),
        )
    });
    let mut conn = pool.get().unwrap();
    let mut msgs: Vec<(String, String)> = Vec::new();
    for i in 0..5 {
        msgs.push(("K".into(), format!("K-{i}")));
        msgs.push(("F".into(), format!("F-{i}")));
    }
    add_pairs(&outbox, &mut *conn, &msgs);
    let (k0, k1) = (id_of(&pool, SCHEMA, "K-0"), id_of(&pool, SCHEMA, "K-1"));
    let log = Log::new();
    let handle = outbox.start(refusing(&log, "K-1")).unwrap();
    let blocked_twice = || {
        store
            .blocked_keys(10)
            .unwrap()
            .iter()
            .any(|b| b.key == "K" && b.attempts >= 2)
    };
    assert!(
        eventually(PATIENCE, || blocked_twice()
            && published(&log.entries(), "F").len() == 5),
        "{}",
        table_state(&pool, SCHEMA)
    );
    let blocked = store.blocked_keys(10).unwrap();
    assert_eq!(blocked.len(), 1, "only K is blocked: {blocked:?}");
    let b = &blocked[0];
    assert_eq!(
        (b.key.as_str(), b.head_id, b.waiting),
        ("K", k1, 3),
        "{b:?}"
    );
    assert!(b.attempts >= 2, "{b:?}");
    assert_eq!(b.last_error.as_deref(), Some("K-1 refused"), "{b:?}");
    assert_eq!(published(&log.entries(), "K"), ["K-0"]);

    // Not pending (K-0 was sent and deleted; no such id): nothing to skip.
    assert!(!store.skip_message(k0).unwrap());
    assert!(!store.skip_message(i64::MAX).unwrap());
    // K-1 is pending but may be in flight at any instant (then: false, try again).
    assert!(
        eventually(PATIENCE, || store.skip_message(k1).unwrap()),
        "{}",
        table_state(&pool, SCHEMA)
    );
    let entries = finish(handle, &log, 9, &pool, SCHEMA);
    assert_eq!(published(&entries, "K"), ["K-0", "K-2", "K-3", "K-4"]);
    assert_eq!(order_violations(&entries), Vec::<String>::new());
    let row = conn
        .query_one(
            &format!("SELECT state, last_error FROM {SCHEMA}.outbox_messages WHERE id = {k1}"),
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "dead");
    let reason: Option<String> = row.get(1);
    assert!(
        reason.as_deref().unwrap_or("").starts_with("skipped"),
        "{reason:?}"
    );
    assert!(store.blocked_keys(10).unwrap().is_empty());
    // Dead now: skipping again does nothing.
    assert!(!store.skip_message(k1).unwrap());
}

// ---------------------------------------------------------------------------------------------
// 2. Followers of a failed message
// ---------------------------------------------------------------------------------------------

/// Why: in a batch [K-0, K-1, K-2, ...] where K-1 fails, publishing K-2 would overtake K-1,
/// and charging K-2 an attempt for a send that never happened would kill innocent messages
/// after enough failures of their head. `send_each` must not hand K-2.. to the closure, and the
/// relay must give them back with attempts = 0. Messages of another key in the same batch
/// are published. The second batch is held at the Sender so the table can be read between
/// the two (rows a claim holds still show their committed state to other sessions).
#[test]
fn followers_of_a_failed_message_are_neither_published_nor_charged() {
    const SCHEMA: &str = "ordering_followers";
    let (pool, _, outbox) = ordered_in(SCHEMA, 8, |b| b.batch_size(10));
    let mut conn = pool.get().unwrap();
    let order = ["K-0", "K-1", "L-0", "K-2", "K-3", "L-1", "K-4"];
    add_pairs(&outbox, &mut *conn, &keyed_by_prefix(&order));
    let k1 = id_of(&pool, SCHEMA, "K-1");

    /// What one Sender call saw: (value, attempts) of the batch, and what it published.
    #[derive(Debug, Default, Clone)]
    struct Seen {
        batch: Vec<(String, u32)>,
        handed: Vec<String>,
    }
    let log = Log::new();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let (l, s) = (log.clone(), seen.clone());
    let handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            let call = s.lock().unwrap().len();
            if call == 1 {
                // Hold the second batch until the test has read the table.
                let _ = entered_tx.try_send(());
                let _ = go_rx.recv_timeout(PATIENCE);
            }
            let mut this = Seen {
                batch: batch.iter().map(|m| (text(m), m.attempts())).collect(),
                handed: Vec::new(),
            };
            batch.send_each(|m| {
                this.handed.push(text(m));
                if call == 0 && m.value() == b"K-1" {
                    l.push_failure(m);
                    Err("K-1 refused once")
                } else {
                    l.push(m);
                    Ok(())
                }
            });
            s.lock().unwrap().push(this);
            Ok(())
        })
        .unwrap();
    entered_rx
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("K was never claimed again\n{}", table_state(&pool, SCHEMA)));
    let state = attempts(&pool, SCHEMA);
    let first = seen.lock().unwrap()[0].clone();
    go_tx.send(()).unwrap();
    let entries = finish(handle, &log, 7, &pool, SCHEMA);

    // The first claim took K's head with its run, and L's.
    let in_batch: Vec<&str> = first.batch.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(in_batch, order, "{first:?}");
    assert_eq!(first.handed, ["K-0", "K-1", "L-0", "L-1"], "{first:?}");
    let expected: Vec<(String, i32)> = vec![
        ("K-1".into(), 1),
        ("K-2".into(), 0),
        ("K-3".into(), 0),
        ("K-4".into(), 0),
    ];
    assert_eq!(
        state, expected,
        "after the first batch: K-1 charged once, its followers not at all"
    );
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {SCHEMA}.outbox_messages WHERE id = {k1}")
        ),
        0,
        "K-1 was sent in the end"
    );
    let seen = seen.lock().unwrap();
    let second: Vec<(String, u32)> = vec![
        ("K-1".into(), 1),
        ("K-2".into(), 0),
        ("K-3".into(), 0),
        ("K-4".into(), 0),
    ];
    assert_eq!(seen[1].batch, second, "{seen:?}");
    assert_eq!(published(&entries, "K"), numbered("K", 5));
    assert_eq!(published(&entries, "L"), ["L-0", "L-1"]);
}

/// Why: docs/ordering.md allows a Sender that, after a failure of a key, leaves the key's
/// later messages unmarked and returns `Ok`. Those messages were not published; before the
/// fix they were recorded as sent (the `Ok` settled every unmarked message) and lost. Here
/// the first batch refuses K-1 and leaves K-2..K-4 unmarked; every K must still be
/// published, in order, and the followers must not be charged.
#[test]
fn unmarked_followers_of_a_failure_under_ok_are_not_lost() {
    const SCHEMA: &str = "ordering_unmarked_followers";
    let (pool, _, outbox) = ordered_in(SCHEMA, 8, |b| b.batch_size(10));
    let mut conn = pool.get().unwrap();
    let order = ["K-0", "K-1", "L-0", "K-2", "K-3", "L-1", "K-4"];
    add_pairs(&outbox, &mut *conn, &keyed_by_prefix(&order));
    let log = Log::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (l, c) = (log.clone(), calls.clone());
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            let call = c.fetch_add(1, Ordering::SeqCst);
            let mut failed: HashSet<String> = HashSet::new();
            for m in batch.iter_mut() {
                if failed.contains(m.key()) {
                    continue; // left unmarked, as docs/ordering.md allows
                }
                if call == 0 && m.value() == b"K-1" {
                    failed.insert(m.key().to_owned());
                    l.push_failure(m);
                    m.mark_failed("K-1 refused once");
                    continue;
                }
                l.push(m);
                m.mark_sent();
            }
            Ok(())
        })
        .unwrap();
    let all = log.wait_distinct(order.len(), PATIENCE);
    handle.shutdown().unwrap();
    let entries = log.entries();
    assert!(
        all,
        "unmarked followers were lost: published {:?}\n{}",
        published(&entries, "K"),
        table_state(&pool, SCHEMA)
    );
    assert_eq!(published(&entries, "K"), numbered("K", 5));
    assert_eq!(published(&entries, "L"), ["L-0", "L-1"]);
    assert!(order_violations(&entries).is_empty());
}

/// Why: the same rule on the other settlement path. When a batch's transaction is lost (the
/// Sender outlived the send timeout and the server ended the session), its outcome is recorded
/// afterwards on another connection. The followers of the failed head were not published
/// there either: they must not be charged an attempt on that path any more than on the normal
/// one (with a small `max_retries`, a follower would otherwise die without ever being sent).
#[test]
fn followers_of_a_failed_message_in_a_lost_batch_are_not_charged_either() {
    const SCHEMA: &str = "ordering_lost_followers";
    const APP: &str = "ordering_lost_followers_relay";
    let admin = pool(4);
    let relay_pool = common::named_pool(6, APP);
    let store = store(SCHEMA, &relay_pool);
    let outbox = ordered(&store, |b| {
        b.batch_size(10).send_timeout(Duration::from_millis(300))
    });
    let mut conn = admin.get().unwrap();
    let values = numbered("K", 4);
    add_values(&outbox, &mut *conn, "K", &values);

    let in_tx = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{APP}' AND state = 'idle in transaction'"
    );
    let log = Log::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let saw_open = Arc::new(AtomicBool::new(false));
    let saw_lost = Arc::new(AtomicBool::new(false));
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let (l, c, open, lost, a) = (
        log.clone(),
        calls.clone(),
        saw_open.clone(),
        saw_lost.clone(),
        admin.clone(),
    );
    let handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            let call = c.fetch_add(1, Ordering::SeqCst);
            if call == 0 {
                // Outlive the send timeout: until the server has ended the claim's session.
                open.store(count(&a, &in_tx) == 1, Ordering::SeqCst);
                lost.store(
                    eventually(PATIENCE, || count(&a, &in_tx) == 0),
                    Ordering::SeqCst,
                );
            } else if call == 1 {
                let _ = entered_tx.try_send(());
                let _ = go_rx.recv_timeout(PATIENCE);
            }
            batch.send_each(|m| {
                if call == 0 && m.value() == b"K-0" {
                    l.push_failure(m);
                    Err("K-0 refused after its claim was lost")
                } else {
                    l.push(m);
                    Ok(())
                }
            });
            Ok(())
        })
        .unwrap();
    entered_rx
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("K was never claimed again\n{}", table_state(&admin, SCHEMA)));
    let state = attempts(&admin, SCHEMA);
    let described = table_state(&admin, SCHEMA);
    go_tx.send(()).unwrap();
    let entries = finish(handle, &log, 4, &admin, SCHEMA);
    assert!(
        saw_open.load(Ordering::SeqCst),
        "the claim's transaction was not open during the send"
    );
    assert!(
        saw_lost.load(Ordering::SeqCst),
        "the server never ended the claim's session"
    );
    assert_eq!(published(&entries, "K"), values);
    let expected: Vec<(String, i32)> = vec![
        ("K-0".into(), 1),
        ("K-1".into(), 0),
        ("K-2".into(), 0),
        ("K-3".into(), 0),
    ];
    assert_eq!(
        state, expected,
        "after the lost batch's late outcome: K-0 charged once, its followers not at all\n{described}"
    );
}
