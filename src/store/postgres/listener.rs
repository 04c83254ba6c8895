//! Cross-process wake-ups (`OutboxBuilder::notify(true)`): one thread per [`Handle`] that
//! `LISTEN`s on the table's channel and wakes an idle worker on every notification.
//!
//! Polling stays the correctness path: this only shortens an idle worker's sleep. A
//! notification lost while the listening connection was down is covered by the wake-up sent
//! after every (re)connection and by the workers' own polling.
//!
//! [`Handle`]: crate::Handle

use std::time::Duration;

use crossbeam_channel::{select, Receiver, Sender as ChannelSender, TryRecvError};
use postgres::fallible_iterator::FallibleIterator;

use crate::backoff::Backoff;
use crate::config::{report_to, ErrorHandler};
use crate::store::postgres::sql;
use crate::store::postgres::{MakeTls, PgStore};
use crate::Error;

/// How long one wait for a notification lasts before the thread checks for a stop.
const WAIT: Duration = Duration::from_millis(100);

/// Pause between reconnection attempts: quick at first, at most 5 s while the database is
/// unreachable.
const RECONNECT: Backoff = Backoff::exponential(Duration::from_millis(50), Duration::from_secs(5));

pub(crate) struct Listener<T: MakeTls> {
    pub(crate) store: PgStore<T>,
    pub(crate) channel_query: String,
    pub(crate) wake: ChannelSender<()>,
    pub(crate) stop: Receiver<()>,
    pub(crate) error_handler: ErrorHandler,
    /// Dropped when the thread ends: how the handle learns it did.
    pub(crate) _done: ChannelSender<()>,
}

impl<T: MakeTls> Listener<T> {
    pub(crate) fn run(self) {
        let mut failures = 0u32;
        loop {
            match self.listen() {
                Ok(()) => return,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    report_to(&self.error_handler, &e);
                    select! {
                        recv(self.stop) -> _ => return,
                        default(RECONNECT.delay(failures)) => {}
                    }
                }
            }
        }
    }

    fn stopped(&self) -> bool {
        matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Listens until stopped (`Ok`) or until the connection fails (`Err`).
    fn listen(&self) -> Result<(), Error> {
        let context = "listening for notifications";
        let map = |e| self.store.db_error(context)(e);
        let mut conn = self.store.relay_connection(context)?;
        let channel: String = conn
            .query_one(&self.channel_query, &[])
            .and_then(|row| row.try_get(0))
            .map_err(map)?;
        // Built by the server from validated names: `troutbox_` and hex digits. Checked
        // anyway before it is formatted into LISTEN, which takes no parameter.
        if !channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(Error::InvalidConfig {
                option: "notify",
                reason: format!("unexpected channel name {channel:?}"),
            });
        }
        conn.batch_execute(&sql::listen(&channel)).map_err(map)?;
        // Anything committed while no one listened is found by the poll this triggers.
        let _ = self.wake.try_send(());
        log::debug!("troutbox relay listening on channel {channel}");
        let result = loop {
            if self.stopped() {
                break Ok(());
            }
            let mut notifications = conn.notifications();
            let mut waiting = notifications.timeout_iter(WAIT);
            match waiting.next() {
                Ok(Some(_)) => {
                    let _ = self.wake.try_send(());
                }
                Ok(None) => {}
                Err(e) => break Err(map(e)),
            }
        };
        // Never hand a listening connection back to the pool.
        if !conn.is_closed() {
            let _ = conn.batch_execute(sql::UNLISTEN);
        }
        result
    }
}
