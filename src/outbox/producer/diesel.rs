//! Adding messages from [diesel](https://diesel.rs) (feature `diesel`): inside your own diesel
//! transaction on a [`PgConnection`], with the checks, limits and errors of
//! [`Outbox::add_message`].
//!
//! ```no_run
//! use diesel::{Connection, PgConnection, RunQueryDsl};
//!
//! # fn f(outbox: &troutbox::Outbox, conn: &mut PgConnection) -> diesel::QueryResult<()> {
//! conn.transaction(|conn| {
//!     diesel::sql_query("UPDATE orders SET state = 'paid' WHERE id = 42").execute(conn)?;
//!     troutbox::diesel::add_message(outbox, conn, "order-42", b"{\"paid\":true}")?;
//!     Ok(())
//! })
//! # }
//! ```
//!
//! The message exists for the relay if and only if that transaction commits; the relay
//! itself runs on troutbox's own pool ([`Outbox::start`]), as with any producer.
//!
//! # The calls
//!
//! [`add_message`], [`add`] (one message with headers) and [`add_messages`] (many in one
//! statement and one round trip) take the outbox, the connection and the messages. They are
//! functions rather than methods of [`Outbox`] because the outbox's methods of the same names
//! take any [`postgres::GenericClient`], which a diesel connection is not; here they keep
//! the names, arguments and behaviour of those methods:
//!
//! - the same checks before anything reaches the database, which leave the transaction
//!   usable: [`Error::KeyContainsNul`], [`Error::KeyTooLong`], [`Error::ValueTooLarge`],
//!   [`Error::InvalidHeader`] (more than [`MAX_HEADERS`](crate::MAX_HEADERS) headers, more
//!   than [`MAX_HEADER_BYTES`](crate::MAX_HEADER_BYTES), an empty name, a NUL byte) and
//!   [`Error::CallTooLarge`] for [`add_messages`];
//! - the same check of the table, once per outbox (and its clones), whichever client ran it
//!   first: [`Error::OrderingMismatch`] when the outbox's
//!   [`per_key_ordering`](crate::OutboxBuilder::per_key_ordering) is not the table's,
//!   [`Error::OutdatedSchema`], and [`Error::NotMigrated`] for a table never migrated;
//! - the same statements (below), so the same per-key lock and the same notification signal
//!   with [`notify(true)`](crate::OutboxBuilder::notify), and the same wake-up of a relay of
//!   this outbox in this process.
//!
//! A statement the database refuses is [`Error::Diesel`], with the diesel error as its
//! source. As with any failed statement, PostgreSQL has then aborted the transaction: return
//! the error from the closure so that diesel rolls it back. For that, `?` converts a
//! troutbox [`Error`] into a [`diesel::result::Error`] (the closure above returns a
//! `QueryResult`): an [`Error::Diesel`] gives back diesel's own error (so a serialization
//! failure is still one for your retry loop), any other error becomes a
//! [`QueryBuilderError`](diesel::result::Error::QueryBuilderError) holding it, which you can
//! downcast. With an error type of your own, implement `From<troutbox::Error>` for it instead.
//!
//! Outside a transaction each call commits on its own, like [`Outbox::add_message`] on a
//! `postgres::Client`. A pooled connection (`r2d2::PooledConnection` of diesel's
//! `ConnectionManager<PgConnection>`) is passed as `&mut *conn`.
//!
//! # The statements, for other clients
//!
//! Any client can add messages that troutbox relays, inside its own transaction, with the
//! statements below (here for the default table `"public"."outbox_messages"`; they are the
//! ones this module runs, word for word up to white space, and a test checks this text
//! against them). The producer needs `USAGE` on the schema, `INSERT (key, value, headers)`
//! on the table and `SELECT` on the schema's `troutbox_tables` (the README's "Permissions").
//!
//! One message: `$1` the key (`text`), `$2` the value (`bytea`), `$3` the headers (`text[]`),
//! names and values alternating, `{name1, value1, name2, value2, ...}`, `{}` for none:
//!
//! ```sql
//! INSERT INTO "public"."outbox_messages" (key, value, headers) VALUES ($1, $2, $3)
//! ```
//!
//! Many messages in one statement, ids drawn in the order of the arrays: `$1` the keys
//! (`text[]`), `$2` the values (`bytea[]`), `$3` one element per message (`text[]`), that
//! message's headers as a PostgreSQL array literal: every name and value double-quoted, with
//! `"` and `\` escaped by a backslash, `{"name1","value1","name2","value2"}`, `{}` for none.
//! SQL arrays cannot hold rows of different lengths, hence the literals:
//!
//! ```sql
//! INSERT INTO "public"."outbox_messages" (key, value, headers)
//! SELECT k, v, h::text[]
//! FROM unnest($1::text[], $2::bytea[], $3::text[]) WITH ORDINALITY AS u(k, v, h, n)
//! ORDER BY n
//! ```
//!
//! and, when no message has a header, without `$3`:
//!
//! ```sql
//! INSERT INTO "public"."outbox_messages" (key, value)
//! SELECT k, v
//! FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(k, v, n)
//! ORDER BY n
//! ```
//!
//! The table refuses what troutbox checks first: a key or header with a NUL byte (`text`
//! cannot hold one) and a NULL header. The limits ([`MAX_KEY_LEN`](crate::MAX_KEY_LEN),
//! `max_value_size`, [`MAX_HEADERS`](crate::MAX_HEADERS),
//! [`MAX_HEADER_BYTES`](crate::MAX_HEADER_BYTES)) are the outbox's; honour them so that the
//! relay and your Sender see what they expect.
//!
//! **Per-key ordering.** On a table relayed with per-key ordering (`per_key_ordering` is
//! true in `SELECT per_key_ordering FROM "public"."troutbox_tables" WHERE table_name = $1`,
//! `$1` the table's name, here `outbox_messages`), every producer must first take the
//! transaction-scoped advisory lock of each key it adds, seeded by the table's name, in
//! ascending order of the locks, and only then draw the ids, all in the INSERT itself: the
//! ids of one key then follow the commit order of their transactions. A producer that does
//! not take the lock loses the order for everyone. One message:
//!
//! ```sql
//! WITH locked AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended($1::text, hashtextextended('"public"."outbox_messages"', 0))))
//! INSERT INTO "public"."outbox_messages" (key, value, headers)
//! SELECT $1::text, $2::bytea, $3::text[] WHERE EXISTS (SELECT FROM locked)
//! ```
//!
//! Many messages, with the same parameters as above:
//!
//! ```sql
//! WITH locked AS MATERIALIZED (SELECT count(*) FROM (
//!     SELECT pg_advisory_xact_lock(h) FROM (
//!         SELECT DISTINCT hashtextextended(k, hashtextextended('"public"."outbox_messages"', 0)) AS h FROM unnest($1::text[]) AS k
//!         ORDER BY h OFFSET 0) AS hashes) AS l)
//! INSERT INTO "public"."outbox_messages" (key, value, headers)
//! SELECT k, v, h::text[]
//! FROM unnest($1::text[], $2::bytea[], $3::text[]) WITH ORDINALITY AS u(k, v, h, n)
//! WHERE EXISTS (SELECT FROM locked)
//! ORDER BY n
//! ```
//!
//! **Notification.** Relays built with `notify(true)` listen on the table's channel,
//! `'troutbox_' || to_hex(hashtextextended('"public"."outbox_messages"', 0))`; a producer
//! wakes them at its commit by calling `pg_notify(channel, '')` in its transaction (an
//! empty payload, so PostgreSQL sends one notification per transaction). troutbox does it in
//! the INSERT itself, at most once every 5 ms per outbox (a relay just woken polls again
//! within milliseconds anyway):
//!
//! ```sql
//! WITH notified AS MATERIALIZED (SELECT pg_notify('troutbox_' || to_hex(hashtextextended('"public"."outbox_messages"', 0)), ''))
//! INSERT INTO "public"."outbox_messages" (key, value, headers)
//! SELECT $1::text, $2::bytea, $3::text[] WHERE EXISTS (SELECT FROM notified)
//! ```
//!
//! With both, the `locked` CTE comes first and the condition is
//! `EXISTS (SELECT FROM locked) AND EXISTS (SELECT FROM notified)`. Without a notification
//! the relays still find the messages at their next poll.

