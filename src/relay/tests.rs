//! The dispatcher's own logic against the in-memory store: outcome bookkeeping, backoff,
//! panics, errors and shutdown, without a database.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::relay::batch::Batch;
use crate::relay::handle::Handle;
use crate::store::memory::MemoryStore;
use crate::store::protocol::ProtocolRelay;
use crate::Error;

const WAIT: Duration = Duration::from_secs(10);

fn config() -> Config {
    Config {
        batch_size: 10,
        max_retries: 2,
        backoff: Backoff::exponential(Duration::from_millis(20), Duration::from_millis(40))
            .without_jitter(),
        poll_interval: Duration::from_millis(5),
        ..Config::default()
    }
}

fn start<F>(store: &Arc<MemoryStore>, config: &Config, sender: F) -> Handle
where
    F: FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static,
{
    let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
    super::spawn(
        Arc::new(ProtocolRelay::new(store.clone(), config)),
        sender,
        config,
        Arc::default(),
        wake_tx,
        wake_rx,
    )
    .unwrap()
}

#[test]
fn ok_sends_everything_once() {
    let store = MemoryStore::new();
    for i in 0..35 {
        store.add(&format!("k{i}"));
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut handle = start(&store, &config(), move |batch: &mut Batch| {
        s.lock().unwrap().extend(batch.iter().map(|m| m.id()));
        Ok(())
    });
    assert!(store.wait_until(WAIT, |s| s.rows.is_empty()));
    handle.shutdown().unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, (1..=35).collect::<Vec<i64>>());
}

#[test]
fn marked_failures_are_retried_with_attempts_counted() {
    let store = MemoryStore::new();
    let poison = store.add("poison");
    let good = store.add("good");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut handle = start(&store, &config(), move |batch: &mut Batch| {
        c.fetch_add(1, Ordering::SeqCst);
        for m in batch.iter_mut() {
            if m.key() == "poison" {
                m.mark_failed(format!("attempt {}", m.attempts()));
            }
        }
        Ok(())
    });
    // Dead after max_retries + 1 = 3 failures; the good one went on the first batch.
    assert!(store.wait_until(WAIT, |s| s.rows.get(&poison).is_some_and(|r| r.dead)));
    handle.shutdown().unwrap();
    let state = store.state();
    assert_eq!(state.sent, [good]);
    let row = &state.rows[&poison];
    assert_eq!(row.message.attempts, 3);
    assert_eq!(row.last_error.as_deref(), Some("attempt 2"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "one batch per attempt, none after death"
    );
}

#[test]
fn err_fails_only_the_unmarked_messages() {
    let store = MemoryStore::new();
    let a = store.add("a");
    let b = store.add("b");
    let mut cfg = config();
    cfg.max_retries = 0;
    let mut handle = start(&store, &cfg, move |batch: &mut Batch| {
        batch.messages_mut()[0].mark_sent();
        Err("broker closed the channel".to_string())
    });
    assert!(store.wait_until(WAIT, |s| s.settlements >= 1));
    handle.shutdown().unwrap();
    let state = store.state();
    assert_eq!(state.sent, [a]);
    assert!(state.rows[&b].dead);
    assert_eq!(
        state.rows[&b].last_error.as_deref(),
        Some("broker closed the channel")
    );
}

#[test]
fn a_panicking_sender_fails_the_batch_and_the_worker_lives_on() {
    let store = MemoryStore::new();
    let boom = store.add("boom");
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e = errors.clone();
    let mut cfg = config();
    cfg.error_handler = Arc::new(move |err: &Error| e.lock().unwrap().push(err.to_string()));
    let mut handle = start(&store, &cfg, |batch: &mut Batch| {
        if batch.iter().any(|m| m.key() == "boom" && m.attempts() == 0) {
            panic!("sender bug");
        }
        Ok(())
    });
    assert!(store.wait_until(WAIT, |s| s.sent.contains(&boom)));
    let later = store.add("later");
    assert!(store.wait_until(WAIT, |s| s.sent.contains(&later)));
    handle.shutdown().unwrap();
    let errors = errors.lock().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("sender panicked") && e.contains("sender bug")),
        "{errors:?}"
    );
}

