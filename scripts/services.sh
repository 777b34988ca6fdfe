#!/usr/bin/env bash
# Makes the services the production-profile tests talk to available, idempotently, and prints
# their settings as `export` lines (use: `eval "$(scripts/services.sh)"`):
# - RabbitMQ on 127.0.0.1:5672 (guest/guest), installed from Debian's packages when missing;
# - SecantusDB (the MongoDB wire protocol) on 127.0.0.1:27017, in a Python virtualenv;
# - a Python virtualenv with celery 5.2.7, sca-rhythm and pymongo: the original workers' own
#   packages, used by the interop tests as real peers (they are test tools, not product code),
#   blake3, the reference for the upload manifests, MultiQC, which the QC tests run for real, and
#   Flower, the monitor whose HTTP API the event tests read;
# - FastQC, from Debian's packages when missing;
# - cargo-deb, with which the packaging test builds the Debian package (scripts/deb.sh).
# Progress goes to stderr; only the export lines go to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

state="${WORKERS_SERVICES_DIR:-$PWD/target/services}"
mkdir -p "$state"
say() { echo "services: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    local port=$1 seconds=$2
    for _ in $(seq 1 $((seconds * 10))); do
        port_open "$port" && return 0
        sleep 0.1
    done
    return 1
}

# RabbitMQ
if ! port_open 5672; then
    if ! command -v rabbitmq-server >/dev/null; then
        say "installing rabbitmq-server"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server >&2
    fi
    say "starting RabbitMQ"
    rabbitmq-server -detached >&2 || true
    wait_port 5672 60 || { say "RabbitMQ did not open port 5672"; exit 1; }
    rabbitmqctl await_startup >&2
fi

# Python virtualenvs: one for SecantusDB, one for the interop peers (their pins differ).
venv() {
    local dir=$1; shift
    local stamp="$dir/.installed-$(echo "$*" | sha256sum | cut -c1-16)"
    if [[ ! -f "$stamp" ]]; then
        say "creating $dir ($*)"
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/pip" install --quiet --disable-pip-version-check "$@" >&2
        touch "$stamp"
    fi
}
venv "$state/secantus-venv" "secantusdb==0.7.0b3"
venv "$state/interop-venv" "celery==5.2.7" "sca-rhythm==0.6.15" "pymongo" "blake3" "multiqc" "flower==2.0.1"

# FastQC (generate_qc)
if ! command -v fastqc >/dev/null; then
    say "installing fastqc"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fastqc >&2
fi

# cargo-deb (the packaging test)
if ! command -v cargo-deb >/dev/null; then
    say "installing cargo-deb"
    cargo install --locked --version 3.8.0 cargo-deb >&2
fi

# SecantusDB (MongoDB wire protocol)
if ! port_open 27017; then
    say "starting SecantusDB"
    mkdir -p "$state/secantus-data"
    setsid nohup "$state/secantus-venv/bin/secantusd-py" --host 127.0.0.1 --port 27017 \
        --storage-path "$state/secantus-data" >"$state/secantus.log" 2>&1 < /dev/null &
    wait_port 27017 30 || { say "SecantusDB did not open port 27017 (see $state/secantus.log)"; exit 1; }
fi

# PostgreSQL (the postgres profile): the machine's server on 127.0.0.1:5432, trust
# authentication; the tests create and drop databases of their own on it.
if ! port_open 5432; then
    say "starting PostgreSQL"
    if command -v pg_ctlcluster >/dev/null; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start >&2 || true
    fi
    wait_port 5432 30 || { say "PostgreSQL is not listening on 127.0.0.1:5432"; exit 1; }
fi

echo "export WORKERS_TEST_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'"
echo "export WORKERS_TEST_MONGO_URI='mongodb://127.0.0.1:27017/?directConnection=true'"
echo "export WORKERS_TEST_POSTGRES_URL='postgres://postgres@127.0.0.1:5432/postgres'"
echo "export WORKERS_TEST_PYTHON='$state/interop-venv/bin/python'"
echo "export WORKERS_TEST_FASTQC='$(command -v fastqc)'"
echo "export WORKERS_TEST_MULTIQC='$state/interop-venv/bin/multiqc'"
