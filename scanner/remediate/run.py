"""The entry points `remediate()` and `rollback()`: scan, plan, guard, and with `apply`, take the
cluster's lock, patch, follow and verify, for the controls asked for (default: every checked
control that fails).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import Any

from scanner.core.config import ClusterSettings, Settings
from scanner.core.errors import ClusterError, RemediationError, RemediationRefused
from scanner.core.records import FELIX, ClusterResult
from scanner.db.locks import DatabaseLock, HeldLock, cluster_lock_name
from scanner.db.store import Store
from scanner.kube.write import KubeWriter
from scanner.remediate.apply import execute
from scanner.remediate.guards import assemble
from scanner.remediate.plan import (
    materialize,
    plan_controls,
    restoring,
    select_controls,
    snapshot_of,
)
from scanner.remediate.record import admit, rollbackable
from scanner.remediate.records import (
    Confirm,
    Plan,
    Progress,
    RemediateOptions,
    RemediationResult,
    control_status,
)
from scanner.scan import scan_cluster

log = logging.getLogger(__name__)


# --- entry points ----------------------------------------------------------------------------


def remediate(settings: Settings, cluster: str, *, store: Store, apply: bool, trigger: str,
              ignore_window: bool = False, confirm: Confirm | None = None,
              now: datetime | None = None, options: RemediateOptions | None = None,
              progress: Progress | None = None,
              on_plan: Callable[[Plan], None] | None = None,
              held: HeldLock | None = None,
              controls: Sequence[str] | None = None) -> RemediationResult:
    """Plan (and with `apply`, make, follow and verify) the changes that turn the metrics
    endpoints of `controls` off (felix-metrics, typha-metrics, kube-controllers-metrics; None:
    every control the cluster checks that is not compliant).

    Dry run unless `apply`. With `apply`: refused (RemediationRefused, recorded as a `refused`
    action) when a guard fails; `confirm(plan)` False refuses without a record. Failures after
    the first write (a stalled rollout, a verification scan still non-compliant, a patch the
    server rejects) are recorded and returned with outcome `failed`. `now` is the time the
    maintenance window is checked against (default: the clock). `on_plan(plan)` is called once
    the plan is made, before any guard is enforced (the CLI prints it there); `progress` gets
    the rollout's counts as they change. With `apply` it holds the cluster's database lock
    (`scanner.db.locks.cluster_lock_name`, the one scans take) from the planning scan to the
    end, or uses the one the caller already holds (`held`, as `serve` does): refused when
    another process holds it; no change once it is lost; the verification scan is stored only
    while it is held. A dry run takes no lock. Every change, the stored action's objects and
    its message name their control.
    """
    opts = options or RemediateOptions()
    cs = _cluster(settings, cluster)
    store.ensure_schema()
    with _locked(store, cs.name, apply=apply, held=held) as lock:
        return _remediate(settings, cs, store=store, apply=apply, trigger=trigger,
                          ignore_window=ignore_window, confirm=confirm, now=now, options=opts,
                          progress=progress, on_plan=on_plan, lock=lock, controls=controls)


def _remediate(settings: Settings, cs: ClusterSettings, *, store: Store, apply: bool,
               trigger: str, ignore_window: bool, confirm: Confirm | None,
               now: datetime | None, options: RemediateOptions, progress: Progress | None,
               on_plan: Callable[[Plan], None] | None,
               lock: HeldLock | None, controls: Sequence[str] | None) -> RemediationResult:
    opts = options
    before = _scan(cs)
    snapshot = snapshot_of(before)
    selected = select_controls(before, controls)
    with _planning(cs.name):
        writer = KubeWriter(cs)
    with writer:
        with _planning(cs.name):
            fixes, notes = plan_controls(snapshot, selected, explicit=bool(controls))
            changes = materialize(snapshot, fixes, writer)
            plan = assemble(cs, before, writer, changes, notes=notes, mode="apply",
                             rollback_of=None, ignore_window=ignore_window, now=now,
                             options=opts, controls=selected)
        return _carry_out(settings, cs, plan, writer=writer, store=store, apply=apply,
                          trigger=trigger, confirm=confirm, options=opts, progress=progress,
                          on_plan=on_plan, noop=_noop_message(before, selected), lock=lock)


def rollback(settings: Settings, action_id: int, *, store: Store, apply: bool, trigger: str,
             ignore_window: bool = False, confirm: Confirm | None = None,
             now: datetime | None = None, options: RemediateOptions | None = None,
             progress: Progress | None = None,
             on_plan: Callable[[Plan], None] | None = None,
             held: HeldLock | None = None) -> RemediationResult:
    """Restore the values recorded before action `action_id`, with the same care as remediate.

    Refused when an object changed since the action (its fields no longer hold what the action
    set), so a rollback never overwrites someone else's later edit.
    """
    opts = options or RemediateOptions()
    store.ensure_schema()
    row = store.remediation(action_id)
    if row is None:
        raise RemediationRefused(f"there is no remediation action {action_id} in the database")
    cs = _cluster(settings, row.cluster)
    with _locked(store, cs.name, apply=apply, held=held) as lock:
        applied = rollbackable(row, store)
        return _rollback(settings, cs, action_id, applied, store=store, apply=apply,
                         trigger=trigger, ignore_window=ignore_window, confirm=confirm,
                         now=now, options=opts, progress=progress, on_plan=on_plan, lock=lock)


def _rollback(settings: Settings, cs: ClusterSettings, action_id: int,
              applied: list[dict[str, Any]], *, store: Store, apply: bool, trigger: str,
              ignore_window: bool, confirm: Confirm | None, now: datetime | None,
              options: RemediateOptions, progress: Progress | None,
              on_plan: Callable[[Plan], None] | None,
              lock: HeldLock | None) -> RemediationResult:
    opts = options
    before = _scan(cs)
    snapshot_of(before)
    with _planning(cs.name):
        writer = KubeWriter(cs)
    with writer:
        with _planning(cs.name):
            changes = [c for c in (restoring(writer, obj, action_id)
                                   for obj in reversed(applied)) if c is not None]
            controls = tuple(dict.fromkeys(str(o.get("control") or FELIX)
                                           for o in reversed(applied)))
            plan = assemble(cs, before, writer, tuple(changes), notes=(), mode="rollback",
                             rollback_of=action_id, ignore_window=ignore_window, now=now,
                             options=opts, controls=controls)
        return _carry_out(settings, cs, plan, writer=writer, store=store, apply=apply,
                          trigger=trigger, confirm=confirm, options=opts, progress=progress,
                          on_plan=on_plan,
                          noop=f"the values of action {action_id} are already restored",
                          lock=lock)




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
    admit(plan, store=store, trigger=trigger, confirm=confirm)
    return execute(settings, cs, plan, writer=writer, store=store, trigger=trigger,
                    options=options, progress=progress, lock=lock)


def _locked(store: Store, cluster: str, *, apply: bool, held: HeldLock | None
            ) -> AbstractContextManager[HeldLock | None]:
    """The cluster's lock for a change: the caller's, else taken here; none for a dry run."""
    if not apply or held is not None:
        return nullcontext(held)
    return _taken(store, cluster)


@contextmanager
def _taken(store: Store, cluster: str) -> Iterator[HeldLock]:
    with DatabaseLock(store).hold(cluster_lock_name(cluster)) as lock:
        if lock is None:
            raise RemediationRefused(f"another felixscan process is scanning or remediating "
                                     f"cluster {cluster} right now; try again later")
        yield lock


@contextmanager
def _planning(cluster: str) -> Iterator[None]:
    """Planning reads the cluster; an API failure there means no change was possible."""
    try:
        yield
    except ClusterError as exc:
        raise RemediationError(f"cluster {cluster}: cannot plan the change, nothing was "
                               f"changed: {exc}") from exc




def _cluster(settings: Settings, name: str) -> ClusterSettings:
    return settings.select([name]).clusters[0]


def _scan(cs: ClusterSettings) -> ClusterResult:
    log.info("remediate %s: scanning to plan", cs.name)
    return scan_cluster(cs)




def _noop_message(before: ClusterResult, controls: tuple[str, ...]) -> str:
    if not controls:
        if before.status == "compliant":
            return "the cluster is compliant: nothing to change"
        return (f"no control of the cluster fails, yet the cluster is "
                f"{before.status.replace('_', '-')} (see the findings)")
    failing = [c for c in controls if control_status(before, c) != "compliant"]
    if not failing:
        return f"{', '.join(controls)} compliant: nothing to change"
    shown = ", ".join(f"{c} {control_status(before, c).replace('_', '-')}" for c in failing)
    return (f"{shown}: no setting felixscan changes is left on; what is left (see the notes "
            "and the findings) is not a setting remediation changes")
