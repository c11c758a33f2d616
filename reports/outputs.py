"""Standard outputs of a scan or a report: the versioned JSON document and, made from it, SARIF
2.1.0, JUnit XML, OCSF Compliance Finding events, a findings CSV, and the console text.

Pure functions: `scan_document` (a scan's ClusterResults) and `report_document` (a report's
data from the database) build one `Document`, the JSON contract of `SCHEMA_VERSION` described
by reports/schemas/scan-result.schema.json; every other format is encoded from that document,
so a scan and a report of the same results say the same thing in every format.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import secrets
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from scanner import __version__
from scanner.core.controls import catalogue
from scanner.core.findings import RULES
from scanner.core.records import (
    CONTROL_IDS,
    FELIX,
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterResult,
    ControlResult,
    NodeResult,
)
from scanner.core.waivers import waiver_json

if TYPE_CHECKING:
    from scanner.db.queries.history import ClusterReport, ControlEntry, NodeEntry, ReportData

# 1.1: waivers (node verdict waived, totals.waived, waivers); 1.2: controls (cluster
# `controls`, finding `control`)
SCHEMA_VERSION = "1.2"
SCHEMA_RESOURCE = "scan-result.schema.json"  # in the reports.schemas package
TOOL_NAME = "felixscan"
FORMATS = ("text", "json", "sarif", "junit", "ocsf", "csv")  # what `scan --format` takes
# `control` last (since 1.2): a reader that takes the columns by position keeps working.
CSV_COLUMNS = ("cluster", "node", "id", "severity", "title", "message", "fix", "waiver",
               "control")
SARIF_SCHEMA_URI = ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/"
                    "sarif-schema-2.1.0.json")
OCSF_VERSION = "1.5.0"  # the OCSF schema version the events follow (py-ocsf-models 0.10 checks it)
CONTROL = FELIX  # the control a finding of a document older than 1.2 belongs to
# What each control asserts (docs/controls.md): SARIF rule descriptions, OCSF compliance.desc,
# the reports' control headings.
CONTROL_TEXTS = {
    FELIX: "The Calico Felix Prometheus metrics endpoint (TCP 9091 by default) is disabled in "
           "configuration and unreachable on every node",
    TYPHA: "The Calico Typha Prometheus metrics endpoint (TCP 9093 by default) is disabled in "
           "configuration and unreachable on every node Typha runs on",
    KUBE_CONTROLLERS: "The calico-kube-controllers Prometheus metrics endpoint (TCP 9094 by "
                      "default) is disabled in configuration and unreachable on its pod IP",
}
CONTROL_TEXT = CONTROL_TEXTS[FELIX]
CONTROL_NAMES = {FELIX: "Felix", TYPHA: "Typha", KUBE_CONTROLLERS: "calico-kube-controllers"}
# Column headings (the web page, the report's summary) and each endpoint's default port.
CONTROL_SHORT = {FELIX: "Felix", TYPHA: "Typha", KUBE_CONTROLLERS: "kube-controllers"}
CONTROL_PORTS = {FELIX: 9091, TYPHA: 9093, KUBE_CONTROLLERS: 9094}
# Finding IDs more than one control raises (the finding's `control` tells them apart); any
# other ID belongs to the control its prefix names, else to felix-metrics.
_EVERY_CONTROL = frozenset({"CLUSTER-SCAN-FAILED", "DRIFT-DISABLED-BUT-OPEN",
                            "DRIFT-ENABLED-BUT-CLOSED", "NODE-NOT-VERIFIED"})
_COMPONENT_CONTROLS = frozenset({"CONTROL-NOT-CHECKED", "COMPONENT-NOT-INSTALLED"})

_SEVERITIES = ("critical", "high", "medium", "low", "info")
_SARIF_LEVEL = {"critical": "error", "high": "error", "medium": "warning", "low": "note",
                "info": "note"}
# GitHub code scanning ranks security results by this CVSS-like score (a string).
_SECURITY_SEVERITY = {"critical": "9.5", "high": "8.0", "medium": "5.5", "low": "3.0",
                      "info": "0.0"}
_OCSF_SEVERITY = {"critical": (5, "Critical"), "high": (4, "High"), "medium": (3, "Medium"),
                  "low": (2, "Low"), "info": (1, "Informational")}
# OCSF compliance status: 1 Pass, 2 Warning (no result for want of information), 3 Fail.
_OCSF_STATUS = {"pass": (1, "Pass"), "compliant": (1, "Pass"), "unknown": (2, "Warning"),
                "error": (2, "Warning"), "fail": (3, "Fail"), "non_compliant": (3, "Fail"),
                "waived": (3, "Fail")}  # the check fails; the finding is Suppressed
# XML 1.0 has no way to carry these characters at all, escaped or not.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


# --- the document (JSON contract) ----------------------------------------------------------


class Tool(TypedDict):
    name: str
    version: str


class DeclaredDoc(TypedDict):
    enabled: bool | None
    source: str | None
    port: int | None
    host: str | None


class AddressDoc(TypedDict):
    address: str | None
    state: str
    protocol: str | None
    felix: bool | None


class NodeDoc(TypedDict):
    name: str
    address: str | None
    port: int
    state: str
    protocol: str | None
    felix: bool | None
    verdict: str
    waiver: str | None
    node_view: NotRequired[dict[str, Any] | None]  # node-check's view (scan: when configured)
    declared_enabled: bool | None
    declared_source: str | None
    declared_host: str | None
    pod_current: bool | None
    error: str | None
    addresses: list[AddressDoc]
    declared_reason: NotRequired[str | None]  # scan only: not stored per node
    pod: NotRequired[str | None]  # scan only


class FindingDoc(TypedDict):
    id: str
    severity: str
    node: str | None
    message: str
    title: str
    fix: str
    evidence: dict[str, Any]
    waiver: str | None
    controls: list[dict[str, Any]]  # the compliance frameworks' controls it evidences
    control: NotRequired[str]  # since 1.2: the felixscan control that raised it (CONTROL_IDS)


# "pass" is a keyword: the functional syntax
TotalsDoc = TypedDict("TotalsDoc", {"nodes": int, "pass": int, "fail": int, "unknown": int,
                                     "waived": int})


class TargetDoc(TypedDict):
    """One target of typha-metrics or kube-controllers-metrics: a pod of the component at one
    address (Typha's node, kube-controllers' pod IP), on the node it runs on."""

    node: str
    pod: str | None
    address: str | None
    port: int
    state: str
    protocol: str | None
    metrics: bool | None  # the listener served the component's own metrics
    verdict: str
    declared_enabled: bool | None
    declared_source: str | None
    error: str | None


ControlTotalsDoc = TypedDict("ControlTotalsDoc", {"targets": int, "pass": int, "fail": int,
                                                  "unknown": int, "waived": int})


class ControlDoc(TypedDict):
    """One control's result in the cluster's scan (since 1.2)."""

    id: str
    status: str
    installed: bool
    declared: DeclaredDoc
    targets: NotRequired[list[TargetDoc]]  # every control but felix-metrics
    targets_in: NotRequired[str]  # felix-metrics: "nodes", its targets are the cluster's nodes
    error: str | None
    namespace: str | None
    workload: str | None
    image: str | None
    totals: ControlTotalsDoc


class ScanRefDoc(TypedDict):
    scan_id: int
    started_at: str
    finished_at: str


class ClusterDoc(TypedDict):
    name: str
    status: str
    install: str
    declared: DeclaredDoc
    declared_detail: dict[str, Any] | None
    nodes: list[NodeDoc]
    findings: list[FindingDoc]
    error: str | None
    totals: TotalsDoc
    waivers: list[dict[str, Any]]
    controls: NotRequired[list[ControlDoc]]  # since 1.2: one per control checked
    vantages: NotRequired[list[dict[str, Any]]]  # report only: latest scan per vantage point
    scan: ScanRefDoc
    timings: NotRequired[dict[str, float]]  # scan only: seconds per stage
    nodes_pruned_at: NotRequired[str | None]  # report only: retention removed the node rows


class ReportDoc(TypedDict):
    title: str
    generated_at: str
    since: str
    until: str
    sha256: str
    scan_ids: list[int]
    not_scanned: list[str]
    emulated: bool


class Document(TypedDict):
    schema_version: str
    tool: Tool
    clusters: list[ClusterDoc]
    scan_id: NotRequired[int]  # a scan: these three
    started_at: NotRequired[str]
    finished_at: NotRequired[str]
    report: NotRequired[ReportDoc]  # a report from the database: this instead
    vantage: NotRequired[str]  # a scan: where its probes came from


def tool() -> Tool:
    return {"name": TOOL_NAME, "version": __version__}


def scan_document(*, scan_id: int, started_at: datetime, finished_at: datetime,
                  clusters: Iterable[ClusterResult], vantage: str | None = None) -> Document:
    """The JSON document of one scan (`felixscan scan --format json`)."""
    doc: Document = {"schema_version": SCHEMA_VERSION, "tool": tool(), "scan_id": scan_id,
                     "started_at": started_at.isoformat(),
                     "finished_at": finished_at.isoformat(),
                     "clusters": [cluster_json(c, scan_id=scan_id) for c in clusters]}
    if vantage is not None:
        doc["vantage"] = vantage
    return doc


def cluster_json(c: ClusterResult, *, scan_id: int = 0) -> ClusterDoc:
    """One cluster of a scan. A superset of what `scan --json` printed before schema 1.0."""
    declared = c.declared
    return {
        "name": c.cluster,
        "status": c.status,
        "install": c.install,
        "declared": {"enabled": declared.enabled, "source": declared.source,
                     "port": declared.port, "host": declared.host}
        if declared else {"enabled": None, "source": None, "port": None, "host": None},
        "declared_detail": {"loopback_only": declared.loopback_only,
                            "random_port": declared.random_port, "tls": declared.tls,
                            "client_auth": declared.client_auth,
                            "felix_version": declared.felix_version,
                            "reason": declared.reason} if declared else None,
        "nodes": [_node_json(n) for n in c.nodes],
        "findings": [_finding_json(f.id, severity=f.severity, node=f.node, message=f.message,
                                   fix=f.remediation, evidence=f.evidence, waiver=f.waiver,
                                   control=f.control)
                     for f in c.findings],
        "error": c.error,
        "timings": {k: round(v, 3) for k, v in c.timings.items()},
        "totals": _totals(n.verdict for n in c.nodes),
        "waivers": [waiver_json(w) for w in c.waivers],
        "controls": [_control_json(r) for r in _scan_controls(c)],
        "scan": {"scan_id": scan_id, "started_at": c.started_at.isoformat(),
                 "finished_at": c.finished_at.isoformat()},
    }


def _scan_controls(c: ClusterResult) -> tuple[ControlResult, ...]:
    """The cluster's control results; a result made without them is Felix's alone."""
    if c.controls:
        return c.controls
    snapshot = c.snapshot
    return (ControlResult(control=FELIX, status=c.status, declared=c.declared, targets=c.nodes,
                          findings=c.findings, error=c.error,
                          namespace=snapshot.namespace if snapshot else None,
                          workload=snapshot.daemonset if snapshot else None,
                          image=snapshot.image if snapshot else None),)


def _control_json(r: ControlResult) -> ControlDoc:
    d = r.declared
    totals = _totals(t.verdict for t in r.targets)
    doc: ControlDoc = {
        "id": r.control, "status": r.status, "installed": r.installed,
        "declared": {"enabled": d.enabled, "source": d.source, "port": d.port, "host": d.host}
        if d else {"enabled": None, "source": None, "port": None, "host": None},
        "error": r.error, "namespace": r.namespace, "workload": r.workload, "image": r.image,
        "totals": {"targets": totals["nodes"], "pass": totals["pass"], "fail": totals["fail"],
                   "unknown": totals["unknown"], "waived": totals["waived"]}}
    if r.control == FELIX:
        doc["targets_in"] = "nodes"
    else:
        doc["targets"] = [_target_json(t) for t in r.targets]
    return doc


def _target_json(t: NodeResult) -> TargetDoc:
    return {"node": t.node, "pod": t.declared.pod, "address": t.address, "port": t.port,
            "state": t.probe.state, "protocol": t.probe.protocol, "metrics": t.probe.felix,
            "verdict": t.verdict, "declared_enabled": t.declared.enabled,
            "declared_source": t.declared.source, "error": t.probe.error}


def _node_json(n: NodeResult) -> NodeDoc:
    return {"name": n.node, "address": n.address, "port": n.port, "state": n.probe.state,
            "protocol": n.probe.protocol, "felix": n.probe.felix, "verdict": n.verdict,
            "waiver": n.waiver, "node_view": n.view.as_json() if n.view else None,
            "declared_enabled": n.declared.enabled,
            "declared_source": n.declared.source,
            "declared_host": n.declared.host, "declared_reason": n.declared.reason,
            "pod": n.declared.pod, "pod_current": n.pod_current, "error": n.probe.error,
            "addresses": [{"address": p.address, "state": p.state, "protocol": p.protocol,
                           "felix": p.felix} for p in n.probes]}


def _finding_json(rule_id: str, *, severity: str, node: str | None, message: str, fix: str,
                  evidence: Mapping[str, Any], waiver: str | None,
                  control: str = FELIX) -> FindingDoc:
    rule = RULES.get(rule_id)
    return {"id": rule_id, "severity": severity, "node": node, "message": message,
            "title": rule.title if rule else rule_id,
            "fix": fix or (rule.remediation if rule else ""),
            "evidence": _plain(evidence), "waiver": waiver,
            "controls": catalogue().refs(rule_id), "control": control}


def rule_controls(rule_id: str) -> tuple[str, ...]:
    """The controls whose checks can raise finding `rule_id`, in CONTROL_IDS order."""
    if rule_id in _EVERY_CONTROL:
        return CONTROL_IDS
    if rule_id in _COMPONENT_CONTROLS:
        return (TYPHA, KUBE_CONTROLLERS)
    if rule_id.startswith("TYPHA-"):
        return (TYPHA,)
    if rule_id.startswith("KUBE-CONTROLLERS-"):
        return (KUBE_CONTROLLERS,)
    return (FELIX,)


def control_of(f: FindingDoc) -> str:
    """The control a finding of the document belongs to (felix-metrics before 1.2)."""
    return f.get("control") or CONTROL


def controls_of(c: ClusterDoc) -> list[ControlDoc]:
    """The cluster's controls; a document older than 1.2 has Felix's alone, made from the
    cluster's own fields."""
    if "controls" in c:
        return c["controls"]
    totals = c["totals"]
    return [{"id": FELIX, "status": c["status"], "installed": True, "declared": c["declared"],
             "targets_in": "nodes", "error": c["error"], "namespace": None, "workload": None,
             "image": None,
             "totals": {"targets": totals["nodes"], "pass": totals["pass"],
                        "fail": totals["fail"], "unknown": totals["unknown"],
                        "waived": totals.get("waived", 0)}}]


