#!/usr/bin/env bash
# Everything CI checks: formatting, lints, the whole test suite (unit and integration tests, on
# the real file system, real tar files, the embedded SQLite database, and the real RabbitMQ and
# MongoDB-wire servers that scripts/services.sh installs and starts when missing) and a short
# chaos run.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --check
# The services come up (on a fresh clone: Python packages installed, servers started) while
# the tests build: the one waits on the network, the other on the CPU.
services_env=$(mktemp)
trap 'rm -f "$services_env"' EXIT
scripts/services.sh >"$services_env" &
services=$!
# One build for the lints and the tests: this project's crates compile through clippy-driver
# (scripts/clippy-rustc, every warning an error), so the dependencies are built once instead of
# once more in `cargo clippy`'s check mode. `--all-targets` lints the benchmarks too.
export RUSTC_WORKSPACE_WRAPPER="$PWD/scripts/clippy-rustc"
# A CI build starts cold and is thrown away: incremental compilation's bookkeeping would only
# slow it down (about 10 s on this project's own crate).
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi
cargo test --locked --features failpoints --all-targets --no-run
wait "$services"
eval "$(cat "$services_env")"
# `failpoints` compiles in the failure injection some tests use (never in a deployed build).
# Most tests wait on processes, timers and servers rather than on the CPU: six run at a time,
# which keeps two CPUs about three quarters busy.
cargo test --locked --features failpoints -- --test-threads=6
# A short chaos run: processes killed at random while datasets go through their workflows,
# then every record checked against the disk (scripts/chaos.sh; CHAOS_N=200 for a long run).
# It runs the binary the tests just built rather than building another.
CHAOS_N=${CHAOS_N:-3} CHAOS_BINARY=${CARGO_TARGET_DIR:-target}/debug/workers scripts/chaos.sh
