//! The claim protocol's statements on MariaDB (the policy is in `store::protocol`, the
//! primitives that run these in `store::mariadb::claims`).
//!
//! How MariaDB gives the protocol what it needs:
//! - **The running mark** is a named lock (`GET_LOCK`) on the claim id, taken in the
//!   round trip that opens the claim transaction and released in the one that commits it.
//!   MariaDB's named locks are session-scoped, not transaction-scoped: every path that ends
//!   the transaction releases it explicitly (commit, rollback), and a session that ends
//!   (killed relay, lost connection, the server's idle timeout) releases it with itself.
//!   A journal row whose lock is free is a claim that ended without a settlement.
//! - **The claim** is a `SELECT ... FOR UPDATE SKIP LOCKED` in `READ COMMITTED` (no gap or
//!   next-key locks: producers' INSERTs are never blocked by a claim), through the pending
//!   index in order. The rows stay in the table, locked, while the Sender runs; the
//!   settlement deletes the sent ones in the round trip of its COMMIT. A rollback leaves
//!   them exactly as they were.
//! - **The bound** on a claim transaction is the server's `idle_transaction_timeout`
//!   (whole seconds, the send timeout rounded up): the server ends the session of a claim
//!   idle that long, which rolls it back and frees its lock.

use super::{id_list, text_literal, Names};

/// Which rows a claim statement takes (see `store::protocol::Take`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimKind {
    Head,
    /// Past a position: parameters `(available_at, available_at, id)`.
    AfterMark,
    /// One message: parameter `id`.
    One,
}

/// The columns of a claimed row, in the order `store::mariadb::decode` reads them: the
/// message, its position, the abandoned claims it is charged for (`1,5`, NULL for none),
/// its size (values plus headers) for a claim bounded in bytes, and whether it is due (for
/// the followers of an ordered claim).
fn columns(charges: &str) -> String {
    format!(
        "m.id, m.`key`, m.value, m.headers, m.created_at, m.attempts, m.available_at,
         (SELECT GROUP_CONCAT(c.claim_id) FROM {charges} AS c WHERE c.msg_id = m.id),
         LENGTH(m.value) + LENGTH(m.headers),
         m.available_at <= UTC_TIMESTAMP(6)"
    )
}

#[derive(Debug)]
pub(crate) struct ClaimSql {
    table: String,
    pending_idx: String,
    key_idx: String,
    journal: String,
    charges: String,
    /// The prefix of every claim lock of this table: server-wide names, so the table's
    /// identity is in them (`tbx.<outbox id>.`).
    lock_prefix: String,
    pub(crate) journal_insert: String,
    pub(crate) journal_take: String,
    pub(crate) journal_delete: String,
    pub(crate) charges_forget_claim: String,
    pub(crate) marker: String,
    pub(crate) abandoned: String,
    pub(crate) markers: String,
    pub(crate) markers_expire: String,
    pub(crate) charges_cleanup: String,
    pub(crate) lock_pending_one: String,
    pub(crate) set_aside: String,
}

impl ClaimSql {
    /// The statements of one table whose identity is `outbox_id`.
    pub(crate) fn new(n: &Names, outbox_id: &str) -> ClaimSql {
        let (t, j, c) = (&n.table, &n.journal, &n.charges);
        let id: String = outbox_id.chars().filter(char::is_ascii_hexdigit).collect();
        let lock_prefix = format!("tbx.{id}.");
        ClaimSql {
            // Before the Sender runs, on the second connection, in autocommit: only while
            // the claim is provably held (its lock is taken), so a claim the server has
            // already ended records nothing and its batch never reaches a Sender.
            journal_insert: format!(
                "INSERT INTO {j} (claim_id, ids, claimed_at)
                 SELECT ?, ?, UTC_TIMESTAMP(6) FROM DUAL
                 WHERE IS_USED_LOCK(CONCAT('{lock_prefix}', ?)) IS NOT NULL"
            ),
            journal_take: format!("SELECT ids FROM {j} WHERE claim_id = ? FOR UPDATE"),
            journal_delete: format!("DELETE FROM {j} WHERE claim_id = ?"),
            charges_forget_claim: format!("DELETE FROM {c} WHERE claim_id = ?"),
            marker: format!(
                "INSERT IGNORE INTO {j} (claim_id, ids, claimed_at) VALUES (?, '', UTC_TIMESTAMP(6))"
            ),
            // Journal rows of claims whose lock is free: ended without a settlement (a
            // claim that committed deleted its row before releasing its lock). SKIP
            // LOCKED: a concurrent recovery takes the others.
            abandoned: format!(
                "SELECT claim_id, ids FROM {j}
                 WHERE claim_id > 0 AND IS_FREE_LOCK(CONCAT('{lock_prefix}', claim_id)) = 1
                 FOR UPDATE SKIP LOCKED"
            ),
            markers: format!("SELECT claim_id FROM {j} WHERE claim_id < 0"),
            markers_expire: format!(
                "DELETE FROM {j} WHERE claim_id < 0
                 AND claimed_at < UTC_TIMESTAMP(6) - INTERVAL {} SECOND",
                crate::store::vigil::MARKER_LIFETIME.as_secs()
            ),
            // Charges of messages that no longer wait (sent, dead or gone). A claim in
            // progress keeps its rows pending, so its charges stay.
            charges_cleanup: format!(
                "DELETE c FROM {c} AS c LEFT JOIN {t} AS m ON m.id = c.msg_id AND m.state = 'pending'
                 WHERE m.id IS NULL"
            ),
            lock_pending_one: format!(
                "SELECT id FROM {t} WHERE id = ? AND state = 'pending' FOR UPDATE SKIP LOCKED"
            ),
            set_aside: format!(
                "UPDATE {t} SET state = 'dead', available_at = UTC_TIMESTAMP(6), last_error = ?
                 WHERE id = ?"
            ),
            table: t.clone(),
            pending_idx: n.pending_idx.clone(),
            key_idx: n.key_idx.clone(),
            journal: j.clone(),
            charges: c.clone(),
            lock_prefix,
        }
    }

