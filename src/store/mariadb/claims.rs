//! The claim protocol's MariaDB primitives (the policy is in `store::protocol`; the
//! statements, and how MariaDB gives the protocol what it needs, in `sql::claim`): a
//! worker's claim transaction, and the relay's second connection for the claim journal,
//! recoveries, rows set aside and late settlements.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Row, Statement};

use super::decode;
use super::sql::claim::{decode_ids, encode_ids, ClaimKind, ClaimSql};
use super::sql::Sql;
use super::{run_all, MariaDbStore, ResetOnDrop};
use crate::store::protocol::{
    attempts_i32, millis, ClaimBackend, ClaimConnection, ClaimSpec, ClaimedRow, LateFailed,
    LateSettlement, Recovered, Take,
};
use crate::store::side::{SideConn, SideConnection};
use crate::store::Returned;
use crate::Error;

/// The second connection's bounds: each of its transactions is a few sub-millisecond
/// statements; a client gone silent in one must not keep its row locks.
const SIDE_SETTINGS: &str = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; \
     SET SESSION idle_transaction_timeout = 10, SESSION innodb_lock_wait_timeout = 10, \
     SESSION max_statement_time = 60";

/// The send timeout as the server's bounds take it: whole seconds, rounded up (at least 1).
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The MariaDB primitives of the claim protocol for one relay.
pub(crate) struct MariaClaims {
    store: MariaDbStore,
    claims: Arc<ClaimSql>,
    outbox_id: Arc<str>,
    side: SideConnection<MariaSide>,
}

impl MariaClaims {
    /// The primitives of a relay on `store` (reads the table's identity, which names its
    /// claim locks); a use of the second connection that has not returned after
    /// `stuck_after` is given up on.
    pub(crate) fn new(
        store: MariaDbStore,
        sql: &Sql,
        stuck_after: Duration,
    ) -> Result<MariaClaims, Error> {
        let context = "starting the relay";
        let mut conn = ResetOnDrop(store.connection(context)?);
        super::check_server(&mut *conn.0)?;
        let outbox_id = store.outbox_id(&mut *conn.0, sql)?;
        drop(conn);
        let claims = Arc::new(ClaimSql::new(&sql.names, &outbox_id));
        let (connect_store, map_store) = (store.clone(), store.clone());
        let side = SideConnection::new(
            Box::new(move |context| {
                let mut conn = ResetOnDrop(connect_store.connection(context)?);
                run_all(&mut *conn.0, SIDE_SETTINGS).map_err(connect_store.db_error(context))?;
                Ok(MariaSide { conn })
            }),
            Box::new(move |context, e| map_store.db_error(context)(e)),
            stuck_after / 2,
        );
        Ok(MariaClaims {
            store,
            claims,
            outbox_id,
            side,
        })
    }

    fn run<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut mysql::Conn) -> Result<R, mysql::Error>,
    ) -> Result<R, Error> {
        self.side.run(context, |side| f(&mut side.conn.0))
    }

    /// Runs `f` in one transaction on the second connection.
    fn transaction<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut mysql::Conn) -> Result<R, mysql::Error>,
    ) -> Result<R, Error> {
        self.run(context, |c| {
            c.query_drop("START TRANSACTION")?;
            let r = f(c)?;
            c.query_drop("COMMIT")?;
            Ok(r)
        })
    }
}

/// The second connection (reset before it goes back to the pool).
struct MariaSide {
    conn: ResetOnDrop,
}

impl SideConn for MariaSide {
    type NativeError = mysql::Error;

    fn is_closed(&self) -> bool {
        false
    }

    fn rollback(&mut self) -> bool {
        self.conn.0.query_drop("ROLLBACK").is_ok()
    }

    fn probe(mut self) {
        let _ = self.conn.0.query_drop("DO 1");
    }
}

impl ClaimBackend for MariaClaims {
    type Conn = MariaClaimConn;
    type NativeError = mysql::Error;
    type Late<'a> = MariaLate<'a>;

