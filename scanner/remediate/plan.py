"""Planning (pure where it can be): which sources Felix's precedence says to change, and the exact
patches, including the ones that restore the values recorded before an action.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from scanner.core.calico import ENABLED, PORT, felix_param, resolve, resolve_nodes
from scanner.core.errors import RemediationError, RemediationRefused
from scanner.core.records import ClusterResult, ClusterSnapshot, Declared, EnvVar
from scanner.kube.write import KubeWriter, ObjectRef, PatchType
from scanner.remediate.records import (
    ANNOTATION,
    ENV,
    ENV_VAR,
    OPERATOR_API,
    REMOVE,
    SPEC_ENABLED,
    SPEC_METRICS_PORT,
    ObjectChange,
    show,
)

log = logging.getLogger(__name__)


# --- planning: which sources to change (pure) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fix:
    """One field to set on one object, and why (planning's output before objects are read)."""

    kind: Literal["DaemonSet", "FelixConfiguration", "Installation"]
    name: str
    field: str
    value: Any  # REMOVE deletes the field
    reason: str


def plan_fixes(snapshot: ClusterSnapshot) -> tuple[tuple[Fix, ...], tuple[str, ...]]:
    """The fields to change so that Felix's metrics are declared off on every node.

    Simulates each fix on the snapshot and resolves again with Felix's precedence until every
    node is off: turning off a winning source can uncover a lower one that is on (an operator
    env gone, the FelixConfiguration `default` beneath it). Raises RemediationRefused for a
    source felixscan does not change (the config file, an env the operator renders from
    something other than nodeMetricsPort, a selector that cannot be evaluated).
    """
    fixes: dict[tuple[str, str, str], Fix] = {}
    notes: list[str] = []
    snap = snapshot

    def add(new: Sequence[Fix]) -> bool:
        progressed = False
        for fix in new:
            key = (fix.kind, fix.name, fix.field)
            if key not in fixes or fixes[key].value != fix.value:
                progressed = True
            fixes[key] = fix
        return progressed

    inst = snap.installation
    if inst is not None and inst.node_metrics_port is not None:
        # The operator renders FELIX_PROMETHEUSMETRICSENABLED=true from this field and reverts
        # any env edit, so the Installation is what must change.
        found = [Fix("Installation", inst.name, SPEC_METRICS_PORT, REMOVE,
                     f"Installation {inst.name} sets spec.nodeMetricsPort="
                     f"{inst.node_metrics_port}: the operator renders "
                     f"{ENV_VAR}=true into calico-node")]
        if any(c.name == "default" for c in snap.felix_configs):
            found.append(Fix("FelixConfiguration", "default", SPEC_ENABLED, False,
                             "keep Felix metrics off once the operator stops setting the env"))
        else:
            notes.append("FelixConfiguration default does not exist: nothing to set there")
        add(found)
        snap = replace(
            snap, installation=replace(inst, node_metrics_port=None),
            env=tuple(e for e in snap.env if felix_param(e.name) not in (ENABLED, PORT)))
        snap = _simulate(snap, found)

    for _ in range(8):
        # As the template will run once rolled out: the pods' own env is what changes.
        per_node = (resolve_nodes(snap, use_pods=False) if snap.nodes
                    else {"(cluster)": resolve(snap, None, use_pods=False)})
        on: dict[str, list[tuple[str, Declared]]] = {}
        for node, declared in per_node.items():
            if declared.enabled is not False:
                on.setdefault(declared.source, []).append((node, declared))
        if not on:
            return tuple(fixes.values()), tuple(notes)
        progressed = False
        for source, hits in on.items():
            declared = hits[0][1]
            state = "enables metrics" if declared.enabled else "leaves the state unknown"
            reason = f"{source} {state} on {len(hits)} of {len(per_node)} node(s)"
            found = _fixes_for(snap, source, declared, reason)
            progressed = add(found) or progressed
            snap = _simulate(snap, found)
        if not progressed:
            stuck = "; ".join(f"{s}: {h[0][1].reason or 'still on'}" for s, h in on.items())
            raise RemediationRefused(f"no change felixscan makes turns the endpoint off: {stuck}")
    raise RemediationRefused("planning did not converge (the sources keep changing)")


def _fixes_for(snap: ClusterSnapshot, source: str, declared: Declared,
               reason: str) -> list[Fix]:
    if source.startswith("env "):
        if snap.install == "operator":
            raise RemediationRefused(
                f"{source} is on an operator-managed DaemonSet and the Installation sets no "
                "nodeMetricsPort: the operator would revert an env patch, and felixscan cannot "
                "tell which operator setting renders it; change it in the operator's "
                "configuration")
        if snap.install != "manifest":
            raise RemediationRefused(
                f"{source}: the DaemonSet {snap.namespace}/{snap.daemonset} looks operator-"
                "managed but no Installation was found; an env patch might be reverted, so "
                "felixscan does not make one")
        names = sorted({e.name for e in snap.env
                        if felix_param(e.name) == ENABLED and " " not in e.name}) or [ENV_VAR]
        return [Fix("DaemonSet", snap.daemonset, ENV + n, {"name": n, "value": "false"}, reason)
                for n in names]
    if source.startswith("FelixConfiguration "):
        rest = source[len("FelixConfiguration "):]
        name = rest.split(" ", 1)[0]
        if declared.enabled is None or not any(c.name == name for c in snap.felix_configs):
            raise RemediationRefused(f"{source}: {declared.reason or 'cannot be evaluated'}")
        if " annotation " in rest:
            # The annotation overrides the spec field, so it is the value Felix uses.
            key = rest.rsplit(" annotation ", 1)[1].strip()
            return [Fix("FelixConfiguration", name, ANNOTATION + key, "false", reason)]
        return [Fix("FelixConfiguration", name, SPEC_ENABLED, False, reason)]
    raise RemediationRefused(f"{source} is not something felixscan changes through the "
                             f"Kubernetes API ({declared.reason or 'it enables metrics'}); "
                             "change it by hand")


def _simulate(snap: ClusterSnapshot, fixes: Sequence[Fix]) -> ClusterSnapshot:
    env = list(snap.env)
    configs = list(snap.felix_configs)
    for fix in fixes:
        if fix.kind == "DaemonSet":
            name = fix.field[len(ENV):]
            env = [e for e in env if e.name != name]
            env.append(EnvVar(name=name, value="false", origin="literal"))
        elif fix.kind == "FelixConfiguration":
            for i, cfg in enumerate(configs):
                if cfg.name != fix.name:
                    continue
                if fix.field == SPEC_ENABLED:
                    configs[i] = replace(cfg, spec={**cfg.spec,
                                                    "prometheusMetricsEnabled": fix.value})
                else:
                    key = fix.field[len(ANNOTATION):]
                    configs[i] = replace(cfg, annotations={**cfg.annotations, key: fix.value})
    sets = {g: replace(fs, configs=tuple(configs)) if g == snap.felix_group else fs
            for g, fs in snap.felix_sets.items()}
    return replace(snap, env=tuple(env), felix_configs=tuple(configs), felix_sets=sets)


# --- planning: the exact patches ----------------------------------------------------------


def _ref(snapshot: ClusterSnapshot, kind: str, name: str) -> ObjectRef:
    if kind == "DaemonSet":
        return ObjectRef("apps/v1", "DaemonSet", name, snapshot.namespace)
    if kind == "FelixConfiguration":
        return ObjectRef(snapshot.felix_group, kind, name)  # the group Felix reads
    return ObjectRef(OPERATOR_API, kind, name)


_ORDER = {"FelixConfiguration": 0, "Installation": 1, "DaemonSet": 2}


def materialize(snapshot: ClusterSnapshot, fixes: Sequence[Fix],
                 writer: KubeWriter) -> tuple[ObjectChange, ...]:
    """Read each object to change and build its patch from what it holds now.

    FelixConfigurations first (Felix restarts in place), then the Installation, then the
    DaemonSet: the changes that restart pods come last.
    """
    groups: dict[tuple[str, str], list[Fix]] = {}
    for fix in fixes:
        groups.setdefault((fix.kind, fix.name), []).append(fix)
    changes = []
    for (kind, name), group in sorted(groups.items(), key=lambda kv: _ORDER[kv[0][0]]):
        ref = _ref(snapshot, kind, name)
        obj = writer.read(ref)
        if obj is None:
            raise RemediationRefused(f"{ref} disappeared since the scan; scan again")
        container = snapshot.container if kind == "DaemonSet" else None
        wanted = {f.field: f.value for f in group}
        if kind == "DaemonSet":
            # Every entry that sets the parameter under any spelling, so none is left on.
            for entry in _container(ref, obj, snapshot.container).get("env") or []:
                entry_name = str(entry.get("name", ""))
                if felix_param(entry_name) == ENABLED:
                    wanted.setdefault(ENV + entry_name, {"name": entry_name, "value": "false"})
        reasons = list(dict.fromkeys(f.reason for f in group))
        change = object_change(ref, obj, container, wanted, reason="; ".join(reasons))
        if change is not None:
            changes.append(change)
    return tuple(changes)


def _container(ref: ObjectRef, obj: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    containers = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}) \
        .get("containers") or []
    found = next((c for c in containers if c.get("name") == name), None)
    if not isinstance(found, dict):
        raise RemediationRefused(f"{ref} has no container {name!r}")
    return found


