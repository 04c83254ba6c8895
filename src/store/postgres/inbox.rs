//! The inbox's statements run: its migration, and the receive statement on the caller's
//! connection, unprepared or prepared. What the answers mean (first or duplicate, which
//! error) is the inbox's (`crate::inbox`).

use postgres::types::Type;
use postgres::{GenericClient, Statement};

use super::sql::inbox::{InboxSql, INBOXES_TABLE};
use super::sql::{SCHEMA_EXISTS, TABLE_EXISTS};
use super::{begin_migration, exists, Clock, MakeTls, PgPool};
use crate::Error;

/// What a table's record in the schema's `troutbox_inboxes` says: its version and window.
pub(crate) struct Recorded {
    pub(crate) version: i32,
    /// The window in seconds, 0 for forever.
    pub(crate) window: i64,
}

/// Creates the schema, the schema's table of inboxes and the inbox table `table` with
/// `window` (seconds, 0 for forever) if they are missing, in one migration transaction
/// (see [`begin_migration`]). An existing table's record goes to `check` first, which
/// refuses one this build cannot use; nothing is committed then. True when it created the
/// table.
pub(crate) fn migrate<T: MakeTls>(
    pool: &PgPool<T>,
    schema: &str,
    table: &str,
    sql: &InboxSql,
    window: i64,
    record: i32,
    check: impl FnOnce(Recorded) -> Result<(), Error>,
) -> Result<bool, Error> {
    let context = "migrating the inbox table";
    let map = |error| Error::Database { context, error };
    let mut conn = pool.get().map_err(Error::pool(context))?;
    let mut tx = begin_migration(&mut conn, schema).map_err(map)?;
    if !exists(&mut tx, SCHEMA_EXISTS, &[&schema]).map_err(map)? {
        tx.batch_execute(&sql.create_schema).map_err(map)?;
    }
    if !exists(&mut tx, TABLE_EXISTS, &[&schema, &INBOXES_TABLE]).map_err(map)? {
        tx.batch_execute(&sql.create_inboxes).map_err(map)?;
    }
    let recorded = tx.query_opt(&sql.recorded, &[&table]).map_err(map)?;
    let created = match recorded {
        None => {
            tx.batch_execute(&sql.migration_v1).map_err(map)?;
            tx.execute(&sql.record, &[&table, &record, &window])
                .map_err(map)?;
            true
        }
        Some(row) => {
            check(Recorded {
                version: row.try_get(0).map_err(map)?,
                window: row.try_get(1).map_err(map)?,
            })?;
            false
        }
    };
    tx.commit().map_err(map)?;
    Ok(created)
}

/// The receive statement for an inbox with (or without) an injected clock, and its
/// parameters' types.
fn receive_text(sql: &InboxSql, clocked: bool) -> (&str, &'static [Type]) {
    match (clocked, &sql.receive_at) {
        (true, Some(receive_at)) => (receive_at, &[Type::TEXT, Type::TEXT, Type::TIMESTAMPTZ]),
        _ => (&sql.receive, &[Type::TEXT, Type::TEXT]),
    }
}

/// Runs the receive statement (`prepared`, or unprepared) on `client`: the rows it inserted.
pub(crate) fn receive(
    client: &mut impl GenericClient,
    sql: &InboxSql,
    clock: Option<&Clock>,
    prepared: Option<&Statement>,
    consumer: &str,
    message_id: &str,
) -> Result<u64, postgres::Error> {
    let now = clock
        .filter(|_| sql.receive_at.is_some())
        .map(|clock| clock());
    match (prepared, &now) {
        (Some(statement), Some(now)) => client.execute(statement, &[&consumer, &message_id, now]),
        (Some(statement), None) => client.execute(statement, &[&consumer, &message_id]),
        (None, Some(now)) => {
            let (text, _) = receive_text(sql, true);
            client.execute(text, &[&consumer, &message_id, now])
        }
        (None, None) => client.execute(&sql.receive, &[&consumer, &message_id]),
    }
}

/// Prepares the receive statement on `client`'s connection.
pub(crate) fn prepare_receive(
    client: &mut impl GenericClient,
    sql: &InboxSql,
    clocked: bool,
) -> Result<Statement, postgres::Error> {
    let (text, types) = receive_text(sql, clocked);
    client.prepare_typed(text, types)
}
