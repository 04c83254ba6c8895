//! What the shared suite needs of a backend ([`Backend`]), and the helpers its bodies share.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use troutbox::{Backlog, Backoff, DeadMessage, Error, Handle, NewMessage, Sender};

/// How long a test waits for what must happen.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The outbox options a test sets; everything else is the default a user gets.
#[derive(Clone, Debug)]
pub struct Opts {
    pub ordered: bool,
    pub workers: usize,
    pub batch_size: Option<usize>,
    pub max_retries: Option<u32>,
    pub backoff: Option<Backoff>,
    pub poll_interval: Option<Duration>,
    /// Every error the relay reported, as text.
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            ordered: false,
            workers: 1,
            batch_size: None,
            max_retries: None,
            backoff: None,
            poll_interval: None,
            errors: Arc::default(),
        }
    }
}

/// Retries a few milliseconds apart: for tests of what happens after retries.
pub fn fast_backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(10), Duration::from_millis(20)).without_jitter()
}

/// A storage backend as the suite drives it. Each test works in a place of its own, named
/// `name` (PostgreSQL: a schema; MariaDB: a table), next to a table of durable deliveries
/// (what a broker acknowledged), which survives a killed relay.
pub trait Backend: 'static {
    type Outbox: Clone + Send + Sync + 'static;
    /// A pool on the server.
    type Db: Clone + Send + Sync + 'static;
    /// A private server, for tests that stop it.
    type Server;

    const NAME: &'static str;

    /// The shared server of this test process.
    fn url() -> String;
    fn db(url: &str, size: u32) -> Self::Db;
    /// Drops and recreates `name`'s outbox (migrated, with `opts`' ordering) and its
    /// deliveries table; the outbox.
    fn fresh(db: &Self::Db, name: &str, opts: &Opts) -> Self::Outbox;
    /// Drops everything of `name` (its outbox, its deliveries, its rows in the tables of
    /// versions and modes).
    fn forget(db: &Self::Db, name: &str);
    /// Runs the backend's `migrate` on `name` again (as another instance would).
    fn migrate_again(db: &Self::Db, name: &str) -> Result<(), Error>;
    /// An outbox on the existing `name` (a relay child's).
    fn attach(db: &Self::Db, name: &str, opts: &Opts) -> Self::Outbox;
    /// Adds `messages` in one transaction, committed or rolled back.
    fn produce(
        outbox: &Self::Outbox,
        db: &Self::Db,
        messages: &[NewMessage<'_>],
        commit: bool,
    ) -> Result<(), Error>;
    fn start<S: Sender + Clone>(outbox: &Self::Outbox, sender: S) -> Result<Handle, Error>;
    fn backlog(outbox: &Self::Outbox) -> Result<Backlog, Error>;
    fn dead(outbox: &Self::Outbox) -> Vec<DeadMessage>;
    fn requeue_all_dead(outbox: &Self::Outbox) -> u64;
    fn purge_dead(outbox: &Self::Outbox, ids: &[i64]) -> u64;
    /// Records deliveries durably (id, value), as a broker's acknowledgement.
    fn record(db: &Self::Db, name: &str, rows: &[(i64, Vec<u8>)]) -> Result<(), Error>;
    /// Every recorded delivery, in the order recorded.
    fn delivered(db: &Self::Db, name: &str) -> Vec<(i64, Vec<u8>)>;
    /// Ends every other session on the server, as an operator or a failover would.
    fn terminate_other_sessions(db: &Self::Db) -> usize;

    fn private_server() -> Self::Server;
    fn server_url(server: &Self::Server) -> String;
    fn stop(server: &mut Self::Server);
    fn restart(server: &mut Self::Server);
}

/// Polls `condition` until it holds or `patience` runs out (nothing to wait on: the state
/// is in the database).
pub fn eventually(patience: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A random number below `n`, from std's random hasher seeds.
pub fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n.max(1)
}

/// The errors of `opts`' relays that are not the Sender's: database and protocol errors,
/// which a run without injected faults must not have.
pub fn store_errors(opts: &Opts) -> Vec<String> {
    opts.errors
        .lock()
        .unwrap()
        .iter()
        .filter(|e| !e.starts_with("sender failed"))
        .cloned()
        .collect()
}
