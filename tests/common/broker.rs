//! What the throw-away brokers of the tests have in common ([`rabbit`](super) and
//! [`tansu`](super)): a temporary directory, a broker process leading its own process group
//! with its output in a log there, a start that polls until the broker listens (or says
//! why it never will), stops by signal that wait until the port is free again, and a
//! watchdog that kills the broker and removes the directory even if the test process dies.
//!
//! Included with `#[path]` by `tests/common/rabbit.rs` and `tests/common/tansu.rs`.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// One broker process and its directory.
pub struct BrokerProcess {
    /// What the errors call the broker (`rabbitmq-server`, `tansu`).
    name: &'static str,
    program: PathBuf,
    dir: PathBuf,
    /// The file in `dir` that takes the broker's stdout and stderr.
    log: &'static str,
    /// How long a start or a stop may take on a loaded machine.
    patience: Duration,
    /// The broker, leader of its own process group (with every helper it starts), while it
    /// runs.
    child: Option<Child>,
    /// A shell that, when our end of its stdin closes (drop or death of this process), kills
    /// the broker's process group and removes the directory.
    watchdog: Option<(Child, ChildStdin)>,
    /// How many times the broker was started.
    starts: usize,
}

impl BrokerProcess {
    /// Makes the broker's directory (named after `name`, this process and a counter) and its
    /// watchdog; nothing runs yet.
    pub fn new(
        name: &'static str,
        program: PathBuf,
        log: &'static str,
        patience: Duration,
    ) -> Result<BrokerProcess, String> {
        let dir = std::env::temp_dir().join(format!(
            "troutbox-{name}-{}-{}",
            std::process::id(),
            unique()
        ));
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let watchdog = spawn_watchdog(&dir)?;
        Ok(BrokerProcess {
            name,
            program,
            dir,
            log,
            patience,
            child: None,
            watchdog: Some(watchdog),
            starts: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// How many times the broker was started.
    pub fn starts(&self) -> usize {
        self.starts
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs `command` (the broker's program, its arguments and environment) in a process
    /// group of its own with its output appended to the log, then waits until `port`
    /// accepts connections. A broker that exits meanwhile, or does not listen within the
    /// patience (it is then killed), is an error carrying the end of its log. Does nothing
    /// if the broker runs already.
    pub fn start(&mut self, mut command: Command, port: u16) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(self.log))
            .map_err(|e| format!("cannot open {}: {e}", self.log))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", self.log))?;
        let child = command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group, so that one signal reaches the broker and its helpers.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program.display()))?;
        self.guard(Some(child.id()));
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + self.patience;
        loop {
            // The listener opens once the broker has booted.
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                self.guard(None);
                return Err(format!(
                    "{} exited during start-up ({status}): {}",
                    self.name,
                    self.log_tail()
                ));
            }
            if Instant::now() > deadline {
                let _ = self.stop("KILL", port);
                return Err(format!(
                    "{} did not listen on port {port} within {:?}: {}",
                    self.name,
                    self.patience,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`TERM`, `KILL`) to the broker's process group, waits for the broker
    /// to exit and for `port` to be free again (the broker's helpers may outlive it for a
    /// moment), so that the next start cannot fail on it. Does nothing if it is not running.
    pub fn stop(&mut self, signal: &str, port: u16) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
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
        let deadline = Instant::now() + self.patience;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    return Err(format!(
                        "{} still running {:?} after SIG{signal}",
                        self.name, self.patience
                    ))
                }
                Err(e) => return Err(format!("waiting for {}: {e}", self.name)),
            }
        }
        let deadline = Instant::now() + self.patience;
        while TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if Instant::now() > deadline {
                return Err(format!(
                    "port {port} still open after {} stopped",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.guard(None);
        Ok(())
    }

    /// Sends `signal` (`STOP`, `CONT`) to the broker's process group; false if it is not
    /// running or `kill` failed.
    pub fn signal_group(&self, signal: &str) -> bool {
        let Some(child) = &self.child else {
            return false;
        };
        Command::new("kill")
            .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
            .status()
            .is_ok_and(|s| s.success())
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
        let text = fs::read_to_string(self.dir.join(self.log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(8).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a frozen process too; no wait for the port, nothing starts again.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
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
        rm -rf "$BROKER_DIR"
    "#;
    let mut child = Command::new("sh")
        .args(["-c", script])
        .env("BROKER_DIR", dir)
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

pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// A number never returned before in this process, for unique names.
pub fn unique() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
