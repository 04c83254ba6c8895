//! The inbox: an exactly-once *effect* at the consumer, on top of at-least-once delivery.
//!
//! The outbox delivers every committed message at least once, so a consumer sees
//! duplicates (after a relay crash, a broker redelivery, a consumer that died before its
//! acknowledgement). The inbox records each message's identity ([`Message::dedup_key`](crate::Message::dedup_key),
//! which troutbox's Kafka and RabbitMQ Senders put in the `message-id` header or property)
//! **in the consumer's own database transaction**, beside the side effects of the message:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use troutbox::{Inbox, Received};
//!
//! let pool = troutbox::pool("host=localhost user=app dbname=app".parse()?, 8)?;
//! let inbox = Inbox::builder(pool.clone()).build()?; // public.inbox_messages, 7-day window
//! inbox.migrate()?;
//! # let message_id = "6f1c...:42"; // from the message: troutbox::inbox::kafka::message_id(&record)?
//! let mut conn = pool.get()?;
//! let mut tx = conn.transaction()?;
//! if inbox.receive(&mut tx, "billing", message_id)? == Received::First {
//!     tx.execute("UPDATE accounts SET paid = paid + 1 WHERE id = 42", &[])?;
//! }
//! tx.commit()?;
//! // only now: acknowledge the message to the broker (commit the offset, basic.ack).
//! # Ok(()) }
//! ```
//!
//! The entry and the side effects commit together or not at all. If the consumer dies
//! before the commit, nothing happened and the redelivery is a first delivery; if it dies
//! after the commit but before acknowledging, the redelivery is a [`Received::Duplicate`],
//! whose transaction does nothing else, and is acknowledged. So: **at-least-once transport
//! plus the inbox gives an exactly-once effect within the duplicate window.** A duplicate
//! arriving after the window (see below) is taken for a first delivery.
//!
//! # Concurrent deliveries
//!
//! The same message delivered to two consumer instances at once (a rebalance, a
//! redelivery while the first is still working): exactly one proceeds. Under READ COMMITTED
//! (PostgreSQL's default, and what troutbox recommends), the second `receive` **waits** for
//! the first transaction: it answers [`Received::Duplicate`] once the first commits, and
//! [`Received::First`] if the first rolls back (the message was then never applied). Under
//! REPEATABLE READ or SERIALIZABLE, the second cannot see an entry committed after its
//! snapshot was taken, so PostgreSQL refuses it instead: `receive` returns an error for
//! which [`Error::is_retryable`] is true (SQLSTATE 40001); roll back and retry the
//! delivery, which then sees the duplicate. Either way, never both.
//!
//! A consumer that records several messages in one transaction can deadlock with another
//! recording some of the same messages in another order; PostgreSQL then aborts one of
//! them (SQLSTATE 40P01, also [`Error::is_retryable`]). Record one message per transaction,
//! or in a consistent order.
//!
//! # The duplicate window, and uniqueness across partitions
//!
//! Entries are dropped by whole partitions, never by row-by-row deletes (which would cost
//! the hot path vacuum and index churn). But PostgreSQL enforces a unique constraint on a
//! partitioned table only per partition: the constraint must include the partition key.
//! Partitioning on the time of receipt would let a duplicate that arrives after a partition
//! boundary land in a new partition, next to nothing, and pass as new; and a check across
//! partitions would be a read, blind to an entry that a concurrent transaction has written
//! but not yet committed (or, under REPEATABLE READ, committed after the snapshot).
//!
//! So the table is partitioned on a **slot**: time cut in ranges as wide as the window `W`
//! (one partition per slot), and a first delivery at time `t` writes **two** entries: one
//! in the slot of `t`, one in the slot before. Any delivery of the same message less than
//! `W` later falls in the same slot or in the next one, so one of *its* two entries has the
//! same (consumer, message id, slot) as one of the first delivery's, in the same partition,
//! under the same primary key. Uniqueness is then the index's, not a read's: `INSERT ... ON
//! CONFLICT DO NOTHING` waits for a transaction that wrote the same key and has not ended,
//! and skips it once that one committed; exactly as for a plain unique table, across a
//! partition boundary too. `receive` is that one statement (one round trip); a first
//! delivery is the one that inserted both rows.
//!
//! The cost is a second row per message, and entries kept a little longer than `W`: a
//! partition is dropped by maintenance one minute after no delivery can write into it or
//! match it any more (the end of the slot after its own), so an entry lives between `W` and
//! `2W` (plus a minute) after it was written, and a duplicate up to `2W` late may still be
//! caught. An entry is never dropped less than `W` after it was written. Use [`InboxBuilder::keep_forever`] for an inbox that never forgets
//! (a plain table, one entry per message, no maintenance).
//!
//! Partitions are created ahead and expired ones dropped by [`Inbox::run_maintenance_once`]
//! (or [`Inbox::start_maintenance`] on a thread, in every instance): the same maintenance as
//! the outbox's [`Retention::keep_sent`](crate::Retention::keep_sent), one instance elected
//! per run by an advisory lock. A DEFAULT partition catches entries when maintenance has
//! not run; the next run moves them into their partitions.
//!
//! # Permissions
//!
//! A consumer role needs `USAGE` on the schema and `INSERT` on the inbox table, nothing
//! more (not even `SELECT`: `receive` reads the answer from the count of inserted rows).
//! `migrate` needs to create the schema (or own it) and tables in it; maintenance needs to
//! own the inbox table (it creates and drops partitions).
//!
//! # Other clients
//!
//! The statement is plain SQL; for the default table with the default 7-day window
//! (604,800 seconds), `$1` the consumer, `$2` the message id, both `text`: a first delivery
//! when it reports 2 rows inserted.
//!
//! ```sql
//! INSERT INTO "public"."inbox_messages" (consumer, message_id, slot, window_secs)
//! VALUES ($1, $2, date_bin(interval '604800 seconds', statement_timestamp(), timestamptz 'epoch'), 604800),
//!        ($1, $2, date_bin(interval '604800 seconds', statement_timestamp(), timestamptz 'epoch') - interval '604800 seconds', 604800)
//! ON CONFLICT DO NOTHING
//! ```

