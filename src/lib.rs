//! # troutbox
//!
//! The transactional outbox pattern on PostgreSQL (and MariaDB, feature `mariadb`) for
//! services without an async runtime.
//!
//! A producer writes a message into the outbox table inside its own transaction with
//! [`Outbox::add_message`]; the message exists if and only if that transaction commits. A
//! relay, started with [`Outbox::start`], runs worker threads that claim batches of
//! committed messages (`FOR UPDATE SKIP LOCKED`, so any number of relays can share a table),
//! hand them to your synchronous [`Sender`], and record the outcome: sent messages are
//! removed, failed ones retried with exponential backoff, and after `max_retries` declared
//! dead and kept for a person to look at ([`PgStore::dead_messages`]).
//!
//! Delivery is **at least once**. A message is delivered twice only when a fault (a crash, a
//! lost connection, a Sender that outlives the send timeout) hits the batch it is in while
//! that batch is being sent: consumers deduplicate on [`Message::id`].
//!
//! ```no_run
//! use r2d2_postgres::PostgresConnectionManager;
//! use troutbox::{Batch, Outbox, PgStore};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = "host=localhost user=app dbname=app".parse()?;
//! let pool = r2d2::Pool::new(PostgresConnectionManager::new(config, postgres::NoTls))?;
//! let store = PgStore::new(pool.clone());
//! store.migrate()?;
//! let outbox = Outbox::builder(store).batch_size(100).max_retries(5).build()?;
//!
//! // Producer: inside the business transaction.
//! let mut conn = pool.get()?;
//! let mut tx = conn.transaction()?;
//! tx.execute("INSERT INTO orders (id) VALUES ($1)", &[&42i64])?;
//! outbox.add_message(&mut tx, "order-42", b"{\"id\":42}")?;
//! tx.commit()?;
//!
//! // Relay: a worker thread calling a synchronous Sender.
//! let mut handle = outbox.start(|batch: &mut Batch| -> Result<(), std::io::Error> {
//!     for msg in batch.iter_mut() {
//!         println!("publish {} ({} bytes)", msg.key(), msg.value().len());
//!         msg.mark_sent();
//!     }
//!     Ok(())
//! })?;
//! handle.shutdown()?;
//! # Ok(()) }
//! ```
//!
//! ## Layout
//!
//! - producer side: [`Outbox::add_message`] and the other producer calls (`outbox/mod.rs`),
//!   the work behind them and [`NewMessage`] (`outbox/producer.rs`), and the same calls on a
//!   diesel connection, `troutbox::diesel` (feature `diesel`, `outbox/producer/diesel.rs`);
//! - relay side: [`Sender`], [`Batch`], [`Message`], [`Handle`], [`Health`] (`relay/`), and
//!   [`Backoff`] (`backoff.rs`);
//! - store: [`PgStore`] and its migrations, the claim strategy (claim, journal, settle,
//!   recover), its SQL, row decoding and [`Retention`] (`store/`);
//! - consumer side: [`Inbox`] (`inbox.rs`, its SQL in `store/postgres/sql/inbox.rs`), which records each
//!   received message id in the consumer's transaction for an exactly-once effect; its
//!   builder, [`PreparedInbox`], the diesel call and the helpers reading the id from Kafka
//!   records and RabbitMQ deliveries are in `inbox/`;
//! - maintenance: partitions (of the outbox and the inbox) and dead letters (`maintenance/`);
//! - observability: [`Backlog`] (`observability/`);
//! - `serde` (feature `serde`): `Serialize` for [`Backlog`], [`Stats`], [`Health`],
//!   [`DeadMessage`] and [`Message`], [`BlockedKey`] and [`MaintenanceReport`], as the
//!   `troutbox` command prints them with `--json`: times in RFC 3339, durations in seconds
//!   (`ser.rs`);
//! - backends: the claim protocol, backend-free (`store/protocol.rs`), over each backend's
//!   primitives: PostgreSQL (`store/postgres/`) and, with the `mariadb` feature, MariaDB
//!   (`store/mariadb/`, its public face `troutbox::mariadb`); see docs/backends.md;
//! - `testing` (feature `testing`, Unix): a throw-away PostgreSQL server (and, with
//!   `mariadb`, a MariaDB one) for tests and examples; not part of a normal build.
//!
//! ## Threads
//!
//! [`Outbox`] and [`PgStore`] are `Send + Sync` and cheap to clone: share one outbox between
//! request threads. Each relay worker is a dedicated OS thread holding one pooled connection;
//! the Sender runs on it, one clone per worker.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

