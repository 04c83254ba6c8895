//! Claiming, journaling and settling batches: the statements of the claim protocol
//! (`store::postgres::claims`), on the claim transaction and on the relay's second connection.

use crate::store::ident::Ident;
use crate::store::retention::Retention;

use super::{is_head, MESSAGE_COLUMNS, ORIGINAL, REPAIR, ROW_OK};

/// Which rows a claim takes (see [`ClaimSql::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimKind {
    /// Due rows from the head of the pending index.
    Head,
    /// Due rows past the session's position.
    AfterMark,
    /// One given message, alone: how a message whose earlier claim was abandoned is retried,
    /// so that a message that crashes or hangs the relay is charged alone.
    One,
}

/// Ends the claim transaction, making the deletion of sent rows and the re-insertion of
/// failed ones visible at once.
pub(crate) const COMMIT: &str = "COMMIT";

/// Gives a claimed batch back untouched.
pub(crate) const ROLLBACK: &str = "ROLLBACK";

/// The class of the transaction-scoped advisory lock each claim transaction holds on its
/// claim id (`pg_advisory_xact_lock(class, id)`, the two-key form, so it never meets the
/// single-key locks an application takes): "trou" in ASCII.
pub(crate) const CLAIM_LOCK_CLASS: i32 = 0x7472_6f75;

/// Opens the claim transaction, stating everything it relies on rather than inheriting the
/// server's, the database's or the role's settings:
///
/// - `READ COMMITTED`: each claim sees the rows committed before it; under `REPEATABLE READ`
///   or `SERIALIZABLE` (as a database default) a claim would fail with serialization errors.
/// - `idle_in_transaction_session_timeout` makes the server end the session if the relay
///   stays idle inside it (a hung Sender, a frozen process) longer than the send timeout: the
///   transaction rolls back and its rows become claimable again. This is the bound on how
///   long a batch can hold rows, enforced by the server itself. `statement_timeout` and
///   `lock_timeout` get the same bound, so a role's small values cannot fail a claim and a
///   large one cannot stretch it.
/// - `plan_cache_mode = force_generic_plan` keeps the claim that resumes after a position
///   (its only parameters) from being re-planned at every execution: planning walks the
///   index entries of rows already claimed, which is what a claim must not pay for.
/// - The `enable_*` settings make the plan independent of planner statistics. On a table
///   never analyzed (every new outbox, every backlog that grows faster than autovacuum runs)
///   the planner otherwise picks a bitmap scan of the whole backlog plus a sort, measured at
///   35-67 ms per claim of 100 on a 100,000-row backlog: a quadratic drain. With them the
///   claim is always an ordered scan of the pending index that stops after `LIMIT` rows, and
///   a nested loop on the primary key. Local to the claim transaction.
/// - `jit = off`: those settings work by adding a huge cost to the plans they rule out, and
///   a plan that cannot avoid one (the ordered claim's sort of at most a batch of rows)
///   then crosses `jit_above_cost`; the server would compile it to machine code at every
///   execution, measured at 200 ms per claim of 100 rows that itself takes 1 ms.
/// - The advisory lock on the claim id is how anyone can tell that this transaction has
///   ended: while it runs, the lock is held (see [`Sql::recover`](Sql)).
///
/// The claim id is an integer the crate generated.
pub(crate) fn begin_claim(send_timeout_ms: u64, claim_id: i32) -> String {
    // One statement for all the settings (set_config(..., true) is SET LOCAL): each
    // statement of a simple query costs its own parse and execution, per batch.
    let t = send_timeout_ms;
    format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED; \
         SELECT set_config('idle_in_transaction_session_timeout', '{t}', true), \
                set_config('statement_timeout', '{t}', true), \
                set_config('lock_timeout', '{t}', true), \
                set_config('plan_cache_mode', 'force_generic_plan', true), \
                set_config('enable_seqscan', 'off', true), \
                set_config('enable_bitmapscan', 'off', true), \
                set_config('enable_sort', 'off', true), \
                set_config('enable_hashjoin', 'off', true), \
                set_config('enable_mergejoin', 'off', true), \
                set_config('jit', 'off', true), \
                pg_advisory_xact_lock({CLAIM_LOCK_CLASS}, {claim_id})"
    )
}

