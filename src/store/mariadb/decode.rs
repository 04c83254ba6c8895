//! MariaDB rows to messages, fallibly: a row is outside input (anyone with INSERT rights
//! writes it), and one the relay cannot use is set aside as dead, naming the column.

use std::sync::Arc;

use mysql::{Row, Value};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use crate::message::{DeadMessage, Message, Status};
use crate::store::protocol::{ClaimedRow, Undecodable};

fn why(column: &'static str, reason: impl Into<String>) -> Undecodable {
    Undecodable {
        column,
        reason: reason.into(),
    }
}

fn value(row: &Row, i: usize) -> Option<&Value> {
    row.as_ref(i)
}

/// An integer column.
pub(crate) fn int(row: &Row, i: usize, column: &'static str) -> Result<i64, Undecodable> {
    match value(row, i) {
        Some(Value::Int(n)) => Ok(*n),
        Some(Value::UInt(n)) => i64::try_from(*n).map_err(|_| why(column, "out of range")),
        Some(Value::Bytes(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| why(column, "not an integer")),
        Some(Value::NULL) | None => Err(why(column, "NULL")),
        Some(other) => Err(why(column, format!("unexpected value {other:?}"))),
    }
}

/// A byte column, `None` for NULL.
pub(crate) fn bytes_opt<'r>(
    row: &'r Row,
    i: usize,
    column: &'static str,
) -> Result<Option<&'r [u8]>, Undecodable> {
    match value(row, i) {
        Some(Value::Bytes(b)) => Ok(Some(b)),
        Some(Value::NULL) => Ok(None),
        other => Err(why(column, format!("unexpected value {other:?}"))),
    }
}

fn bytes<'r>(row: &'r Row, i: usize, column: &'static str) -> Result<&'r [u8], Undecodable> {
    bytes_opt(row, i, column)?.ok_or_else(|| why(column, "NULL"))
}

fn text(row: &Row, i: usize, column: &'static str) -> Result<String, Undecodable> {
    String::from_utf8(bytes(row, i, column)?.to_vec()).map_err(|e| why(column, e.to_string()))
}

/// A `DATETIME(6)` column (UTC): a date value from the binary protocol, text from the text
/// protocol.
pub(crate) fn datetime(
    row: &Row,
    i: usize,
    column: &'static str,
) -> Result<OffsetDateTime, Undecodable> {
    let parts = match value(row, i) {
        Some(Value::Date(y, mo, d, h, mi, s, us)) => (*y, *mo, *d, *h, *mi, *s, *us),
        Some(Value::Bytes(b)) => parse_datetime(b).ok_or_else(|| why(column, "not a date"))?,
        Some(Value::NULL) | None => return Err(why(column, "NULL")),
        Some(other) => return Err(why(column, format!("unexpected value {other:?}"))),
    };
    let (y, mo, d, h, mi, s, us) = parts;
    let date = Month::try_from(mo)
        .ok()
        .and_then(|m| Date::from_calendar_date(i32::from(y), m, d).ok())
        .ok_or_else(|| why(column, format!("invalid date {y:04}-{mo:02}-{d:02}")))?;
    let time = Time::from_hms_micro(h, mi, s, us)
        .map_err(|_| why(column, format!("invalid time {h:02}:{mi:02}:{s:02}")))?;
    Ok(PrimitiveDateTime::new(date, time).assume_utc())
}

/// A time as a `DATETIME(6)` parameter, in UTC (years past 9999 are clamped: MariaDB's
/// range).
pub(crate) fn to_value(at: OffsetDateTime) -> Value {
    let at = at.to_offset(time::UtcOffset::UTC);
    Value::Date(
        u16::try_from(at.year().clamp(0, 9999)).unwrap_or(0),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond(),
    )
}

/// `YYYY-MM-DD hh:mm:ss[.ffffff]`.
fn parse_datetime(b: &[u8]) -> Option<(u16, u8, u8, u8, u8, u8, u32)> {
    let s = std::str::from_utf8(b).ok()?;
    let (date, time) = s.split_once(' ')?;
    let mut d = date.split('-');
    let (y, mo, day) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':');
    let (h, mi, sec) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    let digits = frac.len().min(6);
    let us: u32 = frac.get(..digits)?.parse().ok()?;
    let us = us * 10u32.pow(u32::try_from(6 - digits).ok()?);
    Some((y, mo, day, h, mi, sec, us))
}

