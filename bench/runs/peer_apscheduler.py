"""APScheduler 3 driver: a BackgroundScheduler with a SQLAlchemyJobStore on SQLite.

Runs under ``bench/.venv-peers``. See ``common.py`` for the driver contract. The system
process is a child (``--role scheduler``) hosting the scheduler, as an application would:
``BackgroundScheduler`` + ``SQLAlchemyJobStore(sqlite:///WORKDIR/aps.db)`` +
``ThreadPoolExecutor(--workers)``; it starts the scheduler, then ``add_job``s every job
(``date`` trigger at the due instant, ``misfire_grace_time=3600`` so that, as in OneOff,
nothing late is dropped) and prints ``SCHEDULED``. A job is one GET to the sink over a
per-thread keep-alive connection. For ``--kill-after``, the child is SIGKILLed and started
again with ``--resume`` (the same job store, no ``add_job``).
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    HERE,
    Hitter,
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

HITTER = Hitter()


def hit(url: str) -> None:
    HITTER.get(url)


def scheduler_main(argv: list[str]) -> None:
    """The system process: host the scheduler until SIGTERM."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    parser = argparse.ArgumentParser()
    parser.add_argument("--role")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pending", type=int, default=0)
    parser.add_argument("--add-lead", type=float, default=15.0)
    args = parser.parse_args(argv)
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{args.db}")},
        executors={"default": ThreadPoolExecutor(args.workers)},
        job_defaults={"misfire_grace_time": 3600, "coalesce": False, "max_instances": 1},
        timezone=UTC,
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    plan = load_plan(args.plan)
    if args.pending:
        scheduler.start(paused=True)  # creates the jobs table
        started = time.perf_counter()
        prepopulate(scheduler, args.db, args.pending)
        print("PREPOPULATED", time.perf_counter() - started, flush=True)
        scheduler.resume()
        print("READY", time.time(), flush=True)
        t0 = round(time.time() + args.add_lead, 3)
        for job, offset in plan["jobs"]:
            due = round(t0 + float(offset), 3)
            scheduler.add_job(hit, "date", run_date=datetime.fromtimestamp(due, UTC),
                              args=[hit_url(plan["sink"], plan["tag"], f"b{job}", due)],
                              id=f"job-b{job}")
        print("SCHEDULED", time.time(), "T0", t0, flush=True)
    else:
        scheduler.start()
        print("STARTED", time.time(), flush=True)
        if not args.resume:
            for job, due in due_times(plan):
                scheduler.add_job(hit, "date", run_date=datetime.fromtimestamp(due, UTC),
                                  args=[hit_url(plan["sink"], plan["tag"], job, due)],
                                  id=f"job-{job}")
        print("SCHEDULED", time.time(), flush=True)
    stopping.wait()
    scheduler.shutdown(wait=False)


def prepopulate(scheduler: Any, db: str, count: int) -> None:
    """``count`` date-trigger jobs due 24-25 h ahead, inserted as the job store's own rows
    (id, next_run_time, pickled job state) straight into its SQLite table."""
    from apscheduler.job import Job
    from apscheduler.triggers.date import DateTrigger

    base = time.time() + 86400
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    batch = 50_000
    for first in range(0, count, batch):
        rows = []
        for i in range(first, min(count, first + batch)):
            when = datetime.fromtimestamp(base + i * 0.0036, UTC)
            job = Job(scheduler, id=f"far-{i}", func=hit, trigger=DateTrigger(when),
                      executor="default", args=[f"http://127.0.0.1:9/far?job={i}"],
                      kwargs={}, name="hit", misfire_grace_time=3600, coalesce=False,
                      max_instances=1, next_run_time=when)
            rows.append((job.id, when.timestamp(),
                         pickle.dumps(job.__getstate__(), pickle.HIGHEST_PROTOCOL)))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO apscheduler_jobs (id, next_run_time, job_state) "
                         "VALUES (?, ?, ?)", rows)
        conn.execute("COMMIT")
    conn.close()


class System:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log = args.workdir / "aps.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, resume: bool, timeout: float) -> dict[str, Any]:
        offset = self.log.stat().st_size if self.log.exists() else 0
        spawned = time.time()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "scheduler",
               "--plan", self.args.plan, "--db", str(self.args.workdir / "aps.db"),
               "--workers", str(self.args.workers)] + (["--resume"] if resume else [])
        if self.args.pending:
            cmd += ["--pending", str(self.args.pending), "--add-lead", str(self.args.add_lead)]
        self.proc = spawn(cmd, self.log, self.args.workdir, cwd=HERE)
        line, seen = wait_for_line(self.log, lambda s: s.startswith("SCHEDULED"), timeout,
                                   self.proc, start=offset)
        if line is None:
            raise RuntimeError(f"scheduler not scheduled after {seen - spawned:.1f}s; "
                               f"see {self.log}")
        found: dict[str, Any] = {"pid": self.proc.pid, "spawned_at": spawned,
                                 "ready_at": seen, "ready_s": seen - spawned}
        if self.args.pending:
            words = line.split()
            found["t0"] = float(words[words.index("T0") + 1])
            text = self.log.read_text()
            found["prepopulate_s"] = float(text.split("PREPOPULATED")[1].split()[0])
            found["ready_at"] = float(text.split("READY")[1].split()[0])
            found["ready_s"] = found["ready_at"] - spawned - found["prepopulate_s"]
        return found


def main() -> None:
    if "--role" in sys.argv:
        scheduler_main(sys.argv[1:])
        return
    parser = driver_args(__doc__.splitlines()[0])
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--pending", type=int, default=0,
                        help="first insert this many jobs due a day ahead into the job store; "
                        "then add the plan's jobs live, due --add-lead seconds later")
    parser.add_argument("--add-lead", type=float, default=15.0)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    plan = load_plan(args.plan)
    system = System(args)
    result: dict[str, Any] = {"system": "apscheduler", "workers": args.workers}
    try:
        first = system.start(resume=False, timeout=args.ready_timeout)
        result.update(first)
        result["scheduled_at"] = first["ready_at"]
        result["rss_ready_kb"] = rss_kb(first["pid"])
        if args.pending:
            spread = max(float(offset) for _, offset in plan["jobs"])
            args.deadline = first["t0"] + spread + 60
        if args.kill_after:
            time.sleep(args.kill_after)
            assert system.proc is not None
            system.proc.kill()
            system.proc.wait(10)
            result["killed_at"] = time.time()
            result["restart"] = system.start(resume=True, timeout=args.ready_timeout)
        assert system.proc is not None
        result["cpu_scheduled_s"] = cpu_s(system.proc.pid)
        hits, unique = wait_for_hits(plan["sink"], plan["tag"], len(plan["jobs"]),
                                     args.deadline, args.settle)
        result.update(hits=hits, unique=unique)
        assert system.proc is not None
        result["rss_end_kb"] = rss_kb(system.proc.pid)
        result["cpu_end_s"] = cpu_s(system.proc.pid)
        result["hwm_end_kb"] = rss_kb(system.proc.pid, "VmHWM")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            stop(system.proc)
    emit(result)


if __name__ == "__main__":
    main()
