//! The SQL producer function (`<table>_add`, migration 5), called from `psql`, a client with
//! no Rust in it, against a real server: committed calls are relayed and rolled-back ones
//! never; the limits of `add_message`, refused by the function with its own errors; the
//! per-key lock of an ordered table, shared with the Rust producers; the notification
//! signal an `Outbox` with `notify(true)` records; a role with nothing but EXECUTE.

mod common;
#[path = "common/ordered.rs"]
mod ordered;
#[path = "common/psql.rs"]
mod psql;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::{eventually, PATIENCE};
use postgres::fallible_iterator::FallibleIterator;
use troutbox::{Batch, Error, NewMessage, Outbox, PgPool};

/// The test server's pid of the backend whose `application_name` is `name`, once it
/// appears.
fn backend_of(pool: &PgPool, name: &str) -> i32 {
    let mut pid = None;
    assert!(
        eventually(PATIENCE, || {
            pid = pool
                .get()
                .unwrap()
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                    &[&name],
                )
                .unwrap()
                .map(|r| r.get(0));
            pid.is_some()
        }),
        "no backend named {name}"
    );
    pid.unwrap()
}

/// Whether backend `pid` holds a granted advisory lock: an ordered producer's per-key lock.
fn holds_advisory_lock(pool: &PgPool, pid: i32) -> bool {
    pool.get()
        .unwrap()
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_locks
                            WHERE pid = $1 AND locktype = 'advisory' AND granted)",
            &[&pid],
        )
        .unwrap()
        .get(0)
}

/// Every message a relay hands its Sender: (key, value as text, headers), in order.
type Seen = Arc<Mutex<Vec<(String, String, Vec<(String, String)>)>>>;

fn recording(seen: &Seen) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send {
    let seen = seen.clone();
    move |batch: &mut Batch| {
        let mut seen = seen.lock().unwrap();
        for m in batch.iter() {
            seen.push((
                m.key().to_owned(),
                String::from_utf8_lossy(m.value()).into_owned(),
                m.headers().to_vec(),
            ));
        }
        Ok(())
    }
}

#[test]
fn committed_calls_are_relayed_and_rolled_back_ones_never() {
    const S: &str = "sql_producer_commit";
    let pool = common::pool(4);
    let store = common::store(S, &pool);
    psql::ok(&format!(
        "CREATE TABLE {S}.orders (id int);
         BEGIN;
         INSERT INTO {S}.orders VALUES (1);
         SELECT {S}.outbox_messages_add('order-1', convert_to('paid', 'UTF8'),
                                        ARRAY['traceparent', '00-abc-01', 'kind', '']);
         COMMIT;
         BEGIN;
         INSERT INTO {S}.orders VALUES (2);
         SELECT {S}.outbox_messages_add('order-2', convert_to('never', 'UTF8'));
         ROLLBACK;
         SELECT {S}.outbox_messages_add(key => 'order-3', value => convert_to('auto', 'UTF8'));"
    ));
    let seen = Seen::default();
    let mut handle = common::fast_outbox(&store)
        .build()
        .unwrap()
        .start(recording(&seen))
        .unwrap();
    assert!(eventually(PATIENCE, || seen.lock().unwrap().len() >= 2
        && store.backlog().unwrap().pending == 0));
    handle.shutdown().unwrap();
    let header = |n: &str, v: &str| (n.to_owned(), v.to_owned());
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (
                "order-1".to_owned(),
                "paid".to_owned(),
                vec![header("traceparent", "00-abc-01"), header("kind", "")]
            ),
            ("order-3".to_owned(), "auto".to_owned(), vec![]),
        ],
        "the committed calls, in order, and not the rolled-back one"
    );
}

#[test]
fn each_table_of_a_schema_has_its_own_function() {
    const S: &str = "sql_producer_two_tables";
    let pool = common::pool(4);
    let alpha = common::store(S, &pool).table("alpha");
    alpha.migrate().unwrap();
    let beta = troutbox::PgStore::new(pool.clone()).schema(S).table("beta");
    beta.migrate().unwrap();
    psql::ok(&format!(
        "SELECT {S}.alpha_add('a', '\\x01');
         SELECT {S}.alpha_add('a', '\\x02');
         SELECT {S}.beta_add('b', '\\x03');"
    ));
    assert_eq!(alpha.backlog().unwrap().pending, 2);
    assert_eq!(beta.backlog().unwrap().pending, 1);
}