/// Opens the short transactions of the relay's second connection (late settlements,
/// recovery, rows set aside), with the same explicit isolation as the claim, and bounded by
/// the server whatever the client does: a late settlement holds row locks of the outbox
/// across several round trips, and a client that goes silent in the middle (a frozen
/// network path, a paused process) must not keep them until TCP gives up, hours later. Each
/// round trip of these transactions is sub-millisecond; 10 s idle ends a silent one.
///
/// `jit = off`: the recovery's estimate of the rows an abandoned claim expands to (millions,
/// for a `generate_series` over ranges the planner cannot see) crossed `jit_above_cost`, and
/// the server compiled the statement at every recovery: measured 80 to 115 ms of server CPU
/// per round, once a second per relay while a backlog drains, for a statement that runs in
/// 0.1 ms (issue 23). One SELECT for the settings: each statement of a simple query costs its
/// own parse and execution.
pub(crate) const BEGIN_SIDE: &str = "BEGIN ISOLATION LEVEL READ COMMITTED; \
     SELECT set_config('statement_timeout', '60s', true), \
            set_config('lock_timeout', '10s', true), \
            set_config('idle_in_transaction_session_timeout', '10s', true), \
            set_config('jit', 'off', true)";

/// An `int8multirange` literal of the message ids of a claim, sent as the text parameter of
/// [`ClaimSql::journal_insert`]: the runs of consecutive ids as half-open ranges.
pub(crate) fn int8_multirange(ids: &[i64]) -> String {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::from("{");
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end += 1;
        }
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&format!("[{start},{})", end.saturating_add(1)));
        i += 1;
    }
    out.push('}');
    out
}

#[derive(Debug)]
pub(crate) struct ClaimSql {
    /// The qualified table and the retention, for the claim statements, which are built per
    /// batch size (see [`ClaimSql::claim`]).
    table: String,
    keep: bool,
    /// The claim journal and the charges (see [`ClaimSql::claim`]).
    journal: String,
    charges: String,
    pub(crate) return_failed: String,
    pub(crate) journal_insert: String,
    pub(crate) journal_forget: String,
    pub(crate) journal_take: String,
    pub(crate) late_mark_sent: String,
    pub(crate) late_free_keys: String,
    pub(crate) charges_add: String,
    pub(crate) charges_forget: String,
    pub(crate) recover: String,
    /// Posts a relay's announcement (see `store::vigil`): a marker row, negative id, no ids.
    pub(crate) journal_marker: String,
    pub(crate) charges_cleanup: String,
    pub(crate) set_aside: String,
    pub(crate) set_aside_unchecked: String,
    pub(crate) late_record_failed: String,
}

