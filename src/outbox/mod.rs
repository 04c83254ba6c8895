//! The [`Outbox`] and its builder: the entry point that ties producer and relay together.
//! Its producer calls are here too; the work they do is in [`producer`].

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender as ChannelSender};
use postgres::{GenericClient, NoTls};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::observability::Telemetry;
use crate::relay::handle::Handle;
use crate::relay::sender::Sender;
use crate::store::postgres::claims::PgClaims;
use crate::store::postgres::sql::Sql;
use crate::store::postgres::{MakeTls, PgStore};
use crate::store::protocol::{ClaimBackend, ProtocolRelay};
use crate::Error;
use producer::{NewMessage, PreparedProducer};

/// The work behind the producer calls.
pub(crate) mod producer;

/// What a relay's database call may take beyond the send timeout (or the pool's connection
/// timeout, if longer) before the watchdog presumes its connection dead. With the defaults
/// (30 s send timeout) a call is given up on 38 s after it began, and a frozen network path
/// costs at most `send_timeout + 15 s` of delivery (see RELIABILITY.md, "Frozen paths").
pub(crate) const STUCK_MARGIN: Duration = Duration::from_secs(8);

/// A transactional outbox on one PostgreSQL table.
///
/// Producers add messages inside their own transactions with
/// [`add_message`](Outbox::add_message); a relay started with [`start`](Outbox::start)
/// delivers them to a [`Sender`]. Cheap to clone and safe to share between threads.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use r2d2_postgres::PostgresConnectionManager;
/// use troutbox::{Batch, Outbox, PgStore};
///
/// let config = "host=localhost user=app dbname=app".parse()?;
/// let pool = r2d2::Pool::new(PostgresConnectionManager::new(config, postgres::NoTls))?;
/// let store = PgStore::new(pool.clone());
/// store.migrate()?;
/// let outbox = Outbox::builder(store).batch_size(100).max_retries(5).build()?;
///
/// let mut client = pool.get()?;
/// let mut tx = client.transaction()?;
/// outbox.add_message(&mut tx, "order-42", b"{\"id\":42}")?;
/// tx.commit()?;
///
/// let mut handle = outbox.start(|batch: &mut Batch| -> Result<(), std::io::Error> {
///     for msg in batch.iter_mut() {
///         println!("{} {}", msg.key(), String::from_utf8_lossy(msg.value()));
///         msg.mark_sent();
///     }
///     Ok(())
/// })?;
/// handle.shutdown()?;
/// # Ok(()) }
/// ```
// No PartialEq: an outbox is a pool, settings and an error handler (a closure, which has no
// equality); two outboxes on one table are still two.
pub struct Outbox<T: MakeTls = NoTls> {
    pub(crate) inner: Arc<Inner<T>>,
}

pub(crate) struct Inner<T: MakeTls> {
    pub(crate) store: PgStore<T>,
    pub(crate) sql: Arc<Sql>,
    pub(crate) config: Config,
    /// Wakes an idle relay worker of this outbox after a local `add_message`.
    pub(crate) wake_tx: ChannelSender<()>,
    pub(crate) wake_rx: Receiver<()>,
    /// With `notify(true)`: when (µs since `epoch`, never 0) an INSERT of this outbox last
    /// carried the signal; see `producer::NOTIFY_COALESCE`.
    pub(crate) notified_at: std::sync::atomic::AtomicU64,
    pub(crate) epoch: std::time::Instant,
    /// The table's ordering mode was found to be the outbox's (see `Outbox::check_mode`).
    pub(crate) mode_checked: std::sync::atomic::AtomicBool,
    /// The outbox's OpenTelemetry instruments, shared by all its relays.
    #[cfg(feature = "opentelemetry")]
    pub(crate) otel: Arc<crate::observability::otel::Instruments>,
}

impl<T: MakeTls> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Outbox {
            inner: self.inner.clone(),
        }
    }
}

