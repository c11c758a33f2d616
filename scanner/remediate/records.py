"""What remediation plans, guards, reports and returns: immutable records, the RBAC it needs,
and the field names of the sources it may change.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from scanner.core.records import ClusterResult, Install
from scanner.kube.write import ObjectRef, PatchType

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
    def done(self) -> bool:
        """Done (or dry run shown, or nothing to do on a compliant cluster, or nothing left to
        restore); False when it failed or left a non-compliant cluster as it was."""
        if self.outcome in ("dry_run", "succeeded", "rolled_back"):
            return True
        if self.outcome == "noop":
            # Nothing to restore is fine; nothing to change on a non-compliant cluster is not.
            return self.plan.mode == "rollback" or self.plan.before.status == "compliant"
        return False


Confirm = Callable[[Plan], bool]
Progress = Callable[[RolloutProgress], None]




def show(value: Any) -> str:
    return "absent" if value is REMOVE else json.dumps(value, sort_keys=True)
