"""Safe remediation: switch the Felix metrics endpoint off where it is on, prove it, record it.

scan -> plan (Felix's precedence decides which object and which exact patch) -> guards and a
server-side dry run -> [apply: patch with a resourceVersion precondition, follow the rollout,
verification scan] -> one `remediation_actions` row. `remediate()` and `rollback()` are the
library entry points of the CLI and of `serve`; they never print. Kubernetes writes go through
`scanner.kube.write`; docs/remediation.md explains the choices and lists the RBAC it needs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from scanner.core.calico import ENABLED, PORT, felix_param, resolve, resolve_nodes
from scanner.core.config import ClusterSettings, MaintenanceWindow, Settings
from scanner.core.errors import ApiUnreachable, ClusterError, RemediationError, RemediationRefused
from scanner.core.records import ClusterResult, ClusterSnapshot, Declared, EnvVar, Install
from scanner.db.locks import HeldLock
from scanner.db.models import RemediationAction
from scanner.db.store import Store
from scanner.kube.read import collect
from scanner.kube.write import KubeWriter, ObjectRef, PatchType
from scanner.scan import run_scan, scan_cluster

log = logging.getLogger(__name__)

Mode = Literal["apply", "rollback"]
Outcome = Literal["dry_run", "noop", "succeeded", "failed", "rolled_back"]

ENV_VAR = "FELIX_PROMETHEUSMETRICSENABLED"
# Field keys of ObjectChange.before/after (and of the stored action's objects): a key present
# means the field is present; absent means absent. Rollback restores exactly that.
ENV = "env/"  # env/<NAME>: the whole env entry of the configured container
SPEC_ENABLED = "spec/prometheusMetricsEnabled"  # FelixConfiguration
ANNOTATION = "annotation/"  # annotation/<key>: a FelixConfiguration annotation
SPEC_METRICS_PORT = "spec/nodeMetricsPort"  # Installation

POD_RESTART_SECONDS = 30.0  # for estimates: one calico-node pod from termination to Ready
FELIX_RESTART_SECONDS = 15.0  # for estimates: Felix restarting in place after a config change
_OPERATOR_API = "operator.tigera.io/v1"
_IGNORED_META = frozenset({"resourceVersion", "generation", "managedFields"})


class _Remove:
    """The `after` value of a field that the patch deletes."""

    def __repr__(self) -> str:
        return "<absent>"


REMOVE: Any = _Remove()


# --- what remediation needs from RBAC (docs/remediation.md shows this table) --------------


@dataclass(frozen=True, slots=True)
class RbacRule:
    api_group: str  # "" for the core group
    resource: str
    verbs: tuple[str, ...]
    names: tuple[str, ...]  # resourceNames; () = any name
    scope: str  # "cluster" or the namespace it applies in
    why: str


REMEDIATION_RBAC: tuple[RbacRule, ...] = (
    RbacRule("apps", "daemonsets", ("patch",), ("calico-node",),
             "calico-node's namespace (kube-system)",
             "manifest installs: set the env entry on the calico-node container (and its "
             "dryRun=All preview); never used on operator installs"),
    RbacRule("crd.projectcalico.org", "felixconfigurations", ("get", "patch"), (), "cluster",
             "read and patch the winning FelixConfiguration (`default`, `node.<name>` or a "
             "selector-scoped one, so the names cannot be listed in advance)"),
    RbacRule("projectcalico.org", "felixconfigurations", ("get", "patch"), (), "cluster",
             "the same where Felix reads Calico's native v3 CRDs (projectcalico.org/v3)"),
    RbacRule("operator.tigera.io", "installations", ("patch",), ("default",), "cluster",
             "operator installs: remove spec.nodeMetricsPort from the Installation"),
)


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemediateOptions:
    """How careful and how patient remediation is; the CLI sets these from its flags."""

    rollout_timeout: float | None = None  # seconds; None: twice the estimate, at least 300
    max_not_ready_pct: float = 10.0  # refuse when more than this share of nodes is NotReady
    # After the rollout (or a FelixConfiguration change): how long the ports may take to
    # close before the verification scan. None: 60 s, or the rollout timeout if shorter.
    settle_timeout: float | None = None
    poll_initial: float = 0.2  # first poll interval of the rollout and settle loops
    poll_max: float = 5.0  # the interval grows to this
    conflict_attempts: int = 4  # PATCH attempts per object when the answer is 409 Conflict


@dataclass(frozen=True, slots=True)
class ObjectChange:
    """One object and the exact patch remediation sends to it."""

    ref: ObjectRef
    container: str | None  # the DaemonSet container whose env is patched
    patch_type: PatchType
    patch: Mapping[str, Any]  # the body as sent, resourceVersion and uid preconditions included
    fields: tuple[str, ...]
    before: Mapping[str, Any]  # field -> value; a missing key: the field is absent
    after: Mapping[str, Any]
    resource_version: str
    restarts_pods: bool
    reason: str

    def record(self, **extra: Any) -> dict[str, Any]:
        """The JSON stored in remediation_actions.objects."""
        return {"apiVersion": self.ref.api_version, "kind": self.ref.kind,
                "namespace": self.ref.namespace, "name": self.ref.name,
                "container": self.container, "patch_type": self.patch_type,
                "patch": copy.deepcopy(dict(self.patch)), "fields": list(self.fields),
                "before": copy.deepcopy(dict(self.before)),
                "after": copy.deepcopy(dict(self.after)),
                "resourceVersion": self.resource_version, "reason": self.reason, **extra}


@dataclass(frozen=True, slots=True)
class DryRun:
    """What the API server answered to the change sent with dryRun=All."""

    ref: ObjectRef
    accepted: bool
    error: str | None = None
    generation_before: int | None = None
    generation_after: int | None = None
    changed: tuple[str, ...] = ()  # paths that differ between the object and the answer
    unexpected: tuple[str, ...] = ()  # of those, paths outside the planned fields


@dataclass(frozen=True, slots=True)
class Guard:
    name: str  # enabled, window, rollout, not-ready, strategy, dry-run
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    restarts_pods: bool
    pods: int  # calico-node pods that restart (0 when Felix restarts in place)
    nodes: int  # nodes whose Felix picks the change up
    strategy: str
    max_unavailable: str | None
    batch: int  # pods restarted at once
    estimate_seconds: float
    how: str


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything decided before anything is changed; `confirm` callbacks get this."""

    cluster: str
    mode: Mode
    install: Install
    before: ClusterResult  # the scan the plan was made from
    changes: tuple[ObjectChange, ...]
    rollout: RolloutPlan | None
    guards: tuple[Guard, ...]
    dry_run: tuple[DryRun, ...]
    notes: tuple[str, ...] = ()
    rollback_of: int | None = None

    @property
    def refusals(self) -> tuple[Guard, ...]:
        return tuple(g for g in self.guards if not g.ok)


@dataclass(frozen=True, slots=True)
class RolloutProgress:
    generation: int
    observed_generation: int
    target_generation: int | None  # None while waiting for the operator to re-render
    desired: int
    updated: int
    available: int
    elapsed: float
    timeout: float


@dataclass(frozen=True, slots=True)
class RolloutReport:
    complete: bool
    seconds: float
    last: RolloutProgress | None
    message: str


@dataclass(frozen=True, slots=True)
class RemediationResult:
    plan: Plan
    outcome: Outcome
    message: str
    action_id: int | None = None
    rollout: RolloutReport | None = None
    verify_run_id: int | None = None
    verify: ClusterResult | None = None

    @property
    def exit_code(self) -> int:
        """0 done (or dry run shown, or nothing to do on a compliant cluster); 1 otherwise."""
        if self.outcome in ("dry_run", "succeeded", "rolled_back"):
            return 0
        if self.outcome == "noop":
            # Nothing to restore is fine; nothing to change on a non-compliant cluster is not.
            return 0 if self.plan.mode == "rollback" or self.plan.before.status == "compliant" \
                else 1
        return 1


Confirm = Callable[[Plan], bool]
Progress = Callable[[RolloutProgress], None]


# --- entry points ----------------------------------------------------------------------------


def remediate(settings: Settings, cluster: str, *, store: Store, apply: bool, trigger: str,
              ignore_window: bool = False, confirm: Confirm | None = None,
              now: datetime | None = None, options: RemediateOptions | None = None,
              progress: Progress | None = None,
              on_plan: Callable[[Plan], None] | None = None,
              lock: HeldLock | None = None) -> RemediationResult:
    """Plan (and with `apply`, make, follow and verify) the change that turns Felix metrics off.

    Dry run unless `apply`. With `apply`: refused (RemediationRefused, recorded as a `refused`
    action) when a guard fails; `confirm(plan)` False refuses without a record. Failures after
    the first write (a stalled rollout, a verification scan still non-compliant, a patch the
    server rejects) are recorded and returned with outcome `failed`. `now` is the time the
    maintenance window is checked against (default: the clock). `on_plan(plan)` is called once
    the plan is made, before any guard is enforced (the CLI prints it there); `progress` gets
    the rollout's counts as they change. Callers that may run concurrently hold the cluster's
    database lock (`scanner.db.locks.cluster_lock_name`) around this call and pass it as `lock`:
    it takes none itself, makes no change once the lock is lost, and stores its verification
    scan only while the lock is held.
    """
    opts = options or RemediateOptions()
    cs = _cluster(settings, cluster)
    store.ensure_schema()
    before = _scan(cs)
    snapshot = _snapshot(before)
    with _planning(cs.name):
        writer = KubeWriter(cs)
    with writer:
        with _planning(cs.name):
            fixes, notes = plan_fixes(snapshot)
            changes = _materialize(snapshot, fixes, writer)
            plan = _assemble(cs, before, writer, changes, notes=notes, mode="apply",
                             rollback_of=None, ignore_window=ignore_window, now=now,
                             options=opts)
        return _carry_out(settings, cs, plan, writer=writer, store=store, apply=apply,
                          trigger=trigger, confirm=confirm, options=opts, progress=progress,
                          on_plan=on_plan, noop=_noop_message(before), lock=lock)


