//! The fault-point matrix (issue 21): every named step of the claim protocol
//! (`troutbox::fault_points`) driven with every fault that applies there, in unordered,
//! ordered and keep-sent modes, against the real server. After each case the protocol's
//! invariants are checked:
//!
//! - no committed message lost, none of a rolled-back transaction delivered;
//! - no message held by two Senders at once;
//! - duplicates within the documented bound (the batches the fault caught);
//! - no attempt charged for a claim that never reached its Sender, at most one for a claim
//!   abandoned after it did;
//! - key order kept (ordered mode);
//! - no transaction or lock of the relay left behind (`pg_stat_activity`).
//!
//! The faults: a panic, a process abort (in a child process), a delay past the send
//! timeout, the relay's connections terminated by the server at that step, and an error
//! returned by the step. Fail points are global to the process, so the tests of this binary
//! take turns (`TURN`). Run with `--nocapture` for a `FIGURES` line per mode.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{count, eventually, PATIENCE};
use r2d2_postgres::PostgresConnectionManager;
use troutbox::fault_points as fp;
use troutbox::{Batch, NewMessage, Outbox, PgPool, PgStore, Retention};

/// The tests of this binary configure the process-wide fail points: one at a time.
static TURN: Mutex<()> = Mutex::new(());

/// Log lines saying a fault was injected (`fault injected at <point>`), as seen by the
/// logger this binary installs.
static INJECTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct InjectionLog;

impl log::Log for InjectionLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let text = record.args().to_string();
        if text.contains("fault injected") {
            INJECTED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(text);
        }
    }
    fn flush(&self) {}
}

fn install_logger() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&InjectionLog).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
    });
}

fn injected_at(point: &str) -> bool {
    INJECTED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|line| line.ends_with(point))
}

const SEND_TIMEOUT: Duration = Duration::from_secs(1);
const BATCH: usize = 10;
const KEYS: usize = 3;
const PER_KEY: usize = 10;

