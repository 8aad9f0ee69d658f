"""The REST API under ``/api/v1``: read every kind, apply, create, delete, run, cancel, events.

Built by :func:`create_app` and served by the daemon with uvicorn, in the same process and
event loop as the reconciler, scheduler and worker pool. Handlers that touch the store are
plain functions (FastAPI runs them in its thread pool, the store is blocking and
thread-safe); the event stream and the output follower are the async ones.

The API writes only through the layers below it: objects through the reconciler (the API
is a source like a directory, named ``api:<fieldManager>``), runs through the scheduler
("run now" inserts a run, cancel asks the scheduler, which asks the pool). It never
imports the worker.

Every route checks the caller's API key (:mod:`oneoff.auth`) for a scope and namespace.
Every error is RFC 9457 ``application/problem+json`` with the field path where there is
one; 404 (no such object), 409 (the state refuses: exists, owned elsewhere, finished),
422 (invalid) are used precisely, and no stack trace or SQL reaches a response.
"""

import asyncio
import contextvars
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oneoff.auth import KeyRing, Principal, generate_token
from oneoff.errors import (
    Conflict,
    Forbidden,
    Issue,
    ManifestError,
    NotFound,
    OneOffError,
    PlanRefused,
    StoreError,
    Unauthorized,
    UsageError,
)
from oneoff.loader import load_documents, load_text
from oneoff.manifests import API_VERSION, DNS_LABEL, OverlapPolicy
from oneoff.manifests import Scope as KeyScope
from oneoff.metrics import CONTENT_TYPE, ApiRequests, Metrics
from oneoff.plan import plan_document
from oneoff.reconciler import Reconciler, collector_paused
from oneoff.records import (
    ObjectKey,
    RunStatus,
    Stored,
    execution_document,
    isoformat,
    parse_selector,
    to_document,
)
from oneoff.scheduler import Scheduler
from oneoff.store import (
    EXECUTION_ORDERS,
    OBJECT_ORDERS,
    Event,
    Store,
    Transaction,
    job_status_extra,
    job_status_extras,
    page_audit,
    record_audit,
)

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
QUERY_KEY_NAMES = {"token", "api_key", "apikey", "api-key", "access_token", "key", "bearer"}


class KindName(StrEnum):
    """Kinds as they appear in paths."""

    JOBS = "jobs"
    CHAINS = "chains"
    WEBHOOKS = "webhooks"
    APIKEYS = "apikeys"

    @property
    def kind(self) -> str:
        return {"jobs": "Job", "chains": "Chain", "webhooks": "Webhook",
                "apikeys": "ApiKey"}[self.value]

    @property
    def scope(self) -> KeyScope:
        """The scope that writes this kind: keys are ``admin``, the rest ``write``."""
        return KeyScope.ADMIN if self is KindName.APIKEYS else KeyScope.WRITE


def _choice(values: object) -> str:
    return "^(" + "|".join(re.escape(str(v)) for v in values) + ")$"  # type: ignore[attr-defined]


Namespace = Annotated[str, Path(pattern=DNS_LABEL, max_length=63, description="Namespace.",
                                examples=["default"])]
Name = Annotated[str, Path(pattern=DNS_LABEL, max_length=63, description="Object name.",
                           examples=["ping"])]
RunId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Run id.",
                            examples=["019ae2b5c3f1a1b2c3d4"])]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000, description="Items to skip.")]
Selector = Annotated[str | None, Query(
    max_length=1000, description="Label selector, e.g. `team=billing,env!=prod,tier`.",
    examples=["team=ops"])]
ObjectSort = Annotated[str, Query(pattern=_choice(OBJECT_ORDERS),
                                  description="Sort field; `-` for descending.")]
ExecutionSort = Annotated[str, Query(pattern=_choice(EXECUTION_ORDERS),
                                     description="Sort field; `-` for descending.")]
FieldManager = Annotated[str, Query(pattern=DNS_LABEL, max_length=63, description=(
    "Source name of what this request creates (`api:<fieldManager>`)."))]

JOB_EXAMPLE = {
    "apiVersion": API_VERSION,
    "kind": "Job",
    "metadata": {"name": "trial-expired-4711", "labels": {"team": "billing"}},
    "spec": {
        "schedule": {"at": "2030-01-01T09:00:00+01:00"},
        "http": {"url": "https://example.com/hooks/trial-expired", "method": "POST",
                 "json": {"account": 4711}},
        "retry": {"limit": 3},
    },
}