def values_of(ref: ObjectRef, obj: Mapping[str, Any], container: str | None,
            fields: Sequence[str]) -> dict[str, Any]:
    """The current value of each field (a missing key: the field is absent)."""
    out: dict[str, Any] = {}
    for f in fields:
        if f.startswith(ENV):
            name = f[len(ENV):]
            env = _container(ref, obj, container).get("env") or []
            entries = [e for e in env if isinstance(e, dict) and e.get("name") == name]
            if len(entries) > 1:
                # A strategic merge patch addresses env entries by name; with duplicates it
                # cannot say which one it changes.
                raise RemediationRefused(f"{ref} container {container} has {len(entries)} env "
                                         f"entries named {name}; remove the duplicates first")
            if entries:
                out[f] = copy.deepcopy(entries[0])
        elif f.startswith(ANNOTATION):
            notes = (obj.get("metadata") or {}).get("annotations") or {}
            key = f[len(ANNOTATION):]
            if key in notes:
                out[f] = notes[key]
        elif f.startswith("spec/"):
            spec = obj.get("spec") or {}
            key = f[len("spec/"):]
            if key in spec:
                out[f] = copy.deepcopy(spec[key])
        else:
            raise ValueError(f"unknown field {f}")
    return out


def object_change(ref: ObjectRef, obj: Mapping[str, Any], container: str | None,
                   wanted: Mapping[str, Any], *, reason: str) -> ObjectChange | None:
    """The patch that sets `wanted` on `obj` (None when it already holds it)."""
    current = values_of(ref, obj, container, list(wanted))
    fields = tuple(f for f, v in wanted.items() if current.get(f, REMOVE) != v)
    if not fields:
        return None
    meta = obj.get("metadata") or {}
    rv = str(meta.get("resourceVersion") or "")
    # With the resourceVersion, the uid: the patch lands on this very object or not at all
    # (kube_write refuses to send a patch without both).
    preconditions = {"resourceVersion": rv, "uid": str(meta.get("uid") or "")}
    before = {f: current[f] for f in fields if f in current}
    after = {f: copy.deepcopy(wanted[f]) for f in fields if wanted[f] is not REMOVE}
    if ref.kind == "DaemonSet":
        entries: list[dict[str, Any]] = []
        for f in fields:
            name = f[len(ENV):]
            if wanted[f] is REMOVE:
                entries.append({"name": name, "$patch": "delete"})
                continue
            entry = dict(wanted[f])
            # A strategic merge patch merges the entry's keys: a key of the old entry that the
            # new one lacks (valueFrom when a literal replaces it) must be deleted explicitly.
            for key in before.get(f) or {}:
                entry.setdefault(key, None)
            entries.append(entry)
        patch: dict[str, Any] = {"metadata": dict(preconditions), "spec": {"template": {
            "spec": {"containers": [{"name": container, "env": entries}]}}}}
        patch_type: PatchType = "strategic"
    else:
        # Custom resources take no strategic merge patch; a JSON merge patch with null deletes.
        patch = {"metadata": dict(preconditions)}
        for f in fields:
            value = None if wanted[f] is REMOVE else copy.deepcopy(wanted[f])
            if f.startswith(ANNOTATION):
                patch["metadata"].setdefault("annotations", {})[f[len(ANNOTATION):]] = value
            else:
                patch.setdefault("spec", {})[f[len("spec/"):]] = value
        patch_type = "merge"
    return ObjectChange(ref=ref, container=container, patch_type=patch_type, patch=patch,
                        fields=fields, before=before, after=after, resource_version=rv,
                        restarts_pods=ref.kind in ("DaemonSet", "Installation"), reason=reason)


