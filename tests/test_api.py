"""The REST API in process: a real store, reconciler and scheduler behind ``create_app``,
driven with Starlette's test client (end-to-end through ``oneoff serve`` is in
``test_api_e2e.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import job_yaml, wait_until
from fastapi.testclient import TestClient

from oneoff.api import create_app
from oneoff.auth import KeyRing, generate_token
from oneoff.daemon import sync_changed_jobs
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.records import ObjectKey
from oneoff.scheduler import Scheduler
from oneoff.store import Store


@dataclass
class Api:
    client: TestClient
    store: Store
    root: Path
    reconciler: Reconciler
    source: DirectorySource

    def write(self, name: str, text: str) -> None:
        (self.root / name).write_text(text)
        self.reconciler.reconcile(self.source)

    def key(self, name: str, *scopes: str, namespaces: list[str] | None = None,
            extra: str = "") -> dict[str, str]:
        """Declare an ApiKey in jobs.d; returns the Authorization header for it."""
        token, sha = generate_token()
        limit = f"\n  namespaces: {json.dumps(namespaces)}" if namespaces else ""
        self.write(f"key-{name}.yaml", (
            "apiVersion: oneoff.dev/v1\nkind: ApiKey\n"
            f"metadata: {{name: {name}}}\n"
            f"spec:\n  scopes: {json.dumps(list(scopes))}\n  tokenSha256: {sha}{limit}{extra}\n"
        ))
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    root = tmp_path / "jobs.d"
    root.mkdir()
    store = Store(str(tmp_path / "state.db"))
    scheduler = Scheduler(store, lambda item: None, lambda: 0, lambda uid: [],
                          lambda run_id: False)
    source = DirectorySource(str(root))
    reconciler = Reconciler(store, [source],
                            on_applied=lambda report: sync_changed_jobs(store, scheduler, report))
    app = create_app(store, reconciler=reconciler, scheduler=scheduler, keys=KeyRing(store))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, store, root, reconciler, source)
    store.close()


def job_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"schedule": {"at": "2030-01-01T00:00:00Z"},
                     "http": {"url": "https://example.com/"}, **spec}}


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"]
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()
    return body


# --- reads ---------------------------------------------------------------------------


def test_list_jobs_is_paged_with_a_total(api: Api) -> None:
    api.write("many.yaml", "---\n".join(job_yaml(f"job-{i:02d}") for i in range(25)))
    page = api.client.get("/api/v1/jobs", params={"limit": 10, "offset": 20}).json()
    assert page["kind"] == "List" and page["total"] == 25
    assert [item["metadata"]["name"] for item in page["items"]] == [
        f"job-{i:02d}" for i in range(20, 25)]
    beyond = api.client.get("/api/v1/jobs", params={"offset": 100}).json()
    assert beyond["items"] == [] and beyond["total"] == 25


def test_label_selector_and_sort(api: Api) -> None:
    api.write("a.yaml", job_yaml("alpha", labels="{team: ops, tier: web}") + "---\n"
              + job_yaml("beta", labels="{team: billing}") + "---\n"
              + job_yaml("gamma", labels="{team: ops}"))
    names = lambda params: [i["metadata"]["name"] for i in  # noqa: E731
                            api.client.get("/api/v1/jobs", params=params).json()["items"]]
    assert names({"labelSelector": "team=ops"}) == ["alpha", "gamma"]
    assert names({"labelSelector": "team!=ops"}) == ["beta"]
    assert names({"labelSelector": "team=ops,!tier"}) == ["gamma"]
    assert names({"labelSelector": "tier"}) == ["alpha"]
    assert names({"sort": "-name"}) == ["gamma", "beta", "alpha"]


def test_get_job_shows_source_and_next_run(api: Api) -> None:
    api.write("ping.yaml", job_yaml("ping"))
    doc = api.client.get("/api/v1/namespaces/default/jobs/ping").json()
    assert doc["kind"] == "Job" and doc["metadata"]["generation"] == 1
    assert doc["status"]["source"]["file"].endswith("ping.yaml")
    assert doc["status"]["nextRunAt"] == "2030-01-01T00:00:00.000Z"


def test_missing_object_is_404_problem(api: Api) -> None:
    body = problem(api.client.get("/api/v1/namespaces/default/jobs/nope"), 404)
    assert body["detail"] == "Job default/nope not found"
    assert body["instance"] == "/api/v1/namespaces/default/jobs/nope"


def test_unknown_route_and_kind_are_problems(api: Api) -> None:
    problem(api.client.get("/api/v1/namespaces/default/widgets"), 422)
    problem(api.client.get("/nothing/here"), 404)


@pytest.mark.parametrize("path", [
    "/api/v1/namespaces/default/jobs/..%2F..%2Fetc%2Fpasswd",
    "/api/v1/namespaces/..%2Fx/jobs/ping",
    "/api/v1/namespaces/default/jobs/UPPER",
])
def test_names_that_are_not_dns_labels_are_refused(api: Api, path: str) -> None:
    response = api.client.get(path)
    assert response.status_code in (404, 422)
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("params", [
    {"labelSelector": "team=ops' OR '1'='1"},
    {"labelSelector": "a=b); DROP TABLE objects; --"},
    {"sort": "name; DROP TABLE objects"},
    {"sort": "(SELECT 1)"},
    {"limit": "1 OR 1=1"},
    {"offset": "-1"},
])
def test_sql_in_filters_is_data_or_a_422(api: Api, params: dict[str, str]) -> None:
    api.write("ping.yaml", job_yaml("ping"))
    response = api.client.get("/api/v1/jobs", params=params)
    if response.status_code == 200:
        assert response.json()["items"] == []
    else:
        problem(response, 422)
    assert api.store.get(ObjectKey("Job", "default", "ping")) is not None


@pytest.mark.parametrize("params", [
    {"status": "failed' OR 1=1 --"}, {"job": "x'--"}, {"sort": "seq; DROP TABLE executions"},
    {"since": "yesterday"}, {"type": "perl"},
])
def test_sql_in_execution_filters_is_a_422(api: Api, params: dict[str, str]) -> None:
    problem(api.client.get("/api/v1/executions", params=params), 422)


# --- create, delete ------------------------------------------------------------------


def test_create_job_then_get_it_and_its_pending_run(api: Api) -> None:
    response = api.client.post("/api/v1/namespaces/billing/jobs", json=job_body("trial-4711"))
    assert response.status_code == 201, response.text
    doc = response.json()
    assert doc["metadata"]["namespace"] == "billing"
    assert doc["status"]["source"]["name"] == "api:api"
    runs = api.client.get("/api/v1/namespaces/billing/executions",
                          params={"job": "trial-4711"}).json()
    assert runs["total"] == 1 and runs["items"][0]["status"]["phase"] == "pending"


def test_create_twice_is_409(api: Api) -> None:
    api.client.post("/api/v1/namespaces/default/jobs", json=job_body("once"))
    body = problem(api.client.post("/api/v1/namespaces/default/jobs", json=job_body("once")), 409)
    assert "already exists" in body["detail"]


def test_create_invalid_job_names_the_field(api: Api) -> None:
    body = job_body("bad")
    body["spec"]["schedul"] = body["spec"].pop("schedule")
    found = problem(api.client.post("/api/v1/namespaces/default/jobs", json=body), 422)
    assert {"field": "spec.schedul", "file": "body",
            "message": "unknown field 'schedul'; did you mean 'schedule'?"} in found["errors"]


def test_create_with_another_namespace_in_the_body_is_422(api: Api) -> None:
    body = job_body("x")
    body["metadata"]["namespace"] = "other"
    found = problem(api.client.post("/api/v1/namespaces/default/jobs", json=body), 422)
    assert found["errors"][0]["field"] == "metadata.namespace"


def test_malformed_json_is_400(api: Api) -> None:
    response = api.client.post("/api/v1/namespaces/default/jobs", content=b"{nope",
                               headers={"content-type": "application/json"})
    problem(response, 400)


def test_oversize_body_is_413(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"))
    scheduler = Scheduler(store, lambda item: None, lambda: 0, lambda uid: [], lambda r: False)
    app = create_app(store, reconciler=Reconciler(store, []), scheduler=scheduler,
                     max_body_bytes=1000)
    with TestClient(app) as client:
        response = client.post("/api/v1/apply", content=b"x" * 5000,
                               headers={"content-type": "application/yaml"})
    problem(response, 413)
    store.close()


def test_delete_api_job_cancels_its_pending_run(api: Api) -> None:
    api.client.post("/api/v1/namespaces/default/jobs", json=job_body("gone"))
    response = api.client.delete("/api/v1/namespaces/default/jobs/gone")
    assert response.status_code == 200 and response.json()["metadata"]["name"] == "gone"
    assert api.store.get(ObjectKey("Job", "default", "gone")) is None
    runs = api.client.get("/api/v1/executions", params={"job": "gone"}).json()["items"]
    assert [run["status"]["phase"] for run in runs] == ["cancelled"]


def test_delete_of_a_directory_object_is_409(api: Api) -> None:
    api.write("ping.yaml", job_yaml("ping"))
    body = problem(api.client.delete("/api/v1/namespaces/default/jobs/ping"), 409)
    assert "ping.yaml" in body["detail"]
    assert api.store.get(ObjectKey("Job", "default", "ping")) is not None


# --- apply ---------------------------------------------------------------------------


def test_apply_yaml_dry_run_then_for_real(api: Api) -> None:
    text = job_yaml("one") + "---\n" + job_yaml("two")
    dry = api.client.post("/api/v1/apply", params={"dryRun": "true", "fieldManager": "ci"},
                          content=text, headers={"content-type": "application/yaml"}).json()
    assert dry["dryRun"] is True and dry["applied"] is False
    assert dry["plan"]["counts"]["create"] == 2
    assert api.store.objects("Job") == []
    real = api.client.post("/api/v1/apply", params={"fieldManager": "ci"}, content=text,
                           headers={"content-type": "application/yaml"}).json()
    assert real["applied"] is True
    assert {o.source for o in api.store.objects("Job")} == {"api:ci"}
    again = api.client.post("/api/v1/apply", params={"fieldManager": "ci"}, content=text,
                            headers={"content-type": "application/yaml"}).json()
    assert again["plan"]["counts"] == {"create": 0, "update": 0, "delete": 0, "unchanged": 2}


def test_applied_jobs_get_their_runs(api: Api) -> None:
    text = "---\n".join(job_yaml(f"r{i}") for i in range(5))
    response = api.client.post("/api/v1/apply", content=text,
                               headers={"content-type": "application/yaml"})
    assert response.status_code == 200
    wait_until(lambda: api.client.get("/api/v1/executions").json()["total"] == 5)


def test_apply_json_list(api: Api) -> None:
    documents = [{"apiVersion": "oneoff.dev/v1", "kind": "Job", **job_body(f"j{i}")}
                 for i in range(3)]
    response = api.client.post("/api/v1/apply", json=documents)
    assert response.status_code == 200, response.text
    assert response.json()["plan"]["counts"]["create"] == 3


def test_apply_with_one_bad_document_applies_nothing_and_names_the_line(api: Api) -> None:
    text = job_yaml("good") + "---\n" + job_yaml("bad").replace("schedule:", "schedul:")
    body = problem(api.client.post("/api/v1/apply", content=text,
                                   headers={"content-type": "application/yaml",
                                            "X-OneOff-File": "jobs/bad.yaml"}), 422)
    error = body["errors"][0]
    assert error == {"field": "spec.schedul", "file": "jobs/bad.yaml", "line": 14,
                     "column": 3, "message": "unknown field 'schedul'; did you mean 'schedule'?"}
    assert api.store.objects("Job") == []


def test_apply_of_joined_files_records_each_file_and_line(api: Api) -> None:
    text = (job_yaml("first") + "--- # file: manifests/second.yaml\n" + job_yaml("second")
            + "--- # file: manifests/third.yaml\n"
            + job_yaml("third").replace("schedule:", "schedul:"))
    body = problem(api.client.post("/api/v1/apply", content=text, headers={
        "content-type": "application/yaml", "X-OneOff-File": "manifests/first.yaml"}), 422)
    assert (body["errors"][0]["file"], body["errors"][0]["line"]) == ("manifests/third.yaml", 6)
    text = text.replace("schedul:", "schedule:")
    api.client.post("/api/v1/apply", content=text, headers={
        "content-type": "application/yaml", "X-OneOff-File": "manifests/first.yaml"})
    second = api.client.get("/api/v1/namespaces/default/jobs/second").json()
    assert second["status"]["source"] == {"name": "api:api", "file": "manifests/second.yaml",
                                          "line": 1}


def test_apply_bad_json_document_names_its_line(api: Api) -> None:
    documents = [{"apiVersion": "oneoff.dev/v1", "kind": "Job", **job_body("ok")},
                 {"apiVersion": "oneoff.dev/v1", "kind": "Job", **job_body("Bad_Name")}]
    text = json.dumps(documents, indent=1)
    body = problem(api.client.post("/api/v1/apply", content=text,
                                   headers={"content-type": "application/json"}), 422)
    assert body["errors"][0]["field"] == "metadata.name"
    assert body["errors"][0]["line"] > 1


def test_apply_over_a_directory_object_is_409_unless_forced(api: Api) -> None:
    api.write("ping.yaml", job_yaml("ping"))
    text = job_yaml("ping", url="https://example.com/other")
    headers = {"content-type": "application/yaml"}
    body = problem(api.client.post("/api/v1/apply", content=text, headers=headers), 409)
    assert "already belongs to dir:" in body["detail"] and body["plan"]["issues"]
    forced = api.client.post("/api/v1/apply", params={"force": "true"}, content=text,
                             headers=headers)
    assert forced.status_code == 200
    assert api.store.get(ObjectKey("Job", "default", "ping")).source == "api:api"  # type: ignore[union-attr]


def test_apply_prune_removes_what_the_manager_no_longer_declares(api: Api) -> None:
    headers = {"content-type": "application/yaml"}
    text = "---\n".join(job_yaml(f"p{i}") for i in range(4))
    api.client.post("/api/v1/apply", content=text, headers=headers)
    kept = "---\n".join(job_yaml(f"p{i}") for i in range(3))
    result = api.client.post("/api/v1/apply", params={"prune": "true"}, content=kept,
                             headers=headers).json()
    assert result["plan"]["counts"]["delete"] == 1
    everything = problem(api.client.post("/api/v1/apply", params={"prune": "true"},
                                         content=job_yaml("other"), headers=headers), 409)
    assert "refused to prune" in everything["detail"]
    assert len(api.store.objects("Job")) == 3


# --- run, cancel ---------------------------------------------------------------------


def test_run_now_returns_the_run_and_skip_refuses_a_second(api: Api) -> None:
    api.write("ping.yaml", job_yaml("ping"))
    response = api.client.post("/api/v1/namespaces/default/jobs/ping/run")
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["kind"] == "Execution" and run["spec"]["reason"] == "manual"
    with api.store.transaction(datetime.now(UTC)) as tx:  # the run is now waiting for a worker
        tx.promote_due(tx.now)
    body = problem(api.client.post("/api/v1/namespaces/default/jobs/ping/run"), 409)
    assert "overlapPolicy is Skip" in body["detail"]


def test_cancel_a_pending_run_then_again_is_409(api: Api) -> None:
    api.write("ping.yaml", job_yaml("ping"))
    run_id = api.client.get("/api/v1/executions").json()["items"][0]["metadata"]["name"]
    cancelled = api.client.post(f"/api/v1/executions/{run_id}/cancel").json()
    assert cancelled["status"]["phase"] == "cancelled"
    body = problem(api.client.post(f"/api/v1/executions/{run_id}/cancel"), 409)
    assert "already finished" in body["detail"]
    problem(api.client.post("/api/v1/executions/nope/cancel"), 404)


def test_cancel_all_runs_of_a_job(api: Api) -> None:
    api.write("ping.yaml", job_yaml("ping"))
    api.client.post("/api/v1/namespaces/default/jobs/ping/run")
    result = api.client.post("/api/v1/namespaces/default/jobs/ping/cancel").json()
    assert len(result["cancelled"]) == 2


def test_execution_filters_and_output(api: Api) -> None:
    api.write("ping.yaml", job_yaml("ping") + "---\n" + job_yaml("other"))
    page = api.client.get("/api/v1/executions",
                          params={"job": "ping", "status": "pending,queued"}).json()
    assert page["total"] == 1
    run_id = page["items"][0]["metadata"]["name"]
    later = (datetime.now(UTC) + timedelta(days=365 * 10)).isoformat()
    assert api.client.get("/api/v1/executions", params={"since": later}).json()["total"] == 0
    detail = api.client.get(f"/api/v1/executions/{run_id}").json()
    assert detail["status"]["attempts"] == []
    output = api.client.get(f"/api/v1/executions/{run_id}/output")
    assert output.status_code == 200 and output.text == ""
    assert output.headers["x-oneoff-status"] == "pending"


def test_sources_show_errors_with_file_and_line(api: Api) -> None:
    api.write("bad.yaml", job_yaml("bad").replace("schedule:", "schedul:"))
    (source,) = api.client.get("/api/v1/sources").json()["items"]
    assert source["ok"] is False
    assert source["issues"][0]["file"].endswith("bad.yaml") and source["issues"][0]["line"] == 6


# --- auth ----------------------------------------------------------------------------


def test_without_keys_every_request_is_allowed(api: Api) -> None:
    me = api.client.get("/api/v1/whoami").json()
    assert me == {"name": None, "scopes": ["admin", "cancel", "read", "run", "write"],
                  "namespaces": None, "authenticated": False}


def test_once_a_key_exists_requests_need_one(api: Api) -> None:
    api.key("reader", "read")
    body = problem(api.client.get("/api/v1/jobs"), 401)
    assert "Authorization: Bearer" in body["detail"]
    assert api.client.get("/api/v1/jobs").headers["www-authenticate"] == "Bearer"
    problem(api.client.get("/api/v1/jobs", headers={"Authorization": "Bearer oo_wrong"}), 401)
    problem(api.client.get("/api/v1/jobs", headers={"Authorization": "Basic abc"}), 401)
    assert api.client.get("/healthz").status_code == 200


def test_read_only_key_is_refused_a_run_with_403(api: Api) -> None:
    headers = api.key("reader", "read")
    api.write("ping.yaml", job_yaml("ping"))
    assert api.client.get("/api/v1/jobs", headers=headers).json()["total"] == 1
    body = problem(api.client.post("/api/v1/namespaces/default/jobs/ping/run",
                                   headers=headers), 403)
    assert body["detail"] == "API key 'reader' lacks the 'run' scope (it has: read)"


def test_namespace_limited_key(api: Api) -> None:
    headers = api.key("billing", "read", "run", namespaces=["billing"])
    api.client.post("/api/v1/namespaces/billing/jobs", json=job_body("mine"),
                    headers=api.key("admin", "admin"))
    api.write("ping.yaml", job_yaml("ping"))
    names = [i["metadata"]["name"]
             for i in api.client.get("/api/v1/jobs", headers=headers).json()["items"]]
    assert names == ["mine"]
    body = problem(api.client.get("/api/v1/namespaces/default/jobs/ping", headers=headers), 403)
    assert "may not act in namespace 'default'" in body["detail"]
    assert api.client.post("/api/v1/namespaces/billing/jobs/mine/run",
                           headers=headers).status_code == 201


def test_expired_and_disabled_keys_stop_working_at_once(api: Api) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    expired = api.key("old", "read", extra=f"\n  expiresAt: '{past}'")
    assert "expired" in problem(api.client.get("/api/v1/jobs", headers=expired), 401)["detail"]
    headers = api.key("soon-revoked", "read")
    assert api.client.get("/api/v1/jobs", headers=headers).status_code == 200
    text = (api.root / "key-soon-revoked.yaml").read_text() + "  disabled: true\n"
    api.write("key-soon-revoked.yaml", text)
    assert "disabled" in problem(api.client.get("/api/v1/jobs", headers=headers), 401)["detail"]


def test_key_in_the_query_string_is_refused(api: Api) -> None:
    headers = api.key("reader", "read")
    token = headers["Authorization"].split()[1]
    body = problem(api.client.get("/api/v1/jobs", params={"token": token}), 400)
    assert "Authorization" in body["detail"]


def test_last_used_is_recorded(api: Api) -> None:
    headers = api.key("reader", "read")
    api.client.get("/api/v1/jobs", headers=headers)
    doc = api.client.get("/api/v1/namespaces/default/apikeys/reader", headers=headers).json()
    assert doc["status"]["lastUsedAt"].startswith(str(datetime.now(UTC).year))
    assert "tokenSha256" not in doc["spec"]  # never shown


def test_admin_creates_a_key_and_sees_the_token_once(api: Api) -> None:
    admin = api.key("root", "admin")
    response = api.client.post("/api/v1/namespaces/default/apikeys", headers=admin,
                               json={"metadata": {"name": "ci"}, "spec": {"scopes": ["write"]}})
    assert response.status_code == 201, response.text
    token = response.json()["token"]
    assert token.startswith("oo_")
    ci = {"Authorization": f"Bearer {token}"}
    assert api.client.get("/api/v1/whoami", headers=ci).json()["name"] == "ci"
    listed = api.client.get("/api/v1/apikeys", headers=admin).json()["items"]
    assert all("token" not in item and "tokenSha256" not in item["spec"] for item in listed)
    writer = problem(api.client.post("/api/v1/namespaces/default/apikeys", headers=ci,
                                     json={"metadata": {"name": "x"},
                                           "spec": {"scopes": ["admin"]}}), 403)
    assert "'admin' scope" in writer["detail"]
    assert api.client.delete("/api/v1/namespaces/default/apikeys/ci",
                             headers=admin).status_code == 200
    problem(api.client.get("/api/v1/whoami", headers=ci), 401)


# --- OpenAPI -------------------------------------------------------------------------


def test_openapi_has_stable_operation_ids_and_docs(api: Api) -> None:
    spec = api.client.get("/api/openapi.json").json()
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {"listObjects", "getObject", "createObject", "deleteObject", "apply", "runJob",
            "cancelExecution", "cancelJobRuns", "listExecutions", "getExecutionOutput",
            "streamEvents", "listSources", "whoami"} <= ids
    assert api.client.get("/api/docs").status_code == 200
