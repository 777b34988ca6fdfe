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

    by_kind = {}

    def started(self, event):
        kind = OPCOUNTER_OF.get(event.command_name, "command")
        _OwnCommands.by_kind[kind] = _OwnCommands.by_kind.get(kind, 0) + 1

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


pymongo.monitoring.register(_OwnCommands())


# The `serverStatus.opcounters` entry that SecantusDB counts each command under (a
# findAndModify is an update there; a bulk write of several statements is one).
OPCOUNTER_OF = {"insert": "insert", "update": "update", "findAndModify": "update",
                "delete": "delete", "find": "query", "getMore": "getmore"}
WRITES = ("insert", "update", "delete")
READS = ("query", "getmore")


def server_commands():
    """The operations the MongoDB-wire server has counted (`serverStatus.opcounters`), by kind."""
    client = pymongo.MongoClient(MONGO_URI)
    try:
        counters = client.admin.command("serverStatus")["opcounters"]
    finally:
        client.close()
    return {kind: int(count) for kind, count in counters.items()}


def server_costs(n=600):
    """The fresh server's time per write (a one-statement upsert of a task-sized document) and per
    read (a `find` by `_id`), one after another from one client: what a step's writes and reads
    cost it when nothing else runs."""
    client = pymongo.MongoClient(MONGO_URI)
    try:
        coll = client[f"bench_costs_{uuid.uuid4().hex[:8]}"].probe
        doc = {"status": "SUCCESS", "result": {"dataset": 1}, "traceback": None, "children": [],
               "name": "noop", "args": [1], "kwargs": {"step": "noop"}, "retries": 0}
        started = time.perf_counter()
        for i in range(n):
            coll.replace_one({"_id": f"t{i}"}, doc, upsert=True)
        write = (time.perf_counter() - started) / n
        started = time.perf_counter()
        for i in range(0, n, 4):
            coll.bulk_write([pymongo.ReplaceOne({"_id": f"b{j}"}, doc, upsert=True)
                             for j in range(i, i + 4)], ordered=False)
        batched = (time.perf_counter() - started) / n
        started = time.perf_counter()
        for i in range(n):
            coll.find_one({"_id": f"t{i}"})
        read = (time.perf_counter() - started) / n
        client.drop_database(coll.database.name)
    finally:
        client.close()
    return {"write_ms": round(write * 1000, 3), "read_ms": round(read * 1000, 3),
            "batched_write_ms": round(batched * 1000, 3)}

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


def rust_worker(app_id, db, slots, uri_options=""):
    """`workers worker` on MONGO_URI, with `uri_options` appended to its query."""
    uri = MONGO_URI + (("&" if "?" in MONGO_URI else "?") + uri_options if uri_options else "")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "APP_ENV": "production",
        "WORKERS_CONFIG_DIR": os.path.join(ROOT, "config"),
        "ALIAS_SALT": "bench",
        "APP_API_TOKEN": "unused-by-noop",
        "API_BASE_URL": "http://127.0.0.1:9/",
        "QUEUE_PASS": "unused",
        "WORKERS__AMQP__URL": AMQP_URL,
        "WORKERS__MONGO__URI": uri,
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


def measure_server_costs():
    with FreshServer():
        return server_costs()


def deploy_rhythm_indexes(db):
    """The indexes rhythm_api's init creates in a Bioloop deployment (spec F.1), whichever
    worker runs: every write to these collections maintains them, so both sides pay for them."""
    client = pymongo.MongoClient(MONGO_URI)
    try:
        for key in ("status", "kwargs.app_id", "kwargs.step"):
            client[db]["celery_taskmeta"].create_index(key)
        for key in ("_status", "app_id"):
            client[db]["workflow_meta"].create_index(key)
    finally:
        client.close()


