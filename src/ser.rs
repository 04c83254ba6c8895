//! The `serde` feature: what the `Serialize` impls of the report types share.
//!
//! The representations, chosen for JSON and for people reading it:
//! - times (`OffsetDateTime`) as RFC 3339 text, `"2025-01-31T12:00:00.123456Z"`;
//! - durations as seconds, a float, under a name ending in `_seconds` (`blocked_for_seconds`);
//! - a message's value as text when it is UTF-8, else as hex (see [`Message`]'s docs);
//! - headers as `[name, value]` pairs, in order (names may repeat).

use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::message::Message;

/// A duration as seconds, a float: 1.5 for 1,500 ms.
pub(crate) fn seconds<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// [`MaintenanceReport::kept`](crate::MaintenanceReport::kept) as
/// `[{"partition": name, "unsent": count}]`.
pub(crate) fn kept<S: Serializer>(
    kept: &[(String, i64)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Kept<'a> {
        partition: &'a str,
        unsent: i64,
    }
    serializer.collect_seq(kept.iter().map(|(partition, unsent)| Kept {
        partition,
        unsent: *unsent,
    }))
}

/// Lower-case hex, two digits a byte.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// What a [`Message`] serializes as: its data, the value as text or hex, not the Sender's
/// mark.
#[derive(Serialize)]
struct MessageView<'a> {
    id: i64,
    dedup_key: String,
    outbox_id: &'a str,
    key: &'a str,
    attempts: u32,
    #[serde(serialize_with = "time::serde::rfc3339::serialize")]
    created_at: time::OffsetDateTime,
    headers: &'a [(String, String)],
    value_bytes: usize,
    value_utf8: Option<&'a str>,
    value_hex: Option<String>,
}

