//! The claim protocol, backend-free: how a relay takes a batch, holds it while the Sender
//! runs, and settles it, so that every claim is accounted for. The policy lives here; each
//! storage backend supplies the primitives ([`ClaimBackend`], [`ClaimConnection`],
//! [`LateSettlement`]), one statement or one round trip each, and nothing else. The
//! PostgreSQL primitives are in `store::postgres::claims`.
//!
//! # The protocol (unordered strategy)
//!
//! 1. **Claim.** In a transaction on the worker's connection, opened under a random claim
//!    id that anyone can tell is still running (PostgreSQL: an advisory lock), one
//!    primitive deletes (or, in keep mode, marks sent) up to `batch_size` due rows without
//!    waiting for rows other claims hold, and returns them with their charges (see 4). The
//!    transaction stays open while the Sender runs, bounded by the server at the send
//!    timeout: if it rolls back, the rows are back exactly as they were.
//! 2. **Journal.** Before the Sender runs, one row (claim id, message ids) is committed to
//!    the claim journal on a second connection shared by the relay's workers: while the
//!    relay is vigilant only (see `vigil.rs`: the first claims of a session, and for a while
//!    after anything abnormal); in steady state, a claim is held by its deadline alone, and
//!    what it would have charged is left to the next end.
//! 3. **Settle.** One primitive puts the failed messages back (re-inserted in delete mode,
//!    updated in keep mode), and the COMMIT's round trip deletes the claim's journal row. A
//!    settled claim leaves nothing behind.
//! 4. **Recover.** A journal row whose claim transaction has ended is a claim that ended
//!    without a settlement: the process was killed or aborted by its Sender, the connection
//!    was lost, the server ended the session at the send timeout. Every relay checks for
//!    such rows when it starts and about once a second, and turns each into one charge per
//!    message. A charge is an attempt: the next claim of the message adds its charges to
//!    its attempts and deletes them when it settles.
//! 5. **Isolate.** A message with charges is a suspect: if it came in a batch with others,
//!    the batch is given back untouched and each suspect is then claimed alone, so a message
//!    that crashes or hangs the relay is charged alone and ends dead after `max_retries + 1`
//!    attempts, set aside in its claim without reaching the Sender, while the innocent
//!    messages of its batch go through.
//! 6. **Late settle.** If the claim transaction is lost before its COMMIT, the outcome is
//!    applied on the second connection if the claim's journal row is still there (taking it
//!    is what keeps an outcome from being applied twice, or on top of a recovery), to the
//!    messages no other relay has claimed since. Those another relay holds are charged for
//!    the lost claim, and the dropped outcome is reported through the error handler.
//!
//! Rows that cannot be decoded are set aside as dead with the column named.
//!
//! # The per-key ordered strategy
//!
//! The same steps with a different claim (the backend's ordered claim): only the head of
//! each key (its lowest pending id), when due and not held, with a run of its followers.
//! Everything else carries over, and is what keeps the order through failures:
//!
//! - A held head hides its key from every other relay (they see it pending and locked), so
//!   one key is in at most one claim at a time, whatever the number of relays.
//! - A lost claim (killed relay, timeout) leaves its rows pending, head included: the key
//!   waits for the head to be claimed again, never skips it. Its late outcome is applied
//!   only to rows nobody holds since, so it cannot settle a message another relay holds.
//! - A suspect (a message charged for an abandoned claim) is claimed alone only if it is
//!   the head of its key ([`Take::One`] tests it), so isolating a crashing message never
//!   sends a message ahead of its key. Suspects are tried in id order.
//! - A draining session resumes after its position in the pending index, as unordered; the
//!   keys that a window of non-heads would hide are found by walking the key index.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender as ChannelSender};
use time::OffsetDateTime;

use super::vigil::{self, Vigil};
use super::{Claimed, RelaySession, RelayStore, Returned, SettleReport, Settlement};
use crate::config::ErrorHandler;
use crate::message::Message;
use crate::store::storable_text;
use crate::Error;

/// How long a session may resume after its position before it claims from the head of the
/// index again, to pick up rows that committed behind it.
const HEAD_CLAIM_EVERY: Duration = Duration::from_secs(1);

/// How often a session looks for abandoned claims to charge (see [`ClaimBackend::recover`]).
const RECOVER_EVERY: Duration = Duration::from_secs(1);

/// How often a session clears charges of messages that no longer wait.
const CHARGES_CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// A position in the pending index, `(available_at, id)`, where a draining claim resumes.
pub(crate) type Position = (OffsetDateTime, i64);

/// A session's resume position, `None` for the head.
type Mark = Option<Position>;

/// Which rows a claim takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Due rows from the head of the pending index, up to the batch size.
    Head,
    /// Due rows past a position, up to the batch size.
    After(Position),
    /// One given message, alone, if it is due and not held (with per-key ordering: and the
    /// head of its key). How a message whose earlier claim was abandoned is retried, so that
    /// a message that crashes or hangs the relay is charged alone.
    One(i64),
}

/// What a worker's connection is opened for: its claims are prepared for these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimSpec {
    /// Rows per claim.
    pub(crate) limit: usize,
    /// Bound on a batch's bytes, `None` for none.
    pub(crate) max_bytes: Option<u64>,
    /// Per-key ordering: the ordered claim.
    pub(crate) ordered: bool,
    /// The bound the server puts on a claim transaction (idle, statements, locks).
    pub(crate) send_timeout: Duration,
}

/// Why a row cannot be handed to a Sender: the column, and what the driver said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Undecodable {
    pub(crate) column: &'static str,
    pub(crate) reason: String,
}

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "row cannot be decoded: column {}: {}",
            self.column, self.reason
        )
    }
}

