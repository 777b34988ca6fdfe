#!/usr/bin/env python3
"""Chaos runs of the embedded profile: datasets go through `integrated`, `stage` and `delete`
while the scheduler, the workers and hand-run `jobs run watch` processes are killed with
SIGKILL at random moments (watches overlapping), and restarted. After each run every record is
checked against the disk. Standard library only; called by scripts/chaos.sh.

Each run builds a fresh project (configuration, workflow definitions, source directories) in a
temporary directory, with datasets whose names are odd (spaces, quotes, non-ASCII), one with
read-only directories, one with many small files. Processes run without the power to ignore
file permissions (as an unprivileged service user would), so read-only trees are real.

After the run, for every dataset: one dataset per directory; its workflows all SUCCESS, one of
each kind started; its states in order with none repeated; as many file rows as files; the
staged copy (exactly one) identical to the source, byte for byte by MD5; its download links
resolving; the archived bundle's MD5 as recorded (or the bundle gone once deleted). And for the
whole project: no temporary leftovers (`*.partial`, spool files, generated bundles), no message
left in the queue, no dead letter.

Exit status: 0 when every run held, 1 when any check failed (the project of a failed run is kept
and named), 2 for bad usage.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Directory name in the source directory -> files (relative path -> bytes), and what happens
# to it after `integrated`.
def datasets(rng):
    many = {f"d{i % 20:02d}/f{i:04d}.txt": f"small file {i}\n".encode() for i in range(400)}
    big = {"big.bin": rng.randbytes(48 << 20), "notes.txt": b"notes\n"}
    return {
        "run one": ({"a.txt": b"alpha\n", "sub/b.txt": b"beta\n", "sub/deep/c.txt": b""}, "stage"),
        "ünïcödé_run": ({"x.fastq.gz": rng.randbytes(70_000), "y.txt": b"why\n"}, "delete"),
        "it's (quoted)": ({"q.txt": b"quoted\n"}, "stage"),
        "read_only": ({"ro/a.txt": b"read only\n", "ro/inner/b.txt": b"deeper\n", "top.txt": b"t\n"}, "stage"),
        "many_small": (many, None),
        "big_one": (big, "delete"),
    }


READ_ONLY = {"read_only": ["ro/inner", "ro"]}

EXPECTED_STATES = {
    None: ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED"],
    "stage": ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED", "FETCHED", "STAGED"],
    "delete": ["REGISTERED", "READY", "ARCHIVED", "FETCHED", "STAGED", "DELETED"],
}


def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_md5s(root):
    """Relative path -> MD5 of every regular file below `root`."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = md5_of(path)
    return out


