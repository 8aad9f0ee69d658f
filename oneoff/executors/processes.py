"""Finding the processes of a run after the server lost track of them.

Called by the daemon on start, for runs a crash left ``lost``: a server killed with
SIGKILL cannot stop the process groups of its shell jobs, and their processes live on.
Every shell job carries ``ONEOFF_RUN_ID`` in its environment (children inherit it), so
the processes of a run are found by reading ``/proc/<pid>/environ`` — exact, and safe
against pid reuse, unlike a remembered pid.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


def processes_of_runs(run_ids: Iterable[str], proc: str = "/proc") -> dict[int, str]:
    """pid → run id of every live process whose environment names one of ``run_ids``."""
    wanted = {f"ONEOFF_RUN_ID={run_id}".encode(): run_id for run_id in run_ids}
    found: dict[int, str] = {}
    if not wanted:
        return found
    own = os.getpid()
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            with open(os.path.join(entry.path, "environ"), "rb") as handle:
                variables = handle.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for variable in variables:
            run_id = wanted.get(variable)
            if run_id is not None:
                found[int(entry.name)] = run_id
                break
    return found


def kill_processes_of_runs(run_ids: Iterable[str]) -> dict[int, str]:
    """SIGKILL every process left over from ``run_ids``; returns what was killed."""
    killed = processes_of_runs(run_ids)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed
