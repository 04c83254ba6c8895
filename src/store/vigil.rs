//! When a relay journals its claims.
//!
//! The claim journal (see `claim.rs`) is how a claim that ends without a settlement is
//! charged: a process killed by its Sender, a Sender that hangs past the send timeout. It
//! costs a round trip on a second connection per batch, which measured 0.1 to 0.15 of the
//! drain rate at batch 100 (BENCHMARKS.md, issue 23). It matters only around such ends: a
//! message that crashes the relay once crashes it again at its next claim, and the journal
//! needs to catch the second one, not the first.
//!
//! So a relay journals its claims only while it is *vigilant*:
//! - the first claims of every session ([`FIRST_CLAIMS_JOURNALED`]): a session opens when a
//!   relay starts (possibly restarted after its Sender killed it) and after its connection
//!   was lost, and the claims right after are the ones that take back what a crash left;
//! - for [`WINDOW`] after anything abnormal: a claim of this relay lost or expired, a Sender
//!   still running at its claim's deadline (half the send timeout, seen by the watchdog:
//!   before the server ends that claim, so the claim that takes its messages next is
//!   journaled), a worker replaced, a message found charged, an abandoned claim recovered,
//!   or another relay's announcement.
//!
//! A relay announces its start, and its own abnormal ends, to every relay on the table with
//! a marker row in the journal, posted with its next recovery (its next claim, at most a
//! second apart while it drains) and read by every relay's recovery. Relays of one process
//! ignore each other's markers: they share its fate (a crash ends them all, and each starts
//! vigilant), at the price of not hearing each other's alerts either.
//! That covers relays in steady state when one of them crashes: the crashed relay's claims
//! go back to the table, and the others would claim them without a journal; the restarted
//! relay's marker makes them vigilant within a second.
//!
//! What that costs the guarantee, and what it does not:
//! - Nothing is ever lost: an unjournaled claim that ends without a settlement rolls back,
//!   and its messages are claimed again. Only the *charge* for it is missing.
//! - A message that kills or hangs the relay at each claim is charged from its second such
//!   end on, instead of its first, per relay process in steady state when it claims it: the
//!   bound on its attempts grows by at most the number of relay processes (RELIABILITY.md).
//! - Before the Sender, an unjournaled claim is proven held by its deadline (half the send
//!   timeout after the claim) alone; a journaled one also by the journal's lock probe. A
//!   session killed by an operator in that sub-millisecond window can let two relays send
//!   the same batch (duplicates, allowed by at-least-once), never lose it.
//! - A lost claim that was not journaled cannot be settled late: its messages are delivered
//!   again, and the error handler is told so (`Error::OutcomeLost`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a relay stays vigilant after the last abnormal event it saw. Longer than the
/// restart delays of the usual supervisors (Kubernetes' crash-loop back-off tops out at 5
/// minutes, systemd's `RestartSec` is seconds), so that a crash loop keeps every relay
/// vigilant from one crash to the next.
pub(crate) const WINDOW: Duration = Duration::from_secs(600);

/// Claims journaled at the start of every session, whatever the vigilance: a relay started
/// again after a crash takes back the crashed claims at the head of the table with these.
pub(crate) const FIRST_CLAIMS_JOURNALED: u32 = 4;

/// How long a marker row stays in the journal: as long as the vigilance it asks for, so
/// that a relay idle for minutes (a long `poll_interval`) still reads it with the recovery
/// before its next claim.
pub(crate) const MARKER_LIFETIME: Duration = WINDOW;

/// One relay's vigilance, shared by its workers.
pub(crate) struct Vigil {
    epoch: Instant,
    /// Until when (milliseconds since `epoch`) every claim is journaled; 0 for never.
    until_ms: AtomicU64,
    /// Something to announce to the other relays with the next recovery.
    announce: AtomicBool,
}

/// Marker ids posted by the relays of this process, which their recoveries ignore: relays
/// in one process share its fate (a crash ends them all, and each starts vigilant again),
/// and a program that starts a relay after another on the same table (a test, a bench)
/// must not make the second vigilant for what the first announced.
static OWN_MARKERS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

impl Vigil {
    /// A new relay: its start is to be announced; it is vigilant only for the first claims
    /// of its sessions.
    pub(crate) fn new() -> Vigil {
        Vigil {
            epoch: Instant::now(),
            until_ms: AtomicU64::new(0),
            announce: AtomicBool::new(true),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Journals every claim for [`WINDOW`] from now, because of `why`.
    pub(crate) fn alert(&self, why: &str) {
        let now = self.now_ms();
        let until = now.saturating_add(u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX));
        let before = self.until_ms.fetch_max(until, Ordering::Relaxed);
        if before <= now {
            log::info!(
                "troutbox relay: journaling every claim for the next {} s: {why}",
                WINDOW.as_secs()
            );
        }
    }

    /// [`alert`](Self::alert), and announce it to the other relays.
    pub(crate) fn alert_all(&self, why: &str) {
        self.alert(why);
        self.announce.store(true, Ordering::Relaxed);
    }

    /// Whether every claim is journaled now.
    pub(crate) fn vigilant(&self) -> bool {
        self.now_ms() < self.until_ms.load(Ordering::Relaxed)
    }

    /// A marker id to post now, if there is something to announce: negative (claims are
    /// positive), from `random`.
    pub(crate) fn marker_to_post(&self, random: u64) -> Option<i32> {
        if !self.announce.swap(false, Ordering::Relaxed) {
            return None;
        }
        // 31 random bits, made negative and never 0.
        let id = -(((random >> 33) as i32) | 1);
        let mut own = OWN_MARKERS.lock().unwrap_or_else(|p| p.into_inner());
        // A marker lives MARKER_LIFETIME; remembering the last ones is enough (a program
        // starting thousands of relays within that time is a test, at worst vigilant).
        if own.len() >= 4096 {
            own.remove(0);
        }
        own.push(id);
        Some(id)
    }

    /// A post that failed: announce again with the next recovery.
    pub(crate) fn post_failed(&self) {
        self.announce.store(true, Ordering::Relaxed);
    }

    /// Whether `markers` (seen in the journal) include one posted by a relay of another
    /// process.
    pub(crate) fn others_announced(&self, markers: &[i32]) -> bool {
        let own = OWN_MARKERS.lock().unwrap_or_else(|p| p.into_inner());
        markers.iter().any(|m| !own.contains(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vigilant_only_after_an_alert() {
        let vigil = Vigil::new();
        assert!(!vigil.vigilant());
        vigil.alert("test");
        assert!(vigil.vigilant());
    }

    #[test]
    fn a_start_is_announced_once_and_its_marker_is_its_own() {
        let vigil = Vigil::new();
        let marker = vigil
            .marker_to_post(u64::MAX)
            .expect("the start is announced");
        assert!(marker < 0);
        assert_eq!(vigil.marker_to_post(7), None);
        assert!(!vigil.others_announced(&[marker]));
        assert!(vigil.others_announced(&[marker, -5]));
        vigil.post_failed();
        assert!(vigil.marker_to_post(0).is_some_and(|m| m < 0));
        // alert_all announces again.
        vigil.alert_all("test");
        assert!(vigil.marker_to_post(1 << 40).is_some());
    }
}
