//! The PostgreSQL backend: the store's configuration and migrations (here), its pool
//! ([`pool`]), the claim protocol's primitives ([`claims`]), every statement by concern
//! ([`sql`]), rows to messages ([`decode`]), and validated, quoted names ([`ident`]).

pub(crate) mod backlog;
pub(crate) mod claims;
pub(crate) mod dead_letters;
pub(crate) mod decode;
pub(crate) mod inbox;
pub(crate) mod listener;
pub(crate) mod ordering;
pub(crate) mod partitions;
pub(crate) mod pool;
pub(crate) mod producer;
pub(crate) mod sql;

use std::sync::{Arc, OnceLock};

use postgres::error::SqlState;
use postgres::tls::{MakeTlsConnect, TlsConnect};
use postgres::{GenericClient, IsolationLevel, NoTls, Socket};
use r2d2::{Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;
use time::OffsetDateTime;

use self::sql::{Sql, SCHEMA_VERSION};
use super::retention::Retention;
use crate::store::ident::{Ident, DERIVED_SUFFIX_LEN, MAX_IDENT_LEN};
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
// No PartialEq: a store is a pool of connections plus a table name; pools have no equality.
pub struct PgStore<T: MakeTls = NoTls> {
    pool: PgPool<T>,
    schema: String,
    table: String,
    retention: Retention,
    /// Where maintenance reads the time: the database's clock (`None`) unless a test
    /// injects another.
    clock: Option<Clock>,
    sql: OnceLock<Arc<Sql>>,
}

/// A clock injected with [`PgStore::maintenance_clock`].
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
            clock: None,
            sql: OnceLock::new(),
        }
    }

    /// Uses the schema `name`. Defaults to `public`.
    #[must_use]
    pub fn schema(mut self, name: &str) -> PgStore<T> {
        self.schema = name.to_owned();
        self.sql = OnceLock::new();
        self
    }

    /// Uses the table `name`. Defaults to `outbox_messages`.
    #[must_use]
    pub fn table(mut self, name: &str) -> PgStore<T> {
        self.table = name.to_owned();
        self.sql = OnceLock::new();
        self
    }

    /// What happens to sent messages: deleted (the default) or kept in partitions for an
    /// audit window. Fixed when [`migrate`](Self::migrate) creates the table; a store whose
    /// retention does not match its table's is refused by `migrate` and by
    /// [`Outbox::start`](crate::Outbox::start). Defaults to [`Retention::delete_on_send`].
    #[must_use]
    pub fn retention(mut self, retention: Retention) -> PgStore<T> {
        self.retention = retention;
        self.sql = OnceLock::new();
        self
    }

    /// The clock partition maintenance uses to decide which partitions to create and drop.
    /// For tests that move time forward; by default maintenance reads the database's clock
    /// (`now()`), the one `created_at` comes from, so that a host whose clock is off cannot
    /// drop a partition early.
    #[must_use]
    pub fn maintenance_clock(
        mut self,
        clock: impl Fn() -> OffsetDateTime + Send + Sync + 'static,
    ) -> PgStore<T> {
        self.clock = Some(Arc::new(clock));
        self
    }

    pub(crate) fn retention_config(&self) -> &Retention {
        &self.retention
    }

    /// The injected maintenance clock's time, if one was injected.
    pub(crate) fn injected_now(&self) -> Option<OffsetDateTime> {
        self.clock.as_ref().map(|clock| clock())
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

    /// A connection for the relay's threads, checked to answer in bounded time (see
    /// [`pool::checkout`](self::pool::checkout)).
    pub(crate) fn relay_connection(
        &self,
        context: &'static str,
    ) -> Result<PooledConnection<PostgresConnectionManager<T>>, Error> {
        self::pool::checkout(&self.pool, context)
    }

    /// The table's unqualified name, as the schema's table of modes records it.
    #[cfg(feature = "diesel")]
    pub(crate) fn table_name(&self) -> &str {
        &self.table
    }

    /// Maps a database error, recognising a missing table.
    pub(crate) fn db_error(&self, context: &'static str) -> impl FnOnce(postgres::Error) -> Error {
        let table = self.qualified_table();
        move |source| {
            if source.code() == Some(&SqlState::UNDEFINED_TABLE) {
                Error::NotMigrated {
                    table,
                    source: Some(source),
                }
            } else {
                Error::Database {
                    context,
                    error: source,
                }
            }
        }
    }

    /// Creates the schema, the outbox table and its indexes, or brings them up to date.
    ///
    /// Idempotent, and safe to run from many processes at once: migrations of one schema are
    /// serialized by a transaction-scoped advisory lock, taken and released on the single
    /// connection that runs them, and each version is applied once. Needs the right to create
    /// the schema (or own it) and tables in it; producers and relays need less (see
    /// docs/permissions.md).
    pub fn migrate(&self) -> Result<(), Error> {
        self.migrate_with(None)
    }

    /// [`migrate`](Self::migrate), then, with `ordering`, the table's ordering mode: `true`
    /// makes it ordered (creating the key index; a table created unordered is converted),
    /// `false` checks that it is not. Used by [`Outbox::migrate`](crate::Outbox::migrate).
    pub(crate) fn migrate_with(&self, ordering: Option<bool>) -> Result<(), Error> {
        self.migrate_for(ordering, None)
    }

    /// [`migrate_with`](Self::migrate_with), then, with `sql_producer` (an outbox's `notify`
    /// and `max_value_size`), records those for the SQL producer function: `notify` only
    /// ever turned on, the size limit replaced. Used by [`Outbox::migrate`](crate::Outbox::migrate).
    pub(crate) fn migrate_for(
        &self,
        ordering: Option<bool>,
        sql_producer: Option<(bool, usize)>,
    ) -> Result<(), Error> {
        let sql = self.sql()?;
        let mut conn = self.connection("migrating the outbox schema")?;
        let map = |e| Error::Database {
            context: "migrating the outbox schema",
            error: e,
        };
        let mut tx = begin_migration(&mut conn, &self.schema).map_err(map)?;
        if !exists(&mut tx, sql::SCHEMA_EXISTS, &[&self.schema]).map_err(map)? {
            tx.batch_execute(&sql.migrations.create_schema)
                .map_err(map)?;
        }
        if !exists(
            &mut tx,
            sql::TABLE_EXISTS,
            &[&self.schema, &sql::MIGRATIONS_TABLE],
        )
        .map_err(map)?
        {
            tx.batch_execute(&sql.migrations.create_migrations)
                .map_err(map)?;
        }
        let version: i32 = tx
            .query_one(&sql.migrations.current_version, &[&self.table])
            .and_then(|row| row.try_get(0))
            .map_err(map)?;
        if version > SCHEMA_VERSION {
            return Err(Error::SchemaTooNew {
                table: self.qualified_table(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 1 {
            tx.batch_execute(&sql.migrations.migration_v1)
                .map_err(map)?;
            tx.execute(&sql.migrations.record_version, &[&self.table, &1i32])
                .map_err(map)?;
            log::info!("created outbox table {}", self.qualified_table());
        } else {
            self.check_table_kind(&mut tx)?;
        }
        if version < 2 {
            tx.batch_execute(&sql.migrations.migration_v2)
                .map_err(map)?;
            tx.execute(&sql.migrations.record_version, &[&self.table, &2i32])
                .map_err(map)?;
        }
        if version < 3 {
            if !exists(
                &mut tx,
                sql::TABLE_EXISTS,
                &[&self.schema, &sql::TABLES_TABLE],
            )
            .map_err(map)?
            {
                tx.batch_execute(&sql.migrations.create_tables)
                    .map_err(map)?;
            }
            let (keep, interval) = self.retention_secs();
            tx.execute(
                &sql.migrations.migration_v3,
                &[&self.table, &keep, &interval],
            )
            .map_err(map)?;
            tx.execute(&sql.migrations.record_version, &[&self.table, &3i32])
                .map_err(map)?;
        }
        if version < 4 {
            tx.batch_execute(&sql.migrations.migration_v4)
                .map_err(map)?;
            tx.execute(&sql.migrations.record_version, &[&self.table, &4i32])
                .map_err(map)?;
        }
        if version < 5 {
            tx.batch_execute(&sql.migrations.migration_v5)
                .map_err(map)?;
            tx.batch_execute(&sql.produce.add_function).map_err(map)?;
            tx.execute(&sql.migrations.record_version, &[&self.table, &5i32])
                .map_err(map)?;
        }
        if let Some((notify, max_value_size)) = sql_producer {
            // Within the builder's range, which `build()` checked: at most 512 MiB.
            let max = i32::try_from(max_value_size).unwrap_or(i32::MAX);
            let changed = tx
                .execute(
                    &sql.migrations.record_sql_producer,
                    &[&self.table, &notify, &max],
                )
                .map_err(map)?;
            if changed > 0 {
                log::info!(
                    "the SQL producer function of {} now applies notify {notify} (or on, if it was), max_value_size {max_value_size}",
                    self.qualified_table()
                );
            }
        }
        if let Some(declared) = ordering {
            let recorded = self.recorded_ordering(&mut tx)?;
            if declared {
                self.check_id_cache(&mut tx)?;
            }
            if declared && !recorded {
                // Converting: the messages already pending keep their id order, which is
                // all an unordered producer promised about them.
                tx.batch_execute(&sql.migrations.key_index).map_err(map)?;
                tx.execute(&sql.migrations.set_ordered, &[&self.table])
                    .map_err(map)?;
                log::info!(
                    "outbox table {} is now relayed with per-key ordering",
                    self.qualified_table()
                );
            } else if !declared && recorded {
                self.compare_ordering(declared, recorded)?;
            }
        }
        tx.commit().map_err(map)?;
        drop(conn);
        if self.retention.keep.is_some() {
            // Partitions for now and ahead, so the DEFAULT partition stays a safety net.
            self.run_maintenance_once()?;
        }
        Ok(())
    }

    /// The configured retention as recorded with the table: (window, partition interval) in
    /// seconds, or NULLs for delete-on-send.
    fn retention_secs(&self) -> (Option<i64>, Option<i64>) {
        match self.retention.keep {
            Some(window) => (
                Some(i64::try_from(window.as_secs()).unwrap_or(i64::MAX)),
                Some(self.retention.interval_secs()),
            ),
            None => (None, None),
        }
    }

    /// Refuses maintenance by a store whose keep-sent window or partition interval is not
    /// the one recorded with the table at migration: `--keep-sent 1d` against a 30-day
    /// table would drop 29 days of audit history.
    pub(crate) fn check_retention(&self, client: &mut impl GenericClient) -> Result<(), Error> {
        let sql = self.sql()?;
        let context = "reading the outbox table's retention";
        let Some(row) = client
            .query_opt(&sql.migrations.recorded_retention, &[&self.table])
            .map_err(self.db_error(context))?
        else {
            return Err(Error::OutdatedSchema {
                table: self.qualified_table(),
            });
        };
        let recorded: (Option<i64>, Option<i64>) = (
            row.try_get(0).map_err(self.db_error(context))?,
            row.try_get(1).map_err(self.db_error(context))?,
        );
        let configured = self.retention_secs();
        if recorded != configured {
            let show = |(window, interval): (Option<i64>, Option<i64>)| match (window, interval) {
                (Some(w), Some(i)) => format!("keep_sent({w} s) with partitions of {i} s"),
                _ => "delete_on_send".to_owned(),
            };
            return Err(Error::RetentionSettingsMismatch {
                table: self.qualified_table(),
                configured: show(configured),
                recorded: show(recorded),
            });
        }
        Ok(())
    }

    /// The retention recorded with the table at migration (for the command line, which then
    /// needs no retention flags).
    pub fn recorded_retention(&self) -> Result<Retention, Error> {
        let sql = self.sql()?;
        let context = "reading the outbox table's retention";
        let mut conn = self.connection(context)?;
        let row = conn
            .query_opt(&sql.migrations.recorded_retention, &[&self.table])
            .map_err(self.db_error(context))?
            .ok_or_else(|| Error::OutdatedSchema {
                table: self.qualified_table(),
            })?;
        let window: Option<i64> = row.try_get(0).map_err(self.db_error(context))?;
        let interval: Option<i64> = row.try_get(1).map_err(self.db_error(context))?;
        let secs = |s: i64| std::time::Duration::from_secs(u64::try_from(s).unwrap_or(0));
        Ok(match (window, interval) {
            (Some(w), Some(i)) => Retention::keep_sent(secs(w))
                .partition_interval(secs(i))
                .partitions_ahead(self.retention.ahead),
            _ => Retention::delete_on_send(),
        })
    }

    /// Whether the table is recorded as ordered (migration 3).
    pub(crate) fn recorded_ordering(&self, client: &mut impl GenericClient) -> Result<bool, Error> {
        let sql = self.sql()?;
        let context = "reading the outbox table's ordering mode";
        let row = client
            .query_opt(&sql.migrations.mode, &[&self.table])
            .map_err(self.db_error(context))?;
        match row {
            Some(row) => row.try_get(0).map_err(self.db_error(context)),
            None => {
                // No mode recorded: a table from before migration 3, or no table at all.
                let exists: bool = client
                    .query_one(&sql.migrations.table_exists, &[])
                    .and_then(|row| row.try_get(0))
                    .map_err(self.db_error(context))?;
                if !exists {
                    if let Err(e) = client.query(&sql.migrations.probe_table, &[]) {
                        return Err(self.db_error(context)(e));
                    }
                }
                Err(Error::OutdatedSchema {
                    table: self.qualified_table(),
                })
            }
        }
    }

    /// The table's identity (migration 4), for [`Message::dedup_key`](crate::Message::dedup_key).
    pub(crate) fn outbox_id(&self, client: &mut impl GenericClient) -> Result<Arc<str>, Error> {
        let sql = self.sql()?;
        let context = "reading the outbox table's identity";
        let outdated = || Error::OutdatedSchema {
            table: self.qualified_table(),
        };
        match client.query_opt(&sql.migrations.outbox_id, &[&self.table]) {
            Ok(Some(row)) => row
                .try_get::<_, String>(0)
                .map(Arc::from)
                .map_err(self.db_error(context)),
            Ok(None) => Err(outdated()),
            // The column comes with migration 4; the table with migration 3.
            Err(e)
                if matches!(
                    e.code(),
                    Some(&SqlState::UNDEFINED_COLUMN) | Some(&SqlState::UNDEFINED_TABLE)
                ) =>
            {
                Err(outdated())
            }
            Err(e) => Err(self.db_error(context)(e)),
        }
    }

    /// Refuses an outbox whose ordering mode is not the table's.
    pub(crate) fn check_ordering(
        &self,
        client: &mut impl GenericClient,
        declared: bool,
    ) -> Result<(), Error> {
        let recorded = self.recorded_ordering(client)?;
        self.compare_ordering(declared, recorded)?;
        if declared {
            self.check_id_cache(client)?;
        }
        Ok(())
    }

    /// Refuses per-key ordering on a table whose id sequence hands out ids in blocks
    /// (`CACHE` above 1, set by hand or by a tool): each session then draws from its own
    /// block, and the ids of one key no longer follow the commit order of their
    /// transactions, which the ordered relay relies on.
    pub(crate) fn check_id_cache(&self, client: &mut impl GenericClient) -> Result<(), Error> {
        let context = "checking the outbox id sequence";
        let cache: Option<i64> = client
            .query_one(sql::ID_CACHE, &[&self.qualified_table()])
            .and_then(|row| row.try_get(0))
            .map_err(self.db_error(context))?;
        match cache {
            Some(cache) if cache > 1 => Err(Error::IdCached {
                table: self.qualified_table(),
                cache,
            }),
            _ => Ok(()),
        }
    }

    /// Refuses an outbox `declared` ordered or not when the table is `recorded` otherwise.
    pub(crate) fn compare_ordering(&self, declared: bool, recorded: bool) -> Result<(), Error> {
        if recorded != declared {
            return Err(Error::OrderingMismatch {
                table: self.qualified_table(),
                declared,
                recorded,
            });
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
        let kind: Option<String> = row
            .try_get(0)
            .map_err(self.db_error("checking the outbox table"))?;
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

/// Opens a migration's transaction on `conn`, for the schema `schema`: `READ COMMITTED`
/// stated, not inherited (under a database default of REPEATABLE READ or SERIALIZABLE the
/// snapshot would be taken before the lock, and concurrent migrations fail), the migration
/// timeouts, and the schema's migration lock, which serializes every migration of the schema
/// (the outbox tables' and the inboxes') across processes until this transaction ends.
pub(crate) fn begin_migration<'c>(
    conn: &'c mut postgres::Client,
    schema: &str,
) -> Result<postgres::Transaction<'c>, postgres::Error> {
    let mut tx = conn
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()?;
    tx.batch_execute(sql::MIGRATION_TIMEOUTS)?;
    let lock_key = format!("troutbox:migrate:{schema}");
    tx.execute(sql::MIGRATION_LOCK, &[&lock_key])?;
    Ok(tx)
}

/// Runs an `EXISTS` query (`sql::SCHEMA_EXISTS`, `sql::TABLE_EXISTS`) in a migration.
pub(crate) fn exists(
    tx: &mut postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<bool, postgres::Error> {
    tx.query_one(sql, params)
        .and_then(|row| row.try_get::<_, bool>(0))
}

/// Builds a [`Message`](crate::Message) from a dead row of the table `outbox`, leniently (see
/// [`decode::message_lenient`]).
pub(crate) fn dead_message_from_row(row: &postgres::Row, outbox: &Arc<str>) -> crate::DeadMessage {
    let mut message = decode::message_lenient(row);
    message.outbox = Arc::clone(outbox);
    crate::DeadMessage {
        message,
        last_error: decode::column(row, 6, "last_error").unwrap_or(None),
        died_at: decode::column(row, 7, "available_at").unwrap_or(OffsetDateTime::UNIX_EPOCH),
    }
}