#[test]
fn untouched_messages_of_a_failed_batch_never_loop_forever() {
    let store = MemoryStore::new();
    let id = store.add("x");
    let mut handle = start(&store, &config(), |_: &mut Batch| Err("always".to_string()));
    assert!(store.wait_until(WAIT, |s| s.rows[&id].dead));
    handle.shutdown().unwrap();
    assert_eq!(store.state().rows[&id].message.attempts, 3);
}

#[test]
fn database_errors_are_reported_and_the_worker_recovers() {
    let store = MemoryStore::new();
    store.state().failing_claims = 3;
    let id = store.add("x");
    let reported = Arc::new(AtomicUsize::new(0));
    let r = reported.clone();
    let mut cfg = config();
    cfg.error_handler = Arc::new(move |_: &Error| {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let mut handle = start(&store, &cfg, |_: &mut Batch| Ok(()));
    assert!(store.wait_until(WAIT, |s| s.sent.contains(&id)));
    handle.shutdown().unwrap();
    assert_eq!(reported.load(Ordering::SeqCst), 3);
}

/// A Sender for two workers that holds the first batch until the test lets go: `entered`
/// says a batch is in the Sender, and the live clones of `token` (two per worker: the
/// Sender and its pristine copy) say how many workers are still running.
fn held_sender(
    token: &Arc<()>,
    entered: crossbeam_channel::Sender<()>,
    go: crossbeam_channel::Receiver<()>,
) -> impl FnMut(&mut Batch) -> Result<(), String> + Clone + Send + 'static {
    let token = token.clone();
    move |_: &mut Batch| {
        let _alive = &token;
        let _ = entered.try_send(());
        // A hang guard only: the test lets go long before.
        let _ = go.recv_timeout(WAIT * 3);
        Ok(())
    }
}

/// Releases the held batch once the stop is certain to have been given (the idle one of the
/// two workers has ended: only the stop ends a worker) and the stopping call has had a fair
/// chance to return early, which it must not do while a batch is in the Sender. Returns
/// true if it did return early.
fn release_when_stopping(
    token: Arc<()>,
    go: crossbeam_channel::Sender<()>,
    returned: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + WAIT;
        // The test's clone, this one, and the busy worker's two.
        while Arc::strong_count(&token) > 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle worker never stopped: {} clones",
                Arc::strong_count(&token)
            );
            std::thread::yield_now();
        }
        // An observation window, not a synchronisation: a correct stop never returns within
        // it, a stop that does not wait for the batch returns at once.
        let window = std::time::Instant::now() + Duration::from_millis(500);
        while std::time::Instant::now() < window && !returned.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let early = returned.load(Ordering::SeqCst);
        go.send(()).unwrap();
        early
    })
}

#[test]
fn shutdown_finishes_the_batch_in_flight() {
    let store = MemoryStore::new();
    let id = store.add("slow");
    let mut cfg = config();
    cfg.workers = 2;
    let token = Arc::new(());
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let mut handle = start(&store, &cfg, held_sender(&token, entered_tx, go_rx));
    entered_rx.recv_timeout(WAIT).unwrap();
    let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let releaser = release_when_stopping(token.clone(), go_tx, returned.clone());
    // The batch is in the Sender, and is let go only after the shutdown has begun.
    handle.shutdown().unwrap();
    returned.store(true, Ordering::SeqCst);
    assert!(
        !releaser.join().unwrap(),
        "shutdown returned while the batch was in the Sender"
    );
    assert_eq!(
        store.state().sent,
        [id],
        "the batch in flight was not settled"
    );
    assert_eq!(Arc::strong_count(&token), 1, "a worker is still running");
    assert!(handle.is_finished());
    handle.shutdown().unwrap();
}

