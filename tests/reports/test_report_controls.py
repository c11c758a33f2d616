"""The HTML and PDF report over clusters that check felix-metrics, typha-metrics and
kube-controllers-metrics: a column per control in the executive summary, a section per control
in each cluster's (declared state and source, targets, that control's findings), each control's
trend, and a report of 5,000 nodes that stays readable. Read back with pypdf and `report
verify`, as an auditor would."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pypdf import PdfReader

from reports import build_report, render_html
from reports.build import Outcome, verify_report
from reports.render import TABLE_ROWS
from scanner.core.records import ClusterResult
from scanner.db.queries.history import load_report
from scanner.db.store import Store
from tests.reports.controls_data import big, lean, tri

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
DAYS = 8


def save(store: Store, *results: ClusterResult) -> None:
    run = store.begin_run(trigger="test", started_at=results[0].started_at)
    for r in results:
        store.save_cluster(run, r)
    store.finish_run(run, finished_at=results[0].finished_at)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path = tmp_path_factory.mktemp("controls") / "felixscan.db"
    with Store(f"sqlite:///{path}") as s:
        s.upgrade()
        for back in range(DAYS - 1, -1, -1):
            at = NOW - timedelta(days=back, hours=6)
            save(s, tri(at), lean(at))
        yield s


class _Rows(HTMLParser):
    """The text of each table row (cells joined by |) and the tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "br" and self.cell is not None:
            self.cell.append(" ")
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None and self.rows:
            self.rows[-1].append(re.sub(r"\s+", " ", "".join(self.cell)).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def parse(html: str) -> _Rows:
    page = _Rows()
    page.feed(html)
    return page


def test_summary_has_a_column_per_control(store: Store) -> None:
    html = render_html(load_report(store, now=NOW))
    page = parse(html)
    head = next(r for r in page.rows if r[:2] == ["Cluster", "Status"])
    assert head[2:5] == ["Felix felix-metrics", "Typha typha-metrics",
                         "kube-controllers kube-controllers-metrics"]
    rows = {r[0]: r for r in page.rows if r and r[0] in ("tri", "lean") and len(r) == len(head)}
    assert rows["tri"][1:5] == ["non-compliant", "non-compliant", "non-compliant 2/2 fail",
                                "compliant 0/1 fail"]
    assert rows["lean"][1:5] == ["error", "compliant", "compliant not installed", "error 0/0 fail"]
    summary = parse(html[html.index("Controls across the clusters"):
                         html.index("Worst findings first")])
    across = {r[0]: r[1:] for r in summary.rows if r and r[0] != "Control"}
    assert across["Felix felix-metrics"] == ["1", "1", "0", "0", "4", "1", "0"]
    assert across["Typha typha-metrics not installed in 1 cluster(s) (compliant: nothing "
                  "exposed)"] == ["1", "1", "0", "0", "2", "2", "0"]
    assert across["kube-controllers kube-controllers-metrics"] == ["1", "0", "1", "0", "1", "0",
                                                                   "0"]
    # the cover names every control checked
    for text in ("felix-metrics</strong>: The Calico Felix Prometheus metrics endpoint",
                 "typha-metrics</strong>: The Calico Typha", "kube-controllers-metrics</strong>"):
        assert text in html


def test_each_cluster_has_its_controls_targets_findings_and_trends(store: Store) -> None:
    html = render_html(load_report(store, now=NOW))
    page = parse(html)
    section = html[html.index('id="cluster-2"'):html.index('id="controls"')]  # tri
    tri_page = parse(section)
    controls = [r for r in tri_page.rows if r and r[0].startswith(("Felix felix", "Typha typha",
                                                                   "calico-kube-controllers"))]
    assert [r[:2] for r in controls[:3]] == [
        ["Felix felix-metrics", "non-compliant"], ["Typha typha-metrics", "non-compliant"],
        ["calico-kube-controllers kube-controllers-metrics", "compliant"]]
    assert controls[1][2] == ("enabled, decided by env TYPHA_PROMETHEUSMETRICSENABLED; "
                              "port 9093")
    assert "Typha targets (typha-metrics)" in section
    assert "calico-kube-controllers targets (kube-controllers-metrics)" in section
    targets = [r for r in tri_page.rows if len(r) == 7 and r[1].startswith("calico-")]
    assert targets == [
        ["n1", "calico-typha-aaa", "10.0.0.1:9093", "open, http", "yes", "enabled", "fail"],
        ["n3", "calico-typha-bbb", "10.0.0.3:9093", "filtered", "—", "enabled", "fail"],
        ["n2", "calico-kube-controllers-ccc", "192.168.7.9:9094", "closed", "—", "disabled",
         "pass"]]
    # findings under their control's heading, in catalogue order
    heads = re.findall(r'<h4 class="control-head">([^<]+)<code>([^<]+)</code>', section)
    assert [control for _, control in heads] == ["felix-metrics", "typha-metrics",
                                                 "kube-controllers-metrics"]
    typha_part = section[section.index("<code>typha-metrics</code>: 3 kind"):
                         section.index("<code>kube-controllers-metrics</code>: 1 kind")]
    assert {"TYPHA-PORT-REACHABLE", "TYPHA-METRICS-ENABLED", "DRIFT-ENABLED-BUT-CLOSED"} <= set(
        re.findall(r"<code>([A-Z-]+)</code>:", typha_part))
    assert "FELIX-PORT-REACHABLE" not in typha_part
    # each control's own trend (Felix's is the history chart)
    assert "typha-metrics: compliance ratio and failing/unknown targets per day" in section
    assert "kube-controllers-metrics: compliance ratio" in section
    assert section.count("<svg") == 3
    sections = [a.get("class") for t, a in page.tags if t == "section"]
    assert sections == ["cover multi", "summary", "cluster", "cluster", "controls", "method",
                        "integrity"]


def test_lean_cluster_says_not_installed_and_not_verified(store: Store) -> None:
    html = render_html(load_report(store, now=NOW, clusters=["lean"]))
    section = html[html.index('id="cluster-1"'):html.index('id="controls"')]
    rows = parse(section).rows
    typha = next(r for r in rows if r and r[0] == "Typha typha-metrics")
    assert typha[1:] == ["compliant", "not installed", "Deployment calico-system/calico-typha",
                         "none: not installed"]
    kc = next(r for r in rows if r and r[0] == "calico-kube-controllers kube-controllers-metrics")
    assert kc[1] == "error"
    assert 'deployments.apps "calico-kube-controllers" is forbidden' in kc[2]
    # a component with nothing to probe draws no "scan error" days in its trend
    chart = section[section.index("typha-metrics: compliance ratio"):]
    chart = chart[:chart.index("</svg>")]
    assert 'fill-opacity="0.6"' not in chart


def test_pdf_reads_back_and_verifies(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "controls.pdf"
    info = build_report(store, out=out, now=NOW)
    reader = PdfReader(out)
    text = "\n".join(p.extract_text() for p in reader.pages)
    for expected in ("Controls across the clusters", "Typha targets (typha-metrics)",
                     "calico-kube-controllers targets (kube-controllers-metrics)",
                     "Typha trend (typha-metrics)", "calico-typha-aaa", "TYPHA-PORT-REACHABLE",
                     "KUBE-CONTROLLERS-METRICS-PORT-ABSENT", "control typha-metrics"):
        assert expected in text, expected
    assert "Calico Felix Prometheus metrics endpoint (TCP 9091 by default)" in \
        reader.pages[0].extract_text()  # the cover, on one page with its sign-off table
    assert "Reviewed and accepted by" in reader.pages[0].extract_text()
    result = verify_report(out)
    checks = {c.name: c.outcome for c in result.checks}
    assert checks["embedded data"] is Outcome.OK and checks["pages"] is Outcome.OK, \
        result.checks
    assert info.sha256 in re.sub(r"\s+", "", reader.pages[0].extract_text())


def test_five_thousand_nodes_and_three_controls_stay_readable(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'big.db'}") as s:
        s.upgrade()
        save(s, big(5000, NOW - timedelta(hours=2), failing_every=7))
        html = render_html(load_report(s, now=NOW, since=NOW.date(), until=NOW.date()))
    failing = len([i for i in range(5000) if i % 7 == 3])
    assert failing > TABLE_ROWS  # so Felix's failing nodes become the compact listing
    assert html.count('<pre class="listing">') >= failing // 40
    page = parse(html)
    head = next(r for r in page.rows if r[:2] == ["Cluster", "Status"])
    row = next(r for r in page.rows if r and r[0] == "big" and len(r) == len(head))
    assert row[2:5] == ["non-compliant", "compliant 0/3 fail", "compliant 0/1 fail"]
    assert row[5] == "5,000"
    assert "Typha targets (typha-metrics)" in html
    assert len(html) < 3_000_000  # summaries first: no table of 5,000 passing rows
