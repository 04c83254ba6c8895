//! The MariaDB backend (feature `mariadb`): the same outbox on MariaDB 10.6 or later, with
//! the sync `mysql` crate and an r2d2 pool, no async runtime.
//!
//! Producers add messages inside their own `mysql` transaction; a relay claims, sends and
//! settles them through the same claim protocol as PostgreSQL's (journal, charges, isolated
//! suspects, late settlements: the guarantees in RELIABILITY.md hold on both), and dead
//! letters have the same admin calls.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use troutbox::mariadb::mysql::{prelude::Queryable, TxOpts};
//! use troutbox::mariadb::{pool, MariaDbOutbox, MariaDbStore};
//! use troutbox::Batch;
//!
//! let pool = pool("mysql://app:secret@127.0.0.1:3306/app", 8)?;
//! let outbox = MariaDbOutbox::builder(MariaDbStore::new(pool.clone())).build()?;
//! outbox.migrate()?;
//!
//! let mut conn = pool.get()?;
//! let mut tx = conn.start_transaction(TxOpts::default())?;
//! tx.exec_drop("UPDATE orders SET state = 'paid' WHERE id = ?", (42,))?;
//! outbox.add_message(&mut tx, "order-42", b"{\"id\":42}")?;
//! tx.commit()?;
//!
//! let mut handle = outbox.start(|batch: &mut Batch| -> Result<(), std::io::Error> {
//!     for msg in batch.iter_mut() {
//!         println!("{} {}", msg.key(), String::from_utf8_lossy(msg.value()));
//!         msg.mark_sent();
//!     }
//!     Ok(())
//! })?;
//! handle.shutdown()?;
//! # Ok(()) }
//! ```
//!
//! # What differs from PostgreSQL
//!
//! - **Polling only.** MariaDB has no `LISTEN`: the relay finds commits of other processes
//!   by polling (`poll_interval`, 100 ms by default), and those of this process's outbox at
//!   once, as on PostgreSQL.
//! - **Delete on send only.** There is no `keep_sent` retention (PostgreSQL's keeps sent
//!   messages in time partitions): [`MariaDbStore`] has no retention option to set.
//! - **The send timeout is whole seconds** on the server (`idle_transaction_timeout`, the
//!   send timeout rounded up): a claim's transaction ends at most a second later than on
//!   PostgreSQL.
//! - **Claims run `READ COMMITTED`** whatever the server's default (REPEATABLE READ), so a
//!   claim never takes the gap locks that would block producers' INSERTs. Producers keep
//!   whatever isolation their transaction has.
//! - **Statement-based binary logs refuse `SKIP LOCKED`**: a server that replicates with
//!   `binlog_format=STATEMENT` must use `ROW` (or `MIXED`) for the relay's claims.
//! - **Per-key ordering** locks each key's bucket (1,024 buckets by `CRC32`, row locks
//!   released at COMMIT or ROLLBACK) instead of PostgreSQL's transaction-scoped advisory
//!   locks: MariaDB's `GET_LOCK` outlives the transaction. Two keys that share a bucket
//!   wait for each other's producers.
//! - **`add_messages` is cut to `max_allowed_packet`**: its rows go in statements of at
//!   most 100 that fit the server's packet bound; one message that cannot fit is refused
//!   ([`Error::Unsupported`]) before anything is sent.
//! - The `troutbox` command line (features `cli` and `mariadb`) takes a `mysql://` URL for
//!   `migrate`, `status` and `dead`. Not yet on MariaDB: its other commands, the
//!   OpenTelemetry instruments, the inbox, blocked-key reports.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender as ChannelSender};
use mysql::prelude::Queryable;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::observability::Telemetry;
use crate::outbox::producer::NewMessage;
use crate::outbox::STUCK_MARGIN;
use crate::relay::handle::Handle;
use crate::relay::sender::Sender;
use crate::store::mariadb::claims::MariaClaims;
use crate::store::mariadb::producer;
use crate::store::mariadb::sql::Sql;
use crate::store::protocol::ProtocolRelay;
use crate::Error;

pub use crate::store::mariadb::pool::{
    pool, MariaDbManager, MariaDbPool, MARIADB_POOL_CONNECTION_TIMEOUT,
};
pub use crate::store::mariadb::{MariaDbStore, MIN_MARIADB_VERSION};
/// The `mysql` crate troutbox's MariaDB backend is built on, re-exported so your versions
/// always match.
pub use mysql;

