//! Closing failed RabbitMQ connections spawns no thread that outlives them (issue 11:
//! "bound the threads spawned to close failed connections"). In a test binary of its own,
//! so that no other test's connections share the process's thread list.
//!
//! `cargo test --features rabbitmq --test rabbitmq_threads`

#[path = "common/rabbit.rs"]
mod rabbit;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use troutbox::rabbitmq::{RabbitError, RabbitSender};
use troutbox::{Batch, Message, Sender, Status};

/// Names of the proxy's own threads, left out of the count.
const PROXY_THREAD: &str = "test-proxy";

/// A TCP proxy to the broker whose `freeze` makes every flow open at that moment go silent
/// for good, sockets kept open (a middlebox that forgot the flows), while new connections
/// work.
struct Proxy {
    port: u16,
    epoch: Arc<AtomicU64>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let epoch = Arc::new(AtomicU64::new(0));
        let shared = epoch.clone();
        let named = || std::thread::Builder::new().name(PROXY_THREAD.into());
        named()
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        continue;
                    };
                    let born = shared.load(Ordering::SeqCst);
                    let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    for (from, to) in [(c, s), (server, client)] {
                        let epoch = shared.clone();
                        named()
                            .spawn(move || forward(from, to, born, &epoch))
                            .unwrap();
                    }
                }
            })
            .unwrap();
        Proxy { port, epoch }
    }

    fn freeze(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until the flow ends, or until a freeze after `born`: then keeps
/// both sockets and forwards nothing more.
fn forward(mut from: TcpStream, mut to: TcpStream, born: u64, epoch: &AtomicU64) {
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 64 * 1024];
    loop {
        if epoch.load(Ordering::SeqCst) != born {
            let _silent = (from, to);
            loop {
                std::thread::park();
            }
        }
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) if epoch.load(Ordering::SeqCst) == born => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Ok(_) => {} // frozen meanwhile: lost, as on the network
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

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
    let proxy = Proxy::start(rabbit.port());
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
    let all_gone = settled(idle, Duration::from_secs(5));
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
