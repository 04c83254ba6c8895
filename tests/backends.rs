//! One behavioural suite, every backend: delivery, retries and dead letters, per-key
//! ordering, SIGKILLed relays, crash-looping poison, terminated sessions and server
//! restarts, written once (`tests/backends/suite.rs`, generic over
//! `tests/backends/support.rs`'s `Backend`) and run against PostgreSQL and, with the
//! `mariadb` feature, MariaDB, each on a real throw-away server.
//!
//! Scenarios print a `FIGURES` line (`--nocapture` shows them).

#[cfg(feature = "mariadb")]
#[path = "backends/maria.rs"]
mod maria;
#[path = "backends/pg.rs"]
mod pg;
#[path = "backends/suite.rs"]
mod suite;
#[path = "backends/support.rs"]
mod support;

/// Every scenario of the suite, as tests of one backend.
macro_rules! suite {
    ($module:ident, $backend:ty) => {
        mod $module {
            use crate::suite;

            fn name(test: &str) -> String {
                format!("suite_{}_{test}", stringify!($module))
            }

            #[test]
            fn committed_delivered_rolled_back_never() {
                suite::committed_delivered_rolled_back_never::<$backend>(&name("delivery"));
            }

            #[test]
            fn failures_retry_then_dead_and_admin_requeues() {
                suite::failures_retry_then_dead_and_admin_requeues::<$backend>(&name("dead"));
            }

            #[test]
            fn per_key_order_holds_through_failures() {
                suite::per_key_order_holds_through_failures::<$backend>(&name("ordered"));
            }

            #[test]
            fn sigkill_loses_nothing() {
                suite::sigkill_loses_nothing::<$backend>(&name("sigkill"));
            }

            #[test]
            fn crash_looping_poison_is_isolated() {
                suite::crash_looping_poison_is_isolated::<$backend>(&name("poison"));
            }

            #[test]
            fn terminated_sessions_lose_nothing() {
                suite::terminated_sessions_lose_nothing::<$backend>(&name("terminated"));
            }

            #[test]
            fn concurrent_migrations_all_succeed() {
                suite::concurrent_migrations_all_succeed::<$backend>(&name("migrate"));
            }

            #[test]
            fn a_held_claim_never_blocks_producers() {
                suite::a_held_claim_never_blocks_producers::<$backend>(&name("held"));
            }

            #[test]
            fn server_restart_relay_resumes() {
                suite::server_restart_relay_resumes::<$backend>(&name("restart"));
            }
        }
    };
}

suite!(postgres, crate::pg::Pg);
#[cfg(feature = "mariadb")]
suite!(mariadb, crate::maria::Maria);

/// The relay child of the SIGKILL and poison scenarios (see `suite::child`).
#[test]
#[ignore = "entry point of the relay child process the suite spawns: fails when run on its own"]
fn child_process() {
    let spec = std::env::var(suite::CHILD).expect("this is the suite's relay child process");
    let mut parts = spec.splitn(3, ':');
    let (backend, name, mode) = (
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
    );
    match backend.as_str() {
        "postgres" => suite::child::<pg::Pg>(&name, &mode),
        #[cfg(feature = "mariadb")]
        "mariadb" => suite::child::<maria::Maria>(&name, &mode),
        other => panic!("unknown backend {other}"),
    }
}