/// One row a claim returned, as the backend read it.
#[derive(Debug)]
pub(crate) struct ClaimedRow {
    /// Its id, `None` only if even that could not be read (then it cannot be set aside).
    pub(crate) id: Option<i64>,
    /// Its position in the pending index, where a draining claim resumes after it.
    pub(crate) position: Option<Position>,
    /// The message and the ids of its abandoned claims not charged yet, or why the row
    /// cannot be used.
    pub(crate) decoded: Result<(Message, Vec<i32>), Undecodable>,
}

/// What a recovery found (see [`ClaimBackend::recover`]).
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// Charges it added: one per message of each claim that ended without a settlement.
    pub(crate) charged: i64,
    /// The announcements (marker ids) in the journal, this relay's own included.
    pub(crate) markers: Vec<i32>,
}

/// The failed messages of a lost claim, as a late settlement records them (see
/// [`LateSettlement::record_failed`]); the lists are aligned.
#[derive(Debug)]
pub(crate) struct LateFailed<'a> {
    /// The ids, `None` for a message another claim holds now (it matches no row).
    pub(crate) ids: Vec<Option<i64>>,
    /// Milliseconds until each may be claimed again.
    pub(crate) delays: Vec<i64>,
    /// Why each failed.
    pub(crate) errors: Vec<&'a str>,
    /// The retry bound: a row whose attempts pass it is dead.
    pub(crate) max_retries: i32,
    /// The attempt each failure counts: 1, or 0 for a message returned uncharged.
    pub(crate) increments: Vec<i32>,
    /// The attempts each row had when the lost claim read it.
    pub(crate) read: Vec<i32>,
}

/// The statements of a late settlement, all in one transaction on the relay's second
/// connection (see [`ClaimBackend::late_settlement`]). Each is one statement.
pub(crate) trait LateSettlement {
    /// The backend's own error, mapped by the backend when the transaction ends.
    type Error;

    /// Takes (deletes) claim `claim_id`'s journal row, returning its message ids; `None`
    /// when it is gone (settled after all, or charged by a recovery).
    fn take_journal(&mut self, claim_id: i32) -> Result<Option<Vec<i64>>, Self::Error>;

    /// With per-key ordering: which of `ids` belong to keys no running claim holds.
    fn free_of(&mut self, ids: &[i64]) -> Result<HashSet<i64>, Self::Error>;

    /// Removes (or, in keep mode, marks sent) the rows of `ids` still pending; their ids.
    fn mark_sent(&mut self, ids: &[i64]) -> Result<Vec<i64>, Self::Error>;

    /// Deletes every charge of the messages `ids`.
    fn forget_charges(&mut self, ids: &[i64]) -> Result<(), Self::Error>;

    /// Records failures (and deletes the charges they count): each row's id and whether it
    /// is now dead.
    fn record_failed(&mut self, failed: &LateFailed<'_>) -> Result<Vec<(i64, bool)>, Self::Error>;

    /// Charges the messages `ids` for the lost claim `claim_id`.
    fn charge(&mut self, ids: &[i64], claim_id: i32) -> Result<(), Self::Error>;
}

/// A storage backend's relay-wide primitives: opening workers' connections, and what runs on
/// the relay's second connection (the claim journal, recoveries, rows set aside, late
/// settlements). Each is one short transaction of its own.
pub(crate) trait ClaimBackend: Send + Sync + 'static {
    /// A worker's connection.
    type Conn: ClaimConnection;
    /// The backend's own error, inside a late settlement.
    type NativeError;
    /// The statements of a late settlement on the second connection.
    type Late<'a>: LateSettlement<Error = Self::NativeError>
    where
        Self: 'a;

    /// Opens a worker's connection with its claims prepared for `spec`.
    fn connect(&self, spec: &ClaimSpec) -> Result<Self::Conn, Error>;

    /// Checks, on a new session's first connection, that the table is one a relay of this
    /// configuration can claim from (its kind, its ordering mode); returns its identity.
    fn check(&self, conn: &mut Self::Conn, ordered: bool) -> Result<Arc<str>, Error>;

    /// True for an error of a claim refused by the table's row check (keep mode updates the
    /// rows it claims, and rows from before the check break it).
    fn breaks_row_check(&self, error: &Error) -> bool;

    /// Records claim `claim_id` of `ids` in the journal (one round trip). False when the
    /// claim's transaction has already ended: nothing was recorded.
    fn journal_record(&self, claim_id: i32, ids: &[i64]) -> Result<bool, Error>;

    /// Deletes claim `claim_id`'s journal row: the claim is given back before any Sender saw
    /// it, and must not be charged.
    fn journal_forget(&self, claim_id: i32) -> Result<(), Error>;

    /// Turns the journal rows of ended claims into charges, posting `marker` (an
    /// announcement to the other relays) first, and clearing the charges of messages that no
    /// longer wait when `cleanup`.
    fn recover(&self, marker: Option<i32>, cleanup: bool) -> Result<Recovered, Error>;

    /// Sets the undecodable message `id` aside as dead with `reason`; the rows it changed
    /// (0: another relay did it first).
    fn set_aside(&self, id: i64, reason: &str) -> Result<u64, Error>;

    /// Sets aside every pending row that breaks the table's row check; their ids.
    fn set_aside_unchecked(&self) -> Result<Vec<i64>, Error>;

    /// Runs `f`'s statements in one transaction on the second connection (`context` names
    /// it in errors), committed when `f` succeeds.
    fn late_settlement<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut Self::Late<'_>) -> Result<R, Self::NativeError>,
    ) -> Result<R, Error>;

    /// A worker was found stuck in a call that never returned: the second connection may be
    /// on the same frozen path, and must not be used again without a bounded check.
    fn reset_shared(&self);

    /// Cross-process wake-ups, a capability a backend may lack (PostgreSQL has them:
    /// `LISTEN`): the loop a thread of the relay runs, sending on `wake` whenever another
    /// process signals committed messages, reporting its errors to `errors`, until its stop
    /// channel disconnects. `None` without: the relay then polls, which is its correctness
    /// path anyway (a wake-up only shortens an idle worker's sleep).
    fn wake_ups(&self, wake: ChannelSender<()>, errors: ErrorHandler) -> Option<WakeUps> {
        let _ = (wake, errors);
        None
    }
}