use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{GenericClient, NoTls};
#[cfg(feature = "diesel")]
use time::OffsetDateTime;

use crate::maintenance::scheduler::spawn_maintenance;
use crate::store::ident::Ident;
use crate::store::postgres::inbox::{self as pg_inbox, Recorded};
use crate::store::postgres::partitions::{maintain, Partitioned};
use crate::store::postgres::sql::inbox::{window_check_name, InboxSql, INBOX_VERSION};
use crate::store::postgres::{Clock, MakeTls, PgPool};
use crate::{Error, MaintenanceHandle, MaintenanceReport};

mod builder;
#[cfg(feature = "diesel")]
#[cfg_attr(docsrs, doc(cfg(feature = "diesel")))]
pub mod diesel;
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
mod prepared;
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub mod rabbitmq;

pub use builder::InboxBuilder;
pub use prepared::PreparedInbox;

/// Default name of the inbox table.
pub const DEFAULT_INBOX_TABLE: &str = "inbox_messages";
/// Default duplicate window: 7 days.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 86_400);
/// The shortest duplicate window: one minute.
pub const MIN_WINDOW: Duration = Duration::from_secs(60);
/// The longest duplicate window: a year (longer: [`InboxBuilder::keep_forever`]).
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 86_400);
/// Default number of partitions created ahead of the current one.
pub const DEFAULT_INBOX_PARTITIONS_AHEAD: u32 = 2;
/// The longest consumer name, in bytes.
pub const MAX_CONSUMER_LEN: usize = 200;
/// The longest message id, in bytes (troutbox's own, [`Message::dedup_key`], are about 50).
///
/// [`Message::dedup_key`]: crate::Message::dedup_key
pub const MAX_MESSAGE_ID_LEN: usize = 1024;

/// How long a partition outlives the last slot that can match it: room for a server clock
/// that steps back.
const DROP_MARGIN: Duration = Duration::from_secs(60);

/// What [`Inbox::receive`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a Duplicate must not be applied again: check it"]
pub enum Received {
    /// The first delivery of this message to this consumer (within the window): apply it
    /// in this transaction, then commit.
    First,
    /// This consumer has already recorded this message in a committed transaction: apply
    /// nothing, commit (or roll back) and acknowledge the message.
    Duplicate,
}

impl Received {
    /// True for [`Received::First`].
    pub fn is_first(self) -> bool {
        self == Received::First
    }

    /// True for [`Received::Duplicate`].
    pub fn is_duplicate(self) -> bool {
        self == Received::Duplicate
    }
}

