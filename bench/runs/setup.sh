#!/usr/bin/env bash
# One-time setup for bench/runs/run.py: the peer schedulers go into their own virtualenv
# (bench/.venv-peers), never into the project's dependencies; redis-server comes from
# Debian when running as root (Celery's broker). Safe to run again.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bench="$(dirname "$here")"
python="${PYTHON:-python3}"

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
    else
        echo "redis-server is missing: install it (apt-get install redis-server); the" \
             "Celery runs are skipped without it" >&2
    fi
fi

if [ ! -x "$bench/.venv-peers/bin/python" ]; then
    "$python" -m venv "$bench/.venv-peers"
fi
"$bench/.venv-peers/bin/pip" install -q --upgrade pip
"$bench/.venv-peers/bin/pip" install -q \
    'apscheduler>=3.10,<4' 'sqlalchemy>=2' \
    'huey>=2.5' \
    'celery[redis]>=5.3' 'redis>=5' \
    'py-spy>=0.3'
"$bench/.venv-peers/bin/python" - <<'PY'
from importlib.metadata import version
print("peers:", ", ".join(f"{p} {version(p)}" for p in
      ("apscheduler", "sqlalchemy", "huey", "celery", "redis", "kombu")))
PY
