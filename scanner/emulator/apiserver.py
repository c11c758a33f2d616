"""An emulated Kubernetes API server for tests and `felixscan demo`.

It speaks the apiserver's REST protocol over real HTTP/1.1 (optionally TLS) so that the real
`kubernetes` Python client can be pointed at it through an ordinary kubeconfig. What it gets right,
because the scanner depends on it: object paths and Status error bodies, bearer-token auth,
label/field selectors, `limit`/`continue` paging at a consistent resourceVersion (with 410 Expired
tokens), watches, create/update/patch/delete with resourceVersion preconditions, dry runs, the
status subresource and `metadata.generation`. Faults (errors, delays, garbage bodies, dropped
connections) and an optional RBAC rule set can be injected, and every request is recorded.

Objects are kept as JSON-shaped dicts and never mutated once stored, so readers can serialize them
outside the lock.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import random
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

import yaml

from scanner.emulator.certs import make_ca, make_signed, server_ssl_context

__all__ = [
    "ApiError",
    "Change",
    "Fault",
    "KubeEmulator",
    "LabelRequirement",
    "RecordedRequest",
    "ResourceType",
    "json_patch",
    "merge_patch",
    "parse_label_selector",
    "strategic_merge_patch",
    "write_kubeconfig",
]

JsonDict = dict[str, Any]
ChangeType = Literal["ADDED", "MODIFIED", "DELETED"]

KUBERNETES_VERSION = "v1.33.1"
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand
_WATCH_DEFAULT_TIMEOUT = 1800.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clone(obj: Any) -> Any:
    # a JSON round trip is several times faster than deepcopy and rejects non-JSON values early
    return json.loads(json.dumps(obj))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# --- resource registry ---------------------------------------------------------------------


_COMMON_FIELDS = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One served resource (group/version/plural) and how the apiserver treats it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False
    has_generation: bool = False
    builtin: bool = False
    field_labels: tuple[str, ...] = _COMMON_FIELDS
    singular: str = ""
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return self.version if not self.group else f"{self.group}/{self.version}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def group_resource(self) -> str:
        """The name used in apiserver messages: `pods`, `daemonsets.apps`."""
        return self.plural if not self.group else f"{self.plural}.{self.group}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)


def _builtin(
    group: str,
    plural: str,
    kind: str,
    namespaced: bool,
    *,
    status: bool = False,
    generation: bool = False,
    fields: tuple[str, ...] = (),
    short: tuple[str, ...] = (),
) -> ResourceType:
    return ResourceType(
        group=group,
        version="v1",
        plural=plural,
        kind=kind,
        namespaced=namespaced,
        status_subresource=status,
        has_generation=generation,
        builtin=True,
        field_labels=_COMMON_FIELDS + fields,
        singular=kind.lower(),
        short_names=short,
    )


BUILTIN_RESOURCES: tuple[ResourceType, ...] = (
    _builtin(
        "", "namespaces", "Namespace", False, status=True, fields=("status.phase",), short=("ns",)
    ),
    _builtin(
        "", "nodes", "Node", False, status=True, fields=("spec.unschedulable",), short=("no",)
    ),
    _builtin(
        "",
        "pods",
        "Pod",
        True,
        status=True,
        fields=(
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ),
        short=("po",),
    ),
    _builtin("", "configmaps", "ConfigMap", True, short=("cm",)),
    _builtin("", "secrets", "Secret", True, fields=("type",)),
    _builtin("apps", "daemonsets", "DaemonSet", True, status=True, generation=True, short=("ds",)),
    _builtin(
        "apps", "deployments", "Deployment", True, status=True, generation=True, short=("deploy",)
    ),
    _builtin("apps", "controllerrevisions", "ControllerRevision", True),
    _builtin(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        status=True,
        generation=True,
        short=("crd", "crds"),
    ),
)

_CRD_GROUP = "apiextensions.k8s.io"


# --- errors --------------------------------------------------------------------------------


def status_body(
    code: int,
    reason: str,
    message: str,
    *,
    details: JsonDict | None = None,
    metadata: JsonDict | None = None,
) -> JsonDict:
    """A `Status` object shaped exactly as the apiserver writes it (key order included)."""
    body: JsonDict = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": metadata or {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


class ApiError(Exception):
    """An error the emulator answers with a Status body."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: JsonDict | None = None,
        metadata: JsonDict | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.metadata = metadata
        self.headers = dict(headers or {})

    def body(self) -> JsonDict:
        return status_body(
            self.code, self.reason, self.message, details=self.details, metadata=self.metadata
        )


def _details(rtype: ResourceType, name: str, *, kind: str | None = None) -> JsonDict:
    details: JsonDict = {"name": name}
    if rtype.group:
        details["group"] = rtype.group
    details["kind"] = kind or rtype.plural
    return details


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{rtype.group_resource} "{name}" not found', details=_details(rtype, name)
    )


def _resource_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", details={})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": {why}',
        details=_details(rtype, name),
    )


_NAMESPACE_MISMATCH = (
    "the namespace of the provided object does not match the namespace sent on the request"
)
_MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def _invalid(
    rtype: ResourceType, name: str, field_path: str, message: str, reason: str
) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'{rtype.kind} "{name}" is invalid: {field_path}: {message}',
        details={
            **_details(rtype, name, kind=rtype.kind),
            "causes": [{"reason": reason, "message": message, "field": field_path}],
        },
    )


_FAULT_REASONS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "the server rejected our request for an unknown reason"),
    401: ("Unauthorized", "Unauthorized"),
    404: ("NotFound", "the server could not find the requested resource"),
    405: ("MethodNotAllowed", "the server does not allow this method on the requested resource"),
    409: ("Conflict", "the server reported a conflict"),
    410: ("Expired", "the resource version is too old"),
    413: ("RequestEntityTooLarge", "the request entity is too large"),
    422: ("Invalid", "the server rejected our request due to an error in our request"),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: injected fault"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "Timeout: request did not complete within the allotted timeout"),
}


# --- label and field selectors -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """One term of a label selector; `op` is one of = != in notin exists !exists gt lt."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        try:
            number = int(value or "")
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if self.op == "gt" else number < bound


_SELECTOR_TOKEN = re.compile(r"\s*(?:(!=|==|=|!|\(|\)|,|<|>)|([^\s,()=!<>]+))")


