//! The crate's error type.

use std::error::Error as StdError;

/// A boxed error from a [`Sender`](crate::Sender) or another foreign source.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong in troutbox.
///
/// The messages are meant for a person: they say what happened and, where there is one,
/// what to do about it.
///
/// One convention for causes, everywhere: an error either says its cause in its message or
/// returns it from [`source`](std::error::Error::source), never both, so that printing the
/// whole chain (`anyhow`'s `{:#}`, or troutbox's default error handler) shows each cause
/// once. Database errors say theirs, because the `postgres` crate's own text for a server
/// error is just "db error" (the `postgres::Error` stays reachable through
/// [`Error::postgres`]); every other error with a cause (the pool's, the Sender's, a
/// thread's) returns it from `source`, and its own message omits it.
// No PartialEq: the causes it carries (postgres, r2d2, I/O errors) have none, and an error
// is matched on its variant, not compared.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range. Returned by
    /// [`OutboxBuilder::build`](crate::OutboxBuilder::build).
    #[error("invalid outbox option `{option}`: {reason}")]
    InvalidConfig {
        /// The builder method that set the value.
        option: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },

    /// A schema or table name cannot be used. troutbox never formats an unchecked name into SQL.
    #[error(
        "invalid {what} name {name:?}: {reason} (use ASCII letters, digits and '_', starting with a letter or '_')"
    )]
    InvalidIdentifier {
        /// `"schema"` or `"table"`.
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A message key contains a NUL byte, which PostgreSQL `text` cannot store.
    #[error("message key contains a NUL byte at position {position}; PostgreSQL text cannot store NUL, encode the key (for example as hex) first")]
    KeyContainsNul {
        /// Byte offset of the first NUL.
        position: usize,
    },

    /// An [`add_messages`](crate::Outbox::add_messages) call holds more than the limits
    /// allow ([`MAX_MESSAGES_PER_CALL`](crate::MAX_MESSAGES_PER_CALL) messages,
    /// [`MAX_BYTES_PER_CALL`](crate::MAX_BYTES_PER_CALL) bytes). Nothing was added.
    #[error("add_messages was given {what}, the limit is {max}; split the messages over several calls (in the same transaction if they must commit together)")]
    CallTooLarge {
        /// What is over: the count of messages or of bytes.
        what: String,
        /// The limit.
        max: usize,
    },

    /// A message key is longer than the limit.
    #[error("message key is {len} bytes long, the limit is {max} bytes; use a shorter key (a hash of it, say)")]
    KeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The limit, [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
        max: usize,
    },

    /// A message value is larger than the configured limit.
    #[error("message value is {len} bytes, the limit is {max} bytes; raise it with OutboxBuilder::max_value_size or store the payload elsewhere and send a reference")]
    ValueTooLarge {
        /// The value's length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },

    /// A header name or value cannot be stored.
    #[error("message header {name:?} is invalid: {reason}")]
    InvalidHeader {
        /// The header's name (possibly the offending part).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The outbox table does not exist, or is older than this version of troutbox expects.
    #[error("outbox table {table} is missing or not migrated: call PgStore::migrate() once before using the outbox")]
    NotMigrated {
        /// The qualified table name.
        table: String,
        /// The database error that revealed it, if one did: the `troutbox::diesel`
        /// functions (feature `diesel`) look the tables up first instead (diesel's errors do not carry the
        /// SQLSTATE that tells a missing table from any other failure).
        #[source]
        source: Option<postgres::Error>,
    },

    /// The outbox table exists but was migrated by an older version of troutbox, which did
    /// not record what this version needs (its ordering mode).
    #[error("outbox table {table} was migrated by an older troutbox: call PgStore::migrate() (or Outbox::migrate()) once with this version")]
    OutdatedSchema {
        /// The qualified table name.
        table: String,
    },

    /// The outbox's per-key ordering does not match the table's. Producers and relays of one
    /// table must agree, or order is silently lost: an unordered producer does not take the
    /// per-key lock, and an unordered relay hands out the messages of a key in any order.
    #[error("outbox table {table} is {}, but this outbox was built with per_key_ordering({declared}); {}", if *recorded { "relayed with per-key ordering" } else { "not ordered" }, if *declared { "call Outbox::migrate() on this outbox once to make the table ordered (it creates an index)" } else { "build every outbox of this table with per_key_ordering(true)" })]
    OrderingMismatch {
        /// The qualified table name.
        table: String,
        /// What the outbox was built with.
        declared: bool,
        /// What the table records.
        recorded: bool,
    },

    /// Per-key ordering was asked of a table whose id sequence hands out ids in blocks
    /// (`ALTER SEQUENCE ... CACHE n` with n above 1): each session draws from its own block,
    /// so the ids of one key no longer follow the commit order, which the ordered relay
    /// relies on.
    #[error("outbox table {table}'s id sequence has CACHE {cache}, so ids do not follow commit order, which per-key ordering needs; set it back with ALTER TABLE {table} ALTER COLUMN id SET CACHE 1")]
    IdCached {
        /// The qualified table name.
        table: String,
        /// The sequence's cache.
        cache: i64,
    },

    /// The table was created by a newer version of troutbox.
    #[error("outbox table {table} has schema version {found}, this troutbox understands up to {supported}; upgrade troutbox")]
    SchemaTooNew {
        /// The qualified table name.
        table: String,
        /// The version found in the migrations table.
        found: i32,
        /// The newest version this build knows.
        supported: i32,
    },

    /// The store's retention does not match the table's: the table was created with the
    /// other one.
    #[error("outbox table {table} was created for retention {found}, but the store is configured with {configured}; configure the store like the table, or migrate to a new table")]
    RetentionMismatch {
        /// The qualified table name.
        table: String,
        /// The store's configured retention.
        configured: &'static str,
        /// The table's.
        found: &'static str,
    },

    /// Maintenance was asked to run with a retention window or partition interval other
    /// than the ones recorded with the table when it was migrated. Nothing was done: a
    /// shorter window would drop audit history early.
    #[error("outbox table {table} was created with {recorded}, but maintenance was configured with {configured}; configure the store like the table (the command line reads it from the table when no --keep-sent is given)")]
    RetentionSettingsMismatch {
        /// The qualified table name.
        table: String,
        /// The store's retention.
        configured: String,
        /// The table's.
        recorded: String,
    },

    /// A consumer name or message id given to [`Inbox::receive`](crate::Inbox::receive)
    /// cannot be recorded: empty, holding a NUL byte (PostgreSQL `text` cannot store one),
    /// or longer than its limit ([`MAX_CONSUMER_LEN`](crate::inbox::MAX_CONSUMER_LEN),
    /// [`MAX_MESSAGE_ID_LEN`](crate::inbox::MAX_MESSAGE_ID_LEN)). Nothing reached the
    /// database: the transaction is still usable.
    #[error("invalid inbox {what}: {reason}")]
    InvalidMessageId {
        /// `"consumer"` or `"message id"`.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A received message carries no message id, so the inbox cannot tell a duplicate from
    /// a first delivery. Not a silent pass: decide what such a message means (a producer
    /// that is not troutbox, a missing header) and handle it yourself.
    #[error("the {from} carries no message id ({field}); the inbox needs one to detect duplicates: is the producer a troutbox relay, and does the consumer read the right header?")]
    MissingMessageId {
        /// Where it was looked for: `"Kafka record"` or `"RabbitMQ delivery"`.
        from: &'static str,
        /// The header or property that was missing.
        field: String,
    },

    /// The inbox table does not exist: call [`Inbox::migrate`](crate::Inbox::migrate).
    #[error("inbox table {table} is missing: call Inbox::migrate() once before receiving")]
    InboxNotMigrated {
        /// The qualified table name.
        table: String,
    },

    /// The inbox's duplicate window is not the one its table was created with. Instances
    /// that disagree on it would not see each other's entries, so it is refused.
    #[error("inbox table {table} was created with {recorded}, but this inbox is configured with {configured}; configure every inbox of this table the same way (changing the window of an existing table is not supported: create a new table)")]
    InboxWindowMismatch {
        /// The qualified table name.
        table: String,
        /// What this inbox was built with.
        configured: String,
        /// What the table records.
        recorded: String,
    },

    /// The inbox table was created by a newer version of troutbox.
    #[error("inbox table {table} has schema version {found}, this troutbox understands up to {supported}; upgrade troutbox")]
    InboxSchemaTooNew {
        /// The qualified table name.
        table: String,
        /// The version found.
        found: i32,
        /// The newest version this build knows.
        supported: i32,
    },

    /// A statement failed in the database, or the connection to it failed.
    ///
    /// The message is whole: the server's severity, message, SQLSTATE, detail and hint (or,
    /// for a connection failure, the `postgres` crate's text and its causes), so this
    /// variant has no [`source`](std::error::Error::source), which would repeat it. The
    /// `postgres` error is in `error`, and [`Error::postgres`] returns it.
    #[error("database error while {context}: {}", describe_db(error))]
    Database {
        /// What troutbox was doing.
        context: &'static str,
        /// The error from the `postgres` crate.
        error: postgres::Error,
    },

    /// A statement troutbox ran on a diesel connection failed in the database, or diesel
    /// could not run it (feature `diesel`, see [`troutbox::diesel`](crate::diesel)). The
    /// database's message is the source's text.
    #[cfg(feature = "diesel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "diesel")))]
    #[error("{}", describe_diesel(context, source))]
    Diesel {
        /// What troutbox was doing.
        context: &'static str,
        /// The error from diesel.
        #[source]
        source: diesel::result::Error,
    },

    /// A statement failed in MariaDB, or the connection to it failed (feature `mariadb`, see
    /// [`troutbox::mariadb`](crate::mariadb)). The server's error code and message, or the
    /// client's, are the source's text.
    #[cfg(feature = "mariadb")]
    #[cfg_attr(docsrs, doc(cfg(feature = "mariadb")))]
    #[error("MariaDB error while {context}")]
    MariaDb {
        /// What troutbox was doing.
        context: &'static str,
        /// The error from the `mysql` crate.
        #[source]
        source: mysql::Error,
    },

    /// The database or the backend cannot do what was asked: a server older than the backend
    /// needs, or an option the backend does not support (for MariaDB, `keep_sent`
    /// retention). Returned before anything is changed; `reason` says why and what to do.
    #[error("{what} is not supported: {reason}")]
    Unsupported {
        /// What was asked (an option, a server version).
        what: String,
        /// Why it cannot hold, and what to do instead.
        reason: String,
    },

    /// No connection could be taken from the pool in time. The database may be down or the
    /// pool too small: each relay worker keeps one connection while it runs.
    #[error("no database connection available while {context} (is PostgreSQL reachable, and is the pool larger than the number of relay workers?)")]
    Pool {
        /// What troutbox was doing.
        context: &'static str,
        /// The error from `r2d2`.
        #[source]
        source: r2d2::Error,
    },

    /// No pooled connection answered in time: each one the relay tried stayed silent (a
    /// network path that froze: a stuck proxy or pooler, a paused server VM), or none came
    /// free. The relay tries again; check the path to PostgreSQL.
    #[error("no database connection answered within {waited:?} while {context} (is the network path to PostgreSQL frozen, or the pool exhausted?)")]
    NoAnswer {
        /// What troutbox was doing.
        context: &'static str,
        /// How long it waited.
        waited: std::time::Duration,
    },

    /// The Sender returned an error for a batch. The messages it did not mark sent were
    /// recorded as failed and will be retried (or are dead after their retries).
    #[error("sender failed a batch of {batch_size} message(s)")]
    Sender {
        /// Number of messages in the batch.
        batch_size: usize,
        /// The Sender's error.
        #[source]
        source: BoxError,
    },

    /// The Sender panicked. It is treated as if it had returned an error; the worker survives.
    #[error("sender panicked on a batch of {batch_size} message(s): {message}")]
    SenderPanicked {
        /// Number of messages in the batch.
        batch_size: usize,
        /// The panic's message, when it was a string.
        message: String,
    },

    /// A relay worker thread could not be started.
    #[error("could not start relay worker thread")]
    Spawn(#[source] std::io::Error),

    /// Shutdown gave up waiting for worker threads, typically because a Sender is still
    /// running. Their open transactions end at the send timeout at the latest, and their
    /// messages are then delivered again by another worker.
    #[error("{running} relay worker thread(s) still running after the shutdown timeout; their batches will be released by the server after the send timeout")]
    ShutdownTimedOut {
        /// Threads that did not stop in time.
        running: usize,
    },

    /// A relay worker's database call did not return for this long (its connection was
    /// most likely dropped without a word by a NAT, a load balancer or a proxy, which the
    /// client cannot tell from a slow server). The relay's watchdog started a new worker in
    /// its place, on a new connection, and left the stuck thread behind; the batch it held,
    /// if any, is released by the server at the send timeout and delivered again. See
    /// [`Health::replaced`](crate::Health::replaced).
    #[error("a relay worker's database call did not return for {stuck_for:?}: its connection is presumed dead (dropped silently by the network?); a new worker replaced it")]
    WorkerReplaced {
        /// How long the call had been waiting.
        stuck_for: std::time::Duration,
    },

    /// A relay worker thread panicked outside the Sender (a bug in troutbox, or a panicking
    /// error handler: please report it). The worker gives back the batch it held (which
    /// counts as an attempt for its messages) and carries on.
    #[error("relay worker thread panicked: {0}")]
    WorkerPanicked(String),

    /// The relay set a message aside as dead without sending it: its row cannot be decoded
    /// (written by hand or by an older tool), or it was claimed `max_retries + 1` times by
    /// relays that never settled (it crashes or hangs the relay). The rest of the queue
    /// flows; the message waits in the dead letters for a person.
    #[error("message {id} was set aside as dead: {reason}; inspect it with PgStore::dead_messages (or `troutbox dead list`), fix the cause, then requeue it or purge it")]
    SetAside {
        /// The message's id.
        id: i64,
        /// Why, as stored in its `last_error`.
        reason: String,
    },

    /// [`Outbox::start`](crate::Outbox::start) found the store's pool too small for the
    /// relay: each worker keeps a connection, the claim journal shares one more, and
    /// `notify(true)` listens on another. With fewer, claims would wait for a connection
    /// they can never get, and deliver nothing.
    #[error("the connection pool holds at most {size} connection(s), and the relay needs {needed}: one per worker ({workers}), one for the claim journal{listener}; build the pool with at least {needed}, plus what producers and maintenance use at the same time (troutbox::pool(config, n), or r2d2::Pool::builder().max_size(n)), or start fewer workers", listener = if *notify { ", one for the notify listener" } else { "" })]
    PoolTooSmall {
        /// The pool's `max_size`.
        size: u32,
        /// Connections the relay keeps while it runs.
        needed: u32,
        /// The relay's workers.
        workers: usize,
        /// Whether `notify(true)` adds a listening connection.
        notify: bool,
    },

    /// A step of the claim protocol failed because a test told it to (feature
    /// `failpoints`, see [`fault_points`](crate::fault_points)). Never in a normal build.
    #[cfg(feature = "failpoints")]
    #[error("fault injected at {point}")]
    Injected {
        /// The fault point.
        point: &'static str,
    },

    /// A claimed batch was given back untouched, before its Sender saw it, because its claim
    /// could no longer be proven held: the steps between the claim and the Sender (recording
    /// the claim in the journal, waiting for a connection) took `waited`, more than half the
    /// send timeout, or the server had already ended the claim's transaction. Sending it
    /// could have let another relay send the same messages at the same time. Nothing is
    /// charged; the messages are claimed again. Frequent: the pool is too small or the
    /// database too slow for the send timeout (raise `OutboxBuilder::send_timeout` or the
    /// pool's size).
    #[error("a claimed batch of {messages} message(s) was given back before its Sender ran: {why} (after {waited:?}, with a send timeout of {send_timeout:?}); it will be claimed again, uncharged (is the pool large enough and the database responsive?)")]
    ClaimExpired {
        /// Number of messages given back.
        messages: usize,
        /// How long the claim had been held when it was given back.
        waited: std::time::Duration,
        /// The send timeout, whose half is the longest a claim may wait for its Sender.
        send_timeout: std::time::Duration,
        /// What was found.
        why: &'static str,
    },

    /// A batch's transaction was lost (its Sender outlived the send timeout, or the
    /// connection dropped) and, by the time its outcome came back, another relay had claimed
    /// some of its messages again. Their outcome could not be recorded: they will be
    /// delivered again, and the lost claim counts as an attempt for each of them.
    #[error("the outcome of {messages} message(s) was not recorded: their batch's transaction was lost (send timeout exceeded or connection lost) and another relay claimed them again; they will be delivered again, and the lost claim counts as an attempt (raise OutboxBuilder::send_timeout if the Sender is legitimately slow)")]
    OutcomeNotRecorded {
        /// Number of messages whose outcome was dropped.
        messages: usize,
    },

    /// A batch's transaction was lost (its Sender outlived the send timeout, or the
    /// connection dropped) while the relay was in steady state, when it does not journal its
    /// claims (see RELIABILITY.md, "When claims are journaled"). Nothing is lost: the
    /// messages go back as they were, uncharged, and will be delivered again. From now on
    /// the relay journals every claim for 10 minutes, so that a message that does this
    /// again is charged.
    #[error("the outcome of {messages} message(s) was not recorded: their batch's transaction was lost (send timeout exceeded or connection lost); they will be delivered again, and the relay journals its claims for the next 10 minutes so that a repeat is charged (raise OutboxBuilder::send_timeout if the Sender is legitimately slow)")]
    OutcomeLost {
        /// Number of messages in the batch.
        messages: usize,
    },
}

/// What `{:?}` prints, and so what a program sees when it returns this error from
/// `fn main() -> Result<(), Box<dyn std::error::Error>>` (the README's shape): the message,
/// with its hint, then each cause on a line of its own. Not the variant's fields: the
/// message says what they hold, and it is the text that tells a person what to do (and
/// never carries a secret a field might).
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            write!(f, "\n  caused by: {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

impl Error {
    /// The `postgres` crate's error behind a [`Database`](Error::Database) or
    /// [`NotMigrated`](Error::NotMigrated) error, for its SQLSTATE
    /// ([`code`](postgres::Error::code)) or the server's fields
    /// ([`as_db_error`](postgres::Error::as_db_error)).
    pub fn postgres(&self) -> Option<&postgres::Error> {
        match self {
            Error::Database { error, .. } => Some(error),
            Error::NotMigrated { source, .. } => source.as_ref(),
            _ => None,
        }
    }

    /// True when the database refused the transaction because of a concurrent one and the
    /// whole transaction may simply be run again: a serialization failure (SQLSTATE 40001)
    /// or a deadlock (40P01). This is what [`Inbox::receive`](crate::Inbox::receive) returns
    /// under REPEATABLE READ or SERIALIZABLE when another transaction recorded the same
    /// message after this one's snapshot was taken: roll back, and retry the delivery.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database { error, .. } => matches!(
                error.code(),
                Some(&postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
                    | Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
            ),
            #[cfg(feature = "diesel")]
            Error::Diesel { source, .. } => match source {
                diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::SerializationFailure,
                    _,
                ) => true,
                diesel::result::Error::DatabaseError(_, info) => {
                    info.message().contains("deadlock detected")
                }
                _ => false,
            },
            #[cfg(feature = "mariadb")]
            Error::MariaDb { source, .. } => mariadb_retryable(source),
            _ => false,
        }
    }

    pub(crate) fn pool(context: &'static str) -> impl FnOnce(r2d2::Error) -> Error {
        move |source| Error::Pool { context, source }
    }

    /// True when the error means the database or the connection to it is unavailable, so
    /// retrying later may succeed: no connection from the pool, a closed connection, an I/O
    /// error, or a server error of class 08 (connection exception) or 57P (shutdown, crash,
    /// cannot connect now), or with the `diesel` feature a diesel connection found closed.
    /// Not a conversion error, nor any other server error.
    pub fn is_connection_error(&self) -> bool {
        match self {
            Error::Pool { .. } | Error::NoAnswer { .. } => true,
            Error::Database { error, .. } => match error.code() {
                Some(code) => code.code().starts_with("08") || code.code().starts_with("57P"),
                None => error.is_closed() || io_caused(error),
            },
            #[cfg(feature = "diesel")]
            Error::Diesel { source, .. } => matches!(
                source,
                diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::ClosedConnection,
                    _
                ) | diesel::result::Error::BrokenTransactionManager
            ),
            #[cfg(feature = "mariadb")]
            Error::MariaDb { source, .. } => mariadb_connection_error(source),
            _ => false,
        }
    }
}

/// A `postgres` error as a person needs it: for an error from the server, its severity,
/// message, SQLSTATE, and detail and hint when there are (the `postgres` crate's own text is
/// just "db error"); otherwise that crate's text.
fn describe_db(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        // Not from the server: the crate's text ("error communicating with the server")
        // says little without its causes (the I/O error).
        None => with_causes(error),
    }
}

