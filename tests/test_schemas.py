"""``schemas/`` holds the JSON Schema of every kind, exactly as the models generate it.

Editors validate manifests against these files; a stale file means a user's editor
accepts what the server rejects (or the reverse).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oneoff.manifests import KINDS, json_schemas

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
STALE = "schemas/ is stale: run `oneoff schema --write schemas/`"


def _serialised(schema: dict[str, object]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_schema_file_matches_the_models(name: str) -> None:
    path = SCHEMAS / name

    assert path.is_file(), STALE
    assert path.read_text(encoding="utf-8") == _serialised(json_schemas()[name]), STALE


def test_schemas_directory_has_one_file_per_kind_and_nothing_stale() -> None:
    files = {path.name for path in SCHEMAS.iterdir() if path.suffix == ".json"}

    assert files == {f"{kind.lower()}.json" for kind in KINDS}, STALE


def test_schemas_readme_says_the_files_are_generated() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")

    assert "oneoff schema --write schemas/" in readme
    assert "yaml-language-server: $schema=" in readme
