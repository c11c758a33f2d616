"""The control catalogue: which controls of which standards each finding ID evidences
(`controls.yaml` beside this module: CIS Kubernetes Benchmark, NSA/CISA Kubernetes Hardening
Guidance, PCI DSS v4.0, NIST SP 800-53 rev 5, ISO/IEC 27001:2022 Annex A), each control with the
source its number and title were read from. docs/controls.md says how it was made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

STRENGTHS = ("direct", "supporting", "conditional")


@dataclass(frozen=True, slots=True)
class Standard:
    id: str  # cis-k8s, nsa-cisa-k8s, pci-dss-4.0, nist-800-53-r5, iso-27001-2022
    title: str
    version: str
    publisher: str
    source_url: str


@dataclass(frozen=True, slots=True)
class Control:
    standard: str
    id: str
    title: str
    source: str  # where the number and title were read


@dataclass(frozen=True, slots=True)
class ControlMapping:
    """One finding ID evidences one control, this strongly, for this reason."""

    finding: str
    standard: str
    control: str
    strength: str  # direct, supporting or conditional (then `condition` says when)
    rationale: str
    condition: str | None = None


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: refs are cached per catalogue
class Catalogue:
    standards: tuple[Standard, ...]
    controls: tuple[Control, ...]
    mappings: tuple[ControlMapping, ...]
    unmapped: Mapping[str, str]

    def standard(self, standard_id: str) -> Standard:
        return next(s for s in self.standards if s.id == standard_id)

    def control(self, standard: str, control: str) -> Control:
        return next(c for c in self.controls if c.standard == standard and c.id == control)

    def for_finding(self, finding: str) -> tuple[ControlMapping, ...]:
        return tuple(m for m in self.mappings if m.finding == finding)

    def refs(self, finding: str) -> list[dict[str, Any]]:
        """A finding's controls as JSON: standard, control, title, strength (a fresh list;
        the lookup is made once per finding ID, not once per finding of a 5,000-node scan)."""
        return [dict(ref) for ref in _refs(self, finding)]


@cache
def _refs(cat: Catalogue, finding: str) -> tuple[dict[str, Any], ...]:
    return tuple({"standard": m.standard, "control": m.control,
                  "title": cat.control(m.standard, m.control).title, "strength": m.strength}
                 for m in cat.for_finding(finding))


@cache
def catalogue() -> Catalogue:
    """The shipped catalogue (read once)."""
    text = resources.files("scanner.core").joinpath("controls.yaml").read_text("utf-8")
    return parse(yaml.safe_load(text))


def parse(doc: Mapping[str, Any]) -> Catalogue:
    standards = tuple(Standard(id=s["id"], title=s["title"], version=str(s["version"]),
                               publisher=s["publisher"], source_url=s["source_url"])
                      for s in doc["standards"])
    controls = tuple(Control(standard=c["standard"], id=str(c["id"]), title=c["title"],
                             source=" ".join(str(c["source"]).split()))
                     for c in doc["controls"])
    mappings = tuple(ControlMapping(finding=finding, standard=m["standard"],
                                    control=str(m["control"]), strength=m["strength"],
                                    rationale=m["rationale"], condition=m.get("condition"))
                     for finding, items in doc["mappings"].items() for m in items)
    return Catalogue(standards=standards, controls=controls, mappings=mappings,
                     unmapped=dict(doc.get("unmapped") or {}))


@dataclass(frozen=True, slots=True)
class ControlStatus:
    """A control's state in a report: what the findings at the latest scans say of it."""

    control: Control
    status: str  # not_met, risk_accepted, not_verified, no_finding
    findings: tuple[str, ...]  # the finding IDs behind it (open ones first)


def control_statuses(findings: Iterable[tuple[str, str | None]], *, verified: bool,
                     cat: Catalogue | None = None) -> list[ControlStatus]:
    """Every control of the catalogue, given the findings `(id, waiver)` of the scans a report
    covers. `verified`: every cluster was scanned and every node verified; otherwise a control
    with no finding against it is `not_verified`, never `no_finding`."""
    cat = cat or catalogue()
    open_ids: dict[tuple[str, str], set[str]] = {}
    waived_ids: dict[tuple[str, str], set[str]] = {}
    for finding, waiver in findings:
        for m in cat.for_finding(finding):
            target = waived_ids if waiver else open_ids
            target.setdefault((m.standard, m.control), set()).add(finding)
    out = []
    for c in cat.controls:
        key = (c.standard, c.id)
        if key in open_ids:
            status, ids = "not_met", sorted(open_ids[key]) + sorted(
                waived_ids.get(key, set()) - open_ids[key])
        elif key in waived_ids:
            status, ids = "risk_accepted", sorted(waived_ids[key])
        else:
            status, ids = ("no_finding" if verified else "not_verified"), []
        out.append(ControlStatus(control=c, status=status, findings=tuple(ids)))
    return out