impl ClaimSql {
    pub(crate) fn new(schema: &Ident, table: &Ident, retention: &Retention) -> ClaimSql {
        let s = schema.quoted();
        let t = format!("{s}.{}", table.quoted());
        let keep = retention.keep.is_some();
        let journal = format!("{s}.\"{}_claims\"", table.as_str());
        let charges = format!("{s}.\"{}_charges\"", table.as_str());
        // Relay, same transaction as the claim: put failed rows back with their new attempt
        // count, retry time (from the clock now, after the send) or dead state, and error.
        let return_failed = if keep {
            format!(
                "UPDATE {t} AS m
                 SET attempts = u.a,
                     available_at = clock_timestamp() + u.d * interval '1 millisecond',
                     state = u.s,
                     last_error = u.e,
                     sent_at = NULL
                 FROM unnest($1::int8[], $2::timestamptz[], $3::int4[], $4::int8[], $5::text[], $6::text[])
                      AS u(id, c, a, d, s, e)
                 WHERE m.id = u.id AND m.created_at = u.c"
            )
        } else {
            // Same ids, so a message keeps its identity.
            format!(
                "INSERT INTO {t} (id, key, value, headers, created_at, attempts, available_at, state, last_error)
                 SELECT id, k, v, h::text[], c, a, clock_timestamp() + d * interval '1 millisecond', s, e
                 FROM unnest($1::int8[], $2::text[], $3::bytea[], $4::text[], $5::timestamptz[],
                             $6::int4[], $7::int8[], $8::text[], $9::text[]) AS u(id, k, v, h, c, a, d, s, e)"
            )
        };
        // Relay, after the claim transaction was lost (the send outlived the timeout, or the
        // connection dropped): the rows are back as they were. Record the ones the Sender did
        // send, unless another relay has claimed them since (SKIP LOCKED: never wait for a
        // relay that may itself be slow; the lost claim is then charged to those messages).
        let late_mark_sent = if keep {
            format!(
                "UPDATE {t} SET state = 'sent', sent_at = now()
                 WHERE state = 'pending' AND id IN (
                    SELECT id FROM {t} WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            )
        } else {
            format!(
                "DELETE FROM {t} WHERE state = 'pending' AND id IN (
                    SELECT id FROM {t} WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            )
        };
        let (repair, original) = (REPAIR, ORIGINAL);
        ClaimSql {
            table: t.clone(),
            keep,
            journal: journal.clone(),
            charges: charges.clone(),
            return_failed,
            // Late settlement (the claim transaction was lost): takes the claim's journal
            // row. It is there exactly when the claim was neither settled (the settlement
            // deletes it) nor recovered by someone else: that is what keeps an outcome from
            // being applied twice, or on top of a recovery's charge.
            // Records, before the Sender runs, which messages a claim hands to it: one row,
            // committed on its own (on the relay's second connection) so that it survives
            // the claim transaction. UNLOGGED: its commit needs no WAL flush; a server crash
            // empties it, which is not a poison message. A single autocommit INSERT, prepared
            // (one round trip, nothing parsed), without the explicit BEGIN of the other
            // transactions: it reads nothing, so no isolation level changes what it does,
            // and no serializable transaction can conflict with it.
            //
            // The ids travel as a multirange (`{[1,101),[105,106)}`): a batch claimed from
            // the pending index is mostly runs of consecutive ids, so the row stays a few
            // bytes where an array of 1,000 ids (8 kB) is TOASTed, measured at 0.59 ms per
            // batch of 1,000 against 0.02 ms for 100.
            //
            // Only while the claim is provably held: the row goes in only if the claim's
            // advisory lock is taken (by its transaction). A claim the server has already
            // ended (send timeout, lost connection) records nothing, and its batch is given
            // back instead of reaching a Sender while another relay may claim and send the
            // same rows. Trying the lock costs one lock-table probe; when it succeeds (the
            // claim is gone) it is released with this statement's own transaction.
            journal_insert: format!(
                "INSERT INTO {journal} (claim_id, ids)
                 SELECT $1, $2::text::int8multirange
                 WHERE NOT pg_try_advisory_xact_lock({CLAIM_LOCK_CLASS}, $1)"
            ),
            // A claim given back before its Sender ran: its journal row goes first (while
            // the claim still holds its lock, so no recovery can charge it meanwhile), then
            // the claim rolls back. Nothing is charged for a claim no Sender saw. If the
            // server had already ended the claim (its worker stalled past the send timeout
            // before the Sender) and a recovery charged it, the charges not yet counted
            // into a message's attempts are taken back too.
            journal_forget: format!(
                "WITH j AS (DELETE FROM {journal} WHERE claim_id = $1 RETURNING 1)
                 DELETE FROM {charges} WHERE claim_id = $1 AND NOT EXISTS (SELECT 1 FROM j)"
            ),
            journal_take: format!(
                "DELETE FROM {journal} WHERE claim_id = $1
                 RETURNING ARRAY(SELECT generate_series(lower(r), upper(r) - 1) FROM unnest(ids) AS r)"
            ),
            late_mark_sent,
            // Late settlement with per-key ordering: of the lost claim's messages, those whose
            // key's head it can lock (SKIP LOCKED) now, in this transaction. A key whose head
            // another claim holds is that claim's: a late update of one of its followers
            // would change the row under that claim's final DELETE (by tuple id), which then
            // skips it and sends the followers after it out of order. Those messages are
            // charged instead; the locked heads keep new claims off the keys meanwhile.
            late_free_keys: format!(
                "WITH heads AS (
                    SELECT h.key FROM {t} AS h
                    WHERE h.key COLLATE \"C\" IN (SELECT key COLLATE \"C\" FROM {t} WHERE id = ANY($1))
                      AND h.state = 'pending' AND {head}
                    FOR UPDATE OF h SKIP LOCKED)
                 SELECT m.id FROM {t} AS m
                 WHERE m.id = ANY($1) AND m.key COLLATE \"C\" IN (SELECT key COLLATE \"C\" FROM heads)",
                head = is_head("h", &t),
            ),
            // Late settlement: the messages it could not settle (another relay holds them
            // now) are charged for the lost claim, like a recovery would.
            charges_add: format!(
                "INSERT INTO {charges} (msg_id, claim_id) SELECT unnest($1::int8[]), $2"
            ),
            charges_forget: format!("DELETE FROM {charges} WHERE msg_id = ANY($1)"),
            // Recovery: journal rows of claims whose transaction has ended (its advisory lock
            // is free) without deleting them, that is without a settlement, become charges,
            // one per message. A claim still running holds its lock; a claim that committed
            // meanwhile has deleted its row, which the DELETE then finds gone and skips.
            // Concurrent recoveries: the lock taken by one makes the other skip the row.
            //
            // Marker rows (negative ids, see `store::vigil`) are relays' announcements, not
            // claims: left for every relay's recovery to read, which returns them, and
            // removed once they are `MARKER_LIFETIME` old. The statement returns the number
            // of charges it added and the markers in the journal.
            recover: format!(
                "WITH gone AS (
                    DELETE FROM {journal}
                    WHERE claim_id > 0 AND pg_try_advisory_xact_lock({CLAIM_LOCK_CLASS}, claim_id)
                    RETURNING claim_id, ids),
                 expired AS (
                    DELETE FROM {journal}
                    WHERE claim_id < 0 AND claimed_at < now() - interval '{marker_lifetime} seconds'),
                 charged AS (
                    INSERT INTO {charges} (msg_id, claim_id)
                    SELECT generate_series(lower(r), upper(r) - 1), claim_id
                    FROM gone, unnest(ids) AS r
                    RETURNING 1)
                 SELECT (SELECT count(*) FROM charged),
                        ARRAY(SELECT claim_id FROM {journal} WHERE claim_id < 0)",
                marker_lifetime = crate::store::vigil::MARKER_LIFETIME.as_secs(),
            ),
            journal_marker: format!(
                "INSERT INTO {journal} (claim_id, ids) VALUES ($1, '{{}}')
                 ON CONFLICT (claim_id) DO NOTHING"
            ),
            // Charges whose message no longer waits (sent, dead, or gone): left when a late
            // outcome or an operator settled the message. A claim in progress still has its
            // rows pending in the committed state, so its charges are never taken.
            charges_cleanup: format!(
                "DELETE FROM {charges} c WHERE NOT EXISTS (
                    SELECT 1 FROM {t} m WHERE m.id = c.msg_id AND m.state = 'pending')"
            ),
            // A row the relay cannot decode: dead with the reason, never claimed again
            // automatically, its charges gone with it. SKIP LOCKED: another relay holding
            // it is doing the same.
            // A row the relay cannot decode: dead with the reason, never claimed again
            // automatically, its charges gone with it. SKIP LOCKED: another relay holding
            // it is doing the same. A row from before migration 2 may break its CHECK, which
            // PostgreSQL applies to every UPDATE even when NOT VALID: such a row gets a
            // finite created_at and empty headers, and its original values go into
            // last_error, so that it can be set aside at all.
            set_aside: format!(
                "WITH d AS (
                    UPDATE {t} SET state = 'dead', available_at = now(),
                        {repair}, last_error = $2 || {original}
                    WHERE state = 'pending' AND id IN (
                        SELECT id FROM {t} WHERE id = $1 FOR UPDATE SKIP LOCKED)
                    RETURNING id),
                 c AS (DELETE FROM {charges} WHERE msg_id IN (SELECT id FROM d))
                 SELECT count(*) FROM d"
            ),
            // Keep mode claims by UPDATE, which the CHECK refuses for such a row: when a
            // claim fails with check_violation, every pending row that breaks the CHECK is
            // set aside this way, in one statement (a scan, on this rare path only).
            set_aside_unchecked: format!(
                "UPDATE {t} SET state = 'dead', available_at = now(),
                    {repair}, last_error = 'row breaks the table''s CHECK, set aside' || {original}
                 WHERE state = 'pending' AND NOT ({ROW_OK})
                   AND id IN (SELECT id FROM {t} WHERE state = 'pending' AND NOT ({ROW_OK})
                              FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            ),
            // Same situation, for the failed ones: the failure counts one attempt ($5: 1, or
            // 0 for a message returned uncharged, the followers of a failed message with
            // per-key ordering), plus the charges the message had; a charged failure is dead
            // once its attempts pass max_retries ($4).
            //
            // Only to a row still as the lost claim read it: pending, not locked, and with
            // the attempts it had then ($6). A row another relay claimed and settled since
            // (a retry that re-inserted or updated it) has more attempts: its backoff and
            // error are that relay's, and are not overwritten (the lost claim is charged to
            // it instead, by the caller). The charges counted are exactly those this
            // statement deletes (one snapshot), so a charge another late settlement adds
            // meanwhile is neither counted nor lost.
            late_record_failed: format!(
                "WITH u AS (
                    SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $5::int4[], $6::int4[])
                        AS u(id, d, e, i, a)),
                 locked AS MATERIALIZED (
                    SELECT m.id FROM {t} m JOIN u ON u.id = m.id
                    WHERE m.id = ANY($1) AND m.state = 'pending' AND m.attempts = u.a
                    FOR UPDATE OF m SKIP LOCKED),
                 gone AS (
                    DELETE FROM {charges} c WHERE c.msg_id IN (SELECT id FROM locked)
                    RETURNING c.msg_id),
                 n AS (SELECT msg_id, count(*)::int AS k FROM gone GROUP BY msg_id)
                 UPDATE {t} AS m
                 SET attempts = m.attempts + u.i + coalesce(n.k, 0),
                     available_at = clock_timestamp() + u.d * interval '1 millisecond',
                     state = CASE WHEN u.i > 0 AND m.attempts + u.i + coalesce(n.k, 0) > $4
                                  THEN 'dead' ELSE 'pending' END,
                     last_error = u.e
                 FROM u LEFT JOIN n ON n.msg_id = u.id
                 WHERE m.id = u.id AND m.id IN (SELECT id FROM locked)
                 RETURNING m.id, m.state",
            ),
        }
    }
}

