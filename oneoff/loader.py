"""Files and directories → documents with file:line → validated objects → desired state.

Called by ``oneoff validate``, ``oneoff diff`` and the reconciler; hands a
:class:`LoadResult` to ``plan``. Nothing here touches the store.

Reading is built for two things at once: speed (10,000 objects in about a second, and an
unchanged file is not parsed again — see :class:`FileCache`) and precise errors (every
:class:`~oneoff.errors.Issue` names file, line, column and field path). YAML is parsed by
libyaml through PyYAML's C loader, which is several times faster than a pure-Python parser;
the composed node tree keeps the position of every key, so pointing at a bad field costs
nothing extra. Timestamps stay strings (so an ``at`` without an offset is caught, not
silently read as UTC) and a key written twice in one mapping is an error.

What a failure means for the reconciler is carried in the result: a file that cannot be
read or parsed is *failed* (its stored objects are kept as they are); a document that
fails validation names its key when it can, and that object is kept.
"""

from __future__ import annotations

import bisect
import difflib
import hashlib
import os
import re
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from oneoff.errors import Issue
from oneoff.manifests import DNS_LABEL, KINDS, ChainSpec
from oneoff.records import Desired, ObjectKey

MANIFEST_SUFFIXES = (".yaml", ".yml")
DEFAULT_MAX_FILE_BYTES = 4 * 1024 * 1024

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _ManifestLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """libyaml's safe loader, with timestamps kept as text and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
        if len(keys) != len(set(keys)):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key_node.value!r} is written twice",
                            key_node.start_mark,
                        )
                    seen.add(key_node.value)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


_ManifestLoader.add_constructor("tag:yaml.org,2002:timestamp", _ManifestLoader.construct_yaml_str)


@dataclass(frozen=True, slots=True)
class FileResult:
    """Everything one file declared, or why it could not be read."""

    path: str
    sha256: str
    objects: tuple[Desired, ...] = ()
    issues: tuple[Issue, ...] = ()
    failed_keys: frozenset[ObjectKey] = frozenset()
    """Keys of documents that did not validate: their stored objects are kept."""
    failed: bool = False
    """The file as a whole could not be read or parsed: all its stored objects are kept."""


@dataclass(slots=True)
class LoadResult:
    """The desired state of one or more paths, with every issue found."""

    objects: list[Desired] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    failed_keys: set[ObjectKey] = field(default_factory=set)
    failed_files: set[str] = field(default_factory=set)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues


Fingerprint = tuple[int, int, int, int]
"""(device, inode, size, mtime in ns) of a file, following symlinks."""


class FileCache:
    """Remembers each file's result so an unchanged file is not parsed again.

    Two levels: a file whose content hash is unchanged is not re-parsed; a file whose
    fingerprint (inode, size, mtime) is unchanged is not even re-read, when the caller
    trusts fingerprints (a watcher-triggered pass; the periodic resync hashes everything).
    A ConfigMap's symlink swap changes the inode behind the path, so it is always seen.
    """

    def __init__(self) -> None:
        self._results: dict[str, FileResult] = {}
        self._fingerprints: dict[str, Fingerprint] = {}

    def get(self, path: str, sha256: str) -> FileResult | None:
        result = self._results.get(path)
        return result if result is not None and result.sha256 == sha256 else None

    def unchanged(self, path: str, fingerprint: Fingerprint | None) -> FileResult | None:
        if fingerprint is None or self._fingerprints.get(path) != fingerprint:
            return None
        return self._results.get(path)

    def put(self, result: FileResult, fingerprint: Fingerprint | None = None) -> None:
        self._results[result.path] = result
        if fingerprint is not None:
            self._fingerprints[result.path] = fingerprint
        else:
            self._fingerprints.pop(result.path, None)

    def retain(self, paths: Iterable[str]) -> None:
        keep = set(paths)
        for path in [p for p in self._results if p not in keep]:
            del self._results[path]
            self._fingerprints.pop(path, None)


def _fingerprint(path: str) -> Fingerprint | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


# --- finding files -------------------------------------------------------------------


def discover(root: str) -> tuple[list[str], list[Issue]]:
    """Every manifest file under ``root`` (a file or a directory), sorted, and walk issues.

    Names starting with ``.`` are skipped at every level, which is also what makes a
    mounted ConfigMap (``..data`` → ``..2024_…``, files symlinked through it) read once.
    Symlinks are followed; a loop is reported instead of followed forever.
    """
    issues: list[Issue] = []
    try:
        info = os.stat(root)
    except OSError as exc:
        return [], [Issue(root, _os_reason(exc))]
    if not stat.S_ISDIR(info.st_mode):
        return [root], []
    files: list[str] = []
    _walk(root, {(info.st_dev, info.st_ino)}, files, issues)
    files.sort()
    return files, issues


def _walk(
    directory: str, ancestors: set[tuple[int, int]], files: list[str], issues: list[Issue]
) -> None:
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as exc:
        issues.append(Issue(directory, f"cannot list directory: {_os_reason(exc)}"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = os.path.normpath(entry.path)
        try:
            info = os.stat(path)
        except OSError as exc:
            if entry.name.endswith(MANIFEST_SUFFIXES) or entry.is_symlink():
                issues.append(Issue(path, _os_reason(exc)))
            continue
        if stat.S_ISDIR(info.st_mode):
            ident = (info.st_dev, info.st_ino)
            if ident in ancestors:
                issues.append(
                    Issue(path, "symlink loop: this directory contains itself; not followed")
                )
                continue
            _walk(path, ancestors | {ident}, files, issues)
        elif entry.name.endswith(MANIFEST_SUFFIXES):
            files.append(path)


def _os_reason(exc: OSError) -> str:
    if exc.errno == 40:  # ELOOP
        return "symlink loop: too many levels of symbolic links"
    if isinstance(exc, FileNotFoundError) and os.path.islink(exc.filename or ""):
        return "broken symlink: its target does not exist"
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    if isinstance(exc, PermissionError):
        return "permission denied: the OneOff process cannot read it"
    return exc.strerror or str(exc)


# --- reading one file ----------------------------------------------------------------


def read_bytes(path: str, max_bytes: int) -> tuple[bytes | None, Issue | None]:
    """The file's content, or an issue saying why it cannot be used."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return None, Issue(path, "not a regular file")
        if info.st_size > max_bytes:
            return None, Issue(
                path,
                f"file is {info.st_size / 2**20:.1f} MiB, larger than the "
                f"{max_bytes / 2**20:.1f} MiB limit for a manifest file; split it",
            )
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        return None, Issue(path, _os_reason(exc))
    if len(data) > max_bytes:
        return None, Issue(path, f"file grew past the {max_bytes / 2**20:.1f} MiB limit")
    return data, None


