//! An in-memory backend for the relay's unit tests, the way r2d2 tests its pool with fake
//! managers: the dispatcher's bookkeeping is checked without a database. It implements the
//! claim protocol's primitives ([`ClaimBackend`]), as a database backend does, so the relay
//! runs through the same protocol (journal, recovery, charges, late settlement) as with
//! PostgreSQL; only the storage is a map.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::{
    ClaimBackend, ClaimConnection, ClaimSpec, ClaimedRow, LateFailed, LateSettlement, Recovered,
    Take,
};
use super::Returned;
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
    /// Claim transactions running (begun, not ended).
    pub(crate) running: HashSet<i32>,
    /// The claim journal: claim id to message ids.
    pub(crate) journal: BTreeMap<i32, Vec<i64>>,
    /// Announcements posted by recoveries.
    pub(crate) markers: Vec<i32>,
    /// Charges: (message id, abandoned claim id).
    pub(crate) charges: Vec<(i64, i32)>,
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

impl ClaimBackend for Arc<MemoryStore> {
    type Conn = MemoryConn;
    type NativeError = Error;
    type Late<'a> = MemoryLate<'a>;

    fn connect(&self, spec: &ClaimSpec) -> Result<MemoryConn, Error> {
        Ok(MemoryConn {
            store: self.clone(),
            limit: spec.limit,
            claim: None,
            claimed: Vec::new(),
            returned: Vec::new(),
        })
    }

    fn check(&self, _: &mut MemoryConn, _: bool) -> Result<Arc<str>, Error> {
        Ok(Arc::from(""))
    }

    fn breaks_row_check(&self, _: &Error) -> bool {
        false
    }

    fn journal_record(&self, claim_id: i32, ids: &[i64]) -> Result<bool, Error> {
        let mut state = self.state();
        if !state.running.contains(&claim_id) {
            return Ok(false);
        }
        state.journal.insert(claim_id, ids.to_vec());
        Ok(true)
    }

    fn journal_forget(&self, claim_id: i32) -> Result<(), Error> {
        self.state().journal.remove(&claim_id);
        Ok(())
    }

    fn recover(&self, marker: Option<i32>, _cleanup: bool) -> Result<Recovered, Error> {
        let mut state = self.state();
        state.markers.extend(marker);
        let ended: Vec<i32> = state
            .journal
            .keys()
            .copied()
            .filter(|id| !state.running.contains(id))
            .collect();
        let mut charged = 0;
        for claim_id in ended {
            for id in state.journal.remove(&claim_id).unwrap_or_default() {
                state.charges.push((id, claim_id));
                charged += 1;
            }
        }
        Ok(Recovered {
            charged,
            markers: state.markers.clone(),
        })
    }

    fn set_aside(&self, id: i64, reason: &str) -> Result<u64, Error> {
        let mut state = self.state();
        match state.rows.get_mut(&id) {
            Some(row) if !row.dead => {
                row.dead = true;
                row.last_error = Some(reason.to_owned());
                Ok(1)
            }
            _ => Ok(0),
        }
    }

    fn set_aside_unchecked(&self) -> Result<Vec<i64>, Error> {
        Ok(Vec::new())
    }

    fn late_settlement<R>(
        &self,
        _context: &'static str,
        f: impl FnOnce(&mut MemoryLate<'_>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let result = f(&mut MemoryLate {
            state: self.state(),
        });
        self.changed.notify_all();
        result
    }

    fn reset_shared(&self) {}
}

/// A worker's connection to the memory store: its claim transaction.
pub(crate) struct MemoryConn {
    store: Arc<MemoryStore>,
    limit: usize,
    /// The running claim transaction.
    claim: Option<i32>,
    /// Rows the running claim took (locked; removed at its COMMIT unless returned).
    claimed: Vec<i64>,
    /// Failed messages put back, applied at the COMMIT.
    returned: Vec<(i64, u32, Duration, bool, String)>,
}

impl MemoryConn {
    /// Ends the claim transaction: applies it if `commit`, otherwise unlocks its rows.
    fn end(&mut self, state: &mut State, commit: bool) {
        let returned = std::mem::take(&mut self.returned);
        let now = Instant::now();
        for id in self.claimed.drain(..) {
            let back = returned.iter().find(|r| r.0 == id);
            match back {
                Some((_, attempts, delay, dead, error)) if commit => {
                    if let Some(row) = state.rows.get_mut(&id) {
                        row.message.attempts = *attempts;
                        row.available_at = now + *delay;
                        row.dead = *dead;
                        row.last_error = Some(error.clone());
                        row.locked = false;
                    }
                }
                None if commit => {
                    state.rows.remove(&id);
                    state.sent.push(id);
                }
                _ => {
                    if let Some(row) = state.rows.get_mut(&id) {
                        row.locked = false;
                    }
                }
            }
        }
        if let Some(claim_id) = self.claim.take() {
            state.running.remove(&claim_id);
        }
    }
}

impl ClaimConnection for MemoryConn {
    fn begin(&mut self, claim_id: i32) -> Result<(), Error> {
        self.store.state().running.insert(claim_id);
        self.claim = Some(claim_id);
        Ok(())
    }

