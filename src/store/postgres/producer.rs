//! The producer's statements on the caller's connection: the INSERT a producer call needs,
//! run unprepared (parse, bind and execute in one round trip) or prepared, on a `postgres`
//! client or (feature `diesel`) a diesel `PgConnection`. The checks, limits, mode check,
//! headers and notification decision around them are the outbox's (`outbox::producer`).

use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Statement};

use super::sql::Sql;
use super::{MakeTls, PgStore};
use crate::Error;

#[cfg(feature = "diesel")]
mod diesel;

/// What a producer call inserts into: the store, its statements, and the outbox's mode.
pub(crate) struct Target<'a, T: MakeTls> {
    pub(crate) store: &'a PgStore<T>,
    pub(crate) sql: &'a Sql,
    /// Per-key ordering (the INSERTs take the key's lock).
    pub(crate) ordered: bool,
}

/// The rows of one producer call, checked and ready for [`ProducerConn::insert`].
pub(crate) enum Rows<'a> {
    /// One message; its headers as one flat array of names and values.
    One {
        key: &'a str,
        value: &'a [u8],
        headers: &'a [&'a str],
    },
    /// Many messages; each one's headers as an array literal ([`encode_headers`]), or none
    /// for any of them.
    Many {
        keys: &'a [&'a str],
        values: &'a [&'a [u8]],
        headers: Option<&'a [String]>,
    },
}

impl Rows<'_> {
    /// Which of the three INSERTs (one, many, many without headers) the rows need.
    pub(crate) fn pick<S>(&self, (one, many, many_plain): (S, S, S)) -> S {
        match self {
            Rows::One { .. } => one,
            Rows::Many {
                headers: Some(_), ..
            } => many,
            Rows::Many { headers: None, .. } => many_plain,
        }
    }

    /// The SQL text of the INSERT the rows need (see `ProduceSql::inserts`).
    fn statement<'s, T: MakeTls>(&self, target: &Target<'s, T>, notify: bool) -> &'s str {
        self.pick(target.sql.produce.inserts(notify, target.ordered))
    }

    /// What the producer was doing, for errors.
    pub(crate) fn context(&self) -> &'static str {
        match self {
            Rows::One { .. } => "adding a message to the outbox",
            Rows::Many { .. } => "adding messages to the outbox",
        }
    }
}

/// A connection the producer's statements run on: a `postgres` client ([`PgConn`]) or, with
/// the `diesel` feature, a diesel connection. The checks, limits, mode check, headers and
/// notification decision are the outbox's, the same on every connection.
pub(crate) trait ProducerConn<T: MakeTls> {
    /// Whether the table is recorded as ordered, or why that cannot be read
    /// ([`Error::NotMigrated`], [`Error::OutdatedSchema`], ...).
    fn recorded_ordering(&mut self, store: &PgStore<T>) -> Result<bool, Error>;

    /// Runs the INSERT that `rows` need, with the notification signal or not, and returns
    /// how many rows it added.
    fn insert(
        &mut self,
        target: &Target<'_, T>,
        notify: bool,
        rows: Rows<'_>,
    ) -> Result<u64, Error>;
}

/// A `postgres` client, with the statements of a `PreparedProducer` prepared on its
/// connection ([`ProducerStatements`]) or unnamed statements (parse, bind and execute in one
/// round trip).
pub(crate) struct PgConn<'c, C> {
    client: &'c mut C,
    prepared: Option<&'c ProducerStatements>,
}

impl<'c, C> PgConn<'c, C> {
    pub(crate) fn new(client: &'c mut C, prepared: Option<&'c ProducerStatements>) -> Self {
        PgConn { client, prepared }
    }
}

impl<C: GenericClient, T: MakeTls> ProducerConn<T> for PgConn<'_, C> {
    fn recorded_ordering(&mut self, store: &PgStore<T>) -> Result<bool, Error> {
        store.recorded_ordering(self.client)
    }

    fn insert(
        &mut self,
        target: &Target<'_, T>,
        notify: bool,
        rows: Rows<'_>,
    ) -> Result<u64, Error> {
        let params: Vec<(&(dyn ToSql + Sync), Type)> = match &rows {
            Rows::One {
                key,
                value,
                headers,
            } => vec![
                (key, Type::TEXT),
                (value, Type::BYTEA),
                (headers, Type::TEXT_ARRAY),
            ],
            Rows::Many {
                keys,
                values,
                headers,
            } => {
                let mut params: Vec<(&(dyn ToSql + Sync), Type)> =
                    vec![(keys, Type::TEXT_ARRAY), (values, Type::BYTEA_ARRAY)];
                if let Some(headers) = headers {
                    params.push((headers, Type::TEXT_ARRAY));
                }
                params
            }
        };
        let result = match self.prepared {
            Some(prepared) => {
                let i = prepared.pick(notify);
                let statement = rows.pick((&i.one, &i.many, &i.many_plain));
                let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(p, _)| *p).collect();
                self.client.execute(statement, &values)
            }
            None => self
                .client
                .execute_typed(rows.statement(target, notify), &params),
        };
        result.map_err(target.store.db_error(rows.context()))
    }
}

/// The three INSERTs, prepared on one connection.
#[derive(Debug, Clone)]
pub(crate) struct PreparedInserts {
    one: Statement,
    many: Statement,
    many_plain: Statement,
}

/// The producer's INSERTs prepared on one connection: without the notification signal, and
/// with it when the outbox has `notify(true)`.
#[derive(Debug, Clone)]
pub(crate) struct ProducerStatements {
    plain: PreparedInserts,
    /// The same statements carrying the notification signal, with `notify(true)`.
    loud: Option<PreparedInserts>,
}

impl ProducerStatements {
    /// Prepares the producer's statements on `client` for `target` (and their signalling
    /// twins when `notify`).
    pub(crate) fn prepare<C: GenericClient, T: MakeTls>(
        client: &mut C,
        target: &Target<'_, T>,
        notify: bool,
    ) -> Result<ProducerStatements, Error> {
        let map = || target.store.db_error("preparing the producer statements");
        let mut prepare = |notify: bool| -> Result<PreparedInserts, Error> {
            let (one, many, many_plain) = target.sql.produce.inserts(notify, target.ordered);
            let text = [Type::TEXT, Type::BYTEA, Type::TEXT_ARRAY];
            let arrays = [Type::TEXT_ARRAY, Type::BYTEA_ARRAY, Type::TEXT_ARRAY];
            Ok(PreparedInserts {
                one: client.prepare_typed(one, &text).map_err(map())?,
                many: client.prepare_typed(many, &arrays).map_err(map())?,
                many_plain: client
                    .prepare_typed(many_plain, &arrays[..2])
                    .map_err(map())?,
            })
        };
        let plain = prepare(false)?;
        let loud = if notify { Some(prepare(true)?) } else { None };
        Ok(ProducerStatements { plain, loud })
    }

    fn pick(&self, notify: bool) -> &PreparedInserts {
        match (&self.loud, notify) {
            (Some(loud), true) => loud,
            _ => &self.plain,
        }
    }
}
