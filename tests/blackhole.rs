//! A connection that dies silently (issue 11): NATs, load balancers and failovers drop idle
//! flows without a FIN or an RST, and a client waiting on such a flow waits until the kernel
//! gives up, two hours with default keepalives. The relay's connections here go through a
//! proxy that, at one moment, stops forwarding every flow open at that moment (keeping the
//! sockets open, so nothing tells the client), while new connections work. Producers commit
//! directly. Delivery must resume within the relay's bound (send timeout + pool connection
//! timeout + 5 s), with nothing lost.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, pool, store};
use proxy::Proxy;
use r2d2_postgres::PostgresConnectionManager;
use troutbox::{Batch, Error, Outbox, PgPool, PgStore};

/// The test server's address, and a config reaching it through `port` on loopback instead.
fn through_proxy() -> ((String, u16), impl Fn(u16) -> postgres::Config) {
    let config: postgres::Config = common::url().parse().unwrap();
    let (host, port) = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(postgres::config::Host::Tcp(h)), Some(p)) => (h.clone(), *p),
        _ => panic!("the test server is reached over TCP"),
    };
    let make = move |proxy_port: u16| {
        let mut through = postgres::Config::new();
        through.host("127.0.0.1").port(proxy_port);
        if let Some(user) = config.get_user() {
            through.user(user);
        }
        if let Some(password) = config.get_password() {
            through.password(password);
        }
        if let Some(dbname) = config.get_dbname() {
            through.dbname(dbname);
        }
        through
    };
    ((host, port), make)
}

#[test]
fn a_silently_dropped_connection_does_not_stall_the_relay() {
    const SCHEMA: &str = "blackhole";
    let direct = pool(4);
    store(SCHEMA, &direct);
    let (upstream, through) = through_proxy();
    let proxy = Proxy::start(upstream);
    let through = through(proxy.port);
    let relay_pool: PgPool = r2d2::Pool::builder()
        .max_size(8)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(2))
        .build(PostgresConnectionManager::new(through, postgres::NoTls))
        .unwrap();
    let replaced = Arc::new(Mutex::new(0usize));
    let r = replaced.clone();
    let outbox = Outbox::builder(PgStore::new(relay_pool).schema(SCHEMA))
        .send_timeout(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(10))
        .error_handler(move |e| {
            if matches!(e, Error::WorkerReplaced { .. }) {
                *r.lock().unwrap() += 1;
            }
        })
        .build()
        .unwrap();
    let producer = Outbox::builder(PgStore::new(direct.clone()).schema(SCHEMA))
        .build()
        .unwrap();
    let delivered: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let d = delivered.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            d.lock()
                .unwrap()
                .extend(batch.iter().map(|m| m.value().to_vec()));
            Ok(())
        })
        .unwrap();
    let mut conn = direct.get().unwrap();
    let mut produce = |range: std::ops::Range<u32>| {
        for i in range {
            producer
                .add_message(&mut *conn, "k", i.to_string().as_bytes())
                .unwrap();
        }
    };
    produce(0..100);
    assert!(eventually(common::PATIENCE, || delivered
        .lock()
        .unwrap()
        .len()
        == 100));

    proxy.freeze();
    let frozen_at = Instant::now();
    produce(100..300);
    // The bound: send timeout 1 s + pool connection timeout 2 s + 5 s = 8 s, plus the
    // watchdog's half-second look and the time to drain; the wait is only a hang guard.
    let resumed = eventually(Duration::from_secs(60), || {
        delivered.lock().unwrap().len() == 300
    });
    let took = frozen_at.elapsed();
    println!(
        "FIGURES blackhole: all 300 delivered {:.1} s after the freeze, workers replaced {}, health {:?}",
        took.as_secs_f64(),
        replaced.lock().unwrap(),
        handle.health()
    );
    assert!(resumed, "delivery did not resume after the freeze");
    assert!(*replaced.lock().unwrap() >= 1);
    assert!(handle.health().replaced >= 1);
    // Shut down without waiting on the stuck threads: they are detached.
    let _ = handle.shutdown_timeout(Duration::from_secs(5));
}

/// Why (issue 21, item 5): the same frozen path, with every option at its default and the
/// pool the README builds (`troutbox::pool`). Before the fix the relay never recovered: each
/// watchdog period was `send_timeout` + 10 s + 5 s, and the replacement worker was handed an
/// idle pooled connection from before the freeze, whose check by r2d2 hung without a bound,
/// costing another period each time (6,179 of 6,438 messages undelivered 100 s after the
/// freeze). Delivery must now resume within `send_timeout` + 15 s (45 s) of the freeze.
#[test]
fn with_the_defaults_a_frozen_path_costs_at_most_send_timeout_plus_15_s() {
    const SCHEMA: &str = "blackhole_defaults";
    let direct = pool(4);
    store(SCHEMA, &direct);
    let (upstream, through) = through_proxy();
    let proxy = Proxy::start(upstream);
    let relay_pool = troutbox::pool(through(proxy.port), 10).unwrap();
    let replaced = Arc::new(Mutex::new(0usize));
    let r = replaced.clone();
    let outbox = Outbox::builder(PgStore::new(relay_pool).schema(SCHEMA))
        .error_handler(move |e| {
            if matches!(e, Error::WorkerReplaced { .. }) {
                *r.lock().unwrap() += 1;
            }
        })
        .build()
        .unwrap();
    let producer = Outbox::builder(PgStore::new(direct.clone()).schema(SCHEMA))
        .build()
        .unwrap();
    type Seen = (HashSet<Vec<u8>>, Option<Instant>);
    let delivered: Arc<Mutex<Seen>> = Arc::default();
    let d = delivered.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            let mut d = d.lock().unwrap();
            for m in batch.iter() {
                // The first delivery of a message produced after the freeze.
                if m.value().starts_with(b"after") && d.1.is_none() {
                    d.1 = Some(Instant::now());
                }
                d.0.insert(m.value().to_vec());
            }
            Ok(())
        })
        .unwrap();
    let mut conn = direct.get().unwrap();
    let mut produce = |prefix: &str, n: u32| {
        for i in 0..n {
            producer
                .add_message(&mut *conn, "k", format!("{prefix}{i}").as_bytes())
                .unwrap();
        }
    };
    produce("before", 100);
    assert!(eventually(common::PATIENCE, || delivered
        .lock()
        .unwrap()
        .0
        .len()
        == 100));

    proxy.freeze();
    let frozen_at = Instant::now();
    produce("after", 200);
    // A hang guard only: the bound is asserted below.
    let all = eventually(Duration::from_secs(120), || {
        delivered.lock().unwrap().0.len() == 300
    });
    let resumed = delivered
        .lock()
        .unwrap()
        .1
        .map(|t| t.duration_since(frozen_at));
    println!(
        "FIGURES blackhole_defaults: delivery resumed {:.1} s after the freeze (bound 45 s), all 300 delivered after {:.1} s, workers replaced {}",
        resumed.map_or(f64::NAN, |r| r.as_secs_f64()),
        frozen_at.elapsed().as_secs_f64(),
        replaced.lock().unwrap(),
    );
    assert!(all, "delivery did not resume after the freeze");
    let bound = troutbox::DEFAULT_SEND_TIMEOUT + Duration::from_secs(15);
    assert!(
        resumed.is_some_and(|r| r <= bound),
        "delivery resumed after {resumed:?}, past {bound:?}"
    );
    let _ = handle.shutdown_timeout(Duration::from_secs(5));
}
