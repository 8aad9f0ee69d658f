"""The composition root of ``oneoff serve``: builds every part from Settings and runs them.

Called by ``cli.serve``. Holds an exclusive lock next to the state file (the daemon is
its only writer), opens the store, and runs the reconciler (later also the scheduler,
worker pool and API) in one asyncio task group until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from oneoff.errors import StoreError
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.settings import LogFormat, Settings
from oneoff.store import Store

log = logging.getLogger(__name__)

DEFAULT_MANIFESTS = ("./jobs.d",)


class Daemon:
    """Everything ``oneoff serve`` runs, wired together; tests build one with a tmp state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.store: Store | None = None
        self.reconciler: Reconciler | None = None

    async def run(self) -> None:
        started = time.perf_counter()
        settings = self.settings
        with _exclusive(settings.state), Store(settings.state) as store:
            self.store = store
            if settings.manifests == DEFAULT_MANIFESTS:
                os.makedirs(settings.manifests[0], exist_ok=True)  # the new user's first step
            self.reconciler = Reconciler(
                store,
                [DirectorySource(root) for root in settings.manifests],
                prune_max_share=settings.prune_max_share,
                max_file_bytes=settings.max_manifest_bytes,
                resync_seconds=settings.resync_seconds,
            )
            async with asyncio.TaskGroup() as group:
                group.create_task(self.reconciler.run(self.stop))
                await self.reconciler.synced.wait()
                log.info(
                    "ready in %.0f ms: state %s, watching %s",
                    (time.perf_counter() - started) * 1000,
                    settings.state,
                    ", ".join(settings.manifests),
                    extra={"action": "ready", "state": settings.state},
                )
        log.info("stopped", extra={"action": "stop"})


@contextlib.contextmanager
def _exclusive(state: str) -> Iterator[None]:
    """Refuse to run two daemons on one state file."""
    directory = os.path.dirname(os.path.abspath(state))
    if not os.path.isdir(directory):
        raise StoreError(f"cannot create state file {state}: directory {directory} is missing")
    with open(state + ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"another 'oneoff serve' is already using {state}; stop it or pass --state"
            ) from None
        yield


def serve(settings: Settings) -> None:
    """Run the daemon in the foreground until SIGINT or SIGTERM."""
    configure_logging(settings)
    daemon = Daemon(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, daemon.stop.set)
        await daemon.run()

    asyncio.run(main())


# --- logging -------------------------------------------------------------------------

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every structured field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """Human lines for a terminal: time, level, message, then key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        text = (
            f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} "
            f"{record.getMessage()}" + (f"  {fields}" if fields else "")
        )
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    use_json = settings.log_format is LogFormat.JSON or (
        settings.log_format is LogFormat.AUTO and not stream.isatty()
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
