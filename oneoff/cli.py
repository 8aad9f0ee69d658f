"""The ``oneoff`` command: a kubectl-style CLI over a OneOff server or its state file.

The top of the stack: parses arguments with click, gets documents from a
:class:`~oneoff.client.ApiClient` or a :class:`~oneoff.client.StateReader` (both answer
in the API's JSON shapes), renders them as tables, JSON or YAML, and maps every
:class:`~oneoff.errors.OneOffError` to one clear line and an exit code in :func:`main`.

Exit codes: 0 success; 1 ``diff`` found changes, a run did not succeed, or the target
was not found or is in a state that refuses the request (404, 409); 2 usage or
validation error (400, 413, 422); 3 cannot reach or use the server (connection refused,
timeout, 401, 403, 5xx) or the state file.

Which one answers (read verbs ``get``, ``describe``, ``logs``, ``diff``): ``--state`` /
``ONEOFF_STATE`` reads that state file; otherwise the server (``--server``,
``ONEOFF_SERVER``, the client config file, the default); only when the server is the
default one and does not answer, ``./oneoff.db`` is read instead, with a note on stderr.
Verbs that change something (``apply``, ``run``, ``cancel``, ``delete``, ``keys
create|revoke``) always need the server.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from ruamel.yaml import YAML

from oneoff.client import (
    ApiClient,
    Bundle,
    Reader,
    StateReader,
    client_config,
    list_document,
    listening,
)
from oneoff.errors import (
    ApplyConflict,
    Conflict,
    Forbidden,
    Issue,
    ManifestError,
    NotFound,
    OneOffError,
    PlanRefused,
    ServerError,
    StoreError,
    Unauthorized,
    Unreachable,
    UsageError,
)
from oneoff.loader import DEFAULT_MAX_FILE_BYTES, check_references, load_paths
from oneoff.manifests import API_VERSION, KINDS, json_schemas
from oneoff.plan import plan, plan_document
from oneoff.reconciler import directory_source_name
from oneoff.records import RunStatus, Stored, parse_selector
from oneoff.settings import explain_settings, load_settings
from oneoff.store import Store, page_audit

EXIT_OK, EXIT_CHANGES, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
LOCAL_STATE = "./oneoff.db"
"""What ``oneoff serve`` writes by default, and what the CLI reads when no server runs."""
TOKEN_PREFIX = "oo_"
"""The prefix of generated API tokens (as the server's own), so scanners can spot them."""

KIND_NAMES = {
    **{alias: kind for kind in KINDS for alias in (kind.lower(), kind.lower() + "s")},
    "keys": "ApiKey",
    "key": "ApiKey",
    "sources": "Source",
    "executions": "Execution",
    "execution": "Execution",
    "runs": "Execution",
    "run": "Execution",
    "source": "Source",
}
FINAL = {status.value for status in RunStatus if status.final}

state_option = click.option(
    "--state",
    envvar="ONEOFF_STATE",
    default=None,
    help="Read this SQLite state file instead of asking the server [env ONEOFF_STATE].",
)
output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    help="Output format.",
)


def server_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--server`` and ``--api-key`` (their environment and config file are read by
    ``client.client_config``, which needs to know where a value came from)."""
    command = click.option(
        "--api-key", default=None, metavar="TOKEN",
        help="API key [env ONEOFF_API_KEY; config file apiKey].")(command)
    return click.option(
        "--server", default=None, metavar="URL",
        help="OneOff server [env ONEOFF_SERVER; config file server; "
        "default http://127.0.0.1:8080].")(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="oneoff")
def cli() -> None:
    """OneOff: declarative one-time jobs. Manifests in ./jobs.d, state in ./oneoff.db."""


# --- serve ---------------------------------------------------------------------------


@cli.command()
@click.option("--state", help="SQLite state file [env ONEOFF_STATE; default ./oneoff.db]")
@click.option(
    "--manifests",
    multiple=True,
    help="Watched directory, repeatable [env ONEOFF_MANIFESTS; default ./jobs.d]",
)
@click.option("--listen", help="API/UI address [env ONEOFF_LISTEN; default 127.0.0.1:8080]")
@click.option("--workers", type=int, help="Concurrent runs [env ONEOFF_WORKERS; default 8]")
@click.option(
    "--prune-max-share",
    type=float,
    help="Refuse reconciles deleting more than this share of a source; 1 = off "
    "[env ONEOFF_PRUNE_MAX_SHARE; default 0.5]",
)
@click.option("--resync-seconds", type=float, help="Periodic full reconcile [default 60]")
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Serve the API beyond loopback although no ApiKey is declared [env ONEOFF_INSECURE]",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    help="Log lines [env ONEOFF_LOG_FORMAT; default json off a terminal]",
)
@click.option("--config", "config_file", help="YAML file of settings [env ONEOFF_CONFIG]")
def serve(config_file: str | None, **flags: Any) -> int:
    """Reconcile the manifest directories into the state file and keep watching them."""
    from oneoff import daemon  # the server's imports (aiohttp, asyncio) are not the CLI's

    settings = load_settings(flags, config_file=config_file)
    daemon.serve(settings)
    return EXIT_OK


@cli.command("config", params=list(serve.params))
@output_option
def config(config_file: str | None, output: str, **flags: Any) -> int:
    """Print the settings 'oneoff serve' would use (same flags), where each comes from
    (flag, env, file, default), secrets masked; and the CLI's own server and key."""
    rows: list[dict[str, Any]] = [
        {"name": name, "value": list(value) if isinstance(value, tuple) else value,
         "source": source}
        for name, value, source in explain_settings(flags, config_file=config_file)]
    client = client_config()
    key_from = ("env ONEOFF_API_KEY" if os.environ.get("ONEOFF_API_KEY")
                else f"file {client.config_file}" if client.api_key else "default")
    rows += [{"name": "server", "value": client.server,
              "source": {"env": "env ONEOFF_SERVER", "file": f"file {client.config_file}"}.get(
                  client.server_from, client.server_from)},
             {"name": "api_key", "value": "********" if client.api_key else None,
              "source": key_from}]
    if output != "table":
        click.echo(dump({row["name"]: {"value": row["value"], "source": row["source"]}
                         for row in rows}, output), nl=False)
        return EXIT_OK
    table = [["SETTING", "VALUE", "SOURCE"]]
    table += [[row["name"], "" if row["value"] is None else
               ":".join(row["value"]) if isinstance(row["value"], list) else str(row["value"]),
               row["source"]] for row in rows]
    click.echo(_format_rows(table), nl=False)
    return EXIT_OK


