//! `relay.toml`: the service's configuration, read and checked whole before anything starts.
//! Every table refuses unknown keys; every error names the key it is about (the `toml`
//! crate's parse errors name it with its line; the checks here with its path).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use troutbox::{Outbox, PgStore, Retention};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The service itself: HTTP address, shutdown bound.
    #[serde(default)]
    pub service: Service,
    /// Where every source's messages go.
    pub sink: Sink,
    /// The outbox tables relayed, `[[source]]` each.
    #[serde(rename = "source", default)]
    pub sources: Vec<Source>,
}

/// `[service]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// `host:port` for `/healthz` and `/metrics`; none when absent.
    pub listen: Option<String>,
    /// How long a graceful stop waits for the batches in flight of every source (they stop
    /// in parallel). Defaults to 30 s.
    #[serde(default = "default_shutdown", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
}

impl Default for Service {
    fn default() -> Self {
        Service {
            listen: None,
            shutdown_timeout: default_shutdown(),
        }
    }
}

fn default_shutdown() -> Duration {
    Duration::from_secs(30)
}

/// `[sink.<kind>]`: exactly one kind.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sink {
    /// `[sink.kafka]`: troutbox's KafkaSender (binary built with the `kafka` feature).
    Kafka(KafkaSink),
    /// `[sink.rabbitmq]`: troutbox's RabbitSender (binary built with the `rabbitmq` feature).
    Rabbitmq(RabbitSink),
    /// `[sink.log]`: one JSON line per message on standard output (tests, trials).
    Log(LogSink),
    /// `[sink.discard]`: messages are dropped as sent (benchmarks).
    Discard(DiscardSink),
}

/// `[sink.kafka]`.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSink {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// One topic for every message.
    pub topic: Option<String>,
    /// Or the topic in this header of each message.
    pub topic_header: Option<String>,
    /// Or the topic before this separator in each message's key (`orders:42` with `:`).
    pub topic_key_separator: Option<String>,
    /// How long to wait for a batch's delivery reports (keep it below `send_timeout`).
    #[serde(default, deserialize_with = "some_duration")]
    pub delivery_timeout: Option<Duration>,
    /// librdkafka properties, as `KafkaSenderBuilder::set` takes them.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are secrets: the name of the environment variable
    /// holding each (`"sasl.password" = "KAFKA_PASSWORD"`).
    #[serde(default)]
    pub properties_env: BTreeMap<String, String>,
}

/// `[sink.rabbitmq]`.
#[cfg_attr(not(feature = "rabbitmq"), allow(dead_code))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSink {
    /// `amqp://` URL (credentials in it: prefer `url_env` or `url_file`).
    pub url: Option<String>,
    /// The environment variable holding the URL.
    pub url_env: Option<String>,
    /// A file holding the URL (its first line).
    pub url_file: Option<PathBuf>,
    /// The exchange; the routing key is each message's key. Defaults to the default exchange.
    #[serde(default)]
    pub exchange: String,
}

/// `[sink.log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSink {
    /// Waits this long in every batch before printing it: a slow broker, for trials of the
    /// shutdown and of back pressure.
    #[serde(default, deserialize_with = "some_duration")]
    pub pause: Option<Duration>,
}

/// `[sink.discard]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscardSink {}

