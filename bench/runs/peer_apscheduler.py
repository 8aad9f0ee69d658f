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
import signal
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
    args = parser.parse_args(argv)
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{args.db}")},
        executors={"default": ThreadPoolExecutor(args.workers)},
        job_defaults={"misfire_grace_time": 3600, "coalesce": False, "max_instances": 1},
        timezone=UTC,
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    scheduler.start()
    print("STARTED", time.time(), flush=True)
    if not args.resume:
        plan = load_plan(args.plan)
        for job, due in due_times(plan):
            scheduler.add_job(hit, "date", run_date=datetime.fromtimestamp(due, UTC),
                              args=[hit_url(plan["sink"], plan["tag"], job, due)],
                              id=f"job-{job}")
    print("SCHEDULED", time.time(), flush=True)
    stopping.wait()
    scheduler.shutdown(wait=False)


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
        self.proc = spawn(cmd, self.log, self.args.workdir, cwd=HERE)
        line, seen = wait_for_line(self.log, lambda s: s.startswith("SCHEDULED"), timeout,
                                   self.proc, start=offset)
        if line is None:
            raise RuntimeError(f"scheduler not scheduled after {seen - spawned:.1f}s; "
                               f"see {self.log}")
        return {"pid": self.proc.pid, "spawned_at": spawned, "ready_at": seen,
                "ready_s": seen - spawned}


def main() -> None:
    if "--role" in sys.argv:
        scheduler_main(sys.argv[1:])
        return
    parser = driver_args(__doc__.splitlines()[0])
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    plan = load_plan(args.plan)
    system = System(args)
    result: dict[str, Any] = {"system": "apscheduler", "workers": args.workers}
    try:
        first = system.start(resume=False, timeout=args.ready_timeout)
        result.update(first)
        result["scheduled_at"] = first["ready_at"]
        if args.kill_after:
            time.sleep(args.kill_after)
            assert system.proc is not None
            system.proc.kill()
            system.proc.wait(10)
            result["killed_at"] = time.time()
            result["restart"] = system.start(resume=True, timeout=args.ready_timeout)
        hits, unique = wait_for_hits(plan["sink"], plan["tag"], len(plan["jobs"]),
                                     args.deadline, args.settle)
        result.update(hits=hits, unique=unique)
        assert system.proc is not None
        result["rss_end_kb"] = rss_kb(system.proc.pid)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            stop(system.proc)
    emit(result)


if __name__ == "__main__":
    main()
