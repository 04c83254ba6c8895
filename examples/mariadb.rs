//! The outbox on MariaDB: migrate, commit orders with their messages in business
//! transactions, roll one back, relay the committed messages, shut down.
//!
//! Run with `cargo run --example mariadb --features mariadb`. Uses `MARIADB_URL` when set
//! (`mysql://user:password@host:port/database`), otherwise starts a throw-away MariaDB
//! server from the system's binaries (Debian/Ubuntu: `apt-get install mariadb-server`).

use std::time::Duration;

use troutbox::mariadb::mysql::prelude::Queryable;
use troutbox::mariadb::mysql::TxOpts;
use troutbox::mariadb::{pool, MariaDbOutbox, MariaDbStore};
use troutbox::Batch;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = troutbox::testing::mariadb_url()?;
    let pool = pool(&url, 10)?;

    // Storage: the outbox's tables live in the same database as the business tables.
    let store = MariaDbStore::new(pool.clone()).table("example_outbox");
    let outbox = MariaDbOutbox::builder(store)
        .batch_size(100)
        .max_retries(5)
        .build()?;
    outbox.migrate()?;
    let mut conn = pool.get()?;
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS example_orders (id BIGINT PRIMARY KEY, item TEXT NOT NULL)",
    )?;
    conn.query_drop("DELETE FROM example_orders")?;

    // Producer: each order and its message commit together, or not at all.
    let orders = [(1i64, "trout"), (2, "salmon"), (3, "char"), (4, "grayling")];
    let mut committed = 0;
    for (id, item) in orders {
        let mut tx = conn.start_transaction(TxOpts::default())?;
        tx.exec_drop(
            "INSERT INTO example_orders (id, item) VALUES (?, ?)",
            (id, item),
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

    // Relay: the same Sender as on PostgreSQL.
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
