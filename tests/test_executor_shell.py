"""The shell executor against a real /bin/sh: output, exit codes, env, and that no process
of a job outlives its run (timeout, cancel, or background children left behind)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from oneoff.executors import TRUNCATION_MARK, Outcome, OutcomeStatus, RunContext
from oneoff.executors.shell import ShellRunner
from oneoff.manifests import ShellExecutor

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="process groups are inspected through /proc"
)

SERVER_ENV = {
    "PATH": os.environ.get("PATH", os.defpath),
    "HOME": "/home/oneoff",
    "LANG": "C.UTF-8",
    "SERVER_ONLY_SECRET": "must-not-leak",
    "DB_PASSWORD": "hunter2",
}


def ctx(**overrides: Any) -> RunContext:
    values: dict[str, Any] = {
        "run_id": "run-0001",
        "job": "nightly-backup",
        "namespace": "ops",
        "scheduled_at": datetime(2030, 1, 1, tzinfo=UTC),
        "attempt": 2,
        "kill_grace": 0.5,
    }
    return RunContext(**{**values, **overrides})


def shell(**spec: Any) -> ShellExecutor:
    return ShellExecutor.model_validate(spec)


def run(block: ShellExecutor, context: RunContext | None = None) -> Outcome:
    runner = ShellRunner(environ=SERVER_ENV)
    return asyncio.run(runner.run(block, context or ctx()))


def group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.add(int(entry.name))
    return members


def survivors(pgid: int, within: float = 2.0) -> set[int]:
    """Members of group ``pgid`` still alive ``within`` seconds from now, or none sooner.
    The group was sent SIGKILL already; the kernel finishes a killed process's exit a
    moment after its pipe closes, so a look at once can still see it on a busy machine."""
    deadline = time.monotonic() + within
    while (members := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return members


def started_group(pidfile: Path, size: int) -> int | None:
    """The job's process group id, once the job wrote it and has ``size`` processes."""
    text = pidfile.read_text().strip() if pidfile.exists() else ""
    if text and len(group_members(int(text))) >= size:
        return int(text)
    return None


