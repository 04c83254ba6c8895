//! The declared minimum Rust version (`rust-version` in Cargo.toml) is true: not below the
//! `rust-version` any crate of the resolved dependency graph declares (normal and build
//! dependencies, every feature: what a user of the library compiles). Runs `cargo metadata`
//! on this package, offline, from its lockfile, for this host's platform.

use std::collections::{HashMap, HashSet};
use std::process::Command;

fn version(text: &str) -> Vec<u64> {
    text.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[test]
fn the_declared_minimum_rust_version_covers_every_dependency() {
    // This host's target only (the graph a build here compiles; other platforms' crates
    // are not even downloaded).
    let rustc = Command::new("rustc").arg("-vV").output().unwrap();
    let host = String::from_utf8(rustc.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .unwrap();
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--all-features",
            "--offline",
        ])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let packages: HashMap<&str, &serde_json::Value> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p))
        .collect();
    let nodes: HashMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root = metadata["resolve"]["root"].as_str().unwrap();
    let declared = version(packages[root]["rust_version"].as_str().unwrap());

    // Walk normal and build dependencies from the root (dev-dependencies are not compiled
    // by a user of the library).
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let used = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "build");
            if used {
                stack.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    let mut needs: Vec<(Vec<u64>, String)> = seen
        .iter()
        .filter_map(|id| {
            let p = packages[id];
            let v = p["rust_version"].as_str()?;
            Some((
                version(v),
                format!("{} {} (rust-version {v})", p["name"], p["version"]),
            ))
        })
        .collect();
    needs.sort();
    let (highest, by) = needs.last().unwrap();
    assert!(
        declared >= *highest,
        "Cargo.toml declares rust-version {declared:?}, but {by} needs more; declare at least that"
    );
}
