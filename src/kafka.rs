//! Publishing to Kafka with an idempotent producer (cargo feature `kafka`).
//!
//! [`KafkaSender`] is a ready-made [`Sender`](crate::Sender) built on
//! [librdkafka](https://github.com/confluentinc/librdkafka) through the
//! [`rdkafka`](https://docs.rs/rdkafka) crate's thread-based producer: no async runtime. It
//! enqueues every message of a batch, then waits for the broker's delivery reports, and marks
//! a message sent only on its own successful report (the broker's acknowledgement with
//! `acks=all`). A message the broker or the client refuses is marked failed with the reason;
//! a message whose report has not arrived by the
//! [`delivery_timeout`](KafkaSenderBuilder::delivery_timeout) is marked failed too, so the
//! relay retries it.
//!
//! Each message becomes one Kafka record:
//!
//! | troutbox | Kafka |
//! | --- | --- |
//! | [`Message::key`] | key (the partitioner hashes it: one key, one partition) |
//! | [`Message::value`] | value |
//! | [`Message::dedup_key`] | header `message-id` ([`DEFAULT_ID_HEADER`]; [`id_header`](KafkaSenderBuilder::id_header) renames it), the consumers' deduplication key |
//! | [`Message::headers`] | headers, in order, names repeated as given (a `traceparent` recorded by the `opentelemetry` feature among them); a header named like the id header is left out |
//! | [`Message::created_at`] | timestamp (create time, milliseconds) |
//! | [`topic`](KafkaSenderBuilder::topic) or [`route`](KafkaSenderBuilder::route) | topic |
//!
//! The producer is idempotent: `enable.idempotence=true`, `acks=all`, at most 5 requests in
//! flight per connection. Any librdkafka property can be set with
//! [`set`](KafkaSenderBuilder::set); a value that would break these guarantees is refused by
//! [`build`](KafkaSenderBuilder::build) with [`KafkaSenderError::InvalidConfig`].
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let outbox: troutbox::Outbox = todo!();
//! use std::time::Duration;
//! use troutbox::kafka::KafkaSender;
//!
//! let sender = KafkaSender::builder("broker-1:9092,broker-2:9092")
//!     .topic("orders")
//!     .delivery_timeout(Duration::from_secs(10)) // keep it below the outbox's send_timeout
//!     .set("compression.type", "lz4")
//!     .build()?;
//! let mut handle = outbox.start(sender)?; // each worker gets its own producer
//! # handle.shutdown()?;
//! # Ok(()) }
//! ```
//!
//! [`Message::key`]: crate::Message::key
//! [`Message::value`]: crate::Message::value
//! [`Message::dedup_key`]: crate::Message::dedup_key
//! [`Message::headers`]: crate::Message::headers
//! [`Message::created_at`]: crate::Message::created_at

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, PurgeConfig, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

/// The `rdkafka` crate the sender is built on, re-exported so that a consumer of your own
/// (or a property type) matches its version.
pub use rdkafka;

use crate::message::{Message, Status};
use crate::relay::batch::Batch;

/// Default for [`KafkaSenderBuilder::delivery_timeout`]: 10 seconds, a third of the relay's
/// default send timeout.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`KafkaSenderBuilder::id_header`]: the header carrying
/// [`Message::dedup_key`](crate::Message::dedup_key).
pub const DEFAULT_ID_HEADER: &str = "message-id";

/// The most produce requests in flight per broker connection that keep an idempotent
/// producer's per-partition order across retries.
pub const MAX_IN_FLIGHT: u32 = 5;

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Properties the sender sets before yours (yours may change them only within the
/// guarantees: see [`KafkaSenderBuilder::set`]).
const DEFAULTS: [(&str, &str); 5] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("max.in.flight.requests.per.connection", "5"),
    ("client.id", "troutbox"),
    // The sender enqueues a whole batch, then flushes it (see `send_now`), which sends it at
    // once whatever the linger: the linger only keeps librdkafka from sending the first
    // messages of a batch alone while the rest are being enqueued, so that a batch leaves in
    // one request per partition leader instead of dozens of small ones (measured: a quarter
    // of the CPU per message at batch 100, BENCHMARKS.md).
    ("linger.ms", "100"),
];

