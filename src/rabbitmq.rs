//! Publishing to RabbitMQ with publisher confirms (cargo feature `rabbitmq`).
//!
//! [`RabbitSender`] is a ready-made [`Sender`](crate::Sender): it publishes every message of a
//! batch to an exchange, then waits for the broker's publisher confirms, and marks a message
//! sent only once the broker has confirmed it. A nack, a `basic.return` (the message could
//! not be routed to any queue), a missing confirm after
//! [`confirm_timeout`](RabbitSenderBuilder::confirm_timeout) or a lost connection marks it
//! failed, so the relay retries it.
//!
//! Each message becomes one AMQP message:
//!
//! | troutbox | AMQP |
//! | --- | --- |
//! | [`Message::id`] | `message-id` property (decimal), the consumers' deduplication key |
//! | [`Message::key`] | routing key |
//! | [`Message::value`] | body |
//! | [`Message::headers`] | `headers` table, values as long strings; a name given more than once becomes an array of its values, in order |
//! | [`Message::created_at`] | `timestamp` property (Unix seconds) |
//! | [`persistent`](RabbitSenderBuilder::persistent) (default on) | `delivery-mode` 2 |
//!
//! The client is [amiquip](https://docs.rs/amiquip), a synchronous AMQP 0-9-1 client whose I/O
//! thread also answers the broker's heartbeats; no async runtime is involved. Only `amqp://`
//! URLs are accepted: the feature is built without TLS.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let outbox: troutbox::Outbox = todo!();
//! use troutbox::rabbitmq::RabbitSender;
//!
//! let sender = RabbitSender::builder("amqp://guest:guest@localhost:5672/%2f?heartbeat=10")
//!     .exchange("orders")
//!     .build()?;
//! let mut handle = outbox.start(sender)?; // each worker opens its own connection
//! # handle.shutdown()?;
//! # Ok(()) }
//! ```
//!
//! [`Message::id`]: crate::Message::id
//! [`Message::key`]: crate::Message::key
//! [`Message::value`]: crate::Message::value
//! [`Message::headers`]: crate::Message::headers
//! [`Message::created_at`]: crate::Message::created_at

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, AmqpValue, Channel, Confirm, Connection, FieldTable, Publish};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::error::BoxError;
use crate::message::Message;
use crate::relay::batch::Batch;

/// Default for [`RabbitSenderBuilder::confirm_timeout`]: 10 seconds, a third of the relay's
/// default send timeout.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`RabbitSenderBuilder::connect_timeout`]: 10 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`RabbitSenderBuilder::max_body_size`]: 128 MiB, RabbitMQ's own default
/// `max_message_size`.
pub const DEFAULT_MAX_BODY_SIZE: usize = 128 * 1024 * 1024;

/// The longest AMQP short string (exchange names, routing keys, header names), in bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// Why a [`RabbitSender`] could not be built, or could not publish a batch.
// No PartialEq: an error is matched on its variant, not compared; its amiquip causes have none.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
    /// A builder option is out of range. Returned by [`RabbitSenderBuilder::build`].
    #[error("invalid RabbitMQ sender option `{option}`: {reason}")]
    InvalidConfig {
        /// The builder method that set the value.
        option: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },

    /// Talking to the broker failed: connecting, opening the channel, enabling confirms or
    /// publishing. The connection is dropped and opened again for the next batch.
    #[error("RabbitMQ {action} failed: {source}")]
    Broker {
        /// What the sender was doing.
        action: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },

    /// The connection ended while confirms were still due. The unconfirmed messages were
    /// marked failed; the broker may still have them, so they can arrive twice.
    #[error("the RabbitMQ connection ended with {unconfirmed} publisher confirms still due")]
    ConnectionLost {
        /// Messages of the batch whose fate is unknown.
        unconfirmed: usize,
    },

    /// Some confirms did not arrive within the confirm timeout. Those messages were marked
    /// failed and the connection is opened again for the next batch.
    #[error("{unconfirmed} publisher confirms did not arrive within {timeout:?}")]
    ConfirmTimeout {
        /// Messages of the batch whose fate is unknown.
        unconfirmed: usize,
        /// The configured confirm timeout.
        timeout: Duration,
    },
}

impl RabbitError {
    fn broker(action: &'static str, source: amiquip::Error) -> RabbitError {
        RabbitError::Broker {
            action,
            source: Box::new(source),
        }
    }

