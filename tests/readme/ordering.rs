// The README's "Ordering" block: the lines between `README begin` and `README end`, without
// their indentation, are its code block, word for word (tests/readme.rs checks that, and runs
// this program). The rest sets up what the block uses and checks what it did.
use std::sync::Mutex;

/// Every call of `publish`: key, value, whether the broker took it.
pub static LOG: Mutex<Vec<(String, String, bool)>> = Mutex::new(Vec::new());

/// The broker: refuses the first message of `k1` once.
fn publish(key: &str, value: &[u8]) -> Result<(), std::io::Error> {
    let mut log = LOG.lock().unwrap();
    let ok = !(key == "k1" && value == b"1" && !log.iter().any(|e| e.0 == "k1"));
    log.push((key.to_string(), String::from_utf8_lossy(value).into_owned(), ok));
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other("broker said no"))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let pool = troutbox::pool(url.parse()?, 10)?;

    // README begin
    use troutbox::{Batch, Outbox, PgStore};

    let outbox = Outbox::builder(PgStore::new(pool.clone()))
        .per_key_ordering(true)
        .build()?;
    outbox.migrate()?; // makes the table ordered (once; every producer and relay must agree)

    let mut handle = outbox.start(|batch: &mut Batch| -> Result<(), std::io::Error> {
        // Publishes in id order; after a message of a key fails, skips that key's later ones.
        batch.send_each(|msg| publish(msg.key(), msg.value()));
        Ok(())
    })?;
    // README end

    // Three messages in one transaction: k1's first is refused once, so k1's second must
    // wait for its retry; k2 goes on.
    let mut conn = pool.get()?;
    let mut tx = conn.transaction()?;
    for (key, value) in [("k1", b"1"), ("k1", b"2"), ("k2", b"3")] {
        outbox.add_message(&mut tx, key, value)?;
    }
    tx.commit()?;
    let mut backlog = outbox.store().backlog()?;
    while backlog.pending > 0 || backlog.dead > 0 {
        if backlog.dead > 0 {
            return Err(format!("a message went dead: {backlog:?}").into());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        backlog = outbox.store().backlog()?;
    }
    handle.shutdown()?;
    Ok(())
}
