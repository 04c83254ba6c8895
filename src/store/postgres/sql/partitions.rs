//! Partition maintenance (the outbox's keep-sent retention, the inbox's window): the
//! election, the settings of each step, and the statements that create, count and drop
//! partitions.

use time::OffsetDateTime;

use crate::store::ident::Ident;

/// Elects one maintainer per table: transaction-scoped like the migration lock, so it is
/// released on the connection that took it, by the COMMIT, or by the server when that
/// connection dies (and another instance takes over at its next run).
pub(crate) const MAINTENANCE_LOCK: &str =
    "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))";

/// The transaction that elects one maintainer holds only its advisory lock. It waits for
/// nothing, so it sets no lock timeout; it is bounded in time so that a frozen maintainer
/// cannot keep the others out for ever (a dead one loses the lock with its connection).
pub(crate) const MAINTENANCE_ELECTION_TIMEOUTS: &str = "SET LOCAL statement_timeout = '60s'; \
     SET LOCAL idle_in_transaction_session_timeout = '1h'";

/// The settings of each maintenance step, whatever the role or database sets:
/// - `lock_timeout` 100 ms: DDL waiting for its lock makes every later claim and INSERT of
///   the table queue behind it, so this is also the longest maintenance can stall them; a
///   step that times out is put off to the next run.
/// - no statement timeout, which would cut a move out of the DEFAULT partition short; but
///   10 s `idle_in_transaction_session_timeout`: a step holds ACCESS EXCLUSIVE across a few
///   round trips, and a maintainer that goes silent between them (a frozen network path, a
///   paused process) would otherwise block every producer INSERT until TCP gives up, hours
///   later. The server ends such a step within 10 s; the step is done again next run.
/// - the planner settings of the claim (see [`begin_claim`]): counts of unsent rows go
///   through the partial indexes even on partitions never analyzed.
pub(crate) const MAINTENANCE_STEP_TIMEOUTS: &str = "SET LOCAL lock_timeout = '100ms'; \
     SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = '10s'; \
     SET LOCAL enable_seqscan = off; \
     SET LOCAL enable_bitmapscan = off; SET LOCAL jit = off";

/// The database's clock, in Unix seconds, for partition maintenance.
pub(crate) const DB_NOW: &str = "SELECT floor(extract(epoch FROM now()))::int8";

/// Statements of partition maintenance, for any table in range partitions on one timestamp
/// column with a DEFAULT partition: the outbox with
/// [`Retention::keep_sent`](crate::Retention::keep_sent), and the inbox with a duplicate
/// window (`store/postgres/sql/inbox.rs`). Partition names are the table's validated name plus `_p` and
/// the partition's start in Unix seconds: always valid, never truncated.
#[derive(Debug)]
pub(crate) struct PartitionSql {
    schema: String,
    table: String,
    parent: String,
    /// The partition key, a `timestamptz` column.
    column: &'static str,
    /// The values of the `state` column whose rows keep an expired partition alive (each
    /// served by a partial index); none for a table whose expired partitions are always
    /// dropped.
    kept_states: &'static [&'static str],
    pub(crate) default_partition: String,
    /// Names of the partitions attached to the table (the DEFAULT one included).
    pub(crate) list: String,
    /// The partition slots (start / interval) of the rows sitting in the DEFAULT partition.
    pub(crate) default_slots: String,
}