/// `[[source]]`: one outbox table, its database, and how it is relayed. Options left out
/// take the library's defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Names the source in logs, `/healthz` and metric labels; unique.
    pub name: String,
    /// libpq key=value string or `postgresql://` URL, password included only if the file
    /// is as protected as a secret: prefer `database_url_env` or `database_url_file`.
    pub database_url: Option<String>,
    /// The environment variable holding the database URL.
    pub database_url_env: Option<String>,
    /// A file holding the database URL (its first line).
    pub database_url_file: Option<PathBuf>,
    #[serde(default = "default_schema")]
    pub schema: String,
    #[serde(default = "default_table")]
    pub table: String,
    pub workers: Option<usize>,
    pub batch_size: Option<usize>,
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub per_key_ordering: bool,
    #[serde(default)]
    pub notify: bool,
    pub max_value_size: Option<usize>,
    #[serde(default, deserialize_with = "some_duration")]
    pub poll_interval: Option<Duration>,
    #[serde(default, deserialize_with = "some_duration")]
    pub send_timeout: Option<Duration>,
    /// Keep sent messages this long (Retention::keep_sent); delete on send when absent.
    #[serde(default, deserialize_with = "some_duration")]
    pub keep_sent: Option<Duration>,
    #[serde(default, deserialize_with = "some_duration")]
    pub partition_interval: Option<Duration>,
    /// Run `Outbox::migrate` at start (records ordering, notify and max_value_size).
    #[serde(default)]
    pub migrate: bool,
    /// Run partition maintenance in this process (keep_sent tables).
    #[serde(default)]
    pub maintenance: bool,
    #[serde(default, deserialize_with = "some_duration")]
    pub maintenance_interval: Option<Duration>,
    /// `/healthz` reports the source unhealthy above this many pending messages (the
    /// thresholds of `troutbox status`).
    pub max_pending: Option<i64>,
    /// ... above this many dead messages.
    pub max_dead: Option<i64>,
    /// ... when the oldest pending message is older than this.
    #[serde(default, deserialize_with = "some_duration")]
    pub max_age: Option<Duration>,
    /// Connections of the source's pool. Defaults to what its relay needs: workers + 1
    /// (the claim journal), + 1 with notify, + 1 with maintenance.
    pub pool_size: Option<u32>,
}

fn default_schema() -> String {
    troutbox::DEFAULT_SCHEMA.to_owned()
}

fn default_table() -> String {
    troutbox::DEFAULT_TABLE.to_owned()
}

/// A duration written like `30s`, `250ms`, `7d`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        D::Error::custom(format!(
            "invalid duration {text:?} ({e}); write it like 30s, 250ms, 7d"
        ))
    })
}

fn some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// A configuration error: printed as is, exit status 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(text: String) -> Result<T, ConfigError> {
    Err(ConfigError(text))
}

/// A secret given inline, by environment variable or by file; exactly one. `key` is the
/// inline key's path (`source "a".database_url`), for errors.
pub fn secret(
    key: &str,
    inline: Option<&String>,
    env: Option<&String>,
    file: Option<&PathBuf>,
) -> Result<String, ConfigError> {
    match (inline, env, file) {
        (Some(v), None, None) => Ok(v.clone()),
        (None, Some(var), None) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => err(format!(
                "{key}_env: the environment variable {var} is not set (or empty); set it to the value, or name another"
            )),
        },
        (None, None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => {
                Ok(text.lines().next().unwrap_or("").trim().to_owned())
            }
            Ok(_) => err(format!("{key}_file: {} is empty", path.display())),
            Err(e) => err(format!("{key}_file: cannot read {}: {e}", path.display())),
        },
        (None, None, None) => err(format!(
            "{key}: missing; give one of {key}, {key}_env (an environment variable) or {key}_file"
        )),
        _ => err(format!(
            "{key}: give only one of {key}, {key}_env and {key}_file"
        )),
    }
}

impl RelayConfig {
    /// Reads and checks `path`: syntax, unknown keys, types, then what the library checks
    /// (identifiers, option ranges) and the secrets, without connecting to anything.
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let config: RelayConfig =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.sources.is_empty() {
            return err("source: none given; add at least one [[source]] table".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            if source.name.is_empty() {
                return err(format!("source[{i}].name: empty"));
            }
            if !names.insert(source.name.as_str()) {
                return err(format!(
                    "source[{i}].name: {:?} names another source too; names must be unique",
                    source.name
                ));
            }
            let url = source.database_url()?;
            let parsed: postgres::Config = url.parse().map_err(|e| {
                ConfigError(format!(
                    "{}.database_url: not a PostgreSQL connection string ({e})",
                    source.key()
                ))
            })?;
            // Options and identifiers as the library checks them, on a pool that never
            // connects (no idle connections to keep: r2d2 would open them in the background).
            let pool = troutbox::r2d2::Pool::builder()
                .max_size(1)
                .min_idle(Some(0))
                .build_unchecked(troutbox::r2d2_postgres::PostgresConnectionManager::new(
                    parsed,
                    postgres::NoTls,
                ));
            source
                .outbox(pool, self.service.shutdown_timeout)
                .map_err(|e| ConfigError(format!("{}: {e}", source.key())))?;
            let needed = source.pool_needed();
            if source.pool_size.is_some_and(|size| size < needed) {
                return err(format!(
                    "{}.pool_size: {} is too small: this source needs at least {needed} (workers + 1 for the claim journal, + 1 with notify, + 1 with maintenance)",
                    source.key(),
                    source.pool_size.unwrap_or(0)
                ));
            }
            if source.maintenance && source.keep_sent.is_none() {
                return err(format!(
                    "{}.maintenance: only tables with keep_sent have maintenance to run; remove it or set keep_sent",
                    source.key()
                ));
            }
        }
        self.sink.check()
    }
}