def rollback(settings: Settings, action_id: int, *, store: Store, apply: bool, trigger: str,
             ignore_window: bool = False, confirm: Confirm | None = None,
             now: datetime | None = None, options: RemediateOptions | None = None,
             progress: Progress | None = None,
             on_plan: Callable[[Plan], None] | None = None,
             lock: HeldLock | None = None) -> RemediationResult:
    """Restore the values recorded before action `action_id`, with the same care as remediate.

    Refused when an object changed since the action (its fields no longer hold what the action
    set), so a rollback never overwrites someone else's later edit.
    """
    opts = options or RemediateOptions()
    store.ensure_schema()
    row = store.remediation(action_id)
    if row is None:
        raise RemediationRefused(f"there is no remediation action {action_id} in the database")
    applied = _rollbackable(row, store)
    cs = _cluster(settings, row.cluster)
    before = _scan(cs)
    _snapshot(before)
    with _planning(cs.name):
        writer = KubeWriter(cs)
    with writer:
        with _planning(cs.name):
            changes = [c for c in (_restoring(writer, obj, action_id)
                                   for obj in reversed(applied)) if c is not None]
            plan = _assemble(cs, before, writer, tuple(changes), notes=(), mode="rollback",
                             rollback_of=action_id, ignore_window=ignore_window, now=now,
                             options=opts)
        return _carry_out(settings, cs, plan, writer=writer, store=store, apply=apply,
                          trigger=trigger, confirm=confirm, options=opts, progress=progress,
                          on_plan=on_plan,
                          noop=f"the values of action {action_id} are already restored",
                          lock=lock)


def _restoring(writer: KubeWriter, obj: Mapping[str, Any], action_id: int
               ) -> ObjectChange | None:
    """The change that puts one recorded object back (None: it already holds those values)."""
    ref = ObjectRef(str(obj["apiVersion"]), str(obj["kind"]), str(obj["name"]),
                    obj.get("namespace"))
    current = writer.read(ref)
    if current is None:
        raise RemediationRefused(f"{ref} no longer exists; nothing to restore it into")
    container = obj.get("container")
    fields = tuple(str(f) for f in obj["fields"])
    now = _values(ref, current, container, fields)
    before, after = obj["before"], obj["after"]
    wanted = {f: before.get(f, REMOVE) for f in fields}
    if all(now.get(f, REMOVE) == wanted[f] for f in fields):
        return None  # already restored (an earlier rollback that did not finish)
    drift = [f for f in fields if now.get(f, REMOVE) != after.get(f, REMOVE)]
    if drift:
        shown = "; ".join(f"{f} is {_show(now.get(f, REMOVE))}, action {action_id} set "
                          f"{_show(after.get(f, REMOVE))}" for f in drift)
        raise RemediationRefused(f"{ref} changed since action {action_id} ({shown}); refusing "
                                 "to overwrite that change")
    return _object_change(ref, current, container, wanted,
                          reason=f"restore the values recorded before action {action_id}")


def _carry_out(settings: Settings, cs: ClusterSettings, plan: Plan, *, writer: KubeWriter,
               store: Store, apply: bool, trigger: str, confirm: Confirm | None,
               options: RemediateOptions, progress: Progress | None,
               on_plan: Callable[[Plan], None] | None, noop: str,
               lock: HeldLock | None = None) -> RemediationResult:
    if on_plan is not None:
        on_plan(plan)
    if not plan.changes:
        return RemediationResult(plan=plan, outcome="noop", message=noop)
    if not apply:
        return RemediationResult(plan=plan, outcome="dry_run",
                                 message="dry run: nothing was changed")
    _admit(plan, store=store, trigger=trigger, confirm=confirm)
    return _execute(settings, cs, plan, writer=writer, store=store, trigger=trigger,
                    options=options, progress=progress, lock=lock)


@contextmanager
def _planning(cluster: str) -> Iterator[None]:
    """Planning reads the cluster; an API failure there means no change was possible."""
    try:
        yield
    except ClusterError as exc:
        raise RemediationError(f"cluster {cluster}: cannot plan the change, nothing was "
                               f"changed: {exc}") from exc


def _rollbackable(row: RemediationAction, store: Store) -> list[dict[str, Any]]:
    if row.mode != "apply":
        raise RemediationRefused(f"action {row.id} is a {row.mode}; only an applied "
                                 "remediation can be rolled back")
    applied = [o for o in row.objects or [] if o.get("applied")]
    if not applied:
        raise RemediationRefused(f"action {row.id} ({row.outcome}) changed nothing; there is "
                                 "nothing to roll back")
    done = [r for r in store.remediations(row.cluster, limit=500)
            if r.rollback_of == row.id and r.outcome == "rolled_back"]
    if done:
        raise RemediationRefused(f"action {row.id} was already rolled back by action "
                                 f"{done[0].id}")
    return applied


def _cluster(settings: Settings, name: str) -> ClusterSettings:
    return settings.select([name]).clusters[0]


