"""A real Prometheus scrapes a real ``oneoff serve``: the README's scrape config, job
success and failure counts queried through Prometheus's own API; the shipped alert rules
pass ``promtool check rules`` and their unit tests (``promtool test rules``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, wait_until

EXAMPLES = Path(__file__).parent.parent / "examples" / "prometheus"

SHELL_JOB = """apiVersion: oneoff.dev/v1
kind: Job
metadata: {{name: {name}}}
spec:
  schedule: {{at: now}}
  shell: {{command: [{command}]}}
"""


def tool(name: str) -> str:
    """A Prometheus binary; CI must have it (scripts/test installs Debian's package)."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is missing (Debian package prometheus; scripts/test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start Prometheus scraping the given OneOff address; returns its own base URL."""
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        binary = tool("prometheus")
        port = free_port()
        config = tmp_path / "prometheus.yml"
        # the README's scrape config, with a short interval so the test does not wait
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{EXAMPLES / 'oneoff-alerts.rules'}']\n"
            "scrape_configs:\n"
            "  - job_name: oneoff\n"
            "    metrics_path: /metrics\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        with (tmp_path / "prometheus.log").open("wb") as log:
            started.append(subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log))
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.terminate()
        process.wait(20)


def query(base: str, promql: str) -> list[dict[str, Any]]:
    try:
        response = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.TransportError:
        return []  # not listening yet
    if response.status_code == 503:
        return []  # starting
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scalar(base: str, promql: str) -> float | None:
    result = query(base, promql)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_prometheus_sees_job_successes_and_failures(
        tmp_path: Path, serve: Callable[..., Server],
        prometheus: Callable[[str], str]) -> None:
    root = tmp_path / "jobs.d"
    root.mkdir()
    (root / "works.yaml").write_text(SHELL_JOB.format(name="works", command="/bin/true"))
    (root / "breaks.yaml").write_text(SHELL_JOB.format(name="breaks", command="/bin/false"))
    server = serve()
    base = prometheus(server.url.removeprefix("http://"))
    started = time.monotonic()
    wait_until(lambda: scalar(base, 'up{job="oneoff"}') == 1, timeout=60, every=0.25)
    first_sample = time.monotonic() - started
    succeeded = 'sum(oneoff_executions_total{status="succeeded"})'
    failed = 'sum(oneoff_executions_total{status="failed"})'
    wait_until(lambda: scalar(base, succeeded) == 1 and scalar(base, failed) == 1,
               timeout=60, every=0.25)
    (series,) = query(base, 'oneoff_executions_total{status="failed"}')
    assert series["metric"]["namespace"] == "default" and series["metric"]["type"] == "shell"
    assert series["metric"]["job"] == "oneoff"  # Prometheus's own label, never ours
    assert scalar(base, "oneoff_build_info") == 1
    assert scalar(base, 'oneoff_workers{state="idle"}') == 8
    # the shipped rules are loaded and evaluated against the real series
    wait_until(lambda: httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"],
               timeout=30, every=0.25)
    rules = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert all(rule["health"] != "err" for group in rules for rule in group["rules"]), rules
    # every query of the shipped Grafana dashboard is valid PromQL to a real Prometheus
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            query(base, target["expr"].replace("$namespace", ".*"))
    print(f"first sample after {first_sample:.1f}s")  # noqa: T201 (shown with -s)


@pytest.mark.slow
def test_serve_exports_health_blocked_prunes_and_structured_logs(
        tmp_path: Path, serve: Callable[..., Server]) -> None:
    root = tmp_path / "jobs.d"
    root.mkdir()
    for name in ("one", "two"):
        (root / f"{name}.yaml").write_text(SHELL_JOB.format(name=name, command="/bin/true"))
    server = serve()
    ready = httpx.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"store": True, "reconciled": True, "scheduler": True}
    assert httpx.get(f"{server.url}/healthz", timeout=5).json() == {"status": "ok"}
    for path in root.iterdir():
        path.unlink()  # a mass prune: refused

    def blocked() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        lines = [line for line in text.splitlines()
                 if line.startswith("oneoff_prune_blocked_total{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    wait_until(lambda: blocked() >= 1, timeout=30, every=0.2)
    assert server.terminate() == 0
    # every line is JSON with an action; run outcomes name the job, namespace and run
    assert server.lines and all("action" in line for line in server.lines), [
        line for line in server.lines if "action" not in line]
    outcomes = [line for line in server.lines if line.get("action") == "run"
                and line.get("status") == "succeeded"]
    assert len(outcomes) == 2
    assert all(line["job"] in ("one", "two") and line["namespace"] == "default"
               and line["run_id"] for line in outcomes)


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules",
                             str(EXAMPLES / "oneoff-alerts.rules")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    result = subprocess.run([tool("promtool"), "test", "rules", "oneoff-alerts.rules.test"],
                            cwd=EXAMPLES, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_queries_only_metrics_oneoff_exports() -> None:
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    exported = {"oneoff_executions_total", "oneoff_execution_duration_seconds_bucket",
                "oneoff_dispatch_lateness_seconds_bucket", "oneoff_queue_depth",
                "oneoff_workers", "oneoff_jobs", "oneoff_runs_missed_total",
                "oneoff_runs_lost_total", "oneoff_reconcile_duration_seconds_bucket",
                "oneoff_reconcile_errors_total", "oneoff_prune_blocked_total",
                "oneoff_webhook_deliveries_total", "oneoff_api_requests_total",
                "oneoff_purged_total", "oneoff_state_file_bytes", "oneoff_build_info",
                "oneoff_execution_retries_total"}
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\boneoff_[a-z_]+", expr)}
    assert used and used <= exported, used - exported
