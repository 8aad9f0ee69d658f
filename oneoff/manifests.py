"""The shape of every manifest OneOff reads: the only place YAML structure is described.

Called by the loader (one validated model per document), by the JSON Schema generator
(``oneoff schema`` and ``schemas/*.json``) and, later, by the API for request bodies.
Models are pydantic v2 with ``extra="forbid"`` so a typo is an error, camelCase field
names as people write them in YAML, and attribute docstrings that become the schema's
descriptions. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_VERSION = "oneoff.dev/v1"
PRUNE_ANNOTATION = "oneoff.dev/prune"
RUN_REQUESTED_ANNOTATION = "oneoff.dev/run-requested-at"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
"""A DNS-1123 label: lower-case letters, digits and '-', at most 63 characters."""

DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
LabelKey = Annotated[
    str,
    StringConstraints(
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        max_length=317,
    ),
]
LabelValue = Annotated[
    str,
    StringConstraints(pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$", max_length=63),
]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration such as ``90s``, ``10m`` or ``1h30m`` (units ms s m h d)."""
    text = text.strip()
    pos, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit, e.g. 90s, 10m, 1h30m, 2d"
        )
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{text!r} is too long a duration") from None


@functools.lru_cache(maxsize=4096)
def _cron_problem(expression: str) -> str | None:
    """What is wrong with a cron expression, or None; cached, trees repeat expressions."""
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        return (
            f"{expression!r} is not a five-field cron expression "
            "(minute hour day month weekday)"
        )
    try:
        croniter(expression, datetime(2000, 1, 1)).get_next(datetime)
    except (CroniterBadDateError, ValueError):
        return f"{expression!r} never fires (e.g. 30 February)"
    return None


class Model(BaseModel):
    """Base of every manifest model: camelCase in YAML, unknown fields rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=False,
        validate_by_alias=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
        frozen=True,
        defer_build=True,  # built on first use: CLI verbs that never validate start faster
    )


# --- shared pieces -------------------------------------------------------------------


class ValueSource(Model):
    """Where a secret value comes from at run time: exactly one of ``env`` or ``file``."""

    env: EnvName | None = None
    """Name of an environment variable of the OneOff server process."""
    file: str | None = None
    """Path of a file readable by the OneOff server (e.g. a mounted Kubernetes Secret)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ValueSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self


class ValueFrom(Model):
    """A value that is not written in git but read when the job runs."""

    value_from: ValueSource
    """The source of the value."""


EnvValue = str | ValueFrom
EnvMap = dict[EnvName, EnvValue]


