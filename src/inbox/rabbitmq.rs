//! The message id of a RabbitMQ delivery (feature `rabbitmq`): the `message-id` property
//! troutbox's [`RabbitSender`](crate::rabbitmq::RabbitSender) sets.

use lapin::message::Delivery;
use lapin::BasicProperties;

use crate::Error;

/// The message id of `delivery` (its `message-id` property), for
/// [`Inbox::receive`](crate::Inbox::receive). A delivery without one, or with an empty one,
/// is [`Error::MissingMessageId`]: never a silent pass.
pub fn message_id(delivery: &Delivery) -> Result<&str, Error> {
    message_id_of(&delivery.properties)
}

/// [`message_id`] from the properties of a message (a `basic.get` answer, a returned
/// message).
pub fn message_id_of(properties: &BasicProperties) -> Result<&str, Error> {
    properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .filter(|id| !id.is_empty())
        .ok_or(Error::MissingMessageId {
            from: "RabbitMQ delivery",
            field: "property message-id".to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use lapin::types::ShortString;

    use super::*;

    #[test]
    fn reads_the_property_and_refuses_none() {
        let mut delivery = Delivery::mock(1, "".into(), "q".into(), false, b"v".to_vec());
        assert!(matches!(
            message_id(&delivery),
            Err(Error::MissingMessageId { .. })
        ));
        delivery.properties = BasicProperties::default().with_message_id(ShortString::from(""));
        assert!(matches!(
            message_id(&delivery),
            Err(Error::MissingMessageId { .. })
        ));
        delivery.properties =
            BasicProperties::default().with_message_id(ShortString::from("abc:1"));
        assert_eq!(message_id(&delivery).unwrap(), "abc:1");
    }
}
