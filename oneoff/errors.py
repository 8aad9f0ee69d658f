"""The one exception tree of OneOff, and the located problem a manifest can have.

Every error a user can see is raised as one of these; the CLI maps them to an exit code
in one place (``cli.main``) and the API maps them to problem+json in one handler
(``api._problem``); the CLI's client (``client.problem_error``) turns problem+json back
into the same classes.

    OneOffError                  anything OneOff reports on purpose
    ├── ManifestError            manifests that cannot be read or validated (carries Issues)
    ├── PlanRefused              a plan that breaks a safety rule (mass prune, conflicts)
    ├── NotFound                 a named object or run does not exist        (HTTP 404)
    ├── Conflict                 the request fights the current state        (HTTP 409)
    │   └── ApplyConflict        an apply refused as a whole; carries its plan and issues
    ├── Unauthorized             no API key, or an unknown/expired/revoked one (HTTP 401)
    ├── Forbidden                the key lacks the scope or namespace         (HTTP 403)
    ├── Unreachable              the CLI cannot reach the server (refused, DNS, TLS, timeout)
    ├── ServerError              the server answered with an error of its own (HTTP 5xx) or
    │                            is not a OneOff server
    ├── StoreError               the state file cannot be opened, migrated or written
    └── UsageError               a command line or setting that makes no sense

An :class:`Issue` is one problem with a place: file, line, column and the field path
inside the document (``spec.http.url``). Issues are values; they travel inside plans and
source status and are rendered as ``file:line:column: field: message``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem found in a manifest, with the place a person should look."""

    file: str
    message: str
    line: int | None = None
    column: int | None = None
    field: str = ""

    def __str__(self) -> str:
        place = self.file
        if self.line is not None:
            place += f":{self.line}"
            if self.column is not None:
                place += f":{self.column}"
        field = f"{self.field}: " if self.field else ""
        return f"{place}: {field}{self.message}"

    def to_dict(self) -> dict[str, str | int | None]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "message": self.message,
        }


class OneOffError(Exception):
    """Base of every error OneOff raises on purpose; ``str()`` is what a user reads."""


class ManifestError(OneOffError):
    """One or more manifests failed to load; every issue is reported, not just the first."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class PlanRefused(OneOffError):
    """A plan was computed but applying it would break a safety rule."""


class NotFound(OneOffError):
    """The named object, source or run does not exist."""


class StoreError(OneOffError):
    """The state file could not be opened, migrated, read or written."""


class UsageError(OneOffError):
    """The command line or a setting asks for something that cannot be done."""


class Conflict(OneOffError):
    """The request is valid but the current state refuses it: the object exists, another
    source owns it, or the run has already finished."""


class Unauthorized(OneOffError):
    """No API key was given, or it is unknown, expired or revoked."""


class Forbidden(OneOffError):
    """The API key is valid but lacks the scope or namespace the request needs."""


class ApplyConflict(Conflict):
    """An apply the server refused as a whole (an object another source owns, a mass
    prune): the plan it computed and the located issues, for the CLI to show."""

    def __init__(self, message: str, plan: dict[str, Any] | None = None,
                 issues: list[Issue] | None = None) -> None:
        self.plan = plan
        self.issues = issues or []
        super().__init__(message)


class Unreachable(OneOffError):
    """The CLI cannot reach the server: connection refused, unknown host, TLS, timeout."""


class ServerError(OneOffError):
    """The server answered with an error of its own (HTTP 5xx), or something that is not
    a OneOff server answered."""
