//! The claim protocol's PostgreSQL primitives (the policy is in `store::protocol`): a
//! worker's claim transaction, and the relay's second connection, shared by its workers, for
//! the claim journal, recoveries, rows set aside and late settlements.
//!
//! How PostgreSQL gives the protocol what it needs:
//! - the claim transaction takes a transaction-scoped advisory lock on its claim id
//!   (`sql::begin_claim`): while it runs, the lock is held, so a journal row whose lock is
//!   free belongs to a claim that ended without a settlement (`Sql::recover`);
//! - a claim is one `DELETE` (keep mode: `UPDATE`) of rows picked `FOR UPDATE SKIP LOCKED`,
//!   in `READ COMMITTED`, under planner settings that make its plan independent of
//!   statistics; the server ends the transaction at the send timeout
//!   (`idle_in_transaction_session_timeout`);
//! - the journal and the charges are UNLOGGED tables; the journal's INSERT succeeds only
//!   while the claim's lock is held, which proves the claim alive before its Sender.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender as ChannelSender;
use postgres::types::{ToSql, Type};
use postgres::{Client, Statement};
use r2d2::PooledConnection;
use r2d2_postgres::PostgresConnectionManager;
use time::OffsetDateTime;

use super::decode;
use super::listener::Listener;
use super::sql::{self, ClaimKind, Sql};
use super::{MakeTls, PgStore};
use crate::config::ErrorHandler;
use crate::store::protocol::{
    attempts_i32, millis, ClaimBackend, ClaimConnection, ClaimSpec, ClaimedRow, LateFailed,
    LateSettlement, Recovered, Take, WakeUps,
};
use crate::store::side::{SideConn, SideConnection};
use crate::store::Returned;
use crate::Error;

/// The PostgreSQL primitives of the claim protocol for one relay: its store, its statements,
/// and the second connection its workers share.
pub(crate) struct PgClaims<T: MakeTls> {
    store: PgStore<T>,
    sql: Arc<Sql>,
    side: SideConnection<Side<T>>,
}

impl<T: MakeTls> PgClaims<T> {
    /// The primitives of a relay on `store`; a use of the second connection that has not
    /// returned after `stuck_after` is given up on (see [`SideConnection`]).
    pub(crate) fn new(store: PgStore<T>, sql: Arc<Sql>, stuck_after: Duration) -> PgClaims<T> {
        let (connect_store, connect_sql) = (store.clone(), sql.clone());
        let map_store = store.clone();
        let side = SideConnection::new(
            Box::new(move |context| {
                let mut client = connect_store.relay_connection(context)?;
                let record = client
                    .prepare_typed(
                        &connect_sql.claims.journal_insert,
                        &[Type::INT4, Type::TEXT],
                    )
                    .map_err(connect_store.db_error(context))?;
                Ok(Side { client, record })
            }),
            Box::new(move |context, e| map_store.db_error(context)(e)),
            // Half the workers' bound: a worker waiting here gives up on a stuck user of
            // the slot, and carries on, well before the watchdog would give up on it.
            stuck_after / 2,
        );
        PgClaims { store, sql, side }
    }

    /// Records claim `claim_id` of `ids` in the journal: the prepared INSERT, one round trip.
    /// False when the claim's transaction has already ended (its advisory lock is free):
    /// nothing was recorded, and the batch must not reach a Sender.
    fn record(&self, claim_id: i32, ids: &[i64]) -> Result<bool, Error> {
        let ranges = sql::int8_multirange(ids);
        self.side
            .run("recording a claim in the claim journal", |side| {
                side.client
                    .execute(&side.record, &[&claim_id, &ranges])
                    .map(|n| n == 1)
            })
    }

    /// Runs `f` on the second connection's client.
    fn run<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut Client) -> Result<R, postgres::Error>,
    ) -> Result<R, Error> {
        self.side.run(context, |side| f(&mut side.client))
    }
}

type Pooled<T> = PooledConnection<PostgresConnectionManager<T>>;

/// The second connection, with the journal's INSERT prepared on it.
struct Side<T: MakeTls> {
    client: Pooled<T>,
    record: Statement,
}

impl<T: MakeTls> SideConn for Side<T> {
    type NativeError = postgres::Error;

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn rollback(&mut self) -> bool {
        self.client.batch_execute(sql::ROLLBACK).is_ok()
    }

    fn probe(mut self) {
        let _ = self.client.simple_query("");
    }
}

impl<T: MakeTls> ClaimBackend for PgClaims<T> {
    type Conn = PgClaimConn<T>;
    type NativeError = postgres::Error;
    type Late<'a> = PgLate<'a>;

