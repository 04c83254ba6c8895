//! [`PreparedInbox`]: the receive statement prepared on one connection.

use postgres::{GenericClient, NoTls};

use super::{check_input, Inbox, Received};
use crate::store::postgres::inbox::receive;
use crate::store::postgres::MakeTls;
use crate::Error;

/// An [`Inbox`] with its receive statement prepared on one connection, from
/// [`Inbox::prepare`]. Same answers, checks and errors as [`Inbox::receive`]; use it only on
/// the connection it was prepared on (and its transactions).
// No PartialEq: a prepared statement belongs to one connection; equality has no meaning here.
#[derive(Debug, Clone)]
pub struct PreparedInbox<T: MakeTls = NoTls> {
    pub(super) inbox: Inbox<T>,
    pub(super) statement: postgres::Statement,
}

impl<T: MakeTls> PreparedInbox<T> {
    /// [`Inbox::receive`], with the prepared statement.
    pub fn receive(
        &self,
        client: &mut impl GenericClient,
        consumer: &str,
        message_id: &str,
    ) -> Result<Received, Error> {
        check_input(consumer, message_id)?;
        let inbox = &self.inbox;
        let (sql, clock) = (&inbox.inner.sql, inbox.inner.clock.as_ref());
        let statement = Some(&self.statement);
        let inserted = receive(client, sql, clock, statement, consumer, message_id)
            .map_err(|e| inbox.receive_error(e))?;
        Ok(inbox.received(inserted))
    }

    /// The inbox it was prepared from.
    pub fn inbox(&self) -> &Inbox<T> {
        &self.inbox
    }
}
