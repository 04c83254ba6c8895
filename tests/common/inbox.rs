//! Helpers of the inbox tests (`tests/inbox.rs`, `tests/inbox_diesel.rs`): an inbox in a
//! fresh schema, a clock a test moves by hand, one delivery per transaction. Included with
//! `#[path]`, next to `mod common`.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use troutbox::time::OffsetDateTime;
use troutbox::{Inbox, PgPool, Received};

pub const MINUTE: i64 = 60;

/// An inbox in a fresh schema, migrated.
pub fn inbox(schema: &str, pool: &PgPool, window: Option<i64>) -> Inbox {
    fresh_schema(schema, pool);
    let inbox = built(schema, pool, window, None);
    inbox.migrate().unwrap();
    inbox
}

pub fn fresh_schema(schema: &str, pool: &PgPool) {
    pool.get()
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .unwrap();
}

/// A clock a test moves by hand, shared by the inboxes built on it.
#[derive(Clone)]
pub struct TestClock(Arc<Mutex<OffsetDateTime>>);

impl TestClock {
    pub fn at(unix: i64) -> TestClock {
        TestClock(Arc::new(Mutex::new(time(unix))))
    }
    pub fn set(&self, unix: i64) {
        *self.0.lock().unwrap() = time(unix);
    }
    pub fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

pub fn time(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap()
}

pub fn built(schema: &str, pool: &PgPool, window: Option<i64>, clock: Option<&TestClock>) -> Inbox {
    let mut builder = Inbox::builder(pool.clone()).schema(schema);
    builder = match window {
        Some(secs) => builder.window(Duration::from_secs(secs as u64)),
        None => builder.keep_forever(),
    };
    if let Some(clock) = clock {
        let clock = clock.clone();
        builder = builder.clock(move || clock.now());
    }
    builder.build().unwrap()
}

/// One delivery in its own transaction, committed.
pub fn deliver(inbox: &Inbox, pool: &PgPool, consumer: &str, id: &str) -> Received {
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    let received = inbox.receive(&mut tx, consumer, id).unwrap();
    tx.commit().unwrap();
    received
}
