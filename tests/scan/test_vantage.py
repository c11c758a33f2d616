"""Vantage points: every scan records where its probes came from, and a report shows each
cluster's latest result from each vantage; a node fails if any vantage's latest scan fails it."""

from __future__ import annotations

import json
from pathlib import Path

from pypdf import PdfReader
from sqlalchemy import create_engine, text

from tests.helpers.scan_harness import Harness, Node, felixscan

ENABLED = "FELIX_PROMETHEUSMETRICSENABLED"


def vantages(db_url: str) -> list[tuple[str, str]]:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(
                "SELECT vantage, scanner_host FROM scan_runs ORDER BY id"))]  # type: ignore[misc]
    finally:
        engine.dispose()


def test_each_scan_records_its_vantage_and_the_report_takes_the_worst(
        harness: Harness, db_url: str, tmp_path: Path, monkeypatch: object) -> None:
    handle = harness.cluster("prod", [Node("closed", name="a-1"), Node("closed", name="b-1")],
                             env={ENABLED: "true"})
    config = str(harness.config())
    # The in-cluster agent sees the endpoint enabled (its scan runs first)...
    inside = felixscan("scan", "--config", config, "--db", db_url, "--format", "json",
                       "--vantage", "pod-network")
    assert inside.code == 1
    assert json.loads(inside.stdout)["vantage"] == "pod-network"
    # ...then the endpoint is switched off and serve's scan from outside finds it compliant.
    handle.update_env({ENABLED: "false"}, roll=True)
    outside = felixscan("scan", "--config", config, "--db", db_url, "--format", "json",
                        "--vantage", "corp-network")
    assert outside.code == 0
    plain = felixscan("scan", "--config", config, "--db", db_url, "--format", "json")
    assert plain.code == 0
    host = json.loads(plain.stdout)["vantage"]
    rows = vantages(db_url)
    assert [v for v, _ in rows] == ["pod-network", "corp-network", host]
    assert all(h == host for _, h in rows)  # the host is kept beside the name

    report = felixscan("report", "--db", db_url, "--format", "json")
    assert report.code == 0, report.stderr
    [prod] = json.loads(report.stdout)["clusters"]
    assert [v["vantage"] for v in prod["vantages"]] == [host, "corp-network", "pod-network"]
    by_vantage = {v["vantage"]: v for v in prod["vantages"]}
    assert by_vantage["pod-network"]["status"] == "non_compliant"
    assert sorted(by_vantage["pod-network"]["failing"]) == ["a-1", "b-1"]
    assert by_vantage["corp-network"]["failing"] == []
    # The latest scan passed, but the agent's latest scan failed both nodes: non-compliant.
    assert prod["status"] == "non_compliant"

    pdf = tmp_path / "r.pdf"
    assert felixscan("report", "--db", db_url, "--out", str(pdf)).code == 0
    words = " ".join(" ".join(p.extract_text().split()) for p in PdfReader(pdf).pages)
    assert "Vantage points" in words and "pod-network" in words and "corp-network" in words
    assert "NOT COMPLIANT" in words


def test_the_vantage_comes_from_the_config_or_the_environment(
        harness: Harness, sqlite_url: str, monkeypatch: object) -> None:
    import pytest

    mp = monkeypatch
    assert isinstance(mp, pytest.MonkeyPatch)
    harness.cluster("prod", ["closed"])
    harness.top_level["vantage"] = "dmz"
    config = str(harness.config())
    first = felixscan("scan", "--config", config, "--db", sqlite_url, "--format", "json")
    assert json.loads(first.stdout)["vantage"] == "dmz"
    mp.setenv("FELIXSCAN_VANTAGE", "pod-network")
    second = felixscan("scan", "--config", config, "--db", sqlite_url, "--format", "json")
    assert json.loads(second.stdout)["vantage"] == "pod-network"
    bad = felixscan("scan", "--config", config, "--db", sqlite_url, "--vantage", "no spaces")
    assert bad.code == 2 and "--vantage" in bad.stderr
    harness.top_level["vantage"] = "bad name!"
    broken = felixscan("scan", "--config", str(harness.config()), "--db", sqlite_url)
    assert broken.code == 2 and "vantage" in broken.stderr


def test_the_web_page_and_api_show_each_vantage(harness: Harness, sqlite_url: str,
                                                tmp_path: Path) -> None:
    from reports.cache import ReportCache
    from scanner.db.store import Store
    from tests.web.test_web import TOKEN, Auth, create_app, fetch, served

    handle = harness.cluster("prod", [Node("closed", name="a-1")], env={ENABLED: "true"})
    config = str(harness.config())
    assert felixscan("scan", "--config", config, "--db", sqlite_url,
                     "--vantage", "pod-network").code == 1
    handle.update_env({ENABLED: "false"}, roll=True)
    assert felixscan("scan", "--config", config, "--db", sqlite_url,
                     "--vantage", "corp-network").code == 0
    with Store(sqlite_url) as store:
        app = create_app(store=store, auth=Auth(token=TOKEN), reports=ReportCache(tmp_path / "c"))
        with served(app) as base:
            detail = fetch(base, "/api/clusters/prod").json()
            assert [v["vantage"] for v in detail["vantages"]] == ["corp-network", "pod-network"]
            assert detail["vantages"][1]["failing"] == ["a-1"]
            page = fetch(base, "/clusters/prod").text
            assert "Vantage points" in page and "pod-network" in page
