//! Every SQL statement troutbox sends, one file per concern:
//!
//! - [`migrations`]: the versioned schema of an outbox table, and what reads it back;
//! - [`produce`]: the producer's INSERTs and the notification channel;
//! - [`claim`]: the claim protocol's statements (claim, journal, settle, late settle,
//!   recover, set aside);
//! - [`dead_letters`] and [`ordering`]: administration;
//! - [`partitions`]: partition maintenance (keep-sent retention, the inbox's window);
//! - [`inbox`]: the inbox's table, migration and receive statement.
//!
//! Statements are built once per [`PgStore`](crate::PgStore) from its validated schema and
//! table names (see [`Ident`]); nothing else is ever formatted into SQL text except integers
//! and timestamps computed by the crate itself. Each statement says which index serves it and
//! what it locks.
//!
//! Row states: `pending` rows wait for the relay (or for their retry time); `dead` rows ran out
//! of retries and wait for a person; `sent` rows exist only with
//! [`Retention::keep_sent`](crate::Retention::keep_sent). With the default retention, sent
//! rows are deleted in the same transaction that claimed them.

mod claim;
mod dead_letters;
pub(crate) mod inbox;
mod migrations;
mod ordering;
mod partitions;
mod produce;

pub(crate) use claim::{
    begin_claim, int8_multirange, ClaimKind, ClaimSql, BEGIN_SIDE, COMMIT, ROLLBACK,
};
pub(crate) use dead_letters::DeadLetterSql;
pub(crate) use migrations::{
    MigrationSql, ID_CACHE, MIGRATIONS_TABLE, MIGRATION_LOCK, MIGRATION_TIMEOUTS, SCHEMA_EXISTS,
    SCHEMA_VERSION, TABLES_TABLE, TABLE_EXISTS, TABLE_KIND,
};
pub(crate) use ordering::OrderingSql;
pub(crate) use partitions::{
    PartitionSql, DB_NOW, MAINTENANCE_ELECTION_TIMEOUTS, MAINTENANCE_LOCK,
    MAINTENANCE_STEP_TIMEOUTS,
};
pub(crate) use produce::{encode_headers, listen, ProduceSql, UNLISTEN};

use crate::store::ident::Ident;
use crate::store::retention::Retention;

/// The columns of a message, in the order [`message_from_row`](super::message_from_row)
/// reads them.
const MESSAGE_COLUMNS: &str = "id, key, value, headers, created_at, attempts";

/// Whether a row passes [`ROW_CHECK`], without failing on multi-dimensional headers.
const ROW_OK: &str = "isfinite(created_at) AND CASE WHEN coalesce(array_ndims(headers), 1) <> 1 \
     THEN false ELSE array_position(headers, NULL) IS NULL END";

/// Brings a row that breaks [`ROW_CHECK`] into line so that it can be updated (set aside).
const REPAIR: &str = "created_at = CASE WHEN isfinite(created_at) THEN created_at ELSE now() END, \
     headers = CASE WHEN coalesce(array_ndims(headers), 1) <> 1 THEN '{}'::text[] \
                    WHEN array_position(headers, NULL) IS NOT NULL THEN '{}'::text[] \
                    ELSE headers END";

/// What [`REPAIR`] changed, for `last_error`: the original values, or nothing.
/// (CASE branches are tried in order: `array_position` never sees a multi-dimensional array.)
const ORIGINAL: &str =
    "CASE WHEN NOT isfinite(created_at) OR coalesce(array_ndims(headers), 1) <> 1 \
          OR array_position(headers, NULL) IS NOT NULL \
     THEN ' (original created_at ' || created_at::text || ', headers ' || headers::text || ')' \
     ELSE '' END";

/// `alias`'s row is the head of its key: no pending row of the same key has a lower id. One
/// probe of the key index, backwards from the row (the `max` form): a row that is not a
/// head finds the row before it at once, where a forward probe would first step over the
/// index entries of every message of the key sent since the last VACUUM. Rows another relay
/// holds are still pending in any snapshot, so a held head hides its whole key.
fn is_head(alias: &str, table: &str) -> String {
    format!(
        "(SELECT max(p.id) FROM {table} AS p
          WHERE p.key COLLATE \"C\" = {alias}.key AND p.state = 'pending' AND p.id < {alias}.id) IS NULL"
    )
}

/// Statements for one outbox table, by concern.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) migrations: MigrationSql,
    pub(crate) produce: ProduceSql,
    pub(crate) claims: ClaimSql,
    pub(crate) dead: DeadLetterSql,
    pub(crate) ordering: OrderingSql,
    pub(crate) counts: String,
    /// Partition maintenance, with `keep_sent` retention only.
    pub(crate) partitions: Option<PartitionSql>,
}

impl Sql {
    pub(crate) fn new(schema: &Ident, table: &Ident, retention: &Retention) -> Sql {
        let s = schema.quoted();
        let t = format!("{s}.{}", table.quoted());
        let keep = retention.keep.is_some();
        Sql {
            migrations: MigrationSql::new(schema, table, retention),
            produce: ProduceSql::new(schema, table, retention),
            claims: ClaimSql::new(schema, table, retention),
            dead: DeadLetterSql::new(schema, table, retention),
            ordering: OrderingSql::new(schema, table, retention),
            // Status: one scan of the table. Rows claimed by a relay right now are counted as
            // pending (their claim is not committed).
            counts: format!(
                "SELECT count(*) FILTER (WHERE state = 'pending'),
                        count(*) FILTER (WHERE state = 'dead'),
                        count(*) FILTER (WHERE state = 'sent'),
                        min(created_at) FILTER (WHERE state = 'pending' AND isfinite(created_at))
                 FROM {t}"
            ),
            partitions: keep
                .then(|| PartitionSql::new(schema, table, "created_at", &["pending", "dead"])),
        }
    }
}
