"""Accepted risks (waivers): read and check the entries of `waivers_file`, then apply the ones in
force to an evaluated cluster result. Pure: the caller reads the file; nothing here does I/O.

A waived failure stays visible: the node's verdict becomes `waived` (not `pass`), the finding
keeps its place and names the waiver, and the cluster is compliant only when every failure is
waived by a waiver in force. An expired or malformed entry applies to nothing and becomes a
finding of its own (WAIVER-EXPIRED, WAIVER-INVALID).
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

from scanner.core.findings import RULES, SEVERITY_ORDER
from scanner.core.records import ClusterResult, ClusterStatus, Finding, NodeResult, Waiver

FIELDS = ("finding", "cluster", "nodes", "reason", "approved_by", "created", "expires")
REQUIRED = ("finding", "cluster", "reason", "approved_by", "created", "expires")
DEFAULT_MAX_DAYS = 365
# A node fails for these reasons (scanner.core.evaluate.node_verdict); a failing node is waived
# only when every reason it fails for is waived.
_ENABLED, _REACHABLE, _OTHER = "FELIX-METRICS-ENABLED", "FELIX-PORT-REACHABLE", \
    "PORT-OPEN-NOT-FELIX"
_CLUSTER_CAUSES = ("OPERATOR-METRICS-PORT-SET",)  # make a cluster non-compliant by themselves
_WAIVER_FINDINGS = ("WAIVER-EXPIRED", "WAIVER-INVALID")


@dataclass(frozen=True, slots=True)
class WaiverProblem:
    """An entry that does not apply: expired, or not a valid waiver."""

    kind: str  # "expired" or "invalid"
    entry: int  # its position in the file, from 1
    message: str
    cluster: str | None  # the cluster it names, when it names one
    waiver: Waiver | None = None  # an expired entry that was otherwise valid


@dataclass(frozen=True, slots=True)
class WaiverSet:
    """The file's entries in force on `today`, and those that are not."""

    source: str
    today: date
    active: tuple[Waiver, ...] = ()
    problems: tuple[WaiverProblem, ...] = ()

    def for_cluster(self, cluster: str) -> tuple[tuple[Waiver, ...], tuple[WaiverProblem, ...]]:
        """The waivers of one cluster, and the problems to report on it (entries naming it,
        and entries naming no cluster that can be read)."""
        return (tuple(w for w in self.active if w.cluster == cluster),
                tuple(p for p in self.problems if p.cluster in (cluster, None)))


NO_WAIVERS = WaiverSet(source="", today=date.min)


def parse_waivers(data: object, *, source: str, today: date,
                  max_days: int = DEFAULT_MAX_DAYS) -> WaiverSet:
    """Check every entry of a `waivers_file` (already parsed from YAML).

    `data` must be a list (or empty); anything else is the caller's ConfigError. Each entry
    is checked on its own, so one bad entry never hides the others.
    """
    if data is None:
        return WaiverSet(source=source, today=today)
    if not isinstance(data, list):
        raise TypeError(f"expected a list of waivers, got {type(data).__name__}")
    active: list[Waiver] = []
    problems: list[WaiverProblem] = []
    for number, item in enumerate(data, start=1):
        cluster = item.get("cluster") if isinstance(item, Mapping) else None
        cluster = cluster if isinstance(cluster, str) and cluster else None
        try:
            waiver = _waiver(item, source=source, number=number, max_days=max_days)
        except ValueError as exc:
            problems.append(WaiverProblem("invalid", number, f"{source} entry {number}: {exc}",
                                          cluster))
            continue
        if waiver.expires < today:
            problems.append(WaiverProblem(
                "expired", number, f"{source} entry {number} ({waiver.finding} on "
                f"{waiver.cluster}, nodes {waiver.nodes}) expired on {waiver.expires}",
                waiver.cluster, waiver))
        elif waiver.created > today:
            problems.append(WaiverProblem(
                "invalid", number, f"{source} entry {number}: created {waiver.created} is in "
                "the future", waiver.cluster, waiver))
        else:
            active.append(waiver)
    return WaiverSet(source=source, today=today, active=tuple(active), problems=tuple(problems))


