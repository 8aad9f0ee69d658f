"""The Docker executor against a real Docker engine (``DOCKER_HOST``; ``scripts/test``
starts a private one): output, exit codes, env, options and limits, pull policies,
timeouts and cancels that leave no container behind, an engine that is down, 20
containers at once, crash recovery, and docker jobs end to end through ``oneoff serve``.

The only image is made here, once per session, from Debian's busybox-static (``docker
import``). No test ever reaches for a registry: the pull failures use a loopback registry
address that refuses at once.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import signal
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import Server, wait_until
from docker.errors import DockerException
from docker.models.containers import Container

from oneoff.executors import TRUNCATION_MARK, Cancelled, Outcome, OutcomeStatus, RunContext
from oneoff.executors.docker import (
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_NAMESPACE,
    LABEL_RUN_ID,
    DockerRunner,
    container_name,
    memory_bytes,
)
from oneoff.manifests import DockerExecutor

pytestmark = pytest.mark.docker

IMAGE = "oneoff-test/busybox:latest"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "sleep", "cat", "env", "id", "pwd", "printf", "head", "tr", "yes",
           "true", "false", "seq", "wc")
REFUSING_REGISTRY = "127.0.0.1:9"
"""A registry address on loopback where nothing listens: a pull fails at once."""


# --- the engine and the image ----------------------------------------------------------


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    """The engine at DOCKER_HOST; without one every docker test fails (never skips)."""
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except DockerException as exc:
        pytest.fail(
            f"the docker tests need a Docker engine at DOCKER_HOST "
            f"({os.environ.get('DOCKER_HOST', 'unset')}): {exc}. scripts/test starts one when "
            "run as root; -m 'not docker' leaves these tests out", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def image(engine: docker.DockerClient) -> str:
    """``oneoff-test/busybox:latest``: busybox-static and its applets, nothing else."""
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} is missing: apt-get install busybox-static", pytrace=False)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for directory in ("bin", "tmp"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), "bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    repository, tag = IMAGE.rsplit(":", 1)
    engine.api.import_image_from_data(data.getvalue(), repository=repository, tag=tag,
                                      changes=['ENV PATH=/bin', 'CMD ["sh"]'])
    return IMAGE


def ctx(**overrides: Any) -> RunContext:
    values: dict[str, Any] = {
        "run_id": f"run-{uuid.uuid4().hex[:12]}",
        "job": "nightly-report",
        "namespace": "ops",
        "scheduled_at": datetime(2030, 1, 1, tzinfo=UTC),
        "attempt": 2,
        "kill_grace": 0.5,
    }
    return RunContext(**{**values, **overrides})


def block(**spec: Any) -> DockerExecutor:
    return DockerExecutor.model_validate({"image": IMAGE, "pullPolicy": "Never", **spec})


def sh(script: str, **spec: Any) -> DockerExecutor:
    return block(command=["sh", "-c", script], **spec)


def run(executor: DockerExecutor, context: RunContext | None = None, **runner: Any) -> Outcome:
    docker_runner = DockerRunner(**runner)
    try:
        return asyncio.run(docker_runner.run(executor, context or ctx()))
    finally:
        docker_runner.close()


def containers_of(engine: docker.DockerClient, run_id: str) -> list[Container]:
    """The run's containers as the list shows them (sparse: no inspect that could race a
    removal)."""
    return engine.containers.list(all=True, sparse=True,
                                  filters={"label": f"{LABEL_RUN_ID}={run_id}"})


async def running_container(
    engine: docker.DockerClient, run_id: str, task: asyncio.Task[Outcome]
) -> Container:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if task.done():
            raise AssertionError(f"the run ended before its container was seen running: "
                                 f"{task.result()}")
        found = await asyncio.to_thread(containers_of, engine, run_id)
        if found and found[0].status == "running":
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no running container for {run_id}")


# --- output, exit codes, env -------------------------------------------------------------


def test_output_and_exit_zero_succeed_and_the_container_is_removed(
    engine: docker.DockerClient, image: str
) -> None:
    context = ctx()
    outcome = run(sh("echo hello from $ONEOFF_JOB"), context)

    assert outcome == Outcome(OutcomeStatus.SUCCEEDED, exit_code=0,
                              output="hello from nightly-report\n")
    assert containers_of(engine, context.run_id) == []


def test_exit_code_3_fails_with_the_code(image: str) -> None:
    outcome = run(sh("echo partial; exit 3"))

    assert outcome.status is OutcomeStatus.FAILED
    assert (outcome.exit_code, outcome.output, outcome.error) == (3, "partial\n", "exit code 3")


def test_success_exit_codes_make_3_a_success(image: str) -> None:
    outcome = run(sh("exit 3", successExitCodes=[0, 3]))

    assert (outcome.status, outcome.exit_code) == (OutcomeStatus.SUCCEEDED, 3)


def test_stdout_and_stderr_are_both_captured_in_order(image: str) -> None:
    outcome = run(sh("echo out; sleep 0.2; echo err >&2; sleep 0.2; echo out again"))

    assert outcome.output == "out\nerr\nout again\n"


def test_args_go_to_the_image_entrypoint(image: str) -> None:
    outcome = run(block(command=["echo"], args=["two  spaces", "kept"]))

    assert outcome.output == "two  spaces kept\n"


def test_env_has_job_env_block_env_value_from_and_run_identity(image: str) -> None:
    context = ctx(env={"FROM_JOB": "job-level", "SHARED": "job"})
    executor = sh("env | sort", env={
        "FROM_BLOCK": "block-level", "SHARED": "block",
        "TOKEN": {"valueFrom": {"env": "SERVER_TOKEN"}},
        "ONEOFF_RUN_ID": "an-impostor",
    })
    server_env = {**os.environ, "SERVER_TOKEN": "s3cret", "SERVER_ONLY_SECRET": "must-not-leak"}

    outcome = run(executor, context, environ=server_env)

    variables = dict(line.split("=", 1) for line in outcome.output.splitlines())
    assert variables["FROM_JOB"] == "job-level"
    assert variables["FROM_BLOCK"] == "block-level"
    assert variables["SHARED"] == "block"  # the block is more specific than the job
    assert variables["TOKEN"] == "s3cret"
    assert {name: variables[name] for name in context.identity_env()} == context.identity_env()
    assert variables["ONEOFF_RUN_ID"] == context.run_id  # identity cannot be overridden
    assert variables["ONEOFF_ATTEMPT"] == "2"
    assert variables["ONEOFF_SCHEDULED_AT"] == "2030-01-01T00:00:00Z"
    assert "SERVER_ONLY_SECRET" not in variables  # the server's env stays outside


def test_missing_value_from_source_fails_before_any_container(
    engine: docker.DockerClient, image: str
) -> None:
    context = ctx()
    outcome = run(sh("true", env={"TOKEN": {"valueFrom": {"env": "NOT_SET_ANYWHERE"}}}),
                  context, environ={"DOCKER_HOST": os.environ.get("DOCKER_HOST", "")})

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error == ("env TOKEN: valueFrom.env NOT_SET_ANYWHERE is not set in the "
                             "OneOff server's environment")
    assert containers_of(engine, context.run_id) == []


def test_working_dir_and_user_are_applied(image: str) -> None:
    outcome = run(sh("pwd; id -u; id -g", workingDir="/tmp", user="1234:4321"))

    assert outcome.output == "/tmp\n1234\n4321\n"


def test_output_beyond_the_cap_is_truncated_with_the_mark(image: str) -> None:
    outcome = run(sh("yes 0123456789 | head -c 200000; echo; echo done"), ctx(output_limit=1000))

    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.truncated
    assert outcome.output == "0123456789\n" * 90 + "0123456789"[:10] + TRUNCATION_MARK.format(
        limit=1000)


def test_output_reaches_on_output_on_the_loop_while_the_container_runs(image: str) -> None:
    seen: list[tuple[float, bytes, bool]] = []

    def on_output(piece: bytes) -> None:
        seen.append((time.monotonic(), piece, threading.current_thread() is main_thread))

    main_thread = threading.current_thread()

    async def main() -> tuple[Outcome, float]:
        runner = DockerRunner()
        outcome = await runner.run(sh("echo first; sleep 1; echo second"),
                                   ctx(on_output=on_output))
        runner.close()
        return outcome, time.monotonic()

    outcome, ended = asyncio.run(main())

    assert b"".join(piece for _, piece, _ in seen).decode() == outcome.output == "first\nsecond\n"
    assert seen[0][0] < ended - 0.5  # the first line came while the container still ran
    assert all(on_loop for _, _, on_loop in seen)


def test_labels_name_and_limits_are_on_the_running_container(
    engine: docker.DockerClient, image: str
) -> None:
    context = ctx()
    executor = sh("sleep 30", network="none", resources={"cpus": 0.5, "memory": "64Mi"})

    async def main() -> dict[str, Any]:
        runner = DockerRunner()
        task = asyncio.create_task(runner.run(executor, context))
        container = await running_container(engine, context.run_id, task)
        await asyncio.to_thread(container.reload)  # the full inspect
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        runner.close()
        return container.attrs

    attrs = asyncio.run(main())

    assert attrs["Config"]["Labels"] == {
        LABEL_RUN_ID: context.run_id, LABEL_JOB: "nightly-report", LABEL_NAMESPACE: "ops",
        LABEL_ATTEMPT: "2"}
    assert attrs["Name"] == f"/oneoff-nightly-report-{context.run_id}-2"
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["Memory"] == 64 * 1024 * 1024
    assert attrs["HostConfig"]["NetworkMode"] == "none"


def test_a_container_over_its_memory_limit_fails_saying_so(image: str) -> None:
    # Only PID 1 grows (shell builtins, no child the kernel could pick instead).
    outcome = run(sh('x=a; while true; do x="$x$x"; done', resources={"memory": "8Mi"}))

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.exit_code == 137
    assert outcome.error == "exit code 137: killed for running out of memory (limit 8Mi)"


# --- timeout and cancel ------------------------------------------------------------------


def test_timeout_stops_and_removes_the_container(engine: docker.DockerClient, image: str) -> None:
    context = ctx(timeout=1.0)
    started = time.monotonic()
    outcome = run(sh("echo started; sleep 30"), context)
    elapsed = time.monotonic() - started

    assert outcome.status is OutcomeStatus.TIMED_OUT
    assert (outcome.output, outcome.error) == ("started\n", "timed out after 1s")
    assert 1.0 <= elapsed < 10  # sh as PID 1 ignores SIGTERM: killed after the grace
    assert containers_of(engine, context.run_id) == []


def test_timeout_sends_sigterm_first_and_a_job_can_clean_up(image: str) -> None:
    script = ("trap 'echo got TERM, cleaning up; exit 0' TERM; echo ready; "
              "while true; do sleep 0.1; done")
    outcome = run(sh(script), ctx(timeout=1.0, kill_grace=10))

    assert outcome.status is OutcomeStatus.TIMED_OUT
    assert outcome.output == "ready\ngot TERM, cleaning up\n"


def test_cancel_mid_run_raises_cancelled_with_output_and_leaves_no_container(
    engine: docker.DockerClient, image: str
) -> None:
    context = ctx()

    async def main() -> tuple[Outcome, float]:
        runner = DockerRunner()
        task = asyncio.create_task(runner.run(sh("echo started; sleep 60"), context))
        await running_container(engine, context.run_id, task)
        await asyncio.sleep(0.3)  # let the first line reach the output stream
        started = time.monotonic()
        task.cancel()
        with pytest.raises(Cancelled) as raised:
            await task
        runner.close()
        return raised.value.outcome, time.monotonic() - started

    partial, elapsed = asyncio.run(main())

    assert partial.output == "started\n"
    assert elapsed < 0.5 + 5  # the grace, then SIGKILL
    assert containers_of(engine, context.run_id) == []


# --- images and pull policies ----------------------------------------------------------


def test_pull_policy_never_with_a_missing_image_fails_without_pulling(image: str) -> None:
    missing = f"{REFUSING_REGISTRY}/nothing:latest"
    outcome = run(block(image=missing, command=["true"], pullPolicy="Never"))

    assert outcome.status is OutcomeStatus.FAILED
    # Not a pull error: nothing tried the registry.
    assert outcome.error == (f"image {missing} is not on the Docker engine and pullPolicy is "
                             "Never: load or build it there first")


def test_if_not_present_uses_a_local_image_without_pulling(image: str) -> None:
    # No registry is reachable here: a pull of any kind would fail the run.
    outcome = run(block(command=["echo", "local"], pullPolicy="IfNotPresent"))

    assert (outcome.status, outcome.output) == (OutcomeStatus.SUCCEEDED, "local\n")


def test_if_not_present_pulls_a_missing_image_and_a_failed_pull_is_one_line(image: str) -> None:
    missing = f"{REFUSING_REGISTRY}/nothing:latest"
    outcome = run(block(image=missing, command=["true"], pullPolicy="IfNotPresent"))

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error.startswith(f"cannot pull image {missing}: ")
    assert "connection refused" in outcome.error and "\n" not in outcome.error


def test_always_pulls_even_an_image_that_is_present(
    engine: docker.DockerClient, image: str
) -> None:
    present = f"{REFUSING_REGISTRY}/oneoff-test/present:1"
    engine.images.get(image).tag(present)
    try:
        if_not_present = run(block(image=present, command=["true"], pullPolicy="IfNotPresent"))
        always = run(block(image=present, command=["true"], pullPolicy="Always"))
    finally:
        engine.images.remove(present)

    assert if_not_present.status is OutcomeStatus.SUCCEEDED
    assert always.status is OutcomeStatus.FAILED
    assert always.error.startswith(f"cannot pull image {present}: ")


# --- errors a user can act on ------------------------------------------------------------


@pytest.mark.parametrize(("spec", "error"), [
    ({"user": "nobody-here"},
     "cannot start the container: unable to find user nobody-here: no matching entries in "
     "passwd file"),
    ({"network": "no-such-network"},
     "cannot start the container: network no-such-network not found"),
    ({"command": ["/no/such/program"]},
     'cannot start the container: exec: "/no/such/program": stat /no/such/program: no such file '
     "or directory"),
    ({"workingDir": "relative"},
     "cannot create the container: the working directory 'relative' is invalid, it needs to be "
     "an absolute path"),
    ({"resources": {"memory": "1k"}}, "cannot create the container: Minimum memory limit allowed "
     "is 6MB"),
    ({"image": "Not A Reference"},
     "image Not A Reference: no such image: Not A Reference: invalid reference format: "
     "repository name must be lowercase"),
], ids=["user", "network", "executable", "working-dir", "memory", "image-reference"])
def test_invalid_options_are_a_failed_run_with_one_line(
    engine: docker.DockerClient, image: str, spec: dict[str, Any], error: str
) -> None:
    context = ctx()
    outcome = run(block(**{"command": ["true"], **spec}), context)

    assert outcome == Outcome(OutcomeStatus.FAILED, error=error)
    assert containers_of(engine, context.run_id) == []


def test_too_many_cpus_are_a_failed_run_naming_the_limit(image: str) -> None:
    outcome = run(block(command=["true"], resources={"cpus": 4096}))

    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error.startswith("cannot create the container: Range of CPUs is from")


@pytest.mark.parametrize("configured", ["setting", "DOCKER_HOST"])
def test_engine_down_is_a_failed_run_naming_the_engine(tmp_path: Path, configured: str) -> None:
    missing = f"unix://{tmp_path}/no-engine.sock"
    runner = ({"host": missing} if configured == "setting"
              else {"environ": {"DOCKER_HOST": missing}})
    started = time.monotonic()
    outcome = run(block(command=["true"]), **runner)

    assert outcome == Outcome(OutcomeStatus.FAILED, error=(
        f"cannot reach the Docker engine at {missing}: No such file or directory"))
    assert time.monotonic() - started < 5


# --- concurrency -------------------------------------------------------------------------


@pytest.mark.slow
def test_twenty_containers_at_once_run_side_by_side(
    engine: docker.DockerClient, image: str
) -> None:
    contexts = [ctx(job=f"fan-out-{i}") for i in range(20)]

    async def main() -> tuple[list[Outcome], float]:
        runner = DockerRunner()
        started = time.monotonic()
        outcomes = await asyncio.gather(*(
            runner.run(sh("sleep 2; echo $ONEOFF_JOB"), context) for context in contexts))
        elapsed = time.monotonic() - started
        runner.close()
        return list(outcomes), elapsed

    outcomes, elapsed = asyncio.run(main())

    assert [o.output for o in outcomes] == [f"fan-out-{i}\n" for i in range(20)]
    assert all(o.status is OutcomeStatus.SUCCEEDED for o in outcomes)
    assert elapsed < 20 * 2 / 2  # one after another would take 40 s
    assert [containers_of(engine, context.run_id) for context in contexts] == [[]] * 20


def test_a_long_container_run_does_not_stall_the_event_loop(image: str) -> None:
    async def main() -> tuple[Outcome, list[float]]:
        runner = DockerRunner()
        ticks: list[float] = []
        task = asyncio.create_task(runner.run(sh("sleep 2; echo done"), ctx()))
        while not task.done():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)
        runner.close()
        return await task, ticks

    outcome, ticks = asyncio.run(main())

    assert outcome.output == "done\n"
    gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
    assert max(gaps) < 0.5  # waiting on the loop for the exit would stall it for 2 s
    assert len(ticks) > 2.0 / 0.01 / 4


# --- crash recovery ----------------------------------------------------------------------


def test_containers_of_lost_runs_are_removed_and_others_kept(
    engine: docker.DockerClient, image: str
) -> None:
    lost, other = f"lost-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    for run_id in (lost, other):
        engine.containers.run(image, ["sleep", "300"], detach=True, name=f"oneoff-x-{run_id}",
                              labels={LABEL_RUN_ID: run_id})
    try:
        runner = DockerRunner()
        removed = asyncio.run(runner.remove_containers_of_runs([lost, "never-ran-here"]))
        runner.close()

        assert removed == {f"oneoff-x-{lost}": lost}
        assert containers_of(engine, lost) == []
        assert [c.status for c in containers_of(engine, other)] == ["running"]
    finally:
        for container in containers_of(engine, other):
            container.remove(force=True)


def test_no_lost_runs_means_no_connection_to_the_engine(tmp_path: Path) -> None:
    runner = DockerRunner(host=f"unix://{tmp_path}/no-engine.sock")
    assert asyncio.run(runner.remove_containers_of_runs([])) == {}
    assert asyncio.run(runner.remove_containers_of_runs(["lost-1"])) == {}  # logged, not raised
    runner.close()


# --- pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1048576", 1048576), ("512b", 512), ("1k", 1024), ("256m", 256 * 1024**2),
    ("512Mi", 512 * 1024**2), ("1.5g", 1536 * 1024**2), ("2Gi", 2 * 1024**3),
])
def test_memory_sizes_are_powers_of_1024(text: str, expected: int) -> None:
    assert memory_bytes(text) == expected


def test_container_name_says_job_run_and_attempt() -> None:
    assert container_name(ctx(run_id="0190abcd", attempt=3)) == "oneoff-nightly-report-0190abcd-3"


# --- end to end through oneoff serve -----------------------------------------------------


def job_manifest(name: str, docker_block: str, extra: str = "") -> str:
    return (f"apiVersion: oneoff.dev/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
            f"spec:\n  schedule: {{at: now}}\n{extra}  docker:\n{docker_block}")


def executions(server: Server) -> dict[str, dict[str, Any]]:
    """The newest execution of each job."""
    result = server.oneoff("get", "executions", "-A", "-o", "json", "--server", server.url)
    assert result.returncode == 0, result.stderr
    newest: dict[str, dict[str, Any]] = {}
    for item in json.loads(result.stdout)["items"]:
        newest.setdefault(item["spec"]["job"], item)
    return newest


def logs(server: Server, job: str) -> str:
    return server.oneoff("logs", job, "--server", server.url).stdout


def phase(server: Server, job: str) -> str | None:
    run_ = executions(server).get(job)
    return run_["status"]["phase"] if run_ else None


def test_docker_job_from_jobs_d_runs_and_oneoff_logs_shows_its_output(
    tmp_path: Path, serve: Callable[..., Server], engine: docker.DockerClient, image: str
) -> None:
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    (jobs / "report.yaml").write_text(job_manifest("report", (
        f"    image: {image}\n    pullPolicy: Never\n"
        "    command:\n    - sh\n    - -c\n"
        "    - echo \"report for $ONEOFF_JOB\"; sleep 0.2; echo warning >&2; exit 4\n")))
    (jobs / "ok.yaml").write_text(job_manifest("ok", (
        f"    image: {image}\n    command: [echo, fine]\n")))
    server = serve()

    wait_until(lambda: phase(server, "report") == "failed" and phase(server, "ok") == "succeeded",
               timeout=30)
    report = executions(server)["report"]
    assert report["status"]["exitCode"] == 4
    assert report["status"]["error"] == "exit code 4"
    assert logs(server, "report") == "report for report\nwarning\n"
    assert logs(server, "ok") == "fine\n"
    assert containers_of(engine, report["metadata"]["name"]) == []


def test_server_without_an_engine_starts_and_fails_docker_runs_clearly(
    tmp_path: Path, serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = f"unix://{tmp_path}/no-engine.sock"
    monkeypatch.setenv("ONEOFF_DOCKER_HOST", missing)
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    (jobs / "report.yaml").write_text(job_manifest("report", (
        f"    image: {IMAGE}\n    command: [echo, never]\n")))
    server = serve()

    wait_until(lambda: phase(server, "report") == "failed", timeout=30)
    assert executions(server)["report"]["status"]["error"] == (
        f"cannot reach the Docker engine at {missing}: No such file or directory")


def test_oneoff_cancel_of_a_long_container_run_leaves_no_container(
    tmp_path: Path, serve: Callable[..., Server], engine: docker.DockerClient, image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ONEOFF_KILL_GRACE_SECONDS", "0.5")
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    (jobs / "long.yaml").write_text(job_manifest("long", (
        f"    image: {image}\n    command: [sh, -c, 'echo started; sleep 300']\n")))
    server = serve()
    wait_until(lambda: phase(server, "long") == "running", timeout=20)
    run_id = executions(server)["long"]["metadata"]["name"]
    wait_until(lambda: [c.status for c in containers_of(engine, run_id)] == ["running"],
               timeout=10)
    time.sleep(0.3)  # let the first line reach the output stream

    cancelled = server.oneoff("cancel", run_id, "--server", server.url)

    assert cancelled.returncode == 0, cancelled.stderr
    wait_until(lambda: phase(server, "long") == "cancelled", timeout=15)
    assert containers_of(engine, run_id) == []  # docker ps -a: nothing left
    assert logs(server, "long") == "started\n"


@pytest.mark.slow
def test_kill_9_then_restart_removes_the_lost_runs_container(
    tmp_path: Path, serve: Callable[..., Server], engine: docker.DockerClient, image: str
) -> None:
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    (jobs / "long.yaml").write_text(job_manifest("long", (
        f"    image: {image}\n    command: [sh, -c, 'echo started; sleep 300']\n")))
    server = serve()
    wait_until(lambda: phase(server, "long") == "running", timeout=20)
    run_id = executions(server)["long"]["metadata"]["name"]
    wait_until(lambda: containers_of(engine, run_id), timeout=10)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    assert [c.status for c in containers_of(engine, run_id)] == ["running"]  # orphaned

    restarted = serve()

    assert phase(restarted, "long") == "lost"
    assert containers_of(engine, run_id) == []
    assert restarted.logged(lambda line: line.get("action") == "recover"
                            and line.get("run_id") == run_id
                            and "removed container" in line.get("message", ""))
