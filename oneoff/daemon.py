"""The composition root of ``oneoff serve``: builds every part from Settings and runs them.

Called by ``cli.serve``. Holds an exclusive lock next to the state file (the daemon is
its only writer), opens the store, recovers runs a crash left behind, and runs the
reconciler, the scheduler and the worker pool in one asyncio task group until SIGINT or
SIGTERM; then running jobs get a grace period before they are cancelled and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, TextIO

import uvicorn

from oneoff.api import create_app
from oneoff.auth import KeyRing
from oneoff.errors import OneOffError, StoreError, UsageError
from oneoff.executors.docker import DockerRunner
from oneoff.executors.http import HttpRunner
from oneoff.executors.processes import kill_processes_of_runs
from oneoff.executors.shell import ShellRunner
from oneoff.metrics import Metrics
from oneoff.plan import Action
from oneoff.reconciler import DirectorySource, Reconciler, Report
from oneoff.records import isoformat
from oneoff.scheduler import Scheduler
from oneoff.settings import LogFormat, Settings
from oneoff.store import Store, purge_audit, reclaim_space, use_incremental_vacuum
from oneoff.worker import WorkerPool

log = logging.getLogger(__name__)

DEFAULT_MANIFESTS = ("./jobs.d",)


class Daemon:
    """Everything ``oneoff serve`` runs, wired together; tests build one with a tmp state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.store: Store | None = None
        self.reconciler: Reconciler | None = None
        self.scheduler: Scheduler | None = None
        self.pool: WorkerPool | None = None
        self.metrics: Metrics | None = None
        self._scheduling: asyncio.Task[None] | None = None

    async def run(self) -> None:
        started = time.perf_counter()
        settings = self.settings
        with _exclusive(settings.state), Store(settings.state) as store:
            self.store = store
            vacuum_started = time.perf_counter()
            if await asyncio.to_thread(use_incremental_vacuum, store):
                log.info("state file rewritten to give purged space back (%.0f ms, once)",
                         (time.perf_counter() - vacuum_started) * 1000,
                         extra={"action": "vacuum", "state": settings.state})
            if settings.manifests == DEFAULT_MANIFESTS:
                os.makedirs(settings.manifests[0], exist_ok=True)  # the new user's first step
            http = HttpRunner()
            docker = DockerRunner(host=settings.docker_host)  # connects on its first run
            self.pool = pool = WorkerPool(
                store,
                settings.workers,
                {"http": http, "shell": ShellRunner(), "docker": docker},
                kill_grace=settings.kill_grace_seconds,
            )
            self.scheduler = scheduler = Scheduler(
                store,
                pool.start,
                pool.capacity,
                pool.active_runs,
                pool.cancel,
                recurring=settings.recurring,
            )
            pool.on_free = scheduler.wake
            self.metrics = metrics = Metrics(store, lambda: (pool.busy(), pool.size))

            def applied(report: Report) -> None:
                metrics.observe_reconcile(
                    report.source, report.seconds, failed=bool(report.issues)
                    or not report.applied, refused=bool(report.plan and report.plan.refused))
                sync_changed_jobs(store, scheduler, report)

            self.reconciler = Reconciler(
                store,
                [DirectorySource(root) for root in settings.manifests],
                prune_max_share=settings.prune_max_share,
                max_file_bytes=settings.max_manifest_bytes,
                resync_seconds=settings.resync_seconds,
                on_applied=applied,
            )
            lost, _ = await asyncio.to_thread(scheduler.recover)
            for pid, run_id in (await asyncio.to_thread(kill_processes_of_runs, lost)).items():
                log.warning("killed process %d left over from lost run %s", pid, run_id,
                            extra={"action": "recover", "run_id": run_id})
            for name, run_id in (await docker.remove_containers_of_runs(lost)).items():
                log.warning("removed container %s left over from lost run %s", name, run_id,
                            extra={"action": "recover", "run_id": run_id})
            await asyncio.to_thread(self.purge, scheduler, store, metrics)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.reconciler.run(self.stop))
                    await self.reconciler.synced.wait()
                    await asyncio.to_thread(scheduler.sync)  # also jobs unchanged since last run
                    self._scheduling = group.create_task(scheduler.run(self.stop))
                    group.create_task(self._purge_daily(scheduler, store, metrics))
                    group.create_task(metrics.run(self.stop))
                    address = await self._start_api(group, store, scheduler, pool)
                    log.info(
                        "ready in %.0f ms: state %s, watching %s, %d workers, API on %s",
                        (time.perf_counter() - started) * 1000,
                        settings.state,
                        ", ".join(settings.manifests),
                        settings.workers,
                        address,
                        extra={"action": "ready", "state": settings.state, "api": address},
                    )
            finally:
                await pool.shutdown(settings.shutdown_grace_seconds)
                await http.aclose()
                docker.close()
                metrics.close()
        log.info("stopped", extra={"action": "stop"})

    async def _start_api(
        self, group: asyncio.TaskGroup, store: Store, scheduler: Scheduler, pool: WorkerPool
    ) -> str:
        """Bind the API address and serve the API in ``group``; returns the address.

        Keys come from the manifests, so this runs after the first reconcile: with no key
        declared, only a loopback address may be bound (unless ``--insecure``).
        """
        assert self.reconciler is not None
        keys = KeyRing(store)
        host, port = split_listen(self.settings.listen)
        if not _is_loopback(host) and not self.settings.insecure and not await asyncio.to_thread(
                keys.any):
            raise UsageError(
                f"refusing to serve the API on {self.settings.listen} without API keys: declare "
                "an ApiKey (oneoff keys generate), listen on 127.0.0.1, or pass --insecure")
        try:
            sock = _listen(host, port)
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.settings.listen}: {exc.strerror or exc}; "
                             "pass --listen HOST:PORT") from None
        app = create_app(
            store, reconciler=self.reconciler, scheduler=scheduler, keys=keys,
            ready=self.ready, live_output=pool.live_output, stop=self.stop,
            metrics=self.metrics, metrics_auth=self.settings.metrics_auth,
        )
        server = _ApiServer(uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=2, server_header=False))
        group.create_task(self._serve_api(server, sock))
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
            await asyncio.sleep(0.002)
        bound = sock.getsockname()
        return f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"

    async def _serve_api(self, server: uvicorn.Server, sock: socket.socket) -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopping.cancel()
        await serving

    def ready(self) -> dict[str, bool]:
        """``/readyz``: the store answers, every source was reconciled once, the scheduler
        loop is running."""
        try:
            store_ok = self.store is not None and self.store.last_event_seq() >= 0
        except StoreError:
            store_ok = False
        return {
            "store": store_ok,
            "reconciled": self.reconciler is not None and self.reconciler.synced.is_set(),
            "scheduler": self._scheduling is not None and not self._scheduling.done(),
        }

    def purge(self, scheduler: Scheduler, store: Store, metrics: Metrics) -> None:
        """Retention: finished runs (retention days, historyLimit), events and audit rows;
        then the freed pages go back to the file system. Blocking."""
        now = scheduler.clock()
        runs, events = scheduler.purge(self.settings.retention_days)
        before = isoformat(now - timedelta(days=self.settings.retention_days))
        audit = purge_audit(store, now, before)
        pages = reclaim_space(store)
        metrics.observe_purge(runs, events, audit)
        if runs or events or audit or pages:
            log.info("retention: %d execution(s), %d event(s), %d audit row(s) purged; "
                     "%d free page(s) given back", runs, events, audit, pages,
                     extra={"action": "purge", "executions": runs, "events": events,
                            "audit": audit, "pages": pages})

    async def _purge_daily(self, scheduler: Scheduler, store: Store, metrics: Metrics) -> None:
        while True:
            try:
                await asyncio.wait_for(self.stop.wait(), 86400)
                return
            except TimeoutError:
                await asyncio.to_thread(self.purge, scheduler, store, metrics)


