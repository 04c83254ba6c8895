//! Closing failed RabbitMQ connections spawns no thread that outlives them (issue 11:
//! "bound the threads spawned to close failed connections"). In a test binary of its own,
//! so that no other test's connections share the process's thread list.
//!
//! `cargo test --features rabbitmq --test rabbitmq_threads`

#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/rabbit.rs"]
mod rabbit;

use std::time::{Duration, Instant};

use proxy::{Proxy, PROXY_THREAD};

use troutbox::rabbitmq::{RabbitError, RabbitSender};
use troutbox::{Batch, Message, Sender, Status};

/// Threads of this process, but the proxy's, and the one `async-compat` starts for the whole
/// process on the first connection (lapin's I/O threads poll the socket outside any runtime,
/// so its Tokio adapter enters a global fallback runtime there: one thread, started once).
/// The test is alone in its binary, so the count moves only with the sender's connections,
/// whatever client serves them.
fn threads() -> usize {
    thread_names()
        .iter()
        .filter(|name| name.as_str() != PROXY_THREAD && !name.starts_with("async-compat/"))
        .count()
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Waits up to `patience` for the thread count to fall to `at_most`.
fn settled(at_most: usize, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while threads() > at_most {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Twenty times: a batch connects through the proxy and is confirmed, then every flow goes
/// silent and the next batch times out, so its connection is closed while the broker cannot
/// answer. Before, each such connection was closed on a thread of its own that waited for
/// the broker's close-ok until the heartbeat timeout (10 s here), so a sender failing every
/// few hundred milliseconds piled up threads; now closing waits for nothing and the
/// connection's threads end with it.
#[test]
fn failed_connections_leave_no_thread_behind() {
    let rabbit = rabbit::TempRabbit::start().unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::start(("127.0.0.1".into(), rabbit.port()));
    let url = rabbit.url().replace(
        &format!(":{}/", rabbit.port()),
        &format!(":{}/", proxy.port),
    );
    let mut sender = RabbitSender::builder(url)
        .confirm_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_secs(5))
        .mandatory(false)
        .build()
        .unwrap();
    // Threads of the process before any connection (the broker's start-up may leave a
    // transient one that ends later: differences saturate at 0).
    let idle = threads();

    const ROUNDS: i64 = 20;
    let mut connected = 0;
    let mut peak = 0;
    let started = Instant::now();
    for round in 0..ROUNDS {
        let mut batch = Batch::for_test([Message::for_test(2 * round, "nowhere", b"v")]);
        sender.send(&mut batch).unwrap();
        assert_eq!(batch.messages()[0].status(), &Status::Sent);
        connected = connected.max(threads().saturating_sub(idle));
        proxy.freeze();
        let mut batch = Batch::for_test([Message::for_test(2 * round + 1, "nowhere", b"v")]);
        let error = sender.send(&mut batch).unwrap_err();
        assert!(
            matches!(error, RabbitError::ConfirmTimeout { .. }),
            "{error}"
        );
        peak = peak.max(threads().saturating_sub(idle));
    }
    let failing = started.elapsed();
    let settle = Instant::now();
    // Whether they end at all (a leak), with room for a loaded machine: 30 s. The old
    // defect, threads waiting out the heartbeat timeout (10 s) one per failed connection, is
    // what the `peak` bound below catches, independently of any clock.
    let all_gone = settled(idle, Duration::from_secs(30));
    let left = threads().saturating_sub(idle);
    let names = thread_names();
    eprintln!(
        "rabbitmq threads: at most {connected} for a connection; {ROUNDS} connections failed \
         on a silent flow in {failing:.1?}, at most {peak} connection threads meanwhile, \
         {left} left {:.1?} after; threads now {names:?}",
        settle.elapsed()
    );
    assert!(
        (1..=3).contains(&connected),
        "{connected} threads for one connection"
    );
    assert!(
        peak <= 2 * connected,
        "{peak} connection threads while failing: closing piles threads up"
    );
    assert!(all_gone, "{left} threads outlived their failed connections");
}