/// What a diesel error means for the caller, without the diesel error's own text (its
/// `Display`, the source of [`Error::Diesel`]; for a database error, the server's message):
/// where it happened, the detail and hint the server gave, and what to do.
#[cfg(feature = "diesel")]
fn describe_diesel(context: &str, error: &diesel::result::Error) -> String {
    use diesel::result::{DatabaseErrorKind, Error as E};
    let (kind, info) = match error {
        E::DatabaseError(kind, info) => (kind, info),
        E::BrokenTransactionManager => {
            return format!(
                "diesel's transaction manager is broken (the connection was most likely lost) \
                 while {context}: run the whole transaction again on a new connection"
            )
        }
        _ => {
            return format!("diesel failed while {context}, before or after the database's answer")
        }
    };
    let mut text =
        format!("the database refused troutbox's statement (run through diesel) while {context}");
    if let Some(detail) = info.details() {
        text.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = info.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text.push_str(match kind {
        DatabaseErrorKind::ClosedConnection => {
            "; the connection is lost: run the whole transaction again on a new connection"
        }
        DatabaseErrorKind::SerializationFailure => {
            "; a serialization failure: run the whole transaction again"
        }
        _ => "; PostgreSQL has aborted the transaction: return the error from the diesel transaction's closure so that diesel rolls it back",
    });
    text
}

/// MariaDB errors that mean "run the transaction again": a deadlock (1213) or a lock wait
/// timeout (1205).
#[cfg(feature = "mariadb")]
pub(crate) fn mariadb_retryable(e: &mysql::Error) -> bool {
    matches!(e, mysql::Error::MySqlError(m) if m.code == 1213 || m.code == 1205)
}

/// MariaDB errors of the connection rather than the statement: I/O, the driver's own, and
/// the server's "connection killed" (1927), "server shutdown" (1053), "disconnected for
/// inactivity" (4031), "gone away" (2006) and "lost" (2013).
#[cfg(feature = "mariadb")]
pub(crate) fn mariadb_connection_error(e: &mysql::Error) -> bool {
    match e {
        mysql::Error::IoError(_) | mysql::Error::CodecError(_) => true,
        mysql::Error::DriverError(d) => matches!(
            d,
            mysql::DriverError::ConnectTimeout
                | mysql::DriverError::CouldNotConnect(_)
                | mysql::DriverError::PacketOutOfSync
                | mysql::DriverError::Timeout
        ),
        mysql::Error::MySqlError(m) => matches!(m.code, 1927 | 1053 | 4031 | 2006 | 2013),
        _ => false,
    }
}

/// Whether an I/O error is somewhere in `error`'s chain: the connection, not the statement.
fn io_caused(error: &postgres::Error) -> bool {
    let mut next = std::error::Error::source(error);
    while let Some(cause) = next {
        if cause.is::<std::io::Error>() {
            return true;
        }
        next = cause.source();
    }
    false
}

/// The text of a caught panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// `error`'s text followed by each cause's, when the cause says something the text above it
/// does not already contain.
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod with_causes_tests {
    use super::with_causes;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn the_default_handler_prints_each_cause_once() {
        let error = Layer(
            "sender failed a batch of 3 message(s): broker said no",
            Some(Box::new(Layer(
                "broker said no",
                Some(Box::new(Layer("connection reset by peer", None))),
            ))),
        );
        assert_eq!(
            with_causes(&error),
            "sender failed a batch of 3 message(s): broker said no: connection reset by peer"
        );
    }
}
