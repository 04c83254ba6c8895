//! Dead letters: listing, showing, re-queueing and purging dead messages.

use crate::store::ident::Ident;
use crate::store::retention::Retention;

use super::MESSAGE_COLUMNS;

#[derive(Debug)]
pub(crate) struct DeadLetterSql {
    pub(crate) list: String,
    pub(crate) summaries: String,
    pub(crate) one: String,
    pub(crate) requeue_ids: String,
    pub(crate) requeue_all: String,
    pub(crate) purge_ids: String,
    pub(crate) purge_before: String,
}

impl DeadLetterSql {
    pub(crate) fn new(schema: &Ident, table: &Ident, _retention: &Retention) -> DeadLetterSql {
        let s = schema.quoted();
        let t = format!("{s}.{}", table.quoted());
        DeadLetterSql {
            // Admin: newest dead messages first, through the dead index.
            list: format!(
                "SELECT {MESSAGE_COLUMNS}, last_error, available_at
                 FROM {t} WHERE state = 'dead' AND ($2::int8 IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $1"
            ),
            // Admin: the same listing without the values, only their length (read from the
            // TOAST header: a large value is never fetched).
            summaries: format!(
                "SELECT id, key, attempts, created_at, available_at, last_error,
                        octet_length(value)::int8
                 FROM {t} WHERE state = 'dead' AND ($2::int8 IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $1"
            ),
            // Admin: one dead message by id (the primary key).
            one: format!(
                "SELECT {MESSAGE_COLUMNS}, last_error, available_at
                 FROM {t} WHERE state = 'dead' AND id = $1"
            ),
            // Admin: a re-queued message starts over, as if just added.
            requeue_ids: format!(
                "UPDATE {t} SET state = 'pending', attempts = 0, available_at = now(), last_error = NULL
                 WHERE state = 'dead' AND id = ANY($1)"
            ),
            requeue_all: format!(
                "UPDATE {t} SET state = 'pending', attempts = 0, available_at = now(), last_error = NULL
                 WHERE state = 'dead'"
            ),
            // Admin: dead messages only, by id or by time of death.
            purge_ids: format!("DELETE FROM {t} WHERE state = 'dead' AND id = ANY($1)"),
            purge_before: format!(
                "DELETE FROM {t} WHERE state = 'dead' AND available_at < $1"
            ),
        }
    }
}