    /// The same error with the URL's credentials taken out of the client's text: the
    /// client library prints the whole URL in some errors (a host name that does not
    /// resolve, a refused connection), and this text goes to the error handler, into the
    /// messages' `last_error` in the database, and into traces. The client's error is
    /// replaced by its redacted text (its chain included), so no `source()` can leak it.
    fn redacted(self, url: &str) -> RabbitError {
        match self {
            RabbitError::Broker { action, source } => {
                let mut text = source.to_string();
                let mut next = source.source();
                while let Some(cause) = next {
                    text.push_str(": ");
                    text.push_str(&cause.to_string());
                    next = cause.source();
                }
                RabbitError::Broker {
                    action,
                    source: Box::new(Redacted(redact(&text, url))),
                }
            }
            other => other,
        }
    }
}

/// A client library's error text with credentials removed (see [`RabbitError::Broker`]).
#[derive(Debug)]
struct Redacted(String);

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Redacted {}

/// `text` without credentials: the user-information part of every URL in it (`scheme://`
/// up to the last `@` before the host ends) becomes `***`, and the user name and password
/// of `url`, as written and percent-decoded, are replaced wherever else they appear.
fn redact(text: &str, url: &str) -> String {
    let mut out = strip_userinfo(text);
    if let Some((user, password)) = userinfo(url) {
        let mut secrets = vec![password.to_owned(), percent_decoded(password)];
        // A short user name ("a") would mangle unrelated words; the URL form is gone anyway.
        if user.len() >= 3 {
            secrets.push(user.to_owned());
            secrets.push(percent_decoded(user));
        }
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in secrets {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// The user name and password of an `amqp://user:password@host` URL, as written.
fn userinfo(url: &str) -> Option<(&str, &str)> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let info = &authority[..authority.rfind('@')?];
    Some(info.split_once(':').unwrap_or((info, "")))
}

/// Every `scheme://user:password@` in `text` as `scheme://***@`.
fn strip_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        out.push_str(&rest[..at + 3]);
        rest = &rest[at + 3..];
        let end = rest
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '>') || c.is_whitespace())
            .unwrap_or(rest.len());
        if let Some(last_at) = rest[..end].rfind('@') {
            out.push_str("***");
            rest = &rest[last_at..];
        }
    }
    out.push_str(rest);
    out
}

/// `%XX` sequences decoded (invalid ones, and a result that is not UTF-8, left as written).
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// Options for a [`RabbitSender`]; every one has a default. Its `Debug` output shows the
/// URL without user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitSenderBuilder {
    url: String,
    exchange: String,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    mandatory: bool,
    persistent: bool,
    max_body_size: usize,
}

impl fmt::Debug for RabbitSenderBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSenderBuilder")
            .field("url", &redact(&self.url, &self.url))
            .field("exchange", &self.exchange)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("mandatory", &self.mandatory)
            .field("persistent", &self.persistent)
            .field("max_body_size", &self.max_body_size)
            .finish()
    }
}

impl RabbitSenderBuilder {
    /// The exchange every message is published to. Default: `""`, RabbitMQ's default
    /// exchange, which routes a message to the queue named by its key.
    #[must_use]
    pub fn exchange(mut self, name: impl Into<String>) -> Self {
        self.exchange = name.into();
        self
    }