async def wait_for_group(pidfile: Path, size: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        group = started_group(pidfile, size)
        if group is not None:
            return group
        await asyncio.sleep(0.02)
    raise AssertionError("the job did not start its processes")


def test_script_output_and_exit_zero_succeed() -> None:
    outcome = run(shell(script="echo hello; echo world"))
    assert outcome == Outcome(OutcomeStatus.SUCCEEDED, exit_code=0, output="hello\nworld\n")


def test_exit_code_3_fails_with_the_code() -> None:
    outcome = run(shell(script="echo partial; exit 3"))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.exit_code == 3
    assert outcome.error == "exit code 3"
    assert outcome.output == "partial\n"


def test_success_exit_codes_make_3_a_success() -> None:
    outcome = run(shell(script="exit 3", successExitCodes=[0, 3]))
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.exit_code == 3


def test_killed_by_a_signal_names_the_signal() -> None:
    outcome = run(shell(script="kill -KILL $$"))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error == "killed by signal SIGKILL"


def test_stdout_and_stderr_are_interleaved_in_order() -> None:
    outcome = run(shell(script="echo out1; echo err1 >&2; echo out2; echo err2 >&2"))
    assert outcome.output == "out1\nerr1\nout2\nerr2\n"


def test_env_has_run_identity_job_env_and_value_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    block = shell(
        script="env",
        env={
            "TOKEN": {"valueFrom": {"file": str(secret)}},
            "PASSWORD": {"valueFrom": {"env": "DB_PASSWORD"}},
            "GREETING": "hi there",
            "ONEOFF_RUN_ID": "spoofed",
        },
    )
    outcome = run(block, ctx(env={"FROM_JOB": "job-level", "GREETING": "overridden"}))
    env = dict(line.split("=", 1) for line in outcome.output.splitlines())
    assert env["ONEOFF_RUN_ID"] == "run-0001"
    assert env["ONEOFF_JOB"] == "nightly-backup"
    assert env["ONEOFF_NAMESPACE"] == "ops"
    assert env["ONEOFF_SCHEDULED_AT"] == "2030-01-01T00:00:00Z"
    assert env["ONEOFF_ATTEMPT"] == "2"
    assert env["FROM_JOB"] == "job-level"
    assert env["GREETING"] == "hi there"  # the block's env wins over the job's
    assert env["TOKEN"] == "s3cret"
    assert env["PASSWORD"] == "hunter2"
    assert env["HOME"] == "/home/oneoff"
    assert env["LANG"] == "C.UTF-8"
    assert "SERVER_ONLY_SECRET" not in env


def test_missing_value_from_source_fails_before_starting() -> None:
    block = shell(script="echo never", env={"TOKEN": {"valueFrom": {"env": "NOT_SET_ANYWHERE"}}})
    outcome = run(block)
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error.startswith("env TOKEN: valueFrom.env NOT_SET_ANYWHERE is not set")
    assert outcome.output == ""


def test_working_dir_is_used(tmp_path: Path) -> None:
    outcome = run(shell(script="pwd", workingDir=str(tmp_path)))
    assert outcome.output == f"{tmp_path}\n"


def test_missing_working_dir_fails_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    outcome = run(shell(script="pwd", workingDir=str(missing)))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error == f"working directory {missing}: No such file or directory"


def test_command_argv_is_not_split_on_spaces() -> None:
    outcome = run(shell(command=["printf", "[%s]", "two words", "$HOME", "*"]))
    assert outcome.output == "[two words][$HOME][*]"


def test_missing_executable_fails_with_one_line() -> None:
    outcome = run(shell(command=["oneoff-no-such-program", "--help"]))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error == "cannot run oneoff-no-such-program: No such file or directory"


def test_missing_shell_fails_with_one_line() -> None:
    outcome = run(shell(script="echo hi", shell="/opt/nowhere/bash"))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error == "cannot run /opt/nowhere/bash: No such file or directory"


def test_output_flood_is_truncated_at_the_cap_and_finishes_promptly() -> None:
    limit = 1024 * 1024
    started = time.monotonic()
    outcome = run(shell(script="yes | head -c 50000000; echo done >&2"), ctx(output_limit=limit))
    assert time.monotonic() - started < 10
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.truncated
    mark = TRUNCATION_MARK.format(limit=limit)
    assert outcome.output.endswith(mark)
    assert outcome.output[: -len(mark)] == "y\n" * (limit // 2)


def test_timeout_kills_a_sleeping_job() -> None:
    started = time.monotonic()
    outcome = run(shell(script="echo going to sleep; sleep 30"), ctx(timeout=0.5))
    elapsed = time.monotonic() - started
    assert outcome.status is OutcomeStatus.TIMED_OUT
    assert outcome.error == "timed out after 0.5s"
    assert outcome.output == "going to sleep\n"
    assert elapsed < 0.5 + 0.5 + 1.5


STUBBORN = "trap '' TERM; echo $$ > {pidfile}; sleep 300 & sleep 300 & echo started; wait"
"""Ignores SIGTERM (and so do its children, which inherit the disposition)."""


def test_timeout_kills_the_whole_group_even_when_it_ignores_sigterm(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    block = shell(script=STUBBORN.format(pidfile=pidfile))

    async def main() -> tuple[Outcome, set[int], float]:
        started = time.monotonic()
        task = asyncio.create_task(ShellRunner(environ=SERVER_ENV).run(block, ctx(timeout=1.0)))
        group = await wait_for_group(pidfile, 3)
        before = group_members(group)
        outcome = await task
        assert survivors(group) == set(), "a process of the job survived the timeout"
        return outcome, before, time.monotonic() - started

    outcome, before, elapsed = asyncio.run(main())
    assert len(before) == 3  # the shell and both sleeps were there to be killed
    assert outcome.status is OutcomeStatus.TIMED_OUT
    assert outcome.output == "started\n"
    assert elapsed < 1.0 + 0.5 + 1.5


def test_cancel_kills_the_whole_group_then_raises_cancelled(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    block = shell(script=STUBBORN.format(pidfile=pidfile))

    async def main() -> float:
        task = asyncio.create_task(ShellRunner(environ=SERVER_ENV).run(block, ctx()))
        group = await wait_for_group(pidfile, 3)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert survivors(group) == set(), "a process of the job survived the cancel"
        return time.monotonic() - cancelled_at

    assert asyncio.run(main()) < 0.5 + 1.5


def test_background_children_left_behind_are_killed_without_waiting(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    block = shell(script=f"echo $$ > {pidfile}; sleep 300 & echo done")
    started = time.monotonic()
    outcome = run(block)
    assert time.monotonic() - started < 3
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.output == "done\n"
    assert survivors(int(pidfile.read_text())) == set()


def test_a_process_that_left_the_group_cannot_hold_the_run_open(tmp_path: Path) -> None:
    # setsid escapes the process group (a documented limit); it keeps the output pipe
    # open, and the run must still return once the group itself is gone.
    pidfile = tmp_path / "escaped"
    escape = f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 300"
    block = shell(
        script=f"setsid sh -c '{escape}' & while [ ! -e {pidfile} ]; do sleep 0.01; done; echo done"
    )
    runner = ShellRunner(environ=SERVER_ENV, drain_timeout=0.3)
    started = time.monotonic()
    try:
        outcome = asyncio.run(runner.run(block, ctx()))
        assert time.monotonic() - started < 3
        escaped = int(pidfile.read_text())
        assert Path(f"/proc/{escaped}").exists()  # it really got away, holding the pipe
        assert outcome.status is OutcomeStatus.SUCCEEDED
        assert outcome.output == "done\n"
    finally:
        deadline = time.monotonic() + 5
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
