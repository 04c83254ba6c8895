//! A mixed-case schema and table end to end, against a real server: created by the
//! `troutbox` command line with `--schema` and `--table`, relayed with keep-sent retention
//! (sent, retried, dead), the dead message re-queued and purged and the partitions
//! maintained from the command line, and the catalog holding exactly those names, with no
//! lower-case twin anywhere.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cli::{names, Cli};
use common::{count, eventually, partitions, pool, PATIENCE};
use troutbox::{Batch, PgPool, PgStore, Retention};

const SCHEMA: &str = "Mixed_Case";
const TABLE: &str = "Orders_Outbox";
/// The table as SQL names it.
const QUALIFIED: &str = "\"Mixed_Case\".\"Orders_Outbox\"";

/// The command line on the mixed-case table, with keep-sent retention.
const CLI: Cli = Cli::new(SCHEMA).options(&[
    "--table",
    TABLE,
    "--keep-sent",
    "7d",
    "--partitions-ahead",
    "2",
]);

/// Names of the relations (tables, indexes) of the schema, sorted.
fn relations(pool: &PgPool) -> Vec<String> {
    pool.get()
        .unwrap()
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 ORDER BY 1",
            &[&SCHEMA],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The catalog holds the schema and every object under their exact names: no lower-case
/// twin of the schema, no relation of the server named after the lower-cased table, every
/// relation of the schema named after the table or one of troutbox's two own tables, and
/// the migrations and modes recorded under the exact table name.
fn assert_exact_names(pool: &PgPool) {
    let schemas: Vec<String> = pool
        .get()
        .unwrap()
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE lower(nspname) = lower($1)",
            &[&SCHEMA],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(schemas, [SCHEMA]);
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM pg_class WHERE relname::text LIKE 'orders\\_outbox%'"
        ),
        0,
        "a lower-case twin of the table or one of its objects"
    );
    let relations = relations(pool);
    let strays: Vec<&String> = relations
        .iter()
        .filter(|r| !r.starts_with(TABLE) && !r.starts_with("troutbox_"))
        .collect();
    assert!(strays.is_empty(), "{strays:?} in {relations:?}");
    for own in [
        TABLE.to_string(),
        format!("{TABLE}_default"),
        format!("{TABLE}_claims"),
        format!("{TABLE}_charges"),
        format!("{TABLE}_pending_idx"),
        format!("{TABLE}_dead_idx"),
    ] {
        assert!(relations.contains(&own), "{own} missing from {relations:?}");
    }
    let recorded = |sql: &str| -> Vec<String> {
        pool.get()
            .unwrap()
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(
        recorded("SELECT DISTINCT table_name FROM \"Mixed_Case\".troutbox_migrations"),
        [TABLE]
    );
    assert_eq!(
        recorded("SELECT table_name FROM \"Mixed_Case\".troutbox_tables"),
        [TABLE]
    );
}

