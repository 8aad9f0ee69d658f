"""Huey driver: SqliteHuey, a thread-worker consumer, tasks enqueued with ``eta``.

Runs under ``bench/.venv-peers``. See ``common.py`` for the driver contract. The system
process is the consumer (``--role consumer``: ``huey.create_consumer(workers=N,
worker_type="thread")``); this driver is the producer, calling ``hit.schedule((url,),
eta=<due>)`` for every job once the consumer is up. Consumer settings: the scheduler
interval at its minimum (1 s; Huey refuses less), queue polling from 0.1 s backing off
x1.15 to at most 1 s (Huey's default cap is 10 s, which would add up to 10 s of lateness
after an idle spell), no periodic tasks, results off. A job is one GET to the sink over a
per-thread keep-alive connection. ``--kill-after`` SIGKILLs the consumer and starts another
on the same database file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import subprocess
import sys
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


def make_huey(db: str) -> tuple[Any, Any]:
    from huey import SqliteHuey

    huey = SqliteHuey("bench", filename=db, results=False, utc=True)
    return huey, huey.task()(hit)


def consumer_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role")
    parser.add_argument("--db", required=True)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(created)f %(name)s %(message)s")
    logging.getLogger("huey").setLevel(logging.WARNING)
    huey, _ = make_huey(args.db)
    consumer = huey.create_consumer(
        workers=args.workers, worker_type="thread", periodic=False, initial_delay=0.1,
        backoff=1.15, max_delay=1.0, scheduler_interval=1, check_worker_health=True,
    )
    print("CONSUMER", time.time(), flush=True)
    consumer.run()


class System:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.db = str(args.workdir / "huey.db")
        self.log = args.workdir / "huey.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> dict[str, Any]:
        offset = self.log.stat().st_size if self.log.exists() else 0
        spawned = time.time()
        self.proc = spawn([sys.executable, str(Path(__file__).resolve()), "--role", "consumer",
                           "--db", self.db, "--workers", str(self.args.workers)],
                          self.log, self.args.workdir, cwd=HERE)
        line, seen = wait_for_line(self.log, lambda s: s.startswith("CONSUMER"), timeout,
                                   self.proc, start=offset)
        if line is None:
            raise RuntimeError(f"huey consumer did not start; see {self.log}")
        return {"pid": self.proc.pid, "spawned_at": spawned, "ready_at": seen,
                "ready_s": seen - spawned}


def main() -> None:
    if "--role" in sys.argv:
        consumer_main(sys.argv[1:])
        return
    parser = driver_args(__doc__.splitlines()[0])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    plan = load_plan(args.plan)
    system = System(args)
    result: dict[str, Any] = {"system": "huey", "workers": args.workers}
    try:
        result.update(system.start())
        _, task = make_huey(system.db)
        started = time.time()
        for job, due in due_times(plan):
            # aware: Huey turns a naive eta into UTC through time.mktime, which drops the
            # fraction of a second (the job would run up to 1 s early)
            eta = datetime.fromtimestamp(due, UTC)
            task.schedule((hit_url(plan["sink"], plan["tag"], job, due),), eta=eta)
        result["scheduled_at"] = time.time()
        result["enqueue_s"] = result["scheduled_at"] - started
        if args.kill_after:
            time.sleep(args.kill_after)
            assert system.proc is not None
            system.proc.kill()
            system.proc.wait(10)
            result["killed_at"] = time.time()
            result["restart"] = system.start()
        assert system.proc is not None
        result["cpu_scheduled_s"] = cpu_s(system.proc.pid)
        hits, unique = wait_for_hits(plan["sink"], plan["tag"], len(plan["jobs"]),
                                     args.deadline, args.settle)
        result.update(hits=hits, unique=unique)
        assert system.proc is not None
        result["rss_end_kb"] = rss_kb(system.proc.pid)
        result["cpu_end_s"] = cpu_s(system.proc.pid)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            stop(system.proc)
    emit(result)


if __name__ == "__main__":
    main()
