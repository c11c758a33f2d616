"""Applying a plan: patch with preconditions, follow the rollout, verify with a fenced scan, and
record each step; a failure after the first write is recorded with how to undo it.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from scanner.core.config import ClusterSettings, Settings
from scanner.core.errors import ApiUnreachable, ClusterError, RemediationError
from scanner.core.records import ClusterResult
from scanner.db.locks import HeldLock
from scanner.db.store import Store
from scanner.kube.read import collect
from scanner.kube.write import KubeWriter, ObjectRef
from scanner.remediate.guards import generation_of, human_duration
from scanner.remediate.plan import object_change, snapshot_of
from scanner.remediate.record import ActionRecorder
from scanner.remediate.records import (
    REMOVE,
    ObjectChange,
    Outcome,
    Plan,
    Progress,
    RemediateOptions,
    RemediationResult,
    RolloutProgress,
    RolloutReport,
)
from scanner.scan import run_scan, scan_cluster

log = logging.getLogger(__name__)


def execute(settings: Settings, cs: ClusterSettings, plan: Plan, *, writer: KubeWriter,
             store: Store, trigger: str, options: RemediateOptions,
             progress: Progress | None, lock: HeldLock | None = None) -> RemediationResult:
    run = ActionRecorder(store, store.add_remediation(
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


def _undo(plan: Plan, run: ActionRecorder) -> str:
    if plan.mode == "apply":
        return f"; roll back with --rollback {run.action_id}"
    return f"; run --rollback {plan.rollback_of} again to finish restoring"


def _steps(settings: Settings, cs: ClusterSettings, plan: Plan, run: ActionRecorder, *,
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
                ds_generation = generation_of(answer)
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
            if fresh is not None and object_change(current.ref, fresh, current.container,
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
        current = object_change(current.ref, fresh, current.container, wanted,
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
    snapshot = snapshot_of(plan.before)
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
    snapshot = snapshot_of(plan.before)
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
