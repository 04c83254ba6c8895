//! Producing: the INSERTs `add_message`, `add` and `add_messages` run (plain, with the
//! notification signal, with per-key ordering), the notification channel, and the SQL
//! producer function that clients in any language call (migration 5).

use crate::config::{MAX_HEADERS, MAX_HEADER_BYTES, MAX_KEY_LEN};
use crate::store::ident::Ident;
use crate::store::postgres::sql::TABLES_TABLE;
use crate::store::retention::Retention;

/// The producer's three INSERT statements, as [`ProduceSql::inserts`] chooses them.
#[derive(Debug)]
pub(crate) struct Inserts {
    pub(crate) one: String,
    pub(crate) many: String,
    pub(crate) many_plain: String,
}

/// The producer's three INSERTs for table `t`, with `notify` (a `pg_notify(...)` call) and
/// per-key ordering (`order_seed`, the per-key lock's hash seed) as asked.
///
/// Plain: one round trip, no lock beyond the new row's own. No RETURNING: a producer role
/// needs nothing but INSERT on the table. The batch statements insert any number of rows,
/// ids drawn in the caller's order; headers arrive as one array literal per row (see
/// [`encode_headers`]) because SQL arrays cannot nest ragged arrays, and the common case
/// without headers sends none.
///
/// With notify, the statement also signals the table's channel (no extra round trip).
///
/// With per-key ordering, the statement first takes the transaction-scoped advisory lock of
/// each key it inserts, in ascending hash order (two producers of the same keys never
/// deadlock), and only then draws the ids: the ids of one key follow the commit order of
/// their transactions, because a second transaction of the key waits for the first to end
/// before it draws its id. The locks are in a MATERIALIZED CTE that the INSERT's one-time
/// filter reads before producing any row (the ids are drawn in that row's projection);
/// `tests/ordering.rs` checks the order of events, not just this reasoning. The single-key
/// form of the lock, on a 64-bit hash seeded by the table's name.
fn inserts(t: &str, notify: Option<&str>, order_seed: Option<&str>) -> Inserts {
    let mut ctes = Vec::new();
    let mut ctes_many = Vec::new();
    if let Some(seed) = order_seed {
        ctes.push(format!(
            "locked AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended($1::text, {seed})))"
        ));
        ctes_many.push(format!(
            "locked AS MATERIALIZED (SELECT count(*) FROM (
                SELECT pg_advisory_xact_lock(h) FROM (
                    SELECT DISTINCT hashtextextended(k, {seed}) AS h FROM unnest($1::text[]) AS k
                    ORDER BY h OFFSET 0) AS hashes) AS l)"
        ));
    }
    if let Some(notify) = notify {
        ctes.push(format!("notified AS MATERIALIZED (SELECT {notify})"));
        ctes_many.push(format!("notified AS MATERIALIZED (SELECT {notify})"));
    }
    if ctes.is_empty() {
        return Inserts {
            one: format!("INSERT INTO {t} (key, value, headers) VALUES ($1, $2, $3)"),
            many: format!(
                "INSERT INTO {t} (key, value, headers)
                 SELECT k, v, h::text[]
                 FROM unnest($1::text[], $2::bytea[], $3::text[]) WITH ORDINALITY AS u(k, v, h, n)
                 ORDER BY n"
            ),
            many_plain: format!(
                "INSERT INTO {t} (key, value)
                 SELECT k, v
                 FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(k, v, n)
                 ORDER BY n"
            ),
        };
    }
    let with = format!("WITH {}", ctes.join(", "));
    let with_many = format!("WITH {}", ctes_many.join(", "));
    let gate = if order_seed.is_some() && notify.is_some() {
        "EXISTS (SELECT FROM locked) AND EXISTS (SELECT FROM notified)"
    } else if order_seed.is_some() {
        "EXISTS (SELECT FROM locked)"
    } else {
        "EXISTS (SELECT FROM notified)"
    };
    Inserts {
        one: format!(
            "{with}
             INSERT INTO {t} (key, value, headers)
             SELECT $1::text, $2::bytea, $3::text[] WHERE {gate}"
        ),
        many: format!(
            "{with_many}
             INSERT INTO {t} (key, value, headers)
             SELECT k, v, h::text[]
             FROM unnest($1::text[], $2::bytea[], $3::text[]) WITH ORDINALITY AS u(k, v, h, n)
             WHERE {gate}
             ORDER BY n"
        ),
        many_plain: format!(
            "{with_many}
             INSERT INTO {t} (key, value)
             SELECT k, v
             FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(k, v, n)
             WHERE {gate}
             ORDER BY n"
        ),
    }
}

