"""The HTTP executor: one attempt of a job's ``http`` block is one request.

Called by the worker (``WorkerPool._attempt``) with an :class:`~oneoff.manifests.HttpExecutor`
block and a :class:`~oneoff.executors.RunContext`; hands back an
:class:`~oneoff.executors.Outcome` whose output is the response's status line, headers and
body, capped at ``ctx.output_limit`` while streaming. The daemon owns one
:class:`HttpRunner` for the life of the server and closes it with :meth:`HttpRunner.aclose`.

Built on aiohttp: its connection pool keeps up with thousands of runs per second on a
small host, where httpx's pool (it scans every connection on each request) did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.request import getproxies, proxy_bypass

import aiohttp
from yarl import URL

from oneoff.executors import (
    CappedOutput,
    Outcome,
    OutcomeStatus,
    RunContext,
    ValueSourceError,
    resolve_env,
)
from oneoff.manifests import HttpExecutor

USER_AGENT = "oneoff"


@dataclass(frozen=True, slots=True)
class Limits:
    """The connection pool of one shared session."""

    max_connections: int = 200
    keepalive_expiry: float = 4.0
    """Below the 5 s idle timeout of common servers (Node.js, many proxies): reusing a
    connection the server is closing at that moment fails the request, and we never retry."""


DEFAULT_LIMITS = Limits()

SessionFactory = Callable[[bool], aiohttp.ClientSession]
"""Builds the shared session for one ``verifyTLS`` setting; called inside the running loop."""

# Requests never send a Content-Type the job did not ask for: aiohttp would otherwise add
# ``application/octet-stream`` to a raw body or to a POST without one.
_NO_AUTO_HEADERS = ("Content-Type",)
_NO_DEADLINE = contextlib.nullcontext()
# Run identity headers; set, not appended: they win over a header of the same name.
_IDENTITY = frozenset({"idempotency-key", "x-oneoff-attempt"})
# Redirects followed before giving up (httpx's default, which this executor used before).
MAX_REDIRECTS = 20
# aiohttp's default (8190 bytes) refuses a long Content-Security-Policy or Set-Cookie line.
MAX_HEADER_LINE = 16 * 1024


class HttpRunner:
    """Runs ``http`` blocks over one pooled session per ``verifyTLS`` setting."""

    def __init__(
        self,
        session_factory: SessionFactory | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._factory = session_factory or self._default_session
        self._limits = limits
        self._environ = environ
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        # HTTP(S)_PROXY / NO_PROXY from the server's environment, read once as httpx did.
        # Not aiohttp's ``trust_env``: it reads ~/.netrc into requests and does two thread
        # hops per request. A given factory configures its own session instead.
        self._proxies = {} if session_factory else _env_proxies()

    def _default_session(self, verify_tls: bool) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._limits.max_connections,
                keepalive_timeout=self._limits.keepalive_expiry,
                ssl=verify_tls,  # False: TLS without certificate checks
            ),
            # No aiohttp timeouts: ``ctx.timeout`` bounds the whole attempt instead
            # (connect, send, redirects and body together), see ``run``.
            timeout=aiohttp.ClientTimeout(),
            # Runs of unrelated jobs share a session, so a cookie must never carry over.
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT},
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
        )

    def _session(self, verify_tls: bool) -> aiohttp.ClientSession:
        session = self._sessions.get(verify_tls)
        if session is None:
            session = self._sessions[verify_tls] = self._factory(verify_tls)
        return session

    async def aclose(self) -> None:
        """Close the pooled connections; the runner may be used again afterwards."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

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
        headers = {name: value for name, value in given.items()
                   if name.lower() not in _IDENTITY}
        headers["Idempotency-Key"] = ctx.run_id
        headers["X-OneOff-Attempt"] = str(ctx.attempt)

        capture = CappedOutput(ctx.output_limit)
        status: int | None = None
        deadline = None if ctx.timeout is None else asyncio.timeout(ctx.timeout)
        try:
            data = _body(block, headers)
            url = _url(block.url)
            if block.query:
                # ``params=`` would append to a query written in the URL; merge instead (a
                # key given in ``query`` replaces the URL's).
                url = url.update_query(block.query)
            async with (
                deadline or _NO_DEADLINE,
                self._session(block.verify_tls).request(
                    block.method.value,
                    url,
                    headers=headers,
                    data=data,
                    skip_auto_headers=_NO_AUTO_HEADERS,
                    allow_redirects=block.follow_redirects,
                    max_redirects=MAX_REDIRECTS,
                    proxy=self._proxy_for(url),
                ) as response,
            ):
                status = response.status
                capture.add(_head(response))
                try:
                    async for chunk in response.content.iter_any():
                        capture.add(chunk)
                        if capture.full:
                            break
                finally:
                    # A no-op once the body was read to its end (the connection is back in
                    # the pool). Otherwise (cap reached, timeout, cancellation) it drops the
                    # connection instead of downloading a body nobody will see.
                    response.close()
        except TimeoutError as exc:
            # aiohttp's own timeouts only fire when a given factory configured them.
            if not ((deadline is not None and deadline.expired())
                    or isinstance(exc, aiohttp.ClientError)):
                raise
            return _timed_out(ctx, status, capture)
        except aiohttp.ClientConnectorError as exc:
            return _failed(f"cannot connect to {block.url}: {_connect_reason(exc)}", status,
                           capture)
        except (aiohttp.ClientError, ValueError) as exc:
            # ValueError: aiohttp's word for a request it cannot build from the job's input
            # (a bad port, credentials in the URL next to an Authorization header, ...).
            return _failed(f"{block.method.value} {block.url}: {_one_line(exc)}", status, capture)

        # Past the ``with``, the request went through: ``response`` has its status.
        output, truncated = capture.text()
        code = response.status
        if _succeeded(code, block.success_status):
            return Outcome(OutcomeStatus.SUCCEEDED, http_status=code, output=output,
                           truncated=truncated)
        expected = ("2xx" if block.success_status is None
                    else ", ".join(map(str, block.success_status)))
        status_line = f"HTTP {code} {response.reason or ''}".rstrip()
        return Outcome(OutcomeStatus.FAILED, http_status=code, output=output,
                       truncated=truncated,
                       error=f"{status_line} is not a success status (expected {expected})")

    def _proxy_for(self, url: URL) -> str | None:
        if not self._proxies:
            return None
        proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
        if proxy is None or proxy_bypass(url.host or ""):  # NO_PROXY
            return None
        return proxy


