"""Shared test helpers: manifest text, a reconciler running its real watcher in a
thread, and a real ``oneoff serve`` process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.store import Store

ONEOFF = str(Path(sys.executable).parent / "oneoff")


def job_yaml(name: str, url: str = "https://example.com/hook", **extra: str) -> str:
    """A small valid HTTP Job manifest; ``extra`` adds top-level metadata lines."""
    metadata = "".join(f"\n  {key}: {value}" for key, value in extra.items())
    return (
        "apiVersion: oneoff.dev/v1\n"
        "kind: Job\n"
        f"metadata:\n  name: {name}{metadata}\n"
        "spec:\n"
        "  schedule: {at: '2030-01-01T00:00:00Z'}\n"
        f"  http: {{url: '{url}'}}\n"
    )


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, every: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(every)


@dataclass
class Running:
    """A reconciler whose ``run`` loop (watcher + resync) is live in a background thread."""

    reconciler: Reconciler
    store: Store
    root: Path
    stop: Callable[[], None] = field(default=lambda: None)

    def names(self) -> set[str]:
        return {obj.key.name for obj in self.store.objects()}


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    root = tmp_path / "jobs.d"
    root.mkdir()
    store = Store(str(tmp_path / "state.db"))
    reconciler = Reconciler(store, [DirectorySource(str(root))], resync_seconds=3600)
    loop = asyncio.new_event_loop()
    stop_event = asyncio.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(reconciler.run(stop_event))

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    wait_until(reconciler.synced.is_set)
    handle = Running(reconciler, store, root)

    def stop() -> None:
        loop.call_soon_threadsafe(stop_event.set)
        thread.join(10)

    handle.stop = stop
    yield handle
    stop()
    store.close()
    loop.close()


@dataclass
class Server:
    """A real ``oneoff serve`` process in its own working directory."""

    process: subprocess.Popen[str]
    cwd: Path
    lines: list[dict[str, Any]]
    reader: threading.Thread | None = None

    def oneoff(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ONEOFF, *args], cwd=self.cwd, capture_output=True, text=True,
                              timeout=60)

    @property
    def url(self) -> str:
        """The API address the server logged when it became ready."""
        ready = wait_until(lambda: next(
            (line for line in list(self.lines) if line.get("action") == "ready"), None))
        return str(ready["api"])

    def logged(self, predicate: Callable[[dict[str, Any]], bool]) -> bool:
        return any(predicate(line) for line in list(self.lines))

    def terminate(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(15)
        if self.reader is not None:
            self.reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code


def start_server(cwd: Path, *args: str) -> Server:
    # a free loopback port of its own, unless the test says otherwise
    env = {**os.environ, "ONEOFF_LOG_FORMAT": "json", "ONEOFF_LISTEN": "127.0.0.1:0"}
    process = subprocess.Popen([ONEOFF, "serve", *args], cwd=cwd, env=env, text=True,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    server = Server(process, cwd, [])

    def read() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            try:
                server.lines.append(json.loads(raw))
            except json.JSONDecodeError:
                server.lines.append({"message": raw.rstrip()})

    server.reader = threading.Thread(target=read, daemon=True)
    server.reader.start()
    return server


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def factory(*args: str, wait_ready: bool = True) -> Server:
        server = start_server(tmp_path, *args)
        started.append(server)
        if wait_ready:
            wait_until(lambda: server.logged(lambda line: line.get("action") == "ready")
                       or server.process.poll() is not None, timeout=20)
            assert server.process.poll() is None, server.lines
        return server

    yield factory
    for server in started:
        server.terminate()