def _totals(verdicts: Iterable[str]) -> TotalsDoc:
    totals: TotalsDoc = {"nodes": 0, "pass": 0, "fail": 0, "unknown": 0, "waived": 0}
    for v in verdicts:
        totals["nodes"] += 1
        if v == "pass":
            totals["pass"] += 1
        elif v == "fail":
            totals["fail"] += 1
        elif v == "waived":
            totals["waived"] += 1
        else:
            totals["unknown"] += 1
    return totals


def report_document(data: ReportData, *, sha256: str) -> Document:
    """The JSON document of a report from the database: each cluster's latest scan in the
    period, with the report's period, scans and data hash (the one the PDF prints)."""
    return {"schema_version": SCHEMA_VERSION, "tool": tool(),
            "report": {"title": data.title, "generated_at": _iso(data.generated_at),
                       "since": data.since.isoformat(), "until": data.until.isoformat(),
                       "sha256": sha256, "scan_ids": list(data.scan_ids),
                       "not_scanned": list(data.not_scanned), "emulated": data.emulated},
            "clusters": [_report_cluster(c) for c in data.clusters]}


def _report_cluster(c: ClusterReport) -> ClusterDoc:
    d = c.declared
    host = d.get("host")
    detail = {"loopback_only": isinstance(host, str) and (
                  host.lower() in ("localhost", "::1", "[::1]") or host.startswith("127.")),
              "random_port": c.declared_port == 0, "tls": bool(d.get("tls")),
              "client_auth": d.get("client_auth"), "felix_version": d.get("felix_version"),
              "reason": d.get("reason")} if d else None
    return {
        "name": c.name,
        "status": c.status,
        "install": c.install,
        "declared": {"enabled": c.declared_enabled, "source": c.declared_source,
                     "port": c.declared_port, "host": host},
        "declared_detail": detail,
        "nodes": [_report_node(n) for n in c.nodes],
        "findings": [_finding_json(f.id, severity=f.severity, node=f.node, message=f.message,
                                   fix=f.remediation, evidence=f.evidence, waiver=f.waiver,
                                   control=f.control)
                     for f in c.findings],
        "error": c.error,
        # The stored counts: they outlive the node rows that retention prunes.
        "totals": {"nodes": c.nodes_total, "pass": c.nodes_pass, "fail": c.nodes_fail,
                   "unknown": c.nodes_unknown, "waived": c.nodes_waived},
        "waivers": [dict(w) for w in c.waivers],
        # Scans stored before the control catalogue: Felix's alone, from the cluster's fields.
        "controls": [report_control(e, felix_host=c.declared.get("host"))
                     for e in c.controls] or [_report_felix(c)],
        "vantages": [{"vantage": v.vantage, "scan_id": v.scan.scan_id,
                      "started_at": _iso(v.scan.started_at), "status": v.scan.status,
                      "failing": list(v.failing), "unknown": v.unknown}
                     for v in c.vantages],
        "scan": {"scan_id": c.latest.scan_id, "started_at": _iso(c.latest.started_at),
                 "finished_at": _iso(c.latest.finished_at)},
        "nodes_pruned_at": _iso(c.nodes_pruned_at) if c.nodes_pruned_at else None,
    }


