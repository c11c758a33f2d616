"""The cover an auditor signs off: the overall result, the scope, who prepared the report and
who owns the control (from the config), and a place to sign."""

from __future__ import annotations

from pathlib import Path

from pypdf import PdfReader

from tests.helpers.scan_harness import Harness, Node, felixscan


def cover(pdf: Path) -> str:
    return " ".join(PdfReader(pdf).pages[0].extract_text().split())


def test_the_cover_states_result_scope_and_people(harness: Harness, sqlite_url: str,
                                                  tmp_path: Path) -> None:
    harness.cluster("prod", [Node("felix-http", name="n1")])
    harness.top_level["report"] = {"preparer": "Platform security team",
                                   "owner": "Head of platform engineering"}
    config = str(harness.config())
    assert felixscan("scan", "--config", config, "--db", sqlite_url,
                     "--vantage", "corp-network").code == 1
    pdf = tmp_path / "r.pdf"
    run = felixscan("report", "--config", config, "--db", sqlite_url, "--out", str(pdf))
    assert run.code == 0, run.stderr
    text = cover(pdf)
    assert "Overall result: NOT COMPLIANT" in text
    assert "1 of 1 cluster(s) non-compliant" in text
    assert "Prepared by Platform security team" in text
    assert "Control owner Head of platform engineering" in text
    assert "Probed from corp-network" in text
    assert "What was checked" in text and "Reviewed and accepted by" in text


def test_without_people_configured_the_cover_says_where_to_set_them(
        harness: Harness, sqlite_url: str, tmp_path: Path) -> None:
    harness.cluster("prod", ["closed"])
    assert harness.scan(sqlite_url).code == 0
    pdf = tmp_path / "r.pdf"
    assert felixscan("report", "--db", sqlite_url, "--out", str(pdf)).code == 0
    text = cover(pdf)
    assert "Overall result: COMPLIANT" in text
    assert "not set (config report.preparer)" in text
    html = tmp_path / "r.html"
    assert felixscan("report", "--db", sqlite_url, "--out", str(html)).code == 0
    # The HTML edition sends nobody to an attachment it does not have.
    assert "(PDF attachment)" not in html.read_text()
