//! `troutbox relay --config relay.toml`, the relay service, run as a process against real
//! PostgreSQL databases: configurations refused at start with one clear error each; two
//! databases relayed through repeated SIGKILLs with nothing lost; SIGTERM with batches in
//! flight; a second signal; a source whose database is down costs only itself, and
//! `/healthz` and `/metrics` say so. The sink is `log` (one JSON line per message on
//! standard output): what a killed service printed is what it delivered.

#[path = "common/broker.rs"]
mod broker;
mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, PATIENCE};
use troutbox::{Outbox, PgPool, PgStore};

/// A connection string for database `db` of the test server (the password included: it
/// reaches the service through an environment variable, never its command line).
fn url_of(db: &str) -> String {
    let config: postgres::Config = common::url().parse().unwrap();
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
fn fresh_database(db: &str, pool_size: u32) -> PgPool {
    let mut admin = postgres::Client::connect(&common::url(), postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    troutbox::pool(url_of(db).parse().unwrap(), pool_size).unwrap()
}

/// A configuration file with `text`, in a directory of the test's own.
fn config_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("troutbox-relay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// One run of the service, its standard output (the log sink's lines) and standard error
/// (its log) read by threads as they come.
struct Service {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The reader threads, which end when the process has exited and its pipes closed.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Service {
    fn start(config: &PathBuf, env: &[(&str, String)]) -> Service {
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The messages printed so far: (source, id, key, value).
    fn delivered(&self) -> Vec<(String, i64, String, String)> {
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

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `patience` for the process to exit.
    fn wait(&mut self, patience: Duration) -> Option<ExitStatus> {
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

    fn kill(mut self) -> Vec<(String, i64, String, String)> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_readers();
        self.delivered()
    }

    /// Waits until the readers have taken every line the exited process wrote.
    fn join_readers(&mut self) {
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
fn refused(name: &str, text: &str, env: &[(&str, &str)]) -> String {
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

#[test]
fn bad_configurations_are_refused_at_start_with_one_error_naming_the_key() {
    let source = |extra: &str| {
        format!(
            "[sink.log]\n[[source]]\nname = \"a\"\ndatabase_url = \"host=127.0.0.1 dbname=x\"\n{extra}\n"
        )
    };
    // (name, file, environment, what the error says)
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown_source_key",
            source("batchsize = 10"),
            vec![],
            "unknown field `batchsize`",
        ),
        (
            "unknown_table",
            format!("{}[servce]\nlisten = \"127.0.0.1:0\"\n", source("")),
            vec![],
            "unknown field `servce`",
        ),
        (
            "unknown_sink",
            "[sink.nats]\n[[source]]\nname = \"a\"\ndatabase_url = \"host=x\"\n".into(),
            vec![],
            "unknown variant `nats`",
        ),
        (
            "bad_url",
            "[sink.log]\n[[source]]\nname = \"a\"\ndatabase_url = \"host=x port=many\"\n".into(),
            vec![],
            "source \"a\".database_url: not a PostgreSQL connection string",
        ),
        (
            "bad_option",
            source("batch_size = 0"),
            vec![],
            "batch_size",
        ),
        (
            "bad_identifier",
            source("table = \"orders; DROP TABLE x\""),
            vec![],
            "source \"a\"",
        ),
        (
            "bad_duration",
            source("poll_interval = \"fast\""),
            vec![],
            "invalid duration \"fast\"",
        ),
        (
            "missing_secret",
            "[sink.log]\n[[source]]\nname = \"a\"\ndatabase_url_env = \"TROUTBOX_TEST_NOT_SET\"\n".into(),
            vec![],
            "source \"a\".database_url_env: the environment variable TROUTBOX_TEST_NOT_SET is not set",
        ),
        (
            "two_secrets",
            "[sink.log]\n[[source]]\nname = \"a\"\ndatabase_url = \"host=x\"\ndatabase_url_env = \"X\"\n".into(),
            vec![("X", "host=y")],
            "give only one of",
        ),
        (
            "no_source",
            "[sink.log]\n".into(),
            vec![],
            "source: none given",
        ),
        (
            "same_name",
            format!("{}[[source]]\nname = \"a\"\ndatabase_url = \"host=y\"\n", source("")),
            vec![],
            "source[1].name: \"a\" names another source too",
        ),
        (
            "maintenance_without_keep_sent",
            source("maintenance = true"),
            vec![],
            "source \"a\".maintenance",
        ),
    ];
    for (name, text, env, expected) in cases {
        let stderr = refused(name, &text, &env);
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
}

/// Committed values per database, produced through the SQL producer function by `threads`
/// producers of `per_thread` transactions, one in ten rolled back.
fn produce(pool: &PgPool, source: &str, threads: usize, per_thread: usize) -> Vec<String> {
    let committed = Arc::new(Mutex::new(Vec::new()));
    let producers: Vec<_> = (0..threads)
        .map(|t| {
            let pool = pool.clone();
            let committed = committed.clone();
            let source = source.to_owned();
            std::thread::spawn(move || {
                let mut conn = pool.get().unwrap();
                for i in 0..per_thread {
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
                        committed.lock().unwrap().push(value);
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    Arc::try_unwrap(committed).unwrap().into_inner().unwrap()
}

#[test]
fn two_databases_relayed_through_kills_lose_nothing_and_keep_order() {
    let a = fresh_database("relay_svc_kill_a", 4);
    let b = fresh_database("relay_svc_kill_b", 4);
    // Database a is migrated by the service itself (ordered, `migrate = true`); b by its
    // owner beforehand.
    PgStore::new(b.clone()).migrate().unwrap();
    let config = config_file(
        "kills",
        "[sink.log]
         [service]
         shutdown_timeout = \"10s\"
         [[source]]
         name = \"a\"
         database_url_env = \"SOURCE_A_URL\"
         per_key_ordering = true
         migrate = true
         workers = 2
         batch_size = 20
         poll_interval = \"10ms\"
         [[source]]
         name = \"b\"
         database_url_env = \"SOURCE_B_URL\"
         workers = 2
         batch_size = 20
         poll_interval = \"10ms\"",
    );
    let env = [
        ("SOURCE_A_URL", url_of("relay_svc_kill_a")),
        ("SOURCE_B_URL", url_of("relay_svc_kill_b")),
    ];
    // The first run migrates a: producers start once the function exists.
    let first = Service::start(&config, &env);
    assert!(
        eventually(PATIENCE, || Outbox::builder(PgStore::new(a.clone()))
            .per_key_ordering(true)
            .build()
            .unwrap()
            .store()
            .backlog()
            .is_ok()),
        "{}",
        first.log()
    );
    let mut delivered = first.kill();
    let (producing_a, producing_b) = {
        let (a, b) = (a.clone(), b.clone());
        (
            std::thread::spawn(move || produce(&a, "a", 3, 1000)),
            std::thread::spawn(move || produce(&b, "b", 3, 1000)),
        )
    };
    let (mut kills, mut delivering) = (0, 0);
    while !(producing_a.is_finished() && producing_b.is_finished()) || kills < 6 {
        let service = Service::start(&config, &env);
        // Killed at a random moment 0-450 ms after both its sources started relaying: the
        // fault under test (timed from the relay's start, not the process's: connecting
        // with SCRAM in a debug build takes a good part of a second).
        assert!(
            eventually(PATIENCE, || {
                let log = service.log();
                log.contains("source a: relaying") && log.contains("source b: relaying")
            }),
            "{}",
            service.log()
        );
        std::thread::sleep(Duration::from_millis(common_random(450)));
        let printed = service.kill();
        delivering += usize::from(!printed.is_empty());
        delivered.extend(printed);
        kills += 1;
    }
    // The kills hit a service at work, not one still starting.
    assert!(
        delivering * 2 >= kills,
        "{delivering} of {kills} killed runs delivered"
    );
    let committed_a = producing_a.join().unwrap();
    let committed_b = producing_b.join().unwrap();
    // A last run drains both, then stops on SIGTERM.
    let mut last = Service::start(&config, &env);
    let drained = |pool: &PgPool| PgStore::new(pool.clone()).backlog().unwrap().pending == 0;
    assert!(
        eventually(PATIENCE, || drained(&a) && drained(&b)),
        "{}",
        last.log()
    );
    last.signal("TERM");
    let status = last.wait(PATIENCE).expect("stops within its bound");
    assert!(status.success(), "{status}: {}", last.log());
    delivered.extend(last.delivered());

    let seen: HashMap<&str, HashSet<&str>> =
        delivered
            .iter()
            .fold(HashMap::new(), |mut m, (s, _, _, v)| {
                m.entry(s.as_str()).or_default().insert(v.as_str());
                m
            });
    for (source, committed) in [("a", &committed_a), ("b", &committed_b)] {
        let lost: Vec<&String> = committed
            .iter()
            .filter(|v| !seen.get(source).is_some_and(|s| s.contains(v.as_str())))
            .collect();
        assert!(
            lost.is_empty(),
            "source {source}: {} lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        assert_eq!(
            seen.get(source).map_or(0, HashSet::len),
            committed.len(),
            "source {source}: something rolled back was delivered"
        );
    }
    // The ordered source: per key, first deliveries in id order (ids follow commit order).
    let mut first_seen = HashSet::new();
    let mut last_id: HashMap<&str, i64> = HashMap::new();
    for (source, id, key, value) in &delivered {
        if source != "a" || !first_seen.insert(*id) {
            continue;
        }
        if let Some(previous) = last_id.insert(key.as_str(), *id) {
            assert!(previous < *id, "key {key}: {id} ({value}) after {previous}");
        }
    }
    println!(
        "FIGURES relay service: {} + {} committed, {kills} kills ({delivering} after delivering), {} deliveries ({} duplicates), 0 lost",
        committed_a.len(),
        committed_b.len(),
        delivered.len(),
        delivered.len() - committed_a.len() - committed_b.len()
    );
}

/// A pseudo-random number below `n`, from the clock (no dependency for one number).
fn common_random(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos.wrapping_mul(6364136223846793005).rotate_left(17) % n
}

#[test]
fn sigterm_with_batches_in_flight_exits_0_and_settles_them() {
    let pool = fresh_database("relay_svc_term", 4);
    PgStore::new(pool.clone()).migrate().unwrap();
    let outbox = Outbox::builder(PgStore::new(pool.clone())).build().unwrap();
    let mut conn = pool.get().unwrap();
    for i in 0..200 {
        outbox
            .add_message(&mut *conn, &format!("k{i}"), format!("v{i}").as_bytes())
            .unwrap();
    }
    // A slow broker: 300 ms a batch of 10, two workers: batches are always in flight.
    let config = config_file(
        "term",
        "[sink.log]
         pause = \"300ms\"
         [service]
         shutdown_timeout = \"10s\"
         [[source]]
         name = \"t\"
         database_url_env = \"SOURCE_URL\"
         workers = 2
         batch_size = 10",
    );
    let mut service = Service::start(&config, &[("SOURCE_URL", url_of("relay_svc_term"))]);
    assert!(
        eventually(PATIENCE, || service.delivered().len() >= 20),
        "{}",
        service.log()
    );
    let signalled = Instant::now();
    service.signal("TERM");
    let status = service.wait(PATIENCE).expect("stops");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", service.log());
    // Within the documented bound, and it did wait for the batches in flight.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let delivered = service.delivered();
    let printed: HashSet<i64> = delivered.iter().map(|d| d.1).collect();
    assert_eq!(printed.len(), delivered.len(), "nothing printed twice");
    // Every batch the service printed was settled: none of its messages is left.
    let left: Vec<i64> = pool
        .get()
        .unwrap()
        .query("SELECT id FROM public.outbox_messages", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        left.iter().all(|id| !printed.contains(id)),
        "settled messages still in the outbox: {:?}",
        left.iter()
            .filter(|id| printed.contains(id))
            .collect::<Vec<_>>()
    );
    assert_eq!(left.len() + printed.len(), 200, "nothing lost");
    assert!(service.log().contains("stopped"), "{}", service.log());
}

#[test]
fn a_second_signal_exits_at_once() {
    let pool = fresh_database("relay_svc_twice", 4);
    PgStore::new(pool.clone()).migrate().unwrap();
    let outbox = Outbox::builder(PgStore::new(pool.clone())).build().unwrap();
    outbox
        .add_message(&mut *pool.get().unwrap(), "k", b"v")
        .unwrap();
    // A batch that takes a minute: the graceful stop would wait for it.
    let config = config_file(
        "twice",
        "[sink.log]
         pause = \"60s\"
         [[source]]
         name = \"t\"
         database_url_env = \"SOURCE_URL\"",
    );
    let mut service = Service::start(&config, &[("SOURCE_URL", url_of("relay_svc_twice"))]);
    // The batch is in flight once the relay logged its start and the claim holds the row.
    assert!(eventually(PATIENCE, || {
        pool.get()
            .unwrap()
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND a.datname = 'relay_svc_twice'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            > 0
    }));
    service.signal("TERM");
    assert!(eventually(PATIENCE, || service.log().contains("stopping")));
    let signalled = Instant::now();
    service.signal("TERM");
    let status = service.wait(PATIENCE).expect("exits");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 15), "{}", service.log());
    // Nothing was settled: the message is still there for the next relay.
    assert_eq!(PgStore::new(pool).backlog().unwrap().pending, 1);
}

/// `GET path` on the service's HTTP address: (status, body).
fn get(address: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn a_source_whose_database_is_down_costs_only_itself_and_healthz_names_it() {
    let pool = fresh_database("relay_svc_isolated", 4);
    PgStore::new(pool.clone()).migrate().unwrap();
    let outbox = Outbox::builder(PgStore::new(pool.clone())).build().unwrap();
    for i in 0..50 {
        outbox
            .add_message(&mut *pool.get().unwrap(), "k", format!("v{i}").as_bytes())
            .unwrap();
    }
    let dead_port = broker::free_port().unwrap();
    let address = format!("127.0.0.1:{}", broker::free_port().unwrap());
    let config = config_file(
        "isolated",
        &format!(
            "[sink.log]
             [service]
             listen = \"{address}\"
             [[source]]
             name = \"down\"
             database_url = \"host=127.0.0.1 port={dead_port} user=nobody dbname=nothing connect_timeout=2\"
             [[source]]
             name = \"up\"
             database_url_env = \"SOURCE_URL\"
             poll_interval = \"10ms\""
        ),
    );
    let service = Service::start(&config, &[("SOURCE_URL", url_of("relay_svc_isolated"))]);
    assert!(
        eventually(PATIENCE, || service.delivered().len() >= 50),
        "{}",
        service.log()
    );
    assert!(service.delivered().iter().all(|d| d.0 == "up"));
    let mut health = serde_json::Value::Null;
    let mut status = 0;
    assert!(
        eventually(PATIENCE, || {
            let (s, body) = get(&address, "/healthz");
            status = s;
            health = serde_json::from_str(&body).unwrap_or_default();
            health["sources"][1]["phase"] == "running" && health["sources"][0]["phase"] == "down"
        }),
        "{health}"
    );
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["healthy"], false);
    assert_eq!(health["sources"][0]["name"], "down");
    assert!(
        health["sources"][0]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{health}"
    );
    assert_eq!(health["sources"][1]["healthy"], true, "{health}");
    let mut metrics = String::new();
    assert!(
        eventually(PATIENCE, || {
            metrics = get(&address, "/metrics").1;
            metrics.contains("outbox_messages_sent_total{source=\"up\"} 50")
        }),
        "{metrics}"
    );
    assert!(
        metrics.contains("outbox_source_up{source=\"down\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outbox_source_up{source=\"up\"} 1"),
        "{metrics}"
    );
    assert!(
        service.log().contains("source down: cannot start"),
        "{}",
        service.log()
    );
}