    /// How long [`send`](crate::Sender::send) waits for the confirms of a batch once it is
    /// published (default [`DEFAULT_CONFIRM_TIMEOUT`], accepted: 1 ms to 1 hour). Keep it well
    /// below the relay's `send_timeout`, which bounds the whole call.
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long opening a connection may take, TCP connect and AMQP handshake together
    /// (default [`DEFAULT_CONNECT_TIMEOUT`], accepted: 1 ms to 1 hour). Without it a broker
    /// that accepts the socket but never answers would hold the worker until the send timeout.
    /// A `connection_timeout` query parameter in the URL takes precedence.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Publish with the `mandatory` flag (default `true`): a message no queue is bound to
    /// receive comes back as a `basic.return` and is marked failed, instead of being confirmed
    /// and silently dropped by the exchange.
    #[must_use]
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// Publish with `delivery-mode` 2 (default `true`), so that a durable queue keeps the
    /// message across a broker restart. RabbitMQ confirms a persistent message routed to a
    /// durable queue only once it is written to disk.
    #[must_use]
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// The largest body published (default [`DEFAULT_MAX_BODY_SIZE`]). A larger message is
    /// marked failed without being sent: RabbitMQ would close the channel over it, failing the
    /// rest of its batch too. Set it to the broker's `max_message_size`.
    #[must_use]
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }

    /// Checks the options. Does not connect: each worker's clone connects on its first batch.
    pub fn build(self) -> Result<RabbitSender, RabbitError> {
        let invalid = |option, reason: String| Err(RabbitError::InvalidConfig { option, reason });
        let scheme_ok = self
            .url
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("amqp://"));
        if !scheme_ok {
            return invalid(
                "url",
                "expected an amqp:// URL such as amqp://user:password@host:5672/%2f \
                 (amqps:// is not supported: the rabbitmq feature is built without TLS)"
                    .into(),
            );
        }
        if self.exchange.len() > MAX_SHORT_STRING {
            return invalid(
                "exchange",
                format!(
                    "the name is {} bytes long, AMQP allows at most {MAX_SHORT_STRING}",
                    self.exchange.len()
                ),
            );
        }
        for (option, value) in [
            ("confirm_timeout", self.confirm_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if value < Duration::from_millis(1) || value > Duration::from_secs(3600) {
                return invalid(option, format!("{value:?} is outside 1 ms to 1 hour"));
            }
        }
        if self.max_body_size == 0 {
            return invalid("max_body_size", "must be at least 1 byte".into());
        }
        let url = with_connect_timeout(&self.url, self.connect_timeout);
        Ok(RabbitSender {
            config: Arc::new(self),
            url,
            link: None,
        })
    }
}

/// A [`Sender`](crate::Sender) publishing to RabbitMQ with publisher confirms. See the
/// [module documentation](self) for how messages are mapped.
///
/// Cloning gives an unconnected sender with the same options: the relay clones one per
/// worker, and each opens its own connection and channel on its first batch, and opens them
/// again after any failure.
// No PartialEq: a sender is a connection (or the promise of one), not a value.
pub struct RabbitSender {
    config: Arc<RabbitSenderBuilder>,
    /// The URL as the client is given it: the configured one plus the connect timeout.
    url: Arc<str>,
    link: Option<Link>,
}

impl RabbitSender {
    /// Starts configuring a sender for the broker at `url`, an `amqp://` URL
    /// (`amqp://user:password@host:port/vhost`, the vhost percent-encoded: `%2f` is `/`).
    /// Query parameters `heartbeat` (seconds), `connection_timeout` (milliseconds) and
    /// `channel_max` are understood; a short heartbeat lets a dead broker be noticed sooner.
    pub fn builder(url: impl Into<String>) -> RabbitSenderBuilder {
        RabbitSenderBuilder {
            url: url.into(),
            exchange: String::new(),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            mandatory: true,
            persistent: true,
            max_body_size: DEFAULT_MAX_BODY_SIZE,
        }
    }

    /// The exchange messages are published to.
    pub fn exchange(&self) -> &str {
        &self.config.exchange
    }

    /// True while this sender holds an open connection (after a successful batch).
    pub fn is_connected(&self) -> bool {
        self.link.is_some()
    }

    fn publish(&mut self, batch: &mut Batch) -> Result<(), RabbitError> {
        let link = match &mut self.link {
            Some(link) => link,
            None => self.link.insert(Link::open(&self.url)?),
        };
        link.publish(&self.config, batch)
    }
}

impl Clone for RabbitSender {
    fn clone(&self) -> Self {
        RabbitSender {
            config: self.config.clone(),
            url: self.url.clone(),
            link: None,
        }
    }
}

impl fmt::Debug for RabbitSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: leave it out.
        f.debug_struct("RabbitSender")
            .field("exchange", &self.config.exchange)
            .field("confirm_timeout", &self.config.confirm_timeout)
            .field("mandatory", &self.config.mandatory)
            .field("persistent", &self.config.persistent)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl crate::Sender for RabbitSender {
    type Error = RabbitError;

    fn send(&mut self, batch: &mut Batch) -> Result<(), RabbitError> {
        let result = self
            .publish(batch)
            .map_err(|e| e.redacted(&self.config.url));
        if result.is_err() {
            if let Some(link) = self.link.take() {
                // Closing waits for the broker's close-ok, which a hung broker only ends at
                // the heartbeat timeout: close on a thread of its own so this batch settles
                // now, within the relay's send timeout.
                std::thread::spawn(move || drop(link));
            }
        }
        result
    }
}