def parse_file(path: str, data: bytes, *, lists: bool = False) -> FileResult:
    """Parse and validate one file's content (cached by the caller on its hash).

    ``lists``: a document that is a list holds manifests (a JSON array sent to the API).
    """
    sha = hashlib.sha256(data).hexdigest()
    if b"\0" in data:
        return FileResult(
            path, sha, issues=(Issue(path, "binary data, not a YAML text file"),), failed=True
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return FileResult(
            path,
            sha,
            issues=(Issue(path, f"not UTF-8 text (byte 0x{data[exc.start]:02x})", line=line),),
            failed=True,
        )
    objects: list[Desired] = []
    issues: list[Issue] = []
    failed_keys: set[ObjectKey] = set()
    failed = False
    # Each document is validated as soon as it is composed and its node tree dropped:
    # holding the trees of a long stream (10,000 documents sent to the API) made parsing
    # several times slower. A syntax error anywhere still fails the whole file.
    try:
        for node, document in _documents(_compose_all(text), lists):
            if document is None:
                continue
            desired, doc_issues, key = _validate_document(path, node, document)
            if desired is not None:
                objects.append(desired)
                continue
            issues.extend(doc_issues)
            if key is None:
                failed = True  # we cannot tell which object this was: keep all of the file's
            else:
                failed_keys.add(key)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        start = exc.context_mark
        if exc.context and start is not None and exc.problem and (
            mark is None or (start.line, start.column) != (mark.line, mark.column)
        ):
            problem += f" ({exc.context} that starts at line {start.line + 1}, column " \
                f"{start.column + 1})"
        return FileResult(
            path,
            sha,
            issues=(
                Issue(
                    path,
                    f"YAML syntax: {problem}",
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                ),
            ),
            failed=True,
        )
    except (yaml.YAMLError, RecursionError) as exc:
        return FileResult(path, sha, issues=(Issue(path, f"YAML: {exc}"),), failed=True)

    return FileResult(path, sha, tuple(objects), tuple(issues), frozenset(failed_keys), failed)


def _documents(
    composed: Iterator[tuple[yaml.Node, Any]], lists: bool
) -> Iterator[tuple[yaml.Node, Any]]:
    """The documents of a stream; with ``lists``, a document that is a list is its items."""
    for node, document in composed:
        if lists and isinstance(document, list) and isinstance(node, yaml.SequenceNode):
            yield from zip(node.value, document, strict=True)
        else:
            yield node, document


ALIAS_EXPANSION_LIMIT = 10_000
"""Aliases may not blow a document up past this many values and ten times its written size
(the "billion laughs" attack: a few hundred bytes of nested anchors becoming gigabytes)."""


def _compose_all(text: str) -> Iterator[tuple[yaml.Node, Any]]:
    """Each document's node tree (positions) with its constructed value."""
    loader = _ManifestLoader(text)
    may_alias = "&" in text  # no anchor, no alias: nothing can expand
    general = may_alias or "<<" in text  # once per text, not per document
    try:
        while loader.check_node():
            node = loader.get_node()
            sizes: dict[int, int] = {}
            size = _expanded_size(node, sizes) if may_alias else 0
            if size > ALIAS_EXPANSION_LIMIT and size > 10 * len(sizes):
                raise yaml.MarkedYAMLError(
                    problem=f"aliases expand this document from {len(sizes):,} to {size:,} "
                    "values; refused (write the values out, or use fewer nested aliases)",
                    problem_mark=node.start_mark,
                )
            if general:
                # anchors and merge keys: PyYAML's own constructor handles their semantics
                yield node, loader.construct_document(node)
            else:
                value = _plain_value(node, loader)
                # what construct_document would do: forget this document's nodes, or the
                # loader keeps every node of a long stream alive
                loader.constructed_objects.clear()
                yield node, value
    finally:
        loader.dispose()


_STR_TAG = "tag:yaml.org,2002:str"


def _plain_value(node: yaml.Node, loader: _ManifestLoader) -> Any:
    """Node tree → Python values for documents without anchors or merge keys.

    Several times faster than PyYAML's general constructor, which is built for recursive
    aliases; the result is the same. Scalars other than strings (ints, floats, booleans,
    null; timestamps stay text) go through the loader's own resolvers.
    """
    if isinstance(node, yaml.ScalarNode):
        return node.value if node.tag == _STR_TAG else loader.construct_object(node)
    if isinstance(node, yaml.SequenceNode):
        return [_plain_value(item, loader) for item in node.value]
    if isinstance(node, yaml.MappingNode):
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _plain_value(key_node, loader)
            if key in mapping:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice", key_node.start_mark
                )
            try:
                mapping[key] = _plain_value(value_node, loader)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                ) from None
        return mapping
    return loader.construct_object(node)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` becomes once every alias is expanded (memoised per node)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1  # a recursive alias counts once instead of looping
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    sizes[id(node)] = size
    return size


def _validate_document(
    path: str, node: yaml.Node, document: Any
) -> tuple[Desired | None, list[Issue], ObjectKey | None]:
    line = node.start_mark.line + 1
    if not isinstance(document, dict):
        return None, [Issue(path, _NOT_A_MANIFEST, line=line)], None
    kind = document.get("kind")
    key = _key_of(document)
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        message = (
            "missing 'kind'" if kind is None else f"unknown kind {kind!r}"
        ) + f"; expected one of {', '.join(KINDS)}"
        return None, [_issue_at(path, node, ("kind",), message, exact=kind is not None)], key
    document = {k: v for k, v in document.items() if k != "status"}  # status is the server's
    try:
        obj = model.model_validate(document)
    except ValidationError as exc:
        return None, _validation_issues(path, node, model, exc.errors()), key
    spec = obj.spec.model_dump(mode="json", exclude_unset=True, by_alias=True)
    meta = obj.metadata
    desired = Desired(
        key=ObjectKey(obj.kind, meta.namespace, meta.name),
        spec=spec,
        labels=dict(meta.labels),
        annotations=dict(meta.annotations),
        file=path,
        line=line,
    )
    return desired, [], desired.key


_NOT_A_MANIFEST = "a manifest must be a mapping with apiVersion, kind, metadata and spec"


def _key_of(document: dict[Any, Any]) -> ObjectKey | None:
    """The object key if the document names one plausibly, even when it fails validation."""
    kind, metadata = document.get("kind"), document.get("metadata")
    if not isinstance(kind, str) or kind not in KINDS or not isinstance(metadata, dict):
        return None
    name, namespace = metadata.get("name"), metadata.get("namespace", "default")
    if not isinstance(name, str) or not isinstance(namespace, str):
        return None
    if not re.match(DNS_LABEL, name) or not re.match(DNS_LABEL, namespace):
        return None
    return ObjectKey(kind, namespace, name)


# --- turning validation errors into located issues -----------------------------------


def _validation_issues(
    path: str, node: yaml.Node, model: type[BaseModel], errors: list[ErrorDetails]
) -> list[Issue]:
    grouped: dict[tuple[str, int | None, int | None], list[str]] = defaultdict(list)
    deeper = [tuple(error["loc"]) for error in errors]
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"].endswith("_type") and any(
            len(other) > len(loc) and other[: len(loc) - 1] == loc[:-1] for other in deeper
        ):
            continue  # a union branch that did not apply; the deeper error says more
        target, key, field_path, matched_all = _locate(node, error["loc"])
        if error["type"] == "missing" and not matched_all:
            message = f"required field '{error['loc'][-1]}' is missing"
        else:
            message = _message(error, model, field_path)
        mark = (key if error["type"] == "extra_forbidden" and key else target).start_mark
        group = grouped[(".".join(str(p) for p in field_path), mark.line + 1, mark.column + 1)]
        if message and message not in group:
            group.append(message)
    issues = [
        Issue(path, "; or ".join(messages), line=line, column=column, field=field_path)
        for (field_path, line, column), messages in grouped.items()
    ]
    return sorted(issues, key=lambda issue: (issue.line or 0, issue.column or 0))


def _locate(
    node: yaml.Node, loc: tuple[int | str, ...]
) -> tuple[yaml.Node, yaml.Node | None, list[Any], bool]:
    """Follow a pydantic error location through the YAML node tree.

    Location parts that name no key (the member names pydantic adds inside unions) are
    skipped. Returns the deepest node reached, the key node that led to it (if any), the
    field path a person reads, and whether every real part was found.
    """
    current, matched_all = node, True
    current_key: yaml.Node | None = None
    field_path: list[Any] = []
    for part in loc:
        child: yaml.Node | None = None
        child_key: yaml.Node | None = None
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                if key_node.value == part:
                    child, child_key = value_node, key_node
                    break
            if (
                child is None
                and isinstance(part, str)
                and part[:1].islower()
                and (part not in _UNION_TAGS)
            ):
                field_path.append(part)  # a missing field: point at its parent mapping
                matched_all = False
                break
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(current.value):
                child = current.value[part]
        if child is None:
            continue
        field_path.append(part)
        current, current_key = child, child_key
    if loc and loc[-1] not in _UNION_TAGS and field_path and field_path[-1] != loc[-1]:
        matched_all = False
    return current, current_key, field_path, matched_all


_UNION_TAGS = {"str", "int", "float", "bool", "datetime", "literal['now']", "list", "dict"}


def _message(error: ErrorDetails, model: type[BaseModel], field_path: list[Any]) -> str:
    kind, given = error["type"], error.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_fields(model, field_path[:-1])
        close = difflib.get_close_matches(str(field_path[-1]), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown field '{field_path[-1]}'{hint}"
    if kind == "string_pattern_mismatch":
        pattern = str((error.get("ctx") or {}).get("pattern", ""))
        if pattern == DNS_LABEL:
            return (
                f"{given!r} is not a DNS-1123 label: use lower-case letters, digits and '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        if pattern.startswith("^https?"):
            return f"{given!r} is not an absolute http:// or https:// URL"
        return f"{given!r} does not have the expected form ({pattern})"
    if kind == "timezone_aware":
        return (
            f"{given!r} has no UTC offset; write one, e.g. 2026-12-24T15:00:00+01:00 "
            "or 2026-12-24T14:00:00Z (or the word 'now')"
        )
    if kind == "literal_error" and field_path and field_path[-1] == "at":
        return ""  # the datetime branch's message already mentions 'now'
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind in {
        "string_type",
        "int_type",
        "float_type",
        "bool_type",
        "dict_type",
        "list_type",
        "int_parsing",
        "float_parsing",
        "bool_parsing",
        "model_type",
        "enum",
        "literal_error",
        "datetime_from_date_parsing",
        "datetime_parsing",
    }:
        message += f" (got {given!r})" if not isinstance(given, dict | list) else ""
    return message


def _allowed_fields(model: type[BaseModel], field_path: list[Any]) -> list[str]:
    """The field names (aliases) accepted at a path inside a model, for 'did you mean'."""
    current: Any = model
    for part in field_path:
        if isinstance(part, int) or not (
            isinstance(current, type) and issubclass(current, BaseModel)
        ):
            continue
        match = next(
            (f for name, f in current.model_fields.items() if (f.alias or name) == part), None
        )
        if match is None:
            return []
        current = _model_in(match.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [str(f.alias or name) for name, f in current.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    """The first pydantic model inside an annotation such as ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _issue_at(
    path: str, node: yaml.Node, loc: tuple[str, ...], message: str, exact: bool = True
) -> Issue:
    target, _, field_path, _ = _locate(node, loc)
    mark = target.start_mark
    return Issue(
        path,
        message,
        line=mark.line + 1,
        column=mark.column + 1,
        field=".".join(str(p) for p in field_path) if exact else loc[-1],
    )


# --- many files: the desired state of a source ---------------------------------------


def load_paths(
    paths: Iterable[str],
    cache: FileCache | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    trust_fingerprints: bool = False,
) -> LoadResult:
    """Read every manifest under ``paths`` and check what needs all files at once.

    Cross-file rules: two documents declaring the same object are an error for both (and
    the stored object is kept); references between objects are checked by
    :func:`check_references`, which the caller runs with what else it knows exists.
    """
    result = LoadResult()
    for root in paths:
        files, issues = discover(root)
        result.issues.extend(issues)
        result.failed_files.update(issue.file for issue in issues)
        for path in files:
            result.files.append(path)
            fingerprint = _fingerprint(path) if cache is not None else None
            file_result = (
                cache.unchanged(path, fingerprint)
                if cache is not None and trust_fingerprints else None
            )
            if file_result is None:
                data, issue = read_bytes(path, max_file_bytes)
                if data is None:
                    assert issue is not None
                    result.issues.append(issue)
                    result.failed_files.add(path)
                    continue
                sha = hashlib.sha256(data).hexdigest()
                file_result = cache.get(path, sha) if cache is not None else None
                if file_result is None:
                    file_result = parse_file(path, data)
                if cache is not None:
                    cache.put(file_result, fingerprint)
            result.objects.extend(file_result.objects)
            result.issues.extend(file_result.issues)
            result.failed_keys.update(file_result.failed_keys)
            if file_result.failed:
                result.failed_files.add(path)
    if cache is not None:
        cache.retain(result.files)
    _drop_duplicates(result)
    return result


def _drop_duplicates(result: LoadResult) -> None:
    by_key: dict[ObjectKey, list[Desired]] = defaultdict(list)
    for obj in result.objects:
        by_key[obj.key].append(obj)
    duplicated = {
        key: objs for key, objs in by_key.items() if len(objs) > 1 or key in result.failed_keys
    }
    if not duplicated:
        return
    for key, objs in duplicated.items():
        places = ", ".join(obj.location for obj in objs)
        if len(objs) > 1:
            message = f"{key} is declared {len(objs)} times ({places}); neither is applied"
        else:
            message = f"{key} is also declared by a document that fails validation"
        result.issues.extend(
            Issue(obj.file, message, line=obj.line, field="metadata.name") for obj in objs
        )
        result.failed_keys.add(key)
    result.objects = [obj for obj in result.objects if obj.key not in duplicated]


def chain_targets(result: LoadResult) -> set[ObjectKey]:
    """Every Job and Chain the loaded chains name (to look up what exists elsewhere)."""
    targets: set[ObjectKey] = set()
    for obj in result.objects:
        if obj.key.kind == "Chain":
            spec = ChainSpec.model_validate(obj.spec)
            for step in [*spec.steps, *([spec.finally_] if spec.finally_ else [])]:
                kind, name = step.target
                targets.add(ObjectKey(kind, obj.key.namespace, name))
    return targets


def check_references(result: LoadResult, elsewhere: Iterable[ObjectKey] = ()) -> None:
    """Chains must name Jobs (and Chains) that exist, without cycles; offenders are dropped.

    ``elsewhere`` is what exists outside these files (other sources, the store), so a
    chain may name a job another source declares.
    """
    known = {obj.key for obj in result.objects} | set(elsewhere) | result.failed_keys
    chains = {obj.key: obj for obj in result.objects if obj.key.kind == "Chain"}
    bad: set[ObjectKey] = set()
    edges: dict[ObjectKey, list[ObjectKey]] = {}
    for key, obj in chains.items():
        spec = ChainSpec.model_validate(obj.spec)
        steps = [*spec.steps, *([spec.finally_] if spec.finally_ else [])]
        edges[key] = []
        for index, step in enumerate(steps):
            kind, name = step.target
            target = ObjectKey(kind, key.namespace, name)
            where = f"spec.steps.{index}" if index < len(spec.steps) else "spec.finally"
            if target not in known:
                result.issues.append(
                    Issue(
                        obj.file,
                        f"{kind} '{name}' does not exist in namespace '{key.namespace}'",
                        line=obj.line,
                        field=f"{where}.{kind.lower()}",
                    )
                )
                bad.add(key)
            if kind == "Chain":
                edges[key].append(target)
    for key in _in_cycles(edges):
        obj = chains[key]
        result.issues.append(
            Issue(
                obj.file,
                "chain steps form a cycle through this chain",
                line=obj.line,
                field="spec.steps",
            )
        )
        bad.add(key)
    if bad:
        result.failed_keys.update(bad)
        result.objects = [obj for obj in result.objects if obj.key not in bad]


def _in_cycles(edges: dict[ObjectKey, list[ObjectKey]]) -> set[ObjectKey]:
    """Nodes that can reach themselves."""
    cyclic: set[ObjectKey] = set()
    for start in edges:
        stack, seen = list(edges[start]), set()
        while stack:
            node = stack.pop()
            if node == start:
                cyclic.add(start)
                break
            if node not in seen:
                seen.add(node)
                stack.extend(edges.get(node, ()))
    return cyclic


# --- request bodies: documents that did not come from a file ---------------------------


FILE_SEPARATOR = re.compile(rb"^--- # file: (.+?)\r?$", re.MULTILINE)
"""How ``oneoff apply`` joins several files into one request: each file after the first
starts after a ``--- # file: PATH`` line (a document separator with a comment)."""


def load_text(origin: str, data: bytes) -> LoadResult:
    """Multi-document YAML (or JSON) sent to the API, read like one manifest file.

    Objects and issues are placed in the files the body joins (``FILE_SEPARATOR``):
    ``manifests/ping.yaml:3``, not a line of the request.
    """
    file_result = parse_file(origin, data, lists=True)
    place = _file_places(origin, data)
    result = LoadResult(
        objects=[replace(obj, file=f, line=n) for obj in file_result.objects
                 for f, n in [place(obj.line)]],
        issues=[_placed(issue, place) for issue in file_result.issues],
        failed_keys=set(file_result.failed_keys), files=[origin],
    )
    if file_result.failed:
        result.failed_files.add(origin)
    _drop_duplicates(result)
    return result


def _file_places(origin: str, data: bytes) -> Callable[[int], tuple[str, int]]:
    """Body line → (file, line in that file), from the separators in the body."""
    starts = [(0, origin)]  # (body line of the file's line 0, file)
    for match in FILE_SEPARATOR.finditer(data):
        line = data.count(b"\n", 0, match.start()) + 1
        starts.append((line, match.group(1).decode("utf-8", errors="replace").strip()))
    firsts = [line for line, _ in starts]

    def place(line: int) -> tuple[str, int]:
        start, file = starts[bisect.bisect_left(firsts, line) - 1]
        return file, line - start

    return place


def _placed(issue: Issue, place: Callable[[int], tuple[str, int]]) -> Issue:
    if issue.line is None:
        return issue
    file, line = place(issue.line)
    return replace(issue, file=file, line=line)


def load_documents(documents: list[Any], origin: str) -> LoadResult:
    """Already-parsed documents (a JSON request body): validated without a YAML node tree.

    This is the fast path of the API (no YAML, no positions); issues name the document by
    its index (``origin[3]``) and the field path. Objects get no file or line: they were
    not declared in a file.
    """
    result = LoadResult(files=[origin])
    for index, document in enumerate(documents):
        where = origin if len(documents) == 1 else f"{origin}[{index}]"
        if not isinstance(document, dict):
            result.issues.append(Issue(where, _NOT_A_MANIFEST))
            continue
        kind = document.get("kind")
        model = KINDS.get(kind) if isinstance(kind, str) else None
        if model is None:
            message = (
                "missing 'kind'" if kind is None else f"unknown kind {kind!r}"
            ) + f"; expected one of {', '.join(KINDS)}"
            result.issues.append(Issue(where, message, field="kind"))
            continue
        if "status" in document:  # the server's, never read from a request
            document = {k: v for k, v in document.items() if k != "status"}
        try:
            obj = model.model_validate(document)
        except ValidationError as exc:
            result.issues.extend(_plain_issues(where, document, model, exc.errors()))
            if (key := _key_of(document)) is not None:
                result.failed_keys.add(key)
            continue
        meta = obj.metadata
        result.objects.append(Desired(
            key=ObjectKey(obj.kind, meta.namespace, meta.name),
            spec=obj.spec.model_dump(mode="json", exclude_unset=True, by_alias=True),
            labels=dict(meta.labels), annotations=dict(meta.annotations), file="", line=0,
        ))
    _drop_duplicates(result)
    return result


def _plain_issues(
    where: str, document: dict[str, Any], model: type[BaseModel], errors: list[ErrorDetails]
) -> list[Issue]:
    issues: list[Issue] = []
    for error in errors:
        field_path, current = [], document
        for part in error["loc"]:  # skip the member names pydantic adds inside unions
            if isinstance(current, dict) and part in current:
                current = current[part]
            elif isinstance(current, list) and isinstance(part, int) and part < len(current):
                current = current[part]
            elif error["type"] not in ("missing", "extra_forbidden") or part != error["loc"][-1]:
                continue
            field_path.append(part)
        message = (
            f"required field '{error['loc'][-1]}' is missing"
            if error["type"] == "missing" else _message(error, model, field_path)
        )
        issue = Issue(where, message, field=".".join(str(p) for p in field_path))
        if message and issue not in issues:
            issues.append(issue)
    return issues
