#!/usr/bin/env bash
# Upload manifest benchmarks (spec C.5.3): `workers uploads manifest` (release build) against
# `b3sum` on one large file, and against the original Python check (benches/reference_manifest.py)
# on many small files, with `b3sum` over the same files for information. Warm cache, alternating
# runs, medians; the result goes into BENCHMARKS.md between the upload-manifest markers.
#
#   BENCH_DIR=/dev/shm/workers-bench  data (the small-file tree is run.sh's inspect data, shared),
#                                     outputs and raw results; nothing outside it is deleted
#   RUNS=7                            timed runs per side
#   LARGE_SIZE_MB=1024                one file of this many MiB
#   SMALL_FILES=50000                 this many files of 4 KiB in 100 directories
#   BENCH_PYTHON                      a Python with the `blake3` package
#                                     [default: $WORKERS_TEST_PYTHON, else python3]
#
# `b3sum` is installed from Debian's packages when missing and this runs as root; otherwise its
# comparisons are skipped with a note.
set -euo pipefail
# EPOCHREALTIME and awk must agree on the decimal point.
export LC_ALL=C

die() {
    echo "manifest.sh: $*" >&2
    exit 1
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"

RUNS=${RUNS:-7}
LARGE_SIZE_MB=${LARGE_SIZE_MB:-1024}
SMALL_FILES=${SMALL_FILES:-50000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
for var in RUNS LARGE_SIZE_MB SMALL_FILES; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive integer, not '${!var}'"
done
[[ -n ${EPOCHREALTIME:-} ]] || die "bash 5 or later is needed (EPOCHREALTIME)"
command -v cargo >/dev/null || die "'cargo' is missing: install Rust (https://rustup.rs)"
command -v python3 >/dev/null || die "'python3' is missing: the data generator and report need it"

BENCH_PYTHON=${BENCH_PYTHON:-${WORKERS_TEST_PYTHON:-python3}}
"$BENCH_PYTHON" -c 'import blake3' 2>/dev/null ||
    die "$BENCH_PYTHON has no blake3 package: pip install blake3, or set BENCH_PYTHON"

HAVE_B3SUM=1
if ! command -v b3sum >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "b3sum: installing the Debian package"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q b3sum >&2 || true
    fi
    if ! command -v b3sum >/dev/null 2>&1; then
        echo "note: b3sum is not installed and cannot be installed here; its comparisons are skipped" >&2
        HAVE_B3SUM=0
    fi
fi

BENCH_DIR=${BENCH_DIR:-/dev/shm/workers-bench}
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd -P)
[[ $BENCH_DIR != / ]] || die "BENCH_DIR must not be /"

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
    python3 benches/generate.py "$kind" "$path" "$amount"
}

elapsed() {
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.6f", b - a }'
}

warm() {
    find "$1" -type f -print0 | xargs -0 -r cat >/dev/null
}

RESULTS=$BENCH_DIR/manifest-results.tsv
remove_in_bench "$RESULTS"
: >"$RESULTS"

# timed BENCH SIDE RUN COMMAND...: runs COMMAND (output discarded), records its wall time
# taken from this shell, start-up included.
timed() {
    local bench=$1 side=$2 run=$3 start
    shift 3
    start=$EPOCHREALTIME
    "$@" >/dev/null || die "$bench: run $run of $side failed: $*"
    printf '%s\t%s\t%s\t%s\n' "$bench" "$side" "$run" "$(elapsed "$start")" >>"$RESULTS"
}

# python_timed BENCH RUN DIR: the Python reference, timed inside the process (its start-up
# and imports excluded, in its favour).
python_timed() {
    local line
    line=$("$BENCH_PYTHON" benches/reference_manifest.py "$3") || die "$1: the Python reference failed"
    printf '%s\t%s\t%s\t%s\n' "$1" python "$2" "$(json_field "$line" seconds)" >>"$RESULTS"
}

json_field() {
    python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"
}

# Peak RSS (kB) of one run of ours over DIR, when GNU time is there.
ours_rss() {
    if [[ -x /usr/bin/time ]]; then
        (cd "$RUN_DIR" && env -u WORKERS_CONFIG_DIR -u APP_ENV /usr/bin/time -f '%M' \
            "$BIN" uploads manifest "$1" --format json 2>&1 >/dev/null | tail -1)
    else
        echo "?"
    fi
}

echo "build: cargo build --release --bin workers (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --release --locked --quiet --bin workers
BIN=$CARGO_TARGET_DIR/release/workers
# Ours runs where no configuration is, so it uses one pool thread per core.
RUN_DIR=$BENCH_DIR/manifest-cwd
mkdir -p "$RUN_DIR"
ours() {
    (cd "$RUN_DIR" && env -u WORKERS_CONFIG_DIR -u APP_ENV "$BIN" uploads manifest "$1" --format json)
}

