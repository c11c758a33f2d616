"""Safe remediation: switch Calico's metrics endpoints off where they are on (Felix's, Typha's,
kube-controllers'), prove it, record it.

scan -> plan (`plan`: each component's own precedence decides which object and which exact
patch) -> guards
and a server-side dry run (`guards`) -> [apply (`apply`): patch with a resourceVersion
precondition, follow the rollout, verification scan] -> one `remediation_actions` row
(`record`). `remediate()` and `rollback()` (`run`) are the library entry points of the CLI and
of `serve`; they take the cluster's database lock themselves, as `run_scan` does, and never
print. Kubernetes writes go through `scanner.kube.write`; docs/remediation.md explains the
choices and lists the RBAC it needs.
"""

from scanner.remediate.guards import (
    diff_paths,
    human_duration,
    in_window,
    max_unavailable,
    next_window_start,
    window_left,
)
from scanner.remediate.plan import (
    Fix,
    plan_controls,
    plan_fixes,
    plan_kube_controllers,
    plan_typha,
    select_controls,
)
from scanner.remediate.records import (
    REMEDIATION_RBAC,
    Confirm,
    DryRun,
    Guard,
    ObjectChange,
    Plan,
    Progress,
    RbacRule,
    RemediateOptions,
    RemediationResult,
    RolloutPlan,
    RolloutProgress,
    RolloutReport,
)
from scanner.remediate.run import remediate, rollback

__all__ = ["REMEDIATION_RBAC", "Confirm", "DryRun", "Fix", "Guard", "ObjectChange", "Plan",
           "Progress", "RbacRule", "RemediateOptions", "RemediationResult", "RolloutPlan",
           "RolloutProgress", "RolloutReport", "diff_paths", "human_duration", "in_window",
           "max_unavailable", "next_window_start", "plan_controls", "plan_fixes",
           "plan_kube_controllers", "plan_typha", "remediate", "rollback", "select_controls",
           "window_left"]
