//! Observability: counters and timings of the relay ([`Stats`](crate::Stats)), and with the
//! `opentelemetry` feature, metrics and traces (the backlog gauge among them reads
//! [`PgStore::backlog`](crate::PgStore::backlog); the `tracing` feature adds a span per batch).

#[cfg(feature = "opentelemetry")]
pub(crate) mod otel;
pub(crate) mod stats;
#[cfg(feature = "tracing")]
pub(crate) mod tracing;

use std::sync::Arc;
use std::time::Duration;

use crate::store::SettleReport;
use stats::Counters;

/// Everything a relay handle reports to: its own counters, and the outbox's OpenTelemetry
/// instruments when the feature is on.
#[derive(Default)]
pub(crate) struct Telemetry {
    pub(crate) counters: Counters,
    #[cfg(feature = "opentelemetry")]
    pub(crate) otel: Option<Arc<otel::Instruments>>,
}

impl Telemetry {
    /// Counts committed transitions (see [`Counters::record_settled`]).
    pub(crate) fn record_settled(&self, report: SettleReport, batch: Option<Duration>) {
        self.counters.record_settled(report, batch);
        #[cfg(feature = "opentelemetry")]
        if let Some(otel) = &self.otel {
            otel.record_settled(report, batch);
        }
    }

    /// Records the latency of each message of a batch: the counters once per batch, the
    /// OpenTelemetry histogram (when on) once per message.
    pub(crate) fn record_latencies(&self, latencies: &[Duration]) {
        self.counters.record_latencies(latencies.iter().copied());
        #[cfg(feature = "opentelemetry")]
        if let Some(otel) = &self.otel {
            for &latency in latencies {
                otel.record_latency(latency);
            }
        }
    }

    pub(crate) fn record_error(&self) {
        self.counters.record_error();
    }
}

/// Shared handle to a [`Telemetry`].
pub(crate) type SharedTelemetry = Arc<Telemetry>;
