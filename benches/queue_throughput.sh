#!/usr/bin/env bash
# Queue throughput of the three profiles: no-op steps per second of one `workers worker` with
# SLOTS slots on the embedded SQLite file, on PostgreSQL, and on RabbitMQ + MongoDB, measured
# side by side in one run, REPEAT times each, medians. Writes the section between the
# queue-throughput markers of BENCHMARKS.md.
#   WORKFLOWS=50 STEPS_PER_WORKFLOW=10 SLOTS=4 REPEAT=3
#
# Each run has a database of its own: a SQLite file on tmpfs, a PostgreSQL database created
# for it (the machine's server, 127.0.0.1:5432), and a MongoDB-wire server (SecantusDB) started
# for it alone with its storage on tmpfs (see benches/worker_overhead.sh for why).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
WORKFLOWS=${WORKFLOWS:-50}
STEPS=${STEPS_PER_WORKFLOW:-10}
SLOTS=${SLOTS:-4}
REPEAT=${REPEAT:-3}
cargo build --release --locked --quiet
eval "$(scripts/services.sh)"
DRIVER=$(cargo bench --locked --bench queue_throughput --no-run --message-format=json-render-diagnostics |
    python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "queue_throughput" and msg.get("executable"):
        print(msg["executable"])
')
SECANTUSD=$REPO/target/services/secantus-venv/bin/secantusd-py
WORK=$(mktemp -d /dev/shm/queue-throughput.XXXXXX)
# A run that stops half-way leaves no MongoDB-wire server behind on its port.
trap 'for pid in "$WORK"/mongo-*.pid; do [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null; done; rm -rf "$WORK"' EXIT
RESULTS=$WORK/results.jsonl
PG_ADMIN=${WORKERS_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}

common_env() {
    echo "ALIAS_SALT=bench WORKERS__LOG__LEVEL=warn WORKERS__LOG__FORMAT=human"
}

run_profile() {
    local profile=$1 round=$2
    local env_vars
    env_vars="$(common_env) WORKERS__APP_ID=bench-$round.example.org"
    case $profile in
        embedded)
            env_vars="$env_vars WORKERS__SQLITE__PATH=$WORK/embedded-$round/w.db"
            ;;
        postgres)
            local db="workers_bench_${round}_$$"
            psql "$PG_ADMIN" -qc "CREATE DATABASE $db" >/dev/null
            local url=${PG_ADMIN%/*}/$db
            env_vars="$env_vars WORKERS__SQLITE__PATH=$WORK/pg-$round/w.db"
            env_vars="$env_vars WORKERS__REGISTRY__KIND=postgres WORKERS__STORE__KIND=postgres"
            env_vars="$env_vars WORKERS__BROKER__KIND=postgres WORKERS__POSTGRES__URL=$url"
            ;;
        postgres-socket)
            # The same server through its Unix socket, as a worker on the server's own host
            # reaches it: no TCP, no TLS.
            local db="workers_bench_${round}_$$"
            psql "$PG_ADMIN" -qc "CREATE DATABASE $db" >/dev/null
            local socket_dir user
            socket_dir=$(psql "$PG_ADMIN" -Atc "SHOW unix_socket_directories" | cut -d, -f1)
            user=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlparse(sys.argv[1]).username or "postgres")' "$PG_ADMIN")
            env_vars="$env_vars WORKERS__SQLITE__PATH=$WORK/pgs-$round/w.db"
            env_vars="$env_vars WORKERS__REGISTRY__KIND=postgres WORKERS__STORE__KIND=postgres"
            env_vars="$env_vars WORKERS__BROKER__KIND=postgres"
            env_vars="$env_vars WORKERS__POSTGRES__URL=postgres://$user@$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$socket_dir")/$db"
            ;;
        amqp-mongo)
            local port=$((27200 + round))
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                echo "port $port is taken (a server left by another run?): stop it first" >&2
                exit 1
            fi
            mkdir -p "$WORK/mongo-$round"
            setsid "$SECANTUSD" --host 127.0.0.1 --port "$port" --storage-path "$WORK/mongo-$round" \
                >"$WORK/mongo-$round.log" 2>&1 </dev/null &
            echo $! >"$WORK/mongo-$round.pid"
            for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
            env_vars="$env_vars APP_ENV=production APP_API_TOKEN=unused-by-noop"
            env_vars="$env_vars API_BASE_URL=http://127.0.0.1:9/ QUEUE_PASS=unused"
            env_vars="$env_vars WORKERS__AMQP__URL=$WORKERS_TEST_AMQP_URL"
            env_vars="$env_vars WORKERS__MONGO__URI=mongodb://127.0.0.1:$port/?directConnection=true"
            env_vars="$env_vars WORKERS__MONGO__DATABASE=bench"
            ;;
    esac
    local line
    # shellcheck disable=SC2086
    line=$(env -i PATH="$PATH" HOME="$HOME" $env_vars \
        "$DRIVER" "$REPO/target/release/workers" "$WORKFLOWS" "$STEPS" "$SLOTS")
    echo "{\"profile\": \"$profile\", \"round\": $round, \"result\": $line}" | tee -a "$RESULTS"
    case $profile in
        postgres | postgres-socket)
            psql "$PG_ADMIN" -qc "DROP DATABASE workers_bench_${round}_$$ WITH (FORCE)" >/dev/null ;;
        amqp-mongo)
            kill "$(cat "$WORK/mongo-$round.pid")" 2>/dev/null || true
            rm -f "$WORK/mongo-$round.pid"
            rabbitmqctl delete_queue "bench-$round.example.org.q" >/dev/null 2>&1 || true
            ;;
    esac
}

for round in $(seq 1 "$REPEAT"); do
    for profile in embedded postgres postgres-socket amqp-mongo; do
        run_profile "$profile" "$round"
    done
done

python3 - "$RESULTS" "$WORKFLOWS" "$STEPS" "$SLOTS" "$REPEAT" <<'PY'
import json, re, statistics, subprocess, sys
results, workflows, steps, slots, repeat = sys.argv[1:]
runs = [json.loads(line) for line in open(results)]
def med(profile, key):
    return statistics.median(r["result"][key] for r in runs if r["profile"] == profile)
names = {"embedded": "embedded (SQLite file)", "postgres": "postgres (PostgreSQL 15, local)",
         "postgres-socket": "postgres, through the Unix socket",
         "amqp-mongo": "production (RabbitMQ + MongoDB wire)"}
base = med("embedded", "steps_per_second")
cpus = runs[0]["result"]["cpus"]
pg_machine = med("postgres", "machine_cpu_seconds") / (int(workflows) * int(steps)) * 1000
pg_worker = med("postgres", "worker_cpu_seconds") / (int(workflows) * int(steps)) * 1000
rows = []
for p in ["embedded", "postgres", "postgres-socket", "amqp-mongo"]:
    sps = med(p, "steps_per_second")
    cpu = med(p, "worker_cpu_seconds") / (int(workflows) * int(steps)) * 1000
    each = ", ".join(f"{r['result']['steps_per_second']:.1f}" for r in runs if r["profile"] == p)
    tps = [r["result"].get("transactions_per_step") for r in runs if r["profile"] == p]
    tps = f"{statistics.median(tps):.1f}" if all(t is not None for t in tps) else "n/a"
    machine = med(p, "machine_cpu_seconds") / (int(workflows) * int(steps)) * 1000
    busy = statistics.median(r["result"]["machine_cpu_seconds"] / (r["result"]["seconds"] * r["result"]["cpus"])
                             for r in runs if r["profile"] == p)
    rows.append(f"| {names[p]} | {sps:.1f} | {sps / base:.2f}x | {cpu:.2f} s | {machine:.2f} s | {busy:.0%} | {tps} | {each} |")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
section = f"""<!-- queue-throughput:begin -->
### Queue throughput by profile

`benches/queue_throughput.sh` (commit {commit}): one `workers worker` with {slots} slots runs
{workflows} workflows of {steps} `noop` steps, published at once, on each profile in turn, {repeat}
rounds; medians. Each run has a database of its own (SQLite on tmpfs; a fresh PostgreSQL
database, reached over loopback TCP with the default `sslmode=prefer`, so over TLS as the
server offers it, and in a second row through the server's Unix socket, as a worker on the
server's own host would reach it; a fresh MongoDB-wire server on tmpfs). The worker's CPU is its own, user + system;
the machine's is every process's (the database server's too) and the kernel's, over the same
time, and "busy" is that time as a share of all {cpus} CPUs. Database transactions count every
statement outside a transaction as one, over the whole run (idle polling and the driver's own
reads included).

| Profile | Steps/s | Against embedded | Worker CPU per 1,000 steps | Machine CPU per 1,000 steps | Machine busy | Database transactions per step | Each round (steps/s) |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

What bounds PostgreSQL here: a step costs the machine {pg_machine:.2f} ms of CPU (the worker
{pg_worker:.2f} ms, the server and the kernel's loopback the rest), so {cpus} CPUs allow at most
{cpus / pg_machine * 1000:.0f} steps/s however the steps are scheduled. Matching the embedded
rate on one machine would take every step, worker and server together, in {cpus / base * 1000:.2f} ms
of CPU. With the server on a host of its own, a worker host spends only the worker's share.

Reproduce: `REPEAT=3 benches/queue_throughput.sh`.
<!-- queue-throughput:end -->"""
text = open("BENCHMARKS.md").read()
if "<!-- queue-throughput:begin -->" in text:
    text = re.sub(r"<!-- queue-throughput:begin -->.*<!-- queue-throughput:end -->", lambda _: section, text, flags=re.S)
else:
    text = text.rstrip() + "\n\n" + section + "\n"
open("BENCHMARKS.md", "w").write(text)
print(section)
PY