use ::diesel::result::Error as DieselError;
use ::diesel::PgConnection;

use super::NewMessage;
use crate::store::postgres::MakeTls;
use crate::{Error, Outbox};

/// Adds a message to the outbox through `conn`, normally inside a diesel transaction: the
/// message exists for the relay if and only if that transaction commits. Like
/// [`Outbox::add_message`], with the same checks and errors (see the [module](self)).
pub fn add_message<T: MakeTls>(
    outbox: &Outbox<T>,
    conn: &mut PgConnection,
    key: &str,
    value: &[u8],
) -> Result<(), Error> {
    add(outbox, conn, &NewMessage::new(key, value))
}

/// Adds one message with headers; like [`Outbox::add`].
///
/// ```no_run
/// # fn f(outbox: &troutbox::Outbox, conn: &mut diesel::PgConnection) -> Result<(), troutbox::Error> {
/// use troutbox::NewMessage;
/// let message = NewMessage::new("order-42", b"{}").header("content-type", "application/json");
/// troutbox::diesel::add(outbox, conn, &message)?;
/// # Ok(()) }
/// ```
pub fn add<T: MakeTls>(
    outbox: &Outbox<T>,
    conn: &mut PgConnection,
    message: &NewMessage<'_>,
) -> Result<(), Error> {
    outbox.insert_one(conn, message)
}