#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl Serialize for Message {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = std::str::from_utf8(&self.value).ok();
        MessageView {
            id: self.id,
            dedup_key: self.dedup_key(),
            outbox_id: &self.outbox,
            key: &self.key,
            attempts: self.attempts,
            created_at: self.created_at,
            headers: &self.headers,
            value_bytes: self.value.len(),
            value_utf8: text,
            value_hex: match text {
                Some(_) => None,
                None => Some(hex(&self.value)),
            },
        }
        .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    //! One test per serialized type: the whole JSON object, so that a field renamed, added,
    //! dropped or represented otherwise fails here first.

    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;
    use time::{Date, Month, OffsetDateTime};

    use crate::message::{DeadMessage, Message, Status};
    use crate::{Backlog, BlockedKey, Health, MaintenanceReport, Stats, Timing};

    /// 2025-01-31 (UTC) at `h:m:s.micros`.
    fn jan31(h: u8, m: u8, s: u8, micros: u32) -> OffsetDateTime {
        Date::from_calendar_date(2025, Month::January, 31)
            .and_then(|d| d.with_hms_micro(h, m, s, micros))
            .unwrap()
            .assume_utc()
    }

    fn message(value: &[u8]) -> Message {
        Message {
            id: 42,
            outbox: Arc::from("6f1c0f2e-4b7a-4c39-9e56-0d4f3a1b2c3d"),
            key: "order-42".into(),
            value: value.to_vec(),
            headers: vec![("trace".into(), "t1".into()), ("trace".into(), "t2".into())],
            created_at: jan31(12, 0, 0, 123_456),
            attempts: 3,
            status: Status::Failed("not part of the JSON".into()),
        }
    }

    #[test]
    fn message_value_as_text_when_utf8() {
        assert_eq!(
            serde_json::to_value(message(b"{\"id\":42}")).unwrap(),
            json!({
                "id": 42,
                "dedup_key": "6f1c0f2e-4b7a-4c39-9e56-0d4f3a1b2c3d:42",
                "outbox_id": "6f1c0f2e-4b7a-4c39-9e56-0d4f3a1b2c3d",
                "key": "order-42",
                "attempts": 3,
                "created_at": "2025-01-31T12:00:00.123456Z",
                "headers": [["trace", "t1"], ["trace", "t2"]],
                "value_bytes": 9,
                "value_utf8": "{\"id\":42}",
                "value_hex": null,
            })
        );
    }

    #[test]
    fn message_value_as_hex_otherwise() {
        let v = serde_json::to_value(message(&[0xff, 0x00, 0x41, 0x0a])).unwrap();
        assert_eq!(
            (&v["value_bytes"], &v["value_utf8"], &v["value_hex"]),
            (&json!(4), &json!(null), &json!("ff00410a"))
        );
    }

    #[test]
    fn dead_message_is_the_message_flattened_with_its_death() {
        let dead = DeadMessage {
            message: message(b"x"),
            last_error: Some("exchange not found".into()),
            died_at: jan31(23, 30, 0, 0),
        };
        assert_eq!(
            serde_json::to_value(&dead).unwrap(),
            json!({
                "id": 42,
                "dedup_key": "6f1c0f2e-4b7a-4c39-9e56-0d4f3a1b2c3d:42",
                "outbox_id": "6f1c0f2e-4b7a-4c39-9e56-0d4f3a1b2c3d",
                "key": "order-42",
                "attempts": 3,
                "created_at": "2025-01-31T12:00:00.123456Z",
                "headers": [["trace", "t1"], ["trace", "t2"]],
                "value_bytes": 1,
                "value_utf8": "x",
                "value_hex": null,
                "last_error": "exchange not found",
                "died_at": "2025-01-31T23:30:00Z",
            })
        );
    }

    #[test]
    fn backlog() {
        let mut backlog = Backlog {
            pending: 5,
            dead: 2,
            sent: 7,
            oldest_pending: Some(jan31(12, 0, 0, 0)),
        };
        assert_eq!(
            serde_json::to_value(&backlog).unwrap(),
            json!({"pending": 5, "dead": 2, "sent": 7, "oldest_pending": "2025-01-31T12:00:00Z"})
        );
        backlog.oldest_pending = None;
        assert_eq!(
            serde_json::to_value(&backlog).unwrap()["oldest_pending"],
            json!(null)
        );
    }

    #[test]
    fn stats_with_timings_in_seconds() {
        let stats = Stats {
            sent: 10,
            failed: 3,
            retried: 2,
            dead: 1,
            batches: 4,
            errors: 5,
            batch_duration: Timing {
                count: 4,
                total: Duration::from_millis(1500),
                max: Duration::from_millis(750),
            },
            send_latency: Timing::default(),
        };
        assert_eq!(
            serde_json::to_value(stats).unwrap(),
            json!({
                "sent": 10, "failed": 3, "retried": 2, "dead": 1, "batches": 4, "errors": 5,
                "batch_duration": {"count": 4, "total_seconds": 1.5, "max_seconds": 0.75},
                "send_latency": {"count": 0, "total_seconds": 0.0, "max_seconds": 0.0},
            })
        );
    }

    #[test]
    fn health() {
        let health = Health {
            workers: 4,
            ended: 0,
            failing: 1,
            consecutive_failures: 3,
            replaced: 2,
        };
        assert_eq!(
            serde_json::to_value(health).unwrap(),
            json!({"workers": 4, "ended": 0, "failing": 1, "consecutive_failures": 3, "replaced": 2})
        );
    }

    #[test]
    fn blocked_key() {
        let blocked = BlockedKey {
            key: "acct-1".into(),
            head_id: 17,
            attempts: 2,
            last_error: None,
            next_attempt_at: jan31(12, 0, 5, 0),
            blocked_for: Duration::from_millis(90_250),
            waiting: 3,
        };
        assert_eq!(
            serde_json::to_value(&blocked).unwrap(),
            json!({
                "key": "acct-1",
                "head_id": 17,
                "attempts": 2,
                "last_error": null,
                "next_attempt_at": "2025-01-31T12:00:05Z",
                "blocked_for_seconds": 90.25,
                "waiting": 3,
            })
        );
    }

    #[test]
    fn maintenance_report_with_kept_partitions_as_objects() {
        let report = MaintenanceReport {
            locked_out: false,
            created: vec!["outbox_p1".into()],
            dropped: vec!["outbox_p0".into()],
            kept: vec![("outbox_pm1".into(), 4)],
            deferred: vec![],
        };
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            json!({
                "locked_out": false,
                "created": ["outbox_p1"],
                "dropped": ["outbox_p0"],
                "kept": [{"partition": "outbox_pm1", "unsent": 4}],
                "deferred": [],
            })
        );
    }
}