/// The headers column: `name NUL value NUL` pairs.
pub(crate) fn headers(raw: &[u8]) -> Result<Vec<(String, String)>, Undecodable> {
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    // A well-formed column ends with NUL: an even number of parts plus the empty tail.
    if parts.len() % 2 != 1 || !parts.last().is_some_and(|p| p.is_empty()) {
        return Err(why("headers", "not name/value pairs"));
    }
    parts[..parts.len() - 1]
        .chunks(2)
        .map(|pair| {
            let name = String::from_utf8(pair[0].to_vec());
            let value = String::from_utf8(pair[1].to_vec());
            match (name, value) {
                (Ok(n), Ok(v)) if !n.is_empty() => Ok((n, v)),
                _ => Err(why(
                    "headers",
                    "a name or value is not UTF-8, or a name is empty",
                )),
            }
        })
        .collect()
}

/// Headers as the column stores them (see [`headers`]).
pub(crate) fn encode_headers<'h>(pairs: impl IntoIterator<Item = (&'h str, &'h str)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// The message of a row whose first columns are `id, key, value, headers, created_at,
/// attempts`.
pub(crate) fn message(row: &Row, outbox: &Arc<str>) -> Result<Message, Undecodable> {
    let attempts = int(row, 5, "attempts")?;
    Ok(Message {
        id: int(row, 0, "id")?,
        outbox: outbox.clone(),
        key: text(row, 1, "key")?,
        value: bytes(row, 2, "value")?.to_vec(),
        headers: headers(bytes(row, 3, "headers")?)?,
        created_at: datetime(row, 4, "created_at")?,
        attempts: u32::try_from(attempts).map_err(|_| why("attempts", "negative"))?,
        status: Status::Unmarked,
    })
}

/// A claimed row (see `sql::claim`'s columns): the message, its position, its charges.
pub(crate) fn claimed(row: &Row, outbox: &Arc<str>) -> ClaimedRow {
    let charges = match bytes_opt(row, 7, "charges") {
        Ok(None) => Ok(Vec::new()),
        Ok(Some(list)) => std::str::from_utf8(list)
            .ok()
            .and_then(|s| s.split(',').map(|c| c.parse::<i32>().ok()).collect())
            .ok_or_else(|| why("charges", "not a list of claim ids")),
        Err(e) => Err(e),
    };
    let id = int(row, 0, "id").ok();
    ClaimedRow {
        id,
        position: datetime(row, 6, "available_at").ok().zip(id),
        decoded: message(row, outbox).and_then(|m| Ok((m, charges?))),
    }
}

/// A dead message (see `sql::dead_letters::DEAD_COLUMNS`). A row that cannot be decoded
/// still lists, with what could not be read replaced and the reason in its error.
pub(crate) fn dead(row: &Row, outbox: &Arc<str>) -> DeadMessage {
    let last_error = bytes_opt(row, 6, "last_error")
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(b).into_owned());
    let died_at = datetime(row, 7, "available_at").unwrap_or(OffsetDateTime::UNIX_EPOCH);
    match message(row, outbox) {
        Ok(message) => DeadMessage {
            message,
            last_error,
            died_at,
        },
        Err(e) => DeadMessage {
            message: Message {
                id: int(row, 0, "id").unwrap_or(0),
                outbox: outbox.clone(),
                key: bytes(row, 1, "key")
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
                value: bytes(row, 2, "value")
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default(),
                headers: Vec::new(),
                created_at: datetime(row, 4, "created_at").unwrap_or(OffsetDateTime::UNIX_EPOCH),
                attempts: int(row, 5, "attempts")
                    .ok()
                    .and_then(|a| u32::try_from(a).ok())
                    .unwrap_or(0),
                status: Status::Unmarked,
            },
            last_error: Some(format!(
                "{}{e}",
                last_error.map(|l| l + "; ").unwrap_or_default()
            )),
            died_at,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_columns_are_refused() {
        let raw = encode_headers([("a", "1"), ("traceparent", "")]);
        assert_eq!(
            headers(&raw).unwrap(),
            vec![
                ("a".into(), "1".into()),
                ("traceparent".into(), String::new())
            ]
        );
        assert_eq!(headers(b"").unwrap(), vec![]);
        assert!(headers(b"a\0").is_err());
        assert!(headers(b"a\x001").is_err());
        assert!(headers(b"\0v\0").is_err());
        assert!(headers(b"\xff\0v\0").is_err());
    }

    #[test]
    fn text_datetimes_parse_to_utc() {
        assert_eq!(
            parse_datetime(b"2026-12-08 01:02:03.5"),
            Some((2026, 12, 8, 1, 2, 3, 500_000))
        );
        assert_eq!(
            parse_datetime(b"2026-12-08 01:02:03"),
            Some((2026, 12, 8, 1, 2, 3, 0))
        );
        assert_eq!(parse_datetime(b"0000-00-00"), None);
    }
}