/// Why a [`KafkaSender`] could not be built, or could not deliver a batch. No variant's
/// text (Display, Debug or source) holds a secret property's value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaSenderError {
    /// An option or a librdkafka property is invalid, or would break the sender's
    /// guarantees. Returned by [`KafkaSenderBuilder::build`].
    #[error("invalid Kafka sender option `{option}`: {reason}")]
    InvalidConfig {
        /// The builder method, or the librdkafka property, that is wrong.
        option: String,
        /// What is wrong and what is accepted.
        reason: String,
    },

    /// librdkafka could not create the producer. The next batch tries again.
    #[error("creating the Kafka producer failed: {reason}")]
    Client {
        /// librdkafka's reason, credentials redacted.
        reason: String,
    },

    /// Delivery reports were still due when the delivery timeout passed. Those messages were
    /// marked failed: the ones still in the producer's queue were taken out of it (the broker
    /// never had them), but the ones already sent may reach the broker anyway, and then
    /// arrive twice. Returning an error makes the worker pause for its backoff.
    #[error("{unreported} Kafka delivery reports did not arrive within {timeout:?}{}", last_error.as_ref().map(|e| format!(" (last client error: {e})")).unwrap_or_default())]
    DeliveryTimeout {
        /// Messages of the batch whose fate is unknown.
        unreported: usize,
        /// The configured delivery timeout.
        timeout: Duration,
        /// The last error librdkafka reported for the connection (all brokers down, an
        /// authentication failure, ...), if any, credentials redacted.
        last_error: Option<String>,
    },

    /// The producer hit a fatal error, or the broker refused its idempotent identity
    /// (producer fenced, unknown producer id, sequence out of order: for example a broker
    /// that lost or reset the producer's state). The batch's undelivered messages were marked
    /// failed; the producer is replaced by a new one for the next batch.
    #[error("the Kafka producer hit a fatal error and is replaced: {reason}")]
    Fatal {
        /// librdkafka's reason, credentials redacted.
        reason: String,
    },
}

/// Chooses a message's topic; `None` when the message is to go nowhere (it is then marked
/// failed).
type Route = dyn Fn(&Message) -> Option<String> + Send + Sync;

#[derive(Clone)]
enum Destination {
    Unset,
    Topic(String),
    Route(Arc<Route>),
}

/// Options for a [`KafkaSender`]; every one but the destination has a default. Its `Debug`
/// output shows secret properties (passwords, secrets, keys) as `***`.
#[derive(Clone)]
pub struct KafkaSenderBuilder {
    bootstrap_servers: String,
    destination: Destination,
    /// librdkafka properties set with `set`, in the order given (a later one wins).
    properties: Vec<(String, String)>,
    delivery_timeout: Duration,
    id_header: String,
}

impl fmt::Debug for KafkaSenderBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaSenderBuilder")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("destination", &self.destination)
            .field("properties", &properties)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("id_header", &self.id_header)
            .finish()
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Unset => f.write_str("Unset"),
            Destination::Topic(topic) => f.debug_tuple("Topic").field(topic).finish(),
            Destination::Route(_) => f.write_str("Route(..)"),
        }
    }
}

/// Whether a librdkafka property holds a secret: its value is never shown.
fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "pem",
        "sasl.username",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|word| name.contains(word))
}

