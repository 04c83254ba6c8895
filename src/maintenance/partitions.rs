//! Partition maintenance for [`Retention::keep_sent`](crate::Retention::keep_sent): create
//! partitions ahead, move rows out of the DEFAULT partition, drop expired partitions that hold
//! nothing but sent messages.

use std::collections::BTreeSet;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{select, Sender as ChannelSender};
use postgres::SimpleQueryMessage;

use crate::error::panic_message;
use crate::store::pg::{MakeTls, PgStore};
use crate::store::sql;
use crate::Error;

/// What one maintenance run did, from [`PgStore::run_maintenance_once`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaintenanceReport {
    /// Another instance was maintaining this table at the same moment, so this run did
    /// nothing (it will be that instance's work).
    pub locked_out: bool,
    /// Partitions created (ahead of time, or for rows found in the DEFAULT partition, which
    /// were moved into them).
    pub created: Vec<String>,
    /// Expired partitions dropped: they held only sent messages.
    pub dropped: Vec<String>,
    /// Expired partitions kept because they still hold pending or dead messages, with how
    /// many. They are dropped by a later run once those are sent, or purged.
    pub kept: Vec<(String, i64)>,
}

impl<T: MakeTls> PgStore<T> {
    /// Runs partition maintenance once: creates the current partition and the configured
    /// number ahead, creates the partition of any row that landed in the DEFAULT partition
    /// and moves it there, and drops every partition older than the retention window that
    /// holds no pending and no dead message (the others are kept and listed in the report,
    /// never deleted). Does nothing with [`Retention::delete_on_send`](crate::Retention).
    ///
    /// Only one instance maintains a table at a time: a transaction-scoped advisory lock,
    /// taken with `pg_try_advisory_xact_lock` on the one connection that runs the work and
    /// released by its COMMIT (or by the server if that process dies, so another instance
    /// takes over at its next run). An instance that finds the lock taken returns at once
    /// with [`MaintenanceReport::locked_out`]. DDL waits at most 5 s for its locks.
    ///
    /// Schedule it yourself (cron, a timer) or let [`start_maintenance`](Self::start_maintenance)
    /// run it on a thread.
    pub fn run_maintenance_once(&self) -> Result<MaintenanceReport, Error> {
        let sql = self.sql()?;
        let mut report = MaintenanceReport::default();
        let (Some(parts), Some(window)) = (sql.partitions.as_ref(), self.retention_config().keep)
        else {
            return Ok(report);
        };
        let context = "maintaining outbox partitions";
        let map = self.db_error(context);
        let mut conn = self.connection(context)?;
        // READ COMMITTED stated, not inherited: the count of unsent rows before a DROP must
        // see the rows committed while maintenance waited for its lock, which a snapshot
        // taken earlier (REPEATABLE READ or SERIALIZABLE as a database default) would not.
        let mut tx = conn
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::ReadCommitted)
            .start()
            .map_err(self.db_error(context))?;
        tx.batch_execute(sql::MAINTENANCE_TIMEOUTS)
            .map_err(self.db_error(context))?;
        let lock_key = format!("troutbox:maintain:{}", self.qualified_table());
        let locked: bool = tx
            .query_one(sql::MAINTENANCE_LOCK, &[&lock_key])
            .map_err(self.db_error(context))?
            .get(0);
        if !locked {
            report.locked_out = true;
            return Ok(report);
        }
        self.check_retention(&mut tx)?;

        let interval = self.retention_config().interval_secs();
        // The database's clock (the one `created_at` comes from), unless a test injected one.
        let now = match self.injected_now() {
            Some(now) => now.unix_timestamp(),
            None => tx
                .query_one(sql::DB_NOW, &[])
                .and_then(|row| row.try_get::<_, i64>(0))
                .map_err(self.db_error(context))?,
        };
        let current = now.div_euclid(interval) * interval;
        let existing: BTreeSet<i64> = tx
            .query(&parts.list, &[])
            .map_err(self.db_error(context))?
            .iter()
            .filter_map(|row| parts.partition_start(row.get::<_, &str>(0)))
            .collect();

        // Wanted: now and ahead, plus the home of every row sitting in DEFAULT.
        let ahead = i64::from(self.retention_config().ahead);
        let mut wanted: BTreeSet<i64> = (0..=ahead).map(|k| current + k * interval).collect();
        for row in tx
            .query(&parts.default_slots, &[&interval])
            .map_err(self.db_error(context))?
        {
            wanted.insert(row.get::<_, i64>(0) * interval);
        }
        for start in wanted.difference(&existing) {
            tx.batch_execute(&parts.create_partition(*start, start + interval))
                .map_err(self.db_error(context))?;
            report.created.push(parts.partition_name(*start));
        }

        let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
        let horizon = now.saturating_sub(window);
        for start in existing.iter().filter(|s| **s + interval <= horizon) {
            let name = parts.partition_name(*start);
            let unsent = tx
                .simple_query(&parts.lock_and_count_unsent(*start))
                .map_err(self.db_error(context))?
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(row) => row.get(0)?.parse::<i64>().ok(),
                    _ => None,
                })
                .unwrap_or(0);
            if unsent == 0 {
                tx.batch_execute(&parts.drop_partition(*start))
                    .map_err(self.db_error(context))?;
                report.dropped.push(name);
            } else {
                log::warn!(
                    "keeping expired outbox partition {name}: it still holds {unsent} pending or dead message(s)"
                );
                report.kept.push((name, unsent));
            }
        }
        tx.commit().map_err(map)?;
        if !report.created.is_empty() || !report.dropped.is_empty() {
            log::info!(
                "outbox maintenance of {}: created {:?}, dropped {:?}",
                self.qualified_table(),
                report.created,
                report.dropped
            );
        }
        Ok(report)
    }

    /// Runs [`run_maintenance_once`](Self::run_maintenance_once) now and then every `every`
    /// on a background thread, until the returned handle is shut down or dropped. Run it in
    /// every instance: the advisory lock elects one per run, and another takes over when
    /// that one dies. Errors are logged and the next run tries again.
    pub fn start_maintenance(&self, every: Duration) -> Result<MaintenanceHandle, Error> {
        self.sql()?;
        if every.is_zero() {
            return Err(Error::InvalidConfig {
                option: "start_maintenance",
                reason: "the interval must be greater than zero".into(),
            });
        }
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let store = self.clone();
        let thread = std::thread::Builder::new()
            .name("troutbox-maintenance".into())
            .spawn(move || loop {
                if let Err(e) = store.run_maintenance_once() {
                    log::error!(
                        "outbox maintenance of {} failed: {e}",
                        store.qualified_table()
                    );
                }
                select! {
                    recv(stop_rx) -> _ => break,
                    default(every) => {}
                }
            })
            .map_err(Error::Spawn)?;
        Ok(MaintenanceHandle {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// Stops the maintenance thread started by [`PgStore::start_maintenance`]. Dropping it stops
/// the thread too; stopping twice is harmless.
#[derive(Debug)]
#[must_use = "dropping the MaintenanceHandle stops maintenance at once: keep it for as long as maintenance should run"]
pub struct MaintenanceHandle {
    stop: Option<ChannelSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MaintenanceHandle {
    /// Stops the thread, waiting for a run in progress to finish.
    pub fn shutdown(&mut self) -> Result<(), Error> {
        self.stop = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(payload)) => Err(Error::WorkerPanicked(panic_message(&*payload))),
            _ => Ok(()),
        }
    }
}

impl Drop for MaintenanceHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("troutbox maintenance thread: {e}");
        }
    }
}