# --- where documents come from -------------------------------------------------------


def open_reader(state: str | None, server: str | None, api_key: str | None) -> Reader:
    """The state file when one is named, else the server; the default server's silence
    falls back to ``./oneoff.db`` (module docstring)."""
    if state:
        return StateReader(state)
    config = client_config(server, api_key)
    if config.explicit:
        return ApiClient(config)
    if listening(config.server):
        client = ApiClient(config)
        if client.probe():
            return client
        client.close()
    if os.path.exists(LOCAL_STATE):
        click.echo(f"(no OneOff server answers at {config.server}: reading {LOCAL_STATE})",
                   err=True)
        return StateReader(LOCAL_STATE)
    raise Unreachable(
        f"cannot reach the OneOff server at {config.server}, and there is no state file "
        f"{LOCAL_STATE} to read instead; start 'oneoff serve', or pass --server or --state")


def open_client(server: str | None, api_key: str | None) -> ApiClient:
    """The server, for verbs that change something (no fallback: a state file is
    written only by its server)."""
    return ApiClient(client_config(server, api_key))


@contextmanager
def progress(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while something slow happens, only on a terminal; yields a
    function that changes the message."""
    if not sys.stderr.isatty():
        yield lambda text: None
        return
    state = {"message": message, "drawn": ""}
    done = threading.Event()

    def spin() -> None:
        if done.wait(0.3):  # quick operations show nothing
            return
        for frame in itertools.cycle("|/-\\"):
            sys.stderr.write(f"\r\x1b[K{frame} {state['message']}")
            sys.stderr.flush()
            state["drawn"] = "yes"
            if done.wait(0.1):
                return

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield lambda text: state.update(message=text)
    finally:
        done.set()
        thread.join()
        if state["drawn"]:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# --- validate / apply / diff ---------------------------------------------------------


@cli.command()
@click.argument("paths", nargs=-1, required=True)
def validate(paths: tuple[str, ...]) -> int:
    """Check manifest files and directories; print every error with file:line."""
    result = load_paths(paths)
    check_references(result)
    if result.issues:
        raise ManifestError(result.issues)
    click.echo(f"{len(result.objects)} objects in {len(result.files)} files are valid")
    return EXIT_OK


filename_option = click.option(
    "-f", "--filename", "paths", multiple=True, required=True,
    help="Manifest file or directory, repeatable; - reads standard input.")
field_manager_option = click.option(
    "--field-manager", default="cli", show_default=True,
    help="The server-side source of what is applied is api:NAME.")


@cli.command()
@filename_option
@click.option("--dry-run", is_flag=True, help="Only show the plan; change nothing.")
@click.option("--prune", is_flag=True,
              help="Delete objects of this field manager that PATH no longer declares.")
@click.option("--force", is_flag=True, help="Take over objects another source owns.")
@field_manager_option
@output_option
@server_options
def apply(paths: tuple[str, ...], dry_run: bool, prune: bool, force: bool, field_manager: str,
          output: str, server: str | None, api_key: str | None) -> int:
    """Send manifests to the server and print the plan it applied (or would apply)."""
    with closing(open_client(server, api_key)) as client:
        result = _server_plan(client, paths, dry_run=dry_run, prune=prune, force=force,
                              field_manager=field_manager)
    if output != "table":
        click.echo(dump(result, output), nl=False)
    else:
        click.echo(render_plan(result["plan"]), nl=False)
        if result.get("dryRun"):
            click.echo("(dry run: nothing was changed)", err=True)
    _raise_plan_problems(result["plan"])
    return EXIT_OK


def _server_plan(client: ApiClient, paths: tuple[str, ...], **options: Any) -> dict[str, Any]:
    """Read PATH like the loader does, send it as one apply, return the server's answer
    (a refused apply's plan is printed before its error propagates)."""
    with progress("reading manifests") as say:
        bundle = Bundle.from_paths(paths, DEFAULT_MAX_FILE_BYTES)
        if bundle.issues:
            raise ManifestError(bundle.issues)
        if not bundle.parts:
            raise UsageError(f"no manifest files (.yaml, .yml) in {', '.join(paths)}")
        say(f"{'planning' if options['dry_run'] else 'applying'} {len(bundle.parts)} file(s) "
            f"on {client.where}")
        try:
            return client.apply(bundle, **options)
        except ApplyConflict as exc:
            refused = exc
    if refused.plan is not None:
        click.echo(render_plan(refused.plan), nl=False)
    raise refused


def _raise_plan_problems(plan_doc: dict[str, Any]) -> None:
    issues = [Issue(**issue) for issue in plan_doc.get("issues", [])]
    if issues:
        raise ManifestError(issues)
    if plan_doc.get("refused"):
        raise PlanRefused(plan_doc["refused"])


@cli.command()
@filename_option
@click.option(
    "--prune", is_flag=True, help="Also show deletes for a file source (a directory always "
    "prunes against a state file).")
@field_manager_option
@state_option
@server_options
def diff(paths: tuple[str, ...], prune: bool, field_manager: str, state: str | None,
         server: str | None, api_key: str | None) -> int:
    """Show what applying PATH would change; exit 0 no change, 1 changes, 2 errors.

    Against a server this is ``apply --dry-run``; against a state file (``--state``, or
    no server running) a directory is compared as the directory source it would be.
    """
    if state and not os.path.exists(state):
        click.echo(f"(no state file at {state}: comparing with an empty state)", err=True)
        plan_doc = _local_plan(paths, prune, field_manager, None)
    else:
        with closing(open_reader(state, server, api_key)) as reader:
            if isinstance(reader, ApiClient):
                try:
                    result = _server_plan(reader, paths, dry_run=True, prune=prune,
                                          force=False, field_manager=field_manager)
                except ApplyConflict as exc:  # like kubectl diff: anything but a plan is > 1
                    raise (ManifestError(exc.issues) if exc.issues else PlanRefused(str(exc))
                           ) from None
                plan_doc = result["plan"]
            else:
                assert isinstance(reader, StateReader)
                plan_doc = _local_plan(paths, prune, field_manager, reader.store)
    click.echo(render_plan(plan_doc), nl=False)
    _raise_plan_problems(plan_doc)
    counts = plan_doc["counts"]
    return EXIT_CHANGES if any(counts.get(a) for a in ("create", "update", "delete")) else EXIT_OK


def _local_plan(paths: tuple[str, ...], prune: bool, field_manager: str, store: Store | None
                ) -> dict[str, Any]:
    if len(paths) == 1 and os.path.isdir(paths[0]):
        source, prune = directory_source_name(paths[0]), True
    else:
        source = f"api:{field_manager}"
    stored: list[Stored] = store.objects() if store is not None else []
    result = load_paths(paths)
    check_references(result, (obj.key for obj in stored if obj.source != source))
    declared = {obj.key for obj in result.objects}
    return plan_document(plan(
        source,
        result.objects,
        [o for o in stored if o.source == source or o.key in declared],
        kept_keys=result.failed_keys,
        kept_files=result.failed_files,
        issues=result.issues,
        prune=prune,
        max_prune_share=load_settings().prune_max_share,
    ))


def render_plan(plan_doc: dict[str, Any]) -> str:
    """A plan document as a person reads it: one line per change, field diffs indented."""
    marks = {"create": "+", "update": "~", "delete": "-"}
    out = io.StringIO()
    for change in plan_doc["changes"]:
        key = f"{change['kind']} {change['namespace']}/{change['name']}"
        if change["action"] == "unchanged":
            if change.get("note"):
                out.write(f"  {key}: {change['note']}\n")
            continue
        where = change.get("location")
        out.write(f"{marks[change['action']]} {change['action']} {key}"
                  + (f"  ({where})" if where else "") + "\n")
        for field_diff in change.get("diffs", []):
            path, op = field_diff["path"], field_diff["op"]
            if op == "add":
                out.write(f"    + {path}: {_short(field_diff['after'])}\n")
            elif op == "remove":
                out.write(f"    - {path}: {_short(field_diff['before'])}\n")
            else:
                out.write(f"    ~ {path}: {_short(field_diff['before'])} → "
                          f"{_short(field_diff['after'])}\n")
        if change["action"] == "update" and not change.get("specChanged") and change.get(
                "diffs"):
            out.write("    (metadata only: generation unchanged)\n")
    out.write(f"Plan for {plan_doc['source']}: {plan_doc['summary']}\n")
    return out.getvalue()


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


# --- get -----------------------------------------------------------------------------


def _kind(kind: str) -> str:
    resolved = KIND_NAMES.get(kind.lower())
    if resolved is None:
        raise UsageError(
            f"unknown kind {kind!r}; use one of jobs, chains, webhooks, apikeys, executions, "
            "sources"
        )
    return resolved


@cli.command()
@click.argument("kind")
@click.argument("name", required=False)
@output_option
@click.option("-l", "--selector", default="", help="Label selector, e.g. team=billing,env!=dev.")
@click.option("-n", "--namespace", default=None, help="Namespace [default: default].")
@click.option("-A", "--all-namespaces", is_flag=True, help="List across all namespaces.")
@click.option("--job", default=None, help="Executions: only this job's.")
@click.option("--status", default=None, help="Executions: only this status.")
@click.option("--limit", default=50, show_default=True, help="Executions: at most this many.")
@state_option
@server_options
def get(
    kind: str,
    name: str | None,
    output: str,
    selector: str,
    namespace: str | None,
    all_namespaces: bool,
    job: str | None,
    status: str | None,
    limit: int,
    state: str | None,
    server: str | None,
    api_key: str | None,
) -> int:
    """List objects of KIND (jobs, chains, webhooks, apikeys, executions, sources, audit).

    ``get audit [TEXT]``: the audit log, newest first; TEXT matches part of the target,
    e.g. a run id to see who cancelled it (needs an admin key on a server with keys)."""
    if kind.lower() == "audit":
        return _get_audit(name, limit, output, state, server, api_key)
    resolved = _kind(kind)
    try:
        parse_selector(selector)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ns = None if all_namespaces else (namespace or "default")
    with closing(open_reader(state, server, api_key)) as reader:
        if resolved == "Source":
            sources = reader.sources()
            click.echo(render_sources(sources) if output == "table" else
                       dump({"items": sources}, output), nl=False)
            return EXIT_OK
        if resolved == "Execution":
            return _get_executions(reader, name, job, ns, status, limit, output)
        documents = reader.objects(resolved, ns, selector, name, runs=output != "table")
    if name is not None and not documents:
        raise NotFound(f"{resolved} {ns or '*'}/{name} not found")
    _print_objects(resolved, documents, output, ns, one=name is not None)
    return EXIT_OK


def _get_audit(target: str | None, limit: int, output: str, state: str | None,
               server: str | None, api_key: str | None) -> int:
    with closing(open_reader(state, server, api_key)) as reader:
        items: list[dict[str, Any]]
        if isinstance(reader, StateReader):
            entries, _ = page_audit(reader.store, target=target, limit=limit)
            items = [{"seq": e.seq, "at": e.at, "key": e.key, "action": e.action,
                      "target": e.target, "detail": e.detail, "remote": e.remote}
                     for e in entries]
        else:
            assert isinstance(reader, ApiClient)
            items = reader.json("GET", "/api/v1/audit",
                                params={"target": target, "limit": limit})["items"]
    if output != "table":
        click.echo(dump(list_document(items), output), nl=False)
        return EXIT_OK
    if not items:
        click.echo("No audit entries found.", err=True)
        return EXIT_OK
    rows = [["AT", "KEY", "ACTION", "TARGET", "FROM", "DETAIL"]]
    rows += [[item["at"], item["key"] or "(no key)", item["action"], item["target"],
              item["remote"] or "", json.dumps(item["detail"], sort_keys=True)
              if item["detail"] else ""] for item in items]
    click.echo(_format_rows(rows), nl=False)
    return EXIT_OK


def _print_objects(kind: str, documents: list[dict[str, Any]], output: str, ns: str | None,
                   one: bool = False) -> None:
    if output == "table":
        if not documents:
            where = "any namespace" if ns is None else f"namespace {ns!r}"
            click.echo(f"No {kind} objects found in {where}.", err=True)
            return
        click.echo(render_table(kind, documents, wide_namespace=ns is None), nl=False)
    else:
        click.echo(dump(documents[0] if one else list_document(documents), output), nl=False)


def dump(value: Any, output: str) -> str:
    if output == "json":
        return json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    out = io.StringIO()
    yaml.dump(value, out)
    return out.getvalue()


Column = tuple[str, Callable[[dict[str, Any]], str]]


def _schedule(doc: dict[str, Any]) -> str:
    schedule = doc["spec"].get("schedule")
    if not schedule:
        text = "on demand"
    elif "cron" in schedule:
        text = f"cron {schedule['cron']}" + (
            f" ({schedule['timeZone']})" if schedule.get("timeZone", "UTC") != "UTC" else ""
        )
    elif "after" in schedule:
        text = f"after {schedule['after']}"
    else:
        text = f"at {schedule['at']}"
    return text + (" (suspended)" if doc["spec"].get("suspend") else "")


def _source(doc: dict[str, Any]) -> str:
    source = doc["status"]["source"]
    if source.get("file"):
        return f"{source['file']}:{source['line']}" if source.get("line") else source["file"]
    return str(source.get("name", ""))


def _age(doc: dict[str, Any]) -> str:
    created = datetime.fromisoformat(doc["metadata"]["creationTimestamp"])
    seconds = int((datetime.now(UTC) - created).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


COLUMNS: dict[str, list[Column]] = {
    "Job": [
        ("NAME", lambda d: d["metadata"]["name"]),
        (
            "TYPE",
            lambda d: next(
                (t for t in ("http", "shell", "docker", "kubernetes") if t in d["spec"]), "?"
            ),
        ),
        ("SCHEDULE", _schedule),
        ("PRIORITY", lambda d: str(d["spec"].get("priority", 5))),
        ("GEN", lambda d: str(d["metadata"]["generation"])),
        ("SOURCE", _source),
        ("AGE", _age),
    ],
    "Chain": [
        ("NAME", lambda d: d["metadata"]["name"]),
        ("STEPS", lambda d: str(len(d["spec"].get("steps", [])))),
        ("SCHEDULE", _schedule),
        ("GEN", lambda d: str(d["metadata"]["generation"])),
        ("SOURCE", _source),
        ("AGE", _age),
    ],
    "Webhook": [
        ("NAME", lambda d: d["metadata"]["name"]),
        ("URL", lambda d: d["spec"]["url"]),
        ("EVENTS", lambda d: ",".join(d["spec"].get("events", []))),
        ("FORMAT", lambda d: d["spec"].get("format", "standard")),
        ("SOURCE", _source),
        ("AGE", _age),
    ],
    "ApiKey": [
        ("NAME", lambda d: d["metadata"]["name"]),
        ("SCOPES", lambda d: ",".join(d["spec"].get("scopes", []))),
        ("NAMESPACES", lambda d: ",".join(d["spec"].get("namespaces") or ["*"])),
        ("EXPIRES", lambda d: d["spec"].get("expiresAt") or "never"),
        ("DISABLED", lambda d: str(d["spec"].get("disabled", False)).lower()),
        ("LAST USED", lambda d: d["status"].get("lastUsedAt") or "-"),
        ("SOURCE", _source),
        ("AGE", _age),
    ],
}


def render_table(kind: str, documents: Sequence[dict[str, Any]], wide_namespace: bool) -> str:
    columns = COLUMNS[kind]
    if wide_namespace:
        columns = [("NAMESPACE", lambda d: d["metadata"]["namespace"]), *columns]
    rows = [[title for title, _ in columns]]
    rows.extend([cell(doc) for _, cell in columns] for doc in documents)
    return _format_rows(rows)


def _format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def render_sources(sources: Sequence[dict[str, Any]]) -> str:
    rows = [["SOURCE", "OK", "OBJECTS", "LAST SYNC", "MESSAGE"]]
    rows.extend(
        [source["name"], "yes" if source["ok"] else "no", str(source["objects"]),
         source.get("lastSyncAt") or "never", source.get("message") or ""]
        for source in sources
    )
    text = _format_rows(rows)
    for source in sources:
        text += "".join(f"  {Issue(**issue)}\n" for issue in source.get("issues", []))
    return text


# --- runs ----------------------------------------------------------------------------


def _duration(doc: dict[str, Any]) -> str:
    status = doc["status"]
    if not status.get("startedAt"):
        return ""
    finished = status.get("finishedAt")
    end = datetime.fromisoformat(finished) if finished else datetime.now(UTC)
    seconds = (end - datetime.fromisoformat(status["startedAt"])).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _result(doc: dict[str, Any]) -> str:
    status = doc["status"]
    result = (
        f"exit {status['exitCode']}" if status.get("exitCode") is not None
        else f"HTTP {status['httpStatus']}" if status.get("httpStatus") is not None
        else ""
    )
    if status.get("error") and status["phase"] != RunStatus.SUCCEEDED:
        result = (result + ": " if result else "") + status["error"].splitlines()[0][:60]
    return result


def render_executions(documents: Sequence[dict[str, Any]], wide_namespace: bool) -> str:
    """Execution documents (``records.execution_document``) as a table."""
    rows = [["RUN", "JOB", "TYPE", "STATUS", "ATTEMPT", "SCHEDULED", "DURATION", "RESULT"]]
    if wide_namespace:
        rows[0].insert(1, "NAMESPACE")
    for doc in documents:
        spec, status = doc["spec"], doc["status"]
        row = [doc["metadata"]["name"], spec["job"], spec["type"], status["phase"],
               str(status["attempt"]), spec["scheduledAt"], _duration(doc), _result(doc)]
        if wide_namespace:
            row.insert(1, doc["metadata"]["namespace"])
        rows.append(row)
    return _format_rows(rows)


def _get_executions(
    reader: Reader, run_id: str | None, job: str | None, namespace: str | None,
    status: str | None, limit: int, output: str,
) -> int:
    if run_id is not None:
        documents = [reader.execution(run_id)]
    else:
        documents = reader.executions(namespace, job, status, limit)
    if output == "table":
        if not documents:
            click.echo("No executions found.", err=True)
            return EXIT_OK
        click.echo(render_executions(documents, wide_namespace=namespace is None), nl=False)
        return EXIT_OK
    body = documents[0] if run_id is not None else list_document(documents)
    click.echo(dump(body, output), nl=False)
    return EXIT_OK


@cli.command()
@click.argument("kind", type=click.Choice(["job"]))
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@state_option
@server_options
def describe(kind: str, name: str, namespace: str, state: str | None, server: str | None,
             api_key: str | None) -> int:
    """Show a job: spec, source, conditions, last and next run, recent runs."""
    with closing(open_reader(state, server, api_key)) as reader:
        document = reader.object("Job", namespace, name)
        runs = reader.executions(namespace, name, None, 10)
    metadata, status = document["metadata"], document["status"]
    source = status.get("source", {})
    last = status.get("lastRun")
    lines = [
        f"Name:         {name}",
        f"Namespace:    {namespace}",
        f"UID:          {metadata['uid']}",
        f"Generation:   {metadata['generation']}",
        f"Created:      {metadata['creationTimestamp']}",
        f"Source:       {source.get('name', '-')}",
        f"File:         {_source(document) if source.get('file') else '-'}",
        "Labels:       " + (",".join(f"{k}={v}" for k, v in metadata.get("labels", {}).items())
                            or "-"),
        f"Schedule:     {_schedule(document)}",
        f"Next run:     {status.get('nextRunAt', '-')}",
        f"Last run:     {last['id'] + ' ' + last['status'] if last else '-'}",
        "Conditions:",
        *(f"  {c['type']}={c['status']} {c['reason']}: {c['message']} "
          f"(generation {c['observedGeneration']})"
          for c in status.get("conditions", [])),
        "Spec:",
        *(f"  {line}" for line in dump(document["spec"], "yaml").splitlines()),
        "Recent runs:",
        *(f"  {line}" for line in render_executions(runs, False).splitlines()),
    ]
    if not runs:
        lines.append("  none yet")
    click.echo("\n".join(lines))
    return EXIT_OK


def _find_run(reader: Reader, run: str, namespace: str) -> dict[str, Any]:
    """RUN as a run id, else the latest run of the job named RUN."""
    try:
        return reader.execution(run)
    except NotFound:
        latest = reader.executions(namespace, run, None, 1)
    if not latest:
        raise NotFound(f"no run {run!r}, and no job {namespace}/{run} with runs")
    return reader.execution(latest[0]["metadata"]["name"])


def _status_line(doc: dict[str, Any]) -> str:
    status = doc["status"]
    error = status.get("error") or ""
    detail = f": {error}" if error and error != status["phase"] else ""
    took = f" in {_duration(doc)}" if status.get("finishedAt") and _duration(doc) else ""
    return f"[run {doc['metadata']['name']} {status['phase']}{took}{detail}]"


def _follow(reader: Reader, run_id: str, show_output: bool, poll: float = 0.25
            ) -> dict[str, Any]:
    """Print the run's output as it is produced (when asked) until the run is final;
    returns its final document. Streams from the server when there is one, and polls
    (the server without streaming, or a state file the server writes) otherwise."""
    printed = 0

    def emit(text: str) -> None:
        nonlocal printed
        if len(text) > printed:
            click.echo(text[printed:], nl=False)
            sys.stdout.flush()
            printed = len(text)

    if not show_output:
        with progress(f"waiting for run {run_id}") as say:
            if isinstance(reader, ApiClient):
                return _await_events(reader, run_id, say)
            while (doc := reader.execution(run_id))["status"]["phase"] not in FINAL:
                say(f"run {run_id} is {doc['status']['phase']}")
                time.sleep(poll)
        return doc
    if isinstance(reader, ApiClient):
        with reader.stream(f"/api/v1/executions/{run_id}/output", {"follow": True}) as chunks:
            streamed = ""
            for chunk in chunks:
                streamed += chunk
                emit(streamed)
    while True:
        doc = reader.execution(run_id)
        emit(reader.output(run_id))  # what the stream missed, or all of it when polling
        if doc["status"]["phase"] in FINAL:
            return doc
        time.sleep(poll)


def _await_events(client: ApiClient, run_id: str, say: Callable[[str], None]
                  ) -> dict[str, Any]:
    """Wait on the event stream (no polling) for the run's final status."""
    doc = client.execution(run_id)
    params = {"types": "execution.", "namespace": doc["metadata"]["namespace"],
              "job": doc["spec"]["job"]}
    with client.events(params) as events:
        doc = client.execution(run_id)  # what happened before the stream was there
        if doc["status"]["phase"] in FINAL:
            return doc
        for event in events:
            if event.get("data", {}).get("run") != run_id:
                continue
            now = str(event["type"]).removeprefix("execution.")
            say(f"run {run_id} is {now}")
            if now in FINAL:
                return client.execution(run_id)
    raise Unreachable(f"{client.where} closed the event stream before run {run_id} finished; "
                      f"see 'oneoff get executions {run_id}'")


@cli.command()
@click.argument("run")
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Namespace of the job when RUN is a job name.")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing the output as it is produced until the run ends.")
@state_option
@server_options
def logs(run: str, namespace: str, follow: bool, state: str | None, server: str | None,
         api_key: str | None) -> int:
    """Print the output of RUN (a run id, or a job name for its latest run)."""
    with closing(open_reader(state, server, api_key)) as reader:
        found = _find_run(reader, run, namespace)
        run_id = found["metadata"]["name"]
        if follow:
            found = _follow(reader, run_id, show_output=True)
            click.echo(_status_line(found), err=True)
            return EXIT_OK
        output = reader.output(run_id)
    click.echo(output, nl=False)
    if found["status"]["phase"] != RunStatus.SUCCEEDED:
        click.echo(_status_line(found), err=True)
    return EXIT_OK


# --- actions: run / cancel / delete --------------------------------------------------


@cli.command()
@click.argument("job")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--wait", is_flag=True, help="Wait until the run is final; exit 0 only if it "
              "succeeded.")
@click.option("-f", "--follow", is_flag=True, help="Print its output as it runs (implies "
              "--wait).")
@output_option
@server_options
def run(job: str, namespace: str, wait: bool, follow: bool, output: str, server: str | None,
        api_key: str | None) -> int:
    """Run JOB now (its overlapPolicy decides beside active runs); prints the run id."""
    with closing(open_client(server, api_key)) as client:
        doc = client.run(namespace, job)
        run_id = doc["metadata"]["name"]
        if output == "table":
            click.echo(run_id)
            sys.stdout.flush()
        if wait or follow:
            doc = _follow(client, run_id, show_output=follow)
            if output == "table":
                click.echo(_status_line(doc), err=True)
    if output != "table":
        click.echo(dump(doc, output), nl=False)
    phase = doc["status"]["phase"]
    if phase in FINAL and phase != RunStatus.SUCCEEDED:
        if not (wait or follow) and output == "table":
            click.echo(_status_line(doc), err=True)
        return EXIT_CHANGES
    return EXIT_OK


@cli.command()
@click.argument("run_id", required=False)
@click.option("--job", default=None, help="Cancel every active run of this job instead.")
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Namespace of --job.")
@output_option
@server_options
def cancel(run_id: str | None, job: str | None, namespace: str, output: str,
           server: str | None, api_key: str | None) -> int:
    """Cancel RUN_ID (pending, queued or running), or all active runs of --job."""
    if (run_id is None) == (job is None):
        raise UsageError("give either RUN_ID or --job NAME")
    with closing(open_client(server, api_key)) as client:
        if job is not None:
            cancelled = client.cancel_job(namespace, job)
            if output != "table":
                click.echo(dump({"cancelled": cancelled}, output), nl=False)
            elif not cancelled:
                click.echo(f"Job {namespace}/{job} has no active runs; nothing to cancel")
            else:
                click.echo("".join(f"run {run} cancelled\n" for run in cancelled), nl=False)
            return EXIT_OK
        assert run_id is not None
        doc = client.cancel_run(run_id)
    if output != "table":
        click.echo(dump(doc, output), nl=False)
        return EXIT_OK
    phase = doc["status"]["phase"]
    click.echo(f"run {run_id} cancelled" if phase == RunStatus.CANCELLED
               else f"run {run_id}: cancel requested (it is {phase})")
    return EXIT_OK


@cli.command()
@click.argument("kind")
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@output_option
@server_options
def delete(kind: str, name: str, namespace: str, output: str, server: str | None,
           api_key: str | None) -> int:
    """Delete an object the API created (a directory's objects are deleted from git)."""
    resolved = _kind(kind)
    if resolved not in KINDS:
        raise UsageError(f"cannot delete {kind!r}; use one of jobs, chains, webhooks, apikeys")
    with closing(open_client(server, api_key)) as client:
        deleted = client.delete(resolved, namespace, name)
    click.echo(dump(deleted, output) if output != "table"
               else f"{resolved} {namespace}/{name} deleted\n", nl=False)
    return EXIT_OK


@cli.command()
@output_option
@server_options
def whoami(output: str, server: str | None, api_key: str | None) -> int:
    """Show which key the server sees: its name, scopes and namespaces."""
    with closing(open_client(server, api_key)) as client:
        who = client.whoami()
    if output != "table":
        click.echo(dump(who, output), nl=False)
    elif not who.get("authenticated"):
        click.echo(f"anonymous on {client.where} (no ApiKey objects: auth is off); "
                   f"scopes {','.join(who.get('scopes', []))}")
    else:
        click.echo(f"{who['name']} on {client.where}: scopes {','.join(who['scopes'])}; "
                   f"namespaces {','.join(who['namespaces'] or ['*'])}")
    return EXIT_OK


# --- keys ----------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """API keys: generate one for a manifest, or create, list and revoke them on a server."""


scope_option = click.option(
    "--scope", "scopes", multiple=True,
    type=click.Choice(["read", "run", "cancel", "write", "admin"]),
    help="Repeatable: read, run, cancel, write (objects), admin (keys). Default: read.")


@keys.command("generate")
@click.option("--name", default="my-key", show_default=True, help="metadata.name of the "
              "manifest snippet.")
@scope_option
@output_option
def keys_generate(name: str, scopes: tuple[str, ...], output: str) -> int:
    """Print a new random token, its tokenSha256 and an ApiKey manifest (offline)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    sha = _sha256(token)
    manifest = {"apiVersion": API_VERSION, "kind": "ApiKey", "metadata": {"name": name},
                "spec": {"scopes": list(scopes or ["read"]), "tokenSha256": sha}}
    if output != "table":
        click.echo(dump({"token": token, "tokenSha256": sha, "manifest": manifest}, output),
                   nl=False)
        return EXIT_OK
    click.echo(
        "token (give it to the CLI or your application as ONEOFF_API_KEY; it is shown only\n"
        "here, and never goes into git):\n"
        f"  {token}\n"
        f"tokenSha256: {sha}\n\n"
        f"ApiKey manifest (only the hash), e.g. for jobs.d/{name}.yaml:\n"
        + dump(manifest, "yaml"), nl=False)
    return EXIT_OK


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def expires_at(text: str, now: datetime | None = None) -> str:
    """``30d``, ``12h``, ``90m``, ``2w`` from now, or an RFC 3339 instant with an offset."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text[:-1].isdigit() and text[-1:] in units:
        moment = (now or datetime.now(UTC)) + timedelta(seconds=int(text[:-1]) * units[text[-1]])
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        aware = datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None
    except ValueError:
        aware = False
    if not aware:
        raise UsageError(f"--expires {text!r}: use a duration like 30d, 12h, 2w, or an RFC 3339 "
                         "instant with an offset like 2030-01-01T00:00:00Z")
    return text


@keys.command("create")
@click.argument("name")
@scope_option
@click.option("--namespace", "namespaces", multiple=True,
              help="Repeatable: limit the key to this namespace (default: all).")
@click.option("--expires", default=None, help="30d, 12h, 2w, or an RFC 3339 instant.")
@output_option
@server_options
def keys_create(name: str, scopes: tuple[str, ...], namespaces: tuple[str, ...],
                expires: str | None, output: str, server: str | None, api_key: str | None
                ) -> int:
    """Create an API key on the server (admin scope); prints its token once."""
    spec: dict[str, Any] = {"scopes": list(scopes or ["read"])}
    if namespaces:
        spec["namespaces"] = list(namespaces)
    if expires:
        spec["expiresAt"] = expires_at(expires)
    document = {"apiVersion": API_VERSION, "kind": "ApiKey", "metadata": {"name": name},
                "spec": spec}
    with closing(open_client(server, api_key)) as client:
        created = client.create("ApiKey", "default", document)
    if output != "table":
        click.echo(dump(created, output), nl=False)
        return EXIT_OK
    click.echo(f"ApiKey default/{name} created (scopes {','.join(spec['scopes'])}"
               + (f", namespaces {','.join(namespaces)}" if namespaces else "")
               + (f", expires {spec['expiresAt']}" if expires else "")
               + "); its token follows and is shown only this once:", err=True)
    click.echo(created.get("token", ""))
    return EXIT_OK


@keys.command("list")
@output_option
@state_option
@server_options
def keys_list(output: str, state: str | None, server: str | None, api_key: str | None) -> int:
    """List API keys (scopes, namespaces, expiry, last use; never their secrets)."""
    with closing(open_reader(state, server, api_key)) as reader:
        documents = reader.objects("ApiKey", None)
    _print_objects("ApiKey", documents, output, None)
    return EXIT_OK


@keys.command("revoke")
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Namespace of the ApiKey object.")
@server_options
def keys_revoke(name: str, namespace: str, server: str | None, api_key: str | None) -> int:
    """Revoke a key created through the API: it stops working on the next request.

    A key declared in a manifest is revoked there (``disabled: true``, or remove it)."""
    with closing(open_client(server, api_key)) as client:
        try:
            client.delete("ApiKey", namespace, name)
        except Conflict as exc:
            raise Conflict(f"{exc}; or set 'disabled: true' in its spec to revoke it without "
                           "deleting it") from None
    click.echo(f"ApiKey {namespace}/{name} revoked")
    return EXIT_OK


# --- schema --------------------------------------------------------------------------


@cli.command()
@click.argument("kind", required=False)
@click.option("--write", "directory", help="Write every kind's schema file into DIRECTORY.")
def schema(kind: str | None, directory: str | None) -> int:
    """Print the JSON Schema of KIND (or all kinds), or write them to a directory."""
    schemas = json_schemas()
    if directory:
        os.makedirs(directory, exist_ok=True)
        for file_name, body in schemas.items():
            with open(os.path.join(directory, file_name), "w", encoding="utf-8") as handle:
                handle.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
        click.echo(f"wrote {len(schemas)} schemas to {directory}")
        return EXIT_OK
    if kind is not None:
        resolved = KIND_NAMES.get(kind.lower())
        if resolved not in KINDS:
            raise UsageError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        schemas = {f"{resolved.lower()}.json": schemas[f"{resolved.lower()}.json"]}
    body = next(iter(schemas.values())) if len(schemas) == 1 else schemas
    click.echo(json.dumps(body, indent=2, sort_keys=True))
    return EXIT_OK


# --- exit codes ----------------------------------------------------------------------


def exit_code(exc: OneOffError) -> int:
    """The one table of exit codes (README "Using the CLI against a server")."""
    if isinstance(exc, ManifestError | UsageError | PlanRefused):
        return EXIT_USAGE
    if isinstance(exc, Unreachable | Unauthorized | Forbidden | ServerError | StoreError):
        return EXIT_UNREACHABLE
    return EXIT_CHANGES  # NotFound, Conflict, and any other target that failed


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script; the one place errors become exit codes."""
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None, prog_name="oneoff", standalone_mode=False
        )
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        code = 130
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USAGE
    except OneOffError as exc:
        if isinstance(exc, ManifestError):
            for issue in exc.issues:
                click.echo(f"error: {issue}", err=True)
            click.echo(f"{len(exc.issues)} error(s)", err=True)
        elif isinstance(exc, ApplyConflict) and exc.issues:
            for issue in exc.issues:
                click.echo(f"error: {issue}", err=True)
            click.echo(f"{len(exc.issues)} conflict(s): the server applied nothing", err=True)
        else:
            click.echo(f"error: {exc}", err=True)
        code = exit_code(exc)
    except BrokenPipeError:  # `oneoff get executions | head`
        sys.stderr.close()
        code = EXIT_OK
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
