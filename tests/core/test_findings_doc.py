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
