"""The manifest models as a user meets them: YAML files in a directory, read by the loader.

Each test writes real files to a temporary directory and loads the directory, so what is
checked is what ``oneoff validate`` would print: the issue, its file and its line.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from oneoff.loader import LoadResult, check_references, load_paths
from oneoff.records import ObjectKey

HEADER = "apiVersion: oneoff.dev/v1\n"


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def load(directory: Path) -> LoadResult:
    return load_paths([str(directory)])


def block(*parts: str) -> str:
    """YAML parts (each dedented on its own) joined, indented by two, no blank lines."""
    text = "\n".join(textwrap.dedent(part).strip("\n") for part in parts)
    return textwrap.indent(text, "  ") + "\n"


def job(name: str, *spec: str) -> str:
    """A Job document; the spec parts go under ``spec:`` (line 5), starting on line 6."""
    return f"{HEADER}kind: Job\nmetadata:\n  name: {name}\nspec:\n{block(*spec)}"


def at(file: str, line: int) -> str:
    """How an issue's text starts when it points at ``line`` of ``file``."""
    return f"{file}:{line}:"


def only_issue(result: LoadResult) -> str:
    assert len(result.issues) == 1, [str(issue) for issue in result.issues]
    return str(result.issues[0])


HTTP = """
http:
  url: https://example.com/ping
"""


# --- valid jobs ----------------------------------------------------------------------


def test_a_job_of_each_executor_type_is_accepted_as_written(tmp_path: Path) -> None:
    write(tmp_path, "jobs.yaml", "---\n".join([
        job("by-http", """
            http:
              method: POST
              url: https://example.com/hook
              headers: {Authorization: {valueFrom: {env: HOOK_TOKEN}}}
              json: {hello: world}
              successStatus: [200, 202]
        """),
        job("by-shell", """
            shell:
              script: echo hi
        """),
        job("by-docker", """
            docker:
              image: busybox:1.36
              command: [echo, hi]
              pullPolicy: Never
              resources: {cpus: 0.5, memory: 128Mi}
        """),
        job("by-kubernetes", """
            kubernetes:
              namespace: batch
              image: busybox:1.36
              args: [echo, hi]
        """),
    ]))

    result = load(tmp_path)

    assert result.issues == []
    by_name = {obj.key.name: obj.spec for obj in result.objects}
    assert by_name == {
        "by-http": {"http": {
            "method": "POST",
            "url": "https://example.com/hook",
            "headers": {"Authorization": {"valueFrom": {"env": "HOOK_TOKEN"}}},
            "json": {"hello": "world"},
            "successStatus": [200, 202],
        }},
        "by-shell": {"shell": {"script": "echo hi"}},
        "by-docker": {"docker": {
            "image": "busybox:1.36",
            "command": ["echo", "hi"],
            "pullPolicy": "Never",
            "resources": {"cpus": 0.5, "memory": "128Mi"},
        }},
        "by-kubernetes": {"kubernetes": {
            "namespace": "batch", "image": "busybox:1.36", "args": ["echo", "hi"],
        }},
    }


def test_a_job_without_namespace_lands_in_default(tmp_path: Path) -> None:
    write(tmp_path, "job.yaml", job("plain", HTTP))

    [obj] = load(tmp_path).objects

    assert obj.key == ObjectKey("Job", "default", "plain")


def test_at_now_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, "job.yaml", job("right-away", "schedule: {at: now}\n", HTTP))

    result = load(tmp_path)

    assert result.issues == []
    assert result.objects[0].spec["schedule"] == {"at": "now"}


def test_at_with_an_offset_is_accepted_and_keeps_its_offset(tmp_path: Path) -> None:
    write(tmp_path, "job.yaml", job(
        "christmas", 'schedule: {at: "2026-12-24T15:00:00+01:00"}', HTTP
    ))

    result = load(tmp_path)

    assert result.issues == []
    assert result.objects[0].spec["schedule"] == {"at": "2026-12-24T15:00:00+01:00"}


# --- schedule errors -----------------------------------------------------------------


def test_at_without_offset_is_rejected_naming_field_and_line(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("local-time", """
        schedule:
          at: 2026-12-24T15:00:00
    """, HTTP))

    result = load(tmp_path)

    issue = only_issue(result)
    assert issue.startswith(at(file, 7))
    assert "spec.schedule.at" in issue
    assert "no UTC offset" in issue
    assert result.objects == []


