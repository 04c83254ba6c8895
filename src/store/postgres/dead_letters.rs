//! Dead letters: messages that used up their retries. Kept, visible, never retried
//! automatically, and re-queueable from here.

use std::sync::Arc;

use crate::message::{DeadMessage, DeadSummary};
use crate::store::postgres::decode;
use crate::store::postgres::{dead_message_from_row, MakeTls, PgStore};
use crate::Error;

impl<T: MakeTls> PgStore<T> {
    /// Lists up to `limit` dead messages, newest first, with their attempt count and last
    /// error. For the next page pass the smallest id seen as `before_id`.
    ///
    /// ```no_run
    /// # fn f(store: &troutbox::PgStore) -> Result<(), troutbox::Error> {
    /// for dead in store.dead_messages(50, None)? {
    ///     println!("{} after {} attempts: {:?}", dead.message.id(), dead.message.attempts(), dead.last_error);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn dead_messages(
        &self,
        limit: u32,
        before_id: Option<i64>,
    ) -> Result<Vec<DeadMessage>, Error> {
        let sql = self.sql()?;
        let context = "listing dead messages";
        let mut conn = self.connection(context)?;
        let rows = conn
            .query(&sql.dead.list, &[&i64::from(limit), &before_id])
            .map_err(self.db_error(context))?;
        let outbox = self.dead_outbox_id(&mut conn)?;
        Ok(rows
            .iter()
            .map(|row| dead_message_from_row(row, &outbox))
            .collect())
    }

    /// Lists up to `limit` dead messages like [`dead_messages`](Self::dead_messages), without
    /// their values and headers: for listings of many, or of large, messages (the values
    /// are not even read from the table, only their length).
    pub fn dead_summaries(
        &self,
        limit: u32,
        before_id: Option<i64>,
    ) -> Result<Vec<DeadSummary>, Error> {
        let sql = self.sql()?;
        let context = "listing dead messages";
        let mut conn = self.connection(context)?;
        let rows = conn
            .query(&sql.dead.summaries, &[&i64::from(limit), &before_id])
            .map_err(self.db_error(context))?;
        let outbox = self.dead_outbox_id(&mut conn)?;
        Ok(rows
            .iter()
            .map(|row| decode::dead_summary(row, &outbox))
            .collect())
    }

    /// The dead message with this id, whole (value, headers, last error), or `None` when no
    /// message with this id is dead.
    pub fn dead_message(&self, id: i64) -> Result<Option<DeadMessage>, Error> {
        let sql = self.sql()?;
        let context = "reading a dead message";
        let mut conn = self.connection(context)?;
        let row = conn
            .query_opt(&sql.dead.one, &[&id])
            .map_err(self.db_error(context))?;
        let outbox = self.dead_outbox_id(&mut conn)?;
        Ok(row.as_ref().map(|row| dead_message_from_row(row, &outbox)))
    }

    /// The table's identity for listing its dead messages; empty for a table not yet
    /// migrated to record one (dead letters stay readable then).
    fn dead_outbox_id(&self, conn: &mut postgres::Client) -> Result<Arc<str>, Error> {
        match self.outbox_id(conn) {
            Err(Error::OutdatedSchema { .. }) => Ok(Arc::from("")),
            other => other,
        }
    }

    /// Puts the dead messages with these ids back in the queue, as if just added: attempts
    /// start again from zero. Ids that are not dead are ignored. Returns how many were
    /// re-queued.
    pub fn requeue_dead(&self, ids: &[i64]) -> Result<u64, Error> {
        let sql = self.sql()?;
        let context = "re-queueing dead messages";
        self.connection(context)?
            .execute(&sql.dead.requeue_ids, &[&ids])
            .map_err(self.db_error(context))
    }

    /// Puts every dead message back in the queue. Returns how many were re-queued.
    pub fn requeue_all_dead(&self) -> Result<u64, Error> {
        let sql = self.sql()?;
        let context = "re-queueing dead messages";
        self.connection(context)?
            .execute(&sql.dead.requeue_all, &[])
            .map_err(self.db_error(context))
    }

    /// Deletes the dead messages with these ids for good. Ids that are not dead are
    /// ignored, so a pending or sent message is never purged. Returns how many were deleted.
    pub fn purge_dead(&self, ids: &[i64]) -> Result<u64, Error> {
        let sql = self.sql()?;
        let context = "purging dead messages";
        self.connection(context)?
            .execute(&sql.dead.purge_ids, &[&ids])
            .map_err(self.db_error(context))
    }

    /// Deletes the messages that died before `before` (database time), for good. Returns
    /// how many were deleted.
    pub fn purge_dead_before(&self, before: time::OffsetDateTime) -> Result<u64, Error> {
        let sql = self.sql()?;
        let context = "purging dead messages";
        self.connection(context)?
            .execute(&sql.dead.purge_before, &[&before])
            .map_err(self.db_error(context))
    }
}
