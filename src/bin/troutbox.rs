//! `troutbox`: operate an outbox table from the shell (cargo feature `cli`).
//!
//! ```text
//! troutbox --database-url "host=localhost user=app dbname=app" status
//! troutbox dead list --limit 20
//! troutbox dead requeue 17 18        # or --all
//! troutbox dead purge --older-than 30d
//! troutbox blocked                   # per-key ordering: keys waiting on a failed message
//! troutbox skip 17                   # give up on message 17 (dead, reason "skipped")
//! troutbox relay --config relay.toml  # the relay service (docs/relay-service.md)
//! troutbox --database-url mysql://app@db/app dead list   # MariaDB (feature mariadb)
//! ```

// In a folder of its own so that cargo does not take it for a second binary.
#[path = "troutbox/relay.rs"]
mod relay;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};
use serde::Serialize;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use troutbox::{Backlog, BlockedKey, DeadMessage, DeadSummary, Outbox, PgStore, Retention};

#[derive(Parser)]
#[command(
    name = "troutbox",
    version,
    about = "Operate a troutbox outbox table in PostgreSQL (or MariaDB): create it, see what waits, run partition maintenance, inspect and re-queue dead messages.",
    after_help = "The connection string is a libpq key=value string or a postgresql:// URL; a mysql:// URL for MariaDB (feature mariadb: migrate, status, dead). Durations are like 30s, 15m, 12h, 7d."
)]
struct Cli {
    /// PostgreSQL connection string. Prefer the DATABASE_URL environment variable (or a
    /// passfile, see libpq's PGPASSFILE): a password given on the command line shows in
    /// `ps` to every user of the machine.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,

    /// Schema of the outbox table.
    #[arg(long, default_value = troutbox::DEFAULT_SCHEMA, global = true)]
    schema: String,

    /// Name of the outbox table.
    #[arg(long, default_value = troutbox::DEFAULT_TABLE, global = true)]
    table: String,

    // The retention options are given before the command, and only here: they concern
    // `migrate` and `maintain`, so the other commands' help does not list them.
    /// The table keeps sent messages this long, in partitions (Retention::keep_sent). Give it
    /// before `migrate` to create such a table; `maintain` reads it from the table when it is
    /// not given, and refuses a value other than the table's. Other commands ignore it.
    #[arg(long, value_parser = humantime::parse_duration)]
    keep_sent: Option<Duration>,

    /// Width of one partition, with --keep-sent (migrate).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1d")]
    partition_interval: Duration,

