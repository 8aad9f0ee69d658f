"""API keys: a bearer token → the :class:`Principal` a request acts as.

Called by ``api`` on every request. Keys are ``ApiKey`` objects, declared in manifests
(``tokenSha256`` or ``tokenFrom``) or created through the API (the server generates the
token, shows it once and stores only its hash). The key ring re-reads the keys whenever
the store's objects revision moves, and checks ``disabled`` and ``expiresAt`` on every
request, so a revocation or expiry takes effect on the very next request.

Tokens are compared as SHA-256 digests with :func:`hmac.compare_digest`, against every
key (no early exit), so the time taken says nothing about how close a guess was.
``status.lastUsedAt`` is written at most once a minute per key, so authentication stays
a read.

Scopes: ``read``, ``run``, ``cancel``, ``write`` (apply, create, delete objects),
``admin`` (keys). ``admin`` includes every other scope; every scope includes ``read``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from oneoff.errors import Forbidden, Unauthorized
from oneoff.manifests import ApiKeySpec, Scope
from oneoff.records import Stored, isoformat, utcnow
from oneoff.store import Store

log = logging.getLogger(__name__)

TOKEN_PREFIX = "oo_"
TOUCH_EVERY_SECONDS = 60.0


def generate_token() -> tuple[str, str]:
    """A new random token and its ``tokenSha256``."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_sha256(token)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: a key's name, scopes and namespaces."""

    name: str | None
    scopes: frozenset[Scope]
    namespaces: tuple[str, ...] | None = None
    """The namespaces the key is limited to; ``None`` is every namespace."""
    authenticated: bool = True

    def allows(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes or (
            scope is Scope.READ and bool(self.scopes))

    def require(self, scope: Scope, namespace: str | None = None) -> None:
        """Raise :class:`Forbidden` unless the key has ``scope`` (in ``namespace``)."""
        if not self.allows(scope):
            have = ", ".join(sorted(self.scopes)) or "none"
            raise Forbidden(f"API key '{self.name}' lacks the '{scope}' scope (it has: {have})")
        if namespace is not None and not self.sees(namespace):
            limited = ", ".join(self.namespaces or ())
            raise Forbidden(
                f"API key '{self.name}' may not act in namespace '{namespace}' "
                f"(it is limited to: {limited})"
            )

    def sees(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces


ANONYMOUS = Principal(None, frozenset(Scope), None, authenticated=False)
"""What a request acts as while no key is declared (the server then binds only to
loopback, unless started with ``--insecure``)."""


@dataclass(frozen=True, slots=True)
class _Key:
    uid: str
    name: str
    sha256: str
    spec: ApiKeySpec


class KeyRing:
    """The declared API keys, looked up per request."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = utcnow,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self._lock = threading.Lock()
        self._revision = -1
        self._keys: list[_Key] = []
        self._declared = 0
        self._touched: dict[str, float] = {}

    def keys(self) -> list[_Key]:
        """The usable keys (re-read when any object changed)."""
        revision = self.store.objects_revision()
        with self._lock:
            if revision != self._revision:
                declared = self.store.objects("ApiKey", with_status=False)
                self._keys, self._declared = self._read(declared), len(declared)
                self._revision = revision
            return self._keys

    def any(self) -> bool:
        """Whether any ApiKey is declared (usable or not): then every request needs one."""
        self.keys()
        return self._declared > 0

    def _read(self, declared: list[Stored]) -> list[_Key]:
        keys = []
        for obj in declared:
            spec = ApiKeySpec.model_validate_json(obj.spec_json)
            sha = spec.token_sha256
            if sha is None and spec.token_from is not None:
                source = spec.token_from
                try:
                    if source.env is not None:
                        token = self.environ[source.env]
                    else:
                        assert source.file is not None
                        with open(source.file, encoding="utf-8") as handle:
                            token = handle.read().strip()
                except (KeyError, OSError) as exc:
                    log.warning("API key %s is unusable: its tokenFrom cannot be read (%s)",
                                obj.key.name, exc, extra={"action": "auth", "key": obj.key.name})
                    continue
                sha = token_sha256(token)
            if sha is not None:
                keys.append(_Key(obj.uid, obj.key.name, sha, spec))
        return keys

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value; raises Unauthorized."""
        keys = self.keys()
        if not self.any():
            return ANONYMOUS
        if not authorization:
            raise Unauthorized(
                "this server requires an API key: send 'Authorization: Bearer <token>' "
                "(oneoff --api-key or ONEOFF_API_KEY)"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        presented = token_sha256(token.strip())
        match: _Key | None = None
        for key in keys:  # every key is compared: no early exit
            if hmac.compare_digest(key.sha256, presented):
                match = key
        if match is None:
            raise Unauthorized("unknown API key")
        spec = match.spec
        if spec.disabled:
            raise Unauthorized(f"API key '{match.name}' is disabled")
        now = self.clock()
        if spec.expires_at is not None and now >= spec.expires_at:
            raise Unauthorized(f"API key '{match.name}' expired at {isoformat(spec.expires_at)}")
        self._touch(match, now)
        return Principal(match.name, frozenset(spec.scopes),
                         tuple(spec.namespaces) if spec.namespaces is not None else None)

    def _touch(self, key: _Key, now: datetime) -> None:
        """Record ``status.lastUsedAt``, at most once a minute per key."""
        moment = time.monotonic()
        with self._lock:
            if moment - self._touched.get(key.uid, -TOUCH_EVERY_SECONDS) < TOUCH_EVERY_SECONDS:
                return
            self._touched[key.uid] = moment
        if self.store.readonly:
            return
        current = self.store.by_uid(key.uid)
        if current is None:
            return
        with self.store.transaction(now) as tx:
            tx.set_status(key.uid, {**current.status, "lastUsedAt": isoformat(now)})