#[test]
fn shutdown_gives_up_on_a_hung_sender_after_its_timeout() {
    let store = MemoryStore::new();
    store.add("hang");
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let mut handle = start(&store, &config(), move |_: &mut Batch| {
        let _ = entered_tx.send(());
        let _ = go_rx.recv();
        Ok(())
    });
    entered_rx.recv_timeout(WAIT).unwrap();
    let err = handle
        .shutdown_timeout(Duration::from_millis(50))
        .unwrap_err();
    assert!(
        matches!(err, Error::ShutdownTimedOut { running: 1 }),
        "{err}"
    );
    go_tx.send(()).unwrap();
}

#[test]
fn several_workers_share_the_work_without_duplicates() {
    let store = MemoryStore::new();
    for i in 0..500 {
        store.add(&format!("k{i}"));
    }
    let mut cfg = config();
    cfg.workers = 4;
    // (in the Sender now, most ever at once): the first batches wait for a second worker
    // to be inside the Sender too, so the test fails if one worker did all the work.
    let inside = Arc::new((
        std::sync::Mutex::new((0usize, 0usize)),
        std::sync::Condvar::new(),
    ));
    let seen = inside.clone();
    let mut handle = start(&store, &cfg, move |_: &mut Batch| {
        let (lock, changed) = &*seen;
        let mut s = lock.lock().unwrap();
        s.0 += 1;
        s.1 = s.1.max(s.0);
        changed.notify_all();
        let (mut s, _) = changed.wait_timeout_while(s, WAIT, |s| s.1 < 2).unwrap();
        s.0 -= 1;
        Ok(())
    });
    assert!(store.wait_until(WAIT, |s| s.rows.is_empty()));
    handle.shutdown().unwrap();
    assert!(
        inside.0.lock().unwrap().1 >= 2,
        "never two workers in the Sender at once"
    );
    let mut sent = store.state().sent.clone();
    assert_eq!(sent.len(), 500);
    sent.sort();
    sent.dedup();
    assert_eq!(sent.len(), 500, "a message was sent twice");
}

#[test]
fn dropping_the_handle_joins_the_workers_and_settles_the_batch_in_flight() {
    let store = MemoryStore::new();
    let id = store.add("slow");
    let mut cfg = config();
    cfg.workers = 2;
    let token = Arc::new(());
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let handle = start(&store, &cfg, held_sender(&token, entered_tx, go_rx));
    entered_rx.recv_timeout(WAIT).unwrap();
    let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let releaser = release_when_stopping(token.clone(), go_tx, returned.clone());
    drop(handle);
    returned.store(true, Ordering::SeqCst);
    assert!(
        !releaser.join().unwrap(),
        "drop returned while the batch was in the Sender"
    );
    // Drop joined the threads (every Sender copy is gone) after the batch was settled.
    assert_eq!(Arc::strong_count(&token), 1, "a worker outlived the drop");
    assert_eq!(
        store.state().sent,
        [id],
        "the batch in flight was not settled"
    );
}

#[test]
fn dropping_the_handle_gives_up_on_a_stuck_sender_after_the_shutdown_timeout() {
    let store = MemoryStore::new();
    store.add("stuck");
    let mut cfg = config();
    cfg.shutdown_timeout = Duration::from_millis(200);
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let handle = start(&store, &cfg, move |_: &mut Batch| {
        let _ = entered_tx.try_send(());
        let _ = go_rx.recv();
        Ok(())
    });
    entered_rx.recv_timeout(WAIT).unwrap();
    let (dropped_tx, dropped_rx) = crossbeam_channel::bounded::<Duration>(1);
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        drop(handle);
        dropped_tx.send(started.elapsed()).unwrap();
    });
    // The Sender never returns on its own: drop must come back anyway (hang guard only).
    let took = dropped_rx
        .recv_timeout(WAIT)
        .expect("drop hung on a stuck Sender");
    assert!(
        took >= cfg.shutdown_timeout,
        "drop returned after {took:?}, before the shutdown timeout"
    );
    assert!(store.state().sent.is_empty());
    go_tx.send(()).unwrap();
}