def run_side_on_server(name, make_command):
    app_id = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    db = f"bench_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    deploy_rhythm_indexes(db)
    argv, env = make_command(app_id, db)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Let the worker connect and declare its queue before any message is published.
        time.sleep(5)
        # The server counts the commands of both workers and of this process; this process
        # counts its own (server_commands' own command is counted by the server and by the
        # listener alike).
        own_before = dict(_OwnCommands.by_kind)
        server_before = server_commands()
        started = time.monotonic()
        ids = start_workflows(app_id, db, WORKFLOWS, STEPS_PER_WORKFLOW)
        ok = wait_all_succeeded(db, ids, timeout=1800)
        elapsed = time.monotonic() - started
        server_after = server_commands()
        worker_ops = {kind: (server_after.get(kind, 0) - server_before.get(kind, 0))
                      - (_OwnCommands.by_kind.get(kind, 0) - own_before.get(kind, 0))
                      for kind in server_after}
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
        "store_commands_per_step": round(sum(worker_ops.values()) / steps, 2),
        "store_writes_per_step": round(sum(worker_ops.get(k, 0) for k in WRITES) / steps, 2),
        "store_reads_per_step": round(sum(worker_ops.get(k, 0) for k in READS) / steps, 2),
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
        ("rust-ten", "`workers worker`, ten connections (`maxPoolSize=10`, the driver's default)",
         lambda a, d: rust_worker(a, d, SLOTS, "maxPoolSize=10")),
        ("python-original", "Celery + sca-rhythm, original settings (one process per task)",
         lambda a, d: python_worker(a, d, SLOTS, True)),
        ("python-pool", "Celery + sca-rhythm, processes reused",
         lambda a, d: python_worker(a, d, SLOTS, False)),
    ]
    runs = {name: [] for name, _, _ in sides}
    costs = []
    # Interleaved, so that a noisy moment of the shared machine hits every side alike.
    for _ in range(REPEAT):
        costs.append(measure_server_costs())
        print(json.dumps(costs[-1]), file=sys.stderr, flush=True)
        for name, _, make in sides:
            result = run_side(name, make)
            print(json.dumps(result), file=sys.stderr, flush=True)
            runs[name].append(result)
    summary = {"runs": runs, "costs": costs, "idle": idle_rss()}
    print(json.dumps(summary, indent=1))
    write_section(sides, runs, costs, summary["idle"])


def write_section(sides, runs, costs, idle):
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
            f"{med(name, 'store_writes_per_step'):.1f} / {med(name, 'store_reads_per_step'):.1f} | "
            f"{med(name, 'peak_rss_mb'):.1f} MB | {each} |")
    pool_ratio = rust_cpu / med("python-pool", "cpu_seconds_per_1000_steps")
    rate_ratio = med("rust", "steps_per_second") / med("python-pool", "steps_per_second")
    ten_ratio = med("rust", "steps_per_second") / med("rust-ten", "steps_per_second")
    orig_ratio = rust_cpu / med("python-original", "cpu_seconds_per_1000_steps")
    write_ms = median([c["write_ms"] for c in costs])
    read_ms = median([c["read_ms"] for c in costs])
    batched_ms = median([c["batched_write_ms"] for c in costs])

    def server_ms(name):
        return (med(name, "store_writes_per_step") * write_ms
                + med(name, "store_reads_per_step") * read_ms)

    def predicted(name):
        return 1000 / server_ms(name)

    batched_rust_ms = (med("rust", "store_writes_per_step") * batched_ms
                       + med("rust", "store_reads_per_step") * read_ms)
    # Celery's STARTED and SUCCESS, sca-rhythm's two workflow updates; its read of the workflow.
    floor_ms = 4 * write_ms + read_ms
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
Each database starts with the indexes rhythm_api's init creates in a deployment (spec F.1:
`celery_taskmeta.status`, `kwargs.app_id`, `kwargs.step`; `workflow_meta._status`, `app_id`),
which every write to those collections maintains, whichever worker runs.
The MongoDB-wire server, a single Python process started afresh for each run with its storage
on tmpfs, is the bottleneck of the wall-clock rate for every worker here (it runs at about one full
core throughout). Store operations per step are the server's own counters
(`serverStatus.opcounters`: writes are inserts, updates, findAndModify and deletes; reads are
finds) over the run, less the operations the benchmark sent itself (creating and starting the
workflows, polling for their end), divided by the steps.

