"""Guards before any write: server-side dry runs, the rollout estimate, the maintenance window,
the not-ready budget, and the human-readable durations they report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from scanner.core.config import ClusterSettings, MaintenanceWindow
from scanner.core.errors import ClusterError, RemediationRefused
from scanner.core.records import FELIX, KUBE_CONTROLLERS, TYPHA, ClusterResult, ClusterSnapshot
from scanner.kube.write import KubeWriter, ObjectRef
from scanner.remediate.plan import field_path, snapshot_of
from scanner.remediate.records import (
    FELIX_RESTART_SECONDS,
    IGNORED_META,
    KCC_KIND,
    POD_RESTART_SECONDS,
    SPEC_KCC_PORT,
    DryRun,
    Guard,
    Mode,
    ObjectChange,
    Plan,
    RemediateOptions,
    RolloutPlan,
)

log = logging.getLogger(__name__)


# --- guards, dry run, rollout estimate --------------------------------------------------------


def assemble(cs: ClusterSettings, before: ClusterResult, writer: KubeWriter,
              changes: tuple[ObjectChange, ...], *, notes: Sequence[str], mode: Mode,
              rollback_of: int | None, ignore_window: bool, now: datetime | None,
              options: RemediateOptions, controls: tuple[str, ...] = (FELIX,)) -> Plan:
    snapshot = snapshot_of(before)
    when = now or datetime.now(UTC)
    rollouts: list[RolloutPlan] = []
    extra_guards: list[Guard] = []
    for control in dict.fromkeys(c.control for c in changes):
        mine = [c for c in changes if c.control == control]
        if control == TYPHA:
            found, guards_of = _typha_rollout(snapshot, mine, writer)
            rollouts.append(found)
            extra_guards.extend(guards_of)
        elif control == KUBE_CONTROLLERS:
            rollouts.append(_kube_controllers_restart(snapshot, mine, writer))
        else:
            rollouts.append(_rollout_plan(snapshot, mine, before))
    felix = next((r for r in rollouts if r.control == FELIX), None)
    dry = tuple(_dry_run(writer, c) for c in changes)
    guards = _guards(cs, snapshot, felix, dry, ignore_window=ignore_window, now=when,
                     max_not_ready=options.max_not_ready_pct, extra=extra_guards)
    extra = list(notes)
    window = cs.remediation.window
    total = sum(r.estimate_seconds for r in rollouts)
    if rollouts and window is not None and not ignore_window:
        left = window_left(window, when)
        if left is not None and total > left.total_seconds():
            extra.append(f"the estimated {human_duration(total)} exceed the "
                         f"{human_duration(left.total_seconds())} left in the window {window.text}")
    for c in changes:
        if c.ref.kind == "Installation":
            what = ("the calico-typha Deployment" if c.control == TYPHA
                    else "the calico-node DaemonSet")
            extra.append(f"{c.control}: the operator re-renders {what} from the Installation; "
                         "the dry run cannot show that second step")
    return Plan(cluster=cs.name, mode=mode, install=snapshot.install, before=before,
                changes=changes, rollout=felix, guards=guards, dry_run=dry,
                notes=tuple(dict.fromkeys(extra)), rollback_of=rollback_of, controls=controls,
                rollouts=tuple(rollouts))


def _rollout_plan(snapshot: ClusterSnapshot, changes: Sequence[ObjectChange],
                  before: ClusterResult) -> RolloutPlan:
    r = snapshot.rollout
    pods = r.desired or len(snapshot.pods)
    batch = max_unavailable(r.max_unavailable, pods)
    workload = f"DaemonSet {snapshot.namespace}/{snapshot.daemonset}"
    if any(c.restarts_pods for c in changes):
        how = ("the operator re-renders the calico-node DaemonSet, which then rolls"
               if any(c.ref.kind == "Installation" for c in changes)
               else "the calico-node DaemonSet rolls")
        estimate = math.ceil(pods / batch) * POD_RESTART_SECONDS if pods else 0.0
        return RolloutPlan(restarts_pods=True, pods=pods, nodes=pods, strategy=r.strategy,
                           max_unavailable=r.max_unavailable, batch=batch,
                           estimate_seconds=estimate, how=how, control=FELIX,
                           follow="daemonset", workload=workload, generation=r.generation,
                           available=r.available)
    affected = {n.node for n in before.nodes if n.declared.enabled is not False}
    return RolloutPlan(restarts_pods=False, pods=0, nodes=len(affected) or len(snapshot.nodes),
                       strategy=r.strategy, max_unavailable=r.max_unavailable, batch=batch,
                       estimate_seconds=FELIX_RESTART_SECONDS,
                       how="Felix restarts inside its pod on each affected node (no pod "
                       "restarts)", control=FELIX, follow="none", workload=workload)


def _typha_rollout(snapshot: ClusterSnapshot, changes: Sequence[ObjectChange],
                   writer: KubeWriter) -> tuple[RolloutPlan, list[Guard]]:
    """The calico-typha Deployment's rollout, and the guards on it (no rollout in progress, a
    RollingUpdate strategy), from the Deployment as it is now."""
    component = snapshot.components[TYPHA]
    ref = ObjectRef("apps/v1", "Deployment", component.deployment, component.namespace)
    obj = writer.read(ref)
    if obj is None:
        raise RemediationRefused(f"{ref} disappeared since the scan; scan again")
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    raw_replicas = spec.get("replicas")
    replicas = int(raw_replicas) if isinstance(raw_replicas, int) else 1
    strategy = spec.get("strategy") or {}
    kind = str(strategy.get("type") or "RollingUpdate")
    rolling = strategy.get("rollingUpdate") or {}
    unavailable_raw = str(rolling.get("maxUnavailable", "25%"))
    surge_raw = str(rolling.get("maxSurge", "25%"))
    # The Deployment controller rounds maxSurge up and maxUnavailable down
    # (k8s.io/kubernetes pkg/controller/deployment/util ResolveFenceposts).
    surge = _deployment_count(surge_raw, replicas, up=True)
    unavailable = _deployment_count(unavailable_raw, replicas, up=False)
    batch = replicas if kind == "Recreate" else max(1, min(replicas, surge + unavailable))
    estimate = math.ceil(replicas / batch) * POD_RESTART_SECONDS if replicas else 0.0
    how = ("the operator re-renders the calico-typha Deployment, which then rolls"
           if any(c.ref.kind == "Installation" for c in changes)
           else "the calico-typha Deployment rolls")
    generation = int(meta.get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    plan = RolloutPlan(
        restarts_pods=True, pods=replicas,
        nodes=len({p.node for p in component.pods if p.node}) or replicas, strategy=kind,
        max_unavailable=unavailable_raw if kind != "Recreate" else None, batch=batch,
        estimate_seconds=estimate, how=how, control=TYPHA, follow="deployment",
        workload=str(ref), generation=generation, available=available,
        max_surge=surge_raw if kind != "Recreate" else None)
    counts = (f"generation {generation}, observed {observed}; {updated} of {replicas} pods "
              f"updated, {total} in all, {available} available")
    busy = observed < generation or updated < replicas or total > updated
    guards = [Guard("typha-rollout", not busy,
                    f"a {ref} rollout is in progress ({counts})" if busy else
                    f"no {ref} rollout in progress ({counts})"),
              Guard("typha-strategy", kind != "Recreate",
                    f"{ref} has strategy Recreate: every Typha pod would stop at once and "
                    "every Felix lose its Typha connection; felixscan only rolls it "
                    "(RollingUpdate)" if kind == "Recreate" else f"{ref} strategy {kind}")]
    return plan, guards


def _deployment_count(raw: str, replicas: int, *, up: bool) -> int:
    text = raw.strip()
    try:
        if text.endswith("%"):
            share = replicas * float(text[:-1]) / 100
            return math.ceil(share) if up else math.floor(share)
        return max(0, int(text))
    except ValueError:
        return 1


def _kube_controllers_restart(snapshot: ClusterSnapshot, changes: Sequence[ObjectChange],
                              writer: KubeWriter) -> RolloutPlan:
    """kube-controllers exits when the port it runs with changes (run.go: a new run config
    restarts it, exit 129) and the kubelet restarts its container in the same pod; the pods
    and their restart counts are noted now, to see that happen."""
    component = snapshot.components[KUBE_CONTROLLERS]
    ref = ObjectRef("apps/v1", "Deployment", component.deployment, component.namespace)
    workload = str(ref)
    # Absent and 0 are both "off" to kube-controllers: the run config does not change, so
    # nothing restarts (and nothing listens either way).
    same = all(not c.create and c.before.get(SPEC_KCC_PORT, None) in (None, 0)
               and c.after.get(SPEC_KCC_PORT, None) in (None, 0) for c in changes
               if c.ref.kind == KCC_KIND)
    if same:
        return RolloutPlan(restarts_pods=False, pods=0, nodes=0, strategy="", max_unavailable=None,
                           batch=1, estimate_seconds=0.0, control=KUBE_CONTROLLERS, follow="none",
                           workload=workload,
                           how="kube-controllers already runs with no metrics port (absent "
                           "and 0 are both off): nothing restarts")
    obj = writer.read(ref)
    selector = dict(((obj or {}).get("spec") or {}).get("selector", {}).get("matchLabels") or {})
    restarts: dict[str, int] = {}
    if selector:
        for pod in writer.pods(component.namespace, selector):
            name = str((pod.get("metadata") or {}).get("name"))
            restarts[name] = _restart_count(pod, component.container)
    return RolloutPlan(
        restarts_pods=False, pods=len(restarts), nodes=len(restarts), strategy="restart",
        max_unavailable=None, batch=max(1, len(restarts)), estimate_seconds=POD_RESTART_SECONDS,
        how="calico-kube-controllers exits when KubeControllersConfiguration default changes "
        "and the kubelet restarts its container (the pod stays)", control=KUBE_CONTROLLERS,
        follow="restart", workload=workload, restarts=restarts, selector=selector,
        namespace=component.namespace, container=component.container)


def _restart_count(pod: Mapping[str, Any], container: str) -> int:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return int(status.get("restartCount") or 0)
    return 0


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
    if change.create:
        return _dry_run_create(writer, change)
    try:
        current = writer.read(change.ref)
        answer = writer.patch(change.ref, change.patch, patch_type=change.patch_type,
                              dry_run=True)
    except ClusterError as exc:
        return DryRun(ref=change.ref, accepted=False, error=str(exc))
    if current is None:
        return DryRun(ref=change.ref, accepted=False, error="the object does not exist")
    changed = tuple(diff_paths(current, answer))
    expected = [field_path(change, f) for f in change.fields]
    unexpected = tuple(p for p in changed
                       if not any(p == e or p.startswith((e + ".", e + "[")) for e in expected))
    return DryRun(ref=change.ref, accepted=True,
                  generation_before=generation_of(current), generation_after=generation_of(answer),
                  changed=changed, unexpected=unexpected)


def _dry_run_create(writer: KubeWriter, change: ObjectChange) -> DryRun:
    """A create: the server's would-be object. Defaults the server fills in or fields an older
    CRD prunes are shown but not flagged; a planned field the answer does not hold is."""
    assert isinstance(change.patch, Mapping)
    try:
        if writer.read(change.ref) is not None:
            return DryRun(ref=change.ref, accepted=False,
                          error="the object exists now (created since the scan); scan again")
        answer = writer.create(change.ref, change.patch, dry_run=True)
    except ClusterError as exc:
        return DryRun(ref=change.ref, accepted=False, error=str(exc))
    spec = answer.get("spec") or {}
    changed = tuple(diff_paths({"spec": {}}, {"spec": spec}))
    unexpected = tuple(field_path(change, f) for f in change.fields
                       if spec.get(f[len("spec/"):], None) != change.after.get(f))
    return DryRun(ref=change.ref, accepted=True, generation_before=None,
                  generation_after=generation_of(answer), changed=changed,
                  unexpected=unexpected)


def generation_of(obj: Mapping[str, Any]) -> int | None:
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
            if path == "metadata" and key in IGNORED_META:
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
            max_not_ready: float, extra: Sequence[Guard] = ()) -> tuple[Guard, ...]:
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
    guards.extend(extra)
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
