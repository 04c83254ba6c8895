//! The `troutbox` command line against hostile input and operator mistakes (issue 11):
//! no panic on an absurd duration, no terminal control from a stored key or error, bounded
//! listings.

mod common;

use common::cli::Cli;
use common::{pool, store};
use troutbox::Outbox;

const SCHEMA: &str = "cli_hardening";

/// The command line on this file's schema.
const CLI: Cli = Cli::new(SCHEMA);

#[test]
fn hostile_input_and_absurd_options_are_errors_not_panics() {
    let pool = pool(4);
    let store = store(SCHEMA, &pool);
    // A key and an error text that would clear the screen and forge a table line.
    let evil = "k\u{1b}[2J\nID  FAKE-LINE\r";
    let outbox = Outbox::builder(store.clone()).build().unwrap();
    outbox
        .add_message(&mut *pool.get().unwrap(), evil, b"v")
        .unwrap();
    pool.get()
        .unwrap()
        .batch_execute(&format!(
            "UPDATE {SCHEMA}.outbox_messages SET state = 'dead', last_error = E'boom\\x1b[31m\\nFAKE'"
        ))
        .unwrap();

    let out = CLI.output(&["dead", "list"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    assert_eq!(text.lines().count(), 2, "one header and one row: {text:?}");
    assert!(text.contains("\\u{1b}[2J\\nID"), "{text:?}");

    // 20,000 years before now is before the year -9999: an error, not a panic.
    let out = CLI.output(&["dead", "purge", "--older-than", "20000y"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--older-than") && !stderr.contains("panicked"),
        "{stderr}"
    );

    // Listings are bounded.
    let out = CLI.output(&["dead", "list", "--limit", "100000"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1..=1000"));
}

/// `maintain` reads the retention from the table when no `--keep-sent` is given, and refuses
/// a `--keep-sent` other than the table's (which would drop audit history early).
#[test]
fn maintain_uses_the_tables_retention() {
    const KEEP: &str = "cli_hardening_keep";
    let pool = pool(2);
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {KEEP} CASCADE"))
        .unwrap();
    let run = |args: &[&str]| Cli::new(KEEP).output(args);
    assert!(run(&["--keep-sent", "30d", "migrate"]).status.success());
    let wrong = run(&["--keep-sent", "1d", "maintain"]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("was created with keep_sent(2592000 s)"),
        "{stderr}"
    );
    let right = run(&["maintain", "--json"]);
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
}

/// The command line as an operator scripts it: `status` as a health check with documented
/// exit statuses, `dead show` for one message whole, errors as JSON under `--json`, and
/// `--database-url` accepted after the subcommand.
#[test]
fn status_thresholds_dead_show_and_json_errors() {
    const OPS: &str = "cli_hardening_ops";
    let pool = pool(2);
    let store = store(OPS, &pool);
    let outbox = Outbox::builder(store.clone()).build().unwrap();
    let mut conn = pool.get().unwrap();
    outbox
        .add(
            &mut *conn,
            &troutbox::NewMessage::new("k1", &[0xff, 0x00, 0x41]).header("trace", "t\u{1b}1"),
        )
        .unwrap();
    outbox.add_message(&mut *conn, "k2", b"fine").unwrap();
    let dead_id: i64 = conn
        .query_one(
            &format!(
                "UPDATE {OPS}.outbox_messages SET state = 'dead', last_error = 'boom: the whole story'
                 WHERE key = 'k1' RETURNING id"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    // --database-url after the subcommand.
    let run = |args: &[&str]| Cli::new(OPS).url_last().output(args);

    let healthy = run(&["status", "--max-pending", "5", "--max-age", "1h", "--json"]);
    assert_eq!(healthy.status.code(), Some(0));
    let unhealthy = run(&["status", "--max-pending", "0", "--max-dead", "0", "--json"]);
    assert_eq!(
        unhealthy.status.code(),
        Some(3),
        "the documented 'unhealthy' status"
    );
    let report: serde_json::Value = serde_json::from_slice(&unhealthy.stdout).unwrap();
    assert_eq!(report["healthy"], false);
    assert_eq!(report["exceeded"], serde_json::json!(["pending", "dead"]));

    let shown = run(&["dead", "show", &dead_id.to_string(), "--json"]);
    assert!(shown.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["value_hex"], "ff0041");
    assert_eq!(shown["value_utf8"], serde_json::Value::Null);
    assert_eq!(shown["value_bytes"], 3);
    assert_eq!(shown["id"], dead_id);
    assert_eq!(shown["last_error"], "boom: the whole story");
    assert_eq!(shown["headers"], serde_json::json!([["trace", "t\u{1b}1"]]));
    let text = String::from_utf8(run(&["dead", "show", &dead_id.to_string()]).stdout).unwrap();
    assert!(
        text.contains("(not UTF-8, hex) ff0041") && !text.contains('\u{1b}'),
        "{text:?}"
    );

    let missing = run(&["dead", "show", "999999999", "--json"]);
    assert_eq!(missing.status.code(), Some(1));
    let error: serde_json::Value = serde_json::from_slice(&missing.stderr).unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("no dead message"),
        "{error}"
    );
}
