"""Bad input in a manifest directory, as a user meets it: one clear issue, the rest loads.

Every test writes real files (and symlinks) into a temporary directory next to one good
job, loads the directory, and checks that the bad file yields exactly one issue naming
the file (with line and column where there is a place to point at) and the field where
one is wrong, while the good job is still loaded. The loader's bookkeeping for the
reconciler is checked too: a file that cannot be parsed is a *failed file* (all its
stored objects are kept), a document that fails validation but names its object is a
*failed key* (that object is kept).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from oneoff.errors import Issue
from oneoff.loader import FileCache, LoadResult, load_paths
from oneoff.records import ObjectKey

GOOD = ObjectKey("Job", "default", "good")


def job(name: str, spec: str = "shell:\n  script: echo hi\n") -> str:
    """A Job document; ``spec`` (dedented) goes under ``spec:``, which is line 5."""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: oneoff.dev/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n{body}\n"


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def with_good_job(directory: Path) -> Path:
    """Put the good job next to whatever the test writes; it must load regardless."""
    write(directory, "good.yaml", job("good"))
    return directory


def load(directory: Path) -> LoadResult:
    return load_paths([str(directory)])


def one_issue(result: LoadResult, file: str) -> Issue:
    """The single issue of a load, which must name ``file``; the good job still loaded."""
    assert len(result.issues) == 1, [str(issue) for issue in result.issues]
    issue = result.issues[0]
    assert issue.file == file
    assert str(issue).startswith(file)
    assert [obj.key for obj in result.objects] == [GOOD]
    return issue


# --- YAML that does not parse ---------------------------------------------------------


def test_unclosed_bracket_is_one_syntax_issue_with_line_and_column(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        "apiVersion: oneoff.dev/v1\nkind: Job\nmetadata: {name: x\nspec:\n  shell: {}\n",
    )

    issue = one_issue(load(tmp_path), bad)

    assert "YAML syntax" in issue.message
    assert issue.line in (3, 4)  # where the bracket opens or where the parser gave up
    assert issue.column is not None
    assert str(issue).startswith(f"{bad}:{issue.line}:{issue.column}: ")


def test_bad_indentation_is_one_syntax_issue_at_the_misindented_line(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        "apiVersion: oneoff.dev/v1\nkind: Job\nmetadata:\n  name: y\n   namespace: z\n"
        "spec:\n  shell:\n    script: echo\n",
    )

    issue = one_issue(load(tmp_path), bad)

    assert "YAML syntax" in issue.message
    assert (issue.line, issue.column) == (5, 13)
    assert str(issue).startswith(f"{bad}:5:13: ")


def test_key_written_twice_points_at_the_second_key(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        job("twice", "priority: 3\npriority: 4\nshell:\n  script: echo\n"),
    )

    issue = one_issue(load(tmp_path), bad)

    assert "'priority' is written twice" in issue.message
    assert issue.line == 7
    assert str(issue).startswith(f"{bad}:7:")


def test_syntax_error_fails_the_whole_file(tmp_path: Path) -> None:
    bad = write(with_good_job(tmp_path), "bad.yaml", "kind: [Job\n")

    result = load(tmp_path)

    assert result.failed_files == {bad}
    assert not result.failed_keys


# --- documents that do not validate ---------------------------------------------------


def test_unknown_field_names_the_field_and_suggests_the_right_one(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        job("typo", "shell:\n  script: echo\npriorty: 3\n"),
    )

    issue = one_issue(load(tmp_path), bad)

    assert issue.field == "spec.priorty"
    assert issue.line == 8
    assert "unknown field 'priorty'" in issue.message
    assert "did you mean 'priority'" in issue.message


def test_priority_given_as_word_is_a_type_error_naming_the_value(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        job("wordy", "priority: high\nshell:\n  script: echo\n"),
    )

    issue = one_issue(load(tmp_path), bad)

    assert issue.field == "spec.priority"
    assert (issue.line, issue.column) == (6, 13)
    assert "integer" in issue.message
    assert "'high'" in issue.message
    assert str(issue).startswith(f"{bad}:6:13: spec.priority: ")


def test_at_without_offset_asks_for_an_offset(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        job("naive", "schedule:\n  at: 2026-12-24T15:00:00\nshell:\n  script: echo\n"),
    )

    issue = one_issue(load(tmp_path), bad)

    assert issue.field == "spec.schedule.at"
    assert issue.line == 7
    assert "has no UTC offset" in issue.message
    assert "'2026-12-24T15:00:00'" in issue.message


def test_nonexistent_time_zone_is_named(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        job(
            "martian",
            'schedule:\n  cron: "0 3 * * *"\n  timeZone: Mars/Olympus\nshell:\n  script: echo\n',
        ),
    )

    issue = one_issue(load(tmp_path), bad)

    assert issue.field == "spec.schedule.timeZone"
    assert issue.line == 8
    assert "'Mars/Olympus' is not an IANA time zone" in issue.message


def test_name_that_is_not_a_dns_label_is_explained(tmp_path: Path) -> None:
    bad = write(with_good_job(tmp_path), "bad.yaml", job("Not_A_Label"))

    issue = one_issue(load(tmp_path), bad)

    assert issue.field == "metadata.name"
    assert issue.line == 4
    assert "'Not_A_Label' is not a DNS-1123 label" in issue.message


def test_document_that_is_a_list_is_not_a_manifest(tmp_path: Path) -> None:
    bad = write(with_good_job(tmp_path), "bad.yaml", "- a\n- b\n")

    result = load(tmp_path)
    issue = one_issue(result, bad)

    assert issue.line == 1
    assert "must be a mapping" in issue.message
    assert bad in result.failed_files


def test_unknown_kind_lists_the_kinds_and_fails_the_file(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        "apiVersion: oneoff.dev/v1\nkind: CronJob\nmetadata:\n  name: k\nspec: {}\n",
    )

    result = load(tmp_path)
    issue = one_issue(result, bad)

    assert issue.field == "kind"
    assert issue.line == 2
    assert "unknown kind 'CronJob'" in issue.message
    assert "Job, Chain, Webhook, ApiKey" in issue.message
    assert bad in result.failed_files


def test_invalid_document_with_a_known_key_fails_only_that_key(tmp_path: Path) -> None:
    bad = write(
        with_good_job(tmp_path),
        "bad.yaml",
        job("wordy", "priority: high\nshell:\n  script: echo\n"),
    )
    broken = write(tmp_path, "broken.yaml", "kind: [Job\n")

    result = load(tmp_path)

    assert result.failed_keys == {ObjectKey("Job", "default", "wordy")}
    assert bad not in result.failed_files
    assert result.failed_files == {broken}
    assert [obj.key for obj in result.objects] == [GOOD]


# --- documents that validate but clash -----------------------------------------------


def test_same_object_in_two_files_is_an_issue_for_both_and_neither_loads(
    tmp_path: Path,
) -> None:
    first = write(with_good_job(tmp_path), "a.yaml", job("same"))
    second = write(tmp_path, "b.yaml", job("same", "shell:\n  script: echo other\n"))

    result = load(tmp_path)

    assert sorted(issue.file for issue in result.issues) == [first, second]
    for issue in result.issues:
        assert issue.line == 1
        assert issue.field == "metadata.name"
        assert "Job default/same is declared 2 times" in issue.message
        assert f"{first}:1" in issue.message and f"{second}:1" in issue.message
    assert [obj.key for obj in result.objects] == [GOOD]
    assert ObjectKey("Job", "default", "same") in result.failed_keys


# --- files that cannot be read as text ------------------------------------------------


def test_file_larger_than_the_limit_is_refused_without_being_read(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as handle:  # sparse: 50 MB of size, no data written
        handle.truncate(50 * 1024 * 1024)
    with_good_job(tmp_path)

    result = load(tmp_path)
    issue = one_issue(result, str(huge))

    assert "50.0 MiB" in issue.message
    assert "larger than the 4.0 MiB limit" in issue.message
    assert str(huge) in result.failed_files


def test_binary_garbage_is_reported_as_binary(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(os.urandom(256) + b"\0" + os.urandom(256))
    with_good_job(tmp_path)

    result = load(tmp_path)
    issue = one_issue(result, str(garbage))

    assert "binary data, not a YAML text file" in issue.message
    assert str(garbage) in result.failed_files


def test_invalid_utf8_names_the_byte_and_its_line(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"kind: Job\nmetadata:\n  name: caf\xe9\n")
    with_good_job(tmp_path)

    result = load(tmp_path)
    issue = one_issue(result, str(latin))

    assert "not UTF-8 text (byte 0xe9)" in issue.message
    assert issue.line == 3
    assert str(latin) in result.failed_files


def test_fifo_and_device_named_yaml_are_reported_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")  # opening it for reading would wait for a writer
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")  # reading it would never end
    with_good_job(tmp_path)

    result = load(tmp_path)

    assert [(issue.file, issue.message) for issue in result.issues] == [
        (str(tmp_path / "pipe.yaml"), "not a regular file"),
        (str(tmp_path / "zero.yaml"), "not a regular file"),
    ]
    assert [obj.key for obj in result.objects] == [GOOD]


def test_alias_bomb_is_refused_instead_of_expanded(tmp_path: Path) -> None:
    levels = ["l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 5)]
    http = "http:\n  url: https://example.com\n  json:\n" + "".join(
        f"    {level}\n" for level in levels
    )
    bomb = write(with_good_job(tmp_path), "bomb.yaml", job("laughs", http))
    limit = 64 * 1024
    assert Path(bomb).stat().st_size < 1024

    result = load_paths([str(tmp_path)], max_file_bytes=limit)

    # 10**5 strings from a 400-byte file: nothing this large should reach the plan.
    assert max(len(obj.spec_json) for obj in result.objects) < limit
    one_issue(result, bomb)


# --- files and directories that cannot be reached -------------------------------------


def test_directory_symlink_to_its_parent_is_reported_not_followed(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loop").symlink_to("..")
    with_good_job(tmp_path)

    issue = one_issue(load(tmp_path), str(tmp_path / "sub" / "loop"))

    assert "symlink loop" in issue.message
    assert "not followed" in issue.message


def test_two_file_symlinks_pointing_at_each_other_are_each_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    with_good_job(tmp_path)

    result = load(tmp_path)

    assert [(issue.file, issue.message) for issue in result.issues] == [
        (str(tmp_path / "a.yaml"), "symlink loop: too many levels of symbolic links"),
        (str(tmp_path / "b.yaml"), "symlink loop: too many levels of symbolic links"),
    ]
    assert [obj.key for obj in result.objects] == [GOOD]


def test_broken_symlink_is_reported(tmp_path: Path) -> None:
    (tmp_path / "gone.yaml").symlink_to("nowhere.yaml")
    with_good_job(tmp_path)

    result = load(tmp_path)
    issue = one_issue(result, str(tmp_path / "gone.yaml"))

    assert "broken symlink" in issue.message
    assert str(tmp_path / "gone.yaml") in result.failed_files


def test_unreadable_file_is_reported_as_permission_denied(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        secret = write(with_good_job(tmp_path), "secret.yaml", job("secret"))
        os.chmod(secret, 0)
        try:
            issue = one_issue(load(tmp_path), secret)
        finally:
            os.chmod(secret, 0o644)
        assert "permission denied" in issue.message
        return
    # root reads any file: run `oneoff validate` as user nobody instead.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is missing: cannot drop to user nobody")
    oneoff = Path(sys.executable).parent / "oneoff"
    # pytest's tmp_path lives under a 0700 directory nobody cannot enter: use /tmp.
    with tempfile.TemporaryDirectory(prefix="oneoff-unreadable-") as scratch:
        directory = Path(scratch)
        os.chmod(directory, 0o755)
        secret = write(with_good_job(directory), "secret.yaml", job("secret"))
        os.chmod(secret, 0)

        done = subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                str(oneoff),
                "validate",
                str(directory),
            ],
            capture_output=True,
            text=True,
            cwd=directory,
            env={**os.environ, "HOME": str(directory)},
            timeout=60,
            check=False,
        )

    assert done.returncode == 2, done.stderr
    issues = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(issues) == 1, done.stderr
    assert issues[0].startswith(f"error: {secret}: permission denied")


# --- files that declare nothing, and files that are not manifests -----------------------


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# only a comment\n# and another\n"], ids=["empty", "blank", "comments"]
)
def test_file_without_documents_is_no_issue_and_no_object(tmp_path: Path, text: str) -> None:
    nothing = write(with_good_job(tmp_path), "nothing.yaml", text)

    result = load(tmp_path)

    assert result.issues == []
    assert [obj.key for obj in result.objects] == [GOOD]
    assert nothing in result.files
    assert not result.failed_files and not result.failed_keys


def test_dot_files_and_non_yaml_files_are_ignored_and_yml_is_read(tmp_path: Path) -> None:
    write(tmp_path, ".hidden.yaml", "kind: [broken\n")
    write(tmp_path, ".git/config.yaml", "kind: [broken\n")
    write(tmp_path, "README.md", "# not a manifest: [\n")
    write(tmp_path, "notes.txt", "kind: [broken\n")
    short = write(tmp_path, "short.yml", job("short"))

    result = load(tmp_path)

    assert result.issues == []
    assert result.files == [short]
    assert [obj.key for obj in result.objects] == [ObjectKey("Job", "default", "short")]


def test_mounted_configmap_layout_loads_each_object_once(tmp_path: Path) -> None:
    write(tmp_path, "..2026_01_01/job.yaml", job("from-configmap"))
    (tmp_path / "..data").symlink_to("..2026_01_01")
    (tmp_path / "job.yaml").symlink_to("..data/job.yaml")

    result = load(tmp_path)

    assert result.issues == []
    assert result.files == [str(tmp_path / "job.yaml")]
    assert [(obj.key, obj.file) for obj in result.objects] == [
        (ObjectKey("Job", "default", "from-configmap"), str(tmp_path / "job.yaml"))
    ]


def test_each_document_of_a_multi_document_file_keeps_its_own_start_line(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "many.yaml",
        job("first") + "---\n# the second one\n" + job("second") + "---\n" + job("third"),
    )

    result = load(tmp_path)

    assert result.issues == []
    assert [(obj.key.name, obj.file, obj.line) for obj in result.objects] == [
        ("first", path, 1),
        ("second", path, 10),
        ("third", path, 18),
    ]


# --- the parse cache ---------------------------------------------------------------------


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_unchanged_file_is_not_parsed_again(tmp_path: Path) -> None:
    path = write(tmp_path, "job.yaml", job("cached"))
    cache = FileCache()
    load_paths([str(tmp_path)], cache=cache)
    first = cache.get(path, _sha(path))
    assert first is not None

    again = load_paths([str(tmp_path)], cache=cache)

    assert cache.get(path, _sha(path)) is first
    assert [obj.key.name for obj in again.objects] == ["cached"]


def test_changed_file_is_parsed_again(tmp_path: Path) -> None:
    path = write(tmp_path, "job.yaml", job("cached"))
    cache = FileCache()
    load_paths([str(tmp_path)], cache=cache)
    old_sha = _sha(path)
    first = cache.get(path, old_sha)

    write(tmp_path, "job.yaml", job("renamed"))
    again = load_paths([str(tmp_path)], cache=cache)

    fresh = cache.get(path, _sha(path))
    assert fresh is not None and fresh is not first
    assert cache.get(path, old_sha) is None
    assert [obj.key.name for obj in again.objects] == ["renamed"]
