//! The behavioural suite's bodies, generic over the backend: each is instantiated once per
//! backend by `tests/backends.rs`. Every option is the default a user gets unless the test
//! is about it.

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use troutbox::{Batch, Error, NewMessage};

use super::support::{
    eventually, fast_backoff, random_below, store_errors, Backend, Opts, PATIENCE,
};

/// What an in-process Sender saw: (id, key, value) in delivery order.
type Seen = Arc<Mutex<Vec<(i64, String, Vec<u8>)>>>;

fn values(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i}").into_bytes())
        .collect()
}

fn messages<'a>(key: &'a str, values: &'a [Vec<u8>]) -> Vec<NewMessage<'a>> {
    values.iter().map(|v| NewMessage::new(key, v)).collect()
}

/// Committed messages are delivered, each once, and a rolled-back transaction's never.
pub fn committed_delivered_rolled_back_never<B: Backend>(name: &str) {
    let db = B::db(&B::url(), 6);
    let opts = Opts::default();
    let outbox = B::fresh(&db, name, &opts);
    let (a, b, gone) = (values("a", 150), values("b", 150), values("gone", 150));
    B::produce(&outbox, &db, &messages("k", &a), true).unwrap();
    B::produce(&outbox, &db, &messages("k", &gone), false).unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let mut handle = B::start(&outbox, move |batch: &mut Batch| -> Result<(), Error> {
        let mut seen = record.lock().unwrap();
        for m in batch.iter_mut() {
            seen.push((m.id(), m.key().to_owned(), m.value().to_vec()));
            m.mark_sent();
        }
        Ok(())
    })
    .unwrap();
    // Committed while the relay runs: found by the relay (local wake-up, then polling).
    B::produce(&outbox, &db, &messages("k", &b), true).unwrap();
    assert!(eventually(PATIENCE, || seen.lock().unwrap().len() >= 300));
    assert!(eventually(PATIENCE, || B::backlog(&outbox)
        .unwrap()
        .pending
        == 0));
    handle.shutdown().unwrap();
    let seen = seen.lock().unwrap();
    let got: HashSet<&Vec<u8>> = seen.iter().map(|(_, _, v)| v).collect();
    assert_eq!(seen.len(), 300, "each committed message once");
    assert!(a.iter().chain(&b).all(|v| got.contains(v)));
    assert!(
        gone.iter().all(|v| !got.contains(v)),
        "rolled back, yet delivered"
    );
}

/// A failing message is retried with backoff, then dead after `max_retries + 1` attempts
/// with its error, while the others flow; the admin calls list, requeue and purge it.
pub fn failures_retry_then_dead_and_admin_requeues<B: Backend>(name: &str) {
    let db = B::db(&B::url(), 6);
    let opts = Opts {
        max_retries: Some(2),
        backoff: Some(fast_backoff()),
        poll_interval: Some(Duration::from_millis(5)),
        ..Opts::default()
    };
    let outbox = B::fresh(&db, name, &opts);
    let good = values("good", 50);
    B::produce(&outbox, &db, &messages("k", &good), true).unwrap();
    B::produce(&outbox, &db, &[NewMessage::new("bad", b"refused")], true).unwrap();
    B::produce(&outbox, &db, &[NewMessage::new("bad", b"purged")], true).unwrap();
    let refuse = Arc::new(AtomicBool::new(true));
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen: Seen = Arc::default();
    let (r, a, s) = (refuse.clone(), attempts.clone(), seen.clone());
    let mut handle = B::start(&outbox, move |batch: &mut Batch| -> Result<(), Error> {
        for m in batch.iter_mut() {
            if m.key() == "bad" && (r.load(Ordering::SeqCst) || m.value() == b"purged") {
                if m.value() == b"refused" {
                    a.fetch_add(1, Ordering::SeqCst);
                }
                m.mark_failed("the broker refused it");
            } else {
                s.lock()
                    .unwrap()
                    .push((m.id(), m.key().to_owned(), m.value().to_vec()));
                m.mark_sent();
            }
        }
        Ok(())
    })
    .unwrap();
    assert!(eventually(PATIENCE, || B::dead(&outbox).len() == 2));
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "max_retries + 1 attempts"
    );
    assert_eq!(seen.lock().unwrap().len(), 50, "the others flowed");
    let dead = B::dead(&outbox);
    let refused = dead
        .iter()
        .find(|d| d.message.value() == b"refused")
        .unwrap();
    assert_eq!(refused.message.attempts(), 3);
    assert!(
        refused
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("the broker refused it"),
        "{:?}",
        refused.last_error
    );
    let purged = dead
        .iter()
        .find(|d| d.message.value() == b"purged")
        .unwrap();
    assert_eq!(B::purge_dead(&outbox, &[purged.message.id()]), 1);
    // Fixed: re-queued, it is delivered with a fresh set of retries.
    refuse.store(false, Ordering::SeqCst);
    assert_eq!(B::requeue_all_dead(&outbox), 1);
    assert!(eventually(PATIENCE, || seen.lock().unwrap().len() == 51));
    handle.shutdown().unwrap();
    let backlog = B::backlog(&outbox).unwrap();
    assert_eq!((backlog.pending, backlog.dead), (0, 0));
    assert_eq!(store_errors(&opts), Vec::<String>::new());
}

