#!/usr/bin/env bash
# Chaos runs of the embedded profile (scripts/chaos.py): datasets with odd names, read-only
# directories and many small files go through integrated, stage and delete while workers, the
# scheduler and overlapping `jobs run watch` processes are killed with SIGKILL at random moments
# and restarted; after each run every record is checked against the disk.
#
#   CHAOS_N=20        runs (200 for a long run)
#   CHAOS_SEED=...    seed of the random choices (default: the time; printed, so a run repeats)
#   CHAOS_RELEASE=0   1: use a release build
#   CHAOS_DIR=$TMPDIR where the runs' projects are made (a failed run's project is kept there)
#   CHAOS_BINARY=...  a `workers` binary built already (scripts/test.sh passes the one its tests
#                     built); nothing is built then
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${CHAOS_N:-20}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "chaos.sh: CHAOS_N must be a positive integer" >&2; exit 2; }
profile=debug
build=(cargo build --locked --bin workers)
if [[ ${CHAOS_RELEASE:-0} == 1 ]]; then
    profile=release
    build+=(--release)
fi
target=${CARGO_TARGET_DIR:-target}
binary=${CHAOS_BINARY:-}
if [[ -z $binary ]]; then
    "${build[@]}" >&2
    binary=$target/$profile/workers
fi
args=(--binary "$binary" --runs "$runs" --dir "${CHAOS_DIR:-${TMPDIR:-/tmp}}")
[[ -n ${CHAOS_SEED:-} ]] && args+=(--seed "$CHAOS_SEED")
exec python3 scripts/chaos.py "${args[@]}"
