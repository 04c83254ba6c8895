//! OpenTelemetry metrics and traces (cargo feature `opentelemetry`).
//!
//! The four counters of the Go original with the same names, counted after the database
//! commit; gauges of the backlog read from the table; histograms of batch duration and
//! send latency; a span per batch linked to the producers' trace contexts; an event per
//! dead message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use opentelemetry::trace::{Link, Span, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use crate::message::Message;
use crate::reports::Backlog;
use crate::store::SettleReport;

/// Name under which troutbox asks the global providers for its meter and tracer.
pub(crate) const SCOPE: &str = "troutbox";

/// How long a backlog reading serves the gauges: one query per collection, not three.
const BACKLOG_TTL: Duration = Duration::from_secs(1);

/// Reads the backlog for the gauges; `None` when it cannot (database down, outbox gone).
pub(crate) type BacklogSource = Arc<dyn Fn() -> Option<Backlog> + Send + Sync>;

/// Reads the blocked keys' count and the oldest blocked head's age for the gauges of an
/// ordered outbox; `None` when it cannot.
pub(crate) type BlockedSource = Arc<dyn Fn() -> Option<(u64, Duration)> + Send + Sync>;

/// `read`, with each reading serving the gauges for [`BACKLOG_TTL`]: one query per
/// collection, whatever the number of gauges it feeds.
fn cached<V: Clone>(read: impl Fn() -> Option<V>) -> impl Fn() -> Option<V> {
    let cache: Mutex<Option<(Instant, V)>> = Mutex::new(None);
    move || {
        let mut cached = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, value)) = cached.as_ref() {
            if at.elapsed() < BACKLOG_TTL {
                return Some(value.clone());
            }
        }
        let fresh = read()?;
        *cached = Some((Instant::now(), fresh.clone()));
        Some(fresh)
    }
}

/// One outbox's instruments, shared by all its relays.
pub(crate) struct Instruments {
    sent: Counter<u64>,
    failed: Counter<u64>,
    retried: Counter<u64>,
    dead: Counter<u64>,
    batch_duration: Histogram<f64>,
    send_latency: Histogram<f64>,
    tracer: Arc<BoxedTracer>,
    _gauges: (
        ObservableGauge<i64>,
        ObservableGauge<i64>,
        ObservableGauge<f64>,
    ),
    /// With per-key ordering: blocked keys and the age of the oldest blocked head.
    _blocked: Option<(ObservableGauge<u64>, ObservableGauge<f64>)>,
}

/// What the batch span reports.
pub(crate) struct BatchSpan<'a> {
    pub(crate) start: SystemTime,
    pub(crate) size: usize,
    pub(crate) report: SettleReport,
    pub(crate) dead: &'a [(i64, u32, String)],
    pub(crate) links: Vec<Link>,
    pub(crate) error: Option<&'a str>,
}

