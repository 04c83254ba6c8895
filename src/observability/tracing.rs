//! The `tracing` feature: a span around each batch, entered on the worker's thread while the
//! Sender runs, so that the spans and events of the Sender (a broker client's, the
//! application's) nest under it.

use crate::message::Message;

/// The span of one batch: `troutbox.batch` at INFO level, target `troutbox`, with the
/// batch's `size`, its `first_id` and `last_id`, its `outbox` identity (see
/// [`Message::outbox_id`](crate::Message::outbox_id)) and whether it is `ordered`. Its
/// `outcome` (`ok`, `error` or `panic`) is recorded when the Sender returns.
pub(crate) fn batch_span(messages: &[Message], ordered: bool) -> tracing::Span {
    let ids = messages.iter().map(Message::id);
    let (first, last) = (ids.clone().min(), ids.max());
    let outbox = messages.first().map_or("", Message::outbox_id);
    tracing::info_span!(
        target: "troutbox",
        "troutbox.batch",
        size = messages.len(),
        first_id = first,
        last_id = last,
        outbox = outbox,
        ordered = ordered,
        outcome = tracing::field::Empty,
    )
}
