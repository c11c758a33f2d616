"""HTML and PDF rendering of a report: one set of Jinja2 templates, two outputs.

`render_html` turns `ReportData` (scanner.db.queries.history) into one self-contained HTML
page (inline CSS and SVG, no JavaScript, nothing fetched); `render_pdf` lays that same HTML
out with WeasyPrint and embeds the report data. The only code importing WeasyPrint.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from reports.charts import Scale, shared_scale, trend_chart
from reports.integrity import ATTACHMENT_NAME, HASH_PREFIX, report_hash
from reports.outputs import CONTROL_NAMES, CONTROL_PORTS, CONTROL_SHORT, CONTROL_TEXTS
from scanner.core.controls import catalogue, control_statuses
from scanner.core.errors import ReportError
from scanner.core.findings import RULES
from scanner.core.records import CONTROL_IDS, FELIX
from scanner.db.queries.history import (
    SEVERITY_ORDER,
    ClusterReport,
    ControlEntry,
    ControlPoint,
    DayPoint,
    FindingItem,
    NodeChange,
    NodeEntry,
    ReportData,
    natural_key,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
EXAMPLES_PER_FINDING = 8  # per-node findings shown with full evidence; the rest by name
WORST_FINDINGS = 12
# Above this many failing/unknown nodes the node table becomes a fixed-width listing:
# WeasyPrint lays a table out at about 1 ms per cell, a preformatted line at about 0.5 ms.
TABLE_ROWS = 400
# A control's targets (Typha's and kube-controllers' pods) listed one a row up to this many;
# beyond it, those not passing in full and the passing ones by name.
TARGET_ROWS = 60
CONTROL_CHART_HEIGHT = 120
# Lines per listing block, each block with its own header line and never split: two blocks of
# 40 lines (6.2 pt, line height 1.25) fill an A4 page, and a block never strands its header.
LISTING_LINES = 40


@cache
def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(yesno=_yesno, when=_when, pct=_pct, num=_num, state=_declared,
                       other_host=_other_host, code_spans=code_spans, duration=_duration)
    return env


def _duration(value: object) -> str:
    """Seconds as a person reads them: `4 ms` below a second (never `0.00 s`), else `1.25 s`."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    if value < 1:
        return f"{value * 1000:.0f} ms" if value >= 0.0005 else "<1 ms"
    return f"{value:.2f} s"


@cache
def _css() -> Markup:
    # Our own stylesheet, inlined verbatim: escaping it would turn `>` selectors into `&gt;`.
    return Markup((TEMPLATES / "report.css").read_text(encoding="utf-8"))  # noqa: S704


def render_html(data: ReportData, *, digest: str | None = None) -> str:
    """The report as one self-contained HTML document; `digest` saves recomputing the hash."""
    digest = digest or report_hash(data)
    template = _environment().get_template("report.html.j2")
    return template.render(
        data=data, digest=digest, css=_css(), hash_prefix=HASH_PREFIX,
        attachment_name=ATTACHMENT_NAME, summary=_summary(data),
        clusters=_cluster_views(data),
        scan_ids=compact_numbers(data.scan_ids), rules=_rules(data),
        generated=_when(data.generated_at), controls=_controls(data),
        checked=_checked(data), control_texts=CONTROL_TEXTS, control_names=CONTROL_NAMES,
        felix=FELIX)


# --- PDF -----------------------------------------------------------------------------------

# PDF/A-1 and PDF/A-2 forbid embedding a JSON file (WeasyPrint drops it), which would leave
# nothing to verify; those variants are refused rather than silently producing such a PDF.
_DROPS_ATTACHMENTS = re.compile(r"pdf/a-[12][abu]")


def pdf_variants() -> tuple[str, ...]:
    """The --pdf-variant values accepted: WeasyPrint's variants that keep attachments."""
    from weasyprint.pdf import VARIANTS

    return tuple(sorted(v for v in VARIANTS if not _DROPS_ATTACHMENTS.fullmatch(v)))


