"""Waivers end to end: the real CLI scans emulated clusters with a `waivers_file`, and the JSON,
the exit code, the database and the PDF report show what was accepted, by whom and until when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pypdf import PdfReader
from sqlalchemy import create_engine, text

from tests.helpers.scan_harness import Harness, Node, felixscan

TODAY = datetime.now(UTC).date()


def waivers(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(list(entries), sort_keys=False))
    return path


def accept(**over: Any) -> dict[str, Any]:
    entry = {"finding": "FELIX-PORT-REACHABLE", "cluster": "prod", "nodes": "gpu-*",
             "reason": "vendor GPU exporter scrapes Felix until the Q1 upgrade",
             "approved_by": "ciso@example.com", "created": TODAY - timedelta(days=10),
             "expires": TODAY + timedelta(days=60)}
    entry.update(over)
    return entry


@pytest.fixture
def fleet(harness: Harness) -> Harness:
    """prod: a GPU node still serving Felix metrics over HTTP, and a closed node."""
    harness.cluster("prod", [Node("felix-http", name="gpu-1"), Node("closed", name="cpu-1")])
    return harness


def rows(db_url: str, sql: str) -> list[Any]:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)))
    finally:
        engine.dispose()


def test_a_scan_whose_only_failures_are_waived_exits_0_and_shows_them(
        fleet: Harness, db_url: str, tmp_path: Path) -> None:
    fleet.top_level["waivers_file"] = str(waivers(tmp_path / "waivers.yaml", accept()))
    out = fleet.scan(db_url)
    assert out.code == 0, out.stderr
    prod = out.cluster("prod")
    assert prod["status"] == "compliant"
    assert prod["totals"] == {"nodes": 2, "pass": 1, "fail": 0, "unknown": 0, "waived": 1}
    verdicts = {n["name"]: (n["verdict"], n["waiver"]) for n in prod["nodes"]}
    [waiver] = prod["waivers"]
    assert verdicts == {"gpu-1": ("waived", waiver["id"]), "cpu-1": ("pass", None)}
    assert waiver["approved_by"] == "ciso@example.com"
    assert waiver["expires"] == (TODAY + timedelta(days=60)).isoformat()
    reachable = [f for f in prod["findings"] if f["id"] == "FELIX-PORT-REACHABLE"]
    assert reachable and reachable[0]["waiver"] == waiver["id"]  # still listed, marked
    # The text summary says it too.
    text_run = felixscan("scan", "--config", str(fleet.config()), "--db", db_url)
    assert text_run.code == 0
    assert "1 waived" in text_run.stdout and "1 waiver(s) applied" in text_run.stdout

    [(nodes_waived, stored)] = rows(db_url, "SELECT nodes_waived, waivers FROM cluster_scans "
                                            "ORDER BY id LIMIT 1")
    assert nodes_waived == 1
    stored = stored if isinstance(stored, list) else yaml.safe_load(stored)
    assert stored[0]["id"] == waiver["id"] and stored[0]["reason"].startswith("vendor GPU")
    assert rows(db_url, "SELECT verdict FROM node_probes WHERE node = 'gpu-1' LIMIT 1") == \
        [("waived",)]
    assert ("waived",) in rows(db_url, "SELECT verdict FROM node_states")
    assert rows(db_url, "SELECT waived FROM daily_cluster_summary") == [(1,)]

    trend = felixscan("trend", "--db", db_url, "--format", "json")
    assert trend.code == 0 and '"waived": 1' in trend.stdout


def test_the_report_lists_the_waivers_stored_with_the_scan(
        fleet: Harness, db_url: str, tmp_path: Path) -> None:
    """A report shows the waivers that applied then, even after the file has changed."""
    file = waivers(tmp_path / "waivers.yaml", accept())
    fleet.top_level["waivers_file"] = str(file)
    assert fleet.scan(db_url).code == 0
    file.write_text("[]\n")  # withdrawn since: the scan keeps what applied when it ran
    pdf = tmp_path / "audit.pdf"
    run = felixscan("report", "--db", db_url, "--out", str(pdf))
    assert run.code == 0, run.stderr
    words = " ".join(" ".join(page.extract_text().split()) for page in PdfReader(pdf).pages)
    assert "Accepted risks (waivers)" in words
    assert "ciso@example.com" in words and "vendor GPU exporter scrapes Felix" in words
    assert f"{TODAY - timedelta(days=10)} to {TODAY + timedelta(days=60)}" in words
    assert "1 waived" in words
    document = felixscan("report", "--db", db_url, "--format", "json")
    assert document.code == 0
    assert '"waived": 1' in document.stdout and "ciso@example.com" in document.stdout


def test_an_expired_waiver_is_a_finding_and_the_failure_counts_again(
        fleet: Harness, db_url: str, tmp_path: Path) -> None:
    old = accept(created=TODAY - timedelta(days=100), expires=TODAY - timedelta(days=1))
    fleet.top_level["waivers_file"] = str(waivers(tmp_path / "waivers.yaml", old))
    out = fleet.scan(db_url)
    assert out.code == 1
    prod = out.cluster("prod")
    assert prod["status"] == "non_compliant" and prod["totals"]["fail"] == 1
    assert prod["waivers"] == []
    [expired] = [f for f in prod["findings"] if f["id"] == "WAIVER-EXPIRED"]
    assert f"expired on {TODAY - timedelta(days=1)}" in expired["message"]


def test_a_malformed_entry_is_a_finding_and_a_bad_file_stops_the_scan(
        fleet: Harness, db_url: str, tmp_path: Path) -> None:
    no_expiry = accept()
    del no_expiry["expires"]
    fleet.top_level["waivers_file"] = str(waivers(tmp_path / "waivers.yaml", no_expiry))
    out = fleet.scan(db_url)
    assert out.code == 1  # nothing waived: the port is still reachable
    [invalid] = [f for f in out.cluster("prod")["findings"] if f["id"] == "WAIVER-INVALID"]
    assert "missing expires (an expiry date is required)" in invalid["message"]

    (tmp_path / "broken.yaml").write_text("- finding: [unclosed\n")
    fleet.top_level["waivers_file"] = str(tmp_path / "broken.yaml")
    before = rows(db_url, "SELECT count(*) FROM cluster_scans")
    bad = fleet.scan(db_url)
    assert bad.code == 2
    assert "waivers_file" in bad.stderr and "is not valid YAML" in bad.stderr
    assert rows(db_url, "SELECT count(*) FROM cluster_scans") == before  # nothing scanned
    fleet.top_level["waivers_file"] = str(tmp_path / "missing.yaml")
    gone = fleet.scan(db_url)
    assert gone.code == 2 and "cannot read" in gone.stderr


@pytest.mark.parametrize("fmt", ["sarif", "junit", "ocsf", "csv"])
def test_machine_formats_mark_the_waived_finding(fleet: Harness, sqlite_url: str,
                                                 tmp_path: Path, fmt: str) -> None:
    fleet.top_level["waivers_file"] = str(waivers(tmp_path / "waivers.yaml", accept()))
    run = felixscan("scan", "--config", str(fleet.config()), "--db", sqlite_url,
                    "--format", fmt)
    assert run.code == 0, run.stderr
    if fmt == "sarif":
        import json

        results = json.loads(run.stdout)["runs"][0]["results"]
        [waived] = [r for r in results if r["ruleId"] == "FELIX-PORT-REACHABLE"]
        [suppression] = waived["suppressions"]
        assert suppression["kind"] == "external" and suppression["status"] == "accepted"
        assert "ciso@example.com" in suppression["justification"]
    elif fmt == "junit":
        from junitparser import JUnitXml, Skipped

        suite = next(iter(JUnitXml.fromstring(run.stdout.encode())))
        gpu = next(case for case in suite if case.name == "gpu-1")
        assert any(isinstance(r, Skipped) for r in gpu.result)
        assert suite.skipped == 1 and suite.failures == 0
    elif fmt == "ocsf":
        import json

        events = json.loads(run.stdout)
        waived = [e for e in events if e["finding_info"]["title"].startswith("Felix serves")
                  or e.get("message", "").startswith("Felix metrics are served")]
        assert waived and all(e["status"] == "Suppressed" for e in waived)
    else:
        header, *lines = run.stdout.splitlines()
        assert header.endswith(",waiver,control")  # the control column came after the waiver
        assert any("FELIX-PORT-REACHABLE" in line and ",W-" in line for line in lines)
