//! Rows to [`Message`]s, fallibly: a row is outside input (anyone with INSERT rights, or a
//! row written by hand, can put values there that Rust types refuse), so no column is read
//! with a panicking `get`.

use std::sync::Arc;

use postgres::Row;
use time::OffsetDateTime;

use crate::message::{Message, Status};
use crate::store::protocol::Undecodable;

/// Reads column `index` (called `column` in errors) as a `V`.
pub(crate) fn column<'a, V: postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
    column: &'static str,
) -> Result<V, Undecodable> {
    row.try_get(index).map_err(|e| Undecodable {
        column,
        // The driver's own text ("error deserializing column 4") names only the index;
        // its source says what was wrong with the value.
        reason: match std::error::Error::source(&e) {
            Some(source) => source.to_string(),
            None => e.to_string(),
        },
    })
}

/// Builds a [`Message`] from a row with the columns of `sql::MESSAGE_COLUMNS`
/// (`id, key, value, headers, created_at, attempts`).
/// `outbox` is the table's identity (see [`Message::dedup_key`]).
pub(crate) fn message(row: &Row, outbox: &Arc<str>) -> Result<Message, Undecodable> {
    let flat: Vec<Option<String>> = column(row, 3, "headers")?;
    if flat.len() % 2 != 0 {
        return Err(Undecodable {
            column: "headers",
            reason: format!("{} elements, expected (name, value) pairs", flat.len()),
        });
    }
    let mut headers = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        match (name, value) {
            (Some(name), Some(value)) => headers.push((name, value)),
            _ => {
                return Err(Undecodable {
                    column: "headers",
                    reason: "contains a NULL element".into(),
                })
            }
        }
    }
    let attempts: i32 = column(row, 5, "attempts")?;
    Ok(Message {
        id: column(row, 0, "id")?,
        outbox: Arc::clone(outbox),
        key: column(row, 1, "key")?,
        value: column(row, 2, "value")?,
        headers,
        created_at: column::<OffsetDateTime>(row, 4, "created_at")?,
        attempts: u32::try_from(attempts).map_err(|_| Undecodable {
            column: "attempts",
            reason: format!("{attempts} is negative"),
        })?,
        status: Status::Unmarked,
    })
}

/// The same for listing dead messages, which must show every dead row, including those set
/// aside because they could not be decoded: an undecodable column reads as empty (headers,
/// key, value), the Unix epoch (created_at) or 0 (attempts); the row's `last_error` says why.
pub(crate) fn message_lenient(row: &Row) -> Message {
    let flat: Vec<Option<String>> = column(row, 3, "headers").unwrap_or_default();
    let mut headers = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        headers.push((name.unwrap_or_default(), value.unwrap_or_default()));
    }
    let attempts: i32 = column(row, 5, "attempts").unwrap_or(0);
    Message {
        id: column(row, 0, "id").unwrap_or(0),
        outbox: Arc::from(""),
        key: column(row, 1, "key").unwrap_or_default(),
        value: column(row, 2, "value").unwrap_or_default(),
        headers,
        created_at: column(row, 4, "created_at").unwrap_or(OffsetDateTime::UNIX_EPOCH),
        attempts: u32::try_from(attempts).unwrap_or(0),
        status: Status::Unmarked,
    }
}

/// A row of `Sql::dead_summaries` of the table `outbox`, leniently like
/// [`message_lenient`]: a dead row may be one set aside because it could not be decoded.
pub(crate) fn dead_summary(row: &Row, outbox: &Arc<str>) -> crate::DeadSummary {
    let attempts: i32 = column(row, 2, "attempts").unwrap_or(0);
    let bytes: i64 = column(row, 6, "value").unwrap_or(0);
    let id = column(row, 0, "id").unwrap_or(0);
    crate::DeadSummary {
        id,
        dedup_key: crate::message::dedup_key(outbox, id),
        key: column(row, 1, "key").unwrap_or_default(),
        attempts: u32::try_from(attempts).unwrap_or(0),
        created_at: column(row, 3, "created_at").unwrap_or(OffsetDateTime::UNIX_EPOCH),
        died_at: column(row, 4, "available_at").unwrap_or(OffsetDateTime::UNIX_EPOCH),
        last_error: column(row, 5, "last_error").unwrap_or(None),
        value_bytes: u64::try_from(bytes).unwrap_or(0),
    }
}
