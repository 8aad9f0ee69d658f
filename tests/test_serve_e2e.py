"""A new user's first minutes, against a real ``oneoff serve`` process and the real CLI."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

from conftest import Server, job_yaml, wait_until


def jobs(server: Server) -> dict[str, dict[str, object]]:
    result = server.oneoff("get", "jobs", "-o", "json")
    assert result.returncode == 0, result.stderr
    return {item["metadata"]["name"]: item for item in json.loads(result.stdout)["items"]}


def test_new_user_walkthrough(tmp_path: Path, serve: Callable[..., Server]) -> None:
    server = serve()  # defaults: ./oneoff.db and ./jobs.d, created on first start
    root = tmp_path / "jobs.d"
    assert root.is_dir() and (tmp_path / "oneoff.db").exists()

    # drop a manifest: get jobs shows it with its source file
    (root / "ping.yaml").write_text(job_yaml("ping"))
    (root / "other.yaml").write_text(job_yaml("other"))
    wait_until(lambda: "ping" in jobs(server))
    table = server.oneoff("get", "jobs").stdout
    assert "jobs.d/ping.yaml:1" in table

    # edit it: generation bumps
    (root / "ping.yaml").write_text(job_yaml("ping", url="https://example.com/v2"))
    wait_until(lambda: jobs(server)["ping"]["metadata"]["generation"] == 2)  # type: ignore[index]

    # break it: a precise error, the old version stays
    (root / "ping.yaml").write_text(job_yaml("ping", url="https://example.com/v3")
                                    .replace("schedule:", "schedul:"))
    wait_until(lambda: "ping.yaml:6:3: spec.schedul: unknown field" in
               server.oneoff("get", "sources").stdout)
    assert jobs(server)["ping"]["spec"]["http"]["url"] == "https://example.com/v2"  # type: ignore[index]
    assert server.logged(lambda line: "spec.schedul" in line.get("message", "")
                         and line.get("action") == "reconcile")

    # empty the directory: the mass prune is refused, nothing is deleted
    for path in root.iterdir():
        path.unlink()
    wait_until(lambda: "refused to prune" in server.oneoff("get", "sources").stdout)
    assert set(jobs(server)) == {"ping", "other"}

    assert server.terminate() == 0
    assert server.logged(lambda line: line.get("action") == "stop")


def test_a_second_server_on_the_same_state_is_refused(serve: Callable[..., Server]) -> None:
    serve()
    second = serve(wait_ready=False)
    assert second.process.wait(20) == 3
    assert second.logged(lambda line: "already using" in line.get("message", ""))


def test_sigint_stops_the_server_cleanly(serve: Callable[..., Server]) -> None:
    server = serve()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(15) == 0


def test_restart_keeps_uid_and_generation(tmp_path: Path, serve: Callable[..., Server]) -> None:
    (tmp_path / "jobs.d").mkdir()
    (tmp_path / "jobs.d" / "ping.yaml").write_text(job_yaml("ping"))
    first = serve()
    before = jobs(first)["ping"]["metadata"]
    assert first.terminate() == 0

    second = serve()
    after = jobs(second)["ping"]["metadata"]
    assert after == before
