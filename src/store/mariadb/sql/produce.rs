//! The producer's statements: the INSERT of one or many messages, and the per-key locks of
//! an ordered table.

use super::migrations::KEY_LOCK_BUCKETS;
use super::Names;

/// Rows per INSERT statement of `add_messages` (and fewer when the packet bound cuts them
/// sooner, see `store::mariadb::producer`): each distinct row count is one more prepared
/// statement in the connection's cache, so calls use this one or the remainder's.
pub(crate) const ROWS_PER_INSERT: usize = 100;

#[derive(Debug)]
pub(crate) struct ProduceSql {
    table: String,
    key_locks: String,
    /// The INSERT of one message.
    pub(crate) insert_one: String,
}

impl ProduceSql {
    pub(crate) fn new(n: &Names) -> ProduceSql {
        let table = n.table.clone();
        ProduceSql {
            insert_one: insert(&table, 1),
            table,
            key_locks: n.key_locks.clone(),
        }
    }

    /// The INSERT of `rows` messages: key, value and headers each, as parameters; both
    /// times from the server's clock, in UTC.
    pub(crate) fn insert(&self, rows: usize) -> String {
        insert(&self.table, rows)
    }

    /// Per-key ordering: locks the buckets of `keys` keys (one parameter each) until the
    /// producer's transaction ends, in ascending bucket order (the scan of the primary key),
    /// so two producers of the same key commit one after the other and their ids follow
    /// commit order, and two calls locking several keys never deadlock each other. A
    /// row lock: released by the transaction's COMMIT or ROLLBACK, unlike `GET_LOCK`, which
    /// lives as long as the session.
    pub(crate) fn lock_keys(&self, keys: usize) -> String {
        let buckets = vec![format!("CRC32(?) % {KEY_LOCK_BUCKETS}"); keys];
        format!(
            "SELECT bucket FROM {} WHERE bucket IN ({}) ORDER BY bucket FOR UPDATE",
            self.key_locks,
            buckets.join(", ")
        )
    }
}

fn insert(table: &str, rows: usize) -> String {
    let row = "(?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))";
    format!(
        "INSERT INTO {table} (`key`, value, headers, created_at, available_at) VALUES {}",
        vec![row; rows].join(", ")
    )
}
