#!/usr/bin/env bash
# Worker overhead through RabbitMQ and MongoDB: `workers worker` against the Python Celery +
# sca-rhythm worker on the same no-op steps, plus the idle worker's memory. Writes the section
# between the worker-overhead markers of BENCHMARKS.md (see benches/worker_overhead.py).
#   WORKFLOWS=100 STEPS_PER_WORKFLOW=10 SLOTS=4 REPEAT=3
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
cargo build --release --locked --quiet
eval "$(scripts/services.sh)"
exec "$WORKERS_TEST_PYTHON" benches/worker_overhead.py