/// Subscribes the relay's listening connection to the table's channel (a name the server
/// built from validated identifiers, checked again by the listener).
pub(crate) fn listen(channel: &str) -> String {
    format!("LISTEN \"{channel}\"")
}

/// Unsubscribes a listening connection before it goes back to the pool.
pub(crate) const UNLISTEN: &str = "UNLISTEN *";

/// Encodes header pairs as one PostgreSQL array literal, `{"name","value",...}`: every element
/// quoted, with `"` and `\` backslash-escaped, so no content can change the array's shape.
pub(crate) fn encode_headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::from("{");
    let mut first = true;
    for (name, value) in pairs {
        for element in [name, value] {
            if !first {
                out.push(',');
            }
            first = false;
            out.push('"');
            for c in element.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
    }
    out.push('}');
    out
}

#[derive(Debug)]
pub(crate) struct ProduceSql {
    /// The producer's INSERTs: plain, with `notify(true)`, with per-key ordering, and with
    /// both (see [`ProduceSql::inserts`]).
    plain_inserts: Inserts,
    notify_inserts: Inserts,
    ordered_inserts: Inserts,
    ordered_notify_inserts: Inserts,
    /// The name of the table's notification channel (see [`ProduceSql::inserts`]).
    pub(crate) notify_channel: String,
    /// Creates (or replaces) the table's SQL producer function (see [`add_function`]).
    pub(crate) add_function: String,
}

/// The suffix of the SQL producer function's name: table `orders_outbox` has the function
/// `orders_outbox_add` in its schema. Named per table because a schema may hold several
/// outbox tables (each with its own mode, limit and grants); the suffix is shorter than the
/// index suffixes the table name already leaves room for (see `ident::DERIVED_SUFFIX_LEN`).
pub(crate) const ADD_FUNCTION_SUFFIX: &str = "_add";

