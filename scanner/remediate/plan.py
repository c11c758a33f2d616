"""Planning (pure where it can be): which sources each component's own precedence says to
change (Felix's, Typha's, kube-controllers'), and the exact patches, including the ones that
restore the values recorded before an action.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from scanner.core.calico import ENABLED, PORT, felix_param, resolve, resolve_nodes
from scanner.core.components import (
    KUBE_CONTROLLERS_DEFAULT_PORT,
    kube_controllers_declared,
    resolve_typha,
    typha_param,
)
from scanner.core.errors import RemediationError, RemediationRefused
from scanner.core.records import (
    CONTROL_IDS,
    FELIX,
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterResult,
    ClusterSnapshot,
    ComponentSnapshot,
    Declared,
    EnvVar,
)
from scanner.kube.write import KubeWriter, ObjectRef, PatchType
from scanner.remediate.records import (
    ANNOTATION,
    CONTROL_ORDER,
    ENV,
    ENV_VAR,
    JSON_PATCH_FIELDS,
    KCC_KIND,
    OPERATOR_API,
    REMOVE,
    SPEC_ENABLED,
    SPEC_KCC_PORT,
    SPEC_METRICS_PORT,
    SPEC_TYPHA_METRICS_PORT,
    TYPHA_ENV_VAR,
    ObjectChange,
    control_status,
    show,
)

log = logging.getLogger(__name__)


# --- planning: which sources to change (pure) ------------------------------------------------


FixKind = Literal["DaemonSet", "FelixConfiguration", "Installation", "Deployment",
                  "KubeControllersConfiguration"]


@dataclass(frozen=True, slots=True)
class Fix:
    """One field to set on one object, and why (planning's output before objects are read)."""

    kind: FixKind
    name: str
    field: str
    value: Any  # REMOVE deletes the field
    reason: str
    control: str = FELIX


def select_controls(before: ClusterResult, requested: Sequence[str] | None) -> tuple[str, ...]:
    """The controls a remediation works on: those asked for (each must be one the cluster
    checks), else every checked control that is not compliant, in CONTROL_IDS order."""
    snapshot = snapshot_of(before)
    checked = tuple(c for c in CONTROL_IDS if c in snapshot.controls)
    if requested:
        unknown = [c for c in requested if c not in CONTROL_IDS]
        if unknown:
            raise RemediationRefused(f"no such control: {', '.join(unknown)} (controls: "
                                     f"{', '.join(CONTROL_IDS)})")
        unchecked = [c for c in requested if c not in checked]
        if unchecked:
            raise RemediationRefused(
                f"cluster {before.cluster} does not check {', '.join(unchecked)} (its controls:"
                f" {', '.join(checked)}); nothing was read about it, so nothing is changed")
        return tuple(c for c in CONTROL_IDS if c in requested)
    return tuple(c for c in checked if control_status(before, c) != "compliant")


def plan_controls(snapshot: ClusterSnapshot, controls: Sequence[str], *,
                  explicit: bool) -> tuple[tuple[Fix, ...], tuple[str, ...]]:
    """The fixes of every control in `controls`, least disruptive control first.

    Any refusal refuses the whole plan (nothing is changed), the message naming the control.
    A component that could not be read is skipped with a note when the control was picked by
    default (it is an error of the scan, not a setting), and refused when it was asked for.
    """
    fixes: list[Fix] = []
    notes: list[str] = []
    for control in CONTROL_ORDER:
        if control not in controls:
            continue
        component = snapshot.components.get(control)
        try:
            if control == FELIX:
                found, said = plan_fixes(snapshot)
            elif control == TYPHA:
                found, said = plan_typha(snapshot)
            else:
                found, said = plan_kube_controllers(snapshot)
        except RemediationError as exc:
            if not explicit and component is not None and component.error:
                notes.append(f"{control}: not changed: {component.error}")
                continue
            cls = type(exc)
            raise cls(f"{control}: {exc}") from None
        fixes.extend(found)
        notes.extend(f"{control}: {n}" for n in said)
    return tuple(fixes), tuple(notes)


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


# --- planning: Typha and kube-controllers (pure) ---------------------------------------------


def _component(snapshot: ClusterSnapshot, control: str) -> ComponentSnapshot:
    component = snapshot.components.get(control)
    if component is None:
        raise RemediationRefused(f"cluster {snapshot.cluster} does not check {control}")
    if component.error:
        raise RemediationError(f"it cannot be read, so no change can be planned: "
                               f"{component.error}")
    return component


def plan_typha(snapshot: ClusterSnapshot) -> tuple[tuple[Fix, ...], tuple[str, ...]]:
    """The fields to change so that Typha's metrics are declared off (its Deployment template,
    by Typha's own precedence: typha/pkg/config `resolve`).

    Operator installs: the Installation's spec.typhaMetricsPort (the operator renders
    TYPHA_PROMETHEUSMETRICSENABLED=true from it and reverts any Deployment edit). Manifest
    installs: every env entry that sets the parameter, to "false" (or an entry added). Refused:
    the config file as winner (felixscan does not edit it), an env the operator renders from
    something else, a Deployment in an operator namespace without an Installation.
    """
    component = _component(snapshot, TYPHA)
    if not component.found:
        return (), (f"no Typha Deployment {component.namespace}/{component.deployment}: "
                    "nothing to change",)
    fixes: list[Fix] = []
    env = list(component.env)
    inst = snapshot.installation
    if inst is not None and inst.typha_metrics_port is not None:
        fixes.append(Fix("Installation", inst.name, SPEC_TYPHA_METRICS_PORT, REMOVE,
                         f"Installation {inst.name} sets spec.typhaMetricsPort="
                         f"{inst.typha_metrics_port}: the operator renders {TYPHA_ENV_VAR}=true "
                         f"into {component.deployment}", control=TYPHA))
        # What the operator renders without it (tigera/operator pkg/render/typha.go).
        env = [e for e in env if typha_param(e.name) not in ("prometheusmetricsenabled",
                                                             "prometheusmetricsport")]
    declared = resolve_typha(env, component.config_file, image=component.image,
                             config_path=_typha_config_path(component))
    for _ in range(4):
        if declared.enabled is False:
            return tuple(fixes), ()
        source = declared.source
        if source.startswith("config file"):
            raise RemediationRefused(_typha_file_refusal(component, declared))
        if not source.startswith("env "):
            break
        if fixes and fixes[0].kind == "Installation":
            raise RemediationRefused(
                f"{source} would still enable Typha's metrics once the operator stops "
                "rendering them from spec.typhaMetricsPort; felixscan cannot tell which "
                "operator setting renders it")
        if snapshot.install == "operator":
            raise RemediationRefused(
                f"{source} is on an operator-managed Deployment and the Installation sets no "
                "typhaMetricsPort: the operator would revert an env patch, and felixscan "
                "cannot tell which operator setting renders it; change it in the operator's "
                "configuration")
        if snapshot.install != "manifest":
            raise RemediationRefused(
                f"{source}: the Deployment {component.namespace}/{component.deployment} looks "
                "operator-managed but no Installation was found; an env patch might be "
                "reverted, so felixscan does not make one")
        state = "enables Typha's metrics" if declared.enabled else \
            f"leaves Typha's metrics state unknown ({declared.reason})"
        reason = f"{source} {state} in the {component.deployment} Deployment template"
        names = sorted({e.name for e in env if typha_param(e.name) == "prometheusmetricsenabled"
                        and " " not in e.name}) or [TYPHA_ENV_VAR]
        new = [Fix("Deployment", component.deployment, ENV + n, {"name": n, "value": "false"},
                   reason, control=TYPHA) for n in names]
        if all(any(f.field == n.field for f in fixes) for n in new):
            break  # already set: no progress
        fixes.extend(new)
        env = [e for e in env if e.name not in names] + [
            EnvVar(name=n, value="false", origin="literal") for n in names]
        declared = resolve_typha(env, component.config_file, image=component.image,
                                 config_path=_typha_config_path(component))
    raise RemediationRefused(f"no change felixscan makes turns Typha's metrics off: "
                             f"{declared.source}: {declared.reason or 'still on'}")


def _typha_config_path(component: ComponentSnapshot) -> str:
    cf = component.config_file
    if cf is not None and cf.origin.startswith("path "):
        return cf.origin.split(" ", 2)[1].rstrip(",")
    return "/etc/calico/typha.cfg"


def _typha_file_refusal(component: ComponentSnapshot, declared: Declared) -> str:
    cf = component.config_file
    origin = cf.origin if cf is not None else ""
    found = re.search(r"(configmap|secret) ([^/\s]+)/([^\[\s]+)\[([^\]]+)\]", origin)
    keys = ", ".join(dict.fromkeys(re.findall(r"\bkey ([A-Za-z0-9_.-]+)", declared.source))) \
        or "PrometheusMetricsEnabled"
    where = (f"{found.group(1).capitalize() if found.group(1) == 'secret' else 'ConfigMap'} "
             f"{found.group(2)}/{found.group(3)}, key {found.group(4)}" if found
             else f"the volume that provides {_typha_config_path(component)} ({origin})")
    return (f"Typha's metrics are decided by its config file: {declared.source}. felixscan does "
            f"not edit config files (other workloads may mount them, and Typha reads the file "
            f"only when it starts): set {keys} to false (or remove it) in {where}, then "
            f"restart the {component.deployment} Deployment "
            f"(kubectl -n {component.namespace} rollout restart deployment/"
            f"{component.deployment})")


def plan_kube_controllers(snapshot: ClusterSnapshot) -> tuple[tuple[Fix, ...], tuple[str, ...]]:
    """KubeControllersConfiguration `default` spec.prometheusMetricsPort set to 0, the one
    source of kube-controllers' metrics port (runconfig.go `mergeConfig`): explicitly 0,
    never removed, since libcalico-go's client fills an absent port with 9094 on every Create
    and Update; the object is created (with 0) when it does not exist, since kube-controllers
    would create it with 9094."""
    component = _component(snapshot, KUBE_CONTROLLERS)
    if not component.found:
        return (), (f"no kube-controllers Deployment {component.namespace}/"
                    f"{component.deployment}: nothing to change",)
    declared = kube_controllers_declared(component)
    if not declared.source.startswith("KubeControllersConfiguration"):
        # Decided before kube-controllers reads the resource: its datastore, or the Flannel
        # migration mode (kube-controllers_declared).
        if declared.enabled is False:
            return (), (f"{declared.source}: no metrics server runs; nothing to change",)
        raise RemediationRefused(f"{declared.source}: {declared.reason}; felixscan changes "
                                 "only a KubeControllersConfiguration in the Kubernetes API")
    kcc = component.kcc
    if kcc is None or kcc.error:
        raise RemediationError(f"KubeControllersConfiguration default cannot be read: "
                               f"{kcc.error if kcc is not None else 'it was not read'}")
    port = kcc.port
    if kcc.exists and isinstance(port, int) and not isinstance(port, bool) and port == 0:
        return (), ("KubeControllersConfiguration default already sets "
                    "spec.prometheusMetricsPort: 0",)
    if not kcc.exists:
        reason = ("KubeControllersConfiguration default does not exist: kube-controllers "
                  f"creates it with prometheusMetricsPort {KUBE_CONTROLLERS_DEFAULT_PORT}")
    elif port is None:
        reason = ("KubeControllersConfiguration default has no spec.prometheusMetricsPort: off "
                  "now, but any update through a Calico client fills in "
                  f"{KUBE_CONTROLLERS_DEFAULT_PORT}")
    else:
        reason = (f"KubeControllersConfiguration default sets spec.prometheusMetricsPort="
                  f"{show(port)}: " + ("kube-controllers serves its metrics there"
                                       if declared.enabled else
                                       declared.reason or "not a port kube-controllers can use"))
    return (Fix("KubeControllersConfiguration", "default", SPEC_KCC_PORT, 0, reason,
                control=KUBE_CONTROLLERS),), ()


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
    if kind == "Deployment":
        component = snapshot.components.get(TYPHA)
        return ObjectRef("apps/v1", "Deployment", name,
                         component.namespace if component else snapshot.namespace)
    if kind in ("FelixConfiguration", KCC_KIND):
        return ObjectRef(snapshot.felix_group, kind, name)  # the group Calico's clients read
    return ObjectRef(OPERATOR_API, kind, name)


_ORDER = {KCC_KIND: 0, "FelixConfiguration": 0, "Installation": 1, "DaemonSet": 2,
          "Deployment": 2}


def materialize(snapshot: ClusterSnapshot, fixes: Sequence[Fix],
                 writer: KubeWriter) -> tuple[ObjectChange, ...]:
    """Read each object to change and build its patch from what it holds now.

    Control by control, the least disruptive first (CONTROL_ORDER); within a control the
    configuration objects first (Felix restarts in place), then the Installation, then the
    workload: the changes that restart pods come last. A KubeControllersConfiguration `default`
    that does not exist is created.
    """
    groups: dict[tuple[str, str, str], list[Fix]] = {}
    for fix in fixes:
        groups.setdefault((fix.control, fix.kind, fix.name), []).append(fix)
    changes = []
    for (control, kind, name), group in sorted(
            groups.items(), key=lambda kv: (CONTROL_ORDER.index(kv[0][0]), _ORDER[kv[0][1]])):
        ref = _ref(snapshot, kind, name)
        obj = writer.read(ref)
        wanted = {f.field: f.value for f in group}
        reasons = "; ".join(dict.fromkeys(f.reason for f in group))
        if obj is None:
            if kind == KCC_KIND:
                changes.append(creating(ref, wanted, control=control, reason=reasons))
                continue
            raise RemediationRefused(f"{ref} disappeared since the scan; scan again")
        container = _container_name(snapshot, kind, control)
        if kind in ("DaemonSet", "Deployment"):
            # Every entry that sets the parameter under any spelling, so none is left on.
            for entry in _container(ref, obj, container).get("env") or []:
                entry_name = str(entry.get("name", ""))
                if _enables(control, entry_name):
                    wanted.setdefault(ENV + entry_name, {"name": entry_name, "value": "false"})
        change = object_change(ref, obj, container, wanted, reason=reasons, control=control)
        if change is not None:
            changes.append(change)
    return tuple(changes)


def _container_name(snapshot: ClusterSnapshot, kind: str, control: str) -> str | None:
    if kind == "DaemonSet":
        return snapshot.container
    if kind == "Deployment":
        component = snapshot.components.get(control)
        return component.container if component else None
    return None


def _enables(control: str, env_name: str) -> bool:
    """Whether an env entry sets the component's PrometheusMetricsEnabled."""
    if control == TYPHA:
        return typha_param(env_name) == "prometheusmetricsenabled"
    return felix_param(env_name) == ENABLED


# The KubeControllersConfiguration `default` kube-controllers creates when there is none
# (kube-controllers/pkg/config/runconfig.go NewDefaultKubeControllersConfig, v3.32.1), which
# felixscan creates instead with prometheusMetricsPort 0: without its controllers section
# kube-controllers would run no controller. Fields an older CRD does not know are pruned.
KCC_DEFAULT_SPEC: Mapping[str, Any] = {
    "logSeverityScreen": "Info",
    "healthChecks": "Enabled",
    "etcdV3CompactionPeriod": "10m0s",
    "controllers": {
        "node": {"reconcilerPeriod": "5m0s", "syncLabels": "Enabled",
                 "hostEndpoint": {"autoCreate": "Disabled",
                                  "createDefaultHostEndpoint": "Enabled"},
                 "leakGracePeriod": "15m0s"},
        "policy": {"reconcilerPeriod": "5m0s"},
        "workloadEndpoint": {"reconcilerPeriod": "5m0s"},
        "serviceAccount": {"reconcilerPeriod": "5m0s"},
        "namespace": {"reconcilerPeriod": "5m0s"},
        "loadBalancer": {"assignIPs": "AllServices"},
        "policyMigration": {"enabled": "Enabled"},
    },
}


def creating(ref: ObjectRef, wanted: Mapping[str, Any], *, control: str,
             reason: str) -> ObjectChange:
    """The change that creates KubeControllersConfiguration `default` with `wanted` set."""
    spec = copy.deepcopy(dict(KCC_DEFAULT_SPEC))
    for f, value in wanted.items():
        if not f.startswith("spec/") or value is REMOVE:
            raise ValueError(f"cannot create {ref} with {f}={show(value)}")
        spec[f[len("spec/"):]] = copy.deepcopy(value)
    body = {"apiVersion": ref.api_version, "kind": ref.kind, "metadata": {"name": ref.name},
            "spec": spec}
    return ObjectChange(ref=ref, container=None, patch_type="merge", patch=body,
                        fields=tuple(wanted), before={},
                        after={f: copy.deepcopy(v) for f, v in wanted.items()},
                        resource_version="", restarts_pods=False, reason=reason,
                        control=control, create=True)


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
                   wanted: Mapping[str, Any], *, reason: str,
                   control: str = FELIX) -> ObjectChange | None:
    """The patch that sets `wanted` on `obj` (None when it already holds it)."""
    current = values_of(ref, obj, container, list(wanted))
    fields = tuple(f for f, v in wanted.items() if current.get(f, REMOVE) != v)
    if not fields:
        return None
    meta = obj.get("metadata") or {}
    rv = str(meta.get("resourceVersion") or "")
    uid = str(meta.get("uid") or "")
    # With the resourceVersion, the uid: the patch lands on this very object or not at all
    # (kube_write refuses to send a patch without both).
    preconditions = {"resourceVersion": rv, "uid": uid}
    before = {f: current[f] for f in fields if f in current}
    after = {f: copy.deepcopy(wanted[f]) for f in fields if wanted[f] is not REMOVE}
    patch: dict[str, Any] | list[dict[str, Any]]
    if ref.kind in ("DaemonSet", "Deployment"):
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
        patch = {"metadata": dict(preconditions), "spec": {"template": {
            "spec": {"containers": [{"name": container, "env": entries}]}}}}
        patch_type: PatchType = "strategic"
    elif any(f in JSON_PATCH_FIELDS for f in fields):
        # RFC 6902: the preconditions first, then per field a `test` of the value the plan
        # saw and the change, so the server refuses it when the field holds anything else.
        patch = [{"op": "test", "path": "/metadata/uid", "value": uid},
                 {"op": "replace", "path": "/metadata/resourceVersion", "value": rv}]
        if "spec" not in obj:
            patch.append({"op": "add", "path": "/spec", "value": {}})
        for f in fields:
            path = "/spec/" + f[len("spec/"):].replace("~", "~0").replace("/", "~1")
            if f in current:
                patch.append({"op": "test", "path": path, "value": copy.deepcopy(current[f])})
                patch.append({"op": "remove", "path": path} if wanted[f] is REMOVE else
                             {"op": "replace", "path": path, "value": copy.deepcopy(wanted[f])})
            else:
                patch.append({"op": "add", "path": path, "value": copy.deepcopy(wanted[f])})
        patch_type = "json"
    else:
        # Custom resources take no strategic merge patch; a JSON merge patch with null deletes.
        merge: dict[str, Any] = {"metadata": dict(preconditions)}
        for f in fields:
            value = None if wanted[f] is REMOVE else copy.deepcopy(wanted[f])
            if f.startswith(ANNOTATION):
                merge["metadata"].setdefault("annotations", {})[f[len(ANNOTATION):]] = value
            else:
                merge.setdefault("spec", {})[f[len("spec/"):]] = value
        patch = merge
        patch_type = "merge"
    return ObjectChange(ref=ref, container=container, patch_type=patch_type, patch=patch,
                        fields=fields, before=before, after=after, resource_version=rv,
                        restarts_pods=ref.kind in ("DaemonSet", "Installation", "Deployment"),
                        reason=reason, control=control)


