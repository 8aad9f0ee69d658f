"""The CLI against a real ``oneoff serve``: the issue's "Done when", and the exit codes
scripts rely on (README "Using the CLI against a server").

Real processes on loopback, real state files, real manifests. A tiny loopback HTTP
server stands in only where an answer is needed that a OneOff server never gives on
purpose (a 500, an HTML page) or to see exactly what the CLI sent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ONEOFF, Server, job_yaml, wait_until

from oneoff.client import REQUEST_FILE, Bundle, client_config
from oneoff.errors import Issue, UsageError
from oneoff.reconciler import DirectorySource, Reconciler
from oneoff.store import Store

RUN_ID = re.compile(r"^[0-9a-f]{20}$")


def cli(cwd: Path, *args: str, server: str | None = None, key: str | None = None,
        stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``oneoff ARGS`` as a user in ``cwd`` runs it: no ONEOFF_* settings but the ones
    given, and no personal client config file."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ONEOFF_")}
    clean["XDG_CONFIG_HOME"] = str(cwd / ".no-config")
    if server:
        clean["ONEOFF_SERVER"] = server
    if key:
        clean["ONEOFF_API_KEY"] = key
    clean.update(env)
    return subprocess.run([ONEOFF, *args], cwd=cwd, env=clean, input=stdin,
                          capture_output=True, text=True, timeout=60)


def shell_job(name: str, script: str) -> str:
    """A Job that runs only when asked, with a shell script."""
    return (f"apiVersion: oneoff.dev/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
            f"spec:\n  shell: {{script: {json.dumps(script)}}}\n")


def generate_key(cwd: Path, name: str, *scopes: str) -> dict[str, Any]:
    args = [arg for scope in scopes for arg in ("--scope", scope)]
    result = cli(cwd, "keys", "generate", "--name", name, *args, "-o", "json")
    assert result.returncode == 0, result.stderr
    body: dict[str, Any] = json.loads(result.stdout)
    return body


def declare_keys(jobs: Path, *keys: dict[str, Any]) -> None:
    jobs.mkdir(exist_ok=True)
    for key in keys:
        name = key["manifest"]["metadata"]["name"]
        (jobs / f"key-{name}.yaml").write_text(yaml.safe_dump(key["manifest"]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def phase(cwd: Path, run_id: str, **where: str) -> str:
    result = cli(cwd, "get", "executions", run_id, "-o", "json", **where)
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["status"]["phase"])


@pytest.fixture
def laptop(tmp_path: Path) -> Path:
    """Another folder than the server's: the CLI user's."""
    folder = tmp_path / "laptop"
    folder.mkdir()
    return folder


# --- the issue's "Done when" --------------------------------------------------------


def test_new_user_drives_a_server_with_only_the_cli(
    tmp_path: Path, laptop: Path, serve: Callable[..., Server]
) -> None:
    server = serve()
    url = server.url

    # generate keys and declare them in the server's jobs.d: auth turns on
    admin = generate_key(laptop, "admin", "admin")
    reader = generate_key(laptop, "reader", "read")
    declare_keys(tmp_path / "jobs.d", admin, reader)
    as_admin = functools.partial(cli, laptop, server=url, key=admin["token"])
    wait_until(lambda: json.loads(as_admin("whoami", "-o", "json").stdout).get("name")
               == "admin")
    anonymous = cli(laptop, "get", "jobs", server=url)
    assert anonymous.returncode == 3
    assert "requires an API key" in anonymous.stderr and "HTTP 401" in anonymous.stderr

    # apply a directory from this other folder, after seeing the diff
    manifests = laptop / "manifests"
    manifests.mkdir()
    (manifests / "hello.yaml").write_text(shell_job("hello", "echo hello from $ONEOFF_JOB"))
    (manifests / "slow.yaml").write_text(shell_job(
        "slow", "for i in $(seq 1 100); do echo tick $i; sleep 0.2; done"))
    preview = as_admin("diff", "-f", "manifests")
    assert preview.returncode == 1, preview.stderr
    assert "+ create Job default/hello  (manifests/hello.yaml:1)" in preview.stdout
    assert "+ create Job default/slow  (manifests/slow.yaml:1)" in preview.stdout
    applied = as_admin("apply", "-f", "manifests")
    assert applied.returncode == 0, applied.stderr
    assert "Plan for api:cli: 2 to create, 0 to update, 0 to delete" in applied.stdout
    unchanged = as_admin("diff", "-f", "manifests")
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    assert "0 to create, 0 to update, 0 to delete, 2 unchanged" in unchanged.stdout

    (manifests / "hello.yaml").write_text(shell_job("hello", "echo hi"))
    edited = as_admin("diff", "-f", "manifests")
    assert edited.returncode == 1
    assert ('~ spec.shell.script: "echo hello from $ONEOFF_JOB" → "echo hi"'
            in edited.stdout)
    assert as_admin("apply", "-f", "manifests").returncode == 0
    jobs = as_admin("get", "jobs")
    assert [line.split()[0] for line in jobs.stdout.splitlines()[1:]] == ["hello", "slow"]
    assert "manifests/hello.yaml:1" in jobs.stdout and "manifests/slow.yaml:1" in jobs.stdout

    # run a job and wait for it; its log
    ran = as_admin("run", "hello", "--wait")
    assert ran.returncode == 0, ran.stderr
    run_id = ran.stdout.strip()
    assert RUN_ID.match(run_id)
    assert f"[run {run_id} succeeded" in ran.stderr
    assert as_admin("logs", "hello").stdout == "hi\n"

    # follow a long job's log live, and cancel it
    slow_id = as_admin("run", "slow").stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEOFF_")}
    with subprocess.Popen(
        [ONEOFF, "logs", "-f", slow_id], cwd=laptop, text=True,
        env={**env, "ONEOFF_SERVER": url, "ONEOFF_API_KEY": admin["token"]},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as follower:
        assert follower.stdout is not None and follower.stderr is not None
        try:
            assert follower.stdout.readline() == "tick 1\n"
            assert follower.stdout.readline() == "tick 2\n"
            assert phase(laptop, slow_id, ONEOFF_SERVER=url,
                         ONEOFF_API_KEY=admin["token"]) == "running"  # live, not after
            cancelled = as_admin("cancel", slow_id)
            assert cancelled.returncode == 0, cancelled.stderr
            assert slow_id in cancelled.stdout
            rest = follower.stdout.read()  # to the end: the follower stops with the run
            status = follower.stderr.read()
        except BaseException:
            follower.kill()
            raise
    assert follower.returncode == 0
    assert rest.splitlines() == [f"tick {i}" for i in range(3, 3 + len(rest.splitlines()))]
    assert f"[run {slow_id} cancelled" in status
    assert phase(laptop, slow_id, ONEOFF_SERVER=url, ONEOFF_API_KEY=admin["token"]) \
        == "cancelled"
    again = as_admin("cancel", slow_id)
    assert again.returncode == 1
    assert "has already finished (cancelled)" in again.stderr

    # a read-only key may look but not run
    as_reader = functools.partial(cli, laptop, server=url, key=reader["token"])
    assert as_reader("get", "jobs").returncode == 0
    refused = as_reader("run", "hello")
    assert refused.returncode == 3
    assert "error: API key 'reader' lacks the 'run' scope (it has: read) (HTTP 403)" in (
        refused.stderr)


# --- apply: file:line, conflicts, stdin ---------------------------------------------


def test_apply_names_the_file_and_line_of_an_invalid_document(
    laptop: Path, serve: Callable[..., Server]
) -> None:
    url = serve().url
    manifests = laptop / "manifests"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(job_yaml("first"))
    (manifests / "b.yaml").write_text(job_yaml("second") + "  prio: 1\n")
    result = cli(laptop, "apply", "-f", "manifests", server=url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: manifests/b.yaml:8:3: spec.prio: unknown field 'prio'" in result.stderr
    nothing = cli(laptop, "get", "jobs", server=url)
    assert nothing.returncode == 0 and nothing.stdout == ""  # all or nothing

    piped = cli(laptop, "apply", "-f", "-", server=url,
                stdin=job_yaml("third") + "  prio: 1\n")
    assert piped.returncode == 2
    assert "error: <stdin>:8:3: spec.prio: unknown field 'prio'" in piped.stderr

    broken = cli(laptop, "diff", "-f", "manifests", server=url)
    assert broken.returncode == 2  # kubectl diff: > 1 is an error, not "changes"


def test_apply_over_a_directory_owned_object_is_a_conflict(
    tmp_path: Path, laptop: Path, serve: Callable[..., Server]
) -> None:
    (tmp_path / "jobs.d").mkdir()
    (tmp_path / "jobs.d" / "ping.yaml").write_text(job_yaml("ping"))
    url = serve().url
    (laptop / "ping.yaml").write_text(job_yaml("ping", url="https://example.com/mine"))

    result = cli(laptop, "apply", "-f", "ping.yaml", server=url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: ping.yaml:1: metadata.name: Job default/ping already belongs to dir:" in (
        result.stderr)
    assert "the server applied nothing" in result.stderr
    still = json.loads(cli(laptop, "get", "job", "ping", "-o", "json", server=url).stdout)
    assert still["spec"]["http"]["url"] == "https://example.com/hook"

    deleted = cli(laptop, "delete", "job", "ping", server=url)
    assert deleted.returncode == 1
    assert "is declared in jobs.d/ping.yaml:1" in deleted.stderr

    preview = cli(laptop, "diff", "-f", "ping.yaml", server=url)
    assert preview.returncode == 2  # a conflict is an error for diff, never "changes"
    assert "already belongs to dir:" in preview.stderr


def test_objects_the_cli_applied_can_be_deleted_and_pruned(
    laptop: Path, serve: Callable[..., Server]
) -> None:
    url = serve().url
    (laptop / "jobs.yaml").write_text(job_yaml("one") + "---\n" + job_yaml("two"))
    (laptop / "more.yaml").write_text(job_yaml("three"))
    assert cli(laptop, "apply", "-f", "jobs.yaml", "-f", "more.yaml", server=url
               ).returncode == 0
    deleted = cli(laptop, "delete", "job", "three", "-o", "json", server=url)
    assert json.loads(deleted.stdout)["metadata"]["name"] == "three"

    (laptop / "jobs.yaml").write_text(job_yaml("one"))
    kept = cli(laptop, "apply", "-f", "jobs.yaml", "--dry-run", "--prune", server=url)
    assert kept.returncode == 0
    assert "- delete Job default/two" in kept.stdout
    assert "dry run: nothing was changed" in kept.stderr
    pruned = cli(laptop, "apply", "-f", "jobs.yaml", "--prune", "-o", "json", server=url)
    assert json.loads(pruned.stdout)["plan"]["counts"]["delete"] == 1
    assert cli(laptop, "get", "job", "two", server=url).returncode == 1

    # pruning every object of the source looks like an emptied directory: refused
    (laptop / "other.yaml").write_text(job_yaml("other"))
    refused = cli(laptop, "apply", "-f", "other.yaml", "--prune", server=url)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "- delete Job default/one" in refused.stdout  # the plan it refused
    assert "error: refused to prune: api:cli would delete all 1 of its objects" in (
        refused.stderr)
    assert cli(laptop, "diff", "-f", "other.yaml", "--prune", server=url).returncode == 2
    assert cli(laptop, "get", "job", "other", server=url).returncode == 1

    deleted = cli(laptop, "delete", "job", "one", server=url)
    assert deleted.returncode == 0 and "Job default/one deleted" in deleted.stdout
    gone = cli(laptop, "get", "job", "one", server=url)
    assert gone.returncode == 1 and "Job default/one not found" in gone.stderr


# --- runs ----------------------------------------------------------------------------


def test_run_wait_exits_1_when_the_run_fails(laptop: Path, serve: Callable[..., Server]
                                            ) -> None:
    url = serve().url
    (laptop / "jobs.yaml").write_text(
        shell_job("broken", "echo oops; exit 3") + "---\n"
        + shell_job("idle", "sleep 30"))
    assert cli(laptop, "apply", "-f", "jobs.yaml", server=url).returncode == 0

    failed = cli(laptop, "run", "broken", "--follow", server=url)
    assert failed.returncode == 1
    run_id, output = failed.stdout.split("\n", 1)
    assert RUN_ID.match(run_id) and output == "oops\n"
    assert f"[run {run_id} failed" in failed.stderr

    idle = cli(laptop, "run", "idle", "-o", "json", server=url)
    assert json.loads(idle.stdout)["spec"]["job"] == "idle"
    busy = cli(laptop, "run", "idle", server=url)
    assert busy.returncode == 1 and "overlapPolicy is Skip" in busy.stderr
    everything = cli(laptop, "cancel", "--job", "idle", server=url)
    assert everything.returncode == 0
    assert everything.stdout.strip() == f"run {json.loads(idle.stdout)['metadata']['name']} " \
        "cancelled"
    assert cli(laptop, "cancel", server=url).returncode == 2  # neither RUN_ID nor --job


def test_server_and_state_file_print_the_same_tables(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    (tmp_path / "jobs.d").mkdir()
    (tmp_path / "jobs.d" / "hi.yaml").write_text(
        shell_job("hi", "echo hi").replace("spec:\n", "spec:\n  schedule: {at: now}\n"))
    url = serve().url
    wait_until(lambda: "succeeded" in cli(tmp_path, "get", "executions", server=url).stdout)
    for args in (("get", "jobs"), ("get", "jobs", "-o", "json"), ("get", "executions", "-A"),
                 ("describe", "job", "hi"), ("logs", "hi"), ("get", "sources")):
        via_server = cli(tmp_path, *args, server=url)
        via_state = cli(tmp_path, *args, ONEOFF_STATE="oneoff.db")
        assert via_server.returncode == via_state.returncode == 0, via_server.stderr
        assert without_age(via_server.stdout) == without_age(via_state.stdout), args
    assert "hi\n" == cli(tmp_path, "logs", "hi", server=url).stdout


def without_age(text: str) -> str:
    """Tables end in AGE, which may tick between two calls."""
    return re.sub(r" +\d+[smhd]$", "", text, flags=re.MULTILINE)


# --- keys ----------------------------------------------------------------------------


def test_keys_generate_prints_a_token_its_hash_and_a_manifest_that_validates(
    laptop: Path
) -> None:
    body = generate_key(laptop, "deploy", "run", "cancel")
    assert body["token"].startswith("oo_") and len(body["token"]) > 40
    assert hashlib.sha256(body["token"].encode()).hexdigest() == body["tokenSha256"]
    assert body["manifest"]["spec"] == {"scopes": ["run", "cancel"],
                                        "tokenSha256": body["tokenSha256"]}
    (laptop / "key.yaml").write_text(yaml.safe_dump(body["manifest"]))
    assert cli(laptop, "validate", "key.yaml").returncode == 0
    assert generate_key(laptop, "deploy")["token"] != body["token"]

    table = cli(laptop, "keys", "generate")
    token = table.stdout.split("\n")[2].strip()
    assert token.startswith("oo_")
    assert f"tokenSha256: {hashlib.sha256(token.encode()).hexdigest()}" in table.stdout
    snippet = table.stdout.split("e.g. for jobs.d/my-key.yaml:\n", 1)[1]
    assert yaml.safe_load(snippet)["kind"] == "ApiKey" and token not in snippet


def test_keys_created_through_the_api_work_until_revoked(
    tmp_path: Path, laptop: Path, serve: Callable[..., Server]
) -> None:
    admin = generate_key(laptop, "admin", "admin")
    declare_keys(tmp_path / "jobs.d", admin)
    url = serve().url
    # the server and admin key come from a client config file
    config = laptop / "client.yaml"
    config.write_text(f"server: {url}\napiKey: {admin['token']}\n")
    as_admin = functools.partial(cli, laptop, ONEOFF_CLIENT_CONFIG=str(config))
    (laptop / "job.yaml").write_text(shell_job("tick", "true"))
    assert as_admin("apply", "-f", "job.yaml").returncode == 0

    created = as_admin("keys", "create", "ci", "--scope", "run", "--expires", "30d")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("oo_") and "shown only this once" in created.stderr
    listed = as_admin("keys", "list")
    rows = {line.split()[1]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == {"admin", "ci"}
    assert rows["ci"][2] == "run" and rows["ci"][4].endswith("Z")  # SCOPES, EXPIRES
    assert "tokenSha256" not in as_admin("keys", "list", "-o", "json").stdout

    # ONEOFF_API_KEY beats the config file's apiKey, --api-key beats both
    assert as_admin("run", "tick", "--wait", ONEOFF_API_KEY=token).returncode == 0
    who = as_admin("whoami", "-o", "json", "--api-key", admin["token"], ONEOFF_API_KEY=token)
    assert json.loads(who.stdout)["name"] == "admin"
    assert json.loads(as_admin("whoami", "-o", "json", ONEOFF_API_KEY=token).stdout)[
        "name"] == "ci"

    revoked = as_admin("keys", "revoke", "ci")
    assert revoked.returncode == 0 and "ApiKey default/ci revoked" in revoked.stdout
    after = as_admin("run", "tick", ONEOFF_API_KEY=token)
    assert after.returncode == 3 and "HTTP 401" in after.stderr
    declared = as_admin("keys", "revoke", "admin")
    assert declared.returncode == 1 and "is declared in" in declared.stderr
    assert "set 'disabled: true' in its spec" in declared.stderr


# --- which server, and when the state file answers instead ---------------------------


def test_an_unreachable_server_exits_3_even_with_a_state_file_at_hand(tmp_path: Path
                                                                       ) -> None:
    Store(str(tmp_path / "oneoff.db")).close()
    (tmp_path / "job.yaml").write_text(job_yaml("ping"))
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("get", "jobs"), ("logs", "-f", "ping"), ("diff", "-f", "job.yaml"),
                 ("apply", "-f", "job.yaml"), ("run", "ping")):
        result = cli(tmp_path, *args, server=url)
        assert result.returncode == 3, (args, result.stderr)
        assert f"error: cannot reach the OneOff server at {url}: connection refused" in (
            result.stderr), args


@pytest.fixture
def default_port_silent() -> Iterator[None]:
    """Hold 127.0.0.1:8080 bound but not listening, so connecting to it is refused."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 8080))
    except OSError:
        sock.close()
        pytest.skip("something else holds 127.0.0.1:8080, the CLI's default server")
    yield
    sock.close()