impl<T: MakeTls> std::fmt::Debug for Outbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("store", &self.inner.store)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl<T: MakeTls> Outbox<T> {
    /// Starts configuring an outbox on `store`. Every option has a default; see
    /// [`OutboxBuilder`].
    pub fn builder(store: PgStore<T>) -> OutboxBuilder<T> {
        OutboxBuilder {
            store,
            config: Config::default(),
        }
    }

    /// The store this outbox writes to.
    pub fn store(&self) -> &PgStore<T> {
        &self.inner.store
    }

    /// Creates or updates the table as [`PgStore::migrate`] does, and records this outbox's
    /// ordering mode with it, so that producers and relays that disagree are refused
    /// ([`Error::OrderingMismatch`]) rather than silently losing the order.
    ///
    /// With [`per_key_ordering(true)`](OutboxBuilder::per_key_ordering), this is how a table
    /// becomes ordered: it creates the index the ordered relay reads (on a table with many
    /// rows, PostgreSQL builds it while holding producers off), and records the mode. A table
    /// that was relayed unordered is converted; the messages already in it are relayed in
    /// order from then on, but the order of their ids is whatever their unordered producers
    /// drew. `PgStore::migrate` alone never changes a recorded mode, and a table never goes
    /// back from ordered to unordered: an unordered outbox's `migrate` on an ordered table
    /// returns [`Error::OrderingMismatch`]. Producers and relays check the mode once (per
    /// `Outbox` and per relay session): stop the unordered ones before converting a table,
    /// or their messages are added and relayed without the order.
    ///
    /// It also records, for the table's SQL producer function (`<table>_add`, for clients in
    /// other languages; see docs/sql-producer.md), this outbox's
    /// [`max_value_size`](OutboxBuilder::max_value_size), which the function then applies,
    /// and, with [`notify(true)`](OutboxBuilder::notify), that the function signals the
    /// relays: the function cannot see any builder, so the outbox that migrates speaks for
    /// it. `notify` is only ever turned on this way (a relay elsewhere may depend on the
    /// signal); the size limit is the last migrating outbox's.
    pub fn migrate(&self) -> Result<(), Error> {
        let config = &self.inner.config;
        self.inner.store.migrate_for(
            Some(config.ordered),
            Some((config.notify, config.max_value_size)),
        )
    }

    /// Starts the relay: `workers` threads that claim batches of committed, due messages and
    /// hand them to `sender` (each thread gets its own clone).
    ///
    /// Before returning, one connection is taken from the pool and the claim statement is
    /// prepared on it, so an unreachable database or a table that was never migrated is an
    /// error here rather than in the background. Each worker keeps one pooled connection
    /// while it runs, the claim journal one more, and `notify(true)` one more: a pool
    /// smaller than that is [`Error::PoolTooSmall`], which names the size needed.
    ///
    /// Stop the relay with [`Handle::shutdown`]; dropping the handle stops it too. Each call
    /// starts another relay, with workers and a journal connection of its own: two calls on
    /// one `Outbox` run two relays side by side (safe, as any number of relays sharing a
    /// table is, but rarely what a program means).
    pub fn start<S>(&self, sender: S) -> Result<Handle, Error>
    where
        S: Sender + Clone,
    {
        let config = &self.inner.config;
        let size = self.inner.store.pool().max_size();
        let needed = u32::try_from(config.workers)
            .unwrap_or(u32::MAX)
            .saturating_add(1 + u32::from(config.notify));
        if size < needed {
            return Err(Error::PoolTooSmall {
                size,
                needed,
                workers: config.workers,
                notify: config.notify,
            });
        }
        // A database call of the relay waits for a pool checkout (bounded by the pool's
        // connection timeout, see `store::postgres::pool::checkout`) or for statements the server
        // bounds by the send timeout; one that has not returned 8 s after the longer of
        // the two is on a dead connection.
        let stuck_after = self
            .inner
            .config
            .send_timeout
            .max(self.inner.store.pool().connection_timeout())
            + STUCK_MARGIN;
        let claims = PgClaims::new(
            self.inner.store.clone(),
            self.inner.sql.clone(),
            stuck_after,
        );
        let relay = Arc::new(ProtocolRelay::new(claims, &self.inner.config));
        // Wake-ups from other processes' commits (`notify(true)`), if the backend has them.
        let wake_ups = if config.notify {
            let errors = config.error_handler.clone();
            relay.backend.wake_ups(self.inner.wake_tx.clone(), errors)
        } else {
            None
        };
        let telemetry = Telemetry {
            #[cfg(feature = "opentelemetry")]
            otel: Some(self.inner.otel.clone()),
            ..Telemetry::default()
        };
        let mut config = self.inner.config.clone();
        config.stuck_after = stuck_after;
        let mut handle = crate::relay::spawn(
            relay,
            sender,
            &config,
            Arc::new(telemetry),
            self.inner.wake_tx.clone(),
            self.inner.wake_rx.clone(),
        )?;
        if let Some(wake_ups) = wake_ups {
            handle.attach("troutbox-listener", wake_ups)?;
        }
        Ok(handle)
    }
}

