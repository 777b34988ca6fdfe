#!/usr/bin/env bash
# Remote control: how long a step revoked with terminate (by Celery's own `app.control.revoke`)
# takes to read REVOKED, for a step hashing a 1 GiB file (inspect) and for one extracting its
# bundle (stage); and the idle worker's CPU with events on and off. Writes the section between
# the remote-control markers of BENCHMARKS.md (see benches/revoke_latency.py).
#   RUNS=7 SIZE_MIB=1024 WINDOW=60
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
cargo build --release --locked --quiet
eval "$(scripts/services.sh)"
exec "$WORKERS_TEST_PYTHON" benches/revoke_latency.py