/// A wake-up loop (see [`ClaimBackend::wake_ups`]): given the relay's stop channel and the
/// sender whose drop tells the relay's handle that the thread ended, the body of the thread.
pub(crate) type WakeUps =
    Box<dyn FnOnce(Receiver<()>, ChannelSender<()>) -> Box<dyn FnOnce() + Send> + Send>;

/// A worker's connection: the claim transaction's primitives. Errors come back mapped, with
/// what was being done; after one the protocol calls [`rollback`](Self::rollback).
pub(crate) trait ClaimConnection: Send {
    /// Opens claim transaction `claim_id` (its bounds, isolation, and the mark that tells
    /// others it runs).
    fn begin(&mut self, claim_id: i32) -> Result<(), Error>;

    /// Runs the claim in the open transaction; the rows, in claim order.
    fn claim(&mut self, take: Take, outbox: &Arc<str>) -> Result<Vec<ClaimedRow>, Error>;

    /// Puts a settlement's failed messages back, inside the claim transaction: one statement
    /// whatever their number.
    fn return_failed(&mut self, returned: &[Returned]) -> Result<(), Error>;

    /// Commits the claim transaction: deleting journal row `journaled` and the consumed
    /// `charged` first, and opening claim transaction `next` in the same round trip.
    fn commit(
        &mut self,
        journaled: Option<i32>,
        charged: &[(i64, Vec<i32>)],
        next: Option<i32>,
    ) -> Result<(), Error>;

    /// Commits a claim transaction that took nothing.
    fn end_empty(&mut self) -> Result<(), Error>;

    /// Ends the transaction, if `in_transaction`, without changes. False when the connection
    /// cannot be used any more (closed, or the rollback failed).
    fn rollback(&mut self, in_transaction: bool) -> bool;

    /// True when the connection is closed.
    fn is_closed(&self) -> bool;
}

/// The relay's view of a backend: the backend, the claim transaction's time bound, and
/// what the relay's sessions share.
pub(crate) struct ProtocolRelay<B: ClaimBackend> {
    pub(crate) backend: Arc<B>,
    pub(crate) send_timeout: Duration,
    pub(crate) batch_size: usize,
    /// Bound on a batch's bytes, `None` for none (see `OutboxBuilder::max_batch_bytes`).
    pub(crate) max_bytes: Option<u64>,
    pub(crate) max_retries: u32,
    /// Per-key ordering: the ordered claim.
    pub(crate) ordered: bool,
    /// When claims are journaled (see `store::vigil`).
    pub(crate) vigil: Arc<Vigil>,
    /// The furthest position any of this relay's sessions claimed up to while draining, for
    /// all of them to resume after (unordered only; see [`ProtocolSession::shared_mark`]).
    pub(crate) drain_mark: Arc<Mutex<Mark>>,
}

impl<B: ClaimBackend> ProtocolRelay<B> {
    pub(crate) fn new(backend: B, config: &crate::config::Config) -> ProtocolRelay<B> {
        ProtocolRelay {
            backend: Arc::new(backend),
            send_timeout: config.send_timeout,
            batch_size: config.batch_size,
            max_bytes: (config.max_batch_bytes != usize::MAX)
                .then(|| u64::try_from(config.max_batch_bytes).unwrap_or(u64::MAX)),
            max_retries: config.max_retries,
            ordered: config.ordered,
            vigil: Arc::new(Vigil::new()),
            drain_mark: Arc::default(),
        }
    }
}

impl<B: ClaimBackend> RelayStore for ProtocolRelay<B> {
    type Session = ProtocolSession<B>;

    fn sender_overran(&self) {
        // Once per overrun, not at every look of the watchdog: an announcement is a row.
        if self.vigil.vigilant() {
            self.vigil.alert("a Sender ran past its claim's deadline");
        } else {
            self.vigil
                .alert_all("a Sender ran past its claim's deadline");
        }
    }

    fn suspect_connections(&self) {
        self.backend.reset_shared();
        self.vigil
            .alert_all("a relay worker was stuck in a database call and replaced");
    }

    fn open_session(&self) -> Result<ProtocolSession<B>, Error> {
        let mut session = ProtocolSession {
            backend: self.backend.clone(),
            vigil: self.vigil.clone(),
            shared_mark: (!self.ordered).then(|| self.drain_mark.clone()),
            first_claims: vigil::FIRST_CLAIMS_JOURNALED,
            journaled: false,
            spec: ClaimSpec {
                limit: self.batch_size,
                max_bytes: self.max_bytes,
                ordered: self.ordered,
                send_timeout: self.send_timeout,
            },
            max_retries: self.max_retries,
            conn: None,
            open: false,
            begun: false,
            mark: None,
            last_head_claim: Instant::now(),
            claim_id: 0,
            claim_ids: RandomState::new(),
            claims: 0,
            charged: Vec::new(),
            suspects: VecDeque::new(),
            dead_in_claim: Vec::new(),
            last_recovery: None,
            last_cleanup: Instant::now(),
            partial: false,
            claim_started: Instant::now(),
            outbox_id: Arc::from(""),
        };
        let conn = session.connect()?;
        session.outbox_id = self.backend.check(conn, self.ordered)?;
        // A relay restarted after a crash charges its own abandoned claim before it claims.
        session.recover();
        Ok(session)
    }
}