impl PartitionSql {
    /// The partitions of `schema.table`, on `column`; an expired partition holding a row
    /// whose `state` is one of `kept_states` is kept.
    pub(crate) fn new(
        schema: &Ident,
        table: &Ident,
        column: &'static str,
        kept_states: &'static [&'static str],
    ) -> PartitionSql {
        let s = schema.quoted();
        let parent = format!("{s}.{}", table.quoted());
        let default_partition = format!("{s}.\"{}_default\"", table.as_str());
        PartitionSql {
            list: format!(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = '{}'::regclass",
                parent.replace('\'', "''")
            ),
            default_slots: format!(
                "SELECT DISTINCT floor(extract(epoch FROM {column}) / $1::int8)::int8 FROM {default_partition}
                 WHERE isfinite({column})"
            ),
            schema: s,
            table: table.as_str().to_owned(),
            parent,
            column,
            kept_states,
            default_partition,
        }
    }

    /// Whether some rows keep an expired partition alive (see [`count_unsent`](Self::count_unsent)).
    pub(crate) fn keeps_rows(&self) -> bool {
        !self.kept_states.is_empty()
    }

    /// The unqualified name of the partition starting at `start` (Unix seconds).
    pub(crate) fn partition_name(&self, start: i64) -> String {
        format!("{}_p{start}", self.table)
    }

    /// The unqualified name of the DEFAULT partition.
    pub(crate) fn default_name(&self) -> String {
        format!("{}_default", self.table)
    }

    /// Parses a partition name back to its start, `None` for the DEFAULT partition or a
    /// table this crate did not create.
    pub(crate) fn partition_start(&self, name: &str) -> Option<i64> {
        name.strip_prefix(&self.table)?
            .strip_prefix("_p")?
            .parse()
            .ok()
    }

    fn qualified(&self, start: i64) -> String {
        format!("{}.\"{}\"", self.schema, self.partition_name(start))
    }

    /// Creates the partition for `[start, end)` and attaches it, first moving any rows of
    /// that range out of the DEFAULT partition (attaching would fail with them there).
    ///
    /// The table is locked first, in EXCLUSIVE mode (plain reads go on), as claims and
    /// INSERTs take it, so that none of them can hold it and wait for a partition this step
    /// holds (a deadlock). ATTACH alone would need less, but an INSERT that routed its row
    /// to DEFAULT before the attach and writes it after fails the partition constraint, and
    /// a claim holding DEFAULT would deadlock with it. Claims and INSERTs wait for the step:
    /// milliseconds when DEFAULT is empty, as it is when partitions are made ahead.
    pub(crate) fn create_partition(&self, start: i64, end: i64) -> String {
        let p = self.qualified(start);
        let (from, to) = (timestamp(start), timestamp(end));
        format!(
            "LOCK TABLE ONLY {parent} IN EXCLUSIVE MODE;
             LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE;
             CREATE TABLE {p} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
             WITH moved AS (
                DELETE FROM {default} WHERE {column} >= '{from}' AND {column} < '{to}' RETURNING *)
             INSERT INTO {p} SELECT * FROM moved;
             ALTER TABLE {parent} ATTACH PARTITION {p} FOR VALUES FROM ('{from}') TO ('{to}');",
            parent = self.parent,
            default = self.default_partition,
            column = self.column,
        )
    }

    /// Counts the rows of an expired partition that still matter (for the outbox: pending or
    /// dead), through the partial index of each state, without locking anything beyond a
    /// read. `0` for a table that keeps no rows.
    pub(crate) fn count_unsent(&self, start: i64) -> String {
        let p = self.qualified(start);
        let counts: Vec<String> = self
            .kept_states
            .iter()
            .map(|state| format!("(SELECT count(*) FROM {p} WHERE state = '{state}')"))
            .collect();
        if counts.is_empty() {
            return "SELECT 0::int8".to_owned();
        }
        format!("SELECT {}", counts.join(" + "))
    }

    /// Locks the partitioned table against everything, before a partition is dropped: the
    /// table first, as claims and INSERTs take it, so that maintenance never holds a
    /// partition that one of them holds the table for and waits for (a deadlock). `ONLY`:
    /// the partitions are not locked with it; no one reaches them without the table.
    pub(crate) fn lock_parent(&self) -> String {
        format!("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE", self.parent)
    }

    /// Whether an expired partition holds any row that keeps it, under [`lock_parent`].
    pub(crate) fn any_unsent(&self, start: i64) -> String {
        let p = self.qualified(start);
        let exists: Vec<String> = self
            .kept_states
            .iter()
            .map(|state| format!("EXISTS (SELECT FROM {p} WHERE state = '{state}')"))
            .collect();
        if exists.is_empty() {
            return "SELECT false".to_owned();
        }
        format!("SELECT {}", exists.join(" OR "))
    }

    /// Drops an expired partition (holding, for the outbox, only sent rows).
    pub(crate) fn drop_partition(&self, start: i64) -> String {
        format!("DROP TABLE {}", self.qualified(start))
    }
}

/// A Unix time as a PostgreSQL timestamptz literal in UTC.
fn timestamp(unix: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_literals() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00+00");
        assert_eq!(timestamp(1_764_288_000), "2025-11-28 00:00:00+00");
    }

    #[test]
    fn partition_names_round_trip() {
        let schema = Ident::new("schema", "s", 63).unwrap();
        let table = Ident::new("table", "t_1", 51).unwrap();
        let p = PartitionSql::new(&schema, &table, "created_at", &["pending", "dead"]);
        assert_eq!(p.partition_name(86_400), "t_1_p86400");
        assert_eq!(p.partition_start("t_1_p86400"), Some(86_400));
        assert_eq!(p.partition_start("t_1_default"), None);
        assert_eq!(p.partition_start("other_p1"), None);
    }
}