/// Adds many messages in one statement and one round trip, ids drawn in the order given;
/// returns how many were added. Like [`Outbox::add_messages`]: if one is invalid, none is
/// added.
///
/// ```no_run
/// # fn f(outbox: &troutbox::Outbox, conn: &mut diesel::PgConnection) -> Result<(), troutbox::Error> {
/// use troutbox::NewMessage;
/// let added = troutbox::diesel::add_messages(outbox, conn, [
///     NewMessage::new("order-1", b"created"),
///     NewMessage::new("order-2", b"created"),
/// ])?;
/// assert_eq!(added, 2);
/// # Ok(()) }
/// ```
pub fn add_messages<'m, T, I>(
    outbox: &Outbox<T>,
    conn: &mut PgConnection,
    messages: I,
) -> Result<u64, Error>
where
    T: MakeTls,
    I: IntoIterator<Item = NewMessage<'m>>,
{
    outbox.insert_many(conn, messages)
}

/// Lets `?` return a troutbox error from a closure whose error type is diesel's (a
/// `conn.transaction(|conn| -> QueryResult<_> { ... })`), so that diesel rolls the
/// transaction back: an [`Error::Diesel`] gives back diesel's own error, any other becomes a
/// [`QueryBuilderError`](DieselError::QueryBuilderError) holding the troutbox error (which
/// `downcast_ref::<troutbox::Error>()` recovers).
impl From<Error> for DieselError {
    fn from(error: Error) -> DieselError {
        match error {
            Error::Diesel { source, .. } => source,
            other => DieselError::QueryBuilderError(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::ident::Ident;
    use crate::store::postgres::sql::Sql;
    use crate::store::retention::Retention;
    use crate::{DEFAULT_SCHEMA, DEFAULT_TABLE};

    /// Words separated by single spaces, and no space inside parentheses' edges, so that the
    /// documentation's line breaks do not matter.
    fn normalize(sql: &str) -> String {
        sql.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace("( ", "(")
            .replace(" )", ")")
    }

    /// Every statement the module's documentation shows for other clients is one that the
    /// crate sends for the default table, and the plain ones are all there.
    #[test]
    fn the_documented_statements_are_the_ones_sent() {
        let schema = Ident::new("schema", DEFAULT_SCHEMA, 63).unwrap();
        let table = Ident::new("table", DEFAULT_TABLE, 51).unwrap();
        let sql = Sql::new(&schema, &table, &Retention::delete_on_send());
        let mut sent = Vec::new();
        for notify in [false, true] {
            for ordered in [false, true] {
                let (one, many, many_plain) = sql.produce.inserts(notify, ordered);
                sent.extend([one, many, many_plain].map(normalize));
            }
        }
        let source = include_str!("diesel.rs");
        let mut documented = Vec::new();
        let mut block: Option<String> = None;
        for line in source.lines().map_while(|l| l.strip_prefix("//!")) {
            let line = line.strip_prefix(' ').unwrap_or(line);
            match (&mut block, line) {
                (None, "```sql") => block = Some(String::new()),
                (Some(text), "```") => {
                    documented.push(normalize(text));
                    block = None;
                }
                (Some(text), _) => {
                    text.push_str(line);
                    text.push('\n');
                }
                (None, _) => {}
            }
        }
        assert_eq!(documented.len(), 6, "{documented:#?}");
        for statement in &documented {
            assert!(
                sent.contains(statement),
                "documented but not sent: {statement}\nsent:\n{sent:#?}"
            );
        }
        let (one, many, many_plain) = sql.produce.inserts(false, false);
        for plain in [one, many, many_plain].map(normalize) {
            assert!(documented.contains(&plain), "not documented: {plain}");
        }
        // The mode query as documented.
        assert_eq!(
            normalize(&sql.migrations.mode),
            "SELECT per_key_ordering FROM \"public\".\"troutbox_tables\" WHERE table_name = $1"
        );
    }
}
