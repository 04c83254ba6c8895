//! Storage: what the relay needs of a database, the backend-free claim protocol, and the
//! PostgreSQL backend.
//!
//! - [`protocol`]: the claim protocol by which a relay takes, holds and settles batches
//!   (claim, journal, settle, late settle, recover, set aside, isolate, resume),
//!   backend-free, over a narrow trait of primitives ([`protocol::ClaimBackend`]);
//!   [`vigil`]: when claims are journaled; [`retention`]: what happens to sent messages;
//! - [`postgres`]: the PostgreSQL backend: the store's configuration and migrations, its
//!   pool, the protocol's primitives (`postgres::claims`), every statement by concern
//!   (`postgres::sql`), rows to messages (`postgres::decode`), names (`postgres::ident`).
//!
//! The relay never sees SQL. It talks to a [`RelayStore`], which opens one [`RelaySession`]
//! per worker thread; a session claims a batch, and later settles or releases it. For a
//! database backend that is [`protocol::ProtocolRelay`] over the backend's primitives. The
//! interface is shaped by what PostgreSQL does well: a claim is one statement inside a
//! transaction that stays open while the Sender runs, and a settlement is at most one
//! statement plus the COMMIT, whatever the mix of sent, retried and dead messages.

pub(crate) mod ident;
#[cfg(feature = "mariadb")]
pub(crate) mod mariadb;
#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod postgres;
pub(crate) mod protocol;
pub(crate) mod retention;
pub(crate) mod side;
pub(crate) mod vigil;

use std::time::Duration;

use crate::message::Message;
use crate::Error;

/// What the relay records for a settled batch: every claimed message is in exactly one list.
#[derive(Debug, Default)]
pub(crate) struct Settlement {
    /// Ids of delivered messages: removed from the outbox.
    pub(crate) sent: Vec<i64>,
    /// Failed messages, put back for a retry or as dead.
    pub(crate) returned: Vec<Returned>,
}

/// A failed message on its way back into the outbox.
#[derive(Debug)]
pub(crate) struct Returned {
    /// The message as claimed (its `attempts` is the count before this failure).
    pub(crate) message: Message,
    /// Failures so far, this one included.
    pub(crate) attempts: u32,
    /// When it may be claimed again, from now. Ignored for dead messages.
    pub(crate) delay: Duration,
    /// Out of retries: kept, never claimed again automatically.
    pub(crate) dead: bool,
    /// Why it failed, bounded in length and free of NUL bytes.
    pub(crate) error: String,
}

/// The row transitions a settlement committed: what the counters count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SettleReport {
    /// Messages removed as sent.
    pub(crate) sent: u64,
    /// Failed messages put back for another attempt.
    pub(crate) retried: u64,
    /// Failed messages declared dead.
    pub(crate) dead: u64,
}

impl std::ops::AddAssign for SettleReport {
    fn add_assign(&mut self, other: SettleReport) {
        self.sent += other.sent;
        self.retried += other.retried;
        self.dead += other.dead;
    }
}

/// What a claim produced: the messages for the Sender, and what it settled by itself.
#[derive(Debug, Default)]
pub(crate) struct Claimed {
    /// The messages to hand to the Sender, in id order. Their `attempts` includes the claims
    /// of them that ended without a settlement.
    pub(crate) messages: Vec<Message>,
    /// What the claim settled or gave back by itself, one error each, to report once the
    /// batch is settled: messages set aside as dead (undecodable rows, messages whose claims
    /// were abandoned `max_retries + 1` times), already committed, and claims given back
    /// before their Sender ([`Error::ClaimExpired`]).
    pub(crate) reports: Vec<Error>,
    /// The row transitions committed while claiming.
    pub(crate) report: SettleReport,
    /// When the claim statement of `messages` was sent: the claim is provably held until
    /// [`send_deadline`] of it. `None` with no messages.
    pub(crate) claimed_at: Option<std::time::Instant>,
}