def _waiver(item: object, *, source: str, number: int, max_days: int) -> Waiver:
    if not isinstance(item, Mapping):
        raise ValueError(f"expected a mapping with {', '.join(REQUIRED)}")
    unknown = sorted(str(k) for k in item if k not in FIELDS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(FIELDS)})")
    missing = [k for k in REQUIRED if item.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (an expiry date is required)")
    text = {k: item.get(k) for k in ("finding", "cluster", "reason", "approved_by")}
    for key, value in text.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{key}: expected text")
    finding = str(text["finding"]).strip()
    if finding not in RULES:
        raise ValueError(f"finding: unknown finding ID {finding!r}")
    if finding in _WAIVER_FINDINGS:
        raise ValueError(f"finding: {finding} cannot be waived")
    nodes = item.get("nodes", "*")
    if not isinstance(nodes, str) or not nodes.strip():
        raise ValueError("nodes: expected a glob such as 'gpu-*' (default: every node)")
    created, expires = _date(item["created"], "created"), _date(item["expires"], "expires")
    if expires < created:
        raise ValueError(f"expires {expires} is before created {created}")
    if (expires - created).days > max_days:
        raise ValueError(f"expires {expires} is {(expires - created).days} days after created "
                         f"{created}: at most {max_days} days are allowed (waiver_max_days)")
    cluster = str(text["cluster"]).strip()
    key = "\0".join((finding, cluster, nodes.strip(), created.isoformat(), expires.isoformat()))
    return Waiver(id="W-" + hashlib.sha256(key.encode()).hexdigest()[:10], finding=finding,
                  cluster=cluster, nodes=nodes.strip(), reason=str(text["reason"]).strip(),
                  approved_by=str(text["approved_by"]).strip(), created=created,
                  expires=expires, source=f"{source} entry {number}")


def _date(value: object, key: str) -> date:
    # YAML reads 2026-01-31 as a date already; a quoted one is text.
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{key}: expected a date YYYY-MM-DD, got {value!r}")


# --- applying ------------------------------------------------------------------------------


def covers(waiver: Waiver, node: str | None) -> bool:
    """The waiver's node glob takes in `node` (a cluster-wide finding: only the glob `*`)."""
    if node is None:
        return waiver.nodes == "*"
    return fnmatch.fnmatchcase(node, waiver.nodes)


def apply_waivers(result: ClusterResult, waivers: WaiverSet) -> ClusterResult:
    """`result` with the cluster's waivers in force applied, and its waiver problems reported.

    A failing node becomes `waived` when every reason it fails for (enabled in configuration,
    port open) is waived for it; a finding is marked with the waiver that covers it (for a
    cluster-wide finding that lists nodes: covers all of them); the cluster status is worked
    out again. The waivers that applied to anything are kept with the result (and stored).
    """
    active, problems = waivers.for_cluster(result.cluster)
    if not active and not problems:
        return result
    used: dict[str, Waiver] = {}

    def waiver_for(finding_id: str, node: str | None) -> Waiver | None:
        for w in active:
            if w.finding == finding_id and covers(w, node):
                used[w.id] = w
                return w
        return None

    nodes: list[NodeResult] = []
    for n in result.nodes:
        if n.verdict != "fail":
            nodes.append(n)
            continue
        causes = _causes(n)
        chosen = [waiver_for(c, n.node) for c in causes]
        if causes and all(chosen):
            nodes.append(replace(n, verdict="waived", waiver=",".join(
                sorted({w.id for w in chosen if w is not None}))))
        else:
            nodes.append(n)
    findings: list[Finding] = []
    for f in result.findings:
        listed = f.evidence.get("nodes") if f.node is None else None
        # A cluster-wide finding that names its nodes (all of them: `node_count` says when
        # the list was cut short) is waived when one waiver covers every node it names.
        if isinstance(listed, list) and listed and \
                f.evidence.get("node_count", len(listed)) == len(listed):
            chosen = [waiver_for(f.id, str(name)) for name in listed]
            w = chosen[0] if all(chosen) else None
        else:
            w = waiver_for(f.id, f.node)
        findings.append(replace(f, waiver=w.id) if w is not None else f)
    for p in problems:
        rule = "WAIVER-EXPIRED" if p.kind == "expired" else "WAIVER-INVALID"
        evidence: dict[str, Any] = {"entry": p.entry, "source": waivers.source}
        if p.waiver is not None:
            evidence.update(waiver_json(p.waiver))
        findings.append(Finding(id=rule, severity=RULES[rule].severity, message=p.message,
                                evidence=evidence, remediation=RULES[rule].remediation))
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.id, f.node or ""))
    status, error = _status(result, nodes, findings)
    return replace(result, nodes=tuple(nodes), findings=tuple(findings), status=status,
                   error=error, waivers=tuple(sorted(used.values(), key=lambda w: w.id)))


def _causes(n: NodeResult) -> list[str]:
    causes = []
    if n.declared.enabled:
        causes.append(_ENABLED)
    if n.probe.state == "open":
        causes.append(_REACHABLE if n.probe.felix else _OTHER)
    return causes


def _status(result: ClusterResult, nodes: Sequence[NodeResult],
            findings: Iterable[Finding]) -> tuple[ClusterStatus, str | None]:
    """As scanner.core.evaluate decides it, with waived nodes and cluster-wide causes apart."""
    if result.status == "error" and not result.nodes:
        return result.status, result.error
    cluster_causes = [f for f in findings if f.id in _CLUSTER_CAUSES and f.waiver is None]
    if any(n.verdict == "fail" for n in nodes) or cluster_causes:
        return "non_compliant", None
    unknown = sum(1 for n in nodes if n.verdict == "unknown")
    if unknown:
        return "error", f"{unknown} of {len(nodes)} nodes could not be verified"
    return "compliant", None


def waiver_json(w: Waiver) -> dict[str, Any]:
    """A waiver as stored with the scan and shown in JSON and reports."""
    return {"id": w.id, "finding": w.finding, "cluster": w.cluster, "nodes": w.nodes,
            "reason": w.reason, "approved_by": w.approved_by,
            "created": w.created.isoformat(), "expires": w.expires.isoformat(),
            "source": w.source}