#[test]
fn mixed_case_names_through_keep_sent_maintenance_and_the_command_line() {
    let pool = pool(6);
    pool.get()
        .unwrap()
        .batch_execute("DROP SCHEMA IF EXISTS \"Mixed_Case\" CASCADE; DROP SCHEMA IF EXISTS mixed_case CASCADE")
        .unwrap();

    // Created from the command line: the keep-sent table, DEFAULT and 3 partitions.
    assert_eq!(CLI.json(&["migrate"])["migrated"], QUALIFIED);
    let after_migrate = partitions(&pool, SCHEMA, TABLE);
    assert_eq!(after_migrate.len(), 1 + 3, "{after_migrate:?}");
    assert!(after_migrate
        .iter()
        .all(|p| p == &format!("{TABLE}_default") || p.starts_with(&format!("{TABLE}_p"))));
    assert_exact_names(&pool);

    // Relayed by the library: "ok" sent, "flaky" sent after a retry, "doomed" dead.
    let store = PgStore::new(pool.clone())
        .schema(SCHEMA)
        .table(TABLE)
        .retention(Retention::keep_sent(Duration::from_secs(7 * 86_400)).partitions_ahead(2));
    let outbox = common::fast_outbox(&store).max_retries(1).build().unwrap();
    let mut conn = pool.get().unwrap();
    for key in ["ok", "flaky", "doomed"] {
        outbox.add_message(&mut *conn, key, b"v").unwrap();
    }
    let sent = Arc::new(Mutex::new(Vec::new()));
    let s = sent.clone();
    let mut handle = outbox
        .start(move |batch: &mut Batch| -> Result<(), String> {
            for m in batch.iter_mut() {
                match (m.key(), m.attempts()) {
                    ("flaky", 0) | ("doomed", _) => m.mark_failed("no route"),
                    _ => {
                        s.lock().unwrap().push(m.key().to_string());
                        m.mark_sent();
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(eventually(PATIENCE, || {
        let b = store.backlog().unwrap();
        (b.pending, b.dead, b.sent) == (0, 1, 2)
    }));
    handle.shutdown().unwrap();
    let mut sent = sent.lock().unwrap().clone();
    sent.sort();
    assert_eq!(sent, ["flaky", "ok"]);
    let rows = |filter: &str| {
        count(
            &pool,
            &format!("SELECT count(*) FROM {QUALIFIED} WHERE {filter}"),
        )
    };
    assert_eq!(rows("state = 'sent' AND sent_at IS NOT NULL"), 2);
    assert_eq!(
        rows("key = 'doomed' AND state = 'dead' AND attempts = 2"),
        1
    );

    // The command line sees the same rows.
    let status = CLI.json(&["status"]);
    assert_eq!(status["table"], QUALIFIED);
    assert_eq!(
        (&status["pending"], &status["dead"], &status["sent"]),
        (&0.into(), &1.into(), &2.into()),
        "{status}"
    );
    let dead = CLI.json(&["dead", "list"]);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (
            &dead[0]["key"],
            &dead[0]["attempts"],
            &dead[0]["last_error"]
        ),
        (&"doomed".into(), &2.into(), &"no route".into())
    );
    let doomed = dead[0]["id"].as_i64().unwrap();

    // Re-queued, then (dead again) purged from the command line.
    assert_eq!(
        CLI.json(&["dead", "requeue", &doomed.to_string()])["requeued"],
        1
    );
    assert_eq!(
        rows(&format!(
            "id = {doomed} AND state = 'pending' AND attempts = 0"
        )),
        1
    );
    conn.execute(
        &format!("UPDATE {QUALIFIED} SET state = 'dead' WHERE id = $1"),
        &[&doomed],
    )
    .unwrap();
    assert_eq!(
        CLI.json(&["dead", "purge", &doomed.to_string()])["purged"],
        1
    );
    assert_eq!(rows(&format!("id = {doomed}")), 0);
    assert_eq!(rows("state = 'sent'"), 2, "purge touches dead rows only");

    // Keep-sent maintenance from the command line: the sent rows are made 30 days old (they
    // move to DEFAULT) and the furthest partition ahead is dropped. The first run recreates
    // it and creates the old rows' partition, moving them there; the next drops that
    // expired partition, which holds only sent rows.
    let furthest = after_migrate
        .iter()
        .filter(|p| **p != format!("{TABLE}_default"))
        .max()
        .unwrap()
        .clone();
    conn.batch_execute(&format!(
        "UPDATE {QUALIFIED} SET created_at = now() - interval '30 days' WHERE state = 'sent';
         DROP TABLE \"{SCHEMA}\".\"{furthest}\""
    ))
    .unwrap();
    let old_slot: i64 = count(
        &pool,
        &format!(
            "SELECT DISTINCT (floor(extract(epoch FROM created_at) / 86400) * 86400)::int8 \
             FROM {QUALIFIED} WHERE state = 'sent'"
        ),
    );
    let old_partition = format!("{TABLE}_p{old_slot}");
    let in_default = || {
        count(
            &pool,
            &format!("SELECT count(*) FROM \"{SCHEMA}\".\"{TABLE}_default\""),
        )
    };
    assert_eq!(in_default(), 2);
    let report = CLI.json(&["maintain"]);
    assert_eq!(report["locked_out"], false);
    let created = names(&report["created"]);
    assert!(
        created.contains(&furthest) && created.contains(&old_partition),
        "{report}"
    );
    assert_eq!(in_default(), 0, "moved out of DEFAULT");
    assert!(partitions(&pool, SCHEMA, TABLE).contains(&old_partition));
    let report = CLI.json(&["maintain"]);
    assert_eq!(
        names(&report["dropped"]),
        std::slice::from_ref(&old_partition),
        "{report}"
    );
    assert!(!partitions(&pool, SCHEMA, TABLE).contains(&old_partition));
    assert_eq!(
        rows("true"),
        0,
        "the expired sent rows went with their partition"
    );
    // The library agrees: nothing left to do.
    let report = store.run_maintenance_once().unwrap();
    assert!(
        report.created.is_empty() && report.dropped.is_empty() && !report.locked_out,
        "{report:?}"
    );
    assert_exact_names(&pool);
}
