#!/usr/bin/env bash
# Worker overhead through RabbitMQ and MongoDB: `workers worker` against the Python Celery +
# sca-rhythm worker on the same no-op steps, plus the idle worker's memory. Writes the section
# between the worker-overhead markers of BENCHMARKS.md (see benches/worker_overhead.py).
#   WORKFLOWS=50 STEPS_PER_WORKFLOW=10 SLOTS=4 REPEAT=3
#
# The workers share one MongoDB-wire server (SecantusDB, one Python process) started for the
# benchmark alone, its storage on tmpfs: the shared machine's disk stalls would otherwise decide
# the figures (seen: every worker's rate divided by five during one run).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
cargo build --release --locked --quiet
eval "$(scripts/services.sh)"
export WORKFLOWS=${WORKFLOWS:-50}
port=${BENCH_MONGO_PORT:-27018}
data=$(mktemp -d "${TMPDIR_FAST:-/dev/shm}/workers-bench-mongo-XXXXXX")
target/services/secantus-venv/bin/secantusd-py --host 127.0.0.1 --port "$port" \
    --storage-path "$data" >"$data.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$data" "$data.log"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
export WORKERS_TEST_MONGO_URI="mongodb://127.0.0.1:$port/?directConnection=true"
"$WORKERS_TEST_PYTHON" benches/worker_overhead.py
