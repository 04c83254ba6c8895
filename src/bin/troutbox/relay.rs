//! `troutbox relay --config relay.toml`: relays one or more outbox tables (sources), each in
//! its own database or schema, to one sink, until SIGTERM or SIGINT.
//!
//! Each source has a supervisor thread of its own: it connects, optionally migrates, starts
//! the library's relay with a clone of the sink's Sender, and, when the database cannot be
//! reached, retries with a backoff (1 s doubling to 30 s) without touching the other sources.
//! Once started, the library's relay rides out lost connections and restarts by itself.
//!
//! Exit statuses: 0 stopped by a signal, gracefully; 1 a start failure (the sink unreachable)
//! or a stop past its bound; 2 the configuration; 128 + the signal on a second signal.

#[path = "relay/config.rs"]
mod config;
#[path = "relay/http.rs"]
mod http;
#[path = "relay/logger.rs"]
mod logger;
#[path = "relay/sink.rs"]
mod sink;

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use troutbox::{Backlog, Handle, Health, MaintenanceHandle, Stats};

pub use logger::LogFormat;

use config::{RelayConfig, Source};
use sink::SinkSender;

/// How long the start waits for the sink's broker to accept a connection.
const SINK_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// A source's supervisor's first and longest wait before trying to start it again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How often a running source's health, counters and backlog are read for `/healthz` and
/// `/metrics` (the backlog, one scan of the table, every [`BACKLOG_EVERY`], the first one
/// that long after the start).
const SNAPSHOT_EVERY: Duration = Duration::from_millis(500);
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// What a graceful stop may take beyond `shutdown_timeout`: a source that was connecting
/// when the signal came finishes that attempt first (the pool's connection timeout).
const STOP_SLACK: Duration = Duration::from_secs(15);

/// Where a source is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Running,
    /// Could not start; the reason, and it is tried again.
    Down(String),
    Stopping,
    Stopped,
}

/// What the supervisor of one source last saw, for `/healthz` and `/metrics`.
pub struct SourceState {
    pub name: String,
    pub snapshot: Mutex<Snapshot>,
    /// The source's `troutbox status` thresholds: pending, dead, age of the oldest pending.
    pub thresholds: (Option<i64>, Option<i64>, Option<Duration>),
}

impl SourceState {
    /// The thresholds the last backlog reading exceeds (`pending`, `dead`, `age`), as
    /// `troutbox status` names them.
    pub fn exceeded(&self, backlog: Option<&Backlog>) -> Vec<&'static str> {
        let Some(b) = backlog else {
            return Vec::new();
        };
        let (max_pending, max_dead, max_age) = self.thresholds;
        let mut exceeded = Vec::new();
        if max_pending.is_some_and(|max| b.pending > max) {
            exceeded.push("pending");
        }
        if max_dead.is_some_and(|max| b.dead > max) {
            exceeded.push("dead");
        }
        if let (Some(max), Some(oldest)) = (max_age, b.oldest_pending) {
            let age = time::OffsetDateTime::now_utc() - oldest;
            if age > max {
                exceeded.push("age");
            }
        }
        exceeded
    }
}

#[derive(Clone)]
pub struct Snapshot {
    pub phase: Phase,
    pub health: Option<Health>,
    pub stats: Option<Stats>,
    pub backlog: Option<Backlog>,
    /// Starts that failed since the service started.
    pub start_failures: u64,
}

impl SourceState {
    fn set_phase(&self, phase: Phase) {
        self.snapshot.lock().unwrap().phase = phase;
    }
}

