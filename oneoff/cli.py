"""The ``oneoff`` command: a kubectl-style CLI over the state file (and later the API).

The top of the stack: parses arguments with click, calls the layers below, renders
documents as tables, JSON or YAML, and maps every :class:`~oneoff.errors.OneOffError` to
one clear line and an exit code in :func:`main` (0 success, 1 ``diff`` found changes or
a target failed, 2 usage or validation error, 3 cannot reach the server or state).

Rendering works on Kubernetes-shaped documents (``records.to_document``), the same
shape the API will return, so offline and server modes share one code path.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import click
from ruamel.yaml import YAML

from oneoff.errors import ManifestError, NotFound, OneOffError, PlanRefused, StoreError, UsageError
from oneoff.loader import check_references, load_paths
from oneoff.manifests import API_VERSION, KINDS, json_schemas
from oneoff.plan import Action, Plan, plan
from oneoff.reconciler import directory_source_name
from oneoff.records import (
    Execution,
    ObjectKey,
    RunStatus,
    Stored,
    execution_document,
    parse_selector,
    selector_matches,
    to_document,
)
from oneoff.settings import load_settings
from oneoff.store import Store, job_status_extra

EXIT_OK, EXIT_CHANGES, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

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

state_option = click.option(
    "--state",
    envvar="ONEOFF_STATE",
    default="./oneoff.db",
    show_default=True,
    help="The SQLite state file (read-only for this command).",
)
output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    help="Output format.",
)


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


# --- validate / diff -----------------------------------------------------------------


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


@cli.command()
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    help="Manifest file or directory, repeatable.",
)
@click.option(
    "--prune", is_flag=True, help="Also show deletes for a file source (a directory always prunes)."
)
@click.option(
    "--field-manager",
    default="cli",
    show_default=True,
    help="Source name for manifests that are not one directory.",
)
@state_option
def diff(paths: tuple[str, ...], prune: bool, field_manager: str, state: str) -> int:
    """Show what applying PATH would change; exit 0 no change, 1 changes, 2 errors."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        source, prune = directory_source_name(paths[0]), True
    else:
        source = f"api:{field_manager}"
    stored: list[Stored] = []
    if os.path.exists(state):
        with Store(state, readonly=True) as store:
            stored = store.objects()
    else:
        click.echo(f"(no state file at {state}: comparing with an empty state)", err=True)
    result = load_paths(paths)
    check_references(result, (obj.key for obj in stored if obj.source != source))
    declared = {obj.key for obj in result.objects}
    the_plan = plan(
        source,
        result.objects,
        [o for o in stored if o.source == source or o.key in declared],
        kept_keys=result.failed_keys,
        kept_files=result.failed_files,
        issues=result.issues,
        prune=prune,
        max_prune_share=load_settings().prune_max_share,
    )
    click.echo(render_plan(the_plan), nl=False)
    if the_plan.issues:
        raise ManifestError(list(the_plan.issues))
    if the_plan.refused:
        raise PlanRefused(the_plan.refused)
    return EXIT_CHANGES if the_plan.has_changes else EXIT_OK


def render_plan(the_plan: Plan) -> str:
    """A plan as a person reads it: one line per change, field diffs indented."""
    marks = {Action.CREATE: "+", Action.UPDATE: "~", Action.DELETE: "-"}
    out = io.StringIO()
    for change in the_plan.changes:
        if change.action is Action.UNCHANGED:
            if change.note:
                out.write(f"  {change.key}: {change.note}\n")
            continue
        where = (
            change.desired.location
            if change.desired
            else (change.stored.location if change.stored else "")
        )
        out.write(
            f"{marks[change.action]} {change.action.value} {change.key}"
            + (f"  ({where})" if where else "")
            + "\n"
        )
        for field_diff in change.diffs:
            if field_diff.added:
                out.write(f"    + {field_diff.path}: {_short(field_diff.after)}\n")
            elif field_diff.removed:
                out.write(f"    - {field_diff.path}: {_short(field_diff.before)}\n")
            else:
                out.write(
                    f"    ~ {field_diff.path}: {_short(field_diff.before)} → "
                    f"{_short(field_diff.after)}\n"
                )
        if change.action is Action.UPDATE and not change.spec_changed and change.diffs:
            out.write("    (metadata only: generation unchanged)\n")
    out.write(f"Plan for {the_plan.source}: {the_plan.summary()}\n")
    return out.getvalue()


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


