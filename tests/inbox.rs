//! The inbox against a real PostgreSQL server: first delivery and duplicates, concurrent
//! first deliveries at each isolation level, duplicates across a slot (partition) boundary,
//! retention by dropped partitions, migrations, and a role with only the documented rights.

mod common;
#[path = "common/inbox.rs"]
mod helpers;

use std::thread;
use std::time::Duration;

use common::{eventually, pool, PATIENCE};
use helpers::{built, deliver, fresh_schema, inbox, TestClock, MINUTE};
use postgres::IsolationLevel;
use troutbox::{Error, Inbox, PgPool, Received};

/// One delivery in its own transaction, rolled back: it leaves no entry (a committed
/// duplicate adds the entry of its own slot, which extends how long the message is
/// remembered).
fn probe(inbox: &Inbox, pool: &PgPool, consumer: &str, id: &str) -> Received {
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    let received = inbox.receive(&mut tx, consumer, id).unwrap();
    tx.rollback().unwrap();
    received
}

fn entries(pool: &PgPool, schema: &str) -> i64 {
    common::count(
        pool,
        &format!("SELECT count(*) FROM \"{schema}\".inbox_messages"),
    )
}

fn partitions(pool: &PgPool, schema: &str) -> Vec<String> {
    let mut names: Vec<String> = pool
        .get()
        .unwrap()
        .query(
            &format!(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = '\"{schema}\".inbox_messages'::regclass"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

#[test]
fn first_delivery_then_duplicates_per_consumer() {
    let pool = pool(4);
    for (schema, window) in [("inbox_basic", Some(3600)), ("inbox_basic_forever", None)] {
        let inbox = inbox(schema, &pool, window);
        assert_eq!(deliver(&inbox, &pool, "billing", "m:1"), Received::First);
        assert_eq!(
            deliver(&inbox, &pool, "billing", "m:1"),
            Received::Duplicate
        );
        assert_eq!(
            deliver(&inbox, &pool, "billing", "m:1"),
            Received::Duplicate
        );
        // Another consumer has entries of its own; another id is another message.
        assert_eq!(deliver(&inbox, &pool, "shipping", "m:1"), Received::First);
        assert_eq!(deliver(&inbox, &pool, "billing", "m:2"), Received::First);

        // A delivery whose transaction rolls back was never received.
        let mut conn = pool.get().unwrap();
        let mut tx = conn.transaction().unwrap();
        assert!(inbox.receive(&mut tx, "billing", "m:3").unwrap().is_first());
        tx.rollback().unwrap();
        assert_eq!(deliver(&inbox, &pool, "billing", "m:3"), Received::First);
        assert_eq!(
            deliver(&inbox, &pool, "billing", "m:3"),
            Received::Duplicate
        );
    }
}

#[test]
fn a_prepared_inbox_answers_as_the_inbox_does() {
    let pool = pool(4);
    let schema = "inbox_prepared";
    let window = 10 * MINUTE;
    fresh_schema(schema, &pool);
    let boundary = 2_200_000_000 / window * window;
    let (before, after) = (TestClock::at(boundary - 1), TestClock::at(boundary + 1));
    let early = built(schema, &pool, Some(window), Some(&before));
    let late = built(schema, &pool, Some(window), Some(&after));
    let plain = built(schema, &pool, Some(window), None);
    let far = built(
        schema,
        &pool,
        Some(window),
        Some(&TestClock::at(boundary + 3 * window)),
    );
    early.migrate().unwrap();

    let mut conn = pool.get().unwrap();
    let (early, late, plain, far) = (
        early.prepare(&mut *conn).unwrap(),
        late.prepare(&mut *conn).unwrap(),
        plain.prepare(&mut *conn).unwrap(),
        far.prepare(&mut *conn).unwrap(),
    );
    let mut deliver = |prepared: &troutbox::PreparedInbox, id: &str| {
        let mut tx = conn.transaction().unwrap();
        let received = prepared.receive(&mut tx, "c", id).unwrap();
        tx.commit().unwrap();
        received
    };
    assert_eq!(deliver(&plain, "p1"), Received::First);
    assert_eq!(deliver(&plain, "p1"), Received::Duplicate);
    assert_eq!(deliver(&early, "p2"), Received::First);
    assert_eq!(deliver(&late, "p2"), Received::Duplicate);
    // Two windows later, on its own clock, a prepared inbox has forgotten it.
    assert_eq!(deliver(&far, "p2"), Received::First);

    let mut tx = conn.transaction().unwrap();
    let err = plain.receive(&mut tx, "c", "").unwrap_err();
    assert!(matches!(err, Error::InvalidMessageId { .. }), "{err}");
    drop(tx);
    let forever = built(schema, &pool, None, None);
    let prepared = forever.prepare(&mut *conn).unwrap();
    let mut tx = conn.transaction().unwrap();
    let err = prepared.receive(&mut tx, "c", "p3").unwrap_err();
    assert!(matches!(err, Error::InboxWindowMismatch { .. }), "{err}");
    drop(tx);
    let missing = built("inbox_prepared_missing", &pool, Some(window), None);
    let err = missing.prepare(&mut *conn).unwrap_err();
    assert!(matches!(err, Error::InboxNotMigrated { .. }), "{err}");
}

#[test]
fn invalid_inputs_are_typed_errors_and_leave_the_transaction_usable() {
    let pool = pool(2);
    let inbox = inbox("inbox_inputs", &pool, Some(3600));
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    let long = "x".repeat(troutbox::inbox::MAX_MESSAGE_ID_LEN + 1);
    for (consumer, id) in [
        ("", "m"),
        ("c", ""),
        ("c\0d", "m"),
        ("c", "m\0"),
        ("c", long.as_str()),
    ] {
        let err = inbox.receive(&mut tx, consumer, id).unwrap_err();
        assert!(
            matches!(err, Error::InvalidMessageId { .. }),
            "{consumer:?}/{id:?}: {err}"
        );
    }
    // Nothing reached the server: the transaction goes on.
    assert!(inbox.receive(&mut tx, "c", "m").unwrap().is_first());
    tx.commit().unwrap();
}

#[test]
fn migrate_is_idempotent_concurrent_and_refuses_another_window() {
    let pool = pool(10);
    let schema = "inbox_migrate";
    fresh_schema(schema, &pool);
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let pool = pool.clone();
            thread::spawn(move || built(schema, &pool, Some(3600), None).migrate())
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let inbox = built(schema, &pool, Some(3600), None);
    inbox.migrate().unwrap();
    assert_eq!(deliver(&inbox, &pool, "c", "m"), Received::First);

    // Another window, or forever: refused by migrate and by receive.
    for other in [Some(7200), None] {
        let wrong = built(schema, &pool, other, None);
        let err = wrong.migrate().unwrap_err();
        assert!(matches!(err, Error::InboxWindowMismatch { .. }), "{err}");
        let mut conn = pool.get().unwrap();
        let mut tx = conn.transaction().unwrap();
        let err = wrong.receive(&mut tx, "c", "m2").unwrap_err();
        assert!(matches!(err, Error::InboxWindowMismatch { .. }), "{err}");
    }

    // A table from a newer troutbox.
    pool.get()
        .unwrap()
        .execute(
            &format!("UPDATE \"{schema}\".troutbox_inboxes SET version = 99"),
            &[],
        )
        .unwrap();
    let err = built(schema, &pool, Some(3600), None)
        .migrate()
        .unwrap_err();
    assert!(
        matches!(err, Error::InboxSchemaTooNew { found: 99, .. }),
        "{err}"
    );

    // Never migrated.
    let missing = built("inbox_never_migrated", &pool, Some(3600), None);
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    let err = missing.receive(&mut tx, "c", "m").unwrap_err();
    assert!(matches!(err, Error::InboxNotMigrated { .. }), "{err}");
}

#[test]
fn invalid_configuration_is_refused_by_build() {
    let pool = pool(1);
    let builder = || Inbox::builder(pool.clone());
    for bad in [
        builder().schema("bad name").build(),
        builder().table("x\"; DROP TABLE t; --").build(),
        builder().table(&"t".repeat(51)).build(),
        builder().window(Duration::from_secs(59)).build(),
        builder().window(Duration::from_millis(60_500)).build(),
        builder().window(Duration::from_secs(400 * 86_400)).build(),
        builder().partitions_ahead(1001).build(),
    ] {
        let err = bad.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidIdentifier { .. } | Error::InvalidConfig { .. }
            ),
            "{err}"
        );
    }
    assert!(builder().table(&"t".repeat(50)).build().is_ok());
}

/// The pid of the connection behind `client`.
fn pid(client: &mut impl postgres::GenericClient) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0)
}