struct Inner<T: MakeTls> {
    pool: PgPool<T>,
    schema: Ident,
    table: Ident,
    qualified: String,
    /// The window in seconds (the slot and partition width); `None`: forever.
    interval: Option<i64>,
    ahead: u32,
    clock: Option<Clock>,
    sql: InboxSql,
}

/// A table of received message ids, to apply each message once: see the
/// [module docs](crate::inbox) for the guarantee and how it holds.
///
/// `Send + Sync` and cheap to clone: share one between consumer threads.
// No PartialEq: an inbox is a pool of connections plus a table name; pools have no equality.
pub struct Inbox<T: MakeTls = NoTls> {
    inner: Arc<Inner<T>>,
}

impl<T: MakeTls> Clone for Inbox<T> {
    fn clone(&self) -> Self {
        Inbox {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T: MakeTls> std::fmt::Debug for Inbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("table", &self.inner.qualified)
            .field("window", &self.window())
            .finish_non_exhaustive()
    }
}

impl Inbox<NoTls> {
    /// A builder for the table `public.inbox_messages` with a 7-day window; `pool` serves
    /// [`migrate`](Inbox::migrate) and maintenance (`receive` runs on your transaction).
    pub fn builder<T: MakeTls>(pool: PgPool<T>) -> InboxBuilder<T> {
        InboxBuilder {
            pool,
            schema: crate::DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_INBOX_TABLE.to_owned(),
            window: Some(DEFAULT_WINDOW),
            ahead: DEFAULT_INBOX_PARTITIONS_AHEAD,
            clock: None,
        }
    }
}

impl<T: MakeTls> Inbox<T> {
    /// The table as `"schema"."table"`, as it appears in SQL.
    pub fn qualified_table(&self) -> &str {
        &self.inner.qualified
    }

    /// The duplicate window, `None` for [`keep_forever`](InboxBuilder::keep_forever).
    pub fn window(&self) -> Option<Duration> {
        self.inner
            .interval
            .map(|i| Duration::from_secs(u64::try_from(i).unwrap_or(0)))
    }

    fn show_window(secs: i64) -> String {
        if secs == 0 {
            "keep_forever".to_owned()
        } else {
            format!("a window of {secs} s")
        }
    }

    /// Creates the schema, the inbox table (and, with a window, its DEFAULT partition and
    /// the partitions around now), or checks them.
    ///
    /// Idempotent, and safe to run from many processes at once: serialized by the same
    /// transaction-scoped advisory lock as the outbox's migrations of the schema, and
    /// versioned in the schema's `troutbox_inboxes` table. Refuses a table created with
    /// another window ([`Error::InboxWindowMismatch`]).
    pub fn migrate(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let window = inner.interval.unwrap_or(0);
        let check = |recorded: Recorded| {
            if recorded.version > INBOX_VERSION {
                return Err(Error::InboxSchemaTooNew {
                    table: inner.qualified.clone(),
                    found: recorded.version,
                    supported: INBOX_VERSION,
                });
            }
            if recorded.window != window {
                return Err(Error::InboxWindowMismatch {
                    table: inner.qualified.clone(),
                    configured: Self::show_window(window),
                    recorded: Self::show_window(recorded.window),
                });
            }
            Ok(())
        };
        let (schema, table) = (inner.schema.as_str(), inner.table.as_str());
        if pg_inbox::migrate(
            &inner.pool,
            schema,
            table,
            &inner.sql,
            window,
            INBOX_VERSION,
            check,
        )? {
            log::info!("created inbox table {}", inner.qualified);
        }
        if inner.interval.is_some() {
            // Partitions around now, so the DEFAULT partition stays a safety net.
            self.run_maintenance_once()?;
        }
        Ok(())
    }

