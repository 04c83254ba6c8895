//! The producer on a diesel connection (feature `diesel`) against a real server: messages
//! added in a committed diesel transaction are relayed, a rolled-back one leaves nothing, bad
//! input and a table in the wrong mode come back as the errors of the `postgres` path, and
//! the notification signal is the same.

mod common;

use std::sync::{Arc, Mutex};

use common::{
    channel, count, counting_server, pool, signals_allowed, signals_sent, store, Deliveries,
    PATIENCE,
};
use diesel::sql_types::{BigInt, Integer};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use postgres::fallible_iterator::FallibleIterator;
use troutbox::{
    Batch, Error, NewMessage, Outbox, MAX_BYTES_PER_CALL, MAX_HEADERS, MAX_HEADER_BYTES,
    MAX_KEY_LEN, MAX_MESSAGES_PER_CALL,
};

fn connect() -> PgConnection {
    PgConnection::establish(&common::url()).expect("diesel connects to the test server")
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A count read through the diesel connection itself (inside its transaction, if any).
fn count_on(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

/// What the Sender saw of a message.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    key: String,
    value: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// A Sender that records every message and reports success.
fn recording(
    seen: &Arc<Mutex<Vec<Seen>>>,
    deliveries: &Arc<Deliveries>,
) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static {
    let (seen, deliveries) = (seen.clone(), deliveries.clone());
    move |batch: &mut Batch| {
        seen.lock().unwrap().extend(batch.iter().map(|m| Seen {
            key: m.key().to_owned(),
            value: m.value().to_vec(),
            headers: m.headers().to_vec(),
        }));
        deliveries.record(batch);
        Ok(())
    }
}

fn seen(key: &str, value: &[u8], headers: &[(&str, &str)]) -> Seen {
    Seen {
        key: key.to_owned(),
        value: value.to_vec(),
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

#[test]
fn messages_added_in_a_committed_diesel_transaction_are_relayed() {
    const SCHEMA: &str = "diesel_relayed";
    let pool = pool(4);
    let store = store(SCHEMA, &pool);
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE {SCHEMA}.orders (id bigint PRIMARY KEY, state text NOT NULL)"
        ))
        .unwrap();
    let outbox = Outbox::builder(store).build().unwrap();
    let odd = "quote \" backslash \\ comma , braces {} NULL";
    let mut conn = connect();
    conn.transaction(|conn| {
        diesel::sql_query(format!(
            "INSERT INTO {SCHEMA}.orders (id, state) VALUES (42, 'paid')"
        ))
        .execute(conn)?;
        troutbox::diesel::add_message(&outbox, conn, "order-42", b"{\"paid\":true}")?;
        troutbox::diesel::add(
            &outbox,
            conn,
            &NewMessage::new("ключ/🔑", &[0, 1, 255])
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .header(odd, odd)
                .header("dup", ""),
        )?;
        diesel::QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(
        count(&pool, &format!("SELECT count(*) FROM {SCHEMA}.orders")),
        1
    );

    let (log, deliveries) = (Arc::new(Mutex::new(Vec::new())), Deliveries::new());
    let mut handle = outbox.start(recording(&log, &deliveries)).unwrap();
    assert!(deliveries.wait_for(2, PATIENCE), "not relayed");
    handle.shutdown().unwrap();
    let mut log = log.lock().unwrap().clone();
    log.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        log,
        [
            seen("order-42", b"{\"paid\":true}", &[]),
            seen(
                "ключ/🔑",
                &[0, 1, 255],
                &[
                    (
                        "traceparent",
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                    ),
                    (odd, odd),
                    ("dup", ""),
                ]
            ),
        ]
    );
    assert_eq!(deliveries.duplicates(), 0);
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {SCHEMA}.outbox_messages")
        ),
        0,
        "sent messages are deleted"
    );
}

#[test]
fn a_rolled_back_diesel_transaction_leaves_nothing() {
    const SCHEMA: &str = "diesel_rolled_back";
    let pool = pool(4);
    let store = store(SCHEMA, &pool);
    let outbox = Outbox::builder(store).build().unwrap();
    let rows = format!("SELECT count(*) AS n FROM {SCHEMA}.outbox_messages");
    let mut conn = connect();

    // Rolled back by the closure: the messages were there inside the transaction only.
    let mut inside = 0;
    let err = conn
        .transaction(|conn| {
            troutbox::diesel::add_message(&outbox, conn, "gone", b"1")?;
            troutbox::diesel::add_messages(
                &outbox,
                conn,
                [NewMessage::new("gone", b"2"), NewMessage::new("gone", b"3")],
            )?;
            inside = count_on(conn, &rows);
            diesel::QueryResult::<()>::Err(diesel::result::Error::RollbackTransaction)
        })
        .unwrap_err();
    assert!(
        matches!(err, diesel::result::Error::RollbackTransaction),
        "{err:?}"
    );
    assert_eq!(
        inside, 3,
        "the messages were not added on the diesel connection"
    );
    assert_eq!(count(&pool, &rows), 0);

    // Rolled back by a troutbox error returned with `?` from a diesel closure: the business
    // row goes with it, and the error comes back whole.
    pool.get()
        .unwrap()
        .batch_execute(&format!("CREATE TABLE {SCHEMA}.orders (id bigint)"))
        .unwrap();
    let err = conn
        .transaction(|conn| {
            diesel::sql_query(format!("INSERT INTO {SCHEMA}.orders VALUES (1)")).execute(conn)?;
            troutbox::diesel::add_message(&outbox, conn, "ok", b"1")?;
            troutbox::diesel::add_message(&outbox, conn, "bad\0key", b"2")?;
            diesel::QueryResult::Ok(())
        })
        .unwrap_err();
    match &err {
        diesel::result::Error::QueryBuilderError(e) => assert!(
            matches!(
                e.downcast_ref::<Error>(),
                Some(Error::KeyContainsNul { position: 3 })
            ),
            "{e:?}"
        ),
        other => panic!("expected the troutbox error in a QueryBuilderError, got {other:?}"),
    }
    assert_eq!(
        count(&pool, &format!("SELECT count(*) FROM {SCHEMA}.orders")),
        0
    );
    assert_eq!(count(&pool, &rows), 0);

    // Only the committed message is relayed.
    troutbox::diesel::add_message(&outbox, &mut conn, "kept", b"4").unwrap();
    let (log, deliveries) = (Arc::new(Mutex::new(Vec::new())), Deliveries::new());
    let mut handle = outbox.start(recording(&log, &deliveries)).unwrap();
    assert!(deliveries.wait_for(1, PATIENCE));
    handle.shutdown().unwrap();
    // The table held that one row only (counted above): nothing else was there to relay.
    assert_eq!(count(&pool, &rows), 0);
    assert_eq!(*log.lock().unwrap(), [seen("kept", b"4", &[])]);
}

/// The errors of both paths for the same input: troutbox's own, so equal whole.
fn same(pg: Error, diesel: Error) -> Error {
    assert_eq!(format!("{diesel:?}"), format!("{pg:?}"));
    diesel
}

/// The error of one message through both paths.
fn one(
    o: &Outbox,
    m: NewMessage<'_>,
    tx: &mut postgres::Transaction<'_>,
    conn: &mut PgConnection,
) -> Error {
    same(
        o.add(tx, &m).expect_err("the postgres path accepted it"),
        troutbox::diesel::add(o, conn, &m).expect_err("the diesel path accepted it"),
    )
}

/// The error of many messages through both paths.
fn many(
    o: &Outbox,
    messages: Vec<NewMessage<'_>>,
    tx: &mut postgres::Transaction<'_>,
    conn: &mut PgConnection,
) -> Error {
    same(
        o.add_messages(tx, messages.clone())
            .expect_err("the postgres path accepted it"),
        troutbox::diesel::add_messages(o, conn, messages).expect_err("the diesel path accepted it"),
    )
}

#[test]
fn bad_input_comes_back_as_the_postgres_paths_errors_and_the_transaction_stays_usable() {
    const SCHEMA: &str = "diesel_bad_input";
    let pool = pool(4);
    let store = store(SCHEMA, &pool);
    let o = &Outbox::builder(store.clone())
        .max_value_size(1024)
        .build()
        .unwrap();
    let roomy = &Outbox::builder(store).build().unwrap();
    let mut client = pool.get().unwrap();
    let mut tx = client.transaction().unwrap();
    let mut conn = connect();
    conn.transaction(|conn| {
        let err = one(o, NewMessage::new("a\0b", b"v"), &mut tx, conn);
        assert!(
            matches!(err, Error::KeyContainsNul { position: 1 }),
            "{err}"
        );
        let long_key = "k".repeat(MAX_KEY_LEN + 1);
        let err = one(o, NewMessage::new(&long_key, b"v"), &mut tx, conn);
        assert!(matches!(err, Error::KeyTooLong { .. }), "{err}");
        let err = one(o, NewMessage::new("k", &[0; 1025]), &mut tx, conn);
        assert!(
            matches!(
                err,
                Error::ValueTooLarge {
                    len: 1025,
                    max: 1024
                }
            ),
            "{err}"
        );
        let long_value = "x".repeat(MAX_HEADER_BYTES);
        for bad in [
            NewMessage::new("k", b"v").header("h", "x\0y"),
            NewMessage::new("k", b"v").header("h\0", "x"),
            NewMessage::new("k", b"v").header("", "x"),
            (0..=MAX_HEADERS).fold(NewMessage::new("k", b"v"), |m, _| m.header("h", "v")),
            NewMessage::new("k", b"v").header("h", &long_value),
        ] {
            let err = one(o, bad, &mut tx, conn);
            assert!(matches!(err, Error::InvalidHeader { .. }), "{err}");
        }

        // Many: one bad message refuses them all; and the per-call caps.
        let err = many(
            o,
            vec![NewMessage::new("ok", b"v"), NewMessage::new("bad\0", b"v")],
            &mut tx,
            conn,
        );
        assert!(matches!(err, Error::KeyContainsNul { .. }), "{err}");
        let err = many(
            o,
            vec![NewMessage::new("k", b"v"); MAX_MESSAGES_PER_CALL + 1],
            &mut tx,
            conn,
        );
        assert!(matches!(err, Error::CallTooLarge { .. }), "{err}");
        // Over the bytes per call with valid messages (1 MiB each), all borrowing one value.
        let big = vec![7u8; 1 << 20];
        let err = many(
            roomy,
            vec![NewMessage::new("k", &big); (MAX_BYTES_PER_CALL >> 20) + 1],
            &mut tx,
            conn,
        );
        assert!(matches!(err, Error::CallTooLarge { .. }), "{err}");

        // Nothing reached the server: the diesel transaction still works, and commits.
        troutbox::diesel::add_message(o, conn, "k", &[7; 1024])?;
        diesel::QueryResult::Ok(())
    })
    .unwrap();
    drop(tx);
    let rows = format!("SELECT count(*) FROM {SCHEMA}.outbox_messages");
    assert_eq!(count(&pool, &rows), 1);
}

#[test]
fn a_table_in_the_other_ordering_mode_is_refused_and_an_ordered_one_works() {
    let pool = pool(4);
    let is_mismatch = |result: Result<(), Error>, declared: bool, table: &str| match result {
        Err(Error::OrderingMismatch {
            table: t,
            declared: d,
            recorded: r,
        }) => assert_eq!((t.as_str(), d, r), (table, declared, !declared)),
        other => panic!("expected OrderingMismatch (declared {declared}), got {other:?}"),
    };
    let mut conn = connect();

    // An unordered outbox on an ordered table.
    let store_o = store("diesel_mismatch_ordered", &pool);
    let ordered = Outbox::builder(store_o.clone())
        .per_key_ordering(true)
        .build()
        .unwrap();
    ordered.migrate().unwrap();
    let table = store_o.qualified_table();
    let unordered = Outbox::builder(store_o.clone()).build().unwrap();
    is_mismatch(
        troutbox::diesel::add_message(&unordered, &mut conn, "K", b"x"),
        false,
        &table,
    );
    is_mismatch(
        troutbox::diesel::add_messages(&unordered, &mut conn, [NewMessage::new("K", b"y")])
            .map(|_| ()),
        false,
        &table,
    );
    let rows_o = "SELECT count(*) FROM diesel_mismatch_ordered.outbox_messages";
    assert_eq!(count(&pool, rows_o), 0);

    // The ordered outbox on it works through diesel: the statements with the per-key locks.
    conn.transaction(|conn| {
        troutbox::diesel::add_message(&ordered, conn, "K", b"1")?;
        troutbox::diesel::add(&ordered, conn, &NewMessage::new("K", b"2").header("h", "v"))?;
        troutbox::diesel::add_messages(
            &ordered,
            conn,
            [NewMessage::new("K", b"3"), NewMessage::new("L", b"4")],
        )?;
        troutbox::diesel::add_messages(
            &ordered,
            conn,
            [NewMessage::new("L", b"5").header("h", "v")],
        )?;
        diesel::QueryResult::Ok(())
    })
    .unwrap();
    let values: Vec<Vec<u8>> = pool
        .get()
        .unwrap()
        .query(
            "SELECT value FROM diesel_mismatch_ordered.outbox_messages ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(values, [b"1", b"2", b"3", b"4", b"5"]);

    // An ordered outbox on a table only `PgStore::migrate` has seen.
    let store_u = store("diesel_mismatch_unordered", &pool);
    let table = store_u.qualified_table();
    let outbox = Outbox::builder(store_u)
        .per_key_ordering(true)
        .build()
        .unwrap();
    let err = conn
        .transaction(|conn| {
            troutbox::diesel::add_message(&outbox, conn, "K", b"x")?;
            diesel::QueryResult::Ok(())
        })
        .unwrap_err();
    match err {
        diesel::result::Error::QueryBuilderError(err) => {
            is_mismatch(Err(*err.downcast::<Error>().unwrap()), true, &table)
        }
        other => panic!("expected the troutbox error in a QueryBuilderError, got {other:?}"),
    }
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM diesel_mismatch_unordered.outbox_messages"
        ),
        0
    );
}

