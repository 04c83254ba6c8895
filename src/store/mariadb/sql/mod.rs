//! Every statement of the MariaDB backend, by concern: [`migrations`] (the versioned
//! schema), [`produce`] (the producer's INSERTs and per-key locks), [`claim`] (the claim
//! protocol's primitives), [`dead_letters`] (the admin API). Names are validated
//! ([`Ident`]) and quoted with backticks; values travel as parameters, or, in the
//! multi-statement round trips, as integers and hex literals the crate formats itself.

pub(crate) mod claim;
pub(crate) mod dead_letters;
pub(crate) mod migrations;
pub(crate) mod produce;

use crate::store::ident::Ident;

/// The names of one outbox table's objects, quoted.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// The table's name as configured (the key of its rows in the tables of versions and
    /// of modes).
    pub(crate) plain: String,
    pub(crate) table: String,
    pub(crate) journal: String,
    pub(crate) charges: String,
    pub(crate) key_locks: String,
    pub(crate) pending_idx: String,
    pub(crate) key_idx: String,
    pub(crate) migrations: String,
    pub(crate) tables: String,
}

impl Names {
    pub(crate) fn new(table: &Ident) -> Names {
        let t = table.as_str();
        Names {
            plain: t.to_owned(),
            table: table.backquoted(),
            journal: format!("`{t}_claims`"),
            charges: format!("`{t}_charges`"),
            key_locks: format!("`{t}_key_locks`"),
            pending_idx: format!("`{t}_pending_idx`"),
            key_idx: format!("`{t}_key_idx`"),
            migrations: "`troutbox_migrations`".into(),
            tables: "`troutbox_tables`".into(),
        }
    }
}

/// Statements for one outbox table, by concern (the claim's, which name the table's
/// identity, are built by the relay: [`claim::ClaimSql`]).
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) names: Names,
    pub(crate) migrations: migrations::MigrationSql,
    pub(crate) produce: produce::ProduceSql,
    pub(crate) dead: dead_letters::DeadLetterSql,
}

impl Sql {
    pub(crate) fn new(table: &Ident) -> Sql {
        let names = Names::new(table);
        Sql {
            migrations: migrations::MigrationSql::new(&names),
            produce: produce::ProduceSql::new(&names),
            dead: dead_letters::DeadLetterSql::new(&names),
            names,
        }
    }
}

/// `bytes` as a MariaDB hex literal (`X'...'`, `X''` when empty): how text and bytes go
/// into the statements the crate formats itself, with nothing to escape.
pub(crate) fn hex_literal(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2 + 3);
    out.push_str("X'");
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out.push('\'');
    out
}

/// Text as a literal of the connection's `utf8mb4`: its bytes in hex, converted.
pub(crate) fn text_literal(text: &str) -> String {
    format!("CONVERT({} USING utf8mb4)", hex_literal(text.as_bytes()))
}

/// A comma-separated list of ids, for `IN (...)`. Never empty: callers check.
pub(crate) fn id_list(ids: &[i64]) -> String {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    list.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_carry_any_text_without_quoting() {
        assert_eq!(hex_literal(b""), "X''");
        assert_eq!(hex_literal(b"a'\\\0"), "X'61275c00'");
        assert_eq!(text_literal("é"), "CONVERT(X'c3a9' USING utf8mb4)");
        assert_eq!(id_list(&[1, -2, 3]), "1,-2,3");
    }
}
