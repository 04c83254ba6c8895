//! Scaffolding of the per-key ordering tests (`tests/ordering*.rs`): an ordered outbox, the
//! log of what the Senders published in the order they did it, the checks of guarantee 3 on
//! that log (first publications of each key in id order), Senders that publish through
//! `Batch::send_each`, and the table's state for failure messages.
//!
//! Included with `#[path]` by each `tests/ordering*.rs`, next to `mod common;`.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use postgres::GenericClient;
use troutbox::{Batch, Handle, Message, NewMessage, Outbox, OutboxBuilder, PgPool, PgStore};

use crate::common::PATIENCE;

/// An ordered outbox on `store`'s table, made ordered by `Outbox::migrate` (the store was
/// migrated unordered by `common::store`: this also exercises the conversion). `configure`
/// adds the test's own options.
pub fn ordered(store: &PgStore, configure: impl FnOnce(OutboxBuilder) -> OutboxBuilder) -> Outbox {
    let builder = Outbox::builder(store.clone())
        .per_key_ordering(true)
        .poll_interval(Duration::from_millis(5))
        .backoff(crate::common::fast_backoff())
        .error_handler(|_| {});
    let outbox = configure(builder).build().unwrap();
    outbox.migrate().unwrap();
    outbox
}

/// A pool of `pool_size` connections, a store in the fresh schema `schema`, and an ordered
/// outbox on it with the test's options (see [`ordered`]): how most ordering tests begin.
pub fn ordered_in(
    schema: &str,
    pool_size: u32,
    configure: impl FnOnce(OutboxBuilder) -> OutboxBuilder,
) -> (PgPool, PgStore, Outbox) {
    let pool = crate::common::pool(pool_size);
    let store = crate::common::store(schema, &pool);
    let outbox = ordered(&store, configure);
    (pool, store, outbox)
}

/// A message's value as text (every value in these tests is ASCII).
pub fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.value()).into_owned()
}

