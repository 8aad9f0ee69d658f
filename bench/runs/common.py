"""Helpers shared by ``run.py`` and every driver; standard library only.

The drivers run under two interpreters (OneOff's ``.venv`` and ``bench/.venv-peers``), so
nothing here imports a third-party package. A driver is a subprocess with one contract:

``python <driver>.py --plan PLAN --workdir DIR [--workers N] [--kill-after S] ...``

It reads the plan (a JSON file: run tag, sink URL, base due time ``t0`` and a list of
``[job id, due offset in seconds]``), schedules every job on its system so that it calls
``<sink>/hit?run=TAG&job=ID&due=EPOCH`` at ``t0 + offset``, waits at the sink until they
have all landed (or ``--deadline`` passes), and prints one line ``RESULT {json}`` with
what it saw (setup times, pids, RSS, errors). Every process it starts is in its own session
and its pid is appended to ``DIR/pids`` so that ``run.py`` can kill leftovers even if the
driver itself died.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

RESULT_PREFIX = "RESULT "
HERE = Path(__file__).resolve().parent


# --- plans and URLs ----------------------------------------------------------------


def load_plan(path: str) -> dict[str, Any]:
    with open(path) as handle:
        plan: dict[str, Any] = json.load(handle)
    return plan


def due_times(plan: dict[str, Any]) -> list[tuple[str, float]]:
    """(job id, absolute due epoch), rounded to the millisecond (OneOff's precision)."""
    t0 = float(plan["t0"])
    return [(str(job), round(t0 + float(offset), 3)) for job, offset in plan["jobs"]]


def hit_url(sink: str, tag: str, job: str, due: float) -> str:
    return f"{sink}/hit?run={tag}&job={job}&due={due:.3f}"


class Hitter:
    """GETs URLs over one keep-alive connection per thread (what a job body would do)."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def get(self, url: str) -> int:
        parts = urlsplit(url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        for attempt in (1, 2):
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                                  timeout=self.timeout)
                self._local.conn = conn
            try:
                conn.request("GET", target)
                response = conn.getresponse()
                response.read()
                return response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


# --- the sink ------------------------------------------------------------------------


def sink_get(sink: str, path: str, timeout: float = 10.0) -> Any:
    parts = urlsplit(sink)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                      timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return json.loads(response.read() or b"null")
    finally:
        conn.close()


def sink_count(sink: str, tag: str) -> tuple[int, int]:
    """(hits, distinct jobs) recorded for ``tag``."""
    found = sink_get(sink, f"/_count?run={tag}")
    return int(found["hits"]), int(found["unique"])


def wait_for_hits(
    sink: str, tag: str, expected: int, deadline: float, settle: float = 0.0,
    interval: float = 0.25,
) -> tuple[int, int]:
    """Poll the sink until ``expected`` distinct jobs landed (then ``settle`` seconds more,
    to catch duplicates) or ``deadline`` (epoch) passes; returns (hits, distinct)."""
    hits, unique = sink_count(sink, tag)
    while unique < expected and time.time() < deadline:
        time.sleep(interval)
        hits, unique = sink_count(sink, tag)
    if settle > 0:
        time.sleep(max(0.0, min(settle, deadline - time.time())))
        hits, unique = sink_count(sink, tag)
    return hits, unique


# --- processes -----------------------------------------------------------------------


def spawn(
    cmd: Sequence[str], log_path: Path, workdir: Path, *, env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session, output to ``log_path``; its pid goes to workdir/pids."""
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
    )
    log.close()
    with open(workdir / "pids", "a") as pids:
        pids.write(f"{proc.pid}\n")
    return proc


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0,
         sig: int = signal.SIGTERM) -> None:
    """``sig`` to the process group, SIGKILL after ``grace`` seconds; reaps the child."""
    if proc is None:
        return
    if proc.poll() is None:
        kill_group(proc, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc, signal.SIGKILL)  # anything left in the group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def kill_pidfile(path: Path) -> list[int]:
    """SIGKILL every process group listed in ``path`` that is still alive."""
    killed = []
    if not path.exists():
        return killed
    for line in path.read_text().split():
        pid = int(line)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def rss_kb(pid: int, field: str = "VmRSS") -> int | None:
    """VmRSS (or another /proc status field, e.g. VmHWM: peak RSS) of ``pid`` in kB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds used so far by ``pid`` (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_rss_kb(pid: int) -> int | None:
    """RSS of ``pid`` plus its direct children (a prefork pool), in kB."""
    own = rss_kb(pid)
    if own is None:
        return None
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        for child in children.read_text().split():
            own += rss_kb(int(child)) or 0
    return own


def wait_for_line(
    path: Path, match: Callable[[str], bool], timeout: float,
    proc: subprocess.Popen[bytes] | None = None, start: int = 0,
) -> tuple[str | None, float]:
    """Tail ``path`` from byte ``start`` until a line matches; (line, time.time() seen)."""
    deadline = time.time() + timeout
    offset, pending = start, b""
    while time.time() < deadline:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if match(line):
                    return line, time.time()
        if proc is not None and proc.poll() is not None:
            return None, time.time()
        time.sleep(0.005)
    return None, time.time()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def driver_args(description: str) -> argparse.ArgumentParser:
    """The arguments every driver takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--plan", required=True, help="plan JSON written by run.py")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--kill-after", type=float, default=0.0,
                        help="kill -9 the system this many seconds after scheduling, restart")
    parser.add_argument("--deadline", type=float, required=True,
                        help="epoch: stop waiting for hits after this")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to keep listening after all jobs landed")
    return parser


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    sys.stdout.flush()
