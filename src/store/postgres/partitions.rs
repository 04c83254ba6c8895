//! Partition maintenance for [`Retention::keep_sent`](crate::Retention::keep_sent) and for
//! the inbox's duplicate window ([`Inbox`](crate::Inbox)): create partitions ahead, move rows
//! out of the DEFAULT partition, drop expired partitions (for the outbox, only those that
//! hold nothing but sent messages). One routine, [`maintain`], elected across instances, for
//! both tables. (The thread that runs it on a schedule is `maintenance::scheduler`.)

use std::collections::BTreeSet;
use std::time::Duration;

use super::sql::{self, PartitionSql};
use super::{MakeTls, PgPool, PgStore};
use crate::reports::MaintenanceReport;
use crate::Error;

/// Opens one maintenance step's transaction, with the timeouts it relies on.
fn begin_step(conn: &mut postgres::Client) -> Result<postgres::Transaction<'_>, postgres::Error> {
    let mut tx = conn
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::ReadCommitted)
        .start()?;
    tx.batch_execute(sql::MAINTENANCE_STEP_TIMEOUTS)?;
    Ok(tx)
}

/// Whether a step gave up waiting for a lock (`lock_timeout`).
fn is_lock_timeout(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

fn defer(report: &mut MaintenanceReport, name: String, what: &str) {
    log::info!("partition maintenance: {what} of partition {name} put off to the next run: the table stayed busy");
    report.deferred.push(name);
}

/// A table in range partitions as maintenance sees it: its statements and its settings.
/// The outbox with keep-sent retention is one, the inbox with a duplicate window another;
/// both are maintained by [`maintain`], elected across instances the same way.
pub(crate) struct Partitioned<'a> {
    /// The table's partition statements.
    pub(crate) parts: &'a PartitionSql,
    /// The table as `"schema"."table"`: the election's lock key and the logs name it.
    pub(crate) qualified: String,
    /// `outbox` or `inbox`, for the logs.
    pub(crate) noun: &'static str,
    /// The width of one partition, in seconds.
    pub(crate) interval: i64,
    /// How many partitions beyond the current one to keep ready.
    pub(crate) ahead: u32,
    /// How many partitions before the current one to create if they are missing (the
    /// inbox writes into the previous slot too).
    pub(crate) behind: u32,
    /// A partition is dropped once its end is at least this far in the past.
    pub(crate) window: Duration,
    /// An injected clock's time (tests), instead of the database's.
    pub(crate) now: Option<time::OffsetDateTime>,
}

