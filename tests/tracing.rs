//! The `tracing` feature (issue 13): a span per batch, with its size and first and last id,
//! entered while the Sender runs, so that the Sender's own spans nest under it.
//!
//! A minimal subscriber records spans (name, fields, parent) and tracks each thread's
//! current span; it is the process's global default, as the relay's threads need.

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use troutbox::{Batch, Outbox};

#[derive(Debug, Clone, Default)]
struct SpanData {
    name: &'static str,
    parent: Option<u64>,
    fields: HashMap<String, String>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

thread_local! {
    static STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Recorder {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, SpanData>>,
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let parent = if attrs.is_contextual() {
            STACK.with(|s| s.borrow().last().copied())
        } else {
            attrs.parent().map(Id::into_u64)
        };
        let mut data = SpanData {
            name: attrs.metadata().name(),
            parent,
            fields: HashMap::new(),
        };
        attrs.record(&mut Fields(&mut data.fields));
        self.spans.lock().unwrap().insert(id, data);
        Id::from_u64(id)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some(data) = self.spans.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(&mut Fields(&mut data.fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, span: &Id) {
        STACK.with(|s| s.borrow_mut().push(span.into_u64()));
    }
    fn exit(&self, span: &Id) {
        STACK.with(|s| {
            let mut s = s.borrow_mut();
            if s.last() == Some(&span.into_u64()) {
                s.pop();
            }
        });
    }
}

#[test]
fn each_batch_runs_inside_its_span_and_the_senders_spans_nest_under_it() {
    let recorder = Arc::new(Recorder::default());
    tracing::subscriber::set_global_default(recorder.clone()).unwrap();

    let pool = common::pool(6);
    let store = common::store("tracing_batches", &pool);
    let outbox = Outbox::builder(store).batch_size(10).build().unwrap();
    let mut conn = pool.get().unwrap();
    let mut tx = conn.transaction().unwrap();
    for i in 0..3 {
        outbox
            .add_message(&mut tx, "k", format!("{i}").as_bytes())
            .unwrap();
    }
    tx.commit().unwrap();
    drop(conn);
    let ids: Vec<i64> = pool
        .get()
        .unwrap()
        .query(
            "SELECT id FROM tracing_batches.outbox_messages ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let inner_spans: Arc<Mutex<Vec<u64>>> = Arc::default();
    let seen = inner_spans.clone();
    let mut relay = outbox
        .start(move |batch: &mut Batch| {
            // The application's (or a broker client's) own span, inside the Sender.
            let span = tracing::info_span!("publish", n = batch.len());
            let _entered = span.enter();
            seen.lock().unwrap().push(span.id().unwrap().into_u64());
            Ok::<(), String>(())
        })
        .unwrap();
    assert!(common::eventually(common::PATIENCE, || !inner_spans
        .lock()
        .unwrap()
        .is_empty()));
    relay.shutdown().unwrap();

    let spans = recorder.spans.lock().unwrap();
    let inner = &spans[&inner_spans.lock().unwrap()[0]];
    assert_eq!(inner.name, "publish");
    let batch = &spans[&inner.parent.expect("the Sender's span has a parent")];
    assert_eq!(batch.name, "troutbox.batch", "{batch:?}");
    assert_eq!(batch.fields["size"], "3", "{batch:?}");
    assert_eq!(batch.fields["first_id"], ids[0].to_string(), "{batch:?}");
    assert_eq!(batch.fields["last_id"], ids[2].to_string(), "{batch:?}");
    assert_eq!(batch.fields["ordered"], "false", "{batch:?}");
    assert_eq!(batch.fields["outcome"], "ok", "{batch:?}");
    assert_eq!(batch.fields["outbox"].len(), 36, "{batch:?}");
}
