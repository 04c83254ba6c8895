//! Publishing to RabbitMQ with publisher confirms (cargo feature `rabbitmq`).
//!
//! [`RabbitSender`] is a ready-made [`Sender`](crate::Sender): it publishes every message of a
//! batch to an exchange, waits for the broker's publisher confirms, and marks a message sent
//! only once the broker has confirmed it. A nack, a `basic.return` (the message could not be
//! routed to any queue), a batch not published and confirmed within
//! [`confirm_timeout`](RabbitSenderBuilder::confirm_timeout), a connection the broker blocks
//! (a memory or disk alarm) or a lost connection marks it failed, so the relay retries it.
//!
//! Each message becomes one AMQP message:
//!
//! | troutbox | AMQP |
//! | --- | --- |
//! | [`Message::dedup_key`] | `message-id` property (`<outbox id>:<id>`, unique across outboxes), the consumers' deduplication key |
//! | [`Message::key`] | routing key |
//! | [`Message::value`] | body |
//! | [`Message::headers`] | `headers` table, values as long strings; a name given more than once becomes an array of its values, in order |
//! | [`Message::created_at`] | `timestamp` property (Unix seconds) |
//! | [`persistent`](RabbitSenderBuilder::persistent) (default on) | `delivery-mode` 2 |
//!
//! The client is [lapin](https://docs.rs/lapin), an asynchronous AMQP 0-9-1 client, driven by
//! a private Tokio runtime inside each worker's connection: the Sender's API stays
//! synchronous, and no runtime is needed, or may be running, in the calling thread. Only
//! `amqp://` URLs are accepted: the feature is built without TLS.
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
//! [`Message::dedup_key`]: crate::Message::dedup_key
//! [`Message::key`]: crate::Message::key
//! [`Message::value`]: crate::Message::value
//! [`Message::headers`]: crate::Message::headers
//! [`Message::created_at`]: crate::Message::created_at

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_core::Stream;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event};
use tokio::sync::watch;

use crate::error::BoxError;
use crate::message::{Message, Status};
use crate::relay::batch::Batch;

/// Default for [`RabbitSenderBuilder::confirm_timeout`]: 10 seconds, a third of the relay's
/// default send timeout.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`RabbitSenderBuilder::connect_timeout`]: 10 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`RabbitSenderBuilder::max_body_size`]: 16 MiB, RabbitMQ's default
/// `max_message_size` since 4.0 (3.8 to 3.13 default to 128 MiB; no version accepts more than
/// 512 MiB).
pub const DEFAULT_MAX_BODY_SIZE: usize = 16 * 1024 * 1024;

/// The longest AMQP short string (exchange names, routing keys, header names), in bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// How long closing a connection may wait for the broker's `close-ok`: on a worker's last
/// batch, and after a failed batch whose deadline did not run out. A broker that does not
/// answer in time is left to notice the closed socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a [`RabbitSender`] could not be built, or could not publish a batch.
// No PartialEq: an error is matched on its variant, not compared; its client causes have none.
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
    /// publishing (for example the broker closed the channel: an exchange that does not
    /// exist, a body over its `max_message_size`). The connection is closed and opened again
    /// for the next batch.
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

    /// The batch was not published and confirmed within the confirm timeout. The messages
    /// not confirmed were marked failed and the connection is opened again for the next batch.
    #[error("{unconfirmed} publisher confirms did not arrive within {timeout:?}")]
    ConfirmTimeout {
        /// Messages of the batch whose fate is unknown.
        unconfirmed: usize,
        /// The configured confirm timeout.
        timeout: Duration,
    },

    /// The broker blocked the connection (`connection.blocked`): it has raised a memory or
    /// disk alarm and reads nothing more from publishers until the alarm clears. The batch
    /// fails at once instead of waiting for the deadline; messages already confirmed are
    /// sent, the others failed (those already published may still arrive, so twice). The
    /// connection is kept, and while it stays blocked later batches fail at once without
    /// publishing.
    #[error("RabbitMQ blocked the connection: {reason}")]
    Blocked {
        /// The broker's reason, for example `low on memory` or `low on disk`.
        reason: String,
    },
}

