//! Scaffolding of the relay service's tests (`tests/relay_service*.rs`): databases of the
//! test server, configuration files, the `troutbox relay` process with its output read as it
//! comes, producers through the SQL producer function, and the kills of a service at work.
//!
//! Included with `#[path]` next to `mod common;`.

#![allow(dead_code)]

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use troutbox::PgPool;

use crate::common::{eventually, PATIENCE};

/// A connection string for database `db` of the test server (the password included: it
/// reaches the service through an environment variable, never its command line).
pub fn url_of(db: &str) -> String {
    let config: postgres::Config = crate::common::url().parse().unwrap();
    let mut parts = Vec::new();
    if let Some(postgres::config::Host::Tcp(host)) = config.get_hosts().first() {
        parts.push(format!("host={host}"));
    }
    if let Some(port) = config.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if let Some(password) = config.get_password() {
        parts.push(format!("password={}", String::from_utf8_lossy(password)));
    }
    parts.push(format!("dbname={db}"));
    parts.push("connect_timeout=5".into());
    parts.join(" ")
}

/// A fresh database `db` on the test server, and a pool on it.
pub fn fresh_database(db: &str, pool_size: u32) -> PgPool {
    let mut admin = postgres::Client::connect(&crate::common::url(), postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    troutbox::pool(url_of(db).parse().unwrap(), pool_size).unwrap()
}

/// A configuration file with `text`, in a directory of the test's own.
pub fn config_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("troutbox-relay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// One run of the service, its standard output (the log sink's lines) and standard error
/// (its log) read by threads as they come.
pub struct Service {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The reader threads, which end when the process has exited and its pipes closed.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Service {
    pub fn start(config: &PathBuf, env: &[(&str, String)]) -> Service {
        let mut command = Command::new(env!("CARGO_BIN_EXE_troutbox"));
        command
            .args(["relay", "--config"])
            .arg(config)
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let mut readers = Vec::new();
        let mut read = |pipe: Box<dyn Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let into = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    into.lock().unwrap().push(line);
                }
            }));
            lines
        };
        let stdout = read(Box::new(child.stdout.take().unwrap()));
        let stderr = read(Box::new(child.stderr.take().unwrap()));
        Service {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The messages printed so far: (source, id, key, value).
    pub fn delivered(&self) -> Vec<(String, i64, String, String)> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                (
                    v["source"].as_str().unwrap().to_owned(),
                    v["id"].as_i64().unwrap(),
                    v["key"].as_str().unwrap().to_owned(),
                    v["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `patience` for the process to exit.
    pub fn wait(&mut self, patience: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.join_readers();
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(mut self) -> Vec<(String, i64, String, String)> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_readers();
        self.delivered()
    }

    /// Waits until the readers have taken every line the exited process wrote.
    pub fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the service on a configuration that must be refused: its error output. A service
/// that starts instead is killed after [`PATIENCE`] and fails the test.
pub fn refused(name: &str, text: &str, env: &[(&str, &str)]) -> String {
    let path = config_file(name, text);
    let env: Vec<(&str, String)> = env.iter().map(|(n, v)| (*n, v.to_string())).collect();
    let mut service = Service::start(&path, &env);
    let status = service.wait(PATIENCE);
    let stderr = service.log();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "{name}: not refused: {stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}: one error line, got: {stderr}"
    );
    stderr
}

/// Producers through the SQL producer function into `pool`'s default table: `threads`
/// threads committing one message per transaction (one in ten rolled back), a transaction
/// every `pace` at most, until `stop`. Joining the handle gives the committed values, each
/// `<source>-<thread>-<n>`, keyed `key-<n mod 7>`.
pub fn produce(
    pool: &PgPool,
    source: &str,
    threads: usize,
    pace: Duration,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    let producers: Vec<_> = (0..threads)
        .map(|t| {
            let pool = pool.clone();
            let source = source.to_owned();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut committed = Vec::new();
                let mut conn = pool.get().unwrap();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let value = format!("{source}-{t}-{i}");
                    let key = format!("key-{}", i % 7);
                    let mut tx = conn.transaction().unwrap();
                    tx.execute(
                        "SELECT public.outbox_messages_add($1, convert_to($2, 'UTF8'))",
                        &[&key, &value],
                    )
                    .unwrap();
                    if i % 10 == 9 {
                        tx.rollback().unwrap();
                    } else {
                        tx.commit().unwrap();
                        committed.push(value);
                    }
                    i += 1;
                    // A steady stream, not a flood the last run would spend minutes on.
                    std::thread::sleep(pace);
                }
                committed
            })
        })
        .collect();
    std::thread::spawn(move || {
        producers
            .into_iter()
            .flat_map(|p| p.join().unwrap())
            .collect()
    })
}

/// A Python interpreter that has psycopg (Debian's `python3-psycopg` goes with the system's
/// `/usr/bin/python3`, which may not be the first `python3` on `PATH`).
pub fn python() -> &'static str {
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import psycopg"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| {
            panic!("no python3 with psycopg: install it (Debian: apt-get install python3-psycopg)")
        })
}

