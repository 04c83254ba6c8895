//! The batch handed to the Sender.

use crate::message::Message;

/// A batch of claimed messages, in id order, handed to the [`Sender`](crate::Sender).
///
/// Mark each message with [`Message::mark_sent`] or [`Message::mark_failed`] as you learn
/// its fate; the Sender's return value settles the ones left unmarked (`Ok` = sent,
/// `Err` = failed). The rows stay locked by the relay while the Sender runs, so no other
/// relay can hand the same messages to another Sender (unless the send timeout expires).
#[derive(Debug)]
pub struct Batch {
    pub(crate) messages: Vec<Message>,
}

impl Batch {
    pub(crate) fn new(mut messages: Vec<Message>) -> Batch {
        messages.sort_unstable_by_key(|m| m.id);
        Batch { messages }
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
