//! The backlog: how many messages wait, how many are dead, how old the oldest one is.

use time::OffsetDateTime;

use crate::store::postgres::{MakeTls, PgStore};
use crate::Error;

/// A snapshot of the outbox table, from [`PgStore::backlog`].
///
/// With the `serde` feature it implements `Serialize`: `{"pending": 5, "dead": 0, "sent": 0,
/// "oldest_pending": "2025-01-31T12:00:00.123456Z"}` (RFC 3339, or `null`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Backlog {
    /// Messages waiting to be sent, including those waiting out a retry backoff and those
    /// claimed by a relay right now.
    pub pending: i64,
    /// Messages that used up their retries.
    pub dead: i64,
    /// Sent messages still retained ([`Retention::keep_sent`](crate::Retention::keep_sent);
    /// always 0 otherwise).
    pub sent: i64,
    /// Creation time of the oldest pending message: the relay's lag.
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "time::serde::rfc3339::option::serialize")
    )]
    pub oldest_pending: Option<OffsetDateTime>,
}

impl<T: MakeTls> PgStore<T> {
    /// Counts pending and dead messages and finds the oldest pending one. Reads the whole
    /// table: meant for dashboards and tests, not for every request.
    pub fn backlog(&self) -> Result<Backlog, Error> {
        let sql = self.sql()?;
        let context = "counting the backlog";
        let read = |row: postgres::Row| -> Result<Backlog, postgres::Error> {
            Ok(Backlog {
                pending: row.try_get(0)?,
                dead: row.try_get(1)?,
                sent: row.try_get(2)?,
                oldest_pending: row.try_get(3)?,
            })
        };
        self.connection(context)?
            .query_one(&sql.counts, &[])
            .and_then(read)
            .map_err(self.db_error(context))
    }
}
