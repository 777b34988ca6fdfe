#!/usr/bin/env bash
# Worker overhead through RabbitMQ and MongoDB: `workers worker` against the Python Celery +
# sca-rhythm worker on the same no-op steps, plus the idle worker's memory. Writes the section
# between the worker-overhead markers of BENCHMARKS.md (see benches/worker_overhead.py).
#   WORKFLOWS=50 STEPS_PER_WORKFLOW=10 SLOTS=4 REPEAT=3
#
# Each run has a MongoDB-wire server (SecantusDB, one Python process) started for it alone, its
# storage on tmpfs: on a server shared by the runs, or on the shared machine's disk, every
# worker's rate fell to a fifth after the first round (benches/worker_overhead.py FreshServer).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
cargo build --release --locked --quiet
eval "$(scripts/services.sh)"
export WORKFLOWS=${WORKFLOWS:-50}
export BENCH_SECANTUSD=$REPO/target/services/secantus-venv/bin/secantusd-py
"$WORKERS_TEST_PYTHON" benches/worker_overhead.py
