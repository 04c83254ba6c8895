//! The MariaDB backend (feature `mariadb`): the store and its migrations, its pool, the
//! claim protocol's primitives (`claims`), every statement by concern (`sql`), rows to
//! messages (`decode`), the producer's INSERTs (`producer`) and the dead-letter admin API
//! (`dead_letters`). The public face is [`troutbox::mariadb`](crate::mariadb).
//!
//! What differs from PostgreSQL, and why, is in docs/backends.md ("MariaDB").

pub(crate) mod claims;
pub(crate) mod dead_letters;
pub(crate) mod decode;
pub(crate) mod pool;
pub(crate) mod producer;
pub(crate) mod sql;

use std::sync::Arc;

use mysql::prelude::Queryable;
use mysql::{Conn, Row};

use self::pool::MariaDbPool;
use self::sql::migrations::SCHEMA_VERSION;
use self::sql::Sql;
use crate::store::ident::Ident;
use crate::Error;

/// The oldest MariaDB the backend runs on: `SKIP LOCKED` came with 10.6.
pub const MIN_MARIADB_VERSION: (u16, u16) = (10, 6);

/// MariaDB truncates nothing but refuses names longer than this; the table's longest
/// derived name adds `_pending_idx`.
const MAX_TABLE_LEN: usize = 64 - "_pending_idx".len();

/// Where a MariaDB outbox lives: a pool and the table's name, in the database the pool's
/// connections use. Cheap to clone.
///
/// ```no_run
/// # fn main() -> Result<(), troutbox::Error> {
/// use troutbox::mariadb::{pool, MariaDbStore};
///
/// let pool = pool("mysql://app:secret@127.0.0.1:3306/app", 8)?;
/// let store = MariaDbStore::new(pool);
/// store.migrate()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MariaDbStore {
    pool: MariaDbPool,
    table: String,
}

impl std::fmt::Debug for MariaDbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MariaDbStore")
            .field("table", &self.table)
            .field("pool_max_size", &self.pool.max_size())
            .finish()
    }
}

impl MariaDbStore {
    /// A store on `pool`, with the table [`DEFAULT_TABLE`](crate::DEFAULT_TABLE)
    /// (`outbox_messages`).
    pub fn new(pool: MariaDbPool) -> MariaDbStore {
        MariaDbStore {
            pool,
            table: crate::DEFAULT_TABLE.to_owned(),
        }
    }

    /// Uses the table `name` (ASCII letters, digits and `_`, at most 52 bytes: its
    /// derived names must fit MariaDB's 64). Checked by [`validate`](Self::validate),
    /// [`migrate`](Self::migrate) and the outbox's `build`.
    #[must_use]
    pub fn table(mut self, name: &str) -> MariaDbStore {
        self.table = name.to_owned();
        self
    }

    /// The pool.
    pub fn pool(&self) -> &MariaDbPool {
        &self.pool
    }

    /// The table's name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Checks the table's name without touching the database.
    pub fn validate(&self) -> Result<(), Error> {
        self.sql().map(drop)
    }

    pub(crate) fn sql(&self) -> Result<Arc<Sql>, Error> {
        let table = Ident::new("table", &self.table, MAX_TABLE_LEN)?;
        Ok(Arc::new(Sql::new(&table)))
    }

    pub(crate) fn connection(
        &self,
        context: &'static str,
    ) -> Result<r2d2::PooledConnection<pool::MariaDbManager>, Error> {
        self.pool.get().map_err(Error::pool(context))
    }

    /// Maps a `mysql` error met while `context`, recognising a missing table.
    pub(crate) fn db_error(&self, context: &'static str) -> impl FnOnce(mysql::Error) -> Error {
        let table = self.table.clone();
        move |source| match &source {
            mysql::Error::MySqlError(e) if e.code == ER_NO_SUCH_TABLE => Error::NotMigrated {
                table,
                source: None,
            },
            _ => Error::MariaDb { context, source },
        }
    }

    /// Creates the outbox table, its claim journal, charges and key locks, and the
    /// database's tables of versions and of modes, or brings them up to date.
    ///
    /// Idempotent, and safe from many processes at once: migrations of one table are
    /// serialized by a named lock (`GET_LOCK`, waiting up to 60 s), taken on a connection
    /// opened for the migration alone and closed after it (MariaDB's named locks last as
    /// long as the session, so it never stays with a pooled connection). MariaDB commits
    /// each DDL statement on its own: every step is idempotent, and a migration cut short
    /// is completed by the next one. Refuses servers older than 10.6
    /// ([`Error::Unsupported`]).
    pub fn migrate(&self) -> Result<(), Error> {
        self.migrate_with(None)
    }