/// A transactional outbox on one MariaDB table: [`Outbox`](crate::Outbox)'s calls, on a
/// [`MariaDbStore`]. Cheap to clone and safe to share between threads.
#[derive(Clone)]
pub struct MariaDbOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    store: MariaDbStore,
    sql: Arc<Sql>,
    config: Config,
    wake_tx: ChannelSender<()>,
    wake_rx: Receiver<()>,
    mode_checked: AtomicBool,
    /// The server's `max_allowed_packet`, read on the first `add_messages` (0 until then).
    max_packet: AtomicUsize,
}

impl std::fmt::Debug for MariaDbOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MariaDbOutbox")
            .field("store", &self.inner.store)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl MariaDbOutbox {
    /// Starts configuring an outbox on `store`; every option has a default.
    pub fn builder(store: MariaDbStore) -> MariaDbOutboxBuilder {
        MariaDbOutboxBuilder {
            store,
            config: Config::default(),
        }
    }

    /// The store this outbox writes to.
    pub fn store(&self) -> &MariaDbStore {
        &self.inner.store
    }

    /// Creates or updates the tables as [`MariaDbStore::migrate`] does, and records this
    /// outbox's ordering mode: with
    /// [`per_key_ordering(true)`](MariaDbOutboxBuilder::per_key_ordering) the table becomes
    /// ordered; an unordered outbox on an ordered table is refused
    /// ([`Error::OrderingMismatch`]), as on PostgreSQL.
    pub fn migrate(&self) -> Result<(), Error> {
        self.inner
            .store
            .migrate_with(Some(self.inner.config.ordered))
    }

    /// Adds one message in `conn`'s transaction: a [`mysql::Transaction`], or a connection
    /// (then the message commits at once). Nothing is sent until that transaction commits;
    /// a rollback removes it. The same checks and limits as
    /// [`Outbox::add_message`](crate::Outbox::add_message).
    pub fn add_message<Q: Queryable>(
        &self,
        conn: &mut Q,
        key: &str,
        value: &[u8],
    ) -> Result<(), Error> {
        self.add(conn, &NewMessage::new(key, value))
    }

    /// Adds one message with headers (see [`add_message`](Self::add_message)).
    pub fn add<Q: Queryable>(&self, conn: &mut Q, message: &NewMessage<'_>) -> Result<(), Error> {
        self.add_messages(conn, [message.clone()]).map(drop)
    }

    /// Adds several messages in `conn`'s transaction, in order, in as few statements as
    /// the server's `max_allowed_packet` allows (at most 100 rows each); the number added.
    /// The same limits per call as [`Outbox::add_messages`](crate::Outbox::add_messages).
    pub fn add_messages<'m, Q, I>(&self, conn: &mut Q, messages: I) -> Result<u64, Error>
    where
        Q: Queryable,
        I: IntoIterator<Item = NewMessage<'m>>,
    {
        let messages: Vec<NewMessage<'m>> = messages.into_iter().collect();
        if messages.is_empty() {
            return Ok(0);
        }
        let inner = &self.inner;
        NewMessage::validate_call(&messages, inner.config.max_value_size)?;
        if !inner.mode_checked.load(Ordering::Relaxed) {
            inner.store.check_ordering(conn, inner.config.ordered)?;
            inner.mode_checked.store(true, Ordering::Relaxed);
        }
        let mut max_packet = inner.max_packet.load(Ordering::Relaxed);
        if max_packet == 0 {
            max_packet = producer::max_packet(conn, &inner.store)?;
            inner.max_packet.store(max_packet, Ordering::Relaxed);
        }
        let rows: Vec<producer::NewRow<'_>> = messages
            .iter()
            .map(|m| producer::NewRow {
                key: m.key(),
                value: m.value(),
                headers: producer::encode_headers(m.headers().iter().copied()),
            })
            .collect();
        let added = producer::insert(
            conn,
            &inner.store,
            &inner.sql,
            inner.config.ordered,
            &rows,
            max_packet,
        )?;
        // An idle local worker polls soon (as on PostgreSQL).
        let _ = inner.wake_tx.try_send(());
        Ok(added)
    }

    /// Starts the relay: `workers` threads that claim batches of committed, due messages and
    /// hand them to `sender`, as [`Outbox::start`](crate::Outbox::start) does. Checks the
    /// server (MariaDB 10.6 or later), the table and its ordering mode before returning.
    /// Each worker keeps one pooled connection, the claim journal one more.
    pub fn start<S>(&self, sender: S) -> Result<Handle, Error>
    where
        S: Sender + Clone,
    {
        let config = &self.inner.config;
        let pool = self.inner.store.pool();
        let size = pool.max_size();
        let needed = u32::try_from(config.workers)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        if size < needed {
            return Err(Error::PoolTooSmall {
                size,
                needed,
                workers: config.workers,
                notify: false,
            });
        }
        let stuck_after = config.send_timeout.max(pool.connection_timeout()) + STUCK_MARGIN;
        let claims = MariaClaims::new(self.inner.store.clone(), &self.inner.sql, stuck_after)?;
        let relay = Arc::new(ProtocolRelay::new(claims, config));
        let mut config = config.clone();
        config.stuck_after = stuck_after;
        crate::relay::spawn(
            relay,
            sender,
            &config,
            Arc::new(Telemetry::default()),
            self.inner.wake_tx.clone(),
            self.inner.wake_rx.clone(),
        )
    }
}

