"""The Docker executor: one attempt of a job's ``docker`` block is one container.

Called by the worker (``WorkerPool._attempt``) with a :class:`~oneoff.manifests.DockerExecutor`
block and a :class:`~oneoff.executors.RunContext`; talks to a Docker Engine API
(``ONEOFF_DOCKER_HOST``, else ``DOCKER_HOST``, else the local socket) through the Docker SDK
and hands back an :class:`~oneoff.executors.Outcome` with the container's exit code and its
stdout+stderr as the engine interleaves them, capped at ``ctx.output_limit``. Also called
by the daemon on start, to remove the containers of runs a crash left ``lost``
(:meth:`DockerRunner.remove_containers_of_runs`).

One attempt: make sure of the image (``pullPolicy``), create the container with labels
naming the run (``oneoff.dev/run-id``, ``/job``, ``/namespace``, ``/attempt``), attach to
its output, start it and wait for its exit. On timeout or cancel it gets its stop signal
(SIGTERM unless the image declares another), then SIGKILL after ``ctx.kill_grace``.
Whatever happens, the container is removed afterwards.

The SDK blocks. Short calls (create, start, kill, remove) run on the runner's own thread
pool; the calls that may last long (inspecting and pulling the image, waiting for the
exit, reading the output) get a thread each, so a container never holds the event loop,
nor the asyncio default executor that the store's writes go through, nor a pool thread
that another run's kill would wait for. The client is made on
first use: a server without a Docker engine starts as fast as any other, and its docker
runs fail with a line naming the engine that could not be reached.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import CancellableStream
from docker.utils import parse_repository_tag

from oneoff.executors import (
    Cancelled,
    CappedOutput,
    Outcome,
    OutcomeStatus,
    RunContext,
    ValueSourceError,
    resolve_env,
)
from oneoff.manifests import DockerExecutor, PullPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_RUN_ID = "oneoff.dev/run-id"
LABEL_JOB = "oneoff.dev/job"
LABEL_NAMESPACE = "oneoff.dev/namespace"
LABEL_ATTEMPT = "oneoff.dev/attempt"

DEFAULT_ENGINE = "unix:///var/run/docker.sock"

OOM_CHECKS, OOM_CHECK_INTERVAL = 40, 0.05
"""After exit code 137: how often, and how far apart, to look for the engine's OOM flag
(up to 2 s: on a busy machine the engine records it well after the exit; only a run that
ended with SIGKILL waits, and only until the flag shows)."""

_ENGINE_ERRORS = (DockerException, requests.RequestException)
"""What the SDK raises when the engine refuses a call or cannot be reached."""

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)([kKmMgG]i?|[bB])?")
_RUNTIME_NOISE = re.compile(r"^.*unable to start container process: |: unknown$")


class _Failed(Exception):
    """A problem the user can act on; its message is the run's one-line error."""