/// Per-key ordering with two workers and failing heads: each key's messages reach the
/// Sender in commit order (a failure blocks its key until the message goes), and all go.
pub fn per_key_order_holds_through_failures<B: Backend>(name: &str) {
    let db = B::db(&B::url(), 6);
    let opts = Opts {
        ordered: true,
        workers: 2,
        batch_size: Some(50),
        backoff: Some(fast_backoff()),
        ..Opts::default()
    };
    let outbox = B::fresh(&db, name, &opts);
    const KEYS: usize = 8;
    const PER_KEY: usize = 150;
    // Interleaved keys, committed in many transactions.
    let all: Vec<(String, Vec<u8>)> = (0..KEYS * PER_KEY)
        .map(|i| {
            (
                format!("key{}", i % KEYS),
                format!("{}", i / KEYS).into_bytes(),
            )
        })
        .collect();
    for chunk in all.chunks(40) {
        let batch: Vec<NewMessage<'_>> = chunk.iter().map(|(k, v)| NewMessage::new(k, v)).collect();
        B::produce(&outbox, &db, &batch, true).unwrap();
    }
    let failed_once: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let seen: Seen = Arc::default();
    let (f, s) = (failed_once.clone(), seen.clone());
    let mut handle = B::start(&outbox, move |batch: &mut Batch| -> Result<(), Error> {
        batch.send_each(|m| {
            // About one message in 25 fails its first attempt.
            if m.id() % 25 == 0 && f.lock().unwrap().insert(m.id()) {
                return Err("first attempt refused");
            }
            s.lock()
                .unwrap()
                .push((m.id(), m.key().to_owned(), m.value().to_vec()));
            Ok(())
        });
        Ok(())
    })
    .unwrap();
    let distinct = || {
        let seen = seen.lock().unwrap();
        seen.iter().map(|s| s.0).collect::<HashSet<i64>>().len()
    };
    assert!(eventually(PATIENCE * 2, || distinct() >= KEYS * PER_KEY));
    handle.shutdown().unwrap();
    let seen = seen.lock().unwrap();
    // Each key's first deliveries come in commit order, none skipped. A delivery may repeat
    // (at least once: a claim lost after its Sender ran is delivered again), never jump.
    let mut next: HashMap<&str, usize> = HashMap::new();
    for (_, key, value) in seen.iter() {
        let n: usize = String::from_utf8_lossy(value).parse().unwrap();
        let expected = next.entry(key).or_insert(0);
        assert!(
            n <= *expected,
            "{key}: got {n} before {expected} ({} backend)",
            B::NAME
        );
        if n == *expected {
            *expected += 1;
        }
    }
    assert!(next.values().all(|n| *n == PER_KEY), "{next:?}");
    assert_eq!(
        store_errors(&opts),
        Vec::<String>::new(),
        "no fault was injected"
    );
    assert!(
        !failed_once.lock().unwrap().is_empty(),
        "no failure was injected"
    );
}