    /// The journal table's name.
    pub(crate) fn journal_table(&self) -> &str {
        &self.journal
    }

    /// Ordered claims: up to `window` due heads of keys (each key's lowest pending id), in
    /// id order, by a loose scan of the key index. A plain read: it sees the heads other
    /// claims hold, which [`claim_heads`](ClaimSql::claim_heads) then skips, hiding their
    /// keys. Costs a descent per key with pending messages.
    pub(crate) fn due_heads(&self, window: usize) -> String {
        let t = &self.table;
        format!(
            "SELECT m.id FROM (SELECT MIN(id) AS id FROM {t} WHERE state = 'pending' GROUP BY `key`) AS h
             JOIN {t} AS m ON m.id = h.id
             WHERE m.available_at <= UTC_TIMESTAMP(6)
             ORDER BY m.id LIMIT {window}"
        )
    }

    /// The named lock of claim `claim_id`, as a literal.
    pub(crate) fn lock_name(&self, claim_id: i32) -> String {
        format!("'{}{claim_id}'", self.lock_prefix)
    }

    /// Opens claim transaction `claim_id` and takes its lock (the last result: 1 when
    /// taken). The session's isolation and bounds are set when the connection is opened.
    pub(crate) fn begin(&self, claim_id: i32) -> String {
        format!(
            "START TRANSACTION; SELECT GET_LOCK({}, 0)",
            self.lock_name(claim_id)
        )
    }

    /// Ends the claim transaction `claim_id` without changes and frees its lock.
    pub(crate) fn rollback(&self, claim_id: i32) -> String {
        format!("ROLLBACK; DO RELEASE_LOCK({})", self.lock_name(claim_id))
    }

