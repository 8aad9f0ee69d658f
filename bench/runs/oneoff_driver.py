"""OneOff driver: the plan's jobs as manifests in a jobs.d, run by a real ``oneoff serve``.

Runs under the project's ``.venv`` (it calls ``.venv/bin/oneoff``; it imports nothing of
``oneoff``). See ``common.py`` for the driver contract. Steps:

1. write the plan's jobs as ``kind: Job`` manifests (500 documents per file) into
   ``WORKDIR/jobs.d``: ``schedule: {at: <due, ms precision, Z>}``, ``http: {url: <sink>}``;
2. start ``oneoff serve --state --manifests --workers`` with ``ONEOFF_LOG_FORMAT=json``, time
   the ``"action": "ready"`` line (from spawn, and the server's own "ready in N ms");
3. with ``--kill-after S``: S seconds after ready, SIGKILL the server, start it again;
4. wait at the sink for every job; read the RSS of the server (``--idle S``: after S idle
   seconds instead) and its CPU seconds; with ``--verify`` wait until every run is final
   in the state file (read-only) and report the statuses and the latest ``finished_at``;
   SIGTERM the server. ``--profile``: py-spy (``--nonblocking``) from ready to the end.

``--pending N`` (the 1 M workload) instead:

1. start ``oneoff serve`` once on an empty jobs.d to create the schema, SIGTERM it;
2. bulk-insert N one-time Jobs straight into the state file with ``sqlite3`` (50,000 rows
   a transaction): N rows in ``objects`` (source ``api:bench``, as if created through the
   API, so the directory reconcile leaves them alone; spec ``{"http": {"url": ...},
   "schedule": {"at": <due>}}``, generation 1), N ``pending`` rows in ``executions``
   (reason ``schedule``, due between 24 h and 25 h from now, deadline one hour later,
   priority 5), N ``job_state`` rows (``generation`` 1 where the schema has that column:
   the scheduler had synced them), and bump ``counters.objects`` if that table exists;
3. probe: start the server on the empty jobs.d, time it to ready, read RSS, stop it;
4. batch **a**: write the plan's jobs (ids ``a<n>``) due ``--start-lead`` after the spawn
   (default twice the probe's time to ready + 20 s), start the server, wait for them at
   the sink (py-spy records the server meanwhile: ``profile-a.txt``);
5. batch **b**: write the plan's jobs again (ids ``b<n>``) into jobs.d while it runs, due
   ``--add-lead`` seconds later; wait for them (``profile-b.txt``); RSS and peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import signal
import sqlite3
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import (
    HERE,
    cpu_s,
    driver_args,
    due_times,
    emit,
    hit_url,
    load_plan,
    rss_kb,
    spawn,
    stop,
    wait_for_hits,
    wait_for_line,
)

ROOT = HERE.parent.parent
ONEOFF = ROOT / ".venv" / "bin" / "oneoff"
DOCS_PER_FILE = 500


def iso(epoch: float) -> str:
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def write_manifests(
    jobs_dir: Path, plan: dict[str, Any], jobs: list[tuple[str, float]] | None = None,
    stem: str = "jobs",
) -> int:
    """``jobs`` (default: the plan's) as Job manifests, DOCS_PER_FILE per file."""
    jobs_dir.mkdir(parents=True, exist_ok=True)
    docs = [
        "apiVersion: oneoff.dev/v1\nkind: Job\n"
        f"metadata: {{name: job-{job}}}\n"
        f"spec:\n  schedule: {{at: '{iso(due)}'}}\n"
        f"  http: {{url: '{hit_url(plan['sink'], plan['tag'], job, due)}'}}\n"
        for job, due in (due_times(plan) if jobs is None else jobs)
    ]
    for start in range(0, len(docs), DOCS_PER_FILE):
        (jobs_dir / f"{stem}-{start // DOCS_PER_FILE:05d}.yaml").write_text(
            "---\n".join(docs[start:start + DOCS_PER_FILE]))
    return len(docs)


def is_reconciled(line: str) -> bool:
    return '"reconcile"' in line and "reconciled:" in line


PY_SPY = (ROOT / "bench" / ".venv-peers" / "bin" / "py-spy", ROOT / ".venv" / "bin" / "py-spy")


def start_profiler(server: Server, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy record (raw collapsed stacks, 100 Hz, --nonblocking: the server is never
    paused) of the server until :func:`finish_profiler`; None without py-spy."""
    exe = next((str(p) for p in PY_SPY if p.exists()), None)
    if exe is None or server.proc is None:
        return None
    return spawn([exe, "record", "-p", str(server.proc.pid), "-r", "100", "--nonblocking",
                  "-f", "raw", "-o", str(out)], out.with_suffix(".log"), server.workdir)


def finish_profiler(profiler: subprocess.Popen[bytes] | None, out: Path) -> str | None:
    if profiler is None:
        return None
    stop(profiler, grace=60, sig=signal.SIGINT)  # py-spy writes its output on SIGINT
    return str(out) if out.exists() else None


def is_ready(line: str) -> bool:
    if '"ready"' not in line:
        return False
    try:
        return json.loads(line).get("action") == "ready"
    except ValueError:
        return False


class Server:
    """One ``oneoff serve`` process at a time, restartable."""

    def __init__(self, workdir: Path, jobs_dir: Path, state: Path, workers: int) -> None:
        self.workdir, self.jobs_dir, self.state, self.workers = workdir, jobs_dir, state, workers
        self.log = workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> dict[str, Any]:
        offset = self.log.stat().st_size if self.log.exists() else 0
        spawned = time.time()
        self.proc = spawn(
            [str(ONEOFF), "serve", "--state", str(self.state), "--manifests",
             str(self.jobs_dir), "--workers", str(self.workers)],
            self.log, self.workdir, env={"ONEOFF_LOG_FORMAT": "json"}, cwd=self.workdir,
        )
        line, seen = wait_for_line(self.log, is_ready, timeout, self.proc, start=offset)
        if line is None:
            raise RuntimeError(
                f"oneoff serve not ready after {seen - spawned:.1f}s "
                f"(exit {self.proc.poll()}); see {self.log}")
        own = json.loads(line).get("message", "")
        return {"pid": self.proc.pid, "spawned_at": spawned, "ready_at": seen,
                "ready_s": seen - spawned, "ready_message": own}

    def kill9(self) -> float:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        return time.time()

    def stop(self) -> None:
        stop(self.proc, grace=15)


def prepopulate(state: Path, count: int) -> dict[str, Any]:
    """Bulk-insert ``count`` one-time Jobs with one pending run each, due 24-25 h ahead."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    now_s = iso(now.timestamp())
    base = now + timedelta(days=1)
    db = sqlite3.connect(state, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    synced_generation = any(row[1] == "generation"
                            for row in db.execute("PRAGMA table_info(job_state)"))
    has_counters = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'counters'").fetchone()
    batch = 50_000
    for first in range(0, count, batch):
        objects, runs, states = [], [], []
        for i in range(first, min(count, first + batch)):
            due = iso((base + timedelta(milliseconds=i * 3.6)).timestamp())
            deadline = iso((base + timedelta(milliseconds=i * 3.6, hours=1)).timestamp())
            uid = str(uuid.UUID(int=i + 1, version=4))
            spec = json.dumps(
                {"http": {"url": f"http://127.0.0.1:9/far?job={i}"}, "schedule": {"at": due}},
                sort_keys=True, separators=(",", ":"))
            objects.append((uid, "Job", "default", f"far-{i}", 1, spec, "[{},{}]",
                            hashlib.sha256(spec.encode()).hexdigest(), "api:bench", None,
                            None, now_s, now_s, "{}"))
            run_id = f"{int(now.timestamp() * 1000):012x}{i:08x}"
            runs.append((run_id, uid, "default", f"far-{i}", "http", due, due, deadline, 5,
                         "pending", "schedule", 1, now_s))
            states.append((uid, now_s))
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO objects (uid, kind, namespace, name, generation, spec, meta, "
            "spec_digest, source, file, line, created_at, updated_at, status) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", objects)
        db.executemany(
            "INSERT INTO executions (id, job_uid, namespace, name, type, scheduled_at, due_at, "
            "deadline_at, priority, status, reason, generation, created_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", runs)
        if synced_generation:  # the scheduler already synced them (schema 0004 and later)
            db.executemany("INSERT INTO job_state (job_uid, first_seen_at, generation) "
                           "VALUES (?, ?, 1)", states)
        else:
            db.executemany("INSERT INTO job_state (job_uid, first_seen_at) VALUES (?, ?)",
                           states)
        if has_counters:  # tell a cached reader that objects changed
            db.execute("UPDATE counters SET value = value + 1 WHERE name = 'objects'")
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return {"pending_inserted": count, "prepopulate_s": time.perf_counter() - started,
            "state_mb": state.stat().st_size / 2**20,
            "job_state_generation": bool(synced_generation)}


def recorded(state: Path, expected: int, timeout: float) -> dict[str, Any]:
    """Wait until ``expected`` runs are final in the state file; statuses and last finish."""
    deadline = time.time() + timeout
    statuses: dict[str, int] = {}
    last = None
    while time.time() < deadline:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
        try:
            statuses = dict(db.execute(
                "SELECT status, COUNT(*) FROM executions WHERE job_uid IN "
                "(SELECT uid FROM objects WHERE source LIKE 'dir:%') GROUP BY status"
            ).fetchall())
            (last,) = db.execute(
                "SELECT MAX(finished_at) FROM executions WHERE status = 'succeeded'").fetchone()
        finally:
            db.close()
        final = sum(n for s, n in statuses.items() if s not in ("pending", "queued", "running"))
        if final >= expected:
            break
        time.sleep(0.5)
    last_epoch = (datetime.fromisoformat(last.replace("Z", "+00:00")).timestamp()
                  if last else None)
    return {"statuses": statuses, "last_finished_at": last_epoch}


def pending_main(args: argparse.Namespace, plan: dict[str, Any], server: Server,
                 result: dict[str, Any]) -> None:
    """1 M pending: near-due jobs present at start (batch a), then added live (batch b)."""
    jobs_dir, state, workdir = server.jobs_dir, server.state, server.workdir
    jobs_dir.mkdir(parents=True, exist_ok=True)
    server.start(args.ready_timeout)  # creates the schema
    server.stop()
    result.update(prepopulate(state, args.pending))
    probe = server.start(args.ready_timeout)  # how long a start takes with them (no jobs.d)
    result.update(probe_ready_s=probe["ready_s"], probe_ready_message=probe["ready_message"],
                  probe_rss_kb=rss_kb(probe["pid"]), probe_hwm_kb=rss_kb(probe["pid"], "VmHWM"))
    server.stop()
    start_lead = args.start_lead or 2 * probe["ready_s"] + 20
    result["start_lead_s"] = start_lead
    offsets = [(str(job), float(offset)) for job, offset in plan["jobs"]]
    spread = max(offset for _, offset in offsets)

    t0_a = round(time.time() + start_lead, 3)
    batch_a = [(f"a{job}", round(t0_a + offset, 3)) for job, offset in offsets]
    write_manifests(jobs_dir, plan, batch_a, stem="start")
    first = server.start(args.ready_timeout)
    result.update(first)
    result.update(scheduled_at=first["ready_at"], t0_a=t0_a,
                  rss_ready_kb=rss_kb(first["pid"]), hwm_ready_kb=rss_kb(first["pid"], "VmHWM"),
                  ready_before_due_a_s=t0_a - first["ready_at"])
    profiler = start_profiler(server, workdir / "profile-a.txt")
    hits = wait_for_hits(plan["sink"], plan["tag"], len(batch_a), t0_a + spread + 60)
    result["profile_a"] = finish_profiler(profiler, workdir / "profile-a.txt")
    result.update(hits_a=hits, rss_after_a_kb=rss_kb(first["pid"]))

    t0_b = round(time.time() + args.add_lead, 3)
    batch_b = [(f"b{job}", round(t0_b + offset, 3)) for job, offset in offsets]
    profiler = start_profiler(server, workdir / "profile-b.txt")
    offset = server.log.stat().st_size
    write_manifests(jobs_dir, plan, batch_b, stem="added")
    line, seen = wait_for_line(server.log, is_reconciled, args.add_lead, server.proc,
                               start=offset)
    result.update(t0_b=t0_b, reconcile_b_seen_s=(seen - (t0_b - args.add_lead)) if line
                  else None)
    hits = wait_for_hits(plan["sink"], plan["tag"], len(batch_a) + len(batch_b),
                         t0_b + spread + 60)
    result["profile_b"] = finish_profiler(profiler, workdir / "profile-b.txt")
    result.update(hits=hits[0], unique=hits[1], rss_end_kb=rss_kb(first["pid"]),
                  hwm_end_kb=rss_kb(first["pid"], "VmHWM"))


def main() -> None:
    parser = driver_args(__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=0,
                        help="bulk-insert this many far-future pending runs first")
    parser.add_argument("--start-lead", type=float, default=0.0,
                        help="--pending: batch a is due this long after the server starts "
                        "(default: twice the probe start's time to ready + 20 s)")
    parser.add_argument("--add-lead", type=float, default=15.0,
                        help="--pending: batch b is written this long before it is due")
    parser.add_argument("--idle", type=float, default=0.0,
                        help="read RSS after this many idle seconds past ready")
    parser.add_argument("--verify", action="store_true",
                        help="check every run is recorded succeeded in the state file")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--profile", action="store_true",
                        help="py-spy record the server from ready until every job landed")
    args = parser.parse_args()
    plan = load_plan(args.plan)
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_dir, state = workdir / "jobs.d", workdir / "state.db"
    result: dict[str, Any] = {"system": "oneoff", "workers": args.workers}
    server = Server(workdir, jobs_dir, state, args.workers)
    try:
        if args.pending:
            pending_main(args, plan, server, result)
            return
        t = time.perf_counter()
        result["manifests"] = write_manifests(jobs_dir, plan)
        result["write_manifests_s"] = time.perf_counter() - t
        first = server.start(args.ready_timeout)
        result["rss_ready_kb"] = rss_kb(first["pid"])
        result.update(first)
        result["scheduled_at"] = first["ready_at"]
        result["cpu_scheduled_s"] = cpu_s(first["pid"])
        profile = workdir / "profile.txt"
        profiler = start_profiler(server, profile) if args.profile else None
        if args.kill_after:
            time.sleep(args.kill_after)
            result["killed_at"] = server.kill9()
            result["restart"] = server.start(args.ready_timeout)
        if args.idle:
            time.sleep(args.idle)
            assert server.proc is not None
            result["rss_idle_kb"] = rss_kb(server.proc.pid)
        expected = len(plan["jobs"])
        hits, unique = wait_for_hits(plan["sink"], plan["tag"], expected, args.deadline,
                                     args.settle)
        result.update(hits=hits, unique=unique)
        result["profile"] = finish_profiler(profiler, profile)
        assert server.proc is not None
        result["rss_end_kb"] = rss_kb(server.proc.pid)
        result["cpu_end_s"] = cpu_s(server.proc.pid)
        if args.verify:
            result.update(recorded(state, expected, timeout=30))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        emit(result)


if __name__ == "__main__":
    main()