def field_path(change: ObjectChange, f: str) -> str:
    if f.startswith(ENV):
        return (f"spec.template.spec.containers[name={change.container}]"
                f".env[name={f[len(ENV):]}]")
    if f.startswith(ANNOTATION):
        return f"metadata.annotations[{f[len(ANNOTATION):]}]"
    return "spec." + f[len("spec/"):]




def restoring(writer: KubeWriter, obj: Mapping[str, Any], action_id: int
               ) -> ObjectChange | None:
    """The change that puts one recorded object back (None: it already holds those values)."""
    ref = ObjectRef(str(obj["apiVersion"]), str(obj["kind"]), str(obj["name"]),
                    obj.get("namespace"))
    current = writer.read(ref)
    if current is None:
        raise RemediationRefused(f"{ref} no longer exists; nothing to restore it into")
    container = obj.get("container")
    fields = tuple(str(f) for f in obj["fields"])
    now = values_of(ref, current, container, fields)
    before, after = obj["before"], obj["after"]
    wanted = {f: before.get(f, REMOVE) for f in fields}
    if all(now.get(f, REMOVE) == wanted[f] for f in fields):
        return None  # already restored (an earlier rollback that did not finish)
    drift = [f for f in fields if now.get(f, REMOVE) != after.get(f, REMOVE)]
    if drift:
        shown = "; ".join(f"{f} is {show(now.get(f, REMOVE))}, action {action_id} set "
                          f"{show(after.get(f, REMOVE))}" for f in drift)
        raise RemediationRefused(f"{ref} changed since action {action_id} ({shown}); refusing "
                                 "to overwrite that change")
    return object_change(ref, current, container, wanted,
                          reason=f"restore the values recorded before action {action_id}")



def snapshot_of(result: ClusterResult) -> ClusterSnapshot:
    if result.snapshot is None:
        raise RemediationError(f"cluster {result.cluster} cannot be read, so no change can be "
                               f"planned: {result.error}")
    return result.snapshot
