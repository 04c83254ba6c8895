//! The `troutbox` command line end to end against a real server.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{eventually, pool, PATIENCE};
use troutbox::{Batch, Outbox, PgStore};

const SCHEMA: &str = "cli_e2e";

fn troutbox(args: &[&str]) -> Output {
    troutbox_in(SCHEMA, args)
}

fn troutbox_in(schema: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troutbox"))
        .args(["--database-url", &common::url(), "--schema", schema])
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = troutbox(args);
    assert!(
        out.status.success(),
        "troutbox {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&ok(&all)).unwrap()
}

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
    let run = |args: &[&str]| {
        let out = troutbox_in(ORDERED, args);
        assert!(
            out.status.success(),
            "troutbox {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
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
    let again = troutbox_in(ORDERED, &["skip", &head.to_string()]);
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

    assert!(ok(&["migrate"]).contains("is up to date"));
    ok(&["migrate"]); // idempotent

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

    let status = json(&["status"]);
    assert_eq!(status["pending"], 1);
    assert_eq!(status["dead"], 2);
    assert!(status["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
    let text = ok(&["status"]);
    assert!(
        text.contains("pending") && text.contains("oldest pending"),
        "{text}"
    );

    let listed = json(&["dead", "list"]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["last_error"], "exchange not found");
    assert_eq!(listed[0]["attempts"], 1);
    let newest = listed[0]["id"].as_i64().unwrap();
    let oldest = listed[1]["id"].as_i64().unwrap();
    assert!(newest > oldest);
    let table = ok(&["dead", "list", "--limit", "1"]);
    assert!(
        table.starts_with("ID") && table.contains("exchange not found"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 2, "{table}");

    assert_eq!(
        json(&["dead", "requeue", &newest.to_string()])["requeued"],
        1
    );
    assert_eq!(json(&["dead", "purge", "--older-than", "1h"])["purged"], 0);
    assert_eq!(json(&["dead", "purge", &oldest.to_string()])["purged"], 1);
    let status = json(&["status"]);
    assert_eq!(
        (status["pending"].as_i64(), status["dead"].as_i64()),
        (Some(2), Some(0))
    );
    assert!(ok(&["dead", "list"]).contains("no dead messages"));
}

#[test]
fn help_and_usage_errors_are_clear() {
    let help = Command::new(env!("CARGO_BIN_EXE_troutbox"))
        .arg("--help")
        .output()
        .unwrap();
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
    let dead_help = String::from_utf8(
        Command::new(env!("CARGO_BIN_EXE_troutbox"))
            .args(["dead", "--help"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for word in ["list", "requeue", "purge"] {
        assert!(dead_help.contains(word), "{dead_help}");
    }

    // requeue needs ids or --all; a bad schema name is refused before SQL; no server is
    // a one-line error.
    let out = troutbox(&["dead", "requeue"]);
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_troutbox"))
        .args([
            "--database-url",
            &common::url(),
            "--schema",
            "x; DROP TABLE y",
            "status",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid schema name"));
    let out = Command::new(env!("CARGO_BIN_EXE_troutbox"))
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
}

#[test]
fn maintain_runs_partition_maintenance_for_keep_sent_tables() {
    let pool = pool(4);
    pool.get()
        .unwrap()
        .batch_execute("DROP SCHEMA IF EXISTS cli_keep CASCADE")
        .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_troutbox"))
            .args(["--database-url", &common::url(), "--schema", "cli_keep"])
            .args(["--keep-sent", "7d", "--partitions-ahead", "5"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["migrate"]);
    let report: serde_json::Value = serde_json::from_str(&run(&["maintain", "--json"])).unwrap();
    assert_eq!(report["locked_out"], false);
    assert_eq!(
        report["created"].as_array().unwrap().len(),
        0,
        "migrate already made them"
    );
    let partitions: i64 = pool
        .get()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'cli_keep.outbox_messages'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(partitions, 1 + 6, "DEFAULT + current + 5 ahead");
    // maintain on a table without --keep-sent explains what it needs.
    let out = troutbox(&["maintain"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--keep-sent"));
}