#[test]
fn a_role_with_only_execute_produces_and_can_do_nothing_else() {
    const S: &str = "sql_producer_execute_only";
    const PRODUCER: &str = "troutbox_test_sql_producer";
    const NOBODY: &str = "troutbox_test_sql_nobody";
    const PASSWORD: &str = "troutbox-test";
    let pool = common::pool(4);
    let store = common::store(S, &pool);
    for role in [PRODUCER, NOBODY] {
        common::login_role(&pool, role, PASSWORD);
    }
    // Exactly what docs/sql-producer.md documents, and for the other role the schema only.
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {S} TO {PRODUCER}, {NOBODY};
             GRANT EXECUTE ON FUNCTION {S}.outbox_messages_add(text, bytea, text[]) TO {PRODUCER};"
        ))
        .unwrap();
    let producer = Some((PRODUCER, PASSWORD));
    let out = psql::run(
        producer,
        &format!(
            "BEGIN;
             SELECT {S}.outbox_messages_add('k', convert_to('v', 'UTF8'), ARRAY['h', 'x']);
             COMMIT;"
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(store.backlog().unwrap().pending, 1);
    // Nothing but the function: no reading or writing the table, the modes, the journal.
    for statement in [
        format!("SELECT count(*) FROM {S}.outbox_messages"),
        format!("INSERT INTO {S}.outbox_messages (key, value) VALUES ('k', '\\x00')"),
        format!("UPDATE {S}.outbox_messages SET state = 'dead'"),
        format!("DELETE FROM {S}.outbox_messages"),
        format!("SELECT * FROM {S}.troutbox_tables"),
        format!("UPDATE {S}.troutbox_tables SET sql_max_value_size = 1000000000"),
        format!("SELECT * FROM {S}.outbox_messages_claims"),
        format!("CREATE OR REPLACE FUNCTION {S}.outbox_messages_add(key text, value bytea, headers text[] DEFAULT '{{}}') RETURNS void LANGUAGE sql AS 'SELECT'"),
    ] {
        let err = psql::fails(producer, &format!("{statement};"));
        assert!(
            err.contains("permission denied") || err.contains("must be owner"),
            "{statement}: {err}"
        );
    }
    // EXECUTE is not PUBLIC's: a role with USAGE on the schema alone cannot produce.
    let err = psql::fails(
        Some((NOBODY, PASSWORD)),
        &format!("SELECT {S}.outbox_messages_add('k', '\\x00');"),
    );
    assert!(err.contains("permission denied for function"), "{err}");
    assert_eq!(store.backlog().unwrap().pending, 1);
}

/// One call of the function, in psql's words, and whether the same message is one that
/// `add_message`'s checks accept (`None`: a shape Rust's API cannot express).
struct Case {
    what: &'static str,
    call: String,
    refused_with: Option<(&'static str, &'static str)>,
    rust: Option<RustMessage>,
}

/// The same message for `add`: key, headers, and the length of its value.
type RustMessage = (String, Vec<(String, String)>, usize);

#[test]
fn the_function_refuses_what_add_message_refuses_with_its_own_errors() {
    const S: &str = "sql_producer_limits";
    let pool = common::pool(4);
    let store = common::store(S, &pool);
    // The outbox that migrates records its value limit for the function.
    let outbox = Outbox::builder(store.clone())
        .max_value_size(64)
        .build()
        .unwrap();
    outbox.migrate().unwrap();
    let add = |key: &str, value: &str, headers: &str| {
        format!("SELECT {S}.outbox_messages_add({key}, {value}, {headers});")
    };
    let bytes = |n: usize| format!("convert_to(repeat('v', {n}), 'UTF8')");
    let headers = |pairs: usize, value_len: usize| {
        let items: Vec<String> = (0..pairs)
            .map(|i| format!("'h{i}', repeat('x', {value_len})"))
            .collect();
        format!("ARRAY[{}]::text[]", items.join(", "))
    };
    let rust_headers = |pairs: usize, value_len: usize| -> Vec<(String, String)> {
        (0..pairs)
            .map(|i| (format!("h{i}"), "x".repeat(value_len)))
            .collect()
    };
    let limit = "54000";
    let invalid = "22023";
    let null = "22004";
    let cases = vec![
        Case {
            what: "a value at max_value_size",
            call: add("'k'", &bytes(64), "'{}'"),
            refused_with: None,
            rust: Some(("k".into(), vec![], 64)),
        },
        Case {
            what: "a value over max_value_size",
            call: add("'k'", &bytes(65), "'{}'"),
            refused_with: Some((
                limit,
                "the value is 65 bytes, over this outbox's max_value_size of 64 bytes",
            )),
            rust: Some(("k".into(), vec![], 65)),
        },
        Case {
            what: "a key of 1024 bytes",
            call: add("repeat('k', 1024)", &bytes(1), "'{}'"),
            refused_with: None,
            rust: Some(("k".repeat(1024), vec![], 1)),
        },
        Case {
            what: "a key of 1025 bytes",
            call: add("repeat('k', 1025)", &bytes(1), "'{}'"),
            refused_with: Some((limit, "the key is 1025 bytes long, the limit is 1024")),
            rust: Some(("k".repeat(1025), vec![], 1)),
        },
        Case {
            what: "100 headers",
            call: add("'k'", &bytes(1), &headers(100, 1)),
            refused_with: None,
            rust: Some(("k".into(), rust_headers(100, 1), 1)),
        },
        Case {
            what: "101 headers",
            call: add("'k'", &bytes(1), &headers(101, 1)),
            refused_with: Some((
                limit,
                "the message has 101 headers, more than MAX_HEADERS (100)",
            )),
            rust: Some(("k".into(), rust_headers(101, 1), 1)),
        },
        Case {
            // "h0" and 65,534 bytes: 65,536, the limit.
            what: "headers of MAX_HEADER_BYTES",
            call: add("'k'", &bytes(1), &headers(1, 65_534)),
            refused_with: None,
            rust: Some(("k".into(), rust_headers(1, 65_534), 1)),
        },
        Case {
            what: "headers over MAX_HEADER_BYTES",
            call: add("'k'", &bytes(1), &headers(1, 65_535)),
            refused_with: Some((
                limit,
                "the headers hold more than MAX_HEADER_BYTES (65536 bytes)",
            )),
            rust: Some(("k".into(), rust_headers(1, 65_535), 1)),
        },
        Case {
            what: "an empty header name",
            call: add("'k'", &bytes(1), "ARRAY['', 'v']"),
            refused_with: Some((invalid, "a header name is empty")),
            rust: Some(("k".into(), vec![(String::new(), "v".into())], 1)),
        },
        Case {
            what: "an empty header value",
            call: add("'k'", &bytes(1), "ARRAY['n', '']"),
            refused_with: None,
            rust: Some(("k".into(), vec![("n".into(), String::new())], 1)),
        },
        Case {
            what: "an odd number of header elements",
            call: add("'k'", &bytes(1), "ARRAY['n']"),
            refused_with: Some((invalid, "headers have 1 elements, an odd number")),
            rust: None,
        },
        Case {
            what: "a NULL header element",
            call: add("'k'", &bytes(1), "ARRAY['n', NULL]"),
            refused_with: Some((null, "header element 2 is NULL")),
            rust: None,
        },
        Case {
            what: "two-dimensional headers",
            call: add("'k'", &bytes(1), "ARRAY[['a', 'b'], ['c', 'd']]"),
            refused_with: Some((invalid, "headers must be a one-dimensional array")),
            rust: None,
        },
        Case {
            what: "a NULL key",
            call: add("NULL", &bytes(1), "'{}'"),
            refused_with: Some((null, "the message's key is NULL")),
            rust: None,
        },
        Case {
            what: "a NULL value",
            call: add("'k'", "NULL", "'{}'"),
            refused_with: Some((null, "the message's value is NULL")),
            rust: None,
        },
        Case {
            what: "NULL headers",
            call: add("'k'", &bytes(1), "NULL"),
            refused_with: Some((null, "the message's headers is NULL")),
            rust: None,
        },
    ];
    let mut accepted = 0;
    for case in &cases {
        let out = psql::run(None, &format!("\\set VERBOSITY verbose\n{}", case.call));
        let stderr = String::from_utf8_lossy(&out.stderr);
        match case.refused_with {
            None => {
                assert!(out.status.success(), "{}: {stderr}", case.what);
                accepted += 1;
            }
            Some((code, text)) => {
                assert!(!out.status.success(), "{}: accepted", case.what);
                assert!(
                    stderr.contains(&format!("ERROR:  {code}: troutbox: {text}")),
                    "{}: {stderr}",
                    case.what
                );
                assert!(stderr.contains("HINT:"), "{}: no hint: {stderr}", case.what);
            }
        }
        // add_message decides the same, before any round trip.
        if let Some((key, headers, value_len)) = &case.rust {
            let value = vec![b'v'; *value_len];
            let mut message = NewMessage::new(key, &value);
            for (n, v) in headers {
                message = message.header(n, v);
            }
            let mut conn = pool.get().unwrap();
            let mut tx = conn.transaction().unwrap();
            let result = outbox.add(&mut tx, &message);
            assert_eq!(
                result.is_ok(),
                case.refused_with.is_none(),
                "{}: add_message gave {result:?}",
                case.what
            );
            // Only the function's rows count below.
            tx.rollback().unwrap();
        }
    }
    assert_eq!(store.backlog().unwrap().pending, accepted);

    // The limit is the last migrating outbox's: one with the default takes 1 MiB again.
    Outbox::builder(store.clone())
        .build()
        .unwrap()
        .migrate()
        .unwrap();
    psql::ok(&add("'k'", &bytes(1 << 20), "'{}'"));
    let err = psql::fails(None, &add("'k'", &bytes((1 << 20) + 1), "'{}'"));
    assert!(err.contains("max_value_size of 1048576 bytes"), "{err}");
    match outbox.add_message(&mut *pool.get().unwrap(), "k", &[0; 65]) {
        Err(Error::ValueTooLarge { len: 65, max: 64 }) => {}
        other => panic!("the Rust producer keeps its own limit, got {other:?}"),
    }
}

#[test]
fn in_an_ordered_table_sql_and_rust_producers_of_a_key_queue_behind_each_other() {
    const S: &str = "sql_producer_ordered";
    let (pool, _store, outbox) = ordered::ordered_in(S, 8, |b| b);

    // A Rust producer holds the key: the function waits for its transaction to end before
    // it draws an id.
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    outbox.add_message(&mut tx, "k", b"rust-1").unwrap();
    let mut sql = psql::Session::start("sql_producer_ordered_1");
    sql.send(&format!(
        "SELECT {S}.outbox_messages_add('k', convert_to('sql-1', 'UTF8'));"
    ));
    let pid = backend_of(&pool, "sql_producer_ordered_1");
    assert!(
        eventually(PATIENCE, || ordered::waits_for_advisory_lock(&pool, pid)
            || sql.exited()),
        "the function never waited for the key"
    );
    assert!(
        !sql.exited(),
        "the function returned while another transaction of the key was open"
    );
    tx.commit().unwrap();
    sql.finish();

    // The function holds the key: a Rust producer waits for its transaction to end.
    let mut sql = psql::Session::start("sql_producer_ordered_2");
    sql.send(&format!(
        "BEGIN; SELECT {S}.outbox_messages_add('k', convert_to('sql-2', 'UTF8'));"
    ));
    let pid = backend_of(&pool, "sql_producer_ordered_2");
    assert!(eventually(PATIENCE, || holds_advisory_lock(&pool, pid)));
    let (rust_pid_tx, rust_pid) = std::sync::mpsc::channel();
    let rust = {
        let pool = pool.clone();
        let outbox = outbox.clone();
        std::thread::spawn(move || {
            let mut conn = pool.get().unwrap();
            let pid: i32 = conn
                .query_one("SELECT pg_backend_pid()", &[])
                .unwrap()
                .get(0);
            rust_pid_tx.send(pid).unwrap();
            let mut tx = conn.transaction().unwrap();
            outbox.add_message(&mut tx, "k", b"rust-2").unwrap();
            tx.commit().unwrap();
            Instant::now()
        })
    };
    let rust_pid = rust_pid.recv().unwrap();
    assert!(eventually(PATIENCE, || ordered::waits_for_advisory_lock(
        &pool, rust_pid
    )));
    let released = Instant::now();
    sql.send("COMMIT;");
    sql.finish();
    assert!(rust.join().unwrap() >= released);

    // Ids in commit order, and relayed so.
    let ids: Vec<i64> = ["rust-1", "sql-1", "sql-2", "rust-2"]
        .iter()
        .map(|v| ordered::id_of(&pool, S, v))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids {ids:?}");
    let entries = ordered::relay_all(&outbox, 4, &pool, S);
    assert_eq!(
        ordered::published(&entries, "k"),
        ["rust-1", "sql-1", "sql-2", "rust-2"]
    );
}

#[test]
fn concurrent_sql_producers_of_an_ordered_table_are_relayed_in_order_per_key() {
    const S: &str = "sql_producer_ordered_load";
    const PRODUCERS: usize = 3;
    const TRANSACTIONS: usize = 100;
    let (pool, _store, outbox) = ordered::ordered_in(S, 8, |b| b.workers(2).batch_size(20));
    let log = ordered::Log::new();
    // The broker refuses one message of each key once: its key waits for its retry.
    let handle = outbox
        .start(ordered::publishing_sender(&log, |m| {
            (m.attempts() == 0 && text(m).ends_with("-7")).then(|| "refused once".to_owned())
        }))
        .unwrap();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            std::thread::spawn(move || {
                // Each transaction adds two keys' messages; the producers share the keys.
                let script: String = (0..TRANSACTIONS)
                    .map(|i| {
                        let (a, b) = (i % 5, (i + p) % 5);
                        format!(
                            "BEGIN;
                             SELECT {S}.outbox_messages_add('key-{a}', convert_to('p{p}-{i}-a', 'UTF8'));
                             SELECT {S}.outbox_messages_add('key-{b}', convert_to('p{p}-{i}-7', 'UTF8'));
                             COMMIT;\n"
                        )
                    })
                    .collect();
                psql::ok(&script)
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let n = PRODUCERS * TRANSACTIONS * 2;
    let entries = ordered::finish(handle, &log, n, &pool, S);
    assert_eq!(ordered::distinct(&entries), n, "0 lost");
    assert_eq!(ordered::order_violations(&entries), Vec::<String>::new());
    // Within each producer, a key's messages came in the order that producer committed.
    for p in 0..PRODUCERS {
        for key in 0..5 {
            let sequence: Vec<usize> = ordered::published(&entries, &format!("key-{key}"))
                .iter()
                .filter_map(|v| v.strip_prefix(&format!("p{p}-")))
                .map(|v| v.split('-').next().unwrap().parse().unwrap())
                .collect();
            assert!(
                sequence.windows(2).all(|w| w[0] <= w[1]),
                "producer {p}, key-{key}: {sequence:?}"
            );
        }
    }
}

fn text(m: &troutbox::Message) -> String {
    ordered::text(m)
}

/// Runs `calls` through psql in one committed transaction: the pid of its backend, which
/// notifications name.
fn committed_by(calls: &str) -> i32 {
    let out = psql::ok(&format!("BEGIN; {calls} SELECT pg_backend_pid(); COMMIT;"));
    out.lines()
        .rfind(|l| !l.is_empty())
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no pid in psql's output: {out}"))
}

#[test]
fn the_function_signals_once_an_outbox_with_notify_has_migrated() {
    const S: &str = "sql_producer_notify";
    let pool = common::pool(4);
    let store = common::store(S, &pool);
    let channel = common::channel(&pool, S);
    let mut listener = postgres::Client::connect(&common::url(), postgres::NoTls).unwrap();
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();
    // Not recorded yet (a plain migrate, an outbox without notify): no signal.
    Outbox::builder(store.clone())
        .build()
        .unwrap()
        .migrate()
        .unwrap();
    let quiet = committed_by(&format!("SELECT {S}.outbox_messages_add('a', '\\x01');"));
    let notifying = Outbox::builder(store.clone()).notify(true).build().unwrap();
    notifying.migrate().unwrap();
    // A later outbox without notify does not turn it off: a relay may be listening.
    Outbox::builder(store.clone())
        .build()
        .unwrap()
        .migrate()
        .unwrap();
    let loud = committed_by(&format!(
        "SELECT {S}.outbox_messages_add('b', '\\x02'); SELECT {S}.outbox_messages_add('c', '\\x03');"
    ));
    // Notifications arrive in commit order: the first is the notifying transaction's.
    let first = listener
        .notifications()
        .timeout_iter(PATIENCE)
        .next()
        .unwrap()
        .expect("a notification");
    assert_ne!(first.process_id(), quiet, "a signal without notify");
    assert_eq!(first.process_id(), loud);
    assert_eq!(store.backlog().unwrap().pending, 3);
}
