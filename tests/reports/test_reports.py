"""Reports from the database: history queries, HTML structure, PDF text, attachment and hash."""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pypdf import PdfReader, PdfWriter
from sqlalchemy import event

from reports import (
    ATTACHMENT_NAME,
    build_report,
    canonical_json,
    render_html,
    render_pdf,
    report_hash,
    verify_pdf,
)
from reports.integrity import report_data
from reports.render import TABLE_ROWS, code_spans, compact_names
from scanner.core.errors import ReportError
from scanner.core.evaluate import evaluate, failed_cluster
from scanner.core.records import (
    ClusterResult,
    ClusterSnapshot,
    ConfigFile,
    Declared,
    EnvVar,
    Node,
    Pod,
    ProbeResult,
    Rollout,
    TlsFacts,
)
from scanner.db.queries.history import load_report
from scanner.db.store import Store

BASE = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 20, 9, 30, tzinfo=UTC)
DAYS = 10
SCRIPT = "<script>alert(1)</script>"
TD = "</td>"
PERIOD = {"since": date(2026, 3, 1), "until": date(2026, 3, 10)}


def cluster_result(cluster: str, at: datetime, spec: dict[str, str], *,
                   enabled: bool = False) -> ClusterResult:
    """A result evaluated by the real rules; spec maps node -> closed | open | down."""
    names = list(spec)
    nodes = tuple(Node(n, (("InternalIP", f"10.0.0.{i + 1}"),), spec[n] != "down")
                  for i, n in enumerate(names))
    snapshot = ClusterSnapshot(
        cluster=cluster, install="manifest", namespace="kube-system", daemonset="calico-node",
        container="calico-node", image="quay.io/calico/node:v3.29.7",
        env=(EnvVar("FELIX_PROMETHEUSMETRICSENABLED", "true" if enabled else "false",
                    "literal"),),
        config_file=ConfigFile(True, {}, "image default"), felix_configs=(), felix_crd=True,
        installation=None,
        rollout=Rollout(2, 2, len(names), len(names), len(names), len(names), "r1",
                        "RollingUpdate", "1"),
        pods=tuple(Pod(f"calico-node-{i}", n, "Running", "r1", True, owner="calico-node")
                   for i, n in enumerate(names)),
        nodes=nodes, collected_at=at)
    declared = Declared(enabled=enabled, source="env FELIX_PROMETHEUSMETRICSENABLED", port=9091,
                        port_source="built-in default", raw=str(enabled).lower())
    tls = TlsFacts("TLSv1.3", "TLS_AES_128_GCM_SHA256", "CN=felix", "CN=felix", True, at,
                   at + timedelta(days=90), "cd" * 32)
    probes = []
    for node in nodes:
        address = node.addresses[0][1]
        kind = spec[node.name]
        if kind == "open":
            probes.append(ProbeResult(node.name, address, 9091, "open", "https", True, 200, tls,
                                      felix_host=node.name))
        elif kind == "down":
            probes.append(ProbeResult(node.name, address, 9091, "filtered",
                                      error="connect timed out after 2.0 s"))
        else:
            probes.append(ProbeResult(node.name, address, 9091, "closed"))
    return evaluate(snapshot, {n: declared for n in names}, probes, cluster_declared=declared,
                    started_at=at, finished_at=at + timedelta(seconds=20),
                    timings={"api": 0.4, "probe": 2.1})


def east(day: int) -> dict[str, str]:
    """prod-east: worker-03 fails days 3-5 (fixed on 6); on the last day worker-07 regresses,
    worker-09 goes unknown, worker-12 is new, worker-11 is gone; hostile names throughout."""
    spec = {f"worker-{i:02d}": "closed" for i in range(1, 12 if day < DAYS - 1 else 11)}
    if 3 <= day <= 5:
        spec["worker-03"] = "open"
    if day == DAYS - 1:
        spec["worker-07"] = "open"
        spec["worker-09"] = "down"
        spec["worker-12"] = "closed"
    spec[SCRIPT] = "open"
    spec[TD] = "closed" if day % 2 else "down"
    return spec


