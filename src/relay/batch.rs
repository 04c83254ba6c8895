//! The batch handed to the Sender.

use crate::message::Message;

/// A batch of claimed messages, in id order, handed to the [`Sender`](crate::Sender).
///
/// Mark each message with [`Message::mark_sent`] or [`Message::mark_failed`] as you learn
/// its fate; the Sender's return value settles the ones left unmarked (`Ok` = sent,
/// `Err` = failed). The rows stay locked by the relay while the Sender runs, so no other
/// relay can hand the same messages to another Sender (unless the send timeout expires).
// No PartialEq: a batch is one claim in progress (its rows locked for this Sender), not a
// value; two claims with equal contents are still two. Compare its messages instead.
#[derive(Debug)]
pub struct Batch {
    pub(crate) messages: Vec<Message>,
    /// From an outbox with per-key ordering (see [`send_each`](Batch::send_each)).
    pub(crate) ordered: bool,
}

impl Batch {
    pub(crate) fn new(mut messages: Vec<Message>) -> Batch {
        messages.sort_unstable_by_key(|m| m.id);
        Batch {
            messages,
            ordered: false,
        }
    }

    /// Publishes the messages one by one, in id order, with `publish`, and marks each: sent
    /// when it returns `Ok`, failed (with the error's text) when it returns `Err`. Messages
    /// already marked are left alone.
    ///
    /// This is the Sender contract of per-key ordering made easy: in a batch of an outbox
    /// with [`per_key_ordering`](crate::OutboxBuilder::per_key_ordering), once a message of
    /// a key fails, `publish` is not called for the later messages of that key in the batch
    /// (publishing them would overtake the failed one). They go back without an attempt
    /// charged, and are claimed again once the failed message is sent, dead or skipped. In
    /// an unordered batch every message is published.
    ///
    /// ```no_run
    /// # fn publish(key: &str, value: &[u8]) -> Result<(), std::io::Error> { Ok(()) }
    /// use troutbox::Batch;
    ///
    /// let sender = |batch: &mut Batch| -> Result<(), std::io::Error> {
    ///     batch.send_each(|msg| publish(msg.key(), msg.value()));
    ///     Ok(())
    /// };
    /// # let _ = sender;
    /// ```
    pub fn send_each<E: std::fmt::Display>(
        &mut self,
        mut publish: impl FnMut(&Message) -> Result<(), E>,
    ) {
        let mut failed_keys: std::collections::HashSet<String> = Default::default();
        for message in &mut self.messages {
            if self.ordered && failed_keys.contains(&message.key) {
                if matches!(message.status, crate::Status::Unmarked) {
                    message.mark_failed("not sent: an earlier message of its key failed");
                }
                continue;
            }
            match message.status {
                crate::Status::Sent => continue,
                crate::Status::Failed(_) => {}
                crate::Status::Unmarked => match publish(message) {
                    Ok(()) => message.mark_sent(),
                    Err(e) => message.mark_failed(e),
                },
            }
            if matches!(message.status, crate::Status::Failed(_)) {
                failed_keys.insert(message.key.clone());
            }
        }
    }

    /// A batch of `messages`, in id order, as an unordered outbox's relay hands it over:
    /// for unit tests of your own Sender, without a database (feature `testing`). Read each
    /// message's [`status`](Message::status) after the Sender ran.
    ///
    /// ```
    /// use troutbox::{Batch, Message, Sender, Status};
    ///
    /// // The Sender under test: publishes each message, fails the ones keyed "bad".
    /// let mut sender = |batch: &mut Batch| -> Result<(), String> {
    ///     batch.send_each(|m| if m.key() == "bad" { Err("refused") } else { Ok(()) });
    ///     Ok(())
    /// };
    /// let mut batch = Batch::for_test([
    ///     Message::for_test(1, "good", b"a"),
    ///     Message::for_test(2, "bad", b"b"),
    /// ]);
    /// sender.send(&mut batch).unwrap();
    /// assert_eq!(batch.messages()[0].status(), &Status::Sent);
    /// assert_eq!(batch.messages()[1].status(), &Status::Failed("refused".into()));
    /// ```
    #[cfg(any(test, feature = "testing"))]
    pub fn for_test(messages: impl IntoIterator<Item = Message>) -> Batch {
        Batch::new(messages.into_iter().collect())
    }

    /// Like [`for_test`](Self::for_test), as an outbox with
    /// [`per_key_ordering`](crate::OutboxBuilder::per_key_ordering) hands it over (which
    /// changes what [`send_each`](Self::send_each) does after a failure).
    #[cfg(any(test, feature = "testing"))]
    pub fn for_test_ordered(messages: impl IntoIterator<Item = Message>) -> Batch {
        let mut batch = Batch::for_test(messages);
        batch.ordered = true;
        batch
    }

    /// What the relay would record for each message of this batch once its Sender returned
    /// `result`, with the default `max_retries` and backoff (see
    /// [`outcomes_for_test_with`](Self::outcomes_for_test_with)): the Sender contract, applied
    /// by the relay's own code. A message left unmarked follows `result`: under `Ok` it is
    /// recorded sent, under `Err` it fails with the error's text.
    ///
    /// ```
    /// use troutbox::{Batch, Message, Outcome, Sender};
    ///
    /// // A Sender that marks one message failed and leaves the other unmarked.
    /// let mut sender = |batch: &mut Batch| -> Result<(), String> {
    ///     for msg in batch.iter_mut() {
    ///         if msg.key() == "bad" {
    ///             msg.mark_failed("refused");
    ///         }
    ///     }
    ///     Ok(())
    /// };
    /// let mut batch = Batch::for_test([
    ///     Message::for_test(1, "good", b"a"),
    ///     Message::for_test(2, "bad", b"b").with_attempts(10),
    /// ]);
    /// let result = sender.send(&mut batch);
    /// let outcomes = batch.outcomes_for_test(&result);
    /// assert_eq!(outcomes[0], (1, Outcome::Sent));
    /// // Its 11th failure: dead with the default max_retries (10).
    /// assert_eq!(
    ///     outcomes[1],
    ///     (2, Outcome::Dead { attempts: 11, error: "refused".into() })
    /// );
    /// ```
    #[cfg(any(test, feature = "testing"))]
    pub fn outcomes_for_test<E: std::fmt::Display>(
        self,
        result: &Result<(), E>,
    ) -> Vec<(i64, Outcome)> {
        self.outcomes_for_test_with(
            result,
            crate::config::DEFAULT_MAX_RETRIES,
            &crate::Backoff::default(),
        )
    }