impl KafkaSenderBuilder {
    /// Every message goes to `topic`.
    #[must_use]
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.destination = Destination::Topic(topic.into());
        self
    }

    /// Each message goes to the topic `route` returns for it, for example one named in a
    /// header. `None` (or an invalid topic name) marks the message failed with the reason:
    /// it is retried, and dead after its retries, never silently dropped.
    ///
    /// ```
    /// use troutbox::kafka::KafkaSender;
    ///
    /// let sender = KafkaSender::builder("localhost:9092")
    ///     .route(|msg| msg.header("topic").map(str::to_owned))
    ///     .build()?;
    /// # Ok::<(), troutbox::kafka::KafkaSenderError>(())
    /// ```
    #[must_use]
    pub fn route(
        mut self,
        route: impl Fn(&Message) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.destination = Destination::Route(Arc::new(route));
        self
    }

    /// Sets a librdkafka producer property (see librdkafka's `CONFIGURATION.md`), for example
    /// `compression.type`, `linger.ms`, `message.max.bytes`, `partitioner`,
    /// `security.protocol` or `sasl.password`. Set last wins. [`build`](Self::build) checks
    /// every name and value with librdkafka, and refuses what would break the guarantees:
    ///
    /// - `enable.idempotence` other than `true`;
    /// - `acks` / `request.required.acks` other than `all` or `-1`;
    /// - `max.in.flight.requests.per.connection` / `max.in.flight` above [`MAX_IN_FLIGHT`];
    /// - `retries` / `message.send.max.retries` of 0;
    /// - `delivery.report.only.error=true` (no report would confirm a delivery);
    /// - `queuing.strategy` other than `fifo`;
    /// - `transactional.id` (the sender does not run Kafka transactions);
    /// - `bootstrap.servers` / `metadata.broker.list` (given to [`KafkaSender::builder`]).
    ///
    /// Values of properties whose name contains `password`, `secret` or `pem`, and of
    /// `sasl.username` and `sasl.oauthbearer.config`, never appear in an error or a `Debug`
    /// output.
    #[must_use]
    pub fn set(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((name.into(), value.into()));
        self
    }

    /// How long [`send`](crate::Sender::send) may take for one batch, from its start until
    /// every delivery report is in (default [`DEFAULT_DELIVERY_TIMEOUT`], accepted: 1 ms to
    /// 1 hour). The messages still unreported then are marked failed. Keep it well below the
    /// outbox's `send_timeout` (default 30 s), which bounds the whole call: past it, the
    /// relay loses the batch's claim and its messages are sent again.
    ///
    /// The call can outlast it by the time librdkafka takes to purge its queue (milliseconds)
    /// plus up to 100 ms spent collecting the purged messages' reports.
    #[must_use]
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// The name of the header that carries [`Message::dedup_key`](crate::Message::dedup_key)
    /// (default [`DEFAULT_ID_HEADER`], `message-id`). A message header with that name is not
    /// sent: consumers find exactly one.
    #[must_use]
    pub fn id_header(mut self, name: impl Into<String>) -> Self {
        self.id_header = name.into();
        self
    }

    /// Checks the options and every property (with librdkafka, without creating a client).
    /// Does not connect: each worker's clone creates its producer on its first batch.
    pub fn build(self) -> Result<KafkaSender, KafkaSenderError> {
        let invalid = |option: &str, reason: String| {
            Err(KafkaSenderError::InvalidConfig {
                option: option.to_owned(),
                reason,
            })
        };
        if self.bootstrap_servers.trim().is_empty() {
            return invalid(
                "bootstrap_servers",
                "empty: give host:port[,host:port...]".into(),
            );
        }
        match &self.destination {
            Destination::Unset => {
                return invalid(
                    "topic",
                    "no destination: call .topic(name) or .route(closure)".into(),
                )
            }
            Destination::Topic(topic) => {
                if let Err(reason) = check_topic(topic) {
                    return invalid("topic", reason);
                }
            }
            Destination::Route(_) => {}
        }
        if self.delivery_timeout < Duration::from_millis(1)
            || self.delivery_timeout > Duration::from_secs(3600)
        {
            return invalid(
                "delivery_timeout",
                format!("{:?} is outside 1 ms to 1 hour", self.delivery_timeout),
            );
        }
        if self.id_header.is_empty() {
            return invalid("id_header", "empty: a header needs a name".into());
        }
        for (name, value) in &self.properties {
            if let Err(reason) = check_property(name, value) {
                return invalid(name, reason);
            }
        }
        let secrets: Arc<[String]> = self
            .properties
            .iter()
            .filter(|(name, value)| is_secret(name) && !value.is_empty())
            .map(|(_, value)| value.clone())
            .collect();
        let client_config = self.client_config();
        if let Err(e) = client_config.create_native_config() {
            let (option, reason) = match e {
                KafkaError::ClientConfig(_, description, key, _) => (key, description),
                other => ("properties".to_owned(), other.to_string()),
            };
            return invalid(&option, redact(&reason, &secrets));
        }
        Ok(KafkaSender {
            config: Arc::new(Config {
                builder: self,
                client_config,
                secrets,
            }),
            link: None,
            batches: 0,
        })
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (name, value) in DEFAULTS {
            config.set(name, value);
        }
        for (name, value) in &self.properties {
            config.set(name, value);
        }
        config
    }
}

