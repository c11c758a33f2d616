"""Applying a plan: patch with preconditions, follow each rollout, verify with a fenced scan, and
record each step; a failure after the first write is recorded with how to undo it.

Control by control (the plan's order, least disruptive first): that control's objects are
written, then what they restart is followed to the end (the calico-node DaemonSet, the
calico-typha Deployment, or kube-controllers restarting its container) before the next control
is touched; one verification scan ends the action.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from scanner.core.config import ClusterSettings, Settings
from scanner.core.errors import ApiUnreachable, ClusterError, RemediationError
from scanner.core.records import FELIX, ClusterResult
from scanner.db.locks import HeldLock
from scanner.db.store import Store
from scanner.kube.read import collect
from scanner.kube.write import KubeWriter, ObjectRef
from scanner.remediate.guards import generation_of, human_duration
from scanner.remediate.plan import creating, object_change, snapshot_of
from scanner.remediate.record import ActionRecorder
from scanner.remediate.records import (
    REMOVE,
    ObjectChange,
    Outcome,
    Plan,
    Progress,
    RemediateOptions,
    RemediationResult,
    RolloutPlan,
    RolloutProgress,
    RolloutReport,
    control_status,
    tagged,
)
from scanner.scan import run_scan, scan_cluster

log = logging.getLogger(__name__)


def execute(settings: Settings, cs: ClusterSettings, plan: Plan, *, writer: KubeWriter,
             store: Store, trigger: str, options: RemediateOptions,
             progress: Progress | None, lock: HeldLock | None = None) -> RemediationResult:
    run = ActionRecorder(store, store.add_remediation(
        cluster=plan.cluster, started_at=datetime.now(UTC), finished_at=None,
        trigger=trigger[:64], install=plan.install, mode=plan.mode, outcome="applying",
        message=tagged(plan.changed_controls, "applying"), objects=[], verify_run_id=None,
        rollback_of=plan.rollback_of))
    log.info("remediate %s: action %s applying %d change(s) (%s)", plan.cluster, run.action_id,
             len(plan.changes), ", ".join(plan.changed_controls))
    try:
        return _steps(settings, cs, plan, run, writer=writer, options=options,
                      progress=progress, lock=lock)
    except BaseException as exc:
        # Ctrl-C or an error nobody expected: what was already patched stays on record.
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped by an error " \
            f"({type(exc).__name__}: {exc})"
        changed = sum(1 for o in run.objects if o.get("applied"))
        run.update(outcome="failed", finished_at=datetime.now(UTC),
                   message=tagged(plan.changed_controls,
                                  f"{why} before the remediation finished; {changed} object(s) "
                                  f"were changed" + (_undo(plan, run) if changed else "")))
        raise


def _undo(plan: Plan, run: ActionRecorder) -> str:
    if plan.mode == "apply":
        return f"; roll back with --rollback {run.action_id}"
    return f"; run --rollback {plan.rollback_of} again to finish restoring"


def _steps(settings: Settings, cs: ClusterSettings, plan: Plan, run: ActionRecorder, *,
           writer: KubeWriter, options: RemediateOptions,
           progress: Progress | None, lock: HeldLock | None = None) -> RemediationResult:
    reports: list[RolloutReport] = []
    controls = plan.changed_controls

    def finish(outcome: Outcome, message: str, *,
               verify: tuple[int, ClusterResult] | None = None) -> RemediationResult:
        text = tagged(controls, message)
        run.update(outcome=outcome, message=text, finished_at=datetime.now(UTC),
                   verify_run_id=verify[0] if verify else None)
        log.info("remediate %s: action %s %s: %s", plan.cluster, run.action_id, outcome, text)
        return RemediationResult(plan=plan, outcome=outcome, message=text,
                                 action_id=run.action_id,
                                 rollout=reports[-1] if reports else None,
                                 verify_run_id=verify[0] if verify else None,
                                 verify=verify[1] if verify else None, rollouts=tuple(reports))

    def earlier() -> str:
        return f"; the changes before it are recorded{_undo(plan, run)}" \
            if any(o.get("applied") for o in run.objects) else ""

    touched: set[ObjectRef] = set()
    for control in controls:
        workload_generation: int | None = None
        restarts = False
        for change in (c for c in plan.changes if c.control == control):
            if lock is not None and lock.lost:
                return finish("failed", f"{change.ref}: not changed: the cluster's lock was "
                              f"lost, so another felixscan may be working on it{earlier()}")
            try:
                done, answer, conflicts = _patch(writer, change,
                                                 attempts=options.conflict_attempts,
                                                 fresh=change.ref in touched)
            except ClusterError as exc:
                return finish("failed", f"{change.ref}: the change was not made: "
                              f"{exc}{earlier()}")
            touched.add(change.ref)
            if done is None:
                run.objects.append(change.record(applied=False, conflicts=conflicts,
                                                 skipped="already holds the wanted values"))
            else:
                meta = answer.get("metadata") or {}
                run.objects.append(done.record(applied=True, conflicts=conflicts,
                                               resourceVersion_after=meta.get("resourceVersion"),
                                               generation_after=meta.get("generation")))
                restarts = restarts or done.restarts_pods or done.ref.kind == \
                    "KubeControllersConfiguration"
                if done.ref.kind in ("DaemonSet", "Deployment"):
                    workload_generation = generation_of(answer)
            run.update(objects=copy.deepcopy(run.objects))

        rollout = plan.rollout_of(control)
        if restarts and rollout is not None and rollout.follow != "none":
            run.update(outcome="rolling_out")
            if rollout.follow == "daemonset":
                report = follow_rollout(writer, plan, target_generation=workload_generation,
                                        options=options, progress=progress)
            elif rollout.follow == "deployment":
                report = follow_deployment(writer, plan, rollout,
                                           target_generation=workload_generation,
                                           options=options, progress=progress)
            else:
                report = follow_restart(writer, rollout, options=options, progress=progress)
            reports.append(report)
            if not report.complete:
                return finish("failed", report.message)

    run.update(outcome="verifying")
    settle = options.settle_timeout if options.settle_timeout is not None else \
        min(60.0, options.rollout_timeout or 60.0)
    # A rollback re-enables the endpoint on purpose: nothing to wait for before the scan.
    verify = _verify(settings, cs, settle=settle if plan.mode == "apply" else 0.0,
                     options=options, store=run.store, lock=lock, controls=plan.controls)
    run_id, result = verify
    summary = f"verification scan {run_id}: " + "; ".join(
        _control_summary(result, c) for c in (plan.controls or (FELIX,)))
    if plan.mode == "rollback":
        return finish("rolled_back", f"previous values restored; {summary}", verify=verify)
    if all(control_status(result, c) == "compliant" for c in plan.controls):
        return finish("succeeded", summary, verify=verify)
    worst = [f"{f.id}{' ' + f.node if f.node else ''}: {f.message}"
             for f in result.findings if f.severity in ("critical", "high")
             and (f.control in plan.controls or not plan.controls)]
    more = f" (+{len(worst) - 3} more findings)" if len(worst) > 3 else ""
    return finish("failed", f"{summary}: {'; '.join(worst[:3])}{more}" if worst else summary,
                  verify=verify)


def _control_summary(result: ClusterResult, control: str) -> str:
    """`felix-metrics compliant (3 pass, 0 fail, 0 unknown)`, from the verification scan."""
    found = result.control(control)
    targets = found.targets if found is not None else (result.nodes if control == FELIX else ())
    counts = {v: sum(1 for n in targets if n.verdict == v) for v in ("pass", "fail", "unknown")}
    status = control_status(result, control).replace("_", "-")
    return (f"{control} {status} ({counts['pass']} pass, {counts['fail']} fail, "
            f"{counts['unknown']} unknown)")


def _patch(writer: KubeWriter, change: ObjectChange, *, attempts: int,
           fresh: bool = False) -> tuple[ObjectChange | None, dict[str, Any], int]:
    """PATCH (or create) with the planned precondition; on 409 re-read, re-plan this object,
    try again. `fresh`: this run already wrote the object (another control's change of the
    same Installation), so the change is planned again from what it holds now first.

    Returns the change as finally sent (None when the fresh object already holds the wanted
    values), the server's answer and the number of conflicts met.
    """
    conflicts = 0
    wanted = {f: change.after.get(f, REMOVE) for f in change.fields}
    current: ObjectChange | None = change
    if fresh:
        current, found = _replan(writer, change, wanted)
        if current is None:
            return None, found, conflicts
    while True:
        assert current is not None
        try:
            if current.create:
                assert isinstance(current.patch, Mapping)
                answer = writer.create(current.ref, current.patch, dry_run=False)
            else:
                answer = writer.patch(current.ref, current.patch,
                                      patch_type=current.patch_type, dry_run=False)
            return current, answer, conflicts
        except ApiUnreachable:
            # The write may have happened before the connection broke: the object tells.
            seen = writer.read(current.ref)
            if seen is not None and object_change(current.ref, seen, current.container,
                                                   wanted, reason="") is None:
                return current, seen, conflicts
            raise
        except ClusterError as exc:
            status = getattr(exc, "status", None)
            # A JSON patch whose `test` of the planned value fails met a concurrent writer
            # too: 422, not 409, since the patch is applied before the resourceVersion check.
            tested = status == 422 and current.patch_type == "json" and "/spec/" in str(exc)
            if (status != 409 and not tested) or conflicts + 1 >= attempts:
                raise
            conflicts += 1
            log.info("%s changed since it was read (%s); reading it again", current.ref,
                     "409 Conflict" if status == 409 else "422, a tested value differs")
        current, found = _replan(writer, current, wanted)
        if current is None:
            return None, found, conflicts


def _replan(writer: KubeWriter, change: ObjectChange, wanted: Mapping[str, Any]
            ) -> tuple[ObjectChange | None, dict[str, Any]]:
    found = writer.read(change.ref)
    if found is None:
        if change.create:
            return creating(change.ref, wanted, control=change.control,
                            reason=change.reason), {}
        raise RemediationError(f"{change.ref} disappeared while remediating")
    replanned = object_change(change.ref, found, change.container, wanted,
                              reason=change.reason, control=change.control)
    return replanned, found


def _timeout(rollout: RolloutPlan | None, options: RemediateOptions) -> float:
    estimate = rollout.estimate_seconds if rollout else 0.0
    return options.rollout_timeout if options.rollout_timeout is not None \
        else max(300.0, 2 * estimate)


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
    timeout = _timeout(plan.rollout, options)
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


def follow_deployment(writer: KubeWriter, plan: Plan, rollout: RolloutPlan, *,
                      target_generation: int | None, options: RemediateOptions,
                      progress: Progress | None = None,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> RolloutReport:
    """Poll a Deployment (calico-typha) until the new template is rolled out, as
    `kubectl rollout status` decides: observedGeneration reached the template's generation,
    updatedReplicas reached spec.replicas, no pod of an older template is left
    (status.replicas), and every updated pod is available. Without a target generation (an
    operator install) the first generation above the planned one is awaited first."""
    namespace, _, name = rollout.workload.split(" ", 1)[1].partition("/")
    ref = ObjectRef("apps/v1", "Deployment", name, namespace)
    timeout = _timeout(rollout, options)
    generation_before = rollout.generation or 0
    start = clock()
    delay = options.poll_initial
    last: RolloutProgress | None = None
    left_over = 0
    api_error: str | None = None
    while True:
        elapsed = clock() - start
        try:
            obj = writer.read(ref)
        except ClusterError as exc:
            obj, api_error = None, str(exc)
        if obj is not None:
            api_error = None
            meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
            status = obj.get("status") or {}
            generation = int(meta.get("generation") or 0)
            if target_generation is None and generation > generation_before:
                target_generation = generation
            wanted = spec.get("replicas")
            desired = int(wanted) if isinstance(wanted, int) else 1
            updated = int(status.get("updatedReplicas") or 0)
            left_over = max(0, int(status.get("replicas") or 0) - updated)
            now = RolloutProgress(
                generation=generation,
                observed_generation=int(status.get("observedGeneration") or 0),
                target_generation=target_generation, desired=desired, updated=updated,
                available=int(status.get("availableReplicas") or 0), elapsed=elapsed,
                timeout=timeout, workload=str(ref), control=rollout.control)
            if progress is not None and (last is None or replace(last, elapsed=0) !=
                                         replace(now, elapsed=0)):
                progress(now)
            last = now
            if (target_generation is not None and now.observed_generation >= target_generation
                    and updated >= desired and not left_over and now.available >= updated):
                return RolloutReport(complete=True, seconds=elapsed, last=now,
                                     control=rollout.control,
                                     message=f"{ref} rolled out in {human_duration(elapsed)}: "
                                     f"{updated} of {desired} pods updated, {now.available} "
                                     "available")
        if elapsed >= timeout:
            head = f"the {ref} rollout did not finish within {human_duration(timeout)}"
            if last is None:
                seen = f"it could not be read ({api_error})"
            elif last.target_generation is None:
                seen = f"the operator did not update it (generation still {last.generation})"
            else:
                seen = (f"generation {last.generation}, observed {last.observed_generation}; "
                        f"{last.updated} of {last.desired} pods updated, {left_over} old "
                        f"pod(s) left, {last.available} available")
            undo = ("roll back with --rollback" if plan.mode == "apply" else
                    f"run --rollback {plan.rollback_of} again")
            return RolloutReport(complete=False, seconds=elapsed, last=last,
                                 control=rollout.control,
                                 message=f"{head}: {seen}. felixscan stopped here and changed "
                                 f"nothing further; let the rollout finish or {undo}")
        sleep(min(delay, max(0.0, timeout - elapsed)))
        delay = min(delay * 1.5, options.poll_max)


def follow_restart(writer: KubeWriter, rollout: RolloutPlan, *, options: RemediateOptions,
                   progress: Progress | None = None,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> RolloutReport:
    """Wait for kube-controllers to pick its new configuration up: every pod seen when planning
    has restarted its container (a higher restartCount) or was replaced, and every pod is Ready.

    kube-controllers releases after v3.32 re-execute themselves inside the container on a
    configuration change (cmdwrapper), so no restart may ever show: once every pod is Ready
    and a restart grace (a third of the timeout, at most 30 s) has passed without one, this
    is done too, and the verification scan's probes decide.
    """
    timeout = _timeout(rollout, options)
    grace = min(30.0, timeout / 3)
    container = rollout.container or ""
    start = clock()
    delay = options.poll_initial
    last: RolloutProgress | None = None
    api_error: str | None = None
    pods: list[dict[str, Any]] = []
    while True:
        elapsed = clock() - start
        try:
            pods = writer.pods(rollout.namespace or "", rollout.selector) \
                if rollout.selector else []
            api_error = None
        except ClusterError as exc:
            api_error = str(exc)
        running = [p for p in pods if (p.get("status") or {}).get("phase") not in
                   ("Succeeded", "Failed") and not (p.get("metadata") or {}).get(
                       "deletionTimestamp")]
        restarted = [p for p in running if _restarted(p, rollout.restarts, container)]
        ready = [p for p in running if _ready(p)]
        now = RolloutProgress(generation=0, observed_generation=0, target_generation=0,
                              desired=len(running), updated=len(restarted),
                              available=len(ready), elapsed=elapsed, timeout=timeout,
                              workload=rollout.workload, control=rollout.control)
        if progress is not None and api_error is None and (
                last is None or replace(last, elapsed=0) != replace(now, elapsed=0)):
            progress(now)
        last = now
        if api_error is None and running and len(ready) == len(running):
            if len(restarted) == len(running):
                return RolloutReport(complete=True, seconds=elapsed, last=now,
                                     control=rollout.control,
                                     message=f"calico-kube-controllers restarted in "
                                     f"{human_duration(elapsed)}: {len(ready)} pod(s) Ready")
            if elapsed >= grace:
                return RolloutReport(complete=True, seconds=elapsed, last=now,
                                     control=rollout.control,
                                     message=f"calico-kube-controllers Ready; no container "
                                     f"restart seen within {human_duration(grace)} (releases "
                                     "after v3.32 restart in-process); the verification scan "
                                     "decides")
        if api_error is None and not rollout.restarts and not running and elapsed >= grace:
            return RolloutReport(complete=True, seconds=elapsed, last=now,
                                 control=rollout.control,
                                 message="no calico-kube-controllers pod runs: nothing to "
                                 "restart")
        if elapsed >= timeout:
            seen = (f"its pods could not be listed ({api_error})" if api_error else
                    f"{len(restarted)} of {len(running)} pod(s) restarted, {len(ready)} Ready")
            return RolloutReport(complete=False, seconds=elapsed, last=last,
                                 control=rollout.control,
                                 message=f"calico-kube-controllers did not restart and become "
                                 f"Ready within {human_duration(timeout)}: {seen}. felixscan "
                                 "stopped here and changed nothing further")
        sleep(min(delay, max(0.0, timeout - elapsed)))
        delay = min(delay * 1.5, options.poll_max)


def _restarted(pod: Mapping[str, Any], before: Mapping[str, int], container: str) -> bool:
    name = str((pod.get("metadata") or {}).get("name"))
    if name not in before:
        return True  # a new pod started with the new configuration
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return int(status.get("restartCount") or 0) > before[name]
    return False


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


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
            options: RemediateOptions, store: Store, lock: HeldLock | None = None,
            controls: tuple[str, ...] = (FELIX,)) -> tuple[int, ClusterResult]:
    """Wait (probing only) up to `settle` seconds for the remediated controls to be compliant,
    then store a normal scan."""
    if settle > 0:
        deadline = time.monotonic() + settle
        delay = options.poll_initial
        while True:
            probe = scan_cluster(cs)
            ok = all(control_status(probe, c) == "compliant" for c in controls) \
                if controls else probe.status == "compliant"
            if ok or time.monotonic() >= deadline:
                break
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, options.poll_max)
    outcome = run_scan(settings.select([cs.name]), store=store, trigger="remediation",
                       held={cs.name: lock} if lock is not None else None)
    return outcome.scan_id, outcome.clusters[0]