    fn connect(&self, spec: &ClaimSpec) -> Result<PgClaimConn<T>, Error> {
        let mut client = self.store.relay_connection("opening a relay session")?;
        let map = self.store.db_error("preparing the claim statements");
        let claims = &self.sql.claims;
        let (limit, ordered, max_bytes) = (spec.limit, spec.ordered, spec.max_bytes);
        let prepared = (|| {
            let claim_head =
                client.prepare(&claims.claim(limit, ClaimKind::Head, ordered, max_bytes))?;
            let claim_after = client.prepare_typed(
                &claims.claim(limit, ClaimKind::AfterMark, ordered, max_bytes),
                &[Type::TIMESTAMPTZ, Type::INT8],
            )?;
            let claim_one = client.prepare_typed(
                &claims.claim(1, ClaimKind::One, ordered, None),
                &[Type::INT8],
            )?;
            Ok((claim_head, claim_after, claim_one))
        })();
        let (claim_head, claim_after, claim_one) = prepared.map_err(map)?;
        let timeout_ms = spec.send_timeout.as_millis().max(1);
        Ok(PgClaimConn {
            store: self.store.clone(),
            sql: self.sql.clone(),
            client,
            claim_head,
            claim_after,
            claim_one,
            timeout_ms: u64::try_from(timeout_ms).unwrap_or(u64::MAX),
            keep: self.store.retention_config().keep.is_some(),
        })
    }

    fn check(&self, conn: &mut PgClaimConn<T>, ordered: bool) -> Result<Arc<str>, Error> {
        self.store.check_table_kind(&mut *conn.client)?;
        self.store.check_ordering(&mut *conn.client, ordered)?;
        self.store.outbox_id(&mut *conn.client)
    }

    fn breaks_row_check(&self, error: &Error) -> bool {
        matches!(error, Error::Database { error, .. }
            if error.code() == Some(&postgres::error::SqlState::CHECK_VIOLATION))
    }

    fn journal_record(&self, claim_id: i32, ids: &[i64]) -> Result<bool, Error> {
        self.record(claim_id, ids)
    }

    fn journal_forget(&self, claim_id: i32) -> Result<(), Error> {
        let statement = self.sql.claims.journal_forget.clone();
        self.run("forgetting a claim given back before its Sender", |c| {
            c.execute(&statement, &[&claim_id]).map(|_| ())
        })
    }

    fn recover(&self, marker: Option<i32>, cleanup: bool) -> Result<Recovered, Error> {
        let sql = &self.sql;
        self.run("charging abandoned claims", |c| {
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
            Ok(Recovered { charged, markers })
        })
    }