/// The child process mode: `TROUTBOX_SUITE_CHILD=<backend>:<name>:<mode>` makes this test
/// binary a relay that records deliveries durably; mode `poison` aborts the process
/// whenever its batch holds a message of key `poison`.
pub const CHILD: &str = "TROUTBOX_SUITE_CHILD";
const READY: &str = "troutbox-suite-child-ready";

pub fn child<B: Backend>(name: &str, mode: &str) {
    let url = std::env::var("TROUTBOX_SUITE_URL").unwrap();
    let db = B::db(&url, 4);
    let opts = Opts {
        batch_size: Some(50),
        poll_interval: Some(Duration::from_millis(5)),
        max_retries: Some(3),
        ..Opts::default()
    };
    let outbox = B::attach(&db, name, &opts);
    let (record, name, poison) = (db.clone(), name.to_owned(), mode == "poison");
    let _handle = B::start(&outbox, move |batch: &mut Batch| -> Result<(), Error> {
        if poison && batch.iter().any(|m| m.key() == "poison") {
            std::process::abort();
        }
        let rows: Vec<(i64, Vec<u8>)> =
            batch.iter().map(|m| (m.id(), m.value().to_vec())).collect();
        B::record(&record, &name, &rows)
    })
    .unwrap();
    use std::io::Write;
    let mut stderr = std::io::stderr();
    let _ = writeln!(stderr, "{READY}");
    let _ = stderr.flush();
    loop {
        std::thread::park();
    }
}

/// Starts this binary as a relay child (see [`child`]); returns when it says it runs.
fn spawn_child<B: Backend>(url: &str, name: &str, mode: &str) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "child_process",
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, format!("{}:{name}:{mode}", B::NAME))
        .env("TROUTBOX_SUITE_URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line == READY {
                let _ = tx.try_send(());
            }
        }
    });
    let _ = rx.recv_timeout(PATIENCE);
    child
}

