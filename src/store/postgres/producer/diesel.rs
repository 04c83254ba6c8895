//! The producer's statements on a diesel `PgConnection` (feature `diesel`; the public calls
//! are `troutbox::diesel`'s).

use ::diesel::sql_types::{Array, Bool, Bytea, Text};
use ::diesel::{OptionalExtension, PgConnection, QueryableByName, RunQueryDsl};

use super::{ProducerConn, Rows, Target};
use crate::store::postgres::{MakeTls, PgStore};
use crate::Error;

/// The answer of [`Sql::migrated`](crate::store::postgres::sql::Sql).
#[derive(QueryableByName)]
struct Migrated {
    #[diesel(sql_type = Bool)]
    migrated: bool,
}

/// The answer of [`Sql::mode`](crate::store::postgres::sql::Sql).
#[derive(QueryableByName)]
struct Mode {
    #[diesel(sql_type = Bool)]
    per_key_ordering: bool,
}

impl<T: MakeTls> ProducerConn<T> for PgConnection {
    /// Like [`PgStore::recorded_ordering`], except that diesel's errors do not carry the
    /// SQLSTATE that tells a missing table: so it asks whether the tables exist first (one
    /// more round trip, once per outbox).
    fn recorded_ordering(&mut self, store: &PgStore<T>) -> Result<bool, Error> {
        let sql = store.sql()?;
        let map = |source| Error::Diesel {
            context: "reading the outbox table's ordering mode",
            source,
        };
        let migrated = ::diesel::sql_query(&sql.migrations.migrated)
            .get_result::<Migrated>(self)
            .map_err(map)?;
        if !migrated.migrated {
            return Err(Error::NotMigrated {
                table: store.qualified_table(),
                source: None,
            });
        }
        match ::diesel::sql_query(&sql.migrations.mode)
            .bind::<Text, _>(store.table_name())
            .get_result::<Mode>(self)
            .optional()
            .map_err(map)?
        {
            Some(mode) => Ok(mode.per_key_ordering),
            // The tables exist but this one's mode was never recorded: before migration 3.
            None => Err(Error::OutdatedSchema {
                table: store.qualified_table(),
            }),
        }
    }

    fn insert(
        &mut self,
        target: &Target<'_, T>,
        notify: bool,
        rows: Rows<'_>,
    ) -> Result<u64, Error> {
        let context = rows.context();
        let query = ::diesel::sql_query(rows.statement(target, notify));
        let added = match rows {
            Rows::One {
                key,
                value,
                headers,
            } => query
                .bind::<Text, _>(key)
                .bind::<Bytea, _>(value)
                .bind::<Array<Text>, _>(headers)
                .execute(self),
            Rows::Many {
                keys,
                values,
                headers: Some(headers),
            } => query
                .bind::<Array<Text>, _>(keys)
                .bind::<Array<Bytea>, _>(values)
                .bind::<Array<Text>, _>(headers)
                .execute(self),
            Rows::Many {
                keys,
                values,
                headers: None,
            } => query
                .bind::<Array<Text>, _>(keys)
                .bind::<Array<Bytea>, _>(values)
                .execute(self),
        }
        .map_err(|source| Error::Diesel { context, source })?;
        Ok(added as u64)
    }
}
