//! The producer side: adding messages inside the caller's own transaction. The calls are
//! `Outbox`'s (in `outbox/mod.rs`); the work they do is here.

use std::sync::atomic::Ordering;

use postgres::{GenericClient, NoTls};

use super::Outbox;
use crate::config::{
    MAX_BYTES_PER_CALL, MAX_HEADERS, MAX_HEADER_BYTES, MAX_KEY_LEN, MAX_MESSAGES_PER_CALL,
};
use crate::store::postgres::producer::{PgConn, ProducerConn, ProducerStatements, Rows, Target};
use crate::store::postgres::sql::encode_headers;
use crate::store::postgres::MakeTls;
use crate::Error;

#[cfg(feature = "diesel")]
#[cfg_attr(docsrs, doc(cfg(feature = "diesel")))]
pub mod diesel;

/// A message to add with [`Outbox::add_messages`] or [`Outbox::add`]: key, value and
/// optional headers, all borrowed.
///
/// ```
/// use troutbox::NewMessage;
///
/// let msg = NewMessage::new("order-42", b"{\"id\":42}")
///     .header("content-type", "application/json");
/// assert_eq!(msg.key(), "order-42");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage<'a> {
    key: &'a str,
    value: &'a [u8],
    headers: Vec<(&'a str, &'a str)>,
}

impl<'a> NewMessage<'a> {
    /// A message with `key` and `value` and no headers.
    #[must_use]
    pub fn new(key: &'a str, value: &'a [u8]) -> NewMessage<'a> {
        NewMessage {
            key,
            value,
            headers: Vec::new(),
        }
    }

    /// Adds a header, for example a W3C `traceparent`. Names may repeat; order is kept.
    #[must_use]
    pub fn header(mut self, name: &'a str, value: &'a str) -> NewMessage<'a> {
        self.headers.push((name, value));
        self
    }

    /// The key.
    pub fn key(&self) -> &'a str {
        self.key
    }

    /// The value.
    pub fn value(&self) -> &'a [u8] {
        self.value
    }

    /// The headers, in the order they were added.
    pub fn headers(&self) -> &[(&'a str, &'a str)] {
        &self.headers
    }

    /// The bytes of the headers, names and values together.
    pub(crate) fn header_bytes(&self) -> usize {
        self.headers.iter().map(|(n, v)| n.len() + v.len()).sum()
    }

    /// Checks a call of several messages: its size (at most [`MAX_MESSAGES_PER_CALL`]
    /// messages and [`MAX_BYTES_PER_CALL`] bytes), then each message.
    pub(crate) fn validate_call(
        messages: &[NewMessage<'_>],
        max_value_size: usize,
    ) -> Result<(), Error> {
        if messages.len() > MAX_MESSAGES_PER_CALL {
            return Err(Error::CallTooLarge {
                what: format!("{} messages", messages.len()),
                max: MAX_MESSAGES_PER_CALL,
            });
        }
        let bytes: usize = messages
            .iter()
            .map(|m| m.key.len() + m.value.len() + m.header_bytes())
            .sum();
        if bytes > MAX_BYTES_PER_CALL {
            return Err(Error::CallTooLarge {
                what: format!("{bytes} bytes"),
                max: MAX_BYTES_PER_CALL,
            });
        }
        messages.iter().try_for_each(|m| m.validate(max_value_size))
    }

    /// Checks what PostgreSQL would reject, or what the outbox refuses, before any round trip.
    pub(crate) fn validate(&self, max_value_size: usize) -> Result<(), Error> {
        if let Some(position) = self.key.bytes().position(|b| b == 0) {
            return Err(Error::KeyContainsNul { position });
        }
        if self.key.len() > MAX_KEY_LEN {
            return Err(Error::KeyTooLong {
                len: self.key.len(),
                max: MAX_KEY_LEN,
            });
        }
        if self.value.len() > max_value_size {
            return Err(Error::ValueTooLarge {
                len: self.value.len(),
                max: max_value_size,
            });
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(Error::InvalidHeader {
                name: String::new(),
                reason: "the message has more than MAX_HEADERS (100) headers",
            });
        }
        if self.header_bytes() > MAX_HEADER_BYTES {
            return Err(Error::InvalidHeader {
                name: String::new(),
                reason: "the headers hold more than MAX_HEADER_BYTES (64 KiB), names and values together",
            });
        }
        for (name, value) in &self.headers {
            let invalid = |reason| {
                Err(Error::InvalidHeader {
                    name: name.replace('\0', "\\0"),
                    reason,
                })
            };
            if name.is_empty() {
                return invalid("the name is empty");
            }
            if name.contains('\0') {
                return invalid("the name contains a NUL byte, which PostgreSQL text cannot store");
            }
            if value.contains('\0') {
                return invalid(
                    "the value contains a NUL byte, which PostgreSQL text cannot store",
                );
            }
        }
        Ok(())
    }
}