def create_app(
    store: Store,
    *,
    reconciler: Reconciler,
    scheduler: Scheduler,
    keys: KeyRing | None = None,
    ready: Callable[[], dict[str, bool]] = lambda: {"store": True},
    live_output: Callable[[str], str | None] = lambda run_id: None,
    stop: asyncio.Event | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: Metrics | None = None,
    metrics_auth: bool = False,
) -> FastAPI:
    """The API application over one open store and the daemon's reconciler and scheduler;
    with ``metrics``, ``/metrics`` too (``metrics_auth``: only for a key with ``read``)."""
    keyring = keys or KeyRing(store)
    create_lock = threading.Lock()
    app = FastAPI(
        title="OneOff API",
        version="v1",
        description="Declarative one-time jobs: objects, executions, apply, run, cancel, "
        "events. Every error is application/problem+json (RFC 9457).",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_RemoteAddress)
    if metrics is not None:
        app.add_middleware(ApiRequests, metrics=metrics)
    _install_problem_handlers(app)

    def authenticate(request: Request) -> Principal:
        for name in request.query_params:
            if name.lower() in QUERY_KEY_NAMES:
                raise UsageError(
                    "API keys belong in the 'Authorization: Bearer <token>' header, never in "
                    "the URL (URLs end up in logs)"
                )
        who = keyring.authenticate(request.headers.get("authorization"))
        request.state.principal = who
        return who

    async def principal(request: Request) -> Principal:
        # async: the key check is a few small reads, done on the event loop unless another
        # thread holds the store (Store.call), which saves a hop to a worker thread
        return await store.call(lambda: authenticate(request))

    Who = Annotated[Principal, Depends(principal)]

    def _audit(who: Principal, action: str, target: str, **detail: Any) -> None:
        _write_audit(store, who, action, target, detail)

    # --- health ------------------------------------------------------------------

    @app.get("/healthz", operation_id="healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", operation_id="readyz", tags=["health"],
             responses={503: {"description": "not ready yet"}})
    def readyz() -> JSONResponse:
        """The store is open, every source has been reconciled once, the scheduler runs."""
        checks = ready()
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    if metrics is not None:
        @app.get("/metrics", operation_id="metrics", tags=["health"],
                 response_class=PlainTextResponse,
                 responses={200: {"content": {CONTENT_TYPE: {}}}})
        def prometheus_metrics(request: Request) -> Response:
            """Prometheus metrics (text exposition format)."""
            if metrics_auth:
                authenticate(request).require(KeyScope.READ)
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    # --- who am I, sources, audit, events (before /{kind}, which would match them) ---

    @app.get("/api/v1/whoami", operation_id="whoami", tags=["auth"])
    def whoami(who: Who) -> dict[str, Any]:
        """The key this request is authenticated with, its scopes and namespaces."""
        return {"name": who.name, "scopes": sorted(who.scopes),
                "namespaces": list(who.namespaces) if who.namespaces is not None else None,
                "authenticated": who.authenticated}

    @app.get("/api/v1/sources", operation_id="listSources", tags=["reconcile"])
    def list_sources(who: Who) -> dict[str, Any]:
        """Reconcile status per source: last sync, errors with file:line."""
        who.require(KeyScope.READ)
        return {"items": [
            {"name": s.name, "ok": s.ok, "objects": s.objects, "lastSyncAt": s.last_sync_at,
             "lastAttemptAt": s.last_attempt_at, "message": s.message,
             "issues": [issue.to_dict() for issue in s.issues]}
            for s in store.sources()
        ]}

    @app.get("/api/v1/audit", operation_id="listAudit", tags=["audit"])
    def list_audit(
        who: Who,
        action: Annotated[str | None, Query(pattern=r"^[a-z-]{1,32}$", description=(
            "Only this action: apply, create, delete, run, cancel."))] = None,
        key: Annotated[str | None, Query(alias="keyName", pattern=DNS_LABEL, max_length=63,
                                         description=("Only actions of the API key with "
                                                      "this name."))] = None,
        target: Annotated[str | None, Query(max_length=300, description=(
            "Only entries whose target or detail contains this text, e.g. a run id or "
            "`Job default/ping`."))
                          ] = None,
        since: Annotated[datetime | None, Query(description="At or after (RFC 3339).")] = None,
        until: Annotated[datetime | None, Query(description="Before (RFC 3339).")] = None,
        limit: Limit = 100, offset: Offset = 0,
    ) -> JSONResponse:
        """Who did what, when and from where, newest first (needs the ``admin`` scope: it
        names keys and client addresses across every namespace)."""
        who.require(KeyScope.ADMIN)
        entries, total = page_audit(store, action=action, key=key, target=target,
                                    since=_instant(since), until=_instant(until),
                                    limit=limit, offset=offset)
        return _list([{"seq": e.seq, "at": e.at, "key": e.key, "action": e.action,
                       "target": e.target, "detail": e.detail, "remote": e.remote}
                      for e in entries], total, limit, offset)

    @app.get("/api/v1/events", operation_id="streamEvents", tags=["events"],
             response_class=EventSourceResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "Server-Sent Events, one per event row"}})
    async def stream_events(
        request: Request,
        after: Annotated[int | None, Query(ge=0, description="Start after this event seq "
                                           "(default: now; also Last-Event-ID).")] = None,
        types: Annotated[str | None, Query(max_length=500, description=(
            "Comma-separated type prefixes, e.g. `execution.,object.deleted`."))] = None,
        namespace: Annotated[str | None, Query(pattern=DNS_LABEL)] = None,
        job: Annotated[str | None, Query(pattern=DNS_LABEL)] = None,
        last_event_id: Annotated[str | None, Header(pattern=r"^\d{1,18}$")] = None,
    ) -> EventSourceResponse:
        """Execution and object changes as they happen (for live UIs and ``logs -f``)."""
        who = await principal(request)
        who.require(KeyScope.READ)
        start = int(last_event_id) if last_event_id else after
        if start is None:
            start = await run_in_threadpool(store.last_event_seq)
        prefixes = tuple(p.strip() for p in (types or "").split(",") if p.strip())

        def wanted(event: Event) -> bool:
            if prefixes and not event.type.startswith(prefixes):
                return False
            if event.key is not None and not who.sees(event.key.namespace):
                return False
            if namespace and (event.key is None or event.key.namespace != namespace):
                return False
            return not job or (event.key is not None and event.key.name == job)

        async def stream() -> AsyncIterator[ServerSentEvent]:
            seq = start
            while stop is None or not stop.is_set():
                batch = await run_in_threadpool(store.events_for, seq, who.namespaces)
                for event in batch:
                    seq = event.seq
                    if wanted(event):
                        yield ServerSentEvent(data=json.dumps(_event_json(event)),
                                              event=event.type, id=str(event.seq))
                if len(batch) < 500:
                    await asyncio.sleep(0.2)

        return EventSourceResponse(stream(), ping=15)

    # --- apply ---------------------------------------------------------------------

    @app.post(
        "/api/v1/apply", operation_id="apply", tags=["objects"],
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/yaml": {"schema": {"type": "string"}, "example": (
                "apiVersion: oneoff.dev/v1\nkind: Job\nmetadata: {name: ping}\n"
                "spec:\n  schedule: {at: now}\n  http: {url: 'https://example.com/'}\n")},
            "application/json": {"schema": {"type": "array", "items": {"type": "object"}},
                                 "example": [JOB_EXAMPLE]},
        }}},
        responses={200: {"description": "the plan, and whether it was applied",
                         "content": {"application/json": {"schema": {"type": "object"}}}},
                   409: {"description": "owned by another source, or a refused prune"},
                   422: {"description": "a document is invalid"}},
    )
    async def apply(
        request: Request,
        dry_run: Annotated[bool, Query(alias="dryRun")] = False,
        prune: bool = False,
        force: bool = False,
        field_manager: Annotated[str, Query(alias="fieldManager", pattern=DNS_LABEL,
                                            max_length=63)] = "api",
        file: Annotated[str | None, Header(alias="X-OneOff-File", max_length=300,
                                           pattern=r"^[^\x00-\x1f]*$")] = None,
    ) -> JSONResponse:
        """Apply multi-document YAML or a JSON list, with the reconciler's plan and safety
        rules. All or nothing: any invalid document or conflict applies none of them."""
        who = await principal(request)
        who.require(KeyScope.WRITE)
        body = await request.body()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        # rendered here: FastAPI's generic encoder would walk a 10,000-change plan again
        return JSONResponse(await run_in_threadpool(
            _apply, who, body, media, file or "request", f"api:{field_manager}",
            dry_run, prune, force))

    def _apply(who: Principal, body: bytes, media: str, origin: str, source: str,
               dry_run: bool, prune: bool, force: bool) -> dict[str, Any]:
        with collector_paused():  # tens of thousands of short-lived, acyclic values
            return _apply_paused(who, body, media, origin, source, dry_run, prune, force)

    def _apply_paused(who: Principal, body: bytes, media: str, origin: str, source: str,
                      dry_run: bool, prune: bool, force: bool) -> dict[str, Any]:
        if media == "application/json":
            try:
                parsed = json.loads(body)
            except ValueError as exc:
                raise UsageError(f"the body is not valid JSON: {exc}") from None
            if isinstance(parsed, dict) and parsed.get("kind") == "List":
                parsed = parsed.get("items")
            documents = parsed if isinstance(parsed, list) else [parsed]
            result = load_documents(documents, origin)
            if result.issues:  # re-read as YAML (JSON is YAML) for line numbers
                located = load_text(origin, body)
                result = located if located.issues else result
        else:
            result = load_text(origin, body)
        for obj in result.objects:
            who.require(KeyScope.ADMIN if obj.key.kind == "ApiKey" else KeyScope.WRITE,
                        obj.key.namespace)
        report = reconciler.apply_request(source, result, prune=prune, force=force,
                                          dry_run=dry_run, background=True)
        assert report.plan is not None
        planned = plan_document(report.plan)
        document = {"dryRun": dry_run, "applied": report.applied, "plan": planned}
        if report.plan.issues or report.plan.refused:
            owners = store.by_keys(obj.key for obj in result.objects)
            conflict = report.plan.refused is not None or (not result.issues and any(
                owner.source != source for owner in owners.values()))
            raise _Rejected(conflict, list(report.plan.issues), report.plan.refused, planned)
        if not dry_run:
            _audit(who, "apply", source, prune=prune, force=force, counts=planned["counts"])
        return document

    # --- executions (before /{kind}) -------------------------------------------------

    def _list_executions(
        who: Principal, namespace: str | None, job: str | None, status: str | None,
        type_: str | None, since: datetime | None, until: datetime | None, sort: str,
        limit: int, offset: int,
    ) -> JSONResponse:
        who.require(KeyScope.READ, namespace)
        statuses = None
        if status:
            statuses = [s.strip() for s in status.split(",") if s.strip()]
            unknown = [s for s in statuses if s not in RunStatus.__members__.values()]
            if unknown:
                raise _invalid("query.status", f"unknown status {unknown[0]!r}; use one of "
                               + ", ".join(s.value for s in RunStatus))
        runs, total = store.page_executions(
            namespace=namespace, namespaces=who.namespaces, job=job, statuses=statuses,
            type_=type_, since=_instant(since), until=_instant(until), sort=sort,
            limit=limit, offset=offset)
        return _list([execution_document(run) for run in runs], total, limit, offset)

    ExecStatus = Annotated[str | None, Query(
        max_length=200, description="Comma-separated statuses, e.g. `failed,timed_out`.")]
    ExecType = Annotated[str | None, Query(pattern=r"^(http|shell|docker|kubernetes)$")]
    Since = Annotated[datetime | None, Query(description="Scheduled at or after (RFC 3339).")]
    Until = Annotated[datetime | None, Query(description="Scheduled before (RFC 3339).")]
    JobFilter = Annotated[str | None, Query(pattern=DNS_LABEL, description="Job name.")]

    @app.get("/api/v1/executions", operation_id="listExecutions", tags=["executions"])
    def list_executions(
        who: Who, job: JobFilter = None, status: ExecStatus = None, type: ExecType = None,
        since: Since = None, until: Until = None, sort: ExecutionSort = "-createdAt",
        limit: Limit = 100, offset: Offset = 0,
    ) -> JSONResponse:
        """Executions across namespaces, newest first."""
        return _list_executions(who, None, job, status, type, since, until, sort, limit,
                                offset)

    @app.get("/api/v1/namespaces/{ns}/executions", operation_id="listNamespacedExecutions",
             tags=["executions"])
    def list_namespaced_executions(
        who: Who, ns: Namespace, job: JobFilter = None, status: ExecStatus = None,
        type: ExecType = None, since: Since = None, until: Until = None,
        sort: ExecutionSort = "-createdAt", limit: Limit = 100, offset: Offset = 0,
    ) -> JSONResponse:
        """Executions of one namespace."""
        return _list_executions(who, ns, job, status, type, since, until, sort, limit, offset)

    def _execution(who: Principal, run_id: str) -> tuple[Any, list[dict[str, Any]]]:
        found = store.execution(run_id)
        if found is None or not who.sees(found[0].namespace):
            raise NotFound(f"no run {run_id!r}")
        return found

    @app.get("/api/v1/executions/{run_id}", operation_id="getExecution", tags=["executions"])
    def get_execution(who: Who, run_id: RunId) -> dict[str, Any]:
        """One execution with its attempts."""
        who.require(KeyScope.READ)
        run, attempts = _execution(who, run_id)
        return execution_document(run, attempts)

    @app.get("/api/v1/executions/{run_id}/output", operation_id="getExecutionOutput",
             tags=["executions"], response_class=PlainTextResponse, response_model=None,
             responses={200: {"content": {"text/plain": {}}}})
    async def get_execution_output(
        request: Request, run_id: RunId,
        follow: Annotated[bool, Query(description="Stream until the run ends.")] = False,
    ) -> StreamingResponse | PlainTextResponse:
        """The captured output (stdout and stderr interleaved; HTTP: status, headers, body).
        ``follow=true`` streams it while the run is active and ends when it is final."""
        who = await principal(request)
        who.require(KeyScope.READ)
        run, _ = await run_in_threadpool(_execution, who, run_id)
        if not follow or run.status.final:
            found = await run_in_threadpool(store.execution, run_id)
            output = found[0].output if found else ""
            return PlainTextResponse(output or "", headers={"X-OneOff-Status": run.status})

        async def chunks() -> AsyncIterator[str]:
            sent = 0
            while True:
                found = await run_in_threadpool(store.execution, run_id)
                if found is None:
                    return
                current = found[0]
                text = (current.output or "") if current.status.final else (
                    live_output(run_id) or "")
                if current.status is RunStatus.PENDING and current.attempt > 0:
                    text = ""  # waiting for a retry: the next attempt starts afresh
                    sent = 0
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if current.status.final or (stop is not None and stop.is_set()):
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")

    @app.post("/api/v1/executions/{run_id}/cancel", operation_id="cancelExecution",
              tags=["executions"], responses={409: {"description": "already finished"}})
    def cancel_execution(who: Who, run_id: RunId) -> dict[str, Any]:
        """Cancel a pending, queued or running run (a running one is stopped completely)."""
        run, _ = _execution(who, run_id)
        who.require(KeyScope.CANCEL, run.namespace)
        if run.status.final:
            raise Conflict(f"run {run_id} has already finished ({run.status})")
        scheduler.cancel(run_id)
        run, attempts = _execution(who, run_id)
        _audit(who, "cancel", f"run {run_id}")
        return execution_document(run, attempts)

    # --- job actions -----------------------------------------------------------------

    def _job(who: Principal, ns: str, name: str, scope: KeyScope) -> Stored:
        who.require(scope, ns)
        job = store.get(ObjectKey("Job", ns, name))
        if job is None:
            raise NotFound(f"Job {ns}/{name} not found")
        return job

    @app.post("/api/v1/namespaces/{ns}/jobs/{name}/run", operation_id="runJob",
              tags=["jobs"], status_code=201,
              responses={409: {"description": "the overlap policy refuses another run"}})
    async def run_job(who: Who, ns: Namespace, name: Name) -> dict[str, Any]:
        """Run the job now (an ad-hoc run); its overlapPolicy decides beside active runs."""
        remote = _remote.get()
        return await store.call(lambda: _run_job(who, ns, name, remote))

    def _run_job(who: Principal, ns: str, name: str, remote: str | None) -> dict[str, Any]:
        job = _job(who, ns, name, KeyScope.RUN)
        policy = job.spec.get("overlapPolicy", OverlapPolicy.SKIP.value)
        if policy in (OverlapPolicy.SKIP.value, OverlapPolicy.BUFFER_ONE.value):
            active, _ = store.page_executions(namespace=ns, job=name,
                                              statuses=["queued", "running"], limit=10,
                                              count=False)
            active = [run for run in active if run.job_uid == job.uid]
            if active and policy == OverlapPolicy.SKIP.value:
                raise Conflict(f"run {active[0].id} of Job {ns}/{name} is still "
                               f"{active[0].status} and its overlapPolicy is Skip")
            if policy == OverlapPolicy.BUFFER_ONE.value and any(
                    run.status is RunStatus.QUEUED for run in active):
                raise Conflict(f"Job {ns}/{name} already has a run waiting and its "
                               "overlapPolicy is BufferOne")
        target = f"Job {ns}/{name}"

        def audit(tx: Transaction, run_id: str) -> None:
            tx.audit(who.name, "run", target, {"run": run_id}, remote)

        run_id = scheduler.run_now(job, also=audit)
        _log_audit(who, "run", target, {"run": run_id})
        run, attempts = _execution(who, run_id)
        return execution_document(run, attempts)

    @app.post("/api/v1/namespaces/{ns}/jobs/{name}/cancel", operation_id="cancelJobRuns",
              tags=["jobs"])
    def cancel_job_runs(who: Who, ns: Namespace, name: Name) -> dict[str, list[str]]:
        """Cancel every pending, queued and running run of the job."""
        job = _job(who, ns, name, KeyScope.CANCEL)
        runs, _ = store.page_executions(namespace=ns, job=name,
                                        statuses=["pending", "queued", "running"], limit=1000,
                                        count=False)
        cancelled = [run.id for run in runs if run.job_uid == job.uid
                     and scheduler.cancel(run.id)]
        _audit(who, "cancel", f"Job {ns}/{name}", runs=cancelled)
        return {"cancelled": cancelled}

    # --- objects -------------------------------------------------------------------

    def _list_objects(who: Principal, kind: KindName, namespace: str | None,
                      selector: str | None, sort: str, limit: int, offset: int
                      ) -> JSONResponse:
        who.require(KeyScope.READ, namespace)
        requirements = None
        if selector:
            try:
                requirements = [{"key": r.key, "op": r.op, "value": r.value}
                                 for r in parse_selector(selector)]
            except ValueError as exc:
                raise _invalid("query.labelSelector", str(exc)) from None
        objects, total = store.page_objects(
            kind.kind, namespace=namespace, namespaces=who.namespaces, selector=requirements,
            sort=sort, limit=limit, offset=offset)
        extras = job_status_extras(store, objects) if kind is KindName.JOBS else {}
        return _list([_document(store, obj, extras.get(obj.uid)) for obj in objects], total,
                     limit, offset)

    @app.get("/api/v1/{kind}", operation_id="listObjects", tags=["objects"])
    def list_objects(who: Who, kind: KindName, labelSelector: Selector = None,
                     sort: ObjectSort = "namespace", limit: Limit = 100, offset: Offset = 0
                     ) -> JSONResponse:
        """Objects of a kind across namespaces (API keys: metadata only, never secrets)."""
        return _list_objects(who, kind, None, labelSelector, sort, limit, offset)

    @app.get("/api/v1/namespaces/{ns}/{kind}", operation_id="listNamespacedObjects",
             tags=["objects"])
    def list_namespaced_objects(who: Who, ns: Namespace, kind: KindName,
                                labelSelector: Selector = None, sort: ObjectSort = "namespace",
                                limit: Limit = 100, offset: Offset = 0) -> JSONResponse:
        """Objects of a kind in one namespace."""
        return _list_objects(who, kind, ns, labelSelector, sort, limit, offset)

    def _object(who: Principal, kind: KindName, ns: str, name: str) -> Stored:
        who.require(KeyScope.READ, ns)
        obj = store.get(ObjectKey(kind.kind, ns, name))
        if obj is None:
            raise NotFound(f"{kind.kind} {ns}/{name} not found")
        return obj

    @app.get("/api/v1/namespaces/{ns}/{kind}/{name}", operation_id="getObject",
             tags=["objects"])
    def get_object(who: Who, ns: Namespace, kind: KindName, name: Name) -> dict[str, Any]:
        """One object; jobs carry their first-seen time, last and next run in status."""
        return _document(store, _object(who, kind, ns, name))

    @app.delete("/api/v1/namespaces/{ns}/{kind}/{name}", operation_id="deleteObject",
                tags=["objects"],
                responses={409: {"description": "a manifest directory owns the object"}})
    def delete_object(who: Who, ns: Namespace, kind: KindName, name: Name) -> dict[str, Any]:
        """Delete an object the API created; a directory's objects are deleted from git."""
        obj = _object(who, kind, ns, name)
        who.require(kind.scope, ns)
        if obj.source.startswith("dir:"):
            raise Conflict(
                f"{obj.key} is declared in {obj.location or obj.source} ({obj.source}); "
                "delete it there, the reconciler prunes it")
        document = _document(store, obj)
        reconciler.delete_object(obj)
        _audit(who, "delete", str(obj.key))
        return document

    @app.post("/api/v1/namespaces/{ns}/{kind}", operation_id="createObject",
              tags=["objects"], status_code=201,
              responses={409: {"description": "the object already exists"},
                         422: {"description": "the object is invalid"}})
    def create_object(
        who: Who, ns: Namespace, kind: KindName,
        body: Annotated[dict[str, Any], Body(openapi_examples={
            "job": {"summary": "A one-off webhook call", "value": JOB_EXAMPLE},
            "apikey": {"summary": "A read-only key (kind apikeys; the token is generated)",
                       "value": {"metadata": {"name": "dashboard"},
                                 "spec": {"scopes": ["read"]}}},
        })],
        field_manager: Annotated[str, Query(alias="fieldManager", pattern=DNS_LABEL,
                                            max_length=63)] = "api",
    ) -> JSONResponse:
        """Create one object (owned by the API source ``api:<fieldManager>``; a directory
        never prunes it). For ``apikeys`` without ``tokenSha256``/``tokenFrom`` the server
        generates the token and returns it once, as ``token``."""
        who.require(kind.scope, ns)
        document = dict(body)
        document.setdefault("apiVersion", API_VERSION)
        document.setdefault("kind", kind.kind)
        if document["kind"] != kind.kind:
            raise _invalid("body.kind", f"this route creates {kind.kind} objects, "
                           f"not {document['kind']!r}")
        metadata = document.get("metadata")
        if isinstance(metadata, dict):
            metadata = document["metadata"] = {"namespace": ns, **metadata}
            if metadata["namespace"] != ns:
                raise _invalid("body.metadata.namespace", f"is {metadata['namespace']!r} but "
                               f"the path says namespace {ns!r}")
        token = None
        spec = document.get("spec")
        if kind is KindName.APIKEYS and isinstance(spec, dict) and not (
                "tokenSha256" in spec or "tokenFrom" in spec):
            token, sha = generate_token()
            document["spec"] = {**spec, "tokenSha256": sha}
        result = load_documents([document], "body")
        if result.issues:
            raise ManifestError(result.issues)
        key = result.objects[0].key
        with create_lock:
            existing = store.get(key)
            if existing is not None:
                raise Conflict(f"{key} already exists (owned by {existing.source}"
                               + (f", {existing.location}" if existing.location else "") + ")")
            report = reconciler.apply_request(f"api:{field_manager}", result)
        if report.issues:
            raise ManifestError(list(report.issues))
        created = store.get(key)
        assert created is not None
        _audit(who, "create", str(key))
        out = _document(store, created)
        if token is not None:
            out["token"] = token
        return JSONResponse(out, status_code=201)

    return app