def check_pdf_variant(pdf_variant: str | None) -> None:
    """Raise ReportError unless `pdf_variant` is None or one of `pdf_variants()`."""
    if pdf_variant is not None and pdf_variant not in pdf_variants():
        raise ReportError(f"PDF variant {pdf_variant!r} is not supported; choose one of "
                          f"{', '.join(pdf_variants())} (PDF/A-1 and PDF/A-2 cannot embed the "
                          "report data)")


def render_pdf(html: str, *, attachment_json: bytes, pdf_variant: str | None = None) -> bytes:
    """Lay `html` out as an A4 PDF with `attachment_json` embedded as the report data.

    The HTML must be `render_html`'s output for that data: it carries the hash of the
    attachment in its footer and keywords, which is checked here so the two cannot disagree.
    """
    import weasyprint

    digest = hashlib.sha256(attachment_json).hexdigest()
    if f"{HASH_PREFIX}{digest}" not in html:
        raise ReportError("the HTML was not rendered from this report data (its SHA-256 differs)")
    check_pdf_variant(pdf_variant)
    # No protocol is allowed: the report must not fetch anything, and nothing in it should try.
    fetcher = weasyprint.URLFetcher(allowed_protocols=())
    now = datetime.now(UTC)
    attachment = weasyprint.Attachment(
        string=attachment_json, url_fetcher=fetcher, name=ATTACHMENT_NAME,
        description=("felixscan report data, canonical JSON (sorted keys, no whitespace, "
                     f"UTF-8); {HASH_PREFIX}{digest}"),
        created=now, modified=now, relationship="Data")
    document = weasyprint.HTML(string=html, url_fetcher=fetcher)
    pdf = document.write_pdf(attachments=[attachment], pdf_variant=pdf_variant)
    assert isinstance(pdf, bytes)
    return pdf


# --- view helpers: what the templates show, computed once in Python ----------------------


@dataclass(frozen=True, slots=True)
class FindingGroup:
    cluster: str
    control: str  # the felixscan control whose check raised these findings
    id: str
    severity: str
    title: str
    count: int
    nodes: list[str]  # compact names of the nodes concerned
    examples: list[tuple[FindingItem, list[tuple[str, str]]]]  # (finding, flattened evidence)
    more: int
    remediation: str


@dataclass(frozen=True, slots=True)
class ChangeLine:
    label: str
    count: int
    names: list[str]


@dataclass(frozen=True, slots=True)
class ControlColumn:
    """A control checked somewhere in the report: a column of the summary."""

    id: str
    short: str  # Felix, Typha, kube-controllers
    name: str
    port: int  # the endpoint's default port
    text: str  # what the control asserts


@dataclass(frozen=True, slots=True)
class ControlView:
    """One control of one cluster's latest scan, as its section shows it."""

    e: ControlEntry
    name: str
    anchor: str
    declared: str  # enabled, disabled, unknown or not installed
    listed: list[NodeEntry]  # targets in full: all of them, or those not passing when many
    passing_names: list[str]  # when many: the passing targets, by node (pod) name
    groups: list[FindingGroup]  # this control's findings
    chart: Markup | None  # the control's own trend (None: no day point in the period)
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClusterView:
    c: ClusterReport
    anchor: str
    listed: list[NodeEntry]  # failing and unknown nodes, in full
    passing: int
    passing_states: list[tuple[str, int]]
    passing_names: list[str]
    common_source: str | None  # the declared source every listed node shares, if any
    listing: list[str]  # when too many to tabulate: blocks of fixed-width lines
    listing_header: str
    groups: list[FindingGroup]
    chart: Markup
    stats: dict[str, Any]
    changes: list[tuple[str, list[ChangeLine]]]
    env: list[Mapping[str, Any]]
    controls: list[ControlView]  # in CONTROL_IDS order
    other_groups: list[FindingGroup]  # findings of a control the scan has no entry for
    # summary columns: control -> its entry (None: the latest scan did not check it)
    by_control: dict[str, ControlEntry | None]