def report_control(e: ControlEntry, *, felix_host: str | None = None,
                   targets_in: str = "nodes") -> ControlDoc:
    """One control's document; felix-metrics's targets are named by `targets_in` (the
    report's `nodes`, the web API's `nodes_not_passing`), its host `felix_host` when the
    control's row records none."""
    host = e.declared_host
    if host is None and e.control == FELIX:
        host = felix_host
    doc: ControlDoc = {
        "id": e.control, "status": e.status, "installed": e.installed,
        "declared": {"enabled": e.declared_enabled, "source": e.declared_source,
                     "port": e.declared_port, "host": host},
        "error": e.error, "namespace": e.namespace, "workload": e.workload, "image": e.image,
        "totals": {"targets": e.targets_total, "pass": e.targets_pass, "fail": e.targets_fail,
                   "unknown": e.targets_unknown, "waived": e.targets_waived}}
    if e.control == FELIX:
        doc["targets_in"] = targets_in
    else:
        doc["targets"] = [{"node": t.name, "pod": t.pod, "address": t.address, "port": t.port,
                           "state": t.state, "protocol": t.protocol, "metrics": t.felix,
                           "verdict": t.verdict, "declared_enabled": t.declared_enabled,
                           "declared_source": t.declared_source, "error": t.error}
                          for t in e.targets]
    return doc