/// One worker's connection, its confirm-mode channel, and the channel's confirm bookkeeping.
struct Link {
    // Declared before `connection` so that it is dropped (closed) first.
    channel: Channel,
    _connection: Connection,
    confirms: Receiver<Confirm>,
    returns: Receiver<amiquip::Return>,
    /// The delivery tag the broker gives the next publish on this channel: tags count
    /// publishes from 1 once confirms are enabled.
    next_tag: u64,
}

impl Link {
    fn open(url: &str) -> Result<Link, RabbitError> {
        let mut connection =
            Connection::insecure_open(url).map_err(|e| RabbitError::broker("connect", e))?;
        let channel = connection
            .open_channel(None)
            .map_err(|e| RabbitError::broker("channel open", e))?;
        // Listeners first, so that no confirm or return can arrive before they exist.
        let confirms = channel
            .listen_for_publisher_confirms()
            .map_err(|e| RabbitError::broker("confirm listener setup", e))?;
        let returns = channel
            .listen_for_returns()
            .map_err(|e| RabbitError::broker("return listener setup", e))?;
        channel
            .enable_publisher_confirms()
            .map_err(|e| RabbitError::broker("confirm.select", e))?;
        Ok(Link {
            channel,
            _connection: connection,
            confirms,
            returns,
            next_tag: 1,
        })
    }

    /// Publishes the batch, then settles it from the confirms. Messages the broker cannot
    /// take (too long a routing key, too large a body) are marked failed without publishing.
    fn publish(
        &mut self,
        config: &RabbitSenderBuilder,
        batch: &mut Batch,
    ) -> Result<(), RabbitError> {
        // Delivery tag -> index in the batch, for every message awaiting its confirm.
        let mut pending: BTreeMap<u64, usize> = BTreeMap::new();
        for (index, msg) in batch.messages_mut().iter_mut().enumerate() {
            if let Err(reason) = check_limits(msg, config.max_body_size) {
                msg.mark_failed(reason);
                continue;
            }
            let publish = Publish {
                body: msg.value(),
                routing_key: msg.key().to_owned(),
                mandatory: config.mandatory,
                immediate: false,
                properties: properties(msg, config.persistent),
            };
            self.channel
                .basic_publish(config.exchange.as_str(), publish)
                .map_err(|e| RabbitError::broker("publish", e))?;
            pending.insert(self.next_tag, index);
            self.next_tag += 1;
        }
        self.await_confirms(config, batch, pending)
    }