impl Instruments {
    pub(crate) fn new(
        meter: Option<Meter>,
        tracer: Option<Arc<BoxedTracer>>,
        backlog: BacklogSource,
        blocked: Option<BlockedSource>,
    ) -> Instruments {
        let meter = meter.unwrap_or_else(|| global::meter(SCOPE));
        let tracer = tracer.unwrap_or_else(|| Arc::new(global::tracer(SCOPE)));
        let counter = |name: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_description(description)
                .build()
        };
        let read = Arc::new(cached(move || backlog()));
        let (r1, r2, r3) = (read.clone(), read.clone(), read);
        let blocked_gauges = blocked.map(|source| {
            let read = Arc::new(cached(move || source()));
            let (b1, b2) = (read.clone(), read);
            (
                meter
                    .u64_observable_gauge("outbox_blocked_keys")
                    .with_description(
                        "Keys whose oldest pending message has failed, holding back the key (per-key ordering)",
                    )
                    .with_callback(move |o| {
                        if let Some((count, _)) = b1() {
                            o.observe(count, &[]);
                        }
                    })
                    .build(),
                meter
                    .f64_observable_gauge("outbox_oldest_blocked_age")
                    .with_unit("s")
                    .with_description("Age of the oldest message blocking its key (per-key ordering)")
                    .with_callback(move |o| {
                        if let Some((_, age)) = b2() {
                            o.observe(age.as_secs_f64(), &[]);
                        }
                    })
                    .build(),
            )
        });
        Instruments {
            sent: counter(
                "outbox_messages_sent",
                "Messages delivered and removed from the outbox",
            ),
            failed: counter("outbox_messages_failed", "Failed send attempts"),
            retried: counter(
                "outbox_messages_retried",
                "Failed messages scheduled for another attempt",
            ),
            dead: counter(
                "outbox_messages_dead",
                "Messages declared dead after their retries",
            ),
            batch_duration: meter
                .f64_histogram("outbox_batch_duration")
                .with_unit("s")
                .with_description("Time from claiming a batch to committing its outcome")
                .build(),
            send_latency: meter
                .f64_histogram("outbox_send_latency")
                .with_unit("s")
                .with_description("Time from the producing transaction to the Sender, per message")
                .build(),
            _gauges: (
                meter
                    .i64_observable_gauge("outbox_pending_messages")
                    .with_description("Messages waiting to be sent")
                    .with_callback(move |o| {
                        if let Some(b) = r1() {
                            o.observe(b.pending, &[]);
                        }
                    })
                    .build(),
                meter
                    .i64_observable_gauge("outbox_dead_messages")
                    .with_description("Messages that used up their retries")
                    .with_callback(move |o| {
                        if let Some(b) = r2() {
                            o.observe(b.dead, &[]);
                        }
                    })
                    .build(),
                meter
                    .f64_observable_gauge("outbox_oldest_pending_age")
                    .with_unit("s")
                    .with_description("Age of the oldest pending message: the relay's lag")
                    .with_callback(move |o| {
                        if let Some(b) = r3() {
                            let age = b.oldest_pending.map_or(0.0, |t| {
                                (time::OffsetDateTime::now_utc() - t)
                                    .as_seconds_f64()
                                    .max(0.0)
                            });
                            o.observe(age, &[]);
                        }
                    })
                    .build(),
            ),
            _blocked: blocked_gauges,
            tracer,
        }
    }

    pub(crate) fn record_settled(&self, report: SettleReport, batch: Option<Duration>) {
        self.sent.add(report.sent, &[]);
        self.failed.add(report.retried + report.dead, &[]);
        self.retried.add(report.retried, &[]);
        self.dead.add(report.dead, &[]);
        if let Some(duration) = batch {
            self.batch_duration.record(duration.as_secs_f64(), &[]);
        }
    }

    pub(crate) fn record_latency(&self, latency: Duration) {
        self.send_latency.record(latency.as_secs_f64(), &[]);
    }

    /// Emits the span of a settled batch, after the fact, with its real start time.
    pub(crate) fn batch_span(&self, batch: BatchSpan<'_>) {
        let mut span = self
            .tracer
            .span_builder("troutbox.batch")
            .with_kind(SpanKind::Producer)
            .with_start_time(batch.start)
            .with_links(batch.links)
            .with_attributes([
                KeyValue::new("messaging.batch.message_count", batch.size as i64),
                KeyValue::new("troutbox.sent", batch.report.sent as i64),
                KeyValue::new("troutbox.retried", batch.report.retried as i64),
                KeyValue::new("troutbox.dead", batch.report.dead as i64),
            ])
            .start(&*self.tracer);
        if batch.report.dead > 0 {
            for (id, attempts, error) in batch.dead {
                span.add_event(
                    "troutbox.message.dead",
                    vec![
                        KeyValue::new("messaging.message.id", id.to_string()),
                        KeyValue::new("troutbox.attempts", i64::from(*attempts)),
                        KeyValue::new("troutbox.last_error", error.clone()),
                    ],
                );
            }
        }
        if let Some(error) = batch.error {
            span.set_status(Status::error(error.to_owned()));
        }
        span.end();
    }
}

/// Links to the producers' spans, read from each message's `traceparent`/`tracestate`
/// headers through the global propagator.
pub(crate) fn links(messages: &[Message]) -> Vec<Link> {
    global::get_text_map_propagator(|propagator| {
        messages
            .iter()
            .filter_map(|m| {
                let carrier: HashMap<String, String> = m
                    .headers()
                    .iter()
                    .filter(|(name, _)| name == "traceparent" || name == "tracestate")
                    .cloned()
                    .collect();
                if carrier.is_empty() {
                    return None;
                }
                let cx = propagator.extract(&carrier);
                let span_context = cx.span().span_context().clone();
                span_context
                    .is_valid()
                    .then(|| Link::with_context(span_context))
            })
            .collect()
    })
}

/// The current trace context as headers, through the global propagator (W3C `traceparent`
/// and `tracestate` with the usual `TraceContextPropagator`). Empty when there is no active
/// span or no propagator installed.
pub(crate) fn current_trace_headers() -> Vec<(String, String)> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&Context::current(), &mut carrier));
    let mut headers: Vec<(String, String)> = carrier.into_iter().collect();
    headers.sort();
    headers
}
