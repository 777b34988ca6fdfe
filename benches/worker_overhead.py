#!/usr/bin/env python3
"""Worker overhead through RabbitMQ and MongoDB: no-op steps, Rust worker vs the Python
Celery + sca-rhythm worker, on the same broker and store, in one run.

For each worker: start it (4 slots), create WORKFLOWS workflows of STEPS_PER_WORKFLOW `noop`
steps with sca-rhythm and start them all, wait until every workflow is SUCCESS, stop the
worker with SIGTERM, and read the CPU time of the worker and all its processes from wait4()
(user + system, children included). Also the peak RSS of an idle `workers worker` with 8
slots.

Run through benches/worker_overhead.sh (which builds the release binary and provides the
services). Prints a JSON summary and writes the section between the worker-overhead markers of
BENCHMARKS.md.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid

import pymongo
import pymongo.monitoring

import sections


class _OwnCommands(pymongo.monitoring.CommandListener):
    """Counts the MongoDB commands this benchmark process sends itself (creating and starting
    the workflows with sca-rhythm, polling for their end), to take them away from the server's
    counters: what is left is the worker's."""

    count = 0

    def started(self, event):
        _OwnCommands.count += 1

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


pymongo.monitoring.register(_OwnCommands())


def server_commands():
    """Every operation the MongoDB-wire server has counted (`serverStatus.opcounters`)."""
    client = pymongo.MongoClient(MONGO_URI)
    try:
        counters = client.admin.command("serverStatus")["opcounters"]
    finally:
        client.close()
    return sum(int(v) for v in counters.values())

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AMQP_URL = os.environ["WORKERS_TEST_AMQP_URL"]
MONGO_URI = os.environ["WORKERS_TEST_MONGO_URI"]
BIN = os.environ.get("WORKERS_BIN", os.path.join(ROOT, "target", "release", "workers"))
WORKFLOWS = int(os.environ.get("WORKFLOWS", "50"))
STEPS_PER_WORKFLOW = int(os.environ.get("STEPS_PER_WORKFLOW", "10"))
SLOTS = int(os.environ.get("SLOTS", "4"))
REPEAT = int(os.environ.get("REPEAT", "3"))


def mongo_uri_with_db(db):
    base, _, query = MONGO_URI.partition("?")
    base = base.rstrip("/")
    return f"{base}/{db}?{query}" if query else f"{base}/{db}"


def rust_worker(app_id, db, slots):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "APP_ENV": "production",
        "WORKERS_CONFIG_DIR": os.path.join(ROOT, "config"),
        "ALIAS_SALT": "bench",
        "APP_API_TOKEN": "unused-by-noop",
        "API_BASE_URL": "http://127.0.0.1:9/",
        "QUEUE_PASS": "unused",
        "WORKERS__AMQP__URL": AMQP_URL,
        "WORKERS__MONGO__URI": MONGO_URI,
        "WORKERS__MONGO__DATABASE": db,
        "WORKERS__APP_ID": app_id,
        "WORKERS__LOG__LEVEL": "warn",
        "WORKERS__LOG__FORMAT": "human",
    }
    return [BIN, "worker", "--concurrency", str(slots)], env


def python_worker(app_id, db, slots, original):
    env = dict(os.environ)
    env.update({
        "PYSIDE_AMQP_URL": AMQP_URL,
        "PYSIDE_MONGO_URI": mongo_uri_with_db(db),
        "PYSIDE_APP_ID": app_id,
    })
    script = os.path.join(ROOT, "tests", "interop", "pyside.py")
    return [sys.executable, script, "worker", f"{app_id}.q", str(slots), "1" if original else "0"], env


def start_workflows(app_id, db, count, steps):
    """Creates and starts the workflows with sca-rhythm, as rhythm_api would."""
    os.environ["PYSIDE_AMQP_URL"] = AMQP_URL
    os.environ["PYSIDE_MONGO_URI"] = mongo_uri_with_db(db)
    os.environ["PYSIDE_APP_ID"] = app_id
    sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))
    import importlib

    import pyside
    pyside = importlib.reload(pyside)
    step_list = [{"name": f"s{i}", "task": "noop", "queue": f"{app_id}.q"} for i in range(steps)]
    ids = []
    for n in range(count):
        wf = pyside.Workflow(pyside.app, steps=[dict(s) for s in step_list], name="noop",
                             app_id=app_id, description=None)
        wf.start(n + 1)
        ids.append(wf.workflow["_id"])
    return ids


