//! Retention and partition maintenance with an injectable clock, and dead-letter purging,
//! against a real server.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{count, eventually, partitions, pool, Deliveries, PATIENCE};
use time::OffsetDateTime;
use troutbox::{Batch, Error, Outbox, PgPool, PgStore, Retention};

const DAY: i64 = 86_400;

/// A clock the test moves by hand.
#[derive(Clone)]
struct TestClock(Arc<Mutex<OffsetDateTime>>);

impl TestClock {
    fn at(t: OffsetDateTime) -> TestClock {
        TestClock(Arc::new(Mutex::new(t)))
    }
    fn set(&self, t: OffsetDateTime) {
        *self.0.lock().unwrap() = t;
    }
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

fn keep_store(schema: &str, pool: &PgPool, clock: &TestClock, window_days: u64) -> PgStore {
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .unwrap();
    let c = clock.clone();
    let store = PgStore::new(pool.clone())
        .schema(schema)
        .retention(
            Retention::keep_sent(Duration::from_secs(window_days * DAY as u64)).partitions_ahead(2),
        )
        .maintenance_clock(move || c.now());
    store.migrate().unwrap();
    store
}

fn slot_name(t: OffsetDateTime) -> String {
    format!(
        "outbox_messages_p{}",
        t.unix_timestamp().div_euclid(DAY) * DAY
    )
}

#[test]
fn partitions_are_made_ahead_and_dropped_once_expired_but_never_with_unsent_messages() {
    let pool = pool(6);
    let now = OffsetDateTime::now_utc();
    let clock = TestClock::at(now);
    let store = keep_store("maint_expiry", &pool, &clock, 2);
    let day = time::Duration::days(1);
    assert_eq!(
        partitions(&pool, "maint_expiry", "outbox_messages"),
        vec![
            "outbox_messages_default".to_string(),
            slot_name(now),
            slot_name(now + day),
            slot_name(now + day * 2),
        ]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );

    // Relay in keep mode: two sent (one after a retry), one dead; one left pending.
    let outbox = common::fast_outbox(&store).max_retries(0).build().unwrap();
    let mut conn = pool.get().unwrap();
    for key in ["ok", "ok", "doomed"] {
        outbox.add_message(&mut *conn, key, b"v").unwrap();
    }
    let deliveries = Deliveries::new();
    let mut handle = outbox
        .start(deliveries.sender_failing("no route", |m| m.key() == "doomed"))
        .unwrap();
    assert!(eventually(PATIENCE, || store.backlog().unwrap().dead == 1));
    handle.shutdown().unwrap();
    outbox.add_message(&mut *conn, "late", b"v").unwrap();
    let backlog = store.backlog().unwrap();
    assert_eq!((backlog.sent, backlog.dead, backlog.pending), (2, 1, 1));

    // A day later: one more partition ahead, nothing expired yet.
    clock.set(now + day);
    let report = store.run_maintenance_once().unwrap();
    assert_eq!(report.created, [slot_name(now + day * 3)]);
    assert!(report.dropped.is_empty() && report.kept.is_empty());

    // Ten days later: today's partition expired, but it holds a dead and a pending message.
    clock.set(now + day * 10);
    let report = store.run_maintenance_once().unwrap();
    assert_eq!(report.kept, [(slot_name(now), 2)]);
    assert!(report.dropped.contains(&slot_name(now + day)));
    assert!(!report.dropped.contains(&slot_name(now)));
    assert!(partitions(&pool, "maint_expiry", "outbox_messages").contains(&slot_name(now)));
    // Its messages are still delivered and re-queueable.
    assert_eq!(store.requeue_all_dead().unwrap(), 1);
    let mut handle = outbox.start(deliveries.sender()).unwrap();
    assert!(eventually(PATIENCE, || store.backlog().unwrap().pending == 0));
    handle.shutdown().unwrap();
    assert_eq!(deliveries.distinct(), 4);

    // Now it holds only sent messages: dropped.
    let report = store.run_maintenance_once().unwrap();
    assert_eq!(report.dropped, [slot_name(now)]);
    assert_eq!(store.backlog().unwrap().sent, 0);
}

#[test]
fn producers_keep_committing_when_maintenance_has_not_run_for_a_week() {
    let pool = pool(6);
    let now = OffsetDateTime::now_utc();
    let clock = TestClock::at(now - time::Duration::days(8));
    let store = keep_store("maint_stale", &pool, &clock, 2);
    assert!(!partitions(&pool, "maint_stale", "outbox_messages").contains(&slot_name(now)));

    // No partition covers today: rows land in DEFAULT, and the relay still delivers.
    let outbox = Outbox::builder(store.clone())
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    for _ in 0..5 {
        let mut tx = conn.transaction().unwrap();
        outbox.add_message(&mut tx, "k", b"v").unwrap();
        tx.commit().unwrap();
    }
    let in_default = "SELECT count(*) FROM maint_stale.outbox_messages_default";
    assert_eq!(count(&pool, in_default), 5);
    let deliveries = Deliveries::new();
    let mut handle = outbox.start(deliveries.sender()).unwrap();
    assert!(deliveries.wait_for(5, PATIENCE));
    handle.shutdown().unwrap();
    outbox.add_message(&mut *conn, "pending", b"v").unwrap();

    // Maintenance catches up: today's partition appears and the rows move out of DEFAULT.
    clock.set(now);
    let report = store.run_maintenance_once().unwrap();
    assert!(report.created.contains(&slot_name(now)), "{report:?}");
    assert_eq!(count(&pool, in_default), 0);
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM maint_stale.\"{}\"", slot_name(now))
        ),
        6
    );
    // The week-old partitions were empty: dropped.
    assert!(report
        .dropped
        .contains(&slot_name(now - time::Duration::days(8))));
    let backlog = store.backlog().unwrap();
    assert_eq!((backlog.sent, backlog.pending), (5, 1));
}