# --- get -----------------------------------------------------------------------------


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
    state: str,
) -> int:
    """List objects of KIND (jobs, chains, webhooks, apikeys, executions, sources)."""
    resolved = KIND_NAMES.get(kind.lower())
    if resolved is None:
        raise UsageError(
            f"unknown kind {kind!r}; use one of jobs, chains, webhooks, apikeys, executions, "
            "sources"
        )
    try:
        requirements = parse_selector(selector)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with Store(state, readonly=True) as store:
        if resolved == "Source":
            click.echo(render_sources(store), nl=False)
            return EXIT_OK
        ns = None if all_namespaces else (namespace or "default")
        if resolved == "Execution":
            return _get_executions(store, name, job, ns, status, limit, output)
        objects = [
            obj
            for obj in store.objects(resolved, ns, name=name)
            if selector_matches(requirements, obj.labels)
        ]
        documents = [to_document(obj) for obj in objects]
        if resolved == "Job" and output != "table":
            for document, obj in zip(documents, objects, strict=True):
                document["status"].update(job_status_extra(store, obj))
    if name is not None and not objects:
        raise NotFound(f"{resolved} {ns or '*'}/{name} not found")
    if output == "table":
        if not documents:
            where = "any namespace" if ns is None else f"namespace {ns!r}"
            click.echo(f"No {resolved} objects found in {where}.", err=True)
            return EXIT_OK
        click.echo(render_table(resolved, documents, wide_namespace=ns is None), nl=False)
    else:
        body: Any = (
            documents[0]
            if name is not None
            else {"apiVersion": API_VERSION, "kind": "List", "items": documents}
        )
        click.echo(dump(body, output), nl=False)
    return EXIT_OK


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


def render_sources(store: Store) -> str:
    statuses = store.sources()
    rows = [["SOURCE", "OK", "OBJECTS", "LAST SYNC", "MESSAGE"]]
    rows.extend(
        [
            status.name,
            "yes" if status.ok else "no",
            str(status.objects),
            status.last_sync_at or "never",
            status.message,
        ]
        for status in statuses
    )
    text = _format_rows(rows)
    for status in statuses:
        text += "".join(f"  {issue}\n" for issue in status.issues)
    return text


# --- runs ----------------------------------------------------------------------------


def _duration(run: Execution) -> str:
    if not run.started_at:
        return ""
    end = datetime.fromisoformat(run.finished_at) if run.finished_at else datetime.now(UTC)
    seconds = (end - datetime.fromisoformat(run.started_at)).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def render_executions(runs: Sequence[Execution], wide_namespace: bool) -> str:
    rows = [["RUN", "JOB", "TYPE", "STATUS", "ATTEMPT", "SCHEDULED", "DURATION", "RESULT"]]
    if wide_namespace:
        rows[0].insert(1, "NAMESPACE")
    for run in runs:
        result = (
            f"exit {run.exit_code}" if run.exit_code is not None
            else f"HTTP {run.http_status}" if run.http_status is not None
            else ""
        )
        if run.error and run.status is not RunStatus.SUCCEEDED:
            result = (result + ": " if result else "") + run.error.splitlines()[0][:60]
        row = [run.id, run.name, run.type, run.status.value, str(run.attempt),
               run.scheduled_at, _duration(run), result]
        if wide_namespace:
            row.insert(1, run.namespace)
        rows.append(row)
    return _format_rows(rows)


