//! Validated SQL identifiers, for every backend.
//!
//! Schema and table names come from configuration, so they are checked here once and then
//! only ever formatted into SQL through [`Ident::quoted`]. The rules are deliberately stricter
//! than PostgreSQL's: ASCII letters, digits and `_`, starting with a letter or `_`. That keeps
//! every name valid both quoted and unquoted, rules out any quoting trick, and keeps derived
//! names (indexes) inside PostgreSQL's 63-byte limit instead of being silently truncated.

use crate::Error;

/// PostgreSQL truncates identifiers longer than this many bytes (NAMEDATALEN - 1).
pub(crate) const MAX_IDENT_LEN: usize = 63;

/// The longest suffix appended to the table name to name its indexes (`_pending_idx`).
pub(crate) const DERIVED_SUFFIX_LEN: usize = "_pending_idx".len();

/// A schema or table name that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ident(String);

impl Ident {
    /// Validates `name` as the `what` identifier ("schema" or "table"), at most `max_len` bytes.
    pub(crate) fn new(what: &'static str, name: &str, max_len: usize) -> Result<Ident, Error> {
        let reject = |reason: String| Error::InvalidIdentifier {
            what,
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(reject("it is empty".into()));
        }
        if name.len() > max_len {
            return Err(reject(format!(
                "it is {} bytes long, the limit is {max_len}",
                name.len()
            )));
        }
        let mut chars = name.chars();
        let first = chars.next().unwrap_or('_');
        if !(first.is_ascii_alphabetic() || first == '_') {
            return Err(reject("it must start with an ASCII letter or '_'".into()));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        {
            return Err(reject(format!(
                "it contains {bad:?}; only ASCII letters, digits and '_' are allowed"
            )));
        }
        Ok(Ident(name.to_owned()))
    }

    /// The name as the user wrote it.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The name in double quotes, ready to be formatted into SQL. Validation guarantees there
    /// is no quote inside to escape; quoting still keeps reserved words and upper case intact.
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// The name in backticks, MariaDB's quotes (see [`quoted`](Ident::quoted)).
    #[cfg(feature = "mariadb")]
    pub(crate) fn backquoted(&self) -> String {
        format!("`{}`", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for name in ["outbox", "Outbox_2", "_x", "a"] {
            assert_eq!(
                Ident::new("table", name, MAX_IDENT_LEN).unwrap().as_str(),
                name
            );
        }
    }

    #[test]
    fn rejects_everything_else() {
        let long = "a".repeat(64);
        for name in [
            "",
            long.as_str(),
            "9lives",
            "with space",
            "semi;colon",
            "quo\"te",
            "\"; DROP TABLE x; --",
            "dash-ed",
            "dot.ted",
            "ümlaut",
            "nul\0",
        ] {
            let err = Ident::new("table", name, MAX_IDENT_LEN).unwrap_err();
            assert!(
                matches!(err, Error::InvalidIdentifier { .. }),
                "{name:?} gave {err}"
            );
        }
    }

    #[test]
    fn quoting_wraps_in_double_quotes() {
        let ident = Ident::new("schema", "App", MAX_IDENT_LEN).unwrap();
        assert_eq!(ident.quoted(), "\"App\"");
    }
}