/// Why `name = value` is refused, if it is (librdkafka checks the rest).
fn check_property(name: &str, value: &str) -> Result<(), String> {
    let v = value.trim();
    let is_true = |v: &str| matches!(v.to_ascii_lowercase().as_str(), "true" | "t" | "1");
    match name {
        "enable.idempotence" if !is_true(v) => Err(format!(
            "{value:?}: the sender keeps the idempotent producer (no duplicates from librdkafka's own retries, order kept per partition); only true is accepted"
        )),
        "acks" | "request.required.acks" if !(v.eq_ignore_ascii_case("all") || v == "-1") => {
            Err(format!(
                "{value:?}: a message is marked sent on the broker's acknowledgement, which must cover every in-sync replica; only all or -1 is accepted"
            ))
        }
        "max.in.flight.requests.per.connection" | "max.in.flight" => match v.parse::<u32>() {
            Ok(n) if (1..=MAX_IN_FLIGHT).contains(&n) => Ok(()),
            _ => Err(format!(
                "{value:?}: the idempotent producer keeps per-partition order across retries with at most {MAX_IN_FLIGHT} requests in flight; accepted: 1 to {MAX_IN_FLIGHT}"
            )),
        },
        "retries" | "message.send.max.retries" if v == "0" => Err(
            "0: the idempotent producer needs retries; leave the default (librdkafka retries until message.timeout.ms)".into(),
        ),
        "delivery.report.only.error" if is_true(v) => Err(
            "true: a message is marked sent on its own delivery report, which this would suppress".into(),
        ),
        "queuing.strategy" if !v.eq_ignore_ascii_case("fifo") => {
            Err(format!("{value:?}: only fifo keeps the produce order"))
        }
        "transactional.id" => Err(
            "the sender runs an idempotent producer, not Kafka transactions: remove it".into(),
        ),
        "bootstrap.servers" | "metadata.broker.list" => {
            Err("give the brokers to KafkaSender::builder instead".into())
        }
        _ => Ok(()),
    }
}