/// One relay worker's session: its connection, and the protocol's state between claims.
pub(crate) struct ProtocolSession<B: ClaimBackend> {
    backend: Arc<B>,
    /// The table's identity, given to every claimed message (see `Message::dedup_key`).
    outbox_id: Arc<str>,
    /// When claims are journaled (see `store::vigil`).
    vigil: Arc<Vigil>,
    /// The relay's furthest drain position, shared by its sessions (unordered only): with
    /// several workers, each resuming after its own position stepped over the rows the
    /// others held at every claim (`FOR UPDATE SKIP LOCKED` still visits them); resuming
    /// after the furthest one does not. Rows left behind it (a claim given back) are taken
    /// by the next claim from the head, at least once a second, as for one session.
    shared_mark: Option<Arc<Mutex<Mark>>>,
    /// Claims this session still journals whatever the vigilance: its first ones.
    first_claims: u32,
    /// The last claim handed to a Sender was recorded in the journal (until it is settled
    /// or given back; a rollback leaves it, for the late settlement).
    journaled: bool,
    /// What the connection's claims are prepared for.
    spec: ClaimSpec,
    max_retries: u32,
    conn: Option<B::Conn>,
    /// A claim transaction is open on `conn`.
    open: bool,
    /// A transaction was begun ahead, with the previous COMMIT, for the next claim.
    begun: bool,
    /// Position (available_at, id) of the last row of the last full batch: where the next
    /// claim resumes while a backlog drains.
    mark: Mark,
    last_head_claim: Instant,
    /// The id of the open (or begun) claim transaction: the key of its running mark and of
    /// its journal row. Random, so claims of every relay and session differ.
    claim_id: i32,
    claim_ids: RandomState,
    claims: u64,
    /// The open claim's messages that had charges, with the claims charged, which its
    /// settlement consumes (exactly those: charges recorded since are left for the next).
    charged: Vec<(i64, Vec<i32>)>,
    /// Messages found with charges in a batch of several, to claim alone next.
    suspects: VecDeque<i64>,
    /// Messages of the open claim set aside for their abandoned claims, not handed to the
    /// Sender: settled with the batch.
    dead_in_claim: Vec<Returned>,
    last_recovery: Option<Instant>,
    last_cleanup: Instant,
    /// The last claim handed fewer messages than the batch size to the Sender (but some).
    partial: bool,
    /// When the open claim's statement was sent: the server's idle timer of the claim
    /// transaction starts after this, so the claim is held at least until this plus the
    /// send timeout, whatever the network's latency.
    claim_started: Instant,
}

/// A claimed row, decoded, with the number of its claims that were abandoned.
struct Row {
    message: Message,
    abandoned: u32,
    /// The abandoned claims it is charged for (their ids in the charges table).
    charges: Vec<i32>,
}

