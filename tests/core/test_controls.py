"""The control catalogue: every finding accounted for, every control cited, and the states a
report gives each control."""

from __future__ import annotations

from scanner.core.controls import STRENGTHS, catalogue, control_statuses
from scanner.core.findings import RULES
from tests.helpers.paths import ROOT


def test_every_finding_is_mapped_or_says_why_not() -> None:
    cat = catalogue()
    mapped = {m.finding for m in cat.mappings}
    assert mapped | set(cat.unmapped) == set(RULES)
    assert not mapped & set(cat.unmapped)
    assert all(reason.strip() for reason in cat.unmapped.values())


def test_every_mapping_names_a_cited_control_with_a_reason() -> None:
    cat = catalogue()
    declared = {(c.standard, c.id) for c in cat.controls}
    assert {s.id for s in cat.standards} == {"cis-k8s", "nsa-cisa-k8s", "pci-dss-4.0",
                                             "nist-800-53-r5", "iso-27001-2022"}
    assert all(s.source_url.startswith("https://") for s in cat.standards)
    assert all(c.source and c.title for c in cat.controls)
    for m in cat.mappings:
        assert (m.standard, m.control) in declared, m
        assert m.strength in STRENGTHS and m.rationale.strip()
        assert m.strength != "conditional" or m.condition
    # Every declared control is used: nothing listed for show.
    assert declared == {(m.standard, m.control) for m in cat.mappings}
    pairs = [(m.finding, m.standard, m.control) for m in cat.mappings]
    assert len(pairs) == len(set(pairs))


def test_the_docs_cite_every_standard() -> None:
    doc = (ROOT / "docs" / "controls.md").read_text()
    for s in catalogue().standards:
        assert s.id in doc and s.source_url in doc


def test_control_states() -> None:
    by_key = {(x.control.standard, x.control.id): x for x in control_statuses(
        [("FELIX-PORT-REACHABLE", None), ("FELIX-METRICS-ENABLED", "W-1")], verified=True)}
    cm7 = by_key[("nist-800-53-r5", "CM-7")]
    assert cm7.status == "not_met"
    assert cm7.findings == ("FELIX-PORT-REACHABLE", "FELIX-METRICS-ENABLED")  # open first
    assert by_key[("nist-800-53-r5", "CM-6")].status == "risk_accepted"
    assert by_key[("cis-k8s", "4.3.1")].status == "no_finding"
    unverified = {(x.control.standard, x.control.id): x.status
                  for x in control_statuses([], verified=False)}
    assert set(unverified.values()) == {"not_verified"}  # no finding proves nothing then