/// Why Kafka would refuse `topic` as a topic name, if it would.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic name is empty".into());
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "the topic name is {} bytes long; Kafka allows at most {MAX_TOPIC_LEN}",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!("{topic:?} is not a valid topic name"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "the topic name {topic:?} holds {c:?}; Kafka allows ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// `text` with every secret replaced by `***` (longest first, so that one secret inside
/// another goes whole).
fn redact(text: &str, secrets: &[String]) -> String {
    let mut secrets: Vec<&String> = secrets.iter().filter(|s| !s.is_empty()).collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for secret in secrets {
        out = out.replace(secret.as_str(), "***");
    }
    out
}

/// The validated options every clone shares.
struct Config {
    builder: KafkaSenderBuilder,
    client_config: ClientConfig,
    /// Values of the secret properties, to be taken out of every text the sender emits.
    secrets: Arc<[String]>,
}

/// A [`Sender`](crate::Sender) publishing to Kafka through an idempotent librdkafka producer.
/// See the [module documentation](self) for how messages are mapped.
///
/// Cloning gives a sender with the same options and no producer: the relay clones one per
/// worker, and each creates its own producer (its own connections and idempotent producer
/// id) on its first batch, and again after a fatal error.
pub struct KafkaSender {
    config: Arc<Config>,
    link: Option<Link>,
    /// Batches this sender has handled: tags each message's delivery report with its batch,
    /// so that a late report of an earlier batch is never taken for one of this batch.
    batches: u64,
}

impl KafkaSender {
    /// Starts configuring a sender for the Kafka cluster reached through
    /// `bootstrap_servers` (`host:port[,host:port...]`).
    pub fn builder(bootstrap_servers: impl Into<String>) -> KafkaSenderBuilder {
        KafkaSenderBuilder {
            bootstrap_servers: bootstrap_servers.into(),
            destination: Destination::Unset,
            properties: Vec::new(),
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            id_header: DEFAULT_ID_HEADER.to_owned(),
        }
    }

    /// The fixed topic, or `None` when messages are routed by a closure.
    pub fn topic(&self) -> Option<&str> {
        match &self.config.builder.destination {
            Destination::Topic(topic) => Some(topic),
            _ => None,
        }
    }

    /// True while this sender holds a producer (after its first batch).
    pub fn is_connected(&self) -> bool {
        self.link.is_some()
    }

    fn publish(&mut self, batch: &mut Batch) -> Result<(), KafkaSenderError> {
        let config = Arc::clone(&self.config);
        let timeout = config.builder.delivery_timeout;
        let deadline = Instant::now() + timeout;
        if let Some((_, reason)) = self
            .link
            .as_ref()
            .and_then(|link| link.producer.client().fatal_error())
        {
            log::warn!(
                "replacing the Kafka producer after its fatal error: {}",
                redact(&reason, &config.secrets)
            );
            self.retire_link();
        }
        let link = match &mut self.link {
            Some(link) => link,
            None => self.link.insert(Link::open(&config)?),
        };
        self.batches += 1;
        let mut settling = Settling {
            tag: self.batches,
            awaiting: vec![false; batch.len()],
            pending: 0,
            timeout,
            broken: None,
        };
        let ordered = batch.is_ordered();
        let messages = batch.messages_mut();
        // Keys with a failed message in this (ordered) batch: their later messages are not
        // published, since they would overtake it (as `Batch::send_each` does).
        let mut failed_keys: HashSet<String> = HashSet::new();

        for index in 0..messages.len() {
            if !matches!(messages[index].status(), Status::Unmarked) {
                continue;
            }
            if ordered && failed_keys.contains(messages[index].key()) {
                messages[index].mark_failed("not sent: an earlier message of its key failed");
                continue;
            }
            let enqueued = match destination(&config.builder.destination, &messages[index]) {
                Err(reason) => Err(reason),
                Ok(topic) => loop {
                    let msg = &messages[index];
                    let id = msg.dedup_key();
                    let record = record(
                        &config.builder.id_header,
                        settling.tag,
                        index,
                        msg,
                        &topic,
                        &id,
                    );
                    match link.producer.send(record) {
                        Ok(()) => break Ok(()),
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                            // Room is made as reports come in: wait for one, briefly.
                            let left = deadline.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                break Err(format!(
                                    "not sent: the Kafka producer's local queue stayed full (queue.buffering.max.messages / queue.buffering.max.kbytes) for the whole delivery timeout of {timeout:?}"
                                ));
                            }
                            // What is queued goes now (not after the linger), for at
                            // most 10 ms; the reports that came in make the room.
                            send_now(
                                &link.producer,
                                Instant::now() + left.min(Duration::from_millis(10)),
                            );
                            while let Ok(report) = link.reports.try_recv() {
                                settling.apply(report, messages, &config.secrets);
                            }
                        }
                        Err((e, _)) => break Err(refused_locally(&e, msg)),
                    }
                },
            };
            match enqueued {
                Ok(()) => {
                    settling.awaiting[index] = true;
                    settling.pending += 1;
                }
                Err(reason) => {
                    let msg = &mut messages[index];
                    msg.mark_failed(redact(&reason, &config.secrets));
                    if ordered {
                        failed_keys.insert(msg.key().to_owned());
                    }
                }
            }
        }

        if settling.pending > 0 {
            send_now(&link.producer, deadline);
        }
        while settling.pending > 0 {
            match link.reports.recv_deadline(deadline) {
                Ok(report) => settling.apply(report, messages, &config.secrets),
                Err(_) => break,
            }
        }
        let unreported = settling.pending;
        if unreported > 0 {
            // Take what has not left for the broker out of the producer's queue: those
            // messages fail now (reported as purged) instead of reaching Kafka after they were
            // marked failed, which would deliver them twice. The ones in flight stay.
            link.producer.purge(PurgeConfig::default().queue());
            let grace = Instant::now() + Duration::from_millis(100);
            while settling.pending > 0 {
                match link.reports.recv_deadline(grace) {
                    Ok(report) => settling.apply(report, messages, &config.secrets),
                    Err(_) => break,
                }
            }
            let last_error = link.last_error(&config.secrets);
            let reason = format!(
                "no delivery report from Kafka within {timeout:?}{}: the message may still reach the broker, and would then arrive twice",
                last_error.as_ref().map(|e| format!(" (last client error: {e})")).unwrap_or_default()
            );
            for (index, awaiting) in settling.awaiting.iter().enumerate() {
                if *awaiting {
                    messages[index].mark_failed(&reason);
                }
            }
        }
        if let Some((_, reason)) = link.producer.client().fatal_error() {
            self.retire_link();
            return Err(KafkaSenderError::Fatal {
                reason: redact(&reason, &config.secrets),
            });
        }
        if let Some(reason) = settling.broken {
            // librdkafka does not give up such a producer itself: every retry through it
            // would fail the same way (seen with a broker that fenced it after an outage).
            self.retire_link();
            return Err(KafkaSenderError::Fatal { reason });
        }
        if unreported > 0 {
            let last_error = link.last_error(&config.secrets);
            return Err(KafkaSenderError::DeliveryTimeout {
                unreported,
                timeout,
                last_error,
            });
        }
        Ok(())
    }

    fn retire_link(&mut self) {
        if let Some(link) = self.link.take() {
            // Dropping a producer purges what it still holds and waits up to 500 ms for
            // librdkafka's threads: on a thread of its own, so that this batch settles now.
            std::thread::spawn(move || drop(link));
        }
    }
}