/// Waits until the backend `pid` waits for a lock.
fn wait_until_blocked(pool: &PgPool, pid: i32) {
    assert!(
        eventually(PATIENCE, || {
            pool.get()
                .unwrap()
                .query_one(
                    "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        }),
        "the second delivery never waited for the first"
    );
}

/// Two instances receive the same message at once: the second runs at `isolation` on
/// `second` (an inbox whose clock may differ), waits for the first, which then commits or
/// rolls back. Returns what the second got.
fn race(
    pool: &PgPool,
    first: &Inbox,
    second: &Inbox,
    isolation: IsolationLevel,
    first_commits: bool,
    id: &str,
) -> Result<Received, Error> {
    let mut conn = pool.get().unwrap();
    let mut tx1 = conn.transaction().unwrap();
    assert_eq!(first.receive(&mut tx1, "c", id).unwrap(), Received::First);

    let (pool2, second, id2) = (pool.clone(), second.clone(), id.to_owned());
    let (pid_tx, pid_rx) = crossbeam_channel::bounded(1);
    let racer = thread::spawn(move || {
        let mut conn = pool2.get().unwrap();
        let mut tx2 = conn
            .build_transaction()
            .isolation_level(isolation)
            .start()
            .unwrap();
        pid_tx.send(pid(&mut tx2)).unwrap();
        let received = second.receive(&mut tx2, "c", &id2);
        if received.is_ok() {
            tx2.commit().unwrap();
        }
        received
    });
    let pid2 = pid_rx.recv().unwrap();
    wait_until_blocked(pool, pid2);
    if first_commits {
        tx1.commit().unwrap();
    } else {
        tx1.rollback().unwrap();
    }
    racer.join().unwrap()
}

#[test]
fn concurrent_first_delivery_read_committed_waits_then_sees_the_outcome() {
    let pool = pool(6);
    let inbox = inbox("inbox_race_rc", &pool, Some(3600));
    let rc = IsolationLevel::ReadCommitted;
    assert_eq!(
        race(&pool, &inbox, &inbox, rc, true, "a").unwrap(),
        Received::Duplicate
    );
    assert_eq!(
        race(&pool, &inbox, &inbox, rc, false, "b").unwrap(),
        Received::First
    );
    // "b" is now recorded once, by the second transaction.
    assert_eq!(deliver(&inbox, &pool, "c", "b"), Received::Duplicate);

    let forever = inbox_forever(&pool);
    assert_eq!(
        race(&pool, &forever, &forever, rc, true, "a").unwrap(),
        Received::Duplicate
    );
    assert_eq!(
        race(&pool, &forever, &forever, rc, false, "b").unwrap(),
        Received::First
    );
}

fn inbox_forever(pool: &PgPool) -> Inbox {
    inbox("inbox_race_forever", pool, None)
}

#[test]
fn concurrent_first_delivery_under_repeatable_read_and_serializable_is_a_retryable_error() {
    let pool = pool(6);
    let inbox = inbox("inbox_race_rr", &pool, Some(3600));
    for (n, isolation) in [IsolationLevel::RepeatableRead, IsolationLevel::Serializable]
        .into_iter()
        .enumerate()
    {
        // The first commits while the second waits: the second cannot see it, and is
        // refused rather than told First.
        let err = race(&pool, &inbox, &inbox, isolation, true, &format!("w{n}")).unwrap_err();
        assert!(err.is_retryable(), "{err}");
        // Its retry (a new transaction) sees the duplicate.
        assert_eq!(
            deliver(&inbox, &pool, "c", &format!("w{n}")),
            Received::Duplicate
        );
        // The first rolls back: the second proceeds.
        assert_eq!(
            race(&pool, &inbox, &inbox, isolation, false, &format!("r{n}")).unwrap(),
            Received::First
        );

        // The first committed after the second's snapshot was taken, without any wait.
        let mut conn = pool.get().unwrap();
        let mut tx2 = conn
            .build_transaction()
            .isolation_level(isolation)
            .start()
            .unwrap();
        tx2.query_one("SELECT 1", &[]).unwrap(); // the snapshot
        assert_eq!(
            deliver(&inbox, &pool, "c", &format!("s{n}")),
            Received::First
        );
        let err = inbox.receive(&mut tx2, "c", &format!("s{n}")).unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }
}

#[test]
fn a_duplicate_across_a_slot_boundary_is_detected() {
    let pool = pool(6);
    let schema = "inbox_boundary";
    let window = 10 * MINUTE;
    fresh_schema(schema, &pool);
    let boundary = 1_800_000_000 / window * window + window;
    let before = TestClock::at(boundary - 1);
    let after = TestClock::at(boundary + 1);
    let early = built(schema, &pool, Some(window), Some(&before));
    let late = built(schema, &pool, Some(window), Some(&after));
    early.migrate().unwrap();

    // One second before the boundary, then one second after: two slots.
    assert_eq!(deliver(&early, &pool, "c", "x"), Received::First);
    assert_eq!(deliver(&late, &pool, "c", "x"), Received::Duplicate);
    // The reverse order too (a clock behind another instance's).
    assert_eq!(deliver(&late, &pool, "c", "y"), Received::First);
    assert_eq!(deliver(&early, &pool, "c", "y"), Received::Duplicate);

    // A duplicate just under a window later, across the boundary.
    before.set(boundary - 1);
    after.set(boundary - 1 + window - 1);
    assert_eq!(deliver(&early, &pool, "c", "z"), Received::First);
    assert_eq!(deliver(&late, &pool, "c", "z"), Received::Duplicate);
    // At best (first delivery at the start of a slot), almost two windows later.
    before.set(boundary - window);
    after.set(boundary + window - 1);
    assert_eq!(deliver(&early, &pool, "c", "z2"), Received::First);
    assert_eq!(deliver(&late, &pool, "c", "z2"), Received::Duplicate);

    // Two concurrent first deliveries straddling the boundary: exactly one proceeds.
    before.set(boundary - 1);
    after.set(boundary + 1);
    let rc = IsolationLevel::ReadCommitted;
    assert_eq!(
        race(&pool, &early, &late, rc, true, "s1").unwrap(),
        Received::Duplicate
    );
    assert_eq!(
        race(&pool, &late, &early, rc, true, "s2").unwrap(),
        Received::Duplicate
    );
    assert_eq!(
        race(&pool, &early, &late, rc, false, "s3").unwrap(),
        Received::First
    );

    // Two whole slots later, the message is forgotten: past the window.
    after.set(boundary + 2 * window);
    assert_eq!(deliver(&late, &pool, "c", "x"), Received::First);
}

#[test]
fn retention_drops_whole_partitions_never_an_entry_inside_its_window() {
    let pool = pool(6);
    let schema = "inbox_retention";
    let window = 10 * MINUTE;
    fresh_schema(schema, &pool);
    let start = 1_900_000_000 / window * window;
    let clock = TestClock::at(start + 5);
    let inbox = built(schema, &pool, Some(window), Some(&clock));
    inbox.migrate().unwrap();
    let slot_partition = |s: i64| format!("inbox_messages_p{s}");
    // Partitions for the previous slot, this one and two ahead, plus DEFAULT.
    assert_eq!(
        partitions(&pool, schema),
        vec![
            "inbox_messages_default".to_owned(),
            slot_partition(start - window),
            slot_partition(start),
            slot_partition(start + window),
            slot_partition(start + 2 * window),
        ]
    );
    // Received at the very end of its slot: the entry that needs its partitions longest.
    let received_at = start + window - 5;
    clock.set(received_at);
    assert_eq!(deliver(&inbox, &pool, "c", "old"), Received::First);

    // Every few minutes until the window is over, maintenance runs; the entry is still
    // there and still catches its duplicate.
    let mut t = received_at;
    while t < received_at + window {
        clock.set(t);
        let report = inbox.run_maintenance_once().unwrap();
        assert!(!report.locked_out);
        assert_eq!(
            probe(&inbox, &pool, "c", "old"),
            Received::Duplicate,
            "forgotten {} s after it was received",
            t - received_at
        );
        t += 2 * MINUTE + 7;
    }

    // Once no delivery can land in its slot or match it, its partition goes, whole: a
    // minute after the end of the next slot, not before.
    clock.set(start + 2 * window + MINUTE - 1);
    let report = inbox.run_maintenance_once().unwrap();
    assert!(
        !report.dropped.contains(&slot_partition(start)),
        "{report:?}"
    );
    // (Its row in the slot before went with that slot's partition, a slot earlier.)
    assert_eq!(entries(&pool, schema), 1);
    clock.set(start + 2 * window + MINUTE);
    let report = inbox.run_maintenance_once().unwrap();
    assert!(
        report.dropped.contains(&slot_partition(start)),
        "{report:?}"
    );
    let left = partitions(&pool, schema);
    assert!(!left.contains(&slot_partition(start)), "{left:?}");
    assert!(!left.contains(&slot_partition(start - window)), "{left:?}");
    assert_eq!(
        entries(&pool, schema),
        0,
        "no entry left behind, none deleted row by row"
    );
    assert_eq!(deliver(&inbox, &pool, "c", "old"), Received::First);
}

#[test]
fn maintenance_is_elected_and_entries_in_default_move_to_their_partition() {
    let pool = pool(6);
    let schema = "inbox_election";
    let window = 10 * MINUTE;
    fresh_schema(schema, &pool);
    let start = 2_000_000_000 / window * window;
    let clock = TestClock::at(start);
    let inbox = built(schema, &pool, Some(window), Some(&clock));
    inbox.migrate().unwrap();

    // Far past the partitions made ahead: entries land in DEFAULT, and still deduplicate.
    clock.set(start + 10 * window);
    assert_eq!(deliver(&inbox, &pool, "c", "far"), Received::First);
    assert_eq!(deliver(&inbox, &pool, "c", "far"), Received::Duplicate);
    let in_default = common::count(
        &pool,
        &format!("SELECT count(*) FROM \"{schema}\".inbox_messages_default"),
    );
    assert_eq!(in_default, 2);

    // Another instance holds the election: this one does nothing.
    let mut conn = pool.get().unwrap();
    let mut holder = conn.transaction().unwrap();
    holder
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!("troutbox:maintain:{}", inbox.qualified_table())],
        )
        .unwrap();
    let report = inbox.run_maintenance_once().unwrap();
    assert!(report.locked_out, "{report:?}");
    holder.rollback().unwrap();

    let report = inbox.run_maintenance_once().unwrap();
    assert!(!report.locked_out);
    let in_default = common::count(
        &pool,
        &format!("SELECT count(*) FROM \"{schema}\".inbox_messages_default"),
    );
    assert_eq!(in_default, 0, "{report:?}");
    assert_eq!(entries(&pool, schema), 2);
    assert_eq!(deliver(&inbox, &pool, "c", "far"), Received::Duplicate);
}

#[test]
fn a_consumer_role_with_usage_and_insert_only_can_receive() {
    const ROLE: &str = "troutbox_test_inbox_consumer";
    const PASSWORD: &str = "troutbox-test";
    let owner = pool(3);
    let schema = "inbox_least_privilege";
    let owned = inbox(schema, &owner, Some(3600));
    let mut admin = owner.get().unwrap();
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
               CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}';
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
             END $$;
             GRANT USAGE ON SCHEMA \"{schema}\" TO {ROLE};
             GRANT INSERT ON \"{schema}\".inbox_messages TO {ROLE};"
        ))
        .unwrap();
    let mut config: postgres::Config = common::url().parse().unwrap();
    config.user(ROLE).password(PASSWORD);
    let consumer_pool: PgPool = r2d2::Pool::builder()
        .max_size(2)
        .build(r2d2_postgres::PostgresConnectionManager::new(
            config,
            postgres::NoTls,
        ))
        .unwrap();
    let inbox = built(schema, &consumer_pool, Some(3600), None);
    assert_eq!(deliver(&inbox, &consumer_pool, "c", "p"), Received::First);
    assert_eq!(
        deliver(&inbox, &consumer_pool, "c", "p"),
        Received::Duplicate
    );
    // Including when the entries sit in partitions the owner's maintenance created since.
    owned.run_maintenance_once().unwrap();
    assert_eq!(
        deliver(&inbox, &consumer_pool, "c", "p"),
        Received::Duplicate
    );
    // The role really has nothing more: it cannot read the entries.
    let err = consumer_pool
        .get()
        .unwrap()
        .query(&format!("SELECT * FROM \"{schema}\".inbox_messages"), &[])
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
}
