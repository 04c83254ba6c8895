//! What a real librdkafka consumer read back from a topic of the tests' tansu broker: one
//! [`Record`] per record, every partition from the beginning.
//!
//! Included with `#[path]` by `tests/kafka.rs` and `tests/relay_service_kafka.rs`.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// One record as the consumer read it.
#[derive(Clone, Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: Vec<u8>,
    pub timestamp: Option<i64>,
    /// Every header, in order.
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn id(&self) -> &str {
        self.header("message-id").unwrap_or("")
    }
}

/// Everything a consumer read from one topic, in arrival order.
#[derive(Default)]
pub struct Received {
    pub records: Mutex<Vec<Record>>,
    pub changed: Condvar,
    /// Errors the consumer saw (the gate closed, the broker frozen), counted, not fatal.
    pub errors: AtomicUsize,
}

impl Received {
    pub fn distinct(&self) -> usize {
        let records = self.records.lock().unwrap();
        let ids: std::collections::HashSet<&str> = records.iter().map(Record::id).collect();
        ids.len()
    }

    /// Waits until `n` distinct message-ids arrived; false on timeout.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut records = self.records.lock().unwrap();
        loop {
            let ids: std::collections::HashSet<&str> = records.iter().map(Record::id).collect();
            if ids.len() >= n {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            records = self.changed.wait_timeout(records, left).unwrap().0;
        }
    }

    pub fn snapshot(&self) -> Vec<Record> {
        self.records.lock().unwrap().clone()
    }
}

/// A real consumer on its own thread reading every partition of `topic` from the beginning,
/// until `stop`.
pub fn consume(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> (Arc<Received>, Arc<AtomicBool>, JoinHandle<()>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "troutbox-test")
        .set("enable.auto.commit", "false")
        .set("reconnect.backoff.max.ms", "200")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let received = Arc::new(Received::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (r, s) = (received.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            let Some(result) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = match result {
                Ok(m) => m,
                Err(_) => {
                    r.errors.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
            };
            let text =
                |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), text(h.value)))
                        .collect()
                })
                .unwrap_or_default();
            let record = Record {
                partition: message.partition(),
                offset: message.offset(),
                key: text(message.key()),
                value: message.payload().unwrap_or_default().to_vec(),
                timestamp: message.timestamp().to_millis(),
                headers,
            };
            r.records.lock().unwrap().push(record);
            r.changed.notify_all();
        }
    });
    (received, stop, thread)
}

/// Everything in `topic`, read from the beginning by a fresh consumer: until at least
/// `expected` distinct message-ids arrived and nothing new came for 2 s. (tansu's high
/// watermarks cannot serve as the end: after producers are fenced they were seen to fall
/// short of the records a consumer reads.)
pub fn read_all(bootstrap: &str, topic: &str, partitions: i32, expected: usize) -> Vec<Record> {
    let (received, stop, consumer) = consume(bootstrap, topic, partitions);
    // A record handed over twice by the consumer (a fetch that overlaps an earlier one) is
    // the same record: keep one per partition and offset.
    let distinct = || {
        let mut records = received.snapshot();
        records.sort_by_key(|r| (r.partition, r.offset));
        records.dedup_by_key(|r| (r.partition, r.offset));
        records
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut last_len, mut last_change) = (0, Instant::now());
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let len = received.records.lock().unwrap().len();
        if len != last_len {
            (last_len, last_change) = (len, Instant::now());
        } else if received.distinct() >= expected && last_change.elapsed() > Duration::from_secs(2)
        {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    consumer.join().unwrap();
    distinct()
}