def _report_felix(c: ClusterReport) -> ControlDoc:
    return {"id": FELIX, "status": c.status, "installed": True,
            "declared": {"enabled": c.declared_enabled, "source": c.declared_source,
                         "port": c.declared_port, "host": c.declared.get("host")},
            "targets_in": "nodes", "error": c.error, "namespace": c.namespace,
            "workload": c.daemonset, "image": c.image,
            "totals": {"targets": c.nodes_total, "pass": c.nodes_pass, "fail": c.nodes_fail,
                       "unknown": c.nodes_unknown, "waived": c.nodes_waived}}


def _report_node(n: NodeEntry) -> NodeDoc:
    probed = n.addresses or [{"address": n.address, "state": n.state,
                              "protocol": n.protocol, "felix": n.felix}]
    return {"name": n.name, "address": n.address, "port": n.port, "state": n.state,
            "protocol": n.protocol, "felix": n.felix, "verdict": n.verdict,
            "waiver": None,  # stored per scan (`waivers`), not per node
            "node_view": dict(n.node_view) if n.node_view else None,
            "declared_enabled": n.declared_enabled, "declared_source": n.declared_source,
            "declared_host": n.declared_host, "pod_current": n.pod_current, "error": n.error,
            "addresses": [{"address": a.get("address"), "state": str(a.get("state")),
                           "protocol": a.get("protocol"), "felix": a.get("felix")}
                          for a in probed]}


def schema() -> dict[str, Any]:
    """The JSON Schema of `Document` (draft 2020-12), shipped in the package."""
    text = resources.files("reports.schemas").joinpath(SCHEMA_RESOURCE).read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


# --- encoders ------------------------------------------------------------------------------


def encode(doc: Document, fmt: str) -> str:
    """`doc` as `fmt`: json, sarif, junit, ocsf or csv (text needs the scan: `scan_text`)."""
    encoders: dict[str, Callable[[Document], str]] = {
        "json": to_json, "sarif": to_sarif, "junit": to_junit, "ocsf": to_ocsf,
        "csv": to_csv}
    if fmt not in encoders:
        raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(encoders)}")
    return encoders[fmt](doc)


def render_scan(fmt: str, *, scan_id: int, started_at: datetime, finished_at: datetime,
                clusters: Sequence[ClusterResult], vantage: str | None = None) -> str:
    """What `felixscan scan --format FMT` prints for one scan."""
    if fmt == "text":
        return scan_text(clusters)
    return encode(scan_document(scan_id=scan_id, started_at=started_at,
                                finished_at=finished_at, clusters=clusters,
                                vantage=vantage), fmt)


def write_output(path: str | os.PathLike[str], text: str) -> int:
    """Write `text` to `path` atomically (a reader sees the old file or the new one, never half
    of one); the bytes written. A new file gets the mode a shell redirect would give it, an
    existing one keeps its mode."""
    target = Path(path)
    data = text.encode("utf-8")
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = None
    tmp = target.resolve().parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(data)


def to_json(doc: Document) -> str:
    return json.dumps(doc, indent=2, default=_jsonable) + "\n"


def scan_text(clusters: Iterable[ClusterResult]) -> str:
    """The console summary: one paragraph per cluster."""
    return "".join(summary_line(c) + "\n" for c in clusters)


def summary_line(c: ClusterResult) -> str:
    """A cluster's paragraph: its status and Felix's nodes, then one line per control."""
    counts = {v: sum(1 for n in c.nodes if n.verdict == v)
              for v in ("pass", "fail", "unknown", "waived")}
    head = f"{c.cluster}: {c.status.upper().replace('_', '-')}"
    if c.status == "error" and not c.nodes and c.declared is None:
        return f"{head} ({c.error})" + "".join("\n  " + control_line(r, shown=c.error)
                                               for r in c.controls)
    controls = "".join("\n  " + control_line(r) for r in c.controls)
    if c.controls and c.control(FELIX) is None:  # Felix's endpoint is not checked here
        line = f"{head} [{c.install}]"
    else:
        declared = c.declared
        state = ("unknown" if declared is None or declared.enabled is None
                 else "enabled" if declared.enabled else "disabled")
        source = f" by {declared.source}" if declared else ""
        line = (f"{head} [{c.install}] metrics {state}{source}; nodes: {len(c.nodes)} "
                f"({counts['pass']} pass, {counts['fail']} fail, {counts['unknown']} unknown"
                + (f", {counts['waived']} waived" if counts["waived"] else "") + ")")
    if c.waivers:
        line += f"; {len(c.waivers)} waiver(s) applied"
    line += controls
    worst = [f for f in c.findings
             if f.severity in ("critical", "high") and f.waiver is None][:3]
    for f in worst:
        which = f" [{f.control}]" if f.control != FELIX else ""
        line += (f"\n  {f.severity.upper()} {f.id}{which}{' ' + f.node if f.node else ''}: "
                 f"{f.message}")
    if len([f for f in c.findings if f.severity in ("critical", "high")]) > 3:
        line += "\n  ... (--json for every finding)"
    if c.error and not any(r.error and r.error in c.error for r in c.controls):
        line += f"\n  {c.error}"  # not already on a control's line
    return line


def control_line(r: ControlResult, *, shown: str | None = None) -> str:
    """One control of a cluster on one line: its status, declared state and targets (`shown`:
    an error already printed, not repeated)."""
    head = f"{r.control}: {r.status.upper().replace('_', '-')}"
    error = f"; {r.error}" if r.error and r.error != shown else ""
    if not r.installed:
        where = f" ({r.namespace}/{r.workload})" if r.namespace and r.workload else ""
        return f"{head}; not installed{where}"
    d = r.declared
    if d is None:
        return head + (error or ("" if r.error else "; declared state unknown"))
    state = "unknown" if d.enabled is None else "enabled" if d.enabled else "disabled"
    counts = {v: sum(1 for t in r.targets if t.verdict == v)
              for v in ("pass", "fail", "unknown", "waived")}
    noun = "node" if r.control == FELIX else "target"
    text = (f"{head}; metrics {state} by {d.source}, port {d.port}; {len(r.targets)} {noun}"
            f"{'' if len(r.targets) == 1 else 's'} ({counts['pass']} pass, {counts['fail']} "
            f"fail, {counts['unknown']} unknown"
            + (f", {counts['waived']} waived" if counts["waived"] else "") + ")")
    return text + error


