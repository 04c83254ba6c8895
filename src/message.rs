//! Messages as the relay hands them to the Sender, and as the dead-letter API returns them.

use std::fmt;
use std::sync::Arc;

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
/// [`dedup_key`](Message::dedup_key): unique across every outbox table, in every schema and
/// database, and it never changes, retries included. ([`id`](Message::id) alone is unique
/// only within one table: two services publishing to one topic would collide on it.)
///
/// Not `Clone`, on purpose: the relay settles each claimed message from the batch the Sender
/// hands back, and a Sender that could overwrite one batch entry with a copy of another would
/// make a committed message vanish. Copy what you need with the accessors.
///
/// Equality (`==`) compares every field, the Sender's [`status`](Message::status) included:
/// two messages are equal when they hold the same data and the same mark. Whether two values
/// are the *same message* is a question for [`dedup_key`](Message::dedup_key).
///
/// With the `serde` feature it implements `Serialize`, as an object with `id`, `dedup_key`,
/// `outbox_id`, `key`, `attempts`, `created_at` (RFC 3339), `headers` (`[name, value]`
/// pairs, in order) and the value: `value_bytes` (its length) and either `value_utf8` (the
/// value as text, when it is UTF-8) or `value_hex` (lower-case hex, when it is not), the
/// other one `null`. The Sender's [`status`](Message::status) is not part of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub(crate) id: i64,
    /// The outbox table's identity (see [`Message::dedup_key`]); empty outside a relay.
    pub(crate) outbox: Arc<str>,
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
    /// now, never attempted, unmarked, from an outbox whose identity is
    /// [`TEST_OUTBOX_ID`](Message::TEST_OUTBOX_ID). For tests of your own Sender, with
    /// [`Batch::for_test`](crate::Batch::for_test).
    pub fn for_test(id: i64, key: &str, value: &[u8]) -> Message {
        Message {
            id,
            outbox: Arc::from(Message::TEST_OUTBOX_ID),
            key: key.to_owned(),
            value: value.to_vec(),
            headers: Vec::new(),
            created_at: OffsetDateTime::now_utc(),
            attempts: 0,
            status: Status::Unmarked,
        }
    }

    /// The outbox identity of messages made by [`for_test`](Message::for_test).
    pub const TEST_OUTBOX_ID: &'static str = "00000000-0000-0000-0000-000000000000";

    /// The same message with a header added.
    #[must_use]
    pub fn with_header(mut self, name: &str, value: &str) -> Message {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The same message as it comes back after `attempts` failed deliveries (what
    /// [`attempts`](Message::attempts) returns, and what decides whether the next failure is
    /// its last, see [`Batch::outcomes_for_test`](crate::Batch::outcomes_for_test)).
    #[must_use]
    pub fn with_attempts(mut self, attempts: u32) -> Message {
        self.attempts = attempts;
        self
    }
}

impl Message {
    /// The message's id, assigned by the database when the message was added: unique within
    /// its outbox table only. Consumers deduplicate on [`dedup_key`](Message::dedup_key).
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The message's identity across every outbox: `<outbox id>:<id>`, for example
    /// `6f1c0f2e-4b7a-4c39-9e56-0d4f3a1b2c3d:42`. Consumers deduplicate on it, since delivery
    /// is at least once; it never changes, retries included. The outbox id is a random UUID
    /// drawn once per outbox table when `migrate()` creates (or upgrades) it and recorded with
    /// the table (see [`outbox_id`](Message::outbox_id)), so two tables never share one, even
    /// with the same name in two databases. (A database restored from a backup into a second
    /// environment keeps its tables' ids: that copy's messages collide with the original's.)
    ///
    /// `RabbitSender` puts it in the AMQP `message-id` property, `KafkaSender` in the Kafka
    /// header `message-id`.
    pub fn dedup_key(&self) -> String {
        dedup_key(&self.outbox, self.id)
    }

    /// The identity of the outbox table the message came from: a UUID in its text form,
    /// the same for every message of the table (see [`dedup_key`](Message::dedup_key)).
    /// Dead messages listed from a table not yet migrated to record one have it empty.
    pub fn outbox_id(&self) -> &str {
        &self.outbox
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

/// The identity of message `id` of the table `outbox` (see [`Message::dedup_key`]).
pub(crate) fn dedup_key(outbox: &str, id: i64) -> String {
    if outbox.is_empty() {
        id.to_string()
    } else {
        format!("{outbox}:{id}")
    }
}

/// A dead message without its payload, as listed by
/// [`PgStore::dead_summaries`](crate::PgStore::dead_summaries): what an operator's listing
/// needs, read without fetching the values.
///
/// With the `serde` feature it implements `Serialize`: an object with these fields, the
/// times in RFC 3339 (`troutbox dead list --json` prints a list of them).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct DeadSummary {
    /// The message's id.
    pub id: i64,
    /// Its identity across outboxes (see [`Message::dedup_key`]).
    pub dedup_key: String,
    /// Its key.
    pub key: String,
    /// Its failed attempts.
    pub attempts: u32,
    /// When it was added (database clock).
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "time::serde::rfc3339::serialize")
    )]
    pub created_at: OffsetDateTime,
    /// When it was declared dead (database clock).
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "time::serde::rfc3339::serialize")
    )]
    pub died_at: OffsetDateTime,
    /// The error text of the last failed attempt.
    pub last_error: Option<String>,
    /// The length of its value in bytes.
    pub value_bytes: u64,
}

/// A message that ran out of retries, as listed by
/// [`PgStore::dead_messages`](crate::PgStore::dead_messages).
///
/// With the `serde` feature it implements `Serialize`: the [`Message`]'s fields, then
/// `last_error` and `died_at` (RFC 3339), in one flat object.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct DeadMessage {
    /// The message as it was last handed to the Sender; its
    /// [`attempts`](Message::attempts) counts every failed attempt.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub message: Message,
    /// The error text of the last failed attempt.
    pub last_error: Option<String>,
    /// When it was declared dead (database clock).
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "time::serde::rfc3339::serialize")
    )]
    pub died_at: OffsetDateTime,
}

impl DeadMessage {
    /// The message without its payload, as [`PgStore::dead_summaries`](crate::PgStore::dead_summaries)
    /// lists it.
    pub fn summary(&self) -> DeadSummary {
        DeadSummary {
            id: self.message.id,
            dedup_key: self.message.dedup_key(),
            key: self.message.key.clone(),
            attempts: self.message.attempts,
            created_at: self.message.created_at,
            died_at: self.died_at,
            last_error: self.last_error.clone(),
            value_bytes: u64::try_from(self.message.value.len()).unwrap_or(u64::MAX),
        }
    }
}