def _checked(data: ReportData) -> list[ControlColumn]:
    """The controls any cluster's latest scan checked, in CONTROL_IDS order (others after)."""
    seen = {e.control for c in data.clusters for e in _entries(c)}
    ordered = [c for c in CONTROL_IDS if c in seen] + sorted(seen - set(CONTROL_IDS))
    return [ControlColumn(id=c, short=CONTROL_SHORT.get(c, c), name=CONTROL_NAMES.get(c, c),
                          port=CONTROL_PORTS.get(c, 0), text=CONTROL_TEXTS.get(c, c))
            for c in ordered]


def _entries(c: ClusterReport) -> tuple[ControlEntry, ...]:
    """The cluster's controls; report data without any (made before the control catalogue)
    is Felix's alone, from the cluster's own fields."""
    if c.controls:
        return c.controls
    return (ControlEntry(
        control=FELIX, status=c.status, installed=True, declared_enabled=c.declared_enabled,
        declared_source=c.declared_source, declared_port=c.declared_port, error=c.error,
        targets_total=c.nodes_total, targets_pass=c.nodes_pass, targets_fail=c.nodes_fail,
        targets_unknown=c.nodes_unknown, targets_waived=c.nodes_waived, namespace=c.namespace,
        workload=c.daemonset, image=c.image),)


def _control_views(c: ClusterReport, data: ReportData, anchor: str, *,
                   scale: Scale) -> list[ControlView]:
    trends = c.control_trend
    out = []
    for e in _entries(c):
        targets = sorted(e.targets, key=lambda t: (VERDICT_RANK.get(t.verdict, 9),
                                                   natural_key(t.name), t.pod or ""))
        many = len(targets) > TARGET_ROWS
        series = trends.get(e.control, ())
        unit = "nodes" if e.control == FELIX else "targets"
        out.append(ControlView(
            e=e, name=CONTROL_NAMES.get(e.control, e.control),
            anchor=f"{anchor}-{e.control}",
            declared=("not installed" if not e.installed else _declared(e.declared_enabled)),
            listed=[t for t in targets if t.verdict != "pass"] if many else targets,
            passing_names=compact_names(f"{t.name}/{t.pod}" if t.pod else t.name
                                        for t in targets if t.verdict == "pass")
            if many else [],
            groups=_finding_groups(c, control=e.control),
            # Felix's trend is the cluster's history chart (its nodes): not drawn twice.
            chart=trend_chart(series, since=data.since, until=data.until, scale=scale,
                              height=CONTROL_CHART_HEIGHT, unit=unit,
                              title=f"{e.control}: compliance ratio and failing/unknown "
                                    f"{unit} per day")
            if series and e.control != FELIX else None,
            stats=_stats(series, data.since, data.until)))
    return out


VERDICT_RANK = {"fail": 0, "waived": 1, "unknown": 2, "pass": 3}


def _cluster_views(data: ReportData) -> list[ClusterView]:
    # Axes shared by every chart of a kind, worked out once for the report.
    scale = shared_scale(x.series for x in data.clusters)
    control_scale = shared_scale(points for x in data.clusters
                                 for points in x.control_trend.values())
    checked = _checked(data)
    return [_cluster_view(c, data, scale=scale, control_scale=control_scale, checked=checked)
            for c in data.clusters]


def _cluster_view(c: ClusterReport, data: ReportData, *, scale: Scale, control_scale: Scale,
                  checked: Sequence[ControlColumn]) -> ClusterView:
    listed = [n for n in c.nodes if n.verdict != "pass"]
    passing = [n for n in c.nodes if n.verdict == "pass"]
    sources = {n.declared_source for n in listed}
    header, blocks = _listing(listed) if len(listed) > TABLE_ROWS else ("", [])
    anchor = f"cluster-{data.clusters.index(c) + 1}"
    entries = {e.control: e for e in _entries(c)}
    return ClusterView(
        c=c, anchor=anchor, listed=listed,
        passing=len(passing),
        passing_states=sorted(Counter(n.state for n in passing).items(), key=lambda i: -i[1]),
        passing_names=compact_names(n.name for n in passing),
        common_source=next(iter(sources)) if len(sources) == 1 else None,
        listing=blocks, listing_header=header,
        groups=_finding_groups(c), chart=trend_chart(
            c.series, since=data.since, until=data.until, scale=scale),
        stats=_stats(c.series, data.since, data.until), changes=_changes(c),
        env=[e for e in (c.configuration.get("env") or [])
             if str(e.get("name", "")).lower().startswith("felix_")],
        controls=_control_views(c, data, anchor, scale=control_scale),
        other_groups=[g for g in _finding_groups(c) if g.control not in entries],
        by_control={col.id: entries.get(col.id) for col in checked})


