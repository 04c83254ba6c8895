//! The versioned schema of a MariaDB outbox table: the table and its indexes, the claim
//! journal and the charges, the per-key locks of ordered producers, and the database's
//! tables of versions and of modes.
//!
//! MariaDB commits every DDL statement on its own, so a migration is not one transaction:
//! each step is idempotent (`IF NOT EXISTS`), its version is recorded after it, and a
//! migration cut short is completed by the next one. Concurrent migrations are serialized
//! by a named lock (`GET_LOCK`), which is session-scoped: it is taken on a connection of
//! its own, opened for the migration and closed after it, so it can never stay held by a
//! pooled connection.

use super::Names;

/// The schema version this build creates and expects on MariaDB.
pub(crate) const SCHEMA_VERSION: i32 = 1;

/// Buckets of the per-key locks (see [`ProduceSql`](super::produce::ProduceSql)): keys
/// are hashed (`CRC32`) into this many rows, one row lock each.
pub(crate) const KEY_LOCK_BUCKETS: u32 = 1024;

/// How long a migration waits for another one to finish, in seconds.
pub(crate) const MIGRATION_LOCK_WAIT_SECS: u32 = 60;

#[derive(Debug)]
pub(crate) struct MigrationSql {
    /// Takes the migration lock (returns 1 when taken).
    pub(crate) lock: String,
    pub(crate) create_migrations: String,
    pub(crate) create_tables: String,
    pub(crate) current_version: String,
    pub(crate) record_version: String,
    /// Version 1, statement by statement (each idempotent).
    pub(crate) v1: Vec<String>,
    /// This table's row in the table of modes, unordered until an ordered outbox migrates.
    pub(crate) register: String,
    pub(crate) mode: String,
    pub(crate) set_ordered: String,
    pub(crate) outbox_id: String,
}

impl MigrationSql {
    pub(crate) fn new(n: &Names) -> MigrationSql {
        let (t, m, tables) = (&n.table, &n.migrations, &n.tables);
        let buckets: Vec<String> = (0..KEY_LOCK_BUCKETS).map(|b| format!("({b})")).collect();
        MigrationSql {
            // The lock's name is server-wide: it names the database and the table.
            lock: format!(
                "SELECT GET_LOCK(CONCAT('troutbox_migrate.', DATABASE(), '.', '{}'), {MIGRATION_LOCK_WAIT_SECS})",
                n.plain
            ),
            create_migrations: format!(
                "CREATE TABLE IF NOT EXISTS {m} (
                    table_name VARCHAR(64) NOT NULL,
                    version INT NOT NULL,
                    applied_at DATETIME(6) NOT NULL,
                    PRIMARY KEY (table_name, version)) ENGINE=InnoDB"
            ),
            create_tables: format!(
                "CREATE TABLE IF NOT EXISTS {tables} (
                    table_name VARCHAR(64) NOT NULL PRIMARY KEY,
                    per_key_ordering BOOLEAN NOT NULL,
                    outbox_id CHAR(36) NOT NULL,
                    changed_at DATETIME(6) NOT NULL) ENGINE=InnoDB"
            ),
            current_version: format!(
                "SELECT COALESCE(MAX(version), 0) FROM {m} WHERE table_name = ?"
            ),
            record_version: format!(
                "INSERT IGNORE INTO {m} (table_name, version, applied_at) VALUES (?, ?, UTC_TIMESTAMP(6))"
            ),
            v1: vec![
                // The key is bytes (`VARBINARY`): compared byte by byte, as PostgreSQL's
                // "C" collation, and indexable whole (1,024 bytes, troutbox's limit). The
                // headers are `name NUL value NUL` pairs (NUL is refused in both). Times
                // are UTC, written by the server (`UTC_TIMESTAMP(6)`), never the session's
                // time zone. `state` has no 'sent': MariaDB tables delete what they send.
                //
                // The pending index leads with `state`, then `available_at`: a claim reads
                // due rows in order and stops at the first that is not due. The key index
                // gives each key's head (lowest pending id) by a loose index scan.
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                        id BIGINT NOT NULL AUTO_INCREMENT,
                        `key` VARBINARY(1024) NOT NULL,
                        value LONGBLOB NOT NULL,
                        headers MEDIUMBLOB NOT NULL,
                        created_at DATETIME(6) NOT NULL,
                        attempts INT NOT NULL DEFAULT 0,
                        available_at DATETIME(6) NOT NULL,
                        state ENUM('pending', 'dead') NOT NULL DEFAULT 'pending',
                        last_error TEXT NULL,
                        PRIMARY KEY (id),
                        KEY {pending} (state, available_at, id),
                        KEY {key} (state, `key`, id)
                    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
                    pending = n.pending_idx,
                    key = n.key_idx,
                ),
                // The claim journal: one row per claim whose Sender runs (while the relay
                // journals), its ids as ranges (`1-100,105`). Markers have negative ids.
                format!(
                    "CREATE TABLE IF NOT EXISTS {} (
                        claim_id INT NOT NULL PRIMARY KEY,
                        ids MEDIUMTEXT NOT NULL,
                        claimed_at DATETIME(6) NOT NULL) ENGINE=InnoDB",
                    n.journal
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {} (
                        msg_id BIGINT NOT NULL,
                        claim_id INT NOT NULL,
                        abandoned_at DATETIME(6) NOT NULL,
                        KEY (msg_id)) ENGINE=InnoDB",
                    n.charges
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {} (bucket INT NOT NULL PRIMARY KEY) ENGINE=InnoDB",
                    n.key_locks
                ),
                format!(
                    "INSERT IGNORE INTO {} (bucket) VALUES {}",
                    n.key_locks,
                    buckets.join(",")
                ),
            ],
            register: format!(
                "INSERT IGNORE INTO {tables} (table_name, per_key_ordering, outbox_id, changed_at)
                 VALUES (?, FALSE, UUID(), UTC_TIMESTAMP(6))"
            ),
            mode: format!("SELECT per_key_ordering FROM {tables} WHERE table_name = ?"),
            set_ordered: format!(
                "UPDATE {tables} SET per_key_ordering = TRUE, changed_at = UTC_TIMESTAMP(6)
                 WHERE table_name = ?"
            ),
            outbox_id: format!("SELECT outbox_id FROM {tables} WHERE table_name = ?"),
        }
    }
}
