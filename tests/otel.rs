//! The `opentelemetry` feature with the SDK's in-memory exporters: metric names and values
//! equal to the committed transitions and to SQL counts (the gauges read with a backlog
//! that is not empty, the histograms by their values, not only their counts), the batch
//! spans, and the producer's trace context arriving in the Sender's headers and linked from
//! the batch span.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{count, eventually, pool, store, PATIENCE};
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{global, Context, KeyValue};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use troutbox::{Backoff, Batch, Outbox};

/// Last value of each metric: sums and gauges as i64 (f64 gauges truncated), histograms as
/// their count.
fn metric_values(exporter: &InMemoryMetricExporter) -> HashMap<String, f64> {
    let mut values = HashMap::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let v = match m.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        s.data_points().map(|p| p.value() as f64).sum()
                    }
                    AggregatedMetrics::I64(MetricData::Gauge(g)) => {
                        g.data_points().map(|p| p.value() as f64).sum()
                    }
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => {
                        g.data_points().map(|p| p.value() as f64).sum()
                    }
                    AggregatedMetrics::F64(MetricData::Gauge(g)) => {
                        g.data_points().map(|p| p.value()).sum()
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        h.data_points().map(|p| p.count() as f64).sum()
                    }
                    _ => continue,
                };
                values.insert(m.name().to_string(), v);
            }
        }
    }
    values
}

/// Count, sum, min and max of the histogram `name` in the last export that holds it.
fn histogram(exporter: &InMemoryMetricExporter, name: &str) -> (u64, f64, f64, f64) {
    let mut found = None;
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics().filter(|m| m.name() == name) {
                if let AggregatedMetrics::F64(MetricData::Histogram(h)) = m.data() {
                    let points: Vec<_> = h.data_points().collect();
                    assert_eq!(points.len(), 1, "{name}: one series, no attributes");
                    let p = points[0];
                    found = Some((
                        p.count(),
                        p.sum(),
                        p.min().expect("min recorded"),
                        p.max().expect("max recorded"),
                    ));
                }
            }
        }
    }
    found.unwrap_or_else(|| panic!("no histogram {name}"))
}

