"""The reconciler against a real directory, a real SQLite file and a real file watcher."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import Running, job_yaml, wait_until

from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.records import ObjectKey
from oneoff.store import Store

JOB = ObjectKey("Job", "default", "ping")


def test_a_saved_file_is_stored_well_under_a_second(running: Running) -> None:
    started = time.monotonic()
    (running.root / "ping.yaml").write_text(job_yaml("ping"))
    wait_until(lambda: running.store.get(JOB), timeout=5)
    assert time.monotonic() - started < 2  # generous: the machine is shared; bench/ measures


def test_an_edit_bumps_generation_and_a_label_change_does_not(running: Running) -> None:
    path = running.root / "ping.yaml"
    path.write_text(job_yaml("ping"))
    first = wait_until(lambda: running.store.get(JOB))
    assert first.generation == 1

    path.write_text(job_yaml("ping", url="https://example.com/other"))
    second = wait_until(lambda: (o := running.store.get(JOB)) and o.generation == 2 and o)
    assert second.spec["http"]["url"] == "https://example.com/other"
    assert second.uid == first.uid

    path.write_text(job_yaml("ping", url="https://example.com/other", labels="{team: ops}"))
    third = wait_until(lambda: (o := running.store.get(JOB)) and o.labels and o)
    assert third.labels == {"team": "ops"}
    assert third.generation == 2


def test_file_that_fails_to_parse_keeps_its_jobs(running: Running) -> None:
    path = running.root / "ping.yaml"
    path.write_text(job_yaml("ping"))
    stored = wait_until(lambda: running.store.get(JOB))

    path.write_text(job_yaml("ping", url="https://example.com/new") + "  bad: [\n")
    status = wait_until(lambda: (s := running.store.sources()) and not s[0].ok and s[0])

    assert running.store.get(JOB) == stored  # untouched: same generation, spec, status
    assert [issue.line for issue in status.issues] == [9], status.issues  # where libyaml stops
    assert "ping.yaml:9:1: YAML syntax" in str(status.issues[0])
    failures = [e for e in running.store.events() if e.type == "reconcile.failed"]
    assert len(failures) == 1


def test_a_valid_document_next_to_a_broken_one_is_applied(running: Running) -> None:
    (running.root / "a.yaml").write_text(
        job_yaml("ping") + "---\n" + job_yaml("pong").replace("http:", "htp:")
    )
    wait_until(lambda: running.store.get(JOB))
    status = wait_until(lambda: (s := running.store.sources()) and s[0])
    assert not status.ok
    assert [i.field for i in status.issues] == ["spec.htp"]
    assert running.names() == {"ping"}


def test_emptied_directory_is_refused_and_nothing_is_deleted(running: Running) -> None:
    for name in ("one", "two", "three"):
        (running.root / f"{name}.yaml").write_text(job_yaml(name))
    wait_until(lambda: running.names() == {"one", "two", "three"})

    for path in running.root.iterdir():
        path.unlink()
    status = wait_until(lambda: (s := running.store.sources()) and "refused" in s[0].message
                        and s[0])

    assert running.names() == {"one", "two", "three"}
    assert "would delete all 3" in status.message


def test_deleting_one_of_several_files_prunes_its_object(running: Running) -> None:
    for name in ("one", "two", "three"):
        (running.root / f"{name}.yaml").write_text(job_yaml(name))
    wait_until(lambda: running.names() == {"one", "two", "three"})

    (running.root / "two.yaml").unlink()

    wait_until(lambda: running.names() == {"one", "three"})
    assert [e.type for e in running.store.events()].count("object.deleted") == 1


def test_prune_disabled_annotation_keeps_the_object(running: Running) -> None:
    (running.root / "keep.yaml").write_text(
        job_yaml("keep", annotations="{oneoff.dev/prune: disabled}"))
    for name in ("one", "two", "three"):
        (running.root / f"{name}.yaml").write_text(job_yaml(name))
    wait_until(lambda: running.names() == {"keep", "one", "two", "three"})

    (running.root / "keep.yaml").unlink()
    time.sleep(0.5)
    running.reconciler.reconcile(running.reconciler.sources[0])

    assert "keep" in running.names()


def test_configmap_symlink_swap_is_seen(running: Running) -> None:
    """The kubelet's atomic writer: new timestamped dir, ``..data`` swapped by rename."""
    root = running.root
    (root / "..2026_01_01").mkdir()
    (root / "..2026_01_01" / "ping.yaml").write_text(job_yaml("ping"))
    os.symlink("..2026_01_01", root / "..data")
    os.symlink("..data/ping.yaml", root / "ping.yaml")
    wait_until(lambda: running.store.get(JOB))

    (root / "..2026_01_02").mkdir()
    (root / "..2026_01_02" / "ping.yaml").write_text(
        job_yaml("ping", url="https://example.com/swapped"))
    os.symlink("..2026_01_02", root / "..data_tmp")
    os.rename(root / "..data_tmp", root / "..data")
    for old in (root / "..2026_01_01").iterdir():
        old.unlink()
    (root / "..2026_01_01").rmdir()

    swapped = wait_until(lambda: (o := running.store.get(JOB)) and o.generation == 2 and o)
    assert swapped.spec["http"]["url"] == "https://example.com/swapped"
    assert running.names() == {"ping"}


