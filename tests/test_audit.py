"""The audit log: every mutating API action recorded with who, what, when and from where;
``GET /api/v1/audit`` (admin only) with filters and paging; ``oneoff get audit`` from the
state file and, end to end, finding who cancelled a run on a real ``oneoff serve``."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ONEOFF, Server, job_yaml, wait_until
from fastapi.testclient import TestClient

from oneoff.api import create_app
from oneoff.auth import KeyRing, generate_token
from oneoff.daemon import sync_changed_jobs
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.scheduler import Scheduler
from oneoff.store import Store

SLEEPER = """apiVersion: oneoff.dev/v1
kind: Job
metadata: {name: sleeper}
spec:
  schedule: {at: '2030-01-01T00:00:00Z'}
  shell: {command: [sleep, '30']}
"""


def key_yaml(name: str, *scopes: str) -> tuple[str, str]:
    """An ApiKey manifest and its token."""
    token, sha = generate_token()
    return (f"apiVersion: oneoff.dev/v1\nkind: ApiKey\nmetadata: {{name: {name}}}\n"
            f"spec:\n  scopes: {json.dumps(list(scopes))}\n  tokenSha256: {sha}\n"), token


@dataclass
class Api:
    client: TestClient
    store: Store
    state: Path
    tokens: dict[str, dict[str, str]]

    def audit(self, who: str = "root", **params: Any) -> dict[str, Any]:
        response = self.client.get("/api/v1/audit", params=params, headers=self.tokens[who])
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    root = tmp_path / "jobs.d"
    root.mkdir()
    tokens = {}
    for name, scopes in (("root", ["admin"]), ("alice", ["run", "cancel"]),
                         ("deployer", ["write"]), ("viewer", ["read"])):
        text, token = key_yaml(name, *scopes)
        (root / f"key-{name}.yaml").write_text(text)
        tokens[name] = {"Authorization": f"Bearer {token}"}
    (root / "ping.yaml").write_text(job_yaml("ping"))
    state = tmp_path / "state.db"
    store = Store(str(state))
    scheduler = Scheduler(store, lambda item: None, lambda: 0, lambda uid: [],
                          lambda run_id: False)
    reconciler = Reconciler(store, [DirectorySource(str(root))],
                            on_applied=lambda report: sync_changed_jobs(store, scheduler, report))
    reconciler.reconcile(reconciler.sources[0])
    app = create_app(store, reconciler=reconciler, scheduler=scheduler, keys=KeyRing(store))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, store, state, tokens)
    store.close()


def test_every_mutating_action_is_recorded_with_key_target_and_address(api: Api) -> None:
    c, t = api.client, api.tokens
    created = c.post("/api/v1/namespaces/default/jobs", headers=t["deployer"], json={
        "metadata": {"name": "adhoc"},
        "spec": {"schedule": {"at": "2030-01-01T00:00:00Z"}, "http": {"url": "https://e.com/"}}})
    assert created.status_code == 201, created.text
    run = c.post("/api/v1/namespaces/default/jobs/ping/run", headers=t["alice"]).json()
    run_id = run["metadata"]["name"]
    assert c.post(f"/api/v1/executions/{run_id}/cancel", headers=t["alice"]).status_code == 200
    assert c.post("/api/v1/namespaces/default/jobs/ping/cancel",
                  headers=t["alice"]).status_code == 200
    applied = c.post("/api/v1/apply?fieldManager=ci", headers={
        **t["deployer"], "Content-Type": "application/yaml"}, content=job_yaml("from-ci"))
    assert applied.status_code == 200, applied.text
    dry = c.post("/api/v1/apply?dryRun=true", headers={
        **t["deployer"], "Content-Type": "application/yaml"}, content=job_yaml("dry"))
    assert dry.status_code == 200
    key = c.post("/api/v1/namespaces/default/apikeys", headers=t["root"],
                 json={"metadata": {"name": "dashboard"}, "spec": {"scopes": ["read"]}})
    assert key.status_code == 201
    assert c.delete("/api/v1/namespaces/default/apikeys/dashboard",
                    headers=t["root"]).status_code == 200
    assert c.delete("/api/v1/namespaces/default/jobs/adhoc",
                    headers=t["deployer"]).status_code == 200

    entries = list(reversed(api.audit()["items"]))
    assert [(e["key"], e["action"], e["target"]) for e in entries] == [
        ("deployer", "create", "Job default/adhoc"),
        ("alice", "run", "Job default/ping"),
        ("alice", "cancel", f"run {run_id}"),
        ("alice", "cancel", "Job default/ping"),
        ("deployer", "apply", "api:ci"),  # the dry run is not an action
        ("root", "create", "ApiKey default/dashboard"),
        ("root", "delete", "ApiKey default/dashboard"),
        ("deployer", "delete", "Job default/adhoc"),
    ]
    assert entries[1]["detail"] == {"run": run_id}
    assert entries[4]["detail"]["counts"]["create"] == 1
    assert all(e["remote"] == "testclient" and e["at"].endswith("Z") for e in entries)
    assert all("token" not in json.dumps(e) for e in entries)  # never the generated token


def test_reading_the_audit_log_needs_the_admin_scope(api: Api) -> None:
    for who in ("viewer", "alice", "deployer"):
        response = api.client.get("/api/v1/audit", headers=api.tokens[who])
        assert response.status_code == 403, response.text
        assert "admin" in response.json()["detail"]
    assert api.client.get("/api/v1/audit").status_code == 401


def test_audit_log_filters_and_pages_like_the_other_lists(api: Api) -> None:
    c, t = api.client, api.tokens
    run_ids = [c.post("/api/v1/namespaces/default/jobs/ping/run",
                      headers=t["alice"]).json()["metadata"]["name"] for _ in range(1)]
    for run_id in run_ids:
        c.post(f"/api/v1/executions/{run_id}/cancel", headers=t["root"])
    for _ in range(4):
        c.post("/api/v1/apply", headers={**t["deployer"], "Content-Type": "application/yaml"},
               content=job_yaml("again"))
    everything = api.audit()
    assert everything["total"] == 6
    page = api.audit(limit=2, offset=1)
    assert (page["total"], page["limit"], page["offset"]) == (6, 2, 1)
    assert [e["seq"] for e in page["items"]] == [e["seq"] for e in everything["items"][1:3]]
    cancels = api.audit(action="cancel")["items"]
    assert [(e["key"], e["target"]) for e in cancels] == [("root", f"run {run_ids[0]}")]
    assert api.audit(target=run_ids[0])["total"] == 2  # its run and its cancel
    assert {e["action"] for e in api.audit(keyName="deployer")["items"]} == {"apply"}
    assert api.audit(target="50%_off")["total"] == 0  # LIKE wildcards are literal
    future = api.audit(since="2100-01-01T00:00:00Z")
    assert future["total"] == 0 and future["items"] == []
    assert api.audit(until="2100-01-01T00:00:00Z")["total"] == 6
    bad = c.get("/api/v1/audit?limit=0", headers=t["root"])
    assert bad.status_code == 422


def test_get_audit_reads_the_state_file_without_a_server(api: Api) -> None:
    run = api.client.post("/api/v1/namespaces/default/jobs/ping/run",
                          headers=api.tokens["alice"]).json()["metadata"]["name"]
    api.client.post(f"/api/v1/executions/{run}/cancel", headers=api.tokens["alice"])
    table = subprocess.run([ONEOFF, "get", "audit", run, "--state", str(api.state)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["AT", "KEY", "ACTION", "TARGET", "FROM", "DETAIL"]
    assert len(rows) == 2  # the run (in its detail) and its cancel
    assert rows[0].split()[1:5] == ["alice", "cancel", "run", run]
    assert rows[1].split()[1:5] == ["alice", "run", "Job", "default/ping"]
    as_json = subprocess.run([ONEOFF, "get", "audit", "--state", str(api.state), "-o", "json"],
                             capture_output=True, text=True, timeout=60)
    document = json.loads(as_json.stdout)
    assert document["kind"] == "List" and len(document["items"]) == 2


@pytest.mark.slow
def test_a_new_user_finds_who_cancelled_a_run(tmp_path: Path,
                                              serve: Callable[..., Server]) -> None:
    root = tmp_path / "jobs.d"
    root.mkdir()
    admin_yaml, admin = key_yaml("ops-admin", "admin")
    alice_yaml, alice = key_yaml("alice", "run", "cancel")
    (root / "keys.yaml").write_text(admin_yaml + "---\n" + alice_yaml)
    (root / "sleeper.yaml").write_text(SLEEPER)
    server = serve()
    url = server.url

    def oneoff(token: str, *args: str) -> subprocess.CompletedProcess[str]:
        return server.oneoff(*args, "--server", url, "--api-key", token)

    started = oneoff(alice, "run", "sleeper", "-o", "json")
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["metadata"]["name"]
    wait_until(lambda: json.loads(oneoff(alice, "get", "executions", run_id, "-o", "json")
                                  .stdout)["status"]["phase"] == "running", timeout=20)
    cancelled = oneoff(alice, "cancel", run_id)
    assert cancelled.returncode == 0, cancelled.stderr

    denied = oneoff(alice, "get", "audit")
    assert denied.returncode == 3 and "admin" in denied.stderr
    found = oneoff(admin, "get", "audit", run_id)
    assert found.returncode == 0, found.stderr
    row, _ = found.stdout.splitlines()[1:]  # the cancel, then the run
    at, key, action, *_ = row.split()
    assert (key, action) == ("alice", "cancel") and "127.0.0.1" in row
    assert abs(time.time() - time.mktime(time.strptime(at[:19], "%Y-%m-%dT%H:%M:%S"))
               + time.timezone) < 120
    assert server.logged(lambda line: line.get("action") == "audit"
                         and line.get("key") == "alice" and line.get("audit_action") == "cancel"
                         and line.get("run_id") == run_id and line.get("remote") == "127.0.0.1")
    assert server.logged(lambda line: line.get("audit_action") == "run"
                         and line.get("job") == "sleeper" and line.get("namespace") == "default"
                         and line.get("run_id") == run_id)
