"""API benchmark: the issue's REST targets against a real ``oneoff serve`` on loopback.

Run as ``.venv/bin/python bench/api.py`` (``--help`` for sizes). It starts ``oneoff serve``
in a temp directory with one declared ApiKey (so every request is authenticated), then:

- ``apply JSON``: one ``POST /api/v1/apply`` of N Jobs as a JSON list (target ≤ 0.5 s for
  10,000), and the same N as multi-document YAML in another namespace (target ≤ 2 s);
  the response comes once the objects are stored; the scheduler then creates each job's
  pending run, and the YAML row also shows when all 2N runs existed;
- ``create one at a time``: ``POST /api/v1/namespaces/{ns}/jobs`` per job over one
  keep-alive connection (jobs/s; the best peer inserts about 1,750 jobs/s this way);
- ``list``: ``GET /api/v1/namespaces/json/jobs?limit=100&offset=…`` walking all N jobs,
  several passes (p50 / p99 per page; target p99 ≤ 20 ms);
- ``run``: ``POST …/jobs/{name}/run`` from 8 client threads, each on its own connection
  (runs/s; target ≥ 500/s with auth on). The runs are dispatched at once and fail fast
  against a closed loopback port, so the number is mostly the API's.

The jobs are HTTP jobs due in 2030. Nothing is asserted; it prints a table (or ``--json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ONEOFF = str(Path(sys.executable).parent / "oneoff")
SINK = "http://127.0.0.1:9"
"""Where the jobs point: a closed loopback port, so the runs that "run now" starts fail at
once (connection refused) and cost the server little besides the API work measured."""


def job(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "oneoff.dev/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": "bench"}},
        "spec": {"schedule": {"at": "2030-01-01T00:00:00Z"}, "overlapPolicy": "AllowAll",
                 "priority": 5, "retry": {"limit": 2},
                 "http": {"url": f"{SINK}/hook/{name}", "method": "POST",
                          "json": {"job": name}}},
    }


def job_yaml(name: str, namespace: str) -> str:
    return (
        f"apiVersion: oneoff.dev/v1\nkind: Job\nmetadata:\n  name: {name}\n"
        f"  namespace: {namespace}\n  labels: {{team: bench}}\nspec:\n"
        "  schedule: {at: '2030-01-01T00:00:00Z'}\n  overlapPolicy: AllowAll\n  priority: 5\n"
        "  retry: {limit: 2}\n"
        f"  http:\n    url: {SINK}/hook/{name}\n    method: POST\n"
        f"    json: {{job: {name}}}\n"
    )


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def start(directory: Path, token: str) -> tuple[subprocess.Popen[str], str]:
    jobs = directory / "jobs.d"
    jobs.mkdir()
    sha = hashlib.sha256(token.encode()).hexdigest()
    (jobs / "key.yaml").write_text(
        "apiVersion: oneoff.dev/v1\nkind: ApiKey\nmetadata: {name: bench}\n"
        f"spec: {{scopes: [admin], tokenSha256: {sha}}}\n")
    env = {**os.environ, "ONEOFF_LOG_FORMAT": "json", "ONEOFF_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [ONEOFF, "serve", "--listen", "127.0.0.1:0", "--log-format", "json"],
        cwd=directory, env={**env, "ONEOFF_LOG_LEVEL": "INFO"}, text=True,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    assert process.stderr is not None
    for line in process.stderr:
        record = json.loads(line)
        if record.get("action") == "ready":
            url = str(record["api"])
            break
    else:
        raise SystemExit("oneoff serve exited before it was ready")
    threading.Thread(target=lambda: [None for _ in process.stderr or ()], daemon=True).start()
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per apply (10,000)")
    parser.add_argument("--creates", type=int, default=1_000, help="one-at-a-time creates")
    parser.add_argument("--runs", type=int, default=4_000, help="run-now requests")
    parser.add_argument("--passes", type=int, default=3, help="list passes over all pages")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    token = "oo_" + secrets.token_urlsafe(32)
    headers = {"Authorization": f"Bearer {token}"}
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                   f"Python {platform.python_version()}",
        "load_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="oneoff-bench-api-") as tmp:
        process, url = start(Path(tmp), token)
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
                body = json.dumps([job(f"j-{i:05d}", "json") for i in range(args.jobs)])
                began = time.perf_counter()
                response = client.post("/api/v1/apply", content=body,
                                       headers={"content-type": "application/json"})
                results["apply_json_s"] = time.perf_counter() - began
                assert response.status_code == 200, response.text[:500]
                text = "---\n".join(job_yaml(f"y-{i:05d}", "yaml") for i in range(args.jobs))
                began = time.perf_counter()
                response = client.post("/api/v1/apply", content=text,
                                       headers={"content-type": "application/yaml"})
                results["apply_yaml_s"] = time.perf_counter() - began
                assert response.status_code == 200, response.text[:500]
                # the scheduler creates the runs after the response: wait for all of them,
                # so the next workload does not share the machine with that
                while client.get("/api/v1/executions", params={"limit": 1}).json()[
                        "total"] < 2 * args.jobs:
                    time.sleep(0.05)
                results["apply_yaml_runs_s"] = time.perf_counter() - began

                began = time.perf_counter()
                for i in range(args.creates):
                    document = job(f"c-{i:05d}", "create")
                    response = client.post("/api/v1/namespaces/create/jobs", json=document)
                    assert response.status_code == 201, response.text[:500]
                results["create_per_s"] = args.creates / (time.perf_counter() - began)

                pages: list[float] = []
                for _ in range(args.passes):
                    for offset in range(0, args.jobs, 100):
                        began = time.perf_counter()
                        response = client.get("/api/v1/namespaces/json/jobs",
                                              params={"limit": 100, "offset": offset})
                        pages.append((time.perf_counter() - began) * 1000)
                        assert response.status_code == 200 and len(response.json()["items"])
                results["list_p50_ms"] = statistics.median(pages)
                results["list_p99_ms"] = percentile(pages, 0.99)
                results["list_max_ms"] = max(pages)

            per_thread = args.runs // 8
            failures: list[str] = []

            def runs(worker: int) -> None:
                with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
                    for i in range(per_thread):
                        name = f"j-{(worker * per_thread + i) % args.jobs:05d}"
                        response = client.post(f"/api/v1/namespaces/json/jobs/{name}/run")
                        if response.status_code != 201:
                            failures.append(response.text[:200])

            threads = [threading.Thread(target=runs, args=(n,)) for n in range(8)]
            began = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            results["run_per_s"] = per_thread * 8 / (time.perf_counter() - began)
            results["run_failures"] = len(failures)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
    results["load_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    n = f"{args.jobs:,}"
    rows = [
        (f"apply {n} jobs as JSON", f"{results['apply_json_s']:.2f} s", "≤ 0.5 s"),
        (f"apply {n} jobs as YAML", f"{results['apply_yaml_s']:.2f} s "
         f"(all runs {results['apply_yaml_runs_s']:.2f} s)", "≤ 2 s"),
        ("create one job per request", f"{results['create_per_s']:,.0f} jobs/s",
         "(best peer ~1,750/s)"),
        ("GET 100 jobs of 10,000, p50 / p99 / max",
         f"{results['list_p50_ms']:.1f} / {results['list_p99_ms']:.1f} / "
         f"{results['list_max_ms']:.1f} ms", "p99 ≤ 20 ms"),
        ("POST run, 8 clients, auth on", f"{results['run_per_s']:,.0f} runs/s "
         f"({results['run_failures']} failed)", "≥ 500/s"),
    ]
    print(f"Machine: {results['machine']}; load before {results['load_before']}, after "
          f"{results['load_after']}")
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:<28} {target}")


if __name__ == "__main__":
    main()
