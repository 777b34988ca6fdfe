#!/usr/bin/env bash
# Data-path benchmarks: ours against the baselines (openssl, the original Python inspect,
# tar + md5sum), warm cache, alternating runs, medians, written to BENCHMARKS.md.
#
# Sizes (defaults are the full benchmark; use small values to check the script works):
#   BENCH_DIR=/tmp/workers-bench  data, outputs and raw results; nothing outside it is deleted
#   RUNS=5                        timed runs per side
#   THREADS=2                     CPU pool threads given to ours
#   MD5_SIZE_MB=1024              MD5 of one file of this many MiB
#   INSPECT_FILES=50000           inspect of this many 4 KiB files
#   ARCHIVE_SIZE_MB=2048          tar + MD5 of this many MiB of mixed files
#   RSS_FILES=1000000             peak memory of inspect over this many tiny files
#   ARCHIVE_BASELINE_SYNC=0       1: the tar baseline also fsyncs its output, as ours does
#   STAGE_DIR=BENCH_DIR/out       where the stage benchmark extracts: put it on a real disk to
#                                 measure what the fsyncs cost (on tmpfs they cost nothing)
set -euo pipefail
# EPOCHREALTIME and awk must agree on the decimal point.
export LC_ALL=C

die() {
    echo "run.sh: $*" >&2
    exit 1
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"

export RUNS=${RUNS:-5}
export THREADS=${THREADS:-2}
export MD5_SIZE_MB=${MD5_SIZE_MB:-1024}
export INSPECT_FILES=${INSPECT_FILES:-50000}
export ARCHIVE_SIZE_MB=${ARCHIVE_SIZE_MB:-2048}
export RSS_FILES=${RSS_FILES:-1000000}
export ARCHIVE_BASELINE_SYNC=${ARCHIVE_BASELINE_SYNC:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}

for var in RUNS THREADS MD5_SIZE_MB INSPECT_FILES ARCHIVE_SIZE_MB RSS_FILES; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive integer, not '${!var}'"
done
[[ $ARCHIVE_BASELINE_SYNC =~ ^[01]$ ]] || die "ARCHIVE_BASELINE_SYNC must be 0 or 1"

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is missing: $2"
}
need cargo "install Rust (https://rustup.rs)"
need rustc "install Rust (https://rustup.rs)"
need python3 "the Python reference, data generator and report need Python 3"
need openssl "the MD5 baseline is 'openssl dgst -md5'"
need tar "the archive baseline is GNU tar"
need md5sum "the archive baseline uses md5sum (coreutils)"
need sync "coreutils"
need df "coreutils"
need nproc "coreutils"
need find "findutils"
need xargs "findutils"
need awk "any awk"
need seq "coreutils"
need cut "coreutils"
need wc "coreutils"
tar --version 2>/dev/null | grep -q 'GNU tar' || die "'tar' is not GNU tar"
[[ -n ${EPOCHREALTIME:-} ]] || die "bash 5 or later is needed (EPOCHREALTIME)"

BENCH_DIR=${BENCH_DIR:-/tmp/workers-bench}
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd -P)
[[ $BENCH_DIR != / ]] || die "BENCH_DIR must not be /"
export BENCH_DIR