def populate(store: Store) -> None:
    store.upgrade()
    for day in range(DAYS):
        at = BASE + timedelta(days=day)
        run = store.begin_run(trigger="test", started_at=at)
        store.save_cluster(run, cluster_result("prod-east", at, east(day)))
        if day == 4:
            store.save_cluster(run, failed_cluster("prod-west", "API unreachable: refused",
                                                   started_at=at, finished_at=at))
        else:
            store.save_cluster(run, cluster_result(
                "prod-west", at, {f"ip-10-1-0-{i}": "closed" for i in range(20)},
                enabled=day >= 8))
        store.finish_run(run, finished_at=at + timedelta(minutes=1))
    # A second prod-east scan late on day 2: the day's point must come from it.
    at = BASE + timedelta(days=2, hours=20)
    run = store.begin_run(trigger="test", started_at=at)
    spec = east(2)
    spec["worker-05"] = "down"
    store.save_cluster(run, cluster_result("prod-east", at, spec))
    store.finish_run(run, finished_at=at)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path = tmp_path_factory.mktemp("reports") / "felixscan.db"
    with Store(f"sqlite:///{path}") as store:
        populate(store)
        yield store


@pytest.fixture(scope="module")
def pdf(filled: Store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pdf") / "report.pdf"
    info = build_report(filled, fmt="pdf", out=out, now=NOW, **PERIOD)
    return out, info.sha256


# --- history ---------------------------------------------------------------------------------


def test_series_has_one_point_per_day_from_the_last_scan_of_that_day(filled: Store) -> None:
    data = load_report(filled, clusters=["prod-east"], now=NOW, **PERIOD)
    (east_report,) = data.clusters
    series = east_report.series
    assert [p.day for p in series] == [date(2026, 3, d) for d in range(1, 11)]
    assert series[2].unknown == 2  # from the late scan of day 2: worker-05 and </td> down
    assert series[2].scan_id == DAYS + 1
    assert series[3].failing == 2 and series[3].ratio == pytest.approx(11 / 13)
    assert data.not_scanned == ()
    assert data.scan_ids == tuple(sorted({p.scan_id for p in series}))


def test_changes_since_previous_scan_are_node_by_node(filled: Store) -> None:
    (c,) = load_report(filled, clusters=["prod-east"], now=NOW, **PERIOD).clusters
    assert c.latest.scan_id == DAYS and c.status == "non_compliant"
    changes = c.changes
    assert changes is not None and changes.previous.scan_id == DAYS - 1
    assert [(x.node, x.before, x.after) for x in changes.regressed] == [
        ("worker-07", "pass", "fail"), ("worker-09", "pass", "unknown")]
    assert [(x.node, x.before, x.after) for x in changes.fixed] == [(TD, "unknown", "pass")]
    assert [(x.node, x.after) for x in changes.new] == [("worker-12", "pass")]
    assert [(x.node, x.before) for x in changes.removed] == [("worker-11", "pass")]
    # Failing first, then unknown, then passing; natural order inside.
    assert [n.verdict for n in c.nodes[:3]] == ["fail", "fail", "unknown"]
    assert [n.name for n in c.nodes[3:5]] == [TD, "worker-01"]
    assert c.nodes[-1].name == "worker-12"
    assert c.findings[0].severity == "critical"
    assert c.method.scanner_host and c.rollout and c.rollout["complete"] is True


def test_error_scan_and_period_filter(filled: Store) -> None:
    data = load_report(filled, clusters=["prod-west"], since=date(2026, 3, 5),
                       until=date(2026, 3, 5), now=NOW)
    (west,) = data.clusters
    assert west.status == "error" and west.nodes == () and west.changes is None
    assert [(p.day, p.ratio, p.nodes) for p in west.series] == [(date(2026, 3, 5), None, 0)]
    assert data.since == data.until == date(2026, 3, 5)
    assert west.findings[0].id == "CLUSTER-SCAN-FAILED"


def test_defaults_cover_the_whole_history_up_to_today(filled: Store) -> None:
    data = load_report(filled, now=NOW)
    assert (data.since, data.until) == (date(2026, 3, 1), NOW.date())
    assert [c.name for c in data.clusters] == ["prod-east", "prod-west"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"clusters": ["prod-north"]}, r"unknown cluster 'prod-north'.*prod-east, prod-west"),
    ({"since": date(2027, 1, 1), "until": date(2027, 1, 31)}, r"no scans of any cluster"),
    ({"clusters": ["prod-west"], "since": date(2026, 4, 1), "until": date(2026, 4, 2)},
     r"no scans of prod-west between 2026-04-01 and 2026-04-02"),
    ({"since": date(2026, 3, 9), "until": date(2026, 3, 1)}, r"--since 2026-03-09 is after"),
])
def test_unknown_cluster_and_empty_period_are_errors(filled: Store, kwargs: dict[str, object],
                                                     message: str, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=message):
        load_report(filled, now=NOW, **kwargs)  # type: ignore[arg-type]
    out = tmp_path / "r.pdf"
    with pytest.raises(ReportError):
        build_report(filled, fmt="pdf", out=out, now=NOW, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()


def test_empty_database_is_an_error(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'empty.db'}") as store:
        store.upgrade()
        with pytest.raises(ReportError, match="holds no scans"):
            load_report(store)


def test_the_trend_never_reads_node_probes(filled: Store) -> None:
    statements: list[str] = []

    def log(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(filled.engine, "before_cursor_execute", log)
    try:
        load_report(filled, now=NOW, **PERIOD)
    finally:
        event.remove(filled.engine, "before_cursor_execute", log)
    probes = [s for s in statements if "node_probes" in s]
    # One read of the latest scan's nodes and one of the previous scan's verdicts per cluster
    # with nodes (prod-west's latest scan has nodes too): never one per day.
    assert len(probes) == 4
    assert all("cluster_scan_id =" in s for s in probes)


# --- HTML ----------------------------------------------------------------------------------


class _Structure(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_self_contained_structured_and_escaped(filled: Store) -> None:
    data = load_report(filled, now=NOW, **PERIOD)
    html = render_html(data)
    page = _Structure()
    page.feed(html)
    tags = [t for t, _ in page.tags]
    assert "script" not in tags and "link" not in tags and "img" not in tags
    assert not [a for _, attrs in page.tags for k, a in attrs.items()
                if k in ("src", "href") and a and not a.startswith("#")]
    assert not re.search(r"\bon\w+=", html)  # no event handlers either
    sections = [attrs.get("class") for t, attrs in page.tags if t == "section"]
    assert sections == ["cover", "summary", "cluster", "cluster", "controls", "method",
                        "integrity"]
    assert tags.count("svg") == 2 and tags.count("thead") >= 8
    assert tags.count("table") - tags.count("thead") <= 8  # only small key/value tables lack one
    text = "".join(page.text)
    # The hostile names come back as text, never as markup.
    assert SCRIPT in text and TD in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;/td&gt;" in html
    assert "<script>" not in html
    digest = report_hash(data)
    assert digest in text and f"sha256:{digest}" in html
    for heading in ("Executive summary", "Cluster prod-east", "Cluster prod-west", "History",
                    "Changes since the previous scan", "Method", "Integrity", "Remediation."):
        assert heading in text


def test_passing_nodes_are_compact_and_big_failures_become_a_listing(tmp_path: Path) -> None:
    assert compact_names(["worker-01", "worker-02", "worker-03", "worker-07", "db-1"]) == [
        "db-1", "worker-[01-03,07]"]
    assert compact_names([f"ip-10-0-{i // 250}-{i % 250}.eu-west-1.compute.internal"
                          for i in range(500)]) == [
        "ip-10-0-0-[0-249].eu-west-1.compute.internal",
        "ip-10-0-1-[0-249].eu-west-1.compute.internal"]
    assert code_spans("run `kubectl <x>` then <b>") == (
        "run <code>kubectl &lt;x&gt;</code> then &lt;b&gt;")
    # 08 -> 9 is no run (padding differs); n09x has another shape.
    assert compact_names(["n9", "n10", "n11", "n08", "n09x"]) == ["n09x", "n[08,9-11]"]

    with Store(f"sqlite:///{tmp_path / 'big.db'}") as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=BASE)
        spec = {f"node-{i:04d}": "open" if i < TABLE_ROWS + 50 else "closed"
                for i in range(TABLE_ROWS * 3)}
        store.save_cluster(run, cluster_result("big", BASE, spec))
        html = render_html(load_report(store, now=NOW, since=BASE.date(), until=BASE.date()))
    assert html.count('<pre class="listing">') >= 3
    assert "node-0000" in html and f"node-{TABLE_ROWS + 49:04d}" in html
    assert f"node-[{TABLE_ROWS + 50:04d}-{TABLE_ROWS * 3 - 1:04d}]" in html
    assert "<table class=\"nodes\">" not in html


# --- PDF, attachment, hash ------------------------------------------------------------------


def test_pdf_text_and_embedded_data(filled: Store, pdf: tuple[Path, str]) -> None:
    path, digest = pdf
    reader = PdfReader(path)
    text = "\n".join(page.extract_text() for page in reader.pages)
    flat = re.sub(r"\s+", "", text)
    for expected in ("Executive summary", "Cluster prod-east", "Cluster prod-west",
                     "2026-03-01 to 2026-03-10 (UTC)", "Changes since the previous scan",
                     "FELIX-PORT-REACHABLE", "Remediation.", "Integrity"):
        assert expected in text
    assert SCRIPT in text and TD in text
    assert digest in flat
    assert f"Page 1 of {len(reader.pages)}" in text
    # Every page but the cover carries the running header with title and period.
    for page in reader.pages[1:]:
        assert "2026-03-01 to 2026-03-10 (UTC)" in page.extract_text()

    (embedded,) = [f for f in reader.attachment_list if f.name == ATTACHMENT_NAME]
    raw = embedded.content
    assert raw == canonical_json(load_report(filled, now=NOW, **PERIOD))
    assert report_hash(raw) == digest
    doc = json.loads(raw)
    assert [c["name"] for c in doc["clusters"]] == ["prod-east", "prod-west"]
    assert SCRIPT in {n["name"] for n in doc["clusters"][0]["nodes"]}
    assert f"sha256:{digest}" in str(reader.metadata["/Keywords"])
    assert f"sha256:{digest}" in (embedded.description or "")

    result = verify_pdf(path)
    assert result.matched and result.printed and result.canonical
    assert result.expected == result.actual == digest


def test_editing_one_byte_of_the_data_breaks_the_hash(pdf: tuple[Path, str],
                                                      tmp_path: Path) -> None:
    path, digest = pdf
    reader = PdfReader(path)
    (embedded,) = [f for f in reader.attachment_list if f.name == ATTACHMENT_NAME]
    raw = bytearray(embedded.content)
    at = raw.index(b'"worker-07"') + 1
    raw[at:at + 1] = b"W"  # one byte: worker-07 -> Worker-07
    assert report_hash(bytes(raw)) != digest

    writer = PdfWriter(clone_from=reader)
    (target,) = [f for f in writer.attachment_list if f.name == ATTACHMENT_NAME]
    target.content = bytes(raw)
    tampered = tmp_path / "tampered.pdf"
    with tampered.open("wb") as fh:
        writer.write(fh)
    result = verify_pdf(tampered)
    assert not result.matched
    assert result.expected == digest and result.actual == report_hash(bytes(raw))
    assert "altered" in result.reason


def test_embedded_data_reads_back_into_the_report_data(filled: Store,
                                                      pdf: tuple[Path, str]) -> None:
    """What `report verify` renders again: the embedded bytes, read back, are the data the
    report was made from, and render to the same HTML."""
    data = load_report(filled, now=NOW, **PERIOD)
    (embedded,) = [f for f in PdfReader(pdf[0]).attachment_list if f.name == ATTACHMENT_NAME]
    back = report_data(embedded.content)
    assert back == data
    assert render_html(back) == render_html(data)
    with pytest.raises(ReportError, match="does not fit this felixscan's report data"):
        report_data(b'{"title": "x"}')
    with pytest.raises(ReportError, match=r"data\.clusters\[0\]: expected an object"):
        report_data(canonical_json(data).replace(b'"clusters":[{', b'"clusters":[1,{', 1))


def test_pdf_without_the_data_does_not_verify(tmp_path: Path) -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=595, height=842)
    plain = tmp_path / "plain.pdf"
    with plain.open("wb") as fh:
        writer.write(fh)
    result = verify_pdf(plain)
    assert not result.matched and result.actual is None
    with pytest.raises(ReportError, match="not a readable PDF"):
        verify_pdf(tmp_path / "missing.pdf")
    (tmp_path / "report.html").write_text("<!DOCTYPE html>")
    with pytest.raises(ReportError, match="not a PDF file"):
        verify_pdf(tmp_path / "report.html")


def test_pdf_a3b_keeps_the_attachment_and_verifies(filled: Store, tmp_path: Path) -> None:
    out = tmp_path / "archive.pdf"
    info = build_report(filled, clusters=["prod-west"], fmt="pdf", out=out,
                        pdf_variant="pdf/a-3b", now=NOW, **PERIOD)
    reader = PdfReader(out)
    catalog = reader.trailer["/Root"]
    assert "/AF" in catalog and "/OutputIntents" in catalog
    assert b"pdfaid:part" in out.read_bytes() or "/Metadata" in catalog
    assert verify_pdf(out).matched and verify_pdf(out).expected == info.sha256
    assert set(info.timings) >= {"query", "template", "layout"}
    with pytest.raises(ReportError, match="cannot embed"):
        build_report(filled, fmt="pdf", out=tmp_path / "a2.pdf", pdf_variant="pdf/a-2b",
                     now=NOW, **PERIOD)
    with pytest.raises(ReportError, match="PDF reports only"):
        build_report(filled, fmt="html", out=tmp_path / "a.html", pdf_variant="pdf/a-3b",
                     now=NOW, **PERIOD)
    with pytest.raises(ReportError, match="unknown report format"):
        build_report(filled, fmt="docx", out=tmp_path / "a.docx", now=NOW, **PERIOD)


def test_render_pdf_refuses_html_of_other_data(filled: Store) -> None:
    data = load_report(filled, clusters=["prod-west"], now=NOW, **PERIOD)
    html = render_html(data)
    other = canonical_json(replace(data, title="something else"))
    with pytest.raises(ReportError, match="not rendered from this report data"):
        render_pdf(html, attachment_json=other)


def test_html_report_file(filled: Store, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    info = build_report(filled, fmt="html", out=out, now=NOW, **PERIOD)
    html = out.read_text(encoding="utf-8")
    assert info.sha256 in html and info.size == len(html.encode())
    assert info.scan_ids == tuple(range(1, DAYS + 2))
    assert "layout" not in info.timings
    # The same data gives the same bytes: the report is reproducible from the database.
    again = build_report(filled, fmt="html", out=tmp_path / "again.html", now=NOW, **PERIOD)
    assert again.sha256 == info.sha256


# --- PostgreSQL -------------------------------------------------------------------------------

PG_ADMIN = os.environ.get("FELIXSCAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_store() -> Iterator[Store]:
    import psycopg

    name = f"felixscan_test_reports_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        with Store(f"{url}/{name}") as store:
            yield store
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_report_from_postgresql(pg_store: Store, tmp_path: Path) -> None:
    populate(pg_store)
    data = load_report(pg_store, now=NOW, **PERIOD)
    (east_report, west) = data.clusters
    assert len(east_report.series) == DAYS and east_report.series[2].scan_id == DAYS + 1
    assert east_report.changes is not None
    assert [c.node for c in east_report.changes.regressed] == ["worker-07", "worker-09"]
    assert west.series[4].ratio is None
    assert data.database.startswith("postgresql+psycopg://postgres@127.0.0.1")
    out = tmp_path / "pg.pdf"
    info = build_report(pg_store, fmt="pdf", out=out, clusters=["prod-east"], now=NOW, **PERIOD)
    assert verify_pdf(out).matched and info.sha256 == verify_pdf(out).actual
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(out.read_bytes())).pages)
    assert SCRIPT in text and "Cluster prod-east" in text


def test_scans_pruned_by_retention_are_said_so(tmp_path: Path) -> None:
    from sqlalchemy import delete, select, update

    from scanner.db.models import ClusterScan, NodeProbe

    with Store(f"sqlite:///{tmp_path / 'pruned.db'}") as store:
        populate(store)
        pruned = BASE + timedelta(days=30)
        with store.session() as s:  # what retention does: drop the probes, keep the counts
            ids = list(s.scalars(select(ClusterScan.id).where(  # scans 9 (previous) and 2
                ClusterScan.cluster == "prod-east", ClusterScan.run_id.in_([DAYS - 1, 2]))))
            s.execute(delete(NodeProbe).where(NodeProbe.cluster_scan_id.in_(ids)))
            s.execute(update(ClusterScan).where(ClusterScan.id.in_(ids))
                      .values(pruned_at=pruned))
        (c,) = load_report(store, clusters=["prod-east"], now=NOW, **PERIOD).clusters
        assert c.changes is None and c.changes_note is not None
        assert "removed by retention on 2026-03-31" in c.changes_note
        (old,) = load_report(store, clusters=["prod-east"], now=NOW, since=date(2026, 3, 2),
                             until=date(2026, 3, 2)).clusters
        assert old.nodes == () and old.nodes_pruned_at == pruned and old.nodes_total == 13
        html = render_html(load_report(store, clusters=["prod-east"], now=NOW,
                                       since=date(2026, 3, 2), until=date(2026, 3, 2)))
        assert "removed by retention on 2026-03-31" in html