class Project:
    def __init__(self, base, binary, rng, repo):
        self.root = Path(tempfile.mkdtemp(prefix="workers-chaos-", dir=base))
        self.binary = binary
        self.rng = rng
        for sub in ("config", "jobs"):
            shutil.copytree(repo / sub, self.root / sub)
        self.sources = self.root / "examples" / "raw_data"
        self.sources.mkdir(parents=True)
        (self.root / "examples" / "data_products").mkdir(parents=True)
        self.env = dict(os.environ)
        for key in list(self.env):
            if key.startswith("WORKERS__") or key in ("APP_ENV", "WORKERS_FAILPOINTS"):
                del self.env[key]
        self.env.update({
            "ALIAS_SALT": "chaos",
            "WORKERS_CONFIG_DIR": str(self.root / "config"),
            "WORKERS__REGISTRATION__RECENCY_THRESHOLD_SECONDS": "1",
            "WORKERS__REGISTRATION__WAIT_BETWEEN_STABILITY_CHECKS_SECONDS": "1",
            "WORKERS__RETRY__DEFAULT__DELAY_SECONDS": "1",
            "WORKERS__RETRY__DEFAULT__MAX_RETRIES": "20",
            "WORKERS__WORKER__LEASE_SECONDS": "3",
            "WORKERS__WORKER__CONCURRENCY": "2",
            "WORKERS__WORKER__SHUTDOWN_GRACE_SECONDS": "5",
            "WORKERS__SCHEDULER__LEASE_SECONDS": "3",
            "WORKERS__SCHEDULER__GRACE_SECONDS": "2",
            "WORKERS__SCHEDULER__WORKERS": "1",
            "WORKERS__SCHEDULES__WATCH__EVERY": "1s",
            "WORKERS__SCHEDULES__RECONCILE__EVERY": "5s",
            "WORKERS__SCHEDULES__RECONCILE__MISFIRE": "skip",
            "WORKERS__LOG__LEVEL": "warn",
        })
        self.db_path = self.root / "var" / "workers.db"

    def command(self, *args):
        cmd = [str(self.binary), *args]
        if os.geteuid() == 0 and shutil.which("setpriv"):
            # As a service user: permissions of read-only trees apply.
            cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search", *cmd]
        return cmd

    def spawn(self, *args):
        return subprocess.Popen(self.command(*args), cwd=self.root, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)

    def run(self, *args, check=True):
        out = subprocess.run(self.command(*args), cwd=self.root, env=self.env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` exited {out.returncode}: {out.stderr[-2000:]}")
        return out

    def json(self, *args):
        return json.loads(self.run(*args, "--format", "json").stdout)

    def create(self, specs):
        for name, (files, _) in specs.items():
            self.create_one(name, files)

    def create_one(self, name, files):
        # Written beside the source directory and moved in, as instruments finish a run.
        staging = self.root / "incoming" / name
        for rel, data in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for rel in READ_ONLY.get(name, []):
            for path in (staging / rel).iterdir():
                if path.is_file():
                    path.chmod(0o444)
            (staging / rel).chmod(0o555)
        os.rename(staging, self.sources / name)

    def query(self, sql, *params):
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


class Fleet:
    """The long-running processes and the hand-run watches, killed and restarted at random."""

    def __init__(self, project, rng):
        self.project = project
        self.rng = rng
        self.kills = 0
        self.long = {}
        self.watches = []
        for role in ("scheduler", "worker-1", "worker-2"):
            self.start(role)

    def start(self, role):
        args = ("scheduler",) if role == "scheduler" else ("worker", "--hostname", f"{role}@%h")
        self.long[role] = self.project.spawn(*args)

    def tick(self, pending=None):
        """One moment of chaos: maybe a new dataset, maybe overlapping watches, maybe a kill,
        then restarts."""
        if pending and self.rng.random() < 0.4:
            name, files = pending.pop(0)
            self.project.create_one(name, files)
        self.watches = [w for w in self.watches if w.poll() is None]
        if self.rng.random() < 0.5:
            for _ in range(self.rng.randint(1, 2)):
                self.watches.append(self.project.spawn("jobs", "run", "watch"))
        victims = list(self.long.items()) + [(None, w) for w in self.watches]
        if victims and self.rng.random() < 0.7:
            role, proc = self.rng.choice(victims)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                self.kills += 1
        for role, proc in list(self.long.items()):
            if proc.poll() is not None:
                self.start(role)

    def stop(self):
        for proc in list(self.long.values()) + self.watches:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def workflows_of(project):
    """Workflow id -> (name, derived status, dataset id)."""
    listed = project.json("workflows", "list", "--limit", "10000")
    return {w["id"]: (w["name"], w["status"], w.get("dataset_id")) for w in listed}


def wait_until(project, fleet, what, done, timeout, rng, pending=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.1, 1.2))
        fleet.tick(pending)
        if pending:
            continue
        try:
            if done():
                return
        except (sqlite3.Error, RuntimeError, json.JSONDecodeError):
            pass  # a reader may meet a busy database; look again
    raise TimeoutError(f"{what}: not done after {timeout} s")


def dataset_rows(project):
    rows = project.query("SELECT id, name, origin_path, archive_path, staged_path, is_deleted, is_staged,"
                         " num_files, metadata FROM datasets")
    return [dict(zip(("id", "name", "origin", "archive", "staged", "deleted", "is_staged", "num_files",
                      "metadata"), r)) for r in rows]


def check(project, specs):
    problems = []
    say = problems.append
    by_origin = {}
    for d in dataset_rows(project):
        by_origin.setdefault(Path(d["origin"]).name, []).append(d)
    workflows = workflows_of(project)
    for name, (files, fate) in specs.items():
        found = by_origin.get(name, [])
        if len(found) != 1:
            say(f"`{name}`: {len(found)} datasets for one directory")
            continue
        d = found[0]
        states = [s for (s,) in project.query(
            "SELECT state FROM dataset_states WHERE dataset_id = ? ORDER BY seq", d["id"])]
        if states != EXPECTED_STATES[fate]:
            say(f"`{name}`: states {states}, expected {EXPECTED_STATES[fate]}")
        linked = [w for (w,) in project.query(
            "SELECT workflow_id FROM dataset_workflows WHERE dataset_id = ?", d["id"])]
        kinds = sorted(workflows.get(w, ("?", "?", None))[0] for w in linked)
        expected_kinds = sorted(["integrated"] + ([fate] if fate else []))
        if kinds != expected_kinds:
            say(f"`{name}`: workflows {kinds}, expected {expected_kinds}")
        for w in linked:
            status = workflows.get(w, ("?", "missing", None))[1]
            if status != "SUCCESS":
                say(f"`{name}`: workflow {w} is {status}")
        rows = project.query("SELECT path, md5 FROM dataset_files WHERE dataset_id = ?", d["id"])
        if len(rows) != len(files):
            say(f"`{name}`: {len(rows)} file rows for {len(files)} files")
        source = project.sources / name
        expected = {rel: hashlib.md5(data).hexdigest() for rel, data in files.items()}
        if tree_md5s(source) != expected:
            say(f"`{name}`: the source changed under the test")
        if {p: m for p, m in rows} != expected:
            say(f"`{name}`: file rows differ from the files")
        staged = Path(d["staged"]) if d["staged"] else None
        if not staged or not staged.is_dir() or not d["is_staged"]:
            say(f"`{name}`: not staged ({d['staged']}, is_staged {d['is_staged']})")
        else:
            if tree_md5s(staged) != expected:
                say(f"`{name}`: the staged copy differs from the source")
            siblings = sorted(p.name for p in staged.parent.iterdir())
            if siblings != [staged.name]:
                say(f"`{name}`: beside the staged copy: {siblings}")
            metadata = json.loads(d["metadata"])
            downloads = project.root / "var" / "downloads"
            for link in (downloads / metadata["stage_alias"], downloads / f"{d['name']}.RAW_DATA.tar"):
                if fate != "delete" and not link.exists():
                    say(f"`{name}`: download link {link} is missing or dangling")
        if fate == "delete":
            if not d["deleted"] or not d["name"].endswith(f"-{d['id']}"):
                say(f"`{name}`: not recorded as deleted ({d['name']}, {d['deleted']})")
            if d["archive"]:
                say(f"`{name}`: archive path still recorded after delete")
        else:
            bundle = project.query("SELECT md5 FROM bundles WHERE dataset_id = ?", d["id"])
            archive = Path(d["archive"] or "/nonexistent")
            if not archive.is_file() or not bundle or md5_of(archive) != bundle[0][0]:
                say(f"`{name}`: archived bundle {archive} missing or not as recorded")
    var = project.root / "var"
    leftovers = [str(p.relative_to(var)) for p in var.rglob("*") if p.name.endswith(".partial")]
    if leftovers:
        say(f"temporary leftovers: {leftovers}")
    scratch = list((var / "scratch").glob("*")) if (var / "scratch").exists() else []
    if scratch:
        say(f"scratch not empty: {[p.name for p in scratch]}")
    for generate in var.glob("bundle/*/generation"):
        if any(generate.iterdir()):
            say(f"generated bundles left in {generate}: {[p.name for p in generate.iterdir()]}")
    for link in (var / "downloads").iterdir() if (var / "downloads").exists() else []:
        if link.is_symlink() and not link.exists():
            say(f"dangling download link {link.name}")
    queued = project.query("SELECT task_id, task FROM queue")
    if queued:
        say(f"messages left in the queue: {queued}")
    try:
        dead = project.query("SELECT COUNT(*) FROM dead_letters")
    except sqlite3.OperationalError:
        dead = []  # a database without dead letters
    if dead and dead[0][0]:
        say(f"{dead[0][0]} dead letters")
    for w, (wname, status, _) in workflows.items():
        if status != "SUCCESS":
            say(f"workflow {w} ({wname}) is {status}")
    return problems


def one_run(n, args, binary):
    rng = random.Random(args.seed * 1000 + n)
    project = Project(args.dir, binary, rng, Path(args.repo))
    specs = datasets(rng)
    order = list(specs)
    rng.shuffle(order)
    # Two at the start, the others while the processes die.
    for name in order[:2]:
        project.create_one(name, specs[name][0])
    pending = [(name, specs[name][0]) for name in order[2:]]
    fleet = Fleet(project, rng)
    stuck = None
    try:
        names = list(specs)

        def integrated_done():
            rows = dataset_rows(project)
            if len(rows) < len(names):
                return False
            wf = workflows_of(project)
            done = [w for w in wf.values() if w[0] == "integrated" and w[1] == "SUCCESS"]
            return len(done) >= len(names)

        wait_until(project, fleet, "integrated", integrated_done, args.timeout, rng, pending)
        for fate in ("stage", "delete"):
            targets = [name for name, (_, f) in specs.items() if f == fate]
            by_origin = {Path(d["origin"]).name: d for d in dataset_rows(project)}
            for name in targets:
                project.run("workflows", "start", fate, str(by_origin[name]["id"]))

            def fate_done(fate=fate, targets=targets):
                wf = workflows_of(project)
                return sum(1 for w in wf.values() if w[0] == fate and w[1] == "SUCCESS") >= len(targets)

            wait_until(project, fleet, fate, fate_done, args.timeout, rng)
    except TimeoutError as err:
        stuck = str(err)
    finally:
        fleet.stop()
    problems = [f"stuck: {stuck}"] if stuck else []
    # Whatever the last kill interrupted is finished by one quiet worker.
    try:
        subprocess.run(project.command("worker", "--until-idle"), cwd=project.root, env=project.env,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        problems.append(f"a quiet `worker --until-idle` did not finish within {args.timeout} s")
    problems.extend(check(project, specs))
    return project, fleet.kills, len(specs), problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--timeout", type=int, default=300, help="seconds per phase")
    parser.add_argument("--repo", default=str(REPO),
                        help="the checkout whose config/ and jobs/ the projects use (the binary's)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    binary = Path(args.binary).resolve()
    print(f"chaos: {args.runs} runs, seed {args.seed}, binary {binary}")
    total_kills = total_datasets = failed_runs = 0
    started = time.monotonic()
    for n in range(1, args.runs + 1):
        t = time.monotonic()
        try:
            project, kills, count, problems = one_run(n, args, binary)
        except RuntimeError as err:
            print(f"chaos: run {n}: {err}")
            failed_runs += 1
            continue
        total_kills += kills
        total_datasets += count
        if problems:
            failed_runs += 1
            print(f"chaos: run {n}: {len(problems)} problem(s), project kept in {project.root}:")
            for p in problems:
                print(f"  - {p}")
        else:
            shutil.rmtree(project.root, onerror=lambda f, p, e: (os.chmod(os.path.dirname(p), 0o755), f(p)))
        print(f"chaos: run {n}/{args.runs}: {count} datasets, {kills} kills, "
              f"{'ok' if not problems else 'FAILED'} ({time.monotonic() - t:.0f} s)")
    print(f"chaos: {args.runs} runs, {total_datasets} datasets, {total_kills} SIGKILLs, "
          f"{failed_runs} failed runs, {time.monotonic() - started:.0f} s")
    return 1 if failed_runs else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
