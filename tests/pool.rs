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

    // A port nobody listens on: refused, reported as a pool error.
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
    assert!(matches!(err, Error::Pool { .. }), "{err}");
    assert!(err.is_connection_error());
    println!(
        "FIGURES pool: an unreachable server reported after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Only a hang guard: the pool's own timeout is 10 s.
    assert!(started.elapsed() < Duration::from_secs(120));
}
