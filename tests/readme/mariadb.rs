// The README's program "MariaDB": the lines between `README begin` and `README end` are its
// code block, word for word (tests/readme.rs checks that, and runs it with the `mariadb`
// feature).
// README begin
use troutbox::mariadb::mysql::{prelude::Queryable, TxOpts};
use troutbox::mariadb::{pool, MariaDbOutbox, MariaDbStore};
use troutbox::Batch;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // For example MARIADB_URL="mysql://app:secret@localhost:3306/app": name the database.
    let url = std::env::var("MARIADB_URL").map_err(|_| "set MARIADB_URL")?;
    let pool = pool(&url, 10)?; // an r2d2 pool of `mysql` connections

    let store = MariaDbStore::new(pool.clone()); // Optional: .table("outbox_messages").
    let outbox = MariaDbOutbox::builder(store).max_retries(5).build()?;
    outbox.migrate()?; // idempotent, safe from many instances at once

    // Producer: inside your own `mysql` transaction.
    let mut conn = pool.get()?;
    conn.query_drop("CREATE TABLE IF NOT EXISTS orders (id BIGINT)")?;
    let mut tx = conn.start_transaction(TxOpts::default())?;
    tx.exec_drop("INSERT INTO orders (id) VALUES (?)", (42,))?;
    outbox.add_message(&mut tx, "order-42", b"{\"id\":42}")?;
    tx.commit()?; // rollback => the message never existed

    // Relay: the same Sender as on PostgreSQL.
    let mut handle = outbox.start(|batch: &mut Batch| -> Result<(), std::io::Error> {
        for msg in batch.iter_mut() {
            println!("publishing {}", msg.key()); // your broker client here
            msg.mark_sent();
        }
        Ok(())
    })?;
    while outbox.store().backlog()?.pending > 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    handle.shutdown()?;
    Ok(())
}
// README end