/// Seconds since the oldest pending message of `schema`'s outbox was created, by the
/// server's clock.
fn sql_oldest_pending_age(pool: &troutbox::PgPool, schema: &str) -> f64 {
    pool.get()
        .unwrap()
        .query_one(
            &format!(
                "SELECT extract(epoch FROM now() - min(created_at))::float8 \
                 FROM {schema}.outbox_messages WHERE state = 'pending'"
            ),
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn metrics_spans_and_trace_context_with_in_memory_exporters() {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let metric_exporter = InMemoryMetricExporter::default();
    // Collected only by the force_flush below: the gauges are read once, after the backlog
    // below is in place (a periodic collection would cache an earlier reading for 1 s).
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(metric_exporter.clone())
                .with_interval(Duration::from_secs(3600))
                .build(),
        )
        .build();
    let span_exporter = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(span_exporter.clone())
        .build();

    let pool = pool(4);
    let store = store("otel", &pool);
    let outbox = common::fast_outbox(&store)
        .max_retries(1)
        .with_meter(opentelemetry::metrics::MeterProvider::meter(
            &meter_provider,
            "troutbox",
        ))
        .with_tracer(tracer_provider.tracer("troutbox"))
        .build()
        .unwrap();

    // Producer: inside an active span, so add_message records its context.
    let producer_tracer = tracer_provider.tracer("producer");
    let producer_span = producer_tracer.start("create order");
    let producer_trace_id = producer_span.span_context().trace_id();
    {
        let _active = Context::current_with_span(producer_span).attach();
        let mut conn = pool.get().unwrap();
        let mut tx = conn.transaction().unwrap();
        for key in ["ok", "ok", "ok", "flaky", "doomed"] {
            outbox.add_message(&mut tx, key, b"v").unwrap();
        }
        tx.commit().unwrap();
        Context::current().span().end();
    }
    // Produced 1 h ("ok"), 2 h ("flaky") and 3 h ("doomed") ago by the server's clock, so
    // each send latency is known to within the test's own duration.
    let started = Instant::now();
    pool.get()
        .unwrap()
        .batch_execute(
            "UPDATE otel.outbox_messages SET created_at = now() - CASE key \
             WHEN 'ok' THEN interval '1 hour' WHEN 'flaky' THEN interval '2 hours' \
             ELSE interval '3 hours' END",
        )
        .unwrap();

    let seen_traceparents = Arc::new(Mutex::new(Vec::new()));
    let s = seen_traceparents.clone();
    // Time spent inside the Sender, per batch: a lower bound of each batch's duration.
    let sender_times = Arc::new(Mutex::new(Vec::new()));
    let times = sender_times.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            let entered = Instant::now();
            for m in batch.iter_mut() {
                s.lock()
                    .unwrap()
                    .push(m.header("traceparent").unwrap_or_default().to_string());
                match (m.key(), m.attempts()) {
                    ("flaky", 0) | ("doomed", _) => m.mark_failed("broker said no"),
                    _ => m.mark_sent(),
                }
            }
            times.lock().unwrap().push(entered.elapsed().as_secs_f64());
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || {
        let b = store.backlog().unwrap();
        b.pending == 0 && b.dead == 1
    }));
    handle.shutdown().unwrap();
    let elapsed = started.elapsed().as_secs_f64();

    // A backlog the stopped relay leaves alone: 3 pending messages, the oldest created 2 h
    // ago, so the gauges have something other than 0 to show.
    {
        let mut conn = pool.get().unwrap();
        for key in ["late-1", "late-2", "late-3"] {
            outbox.add_message(&mut *conn, key, b"v").unwrap();
        }
        conn.batch_execute(
            "UPDATE otel.outbox_messages SET created_at = now() - CASE key \
             WHEN 'late-1' THEN interval '30 minutes' ELSE interval '2 hours' END \
             WHERE key IN ('late-1', 'late-2')",
        )
        .unwrap();
    }
    let age_before = sql_oldest_pending_age(&pool, "otel");
    meter_provider.force_flush().unwrap();
    let age_after = sql_oldest_pending_age(&pool, "otel");

    // Counters: 4 sent; flaky failed once (retried), doomed twice (retried, then dead).
    let values = metric_values(&metric_exporter);
    assert_eq!(values["outbox_messages_sent"], 4.0, "{values:?}");
    assert_eq!(values["outbox_messages_failed"], 3.0);
    assert_eq!(values["outbox_messages_retried"], 2.0);
    assert_eq!(values["outbox_messages_dead"], 1.0);
    let stats = handle.stats();
    assert_eq!(
        (stats.sent, stats.failed, stats.retried, stats.dead),
        (4, 3, 2, 1)
    );
    // Gauges equal a direct SQL count.
    let sql_dead = count(
        &pool,
        "SELECT count(*) FROM otel.outbox_messages WHERE state = 'dead'",
    );
    let sql_pending = count(
        &pool,
        "SELECT count(*) FROM otel.outbox_messages WHERE state = 'pending'",
    );
    assert_eq!((sql_dead, sql_pending), (1, 3));
    assert_eq!(values["outbox_dead_messages"], sql_dead as f64);
    assert_eq!(values["outbox_pending_messages"], sql_pending as f64);
    // The age of the oldest pending message (2 h), between two readings of the server's
    // clock taken around the collection (1 s allowed between the two processes' clocks).
    assert!(age_before > 7_199.0, "{age_before}");
    let age = values["outbox_oldest_pending_age"];
    assert!(
        age_before - 1.0 <= age && age <= age_after + 1.0,
        "oldest pending age {age}, SQL says {age_before}..{age_after}"
    );
    // Blocked keys are per-key ordering's: an unordered outbox has no such gauges.
    assert!(!values.contains_key("outbox_blocked_keys"), "{values:?}");
    assert_eq!(values["outbox_batch_duration"], stats.batches as f64);
    assert_eq!(values["outbox_send_latency"], 7.0); // 5 + flaky's retry + doomed's retry

    // Histogram values, in seconds. Send latency: 3 "ok" at 1 h, "flaky" twice at 2 h,
    // "doomed" twice at 3 h, each plus at most the time the test has run (1 s allowed
    // between the clocks).
    let (n, sum, min, max) = histogram(&metric_exporter, "outbox_send_latency");
    assert_eq!(n, 7);
    let within = |v: f64, base: f64, times: f64| {
        v >= times * (base - 1.0) && v <= times * (base + elapsed + 1.0)
    };
    assert!(within(min, 3_600.0, 1.0), "min latency {min}");
    assert!(within(max, 10_800.0, 1.0), "max latency {max}");
    let expected = 3.0 * 3_600.0 + 2.0 * 7_200.0 + 2.0 * 10_800.0;
    assert!(
        sum >= expected - 7.0 && sum <= expected + 7.0 * (elapsed + 1.0),
        "latency sum {sum}, expected {expected} + up to 7 x {elapsed} s"
    );
    // Batch duration: each batch lasted at least its time in the Sender, and all of them
    // together no longer than the relay ran.
    let sender_times = sender_times.lock().unwrap();
    let (n, sum, _, max) = histogram(&metric_exporter, "outbox_batch_duration");
    assert_eq!(n, sender_times.len() as u64);
    let in_sender: f64 = sender_times.iter().sum();
    let longest = sender_times.iter().cloned().fold(0.0, f64::max);
    assert!(
        sum >= in_sender && sum <= elapsed,
        "batch durations sum {sum} s: at least {in_sender} s in the Sender, at most {elapsed} s of run"
    );
    assert!(max >= longest && max <= elapsed, "longest batch {max} s");

    // The producer's context reached the Sender in the headers.
    let traceparents = seen_traceparents.lock().unwrap();
    assert!(
        traceparents
            .iter()
            .all(|tp| tp.contains(&producer_trace_id.to_string())),
        "{traceparents:?}"
    );

    // Batch spans: real sizes and outcomes, linked to the producer, one event per dead message.
    tracer_provider.force_flush().unwrap();
    let spans: Vec<_> = span_exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "troutbox.batch")
        .collect();
    assert_eq!(spans.len() as u64, stats.batches);
    let attr = |s: &opentelemetry_sdk::trace::SpanData, key: &str| -> i64 {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| match &kv.value {
                opentelemetry::Value::I64(v) => *v,
                other => panic!("{key} = {other:?}"),
            })
            .unwrap()
    };
    let total = |key: &str| spans.iter().map(|s| attr(s, key)).sum::<i64>();
    assert_eq!(total("troutbox.sent"), 4);
    assert_eq!(total("troutbox.retried"), 2);
    assert_eq!(total("troutbox.dead"), 1);
    assert_eq!(total("messaging.batch.message_count"), 7);
    assert!(spans.iter().all(|s| s
        .links
        .iter()
        .any(|l| l.span_context.trace_id() == producer_trace_id)));
    let dead_events: Vec<_> = spans
        .iter()
        .flat_map(|s| s.events.iter())
        .filter(|e| e.name == "troutbox.message.dead")
        .collect();
    assert_eq!(dead_events.len(), 1);
    assert!(dead_events[0]
        .attributes
        .contains(&KeyValue::new("troutbox.last_error", "broker said no")));
}

