"""Every manifest shipped in ``examples/`` and ``jobs.d/`` loads, validates and plans cleanly.

A new user copies these files first; a broken example is the first thing they would meet.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from oneoff.loader import check_references, load_paths
from oneoff.manifests import EXECUTOR_TYPES, KINDS
from oneoff.plan import Action, plan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
STARTER = ROOT / "jobs.d"
CATALOG = {
    "postgres-backup-s3.yaml",
    "docker-cleanup.yaml",
    "github-release-notification.yaml",
    "health-check-ping.yaml",
    "slack-notification.yaml",
}

SHIPPED = sorted(
    [*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.yml"), *STARTER.rglob("*.yaml")]
)


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_examples_and_starter_directory_are_not_empty() -> None:
    assert len(SHIPPED) > len(CATALOG)
    assert STARTER / "hello.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=_name)
def test_shipped_file_loads_without_issues(path: Path) -> None:
    result = load_paths([str(path)])

    assert [str(issue) for issue in result.issues] == []
    assert result.objects, f"{_name(path)} declares nothing"
    assert not result.failed_files and not result.failed_keys


@pytest.mark.parametrize("path", SHIPPED, ids=_name)
def test_shipped_file_references_only_objects_that_exist(path: Path) -> None:
    everything = load_paths([str(EXAMPLES), str(STARTER)])
    result = load_paths([str(path)])

    check_references(result, elsewhere=[obj.key for obj in everything.objects])

    assert [str(issue) for issue in result.issues] == []


@pytest.mark.parametrize("path", SHIPPED, ids=_name)
def test_shipped_file_starts_with_a_comment_saying_what_it_shows(path: Path) -> None:
    first_line = path.read_text(encoding="utf-8").splitlines()[0]

    assert first_line.startswith("# ")


@pytest.mark.parametrize("root", [EXAMPLES, STARTER], ids=_name)
def test_whole_directory_loads_and_plans_as_creates_only(root: Path) -> None:
    result = load_paths([str(root)])
    check_references(result)

    assert [str(issue) for issue in result.issues] == []
    the_plan = plan(f"dir:{root.name}", result.objects, [])
    assert the_plan.issues == ()
    assert the_plan.refused is None
    assert len(the_plan.of(Action.CREATE)) == len(result.objects)
    assert the_plan.counts[Action.CREATE] == len(the_plan.changes)


def test_examples_and_starter_can_be_watched_together() -> None:
    result = load_paths([str(EXAMPLES), str(STARTER)])
    check_references(result)

    assert [str(issue) for issue in result.issues] == []


def test_catalog_has_the_five_templates_each_declaring_a_job_of_its_name() -> None:
    files = {path.name for path in (EXAMPLES / "catalog").iterdir()}
    assert files == CATALOG

    for name in sorted(CATALOG):
        result = load_paths([str(EXAMPLES / "catalog" / name)])
        jobs = [obj.key.name for obj in result.objects if obj.key.kind == "Job"]
        assert jobs == [name.removesuffix(".yaml")]


def test_slack_template_includes_a_slack_formatted_webhook() -> None:
    result = load_paths([str(EXAMPLES / "catalog" / "slack-notification.yaml")])

    webhooks = [obj for obj in result.objects if obj.key.kind == "Webhook"]
    assert [hook.spec["format"] for hook in webhooks] == ["slack"]


def test_examples_show_every_kind_and_every_executor() -> None:
    result = load_paths([str(EXAMPLES)])

    assert {obj.key.kind for obj in result.objects} == set(KINDS)
    executors = {
        block for obj in result.objects if obj.key.kind == "Job" for block in obj.spec
        if block in EXECUTOR_TYPES
    }
    assert executors == set(EXECUTOR_TYPES)


def test_examples_never_contain_a_raw_api_token() -> None:
    result = load_paths([str(EXAMPLES)])

    for key in (obj for obj in result.objects if obj.key.kind == "ApiKey"):
        assert set(key.spec) & {"tokenSha256", "tokenFrom"}, key.location


def test_starter_job_says_hello_one_minute_after_it_is_seen() -> None:
    result = load_paths([str(STARTER / "hello.yaml")])

    [hello] = result.objects
    assert str(hello.key) == "Job default/hello"
    assert hello.spec["schedule"] == {"after": "1m"}
    assert "hello from OneOff" in hello.spec["shell"]["script"]