def test_without_a_named_server_the_local_state_file_answers(
    tmp_path: Path, default_port_silent: None
) -> None:
    (tmp_path / "jobs.d").mkdir()
    (tmp_path / "jobs.d" / "ping.yaml").write_text(job_yaml("ping"))
    with Store(str(tmp_path / "oneoff.db")) as store:
        reconciler = Reconciler(store, [DirectorySource(str(tmp_path / "jobs.d"))])
        assert reconciler.reconcile(reconciler.sources[0]).ok

    result = cli(tmp_path, "get", "jobs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[0] == "ping"
    assert result.stderr == ("(no OneOff server answers at http://127.0.0.1:8080: reading "
                             "./oneoff.db)\n")
    changing = cli(tmp_path, "run", "ping")
    assert changing.returncode == 3 and "cannot reach the OneOff server" in changing.stderr

    (tmp_path / "oneoff.db").unlink()
    alone = cli(tmp_path, "get", "jobs")
    assert alone.returncode == 3
    assert "there is no state file ./oneoff.db" in alone.stderr


def test_server_and_key_come_from_flag_then_env_then_file_then_default(tmp_path: Path
                                                                        ) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("server: http://file.example:1\napiKey: from-file\n")
    env = {"ONEOFF_CLIENT_CONFIG": str(config)}
    found = client_config(env=env)
    assert (found.server, found.api_key, found.server_from) == (
        "http://file.example:1", "from-file", "file")
    env |= {"ONEOFF_SERVER": "http://env.example:2", "ONEOFF_API_KEY": "from-env"}
    found = client_config(env=env)
    assert (found.server, found.api_key, found.server_from) == (
        "http://env.example:2", "from-env", "env")
    found = client_config("https://flag.example:3/", "from-flag", env=env)
    assert (found.server, found.api_key, found.server_from) == (
        "https://flag.example:3", "from-flag", "flag")

    nothing = client_config(env={"XDG_CONFIG_HOME": str(tmp_path / "empty")})
    assert (nothing.server, nothing.api_key, nothing.explicit) == (
        "http://127.0.0.1:8080", None, False)
    (tmp_path / "xdg" / "oneoff").mkdir(parents=True)
    (tmp_path / "xdg" / "oneoff" / "config.yaml").write_text("apiKey: from-xdg\n")
    home = client_config(env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert (home.api_key, home.explicit) == ("from-xdg", False)

    config.write_text("server: http://x:1\napi_key: typo\n")
    with pytest.raises(UsageError, match=r"client\.yaml: unknown key\(s\) api_key"):
        client_config(env={"ONEOFF_CLIENT_CONFIG": str(config)})
    with pytest.raises(UsageError, match="does not exist"):
        client_config(env={"ONEOFF_CLIENT_CONFIG": str(tmp_path / "missing.yaml")})
    with pytest.raises(UsageError, match="is not an http:// or https:// URL"):
        client_config("127.0.0.1:8080", env={})


# --- problem+json → exit codes, against a server that answers what it is told --------


class Canned(ThreadingHTTPServer):
    """Answers every request with one status, content type and body; keeps the requests."""

    def __init__(self, status: int, body: str, content_type: str) -> None:
        self.answer = (status, body, content_type)
        self.requests: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), CannedHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class CannedHandler(BaseHTTPRequestHandler):
    server: Canned

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append({"method": self.command, "path": self.path,
                                     "headers": dict(self.headers),
                                     "body": self.rfile.read(length).decode()})
        status, body, content_type = self.server.answer
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[Callable[..., Canned]]:
    started: list[Canned] = []

    def start(status: int, body: Any, content_type: str = "application/problem+json"
              ) -> Canned:
        server = Canned(status, body if isinstance(body, str) else json.dumps(body),
                        content_type)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def problem(status: int, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": "https://oneoff.dev/problems/x", "title": "X", "status": status,
            "detail": detail, "instance": "/api/v1/executions/abc/cancel", **extra}


@pytest.mark.parametrize(("status", "code", "message"), [
    (401, 3, "error: unknown API key (HTTP 401); check the key given by --api-key"),
    (403, 3, "error: API key 'ro' lacks the 'cancel' scope (HTTP 403)"),
    (404, 1, "error: no run 'abc'"),
    (409, 1, "error: run abc has already finished (succeeded)"),
    (400, 2, "error: the server refused the request (HTTP 400): bad query"),
    (500, 3, "error: the server answered HTTP 500 X: internal error"),
    (503, 3, "error: the server answered HTTP 503 X"),
])
def test_problem_answers_become_exit_codes(
    tmp_path: Path, canned: Callable[..., Canned], status: int, code: int, message: str
) -> None:
    details = {401: "unknown API key", 403: "API key 'ro' lacks the 'cancel' scope",
               404: "no run 'abc'", 409: "run abc has already finished (succeeded)",
               400: "bad query", 500: "internal error", 503: "unavailable"}
    server = canned(status, problem(status, details[status]))
    result = cli(tmp_path, "cancel", "abc", server=server.url, key="oo_secret")
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    sent = server.requests[0]
    assert (sent["method"], sent["path"]) == ("POST", "/api/v1/executions/abc/cancel")
    assert sent["headers"]["Authorization"] == "Bearer oo_secret"


def test_validation_problems_name_fields_and_exit_2(
    tmp_path: Path, canned: Callable[..., Canned]
) -> None:
    server = canned(422, problem(422, "1 problem(s)", errors=[
        {"field": "spec.scopes.0", "message": "Input should be 'read', 'run'", "file": "body"}]))
    result = cli(tmp_path, "keys", "create", "ci", "--scope", "read", server=server.url)
    assert result.returncode == 2
    assert "error: body: spec.scopes.0: Input should be 'read', 'run'" in result.stderr
    sent = json.loads(server.requests[0]["body"])
    assert server.requests[0]["path"] == "/api/v1/namespaces/default/apikeys?fieldManager=cli"
    assert sent["spec"] == {"scopes": ["read"]} and sent["metadata"] == {"name": "ci"}


def test_something_that_is_not_a_oneoff_server_is_reported_as_such(
    tmp_path: Path, canned: Callable[..., Canned]
) -> None:
    page = canned(200, "<html>hello</html>", "text/html")
    result = cli(tmp_path, "get", "jobs", server=page.url)
    assert result.returncode == 3
    assert "is this a OneOff server?" in result.stderr
    missing = canned(404, "<html>no</html>", "text/html")
    result = cli(tmp_path, "get", "job", "x", "-o", "json", server=missing.url)
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_the_default_server_answering_html_is_not_mistaken_for_oneoff(
    tmp_path: Path, canned: Callable[..., Canned]
) -> None:
    """The probe asks /healthz: a stray web server does not take the read verbs over."""
    page = canned(404, "<html>not here</html>", "text/html")
    from oneoff.client import ApiClient, ClientConfig

    client = ApiClient(ClientConfig(server=page.url))
    try:
        assert client.probe() is False
    finally:
        client.close()


# --- apply's body: files joined, lines mapped back -----------------------------------


def test_apply_bundle_maps_body_lines_back_to_each_file(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "sub").mkdir(parents=True)
    (root / "a.yaml").write_text("one: 1\ntwo: 2\nthree: 3")  # no final newline
    (root / "sub" / "b.yml").write_text("---\nx: 1\n---\ny: 2\n")
    (root / ".hidden.yaml").write_text("ignored: true\n")
    (root / "notes.txt").write_text("not a manifest\n")
    bundle = Bundle.from_paths((str(root),), 1 << 20)
    assert [part.file for part in bundle.parts] == [str(root / "a.yaml"),
                                                   str(root / "sub" / "b.yml")]
    lines = bundle.text.splitlines()
    for part in bundle.parts:
        content = Path(part.file).read_text().splitlines()
        for index, text in enumerate(content):
            assert lines[part.first - 1 + index] == text
            assert bundle.locate(part.first + index) == (part.file, index + 1)
    assert lines[bundle.parts[1].first - 2] == f"--- # file: {root / 'sub' / 'b.yml'}"
    assert bundle.origin == str(root / "a.yaml")
    moved = bundle.issue(Issue(bundle.origin, "bad", line=bundle.parts[1].first + 3, column=1))
    assert str(moved) == f"{root / 'sub' / 'b.yml'}:4:1: bad"
    placed = Issue(str(root / "sub" / "b.yml"), "bad", line=4)  # the server placed it
    assert bundle.issue(placed) == placed
    assert list(yaml.safe_load_all(bundle.text)) == [
        {"one": 1, "two": 2, "three": 3}, None, {"x": 1}, {"y": 2}]

    (tmp_path / "é.yaml").write_text("z: 1\n")  # no header can carry this name: a separator
    odd = Bundle.from_paths((str(tmp_path / "é.yaml"),), 1 << 20)
    assert odd.origin == REQUEST_FILE and odd.text == f"--- # file: {tmp_path / 'é.yaml'}\nz: 1\n"
    assert odd.locate(2) == (str(tmp_path / "é.yaml"), 1)

    single = Bundle.from_paths((str(root / "a.yaml"),), 1 << 20)
    assert single.origin == str(root / "a.yaml")
    assert single.text == "one: 1\ntwo: 2\nthree: 3\n"
    plan = single.plan({"changes": [{"location": f"{root / 'a.yaml'}:2"}], "issues": []})
    assert plan["changes"][0]["location"] == f"{root / 'a.yaml'}:2"
