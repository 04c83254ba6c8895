//! What happens to a message once it is sent: deleted, or kept for an audit window.

use std::time::Duration;

use crate::Error;

/// Default partition interval when keeping sent messages: one partition per day.
pub const DEFAULT_PARTITION_INTERVAL: Duration = Duration::from_secs(86_400);
/// Default number of partitions created ahead of the current one.
pub const DEFAULT_PARTITIONS_AHEAD: u32 = 3;

/// How long sent messages stay in the outbox table. Set with
/// [`PgStore::retention`](crate::PgStore::retention), fixed when the table is created.
///
/// The default, [`Retention::delete_on_send`], removes a message in the very transaction
/// that records its delivery: the fastest relay (a claim is one `DELETE`), and a table that
/// holds only what is still to do. [`Retention::keep_sent`] keeps sent messages for an audit
/// window in range partitions on their creation time, which maintenance
/// ([`PgStore::run_maintenance_once`](crate::PgStore::run_maintenance_once)) creates ahead and
/// drops once expired: no delete churn, and old rows go away by whole partitions, never by
/// vacuum. See BENCHMARKS.md for what each costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub(crate) keep: Option<Duration>,
    pub(crate) interval: Duration,
    pub(crate) ahead: u32,
}

impl Default for Retention {
    /// [`Retention::delete_on_send`].
    fn default() -> Retention {
        Retention::delete_on_send()
    }
}

impl Retention {
    /// Deletes each message when its delivery is recorded. The default.
    #[must_use]
    pub const fn delete_on_send() -> Retention {
        Retention {
            keep: None,
            interval: DEFAULT_PARTITION_INTERVAL,
            ahead: DEFAULT_PARTITIONS_AHEAD,
        }
    }

    /// Keeps sent messages (state `sent`) for at least `window` after their creation, in
    /// range partitions on `created_at`: daily by default, 3 created ahead, plus a DEFAULT
    /// partition so producers never fail when maintenance has not run.
    #[must_use]
    pub const fn keep_sent(window: Duration) -> Retention {
        Retention {
            keep: Some(window),
            interval: DEFAULT_PARTITION_INTERVAL,
            ahead: DEFAULT_PARTITIONS_AHEAD,
        }
    }

    /// The width of one partition, at least 1 minute and a whole number of seconds;
    /// partitions are aligned on multiples of it since the Unix epoch (UTC). Do not change it
    /// for an existing table. Defaults to one day.
    #[must_use]
    pub const fn partition_interval(mut self, interval: Duration) -> Retention {
        self.interval = interval;
        self
    }

    /// How many partitions beyond the current one maintenance keeps ready. Defaults to 3.
    #[must_use]
    pub const fn partitions_ahead(mut self, n: u32) -> Retention {
        self.ahead = n;
        self
    }

    /// The audit window, or `None` when sent messages are deleted.
    pub fn keep_window(&self) -> Option<Duration> {
        self.keep
    }

    /// Partition width in whole seconds.
    pub(crate) fn interval_secs(&self) -> i64 {
        i64::try_from(self.interval.as_secs()).unwrap_or(i64::MAX)
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| {
            Err(Error::InvalidConfig {
                option: "retention",
                reason,
            })
        };
        let Some(window) = self.keep else {
            return Ok(());
        };
        if self.interval < Duration::from_secs(60) || self.interval.subsec_nanos() != 0 {
            return invalid(format!(
                "the partition interval {:?} must be a whole number of seconds, at least 60",
                self.interval
            ));
        }
        if self.interval > Duration::from_secs(366 * 86_400) {
            return invalid("the partition interval must be at most a year".into());
        }
        if window.is_zero() {
            return invalid("the retention window must be greater than zero".into());
        }
        if self.ahead > 1000 {
            return invalid(format!(
                "{} partitions ahead is too many, use at most 1000",
                self.ahead
            ));
        }
        Ok(())
    }
}