@functools.lru_cache(maxsize=4096)
def _url(text: str) -> URL:
    """The parsed URL of a job (parsing is a good part of a request's setup; URLs repeat)."""
    return URL(text)


def _body(block: HttpExecutor, headers: dict[str, str]) -> bytes | None:
    """The request body; a ``json`` body also gets its Content-Type unless one was given."""
    if block.body is not None:
        return block.body.encode()
    if block.json_body is None:
        return None
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = "application/json"
    # The same bytes httpx sent: compact UTF-8. NaN (YAML ``.nan``) is a ValueError: FAILED.
    return json.dumps(block.json_body, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()


def _env_proxies() -> dict[str, str]:
    """Proxy URLs by scheme (and ``all``); empty when none is set."""
    return {scheme: url for scheme, url in getproxies().items() if scheme != "no"}


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


def _head(response: aiohttp.ClientResponse) -> bytes:
    """Status line and headers as received; names lowercased, as the output always showed."""
    version = response.version or aiohttp.HttpVersion11  # None only before the headers
    line = (f"HTTP/{version.major}.{version.minor} {response.status} "
            f"{response.reason or ''}").rstrip()
    lines = [line.encode("utf-8", errors="replace")]
    lines.extend(name.lower() + b": " + value for name, value in response.raw_headers)
    return b"\n".join(lines) + b"\n\n"


def _succeeded(status: int, success: list[int] | None) -> bool:
    return 200 <= status < 300 if success is None else status in success


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    """The root cause, without aiohttp's "Cannot connect to host ..." wrapping."""
    root: BaseException = (exc.certificate_error
                           if isinstance(exc, aiohttp.ClientConnectorCertificateError)
                           else exc.os_error)
    cause: BaseException | None = root
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return _one_line(cause)
        if isinstance(cause, socket.gaierror) and cause.strerror:
            return cause.strerror
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return _one_line(root)


def _timed_out(ctx: RunContext, status: int | None, capture: CappedOutput) -> Outcome:
    output, truncated = capture.text()
    after = "" if ctx.timeout is None else f" after {ctx.timeout:g}s"
    return Outcome(OutcomeStatus.TIMED_OUT, http_status=status, output=output,
                   truncated=truncated, error=f"timed out{after}")


def _failed(error: str, status: int | None, capture: CappedOutput) -> Outcome:
    output, truncated = capture.text()
    return Outcome(OutcomeStatus.FAILED, http_status=status, output=output,
                   truncated=truncated, error=error)
