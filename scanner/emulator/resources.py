"""Resource types the emulated apiserver serves, and the rules it applies to their objects.

Built-ins, CRDs, and the per-type strategies: defaults on create, status and generation on update.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

JsonDict = dict[str, Any]

CRD_GROUP = "apiextensions.k8s.io"
NAMESPACES_KEY = ("", "namespaces")
CRDS_KEY = (CRD_GROUP, "customresourcedefinitions")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clone(obj: Any) -> Any:
    # a JSON round trip is several times faster than deepcopy and rejects non-JSON values early
    return json.loads(json.dumps(obj))


def dumps(obj: Any) -> bytes:
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
        CRD_GROUP,
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        status=True,
        generation=True,
        short=("crd", "crds"),
    ),
)


def object_key(rtype: ResourceType, namespace: str | None, name: str) -> str:
    """The store key: `namespace/name` for namespaced resources, `name` otherwise."""
    return f"{namespace}/{name}" if rtype.namespaced else name


# --- custom resource definitions -----------------------------------------------------------


def crd_object(rtype: ResourceType) -> JsonDict:
    """The CustomResourceDefinition that serves `rtype`, as stored after it was accepted."""
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
            "creationTimestamp": now(),
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
                "lastTransitionTime": now(),
            },
            {
                "type": "Established",
                "status": "True",
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
                "lastTransitionTime": now(),
            },
        ],
    }


def resource_from_crd(crd: JsonDict) -> ResourceType | None:
    """The resource a stored CRD object serves (its storage version); None when incomplete."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    versions = spec.get("versions") or []
    chosen = next((v for v in versions if v.get("storage")), versions[0] if versions else None)
    if not chosen or not spec.get("group") or not names.get("plural"):
        return None
    return ResourceType(
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


# --- per-type strategies -------------------------------------------------------------------


def prepare_new(rtype: ResourceType, obj: JsonDict) -> None:
    """Fill what the apiserver sets on create (uid, timestamps, generation, type defaults)."""
    obj["apiVersion"] = rtype.api_version
    obj["kind"] = rtype.kind
    meta = obj["metadata"]
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("creationTimestamp", now())
    if rtype.has_generation:
        meta.setdefault("generation", 1)
    if rtype.key == ("apps", "daemonsets") and not obj.get("status"):
        obj["status"] = _empty_daemonset_status()
    if rtype.key == CRDS_KEY and not obj.get("status"):
        obj["status"] = _crd_status(obj.get("spec") or {})
    if rtype.key == NAMESPACES_KEY:
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


def reset_status_on_create(rtype: ResourceType, obj: JsonDict) -> None:
    """Replace a client-sent status with what the type's create strategy starts from."""
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


def prepare_update(
    rtype: ResourceType,
    old: JsonDict,
    new: JsonDict,
    *,
    subresource: str | None,
    preserve_status: bool,
) -> JsonDict:
    """The object an update of `old` to `new` stores: system fields kept, status rules, generation.

    `subresource="status"` takes only the status from `new`; `preserve_status` keeps the old
    status of resources with a status subresource (the main resource cannot change it).
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
    return new


# --- manifests -----------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings, as the apiserver's YAML decoding does."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def manifest_objects(source: Path | str) -> Iterator[JsonDict]:
    """The objects of a (multi-document) YAML file or text; `kind: List` is unpacked.

    A str without a newline is a file name (comment headers and `---` separators are fine).
    """
    if isinstance(source, Path) or "\n" not in source:
        text = Path(source).read_text(encoding="utf-8")
    else:
        text = source
    for doc in yaml.load_all(text, Loader=_YamlLoader):  # a SafeLoader subclass
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"a YAML document is not an object: {doc!r:.80}")
        items = doc.get("items") if str(doc.get("kind", "")).endswith("List") else None
        yield from items if isinstance(items, list) else [doc]
