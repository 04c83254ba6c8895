//! An in-memory [`RelayStore`] for the relay's unit tests, the way r2d2 tests its pool with
//! fake managers: the dispatcher's bookkeeping is checked without a database.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Claimed, RelaySession, RelayStore, SettleReport, Settlement};
use crate::message::{Message, Status};
use crate::Error;

#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) message: Message,
    pub(crate) available_at: Instant,
    pub(crate) dead: bool,
    pub(crate) last_error: Option<String>,
    pub(crate) locked: bool,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) rows: BTreeMap<i64, Row>,
    pub(crate) next_id: i64,
    pub(crate) sent: Vec<i64>,
    /// Claims that fail with a database error before any succeeds again.
    pub(crate) failing_claims: usize,
    pub(crate) settlements: usize,
}

#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    state: Mutex<State>,
    changed: Condvar,
}

impl MemoryStore {
    pub(crate) fn new() -> Arc<MemoryStore> {
        Arc::new(MemoryStore::default())
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn add(&self, key: &str) -> i64 {
        let mut state = self.state();
        state.next_id += 1;
        let id = state.next_id;
        let message = Message {
            outbox: "".into(),
            id,
            key: key.to_owned(),
            value: key.as_bytes().to_vec(),
            headers: vec![],
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            attempts: 0,
            status: Status::Unmarked,
        };
        state.rows.insert(
            id,
            Row {
                message,
                available_at: Instant::now(),
                dead: false,
                last_error: None,
                locked: false,
            },
        );
        id
    }

    /// Waits until `done` holds, re-checking after every settlement, up to `timeout`.
    pub(crate) fn wait_until(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let (state, _) = self
            .changed
            .wait_timeout_while(self.state(), timeout, |s| !done(s))
            .unwrap_or_else(|p| p.into_inner());
        done(&state)
    }
}

impl RelayStore for Arc<MemoryStore> {
    type Session = MemorySession;

    fn open_session(&self) -> Result<MemorySession, Error> {
        Ok(MemorySession {
            store: self.clone(),
            claimed: Vec::new(),
        })
    }
}

pub(crate) struct MemorySession {
    store: Arc<MemoryStore>,
    claimed: Vec<i64>,
}

impl MemorySession {
    fn unlock_claimed(&mut self, state: &mut State) {
        for id in self.claimed.drain(..) {
            if let Some(row) = state.rows.get_mut(&id) {
                row.locked = false;
            }
        }
    }
}

impl RelaySession for MemorySession {
    fn claim(&mut self, limit: usize) -> Result<Claimed, Error> {
        let mut state = self.store.state();
        if state.failing_claims > 0 {
            state.failing_claims -= 1;
            return Err(Error::InvalidConfig {
                option: "memory store",
                reason: "injected claim failure".into(),
            });
        }
        let now = Instant::now();
        let mut batch = Vec::new();
        for row in state.rows.values_mut() {
            if batch.len() == limit {
                break;
            }
            if !row.locked && !row.dead && row.available_at <= now {
                row.locked = true;
                let m = &row.message;
                batch.push(Message {
                    outbox: "".into(),
                    id: m.id,
                    key: m.key.clone(),
                    value: m.value.clone(),
                    headers: m.headers.clone(),
                    created_at: m.created_at,
                    attempts: m.attempts,
                    status: Status::Unmarked,
                });
            }
        }
        self.claimed = batch.iter().map(|m| m.id).collect();
        let claimed_at = (!batch.is_empty()).then_some(now);
        Ok(Claimed {
            messages: batch,
            claimed_at,
            ..Claimed::default()
        })
    }

    fn release(&mut self) {
        let store = self.store.clone();
        let mut state = store.state();
        self.unlock_claimed(&mut state);
        drop(state);
        store.changed.notify_all();
    }

    fn settle(&mut self, settlement: Settlement) -> (SettleReport, Option<Error>) {
        let report = SettleReport::of(&settlement);
        let store = self.store.clone();
        let mut state = store.state();
        for id in &settlement.sent {
            state.rows.remove(id);
            state.sent.push(*id);
        }
        let now = Instant::now();
        for r in settlement.returned {
            let row = state
                .rows
                .get_mut(&r.message.id)
                .expect("claimed row exists");
            row.message.attempts = r.attempts;
            row.available_at = now + r.delay;
            row.dead = r.dead;
            row.last_error = Some(r.error);
        }
        self.unlock_claimed(&mut state);
        state.settlements += 1;
        drop(state);
        store.changed.notify_all();
        (report, None)
    }

    fn is_broken(&self) -> bool {
        false
    }
}