/// Runs partition maintenance once on `table` (see [`PgStore::run_maintenance_once`]):
/// `check` runs first, in the step that reads what there is (it refuses a configuration
/// that is not the table's), and `db_error` maps the database's errors.
pub(crate) fn maintain<T: MakeTls>(
    pool: &PgPool<T>,
    table: &Partitioned<'_>,
    check: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<(), Error>,
    db_error: impl Fn(&'static str, postgres::Error) -> Error,
) -> Result<MaintenanceReport, Error> {
    let parts = table.parts;
    let mut report = MaintenanceReport::default();
    let context = if table.noun == "inbox" {
        "maintaining inbox partitions"
    } else {
        "maintaining outbox partitions"
    };
    let err = |e| db_error(context, e);
    // The election: this connection's transaction holds the advisory lock and touches
    // no table, so the work on the other connection never waits for it.
    let mut elected = pool.get().map_err(Error::pool(context))?;
    let mut election = elected
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::ReadCommitted)
        .start()
        .map_err(err)?;
    election
        .batch_execute(sql::MAINTENANCE_ELECTION_TIMEOUTS)
        .map_err(err)?;
    let lock_key = format!("troutbox:maintain:{}", table.qualified);
    let locked: bool = election
        .query_one(sql::MAINTENANCE_LOCK, &[&lock_key])
        .map_err(err)?
        .get(0);
    if !locked {
        report.locked_out = true;
        return Ok(report);
    }

    let mut conn = pool.get().map_err(Error::pool(context))?;
    // What there is, in one short transaction. READ COMMITTED stated, not inherited
    // (REPEATABLE READ or SERIALIZABLE as a database default would keep one snapshot).
    let mut tx = begin_step(&mut conn).map_err(err)?;
    check(&mut tx)?;
    let interval = table.interval;
    // The database's clock (the one the partition key comes from), unless a test
    // injected one.
    let now = match table.now {
        Some(now) => now.unix_timestamp(),
        None => tx
            .query_one(sql::DB_NOW, &[])
            .and_then(|row| row.try_get::<_, i64>(0))
            .map_err(err)?,
    };
    let current = now.div_euclid(interval) * interval;
    let existing: BTreeSet<i64> = tx
        .query(&parts.list, &[])
        .map_err(err)?
        .iter()
        .filter_map(|row| parts.partition_start(row.get::<_, &str>(0)))
        .collect();
    // Wanted: now and ahead, plus the home of every row sitting in DEFAULT.
    let ahead = i64::from(table.ahead);
    let behind = i64::from(table.behind);
    let mut wanted: BTreeSet<i64> = (-behind..=ahead).map(|k| current + k * interval).collect();
    // Last, as it reads DEFAULT, which may be busy: then the rows there wait for the
    // next run, and the rest of this one goes on.
    match tx.query(&parts.default_slots, &[&interval]) {
        Ok(rows) => {
            wanted.extend(rows.iter().map(|row| row.get::<_, i64>(0) * interval));
            tx.commit().map_err(err)?;
        }
        Err(e) if is_lock_timeout(&e) => {
            drop(tx);
            defer(&mut report, parts.default_name(), "moving rows out");
        }
        Err(e) => return Err(err(e)),
    }

    for start in wanted.difference(&existing) {
        let name = parts.partition_name(*start);
        let step = begin_step(&mut conn).and_then(|mut tx| {
            tx.batch_execute(&parts.create_partition(*start, start + interval))?;
            // Holding the table's lock.
            fault_point!(crate::fault::MAINTENANCE_STEP);
            tx.commit()
        });
        match step {
            Ok(()) => report.created.push(name),
            Err(e) if is_lock_timeout(&e) => defer(&mut report, name, "create"),
            Err(e) => return Err(err(e)),
        }
    }

    let window = i64::try_from(table.window.as_secs()).unwrap_or(i64::MAX);
    let horizon = now.saturating_sub(window);
    for start in existing.iter().filter(|s| **s + interval <= horizon) {
        let name = parts.partition_name(*start);
        let mut tx = begin_step(&mut conn).map_err(err)?;
        if parts.keeps_rows() {
            // Counted before any lock, through the partial indexes of pending and dead
            // rows: a partition that keeps unsent messages is never locked at all.
            let unsent: i64 = tx
                .query_one(&parts.count_unsent(*start), &[])
                .and_then(|row| row.try_get(0))
                .map_err(err)?;
            if unsent > 0 {
                tx.commit().map_err(err)?;
                log::warn!(
                    "keeping expired {} partition {name}: it still holds {unsent} pending or dead message(s)",
                    table.noun
                );
                report.kept.push((name, unsent));
                continue;
            }
        }
        // The table first, as every claim and INSERT takes it, then the check again
        // (under the lock nothing can change it) and the drop.
        let step = (|| {
            tx.batch_execute(&parts.lock_parent())?;
            fault_point!(crate::fault::MAINTENANCE_STEP);
            let unsent: bool = tx.query_one(&parts.any_unsent(*start), &[])?.try_get(0)?;
            if !unsent {
                tx.batch_execute(&parts.drop_partition(*start))?;
            }
            tx.commit().map(|()| unsent)
        })();
        match step {
            Ok(false) => report.dropped.push(name),
            Ok(true) => report.kept.push((name, 1)),
            Err(e) if is_lock_timeout(&e) => defer(&mut report, name, "drop"),
            Err(e) => return Err(err(e)),
        }
    }
    election.commit().map_err(err)?;
    if !report.created.is_empty() || !report.dropped.is_empty() {
        log::info!(
            "{} maintenance of {}: created {:?}, dropped {:?}",
            table.noun,
            table.qualified,
            report.created,
            report.dropped
        );
    }
    Ok(report)
}

impl<T: MakeTls> PgStore<T> {
    /// Runs partition maintenance once: creates the current partition and the configured
    /// number ahead, creates the partition of any row that landed in the DEFAULT partition
    /// and moves it there, and drops every partition older than the retention window that
    /// holds no pending and no dead message (the others are kept and listed in the report,
    /// never deleted). Does nothing with [`Retention::delete_on_send`](crate::Retention).
    ///
    /// Only one instance maintains a table at a time: a transaction-scoped advisory lock,
    /// taken with `pg_try_advisory_xact_lock` on a connection that holds nothing else and
    /// released by its COMMIT (or by the server if that process dies, so another instance
    /// takes over at its next run). An instance that finds the lock taken returns at once
    /// with [`MaintenanceReport::locked_out`].
    ///
    /// The work itself runs on a second connection, one short transaction per partition,
    /// so that a step that fails does not undo the others and no lock outlives its step.
    /// Each step locks in the order the relay and producers do (the table, then its
    /// partitions), so it cannot deadlock with them, and waits at most 100 ms for a lock:
    /// everything that touches the table queues behind a waiting DDL statement, so that is
    /// also the longest a producer waits for maintenance. A step that could not get its lock
    /// in time is listed in [`MaintenanceReport::deferred`] and tried again at the next run.
    ///
    /// Schedule it yourself (cron, a timer) or let [`start_maintenance`](Self::start_maintenance)
    /// run it on a thread.
    pub fn run_maintenance_once(&self) -> Result<MaintenanceReport, Error> {
        let sql = self.sql()?;
        let (Some(parts), Some(window)) = (sql.partitions.as_ref(), self.retention_config().keep)
        else {
            return Ok(MaintenanceReport::default());
        };
        let table = Partitioned {
            parts,
            qualified: self.qualified_table(),
            noun: "outbox",
            interval: self.retention_config().interval_secs(),
            ahead: self.retention_config().ahead,
            behind: 0,
            window,
            now: self.injected_now(),
        };
        maintain(
            self.pool(),
            &table,
            |tx| self.check_retention(tx),
            |context, e| self.db_error(context)(e),
        )
    }
}
