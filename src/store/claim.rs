//! The claim strategies: how a relay takes a batch, holds it while the Sender runs, and settles
//! it, so that every claim is accounted for.
//!
//! # The protocol (unordered strategy)
//!
//! 1. **Claim.** In a transaction on the worker's connection, which first takes an advisory
//!    lock on a random claim id, one statement deletes (or, in keep mode, marks sent) up to
//!    `batch_size` due rows, `FOR UPDATE SKIP LOCKED`, and returns them with their charges
//!    (see 4). The transaction stays open while the Sender runs, bounded by
//!    `idle_in_transaction_session_timeout`: if it rolls back, the rows are back exactly as
//!    they were.
//! 2. **Journal.** Before the Sender runs, one row (claim id, message ids) is committed to
//!    the claim journal, an UNLOGGED table, on a second connection shared by the relay's
//!    workers: while the relay is vigilant only (see `vigil.rs`: the first claims of a
//!    session, and for a while after anything abnormal); in steady state, a claim is held
//!    by its deadline alone, and what it would have charged is left to the next end.
//! 3. **Settle.** One statement puts the failed messages back (re-inserted in delete mode,
//!    updated in keep mode), and the same round trip as the COMMIT deletes the claim's
//!    journal row. A settled claim leaves nothing behind.
//! 4. **Recover.** A journal row whose claim transaction has ended (its advisory lock is
//!    free) is a claim that ended without a settlement: the process was killed or aborted by
//!    its Sender, the connection was lost, the server ended the session at the send timeout.
//!    Every relay checks for such rows when it starts and about once a second, and turns
//!    each into one charge per message (another UNLOGGED table, empty in normal operation).
//!    A charge is an attempt: the next claim of the message adds its charges to its attempts
//!    and deletes them when it settles.
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
//! The same steps with a different claim statement (`Sql::claim_ordered`): only the head of
//! each key (its lowest pending id), when due and not held, with a run of its followers.
//! Everything else carries over, and is what keeps the order through failures:
//!
//! - A held head hides its key from every other relay (they see it pending and locked), so
//!   one key is in at most one claim at a time, whatever the number of relays.
//! - A lost claim (killed relay, timeout) leaves its rows pending, head included: the key
//!   waits for the head to be claimed again, never skips it. Its late outcome is applied
//!   only to rows nobody holds since, so it cannot settle a message another relay holds.
//! - A suspect (a message charged for an abandoned claim) is claimed alone only if it is
//!   the head of its key (`ClaimKind::One` tests it), so isolating a crashing message never
//!   sends a message ahead of its key. Suspects are tried in id order.
//! - A draining session resumes after its position in the pending index, as unordered; the
//!   keys that a window of non-heads would hide are found by walking the key index.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::types::{ToSql, Type};
use postgres::{Client, Statement};
use r2d2::PooledConnection;
use r2d2_postgres::PostgresConnectionManager;
use time::OffsetDateTime;

use super::decode::{self, Undecodable};
use super::pg::{MakeTls, PgStore};
use super::sql::{self, ClaimKind, Sql};
use super::vigil::{self, Vigil};
use super::{Claimed, RelaySession, RelayStore, Returned, SettleReport, Settlement};
use crate::message::Message;
use crate::store::storable_text;
use crate::Error;

/// How long a session may resume after its position before it claims from the head of the
/// index again, to pick up rows that committed behind it.
const HEAD_CLAIM_EVERY: Duration = Duration::from_secs(1);

/// How often a session looks for abandoned claims to charge (see `Sql::recover`).
const RECOVER_EVERY: Duration = Duration::from_secs(1);

/// How often a session clears charges of messages that no longer wait.
const CHARGES_CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// The relay's view of a [`PgStore`]: the store, the claim transaction's time bound, and
/// the second connection its workers share.
pub(crate) struct PgRelay<T: MakeTls> {
    pub(crate) store: PgStore<T>,
    pub(crate) sql: Arc<Sql>,
    pub(crate) send_timeout: Duration,
    pub(crate) batch_size: usize,
    /// Bound on a batch's bytes, `None` for none (see `OutboxBuilder::max_batch_bytes`).
    pub(crate) max_bytes: Option<u64>,
    pub(crate) max_retries: u32,
    /// Per-key ordering: the ordered claim (see `Sql::claim_ordered`).
    pub(crate) ordered: bool,
    pub(crate) side: Arc<SideConnection<T>>,
    /// When claims are journaled (see `store::vigil`).
    pub(crate) vigil: Arc<Vigil>,
    /// The furthest position any of this relay's sessions claimed up to while draining, for
    /// all of them to resume after (unordered only; see [`PgSession::shared_mark`]).
    pub(crate) drain_mark: Arc<Mutex<Mark>>,
}

/// A position in the pending index, `(available_at, id)`, where a draining claim resumes.
type Mark = Option<(OffsetDateTime, i64)>;

impl<T: MakeTls> PgRelay<T> {
    pub(crate) fn new(
        store: PgStore<T>,
        sql: Arc<Sql>,
        config: &crate::config::Config,
        stuck_after: Duration,
    ) -> PgRelay<T> {
        let side = Arc::new(SideConnection {
            store: store.clone(),
            sql: sql.clone(),
            state: Mutex::new(SideState {
                conn: None,
                busy: false,
                generation: 0,
            }),
            freed: Condvar::new(),
            // Half the workers' bound: a worker waiting here gives up on a stuck user of
            // the slot, and carries on, well before the watchdog would give up on it.
            stuck_after: stuck_after / 2,
        });
        PgRelay {
            store,
            sql,
            send_timeout: config.send_timeout,
            batch_size: config.batch_size,
            max_bytes: (config.max_batch_bytes != usize::MAX)
                .then(|| u64::try_from(config.max_batch_bytes).unwrap_or(u64::MAX)),
            max_retries: config.max_retries,
            ordered: config.ordered,
            side,
            vigil: Arc::new(Vigil::new()),
            drain_mark: Arc::default(),
        }
    }
}