impl RabbitError {
    fn broker(action: &'static str, source: impl Into<BoxError>) -> RabbitError {
        RabbitError::Broker {
            action,
            source: source.into(),
        }
    }

    /// The same error with the URL's credentials taken out of the client's text: a client
    /// library may print the whole URL in an error (a URL it cannot parse, for one), and this
    /// text goes to the error handler, into the messages' `last_error` in the database, and
    /// into traces. The client's error is replaced by its redacted text (its chain included),
    /// so no `source()` can leak it.
    fn redacted(self, url: &str) -> RabbitError {
        match self {
            RabbitError::Broker { action, source } => {
                let mut text = source.to_string();
                let mut next = source.source();
                while let Some(cause) = next {
                    let cause_text = cause.to_string();
                    // lapin's I/O errors print their cause already.
                    if !text.contains(&cause_text) {
                        text.push_str(": ");
                        text.push_str(&cause_text);
                    }
                    next = cause.source();
                }
                RabbitError::Broker {
                    action,
                    source: Box::new(Redacted(redact(&text, url))),
                }
            }
            RabbitError::InvalidConfig { option, reason } => RabbitError::InvalidConfig {
                option,
                reason: redact(&reason, url),
            },
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

    /// The deadline of a batch: how long [`send`](crate::Sender::send) may take to publish
    /// the batch *and* get its confirms, both together, once connected (default
    /// [`DEFAULT_CONFIRM_TIMEOUT`], accepted: 1 ms to 1 hour). Publishing cannot block past
    /// it either (a broker that stops reading the socket, such as one frozen or in a
    /// resource alarm). Keep it well below the relay's `send_timeout`, which bounds the whole
    /// call, connecting included.
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long opening a connection may take: TCP connect, AMQP handshake, channel open and
    /// `confirm.select` together (default [`DEFAULT_CONNECT_TIMEOUT`], accepted: 1 ms to
    /// 1 hour). Without it a broker that accepts the socket but never answers would hold the
    /// worker until the send timeout. A `connection_timeout` query parameter in the URL
    /// (milliseconds) takes precedence.
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

    /// The largest body published (default [`DEFAULT_MAX_BODY_SIZE`], 16 MiB). A larger
    /// message is marked failed without being sent: RabbitMQ would close the channel over
    /// it, failing the rest of its batch too. Set it to the broker's `max_message_size`
    /// (RabbitMQ 4.x: 16 MiB by default; 3.8 to 3.13: 128 MiB; at most 512 MiB).
    #[must_use]
    pub fn max_body_size(mut self, bytes: usize) -> Self {
        self.max_body_size = bytes;
        self
    }

    /// Checks the options and parses the URL. Does not connect: each worker's clone connects
    /// on its first batch.
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
        let uri = match parse_url(&self.url) {
            Ok(uri) => uri,
            Err(reason) => return invalid("url", redact(&reason, &self.url)),
        };
        let connect_timeout = match uri.query.connection_timeout {
            Some(ms) => Duration::from_millis(ms.max(1)),
            None => self.connect_timeout,
        };
        Ok(RabbitSender {
            config: Arc::new(self),
            uri: Arc::new(uri),
            connect_timeout,
            link: None,
        })
    }
}

/// `url` parsed as the client reads it, with one correction: the client takes the host from
/// the URL's domain name, so it would connect to `localhost` for an IPv6 literal such as
/// `amqp://[::1]:5672`; the literal is put back.
fn parse_url(url: &str) -> Result<AMQPUri, String> {
    // The scheme is matched without regard to case above; the client wants it in lower case.
    let url = format!("amqp{}", &url[4..]);
    let mut uri: AMQPUri = url.parse()?;
    if let Some(host) = ipv6_host(&url) {
        uri.authority.host = host.to_owned();
    }
    Ok(uri)
}

/// The address inside the brackets of a URL whose host is an IPv6 literal.
fn ipv6_host(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host = &authority[authority.rfind('@').map_or(0, |at| at + 1)..];
    host.strip_prefix('[')?.split(']').next()
}

/// A [`Sender`](crate::Sender) publishing to RabbitMQ with publisher confirms. See the
/// [module documentation](self) for how messages are mapped.
///
/// Cloning gives an unconnected sender with the same options: the relay clones one per
/// worker, and each opens its own connection and channel on its first batch, and opens them
/// again after any failure (but a blocked connection, which is kept).
///
/// Each connection is driven by a private Tokio runtime of one worker thread, next to the
/// client's own I/O thread: they answer heartbeats and watch the socket between batches. Do
/// not call [`send`](crate::Sender::send) from inside an async runtime (it blocks the
/// calling thread, as every troutbox Sender does); it returns an error there.
// No PartialEq: a sender is a connection (or the promise of one), not a value.
pub struct RabbitSender {
    config: Arc<RabbitSenderBuilder>,
    /// The URL as the client reads it.
    uri: Arc<AMQPUri>,
    /// The builder's connect timeout, or the URL's `connection_timeout`.
    connect_timeout: Duration,
    link: Option<Link>,
}

impl RabbitSender {
    /// Starts configuring a sender for the broker at `url`, an `amqp://` URL
    /// (`amqp://user:password@host:port/vhost`, the vhost percent-encoded: `%2f` is `/`).
    /// Query parameters `heartbeat` (seconds), `connection_timeout` (milliseconds),
    /// `channel_max` and `frame_max` are understood; a short heartbeat lets a dead broker be
    /// noticed sooner.
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

