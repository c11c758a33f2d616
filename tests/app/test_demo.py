"""`felixscan demo`: a real week of scans against the emulated fleet, ending in two reports."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pypdf import PdfReader
from sqlalchemy import create_engine, text

from scanner.app.cli import main
from scanner.app.demo import claim_block
from scanner.core.errors import FelixscanError


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
    # staging's kube-controllers serves its metrics (on by default) until night 3
    assert all("staging NON-COMPLIANT" in line for line in lines[:2])
    assert all("staging COMPLIANT" in line for line in lines[2:])

    html = (tmp_path / "demo-report.html").read_text()
    assert "<script" not in html
    assert "prod-east" in html and "prod-west" in html
    pdf = tmp_path / "demo-report.pdf"
    text_of_pdf = "\n".join(page.extract_text() for page in PdfReader(pdf).pages)
    assert "FELIX-PORT-REACHABLE" in text_of_pdf
    assert "kube-controllers-metrics" in text_of_pdf and "typha-metrics" in text_of_pdf
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


def test_demo_report_is_marked_emulated_and_generated_now(tmp_path: Path) -> None:
    """A demo report says it is emulated data, and shows when it was really made (not the
    replayed night)."""
    before = datetime.now(UTC).replace(microsecond=0)
    assert main(["demo", "--out-dir", str(tmp_path), "--days", "5"]) == 0
    text_of_pdf = " ".join(" ".join(page.extract_text().split())
                           for page in PdfReader(tmp_path / "demo-report.pdf").pages)
    assert "felixscan demo against emulated clusters" in text_of_pdf
    html = (tmp_path / "demo-report.html").read_text()
    stamp = re.search(r'name="dcterms.created" content="([^"]+)"', html)
    assert stamp is not None and datetime.fromisoformat(stamp.group(1)) >= before


def test_demo_blocks_are_claimed_and_checked(tmp_path: Path) -> None:
    """A block another demo holds, or where something listens on 9091, is skipped; none free
    is one clear error."""
    blocks = ["127.59.240.0", "127.59.224.0", "127.59.208.0"]
    with ExitStack() as held:
        assert claim_block(held, blocks=blocks) == blocks[0]  # held until this stack closes
        with socket.socket() as squatter, ExitStack() as second:
            squatter.bind(("127.59.224.7", 9091))
            squatter.listen()
            assert claim_block(second, blocks=blocks) == blocks[2]
            with ExitStack() as third, pytest.raises(FelixscanError, match="no free loopback"):
                claim_block(third, blocks=blocks)


def test_two_demos_at_once_both_succeed_with_the_same_results(tmp_path: Path) -> None:
    """Two copies on one machine: each gets its own address block and the same story."""
    procs = [subprocess.Popen([sys.executable, "-m", "scanner", "demo", "--out-dir",
                               str(tmp_path / name), "--days", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stories = [[line.split(": ", 1)[1] for line in out.splitlines() if " scan " in line]
               for out, _err in outs]
    assert stories[0] == stories[1] and len(stories[0]) == 5
    blocks = {re.search(r"nodes on (\S+)\.x", out).group(1) for out, _err in outs}  # type: ignore[union-attr]
    assert len(blocks) == 2