/// `examples/sql_producer.py`, the Python producer of docs/sql-producer.md, into database
/// `db`: values `<prefix>-<n>`, a transaction every `pace`, until `stop` (then SIGTERM, which
/// it handles by finishing its transaction). Joining the handle gives the committed values,
/// as it printed them after each COMMIT.
pub fn produce_python(
    db: &str,
    prefix: &str,
    pace: Duration,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    let mut child = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/sql_producer.py"
        ))
        .args(["--count", "100000000", "--prefix", prefix])
        .args(["--pace-ms", &pace.as_millis().to_string()])
        .env("DATABASE_URL", url_of(db))
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let stop = stop.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the Python producer exited early"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        assert!(status.success(), "the Python producer failed: {status}");
        reader.join().unwrap()
    })
}

/// A pseudo-random number below `n`, from the clock (no dependency for one number).
pub fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos.wrapping_mul(6364136223846793005).rotate_left(17) % n
}

/// Runs the service on `config` `kills` times, each run SIGKILLed at a random moment 0-450
/// ms after every one of `sources` logged `source <name>: <ready>` ("relaying", or "first
/// messages sent": timed from the relays' work, not the process's start, since connecting
/// with SCRAM in a debug build takes a good part of a second). What the killed runs printed,
/// and how many of them printed something.
pub fn kill_repeatedly(
    config: &PathBuf,
    env: &[(&str, String)],
    sources: &[&str],
    ready: &str,
    kills: usize,
) -> (Vec<(String, i64, String, String)>, usize) {
    let (mut delivered, mut delivering) = (Vec::new(), 0);
    for _ in 0..kills {
        let service = Service::start(config, env);
        assert!(
            eventually(PATIENCE, || {
                let log = service.log();
                sources
                    .iter()
                    .all(|s| log.contains(&format!("source {s}: {ready}")))
            }),
            "{}",
            service.log()
        );
        std::thread::sleep(Duration::from_millis(random_below(450)));
        let printed = service.kill();
        delivering += usize::from(!printed.is_empty());
        delivered.extend(printed);
    }
    (delivered, delivering)
}

/// What [`two_databases_through_kills`] did.
pub struct KillRun {
    /// What the runs printed (the log sink; nothing with another sink), killed ones and the
    /// last one.
    pub delivered: Vec<(String, i64, String, String)>,
    pub committed_a: Vec<String>,
    pub committed_b: Vec<String>,
    pub kills: usize,
    /// Killed runs that printed something.
    pub delivering: usize,
    /// Messages still pending when the last run started.
    pub left_for_the_last_run: i64,
}

/// The service relaying two fresh databases `a` (ordered, migrated by the service itself,
/// `migrate = true`) and `b` (migrated beforehand) of the test server to `sink` (its TOML
/// table), while producers call the SQL producer function in both (in `b`, with
/// `python_in_b`, `examples/sql_producer.py`); `kills` runs SIGKILLed
/// 0-450 ms after both sources logged `ready`, then a last run that drains both and must
/// stop with status 0 on SIGTERM.
pub fn two_databases_through_kills(
    name: &str,
    sink: &str,
    ready: &str,
    kills: usize,
    drain_patience: Duration,
    python_in_b: bool,
) -> KillRun {
    let (db_a, db_b) = (format!("{name}_a"), format!("{name}_b"));
    let a = fresh_database(&db_a, 4);
    let b = fresh_database(&db_b, 4);
    troutbox::PgStore::new(b.clone()).migrate().unwrap();
    let source = |n: &str, ordered: bool| {
        format!(
            "[[source]]
             name = \"{n}\"
             database_url_env = \"SOURCE_{}_URL\"
             per_key_ordering = {ordered}
             migrate = {ordered}
             workers = 2
             batch_size = 20
             poll_interval = \"10ms\"\n",
            n.to_uppercase()
        )
    };
    let config = config_file(
        name,
        &format!(
            "{sink}\n[service]\nshutdown_timeout = \"10s\"\n{}{}",
            source("a", true),
            source("b", false)
        ),
    );
    let env = [
        ("SOURCE_A_URL", url_of(&db_a)),
        ("SOURCE_B_URL", url_of(&db_b)),
    ];
    // The first run migrates a: producers start once its function exists.
    let first = Service::start(&config, &env);
    assert!(
        eventually(PATIENCE, || troutbox::PgStore::new(a.clone())
            .backlog()
            .is_ok()),
        "{}",
        first.log()
    );
    let mut delivered = first.kill();
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Duration::from_millis(2);
    let producing_a = produce(&a, "a", 2, pace, &stop);
    let producing_b = if python_in_b {
        produce_python(&db_b, "b", pace, &stop)
    } else {
        produce(&b, "b", 2, pace, &stop)
    };
    let (printed, delivering) = kill_repeatedly(&config, &env, &["a", "b"], ready, kills);
    delivered.extend(printed);
    stop.store(true, Ordering::SeqCst);
    let committed_a = producing_a.join().unwrap();
    let committed_b = producing_b.join().unwrap();
    let pending = |pool: &PgPool| {
        troutbox::PgStore::new(pool.clone())
            .backlog()
            .unwrap()
            .pending
    };
    let left_for_the_last_run = pending(&a) + pending(&b);
    let mut last = Service::start(&config, &env);
    assert!(
        eventually(drain_patience, || pending(&a) == 0 && pending(&b) == 0),
        "{}",
        last.log()
    );
    last.signal("TERM");
    let status = last.wait(PATIENCE).expect("stops within its bound");
    assert!(status.success(), "{status}: {}", last.log());
    delivered.extend(last.delivered());
    KillRun {
        delivered,
        committed_a,
        committed_b,
        kills,
        delivering,
        left_for_the_last_run,
    }
}
