//! Per-key ordering's operator tools: which keys are blocked, by which message and why, and
//! how to give up on a message that blocks its key.

use std::time::Duration;

use time::OffsetDateTime;

use crate::store::postgres::{MakeTls, PgStore};
use crate::Error;

/// A key whose oldest pending message (its head) has failed at least once, so that the
/// key's later messages wait for it (per-key ordering). From [`PgStore::blocked_keys`].
///
/// With the `serde` feature it implements `Serialize`, as an object of its fields,
/// `next_attempt_at` in RFC 3339 and `blocked_for` as `blocked_for_seconds` (a float).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BlockedKey {
    /// The key.
    pub key: String,
    /// The id of the message the key waits for.
    pub head_id: i64,
    /// How many times that message has failed.
    pub attempts: u32,
    /// The error text of its last failed attempt.
    pub last_error: Option<String>,
    /// When the relay tries it again (database clock).
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "time::serde::rfc3339::serialize")
    )]
    pub next_attempt_at: OffsetDateTime,
    /// The head's age (since its transaction added it): the key has been waiting on it at
    /// most this long. Troutbox does not record when a message first failed.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "blocked_for_seconds", serialize_with = "crate::ser::seconds")
    )]
    pub blocked_for: Duration,
    /// How many pending messages of the key wait behind it.
    pub waiting: u64,
}

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
