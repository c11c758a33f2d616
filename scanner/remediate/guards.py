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
from scanner.core.errors import ClusterError
from scanner.core.records import ClusterResult, ClusterSnapshot
from scanner.kube.write import KubeWriter
from scanner.remediate.plan import field_path, snapshot_of
from scanner.remediate.records import (
    FELIX_RESTART_SECONDS,
    IGNORED_META,
    POD_RESTART_SECONDS,
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
              options: RemediateOptions) -> Plan:
    snapshot = snapshot_of(before)
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
    expected = [field_path(change, f) for f in change.fields]
    unexpected = tuple(p for p in changed
                       if not any(p == e or p.startswith((e + ".", e + "[")) for e in expected))
    return DryRun(ref=change.ref, accepted=True,
                  generation_before=generation_of(current), generation_after=generation_of(answer),
                  changed=changed, unexpected=unexpected)


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