def _listing(nodes: Sequence[NodeEntry]) -> tuple[str, list[str]]:
    """Failing/unknown nodes as aligned text, one node a line (details on a second line)."""
    width = min(max(len(n.name) for n in nodes), 56)
    head = (f"{'NODE':<{width}}  {'ADDRESS:PORT':<21}  {'PROBE':<20}  FELIX  "
            f"{'DECLARED':<8}  POD/READY  VERDICT")
    lines: list[str] = []
    for n in nodes:
        probe = ", ".join(str(p) for p in (n.state, n.protocol, n.http_status) if p)
        name = n.name if len(n.name) <= width else n.name + "\n" + " " * width
        lines.append(f"{name:<{width}}  {(n.address or '-') + ':' + str(n.port):<21}  "
                     f"{probe:<20}  {_yesno(n.felix):<5}  {_declared(n.declared_enabled):<8}  "
                     f"{_yesno(n.pod_current) + '/' + _yesno(n.node_ready):<9}  {n.verdict}")
        detail = "; ".join(part for part in (n.error, _other_host(n), _certificate(n)) if part)
        if detail:
            lines.append(" " * 4 + "\u21b3 " + detail)
    blocks = ["\n".join(lines[i:i + LISTING_LINES]) for i in range(0, len(lines), LISTING_LINES)]
    return head, blocks


def _other_host(n: NodeEntry) -> str | None:
    # Felix names its own host in felix_host{host=...}; only a different name is news (the
    # address answers for another node).
    if n.felix_host and n.felix_host != n.name:
        return f"answered as felix_host {n.felix_host}"
    return None


def _certificate(n: NodeEntry) -> str | None:
    if not (n.tls_version or n.tls_sha256):
        return None
    parts = [n.tls_version or "TLS"]
    if n.tls_self_signed:
        parts.append("self-signed")
    if n.tls_not_after:
        parts.append(f"expires {n.tls_not_after.date()}")
    if n.tls_subject:
        parts.append(f"subject {n.tls_subject}")
    if n.tls_sha256:
        parts.append(f"SHA-256 {n.tls_sha256[:16]}\u2026")
    return ", ".join(parts)


def _finding_groups(c: ClusterReport, *, control: str | None = None) -> list[FindingGroup]:
    """The cluster's findings grouped by control, ID and remediation (`control`: that
    control's alone)."""
    by_key: dict[tuple[str, str, str, str], list[FindingItem]] = defaultdict(list)
    for f in c.findings:
        if control is None or f.control == control:
            by_key[(f.control, f.id, f.severity, f.remediation)].append(f)
    groups = []
    for (ctl, fid, severity, remediation), items in by_key.items():
        rule = RULES.get(fid)
        groups.append(FindingGroup(
            cluster=c.name, control=ctl, id=fid, severity=severity,
            title=rule.title if rule else fid,
            count=len(items), nodes=compact_names(f.node for f in items if f.node),
            examples=[(f, flatten(f.evidence)) for f in items[:EXAMPLES_PER_FINDING]],
            more=max(0, len(items) - EXAMPLES_PER_FINDING), remediation=remediation))
    groups.sort(key=lambda g: (SEVERITY_ORDER.get(g.severity, 9), -g.count, g.id))
    return groups


def _controls(data: ReportData) -> list[dict[str, Any]]:
    """Per standard, each control of the catalogue with its status at the latest scans."""
    verified = not data.not_scanned and all(
        c.status != "error" and not c.nodes_unknown for c in data.clusters)
    statuses = control_statuses(((f.id, f.waiver) for c in data.clusters for f in c.findings),
                                verified=verified)
    cat = catalogue()
    return [{"standard": s, "controls": [x for x in statuses if x.control.standard == s.id]}
            for s in cat.standards]