class DockerRunner:
    """Runs ``docker`` blocks as containers of one Docker engine."""

    def __init__(
        self,
        *,
        host: str | None = None,
        environ: Mapping[str, str] | None = None,
        api_timeout: float = 60.0,
        drain_timeout: float = 2.0,
        threads: int = 16,
        connections: int = 64,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self.host = host
        """The engine address; ``None``: ``DOCKER_HOST`` of the server's environment."""
        self.api_timeout = api_timeout
        self.drain_timeout = drain_timeout
        """After the container exited, how long its last output may take to arrive."""
        self._connections = connections
        self._client: docker.DockerClient | None = None
        self._connecting = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="oneoff-docker")

    @property
    def engine(self) -> str:
        """The engine address, as messages name it."""
        return self.host or self._environ.get("DOCKER_HOST") or DEFAULT_ENGINE

    async def run(self, block: object, ctx: RunContext) -> Outcome:
        if not isinstance(block, DockerExecutor):
            raise TypeError(f"DockerRunner cannot run a {type(block).__name__} block")
        try:
            extra = resolve_env(block.env, self._environ)
        except ValueSourceError as exc:
            return Outcome(OutcomeStatus.FAILED, error=f"env {exc}")
        # Identity last: a job's own env cannot pretend to be another run.
        env = {**ctx.env, **extra, **ctx.identity_env()}
        loop = asyncio.get_running_loop()
        deadline = None if ctx.timeout is None else loop.time() + ctx.timeout
        try:
            api = (await self._call(self._connect)).api
            # A pull may take long: it gets a thread of its own, and the deadline holds for
            # it too (the engine finishes a pull on its own; no container exists yet).
            image = _in_thread(functools.partial(self._ensure_image, api, block),
                               f"oneoff-docker-image-{ctx.run_id}")
            done, _ = await asyncio.wait([image], timeout=_left(deadline, loop))
            if not done:
                return Outcome(OutcomeStatus.TIMED_OUT, error=(
                    f"timed out after {ctx.timeout:g}s while pulling image {block.image}"))
            stop_signal = image.result()
            container = await self._create(api, block, ctx, env)
        except _Failed as exc:
            return Outcome(OutcomeStatus.FAILED, error=str(exc))
        try:
            return await self._supervise(api, container, stop_signal, block, ctx, deadline)
        except _Failed as exc:
            return Outcome(OutcomeStatus.FAILED, error=str(exc))
        finally:
            # Shielded: cancelled again meanwhile, the removal still happens in its thread.
            await asyncio.shield(self._submit(self._remove, api, container, ctx.run_id))

    async def remove_containers_of_runs(self, run_ids: Collection[str]) -> dict[str, str]:
        """Remove (killing first) every container labelled with one of ``run_ids``.

        Returns container name → run id of what was removed. Nothing to look for, no
        connection to the engine; an engine that cannot be reached is logged, not raised.
        """
        if not run_ids:
            return {}
        return await self._call(self._remove_containers_of_runs, set(run_ids))

    def close(self) -> None:
        """Release the connections and threads; called once no run is left."""
        self._pool.shutdown(wait=False)
        if self._client is not None:
            self._client.close()

    # --- one attempt, on the event loop ----------------------------------------------

    async def _create(
        self, api: docker.APIClient, block: DockerExecutor, ctx: RunContext, env: dict[str, str]
    ) -> str:
        created = self._submit(self._create_container, api, block, ctx, env)
        created.add_done_callback(_consume)
        try:
            return await asyncio.shield(created)
        except asyncio.CancelledError:
            # The engine may still be creating it: remove it as soon as it exists.
            created.add_done_callback(
                lambda done: None if done.exception() is not None
                else self._pool.submit(self._remove, api, done.result(), ctx.run_id))
            raise

    async def _supervise(
        self,
        api: docker.APIClient,
        container: str,
        stop_signal: str,
        block: DockerExecutor,
        ctx: RunContext,
        deadline: float | None,
    ) -> Outcome:
        loop = asyncio.get_running_loop()
        capture = CappedOutput(ctx.output_limit)
        on_output = ctx.on_output
        deliver = (None if on_output is None  # read on a thread; handed over on the loop
                   else functools.partial(_deliver, loop, on_output))
        # Attached before the start, so not a byte of output is missed.
        stream = await self._call(self._attach, api, container)
        try:
            closed = _in_thread(functools.partial(_read, stream, capture, deliver),
                                f"oneoff-docker-output-{ctx.run_id}")
            await self._call(self._start, api, container)
            exited = _in_thread(functools.partial(api.wait, container, timeout=None),
                                f"oneoff-docker-wait-{ctx.run_id}")
            try:
                # asyncio.wait neither raises on timeout nor cancels ``exited``.
                done, _ = await asyncio.wait([exited], timeout=_left(deadline, loop))
            except asyncio.CancelledError:
                await self._stop(api, container, stop_signal, exited, ctx.kill_grace)
                await asyncio.wait([closed], timeout=self.drain_timeout)
                output, truncated = capture.text()
                raise Cancelled(Outcome(OutcomeStatus.FAILED, output=output,
                                        truncated=truncated)) from None
            if not done:
                await self._stop(api, container, stop_signal, exited, ctx.kill_grace)
            await asyncio.wait([closed], timeout=self.drain_timeout)
            output, truncated = capture.text()
            if not done:
                return Outcome(OutcomeStatus.TIMED_OUT, output=output, truncated=truncated,
                               error=f"timed out after {ctx.timeout:g}s")
            try:
                code = int(exited.result()["StatusCode"])
            except _ENGINE_ERRORS as exc:
                raise _Failed(f"lost the Docker engine at {self.engine} during the run: "
                              f"{_reason(exc)}") from None
            if code in block.success_exit_codes:
                return Outcome(OutcomeStatus.SUCCEEDED, exit_code=code, output=output,
                               truncated=truncated)
            error = f"exit code {code}"
            if code == 137 and await self._call(self._oom_killed, api, container):
                error = (f"exit code 137: killed for running out of memory (limit "
                         f"{block.resources.memory})")
            return Outcome(OutcomeStatus.FAILED, exit_code=code, output=output,
                           truncated=truncated, error=error)
        finally:
            _close(stream)

    async def _stop(
        self,
        api: docker.APIClient,
        container: str,
        stop_signal: str,
        exited: asyncio.Future[Any],
        grace: float,
    ) -> None:
        """The stop signal, ``grace`` seconds to exit, then SIGKILL."""
        await asyncio.shield(self._submit(self._kill, api, container, stop_signal))
        try:
            await asyncio.wait([exited], timeout=grace)
        finally:
            # Also when cancelled again during the grace period.
            if not exited.done():
                await asyncio.shield(self._submit(self._kill, api, container, "SIGKILL"))
                await asyncio.wait([exited], timeout=grace + self.api_timeout)

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._submit(fn, *args)

    # --- engine calls, in threads ----------------------------------------------------

    def _connect(self) -> docker.DockerClient:
        with self._connecting:
            if self._client is None:
                environment = {**self._environ, "DOCKER_HOST": self.engine}
                self._probe()
                try:
                    # Asks the engine for its API version: the first round trip.
                    self._client = docker.from_env(
                        environment=environment, timeout=int(self.api_timeout),
                        max_pool_size=self._connections)
                except _ENGINE_ERRORS as exc:
                    raise _Failed(f"cannot reach the Docker engine at {self.engine}: "
                                  f"{_reason(exc)}") from None
            return self._client

    def _probe(self) -> None:
        """A local socket nobody answers on is said at once, without the SDK (whose failed
        connection attempt leaves its socket open)."""
        if not self.engine.startswith("unix://"):
            return
        path = "/" + self.engine.removeprefix("unix://").lstrip("/")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(self.api_timeout)
            try:
                probe.connect(path)
            except OSError as exc:
                raise _Failed(f"cannot reach the Docker engine at {self.engine}: "
                              f"{exc.strerror or exc}") from None

    def _ensure_image(self, api: docker.APIClient, block: DockerExecutor) -> str:
        """Pull as ``pullPolicy`` says; returns the image's stop signal."""
        image = block.image
        if block.pull_policy is not PullPolicy.ALWAYS:
            try:
                return _stop_signal(_inspect_image(api, image))
            except ImageNotFound:
                if block.pull_policy is PullPolicy.NEVER:
                    raise _Failed(f"image {image} is not on the Docker engine and pullPolicy "
                                  "is Never: load or build it there first") from None
            except _ENGINE_ERRORS as exc:
                raise _Failed(f"image {image}: {_reason(exc)}") from None
        repository, tag = parse_repository_tag(image)
        try:
            for line in api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                if isinstance(line, dict) and line.get("error"):
                    raise _Failed(f"cannot pull image {image}: {_one_line(str(line['error']))}")
            return _stop_signal(_inspect_image(api, image))
        except _ENGINE_ERRORS as exc:
            raise _Failed(f"cannot pull image {image}: {_reason(exc)}") from None

    def _create_container(
        self, api: docker.APIClient, block: DockerExecutor, ctx: RunContext, env: dict[str, str]
    ) -> str:
        limits = block.resources
        host_config = api.create_host_config(
            network_mode=block.network,
            nano_cpus=round(limits.cpus * 1e9) if limits.cpus is not None else None,
            mem_limit=memory_bytes(limits.memory) if limits.memory is not None else None,
        )
        try:
            created = api.create_container(
                block.image,
                command=block.args,
                entrypoint=block.command,
                environment=env,
                working_dir=block.working_dir,
                user=block.user,
                labels={LABEL_RUN_ID: ctx.run_id, LABEL_JOB: ctx.job,
                        LABEL_NAMESPACE: ctx.namespace, LABEL_ATTEMPT: str(ctx.attempt)},
                name=container_name(ctx),
                host_config=host_config,
            )
        except _ENGINE_ERRORS as exc:
            raise _Failed(f"cannot create the container: {_reason(exc)}") from None
        return str(created["Id"])

    def _attach(self, api: docker.APIClient, container: str) -> CancellableStream[bytes]:
        try:
            return api.attach(container, stdout=True, stderr=True, stream=True, logs=True)
        except _ENGINE_ERRORS as exc:
            raise _Failed(f"cannot attach to the container: {_reason(exc)}") from None

    def _start(self, api: docker.APIClient, container: str) -> None:
        try:
            api.start(container)
        except _ENGINE_ERRORS as exc:
            raise _Failed(f"cannot start the container: {_reason(exc)}") from None

    def _kill(self, api: docker.APIClient, container: str, signal: str) -> None:
        try:
            api.kill(container, signal=signal)
        except NotFound:
            pass  # already removed
        except APIError as exc:
            if exc.status_code != 409:  # 409: not running any more
                log.warning("cannot send %s to container %s: %s", signal, container[:12],
                            _reason(exc), extra={"action": "stop"})
        except requests.RequestException as exc:
            log.warning("cannot send %s to container %s: %s", signal, container[:12],
                        _reason(exc), extra={"action": "stop"})

    def _oom_killed(self, api: docker.APIClient, container: str) -> bool:
        # The engine may record the OOM kill after the exit it caused (seen up to 30 ms
        # with Docker 20.10 on a quiet machine, over 0.5 s with both cores busy): look
        # again for a moment.
        for _ in range(OOM_CHECKS):
            try:
                if api.inspect_container(container)["State"].get("OOMKilled"):
                    return True
            except _ENGINE_ERRORS:
                return False
            time.sleep(OOM_CHECK_INTERVAL)
        return False

    def _remove(self, api: docker.APIClient, container: str, run_id: str) -> None:
        try:
            api.remove_container(container, force=True, v=True)
        except NotFound:
            pass
        except _ENGINE_ERRORS as exc:
            log.warning("cannot remove container %s: %s", container[:12], _reason(exc),
                        extra={"action": "remove", "run_id": run_id})

    def _remove_containers_of_runs(self, run_ids: set[str]) -> dict[str, str]:
        try:
            api = self._connect().api
            listed = api.containers(all=True, filters={"label": LABEL_RUN_ID})
        except _Failed as exc:
            log.info("%s; containers of lost runs, if any, were not looked for", exc,
                     extra={"action": "recover"})
            return {}
        except _ENGINE_ERRORS as exc:
            log.warning("cannot list containers of lost runs: %s", _reason(exc),
                        extra={"action": "recover"})
            return {}
        removed: dict[str, str] = {}
        for info in listed:
            run_id = (info.get("Labels") or {}).get(LABEL_RUN_ID)
            if run_id not in run_ids:
                continue
            name = next(iter(info.get("Names") or ()), info["Id"][:12]).lstrip("/")
            try:
                api.remove_container(info["Id"], force=True, v=True)
            except NotFound:
                continue
            except _ENGINE_ERRORS as exc:
                log.warning("cannot remove container %s of lost run %s: %s", name, run_id,
                            _reason(exc), extra={"action": "recover", "run_id": run_id})
                continue
            removed[name] = run_id
        return removed


