//! The Sender contract: how the relay hands batches to user code.

use crate::error::BoxError;
use crate::relay::batch::Batch;

/// Publishes batches of messages to a broker (Kafka, RabbitMQ, NATS, HTTP, ...).
///
/// Implemented for every `FnMut(&mut Batch) -> Result<(), E>` closure that is `Clone + Send`,
/// where `E` converts into a boxed error (any `std::error::Error + Send + Sync`, `String`,
/// `&str`, `anyhow::Error`, ...). Each relay worker thread gets its own clone, so a Sender
/// may keep per-thread state such as a broker channel.
///
/// # Contract
///
/// For each message the relay decides, in this order:
///
/// 1. marked with [`Message::mark_sent`](crate::Message::mark_sent) → sent (deleted);
/// 2. marked with [`Message::mark_failed`](crate::Message::mark_failed) → failed;
/// 3. unmarked and the Sender returned `Ok` → sent;
/// 4. unmarked and the Sender returned `Err` or panicked → failed, with the error's text.
///
/// A failed message is retried after the configured backoff, and is declared dead once it
/// has failed `max_retries + 1` times. A panic is caught: the worker thread survives and
/// reports [`Error::SenderPanicked`](crate::Error::SenderPanicked).
///
/// Return only once you know each message's fate (for a broker with acknowledgements, after
/// the confirms arrive): marking a message sent is what removes it. If the Sender runs longer
/// than the send timeout, the server ends the batch's transaction, its messages become
/// claimable again, and messages another relay claims in the meantime are delivered twice.
pub trait Sender: Send + 'static {
    /// The error the Sender returns for a whole batch.
    type Error: Into<BoxError>;

    /// Publishes `batch`, marking messages as it goes.
    fn send(&mut self, batch: &mut Batch) -> Result<(), Self::Error>;
}

impl<F, E> Sender for F
where
    F: FnMut(&mut Batch) -> Result<(), E> + Send + 'static,
    E: Into<BoxError>,
{
    type Error = E;

    fn send(&mut self, batch: &mut Batch) -> Result<(), E> {
        self(batch)
    }
}