    fn connect(&self, spec: &ClaimSpec) -> Result<MariaClaimConn, Error> {
        let context = "opening a relay session";
        let mut conn = ResetOnDrop(self.store.connection(context)?);
        let secs = whole_seconds(spec.send_timeout);
        let c = &self.claims;
        let prepared = (|| {
            // Session settings: the connection is the worker's until the session ends,
            // and reset before it goes back to the pool.
            run_all(
                &mut *conn.0,
                &format!(
                    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; \
                     SET SESSION idle_transaction_timeout = {secs}, \
                         SESSION innodb_lock_wait_timeout = {secs}, \
                         SESSION max_statement_time = {secs}"
                ),
            )?;
            let head = conn.0.prep(c.claim(spec.limit, ClaimKind::Head, false))?;
            let after = conn
                .0
                .prep(c.claim(spec.limit, ClaimKind::AfterMark, false))?;
            let one = conn.0.prep(c.claim(1, ClaimKind::One, spec.ordered))?;
            Ok((head, after, one))
        })();
        let (head, after, one) = prepared.map_err(self.store.db_error(context))?;
        Ok(MariaClaimConn {
            conn,
            store: self.store.clone(),
            claims: self.claims.clone(),
            spec: *spec,
            head,
            after,
            one,
            claim_id: 0,
            claimed: Vec::new(),
            returned: HashSet::new(),
            broken: false,
        })
    }

    fn check(&self, conn: &mut MariaClaimConn, ordered: bool) -> Result<Arc<str>, Error> {
        self.store.check_ordering(&mut *conn.conn.0, ordered)?;
        Ok(self.outbox_id.clone())
    }

    fn breaks_row_check(&self, _error: &Error) -> bool {
        // No row check on MariaDB: a row the relay cannot decode is set aside as such.
        false
    }

    fn journal_record(&self, claim_id: i32, ids: &[i64]) -> Result<bool, Error> {
        let text = encode_ids(ids);
        let statement = &self.claims.journal_insert;
        self.run("recording a claim in the claim journal", |c| {
            let result = c.exec_iter(statement, (claim_id, text, claim_id))?;
            Ok(result.affected_rows() == 1)
        })
    }

    fn journal_forget(&self, claim_id: i32) -> Result<(), Error> {
        let c = self.claims.clone();
        self.transaction("forgetting a claim given back before its Sender", |conn| {
            let gone = conn
                .exec_iter(&c.journal_delete, (claim_id,))?
                .affected_rows();
            if gone == 0 {
                // A recovery charged it meanwhile: take those charges back.
                conn.exec_drop(&c.charges_forget_claim, (claim_id,))?;
            }
            Ok(())
        })
    }

    fn recover(&self, marker: Option<i32>, cleanup: bool) -> Result<Recovered, Error> {
        let c = self.claims.clone();
        self.transaction("charging abandoned claims", |conn| {
            if let Some(marker) = marker {
                conn.exec_drop(&c.marker, (marker,))?;
            }
            let gone: Vec<(i32, String)> = conn.query(&c.abandoned)?;
            let mut charged = 0i64;
            for (claim_id, ids) in &gone {
                // Text the crate did not write cannot be charged: the row goes all the same.
                let ids = decode_ids(ids).unwrap_or_default();
                for chunk in ids.chunks(1000) {
                    conn.query_drop(c.add_charges(chunk, *claim_id))?;
                }
                charged += i64::try_from(ids.len()).unwrap_or(i64::MAX);
            }
            if !gone.is_empty() {
                let list: Vec<String> = gone.iter().map(|(id, _)| id.to_string()).collect();
                conn.query_drop(format!(
                    "DELETE FROM {} WHERE claim_id IN ({})",
                    c.journal_table(),
                    list.join(",")
                ))?;
            }
            conn.query_drop(&c.markers_expire)?;
            let markers: Vec<i32> = conn.query(&c.markers)?;
            if cleanup {
                conn.query_drop(&c.charges_cleanup)?;
            }
            Ok(Recovered { charged, markers })
        })
    }

    fn set_aside(&self, id: i64, reason: &str) -> Result<u64, Error> {
        let c = self.claims.clone();
        self.transaction("setting an undecodable message aside", |conn| {
            let locked: Option<i64> = conn.exec_first(&c.lock_pending_one, (id,))?;
            if locked.is_none() {
                return Ok(0);
            }
            conn.exec_drop(&c.set_aside, (reason, id))?;
            conn.query_drop(c.forget_charges(&[id]))?;
            Ok(1)
        })
    }

    fn set_aside_unchecked(&self) -> Result<Vec<i64>, Error> {
        Ok(Vec::new())
    }

    fn late_settlement<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut MariaLate<'_>) -> Result<R, mysql::Error>,
    ) -> Result<R, Error> {
        let c = self.claims.clone();
        self.transaction(context, |conn| f(&mut MariaLate { conn, claims: &c }))
    }

    fn reset_shared(&self) {
        self.side.reset();
    }
}