def _tokenize_selector(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _SELECTOR_TOKEN.match(text, pos)
        if match is None:
            raise _bad_request(f"unable to parse requirement: invalid character at {text[pos:]!r}")
        tokens.append(match.group(1) or match.group(2))
        pos = match.end()
    return tokens


def parse_label_selector(text: str) -> tuple[LabelRequirement, ...]:
    """Parse a Kubernetes label selector (equality-, set-based, existence; comma = AND)."""
    tokens = _tokenize_selector(text)
    reqs: list[LabelRequirement] = []
    pos = 0

    def take() -> str | None:
        nonlocal pos
        token = tokens[pos] if pos < len(tokens) else None
        pos += 1
        return token

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def fail(found: str | None, expected: str) -> ApiError:
        return _bad_request(
            f"unable to parse requirement: found '{found or ''}', expected: {expected}"
        )

    while pos < len(tokens):
        word = take()
        if word == "!":
            key = take()
            if key is None or not _is_word(key):
                raise fail(key, "identifier")
            reqs.append(LabelRequirement(key, "!exists"))
        elif word is not None and _is_word(word):
            key = word
            nxt = peek()
            if nxt is None or nxt == ",":
                reqs.append(LabelRequirement(key, "exists"))
            elif nxt in ("=", "==", "!="):
                take()
                value = peek()
                if value is None or value == ",":
                    value = ""
                else:
                    take()
                    if not _is_word(value):
                        raise fail(value, "identifier")
                reqs.append(LabelRequirement(key, "!=" if nxt == "!=" else "=", (value,)))
            elif nxt in ("in", "notin"):
                take()
                if take() != "(":
                    raise fail(tokens[pos - 1] if pos <= len(tokens) else None, "'('")
                values: list[str] = []
                while True:
                    item = take()
                    if item == ")":
                        break
                    if item is None:
                        raise fail(None, "')'")
                    if item == ",":
                        continue
                    if not _is_word(item):
                        raise fail(item, "identifier")
                    values.append(item)
                if not values:
                    raise fail(")", "identifier")
                reqs.append(LabelRequirement(key, nxt, tuple(values)))
            elif nxt in ("<", ">"):
                take()
                value = take()
                if value is None or not value.lstrip("-").isdigit():
                    raise fail(value, "integer")
                reqs.append(LabelRequirement(key, "gt" if nxt == ">" else "lt", (value,)))
            else:
                raise fail(nxt, "=, !=, ==, in, notin")
        else:
            raise fail(word, "identifier or '!'")
        sep = take()
        if sep not in (None, ","):
            raise fail(sep, "','")
    return tuple(reqs)


def _is_word(token: str) -> bool:
    return token not in ("!=", "==", "=", "!", "(", ")", ",", "<", ">")


@dataclass(frozen=True, slots=True)
class _FieldRequirement:
    path: str
    negate: bool
    value: str


def _parse_field_selector(text: str, rtype: ResourceType) -> tuple[_FieldRequirement, ...]:
    reqs: list[_FieldRequirement] = []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        for op in ("!=", "==", "="):
            if op in term:
                path, value = term.split(op, 1)
                break
        else:
            raise _bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        path = path.strip()
        if path not in rtype.field_labels:
            raise _bad_request(f"field label not supported: {path}")
        reqs.append(_FieldRequirement(path, op == "!=", value.strip()))
    return tuple(reqs)


def _field_value(obj: JsonDict, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


@dataclass(frozen=True, slots=True)
class _Predicate:
    labels: tuple[LabelRequirement, ...] = ()
    fields: tuple[_FieldRequirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.labels and not self.fields

    def matches(self, obj: JsonDict) -> bool:
        if self.labels:
            labels = obj.get("metadata", {}).get("labels") or {}
            if not all(req.matches(labels) for req in self.labels):
                return False
        for freq in self.fields:
            if (_field_value(obj, freq.path) == freq.value) == freq.negate:
                return False
        return True


# --- patches -------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value and leaves both inputs untouched."""
    if not isinstance(patch, dict):
        return _clone(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# patchMergeKey of the list fields that use patchStrategy=merge in the core/apps types
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "addresses": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
    "taints": "key",
}
_PRIMITIVE_MERGE_LISTS = frozenset({"finalizers"})


def _merge_key_for(field_name: str, items: Sequence[Any]) -> str | None:
    if field_name == "ports":
        # container ports merge on containerPort, service ports on port
        first = next((i for i in items if isinstance(i, dict)), {})
        return "containerPort" if "containerPort" in first or not first else "port"
    return _MERGE_KEYS.get(field_name)


def strategic_merge_patch(original: JsonDict, patch: JsonDict) -> JsonDict:
    """Kubernetes strategic merge patch for the built-in types.

    Lists with a patchMergeKey (containers/env by name, ...) are merged element by element, in
    place, so untouched elements keep their position and content. Directives handled: `$patch`
    (replace/delete/merge on maps and list elements), `$setElementOrder/<list>`,
    `$deleteFromPrimitiveList/<list>`, `$retainKeys`. A null value deletes the key.
    """
    return _smp_map(original, patch)


def _smp_map(original: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> JsonDict:
    directive = patch.get("$patch")
    if directive == "replace":
        return cast(JsonDict, _strip_directives({k: v for k, v in patch.items() if k != "$patch"}))
    result: JsonDict = dict(original) if isinstance(original, Mapping) else {}
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = list(value or [])
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            drop = list(value or [])
            if isinstance(result.get(name), list):
                result[name] = [v for v in result[name] if v not in drop]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            if value.get("$patch") == "delete":
                result.pop(key, None)
            else:
                current = result.get(key)
                result[key] = _smp_map(current if isinstance(current, dict) else None, value)
        elif isinstance(value, list):
            result[key] = _smp_list(key, result.get(key), value)
        else:
            result[key] = value
    for name, order in orders.items():
        if isinstance(result.get(name), list):
            result[name] = _apply_order(name, result[name], order)
    return result


def _smp_list(name: str, original: Any, patch: list[Any]) -> list[Any]:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [_strip_directives(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    current = list(original) if isinstance(original, list) else []
    if name in _PRIMITIVE_MERGE_LISTS:
        return current + [v for v in patch if v not in current]
    merge_key = _merge_key_for(name, patch)
    if merge_key is None or not all(isinstance(i, dict) for i in patch):
        return [_strip_directives(i) for i in patch]
    for item in patch:
        key_value = item.get(merge_key)
        index = next(
            (
                n
                for n, old in enumerate(current)
                if isinstance(old, dict) and old.get(merge_key) == key_value
            ),
            None,
        )
        if item.get("$patch") == "delete":
            current = [
                old
                for old in current
                if not (isinstance(old, dict) and old.get(merge_key) == key_value)
            ]
        elif index is not None:
            current[index] = _smp_map(current[index], item)
        else:
            current.append(_smp_map(None, item))
    return current


def _apply_order(name: str, items: list[Any], order: list[Any]) -> list[Any]:
    merge_key = _merge_key_for(name, items)
    if merge_key is None:
        ranked = {json.dumps(v, sort_keys=True): n for n, v in enumerate(order)}
        keyed = [(ranked.get(json.dumps(v, sort_keys=True)), v) for v in items]
    else:
        ranked = {
            json.dumps(v.get(merge_key)): n for n, v in enumerate(order) if isinstance(v, dict)
        }
        keyed = [
            (ranked.get(json.dumps(v.get(merge_key))) if isinstance(v, dict) else None, v)
            for v in items
        ]
    ordered = sorted((pair for pair in keyed if pair[0] is not None), key=lambda p: cast(int, p[0]))
    rest = [v for rank, v in keyed if rank is None]
    return [v for _, v in ordered] + rest


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_directives(v)
            for k, v in value.items()
            if not k.startswith("$") and v is not None
        }
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


class JsonPatchError(ValueError):
    """A JSON patch operation could not be applied (the apiserver answers 422)."""


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise JsonPatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, dict):
            if part not in node:
                raise JsonPatchError(f"missing key {part!r}")
            node = node[part]
        elif isinstance(node, list):
            node = node[_index(node, part, allow_end=False)]
        else:
            raise JsonPatchError(f"cannot traverse into a scalar at {part!r}")
    return node


def _index(node: list[Any], part: str, *, allow_end: bool) -> int:
    if part == "-" and allow_end:
        return len(node)
    if not part.isdigit():
        raise JsonPatchError(f"invalid array index {part!r}")
    index = int(part)
    limit = len(node) if allow_end else len(node) - 1
    if index > limit:
        raise JsonPatchError(f"array index {index} out of bounds")
    return index


def _jp_add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, allow_end=True), value)
    else:
        raise JsonPatchError("cannot add to a scalar")
    return doc


def _jp_remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise JsonPatchError("cannot remove the document root")
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise JsonPatchError(f"Unable to remove nonexistent key: {last}: missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, allow_end=False))
    raise JsonPatchError("cannot remove from a scalar")


def json_patch(document: Any, operations: Sequence[Mapping[str, Any]]) -> Any:
    """RFC 6902 JSON patch; returns a new document and leaves the input untouched."""
    doc = _clone(document)
    for op in operations:
        kind = op.get("op")
        path = op.get("path")
        if not isinstance(path, str):
            raise JsonPatchError(f"operation {kind!r} has no path")
        parts = _pointer(path)
        if kind == "add":
            doc = _jp_add(doc, parts, _clone(op.get("value")))
        elif kind == "remove":
            _jp_remove(doc, parts)
        elif kind == "replace":
            _walk(doc, parts)
            if parts:
                _jp_remove(doc, parts)
            doc = _jp_add(doc, parts, _clone(op.get("value")))
        elif kind in ("move", "copy"):
            source = op.get("from")
            if not isinstance(source, str):
                raise JsonPatchError(f"operation {kind!r} has no from")
            from_parts = _pointer(source)
            value = (
                _jp_remove(doc, from_parts) if kind == "move" else _clone(_walk(doc, from_parts))
            )
            doc = _jp_add(doc, parts, value)
        elif kind == "test":
            if _walk(doc, parts) != op.get("value"):
                raise JsonPatchError(f"testing value {path} failed")
        else:
            raise JsonPatchError(f"Unexpected kind: {kind}")
    return doc


# --- store ---------------------------------------------------------------------------------


class _Collection:
    """MVCC history of one resource: sorted keys, each with its (resourceVersion, object) list."""

    __slots__ = ("keys", "versions")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.versions: dict[str, list[tuple[int, JsonDict | None]]] = {}

    def current(self, key: str) -> JsonDict | None:
        history = self.versions.get(key)
        return history[-1][1] if history else None

    def at(self, key: str, rv: int) -> JsonDict | None:
        history = self.versions[key]
        if history[-1][0] <= rv:
            return history[-1][1]
        for version, obj in reversed(history):
            if version <= rv:
                return obj
        return None

    def put(self, key: str, rv: int, obj: JsonDict | None) -> None:
        history = self.versions.get(key)
        if history is None:
            history = self.versions[key] = []
            if not self.keys or key > self.keys[-1]:
                self.keys.append(key)
            else:
                bisect.insort(self.keys, key)
        history.append((rv, obj))

    def compact(self, rv: int) -> None:
        """Forget versions older than `rv` that a read at `rv` or later can no longer see."""
        dead: list[str] = []
        for key, history in self.versions.items():
            keep_from = 0
            for n, (version, _) in enumerate(history):
                if version <= rv:
                    keep_from = n
            if keep_from:
                del history[:keep_from]
            if len(history) == 1 and history[0][1] is None and history[0][0] <= rv:
                dead.append(key)
        for key in dead:
            del self.versions[key]
        if dead:
            gone = set(dead)
            self.keys = [k for k in self.keys if k not in gone]


def _object_key(rtype: ResourceType, namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if rtype.namespaced else name


@dataclass(frozen=True, slots=True)
class Change:
    """A committed write, as handed to `on_change` callbacks and watchers."""

    type: ChangeType
    resource: ResourceType
    object: JsonDict
    old: JsonDict | None
    resource_version: int


# --- faults and records --------------------------------------------------------------------


@dataclass(eq=False)
class Fault:
    """An injected fault; `hits` counts the requests it answered."""

    pattern: re.Pattern[str]
    method: str
    status: int | None
    delay: float
    body: bytes | None
    times: int | None
    retry_after: int | None
    drop: bool
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str, target: str) -> bool:
        if self.exhausted:
            return False
        if self.method not in ("*", "ANY") and self.method != method:
            return False
        return bool(self.pattern.search(path) or self.pattern.search(target))


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the apiserver's authorizer would see it, plus the answer's status."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str  # RBAC verb: get list watch create update patch delete deletecollection
    api_group: str | None  # None for non-resource URLs (discovery, /version)
    api_version: str | None
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    dry_run: bool
    status: int  # 0 when no answer was sent (dropped connection, server stopped)
    content_type: str | None = None
    fault: bool = False

    @property
    def resource_request(self) -> bool:
        return self.api_group is not None


@dataclass(frozen=True, slots=True)
class _RequestInfo:
    is_resource: bool
    verb: str
    prefix: str = ""
    group: str = ""
    version: str = ""
    namespace: str | None = None
    resource: str | None = None
    name: str | None = None
    subresource: str | None = None
    parts: tuple[str, ...] = ()


_METHOD_VERBS = {
    "GET": "get",
    "HEAD": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


def _request_info(method: str, path: str, query: Mapping[str, str]) -> _RequestInfo:
    """Mirror of k8s.io/apiserver's RequestInfoFactory for the paths the emulator serves."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return _RequestInfo(False, method.lower(), parts=tuple(parts))
    if parts[0] == "api":
        if len(parts) < 2:
            return _RequestInfo(False, method.lower(), parts=tuple(parts))
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) < 3:
            return _RequestInfo(False, method.lower(), parts=tuple(parts))
        group, version, rest = parts[1], parts[2], parts[3:]
    if not rest:
        return _RequestInfo(False, method.lower(), parts=tuple(parts))
    verb = _METHOD_VERBS.get(method, method.lower())
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if name is None:
        if verb == "get":
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
        elif verb == "delete":
            verb = "deletecollection"
    return _RequestInfo(
        True,
        verb,
        prefix=parts[0],
        group=group,
        version=version,
        namespace=namespace,
        resource=resource,
        name=name,
        subresource=subresource,
        parts=tuple(parts),
    )


@dataclass(frozen=True, slots=True)
class _RbacRule:
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str]
    namespace: str | None  # set for rules of a namespaced Role

    def allows(self, info: _RequestInfo) -> bool:
        if self.namespace is not None and info.namespace != self.namespace:
            return False
        if "*" not in self.groups and info.group not in self.groups:
            return False
        if "*" not in self.verbs and info.verb not in self.verbs:
            return False
        wanted = info.resource or ""
        if info.subresource:
            wanted = f"{wanted}/{info.subresource}"
        candidates = {"*", wanted}
        if info.subresource:
            candidates.add(f"*/{info.subresource}")
        if not candidates & self.resources:
            return False
        return not self.names or info.name in self.names


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Generator[bytes, None, None] | None = None
    drop: bool = False
    fault: bool = False


def _json_response(status: int, obj: Any) -> _Response:
    return _Response(status, _dumps(obj))


def _error_response(err: ApiError) -> _Response:
    return _Response(err.code, _dumps(err.body()), headers=dict(err.headers))


def _not_found_page() -> _Response:
    # what the apiserver's NotFoundHandler answers for paths no API group serves
    return _Response(404, b"404 page not found\n", content_type="text/plain; charset=utf-8")


# --- HTTP plumbing -------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], emulator: KubeEmulator, context: ssl.SSLContext | None
    ) -> None:
        self.emulator = emulator
        self.ssl_context = context
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # headers and body leave in separate writes; without NODELAY, Nagle plus the client's
        # delayed ACK would add ~40 ms to every answer
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = request
        if self.ssl_context is not None:
            # the handshake runs here, in the connection's own thread, so a client that connects
            # and never speaks TLS cannot stall the accept loop
            request.settimeout(10)
            try:
                conn = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                self.emulator._track(None, add=False, failed_handshake=True)
                return
            conn.settimeout(None)
        self.emulator._track(conn, add=True)
        try:
            _Handler(conn, client_address, self)
        finally:
            self.emulator._track(conn, add=False)
            if conn is not request:
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients going away mid-answer are normal here; handler bugs are recorded in _dispatch
        return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self.server.emulator._dispatch(self, "GET")

    def do_POST(self) -> None:
        self.server.emulator._dispatch(self, "POST")

    def do_PUT(self) -> None:
        self.server.emulator._dispatch(self, "PUT")

    def do_PATCH(self) -> None:
        self.server.emulator._dispatch(self, "PATCH")

    def do_DELETE(self) -> None:
        self.server.emulator._dispatch(self, "DELETE")

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send(self, response: _Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.stream is None:
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in response.stream:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            response.stream.close()


# --- the emulator --------------------------------------------------------------------------


class KubeEmulator:
    """An in-process Kubernetes API server on 127.0.0.1 for the real `kubernetes` client.

    ::

        with KubeEmulator(tls=True) as emu:
            emu.register_calico_crds()
            emu.load_yaml(Path("tests/fixtures/calico/v3.32.1-calico-daemonset-calico-node.yaml"))
            kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")

    The store is usable before `start()`; `url` and the kubeconfig need a started server. The
    server can be stopped and started again (same port, same objects) to emulate an outage.
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        token: str | None = "emulator-token",  # noqa: S107 - a well-known test credential
        host: str = "127.0.0.1",
        port: int = 0,
        user: str = "system:serviceaccount:felixscan:felixscan",
        continue_expiry_writes: int | None = None,
        kubernetes_version: str = KUBERNETES_VERSION,
        seed: int | None = None,
        cert_not_after: datetime | None = None,
    ) -> None:
        """`continue_expiry_writes`: a continue token (or watch resourceVersion) older than that
        many writes answers 410 Expired, like after an etcd compaction; None = only after
        `expire_continue_tokens()`. `user` is the identity named in RBAC 403 messages.
        `cert_not_after` in the past serves an expired certificate (from the kubeconfig's CA)."""
        self.tls = tls
        self.token = token
        self.host = host
        self.user = user
        self.kubernetes_version = kubernetes_version
        self.continue_expiry_writes = continue_expiry_writes
        self._port = port
        self._cond = threading.Condition(threading.RLock())
        self._local = threading.local()  # changes committed by this thread, not yet announced
        self._rv = 1
        self._compacted_rv = 0
        self._types: dict[tuple[str, str], ResourceType] = {}
        self._kinds: dict[tuple[str, str], ResourceType] = {}
        self._collections: dict[tuple[str, str], _Collection] = {}
        self._events: list[Change] = []
        self._event_rvs: list[int] = []
        self._faults: list[Fault] = []
        self._requests: list[RecordedRequest] = []
        self._callbacks: list[Callable[[Change], None]] = []
        self._rbac: tuple[_RbacRule, ...] | None = None
        self._connections: set[Any] = set()
        self._accepted = 0
        self._failed_handshakes = 0
        self._random = random.Random(seed)
        self.errors: list[BaseException] = []  # handler bugs answered with 500 InternalError
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.ca_pem: bytes | None = None
        self._ssl_context: ssl.SSLContext | None = None
        if tls:
            ca_cert, ca_key = make_ca("felixscan-emulator-ca")
            cert, key = make_signed(
                "kube-apiserver",
                ca_cert_pem=ca_cert,
                ca_key_pem=ca_key,
                hosts=["127.0.0.1", "localhost", "::1", "kubernetes", "kubernetes.default.svc"],
                not_after=cert_not_after,
            )
            self.ca_pem = ca_cert
            self._ssl_context = server_ssl_context(cert, key)
        for rtype in BUILTIN_RESOURCES:
            self._register(rtype)
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> KubeEmulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.host, self._port), self, self._ssl_context)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"kube-emulator-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; returns promptly even while handlers sleep in injected delays."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the emulator has not been started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def resource_version(self) -> int:
        """The store's current (global) resourceVersion."""
        with self._cond:
            return self._rv

    @property
    def connections_accepted(self) -> int:
        """How many TCP connections were served (keep-alive reuse keeps this low)."""
        with self._cond:
            return self._accepted

    @property
    def failed_handshakes(self) -> int:
        """How many TLS handshakes failed (e.g. the client did not trust the certificate)."""
        with self._cond:
            return self._failed_handshakes

    def _track(self, conn: Any, *, add: bool, failed_handshake: bool = False) -> None:
        with self._cond:
            if failed_handshake:
                self._failed_handshakes += 1
            elif add:
                self._accepted += 1
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # --- registry ----------------------------------------------------------------------------

    def _register(self, rtype: ResourceType) -> None:
        existing = self._types.get(rtype.key)
        if existing is not None and existing.version != rtype.version:
            raise ValueError(
                f"{rtype.group_resource} is already served as {existing.api_version}; "
                "one version per resource"
            )
        self._types[rtype.key] = rtype
        self._kinds[(rtype.api_version, rtype.kind)] = rtype
        self._collections.setdefault(rtype.key, _Collection())

    def register_resource(
        self,
        group: str,
        version: str,
        plural: str,
        kind: str,
        namespaced: bool,
        *,
        status_subresource: bool = False,
        singular: str | None = None,
        short_names: Sequence[str] = (),
        crd_object: bool = True,
    ) -> ResourceType:
        """Serve a custom resource, as if its CRD had been applied.

        With `crd_object` the matching CustomResourceDefinition object is stored as well, so
        clients that check `apiextensions.k8s.io` see it. Storing a CRD object (for example by
        `load_yaml` of a CRD manifest) registers its resource the same way.
        """
        rtype = ResourceType(
            group=group,
            version=version,
            plural=plural,
            kind=kind,
            namespaced=namespaced,
            status_subresource=status_subresource,
            has_generation=True,
            builtin=False,
            singular=singular or kind.lower(),
            short_names=tuple(short_names),
        )
        with self._cond:
            self._register(rtype)
            crd_name = f"{plural}.{group}"
            crds = self._types[(_CRD_GROUP, "customresourcedefinitions")]
            if crd_object and self._current(crds, None, crd_name) is None:
                self._write_new(crds, _crd_object(rtype))
        self._fire_pending()
        return rtype

    def unregister_resource(self, group: str, plural: str) -> None:
        """Stop serving a custom resource and drop its objects (like deleting the CRD)."""
        with self._cond:
            rtype = self._types.get((group, plural))
            if rtype is None:
                return
            if rtype.builtin:
                raise ValueError(f"{rtype.group_resource} is built in")
            crds = self._types[(_CRD_GROUP, "customresourcedefinitions")]
            crd = self._current(crds, None, f"{plural}.{group}")
            if crd is not None:
                self._delete(crds, crd)
            self._unregister(rtype)
        self._fire_pending()

    def _unregister(self, rtype: ResourceType) -> None:
        self._types.pop(rtype.key, None)
        self._kinds.pop((rtype.api_version, rtype.kind), None)
        self._collections.pop(rtype.key, None)

    def register_calico_crds(self, api_version: str = "crd.projectcalico.org/v1") -> ResourceType:
        """Serve felixconfigurations (cluster-scoped) in `api_version`: `crd.projectcalico.org/v1`
        (every release) or `projectcalico.org/v3` (Calico's native v3 CRDs, v3.32+)."""
        group, version = api_version.split("/")
        return self.register_resource(
            group,
            version,
            "felixconfigurations",
            "FelixConfiguration",
            namespaced=False,
            singular="felixconfiguration",
        )

    def register_operator_crds(self) -> ResourceType:
        """Serve operator.tigera.io/v1 installations (cluster-scoped, with a status subresource)."""
        return self.register_resource(
            "operator.tigera.io",
            "v1",
            "installations",
            "Installation",
            namespaced=False,
            status_subresource=True,
            singular="installation",
        )

    def resource_for(self, api_version: str, kind: str) -> ResourceType:
        """The registered resource serving `kind` in `api_version`; KeyError when none does."""
        with self._cond:
            rtype = self._kinds.get((api_version, kind))
        if rtype is None:
            raise KeyError(f"no resource serves {kind} in {api_version}; register it first")
        return rtype

    @property
    def resources(self) -> tuple[ResourceType, ...]:
        with self._cond:
            return tuple(self._types.values())

    # --- direct store access (for tests and fleet builders; no auth, no faults) --------------

    def add(self, obj: Mapping[str, Any], *, copy: bool = True) -> JsonDict:
        """Create an object as an admin would (namespace auto-created); returns the stored copy.

        Fills metadata.uid, creationTimestamp and (for resources with generations) generation=1
        when missing; resourceVersion is always assigned by the store. `copy=False` hands the
        dict over to the store, which then owns it (faster for large fleets). ValueError when
        the object exists already.
        """
        new = cast(JsonDict, _clone(obj)) if copy else cast(JsonDict, obj)
        with self._cond:
            stored = self._add_locked(new)
        self._fire_pending()
        return cast(JsonDict, _clone(stored)) if copy else stored

    def _add_locked(self, new: JsonDict) -> JsonDict:
        rtype = self.resource_for(str(new.get("apiVersion")), str(new.get("kind")))
        meta = new.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError(f"{rtype.kind} without metadata.name")
        if rtype.namespaced:
            meta.setdefault("namespace", "default")
            namespaces = self._types[("", "namespaces")]
            if self._current(namespaces, None, meta["namespace"]) is None:
                namespace = {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": meta["namespace"]},
                }
                self._add_locked(namespace)
        else:
            meta.pop("namespace", None)
        if self._current(rtype, meta.get("namespace"), meta["name"]) is not None:
            raise ValueError(f'{rtype.group_resource} "{meta["name"]}" already exists')
        _prepare_new(rtype, new)
        return self._write_new(rtype, new)

    def add_all(self, objs: Iterable[Mapping[str, Any]]) -> list[JsonDict]:
        return [self.add(obj) for obj in objs]

    def get_object(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JsonDict | None:
        """A copy of the stored object, or None (`namespace` defaults to "default")."""
        rtype = self.resource_for(api_version, kind)
        with self._cond:
            obj = self._current(rtype, (namespace or "default") if rtype.namespaced else None, name)
        return cast(JsonDict, _clone(obj)) if obj is not None else None

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None = None, *, copy: bool = True
    ) -> list[JsonDict]:
        """The stored objects of a kind (all namespaces when `namespace` is None).

        With `copy=False` the store's own dicts are returned: cheap, and strictly read-only.
        """
        rtype = self.resource_for(api_version, kind)
        prefix = f"{namespace}/" if rtype.namespaced and namespace is not None else ""
        with self._cond:
            coll = self._collections[rtype.key]
            start = bisect.bisect_left(coll.keys, prefix)
            found: list[JsonDict] = []
            for key in coll.keys[start:]:
                if not key.startswith(prefix):
                    break
                obj = coll.current(key)
                if obj is not None:
                    found.append(obj)
        return cast(list[JsonDict], _clone(found)) if copy else found

    def replace(self, obj: Mapping[str, Any]) -> JsonDict:
        """Overwrite an object as a controller would (status included, no preconditions).

        uid and creationTimestamp are kept; generation is bumped when anything but metadata and
        status changed. KeyError when the object does not exist.
        """
        new = cast(JsonDict, _clone(obj))
        rtype = self.resource_for(str(new.get("apiVersion")), str(new.get("kind")))
        meta = new.setdefault("metadata", {})
        namespace = (meta.get("namespace") or "default") if rtype.namespaced else None
        with self._cond:
            old = self._current(rtype, namespace, meta.get("name", ""))
            if old is None:
                raise KeyError(f'{rtype.group_resource} "{meta.get("name")}" not found')
            stored = self._update(rtype, old, new, subresource=None, preserve_status=False)
        self._fire_pending()
        return cast(JsonDict, _clone(stored))

    def patch_object(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Any,
        *,
        namespace: str | None = None,
        patch_type: Literal["merge", "strategic", "json"] = "merge",
    ) -> JsonDict:
        """Patch an object in the store (as a controller; status may be patched too)."""
        rtype = self.resource_for(api_version, kind)
        ns = (namespace or "default") if rtype.namespaced else None
        with self._cond:
            old = self._current(rtype, ns, name)
            if old is None:
                raise KeyError(f'{rtype.group_resource} "{name}" not found')
            new = _apply_patch(patch_type, old, patch)
            stored = self._update(rtype, old, new, subresource=None, preserve_status=False)
        self._fire_pending()
        return cast(JsonDict, _clone(stored))

    def delete_object(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> bool:
        """Delete an object; False when it did not exist."""
        rtype = self.resource_for(api_version, kind)
        ns = (namespace or "default") if rtype.namespaced else None
        with self._cond:
            old = self._current(rtype, ns, name)
            if old is None:
                return False
            self._delete(rtype, old)
        self._fire_pending()
        return True

    def load_yaml(self, source: Path | str) -> list[JsonDict]:
        """Add every object of a (multi-document) YAML file or text; `kind: List` is unpacked.

        A str without a newline is a file name (comment headers and `---` separators are fine).
        """
        if isinstance(source, Path) or "\n" not in source:
            text = Path(source).read_text(encoding="utf-8")
        else:
            text = source
        added: list[JsonDict] = []
        for doc in yaml.load_all(text, Loader=_YamlLoader):  # a SafeLoader subclass
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ValueError(f"a YAML document is not an object: {doc!r:.80}")
            items = doc.get("items") if str(doc.get("kind", "")).endswith("List") else None
            for obj in items if isinstance(items, list) else [doc]:
                added.append(self.add(obj))
        return added

    # --- continue tokens, watches, hooks -----------------------------------------------------

    def expire_continue_tokens(self) -> None:
        """Compact history: every continue token and watch resourceVersion issued so far expires."""
        with self._cond:
            self._rv += 1
            self._compact(self._rv)

    def _compact(self, rv: int) -> None:
        self._compacted_rv = max(self._compacted_rv, rv)
        for coll in self._collections.values():
            coll.compact(rv)
        cut = bisect.bisect_left(self._event_rvs, rv)
        if cut:
            del self._events[:cut]
            del self._event_rvs[:cut]

    def _oldest_readable_rv(self) -> int:
        floor = self._compacted_rv
        if self.continue_expiry_writes is not None:
            floor = max(floor, self._rv - self.continue_expiry_writes)
        return floor

    def on_change(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call `callback` after every committed write (in the writer's thread, outside the
        store lock, so it may write itself). Returns a function that unsubscribes it."""
        with self._cond:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    # --- faults, RBAC and records ------------------------------------------------------------

    def inject(
        self,
        path_regex: str,
        *,
        status: int | None = None,
        delay: float = 0.0,
        body: bytes | None = None,
        times: int | None = None,
        retry_after: int | None = None,
        method: str = "GET",
        drop: bool = False,
    ) -> Fault:
        """Answer matching requests with a fault instead of (or before) the normal answer.

        `path_regex` is searched in the path and in path?query. `status` answers a Status body
        shaped as the apiserver does (403 Forbidden names the user and verb); `body` replaces the
        answer's bytes (status 200 unless `status` is set); `delay` sleeps first (then answers
        normally unless status/body/drop is set); `drop` closes the connection without answering;
        `retry_after` adds the Retry-After header; `times` limits how many requests it answers;
        `method` "*" matches any method. The first matching fault wins.
        """
        fault = Fault(
            pattern=re.compile(path_regex),
            method=method.upper(),
            status=status,
            delay=delay,
            body=body,
            times=times,
            retry_after=retry_after,
            drop=drop,
        )
        with self._cond:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()

    def set_rbac(self, rules: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None) -> None:
        """Authorize resource requests against RBAC rules; None switches RBAC off (allow all).

        Accepts PolicyRule dicts, a Role/ClusterRole object, or a list of those (a Role's rules
        apply in its namespace only). Denied requests get the apiserver's 403 Forbidden.
        Discovery and other non-resource URLs stay allowed, as for any authenticated user.
        """
        if rules is None:
            with self._cond:
                self._rbac = None
            return
        sources: list[tuple[Mapping[str, Any], str | None]] = []
        for item in [rules] if isinstance(rules, Mapping) else list(rules):
            kind = item.get("kind")
            if kind in ("Role", "ClusterRole"):
                ns = item.get("metadata", {}).get("namespace") if kind == "Role" else None
                sources.extend((rule, ns) for rule in item.get("rules") or [])
            else:
                sources.append((item, None))
        compiled = tuple(
            _RbacRule(
                groups=frozenset(rule.get("apiGroups") or []),
                resources=frozenset(rule.get("resources") or []),
                verbs=frozenset(rule.get("verbs") or []),
                names=frozenset(rule.get("resourceNames") or []),
                namespace=ns,
            )
            for rule, ns in sources
            if rule.get("resources")
        )
        with self._cond:
            self._rbac = compiled

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        with self._cond:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    # --- kubeconfig --------------------------------------------------------------------------

    def kubeconfig_entries(
        self,
        *,
        context: str = "emulated",
        cluster_name: str | None = None,
        token: str | None = None,
        user_extra: Mapping[str, Any] | None = None,
        namespace: str | None = None,
    ) -> tuple[JsonDict, JsonDict, JsonDict]:
        """The (cluster, user, context) entries for this emulator, named after `context`.

        `token=None` uses the emulator's token; `token=""` writes a user without a token.
        """
        cluster_name = cluster_name or context
        user_name = f"{context}-user"
        cluster: JsonDict = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        user: JsonDict = {}
        bearer = self.token if token is None else token
        if bearer:
            user["token"] = bearer
        user.update(user_extra or {})
        ctx: JsonDict = {"cluster": cluster_name, "user": user_name}
        if namespace:
            ctx["namespace"] = namespace
        return (
            {"name": cluster_name, "cluster": cluster},
            {"name": user_name, "user": user},
            {"name": context, "context": ctx},
        )

    def write_kubeconfig(
        self,
        path: Path | str,
        *,
        context: str = "emulated",
        cluster_name: str | None = None,
        token: str | None = None,
        user_extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a kubeconfig with this emulator as its only (and current) context."""
        target = Path(path)
        _write_config(target, {"clusters": [], "users": [], "contexts": []})
        return self.add_to_kubeconfig(
            target,
            context=context,
            cluster_name=cluster_name,
            token=token,
            user_extra=user_extra,
            current=True,
        )

    def add_to_kubeconfig(
        self,
        path: Path | str,
        *,
        context: str = "emulated",
        cluster_name: str | None = None,
        token: str | None = None,
        user_extra: Mapping[str, Any] | None = None,
        current: bool = False,
    ) -> Path:
        """Add (or replace) this emulator's context in a kubeconfig, creating the file if needed.

        The first context added becomes current-context; `current=True` forces it.
        """
        target = Path(path)
        config = _read_config(target)
        cluster, user, ctx = self.kubeconfig_entries(
            context=context, cluster_name=cluster_name, token=token, user_extra=user_extra
        )
        for section, entry in (("clusters", cluster), ("users", user), ("contexts", ctx)):
            entries = [e for e in config.get(section) or [] if e.get("name") != entry["name"]]
            entries.append(entry)
            config[section] = entries
        if current or not config.get("current-context"):
            config["current-context"] = context
        _write_config(target, config)
        return target

    # --- store internals (call with self._cond held) -----------------------------------------

    def _current(self, rtype: ResourceType, namespace: str | None, name: str) -> JsonDict | None:
        coll = self._collections.get(rtype.key)
        if coll is None:
            return None
        return coll.current(_object_key(rtype, namespace, name))

    def _write_new(self, rtype: ResourceType, obj: JsonDict) -> JsonDict:
        meta = obj["metadata"]
        key = _object_key(rtype, meta.get("namespace"), meta["name"])
        self._write(rtype, key, obj, None)
        if rtype.group == _CRD_GROUP:
            self._register_from_crd(obj)
        return obj

    def _write(
        self,
        rtype: ResourceType,
        key: str,
        obj: JsonDict | None,
        old: JsonDict | None,
    ) -> None:
        self._rv += 1
        rv = self._rv
        coll = self._collections[rtype.key]
        if obj is not None:
            obj["metadata"]["resourceVersion"] = str(rv)
        coll.put(key, rv, obj)
        if obj is None:
            assert old is not None
            deleted = dict(old)
            deleted["metadata"] = {**old["metadata"], "resourceVersion": str(rv)}
            change = Change("DELETED", rtype, deleted, old, rv)
        else:
            change = Change("ADDED" if old is None else "MODIFIED", rtype, obj, old, rv)
        self._events.append(change)
        self._event_rvs.append(rv)
        self._pending.append(change)
        if (
            self.continue_expiry_writes is not None
            and rv % max(self.continue_expiry_writes, 64) == 0
        ):
            self._compact(rv - self.continue_expiry_writes)
        self._cond.notify_all()

    @property
    def _pending(self) -> list[Change]:
        pending: list[Change] | None = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        return pending

    def _fire_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        changes = list(pending)
        pending.clear()
        with self._cond:
            callbacks = list(self._callbacks)
        for change in changes:
            for callback in callbacks:
                callback(change)

    def _register_from_crd(self, crd: JsonDict) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        versions = spec.get("versions") or []
        chosen = next((v for v in versions if v.get("storage")), versions[0] if versions else None)
        if not chosen or not spec.get("group") or not names.get("plural"):
            return
        key = (spec["group"], names["plural"])
        if key in self._types:
            return
        self._register(
            ResourceType(
                group=spec["group"],
                version=chosen["name"],
                plural=names["plural"],
                kind=names.get("kind") or names["plural"],
                namespaced=spec.get("scope") == "Namespaced",
                status_subresource="status" in (chosen.get("subresources") or {}),
                has_generation=True,
                singular=names.get("singular") or "",
                short_names=tuple(names.get("shortNames") or ()),
            )
        )

    def _update(
        self,
        rtype: ResourceType,
        old: JsonDict,
        new: JsonDict,
        *,
        subresource: str | None,
        preserve_status: bool,
        dry_run: bool = False,
    ) -> JsonDict:
        """Finish an update (system fields, status rules, generation) and store it.

        A no-op update stores nothing and returns the old object, as etcd3's GuaranteedUpdate.
        """
        new["apiVersion"] = rtype.api_version
        new["kind"] = rtype.kind
        if subresource == "status":
            status = new.get("status")
            new = dict(old)
            new["metadata"] = dict(old["metadata"])
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        elif preserve_status and rtype.status_subresource:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"]
        for fixed in ("uid", "creationTimestamp", "name", "namespace", "generateName"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        if rtype.kind == "Secret":
            _fold_string_data(new)
        if rtype.has_generation:
            generation = int(old_meta.get("generation") or 1)
            if _spec_changed(rtype, old, new):
                generation += 1
            meta["generation"] = generation
        else:
            meta.pop("generation", None)
        meta["resourceVersion"] = old_meta.get("resourceVersion")
        if new == old:
            return old
        if dry_run:
            return new
        key = _object_key(rtype, meta.get("namespace"), meta["name"])
        self._write(rtype, key, new, old)
        return new

    def _delete(self, rtype: ResourceType, old: JsonDict) -> None:
        meta = old["metadata"]
        self._write(rtype, _object_key(rtype, meta.get("namespace"), meta["name"]), None, old)
        if rtype.key == ("", "namespaces"):
            # namespace deletion ends, after finalization, with its contents gone
            for other in list(self._types.values()):
                if not other.namespaced:
                    continue
                coll = self._collections[other.key]
                prefix = f"{meta['name']}/"
                for key in [k for k in coll.keys if k.startswith(prefix)]:
                    obj = coll.current(key)
                    if obj is not None:
                        self._write(other, key, None, obj)
        if rtype.group == _CRD_GROUP:
            spec = old.get("spec") or {}
            crd_key = (spec.get("group", ""), (spec.get("names") or {}).get("plural", ""))
            victim = self._types.get(crd_key)
            if victim is not None and not victim.builtin:
                self._unregister(victim)

    # --- HTTP dispatch -----------------------------------------------------------------------

    def _dispatch(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        path = split.path
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"  # the apiserver's mux serves /version/ as /version
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        info = _request_info(method, path, query)
        try:
            body = handler.read_body()
        except (OSError, ValueError):
            handler.close_connection = True
            return
        response = self._answer(
            handler=handler,
            method=method,
            path=path,
            target=handler.path,
            query=query,
            info=info,
            body=body,
        )
        self._record(
            method=method, path=path, query=query, info=info, handler=handler, response=response
        )
        if response.drop:
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            handler.send(response)
        except (OSError, ssl.SSLError):
            handler.close_connection = True

    def _record(
        self,
        *,
        method: str,
        path: str,
        query: Mapping[str, str],
        info: _RequestInfo,
        handler: _Handler,
        response: _Response,
    ) -> None:
        record = RecordedRequest(
            method=method,
            path=path,
            query=dict(query),
            verb=info.verb,
            api_group=info.group if info.is_resource else None,
            api_version=info.version if info.is_resource else None,
            resource=info.resource,
            subresource=info.subresource,
            namespace=info.namespace,
            name=info.name,
            dry_run=query.get("dryRun") == "All",
            status=0 if response.drop else response.status,
            content_type=handler.headers.get("Content-Type"),
            fault=response.fault,
        )
        with self._cond:
            self._requests.append(record)

    def _answer(
        self,
        *,
        handler: _Handler,
        method: str,
        path: str,
        target: str,
        query: Mapping[str, str],
        info: _RequestInfo,
        body: bytes,
    ) -> _Response:
        fault = self._take_fault(method, path, target)
        if fault is not None:
            if fault.delay and self._stopping.wait(fault.delay):
                return _Response(0, drop=True, fault=True)
            if fault.drop:
                return _Response(0, drop=True, fault=True)
            if fault.status is not None or fault.body is not None:
                return self._fault_response(fault, info)
        if path in ("/healthz", "/livez", "/readyz", "/version"):
            return self._non_resource(path)
        if self.token is not None and not _bearer_matches(
            handler.headers.get("Authorization"), self.token
        ):
            return _error_response(ApiError(401, "Unauthorized", "Unauthorized"))
        try:
            if not info.is_resource:
                return self._non_resource(path)
            self._authorize(info)
            response = self._resource(
                method, info, query, body, handler.headers.get("Content-Type")
            )
        except ApiError as err:
            return _error_response(err)
        except Exception as exc:  # answer like the apiserver's panic recovery, and keep it
            with self._cond:
                self.errors.append(exc)
            return _error_response(
                ApiError(
                    500,
                    "InternalError",
                    f"Internal error occurred: {exc!r}",
                    details={"causes": [{"message": repr(exc)}]},
                )
            )
        finally:
            try:
                self._fire_pending()
            except Exception as exc:  # a broken on_change callback must not eat the answer
                with self._cond:
                    self.errors.append(exc)
        return response

    def _take_fault(self, method: str, path: str, target: str) -> Fault | None:
        with self._cond:
            for fault in self._faults:
                if fault.matches(method, path, target):
                    fault.hits += 1
                    return fault
        return None

    def _fault_response(self, fault: Fault, info: _RequestInfo) -> _Response:
        status = fault.status or 200
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if fault.body is not None:
            return _Response(status, fault.body, headers=headers, fault=True)
        if status == 403:
            err = self._forbidden(info)
        else:
            reason, message = _FAULT_REASONS.get(status, ("", f"injected status {status}"))
            details: JsonDict | None = None
            if status == 429 and fault.retry_after is not None:
                details = {
                    "causes": [
                        {
                            "reason": "UnexpectedServerResponse",
                            "message": "Too many requests, please try again later.",
                        }
                    ],
                    "retryAfterSeconds": fault.retry_after,
                }
            err = ApiError(status, reason, message, details=details)
        err.headers.update(headers)
        response = _error_response(err)
        response.fault = True
        return response

    def _forbidden(self, info: _RequestInfo) -> ApiError:
        if not info.is_resource:
            path = "/" + "/".join(info.parts)
            return ApiError(
                403,
                "Forbidden",
                f'forbidden: User "{self.user}" cannot {info.verb} path "{path}"',
                details={},
            )
        resource = info.resource or ""
        full = f"{resource}/{info.subresource}" if info.subresource else resource
        shown = resource if not info.group else f"{resource}.{info.group}"
        subject = f'{shown} "{info.name}"' if info.name else shown
        scope = f'in the namespace "{info.namespace}"' if info.namespace else "at the cluster scope"
        message = (
            f'{subject} is forbidden: User "{self.user}" cannot {info.verb} resource "{full}" '
            f'in API group "{info.group}" {scope}'
        )
        details: JsonDict = {}
        if info.name:
            details["name"] = info.name
        if info.group:
            details["group"] = info.group
        details["kind"] = resource
        return ApiError(403, "Forbidden", message, details=details)

    def _authorize(self, info: _RequestInfo) -> None:
        with self._cond:
            rules = self._rbac
        if rules is None or any(rule.allows(info) for rule in rules):
            return
        raise self._forbidden(info)

    # --- non-resource endpoints and discovery --------------------------------------------------

    def _non_resource(self, path: str) -> _Response:
        parts = [p for p in path.strip("/").split("/") if p]
        if path in ("/healthz", "/livez", "/readyz"):
            return _Response(200, b"ok", content_type="text/plain; charset=utf-8")
        if path == "/version":
            major, minor = self.kubernetes_version.lstrip("v").split(".")[:2]
            return _json_response(
                200,
                {
                    "major": major,
                    "minor": minor,
                    "gitVersion": self.kubernetes_version,
                    "gitCommit": "0" * 40,
                    "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.24.0",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                },
            )
        with self._cond:
            types = list(self._types.values())
        if parts == ["api"]:
            return _json_response(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                    ],
                },
            )
        if parts == ["api", "v1"]:
            return _json_response(200, _resource_list("v1", [t for t in types if t.group == ""]))
        if parts == ["apis"]:
            groups: dict[str, list[str]] = {}
            for t in types:
                if t.group and t.version not in groups.setdefault(t.group, []):
                    groups[t.group].append(t.version)
            return _json_response(
                200,
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [_api_group(g, vs) for g, vs in sorted(groups.items())],
                },
            )
        if len(parts) == 2 and parts[0] == "apis":
            versions = sorted({t.version for t in types if t.group == parts[1]})
            if versions:
                return _json_response(
                    200, {"kind": "APIGroup", "apiVersion": "v1", **_api_group(parts[1], versions)}
                )
        if len(parts) == 3 and parts[0] == "apis":
            served = [t for t in types if t.group == parts[1] and t.version == parts[2]]
            if served:
                return _json_response(200, _resource_list(f"{parts[1]}/{parts[2]}", served))
        return _not_found_page()

    # --- resource requests ---------------------------------------------------------------------

    def _resource(
        self,
        method: str,
        info: _RequestInfo,
        query: Mapping[str, str],
        body: bytes,
        content_type: str | None,
    ) -> _Response:
        with self._cond:
            rtype = self._types.get((info.group, info.resource or ""))
            group_versions = {(t.group, t.version) for t in self._types.values()}
        if (info.group, info.version) not in group_versions:
            return _not_found_page()
        if rtype is None or rtype.version != info.version:
            raise _resource_not_found()
        if info.namespace is not None and not rtype.namespaced and rtype.plural != "namespaces":
            raise _resource_not_found()
        if info.subresource is not None and not (
            info.subresource == "status" and rtype.status_subresource
        ):
            raise _resource_not_found()
        dry_run = _dry_run(query)
        namespace = info.namespace if rtype.namespaced else None
        if info.name is None:
            if method == "GET":
                if info.verb == "watch":
                    return self._watch(rtype, namespace, query)
                return _json_response(200, self._list(rtype, namespace, query))
            if method == "POST":
                if rtype.namespaced and namespace is None:
                    raise _resource_not_found()
                return _json_response(201, self._create(rtype, namespace, _decode(body), dry_run))
            if method == "DELETE":
                return _json_response(
                    200, self._delete_collection(rtype, namespace, query, dry_run)
                )
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                details={},
            )
        if rtype.namespaced and namespace is None:
            raise _resource_not_found()
        name = info.name
        if method == "GET":
            with self._cond:
                obj = self._current(rtype, namespace, name)
            if obj is None:
                raise _not_found(rtype, name)
            return _json_response(200, obj)
        if method == "PUT":
            return _json_response(
                200,
                self._replace(
                    rtype=rtype,
                    namespace=namespace,
                    name=name,
                    body=_decode(body),
                    subresource=info.subresource,
                    dry_run=dry_run,
                ),
            )
        if method == "PATCH":
            return _json_response(
                200,
                self._patch(
                    rtype=rtype,
                    namespace=namespace,
                    name=name,
                    body=body,
                    content_type=content_type,
                    subresource=info.subresource,
                    dry_run=dry_run,
                ),
            )
        if method == "DELETE":
            return _json_response(200, self._delete_one(rtype, namespace, name, body, dry_run))
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            details={},
        )

    def _list(
        self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]
    ) -> JsonDict:
        pred = _Predicate(
            parse_label_selector(query.get("labelSelector") or ""),
            _parse_field_selector(query.get("fieldSelector") or "", rtype),
        )
        try:
            limit = int(query.get("limit") or 0)
        except ValueError as exc:
            raise _bad_request(f"limit: invalid value {query.get('limit')!r}") from exc
        prefix = f"{namespace}/" if namespace is not None else ""
        token = query.get("continue") or ""
        with self._cond:
            coll = self._collections[rtype.key]
            if token:
                rv, start = _decode_continue(token)
                if rv <= 0:
                    rv = self._rv  # an "inconsistent" token continues at the current revision
                elif rv < self._oldest_readable_rv():
                    raise _expired_continue(start)
                start = prefix + start
            else:
                rv, start = self._rv, prefix
            keys = coll.keys
            index = bisect.bisect_left(keys, start)
            items: list[JsonDict] = []
            last_key = ""
            more = False
            remaining = 0
            for key in keys[index:]:
                if prefix and not key.startswith(prefix):
                    break
                obj = coll.at(key, rv)
                if obj is None or not pred.matches(obj):
                    continue
                if limit and len(items) >= limit:
                    more = True
                    if not pred.empty:
                        break
                    remaining += 1
                    continue
                items.append(obj)
                last_key = key
        metadata: JsonDict = {"resourceVersion": str(rv)}
        if more:
            metadata["continue"] = _encode_continue(rv, last_key[len(prefix) :] + "\x00")
            if pred.empty:
                metadata["remainingItemCount"] = remaining
        if rtype.builtin:
            # the apiserver drops kind/apiVersion from the items of built-in lists
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        return {
            "kind": rtype.list_kind,
            "apiVersion": rtype.api_version,
            "metadata": metadata,
            "items": items,
        }

    def _create(
        self, rtype: ResourceType, namespace: str | None, body: Any, dry_run: bool
    ) -> JsonDict:
        obj = _expect_object(body, rtype)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if rtype.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise _bad_request(_NAMESPACE_MISMATCH)
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        with self._cond:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise _invalid(
                        rtype,
                        "",
                        "metadata.name",
                        "name or generateName is required",
                        "FieldValueRequired",
                    )
                meta["name"] = meta["generateName"] + "".join(
                    self._random.choice(_GENERATE_ALPHABET) for _ in range(5)
                )
            name = meta["name"]
            if rtype.namespaced:
                namespaces = self._types[("", "namespaces")]
                if self._current(namespaces, None, str(namespace)) is None:
                    raise _not_found(namespaces, str(namespace))
            if self._current(rtype, namespace, name) is not None:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rtype.group_resource} "{name}" already exists',
                    details=_details(rtype, name),
                )
            for system in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
            ):
                meta.pop(system, None)
            _reset_status_on_create(rtype, obj)
            _prepare_new(rtype, obj)
            if dry_run:
                meta.pop("resourceVersion", None)
                return obj
            self._write_new(rtype, obj)
        return obj

    def _replace(
        self,
        *,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        subresource: str | None,
        dry_run: bool,
    ) -> JsonDict:
        new = _expect_object(body, rtype)
        meta = new.setdefault("metadata", {})
        _check_identity(meta, name, namespace if rtype.namespaced else None)
        with self._cond:
            old = self._current(rtype, namespace, name)
            if old is None:
                raise _not_found(rtype, name)
            wanted = meta.get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise _conflict(rtype, name, _MODIFIED)
            return self._update(
                rtype, old, new, subresource=subresource, preserve_status=True, dry_run=dry_run
            )

    def _patch(
        self,
        *,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: bytes,
        content_type: str | None,
        subresource: str | None,
        dry_run: bool,
    ) -> JsonDict:
        media = (content_type or "").split(";")[0].strip().lower()
        kinds = {
            "application/json-patch+json": "json",
            "application/merge-patch+json": "merge",
            "application/strategic-merge-patch+json": "strategic",
        }
        patch_type = kinds.get(media)
        if patch_type is None or (patch_type == "strategic" and not rtype.builtin):
            accepted = ["application/json-patch+json", "application/merge-patch+json"]
            if rtype.builtin:
                accepted.append("application/strategic-merge-patch+json")
            accepted.append("application/apply-patch+yaml")
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(accepted)}",
                details={},
            )
        patch = _decode(body)
        with self._cond:
            old = self._current(rtype, namespace, name)
            if old is None:
                raise _not_found(rtype, name)
            new = _apply_patch(cast(Literal["merge", "strategic", "json"], patch_type), old, patch)
            meta = new.get("metadata")
            if not isinstance(meta, dict):
                raise _bad_request("metadata must be an object")
            _check_identity(meta, name, namespace if rtype.namespaced else None)
            # a resourceVersion left in (or put in) the patched object is an update precondition
            wanted = meta.get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise _conflict(rtype, name, _MODIFIED)
            # A uid in the patch is a precondition too, checked where kube-apiserver checks
            # it: after the resourceVersion, by update validation (rest.BeforeUpdate: uid is
            # immutable), so a mismatch is 422 Invalid, not the 409 that PUT and DELETE
            # preconditions give. Controllers rely on this (controller_ref_manager.go).
            uid = meta.get("uid")
            if uid and uid != old["metadata"].get("uid"):
                raise _invalid(
                    rtype,
                    name,
                    "metadata.uid",
                    f'Invalid value: "{uid}": field is immutable',
                    "FieldValueInvalid",
                )
            return self._update(
                rtype, old, new, subresource=subresource, preserve_status=True, dry_run=dry_run
            )

    def _delete_one(
        self, rtype: ResourceType, namespace: str | None, name: str, body: bytes, dry_run: bool
    ) -> JsonDict:
        options = _decode(body) if body.strip() else {}
        preconditions = (options.get("preconditions") or {}) if isinstance(options, dict) else {}
        with self._cond:
            old = self._current(rtype, namespace, name)
            if old is None:
                raise _not_found(rtype, name)
            meta = old["metadata"]
            uid = preconditions.get("uid")
            if uid and uid != meta.get("uid"):
                raise _conflict(
                    rtype,
                    name,
                    f"Precondition failed: UID in precondition: {uid}, "
                    f"UID in object meta: {meta.get('uid')}",
                )
            rv = preconditions.get("resourceVersion")
            if rv and rv != meta.get("resourceVersion"):
                raise _conflict(
                    rtype,
                    name,
                    f"Precondition failed: ResourceVersion in precondition: {rv}, "
                    f"ResourceVersion in object meta: {meta.get('resourceVersion')}",
                )
            if not dry_run:
                self._delete(rtype, old)
        if rtype.kind == "Pod":
            return old
        details = _details(rtype, name)
        details["uid"] = meta.get("uid")
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    def _delete_collection(
        self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str], dry_run: bool
    ) -> JsonDict:
        listing = self._list(
            rtype,
            namespace,
            {k: v for k, v in query.items() if k in ("labelSelector", "fieldSelector")},
        )
        with self._cond:
            for item in listing["items"]:
                meta = item["metadata"]
                old = self._current(rtype, meta.get("namespace"), meta["name"])
                if old is not None and not dry_run:
                    self._delete(rtype, old)
        return listing

    def _watch(
        self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]
    ) -> _Response:
        pred = _Predicate(
            parse_label_selector(query.get("labelSelector") or ""),
            _parse_field_selector(query.get("fieldSelector") or "", rtype),
        )
        try:
            timeout = float(query.get("timeoutSeconds") or _WATCH_DEFAULT_TIMEOUT)
        except ValueError as exc:
            raise _bad_request("timeoutSeconds must be a number") from exc
        requested = query.get("resourceVersion") or ""
        initial: list[JsonDict] = []
        with self._cond:
            if requested in ("", "0"):
                since = self._rv
                coll = self._collections[rtype.key]
                prefix = f"{namespace}/" if namespace is not None else ""
                for key in coll.keys:
                    obj = coll.current(key)
                    if obj is not None and key.startswith(prefix) and pred.matches(obj):
                        initial.append(obj)
                expired = False
            else:
                try:
                    since = int(requested)
                except ValueError as exc:
                    raise _bad_request(f"invalid resource version: {requested}") from exc
                expired = since < self._oldest_readable_rv()
        return _Response(
            200,
            stream=self._watch_stream(
                rtype=rtype,
                namespace=namespace,
                pred=pred,
                since=since,
                initial=initial,
                expired=expired,
                timeout=timeout,
            ),
        )

    def _watch_stream(
        self,
        *,
        rtype: ResourceType,
        namespace: str | None,
        pred: _Predicate,
        since: int,
        initial: list[JsonDict],
        expired: bool,
        timeout: float,
    ) -> Generator[bytes, None, None]:
        if expired:
            status = status_body(
                410, "Expired", f"too old resource version: {since} ({self._oldest_readable_rv()})"
            )
            yield _dumps({"type": "ERROR", "object": status}) + b"\n"
            return
        for obj in initial:
            yield _dumps({"type": "ADDED", "object": obj}) + b"\n"
        deadline = time.monotonic() + timeout
        last = since
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self._cond:
                start = bisect.bisect_right(self._event_rvs, last)
                if start >= len(self._events):
                    self._cond.wait(min(remaining, 0.5))
                    start = bisect.bisect_right(self._event_rvs, last)
                batch = self._events[start:]
            for change in batch:
                last = change.resource_version
                event = _watch_event(change, rtype, namespace, pred)
                if event is not None:
                    yield _dumps(event) + b"\n"


