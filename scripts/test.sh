#!/usr/bin/env bash
# Everything CI checks: formatting, lints and the whole test suite (unit and integration
# tests, on the real file system, real tar files, the embedded SQLite database, and the real
# RabbitMQ and MongoDB-wire servers that scripts/services.sh installs and starts when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
eval "$(scripts/services.sh)"
cargo test --locked