def field_path(change: ObjectChange, f: str) -> str:
    if f.startswith(ENV):
        return (f"spec.template.spec.containers[name={change.container}]"
                f".env[name={f[len(ENV):]}]")
    if f.startswith(ANNOTATION):
        return f"metadata.annotations[{f[len(ANNOTATION):]}]"
    return "spec." + f[len("spec/"):]


def restoring(writer: KubeWriter, obj: Mapping[str, Any], action_id: int
               ) -> ObjectChange | None:
    """The change that puts one recorded object back (None: it already holds those values).

    An object the action created (KubeControllersConfiguration `default`) is not deleted
    (felixscan has no delete permission): its port goes to 9094, what kube-controllers gives
    the object it creates when there is none, which is what the absent object stood for.
    """
    ref = ObjectRef(str(obj["apiVersion"]), str(obj["kind"]), str(obj["name"]),
                    obj.get("namespace"))
    control = str(obj.get("control") or FELIX)
    current = writer.read(ref)
    if current is None:
        raise RemediationRefused(f"{ref} no longer exists; nothing to restore it into")
    container = obj.get("container")
    fields = tuple(str(f) for f in obj["fields"])
    now = values_of(ref, current, container, fields)
    before, after = obj["before"], obj["after"]
    created = obj.get("verb") == "create"
    wanted = {f: before.get(f, REMOVE) for f in fields}
    reason = f"restore the values recorded before action {action_id}"
    if created:
        wanted = {f: KUBE_CONTROLLERS_DEFAULT_PORT if f == SPEC_KCC_PORT else before.get(f, REMOVE)
                  for f in fields}
        reason = (f"action {action_id} created {ref}, which did not exist: kube-controllers "
                  f"creates it with prometheusMetricsPort {KUBE_CONTROLLERS_DEFAULT_PORT}, so "
                  f"that is the value restored (felixscan does not delete it)")
    if all(now.get(f, REMOVE) == wanted[f] for f in fields):
        return None  # already restored (an earlier rollback that did not finish)
    drift = [f for f in fields if now.get(f, REMOVE) != after.get(f, REMOVE)]
    if drift:
        shown = "; ".join(f"{f} is {show(now.get(f, REMOVE))}, action {action_id} set "
                          f"{show(after.get(f, REMOVE))}" for f in drift)
        raise RemediationRefused(f"{ref} changed since action {action_id} ({shown}); refusing "
                                 "to overwrite that change")
    return object_change(ref, current, container, wanted, reason=reason, control=control)


def snapshot_of(result: ClusterResult) -> ClusterSnapshot:
    if result.snapshot is None:
        raise RemediationError(f"cluster {result.cluster} cannot be read, so no change can be "
                               f"planned: {result.error}")
    return result.snapshot
