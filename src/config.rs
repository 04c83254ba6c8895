//! Every option's default and limits, in one place, and their validation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::Error;

/// Default number of messages claimed per batch.
pub const DEFAULT_BATCH_SIZE: usize = 100;
/// Largest accepted batch size.
pub const MAX_BATCH_SIZE: usize = 10_000;
/// Default number of retries after the first failed attempt before a message is dead.
pub const DEFAULT_MAX_RETRIES: u32 = 10;
/// Largest accepted `max_retries`.
pub const MAX_MAX_RETRIES: u32 = 10_000;
/// Default longest sleep of an idle worker between two polls.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The shortest sleep of an idle worker: where adaptive polling starts after activity.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Default bound on how long a batch's transaction may stay open while the Sender runs.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of relay worker threads per [`Handle`](crate::Handle).
pub const DEFAULT_WORKERS: usize = 1;
/// Largest accepted number of workers.
pub const MAX_WORKERS: usize = 64;
/// Default time [`Handle::shutdown`](crate::Handle::shutdown) waits for workers.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest accepted message value, in bytes (1 MiB).
pub const DEFAULT_MAX_VALUE_SIZE: usize = 1 << 20;
/// Largest accepted `max_value_size` (512 MiB; PostgreSQL's own limit for a value is 1 GiB).
pub const MAX_VALUE_SIZE_LIMIT: usize = 512 << 20;
/// Largest accepted message key, in bytes. Keeps keys indexable for per-key ordering.
pub const MAX_KEY_LEN: usize = 1024;

/// The most headers (name-value pairs) one message may carry.
pub const MAX_HEADERS: usize = 100;

/// The most bytes one message's headers may hold, names and values together: 64 KiB.
/// Headers are not counted in `max_value_size`; this bounds them on their own.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// The most messages one [`add_messages`](crate::Outbox::add_messages) call accepts.
pub const MAX_MESSAGES_PER_CALL: usize = 10_000;

/// The most bytes (keys, values and headers) one `add_messages` call accepts: 256 MiB, so a
/// mistaken call cannot build a statement the size of the process's memory.
pub const MAX_BYTES_PER_CALL: usize = 256 << 20;
/// Longest error text stored with a failed message, in bytes.
pub const MAX_ERROR_TEXT: usize = 1000;

/// Default bound on the bytes of one claimed batch (values and headers): 64 MiB.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 64 << 20;

/// Called with every error the relay meets while running (database errors, Sender errors,
/// panics). It runs on the worker thread: keep it short.
pub type ErrorHandler = Arc<dyn Fn(&Error) + Send + Sync>;

/// The validated configuration of an [`Outbox`](crate::Outbox).
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) batch_size: usize,
    pub(crate) max_retries: u32,
    pub(crate) backoff: Backoff,
    pub(crate) poll_interval: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) workers: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) max_value_size: usize,
    pub(crate) notify: bool,
    /// Per-key ordering (see `OutboxBuilder::per_key_ordering`).
    pub(crate) ordered: bool,
    /// Bound on a claimed batch's bytes; `usize::MAX` for none.
    pub(crate) max_batch_bytes: usize,
    /// How long a worker's database call may go without returning before the watchdog
    /// replaces the worker (see `Handle::watch`); set by `Outbox::start` from the send
    /// timeout and the pool's connection timeout.
    pub(crate) stuck_after: Duration,
    pub(crate) error_handler: ErrorHandler,
    /// The meter for the outbox's metrics; `None` means the global meter provider's.
    #[cfg(feature = "opentelemetry")]
    pub(crate) meter: Option<opentelemetry::metrics::Meter>,
    /// The tracer for batch spans; `None` means the global tracer provider's.
    #[cfg(feature = "opentelemetry")]
    pub(crate) tracer: Option<Arc<opentelemetry::global::BoxedTracer>>,
    /// Whether `add_message` records the current trace context in the headers.
    #[cfg(feature = "opentelemetry")]
    pub(crate) propagate_trace_context: bool,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("batch_size", &self.batch_size)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("poll_interval", &self.poll_interval)
            .field("send_timeout", &self.send_timeout)
            .field("workers", &self.workers)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("max_value_size", &self.max_value_size)
            .field("notify", &self.notify)
            .field("per_key_ordering", &self.ordered)
            .finish_non_exhaustive()
    }
}

