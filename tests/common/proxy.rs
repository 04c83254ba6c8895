//! A TCP proxy on loopback whose `freeze` makes every flow open at that moment go silent for
//! good, sockets kept open (a NAT or load balancer that forgot the flows), while new
//! connections work: how the tests make a connection die without a FIN or an RST.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Names of the proxy's own threads, left out of the count.
pub const PROXY_THREAD: &str = "test-proxy";

/// A TCP proxy to the broker whose `freeze` makes every flow open at that moment go silent
/// for good, sockets kept open (a middlebox that forgot the flows), while new connections
/// work.
pub struct Proxy {
    pub port: u16,
    epoch: Arc<AtomicU64>,
}

impl Proxy {
    /// A proxy to `upstream` (host, port) on a free loopback port.
    pub fn start(upstream: (String, u16)) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let epoch = Arc::new(AtomicU64::new(0));
        let shared = epoch.clone();
        let named = || std::thread::Builder::new().name(PROXY_THREAD.into());
        named()
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)) else {
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

    pub fn freeze(&self) {
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