# --- one large file -------------------------------------------------------------------------
LARGE_DIR=$BENCH_DIR/manifest-file-${LARGE_SIZE_MB}MiB
mkdir -p "$LARGE_DIR"
ensure_data file "$LARGE_DIR/data.bin" "$LARGE_SIZE_MB"
echo "large: warming up and checking"
warm "$LARGE_DIR"
our_hash=$(json_field "$(ours "$LARGE_DIR")" hash)
ref_hash=$(json_field "$("$BENCH_PYTHON" benches/reference_manifest.py "$LARGE_DIR")" hash)
[[ $our_hash == "$ref_hash" ]] || die "large: ours ($our_hash) and Python ($ref_hash) disagree"
if [[ $HAVE_B3SUM == 1 ]]; then
    file_hash=$(b3sum --no-names "$LARGE_DIR/data.bin")
    size=$(stat -c %s "$LARGE_DIR/data.bin")
    expected=$(printf 'blake3-manifest-v1\ndata.bin\t%s\t%s' "$size" "$file_hash" | b3sum --no-names)
    [[ $our_hash == "$expected" ]] || die "large: ours ($our_hash) and b3sum's manifest ($expected) disagree"
fi
for run in $(seq "$RUNS"); do
    if [[ $HAVE_B3SUM == 1 ]]; then
        timed large b3sum "$run" b3sum "$LARGE_DIR/data.bin"
    fi
    timed large ours "$run" ours "$LARGE_DIR"
    echo "large: run $run/$RUNS done"
done
LARGE_RSS=$(ours_rss "$LARGE_DIR")

# --- many small files -----------------------------------------------------------------------
SMALL_DIR=$BENCH_DIR/inspect-${SMALL_FILES}
ensure_data inspect "$SMALL_DIR" "$SMALL_FILES"
echo "small: warming up and checking"
warm "$SMALL_DIR"
SMALL_LIST=$BENCH_DIR/manifest-small-files.list
(cd "$SMALL_DIR" && find . -type f -print0 | sort -z) >"$SMALL_LIST"
b3sum_files() {
    (cd "$SMALL_DIR" && xargs -0 b3sum <"$SMALL_LIST")
}
our_hash=$(json_field "$(ours "$SMALL_DIR")" hash)
ref=$("$BENCH_PYTHON" benches/reference_manifest.py "$SMALL_DIR")
[[ $our_hash == "$(json_field "$ref" hash)" ]] || die "small: ours and Python disagree"
[[ $(json_field "$ref" files) == "$SMALL_FILES" ]] || die "small: Python found $(json_field "$ref" files) files"
[[ $HAVE_B3SUM == 0 ]] || b3sum_files >/dev/null
for run in $(seq "$RUNS"); do
    python_timed small "$run" "$SMALL_DIR"
    timed small ours "$run" ours "$SMALL_DIR"
    if [[ $HAVE_B3SUM == 1 ]]; then
        timed small b3sum "$run" b3sum_files
    fi
    echo "small: run $run/$RUNS done"
done
SMALL_RSS=$(ours_rss "$SMALL_DIR")
PYTHON_RSS=$(json_field "$ref" peak_rss_kb)
remove_in_bench "$SMALL_LIST"

B3SUM_VERSION=$([[ $HAVE_B3SUM == 1 ]] && b3sum --version || echo "not installed")
export RUNS LARGE_SIZE_MB SMALL_FILES LARGE_RSS SMALL_RSS PYTHON_RSS B3SUM_VERSION BENCH_DIR
export PYTHON_VERSION=$("$BENCH_PYTHON" -c 'import sys, blake3; print(f"Python {sys.version.split()[0]}, blake3 {blake3.__version__}")')
export COMMIT=$(git rev-parse --short HEAD)
export DIRTY=$([[ -z $(git status --porcelain --untracked-files=no -- . ':!BENCHMARKS.md') ]] || echo " (with uncommitted changes)")
export THREADS=$(nproc)
export FS=$(df -hT "$BENCH_DIR" | tail -1 | awk '{print $1 " (" $2 ")"}')
python3 - "$RESULTS" <<'PY'
import os, pathlib, re, statistics, sys, datetime
from collections import defaultdict

runs = defaultdict(lambda: defaultdict(list))
for line in open(sys.argv[1]):
    bench, side, run, seconds = line.rstrip("\n").split("\t")
    runs[bench][side].append(float(seconds))
env = os.environ
n_runs = int(env["RUNS"])
large_mb = int(env["LARGE_SIZE_MB"])
small = int(env["SMALL_FILES"])
med = {b: {s: statistics.median(v) for s, v in sides.items()} for b, sides in runs.items()}


def table(bench, sides, labels):
    rows = ["| Run | " + " | ".join(f"{l} (s)" for l in labels) + " |",
            "|---" * (len(labels) + 1) + "|"]
    for i in range(n_runs):
        rows.append(f"| {i + 1} | " + " | ".join(f"{runs[bench][s][i]:.3f}" for s in sides) + " |")
    rows.append("| **median** | " + " | ".join(f"**{med[bench][s]:.3f}**" for s in sides) + " |")
    return rows


