"""schemathesis against the API's own OpenAPI document: whatever it sends, no 5xx.

The app runs in process over a real store that holds a few jobs, a run and a source with
an error, so generated requests reach real rows, not only 404s. The event stream is left
out (it never ends by design); ``test_api.py`` and ``test_api_e2e.py`` cover it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import job_yaml
from hypothesis import HealthCheck, settings

from oneoff.api import create_app
from oneoff.daemon import sync_changed_jobs
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.scheduler import Scheduler
from oneoff.store import Store

pytestmark = pytest.mark.slow


def _app() -> Any:
    tmp = Path(tempfile.mkdtemp(prefix="oneoff-fuzz-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    root = tmp / "jobs.d"
    root.mkdir()
    (root / "jobs.yaml").write_text(job_yaml("ping", labels="{team: ops}") + "---\n"
                                    + job_yaml("default"))
    (root / "bad.yaml").write_text("kind: Job\nmetadata: {name: [x]}\n")
    store = Store(str(tmp / "state.db"))
    atexit.register(store.close)
    scheduler = Scheduler(store, lambda item: None, lambda: 0, lambda uid: [], lambda r: False)
    source = DirectorySource(str(root))
    reconciler = Reconciler(store, [source],
                            on_applied=lambda report: sync_changed_jobs(store, scheduler, report))
    reconciler.reconcile(source)
    return create_app(store, reconciler=reconciler, scheduler=scheduler)


# Built at collection: schemathesis parametrizes from the schema before fixtures exist.
schema = schemathesis.openapi.from_asgi("/api/openapi.json", _app())


@schema.exclude(operation_id="streamEvents").parametrize()
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_request_makes_the_server_fail(case: Any) -> None:
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
    if response.status_code >= 400:
        headers = {name.lower(): value for name, value in response.headers.items()}
        content_type = headers["content-type"]
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/problem+json"), response.text
