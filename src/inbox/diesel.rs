//! [`Inbox::receive`](crate::Inbox::receive) on a diesel [`PgConnection`] (feature `diesel`),
//! inside your own diesel transaction.
//!
//! ```no_run
//! use diesel::{Connection, PgConnection, RunQueryDsl};
//! use troutbox::{Inbox, Received};
//!
//! # fn f(inbox: &Inbox, conn: &mut PgConnection, message_id: &str) -> diesel::QueryResult<()> {
//! conn.transaction(|conn| {
//!     if troutbox::inbox::diesel::receive(inbox, conn, "billing", message_id)? == Received::First {
//!         diesel::sql_query("UPDATE accounts SET paid = paid + 1 WHERE id = 42").execute(conn)?;
//!     }
//!     Ok(())
//! })
//! # }
//! ```
//!
//! Same statement, same answers and same input checks as `Inbox::receive`. A statement the
//! database refuses is [`Error::Diesel`] (a missing table among them: diesel's errors do not
//! carry the SQLSTATE that would tell it apart), except a table created with another window,
//! [`Error::InboxWindowMismatch`]. `?` converts a troutbox [`Error`] into a diesel error
//! (see [`troutbox::diesel`](crate::diesel)), so that diesel rolls the transaction back; under
//! REPEATABLE READ or SERIALIZABLE, a concurrent first delivery is then diesel's own
//! `SerializationFailure`, for your retry loop.

use ::diesel::result::{DatabaseErrorKind, Error as DieselError};
use ::diesel::sql_types::Text;
use ::diesel::{PgConnection, RunQueryDsl};

use super::{check_input, Inbox, Received};
use crate::store::postgres::MakeTls;
use crate::Error;

/// [`Inbox::receive`] on a diesel connection: records that `consumer` received
/// `message_id` in the connection's current transaction, and says whether it is the first
/// delivery or a duplicate.
pub fn receive<T: MakeTls>(
    inbox: &Inbox<T>,
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
) -> Result<Received, Error> {
    check_input(consumer, message_id)?;
    let (statement, at) = inbox.receive_statement();
    let query = ::diesel::sql_query(statement)
        .bind::<Text, _>(consumer)
        .bind::<Text, _>(message_id);
    let inserted = match at {
        // `$3::timestamptz` casts the text.
        Some(at) => query.bind::<Text, _>(timestamp_text(at)).execute(conn),
        None => query.execute(conn),
    }
    .map_err(|source| match &source {
        DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, info)
            if info.constraint_name() == Some(inbox.window_check().as_str()) =>
        {
            inbox.window_mismatch()
        }
        DieselError::DatabaseError(DatabaseErrorKind::NotNullViolation, info)
            if info.column_name() == Some("slot") =>
        {
            inbox.window_mismatch()
        }
        _ => Error::Diesel {
            context: "recording a received message in the inbox",
            source,
        },
    })?;
    Ok(inbox.received(inserted as u64))
}

/// A time as a PostgreSQL timestamptz literal in UTC, to the microsecond.
fn timestamp_text(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}