# --- helpers -------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings, as the apiserver's YAML decoding does."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise _bad_request(f"couldn't get version/kind; json parse error: {exc}") from exc


def _dry_run(query: Mapping[str, str]) -> bool:
    value = query.get("dryRun")
    if value is None or value == "":
        return False
    if value != "All":
        raise _bad_request(f'Invalid dryRun value: "{value}": supported values: "All"')
    return True


def _expect_object(body: Any, rtype: ResourceType) -> JsonDict:
    if not isinstance(body, dict):
        raise _bad_request("the body of the request must be an object")
    kind = body.get("kind")
    api_version = body.get("apiVersion")
    if api_version and api_version != rtype.api_version:
        raise _bad_request(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({rtype.api_version})"
        )
    if kind and kind != rtype.kind:
        raise _bad_request(
            f"the kind in the data ({kind}) does not match the expected kind ({rtype.kind})"
        )
    body["apiVersion"] = rtype.api_version
    body["kind"] = rtype.kind
    return body


def _check_identity(meta: JsonDict, name: str, namespace: str | None) -> None:
    if meta.get("name") and meta["name"] != name:
        raise _bad_request(
            f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
        )
    if namespace is not None and meta.get("namespace") and meta["namespace"] != namespace:
        raise _bad_request(_NAMESPACE_MISMATCH)


