"""The HTTP executor: one attempt of a job's ``http`` block is one request.

Called by the worker (``WorkerPool._attempt``) with an :class:`~oneoff.manifests.HttpExecutor`
block and a :class:`~oneoff.executors.RunContext`; hands back an
:class:`~oneoff.executors.Outcome` whose output is the response's status line, headers and
body, capped at ``ctx.output_limit`` while streaming. The daemon owns one
:class:`HttpRunner` for the life of the server and closes it with :meth:`HttpRunner.aclose`.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from http.cookiejar import Cookie, CookieJar
from typing import Any

import httpx

from oneoff.executors import (
    Outcome,
    OutcomeStatus,
    RunContext,
    ValueSourceError,
    cap_output,
    resolve_env,
)
from oneoff.manifests import HttpExecutor

USER_AGENT = "oneoff"

DEFAULT_LIMITS = httpx.Limits(
    max_connections=200,
    max_keepalive_connections=100,
    # Below the 5 s idle timeout of common servers (Node.js, many proxies): reusing a
    # connection the server is closing at that moment fails the request, and we never retry.
    keepalive_expiry=4.0,
)

ClientFactory = Callable[[bool], httpx.AsyncClient]
"""Builds the shared client for one ``verifyTLS`` setting."""


class _NoCookies(CookieJar):
    """Runs of unrelated jobs share a client, so a cookie must never carry over."""

    def set_cookie(self, cookie: Cookie) -> None:
        return

    def extract_cookies(self, response: Any, request: Any) -> None:
        return


class _Capture:
    """Keeps the first ``limit + 1`` bytes: enough for ``cap_output`` to see the overflow."""

    __slots__ = ("chunks", "limit", "room")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.limit = limit
        self.room = limit + 1

    def add(self, data: bytes) -> bool:
        """Store ``data``; True once the cap is passed and reading may stop."""
        if len(data) >= self.room:
            self.chunks.append(data[: self.room])
            self.room = 0
            return True
        self.chunks.append(data)
        self.room -= len(data)
        return False

    def text(self) -> tuple[str, bool]:
        return cap_output(self.chunks, self.limit)


class HttpRunner:
    """Runs ``http`` blocks over one pooled client per ``verifyTLS`` setting."""

    def __init__(
        self,
        client_factory: ClientFactory | None = None,
        *,
        limits: httpx.Limits = DEFAULT_LIMITS,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._factory = client_factory or self._default_client
        self._limits = limits
        self._environ = environ
        self._clients: dict[bool, httpx.AsyncClient] = {}

    def _default_client(self, verify_tls: bool) -> httpx.AsyncClient:
        # timeout=None: ``ctx.timeout`` bounds the whole attempt instead (connect, send,
        # redirects and body together), see ``run``. The default transport has retries=0.
        return httpx.AsyncClient(
            verify=verify_tls,
            timeout=None,
            limits=self._limits,
            cookies=_NoCookies(),
            headers={"User-Agent": USER_AGENT},
        )

    def _client(self, verify_tls: bool) -> httpx.AsyncClient:
        client = self._clients.get(verify_tls)
        if client is None:
            client = self._clients[verify_tls] = self._factory(verify_tls)
        return client

    async def aclose(self) -> None:
        """Close the pooled connections; the runner may be used again afterwards."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def run(self, block: object, ctx: RunContext) -> Outcome:
        if not isinstance(block, HttpExecutor):
            raise TypeError(f"HttpRunner cannot run a {type(block).__name__} block")
        try:
            given = resolve_env(block.headers, self._environ)
        except ValueSourceError as exc:
            return Outcome(OutcomeStatus.FAILED, error=f"header {exc}")
        for name, value in given.items():
            if problem := _header_problem(name, value):
                return Outcome(OutcomeStatus.FAILED, error=f"header {name}: {problem}")
        headers = httpx.Headers(given)
        # Set, not appended: the run identity wins over a header of the same name.
        headers["Idempotency-Key"] = ctx.run_id
        headers["X-OneOff-Attempt"] = str(ctx.attempt)

        capture = _Capture(ctx.output_limit)
        status: int | None = None
        deadline = asyncio.timeout(ctx.timeout)
        try:
            async with (
                deadline,
                self._client(block.verify_tls).stream(
                    block.method.value,
                    # ``params=`` would replace a query written in the URL; merge instead.
                    httpx.URL(block.url).copy_merge_params(block.query)
                    if block.query else block.url,
                    headers=headers,
                    content=block.body,
                    json=block.json_body,
                    follow_redirects=block.follow_redirects,
                ) as response,
            ):
                status = response.status_code
                capture.add(_head(response))
                async for chunk in response.aiter_bytes():
                    if capture.add(chunk):
                        # The rest is never stored; closing the stream drops the connection
                        # instead of downloading a body nobody will see.
                        break
        except TimeoutError:
            if not deadline.expired():
                raise
            return _timed_out(ctx, status, capture)
        except httpx.TimeoutException:
            return _timed_out(ctx, status, capture)
        except httpx.ConnectError as exc:
            return _failed(f"cannot connect to {block.url}: {_connect_reason(exc)}", status,
                           capture)
        except (httpx.RequestError, httpx.InvalidURL) as exc:
            return _failed(f"{block.method.value} {block.url}: {_one_line(exc)}", status, capture)

        # Past the ``with``, the request went through: ``response`` has its status.
        output, truncated = capture.text()
        code = response.status_code
        if _succeeded(code, block.success_status):
            return Outcome(OutcomeStatus.SUCCEEDED, http_status=code, output=output,
                           truncated=truncated)
        expected = ("2xx" if block.success_status is None
                    else ", ".join(map(str, block.success_status)))
        status_line = f"HTTP {code} {response.reason_phrase}".rstrip()
        return Outcome(OutcomeStatus.FAILED, http_status=code, output=output,
                       truncated=truncated,
                       error=f"{status_line} is not a success status (expected {expected})")


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


def _header_problem(name: str, value: str) -> str:
    """Why a header cannot be sent; checked here so the error never quotes the value,
    which may be a secret read through ``valueFrom``."""
    if not _TOKEN.fullmatch(name):
        return "not a valid header name"
    if not _FIELD_VALUE.fullmatch(value):
        return "the value has a line break or a character outside printable ASCII"
    return ""


def _head(response: httpx.Response) -> bytes:
    lines = [f"{response.http_version} {response.status_code} {response.reason_phrase}".rstrip()]
    lines.extend(f"{name}: {value}" for name, value in response.headers.multi_items())
    return ("\n".join(lines) + "\n\n").encode("utf-8", errors="replace")


def _succeeded(status: int, success: list[int] | None) -> bool:
    return 200 <= status < 300 if success is None else status in success


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _connect_reason(exc: httpx.ConnectError) -> str:
    """The root cause: httpx's own message is often just "All connection attempts failed"."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return _one_line(cause)
        if isinstance(cause, socket.gaierror) and cause.strerror:
            return cause.strerror
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return _one_line(exc)


def _timed_out(ctx: RunContext, status: int | None, capture: _Capture) -> Outcome:
    output, truncated = capture.text()
    after = "" if ctx.timeout is None else f" after {ctx.timeout:g}s"
    return Outcome(OutcomeStatus.TIMED_OUT, http_status=status, output=output,
                   truncated=truncated, error=f"timed out{after}")


def _failed(error: str, status: int | None, capture: _Capture) -> Outcome:
    output, truncated = capture.text()
    return Outcome(OutcomeStatus.FAILED, http_status=status, output=output,
                   truncated=truncated, error=error)
