//! The `troutbox` command line on a MariaDB table (features `cli` and `mariadb`): migrate,
//! status, and the dead letters, as an operator runs them.

use std::process::Command;

use troutbox::mariadb::{pool, MariaDbOutbox, MariaDbStore};
use troutbox::Batch;

fn troutbox(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_troutbox"))
        .args(["--database-url", url, "--table", "cli_outbox", "--json"])
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(url: &str, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = troutbox(url, args);
    assert!(ok, "troutbox {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn migrate_status_and_dead_letters_on_mariadb() {
    let url = troutbox::testing::mariadb_url().unwrap();
    json(&url, &["migrate"]);
    let pool = pool(&url, 4).unwrap();
    let outbox = MariaDbOutbox::builder(MariaDbStore::new(pool.clone()).table("cli_outbox"))
        .max_retries(0)
        .build()
        .unwrap();
    {
        let mut conn = pool.get().unwrap();
        outbox.add_message(&mut *conn, "k", b"refused").unwrap();
    }
    // A Sender that refuses everything: with no retries, the message is dead at once.
    let mut handle = outbox
        .start(|b: &mut Batch| -> Result<(), std::io::Error> {
            for m in b.iter_mut() {
                m.mark_failed("the broker said no");
            }
            Ok(())
        })
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while outbox.store().backlog().unwrap().dead < 1 {
        assert!(std::time::Instant::now() < deadline, "never dead");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    handle.shutdown().unwrap();

    let status = json(&url, &["status"]);
    assert_eq!(status["dead"], 1, "{status}");
    let list = json(&url, &["dead", "list"]);
    let id = list[0]["id"].as_i64().unwrap();
    assert_eq!(list[0]["key"], "k", "{list}");
    let shown = json(&url, &["dead", "show", &id.to_string()]);
    assert_eq!(shown["last_error"], "the broker said no", "{shown}");
    assert_eq!(json(&url, &["dead", "requeue", "--all"])["requeued"], 1);
    assert_eq!(json(&url, &["status"])["pending"], 1);
    // What MariaDB does not have is refused, in words.
    let (ok, _, err) = troutbox(&url, &["maintain"]);
    assert!(!ok && err.contains("not available on MariaDB"), "{err}");
}