/// Configures a [`MariaDbOutbox`]: the options of [`OutboxBuilder`](crate::OutboxBuilder)
/// that MariaDB supports, with the same defaults and ranges. [`build`](Self::build)
/// validates them and never panics.
pub struct MariaDbOutboxBuilder {
    store: MariaDbStore,
    config: Config,
}

impl std::fmt::Debug for MariaDbOutboxBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MariaDbOutboxBuilder")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

impl MariaDbOutboxBuilder {
    /// Messages per batch, 1 to 10,000; 100 by default. See
    /// [`OutboxBuilder::batch_size`](crate::OutboxBuilder::batch_size).
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
        self
    }

    /// A bound on a batch's bytes; 64 MiB by default. See
    /// [`OutboxBuilder::max_batch_bytes`](crate::OutboxBuilder::max_batch_bytes).
    #[must_use]
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.config.max_batch_bytes = bytes;
        self
    }

    /// Retries before a message is dead, 0 to 10,000; 10 by default. See
    /// [`OutboxBuilder::max_retries`](crate::OutboxBuilder::max_retries).
    #[must_use]
    pub fn max_retries(mut self, n: u32) -> Self {
        self.config.max_retries = n;
        self
    }

    /// The delay between a failure and the next attempt. See
    /// [`OutboxBuilder::backoff`](crate::OutboxBuilder::backoff).
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// The longest an idle worker sleeps between polls, 1 ms to 1 hour; 100 ms by default.
    /// MariaDB has no `LISTEN`: this is how the relay finds other processes' commits.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// The longest a batch's transaction stays open while the Sender runs; 30 s by default.
    /// The server enforces it in whole seconds (`idle_transaction_timeout`, rounded up). See
    /// [`OutboxBuilder::send_timeout`](crate::OutboxBuilder::send_timeout).
    #[must_use]
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.config.send_timeout = timeout;
        self
    }

    /// Relay worker threads, 1 to 64; 1 by default.
    #[must_use]
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// How long [`Handle::shutdown`] waits for batches in flight; 30 s by default.
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Per-key ordering, as
    /// [`OutboxBuilder::per_key_ordering`](crate::OutboxBuilder::per_key_ordering); `false`
    /// by default. On MariaDB a key's producers wait on its bucket's row lock (1,024
    /// buckets), and the relay finds each key's head with a descent of the key index per
    /// key with pending messages.
    #[must_use]
    pub fn per_key_ordering(mut self, on: bool) -> Self {
        self.config.ordered = on;
        self
    }

    /// The largest value accepted, 1 byte to 512 MiB; 1 MiB by default (and at most what
    /// the server's `max_allowed_packet` carries).
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.config.max_value_size = bytes;
        self
    }

    /// Called with every error the relay meets. See
    /// [`OutboxBuilder::error_handler`](crate::OutboxBuilder::error_handler).
    #[must_use]
    pub fn error_handler(mut self, handler: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.config.error_handler = Arc::new(handler);
        self
    }

    /// Validates the options and the table's name, and builds the outbox. Does not touch
    /// the database.
    pub fn build(self) -> Result<MariaDbOutbox, Error> {
        self.config.validate()?;
        let sql = self.store.sql()?;
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        Ok(MariaDbOutbox {
            inner: Arc::new(Inner {
                store: self.store,
                sql,
                config: self.config,
                wake_tx,
                wake_rx,
                mode_checked: AtomicBool::new(false),
                max_packet: AtomicUsize::new(0),
            }),
        })
    }
}
