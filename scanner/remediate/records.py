"""What remediation plans, guards, reports and returns: immutable records, the RBAC it needs,
and the field names of the sources it may change, for each control (felix-metrics,
typha-metrics, kube-controllers-metrics).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from scanner.core.records import FELIX, KUBE_CONTROLLERS, TYPHA, ClusterResult, Install
from scanner.kube.write import ObjectRef, PatchType

log = logging.getLogger(__name__)


Mode = Literal["apply", "rollback"]
Outcome = Literal["dry_run", "noop", "succeeded", "failed", "rolled_back"]

ENV_VAR = "FELIX_PROMETHEUSMETRICSENABLED"
TYPHA_ENV_VAR = "TYPHA_PROMETHEUSMETRICSENABLED"
# Field keys of ObjectChange.before/after (and of the stored action's objects): a key present
# means the field is present; absent means absent. Rollback restores exactly that.
ENV = "env/"  # env/<NAME>: the whole env entry of the configured container
SPEC_ENABLED = "spec/prometheusMetricsEnabled"  # FelixConfiguration
ANNOTATION = "annotation/"  # annotation/<key>: a FelixConfiguration annotation
SPEC_METRICS_PORT = "spec/nodeMetricsPort"  # Installation (Felix)
SPEC_TYPHA_METRICS_PORT = "spec/typhaMetricsPort"  # Installation (Typha)
SPEC_KCC_PORT = "spec/prometheusMetricsPort"  # KubeControllersConfiguration default
# Fields changed with a JSON patch (RFC 6902): a `test` of the value the plan saw, then the
# change, so that the server refuses it when the field holds anything else.
JSON_PATCH_FIELDS = frozenset({SPEC_TYPHA_METRICS_PORT})
KCC_KIND = "KubeControllersConfiguration"
# The order controls are remediated in one action: the least disruptive first (a
# kube-controllers restart touches no dataplane; Typha's rollout makes Felix reconnect;
# calico-node's restarts every node's Felix).
CONTROL_ORDER: tuple[str, ...] = (KUBE_CONTROLLERS, TYPHA, FELIX)

POD_RESTART_SECONDS = 30.0  # for estimates: one pod from termination to Ready
FELIX_RESTART_SECONDS = 15.0  # for estimates: Felix restarting in place after a config change
OPERATOR_API = "operator.tigera.io/v1"
IGNORED_META = frozenset({"resourceVersion", "generation", "managedFields"})


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
             "operator installs: remove spec.nodeMetricsPort (Felix) and spec.typhaMetricsPort "
             "(Typha) from the Installation"),
    RbacRule("apps", "deployments", ("patch",), ("calico-typha",),
             "calico-node's namespace (kube-system)",
             "manifest installs: set the env entry on the calico-typha container (and its "
             "dryRun=All preview); never used on operator installs"),
    RbacRule("crd.projectcalico.org", "kubecontrollersconfigurations", ("patch",), ("default",),
             "cluster", "set spec.prometheusMetricsPort: 0 on `default` (read with the scan's "
             "get)"),
    RbacRule("crd.projectcalico.org", "kubecontrollersconfigurations", ("create",), (),
             "cluster", "create `default` with prometheusMetricsPort 0 when it does not exist "
             "(RBAC cannot restrict create to a name)"),
    RbacRule("projectcalico.org", "kubecontrollersconfigurations", ("patch",), ("default",),
             "cluster", "the same where Calico's clients read the native v3 CRDs "
             "(projectcalico.org/v3)"),
    RbacRule("projectcalico.org", "kubecontrollersconfigurations", ("create",), (),
             "cluster", "the same"),
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
    container: str | None  # the DaemonSet or Deployment container whose env is patched
    patch_type: PatchType
    # The body as sent: for a patch with its resourceVersion and uid preconditions (a JSON
    # patch: a list of operations), for a create the whole object.
    patch: Mapping[str, Any] | list[dict[str, Any]]
    fields: tuple[str, ...]
    before: Mapping[str, Any]  # field -> value; a missing key: the field is absent
    after: Mapping[str, Any]
    resource_version: str  # "" for a create
    restarts_pods: bool
    reason: str
    control: str = FELIX  # the control this change remediates
    create: bool = False  # POST the object (it does not exist) instead of patching it

    def record(self, **extra: Any) -> dict[str, Any]:
        """The JSON stored in remediation_actions.objects."""
        return {"control": self.control, "apiVersion": self.ref.api_version,
                "kind": self.ref.kind, "namespace": self.ref.namespace, "name": self.ref.name,
                "container": self.container,
                "verb": "create" if self.create else "patch",
                "patch_type": None if self.create else self.patch_type,
                "patch": copy.deepcopy(self.patch if isinstance(self.patch, list)
                                       else dict(self.patch)),
                "fields": list(self.fields),
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


Follow = Literal["daemonset", "deployment", "restart", "none"]


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    restarts_pods: bool
    pods: int  # pods that restart (0 when Felix restarts in place)
    nodes: int  # nodes whose Felix picks the change up (the pods' nodes for a Deployment)
    strategy: str
    max_unavailable: str | None
    batch: int  # pods restarted at once
    estimate_seconds: float
    how: str
    control: str = FELIX
    # What apply waits for: the calico-node DaemonSet's rollout, the calico-typha Deployment's,
    # kube-controllers restarting its container, or nothing (Felix restarts in place).
    follow: Follow = "daemonset"
    workload: str = ""  # "Deployment kube-system/calico-typha", ...
    generation: int | None = None  # the workload's generation when planned
    available: int | None = None  # its available pods when planned (the floor to get back to)
    max_surge: str | None = None  # a Deployment's RollingUpdate maxSurge
    # kube-controllers: pod -> restartCount when planned (a restart raises it)
    restarts: Mapping[str, int] = field(default_factory=dict)
    selector: Mapping[str, str] = field(default_factory=dict)  # its pods' matchLabels
    namespace: str | None = None
    container: str | None = None  # the container whose restarts count


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
    # The controls asked for (and judged by the verification scan); every change names its own.
    controls: tuple[str, ...] = (FELIX,)
    rollouts: tuple[RolloutPlan, ...] = ()  # one per control whose change restarts something

    @property
    def refusals(self) -> tuple[Guard, ...]:
        return tuple(g for g in self.guards if not g.ok)

    @property
    def changed_controls(self) -> tuple[str, ...]:
        """The controls with a change, in the order they are applied."""
        return tuple(dict.fromkeys(c.control for c in self.changes))

    def rollout_of(self, control: str) -> RolloutPlan | None:
        return next((r for r in self.rollouts if r.control == control), None)


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
    workload: str = ""  # "" for the calico-node DaemonSet
    control: str = FELIX


@dataclass(frozen=True, slots=True)
class RolloutReport:
    complete: bool
    seconds: float
    last: RolloutProgress | None
    message: str
    control: str = FELIX


@dataclass(frozen=True, slots=True)
class RemediationResult:
    plan: Plan
    outcome: Outcome
    message: str
    action_id: int | None = None
    rollout: RolloutReport | None = None  # the last rollout followed (the one that stalled)
    verify_run_id: int | None = None
    verify: ClusterResult | None = None
    rollouts: tuple[RolloutReport, ...] = ()  # every rollout followed, in order

    @property
    def done(self) -> bool:
        """Done (or dry run shown, or nothing to do on a compliant cluster, or nothing left to
        restore); False when it failed or left a non-compliant cluster as it was."""
        if self.outcome in ("dry_run", "succeeded", "rolled_back"):
            return True
        if self.outcome == "noop":
            # Nothing to restore is fine; nothing to change on a non-compliant cluster is not.
            return self.plan.mode == "rollback" or \
                controls_compliant(self.plan.before, self.plan.controls)
        return False


def control_status(result: ClusterResult, control: str) -> str:
    """One control's status in a scan (a result without per-control results is Felix's)."""
    found = result.control(control)
    if found is not None:
        return found.status
    return result.status if control == FELIX and not result.controls else "compliant"


def controls_compliant(result: ClusterResult, controls: tuple[str, ...]) -> bool:
    """Whether every one of `controls` is compliant in `result` (none asked: the cluster)."""
    if not controls:
        return result.status == "compliant"
    return all(control_status(result, c) == "compliant" for c in controls)


Confirm = Callable[[Plan], bool]
Progress = Callable[[RolloutProgress], None]




def show(value: Any) -> str:
    return "absent" if value is REMOVE else json.dumps(value, sort_keys=True)


def tagged(controls: tuple[str, ...] | list[str], message: str) -> str:
    """A message as stored and shown: the controls it is about first."""
    return f"[{', '.join(controls)}] {message}" if controls else message
