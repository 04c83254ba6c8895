//! A connection pool with the settings an outbox needs, for users who would otherwise build
//! one with r2d2's defaults.

use std::time::{Duration, Instant};

use r2d2::PooledConnection;
use r2d2_postgres::PostgresConnectionManager;

use super::{MakeTls, PgPool};
use crate::Error;

/// How long the relay gives a pooled connection to answer its first round trip before it
/// tries another: a healthy connection answers an empty query in a round trip, even over a
/// WAN; one that does not within a second is on a path that froze (see [`checkout`]).
pub(crate) const ANSWER_WITHIN: Duration = Duration::from_secs(1);

type Pooled<T> = PooledConnection<PostgresConnectionManager<T>>;

/// A connection for the relay, checked to answer, in bounded time whatever the network does.
///
/// A connection whose network path froze (a stuck proxy or pooler, a paused VM: TCP stays
/// up, so keepalives never fire) makes every call on it wait for ever, and r2d2's own check
/// of the connections it hands out (`test_on_check_out`) has no time bound. So the checkout
/// runs on a helper thread, and the connection is checked with an empty query bounded by
/// [`ANSWER_WITHIN`] (`Client::is_valid`). One that does not answer is kept by its helper,
/// which waits on it for as long as it stays silent (so it never goes back to the pool to
/// catch someone else, and goes back once it answers), and the next is tried at once. With a
/// pool that checks connections itself, a helper that has not returned within
/// [`ANSWER_WITHIN`] while idle connections are left is presumed stuck in that check, and
/// another one takes the next. The whole wait is bounded by the pool's connection timeout
/// plus [`ANSWER_WITHIN`]; each frozen idle connection costs about [`ANSWER_WITHIN`].
pub(crate) fn checkout<T: MakeTls>(
    pool: &PgPool<T>,
    context: &'static str,
) -> Result<Pooled<T>, Error> {
    type Answer<T> = Result<Pooled<T>, Error>;
    let (tx, rx) = crossbeam_channel::unbounded::<Answer<T>>();
    let waited = pool.connection_timeout() + ANSWER_WITHIN;
    let deadline = Instant::now() + waited;
    let spawn = |tx: crossbeam_channel::Sender<Answer<T>>| {
        let pool = pool.clone();
        std::thread::Builder::new()
            .name("troutbox-checkout".into())
            .spawn(move || {
                let mut conn = match pool.get() {
                    Ok(conn) => conn,
                    Err(e) => {
                        let _ = tx.send(Err(Error::pool(context)(e)));
                        return;
                    }
                };
                match conn.is_valid(ANSWER_WITHIN) {
                    // Nobody waiting any more: it answered, so dropping it here puts it back.
                    Ok(()) => drop(tx.send(Ok(conn))),
                    Err(_) if conn.is_closed() => {
                        drop(tx.send(Err(Error::NoAnswer {
                            context,
                            waited: ANSWER_WITHIN,
                        })));
                    }
                    Err(_) => {
                        let _ = tx.send(Err(Error::NoAnswer {
                            context,
                            waited: ANSWER_WITHIN,
                        }));
                        // Silent: hold it until it answers (then it goes back to the pool).
                        let _ = conn.simple_query("");
                    }
                }
            })
            .map_err(Error::Spawn)
    };
    spawn(tx.clone())?;
    let mut helpers = 1usize;
    let mut last_error = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left.min(ANSWER_WITHIN)) {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => {
                helpers -= 1;
                let silent = matches!(e, Error::NoAnswer { .. });
                last_error = Some(e);
                if silent && spawn(tx.clone()).is_ok() {
                    // That connection is silent: try the next one at once.
                    helpers += 1;
                } else if helpers == 0 {
                    // A real answer (refused, authentication, pool timeout): say it now.
                    break;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                // Still no answer: a helper may be stuck in the pool's own check. If idle
                // connections are left, one more helper tries the next.
                if pool.state().idle_connections > 0 && spawn(tx.clone()).is_ok() {
                    helpers += 1;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
    }
    Err(last_error.unwrap_or(Error::NoAnswer { context, waited }))
}

/// How long a pool checkout waits for a connection, and how long a connection attempt may
/// take: 10 s (r2d2's default is 30 s). The relay's own checkouts add at most one second
/// per connection that does not answer.
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
/// - a 10 s connection and checkout timeout ([`POOL_CONNECTION_TIMEOUT`]); the relay's own
///   checkouts also give each connection one second to answer (a connection on a frozen
///   network path is set aside and the next one tried), and its watchdog replaces a worker
///   whose call has not returned after `send_timeout` + 8 s: with the defaults, a frozen
///   path costs the relay at most `send_timeout` + 15 s;
/// - at most one idle connection kept warm, idle ones closed after 5 minutes and every
///   connection replaced after 30 minutes, so few idle connections are left for the
///   network to drop, and r2d2's check of a connection before handing it out rarely meets
///   one.
///
/// Connects once before returning: a server that refuses (wrong database, user or
/// password, connection refused) is an error here at once, in the server's words
/// ([`Error::Database`]), and one that does not answer within the connect timeout too. Size it for the relay (its workers, plus one, plus one with
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
    // One direct connection first: a wrong database, user or password, or a server that
    // refuses, is reported at once with the server's own words (r2d2 would retry for the
    // whole connection timeout, then say only "db error").
    config
        .connect(tls.clone())
        .map_err(|error| Error::Database {
            context: "connecting to PostgreSQL",
            error,
        })?;
    r2d2::Pool::builder()
        .max_size(max_size)
        .min_idle(Some(1))
        .connection_timeout(POOL_CONNECTION_TIMEOUT)
        .idle_timeout(Some(Duration::from_secs(300)))
        .max_lifetime(Some(Duration::from_secs(1800)))
        .build(PostgresConnectionManager::new(config, tls))
        .map_err(Error::pool("building the connection pool"))
}
