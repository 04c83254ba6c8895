//! Per-key ordering's administration: blocked keys, and skipping a message that blocks one.

use crate::store::ident::Ident;
use crate::store::retention::Retention;

use super::{is_head, ORIGINAL, REPAIR};

#[derive(Debug)]
pub(crate) struct OrderingSql {
    pub(crate) skip: String,
    pub(crate) blocked_keys: String,
    pub(crate) blocked_summary: String,
}

impl OrderingSql {
    pub(crate) fn new(schema: &Ident, table: &Ident, _retention: &Retention) -> OrderingSql {
        let s = schema.quoted();
        let t = format!("{s}.{}", table.quoted());
        let (repair, original) = (REPAIR, ORIGINAL);
        OrderingSql {
            // Admin, ordered mode: a message that blocks its key, given up on explicitly.
            // SKIP LOCKED: a message a relay holds right now is not skipped (the caller is
            // told, and can try again once that send is over).
            skip: format!(
                "UPDATE {t} SET state = 'dead', available_at = now(),
                    {repair}, last_error = 'skipped' || {original}
                 WHERE state = 'pending' AND id IN (
                    SELECT id FROM {t} WHERE id = $1 AND state = 'pending' FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            ),
            // Admin and metrics, ordered mode: keys whose head has failed at least once, with
            // the head, and how many messages wait behind it (one probe of the key index
            // per blocked key). A scan of the pending rows, like `counts`.
            blocked_keys: format!(
                "SELECT h.key, h.id, h.attempts, h.last_error, h.available_at,
                        CASE WHEN isfinite(h.created_at)
                             THEN greatest(extract(epoch FROM now() - h.created_at), 0)::float8
                             ELSE 0 END,
                        (SELECT count(*) FROM {t} b WHERE b.key COLLATE \"C\" = h.key AND b.state = 'pending' AND b.id > h.id)
                 FROM {t} h
                 WHERE h.state = 'pending' AND h.attempts > 0 AND {head}
                 ORDER BY h.id LIMIT $1",
                head = is_head("h", &t),
            ),
            blocked_summary: format!(
                "SELECT count(*),
                        coalesce(max(extract(epoch FROM now() - h.created_at))
                                 FILTER (WHERE isfinite(h.created_at)), 0)::float8
                 FROM {t} h
                 WHERE h.state = 'pending' AND h.attempts > 0 AND {head}",
                head = is_head("h", &t),
            ),
        }
    }
}
