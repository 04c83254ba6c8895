//! The whole loop in one program: migrate, commit orders with their messages in business
//! transactions, roll one back, relay the committed messages to a Sender that prints them,
//! shut down.
//!
//! Run with `cargo run --example quickstart`. Uses `DATABASE_URL` when set, otherwise starts
//! a throw-away PostgreSQL server from the system's binaries.

use std::time::Duration;

use troutbox::{Batch, Outbox, PgStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = troutbox::testing::database_url()?;
    // A pool set up for an outbox: TCP keepalives and short timeouts (see troutbox::pool).
    let pool = troutbox::pool(url.parse()?, 10)?;

    // Storage: the outbox table lives next to the business tables.
    let store = PgStore::new(pool.clone()).schema("quickstart");
    store.migrate()?;
    let mut conn = pool.get()?;
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS quickstart.orders (id bigint PRIMARY KEY, item text NOT NULL);
         TRUNCATE quickstart.orders",
    )?;

    let outbox = Outbox::builder(store)
        .batch_size(100)
        .max_retries(5)
        .build()?;

    // Producer: each order and its message commit together, or not at all.
    let orders = [(1i64, "trout"), (2, "salmon"), (3, "char"), (4, "grayling")];
    let mut committed = 0;
    for (id, item) in orders {
        let mut tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO quickstart.orders (id, item) VALUES ($1, $2)",
            &[&id, &item],
        )?;
        let payload = format!("{{\"order\":{id},\"item\":\"{item}\"}}");
        outbox.add_message(&mut tx, &format!("order-{id}"), payload.as_bytes())?;
        if item == "char" {
            tx.rollback()?; // this order and its message never existed
            println!("rolled back order {id} ({item})");
        } else {
            tx.commit()?;
            committed += 1;
            println!("committed order {id} ({item})");
        }
    }

    // Relay: a worker thread hands batches to this Sender. It prints each message and
    // reports it on a channel so main knows when everything has arrived.
    let (delivered_tx, delivered_rx) = crossbeam_channel::unbounded();
    let mut handle = outbox.start(move |batch: &mut Batch| -> Result<(), std::io::Error> {
        for msg in batch.iter_mut() {
            println!(
                "relayed message {} key={} value={}",
                msg.id(),
                msg.key(),
                String::from_utf8_lossy(msg.value())
            );
            msg.mark_sent();
            let _ = delivered_tx.send(msg.id());
        }
        Ok(())
    })?;

    for _ in 0..committed {
        delivered_rx.recv_timeout(Duration::from_secs(30))?;
    }
    handle.shutdown()?;

    let backlog = outbox.store().backlog()?;
    println!(
        "done: {committed} committed messages relayed, {} pending, {} dead",
        backlog.pending, backlog.dead
    );
    Ok(())
}