/// Every row of the schema's outbox table: (id, key, value), in id order.
pub fn rows(pool: &PgPool, schema: &str) -> Vec<(i64, String, String)> {
    pool.get()
        .unwrap()
        .query(
            &format!(
                "SELECT id, key, convert_from(value, 'UTF8') FROM \"{schema}\".outbox_messages ORDER BY id"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The id of the row whose value is `value`.
pub fn id_of(pool: &PgPool, schema: &str, value: &str) -> i64 {
    pool.get()
        .unwrap()
        .query_one(
            &format!(
                "SELECT id FROM \"{schema}\".outbox_messages WHERE value = convert_to($1, 'UTF8')"
            ),
            &[&value],
        )
        .unwrap()
        .get(0)
}

/// True while backend `pid` waits for an advisory lock: the producer's per-key lock.
pub fn waits_for_advisory_lock(pool: &PgPool, pid: i32) -> bool {
    pool.get()
        .unwrap()
        .query_one(
            "SELECT EXISTS (
                SELECT 1 FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
                WHERE a.pid = $1 AND a.wait_event_type = 'Lock' AND a.wait_event = 'advisory'
                  AND l.locktype = 'advisory' AND NOT l.granted)",
            &[&pid],
        )
        .unwrap()
        .get(0)
}

/// The rows still in the outbox (not sent), the charges and the claim journal: what a failure
/// message shows, so that a library bug is described by the table's state.
pub fn table_state(pool: &PgPool, schema: &str) -> String {
    let mut conn = pool.get().unwrap();
    let mut out = String::from("outbox rows (id key state attempts due_in_s last_error):\n");
    let rows = conn
        .query(
            &format!(
                "SELECT id, key, state, attempts,
                        round(extract(epoch FROM available_at - now())::numeric, 3)::text,
                        coalesce(last_error, '')
                 FROM \"{schema}\".outbox_messages WHERE state <> 'sent' ORDER BY key, id LIMIT 60"
            ),
            &[],
        )
        .unwrap();
    for r in rows {
        out.push_str(&format!(
            "  {} {} {} {} {} {:?}\n",
            r.get::<_, i64>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i32>(3),
            r.get::<_, String>(4),
            r.get::<_, String>(5)
        ));
    }
    for (what, sql) in [
        (
            "charges (msg_id claim_id)",
            format!("SELECT msg_id::text || ' ' || claim_id::text FROM \"{schema}\".outbox_messages_charges ORDER BY msg_id LIMIT 60"),
        ),
        (
            "claim journal (claim_id ids)",
            format!("SELECT claim_id::text || ' ' || ids::text FROM \"{schema}\".outbox_messages_claims WHERE claim_id > 0 LIMIT 60"),
        ),
    ] {
        out.push_str(&format!("{what}:\n"));
        match conn.query(&sql, &[]) {
            Ok(rows) => {
                for r in rows {
                    out.push_str(&format!("  {}\n", r.get::<_, String>(0)));
                }
            }
            Err(e) => out.push_str(&format!("  (unreadable: {e})\n")),
        }
    }
    out
}

/// One message as a Sender handled it: published (`ok`) or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub key: String,
    pub value: String,
    pub ok: bool,
}

/// What the Senders of a test did, in the order they did it. Within a key this is the order
/// a consumer would see: a correct relay never has two batches of one key at a Sender at once.
#[derive(Default)]
pub struct Log {
    entries: Mutex<Vec<Delivery>>,
    changed: Condvar,
}

impl Log {
    pub fn new() -> Arc<Log> {
        Arc::new(Log::default())
    }

    pub fn record(&self, m: &Message, ok: bool) {
        self.entries.lock().unwrap().push(Delivery {
            id: m.id(),
            key: m.key().to_owned(),
            value: text(m),
            ok,
        });
        self.changed.notify_all();
    }

    /// `m` was published.
    pub fn push(&self, m: &Message) {
        self.record(m, true);
    }

    /// Publishing `m` failed.
    pub fn push_failure(&self, m: &Message) {
        self.record(m, false);
    }

    pub fn entries(&self) -> Vec<Delivery> {
        self.entries.lock().unwrap().clone()
    }

    /// Waits until `until` holds for the entries; false on timeout.
    pub fn wait(&self, timeout: Duration, mut until: impl FnMut(&[Delivery]) -> bool) -> bool {
        let entries = self.entries.lock().unwrap();
        let (entries, _) = self
            .changed
            .wait_timeout_while(entries, timeout, |e| !until(e))
            .unwrap();
        until(&entries)
    }

    /// Waits until `n` distinct messages were published.
    pub fn wait_distinct(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, |e| distinct(e) >= n)
    }
}

/// How many distinct messages were published.
pub fn distinct(entries: &[Delivery]) -> usize {
    entries
        .iter()
        .filter(|d| d.ok)
        .map(|d| d.id)
        .collect::<HashSet<_>>()
        .len()
}

/// How many publications were duplicates.
pub fn duplicates(entries: &[Delivery]) -> usize {
    entries.iter().filter(|d| d.ok).count() - distinct(entries)
}

/// The values of `key`, every publication, in publication order.
pub fn published(entries: &[Delivery], key: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|d| d.ok && d.key == key)
        .map(|d| d.value.clone())
        .collect()
}

/// Keys whose *first* publications are not in strictly increasing id order, one line per
/// offending pair: guarantee 3.
pub fn order_violations(entries: &[Delivery]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, (i64, &str)> = HashMap::new();
    let mut out = Vec::new();
    for d in entries.iter().filter(|d| d.ok) {
        if !seen.insert(d.id) {
            continue; // a duplicate: allowed anywhere
        }
        if let Some(&(prev, prev_value)) = last.get(d.key.as_str()) {
            if d.id <= prev {
                out.push(format!(
                    "key {}: {} ({}) first published after {} ({})",
                    d.key, d.id, d.value, prev, prev_value
                ));
            }
        }
        last.insert(&d.key, (d.id, &d.value));
    }
    out
}