/// Configures an [`Outbox`]. Obtained from [`Outbox::builder`]; [`build`](Self::build)
/// validates every value and returns an error, never panics.
// No PartialEq: it holds a store (a pool) and closures, which have no equality.
pub struct OutboxBuilder<T: MakeTls = NoTls> {
    store: PgStore<T>,
    config: Config,
}

// Producing: the calls a service makes inside its own transactions. The work they do
// (validation, the INSERT statements, the notification signal) is in producer.rs.
impl<T: MakeTls> Outbox<T> {
    /// Adds a message to the outbox through `client`, normally the caller's own
    /// [`postgres::Transaction`]: the message exists for the relay if and only if that
    /// transaction commits.
    ///
    /// `client` can be anything implementing [`GenericClient`]: a `Transaction`, a `Client`
    /// or a pooled connection (`&mut *conn`), so the producer never needs a second
    /// connection. One round trip, no locks beyond the new row, and the only privilege it
    /// needs is INSERT on the outbox table (which is why it does not return the new id: that
    /// would need SELECT too; the Sender sees it as [`Message::id`](crate::Message::id)).
    ///
    /// Rejected before anything reaches the database, leaving the transaction usable: a key
    /// with a NUL byte ([`Error::KeyContainsNul`]) or over [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes
    /// ([`Error::KeyTooLong`]), a value over the configured `max_value_size`
    /// ([`Error::ValueTooLarge`]). The empty key is accepted: it is a key like any other
    /// (with per-key ordering, every message with an empty key is in one order).
    ///
    /// ```no_run
    /// # fn f(outbox: &troutbox::Outbox, client: &mut postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = client.transaction()?;
    /// tx.execute("UPDATE orders SET state = 'paid' WHERE id = $1", &[&42i64])?;
    /// outbox.add_message(&mut tx, "order-42", b"{\"paid\":true}")?;
    /// tx.commit()?;
    /// # Ok(()) }
    /// ```
    pub fn add_message<C: GenericClient>(
        &self,
        client: &mut C,
        key: &str,
        value: &[u8],
    ) -> Result<(), Error> {
        self.add(client, &NewMessage::new(key, value))
    }

    /// Adds one message with headers; otherwise like [`add_message`](Self::add_message).
    pub fn add<C: GenericClient>(
        &self,
        client: &mut C,
        message: &NewMessage<'_>,
    ) -> Result<(), Error> {
        self.add_on(client, message)
    }

