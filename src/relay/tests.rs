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
        Arc::new(store.clone()),
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

#[test]
fn shutdown_finishes_the_batch_in_flight() {
    let store = MemoryStore::new();
    let id = store.add("slow");
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let mut handle = start(&store, &config(), move |_: &mut Batch| {
        entered_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        Ok(())
    });
    entered_rx.recv_timeout(WAIT).unwrap();
    let releaser = std::thread::spawn(move || {
        // Let shutdown start waiting first; the outcome does not depend on this ordering.
        go_tx.send(()).unwrap();
    });
    handle.shutdown().unwrap();
    releaser.join().unwrap();
    assert_eq!(store.state().sent, [id]);
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
    let mut handle = start(&store, &cfg, |_: &mut Batch| Ok(()));
    assert!(store.wait_until(WAIT, |s| s.rows.is_empty()));
    handle.shutdown().unwrap();
    let mut sent = store.state().sent.clone();
    assert_eq!(sent.len(), 500);
    sent.sort();
    sent.dedup();
    assert_eq!(sent.len(), 500, "a message was sent twice");
}

#[test]
fn dropping_the_handle_stops_the_workers() {
    let store = MemoryStore::new();
    let handle = start(&store, &config(), |_: &mut Batch| Ok(()));
    drop(handle);
    // With every worker gone, a new message stays put.
    store.add("after");
    assert!(!store.wait_until(Duration::from_millis(100), |s| !s.sent.is_empty()));
}
