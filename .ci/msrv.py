#!/usr/bin/env python3
"""The declared minimum Rust version (`rust-version` in Cargo.toml) is true: not below the
`rust-version` any crate of the resolved dependency graph declares (normal and build
dependencies, every feature: what a user of the library compiles), for this host's platform.

A check of the repository, not of the library, so it runs from .ci/run (after clippy
--all-features has fetched every optional dependency), never from `cargo test`, which must
pass on a fresh clone with an empty cargo home and no network beyond what it fetches itself.
"""
import json
import os
import subprocess
import sys

root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
host = next(
    line.split(": ", 1)[1]
    for line in subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout.splitlines()
    if line.startswith("host: ")
)
out = subprocess.run(
    ["cargo", "metadata", "--format-version", "1", "--all-features", "--locked", "--filter-platform", host],
    capture_output=True, text=True, cwd=root_dir,
)
if out.returncode != 0:
    sys.exit(f"cargo metadata failed:\n{out.stderr}")
meta = json.loads(out.stdout)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = meta["resolve"]["root"]


def version(text):
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("."))


declared = version(packages[root]["rust_version"])
seen, stack = set(), [root]
while stack:
    pid = stack.pop()
    if pid in seen:
        continue
    seen.add(pid)
    for dep in nodes[pid]["deps"]:
        # Normal and build dependencies: dev-dependencies are not compiled by a user.
        if any(k["kind"] in (None, "build") for k in dep["dep_kinds"]):
            stack.append(dep["pkg"])
needs = sorted(
    (version(p["rust_version"]), f'{p["name"]} {p["version"]} (rust-version {p["rust_version"]})')
    for p in (packages[i] for i in seen if i != root)
    if p.get("rust_version")
)
highest, by = needs[-1]
if declared < highest:
    sys.exit(f"Cargo.toml declares rust-version {packages[root]['rust_version']}, but {by} needs more; declare at least that")
print(f"rust-version {packages[root]['rust_version']} covers every dependency (highest: {by})")