    fn set_aside(&self, id: i64, reason: &str) -> Result<u64, Error> {
        let statement = &self.sql.claims.set_aside;
        self.run("setting an undecodable message aside", |c| {
            c.batch_execute(sql::BEGIN_SIDE)?;
            let n: i64 = c.query_one(statement, &[&id, &reason])?.try_get(0)?;
            c.batch_execute(sql::COMMIT)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn set_aside_unchecked(&self) -> Result<Vec<i64>, Error> {
        let statement = &self.sql.claims.set_aside_unchecked;
        self.run("setting aside rows that break the CHECK", |c| {
            c.batch_execute(sql::BEGIN_SIDE)?;
            let ids = c
                .query(statement, &[])?
                .iter()
                .map(|row| row.try_get::<_, i64>(0))
                .collect::<Result<Vec<i64>, _>>()?;
            c.batch_execute(sql::COMMIT)?;
            Ok(ids)
        })
    }

    fn late_settlement<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut PgLate<'_>) -> Result<R, postgres::Error>,
    ) -> Result<R, Error> {
        self.run(context, |c| {
            c.batch_execute(sql::BEGIN_SIDE)?;
            let result = f(&mut PgLate {
                client: c,
                sql: &self.sql,
            })?;
            c.batch_execute(sql::COMMIT)?;
            Ok(result)
        })
    }

    fn reset_shared(&self) {
        self.side.reset();
    }

    fn wake_ups(&self, wake: ChannelSender<()>, errors: ErrorHandler) -> Option<WakeUps> {
        let store = self.store.clone();
        let channel_query = self.sql.produce.notify_channel.clone();
        Some(Box::new(move |stop, done| {
            let listener = Listener {
                store,
                channel_query,
                wake,
                stop,
                error_handler: errors,
                _done: done,
            };
            Box::new(move || listener.run())
        }))
    }
}

/// One relay worker's connection, with the claim statements prepared on it.
pub(crate) struct PgClaimConn<T: MakeTls> {
    store: PgStore<T>,
    sql: Arc<Sql>,
    client: Pooled<T>,
    /// Claims from the head of the pending index.
    claim_head: Statement,
    /// Claims past the session's position (see [`ClaimSql::claim`](sql::ClaimSql::claim)).
    claim_after: Statement,
    /// Claims one given message.
    claim_one: Statement,
    /// The send timeout in milliseconds, as the claim transaction's bounds.
    timeout_ms: u64,
    /// The table keeps sent messages (the claim marks them sent instead of deleting them).
    keep: bool,
}

impl<T: MakeTls> ClaimConnection for PgClaimConn<T> {
    fn begin(&mut self, claim_id: i32) -> Result<(), Error> {
        self.client
            .batch_execute(&sql::begin_claim(self.timeout_ms, claim_id))
            .map_err(self.store.db_error("opening a claim transaction"))
    }

    fn claim(&mut self, take: Take, outbox: &Arc<str>) -> Result<Vec<ClaimedRow>, Error> {
        let rows = match take {
            Take::One(id) => self.client.query(&self.claim_one, &[&id]),
            Take::After((at, id)) => self.client.query(&self.claim_after, &[&at, &id]),
            Take::Head => self.client.query(&self.claim_head, &[]),
        };
        let rows = rows.map_err(self.store.db_error("claiming a batch"))?;
        Ok(rows.iter().map(|row| claimed_row(row, outbox)).collect())
    }

    fn return_failed(&mut self, returned: &[Returned]) -> Result<(), Error> {
        return_failed(&mut self.client, &self.sql, returned, self.keep)
            .map_err(self.store.db_error("settling a batch"))
    }

    fn commit(
        &mut self,
        journaled: Option<i32>,
        charged: &[(i64, Vec<i32>)],
        next: Option<i32>,
    ) -> Result<(), Error> {
        let forget = self.sql.claims.journal_settled(journaled, charged);
        let end = match next {
            Some(claim_id) => format!(
                "{forget}{}; {}",
                sql::COMMIT,
                sql::begin_claim(self.timeout_ms, claim_id)
            ),
            None => format!("{forget}{}", sql::COMMIT),
        };
        self.client
            .batch_execute(&end)
            .map_err(self.store.db_error("settling a batch"))
    }

    fn end_empty(&mut self) -> Result<(), Error> {
        self.client
            .batch_execute(sql::COMMIT)
            .map_err(self.store.db_error("ending an empty claim"))
    }

    fn rollback(&mut self, in_transaction: bool) -> bool {
        let rolled_back = in_transaction
            && !self.client.is_closed()
            && self.client.batch_execute(sql::ROLLBACK).is_ok();
        !(self.client.is_closed() || (in_transaction && !rolled_back))
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// A claimed row (the message columns, `available_at`, the charges), read fallibly: a row
/// is outside input.
fn claimed_row(row: &postgres::Row, outbox: &Arc<str>) -> ClaimedRow {
    let charges = decode::column::<Option<Vec<i32>>>(row, 7, "charges");
    let decoded = match (decode::message(row, outbox), charges) {
        (Ok(message), Ok(charges)) => Ok((message, charges.unwrap_or_default())),
        (Err(why), _) | (_, Err(why)) => Err(why),
    };
    ClaimedRow {
        // The id is the primary key: NOT NULL bigint, always readable.
        id: row.try_get::<_, i64>(0).ok(),
        position: row
            .try_get::<_, OffsetDateTime>(6)
            .ok()
            .zip(row.try_get::<_, i64>(0).ok()),
        decoded,
    }
}

/// A late settlement's statements, on the second connection inside its transaction.
pub(crate) struct PgLate<'a> {
    client: &'a mut Client,
    sql: &'a Sql,
}

impl LateSettlement for PgLate<'_> {
    type Error = postgres::Error;

    fn take_journal(&mut self, claim_id: i32) -> Result<Option<Vec<i64>>, postgres::Error> {
        match self
            .client
            .query_opt(&self.sql.claims.journal_take, &[&claim_id])?
        {
            Some(row) => Ok(Some(row.try_get(0)?)),
            None => Ok(None),
        }
    }

    fn free_of(&mut self, ids: &[i64]) -> Result<HashSet<i64>, postgres::Error> {
        self.client
            .query(&self.sql.claims.late_free_keys, &[&ids])?
            .iter()
            .map(|r| r.try_get(0))
            .collect()
    }

    fn mark_sent(&mut self, ids: &[i64]) -> Result<Vec<i64>, postgres::Error> {
        self.client
            .query(&self.sql.claims.late_mark_sent, &[&ids])?
            .iter()
            .map(|r| r.try_get(0))
            .collect()
    }

    fn forget_charges(&mut self, ids: &[i64]) -> Result<(), postgres::Error> {
        self.client
            .execute(&self.sql.claims.charges_forget, &[&ids])
            .map(|_| ())
    }

    fn record_failed(&mut self, f: &LateFailed<'_>) -> Result<Vec<(i64, bool)>, postgres::Error> {
        let params: [&(dyn ToSql + Sync); 6] = [
            &f.ids,
            &f.delays,
            &f.errors,
            &f.max_retries,
            &f.increments,
            &f.read,
        ];
        self.client
            .query(&self.sql.claims.late_record_failed, &params)?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get::<_, &str>(1)? == "dead")))
            .collect()
    }

    fn charge(&mut self, ids: &[i64], claim_id: i32) -> Result<(), postgres::Error> {
        self.client
            .execute(&self.sql.claims.charges_add, &[&ids, &claim_id])
            .map(|_| ())
    }
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
    r: &[Returned],
    keep: bool,
) -> Result<(), postgres::Error> {
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
