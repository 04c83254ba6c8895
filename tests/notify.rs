//! Cross-process wake-ups (`OutboxBuilder::notify(true)`) against a real server: a commit
//! through one `Outbox` wakes the relay of another while its poll is far away, a listening
//! connection that is terminated comes back while polling carries on, and with notify off no
//! notification is ever sent.

mod common;

use std::time::{Duration, Instant};

use common::{
    channel, counting_server, eventually, pool, signals_allowed, signals_sent, store, Deliveries,
    PATIENCE,
};
use postgres::fallible_iterator::FallibleIterator;
use r2d2_postgres::PostgresConnectionManager;
use troutbox::{NewMessage, Outbox, PgPool, PgStore};

/// A pool whose connections carry `application_name`, to find them in `pg_stat_activity`.
fn named_pool(name: &str, size: u32) -> PgPool {
    let mut config: postgres::Config = common::url().parse().unwrap();
    config.application_name(name);
    r2d2::Pool::builder()
        .max_size(size)
        .build(PostgresConnectionManager::new(config, postgres::NoTls))
        .unwrap()
}

/// Seconds since the relay worker of `app` last ended a claim (its empty claims end with a
/// COMMIT), as the server sees it.
fn worker_idle_seconds(admin: &PgPool, app: &str) -> f64 {
    admin
        .get()
        .unwrap()
        .query_one(
            "SELECT coalesce(max(extract(epoch FROM now() - state_change))::float8, 0)
             FROM pg_stat_activity
             WHERE application_name = $1 AND state = 'idle' AND query = 'COMMIT'",
            &[&app],
        )
        .unwrap()
        .get(0)
}

/// The pid of the relay's listening connection, if it is listening.
fn listener_pid(admin: &PgPool, app: &str) -> Option<i32> {
    admin
        .get()
        .unwrap()
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
            &[&app],
        )
        .unwrap()
        .map(|r| r.get(0))
}

/// How soon a notification must deliver, in the tests where only a notification can.
const WOKEN_WITHIN: Duration = Duration::from_secs(10);

/// Waits until the idle relay worker of `app` (poll interval an hour) is in a sleep whose
/// end is more than 15 s away. Its idle sleeps double from 1 ms: they end 2^k - 1 ms after
/// it went idle, at 16.4 s, then 32.8 s. Idle for 17 s, it is in the sleep that ends at
/// 32.8 s, so a delivery within WOKEN_WITHIN (10 s) of now comes from a notification, with
/// 5 s to spare for a loaded machine.
fn wait_for_a_long_sleep(admin: &PgPool, app: &str) {
    assert!(eventually(PATIENCE * 2, || worker_idle_seconds(admin, app) >= 17.0));
}

#[test]
fn a_commit_wakes_a_relay_of_another_outbox_long_before_its_next_poll() {
    const SCHEMA: &str = "notify_wakes";
    const APP: &str = "troutbox-test-notify-wakes";
    let admin = pool(2);
    store(SCHEMA, &admin);
    let relay_pool = named_pool(APP, 4);
    // A relay whose idle sleep grows towards an hour: only a notification wakes it early.
    let relay = Outbox::builder(PgStore::new(relay_pool).schema(SCHEMA))
        .notify(true)
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let deliveries = Deliveries::new();
    let mut handle = relay.start(deliveries.sender()).unwrap();
    wait_for_a_long_sleep(&admin, APP);
    assert!(listener_pid(&admin, APP).is_some());
    let producer = Outbox::builder(PgStore::new(admin.clone()).schema(SCHEMA))
        .notify(true)
        .build()
        .unwrap();
    let mut conn = admin.get().unwrap();
    let committed = Instant::now();
    let mut tx = conn.transaction().unwrap();
    producer.add_message(&mut tx, "k", b"woken").unwrap();
    tx.commit().unwrap();
    assert!(deliveries.wait_for(1, WOKEN_WITHIN));
    let latency = committed.elapsed();
    handle.shutdown().unwrap();
    println!(
        "FIGURES notify_wakes: commit_to_sender_ms={}",
        latency.as_millis()
    );
    assert_eq!(
        listener_pid(&admin, APP),
        None,
        "the listener left the pool unsubscribed"
    );
}

