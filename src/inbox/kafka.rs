//! The message id of a Kafka record (feature `kafka`): the header troutbox's
//! [`KafkaSender`](crate::kafka::KafkaSender) writes, `message-id` by default.

use rdkafka::message::{Headers, Message};

use crate::kafka::DEFAULT_ID_HEADER;
use crate::Error;

/// The message id in `record`'s `message-id` header ([`DEFAULT_ID_HEADER`]), for
/// [`Inbox::receive`](crate::Inbox::receive). Works on a consumer's `BorrowedMessage` and on
/// an `OwnedMessage`.
///
/// A record without the header, or with an empty one, is [`Error::MissingMessageId`]; one
/// whose id is not UTF-8 is [`Error::InvalidMessageId`]. Never a silent pass: such a record
/// cannot be deduplicated.
pub fn message_id<M: Message>(record: &M) -> Result<&str, Error> {
    message_id_from(record, DEFAULT_ID_HEADER)
}

/// [`message_id`] from the header `header`, for a Sender built with
/// [`id_header`](crate::kafka::KafkaSenderBuilder::id_header). When the header appears more
/// than once, the last one counts (as Kafka clients usually read headers).
pub fn message_id_from<'a, M: Message>(record: &'a M, header: &str) -> Result<&'a str, Error> {
    let missing = || Error::MissingMessageId {
        from: "Kafka record",
        field: format!("header {header:?}"),
    };
    let headers = record.headers().ok_or_else(missing)?;
    let value = headers
        .iter()
        .filter(|h| h.key == header)
        .last()
        .and_then(|h| h.value)
        .filter(|v| !v.is_empty())
        .ok_or_else(missing)?;
    std::str::from_utf8(value).map_err(|e| Error::InvalidMessageId {
        what: "message id",
        reason: format!("the Kafka header {header:?} is not UTF-8 ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;

    fn record(headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            headers,
        )
    }

    fn with(pairs: &[(&str, Option<&[u8]>)]) -> OwnedMessage {
        let mut headers = OwnedHeaders::new();
        for (key, value) in pairs {
            headers = headers.insert(Header { key, value: *value });
        }
        record(Some(headers))
    }

    #[test]
    fn reads_the_header() {
        let r = with(&[("other", Some(b"x")), ("message-id", Some(b"abc:1"))]);
        assert_eq!(message_id(&r).unwrap(), "abc:1");
        let r = with(&[("id", Some(b"abc:2"))]);
        assert_eq!(message_id_from(&r, "id").unwrap(), "abc:2");
    }

    #[test]
    fn a_missing_or_empty_id_is_an_error() {
        for r in [
            record(None),
            with(&[]),
            with(&[("other", Some(b"abc:1"))]),
            with(&[("message-id", None)]),
            with(&[("message-id", Some(b""))]),
        ] {
            assert!(
                matches!(message_id(&r), Err(Error::MissingMessageId { .. })),
                "{r:?}"
            );
        }
        let r = with(&[("message-id", Some(&[0xff, 0xfe]))]);
        assert!(matches!(
            message_id(&r),
            Err(Error::InvalidMessageId { .. })
        ));
    }
}