/// One relay worker's connection, with its claim statements prepared.
pub(crate) struct MariaClaimConn {
    conn: ResetOnDrop,
    store: MariaDbStore,
    claims: Arc<ClaimSql>,
    spec: ClaimSpec,
    head: Statement,
    after: Statement,
    one: Statement,
    /// The open claim's id (its lock's name).
    claim_id: i32,
    /// The rows the open claim took, which its settlement deletes unless returned.
    claimed: Vec<i64>,
    returned: HashSet<i64>,
    /// An error of the connection was met: it is not used again.
    broken: bool,
}

impl MariaClaimConn {
    fn fail(&mut self, context: &'static str) -> impl FnOnce(mysql::Error) -> Error + '_ {
        move |e| {
            if crate::error::mariadb_connection_error(&e) {
                self.broken = true;
            }
            self.store.db_error(context)(e)
        }
    }

    /// Runs `text` (several statements); the value of the last result's first row, for
    /// those that end with `GET_LOCK`.
    fn run_locking(&mut self, text: &str, context: &'static str) -> Result<(), Error> {
        let sets = run_all(&mut *self.conn.0, text).map_err(self.fail(context))?;
        let taken: Option<i64> = sets
            .last()
            .and_then(|rows| rows.first())
            .and_then(|row| row.get(0));
        if taken != Some(1) {
            // Another session holds this claim id's lock: ids are random, so this is a
            // collision, or a session that was not cleaned up. Never claim under it.
            return Err(Error::MariaDb {
                context: "taking a claim's lock (its id is held by another session)",
                source: mysql::Error::DriverError(mysql::DriverError::Timeout),
            });
        }
        Ok(())
    }

    /// Cuts `rows` (claim order) to the batch's byte bound, in id order: those up to the
    /// bound, or the first alone when larger. The rows cut stay locked, untouched.
    fn bounded(&self, mut rows: Vec<(ClaimedRow, u64)>) -> Vec<ClaimedRow> {
        if let Some(max) = self.spec.max_bytes {
            let total: u64 = rows.iter().map(|(_, size)| *size).sum();
            if total > max {
                let mut by_id: Vec<(i64, u64)> = rows
                    .iter()
                    .map(|(r, size)| (r.id.unwrap_or(i64::MAX), *size))
                    .collect();
                by_id.sort_unstable();
                let mut keep = HashSet::new();
                let mut upto = 0u64;
                for (i, (id, size)) in by_id.iter().enumerate() {
                    upto = upto.saturating_add(*size);
                    if upto > max && i > 0 {
                        break;
                    }
                    keep.insert(*id);
                }
                rows.retain(|(r, _)| keep.contains(&r.id.unwrap_or(i64::MAX)));
            }
        }
        rows.into_iter().map(|(r, _)| r).collect()
    }

    /// The ordered claim: due heads of keys no claim holds, each with the run of its
    /// followers that are due, in id order, up to the limit.
    fn claim_ordered(&mut self, outbox: &Arc<str>) -> Result<Vec<(ClaimedRow, u64)>, Error> {
        let context = "claiming a batch";
        let limit = self.spec.limit;
        let window = limit.saturating_mul(2);
        let candidates: Vec<i64> = self
            .conn
            .0
            .query(self.claims.due_heads(window))
            .map_err(self.fail(context))?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let heads: Vec<Row> = self
            .conn
            .0
            .query(self.claims.claim_heads(&candidates, limit))
            .map_err(self.fail(context))?;
        let mut out: Vec<(ClaimedRow, u64)> = Vec::new();
        let mut keys: Vec<(i64, Vec<u8>)> = Vec::new();
        for row in &heads {
            if let (Ok(id), Ok(Some(key))) =
                (decode::int(row, 0, "id"), decode::bytes_opt(row, 1, "key"))
            {
                keys.push((id, key.to_vec()));
            }
            out.push((decode::claimed(row, outbox), size_of(row)));
        }
        let room = limit.saturating_sub(out.len());
        if room > 0 && !keys.is_empty() {
            let text = self.claims.followers(&keys, room);
            let followers: Vec<Row> = run_all(&mut *self.conn.0, &text)
                .map_err(self.fail(context))?
                .into_iter()
                .flatten()
                .collect();
            // Each key's run stops at its first follower that is not due.
            let mut stopped: HashSet<Vec<u8>> = HashSet::new();
            let head_of: HashMap<&[u8], i64> =
                keys.iter().map(|(id, k)| (k.as_slice(), *id)).collect();
            for row in &followers {
                let Ok(Some(key)) = decode::bytes_opt(row, 1, "key") else {
                    continue;
                };
                let Ok(id) = decode::int(row, 0, "id") else {
                    continue;
                };
                if head_of.get(key).is_none_or(|h| id <= *h) || stopped.contains(key) {
                    continue;
                }
                if decode::int(row, 9, "due").ok() != Some(1) {
                    stopped.insert(key.to_vec());
                    continue;
                }
                out.push((decode::claimed(row, outbox), size_of(row)));
            }
            out.sort_by_key(|(r, _)| r.id);
            // The batch's limit, in id order: the rows past it stay locked, untouched.
            // Cutting a key's run short keeps its order (its rows are in id order).
            out.truncate(limit);
        }
        Ok(out)
    }
}

/// A claimed row's size (values plus headers), for the byte bound.
fn size_of(row: &Row) -> u64 {
    decode::int(row, 8, "size")
        .ok()
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0)
}