impl ClaimSql {
    /// Ends a claim's journal entry, in the claim transaction, in the same round trip as its
    /// COMMIT: a settled claim leaves no journal row. `charged` are the claimed messages that
    /// had charges, with the abandoned claims they were charged for, now accounted for in
    /// their attempts; exactly those charges go (one recorded since stays for the next
    /// claim). Only messages claimed alone have charges, so this is at most one statement.
    /// `None` for a claim that was not journaled (see `store::vigil`): then only the charges,
    /// if any, go, and nothing at all is added to the COMMIT's round trip when there are none.
    pub(crate) fn journal_settled(
        &self,
        claim_id: Option<i32>,
        charged: &[(i64, Vec<i32>)],
    ) -> String {
        let mut out = match claim_id {
            Some(id) => format!("DELETE FROM {} WHERE claim_id = {id}; ", self.journal),
            None => String::new(),
        };
        for (msg_id, claims) in charged {
            let list: Vec<String> = claims.iter().map(i32::to_string).collect();
            out.push_str(&format!(
                "DELETE FROM {} WHERE msg_id = {msg_id} AND claim_id = ANY('{{{}}}'::int4[]); ",
                self.charges,
                list.join(",")
            ));
        }
        out
    }

    /// The claim statement: for [`ClaimKind::Head`] and [`ClaimKind::AfterMark`], batches of
    /// `limit` messages, the latter only rows past the position `($1 available_at, $2 id)`;
    /// for [`ClaimKind::One`], the single message `$1`, if it is due and not held. Returns the
    /// message columns, `available_at` (the position of each claimed row), and the ids of the
    /// earlier claims of the message that ended without a settlement and are not charged yet
    /// (NULL when none).
    ///
    /// The limit is written into the text (it is the outbox's batch size, an integer the crate
    /// validated) rather than passed as `$1`: with a parameter, PostgreSQL re-plans the claim
    /// at every execution, and planning costs as much as the claim itself once claimed rows
    /// pile up at the head of the index.
    ///
    /// The due rows come from the pending index in order; SKIP LOCKED passes over rows another
    /// relay holds, so concurrent relays never wait for, nor claim, each other's rows. The
    /// position is only a hint to skip the index entries of rows this relay just claimed while
    /// it drains a backlog; the relay claims from the head again as soon as a batch is not
    /// full, and at least once a second, so a row that committed behind the position is never
    /// left behind.
    ///
    /// The count of charges is how every claim is accounted for. A claim records its message
    /// ids in the journal (one row, committed on a second connection) before the Sender runs,
    /// and deletes that row in the transaction that settles them. A journal row whose claim
    /// transaction has ended is therefore a claim that ended without a settlement (killed
    /// process, lost connection, send timeout); recovery turns it into one charge per
    /// message, and each charge is an attempt the message has not paid yet. The charges table
    /// is empty unless claims were abandoned: one index probe per claimed row, of an empty
    /// index.
    ///
    /// With `max_bytes`, the rows are cut to those that fit in it, in id order (see
    /// [`ClaimSql::bounded`]).
    pub(crate) fn claim(
        &self,
        limit: usize,
        kind: ClaimKind,
        ordered: bool,
        max_bytes: Option<u64>,
    ) -> String {
        if ordered && kind != ClaimKind::One {
            return self.claim_ordered(limit, kind, max_bytes);
        }
        let t = &self.table;
        let due = match kind {
            ClaimKind::Head | ClaimKind::AfterMark => {
                let mark = if kind == ClaimKind::AfterMark {
                    "AND (available_at, id) > ($1::timestamptz, $2::int8)"
                } else {
                    ""
                };
                format!(
                    "state = 'pending' AND available_at <= now() {mark}
                    ORDER BY available_at, id
                    LIMIT {limit}
                    FOR UPDATE SKIP LOCKED"
                )
            }
            // Ordered mode claims a message alone only if it is the head of its key.
            ClaimKind::One => format!(
                "id = $1 AND state = 'pending' AND available_at <= now() {head}
                    FOR UPDATE SKIP LOCKED",
                head = if ordered {
                    format!("AND {}", is_head("q", t))
                } else {
                    String::new()
                }
            ),
        };
        let cols = if self.keep { "id, created_at" } else { "id" };
        let picked = match max_bytes {
            // The size of each row, read by the scan that locks it.
            Some(_) => format!(
                "SELECT {cols}, {size} AS size FROM {t} AS q WHERE {due}",
                size = ClaimSql::row_size("q")
            ),
            None => format!("SELECT {cols} FROM {t} AS q WHERE {due}"),
        };
        self.claim_rows(&self.bounded(&picked, cols, max_bytes), max_bytes.is_some())
    }

