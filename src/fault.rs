//! Named fault points at every step of the claim protocol (feature `failpoints`), for tests
//! that inject faults where reasoning alone misses timing windows.
//!
//! Each point is a [`fail`](https://docs.rs/fail) fail point: configure one with
//! `fail::cfg(name, actions)` (`panic`, `sleep(ms)`, `return`, with counts such as
//! `1*panic`) or `fail::cfg_callback(name, f)` (to abort the process, or to terminate the
//! relay's connections from the server side at that very step). `return` makes the step
//! fail with [`Error::Injected`](crate::Error) where the step can fail; elsewhere it does
//! nothing. Without the feature the points compile to nothing.
//!
//! tests/fault_points.rs drives every point with every fault that applies, in unordered,
//! ordered and keep-sent modes, and checks the protocol's invariants after each case
//! (RELIABILITY.md, "Fault points").

/// The claim transaction is about to begin (before `BEGIN` is sent).
pub const CLAIM_BEGIN: &str = "troutbox::claim::begin";
/// The claim transaction is open; the claim statement is about to run.
pub const CLAIM_STATEMENT: &str = "troutbox::claim::statement";
/// The batch is claimed; it is about to be recorded in the claim journal.
pub const JOURNAL_RECORD: &str = "troutbox::claim::journal_record";
/// The batch is recorded and proven held; the Sender is about to be called.
pub const BEFORE_SENDER: &str = "troutbox::relay::before_sender";
/// The Sender has returned; the outcome is about to be settled.
pub const AFTER_SENDER: &str = "troutbox::relay::after_sender";
/// The settlement is about to put the failed messages back (inside the claim transaction).
pub const SETTLE: &str = "troutbox::claim::settle";
/// The settlement is about to send the COMMIT of the claim transaction.
pub const COMMIT: &str = "troutbox::claim::commit";
/// The claim transaction was lost; its outcome is about to be recorded on the second
/// connection (before that transaction begins).
pub const LATE_SETTLE: &str = "troutbox::claim::late_settle";
/// Inside the late settlement's transaction, after it took the claim's journal row and
/// recorded the outcome of the messages nobody holds (their row locks held), before it
/// charges the others and commits.
pub const LATE_SETTLE_MID: &str = "troutbox::claim::late_settle_mid";
/// Abandoned claims are about to be turned into charges.
pub const RECOVERY: &str = "troutbox::claim::recovery";
/// An undecodable row is about to be set aside as dead.
pub const SET_ASIDE: &str = "troutbox::claim::set_aside";
/// A partition maintenance step holds its lock on the table (keep-sent retention).
pub const MAINTENANCE_STEP: &str = "troutbox::maintenance::step";

/// Every point, in protocol order.
pub const ALL: &[&str] = &[
    CLAIM_BEGIN,
    CLAIM_STATEMENT,
    JOURNAL_RECORD,
    BEFORE_SENDER,
    AFTER_SENDER,
    SETTLE,
    COMMIT,
    LATE_SETTLE,
    LATE_SETTLE_MID,
    RECOVERY,
    SET_ASIDE,
    MAINTENANCE_STEP,
];

/// Runs fault point `point`'s configured action; `Some(Error::Injected { .. })` when that
/// action is `return`, for the step to fail with. Always `None` without the feature.
#[inline(always)]
pub(crate) fn injected(point: &'static str) -> Option<crate::Error> {
    #[cfg(feature = "failpoints")]
    if fail::eval(point, |_| ()).is_some() {
        log::warn!("troutbox: fault injected at {point}");
        return Some(crate::Error::Injected { point });
    }
    let _ = point;
    None
}

/// A fault point: `fault_point!(NAME)` runs the configured action (a `return` does nothing
/// here); `fault_point!(NAME, return)` makes the enclosing function return
/// `Err(Error::Injected { .. })` on `return`. Where a failing step must undo something
/// first, call [`injected`] instead.
macro_rules! fault_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        fail::eval($name, |_| ());
    };
    ($name:expr, return) => {
        if let Some(e) = $crate::fault::injected($name) {
            return Err(e);
        }
    };
}