def test_nonexistent_time_zone_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("mars", """
        schedule:
          cron: "0 3 * * *"
          timeZone: Mars/Olympus
    """, HTTP))

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 8))
    assert "spec.schedule.timeZone" in issue
    assert "'Mars/Olympus' is not an IANA time zone" in issue


def test_invalid_cron_expression_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("bad-cron", """
        schedule:
          cron: "61 3 * * *"
    """, HTTP))

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 7))
    assert "spec.schedule.cron" in issue
    assert "not a five-field cron expression" in issue


def test_six_field_cron_expression_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, "job.yaml", job("seconds-cron", 'schedule: {cron: "0 0 3 * * *"}', HTTP))

    assert "not a five-field cron expression" in only_issue(load(tmp_path))


def test_after_zero_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("zero", """
        schedule:
          after: 0s
    """, HTTP))

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 7))
    assert "spec.schedule.after: must be longer than zero" in issue


def test_after_that_is_not_a_duration_is_rejected_with_an_example(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("vague", """
        schedule:
          after: soon
    """, HTTP))

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 7))
    assert "'soon' is not a duration" in issue
    assert "10m" in issue


def test_schedule_with_two_triggers_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, "job.yaml", job("both", """
        schedule:
          at: now
          after: 5m
    """, HTTP))

    assert "give exactly one of 'at', 'after' or 'cron' (got at, after)" in only_issue(
        load(tmp_path)
    )


# --- spec errors ---------------------------------------------------------------------


def test_priority_outside_one_to_ten_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "jobs.yaml", job("too-low", "priority: 0\n", HTTP) + "---\n"
                 + job("too-high", "priority: 11\n", HTTP))

    result = load(tmp_path)

    issues = sorted(str(issue) for issue in result.issues)
    assert len(issues) == 2
    assert issues[0].startswith(at(file, 15))
    assert "spec.priority: Input should be less than or equal to 10" in issues[0]
    assert issues[1].startswith(at(file, 6))
    assert "spec.priority: Input should be greater than or equal to 1" in issues[1]
    assert result.objects == []


def test_priority_bounds_one_and_ten_are_accepted(tmp_path: Path) -> None:
    write(tmp_path, "jobs.yaml", job("lowest", "priority: 1\n", HTTP) + "---\n"
          + job("highest", "priority: 10\n", HTTP))

    result = load(tmp_path)

    assert result.issues == []
    assert len(result.objects) == 2


def test_two_executor_blocks_are_rejected_naming_both(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("greedy", HTTP, "shell: {script: 'true'}"))

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 6))
    assert "exactly one executor block" in issue
    assert "(got http, shell)" in issue


def test_job_without_executor_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("idle", "priority: 3\n"))

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 6))
    assert "a Job needs exactly one executor block: http, shell, docker or kubernetes" in issue


def test_unknown_field_is_rejected_with_did_you_mean(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("typo", """
        priorty: 3
        http:
          url: https://example.com
          metod: POST
    """))

    result = load(tmp_path)

    issues = sorted(str(issue) for issue in result.issues)
    assert len(issues) == 2
    assert issues[0].startswith(at(file, 6))
    assert "spec.priorty: unknown field 'priorty'; did you mean 'priority'?" in issues[0]
    assert issues[1].startswith(at(file, 9))
    assert "spec.http.metod: unknown field 'metod'; did you mean 'method'?" in issues[1]


def test_name_that_is_not_a_dns_label_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("My_Job", HTTP))

    result = load(tmp_path)

    issue = only_issue(result)
    assert issue.startswith(at(file, 4))
    assert "metadata.name" in issue
    assert "'My_Job' is not a DNS-1123 label" in issue
    assert result.objects == []


def test_document_without_spec_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", f"{HEADER}kind: Job\nmetadata:\n  name: empty\n")

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 1))
    assert "required field 'spec' is missing" in issue


def test_unknown_kind_is_rejected_listing_the_kinds(tmp_path: Path) -> None:
    file = write(tmp_path, "cron.yaml", f"{HEADER}kind: CronJob\nmetadata:\n  name: x\n")

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 2))
    assert "unknown kind 'CronJob'; expected one of Job, Chain, Webhook, ApiKey" in issue