    /// True while this sender holds an open connection (after a successful batch, or one
    /// the broker blocked).
    pub fn is_connected(&self) -> bool {
        self.link.is_some()
    }

    fn publish(&mut self, batch: &mut Batch) -> Result<(), RabbitError> {
        // A connection that ended while the sender was idle (the broker restarted between
        // batches): open a new one rather than fail a batch on it.
        if self.link.as_ref().is_some_and(|link| !link.is_open()) {
            if let Some(mut link) = self.link.take() {
                link.close(Duration::ZERO);
            }
        }
        let link = match &mut self.link {
            Some(link) => link,
            None => self
                .link
                .insert(Link::open(&self.uri, self.connect_timeout)?),
        };
        link.publish(&self.config, batch)
    }
}

impl Clone for RabbitSender {
    fn clone(&self) -> Self {
        RabbitSender {
            config: self.config.clone(),
            uri: self.uri.clone(),
            connect_timeout: self.connect_timeout,
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
        if tokio::runtime::Handle::try_current().is_ok() {
            // Blocking on the connection's runtime from inside another one would panic.
            return Err(RabbitError::broker(
                "publish",
                "RabbitSender::send was called from inside an async runtime; \
                 call it from a plain thread, as the relay's workers are",
            ));
        }
        let result = self.publish(batch);
        match &result {
            Ok(()) | Err(RabbitError::Blocked { .. }) => {}
            Err(error) => {
                if let Some(mut link) = self.link.take() {
                    // After a timeout the broker is not answering: waiting for its close-ok
                    // would only hold the worker. Otherwise it usually answers at once.
                    let grace = match error {
                        RabbitError::ConfirmTimeout { .. } => Duration::ZERO,
                        _ => CLOSE_TIMEOUT,
                    };
                    link.close(grace);
                }
            }
        }
        result.map_err(|e| e.redacted(&self.config.url))
    }
}

/// One worker's connection and its confirm-mode channel, with the runtime that drives them.
///
/// Why one private runtime per connection, and a multi-thread one with a single worker:
/// lapin runs the socket on an I/O thread of its own, but that thread sleeps until the
/// runtime's reactor reports the socket ready, and lapin's heartbeats and internal requests
/// are tasks on the runtime. So the runtime must run between batches too, while the relay's
/// worker waits on PostgreSQL. A current-thread runtime runs only inside `block_on`: an idle
/// connection would send no heartbeat and read nothing, and the broker would close it. One
/// worker thread is the smallest runtime that runs by itself.
///
/// Why Tokio: it is in the tree already (`postgres` drives `tokio-postgres` with it), and it
/// is lapin's default runtime, reached through `async-rs`, which lapin depends on anyway: no
/// executor or reactor adapter crate is added. lapin's other runtimes (`smol`,
/// `async-global-executor`) would add a second executor and reactor, and their crates, next
/// to the Tokio that `postgres` brings. (Default features are off only to leave out TLS.)
///
/// Threads per connection: the runtime's worker and lapin's I/O thread (amiquip had one I/O
/// thread), plus one for a few seconds around a host name lookup. Once per process,
/// `async-compat` (lapin's Tokio adapter) starts a fallback thread, because lapin's I/O
/// threads poll the socket outside any runtime. Closing shuts the runtime down without
/// waiting, which also ends lapin's I/O thread: see [`Link::close`].
struct Link {
    channel: Channel,
    connection: Connection,
    /// The broker's reason while it blocks the connection (`connection.blocked`), `None`
    /// otherwise. Set by a task reading the connection's events.
    blocked: watch::Receiver<Option<String>>,
    /// `None` once closed.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Why publishing a batch stopped before every message was settled.
enum Stop {
    /// The broker blocked the connection, with its reason.
    Blocked(String),
    /// The client failed: the channel or the connection is gone.
    Client(lapin::Error),
}

impl Link {
    fn open(uri: &AMQPUri, connect_timeout: Duration) -> Result<Link, RabbitError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            // The only blocking work is resolving the broker's host name.
            .max_blocking_threads(1)
            .thread_name("troutbox-amqp")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| RabbitError::broker("runtime start", e))?;
        // Errors name the broker (never with the URL's credentials): the client's do not.
        let broker = format!("{}:{}", uri.authority.host, uri.authority.port);
        let uri = uri.clone();
        let opening = async {
            let properties =
                ConnectionProperties::default().with_connection_name("troutbox".into());
            let connection = Connection::connect_uri(uri, properties)
                .await
                .map_err(|e| RabbitError::broker("connect", format!("{broker}: {e}")))?;
            // Listening before anything is published: RabbitMQ tells a connection that it is
            // blocked when the connection publishes during an alarm.
            let (blocked_tx, blocked) = watch::channel(None);
            tokio::spawn(watch_blocked(connection.events_listener(), blocked_tx));
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| RabbitError::broker("channel open", e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| RabbitError::broker("confirm.select", e))?;
            Ok((connection, channel, blocked))
        };
        // The timer is made inside the runtime, whose timer it uses.
        match runtime.block_on(async { tokio::time::timeout(connect_timeout, opening).await }) {
            Ok(Ok((connection, channel, blocked))) => Ok(Link {
                channel,
                connection,
                blocked,
                runtime: Some(runtime),
            }),
            Ok(Err(error)) => {
                runtime.shutdown_background();
                Err(error)
            }
            Err(_) => {
                runtime.shutdown_background();
                Err(RabbitError::broker(
                    "connect",
                    format!(
                        "{broker}: not connected within {connect_timeout:?} \
                         (TCP connect, AMQP handshake, channel open and confirm.select)"
                    ),
                ))
            }
        }
    }

