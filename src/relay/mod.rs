//! The relay side: worker threads that claim batches, call the Sender, and settle outcomes.
//!
//! - [`worker`]: the loop one thread runs (claim, send, settle, sleep when drained);
//! - [`outcome`]: turning the Sender's marks and result into a settlement;
//! - [`batch`] and [`sender`]: what user code sees;
//! - [`handle`]: stopping and joining the threads; [`health`]: what workers report to it;
//! - [`listener`]: cross-process wake-ups through `LISTEN` (`notify(true)`).

pub(crate) mod batch;
pub(crate) mod handle;
pub(crate) mod health;
pub(crate) mod outcome;
pub(crate) mod sender;
pub(crate) mod worker;

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender as ChannelSender};

use crate::config::Config;
use crate::observability::SharedTelemetry;
use crate::store::RelayStore;
use crate::Error;
use handle::Handle;
use sender::Sender;
use worker::Worker;

/// Starts `config.workers` worker threads on `store`, and the watchdog that replaces a
/// worker stuck in a database call (see [`handle::Slot`]). The first session is opened
/// here, so that an unreachable or unmigrated database is reported to the caller.
pub(crate) fn spawn<S, F>(
    store: Arc<S>,
    sender: F,
    config: &Config,
    telemetry: SharedTelemetry,
    wake_tx: ChannelSender<()>,
    wake_rx: Receiver<()>,
) -> Result<Handle, Error>
where
    S: RelayStore,
    F: Sender + Clone,
{
    // A panic while opening it (a bug: the workers survive theirs) is an error here too,
    // never a panic in the caller's thread.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.open_session()))
        .map_err(|payload| Error::WorkerPanicked(crate::error::panic_message(&*payload)))?;
    let mut first_session = Some(opened?);
    let on_stuck = {
        let store = store.clone();
        move || store.suspect_connections()
    };
    let on_overrun = {
        let store = store.clone();
        move || store.sender_overran()
    };
    // Nobody ever sends on this channel: dropping the sending side is the signal.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let wake = wake_tx.clone();
    let start = {
        let (config, telemetry, stop_rx) = (config.clone(), telemetry.clone(), stop_rx.clone());
        move |index: usize, session: Option<S::Session>| -> std::io::Result<handle::Slot> {
            let status = Arc::new(health::WorkerStatus::default());
            let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
            let worker = Worker::new(
                store.clone(),
                session,
                sender.clone(),
                &config,
                telemetry.clone(),
                stop_rx.clone(),
                wake_rx.clone(),
                wake_tx.clone(),
                done_tx,
                status.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("troutbox-relay-{index}"))
                .spawn(move || worker.run())?;
            Ok(handle::Slot {
                thread,
                done: done_rx,
                status,
            })
        }
    };
    let mut slots = Vec::with_capacity(config.workers);
    let mut spawn_error = None;
    for index in 0..config.workers {
        match start(index, first_session.take()) {
            Ok(slot) => slots.push(slot),
            Err(e) => {
                spawn_error = Some(e);
                break;
            }
        }
    }
    let mut handle = Handle::new(Some(stop_tx), stop_rx, slots, config, wake, telemetry);
    if spawn_error.is_none() {
        if let Err(e) = handle.watch(
            start,
            handle::Watch {
                on_stuck: Box::new(on_stuck),
                stuck_after: config.stuck_after,
                on_overrun: Box::new(on_overrun),
                overrun_after: crate::store::send_window(config.send_timeout),
            },
            config.error_handler.clone(),
        ) {
            spawn_error = Some(e);
        }
    }
    match spawn_error {
        None => Ok(handle),
        Some(e) => {
            // Stop the workers already started before reporting.
            let _ = handle.shutdown();
            Err(Error::Spawn(e))
        }
    }
}

#[cfg(test)]
mod tests;