#[test]
fn a_table_never_migrated_or_migrated_by_an_older_troutbox_says_so() {
    const SCHEMA: &str = "diesel_never_migrated";
    let pool = pool(2);
    let migrated = store(SCHEMA, &pool);
    let mut conn = connect();

    // No such table.
    let outbox = Outbox::builder(migrated.clone().table("nope"))
        .build()
        .unwrap();
    let err = troutbox::diesel::add_message(&outbox, &mut conn, "k", b"v").unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err}");
    assert!(err.to_string().contains("migrate()"), "{err}");
    // No such schema.
    let outbox = Outbox::builder(troutbox::PgStore::new(pool.clone()).schema("diesel_no_schema"))
        .build()
        .unwrap();
    let err = troutbox::diesel::add_messages(&outbox, &mut conn, [NewMessage::new("k", b"v")])
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err}");

    // The table exists, its mode was never recorded: as the postgres path says.
    pool.get()
        .unwrap()
        .batch_execute(&format!("DELETE FROM {SCHEMA}.troutbox_tables"))
        .unwrap();
    let outbox = Outbox::builder(migrated).build().unwrap();
    let err = troutbox::diesel::add_message(&outbox, &mut conn, "k", b"v").unwrap_err();
    assert!(matches!(err, Error::OutdatedSchema { .. }), "{err}");
    let pg = outbox
        .add_message(&mut *pool.get().unwrap(), "k", b"v")
        .unwrap_err();
    assert_eq!(format!("{err:?}"), format!("{pg:?}"));
}