# --- documents -------------------------------------------------------------------------


def _document(store: Store, obj: Stored, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    document = to_document(obj)
    if obj.key.kind == "Job":
        document["status"].update(extra if extra is not None else job_status_extra(store, obj))
    elif obj.key.kind == "ApiKey":
        document["spec"].pop("tokenSha256", None)  # never show what a token hashes to
    return document


def _list(items: list[dict[str, Any]], total: int, limit: int, offset: int) -> JSONResponse:
    """A page as a Kubernetes-style List (rendered directly: FastAPI's generic encoder
    would walk every value of every item again)."""
    return JSONResponse({"apiVersion": API_VERSION, "kind": "List", "items": items,
                         "total": total, "limit": limit, "offset": offset})


def _event_json(event: Event) -> dict[str, Any]:
    return {"seq": event.seq, "at": event.at, "type": event.type,
            "kind": event.key.kind if event.key else None,
            "namespace": event.key.namespace if event.key else None,
            "name": event.key.name if event.key else None,
            "uid": event.uid, "data": event.data}


def _instant(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return isoformat(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


_remote: contextvars.ContextVar[str | None] = contextvars.ContextVar("remote", default=None)
"""The client address of the request being handled (set by :class:`_RemoteAddress`)."""


def _write_audit(store: Store, who: Principal, action: str, target: str,
                 detail: dict[str, Any]) -> None:
    """Log a mutating action and record it in the audit log, right after it happened.
    A failed write is logged, not raised: the action itself is done."""
    remote = _log_audit(who, action, target, detail)
    try:
        record_audit(store, datetime.now(UTC), who.name, action, target, detail, remote)
    except StoreError as exc:
        log.error("cannot record %s %s in the audit log: %s", action, target, exc,
                  extra={"action": "audit", "audit_action": action, "target": target})


def _log_audit(who: Principal, action: str, target: str, detail: dict[str, Any]) -> str | None:
    """The log line of an audited action (with job, namespace and run_id where it names
    them); returns the client address it was made from."""
    remote = _remote.get()
    kind, _, name = target.partition(" ")
    about = ({"run_id": name} if kind == "run" else
             dict(zip(("namespace", "job"), name.split("/", 1), strict=False))
             if kind == "Job" else {})
    if "run" in detail:
        about["run_id"] = detail["run"]
    log.info("%s %s by %s", action, target, who.name or "anonymous",
             extra={"action": "audit", "audit_action": action, "target": target,
                    "key": who.name, "remote": remote, **about, **detail})
    return remote


# --- errors as problem+json --------------------------------------------------------------


class _Rejected(OneOffError):
    """An apply whose plan may not be applied: invalid documents (422), or a conflict with
    another source or a refused prune (409). Carries the plan for the response."""

    def __init__(self, conflict: bool, issues: list[Issue], refused: str | None,
                 plan: dict[str, Any]) -> None:
        self.conflict, self.issues, self.plan = conflict, issues, plan
        super().__init__(refused or "; ".join(str(issue) for issue in issues))


def _invalid(field: str, message: str) -> ManifestError:
    place, _, rest = field.partition(".")
    return ManifestError([Issue(place, message, field=rest)])


_STATUS: list[tuple[type[OneOffError], int, str]] = [
    (ManifestError, 422, "invalid"),
    (NotFound, 404, "not-found"),
    (Conflict, 409, "conflict"),
    (PlanRefused, 409, "refused"),
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (UsageError, 400, "bad-request"),
    (StoreError, 503, "unavailable"),
]


def problem(status: int, slug: str, detail: str, instance: str,
            errors: list[dict[str, Any]] | None = None, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    body: dict[str, Any] = {
        "type": f"https://oneoff.dev/problems/{slug}",
        "title": slug.replace("-", " ").capitalize(),
        "status": status, "detail": detail, "instance": instance,
    }
    if errors:
        body["errors"] = errors
    body.update(extra)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _issue_json(issue: Issue) -> dict[str, Any]:
    found = issue.to_dict()
    return {"field": found.pop("field"), "message": found.pop("message"),
            **{k: v for k, v in found.items() if v is not None}}


def _install_problem_handlers(app: FastAPI) -> None:
    async def oneoff_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OneOffError)
        extra: dict[str, Any] = {}
        if isinstance(exc, _Rejected):
            status, slug = (409, "conflict") if exc.conflict else (422, "invalid")
            extra["plan"] = exc.plan
        else:
            status, slug = next(((s, g) for cls, s, g in _STATUS if isinstance(exc, cls)),
                                (500, "internal"))
        issues = getattr(exc, "issues", None)
        errors = [_issue_json(issue) for issue in issues] if issues else None
        detail = str(exc) if not issues else (
            f"{len(issues)} problem(s): " + "; ".join(str(i) for i in issues[:3]))
        if isinstance(exc, StoreError):
            log.error("store error: %s", exc, extra={"action": "api"})
            detail = "the state file cannot be read or written right now; see the server log"
        return problem(status, slug, detail, request.url.path, errors, **extra)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = []
        for error in exc.errors():
            loc = [str(part) for part in error.get("loc", ())]
            errors.append({"field": ".".join(loc), "message": error.get("msg", "invalid")})
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        return problem(400 if malformed else 422, "bad-request" if malformed else "invalid",
                       "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3]),
                       request.url.path, errors)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(
            exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /api/docs"
        return problem(exc.status_code, slug, detail, request.url.path)

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed", extra={"action": "api", "path": request.url.path})
        return problem(500, "internal", "internal error; the server log has the details",
                       request.url.path)

    app.add_exception_handler(OneOffError, oneoff_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crash)


class _BodyLimit:
    """Refuse request bodies above ``max_bytes`` (declared or streamed) with a 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counting() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counting, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(413, "too-large",
                           f"the request body is larger than {self.max_bytes} bytes",
                           scope.get("path", ""))
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class _RemoteAddress:
    """Make the client's address known to the audit log for the request's duration (the
    handlers' thread pool runs them in a copy of this context)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        token = _remote.set(client[0] if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _remote.reset(token)