    /// A row's size for [`ClaimSql::bounded`]: its value's length (from the TOAST header:
    /// nothing is decompressed) plus its headers' stored size.
    fn row_size(alias: &str) -> String {
        format!("octet_length({alias}.value)::int8 + coalesce(pg_column_size({alias}.headers), 0)")
    }

    /// The rows `picked` (locked; columns `cols`, `id` first, then `size`, see
    /// [`ClaimSql::row_size`]) that fit in `max_bytes`: in id order, the rows up to the bound, or
    /// the first alone when it is larger than the bound (it must go some time). Id order
    /// keeps per-key ordering whole: the rows of one key are cut to a prefix. The rows past
    /// the bound stay locked until the claim transaction ends, untouched, and go to the
    /// next claim.
    ///
    /// Two branches behind one-time filters on the batch's total: when it fits (nearly
    /// always), the rows go as they are; only a batch over the bound pays for the sort and
    /// the window that cut it (measured: sorting and windowing every claim of 100 cost a
    /// third of the drain rate).
    fn bounded(&self, picked: &str, cols: &str, max_bytes: Option<u64>) -> String {
        let Some(max) = max_bytes else {
            return picked.to_owned();
        };
        format!(
            "WITH p AS MATERIALIZED ({picked}),
                  total AS MATERIALIZED (SELECT coalesce(sum(size), 0) AS bytes FROM p)
             SELECT {cols} FROM p WHERE (SELECT bytes FROM total) <= {max}
             UNION ALL
             SELECT {cols} FROM (
                SELECT p.*, sum(p.size) OVER w AS upto, row_number() OVER w AS n
                FROM p WINDOW w AS (ORDER BY p.id)) AS b
             WHERE (SELECT bytes FROM total) > {max} AND (b.upto <= {max} OR b.n = 1)"
        )
    }

