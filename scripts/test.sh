#!/usr/bin/env bash
# Everything CI checks: formatting, lints and the whole test suite (unit and integration
# tests, on the real file system, real tar files and the embedded SQLite database).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
