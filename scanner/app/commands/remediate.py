"""`felixscan remediate`: show, and with --apply make, the changes that turn Calico's metrics
endpoints off (felix-metrics, typha-metrics, kube-controllers-metrics; `--control` picks).

Glue over `scanner.remediate`: flags to options, the confirmation prompt, the plan and the
rollout progress on screen. Exit codes: 0 done (or the dry run shown), 1 the remediation
failed, 2 refused (a guard, no confirmation) or a usage error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
from typing import TYPE_CHECKING, Any, TextIO

from scanner.app.exitcodes import ExitCode
from scanner.core.errors import ConfigError, RemediationRefused
from scanner.core.records import CONTROL_IDS
from scanner.telemetry import progress
from scanner.telemetry.progress import Task

if TYPE_CHECKING:  # scanner.remediate loads the kubernetes client: only when remediating
    from scanner.remediate import Plan, RemediationResult, RolloutProgress

from scanner.app.options import common


def register(sub: Any) -> None:
    p = sub.add_parser(
        "remediate", help="turn Calico metrics endpoints off (a dry run unless --apply)",
        description="Plan the changes that turn Calico's metrics endpoints off on a cluster "
        "(Felix: the env entry of a manifest install, the winning FelixConfiguration, or the "
        "operator Installation; Typha: its Deployment's env, or the Installation's "
        "typhaMetricsPort; kube-controllers: KubeControllersConfiguration default's "
        "prometheusMetricsPort), print them with the API server's dry-run answer, and with "
        "--apply make them: guards (remediation.enabled, maintenance window, no rollout in "
        "progress, NotReady share), a confirmation, a patch with a resourceVersion "
        "precondition, each rollout followed to the end, a verification scan, and the action "
        "recorded. `--rollback ACTION_ID` restores what a recorded action changed. Exit 0 done "
        "or dry run shown, 1 failed, 2 refused or usage error.")
    common(p)
    p.add_argument("--cluster", metavar="NAME", help="the configured cluster to remediate")
    p.add_argument("--control", action="append", choices=CONTROL_IDS, metavar="CONTROL",
                   help="remediate this control (repeat for several; one of "
                   f"{', '.join(CONTROL_IDS)}); default: every control the cluster checks "
                   "that is not compliant")
    p.add_argument("--rollback", metavar="ACTION_ID", type=_action_id,
                   help="restore the values recorded before this remediation action")
    p.add_argument("--apply", action="store_true", help="make the change (default: dry run)")
    p.add_argument("--yes", action="store_true",
                   help="do not ask for confirmation (needed with --apply without a terminal)")
    p.add_argument("--ignore-window", action="store_true",
                   help="remediate outside the cluster's maintenance window")
    p.add_argument("--rollout-timeout", type=_seconds, metavar="S",
                   help="give up on the rollout after S seconds (default: twice the estimate, "
                   "at least 300)")
    p.add_argument("--max-not-ready", type=_percent, default=10.0, metavar="PCT",
                   help="refuse when more than PCT%% of the nodes are NotReady (default 10)")
    p.set_defaults(handler=run)


def _action_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an action id (a positive number), got "
                                         f"{text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 7 * 86400:
        raise argparse.ArgumentTypeError("expected seconds from 0 to 604800")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("expected a percentage from 0 to 100")
    return value


def trigger() -> str:
    """Who asked: `cli:<user>@<host>` (stored with the action)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def run(args: argparse.Namespace) -> int:
    from scanner.core.config import load_settings
    from scanner.db.store import Store
    from scanner.remediate import RemediateOptions, remediate, rollback

    if args.rollback is None and not args.cluster:
        raise ConfigError("remediate needs --cluster NAME (or --rollback ACTION_ID)",
                          key="--cluster")
    if args.rollback is not None and args.control:
        raise ConfigError("--rollback restores every object the action changed; --control "
                          "does not go with it", key="--control")
    if args.apply and not args.yes and not sys.stdin.isatty():
        raise RemediationRefused("--apply asks for confirmation, but there is no terminal to "
                                 "ask on; pass --yes to apply without a prompt")
    settings = load_settings(args.config, db_url=args.db)
    options = RemediateOptions(rollout_timeout=args.rollout_timeout,
                               max_not_ready_pct=args.max_not_ready)
    view = _ProgressView()
    confirm = None if args.yes else _ask
    with Store(settings.database) as store:
        store.ensure_schema()
        cluster = args.cluster
        if args.rollback is not None:
            row = store.remediation(args.rollback)
            if row is None:
                raise RemediationRefused(f"there is no remediation action {args.rollback} in "
                                         "the database")
            if cluster and row.cluster != cluster:
                raise ConfigError(f"action {args.rollback} is for cluster {row.cluster}, not "
                                  f"{cluster}", key="--cluster")
            cluster = row.cluster
        try:
            if args.rollback is not None:
                result = rollback(settings, args.rollback, store=store, apply=args.apply,
                                  trigger=trigger(), ignore_window=args.ignore_window,
                                  confirm=confirm, options=options, progress=view,
                                  on_plan=_print_plan)
            else:
                result = remediate(settings, args.cluster, store=store, apply=args.apply,
                                   trigger=trigger(), ignore_window=args.ignore_window,
                                   confirm=confirm, options=options, progress=view,
                                   on_plan=_print_plan,
                                   controls=list(dict.fromkeys(args.control or [])) or None)
        finally:
            view.end()
    _print_result(result, apply=args.apply)
    return ExitCode.OK if result.done else ExitCode.NON_COMPLIANT


