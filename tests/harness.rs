//! The throw-away server of `troutbox::testing` is safe on a shared machine (issue 11): no
//! connection without its random password, a private directory, a clean environment.

use std::os::unix::fs::PermissionsExt;

use troutbox::testing::TempPostgres;

#[test]
fn the_throw_away_server_is_private() {
    // A secret in this process's environment must not reach the server's.
    std::env::set_var("TROUTBOX_HARNESS_SECRET_PROBE", "do-not-leak");
    let server = TempPostgres::start().unwrap();
    let url = server.url();
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();

    // Without the password (what any local user or container on the host would try): refused.
    let without: String = url
        .split_whitespace()
        .filter(|part| !part.starts_with("password="))
        .collect::<Vec<_>>()
        .join(" ");
    let Err(err) = postgres::Client::connect(&without, postgres::NoTls) else {
        panic!("a connection without the password was accepted");
    };
    let text = format!("{err:?}");
    assert!(
        text.contains("password") || text.contains("28P01"),
        "a connection without the password must be refused: {text}"
    );

    // The directory holding data, log and socket is private.
    let dir = server.data_dir().parent().unwrap().to_path_buf();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", dir.display());
    let log = std::fs::metadata(dir.join("server.log")).unwrap();
    assert_eq!(log.permissions().mode() & 0o077, 0, "the log is private");

    // The server's environment holds none of ours: read it as a superuser can, through a
    // program the server runs (PostgreSQL overwrites its own /proc environ for ps).
    client
        .batch_execute("CREATE TEMP TABLE env (line text); COPY env FROM PROGRAM 'env'")
        .unwrap();
    let lines: Vec<String> = client
        .query("SELECT line FROM env", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("PATH=")),
        "the probe should read the environment: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("do-not-leak")),
        "{lines:?}"
    );
}