# SARIF 2.1.0 -------------------------------------------------------------------------------


def to_sarif(doc: Document) -> str:
    """One run: the felixscan driver with one rule per finding ID, one result per finding,
    located logically at cluster or cluster/node."""
    rule_ids = list(RULES)
    rule_ids += sorted({f["id"] for c in doc["clusters"] for f in c["findings"]} - set(RULES))
    rule_index = {rule_id: i for i, rule_id in enumerate(rule_ids)}
    seen: dict[str, set[str]] = {}
    for c in doc["clusters"]:
        for f in c["findings"]:
            seen.setdefault(f["id"], set()).add(control_of(f))
    rules = [_sarif_rule(rule_id, doc, seen.get(rule_id, set())) for rule_id in rule_ids]

    locations: list[dict[str, Any]] = []
    location_index: dict[tuple[str, str | None], int] = {}

    def logical(cluster: str, node: str | None) -> int:
        key = (cluster, node)
        if key not in location_index:
            parent = logical(cluster, None) if node is not None else None
            entry: dict[str, Any] = {
                "name": node if node is not None else cluster,
                "fullyQualifiedName": f"{cluster}/{node}" if node is not None else cluster,
                "kind": "node" if node is not None else "cluster"}
            if parent is not None:
                entry["parentIndex"] = parent
            location_index[key] = len(locations)
            locations.append(entry)
        return location_index[key]

    results: list[dict[str, Any]] = []
    for c in doc["clusters"]:
        verdicts = _verdicts(c)
        statuses = {k["id"]: k["status"] for k in controls_of(c)}
        waivers = {w["id"]: w for w in c.get("waivers", [])}
        for f in c["findings"]:
            index = logical(c["name"], f["node"])
            where = locations[index]
            control = control_of(f)
            props: dict[str, Any] = {"cluster": c["name"], "node": f["node"],
                                     "control": control, "severity": f["severity"],
                                     "title": f["title"], "fix": f["fix"],
                                     "evidence": f["evidence"],
                                     "scan_id": c["scan"]["scan_id"]}
            if f["node"] is not None:
                props["verdict"] = verdicts.get((control, f["node"]))
            else:
                props["cluster_status"] = c["status"]
                props["control_status"] = statuses.get(control)
            results.append({
                "ruleId": f["id"],
                "ruleIndex": rule_index[f["id"]],
                "level": _SARIF_LEVEL.get(f["severity"], "warning"),
                "message": {"text": f["message"]},
                "locations": [{"logicalLocations": [{
                    "index": index, "name": where["name"],
                    "fullyQualifiedName": where["fullyQualifiedName"],
                    "kind": where["kind"]}]}],
                "partialFingerprints": {"felixscanFinding/v1": _fingerprint(c["name"], f)},
                "properties": props,
                **_sarif_suppression(waivers.get(f.get("waiver") or "")),
            })

    taxonomies = _sarif_taxonomies()
    taxonomy_index = {t["name"]: i for i, t in enumerate(taxonomies)}
    for rule in rules:
        for rel in rule.get("relationships", []):
            target = rel["target"]
            t = taxonomy_index[target["toolComponent"]["name"]]
            target["toolComponent"]["index"] = t
            target["index"] = next(i for i, taxon in enumerate(taxonomies[t]["taxa"])
                                   if taxon["id"] == target["id"])
    run: dict[str, Any] = {
        "tool": {"driver": {"name": TOOL_NAME, "version": doc["tool"]["version"],
                            "rules": rules,
                            "supportedTaxonomies": [{"name": t["name"], "index": i}
                                                    for i, t in enumerate(taxonomies)]}},
        "taxonomies": taxonomies,
        "results": results,
        "properties": _run_properties(doc),
    }
    if locations:
        run["logicalLocations"] = locations
    if "scan_id" in doc:
        errors = [c for c in doc["clusters"] if c["status"] == "error"]
        run["invocations"] = [{
            "executionSuccessful": not errors,
            "startTimeUtc": _utc(doc["started_at"]),
            "endTimeUtc": _utc(doc["finished_at"]),
            "toolExecutionNotifications": [
                {"level": "error", "message": {"text": f"{c['name']}: {c['error']}"}}
                for c in errors],
        }]
    log = {"$schema": SARIF_SCHEMA_URI, "version": "2.1.0", "runs": [run]}
    return json.dumps(log, indent=2, default=_jsonable) + "\n"


def _sarif_suppression(waiver: Mapping[str, Any] | None) -> dict[str, Any]:
    """A waived finding: SARIF's own way to say "accepted, not fixed" (an external
    suppression, status accepted), so viewers show it apart and do not count it as open."""
    if not waiver:
        return {}
    return {"suppressions": [{
        "kind": "external", "status": "accepted",
        "justification": f"waiver {waiver['id']}: {waiver['reason']} (approved by "
                         f"{waiver['approved_by']}, {waiver['created']} to {waiver['expires']})",
        "properties": {"waiver": dict(waiver)}}]}