    /// Partitions kept ready beyond the current one, with --keep-sent (migrate, maintain).
    #[arg(long, default_value_t = troutbox::DEFAULT_PARTITIONS_AHEAD)]
    partitions_ahead: u32,

    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the schema and the outbox table, or bring them up to date. Safe to repeat.
    Migrate {
        /// Make the table ordered (per-key ordering; see the README's "Ordering"): creates
        /// its index and records the mode, which every producer and relay must then share.
        #[arg(long)]
        per_key_ordering: bool,
    },
    /// Count pending, dead and retained sent messages, and show the age of the oldest pending
    /// one. With thresholds, a health check: exit status 3 when one is exceeded.
    Status {
        /// Unhealthy above this many pending messages.
        #[arg(long)]
        max_pending: Option<i64>,
        /// Unhealthy above this many dead messages.
        #[arg(long)]
        max_dead: Option<i64>,
        /// Unhealthy when the oldest pending message is older than this (like 5m).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Option<Duration>,
    },
    /// Run partition maintenance once (tables created with --keep-sent): create partitions
    /// ahead, move rows out of the DEFAULT partition, drop expired partitions that hold
    /// nothing but sent messages.
    Maintain,
    /// Look at, re-queue or purge dead messages (those that used up their retries).
    #[command(subcommand)]
    Dead(Dead),
    /// List blocked keys (per-key ordering): keys whose oldest pending message has failed,
    /// holding back the key's later messages, with that message and its last error.
    Blocked {
        /// How many to show, at most 1,000.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Give up on a pending message: it becomes dead with the reason "skipped", which
    /// unblocks its key (per-key ordering). Refused while a relay is sending it.
    Skip {
        /// Id of the message.
        id: i64,
    },
    /// Run the relay service: relay the sources of a configuration file to its sink until
    /// SIGTERM or SIGINT (docs/relay-service.md). Ignores the other options: everything is
    /// in the file, secrets by environment variable or file.
    Relay {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// How log lines (standard error) look: one line per event.
        #[arg(long, value_enum, default_value = "text")]
        log_format: relay::LogFormat,
    },
}

#[derive(Subcommand)]
enum Dead {
    /// Show one dead message whole: value (as text when it is UTF-8, else hex), headers and
    /// the full last error.
    Show {
        /// Its id.
        id: i64,
    },
    /// List dead messages, newest first, with attempts and last error.
    List {
        /// How many to show, at most 1,000.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Show only messages with an id below this one (the next page).
        #[arg(long)]
        before: Option<i64>,
    },
    /// Put dead messages back in the queue; they are retried from scratch.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Requeue {
        /// Ids of the dead messages to re-queue.
        ids: Vec<i64>,
        /// Re-queue every dead message.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead messages for good. Never touches pending or sent messages.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "older_than"])))]
    Purge {
        /// Ids of the dead messages to delete.
        ids: Vec<i64>,
        /// Delete the messages that died longer ago than this.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
    },
}

/// Exit statuses: 0 done (and healthy), 1 an error, 2 a usage error (from clap), 3 `status`
/// found a threshold exceeded.
const UNHEALTHY: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Relay { config, log_format } = &cli.command {
        return relay::main(config, *log_format);
    }
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(UNHEALTHY),
        Err(e) => {
            // The library's hint names the Rust call; an operator at this prompt runs the
            // command.
            let e: Box<dyn std::error::Error> = match e.downcast_ref::<troutbox::Error>() {
                Some(troutbox::Error::NotMigrated { table, .. }) => format!(
                    "outbox table {table} is missing or not migrated: run `troutbox migrate` first (with the same --schema and --table)"
                )
                .into(),
                _ => e,
            };
            if cli.json {
                eprintln!("{}", json!({ "error": e.to_string() }));
            } else {
                eprintln!("troutbox: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Runs the command; `Ok(false)` when `status` found a threshold exceeded.
fn run(cli: &Cli) -> Result<bool> {
    let url = cli
        .database_url
        .as_deref()
        .ok_or("no database: set DATABASE_URL (or give --database-url)")?;
    // A MariaDB URL (feature `mariadb`): the commands MariaDB has.
    if let Some(rest) = url
        .strip_prefix("mysql://")
        .or_else(|| url.strip_prefix("mariadb://"))
    {
        return run_mariadb(cli, &format!("mysql://{rest}"));
    }
    let config: postgres::Config = url
        .parse()
        .map_err(|e| format!("invalid --database-url: {e}"))?;
    // troutbox::pool connects once first: a refusal is reported at once, in the server's
    // words (authentication failed, database does not exist, connection refused).
    let pool =
        troutbox::pool(config, 2).map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    let retention = match cli.keep_sent {
        Some(window) => Retention::keep_sent(window)
            .partition_interval(cli.partition_interval)
            .partitions_ahead(cli.partitions_ahead),
        None => Retention::delete_on_send(),
    };
    let store = PgStore::new(pool)
        .schema(&cli.schema)
        .table(&cli.table)
        .retention(retention);
    store.validate()?;
    let table = store.qualified_table();
    match &cli.command {
        Command::Migrate { per_key_ordering } => {
            let existed: bool = store
                .pool()
                .get()?
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])?
                .get(0);
            if *per_key_ordering {
                Outbox::builder(store.clone())
                    .per_key_ordering(true)
                    .build()?
                    .migrate()?;
            } else {
                store.migrate()?;
            }
            print(
                cli,
                &json!({"migrated": table, "created": !existed}),
                if existed {
                    format!("{table} is up to date")
                } else {
                    format!("created {table}")
                },
            )?;
        }
        Command::Status {
            max_pending,
            max_dead,
            max_age,
        } => return status(cli, &store, &table, *max_pending, *max_dead, *max_age),
        Command::Maintain => {
            // Without --keep-sent, the retention recorded with the table; with it, the
            // library refuses settings that differ from the table's.
            let store = if cli.keep_sent.is_none() {
                let recorded = store.recorded_retention()?;
                if recorded.keep_window().is_none() {
                    return Err(format!(
                        "{table} deletes messages on send: there is no partition to maintain"
                    )
                    .into());
                }
                store
                    .clone()
                    .retention(recorded.partitions_ahead(cli.partitions_ahead))
            } else {
                store.clone()
            };
            let r = store.run_maintenance_once()?;
            print(
                cli,
                &r,
                if r.locked_out {
                    "another instance is maintaining this table right now; nothing done".into()
                } else {
                    table_text(&[
                        ("created", list(&r.created)),
                        ("dropped", list(&r.dropped)),
                        (
                            "kept (expired, unsent rows)",
                            list(
                                &r.kept
                                    .iter()
                                    .map(|(n, c)| format!("{n}: {c}"))
                                    .collect::<Vec<_>>(),
                            ),
                        ),
                        ("deferred (table busy; next run)", list(&r.deferred)),
                    ])
                },
            )?;
        }
        Command::Dead(command) => dead(cli, &store, command)?,
        Command::Blocked { limit } => {
            let blocked = store.blocked_keys(*limit as usize)?;
            print(cli, &blocked, blocked_table(&blocked))?;
        }
        Command::Skip { id } => {
            if !store.skip_message(*id)? {
                return Err(format!(
                    "message {id} is not pending, or a relay is sending it right now (try again in a moment)"
                )
                .into());
            }
            print(
                cli,
                &json!({"skipped": id}),
                format!("message {id} skipped: it is dead with the reason \"skipped\""),
            )?;
        }
        // Run by `main` before the database options are read.
        Command::Relay { .. } => unreachable!("handled in main"),
    }
    Ok(true)
}

/// The commands on a MariaDB table: migrate, status, dead letters. Its database is the
/// URL's (`--schema` does not apply); it deletes what it sends (no `--keep-sent`, nothing to
/// maintain).
#[cfg(feature = "mariadb")]
fn run_mariadb(cli: &Cli, url: &str) -> Result<bool> {
    use troutbox::mariadb::{MariaDbOutbox, MariaDbStore};
    if cli.keep_sent.is_some() {
        return Err(
            "--keep-sent: MariaDB tables delete what they send; they have no partitions".into(),
        );
    }
    if cli.schema != troutbox::DEFAULT_SCHEMA {
        return Err("--schema: on MariaDB the table lives in the URL's database (mysql://user@host/database)".into());
    }
    let pool =
        troutbox::mariadb::pool(url, 2).map_err(|e| format!("cannot connect to MariaDB: {e}"))?;
    let store = MariaDbStore::new(pool).table(&cli.table);
    store.validate()?;
    let table = cli.table.clone();
    match &cli.command {
        Command::Migrate { per_key_ordering } => {
            if *per_key_ordering {
                MariaDbOutbox::builder(store.clone())
                    .per_key_ordering(true)
                    .build()?
                    .migrate()?;
            } else {
                store.migrate()?;
            }
            print(
                cli,
                &json!({ "migrated": table }),
                format!("{table} is up to date"),
            )?;
        }
        Command::Status {
            max_pending,
            max_dead,
            max_age,
        } => return status(cli, &store, &table, *max_pending, *max_dead, *max_age),
        Command::Dead(command) => dead(cli, &store, command)?,
        Command::Maintain | Command::Blocked { .. } | Command::Skip { .. } => {
            return Err(
                "this command is not available on MariaDB yet (see docs/backends.md)".into(),
            )
        }
        // Run by `main` before the database options are read.
        Command::Relay { .. } => unreachable!("handled in main"),
    }
    Ok(true)
}

/// Without the `mariadb` feature: say how to get it.
#[cfg(not(feature = "mariadb"))]
fn run_mariadb(_cli: &Cli, _url: &str) -> Result<bool> {
    Err("a MariaDB URL, but this troutbox was built without the `mariadb` feature: cargo install --path . --features cli,mariadb".into())
}

/// What `status` and `dead` need of a store, whatever its backend.
trait Admin {
    fn backlog(&self) -> std::result::Result<Backlog, troutbox::Error>;
    fn dead_message(&self, id: i64) -> std::result::Result<Option<DeadMessage>, troutbox::Error>;
    fn dead_summaries(
        &self,
        limit: u32,
        before: Option<i64>,
    ) -> std::result::Result<Vec<DeadSummary>, troutbox::Error>;
    fn requeue_dead(&self, ids: &[i64]) -> std::result::Result<u64, troutbox::Error>;
    fn requeue_all_dead(&self) -> std::result::Result<u64, troutbox::Error>;
    fn purge_dead(&self, ids: &[i64]) -> std::result::Result<u64, troutbox::Error>;
    fn purge_dead_before(
        &self,
        before: OffsetDateTime,
    ) -> std::result::Result<u64, troutbox::Error>;
}

/// [`Admin`] for a store type with those methods.
macro_rules! admin {
    ($store:ty) => {
        impl Admin for $store {
            fn backlog(&self) -> std::result::Result<Backlog, troutbox::Error> {
                <$store>::backlog(self)
            }
            fn dead_message(
                &self,
                id: i64,
            ) -> std::result::Result<Option<DeadMessage>, troutbox::Error> {
                <$store>::dead_message(self, id)
            }
            fn dead_summaries(
                &self,
                limit: u32,
                before: Option<i64>,
            ) -> std::result::Result<Vec<DeadSummary>, troutbox::Error> {
                <$store>::dead_summaries(self, limit, before)
            }
            fn requeue_dead(&self, ids: &[i64]) -> std::result::Result<u64, troutbox::Error> {
                <$store>::requeue_dead(self, ids)
            }
            fn requeue_all_dead(&self) -> std::result::Result<u64, troutbox::Error> {
                <$store>::requeue_all_dead(self)
            }
            fn purge_dead(&self, ids: &[i64]) -> std::result::Result<u64, troutbox::Error> {
                <$store>::purge_dead(self, ids)
            }
            fn purge_dead_before(
                &self,
                before: OffsetDateTime,
            ) -> std::result::Result<u64, troutbox::Error> {
                <$store>::purge_dead_before(self, before)
            }
        }
    };
}

admin!(PgStore);
#[cfg(feature = "mariadb")]
admin!(troutbox::mariadb::MariaDbStore);

/// `status`: the backlog, and with thresholds a health check (`Ok(false)`: exceeded).
fn status(
    cli: &Cli,
    store: &dyn Admin,
    table: &str,
    max_pending: Option<i64>,
    max_dead: Option<i64>,
    max_age: Option<Duration>,
) -> Result<bool> {
    let table = table.to_owned();
    let b = store.backlog()?;
    let age = b.oldest_pending.map(age_secs);
    let mut exceeded = Vec::new();
    if max_pending.is_some_and(|max| b.pending > max) {
        exceeded.push("pending");
    }
    if max_dead.is_some_and(|max| b.dead > max) {
        exceeded.push("dead");
    }
    if let (Some(max), Some(age)) = (max_age, age) {
        if age > max.as_secs_f64() {
            exceeded.push("age");
        }
    }
    print(
        cli,
        &StatusReport {
            table: &table,
            backlog: &b,
            oldest_pending_age_seconds: age,
            healthy: exceeded.is_empty(),
            exceeded: &exceeded,
        },
        table_text(&[
            ("table", table.clone()),
            ("pending", b.pending.to_string()),
            ("dead", b.dead.to_string()),
            ("sent (retained)", b.sent.to_string()),
            (
                "oldest pending",
                match (b.oldest_pending, age) {
                    (Some(t), Some(age)) => format!("{} ({age:.0} s ago)", rfc3339(t)),
                    _ => "-".into(),
                },
            ),
            (
                "health",
                if exceeded.is_empty() {
                    "ok".into()
                } else {
                    format!("over the threshold: {}", exceeded.join(", "))
                },
            ),
        ]),
    )?;
    Ok(exceeded.is_empty())
}

/// `dead show | list | requeue | purge`.
fn dead(cli: &Cli, store: &dyn Admin, command: &Dead) -> Result<()> {
    match command {
        Dead::Show { id } => {
            let Some(d) = store.dead_message(*id)? else {
                return Err(format!("no dead message with id {id}").into());
            };
            let value = d.message.value();
            let text = std::str::from_utf8(value).ok();
            let headers: Vec<String> = d
                .message
                .headers()
                .iter()
                .map(|(n, v)| format!("{}: {}", escape_controls(n), escape_controls(v)))
                .collect();
            print(
                cli,
                &d,
                table_text(&[
                    ("id", d.message.id().to_string()),
                    ("key", escape_controls(d.message.key())),
                    ("attempts", d.message.attempts().to_string()),
                    ("created at", rfc3339(d.message.created_at())),
                    ("died at", rfc3339(d.died_at)),
                    ("headers", list(&headers)),
                    (
                        "value",
                        match text {
                            Some(t) => escape_controls(t),
                            None => format!(
                                "(not UTF-8, hex) {}",
                                value.iter().map(|b| format!("{b:02x}")).collect::<String>()
                            ),
                        },
                    ),
                    (
                        "last error",
                        escape_controls(d.last_error.as_deref().unwrap_or("-")),
                    ),
                ]),
            )?;
        }
        Dead::List { limit, before } => {
            // Summaries: the values are never fetched, only their length.
            let dead = store.dead_summaries(*limit, *before)?;
            print(cli, &dead, dead_table(&dead))?;
        }
        Dead::Requeue { ids, all } => {
            let n = if *all {
                store.requeue_all_dead()?
            } else {
                store.requeue_dead(ids)?
            };
            print(
                cli,
                &json!({"requeued": n}),
                format!("re-queued {n} dead message(s)"),
            )?;
        }
        Dead::Purge { ids, older_than } => {
            let n = match older_than {
                Some(age) => {
                    let age =
                        time::Duration::try_from(*age).map_err(|_| "--older-than is too large")?;
                    let before = OffsetDateTime::now_utc()
                        .checked_sub(age)
                        .ok_or("--older-than reaches before the year -9999")?;
                    store.purge_dead_before(before)?
                }
                None => store.purge_dead(ids)?,
            };
            print(
                cli,
                &json!({"purged": n}),
                format!("purged {n} dead message(s)"),
            )?;
        }
    }
    Ok(())
}

/// Prints `json` (one line) with `--json`, else `text`. The library's types print as their
/// `Serialize` impls (feature `serde`) have them: times in RFC 3339, durations in seconds.
fn print(cli: &Cli, json: &impl Serialize, text: String) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string(json)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

/// `status --json`: the backlog (`pending`, `dead`, `sent`, `oldest_pending`) with the
/// table, the oldest pending message's age and the thresholds' verdict.
#[derive(Serialize)]
struct StatusReport<'a> {
    table: &'a str,
    #[serde(flatten)]
    backlog: &'a Backlog,
    oldest_pending_age_seconds: Option<f64>,
    healthy: bool,
    exceeded: &'a [&'a str],
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn age_secs(t: OffsetDateTime) -> f64 {
    (OffsetDateTime::now_utc() - t).as_seconds_f64().max(0.0)
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// Two columns, the first padded to the widest label.
fn table_text(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:<width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One line per blocked key.
fn blocked_table(blocked: &[BlockedKey]) -> String {
    if blocked.is_empty() {
        return "no blocked keys".into();
    }
    let rows = blocked
        .iter()
        .map(|b| {
            vec![
                short(&b.key, 30),
                b.head_id.to_string(),
                b.attempts.to_string(),
                b.waiting.to_string(),
                format!("{:.0} s", b.blocked_for.as_secs_f64()),
                short(b.last_error.as_deref().unwrap_or("-"), 60),
            ]
        })
        .collect();
    grid(
        &["KEY", "HEAD ID", "ATTEMPTS", "WAITING", "FOR", "LAST ERROR"],
        rows,
    )
}

/// One line per dead message.
fn dead_table(dead: &[DeadSummary]) -> String {
    if dead.is_empty() {
        return "no dead messages".into();
    }
    let rows = dead
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                short(&d.key, 30),
                d.attempts.to_string(),
                rfc3339(d.died_at),
                short(d.last_error.as_deref().unwrap_or("-"), 60),
            ]
        })
        .collect();
    grid(&["ID", "KEY", "ATTEMPTS", "DIED AT", "LAST ERROR"], rows)
}

/// `s` on one line, cut to `n` characters.
fn short(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    escape_controls(&out)
}

/// Control characters (a newline, an escape sequence that would drive the terminal) as
/// Rust escapes: a key or an error text written by anyone cannot forge table lines or
/// take over the operator's terminal.
fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Rows under a header, columns aligned.
fn grid(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    std::iter::once(line(header.to_vec()))
        .chain(
            rows.iter()
                .map(|r| line(r.iter().map(String::as_str).collect())),
        )
        .collect::<Vec<_>>()
        .join("\n")
}