def _scan(cs: ClusterSettings) -> ClusterResult:
    log.info("remediate %s: scanning to plan", cs.name)
    return scan_cluster(cs)


def _snapshot(result: ClusterResult) -> ClusterSnapshot:
    if result.snapshot is None:
        raise RemediationError(f"cluster {result.cluster} cannot be read, so no change can be "
                               f"planned: {result.error}")
    return result.snapshot


def _noop_message(before: ClusterResult) -> str:
    if before.status == "compliant":
        return "the cluster is compliant: nothing to change"
    return (f"the metrics endpoint is already declared off on every node, yet the cluster is "
            f"{before.status.replace('_', '-')}; what is left (see the findings) is not a "
            "setting remediation changes")


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
    return ObjectRef(_OPERATOR_API, kind, name)


_ORDER = {"FelixConfiguration": 0, "Installation": 1, "DaemonSet": 2}


def _materialize(snapshot: ClusterSnapshot, fixes: Sequence[Fix],
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
        change = _object_change(ref, obj, container, wanted, reason="; ".join(reasons))
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


def _values(ref: ObjectRef, obj: Mapping[str, Any], container: str | None,
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


def _object_change(ref: ObjectRef, obj: Mapping[str, Any], container: str | None,
                   wanted: Mapping[str, Any], *, reason: str) -> ObjectChange | None:
    """The patch that sets `wanted` on `obj` (None when it already holds it)."""
    current = _values(ref, obj, container, list(wanted))
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


def _field_path(change: ObjectChange, f: str) -> str:
    if f.startswith(ENV):
        return (f"spec.template.spec.containers[name={change.container}]"
                f".env[name={f[len(ENV):]}]")
    if f.startswith(ANNOTATION):
        return f"metadata.annotations[{f[len(ANNOTATION):]}]"
    return "spec." + f[len("spec/"):]


# --- guards, dry run, rollout estimate --------------------------------------------------------


def _assemble(cs: ClusterSettings, before: ClusterResult, writer: KubeWriter,
              changes: tuple[ObjectChange, ...], *, notes: Sequence[str], mode: Mode,
              rollback_of: int | None, ignore_window: bool, now: datetime | None,
              options: RemediateOptions) -> Plan:
    snapshot = _snapshot(before)
    when = now or datetime.now(UTC)
    rollout = _rollout_plan(snapshot, changes, before) if changes else None
    dry = tuple(_dry_run(writer, c) for c in changes)
    guards = _guards(cs, snapshot, rollout, dry, ignore_window=ignore_window, now=when,
                     max_not_ready=options.max_not_ready_pct)
    extra = list(notes)
    window = cs.remediation.window
    if rollout is not None and window is not None and not ignore_window:
        left = window_left(window, when)
        if left is not None and rollout.estimate_seconds > left.total_seconds():
            extra.append(f"the estimated {human_duration(rollout.estimate_seconds)} exceed the "
                         f"{human_duration(left.total_seconds())} left in the window {window.text}")
    if any(c.ref.kind == "Installation" for c in changes):
        extra.append("the operator re-renders the DaemonSet from the Installation; the dry run "
                     "cannot show that second step")
    return Plan(cluster=cs.name, mode=mode, install=snapshot.install, before=before,
                changes=changes, rollout=rollout, guards=guards, dry_run=dry,
                notes=tuple(extra), rollback_of=rollback_of)


def _rollout_plan(snapshot: ClusterSnapshot, changes: Sequence[ObjectChange],
                  before: ClusterResult) -> RolloutPlan:
    r = snapshot.rollout
    pods = r.desired or len(snapshot.pods)
    batch = max_unavailable(r.max_unavailable, pods)
    if any(c.restarts_pods for c in changes):
        how = ("the operator re-renders the calico-node DaemonSet, which then rolls"
               if any(c.ref.kind == "Installation" for c in changes)
               else "the calico-node DaemonSet rolls")
        estimate = math.ceil(pods / batch) * POD_RESTART_SECONDS if pods else 0.0
        return RolloutPlan(restarts_pods=True, pods=pods, nodes=pods, strategy=r.strategy,
                           max_unavailable=r.max_unavailable, batch=batch,
                           estimate_seconds=estimate, how=how)
    affected = {n.node for n in before.nodes if n.declared.enabled is not False}
    return RolloutPlan(restarts_pods=False, pods=0, nodes=len(affected) or len(snapshot.nodes),
                       strategy=r.strategy, max_unavailable=r.max_unavailable, batch=batch,
                       estimate_seconds=FELIX_RESTART_SECONDS,
                       how="Felix restarts inside its pod on each affected node (no pod "
                       "restarts)")


def max_unavailable(raw: str | None, desired: int) -> int:
    """A RollingUpdate's maxUnavailable as a pod count (percentages round up, as the
    DaemonSet controller does), at least 1."""
    if raw is None:
        return 1
    text = raw.strip()
    try:
        if text.endswith("%"):
            return max(1, math.ceil(desired * float(text[:-1]) / 100))
        return max(1, int(text))
    except ValueError:
        return 1


def _dry_run(writer: KubeWriter, change: ObjectChange) -> DryRun:
    try:
        current = writer.read(change.ref)
        answer = writer.patch(change.ref, change.patch, patch_type=change.patch_type,
                              dry_run=True)
    except ClusterError as exc:
        return DryRun(ref=change.ref, accepted=False, error=str(exc))
    if current is None:
        return DryRun(ref=change.ref, accepted=False, error="the object does not exist")
    changed = tuple(diff_paths(current, answer))
    expected = [_field_path(change, f) for f in change.fields]
    unexpected = tuple(p for p in changed
                       if not any(p == e or p.startswith((e + ".", e + "[")) for e in expected))
    return DryRun(ref=change.ref, accepted=True,
                  generation_before=_generation(current), generation_after=_generation(answer),
                  changed=changed, unexpected=unexpected)


def _generation(obj: Mapping[str, Any]) -> int | None:
    value = (obj.get("metadata") or {}).get("generation")
    return int(value) if isinstance(value, int) else None


def diff_paths(old: Any, new: Any, path: str = "") -> Iterator[str]:
    """Paths where two objects differ, ignoring status and server bookkeeping metadata.

    List items that are objects with a `name` are matched by name (`env[name=X]`), as the
    strategic merge patch matches them; other lists by position.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if not path and key == "status":
                continue
            if path == "metadata" and key in _IGNORED_META:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if path in ("metadata.annotations", "metadata.labels"):
                sub = f"{path}[{key}]"
            if key not in old or key not in new:
                yield sub
            else:
                yield from diff_paths(old[key], new[key], sub)
        return
    if isinstance(old, list) and isinstance(new, list):
        named = all(isinstance(i, dict) and "name" in i for i in [*old, *new])
        if named:
            olds = {str(i["name"]): i for i in old}
            news = {str(i["name"]): i for i in new}
            order_changed = [n for n in olds if n in news] != [n for n in news if n in olds]
            for name in list(dict.fromkeys([*olds, *news])):
                sub = f"{path}[name={name}]"
                if name not in olds or name not in news:
                    yield sub
                else:
                    yield from diff_paths(olds[name], news[name], sub)
            if order_changed:
                yield f"{path}(order)"
            return
        if len(old) != len(new):
            yield path
            return
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from diff_paths(a, b, f"{path}[{i}]")
        return
    if old != new:
        yield path


def _guards(cs: ClusterSettings, snapshot: ClusterSnapshot, rollout: RolloutPlan | None,
            dry: Sequence[DryRun], *, ignore_window: bool, now: datetime,
            max_not_ready: float) -> tuple[Guard, ...]:
    rem = cs.remediation
    guards = [Guard("enabled", rem.enabled,
                    "remediation.enabled is true" if rem.enabled else
                    f"remediation is not enabled for cluster {cs.name} (set remediation.enabled:"
                    " true in its configuration)")]
    if ignore_window:
        guards.append(Guard("window", True, "maintenance window ignored (--ignore-window)"))
    elif rem.window is None:
        guards.append(Guard("window", False, "no maintenance window is configured "
                            "(remediation.window); pass --ignore-window to remediate now"))
    elif in_window(rem.window, now):
        guards.append(Guard("window", True, f"inside the maintenance window {rem.window.text}"))
    else:
        tz = ZoneInfo(rem.window.tz)
        opens = next_window_start(rem.window, now)
        guards.append(Guard("window", False, f"outside the maintenance window {rem.window.text} "
                            f"(now {now.astimezone(tz):%a %Y-%m-%d %H:%M %Z}; next opens "
                            f"{opens:%a %Y-%m-%d %H:%M %Z})"))
    r = snapshot.rollout
    counts = (f"generation {r.generation}, observed {r.observed_generation}; {r.updated} of "
              f"{r.desired} pods updated, {r.available} available")
    busy = r.observed_generation < r.generation or r.updated < r.desired
    guards.append(Guard("rollout", not busy,
                        f"a calico-node rollout is in progress ({counts})" if busy else
                        f"no calico-node rollout in progress ({counts})"))
    nodes = snapshot.nodes
    not_ready = [n.name for n in nodes if n.ready is not True]
    share = 100.0 * len(not_ready) / len(nodes) if nodes else 0.0
    names = f": {', '.join(not_ready[:5])}{', ...' if len(not_ready) > 5 else ''}" \
        if not_ready else ""
    guards.append(Guard("not-ready", share <= max_not_ready,
                        f"{len(not_ready)} of {len(nodes)} nodes NotReady ({share:.0f}%, limit "
                        f"{max_not_ready:g}%){names}"))
    if rollout is not None and rollout.restarts_pods:
        on_delete = rollout.strategy == "OnDelete"
        guards.append(Guard("strategy", not on_delete,
                            "updateStrategy OnDelete: pods pick a change up only when deleted, "
                            "and felixscan does not delete pods" if on_delete else
                            f"updateStrategy {rollout.strategy}"))
    bad = [d for d in dry if not d.accepted or d.unexpected]
    if dry:
        detail = "; ".join(f"{d.ref}: {d.error}" if not d.accepted else
                           f"{d.ref}: the server's answer also changes {', '.join(d.unexpected)}"
                           for d in bad) or "the API server accepted every change (dryRun=All)"
        guards.append(Guard("dry-run", not bad, detail))
    return tuple(guards)


def in_window(window: MaintenanceWindow, now: datetime) -> bool:
    """Whether `now` is inside the weekly window; a window past midnight belongs to the day
    it starts on (`Sat 23:00-02:00` covers Sunday 01:00)."""
    local = now.astimezone(ZoneInfo(window.tz))
    t = local.time().replace(tzinfo=None)
    day = local.weekday()
    if window.start < window.end:
        return day in window.days and window.start <= t < window.end
    return (day in window.days and t >= window.start) or \
        ((day - 1) % 7 in window.days and t < window.end)


def next_window_start(window: MaintenanceWindow, now: datetime) -> datetime:
    tz = ZoneInfo(window.tz)
    local = now.astimezone(tz)
    for offset in range(8):
        day = (local + timedelta(days=offset)).date()
        if day.weekday() in window.days:
            start = datetime.combine(day, window.start, tzinfo=tz)
            if start > local:
                return start
    raise AssertionError("a weekly window opens within 8 days")


def window_left(window: MaintenanceWindow, now: datetime) -> timedelta | None:
    """How long the window stays open from `now` (None outside it)."""
    if not in_window(window, now):
        return None
    tz = ZoneInfo(window.tz)
    local = now.astimezone(tz)
    end = datetime.combine(local.date(), window.end, tzinfo=tz)
    if end <= local:
        end += timedelta(days=1)
    return end - local


def human_duration(value: float) -> str:
    seconds = round(value)
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _show(value: Any) -> str:
    return "absent" if value is REMOVE else json.dumps(value, sort_keys=True)


# --- applying --------------------------------------------------------------------------------


def _admit(plan: Plan, *, store: Store, trigger: str, confirm: Confirm | None) -> None:
    """Refuse (recorded) when a guard fails; then ask `confirm`, if given."""
    refusals = plan.refusals
    if refusals:
        message = "refused: " + "; ".join(f"{g.name}: {g.detail}" for g in refusals)
        now = datetime.now(UTC)
        action_id = store.add_remediation(
            cluster=plan.cluster, started_at=now, finished_at=now, trigger=trigger[:64],
            install=plan.install, mode=plan.mode, outcome="refused", message=message,
            objects=[c.record(applied=False) for c in plan.changes], verify_run_id=None,
            rollback_of=plan.rollback_of)
        log.warning("remediate %s: %s (action %s)", plan.cluster, message, action_id)
        raise RemediationRefused(message + "; nothing was changed", action_id=action_id)
    if confirm is not None and not confirm(plan):
        raise RemediationRefused("not confirmed; nothing was changed")


@dataclass
class _Run:
    """The action row being written while a remediation runs."""

    store: Store
    action_id: int
    objects: list[dict[str, Any]] = field(default_factory=list)

    def update(self, **values: Any) -> None:
        self.store.update_remediation(self.action_id, **values)


def _execute(settings: Settings, cs: ClusterSettings, plan: Plan, *, writer: KubeWriter,
             store: Store, trigger: str, options: RemediateOptions,
             progress: Progress | None, lock: HeldLock | None = None) -> RemediationResult:
    run = _Run(store, store.add_remediation(
        cluster=plan.cluster, started_at=datetime.now(UTC), finished_at=None,
        trigger=trigger[:64], install=plan.install, mode=plan.mode, outcome="applying",
        message=None, objects=[], verify_run_id=None, rollback_of=plan.rollback_of))
    log.info("remediate %s: action %s applying %d change(s)", plan.cluster, run.action_id,
             len(plan.changes))
    try:
        return _steps(settings, cs, plan, run, writer=writer, options=options,
                      progress=progress, lock=lock)
    except BaseException as exc:
        # Ctrl-C or an error nobody expected: what was already patched stays on record.
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped by an error " \
            f"({type(exc).__name__}: {exc})"
        changed = sum(1 for o in run.objects if o.get("applied"))
        run.update(outcome="failed", finished_at=datetime.now(UTC),
                   message=f"{why} before the remediation finished; {changed} object(s) were "
                   f"changed" + (_undo(plan, run) if changed else ""))
        raise


def _undo(plan: Plan, run: _Run) -> str:
    if plan.mode == "apply":
        return f"; roll back with --rollback {run.action_id}"
    return f"; run --rollback {plan.rollback_of} again to finish restoring"


def _steps(settings: Settings, cs: ClusterSettings, plan: Plan, run: _Run, *,
           writer: KubeWriter, options: RemediateOptions,
           progress: Progress | None, lock: HeldLock | None = None) -> RemediationResult:
    def finish(outcome: Outcome, message: str, *, rollout: RolloutReport | None = None,
               verify: tuple[int, ClusterResult] | None = None) -> RemediationResult:
        run.update(outcome=outcome, message=message, finished_at=datetime.now(UTC),
                   verify_run_id=verify[0] if verify else None)
        log.info("remediate %s: action %s %s: %s", plan.cluster, run.action_id, outcome,
                 message)
        return RemediationResult(plan=plan, outcome=outcome, message=message,
                                 action_id=run.action_id, rollout=rollout,
                                 verify_run_id=verify[0] if verify else None,
                                 verify=verify[1] if verify else None)

    ds_generation: int | None = None
    restarts = False
    for change in plan.changes:
        if lock is not None and lock.lost:
            changed = f"; the changes before it are recorded{_undo(plan, run)}" \
                if any(o.get("applied") for o in run.objects) else ""
            return finish("failed", f"{change.ref}: not changed: the cluster's lock was lost, "
                          f"so another felixscan may be working on it{changed}")
        try:
            done, answer, conflicts = _patch(writer, change, attempts=options.conflict_attempts)
        except ClusterError as exc:
            changed = f"; the changes before it are recorded{_undo(plan, run)}" \
                if any(o.get("applied") for o in run.objects) else ""
            return finish("failed", f"{change.ref}: the change was not made: {exc}{changed}")
        if done is None:
            run.objects.append(change.record(applied=False, conflicts=conflicts,
                                             skipped="already holds the wanted values"))
        else:
            meta = answer.get("metadata") or {}
            run.objects.append(done.record(applied=True, conflicts=conflicts,
                                           resourceVersion_after=meta.get("resourceVersion"),
                                           generation_after=meta.get("generation")))
            restarts = restarts or done.restarts_pods
            if done.ref.kind == "DaemonSet":
                ds_generation = _generation(answer)
        run.update(objects=copy.deepcopy(run.objects))

    report = None
    if restarts:
        run.update(outcome="rolling_out")
        report = follow_rollout(writer, plan, target_generation=ds_generation, options=options,
                                progress=progress)
        if not report.complete:
            return finish("failed", report.message, rollout=report)

    run.update(outcome="verifying")
    settle = options.settle_timeout if options.settle_timeout is not None else \
        min(60.0, options.rollout_timeout or 60.0)
    # A rollback re-enables the endpoint on purpose: nothing to wait for before the scan.
    verify = _verify(settings, cs, settle=settle if plan.mode == "apply" else 0.0,
                     options=options, store=run.store, lock=lock)
    run_id, result = verify
    counts = {v: sum(1 for n in result.nodes if n.verdict == v) for v in ("pass", "fail",
                                                                           "unknown")}
    summary = (f"verification scan {run_id}: {result.status.replace('_', '-')} "
               f"({counts['pass']} pass, {counts['fail']} fail, {counts['unknown']} unknown)")
    if plan.mode == "rollback":
        return finish("rolled_back", f"previous values restored; {summary}", rollout=report,
                      verify=verify)
    if result.status == "compliant":
        return finish("succeeded", summary, rollout=report, verify=verify)
    worst = [f"{f.id}{' ' + f.node if f.node else ''}: {f.message}"
             for f in result.findings if f.severity in ("critical", "high")]
    more = f" (+{len(worst) - 3} more findings)" if len(worst) > 3 else ""
    return finish("failed", f"{summary}: {'; '.join(worst[:3])}{more}" if worst else summary,
                  rollout=report, verify=verify)


def _patch(writer: KubeWriter, change: ObjectChange, *,
           attempts: int) -> tuple[ObjectChange | None, dict[str, Any], int]:
    """PATCH with the planned precondition; on 409 re-read, re-plan this object, try again.

    Returns the change as finally sent (None when the fresh object already holds the wanted
    values), the server's answer and the number of conflicts met.
    """
    conflicts = 0
    wanted = {f: change.after.get(f, REMOVE) for f in change.fields}
    current: ObjectChange | None = change
    while True:
        assert current is not None
        try:
            answer = writer.patch(current.ref, current.patch, patch_type=current.patch_type,
                                  dry_run=False)
            return current, answer, conflicts
        except ApiUnreachable:
            # The write may have happened before the connection broke: the object tells.
            fresh = writer.read(current.ref)
            if fresh is not None and _object_change(current.ref, fresh, current.container,
                                                    wanted, reason="") is None:
                return current, fresh, conflicts
            raise
        except ClusterError as exc:
            if getattr(exc, "status", None) != 409 or conflicts + 1 >= attempts:
                raise
            conflicts += 1
            log.info("%s changed since it was read (409 Conflict); reading it again",
                     current.ref)
        fresh = writer.read(current.ref)
        if fresh is None:
            raise RemediationError(f"{current.ref} disappeared while remediating")
        current = _object_change(current.ref, fresh, current.container, wanted,
                                 reason=current.reason)
        if current is None:
            return None, fresh, conflicts


def follow_rollout(writer: KubeWriter, plan: Plan, *, target_generation: int | None,
                   options: RemediateOptions, progress: Progress | None = None,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> RolloutReport:
    """Poll the DaemonSet until the new template is observed and rolled out, or time runs out.

    Done when observedGeneration reached the template's generation, every desired pod is
    updated and as many are available as before the change. Without a target generation (an
    operator install) the first generation above the planned one is awaited first.
    """
    snapshot = _snapshot(plan.before)
    ref = ObjectRef("apps/v1", "DaemonSet", snapshot.daemonset, snapshot.namespace)
    rollout_plan = plan.rollout
    estimate = rollout_plan.estimate_seconds if rollout_plan else 0.0
    timeout = options.rollout_timeout if options.rollout_timeout is not None \
        else max(300.0, 2 * estimate)
    floor = snapshot.rollout.available
    generation_before = snapshot.rollout.generation
    start = clock()
    delay = options.poll_initial
    last: RolloutProgress | None = None
    api_error: str | None = None
    while True:
        elapsed = clock() - start
        try:
            ds = writer.read(ref)
        except ClusterError as exc:
            # A blip of the API during a rollout is not a failed rollout; the timeout decides.
            ds, api_error = None, str(exc)
        if ds is not None:
            api_error = None
            meta, status = ds.get("metadata") or {}, ds.get("status") or {}
            generation = int(meta.get("generation") or 0)
            if target_generation is None and generation > generation_before:
                target_generation = generation
            now = RolloutProgress(
                generation=generation, observed_generation=int(status.get(
                    "observedGeneration") or 0), target_generation=target_generation,
                desired=int(status.get("desiredNumberScheduled") or 0),
                updated=int(status.get("updatedNumberScheduled") or 0),
                available=int(status.get("numberAvailable") or 0),
                elapsed=elapsed, timeout=timeout)
            if progress is not None and (last is None or replace(last, elapsed=0) !=
                                         replace(now, elapsed=0)):
                progress(now)
            last = now
            if (target_generation is not None and now.observed_generation >= target_generation
                    and now.updated >= now.desired
                    and now.available >= min(now.desired, floor)):
                return RolloutReport(complete=True, seconds=elapsed, last=now,
                                     message=f"rolled out in {human_duration(elapsed)}: "
                                     f"{now.updated} of {now.desired} pods updated, "
                                     f"{now.available} available")
        if elapsed >= timeout:
            return RolloutReport(complete=False, seconds=elapsed, last=last,
                                 message=_stall_message(writer.settings, plan, last, timeout,
                                                        api_error))
        sleep(min(delay, max(0.0, timeout - elapsed)))
        delay = min(delay * 1.5, options.poll_max)


def _stall_message(cs: ClusterSettings, plan: Plan, last: RolloutProgress | None,
                   timeout: float, api_error: str | None) -> str:
    head = f"the rollout did not finish within {human_duration(timeout)}"
    if last is None:
        seen = f"the DaemonSet could not be read ({api_error})"
    elif last.target_generation is None:
        seen = (f"the operator did not update the DaemonSet (generation still "
                f"{last.generation})")
    else:
        seen = (f"generation {last.generation}, observed {last.observed_generation}; "
                f"{last.updated} of {last.desired} pods updated, {last.available} available")
    detail = ""
    snapshot = _snapshot(plan.before)
    try:
        # One more read-only collection, to name the pods and nodes the rollout waits on.
        seen_pods = _pods_view(cs)
        if seen_pods:
            detail = "; " + seen_pods
    except ClusterError as exc:
        detail = f"; (pods could not be listed: {exc})"
    undo = ("roll back with --rollback" if plan.mode == "apply" else
            f"run --rollback {plan.rollback_of} again")
    return (f"{head}: {seen}{detail}. felixscan stopped here and changed nothing further in "
            f"{snapshot.namespace}/{snapshot.daemonset}; let the rollout finish or {undo}")


def _pods_view(cs: ClusterSettings) -> str:
    snap = collect(cs)
    current = snap.rollout.current_revision
    old = [f"{p.name} on {p.node}" for p in snap.pods if p.revision != current]
    not_ready = [f"{p.name} on {p.node}" for p in snap.pods if not p.ready]
    nodes = [n.name for n in snap.nodes if n.ready is not True]
    parts = []
    if old:
        parts.append(f"pods on an old revision: {_some(old)}")
    if not_ready:
        parts.append(f"pods not ready: {_some(not_ready)}")
    if nodes:
        parts.append(f"nodes NotReady: {_some(nodes)}")
    return "; ".join(parts)


def _some(items: Sequence[str], limit: int = 5) -> str:
    extra = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + extra


def _verify(settings: Settings, cs: ClusterSettings, *, settle: float,
            options: RemediateOptions, store: Store,
            lock: HeldLock | None = None) -> tuple[int, ClusterResult]:
    """Wait (probing only) up to `settle` seconds for compliance, then store a normal scan."""
    if settle > 0:
        deadline = time.monotonic() + settle
        delay = options.poll_initial
        while True:
            probe = scan_cluster(cs)
            if probe.status == "compliant" or time.monotonic() >= deadline:
                break
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, options.poll_max)
    outcome = run_scan(settings.select([cs.name]), store=store, trigger="remediation",
                       held={cs.name: lock} if lock is not None else None)
    return outcome.scan_id, outcome.clusters[0]