    /// The statement that takes the rows `picked` (a SELECT of their ids, and their
    /// `created_at` in keep mode) and returns them with their position and charges.
    ///
    /// In delete mode a `bounded` pick (see [`ClaimSql::bounded`]) is read into an array first:
    /// as a subquery joined to the table, the planner would rather walk the table's whole
    /// pending index than trust its row estimate of the pick. In keep mode the pick is
    /// joined on the primary key `(id, created_at)`, one probe per picked row; an array of
    /// the ids on top (as delete mode) made the planner materialize the array's matches and
    /// compare every pair: 999,000 comparisons and 81-88 ms per claim of 1,000 (0.17× the
    /// raw UPDATE), against 9-11 ms for the probes (issue 23).
    fn claim_rows(&self, picked: &str, bounded: bool) -> String {
        let t = &self.table;
        let charged = self.charged();
        if self.keep {
            // Keep mode: mark the rows sent inside the still-open claim transaction; the
            // failed ones are put back to pending before the COMMIT. The join on
            // (id, created_at) finds each row in its own partition.
            format!(
                "WITH c AS MATERIALIZED ({picked})
                 UPDATE {t} AS m SET state = 'sent', sent_at = now()
                 FROM c WHERE m.id = c.id AND m.created_at = c.created_at AND {only}
                 RETURNING m.id, m.key, m.value, m.headers, m.created_at, m.attempts, m.available_at,
                           {charged}",
                // `IS TRUE`: a predicate the pending index cannot be matched to, so the
                // rows are found by the primary key, not by walking that index.
                only = if bounded {
                    "(m.state = 'pending') IS TRUE"
                } else {
                    "m.state = 'pending'"
                }
            )
        } else {
            // Delete mode: delete the rows inside the still-open claim transaction. If it
            // rolls back (crash, lost connection, timeout) they reappear exactly as they were.
            // (`IS TRUE`: a predicate the pending index's cannot be matched to, so the
            // array's ids are looked up in the primary key, not by walking that index.)
            let rows = if bounded {
                format!(
                    "m.id = ANY (ARRAY(SELECT id FROM ({picked}) AS k)) AND (m.state = 'pending') IS TRUE"
                )
            } else {
                format!("m.id IN ({picked}) AND m.state = 'pending'")
            };
            format!(
                "DELETE FROM {t} AS m WHERE {rows}
                 RETURNING {MESSAGE_COLUMNS}, available_at,
                           {charged}"
            )
        }
    }

