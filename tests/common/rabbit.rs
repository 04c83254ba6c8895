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

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The one line printed when the broker cannot be had.
pub const INSTALL_HINT: &str = "no rabbitmq-server found (looked in /usr/lib/rabbitmq/bin and on PATH): install it (Debian/Ubuntu: apt-get install rabbitmq-server; nothing needs to be running)";

/// How long a start or a stop may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(90);

pub struct TempRabbit {
    dir: PathBuf,
    program: PathBuf,
    port: u16,
    dist_port: u16,
    node: String,
    /// The `rabbitmq-server` script, leader of its own process group (the Erlang VM and its
    /// helpers are in that group too), while the broker runs.
    server: Option<Child>,
    /// A shell that, when our end of its stdin closes (drop or death of this process), kills
    /// the broker's process group and removes the directory.
    watchdog: Option<(Child, ChildStdin)>,
    /// How many times the broker was started.
    pub starts: usize,
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
        let dir = std::env::temp_dir().join(format!(
            "troutbox-rabbit-{}-{}",
            std::process::id(),
            unique()
        ));
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
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
            fs::write(dir.join(name), text).map_err(|e| format!("cannot write {name}: {e}"))?;
        }
        let watchdog = spawn_watchdog(&dir)?;
        let mut rabbit = TempRabbit {
            dir,
            program,
            port,
            dist_port,
            node,
            server: None,
            watchdog: Some(watchdog),
            starts: 0,
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

    /// Starts the broker (again), on the same port, with the same node and data, and waits
    /// until it accepts connections.
    pub fn start_again(&mut self) -> Result<(), String> {
        if self.server.is_some() {
            return Ok(());
        }
        let console = fs::File::create(self.dir.join("console.log"))
            .map_err(|e| format!("cannot create console.log: {e}"))?;
        let console_err = console
            .try_clone()
            .map_err(|e| format!("cannot open console.log: {e}"))?;
        let d = &self.dir;
        let child = Command::new(&self.program)
            .current_dir(d)
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
            .env_remove("RABBITMQ_ALLOW_INPUT")
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            // Its own process group, so that one signal reaches the script and the VM.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program.display()))?;
        self.guard(Some(child.id()));
        self.server = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + PATIENCE;
        loop {
            // The AMQP listener opens once the broker has booted.
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.server = None;
                return Err(format!(
                    "rabbitmq-server exited during start-up ({status}): {}",
                    self.log_tail()
                ));
            }
            if Instant::now() > deadline {
                let _ = self.kill();
                return Err(format!(
                    "rabbitmq-server did not listen on port {} within {PATIENCE:?}: {}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker gracefully (SIGTERM: queues are closed cleanly) and waits for it.
    pub fn stop(&mut self) -> Result<(), String> {
        self.signal("TERM")
    }

    /// Kills the broker (SIGKILL: no chance to flush anything) and waits for it.
    pub fn kill(&mut self) -> Result<(), String> {
        self.signal("KILL")
    }

    /// Runs `rabbitmqctl` against this broker (for example
    /// `["set_vm_memory_high_watermark", "0"]`), returning its output or why it failed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let program = self.program.with_file_name("rabbitmqctl");
        let d = &self.dir;
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
        self.signal_group("STOP");
    }

    /// Thaws a broker frozen by [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal_group("CONT");
    }

    fn signal_group(&self, signal: &str) -> bool {
        let Some(child) = &self.server else {
            return false;
        };
        Command::new("kill")
            .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn signal(&mut self, signal: &str) -> Result<(), String> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        let group = format!("-{}", child.id());
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), "--", &group])
            .status()
            .map_err(|e| format!("cannot run kill: {e}"))?;
        if !sent.success() {
            return Err(format!("kill -{signal} -- {group} failed"));
        }
        // A frozen broker ignores SIGTERM until it runs again.
        let _ = Command::new("kill").args(["-CONT", "--", &group]).status();
        let deadline = Instant::now() + PATIENCE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    return Err(format!(
                        "rabbitmq-server still running {PATIENCE:?} after SIG{signal}"
                    ))
                }
                Err(e) => return Err(format!("waiting for rabbitmq-server: {e}")),
            }
        }
        // The VM is the script's child: wait until the port is free again, so that the next
        // start cannot fail on it.
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            if Instant::now() > deadline {
                return Err(format!(
                    "port {} still open after the broker stopped",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.guard(None);
        Ok(())
    }

    /// Tells the watchdog which process group to kill if we die.
    fn guard(&mut self, group: Option<u32>) {
        if let Some((_, stdin)) = &mut self.watchdog {
            let line = group.map_or("-".to_string(), |g| g.to_string());
            let _ = writeln!(stdin, "{line}");
        }
    }

    /// The last lines the broker printed, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(8).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

impl Drop for TempRabbit {
    fn drop(&mut self) {
        let _ = self.kill();
        // Closing its stdin makes the watchdog remove the directory.
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = watchdog.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn spawn_watchdog(dir: &Path) -> Result<(Child, ChildStdin), String> {
    // Each line names the broker's current process group ("-" for none); end of input means
    // the test process is done or dead.
    let script = r#"
        group=-
        while read -r line; do group=$line; done
        [ "$group" != - ] && kill -KILL -- "-$group" 2>/dev/null
        rm -rf "$RABBIT_DIR"
    "#;
    let mut child = Command::new("sh")
        .args(["-c", script])
        .env("RABBIT_DIR", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the cleanup watchdog: {e}"))?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| "the watchdog has no stdin".to_string())?;
    Ok((child, stdin))
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

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn unique() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
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
