"""Reconcile benchmark: the DESIGN.md §8 reconcile targets, measured on a generated tree.

Run as ``.venv/bin/python bench/reconcile.py`` (``--help`` for sizes). It writes a tree of
realistic Job manifests (default 1,000 files of 10 documents: http and shell executors,
``at`` / ``after`` / ``cron`` schedules, labels, annotations, retry blocks) under a temp
directory, then measures, each a few times (median and min reported):

- ``cold``: :meth:`Reconciler.reconcile` of the whole tree into a fresh state file;
- ``warm``: the same tree again with the same Reconciler (content-hash cache warm);
- ``restart``: the same tree with a new Store, DirectorySource and Reconciler against the
  populated state file (cache cold, as after a restart);
- ``edit``: ``reconcile`` after one file changed (one URL);
- ``watch``: save-to-stored latency through the real watcher (:meth:`Reconciler.run` in
  its own thread and event loop), seen by polling a separate read-only SQLite connection;

plus a per-phase breakdown (``loader.load_paths``, ``Store.objects``, ``check_references``
with ``Reconciler.plan``, ``Reconciler.apply``), the peak RSS of this process and the RSS
of a fresh process that does one cold reconcile. Nothing
here is asserted: it prints a table (or ``--json``); ``--profile SCENARIO`` adds a cProfile
of one more run of that scenario. Everything is written under a temp dir and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import multiprocessing
import os
import platform
import pstats
import random
import re
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oneoff.loader import check_references, load_paths
from oneoff.plan import Action, Plan
from oneoff.reconciler import DirectorySource, Reconciler, Report
from oneoff.store import Store

TARGETS = {"cold": 3.0, "warm": 0.3, "edit": 0.1, "watch": 0.5}
"""Seconds, from DESIGN.md §8 (``watch``: the issue's save-to-stored target)."""

SCENARIOS = ("cold", "warm", "restart", "edit")
RESYNC_SECONDS = 3600.0  # no periodic resync inside a measurement

# --- the generated tree --------------------------------------------------------------

NAMESPACES = ("default", "billing", "platform", "data", "ops")
TEAMS = ("billing", "platform", "data", "growth", "search", "infra")
APPS = ("api", "web", "worker", "reports", "etl", "auth", "search")
ENVS = ("prod", "staging", "dev")
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")
CRONS = ("0 3 * * *", "*/15 * * * *", "30 6 * * 1-5", "0 0 1 * *", "5 4 * * sun")
AFTERS = ("30s", "5m", "15m", "1h30m", "2h", "1d")
URL_LINE = re.compile(r"^(    url: )(\S+?)(\?edit=\d+)?$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class TreeFile:
    """One generated file; its first document is always an http Job (the one edits touch)."""

    path: Path
    namespace: str
    name: str


def _schedule(rng: random.Random) -> list[str]:
    pick = rng.random()
    if pick < 0.4:
        month, day, hour = rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23)
        offset = rng.choice(("Z", "+01:00", "-05:00"))
        stamp = f"2027-{month:02d}-{day:02d}T{hour:02d}:{rng.choice((0, 15, 30)):02d}:00{offset}"
        return ["  schedule:", f'    at: "{stamp}"' if rng.random() < 0.5 else f"    at: {stamp}"]
    if pick < 0.75:
        return ["  schedule:", f"    after: {rng.choice(AFTERS)}"]
    lines = ["  schedule:", f'    cron: "{rng.choice(CRONS)}"']
    zone = rng.choice(ZONES)
    return [*lines, f"    timeZone: {zone}"] if zone != "UTC" else lines


def _policies(rng: random.Random) -> list[str]:
    lines: list[str] = []
    if rng.random() < 0.5:
        lines.append(f"  timeoutSeconds: {rng.choice((10, 30, 60, 300))}")
    if rng.random() < 0.35:
        limit, backoff = rng.randint(1, 5), rng.choice((5, 10, 30))
        lines.append(f"  retry: {{limit: {limit}, backoffSeconds: {backoff}, factor: 2}}")
    elif rng.random() < 0.5:
        lines += [
            "  retry:",
            f"    limit: {rng.randint(1, 8)}",
            f"    backoffSeconds: {rng.choice((1, 5, 20))}",
            "    factor: 3",
            f"    maxBackoffSeconds: {rng.choice((60, 120, 600))}",
            f"    jitter: {rng.choice(('true', 'false'))}",
        ]
    if rng.random() < 0.2:
        lines.append(f"  priority: {rng.randint(1, 10)}")
    if rng.random() < 0.2:
        lines += ["  idempotent: true", "  overlapPolicy: BufferOne"]
    return lines


def _http(rng: random.Random, index: int, app: str) -> list[str]:
    method = rng.choice(("GET", "POST", "POST", "PUT"))
    lines = [
        "  http:",
        f"    method: {method}",
        f"    url: https://{app}.example.com/v1/jobs/{index}/run",
    ]
    if rng.random() < 0.6:
        lines += [
            "    headers:",
            "      Authorization:",
            "        valueFrom: {env: API_TOKEN}",
            "      X-Request-Source: oneoff",
        ]
    if method != "GET" and rng.random() < 0.6:
        lines.append(f"    json: {{id: {index}, reason: scheduled, dryRun: false}}")
    if rng.random() < 0.4:
        lines.append("    successStatus: [200, 202, 204]")
    return lines


def _shell(rng: random.Random, index: int, app: str) -> list[str]:
    if rng.random() < 0.5:
        lines = [
            "  shell:",
            "    script: |",
            "      set -eu",
            f'      echo "cleaning up {app} #{index}"',
            f"      find /var/log/{app} -name '*.gz' -mtime +7 -delete",
        ]
    else:
        lines = [
            "  shell:",
            f'    command: [python, -m, tasks.{app}, --id, "{index}"]',
            f"    workingDir: /srv/{app}",
        ]
    if rng.random() < 0.5:
        lines += ["    env:", "      LOG_LEVEL: info", "      DATABASE_URL:"]
        lines += ["        valueFrom: {file: /run/secrets/database-url}"]
    return lines


def job_document(rng: random.Random, index: int, http: bool) -> tuple[str, str, str]:
    """One Job manifest as YAML text, with its namespace and name."""
    namespace, team, app = rng.choice(NAMESPACES), rng.choice(TEAMS), rng.choice(APPS)
    name = f"{team}-{app}-{index:05d}"
    lines = [
        "apiVersion: oneoff.dev/v1",
        "kind: Job",
        "metadata:",
        f"  name: {name}",
        f"  namespace: {namespace}",
        f"  labels: {{team: {team}, app: {app}, env: {rng.choice(ENVS)}}}",
    ]
    if rng.random() < 0.3:
        lines += [
            "  annotations:",
            f"    owner: {team}@example.com",
            f'    ticket: "OPS-{rng.randint(100, 9999)}"',
        ]
    lines += ["spec:", *_schedule(rng), *_policies(rng)]
    lines += _http(rng, index, app) if http else _shell(rng, index, app)
    return "\n".join(lines) + "\n", namespace, name


def write_tree(root: Path, files: int, per_file: int, seed: int = 1) -> list[TreeFile]:
    """Write ``files`` manifest files of ``per_file`` Jobs each, in 10 subdirectories."""
    rng = random.Random(seed)
    tree: list[TreeFile] = []
    for number in range(files):
        documents: list[str] = []
        first: tuple[str, str] = ("", "")
        for slot in range(per_file):
            index = number * per_file + slot
            text, namespace, name = job_document(rng, index, http=slot == 0 or rng.random() < 0.6)
            documents.append(text)
            if slot == 0:
                first = (namespace, name)
        path = root / f"team-{number % 10:02d}" / f"jobs-{number:04d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# generated by bench/reconcile.py: file {number}, {per_file} jobs\n"
        path.write_text(header + "---\n".join(documents), encoding="utf-8")
        tree.append(TreeFile(path, *first))
    return tree


def edit_url(file: TreeFile, edit: int, *, atomic: bool) -> str:
    """Change the URL of the file's first job; returns the new URL.

    ``atomic`` writes a dot-file beside it and renames it over (as many editors save),
    so a watcher never reads a half-written file.
    """
    text = file.path.read_text(encoding="utf-8")
    match = URL_LINE.search(text)
    assert match is not None, f"no url line in {file.path}"
    url = f"{match.group(2)}?edit={edit}"
    text = text[: match.start()] + match.group(1) + url + text[match.end() :]
    if atomic:
        temp = file.path.with_name(f".{file.path.name}.tmp")
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, file.path)
    else:
        file.path.write_text(text, encoding="utf-8")
    return url