type Pooled<T> = PooledConnection<PostgresConnectionManager<T>>;

/// The relay's second connection, shared by its workers: journal records, late settlements
/// and rows set aside. Each use is one short transaction, so sharing costs a worker at most
/// the wait for another's sub-millisecond statement, and the pool one connection per relay
/// rather than one per worker.
///
/// The connection is taken out of the shared slot for each use, and the slot's lock is not
/// held meanwhile: a use whose call never returns (a connection dropped silently by the
/// network) holds up the others only until `stuck_after`, after which they give up on it
/// and take a new connection, and the stuck use, should it ever return, leaves its
/// connection alone.
pub(crate) struct SideConnection<T: MakeTls> {
    store: PgStore<T>,
    sql: Arc<Sql>,
    state: Mutex<SideState<T>>,
    freed: Condvar,
    stuck_after: Duration,
}

/// The shared slot: the idle connection, whether a use is in progress, and which
/// generation of users the slot belongs to (bumped when a stuck use is given up on).
struct SideState<T: MakeTls> {
    conn: Option<Side<T>>,
    busy: bool,
    generation: u64,
}

/// The second connection, with the journal's INSERT prepared on it.
struct Side<T: MakeTls> {
    client: Pooled<T>,
    record: Statement,
}

impl<T: MakeTls> SideConnection<T> {
    fn lock(&self) -> MutexGuard<'_, SideState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records claim `claim_id` of `ids` in the journal: the prepared INSERT, one round trip.
    /// False when the claim's transaction has already ended (its advisory lock is free):
    /// nothing was recorded, and the batch must not reach a Sender.
    fn record(&self, claim_id: i32, ids: &[i64]) -> Result<bool, Error> {
        let ranges = sql::int8_multirange(ids);
        self.run_with("recording a claim in the claim journal", |c, record| {
            c.execute(record, &[&claim_id, &ranges]).map(|n| n == 1)
        })
    }

    /// Deletes claim `claim_id`'s journal row: the claim is given back before any Sender saw
    /// it, and must not be charged.
    fn forget(&self, claim_id: i32) -> Result<(), Error> {
        let statement = self.sql.claims.journal_forget.clone();
        self.run("forgetting a claim given back before its Sender", |c| {
            c.execute(&statement, &[&claim_id]).map(|_| ())
        })
    }

    /// Forgets the connection: a worker was found stuck on a call that never returned (a
    /// network path that froze), and this connection, idle or in use, is on the same path.
    /// Waiting users are let go at once and take a new one. The idle one, if any, is checked
    /// on a thread of its own: back to the pool if it answers, kept by that thread for as
    /// long as it does not.
    fn reset(&self) {
        let mut state = self.lock();
        state.generation = state.generation.wrapping_add(1);
        state.busy = false;
        let idle = state.conn.take();
        drop(state);
        self.freed.notify_all();
        if let Some(mut side) = idle {
            let _ = std::thread::Builder::new()
                .name("troutbox-check".into())
                .spawn(move || {
                    let _ = side.client.simple_query("");
                });
        }
    }

    /// Runs `f` on the connection (taken from the pool when there is none); a connection
    /// that failed is dropped, and a transaction left open by `f` is rolled back.
    fn run<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut Client) -> Result<R, postgres::Error>,
    ) -> Result<R, Error> {
        self.run_with(context, |c, _| f(c))
    }

    fn run_with<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut Client, &Statement) -> Result<R, postgres::Error>,
    ) -> Result<R, Error> {
        // Wait for the slot; give up on a use that has held it past `stuck_after`.
        let mut state = self.lock();
        let deadline = Instant::now() + self.stuck_after;
        while state.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::error!(
                    "troutbox relay: the claim journal's connection has not answered for {:?}; presumed dead, taking a new one",
                    self.stuck_after
                );
                state.generation = state.generation.wrapping_add(1);
                state.conn = None;
                break;
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        state.busy = true;
        let generation = state.generation;
        let taken = state.conn.take();
        drop(state);
        // A panic inside (a bug, an injected fault) must neither leave the slot busy nor
        // put a connection with an open transaction back into the pool.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.use_connection(taken, context, f)
        }));
        let (side, result) = match result {
            Ok(done) => done,
            Err(payload) => {
                let mut state = self.lock();
                if state.generation == generation {
                    state.busy = false;
                    self.freed.notify_one();
                }
                drop(state);
                std::panic::resume_unwind(payload)
            }
        };
        // Hand the slot back, unless this use was given up on meanwhile.
        let mut state = self.lock();
        if state.generation == generation {
            state.busy = false;
            state.conn = side;
            self.freed.notify_one();
        }
        result
    }

    /// Runs `f` on `taken` (or a new connection); returns the connection if it can be used
    /// again, and `f`'s result.
    fn use_connection<R>(
        &self,
        taken: Option<Side<T>>,
        context: &'static str,
        f: impl FnOnce(&mut Client, &Statement) -> Result<R, postgres::Error>,
    ) -> (Option<Side<T>>, Result<R, Error>) {
        let mut side = match taken.filter(|s| !s.client.is_closed()) {
            Some(side) => side,
            None => {
                let connected = self.store.relay_connection(context).and_then(|mut client| {
                    let record = client
                        .prepare_typed(&self.sql.claims.journal_insert, &[Type::INT4, Type::TEXT])
                        .map_err(self.store.db_error(context))?;
                    Ok(Side { client, record })
                });
                match connected {
                    Ok(side) => side,
                    Err(e) => return (None, Err(e)),
                }
            }
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(&mut side.client, &side.record)
        }));
        let result = match result {
            Ok(result) => result,
            Err(payload) => {
                // Never let a connection go back to the pool with a transaction open.
                if !side.client.is_closed() {
                    let _ = side.client.batch_execute(sql::ROLLBACK);
                }
                drop(side);
                std::panic::resume_unwind(payload)
            }
        };
        match result {
            Ok(r) => (Some(side), Ok(r)),
            Err(e) => {
                let usable =
                    !side.client.is_closed() && side.client.batch_execute(sql::ROLLBACK).is_ok();
                (usable.then_some(side), Err(self.store.db_error(context)(e)))
            }
        }
    }
}

