//! What the operator API reports, as plain data a backend produces: the backlog
//! ([`PgStore::backlog`](crate::PgStore::backlog)(crate::PgStore::backlog)), blocked keys
//! ([`PgStore::blocked_keys`](crate::PgStore::blocked_keys)(crate::PgStore::blocked_keys)) and what a maintenance run did
//! ([`PgStore::run_maintenance_once`](crate::PgStore::run_maintenance_once)(crate::PgStore::run_maintenance_once)).

use std::time::Duration;

use time::OffsetDateTime;

/// A snapshot of the outbox table, from [`PgStore::backlog`](crate::PgStore::backlog).
///
/// With the `serde` feature it implements `Serialize`: `{"pending": 5, "dead": 0, "sent": 0,
/// "oldest_pending": "2025-01-31T12:00:00.123456Z"}` (RFC 3339, or `null`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Backlog {
    /// Messages waiting to be sent, including those waiting out a retry backoff and those
    /// claimed by a relay right now.
    pub pending: i64,
    /// Messages that used up their retries.
    pub dead: i64,
    /// Sent messages still retained ([`Retention::keep_sent`](crate::Retention::keep_sent);
    /// always 0 otherwise).
    pub sent: i64,
    /// Creation time of the oldest pending message: the relay's lag.
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "time::serde::rfc3339::option::serialize")
    )]
    pub oldest_pending: Option<OffsetDateTime>,
}

/// A key whose oldest pending message (its head) has failed at least once, so that the
/// key's later messages wait for it (per-key ordering). From [`PgStore::blocked_keys`](crate::PgStore::blocked_keys).
///
/// With the `serde` feature it implements `Serialize`, as an object of its fields,
/// `next_attempt_at` in RFC 3339 and `blocked_for` as `blocked_for_seconds` (a float).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BlockedKey {
    /// The key.
    pub key: String,
    /// The id of the message the key waits for.
    pub head_id: i64,
    /// How many times that message has failed.
    pub attempts: u32,
    /// The error text of its last failed attempt.
    pub last_error: Option<String>,
    /// When the relay tries it again (database clock).
    #[cfg_attr(
        feature = "serde",
        serde(serialize_with = "time::serde::rfc3339::serialize")
    )]
    pub next_attempt_at: OffsetDateTime,
    /// The head's age (since its transaction added it): the key has been waiting on it at
    /// most this long. Troutbox does not record when a message first failed.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "blocked_for_seconds", serialize_with = "crate::ser::seconds")
    )]
    pub blocked_for: Duration,
    /// How many pending messages of the key wait behind it.
    pub waiting: u64,
}

/// What one maintenance run did, from [`PgStore::run_maintenance_once`](crate::PgStore::run_maintenance_once).
///
/// With the `serde` feature it implements `Serialize`, as an object of its fields, each
/// `kept` entry as `{"partition": name, "unsent": count}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MaintenanceReport {
    /// Another instance was maintaining this table at the same moment, so this run did
    /// nothing (it will be that instance's work).
    pub locked_out: bool,
    /// Partitions created (ahead of time, or for rows found in the DEFAULT partition, which
    /// were moved into them).
    pub created: Vec<String>,
    /// Expired partitions dropped: they held only sent messages.
    pub dropped: Vec<String>,
    /// Expired partitions kept because they still hold pending or dead messages, with how
    /// many. They are dropped by a later run once those are sent, or purged.
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::ser::kept"))]
    pub kept: Vec<(String, i64)>,
    /// Partitions whose creation or drop was put off because the table stayed busy (a lock
    /// not granted within 100 ms): the next run tries again. Rows meanwhile land in the
    /// DEFAULT partition, or stay in the expired one; nothing is lost either way.
    pub deferred: Vec<String>,
}