# The only way this script deletes anything: the path must be strictly inside BENCH_DIR.
remove_in_bench() {
    local target
    for target in "$@"; do
        case "$target" in
        "$BENCH_DIR"/*/../* | "$BENCH_DIR"/../*) die "refusing to delete '$target'" ;;
        "$BENCH_DIR"/?*) rm -rf -- "$target" ;;
        *) die "refusing to delete '$target': it is not inside $BENCH_DIR" ;;
        esac
    done
}

# Creates `path` with generate.py unless it exists (a path that exists is complete).
ensure_data() {
    local kind=$1 path=$2 amount=$3
    if [[ -e $path ]]; then
        echo "data: reusing $path"
        return
    fi
    remove_in_bench "$path.partial"
    echo "data: generating $path ..."
    local start=$EPOCHREALTIME
    python3 benches/generate.py "$kind" "$path" "$amount"
    echo "data: done in $(elapsed "$start") s"
}

elapsed() {
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.6f", b - a }'
}

# Reads every file below (or at) `path` once, so every timed run starts from a warm cache.
warm() {
    find "$1" -type f -print0 | xargs -0 -r cat >/dev/null
}

RESULTS=$BENCH_DIR/results.tsv
remove_in_bench "$RESULTS"
: >"$RESULTS"

# record BENCH SIDE RUN JSON
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"
}

json_field() {
    python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"
}

# Times a shell command line from outside (wall clock, in this shell: no extra bash start-up);
# prints a JSON line like the driver's.
time_shell() {
    local op=$1 cmd=$2 start seconds
    start=$EPOCHREALTIME
    eval "$cmd" >/dev/null || return 1
    seconds=$(elapsed "$start")
    printf '{"op": "%s", "seconds": %s}' "$op" "$seconds"
}

# record_run BENCH SIDE RUN COMMAND...: runs COMMAND, which prints one JSON line, and records it.
record_run() {
    local bench=$1 side=$2 run=$3 line
    shift 3
    line=$("$@") || die "$bench: run $run of $side failed: $*"
    record "$bench" "$side" "$run" "$line"
}

echo "build: cargo bench --bench data_path --no-run (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
BIN=$(benches/data_path_bin.sh)
[[ -x $BIN ]] || die "cannot find the data_path benchmark binary after the build"
echo "build: $BIN"
# The inspect step's temporary project (database, scratch) lives next to the data.
export TMPDIR=$BENCH_DIR/tmp
mkdir -p "$TMPDIR"

# --- MD5 of one large file ----------------------------------------------------------------
MD5_FILE=$BENCH_DIR/md5-${MD5_SIZE_MB}MiB.bin
ensure_data file "$MD5_FILE" "$MD5_SIZE_MB"
echo "md5: warming up"
warm "$MD5_FILE"
ours=$("$BIN" md5 "$MD5_FILE")
theirs=$(openssl dgst -md5 -r "$MD5_FILE" | cut -d' ' -f1)
[[ $(json_field "$ours" md5) == "$theirs" ]] || die "md5: ours and openssl disagree"
for run in $(seq "$RUNS"); do
    sync
    record_run md5 baseline "$run" time_shell openssl-md5 "openssl dgst -md5 '$MD5_FILE'"
    sync
    record_run md5 ours "$run" "$BIN" md5 "$MD5_FILE"
    echo "md5: run $run/$RUNS done"
done

# --- inspect of many small files ----------------------------------------------------------
INSPECT_DIR=$BENCH_DIR/inspect-${INSPECT_FILES}
ensure_data inspect "$INSPECT_DIR" "$INSPECT_FILES"
echo "inspect: warming up"
warm "$INSPECT_DIR"
ref=$(python3 benches/reference_inspect.py "$INSPECT_DIR")
step=$("$BIN" inspect-step "$INSPECT_DIR" "$THREADS")
tree=$("$BIN" inspect-tree "$INSPECT_DIR" "$THREADS")
for out in "$step" "$tree"; do
    [[ $(json_field "$out" files) == "$(json_field "$ref" files)" ]] ||
        die "inspect: file counts differ: Python $ref, ours $out"
done
for run in $(seq "$RUNS"); do
    sync
    record_run inspect baseline "$run" python3 benches/reference_inspect.py "$INSPECT_DIR"
    sync
    record_run inspect ours-step "$run" "$BIN" inspect-step "$INSPECT_DIR" "$THREADS"
    sync
    record_run inspect ours-tree "$run" "$BIN" inspect-tree "$INSPECT_DIR" "$THREADS"
    echo "inspect: run $run/$RUNS done"
done

# --- tar bundle and its MD5 ---------------------------------------------------------------
ARCHIVE_DIR=$BENCH_DIR/archive-${ARCHIVE_SIZE_MB}MiB
OUT_DIR=$BENCH_DIR/out
OUT=$OUT_DIR/bundle.tar
ensure_data archive "$ARCHIVE_DIR" "$ARCHIVE_SIZE_MB"
mkdir -p "$OUT_DIR"
if [[ $ARCHIVE_BASELINE_SYNC == 1 ]]; then
    BASELINE="tar cf '$OUT' -C '$ARCHIVE_DIR' . && sync '$OUT' && md5sum '$OUT'"
else
    BASELINE="tar cf '$OUT' -C '$ARCHIVE_DIR' . && md5sum '$OUT'"
fi
echo "archive: warming up"
warm "$ARCHIVE_DIR"
remove_in_bench "$OUT"
eval "$BASELINE" >/dev/null
remove_in_bench "$OUT"
ours=$("$BIN" bundle "$ARCHIVE_DIR" "$OUT" "$THREADS")
[[ $(json_field "$ours" md5) == "$(md5sum "$OUT" | cut -d' ' -f1)" ]] ||
    die "archive: the MD5 ours reports is not md5sum's of the bundle"
expected=$(find "$ARCHIVE_DIR" -type f | wc -l)
[[ $(json_field "$ours" files) == "$expected" ]] ||
    die "archive: ours bundled $(json_field "$ours" files) of $expected files"
for run in $(seq "$RUNS"); do
    remove_in_bench "$OUT"
    sync
    record_run archive baseline "$run" time_shell tar-md5sum "$BASELINE"
    remove_in_bench "$OUT"
    sync
    record_run archive ours "$run" "$BIN" bundle "$ARCHIVE_DIR" "$OUT" "$THREADS"
    echo "archive: run $run/$RUNS done"
done
remove_in_bench "$OUT"

# --- stage: extraction of the bundle, with and without the fsyncs -------------------------
STAGE_DIR=${STAGE_DIR:-$OUT_DIR}
mkdir -p "$STAGE_DIR"
STAGE_DIR=$(cd "$STAGE_DIR" && pwd -P)
export STAGE_DIR
STAGE_BUNDLE=$STAGE_DIR/stage.tar
STAGE_DEST=$STAGE_DIR/staged
remove_stage() {
    local target
    for target in "$@"; do
        case "$target" in
        "$STAGE_DIR"/stage.tar | "$STAGE_DIR"/staged) rm -rf -- "$target" ;;
        *) die "refusing to delete '$target'" ;;
        esac
    done
}
remove_stage "$STAGE_BUNDLE" "$STAGE_DEST"
"$BIN" bundle "$ARCHIVE_DIR" "$STAGE_BUNDLE" "$THREADS" >/dev/null
echo "stage: warming up"
warm "$STAGE_BUNDLE"
mkdir -p "$STAGE_DEST"
tar xf "$STAGE_BUNDLE" -C "$STAGE_DEST"
remove_stage "$STAGE_DEST"
"$BIN" extract "$STAGE_BUNDLE" "$STAGE_DEST" "$THREADS" 1 >/dev/null
expected=$(find "$ARCHIVE_DIR" -type f | wc -l)
[[ $(find "$STAGE_DEST" -type f | wc -l) == "$expected" ]] || die "stage: ours extracted the wrong number of files"
for run in $(seq "$RUNS"); do
    remove_stage "$STAGE_DEST"
    mkdir -p "$STAGE_DEST"
    sync
    record_run stage baseline "$run" time_shell tar-x "tar xf '$STAGE_BUNDLE' -C '$STAGE_DEST'"
    remove_stage "$STAGE_DEST"
    mkdir -p "$STAGE_DEST"
    sync
    record_run stage baseline-sync "$run" time_shell tar-x-sync "tar xf '$STAGE_BUNDLE' -C '$STAGE_DEST' && sync -f '$STAGE_DEST'"
    remove_stage "$STAGE_DEST"
    sync
    record_run stage ours-nosync "$run" "$BIN" extract "$STAGE_BUNDLE" "$STAGE_DEST" "$THREADS" 0
    remove_stage "$STAGE_DEST"
    sync
    record_run stage ours "$run" "$BIN" extract "$STAGE_BUNDLE" "$STAGE_DEST" "$THREADS" 1
    echo "stage: run $run/$RUNS done"
done
remove_stage "$STAGE_BUNDLE" "$STAGE_DEST"

# --- memory of the inspect step over a huge tree ------------------------------------------
RSS_DIR=$BENCH_DIR/tiny-${RSS_FILES}
ensure_data tiny "$RSS_DIR" "$RSS_FILES"
echo "rss: warming up"
warm "$RSS_DIR"
sync
record_run rss ours-step 1 "$BIN" inspect-step "$RSS_DIR" "$THREADS"
echo "rss: done"

python3 benches/report.py "$RESULTS" "$REPO/BENCHMARKS.md"
echo "wrote $REPO/BENCHMARKS.md (raw results: $RESULTS)"
