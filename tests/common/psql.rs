//! `psql`, PostgreSQL's own command-line client (libpq, no Rust): the non-Rust producer of
//! the SQL producer function's tests, connected to the test server as any role.
//!
//! Included with `#[path]` by the tests that use it, next to `mod common;`.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

/// The `psql` binary: on `PATH`, else the newest under `/usr/lib/postgresql/*/bin` (where
/// Debian's `postgresql` package, which the tests' throw-away server needs, puts it).
pub fn binary() -> PathBuf {
    let on_path = Command::new("psql")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return PathBuf::from("psql");
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/psql"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("psql not found: install PostgreSQL's client (Debian: apt-get install postgresql-client)")
    })
}

/// How to reach the test server as `role` (`None`: the test server's own user), as a
/// libpq key=value string without the password, which goes through `PGPASSWORD` (not on a
/// command line), and the password.
fn conninfo(role: Option<(&str, &str)>, application_name: &str) -> (String, String) {
    let config: postgres::Config = crate::common::url().parse().expect("valid DATABASE_URL");
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = Vec::new();
    if let Some(postgres::config::Host::Tcp(host)) = config.get_hosts().first() {
        parts.push(format!("host={}", quote(host.as_str())));
    }
    if let Some(port) = config.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    if let Some(db) = config.get_dbname() {
        parts.push(format!("dbname={}", quote(db)));
    }
    let (user, password): (Option<String>, Vec<u8>) = match role {
        Some((user, password)) => (Some(user.to_owned()), password.as_bytes().to_vec()),
        None => (
            config.get_user().map(|u| u.to_owned()),
            config
                .get_password()
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
        ),
    };
    if let Some(user) = user {
        parts.push(format!("user={}", quote(&user)));
    }
    parts.push(format!("application_name={}", quote(application_name)));
    (
        parts.join(" "),
        String::from_utf8(password).expect("a UTF-8 password"),
    )
}

/// `psql` on the test server as `role`, stopping at the first error, printing rows
/// unaligned and without headers; the script comes on standard input.
fn command(role: Option<(&str, &str)>, application_name: &str) -> Command {
    let (info, password) = conninfo(role, application_name);
    let mut command = Command::new(binary());
    command
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &info])
        .env("PGPASSWORD", password)
        .env_remove("PGOPTIONS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `script` through psql as `role` and waits for it: its output, whatever its status.
pub fn run(role: Option<(&str, &str)>, script: &str) -> Output {
    let mut child = command(role, "troutbox_test_psql")
        .spawn()
        .expect("psql starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `script` as the test server's user: its standard output, or a panic with its errors.
pub fn ok(script: &str) -> String {
    let out = run(None, script);
    assert!(
        out.status.success(),
        "psql failed: {}\nscript:\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `script` as `role`, which must fail: its error output.
pub fn fails(role: Option<(&str, &str)>, script: &str) -> String {
    let out = run(role, script);
    assert!(
        !out.status.success(),
        "psql succeeded where it must fail; output: {}\nscript:\n{script}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// A psql session the test feeds statement by statement (to hold a transaction open), with
/// `application_name` set so that `pg_stat_activity` finds its backend.
pub struct Session {
    child: Option<Child>,
}

impl Session {
    pub fn start(application_name: &str) -> Session {
        Session {
            child: Some(
                command(None, application_name)
                    .spawn()
                    .expect("psql starts"),
            ),
        }
    }

    /// Sends `sql` (psql runs it as soon as it reads a full statement).
    pub fn send(&mut self, sql: &str) {
        let stdin = self.child.as_mut().unwrap().stdin.as_mut().unwrap();
        stdin.write_all(sql.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Whether psql has exited (a statement failed, with ON_ERROR_STOP).
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_some()
    }

    /// Ends the input and waits: psql's output, which must be a success.
    pub fn finish(mut self) -> String {
        let mut child = self.child.take().unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "psql session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A test that panicked leaves no psql behind (its transaction rolls back).
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