    /// Whether the connection and the channel are still open, as far as the client knows.
    fn is_open(&self) -> bool {
        self.runtime.is_some()
            && self.connection.status().connected()
            && self.channel.status().connected()
    }

    /// Publishes the batch and settles it from the confirms, all within the confirm timeout.
    /// Messages the broker cannot take (too long a routing key, too large a body) are marked
    /// failed without publishing.
    fn publish(
        &mut self,
        config: &RabbitSenderBuilder,
        batch: &mut Batch,
    ) -> Result<(), RabbitError> {
        if let Some(reason) = self.blocked.borrow().clone() {
            // Publishing now would only queue the batch behind the alarm.
            return Err(RabbitError::Blocked { reason });
        }
        let Some(runtime) = &self.runtime else {
            return Err(RabbitError::broker("publish", "the connection is closed"));
        };
        let mut blocked = self.blocked.clone();
        let messages = batch.messages_mut();
        let outcome = runtime.block_on(async {
            let batch_settled = publish_and_confirm(&self.channel, config, messages);
            let broker_blocks = async move {
                let reason = match blocked.wait_for(Option::is_some).await {
                    Ok(reason) => reason.clone().unwrap_or_default(),
                    // The connection's events ended: the batch learns why by itself.
                    Err(_) => std::future::pending().await,
                };
                Err(Stop::Blocked(reason))
            };
            // One deadline for publishing and confirms together.
            tokio::time::timeout(config.confirm_timeout, first(batch_settled, broker_blocks)).await
        });
        let messages = batch.messages_mut();
        let mut fail_unmarked = |reason: &str| {
            let mut failed = 0;
            for msg in messages.iter_mut() {
                if msg.status == Status::Unmarked {
                    msg.mark_failed(reason);
                    failed += 1;
                }
            }
            failed
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Stop::Blocked(reason))) => Err(RabbitError::Blocked { reason }),
            Ok(Err(Stop::Client(error))) => {
                let text = redact(&error.to_string(), &config.url);
                // A channel-level (soft) AMQP error is the broker closing the channel, even
                // if the connection is no longer up by the time it is read here: seen once
                // in CI for a body over max_message_size, where the connection's end follows
                // the channel's close and the cause is the close.
                let channel_closed = matches!(
                    error.kind(),
                    lapin::ErrorKind::ProtocolError(amqp)
                        if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
                );
                if channel_closed || self.connection.status().connected() {
                    // The broker closed the channel (an exchange that does not exist, a body
                    // over its max_message_size): its reason says which.
                    fail_unmarked(&format!(
                        "RabbitMQ closed the channel before confirming the message: {text}"
                    ));
                    Err(RabbitError::broker("publish", error))
                } else {
                    let unconfirmed = fail_unmarked(&format!(
                        "the RabbitMQ connection ended before the broker confirmed the message: {text}"
                    ));
                    Err(RabbitError::ConnectionLost { unconfirmed })
                }
            }
            Err(_elapsed) => {
                let unconfirmed = fail_unmarked(&format!(
                    "no publisher confirm from RabbitMQ within {:?}",
                    config.confirm_timeout
                ));
                Err(RabbitError::ConfirmTimeout {
                    unconfirmed,
                    timeout: config.confirm_timeout,
                })
            }
        }
    }

    /// Closes the connection, waiting at most `grace` for the broker's `close-ok` (not at all
    /// when the broker blocks the connection: the client does not write to a blocked
    /// connection), then shuts the runtime down without waiting for anything. With its
    /// reactor gone, lapin's I/O thread fails its next poll of the socket and ends too, so a
    /// closed connection leaves no thread waiting on a broker: a sender that fails batch
    /// after batch (a broker that accepts connections and never answers) does not pile up
    /// threads.
    fn close(&mut self, grace: Duration) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let polite = !grace.is_zero()
            && self.connection.status().connected()
            && self.blocked.borrow().is_none()
            // Blocking on the runtime from inside another one would panic (a sender dropped
            // in async code).
            && tokio::runtime::Handle::try_current().is_err();
        if polite {
            let closing = self
                .connection
                .close(lapin::protocol::constants::REPLY_SUCCESS, "OK".into());
            let _ = runtime.block_on(async { tokio::time::timeout(grace, closing).await });
        }
        runtime.shutdown_background();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close(CLOSE_TIMEOUT);
    }
}