/// A Sender that publishes each batch through `Batch::send_each`, as an ordered Sender should:
/// `fail` decides which messages the broker refuses (with the reason); the others are recorded
/// in `log`, failures too. `send_each` stops publishing a key after a failure of that key.
pub fn publishing_sender<F>(
    log: &Arc<Log>,
    fail: F,
) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static
where
    F: Fn(&Message) -> Option<String> + Clone + Send + 'static,
{
    let log = log.clone();
    move |batch: &mut Batch| {
        batch.send_each(|m| match fail(m) {
            Some(reason) => {
                log.push_failure(m);
                Err(reason)
            }
            None => {
                log.push(m);
                Ok(())
            }
        });
        Ok(())
    }
}

/// A Sender that refuses `value` every time, with the reason "`value` refused", and
/// publishes everything else.
pub fn refusing(
    log: &Arc<Log>,
    value: &'static str,
) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static {
    publishing_sender(log, move |m| {
        (m.value() == value.as_bytes()).then(|| format!("{value} refused"))
    })
}

/// A Sender that publishes everything.
pub fn sending(
    log: &Arc<Log>,
) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static {
    publishing_sender(log, |_| None)
}

/// Adds `(key, value)` pairs in one `add_messages` call (which locks their keys in a fixed
/// order) on `client`, a connection or a transaction.
pub fn add_pairs<C: GenericClient>(outbox: &Outbox, client: &mut C, pairs: &[(String, String)]) {
    outbox
        .add_messages(
            client,
            pairs.iter().map(|(k, v)| NewMessage::new(k, v.as_bytes())),
        )
        .unwrap();
}

/// `values` added under `key`, in one `add_messages` call on `client`.
pub fn add_values<C: GenericClient>(outbox: &Outbox, client: &mut C, key: &str, values: &[String]) {
    outbox
        .add_messages(
            client,
            values.iter().map(|v| NewMessage::new(key, v.as_bytes())),
        )
        .unwrap();
}

/// Each value with the key it starts with (`"K-1"` is of key `"K"`).
pub fn keyed_by_prefix(values: &[&str]) -> Vec<(String, String)> {
    values
        .iter()
        .map(|v| (v.split('-').next().unwrap().to_owned(), (*v).to_owned()))
        .collect()
}

/// `"{prefix}-0"` .. `"{prefix}-{n - 1}"`: the values of one key, in the order they were
/// added.
pub fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// (value, attempts) of every row of the schema's outbox table, in id order: which messages
/// were charged an attempt.
pub fn attempts(pool: &PgPool, schema: &str) -> Vec<(String, i32)> {
    pool.get()
        .unwrap()
        .query(
            &format!(
                "SELECT convert_from(value, 'UTF8'), attempts FROM \"{schema}\".outbox_messages ORDER BY id"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until `n` distinct messages were published; fails with the table's state if they
/// were not within [`PATIENCE`].
pub fn wait_published(log: &Log, n: usize, pool: &PgPool, schema: &str) {
    assert!(
        log.wait_distinct(n, PATIENCE),
        "{} of {n} published\n{}",
        distinct(&log.entries()),
        table_state(pool, schema)
    );
}

/// Waits until `n` distinct messages were published (see [`wait_published`]), shuts the
/// relay down, and returns what the Senders did.
pub fn finish(
    mut handle: Handle,
    log: &Log,
    n: usize,
    pool: &PgPool,
    schema: &str,
) -> Vec<Delivery> {
    wait_published(log, n, pool, schema);
    handle.shutdown().unwrap();
    log.entries()
}

/// Relays `outbox` with a Sender that publishes everything until `n` distinct messages were
/// published, and returns what it did.
pub fn relay_all(outbox: &Outbox, n: usize, pool: &PgPool, schema: &str) -> Vec<Delivery> {
    let log = Log::new();
    let handle = outbox.start(sending(&log)).unwrap();
    finish(handle, &log, n, pool, schema)
}

/// Guarantee 3 without faults: per key, first publications in id order, and no message
/// published twice.
pub fn assert_in_order_once(entries: &[Delivery]) {
    assert_eq!(order_violations(entries), Vec::<String>::new());
    assert_eq!(duplicates(entries), 0);
}