class _ApiServer(uvicorn.Server):
    """uvicorn, minus its own signal handling: the daemon owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) → (host, port)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {listen!r} is not HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Created with ``IPPROTO_TCP`` explicitly: asyncio turns on
    TCP_NODELAY only for sockets that say so, and without it every keep-alive response
    waits ~40 ms for a delayed ACK (Nagle)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def sync_changed_jobs(store: Store, scheduler: Scheduler, report: Report) -> None:
    """After a reconcile: new and edited jobs get their slots, deleted ones lose theirs."""
    if report.plan is None or report.plan.refused or not report.plan.has_changes:
        return
    changed, deleted = [], []
    for change in report.plan.changes:
        if change.key.kind != "Job" or change.action is Action.UNCHANGED:
            continue
        if change.action is Action.DELETE and change.stored is not None:
            deleted.append(change.stored)
        elif (job := store.get(change.key)) is not None:
            changed.append(job)
    scheduler.sync(changed, deleted)


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

    try:
        asyncio.run(main())
    except ExceptionGroup as group:  # a task's OneOffError reaches the CLI as itself
        errors = group.subgroup(lambda exc: isinstance(exc, OneOffError))
        if errors is None:
            raise
        first = errors.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise first from None


# --- logging -------------------------------------------------------------------------

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


_encode_json = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every structured field.

    Every run logs its outcome, so a burst writes thousands of lines a second: the time
    of day is formatted once a second, and one encoder serves every line.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        line: dict[str, Any] = {
            "time": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return _encode_json(line)


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


def _default_action(record: logging.LogRecord) -> bool:
    """Lines of other libraries (uvicorn, asyncio) carry an ``action`` too: their logger."""
    if not hasattr(record, "action"):
        record.action = record.name
    return True


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    use_json = settings.log_format is LogFormat.JSON or (
        settings.log_format is LogFormat.AUTO and not stream.isatty()
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    handler.addFilter(_default_action)
    # Neither formatter shows them; each would cost a lookup on every line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # our own lines say it