/// The SQL producer function of table `t` (schema `s`, plain table name `table`), for
/// clients that cannot link this crate: `<table>_add(key text, value bytea, headers text[]
/// DEFAULT '{}')`, called inside the client's own transaction. It does what
/// `Outbox::add` does, in the same order: the same checks with the same limits (the
/// value's from the table's row in the schema's table of modes, where `Outbox::migrate`
/// records it), the per-key lock with the Rust producers' `order_seed` when the table is
/// recorded as ordered (so Rust and SQL producers of one key queue behind each other), the
/// INSERT of the three producer columns, and the `notify` signal when the table is recorded
/// as notifying.
///
/// SECURITY DEFINER, owned by the role that migrates: a producer role needs only USAGE on
/// the schema and EXECUTE on the function, and can neither read the table nor choose the
/// columns the relay relies on. Hence the fixed `search_path` (every name in the body is
/// schema-qualified anyway) and the REVOKE from PUBLIC, which PostgreSQL grants EXECUTE on
/// every new function by default. Not STRICT: a NULL argument is an error, never a silently
/// skipped message. The mode is read on every call (one primary-key probe) rather than
/// compiled into the body: converting a table to ordered, or recording notify, then needs
/// no DDL, and a call never acts on a stale mode.
fn add_function(s: &str, table: &Ident, t: &str, notify: &str, order_seed: &str) -> String {
    let name = table.as_str();
    let f = format!("{s}.\"{name}{ADD_FUNCTION_SUFFIX}\"");
    format!(
        r#"CREATE OR REPLACE FUNCTION {f}(key text, value bytea, headers text[] DEFAULT '{{}}')
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $troutbox$
DECLARE
    ordered boolean;
    notifies boolean;
    max_value integer;
    n integer;
BEGIN
    SELECT per_key_ordering, sql_notify, sql_max_value_size INTO ordered, notifies, max_value
    FROM {s}."{TABLES_TABLE}" WHERE table_name = '{name}';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'troutbox: outbox table {name} has no recorded mode'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'run the migration (Outbox::migrate, or troutbox migrate) again';
    END IF;
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL THEN
        RAISE EXCEPTION 'troutbox: the message''s % is NULL',
            CASE WHEN $1 IS NULL THEN 'key' WHEN $2 IS NULL THEN 'value' ELSE 'headers' END
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'give a key (it may be empty), a value, and headers as an array of name, value pairs (or leave them out)';
    END IF;
    IF octet_length($1) > {MAX_KEY_LEN} THEN
        RAISE EXCEPTION 'troutbox: the key is % bytes long, the limit is {MAX_KEY_LEN}', octet_length($1)
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'use a shorter key, for example an id or a hash of the long one';
    END IF;
    IF octet_length($2) > max_value THEN
        RAISE EXCEPTION 'troutbox: the value is % bytes, over this outbox''s max_value_size of % bytes', octet_length($2), max_value
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'send a smaller value (or a reference to it), or raise the limit: Outbox::builder(..).max_value_size(n) then migrate()';
    END IF;
    IF coalesce(array_ndims($3), 1) <> 1 OR coalesce(array_lower($3, 1), 1) <> 1 THEN
        RAISE EXCEPTION 'troutbox: headers must be a one-dimensional array from index 1, name then value for each header'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'for example ARRAY[''traceparent'', ''00-...'']';
    END IF;
    n := coalesce(array_length($3, 1), 0);
    IF n % 2 <> 0 THEN
        RAISE EXCEPTION 'troutbox: headers have % elements, an odd number: each header is a name followed by its value', n
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'give the headers as ARRAY[name1, value1, name2, value2, ...]';
    END IF;
    IF n / 2 > {MAX_HEADERS} THEN
        RAISE EXCEPTION 'troutbox: the message has % headers, more than MAX_HEADERS ({MAX_HEADERS})', n / 2
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'send fewer headers, or move the data into the value';
    END IF;
    IF array_position($3, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'troutbox: header element % is NULL', array_position($3, NULL)
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'give every header a name and a value (an empty string if need be)';
    END IF;
    IF (SELECT sum(octet_length(h)) FROM unnest($3) AS h) > {MAX_HEADER_BYTES} THEN
        RAISE EXCEPTION 'troutbox: the headers hold more than MAX_HEADER_BYTES ({MAX_HEADER_BYTES} bytes), names and values together'
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'send smaller headers, or move the data into the value';
    END IF;
    IF EXISTS (SELECT FROM unnest($3) WITH ORDINALITY AS u(h, i) WHERE i % 2 = 1 AND h = '') THEN
        RAISE EXCEPTION 'troutbox: a header name is empty'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'give every header a non-empty name';
    END IF;
    -- Per-key ordering: the key's lock before the id is drawn, as the Rust producers do.
    IF ordered THEN
        PERFORM pg_advisory_xact_lock(hashtextextended($1, {order_seed}));
    END IF;
    INSERT INTO {t} (key, value, headers) VALUES ($1, $2, $3);
    IF notifies THEN
        PERFORM {notify};
    END IF;
END
$troutbox$;
REVOKE ALL ON FUNCTION {f}(text, bytea, text[]) FROM PUBLIC;"#
    )
}

impl ProduceSql {
    pub(crate) fn new(schema: &Ident, table: &Ident, _retention: &Retention) -> ProduceSql {
        let s = schema.quoted();
        let t = format!("{s}.{}", table.quoted());
        // The notification channel of the table (`notify(true)`): a name every process
        // derives alike, short enough for a channel (63 bytes) whatever the names' length.
        // The qualified name is made of validated identifiers, so it is a safe literal.
        let channel = format!(
            "'troutbox_' || to_hex(hashtextextended('{}', 0))",
            t.replace('\'', "''")
        );
        // With notify(true), every INSERT also signals the channel, in the same statement
        // (no extra round trip). An empty payload, so PostgreSQL folds all the signals of one
        // transaction into one notification, sent at its COMMIT (none on ROLLBACK). The CTE
        // is MATERIALIZED and referenced once, so pg_notify runs once per statement.
        let notify = format!("pg_notify({channel}, '')");
        // Per-key ordering: the seed of the per-key lock's hash, the table's own, so that the
        // producers of two tables never wait for each other.
        let order_seed = format!("hashtextextended('{}', 0)", t.replace('\'', "''"));
        ProduceSql {
            plain_inserts: inserts(&t, None, None),
            notify_inserts: inserts(&t, Some(&notify), None),
            ordered_inserts: inserts(&t, None, Some(&order_seed)),
            ordered_notify_inserts: inserts(&t, Some(&notify), Some(&order_seed)),
            notify_channel: format!("SELECT {channel}"),
            add_function: add_function(&s, table, &t, &notify, &order_seed),
        }
    }
}

impl ProduceSql {
    /// The producer's INSERTs (one message, many, many without headers): with `notify`, the
    /// ones that also signal the table's channel (`pg_notify` inside the same statement);
    /// with `ordered`, the ones that take the per-key locks first (see [`inserts`]).
    pub(crate) fn inserts(&self, notify: bool, ordered: bool) -> (&str, &str, &str) {
        let i = match (notify, ordered) {
            (false, false) => &self.plain_inserts,
            (true, false) => &self.notify_inserts,
            (false, true) => &self.ordered_inserts,
            (true, true) => &self.ordered_notify_inserts,
        };
        (&i.one, &i.many, &i.many_plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_literal_escapes_quotes_and_backslashes() {
        assert_eq!(encode_headers([]), "{}");
        assert_eq!(
            encode_headers([("a", "b\"c"), ("d\\", "")]),
            r#"{"a","b\"c","d\\",""}"#
        );
    }
}
