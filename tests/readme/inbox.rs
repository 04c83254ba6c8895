// The README's "inbox" block: the lines between `README begin` and `README end`, without
// their indentation, are its code block, word for word (tests/readme.rs checks that, and runs
// this program). The rest sets up what the block uses and delivers the message again.
use troutbox::{Inbox, Received};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let pool = troutbox::pool(url.parse()?, 10)?;
    pool.get()?.batch_execute(
        "CREATE TABLE accounts (id int8 PRIMARY KEY, paid int8 NOT NULL);
         INSERT INTO accounts VALUES (42, 0)",
    )?;

    // README begin
    let inbox = Inbox::builder(pool.clone()).build()?; // public.inbox_messages, 7-day window
    inbox.migrate()?;
    let _maintenance = inbox.start_maintenance(std::time::Duration::from_secs(600))?;

    // Per message, its id: the `message-id` header (Kafka) or property (RabbitMQ) that
    // troutbox's Senders set, read with troutbox::inbox::kafka::message_id(&record)? or
    // troutbox::inbox::rabbitmq::message_id(&delivery)?.
    let message_id = "2c1f0e8a-5b7d-4e3f-9a1c-6d2e4f8b0a17:42";
    let mut conn = pool.get()?;
    let mut tx = conn.transaction()?;
    if inbox.receive(&mut tx, "billing", message_id)? == Received::First {
        tx.execute("UPDATE accounts SET paid = paid + 1 WHERE id = 42", &[])?;
    }
    tx.commit()?;
    // now, and only now: commit the Kafka offset, or basic.ack the delivery
    // README end

    // The broker delivers it again (the consumer died before its acknowledgement).
    let mut tx = conn.transaction()?;
    if inbox.receive(&mut tx, "billing", message_id)? == Received::First {
        tx.execute("UPDATE accounts SET paid = paid + 1 WHERE id = 42", &[])?;
        return Err("the second delivery was taken for a first one".into());
    }
    tx.commit()?;
    Ok(())
}
