//! A private, throw-away RabbitMQ broker for the `rabbitmq` test and example: started from the
//! system's `rabbitmq-server` on free loopback ports, with its node name, data and logs in a
//! temporary directory, so it can be stopped, killed and started again without touching any
//! other broker on the machine (Debian's own service listens on 5672; this one never does).
//!
//! Also a small blocking AMQP client ([`Amqp`]: lapin on a runtime of its own) for declaring
//! topology and consuming in tests.
//!
//! Included with `#[path]` by `tests/rabbitmq.rs` and `examples/rabbitmq.rs`.

#![allow(dead_code)]

#[path = "broker.rs"]
mod broker;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker::{free_port, unique, BrokerProcess};

/// The one line printed when the broker cannot be had.
pub const INSTALL_HINT: &str = "no rabbitmq-server found (looked in /usr/lib/rabbitmq/bin and on PATH): install it (Debian/Ubuntu: apt-get install rabbitmq-server; nothing needs to be running)";

/// How long a start or a stop may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(90);

pub struct TempRabbit {
    /// The `rabbitmq-server` script (the Erlang VM and its helpers are in its process
    /// group), its directory and its watchdog.
    process: BrokerProcess,
    port: u16,
    dist_port: u16,
    node: String,
}

impl TempRabbit {
    /// Starts a broker, or says in one line why it cannot.
    pub fn start() -> Result<TempRabbit, String> {
        TempRabbit::start_with("")
    }

    /// Starts a broker with `config` (`rabbitmq.conf` lines, such as
    /// `max_message_size = 1048576`) added to its configuration.
    pub fn start_with(config: &str) -> Result<TempRabbit, String> {
        let program = find_server().ok_or_else(|| INSTALL_HINT.to_string())?;
        let process = BrokerProcess::new("rabbitmq-server", program, "console.log", PATIENCE)?;
        let port = free_port()?;
        let dist_port = free_port()?;
        let node = format!("troutbox{}x{}@localhost", std::process::id(), unique());
        // Our own files, so that nothing in /etc/rabbitmq (a node name, a port, plugins) applies.
        let files = [
            ("env.conf", String::new()),
            ("enabled_plugins", "[].\n".to_string()),
            (
                "rabbitmq.conf",
                format!("listeners.tcp.default = 127.0.0.1:{port}\n{config}\n"),
            ),
        ];
        for (name, text) in files {
            fs::write(process.dir().join(name), text)
                .map_err(|e| format!("cannot write {name}: {e}"))?;
        }
        let mut rabbit = TempRabbit {
            process,
            port,
            dist_port,
            node,
        };
        rabbit.start_again()?;
        Ok(rabbit)
    }

    /// `amqp://` URL of the broker (the built-in `guest` account, allowed from loopback). The
    /// short heartbeat makes a connection to a broker that died noticed within seconds.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=5", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many times the broker was started.
    pub fn starts(&self) -> usize {
        self.process.starts()
    }

    /// Starts the broker (again), on the same port, with the same node and data, and waits
    /// until it accepts connections.
    pub fn start_again(&mut self) -> Result<(), String> {
        if self.process.is_running() {
            return Ok(());
        }
        let d = self.process.dir();
        let mut command = Command::new(self.process.program());
        command
            // The Erlang cookie goes to $HOME: keep it in the directory.
            .env("HOME", d)
            .env("RABBITMQ_CONF_ENV_FILE", d.join("env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("rabbit.pid"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env_remove("RABBITMQ_ALLOW_INPUT");
        self.process.start(command, self.port)
    }

    /// Stops the broker gracefully (SIGTERM: queues are closed cleanly) and waits for it.
    pub fn stop(&mut self) -> Result<(), String> {
        self.process.stop("TERM", self.port)
    }

    /// Kills the broker (SIGKILL: no chance to flush anything) and waits for it.
    pub fn kill(&mut self) -> Result<(), String> {
        self.process.stop("KILL", self.port)
    }

    /// Runs `rabbitmqctl` against this broker (for example
    /// `["set_vm_memory_high_watermark", "0"]`), returning its output or why it failed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let program = self.process.program().with_file_name("rabbitmqctl");
        let d = self.process.dir();
        let output = Command::new(&program)
            .current_dir(d)
            // The Erlang cookie the broker wrote to its $HOME.
            .env("HOME", d)
            .env("RABBITMQ_CONF_ENV_FILE", d.join("env.conf"))
            .env("RABBITMQ_NODENAME", &self.node)
            .args(["-n", &self.node])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "rabbitmqctl {args:?} failed ({}): {text}",
                output.status
            ))
        }
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

