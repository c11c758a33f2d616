"""The `remediation_actions` row of a remediation (through `Store`): a refusal recorded before
anything changes, the row updated while a change runs, and which actions can be rolled back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scanner.core.errors import RemediationRefused
from scanner.db.models import RemediationAction
from scanner.db.store import Store
from scanner.remediate.records import Confirm, Plan, tagged

log = logging.getLogger(__name__)


def admit(plan: Plan, *, store: Store, trigger: str, confirm: Confirm | None) -> None:
    """Refuse (recorded) when a guard fails; then ask `confirm`, if given."""
    refusals = plan.refusals
    if refusals:
        message = tagged(plan.changed_controls or plan.controls,
                         "refused: " + "; ".join(f"{g.name}: {g.detail}" for g in refusals))
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
class ActionRecorder:
    """The action row being written while a remediation runs."""

    store: Store
    action_id: int
    objects: list[dict[str, Any]] = field(default_factory=list)

    def update(self, **values: Any) -> None:
        self.store.update_remediation(self.action_id, **values)




def rollbackable(row: RemediationAction, store: Store) -> list[dict[str, Any]]:
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