    /// Adds many messages in one statement and one round trip; their ids are drawn in the
    /// order given. Returns how many were added. All are validated first: if one is invalid,
    /// none is added.
    ///
    /// ```no_run
    /// # fn f(outbox: &troutbox::Outbox, tx: &mut postgres::Transaction<'_>) -> Result<(), troutbox::Error> {
    /// use troutbox::NewMessage;
    /// let added = outbox.add_messages(tx, [
    ///     NewMessage::new("order-1", b"created"),
    ///     NewMessage::new("order-2", b"created").header("traceparent", "00-...-01"),
    /// ])?;
    /// assert_eq!(added, 2);
    /// # Ok(()) }
    /// ```
    pub fn add_messages<'m, C, I>(&self, client: &mut C, messages: I) -> Result<u64, Error>
    where
        C: GenericClient,
        I: IntoIterator<Item = NewMessage<'m>>,
    {
        self.add_messages_on(client, messages)
    }

    /// Prepares the producer's statements on `client`'s connection, for producers that add
    /// messages on the same connection again and again (a connection-per-thread server, a
    /// batch job): the server then parses and plans the INSERT once instead of at every
    /// call, which BENCHMARKS.md measures at 5 to 20 % of a one-INSERT transaction.
    ///
    /// Use the returned [`PreparedProducer`] only with that connection and the transactions
    /// opened on it; on another connection the database answers that the prepared statement
    /// does not exist ([`Error::Database`]). Preparing costs one round trip per statement (three).
    ///
    /// ```no_run
    /// # fn f(outbox: &troutbox::Outbox, client: &mut postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let producer = outbox.prepare(client)?;
    /// for i in 0..1000 {
    ///     let mut tx = client.transaction()?;
    ///     producer.add_message(&mut tx, &format!("order-{i}"), b"created")?;
    ///     tx.commit()?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn prepare<C: GenericClient>(&self, client: &mut C) -> Result<PreparedProducer<T>, Error> {
        self.prepare_on(client)
    }
}

impl<T: MakeTls> std::fmt::Debug for OutboxBuilder<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBuilder")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

