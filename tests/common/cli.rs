//! The `troutbox` command line, run against the test server as an operator runs it.

use std::process::{Command, Output};

/// The `troutbox` binary, nothing set: for `--help` and arguments a test writes whole.
pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_troutbox"))
}

/// `troutbox --database-url <test server> --schema <schema> <options> <arguments>`, with
/// `DATABASE_URL` removed from the environment so that only the arguments count.
#[derive(Clone, Copy)]
pub struct Cli {
    schema: &'static str,
    options: &'static [&'static str],
    url_last: bool,
}

impl Cli {
    pub const fn new(schema: &'static str) -> Cli {
        Cli {
            schema,
            options: &[],
            url_last: false,
        }
    }

    /// Options given before every call's arguments (`--table`, `--keep-sent`, ...).
    pub const fn options(self, options: &'static [&'static str]) -> Cli {
        Cli { options, ..self }
    }

    /// `--database-url` after the arguments (so after the subcommand), as an operator may
    /// write it.
    pub const fn url_last(self) -> Cli {
        Cli {
            url_last: true,
            ..self
        }
    }

    /// Runs the command with `args`, whatever its exit status.
    pub fn output(&self, args: &[&str]) -> Output {
        let url = super::url();
        let mut command = binary();
        if !self.url_last {
            command.args(["--database-url", &url]);
        }
        command
            .args(["--schema", self.schema])
            .args(self.options)
            .args(args);
        if self.url_last {
            command.args(["--database-url", &url]);
        }
        command.env_remove("DATABASE_URL").output().unwrap()
    }

    /// Runs the command with `args`: its stdout, or a panic with its stderr if it failed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "troutbox {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the command with `args` and `--json`: its output, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).unwrap()
    }
}

/// The strings of a JSON array (partition names in a `maintain --json` report), sorted.
pub fn names(v: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}
