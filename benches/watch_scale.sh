#!/usr/bin/env bash
# Watch at scale: registering and re-scanning a source directory of 100,000 run directories,
# against a Python reference of the original's listing and set difference. Writes the section
# between the watch-scale markers of BENCHMARKS.md (see benches/watch_scale.py).
#   DATASETS=100000 REPEAT=3
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
cargo build --release --locked --quiet
exec python3 benches/watch_scale.py
