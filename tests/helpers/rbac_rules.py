"""deploy/ as data: overlays rendered by `kubectl kustomize`, and the RBAC they grant.

`render(overlay)` runs the real kubectl (`$KUBECTL`, default `kubectl` on PATH; Debian's
kubernetes-client 1.20 carries the oldest kustomize the manifests are written for).
`grants(objects, account)` expands the Roles and ClusterRoles bound to one ServiceAccount into
atomic permissions (one verb on one resource, name and namespace), which tests match against
the requests the emulated API server recorded, and hand to `KubeEmulator.set_rbac` through
`as_rbac_rules` so that anything else is refused with 403.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from scanner.emulator import RecordedRequest
from tests.helpers.paths import ROOT

DEPLOY = ROOT / "deploy"
OVERLAYS = tuple(sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml")))
# Overlays that only add permissions to objects another overlay creates: rendered together
# with that one whenever references are resolved or grants computed.
PREREQUISITES = {
    "remediation": ("agent",),
    "remediation-operator": ("agent-operator",),
    "valuefrom-access": ("agent",),
    "node-check-access": ("agent",),
}
AGENT = ("felixscan", "felixscan-agent")
REMEDIATOR = ("felixscan", "felixscan-remediate")
# The valueFrom targets that overlays/valuefrom-access names as placeholders.
PLACEHOLDER_CONFIGMAP = "example-felix-settings"
PLACEHOLDER_SECRET = "example-felix-secret"

Obj = dict[str, Any]


def kubectl() -> str:
    name = os.environ.get("KUBECTL", "kubectl")
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: the deploy/ tests render the overlays with `kubectl "
                    "kustomize` (apt-get install kubernetes-client, or set KUBECTL)")
    return path


@functools.cache
def _render(overlay: str) -> tuple[Obj, ...]:
    proc = subprocess.run([kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/overlays/{overlay} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(overlay: str, *, with_prerequisites: bool = False) -> list[Obj]:
    """The overlay's objects (fresh copies: callers may edit them as a user edits files)."""
    return render_together([*PREREQUISITES.get(overlay, ()), overlay] if with_prerequisites
                           else [overlay])


def render_together(overlays: Iterable[str]) -> list[Obj]:
    """The objects of several overlays applied to one cluster."""
    seen: dict[tuple[str, str, str], Obj] = {}
    for name in overlays:
        for obj in _render(name):
            seen[key(obj)] = obj  # the namespace comes with several overlays; keep one
    return copy.deepcopy(list(seen.values()))


def key(obj: Obj) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj["kind"], meta.get("namespace") or "", meta["name"]


def find(objects: Iterable[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)]


def site_valuefrom(objects: list[Obj], *, namespace: str, configmaps: Sequence[str],
                   secrets: Sequence[str]) -> list[Obj]:
    """overlays/valuefrom-access as a user edits it: real names, and the calico namespace."""
    names = {"configmaps": list(configmaps), "secrets": list(secrets)}
    for obj in objects:
        if obj["kind"] in ("Role", "RoleBinding") and obj["metadata"]["name"] == \
                "felixscan-valuefrom":
            obj["metadata"]["namespace"] = namespace
            for rule in obj.get("rules") or []:
                rule["resourceNames"] = names[rule["resources"][0]]
    return objects


# --- permissions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Permission:
    """One verb on one resource (and name) in one namespace; None means any."""

    verb: str
    group: str
    resource: str
    name: str | None
    namespace: str | None  # None: granted cluster-wide by a ClusterRoleBinding
    source: str  # the role and binding it comes from, for messages

    def allows(self, req: RecordedRequest) -> bool:
        resource = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
        return (self.verb in (req.verb, "*") and self.group in (req.api_group, "*")
                and self.resource in (resource, "*")
                and (self.name is None or self.name == req.name)
                and (self.namespace is None or self.namespace == req.namespace))

    def __str__(self) -> str:
        what = f"{self.resource}.{self.group}" if self.group else self.resource
        name = f"/{self.name}" if self.name else ""
        where = f" in {self.namespace}" if self.namespace else " cluster-wide"
        return f"{self.verb} {what}{name}{where} ({self.source})"


def grants(objects: Iterable[Obj], account: tuple[str, str]) -> list[Permission]:
    """Every permission the ServiceAccount `account` (namespace, name) holds from `objects`."""
    objects = list(objects)
    roles = {key(o): o for o in objects if o["kind"] in ("Role", "ClusterRole")}
    out: list[Permission] = []
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = {(s.get("namespace"), s["name"]) for s in binding.get("subjects") or []
                    if s["kind"] == "ServiceAccount"}
        if account not in subjects:
            continue
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace") \
            if binding["kind"] == "RoleBinding" else None
        role_namespace = (namespace or "") if ref["kind"] == "Role" else ""
        role = roles.get((ref["kind"], role_namespace, ref["name"]))
        assert role is not None, f"{key(binding)} refers to a missing {ref['kind']} {ref['name']}"
        source = f"{ref['kind']} {ref['name']} via {binding['kind']} " + \
            (f"{namespace}/" if namespace else "") + binding["metadata"]["name"]
        for rule in role.get("rules") or []:
            for verb in rule["verbs"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for name in rule.get("resourceNames") or [None]:
                            out.append(Permission(verb, group, resource, name, namespace,
                                                  source))
    return out


def as_rbac_rules(permissions: Iterable[Permission]) -> list[Obj]:
    """The permissions as Roles/ClusterRoles for `KubeEmulator.set_rbac`."""
    by_namespace: dict[str | None, list[Obj]] = {}
    for p in permissions:
        rule: Obj = {"apiGroups": [p.group], "resources": [p.resource], "verbs": [p.verb]}
        if p.name is not None:
            rule["resourceNames"] = [p.name]
        by_namespace.setdefault(p.namespace, []).append(rule)
    return [{"kind": "ClusterRole" if ns is None else "Role",
             "metadata": {"name": "from-deploy", **({"namespace": ns} if ns else {})},
             "rules": rules} for ns, rules in by_namespace.items()]


def resource_requests(requests: Iterable[RecordedRequest]) -> list[RecordedRequest]:
    """The requests RBAC decides on (discovery and /version are open to every user)."""
    return [r for r in requests if r.resource_request]


def describe(req: RecordedRequest) -> str:
    what = f"{req.resource}.{req.api_group}" if req.api_group else str(req.resource)
    where = f" in {req.namespace}" if req.namespace else ""
    return f"{req.verb} {what}{'/' + req.name if req.name else ''}{where} -> {req.status}"