    /// Records that `consumer` received the message `message_id`, in the caller's
    /// transaction `client`, and says whether it is the first delivery or a duplicate.
    ///
    /// `consumer` names what applies the message (a service, a handler): each consumer
    /// has its own entries, so two services sharing an inbox table each apply the
    /// message once. `message_id` is the message's identity: troutbox's
    /// [`Message::dedup_key`](crate::Message::dedup_key), from the Kafka header or
    /// RabbitMQ property its Senders set (`troutbox::inbox::kafka::message_id`, feature
    /// `kafka`; `troutbox::inbox::rabbitmq::message_id`, feature `rabbitmq`).
    ///
    /// On [`Received::First`], apply the message in the same transaction and commit; on
    /// [`Received::Duplicate`], apply nothing. Acknowledge the message to the broker only
    /// after the commit. One statement, one round trip.
    ///
    /// A second delivery racing the first waits for the first's transaction (READ
    /// COMMITTED), or fails with an [`Error::is_retryable`] error (REPEATABLE READ,
    /// SERIALIZABLE): see the [module docs](crate::inbox#concurrent-deliveries).
    ///
    /// Errors: [`Error::InvalidMessageId`] for an empty `consumer` or `message_id`, one with a
    /// NUL byte or over [`MAX_CONSUMER_LEN`] / [`MAX_MESSAGE_ID_LEN`], checked before anything
    /// is sent (the transaction stays usable); [`Error::InboxNotMigrated`],
    /// [`Error::InboxWindowMismatch`] (the table was created with another window), or
    /// [`Error::Database`]. After a database error PostgreSQL has aborted the transaction:
    /// roll it back.
    pub fn receive(
        &self,
        client: &mut impl GenericClient,
        consumer: &str,
        message_id: &str,
    ) -> Result<Received, Error> {
        check_input(consumer, message_id)?;
        let inner = &*self.inner;
        let clock = inner.clock.as_ref();
        let inserted = pg_inbox::receive(client, &inner.sql, clock, None, consumer, message_id)
            .map_err(|e| self.receive_error(e))?;
        Ok(self.received(inserted))
    }

    /// Prepares the receive statement on `client`'s connection, for a consumer that reuses
    /// that connection (a connection per consumer thread): [`PreparedInbox::receive`] then
    /// saves the server parsing and planning the statement at every call, which is most of
    /// what `receive` costs beyond a plain INSERT (see docs/inbox.md, "What it costs"). Use
    /// the prepared inbox only on that connection and its transactions.
    ///
    /// ```no_run
    /// # fn f(inbox: &troutbox::Inbox, client: &mut postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let prepared = inbox.prepare(client)?;
    /// # let message_id = "6f1c...:42";
    /// let mut tx = client.transaction()?;
    /// if prepared.receive(&mut tx, "billing", message_id)?.is_first() {
    ///     tx.execute("UPDATE accounts SET paid = paid + 1 WHERE id = 42", &[])?;
    /// }
    /// tx.commit()?;
    /// # Ok(()) }
    /// ```
    pub fn prepare(&self, client: &mut impl GenericClient) -> Result<PreparedInbox<T>, Error> {
        let inner = &*self.inner;
        let statement = pg_inbox::prepare_receive(client, &inner.sql, inner.clock.is_some())
            .map_err(|e| self.receive_error(e))?;
        Ok(PreparedInbox {
            inbox: self.clone(),
            statement,
        })
    }

    /// The answer for a receive statement that inserted `inserted` rows.
    pub(crate) fn received(&self, inserted: u64) -> Received {
        if inserted == self.inner.sql.first {
            Received::First
        } else {
            Received::Duplicate
        }
    }

    /// The receive statement and its parameters' time, for other clients (diesel).
    #[cfg(feature = "diesel")]
    pub(crate) fn receive_statement(&self) -> (&str, Option<OffsetDateTime>) {
        let inner = &*self.inner;
        match (&inner.clock, &inner.sql.receive_at) {
            (Some(clock), Some(receive_at)) => (receive_at, Some(clock())),
            _ => (&inner.sql.receive, None),
        }
    }

    /// The name of the table's window check.
    pub(crate) fn window_check(&self) -> String {
        window_check_name(&self.inner.table)
    }

    /// The error for a table created with another window (or forever).
    pub(crate) fn window_mismatch(&self) -> Error {
        Error::InboxWindowMismatch {
            table: self.inner.qualified.clone(),
            configured: Self::show_window(self.inner.interval.unwrap_or(0)),
            recorded: "another one (see its schema's troutbox_inboxes table)".to_owned(),
        }
    }

    fn receive_error(&self, error: postgres::Error) -> Error {
        let constraint = error.as_db_error().and_then(|db| db.constraint());
        match error.code() {
            Some(&SqlState::UNDEFINED_TABLE) => Error::InboxNotMigrated {
                table: self.inner.qualified.clone(),
            },
            // A windowed statement on a forever table (no `slot`), or the reverse, or
            // another window: the table's check says so.
            Some(&SqlState::UNDEFINED_COLUMN) => self.window_mismatch(),
            Some(&SqlState::CHECK_VIOLATION)
                if constraint == Some(self.window_check().as_str()) =>
            {
                self.window_mismatch()
            }
            Some(&SqlState::NOT_NULL_VIOLATION)
                if error.as_db_error().and_then(|db| db.column()) == Some("slot") =>
            {
                self.window_mismatch()
            }
            _ => Error::Database {
                context: "recording a received message in the inbox",
                error,
            },
        }
    }

