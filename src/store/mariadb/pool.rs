//! An r2d2 pool of MariaDB connections: the manager, and a pool with the settings an outbox
//! needs.
//!
//! The manager is troutbox's own rather than the `r2d2_mysql` crate's: that one checks a
//! connection with a round trip (`PING`) each time it goes back to the pool
//! (`has_broken`), which would add a round trip to every producer transaction, and it
//! needs a newer Rust than troutbox's minimum. Here a connection is checked when it is
//! taken out (r2d2's `test_on_check_out`, on by default), as `r2d2_postgres` does.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Conn, Opts};

use crate::Error;

/// A pool of MariaDB connections, as troutbox's MariaDB store takes it.
pub type MariaDbPool = r2d2::Pool<MariaDbManager>;

/// An r2d2 connection manager for the `mysql` crate's [`Conn`].
#[derive(Debug, Clone)]
pub struct MariaDbManager {
    opts: Opts,
}

impl MariaDbManager {
    /// A manager opening connections with `opts` (for example
    /// `mysql::Opts::from_url("mysql://app:secret@db:3306/app")?`).
    pub fn new(opts: impl Into<Opts>) -> MariaDbManager {
        MariaDbManager { opts: opts.into() }
    }

    /// The options connections are opened with.
    pub fn opts(&self) -> &Opts {
        &self.opts
    }
}

impl r2d2::ManageConnection for MariaDbManager {
    type Connection = Conn;
    type Error = mysql::Error;

    fn connect(&self) -> Result<Conn, mysql::Error> {
        Conn::new(self.opts.clone())
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), mysql::Error> {
        conn.query_drop("DO 1")
    }

    fn has_broken(&self, _conn: &mut Conn) -> bool {
        false
    }
}

/// How long [`pool`] waits for a connection before giving up (r2d2's default is 30 s).
pub const MARIADB_POOL_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool of at most `max_size` connections to the MariaDB server at `url`
/// (`mysql://user:password@host:port/database`; the database must be named: the outbox's
/// tables live in it).
///
/// The pool opens one connection before returning, so that a wrong password, an unknown
/// host or a missing database is an error here, in the server's or the resolver's words,
/// rather than a timeout later. Connections time out after 10 s when the server does not
/// answer the connect (`tcp_connect_timeout`), and the pool waits at most
/// [`MARIADB_POOL_CONNECTION_TIMEOUT`] for a free connection.
pub fn pool(url: &str, max_size: u32) -> Result<MariaDbPool, Error> {
    let opts = Opts::from_url(url).map_err(|e| Error::InvalidConfig {
        option: "url",
        reason: format!("not a MariaDB URL ({e}); use mysql://user:password@host:port/database"),
    })?;
    if opts.get_db_name().is_none() {
        return Err(Error::InvalidConfig {
            option: "url",
            reason: "the URL names no database; the outbox's tables live in one: mysql://user:password@host:port/database".into(),
        });
    }
    let opts: Opts = mysql::OptsBuilder::from_opts(opts)
        .tcp_connect_timeout(Some(Duration::from_secs(10)))
        .into();
    let manager = MariaDbManager::new(opts);
    // The first connection directly: its error is the server's, not the pool's timeout.
    let first = r2d2::ManageConnection::connect(&manager).map_err(|source| Error::MariaDb {
        context: "connecting to MariaDB",
        source,
    })?;
    drop(first);
    r2d2::Pool::builder()
        .max_size(max_size)
        .connection_timeout(MARIADB_POOL_CONNECTION_TIMEOUT)
        .build(manager)
        .map_err(Error::pool("building the MariaDB pool"))
}
