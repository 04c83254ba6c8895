//! Turns a batch the Sender has seen into a [`Settlement`]: the Sender contract in code.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::message::Status;
use crate::relay::batch::Batch;
use crate::store::storable_text;
use crate::store::{Returned, Settlement};

/// Decides every message of `batch`. `failure` is the text of the Sender's error or panic,
/// `None` when it returned `Ok`. Marks win over the return value; unmarked messages follow it.
///
/// In an ordered batch (per-key ordering), a message that comes after a failed message of
/// its key was not to be published (the Sender contract): unless the Sender marked it sent
/// anyway, it goes back as it was, without an attempt charged, due at once, whether it was
/// left unmarked (under `Ok` or `Err`) or marked failed; its key waits for the failed one,
/// which is the head now.
pub(crate) fn decide(
    batch: Batch,
    failure: Option<&str>,
    max_retries: u32,
    backoff: &Backoff,
) -> Settlement {
    let mut settlement = Settlement::default();
    let ordered = batch.ordered;
    let mut failed_keys: std::collections::HashMap<String, i64> = Default::default();
    for mut message in batch.messages {
        let status = std::mem::replace(&mut message.status, Status::Unmarked);
        let marked_sent = matches!(status, Status::Sent);
        let reason = match status {
            Status::Sent => None,
            Status::Failed(reason) => Some(reason),
            Status::Unmarked => failure.map(str::to_owned),
        };
        // A follower of a failed message of its key goes back uncharged whatever the
        // Sender returned, unless it was marked sent (it was published): under `Ok` an
        // unmarked follower was not published either (docs/ordering.md), and recording it
        // as sent would lose it.
        // (No lookup while nothing failed: the common case, one hash per message saved.)
        let blocker = if failed_keys.is_empty() {
            None
        } else {
            failed_keys.get(&message.key).copied()
        };
        if let (Some(blocker), false) = (blocker, marked_sent) {
            settlement.returned.push(Returned {
                attempts: message.attempts,
                delay: Duration::ZERO,
                dead: false,
                error: format!(
                    "not sent: message {blocker} of the same key failed before it in its batch"
                ),
                message,
            });
            continue;
        }
        match reason {
            None => settlement.sent.push(message.id),
            Some(reason) => {
                if ordered {
                    failed_keys.insert(message.key.clone(), message.id);
                }
                let attempts = message.attempts.saturating_add(1);
                let dead = attempts > max_retries;
                settlement.returned.push(Returned {
                    attempts,
                    // A dead message is not retried: its time is the time it died.
                    delay: if dead {
                        Duration::ZERO
                    } else {
                        backoff.delay(attempts)
                    },
                    dead,
                    error: storable_text(&reason),
                    message,
                });
            }
        }
    }
    settlement
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_ERROR_TEXT;
    use crate::message::Message;

    fn message(id: i64, attempts: u32) -> Message {
        Message {
            outbox: "".into(),
            id,
            key: format!("k{id}"),
            value: vec![],
            headers: vec![],
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            attempts,
            status: Status::Unmarked,
        }
    }

    fn backoff() -> Backoff {
        Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60)).without_jitter()
    }

    #[test]
    fn ok_sends_unmarked_and_keeps_marked_failures() {
        let mut batch = Batch::new(vec![message(1, 0), message(2, 0), message(3, 0)]);
        batch.messages[1].mark_failed("broker said no");
        let s = decide(batch, None, 3, &backoff());
        assert_eq!(s.sent, [1, 3]);
        assert_eq!(s.returned.len(), 1);
        assert_eq!(s.returned[0].message.id, 2);
        assert_eq!(s.returned[0].error, "broker said no");
        assert_eq!(s.returned[0].attempts, 1);
        assert_eq!(s.returned[0].delay, Duration::from_secs(1));
        assert!(!s.returned[0].dead);
    }

    #[test]
    fn err_fails_unmarked_and_keeps_marked_sent() {
        let mut batch = Batch::new(vec![message(1, 0), message(2, 2)]);
        batch.messages[0].mark_sent();
        let s = decide(batch, Some("connection reset"), 3, &backoff());
        assert_eq!(s.sent, [1]);
        assert_eq!(s.returned[0].error, "connection reset");
        assert_eq!(s.returned[0].attempts, 3);
        assert_eq!(s.returned[0].delay, Duration::from_secs(4));
        assert!(!s.returned[0].dead);
    }

    #[test]
    fn dead_after_max_retries_plus_one_failures() {
        let batch = Batch::new(vec![message(1, 3), message(2, 2)]);
        let s = decide(batch, Some("nope"), 3, &backoff());
        let dead: Vec<(i64, bool)> = s.returned.iter().map(|r| (r.message.id, r.dead)).collect();
        assert_eq!(dead, [(1, true), (2, false)]);
        let zero = decide(Batch::new(vec![message(7, 0)]), Some("x"), 0, &backoff());
        assert!(zero.returned[0].dead);
    }

    #[test]
    fn ordered_batches_return_the_followers_of_a_failure_uncharged() {
        let keyed = |id, key: &str| Message {
            key: key.into(),
            ..message(id, 2)
        };
        let mut batch = Batch::new(vec![
            keyed(1, "a"),
            keyed(2, "b"),
            keyed(3, "a"),
            keyed(4, "a"),
            keyed(5, "b"),
        ]);
        batch.ordered = true;
        batch.messages[0].mark_failed("broker said no");
        batch.messages[1].mark_sent();
        batch.messages[3].mark_sent(); // published against the contract: recorded as sent
        let s = decide(batch, Some("connection reset"), 5, &backoff());
        assert_eq!(s.sent, [2, 4]);
        let back: Vec<(i64, u32, Duration)> = s
            .returned
            .iter()
            .map(|r| (r.message.id, r.attempts, r.delay))
            .collect();
        // 3 follows the failed 1 (key a): back uncharged, due at once. 5 (key b) failed on
        // its own: charged.
        assert_eq!(
            back,
            [
                (1, 3, Duration::from_secs(4)),
                (3, 2, Duration::ZERO),
                (5, 3, Duration::from_secs(4))
            ]
        );
        assert!(
            s.returned[1].error.contains("message 1"),
            "{}",
            s.returned[1].error
        );
        // Unordered: the same batch charges every failure.
        let mut batch = Batch::new(vec![keyed(1, "a"), keyed(3, "a")]);
        batch.messages[0].mark_failed("no");
        let s = decide(batch, Some("down"), 5, &backoff());
        assert!(s.returned.iter().all(|r| r.attempts == 3));
    }

    /// The pattern docs/ordering.md allows: after a failure of its key, leave the key's later
    /// messages unmarked and return `Ok`. They were not published: they must go back
    /// (uncharged), never be recorded as sent.
    #[test]
    fn ordered_unmarked_followers_under_ok_go_back_uncharged() {
        let keyed = |id, key: &str| Message {
            key: key.into(),
            ..message(id, 1)
        };
        let mut batch = Batch::new(vec![
            keyed(1, "a"),
            keyed(2, "a"),
            keyed(3, "b"),
            keyed(4, "a"),
        ]);
        batch.ordered = true;
        batch.messages[0].mark_failed("broker said no");
        batch.messages[2].mark_sent();
        // 2 and 4 (key a) left unmarked, and the Sender returns Ok.
        let s = decide(batch, None, 5, &backoff());
        assert_eq!(s.sent, [3]);
        let back: Vec<(i64, u32, Duration)> = s
            .returned
            .iter()
            .map(|r| (r.message.id, r.attempts, r.delay))
            .collect();
        assert_eq!(
            back,
            [
                (1, 2, Duration::from_secs(2)),
                (2, 1, Duration::ZERO),
                (4, 1, Duration::ZERO)
            ]
        );
        // A follower marked failed goes back uncharged too: only the head is charged.
        let mut batch = Batch::new(vec![keyed(1, "a"), keyed(2, "a")]);
        batch.ordered = true;
        batch.messages[0].mark_failed("no");
        batch.messages[1].mark_failed("no");
        let s = decide(batch, None, 5, &backoff());
        assert!(s.sent.is_empty());
        assert_eq!(s.returned[1].attempts, 1);
        // Unordered: unmarked messages under Ok are sent, whatever failed before them.
        let mut batch = Batch::new(vec![keyed(1, "a"), keyed(2, "a")]);
        batch.messages[0].mark_failed("no");
        let s = decide(batch, None, 5, &backoff());
        assert_eq!(s.sent, [2]);
    }

    #[test]
    fn error_text_is_bounded_and_storable() {
        let long = "é".repeat(MAX_ERROR_TEXT);
        let text = storable_text(&long);
        assert!(text.len() <= MAX_ERROR_TEXT && text.len() >= MAX_ERROR_TEXT - 1);
        assert_eq!(storable_text("a\0b"), "a\u{FFFD}b");
    }
}