/// Debian keeps the real script in /usr/lib/rabbitmq/bin; the one on PATH there re-runs it
/// as the `rabbitmq` account with its output sent to /var/log, so it is the last resort.
fn find_server() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("rabbitmq-server"))
            .find(|p| p.is_file())
    })
}

/// A blocking AMQP client for tests and examples: a lapin connection and channel, driven by a
/// runtime of their own (one worker thread, so heartbeats run between calls).
pub struct Amqp {
    pub connection: lapin::Connection,
    pub channel: lapin::Channel,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Amqp {
    /// Connects, retrying for up to `patience` while the broker is (re)starting.
    pub fn connect(url: &str, patience: Duration) -> Result<Amqp, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        let deadline = Instant::now() + patience;
        let opened = runtime.block_on(async {
            loop {
                let attempt = async {
                    let connection =
                        lapin::Connection::connect(url, lapin::ConnectionProperties::default())
                            .await?;
                    let channel = connection.create_channel().await?;
                    Ok::<_, lapin::Error>((connection, channel))
                };
                match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                    Ok(Ok(opened)) => return Ok(opened),
                    Ok(Err(e)) if Instant::now() > deadline => {
                        return Err(format!("cannot connect to RabbitMQ: {e}"))
                    }
                    Err(_) if Instant::now() > deadline => {
                        return Err("cannot connect to RabbitMQ: timed out".to_string())
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        match opened {
            Ok((connection, channel)) => Ok(Amqp {
                connection,
                channel,
                runtime: Some(runtime),
            }),
            Err(e) => {
                runtime.shutdown_background();
                Err(e)
            }
        }
    }

    /// Runs `future` (typically a call on [`channel`](Self::channel)) to its end.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("the connection is open")
            .block_on(future)
    }

    /// Runs `future` for at most `limit`: `None` if it did not end by then. A call on a
    /// connection whose broker was just killed can wait forever (an acknowledgement queued
    /// after the connection's I/O loop ended is never written, so its future never ends).
    pub fn block_on_within<F: std::future::Future>(
        &self,
        limit: Duration,
        future: F,
    ) -> Option<F::Output> {
        self.block_on(async { tokio::time::timeout(limit, future).await.ok() })
    }

    /// Closes the connection (waiting up to a second for the broker) and the runtime.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            let closing = self.connection.close(200, "OK".into());
            let _ = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(1), closing).await });
            runtime.shutdown_background();
        }
    }
}

impl Drop for Amqp {
    fn drop(&mut self) {
        self.shut();
    }
}

/// The next item of a lapin stream (a consumer's deliveries).
pub async fn next<S: futures_core::Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx)).await
}

/// Ready messages in `queue` (not counting delivered, unacknowledged ones), which must exist.
pub fn ready(url: &str, queue: &str) -> u32 {
    queue_count(url, queue, true)
}

/// Messages ready in `queue`; with `passive` it must exist, else it is declared (durable)
/// if it does not.
pub fn queue_count(url: &str, queue: &str, passive: bool) -> u32 {
    let amqp = Amqp::connect(url, PATIENCE).unwrap();
    let declared = amqp
        .block_on(amqp.channel.queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive,
                durable: !passive,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        ))
        .unwrap();
    amqp.close();
    declared.message_count()
}