impl ClaimConnection for MariaClaimConn {
    fn begin(&mut self, claim_id: i32) -> Result<(), Error> {
        self.claimed.clear();
        self.returned.clear();
        self.claim_id = claim_id;
        let text = self.claims.begin(claim_id);
        self.run_locking(&text, "opening a claim transaction")
    }

    fn claim(&mut self, take: Take, outbox: &Arc<str>) -> Result<Vec<ClaimedRow>, Error> {
        let context = "claiming a batch";
        let rows: Vec<(ClaimedRow, u64)> = match take {
            Take::Head | Take::After(_) if self.spec.ordered => self.claim_ordered(outbox)?,
            _ => {
                let rows: Vec<Row> = match take {
                    Take::One(id) => {
                        let s = self.one.clone();
                        self.conn.0.exec(&s, (id,))
                    }
                    Take::After((at, id)) => {
                        let s = self.after.clone();
                        let at = decode::to_value(at);
                        self.conn.0.exec(&s, (at.clone(), at, id))
                    }
                    Take::Head => {
                        let s = self.head.clone();
                        self.conn.0.exec(&s, ())
                    }
                }
                .map_err(self.fail(context))?;
                rows.iter()
                    .map(|row| (decode::claimed(row, outbox), size_of(row)))
                    .collect()
            }
        };
        let rows = self.bounded(rows);
        self.claimed = rows.iter().filter_map(|r| r.id).collect();
        Ok(rows)
    }

    fn return_failed(&mut self, returned: &[Returned]) -> Result<(), Error> {
        let rows: Vec<(i64, i32, i64, bool, &str)> = returned
            .iter()
            .map(|r| {
                (
                    r.message.id,
                    attempts_i32(r.attempts),
                    millis(r.delay),
                    r.dead,
                    r.error.as_str(),
                )
            })
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let text = self.claims.return_failed(&rows);
        run_all(&mut *self.conn.0, &text).map_err(self.fail("settling a batch"))?;
        self.returned.extend(rows.iter().map(|r| r.0));
        Ok(())
    }

    fn commit(
        &mut self,
        journaled: Option<i32>,
        charged: &[(i64, Vec<i32>)],
        next: Option<i32>,
    ) -> Result<(), Error> {
        let sent: Vec<i64> = self
            .claimed
            .iter()
            .copied()
            .filter(|id| !self.returned.contains(id))
            .collect();
        let text = self
            .claims
            .commit(self.claim_id, &sent, journaled, charged, next);
        self.claimed.clear();
        self.returned.clear();
        match next {
            Some(next) => {
                self.claim_id = next;
                self.run_locking(&text, "settling a batch")
            }
            None => run_all(&mut *self.conn.0, &text)
                .map(drop)
                .map_err(self.fail("settling a batch")),
        }
    }

    fn end_empty(&mut self) -> Result<(), Error> {
        let text = self.claims.commit(self.claim_id, &[], None, &[], None);
        run_all(&mut *self.conn.0, &text)
            .map(drop)
            .map_err(self.fail("ending an empty claim"))
    }

