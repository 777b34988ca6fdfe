"""Revoke latency and idle CPU of `workers worker` (driven by benches/revoke_latency.sh).

A release `workers worker` on RabbitMQ (the pidbox and the task queue) with the embedded
registry and store (one SQLite file, read here directly), data in /dev/shm. A dataset of one
SIZE_MIB file is registered and its ingestion workflow runs; each time its inspect step (hashing
the file) and later its stage step (extracting the bundle) has run for OFFSET seconds, Celery's
`app.control.revoke(task_id, terminate=True)` is sent and the time until the task reads REVOKED
in the store is taken; the workflow is then resumed, RUNS times for each step. After each stage
revoke the staging area is checked for partial trees. Then the idle worker's CPU is measured
over WINDOW seconds with events on (`-E`: a heartbeat every 2 s) and off.
"""

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import celery

import sections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target", "release", "workers")
RUNS = int(os.environ.get("RUNS", "7"))
SIZE_MIB = int(os.environ.get("SIZE_MIB", "1024"))
WINDOW = int(os.environ.get("WINDOW", "60"))
# How long a step runs before it is revoked: well inside its work, which takes over a second.
OFFSET = float(os.environ.get("OFFSET", "0.4"))
AMQP = os.environ["WORKERS_TEST_AMQP_URL"]


def main():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = tempfile.mkdtemp(prefix="workers-revoke-", dir=base)
    app_id = f"bench-revoke-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("WORKERS"):
            del env[key]
    env.update({
        "WORKERS__BROKER__KIND": "amqp",
        "WORKERS__AMQP__URL": AMQP,
        "WORKERS__APP_ID": app_id,
        "WORKERS__LOG__LEVEL": "warn",
    })
    shutil.copytree(os.path.join(REPO, "config"), os.path.join(work, "config"))
    shutil.copytree(os.path.join(REPO, "jobs"), os.path.join(work, "jobs"))
    dataset = os.path.join(work, "examples", "raw_data", "big")
    os.makedirs(dataset)
    os.makedirs(os.path.join(work, "examples", "data_products"))
    with open(os.path.join(dataset, "data.bin"), "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(SIZE_MIB):
            f.write(block[i % 256:] + block[:i % 256])

    def workers(*args, **kw):
        return subprocess.run([BIN, "--config-dir", os.path.join(work, "config"), *args],
                              cwd=work, env=env, check=True, capture_output=True, text=True, **kw)

    control = celery.Celery(broker=AMQP).control
    worker = subprocess.Popen([BIN, "--config-dir", os.path.join(work, "config"), "worker",
                               "--hostname", "bench@%h", "--concurrency", "1"],
                              cwd=work, env=env, stderr=subprocess.DEVNULL)
    try:
        node = wait_for_node(control)
        workers("register", dataset, "--type", "RAW_DATA")
        db = sqlite3.connect(os.path.join(work, "var", "workers.db"), timeout=30)
        workflow_id = db.execute("SELECT id FROM workflows").fetchone()[0]
        results = {}
        for task in ("inspect_dataset", "stage_dataset"):
            results[task] = []
            for _ in range(RUNS):
                task_id = wait_for_active(control, node, task)
                time.sleep(OFFSET)
                t0 = time.monotonic()
                control.revoke(task_id, terminate=True)
                while status(db, task_id) != "REVOKED":
                    if status(db, task_id) == "SUCCESS":
                        raise SystemExit(f"{task} ended before its revoke; raise SIZE_MIB")
                    if time.monotonic() - t0 > 60:
                        raise SystemExit(f"{task} {task_id} was not revoked within 60 s")
                    time.sleep(0.005)
                took = time.monotonic() - t0
                partial = partial_trees(work) if task == "stage_dataset" else 0
                results[task].append({"seconds": took, "partial": partial})
                workers("workflows", "resume", workflow_id)
        # The last resume runs the workflow to its end, so the idle workers find nothing to do.
        deadline = time.monotonic() + 600
        while db.execute("SELECT status FROM workflows WHERE id = ?",
                         (workflow_id,)).fetchone()[0] != "SUCCESS":
            if time.monotonic() > deadline:
                raise SystemExit("the workflow did not finish after its last resume")
            time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait()
    idle = {}
    # An idle worker without events, then one with them (-E).
    for key, flags in (("off", []), ("on", ["-E"])):
        worker = subprocess.Popen([BIN, "--config-dir", os.path.join(work, "config"), "worker",
                                   "--hostname", f"bench-{key}@%h", *flags], cwd=work, env=env,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_for_node(control, f"bench-{key}@")
            idle[key] = idle_cpu(worker)
        finally:
            worker.terminate()
            worker.wait()
    subprocess.run(["rabbitmqctl", "delete_queue", f"{app_id}.q"], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"results": results, "idle": idle}, indent=1))
    write_section(results, idle)