# --- measuring -----------------------------------------------------------------------


@dataclass(slots=True)
class Measurement:
    """Samples (seconds) of one scenario, with its target if it has one."""

    name: str
    what: str
    samples: list[float]
    target: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def status(self) -> str:
        if self.target is None:
            return "-"
        return "ok" if self.median <= self.target else "MISSED"

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "median": self.median,
            "min": min(self.samples),
            "max": max(self.samples),
            "status": self.status,
        }


@dataclass(slots=True)
class Bench:
    """The generated tree, the state files and everything measured so far."""

    base: Path
    tree: list[TreeFile]
    objects: int
    repeat: int
    results: list[Measurement] = field(default_factory=list)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    """Peak RSS (MB) of this process at points of the run (it only grows)."""
    probe_mb: dict[str, float] = field(default_factory=dict)
    """RSS (MB) of a fresh process doing one cold reconcile: see :func:`rss_probe`."""
    edits: int = 0

    @property
    def root(self) -> str:
        return str(self.base / "tree")

    def state(self, label: str) -> str:
        return str(self.base / f"{label}.db")

    def next_edit(self) -> tuple[TreeFile, int]:
        """A different file each time, spread over the tree."""
        self.edits += 1
        return self.tree[(self.edits * 7919) % len(self.tree)], self.edits

    def note_rss(self, label: str) -> None:
        self.rss_mb[label] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reconciler(store: Store, source: DirectorySource, **kwargs: Any) -> Reconciler:
    return Reconciler(store, [source], prune_max_share=0.5, resync_seconds=RESYNC_SECONDS, **kwargs)


