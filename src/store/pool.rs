//! A connection pool with the settings an outbox needs, for users who would otherwise build
//! one with r2d2's defaults.

use std::time::Duration;

use r2d2_postgres::PostgresConnectionManager;

use super::pg::{MakeTls, PgPool};
use crate::Error;

/// How long a pool checkout waits for a connection, and how long a connection attempt may
/// take: 10 s (r2d2's default is 30 s, and the relay's watchdog waits that long, plus the
/// send timeout, before it gives up on a dead connection).
pub const POOL_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool of `max_size` connections to `config` without TLS, with the settings of
/// [`pool_with_tls`].
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = troutbox::pool("host=localhost user=app dbname=app".parse()?, 10)?;
/// let store = troutbox::PgStore::new(pool);
/// # Ok(()) }
/// ```
pub fn pool(config: postgres::Config, max_size: u32) -> Result<PgPool, Error> {
    pool_with_tls(config, postgres::NoTls, max_size)
}

/// A pool of `max_size` connections to `config` through `tls`, set up so that a connection
/// the network drops without a word (a NAT, a load balancer, a failover) costs seconds, not
/// hours:
///
/// - TCP keepalives after 30 s idle, every 10 s, 3 probes, and a 30 s `tcp_user_timeout`
///   (unacknowledged data): the kernel notices a dead peer within about a minute instead of
///   two hours;
/// - a 10 s connection and checkout timeout ([`POOL_CONNECTION_TIMEOUT`]), which also bounds
///   how long the relay's watchdog waits before it replaces a worker stuck on a dead
///   connection (`send_timeout` + this + 5 s);
/// - at most one idle connection kept warm, idle ones closed after 5 minutes and every
///   connection replaced after 30 minutes, so few idle connections are left for the
///   network to drop, and r2d2's check of a connection before handing it out rarely meets
///   one.
///
/// Connects once before returning: an unreachable server is an error here
/// ([`Error::Pool`]). Size it for the relay (its workers, plus one, plus one with
/// `notify`) and your producers.
pub fn pool_with_tls<T: MakeTls>(
    mut config: postgres::Config,
    tls: T,
    max_size: u32,
) -> Result<PgPool<T>, Error> {
    config
        .connect_timeout(POOL_CONNECTION_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    r2d2::Pool::builder()
        .max_size(max_size)
        .min_idle(Some(1))
        .connection_timeout(POOL_CONNECTION_TIMEOUT)
        .idle_timeout(Some(Duration::from_secs(300)))
        .max_lifetime(Some(Duration::from_secs(1800)))
        .build(PostgresConnectionManager::new(config, tls))
        .map_err(Error::pool("building the connection pool"))
}
