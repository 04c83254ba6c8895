//! Messages as the relay hands them to the Sender, and as the dead-letter API returns them.

use std::fmt;

use time::OffsetDateTime;

/// What the Sender decided for one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Not marked: the Sender's return value decides (`Ok` = sent, `Err` = failed).
    Unmarked,
    /// Marked with [`Message::mark_sent`].
    Sent,
    /// Marked with [`Message::mark_failed`], with the reason given.
    Failed(String),
}

/// A committed message claimed by the relay, handed to the [`Sender`](crate::Sender) inside a
/// [`Batch`](crate::Batch).
///
/// Delivery is at least once, so a consumer that must not act twice deduplicates on
/// [`id`](Message::id): it is unique per outbox table and never changes, retries included.
///
/// Not `Clone`, on purpose: the relay settles each claimed message from the batch the Sender
/// hands back, and a Sender that could overwrite one batch entry with a copy of another would
/// make a committed message vanish. Copy what you need with the accessors.
#[derive(Debug)]
pub struct Message {
    pub(crate) id: i64,
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) created_at: OffsetDateTime,
    pub(crate) attempts: u32,
    pub(crate) status: Status,
}

/// Unit-testing a Sender without a database (feature `testing`).
#[cfg(any(test, feature = "testing"))]
impl Message {
    /// A message as the relay would hand it over: `id`, `key`, `value`, no headers, created
    /// now, never attempted, unmarked. For tests of your own Sender, with
    /// [`Batch::for_test`](crate::Batch::for_test).
    pub fn for_test(id: i64, key: &str, value: &[u8]) -> Message {
        Message {
            id,
            key: key.to_owned(),
            value: value.to_vec(),
            headers: Vec::new(),
            created_at: OffsetDateTime::now_utc(),
            attempts: 0,
            status: Status::Unmarked,
        }
    }

    /// The same message with a header added.
    #[must_use]
    pub fn with_header(mut self, name: &str, value: &str) -> Message {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

impl Message {
    /// The message's id, assigned by the database when the message was added. Use it as the
    /// idempotency key on the consumer side.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The key given to [`add_message`](crate::Outbox::add_message), for example a Kafka key
    /// or an AMQP routing key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The payload.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The headers (name, value) in the order they were added; names may repeat.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The value of the first header called `name`, if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// When the producing transaction added the message (its start time, by the database clock).
    pub fn created_at(&self) -> OffsetDateTime {
        self.created_at
    }

    /// How many earlier attempts to send this message failed: 0 on the first delivery. An
    /// attempt whose batch never got an outcome (the relay was killed, its connection lost,
    /// or the Sender outlived the send timeout) counts too.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Records that the message was delivered. It is deleted from the outbox when the batch
    /// is settled, whatever the Sender returns.
    pub fn mark_sent(&mut self) {
        self.status = Status::Sent;
    }

    /// Records that delivering this message failed, with a reason that is stored with the
    /// message (truncated to 1,000 bytes). It will be retried after a backoff, or declared
    /// dead once it has used its retries, whatever the Sender returns.
    pub fn mark_failed(&mut self, reason: impl fmt::Display) {
        self.status = Status::Failed(reason.to_string());
    }

    /// What the Sender has decided for this message so far.
    pub fn status(&self) -> &Status {
        &self.status
    }
}

/// A message that ran out of retries, as listed by
/// [`PgStore::dead_messages`](crate::PgStore::dead_messages).
#[derive(Debug)]
#[non_exhaustive]
pub struct DeadMessage {
    /// The message as it was last handed to the Sender; its
    /// [`attempts`](Message::attempts) counts every failed attempt.
    pub message: Message,
    /// The error text of the last failed attempt.
    pub last_error: Option<String>,
    /// When it was declared dead (database clock).
    pub died_at: OffsetDateTime,
}