def _prepare_new(rtype: ResourceType, obj: JsonDict) -> None:
    obj["apiVersion"] = rtype.api_version
    obj["kind"] = rtype.kind
    meta = obj["metadata"]
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("creationTimestamp", _now())
    if rtype.has_generation:
        meta.setdefault("generation", 1)
    if rtype.key == ("apps", "daemonsets") and not obj.get("status"):
        obj["status"] = _empty_daemonset_status()
    if rtype.key == (_CRD_GROUP, "customresourcedefinitions") and not obj.get("status"):
        obj["status"] = _crd_status(obj.get("spec") or {})
    if rtype.key == ("", "namespaces"):
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        obj.setdefault("status", {"phase": "Active"})
    if rtype.kind == "Secret":
        _fold_string_data(obj)


def _empty_daemonset_status() -> JsonDict:
    # the zero DaemonSetStatus as served: these four have no omitempty (clients require them)
    return {
        "currentNumberScheduled": 0,
        "numberMisscheduled": 0,
        "desiredNumberScheduled": 0,
        "numberReady": 0,
    }


def _reset_status_on_create(rtype: ResourceType, obj: JsonDict) -> None:
    if rtype.kind == "DaemonSet":
        obj["status"] = _empty_daemonset_status()
    elif rtype.kind == "Pod":
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif rtype.kind == "Deployment" or (rtype.status_subresource and not rtype.builtin):
        obj.pop("status", None)