    fn rollback(&mut self, in_transaction: bool) -> bool {
        self.claimed.clear();
        self.returned.clear();
        if in_transaction && !self.broken {
            let text = self.claims.rollback(self.claim_id);
            if run_all(&mut *self.conn.0, &text).is_err() {
                self.broken = true;
            }
        }
        !self.broken
    }

    fn is_closed(&self) -> bool {
        self.broken
    }
}

/// A late settlement's statements, on the second connection inside its transaction.
pub(crate) struct MariaLate<'a> {
    conn: &'a mut mysql::Conn,
    claims: &'a ClaimSql,
}

impl LateSettlement for MariaLate<'_> {
    type Error = mysql::Error;

    fn take_journal(&mut self, claim_id: i32) -> Result<Option<Vec<i64>>, mysql::Error> {
        let ids: Option<String> = self
            .conn
            .exec_first(&self.claims.journal_take, (claim_id,))?;
        match ids {
            Some(ids) => {
                self.conn
                    .exec_drop(&self.claims.journal_delete, (claim_id,))?;
                Ok(Some(decode_ids(&ids).unwrap_or_default()))
            }
            None => Ok(None),
        }
    }

    fn free_of(&mut self, ids: &[i64]) -> Result<HashSet<i64>, mysql::Error> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let free: HashSet<Vec<u8>> = self
            .conn
            .query::<Vec<u8>, _>(self.claims.lock_free_heads(ids))?
            .into_iter()
            .collect();
        let keyed: Vec<(i64, Vec<u8>)> = self.conn.query(self.claims.keys_of(ids))?;
        Ok(keyed
            .into_iter()
            .filter(|(_, key)| free.contains(key))
            .map(|(id, _)| id)
            .collect())
    }

    fn mark_sent(&mut self, ids: &[i64]) -> Result<Vec<i64>, mysql::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let locked: Vec<(i64, i32, Vec<u8>)> = self.conn.query(self.claims.lock_pending(ids))?;
        let locked: Vec<i64> = locked.into_iter().map(|(id, _, _)| id).collect();
        if !locked.is_empty() {
            run_all(self.conn, &self.claims.delete(&locked))?;
        }
        Ok(locked)
    }

    fn forget_charges(&mut self, ids: &[i64]) -> Result<(), mysql::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        self.conn.query_drop(self.claims.forget_charges(ids))
    }

    fn record_failed(&mut self, f: &LateFailed<'_>) -> Result<Vec<(i64, bool)>, mysql::Error> {
        let present: Vec<i64> = f.ids.iter().flatten().copied().collect();
        if present.is_empty() {
            return Ok(Vec::new());
        }
        // Only rows still as the lost claim read them: pending, free, same attempts.
        let locked: HashMap<i64, i32> = self
            .conn
            .query::<(i64, i32, Vec<u8>), _>(self.claims.lock_pending(&present))?
            .into_iter()
            .map(|(id, attempts, _)| (id, attempts))
            .collect();
        let mut kept = Vec::new();
        for (i, id) in f.ids.iter().enumerate() {
            if let Some(id) = id {
                if locked.get(id) == Some(&f.read[i]) {
                    kept.push((i, *id, f.read[i]));
                }
            }
        }
        if kept.is_empty() {
            return Ok(Vec::new());
        }
        let kept_ids: Vec<i64> = kept.iter().map(|(_, id, _)| *id).collect();
        let charges: HashMap<i64, i64> = self
            .conn
            .query::<(i64, i64), _>(self.claims.count_charges(&kept_ids))?
            .into_iter()
            .collect();
        self.conn
            .query_drop(self.claims.forget_charges(&kept_ids))?;
        let mut rows = Vec::with_capacity(kept.len());
        let mut out = Vec::with_capacity(kept.len());
        for (i, id, read) in kept {
            let k = i32::try_from(charges.get(&id).copied().unwrap_or(0)).unwrap_or(i32::MAX);
            let attempts = read.saturating_add(f.increments[i]).saturating_add(k);
            let dead = f.increments[i] > 0 && attempts > f.max_retries;
            rows.push((id, attempts, f.delays[i], dead, f.errors[i]));
            out.push((id, dead));
        }
        run_all(self.conn, &self.claims.return_failed(&rows))?;
        Ok(out)
    }

    fn charge(&mut self, ids: &[i64], claim_id: i32) -> Result<(), mysql::Error> {
        for chunk in ids.chunks(1000) {
            self.conn
                .query_drop(self.claims.add_charges(chunk, claim_id))?;
        }
        Ok(())
    }
}
