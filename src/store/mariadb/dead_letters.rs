//! The dead-letter admin API and the backlog on MariaDB: the same calls as
//! [`PgStore`](crate::PgStore)'s.

use std::sync::Arc;

use mysql::prelude::Queryable;

use super::{decode, MariaDbStore};
use crate::message::{DeadMessage, DeadSummary};
use crate::reports::Backlog;
use crate::Error;

impl MariaDbStore {
    fn dead_rows(
        &self,
        context: &'static str,
        statement: &str,
        params: mysql::Params,
    ) -> Result<Vec<DeadMessage>, Error> {
        let sql = self.sql()?;
        let mut conn = self.connection(context)?;
        let rows: Vec<mysql::Row> = conn
            .exec(statement, params)
            .map_err(self.db_error(context))?;
        let outbox: Arc<str> = self.outbox_id(&mut *conn, &sql)?;
        Ok(rows.iter().map(|row| decode::dead(row, &outbox)).collect())
    }

    /// Dead messages, newest first: at most `limit`, with ids below `before_id` when given
    /// (the last id of the previous page). As [`PgStore::dead_messages`](crate::PgStore::dead_messages).
    pub fn dead_messages(
        &self,
        limit: u32,
        before_id: Option<i64>,
    ) -> Result<Vec<DeadMessage>, Error> {
        let sql = self.sql()?;
        self.dead_rows(
            "listing dead messages",
            &sql.dead.list,
            (before_id, before_id, limit).into(),
        )
    }

    /// [`dead_messages`](Self::dead_messages) without the payloads.
    pub fn dead_summaries(
        &self,
        limit: u32,
        before_id: Option<i64>,
    ) -> Result<Vec<DeadSummary>, Error> {
        Ok(self
            .dead_messages(limit, before_id)?
            .iter()
            .map(DeadMessage::summary)
            .collect())
    }

    /// One dead message, `None` when there is no dead message with that id.
    pub fn dead_message(&self, id: i64) -> Result<Option<DeadMessage>, Error> {
        let sql = self.sql()?;
        Ok(self
            .dead_rows("reading a dead message", &sql.dead.one, (id,).into())?
            .pop())
    }

    fn change(
        &self,
        context: &'static str,
        statement: &str,
        params: mysql::Params,
    ) -> Result<u64, Error> {
        let mut conn = self.connection(context)?;
        let result = conn
            .exec_iter(statement, params)
            .map_err(self.db_error(context))?;
        Ok(result.affected_rows())
    }

    /// Puts the dead messages among `ids` back to pending, due now, with their attempts
    /// reset; the number re-queued.
    pub fn requeue_dead(&self, ids: &[i64]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let sql = self.sql()?;
        self.change(
            "re-queueing dead messages",
            &sql.dead.requeue_ids(ids),
            mysql::Params::Empty,
        )
    }

    /// Re-queues every dead message; the number re-queued.
    pub fn requeue_all_dead(&self) -> Result<u64, Error> {
        let sql = self.sql()?;
        self.change(
            "re-queueing dead messages",
            &sql.dead.requeue_all,
            mysql::Params::Empty,
        )
    }

    /// Deletes the dead messages among `ids`; the number deleted.
    pub fn purge_dead(&self, ids: &[i64]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let sql = self.sql()?;
        self.change(
            "purging dead messages",
            &sql.dead.purge_ids(ids),
            mysql::Params::Empty,
        )
    }

    /// Deletes the messages that died before `before`; the number deleted.
    pub fn purge_dead_before(&self, before: time::OffsetDateTime) -> Result<u64, Error> {
        let sql = self.sql()?;
        let at = decode::to_value(before);
        self.change(
            "purging dead messages",
            &sql.dead.purge_before,
            (at,).into(),
        )
    }

    /// Counts pending and dead messages and finds the oldest pending one (`sent` is always
    /// 0: MariaDB tables delete what they send). Reads the whole table.
    pub fn backlog(&self) -> Result<Backlog, Error> {
        let sql = self.sql()?;
        let context = "counting the backlog";
        let mut conn = self.connection(context)?;
        let row: Option<mysql::Row> = conn
            .query_first(&sql.dead.counts)
            .map_err(self.db_error(context))?;
        let row = row.ok_or_else(|| Error::NotMigrated {
            table: self.table_name().to_owned(),
            source: None,
        })?;
        let count = |i| decode::int(&row, i, "count").unwrap_or(0);
        Ok(Backlog {
            pending: count(0),
            dead: count(1),
            sent: 0,
            oldest_pending: decode::datetime(&row, 2, "created_at").ok(),
        })
    }
}