impl Clone for KafkaSender {
    fn clone(&self) -> Self {
        KafkaSender {
            config: Arc::clone(&self.config),
            link: None,
            batches: 0,
        }
    }
}

impl fmt::Debug for KafkaSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The builder's Debug hides the secret properties.
        f.debug_struct("KafkaSender")
            .field("config", &self.config.builder)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl crate::Sender for KafkaSender {
    type Error = KafkaSenderError;

    fn send(&mut self, batch: &mut Batch) -> Result<(), KafkaSenderError> {
        self.publish(batch)
    }
}

/// The topic of `msg`, or why it has none.
fn destination<'a>(destination: &'a Destination, msg: &Message) -> Result<Cow<'a, str>, String> {
    match destination {
        Destination::Topic(topic) => Ok(Cow::Borrowed(topic)),
        Destination::Route(route) => match route(msg) {
            None => {
                Err("routed nowhere: the KafkaSender's route gave no topic for this message".into())
            }
            Some(topic) => match check_topic(&topic) {
                Ok(()) => Ok(Cow::Owned(topic)),
                Err(reason) => Err(format!("routed to an invalid topic: {reason}")),
            },
        },
        Destination::Unset => Err("routed nowhere: the KafkaSender has no topic".into()),
    }
}

/// Which message of which batch a delivery report is about.
struct Ticket {
    tag: u64,
    index: usize,
}

/// One delivery report, as the producer's polling thread hands it over.
struct Report {
    ticket: Box<Ticket>,
    result: Result<(), KafkaError>,
}

/// A batch's bookkeeping while its reports come in.
struct Settling {
    tag: u64,
    /// Per message of the batch: enqueued, and its report not in yet.
    awaiting: Vec<bool>,
    pending: usize,
    timeout: Duration,
    /// The first error that says the producer's idempotence state is broken (fenced,
    /// unknown producer id, sequence out of order): the producer must be replaced.
    broken: Option<String>,
}

impl Settling {
    fn apply(&mut self, report: Report, messages: &mut [Message], secrets: &[String]) {
        let Ticket { tag, index } = *report.ticket;
        if tag != self.tag || !self.awaiting.get(index).copied().unwrap_or(false) {
            // A late report of an earlier batch: that message was settled as failed then.
            log::debug!("ignoring a late Kafka delivery report (batch {tag}, message {index})");
            return;
        }
        self.awaiting[index] = false;
        self.pending -= 1;
        match report.result {
            Ok(()) => messages[index].mark_sent(),
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue)) => {
                messages[index].mark_failed(format!(
                    "not sent: still in the Kafka producer's queue when the delivery timeout of {:?} passed (taken out of it; the broker never had it)",
                    self.timeout
                ))
            }
            Err(e) => {
                let reason = redact(
                    &format!("Kafka did not take the message: {}", describe(&e)),
                    secrets,
                );
                if self.broken.is_none() && breaks_the_producer(&e) {
                    self.broken = Some(reason.clone());
                }
                messages[index].mark_failed(reason)
            }
        }
    }
}

/// Whether a delivery error means the broker no longer accepts this producer's idempotent
/// identity (producer id, epoch, sequence), so that only a new producer can deliver.
fn breaks_the_producer(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::InvalidProducerIdMapping
        )
    )
}

