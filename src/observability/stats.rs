//! Counters and timings of a running relay, with no dependency: [`Stats`].
//!
//! Every counter is incremented only after the database committed the transition it counts,
//! so after any run the counters equal the rows' real transitions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::SettleReport;

/// A snapshot of a relay's counters, from [`Handle::stats`](crate::Handle::stats).
///
/// `failed = retried + dead`: every failed attempt either schedules a retry or, once the
/// message has used its retries, declares it dead.
///
/// With the `serde` feature it implements `Serialize`, as an object of its fields, the
/// timings as [`Timing`] objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Stats {
    /// Messages delivered and removed (`outbox_messages_sent`).
    pub sent: u64,
    /// Failed send attempts whose outcome was recorded (`outbox_messages_failed`).
    pub failed: u64,
    /// Failed messages scheduled for another attempt (`outbox_messages_retried`).
    pub retried: u64,
    /// Messages declared dead after their retries (`outbox_messages_dead`).
    pub dead: u64,
    /// Batches handed to the Sender.
    pub batches: u64,
    /// Errors passed to the error handler (database, Sender, panics).
    pub errors: u64,
    /// Time from claiming a batch to committing its outcome.
    pub batch_duration: Timing,
    /// Time from the producing transaction to the hand-over to the Sender, per message.
    pub send_latency: Timing,
}

/// Count, total and maximum of a series of durations.
///
/// With the `serde` feature it implements `Serialize`, the durations in seconds (a float):
/// `{"count": 4, "total_seconds": 1.5, "max_seconds": 0.75}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Timing {
    /// Number of observations.
    pub count: u64,
    /// Their sum.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "total_seconds", serialize_with = "crate::ser::seconds")
    )]
    pub total: Duration,
    /// The largest.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "max_seconds", serialize_with = "crate::ser::seconds")
    )]
    pub max: Duration,
}

impl Timing {
    /// The mean, if anything was observed.
    pub fn mean(&self) -> Option<Duration> {
        let count = u32::try_from(self.count).ok().filter(|c| *c > 0)?;
        Some(self.total / count)
    }
}

#[derive(Debug, Default)]
struct AtomicTiming {
    count: AtomicU64,
    total_nanos: AtomicU64,
    max_nanos: AtomicU64,
}

impl AtomicTiming {
    fn record(&self, d: Duration) {
        self.record_many(std::iter::once(d));
    }

    /// Records several timings with three atomic operations in all, not three each: a
    /// batch's latencies, which workers record at the same time (issue 23).
    fn record_many(&self, timings: impl Iterator<Item = Duration>) {
        let (mut count, mut total, mut max) = (0u64, 0u64, 0u64);
        for d in timings {
            let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            count += 1;
            total = total.saturating_add(nanos);
            max = max.max(nanos);
        }
        if count == 0 {
            return;
        }
        self.count.fetch_add(count, Ordering::Relaxed);
        self.total_nanos.fetch_add(total, Ordering::Relaxed);
        self.max_nanos.fetch_max(max, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Timing {
        Timing {
            count: self.count.load(Ordering::Relaxed),
            total: Duration::from_nanos(self.total_nanos.load(Ordering::Relaxed)),
            max: Duration::from_nanos(self.max_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// The live counters behind [`Stats`], shared by a handle's workers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    batches: AtomicU64,
    errors: AtomicU64,
    batch_duration: AtomicTiming,
    send_latency: AtomicTiming,
}

impl Counters {
    /// Counts committed transitions; `batch` is the duration of the batch they settled, or
    /// `None` for transitions a claim committed without a batch (messages set aside).
    pub(crate) fn record_settled(&self, report: SettleReport, batch: Option<Duration>) {
        self.sent.fetch_add(report.sent, Ordering::Relaxed);
        self.retried.fetch_add(report.retried, Ordering::Relaxed);
        self.dead.fetch_add(report.dead, Ordering::Relaxed);
        if let Some(duration) = batch {
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.batch_duration.record(duration);
        }
    }

    pub(crate) fn record_latencies(&self, latencies: impl Iterator<Item = Duration>) {
        self.send_latency.record_many(latencies);
    }

    pub(crate) fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let retried = self.retried.load(Ordering::Relaxed);
        let dead = self.dead.load(Ordering::Relaxed);
        Stats {
            sent: self.sent.load(Ordering::Relaxed),
            failed: retried + dead,
            retried,
            dead,
            batches: self.batches.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            batch_duration: self.batch_duration.snapshot(),
            send_latency: self.send_latency.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_is_retried_plus_dead_and_timings_aggregate() {
        let c = Counters::default();
        c.record_settled(
            SettleReport {
                sent: 3,
                retried: 2,
                dead: 1,
            },
            Some(Duration::from_millis(10)),
        );
        c.record_settled(SettleReport::default(), Some(Duration::from_millis(30)));
        c.record_settled(
            SettleReport {
                dead: 1,
                ..SettleReport::default()
            },
            None,
        );
        c.record_latencies([4, 9, 2].map(Duration::from_millis).into_iter());
        c.record_latencies(std::iter::empty());
        c.record_latencies(std::iter::once(Duration::from_millis(5)));
        let s = c.snapshot();
        assert_eq!(
            (s.sent, s.failed, s.retried, s.dead, s.batches),
            (3, 4, 2, 2, 2)
        );
        assert_eq!(s.batch_duration.mean(), Some(Duration::from_millis(20)));
        assert_eq!(s.batch_duration.max, Duration::from_millis(30));
        assert_eq!(s.send_latency.count, 4);
        assert_eq!(s.send_latency.total, Duration::from_millis(20));
        assert_eq!(s.send_latency.max, Duration::from_millis(9));
        assert_eq!(Timing::default().mean(), None);
    }
}