/// The latest instant a Sender may start on a batch claimed at `claimed_at`: half the send
/// timeout later. The server ends a claim's transaction once it has been idle for the send
/// timeout, counted from after its claim statement (so after `claimed_at`); a Sender started
/// by then has at least the other half to run.
pub(crate) fn send_deadline(
    claimed_at: std::time::Instant,
    send_timeout: Duration,
) -> std::time::Instant {
    claimed_at + send_window(send_timeout)
}

/// How long after its claim a Sender may start (see [`send_deadline`]): half the send
/// timeout. A Sender still running this long after it started has its claim ending before
/// it returns, unless it returns within the other half.
pub(crate) fn send_window(send_timeout: Duration) -> Duration {
    send_timeout / 2
}

impl SettleReport {
    /// What a settlement commits when its transaction commits as a whole.
    pub(crate) fn of(settlement: &Settlement) -> SettleReport {
        let dead = settlement.returned.iter().filter(|r| r.dead).count() as u64;
        SettleReport {
            sent: settlement.sent.len() as u64,
            retried: settlement.returned.len() as u64 - dead,
            dead,
        }
    }
}

/// Storage as the relay sees it. Implemented by [`PgStore`](crate::PgStore), and in the unit
/// tests by an in-memory store.
pub(crate) trait RelayStore: Send + Sync + 'static {
    /// One worker's connection to the store.
    type Session: RelaySession;

    /// Opens a session (for PostgreSQL: takes a connection from the pool and prepares the
    /// claim statement on it).
    fn open_session(&self) -> Result<Self::Session, Error>;

    /// A worker was found stuck in a call that never returned (its connection's network path
    /// froze): connections shared by the workers and opened before may be on the same path,
    /// and must not be used again without a bounded check.
    fn suspect_connections(&self) {}

    /// A Sender has run past its claim's deadline (half the send timeout): the claim will
    /// end without a settlement, and its messages will be claimed again; whoever claims
    /// them must be able to charge the next such end (see `store::vigil`).
    fn sender_overran(&self) {}
}

/// One worker's connection. At most one claim is open at a time.
pub(crate) trait RelaySession: Send {
    /// Claims up to `limit` due messages, locking them against other relays until
    /// [`settle`](Self::settle) (or until the session is dropped, which gives them back, and
    /// counts the claim as an attempt). No message to send leaves nothing open.
    ///
    /// Messages are returned only while their claim is provably held, with the instant of
    /// the claim ([`Claimed::claimed_at`]; the Sender must start before [`send_deadline`]
    /// of it): a claim found ended, or
    /// one whose steps took too long, is given back (uncharged) and reported as
    /// [`Error::ClaimExpired`].
    fn claim(&mut self, limit: usize) -> Result<Claimed, Error>;

    /// Gives the open claim back untouched and uncharged: its messages never reached the
    /// Sender (the worker was replaced, or the claim is past its [`send_deadline`]).
    fn release(&mut self);

    /// Records the outcome of the open claim and ends it. Applied atomically: either the
    /// whole settlement is recorded, or (after a lost connection) it is applied afterwards
    /// to the rows no other relay has claimed since. Returns the transitions that were
    /// committed, and the error that lost the claim transaction, if one did.
    fn settle(&mut self, settlement: Settlement) -> (SettleReport, Option<Error>);

    /// True when the session cannot be used any more and a new one must be opened.
    fn is_broken(&self) -> bool;
}

/// Error text as it can be stored: NUL bytes replaced (PostgreSQL text cannot hold them),
/// cut to [`MAX_ERROR_TEXT`](crate::MAX_ERROR_TEXT) bytes on a character boundary.
pub(crate) fn storable_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(crate::MAX_ERROR_TEXT));
    for c in text.chars().map(|c| if c == '\0' { '\u{FFFD}' } else { c }) {
        if out.len() + c.len_utf8() > crate::MAX_ERROR_TEXT {
            break;
        }
        out.push(c);
    }
    out
}