| Worker | CPU per 1000 steps | vs original | Steps/s | MongoDB commands per step | Writes / reads per step | Peak RSS | Each run (CPU per 1000 steps, steps/s) |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- Rust CPU per step: {orig_ratio:.3f}x of the original Python worker's (target: at most 0.2x:
  {'met' if orig_ratio <= 0.2 else 'NOT met'}); {pool_ratio:.3f}x of a Python worker that reuses
  its processes.
- Rust steps per second: {rate_ratio:.2f}x the Python worker that reuses its processes (target:
  at least 2x: {'met' if rate_ratio >= 2 else 'NOT met'}).
- One connection: `workers worker` opens one connection to MongoDB unless the URI's
  `maxPoolSize` says otherwise, so its operations reach the server one at a time, as each
  process of Celery's pool sends them. On the driver's default of ten it ran
  {med('rust-ten', 'steps_per_second'):.1f} steps/s: one connection is {ten_ratio:.2f}x that. This
  server serves concurrent requests slower than the same requests in turn.
- What the server costs: on a fresh server, one client alone, a write (a one-statement upsert of
  a task-sized document) takes {write_ms:.2f} ms and a read by `_id` {read_ms:.2f} ms (medians of
  {len(costs)} probes of 600 each). So a step's server time is its writes and reads at those
  prices: {server_ms('rust'):.1f} ms for the Rust worker (at most {predicted('rust'):.0f} steps/s),
  {server_ms('python-pool'):.1f} ms for the Python one (at most {predicted('python-pool'):.0f}
  steps/s). Both measured rates are well below these bounds (the probe's collection has no
  secondary index and no concurrent clients); the bounds only order the workers.
- Where the server's time goes under load: sampled with py-spy (`py-spy record -p PID -f raw`)
  during a Rust run of 100 workflows, about a third of its samples were in pruning its
  retryable-write records, a scan of every record it keeps (up to 10,000, for 30 minutes) on
  each write. Both drivers send retryable writes, since the server answers as a replica-set
  primary, so a write costs it more the more writes came before it: one reason the bounds
  above are not reached, and the worker with more writes per step pays more for each. (mongod
  keeps one such record per session, looked up by the session's id.)
- Sent four to a command (one `update` of four statements), a write costs {batched_ms:.2f} ms.
  Even with every write of a Rust step batched four to a command with other slots' writes, a
  step would cost the server {batched_rust_ms:.1f} ms against the Python worker's
  {server_ms('python-pool'):.1f} ms unbatched: batching cannot reach 2x either.
- Why 2x the Python rate is out of reach here: sca-rhythm's step is already the least a step
  can write and keep the documents that rhythm_api, Celery's tools and the UI read: Celery's
  STARTED and SUCCESS in `celery_taskmeta`, and sca-rhythm's two updates of the workflow (its
  run at the start, `updated_at` and the status at the end), plus one read of the workflow:
  {floor_ms:.1f} ms of server time. Twice its rate would need at most {floor_ms / 2:.1f} ms per
  step, about two writes: fewer than those four documents. The Rust worker adds to them only
  what makes a step safe to deliver twice: the task's claim (taken with the start count in one
  write; `workflows show` counts attempts across crashes) and the read of the task's stored
  result (a redelivered step that already succeeded is not run again).
- A Rust step's MongoDB operations, in the order it waits for them: read the workflow (1 read);
  take the task's claim, counting the start, and read the task's stored result, together (1
  write, 1 read); STARTED and the run in the workflow, together (2 writes); SUCCESS and the
  workflow's `updated_at` with its status read back, together (2 writes); the last step of each
  workflow also marks it SUCCESS. The claim of a task that succeeded is left to lapse (one that
  failed or waits is given back, with a write, for its retry). The claim's
  renewal before the result is skipped when it was taken less than half a lease ago, and the
  server's clock is read once per 10 s. RabbitMQ: the next step published with a confirm, then
  the ack.
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
