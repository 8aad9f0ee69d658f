"""Runs end to end: a real ``oneoff serve``, a real HTTP sink on loopback, real shells."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import Server, wait_until

from oneoff.executors.processes import processes_of_runs


class Sink:
    """A loopback HTTP server that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                sink.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "body": body})
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"received")

            do_GET = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    yield server
    server.close()


def manifest(name: str, schedule: str, block: str, extra: str = "") -> str:
    return (f"apiVersion: oneoff.dev/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
            f"spec:\n  schedule: {schedule}\n{extra}{block}")


def executions(server: Server) -> dict[str, list[dict[str, Any]]]:
    result = server.oneoff("get", "executions", "-A", "-o", "json", "--limit", "500")
    assert result.returncode == 0, result.stderr
    runs: dict[str, list[dict[str, Any]]] = {}
    for item in json.loads(result.stdout)["items"]:
        runs.setdefault(item["spec"]["job"], []).append(item)
    return runs


def phase(server: Server, job: str) -> str | None:
    runs = executions(server).get(job)
    return runs[0]["status"]["phase"] if runs else None


def test_http_now_and_shell_soon_both_run_with_logs(
    tmp_path: Path, serve: Callable[..., Server], sink: Sink
) -> None:
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    soon = (datetime.now(UTC) + timedelta(seconds=4)).isoformat(timespec="seconds")
    (jobs / "hook.yaml").write_text(manifest(
        "hook", "{at: now}", f"  http:\n    url: {sink.url}/hook\n    method: POST\n"
        "    json: {hello: world}\n"))
    (jobs / "greet.yaml").write_text(manifest(
        "greet", f"{{at: '{soon}'}}",
        "  shell:\n    script: 'echo \"hello from $ONEOFF_JOB attempt $ONEOFF_ATTEMPT\"; "
        "echo oops >&2'\n"))
    server = serve()

    wait_until(lambda: phase(server, "hook") == "succeeded", timeout=15)
    wait_until(lambda: phase(server, "greet") == "succeeded", timeout=15)
    greet = executions(server)["greet"][0]
    assert greet["status"]["startedAt"] >= greet["spec"]["scheduledAt"]  # not early

    [request] = sink.requests
    run_id = executions(server)["hook"][0]["metadata"]["name"]
    assert request["headers"]["Idempotency-Key"] == run_id
    assert json.loads(request["body"]) == {"hello": "world"}
    logs = server.oneoff("logs", "greet")
    assert logs.stdout == "hello from greet attempt 1\noops\n"
    described = server.oneoff("describe", "job", "hook").stdout
    assert f"Last run:     {run_id} succeeded" in described
    status = json.loads(server.oneoff("get", "job", "hook", "-o", "json").stdout)["status"]
    assert status["lastRun"]["id"] == run_id and status["lastRun"]["status"] == "succeeded"
    assert status["firstSeenAt"] and "nextRunAt" not in status  # a one-time job: done


def test_failing_shell_job_is_retried_then_recorded_failed(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    (jobs / "flaky.yaml").write_text(manifest(
        "flaky", "{at: now}", "  shell: {script: 'echo try $ONEOFF_ATTEMPT; exit 3'}\n",
        "  retry: {limit: 2, backoffSeconds: 0.2, jitter: false}\n"))
    server = serve()
    wait_until(lambda: phase(server, "flaky") == "failed", timeout=20)
    run = executions(server)["flaky"][0]
    assert run["status"]["attempt"] == 3 and run["status"]["exitCode"] == 3
    detail = json.loads(server.oneoff("get", "executions", run["metadata"]["name"],
                                      "-o", "json").stdout)
    assert [a["status"] for a in detail["status"]["attempts"]] == ["failed"] * 3
    assert server.oneoff("logs", "flaky").stdout == "try 3\n"


def test_timed_out_job_leaves_no_process(
    tmp_path: Path, serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONEOFF_KILL_GRACE_SECONDS", "0.5")
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    pids = tmp_path / "pids"
    (jobs / "stuck.yaml").write_text(manifest(
        "stuck", "{at: now}",
        f"  shell:\n    script: \"trap '' TERM; sleep 300 & echo $! > {pids}; "
        "echo $$ >> {pids}; wait\"\n".replace("{pids}", str(pids)),
        "  timeoutSeconds: 1\n"))
    server = serve("--log-format", "json")
    wait_until(lambda: phase(server, "stuck") == "timed_out", timeout=30)
    for pid in (int(line) for line in pids.read_text().split()):
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"process {pid} survived"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_kill_9_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, serve: Callable[..., Server], sink: Sink
) -> None:
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    marks = tmp_path / "marks"
    (jobs / "slow.yaml").write_text(manifest(
        "slow", "{at: now}", f"  shell: {{script: 'echo run >> {marks}.slow; sleep 30'}}\n"))
    (jobs / "safe.yaml").write_text(manifest(
        "safe", "{at: now}",
        f"  shell: {{script: 'echo $ONEOFF_ATTEMPT >> {marks}.safe; sleep 2'}}\n",
        "  idempotent: true\n"))
    due = (datetime.now(UTC) + timedelta(seconds=6)).isoformat(timespec="seconds")
    (jobs / "hooks.yaml").write_text("---\n".join(
        manifest(f"hook-{i}", f"{{at: '{due}'}}", f"  http: {{url: '{sink.url}/{i}'}}\n")
        for i in range(50)))
    server = serve()
    # Both started (their claim is committed before the process starts); checked on the
    # marks, not through the CLI, which may take longer than "safe" runs on a loaded host.
    wait_until(lambda: Path(f"{marks}.slow").exists() and Path(f"{marks}.safe").exists(),
               timeout=15)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    lost_run = executions(server)["slow"][0]["metadata"]["name"]
    assert processes_of_runs([lost_run])  # the killed server could not stop its job

    restarted = serve()
    wait_until(lambda: phase(restarted, "safe") == "succeeded", timeout=20)
    wait_until(lambda: [runs[0]["status"]["phase"] for name, runs in
                        executions(restarted).items() if name.startswith("hook-")]
               == ["succeeded"] * 50, timeout=30)

    assert phase(restarted, "slow") == "lost"
    assert processes_of_runs([lost_run]) == {}  # the restart killed what was left
    assert Path(f"{marks}.slow").read_text() == "run\n"  # not run again
    assert Path(f"{marks}.safe").read_text() == "1\n2\n"  # idempotent: retried once
    paths = sorted(request["path"] for request in sink.requests)
    assert paths == sorted(f"/{i}" for i in range(50))  # each exactly once


def test_shutdown_lets_short_jobs_finish_and_cancels_long_ones(
    tmp_path: Path, serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONEOFF_SHUTDOWN_GRACE_SECONDS", "2")
    monkeypatch.setenv("ONEOFF_KILL_GRACE_SECONDS", "0.5")
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    (jobs / "short.yaml").write_text(manifest(
        "short", "{at: now}", "  shell: {script: 'sleep 1; echo done'}\n"))
    (jobs / "long.yaml").write_text(manifest(
        "long", "{at: now}", "  shell: {script: 'echo started; sleep 60'}\n"))
    server = serve()
    wait_until(lambda: phase(server, "short") == "running" and phase(server, "long") == "running",
               timeout=15)
    long_run = executions(server)["long"][0]["metadata"]["name"]

    assert server.terminate() == 0

    assert phase(server, "short") == "succeeded"
    assert phase(server, "long") == "cancelled"
    assert "shut down" in executions(server)["long"][0]["status"]["error"]
    assert server.oneoff("logs", "long").stdout == "started\n"
    assert processes_of_runs([long_run]) == {}