// The work behind `Outbox`'s producer calls (add_message, add, add_messages, prepare, in
// outbox/mod.rs where a reader looks for them): validation, the INSERTs, the signal.
impl<T: MakeTls> Outbox<T> {
    /// The single-message INSERT: checked, then run on `conn`.
    fn insert_one(
        &self,
        conn: &mut impl ProducerConn<T>,
        message: &NewMessage<'_>,
    ) -> Result<(), Error> {
        message.validate(self.inner.config.max_value_size)?;
        self.check_mode(conn)?;
        let injected = self.trace_headers();
        let flat: Vec<&str> = with_injected(&message.headers, &injected)
            .flat_map(|(n, v)| [n, v])
            .collect();
        let rows = Rows::One {
            key: message.key,
            value: message.value,
            headers: &flat,
        };
        conn.insert(&self.target(), self.should_notify(), rows)?;
        self.nudge_relay();
        Ok(())
    }

    /// The many-message INSERT: all checked, then run on `conn` in one statement.
    fn insert_many<'m, I>(&self, conn: &mut impl ProducerConn<T>, messages: I) -> Result<u64, Error>
    where
        I: IntoIterator<Item = NewMessage<'m>>,
    {
        let messages: Vec<NewMessage<'m>> = messages.into_iter().collect();
        if messages.is_empty() {
            return Ok(0);
        }
        NewMessage::validate_call(&messages, self.inner.config.max_value_size)?;
        self.check_mode(conn)?;
        let keys: Vec<&str> = messages.iter().map(|m| m.key).collect();
        let values: Vec<&[u8]> = messages.iter().map(|m| m.value).collect();
        let injected = self.trace_headers();
        // The common case without any header sends none (`many_plain`).
        let headers: Option<Vec<String>> =
            (!injected.is_empty() || messages.iter().any(|m| !m.headers.is_empty())).then(|| {
                messages
                    .iter()
                    .map(|m| encode_headers(with_injected(&m.headers, &injected)))
                    .collect()
            });
        let rows = Rows::Many {
            keys: &keys,
            values: &values,
            headers: headers.as_deref(),
        };
        let added = conn.insert(&self.target(), self.should_notify(), rows)?;
        self.nudge_relay();
        Ok(added)
    }

    /// [`Outbox::add`]'s work on a `postgres` client.
    pub(super) fn add_on<C: GenericClient>(
        &self,
        client: &mut C,
        message: &NewMessage<'_>,
    ) -> Result<(), Error> {
        self.insert_one(&mut PgConn::new(client, None), message)
    }

