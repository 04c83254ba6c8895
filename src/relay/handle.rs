//! The running relay's handle: stop, wait, report.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender as ChannelSender};

use crate::config::{report_to, Config, ErrorHandler};
use crate::error::panic_message;
use crate::observability::stats::Stats;
use crate::observability::SharedTelemetry;
use crate::relay::health::{Health, WorkerStatus};
use crate::Error;

/// Controls a running relay started by [`Outbox::start`](crate::Outbox::start).
///
/// [`shutdown`](Handle::shutdown) stops the workers from claiming new batches, lets each
/// finish the batch it is sending (its outcome is recorded as usual), joins the threads and
/// reports what went wrong. Dropping the handle does the same, logging instead of returning
/// errors. Shutting down twice is harmless.
///
/// The handle is `#[must_use]`: a relay started and dropped on the spot stops at once, so the
/// compiler flags it.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// fn start(outbox: &troutbox::Outbox) -> Result<(), troutbox::Error> {
///     outbox.start(|_: &mut troutbox::Batch| -> Result<(), String> { Ok(()) })?;
///     Ok(())
/// }
/// ```
///
/// (A lint has no error code for `compile_fail` to name, so here is its control: the same
/// program, keeping the handle, compiles. The only difference is the dropped handle.)
///
/// ```no_run
/// #![deny(unused_must_use)]
/// fn start(outbox: &troutbox::Outbox) -> Result<(), troutbox::Error> {
///     let _relay = outbox.start(|_: &mut troutbox::Batch| -> Result<(), String> { Ok(()) })?;
///     Ok(())
/// }
/// ```
// No PartialEq: a handle owns running threads; it has an identity, not a value.
#[must_use = "dropping the Handle stops the relay at once: keep it for as long as messages should be relayed"]
pub struct Handle {
    stop: Option<ChannelSender<()>>,
    /// What the threads watch for the stop (for a thread started after the workers).
    stop_rx: Receiver<()>,
    /// The listening thread (`notify(true)`) and the channel it drops when it ends.
    listener: Option<(JoinHandle<()>, Receiver<()>)>,
    /// The watchdog thread and the channel it drops when it ends.
    watchdog: Option<(JoinHandle<()>, Receiver<()>)>,
    /// The running workers, shared with the watchdog, which replaces stuck ones.
    slots: Arc<Mutex<Vec<Slot>>>,
    /// Workers replaced by the watchdog so far.
    replaced: Arc<AtomicUsize>,
    /// The statuses of the workers joined by a shutdown, for `health` afterwards.
    joined: Vec<Arc<WorkerStatus>>,
    timeout: Duration,
    wake: ChannelSender<()>,
    telemetry: SharedTelemetry,
}

/// One running worker: its thread, the channel its end drops, and its status.
pub(crate) struct Slot {
    pub(crate) thread: JoinHandle<()>,
    pub(crate) done: Receiver<()>,
    pub(crate) status: Arc<WorkerStatus>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("workers", &self.workers())
            .field("stopped", &self.stop.is_none())
            .finish_non_exhaustive()
    }
}

/// What the watchdog watches for (see [`Handle::watch`]).
pub(crate) struct Watch {
    /// Called when a worker stuck in a database call is replaced.
    pub(crate) on_stuck: Box<dyn Fn() + Send>,
    /// How long a database call may take before its worker is replaced.
    pub(crate) stuck_after: Duration,
    /// Called while a Sender runs past `overrun_after`.
    pub(crate) on_overrun: Box<dyn Fn() + Send>,
    /// How long a Sender may run before its claim is presumed lost.
    pub(crate) overrun_after: Duration,
}

/// How often the watchdog looks at the workers.
const WATCH_EVERY: Duration = Duration::from_millis(500);

