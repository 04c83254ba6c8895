//! Security hardening, tried as an attacker or an unlucky operator would: credentials never
//! leave the process in an error's text, wherever that text goes (issue 11).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, pool, store, PATIENCE};
use troutbox::rabbitmq::RabbitSender;
use troutbox::Outbox;

const USER: &str = "alice-ops";
/// Percent-encoded in the URL (`%40` is `@`), as a password with an `@` must be.
const PASSWORD_ENCODED: &str = "s3cr%40t-Pa55";
const PASSWORD: &str = "s3cr@t-Pa55";

fn url(host: &str) -> String {
    format!("amqp://{USER}:{PASSWORD_ENCODED}@{host}:5672/%2f")
}

/// Whether `text` holds any form of the credentials.
fn leaks(text: &str) -> bool {
    [USER, PASSWORD_ENCODED, PASSWORD, "s3cr"]
        .iter()
        .any(|secret| text.contains(secret))
}

/// A host name that does not resolve (a DNS outage), a refused connection, and a host named
/// after the user (the sender's error names the broker it could not reach). Through the relay, neither the text stored
/// in `last_error` (which `troutbox dead list` prints) nor the error the error handler
/// receives (`Display`, `Debug` and every source) may carry the user name or the password,
/// nor may the sender's or the builder's `Debug`.
#[test]
fn broker_errors_carry_no_credentials_anywhere() {
    let pool = pool(4);
    // The third host's name holds the user name: the sender's own error text names the
    // broker it could not reach, so there the redaction is what keeps the credentials out
    // (the positive control: this test passed with the redaction removed before it).
    let named_after_user = format!("{USER}.invalid");
    for (i, (host, host_url)) in [
        ("broker.invalid", url("broker.invalid")),
        ("127.0.0.1", url("127.0.0.1").replace(":5672", ":1")),
        (named_after_user.as_str(), url(&named_after_user)),
    ]
    .into_iter()
    .enumerate()
    {
        let store = store(&format!("security_redaction_{i}"), &pool);
        let reported: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = reported.clone();
        let outbox = Outbox::builder(store.clone())
            .max_retries(0)
            .poll_interval(Duration::from_millis(5))
            .error_handler(move |e| {
                let mut text = format!("{e} | {e:?}");
                let mut source = std::error::Error::source(e);
                while let Some(cause) = source {
                    text.push_str(&format!(" | {cause} | {cause:?}"));
                    source = cause.source();
                }
                seen.lock().unwrap().push(text);
            })
            .build()
            .unwrap();
        outbox
            .add_message(&mut *pool.get().unwrap(), "order-1", b"paid")
            .unwrap();
        let builder = RabbitSender::builder(&host_url).connect_timeout(Duration::from_secs(5));
        let debug = format!("{builder:?}");
        assert!(
            !leaks(&debug) && (i == 2 || debug.contains(host)),
            "{debug}"
        );
        let sender = builder.build().unwrap();
        assert!(!leaks(&format!("{sender:?}")));
        let mut handle = outbox.start(sender).unwrap();
        assert!(eventually(PATIENCE, || store.backlog().unwrap().dead == 1));
        handle.shutdown().unwrap();

        let dead = store.dead_messages(10, None).unwrap();
        let stored = dead[0].last_error.clone().unwrap_or_default();
        if i == 0 {
            assert!(
                stored.contains(host),
                "the error should name the host: {stored}"
            );
        }
        if i == 2 {
            // What is left of the host once the user name is out of it.
            assert!(stored.contains(".invalid"), "{stored}");
        }
        assert!(
            !leaks(&stored),
            "credentials stored in last_error: {stored}"
        );
        let reported = reported.lock().unwrap();
        assert!(!reported.is_empty());
        for text in reported.iter() {
            assert!(!leaks(text), "credentials reported: {text}");
        }
    }
}