def container_name(ctx: RunContext) -> str:
    """``oneoff-<job>-<run id>-<attempt>``: readable in ``docker ps``, unique per attempt."""
    return f"oneoff-{ctx.job}-{ctx.run_id}-{ctx.attempt}"


def memory_bytes(text: str) -> int:
    """``256m``, ``512Mi``, ``1g``, ``1048576``: k, m, g (and Ki, Mi, Gi) are powers of 1024."""
    match = _MEMORY.fullmatch(text)
    if match is None:
        raise ValueError(f"not a memory size: {text!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "")[:1].lower()])


def _read(stream: Iterable[bytes], capture: CappedOutput,
          deliver: Callable[[bytes], None] | None) -> None:
    """Reads the attached output until the container's streams close; each kept piece
    also goes to ``deliver``."""
    try:
        for chunk in stream:
            piece = capture.add(chunk)
            if piece and deliver is not None:
                deliver(piece)
    except Exception as exc:  # a broken stream ends the output, never the thread loudly
        log.debug("output stream ended: %s", exc, extra={"action": "run"})


def _close(stream: CancellableStream[bytes]) -> None:
    """Close the attach connection: the socket, and the HTTP response that still holds it
    (``CancellableStream.close`` leaves that one open, and its socket with it)."""
    stream.close()
    response = getattr(stream, "_response", None)
    if response is not None:
        response.close()


def _in_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run a call that lasts as long as a container in a thread of its own."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def main() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting side, like run_in_executor
            _deliver(loop, _set_exception, future, exc)
        else:
            _deliver(loop, _set_result, future, result)

    threading.Thread(target=main, name=name, daemon=True).start()
    future.add_done_callback(_consume)
    return future


def _set_result(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _deliver(loop: asyncio.AbstractEventLoop, settle: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(settle, *args)
    except RuntimeError:
        pass  # the loop is closed: nobody waits any more


def _consume(future: asyncio.Future[Any]) -> None:
    """Marks an exception as seen (an abandoned future would log it at garbage collection)."""
    if not future.cancelled():
        future.exception()


def _inspect_image(api: docker.APIClient, image: str) -> dict[str, Any]:
    found: dict[str, Any] = api.inspect_image(image)  # type: ignore[no-untyped-call]  # stubs
    return found


def _stop_signal(image: dict[str, Any]) -> str:
    return str((image.get("Config") or {}).get("StopSignal") or "SIGTERM")


def _left(deadline: float | None, loop: asyncio.AbstractEventLoop) -> float | None:
    return None if deadline is None else max(0.0, deadline - loop.time())


def _reason(exc: BaseException) -> str:
    """The engine's own explanation, or the root cause of a connection failure, one line."""
    if isinstance(exc, APIError) and exc.explanation:
        return _one_line(_RUNTIME_NOISE.sub("", str(exc.explanation)))
    root: BaseException = exc
    while (cause := root.__cause__ or root.__context__) is not None:
        root = cause
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    return _one_line(str(exc))


def _one_line(text: str) -> str:
    return " ".join(text.split())
