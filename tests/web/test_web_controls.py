"""The controls on `felixscan serve`'s pages, JSON API and /metrics, through real HTTP: a
column per control on the overview, a section per control (declared state and source, targets,
its own trend) on a cluster's page, `/api/clusters` with each control's status,
`/api/trend?control=`, and `felixscan_control_status`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from html.parser import HTMLParser

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reports.cache import ReportCache
from scanner.core.records import ClusterResult
from scanner.db.store import Store
from scanner.web.app import Auth, create_app
from tests.reports.controls_data import lean, tri
from tests.web.test_web import NOW, TODAY, TOKEN, fetch, fill, served

CONTROLS = ["felix-metrics", "typha-metrics", "kube-controllers-metrics"]
DAYS = 4


def save(store: Store, *results: ClusterResult) -> None:
    run = store.begin_run(trigger="schedule", started_at=results[0].started_at)
    for r in results:
        store.save_cluster(run, r)
    store.finish_run(run, finished_at=results[0].finished_at)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fleet of tests/web/test_web.py (scans made before controls: Felix's alone) and two
    clusters that check all three controls, scanned on each of the last DAYS days."""
    tmp = tmp_path_factory.mktemp("web-controls")
    with Store(f"sqlite:///{tmp / 'felixscan.db'}") as store:
        fill(store)
        for back in range(DAYS - 1, -1, -1):
            # half an hour earlier, but on that day even just after midnight (UTC)
            at = max(NOW - timedelta(days=back, minutes=30),
                     datetime.combine(TODAY - timedelta(days=back), time(), UTC))
            save(store, tri(at), lean(at))
        cache = ReportCache(tmp / "cache", entries=4)
        app = create_app(store=store, auth=Auth(token=TOKEN), reports=cache,
                         clusters=["prod-east", "tri"])
        with served(app) as url:
            yield url
        cache.close()