def test_unchanged_tree_writes_no_object(tmp_path: Path) -> None:
    root = tmp_path / "jobs.d"
    root.mkdir()
    for index in range(20):
        (root / f"job-{index}.yaml").write_text(job_yaml(f"job-{index}"))
    with Store(str(tmp_path / "state.db")) as store:
        reconciler = Reconciler(store, [DirectorySource(str(root))])
        first = reconciler.reconcile(reconciler.sources[0])
        before = (store.objects(), store.events())

        again = reconciler.reconcile(reconciler.sources[0])

        assert first.plan is not None and len(first.plan.of(first.plan.changes[0].action)) == 20
        assert again.plan is not None and not again.plan.has_changes
        assert (store.objects(), store.events()) == before


def test_prune_removes_only_objects_this_source_created(tmp_path: Path) -> None:
    team_a, team_b = tmp_path / "a", tmp_path / "b"
    team_a.mkdir()
    team_b.mkdir()
    for name in ("a1", "a2", "a3"):
        (team_a / f"{name}.yaml").write_text(job_yaml(name))
    (team_b / "b1.yaml").write_text(job_yaml("b1"))
    with Store(str(tmp_path / "state.db")) as store:
        sources = [DirectorySource(str(team_a)), DirectorySource(str(team_b))]
        reconciler = Reconciler(store, sources)
        for source in sources:
            reconciler.reconcile(source)

        (team_a / "a3.yaml").unlink()
        reconciler.reconcile(sources[0])

        assert {o.key.name for o in store.objects()} == {"a1", "a2", "b1"}


def test_object_declared_by_two_sources_stays_with_the_first(tmp_path: Path) -> None:
    team_a, team_b = tmp_path / "a", tmp_path / "b"
    team_a.mkdir()
    team_b.mkdir()
    (team_a / "ping.yaml").write_text(job_yaml("ping"))
    (team_b / "ping.yaml").write_text(job_yaml("ping", url="https://example.com/b"))
    with Store(str(tmp_path / "state.db")) as store:
        sources = [DirectorySource(str(team_a)), DirectorySource(str(team_b))]
        reconciler = Reconciler(store, sources)
        reconciler.reconcile(sources[0])
        report = reconciler.reconcile(sources[1])

        stored = store.get(JOB)
        assert stored is not None and stored.source == sources[0].name
        assert stored.spec["http"]["url"] == "https://example.com/hook"
        assert "already belongs to" in str(report.issues[0])
        assert str(team_b / "ping.yaml") in str(report.issues[0])


def test_missing_directory_keeps_its_objects(tmp_path: Path) -> None:
    root = tmp_path / "jobs.d"
    root.mkdir()
    (root / "ping.yaml").write_text(job_yaml("ping"))
    with Store(str(tmp_path / "state.db")) as store:
        reconciler = Reconciler(store, [DirectorySource(str(root))], prune_max_share=1)
        reconciler.reconcile(reconciler.sources[0])
        (root / "ping.yaml").unlink()
        root.rmdir()

        report = reconciler.reconcile(reconciler.sources[0])

        assert store.get(JOB) is not None
        assert "does not exist" in report.message
        assert not store.sources()[0].ok


def test_chain_may_name_a_job_another_source_declares(tmp_path: Path) -> None:
    jobs, chains = tmp_path / "jobs", tmp_path / "chains"
    jobs.mkdir()
    chains.mkdir()
    (jobs / "ping.yaml").write_text(job_yaml("ping"))
    (chains / "chain.yaml").write_text(
        "apiVersion: oneoff.dev/v1\nkind: Chain\nmetadata: {name: nightly}\n"
        "spec:\n  steps: [{job: ping}]\n"
    )
    with Store(str(tmp_path / "state.db")) as store:
        sources = [DirectorySource(str(jobs)), DirectorySource(str(chains))]
        reconciler = Reconciler(store, sources)
        reconciler.reconcile(sources[0])

        report = reconciler.reconcile(sources[1])

        assert report.ok, report.issues
        assert store.get(ObjectKey("Chain", "default", "nightly")) is not None
