"""The HTTP executor against a real HTTP server on loopback: what is sent, what counts as
success, timeouts, connection errors, capped output and cancellation mid-request."""

from __future__ import annotations

import asyncio
import json
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from oneoff.executors import TRUNCATION_MARK, Outcome, OutcomeStatus, RunContext
from oneoff.executors.http import HttpRunner
from oneoff.manifests import HttpExecutor

HUGE = 10 * 1024 * 1024


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, scheme: str = "http") -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.scheme = scheme
        self.slow_started = threading.Event()
        self.slow_disconnected = threading.Event()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/echo":
            echo = {
                "method": self.command,
                "path": path,
                "query": parse_qs(urlsplit(self.path).query),
                "headers": {name.lower(): value for name, value in self.headers.items()},
                "body": body.decode(),
                "client_port": self.client_address[1],
            }
            self.send(200, json.dumps(echo).encode(), {"Content-Type": "application/json"})
        elif path == "/status/500":
            self.send(500, b"database is down")
        elif path == "/redirect":
            self.send(302, b"", {"Location": "/echo"})
        elif path == "/cookie":
            self.send(200, b"have a cookie", {"Set-Cookie": "session=job-a; Path=/"})
        elif path == "/slow":
            self.slow()
        elif path == "/huge":
            self.huge()
        else:
            self.send(404, b"no such route")

    do_POST = do_PUT = do_DELETE = do_GET

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def slow(self) -> None:
        """Answer after 5 s, unless the client hangs up first (recorded)."""
        self.server.slow_started.set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.02)
            if readable:
                try:
                    closed = self.connection.recv(1, socket.MSG_PEEK) == b""
                except ConnectionError:
                    closed = True
                if closed:
                    self.server.slow_disconnected.set()
                    self.close_connection = True
                    return
        self.send(200, b"finally")

    def huge(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(HUGE))
        self.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(HUGE // len(chunk)):
                self.wfile.write(chunk)
        except ConnectionError:
            self.close_connection = True  # the client stopped reading at its cap


def serving(srv: Server) -> Iterator[Server]:
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from serving(Server())


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Server]:
    """The same routes over TLS with a self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv = Server(scheme="https")
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    yield from serving(srv)


def ctx(**overrides: Any) -> RunContext:
    values: dict[str, Any] = {
        "run_id": "run-7f3a",
        "job": "trial-expired-4711",
        "namespace": "billing",
        "scheduled_at": datetime(2030, 1, 1, tzinfo=UTC),
        "attempt": 3,
        "output_limit": 64 * 1024,
    }
    return RunContext(**{**values, **overrides})


def http(**spec: Any) -> HttpExecutor:
    return HttpExecutor.model_validate(spec)


def run(block: HttpExecutor, context: RunContext | None = None, **runner: Any) -> Outcome:
    async def main() -> Outcome:
        executor = HttpRunner(**runner)
        try:
            return await executor.run(block, context or ctx())
        finally:
            await executor.aclose()

    return asyncio.run(main())


def echoed(outcome: Outcome) -> dict[str, Any]:
    """The JSON body of an /echo response (the output is status line, headers, body)."""
    _, _, body = outcome.output.partition("\n\n")
    result: dict[str, Any] = json.loads(body)
    return result


def test_get_succeeds_with_the_run_id_as_idempotency_key(server: Server) -> None:
    outcome = run(http(url=f"{server.url}/echo"))
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.http_status == 200
    assert outcome.error == ""
    assert outcome.output.startswith("HTTP/1.1 200 OK\n")
    assert "\ncontent-type: application/json\n" in outcome.output.lower()
    headers = echoed(outcome)["headers"]
    assert headers["idempotency-key"] == "run-7f3a"
    assert headers["x-oneoff-attempt"] == "3"


def test_run_identity_wins_over_a_header_of_the_same_name(server: Server) -> None:
    outcome = run(http(url=f"{server.url}/echo", headers={"idempotency-key": "mine"}))
    assert echoed(outcome)["headers"]["idempotency-key"] == "run-7f3a"


def test_json_body_is_sent_with_its_content_type(server: Server) -> None:
    block = http(url=f"{server.url}/echo", method="POST", json={"user": 4711, "plan": "trial"})
    request = echoed(run(block))
    assert request["method"] == "POST"
    assert request["headers"]["content-type"] == "application/json"
    assert json.loads(request["body"]) == {"user": 4711, "plan": "trial"}


def test_raw_body_and_query_are_sent(server: Server) -> None:
    block = http(url=f"{server.url}/echo?from=url", method="PUT", body="a=1&b=2",
                 query={"dry": "false"}, headers={"Content-Type": "text/plain"})
    request = echoed(run(block))
    assert request["body"] == "a=1&b=2"
    assert request["headers"]["content-type"] == "text/plain"
    assert request["query"] == {"from": ["url"], "dry": ["false"]}


def test_status_500_fails_with_the_status(server: Server) -> None:
    outcome = run(http(url=f"{server.url}/status/500"))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.http_status == 500
    assert outcome.error == (
        "HTTP 500 Internal Server Error is not a success status (expected 2xx)"
    )
    assert outcome.output.endswith("\n\ndatabase is down")


def test_success_status_500_makes_500_a_success(server: Server) -> None:
    outcome = run(http(url=f"{server.url}/status/500", successStatus=[500]))
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.http_status == 500


def test_slow_response_times_out_quickly(server: Server) -> None:
    started = time.monotonic()
    outcome = run(http(url=f"{server.url}/slow"), ctx(timeout=0.5))
    assert time.monotonic() - started < 1.5
    assert outcome.status is OutcomeStatus.TIMED_OUT
    assert outcome.error == "timed out after 0.5s"


def test_connection_refused_fails_with_one_line_naming_the_url() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    outcome = run(http(url=url))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.http_status is None
    assert outcome.error == f"cannot connect to {url}: Connection refused"


def test_huge_body_is_truncated_at_the_cap_and_returns_promptly(server: Server) -> None:
    limit = 64 * 1024
    started = time.monotonic()
    outcome = run(http(url=f"{server.url}/huge"), ctx(output_limit=limit))
    assert time.monotonic() - started < 2
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.http_status == 200
    assert outcome.truncated
    mark = TRUNCATION_MARK.format(limit=limit)
    assert outcome.output.endswith("xxx" + mark)
    assert len(outcome.output.encode()) == limit + len(mark.encode())


def test_redirect_is_followed_only_when_asked(server: Server) -> None:
    not_followed = run(http(url=f"{server.url}/redirect"))
    assert not_followed.status is OutcomeStatus.FAILED
    assert not_followed.http_status == 302
    assert "\nlocation: /echo\n" in not_followed.output.lower()

    followed = run(http(url=f"{server.url}/redirect", followRedirects=True))
    assert followed.status is OutcomeStatus.SUCCEEDED
    assert followed.http_status == 200
    assert echoed(followed)["path"] == "/echo"


def test_cancel_mid_request_raises_promptly_and_closes_the_connection(server: Server) -> None:
    async def main() -> float:
        executor = HttpRunner()
        task = asyncio.create_task(executor.run(http(url=f"{server.url}/slow"), ctx()))
        assert await asyncio.to_thread(server.slow_started.wait, 5)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        elapsed = time.monotonic() - cancelled_at
        await executor.aclose()
        return elapsed

    assert asyncio.run(main()) < 1.0
    assert server.slow_disconnected.wait(1.0), "the server still sees the request open"


def test_value_from_header_is_read_from_the_server_env(server: Server) -> None:
    block = http(url=f"{server.url}/echo",
                 headers={"Authorization": {"valueFrom": {"env": "HOOK_TOKEN"}}})
    outcome = run(block, environ={"HOOK_TOKEN": "Bearer s3cret"})
    assert echoed(outcome)["headers"]["authorization"] == "Bearer s3cret"


def test_missing_value_from_source_fails_without_sending(server: Server) -> None:
    block = http(url=f"{server.url}/echo",
                 headers={"Authorization": {"valueFrom": {"env": "HOOK_TOKEN"}}})
    outcome = run(block, environ={})
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.http_status is None
    assert outcome.error.startswith("header Authorization: valueFrom.env HOOK_TOKEN is not set")


def test_runs_reuse_the_connection_but_never_share_cookies(server: Server) -> None:
    async def main() -> list[Outcome]:
        executor = HttpRunner()
        try:
            return [await executor.run(http(url=f"{server.url}/{path}"), ctx())
                    for path in ("cookie", "echo", "echo")]
        finally:
            await executor.aclose()

    _, first, second = asyncio.run(main())
    assert "cookie" not in echoed(first)["headers"]
    assert echoed(first)["client_port"] == echoed(second)["client_port"]


def test_untrusted_certificate_fails_unless_verify_tls_is_off(tls_server: Server) -> None:
    async def main() -> tuple[Outcome, Outcome]:
        executor = HttpRunner()
        try:
            verified = await executor.run(http(url=f"{tls_server.url}/echo"), ctx())
            unverified = await executor.run(
                http(url=f"{tls_server.url}/echo", verifyTLS=False), ctx())
            return verified, unverified
        finally:
            await executor.aclose()

    verified, unverified = asyncio.run(main())
    assert verified.status is OutcomeStatus.FAILED
    assert verified.error.startswith(f"cannot connect to {tls_server.url}/echo: [SSL: ")
    assert "certificate verify failed" in verified.error
    assert unverified.status is OutcomeStatus.SUCCEEDED
    assert echoed(unverified)["path"] == "/echo"


@pytest.mark.parametrize("value", ["Bearer s3cret\nX-Evil: 1", "Bearer s3cret\n", "Bearer sécret"])
def test_a_header_value_that_cannot_be_sent_fails_without_quoting_it(
    server: Server, value: str
) -> None:
    block = http(url=f"{server.url}/echo",
                 headers={"Authorization": {"valueFrom": {"env": "HOOK_TOKEN"}}})
    outcome = run(block, environ={"HOOK_TOKEN": value})
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error == (
        "header Authorization: the value has a line break or a character outside printable ASCII"
    )


def test_proxy_from_the_server_env_is_used_unless_no_proxy_says_otherwise(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url)  # the loopback server answers as the proxy
    monkeypatch.setenv("NO_PROXY", "bypassed.invalid")

    proxied = run(http(url="http://hooks.invalid/echo"))
    assert proxied.status is OutcomeStatus.SUCCEEDED
    assert echoed(proxied)["headers"]["host"] == "hooks.invalid"

    bypassed = run(http(url="http://bypassed.invalid/echo"))
    assert bypassed.status is OutcomeStatus.FAILED
    assert bypassed.error.startswith("cannot connect to http://bypassed.invalid/echo: ")