impl<T: MakeTls> RelayStore for PgRelay<T> {
    type Session = PgSession<T>;

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
        self.side.reset();
        self.vigil
            .alert_all("a relay worker was stuck in a database call and replaced");
    }

    fn open_session(&self) -> Result<PgSession<T>, Error> {
        let timeout_ms = self.send_timeout.as_millis().max(1);
        let ids = RandomState::new();
        let mut session = PgSession {
            store: self.store.clone(),
            sql: self.sql.clone(),
            side: self.side.clone(),
            vigil: self.vigil.clone(),
            shared_mark: (!self.ordered).then(|| self.drain_mark.clone()),
            first_claims: vigil::FIRST_CLAIMS_JOURNALED,
            journaled: false,
            timeout_ms: u64::try_from(timeout_ms).unwrap_or(u64::MAX),
            limit: self.batch_size,
            max_bytes: self.max_bytes,
            max_retries: self.max_retries,
            ordered: self.ordered,
            send_timeout: self.send_timeout,
            conn: None,
            open: false,
            begun: false,
            mark: None,
            last_head_claim: Instant::now(),
            claim_id: 0,
            claim_ids: ids,
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
        self.store.check_table_kind(&mut *conn.client)?;
        self.store.check_ordering(&mut *conn.client, self.ordered)?;
        session.outbox_id = self.store.outbox_id(&mut *conn.client)?;
        // A relay restarted after a crash charges its own abandoned claim before it claims.
        session.recover();
        Ok(session)
    }
}

struct SessionConn<T: MakeTls> {
    client: Pooled<T>,
    /// Claims from the head of the pending index.
    claim_head: Statement,
    /// Claims past the session's position (see [`Sql::claim`]).
    claim_after: Statement,
    /// Claims one given message.
    claim_one: Statement,
}