impl Source {
    /// How errors name this source.
    pub fn key(&self) -> String {
        format!("source {:?}", self.name)
    }

    /// The database URL, from wherever the file said.
    pub fn database_url(&self) -> Result<String, ConfigError> {
        secret(
            &format!("{}.database_url", self.key()),
            self.database_url.as_ref(),
            self.database_url_env.as_ref(),
            self.database_url_file.as_ref(),
        )
    }

    pub fn retention(&self) -> Retention {
        match self.keep_sent {
            Some(window) => {
                let r = Retention::keep_sent(window);
                match self.partition_interval {
                    Some(i) => r.partition_interval(i),
                    None => r,
                }
            }
            None => Retention::delete_on_send(),
        }
    }

    /// The pool size the source gets: `pool_size`, or what it needs.
    pub fn pool_size(&self) -> u32 {
        self.pool_size.unwrap_or_else(|| self.pool_needed())
    }

    /// The connections the source's relay and maintenance hold at once.
    fn pool_needed(&self) -> u32 {
        let workers = u32::try_from(self.workers.unwrap_or(1)).unwrap_or(u32::MAX);
        workers
            .saturating_add(1)
            .saturating_add(u32::from(self.notify))
            .saturating_add(u32::from(self.maintenance))
    }

    /// The source's outbox on `pool`, with the file's options, validated by `build`; its
    /// errors are logged with the source's name.
    pub fn outbox(
        &self,
        pool: troutbox::PgPool,
        shutdown_timeout: Duration,
    ) -> Result<Outbox, troutbox::Error> {
        let store = PgStore::new(pool)
            .schema(&self.schema)
            .table(&self.table)
            .retention(self.retention());
        store.validate()?;
        let name = self.name.clone();
        let mut b = Outbox::builder(store)
            .per_key_ordering(self.per_key_ordering)
            .notify(self.notify)
            .shutdown_timeout(shutdown_timeout)
            .error_handler(move |e| log::error!("source {name}: {e}"));
        if let Some(n) = self.workers {
            b = b.workers(n);
        }
        if let Some(n) = self.batch_size {
            b = b.batch_size(n);
        }
        if let Some(n) = self.max_retries {
            b = b.max_retries(n);
        }
        if let Some(n) = self.max_value_size {
            b = b.max_value_size(n);
        }
        if let Some(d) = self.poll_interval {
            b = b.poll_interval(d);
        }
        if let Some(d) = self.send_timeout {
            b = b.send_timeout(d);
        }
        b.build()
    }
}

impl Sink {
    fn check(&self) -> Result<(), ConfigError> {
        match self {
            Sink::Kafka(k) => {
                let topics = [
                    k.topic.is_some(),
                    k.topic_header.is_some(),
                    k.topic_key_separator.is_some(),
                ];
                if topics.iter().filter(|t| **t).count() != 1 {
                    return err("sink.kafka: give exactly one of topic, topic_header and topic_key_separator".into());
                }
                for (property, var) in &k.properties_env {
                    if std::env::var(var).map_or(true, |v| v.is_empty()) {
                        return err(format!(
                            "sink.kafka.properties_env.{property:?}: the environment variable {var} is not set (or empty)"
                        ));
                    }
                }
                super::sink::check_kafka(k)
            }
            Sink::Rabbitmq(r) => {
                secret(
                    "sink.rabbitmq.url",
                    r.url.as_ref(),
                    r.url_env.as_ref(),
                    r.url_file.as_ref(),
                )?;
                super::sink::check_rabbitmq(r)
            }
            Sink::Log(_) | Sink::Discard(_) => Ok(()),
        }
    }
}