#[macro_use]
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
mod fault;
#[cfg(feature = "failpoints")]
#[cfg_attr(docsrs, doc(cfg(feature = "failpoints")))]
/// Named fault points of the claim protocol (feature `failpoints`).
pub mod fault_points {
    pub use crate::fault::*;
}
mod backoff;
mod config;
mod error;
pub mod inbox;
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
mod maintenance;
#[cfg(feature = "mariadb")]
#[cfg_attr(docsrs, doc(cfg(feature = "mariadb")))]
pub mod mariadb;
mod message;
mod observability;
mod outbox;
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub mod rabbitmq;
mod relay;
mod reports;
#[cfg(feature = "serde")]
mod ser;
mod store;
#[cfg(all(unix, any(test, feature = "testing")))]
#[cfg_attr(docsrs, doc(cfg(all(unix, feature = "testing"))))]
pub mod testing;

/// The `postgres` crate troutbox is built on, re-exported so your versions always match.
pub use postgres;
/// The `r2d2` crate troutbox is built on, re-exported so your versions always match.
pub use r2d2;
/// The `r2d2_postgres` crate troutbox is built on, re-exported so your versions always match.
pub use r2d2_postgres;
/// The `time` crate of [`Message::created_at`] and the dead-letter times, re-exported.
pub use time;

pub use backoff::{Backoff, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX, MAX_BACKOFF};
pub use config::{
    ErrorHandler, DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_VALUE_SIZE, DEFAULT_POLL_INTERVAL, DEFAULT_SEND_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_WORKERS, MAX_BATCH_SIZE, MAX_BYTES_PER_CALL, MAX_ERROR_TEXT, MAX_HEADERS,
    MAX_HEADER_BYTES, MAX_KEY_LEN, MAX_MAX_RETRIES, MAX_MESSAGES_PER_CALL, MAX_VALUE_SIZE_LIMIT,
    MAX_WORKERS, MIN_POLL_INTERVAL,
};
pub use error::{BoxError, Error};
pub use inbox::{Inbox, InboxBuilder, PreparedInbox, Received};
pub use maintenance::scheduler::MaintenanceHandle;
pub use message::{DeadMessage, DeadSummary, Message, Status};
pub use observability::stats::{Stats, Timing};
#[cfg(feature = "diesel")]
#[cfg_attr(docsrs, doc(cfg(feature = "diesel")))]
pub use outbox::producer::diesel;
pub use outbox::producer::{NewMessage, PreparedProducer};
pub use outbox::{Outbox, OutboxBuilder};
pub use relay::batch::Batch;
#[cfg(any(test, feature = "testing"))]
pub use relay::batch::Outcome;
pub use relay::handle::Handle;
pub use relay::health::Health;
pub use relay::sender::Sender;
pub use reports::{Backlog, BlockedKey, MaintenanceReport};
pub use store::postgres::pool::{pool, pool_with_tls, POOL_CONNECTION_TIMEOUT};
pub use store::postgres::{MakeTls, PgPool, PgStore, DEFAULT_SCHEMA, DEFAULT_TABLE};
pub use store::retention::{Retention, DEFAULT_PARTITIONS_AHEAD, DEFAULT_PARTITION_INTERVAL};

/// The examples of docs/usage.md (dead letters and backlog), compiled as doctests too.
#[cfg(doctest)]
#[doc = include_str!("../docs/usage.md")]
pub struct UsageDoctests;

/// The examples of docs/inbox.md, compiled as doctests too.
#[cfg(doctest)]
#[doc = include_str!("../docs/inbox.md")]
pub struct InboxDoctests;

/// The example of docs/testing.md (unit-testing a Sender), compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../docs/testing.md")]
pub struct TestingDoctests;

/// The examples of docs/operations.md (retention, observability), compiled as doctests too.
#[cfg(doctest)]
#[doc = include_str!("../docs/operations.md")]
pub struct OperationsDoctests;
