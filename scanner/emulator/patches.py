"""Patch formats the emulated apiserver accepts: JSON merge, strategic merge and JSON patch.

Pure algorithms, plus the PATCH media type check (415) and patch application errors (422/400).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

from scanner.emulator.errors import ApiError, bad_request
from scanner.emulator.resources import JsonDict, ResourceType, clone

PatchType = Literal["merge", "strategic", "json"]

_MEDIA_TYPES: dict[str, PatchType] = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
}


def patch_type_for(content_type: str | None, rtype: ResourceType) -> PatchType:
    """The patch format of a PATCH's Content-Type; 415 for others (strategic: built-ins only)."""
    media = (content_type or "").split(";")[0].strip().lower()
    patch_type = _MEDIA_TYPES.get(media)
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
    return patch_type


def apply_patch(patch_type: PatchType, old: JsonDict, patch: Any) -> JsonDict:
    """`old` with the decoded `patch` applied, as a new object that shares nothing with `old`."""
    try:
        if patch_type == "json":
            if not isinstance(patch, list):
                raise bad_request(
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            result = json_patch(old, patch)
        elif not isinstance(patch, dict):
            raise bad_request("the patch must be a JSON object")
        elif patch_type == "merge":
            result = merge_patch(old, patch)
        else:
            result = strategic_merge_patch(old, patch)
    except JsonPatchError as exc:
        raise ApiError(422, "Invalid", str(exc), details={}) from exc
    if not isinstance(result, dict):
        raise bad_request("the patched object is not an object")
    # later changes must never reach the stored `old` through shared sub-objects
    return cast(JsonDict, clone(result))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value and leaves both inputs untouched."""
    if not isinstance(patch, dict):
        return clone(patch)
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
    doc = clone(document)
    for op in operations:
        kind = op.get("op")
        path = op.get("path")
        if not isinstance(path, str):
            raise JsonPatchError(f"operation {kind!r} has no path")
        parts = _pointer(path)
        if kind == "add":
            doc = _jp_add(doc, parts, clone(op.get("value")))
        elif kind == "remove":
            _jp_remove(doc, parts)
        elif kind == "replace":
            _walk(doc, parts)
            if parts:
                _jp_remove(doc, parts)
            doc = _jp_add(doc, parts, clone(op.get("value")))
        elif kind in ("move", "copy"):
            source = op.get("from")
            if not isinstance(source, str):
                raise JsonPatchError(f"operation {kind!r} has no from")
            from_parts = _pointer(source)
            value = _jp_remove(doc, from_parts) if kind == "move" else clone(_walk(doc, from_parts))
            doc = _jp_add(doc, parts, value)
        elif kind == "test":
            if _walk(doc, parts) != op.get("value"):
                raise JsonPatchError(f"testing value {path} failed")
        else:
            raise JsonPatchError(f"Unexpected kind: {kind}")
    return doc