fn lock_key(schema: &str) -> String {
    format!("troutbox:maintain:\"{schema}\".\"outbox_messages\"")
}

#[test]
fn one_maintainer_at_a_time_lock_released_and_taken_over_when_one_dies() {
    let pool = pool(8);
    let now = OffsetDateTime::now_utc();
    let clock = TestClock::at(now);
    let store = keep_store("maint_lock", &pool, &clock, 2);

    // Another instance is mid-run: it holds the lock in its open transaction.
    let mut other = pool.get().unwrap();
    other.batch_execute("BEGIN").unwrap();
    let other_pid: i32 = other
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let held: bool = other
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
            &[&lock_key("maint_lock")],
        )
        .unwrap()
        .get(0);
    assert!(held);
    clock.set(now + time::Duration::days(1));
    let report = store.run_maintenance_once().unwrap();
    assert!(report.locked_out && report.created.is_empty());

    // The background maintainer of this instance keeps trying; the other instance dies.
    let mut background = store.start_maintenance(Duration::from_millis(20)).unwrap();
    pool.get()
        .unwrap()
        .execute("SELECT pg_terminate_backend($1)", &[&other_pid])
        .unwrap();
    drop(other);
    let next = slot_name(now + time::Duration::days(3));
    assert!(eventually(PATIENCE, || partitions(
        &pool,
        "maint_lock",
        "outbox_messages"
    )
    .contains(&next)));
    background.shutdown().unwrap();
    background.shutdown().unwrap();

    // Concurrent runs: all succeed, each partition is created once.
    clock.set(now + time::Duration::days(2));
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || store.run_maintenance_once().unwrap())
        })
        .collect();
    let created: Vec<String> = runs
        .into_iter()
        .flat_map(|r| r.join().unwrap().created)
        .collect();
    assert_eq!(created, [slot_name(now + time::Duration::days(4))]);

    // No session holds the maintenance lock any more: it went with each run's transaction.
    let holders = count_lock_holders(&pool, &lock_key("maint_lock"));
    assert_eq!(holders, 0);
}

