//! Every SQL statement of the inbox ([`Inbox`](crate::Inbox)), in one place, built once per
//! inbox from its validated schema and table names. Nothing else is formatted into the text
//! but integers the crate computes itself (the partition width in seconds).
//!
//! The table has one row per (consumer, message id) and duplicate slot. With a window, rows
//! live in range partitions on `slot`, a partition per slot, dropped whole by maintenance;
//! forever, the table is a plain one with one row per (consumer, message id). Why two rows
//! per first delivery, and why that makes uniqueness hold across partitions, is in the
//! [`inbox`](crate::inbox) module's documentation.

use super::partitions::PartitionSql;
use crate::store::ident::Ident;

/// The table that records, per schema, each inbox table's schema version and window.
pub(crate) const INBOXES_TABLE: &str = "troutbox_inboxes";

/// The schema version of inbox tables this build creates and expects.
pub(crate) const INBOX_VERSION: i32 = 1;

/// The longest suffix appended to an inbox table's name (`_window_check`); partition names
/// (`_p` and up to 11 digits, `_default`) are shorter.
pub(crate) const INBOX_SUFFIX_LEN: usize = "_window_check".len();

/// Whether the inbox table's row check is the one that failed (a window mismatch).
pub(crate) fn window_check_name(table: &Ident) -> String {
    format!("{}_window_check", table.as_str())
}

/// The statements of one inbox table.
#[derive(Debug)]
pub(crate) struct InboxSql {
    pub(crate) create_schema: String,
    pub(crate) create_inboxes: String,
    /// `$1` the table's name: its version and window, if it was migrated.
    pub(crate) recorded: String,
    /// `$1` the table's name, `$2` the version, `$3` the window in seconds (0: forever).
    pub(crate) record: String,
    pub(crate) migration_v1: String,
    /// `$1` consumer, `$2` message id: inserts the entries of a first delivery, and nothing
    /// for a duplicate; rows affected tell which ([`InboxSql::first`]).
    pub(crate) receive: String,
    /// [`receive`](Self::receive) with the receive time given as `$3` (`timestamptz`)
    /// instead of the server's clock, for an injected clock (tests); with a window only.
    pub(crate) receive_at: Option<String>,
    /// Rows [`receive`](Self::receive) inserts for a first delivery.
    pub(crate) first: u64,
    /// Partition maintenance, with a window only.
    pub(crate) partitions: Option<PartitionSql>,
}

impl InboxSql {
    /// The statements of `schema.table`, whose partitions (and duplicate slots) are
    /// `interval` seconds wide, or `None` for an inbox that keeps its entries forever.
    pub(crate) fn new(schema: &Ident, table: &Ident, interval: Option<i64>) -> InboxSql {
        let s = schema.quoted();
        let t = format!("{s}.{}", table.quoted());
        let check = format!("\"{}\"", window_check_name(table));
        let window = interval.unwrap_or(0);
        let columns = format!(
            "consumer text NOT NULL,
             message_id text NOT NULL,
             window_secs int8 NOT NULL CONSTRAINT {check} CHECK (window_secs = {window}),
             received_at timestamptz NOT NULL DEFAULT clock_timestamp()"
        );
        let (migration_v1, receive, receive_at, first) = match interval {
            Some(i) => {
                let default_partition = format!("{s}.\"{}_default\"", table.as_str());
                // The slot of a time is the start of the `i`-second range it falls in; a
                // first delivery records its slot and the one before, in that order in every
                // transaction (so two of them never wait on each other in a cycle). Any
                // other delivery less than `i` seconds later shares one of the two slots, so
                // one of its rows meets one of these in the primary key of one partition: ON
                // CONFLICT waits for the other transaction, then skips the row if it
                // committed. Rows affected: 2 for a first delivery. The time is read once
                // per statement (`statement_timestamp()` is stable within it), so both rows
                // come from the same instant. Two rows of VALUES rather than a join: the
                // planner's work is half the transaction's cost difference (measured with
                // pgbench, benches/inbox.rs).
                let insert = |now: &str| {
                    let slot =
                        format!("date_bin(interval '{i} seconds', {now}, timestamptz 'epoch')");
                    format!(
                        "INSERT INTO {t} (consumer, message_id, slot, window_secs)
                         VALUES ($1, $2, {slot}, {i}), ($1, $2, {slot} - interval '{i} seconds', {i})
                         ON CONFLICT DO NOTHING"
                    )
                };
                (
                    // The primary key must contain the partition key; with one slot per
                    // partition it is unique on (consumer, message_id) in each. The
                    // DEFAULT partition catches rows no partition covers yet.
                    format!(
                        "CREATE TABLE {t} ({columns}, slot timestamptz NOT NULL,
                             PRIMARY KEY (consumer, message_id, slot)) PARTITION BY RANGE (slot);
                         CREATE TABLE {default_partition} PARTITION OF {t} DEFAULT;"
                    ),
                    insert("statement_timestamp()"),
                    Some(insert("$3::timestamptz")),
                    2,
                )
            }
            None => {
                let insert = format!(
                    "INSERT INTO {t} (consumer, message_id, window_secs) VALUES ($1::text, $2::text, 0)
                     ON CONFLICT DO NOTHING"
                );
                (
                    format!("CREATE TABLE {t} ({columns}, PRIMARY KEY (consumer, message_id));"),
                    insert,
                    None,
                    1,
                )
            }
        };
        let m = format!("{s}.\"{INBOXES_TABLE}\"");
        InboxSql {
            create_schema: format!("CREATE SCHEMA {s}"),
            create_inboxes: format!(
                "CREATE TABLE {m} (
                    table_name text PRIMARY KEY,
                    version int4 NOT NULL,
                    window_secs int8 NOT NULL,
                    changed_at timestamptz NOT NULL DEFAULT now())"
            ),
            recorded: format!("SELECT version, window_secs FROM {m} WHERE table_name = $1"),
            record: format!(
                "INSERT INTO {m} (table_name, version, window_secs) VALUES ($1, $2, $3)
                 ON CONFLICT (table_name) DO UPDATE SET version = excluded.version, changed_at = now()"
            ),
            migration_v1,
            receive,
            receive_at,
            first,
            partitions: interval.map(|_| PartitionSql::new(schema, table, "slot", &[])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ident::MAX_IDENT_LEN;

    #[test]
    fn names_are_quoted_and_the_width_is_in_the_statement() {
        let schema = Ident::new("schema", "App", MAX_IDENT_LEN).unwrap();
        let table = Ident::new("table", "Inbox", MAX_IDENT_LEN).unwrap();
        let sql = InboxSql::new(&schema, &table, Some(3600));
        assert!(sql.receive.contains("INTO \"App\".\"Inbox\""));
        assert!(sql.receive.contains("interval '3600 seconds'"));
        assert!(sql.migration_v1.contains("CHECK (window_secs = 3600)"));
        assert_eq!(sql.first, 2);
        let forever = InboxSql::new(&schema, &table, None);
        assert!(forever.migration_v1.contains("CHECK (window_secs = 0)"));
        assert!(forever.partitions.is_none());
        assert_eq!(forever.first, 1);
    }
}