class _Table(HTMLParser):
    """The first table with class `fleet`: its header cells and each row's cells as text."""

    def __init__(self, cls: str) -> None:
        super().__init__()
        self.cls, self.depth = cls, 0
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and (dict(attrs).get("class") == self.cls or self.depth):
            self.depth += 1
        elif self.depth and tag == "tr":
            self.rows.append([])
        elif self.depth and tag in ("td", "th"):
            self.cell = []
        elif self.cell is not None and tag == "br":
            self.cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.depth:
            self.depth -= 1
        elif tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(re.sub(r"\s+", " ", "".join(self.cell)).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def table(html: str, cls: str) -> list[list[str]]:
    parser = _Table(cls)
    parser.feed(html)
    return parser.rows


def test_overview_has_a_column_per_control(base: str) -> None:
    html = fetch(base, "/").text
    head, *rows = table(html, "fleet")
    assert head[:5] == ["Cluster", "Status", "Felix felix-metrics", "Typha typha-metrics",
                        "kube-controllers kube-controllers-metrics"]
    by_name = {r[0]: r for r in rows}
    assert by_name["tri"][1:5] == ["non-compliant", "non-compliant", "non-compliant",
                                   "compliant"]
    # compliant only if every checked control is: kube-controllers unverified -> scan error
    assert by_name["lean"][1:5] == ["scan error", "compliant", "compliant", "not verified"]
    # scans stored before the catalogue checked Felix's endpoint alone
    assert by_name["prod-east"][1:5] == ["compliant", "compliant", "not checked", "not checked"]
    assert by_name["prod-west"][2] == "non-compliant"
    assert by_name["tri"][5:8] == ["1", "0", "3"]  # Felix's failing / unknown / nodes
    # one summary line per control across the fleet
    assert re.search(r'Typha</span> <span class="muted">typha-metrics</span>:\s*<span class="ok">'
                     r'<span class="num">1</span> compliant</span> · <span class="bad"><span '
                     r'class="num">1</span> non-compliant</span>', html)


def test_cluster_page_has_a_section_per_control(base: str) -> None:
    html = fetch(base, "/clusters/tri").text
    head, *rows = table(html, "controls")
    assert head == ["Control", "Status", "Metrics declared", "Where", "Targets", "Fail",
                    "Unknown", "90-day trend"]
    assert [(r[0], r[1], r[4], r[5]) for r in rows] == [
        ("Felix felix-metrics", "non-compliant", "3", "1"),
        ("Typha typha-metrics", "non-compliant", "2", "2"),
        ("calico-kube-controllers kube-controllers-metrics", "compliant", "1", "0")]
    assert rows[1][2] == "enabled by env TYPHA_PROMETHEUSMETRICSENABLED · port 9093"
    assert rows[2][3] == "kube-system/calico-kube-controllers"
    # each control's own trend: one point a day over the last DAYS days
    sparks = re.findall(r'<td class="spark"><svg[^>]*aria-label="([^"]+)"', html)
    assert sparks == [f"90-day trend: {DAYS} days scanned, {DAYS} with failing or unknown "
                      "nodes, lowest compliance 66.7 %",
                      f"90-day trend: {DAYS} days scanned, {DAYS} with failing or unknown "
                      "targets, lowest compliance 0.0 %",
                      f"90-day trend: {DAYS} days scanned, 0 with failing or unknown targets, "
                      "lowest compliance 100 %"]
    typha = html[html.index('id="control-typha-metrics"'):
                 html.index('id="control-kube-controllers-metrics"')]
    _, *targets = table(typha, "targets")
    assert targets == [
        ["n1", "calico-typha-aaa", "10.0.0.1:9093", "open, http (serves its metrics)",
         "enabled env TYPHA_PROMETHEUSMETRICSENABLED", "fail"],
        ["n3", "calico-typha-bbb", "10.0.0.3:9093", "filtered",
         "enabled env TYPHA_PROMETHEUSMETRICSENABLED", "fail"]]
    assert "decided by env TYPHA_PROMETHEUSMETRICSENABLED" in typha
    felix = html[html.index('id="control-felix-metrics"'):html.index('id="control-typha-metrics"')]
    assert "Felix's targets are the cluster's nodes" in felix
    # the findings name their control
    head, *findings = table(html, "findings")
    assert head == ["Severity", "ID", "Node", "Control", "Finding"]
    assert {(f[1], f[3]) for f in findings} >= {("TYPHA-PORT-REACHABLE", "typha-metrics"),
                                                ("FELIX-PORT-REACHABLE", "felix-metrics")}

    lean_page = fetch(base, "/clusters/lean").text
    _, *lean_rows = table(lean_page, "controls")
    assert [(r[1], r[2]) for r in lean_rows[1:]] == [
        ("compliant", "not installed"),
        ("not verified", 'unknown deployments.apps "calico-kube-controllers" is forbidden')]
    assert "Not installed: nothing serves these metrics in this cluster." in lean_page
    # a component that is not installed draws no error day in its trend
    typha_spark = re.findall(r'<td class="spark">(<svg.*?</svg>)', lean_page, re.S)[1]
    assert "<rect" not in typha_spark


def test_api_clusters_and_cluster_carry_the_controls(base: str) -> None:
    clusters = {c["name"]: c for c in fetch(base, "/api/clusters").json()}
    assert clusters["tri"]["latest"]["controls"] == {
        "felix-metrics": "non_compliant", "typha-metrics": "non_compliant",
        "kube-controllers-metrics": "compliant"}
    assert list(clusters["lean"]["latest"]["controls"].items()) == [
        ("felix-metrics", "compliant"), ("typha-metrics", "compliant"),
        ("kube-controllers-metrics", "error")]
    assert clusters["lean"]["latest"]["status"] == "error"
    assert clusters["prod-east"]["latest"]["controls"] == {"felix-metrics": "compliant"}
    # every field /api/clusters had stays
    assert {"scan_id", "status", "declared", "nodes", "failing", "unknown", "error"} <= set(
        clusters["tri"]["latest"])

    detail = fetch(base, "/api/clusters/tri").json()
    controls = {c["id"]: c for c in detail["controls"]}
    assert list(controls) == CONTROLS
    assert controls["felix-metrics"]["targets_in"] == "nodes_not_passing"
    assert "targets" not in controls["felix-metrics"]
    typha = controls["typha-metrics"]
    assert typha["declared"] == {"enabled": True, "source": "env TYPHA_PROMETHEUSMETRICSENABLED",
                                 "port": 9093, "host": ""}
    assert typha["totals"] == {"targets": 2, "pass": 0, "fail": 2, "unknown": 0, "waived": 0}
    assert [(t["node"], t["pod"], t["verdict"]) for t in typha["targets"]] == [
        ("n1", "calico-typha-aaa", "fail"), ("n3", "calico-typha-bbb", "fail")]
    assert (typha["namespace"], typha["workload"]) == ("kube-system", "calico-typha")
    assert {(f["id"], f["control"]) for f in detail["findings"]["items"]} >= {
        ("TYPHA-METRICS-ENABLED", "typha-metrics"), ("FELIX-PORT-REACHABLE", "felix-metrics")}


def test_api_trend_per_control_and_unchanged_without(base: str) -> None:
    plain = fetch(base, "/api/trend?cluster=tri&days=7").json()
    assert len(plain) == DAYS
    assert all(set(row) == {"cluster", "day", "nodes", "failing", "unknown", "ratio",
                            "status", "scans", "waived"} for row in plain)
    assert plain[-1] == {"cluster": "tri", "day": str(TODAY), "nodes": 3, "failing": 1,
                         "unknown": 0, "ratio": 0.666667, "status": "non_compliant",
                         "scans": 1, "waived": 0}
    typha = fetch(base, "/api/trend?cluster=tri&days=7&control=typha-metrics").json()
    assert typha[-1] == {"cluster": "tri", "day": str(TODAY), "nodes": 2, "failing": 2,
                         "unknown": 0, "ratio": 0.0, "status": "non_compliant", "scans": 1,
                         "waived": 0, "control": "typha-metrics"}
    assert len(typha) == DAYS
    fleet = fetch(base, "/api/trend?days=2&control=kube-controllers-metrics").json()
    assert {(r["cluster"], r["status"]) for r in fleet} == {("tri", "compliant"),
                                                           ("lean", "error")}
    felix = fetch(base, "/api/trend?days=30&control=felix-metrics").json()
    # scans stored before the catalogue count as felix-metrics' too
    assert {"prod-east", "prod-west", "tri", "lean"} <= {r["cluster"] for r in felix}
    bad = fetch(base, "/api/trend?control=bird-metrics")
    assert bad.status == 400 and "typha-metrics" in bad.json()["error"]
    doc = fetch(base, "/api/openapi.json").json()
    params = {p["name"]: p for p in doc["paths"]["/api/trend"]["get"]["parameters"]}
    assert params["control"]["schema"]["enum"] == CONTROLS
    assert "controls" in doc["components"]["schemas"]["Latest"]["properties"]


def test_metrics_export_each_controls_status(base: str) -> None:
    text = fetch(base, "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.labels["cluster"], s.labels["control"]): s.value
               for s in families["felixscan_control_status"].samples}
    assert {k: v for k, v in samples.items() if k[0] in ("tri", "lean", "prod-east")} == {
        ("tri", "felix-metrics"): 0.0, ("tri", "typha-metrics"): 0.0,
        ("tri", "kube-controllers-metrics"): 1.0,
        ("lean", "felix-metrics"): 1.0, ("lean", "typha-metrics"): 1.0,
        ("lean", "kube-controllers-metrics"): -1.0,
        ("prod-east", "felix-metrics"): 1.0}
    # the cluster's own figure is still the worst of them
    compliant = {s.labels["cluster"]: s.value
                 for s in families["felixscan_cluster_compliant"].samples}
    assert (compliant["tri"], compliant["lean"], compliant["prod-east"]) == (0.0, 0.0, 1.0)
    assert "felix_" not in text.replace("felixscan_", "")
