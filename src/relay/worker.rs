//! The loop of one relay worker thread.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender as ChannelSender, TryRecvError};

use crate::config::{Config, ErrorHandler, MIN_POLL_INTERVAL};
use crate::error::{panic_message, BoxError};
use crate::message::Message;
use crate::observability::SharedTelemetry;
use crate::relay::backoff::Backoff;
use crate::relay::batch::Batch;
use crate::relay::outcome;
use crate::relay::sender::Sender;
use crate::store::{RelaySession, RelayStore, SettleReport, Settlement};
use crate::Error;

/// Pause after database errors: short, so the relay resumes within seconds of the database
/// coming back, yet not a busy loop while it is down.
const DB_RETRY: Backoff = Backoff::exponential(Duration::from_millis(50), Duration::from_secs(2));

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
    max_retries: u32,
    backoff: Backoff,
    poll_interval: Duration,
    error_handler: ErrorHandler,
    telemetry: SharedTelemetry,
    stop: Receiver<()>,
    wake: Receiver<()>,
    /// Held so the wake channel never disconnects while a worker waits on it.
    _wake_tx: ChannelSender<()>,
    /// Dropped when the thread ends: how [`Handle`](super::handle::Handle) learns it did.
    _done: ChannelSender<()>,
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
    ) -> Self {
        Worker {
            store,
            session,
            template: sender.clone(),
            sender,
            batch_size: config.batch_size,
            max_retries: config.max_retries,
            backoff: config.backoff,
            poll_interval: config.poll_interval,
            error_handler: config.error_handler.clone(),
            telemetry,
            stop,
            wake,
            _wake_tx: wake_tx,
            _done: done,
        }
    }

    pub(crate) fn run(mut self) {
        let mut idle_sleep = MIN_POLL_INTERVAL;
        let mut db_failures = 0u32;
        let mut send_failures = 0u32;
        log::debug!("relay worker started");
        while !self.stop_requested() {
            let messages = match self.claim() {
                Ok(messages) => {
                    db_failures = 0;
                    messages
                }
                Err(e) => {
                    self.report(&e);
                    db_failures = db_failures.saturating_add(1);
                    if self.pause(DB_RETRY.delay(db_failures)) {
                        break;
                    }
                    continue;
                }
            };
            if messages.is_empty() {
                // Drained: sleep, doubling the sleep while nothing comes, up to the poll interval.
                match self.wait(idle_sleep) {
                    Wake::Stop => break,
                    Wake::Nudged => idle_sleep = MIN_POLL_INTERVAL,
                    Wake::TimedOut => idle_sleep = (idle_sleep * 2).min(self.poll_interval),
                }
                continue;
            }
            idle_sleep = MIN_POLL_INTERVAL;
            let started = Instant::now();
            #[cfg(feature = "opentelemetry")]
            let (started_at, size, links) = (
                std::time::SystemTime::now(),
                messages.len(),
                crate::observability::otel::links(&messages),
            );
            self.record_latencies(&messages);
            let (settlement, sender_error) = self.deliver(messages);
            let whole_batch_failed = sender_error.is_some() && settlement.sent.is_empty();
            if let Some(e) = &sender_error {
                self.report(e);
            }
            #[cfg(feature = "opentelemetry")]
            let dead: Vec<(i64, u32, String)> = settlement
                .returned
                .iter()
                .filter(|r| r.dead)
                .map(|r| (r.message.id, r.attempts, r.error.clone()))
                .collect();
            let report = self.settle(settlement);
            // Counted only now, after the commit: the counters follow the rows.
            self.telemetry.record_settled(report, started.elapsed());
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
                send_failures = send_failures.saturating_add(1);
                if self.pause(self.backoff.delay(send_failures)) {
                    break;
                }
            } else {
                send_failures = 0;
            }
        }
        log::debug!("relay worker stopped");
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

    fn claim(&mut self) -> Result<Vec<Message>, Error> {
        let batch_size = self.batch_size;
        self.session()?.claim(batch_size)
    }

    /// Settles the batch on the session that claimed it; reports what was committed.
    fn settle(&mut self, settlement: Settlement) -> SettleReport {
        let outcome = match self.session.as_mut() {
            Some(session) => session.settle(settlement),
            None => (SettleReport::default(), None),
        };
        if let (_, Some(e)) = &outcome {
            self.report(e);
        }
        outcome.0
    }

    /// Time from each message's producing transaction (database clock) to now.
    fn record_latencies(&self, messages: &[Message]) {
        let now = time::OffsetDateTime::now_utc();
        for m in messages {
            let latency = (now - m.created_at).try_into().unwrap_or(Duration::ZERO);
            self.telemetry.record_latency(latency);
        }
    }

    /// Hands the messages to the Sender, catching panics, and decides each message's fate.
    fn deliver(&mut self, messages: Vec<Message>) -> (Settlement, Option<Error>) {
        let mut batch = Batch::new(messages);
        let batch_size = batch.len();
        let sender = &mut self.sender;
        let result = panic::catch_unwind(AssertUnwindSafe(|| sender.send(&mut batch)));
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
        let handler = &self.error_handler;
        if panic::catch_unwind(AssertUnwindSafe(|| handler(error))).is_err() {
            log::error!("troutbox error handler panicked while handling: {error}");
        }
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
