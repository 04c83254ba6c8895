#!/usr/bin/env python3
"""The declared minimum Rust version (`rust-version` in Cargo.toml) is honest.

The policy (README, "Platforms"): the MSRV is the lowest Rust release for which every
dependency requirement of Cargo.toml has compatible versions, found by cargo's MSRV-aware
resolver, not whatever the newest lockfile happens to pull. Features whose crates need more
say so in FEATURE_NEEDS (and in the README). This checks, on a copy of the repository:

1. cargo's MSRV-aware resolver (`incompatible-rust-versions = "fallback"`, cargo 1.84+)
   resolves the dependency graph for the declared version, the way a user on that toolchain
   gets it. The only crate pinned by hand is the one that declares no `rust-version` of its
   own but needs more (PINS): the resolver cannot know to avoid it. The result is committed
   as `.ci/msrv.Cargo.lock`, so that CI does not change with what crates.io publishes;
   `python3 .ci/msrv.py --update` resolves again (after a dependency change, say).
2. In that graph, no crate a user compiles (normal and build dependencies, for this host)
   declares a `rust-version` above ours, with the default features and with each feature
   alone, except what FEATURE_NEEDS allows for that feature.
3. The library, the CLI and every feature but the two that build C or need more (`kafka`,
   `rabbitmq`) compile against that graph: the minimum versions Cargo.toml declares are
   enough for the code. The Rust toolchain itself cannot be the old one here (only one can
   be installed on these machines); clippy's `incompatible_msrv` lint, on by default, checks
   our own use of the standard library against the declared version instead.

A check of the repository, not of the library, so it runs from .ci/run, never from
`cargo test`, which must pass on a fresh clone with an empty cargo home. It needs the
crates.io index (the resolver) and the crates of the older versions (step 3).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

# Features that need a newer Rust than the library's, with the crate that makes it so.
FEATURE_NEEDS = {"rabbitmq": ("1.88", "lapin 4")}
# Crates that declare no rust-version but need a newer Rust than ours in their latest
# release: pinned to the newest release that builds with the declared version.
PINS = {"scheduled-thread-pool": "0.2.7"}  # 0.2.8 needs parking_lot 0.13 (Rust 1.95)
# Compiled in step 3 (kafka builds librdkafka from C; rabbitmq needs more, above).
CHECKED_FEATURES = "cli,diesel,opentelemetry,tracing,serde,testing,failpoints,mariadb"

root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The graph resolved for the declared rust-version, committed (`--update` resolves it again).
MSRV_LOCK = os.path.join(root_dir, ".ci", "msrv.Cargo.lock")
UPDATE = "--update" in sys.argv[1:]


def run(args, cwd, env=None):
    out = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def version(text):
    parts = (text.split(".") + ["0", "0"])[:3]
    return tuple(int(p) if p.isdigit() else 0 for p in parts)


def highest_needed(cwd, host, features):
    """The highest rust-version among the crates a user compiles with these features."""
    meta = json.loads(run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host,
         "--features", features], cwd))
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
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
    return needs[-1], packages[root]


def main():
    host = next(
        line.split(": ", 1)[1]
        for line in run(["rustc", "-vV"], root_dir).splitlines()
        if line.startswith("host: ")
    )
    work = tempfile.mkdtemp(prefix="troutbox-msrv-")
    try:
        shutil.copytree(root_dir, os.path.join(work, "repo"),
                        ignore=shutil.ignore_patterns("target", ".git"))
        repo = os.path.join(work, "repo")
        if UPDATE or not os.path.exists(MSRV_LOCK):
            env = dict(os.environ, CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS="fallback")
            run(["cargo", "update", "--quiet"], repo, env)
            for crate, precise in PINS.items():
                run(["cargo", "update", "--quiet", "-p", crate, "--precise", precise], repo, env)
            shutil.copyfile(os.path.join(repo, "Cargo.lock"), MSRV_LOCK)
            print(f"resolved for the declared rust-version and wrote {os.path.relpath(MSRV_LOCK, root_dir)}")
        else:
            # The graph resolved earlier, committed: CI does not change with what crates.io
            # publishes meanwhile. A Cargo.toml it no longer satisfies fails `--locked` below.
            shutil.copyfile(MSRV_LOCK, os.path.join(repo, "Cargo.lock"))
            stale = subprocess.run(["cargo", "metadata", "--format-version", "1", "--locked"],
                                   capture_output=True, text=True, cwd=repo)
            if stale.returncode != 0:
                sys.exit(f"{os.path.relpath(MSRV_LOCK, root_dir)} no longer matches Cargo.toml: "
                         f"run `python3 .ci/msrv.py --update` and commit it\n{stale.stderr}")

        meta = json.loads(run(["cargo", "metadata", "--format-version", "1", "--no-deps"], repo))
        package = meta["packages"][0]
        declared = package["rust_version"]
        failures = []
        for feature in [""] + sorted(package["features"]):
            (need, by), _ = highest_needed(repo, host, feature)
            allowed = FEATURE_NEEDS.get(feature, (declared, None))[0]
            label = feature or "default features"
            if need > version(allowed):
                failures.append(f"{label}: {by} needs more than {allowed}")
            else:
                print(f"rust-version {allowed} covers {label} (highest: {by})")
        if failures:
            sys.exit(
                f"Cargo.toml declares rust-version {declared}, but with the MSRV-aware "
                "resolver:\n  " + "\n  ".join(failures)
                + "\nRaise rust-version (README, Platforms), lower a dependency's minimum in "
                "Cargo.toml, or pin a crate that declares no rust-version in .ci/msrv.py.")

        # Step 3: the code compiles against the older graph. A target directory of its own,
        # kept between runs on one machine.
        target = os.path.join(root_dir, "target", "msrv")
        run(["cargo", "check", "--quiet", "--locked", "--lib", "--bins",
             "--features", CHECKED_FEATURES, "--target-dir", target], repo)
        versions = {p["name"]: p["version"] for p in json.loads(run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--features", CHECKED_FEATURES],
            repo))["packages"]}
        print(f"the library and the CLI build against the graph resolved for Rust {declared} "
              f"(postgres {versions['postgres']}, r2d2 {versions['r2d2']}, time {versions['time']}, "
              f"scheduled-thread-pool {versions['scheduled-thread-pool']}, mysql {versions['mysql']})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


main()