def timed(rec: Reconciler, source: DirectorySource, full: bool = True) -> tuple[float, Report]:
    """Wall time of one ``rec.reconcile(source)``; ``full=False`` is the watcher's pass."""
    started = time.perf_counter()
    report = rec.reconcile(source, full=full)
    return time.perf_counter() - started, report


def expect(report: Report | Plan, action: Action, count: int) -> None:
    """Fail loudly if a run did not do what the scenario is about (a benchmark of errors)."""
    the_plan = report.plan if isinstance(report, Report) else report
    issues = report.issues
    if the_plan is None or issues or the_plan.counts.get(action, 0) != count:
        summary = the_plan.summary() if the_plan else "no plan"
        problems = "; ".join(str(issue) for issue in issues[:3])
        raise SystemExit(f"unexpected reconcile: {summary}; expected {count} {action}; {problems}")


def phased(rec: Reconciler, source: DirectorySource) -> tuple[dict[str, float], Plan]:
    """One reconcile, done step by step as ``Reconciler.reconcile`` does, each step timed."""
    marks = [time.perf_counter()]
    result = load_paths([source.root], source.cache, rec.max_file_bytes)
    marks.append(time.perf_counter())
    stored = rec.store.objects()
    marks.append(time.perf_counter())
    check_references(result, (obj.key for obj in stored if obj.source != source.name))
    the_plan = rec.plan(source.name, result, stored)
    marks.append(time.perf_counter())
    rec.apply(the_plan, list(the_plan.issues))
    marks.append(time.perf_counter())
    names = ("load_paths", "store.objects", "plan", "apply")
    return {name: marks[i + 1] - marks[i] for i, name in enumerate(names)}, the_plan


def median_phases(samples: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(s[name] for s in samples) for name in samples[0]}


def bench_cold(bench: Bench) -> None:
    times: list[float] = []
    for rep in range(bench.repeat):
        with Store(bench.state(f"cold-{rep}")) as store:
            source = DirectorySource(bench.root)
            seconds, report = timed(reconciler(store, source), source)
            expect(report, Action.CREATE, bench.objects)
            times.append(seconds)
    bench.note_rss("after cold")
    phases: list[dict[str, float]] = []
    for rep in range(bench.repeat):
        with Store(bench.state(f"cold-phased-{rep}")) as store:
            source = DirectorySource(bench.root)
            split, the_plan = phased(reconciler(store, source), source)
            expect(the_plan, Action.CREATE, bench.objects)
            phases.append(split)
    bench.phases["cold"] = median_phases(phases)
    bench.results.append(
        Measurement("cold", "reconcile into a fresh state file", times, TARGETS["cold"])
    )


def bench_warm_and_edit(bench: Bench) -> None:
    """Unchanged tree and one edited file, with the Reconciler of a cold run (cache warm)."""
    with Store(bench.state("cold-0")) as store:
        source = DirectorySource(bench.root)
        rec = reconciler(store, source)
        expect(rec.reconcile(source), Action.UNCHANGED, bench.objects)  # fills the cache
        warm: list[float] = []
        for _ in range(bench.repeat):
            seconds, report = timed(rec, source)
            expect(report, Action.UNCHANGED, bench.objects)
            warm.append(seconds)
        split = []
        for _ in range(bench.repeat):
            phases, the_plan = phased(rec, source)
            expect(the_plan, Action.UNCHANGED, bench.objects)
            split.append(phases)
        bench.phases["warm"] = median_phases(split)
        bench.results.append(
            Measurement("warm", "unchanged tree, same Reconciler", warm, TARGETS["warm"])
        )

        edit: list[float] = []
        split = []
        for _ in range(bench.repeat):
            edit_url(*bench.next_edit(), atomic=False)
            seconds, report = timed(rec, source, full=False)  # as after a watcher event
            expect(report, Action.UPDATE, 1)
            edit.append(seconds)
            edit_url(*bench.next_edit(), atomic=False)
            phases, the_plan = phased(rec, source)
            expect(the_plan, Action.UPDATE, 1)
            split.append(phases)
        bench.phases["edit"] = median_phases(split)
        bench.results.append(
            Measurement("edit", "one edited file, same Reconciler", edit, TARGETS["edit"])
        )


