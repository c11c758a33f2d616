"""The findings table in docs/ and the catalogue in code say the same thing."""

from __future__ import annotations

import re

from scanner.core.findings import RULES
from tests.helpers.paths import ROOT

DOC = ROOT / "docs" / "findings.md"


def test_every_finding_id_is_documented_with_its_severity() -> None:
    rows = dict(re.findall(r"^\| `([A-Z0-9-]+)` \| (\w+) \|", DOC.read_text(), re.MULTILINE))
    assert rows == {rule.id: rule.severity for rule in RULES.values()}


def test_ids_are_stable_shape() -> None:
    for rule_id in RULES:
        assert re.fullmatch(r"[A-Z]+(-[A-Z0-9]+)+", rule_id), rule_id


def test_the_three_view_verdict_tables_are_the_code() -> None:
    """docs/findings.md's tables (declared x probe x node view) are what node_verdict decides,
    cell by cell: every combination is there, and none says something the code does not."""
    from dataclasses import replace

    from scanner.core.evaluate import node_verdict
    from scanner.core.records import Declared, NodeObservation, ProbeResult

    off = Declared(enabled=False, source="env", port=9091, port_source="default")
    declared = {"disabled": off, "enabled": replace(off, enabled=True),
                "unknown": replace(off, enabled=None)}
    probes = {"closed": ("closed", True), "filtered, node Ready": ("filtered", True),
              "filtered, node not Ready": ("filtered", False),
              "unreachable or error": ("unreachable", True), "open": ("open", True)}
    views = {"no node-check configured": None, "listening": NodeObservation("listening"),
             "not listening": NodeObservation("not_listening"),
             "no view (missing, stale, incomplete)": NodeObservation("no_view")}
    text = DOC.read_text().split("## Verdicts with three views", 1)[1]
    tables = re.findall(r"Declared \*\*(\w+)\*\*:\n\n(\|.*?)\n\n", text, re.DOTALL)
    assert [name for name, _ in tables] == list(declared)
    for name, table in tables:
        header, _rule, *rows = table.splitlines()
        columns = [c.strip() for c in header.strip("|").split("|")][1:]
        assert columns == list(views)
        assert len(rows) == len(probes)
        for row in rows:
            probe_name, *cells = [c.strip() for c in row.strip("|").split("|")]
            state, ready = probes[probe_name]
            probe = ProbeResult(node="n", address="127.0.0.1", port=9091, state=state)  # type: ignore[arg-type]
            expected = [node_verdict(declared[name], probe, ready=ready, view=v)
                        for v in views.values()]
            assert cells == expected, (name, probe_name)