def _control_summary(data: ReportData) -> list[dict[str, Any]]:
    """Per control checked: clusters by its status, and its targets across the fleet."""
    out = []
    for col in _checked(data):
        entries = [e for c in data.clusters for e in _entries(c) if e.control == col.id]
        status = Counter(e.status for e in entries)
        out.append({"column": col, "compliant": status["compliant"],
                    "non_compliant": status["non_compliant"], "error": status["error"],
                    "unchecked": len(data.clusters) - len(entries),
                    "not_installed": sum(1 for e in entries if not e.installed),
                    "targets": sum(e.targets_total for e in entries),
                    "failing": sum(e.targets_fail for e in entries),
                    "unknown": sum(e.targets_unknown for e in entries),
                    "waived": sum(e.targets_waived for e in entries)})
    return out


def _summary(data: ReportData) -> dict[str, Any]:
    status = Counter(c.status for c in data.clusters)
    groups = [g for c in data.clusters for g in _finding_groups(c)]
    groups.sort(key=lambda g: (SEVERITY_ORDER.get(g.severity, 9), -g.count, g.id, g.cluster))
    return {
        "compliant": status["compliant"], "non_compliant": status["non_compliant"],
        "error": status["error"], "nodes": sum(c.nodes_total for c in data.clusters),
        # A node fails if any vantage's latest scan in the period fails it.
        "failing": sum(len(c.failing_anywhere) if len(c.vantages) > 1 else c.nodes_fail
                       for c in data.clusters),
        "unknown": sum(c.nodes_unknown for c in data.clusters),
        "passing": sum(c.nodes_pass for c in data.clusters),
        "waived": sum(c.nodes_waived for c in data.clusters),
        "overall": ("non_compliant" if status["non_compliant"] else "not_proven"
                    if status["error"] or data.not_scanned or not data.clusters
                    else "compliant"),
        "vantages": sorted({v.vantage for c in data.clusters for v in c.vantages}
                           or {c.method.vantage or c.method.scanner_host for c in data.clusters}),
        "waivers": [(c.name, w) for c in data.clusters for w in c.waivers],
        "worst": groups[:WORST_FINDINGS], "more_findings": max(0, len(groups) - WORST_FINDINGS),
        "controls": _control_summary(data),
    }


def _stats(series: Sequence[DayPoint | ControlPoint], since: date,
           until: date) -> dict[str, Any]:
    ratios = [p for p in series if p.ratio is not None]
    worst = min(ratios, key=lambda p: (p.ratio, p.day), default=None)
    most = max(series, key=lambda p: (p.failing, p.day), default=None)
    return {
        "days": (until - since).days + 1, "scanned": len(series),
        "compliant": sum(1 for p in series if p.status == "compliant"),
        "non_compliant": sum(1 for p in series if p.status == "non_compliant"),
        "error": sum(1 for p in series if p.status == "error"),
        "worst": worst, "most_failing": most if most and most.failing else None,
    }


def _changes(c: ClusterReport) -> list[tuple[str, list[ChangeLine]]]:
    ch = c.changes
    if ch is None:
        return []

    def lines(items: Iterable[NodeChange]) -> list[ChangeLine]:
        by_pair: dict[tuple[str | None, str | None], list[str]] = defaultdict(list)
        for item in items:
            by_pair[(item.before, item.after)].append(item.node)
        return [ChangeLine(label=f"{before or 'absent'} \u2192 {after or 'absent'}",
                           count=len(names), names=compact_names(names))
                for (before, after), names in sorted(by_pair.items(), key=lambda i: str(i[0]))]

    return [("Regressed (pass \u2192 fail or unknown)", lines(ch.regressed)),
            ("Fixed (fail or unknown \u2192 pass)", lines(ch.fixed)),
            ("New (not in the previous scan)", lines(ch.new)),
            ("Removed (not in the latest scan)", lines(ch.removed)),
            ("Other changes (fail \u2194 unknown)", lines(ch.other))]