impl<B: ClaimBackend> ProtocolSession<B> {
    fn connect(&mut self) -> Result<&mut B::Conn, Error> {
        if self.conn.is_none() {
            self.conn = Some(self.backend.connect(&self.spec)?);
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }

    /// Turns a failure inside the claim transaction into an error, leaving the session
    /// either clean (transaction rolled back) or without a connection.
    fn fail(&mut self, e: Error) -> Error {
        self.rollback();
        self.mark = None;
        e
    }

    /// Ends the open (or begun) transaction without changes; drops a connection on which
    /// that fails.
    fn rollback(&mut self) {
        let in_transaction = self.open || self.begun;
        if let Some(conn) = self.conn.as_mut() {
            if !conn.rollback(in_transaction) {
                self.conn = None;
            }
        }
        self.open = false;
        self.begun = false;
        self.dead_in_claim.clear();
    }

    /// Turns abandoned claims into charges: at most once a second per session while a
    /// backlog drains (full batches), and before every claim that follows a partial batch
    /// (where a round trip costs nothing that matters, and a message being retried often is
    /// a suspect). Clears charges of messages that no longer wait, once a minute.
    fn recover(&mut self) {
        if !self.partial
            && self
                .last_recovery
                .is_some_and(|t| t.elapsed() < RECOVER_EVERY)
        {
            return;
        }
        self.last_recovery = Some(Instant::now());
        let cleanup = self.last_cleanup.elapsed() >= CHARGES_CLEANUP_EVERY;
        if cleanup {
            self.last_cleanup = Instant::now();
        }
        fault_point!(crate::fault::RECOVERY);
        // This relay's start, or an abnormal end it saw, announced to the others.
        self.claims = self.claims.wrapping_add(1);
        let marker = self
            .vigil
            .marker_to_post(self.claim_ids.hash_one((self.claims, "marker")));
        match self.backend.recover(marker, cleanup) {
            Ok(Recovered { charged, markers }) => {
                if charged > 0 {
                    log::warn!(
                        "troutbox relay: charged {charged} message(s) for claims that ended without a settlement (a relay killed, a lost connection, or a send timeout)"
                    );
                    self.vigil
                        .alert_all("claims ended without a settlement were charged");
                }
                if self.vigil.others_announced(&markers) {
                    self.vigil
                        .alert("another relay on this table started or saw a claim end abnormally");
                }
            }
            Err(e) => {
                if marker.is_some() {
                    self.vigil.post_failed();
                }
                log::warn!("troutbox relay: {e}");
            }
        }
    }

    /// A new claim id. Random, positive and never 0 (0 means no claim recorded).
    fn next_claim_id(&mut self) -> i32 {
        self.claims = self.claims.wrapping_add(1);
        self.claim_id = ((self.claim_ids.hash_one(self.claims) >> 33) as i32) | 1;
        self.claim_id
    }

    /// Runs one claim in a new (or begun) claim transaction, leaving it open.
    fn claim_rows(&mut self, one: bool) -> Result<Vec<ClaimedRow>, Error> {
        fault_point!(crate::fault::CLAIM_BEGIN, return);
        let begun = std::mem::take(&mut self.begun);
        let begin = (!begun).then(|| self.next_claim_id());
        self.connect()?;
        // Open from the moment the transaction is begun: if a statement after it fails,
        // the transaction is aborted and must be rolled back, not left on the connection.
        self.open = true;
        let conn = self.conn.as_mut().expect("connected above");
        if let Some(claim_id) = begin {
            if let Err(e) = conn.begin(claim_id) {
                return Err(self.fail(e));
            }
        }
        if let Some(e) = crate::fault::injected(crate::fault::CLAIM_STATEMENT) {
            self.rollback();
            return Err(e);
        }
        self.claim_started = Instant::now();
        let rows = if one {
            let id = *self.suspects.front().expect("a suspect to claim");
            self.take(Take::One(id))
        } else {
            let shared = self
                .shared_mark
                .as_ref()
                .and_then(|m| *m.lock().unwrap_or_else(|p| p.into_inner()));
            let mark = self
                .mark
                .take()
                .max(shared)
                .filter(|_| self.last_head_claim.elapsed() < HEAD_CLAIM_EVERY);
            let mut rows = match mark {
                Some(at) => self.take(Take::After(at)),
                None => Ok(Vec::new()),
            };
            // Nothing past the position (or no position): claim from the head.
            if matches!(&rows, Ok(r) if r.is_empty()) {
                self.last_head_claim = Instant::now();
                rows = self.take(Take::Head);
            }
            rows
        };
        rows.map_err(|e| self.fail(e))
    }

    fn take(&mut self, take: Take) -> Result<Vec<ClaimedRow>, Error> {
        let conn = self.conn.as_mut().expect("connected by claim_rows");
        conn.claim(take, &self.outbox_id)
    }

    /// Moves the relay's shared drain position forward to `mark`, or resets it (`None`).
    fn share_mark(&self, mark: Mark) {
        if let Some(shared) = &self.shared_mark {
            let mut position = shared.lock().unwrap_or_else(|p| p.into_inner());
            *position = mark.and((*position).max(mark));
        }
    }

    /// Ends an open claim transaction that took nothing (no WAL flush: nothing was written).
    fn end_empty(&mut self) -> Result<(), Error> {
        let conn = self.conn.as_mut().expect("a claim is open");
        if let Err(e) = conn.end_empty() {
            return Err(self.fail(e));
        }
        self.open = false;
        Ok(())
    }

    /// Sets undecodable rows aside as dead, after the claim that found them was rolled back.
    fn set_aside(&self, bad: Vec<(i64, Undecodable)>, claimed: &mut Claimed) {
        for (id, why) in bad {
            fault_point!(crate::fault::SET_ASIDE);
            let reason = storable_text(&why.to_string());
            match self.backend.set_aside(id, &reason) {
                // 0: another relay set it aside first, and reports it.
                Ok(0) => {}
                Ok(n) => {
                    claimed.report.dead += n;
                    claimed.reports.push(Error::SetAside { id, reason });
                }
                Err(e) => claimed.reports.push(e),
            }
        }
    }

    /// Sets aside every pending row that breaks the table's row check (rows from before
    /// the check existed), after a keep-mode claim, which updates the rows it takes, failed
    /// on one.
    fn set_aside_unchecked(&self, claimed: &mut Claimed) -> Result<(), Error> {
        for id in self.backend.set_aside_unchecked()? {
            claimed.report.dead += 1;
            claimed.reports.push(Error::SetAside {
                id,
                reason: "row breaks the table's CHECK (a non-finite created_at or a NULL header): set aside".into(),
            });
        }
        Ok(())
    }

    /// Commits the open claim with `settlement` (messages set aside dead at the claim).
    fn settle_in_claim(&mut self, settlement: Settlement) -> Result<SettleReport, Error> {
        match self.settle(settlement) {
            (report, None) => Ok(report),
            (_, Some(e)) => Err(e),
        }
    }

    /// Records the claim's messages in the journal before the Sender sees them (when
    /// `journal`, see `store::vigil`), and proves the claim still held: true when it is,
    /// false when the claim was given back (an expired claim, reported in `claimed`).
    fn record_claim(
        &mut self,
        ids: &[i64],
        claimed: &mut Claimed,
        journal: bool,
    ) -> Result<bool, Error> {
        let recorded = match crate::fault::injected(crate::fault::JOURNAL_RECORD) {
            Some(e) => Err(e),
            None if journal => self.backend.journal_record(self.claim_id, ids),
            // Not journaled: held if within its deadline (below).
            None => Ok(true),
        };
        // Set even when recording failed: the INSERT may have committed with its answer
        // lost, and a give-back must then delete the row (a batch no Sender saw is never
        // charged).
        self.journaled = journal;
        if journal && recorded.is_ok() {
            self.first_claims = self.first_claims.saturating_sub(1);
        }
        let why = match recorded {
            Err(e) => {
                // The INSERT may have committed with its answer lost: forget it, so that a
                // batch no Sender saw is not charged.
                self.give_back();
                return Err(e);
            }
            // The server ended the claim (send timeout, terminated session): the rows may
            // be claimed by another relay already.
            Ok(false) => {
                self.rollback();
                "the server had already ended its transaction"
            }
            Ok(true) => {
                if Instant::now() < super::send_deadline(self.claim_started, self.spec.send_timeout)
                {
                    return Ok(true);
                }
                self.give_back();
                "the steps before its Sender took more than half the send timeout"
            }
        };
        self.vigil.alert_all("a claim expired before its Sender");
        claimed.reports.push(Error::ClaimExpired {
            messages: ids.len(),
            waited: self.claim_started.elapsed(),
            send_timeout: self.spec.send_timeout,
            why,
        });
        Ok(false)
    }

    /// Gives the open claim back untouched and uncharged: its journal row first, while the
    /// claim still holds its lock (no recovery can charge it meanwhile), then the rollback.
    /// If the journal row cannot be deleted, the claim counts as an attempt after all.
    fn give_back(&mut self) {
        if !self.open {
            return;
        }
        if std::mem::take(&mut self.journaled) {
            if let Err(e) = self.backend.journal_forget(self.claim_id) {
                log::warn!("troutbox relay: {e}; the batch given back counts as an attempt");
            }
        }
        self.rollback();
    }

    /// The messages of a batch to claim alone, in id order: those with charges (claims
    /// abandoned). With per-key ordering only a key's head can be claimed alone, so only
    /// the charged messages that are the first of their key in the batch (a head: a run
    /// starts at its head) are suspects. A charged follower rides with its batch (its
    /// charges count as attempts all the same) until it is a head itself: were it a
    /// suspect, it could never be claimed alone while its head waits out a backoff, and
    /// the batch would be given back at every claim, stalling every key in it.
    fn suspects_of(&self, rows: &[Row]) -> Vec<i64> {
        if rows.iter().all(|r| r.abandoned == 0) {
            return Vec::new(); // the usual case: no claim was abandoned
        }
        let ordered = self.spec.ordered;
        let mut first_of_key: HashMap<&str, i64> = HashMap::new();
        if ordered {
            for r in rows {
                let id = first_of_key
                    .entry(r.message.key.as_str())
                    .or_insert(r.message.id);
                *id = (*id).min(r.message.id);
            }
        }
        let mut suspects: Vec<i64> = rows
            .iter()
            .filter(|r| r.abandoned > 0)
            .filter(|r| !ordered || first_of_key.get(r.message.key.as_str()) == Some(&r.message.id))
            .map(|r| r.message.id)
            .collect();
        suspects.sort_unstable();
        suspects
    }

    /// Why a message with `abandoned` unsettled claims is dead.
    fn abandoned_reason(&self, abandoned: u32) -> String {
        format!(
            "claim abandoned {abandoned} time(s): the relay never settled it (process killed or \
             aborted, connection lost, or send timeout of {:?} exceeded)",
            self.spec.send_timeout
        )
    }

    /// Applies a settlement whose claim transaction was lost, on the second connection, if
    /// the claim's journal row is still there, to the messages no other relay holds now; the
    /// others are charged for the lost claim. Returns what was committed and the number of
    /// messages whose outcome could not be recorded.
    fn settle_late(
        &self,
        settlement: &Settlement,
        charged: &[(i64, Vec<i32>)],
    ) -> Result<(SettleReport, usize), Error> {
        let claim_id = self.claim_id;
        let ordered = self.spec.ordered;
        let all_sent = &settlement.sent;
        let r = &settlement.returned;
        let all_failed: Vec<i64> = r.iter().map(|x| x.message.id).collect();
        let mut failed = LateFailed {
            ids: Vec::new(),
            delays: r.iter().map(|x| millis(x.delay)).collect(),
            errors: r.iter().map(|x| x.error.as_str()).collect(),
            max_retries: attempts_i32(self.max_retries),
            // The attempt each failure counts: 1, or 0 for a message returned uncharged (one
            // set aside for its abandoned claims counts 1, so that it is dead here too).
            increments: r
                .iter()
                .map(|x| i32::from(x.dead || x.attempts > x.message.attempts))
                .collect(),
            // The attempts each row had when the lost claim read it: the message's, less the
            // charges the claim added to them.
            read: r
                .iter()
                .map(|x| {
                    let charges = charged
                        .iter()
                        .find(|(id, _)| *id == x.message.id)
                        .map_or(0, |(_, c)| c.len());
                    let charges = u32::try_from(charges).unwrap_or(u32::MAX);
                    attempts_i32(x.message.attempts.saturating_sub(charges))
                })
                .collect(),
        };
        let claimed = all_sent.len() + all_failed.len();
        fault_point!(crate::fault::LATE_SETTLE, return);
        let context = "recording a batch outcome after its transaction was lost";
        self.backend.late_settlement(context, |tx| {
            let Some(ours) = tx.take_journal(claim_id)? else {
                // Settled after all (the COMMIT went through, its answer was lost), or
                // charged by a recovery meanwhile: either way nothing is to be applied.
                return Ok((SettleReport::default(), claimed));
            };
            // With per-key ordering, only the messages of keys no other claim holds.
            let free = if ordered {
                let ids: Vec<i64> = all_sent.iter().chain(&all_failed).copied().collect();
                Some(tx.free_of(&ids)?)
            } else {
                None
            };
            let is_free = |id: &i64| free.as_ref().is_none_or(|f| f.contains(id));
            let sent: Vec<i64> = all_sent.iter().copied().filter(is_free).collect();
            // The failed ones stay aligned with their delays, errors and increments: a
            // message of a held key is given no id, which matches no row.
            failed.ids = all_failed
                .iter()
                .map(|id| is_free(id).then_some(*id))
                .collect();
            let mut report = SettleReport::default();
            let mut done: Vec<i64> = Vec::new();
            if !sent.is_empty() {
                for id in tx.mark_sent(&sent)? {
                    done.push(id);
                    report.sent += 1;
                }
                if !done.is_empty() {
                    tx.forget_charges(&done)?;
                }
            }
            if failed.ids.iter().any(Option::is_some) {
                // Deletes the charges it counts itself.
                for (id, dead) in tx.record_failed(&failed)? {
                    done.push(id);
                    if dead {
                        report.dead += 1;
                    } else {
                        report.retried += 1;
                    }
                }
            }
            fault_point!(crate::fault::LATE_SETTLE_MID);
            let held: Vec<i64> = ours.into_iter().filter(|id| !done.contains(id)).collect();
            if !held.is_empty() {
                tx.charge(&held, claim_id)?;
            }
            Ok((report, held.len()))
        })
    }

    /// Splits claimed rows into the decoded ones and the ids of those that cannot be decoded.
    fn decode(rows: Vec<ClaimedRow>) -> (Vec<Row>, Vec<(i64, Undecodable)>) {
        let mut good = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        for row in rows {
            match row.decoded {
                Ok((message, charges)) => good.push(Row {
                    message,
                    abandoned: u32::try_from(charges.len()).unwrap_or(u32::MAX),
                    charges,
                }),
                Err(why) => {
                    if let Some(id) = row.id {
                        bad.push((id, why));
                    }
                }
            }
        }
        (good, bad)
    }

    /// The claim transaction is gone (`error` says how, when the settlement found out):
    /// record what can still be recorded, and say what could not.
    fn settle_lost(
        &mut self,
        settlement: Settlement,
        error: Option<Error>,
    ) -> (SettleReport, Option<Error>) {
        let charged = std::mem::take(&mut self.charged);
        self.vigil
            .alert_all("a claim's transaction was lost before its settlement");
        if !std::mem::take(&mut self.journaled) {
            // Nothing recorded it: nothing can tell whether its outcome may still be
            // applied (it may have committed, or be claimed again already). It goes back
            // as it was.
            if let Some(e) = &error {
                log::warn!("batch transaction lost: {e}");
            }
            let messages = settlement.sent.len() + settlement.returned.len();
            return (
                SettleReport::default(),
                Some(Error::OutcomeLost { messages }),
            );
        }
        match self.settle_late(&settlement, &charged) {
            Ok((report, 0)) => {
                if let Some(e) = &error {
                    log::warn!(
                        "batch transaction lost ({e}); its outcome was recorded afterwards on another connection"
                    );
                }
                (report, error)
            }
            Ok((report, dropped)) => {
                if let Some(e) = &error {
                    log::warn!("batch transaction lost: {e}");
                }
                (
                    report,
                    Some(Error::OutcomeNotRecorded { messages: dropped }),
                )
            }
            Err(late) => {
                log::warn!(
                    "batch transaction lost and its outcome could not be recorded ({late}); its messages will be delivered again, and the lost claim counts as an attempt"
                );
                (SettleReport::default(), Some(error.unwrap_or(late)))
            }
        }
    }
}

/// An attempt count as the table stores it.
pub(crate) fn attempts_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A delay as the table's statements take it: whole milliseconds.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<B: ClaimBackend> RelaySession for ProtocolSession<B> {
    fn claim(&mut self, limit: usize) -> Result<Claimed, Error> {
        debug_assert!(!self.open, "claim while a claim is open");
        if limit != self.spec.limit {
            // Prepared for another batch size: prepare again (not on the relay's path).
            self.spec.limit = limit;
            self.rollback();
            self.conn = None;
        }
        self.recover();
        let mut claimed = Claimed::default();
        let mut checked = false;
        // Each round either hands messages to the Sender or settles something for good (a
        // message set aside, a suspect taken by another relay): bounded by the suspects.
        for _ in 0..limit.saturating_mul(2).saturating_add(8) {
            let one = !self.suspects.is_empty();
            let rows = match self.claim_rows(one) {
                Ok(rows) => rows,
                Err(e) if self.backend.breaks_row_check(&e) && !checked => {
                    // Keep mode's claim met a row from before the row check existed.
                    checked = true;
                    self.set_aside_unchecked(&mut claimed)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if one {
                self.suspects.pop_front();
            }
            if rows.is_empty() {
                self.partial = false;
                self.end_empty()?;
                if one {
                    continue; // another relay holds it, or settled it
                }
                self.share_mark(None);
                return Ok(claimed);
            }
            let full = rows.len() >= limit;
            if !full && !one {
                // The backlog is drained (or this batch was cut to its bytes): every session
                // claims from the head again.
                self.share_mark(None);
            }
            // Where the next claim resumes while batches come back full (a backlog drains).
            let position = rows.iter().filter_map(|r| r.position).max();
            let (rows_ok, bad) = Self::decode(rows);
            if !bad.is_empty() {
                // Give the batch back untouched, then set the bad rows aside on their own.
                self.rollback();
                self.set_aside(bad, &mut claimed);
                continue;
            }
            let suspects = if !one && rows_ok.len() > 1 {
                self.suspects_of(&rows_ok)
            } else {
                Vec::new()
            };
            if !suspects.is_empty() {
                // Messages whose earlier claims were abandoned: one of them may be what
                // crashes or hangs the relay. Give the batch back and claim them one by one,
                // so that only the culprit is charged for what it does.
                self.rollback();
                self.suspects.extend(suspects);
                continue;
            }
            self.charged = rows_ok
                .iter()
                .filter(|r| r.abandoned > 0)
                .map(|r| (r.message.id, r.charges.clone()))
                .collect();
            if !self.charged.is_empty() {
                self.vigil
                    .alert("a claimed message was charged for an abandoned claim");
            }
            let mut messages = Vec::with_capacity(rows_ok.len());
            let mut dead = Vec::new();
            for Row {
                mut message,
                abandoned,
                ..
            } in rows_ok
            {
                message.attempts = message.attempts.saturating_add(abandoned);
                if abandoned > 0 && message.attempts > self.max_retries {
                    dead.push(Returned {
                        attempts: message.attempts,
                        delay: Duration::ZERO,
                        dead: true,
                        error: self.abandoned_reason(abandoned),
                        message,
                    });
                } else {
                    messages.push(message);
                }
            }
            if !dead.is_empty() {
                let errors: Vec<Error> = dead
                    .iter()
                    .map(|r| Error::SetAside {
                        id: r.message.id,
                        reason: r.error.clone(),
                    })
                    .collect();
                claimed.reports.extend(errors);
                if messages.is_empty() {
                    // A message claimed alone: set it aside in this very claim.
                    let settlement = Settlement {
                        sent: Vec::new(),
                        returned: dead,
                    };
                    claimed.report += self.settle_in_claim(settlement)?;
                    continue;
                }
                // A charged follower riding with its batch (per-key ordering, see
                // `suspects_of`): set aside by the batch's own settlement, while the others
                // go to the Sender (it is dead, so what follows it in its key may go too).
                self.dead_in_claim = dead;
            }
            // Resume after this batch only while batches come back full (a backlog drains);
            // otherwise the next claim starts from the head again.
            if full && !one {
                self.mark = position;
                self.share_mark(self.mark);
            }
            self.partial = messages.len() < limit;
            let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
            // Nothing was sent if this fails or the claim expired: the batch goes back
            // untouched and uncharged.
            let journal = self.first_claims > 0 || self.vigil.vigilant();
            if self.record_claim(&ids, &mut claimed, journal)? {
                claimed.messages = messages;
                claimed.claimed_at = Some(self.claim_started);
            } else {
                self.mark = None;
            }
            return Ok(claimed);
        }
        Ok(claimed)
    }

    fn settle(&mut self, mut settlement: Settlement) -> (SettleReport, Option<Error>) {
        settlement
            .returned
            .extend(std::mem::take(&mut self.dead_in_claim));
        if !self.open || self.conn.is_none() {
            return self.settle_lost(settlement, None);
        }
        // After a full batch that was all sent the worker claims again at once: begin its
        // transaction in the same round trip as this COMMIT. Not after a failure: a batch that
        // failed whole is followed by a pause, and a partly failed one by the report of the
        // Sender's error, and neither must hold a transaction open.
        let claims_next = settlement.sent.len() >= self.spec.limit;
        let settling = self.claim_id;
        let journaled = self.journaled.then_some(settling);
        let next = claims_next.then(|| self.next_claim_id());
        if let Some(e) = crate::fault::injected(crate::fault::SETTLE) {
            // As if the statement had failed: the claim transaction is gone.
            self.rollback();
            self.claim_id = settling;
            return self.settle_lost(settlement, Some(e));
        }
        let conn = self.conn.as_mut().expect("checked above");
        let mut result = Ok(());
        if !settlement.returned.is_empty() {
            result = conn.return_failed(&settlement.returned);
        }
        fault_point!(crate::fault::COMMIT);
        let result = result.and_then(|()| conn.commit(journaled, &self.charged, next));
        match result {
            Ok(()) => {
                self.open = false;
                self.begun = claims_next;
                self.journaled = false;
                self.charged.clear();
                (SettleReport::of(&settlement), None)
            }
            Err(error) => {
                let error = self.fail(error);
                self.claim_id = settling;
                self.settle_lost(settlement, Some(error))
            }
        }
    }

    fn release(&mut self) {
        // Only ever for a claim that went wrong: given back after its worker was replaced,
        // expired before its Sender, or its worker panicked before the Sender.
        self.vigil
            .alert_all("a claim was given back before its Sender");
        self.give_back();
    }

    fn is_broken(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.is_closed())
    }
}

impl<B: ClaimBackend> Drop for ProtocolSession<B> {
    fn drop(&mut self) {
        // Never hand a connection with an open transaction back to the pool. A claim given
        // back this way keeps its journal rows: it counts as an attempt.
        if self.open || self.begun {
            if let Some(conn) = self.conn.as_mut() {
                conn.rollback(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::memory::MemoryStore;

    /// The policy alone, on the in-memory primitives (tests/claims.rs has the same against
    /// PostgreSQL, with processes killed): a message that crashes the relay at every claim is
    /// isolated from its batch, charged once per crash, and set aside dead in its claim after
    /// `max_retries + 1` attempts, without reaching the Sender again; the others go through.
    #[test]
    fn a_crash_looping_message_is_isolated_charged_and_set_aside_without_its_batch() {
        let store = MemoryStore::new();
        let (a, poison, c) = (store.add("a"), store.add("poison"), store.add("c"));
        let config = Config {
            max_retries: 2,
            batch_size: 10,
            ..Config::default()
        };
        let relay = ProtocolRelay::new(store.clone(), &config);
        let mut poison_seen = 0;
        let mut delivered = Vec::new();
        for _ in 0..20 {
            let mut session = relay.open_session().expect("a session");
            let claimed = session.claim(config.batch_size).expect("a claim");
            if claimed.messages.is_empty() {
                break;
            }
            let ids: Vec<i64> = claimed.messages.iter().map(|m| m.id).collect();
            if ids.contains(&poison) {
                poison_seen += 1;
                if poison_seen > 1 {
                    assert_eq!(ids, [poison], "after its first crash it is claimed alone");
                }
                drop(session); // the Sender crashed the process: no settlement
                continue;
            }
            delivered.extend(&ids);
            let (report, error) = session.settle(Settlement {
                sent: ids,
                returned: Vec::new(),
            });
            assert!(error.is_none());
            assert_eq!(report.sent as usize, claimed.messages.len());
        }
        let state = store.state();
        assert!(
            delivered.contains(&a) && delivered.contains(&c),
            "{delivered:?}"
        );
        assert!(!delivered.contains(&poison));
        let row = &state.rows[&poison];
        assert!(row.dead, "the poison is set aside");
        assert_eq!(row.message.attempts, config.max_retries + 1);
        assert_eq!(
            poison_seen, 3,
            "the first crash (whole batch) and two alone"
        );
        assert!(
            state.charges.is_empty(),
            "every charge consumed: {:?}",
            state.charges
        );
        assert!(state.journal.is_empty(), "no claim left unaccounted for");
    }
}