/// Environment variables that make this binary a relay child that aborts at a fault point.
const CHILD_SCHEMA: &str = "TROUTBOX_FP_CHILD_SCHEMA";
const CHILD_MODE: &str = "TROUTBOX_FP_CHILD_MODE";
const CHILD_POINT: &str = "TROUTBOX_FP_CHILD_POINT";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unordered,
    Ordered,
    Keep,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Unordered => "unordered",
            Mode::Ordered => "ordered",
            Mode::Keep => "keep",
        }
    }

    fn parse(s: &str) -> Mode {
        match s {
            "unordered" => Mode::Unordered,
            "ordered" => Mode::Ordered,
            "keep" => Mode::Keep,
            other => panic!("unknown mode {other}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Panic,
    Abort,
    Delay,
    Terminate,
    Error,
}

const FAULTS: [Fault; 5] = [
    Fault::Panic,
    Fault::Abort,
    Fault::Delay,
    Fault::Terminate,
    Fault::Error,
];

/// Steps that can fail with an error (`fault_point!(NAME, return)`).
const FALLIBLE: &[&str] = &[
    fp::CLAIM_BEGIN,
    fp::CLAIM_STATEMENT,
    fp::JOURNAL_RECORD,
    fp::SETTLE,
    fp::LATE_SETTLE,
];

/// Steps before any Sender has seen the claim: a fault there charges nothing (an abort
/// between the journal record and the Sender excepted, see RELIABILITY.md).
const BEFORE_ANY_SENDER: &[&str] = &[
    fp::CLAIM_BEGIN,
    fp::CLAIM_STATEMENT,
    fp::JOURNAL_RECORD,
    fp::BEFORE_SENDER,
    fp::RECOVERY,
    fp::SET_ASIDE,
];

/// Whether `fault` applies at `point` in `mode`.
fn applies(point: &str, fault: Fault, mode: Mode) -> bool {
    if point == fp::MAINTENANCE_STEP {
        // Partition maintenance exists in keep-sent mode only; its process dying is its
        // connection closing, which Terminate covers.
        return mode == Mode::Keep && fault != Fault::Abort && fault != Fault::Error;
    }
    match fault {
        Fault::Error => FALLIBLE.contains(&point),
        // Between the journal's proof and the Sender there are microseconds: a session
        // terminated by an operator exactly then is the one window not covered (documented).
        Fault::Terminate => point != fp::BEFORE_SENDER,
        _ => true,
    }
}

/// The late settlement runs only after a lost claim: the first batch's Sender outlives the
/// send timeout in those cases (a workload shape that forces the path).
fn needs_lost_claim(point: &str) -> bool {
    point == fp::LATE_SETTLE || point == fp::LATE_SETTLE_MID
}

/// A pool whose connections carry `name` as their application_name.
fn named_pool(name: &str, size: u32) -> PgPool {
    let mut config: postgres::Config = common::url().parse().unwrap();
    config.application_name(name);
    r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(5))
        .build(PostgresConnectionManager::new(config, postgres::NoTls))
        .unwrap()
}

/// The case's store: keep mode with a maintenance clock one day further at every run, so
/// that every run creates a partition (the maintenance step's fault point).
fn case_store(pool: &PgPool, schema: &str, mode: Mode) -> PgStore {
    let store = PgStore::new(pool.clone()).schema(schema);
    if mode != Mode::Keep {
        return store;
    }
    let runs = Arc::new(AtomicU64::new(0));
    store
        .retention(
            Retention::keep_sent(Duration::from_secs(86_400))
                .partition_interval(Duration::from_secs(86_400))
                .partitions_ahead(1),
        )
        .maintenance_clock(move || {
            let days = runs.fetch_add(1, Ordering::SeqCst) as i64;
            time::OffsetDateTime::now_utc() + time::Duration::days(days)
        })
}

/// Errors the relays of a case reported, as text: how a panic or a returned error at a fault
/// point is seen to have fired.
type Reported = Arc<Mutex<Vec<String>>>;

/// The case's outbox: 2 workers (so that another claimer competes), 1 where the case needs
/// a lost claim's late settlement to find its journal row (a second worker would charge the
/// lost claim first, and the late settlement would have nothing to record).
fn outbox(store: &PgStore, mode: Mode, workers: usize, reported: &Reported) -> Outbox {
    let reported = reported.clone();
    Outbox::builder(store.clone())
        .per_key_ordering(mode == Mode::Ordered)
        .send_timeout(SEND_TIMEOUT)
        .batch_size(BATCH)
        .workers(workers)
        .max_retries(5)
        .backoff(common::fast_backoff())
        .poll_interval(Duration::from_millis(5))
        .shutdown_timeout(Duration::from_secs(5))
        .error_handler(move |e| reported.lock().unwrap().push(e.to_string()))
        .build()
        .unwrap()
}

/// Messages in flight at a Sender of this process, to catch two Senders holding one.
#[derive(Default)]
struct InFlight {
    /// Each message at a Sender now, with when that Sender started.
    ids: Mutex<HashMap<i64, Instant>>,
    overlaps: AtomicU64,
    /// Sender calls (the intentionally slow one aside) that ran past half the send timeout
    /// on a loaded machine: their claims may have ended under them, as documented for a
    /// Sender past the send timeout, so each may add a charge and a batch of duplicates.
    slow: AtomicU64,
}

/// A Sender that records each delivery durably (`deliveries`: id, key, attempts) before it
/// returns, so that deliveries by a child process that then aborts are counted too. It
/// refuses the first message of `key-1` it meets once (`mark_failed`, recorded in `refused`)
/// and, with per-key ordering, leaves the key's later messages of that batch unmarked and
/// unpublished before returning `Ok`: the pattern docs/ordering.md allows. With
/// `slow_first`, its first batch outlives the send timeout (forcing a late settlement).
fn sender(
    record: PgPool,
    schema: &str,
    ordered: bool,
    in_flight: Arc<InFlight>,
    slow_first: bool,
) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static {
    let insert = format!(
        "INSERT INTO \"{schema}\".deliveries (msg_id, key, attempts)
         SELECT * FROM unnest($1::int8[], $2::text[], $3::int4[])"
    );
    let refuse = format!("INSERT INTO \"{schema}\".refused (msg_id) VALUES ($1)");
    let first = Arc::new(AtomicBool::new(slow_first));
    let refusal = Arc::new(AtomicBool::new(true));
    move |batch: &mut Batch| {
        let ids: Vec<i64> = batch.iter().map(|m| m.id()).collect();
        let slow = first.swap(false, Ordering::SeqCst);
        if slow {
            // Outlive the send timeout once: the claim is lost, its outcome recorded late.
            // Its rows are free again once the server has ended the claim, and another
            // Sender may take them meanwhile: what a Sender past the send timeout is
            // documented to allow, so this batch is not counted as in flight.
            std::thread::sleep(SEND_TIMEOUT + Duration::from_millis(300));
        } else {
            let mut held = in_flight.ids.lock().unwrap();
            for id in &ids {
                // A claim is provably held until half the send timeout after it, and its
                // Sender starts before that: a message another Sender took longer ago than
                // that may have been claimed again legitimately (that Sender ran long).
                if let Some(since) = held.insert(*id, Instant::now()) {
                    if since.elapsed() < SEND_TIMEOUT / 2 {
                        in_flight.overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
        let entered = Instant::now();
        let mut conn = record.get().map_err(|e| e.to_string());
        let mut published = (Vec::new(), Vec::new(), Vec::new());
        let mut refused_key = None;
        for m in batch.iter_mut() {
            if refused_key.as_deref() == Some(m.key()) && ordered {
                continue; // not published, left unmarked
            }
            if m.key() == "key-1" && refusal.swap(false, Ordering::SeqCst) {
                if let Ok(c) = conn.as_mut() {
                    let _ = c.execute(&refuse, &[&m.id()]);
                }
                m.mark_failed("refused once");
                refused_key = Some(m.key().to_owned());
                continue;
            }
            published.0.push(m.id());
            published.1.push(m.key().to_owned());
            published.2.push(m.attempts() as i32);
        }
        let result = conn.and_then(|mut c| {
            c.execute(&insert, &[&published.0, &published.1, &published.2])
                .map_err(|e| e.to_string())
        });
        if !slow {
            if entered.elapsed() >= SEND_TIMEOUT / 2 {
                in_flight.slow.fetch_add(1, Ordering::SeqCst);
            }
            let mut held = in_flight.ids.lock().unwrap();
            for id in &ids {
                held.remove(id);
            }
        }
        result.map(|_| ())
    }
}

/// Starts `mode`'s relay on the smallest pool `start` accepts (it refuses pools too small
/// for the relay): a relay that needs more connections than `start` checks for would starve
/// here. Connections carry the schema as their application name. A fault while `start`
/// opens its first session is an error there: it is started again, as a supervisor would.
fn start_on_smallest_pool<F>(
    schema: &str,
    mode: Mode,
    workers: usize,
    reported: &Reported,
    sender: F,
) -> (troutbox::Handle, Outbox)
where
    F: FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static,
{
    let mut retried = false;
    let mut size = 1;
    loop {
        assert!(size <= 16, "start() accepted no pool up to 16 connections");
        let pool = named_pool(schema, size);
        let relay = outbox(&case_store(&pool, schema, mode), mode, workers, reported);
        match relay.start(sender.clone()) {
            Ok(handle) => return (handle, relay),
            Err(troutbox::Error::PoolTooSmall { needed, .. }) => size = needed,
            Err(e) if !retried => {
                retried = true;
                reported.lock().unwrap().push(e.to_string());
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Creates the case's schema, an undecodable row (for the set-aside step), and the messages:
/// `KEYS` keys of `PER_KEY` messages committed, and a rolled-back transaction. Returns the
/// committed ids.
fn prepare(admin: &PgPool, store: &PgStore, schema: &str, mode: Mode) -> Vec<i64> {
    admin
        .get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .unwrap();
    let producer = outbox(store, mode, 1, &Reported::default());
    producer.migrate().unwrap();
    if mode == Mode::Keep {
        store.run_maintenance_once().unwrap();
    }
    let mut conn = admin.get().unwrap();
    conn.batch_execute(&format!(
        "CREATE TABLE \"{schema}\".deliveries (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            msg_id bigint NOT NULL, key text NOT NULL, attempts int NOT NULL);
         CREATE TABLE \"{schema}\".refused (msg_id bigint NOT NULL);
         INSERT INTO \"{schema}\".outbox_messages (key, value, headers) VALUES ('bad', '', '{{a}}');"
    ))
    .unwrap();
    for round in 0..PER_KEY {
        let mut tx = conn.transaction().unwrap();
        let values: Vec<(String, String)> = (0..KEYS)
            .map(|k| (format!("key-{k}"), format!("c-{round}-{k}")))
            .collect();
        producer
            .add_messages(
                &mut tx,
                values.iter().map(|(k, v)| NewMessage::new(k, v.as_bytes())),
            )
            .unwrap();
        tx.commit().unwrap();
    }
    let mut tx = conn.transaction().unwrap();
    let rolled_back: Vec<String> = (0..5).map(|i| format!("rolled-back-{i}")).collect();
    producer
        .add_messages(
            &mut tx,
            rolled_back
                .iter()
                .map(|v| NewMessage::new("key-0", v.as_bytes())),
        )
        .unwrap();
    tx.rollback().unwrap();
    conn.query(
        &format!("SELECT id FROM \"{schema}\".outbox_messages WHERE key <> 'bad' ORDER BY id"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Terminates every backend of application `name` (the relay's connections), once.
fn terminate_once(name: String, fired: Arc<AtomicBool>) -> impl Fn() + Send + Sync + 'static {
    move || {
        if fired.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut c = postgres::Client::connect(&common::url(), postgres::NoTls).unwrap();
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .unwrap();
    }
}

/// What one case found.
#[derive(Debug, Default)]
struct Found {
    lost: usize,
    phantoms: usize,
    duplicates: usize,
    overlaps: u64,
    max_attempts: i32,
    order_violations: usize,
    left_open: i64,
    fired: bool,
    /// Sender calls that ran past half the send timeout (a loaded machine).
    slow: u64,
}

fn check(admin: &PgPool, schema: &str, committed: &[i64], overlaps: u64) -> Found {
    let mut conn = admin.get().unwrap();
    let rows = conn
        .query(
            &format!("SELECT msg_id, key, attempts FROM \"{schema}\".deliveries ORDER BY seq"),
            &[],
        )
        .unwrap();
    let committed_set: HashSet<i64> = committed.iter().copied().collect();
    // Messages the Sender refused once: one attempt each that no fault charged.
    let mut refused: HashMap<i64, i32> = HashMap::new();
    for r in conn
        .query(&format!("SELECT msg_id FROM \"{schema}\".refused"), &[])
        .unwrap()
    {
        *refused.entry(r.get(0)).or_insert(0) += 1;
    }
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut last_of_key: HashMap<String, i64> = HashMap::new();
    let mut found = Found {
        overlaps,
        ..Found::default()
    };
    for r in &rows {
        let (id, key, attempts): (i64, String, i32) = (r.get(0), r.get(1), r.get(2));
        let honest = refused.get(&id).copied().unwrap_or(0);
        found.max_attempts = found.max_attempts.max(attempts - honest);
        if !committed_set.contains(&id) {
            found.phantoms += 1;
        }
        let n = seen.entry(id).or_insert(0);
        *n += 1;
        if *n > 1 {
            found.duplicates += 1;
            continue;
        }
        if let Some(prev) = last_of_key.insert(key, id) {
            if prev > id {
                found.order_violations += 1;
            }
        }
    }
    found.lost = committed.iter().filter(|id| !seen.contains_key(id)).count();
    found
}

/// No backend of the case's relay left in a transaction (or holding a claim's lock).
fn left_open(admin: &PgPool, name: &str) -> i64 {
    admin
        .get()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND xact_start IS NOT NULL",
            &[&name],
        )
        .unwrap()
        .get(0)
}

/// The entry point of an aborting relay child: a relay of the case's schema with the fault
/// point set to abort the process.
#[test]
#[ignore = "entry point of the relay child processes of the fault-point matrix"]
fn fault_point_child() {
    let schema = std::env::var(CHILD_SCHEMA).expect("run by the matrix, not by itself");
    let mode = Mode::parse(&std::env::var(CHILD_MODE).unwrap());
    let point = std::env::var(CHILD_POINT).unwrap();
    fail::cfg_callback(point.clone(), || std::process::abort()).unwrap();
    let record = named_pool("fp_record", 2);
    let _relay = start_on_smallest_pool(
        &schema,
        mode,
        if needs_lost_claim(&point) { 1 } else { 2 },
        &Reported::default(),
        sender(
            record,
            &schema,
            mode == Mode::Ordered,
            Arc::default(),
            needs_lost_claim(&point),
        ),
    );
    loop {
        std::thread::park();
    }
}

/// Runs one case; returns what it found, and whether the fault fired (an abort ended the
/// child).
fn run_case(admin: &PgPool, mode: Mode, point: &'static str, fault: Fault, index: usize) -> Found {
    let schema = format!("fp_{}_{index}", mode.name());
    // Setting up and maintenance: a store of their own, on the admin pool.
    let store = case_store(admin, &schema, mode);
    let committed = prepare(admin, &store, &schema, mode);
    let slow_first = needs_lost_claim(point);
    let in_flight = Arc::new(InFlight::default());
    let reported = Reported::default();
    // Whether the fault was seen to fire: a case whose fault never fires proves nothing.
    let fired = Arc::new(AtomicBool::new(false));

    if fault == Fault::Abort {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "fault_point_child",
                "--exact",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_SCHEMA, &schema)
            .env(CHILD_MODE, mode.name())
            .env(CHILD_POINT, point)
            .env("DATABASE_URL", common::url())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let exited = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > PATIENCE {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20)); // polling a child's exit
        };
        match exited {
            Some(status) if status.code().is_none() => fired.store(true, Ordering::SeqCst),
            Some(status) => panic!("{mode:?} {point}: the child exited with {status}"),
            None => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    } else {
        match fault {
            Fault::Panic => fail::cfg(point, "1*panic(injected)").unwrap(),
            Fault::Delay => {
                let fired = fired.clone();
                fail::cfg_callback(point, move || {
                    if !fired.swap(true, Ordering::SeqCst) {
                        std::thread::sleep(SEND_TIMEOUT + Duration::from_millis(300));
                    }
                })
                .unwrap()
            }
            Fault::Error => fail::cfg(point, "1*return").unwrap(),
            Fault::Terminate => {
                fail::cfg_callback(point, terminate_once(schema.clone(), fired.clone())).unwrap()
            }
            Fault::Abort => unreachable!(),
        }
    }
    // The relay that runs through the fault (or, after an abort, the one that takes over).
    let record = named_pool("fp_record", 3);
    let workers = if slow_first { 1 } else { 2 };
    let (mut handle, relay) = start_on_smallest_pool(
        &schema,
        mode,
        workers,
        &reported,
        sender(
            record,
            &schema,
            mode == Mode::Ordered,
            in_flight.clone(),
            slow_first && fault != Fault::Abort,
        ),
    );
    if point == fp::MAINTENANCE_STEP {
        // A step whose lock is not granted within 100 ms (relays claiming on a loaded
        // machine) is deferred, and its fault point not reached: run again until a step ran.
        for _ in 0..50 {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                store.run_maintenance_once()
            })) {
                Ok(Ok(report)) if !report.deferred.is_empty() => continue,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => reported.lock().unwrap().push(e.to_string()),
                Err(_) => reported
                    .lock()
                    .unwrap()
                    .push("maintenance panicked: injected".into()),
            }
            break;
        }
    }
    let delivered = format!("SELECT count(DISTINCT msg_id) FROM \"{schema}\".deliveries");
    let all = eventually(PATIENCE, || {
        count(admin, &delivered) >= committed.len() as i64
    });
    fail::remove(point);
    let _ = handle.shutdown();
    drop(relay);
    drop(store);
    let mut found = check(
        admin,
        &schema,
        &committed,
        in_flight.overlaps.load(Ordering::SeqCst),
    );
    found.slow = in_flight.slow.load(Ordering::SeqCst);
    found.fired = fired.load(Ordering::SeqCst)
        || injected_at(point)
        || reported
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("injected"));
    // Threads left sleeping in a delay end within a second; their transactions with them.
    eventually(Duration::from_secs(15), || left_open(admin, &schema) == 0);
    found.left_open = left_open(admin, &schema);
    assert!(
        all || found.lost > 0,
        "{mode:?} {point} {fault:?}: {found:?}"
    );
    admin
        .get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .unwrap();
    found
}

/// `TROUTBOX_FP_POINTS` / `TROUTBOX_FP_FAULTS` (comma-separated parts of point names, or
/// fault names) run part of the matrix, to show a case red on a deliberately broken build.
fn selected(point: &str, fault: Fault) -> bool {
    let pick = |var: &str, what: &str| {
        std::env::var(var).map_or(true, |list| list.split(',').any(|p| what.contains(p)))
    };
    pick("TROUTBOX_FP_POINTS", point) && pick("TROUTBOX_FP_FAULTS", &format!("{fault:?}"))
}

fn run_matrix(mode: Mode) {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    install_logger();
    INJECTED.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let admin = common::pool(4);
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut cases = 0;
    let mut duplicates = 0;
    for (p, &point) in fp::ALL.iter().enumerate() {
        for (f, &fault) in FAULTS.iter().enumerate() {
            if !applies(point, fault, mode) || !selected(point, fault) {
                continue;
            }
            cases += 1;
            let found = run_case(&admin, mode, point, fault, p * 10 + f);
            duplicates += found.duplicates;
            let mut wrong = Vec::new();
            if !found.fired {
                wrong.push("the fault never fired");
            }
            if found.lost > 0 {
                wrong.push("committed messages lost");
            }
            if found.phantoms > 0 {
                wrong.push("a rolled-back message delivered");
            }
            if found.overlaps > 0 {
                wrong.push("a message held by two Senders at once");
            }
            // At most the batches the fault caught: one, and the slow first batch. None for
            // a fault before any Sender saw the batch (a termination also ends the other
            // worker's claims, which may be at their Sender).
            let duplicate_bound = if BEFORE_ANY_SENDER.contains(&point) && fault != Fault::Terminate
            {
                0
            } else {
                2 * BATCH
            };
            // Plus, on a loaded machine, one batch per Sender call that ran long (see
            // `InFlight::slow`).
            let duplicate_bound = duplicate_bound + found.slow as usize * BATCH;
            if found.duplicates > duplicate_bound {
                wrong.push("duplicates past the bound");
            }
            // Nothing is charged for a claim no Sender saw, except: an abort between the
            // journal record and the Sender; a worker stalled there past the send timeout,
            // whose claim the server ended and another worker's recovery charged (taken back
            // unless already counted); and a termination, which also ends the claims of the
            // other worker, whose Sender may have run. See RELIABILITY.md.
            let charge_bound = if BEFORE_ANY_SENDER.contains(&point)
                && fault != Fault::Terminate
                && !(point == fp::BEFORE_SENDER && matches!(fault, Fault::Abort | Fault::Delay))
            {
                0
            } else {
                1
            };
            let charge_bound = charge_bound + i32::try_from(found.slow).unwrap_or(i32::MAX);
            if found.max_attempts > charge_bound {
                wrong.push("an attempt charged past the bound");
            }
            if mode == Mode::Ordered && found.order_violations > 0 {
                wrong.push("key order broken");
            }
            if found.left_open > 0 {
                wrong.push("a transaction left open");
            }
            if !wrong.is_empty() {
                failures.push(format!("{point} {fault:?}: {wrong:?} {found:?}"));
            }
        }
    }
    println!(
        "FIGURES fault_points {}: {cases} cases, {} failed, {duplicates} duplicates in all, {:.1} s",
        mode.name(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fault_point_unordered() {
    run_matrix(Mode::Unordered);
}

#[test]
fn every_fault_point_ordered() {
    run_matrix(Mode::Ordered);
}

#[test]
fn every_fault_point_keep_sent() {
    run_matrix(Mode::Keep);
}

/// Backends of application `name` idle inside a transaction.
fn idle_in_transaction(admin: &PgPool, name: &str) -> i64 {
    admin
        .get()
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND state = 'idle in transaction'",
            &[&name],
        )
        .unwrap()
        .get(0)
}

/// Why (issue 21, item 3): a late settlement holds row locks of the outbox across several
/// round trips on the relay's second connection, which set no server-side bound: a client
/// gone silent in the middle (a frozen path, a paused process) kept them until TCP gave up,
/// hours later, and those messages could not be claimed meanwhile. Here the late settlement
/// stops for 20 s inside its transaction (the fault injected); the server must end it within
/// its 10 s bound.
#[test]
fn a_silent_late_settlement_holds_its_locks_at_most_10_s() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    const SCHEMA: &str = "fp_silent_late";
    let admin = common::pool(4);
    let store = case_store(&admin, SCHEMA, Mode::Unordered);
    prepare(&admin, &store, SCHEMA, Mode::Unordered);
    let fired: Arc<Mutex<Option<Instant>>> = Arc::default();
    let f = fired.clone();
    fail::cfg_callback(fp::LATE_SETTLE_MID, move || {
        let first = f.lock().unwrap().is_none();
        if first {
            *f.lock().unwrap() = Some(Instant::now());
            // The process goes silent inside the transaction (the fault), not a wait for
            // anything.
            std::thread::sleep(Duration::from_secs(20));
        }
    })
    .unwrap();
    let record = named_pool("fp_record", 2);
    let (mut handle, _relay) = start_on_smallest_pool(
        SCHEMA,
        Mode::Unordered,
        1,
        &Reported::default(),
        sender(record, SCHEMA, false, Arc::default(), true),
    );
    assert!(
        eventually(PATIENCE, || fired.lock().unwrap().is_some()),
        "the late settlement never ran"
    );
    assert!(eventually(PATIENCE, || idle_in_transaction(&admin, SCHEMA) > 0));
    let released = eventually(Duration::from_secs(25), || {
        idle_in_transaction(&admin, SCHEMA) == 0
    });
    let held = fired.lock().unwrap().unwrap().elapsed();
    fail::remove(fp::LATE_SETTLE_MID);
    println!(
        "FIGURES silent_late_settlement: locks released {:.1} s after it went silent (bound 10 s)",
        held.as_secs_f64()
    );
    assert!(released);
    assert!(held < Duration::from_secs(13), "held {held:?}");
    let _ = handle.shutdown_timeout(Duration::from_secs(1));
}

/// Why (issue 21, item 3): a partition maintenance step holds a lock on the table that every
/// producer INSERT waits for, across a few round trips. A maintainer gone silent between them
/// blocked every producer until TCP gave up. Here the step stops for 20 s holding its lock;
/// a producer's INSERT must go through within the step's 10 s server-side bound.
#[test]
fn a_silent_maintenance_step_blocks_producers_at_most_10_s() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    const SCHEMA: &str = "fp_silent_step";
    let admin = common::pool(4);
    let store = case_store(&admin, SCHEMA, Mode::Keep);
    prepare(&admin, &store, SCHEMA, Mode::Keep);
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    fail::cfg_callback(fp::MAINTENANCE_STEP, move || {
        if !f.swap(true, Ordering::SeqCst) {
            // Silent while holding the table's lock (the fault), not a wait for anything.
            std::thread::sleep(Duration::from_secs(20));
        }
    })
    .unwrap();
    let maintainer = {
        let store = store.clone();
        std::thread::spawn(move || store.run_maintenance_once())
    };
    assert!(eventually(PATIENCE, || fired.load(Ordering::SeqCst)));
    let producer = outbox(&store, Mode::Keep, 1, &Reported::default());
    let started = Instant::now();
    producer
        .add_message(&mut *admin.get().unwrap(), "k", b"after the step")
        .unwrap();
    let waited = started.elapsed();
    fail::remove(fp::MAINTENANCE_STEP);
    println!(
        "FIGURES silent_maintenance_step: a producer waited {:.1} s for a silent step (bound 10 s)",
        waited.as_secs_f64()
    );
    assert!(waited < Duration::from_secs(13), "waited {waited:?}");
    assert!(
        maintainer.join().unwrap().is_err(),
        "the silent step was ended"
    );
}
