"""`felixscan demo`: a real week of scans against the emulated fleet, ending in two reports."""

from __future__ import annotations

from pathlib import Path

import pytest
from pypdf import PdfReader
from sqlalchemy import create_engine, text

from scanner.cli import main


def test_demo_replays_a_week_and_writes_verifiable_reports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " scan " in line]
    assert len(lines) == 7
    # prod-east is remediated (rollout completes on day 5); prod-west regresses on day 6.
    assert all("prod-east NON-COMPLIANT" in line for line in lines[:4])
    assert all("prod-east COMPLIANT" in line for line in lines[4:])
    assert all("prod-west COMPLIANT" in line for line in lines[:5])
    assert all("prod-west NON-COMPLIANT" in line for line in lines[5:])
    assert all("staging COMPLIANT" in line for line in lines)

    html = (tmp_path / "demo-report.html").read_text()
    assert "<script" not in html
    assert "prod-east" in html and "prod-west" in html
    pdf = tmp_path / "demo-report.pdf"
    text_of_pdf = "\n".join(page.extract_text() for page in PdfReader(pdf).pages)
    assert "FELIX-PORT-REACHABLE" in text_of_pdf
    assert "prod-west" in text_of_pdf
    assert main(["report", "verify", str(pdf)]) == 0

    engine = create_engine(f"sqlite:///{tmp_path / 'felixscan-demo.db'}")
    with engine.connect() as conn:
        days = conn.execute(text(
            "SELECT count(DISTINCT date(started_at)) FROM cluster_scans")).scalar()
        assert days == 7
        drift = conn.execute(text(
            "SELECT count(*) FROM findings WHERE finding_id = 'ROLLOUT-INCOMPLETE'")).scalar()
        assert drift == 1  # the night the rollout reached 9 of 12 nodes
    engine.dispose()
    assert not (tmp_path / "demo-kubeconfig").exists()