class Schedule(Model):
    """When a job or chain runs: exactly one of ``at``, ``after`` or ``cron``."""

    at: AwareDatetime | Literal["now"] | None = None
    """An RFC 3339 instant with an offset (``2026-12-24T15:00:00+01:00``), or ``now``."""
    after: str | None = None
    """A duration after the object was first seen by the server, e.g. ``10m`` or ``2h``."""
    cron: str | None = None
    """A five-field cron expression; recurring mode (can be switched off server-wide)."""
    time_zone: str = "UTC"
    """IANA time zone the cron expression is evaluated in, e.g. ``Europe/Berlin``."""

    @field_validator("after")
    @classmethod
    def _after_is_duration(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) <= timedelta(0):
            raise ValueError("must be longer than zero")
        return value

    @field_validator("cron")
    @classmethod
    def _cron_is_valid(cls, value: str | None) -> str | None:
        problem = _cron_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _exactly_one_trigger(self) -> Schedule:
        given = [name for name in ("at", "after", "cron") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'at', 'after' or 'cron'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class OverlapPolicy(StrEnum):
    """What a new run does while an earlier run of the same job is still active."""

    SKIP = "Skip"
    BUFFER_ONE = "BufferOne"
    ALLOW_ALL = "AllowAll"
    CANCEL_OTHER = "CancelOther"


class Retry(Model):
    """Retry policy: further attempts of the same run after a failure or timeout."""

    limit: Annotated[int, Field(ge=0, le=100)] = 0
    """How many retries after the first attempt (0 = no retry)."""
    backoff_seconds: Annotated[float, Field(ge=0)] = 10
    """Wait before the first retry."""
    factor: Annotated[float, Field(ge=1)] = 2
    """Each further wait is the previous one times this factor."""
    max_backoff_seconds: Annotated[float, Field(ge=0)] = 600
    """Upper bound of any single wait."""
    jitter: bool = True
    """Randomise each wait by up to ±50% so retries of many jobs do not align."""


class HistoryLimit(Model):
    """How many finished executions of a job are kept, by outcome."""

    succeeded: Annotated[int, Field(ge=0)] = 10
    """Executions that succeeded."""
    failed: Annotated[int, Field(ge=0)] = 10
    """Executions that did not succeed (failed, timed out, cancelled, missed, lost)."""


# --- executor blocks -----------------------------------------------------------------


class HttpMethod(StrEnum):
    GET = "GET"
    POST = "POST"
    PUT = "PUT"
    PATCH = "PATCH"
    DELETE = "DELETE"
    HEAD = "HEAD"
    OPTIONS = "OPTIONS"


class HttpExecutor(Model):
    """Send one HTTP request; the response status decides success."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/$.?#][^\s]*$")]
    """Absolute http:// or https:// URL."""
    method: HttpMethod = HttpMethod.GET
    """HTTP method."""
    headers: dict[str, EnvValue] = Field(default_factory=dict)
    """Request headers; secrets through ``valueFrom``."""
    query: dict[str, str] = Field(default_factory=dict)
    """Query parameters added to the URL."""
    body: str | None = None
    """A raw request body (exclusive with ``json``)."""
    json_body: Any = Field(default=None, alias="json")
    """A JSON request body (exclusive with ``body``); sets Content-Type: application/json."""
    success_status: list[Annotated[int, Field(ge=100, le=599)]] | None = None
    """Status codes counted as success; default any 2xx."""
    follow_redirects: bool = False
    """Follow 3xx redirects."""
    verify_tls: bool = Field(default=True, alias="verifyTLS")
    """Verify the server's TLS certificate."""

    @model_validator(mode="after")
    def _one_body(self) -> HttpExecutor:
        if self.body is not None and self.json_body is not None:
            raise ValueError("give at most one of 'body' or 'json'")
        return self


class ShellExecutor(Model):
    """Run a script or a command on the OneOff host in its own process group."""

    script: str | None = None
    """A script run by ``shell`` (exclusive with ``command``)."""
    command: list[str] | None = Field(default=None, min_length=1)
    """An argv list run without a shell (exclusive with ``script``)."""
    shell: str = "/bin/sh"
    """The interpreter for ``script``."""
    env: EnvMap = Field(default_factory=dict)
    """Environment variables added for this process."""
    working_dir: str | None = None
    """Working directory of the process."""
    success_exit_codes: list[int] = [0]
    """Exit codes counted as success."""

    @model_validator(mode="after")
    def _script_or_command(self) -> ShellExecutor:
        if (self.script is None) == (self.command is None):
            raise ValueError("give exactly one of 'script' or 'command'")
        return self


class PullPolicy(StrEnum):
    IF_NOT_PRESENT = "IfNotPresent"
    ALWAYS = "Always"
    NEVER = "Never"


class DockerResources(Model):
    """Resource limits of the container."""

    cpus: Annotated[float, Field(gt=0)] | None = None
    """CPU limit in cores, e.g. 0.5."""
    memory: Annotated[str, StringConstraints(pattern=r"^\d+(\.\d+)?([kKmMgG]i?|[bB])?$")] | None = (
        None
    )
    """Memory limit, e.g. ``256m``, ``512Mi`` or ``1g``: bytes without a unit; k, m, g (or Ki,
    Mi, Gi) are powers of 1024, as for ``docker run --memory``."""


class DockerExecutor(Model):
    """Run a container on a Docker Engine API (``DOCKER_HOST``)."""

    image: Annotated[str, StringConstraints(min_length=1)]
    """Image reference, e.g. ``busybox:latest``."""
    command: list[str] | None = None
    """Overrides the image's entrypoint."""
    args: list[str] | None = None
    """Overrides the image's command (arguments to the entrypoint)."""
    env: EnvMap = Field(default_factory=dict)
    """Environment variables of the container."""
    working_dir: str | None = None
    """Working directory inside the container."""
    user: str | None = None
    """User (name or uid[:gid]) the container runs as."""
    network: str | None = None
    """Docker network to attach, e.g. ``none`` or ``host``."""
    pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    """When to pull the image; ``Never`` fails clearly if it is missing locally."""
    resources: DockerResources = DockerResources()
    """CPU and memory limits."""
    success_exit_codes: list[int] = [0]
    """Exit codes of the container counted as success."""


class KubernetesExecutor(Model):
    """Run the job as a ``batch/v1`` Job on a Kubernetes cluster."""

    namespace: DnsLabel = "default"
    """Cluster namespace the Job is created in."""
    image: str | None = None
    """Shorthand: a single-container pod running this image (exclusive with ``template``)."""
    command: list[str] | None = None
    """Container entrypoint for the ``image`` shorthand."""
    args: list[str] | None = None
    """Container arguments for the ``image`` shorthand."""
    env: EnvMap = Field(default_factory=dict)
    """Environment variables for the ``image`` shorthand."""
    template: dict[str, Any] | None = None
    """A full PodSpec (``spec`` of a pod template), exclusive with ``image``."""
    service_account_name: str | None = None
    """Service account of the pod."""
    context: str | None = None
    """kubeconfig context; default the in-cluster config or the current context."""

    @model_validator(mode="after")
    def _image_or_template(self) -> KubernetesExecutor:
        if (self.image is None) == (self.template is None):
            raise ValueError("give exactly one of 'image' or 'template'")
        return self


EXECUTOR_TYPES = ("http", "shell", "docker", "kubernetes")


# --- kinds ---------------------------------------------------------------------------


class Metadata(Model):
    """Identity and labels of an object; ``status`` is never read from manifests."""

    name: DnsLabel
    """DNS-1123 label, unique per kind and namespace."""
    namespace: DnsLabel = "default"
    """The project the object belongs to."""
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    """Tags; selectors (``-l team=billing``) filter on them."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Free-form notes; ``oneoff.dev/prune: disabled`` and ``oneoff.dev/run-requested-at``."""


class JobSpec(Model):
    """What a job runs and when; exactly one executor block."""

    schedule: Schedule | None = None
    """When the job runs; omit for a job that runs only when asked (chain step, ad-hoc)."""
    suspend: bool = False
    """No new runs while true; running ones finish."""
    priority: Annotated[int, Field(ge=1, le=10)] = 5
    """1..10; higher runs first, FIFO by due time within a priority."""
    starting_deadline_seconds: Annotated[int, Field(ge=0)] = 3600
    """A run later than this is recorded as missed instead of started."""
    timeout_seconds: Annotated[float, Field(gt=0)] | None = None
    """Limit of each attempt."""
    active_deadline_seconds: Annotated[float, Field(gt=0)] | None = None
    """Limit across all attempts; beats retries."""
    retry: Retry = Retry()
    """Retry policy."""
    idempotent: bool = False
    """True: a run lost in a crash is retried; false: it is marked lost for a human."""
    overlap_policy: OverlapPolicy = OverlapPolicy.SKIP
    """What a new run does while another run of this job is active."""
    history_limit: HistoryLimit = HistoryLimit()
    """How many finished executions are kept."""
    env: EnvMap = Field(default_factory=dict)
    """Environment for shell, docker and kubernetes jobs; secrets through ``valueFrom``."""
    http: HttpExecutor | None = None
    """Executor: send an HTTP request."""
    shell: ShellExecutor | None = None
    """Executor: run a script or command on the OneOff host."""
    docker: DockerExecutor | None = None
    """Executor: run a container."""
    kubernetes: KubernetesExecutor | None = None
    """Executor: run a Kubernetes Job."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": [name]} for name in EXECUTOR_TYPES]}
    )

    @model_validator(mode="after")
    def _exactly_one_executor(self) -> JobSpec:
        given = [name for name in EXECUTOR_TYPES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a Job needs exactly one executor block: http, shell, docker or kubernetes"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def executor_type(self) -> str:
        """The name of the executor block that is set (``http``, ``shell``, ...)."""
        return next(name for name in EXECUTOR_TYPES if getattr(self, name) is not None)


class ChainStep(Model):
    """One step of a chain: a Job (or another Chain) in the same namespace."""

    job: DnsLabel | None = None
    """Name of a Job in the chain's namespace."""
    chain: DnsLabel | None = None
    """Name of another Chain in the same namespace, run as a nested sequence."""
    continue_on_failure: bool = False
    """Go on with the next step even if this one fails."""

    @model_validator(mode="after")
    def _job_or_chain(self) -> ChainStep:
        if (self.job is None) == (self.chain is None):
            raise ValueError("give exactly one of 'job' or 'chain'")
        return self

    @property
    def target(self) -> tuple[str, str]:
        """(kind, name) of what this step runs."""
        return ("Job", self.job) if self.job is not None else ("Chain", self.chain or "")


class ChainSpec(Model):
    """Steps run one after another, stopping at the first failure unless told otherwise."""

    schedule: Schedule | None = None
    """When the chain runs; omit for a chain run only when asked."""
    suspend: bool = False
    """No new runs while true."""
    priority: Annotated[int, Field(ge=1, le=10)] = 5
    """Priority of the steps' runs."""
    starting_deadline_seconds: Annotated[int, Field(ge=0)] = 3600
    """A chain run later than this is recorded as missed."""
    overlap_policy: OverlapPolicy = OverlapPolicy.SKIP
    """What a new chain run does while another one is active."""
    history_limit: HistoryLimit = HistoryLimit()
    """How many finished chain runs are kept."""
    steps: list[ChainStep] = Field(min_length=1)
    """The steps, in order."""
    finally_: ChainStep | None = Field(default=None, alias="finally")
    """A step that always runs at the end, whatever happened before."""


class WebhookEvent(StrEnum):
    EXECUTION_ALL = "execution.*"
    EXECUTION_STARTED = "execution.started"
    EXECUTION_SUCCEEDED = "execution.succeeded"
    EXECUTION_FAILED = "execution.failed"
    EXECUTION_TIMED_OUT = "execution.timed_out"
    EXECUTION_CANCELLED = "execution.cancelled"
    EXECUTION_MISSED = "execution.missed"
    EXECUTION_LOST = "execution.lost"
    CHAIN_FINISHED = "chain.finished"
    RECONCILE_FAILED = "reconcile.failed"
    ALL = "*"


class WebhookFormat(StrEnum):
    STANDARD = "standard"
    SLACK = "slack"
    DISCORD = "discord"


class Selector(Model):
    """Which objects' events a webhook receives; empty means all."""

    namespaces: list[DnsLabel] = Field(default_factory=list)
    """Only these namespaces (empty: all)."""
    match_labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    """Only objects carrying all these labels."""


class WebhookSpec(Model):
    """An outgoing notification, signed per the Standard Webhooks specification."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/$.?#][^\s]*$")]
    """Where events are POSTed (a Slack or Discord incoming-webhook URL works directly)."""
    events: list[WebhookEvent] = Field(min_length=1)
    """Event types delivered, e.g. ``execution.failed`` or ``execution.*``."""
    selector: Selector = Selector()
    """Restrict to namespaces and labels."""
    secret_from: ValueSource | None = None
    """The ``whsec_…`` signing secret; deliveries are unsigned without it."""
    headers: dict[str, EnvValue] = Field(default_factory=dict)
    """Extra request headers."""
    format: WebhookFormat = WebhookFormat.STANDARD
    """Body format: standard JSON, or a Slack / Discord message."""
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10
    """Limit of each delivery attempt."""
    suspend: bool = False
    """Queue no new deliveries while true."""


class Scope(StrEnum):
    READ = "read"
    RUN = "run"
    CANCEL = "cancel"
    WRITE = "write"
    ADMIN = "admin"


class ApiKeySpec(Model):
    """A key for the API and CLI; the raw token never appears in a manifest."""

    scopes: list[Scope] = Field(min_length=1)
    """What the key may do: read, run, cancel, write (objects), admin (keys)."""
    namespaces: list[DnsLabel] | None = None
    """Limit the key to these namespaces (default: all)."""
    expires_at: AwareDatetime | None = None
    """The key stops working at this instant (RFC 3339 with offset)."""
    disabled: bool = False
    """Revoke the key without deleting it."""
    token_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    """Lower-case hex SHA-256 of the token (``oneoff keys generate`` prints both)."""
    token_from: ValueSource | None = None
    """Read the raw token from an environment variable or file of the server."""

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeySpec:
        if (self.token_sha256 is None) == (self.token_from is None):
            raise ValueError("give exactly one of 'tokenSha256' or 'tokenFrom'")
        return self


class _Object(Model):
    api_version: Literal["oneoff.dev/v1"]
    """Always ``oneoff.dev/v1``."""
    metadata: Metadata
    """Name, namespace, labels and annotations."""


class Job(_Object):
    """A job: one piece of work, run at its time (or when asked)."""

    kind: Literal["Job"]
    spec: JobSpec


class Chain(_Object):
    """A sequence of jobs run one after another."""

    kind: Literal["Chain"]
    spec: ChainSpec


class Webhook(_Object):
    """An endpoint notified about executions and reconcile failures."""

    kind: Literal["Webhook"]
    spec: WebhookSpec


class ApiKey(_Object):
    """A credential for the API and CLI with scopes."""

    kind: Literal["ApiKey"]
    spec: ApiKeySpec


Manifest = Annotated[Job | Chain | Webhook | ApiKey, Field(discriminator="kind")]
"""Any manifest, tagged by ``kind`` (for request bodies that accept every kind)."""

KINDS: dict[str, type[Job | Chain | Webhook | ApiKey]] = {
    "Job": Job,
    "Chain": Chain,
    "Webhook": Webhook,
    "ApiKey": ApiKey,
}
"""The kinds by name, in the order they are shown."""

SPECS: dict[str, type[JobSpec | ChainSpec | WebhookSpec | ApiKeySpec]] = {
    "Job": JobSpec,
    "Chain": ChainSpec,
    "Webhook": WebhookSpec,
    "ApiKey": ApiKeySpec,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every kind, keyed by file name (``job.json``)."""
    schemas: dict[str, dict[str, Any]] = {}
    for kind, model in KINDS.items():
        schema = model.model_json_schema(by_alias=True)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://oneoff.dev/schemas/{kind.lower()}.json"
        schemas[f"{kind.lower()}.json"] = schema
    return schemas