    fn claim(&mut self, take: Take, outbox: &Arc<str>) -> Result<Vec<ClaimedRow>, Error> {
        let mut state = self.store.state();
        if state.failing_claims > 0 {
            state.failing_claims -= 1;
            return Err(Error::InvalidConfig {
                option: "memory store",
                reason: "injected claim failure".into(),
            });
        }
        let now = Instant::now();
        let (only, limit) = match take {
            Take::One(id) => (Some(id), 1),
            Take::Head | Take::After(_) => (None, self.limit),
        };
        let mut taken = Vec::new();
        for row in state.rows.values_mut() {
            if taken.len() == limit {
                break;
            }
            let wanted = only.is_none_or(|id| id == row.message.id);
            if wanted && !row.locked && !row.dead && row.available_at <= now {
                row.locked = true;
                let m = &row.message;
                taken.push(Message {
                    outbox: outbox.clone(),
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
        self.claimed.extend(taken.iter().map(|m| m.id));
        Ok(taken
            .into_iter()
            .map(|message| {
                let charges = state
                    .charges
                    .iter()
                    .filter(|(id, _)| *id == message.id)
                    .map(|(_, claim)| *claim)
                    .collect();
                ClaimedRow {
                    id: Some(message.id),
                    position: None,
                    decoded: Ok((message, charges)),
                }
            })
            .collect())
    }

    fn return_failed(&mut self, returned: &[Returned]) -> Result<(), Error> {
        self.returned.extend(
            returned
                .iter()
                .map(|r| (r.message.id, r.attempts, r.delay, r.dead, r.error.clone())),
        );
        Ok(())
    }

    fn commit(
        &mut self,
        journaled: Option<i32>,
        charged: &[(i64, Vec<i32>)],
        next: Option<i32>,
    ) -> Result<(), Error> {
        let store = self.store.clone();
        let mut state = store.state();
        if let Some(claim_id) = journaled {
            state.journal.remove(&claim_id);
        }
        state
            .charges
            .retain(|(id, claim)| !charged.iter().any(|(m, c)| m == id && c.contains(claim)));
        self.end(&mut state, true);
        state.settlements += 1;
        if let Some(claim_id) = next {
            state.running.insert(claim_id);
            self.claim = Some(claim_id);
        }
        drop(state);
        store.changed.notify_all();
        Ok(())
    }

    fn end_empty(&mut self) -> Result<(), Error> {
        let store = self.store.clone();
        self.end(&mut store.state(), true);
        Ok(())
    }

    fn rollback(&mut self, _in_transaction: bool) -> bool {
        let store = self.store.clone();
        self.end(&mut store.state(), false);
        store.changed.notify_all();
        true
    }

    fn is_closed(&self) -> bool {
        false
    }
}

/// A late settlement on the memory store, under its lock.
pub(crate) struct MemoryLate<'a> {
    state: MutexGuard<'a, State>,
}

impl LateSettlement for MemoryLate<'_> {
    type Error = Error;

    fn take_journal(&mut self, claim_id: i32) -> Result<Option<Vec<i64>>, Error> {
        Ok(self.state.journal.remove(&claim_id))
    }

    fn free_of(&mut self, ids: &[i64]) -> Result<HashSet<i64>, Error> {
        Ok(ids.iter().copied().collect())
    }

    fn mark_sent(&mut self, ids: &[i64]) -> Result<Vec<i64>, Error> {
        let state = &mut *self.state;
        let mut done = Vec::new();
        for id in ids {
            if state.rows.get(id).is_some_and(|r| !r.locked && !r.dead) {
                state.rows.remove(id);
                state.sent.push(*id);
                done.push(*id);
            }
        }
        Ok(done)
    }

    fn forget_charges(&mut self, ids: &[i64]) -> Result<(), Error> {
        self.state.charges.retain(|(id, _)| !ids.contains(id));
        Ok(())
    }

    fn record_failed(&mut self, f: &LateFailed<'_>) -> Result<Vec<(i64, bool)>, Error> {
        let state = &mut *self.state;
        let now = Instant::now();
        let mut done = Vec::new();
        for (i, id) in f.ids.iter().enumerate() {
            let Some(id) = id else { continue };
            let Some(row) = state.rows.get_mut(id).filter(|r| !r.locked && !r.dead) else {
                continue;
            };
            let attempts = f.read[i].saturating_add(f.increments[i]);
            row.message.attempts = u32::try_from(attempts).unwrap_or(0);
            row.dead = attempts > f.max_retries;
            row.available_at = now + Duration::from_millis(u64::try_from(f.delays[i]).unwrap_or(0));
            row.last_error = Some(f.errors[i].to_owned());
            done.push((*id, row.dead));
        }
        let ids: Vec<i64> = done.iter().map(|(id, _)| *id).collect();
        state.charges.retain(|(id, _)| !ids.contains(id));
        Ok(done)
    }

    fn charge(&mut self, ids: &[i64], claim_id: i32) -> Result<(), Error> {
        self.state
            .charges
            .extend(ids.iter().map(|id| (*id, claim_id)));
        Ok(())
    }
}
