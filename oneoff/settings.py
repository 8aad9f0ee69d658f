"""Server settings: flags, then ``ONEOFF_*`` environment, then a config file, then defaults.

Built once by the CLI (``oneoff serve``) and handed to the daemon; nothing reads the
environment anywhere else. The names are a contract (DESIGN.md §6): scripts, the Helm
chart and the docs depend on them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from oneoff.errors import UsageError


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    TEXT = "text"


class Settings(BaseModel):
    """Every setting of ``oneoff serve``; see the table in README.md."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    state: str = "./oneoff.db"
    """The SQLite state file (ONEOFF_STATE, --state)."""
    manifests: tuple[str, ...] = ("./jobs.d",)
    """Watched manifest directories (ONEOFF_MANIFESTS, ':'-separated; --manifests, repeatable)."""
    listen: str = "127.0.0.1:8080"
    """API and UI address (ONEOFF_LISTEN, --listen)."""
    workers: Annotated[int, Field(ge=1, le=1024)] = 8
    """Concurrent runs (ONEOFF_WORKERS, --workers)."""
    retention_days: Annotated[float, Field(gt=0)] = 90
    """Execution, delivery and audit retention (ONEOFF_RETENTION_DAYS)."""
    log_format: LogFormat = LogFormat.AUTO
    """json off a terminal, text on one (ONEOFF_LOG_FORMAT)."""
    log_level: str = "INFO"
    """Python logging level name (ONEOFF_LOG_LEVEL)."""
    resync_seconds: Annotated[float, Field(gt=0)] = 60
    """Periodic full reconcile, besides the file watcher (ONEOFF_RESYNC_SECONDS)."""
    prune_max_share: Annotated[float, Field(ge=0, le=1)] = 0.5
    """A reconcile deleting all, or more than this share, of a source's objects is refused;
    1 turns the guard off (ONEOFF_PRUNE_MAX_SHARE, --prune-max-share)."""
    max_manifest_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    """Largest manifest file read (ONEOFF_MAX_MANIFEST_BYTES)."""
    insecure: bool = False
    """Serve the API on a non-loopback address even though no ApiKey is declared
    (ONEOFF_INSECURE, --insecure)."""
    recurring: bool = True
    """Run cron schedules; false keeps OneOff strictly one-time (ONEOFF_RECURRING)."""
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 30
    """On stop, running jobs get this long to finish before they are cancelled
    (ONEOFF_SHUTDOWN_GRACE_SECONDS)."""
    kill_grace_seconds: Annotated[float, Field(ge=0)] = 10
    """Between SIGTERM and SIGKILL when a shell job is cancelled or times out
    (ONEOFF_KILL_GRACE_SECONDS)."""
    docker_host: str | None = None
    """Docker Engine API address of docker jobs, e.g. ``unix:///run/docker.sock`` or
    ``tcp://host:2376``; unset: ``DOCKER_HOST``, then the local default socket
    (ONEOFF_DOCKER_HOST)."""
    metrics_auth: bool = False
    """Ask for an API key with the ``read`` scope on ``/metrics`` too; off by default, as
    Prometheus scrapers seldom carry one (ONEOFF_METRICS_AUTH)."""

    @field_validator("manifests", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part for part in value.split(":") if part)
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value.upper()


ENV_PREFIX = "ONEOFF_"


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Merge the layers; a flag left unset (``None``) falls through to the next layer."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    config_file = config_file or environ.get("ONEOFF_CONFIG")
    if config_file:
        merged.update(_read_config(config_file))
    names = Settings.model_fields
    for name in names:
        value = environ.get(ENV_PREFIX + name.upper())
        if value not in (None, ""):
            merged[name] = value
    merged.update(
        (name, value)
        for name, value in (flags or {}).items()
        if value not in (None, ()) and name in names
    )
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise UsageError(f"invalid settings: {problems}") from None


SECRET_WORDS = ("key", "token", "password", "secret")
"""A setting whose name has one of these words is shown masked by ``oneoff config``."""


def explain_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> list[tuple[str, Any, str]]:
    """(name, effective value, where it came from) of every setting, for ``oneoff
    config``: ``flag``, ``env ONEOFF_…``, ``file <path>`` or ``default``. Secrets (a
    secret-sounding name, a password in a URL) are masked."""
    environ = os.environ if environ is None else environ
    settings = load_settings(flags, environ, config_file)
    config_file = config_file or environ.get("ONEOFF_CONFIG")
    from_file = _read_config(config_file) if config_file else {}
    rows = []
    for name in Settings.model_fields:
        env = ENV_PREFIX + name.upper()
        if (flags or {}).get(name) not in (None, ()):
            where = "flag"
        elif environ.get(env) not in (None, ""):
            where = f"env {env}"
        elif name in from_file:
            where = f"file {config_file}"
        else:
            where = "default"
        rows.append((name, _masked(name, getattr(settings, name)), where))
    return rows


def _masked(name: str, value: Any) -> Any:
    if value is None or value == "":
        return value
    if any(word in name for word in SECRET_WORDS):
        return "********"
    if isinstance(value, str):
        return re.sub(r"(?<=://)([^/@:]*):[^/@]*@", r"\1:********@", value)
    return value


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of setting: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}
