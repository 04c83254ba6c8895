//! Maintenance on a schedule: a background thread that runs a table's partition maintenance
//! now and then every interval, until its handle is shut down or dropped.

use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{select, Sender as ChannelSender};

use crate::error::panic_message;
use crate::reports::MaintenanceReport;
use crate::store::postgres::{MakeTls, PgStore};
use crate::Error;

/// Runs `run` now and then every `every` on a background thread named `name`, until the
/// returned handle is shut down or dropped; errors are logged as `what` and the next run
/// tries again.
pub(crate) fn spawn_maintenance(
    what: String,
    every: Duration,
    run: impl Fn() -> Result<MaintenanceReport, Error> + Send + 'static,
) -> Result<MaintenanceHandle, Error> {
    if every.is_zero() {
        return Err(Error::InvalidConfig {
            option: "start_maintenance",
            reason: "the interval must be greater than zero".into(),
        });
    }
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("troutbox-maintenance".into())
        .spawn(move || loop {
            if let Err(e) = run() {
                log::error!("{what} failed: {e}");
            }
            select! {
                recv(stop_rx) -> _ => break,
                default(every) => {}
            }
        })
        .map_err(Error::Spawn)?;
    Ok(MaintenanceHandle {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

impl<T: MakeTls> PgStore<T> {
    /// Runs [`run_maintenance_once`](Self::run_maintenance_once) now and then every `every`
    /// on a background thread, until the returned handle is shut down or dropped. Run it in
    /// every instance: the advisory lock elects one per run, and another takes over when
    /// that one dies. Errors are logged and the next run tries again.
    pub fn start_maintenance(&self, every: Duration) -> Result<MaintenanceHandle, Error> {
        self.sql()?;
        let store = self.clone();
        spawn_maintenance(
            format!("outbox maintenance of {}", self.qualified_table()),
            every,
            move || store.run_maintenance_once(),
        )
    }
}

/// Stops the maintenance thread started by [`PgStore::start_maintenance`]. Dropping it stops
/// the thread too; stopping twice is harmless.
// No PartialEq: a handle owns a running thread; it has an identity, not a value.
#[derive(Debug)]
#[must_use = "dropping the MaintenanceHandle stops maintenance at once: keep it for as long as maintenance should run"]
pub struct MaintenanceHandle {
    stop: Option<ChannelSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MaintenanceHandle {
    /// Stops the thread, waiting for a run in progress to finish.
    pub fn shutdown(&mut self) -> Result<(), Error> {
        self.stop = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(payload)) => Err(Error::WorkerPanicked(panic_message(&*payload))),
            _ => Ok(()),
        }
    }
}

impl Drop for MaintenanceHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("troutbox maintenance thread: {e}");
        }
    }
}