    fn await_confirms(
        &mut self,
        config: &RabbitSenderBuilder,
        batch: &mut Batch,
        mut pending: BTreeMap<u64, usize>,
    ) -> Result<(), RabbitError> {
        let messages = batch.messages_mut();
        // Index -> why the broker returned the message.
        let mut returned: HashMap<usize, String> = HashMap::new();
        let deadline = Instant::now() + config.confirm_timeout;
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (payload, acked) = match self.confirms.recv_timeout(left) {
                Ok(Confirm::Ack(payload)) => (payload, true),
                Ok(Confirm::Nack(payload)) => (payload, false),
                Err(RecvTimeoutError::Timeout) => {
                    let unconfirmed = pending.len();
                    let reason = format!(
                        "no publisher confirm from RabbitMQ within {:?}",
                        config.confirm_timeout
                    );
                    for index in pending.into_values() {
                        messages[index].mark_failed(&reason);
                    }
                    return Err(RabbitError::ConfirmTimeout {
                        unconfirmed,
                        timeout: config.confirm_timeout,
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let unconfirmed = pending.len();
                    for index in pending.into_values() {
                        messages[index].mark_failed(
                            "the RabbitMQ connection ended before the broker confirmed the message",
                        );
                    }
                    return Err(RabbitError::ConnectionLost { unconfirmed });
                }
            };
            // The broker sends a message's basic.return before its ack, and the client hands
            // both over from one I/O thread in that order: every return for the messages this
            // confirm settles is already waiting.
            for ret in self.returns.try_iter() {
                if let Some(index) = ret
                    .properties
                    .message_id()
                    .as_ref()
                    // The dedup key ends with the message's id.
                    .and_then(|key| key.rsplit(':').next()?.parse::<i64>().ok())
                    .and_then(|id| messages.binary_search_by_key(&id, Message::id).ok())
                {
                    returned.insert(
                        index,
                        format!(
                            "returned by RabbitMQ: {} {} (exchange {:?}, routing key {:?})",
                            ret.reply_code, ret.reply_text, ret.exchange, ret.routing_key
                        ),
                    );
                }
            }
            let settled = if payload.multiple {
                // Everything up to and including the tag.
                let rest = match payload.delivery_tag.checked_add(1) {
                    Some(next) => pending.split_off(&next),
                    None => BTreeMap::new(),
                };
                std::mem::replace(&mut pending, rest)
            } else {
                pending
                    .remove_entry(&payload.delivery_tag)
                    .into_iter()
                    .collect()
            };
            for index in settled.into_values() {
                let msg = &mut messages[index];
                if let Some(reason) = returned.remove(&index) {
                    msg.mark_failed(reason);
                } else if acked {
                    msg.mark_sent();
                } else {
                    msg.mark_failed("nacked by RabbitMQ (basic.nack)");
                }
            }
        }
        Ok(())
    }
}

/// `url` with a `connection_timeout` query parameter (milliseconds, as the client reads it),
/// unless it has one already.
fn with_connect_timeout(url: &str, timeout: Duration) -> Arc<str> {
    let query = url.split_once('?').map(|(_, q)| q);
    let has_timeout = query.is_some_and(|q| {
        q.split('&')
            .any(|pair| pair.split('=').next() == Some("connection_timeout"))
    });
    if has_timeout {
        return url.into();
    }
    let separator = match query {
        None => '?',
        Some("") => return format!("{url}connection_timeout={}", timeout.as_millis()).into(),
        Some(_) => '&',
    };
    format!("{url}{separator}connection_timeout={}", timeout.as_millis()).into()
}

/// Why the broker could not take `msg`, if it cannot: AMQP short strings hold 255 bytes, and
/// an oversized body makes RabbitMQ close the channel.
fn check_limits(msg: &Message, max_body_size: usize) -> Result<(), String> {
    if msg.key().len() > MAX_SHORT_STRING {
        return Err(format!(
            "the key is {} bytes long; an AMQP routing key holds at most {MAX_SHORT_STRING}",
            msg.key().len()
        ));
    }
    if let Some((name, _)) = msg
        .headers()
        .iter()
        .find(|(name, _)| name.len() > MAX_SHORT_STRING)
    {
        return Err(format!(
            "a header name is {} bytes long; AMQP allows at most {MAX_SHORT_STRING}",
            name.len()
        ));
    }
    if msg.value().len() > max_body_size {
        return Err(format!(
            "the value is {} bytes, more than the RabbitMQ sender's max_body_size of {max_body_size}",
            msg.value().len()
        ));
    }
    Ok(())
}

/// The AMQP properties of `msg`: its id as `message-id`, its headers, its creation time.
fn properties(msg: &Message, persistent: bool) -> AmqpProperties {
    let mut headers = FieldTable::new();
    for (name, value) in msg.headers() {
        let value = AmqpValue::LongString(value.clone());
        match headers.get_mut(name) {
            None => {
                headers.insert(name.clone(), value);
            }
            // AMQP tables have unique names; troutbox headers may repeat one: keep every
            // value, in order, as an array.
            Some(AmqpValue::FieldArray(values)) => values.push(value),
            Some(first) => {
                let first = std::mem::replace(first, AmqpValue::Void);
                headers.insert(name.clone(), AmqpValue::FieldArray(vec![first, value]));
            }
        }
    }
    let mut properties = AmqpProperties::default().with_message_id(msg.dedup_key());
    if !headers.is_empty() {
        properties = properties.with_headers(headers);
    }
    if persistent {
        properties = properties.with_delivery_mode(2);
    }
    if let Ok(seconds) = u64::try_from(msg.created_at().unix_timestamp()) {
        properties = properties.with_timestamp(seconds);
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Status;

    fn message(id: i64, key: &str, headers: &[(&str, &str)]) -> Message {
        Message {
            outbox: "".into(),
            id,
            key: key.into(),
            value: b"v".to_vec(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            created_at: time::OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            attempts: 0,
            status: Status::Unmarked,
        }
    }

    #[test]
    fn properties_carry_id_headers_and_time() {
        let msg = message(42, "k", &[("a", "1"), ("b", "2"), ("a", "3"), ("a", "4")]);
        let props = properties(&msg, true);
        assert_eq!(props.message_id().as_deref(), Some("42"));
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(*props.timestamp(), Some(1_700_000_000));
        let headers = props.headers().as_ref().unwrap();
        assert_eq!(headers.get("b"), Some(&AmqpValue::LongString("2".into())));
        assert_eq!(
            headers.get("a"),
            Some(&AmqpValue::FieldArray(vec![
                AmqpValue::LongString("1".into()),
                AmqpValue::LongString("3".into()),
                AmqpValue::LongString("4".into()),
            ]))
        );
        let plain = properties(&message(1, "k", &[]), false);
        assert!(plain.headers().is_none());
        assert!(plain.delivery_mode().is_none());
    }

    #[test]
    fn connect_timeout_joins_the_query() {
        let t = Duration::from_millis(2500);
        assert_eq!(
            &*with_connect_timeout("amqp://h", t),
            "amqp://h?connection_timeout=2500"
        );
        assert_eq!(
            &*with_connect_timeout("amqp://h?", t),
            "amqp://h?connection_timeout=2500"
        );
        assert_eq!(
            &*with_connect_timeout("amqp://h/%2f?heartbeat=5", t),
            "amqp://h/%2f?heartbeat=5&connection_timeout=2500"
        );
        let own = "amqp://h?connection_timeout=7&heartbeat=5";
        assert_eq!(&*with_connect_timeout(own, t), own);
    }

    #[test]
    fn limits_refuse_what_amqp_cannot_carry() {
        assert!(check_limits(&message(1, "k", &[]), 10).is_ok());
        let long = "x".repeat(256);
        assert!(check_limits(&message(1, &long, &[]), 10)
            .unwrap_err()
            .contains("256 bytes"));
        assert!(check_limits(&message(1, "k", &[(&long, "v")]), 10).is_err());
        assert!(check_limits(&message(1, "k", &[]), 0)
            .unwrap_err()
            .contains("max_body_size"));
        assert!(check_limits(&message(1, &"x".repeat(255), &[]), 10).is_ok());
    }

    #[test]
    fn builder_rejects_bad_options() {
        let url = "amqp://localhost";
        assert!(RabbitSender::builder(url).build().is_ok());
        assert!(RabbitSender::builder("AMQP://h").build().is_ok());
        for bad in [
            RabbitSender::builder("amqps://localhost"),
            RabbitSender::builder("localhost:5672"),
            RabbitSender::builder(""),
            RabbitSender::builder(url).exchange("e".repeat(256)),
            RabbitSender::builder(url).confirm_timeout(Duration::ZERO),
            RabbitSender::builder(url).confirm_timeout(Duration::from_secs(3601)),
            RabbitSender::builder(url).connect_timeout(Duration::ZERO),
            RabbitSender::builder(url).max_body_size(0),
        ] {
            let err = bad.build().unwrap_err();
            assert!(matches!(err, RabbitError::InvalidConfig { .. }), "{err}");
        }
    }

    /// That a clone of a *connected* sender is unconnected needs a broker: see
    /// `tests/rabbitmq.rs`, `a_clone_of_a_connected_sender_is_unconnected_and_keeps_its_configuration`.
    #[test]
    fn a_clone_keeps_the_configuration_and_debug_hides_the_url() {
        let sender = RabbitSender::builder("amqp://user:secret@localhost")
            .exchange("orders")
            .build()
            .unwrap();
        let clone = sender.clone();
        assert!(!clone.is_connected());
        assert_eq!(clone.exchange(), "orders");
        assert!(!format!("{sender:?}").contains("secret"));
    }

    #[test]
    fn unreachable_broker_fails_the_batch() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let mut sender = RabbitSender::builder("amqp://127.0.0.1:1").build().unwrap();
        let mut batch = Batch::new(vec![message(1, "k", &[])]);
        let err = crate::Sender::send(&mut sender, &mut batch).unwrap_err();
        assert!(
            matches!(
                err,
                RabbitError::Broker {
                    action: "connect",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(batch.messages()[0].status(), &Status::Unmarked);
        assert!(!sender.is_connected());
    }
}
