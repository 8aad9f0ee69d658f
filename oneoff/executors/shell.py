"""The shell executor: one attempt of a job's ``shell`` block is one process group.

Called by the worker (``WorkerPool._attempt``) with a :class:`~oneoff.manifests.ShellExecutor`
block and a :class:`~oneoff.executors.RunContext`; hands back an
:class:`~oneoff.executors.Outcome` with the exit code and the interleaved stdout+stderr,
capped at ``ctx.output_limit``.

The process starts in a new session, so its pid is also its process group id, and every
signal goes to the whole group: on timeout or cancel SIGTERM, then SIGKILL after
``ctx.kill_grace``; after a normal exit SIGKILL at once for whatever the job left running
in the background. A process that leaves the group itself (``setsid``, a double-forking
daemon) is beyond the reach of a process group; the run still returns, after
``drain_timeout``, even if such a process keeps the output pipe open.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable, Mapping

from oneoff.executors import (
    Cancelled,
    CappedOutput,
    Outcome,
    OutcomeStatus,
    RunContext,
    ValueSourceError,
    resolve_env,
)
from oneoff.manifests import ShellExecutor

BASE_ENV = ("PATH", "HOME", "LANG")
"""The only variables a job inherits from the server's environment."""

REAP_TIMEOUT = 5.0
"""How long to wait for the main process to be reaped after SIGKILL (it is not ignorable)."""


class _Pipe(asyncio.SubprocessProtocol):
    """Receives the combined output and the exit, without ever pausing the pipe.

    Reading never stops, so a child that writes more than the cap is not blocked on a
    full pipe: the bytes beyond ``limit + 1`` are dropped as they arrive.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop,
                 on_output: Callable[[bytes], None] | None = None) -> None:
        self.output = CappedOutput(limit)
        self.on_output = on_output
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        piece = self.output.add(data)
        if piece and self.on_output is not None:
            self.on_output(piece)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


class ShellRunner:
    """Runs ``shell`` blocks as processes of the OneOff host."""

    def __init__(
        self, *, environ: Mapping[str, str] | None = None, drain_timeout: float = 1.0
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self.drain_timeout = drain_timeout
        """After the group is gone, how long to wait for the pipe to close (see module)."""

    async def run(self, block: object, ctx: RunContext) -> Outcome:
        if not isinstance(block, ShellExecutor):
            raise TypeError(f"ShellRunner cannot run a {type(block).__name__} block")
        try:
            extra = resolve_env(block.env, self._environ)
        except ValueSourceError as exc:
            return Outcome(OutcomeStatus.FAILED, error=f"env {exc}")
        env = {name: self._environ[name] for name in BASE_ENV if name in self._environ}
        # Identity last: a job's own env cannot pretend to be another run.
        env.update({**ctx.env, **extra, **ctx.identity_env()})
        argv = ([block.shell, "-c", block.script] if block.script is not None
                else list(block.command or ()))

        loop = asyncio.get_running_loop()
        try:
            transport, pipe = await loop.subprocess_exec(
                lambda: _Pipe(ctx.output_limit, loop, ctx.on_output),
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=block.working_dir,
                start_new_session=True,
            )
        except OSError as exc:
            return Outcome(OutcomeStatus.FAILED, error=_start_error(exc, argv, block.working_dir))

        group = transport.get_pid()
        try:
            return await self._supervise(block, ctx, transport, pipe, group)
        finally:
            # Whatever happened, a cancel or a bug included: nothing of the group survives.
            _kill_group(group, signal.SIGKILL)
            try:
                # Closing the transport before the exit is seen would make it kill and
                # reap on its own, racing asyncio's child watcher.
                await asyncio.wait([pipe.exited], timeout=REAP_TIMEOUT)
            finally:
                transport.close()

    async def _supervise(
        self,
        block: ShellExecutor,
        ctx: RunContext,
        transport: asyncio.SubprocessTransport,
        pipe: _Pipe,
        group: int,
    ) -> Outcome:
        try:
            # asyncio.wait neither raises on timeout nor cancels ``exited`` when cancelled.
            done, _ = await asyncio.wait([pipe.exited], timeout=ctx.timeout)
        except asyncio.CancelledError:
            await _stop(group, pipe, ctx.kill_grace)
            await asyncio.wait([pipe.closed], timeout=self.drain_timeout)
            output, truncated = pipe.output.text()
            raise Cancelled(Outcome(OutcomeStatus.FAILED, output=output,
                                    truncated=truncated)) from None
        if not done:
            await _stop(group, pipe, ctx.kill_grace)
        else:
            _kill_group(group, signal.SIGKILL)
        # Every writer in the group is dead, so EOF follows what is still buffered, unless
        # a process that left the group holds the pipe: then stop waiting after a moment.
        await asyncio.wait([pipe.closed], timeout=self.drain_timeout)

        output, truncated = pipe.output.text()
        if not done:
            return Outcome(OutcomeStatus.TIMED_OUT, output=output, truncated=truncated,
                           error=f"timed out after {ctx.timeout:g}s")
        code = transport.get_returncode()
        assert code is not None  # ``exited`` is set only after the returncode
        if code < 0:
            return Outcome(OutcomeStatus.FAILED, output=output, truncated=truncated,
                           error=f"killed by signal {_signal_name(-code)}")
        if code in block.success_exit_codes:
            return Outcome(OutcomeStatus.SUCCEEDED, exit_code=code, output=output,
                           truncated=truncated)
        return Outcome(OutcomeStatus.FAILED, exit_code=code, output=output, truncated=truncated,
                       error=f"exit code {code}")


async def _stop(group: int, pipe: _Pipe, grace: float) -> None:
    """SIGTERM the group, give it ``grace`` to exit (and close the pipe), then SIGKILL."""
    _kill_group(group, signal.SIGTERM)
    try:
        await asyncio.wait([pipe.exited, pipe.closed], timeout=grace)
    finally:
        # Also when cancelled again during the grace period.
        _kill_group(group, signal.SIGKILL)


def _kill_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _start_error(exc: OSError, argv: list[str], working_dir: str | None) -> str:
    reason = exc.strerror or str(exc)
    if working_dir is not None and exc.filename == working_dir:
        return f"working directory {working_dir}: {reason}"
    return f"cannot run {argv[0]}: {reason}"
