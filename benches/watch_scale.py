#!/usr/bin/env python3
"""Watch at scale: `workers jobs run watch` on a source directory of N run directories (default
100,000), against a Python reference of the original's algorithm, in one run.

Each repetition, in a fresh project on tmpfs (/dev/shm when it exists):
1. register: the first watch run registers all N directories and starts their workflows
   (embedded profile: SQLite registry, store and queue). Rate = N / wall time; peak RSS from
   wait4().
2. full: `watch --full` over the N directories, all registered, beside the reference: the
   original's listing (`Path.iterdir()` and `is_dir()`, spec C.1) and a set difference with the
   names registered (read from the same SQLite file).
3. incremental: a second plain `watch` (only directories not seen before).

Run through benches/watch_scale.sh (which builds the release binary). Prints a JSON summary and
writes the section between the watch-scale markers of BENCHMARKS.md.
"""

import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

import sections

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.environ.get("WORKERS_BIN", os.path.join(ROOT, "target", "release", "workers"))
N = int(os.environ.get("DATASETS", "100000"))
REPEAT = int(os.environ.get("REPEAT", "3"))


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def project():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = tempfile.mkdtemp(prefix="workers-watch-scale-", dir=base)
    for sub in ("config", "jobs"):
        shutil.copytree(os.path.join(ROOT, sub), os.path.join(root, sub))
    raw = os.path.join(root, "raw")
    os.makedirs(raw)
    os.makedirs(os.path.join(root, "products"))
    for i in range(N):
        os.mkdir(os.path.join(raw, f"run_{i:06d}_A00{i % 7}_FC{i:05d}"))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ALIAS_SALT": "bench",
        "WORKERS__REGISTRATION__RAW_DATA__SOURCE_DIR": raw,
        "WORKERS__REGISTRATION__DATA_PRODUCT__SOURCE_DIR": os.path.join(root, "products"),
        "WORKERS__LOG__LEVEL": "warn",
    }
    return root, raw, env


def run_watch_rss(root, env, *extra):
    """Runs one watch; returns (wall seconds, peak RSS in MB from wait4, the run's counters
    from the job history)."""
    config = ["--config-dir", os.path.join(root, "config")]
    with open(os.path.join(root, "watch.log"), "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([BIN, *config, "jobs", "run", "watch", *extra], cwd=root,
                                env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    if status != 0:
        with open(os.path.join(root, "watch.log"), "rb") as log:
            sys.exit(f"watch failed: {log.read().decode(errors='replace')[-2000:]}")
    history = subprocess.run([BIN, *config, "jobs", "history", "watch", "--limit", "1",
                              "--format", "json"], cwd=root, env=env, check=True,
                             capture_output=True)
    return wall, usage.ru_maxrss / 1024, json.loads(history.stdout)[0]["counters"]


def reference_full_scan(raw, db_path):
    """The original's algorithm (spec C.1): list the immediate children with `Path.is_dir()`
    (which follows links), take away the names registered."""
    start = time.perf_counter()
    candidates = [p.name for p in pathlib.Path(raw).iterdir() if p.is_dir()]
    with sqlite3.connect(db_path) as db:
        registered = {row[0] for row in db.execute(
            "SELECT name FROM datasets WHERE type = 'RAW_DATA' AND is_deleted = 0")}
    new = [name for name in candidates if name not in registered]
    return time.perf_counter() - start, len(new)


def one_round():
    root, raw, env = project()
    try:
        reg_wall, reg_rss, reg_report = run_watch_rss(root, env)
        registered = reg_report.get("registered")
        if registered != N:
            sys.exit(f"the first watch registered {registered} datasets, not {N}: {reg_report}")
        db_path = os.path.join(root, "var", "workers.db")
        full_wall, full_rss, full_report = run_watch_rss(root, env, "--full")
        ref_wall, ref_new = reference_full_scan(raw, db_path)
        if ref_new != 0 or full_report.get("registered") != 0:
            sys.exit(f"after registering, the full scans found new directories: {full_report}")
        inc_wall, _, _ = run_watch_rss(root, env)
        return {
            "register_seconds": reg_wall,
            "register_per_second": N / reg_wall,
            "register_peak_rss_mb": reg_rss,
            "full_scan_seconds": full_wall,
            "full_scan_peak_rss_mb": full_rss,
            "reference_full_scan_seconds": ref_wall,
            "full_scan_ratio": full_wall / ref_wall,
            "incremental_scan_seconds": inc_wall,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    rounds = [one_round() for _ in range(REPEAT)]
    summary = {key: median([r[key] for r in rounds]) for key in rounds[0]}
    summary["rounds"] = rounds
    print(json.dumps(summary, indent=2))
    write_section(summary)


def write_section(s):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    each = lambda key, fmt: ", ".join(fmt % r[key] for r in s["rounds"])
    full_ok = s["full_scan_ratio"] <= 3
    rate_ok = s["register_per_second"] >= 5000
    section = f"""<!-- watch-scale:begin -->
## Watch at scale

Generated by `benches/watch_scale.sh` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC at
commit {commit}, {os.cpu_count()} CPUs. A source directory of {N:,} run directories on tmpfs,
embedded profile (SQLite registry, store and queue), release binary; medians of {REPEAT} rounds,
each in a fresh project.

| Measure | Median | Each round |
|---|---|---|
| Register all {N:,} (first `watch`, workflows started) | {s['register_seconds']:.2f} s = {s['register_per_second']:,.0f} datasets/s | {each('register_seconds', '%.2f s')} |
| Peak RSS while registering | {s['register_peak_rss_mb']:.0f} MB | {each('register_peak_rss_mb', '%.0f MB')} |
| `watch --full`, all registered | {s['full_scan_seconds']:.3f} s | {each('full_scan_seconds', '%.3f s')} |
| Python reference: the original's listing (`iterdir`, `is_dir`) + set difference | {s['reference_full_scan_seconds']:.3f} s | {each('reference_full_scan_seconds', '%.3f s')} |
| Full scan / reference | {s['full_scan_ratio']:.2f}x | {each('full_scan_ratio', '%.2fx')} |
| Incremental `watch`, nothing new | {s['incremental_scan_seconds']:.3f} s | {each('incremental_scan_seconds', '%.3f s')} |

- Full scan at most 3x the reference: {'met' if full_ok else 'NOT met'}. The `watch` figure is the
  whole command (process start, configuration, opening the database, the job history, the repair
  pass); the reference is the listing and the set difference alone.
- At least 5,000 registrations a second: {'met' if rate_ok else 'NOT met'}.

Reproduce: `benches/watch_scale.sh` (environment: `DATASETS`, `REPEAT`).
<!-- watch-scale:end -->"""
    sections.write_section("watch-scale", section)


if __name__ == "__main__":
    main()