/// A relay killed with SIGKILL over and over while producers commit and roll back: every
/// committed message is delivered, no rolled-back one ever.
pub fn sigkill_loses_nothing<B: Backend>(name: &str) {
    let url = B::url();
    let db = B::db(&url, 8);
    let outbox = B::fresh(&db, name, &Opts::default());
    let done = Arc::new(AtomicBool::new(false));
    let producer = {
        let (outbox, db, done) = (outbox.clone(), db.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
            let mut i = 0;
            while !done.load(Ordering::SeqCst) || committed.len() < 3000 {
                let batch = values(&format!("t{i}"), 5);
                let commit = random_below(10) != 0;
                B::produce(&outbox, &db, &messages("k", &batch), commit).unwrap();
                if commit {
                    committed.extend(batch);
                } else {
                    rolled_back.extend(batch);
                }
                i += 1;
                if committed.len() >= 6000 {
                    break;
                }
            }
            (committed, rolled_back)
        })
    };
    let mut kills = 0;
    let mut delivered_by_children = 0;
    for _ in 0..10 {
        let mut child = spawn_child::<B>(&url, name, "plain");
        // The fault's timing, not a synchronisation: a random moment of the relay's life.
        std::thread::sleep(Duration::from_millis(50 + random_below(400)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child relay exited on its own"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        delivered_by_children = B::delivered(&db, name).len();
    }
    done.store(true, Ordering::SeqCst);
    let (committed, rolled_back) = producer.join().unwrap();
    // The last relay drains what is left.
    let mut last = spawn_child::<B>(&url, name, "plain");
    assert!(eventually(PATIENCE * 2, || B::backlog(&outbox)
        .unwrap()
        .pending
        == 0));
    last.kill().unwrap();
    last.wait().unwrap();
    let delivered: HashSet<Vec<u8>> = B::delivered(&db, name)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let lost = committed.iter().filter(|v| !delivered.contains(*v)).count();
    let phantom = rolled_back
        .iter()
        .filter(|v| delivered.contains(*v))
        .count();
    println!(
        "FIGURES {} sigkill: committed={} rolled_back={} kills={kills} delivered_by_children={delivered_by_children} lost={lost} phantom={phantom}",
        B::NAME,
        committed.len(),
        rolled_back.len()
    );
    assert!(
        delivered_by_children > 0,
        "the killed relays delivered nothing"
    );
    assert_eq!(lost, 0, "committed messages lost");
    assert_eq!(phantom, 0, "rolled-back messages delivered");
}

/// A message that crashes its relay (the process aborts in the Sender) is charged for each
/// crash and ends dead after `max_retries + 1` of them, isolated from its batch: the
/// messages claimed with it are delivered.
pub fn crash_looping_poison_is_isolated<B: Backend>(name: &str) {
    let url = B::url();
    let db = B::db(&url, 6);
    let outbox = B::fresh(&db, name, &Opts::default());
    let before = values("before", 20);
    let after = values("after", 20);
    let mut batch = messages("k", &before);
    batch.push(NewMessage::new("poison", b"poison"));
    batch.extend(messages("k", &after));
    B::produce(&outbox, &db, &batch, true).unwrap();
    let mut restarts = 0;
    // The child's max_retries is 3: dead after 4 charged crashes, and each restart
    // after a crash runs until the next claim of the poison. Bounded: 4 crashes plus the
    // isolations, and the run that finds it dead.
    let dead = loop {
        let mut child = spawn_child::<B>(&url, name, "poison");
        let exited = eventually(Duration::from_secs(10), || {
            child.try_wait().unwrap().is_some()
        });
        if !exited {
            // Alive for 10 s: nothing crashed it any more.
            child.kill().unwrap();
            child.wait().unwrap();
            break B::dead(&outbox);
        }
        restarts += 1;
        assert!(restarts <= 12, "still crashing after {restarts} restarts");
    };
    let delivered: HashSet<Vec<u8>> = B::delivered(&db, name)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    println!(
        "FIGURES {} poison: crashes={restarts} dead={}",
        B::NAME,
        dead.len()
    );
    assert_eq!(dead.len(), 1, "the poison, dead");
    assert_eq!(dead[0].message.key(), "poison");
    assert!(
        restarts >= 4,
        "dead after {restarts} crashes: not charged once per crash"
    );
    assert!(
        before.iter().chain(&after).all(|v| delivered.contains(v)),
        "the innocent went"
    );
}

/// Every session of the relay terminated, over and over, while messages flow: nothing lost.
pub fn terminated_sessions_lose_nothing<B: Backend>(name: &str) {
    let server = B::private_server();
    let url = B::server_url(&server);
    let db = B::db(&url, 8);
    let admin = B::db(&url, 1);
    let outbox = B::fresh(&db, name, &Opts::default());
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let mut handle = B::start(&outbox, move |batch: &mut Batch| -> Result<(), Error> {
        let mut seen = record.lock().unwrap();
        for m in batch.iter() {
            seen.push((m.id(), m.key().to_owned(), m.value().to_vec()));
        }
        Ok(())
    })
    .unwrap();
    let mut committed = Vec::new();
    let mut terminated = 0;
    for round in 0..15 {
        let batch = values(&format!("r{round}"), 100);
        // A producer's own connection may be among those terminated: retried.
        let ok = eventually(PATIENCE, || {
            B::produce(&outbox, &db, &messages("k", &batch), true).is_ok()
        });
        assert!(ok);
        committed.extend(batch);
        terminated += B::terminate_other_sessions(&admin);
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    assert!(eventually(PATIENCE * 2, || {
        let got: HashSet<Vec<u8>> = seen.lock().unwrap().iter().map(|s| s.2.clone()).collect();
        committed.iter().all(|v| got.contains(v))
    }));
    handle.shutdown().unwrap();
    println!(
        "FIGURES {} terminated: committed={} terminated_sessions={terminated} tail_ms={}",
        B::NAME,
        committed.len(),
        started.elapsed().as_millis()
    );
    assert!(terminated > 0);
}

/// The server stopped and started again under a running relay: it resumes on its own.
pub fn server_restart_relay_resumes<B: Backend>(name: &str) {
    let mut server = B::private_server();
    let url = B::server_url(&server);
    let db = B::db(&url, 6);
    let outbox = B::fresh(&db, name, &Opts::default());
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let mut handle = B::start(&outbox, move |batch: &mut Batch| -> Result<(), Error> {
        let mut seen = record.lock().unwrap();
        for m in batch.iter() {
            seen.push((m.id(), m.key().to_owned(), m.value().to_vec()));
        }
        Ok(())
    })
    .unwrap();
    let first = values("first", 100);
    B::produce(&outbox, &db, &messages("k", &first), true).unwrap();
    assert!(eventually(PATIENCE, || seen.lock().unwrap().len() >= 100));
    B::stop(&mut server);
    B::restart(&mut server);
    let second = values("second", 100);
    assert!(eventually(PATIENCE, || B::produce(
        &outbox,
        &db,
        &messages("k", &second),
        true
    )
    .is_ok()));
    let started = Instant::now();
    assert!(eventually(PATIENCE * 2, || {
        let got: HashSet<Vec<u8>> = seen.lock().unwrap().iter().map(|s| s.2.clone()).collect();
        second.iter().all(|v| got.contains(v))
    }));
    println!(
        "FIGURES {} restart: resumed_after_ms={}",
        B::NAME,
        started.elapsed().as_millis()
    );
    handle.shutdown().unwrap();
}

/// Migrations from many processes at once (threads here, each with its own pool): all
/// succeed, and the table works.
pub fn concurrent_migrations_all_succeed<B: Backend>(name: &str) {
    let url = B::url();
    let db = B::db(&url, 2);
    B::forget(&db, name);
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let (url, name) = (url.clone(), name.to_owned());
            std::thread::spawn(move || {
                let db = B::db(&url, 2);
                B::migrate_again(&db, &name)
            })
        })
        .collect();
    for r in racers {
        r.join().unwrap().unwrap();
    }
    let outbox = B::attach(&db, name, &Opts::default());
    B::produce(&outbox, &db, &[NewMessage::new("k", b"v")], true).unwrap();
    assert_eq!(B::backlog(&outbox).unwrap().pending, 1);
}

/// A claim held while its Sender runs never blocks producers, whatever their isolation
/// (MariaDB's default is REPEATABLE READ, whose gap locks a claim must not take).
pub fn a_held_claim_never_blocks_producers<B: Backend>(name: &str) {
    let db = B::db(&B::url(), 6);
    let outbox = B::fresh(&db, name, &Opts::default());
    B::produce(&outbox, &db, &messages("k", &values("held", 10)), true).unwrap();
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    let mut handle = B::start(&outbox, move |_batch: &mut Batch| -> Result<(), Error> {
        let _ = entered_tx.try_send(());
        let _ = release_rx.recv_timeout(PATIENCE);
        Ok(())
    })
    .unwrap();
    entered_rx.recv_timeout(PATIENCE).unwrap();
    // The claim is held: producers of the same key, in the backend's default isolation.
    let started = Instant::now();
    for i in 0..20 {
        let v = format!("new-{i}").into_bytes();
        B::produce(&outbox, &db, &[NewMessage::new("k", &v)], true).unwrap();
    }
    let took = started.elapsed();
    release_tx.send(()).unwrap();
    handle.shutdown().unwrap();
    assert!(
        took < Duration::from_secs(5),
        "20 producers took {took:?} behind a claim"
    );
}