def _sarif_rule(rule_id: str, doc: Document, seen: set[str]) -> dict[str, Any]:
    rule = RULES.get(rule_id)
    # An ID this version does not know: the controls its findings name.
    known = rule_controls(rule_id) if rule is not None or not seen else ()
    controls = [c for c in CONTROL_IDS if c in seen or c in known]
    controls += sorted(seen - set(controls))  # one another felixscan version knew
    if rule is None:  # an ID stored by another felixscan version: describe it by its findings
        found = next(f for c in doc["clusters"] for f in c["findings"] if f["id"] == rule_id)
        title, fix, severity = found["title"], found["fix"], found["severity"]
    else:
        title, fix, severity = rule.title, rule.remediation, rule.severity
    entry: dict[str, Any] = {
        "id": rule_id,
        "name": "".join(part.capitalize() for part in rule_id.split("-")),
        "shortDescription": {"text": title},
        "fullDescription": {"text": f"{title}. Control: {CONTROL_TEXTS[controls[0]]}."
                            if len(controls) == 1 and controls[0] in CONTROL_TEXTS else
                            f"{title}. Raised by the controls {', '.join(controls)} (each "
                            "result names its own)."},
        "help": {"text": fix, "markdown": fix},
        "defaultConfiguration": {"level": _SARIF_LEVEL.get(severity, "warning")},
        # control_ids: the felixscan controls whose checks raise it (a result's `control`
        # property says which one did)
        "properties": {"severity": severity, "tags": ["security", "compliance", "calico"],
                       "security-severity": _SECURITY_SEVERITY.get(severity, "5.5"),
                       "control_ids": controls},
    }
    # The controls this finding evidences, as SARIF relationships into the run's taxonomies
    # (one per standard of the control catalogue).
    relationships = [{"target": {"id": m["control"], "toolComponent": {"name": m["standard"]}},
                      "kinds": ["relevant"],
                      "properties": {"strength": m["strength"], "title": m["title"]}}
                     for m in catalogue().refs(rule_id)]
    if relationships:
        entry["relationships"] = relationships
    return entry


def _sarif_taxonomies() -> list[dict[str, Any]]:
    """The standards of the control catalogue, each a SARIF taxonomy of its controls."""
    cat = catalogue()
    return [{"name": s.id, "fullName": s.title, "version": s.version,
             "organization": s.publisher, "informationUri": s.source_url,
             "isComprehensive": False,
             "taxa": [{"id": c.id, "name": c.title}
                      for c in cat.controls if c.standard == s.id]}
            for s in cat.standards]


def _verdicts(c: ClusterDoc) -> dict[tuple[str, str], str]:
    """(control, node) -> verdict: Felix's nodes, the other controls' targets (a node with
    several targets of one control: the worst)."""
    out = {(FELIX, n["name"]): n["verdict"] for n in c["nodes"]}
    order = ("fail", "unknown", "waived", "pass")
    for k in controls_of(c):
        for t in k.get("targets", []):
            key = (k["id"], t["node"])
            before = out.get(key)
            if before is None or order.index(t["verdict"]) < order.index(before):
                out[key] = t["verdict"]
    return out


def _run_properties(doc: Document) -> dict[str, Any]:
    props: dict[str, Any] = {"schema_version": doc["schema_version"], "clusters": [
        {"name": c["name"], "status": c["status"], "install": c["install"],
         "error": c["error"], "totals": c["totals"], "scan": c["scan"],
         "controls": [{"id": k["id"], "status": k["status"], "installed": k["installed"],
                       "totals": k["totals"]} for k in controls_of(c)]}
        for c in doc["clusters"]]}
    if "scan_id" in doc:
        props["scan_id"] = doc["scan_id"]
    if "report" in doc:
        props["report"] = doc["report"]
    return props


def _fingerprint(cluster: str, f: FindingDoc) -> str:
    """Stable across scans for the same issue at the same place (for de-duplication)."""
    port = f["evidence"].get("port") if f["node"] is not None else None
    parts = [cluster, f["node"] or "", f["id"], "" if port is None else str(port)]
    if control_of(f) != FELIX:  # Felix's keep the fingerprints they had before 1.2
        parts.append(control_of(f))
    key = "\0".join(parts)
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


# JUnit XML ---------------------------------------------------------------------------------


def to_junit(doc: Document) -> str:
    """A testsuite per cluster. Felix's cases (classname `felixscan.CLUSTER`): a testcase
    `cluster` for the cluster's own state, then one per node. Every other control checked
    adds its cases under classname `felixscan.CLUSTER.CONTROL`: a testcase named after the
    control for its own state, then one per target (`NODE/POD`). <failure> for fail, <error>
    for unknown or a control that could not be checked (never <skipped>: a check that could
    not run must not read as green), <skipped> for a waived node, nothing for pass."""
    root = ET.Element("testsuites", name=TOOL_NAME)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for c in doc["clusters"]:
        suite = _junit_suite(c)
        root.append(suite)
        for key in totals:
            totals[key] += int(suite.get(key, "0"))
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


class _Counts:
    def __init__(self) -> None:
        self.tests = self.failures = self.errors = self.skipped = 0


def _junit_suite(c: ClusterDoc) -> ET.Element:
    started = _parse_time(c["scan"]["started_at"])
    finished = _parse_time(c["scan"]["finished_at"])
    suite = ET.Element("testsuite", name=_xml(c["name"]),
                       # the JUnit schema's timestamp has no zone: UTC
                       timestamp=started.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
                       if started else "",
                       time=f"{max((finished - started).total_seconds(), 0):.3f}"
                       if started and finished else "0")
    properties = ET.SubElement(suite, "properties")
    declared = c["declared"]
    controls = controls_of(c)
    for name, value in (("status", c["status"]), ("install", c["install"]),
                        ("scan_id", c["scan"]["scan_id"]),
                        ("started_at", c["scan"]["started_at"]),
                        ("declared_enabled", declared["enabled"]),
                        ("declared_source", declared["source"]),
                        ("declared_port", declared["port"]),
                        *((f"control:{k['id']}", k["status"]) for k in controls)):
        ET.SubElement(properties, "property", name=name,
                      value=_xml("" if value is None else str(value).lower()
                                 if isinstance(value, bool) else str(value)))

    by_control: dict[str, list[FindingDoc]] = {}
    for f in c["findings"]:
        by_control.setdefault(control_of(f), []).append(f)
    counts = _Counts()
    for k in controls:
        findings = by_control.get(k["id"], [])
        if k["id"] == FELIX:
            _junit_cases(suite, counts, classname=_xml(f"{TOOL_NAME}.{c['name']}"),
                         own="cluster", status=k["status"], error=k["error"] or c["error"],
                         findings=findings, targets=[_felix_target(n) for n in c["nodes"]])
        else:
            _junit_cases(suite, counts, classname=_xml(f"{TOOL_NAME}.{c['name']}.{k['id']}"),
                         own=k["id"], status=k["status"], error=k["error"], findings=findings,
                         targets=[_component_target(t, k["id"])
                                  for t in k.get("targets", [])])
    suite.set("tests", str(counts.tests))
    suite.set("failures", str(counts.failures))
    suite.set("errors", str(counts.errors))
    suite.set("skipped", str(counts.skipped))
    return suite