/// Publishes every message of `messages` that the broker can take, then awaits their
/// confirms in order and marks each message from its own.
async fn publish_and_confirm(
    channel: &Channel,
    config: &RabbitSenderBuilder,
    messages: &mut [Message],
) -> Result<(), Stop> {
    // Exchange names are checked at build, keys and header names by check_limits: none is
    // longer than a short string.
    let exchange = ShortString::from(config.exchange.as_str());
    let options = BasicPublishOptions {
        mandatory: config.mandatory,
        immediate: false,
    };
    let mut pending = Vec::with_capacity(messages.len());
    let mut refused = None;
    for (index, msg) in messages.iter_mut().enumerate() {
        if let Err(reason) = check_limits(msg, config.max_body_size) {
            msg.mark_failed(reason);
            continue;
        }
        match channel
            .basic_publish(
                exchange.clone(),
                ShortString::from(msg.key()),
                options,
                msg.value(),
                properties(msg, config.persistent),
            )
            .await
        {
            Ok(confirm) => pending.push((index, confirm)),
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    if let Some(publish_error) = refused {
        // The broker may have closed the channel under an earlier message of the batch (a
        // body over its limit): its reason comes with that message's confirm, while this
        // publish only says the channel is closing. The earlier ones it did confirm are sent.
        let mut reason = None;
        for (index, confirm) in pending {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => messages[index].mark_sent(),
                Ok(_) => {}
                Err(error) => {
                    reason.get_or_insert(error);
                }
            }
        }
        return Err(Stop::Client(reason.unwrap_or(publish_error)));
    }
    for (index, confirm) in pending {
        let msg = &mut messages[index];
        match confirm.await.map_err(Stop::Client)? {
            Confirmation::Ack(None) => msg.mark_sent(),
            // The broker sends a message's basic.return before its ack; the client hands
            // the return over with the confirm.
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                msg.mark_failed(returned_reason(&returned));
            }
            Confirmation::Nack(None) => msg.mark_failed("nacked by RabbitMQ (basic.nack)"),
            Confirmation::NotRequested => {
                msg.mark_failed("no publisher confirm: confirms are not enabled on the channel")
            }
        }
    }
    Ok(())
}

