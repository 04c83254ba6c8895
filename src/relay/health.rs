//! What each worker tells its [`Handle`](crate::Handle): alive or ended, and how many rounds
//! in a row have failed, for an application's health check.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// One worker's status, written by the worker, read by the handle.
#[derive(Debug, Default)]
pub(crate) struct WorkerStatus {
    ended: AtomicBool,
    failures: AtomicU32,
}

impl WorkerStatus {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Health {
    /// True when every worker is running and its last round succeeded.
    pub fn is_healthy(&self) -> bool {
        self.ended == 0 && self.failing == 0
    }

    pub(crate) fn of(statuses: &[Arc<WorkerStatus>]) -> Health {
        let mut health = Health {
            workers: statuses.len(),
            ended: 0,
            failing: 0,
            consecutive_failures: 0,
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
