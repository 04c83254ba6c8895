//! The loop of one relay worker thread.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender as ChannelSender, TryRecvError};

use crate::backoff::Backoff;
use crate::config::{report_to, Config, ErrorHandler, MIN_POLL_INTERVAL};
use crate::error::{panic_message, BoxError};
use crate::message::Message;
use crate::observability::SharedTelemetry;
use crate::relay::batch::Batch;
use crate::relay::health::{EndGuard, WorkerStatus};
use crate::relay::outcome;
use crate::relay::sender::Sender;
use crate::store::{Claimed, RelaySession, RelayStore, SettleReport, Settlement};
use crate::Error;

/// Pause after database errors: short, so the relay resumes within seconds of the database
/// coming back, yet not a busy loop while it is down.
const DB_RETRY: Backoff = Backoff::exponential(Duration::from_millis(50), Duration::from_secs(2));

/// The pace of a worker's loop: its idle sleep and its failure streaks.
struct Pace {
    idle_sleep: Duration,
    db_failures: u32,
    send_failures: u32,
}

/// What ended a wait.
enum Wake {
    Stop,
    Nudged,
    TimedOut,
}

pub(crate) struct Worker<S: RelayStore, F: Sender + Clone> {
    store: Arc<S>,
    session: Option<S::Session>,
    /// The Sender this thread calls, and a pristine copy to start over from after a panic.
    sender: F,
    template: F,
    batch_size: usize,
    /// Per-key ordering: batches are ordered (see `outcome::decide`).
    ordered: bool,
    max_retries: u32,
    backoff: Backoff,
    poll_interval: Duration,
    send_timeout: Duration,
    error_handler: ErrorHandler,
    telemetry: SharedTelemetry,
    stop: Receiver<()>,
    wake: Receiver<()>,
    /// Held so the wake channel never disconnects while a worker waits on it.
    _wake_tx: ChannelSender<()>,
    /// Dropped when the thread ends: how [`Handle`](super::handle::Handle) learns it did.
    _done: ChannelSender<()>,
    /// What the handle's health check reads.
    status: Arc<WorkerStatus>,
    /// A claim is open that no Sender has seen yet (a panic gives it back uncharged).
    unsent: bool,
}

