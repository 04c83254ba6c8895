//! The suite's MariaDB backend.

use troutbox::mariadb::mysql::prelude::Queryable;
use troutbox::mariadb::mysql::{TxOpts, Value};
use troutbox::mariadb::{pool, MariaDbOutbox, MariaDbOutboxBuilder, MariaDbPool, MariaDbStore};
use troutbox::testing::TempMariaDb;
use troutbox::{Backlog, DeadMessage, Error, Handle, NewMessage, Sender};

use super::support::{Backend, Opts};

pub struct Maria;

fn builder(db: &MariaDbPool, name: &str, opts: &Opts) -> MariaDbOutboxBuilder {
    let mut b = MariaDbOutbox::builder(MariaDbStore::new(db.clone()).table(name))
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

fn my_error(context: &'static str) -> impl FnOnce(troutbox::mariadb::mysql::Error) -> Error {
    move |source| Error::MariaDb { context, source }
}

fn conn(
    db: &MariaDbPool,
) -> Result<r2d2::PooledConnection<troutbox::mariadb::MariaDbManager>, Error> {
    db.get().map_err(|source| Error::Pool {
        context: "test",
        source,
    })
}

impl Backend for Maria {
    type Outbox = MariaDbOutbox;
    type Db = MariaDbPool;
    type Server = TempMariaDb;
    const NAME: &'static str = "mariadb";

    fn url() -> String {
        troutbox::testing::mariadb_url().unwrap_or_else(|e| panic!("{e}"))
    }

    fn db(url: &str, size: u32) -> MariaDbPool {
        pool(url, size).unwrap()
    }

    fn forget(db: &MariaDbPool, name: &str) {
        let mut c = conn(db).unwrap();
        c.query_drop(format!(
            "DROP TABLE IF EXISTS `{name}`, `{name}_claims`, `{name}_charges`, `{name}_key_locks`, `{name}_deliveries`"
        ))
        .unwrap();
        // The tables of versions and modes are the database's: forget this table there.
        for t in ["troutbox_migrations", "troutbox_tables"] {
            let _ = c.exec_drop(format!("DELETE FROM {t} WHERE table_name = ?"), (name,));
        }
    }

    fn fresh(db: &MariaDbPool, name: &str, opts: &Opts) -> MariaDbOutbox {
        Self::forget(db, name);
        let mut c = conn(db).unwrap();
        let outbox = builder(db, name, opts).build().unwrap();
        outbox.migrate().unwrap();
        c.query_drop(format!(
            "CREATE TABLE `{name}_deliveries` (n BIGINT AUTO_INCREMENT PRIMARY KEY, msg_id BIGINT NOT NULL, value LONGBLOB NOT NULL)"
        ))
        .unwrap();
        outbox
    }

    fn migrate_again(db: &MariaDbPool, name: &str) -> Result<(), Error> {
        MariaDbStore::new(db.clone()).table(name).migrate()
    }

    fn attach(db: &MariaDbPool, name: &str, opts: &Opts) -> MariaDbOutbox {
        builder(db, name, opts).build().unwrap()
    }

    fn produce(
        outbox: &MariaDbOutbox,
        db: &MariaDbPool,
        messages: &[NewMessage<'_>],
        commit: bool,
    ) -> Result<(), Error> {
        let mut c = conn(db)?;
        let mut tx = c
            .start_transaction(TxOpts::default())
            .map_err(my_error("test producer"))?;
        outbox.add_messages(&mut tx, messages.iter().cloned())?;
        if commit {
            tx.commit().map_err(my_error("test producer"))
        } else {
            tx.rollback().map_err(my_error("test producer"))
        }
    }

    fn start<S: Sender + Clone>(outbox: &MariaDbOutbox, sender: S) -> Result<Handle, Error> {
        outbox.start(sender)
    }

    fn backlog(outbox: &MariaDbOutbox) -> Result<Backlog, Error> {
        outbox.store().backlog()
    }

    fn dead(outbox: &MariaDbOutbox) -> Vec<DeadMessage> {
        outbox.store().dead_messages(1000, None).unwrap()
    }

    fn requeue_all_dead(outbox: &MariaDbOutbox) -> u64 {
        outbox.store().requeue_all_dead().unwrap()
    }

    fn purge_dead(outbox: &MariaDbOutbox, ids: &[i64]) -> u64 {
        outbox.store().purge_dead(ids).unwrap()
    }

    fn record(db: &MariaDbPool, name: &str, rows: &[(i64, Vec<u8>)]) -> Result<(), Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut c = conn(db)?;
        let marks = vec!["(?, ?)"; rows.len()].join(",");
        let params: Vec<Value> = rows
            .iter()
            .flat_map(|(id, v)| [Value::from(*id), Value::Bytes(v.clone())])
            .collect();
        c.exec_drop(
            format!("INSERT INTO `{name}_deliveries` (msg_id, value) VALUES {marks}"),
            params,
        )
        .map_err(my_error("recording deliveries"))
    }

    fn delivered(db: &MariaDbPool, name: &str) -> Vec<(i64, Vec<u8>)> {
        conn(db)
            .unwrap()
            .query(format!(
                "SELECT msg_id, value FROM `{name}_deliveries` ORDER BY n"
            ))
            .unwrap()
    }

    fn terminate_other_sessions(db: &MariaDbPool) -> usize {
        let mut c = conn(db).unwrap();
        let ids: Vec<u64> = c
            .query(
                "SELECT id FROM information_schema.PROCESSLIST
                 WHERE id <> CONNECTION_ID() AND command <> 'Daemon' AND db = DATABASE()",
            )
            .unwrap();
        let mut killed = 0;
        for id in ids {
            if c.query_drop(format!("KILL CONNECTION {id}")).is_ok() {
                killed += 1;
            }
        }
        killed
    }

    fn private_server() -> TempMariaDb {
        TempMariaDb::start().unwrap()
    }

    fn server_url(server: &TempMariaDb) -> String {
        server.url()
    }

    fn stop(server: &mut TempMariaDb) {
        server.stop_server().unwrap();
    }

    fn restart(server: &mut TempMariaDb) {
        server.start_server().unwrap();
    }
}