/// Runs the service; its exit status.
pub fn main(path: &Path, format: LogFormat) -> ExitCode {
    logger::install(format);
    let config = match RelayConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            log::error!("configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let mut senders = Vec::new();
    for source in &config.sources {
        match sink::sender(&config.sink, &source.name) {
            Ok(s) => senders.push(s),
            Err(e) => {
                log::error!("configuration: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Err(e) = sink::reachable(&config.sink, SINK_CHECK_TIMEOUT) {
        log::error!(
            "the sink's broker cannot be reached ({e}); check its address in the configuration and that it runs"
        );
        return ExitCode::FAILURE;
    }
    // Signals first: a SIGTERM from now on is a graceful stop.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let stop_tx = Arc::new(Mutex::new(Some(stop_tx)));
    if let Err(e) = watch_signals(stop_tx.clone()) {
        log::error!("cannot install the signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let states: Vec<Arc<SourceState>> = config
        .sources
        .iter()
        .map(|s| {
            Arc::new(SourceState {
                name: s.name.clone(),
                thresholds: (s.max_pending, s.max_dead, s.max_age),
                snapshot: Mutex::new(Snapshot {
                    phase: Phase::Starting,
                    health: None,
                    stats: None,
                    backlog: None,
                    start_failures: 0,
                }),
            })
        })
        .collect();
    if let Some(address) = &config.service.listen {
        if let Err(e) = http::serve(address, states.clone()) {
            log::error!("service.listen: cannot listen on {address}: {e}");
            return ExitCode::from(2);
        }
        log::info!("health and metrics on http://{address}/healthz and /metrics");
    }
    let shutdown_timeout = config.service.shutdown_timeout;
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<(String, Result<(), String>)>();
    for ((source, sender), state) in config.sources.into_iter().zip(senders).zip(&states) {
        let stop = stop_rx.clone();
        let done = done_tx.clone();
        let state = state.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("source {}", source.name))
            .spawn(move || {
                let result = supervise(&source, sender, &state, &stop, shutdown_timeout);
                state.set_phase(Phase::Stopped);
                let _ = done.send((source.name.clone(), result));
            });
        if let Err(e) = spawned {
            log::error!("cannot start a thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    drop(done_tx);
    log::info!(
        "relaying {} source(s); SIGTERM or SIGINT stops",
        states.len()
    );
    // Until the signal thread drops the stop channel's sender.
    let _ = stop_rx.recv();
    let deadline = Instant::now() + shutdown_timeout + STOP_SLACK;
    log::info!(
        "stopping: finishing the batches in flight (at most {} s)",
        (shutdown_timeout + STOP_SLACK).as_secs()
    );
    let mut failed = false;
    for _ in 0..states.len() {
        match done_rx.recv_deadline(deadline) {
            Ok((name, Ok(()))) => log::info!("source {name}: stopped"),
            Ok((name, Err(e))) => {
                failed = true;
                log::error!("source {name}: did not stop cleanly: {e}");
            }
            Err(RecvTimeoutError::Timeout) => {
                log::error!("stop past its bound: exiting with sources still running");
                return ExitCode::FAILURE;
            }
            Err(RecvTimeoutError::Disconnected) => {
                log::error!("a source's thread ended without reporting how it stopped (a bug)");
                return ExitCode::FAILURE;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        log::info!("stopped");
        ExitCode::SUCCESS
    }
}

/// SIGTERM and SIGINT: the first drops the stop channel's sender (every source stops), a
/// second one exits at once.
fn watch_signals(stop: Arc<Mutex<Option<crossbeam_channel::Sender<()>>>>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if stop.lock().unwrap().take().is_some() {
                    log::info!(
                        "signal {signal}: stopping gracefully (a second signal exits at once)"
                    );
                } else {
                    log::warn!("signal {signal} again: exiting at once");
                    std::process::exit(128 + signal);
                }
            }
        })?;
    Ok(())
}

/// A source's life: start, supervise, stop. `Err` when its stop did not finish cleanly.
fn supervise(
    source: &Source,
    sender: SinkSender,
    state: &SourceState,
    stop: &Receiver<()>,
    shutdown_timeout: Duration,
) -> Result<(), String> {
    let mut retry = RETRY_FIRST;
    loop {
        state.set_phase(Phase::Starting);
        match start(source, sender.clone(), shutdown_timeout) {
            Ok((mut handle, maintenance)) => {
                log::info!(
                    "source {}: relaying {}.{}",
                    source.name,
                    source.schema,
                    source.table
                );
                let store = handle_store(source);
                // The first reading after BACKLOG_EVERY, not while the relay starts draining:
                // it is a scan of the whole table (the drain benchmark's median went from
                // 0.76x to 0.90x of the in-process relay's without it, on a loaded machine).
                let mut backlog_at = Instant::now();
                let mut sent_any = false;
                loop {
                    let stats = handle.stats();
                    if !sent_any && stats.sent > 0 {
                        sent_any = true;
                        log::info!("source {}: first messages sent", source.name);
                    }
                    {
                        let mut s = state.snapshot.lock().unwrap();
                        s.phase = Phase::Running;
                        s.health = Some(handle.health());
                        s.stats = Some(stats);
                    }
                    if backlog_at.elapsed() >= BACKLOG_EVERY {
                        backlog_at = Instant::now();
                        let backlog = store.as_ref().and_then(|s| s.backlog().ok());
                        state.snapshot.lock().unwrap().backlog = backlog;
                    }
                    match stop.recv_timeout(SNAPSHOT_EVERY) {
                        Err(RecvTimeoutError::Timeout) => continue,
                        _ => break,
                    }
                }
                state.set_phase(Phase::Stopping);
                let result = handle.shutdown().map_err(|e| e.to_string());
                state.snapshot.lock().unwrap().stats = Some(handle.stats());
                if let Some(mut m) = maintenance {
                    if let Err(e) = m.shutdown() {
                        log::warn!("source {}: maintenance: {e}", source.name);
                    }
                }
                return result;
            }
            Err(e) => {
                log::error!(
                    "source {}: cannot start: {e}; trying again in {} s",
                    source.name,
                    retry.as_secs()
                );
                {
                    let mut s = state.snapshot.lock().unwrap();
                    s.phase = Phase::Down(e);
                    s.start_failures += 1;
                    s.health = None;
                }
                match stop.recv_timeout(retry) {
                    Err(RecvTimeoutError::Timeout) => retry = (retry * 2).min(RETRY_MAX),
                    _ => return Ok(()),
                }
            }
        }
    }
}

/// Connects, migrates if asked, starts the relay and the maintenance if asked.
fn start(
    source: &Source,
    sender: SinkSender,
    shutdown_timeout: Duration,
) -> Result<(Handle, Option<MaintenanceHandle>), String> {
    let url = source.database_url().map_err(|e| e.to_string())?;
    let config: postgres::Config = url.parse().map_err(|e| format!("database_url: {e}"))?;
    let pool = troutbox::pool(config, source.pool_size()).map_err(|e| e.to_string())?;
    let outbox = source
        .outbox(pool, shutdown_timeout)
        .map_err(|e| e.to_string())?;
    if source.migrate {
        outbox.migrate().map_err(|e| e.to_string())?;
    }
    let handle = outbox.start(sender).map_err(|e| e.to_string())?;
    let maintenance = if source.maintenance {
        let every = source
            .maintenance_interval
            .unwrap_or(Duration::from_secs(600));
        Some(
            outbox
                .store()
                .start_maintenance(every)
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    Ok((handle, maintenance))
}

/// A store of its own for the backlog readings (one connection, made lazily).
fn handle_store(source: &Source) -> Option<troutbox::PgStore> {
    let url = source.database_url().ok()?;
    let config: postgres::Config = url.parse().ok()?;
    let pool = troutbox::r2d2::Pool::builder()
        .max_size(1)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(troutbox::r2d2_postgres::PostgresConnectionManager::new(
            config,
            postgres::NoTls,
        ));
    Some(
        troutbox::PgStore::new(pool)
            .schema(&source.schema)
            .table(&source.table)
            .retention(source.retention()),
    )
}
