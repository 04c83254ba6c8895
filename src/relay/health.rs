//! What each worker tells its [`Handle`](crate::Handle): alive or ended, and how many rounds
//! in a row have failed, for an application's health check.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// One worker's status, written by the worker, read by the handle.
#[derive(Debug, Default)]
pub(crate) struct WorkerStatus {
    ended: AtomicBool,
    failures: AtomicU32,
    /// Since when the worker has been in its current database call: what the handle's
    /// watchdog reads.
    in_db: Since,
    /// Since when the worker has been in its Sender: the watchdog tells the store when a
    /// Sender outlives its claim's deadline.
    in_sender: Since,
    /// The watchdog gave up on this worker and started another in its place: whatever its
    /// stuck call returns, the worker leaves without acting on it.
    abandoned: AtomicBool,
}

/// The instant something began (µs since [`epoch`] plus one), 0 when it is not going on.
#[derive(Debug, Default)]
struct Since(AtomicU64);

impl Since {
    fn now() -> u64 {
        u64::try_from(epoch().elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn enter(&self) {
        self.0
            .store(Since::now().saturating_add(1), Ordering::Relaxed);
    }

    fn leave(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    fn elapsed(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_micros(
                Since::now().saturating_sub(since - 1),
            )),
        }
    }
}

/// The process's reference instant for [`Since`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl WorkerStatus {
    /// The worker is about to wait on the database (a pool checkout, a claim, a settlement).
    pub(crate) fn enter_db(&self) {
        self.in_db.enter();
    }

    /// The database call returned.
    pub(crate) fn leave_db(&self) {
        self.in_db.leave();
    }

    /// How long the worker has been in its current database call, if it is in one.
    pub(crate) fn in_db_for(&self) -> Option<Duration> {
        self.in_db.elapsed()
    }

    /// The worker is about to call its Sender.
    pub(crate) fn enter_sender(&self) {
        self.in_sender.enter();
    }

    /// The Sender returned (or panicked).
    pub(crate) fn leave_sender(&self) {
        self.in_sender.leave();
    }

    /// How long the worker has been in its Sender, if it is in it.
    pub(crate) fn in_sender_for(&self) -> Option<Duration> {
        self.in_sender.elapsed()
    }

    /// Gives up on the worker (see `abandoned`).
    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    /// Whether the watchdog gave up on the worker.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// A round (claim, send, settle) ended without error.
    pub(crate) fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// A round failed (database error, panic); `streak` rounds in a row so far.
    pub(crate) fn failed(&self, streak: u32) {
        self.failures.store(streak, Ordering::Relaxed);
    }
}

/// Marks its worker ended when dropped: when the thread leaves its loop, whatever the way.
pub(crate) struct EndGuard(pub(crate) Arc<WorkerStatus>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Relaxed);
    }
}

/// A snapshot of a relay's workers, from [`Handle::health`](crate::Handle::health).
///
/// A worker never dies of an error or a panic: it reports it through the error handler and
/// tries again, with a pause that grows while the failures go on. `failing` says how many
/// are in such a streak right now (the database is down, a role lacks a right, ...).
///
/// With the `serde` feature it implements `Serialize`, as an object of its fields (for a
/// health endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Health {
    /// Worker threads the relay started.
    pub workers: usize,
    /// Workers whose thread has ended: all of them after a shutdown, none before.
    pub ended: usize,
    /// Running workers whose last round failed.
    pub failing: usize,
    /// The longest current streak of failed rounds among the workers.
    pub consecutive_failures: u32,
    /// Workers replaced so far because a database call of theirs never returned (a
    /// connection dropped silently by a NAT, a load balancer or a proxy). Each replaced
    /// worker's thread is left behind, detached, with its connection; the replacement
    /// takes a new one. A growing number is worth an alert about the network.
    pub replaced: usize,
}

impl Health {
    /// True when every worker is running and its last round succeeded.
    pub fn is_healthy(&self) -> bool {
        self.ended == 0 && self.failing == 0
    }

    pub(crate) fn of(statuses: &[Arc<WorkerStatus>], replaced: usize) -> Health {
        let mut health = Health {
            workers: statuses.len(),
            ended: 0,
            failing: 0,
            consecutive_failures: 0,
            replaced,
        };
        for status in statuses {
            if status.ended.load(Ordering::Relaxed) {
                health.ended += 1;
                continue;
            }
            let failures = status.failures.load(Ordering::Relaxed);
            if failures > 0 {
                health.failing += 1;
                health.consecutive_failures = health.consecutive_failures.max(failures);
            }
        }
        health
    }
}
