"""Operability settings: ``metrics_auth`` puts ``/metrics`` behind a read key, and
``oneoff config`` prints every effective setting with where it came from, secrets
masked."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import ONEOFF
from fastapi.testclient import TestClient

from oneoff.api import create_app
from oneoff.auth import KeyRing, generate_token
from oneoff.metrics import Metrics
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.scheduler import Scheduler
from oneoff.settings import explain_settings, load_settings
from oneoff.store import Store


def test_metrics_auth_asks_for_a_key_with_the_read_scope(tmp_path: Path) -> None:
    root = tmp_path / "jobs.d"
    root.mkdir()
    token, sha = generate_token()
    (root / "key.yaml").write_text(
        "apiVersion: oneoff.dev/v1\nkind: ApiKey\nmetadata: {name: prometheus}\n"
        f"spec:\n  scopes: [read]\n  tokenSha256: {sha}\n")
    with Store(str(tmp_path / "state.db")) as store:
        reconciler = Reconciler(store, [DirectorySource(str(root))])
        reconciler.reconcile(reconciler.sources[0])
        scheduler = Scheduler(store, lambda item: None, lambda: 0, lambda uid: [],
                              lambda run_id: False)
        app = create_app(store, reconciler=reconciler, scheduler=scheduler,
                         keys=KeyRing(store), metrics=Metrics(store), metrics_auth=True)
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/metrics").status_code == 401
            wrong = client.get("/metrics", headers={"Authorization": "Bearer oo_nope"})
            assert wrong.status_code == 401
            ok = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and "oneoff_build_info" in ok.text


def test_metrics_auth_is_off_by_default_and_set_like_every_setting(tmp_path: Path) -> None:
    assert load_settings({}, {}).metrics_auth is False
    assert load_settings({}, {"ONEOFF_METRICS_AUTH": "true"}).metrics_auth is True


def test_explain_settings_names_the_layer_each_value_came_from(tmp_path: Path) -> None:
    config = tmp_path / "oneoff.yaml"
    config.write_text("retention-days: 7\nworkers: 2\n"
                      "docker_host: tcp://deploy:s3cret@docker.internal:2376\n")
    rows = {name: (value, source) for name, value, source in explain_settings(
        {"listen": "127.0.0.1:9999", "workers": None},
        {"ONEOFF_WORKERS": "3", "ONEOFF_CONFIG": str(config)})}
    assert rows["listen"] == ("127.0.0.1:9999", "flag")
    assert rows["workers"] == (3, "env ONEOFF_WORKERS")  # env beats the file
    assert rows["retention_days"] == (7, f"file {config}")
    assert rows["state"] == ("./oneoff.db", "default")
    assert rows["docker_host"] == ("tcp://deploy:********@docker.internal:2376", f"file {config}")


def test_oneoff_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    env = {**os.environ, "ONEOFF_WORKERS": "3", "ONEOFF_API_KEY": "oo_very_secret_token",
           "ONEOFF_DOCKER_HOST": "tcp://ci:hunter2@10.0.0.5:2376",
           "ONEOFF_CLIENT_CONFIG": str(tmp_path / "none.yaml")}
    (tmp_path / "none.yaml").write_text("{}\n")
    table = subprocess.run([ONEOFF, "config", "--listen", "127.0.0.1:9"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "oo_very_secret_token" not in table.stdout and "hunter2" not in table.stdout
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines()[1:]}
    assert rows["listen"] == ["127.0.0.1:9", "flag"]
    assert rows["workers"] == ["3", "env", "ONEOFF_WORKERS"]
    assert rows["retention_days"] == ["90", "default"]
    assert rows["api_key"] == ["********", "env", "ONEOFF_API_KEY"]
    assert rows["docker_host"][0] == "tcp://ci:********@10.0.0.5:2376"
    as_json = subprocess.run([ONEOFF, "config", "-o", "json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    document = json.loads(as_json.stdout)
    assert document["workers"] == {"value": 3, "source": "env ONEOFF_WORKERS"}
    assert document["manifests"] == {"value": ["./jobs.d"], "source": "default"}
    assert "hunter2" not in as_json.stdout and "oo_very_secret" not in as_json.stdout
