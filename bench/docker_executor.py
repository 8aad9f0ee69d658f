"""Docker executor benchmark: what one trivial container run costs, and 20 at once.

Run as ``.venv/bin/python bench/docker_executor.py`` (``--help`` for sizes). It uses the
engine at ``DOCKER_HOST`` when one answers there; otherwise, as root, it starts a private
``dockerd --iptables=false --bridge=none`` in a temp directory (as ``scripts/test`` does)
and stops it at the end. The image is made locally from Debian's busybox-static (``docker
import``), never pulled. It measures, nothing asserted:

- ``single``: one ``DockerRunner.run`` of ``true`` after another (inspect image, create,
  attach, start, wait, remove: the whole attempt until the container is gone), and the
  same through ``docker run --rm`` of the CLI as the engine's own baseline;
- ``20 at once``: 20 concurrent ``DockerRunner.run`` of ``true`` (wall time, and each
  run's own time), and 20 of ``sleep 2`` (wall time against the 2 s floor), while a
  10 ms asyncio ticker measures how late the event loop gets (a blocking SDK call on the
  loop would show here as the length of that call);
- ``serve``: 20 docker jobs due at one instant through a real ``oneoff serve``
  (``--workers 20``): from the due time to the last recorded finish, read from the state
  file.

Prints a table (or ``--json``), with the machine, load average and engine version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
from docker.errors import DockerException

from oneoff.executors import Outcome, OutcomeStatus, RunContext
from oneoff.executors.docker import DockerRunner
from oneoff.manifests import DockerExecutor

IMAGE = "oneoff-bench/busybox:latest"
APPLETS = ("sh", "true", "sleep", "echo")
ONEOFF = str(Path(sys.executable).parent / "oneoff")


@contextlib.contextmanager
def engine() -> Iterator[str]:
    """DOCKER_HOST if an engine answers there, else a private dockerd (root only)."""
    host = os.environ.get("DOCKER_HOST")
    if host and _answers(host):
        yield host
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        sys.exit("bench/docker_executor.py: no engine at DOCKER_HOST, and starting dockerd "
                 "needs root and Debian's docker.io")
    directory = tempfile.mkdtemp(prefix="oneoff-bench-dockerd.")
    host = f"unix://{directory}/docker.sock"
    log = open(f"{directory}/dockerd.log", "w")  # open as long as dockerd runs
    process = subprocess.Popen(
        ["dockerd", "--iptables=false", "--bridge=none", "--host", host,
         "--data-root", f"{directory}/data", "--exec-root", f"{directory}/exec",
         "--pidfile", f"{directory}/dockerd.pid"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _answers(host):
            if time.monotonic() > deadline or process.poll() is not None:
                sys.exit(f"bench/docker_executor.py: dockerd did not start; see "
                         f"{directory}/dockerd.log")
            time.sleep(0.1)
        os.environ["DOCKER_HOST"] = host
        yield host
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def _answers(host: str) -> bool:
    try:
        client = docker.DockerClient(base_url=host, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (DockerException, OSError):
        return False


def make_image(client: docker.DockerClient) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("bin")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        tar.add("/bin/busybox", "bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    repository, tag = IMAGE.rsplit(":", 1)
    client.api.import_image_from_data(data.getvalue(), repository=repository, tag=tag,
                                      changes=["ENV PATH=/bin"])


def ctx() -> RunContext:
    return RunContext(run_id=uuid.uuid4().hex[:20], job="bench", namespace="bench",
                      scheduled_at=datetime.now(UTC), attempt=1)


def block(*command: str) -> DockerExecutor:
    return DockerExecutor.model_validate(
        {"image": IMAGE, "pullPolicy": "Never", "command": list(command)})


async def timed(runner: DockerRunner, executor: DockerExecutor) -> tuple[float, Outcome]:
    started = time.perf_counter()
    outcome = await runner.run(executor, ctx())
    return time.perf_counter() - started, outcome


async def single(runs: int) -> list[float]:
    runner = DockerRunner()
    await timed(runner, block("true"))  # the first run also connects: not counted
    times = []
    for _ in range(runs):
        elapsed, outcome = await timed(runner, block("true"))
        assert outcome.status is OutcomeStatus.SUCCEEDED, outcome
        times.append(elapsed)
    runner.close()
    return times


def cli_single(runs: int) -> list[float]:
    cli = shutil.which("docker")
    if cli is None:
        return []
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([cli, "run", "--rm", IMAGE, "true"], check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return times


async def at_once(count: int, *command: str) -> dict[str, Any]:
    runner = DockerRunner()
    await timed(runner, block("true"))  # connected before the clock starts
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    results = await asyncio.gather(*(timed(runner, block(*command)) for _ in range(count)))
    wall = time.perf_counter() - started
    done.set()
    await ticker
    runner.close()
    assert all(o.status is OutcomeStatus.SUCCEEDED for _, o in results), results
    each = sorted(elapsed for elapsed, _ in results)
    return {"wall_s": wall, "each_median_s": statistics.median(each), "each_max_s": each[-1],
            "loop_lag_max_ms": max(lags) * 1000, "loop_lag_p99_ms": _pct(lags, 99) * 1000,
            "ticks": len(lags)}


def through_serve(count: int) -> dict[str, Any]:
    """``count`` docker jobs due at one instant in a real ``oneoff serve``."""
    with tempfile.TemporaryDirectory(prefix="oneoff-bench-serve.") as directory:
        root = Path(directory)
        (root / "jobs.d").mkdir()
        due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=6)
        (root / "jobs.d" / "fan-out.yaml").write_text("---\n".join(
            f"apiVersion: oneoff.dev/v1\nkind: Job\nmetadata: {{name: fan-out-{i}}}\n"
            f"spec:\n  schedule: {{at: '{due.isoformat()}'}}\n"
            f"  docker: {{image: {IMAGE}, pullPolicy: Never, command: ['true']}}\n"
            for i in range(count)))
        state = root / "oneoff.db"
        env = {**os.environ, "ONEOFF_LOG_FORMAT": "json", "ONEOFF_LISTEN": "127.0.0.1:0"}
        server = subprocess.Popen(
            [ONEOFF, "serve", "--state", str(state), "--manifests", str(root / "jobs.d"),
             "--workers", str(count)],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            rows: list[tuple[str, str, str]] = []
            while time.monotonic() < deadline:
                time.sleep(0.5)
                rows = _finished(state)
                if len(rows) == count:
                    break
        finally:
            server.terminate()
            server.wait(30)
    if len(rows) < count:
        return {"error": f"only {len(rows)} of {count} runs finished within 60 s"}
    started = [datetime.fromisoformat(r[1]) for r in rows]
    finished = [datetime.fromisoformat(r[2]) for r in rows]
    return {"statuses": sorted({r[0] for r in rows}),
            "due_to_last_finish_s": (max(finished) - due).total_seconds(),
            "due_to_last_start_s": (max(started) - due).total_seconds(),
            "run_median_s": statistics.median(
                (f - s).total_seconds() for s, f in zip(started, finished, strict=True))}


def _finished(state: Path) -> list[tuple[str, str, str]]:
    """(status, startedAt, finishedAt) of finished runs, read by the CLI from the state file."""
    if not state.exists():
        return []
    listed = subprocess.run(
        [ONEOFF, "get", "executions", "-A", "-o", "json", "--limit", "1000", "--state",
         str(state)], capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        return []
    return [(item["status"]["phase"], item["status"]["startedAt"], item["status"]["finishedAt"])
            for item in json.loads(listed.stdout)["items"]
            if item["status"].get("finishedAt")]


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median_ms": statistics.median(values) * 1000, "min_ms": min(values) * 1000,
            "p90_ms": _pct(values, 90) * 1000, "max_ms": max(values) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="sequential runs (default 30)")
    parser.add_argument("--at-once", type=int, default=20, help="concurrent runs (default 20)")
    parser.add_argument("--no-serve", action="store_true", help="skip the oneoff serve part")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with engine() as host:
        client = docker.from_env()
        make_image(client)
        version = client.version()
        results: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "engine": f"Docker {version['Version']} (API {version['ApiVersion']})",
                        "host": host, "load_before": load_before},
            "single": _stats(asyncio.run(single(args.runs))),
            "single_cli": _stats(cli_single(args.runs)),
            "at_once_true": asyncio.run(at_once(args.at_once, "true")),
            "at_once_sleep_2": asyncio.run(at_once(args.at_once, "sleep", "2")),
        }
        if not args.no_serve:
            results["serve"] = through_serve(args.at_once)
        client.close()
    results["machine"]["load_after"] = os.getloadavg()

    if args.json:
        print(json.dumps(results, indent=2))
        return
    m = results["machine"]
    print(f"{m['engine']}, {m['cpus']} CPUs, Python {m['python']}, load average "
          f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after")
    for name, label in (("single", "DockerRunner.run, one after another"),
                        ("single_cli", "docker run --rm (CLI), one after another")):
        s = results[name]
        if s:
            print(f"{label:44} median {s['median_ms']:6.0f} ms  min {s['min_ms']:6.0f}  "
                  f"p90 {s['p90_ms']:6.0f}  max {s['max_ms']:6.0f}")
    for name, label in (("at_once_true", f"{args.at_once} x true at once"),
                        ("at_once_sleep_2", f"{args.at_once} x sleep 2 at once")):
        r = results[name]
        print(f"{label:44} wall {r['wall_s']:6.2f} s  each median {r['each_median_s']:.2f} s"
              f"  max {r['each_max_s']:.2f} s  loop lag p99 {r['loop_lag_p99_ms']:.1f} ms"
              f"  max {r['loop_lag_max_ms']:.1f} ms")
    if "serve" in results:
        r = results["serve"]
        if "error" in r:
            print(f"oneoff serve: {r['error']}")
        else:
            print(f"{'oneoff serve, ' + str(args.at_once) + ' jobs due at once':44} due → last "
                  f"finish {r['due_to_last_finish_s']:.2f} s, due → last start "
                  f"{r['due_to_last_start_s']:.2f} s, run median {r['run_median_s']:.2f} s, "
                  f"{'/'.join(r['statuses'])}")


if __name__ == "__main__":
    main()
