//! Retry delays: exponential, capped, with jitter.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a failed message waits before its next attempt.
///
/// The delay before attempt `n + 1` (after `n` failures) is `initial × 2^(n-1)`, capped at
/// `max`. With jitter (the default) the actual delay is drawn uniformly from
/// `[delay / 2, delay]`, so messages that failed together do not all come back at once.
///
/// ```
/// use std::time::Duration;
/// use troutbox::Backoff;
///
/// let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10))
///     .without_jitter();
/// assert_eq!(backoff.delay(1), Duration::from_millis(100));
/// assert_eq!(backoff.delay(3), Duration::from_millis(400));
/// assert_eq!(backoff.delay(30), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: bool,
}

/// Default delay after the first failure.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Default cap on the delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The longest retry delay a [`Backoff`] accepts: 30 days. A retry time is stored as a
/// timestamp; a delay near [`Duration::MAX`] would overflow PostgreSQL's interval and fail
/// the settlement of every batch holding the message.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30 * 24 * 3600);

impl Default for Backoff {
    /// Exponential from 1 s, capped at 5 minutes, with jitter.
    fn default() -> Backoff {
        Backoff::exponential(DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX)
    }
}

impl Backoff {
    /// Exponential backoff from `initial`, doubling per failure, capped at `max`, with jitter.
    /// [`OutboxBuilder::build`](crate::OutboxBuilder::build) rejects a zero `initial` and a
    /// `max` below `initial`.
    #[must_use]
    pub const fn exponential(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            jitter: true,
        }
    }

    /// The same backoff with exact, deterministic delays.
    #[must_use]
    pub const fn without_jitter(mut self) -> Backoff {
        self.jitter = false;
        self
    }

    /// The delay after the first failure.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The cap on the delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay to wait after `failures` failed attempts (`failures` ≥ 1; 0 is treated as 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(63);
        let factor = 1u64 << exponent;
        let nominal = u32::try_from(factor)
            .ok()
            .and_then(|f| self.initial.checked_mul(f))
            .map_or(self.max, |d| d.min(self.max));
        if !self.jitter || nominal.is_zero() {
            return nominal;
        }
        let half = nominal / 2;
        let spread = (nominal - half).as_nanos() as u64;
        half + Duration::from_nanos(random_u64() % (spread + 1))
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("the initial delay must be greater than zero".into());
        }
        if self.max > MAX_BACKOFF {
            return Err(format!(
                "the maximum delay ({:?}) is above the limit of 30 days (MAX_BACKOFF)",
                self.max
            ));
        }
        if self.max < self.initial {
            return Err(format!(
                "the maximum delay ({:?}) must not be below the initial delay ({:?})",
                self.max, self.initial
            ));
        }
        Ok(())
    }
}

/// A uniformly distributed random number from the standard library's randomly keyed hasher;
/// jitter needs spread, not cryptographic quality.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    thread_local!(static STATE: RandomState = RandomState::new());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    STATE.with(|s| s.hash_one(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let b =
            Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60)).without_jitter();
        let delays: Vec<u64> = (0..9).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_in_upper_half_and_varies() {
        let b = Backoff::exponential(Duration::from_millis(1000), Duration::from_secs(60));
        let delays: Vec<Duration> = (0..200).map(|_| b.delay(2)).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(1000) && *d <= Duration::from_millis(2000)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 100,
            "jitter barely varies: {}",
            distinct.len()
        );
    }

    #[test]
    fn validation() {
        assert!(Backoff::default().validate().is_ok());
        assert!(Backoff::exponential(Duration::ZERO, Duration::from_secs(1))
            .validate()
            .is_err());
        assert!(
            Backoff::exponential(Duration::from_secs(2), Duration::from_secs(1))
                .validate()
                .is_err()
        );
    }
}