impl Handle {
    pub(crate) fn new(
        stop: Option<ChannelSender<()>>,
        stop_rx: Receiver<()>,
        slots: Vec<Slot>,
        config: &Config,
        wake: ChannelSender<()>,
        telemetry: SharedTelemetry,
    ) -> Handle {
        Handle {
            stop,
            stop_rx,
            listener: None,
            watchdog: None,
            slots: Arc::new(Mutex::new(slots)),
            replaced: Arc::default(),
            joined: Vec::new(),
            timeout: config.shutdown_timeout,
            wake,
            telemetry,
        }
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the watchdog: a worker whose database call has not returned after
    /// `stuck_after` (a connection that a NAT, a load balancer or a proxy dropped without a
    /// word: the call would wait until the kernel gives up, two hours with default
    /// keepalives) is abandoned, reported, and replaced by a new worker from `start`, which
    /// takes a new connection (`on_stuck` makes the shared ones suspect too). The abandoned thread is left detached with its connection;
    /// should its call ever return, it leaves without acting on the result. Its claim, if
    /// it held one, is released by the server at the send timeout and accounted for by the
    /// claim journal like any lost claim.
    ///
    /// It also tells the store (`on_overrun`, at every look) while a worker's Sender has been
    /// running for longer than `overrun_after`: that claim will end without a settlement.
    pub(crate) fn watch<S>(
        &mut self,
        start: impl Fn(usize, Option<S>) -> std::io::Result<Slot> + Send + 'static,
        watch: Watch,
        error_handler: ErrorHandler,
    ) -> std::io::Result<()> {
        let Watch {
            on_stuck,
            stuck_after,
            on_overrun,
            overrun_after,
        } = watch;
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let stop = self.stop_rx.clone();
        let slots = self.slots.clone();
        let replaced = self.replaced.clone();
        let thread = std::thread::Builder::new()
            .name("troutbox-watchdog".into())
            .spawn(move || {
                let _done = done_tx;
                loop {
                    crossbeam_channel::select! {
                        recv(stop) -> _ => return,
                        default(WATCH_EVERY) => {}
                    }
                    let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                    for (index, slot) in slots.iter_mut().enumerate() {
                        if slot
                            .status
                            .in_sender_for()
                            .is_some_and(|running| running >= overrun_after)
                        {
                            on_overrun();
                        }
                        let Some(stuck_for) = slot.status.in_db_for() else {
                            continue;
                        };
                        if stuck_for < stuck_after || slot.thread.is_finished() {
                            continue;
                        }
                        let Ok(fresh) = start(index, None) else {
                            continue; // no thread to spare now: try again next round
                        };
                        slot.status.abandon();
                        // Connections the workers share may be on the same frozen path.
                        on_stuck();
                        // The old thread is dropped from the slot: detached.
                        drop(std::mem::replace(slot, fresh));
                        replaced.fetch_add(1, Ordering::Relaxed);
                        report_to(&error_handler, &Error::WorkerReplaced { stuck_for });
                    }
                }
            })?;
        self.watchdog = Some((thread, done_rx));
        Ok(())
    }

    /// Starts one more thread that runs until the relay stops: `start` gets the stop signal
    /// and a sender to drop when it ends.
    pub(crate) fn attach(
        &mut self,
        name: &str,
        start: impl FnOnce(Receiver<()>, ChannelSender<()>) -> Box<dyn FnOnce() + Send>,
    ) -> Result<(), Error> {
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let run = start(self.stop_rx.clone(), done_tx);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(run)
            .map_err(Error::Spawn)?;
        self.listener = Some((thread, done_rx));
        Ok(())
    }

    /// The relay's counters and timings so far. Each counter moves only after the database
    /// committed what it counts. See [`PgStore::backlog`](crate::PgStore::backlog) for what
    /// is waiting.
    pub fn stats(&self) -> Stats {
        self.telemetry.counters.snapshot()
    }

    /// Stops the relay and waits for its threads, up to the configured shutdown timeout
    /// (see [`OutboxBuilder::shutdown_timeout`](crate::OutboxBuilder::shutdown_timeout)).
    ///
    /// Batches in flight are finished and their outcome recorded. A worker stuck in a
    /// Sender past the timeout is left running detached and reported as
    /// [`Error::ShutdownTimedOut`]; its batch's transaction is ended by the server at the
    /// send timeout, and its messages are delivered again by a later relay. Returns
    /// [`Error::WorkerPanicked`] if a worker thread died of a bug. A second call does
    /// nothing and returns `Ok`.
    pub fn shutdown(&mut self) -> Result<(), Error> {
        self.shutdown_timeout(self.timeout)
    }

    /// Like [`shutdown`](Self::shutdown), waiting at most `timeout`.
    pub fn shutdown_timeout(&mut self, timeout: Duration) -> Result<(), Error> {
        // Dropping the only sender disconnects the channel, which every worker notices
        // between batches and in every sleep.
        self.stop = None;
        let deadline = Instant::now() + timeout;
        // The watchdog first (it notices the stop at once), so that it replaces nobody
        // while the workers are being joined.
        if let Some((thread, done)) = self.watchdog.take() {
            if matches!(
                done.recv_deadline(deadline.max(Instant::now() + Duration::from_millis(200))),
                Err(RecvTimeoutError::Disconnected)
            ) {
                let _ = thread.join();
            }
        }
        let result = self.join_workers(deadline);
        // The listener last, with what is left of the deadline: it holds nothing to finish.
        if let Some((thread, done)) = self.listener.take() {
            // It notices the stop within its 100 ms wait, or while it pauses to reconnect.
            if matches!(
                done.recv_deadline(deadline.max(Instant::now() + Duration::from_millis(200))),
                Err(RecvTimeoutError::Disconnected)
            ) {
                let _ = thread.join();
            }
        }
        result
    }

    fn join_workers(&mut self, deadline: Instant) -> Result<(), Error> {
        let slots: Vec<Slot> = self.slots().drain(..).collect();
        self.joined.extend(slots.iter().map(|s| s.status.clone()));
        let mut running = 0;
        let mut panicked = None;
        for slot in slots {
            // The worker drops its end of `done` when its thread leaves its loop: then
            // joining is immediate. One still busy at the deadline is detached.
            let ended = matches!(
                slot.done.recv_deadline(deadline),
                Err(RecvTimeoutError::Disconnected)
            );
            if ended || slot.thread.is_finished() {
                if let Err(payload) = slot.thread.join() {
                    panicked = Some(panic_message(&*payload));
                }
            } else {
                running += 1;
            }
        }
        if let Some(message) = panicked {
            return Err(Error::WorkerPanicked(message));
        }
        if running > 0 {
            return Err(Error::ShutdownTimedOut { running });
        }
        Ok(())
    }

    /// Asks an idle worker to poll now instead of finishing its sleep. `add_message` on the
    /// same [`Outbox`](crate::Outbox) does this by itself; call it when messages were
    /// committed elsewhere (another process) and you know it.
    pub fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    /// The workers' state, for a health check: how many are running, ended, or in a streak
    /// of failed rounds (see [`Health`]). Workers never die of errors or panics, so an
    /// ended worker before a shutdown, or a long failure streak, is worth an alert.
    ///
    /// ```no_run
    /// # fn f(handle: &troutbox::Handle) {
    /// let health = handle.health();
    /// if !health.is_healthy() {
    ///     eprintln!("relay unhealthy: {health:?}");
    /// }
    /// # }
    /// ```
    pub fn health(&self) -> Health {
        let mut statuses: Vec<Arc<WorkerStatus>> =
            self.slots().iter().map(|s| s.status.clone()).collect();
        statuses.extend(self.joined.iter().cloned());
        Health::of(&statuses, self.replaced.load(Ordering::Relaxed))
    }

    /// Number of worker threads not yet joined.
    pub fn workers(&self) -> usize {
        self.slots().len()
    }

    /// True when every worker thread has ended (after a shutdown, or never started).
    pub fn is_finished(&self) -> bool {
        self.slots().iter().all(|s| s.thread.is_finished())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("troutbox relay did not stop cleanly on drop: {e}");
        }
    }
}
