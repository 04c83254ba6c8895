//! The backlog's count (see [`Backlog`]).

use super::{MakeTls, PgStore};
use crate::reports::Backlog;
use crate::Error;

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