    /// The claimed row `m`'s abandoned claims not charged yet (NULL when none). The charges
    /// table is empty unless claims were abandoned: an uncorrelated EXISTS (evaluated once
    /// per claim) spares every row its own index probe then.
    fn charged(&self) -> String {
        format!(
            "CASE WHEN EXISTS (SELECT 1 FROM {charges}) \
             THEN (SELECT array_agg(c.claim_id) FROM {charges} c WHERE c.msg_id = m.id) END",
            charges = self.charges
        )
    }

    /// The ordered claim (per-key ordering): the heads of keys, then runs of their followers.
    ///
    /// 1. `window_heads`: among the first `limit` due rows of the pending index (after the
    ///    session's position with [`ClaimKind::AfterMark`]), those that are the head of
    ///    their key ([`is_head`]: one probe of the key index), locked `FOR UPDATE SKIP
    ///    LOCKED`, oldest first. With many keys this fills the batch at the cost of the
    ///    unordered claim plus a probe per row. (Measured alternatives: a window of four
    ///    batches, or probing only each key's first row in the window, cost more with many
    ///    keys than they saved with few; see BENCHMARKS.md.)
    /// 2. `run`: when the heads leave room, for each of them its followers in id order (the
    ///    key index), up to its share of the room left in the batch (rounded up), cut at the
    ///    first one that is not due. Nobody else can hold them: their head is locked by this
    ///    claim. (The room test is a one-time filter: a batch of heads skips the step.)
    /// 3. `walked_heads`, only when the batch still has room: the keys with pending
    ///    messages in key order, each with its head, by a loose index scan (one descent of
    ///    the key index per key), the due ones locked, one message per key. This is what
    ///    keeps a window full of non-heads from starving other keys: the followers of a key
    ///    whose head waits out a backoff cost one descent, not a read of the backlog.
    /// 4. The heads first, then the followers round-robin across keys (every key's first
    ///    follower, then every key's second...), up to `limit` in all.
    ///
    /// A key another relay holds is invisible: that relay holds its head, which every
    /// snapshot still sees pending (so no later message of the key is a head), and which
    /// SKIP LOCKED passes over. A head that failed waits out its backoff, and its key with
    /// it; a dead or skipped head is not pending, and the next message is the head.
    ///
    /// Rows found by one step are found again by the next by tuple id, a TID scan (by
    /// primary key in keep mode, whose tuple ids are per partition); the rows are locked,
    /// or read in this statement's snapshot, so a row updated meanwhile fails the recheck
    /// and is left alone. The state tests of the locking steps are written `IS TRUE` so
    /// that they do not match the partial indexes' predicate: a planner without statistics
    /// otherwise joins to a scan of the pending index.
    fn claim_ordered(&self, limit: usize, kind: ClaimKind, max_bytes: Option<u64>) -> String {
        let t = &self.table;
        let mark = if kind == ClaimKind::AfterMark {
            "AND (x.available_at, x.id) > ($1::timestamptz, $2::int8)"
        } else {
            ""
        };
        let window = limit;
        let (row, join, found) = if self.keep {
            (
                "x.id, x.created_at",
                "m.id = k.id AND m.created_at = k.created_at",
                "m.id, m.created_at",
            )
        } else {
            (
                "x.id, x.ctid AS tid",
                "m.ctid = k.tid",
                "m.id, m.ctid AS tid",
            )
        };
        let carried = if self.keep { ", created_at" } else { ", tid" };
        // With a bound on the batch's bytes, each row's size is read by the step that finds
        // it (the row is at hand there), not by a primary-key probe per row afterwards: that
        // probe was 0.11 of the 0.71 ms of a claim of 100 (auto_explain, 10,000 keys).
        let sized = max_bytes.is_some();
        let (size_m, size_x, size_h, size_y, size) = if sized {
            (
                format!(", {} AS size", ClaimSql::row_size("m")),
                format!(", {} AS size", ClaimSql::row_size("x")),
                ", h.size",
                ", y.size",
                ", size",
            )
        } else {
            (String::new(), String::new(), "", "", "")
        };
        let picked = format!(
            "WITH RECURSIVE window_heads AS MATERIALIZED (
                SELECT m.key, {found}{size_m} FROM (
                    SELECT {row} FROM {t} AS x
                    WHERE x.state = 'pending' AND x.available_at <= now() {mark}
                    ORDER BY x.available_at, x.id LIMIT {window}) AS k
                JOIN {t} AS m ON {join}
                WHERE (m.state = 'pending') IS TRUE AND m.available_at <= now() AND {head}
                LIMIT {limit}
                FOR UPDATE OF m SKIP LOCKED),
             run AS MATERIALIZED (
                SELECT h.id{h_carried}{size_h}, 0::int8 AS n FROM window_heads AS h
                UNION ALL
                SELECT y.id{y_carried}{size_y}, y.n FROM window_heads AS h CROSS JOIN LATERAL (
                    SELECT x.*, row_number() OVER w AS n,
                           bool_and(x.available_at <= now()) OVER w AS due
                    FROM (SELECT {row}, x.available_at{size_x} FROM {t} AS x
                          WHERE x.key COLLATE \"C\" = h.key AND x.state = 'pending' AND x.id > h.id
                          ORDER BY x.id
                          LIMIT (SELECT ({limit} - count(*) + greatest(count(*), 1) - 1)
                                            / greatest(count(*), 1) FROM window_heads)) AS x
                    WINDOW w AS (ORDER BY x.id)) AS y
                WHERE y.due AND (SELECT count(*) FROM window_heads) < {limit}),
             keys AS (
                (SELECT x.key, {row} FROM {t} AS x
                 WHERE x.state = 'pending'
                 ORDER BY x.key COLLATE \"C\", x.id LIMIT 1)
                UNION ALL
                SELECT n.* FROM keys AS k CROSS JOIN LATERAL (
                    SELECT x.key, {row} FROM {t} AS x
                    WHERE x.state = 'pending' AND x.key COLLATE \"C\" > k.key
                    ORDER BY x.key COLLATE \"C\", x.id LIMIT 1) AS n),
             walked_heads AS MATERIALIZED (
                SELECT {found}{size_m} FROM keys AS k JOIN {t} AS m ON {join}
                WHERE (m.state = 'pending') IS TRUE AND m.available_at <= now()
                  AND m.id NOT IN (SELECT id FROM window_heads)
                LIMIT (SELECT greatest({limit} - count(*), 0) FROM run)
                FOR UPDATE OF m SKIP LOCKED)
             SELECT id{carried}{size} FROM (
                SELECT id{carried}{size}, n FROM run
                UNION ALL
                SELECT id{carried}{size}, 0 FROM walked_heads) AS a
             ORDER BY n, id LIMIT {limit}",
            head = is_head("m", t),
            h_carried = carried.replace(", ", ", h."),
            y_carried = carried.replace(", ", ", y."),
        );
        let picked = match max_bytes {
            Some(_) => self.bounded(&picked, &format!("id{carried}"), max_bytes),
            None => picked,
        };
        if self.keep {
            self.claim_rows(&picked, max_bytes.is_some())
        } else {
            format!(
                "DELETE FROM {t} AS m
                 WHERE m.ctid = ANY (ARRAY(SELECT tid FROM ({picked}) AS p)) AND m.state = 'pending'
                 RETURNING {MESSAGE_COLUMNS}, available_at, {charged}",
                charged = self.charged()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multirange_literals_collapse_runs() {
        assert_eq!(int8_multirange(&[]), "{}");
        assert_eq!(int8_multirange(&[5, 3, 4, 9, 1]), "{[1,2),[3,6),[9,10)}");
        assert_eq!(int8_multirange(&[7, 7]), "{[7,8)}");
    }
}