/// A relay with notify on, polling at `poll_interval`, whose listening connection has just
/// been terminated by the server; with an admin pool, a producer with notify on, what the
/// relay delivered, its handle, and the terminated listener's pid.
fn relay_with_a_terminated_listener(
    schema: &str,
    app: &str,
    poll_interval: Duration,
) -> (
    PgPool,
    Outbox,
    std::sync::Arc<Deliveries>,
    troutbox::Handle,
    i32,
) {
    let admin = pool(2);
    store(schema, &admin);
    let relay = Outbox::builder(PgStore::new(named_pool(app, 4)).schema(schema))
        .notify(true)
        .poll_interval(poll_interval)
        .error_handler(|_| {})
        .build()
        .unwrap();
    let producer = Outbox::builder(PgStore::new(admin.clone()).schema(schema))
        .notify(true)
        .build()
        .unwrap();
    let deliveries = Deliveries::new();
    let handle = relay.start(deliveries.sender()).unwrap();
    assert!(eventually(PATIENCE, || listener_pid(&admin, app).is_some()));
    let first = listener_pid(&admin, app).unwrap();
    admin
        .get()
        .unwrap()
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .unwrap();
    (admin, producer, deliveries, handle, first)
}

#[test]
fn while_a_terminated_listener_is_down_polling_delivers() {
    const SCHEMA: &str = "notify_terminated";
    const APP: &str = "troutbox-test-notify-terminated";
    let (admin, producer, deliveries, mut handle, _) =
        relay_with_a_terminated_listener(SCHEMA, APP, Duration::from_millis(200));
    let mut conn = admin.get().unwrap();
    producer
        .add_message(&mut *conn, "k", b"while down")
        .unwrap();
    assert!(deliveries.wait_for(1, PATIENCE));
    handle.shutdown().unwrap();
    assert_eq!(deliveries.duplicates(), 0);
}

#[test]
fn a_terminated_listener_comes_back_and_its_notifications_wake_the_relay() {
    const SCHEMA: &str = "notify_comes_back";
    const APP: &str = "troutbox-test-notify-comes-back";
    // Polls at most hourly: after the listener is back, only a notification delivers in time.
    let (admin, producer, deliveries, mut handle, first) =
        relay_with_a_terminated_listener(SCHEMA, APP, Duration::from_secs(3600));
    let mut conn = admin.get().unwrap();
    assert!(eventually(PATIENCE, || listener_pid(&admin, APP)
        .is_some_and(|pid| pid != first)));
    wait_for_a_long_sleep(&admin, APP);
    let committed = Instant::now();
    producer
        .add_messages(&mut *conn, [NewMessage::new("k", b"after")])
        .unwrap();
    assert!(
        deliveries.wait_for(1, WOKEN_WITHIN),
        "the listener came back but its notification did not wake the relay"
    );
    println!(
        "FIGURES notify_comes_back: commit_to_sender_ms={}",
        committed.elapsed().as_millis()
    );
    handle.shutdown().unwrap();
}

