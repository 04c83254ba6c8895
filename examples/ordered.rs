//! Per-key ordering: two relays deliver the messages of each key in commit order, while a
//! failing message blocks its own key and the other keys flow.
//!
//! Three keys get ten messages each. The Sender fails the fourth message of `account-b`
//! twice: `account-b` waits (its later messages are not delivered meanwhile) while
//! `account-a` and `account-c` are delivered in full; then the message goes through and
//! `account-b` resumes, in order. The program checks the order it printed and exits with an
//! error if any key's first deliveries were out of order.
//!
//! Run with `cargo run --example ordered`. Uses `DATABASE_URL` when set, otherwise starts a
//! throw-away PostgreSQL server from the system's binaries.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r2d2_postgres::PostgresConnectionManager;
use troutbox::{Backoff, Batch, NewMessage, Outbox, PgStore};

const KEYS: [&str; 3] = ["account-a", "account-b", "account-c"];
const PER_KEY: usize = 10;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = troutbox::testing::database_url()?;
    let pool = r2d2::Pool::builder()
        .max_size(8)
        .build(PostgresConnectionManager::new(
            url.parse()?,
            postgres::NoTls,
        ))?;
    pool.get()?
        .batch_execute("DROP SCHEMA IF EXISTS ordered_example CASCADE")?;

    let store = PgStore::new(pool.clone()).schema("ordered_example");
    let outbox = Outbox::builder(store)
        .per_key_ordering(true)
        .batch_size(4)
        .backoff(
            Backoff::exponential(Duration::from_millis(300), Duration::from_secs(1))
                .without_jitter(),
        )
        .build()?;
    // Creates the table and records it as ordered: producers and relays built without
    // per_key_ordering(true) are refused from now on.
    outbox.migrate()?;

    // Producers: one transaction per round, one message per key, so each key's messages
    // are committed in order 0, 1, 2, ...
    let mut conn = pool.get()?;
    let mut ids: HashMap<String, Vec<i64>> = HashMap::new();
    for seq in 0..PER_KEY {
        let values: Vec<String> = KEYS.iter().map(|k| format!("{k} #{seq}")).collect();
        let mut tx = conn.transaction()?;
        outbox.add_messages(
            &mut tx,
            KEYS.iter()
                .zip(&values)
                .map(|(k, v)| NewMessage::new(k, v.as_bytes())),
        )?;
        tx.commit()?;
    }
    for row in conn.query(
        "SELECT key, id FROM ordered_example.outbox_messages ORDER BY id",
        &[],
    )? {
        ids.entry(row.get(0)).or_default().push(row.get(1));
    }
    let poison = ids["account-b"][3];

    // Two relays, as two processes would run them (each `start` is an independent relay).
    let log: Arc<Mutex<Vec<(String, i64, u32)>>> = Arc::default();
    let failures = Arc::new(Mutex::new(0u32));
    let sender = {
        let log = log.clone();
        move |relay: u32| {
            let log = log.clone();
            let failures = failures.clone();
            move |batch: &mut Batch| -> Result<(), String> {
                batch.send_each(|msg| {
                    if msg.id() == poison {
                        let mut failed = failures.lock().unwrap();
                        if *failed < 2 {
                            *failed += 1;
                            println!("relay {relay}: {} failed (broker said no)", msg.id());
                            return Err(format!(
                                "broker refused message {} (attempt {})",
                                msg.id(),
                                *failed
                            ));
                        }
                    }
                    let value = String::from_utf8_lossy(msg.value()).into_owned();
                    println!("relay {relay}: delivered {} {value}", msg.id());
                    log.lock()
                        .unwrap()
                        .push((msg.key().to_owned(), msg.id(), relay));
                    Ok(())
                });
                Ok(())
            }
        }
    };
    let mut first = outbox.start(sender(1))?;
    let mut second = outbox.start(sender(2))?;

    // Wait until every message is delivered (or give up after 60 s).
    let total = KEYS.len() * PER_KEY;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while log.lock().unwrap().len() < total && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // While account-b was blocked, how far had the others got?
    first.shutdown()?;
    second.shutdown()?;

    let log = log.lock().unwrap();
    let mut per_key: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (key, id, _) in log.iter() {
        per_key.entry(key).or_default().push(*id);
    }
    let b_before_unblock = log
        .iter()
        .position(|(_, id, _)| *id == poison)
        .map(|at| {
            log[..at]
                .iter()
                .filter(|(k, _, _)| k != "account-b")
                .count()
        })
        .unwrap_or(0);
    println!(
        "before message {poison} of account-b went through, {b_before_unblock} messages of the other keys were delivered"
    );
    let mut ok = log.len() == total;
    for (key, delivered) in &per_key {
        let in_order = delivered.windows(2).all(|w| w[0] < w[1]);
        println!(
            "{key}: {} delivered, in commit order: {in_order}",
            delivered.len()
        );
        ok &= in_order;
    }
    let by_relay = |r| log.iter().filter(|(_, _, relay)| *relay == r).count();
    println!(
        "relay 1 delivered {}, relay 2 delivered {}",
        by_relay(1),
        by_relay(2)
    );
    if !ok {
        return Err(format!("order broken or messages missing: {per_key:?}").into());
    }
    println!("done: {total} messages, every key in order");
    Ok(())
}
