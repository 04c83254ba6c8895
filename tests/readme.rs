//! The README's code blocks are real programs, compiled and run here.
//!
//! Each ```` ```rust ```` block of README.md is, word for word, the part of a program under
//! `tests/readme/` between its `// README begin` and `// README end` lines (without their
//! common indentation), and every such program is shown in the README. Each program runs
//! against a real PostgreSQL server, in a database of its own, and what it did is checked.
//! So the README shows clean code, with no hidden doctest lines, and cannot drift from the API.

use std::sync::mpsc;
use std::time::Duration;

mod five_minutes {
    include!("readme/five_minutes.rs");

    pub fn run() -> Result<(), String> {
        main().map_err(|e| e.to_string())
    }
}

mod inbox {
    include!("readme/inbox.rs");

    pub fn run() -> Result<(), String> {
        main().map_err(|e| e.to_string())
    }
}

mod ordering {
    include!("readme/ordering.rs");

    pub fn run() -> Result<(), String> {
        main().map_err(|e| e.to_string())
    }
}

#[cfg(feature = "mariadb")]
mod mariadb {
    include!("readme/mariadb.rs");

    pub fn run() -> Result<(), String> {
        main().map_err(|e| e.to_string())
    }
}

/// The programs, by file name.
const PROGRAMS: [(&str, &str); 4] = [
    ("mariadb.rs", include_str!("readme/mariadb.rs")),
    ("five_minutes.rs", include_str!("readme/five_minutes.rs")),
    ("inbox.rs", include_str!("readme/inbox.rs")),
    ("ordering.rs", include_str!("readme/ordering.rs")),
];

/// The part of a program the README shows: its lines between the markers, dedented.
fn shown_part(name: &str, program: &str) -> String {
    let lines: Vec<&str> = program.lines().collect();
    let begin = lines
        .iter()
        .position(|l| l.trim() == "// README begin")
        .unwrap_or_else(|| panic!("{name}: no `// README begin` line"));
    let end = lines
        .iter()
        .position(|l| l.trim() == "// README end")
        .unwrap_or_else(|| panic!("{name}: no `// README end` line"));
    let shown = &lines[begin + 1..end];
    let indent = shown
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let dedented: Vec<&str> = shown
        .iter()
        .map(|l| {
            if l.trim().is_empty() {
                ""
            } else {
                &l[indent..]
            }
        })
        .collect();
    dedented.join("\n")
}

/// The README's ```rust blocks, in order.
fn readme_blocks() -> Vec<String> {
    let readme = include_str!("../README.md");
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in readme.lines() {
        match &mut current {
            None if line.starts_with("```rust") => current = Some(Vec::new()),
            Some(block) if line.starts_with("```") => {
                blocks.push(block.join("\n"));
                current = None;
            }
            Some(block) => block.push(line),
            None => {}
        }
    }
    blocks
}

#[test]
fn every_readme_code_block_is_a_program_under_tests_readme_and_every_program_is_shown() {
    let shown: Vec<(&str, String)> = PROGRAMS
        .iter()
        .map(|(name, program)| (*name, shown_part(name, program)))
        .collect();
    let blocks = readme_blocks();
    for block in &blocks {
        assert!(
            !block.lines().any(|l| l.starts_with("# ") || l == "#"),
            "a README block has hidden doctest lines:\n{block}"
        );
        assert!(
            shown.iter().any(|(_, part)| part == block),
            "this README block is not the shown part of any program under tests/readme/ \
             (edit the program, then copy its part between the README markers):\n{block}"
        );
    }
    for (name, part) in &shown {
        assert!(
            blocks.iter().any(|b| b == part),
            "tests/readme/{name}'s shown part is not in the README"
        );
    }
}

/// `url` with its database name replaced by `dbname`, in either connection-string form.
fn with_dbname(url: &str, dbname: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (rest, query) = match rest.split_once('?') {
                Some((rest, query)) => (rest, format!("?{query}")),
                None => (rest, String::new()),
            };
            let authority = rest.split('/').next().unwrap_or(rest);
            format!("{scheme}://{authority}/{dbname}{query}")
        }
        None => format!("{url} dbname={dbname}"),
    }
}

