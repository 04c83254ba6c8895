//! `troutbox::pool`: the pool the README recommends connects, has the short timeouts the
//! relay's watchdog relies on, and reports an unreachable server as a typed error.

mod common;

use std::time::{Duration, Instant};

use troutbox::{Error, POOL_CONNECTION_TIMEOUT};

#[test]
fn the_recommended_pool_connects_and_fails_fast() {
    let pool = troutbox::pool(common::url().parse().unwrap(), 3).unwrap();
    assert_eq!(pool.connection_timeout(), POOL_CONNECTION_TIMEOUT);
    assert_eq!(pool.max_size(), 3);
    let one: i32 = pool
        .get()
        .unwrap()
        .query_one("SELECT 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(one, 1);

    // A port nobody listens on: refused, reported at once as a connection error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let err = troutbox::pool(
        format!("host=127.0.0.1 port={port} user=nobody dbname=nobody")
            .parse()
            .unwrap(),
        1,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
    assert!(err.is_connection_error());
    assert!(err.to_string().contains("refused"), "{err}");
    println!(
        "FIGURES pool: an unreachable server reported after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Refused at the first attempt: well within the pool's 10 s timeout, which r2d2 used to
    // spend retrying.
    assert!(started.elapsed() < POOL_CONNECTION_TIMEOUT);
}

/// Why (issue 22, first hour): with a wrong database name `troutbox::pool` waited its whole
/// 10 s connection timeout, then said `Pool { ..., source: Error(Some("db error")) }`: not
/// why. The server's own words must come back from the first attempt, well before the
/// pool's timeout would have run out (r2d2 retries a refused connection until then).
#[test]
fn a_refused_connection_says_why_at_once() {
    let mut config: postgres::Config = common::url().parse().unwrap();
    config.dbname("no_such_database_here");
    let started = Instant::now();
    let err = troutbox::pool(config, 2).unwrap_err();
    let took = started.elapsed();
    println!("FIGURES pool: a wrong database name reported after {took:?}: {err}");
    assert!(matches!(err, Error::Database { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("\"no_such_database_here\" does not exist"),
        "{err}"
    );
    assert!(took < POOL_CONNECTION_TIMEOUT, "took {took:?}");
}

/// The other two mistakes of a first hour: a wrong password, a host that does not exist.
/// Each comes back from the first attempt in the server's or the resolver's words.
#[test]
fn a_wrong_password_or_host_says_why_at_once() {
    let mut config: postgres::Config = common::url().parse().unwrap();
    config.password("not the password");
    let started = Instant::now();
    let err = troutbox::pool(config, 2).unwrap_err();
    let took = started.elapsed();
    println!("FIGURES pool: a wrong password reported after {took:?}: {err}");
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
    assert!(took < POOL_CONNECTION_TIMEOUT, "took {took:?}");

    // `.invalid` never resolves (RFC 2606).
    let config = "host=no-such-host.invalid user=app dbname=app"
        .parse()
        .unwrap();
    let started = Instant::now();
    let err = troutbox::pool(config, 2).unwrap_err();
    let took = started.elapsed();
    println!("FIGURES pool: an unknown host reported after {took:?}: {err}");
    assert!(err.is_connection_error(), "{err}");
    assert!(
        err.to_string().contains("no-such-host.invalid") || err.to_string().contains("lookup"),
        "the error does not say the host could not be found: {err}"
    );
    assert!(took < POOL_CONNECTION_TIMEOUT, "took {took:?}");
}

/// Why (issue 21, item 4): a pool smaller than the relay needs used to deliver nothing, for
/// ever, without a word: each claim took a batch, waited for a connection to record it in
/// the claim journal, failed, and gave it back, in a loop. The case (a pool of 1,
/// 100 messages waiting) and r2d2's default pool of 10 under `workers(10)` are now refused
/// at `start()`, naming the size needed; the size named works.
#[test]
fn a_pool_too_small_for_the_relay_is_refused_at_start() {
    const SCHEMA: &str = "pool_too_small";
    let admin = common::pool(2);
    let url: postgres::Config = common::url().parse().unwrap();
    let manager = || r2d2_postgres::PostgresConnectionManager::new(url.clone(), postgres::NoTls);
    let tiny = r2d2::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(3))
        .build(manager())
        .unwrap();
    common::store(SCHEMA, &admin);
    let outbox = |pool: &troutbox::PgPool, workers: usize, notify: bool| {
        troutbox::Outbox::builder(troutbox::PgStore::new(pool.clone()).schema(SCHEMA))
            .send_timeout(Duration::from_secs(1))
            .workers(workers)
            .notify(notify)
            .poll_interval(Duration::from_millis(5))
            .build()
            .unwrap()
    };
    let mut conn = admin.get().unwrap();
    for i in 0..100 {
        outbox(&admin, 1, false)
            .add_message(&mut *conn, "k", format!("v{i}").as_bytes())
            .unwrap();
    }
    let deliveries = common::Deliveries::new();
    match outbox(&tiny, 1, false).start(deliveries.sender()) {
        Err(Error::PoolTooSmall {
            size: 1, needed: 2, ..
        }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a relay on a pool of 1 was started"),
    }
    let default = r2d2::Pool::new(manager()).unwrap();
    let err = outbox(&default, 10, false)
        .start(deliveries.sender())
        .expect_err("10 workers on a pool of 10 were started");
    assert!(
        matches!(
            err,
            Error::PoolTooSmall {
                size: 10,
                needed: 11,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("needs 11"), "{err}");
    let err = outbox(&default, 9, true)
        .start(deliveries.sender())
        .expect_err("9 notifying workers on a pool of 10 were started");
    assert!(err.to_string().contains("needs 11"), "{err}");
    // The size named is enough.
    let enough = r2d2::Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(3))
        .build(manager())
        .unwrap();
    let mut handle = outbox(&enough, 1, false)
        .start(deliveries.sender())
        .unwrap();
    assert!(deliveries.wait_for(100, common::PATIENCE));
    handle.shutdown().unwrap();
    assert_eq!(deliveries.duplicates(), 0);
}
