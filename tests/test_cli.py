"""The ``oneoff`` console script, run as a real subprocess against real files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ONEOFF, job_yaml

from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.store import Store


def oneoff(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI reading ./oneoff.db by name (ONEOFF_STATE), whatever listens on :8080."""
    env = {**os.environ, "ONEOFF_STATE": "oneoff.db"}
    return subprocess.run([ONEOFF, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.fixture
def applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A jobs.d with three jobs in two namespaces, reconciled into ./oneoff.db."""
    root = tmp_path / "jobs.d"
    root.mkdir()
    (root / "ping.yaml").write_text(job_yaml("ping", labels="{team: ops}"))
    (root / "pong.yaml").write_text(job_yaml("pong", labels="{team: web}"))
    (root / "billing.yaml").write_text(job_yaml("invoice", namespace="billing"))
    monkeypatch.chdir(tmp_path)  # as 'oneoff serve' started in that directory would
    with Store("oneoff.db") as store:
        reconciler = Reconciler(store, [DirectorySource("jobs.d")])
        report = reconciler.reconcile(reconciler.sources[0])
        assert report.ok, report.issues
    return tmp_path


def test_validate_accepts_good_manifests(tmp_path: Path) -> None:
    (tmp_path / "ping.yaml").write_text(job_yaml("ping"))
    result = oneoff(tmp_path, "validate", "ping.yaml")
    assert result.returncode == 0
    assert "1 objects in 1 files are valid" in result.stdout


def test_validate_prints_every_error_at_once_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(job_yaml("ping").replace("priority", "x") + "  prio: 1\n")
    (tmp_path / "b.yaml").write_text("kind: Job\nmetadata: {name: Bad}\n")
    result = oneoff(tmp_path, "validate", ".")
    assert result.returncode == 2
    assert "a.yaml:8:3: spec.prio: unknown field 'prio'; did you mean 'priority'?" in result.stderr
    assert "b.yaml:2:18: metadata.name: 'Bad' is not a DNS-1123 label" in result.stderr
    assert "error(s)" in result.stderr


def test_get_jobs_shows_the_source_file(applied: Path) -> None:
    result = oneoff(applied, "get", "jobs")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "SCHEDULE", "PRIORITY", "GEN", "SOURCE", "AGE"]
    assert [line.split()[0] for line in lines[1:]] == ["ping", "pong"]  # namespace default
    assert "jobs.d/ping.yaml:1" in lines[1]


def test_get_all_namespaces_and_selector(applied: Path) -> None:
    everything = oneoff(applied, "get", "jobs", "-A")
    assert everything.stdout.splitlines()[0].startswith("NAMESPACE")
    assert "invoice" in everything.stdout
    web = oneoff(applied, "get", "jobs", "-l", "team=web")
    assert [line.split()[0] for line in web.stdout.splitlines()[1:]] == ["pong"]
    billing = oneoff(applied, "get", "jobs", "-n", "billing", "-o", "json")
    assert [item["metadata"]["name"] for item in json.loads(billing.stdout)["items"]] == [
        "invoice"]


def test_get_json_is_a_kubernetes_list(applied: Path) -> None:
    result = oneoff(applied, "get", "jobs", "-o", "json")
    body = json.loads(result.stdout)
    assert body["apiVersion"] == "oneoff.dev/v1" and body["kind"] == "List"
    item = body["items"][0]
    assert set(item) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert item["metadata"]["generation"] == 1 and item["metadata"]["uid"]
    assert item["status"]["conditions"][0]["type"] == "Ready"
    assert item["status"]["source"]["file"].endswith("ping.yaml")


def test_get_one_as_yaml(applied: Path) -> None:
    result = oneoff(applied, "get", "job", "ping", "-o", "yaml")
    document = yaml.safe_load(result.stdout)
    assert document["kind"] == "Job"
    assert document["spec"]["http"]["url"] == "https://example.com/hook"


def test_get_missing_object_exits_1(applied: Path) -> None:
    result = oneoff(applied, "get", "job", "nope")
    assert result.returncode == 1
    assert "Job default/nope not found" in result.stderr


def test_get_without_state_file_exits_3(tmp_path: Path) -> None:
    result = oneoff(tmp_path, "get", "jobs")
    assert result.returncode == 3
    assert "no state file" in result.stderr


def test_get_unknown_kind_is_a_usage_error(applied: Path) -> None:
    result = oneoff(applied, "get", "pods")
    assert result.returncode == 2
    assert "unknown kind 'pods'" in result.stderr


def test_diff_exit_codes_follow_kubectl(applied: Path) -> None:
    unchanged = oneoff(applied, "diff", "-f", "jobs.d")
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    assert "0 to create, 0 to update, 0 to delete, 3 unchanged" in unchanged.stdout

    (applied / "jobs.d" / "ping.yaml").write_text(
        job_yaml("ping", url="https://example.com/v2", labels="{team: ops}"))
    (applied / "jobs.d" / "new.yaml").write_text(job_yaml("new"))
    changed = oneoff(applied, "diff", "-f", "jobs.d")
    assert changed.returncode == 1
    assert "+ create Job default/new" in changed.stdout
    assert '~ spec.http.url: "https://example.com/hook" → "https://example.com/v2"' in (
        changed.stdout)

    (applied / "jobs.d" / "new.yaml").write_text("kind: [")
    broken = oneoff(applied, "diff", "-f", "jobs.d")
    assert broken.returncode == 2
    assert "jobs.d/new.yaml:2:1: YAML syntax" in broken.stderr


def test_diff_changes_nothing(applied: Path) -> None:
    (applied / "jobs.d" / "pong.yaml").unlink()
    before = (applied / "oneoff.db").read_bytes()
    result = oneoff(applied, "diff", "-f", "jobs.d")
    assert result.returncode == 1
    assert "- delete Job default/pong" in result.stdout
    assert (applied / "oneoff.db").read_bytes() == before


def test_schema_prints_every_kind(tmp_path: Path) -> None:
    result = oneoff(tmp_path, "schema")
    assert set(json.loads(result.stdout)) == {"job.json", "chain.json", "webhook.json",
                                              "apikey.json"}
    job = json.loads(oneoff(tmp_path, "schema", "job").stdout)
    assert job["properties"]["kind"]["const"] == "Job"


def test_shell_completion_knows_the_verbs_and_their_choices(tmp_path: Path) -> None:
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_ONEOFF_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        result = subprocess.run([ONEOFF], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=60)
        return result.stdout.splitlines()

    assert "plain,create" in complete("oneoff keys c")
    assert {"plain,apply", "plain,run", "plain,cancel", "plain,logs"} <= set(complete("oneoff "))
    assert complete("oneoff get jobs -o ") == ["plain,table", "plain,json", "plain,yaml"]
