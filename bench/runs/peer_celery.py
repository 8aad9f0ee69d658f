"""Celery + Redis driver: a bench-owned redis-server, a thread-pool worker, ``eta`` tasks.

Runs under ``bench/.venv-peers``; needs ``redis-server`` on PATH (``setup.sh``). See
``common.py`` for the driver contract. It starts ``redis-server --port <free port> --save ''
--appendonly no`` on 127.0.0.1 (infrastructure: never killed by the kill -9 test), then the
system process, ``celery -A peer_celery worker --pool threads -c N`` (default log level
WARNING, no gossip/mingle/heartbeat, results ignored), waits until it answers a ping, then
sends every job with ``send_task("peer_celery.hit", (url,), eta=<due>)``. "Scheduled" is
when the worker has taken every message off the Redis list (an ``eta`` task waits in the
worker's memory, unacknowledged, until due). A job is one GET to the sink over a per-thread
keep-alive connection. ``--kill-after`` SIGKILLs the worker's process group and starts a
new worker; the unacknowledged messages return to the queue only after the Redis
transport's ``visibility_timeout`` (default 1 h, left as is).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from common import (
    HERE,
    Hitter,
    cpu_s,
    driver_args,
    due_times,
    emit,
    free_port,
    hit_url,
    load_plan,
    rss_kb,
    spawn,
    stop,
    wait_for_hits,
)

BROKER_ENV = "BENCH_CELERY_BROKER"

app = Celery("peer_celery", broker=os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
    enable_utc=True,
)
HITTER = Hitter()


@app.task(name="peer_celery.hit")
def hit(url: str) -> None:
    HITTER.get(url)


class System:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port = free_port()
        self.broker = f"redis://127.0.0.1:{self.port}/0"
        self.redis: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        app.conf.broker_url = self.broker

    def start_redis(self) -> None:
        self.redis = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no"],
                           self.args.workdir / "redis.log", self.args.workdir)
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def queue_length(self) -> int:
        import redis

        return int(redis.Redis(port=self.port).llen("celery"))

    def start_worker(self, timeout: float = 60) -> dict[str, Any]:
        spawned = time.time()
        self.proc = spawn(
            [sys.executable, "-m", "celery", "-A", "peer_celery", "worker", "--pool", "threads",
             "-c", str(self.args.workers), "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"bench{spawned:.0f}@localhost"],
            self.args.workdir / "celery.log", self.args.workdir,
            env={BROKER_ENV: self.broker}, cwd=HERE,
        )
        deadline = spawned + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited {self.proc.returncode}")
            if app.control.ping(timeout=0.3):
                seen = time.time()
                return {"pid": self.proc.pid, "spawned_at": spawned, "ready_at": seen,
                        "ready_s": seen - spawned}
        raise RuntimeError("celery worker did not answer a ping")

    def wait_drained(self, timeout: float) -> float:
        deadline = time.time() + timeout
        while self.queue_length() and time.time() < deadline:
            time.sleep(0.05)
        return time.time()


def main() -> None:
    parser = driver_args(__doc__.splitlines()[0])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    plan = load_plan(args.plan)
    system = System(args)
    result: dict[str, Any] = {"system": "celery", "workers": args.workers}
    try:
        system.start_redis()
        result.update(system.start_worker())
        started = time.time()
        with app.producer_or_acquire() as producer:
            for job, due in due_times(plan):
                app.send_task("peer_celery.hit",
                              (hit_url(plan["sink"], plan["tag"], job, due),),
                              eta=datetime.fromtimestamp(due, UTC), producer=producer)
        result["sent_s"] = time.time() - started
        result["scheduled_at"] = system.wait_drained(timeout=120)
        result["queued_left"] = system.queue_length()
        if args.kill_after:
            time.sleep(args.kill_after)
            assert system.proc is not None
            stop(system.proc, grace=0, sig=9)
            result["killed_at"] = time.time()
            result["restart"] = system.start_worker()
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
        with contextlib.suppress(Exception):
            stop(system.redis)
    emit(result)


if __name__ == "__main__":
    main()
