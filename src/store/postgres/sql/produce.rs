//! Producing: the INSERTs `add_message`, `add` and `add_messages` run (plain, with the
//! notification signal, with per-key ordering), and the notification channel.

use crate::store::postgres::ident::Ident;
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