/// Per-key ordering's gauges: one key held back by a failing message, counted with the age
/// of that message, and nothing for the keys that flow.
#[test]
fn blocked_key_gauges_of_an_ordered_outbox() {
    let metric_exporter = InMemoryMetricExporter::default();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metric_exporter.clone()).build())
        .build();
    let pool = pool(4);
    let store = store("otel_ordered", &pool);
    let outbox = Outbox::builder(store.clone())
        .per_key_ordering(true)
        .backoff(Backoff::exponential(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        ))
        .poll_interval(Duration::from_millis(5))
        .with_meter(opentelemetry::metrics::MeterProvider::meter(
            &meter_provider,
            "troutbox",
        ))
        .build()
        .unwrap();
    outbox.migrate().unwrap();
    let mut conn = pool.get().unwrap();
    outbox
        .add_messages(
            &mut *conn,
            [
                troutbox::NewMessage::new("stuck", b"1"),
                troutbox::NewMessage::new("stuck", b"2"),
                troutbox::NewMessage::new("free", b"3"),
            ],
        )
        .unwrap();
    let mut handle = outbox
        .start(|batch: &mut Batch| -> Result<(), String> {
            batch.send_each(|m| {
                if m.key() == "stuck" {
                    Err("broker said no")
                } else {
                    Ok(())
                }
            });
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || {
        store.blocked_keys(10).unwrap().len() == 1 && store.backlog().unwrap().pending == 2
    }));
    handle.shutdown().unwrap();
    meter_provider.force_flush().unwrap();
    let values = metric_values(&metric_exporter);
    assert_eq!(values["outbox_blocked_keys"], 1.0, "{values:?}");
    assert!(values["outbox_oldest_blocked_age"] > 0.0, "{values:?}");
    let (count, _) = store.blocked_summary().unwrap();
    assert_eq!(count, 1);
}
