"""The benchmarks still run: each bench that has a `--smoke` size (small, checked, no time
target), listed below, is run with it as CI can afford."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT


@pytest.mark.parametrize("bench", ["metrics"])
def test_bench_smoke(bench: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / bench), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "median" in proc.stdout and "p95" in proc.stdout
    assert "checked against the database" in proc.stdout