def _fold_string_data(obj: JsonDict) -> None:
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict):
        data = dict(obj.get("data") or {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        obj["data"] = data


def _spec_changed(rtype: ResourceType, old: JsonDict, new: JsonDict) -> bool:
    ignored = {"metadata", "apiVersion", "kind"}
    if rtype.status_subresource:
        ignored.add("status")
    keys = (set(old) | set(new)) - ignored
    return any(old.get(k) != new.get(k) for k in keys)


def _apply_patch(
    patch_type: Literal["merge", "strategic", "json"], old: JsonDict, patch: Any
) -> JsonDict:
    try:
        if patch_type == "json":
            if not isinstance(patch, list):
                raise _bad_request(
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            result = json_patch(old, patch)
        elif not isinstance(patch, dict):
            raise _bad_request("the patch must be a JSON object")
        elif patch_type == "merge":
            result = merge_patch(old, patch)
        else:
            result = strategic_merge_patch(old, patch)
    except JsonPatchError as exc:
        raise ApiError(422, "Invalid", str(exc), details={}) from exc
    if not isinstance(result, dict):
        raise _bad_request("the patched object is not an object")
    # later changes must never reach the stored `old` through shared sub-objects
    return cast(JsonDict, _clone(result))


def _encode_continue(rv: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
        rv = int(data["rv"])
        start = str(data["start"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _bad_request(f"continue key is not valid: {exc}") from exc
    if start.startswith("/") or ".." in start.split("/"):
        raise _bad_request("continue key is not valid: key must be relative")
    return rv, start


def _expired_continue(start: str) -> ApiError:
    return ApiError(
        410,
        "Expired",
        "The provided continue parameter is too old to display a consistent list result. You can "
        "start a new list without the continue parameter, or use the continue token in this "
        "response to retrieve the remainder of the results. Continuing with the provided token "
        "results in an inconsistent list - objects that were created, modified, or deleted between "
        "the time the first chunk was returned and now may show up in the list.",
        metadata={"continue": _encode_continue(-1, start)},
    )


def _watch_event(
    change: Change, rtype: ResourceType, namespace: str | None, pred: _Predicate
) -> JsonDict | None:
    if change.resource.key != rtype.key:
        return None
    if namespace is not None and change.object["metadata"].get("namespace") != namespace:
        return None
    now = pred.matches(change.object) if change.type != "DELETED" else False
    before = change.old is not None and pred.matches(change.old)
    if change.type == "DELETED":
        return {"type": "DELETED", "object": change.object} if before else None
    if now:
        return {"type": "ADDED" if not before else change.type, "object": change.object}
    if before:
        # leaving the selector looks like a deletion to a filtered watcher
        return {"type": "DELETED", "object": change.object}
    return None


def _crd_object(rtype: ResourceType) -> JsonDict:
    names: JsonDict = {
        "plural": rtype.plural,
        "singular": rtype.singular,
        "kind": rtype.kind,
        "listKind": rtype.list_kind,
    }
    if rtype.short_names:
        names["shortNames"] = list(rtype.short_names)
    version: JsonDict = {
        "name": rtype.version,
        "served": True,
        "storage": True,
        "schema": {
            "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        },
    }
    if rtype.status_subresource:
        version["subresources"] = {"status": {}}
    scope = "Namespaced" if rtype.namespaced else "Cluster"
    spec: JsonDict = {
        "group": rtype.group,
        "names": names,
        "scope": scope,
        "versions": [version],
        "conversion": {"strategy": "None"},
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{rtype.plural}.{rtype.group}",
            "uid": str(uuid.uuid4()),
            "creationTimestamp": _now(),
            "generation": 1,
        },
        "spec": spec,
        "status": _crd_status(spec),
    }


def _crd_status(spec: Mapping[str, Any]) -> JsonDict:
    """The status the apiextensions controllers give an accepted, established CRD."""
    stored = [v.get("name") for v in spec.get("versions") or [] if v.get("storage")]
    return {
        "acceptedNames": dict(spec.get("names") or {}),
        "storedVersions": stored,
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "reason": "NoConflicts",
                "message": "no conflicts found",
                "lastTransitionTime": _now(),
            },
            {
                "type": "Established",
                "status": "True",
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
                "lastTransitionTime": _now(),
            },
        ],
    }


_ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def _resource_list(group_version: str, types: Sequence[ResourceType]) -> JsonDict:
    resources: list[JsonDict] = []
    for t in sorted(types, key=lambda t: t.plural):
        entry: JsonDict = {
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": list(_ALL_VERBS),
        }
        if t.short_names:
            entry["shortNames"] = list(t.short_names)
        resources.append(entry)
        if t.status_subresource:
            resources.append(
                {
                    "name": f"{t.plural}/status",
                    "singularName": "",
                    "namespaced": t.namespaced,
                    "kind": t.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def _api_group(group: str, versions: Sequence[str]) -> JsonDict:
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def _read_config(path: Path) -> JsonDict:
    if not path.exists():
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [],
            "users": [],
            "contexts": [],
        }
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not a kubeconfig")
    return loaded


def _write_config(path: Path, config: JsonDict) -> None:
    full: JsonDict = {"apiVersion": "v1", "kind": "Config", "preferences": {}}
    full.update(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(full, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)


def write_kubeconfig(
    path: Path | str,
    emulators: Mapping[str, KubeEmulator] | Sequence[tuple[str, KubeEmulator]],
    *,
    current_context: str | None = None,
    token: str | None = None,
) -> Path:
    """Write ONE kubeconfig with one context per emulator (context name -> emulator).

    Cluster and user entries are named after the context. The current-context is
    `current_context` or the first one.
    """
    pairs = list(emulators.items()) if isinstance(emulators, Mapping) else list(emulators)
    if not pairs:
        raise ValueError("no emulators given")
    config: JsonDict = {"clusters": [], "users": [], "contexts": []}
    for context, emu in pairs:
        cluster, user, ctx = emu.kubeconfig_entries(context=context, token=token)
        config["clusters"].append(cluster)
        config["users"].append(user)
        config["contexts"].append(ctx)
    config["current-context"] = current_context or pairs[0][0]
    target = Path(path)
    _write_config(target, config)
    return target


def _bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`; the scheme is case-insensitive, as in the apiserver."""
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and value.strip() == token