    /// [`migrate`](Self::migrate), then, with `Some(true)`, makes the table ordered;
    /// `Some(false)` checks that it is not.
    pub(crate) fn migrate_with(&self, ordering: Option<bool>) -> Result<(), Error> {
        let sql = self.sql()?;
        let context = "migrating the outbox table";
        let map = |e| Error::MariaDb { context, source: e };
        // MariaDB's named locks last as long as the session: the connection is reset
        // (COM_RESET_CONNECTION, which releases them) before it goes back to the pool,
        // whatever happens here, a panic included.
        let mut guard = ResetOnDrop(self.connection(context)?);
        let conn: &mut Conn = &mut guard.0;
        check_server(conn)?;
        let m = &sql.migrations;
        let locked: Option<i64> = conn.query_first(&m.lock).map_err(map)?;
        if locked != Some(1) {
            return Err(Error::MariaDb {
                context: "waiting for another migration of this table (60 s)",
                source: mysql::Error::DriverError(mysql::DriverError::Timeout),
            });
        }
        conn.query_drop(&m.create_migrations).map_err(map)?;
        conn.query_drop(&m.create_tables).map_err(map)?;
        let table = sql.names.plain.as_str();
        let version: i64 = conn
            .exec_first(&m.current_version, (table,))
            .map_err(map)?
            .unwrap_or(0);
        if version > i64::from(SCHEMA_VERSION) {
            return Err(Error::SchemaTooNew {
                table: table.to_owned(),
                found: i32::try_from(version).unwrap_or(i32::MAX),
                supported: SCHEMA_VERSION,
            });
        }
        if version < 1 {
            for statement in &m.v1 {
                conn.query_drop(statement).map_err(map)?;
            }
            conn.exec_drop(&m.register, (table,)).map_err(map)?;
            conn.exec_drop(&m.record_version, (table, 1)).map_err(map)?;
        }
        match ordering {
            Some(true) => conn.exec_drop(&m.set_ordered, (table,)).map_err(map)?,
            Some(false) => self.check_ordering(conn, false)?,
            None => {}
        }
        Ok(())
    }

    /// Refuses a table whose recorded ordering mode is not `declared`.
    pub(crate) fn check_ordering(
        &self,
        conn: &mut impl Queryable,
        declared: bool,
    ) -> Result<(), Error> {
        let sql = self.sql()?;
        let recorded = self.recorded_ordering(conn, &sql)?;
        if recorded != declared {
            return Err(Error::OrderingMismatch {
                table: self.table.clone(),
                recorded,
                declared,
            });
        }
        Ok(())
    }

    /// The table's recorded ordering mode; [`Error::NotMigrated`] when it has none.
    pub(crate) fn recorded_ordering(
        &self,
        conn: &mut impl Queryable,
        sql: &Sql,
    ) -> Result<bool, Error> {
        let context = "reading the outbox table's ordering mode";
        let mode: Option<bool> = conn
            .exec_first(&sql.migrations.mode, (sql.names.plain.as_str(),))
            .map_err(self.db_error(context))?;
        mode.ok_or_else(|| Error::NotMigrated {
            table: self.table.clone(),
            source: None,
        })
    }

    /// The table's identity (see [`Message::dedup_key`](crate::Message::dedup_key)).
    pub(crate) fn outbox_id(
        &self,
        conn: &mut impl Queryable,
        sql: &Sql,
    ) -> Result<Arc<str>, Error> {
        let context = "reading the outbox table's identity";
        let id: Option<String> = conn
            .exec_first(&sql.migrations.outbox_id, (sql.names.plain.as_str(),))
            .map_err(self.db_error(context))?;
        id.map(Arc::from).ok_or_else(|| Error::NotMigrated {
            table: self.table.clone(),
            source: None,
        })
    }
}

/// A pooled connection reset when dropped: session state (named locks, variables) never
/// goes back to the pool.
pub(crate) struct ResetOnDrop(pub(crate) r2d2::PooledConnection<pool::MariaDbManager>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        // A reset that fails leaves a broken connection, which the pool's check on
        // checkout finds.
        let _ = self.0.reset();
    }
}

/// MariaDB's "table doesn't exist".
const ER_NO_SUCH_TABLE: u16 = 1146;

/// Refuses a server that is not MariaDB 10.6 or later.
pub(crate) fn check_server(conn: &mut impl Queryable) -> Result<(), Error> {
    let version: Option<String> =
        conn.query_first("SELECT VERSION()")
            .map_err(|source| Error::MariaDb {
                context: "reading the server's version",
                source,
            })?;
    supported(&version.unwrap_or_default())
}

/// Refuses a `VERSION()` that is not MariaDB 10.6 or later.
fn supported(version: &str) -> Result<(), Error> {
    // From `VERSION()` (`10.11.19-MariaDB-...`): the handshake's version is `5.5.5-...` for
    // old clients' sake.
    let mut numbers = version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u16>().ok());
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if !version.contains("MariaDB") {
        return Err(Error::Unsupported {
            what: format!("the server {version}"),
            reason: "troutbox's MariaDB backend needs MariaDB (10.6 or later); MySQL differs in what the claim protocol relies on (idle_transaction_timeout, the named locks' behaviour)".into(),
        });
    }
    if (major, minor) < MIN_MARIADB_VERSION {
        return Err(Error::Unsupported {
            what: format!("MariaDB {version}"),
            reason: "the relay claims with SELECT ... FOR UPDATE SKIP LOCKED, which MariaDB has from 10.6: upgrade the server".into(),
        });
    }
    Ok(())
}

/// Runs a multi-statement text query and reads every result set, so that an error of any
/// statement is returned (dropping a result unread would swallow it). The rows of each
/// set that has rows, in order.
pub(crate) fn run_all(
    conn: &mut impl Queryable,
    text: &str,
) -> Result<Vec<Vec<Row>>, mysql::Error> {
    let mut result = conn.query_iter(text)?;
    let mut sets = Vec::new();
    while let Some(set) = result.iter() {
        let rows = set.collect::<Result<Vec<Row>, mysql::Error>>()?;
        sets.push(rows);
    }
    Ok(sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_10_6_and_mysql_are_refused() {
        assert!(supported("10.11.19-MariaDB-0+deb12u1").is_ok());
        assert!(supported("10.6.0-MariaDB").is_ok());
        assert!(supported("11.4.2-MariaDB-log").is_ok());
        for old in [
            "10.5.23-MariaDB",
            "10.3.39-MariaDB-0+deb10u1",
            "8.0.36",
            "5.7.44-log",
        ] {
            let e = supported(old).unwrap_err();
            assert!(matches!(e, Error::Unsupported { .. }), "{old}: {e}");
        }
    }
}