    /// The claim statement (see [`ClaimKind`]); `ordered` claims only heads of keys.
    pub(crate) fn claim(&self, limit: usize, kind: ClaimKind, ordered: bool) -> String {
        let (t, cols) = (&self.table, columns(&self.charges));
        let due = "m.state = 'pending' AND m.available_at <= UTC_TIMESTAMP(6)";
        match kind {
            ClaimKind::One => {
                let head = if ordered {
                    format!(
                        "AND NOT EXISTS (SELECT 1 FROM {t} AS p
                            WHERE p.state = 'pending' AND p.`key` = m.`key` AND p.id < m.id)"
                    )
                } else {
                    String::new()
                };
                format!("SELECT {cols} FROM {t} AS m WHERE m.id = ? AND {due} {head} FOR UPDATE SKIP LOCKED")
            }
            ClaimKind::Head | ClaimKind::AfterMark => {
                let mark = if kind == ClaimKind::AfterMark {
                    "AND (m.available_at > ? OR (m.available_at = ? AND m.id > ?))"
                } else {
                    ""
                };
                format!(
                    "SELECT {cols} FROM {t} AS m FORCE INDEX ({idx})
                     WHERE {due} {mark}
                     ORDER BY m.state, m.available_at, m.id
                     LIMIT {limit} FOR UPDATE SKIP LOCKED",
                    idx = self.pending_idx
                )
            }
        }
    }

    /// Ordered claims: locks the due rows among the heads `ids` (a read of
    /// [`due_heads`](ClaimSql::due_heads) just before) that are still heads, up to `limit`, skipping those
    /// other claims hold (their keys are theirs).
    pub(crate) fn claim_heads(&self, ids: &[i64], limit: usize) -> String {
        let (t, cols) = (&self.table, columns(&self.charges));
        format!(
            "SELECT {cols} FROM {t} AS m
             WHERE m.id IN ({}) AND m.state = 'pending' AND m.available_at <= UTC_TIMESTAMP(6)
               AND NOT EXISTS (SELECT 1 FROM {t} AS p
                   WHERE p.state = 'pending' AND p.`key` = m.`key` AND p.id < m.id)
             ORDER BY m.id LIMIT {limit} FOR UPDATE SKIP LOCKED",
            id_list(ids)
        )
    }

    /// Ordered claims: the pending rows that follow each head of `heads` (id, key) in its
    /// key, up to `limit` per key, in id order: one statement per key, all in one round
    /// trip (see `store::mariadb::run_all`), each reading the key index from the head on
    /// and stopping after `limit` rows. A plain read, not a locking one: no other claim can
    /// take them (their head is held, which hides the key), and a locking scan of the key
    /// index locks the record that ends its range, the next key's, which another claim may
    /// be deleting: two claims deadlocked that way (measured: a lost claim in the ordered
    /// suite). The settlement's DELETE locks them. Keys go as hex literals.
    pub(crate) fn followers(&self, heads: &[(i64, Vec<u8>)], limit: usize) -> String {
        let (t, cols) = (&self.table, columns(&self.charges));
        let mut out = String::new();
        for (head, key) in heads {
            out.push_str(&format!(
                "SELECT {cols} FROM {t} AS m FORCE INDEX ({idx})
                 WHERE m.state = 'pending' AND m.`key` = {key} AND m.id > {head}
                 ORDER BY m.state, m.`key`, m.id LIMIT {limit}; ",
                idx = self.key_idx,
                key = super::hex_literal(key),
            ));
        }
        out
    }

    /// The settlement's round trip: deletes the `sent` rows, the claim's journal row
    /// (`journaled`), the charges its messages paid, commits, frees the claim's lock, and
    /// opens claim `next` (its lock's result last).
    pub(crate) fn commit(
        &self,
        claim_id: i32,
        sent: &[i64],
        journaled: Option<i32>,
        charged: &[(i64, Vec<i32>)],
        next: Option<i32>,
    ) -> String {
        let mut out = self.delete(sent);
        if let Some(id) = journaled {
            out.push_str(&format!(
                "DELETE FROM {} WHERE claim_id = {id}; ",
                self.journal
            ));
        }
        for (msg_id, claims) in charged {
            let list: Vec<String> = claims.iter().map(i32::to_string).collect();
            out.push_str(&format!(
                "DELETE FROM {} WHERE msg_id = {msg_id} AND claim_id IN ({}); ",
                self.charges,
                list.join(",")
            ));
        }
        out.push_str(&format!(
            "COMMIT; DO RELEASE_LOCK({})",
            self.lock_name(claim_id)
        ));
        if let Some(next) = next {
            out.push_str("; ");
            out.push_str(&self.begin(next));
        }
        out
    }

    /// Puts failed rows back (still locked by the claim): attempts, when they may be
    /// claimed again (`delay` milliseconds from the server's clock now), dead or pending,
    /// and why. One round trip whatever their number.
    pub(crate) fn return_failed(&self, rows: &[(i64, i32, i64, bool, &str)]) -> String {
        let mut out = String::new();
        for (id, attempts, delay_ms, dead, error) in rows {
            out.push_str(&format!(
                "UPDATE {} SET attempts = {attempts},
                    available_at = UTC_TIMESTAMP(6) + INTERVAL {} MICROSECOND,
                    state = '{}', last_error = {} WHERE id = {id}; ",
                self.table,
                delay_ms.saturating_mul(1000).min(i64::MAX / 2),
                if *dead { "dead" } else { "pending" },
                text_literal(error)
            ));
        }
        out
    }

    /// A late settlement: of `ids`, the rows still pending and free, locked.
    pub(crate) fn lock_pending(&self, ids: &[i64]) -> String {
        format!(
            "SELECT id, attempts, `key` FROM {} WHERE id IN ({}) AND state = 'pending' FOR UPDATE SKIP LOCKED",
            self.table,
            id_list(ids)
        )
    }

    /// Deletes the rows `ids` (a statement ending in `; `, empty for none), each found by its
    /// primary key: the ids are a table (`JSON_TABLE`) read first (`STRAIGHT_JOIN`), and each
    /// joined row is one lookup. Not `id IN (...)`: on a small table (an outbox in steady
    /// state) MariaDB runs that as a scan of the whole table, which waits for every row
    /// another claim holds while that claim's own DELETE waits for ours: two relays
    /// deadlocked every few hundred settlements in the ordered suite. One statement per row
    /// avoided the scan but halved the drain (measured: 74k to 35k msg/s at batch 100).
    pub(crate) fn delete(&self, ids: &[i64]) -> String {
        if ids.is_empty() {
            return String::new();
        }
        format!(
            "DELETE m FROM {} STRAIGHT_JOIN {} AS m ON m.id = d.id; ",
            ids_table(ids),
            self.table
        )
    }

    /// Ordered late settlements: the keys of `ids` whose heads can be locked now.
    pub(crate) fn lock_free_heads(&self, ids: &[i64]) -> String {
        let t = &self.table;
        format!(
            "SELECT h.`key` FROM {t} AS h
             WHERE h.id IN (SELECT MIN(p.id) FROM {t} AS p
                            WHERE p.state = 'pending'
                              AND p.`key` IN (SELECT q.`key` FROM {t} AS q WHERE q.id IN ({}))
                            GROUP BY p.`key`)
             FOR UPDATE SKIP LOCKED",
            id_list(ids)
        )
    }

    /// The keys of `ids`.
    pub(crate) fn keys_of(&self, ids: &[i64]) -> String {
        format!(
            "SELECT id, `key` FROM {} WHERE id IN ({})",
            self.table,
            id_list(ids)
        )
    }

    /// The charges of `ids`, by message.
    pub(crate) fn count_charges(&self, ids: &[i64]) -> String {
        format!(
            "SELECT msg_id, COUNT(*) FROM {} WHERE msg_id IN ({}) GROUP BY msg_id",
            self.charges,
            id_list(ids)
        )
    }

    /// Deletes every charge of `ids` (through the `msg_id` index, as [`delete`](ClaimSql::delete)).
    pub(crate) fn forget_charges(&self, ids: &[i64]) -> String {
        format!(
            "DELETE c FROM {} STRAIGHT_JOIN {} AS c ON c.msg_id = d.id",
            ids_table(ids),
            self.charges
        )
    }

    /// Charges `ids` for the abandoned claim `claim_id`.
    pub(crate) fn add_charges(&self, ids: &[i64], claim_id: i32) -> String {
        let rows: Vec<String> = ids
            .iter()
            .map(|id| format!("({id}, {claim_id}, UTC_TIMESTAMP(6))"))
            .collect();
        format!(
            "INSERT INTO {} (msg_id, claim_id, abandoned_at) VALUES {}",
            self.charges,
            rows.join(",")
        )
    }
}