def bench_restart(bench: Bench) -> None:
    """Unchanged tree, new Store + DirectorySource + Reconciler each time (cache cold)."""
    times: list[float] = []
    split: list[dict[str, float]] = []
    for _ in range(bench.repeat):
        with Store(bench.state("cold-0")) as store:
            source = DirectorySource(bench.root)
            seconds, report = timed(reconciler(store, source), source)
            expect(report, Action.UNCHANGED, bench.objects)
            times.append(seconds)
        with Store(bench.state("cold-0")) as store:
            source = DirectorySource(bench.root)
            phases, the_plan = phased(reconciler(store, source), source)
            expect(the_plan, Action.UNCHANGED, bench.objects)
            split.append(phases)
    bench.phases["restart"] = median_phases(split)
    bench.results.append(
        Measurement("restart", "unchanged tree, new Reconciler (cache cold)", times, None)
    )


class Watcher:
    """``Reconciler.run`` in a thread of its own with its own event loop."""

    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec
        self.ready = threading.Event()
        self.reconciles: list[float] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="watcher", daemon=True)
        rec.on_applied = lambda report: self.reconciles.append(report.seconds)

    def __enter__(self) -> Watcher:
        self._thread.start()
        if not self.ready.wait(120):
            raise SystemExit("the watcher did not finish its first reconcile within 120 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        task = asyncio.create_task(self.rec.run(self._stop))
        await self.rec.synced.wait()
        self.ready.set()
        await task


def wait_for_url(db: sqlite3.Connection, file: TreeFile, url: str, timeout: float) -> bool:
    """Poll the state file every 5 ms until the job's URL is ``url``."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        row = db.execute(
            "SELECT spec FROM objects WHERE kind = 'Job' AND namespace = ? AND name = ?",
            (file.namespace, file.name),
        ).fetchone()
        if row is not None and json.loads(row[0])["http"]["url"] == url:
            return True
        time.sleep(0.005)
    return False


def bench_watch(bench: Bench, edits: int) -> None:
    """Save-to-stored latency through the watcher, seen from a separate read-only reader."""
    with Store(bench.state("cold-0")) as store:
        source = DirectorySource(bench.root)
        rec = reconciler(store, source)
        with (
            Watcher(rec) as watcher,
            contextlib.closing(
                sqlite3.connect(f"file:{bench.state('cold-0')}?mode=ro", uri=True)
            ) as db,
        ):
            latencies: list[float] = []
            for number in range(edits + 1):  # the first edit only proves the watch is live
                file, edit = bench.next_edit()
                time.sleep(0.3)  # let the previous pass (and any echo of it) settle
                del watcher.reconciles[:]
                started = time.perf_counter()
                url = edit_url(file, edit, atomic=True)
                if not wait_for_url(db, file, url, timeout=10):
                    raise SystemExit(f"edit of {file.path} not stored within 10 s")
                if number:
                    latencies.append(time.perf_counter() - started)
            passes = list(watcher.reconciles)
    bench.results.append(
        Measurement(
            "watch",
            "save → visible to a reader (watcher)",
            latencies,
            TARGETS["watch"],
            {"reconcile_seconds_last_edit": passes[-1] if passes else float("nan")},
        )
    )


def memory_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, in MB.

    The probe uses ``VmHWM`` rather than ``ru_maxrss``: Linux carries the latter over from
    the parent through fork and exec, so a child would report the benchmark's own peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_probe(root: str, state: str, objects: int) -> dict[str, float]:
    """Run in a fresh process: RSS before and after one cold reconcile, and its peak."""
    before = memory_mb("VmRSS")
    with Store(state) as store:
        source = DirectorySource(root)
        expect(reconciler(store, source).reconcile(source), Action.CREATE, objects)
        after = memory_mb("VmRSS")  # the source's content-hash cache is still held
    # VmHWM is sampled lazily and can trail VmRSS by a little
    return {"before": before, "after (cache held)": after, "peak": max(after, memory_mb("VmHWM"))}


def bench_rss(bench: Bench) -> None:
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        probe = pool.submit(rss_probe, bench.root, bench.state("rss"), bench.objects)
        bench.probe_mb = probe.result()


# --- profiling -------------------------------------------------------------------------


def profile(bench: Bench, scenario: str, top: int = 15) -> str:
    """cProfile of one more run of ``scenario``: the top functions by cumulative time."""
    profiler = cProfile.Profile()
    if scenario == "cold":
        with Store(bench.state("profile-cold")) as store:
            source = DirectorySource(bench.root)
            rec = reconciler(store, source)
            profiler.runcall(rec.reconcile, source)
    else:
        with Store(bench.state("cold-0")) as store:
            source = DirectorySource(bench.root)
            rec = reconciler(store, source)
            if scenario != "restart":
                rec.reconcile(source)  # warm the cache first
            if scenario == "edit":
                edit_url(*bench.next_edit(), atomic=False)
            profiler.runcall(rec.reconcile, source)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# --- output ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": model or platform.processor(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def print_table(bench: Bench, args: argparse.Namespace) -> None:
    info = machine()
    print(
        f"reconcile benchmark: {len(bench.tree)} files x {args.docs_per_file} Jobs = "
        f"{bench.objects} objects; repeat {bench.repeat}, {args.edits} watched edits"
    )
    print(f"{info['cpus']} CPUs, {info['cpu']}, Python {info['python']}, {info['date']}\n")
    header = f"{'scenario':<9} {'what':<44} {'median':>9} {'min':>9} {'max':>9} {'target':>9}"
    print(header + "  status")
    print("-" * (len(header) + 8))
    for m in bench.results:
        target = ms(m.target) if m.target is not None else "-"
        print(
            f"{m.name:<9} {m.what:<44} {ms(m.median):>9} {ms(min(m.samples)):>9} "
            f"{ms(max(m.samples)):>9} {target:>9}  {m.status}"
        )
    print("\nphases (median ms): load_paths, store.objects, plan (+check_references), apply")
    for scenario, split in bench.phases.items():
        parts = "  ".join(f"{name} {value * 1000:8.1f}" for name, value in split.items())
        print(f"  {scenario:<8} {parts}   sum {sum(split.values()) * 1000:8.1f}")
    rss = ", ".join(f"{label} {value:.0f} MB" for label, value in bench.rss_mb.items())
    probe = ", ".join(f"{label} {value:.0f} MB" for label, value in bench.probe_mb.items())
    print(f"\nRSS of a fresh process doing one cold reconcile: {probe}")
    print(f"peak RSS of this benchmark process: {rss}")


@contextlib.contextmanager
def workspace(parent: str | None) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="oneoff-bench-", dir=parent))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=1000, help="manifest files (1000)")
    parser.add_argument("--docs-per-file", type=int, default=10, help="Jobs per file (10)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per scenario (5)")
    parser.add_argument("--edits", type=int, default=10, help="watched edits (10)")
    parser.add_argument("--dir", help="parent of the temp dir (default: the system's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--profile",
        choices=SCENARIOS,
        action="append",
        default=[],
        help="also print a cProfile (top 15 cumulative) of one more run of a scenario",
    )
    args = parser.parse_args(argv)

    with workspace(args.dir) as base:
        started = time.perf_counter()
        tree = write_tree(base / "tree", args.files, args.docs_per_file)
        generated = time.perf_counter() - started
        bench = Bench(base, tree, args.files * args.docs_per_file, args.repeat)
        bench.note_rss("after writing the tree")
        bench_cold(bench)
        bench_warm_and_edit(bench)
        bench.note_rss("after warm+edit")
        bench_restart(bench)
        bench.note_rss("after restart")
        bench_watch(bench, args.edits)
        bench.note_rss("after watch")
        bench_rss(bench)
        profiles = {scenario: profile(bench, scenario) for scenario in args.profile}

    if args.json:
        out = {
            "machine": machine(),
            "params": {**vars(args), "objects": bench.objects, "tree_seconds": generated},
            "results": [m.to_dict() for m in bench.results],
            "phases": bench.phases,
            "peak_rss_mb": bench.rss_mb,
            "cold_process_rss_mb": bench.probe_mb,
            "profiles": profiles,
        }
        print(json.dumps(out, indent=2))
    else:
        print_table(bench, args)
        for scenario, text in profiles.items():
            print(f"\n--- cProfile of one '{scenario}' reconcile ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