fn returned_reason(returned: &BasicReturnMessage) -> String {
    format!(
        "returned by RabbitMQ: {} {} (exchange {:?}, routing key {:?})",
        returned.reply_code,
        returned.reply_text,
        returned.delivery.exchange.as_str(),
        returned.delivery.routing_key.as_str()
    )
}

/// Keeps `blocked` up to date with the connection's `connection.blocked` and
/// `connection.unblocked` notifications, until the connection's events end.
async fn watch_blocked(events: impl Stream<Item = Event>, blocked: watch::Sender<Option<String>>) {
    let mut events = pin!(events);
    while let Some(event) = std::future::poll_fn(|cx| events.as_mut().poll_next(cx)).await {
        match event {
            Event::ConnectionBlocked(reason) if reason.is_empty() => {
                blocked.send_replace(Some("no reason given".into()));
            }
            Event::ConnectionBlocked(reason) => {
                blocked.send_replace(Some(reason));
            }
            Event::ConnectionUnblocked => {
                blocked.send_replace(None);
            }
            _ => {}
        }
    }
}

/// Whichever of two futures finishes first (`a` is polled first).
async fn first<T>(a: impl Future<Output = T>, b: impl Future<Output = T>) -> T {
    let (mut a, mut b) = (pin!(a), pin!(b));
    std::future::poll_fn(move |cx| match a.as_mut().poll(cx) {
        Poll::Ready(value) => Poll::Ready(value),
        Poll::Pending => b.as_mut().poll(cx),
    })
    .await
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
fn properties(msg: &Message, persistent: bool) -> BasicProperties {
    let mut headers: BTreeMap<ShortString, AMQPValue> = BTreeMap::new();
    for (name, value) in msg.headers() {
        let value = AMQPValue::LongString(LongString::from(value.as_str()));
        match headers.get_mut(name.as_str()) {
            None => {
                headers.insert(ShortString::from(name.as_str()), value);
            }
            // AMQP tables have unique names; troutbox headers may repeat one: keep every
            // value, in order, as an array.
            Some(AMQPValue::FieldArray(values)) => values.push(value),
            Some(slot) => {
                let first = std::mem::replace(slot, AMQPValue::Void);
                *slot = AMQPValue::FieldArray(FieldArray::from(vec![first, value]));
            }
        }
    }
    let mut properties =
        BasicProperties::default().with_message_id(ShortString::from(msg.dedup_key()));
    if !headers.is_empty() {
        properties = properties.with_headers(FieldTable::from(headers));
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
        assert_eq!(
            props.message_id().as_ref().map(|id| id.as_str()),
            Some("42")
        );
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(*props.timestamp(), Some(1_700_000_000));
        let headers = props.headers().as_ref().unwrap().inner();
        let long = |s: &str| AMQPValue::LongString(s.into());
        assert_eq!(headers.get("b"), Some(&long("2")));
        assert_eq!(
            headers.get("a"),
            Some(&AMQPValue::FieldArray(
                vec![long("1"), long("3"), long("4")].into()
            ))
        );
        let plain = properties(&message(1, "k", &[]), false);
        assert!(plain.headers().is_none());
        assert!(plain.delivery_mode().is_none());
    }

    #[test]
    fn the_url_is_read_as_the_client_reads_it() {
        let sender = RabbitSender::builder("AMQP://u:p%40ss@broker:5673/v%2fh?heartbeat=5")
            .connect_timeout(Duration::from_millis(2500))
            .build()
            .unwrap();
        let a = &sender.uri.authority;
        assert_eq!((a.host.as_str(), a.port), ("broker", 5673));
        assert_eq!(
            (a.userinfo.username.as_str(), a.userinfo.password.as_str()),
            ("u", "p@ss")
        );
        assert_eq!(sender.uri.vhost, "v/h");
        assert_eq!(sender.uri.query.heartbeat, Some(5));
        assert_eq!(sender.connect_timeout, Duration::from_millis(2500));
        // The URL's connection_timeout wins over the builder's.
        let own = RabbitSender::builder("amqp://h?connection_timeout=7&heartbeat=5")
            .build()
            .unwrap();
        assert_eq!(own.connect_timeout, Duration::from_millis(7));
        // An IPv6 literal stays the host (the client alone would read "localhost").
        for (url, host) in [
            ("amqp://[::1]:5672/%2f", "::1"),
            ("amqp://u:p@[fe80::1]/", "fe80::1"),
            ("amqp://127.0.0.1:5672", "127.0.0.1"),
        ] {
            let sender = RabbitSender::builder(url).build().unwrap();
            assert_eq!(sender.uri.authority.host, host, "{url}");
        }
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
            RabbitSender::builder("amqp://h:99999"),
            RabbitSender::builder("amqp://h?heartbeat=often"),
        ] {
            let err = bad.build().unwrap_err();
            assert!(matches!(err, RabbitError::InvalidConfig { .. }), "{err}");
        }
        // A URL the client cannot read is refused without its credentials in the reason.
        for url in [
            "amqp://alice:s3cret@h:99999/%2f",
            "amqp://alice:s3cret@h/%2f?channel_max=s3cret",
        ] {
            let err = RabbitSender::builder(url).build().unwrap_err().to_string();
            assert!(err.contains("`url`"), "{err}");
            assert!(!err.contains("s3cret") && !err.contains("alice"), "{err}");
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
    fn send_inside_an_async_runtime_is_an_error_not_a_panic() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut sender = RabbitSender::builder("amqp://127.0.0.1:1").build().unwrap();
        let mut batch = Batch::new(vec![message(1, "k", &[])]);
        let err = runtime
            .block_on(async { crate::Sender::send(&mut sender, &mut batch) })
            .unwrap_err();
        assert!(err.to_string().contains("inside an async runtime"), "{err}");
        assert_eq!(batch.messages()[0].status(), &Status::Unmarked);
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