def wait_for_node(control, prefix="bench@"):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for reply in control.ping(timeout=1):
            for node in reply:
                if node.startswith(prefix):
                    return node
    raise SystemExit("the worker never answered ping")


def wait_for_active(control, node, task):
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        replies = control.inspect(timeout=1, destination=[node]).active() or {}
        for item in replies.get(node, []):
            if item["name"] == task:
                return item["id"]
        time.sleep(0.05)
    raise SystemExit(f"{task} never ran")


def status(db, task_id):
    row = db.execute("SELECT status FROM task_meta WHERE task_id = ?", (task_id,)).fetchone()
    return row[0] if row else None


def partial_trees(work):
    """Partial trees and bundles left anywhere under var/ (`*.partial`)."""
    found = 0
    for root, dirs, files in os.walk(os.path.join(work, "var")):
        found += sum(1 for name in dirs + files if name.endswith(".partial"))
    return found


def idle_cpu(worker):
    """CPU seconds of the worker over WINDOW seconds, after 5 s of warm-up."""
    time.sleep(5)
    hz = os.sysconf("SC_CLK_TCK")

    def ticks():
        with open(f"/proc/{worker.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    t0 = ticks()
    time.sleep(WINDOW)
    return (ticks() - t0) / hz


def write_section(results, idle):
    def summary(task):
        secs = [r["seconds"] for r in results[task]]
        return statistics.median(secs), max(secs), sum(r["partial"] for r in results[task])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    rows = []
    for task, label in (("inspect_dataset", f"inspect (hashing one {SIZE_MIB} MiB file)"),
                        ("stage_dataset", f"stage (extracting its {SIZE_MIB} MiB bundle)")):
        med, worst, partial = summary(task)
        each = ", ".join("%.3f" % r["seconds"] for r in results[task])
        rows.append(f"| {label} | {med:.3f} s | {worst:.3f} s | {'met' if med < 2 else 'NOT met'} | {each} |")
    on, off = idle["on"], idle["off"]
    stage_partial = summary("stage_dataset")[2]
    section = f"""<!-- remote-control:begin -->
## Revoke latency and idle CPU with events

Generated by `benches/revoke_latency.sh` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC at
commit {commit}, {os.cpu_count()} CPUs, data in /dev/shm. A release `workers worker` (one slot) on
RabbitMQ, with the embedded registry and store. Each step was revoked {OFFSET} s after it started
running, by Celery's own `app.control.revoke(task_id, terminate=True)`; the time is from that call
to the task reading REVOKED in the store (polled every 5 ms), {RUNS} runs each, the workflow
resumed after each.

| Step revoked | Median | Worst | Target (< 2 s) | Each run |
|---|---|---|---|---|
{chr(10).join(rows)}

- Every revoked step was in the middle of its work (hashing, extracting): a step that ended
  before its revoke stops the benchmark, so none did. The time includes RabbitMQ's hop, the
  cancellation of the pool job (checked per 1 MiB chunk and per member), the removal of its partial
  work and the REVOKED write.
- Partial trees or bundles left after the stage revokes: {stage_partial}.
- Idle worker CPU over {WINDOW} s: {on:.2f} s with events on (`-E`, a heartbeat every 2 s) =
  {on / WINDOW * 100:.3f} % of one core; {off:.2f} s with events off = {off / WINDOW * 100:.3f} %.

Reproduce: `benches/revoke_latency.sh` (environment: `RUNS`, `SIZE_MIB`, `WINDOW`, `OFFSET`).
<!-- remote-control:end -->"""
    sections.write_section("remote-control", section)


if __name__ == "__main__":
    sys.exit(main())