fn count_lock_holders(pool: &PgPool, key: &str) -> i64 {
    pool.get()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
               AND ((classid::int8 << 32) | objid::int8) = hashtextextended($1, 0)",
            &[&key],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_store_whose_retention_differs_from_its_table_is_refused() {
    let pool = pool(4);
    let plain = common::store("maint_mismatch", &pool);
    let keep = plain
        .clone()
        .retention(Retention::keep_sent(Duration::from_secs(3600)));
    let err = keep.migrate().unwrap_err();
    assert!(matches!(err, Error::RetentionMismatch { .. }), "{err}");
    let err = Outbox::builder(keep)
        .build()
        .unwrap()
        .start(|_: &mut Batch| -> Result<(), String> { Ok(()) })
        .unwrap_err();
    assert!(matches!(err, Error::RetentionMismatch { .. }), "{err}");
    let err = PgStore::new(pool.clone())
        .retention(
            Retention::keep_sent(Duration::from_secs(3600))
                .partition_interval(Duration::from_secs(10)),
        )
        .validate()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                option: "retention",
                ..
            }
        ),
        "{err}"
    );
    assert!(plain.run_maintenance_once().unwrap() == Default::default());
}

#[test]
fn dead_letters_are_purged_by_id_and_by_age_and_nothing_else_is() {
    let pool = pool(4);
    let store = common::store("maint_purge", &pool);
    let outbox = Outbox::builder(store.clone())
        .max_retries(0)
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    for key in ["d1", "d2", "d3", "ok"] {
        outbox.add_message(&mut *conn, key, b"v").unwrap();
    }
    let mut handle = outbox
        .start(|batch: &mut Batch| -> Result<(), String> {
            for m in batch.iter_mut() {
                if m.key().starts_with('d') {
                    m.mark_failed("poison");
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || store.backlog().unwrap().dead == 3));
    handle.shutdown().unwrap();
    outbox.add_message(&mut *conn, "pending", b"v").unwrap();
    let dead: Vec<i64> = store
        .dead_messages(10, None)
        .unwrap()
        .iter()
        .map(|d| d.message.id())
        .collect();
    assert_eq!(dead.len(), 3);
    assert!(dead.windows(2).all(|w| w[0] > w[1]), "newest first");
    let page2 = store.dead_messages(2, Some(dead[1])).unwrap();
    assert_eq!(page2.len(), 1);
    assert_eq!(page2[0].message.id(), dead[2]);

    let pending_id: i64 = conn
        .query_one(
            "SELECT id FROM maint_purge.outbox_messages WHERE key = 'pending'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(store.purge_dead(&[dead[0], pending_id]).unwrap(), 1);
    assert_eq!(
        store
            .purge_dead_before(OffsetDateTime::now_utc() - time::Duration::hours(1))
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .purge_dead_before(OffsetDateTime::now_utc() + time::Duration::minutes(1))
            .unwrap(),
        2
    );
    let backlog = store.backlog().unwrap();
    assert_eq!((backlog.dead, backlog.pending), (0, 1));
}

/// The retention recorded with the table (issue 11): maintenance configured with a shorter
/// window (`--keep-sent 1d` against a 30-day table would drop 29 days of audit history) or
/// another partition interval is refused and drops nothing; the table's own settings run,
/// and `recorded_retention` reads them back. Maintenance reads the database's clock.
#[test]
fn maintenance_refuses_a_retention_other_than_the_tables() {
    const SCHEMA: &str = "maintenance_recorded_retention";
    let pool = pool(4);
    let month = Duration::from_secs(30 * DAY as u64);
    let store = common::keep_sent_store(SCHEMA, &pool, Retention::keep_sent(month));
    // Names, not only their count: a refused run must neither drop nor create one.
    let catalog = || partitions(&pool, SCHEMA, "outbox_messages");
    let before = catalog();
    for wrong in [
        Retention::keep_sent(Duration::from_secs(DAY as u64)),
        Retention::keep_sent(month).partition_interval(Duration::from_secs(3600)),
    ] {
        let err = store
            .clone()
            .retention(wrong)
            .run_maintenance_once()
            .unwrap_err();
        assert!(
            matches!(err, Error::RetentionSettingsMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("2592000 s"), "{err}");
    }
    assert_eq!(catalog(), before, "a refused run changed nothing");
    assert_eq!(
        store.recorded_retention().unwrap().keep_window(),
        Some(month)
    );
    // The table's own settings, on the database's clock: the current partition and the
    // ones ahead exist (migrate made them), and nothing expired is dropped.
    let report = store.run_maintenance_once().unwrap();
    assert!(report.dropped.is_empty(), "{report:?}");
}