impl<T: MakeTls> OutboxBuilder<T> {
    /// How many messages the relay claims and hands to the Sender at once, 1 to 10,000.
    /// Larger batches amortise round trips and commits. Defaults to 100.
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
        self
    }

    /// A bound on the bytes of one batch (values plus headers as stored), which the relay
    /// holds in memory and hands to the Sender: a worker's memory is bounded by it whatever
    /// the messages' sizes, not only by `batch_size`. A claim stops before the message
    /// that would cross it, in id order; a single message larger than the bound is still
    /// claimed, alone, so nothing is ever stuck behind it. Defaults to 64 MiB
    /// ([`DEFAULT_MAX_BATCH_BYTES`](crate::DEFAULT_MAX_BATCH_BYTES)); `usize::MAX` turns
    /// the bound off (the claim then skips the sizing step); 0 is refused.
    ///
    /// The rows past the bound that the claim had locked stay locked, unsent, until the
    /// batch ends, and are claimed by the next one.
    #[must_use]
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.config.max_batch_bytes = bytes;
        self
    }

    /// How many times a failed message is retried before it is declared dead, 0 to 10,000:
    /// a message is dead after `max_retries + 1` failed attempts. Defaults to 10.
    #[must_use]
    pub fn max_retries(mut self, n: u32) -> Self {
        self.config.max_retries = n;
        self
    }

    /// The delay between a failure and the next attempt. Also used to slow a worker down
    /// while the Sender fails whole batches (a broker outage), so an outage does not use up
    /// every message's retries at full speed. Defaults to [`Backoff::default`]:
    /// exponential from 1 s, capped at 5 minutes, with jitter.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// The longest an idle worker sleeps between two polls, 1 ms to 1 hour. Polling is
    /// adaptive: after it finds work, or after [`add_message`](Outbox::add_message) on this
    /// outbox, a worker polls again after 1 ms and doubles the sleep while nothing is due,
    /// up to this value. While batches come back full it does not sleep at all.
    /// Defaults to 100 ms.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// The longest a batch's transaction may stay open while the Sender runs, 10 ms to about
    /// 24 days. Enforced by the server (`idle_in_transaction_session_timeout`): when it
    /// expires, the server ends the relay's session, the batch's messages become claimable
    /// by other workers, and the late outcome is recorded afterwards for the messages no
    /// other worker has claimed in the meantime (the others may be delivered twice).
    /// Defaults to 30 s.
    #[must_use]
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.config.send_timeout = timeout;
        self
    }

    /// Number of relay worker threads started by each [`Outbox::start`], 1 to 64. Each holds
    /// one pooled connection. Defaults to 1.
    #[must_use]
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// How long [`Handle::shutdown`] waits for workers to finish their batch in flight
    /// before it gives up on them and returns [`Error::ShutdownTimedOut`]. Defaults to 30 s.
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Cross-process wake-ups through PostgreSQL `LISTEN`/`NOTIFY`. Defaults to `false`.
    ///
    /// With `true`, an INSERT of this outbox also signals the table's channel, in the same
    /// statement (no extra round trip), with an empty payload, so PostgreSQL sends at most one
    /// notification per producing transaction at its COMMIT, and none on ROLLBACK. At most
    /// one INSERT per 5 ms per `Outbox` (and its clones) carries the signal: a commit in that
    /// window is found by the relay the earlier one woke, which polls again within
    /// milliseconds, or, if that earlier transaction rolls back or commits much later, by
    /// polling. This is what keeps the cost low for busy producers, whose relay is awake
    /// anyway. Each
    /// [`Handle`] this outbox starts keeps one more pooled connection that `LISTEN`s on the
    /// channel and wakes an idle worker at once: a relay in another process sees a commit
    /// within milliseconds whatever the message rate, instead of within the poll interval.
    ///
    /// The cost is on the producer: at COMMIT, a transaction that notified takes a lock that
    /// serializes the commits of all notifying transactions of the database. Measured on a
    /// 2-core machine with a listener present (BENCHMARKS.md): one-message transactions at
    /// 0.95× (1 thread) and 0.96× (8 threads) of the same without notify (0.70× and 0.48×
    /// if every INSERT signalled). What it buys: a message committed every 500 ms in another
    /// process reaches the Sender after 0.76 ms (p50) instead of 48 ms with the default
    /// 100 ms poll interval. Polling stays the correctness path: a
    /// lost notification, a dropped listening connection (which reconnects) or a server
    /// restart only delay delivery to the next poll. `LISTEN` does not work through PgBouncer
    /// in transaction pooling mode: give the relay's pool a direct or session-mode
    /// connection, or leave this off.
    #[must_use]
    pub fn notify(mut self, on: bool) -> Self {
        self.config.notify = on;
        self
    }

    /// Per-key ordering: the messages of one key reach the Sender in the order their
    /// transactions committed, one key at a time across all relays, and a message that
    /// fails blocks its own key (and only its key) until it is sent, dead, or skipped with
    /// [`PgStore::skip_message`]. Defaults to `false`. See the README's "Ordering" for the
    /// guarantee and its costs.
    ///
    /// - [`add_message`](Outbox::add_message) and [`add_messages`](Outbox::add_messages)
    ///   take a per-key lock before drawing the message's id: a second transaction adding a
    ///   message of the same key waits until the first commits or rolls back, so ids follow
    ///   commit order. Producers of different keys do not wait for each other. Several keys
    ///   in one `add_messages` call are locked in a fixed order (no deadlock between two such
    ///   calls); separate calls in one transaction lock in call order, so two transactions
    ///   that add keys A then B and B then A can deadlock (PostgreSQL then fails one of
    ///   them): add the messages of a transaction in one `add_messages` call, or in a
    ///   consistent key order.
    /// - The relay claims only the head of each key (its oldest unsent message), with a run
    ///   of the messages behind it, and a key one relay holds is invisible to the others.
    /// - The Sender must not publish a message after a failed message of its key in the
    ///   same batch: [`Batch::send_each`](crate::Batch::send_each) does that for you.
    ///   Those messages go back without an attempt charged.
    ///
    /// The table records its mode ([`Outbox::migrate`] makes a table ordered). Producers and
    /// relays of one table must all be built with the same value: a mismatch is refused by
    /// [`start`](Outbox::start) and by the first `add_message`, with
    /// [`Error::OrderingMismatch`].
    #[must_use]
    pub fn per_key_ordering(mut self, on: bool) -> Self {
        self.config.ordered = on;
        self
    }

    /// The largest value [`add_message`](Outbox::add_message) accepts, in bytes, 1 to
    /// 512 MiB. Defaults to 1 MiB.
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.config.max_value_size = bytes;
        self
    }

    /// Called with every error the relay meets while running: database errors, Sender
    /// errors and panics. Runs on the worker thread, so keep it short. Defaults to logging
    /// through the `log` crate (Sender failures as warnings, the rest as errors); while no
    /// logger is installed (the `log` crate's level is `Off`), to standard error instead, so
    /// that a program without logging still sees why nothing is delivered. Set a handler of
    /// your own (`|_| {}` for none) to change that.
    #[must_use]
    pub fn error_handler(mut self, handler: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.config.error_handler = Arc::new(handler);
        self
    }

    /// Uses `meter` for the outbox's metrics (see docs/operations.md, "Observability"). Defaults to
    /// the global meter provider's meter named `troutbox`.
    #[cfg(feature = "opentelemetry")]
    #[must_use]
    pub fn with_meter(mut self, meter: opentelemetry::metrics::Meter) -> Self {
        self.config.meter = Some(meter);
        self
    }

    /// Uses `tracer` for the span of each batch. Defaults to the global tracer provider's
    /// tracer named `troutbox`.
    #[cfg(feature = "opentelemetry")]
    #[must_use]
    pub fn with_tracer<R, S>(mut self, tracer: R) -> Self
    where
        R: opentelemetry::trace::Tracer<Span = S> + Send + Sync + 'static,
        S: opentelemetry::trace::Span + Send + Sync + 'static,
    {
        self.config.tracer = Some(Arc::new(opentelemetry::global::BoxedTracer::new(Box::new(
            tracer,
        ))));
        self
    }

    /// Whether [`add_message`](Outbox::add_message) records the current trace context
    /// (`traceparent`, `tracestate`, through the global text-map propagator) in the message
    /// headers, so the relay's batch span can link to the producer's span. Headers you set
    /// yourself with those names win. Defaults to `true`.
    #[cfg(feature = "opentelemetry")]
    #[must_use]
    pub fn propagate_trace_context(mut self, on: bool) -> Self {
        self.config.propagate_trace_context = on;
        self
    }

    /// Validates the options and the store's schema and table names, and builds the outbox.
    /// Does not touch the database.
    pub fn build(self) -> Result<Outbox<T>, Error> {
        self.config.validate()?;
        let sql = self.store.sql()?;
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        // The backlog gauges hold the outbox weakly, so a dropped outbox stops reporting
        // instead of being kept alive (with its pool) by the meter provider.
        let inner = Arc::new_cyclic(|_weak: &std::sync::Weak<Inner<T>>| {
            #[cfg(feature = "opentelemetry")]
            let otel = {
                let weak = _weak.clone();
                let blocked = self.config.ordered.then(|| {
                    let weak = _weak.clone();
                    let source: crate::observability::otel::BlockedSource =
                        Arc::new(move || weak.upgrade()?.store.blocked_summary().ok());
                    source
                });
                Arc::new(crate::observability::otel::Instruments::new(
                    self.config.meter.clone(),
                    self.config.tracer.clone(),
                    Arc::new(move || weak.upgrade()?.store.backlog().ok()),
                    blocked,
                ))
            };
            Inner {
                store: self.store,
                sql,
                config: self.config,
                wake_tx,
                wake_rx,
                notified_at: std::sync::atomic::AtomicU64::new(0),
                epoch: std::time::Instant::now(),
                mode_checked: std::sync::atomic::AtomicBool::new(false),
                #[cfg(feature = "opentelemetry")]
                otel,
            }
        });
        Ok(Outbox { inner })
    }
}
