"""Where the CLI gets its documents: a OneOff server over HTTP, or the state file read-only.

Called by ``cli``, which renders what these return. Both readers answer in the API's JSON
shapes (``records.to_document``, ``records.execution_document``, the source status and
plan documents), so the CLI has one rendering path for both modes:

- :class:`ApiClient` talks to ``/api/v1`` with httpx. Every problem+json answer becomes a
  :class:`~oneoff.errors.OneOffError` here (401 Unauthorized, 403 Forbidden, 404 NotFound,
  409 Conflict, 400/413/422 ManifestError or UsageError, anything else ServerError), and
  a server that cannot be reached is :class:`~oneoff.errors.Unreachable`; ``cli.main``
  turns those into exit codes.
- :class:`StateReader` reads a state file, for ``--state`` and when no server runs.

:func:`client_config` resolves the server URL and API key: flag, then ``ONEOFF_SERVER`` /
``ONEOFF_API_KEY``, then the client config file (``ONEOFF_CLIENT_CONFIG``, default
``~/.config/oneoff/config.yaml``, keys ``server`` and ``apiKey``), then the default.

:class:`Bundle` is how ``apply`` sends files: all of them in one multi-document YAML
body (one plan, so ``--prune`` sees the whole set), with a table from body lines back to
file lines, so the server's ``<request>:LINE`` errors are shown as ``file:line``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import yaml

from oneoff.errors import (
    ApplyConflict,
    Conflict,
    Forbidden,
    Issue,
    ManifestError,
    NotFound,
    ServerError,
    Unauthorized,
    Unreachable,
    UsageError,
)
from oneoff.loader import discover, read_bytes
from oneoff.manifests import API_VERSION
from oneoff.records import (
    ObjectKey,
    execution_document,
    parse_selector,
    selector_matches,
    to_document,
)
from oneoff.store import Store, job_status_extra

if TYPE_CHECKING:  # imported where used: the CLI's start-up is also shell completion's
    import httpx

DEFAULT_SERVER = "http://127.0.0.1:8080"
CONFIG_KEYS = {"server", "apiKey"}
PAGE = 1000
"""The largest page the API serves; lists are read page by page up to their total."""

KIND_PATHS = {"Job": "jobs", "Chain": "chains", "Webhook": "webhooks", "ApiKey": "apikeys"}


# --- configuration -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Which server the CLI talks to, with which key, and where each came from."""

    server: str = DEFAULT_SERVER
    api_key: str | None = None
    server_from: str = "default"
    """``flag``, ``env``, ``file`` or ``default``: only the default may fall back to the
    local state file when nothing answers."""
    config_file: str | None = None

    @property
    def explicit(self) -> bool:
        return self.server_from != "default"