/// Why librdkafka refused to enqueue `msg`.
fn refused_locally(e: &KafkaError, msg: &Message) -> String {
    let mut reason = format!(
        "not sent: the Kafka client refused it before it reached the broker: {}",
        describe(e)
    );
    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
        reason.push_str(&format!(
            "; its value is {} bytes and its key {} bytes, over the producer's message.max.bytes",
            msg.value().len(),
            msg.key().len()
        ));
    }
    reason
}

/// A client error as a person reads it: librdkafka's text for its code.
fn describe(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        // "MessageSizeTooLarge (Broker: Message size too large)"
        Some(code) => code.to_string(),
        None => e.to_string(),
    }
}

/// The Kafka record of `msg`: see the module documentation's table.
fn record<'a>(
    id_header: &'a str,
    tag: u64,
    index: usize,
    msg: &'a Message,
    topic: &'a str,
    id: &'a str,
) -> BaseRecord<'a, str, [u8], Box<Ticket>> {
    let mut headers = OwnedHeaders::new_with_capacity(msg.headers().len() + 1).insert(Header {
        key: id_header,
        value: Some(id),
    });
    for (name, value) in msg.headers() {
        if name != id_header {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_str()),
            });
        }
    }
    let mut record = BaseRecord::with_opaque_to(topic, Box::new(Ticket { tag, index }))
        .key(msg.key())
        .payload(msg.value())
        .headers(headers);
    if let Ok(millis) = i64::try_from(msg.created_at().unix_timestamp_nanos() / 1_000_000) {
        record = record.timestamp(millis);
    }
    record
}

/// Sends everything `producer` holds now, whatever `linger.ms`, and waits until none of it is
/// left in its queues (each message delivered, failed or timed out, its report handed to the
/// sender's channel), at most until `deadline`.
///
/// librdkafka's own `rd_kafka_flush` does exactly this: for the duration of the call it makes
/// every broker thread treat the linger as elapsed. rust-rdkafka's `flush` calls it with a
/// timeout of 0 in a loop (and polls in between), which ends each call before a broker thread
/// has woken to see the flag, so the batch would still wait out its linger: hence the direct
/// call. With rust-rdkafka's event mode for delivery reports (`rd_kafka_conf_set_events`),
/// `rd_kafka_flush` serves no queue itself; it only waits for the message count to reach 0,
/// while the producer's polling thread hands the reports to the channel.
fn send_now(producer: &ThreadedProducer<Context>, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the handle is `producer`'s own, alive for the whole call (borrowed);
    // rd_kafka_flush is thread-safe, and in event mode neither polls nor frees anything the
    // producer's polling thread uses. Its result (timed out or not) is read from the reports.
    unsafe {
        rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), millis);
    }
}