def _ask(plan: Plan) -> bool:
    what = {"felix-metrics": "Felix", "typha-metrics": "Typha",
            "kube-controllers-metrics": "calico-kube-controllers"}
    names = " and ".join(what.get(c, c) for c in plan.changed_controls) or "Felix"
    sys.stderr.write(f"\nThis restarts or reconfigures {names} on cluster {plan.cluster}. Type "
                     f"the cluster name ({plan.cluster}) to {plan.mode}, anything else to stop: ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip()
    return answer == plan.cluster


# --- output ----------------------------------------------------------------------------------


def _print_plan(plan: Plan, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    from reports.outputs import summary_line
    from scanner.remediate import human_duration

    w = out.write
    w("Before: " + summary_line(plan.before).splitlines()[0] + "\n")
    if not plan.changes:
        return
    title = "Plan" if plan.mode == "apply" else f"Rollback of action {plan.rollback_of}"
    w(f"\n{title} for cluster {plan.cluster} ({plan.install} install; "
      f"{', '.join(plan.changed_controls)}):\n")
    for i, (change, dry) in enumerate(zip(plan.changes, plan.dry_run, strict=True), 1):
        where = f" (container {change.container})" if change.container else ""
        version = "does not exist: created" if change.create else \
            f"resourceVersion {change.resource_version}"
        w(f"  {i}. [{change.control}] {change.ref}{where}, {version}\n")
        w(f"     why: {change.reason}\n")
        for f in change.fields:
            w(f"     {f}: {_value(change.before, f)} -> {_value(change.after, f)}\n")
        kind = ("POST, application/json" if change.create else
                "application/strategic-merge-patch+json" if change.patch_type == "strategic"
                else "application/json-patch+json" if change.patch_type == "json"
                else "application/merge-patch+json")
        w(f"     {'body' if change.create else 'patch'} ({kind}):\n")
        for line in json.dumps(change.patch, indent=2).splitlines():
            w(f"       {line}\n")
        if dry.accepted:
            gen = (f"; generation {dry.generation_before} -> {dry.generation_after}"
                   if dry.generation_before is not None else "")
            w(f"     server-side dry run (dryRun=All): accepted{gen}; changes "
              f"{', '.join(dry.changed) or 'nothing'}\n")
            if dry.unexpected:
                w(f"     WARNING: the server's answer also changes {', '.join(dry.unexpected)}\n")
        else:
            w(f"     server-side dry run (dryRun=All): REJECTED: {dry.error}\n")
    for r in plan.rollouts:
        if r.follow == "daemonset":
            w(f"\nRollout [{r.control}]: {r.how}: {r.pods} calico-node pod(s) restart, {r.batch} "
              f"at a time ({r.strategy}, maxUnavailable {r.max_unavailable or '1'}); about "
              f"{human_duration(r.estimate_seconds)} (assuming ~30s per pod).\n"
              "  Pod networking on each node is briefly disturbed while its pod restarts.\n")
        elif r.follow == "deployment":
            limits = (f"maxSurge {r.max_surge}, maxUnavailable {r.max_unavailable}"
                      if r.strategy != "Recreate" else "all at once")
            w(f"\nRollout [{r.control}]: {r.how}: {r.pods} Typha pod(s) replaced, {r.batch} at "
              f"a time ({r.strategy}, {limits}); about {human_duration(r.estimate_seconds)} "
              "(assuming ~30s per pod).\n"
              "  Each Felix connected to a replaced Typha pod reconnects to another one.\n")
        elif r.follow == "restart":
            w(f"\nRollout [{r.control}]: {r.how}: {r.pods} pod(s); about "
              f"{human_duration(r.estimate_seconds)}.\n")
        else:
            nodes = f"; {r.nodes} node(s)" if r.control == "felix-metrics" else ""
            w(f"\nRollout [{r.control}]: none: {r.how}{nodes}; about "
              f"{human_duration(r.estimate_seconds)}.\n")
    w("\nGuards:\n")
    for g in plan.guards:
        w(f"  {'ok    ' if g.ok else 'REFUSE'}  {g.name}: {g.detail}\n")
    for note in plan.notes:
        w(f"Note: {note}\n")
    out.flush()


def _value(values: Any, f: str) -> str:
    return json.dumps(values[f], sort_keys=True) if f in values else "(absent)"


def _print_result(result: RemediationResult, *, apply: bool) -> None:
    plan = result.plan
    if result.outcome == "noop":
        print(f"\nNothing to change: {result.message}")
        return
    if result.outcome == "dry_run":
        print("\nDry run: nothing was changed. Run again with --apply to make this change.")
        if plan.refusals:
            print("--apply would be refused now: "
                  + ", ".join(g.name for g in plan.refusals) + ".")
        return
    head = "FAILED" if result.outcome == "failed" else result.outcome.replace("_", " ")
    print(f"\nAction {result.action_id} {head}: {result.message}")
    for report in result.rollouts or ((result.rollout,) if result.rollout else ()):
        if report.complete:
            print(f"  [{report.control}] {report.message}")
    if result.verify is not None:
        from reports.outputs import summary_line

        print("After: " + summary_line(result.verify).splitlines()[0])
    if plan.mode == "apply" and result.action_id is not None:
        print(f"Roll back with: felixscan remediate --rollback {result.action_id} --apply")


class _ProgressView:
    """The rollout on the command's progress line (a bar on a terminal, like the scans before
    and after it); without a terminal, one `scanner.telemetry.progress` log line per change."""

    def __init__(self) -> None:
        self.task: Task | None = None

    def __call__(self, p: RolloutProgress) -> None:
        what = f"{p.workload}: " if p.workload else ""
        if p.target_generation is None:
            text = (f"waiting for the operator to update the "
                    f"{p.workload or 'DaemonSet'} ({p.elapsed:.0f}s of {p.timeout:.0f}s)")
        elif p.workload.startswith("Deployment") and p.control == "kube-controllers-metrics":
            text = (f"{what}restart: {p.updated}/{p.desired} pod(s) restarted, "
                    f"{p.available}/{p.desired} Ready ({p.elapsed:.0f}s of {p.timeout:.0f}s)")
        else:
            text = (f"{what}rollout: {p.updated}/{p.desired} updated, {p.available}/"
                    f"{p.desired} available, generation {p.observed_generation}/"
                    f"{p.target_generation} observed ({p.elapsed:.0f}s of {p.timeout:.0f}s)")
        fraction = p.updated / p.desired if p.desired else 0.0
        if self.task is None:
            self.task = progress.current().task(text, fraction=fraction, log_updates=True)
        else:
            self.task.update(text, fraction)

    def end(self) -> None:
        if self.task is not None:
            self.task.close()
            self.task = None
