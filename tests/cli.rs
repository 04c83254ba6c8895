//! The `troutbox` command line end to end against a real server.

mod common;

use std::time::Duration;

use common::cli::{binary, names, Cli};
use common::{eventually, partitions, pool, PATIENCE};
use troutbox::{Batch, Outbox, PgStore};

const SCHEMA: &str = "cli_e2e";

/// The command line on this file's schema.
const CLI: Cli = Cli::new(SCHEMA);

/// Per-key ordering from the shell: `migrate --per-key-ordering` makes the table ordered,
/// `blocked` shows the key a failing message holds back, `skip` unblocks it.
#[test]
fn blocked_keys_and_skip_from_the_command_line() {
    const ORDERED: &str = "cli_ordered";
    let pool = pool(4);
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {ORDERED} CASCADE"))
        .unwrap();
    let run = |args: &[&str]| Cli::new(ORDERED).ok(args);
    run(&["migrate", "--per-key-ordering"]);
    let store = PgStore::new(pool.clone()).schema(ORDERED);
    let outbox = Outbox::builder(store.clone())
        .per_key_ordering(true)
        .max_retries(100)
        .backoff(troutbox::Backoff::exponential(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        ))
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    outbox
        .add_messages(
            &mut *conn,
            [
                troutbox::NewMessage::new("acct-1", b"first"),
                troutbox::NewMessage::new("acct-1", b"second"),
            ],
        )
        .unwrap();
    let mut handle = outbox
        .start(|b: &mut Batch| -> Result<(), String> {
            b.send_each(|_| Err::<(), _>("exchange not found"));
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || !store
        .blocked_keys(10)
        .unwrap()
        .is_empty()));
    handle.shutdown().unwrap();

    let blocked: serde_json::Value = serde_json::from_str(&run(&["blocked", "--json"])).unwrap();
    let blocked = blocked.as_array().unwrap();
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(blocked[0]["key"], "acct-1");
    assert_eq!(blocked[0]["attempts"], 1);
    assert_eq!(blocked[0]["waiting"], 1);
    assert_eq!(blocked[0]["last_error"], "exchange not found");
    let head = blocked[0]["head_id"].as_i64().unwrap();
    let table = run(&["blocked"]);
    assert!(
        table.starts_with("KEY") && table.contains("acct-1"),
        "{table}"
    );

    assert!(run(&["skip", &head.to_string()]).contains("skipped"));
    assert!(run(&["blocked"]).contains("no blocked keys"));
    // Skipping it again: it is no longer pending.
    let again = Cli::new(ORDERED).output(&["skip", &head.to_string()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not pending"));
    let dead = store.dead_messages(10, None).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("skipped"));
}

#[test]
fn migrate_status_and_dead_letters_from_the_command_line() {
    let pool = pool(4);
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .unwrap();

    assert!(CLI.ok(&["migrate"]).contains("created"));
    assert!(CLI.ok(&["migrate"]).contains("is up to date")); // idempotent

    // Three messages: two die, one stays pending.
    let store = PgStore::new(pool.clone()).schema(SCHEMA);
    let outbox = Outbox::builder(store.clone())
        .max_retries(0)
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    for key in ["bad-1", "bad-2"] {
        outbox.add_message(&mut *conn, key, b"v").unwrap();
    }
    let mut handle = outbox
        .start(|_: &mut Batch| -> Result<(), String> { Err("exchange not found".into()) })
        .unwrap();
    assert!(eventually(PATIENCE, || store.backlog().unwrap().dead == 2));
    handle.shutdown().unwrap();
    outbox.add_message(&mut *conn, "waiting", b"v").unwrap();
    // Produced an hour ago by the server's clock, so its age is known.
    conn.batch_execute(&format!(
        "UPDATE {SCHEMA}.outbox_messages SET created_at = now() - interval '1 hour' \
         WHERE key = 'waiting'"
    ))
    .unwrap();
    let created_at: time::OffsetDateTime = conn
        .query_one(
            &format!("SELECT created_at FROM {SCHEMA}.outbox_messages WHERE key = 'waiting'"),
            &[],
        )
        .unwrap()
        .get(0);
    let age_before = sql_age(&mut conn, created_at);

    let status = CLI.json(&["status"]);
    assert_eq!(status["pending"], 1);
    assert_eq!(status["dead"], 2);
    // Backlog's own `sent`, once (the old `sent_retained` twin is gone).
    assert_eq!(status["sent"], 0);
    assert!(status.get("sent_retained").is_none(), "{status}");
    let age_after = sql_age(&mut conn, created_at);
    // Between two readings of the server's clock (1 s allowed between the processes' clocks).
    let age = status["oldest_pending_age_seconds"].as_f64().unwrap();
    assert!(age_before >= 3_600.0, "{age_before}");
    assert!(
        age >= age_before - 1.0 && age <= age_after + 1.0,
        "oldest pending age {age}, SQL says {age_before}..{age_after}"
    );
    let rfc3339 = created_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(status["oldest_pending"], rfc3339.as_str(), "{status}");
    let text = CLI.ok(&["status"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("oldest pending"))
        .unwrap_or_else(|| panic!("{text}"));
    let shown: f64 = line
        .rsplit('(')
        .next()
        .and_then(|rest| rest.strip_suffix(" s ago)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(shown >= 3_600.0, "{line}");

    let listed = CLI.json(&["dead", "list"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["last_error"], "exchange not found");
    assert_eq!(listed[0]["attempts"], 1);
    let newest = listed[0]["id"].as_i64().unwrap();
    let oldest = listed[1]["id"].as_i64().unwrap();
    assert!(newest > oldest);
    assert_eq!(listed[0]["value_bytes"], 1);
    assert!(
        listed[0]["dedup_key"]
            .as_str()
            .is_some_and(|k| k.ends_with(&format!(":{newest}"))),
        "{listed:?}"
    );
    // A UTF-8 value shows as text, with no hex.
    let shown = CLI.json(&["dead", "show", &newest.to_string()]);
    assert_eq!(
        (&shown["value_utf8"], &shown["value_hex"], &shown["key"]),
        (&"v".into(), &serde_json::Value::Null, &listed[0]["key"]),
        "{shown}"
    );
    let table = CLI.ok(&["dead", "list", "--limit", "1"]);
    assert!(
        table.starts_with("ID") && table.contains("exchange not found"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 2, "{table}");

    // `dead requeue` with neither ids nor --all is refused, saying what it needs, and
    // re-queues nothing.
    let out = CLI.output(&["dead", "requeue"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("required") && err.contains("--all"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let status = CLI.json(&["status"]);
    assert_eq!(
        (status["pending"].as_i64(), status["dead"].as_i64()),
        (Some(1), Some(2)),
        "{status}"
    );

    assert_eq!(
        CLI.json(&["dead", "requeue", &newest.to_string()])["requeued"],
        1
    );
    let requeued = conn
        .query_one(
            &format!("SELECT state, attempts FROM {SCHEMA}.outbox_messages WHERE id = $1"),
            &[&newest],
        )
        .unwrap();
    assert_eq!(
        (requeued.get::<_, String>(0), requeued.get::<_, i32>(1)),
        ("pending".to_string(), 0)
    );
    assert_eq!(
        CLI.json(&["dead", "purge", "--older-than", "1h"])["purged"],
        0
    );
    assert_eq!(
        CLI.json(&["dead", "purge", &oldest.to_string()])["purged"],
        1
    );
    let status = CLI.json(&["status"]);
    assert_eq!(
        (status["pending"].as_i64(), status["dead"].as_i64()),
        (Some(2), Some(0))
    );
    assert!(CLI.ok(&["dead", "list"]).contains("no dead messages"));
}

/// Seconds from `t` to now, by the server's clock.
fn sql_age(conn: &mut postgres::Client, t: time::OffsetDateTime) -> f64 {
    conn.query_one(
        "SELECT extract(epoch FROM now() - $1::timestamptz)::float8",
        &[&t],
    )
    .unwrap()
    .get(0)
}

#[test]
fn help_and_usage_errors_are_clear() {
    let help = binary().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for word in [
        "migrate",
        "status",
        "maintain",
        "dead",
        "--json",
        "--database-url",
    ] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
    let dead_help =
        String::from_utf8(binary().args(["dead", "--help"]).output().unwrap().stdout).unwrap();
    for word in ["list", "requeue", "purge"] {
        assert!(dead_help.contains(word), "{dead_help}");
    }
    // Retention options concern migrate and maintain: the other commands do not list them.
    for word in ["--keep-sent", "--partition-interval", "--partitions-ahead"] {
        assert!(
            !dead_help.contains(word),
            "dead --help lists {word}: {dead_help}"
        );
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
    // The connection string is optional on the usage line: DATABASE_URL may give it.
    assert!(
        help.contains("Usage: troutbox [OPTIONS] <COMMAND>"),
        "{help}"
    );

    // requeue needs ids or --all; a bad schema name is refused before SQL; no server is
    // a one-line error.
    let out = CLI.output(&["dead", "requeue"]);
    assert!(!out.status.success());
    let out = Cli::new("x; DROP TABLE y").output(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid schema name"));
    let out = binary()
        .args([
            "--database-url",
            "host=127.0.0.1 port=1 connect_timeout=1",
            "status",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("troutbox: cannot connect to PostgreSQL"),
        "{err}"
    );
    // A table never migrated: the operator is told the command to run, not a Rust call.
    let out = Cli::new("cli_never_migrated").output(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run `troutbox migrate` first"), "{err}");
    assert!(!err.contains("PgStore::migrate()"), "{err}");
}

/// The start (Unix seconds) of a partition named `outbox_messages_p<start>`.
fn partition_start(name: &str) -> i64 {
    name.strip_prefix("outbox_messages_p")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a partition name: {name}"))
}

/// `maintain` does all three of its jobs, each seen in the catalog: creates a missing
/// partition ahead, creates the partitions of rows sitting in DEFAULT and moves them there,
/// and on the next run drops the expired partition holding only sent rows while keeping the
/// one with a pending row.
#[test]
fn maintain_runs_partition_maintenance_for_keep_sent_tables() {
    const KEEP: &str = "cli_keep";
    let pool = pool(4);
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {KEEP} CASCADE"))
        .unwrap();
    let cli = Cli::new(KEEP).options(&["--keep-sent", "7d", "--partitions-ahead", "5"]);
    let run = |args: &[&str]| cli.ok(args);
    let maintain =
        || -> serde_json::Value { serde_json::from_str(&run(&["maintain", "--json"])).unwrap() };
    run(&["migrate"]);
    let after_migrate = partitions(&pool, KEEP, "outbox_messages");
    assert_eq!(
        after_migrate.len(),
        1 + 6,
        "DEFAULT + current + 5 ahead: {after_migrate:?}"
    );
    assert!(after_migrate.contains(&"outbox_messages_default".to_string()));
    let report = maintain();
    assert_eq!(report["locked_out"], false);
    assert_eq!(
        names(&report["created"]),
        Vec::<String>::new(),
        "migrate already made them"
    );

    // Work for maintain: the furthest partition ahead is gone, and two rows from before any
    // partition sit in DEFAULT: a sent one 30 days old and a pending one 20 days old.
    let furthest = after_migrate
        .iter()
        .filter(|n| n.as_str() != "outbox_messages_default")
        .max_by_key(|n| partition_start(n))
        .unwrap()
        .clone();
    let mut conn = pool.get().unwrap();
    conn.batch_execute(&format!(
        "DROP TABLE {KEEP}.{furthest};
         INSERT INTO {KEEP}.outbox_messages (key, value, created_at, state, sent_at) VALUES
           ('old-sent', 'v', now() - interval '30 days', 'sent', now() - interval '30 days'),
           ('old-pending', 'v', now() - interval '20 days', 'pending', NULL)"
    ))
    .unwrap();
    let slot = |key: &str| -> String {
        let start: i64 = conn_slot(&pool, KEEP, key);
        format!("outbox_messages_p{start}")
    };
    let (sent_slot, pending_slot) = (slot("old-sent"), slot("old-pending"));
    let in_default = |pool: &troutbox::PgPool| {
        common::count(
            pool,
            &format!("SELECT count(*) FROM {KEEP}.outbox_messages_default"),
        )
    };
    assert_eq!(in_default(&pool), 2);

    let report = maintain();
    assert_eq!(report["locked_out"], false);
    let created = names(&report["created"]);
    for wanted in [&furthest, &sent_slot, &pending_slot] {
        assert!(created.contains(wanted), "{wanted} not created: {report}");
    }
    // Anything else created can only be a new slot ahead, after midnight UTC.
    let ahead = partition_start(&furthest);
    assert!(
        created
            .iter()
            .all(|n| [&furthest, &sent_slot, &pending_slot].contains(&n)
                || partition_start(n) > ahead),
        "{report}"
    );
    assert_eq!(names(&report["dropped"]), Vec::<String>::new(), "{report}");
    let catalog = partitions(&pool, KEEP, "outbox_messages");
    for wanted in [&furthest, &sent_slot, &pending_slot] {
        assert!(catalog.contains(wanted), "{wanted} not in {catalog:?}");
    }
    assert_eq!(in_default(&pool), 0, "rows moved out of DEFAULT");
    let home: String = conn
        .query_one(
            &format!("SELECT tableoid::regclass::text FROM {KEEP}.outbox_messages WHERE key = 'old-sent'"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(home, format!("{KEEP}.{sent_slot}"));

    // Next run: both are expired; the one holding only a sent row goes, the other stays.
    let report = maintain();
    assert_eq!(names(&report["created"]), Vec::<String>::new(), "{report}");
    assert_eq!(
        names(&report["dropped"]),
        vec![sent_slot.clone()],
        "{report}"
    );
    assert_eq!(
        report["kept"],
        serde_json::json!([{"partition": pending_slot, "unsent": 1}]),
        "{report}"
    );
    let catalog = partitions(&pool, KEEP, "outbox_messages");
    assert!(!catalog.contains(&sent_slot), "{catalog:?}");
    assert!(catalog.contains(&pending_slot), "{catalog:?}");
    let keys: Vec<String> = conn
        .query(
            &format!("SELECT key FROM {KEEP}.outbox_messages ORDER BY key"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, vec!["old-pending".to_string()]);
    let text = run(&["maintain"]);
    assert!(text.contains(&format!("{pending_slot}: 1")), "{text}");

    // maintain on a delete-on-send table (read from the table) says there is nothing to do.
    common::store("cli_maintain_plain", &pool);
    let out = Cli::new("cli_maintain_plain").output(&["maintain"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no partition to maintain"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The start of the one-day partition slot of the row with `key`.
fn conn_slot(pool: &troutbox::PgPool, schema: &str, key: &str) -> i64 {
    common::count(
        pool,
        &format!(
            "SELECT (floor(extract(epoch FROM created_at) / 86400) * 86400)::int8 \
             FROM {schema}.outbox_messages WHERE key = '{key}'"
        ),
    )
}
