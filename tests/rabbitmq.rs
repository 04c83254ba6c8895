//! The RabbitMQ Sender against a real broker (`cargo test --features rabbitmq --test rabbitmq`).
//!
//! Each test starts a private `rabbitmq-server` from the system's package on free loopback
//! ports (see `common/rabbit.rs`), and reads what arrived with a real AMQP consumer.

mod common;
#[path = "common/rabbit.rs"]
mod rabbit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use troutbox::rabbitmq::{RabbitError, RabbitSender};
use troutbox::{Backoff, Batch, Message, NewMessage, Outbox, PgStore, Sender, Status};

use common::{count, eventually, pool, store, PATIENCE};
use rabbit::{next, ready, Amqp, TempRabbit};

const EXCHANGE: &str = "troutbox.test";

/// How long one AMQP call of the test's consumer may take before it gives up on the
/// connection and connects again.
const RPC_LIMIT: Duration = Duration::from_secs(5);

fn broker() -> TempRabbit {
    TempRabbit::start().unwrap_or_else(|e| panic!("{e}"))
}

/// A durable direct exchange and durable queues bound to it by their own name, each with the
/// given arguments.
fn declare(url: &str, queues: &[(&str, FieldTable)]) {
    let amqp = Amqp::connect(url, PATIENCE).unwrap();
    let channel = &amqp.channel;
    amqp.block_on(channel.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    ))
    .unwrap();
    for (name, arguments) in queues {
        amqp.block_on(channel.queue_declare(
            (*name).into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments.clone(),
        ))
        .unwrap();
        amqp.block_on(channel.queue_bind(
            (*name).into(),
            EXCHANGE.into(),
            (*name).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .unwrap();
    }
    amqp.close();
}

/// message-id -> (deliveries, body, headers of the first delivery).
type ById = HashMap<String, (usize, Vec<u8>, Option<FieldTable>)>;

/// What a consumer received, per AMQP `message-id`.
#[derive(Default)]
struct Received {
    by_id: Mutex<ById>,
    changed: Condvar,
    /// Deliveries with no message-id, which the Sender never produces.
    anonymous: AtomicUsize,
    /// Times the consumer had to connect again.
    reconnects: AtomicUsize,
    /// AMQP calls of the consumer that did not end within [`RPC_LIMIT`] (it then connects
    /// again).
    stalled: AtomicUsize,
    /// Deliveries flagged `redelivered`: handed out before, and not acknowledged when the
    /// connection or the broker went down. Some are not duplicates: their first delivery was
    /// still in the consumer's prefetch buffer (up to 500) when the connection died. The
    /// other duplicates are the relay publishing again a message whose confirm it did not get.
    redelivered: AtomicUsize,
}

impl Received {
    fn distinct(&self) -> usize {
        self.by_id.lock().unwrap().len()
    }

    fn duplicates(&self) -> usize {
        self.by_id
            .lock()
            .unwrap()
            .values()
            .map(|(n, _, _)| n - 1)
            .sum()
    }

    /// Waits until `n` distinct messages arrived; false on timeout.
    fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let state = self.by_id.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.len() < n)
            .unwrap();
        state.len() >= n
    }
}

