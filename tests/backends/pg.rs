//! The suite's PostgreSQL backend.

use std::time::Duration;

use r2d2_postgres::PostgresConnectionManager;
use troutbox::testing::TempPostgres;
use troutbox::{Backlog, DeadMessage, Error, Handle, NewMessage, Outbox, PgPool, PgStore, Sender};

use super::support::{Backend, Opts};

pub struct Pg;

fn builder(db: &PgPool, name: &str, opts: &Opts) -> troutbox::OutboxBuilder {
    let mut b = Outbox::builder(PgStore::new(db.clone()).schema(name))
        .per_key_ordering(opts.ordered)
        .workers(opts.workers)
        .error_handler({
            let errors = opts.errors.clone();
            move |e| {
                // The error with its causes (a MariaDB error's text is its source's).
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                errors.lock().unwrap().push(text)
            }
        });
    if let Some(n) = opts.batch_size {
        b = b.batch_size(n);
    }
    if let Some(n) = opts.max_retries {
        b = b.max_retries(n);
    }
    if let Some(backoff) = opts.backoff {
        b = b.backoff(backoff);
    }
    if let Some(p) = opts.poll_interval {
        b = b.poll_interval(p);
    }
    b
}

fn db_error(context: &'static str) -> impl FnOnce(postgres::Error) -> Error {
    move |error| Error::Database { context, error }
}

impl Backend for Pg {
    type Outbox = Outbox;
    type Db = PgPool;
    type Server = TempPostgres;
    const NAME: &'static str = "postgres";

    fn url() -> String {
        troutbox::testing::database_url().unwrap_or_else(|e| panic!("{e}"))
    }

    fn db(url: &str, size: u32) -> PgPool {
        r2d2::Pool::builder()
            .max_size(size)
            .connection_timeout(Duration::from_secs(10))
            .build(PostgresConnectionManager::new(
                url.parse().unwrap(),
                postgres::NoTls,
            ))
            .unwrap()
    }

    fn forget(db: &PgPool, name: &str) {
        db.get()
            .unwrap()
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
            .unwrap();
    }

    fn fresh(db: &PgPool, name: &str, opts: &Opts) -> Outbox {
        Self::forget(db, name);
        let outbox = builder(db, name, opts).build().unwrap();
        outbox.migrate().unwrap();
        db.get()
            .unwrap()
            .batch_execute(&format!(
                "CREATE TABLE {name}.deliveries (n bigserial, msg_id bigint NOT NULL, value bytea NOT NULL)"
            ))
            .unwrap();
        outbox
    }

    fn migrate_again(db: &PgPool, name: &str) -> Result<(), Error> {
        PgStore::new(db.clone()).schema(name).migrate()
    }

    fn attach(db: &PgPool, name: &str, opts: &Opts) -> Outbox {
        builder(db, name, opts).build().unwrap()
    }

    fn produce(
        outbox: &Outbox,
        db: &PgPool,
        messages: &[NewMessage<'_>],
        commit: bool,
    ) -> Result<(), Error> {
        let mut conn = db.get().map_err(|source| Error::Pool {
            context: "test producer",
            source,
        })?;
        let mut tx = conn.transaction().map_err(db_error("test producer"))?;
        outbox.add_messages(&mut tx, messages.iter().cloned())?;
        if commit {
            tx.commit().map_err(db_error("test producer"))
        } else {
            tx.rollback().map_err(db_error("test producer"))
        }
    }

    fn start<S: Sender + Clone>(outbox: &Outbox, sender: S) -> Result<Handle, Error> {
        outbox.start(sender)
    }

    fn backlog(outbox: &Outbox) -> Result<Backlog, Error> {
        outbox.store().backlog()
    }

    fn dead(outbox: &Outbox) -> Vec<DeadMessage> {
        outbox.store().dead_messages(1000, None).unwrap()
    }

    fn requeue_all_dead(outbox: &Outbox) -> u64 {
        outbox.store().requeue_all_dead().unwrap()
    }

    fn purge_dead(outbox: &Outbox, ids: &[i64]) -> u64 {
        outbox.store().purge_dead(ids).unwrap()
    }

    fn record(db: &PgPool, name: &str, rows: &[(i64, Vec<u8>)]) -> Result<(), Error> {
        let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let values: Vec<&[u8]> = rows.iter().map(|r| r.1.as_slice()).collect();
        let mut conn = db.get().map_err(|source| Error::Pool {
            context: "recording deliveries",
            source,
        })?;
        conn.execute(
            &format!(
                "INSERT INTO {name}.deliveries (msg_id, value) SELECT * FROM unnest($1::int8[], $2::bytea[])"
            ),
            &[&ids, &values],
        )
        .map(drop)
        .map_err(db_error("recording deliveries"))
    }

    fn delivered(db: &PgPool, name: &str) -> Vec<(i64, Vec<u8>)> {
        db.get()
            .unwrap()
            .query(
                &format!("SELECT msg_id, value FROM {name}.deliveries ORDER BY n"),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    fn terminate_other_sessions(db: &PgPool) -> usize {
        let row = db
            .get()
            .unwrap()
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE pid <> pg_backend_pid() AND datname = current_database()
                   AND backend_type = 'client backend'",
                &[],
            )
            .unwrap();
        usize::try_from(row.get::<_, i64>(0)).unwrap()
    }

    fn private_server() -> TempPostgres {
        TempPostgres::start().unwrap()
    }

    fn server_url(server: &TempPostgres) -> String {
        server.url()
    }

    fn stop(server: &mut TempPostgres) {
        server.stop_server().unwrap();
    }

    fn restart(server: &mut TempPostgres) {
        server.start_server().unwrap();
    }
}
