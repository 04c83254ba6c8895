//! The `opentelemetry` feature with the SDK's in-memory exporters: metric names and values
//! equal to the committed transitions and to SQL counts, the batch spans, and the
//! producer's trace context arriving in the Sender's headers and linked from the batch span.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

#[test]
fn metrics_spans_and_trace_context_with_in_memory_exporters() {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let metric_exporter = InMemoryMetricExporter::default();
    let meter_provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metric_exporter.clone()).build())
        .build();
    let span_exporter = InMemorySpanExporter::default();
    let tracer_provider = SdkTracerProvider::builder()
        .with_simple_exporter(span_exporter.clone())
        .build();

    let pool = pool(4);
    let store = store("otel", &pool);
    let outbox = Outbox::builder(store.clone())
        .max_retries(1)
        .backoff(Backoff::exponential(
            Duration::from_millis(10),
            Duration::from_millis(20),
        ))
        .poll_interval(Duration::from_millis(5))
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

    let seen_traceparents = Arc::new(Mutex::new(Vec::new()));
    let s = seen_traceparents.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            for m in batch.iter_mut() {
                s.lock()
                    .unwrap()
                    .push(m.header("traceparent").unwrap_or_default().to_string());
                match (m.key(), m.attempts()) {
                    ("flaky", 0) | ("doomed", _) => m.mark_failed("broker said no"),
                    _ => m.mark_sent(),
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || {
        let b = store.backlog().unwrap();
        b.pending == 0 && b.dead == 1
    }));
    handle.shutdown().unwrap();
    meter_provider.force_flush().unwrap();

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
    assert_eq!(values["outbox_dead_messages"], sql_dead as f64);
    assert_eq!(values["outbox_pending_messages"], sql_pending as f64);
    assert_eq!(values["outbox_oldest_pending_age"], 0.0);
    // Blocked keys are per-key ordering's: an unordered outbox has no such gauges.
    assert!(!values.contains_key("outbox_blocked_keys"), "{values:?}");
    assert_eq!(values["outbox_batch_duration"], stats.batches as f64);
    assert_eq!(values["outbox_send_latency"], 7.0); // 5 + flaky's retry + doomed's retry

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
