//! A private, throw-away Kafka-protocol broker for the `kafka` test, example and bench:
//! [tansu](https://crates.io/crates/tansu) (Apache-2.0) started on a free loopback port with
//! in-memory storage, its log in a temporary directory, killed with the test process.
//!
//! Clients reach it through a [`Gate`], a TCP relay on its own port that the broker
//! advertises as its address: closing the gate drops every client connection and refuses new
//! ones, as a broker that goes down does, while the broker and its data stay. (The installed
//! tansu has only memory storage, `--features dynostore`: a real restart loses every message,
//! so a restart that must keep data is played by the gate; `TempTansu::kill` and
//! `start_again` restart it for real.)
//!
//! Included with `#[path]` by `tests/kafka.rs`, `examples/kafka.rs` and `benches/kafka.rs`.

#![allow(dead_code)]

#[path = "broker.rs"]
mod broker;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use broker::{free_port, BrokerProcess};

/// The one line printed when the broker cannot be had.
pub const INSTALL_HINT: &str = "no tansu broker found (looked at $TANSU, on PATH, in $CARGO_HOME/bin and ~/.cargo/bin): install it with `cargo install tansu --locked --features dynostore` (about 25 minutes on 2 cores), or point TANSU at the binary";

/// How long a start may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(60);

pub struct TempTansu {
    /// The broker, its directory and its watchdog.
    process: BrokerProcess,
    /// Where the broker listens; clients go through `gate` instead.
    port: u16,
    gate: Gate,
}

impl TempTansu {
    /// Starts a broker, or says in one line why it cannot.
    pub fn start() -> Result<TempTansu, String> {
        let program = find_tansu().ok_or_else(|| INSTALL_HINT.to_string())?;
        let process = BrokerProcess::new("tansu", program, "tansu.log", PATIENCE)?;
        let port = free_port()?;
        let gate = Gate::open(port)?;
        let mut tansu = TempTansu {
            process,
            port,
            gate,
        };
        tansu.start_again()?;
        Ok(tansu)
    }

    /// `bootstrap.servers` for clients: the gate's address, which the broker advertises.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.gate.port)
    }

    /// The gate in front of the broker.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// How many times the broker was started.
    pub fn starts(&self) -> usize {
        self.process.starts()
    }

    /// Starts the broker (again) on the same port, and waits until it accepts connections.
    /// With memory storage a restarted broker is empty: topics must be created again.
    pub fn start_again(&mut self) -> Result<(), String> {
        let mut command = Command::new(self.process.program());
        command.args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{}", self.port),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{}", self.gate.port),
            "--storage-engine",
            "memory://tansu/",
        ]);
        self.process.start(command, self.port)
    }

    /// Creates `topic` with `partitions` partitions through the `tansu topic` command.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), String> {
        let out = Command::new(self.process.program())
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                &partitions.to_string(),
                topic,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run tansu topic create: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tansu topic create {topic} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Kills the broker (SIGKILL) and waits for it and for its port to be free; its
    /// in-memory data is gone.
    pub fn kill(&mut self) -> Result<(), String> {
        self.process.stop("KILL", self.port)
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.process.signal_group("STOP");
    }

    /// Thaws a broker frozen by [`pause`](Self::pause).
    pub fn resume(&self) {
        self.process.signal_group("CONT");
    }

    /// The last lines the broker printed, for error messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// A TCP relay from a port of its own to the broker's: the address clients use. While
/// closed it refuses connections and has dropped the ones it carried.
pub struct Gate {
    pub port: u16,
    target: u16,
    state: Arc<GateState>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct GateState {
    closed: AtomicBool,
    /// Both ends of every relayed connection, to cut them when the gate closes.
    streams: Mutex<Vec<TcpStream>>,
}

impl Gate {
    fn open(target: u16) -> Result<Gate, String> {
        let port = free_port()?;
        let gate = Gate {
            port,
            target,
            state: Arc::default(),
            acceptor: Mutex::new(None),
        };
        gate.up()?;
        Ok(gate)
    }

    /// Opens the gate (again) on the same port.
    pub fn up(&self) -> Result<(), String> {
        let mut acceptor = self.acceptor.lock().unwrap();
        if acceptor.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + PATIENCE;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("cannot bind the gate's port {}: {e}", self.port))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("gate: {e}"))?;
        self.state.closed.store(false, Ordering::SeqCst);
        let (state, target) = (self.state.clone(), self.target);
        *acceptor = Some(std::thread::spawn(move || {
            while !state.closed.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => relay(&state, client, target),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
        Ok(())
    }

    /// Closes the gate: the port refuses connections, and every relayed one is cut.
    pub fn down(&self) {
        self.state.closed.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.lock().unwrap().take() {
            let _ = acceptor.join();
        }
        for stream in self.state.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.down();
    }
}

/// Relays `client` to the broker on two threads, one per direction.
fn relay(state: &Arc<GateState>, client: TcpStream, target: u16) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    ) else {
        return;
    };
    {
        let mut streams = state.streams.lock().unwrap();
        streams.retain(|s| s.peer_addr().is_ok());
        streams.push(c3);
        streams.push(s3);
    }
    std::thread::spawn(move || pump(client, server));
    std::thread::spawn(move || pump(s2, c2));
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// `$TANSU`, then `tansu` on PATH, then `$CARGO_HOME/bin/tansu`, then `~/.cargo/bin/tansu`
/// (where `cargo install` puts it).
pub fn find_tansu() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TANSU").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    let cargo_home = std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("bin/tansu"));
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    on_path
        .into_iter()
        .chain(cargo_home)
        .chain(home)
        .find(|p| p.is_file())
}