# --- ApiKey and Webhook --------------------------------------------------------------

SHA = "358214a444609f21149b330128e4f37a40748c1ed32574b7fa3e341264a8aef5"


def api_key(spec: str) -> str:
    return f"{HEADER}kind: ApiKey\nmetadata:\n  name: ci\nspec:\n{block(spec)}"


def test_api_key_with_hash_or_token_file_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, "hash.yaml", api_key(f"scopes: [read]\ntokenSha256: {SHA}\n"))
    write(tmp_path, "file.yaml", api_key(
        "scopes: [run]\ntokenFrom: {file: /run/secrets/t}\n"
    ).replace("name: ci", "name: ci-file"))

    result = load(tmp_path)

    assert result.issues == []
    assert {obj.key.name for obj in result.objects} == {"ci", "ci-file"}


def test_api_key_with_both_hash_and_token_from_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "key.yaml", api_key(f"""
        scopes: [read]
        tokenSha256: {SHA}
        tokenFrom: {{env: ONEOFF_TOKEN}}
    """))

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 6))
    assert "give exactly one of 'tokenSha256' or 'tokenFrom'" in issue


def test_api_key_with_raw_token_is_rejected_as_unknown_field(tmp_path: Path) -> None:
    file = write(tmp_path, "key.yaml", api_key("scopes: [read]\ntoken: hunter2\n"))

    result = load(tmp_path)

    issue = only_issue(result)
    assert issue.startswith(at(file, 7))
    assert "spec.token: unknown field 'token'" in issue
    assert "hunter2" not in issue
    assert result.objects == []


def test_api_key_hash_must_be_lower_case_hex_sha256(tmp_path: Path) -> None:
    write(tmp_path, "key.yaml", api_key(f"scopes: [read]\ntokenSha256: {SHA.upper()}\n"))

    assert "spec.tokenSha256" in only_issue(load(tmp_path))


def test_webhook_with_unknown_event_is_rejected_naming_the_event(tmp_path: Path) -> None:
    file = write(tmp_path, "hook.yaml", f"""{HEADER}kind: Webhook
metadata:
  name: alerts
spec:
  url: https://example.com/hook
  events:
    - execution.failed
    - execution.exploded
""")

    issue = only_issue(load(tmp_path))

    assert issue.startswith(at(file, 9))
    assert "spec.events.1" in issue
    assert "'execution.exploded'" in issue
    assert "'execution.failed'" in issue  # the accepted values are listed


# --- chains --------------------------------------------------------------------------


def chain(name: str, steps: str, extra: str = "") -> str:
    return (
        f"{HEADER}kind: Chain\nmetadata:\n  name: {name}\nspec:\n  steps:\n"
        + textwrap.indent(textwrap.dedent(steps).strip("\n"), "    ") + "\n" + extra
    )


def test_chain_of_existing_jobs_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, "jobs.yaml", job("build", HTTP) + "---\n" + job("notify", HTTP))
    write(tmp_path, "chain.yaml", chain(
        "release", "- job: build\n  continueOnFailure: true\n", "  finally: {job: notify}\n"
    ))

    result = load(tmp_path)
    check_references(result)

    assert result.issues == []
    assert ObjectKey("Chain", "default", "release") in {obj.key for obj in result.objects}


def test_chain_referencing_missing_job_is_rejected_with_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "jobs.yaml", job("build", HTTP))
    file = write(tmp_path, "chain.yaml", "# the release\n" + chain(
        "release", "- job: build\n- job: ghost\n"
    ))

    result = load(tmp_path)
    assert result.issues == []
    check_references(result)

    issue = only_issue(result)
    assert issue.startswith(at(file, 2))
    assert "spec.steps.1.job: Job 'ghost' does not exist in namespace 'default'" in issue
    assert [obj.key.name for obj in result.objects] == ["build"]
    assert ObjectKey("Chain", "default", "release") in result.failed_keys


def test_chain_reference_to_job_in_another_namespace_is_missing(tmp_path: Path) -> None:
    write(tmp_path, "job.yaml", job("build", HTTP).replace(
        "name: build", "name: build\n  namespace: ci"
    ))
    write(tmp_path, "chain.yaml", chain("release", "- job: build\n"))

    result = load(tmp_path)
    check_references(result)

    assert "Job 'build' does not exist in namespace 'default'" in only_issue(result)