def _rules(data: ReportData) -> list[Any]:
    used = {f.id for c in data.clusters for f in c.findings}
    return [r for r in RULES.values() if r.id in used]


# --- compact lists ---------------------------------------------------------------------------

_TOKENS = re.compile(r"(\d+)")


def compact_names(names: Iterable[str]) -> list[str]:
    """Node names with numbered runs folded into `prefix[first-last,...]suffix` ranges.

    The number folded is the last one that varies among names of the same shape, so
    `ip-10-0-3-17.eu-west-1.compute.internal` folds on 17, not on the constant 1.
    """
    shapes: dict[tuple[str, ...], list[list[str]]] = defaultdict(list)
    for name in names:
        tokens = _TOKENS.split(name)  # text, digits, text, digits, ..., text
        shapes[tuple(tokens[0::2])].append(tokens)
    out: list[str] = []
    for members in shapes.values():
        digit_positions = range(1, len(members[0]), 2)
        if not digit_positions or len(members) == 1:
            out.extend("".join(t) for t in members)
            continue
        varying = [i for i in digit_positions if len({m[i] for m in members}) > 1]
        pos = varying[-1] if varying else digit_positions[-1]
        runs: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for m in members:
            runs[(*m[:pos], "", *m[pos + 1:])].append(m[pos])
        for key, found in runs.items():
            head, tail = "".join(key[:pos]), "".join(key[pos + 1:])
            numbers = sorted(set(found), key=lambda n: (int(n), len(n)))
            if len(numbers) == 1:
                out.append(f"{head}{numbers[0]}{tail}")
            else:
                out.append(f"{head}[{_ranges(numbers)}]{tail}")
    out.sort(key=natural_key)
    return out


def _ranges(numbers: Sequence[str]) -> str:
    parts: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:]:
        # worker-09 -> worker-10 continues a run; worker-09 -> worker-010 does not.
        padded = n.startswith("0") or prev.startswith("0")
        if int(n) == int(prev) + 1 and (len(n) == len(prev) or not padded):
            prev = n
            continue
        parts.append(start if start == prev else f"{start}-{prev}")
        start = prev = n
    parts.append(start if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def compact_numbers(numbers: Sequence[int]) -> str:
    return _ranges([str(n) for n in sorted(set(numbers))]) if numbers else "none"


def flatten(evidence: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Evidence as (dotted key, text) pairs; node lists are folded like the node tables."""
    pairs: list[tuple[str, str]] = []
    for key, value in sorted(evidence.items()):
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            pairs.extend(flatten(value, f"{name}."))
        elif key == "nodes" and isinstance(value, list) and all(isinstance(v, str)
                                                                  for v in value):
            pairs.append((name, ", ".join(compact_names(value)) or "none"))
        elif isinstance(value, str):
            pairs.append((name, value))
        elif value is None:
            pairs.append((name, "\u2014"))
        else:
            pairs.append((name, json.dumps(value, ensure_ascii=False, sort_keys=True)))
    return pairs


# --- filters -----------------------------------------------------------------------------------

_CODE = re.compile(r"`([^`]+)`")


def code_spans(text: str) -> Markup:
    """Remediation texts mark commands with backticks: escape first, then make them <code>."""
    return Markup(_CODE.sub(r"<code>\1</code>", str(escape(text))))  # noqa: S704


def _yesno(value: bool | None) -> str:
    return "\u2014" if value is None else "yes" if value else "no"


def _when(value: datetime | date | None) -> str:
    if value is None:
        return "\u2014"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return value.isoformat()


def _pct(value: float | None) -> str:
    if value is None:
        return "\u2014"
    # Never round a non-compliant ratio up to a clean 100 %.
    text = f"{value * 100:.2f}"
    if value < 1 and text == "100.00":
        text = "99.99"
    return f"{text} %"


def _num(value: int) -> str:
    return f"{value:,}"


def _declared(value: bool | None) -> str:
    return "unknown" if value is None else "enabled" if value else "disabled"
