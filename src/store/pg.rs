//! The PostgreSQL store: configuration, migrations, and the relay's sessions.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::tls::{MakeTlsConnect, TlsConnect};
use postgres::types::Type;
use postgres::{GenericClient, NoTls, Socket, Statement};
use r2d2::{Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;
use time::OffsetDateTime;

use super::ident::{Ident, DERIVED_SUFFIX_LEN, MAX_IDENT_LEN};
use super::sql::{self, Sql, SCHEMA_VERSION};
use super::{RelaySession, RelayStore, SettleReport, Settlement};
use crate::maintenance::retention::Retention;
use crate::message::{Message, Status};
use crate::Error;

/// The TLS connectors troutbox works with: anything `r2d2_postgres` can pool, such as
/// [`postgres::NoTls`], `postgres-native-tls` or `postgres-openssl` connectors.
///
/// Implemented automatically; you never implement it yourself.
pub trait MakeTls:
    MakeTlsConnect<Socket, Stream: Send, TlsConnect: Send + TlsConnect<Socket, Future: Send>>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> MakeTls for T where
    T: MakeTlsConnect<Socket, Stream: Send, TlsConnect: Send + TlsConnect<Socket, Future: Send>>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The connection pool type troutbox uses.
pub type PgPool<T = NoTls> = Pool<PostgresConnectionManager<T>>;

/// Default schema of the outbox table.
pub const DEFAULT_SCHEMA: &str = "public";
/// Default name of the outbox table.
pub const DEFAULT_TABLE: &str = "outbox_messages";

/// The outbox table in PostgreSQL, reached through an r2d2 connection pool.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use r2d2_postgres::PostgresConnectionManager;
/// use troutbox::PgStore;
///
/// let config = "host=localhost user=app dbname=app".parse()?;
/// let pool = r2d2::Pool::new(PostgresConnectionManager::new(config, postgres::NoTls))?;
/// let store = PgStore::new(pool).schema("app").table("outbox_messages");
/// store.migrate()?;
/// # Ok(()) }
/// ```
///
/// Schema and table names are validated (ASCII letters, digits and `_`, starting with a
/// letter or `_`; schema at most 63 bytes, table at most 51) and always quoted, so they are
/// case-sensitive. An invalid name is reported by the first call that needs it
/// ([`migrate`](Self::migrate), [`OutboxBuilder::build`](crate::OutboxBuilder::build), ...).
pub struct PgStore<T: MakeTls = NoTls> {
    pool: PgPool<T>,
    schema: String,
    table: String,
    retention: Retention,
    clock: Clock,
    sql: OnceLock<Arc<Sql>>,
}

/// Where maintenance reads the time: the system clock unless a test injects another.
pub(crate) type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

impl<T: MakeTls> Clone for PgStore<T> {
    fn clone(&self) -> Self {
        PgStore {
            pool: self.pool.clone(),
            schema: self.schema.clone(),
            table: self.table.clone(),
            retention: self.retention,
            clock: self.clock.clone(),
            sql: self.sql.clone(),
        }
    }
}

impl<T: MakeTls> std::fmt::Debug for PgStore<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl<T: MakeTls> PgStore<T> {
    /// A store for the table `public.outbox_messages`, using `pool` for every connection
    /// (relay workers keep one connection each while they run; size the pool for them plus
    /// your producers).
    pub fn new(pool: PgPool<T>) -> PgStore<T> {
        PgStore {
            pool,
            schema: DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_TABLE.to_owned(),
            retention: Retention::default(),
            clock: Arc::new(OffsetDateTime::now_utc),
            sql: OnceLock::new(),
        }
    }

    /// Uses the schema `name`. Defaults to `public`.
    pub fn schema(mut self, name: &str) -> PgStore<T> {
        self.schema = name.to_owned();
        self.sql = OnceLock::new();
        self
    }

    /// Uses the table `name`. Defaults to `outbox_messages`.
    pub fn table(mut self, name: &str) -> PgStore<T> {
        self.table = name.to_owned();
        self.sql = OnceLock::new();
        self
    }

    /// What happens to sent messages: deleted (the default) or kept in partitions for an
    /// audit window. Fixed when [`migrate`](Self::migrate) creates the table; a store whose
    /// retention does not match its table's is refused by `migrate` and by
    /// [`Outbox::start`](crate::Outbox::start). Defaults to [`Retention::delete_on_send`].
    pub fn retention(mut self, retention: Retention) -> PgStore<T> {
        self.retention = retention;
        self.sql = OnceLock::new();
        self
    }

    /// The clock partition maintenance uses to decide which partitions to create and drop.
    /// For tests that move time forward; defaults to the system clock (UTC).
    pub fn maintenance_clock(
        mut self,
        clock: impl Fn() -> OffsetDateTime + Send + Sync + 'static,
    ) -> PgStore<T> {
        self.clock = Arc::new(clock);
        self
    }

    pub(crate) fn retention_config(&self) -> &Retention {
        &self.retention
    }

    pub(crate) fn now(&self) -> OffsetDateTime {
        (self.clock)()
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool<T> {
        &self.pool
    }

    /// The table as `"schema"."table"`, as it appears in SQL.
    pub fn qualified_table(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.table)
    }

    /// Checks the schema and table names, so configuration errors surface early.
    pub fn validate(&self) -> Result<(), Error> {
        self.sql().map(|_| ())
    }

    pub(crate) fn sql(&self) -> Result<Arc<Sql>, Error> {
        if let Some(sql) = self.sql.get() {
            return Ok(sql.clone());
        }
        let schema = Ident::new("schema", &self.schema, MAX_IDENT_LEN)?;
        let table = Ident::new("table", &self.table, MAX_IDENT_LEN - DERIVED_SUFFIX_LEN)?;
        self.retention.validate()?;
        Ok(self
            .sql
            .get_or_init(|| Arc::new(Sql::new(&schema, &table, &self.retention)))
            .clone())
    }

    pub(crate) fn connection(
        &self,
        context: &'static str,
    ) -> Result<PooledConnection<PostgresConnectionManager<T>>, Error> {
        self.pool.get().map_err(Error::pool(context))
    }

    /// Maps a database error, recognising a missing table.
    pub(crate) fn db_error(&self, context: &'static str) -> impl FnOnce(postgres::Error) -> Error {
        let table = self.qualified_table();
        move |source| {
            if source.code() == Some(&SqlState::UNDEFINED_TABLE) {
                Error::NotMigrated { table, source }
            } else {
                Error::Database { context, source }
            }
        }
    }

    /// Creates the schema, the outbox table and its indexes, or brings them up to date.
    ///
    /// Idempotent, and safe to run from many processes at once: migrations of one schema are
    /// serialized by a transaction-scoped advisory lock, taken and released on the single
    /// connection that runs them, and each version is applied once. Needs the right to create
    /// the schema (or own it) and tables in it; producers and relays need less (see the
    /// README's "Permissions").
    pub fn migrate(&self) -> Result<(), Error> {
        let sql = self.sql()?;
        let mut conn = self.connection("migrating the outbox schema")?;
        let map = |e| Error::Database {
            context: "migrating the outbox schema",
            source: e,
        };
        let mut tx = conn.transaction().map_err(map)?;
        let lock_key = format!("troutbox:migrate:{}", self.schema);
        tx.execute(sql::MIGRATION_LOCK, &[&lock_key]).map_err(map)?;
        let exists = |tx: &mut postgres::Transaction<'_>,
                      sql: &str,
                      params: &[&(dyn postgres::types::ToSql + Sync)]| {
            tx.query_one(sql, params).map(|row| row.get::<_, bool>(0))
        };
        if !exists(&mut tx, sql::SCHEMA_EXISTS, &[&self.schema]).map_err(map)? {
            tx.batch_execute(&sql.create_schema).map_err(map)?;
        }
        if !exists(
            &mut tx,
            sql::TABLE_EXISTS,
            &[&self.schema, &sql::MIGRATIONS_TABLE],
        )
        .map_err(map)?
        {
            tx.batch_execute(&sql.create_migrations).map_err(map)?;
        }
        let version: i32 = tx
            .query_one(&sql.current_version, &[&self.table])
            .map_err(map)?
            .get(0);
        if version > SCHEMA_VERSION {
            return Err(Error::SchemaTooNew {
                table: self.qualified_table(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 1 {
            tx.batch_execute(&sql.migration_v1).map_err(map)?;
            tx.execute(&sql.record_version, &[&self.table, &1i32])
                .map_err(map)?;
            log::info!("created outbox table {}", self.qualified_table());
        } else {
            self.check_table_kind(&mut tx)?;
        }
        tx.commit().map_err(map)?;
        drop(conn);
        if self.retention.keep.is_some() {
            // Partitions for now and ahead, so the DEFAULT partition stays a safety net.
            self.run_maintenance_once()?;
        }
        Ok(())
    }

    /// Refuses a store whose retention does not match the table's: relaying a partitioned
    /// (keep-sent) table as delete-on-send, or the reverse, would lose the audit trail or
    /// keep everything forever.
    pub(crate) fn check_table_kind(&self, client: &mut impl GenericClient) -> Result<(), Error> {
        let row = client
            .query_one(sql::TABLE_KIND, &[&self.qualified_table()])
            .map_err(self.db_error("checking the outbox table"))?;
        let kind: Option<String> = row.get(0);
        let partitioned = match kind.as_deref() {
            Some("p") => true,
            Some(_) => false,
            None => return Ok(()), // missing: the next statement reports NotMigrated
        };
        if partitioned != self.retention.keep.is_some() {
            let name = |p: bool| {
                if p {
                    "keep_sent (partitioned)"
                } else {
                    "delete_on_send"
                }
            };
            return Err(Error::RetentionMismatch {
                table: self.qualified_table(),
                configured: name(self.retention.keep.is_some()),
                found: name(partitioned),
            });
        }
        Ok(())
    }
}

/// The relay's view of a [`PgStore`]: the store plus the claim transaction's time bound.
pub(crate) struct PgRelay<T: MakeTls> {
    pub(crate) store: PgStore<T>,
    pub(crate) sql: Arc<Sql>,
    pub(crate) send_timeout: Duration,
    pub(crate) batch_size: usize,
}

impl<T: MakeTls> RelayStore for PgRelay<T> {
    type Session = PgSession<T>;

    fn open_session(&self) -> Result<PgSession<T>, Error> {
        let timeout_ms = self.send_timeout.as_millis().max(1);
        let mut session = PgSession {
            store: self.store.clone(),
            sql: self.sql.clone(),
            begin: sql::begin_claim(u64::try_from(timeout_ms).unwrap_or(u64::MAX)),
            limit: self.batch_size,
            conn: None,
            open: false,
            begun: false,
            mark: None,
            last_head_claim: Instant::now(),
        };
        let conn = session.connect()?;
        self.store.check_table_kind(&mut *conn.client)?;
        Ok(session)
    }
}

struct SessionConn<T: MakeTls> {
    client: PooledConnection<PostgresConnectionManager<T>>,
    /// Claims from the head of the pending index.
    claim_head: Statement,
    /// Claims past the session's position (see [`Sql::claim`]).
    claim_after: Statement,
}

/// How long a session may resume after its position before it claims from the head of the
/// index again, to pick up rows that committed behind it.
const HEAD_CLAIM_EVERY: Duration = Duration::from_secs(1);

/// One relay worker's connection, with the claim statements prepared on it.
pub(crate) struct PgSession<T: MakeTls> {
    store: PgStore<T>,
    sql: Arc<Sql>,
    begin: String,
    /// The batch size the claim statements were prepared for.
    limit: usize,
    conn: Option<SessionConn<T>>,
    /// A claim transaction is open on `conn`.
    open: bool,
    /// A transaction was begun ahead, with the previous COMMIT, for the next claim.
    begun: bool,
    /// Position (available_at, id) of the last row of the last full batch: where the next
    /// claim resumes while a backlog drains.
    mark: Option<(OffsetDateTime, i64)>,
    last_head_claim: Instant,
}

impl<T: MakeTls> PgSession<T> {
    fn connect(&mut self) -> Result<&mut SessionConn<T>, Error> {
        if self.conn.is_none() {
            let mut client = self.store.connection("opening a relay session")?;
            let context = "preparing the claim statements";
            let claim_head = client
                .prepare(&self.sql.claim(self.limit, false))
                .map_err(self.store.db_error(context))?;
            let claim_after = client
                .prepare_typed(
                    &self.sql.claim(self.limit, true),
                    &[Type::TIMESTAMPTZ, Type::INT8],
                )
                .map_err(self.store.db_error(context))?;
            self.conn = Some(SessionConn {
                client,
                claim_head,
                claim_after,
            });
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }

    /// Turns a failure inside the claim transaction into an error, leaving the session
    /// either clean (transaction rolled back) or without a connection.
    fn fail(&mut self, context: &'static str, e: postgres::Error) -> Error {
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
        self.mark = None;
        self.store.db_error(context)(e)
    }

    /// Applies a settlement whose claim transaction was lost, on a fresh connection. The
    /// rows are back as they were before the claim, unless another relay holds them now.
    fn settle_late(&self, settlement: &Settlement) -> Result<SettleReport, Error> {
        let context = "recording a batch outcome after its transaction was lost";
        let mut client = self.store.connection(context)?;
        let map = self.store.db_error(context);
        let mut report = SettleReport::default();
        if !settlement.sent.is_empty() {
            match client.execute(&self.sql.late_mark_sent, &[&settlement.sent]) {
                Ok(deleted) => report.sent = deleted,
                Err(e) => return Err(map(e)),
            }
        }
        if !settlement.returned.is_empty() {
            let r = &settlement.returned;
            let ids: Vec<i64> = r.iter().map(|x| x.message.id).collect();
            let attempts: Vec<i32> = r.iter().map(|x| attempts_i32(x.attempts)).collect();
            let delays: Vec<i64> = r.iter().map(|x| millis(x.delay)).collect();
            let states: Vec<&str> = r.iter().map(|x| state(x.dead)).collect();
            let errors: Vec<&str> = r.iter().map(|x| x.error.as_str()).collect();
            let rows = client
                .query(
                    &self.sql.late_record_failed,
                    &[&ids, &attempts, &delays, &states, &errors],
                )
                .map_err(map)?;
            for row in rows {
                if row.get::<_, &str>(0) == "dead" {
                    report.dead += 1;
                } else {
                    report.retried += 1;
                }
            }
        }
        Ok(report)
    }
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
    client: &mut postgres::Client,
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
                &sql.return_failed,
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
            &sql.return_failed,
            &[
                &ids, &keys, &values, &headers, &created, &attempts, &delays, &states, &errors,
            ],
        )
        .map(|_| ())
}

/// Builds a [`Message`] from a row with the columns of `sql::MESSAGE_COLUMNS`.
pub(crate) fn message_from_row(row: &postgres::Row) -> Message {
    let flat: Vec<String> = row.get(3);
    let mut headers = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        headers.push((name, value));
    }
    let attempts: i32 = row.get(5);
    Message {
        id: row.get(0),
        key: row.get(1),
        value: row.get(2),
        headers,
        created_at: row.get::<_, OffsetDateTime>(4),
        attempts: u32::try_from(attempts).unwrap_or(0),
        status: Status::Unmarked,
    }
}

impl<T: MakeTls> RelaySession for PgSession<T> {
    fn claim(&mut self, limit: usize) -> Result<Vec<Message>, Error> {
        debug_assert!(!self.open, "claim while a claim is open");
        if limit != self.limit {
            // Prepared for another batch size: prepare again (not on the relay's path).
            self.limit = limit;
            if self.begun {
                self.begun = false;
                if let Some(conn) = self.conn.as_mut() {
                    let _ = conn.client.batch_execute(sql::ROLLBACK);
                }
            }
            self.conn = None;
        }
        let begin = self.begin.clone();
        let begun = std::mem::take(&mut self.begun);
        let conn = self.connect()?;
        if !begun {
            if let Err(e) = conn.client.batch_execute(&begin) {
                return Err(self.fail("opening a claim transaction", e));
            }
        }
        self.open = true;
        let mark = self
            .mark
            .take()
            .filter(|_| self.last_head_claim.elapsed() < HEAD_CLAIM_EVERY);
        let conn = self.conn.as_mut().expect("connected above");
        let mut rows = match mark {
            Some((at, id)) => conn.client.query(&conn.claim_after, &[&at, &id]),
            None => Ok(Vec::new()),
        };
        // Nothing past the position (or no position): claim from the head of the index.
        if matches!(&rows, Ok(r) if r.is_empty()) {
            self.last_head_claim = Instant::now();
            rows = conn.client.query(&conn.claim_head, &[]);
        }
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => return Err(self.fail("claiming a batch", e)),
        };
        if rows.is_empty() {
            // Nothing was deleted, so nothing is written: the COMMIT costs no WAL flush.
            if let Err(e) = conn.client.batch_execute(sql::COMMIT) {
                return Err(self.fail("ending an empty claim", e));
            }
            self.open = false;
            return Ok(Vec::new());
        }
        // Resume after this batch only while batches come back full (a backlog drains);
        // otherwise the next claim starts from the head again.
        if rows.len() >= limit {
            self.mark = rows
                .iter()
                .map(|r| (r.get::<_, OffsetDateTime>(6), r.get::<_, i64>(0)))
                .max();
        }
        Ok(rows.iter().map(message_from_row).collect())
    }

    fn settle(&mut self, settlement: Settlement) -> (SettleReport, Option<Error>) {
        let conn = match (self.open, self.conn.as_mut()) {
            (true, Some(conn)) => conn,
            _ => {
                return match self.settle_late(&settlement) {
                    Ok(report) => (report, None),
                    Err(e) => (SettleReport::default(), Some(e)),
                }
            }
        };
        let mut result = Ok(());
        if !settlement.returned.is_empty() {
            let keep = self.store.retention.keep.is_some();
            result = return_failed(&mut conn.client, &self.sql, &settlement, keep);
        }
        // After a full batch that was at least partly sent the worker claims again at once:
        // begin its transaction in the same round trip as this COMMIT. (A batch that failed
        // whole is followed by a pause, which must not hold a transaction open.)
        let claims_next = settlement.sent.len() + settlement.returned.len() >= self.limit
            && !settlement.sent.is_empty();
        let end = if claims_next {
            format!("{}; {}", sql::COMMIT, self.begin)
        } else {
            sql::COMMIT.to_owned()
        };
        let result = result.and_then(|()| conn.client.batch_execute(&end));
        match result {
            Ok(()) => {
                self.open = false;
                self.begun = claims_next;
                (SettleReport::of(&settlement), None)
            }
            Err(e) => {
                let error = self.fail("settling a batch", e);
                match self.settle_late(&settlement) {
                    Ok(report) => {
                        log::warn!(
                            "batch transaction lost ({error}); its outcome was recorded afterwards on a new connection"
                        );
                        (report, Some(error))
                    }
                    Err(late) => {
                        log::warn!(
                            "batch transaction lost ({error}) and its outcome could not be recorded ({late}); its messages will be delivered again"
                        );
                        (SettleReport::default(), Some(error))
                    }
                }
            }
        }
    }

    fn is_broken(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.client.is_closed())
    }
}

impl<T: MakeTls> Drop for PgSession<T> {
    fn drop(&mut self) {
        // Never hand a connection with an open transaction back to the pool.
        if self.open || self.begun {
            if let Some(conn) = self.conn.as_mut() {
                let _ = conn.client.batch_execute(sql::ROLLBACK);
            }
        }
    }
}
