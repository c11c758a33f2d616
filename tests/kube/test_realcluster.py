"""The same end-to-end checks against a real cluster: `pytest --real-cluster` with KUBECONFIG set.

Skipped by default (no cluster here). Read-only: it scans the current context and probes its
nodes exactly as `felixscan scan` does.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import pytest
from sqlalchemy import create_engine, text

from scanner.app.cli import main

pytestmark = pytest.mark.realcluster


def test_scan_of_the_current_context(sqlite_url: str) -> None:
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("KUBECONFIG is not set")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["scan", "--db", sqlite_url, "--json"])
    doc = json.loads(out.getvalue())
    assert code in (0, 1, 3)
    [cluster] = doc["clusters"]
    assert cluster["status"] in ("compliant", "non_compliant", "error")
    if cluster["status"] != "error" or cluster["nodes"]:
        assert cluster["install"] in ("manifest", "operator", "unknown")
        assert cluster["declared"]["port"]
        for node in cluster["nodes"]:
            assert node["state"] in ("closed", "filtered", "unreachable", "open", "error")
            assert node["verdict"] in ("pass", "fail", "unknown")
            if node["verdict"] == "pass":
                assert node["state"] in ("closed", "filtered")
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT status, nodes_total FROM cluster_scans")).one()
    engine.dispose()
    assert stored == (cluster["status"], len(cluster["nodes"]))