    /// [`Outbox::add_messages`]'s work on a `postgres` client.
    pub(super) fn add_messages_on<'m, C, I>(
        &self,
        client: &mut C,
        messages: I,
    ) -> Result<u64, Error>
    where
        C: GenericClient,
        I: IntoIterator<Item = NewMessage<'m>>,
    {
        self.insert_many(&mut PgConn::new(client, None), messages)
    }

    /// [`Outbox::prepare`]'s work: the producer's statements prepared on `client`.
    pub(super) fn prepare_on<C: GenericClient>(
        &self,
        client: &mut C,
    ) -> Result<PreparedProducer<T>, Error> {
        self.check_mode(&mut PgConn::new(client, None))?;
        let statements =
            ProducerStatements::prepare(client, &self.target(), self.inner.config.notify)?;
        Ok(PreparedProducer {
            outbox: self.clone(),
            statements,
        })
    }

    /// What this outbox's producer calls insert into.
    fn target(&self) -> Target<'_, T> {
        Target {
            store: &self.inner.store,
            sql: &self.inner.sql,
            ordered: self.inner.config.ordered,
        }
    }

    /// Checks, once per outbox (and its clones), that the table's recorded ordering mode is
    /// the outbox's: producers that disagree with the relays would lose the order silently.
    /// One query, in the caller's transaction, the first time only (a failed check is
    /// checked again next time).
    fn check_mode(&self, conn: &mut impl ProducerConn<T>) -> Result<(), Error> {
        if self.inner.mode_checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let store = &self.inner.store;
        store.compare_ordering(self.inner.config.ordered, conn.recorded_ordering(store)?)?;
        self.inner.mode_checked.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether this INSERT carries the notification signal: with `notify(true)`, one INSERT
    /// per [`NOTIFY_COALESCE`] per outbox (shared by its clones and prepared producers).
    fn should_notify(&self) -> bool {
        if !self.inner.config.notify {
            return false;
        }
        let now = u64::try_from(self.inner.epoch.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.inner.notified_at.load(Ordering::Relaxed);
        let window = NOTIFY_COALESCE.as_micros() as u64;
        if last != 0 && now.saturating_sub(last) < window {
            return false;
        }
        // Another thread that wins the race carries the signal instead.
        self.inner
            .notified_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Trace-context headers to add to new messages: with the `opentelemetry` feature, the
    /// current context through the global propagator; otherwise none.
    fn trace_headers(&self) -> Vec<(String, String)> {
        #[cfg(feature = "opentelemetry")]
        if self.inner.config.propagate_trace_context {
            return crate::observability::otel::current_trace_headers();
        }
        Vec::new()
    }

    /// Tells an idle local relay worker to poll soon. The producer's transaction has not
    /// committed yet, so the worker may find nothing; its adaptive polling then retries after
    /// 1 ms, 2 ms, 4 ms, ... which catches the commit quickly without any NOTIFY in the
    /// producer's transaction.
    fn nudge_relay(&self) {
        let _ = self.inner.wake_tx.try_send(());
    }
}

/// With `notify(true)`, how long after an INSERT that carried the notification signal the
/// outbox's next INSERTs go without it. A relay woken by the first polls again within
/// milliseconds (its idle sleep restarts at 1 ms), so the signal would buy nothing; leaving it
/// out spares those transactions PostgreSQL's serialized notifying commit, which busy
/// producers would otherwise pay on every transaction (BENCHMARKS.md).
pub(crate) const NOTIFY_COALESCE: std::time::Duration = std::time::Duration::from_millis(5);

/// The message's own headers, then the injected ones whose names it does not already use.
fn with_injected<'h>(
    own: &'h [(&'h str, &'h str)],
    injected: &'h [(String, String)],
) -> impl Iterator<Item = (&'h str, &'h str)> + 'h {
    let extra = injected
        .iter()
        .filter(move |(name, _)| !own.iter().any(|(n, _)| n == name))
        .map(|(n, v)| (n.as_str(), v.as_str()));
    own.iter().copied().chain(extra)
}

/// The producer side of an [`Outbox`] with its statements prepared on one connection, from
/// [`Outbox::prepare`]. Same methods and guarantees as the outbox's own; use it only on the
/// connection it was prepared on (and its transactions).
// No PartialEq: prepared statements belong to one connection; equality has no meaning here.
#[derive(Debug, Clone)]
pub struct PreparedProducer<T: MakeTls = NoTls> {
    outbox: Outbox<T>,
    statements: ProducerStatements,
}

impl<T: MakeTls> PreparedProducer<T> {
    /// Like [`Outbox::add_message`], with the prepared statement.
    pub fn add_message<C: GenericClient>(
        &self,
        client: &mut C,
        key: &str,
        value: &[u8],
    ) -> Result<(), Error> {
        self.add(client, &NewMessage::new(key, value))
    }

    /// Like [`Outbox::add`], with the prepared statement.
    pub fn add<C: GenericClient>(
        &self,
        client: &mut C,
        message: &NewMessage<'_>,
    ) -> Result<(), Error> {
        self.outbox
            .insert_one(&mut PgConn::new(client, Some(&self.statements)), message)
    }

    /// Like [`Outbox::add_messages`], with the prepared statement.
    pub fn add_messages<'m, C, I>(&self, client: &mut C, messages: I) -> Result<u64, Error>
    where
        C: GenericClient,
        I: IntoIterator<Item = NewMessage<'m>>,
    {
        self.outbox
            .insert_many(&mut PgConn::new(client, Some(&self.statements)), messages)
    }
}
