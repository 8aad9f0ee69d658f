"""Executors: the one small Protocol every way of running a job implements.

Called by the worker with a job's executor block (a ``manifests`` model) and a
:class:`RunContext`; each returns an :class:`Outcome` and never touches the store.

The contract, stated once here:

- ``run`` performs exactly one attempt. Retries are the worker's decision, never the
  executor's (no hidden internal retries).
- ``ctx.timeout`` (seconds, or ``None``) limits the attempt. When it expires the executor
  stops the work completely (for processes: SIGTERM to the whole process group, SIGKILL
  after ``ctx.kill_grace``) and returns ``Outcome(status=TIMED_OUT)``.
- Cancellation is asyncio cancellation of the task running ``run``: the executor stops the
  work completely, in the same way as for a timeout, and then re-raises
  ``CancelledError`` — or raises :class:`Cancelled` (a ``CancelledError``) carrying the
  output captured so far. No process, request or container of the attempt survives it.
- Output is captured up to ``ctx.output_limit`` bytes; beyond that it is dropped and
  ``Outcome.truncated`` is set (the text ends with :data:`TRUNCATION_MARK`). Executors
  that produce output over time also hand each captured piece to ``ctx.on_output`` as it
  arrives (what ``oneoff logs -f`` shows while a run is active).
- Problems a user can act on (connection refused, executable not found, a missing
  ``valueFrom`` source) are a ``FAILED`` outcome with a one-line ``error``; an executor
  raises only for bugs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from oneoff.manifests import EnvValue

TRUNCATION_MARK = "\n[… output truncated by OneOff: limit of {limit} bytes reached …]\n"


class OutcomeStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True, slots=True)
class RunContext:
    """Who is running and within which limits; the same for every executor."""

    run_id: str
    job: str
    namespace: str
    scheduled_at: datetime
    attempt: int
    env: Mapping[str, str] = field(default_factory=dict)
    """The job's resolved ``spec.env`` (``valueFrom`` already read)."""
    timeout: float | None = None
    kill_grace: float = 10.0
    output_limit: int = 1024 * 1024
    on_output: Callable[[bytes], None] | None = None
    """Called with each piece of output as it is captured (within ``output_limit``)."""

    def identity_env(self) -> dict[str, str]:
        """The run identity every shell, Docker and Kubernetes job sees."""
        return {
            "ONEOFF_RUN_ID": self.run_id,
            "ONEOFF_JOB": self.job,
            "ONEOFF_NAMESPACE": self.namespace,
            "ONEOFF_SCHEDULED_AT": self.scheduled_at.isoformat().replace("+00:00", "Z"),
            "ONEOFF_ATTEMPT": str(self.attempt),
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt."""

    status: OutcomeStatus
    exit_code: int | None = None
    http_status: int | None = None
    output: str = ""
    truncated: bool = False
    error: str = ""
    """One line a user can act on; empty on success."""


class Cancelled(asyncio.CancelledError):
    """A cancellation that carries what the attempt printed before it was stopped."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("cancelled")
        self.outcome = outcome


class Executor(Protocol):
    async def run(self, block: object, ctx: RunContext) -> Outcome:
        """Run one attempt of ``block`` (the job's executor block); see the module contract."""
        ...


class ValueSourceError(Exception):
    """A ``valueFrom`` source could not be read; the message names the variable."""


def resolve_env(
    env: Mapping[str, EnvValue],
    environ: Mapping[str, str] | None = None,
    read_file: Callable[[str], str] | None = None,
) -> dict[str, str]:
    """Literal values as they are; ``valueFrom`` read from the server's env or a file."""
    environ = os.environ if environ is None else environ
    resolved: dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, str):
            resolved[name] = value
            continue
        source = value.value_from
        if source.env is not None:
            if source.env not in environ:
                raise ValueSourceError(
                    f"{name}: valueFrom.env {source.env} is not set in the OneOff server's "
                    "environment"
                )
            resolved[name] = environ[source.env]
        elif source.file is not None:
            try:
                text = read_file(source.file) if read_file else _read(source.file)
            except OSError as exc:
                raise ValueSourceError(
                    f"{name}: valueFrom.file {source.file}: {exc.strerror or exc}"
                ) from None
            resolved[name] = text.rstrip("\n")
    return resolved


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


class CappedOutput:
    """A run's captured output: the first ``limit + 1`` bytes (one more than is kept, to
    see the overflow); the rest is dropped as it arrives, so a reader never has to stop
    reading and a writer is never blocked on a full pipe."""

    __slots__ = ("chunks", "limit", "room")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.limit = limit
        self.room = limit + 1

    def add(self, data: bytes) -> bytes:
        """Keep what fits of ``data``; returns the piece kept (``b""`` once full)."""
        piece = data[: self.room]
        if piece:
            self.chunks.append(piece)
            self.room -= len(piece)
        return piece

    @property
    def full(self) -> bool:
        """Past the cap: nothing more will be kept."""
        return self.room == 0

    def text(self) -> tuple[str, bool]:
        """The output as text, and whether it was truncated (then it ends with
        :data:`TRUNCATION_MARK`)."""
        data = b"".join(self.chunks)
        truncated = len(data) > self.limit
        text = data[: self.limit].decode("utf-8", errors="replace")
        if truncated:
            text += TRUNCATION_MARK.format(limit=self.limit)
        return text, truncated