class _Target(TypedDict):
    """A node of Felix or a target of another control, as a JUnit case shows it."""

    case: str  # the testcase's name
    component: str  # whose metrics: Felix, Typha, calico-kube-controllers
    node: str
    pod: str | None  # set: only the findings about this pod (several may share a node)
    address: str | None
    port: int
    state: str
    protocol: str | None
    served: bool | None  # the listener served the control's own metrics
    verdict: str
    waiver: str | None
    declared_enabled: bool | None
    declared_source: str | None
    declared_reason: str | None
    error: str | None


def _felix_target(n: NodeDoc) -> _Target:
    return {"case": n["name"], "component": "Felix", "node": n["name"], "pod": None,
            "address": n["address"], "port": n["port"], "state": n["state"],
            "protocol": n["protocol"],
            "served": n["felix"], "verdict": n["verdict"], "waiver": n.get("waiver"),
            "declared_enabled": n["declared_enabled"], "declared_source": n["declared_source"],
            "declared_reason": n.get("declared_reason"), "error": n["error"]}


def _component_target(t: TargetDoc, control: str) -> _Target:
    return {"case": f"{t['node']}/{t['pod']}" if t["pod"] else t["node"],
            "component": CONTROL_NAMES.get(control, control), "node": t["node"],
            "pod": t["pod"], "address": t["address"], "port": t["port"], "state": t["state"],
            "protocol": t["protocol"], "served": t["metrics"], "verdict": t["verdict"],
            "waiver": None, "declared_enabled": t["declared_enabled"],
            "declared_source": t["declared_source"], "declared_reason": None,
            "error": t["error"]}


def _junit_cases(suite: ET.Element, counts: _Counts, *, classname: str, own: str,
                 status: str, error: str | None, findings: Sequence[FindingDoc],
                 targets: Sequence[_Target]) -> None:
    """One control's cases: `own` (the control's own state and findings about no node),
    then one per target."""
    by_node: dict[str | None, list[FindingDoc]] = {}
    for f in findings:
        by_node.setdefault(f["node"], []).append(f)

    case = ET.SubElement(suite, "testcase", name=own, classname=classname)
    counts.tests += 1
    mine = by_node.get(None, [])
    failing = [f for f in mine if f["severity"] != "info"]
    if status == "error":
        _junit_result(case, "error", error or "the cluster could not be scanned",
                      "CLUSTER-SCAN-FAILED" if own == "cluster" else _types(failing) or "error",
                      mine)
        counts.errors += 1
    elif status == "non_compliant" and failing:
        # Informational findings ride along in the text but never make the case fail.
        _junit_result(case, "failure", _headline(failing), _types(failing), mine)
        counts.failures += 1
    elif mine:
        ET.SubElement(case, "system-out").text = _xml(_finding_text(mine))

    for t in targets:
        case = ET.SubElement(suite, "testcase", name=_xml(t["case"]), classname=classname)
        counts.tests += 1
        mine = [f for f in by_node.get(t["node"], [])
                if t["pod"] is None or f["evidence"].get("pod") in (None, t["pod"])]
        if t["verdict"] == "fail":
            message = _headline(mine) if mine else (
                f"verdict fail: metrics declared "
                f"{'enabled' if t['declared_enabled'] else 'disabled'} "
                f"({t['declared_source']}), port {t['port']} {t['state']}")
            _junit_result(case, "failure", message, _types(mine) or "fail", mine, target=t)
            counts.failures += 1
        elif t["verdict"] == "waived":
            # An accepted risk: neither passed nor failed; the finding text says which waiver.
            _junit_result(case, "skipped", f"waived: failing, risk accepted by {t['waiver']}"
                          if t["waiver"] else "waived: failing, risk accepted by a waiver",
                          "waived", mine, target=t)
            counts.skipped += 1
        elif t["verdict"] != "pass":
            reason = next((f["message"] for f in mine if f["id"] == "NODE-NOT-VERIFIED"),
                          None) or t["error"] or t["declared_reason"] or (
                f"not verified: declared {t['declared_source']}, port {t['state']}")
            _junit_result(case, "error", reason, _types(mine) or "unknown", mine, target=t)
            counts.errors += 1
        elif mine:
            ET.SubElement(case, "system-out").text = _xml(_finding_text(mine))


def _junit_result(case: ET.Element, tag: str, message: str, kind: str,
                  findings: Sequence[FindingDoc], *, target: _Target | None = None) -> None:
    element = ET.SubElement(case, tag, message=_xml(message), type=_xml(kind))
    text = _finding_text(findings)
    if target is not None:
        text = _probe_text(target) + ("\n\n" + text if text else "")
    element.text = _xml(text)


def _probe_text(t: _Target) -> str:
    declared = t["declared_enabled"]
    said = "unknown" if declared is None else "enabled" if declared else "disabled"
    served = "" if t["served"] is None else f" ({t['component']})" if t["served"] \
        else f" (not {t['component']})"
    pod = f" (pod {t['pod']})" if t["pod"] else ""
    text = (f"probe: {t['address'] or '(no address)'} port {t['port']}{pod}: {t['state']}"
            f"{' ' + t['protocol'] if t['protocol'] else ''}{served}; declared {said} "
            f"by {t['declared_source']}")
    return text + (f"; error: {t['error']}" if t["error"] else "")


def _headline(findings: Sequence[FindingDoc]) -> str:
    worst = min(findings, key=lambda f: _SEVERITIES.index(f["severity"])
                if f["severity"] in _SEVERITIES else len(_SEVERITIES))
    more = f" (+{len(findings) - 1} more)" if len(findings) > 1 else ""
    return f"{worst['id']}: {worst['message']}{more}"


def _types(findings: Sequence[FindingDoc]) -> str:
    return " ".join(dict.fromkeys(f["id"] for f in findings))


def _finding_text(findings: Sequence[FindingDoc]) -> str:
    blocks = []
    for f in findings:
        blocks.append(f"[{f['severity'].upper()}] {f['id']}: {f['message']}\n"
                      f"Fix: {f['fix']}\n"
                      f"Evidence: {json.dumps(f['evidence'], sort_keys=True, default=_jsonable)}")
    return "\n\n".join(blocks)