/// One relay worker's connection, with the claim statements prepared on it.
pub(crate) struct PgSession<T: MakeTls> {
    store: PgStore<T>,
    /// The table's identity, given to every claimed message (see `Message::dedup_key`).
    outbox_id: Arc<str>,
    sql: Arc<Sql>,
    side: Arc<SideConnection<T>>,
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
    /// The send timeout in milliseconds, as the claim transaction's bounds.
    timeout_ms: u64,
    /// The batch size the claim statements were prepared for.
    limit: usize,
    /// Their bound on a batch's bytes.
    max_bytes: Option<u64>,
    max_retries: u32,
    /// Per-key ordering: the ordered claim statements.
    ordered: bool,
    send_timeout: Duration,
    conn: Option<SessionConn<T>>,
    /// A claim transaction is open on `conn`.
    open: bool,
    /// A transaction was begun ahead, with the previous COMMIT, for the next claim.
    begun: bool,
    /// Position (available_at, id) of the last row of the last full batch: where the next
    /// claim resumes while a backlog drains.
    mark: Mark,
    last_head_claim: Instant,
    /// The id of the open (or begun) claim transaction: the key of its advisory lock and of
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

impl<T: MakeTls> PgSession<T> {
    fn connect(&mut self) -> Result<&mut SessionConn<T>, Error> {
        if self.conn.is_none() {
            let mut client = self.store.relay_connection("opening a relay session")?;
            let context = "preparing the claim statements";
            let map = self.store.db_error(context);
            let ordered = self.ordered;
            let prepared = (|| {
                let claim_head = client.prepare(&self.sql.claims.claim(
                    self.limit,
                    ClaimKind::Head,
                    ordered,
                    self.max_bytes,
                ))?;
                let claim_after = client.prepare_typed(
                    &self.sql.claims.claim(
                        self.limit,
                        ClaimKind::AfterMark,
                        ordered,
                        self.max_bytes,
                    ),
                    &[Type::TIMESTAMPTZ, Type::INT8],
                )?;
                let claim_one = client.prepare_typed(
                    &self.sql.claims.claim(1, ClaimKind::One, ordered, None),
                    &[Type::INT8],
                )?;
                Ok((claim_head, claim_after, claim_one))
            })();
            let (claim_head, claim_after, claim_one) = prepared.map_err(map)?;
            self.conn = Some(SessionConn {
                client,
                claim_head,
                claim_after,
                claim_one,
            });
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }

    /// Turns a failure inside the claim transaction into an error, leaving the session
    /// either clean (transaction rolled back) or without a connection.
    fn fail(&mut self, context: &'static str, e: postgres::Error) -> Error {
        self.rollback();
        self.mark = None;
        self.store.db_error(context)(e)
    }

    /// Ends the open (or begun) transaction without changes; drops a connection on which
    /// that fails.
    fn rollback(&mut self) {
        let in_transaction = self.open || self.begun;
        if let Some(conn) = self.conn.as_mut() {
            let rolled_back = in_transaction
                && !conn.client.is_closed()
                && conn.client.batch_execute(sql::ROLLBACK).is_ok();
            if conn.client.is_closed() || (in_transaction && !rolled_back) {
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
        let sql = &self.sql;
        // This relay's start, or an abnormal end it saw, announced to the others.
        self.claims = self.claims.wrapping_add(1);
        let marker = self
            .vigil
            .marker_to_post(self.claim_ids.hash_one((self.claims, "marker")));
        let result = self.side.run("charging abandoned claims", |c| {
            c.batch_execute(sql::BEGIN_SIDE)?;
            if let Some(marker) = marker {
                c.execute(&sql.claims.journal_marker, &[&marker])?;
            }
            let row = c.query_one(&sql.claims.recover, &[])?;
            let charged: i64 = row.try_get(0)?;
            let markers: Vec<i32> = row.try_get(1)?;
            if cleanup {
                c.execute(&sql.claims.charges_cleanup, &[])?;
            }
            c.batch_execute(sql::COMMIT)?;
            Ok((charged, markers))
        });
        match result {
            Ok((charged, markers)) => {
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

    /// A new claim id, and the statements that open its transaction.
    fn begin_next(&mut self) -> String {
        self.claims = self.claims.wrapping_add(1);
        // Random, positive and never 0 (0 means no claim recorded).
        self.claim_id = ((self.claim_ids.hash_one(self.claims) >> 33) as i32) | 1;
        sql::begin_claim(self.timeout_ms, self.claim_id)
    }

    /// Runs one claim statement in a new (or begun) claim transaction, leaving it open.
    fn claim_rows(&mut self, kind: ClaimKind) -> Result<Vec<postgres::Row>, Error> {
        fault_point!(crate::fault::CLAIM_BEGIN, return);
        let begun = std::mem::take(&mut self.begun);
        let begin = (!begun).then(|| self.begin_next());
        self.connect()?;
        // Open from the moment BEGIN is sent: if a statement after it fails, the transaction
        // is aborted and must be rolled back, not left on the connection.
        self.open = true;
        let conn = self.conn.as_mut().expect("connected above");
        if let Some(begin) = begin {
            if let Err(e) = conn.client.batch_execute(&begin) {
                return Err(self.fail("opening a claim transaction", e));
            }
        }
        if let Some(e) = crate::fault::injected(crate::fault::CLAIM_STATEMENT) {
            self.rollback();
            return Err(e);
        }
        let conn = self.conn.as_mut().expect("connected above");
        self.claim_started = Instant::now();
        let rows = match kind {
            ClaimKind::One => {
                let id = *self.suspects.front().expect("a suspect to claim");
                conn.client.query(&conn.claim_one, &[&id])
            }
            ClaimKind::AfterMark | ClaimKind::Head => {
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
                    Some((at, id)) => conn.client.query(&conn.claim_after, &[&at, &id]),
                    None => Ok(Vec::new()),
                };
                // Nothing past the position (or no position): claim from the head.
                if matches!(&rows, Ok(r) if r.is_empty()) {
                    self.last_head_claim = Instant::now();
                    rows = conn.client.query(&conn.claim_head, &[]);
                }
                rows
            }
        };
        rows.map_err(|e| self.fail("claiming a batch", e))
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
        if let Err(e) = conn.client.batch_execute(sql::COMMIT) {
            return Err(self.fail("ending an empty claim", e));
        }
        self.open = false;
        Ok(())
    }

    /// Sets undecodable rows aside as dead, after the claim that found them was rolled back.
    fn set_aside(&self, bad: Vec<(i64, Undecodable)>, claimed: &mut Claimed) {
        for (id, why) in bad {
            fault_point!(crate::fault::SET_ASIDE);
            let reason = storable_text(&why.to_string());
            let statement = self.sql.claims.set_aside.clone();
            let result = self.side.run("setting an undecodable message aside", |c| {
                c.batch_execute(sql::BEGIN_SIDE)?;
                let n: i64 = c.query_one(&statement, &[&id, &reason])?.try_get(0)?;
                c.batch_execute(sql::COMMIT)?;
                Ok(n)
            });
            match result {
                // 0: another relay set it aside first, and reports it.
                Ok(0) => {}
                Ok(n) => {
                    claimed.report.dead += u64::try_from(n).unwrap_or(0);
                    claimed.reports.push(Error::SetAside { id, reason });
                }
                Err(e) => claimed.reports.push(e),
            }
        }
    }

    /// Sets aside every pending row that breaks the table's CHECK (rows from before
    /// migration 2), after a keep-mode claim, which updates the rows it takes, failed on one.
    fn set_aside_unchecked(&self, claimed: &mut Claimed) -> Result<(), Error> {
        let statement = self.sql.claims.set_aside_unchecked.clone();
        let ids = self
            .side
            .run("setting aside rows that break the CHECK", |c| {
                c.batch_execute(sql::BEGIN_SIDE)?;
                let ids = c
                    .query(&statement, &[])?
                    .iter()
                    .map(|row| row.try_get::<_, i64>(0))
                    .collect::<Result<Vec<i64>, _>>()?;
                c.batch_execute(sql::COMMIT)?;
                Ok(ids)
            })?;
        for id in ids {
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
            None if journal => self.side.record(self.claim_id, ids),
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
                if Instant::now() < super::send_deadline(self.claim_started, self.send_timeout) {
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
            send_timeout: self.send_timeout,
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
            if let Err(e) = self.side.forget(self.claim_id) {
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
        let mut first_of_key: std::collections::HashMap<&str, i64> = Default::default();
        if self.ordered {
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
            .filter(|r| {
                !self.ordered || first_of_key.get(r.message.key.as_str()) == Some(&r.message.id)
            })
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
            self.send_timeout
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
        let sql = &self.sql;
        let claim_id = self.claim_id;
        let ordered = self.ordered;
        let max_retries = i32::try_from(self.max_retries).unwrap_or(i32::MAX);
        let all_sent = &settlement.sent;
        let r = &settlement.returned;
        let all_failed: Vec<i64> = r.iter().map(|x| x.message.id).collect();
        let delays: Vec<i64> = r.iter().map(|x| millis(x.delay)).collect();
        let errors: Vec<&str> = r.iter().map(|x| x.error.as_str()).collect();
        // The attempt each failure counts: 1, or 0 for a message returned uncharged (one set
        // aside for its abandoned claims counts 1, so that it is dead here too).
        let increments: Vec<i32> = r
            .iter()
            .map(|x| i32::from(x.dead || x.attempts > x.message.attempts))
            .collect();
        // The attempts each row had when the lost claim read it: the message's, less the
        // charges the claim added to them.
        let read: Vec<i32> = r
            .iter()
            .map(|x| {
                let charges = charged
                    .iter()
                    .find(|(id, _)| *id == x.message.id)
                    .map_or(0, |(_, c)| c.len());
                let charges = u32::try_from(charges).unwrap_or(u32::MAX);
                attempts_i32(x.message.attempts.saturating_sub(charges))
            })
            .collect();
        let claimed = all_sent.len() + all_failed.len();
        fault_point!(crate::fault::LATE_SETTLE, return);
        let context = "recording a batch outcome after its transaction was lost";
        self.side.run(context, |c| {
            c.batch_execute(sql::BEGIN_SIDE)?;
            let Some(row) = c.query_opt(&sql.claims.journal_take, &[&claim_id])? else {
                // Settled after all (the COMMIT went through, its answer was lost), or
                // charged by a recovery meanwhile: either way nothing is to be applied.
                c.batch_execute(sql::COMMIT)?;
                return Ok((SettleReport::default(), claimed));
            };
            let ours: Vec<i64> = row.try_get(0)?;
            // With per-key ordering, only the messages of keys no other claim holds.
            let free: Option<std::collections::HashSet<i64>> = if ordered {
                let ids: Vec<i64> = all_sent.iter().chain(&all_failed).copied().collect();
                let rows = c.query(&sql.claims.late_free_keys, &[&ids])?;
                Some(
                    rows.iter()
                        .map(|r| r.try_get(0))
                        .collect::<Result<_, _>>()?,
                )
            } else {
                None
            };
            let keep = |ids: &[i64]| -> Vec<i64> {
                match &free {
                    Some(free) => ids.iter().filter(|id| free.contains(id)).copied().collect(),
                    None => ids.to_vec(),
                }
            };
            let sent = keep(all_sent);
            // The failed ones stay aligned with their delays, errors and increments: a
            // message of a held key is given a NULL id, which matches no row.
            let failed: Vec<Option<i64>> = all_failed
                .iter()
                .map(|id| free.as_ref().is_none_or(|f| f.contains(id)).then_some(*id))
                .collect();
            let mut report = SettleReport::default();
            let mut done: Vec<i64> = Vec::new();
            if !sent.is_empty() {
                for row in c.query(&sql.claims.late_mark_sent, &[&sent])? {
                    done.push(row.try_get(0)?);
                    report.sent += 1;
                }
                if !done.is_empty() {
                    c.execute(&sql.claims.charges_forget, &[&done])?;
                }
            }
            if failed.iter().any(Option::is_some) {
                // Deletes the charges it counts itself.
                let params: [&(dyn ToSql + Sync); 6] =
                    [&failed, &delays, &errors, &max_retries, &increments, &read];
                for row in c.query(&sql.claims.late_record_failed, &params)? {
                    done.push(row.try_get(0)?);
                    if row.try_get::<_, &str>(1)? == "dead" {
                        report.dead += 1;
                    } else {
                        report.retried += 1;
                    }
                }
            }
            fault_point!(crate::fault::LATE_SETTLE_MID);
            let held: Vec<i64> = ours.into_iter().filter(|id| !done.contains(id)).collect();
            if !held.is_empty() {
                c.execute(&sql.claims.charges_add, &[&held, &claim_id])?;
            }
            c.batch_execute(sql::COMMIT)?;
            Ok((report, held.len()))
        })
    }

    /// Decodes claimed rows: the good ones, and the ids of those that cannot be decoded.
    fn decode(&self, rows: &[postgres::Row]) -> (Vec<Row>, Vec<(i64, Undecodable)>) {
        let mut good = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        for row in rows {
            let charges = decode::column::<Option<Vec<i32>>>(row, 7, "charges");
            match (decode::message(row, &self.outbox_id), charges) {
                (Ok(message), Ok(charges)) => {
                    let charges = charges.unwrap_or_default();
                    good.push(Row {
                        message,
                        abandoned: u32::try_from(charges.len()).unwrap_or(u32::MAX),
                        charges,
                    })
                }
                (Err(why), _) | (_, Err(why)) => {
                    // The id is the primary key: NOT NULL bigint, always readable.
                    if let Ok(id) = row.try_get::<_, i64>(0) {
                        bad.push((id, why));
                    }
                }
            }
        }
        (good, bad)
    }
}

/// A claim refused by the table's CHECK.
fn is_check_violation(e: &Error) -> bool {
    matches!(e, Error::Database { error, .. }
        if error.code() == Some(&postgres::error::SqlState::CHECK_VIOLATION))
}

fn attempts_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn state(dead: bool) -> &'static str {
    if dead {
        "dead"
    } else {
        "pending"
    }
}

/// Puts the failed messages of a settlement back, inside the claim transaction: one
/// statement whatever their number. Delete mode re-inserts the rows the claim deleted (same
/// ids); keep mode updates the rows the claim marked sent.
fn return_failed(
    client: &mut Client,
    sql: &Sql,
    settlement: &Settlement,
    keep: bool,
) -> Result<(), postgres::Error> {
    let r = &settlement.returned;
    let ids: Vec<i64> = r.iter().map(|x| x.message.id).collect();
    let created: Vec<OffsetDateTime> = r.iter().map(|x| x.message.created_at).collect();
    let attempts: Vec<i32> = r.iter().map(|x| attempts_i32(x.attempts)).collect();
    let delays: Vec<i64> = r.iter().map(|x| millis(x.delay)).collect();
    let states: Vec<&str> = r.iter().map(|x| state(x.dead)).collect();
    let errors: Vec<&str> = r.iter().map(|x| x.error.as_str()).collect();
    if keep {
        return client
            .execute(
                &sql.claims.return_failed,
                &[&ids, &created, &attempts, &delays, &states, &errors],
            )
            .map(|_| ());
    }
    let keys: Vec<&str> = r.iter().map(|x| x.message.key.as_str()).collect();
    let values: Vec<&[u8]> = r.iter().map(|x| x.message.value.as_slice()).collect();
    let headers: Vec<String> = r
        .iter()
        .map(|x| {
            sql::encode_headers(
                x.message
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str())),
            )
        })
        .collect();
    client
        .execute(
            &sql.claims.return_failed,
            &[
                &ids, &keys, &values, &headers, &created, &attempts, &delays, &states, &errors,
            ],
        )
        .map(|_| ())
}

impl<T: MakeTls> RelaySession for PgSession<T> {
    fn claim(&mut self, limit: usize) -> Result<Claimed, Error> {
        debug_assert!(!self.open, "claim while a claim is open");
        if limit != self.limit {
            // Prepared for another batch size: prepare again (not on the relay's path).
            self.limit = limit;
            self.rollback();
            self.conn = None;
        }
        self.recover();
        let mut claimed = Claimed::default();
        let mut checked = false;
        // Each round either hands messages to the Sender or settles something for good (a
        // message set aside, a suspect taken by another relay): bounded by the suspects.
        for _ in 0..limit.saturating_mul(2).saturating_add(8) {
            let kind = if self.suspects.is_empty() {
                ClaimKind::Head
            } else {
                ClaimKind::One
            };
            let rows = match self.claim_rows(kind) {
                Ok(rows) => rows,
                Err(e) if is_check_violation(&e) && !checked => {
                    // Keep mode's claim UPDATE met a row from before the CHECK existed.
                    checked = true;
                    self.set_aside_unchecked(&mut claimed)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if kind == ClaimKind::One {
                self.suspects.pop_front();
            }
            if rows.is_empty() {
                self.partial = false;
                self.end_empty()?;
                if kind == ClaimKind::One {
                    continue; // another relay holds it, or settled it
                }
                self.share_mark(None);
                return Ok(claimed);
            }
            let full = rows.len() >= limit;
            if !full && kind != ClaimKind::One {
                // The backlog is drained (or this batch was cut to its bytes): every session
                // claims from the head again.
                self.share_mark(None);
            }
            let (rows_ok, bad) = self.decode(&rows);
            if !bad.is_empty() {
                // Give the batch back untouched, then set the bad rows aside on their own.
                self.rollback();
                self.set_aside(bad, &mut claimed);
                continue;
            }
            let suspects = if kind != ClaimKind::One && rows_ok.len() > 1 {
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
            if full && kind != ClaimKind::One {
                self.mark = rows
                    .iter()
                    .filter_map(|r| {
                        let at = r.try_get::<_, OffsetDateTime>(6).ok()?;
                        Some((at, r.try_get::<_, i64>(0).ok()?))
                    })
                    .max();
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
        let claims_next = settlement.sent.len() >= self.limit;
        let settling = self.claim_id;
        let journaled = self.journaled;
        let forget = self
            .sql
            .claims
            .journal_settled(journaled.then_some(settling), &self.charged);
        let end = if claims_next {
            format!("{forget}{}; {}", sql::COMMIT, self.begin_next())
        } else {
            format!("{forget}{}", sql::COMMIT)
        };
        if let Some(e) = crate::fault::injected(crate::fault::SETTLE) {
            // As if the statement had failed: the claim transaction is gone.
            self.rollback();
            self.claim_id = settling;
            return self.settle_lost(settlement, Some(e));
        }
        let conn = self.conn.as_mut().expect("checked above");
        let mut result = Ok(());
        if !settlement.returned.is_empty() {
            let keep = self.store.retention_config().keep.is_some();
            result = return_failed(&mut conn.client, &self.sql, &settlement, keep);
        }
        fault_point!(crate::fault::COMMIT);
        let result = result.and_then(|()| conn.client.batch_execute(&end));
        match result {
            Ok(()) => {
                self.open = false;
                self.begun = claims_next;
                self.journaled = false;
                self.charged.clear();
                (SettleReport::of(&settlement), None)
            }
            Err(e) => {
                let error = self.fail("settling a batch", e);
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
        self.conn.as_ref().is_none_or(|c| c.client.is_closed())
    }
}

impl<T: MakeTls> PgSession<T> {
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

impl<T: MakeTls> Drop for PgSession<T> {
    fn drop(&mut self) {
        // Never hand a connection with an open transaction back to the pool. A claim given
        // back this way keeps its journal rows: it counts as an attempt.
        if self.open || self.begun {
            if let Some(conn) = self.conn.as_mut() {
                let _ = conn.client.batch_execute(sql::ROLLBACK);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PgPool;

    /// A pool on the test server and a freshly migrated store in `schema` (`ordered`: with
    /// per-key ordering).
    pub(super) fn fresh_store_pub(schema: &str, ordered: bool) -> (PgPool, PgStore) {
        fresh_store(schema, ordered)
    }
    fn fresh_store(schema: &str, ordered: bool) -> (PgPool, PgStore) {
        let url = crate::testing::database_url().unwrap();
        let pool: PgPool = r2d2::Pool::builder()
            .max_size(2)
            .build(PostgresConnectionManager::new(
                url.parse().unwrap(),
                postgres::NoTls,
            ))
            .unwrap();
        pool.get()
            .unwrap()
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .unwrap();
        let store = PgStore::new(pool.clone()).schema(schema);
        store.migrate_with(Some(ordered)).unwrap();
        (pool, store)
    }

    /// The claim's plan on a table that was never analyzed (every new outbox; every backlog
    /// that grows faster than autovacuum runs): without the planner settings of
    /// `sql::begin_claim`, PostgreSQL picks a bitmap scan of the whole backlog and a sort,
    /// a quadratic drain. With them, an ordered scan of the pending index.
    #[test]
    fn the_claim_plan_does_not_depend_on_planner_statistics() {
        let (pool, store) = fresh_store("unit_claim_plan", false);
        let mut client = pool.get().unwrap();
        client
            .batch_execute(
                "ALTER TABLE unit_claim_plan.outbox_messages SET (autovacuum_enabled = false);
                 INSERT INTO unit_claim_plan.outbox_messages (key, value)
                 SELECT 'k', convert_to(repeat('x', 200), 'UTF8') FROM generate_series(1, 50000);",
            )
            .unwrap();
        let sql = store.sql().unwrap();
        let plan = |client: &mut Client, begin: &str| -> String {
            client.batch_execute(begin).unwrap();
            client
                .batch_execute(&format!(
                    "PREPARE claim_after(timestamptz, int8) AS {}",
                    sql.claims.claim(100, ClaimKind::AfterMark, false, None)
                ))
                .unwrap();
            let mut text = String::new();
            for query in [
                format!(
                    "EXPLAIN (COSTS OFF) {}",
                    sql.claims.claim(100, ClaimKind::Head, false, None)
                ),
                "EXPLAIN (COSTS OFF) EXECUTE claim_after(now() - interval '1 day', 0)".into(),
                format!(
                    "EXPLAIN (COSTS OFF) {}",
                    sql.claims.claim(1, ClaimKind::One, false, None)
                )
                .replace("$1", "7"),
            ] {
                for row in client.query(&query, &[]).unwrap() {
                    text.push_str(row.get::<_, &str>(0));
                    text.push('\n');
                }
            }
            client
                .batch_execute("DEALLOCATE claim_after; ROLLBACK")
                .unwrap();
            text
        };
        let ours = plan(&mut client, &sql::begin_claim(1000, 1));
        assert!(!ours.contains("Sort"), "{ours}");
        assert!(!ours.contains("Bitmap"), "{ours}");
        assert!(!ours.contains("Seq Scan"), "{ours}");
        assert!(
            ours.contains("Index Scan using outbox_messages_pending_idx"),
            "{ours}"
        );
        // The same statements without those settings: the plan this test guards against.
        let plain = plan(
            &mut client,
            "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan",
        );
        assert!(
            plain.contains("Sort") || plain.contains("Bitmap"),
            "the unguarded plan no longer degrades; is this test still needed?\n{plain}"
        );
        client
            .batch_execute("DROP SCHEMA unit_claim_plan CASCADE")
            .unwrap();
    }

    /// The ordered claim on a never-analyzed backlog of a few hot keys: a window of one
    /// batch, then keys found by descents of the key index, never a scan of the backlog
    /// (which made a claim cost O(backlog) when a key has thousands of messages waiting).
    #[test]
    fn the_ordered_claim_descends_the_key_index() {
        let (pool, store) = fresh_store("unit_ordered_plan", true);
        let mut client = pool.get().unwrap();
        client
            .batch_execute(
                "ALTER TABLE unit_ordered_plan.outbox_messages SET (autovacuum_enabled = false);
                 INSERT INTO unit_ordered_plan.outbox_messages (key, value)
                 SELECT 'k' || (g % 5), '\\x00' FROM generate_series(1, 20000) AS g;",
            )
            .unwrap();
        let sql = store.sql().unwrap();
        client.batch_execute(&sql::begin_claim(10_000, 1)).unwrap();
        let mut plan = String::new();
        for row in client
            .query(
                &format!(
                    "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {}",
                    sql.claims.claim(100, ClaimKind::Head, true, None)
                ),
                &[],
            )
            .unwrap()
        {
            plan.push_str(row.get::<_, &str>(0));
            plan.push('\n');
        }
        client.batch_execute("ROLLBACK").unwrap();
        assert!(plan.contains("outbox_messages_key_idx"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        assert!(!plan.contains("Bitmap"), "{plan}");
        // 5 keys of 4,000 messages: a window of 100 rows, 6 descents for the keys (the last
        // finds none), 5 runs of followers. No step reads more than a batch's worth.
        let most = plan
            .split("rows=")
            .skip(1)
            .filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        assert!(most <= 100, "a step read {most} rows:\n{plan}");
        client
            .batch_execute("DROP SCHEMA unit_ordered_plan CASCADE")
            .unwrap();
    }
}
#[cfg(test)]
mod bounded_plan {
    use super::*;

    /// The executed plan of a bounded claim of 100 on `store`'s table, in a claim
    /// transaction rolled back afterwards.
    fn explain_bounded_claim(client: &mut Client, store: &PgStore, limit: usize) -> String {
        let sql = store.sql().unwrap();
        client.batch_execute(&sql::begin_claim(10_000, 1)).unwrap();
        let claim = sql
            .claims
            .claim(limit, ClaimKind::Head, false, Some(64 << 20));
        let plan = explain(client, &format!("(ANALYZE, COSTS OFF, TIMING OFF) {claim}"));
        client.batch_execute("ROLLBACK").unwrap();
        plan
    }

    /// The lines of `EXPLAIN {options_and_statement}`, joined.
    fn explain(client: &mut Client, options_and_statement: &str) -> String {
        let plan: Vec<String> = client
            .simple_query(&format!("EXPLAIN {options_and_statement}"))
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect();
        plan.join("\n")
    }

    /// The side connection's transactions are never compiled by JIT: the recovery's row
    /// estimate crossed `jit_above_cost`, and the server spent 80 to 115 ms compiling a
    /// statement that runs in 0.1 ms, once a second per relay (issue 23).
    #[test]
    fn the_recovery_is_not_compiled_by_jit() {
        let (pool, store) = super::tests::fresh_store_pub("unit_recover_jit", false);
        let sql = store.sql().unwrap();
        let mut client = pool.get().unwrap();
        // Whatever the server's own thresholds: as low as they go, so any plan would be.
        client
            .batch_execute("SET jit = on; SET jit_above_cost = 0")
            .unwrap();
        client.batch_execute(sql::BEGIN_SIDE).unwrap();
        let plan = explain(
            &mut client,
            &format!("(ANALYZE, TIMING OFF) {}", sql.claims.recover),
        );
        client
            .batch_execute("ROLLBACK; RESET jit; RESET jit_above_cost")
            .unwrap();
        assert!(!plan.contains("JIT"), "{plan}");
    }

    /// The claim bounded in bytes must not walk the table: its first versions did, once to
    /// join the rows' sizes (a full scan of the primary key, to avoid the window's sort,
    /// which the claim's settings penalise) and once to find the picked rows again (a walk
    /// of the pending index): a quadratic drain.
    #[test]
    fn the_bounded_claim_probes_each_row_once() {
        let (pool, store) = super::tests::fresh_store_pub("unit_bounded_plan", false);
        let mut client = pool.get().unwrap();
        client
            .batch_execute(
                "INSERT INTO unit_bounded_plan.outbox_messages (key, value)
                 SELECT 'k', convert_to(repeat('x', 200), 'UTF8') FROM generate_series(1, 5000);",
            )
            .unwrap();
        let plan = explain_bounded_claim(&mut client, &store, 100);
        assert!(
            plan.contains("Delete on outbox_messages m (actual rows=100 loops=1)"),
            "{plan}"
        );
        assert!(!plan.contains("Rows Removed by Join Filter"), "{plan}");
        // The claimed rows are deleted through the primary key; the table is never walked.
        assert!(
            plan.contains("Index Scan using outbox_messages_pkey on outbox_messages m (actual rows=100 loops=1)"),
            "{plan}"
        );
        assert!(!plan.contains("rows=5000"), "{plan}");
    }

    /// The same in keep mode (partitions, rows marked sent), at batch 100 and 1,000: the
    /// claim of 1,000 once compared every picked row with every row found (999,000
    /// comparisons, 0.17× the raw UPDATE; issue 23).
    #[test]
    fn the_bounded_claim_in_keep_mode_does_not_walk_the_table() {
        let (pool, _) = super::tests::fresh_store_pub("unit_bounded_keep", false);
        pool.get()
            .unwrap()
            .batch_execute("DROP SCHEMA unit_bounded_keep CASCADE")
            .unwrap();
        let store = PgStore::new(pool.clone())
            .schema("unit_bounded_keep")
            .retention(crate::Retention::keep_sent(Duration::from_secs(86_400)));
        store.migrate().unwrap();
        let mut client = pool.get().unwrap();
        client
            .batch_execute(
                "INSERT INTO unit_bounded_keep.outbox_messages (key, value)
                 SELECT 'k', convert_to(repeat('x', 200), 'UTF8') FROM generate_series(1, 20000);",
            )
            .unwrap();
        // Never analyzed, then analyzed: the planner's choice differed between the two.
        for analyzed in [false, true] {
            if analyzed {
                client
                    .batch_execute("ANALYZE unit_bounded_keep.outbox_messages")
                    .unwrap();
            }
            for limit in [100, 1000] {
                let plan = explain_bounded_claim(&mut client, &store, limit);
                assert!(
                    plan.contains(&format!("(actual rows={limit} loops=1)")),
                    "{plan}"
                );
                assert!(!plan.contains("rows=20000"), "{plan}");
                assert!(!plan.contains("Rows Removed by Join Filter"), "{plan}");
            }
        }
    }
}
