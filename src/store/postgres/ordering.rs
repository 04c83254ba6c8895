//! Per-key ordering's operator tools: which keys are blocked, by which message and why, and
//! how to give up on a message that blocks its key.

use std::time::Duration;

use super::{MakeTls, PgStore};
use crate::reports::BlockedKey;
use crate::Error;

impl<T: MakeTls> PgStore<T> {
    /// Lists up to `limit` blocked keys (per-key ordering), oldest head first: keys whose
    /// head message has failed at least once and waits for its next attempt, holding back
    /// the key's later messages. Reads every pending message: meant for operators and
    /// dashboards, not for every request. On an unordered table it lists the keys whose
    /// oldest pending message has failed, which block nothing there.
    ///
    /// ```no_run
    /// # fn f(store: &troutbox::PgStore) -> Result<(), troutbox::Error> {
    /// for blocked in store.blocked_keys(20)? {
    ///     println!("{} waits for message {} ({} attempts): {:?}",
    ///         blocked.key, blocked.head_id, blocked.attempts, blocked.last_error);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn blocked_keys(&self, limit: usize) -> Result<Vec<BlockedKey>, Error> {
        let sql = self.sql()?;
        let context = "listing blocked keys";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .connection(context)?
            .query(&sql.ordering.blocked_keys, &[&limit])
            .map_err(self.db_error(context))?;
        let read = |row: &postgres::Row| -> Result<BlockedKey, postgres::Error> {
            let attempts: i32 = row.try_get(2)?;
            let age: f64 = row.try_get(5)?;
            let waiting: i64 = row.try_get(6)?;
            Ok(BlockedKey {
                key: row.try_get(0)?,
                head_id: row.try_get(1)?,
                attempts: u32::try_from(attempts).unwrap_or(0),
                last_error: row.try_get(3)?,
                next_attempt_at: row.try_get(4)?,
                blocked_for: Duration::try_from_secs_f64(age).unwrap_or(Duration::ZERO),
                waiting: u64::try_from(waiting).unwrap_or(0),
            })
        };
        rows.iter()
            .map(read)
            .collect::<Result<_, _>>()
            .map_err(self.db_error(context))
    }

    /// The number of blocked keys (see [`blocked_keys`](Self::blocked_keys)) and the age of
    /// the oldest blocked head, for metrics. One scan of the pending messages.
    pub fn blocked_summary(&self) -> Result<(u64, Duration), Error> {
        let sql = self.sql()?;
        let context = "counting blocked keys";
        let row = self
            .connection(context)?
            .query_one(&sql.ordering.blocked_summary, &[])
            .map_err(self.db_error(context))?;
        let read = |row: &postgres::Row| -> Result<(i64, f64), postgres::Error> {
            Ok((row.try_get(0)?, row.try_get(1)?))
        };
        let (count, age) = read(&row).map_err(self.db_error(context))?;
        Ok((
            u64::try_from(count).unwrap_or(0),
            Duration::try_from_secs_f64(age).unwrap_or(Duration::ZERO),
        ))
    }

    /// Gives up on a pending message: it becomes dead with the reason `skipped`, which
    /// unblocks its key (per-key ordering) the way a message that ran out of retries does.
    /// It stays listed with the dead messages and can be re-queued (it is then delivered
    /// after the key's later messages). Returns `false` when there is no pending message
    /// with this id, or when a relay is sending it right now: try again once that send is
    /// over (it may well succeed).
    pub fn skip_message(&self, id: i64) -> Result<bool, Error> {
        let sql = self.sql()?;
        let context = "skipping a message";
        let rows = self
            .connection(context)?
            .query(&sql.ordering.skip, &[&id])
            .map_err(self.db_error(context))?;
        Ok(!rows.is_empty())
    }
}