def verdict(ratio, target):
    return "met" if ratio >= target else "NOT met"


has_b3 = "b3sum" in runs["large"]
out = ["<!-- upload-manifest:begin -->", "## Upload manifest (BLAKE3, spec C.5.3)", ""]
out.append(f"Generated by `benches/manifest.sh` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
           f"at commit {env['COMMIT']}{env['DIRTY']}; {env['THREADS']} CPUs, data in `{env['BENCH_DIR']}` on {env['FS']}, "
           "warm cache, sides alternating, each warmed once untimed.")
out.append(f"Ours: `workers uploads manifest DIR --format json` (release build, one pool thread per CPU), "
           "timed from the shell, process start-up included. "
           f"Baselines: `{env['B3SUM_VERSION']}`, timed the same way; the original Python check "
           f"(`benches/reference_manifest.py`, {env['PYTHON_VERSION']}), timed inside the process "
           "(interpreter start-up excluded, in its favour). Before the timed runs, the script checks that "
           "ours gives the same manifest hash as the Python reference, and as b3sum's file hash put into "
           "a manifest. Ratio = baseline median / our median (above 1: ours is faster).")
out.append("")
out.append(f"### One file of {large_mb} MiB")
out.append("")
if has_b3:
    out += table("large", ["b3sum", "ours"], ["b3sum FILE", "ours"])
    r = med["large"]["b3sum"] / med["large"]["ours"]
    out.append("")
    out.append(f"- Throughput: b3sum {large_mb * 1048576 / med['large']['b3sum'] / 1e6:,.0f} MB/s, "
               f"ours {large_mb * 1048576 / med['large']['ours'] / 1e6:,.0f} MB/s")
    out.append(f"- Ratio (b3sum / ours): **{r:.2f}x**; target >= 1x: **{verdict(r, 1.0)}**")
    out.append("- Why the gap: b3sum maps the file (mmap) and hashes the page cache in place; ours reads it, so "
               "every byte is also copied (spread over the pool, 1 MiB BLAKE3 subtrees read at their own "
               "offsets, each hashed while in cache). Reads are kept on purpose: a mapped file truncated "
               "meanwhile kills the whole worker (SIGBUS), a mapping cannot be cancelled or report progress "
               "part-way, and mapping needs `unsafe`, which this crate denies.")
else:
    out += table("large", ["ours"], ["ours"])
    out.append("")
    out.append("- b3sum was not available: no comparison.")
out.append(f"- Peak RSS, ours: {int(env['LARGE_RSS']) / 1024:.1f} MiB" if env["LARGE_RSS"].isdigit() else "")
out.append("")
out.append(f"### {small:,} files of 4 KiB in 100 directories")
out.append("")
sides, labels = ["python", "ours"], ["Python", "ours"]
if has_b3:
    sides.append("b3sum")
    labels.append("b3sum (info)")
out += table("small", sides, labels)
r = med["small"]["python"] / med["small"]["ours"]
out.append("")
out.append(f"- Files/s: Python {small / med['small']['python']:,.0f}, ours {small / med['small']['ours']:,.0f}"
           + (f", b3sum {small / med['small']['b3sum']:,.0f}" if has_b3 else ""))
out.append(f"- Speed-up over Python: **{r:.2f}x**; target >= 2x: **{verdict(r, 2.0)}**")
if has_b3:
    out.append(f"- For information, b3sum over the same files (`xargs -0 b3sum`, one file after another): "
               f"b3sum / ours = {med['small']['b3sum'] / med['small']['ours']:.2f}x")
if env["SMALL_RSS"].isdigit():
    out.append(f"- Peak RSS: Python {int(env['PYTHON_RSS']) / 1024:.1f} MiB, ours {int(env['SMALL_RSS']) / 1024:.1f} MiB")
out.append("")
out.append(f"Reproduce: `RUNS={n_runs} LARGE_SIZE_MB={large_mb} SMALL_FILES={small} BENCH_DIR={env['BENCH_DIR']} benches/manifest.sh` "
           "(needs `b3sum`, installed from Debian's packages when run as root, and a Python with the `blake3` "
           "package: `BENCH_PYTHON`, by default `$WORKERS_TEST_PYTHON` from `scripts/services.sh`). "
           "Raw times: `BENCH_DIR/manifest-results.tsv`.")
out.append("<!-- upload-manifest:end -->")
section = "\n".join(line for line in out if line is not None)
path = pathlib.Path("BENCHMARKS.md")
text = path.read_text() if path.exists() else "# Benchmarks\n"
pattern = re.compile(r"<!-- upload-manifest:begin -->.*?<!-- upload-manifest:end -->", re.S)
text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
path.write_text(text)
print(section)
PY