    /// [`outcomes_for_test`](Self::outcomes_for_test) with the `max_retries` and `backoff` of
    /// your outbox.
    #[cfg(any(test, feature = "testing"))]
    pub fn outcomes_for_test_with<E: std::fmt::Display>(
        self,
        result: &Result<(), E>,
        max_retries: u32,
        backoff: &crate::Backoff,
    ) -> Vec<(i64, Outcome)> {
        let failure = result.as_ref().err().map(ToString::to_string);
        let settlement =
            crate::relay::outcome::decide(self, failure.as_deref(), max_retries, backoff);
        let mut outcomes: Vec<(i64, Outcome)> = settlement
            .sent
            .iter()
            .map(|&id| (id, Outcome::Sent))
            .collect();
        for r in settlement.returned {
            let outcome = if r.dead {
                Outcome::Dead {
                    attempts: r.attempts,
                    error: r.error,
                }
            } else if r.attempts == r.message.attempts {
                Outcome::Back { error: r.error }
            } else {
                Outcome::Retry {
                    attempts: r.attempts,
                    delay: r.delay,
                    error: r.error,
                }
            };
            outcomes.push((r.message.id, outcome));
        }
        outcomes.sort_by_key(|(id, _)| *id);
        outcomes
    }

    /// True when the batch comes from an outbox with
    /// [`per_key_ordering`](crate::OutboxBuilder::per_key_ordering): a Sender that publishes
    /// the messages itself (not through [`send_each`](Self::send_each)) must then not
    /// publish a message after a failed message of the same key in the batch.
    pub fn is_ordered(&self) -> bool {
        self.ordered
    }

    /// Number of messages in the batch (at least 1, at most the configured batch size).
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when the batch holds no message (the relay never hands over an empty batch).
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The messages, in id order.
    pub fn iter(&self) -> std::slice::Iter<'_, Message> {
        self.messages.iter()
    }

    /// The messages, in id order, for marking.
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Message> {
        self.messages.iter_mut()
    }

    /// The messages as a slice.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The messages as a mutable slice, for marking by index (for example from broker
    /// confirmations that arrive out of order).
    pub fn messages_mut(&mut self) -> &mut [Message] {
        &mut self.messages
    }
}

impl<'a> IntoIterator for &'a Batch {
    type Item = &'a Message;
    type IntoIter = std::slice::Iter<'a, Message>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a> IntoIterator for &'a mut Batch {
    type Item = &'a mut Message;
    type IntoIter = std::slice::IterMut<'a, Message>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;

    fn failing_b(m: &Message) -> Result<(), &'static str> {
        if m.value() == b"fail" {
            Err("refused")
        } else {
            Ok(())
        }
    }

    #[test]
    fn send_each_skips_a_failed_keys_followers_only_when_ordered() {
        let messages = || {
            [
                Message::for_test(1, "a", b"ok"),
                Message::for_test(2, "b", b"fail"),
                Message::for_test(3, "b", b"ok"),
                Message::for_test(4, "a", b"ok"),
            ]
        };
        let mut published = Vec::new();
        let mut ordered = Batch::for_test_ordered(messages());
        ordered.send_each(|m| {
            published.push(m.id());
            failing_b(m)
        });
        assert_eq!(published, [1, 2, 4], "3 follows the failed 2 of key b");
        let statuses: Vec<&Status> = ordered.iter().map(Message::status).collect();
        assert_eq!(statuses[0], &Status::Sent);
        assert_eq!(statuses[1], &Status::Failed("refused".into()));
        assert!(matches!(statuses[2], Status::Failed(r) if r.contains("earlier message")));
        assert_eq!(statuses[3], &Status::Sent);

        let mut published = Vec::new();
        let mut unordered = Batch::for_test(messages());
        unordered.send_each(|m| {
            published.push(m.id());
            failing_b(m)
        });
        assert_eq!(published, [1, 2, 3, 4]);
    }
}

/// What the relay records for one message of a batch once its Sender returned: what
/// [`Batch::outcomes_for_test`] reports, to unit-test a Sender against the relay's own rules
/// (feature `testing`).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Delivered: removed from the outbox (or kept as sent, with `keep_sent`).
    Sent,
    /// Failed, and retried after `delay` (the backoff, with its jitter).
    Retry {
        /// Failed deliveries so far, this one included.
        attempts: u32,
        /// How long until it may be claimed again.
        delay: std::time::Duration,
        /// The error recorded as its `last_error`.
        error: String,
    },
    /// Failed, and out of retries: dead, never retried automatically.
    Dead {
        /// Failed deliveries, this one included.
        attempts: u32,
        /// The error recorded as its `last_error`.
        error: String,
    },
    /// Not sent, and not charged: a message after a failed message of its key in a batch of
    /// an outbox with per-key ordering. It goes back as it was, due at once, behind the
    /// failed one.
    Back {
        /// Why it went back.
        error: String,
    },
}