#[test]
fn one_signal_per_committed_transaction_and_none_with_notify_off() {
    const SCHEMA: &str = "notify_off";
    // The server counts the statements that carry the signal: a listener cannot tell one
    // signal from three, since PostgreSQL folds identical notifications of a transaction.
    let (_server, admin) = counting_server(3);
    let store = store(SCHEMA, &admin);
    let mut listener = admin.get().unwrap();
    listener
        .batch_execute(&format!("LISTEN \"{}\"", channel(&admin, SCHEMA)))
        .unwrap();
    let quiet = Outbox::builder(store.clone()).build().unwrap();
    // Two outboxes with notify: each signals at most once per 5 ms, so the rolled-back
    // transaction's signal must not stand in for the committed one's.
    let loud_rolled_back = Outbox::builder(store.clone()).notify(true).build().unwrap();
    let loud = Outbox::builder(store.clone()).notify(true).build().unwrap();
    let mut conn = admin.get().unwrap();
    // Notify off, committed, one message and many: no signal.
    let mut tx = conn.transaction().unwrap();
    quiet.add_message(&mut tx, "k", b"1").unwrap();
    quiet
        .add_messages(
            &mut tx,
            [NewMessage::new("k", b"2"), NewMessage::new("k", b"3")],
        )
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(signals_sent(&admin), 0, "notify off sent a signal");
    // Notify on, rolled back: the signal is sent and discarded with the transaction.
    let mut tx = conn.transaction().unwrap();
    loud_rolled_back.add_message(&mut tx, "k", b"4").unwrap();
    tx.rollback().unwrap();
    assert_eq!(signals_sent(&admin), 1);
    // Notify on, committed, three statements: one signal, unless they took longer than the
    // 5 ms window (a loaded machine), then at most one per window.
    let started = Instant::now();
    let mut tx = conn.transaction().unwrap();
    loud.add_message(&mut tx, "k", b"5").unwrap();
    loud.add(&mut tx, &NewMessage::new("k", b"6").header("h", "v"))
        .unwrap();
    loud.add_messages(
        &mut tx,
        [NewMessage::new("k", b"7"), NewMessage::new("k", b"8")],
    )
    .unwrap();
    let took = started.elapsed();
    tx.commit().unwrap();
    let signals = signals_sent(&admin) - 1;
    println!(
        "FIGURES notify_signals: statements=3 signals={signals} took_us={}",
        took.as_micros()
    );
    assert!(
        (1..=signals_allowed(took)).contains(&signals),
        "{signals} signals from 3 statements in {took:?}"
    );
    // Notifications arrive in commit order: once the committed one is in, any other is too.
    let mut notifications = listener.notifications();
    let first = notifications.timeout_iter(PATIENCE).next().unwrap();
    assert!(first.is_some(), "the notifying transaction sent nothing");
    drop(notifications);
    listener.batch_execute("SELECT 1").unwrap();
    let more = listener.notifications().iter().count().unwrap();
    assert_eq!(more, 0, "notify off or a rollback notified");
}

#[test]
fn the_listener_comes_back_after_a_server_restart() {
    const APP: &str = "troutbox-test-notify-restart";
    let mut server = troutbox::testing::TempPostgres::start().unwrap();
    let pool_on = |name: &str| -> PgPool {
        let mut config: postgres::Config = server.url().parse().unwrap();
        config.application_name(name);
        r2d2::Pool::builder()
            .max_size(4)
            .connection_timeout(Duration::from_secs(2))
            .build_unchecked(PostgresConnectionManager::new(config, postgres::NoTls))
    };
    let admin = pool_on("troutbox-test-admin");
    let relay_pool = pool_on(APP);
    let store = PgStore::new(admin.clone());
    store.migrate().unwrap();
    let relay = Outbox::builder(PgStore::new(relay_pool))
        .notify(true)
        .poll_interval(Duration::from_millis(200))
        .error_handler(|_| {})
        .build()
        .unwrap();
    let producer = Outbox::builder(store).notify(true).build().unwrap();
    let deliveries = Deliveries::new();
    let mut handle = relay.start(deliveries.sender()).unwrap();
    assert!(eventually(PATIENCE, || listener_pid(&admin, APP).is_some()));
    server.stop_server().unwrap();
    server.start_server().unwrap();
    // The pools' connections died with the server; the listener reconnects with backoff.
    assert!(eventually(PATIENCE, || admin.get().is_ok()
        && listener_pid(&admin, APP).is_some()));
    let mut conn = admin.get().unwrap();
    producer
        .add_message(&mut *conn, "k", b"after restart")
        .unwrap();
    assert!(deliveries.wait_for(1, PATIENCE));
    handle.shutdown().unwrap();
}
