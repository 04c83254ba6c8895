//! `/healthz` and `/metrics` over HTTP (`[service] listen`), on a thread of its own with a
//! small synchronous server (tiny_http): the supervisors' last snapshots, never a database
//! query per request.

use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::json;
use tiny_http::{Header, Response, Server};

use super::{Phase, Snapshot, SourceState};

/// Starts serving on `address`; an error when it cannot listen there.
pub fn serve(address: &str, states: Vec<Arc<SourceState>>) -> Result<(), String> {
    let server = Server::http(address).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, content_type, body) = match request.url() {
                    "/healthz" => healthz(&states),
                    "/metrics" => (200, "text/plain; version=0.0.4", metrics(&states)),
                    _ => (
                        404,
                        "text/plain",
                        "not found: try /healthz or /metrics\n".into(),
                    ),
                };
                let header =
                    Header::from_bytes("Content-Type", content_type).expect("a valid header");
                let _ = request.respond(
                    Response::from_string(body)
                        .with_status_code(status)
                        .with_header(header),
                );
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// 200 when every source runs with healthy workers and within its thresholds, else 503;
/// per source its phase, the reason it is down, its workers' health, the thresholds its
/// backlog exceeds.
fn healthz(states: &[Arc<SourceState>]) -> (u16, &'static str, String) {
    let mut all = true;
    let sources: Vec<serde_json::Value> = states
        .iter()
        .map(|state| {
            let s = state.snapshot.lock().unwrap().clone();
            let exceeded = state.exceeded(s.backlog.as_ref());
            let healthy = s.phase == Phase::Running
                && s.health.as_ref().is_some_and(|h| h.is_healthy())
                && exceeded.is_empty();
            all &= healthy;
            let (phase, error) = match &s.phase {
                Phase::Starting => ("starting", None),
                Phase::Running => ("running", None),
                Phase::Down(e) => ("down", Some(e.clone())),
                Phase::Stopping => ("stopping", None),
                Phase::Stopped => ("stopped", None),
            };
            json!({
                "name": state.name,
                "healthy": healthy,
                "phase": phase,
                "error": error,
                "workers": s.health.as_ref().map(|h| h.workers),
                "failing_workers": s.health.as_ref().map(|h| h.failing),
                "consecutive_failures": s.health.as_ref().map(|h| h.consecutive_failures),
                "exceeded": exceeded,
                "pending": s.backlog.as_ref().map(|b| b.pending),
                "dead": s.backlog.as_ref().map(|b| b.dead),
            })
        })
        .collect();
    let body = json!({ "healthy": all, "sources": sources }).to_string() + "\n";
    (if all { 200 } else { 503 }, "application/json", body)
}

/// One metric family: name, type, help, and its value for a source (none: not shown).
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Snapshot) -> Option<f64>,
);

/// What `/metrics` shows: the OpenTelemetry feature's counters (of the source's current
/// relay) and backlog gauges, and the service's own per-source series.
const FAMILIES: [Family; 11] = [
    (
        "outbox_messages_sent_total",
        "counter",
        "Messages delivered and removed from the outbox",
        |s| stat(s, |x| x.sent),
    ),
    (
        "outbox_messages_failed_total",
        "counter",
        "Failed send attempts",
        |s| stat(s, |x| x.failed),
    ),
    (
        "outbox_messages_retried_total",
        "counter",
        "Failed messages scheduled for another attempt",
        |s| stat(s, |x| x.retried),
    ),
    (
        "outbox_messages_dead_total",
        "counter",
        "Messages declared dead after their retries",
        |s| stat(s, |x| x.dead),
    ),
    (
        "outbox_batches_total",
        "counter",
        "Batches handed to the sink",
        |s| stat(s, |x| x.batches),
    ),
    (
        "outbox_errors_total",
        "counter",
        "Errors reported by the relay",
        |s| stat(s, |x| x.errors),
    ),
    (
        "outbox_pending_messages",
        "gauge",
        "Messages waiting to be sent (read every 5 s)",
        |s| s.backlog.as_ref().map(|b| b.pending as f64),
    ),
    (
        "outbox_dead_messages",
        "gauge",
        "Messages that used up their retries (read every 5 s)",
        |s| s.backlog.as_ref().map(|b| b.dead as f64),
    ),
    (
        "outbox_source_up",
        "gauge",
        "1 while the source's relay runs, 0 while it cannot start",
        |s| Some(if s.phase == Phase::Running { 1.0 } else { 0.0 }),
    ),
    (
        "outbox_source_start_failures_total",
        "counter",
        "Failed starts of the source's relay",
        |s| Some(s.start_failures as f64),
    ),
    (
        "outbox_failing_workers",
        "gauge",
        "Workers in a streak of failed rounds",
        |s| s.health.as_ref().map(|h| h.failing as f64),
    ),
];

fn stat(s: &Snapshot, f: fn(&troutbox::Stats) -> u64) -> Option<f64> {
    s.stats.as_ref().map(|x| f(x) as f64)
}

/// The families in the Prometheus text format, labelled by source.
fn metrics(states: &[Arc<SourceState>]) -> String {
    let snapshots: Vec<_> = states
        .iter()
        .map(|s| (s.name.clone(), s.snapshot.lock().unwrap().clone()))
        .collect();
    let mut out = String::new();
    for (name, kind, help, value) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (source, snapshot) in &snapshots {
            if let Some(v) = value(snapshot) {
                let _ = writeln!(out, "{name}{{source=\"{}\"}} {v}", label(source));
            }
        }
    }
    out
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