/// `ids` as a table `d` with one column `id`, for a join that reads them first.
fn ids_table(ids: &[i64]) -> String {
    format!(
        "JSON_TABLE('[{}]', '$[*]' COLUMNS (id BIGINT PATH '$')) AS d",
        id_list(ids)
    )
}

/// A claim's message ids as the journal stores them: runs of consecutive ids as `a-b`,
/// single ids alone, comma-separated (`1-100,105`).
pub(crate) fn encode_ids(ids: &[i64]) -> String {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if sorted[i] == start {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{}", sorted[i]));
        }
        i += 1;
    }
    out
}

/// The ids of a journal row (see [`encode_ids`]); `None` for text the crate did not write.
/// A run longer than a million ids is refused: a claim holds at most 10,000.
pub(crate) fn decode_ids(text: &str) -> Option<Vec<i64>> {
    let mut ids = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        // A leading '-' is a negative id's sign, not a run.
        let split = part
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == '-')
            .map(|(i, _)| i);
        match split {
            Some(i) => {
                let (a, b) = (
                    part[..i].parse::<i64>().ok()?,
                    part[i + 1..].parse::<i64>().ok()?,
                );
                if b < a || b - a > 1_000_000 {
                    return None;
                }
                ids.extend(a..=b);
            }
            None => ids.push(part.parse().ok()?),
        }
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_ids_round_trip_as_runs() {
        let ids = [5, 1, 2, 3, 9, 10, -4, 7];
        let text = encode_ids(&ids);
        assert_eq!(text, "-4,1-3,5,7,9-10");
        let mut back = decode_ids(&text).unwrap();
        back.sort_unstable();
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        assert_eq!(back, sorted);
        assert_eq!(decode_ids(""), Some(vec![]));
        assert_eq!(decode_ids("x"), None);
        assert_eq!(decode_ids("5-1"), None);
    }
}