impl<S: RelayStore, F: Sender + Clone> Worker<S, F> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Arc<S>,
        session: Option<S::Session>,
        sender: F,
        config: &Config,
        telemetry: SharedTelemetry,
        stop: Receiver<()>,
        wake: Receiver<()>,
        wake_tx: ChannelSender<()>,
        done: ChannelSender<()>,
        status: Arc<WorkerStatus>,
    ) -> Self {
        Worker {
            store,
            session,
            template: sender.clone(),
            sender,
            batch_size: config.batch_size,
            ordered: config.ordered,
            max_retries: config.max_retries,
            backoff: config.backoff,
            poll_interval: config.poll_interval,
            send_timeout: config.send_timeout,
            error_handler: config.error_handler.clone(),
            telemetry,
            stop,
            wake,
            _wake_tx: wake_tx,
            _done: done,
            status,
            unsent: false,
        }
    }

    pub(crate) fn run(mut self) {
        let _ended = EndGuard(self.status.clone());
        let mut pace = Pace {
            idle_sleep: MIN_POLL_INTERVAL,
            db_failures: 0,
            send_failures: 0,
        };
        log::debug!("relay worker started");
        while !self.stop_requested() && !self.status.is_abandoned() {
            // Everything a round does runs inside this boundary, not only the Sender: a
            // panic anywhere (a bug, a panicking error handler, a driver) is reported and
            // the worker carries on. The session is dropped, which gives the batch it held
            // back; its journal rows make that count as an attempt.
            let round = panic::catch_unwind(AssertUnwindSafe(|| self.round(&mut pace)));
            let stop = match round {
                Ok(stop) => stop,
                Err(payload) => {
                    let message = panic_message(&*payload);
                    self.status.leave_sender();
                    if std::mem::take(&mut self.unsent) {
                        // The claim never reached its Sender: give it back uncharged.
                        let _ = panic::catch_unwind(AssertUnwindSafe(|| {
                            if let Some(session) = self.session.as_mut() {
                                session.release();
                            }
                        }));
                    }
                    let _ = panic::catch_unwind(AssertUnwindSafe(|| self.session = None));
                    self.session = None;
                    self.report(&Error::WorkerPanicked(message));
                    pace.db_failures = pace.db_failures.saturating_add(1);
                    self.status.failed(pace.db_failures);
                    self.pause(DB_RETRY.delay(pace.db_failures))
                }
            };
            if stop {
                break;
            }
        }
        log::debug!("relay worker stopped");
    }

    /// One round: claim, send, settle, or sleep when drained. True when stopped meanwhile.
    fn round(&mut self, pace: &mut Pace) -> bool {
        let claimed = self.claim();
        if self.status.is_abandoned() {
            // The watchdog replaced this worker while the claim hung: whatever came back
            // (late) is given back, uncharged; no Sender saw it.
            if claimed.is_ok_and(|c| !c.messages.is_empty()) {
                if let Some(session) = self.session.as_mut() {
                    session.release();
                }
            }
            return true;
        }
        let claimed = match claimed {
            Ok(claimed) => claimed,
            Err(e) => {
                self.report(&e);
                pace.db_failures = pace.db_failures.saturating_add(1);
                self.status.failed(pace.db_failures);
                return self.pause(DB_RETRY.delay(pace.db_failures));
            }
        };
        pace.db_failures = 0;
        self.status.succeeded();
        if claimed.report != SettleReport::default() {
            self.telemetry.record_settled(claimed.report, None);
        }
        // What the claim settled by itself is reported after the batch is settled: an error
        // handler is user code, and may take any time (or panic), which must not run down
        // the claim's time before its Sender.
        let reports = claimed.reports;
        let messages = claimed.messages;
        if messages.is_empty() {
            for e in &reports {
                self.report(e);
            }
            // Drained: sleep, doubling the sleep while nothing comes, up to the poll interval.
            match self.wait(pace.idle_sleep) {
                Wake::Stop => return true,
                Wake::Nudged => pace.idle_sleep = MIN_POLL_INTERVAL,
                Wake::TimedOut => pace.idle_sleep = (pace.idle_sleep * 2).min(self.poll_interval),
            }
            return false;
        }
        pace.idle_sleep = MIN_POLL_INTERVAL;
        let started = Instant::now();
        #[cfg(feature = "opentelemetry")]
        let (started_at, size, links) = (
            std::time::SystemTime::now(),
            messages.len(),
            crate::observability::otel::links(&messages),
        );
        self.record_latencies(&messages);
        // From here until the Sender returns, a panic gives the claim back uncharged.
        self.unsent = true;
        fault_point!(crate::fault::BEFORE_SENDER);
        // The last check before the Sender: the claim is provably held until its deadline.
        let waited = claimed.claimed_at.map(|at| at.elapsed());
        if claimed
            .claimed_at
            .is_some_and(|at| Instant::now() >= crate::store::send_deadline(at, self.send_timeout))
        {
            let waited = waited.unwrap_or_default();
            let count = messages.len();
            self.unsent = false;
            if let Some(session) = self.session.as_mut() {
                session.release();
            }
            for e in &reports {
                self.report(e);
            }
            self.report(&Error::ClaimExpired {
                messages: count,
                waited,
                send_timeout: self.send_timeout,
                why: "it waited too long for its Sender",
            });
            return false;
        }
        self.unsent = false;
        self.status.enter_sender();
        let (settlement, sender_error) = self.deliver(messages);
        self.status.leave_sender();
        fault_point!(crate::fault::AFTER_SENDER);
        let whole_batch_failed = sender_error.is_some() && settlement.sent.is_empty();
        #[cfg(feature = "opentelemetry")]
        let dead: Vec<(i64, u32, String)> = settlement
            .returned
            .iter()
            .filter(|r| r.dead)
            .map(|r| (r.message.id, r.attempts, r.error.clone()))
            .collect();
        let report = self.settle(settlement);
        // Counted only now, after the commit: the counters follow the rows.
        self.telemetry
            .record_settled(report, Some(started.elapsed()));
        for e in &reports {
            self.report(e);
        }
        // Reported after the settlement, so a slow error handler (an alerting call) never
        // holds the batch's transaction open.
        if let Some(e) = &sender_error {
            self.report(e);
        }
        #[cfg(feature = "opentelemetry")]
        if let Some(otel) = &self.telemetry.otel {
            let error = sender_error.as_ref().map(ToString::to_string);
            otel.batch_span(crate::observability::otel::BatchSpan {
                start: started_at,
                size,
                report,
                dead: &dead,
                links,
                error: error.as_deref(),
            });
        }
        log::debug!(
            "batch settled: {} sent, {} retried, {} dead",
            report.sent,
            report.retried,
            report.dead
        );
        // A Sender failing whole batches usually means the broker is down: slow down
        // rather than spend every message's retries at full speed.
        if whole_batch_failed {
            pace.send_failures = pace.send_failures.saturating_add(1);
            return self.pause(self.backoff.delay(pace.send_failures));
        }
        pace.send_failures = 0;
        false
    }

    fn session(&mut self) -> Result<&mut S::Session, Error> {
        if self.session.as_ref().is_some_and(|s| s.is_broken()) {
            self.session = None;
        }
        if self.session.is_none() {
            self.session = Some(self.store.open_session()?);
        }
        Ok(self.session.as_mut().expect("session was just opened"))
    }

    /// Claims a batch (opening a session first if need be). Marked as a database call for
    /// the handle's watchdog, which replaces a worker whose call never returns.
    fn claim(&mut self) -> Result<Claimed, Error> {
        let batch_size = self.batch_size;
        self.status.enter_db();
        let claimed = self.session().and_then(|s| s.claim(batch_size));
        self.status.leave_db();
        claimed
    }

    /// Settles the batch on the session that claimed it; reports what was committed.
    fn settle(&mut self, settlement: Settlement) -> SettleReport {
        self.status.enter_db();
        let outcome = match self.session.as_mut() {
            Some(session) => session.settle(settlement),
            None => (SettleReport::default(), None),
        };
        self.status.leave_db();
        if let (_, Some(e)) = &outcome {
            self.report(e);
        }
        outcome.0
    }

    /// Time from each message's producing transaction (database clock) to now.
    fn record_latencies(&self, messages: &[Message]) {
        let now = time::OffsetDateTime::now_utc();
        let latencies: Vec<Duration> = messages
            .iter()
            .map(|m| (now - m.created_at).try_into().unwrap_or(Duration::ZERO))
            .collect();
        self.telemetry.record_latencies(&latencies);
    }

    /// Hands the messages to the Sender, catching panics, and decides each message's fate.
    fn deliver(&mut self, messages: Vec<Message>) -> (Settlement, Option<Error>) {
        let mut batch = Batch::new(messages);
        batch.ordered = self.ordered;
        let batch_size = batch.len();
        #[cfg(feature = "tracing")]
        let span = crate::observability::tracing::batch_span(batch.messages(), batch.ordered);
        let sender = &mut self.sender;
        let result = {
            #[cfg(feature = "tracing")]
            let _entered = span.enter();
            panic::catch_unwind(AssertUnwindSafe(|| sender.send(&mut batch)))
        };
        #[cfg(feature = "tracing")]
        span.record(
            "outcome",
            match &result {
                Ok(Ok(())) => "ok",
                Ok(Err(_)) => "error",
                Err(_) => "panic",
            },
        );
        let (failure, error) = match result {
            Ok(Ok(())) => (None, None),
            Ok(Err(e)) => {
                let source: BoxError = e.into();
                (
                    Some(source.to_string()),
                    Some(Error::Sender { batch_size, source }),
                )
            }
            Err(payload) => {
                let message = panic_message(&*payload);
                // The panic may have left the Sender's state half-updated.
                self.sender = self.template.clone();
                (
                    Some(format!("sender panicked: {message}")),
                    Some(Error::SenderPanicked {
                        batch_size,
                        message,
                    }),
                )
            }
        };
        let settlement =
            outcome::decide(batch, failure.as_deref(), self.max_retries, &self.backoff);
        (settlement, error)
    }

    fn report(&self, error: &Error) {
        self.telemetry.record_error();
        report_to(&self.error_handler, error);
    }

    fn stop_requested(&self) -> bool {
        matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Sleeps up to `timeout`, waking early on stop or on a nudge from `add_message`.
    fn wait(&self, timeout: Duration) -> Wake {
        select! {
            recv(self.stop) -> _ => Wake::Stop,
            recv(self.wake) -> _ => Wake::Nudged,
            default(timeout) => Wake::TimedOut,
        }
    }

    /// Sleeps `timeout` unless stopped; true when stopped.
    fn pause(&self, timeout: Duration) -> bool {
        select! {
            recv(self.stop) -> _ => true,
            default(timeout) => false,
        }
    }
}
