//! The relay's second connection, shared by its workers, for every backend: journal
//! records, late settlements, recoveries and rows set aside. Each use is one short
//! transaction, so sharing costs a worker at most the wait for another's sub-millisecond
//! statement, and the pool one connection per relay rather than one per worker.
//!
//! The connection is taken out of the shared slot for each use, and the slot's lock is not
//! held meanwhile: a use whose call never returns (a connection dropped silently by the
//! network) holds up the others only until `stuck_after`, after which they give up on it
//! and take a new connection, and the stuck use, should it ever return, leaves its
//! connection alone.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Error;

/// A backend's connection as the shared slot needs it.
pub(crate) trait SideConn: Send + 'static {
    /// The backend's own error, which [`SideConnection::run`]'s closures return.
    type NativeError;

    /// True when the connection is known to be closed (without a round trip).
    fn is_closed(&self) -> bool;

    /// Ends a transaction a failed use may have left open; false when the connection cannot
    /// be used again.
    fn rollback(&mut self) -> bool;

    /// One round trip, on a thread of its own, for a connection that may be on a frozen
    /// path (see [`SideConnection::reset`]): the connection goes back to the pool only if
    /// it answers.
    fn probe(self);
}

/// Opens a side connection (`context` names the use in errors).
pub(crate) type Connect<C> = Box<dyn Fn(&'static str) -> Result<C, Error> + Send + Sync>;

/// Maps a backend error met while `context` to the crate's error.
pub(crate) type MapError<E> = Box<dyn Fn(&'static str, E) -> Error + Send + Sync>;

/// The shared slot (see the module's documentation).
pub(crate) struct SideConnection<C: SideConn> {
    connect: Connect<C>,
    map: MapError<C::NativeError>,
    state: Mutex<SideState<C>>,
    freed: Condvar,
    stuck_after: Duration,
}

/// The idle connection, whether a use is in progress, and which generation of users the
/// slot belongs to (bumped when a stuck use is given up on).
struct SideState<C> {
    conn: Option<C>,
    busy: bool,
    generation: u64,
}

impl<C: SideConn> SideConnection<C> {
    /// A slot whose uses give up on one that has held it past `stuck_after`.
    pub(crate) fn new(
        connect: Connect<C>,
        map: MapError<C::NativeError>,
        stuck_after: Duration,
    ) -> SideConnection<C> {
        SideConnection {
            connect,
            map,
            state: Mutex::new(SideState {
                conn: None,
                busy: false,
                generation: 0,
            }),
            freed: Condvar::new(),
            stuck_after,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SideState<C>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the connection: a worker was found stuck on a call that never returned (a
    /// network path that froze), and this connection, idle or in use, is on the same path.
    /// Waiting users are let go at once and take a new one. The idle one, if any, is checked
    /// on a thread of its own: back to the pool if it answers, kept by that thread for as
    /// long as it does not.
    pub(crate) fn reset(&self) {
        let mut state = self.lock();
        state.generation = state.generation.wrapping_add(1);
        state.busy = false;
        let idle = state.conn.take();
        drop(state);
        self.freed.notify_all();
        if let Some(conn) = idle {
            let _ = std::thread::Builder::new()
                .name("troutbox-check".into())
                .spawn(move || conn.probe());
        }
    }

    /// Runs `f` on the connection (opened when there is none); a connection that failed is
    /// dropped, and a transaction left open by `f` is rolled back.
    pub(crate) fn run<R>(
        &self,
        context: &'static str,
        f: impl FnOnce(&mut C) -> Result<R, C::NativeError>,
    ) -> Result<R, Error> {
        // Wait for the slot; give up on a use that has held it past `stuck_after`.
        let mut state = self.lock();
        let deadline = Instant::now() + self.stuck_after;
        while state.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::error!(
                    "troutbox relay: the claim journal's connection has not answered for {:?}; presumed dead, taking a new one",
                    self.stuck_after
                );
                state.generation = state.generation.wrapping_add(1);
                state.conn = None;
                break;
            }
            state = self
                .freed
                .wait_timeout(state, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        state.busy = true;
        let generation = state.generation;
        let taken = state.conn.take();
        drop(state);
        // A panic inside (a bug, an injected fault) must neither leave the slot busy nor
        // put a connection with an open transaction back into the pool.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.use_connection(taken, context, f)
        }));
        let (conn, result) = match result {
            Ok(done) => done,
            Err(payload) => {
                let mut state = self.lock();
                if state.generation == generation {
                    state.busy = false;
                    self.freed.notify_one();
                }
                drop(state);
                std::panic::resume_unwind(payload)
            }
        };
        // Hand the slot back, unless this use was given up on meanwhile.
        let mut state = self.lock();
        if state.generation == generation {
            state.busy = false;
            state.conn = conn;
            self.freed.notify_one();
        }
        result
    }

    /// Runs `f` on `taken` (or a new connection); returns the connection if it can be used
    /// again, and `f`'s result.
    fn use_connection<R>(
        &self,
        taken: Option<C>,
        context: &'static str,
        f: impl FnOnce(&mut C) -> Result<R, C::NativeError>,
    ) -> (Option<C>, Result<R, Error>) {
        let mut conn = match taken.filter(|c| !c.is_closed()) {
            Some(conn) => conn,
            None => match (self.connect)(context) {
                Ok(conn) => conn,
                Err(e) => return (None, Err(e)),
            },
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut conn)));
        let result = match result {
            Ok(result) => result,
            Err(payload) => {
                // Never let a connection go back to the pool with a transaction open.
                if !conn.is_closed() {
                    let _ = conn.rollback();
                }
                drop(conn);
                std::panic::resume_unwind(payload)
            }
        };
        match result {
            Ok(r) => (Some(conn), Ok(r)),
            Err(e) => {
                let usable = !conn.is_closed() && conn.rollback();
                (usable.then_some(conn), Err((self.map)(context, e)))
            }
        }
    }
}