#[test]
fn add_messages_inserts_many_in_order_and_all_are_relayed() {
    const SCHEMA: &str = "diesel_many";
    let pool = pool(4);
    let store = store(SCHEMA, &pool);
    let outbox = Outbox::builder(store).batch_size(500).build().unwrap();
    let mut conn = connect();
    let values: Vec<String> = (0..1500).map(|i| format!("v{i}")).collect();
    let added = conn
        .transaction(|conn| {
            // With headers on some (one array literal per message)...
            let with_headers = troutbox::diesel::add_messages(
                &outbox,
                conn,
                values[..1000].iter().enumerate().map(|(i, v)| {
                    let m = NewMessage::new("k", v.as_bytes());
                    if i % 2 == 0 {
                        m.header("n", "even").header("q", "\"{,}\\")
                    } else {
                        m
                    }
                }),
            )?;
            // ... and without any (no headers parameter).
            let plain = troutbox::diesel::add_messages(
                &outbox,
                conn,
                values[1000..]
                    .iter()
                    .map(|v| NewMessage::new("k", v.as_bytes())),
            )?;
            diesel::QueryResult::Ok((with_headers, plain))
        })
        .unwrap();
    assert_eq!(added, (1000, 500));
    assert_eq!(
        troutbox::diesel::add_messages(&outbox, &mut conn, Vec::new()).unwrap(),
        0
    );
    let rows = pool
        .get()
        .unwrap()
        .query(
            &format!("SELECT value, headers FROM {SCHEMA}.outbox_messages ORDER BY id"),
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 1500);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, Vec<u8>>(0), values[i].as_bytes(), "row {i}");
        let headers: Vec<String> = row.get(1);
        if i < 1000 && i % 2 == 0 {
            assert_eq!(headers, ["n", "even", "q", "\"{,}\\"], "row {i}");
        } else {
            assert!(headers.is_empty(), "row {i}: {headers:?}");
        }
    }

    let (log, deliveries) = (Arc::new(Mutex::new(Vec::new())), Deliveries::new());
    let mut handle = outbox.start(recording(&log, &deliveries)).unwrap();
    assert!(deliveries.wait_for(1500, PATIENCE), "not all relayed");
    handle.shutdown().unwrap();
    let mut delivered = deliveries.values();
    delivered.sort();
    let mut expected: Vec<Vec<u8>> = values.iter().map(|v| v.as_bytes().to_vec()).collect();
    expected.sort();
    assert_eq!(delivered, expected);
}

