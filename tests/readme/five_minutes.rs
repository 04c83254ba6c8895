// The README's program "The API in five minutes": the lines between `README begin` and
// `README end` are its code block, word for word (tests/readme.rs checks that, and runs it).
// README begin
use troutbox::{Batch, Outbox, PgStore};

fn publish(key: &str, value: &[u8]) -> Result<(), std::io::Error> {
    println!("publishing {key}: {} bytes", value.len()); // your broker client here
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Your database, for example DATABASE_URL="host=localhost user=app dbname=app".
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    // A pool set up for an outbox: keepalives, short timeouts (see troutbox::pool).
    let pool = troutbox::pool(url.parse()?, 10)?;

    // Storage. Optional: .schema("app").table("outbox_messages").
    let store = PgStore::new(pool.clone());
    store.migrate()?; // idempotent, safe from many instances at once

    let outbox = Outbox::builder(store)
        .batch_size(100) // every option has a default, see below
        .max_retries(5)
        .build()?; // invalid options are an Err, never a panic

    // Producer: inside your own transaction.
    let mut client = pool.get()?;
    let mut tx = client.transaction()?;
    tx.execute("CREATE TABLE IF NOT EXISTS orders (id bigint)", &[])?;
    tx.execute("INSERT INTO orders (id) VALUES (42)", &[])?;
    // On a pooled connection instead of a transaction, write `&mut *conn` (E0277 otherwise).
    outbox.add_message(&mut tx, "order-42", b"{\"id\":42}")?; // key: &str, value: &[u8]
    tx.commit()?; // rollback => the message never existed

    // Relay: worker threads calling a synchronous Sender.
    let mut handle = outbox.start(|batch: &mut Batch| -> Result<(), std::io::Error> {
        for msg in batch.iter_mut() {
            match publish(msg.key(), msg.value()) {
                Ok(()) => msg.mark_sent(),
                Err(e) => msg.mark_failed(e), // only this one is retried; the rest go on
            }
        }
        Ok(()) // Ok => the messages not marked failed are sent
    })?;

    // ... the service runs, the relay delivers in the background. This program waits for
    // its message to be delivered (it prints "publishing order-42: 9 bytes"), then stops.
    while outbox.store().backlog()?.pending > 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    handle.shutdown()?; // finish the batch in flight, join the threads
    Ok(())
}
// README end
