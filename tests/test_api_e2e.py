"""The API of a real ``oneoff serve`` process: one-request job creation, live output,
cancel of a running process, the event stream, and the rules for binding an address."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, start_server, wait_until

from oneoff.executors.processes import processes_of_runs

pytestmark = pytest.mark.slow


def shell_job(name: str, script: str, schedule: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"shell": {"script": script}}
    if schedule is not None:
        spec["schedule"] = schedule
    return {"metadata": {"name": name}, "spec": spec}


def run_of(client: httpx.Client, job: str) -> dict[str, Any]:
    items = client.get("/api/v1/executions", params={"job": job}).json()["items"]
    assert items, f"no run of {job}"
    run: dict[str, Any] = items[0]
    return run


def phase(client: httpx.Client, run_id: str) -> str:
    return str(client.get(f"/api/v1/executions/{run_id}").json()["status"]["phase"])


@pytest.fixture
def client(serve: Callable[..., Server]) -> Iterator[httpx.Client]:
    server = serve()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def test_an_application_creates_a_one_off_job_with_one_request(client: httpx.Client) -> None:
    created = client.post("/api/v1/namespaces/default/jobs",
                          json=shell_job("welcome", "echo hello $ONEOFF_JOB", {"at": "now"}))
    assert created.status_code == 201, created.text
    run = wait_until(lambda: (r := run_of(client, "welcome"))["status"]["phase"] == "succeeded"
                     and r)
    output = client.get(f"/api/v1/executions/{run['metadata']['name']}/output")
    assert output.text == "hello welcome\n"


def test_following_output_shows_it_while_the_run_is_active(client: httpx.Client) -> None:
    client.post("/api/v1/namespaces/default/jobs",
                json=shell_job("slow-echo", "echo first; sleep 1.5; echo second"))
    run_id = client.post("/api/v1/namespaces/default/jobs/slow-echo/run").json()["metadata"][
        "name"]
    wait_until(lambda: phase(client, run_id) == "running")
    with client.stream("GET", f"/api/v1/executions/{run_id}/output",
                       params={"follow": "true"}) as response:
        pieces = [(piece, phase(client, run_id)) for piece in response.iter_text()]
    assert "".join(piece for piece, _ in pieces) == "first\nsecond\n"
    assert pieces[0] == ("first\n", "running")  # seen before the run ended


def test_cancelling_a_running_job_stops_its_processes(client: httpx.Client) -> None:
    client.post("/api/v1/namespaces/default/jobs",
                json=shell_job("sleeper", "sleep 60 & sleep 60; wait"))
    run_id = client.post("/api/v1/namespaces/default/jobs/sleeper/run").json()["metadata"][
        "name"]
    wait_until(lambda: processes_of_runs([run_id]))
    response = client.post(f"/api/v1/executions/{run_id}/cancel")
    assert response.status_code == 200, response.text
    wait_until(lambda: phase(client, run_id) == "cancelled")
    assert processes_of_runs([run_id]) == {}
    again = client.post(f"/api/v1/executions/{run_id}/cancel")
    assert again.status_code == 409


def test_event_stream_reports_the_run(client: httpx.Client) -> None:
    client.post("/api/v1/namespaces/default/jobs", json=shell_job("evented", "true"))
    seen: list[dict[str, Any]] = []
    with client.stream("GET", "/api/v1/events", params={"after": 0, "job": "evented"},
                       timeout=15) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        run_id = ""
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line[5:]))
                if seen[-1]["type"] == "object.created":
                    run_id = client.post("/api/v1/namespaces/default/jobs/evented/run").json()[
                        "metadata"]["name"]
                if seen[-1]["type"] == "execution.succeeded":
                    break
    types = [event["type"] for event in seen]
    assert types[0] == "object.created"
    assert types[-3:] == ["execution.queued", "execution.running", "execution.succeeded"]
    assert seen[-1]["uid"] == run_id
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)


def test_a_non_loopback_address_needs_keys_or_insecure(tmp_path: Path) -> None:
    refused = start_server(tmp_path, "--listen", "0.0.0.0:0")
    assert refused.process.wait(20) == 2
    refused.terminate()  # closes its pipe
    assert any("refusing to serve the API on 0.0.0.0:0 without API keys" in line.get("message", "")
               for line in refused.lines)
    allowed = start_server(tmp_path, "--listen", "0.0.0.0:0", "--insecure")
    try:
        wait_until(lambda: allowed.logged(lambda line: line.get("action") == "ready"),
                   timeout=20)
        port = int(allowed.url.rsplit(":", 1)[1])
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
    finally:
        allowed.terminate()


def test_an_address_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(tmp_path, "--listen", f"127.0.0.1:{port}")
        assert server.process.wait(20) == 2
        server.terminate()
    message = " ".join(line.get("message", "") for line in server.lines)
    assert f"cannot listen on 127.0.0.1:{port}" in message and "--listen" in message


def test_ready_and_health(client: httpx.Client) -> None:
    started = time.monotonic()
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"store": True, "reconciled": True, "scheduler": True}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert time.monotonic() - started < 10