#[test]
fn notify_true_signals_once_per_transaction_and_nothing_otherwise() {
    const SCHEMA: &str = "diesel_notify";
    // The server counts the statements that carry the signal: a listener cannot tell one
    // signal from two, since PostgreSQL folds identical notifications of a transaction.
    let (server, pool) = counting_server(3);
    let store = store(SCHEMA, &pool);
    let mut listener = pool.get().unwrap();
    listener
        .batch_execute(&format!("LISTEN \"{}\"", channel(&pool, SCHEMA)))
        .unwrap();
    let pending = |listener: &mut postgres::Client| {
        listener.batch_execute("SELECT 1").unwrap();
        listener.notifications().iter().count().unwrap()
    };
    let quiet = Outbox::builder(store.clone()).build().unwrap();
    // Each outbox signals at most once per 5 ms: separate ones, so no signal stands in for
    // another.
    let loud_rolled_back = Outbox::builder(store.clone()).notify(true).build().unwrap();
    let loud = Outbox::builder(store.clone()).notify(true).build().unwrap();
    let loud_many = Outbox::builder(store).notify(true).build().unwrap();
    let mut conn = PgConnection::establish(&server.url()).expect("diesel connects");

    // Notify off, committed: no signal.
    conn.transaction(|conn| {
        troutbox::diesel::add_message(&quiet, conn, "k", b"1")?;
        troutbox::diesel::add_messages(&quiet, conn, [NewMessage::new("k", b"2")])?;
        diesel::QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(signals_sent(&pool), 0, "notify off sent a signal");
    // Notify on, rolled back: the signal is sent and discarded with the transaction.
    let _ = conn.transaction(|conn| {
        troutbox::diesel::add_message(&loud_rolled_back, conn, "k", b"3")?;
        diesel::QueryResult::<()>::Err(diesel::result::Error::RollbackTransaction)
    });
    assert_eq!(signals_sent(&pool), 1);
    // Notify on, committed, two statements: one signal, unless they took longer than the
    // 5 ms window (a loaded machine), then at most one per window.
    let started = std::time::Instant::now();
    conn.transaction(|conn| {
        troutbox::diesel::add_message(&loud, conn, "k", b"4")?;
        troutbox::diesel::add(&loud, conn, &NewMessage::new("k", b"5").header("h", "v"))?;
        diesel::QueryResult::Ok(())
    })
    .unwrap();
    let took = started.elapsed();
    let signals = signals_sent(&pool) - 1;
    println!(
        "FIGURES diesel_notify_signals: statements=2 signals={signals} took_us={}",
        took.as_micros()
    );
    assert!(
        (1..=signals_allowed(took)).contains(&signals),
        "{signals} signals from 2 statements in {took:?}"
    );
    troutbox::diesel::add_messages(
        &loud_many,
        &mut conn,
        [NewMessage::new("k", b"6"), NewMessage::new("k", b"7")],
    )
    .unwrap();
    assert_eq!(signals_sent(&pool), 1 + signals + 1);
    // Notifications arrive in commit order: once the last expected one is in, any
    // unexpected earlier one is too.
    let mut notifications = listener.notifications();
    let mut timed = notifications.timeout_iter(PATIENCE);
    for which in ["add_message", "add_messages"] {
        assert!(
            timed.next().unwrap().is_some(),
            "the notifying {which} sent nothing"
        );
    }
    drop(timed);
    drop(notifications);
    assert_eq!(
        pending(&mut listener),
        0,
        "notify off or a rollback notified"
    );
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[test]
fn database_errors_come_back_as_error_diesel_with_diesels_error_as_the_source() {
    const SCHEMA: &str = "diesel_db_errors";
    let pool = pool(2);
    let store = store(SCHEMA, &pool);
    let outbox = Outbox::builder(store).build().unwrap();
    let mut conn = connect();
    // The mode is checked (and remembered) first, so the failures below are the INSERT's.
    troutbox::diesel::add_message(&outbox, &mut conn, "k", b"checked").unwrap();

    // A transaction a failed statement aborted.
    let err = conn
        .transaction(|conn| {
            assert!(diesel::sql_query("SELECT 1/0").execute(conn).is_err());
            let err = troutbox::diesel::add_message(&outbox, conn, "k", b"v").unwrap_err();
            let text = err.to_string();
            let Error::Diesel { context, source } = &err else {
                panic!("expected Error::Diesel, got {err:?}")
            };
            assert_eq!(*context, "adding a message to the outbox");
            let server = source.to_string();
            assert!(
                server.contains("current transaction is aborted"),
                "{server}"
            );
            assert!(text.contains("adding a message to the outbox"), "{text}");
            assert!(text.contains("roll"), "says what to do: {text}");
            assert!(!text.contains(&server), "repeats its source: {text}");
            assert!(!err.is_connection_error());
            // `?` into diesel's error gives diesel's own error back.
            let back: diesel::result::Error = err.into();
            assert!(
                matches!(back, diesel::result::Error::DatabaseError(..)),
                "{back:?}"
            );
            Err::<(), _>(back)
        })
        .unwrap_err();
    assert!(err.to_string().contains("current transaction is aborted"));

    // A connection the server terminated.
    let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(&mut conn)
        .unwrap()
        .pid;
    pool.get()
        .unwrap()
        // With a timeout, it returns once the backend is gone (or fails after 30 s), so
        // the connection is closed before the next call.
        .execute("SELECT pg_terminate_backend($1, 30000)", &[&pid])
        .unwrap();
    let err = troutbox::diesel::add_message(&outbox, &mut conn, "k", b"v").unwrap_err();
    assert!(matches!(err, Error::Diesel { .. }), "{err:?}");
    assert!(err.is_connection_error(), "{err:?}");
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {SCHEMA}.outbox_messages")
        ),
        1
    );
}

/// A diesel connection to the test server as `role`.
fn connect_as(role: &str, password: &str) -> PgConnection {
    let config: postgres::Config = common::url().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        postgres::config::Host::Tcp(host) => host.clone(),
        postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config.get_dbname().unwrap_or("postgres");
    PgConnection::establish(&format!(
        "host={host} port={port} dbname={dbname} user={role} password={password}"
    ))
    .expect("diesel connects as the role")
}

#[test]
fn a_producer_role_with_only_the_documented_grants_adds_through_diesel() {
    const SCHEMA: &str = "diesel_least_privilege";
    const ROLE: &str = "troutbox_test_diesel_producer";
    const PASSWORD: &str = "troutbox-test";
    let pool = pool(2);
    store(SCHEMA, &pool);
    let mut admin = pool.get().unwrap();
    // Roles are cluster-wide: create it once, grant on this run's fresh schema.
    if let Err(e) = admin.batch_execute(&format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"))
    {
        assert_eq!(
            e.code(),
            Some(&postgres::error::SqlState::DUPLICATE_OBJECT),
            "{e}"
        );
    }
    // Exactly the README's "Permissions" for a producer.
    admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {SCHEMA} TO {ROLE};
             GRANT INSERT (key, value, headers) ON {SCHEMA}.outbox_messages TO {ROLE};
             GRANT SELECT ON {SCHEMA}.troutbox_tables TO {ROLE};"
        ))
        .unwrap();
    let outbox = Outbox::builder(troutbox::PgStore::new(pool.clone()).schema(SCHEMA))
        .notify(true)
        .build()
        .unwrap();
    let mut conn = connect_as(ROLE, PASSWORD);
    conn.transaction(|conn| {
        troutbox::diesel::add_message(&outbox, conn, "k", b"1")?;
        troutbox::diesel::add_messages(
            &outbox,
            conn,
            [NewMessage::new("k", b"2").header("h", "v")],
        )?;
        diesel::QueryResult::Ok(())
    })
    .unwrap();
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {SCHEMA}.outbox_messages")
        ),
        2
    );
}