    /// Runs partition maintenance once: creates the current slot's partition, the previous
    /// one and [`partitions_ahead`](InboxBuilder::partitions_ahead) more, moves entries out of
    /// the DEFAULT partition, and drops the partitions whose slots can no longer match a
    /// delivery (a minute after the end of the slot after theirs). Elected across instances
    /// exactly as [`PgStore::run_maintenance_once`](crate::PgStore::run_maintenance_once) is:
    /// an instance that finds another at work returns [`MaintenanceReport::locked_out`].
    /// Does nothing for an inbox that keeps entries forever.
    pub fn run_maintenance_once(&self) -> Result<MaintenanceReport, Error> {
        let inner = &*self.inner;
        let (Some(parts), Some(interval)) = (inner.sql.partitions.as_ref(), inner.interval) else {
            return Ok(MaintenanceReport::default());
        };
        let slot = Duration::from_secs(u64::try_from(interval).unwrap_or(u64::MAX));
        let table = Partitioned {
            parts,
            qualified: inner.qualified.clone(),
            noun: "inbox",
            interval,
            ahead: inner.ahead,
            behind: 1,
            // Dropped once its end is a slot and a margin in the past: by then every
            // delivery falls two slots or more after it, and writes and matches only those.
            window: slot + DROP_MARGIN,
            now: inner.clock.as_ref().map(|clock| clock()),
        };
        let qualified = inner.qualified.clone();
        maintain(
            &inner.pool,
            &table,
            |_| Ok(()),
            move |context, error| {
                if error.code() == Some(&SqlState::UNDEFINED_TABLE) {
                    Error::InboxNotMigrated {
                        table: qualified.clone(),
                    }
                } else {
                    Error::Database { context, error }
                }
            },
        )
    }

    /// Runs [`run_maintenance_once`](Self::run_maintenance_once) now and then every `every`
    /// on a background thread, until the returned handle is shut down or dropped. Run it in
    /// every instance: one is elected per run. Errors are logged and the next run tries
    /// again. Run it at least a few times per window (every few minutes for a window of an
    /// hour, hourly for days).
    pub fn start_maintenance(&self, every: Duration) -> Result<MaintenanceHandle, Error> {
        let inbox = self.clone();
        spawn_maintenance(
            format!("inbox maintenance of {}", self.inner.qualified),
            every,
            move || inbox.run_maintenance_once(),
        )
    }
}

/// Checks a consumer name and a message id before they reach the database.
pub(crate) fn check_input(consumer: &str, message_id: &str) -> Result<(), Error> {
    for (what, value, max) in [
        ("consumer", consumer, MAX_CONSUMER_LEN),
        ("message id", message_id, MAX_MESSAGE_ID_LEN),
    ] {
        let reject = |reason: String| Err(Error::InvalidMessageId { what, reason });
        if value.is_empty() {
            return reject("it is empty".into());
        }
        if let Some(position) = value.bytes().position(|b| b == 0) {
            return reject(format!(
                "it contains a NUL byte at position {position}, which PostgreSQL text cannot store"
            ));
        }
        if value.len() > max {
            return reject(format!(
                "it is {} bytes long, the limit is {max}",
                value.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_checked() {
        assert!(check_input("c", "m").is_ok());
        let long_id = "m".repeat(MAX_MESSAGE_ID_LEN + 1);
        let long_consumer = "c".repeat(MAX_CONSUMER_LEN + 1);
        for (consumer, id, what) in [
            ("", "m", "consumer"),
            ("c", "", "message id"),
            ("c\0", "m", "consumer"),
            ("c", "m\0", "message id"),
            (long_consumer.as_str(), "m", "consumer"),
            ("c", long_id.as_str(), "message id"),
        ] {
            match check_input(consumer, id) {
                Err(Error::InvalidMessageId { what: w, .. }) => assert_eq!(w, what),
                other => panic!("{consumer:?}/{id:?}: {other:?}"),
            }
        }
        assert!(check_input(
            &"c".repeat(MAX_CONSUMER_LEN),
            &"m".repeat(MAX_MESSAGE_ID_LEN)
        )
        .is_ok());
    }
}
