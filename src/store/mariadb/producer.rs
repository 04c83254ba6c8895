//! The producer's INSERTs on MariaDB: validated messages, the per-key locks of an ordered
//! table, and statements cut to the server's packet bound.

use mysql::prelude::Queryable;
use mysql::Value;

use super::sql::produce::ROWS_PER_INSERT;
use super::sql::Sql;
use super::MariaDbStore;
use crate::Error;

pub(crate) use super::decode::encode_headers;

/// A validated message as its row stores it (headers encoded, see [`encode_headers`]).
pub(crate) struct NewRow<'a> {
    pub(crate) key: &'a str,
    pub(crate) value: &'a [u8],
    pub(crate) headers: Vec<u8>,
}

/// What a statement carries besides its rows' bytes: its text and each row's framing.
const STATEMENT_OVERHEAD: usize = 16 << 10;
const ROW_OVERHEAD: usize = 64;

/// The bytes a message takes in an INSERT's packet.
fn row_bytes(m: &NewRow<'_>) -> usize {
    m.key.len() + m.value.len() + m.headers.len() + ROW_OVERHEAD
}

/// Inserts `messages` (validated by the caller) on `conn`, in the caller's transaction:
/// with `ordered`, after locking their keys; in statements of at most
/// [`ROWS_PER_INSERT`] rows that each fit `max_packet` (the server's
/// `max_allowed_packet`). Returns the rows added.
pub(crate) fn insert(
    conn: &mut impl Queryable,
    store: &MariaDbStore,
    sql: &Sql,
    ordered: bool,
    messages: &[NewRow<'_>],
    max_packet: usize,
) -> Result<u64, Error> {
    let context = "adding messages to the outbox";
    let room = max_packet.saturating_sub(STATEMENT_OVERHEAD);
    if let Some(big) = messages.iter().find(|m| row_bytes(m) > room) {
        return Err(Error::Unsupported {
            what: format!("a message of {} bytes", row_bytes(big)),
            reason: format!(
                "it does not fit MariaDB's max_allowed_packet ({max_packet} bytes) with its statement: raise max_allowed_packet on the server, or lower max_value_size"
            ),
        });
    }
    if ordered {
        let mut keys: Vec<&str> = messages.iter().map(|m| m.key).collect();
        keys.sort_unstable();
        keys.dedup();
        let params: Vec<Value> = keys.iter().map(|k| Value::from(*k)).collect();
        conn.exec_drop(sql.produce.lock_keys(keys.len()), params)
            .map_err(store.db_error("locking the messages' keys (per-key ordering)"))?;
    }
    let mut added = 0u64;
    let mut start = 0;
    while start < messages.len() {
        // As many rows as fit the packet, at most ROWS_PER_INSERT.
        let mut end = start;
        let mut bytes = 0usize;
        while end < messages.len() && end - start < ROWS_PER_INSERT {
            let next = row_bytes(&messages[end]);
            if end > start && bytes + next > room {
                break;
            }
            bytes += next;
            end += 1;
        }
        let chunk = &messages[start..end];
        let mut params = Vec::with_capacity(chunk.len() * 3);
        for m in chunk {
            params.push(Value::Bytes(m.key.as_bytes().to_vec()));
            params.push(Value::Bytes(m.value.to_vec()));
            params.push(Value::Bytes(m.headers.clone()));
        }
        let text = if chunk.len() == 1 {
            sql.produce.insert_one.clone()
        } else {
            sql.produce.insert(chunk.len())
        };
        conn.exec_drop(text, params)
            .map_err(store.db_error(context))?;
        added += chunk.len() as u64;
        start = end;
    }
    Ok(added)
}

/// The server's `max_allowed_packet`.
pub(crate) fn max_packet(conn: &mut impl Queryable, store: &MariaDbStore) -> Result<usize, Error> {
    let packet: Option<u64> = conn
        .query_first("SELECT @@max_allowed_packet")
        .map_err(store.db_error("reading max_allowed_packet"))?;
    Ok(usize::try_from(packet.unwrap_or(1 << 24)).unwrap_or(usize::MAX))
}