/// Runs a program with `DATABASE_URL` pointing at a fresh database named `dbname`, and
/// returns a client on that database.
fn run(base_url: &str, dbname: &str, program: fn() -> Result<(), String>) -> postgres::Client {
    let mut admin = postgres::Client::connect(base_url, postgres::NoTls).unwrap();
    // Two statements: DROP DATABASE cannot run inside the implicit transaction of a batch.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .unwrap();
    let url = with_dbname(base_url, dbname);
    // The programs read DATABASE_URL as a user's would. Set here only, by the one test that
    // runs programs, one at a time.
    std::env::set_var("DATABASE_URL", &url);
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || done_tx.send(program()));
    match done_rx.recv_timeout(Duration::from_secs(90)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{dbname}: the program failed: {e}"),
        Err(_) => panic!("{dbname}: the program did not end within 90 s"),
    }
    postgres::Client::connect(&url, postgres::NoTls).unwrap()
}

fn count(client: &mut postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn the_readme_programs_run_and_deliver_what_they_say() {
    let base_url = troutbox::testing::database_url().unwrap_or_else(|e| panic!("{e}"));

    // The five-minute program: its order committed, its message delivered and deleted.
    let mut db = run(&base_url, "readme_five_minutes", five_minutes::run);
    assert_eq!(count(&mut db, "SELECT count(*) FROM orders"), 1);
    assert_eq!(
        count(&mut db, "SELECT count(*) FROM outbox_messages"),
        0,
        "the program ended with its message still in the outbox (not delivered, or dead)"
    );

    // The ordering block: k1's first message refused once, then k1 in order; k2 delivered.
    let mut db = run(&base_url, "readme_ordering", ordering::run);
    assert_eq!(count(&mut db, "SELECT count(*) FROM outbox_messages"), 0);
    let log = ordering::LOG.lock().unwrap().clone();
    let k1: Vec<(&str, bool)> = log
        .iter()
        .filter(|e| e.0 == "k1")
        .map(|e| (e.1.as_str(), e.2))
        .collect();
    assert_eq!(k1, [("1", false), ("1", true), ("2", true)], "{log:?}");
    assert!(log.iter().any(|e| e.0 == "k2" && e.2), "{log:?}");

    // The inbox block, then the same message again: applied once.
    let mut db = run(&base_url, "readme_inbox", inbox::run);
    assert_eq!(count(&mut db, "SELECT paid FROM accounts WHERE id = 42"), 1);
}

/// The MariaDB program, in a database of its own on the test server (feature `mariadb`):
/// its order committed, its message delivered and deleted.
#[cfg(feature = "mariadb")]
#[test]
fn the_readme_mariadb_program_runs_and_delivers() {
    use troutbox::mariadb::mysql::prelude::Queryable;
    let base_url = troutbox::testing::mariadb_url().unwrap_or_else(|e| panic!("{e}"));
    let mut admin = troutbox::mariadb::mysql::Conn::new(
        troutbox::mariadb::mysql::Opts::from_url(&base_url).unwrap(),
    )
    .unwrap();
    admin
        .query_drop("DROP DATABASE IF EXISTS readme_mariadb")
        .unwrap();
    admin.query_drop("CREATE DATABASE readme_mariadb").unwrap();
    let url = with_dbname(&base_url, "readme_mariadb");
    // The program reads MARIADB_URL as a user's would; only this test sets it.
    std::env::set_var("MARIADB_URL", &url);
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || done_tx.send(mariadb::run()));
    match done_rx.recv_timeout(Duration::from_secs(90)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("the MariaDB program failed: {e}"),
        Err(_) => panic!("the MariaDB program did not end within 90 s"),
    }
    let orders: Option<i64> = admin
        .query_first("SELECT COUNT(*) FROM readme_mariadb.orders")
        .unwrap();
    let left: Option<i64> = admin
        .query_first("SELECT COUNT(*) FROM readme_mariadb.outbox_messages")
        .unwrap();
    assert_eq!((orders, left), (Some(1), Some(0)));
}
