//! [`InboxBuilder`]: the inbox's configuration, checked once by [`build`](InboxBuilder::build).

use std::sync::Arc;
use std::time::Duration;

use postgres::NoTls;
use time::OffsetDateTime;

use super::{Inbox, Inner, MAX_WINDOW, MIN_WINDOW};
use crate::store::ident::{Ident, MAX_IDENT_LEN};
use crate::store::postgres::sql::inbox::{InboxSql, INBOX_SUFFIX_LEN};
use crate::store::postgres::{MakeTls, PgPool};
use crate::Error;

/// Builds an [`Inbox`]; from [`Inbox::builder`].
#[must_use = "an InboxBuilder does nothing until build() is called"]
pub struct InboxBuilder<T: MakeTls = NoTls> {
    pub(super) pool: PgPool<T>,
    pub(super) schema: String,
    pub(super) table: String,
    pub(super) window: Option<Duration>,
    pub(super) ahead: u32,
    pub(super) clock: Option<super::Clock>,
}

impl<T: MakeTls> std::fmt::Debug for InboxBuilder<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxBuilder")
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("window", &self.window)
            .field("ahead", &self.ahead)
            .finish_non_exhaustive()
    }
}

impl<T: MakeTls> InboxBuilder<T> {
    /// Uses the schema `name`. Defaults to `public`.
    pub fn schema(mut self, name: &str) -> InboxBuilder<T> {
        self.schema = name.to_owned();
        self
    }

    /// Uses the table `name` (at most 50 bytes). Defaults to `inbox_messages`.
    pub fn table(mut self, name: &str) -> InboxBuilder<T> {
        self.table = name.to_owned();
        self
    }

    /// Detects duplicates arriving up to `window` after the first delivery: a whole number
    /// of seconds, from [`MIN_WINDOW`] to [`MAX_WINDOW`]. It is also the width of a
    /// partition, and entries stay 1 to 2 windows (see the [module docs](crate::inbox)).
    /// Fixed when [`Inbox::migrate`] creates the table. Defaults to [`DEFAULT_WINDOW`](super::DEFAULT_WINDOW), 7 days.
    pub fn window(mut self, window: Duration) -> InboxBuilder<T> {
        self.window = Some(window);
        self
    }

    /// Never forgets a message: a plain table with one entry per message, no partitions and
    /// no maintenance; it grows for ever. Fixed when [`Inbox::migrate`] creates the table.
    pub fn keep_forever(mut self) -> InboxBuilder<T> {
        self.window = None;
        self
    }

    /// How many partitions beyond the current one maintenance keeps ready, at most 1,000.
    /// Defaults to [`DEFAULT_INBOX_PARTITIONS_AHEAD`](super::DEFAULT_INBOX_PARTITIONS_AHEAD).
    pub fn partitions_ahead(mut self, n: u32) -> InboxBuilder<T> {
        self.ahead = n;
        self
    }

    /// The clock `receive` and maintenance read, for tests that move time across slot
    /// boundaries. By default both read the database server's clock, so that hosts whose
    /// clocks disagree still agree on slots.
    pub fn clock(mut self, clock: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Checks the names and the window, and builds the inbox. Touches no database.
    pub fn build(self) -> Result<Inbox<T>, Error> {
        let schema = Ident::new("schema", &self.schema, MAX_IDENT_LEN)?;
        let table = Ident::new("table", &self.table, MAX_IDENT_LEN - INBOX_SUFFIX_LEN)?;
        let invalid = |reason: String| Error::InvalidConfig {
            option: "window",
            reason,
        };
        let interval = match self.window {
            None => None,
            Some(w) if w.subsec_nanos() != 0 => {
                return Err(invalid(format!("the window {w:?} must be a whole number of seconds")))
            }
            Some(w) if w < MIN_WINDOW || w > MAX_WINDOW => {
                return Err(invalid(format!(
                    "the window {w:?} must be from {MIN_WINDOW:?} to {MAX_WINDOW:?} (or use keep_forever)"
                )))
            }
            Some(w) => Some(i64::try_from(w.as_secs()).unwrap_or(i64::MAX)),
        };
        if self.ahead > 1000 {
            return Err(Error::InvalidConfig {
                option: "partitions_ahead",
                reason: format!(
                    "{} partitions ahead is too many, use at most 1000",
                    self.ahead
                ),
            });
        }
        let qualified = format!("{}.{}", schema.quoted(), table.quoted());
        Ok(Inbox {
            inner: Arc::new(Inner {
                pool: self.pool,
                sql: InboxSql::new(&schema, &table, interval),
                schema,
                table,
                qualified,
                interval,
                ahead: self.ahead,
                clock: self.clock,
            }),
        })
    }
}