/// Calls `handler` with `error`, surviving a panicking handler (logged instead): the one way
/// every relay thread reports.
pub(crate) fn report_to(handler: &ErrorHandler, error: &crate::Error) {
    let call = std::panic::AssertUnwindSafe(|| handler(error));
    if std::panic::catch_unwind(call).is_err() {
        log::error!("troutbox error handler panicked while handling: {error}");
    }
}

/// The default error handler: logs through the `log` crate, Sender failures as warnings
/// (the messages will be retried), everything else as errors, each with its whole chain of
/// causes (a Sender's error often says what went wrong only in its source). With no logger
/// installed (the `log` crate's maximum level is `Off` until one is), it writes to standard
/// error instead: a relay that cannot deliver must not be silent by default.
pub(crate) fn log_error(error: &Error) {
    let text = crate::error::with_causes(error);
    if log::max_level() == log::LevelFilter::Off {
        eprintln!("troutbox relay: {text}");
        return;
    }
    match error {
        Error::Sender { .. } | Error::SenderPanicked { .. } => {
            log::warn!("troutbox relay: {text}")
        }
        _ => log::error!("troutbox relay: {text}"),
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            batch_size: DEFAULT_BATCH_SIZE,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_retries: DEFAULT_MAX_RETRIES,
            backoff: Backoff::default(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            workers: DEFAULT_WORKERS,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
            notify: false,
            ordered: false,
            stuck_after: DEFAULT_SEND_TIMEOUT + Duration::from_secs(35),
            error_handler: Arc::new(log_error),
            #[cfg(feature = "opentelemetry")]
            meter: None,
            #[cfg(feature = "opentelemetry")]
            tracer: None,
            #[cfg(feature = "opentelemetry")]
            propagate_trace_context: true,
        }
    }
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid =
            |option: &'static str, reason: String| Err(Error::InvalidConfig { option, reason });
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return invalid(
                "batch_size",
                format!(
                    "{} is out of range, use 1 to {MAX_BATCH_SIZE}",
                    self.batch_size
                ),
            );
        }
        if self.max_batch_bytes == 0 {
            return invalid(
                "max_batch_bytes",
                "0 would claim nothing; use at least 1 (a message larger than the bound is still claimed, alone)".into(),
            );
        }
        if self.max_retries > MAX_MAX_RETRIES {
            return invalid(
                "max_retries",
                format!(
                    "{} is out of range, use 0 to {MAX_MAX_RETRIES}",
                    self.max_retries
                ),
            );
        }
        if let Err(reason) = self.backoff.validate() {
            return invalid("backoff", reason);
        }
        let hour = Duration::from_secs(3600);
        if self.poll_interval < MIN_POLL_INTERVAL || self.poll_interval > hour {
            return invalid(
                "poll_interval",
                format!(
                    "{:?} is out of range, use 1 ms to 1 hour",
                    self.poll_interval
                ),
            );
        }
        // The send timeout becomes idle_in_transaction_session_timeout, an int of milliseconds.
        let max_timeout = Duration::from_millis(i32::MAX as u64);
        if self.send_timeout < Duration::from_millis(10) || self.send_timeout > max_timeout {
            return invalid(
                "send_timeout",
                format!(
                    "{:?} is out of range, use 10 ms to {max_timeout:?}",
                    self.send_timeout
                ),
            );
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return invalid(
                "workers",
                format!("{} is out of range, use 1 to {MAX_WORKERS}", self.workers),
            );
        }
        if self.shutdown_timeout.is_zero() {
            return invalid("shutdown_timeout", "must be greater than zero".into());
        }
        if !(1..=MAX_VALUE_SIZE_LIMIT).contains(&self.max_value_size) {
            return invalid(
                "max_value_size",
                format!(
                    "{} is out of range, use 1 to {MAX_VALUE_SIZE_LIMIT} bytes",
                    self.max_value_size
                ),
            );
        }
        Ok(())
    }
}
