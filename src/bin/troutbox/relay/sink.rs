//! The sink: one Sender for every source, built from `[sink.<kind>]`. Kafka and RabbitMQ are
//! the library's own Senders (in a binary built with their features); `log` prints each
//! message as a JSON line, `discard` drops it.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::json;
use troutbox::Batch;

use super::config::{ConfigError, KafkaSink, RabbitSink, Sink};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The Sender of one source: each of its workers gets a clone.
#[derive(Clone)]
pub enum SinkSender {
    #[cfg(feature = "kafka")]
    Kafka(troutbox::kafka::KafkaSender),
    #[cfg(feature = "rabbitmq")]
    Rabbitmq(Box<troutbox::rabbitmq::RabbitSender>),
    Log {
        source: String,
        pause: Option<Duration>,
    },
    Discard,
}

impl troutbox::Sender for SinkSender {
    type Error = BoxError;

    fn send(&mut self, batch: &mut Batch) -> Result<(), BoxError> {
        match self {
            #[cfg(feature = "kafka")]
            SinkSender::Kafka(s) => s.send(batch).map_err(Into::into),
            #[cfg(feature = "rabbitmq")]
            SinkSender::Rabbitmq(s) => s.send(batch).map_err(Into::into),
            SinkSender::Log { source, pause } => {
                if let Some(pause) = pause {
                    std::thread::sleep(*pause);
                }
                // One write of the whole batch, flushed before the batch is settled: a
                // process killed after this line printed the batch, and the outbox still
                // holds it (at least once).
                let mut out = String::new();
                for m in batch.iter() {
                    out.push_str(
                        &json!({
                            "source": source,
                            "id": m.id(),
                            "dedup_key": m.dedup_key(),
                            "key": m.key(),
                            "value": String::from_utf8_lossy(m.value()),
                            "headers": m.headers(),
                            "attempts": m.attempts(),
                        })
                        .to_string(),
                    );
                    out.push('\n');
                }
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(out.as_bytes())?;
                stdout.flush()?;
                Ok(())
            }
            SinkSender::Discard => Ok(()),
        }
    }
}

/// The sink's Sender for the source `source`.
pub fn sender(sink: &Sink, source: &str) -> Result<SinkSender, ConfigError> {
    match sink {
        #[cfg(feature = "kafka")]
        Sink::Kafka(k) => kafka(k).map(SinkSender::Kafka),
        #[cfg(not(feature = "kafka"))]
        Sink::Kafka(_) => Err(not_built("kafka")),
        #[cfg(feature = "rabbitmq")]
        Sink::Rabbitmq(r) => rabbitmq(r).map(|s| SinkSender::Rabbitmq(Box::new(s))),
        #[cfg(not(feature = "rabbitmq"))]
        Sink::Rabbitmq(_) => Err(not_built("rabbitmq")),
        Sink::Log(l) => Ok(SinkSender::Log {
            source: source.to_owned(),
            pause: l.pause,
        }),
        Sink::Discard(_) => Ok(SinkSender::Discard),
    }
}

#[allow(dead_code)]
fn not_built(kind: &str) -> ConfigError {
    ConfigError(format!(
        "sink.{kind}: this troutbox was built without the `{kind}` feature; install it with `cargo install --path . --features cli,{kind}`"
    ))
}

#[cfg(feature = "kafka")]
fn kafka(k: &KafkaSink) -> Result<troutbox::kafka::KafkaSender, ConfigError> {
    let mut b = troutbox::kafka::KafkaSender::builder(&k.brokers);
    if let Some(topic) = &k.topic {
        b = b.topic(topic);
    }
    if let Some(header) = k.topic_header.clone() {
        b = b.route(move |m| m.header(&header).map(str::to_owned));
    }
    if let Some(separator) = k.topic_key_separator.clone() {
        b = b.route(move |m| m.key().split_once(&separator).map(|(t, _)| t.to_owned()));
    }
    if let Some(d) = k.delivery_timeout {
        b = b.delivery_timeout(d);
    }
    for (name, value) in &k.properties {
        b = b.set(name, value);
    }
    for (name, var) in &k.properties_env {
        b = b.set(name, std::env::var(var).unwrap_or_default());
    }
    b.build()
        .map_err(|e| ConfigError(format!("sink.kafka: {e}")))
}

#[cfg(feature = "rabbitmq")]
fn rabbitmq(r: &RabbitSink) -> Result<troutbox::rabbitmq::RabbitSender, ConfigError> {
    let url = super::config::secret(
        "sink.rabbitmq.url",
        r.url.as_ref(),
        r.url_env.as_ref(),
        r.url_file.as_ref(),
    )?;
    troutbox::rabbitmq::RabbitSender::builder(url)
        .exchange(&r.exchange)
        .build()
        .map_err(|e| ConfigError(format!("sink.rabbitmq: {e}")))
}

/// Builds the Kafka sender once, which checks every property with librdkafka.
pub fn check_kafka(k: &KafkaSink) -> Result<(), ConfigError> {
    #[cfg(feature = "kafka")]
    return kafka(k).map(drop);
    #[cfg(not(feature = "kafka"))]
    {
        let _ = k;
        Err(not_built("kafka"))
    }
}

/// Builds the RabbitMQ sender once, which checks the URL and options.
pub fn check_rabbitmq(r: &RabbitSink) -> Result<(), ConfigError> {
    #[cfg(feature = "rabbitmq")]
    return rabbitmq(r).map(drop);
    #[cfg(not(feature = "rabbitmq"))]
    {
        let _ = r;
        Err(not_built("rabbitmq"))
    }
}

/// Whether the sink's broker accepts a TCP connection within `timeout` (any of Kafka's
/// bootstrap servers): checked once at start, so that a wrong address is an error then,
/// not a stream of failed batches. The Senders connect (and reconnect) on their own.
pub fn reachable(sink: &Sink, timeout: Duration) -> Result<(), String> {
    let addresses: Vec<String> = match sink {
        Sink::Kafka(k) => k.brokers.split(',').map(|s| s.trim().to_owned()).collect(),
        Sink::Rabbitmq(r) => {
            let url = super::config::secret(
                "sink.rabbitmq.url",
                r.url.as_ref(),
                r.url_env.as_ref(),
                r.url_file.as_ref(),
            )
            .map_err(|e| e.to_string())?;
            vec![amqp_address(&url)]
        }
        Sink::Log(_) | Sink::Discard(_) => return Ok(()),
    };
    let deadline = Instant::now() + timeout;
    let mut reasons = Vec::new();
    for address in &addresses {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let result = address
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut addrs| addrs.next().ok_or_else(|| "no address".to_owned()))
            .and_then(|a| TcpStream::connect_timeout(&a, left).map_err(|e| e.to_string()));
        match result {
            Ok(_) => return Ok(()),
            Err(e) => reasons.push(format!("{address}: {e}")),
        }
    }
    Err(reasons.join("; "))
}

/// `host:port` of an `amqp://user:pass@host:port/vhost` URL (5672 by default), without the
/// credentials.
fn amqp_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    }
}