/// One worker's producer and the receiving end of its delivery reports.
struct Link {
    producer: ThreadedProducer<Context>,
    reports: Receiver<Report>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl Link {
    fn open(config: &Config) -> Result<Link, KafkaSenderError> {
        let (tx, reports) = crossbeam_channel::unbounded();
        let last_error = Arc::new(Mutex::new(None));
        let context = Context {
            reports: tx,
            last_error: Arc::clone(&last_error),
        };
        let producer = config
            .client_config
            .create_with_context(context)
            .map_err(|e| KafkaSenderError::Client {
                reason: redact(&e.to_string(), &config.secrets),
            })?;
        Ok(Link {
            producer,
            reports,
            last_error,
        })
    }

    fn last_error(&self, secrets: &[String]) -> Option<String> {
        let text = self.last_error.lock().ok()?.clone()?;
        Some(redact(&text, secrets))
    }
}

/// The producer's callbacks, run on its polling thread.
struct Context {
    reports: crossbeam_channel::Sender<Report>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        log::warn!("librdkafka: {error}: {reason}");
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(format!("{}: {reason}", describe(&error)));
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<Ticket>) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        // The receiver is gone only once the sender is dropped: nothing waits any more.
        let _ = self.reports.send(Report { ticket, result });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: i64, key: &str) -> Message {
        Message {
            outbox: "".into(),
            id,
            key: key.into(),
            value: b"v".to_vec(),
            headers: vec![],
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            attempts: 0,
            status: Status::Unmarked,
        }
    }

    #[test]
    fn topics_kafka_would_refuse_are_refused() {
        for ok in ["orders", "a.b_c-D9", &"x".repeat(MAX_TOPIC_LEN)] {
            assert!(check_topic(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "with space",
            "slash/topic",
            "ünï",
            &"x".repeat(250),
        ] {
            assert!(check_topic(bad).is_err(), "{bad}");
        }
        let no_destination = KafkaSender::builder("h:9092").build().unwrap_err();
        assert!(no_destination.to_string().contains(".topic(name)"));
        for bad in [
            KafkaSender::builder("").topic("t"),
            KafkaSender::builder("h:9092").topic("bad topic"),
            KafkaSender::builder("h:9092").topic("t").id_header(""),
            KafkaSender::builder("h:9092")
                .topic("t")
                .delivery_timeout(Duration::ZERO),
        ] {
            assert!(matches!(
                bad.build(),
                Err(KafkaSenderError::InvalidConfig { .. })
            ));
        }
    }

    #[test]
    fn secrets_never_show_in_debug_nor_in_errors() {
        let builder = KafkaSender::builder("h:9092")
            .topic("t")
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", "alice-ops")
            .set("sasl.password", "s3cr@t-Pa55");
        let debug = format!("{builder:?}");
        assert!(
            !debug.contains("s3cr@t") && !debug.contains("alice-ops"),
            "{debug}"
        );
        assert!(debug.contains("sasl.password") && debug.contains("***"));
        let sender = builder.clone().build().unwrap();
        let debug = format!("{sender:?}");
        assert!(
            !debug.contains("s3cr@t") && !debug.contains("alice-ops"),
            "{debug}"
        );
        // librdkafka quotes a bad value in its error: a secret there is taken out too.
        let err = builder.set("linger.ms", "s3cr@t-Pa55").build().unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("s3cr@t"), "{text}");
        assert!(
            matches!(err, KafkaSenderError::InvalidConfig { option, .. } if option == "linger.ms")
        );
        assert_eq!(
            redact("a secret b", &["secret".into(), String::new()]),
            "a *** b"
        );
    }

    #[test]
    fn a_late_report_is_never_taken_for_this_batchs_message() {
        let mut messages = vec![message(1, "k"), message(2, "k")];
        let mut settling = Settling {
            tag: 7,
            awaiting: vec![true, true],
            pending: 2,
            timeout: Duration::from_secs(1),
            broken: None,
        };
        let report = |tag, index, result| Report {
            ticket: Box::new(Ticket { tag, index }),
            result,
        };
        // Batch 6's report for index 0 arrives during batch 7: ignored.
        settling.apply(report(6, 0, Ok(())), &mut messages, &[]);
        assert_eq!(messages[0].status(), &Status::Unmarked);
        assert_eq!(settling.pending, 2);
        settling.apply(report(7, 0, Ok(())), &mut messages, &[]);
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        settling.apply(report(7, 1, Err(fenced)), &mut messages, &[]);
        // A second report for one message (cannot happen) changes nothing.
        settling.apply(report(7, 1, Ok(())), &mut messages, &[]);
        assert_eq!(messages[0].status(), &Status::Sent);
        assert!(matches!(messages[1].status(), Status::Failed(r) if r.contains("ProducerFenced")));
        assert_eq!(settling.pending, 0);
        assert!(
            settling.broken.is_some(),
            "a fenced producer must be replaced"
        );
    }

    #[test]
    fn the_record_carries_the_mapping() {
        let mut msg = message(42, "order-42");
        msg.outbox = "6f1c0f2e-4b7a-4c39-9e56-0d4f3a1b2c3d".into();
        msg.headers = vec![
            ("traceparent".into(), "00-1-2-01".into()),
            ("message-id".into(), "forged".into()),
            ("tag".into(), "a".into()),
        ];
        msg.created_at =
            time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let id = msg.dedup_key();
        let record = record(DEFAULT_ID_HEADER, 1, 0, &msg, "t", &id);
        assert_eq!(record.key, Some("order-42"));
        assert_eq!(record.timestamp, Some(1_700_000_000_123));
        use rdkafka::message::Headers;
        let headers = record.headers.as_ref().unwrap();
        let all: Vec<(&str, Option<&[u8]>)> = headers.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            all,
            [
                ("message-id", Some(id.as_bytes())),
                ("traceparent", Some(&b"00-1-2-01"[..])),
                ("tag", Some(&b"a"[..])),
            ]
        );
    }
}