/// A real consumer on its own thread: manual acks, one after recording each delivery, so a
/// broker restart redelivers what was unacknowledged (counted as duplicates). Reconnects
/// whenever the connection ends, until `stop`.
fn consume(url: String, queue: &'static str) -> (Arc<Received>, Arc<AtomicBool>, JoinHandle<()>) {
    let received = Arc::new(Received::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (r, s) = (received.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let mut first = true;
        while !s.load(Ordering::SeqCst) {
            if !first {
                r.reconnects.fetch_add(1, Ordering::SeqCst);
            }
            first = false;
            let Ok(amqp) = Amqp::connect(&url, Duration::from_millis(200)) else {
                continue;
            };
            let channel = &amqp.channel;
            // Every call is bounded: one on a connection whose broker was just killed can
            // wait forever (seen: the consumer hung after a SIGKILL while 5,872 messages
            // waited in the queue).
            let qos = amqp.block_on_within(
                RPC_LIMIT,
                channel.basic_qos(500, BasicQosOptions::default()),
            );
            if !matches!(qos, Some(Ok(()))) {
                r.stalled
                    .fetch_add(usize::from(qos.is_none()), Ordering::SeqCst);
                continue;
            }
            let consumed = amqp.block_on_within(
                RPC_LIMIT,
                channel.basic_consume(
                    queue.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            );
            let mut consumer = match consumed {
                Some(Ok(consumer)) => consumer,
                other => {
                    r.stalled
                        .fetch_add(usize::from(other.is_none()), Ordering::SeqCst);
                    continue;
                }
            };
            while !s.load(Ordering::SeqCst) {
                let waited = amqp.block_on(async {
                    tokio::time::timeout(Duration::from_millis(100), next(&mut consumer)).await
                });
                let delivery = match waited {
                    Ok(Some(Ok(delivery))) => delivery,
                    Ok(_) => break, // cancelled, closed or failed: connect again
                    // Nothing for now; a connection that ended without ending the stream
                    // is left too.
                    Err(_) if amqp.connection.status().connected() => continue,
                    Err(_) => break,
                };
                if delivery.redelivered {
                    r.redelivered.fetch_add(1, Ordering::SeqCst);
                }
                match delivery.properties.message_id().clone() {
                    Some(id) => {
                        let mut state = r.by_id.lock().unwrap();
                        let entry = state.entry(id.to_string()).or_insert_with(|| {
                            (
                                0,
                                delivery.data.clone(),
                                delivery.properties.headers().clone(),
                            )
                        });
                        entry.0 += 1;
                        drop(state);
                        r.changed.notify_all();
                    }
                    None => {
                        r.anonymous.fetch_add(1, Ordering::SeqCst);
                    }
                }
                match amqp.block_on_within(RPC_LIMIT, delivery.ack(BasicAckOptions::default())) {
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break,
                    None => {
                        r.stalled.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
            }
            // Closing a connection to a dead broker fails, which is expected here.
            amqp.close();
        }
    });
    (received, stop, thread)
}

/// The acceptance test: 10,000 committed messages, all consumed back, while the broker
/// is stopped gracefully once and killed once mid-run. Duplicates are allowed and counted.
#[test]
fn ten_thousand_messages_survive_broker_restarts() {
    const TOTAL: usize = 10_000;
    const PER_TX: usize = 100;
    const QUEUE: &str = "orders";
    let started = Instant::now();
    let mut rabbit = broker();
    let url = rabbit.url();
    declare(&url, &[(QUEUE, FieldTable::default())]);

    let pool = pool(8);
    let store: PgStore = store("rabbitmq_restarts", &pool);
    let failed_batches = Arc::new(AtomicUsize::new(0));
    let outbox = Outbox::builder(store)
        .batch_size(250)
        .workers(2)
        // An outage must not kill messages: retry for as long as the test lasts, quickly.
        .max_retries(10_000)
        .backoff(Backoff::exponential(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ))
        .send_timeout(Duration::from_secs(30))
        .error_handler({
            let failures = failed_batches.clone();
            move |_| {
                failures.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let (received, stop_consumer, consumer) = consume(url.clone(), QUEUE);
    let sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .confirm_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut relay = outbox.start(sender).unwrap();

    // Producer: business transactions of 100 messages each, on their own thread so that the
    // broker restarts below happen while messages are still being committed and relayed.
    let producer = {
        let (outbox, pool) = (outbox.clone(), pool.clone());
        std::thread::spawn(move || {
            let mut conn = pool.get().unwrap();
            for start in (0..TOTAL).step_by(PER_TX) {
                let seqs: Vec<String> = (start..start + PER_TX).map(|i| i.to_string()).collect();
                let bodies: Vec<String> = seqs.iter().map(|s| format!("order {s}")).collect();
                let mut tx = conn.transaction().unwrap();
                let messages = seqs
                    .iter()
                    .zip(&bodies)
                    .map(|(seq, body)| NewMessage::new(QUEUE, body.as_bytes()).header("seq", seq));
                outbox.add_messages(&mut tx, messages).unwrap();
                tx.commit().unwrap();
                // Spread over about 20 s (workload shape, as the Kafka twin's), so that each
                // restart strikes while messages are still being committed and relayed:
                // in a tight loop the relay had published everything before the SIGKILL,
                // and the restart hit no batch (asserted below).
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    // Mid-run: a graceful stop after a quarter, a SIGKILL after 60 %.
    let mut restarts = Vec::new();
    for (threshold, hard) in [(TOTAL / 4, false), (TOTAL * 6 / 10, true)] {
        assert!(
            received.wait_for(threshold, Duration::from_secs(120)),
            "only {} of {threshold} messages arrived before the restart",
            received.distinct()
        );
        let seen = received.distinct();
        let errors_before = failed_batches.load(Ordering::SeqCst);
        let down = Instant::now();
        if hard {
            rabbit.kill().unwrap();
        } else {
            rabbit.stop().unwrap();
        }
        rabbit.start_again().unwrap();
        let down_for = down.elapsed();
        // Not vacuous: the restart failed batches the relay was sending (or tried to send
        // while the broker was down). Once messages flow again, every batch that met the
        // outage has failed and been reported.
        assert!(
            received.wait_for(seen + 200, Duration::from_secs(120)),
            "nothing arrived after the restart"
        );
        let errors_during = failed_batches.load(Ordering::SeqCst) - errors_before;
        assert!(
            errors_during > 0,
            "the {} restart failed no batch: it hit nothing in flight",
            if hard { "SIGKILL" } else { "SIGTERM" }
        );
        restarts.push((if hard { "SIGKILL" } else { "SIGTERM" }, seen, down_for));
    }
    producer.join().unwrap();

    let table = "rabbitmq_restarts.outbox_messages";
    if !received.wait_for(TOTAL, Duration::from_secs(180)) {
        // Where the rest are: still in the outbox (and in which state), queued but not
        // consumed, or gone; and what the relay, the consumer and the broker went through.
        let states: Vec<(String, i64)> = pool
            .get()
            .unwrap()
            .query(
                &format!("SELECT state::text, count(*) FROM {table} GROUP BY 1 ORDER BY 1"),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        panic!(
            "only {} of {TOTAL} committed messages arrived; outbox by state {states:?}; \
             {} ready in the queue; {} failed batches; consumer reconnects {} (stalled calls {}); restarts \
             {restarts:?}; relay {:?}; broker log: {}",
            received.distinct(),
            Amqp::connect(&url, PATIENCE)
                .map(|_| ready(&url, QUEUE).to_string())
                .unwrap_or_else(|e| format!("(cannot connect: {e})")),
            failed_batches.load(Ordering::SeqCst),
            received.reconnects.load(Ordering::SeqCst),
            received.stalled.load(Ordering::SeqCst),
            relay.health(),
            rabbit.log_tail(),
        );
    }
    assert!(
        eventually(PATIENCE, || count(
            &pool,
            &format!("SELECT count(*) FROM {table}")
        ) == 0),
        "the outbox did not drain"
    );
    relay.shutdown().unwrap();
    // Let the consumer take whatever is still queued (duplicates published before the last
    // confirms), so the duplicate count is final.
    assert!(eventually(PATIENCE, || ready(&url, QUEUE) == 0));
    stop_consumer.store(true, Ordering::SeqCst);
    consumer.join().unwrap();

    // Every message exactly once after deduplication on message-id, with its own body.
    let by_id = received.by_id.lock().unwrap();
    assert_eq!(by_id.len(), TOTAL);
    let mut seqs = vec![false; TOTAL];
    for (id, (_, body, headers)) in by_id.iter() {
        assert!(
            id.rsplit_once(':')
                .is_some_and(|(outbox, id)| outbox.len() == 36 && id.parse::<i64>().is_ok()),
            "message-id {id:?} is not a dedup key (<outbox id>:<id>)"
        );
        let seq = match headers.as_ref().and_then(|h| h.inner().get("seq")) {
            Some(AMQPValue::LongString(s)) => s.to_string().parse::<usize>().unwrap(),
            other => panic!("message {id} has seq header {other:?}"),
        };
        assert_eq!(body, format!("order {seq}").as_bytes());
        assert!(!seqs[seq], "two message-ids carry seq {seq}");
        seqs[seq] = true;
    }
    assert!(seqs.iter().all(|&s| s));
    drop(by_id);
    assert_eq!(received.anonymous.load(Ordering::SeqCst), 0);
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM {table} WHERE state = 'dead'")
        ),
        0
    );

    let restarts: Vec<String> = restarts
        .iter()
        .map(|(how, seen, down)| format!("{how} after {seen} delivered, down {down:.1?}"))
        .collect();
    eprintln!(
        "rabbitmq: {TOTAL} committed, {} delivered distinct, {} duplicates ({} deliveries flagged redelivered by the broker), {} broker restarts ({}), {} relay errors, {} consumer reconnects ({} after a stalled call), {:.1?} in all",
        received.distinct(),
        received.duplicates(),
        received.redelivered.load(Ordering::SeqCst),
        rabbit.starts() - 1,
        restarts.join("; "),
        failed_batches.load(Ordering::SeqCst),
        received.reconnects.load(Ordering::SeqCst),
        received.stalled.load(Ordering::SeqCst),
        started.elapsed()
    );
}

/// What one message looks like on the wire, and the three ways the broker refuses one:
/// unroutable (basic.return), rejected (basic.nack), silent (no confirm in time).
#[test]
fn mapping_returns_nacks_and_confirm_timeouts() {
    let rabbit = broker();
    let url = rabbit.url();
    // "full" holds one message and nacks publishes beyond it.
    let mut full = FieldTable::default();
    full.insert("x-max-length".into(), AMQPValue::LongInt(1));
    full.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    declare(&url, &[("mapped", FieldTable::default()), ("full", full)]);
    let pool = pool(4);
    let store: PgStore = store("rabbitmq_mapping", &pool);
    let table = "rabbitmq_mapping.outbox_messages";
    let outbox = Outbox::builder(store)
        .max_retries(0) // a refused message is dead at once, with the reason kept
        .error_handler(|_| {})
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    outbox
        .add(
            &mut tx,
            &NewMessage::new("mapped", b"payload")
                .header("traceparent", "00-abc-def-01")
                .header("tag", "a")
                .header("tag", "b"),
        )
        .unwrap();
    outbox
        .add_message(&mut tx, "nowhere", b"unroutable")
        .unwrap();
    for i in 0..3 {
        outbox
            .add_message(&mut tx, "full", format!("{i}").as_bytes())
            .unwrap();
    }
    tx.commit().unwrap();
    let ids: Vec<i64> = conn
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let (received, stop_consumer, consumer) = consume(url.clone(), "mapped");
    let sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .build()
        .unwrap();
    let mut relay = outbox.start(sender).unwrap();
    assert!(received.wait_for(1, PATIENCE));
    // Settled: one sent, the unroutable one and two of "full" dead.
    assert!(eventually(PATIENCE, || count(
        &pool,
        &format!("SELECT count(*) FROM {table} WHERE state = 'dead'")
    ) == 3));
    relay.shutdown().unwrap();
    stop_consumer.store(true, Ordering::SeqCst);
    consumer.join().unwrap();

    let by_id = received.by_id.lock().unwrap();
    let (n, body, headers) = by_id
        .iter()
        .find(|(key, _)| key.ends_with(&format!(":{}", ids[0])))
        .map(|(_, seen)| seen)
        .expect("message-id = the message's dedup key");
    assert_eq!((*n, body.as_slice()), (1, &b"payload"[..]));
    let headers = headers.as_ref().unwrap().inner();
    assert_eq!(
        headers.get("traceparent"),
        Some(&AMQPValue::LongString("00-abc-def-01".into()))
    );
    assert_eq!(
        headers.get("tag"),
        Some(&AMQPValue::FieldArray(
            vec![
                AMQPValue::LongString("a".into()),
                AMQPValue::LongString("b".into())
            ]
            .into()
        ))
    );
    drop(by_id);
    let errors: HashMap<i64, String> = conn
        .query(
            &format!("SELECT id, last_error FROM {table} WHERE state = 'dead'"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        errors[&ids[1]].contains("NO_ROUTE"),
        "{:?}",
        errors[&ids[1]]
    );
    let nacked = errors.values().filter(|e| e.contains("nacked")).count();
    assert_eq!(nacked, 2, "{errors:?}");
    assert_eq!(ready(&url, "full"), 1);

    // A broker that stops answering: its VM frozen with SIGSTOP, the connection stays open
    // but no confirm comes. The message must be failed after the confirm timeout, not left
    // hanging. The sender connects (on a first message) while the broker still runs.
    let sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .confirm_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let (received, stop_consumer, consumer) = consume(url.clone(), "mapped");
    let mut relay = outbox.start(sender).unwrap();
    outbox.add_message(&mut *conn, "mapped", b"first").unwrap();
    assert!(received.wait_for(1, PATIENCE));
    stop_consumer.store(true, Ordering::SeqCst);
    consumer.join().unwrap();
    rabbit.pause();
    outbox.add_message(&mut *conn, "mapped", b"late").unwrap();
    let timed_out = format!(
        "SELECT count(*) FROM {table} WHERE state = 'dead' AND last_error LIKE '%no publisher confirm%'"
    );
    let failed = eventually(PATIENCE, || count(&pool, &timed_out) == 1);
    rabbit.resume();
    relay.shutdown().unwrap();
    assert!(
        failed,
        "the unconfirmed message was not failed after the confirm timeout"
    );
}

#[test]
fn a_clone_of_a_connected_sender_is_unconnected_and_keeps_its_configuration() {
    let rabbit = broker();
    let url = rabbit.url();
    declare(&url, &[("cloned", FieldTable::default())]);
    let pool = pool(4);
    let store: PgStore = store("rabbitmq_clone", &pool);
    let outbox = Outbox::builder(store)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    outbox
        .add_message(&mut *pool.get().unwrap(), "cloned", b"v")
        .unwrap();
    let mut sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .build()
        .unwrap();
    // Inside the relay, after a send: the original is connected now, so its clone can show
    // that cloning does not share the connection.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut relay = outbox
        .start(
            move |batch: &mut troutbox::Batch| -> Result<(), troutbox::BoxError> {
                let result = troutbox::Sender::send(&mut sender, batch);
                let clone = sender.clone();
                s.lock().unwrap().push((
                    sender.is_connected(),
                    clone.is_connected(),
                    clone.exchange().to_string(),
                    format!("{clone:?}"),
                ));
                result.map_err(Into::into)
            },
        )
        .unwrap();
    assert!(eventually(PATIENCE, || !seen.lock().unwrap().is_empty()));
    relay.shutdown().unwrap();
    let seen = seen.lock().unwrap();
    let (original, clone, exchange, debug) = &seen[0];
    assert!(
        *original,
        "the original did not connect: the check below would be vacuous"
    );
    assert!(!*clone, "the clone shares the original's connection");
    assert_eq!(exchange, EXCHANGE);
    assert!(debug.contains("connected: false"), "{debug}");
    assert!(eventually(PATIENCE, || ready(&url, "cloned") == 1));
}

/// A batch of one message for `queue`, as the relay would hand it over.
fn one(id: i64, queue: &str, body: &[u8]) -> Batch {
    Batch::for_test([Message::for_test(id, queue, body)])
}

/// The `message-id` of the test message `id` (its dedup key).
fn test_key(id: i64) -> String {
    format!("{}:{id}", Message::TEST_OUTBOX_ID)
}

/// The memory alarm (issue 11): `rabbitmqctl set_vm_memory_high_watermark 0` makes the
/// broker block publishing connections. The batch must fail at once with the broker's reason,
/// not wait for its deadline; while the connection stays blocked a batch fails without
/// publishing; once the alarm clears, the same connection publishes again.
#[test]
fn a_blocked_connection_fails_the_batch_at_once_with_the_brokers_reason() {
    let rabbit = broker();
    let url = rabbit.url();
    declare(&url, &[("alarmed", FieldTable::default())]);
    let deadline = Duration::from_secs(30);
    // "At once" is asserted as well before the deadline: a third of it. A batch that waited
    // for its deadline takes 30 s; one that failed on the broker's word takes milliseconds
    // (printed below), and a loaded 2-core machine must not turn that into a failure.
    let at_once = deadline / 3;
    let mut sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .confirm_timeout(deadline)
        .build()
        .unwrap();
    let mut batch = one(1, "alarmed", b"before the alarm");
    sender.send(&mut batch).unwrap();
    assert_eq!(batch.messages()[0].status(), &Status::Sent);

    rabbit.ctl(&["set_vm_memory_high_watermark", "0"]).unwrap();
    // The alarm takes effect within a moment: publish until a batch is refused.
    let given_up = Instant::now() + PATIENCE;
    let mut id = 2;
    let (error, took) = loop {
        let mut batch = one(id, "alarmed", b"during the alarm");
        let started = Instant::now();
        let result = sender.send(&mut batch);
        let took = started.elapsed();
        id += 1;
        match result {
            Err(error) => break (error, took),
            Ok(()) => {
                assert!(Instant::now() < given_up, "the alarm never blocked a batch");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let text = error.to_string();
    assert!(
        matches!(&error, RabbitError::Blocked { reason } if reason.contains("memory")),
        "{text}"
    );
    assert!(
        text.starts_with("RabbitMQ blocked the connection: "),
        "{text}"
    );
    assert!(
        took < at_once,
        "the blocked batch took {took:?} (deadline {deadline:?})"
    );
    assert!(sender.is_connected(), "a blocked connection is kept");

    // A connection that has not published yet learns of the alarm from its first publish:
    // that batch is on its way already, and fails as soon as the broker says it is blocked.
    let mut fresh = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .confirm_timeout(deadline)
        .build()
        .unwrap();
    let mut batch = one(1_500, "alarmed", b"first publish during the alarm");
    let started = Instant::now();
    let error = fresh.send(&mut batch).unwrap_err();
    let fresh_took = started.elapsed();
    assert!(matches!(error, RabbitError::Blocked { .. }), "{error}");
    assert!(
        fresh_took < at_once,
        "a first publish into the alarm took {fresh_took:?} (deadline {deadline:?})"
    );

    // Still blocked: refused at once, and not published.
    let never_published = 1_000;
    let mut batch = one(never_published, "alarmed", b"refused while blocked");
    let started = Instant::now();
    let error = sender.send(&mut batch).unwrap_err();
    assert!(matches!(error, RabbitError::Blocked { .. }), "{error}");
    let refused_took = started.elapsed();
    assert!(refused_took < at_once, "refused after {refused_took:?}");
    eprintln!(
        "rabbitmq blocked: first blocked batch failed after {took:?}, a first publish into \
         the alarm after {fresh_took:?}, a batch while blocked after {refused_took:?} \
         (deadline {deadline:?})"
    );

    rabbit
        .ctl(&["set_vm_memory_high_watermark", "0.4"])
        .unwrap();
    let after = 2_000;
    assert!(
        eventually(PATIENCE, || {
            let mut batch = one(after, "alarmed", b"after the alarm");
            sender.send(&mut batch).is_ok() && batch.messages()[0].status() == &Status::Sent
        }),
        "publishing did not resume once the alarm cleared"
    );
    eprintln!(
        "rabbitmq blocked: {text:?} after {took:?}, a fresh connection's first publish after {fresh_took:?}; resumed after the alarm cleared"
    );

    let (received, stop_consumer, consumer) = consume(url.clone(), "alarmed");
    assert!(
        eventually(PATIENCE, || received
            .by_id
            .lock()
            .unwrap()
            .contains_key(&test_key(after))),
        "the message sent after the alarm did not arrive"
    );
    // One queue, one consumer, first in first out: had the refused batch been published,
    // it would have arrived before the message sent after the alarm, which has arrived.
    stop_consumer.store(true, Ordering::SeqCst);
    consumer.join().unwrap();
    let by_id = received.by_id.lock().unwrap();
    assert!(by_id.contains_key(&test_key(1)));
    assert!(
        !by_id.contains_key(&test_key(never_published)),
        "a batch refused while blocked was published"
    );
}

/// One deadline covers publishing and confirms (issue 11): a broker frozen with SIGSTOP keeps
/// the connection open but reads nothing, so 32 MiB of bodies (more than the sockets buffer)
/// cannot even be written. The batch must end at `confirm_timeout`, every message failed.
#[test]
fn a_frozen_broker_cannot_hold_a_batch_past_its_deadline() {
    let rabbit = broker();
    let url = rabbit.url();
    declare(&url, &[("large", FieldTable::default())]);
    let deadline = Duration::from_secs(2);
    let mut sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .confirm_timeout(deadline)
        .build()
        .unwrap();
    let mut batch = one(1, "large", b"connects");
    sender.send(&mut batch).unwrap();

    rabbit.pause();
    let body = vec![b'x'; 8 << 20];
    let mut batch = Batch::for_test((10..14).map(|id| Message::for_test(id, "large", &body)));
    let started = Instant::now();
    let result = sender.send(&mut batch);
    let took = started.elapsed();
    rabbit.resume();
    let error = result.unwrap_err();
    assert!(
        matches!(error, RabbitError::ConfirmTimeout { unconfirmed: 4, .. }),
        "{error}"
    );
    // Bounded by its deadline, not by TCP (minutes): the upper bound is generous (a loaded
    // 2-core machine), the printed figure is the measure.
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(10),
        "the batch took {took:?}, its deadline is {deadline:?}"
    );
    for msg in batch.iter() {
        assert!(
            matches!(msg.status(), Status::Failed(reason) if reason.contains("no publisher confirm")),
            "{:?}",
            msg.status()
        );
    }
    assert!(!sender.is_connected());
    eprintln!(
        "rabbitmq frozen broker: 4 x 8 MiB batch failed after {took:?} (deadline {deadline:?})"
    );
    // The broker runs again: the next batch connects anew and goes through.
    assert!(eventually(PATIENCE, || {
        let mut batch = one(20, "large", b"after");
        sender.send(&mut batch).is_ok() && batch.messages()[0].status() == &Status::Sent
    }));
}

/// The broker's own body limit (`max_message_size`, 64 KiB here): above it RabbitMQ closes
/// the channel, failing the whole batch; with `max_body_size` set to the same limit only the
/// oversized message fails, without being published.
#[test]
fn a_body_over_the_brokers_limit_fails_alone_when_max_body_size_matches_it() {
    const LIMIT: usize = 64 * 1024;
    let rabbit = TempRabbit::start_with(&format!("max_message_size = {LIMIT}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let url = rabbit.url();
    declare(&url, &[("sized", FieldTable::default())]);
    let big = vec![b'x'; LIMIT + 1];
    let batch = |first: i64| {
        Batch::for_test([
            Message::for_test(first, "sized", b"small"),
            Message::for_test(first + 1, "sized", &big),
            Message::for_test(first + 2, "sized", b"small"),
        ])
    };

    // The default (16 MiB) is above this broker's limit.
    let mut sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .build()
        .unwrap();
    let mut over = batch(1);
    let error = sender.send(&mut over).unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(
            error,
            RabbitError::Broker {
                action: "publish",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("PRECONDITION_FAILED"), "{text}");
    match over.messages()[1].status() {
        Status::Failed(reason) => assert!(reason.contains("closed the channel"), "{reason}"),
        other => panic!("{other:?}"),
    }

    let mut sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .max_body_size(LIMIT)
        .build()
        .unwrap();
    let mut matched = batch(10);
    sender.send(&mut matched).unwrap();
    let statuses: Vec<&Status> = matched.iter().map(Message::status).collect();
    assert_eq!(statuses[0], &Status::Sent);
    assert!(
        matches!(statuses[1], Status::Failed(r) if r.contains("max_body_size")),
        "{:?}",
        statuses[1]
    );
    assert_eq!(statuses[2], &Status::Sent);
    eprintln!("rabbitmq over max_message_size: {text}");
}

/// The broker's connections carrying this test's sender (named "troutbox"), by process id.
fn troutbox_connections(rabbit: &TempRabbit) -> Vec<String> {
    let listing = rabbit
        .ctl(&["-q", "list_connections", "pid", "client_properties"])
        .unwrap();
    let mut pids: Vec<String> = listing
        .lines()
        .filter(|line| line.contains("troutbox"))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();
    pids.sort();
    pids
}

/// Why each connection has a runtime of its own that runs between batches: an idle
/// connection must keep answering heartbeats, or the broker closes it after two missed ones.
/// With a 1-second heartbeat and 5 idle seconds, the same connection must still carry the
/// next batch.
#[test]
fn an_idle_connection_outlives_its_heartbeat_timeout() {
    let rabbit = broker();
    let url = rabbit.url().replace("heartbeat=5", "heartbeat=1");
    declare(&url, &[("idle", FieldTable::default())]);
    let mut sender = RabbitSender::builder(url.clone())
        .exchange(EXCHANGE)
        .build()
        .unwrap();
    let mut batch = one(1, "idle", b"first");
    sender.send(&mut batch).unwrap();
    let before = troutbox_connections(&rabbit);
    assert_eq!(before.len(), 1, "{before:?}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        troutbox_connections(&rabbit),
        before,
        "the idle connection was closed"
    );
    let mut batch = one(2, "idle", b"after idling");
    sender.send(&mut batch).unwrap();
    assert_eq!(batch.messages()[0].status(), &Status::Sent);
    assert_eq!(troutbox_connections(&rabbit), before);
}