def wait_all_succeeded(db, ids, timeout):
    col = pymongo.MongoClient(MONGO_URI)[db]["workflow_meta"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = col.count_documents({"_id": {"$in": ids}, "_status": "SUCCESS"})
        if done == len(ids):
            return True
        time.sleep(0.05)
    return False


class FreshServer:
    """A MongoDB-wire server (SecantusDB, `BENCH_SECANTUSD`) of its own for one run, its storage
    on tmpfs: the server slows down run after run as databases come and go (every worker's rate
    fell to a fifth after the first round on a shared one), so each run starts from nothing.
    Without `BENCH_SECANTUSD`, the server of WORKERS_TEST_MONGO_URI is shared."""

    def __enter__(self):
        global MONGO_URI
        self.proc = None
        server = os.environ.get("BENCH_SECANTUSD")
        if not server:
            return self
        import socket
        import tempfile
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.data = tempfile.mkdtemp(prefix="workers-bench-mongo-", dir=base)
        self.proc = subprocess.Popen(
            [server, "--host", "127.0.0.1", "--port", str(port), "--storage-path", self.data],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        MONGO_URI = f"mongodb://127.0.0.1:{port}/?directConnection=true"
        return self

    def __exit__(self, *_):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            import shutil
            shutil.rmtree(self.data, ignore_errors=True)


def run_side(name, make_command):
    with FreshServer():
        return run_side_on_server(name, make_command)


def run_side_on_server(name, make_command):
    app_id = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    db = f"bench_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    argv, env = make_command(app_id, db)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Let the worker connect and declare its queue before any message is published.
        time.sleep(5)
        # The server counts the commands of both workers and of this process; this process
        # counts its own (server_commands' own command is counted by the server and by the
        # listener alike).
        own_before = _OwnCommands.count
        server_before = server_commands()
        started = time.monotonic()
        ids = start_workflows(app_id, db, WORKFLOWS, STEPS_PER_WORKFLOW)
        ok = wait_all_succeeded(db, ids, timeout=1800)
        elapsed = time.monotonic() - started
        worker_commands = (server_commands() - server_before) - (_OwnCommands.count - own_before)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except ChildProcessError:
            usage, status = None, -1
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        subprocess.run(["rabbitmqctl", "delete_queue", f"{app_id}.q"], capture_output=True)
        pymongo.MongoClient(MONGO_URI).drop_database(db)
    if not ok:
        raise SystemExit(f"{name}: not every workflow succeeded in time\n{stderr[-4000:]}")
    steps = WORKFLOWS * STEPS_PER_WORKFLOW
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "worker": name,
        "steps": steps,
        "seconds": round(elapsed, 2),
        "steps_per_second": round(steps / elapsed, 1),
        "cpu_seconds": round(cpu, 2),
        "cpu_seconds_per_1000_steps": round(cpu * 1000 / steps, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "store_commands_per_step": round(worker_commands / steps, 2),
    }


def idle_rss(slots=8, seconds=10):
    with FreshServer():
        return idle_rss_on_server(slots, seconds)


def idle_rss_on_server(slots, seconds):
    app_id = f"bench-idle-{uuid.uuid4().hex[:8]}"
    db = f"bench_idle_{uuid.uuid4().hex[:8]}"
    argv, env = rust_worker(app_id, db, slots)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    with open(f"/proc/{proc.pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    subprocess.run(["rabbitmqctl", "delete_queue", f"{app_id}.q"], capture_output=True)
    pymongo.MongoClient(MONGO_URI).drop_database(db)
    return {"slots": slots, "seconds": seconds,
            "peak_rss_mb": round(int(status["VmHWM"].split()[0]) / 1024, 1)}


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main():
    sides = [
        ("rust", "`workers worker`", lambda a, d: rust_worker(a, d, SLOTS)),
        ("python-original", "Celery + sca-rhythm, original settings (one process per task)",
         lambda a, d: python_worker(a, d, SLOTS, True)),
        ("python-pool", "Celery + sca-rhythm, processes reused",
         lambda a, d: python_worker(a, d, SLOTS, False)),
    ]
    runs = {name: [] for name, _, _ in sides}
    # Interleaved, so that a noisy moment of the shared machine hits every side alike.
    for _ in range(REPEAT):
        for name, _, make in sides:
            result = run_side(name, make)
            print(json.dumps(result), file=sys.stderr, flush=True)
            runs[name].append(result)
    summary = {"runs": runs, "idle": idle_rss()}
    print(json.dumps(summary, indent=1))
    write_section(sides, runs, summary["idle"])


def write_section(sides, runs, idle):
    def med(name, key):
        return median([r[key] for r in runs[name]])

    rust_cpu = med("rust", "cpu_seconds_per_1000_steps")
    rows = []
    for name, label, _ in sides:
        cpu = med(name, "cpu_seconds_per_1000_steps")
        ratio = cpu / med("python-original", "cpu_seconds_per_1000_steps")
        each = ", ".join("%.2f s, %.1f/s" % (r["cpu_seconds_per_1000_steps"], r["steps_per_second"])
                         for r in runs[name])
        rows.append(
            f"| {label} | {cpu:.2f} s | {ratio:.3f}x | {med(name, 'steps_per_second'):.1f} | "
            f"{med(name, 'store_commands_per_step'):.1f} | "
            f"{med(name, 'peak_rss_mb'):.1f} MB | {each} |")
    pool_ratio = rust_cpu / med("python-pool", "cpu_seconds_per_1000_steps")
    rate_ratio = med("rust", "steps_per_second") / med("python-pool", "steps_per_second")
    rust_cmds = med("rust", "steps_per_second") * med("rust", "store_commands_per_step")
    pool_cmds = med("python-pool", "steps_per_second") * med("python-pool", "store_commands_per_step")
    orig_ratio = rust_cpu / med("python-original", "cpu_seconds_per_1000_steps")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    steps = WORKFLOWS * STEPS_PER_WORKFLOW
    section = f"""<!-- worker-overhead:begin -->
## Worker overhead through RabbitMQ and MongoDB

Generated by `benches/worker_overhead.sh` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC at
commit {commit}, {os.cpu_count()} CPUs. {steps} no-op steps ({WORKFLOWS} workflows of
{STEPS_PER_WORKFLOW} `noop` steps, created and started with sca-rhythm as rhythm_api does) through
the same RabbitMQ and MongoDB-wire server (SecantusDB), each worker with {SLOTS} slots; CPU is the
user + system time of the worker and all its processes (`wait4`), from start to SIGTERM, so it
includes start-up and the store's and broker's client work. {"One run of each worker, in one sitting" if REPEAT == 1 else f"Medians of {REPEAT} interleaved runs"}.
The MongoDB-wire server, a single Python process started afresh for each run with its storage
on tmpfs, is the bottleneck of the wall-clock rate for every worker here (it runs at about one full
core throughout), so steps per second measure how many store commands a worker sends per step,
and how many of them it waits for one after another, rather than the worker's own speed.
MongoDB commands per step are the server's own counters (`serverStatus.opcounters`) over the
run, less the commands the benchmark sent itself (creating and starting the workflows, polling
for their end), divided by the steps.

| Worker | CPU per 1000 steps | vs original | Steps/s | MongoDB commands per step | Peak RSS | Each run (CPU per 1000 steps, steps/s) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- Rust CPU per step: {orig_ratio:.3f}x of the original Python worker's (target: at most 0.2x:
  {'met' if orig_ratio <= 0.2 else 'NOT met'}); {pool_ratio:.3f}x of a Python worker that reuses
  its processes.
- Rust steps per second: {rate_ratio:.2f}x the Python worker that reuses its processes (target:
  at least 2x: {'met' if rate_ratio >= 2 else 'NOT met'}); {med('rust', 'store_commands_per_step'):.1f} MongoDB commands per step
  against its {med('python-pool', 'store_commands_per_step'):.1f}. The server answered about {rust_cmds:.0f} commands a second for the
  Rust worker and {pool_cmds:.0f} for the Python one: saturated either way, so the rates stand in
  inverse proportion to the commands per step.
- A Rust step's MongoDB commands, in the order it waits for them: read the workflow (1); take
  the task's claim and read the task's stored result, together (2); STARTED, the start count and
  the run in the workflow, together (3); SUCCESS and the workflow's `updated_at` with its status
  read back, together (2); give the claim back, off the slot's path (1); the last step of each
  workflow also marks it SUCCESS. The claim's renewal before the result is skipped when it was
  taken less than half a lease ago, and the server's clock is read once per 10 s. Against
  sca-rhythm's steps, three commands are the price of guarantees the original lacks: the claim
  and its release (no task runs twice at once) and the start count (`workflows show` counts
  attempts across crashes). RabbitMQ: the next step published with a confirm, then the ack.
- Idle `workers worker` with {idle['slots']} slots, RabbitMQ and MongoDB connected: peak RSS
  {idle['peak_rss_mb']:.1f} MB after {idle['seconds']} s (target: under 40 MB:
  {'met' if idle['peak_rss_mb'] < 40 else 'NOT met'}).

Reproduce: `benches/worker_overhead.sh` (environment: `WORKFLOWS`, `STEPS_PER_WORKFLOW`,
`SLOTS`, `REPEAT`).
<!-- worker-overhead:end -->"""
    sections.write_section("worker-overhead", section)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    main()