def _xml(text: str) -> str:
    """Text XML 1.0 can carry: characters it forbids are shown as \\xNN."""
    return _XML_ILLEGAL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# OCSF --------------------------------------------------------------------------------------


def to_ocsf(doc: Document) -> str:
    """A JSON array of OCSF Compliance Finding events (class 2003), one per finding, one
    event per line."""
    events = [json.dumps(e, default=_jsonable, separators=(",", ":")) for e in ocsf_events(doc)]
    if not events:
        return "[]\n"
    return "[\n" + ",\n".join(events) + "\n]\n"


def ocsf_events(doc: Document) -> list[dict[str, Any]]:
    out = []
    for c in doc["clusters"]:
        targets: dict[tuple[str, str], dict[str, Any]] = {
            (FELIX, n["name"]): {"address": n["address"], "port": n["port"],
                                 "state": n["state"], "verdict": n["verdict"]}
            for n in c["nodes"]}
        controls = {k["id"]: k for k in controls_of(c)}
        for k in controls.values():
            for t in k.get("targets", []):
                targets.setdefault((k["id"], t["node"]), {
                    "address": t["address"], "port": t["port"], "state": t["state"],
                    "verdict": t["verdict"], "pod": t["pod"]})
        started = _epoch_ms(c["scan"]["started_at"])
        finished = _epoch_ms(c["scan"]["finished_at"])
        for i, f in enumerate(c["findings"]):
            control = control_of(f)
            out.append(_ocsf_event(doc, c, f, i, target=targets.get((control, f["node"] or "")),
                                   control=controls.get(control), started=started,
                                   finished=finished))
    return out


def _ocsf_event(doc: Document, c: ClusterDoc, f: FindingDoc, i: int, *,
                target: dict[str, Any] | None, control: ControlDoc | None, started: int,
                finished: int) -> dict[str, Any]:
    severity_id, severity = _OCSF_SEVERITY.get(f["severity"], (99, "Other"))
    # A node's finding: that node's verdict for the finding's control; else the control's
    # status (the cluster's in a document older than 1.2).
    outcome = target["verdict"] if target is not None else \
        control["status"] if control is not None else c["status"]
    status_id, status = _OCSF_STATUS.get(outcome, (0, "Unknown"))
    scan_id = c["scan"]["scan_id"]
    control_id = control_of(f)
    resource: dict[str, Any]
    if f["node"] is None:
        resource = {"type": "Kubernetes Cluster", "name": c["name"], "uid": c["name"],
                    "data": {"status": c["status"], "install": c["install"],
                             "totals": dict(c["totals"])}}
        if control is not None:
            resource["data"]["control"] = {"id": control["id"], "status": control["status"],
                                           "installed": control["installed"],
                                           "totals": dict(control["totals"])}
    else:
        resource = {"type": "Kubernetes Node", "name": f["node"],
                    "uid": f"{c['name']}/{f['node']}", "group": {"name": c["name"]}}
        if target is not None:
            resource["data"] = dict(target)
    event: dict[str, Any] = {
        "activity_id": 1,
        "activity_name": "Create",
        "category_uid": 2,
        "category_name": "Findings",
        "class_uid": 2003,
        "class_name": "Compliance Finding",
        "type_uid": 200301,
        "type_name": "Compliance Finding: Create",
        "time": finished,
        "start_time": started,
        "end_time": finished,
        "timezone_offset": 0,
        "severity_id": severity_id,
        "severity": severity,
        # A waived finding is accepted, not open: OCSF's finding status Suppressed.
        "status_id": 3 if f.get("waiver") else 1,
        "status": "Suppressed" if f.get("waiver") else "New",
        "message": f["message"],
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": TOOL_NAME, "vendor_name": TOOL_NAME,
                        "version": doc["tool"]["version"]},
            "uid": f"{scan_id}/{c['name']}/{i}",
            "correlation_uid": str(scan_id),
            "event_code": f["id"],
        },
        "finding_info": {
            "uid": _fingerprint(c["name"], f),
            "title": f["title"],
            "desc": f["message"],
            "types": [f["id"]],
            "created_time": finished,
        },
        # The felixscan control that raised the finding is the OCSF compliance control; the
        # frameworks' controls it evidences are its requirements.
        "compliance": {
            "control": control_id,
            "desc": CONTROL_TEXTS.get(control_id, control_id),
            "standards": [f"{TOOL_NAME} {control_id}", *sorted(
                {catalogue().standard(m["standard"]).title for m in f.get("controls", [])})],
            "requirements": [f"{m['standard']} {m['control']}" for m in f.get("controls", [])],
            "status_id": status_id,
            "checks": [{"uid": f["id"], "name": f["title"], "severity": severity,
                        "severity_id": severity_id, "status": status,
                        "status_id": status_id}],
        },
        "remediation": {"desc": f["fix"]},
        "resources": [resource],
    }
    if f["evidence"]:
        event["evidences"] = [{"name": f["id"], "data": f["evidence"], "verdict_id": 0}]
    return event


# CSV ---------------------------------------------------------------------------------------


def to_csv(doc: Document) -> str:
    """One row per finding; cells a spreadsheet would run as a formula are neutralised the way
    `felixscan trend --format csv` does it. Rows end in CRLF (RFC 4180), which also makes the
    writer quote a cell holding a lone CR (with "\\n" lines it would not, and a reader would
    split the row there)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for c in doc["clusters"]:
        for f in c["findings"]:
            writer.writerow([csv_cell(v) for v in (c["name"], f["node"], f["id"],
                                                    f["severity"], f["title"], f["message"],
                                                    f["fix"], f.get("waiver"),
                                                    control_of(f))])
    return buffer.getvalue()


# --- helpers -------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Evidence as plain JSON values (mappings and tuples from the records included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def _iso(value: datetime) -> str:
    """ISO 8601 with its offset; a time read back without one (SQLite) is UTC."""
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()


def _parse_time(text: str) -> datetime | None:
    """An ISO time of the document; one without an offset is UTC (every stored time is)."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _utc(text: str) -> str:
    """RFC 3339 UTC with a Z, as SARIF asks for its times."""
    parsed = _parse_time(text)
    return text if parsed is None else \
        parsed.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _epoch_ms(text: str) -> int:
    parsed = _parse_time(text)
    return int(parsed.timestamp() * 1000) if parsed else 0


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """A CSV cell that a spreadsheet will not run as a formula."""
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_START) and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