def listening(url: str, timeout: float = 1.0) -> bool:
    """Whether anything accepts TCP connections at the URL's host and port (cheaper than
    a request when, as usual for the default address, nothing does)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout):
            return True
    except OSError:
        return False


def default_config_path(env: Mapping[str, str]) -> str:
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "oneoff", "config.yaml")


def client_config(
    server: str | None = None, api_key: str | None = None, env: Mapping[str, str] | None = None
) -> ClientConfig:
    """Flag, then environment, then the config file, then the default (README)."""
    env = os.environ if env is None else env
    path = env.get("ONEOFF_CLIENT_CONFIG")
    named = path is not None
    path = path or default_config_path(env)
    from_file = _read_config(path, must_exist=named)
    config = ClientConfig(config_file=path if from_file else None)
    for value, origin in ((from_file.get("server"), "file"), (env.get("ONEOFF_SERVER"), "env"),
                          (server, "flag")):
        if value:
            config = replace(config, server=value, server_from=origin)
    for key in (from_file.get("apiKey"), env.get("ONEOFF_API_KEY"), api_key):
        if key:
            config = replace(config, api_key=key)
    if not config.server.startswith(("http://", "https://")):
        raise UsageError(
            f"server {config.server!r} (from {_origin(config)}) is not an http:// or https:// "
            "URL, e.g. http://127.0.0.1:8080"
        )
    return replace(config, server=config.server.rstrip("/"))


def _origin(config: ClientConfig) -> str:
    return {"flag": "--server", "env": "ONEOFF_SERVER", "default": "the default"}.get(
        config.server_from, config.config_file or "the config file")


def _read_config(path: str, must_exist: bool) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as handle:
            body = yaml.safe_load(handle)
    except FileNotFoundError:
        if must_exist:
            raise UsageError(f"client config {path} (ONEOFF_CLIENT_CONFIG) does not exist") \
                from None
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"client config {path} cannot be read: {exc}") from None
    if body is None:
        return {}
    if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
        raise UsageError(f"client config {path} must be a mapping of strings "
                         "(server: URL, apiKey: TOKEN)")
    unknown = set(body) - CONFIG_KEYS
    if unknown:
        raise UsageError(f"client config {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"allowed are {', '.join(sorted(CONFIG_KEYS))}")
    return body


# --- the readers' common face --------------------------------------------------------


class Reader(Protocol):
    """What the read verbs need; both readers answer with API-shaped documents."""

    where: str
    """What is being read, for messages: the server URL or the state file."""

    def objects(self, kind: str, namespace: str | None, selector: str = "",
                name: str | None = None, runs: bool = True) -> list[dict[str, Any]]:
        """``runs=False`` lets a reader skip jobs' first-seen, last and next run, which
        a table does not show (the server always sends them)."""
        ...

    def object(self, kind: str, namespace: str, name: str) -> dict[str, Any]: ...

    def executions(self, namespace: str | None, job: str | None = None,
                   status: str | None = None, limit: int = 50) -> list[dict[str, Any]]: ...

    def execution(self, run_id: str) -> dict[str, Any]: ...

    def output(self, run_id: str) -> str: ...

    def sources(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


# --- the state file ------------------------------------------------------------------


class StateReader:
    """A state file opened read-only, answering like the API would."""

    def __init__(self, path: str) -> None:
        self.where = path
        self.store = Store(path, readonly=True)

    def close(self) -> None:
        self.store.close()

    def objects(self, kind: str, namespace: str | None, selector: str = "",
                name: str | None = None, runs: bool = True) -> list[dict[str, Any]]:
        requirements = _selector(selector)
        found = [obj for obj in self.store.objects(kind, namespace, name=name)
                 if selector_matches(requirements, obj.labels)]
        documents = [to_document(obj) for obj in found]
        if kind == "Job" and runs:
            for document, obj in zip(documents, found, strict=True):
                document["status"].update(job_status_extra(self.store, obj))
        return documents

    def object(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self.store.get(ObjectKey(kind, namespace, name))
        if obj is None:
            raise NotFound(f"{kind} {namespace}/{name} not found")
        document = to_document(obj)
        if kind == "Job":
            document["status"].update(job_status_extra(self.store, obj))
        return document

    def executions(self, namespace: str | None, job: str | None = None,
                   status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return [execution_document(run)
                for run in self.store.executions(namespace, job, status, limit)]

    def execution(self, run_id: str) -> dict[str, Any]:
        found = self.store.execution(run_id)
        if found is None:
            raise NotFound(f"no run {run_id!r}")
        return execution_document(*found)

    def output(self, run_id: str) -> str:
        found = self.store.execution(run_id)
        if found is None:
            raise NotFound(f"no run {run_id!r}")
        return found[0].output or ""

    def sources(self) -> list[dict[str, Any]]:
        return [
            {"name": status.name, "ok": status.ok, "objects": status.objects,
             "lastSyncAt": status.last_sync_at, "lastAttemptAt": status.last_attempt_at,
             "message": status.message, "issues": [issue.to_dict() for issue in status.issues]}
            for status in self.store.sources()
        ]


def _selector(text: str) -> tuple[Any, ...]:
    try:
        return parse_selector(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# --- the server ----------------------------------------------------------------------


class ApiClient:
    """A OneOff server's ``/api/v1``; one connection pool for the whole command."""

    def __init__(self, config: ClientConfig, timeout: float = 30.0) -> None:
        import httpx

        self.config = config
        self.where = config.server
        headers = {"User-Agent": "oneoff-cli", "Accept": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self.http = httpx.Client(base_url=config.server, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        self.http.close()

    # --- plumbing ------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Any = None, content: str | None = None,
                headers: Mapping[str, str] | None = None) -> httpx.Response:
        """Send one request; any answer that is not 2xx is raised as its OneOffError."""
        import httpx

        try:
            response = self.http.request(
                method, path, params=_params(params), json=body,
                content=content.encode() if content is not None else None, headers=headers)
        except httpx.HTTPError as exc:
            raise self.unreachable(exc) from None
        if response.is_error:
            raise problem_error(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"{self.where}{path} answered {response.status_code} with "
                              "something that is not JSON; is this a OneOff server?") from None

    @contextmanager
    def stream(self, path: str, params: Mapping[str, Any] | None = None,
               headers: Mapping[str, str] | None = None) -> Iterator[Iterator[str]]:
        """A streamed GET; yields the body's text as it arrives (no read timeout)."""
        import httpx

        try:
            with self.http.stream("GET", path, params=_params(params), headers=headers,
                                  timeout=httpx.Timeout(None, connect=5.0)) as response:
                if response.is_error:
                    response.read()
                    raise problem_error(response)
                yield self._guard(response.iter_text())
        except httpx.HTTPError as exc:
            raise self.unreachable(exc) from None

    def _guard(self, chunks: Iterator[str]) -> Iterator[str]:
        import httpx

        try:
            yield from chunks
        except httpx.HTTPError as exc:
            raise self.unreachable(exc) from None

    def unreachable(self, exc: httpx.HTTPError) -> Unreachable:
        import httpx

        reason = str(exc) or type(exc).__name__
        if "Connection refused" in reason:
            reason = "connection refused"
        elif isinstance(exc, httpx.TimeoutException):
            reason = f"no answer in time ({type(exc).__name__})"
        hint = ("start it with 'oneoff serve', or point --server / ONEOFF_SERVER at it"
                if not self.config.explicit else f"check {_origin(self.config)}")
        return Unreachable(f"cannot reach the OneOff server at {self.where}: {reason}; {hint}")

    def probe(self) -> bool:
        """Whether a OneOff server answers at the URL (``/healthz``), without raising."""
        import httpx

        try:
            response = self.http.get("/healthz", timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code in (200, 503)

    def _all(self, path: str, params: dict[str, Any], limit: int | None = None
             ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = PAGE if limit is None else min(PAGE, limit - len(items))
            body = self.json("GET", path, params={**params, "limit": page, "offset": len(items)})
            items.extend(body["items"])
            total = body.get("total", len(items))
            if not body["items"] or len(items) >= total or (limit and len(items) >= limit):
                return items

    # --- reads ---------------------------------------------------------------------

    def objects(self, kind: str, namespace: str | None, selector: str = "",
                name: str | None = None, runs: bool = True) -> list[dict[str, Any]]:
        _selector(selector)  # the same message as offline for a malformed selector
        if name is not None and namespace is not None:
            try:
                return [self.object(kind, namespace, name)]
            except NotFound:
                return []
        path = _collection(kind, namespace)
        items = self._all(path, {"labelSelector": selector or None})
        return [item for item in items if name is None or item["metadata"]["name"] == name]

    def object(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.json("GET", f"{_collection(kind, namespace)}/{name}")
        return body

    def executions(self, namespace: str | None, job: str | None = None,
                   status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return self._all(_collection("Execution", namespace),
                         {"job": job, "status": status}, limit=limit)

    def execution(self, run_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.json("GET", f"/api/v1/executions/{run_id}")
        return body

    def output(self, run_id: str) -> str:
        return self.request("GET", f"/api/v1/executions/{run_id}/output").text

    def sources(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("GET", "/api/v1/sources")["items"]
        return items

    def whoami(self) -> dict[str, Any]:
        body: dict[str, Any] = self.json("GET", "/api/v1/whoami")
        return body

    @contextmanager
    def events(self, params: Mapping[str, Any]) -> Iterator[Iterator[dict[str, Any]]]:
        """The SSE stream (``/api/v1/events``), connected on entry: every event after
        that moment, as its payload, for as long as the caller keeps reading."""
        with self.stream("/api/v1/events", params, {"Accept": "text/event-stream"}) as chunks:
            yield _sse_payloads(chunks)

    # --- actions -------------------------------------------------------------------

    def run(self, namespace: str, job: str) -> dict[str, Any]:
        body: dict[str, Any] = self.json("POST", f"/api/v1/namespaces/{namespace}/jobs/{job}/run")
        return body

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.json("POST", f"/api/v1/executions/{run_id}/cancel")
        return body

    def cancel_job(self, namespace: str, job: str) -> list[str]:
        body = self.json("POST", f"/api/v1/namespaces/{namespace}/jobs/{job}/cancel")
        return list(body.get("cancelled", []))

    def create(self, kind: str, namespace: str, document: dict[str, Any],
               field_manager: str = "cli") -> dict[str, Any]:
        body: dict[str, Any] = self.json("POST", _collection(kind, namespace), body=document,
                                         params={"fieldManager": field_manager})
        return body

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.json("DELETE", f"{_collection(kind, namespace)}/{name}")
        return body

    def apply(self, bundle: Bundle, *, dry_run: bool, prune: bool = False,
              force: bool = False, field_manager: str = "cli") -> dict[str, Any]:
        """``POST /api/v1/apply``; the answer's plan and errors name the user's files."""
        params = {"dryRun": dry_run, "prune": prune, "force": force,
                  "fieldManager": field_manager}
        try:
            result: dict[str, Any] = self.json(
                "POST", "/api/v1/apply", params=params, content=bundle.text,
                headers={"Content-Type": "application/yaml", "X-OneOff-File": bundle.origin})
        except ManifestError as exc:
            raise ManifestError([bundle.issue(issue) for issue in exc.issues]) from None
        except ApplyConflict as exc:
            raise ApplyConflict(
                str(exc), bundle.plan(exc.plan) if exc.plan is not None else None,
                [bundle.issue(issue) for issue in exc.issues]) from None
        result["plan"] = bundle.plan(result["plan"])
        return result


def _sse_payloads(chunks: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events text → the JSON of each event's ``data`` (comments and pings
    are skipped)."""
    data: list[str] = []
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            line = line.rstrip("\r")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                yield json.loads("\n".join(data))
                data = []


def _params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    if params is None:
        return None
    return {key: (str(value).lower() if isinstance(value, bool) else str(value))
            for key, value in params.items() if value is not None}


def _collection(kind: str, namespace: str | None) -> str:
    plural = "executions" if kind == "Execution" else KIND_PATHS[kind]
    return f"/api/v1/namespaces/{namespace}/{plural}" if namespace else f"/api/v1/{plural}"


def problem_error(response: httpx.Response) -> Exception:
    """An RFC 9457 problem (or any error answer) as the OneOffError the CLI maps."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"title": response.reason_phrase, "detail": response.text[:200].strip()}
    status = response.status_code
    title = str(problem.get("title") or response.reason_phrase)
    detail = str(problem.get("detail") or "")
    message = detail or title
    issues = [_issue(error) for error in problem.get("errors") or [] if isinstance(error, dict)]
    if status == 401:
        sent = "authorization" in {key.lower() for key in response.request.headers}
        hint = ("; check the key given by --api-key, ONEOFF_API_KEY or the client config"
                if sent else "" if "ONEOFF_API_KEY" in message
                else "; pass a key with --api-key or ONEOFF_API_KEY")
        return Unauthorized(f"{message} (HTTP 401){hint}")
    if status == 403:
        return Forbidden(f"{message} (HTTP 403)")
    if status == 404:
        return NotFound(message)
    if status == 409:
        plan = problem.get("plan")
        if isinstance(plan, dict) or issues:
            return ApplyConflict(message, plan if isinstance(plan, dict) else None, issues)
        return Conflict(message)
    if status in (400, 413, 415, 422):
        if issues and all(issue.file for issue in issues):
            return ManifestError(issues)
        fields = "; ".join(f"{i.field}: {i.message}" if i.field else i.message for i in issues)
        return UsageError(f"the server refused the request (HTTP {status}): {message}"
                          + (f" — {fields}" if fields and fields != message else ""))
    return ServerError(f"the server answered HTTP {status} {title}"
                       + (f": {detail}" if detail and detail != title else ""))


def _issue(error: dict[str, Any]) -> Issue:
    def number(value: Any) -> int | None:
        return value if isinstance(value, int) else None

    return Issue(file=str(error.get("file") or ""), message=str(error.get("message", "")),
                 line=number(error.get("line")), column=number(error.get("column")),
                 field=str(error.get("field") or ""))


# --- apply: files as one request -----------------------------------------------------

REQUEST_FILE = "request"
"""The name the server gives an apply's body in errors and locations when the request
does not name a file (``X-OneOff-File``)."""


@dataclass(frozen=True, slots=True)
class Part:
    file: str
    first: int
    """Body line of the file's line 1."""
    lines: int


@dataclass(slots=True)
class Bundle:
    """Manifest files joined into one multi-document YAML body, and the way back.

    The first file starts at body line 1 and names the body (``X-OneOff-File``); every
    further one starts after a ``--- # file: PATH`` separator line (``loader.load_text``
    places documents and errors by them). A single file is sent exactly as it is. Where
    the server leaves a body line in place, :meth:`issue` and :meth:`plan` put it back.
    """

    text: str = ""
    parts: list[Part] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    """Files that could not be read (reported like the loader does, never sent)."""

    @classmethod
    def from_paths(cls, paths: tuple[str, ...], max_bytes: int) -> Bundle:
        """Read files and directories with the loader's rules (``.yaml``/``.yml``,
        recursive, dot-names skipped); ``-`` is standard input."""
        bundle = cls()
        chunks: list[str] = []
        line = 1
        for root in paths:
            if root == "-":
                entries: list[tuple[str, str | None]] = [("<stdin>", sys.stdin.read())]
            else:
                files, issues = discover(root)
                bundle.issues.extend(issues)
                entries = [(path, None) for path in files]
            for path, given in entries:
                text = given if given is not None else bundle._read(path, max_bytes)
                if text is None:
                    continue
                if not text.endswith("\n"):
                    text += "\n"
                if chunks or not _header_safe(path):  # a path no header can carry
                    chunks.append(f"--- # file: {path}\n")
                    line += 1
                count = text.count("\n")
                bundle.parts.append(Part(path, line, count))
                chunks.append(text)
                line += count
        bundle.text = "".join(chunks)
        return bundle

    def _read(self, path: str, max_bytes: int) -> str | None:
        data, issue = read_bytes(path, max_bytes)
        if data is None:
            assert issue is not None
            self.issues.append(issue)
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            self.issues.append(Issue(path, f"not UTF-8 text (byte 0x{data[exc.start]:02x})",
                                     line=line))
            return None

    @property
    def origin(self) -> str:
        """What the request names its body (``X-OneOff-File``): its first file."""
        if self.parts and self.parts[0].first == 1:
            return self.parts[0].file
        return REQUEST_FILE

    def locate(self, line: int) -> tuple[str, int]:
        """A body line as (file, line in that file); a separator line is its file's 1."""
        for part in self.parts:
            if part.first - 1 <= line < part.first + part.lines:
                return part.file, max(line - part.first + 1, 1)
        return self.origin, line

    def issue(self, issue: Issue) -> Issue:
        if issue.file != self.origin or issue.line is None:
            return issue
        file, line = self.locate(issue.line)
        return replace(issue, file=file, line=line)

    def plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        """The plan document with the body's locations and issues put back in the files."""
        changes = []
        for change in plan.get("changes", []):
            head, _, tail = str(change.get("location") or "").rpartition(":")
            if head == self.origin and tail.isdigit():
                file, line = self.locate(int(tail))
                change = {**change, "location": f"{file}:{line}"}
            changes.append(change)
        return {**plan, "changes": changes,
                "issues": [self.issue(_issue(i)).to_dict() for i in plan.get("issues", [])]}


def _header_safe(path: str) -> bool:
    return path.isascii() and path.isprintable() and len(path) <= 300


def list_document(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "List", "items": items}