def _get_executions(
    store: Store, run_id: str | None, job: str | None, namespace: str | None,
    status: str | None, limit: int, output: str,
) -> int:
    if run_id is not None:
        found = store.execution(run_id)
        if found is None:
            raise NotFound(f"no run {run_id!r}")
        runs, attempts = [found[0]], found[1]
    else:
        runs, attempts = store.executions(namespace, job, status, limit), None
    if output == "table":
        if not runs:
            click.echo("No executions found.", err=True)
            return EXIT_OK
        click.echo(render_executions(runs, wide_namespace=namespace is None), nl=False)
        return EXIT_OK
    documents = [execution_document(run, attempts) for run in runs]
    body: Any = documents[0] if run_id is not None else {
        "apiVersion": API_VERSION, "kind": "List", "items": documents}
    click.echo(dump(body, output), nl=False)
    return EXIT_OK


@cli.command()
@click.argument("kind", type=click.Choice(["job"]))
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@state_option
def describe(kind: str, name: str, namespace: str, state: str) -> int:
    """Show a job: spec, source, conditions, last and next run, recent runs."""
    with Store(state, readonly=True) as store:
        job = store.get(ObjectKey("Job", namespace, name))
        if job is None:
            raise NotFound(f"Job {namespace}/{name} not found")
        runs = store.executions(namespace, name, None, 10)
        extra = job_status_extra(store, job)
    document = to_document(job)
    last = extra.get("lastRun")
    lines = [
        f"Name:         {name}",
        f"Namespace:    {namespace}",
        f"UID:          {job.uid}",
        f"Generation:   {job.generation}",
        f"Created:      {job.created_at}",
        f"Source:       {job.source}",
        f"File:         {job.location}",
        "Labels:       " + (",".join(f"{k}={v}" for k, v in job.labels.items()) or "-"),
        f"Schedule:     {_schedule(document)}",
        f"Next run:     {extra.get('nextRunAt', '-')}",
        f"Last run:     {last['id'] + ' ' + last['status'] if last else '-'}",
        "Conditions:",
        *(f"  {c['type']}={c['status']} {c['reason']}: {c['message']} "
          f"(generation {c['observedGeneration']})"
          for c in document["status"].get("conditions", [])),
        "Spec:",
        *(f"  {line}" for line in dump(document["spec"], "yaml").splitlines()),
        "Recent runs:",
        *(f"  {line}" for line in render_executions(runs, False).splitlines()),
    ]
    if not runs:
        lines.append("  none yet")
    click.echo("\n".join(lines))
    return EXIT_OK


@cli.command()
@click.argument("run")
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Namespace of the job when RUN is a job name.")
@state_option
def logs(run: str, namespace: str, state: str) -> int:
    """Print the output of RUN (a run id, or a job name for its latest run)."""
    with Store(state, readonly=True) as store:
        found = store.execution(run)
        if found is None:
            latest = store.executions(namespace, run, None, 1)
            found = store.execution(latest[0].id) if latest else None
    if found is None:
        raise NotFound(f"no run {run!r}, and no job {namespace}/{run} with runs")
    execution = found[0]
    click.echo(execution.output or "", nl=False)
    if execution.status is not RunStatus.SUCCEEDED:
        detail = f": {execution.error}" if execution.error else ""
        click.echo(f"[run {execution.id} {execution.status.value}{detail}]", err=True)
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
    except ManifestError as exc:
        for issue in exc.issues:
            click.echo(f"error: {issue}", err=True)
        click.echo(f"{len(exc.issues)} error(s)", err=True)
        code = EXIT_USAGE
    except (UsageError, PlanRefused) as exc:
        click.echo(f"error: {exc}", err=True)
        code = EXIT_USAGE
    except NotFound as exc:
        click.echo(f"error: {exc}", err=True)
        code = EXIT_CHANGES
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        code = EXIT_UNREACHABLE
    except OneOffError as exc:
        click.echo(f"error: {exc}", err=True)
        code = EXIT_CHANGES
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
