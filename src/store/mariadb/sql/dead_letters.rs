//! The dead-letter admin API's statements, and the backlog's count.

use super::Names;

/// The columns of a dead message, in the order `store::mariadb::decode` reads them.
pub(crate) const DEAD_COLUMNS: &str =
    "id, `key`, value, headers, created_at, attempts, last_error, available_at";

#[derive(Debug)]
pub(crate) struct DeadLetterSql {
    /// Newest first, `limit` (`?`) before an optional id (`?`, NULL for none).
    pub(crate) list: String,
    pub(crate) one: String,
    table: String,
    pub(crate) requeue_all: String,
    pub(crate) purge_before: String,
    pub(crate) counts: String,
}

impl DeadLetterSql {
    pub(crate) fn new(n: &Names) -> DeadLetterSql {
        let t = &n.table;
        DeadLetterSql {
            list: format!(
                "SELECT {DEAD_COLUMNS} FROM {t}
                 WHERE state = 'dead' AND (? IS NULL OR id < ?)
                 ORDER BY id DESC LIMIT ?"
            ),
            one: format!("SELECT {DEAD_COLUMNS} FROM {t} WHERE state = 'dead' AND id = ?"),
            table: t.clone(),
            // Back to pending, due now, with its attempts reset: a fresh set of retries.
            requeue_all: format!(
                "UPDATE {t} SET state = 'pending', attempts = 0,
                    available_at = UTC_TIMESTAMP(6), last_error = NULL
                 WHERE state = 'dead'"
            ),
            purge_before: format!("DELETE FROM {t} WHERE state = 'dead' AND available_at < ?"),
            counts: format!(
                "SELECT COALESCE(SUM(state = 'pending'), 0), COALESCE(SUM(state = 'dead'), 0),
                        MIN(CASE WHEN state = 'pending' THEN created_at END)
                 FROM {t}"
            ),
        }
    }

    /// Re-queues the dead messages among `ids` (validated integers).
    pub(crate) fn requeue_ids(&self, ids: &[i64]) -> String {
        format!(
            "UPDATE {} SET state = 'pending', attempts = 0,
                available_at = UTC_TIMESTAMP(6), last_error = NULL
             WHERE state = 'dead' AND id IN ({})",
            self.table,
            super::id_list(ids)
        )
    }

    /// Deletes the dead messages among `ids`.
    pub(crate) fn purge_ids(&self, ids: &[i64]) -> String {
        format!(
            "DELETE FROM {} WHERE state = 'dead' AND id IN ({})",
            self.table,
            super::id_list(ids)
        )
    }
}