def test_chain_may_reference_a_job_declared_elsewhere(tmp_path: Path) -> None:
    write(tmp_path, "chain.yaml", chain("release", "- job: build\n"))

    result = load(tmp_path)
    check_references(result, elsewhere=[ObjectKey("Job", "default", "build")])

    assert result.issues == []
    assert len(result.objects) == 1


def test_chain_cycle_is_rejected_for_every_chain_in_it(tmp_path: Path) -> None:
    file = write(tmp_path, "chains.yaml", chain("a", "- chain: b\n") + "---\n"
                 + chain("b", "- chain: a\n"))

    result = load(tmp_path)
    check_references(result)

    issues = sorted(str(issue) for issue in result.issues)
    assert len(issues) == 2
    assert issues[0].startswith(at(file, 1))
    assert issues[1].startswith(at(file, 9))
    assert all("chain steps form a cycle" in issue for issue in issues)
    assert result.objects == []


def test_chain_calling_itself_is_a_cycle(tmp_path: Path) -> None:
    write(tmp_path, "chain.yaml", chain("loop", "- chain: loop\n"))

    result = load(tmp_path)
    check_references(result)

    assert "chain steps form a cycle" in only_issue(result)


def test_chain_step_naming_both_job_and_chain_is_rejected(tmp_path: Path) -> None:
    write(tmp_path, "chain.yaml", chain("mixed", "- {job: a, chain: b}\n"))

    assert "give exactly one of 'job' or 'chain'" in only_issue(load(tmp_path))


# --- across files and documents ------------------------------------------------------


def test_duplicate_declarations_in_two_files_are_an_issue_for_both(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", job("same", HTTP))
    second = write(tmp_path, "b.yaml", "# again\n" + job("same", HTTP))
    write(tmp_path, "c.yaml", job("other", HTTP))

    result = load(tmp_path)

    issues = sorted(str(issue) for issue in result.issues)
    assert len(issues) == 2
    assert issues[0].startswith(at(first, 1))
    assert issues[1].startswith(at(second, 2))
    assert all("Job default/same is declared 2 times" in issue for issue in issues)
    assert [obj.key.name for obj in result.objects] == ["other"]
    assert ObjectKey("Job", "default", "same") in result.failed_keys


def test_same_name_in_two_namespaces_is_not_a_duplicate(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", job("same", HTTP))
    write(tmp_path, "b.yaml", job("same", HTTP).replace("name: same", "name: same\n  namespace: x"))

    result = load(tmp_path)

    assert result.issues == []
    assert len(result.objects) == 2


def test_status_in_a_manifest_is_ignored(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    with_status = tmp_path / "with-status"
    plain.mkdir()
    with_status.mkdir()
    write(plain, "job.yaml", job("report", HTTP))
    write(with_status, "job.yaml", job("report", HTTP) + textwrap.dedent("""
        status:
          conditions: [{type: Ready, status: "False"}]
          lastRun: {status: failed}
    """))

    [expected] = load(plain).objects
    result = load(with_status)

    assert result.issues == []
    [obj] = result.objects
    assert obj.spec_digest == expected.spec_digest
    assert obj.meta_json == expected.meta_json


def test_key_written_twice_in_a_mapping_is_an_error_with_its_line(tmp_path: Path) -> None:
    file = write(tmp_path, "job.yaml", job("twice", """
        http:
          url: https://example.com/a
          url: https://example.com/b
    """))

    result = load(tmp_path)

    issue = only_issue(result)
    assert issue.startswith(at(file, 8))
    assert "key 'url' is written twice" in issue
    assert result.objects == []
    assert file in result.failed_files


def test_invalid_document_does_not_hide_valid_ones_in_the_same_file(tmp_path: Path) -> None:
    file = write(tmp_path, "jobs.yaml", job("good", HTTP) + "---\n"
                 + job("bad", "priority: 99\n", HTTP))

    result = load(tmp_path)

    assert only_issue(result).startswith(at(file, 14))
    assert [obj.key.name for obj in result.objects] == ["good"]
    assert result.failed_keys == {ObjectKey("Job", "default", "bad")}
