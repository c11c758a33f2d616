"""Every scan output carries the control (schema 1.2), read by the consumer that would read it:
our JSON Schema (jsonschema), the OASIS SARIF 2.1.0 schema, junitparser, py-ocsf-models, the
csv module, on cluster results that check felix-metrics, typha-metrics and
kube-controllers-metrics (tests/reports/controls_data.py)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from junitparser import Error, Failure, JUnitXml
from py_ocsf_models.events.findings.compliance_finding import ComplianceFinding

from reports.outputs import (
    CONTROL_TEXTS,
    SCHEMA_VERSION,
    Document,
    encode,
    ocsf_events,
    render_scan,
    rule_controls,
    scan_document,
    schema,
)
from scanner.core.findings import RULES
from tests.helpers import scan_harness
from tests.helpers.paths import FIXTURES
from tests.helpers.scan_harness import Harness, felixscan
from tests.reports.controls_data import T0, lean, tri

CONTROLS = ["felix-metrics", "typha-metrics", "kube-controllers-metrics"]


@pytest.fixture(scope="module")
def doc() -> Document:
    # through JSON and back: what a consumer reads
    made = scan_document(scan_id=11, started_at=T0, finished_at=T0, clusters=[tri(), lean()])
    loaded: Document = json.loads(encode(made, "json"))
    return loaded


@pytest.fixture(scope="module")
def sarif_validator() -> Any:
    sarif = json.loads((FIXTURES / "sarif-schema-2.1.0.json").read_text())
    return jsonschema.validators.validator_for(sarif)(sarif)


def test_json_carries_every_control_and_validates(doc: Document) -> None:
    jsonschema.Draft202012Validator(
        schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(doc)
    assert doc["schema_version"] == SCHEMA_VERSION == "1.2"
    tri_doc, lean_doc = doc["clusters"]
    assert [k["id"] for k in tri_doc["controls"]] == CONTROLS
    felix, typha, kc = tri_doc["controls"]
    assert felix == {
        "id": "felix-metrics", "status": "non_compliant", "installed": True,
        "declared": {"enabled": False, "source": "default (false)", "port": 9091, "host": ""},
        "targets_in": "nodes", "error": None, "namespace": "kube-system",
        "workload": "calico-node", "image": "calico/node:v3.32.1",
        "totals": {"targets": 3, "pass": 2, "fail": 1, "unknown": 0, "waived": 0}}
    assert tri_doc["totals"] == {"nodes": 3, "pass": 2, "fail": 1, "unknown": 0, "waived": 0}
    assert typha["status"] == "non_compliant" and typha["declared"]["enabled"] is True
    assert typha["declared"]["source"] == "env TYPHA_PROMETHEUSMETRICSENABLED"
    assert typha["totals"] == {"targets": 2, "pass": 0, "fail": 2, "unknown": 0, "waived": 0}
    assert typha["targets"][0] == {
        "node": "n1", "pod": "calico-typha-aaa", "address": "10.0.0.1", "port": 9093,
        "state": "open", "protocol": "http", "metrics": True, "verdict": "fail",
        "declared_enabled": True, "declared_source": "env TYPHA_PROMETHEUSMETRICSENABLED",
        "error": None}
    assert [(t["node"], t["pod"], t["verdict"]) for t in kc["targets"]] == [
        ("n2", "calico-kube-controllers-ccc", "pass")]
    assert kc["status"] == "compliant" and kc["declared"]["port"] == 9094
    assert {f["id"]: f["control"] for f in tri_doc["findings"]} == {
        "FELIX-PORT-REACHABLE": "felix-metrics", "DRIFT-DISABLED-BUT-OPEN": "felix-metrics",
        "TYPHA-METRICS-ENABLED": "typha-metrics", "TYPHA-PORT-REACHABLE": "typha-metrics",
        "DRIFT-ENABLED-BUT-CLOSED": "typha-metrics",
        "KUBE-CONTROLLERS-METRICS-PORT-ABSENT": "kube-controllers-metrics"}
    # `controls` (the frameworks' controls a finding evidences) is still there, unchanged
    assert all(isinstance(f["controls"], list) for f in tri_doc["findings"])
    assert [(k["id"], k["status"], k["installed"], k["error"] is not None)
            for k in lean_doc["controls"]] == [
        ("felix-metrics", "compliant", True, False), ("typha-metrics", "compliant", False, False),
        ("kube-controllers-metrics", "error", True, True)]
    assert lean_doc["status"] == "error"


def test_schema_rejects_a_control_that_breaks_the_shape(doc: Document) -> None:
    validator = jsonschema.Draft202012Validator(schema())
    bad = json.loads(json.dumps(doc))
    bad["clusters"][0]["controls"][0]["targets"] = []  # felix-metrics: its targets are `nodes`
    assert not validator.is_valid(bad)
    bad = json.loads(json.dumps(doc))
    del bad["clusters"][0]["controls"][1]["targets"]
    assert not validator.is_valid(bad)
    bad = json.loads(json.dumps(doc))
    bad["clusters"][0]["controls"][1]["targets"][0]["verdict"] = "maybe"
    assert not validator.is_valid(bad)


def test_a_1_1_document_still_validates(doc: Document) -> None:
    """1.x only adds fields: a document without them is still valid."""
    old = json.loads(json.dumps(doc))
    old["schema_version"] = "1.1"
    for c in old["clusters"]:
        del c["controls"]
        for f in c["findings"]:
            del f["control"]
    jsonschema.Draft202012Validator(schema()).validate(old)
    # and every encoder reads it as Felix's alone
    assert "felix-metrics" in encode(old, "csv")
    assert all(e["compliance"]["control"] == "felix-metrics" for e in ocsf_events(old))


def test_sarif_rules_and_results_carry_the_control(doc: Document, sarif_validator: Any) -> None:
    log = json.loads(encode(doc, "sarif"))
    sarif_validator.validate(log)
    (run,) = log["runs"]
    rules = {r["id"]: r for r in run["tool"]["driver"]["rules"]}
    assert rules["TYPHA-PORT-REACHABLE"]["properties"]["control_ids"] == ["typha-metrics"]
    assert CONTROL_TEXTS["typha-metrics"] in rules["TYPHA-PORT-REACHABLE"]["fullDescription"][
        "text"]
    assert rules["FELIX-PORT-REACHABLE"]["properties"]["control_ids"] == ["felix-metrics"]
    assert rules["DRIFT-ENABLED-BUT-CLOSED"]["properties"]["control_ids"] == CONTROLS
    assert rules["CONTROL-NOT-CHECKED"]["properties"]["control_ids"] == [
        "typha-metrics", "kube-controllers-metrics"]
    for rule_id, rule in rules.items():
        assert rule["properties"]["control_ids"] == list(rule_controls(rule_id))
    results = {(r["properties"]["cluster"], r["ruleId"]): r for r in run["results"]}
    assert len(results) == len(run["results"]) == 8
    typha = results[("tri", "TYPHA-PORT-REACHABLE")]["properties"]
    assert (typha["control"], typha["node"], typha["verdict"]) == ("typha-metrics", "n1", "fail")
    # the same node's Felix verdict is pass: the control's own target decides
    drift = results[("tri", "DRIFT-ENABLED-BUT-CLOSED")]["properties"]
    assert (drift["control"], drift["node"], drift["verdict"]) == ("typha-metrics", "n3",
                                                                   "fail")
    absent = results[("tri", "KUBE-CONTROLLERS-METRICS-PORT-ABSENT")]["properties"]
    assert (absent["control"], absent["control_status"], absent["cluster_status"]) == (
        "kube-controllers-metrics", "compliant", "non_compliant")
    not_checked = results[("lean", "CONTROL-NOT-CHECKED")]["properties"]
    assert (not_checked["control"], not_checked["control_status"]) == (
        "kube-controllers-metrics", "error")
    # the taxonomies (the frameworks' controls) are what they were
    assert [t["name"] for t in run["taxonomies"]] == [
        "cis-k8s", "nsa-cisa-k8s", "pci-dss-4.0", "nist-800-53-r5", "iso-27001-2022"]
    clusters = {c["name"]: c for c in run["properties"]["clusters"]}
    assert [(k["id"], k["status"]) for k in clusters["tri"]["controls"]] == [
        ("felix-metrics", "non_compliant"), ("typha-metrics", "non_compliant"),
        ("kube-controllers-metrics", "compliant")]


def test_sarif_fingerprints_tell_controls_apart_and_keep_felix_ones(doc: Document) -> None:
    log = json.loads(encode(doc, "sarif"))
    prints = [r["partialFingerprints"]["felixscanFinding/v1"] for r in log["runs"][0]["results"]]
    assert len(set(prints)) == len(prints)
    old = json.loads(json.dumps(doc))
    for c in old["clusters"]:
        for f in c["findings"]:
            if f["control"] == "felix-metrics":
                del f["control"]
    before = json.loads(encode(old, "sarif"))
    assert [r["partialFingerprints"] for r in before["runs"][0]["results"]] == [
        r["partialFingerprints"] for r in log["runs"][0]["results"]]


def test_junit_has_a_case_per_control_and_target(doc: Document) -> None:
    xml = JUnitXml.fromstring(encode(doc, "junit").encode())
    suites = {s.name: s for s in xml}
    tri_suite = suites["tri"]
    cases = {(c.classname, c.name): c for c in tri_suite}
    assert list(cases) == [
        ("felixscan.tri", "cluster"), ("felixscan.tri", "n1"), ("felixscan.tri", "n2"),
        ("felixscan.tri", "n3"),
        ("felixscan.tri.typha-metrics", "typha-metrics"),
        ("felixscan.tri.typha-metrics", "n1/calico-typha-aaa"),
        ("felixscan.tri.typha-metrics", "n3/calico-typha-bbb"),
        ("felixscan.tri.kube-controllers-metrics", "kube-controllers-metrics"),
        ("felixscan.tri.kube-controllers-metrics", "n2/calico-kube-controllers-ccc")]
    assert (tri_suite.tests, tri_suite.failures, tri_suite.errors) == (9, 4, 0)
    assert cases[("felixscan.tri", "n1")].is_passed  # Typha fails on n1, Felix does not
    (failure,) = cases[("felixscan.tri.typha-metrics", "n1/calico-typha-aaa")].result
    assert isinstance(failure, Failure) and failure.type == "TYPHA-PORT-REACHABLE"
    assert "port 9093 (pod calico-typha-aaa): open http (Typha)" in (failure.text or "")
    (own,) = cases[("felixscan.tri.typha-metrics", "typha-metrics")].result
    assert isinstance(own, Failure) and own.type == "TYPHA-METRICS-ENABLED"
    kc_own = cases[("felixscan.tri.kube-controllers-metrics", "kube-controllers-metrics")]
    assert kc_own.is_passed and "KUBE-CONTROLLERS-METRICS-PORT-ABSENT" in (kc_own.system_out
                                                                           or "")
    assert {(p.name, p.value) for p in tri_suite.properties()} >= {
        ("control:felix-metrics", "non_compliant"), ("control:typha-metrics", "non_compliant"),
        ("control:kube-controllers-metrics", "compliant")}
    lean_cases = {c.name: c for c in suites["lean"]}
    assert lean_cases["typha-metrics"].is_passed  # not installed: nothing exposed
    (error,) = lean_cases["kube-controllers-metrics"].result
    assert isinstance(error, Error) and error.type == "CONTROL-NOT-CHECKED"
    assert error.message == 'deployments.apps "calico-kube-controllers" is forbidden'


def test_ocsf_events_name_the_control(doc: Document) -> None:
    events = ocsf_events(doc)
    for event in events:
        model = ComplianceFinding.model_validate(event)
        assert model.model_dump(mode="json", exclude_none=True) == json.loads(json.dumps(event))
    by_type = {(e["resources"][0].get("group", {}).get("name") or e["resources"][0]["name"],
                e["finding_info"]["types"][0]): e for e in events}
    typha = by_type[("tri", "TYPHA-PORT-REACHABLE")]
    assert typha["compliance"]["control"] == "typha-metrics"
    assert typha["compliance"]["desc"] == CONTROL_TEXTS["typha-metrics"]
    assert typha["compliance"]["standards"][0] == "felixscan typha-metrics"
    assert typha["compliance"]["status_id"] == 3  # the Typha target on n1 fails
    assert typha["resources"][0]["data"]["pod"] == "calico-typha-aaa"
    assert typha["resources"][0]["data"]["port"] == 9093
    felix = by_type[("tri", "FELIX-PORT-REACHABLE")]
    assert felix["compliance"]["control"] == "felix-metrics"
    assert felix["resources"][0]["data"] == {"address": "10.0.0.2", "port": 9091,
                                             "state": "open", "verdict": "fail"}
    absent = by_type[("tri", "KUBE-CONTROLLERS-METRICS-PORT-ABSENT")]
    assert absent["compliance"]["status_id"] == 1  # the control passes; the finding is low
    assert absent["resources"][0]["data"]["control"]["id"] == "kube-controllers-metrics"
    not_checked = by_type[("lean", "CONTROL-NOT-CHECKED")]
    assert not_checked["compliance"]["status_id"] == 2  # Warning: the control is unknown


def test_csv_has_a_control_column(doc: Document) -> None:
    rows = list(csv.DictReader(io.StringIO(encode(doc, "csv"), newline="")))
    assert [(r["cluster"], r["id"], r["control"]) for r in rows] == [
        (c["name"], f["id"], f["control"]) for c in doc["clusters"] for f in c["findings"]]
    assert {r["control"] for r in rows} == set(CONTROLS)


def test_text_has_a_line_per_control() -> None:
    text = render_scan("text", scan_id=11, started_at=T0, finished_at=T0,
                       clusters=[tri(), lean()])
    lines = text.splitlines()
    assert lines[0] == ("tri: NON-COMPLIANT [manifest] metrics disabled by default (false); "
                        "nodes: 3 (2 pass, 1 fail, 0 unknown)")
    assert lines[1:4] == [
        "  felix-metrics: NON-COMPLIANT; metrics disabled by default (false), port 9091; "
        "3 nodes (2 pass, 1 fail, 0 unknown)",
        "  typha-metrics: NON-COMPLIANT; metrics enabled by env TYPHA_PROMETHEUSMETRICSENABLED, "
        "port 9093; 2 targets (0 pass, 2 fail, 0 unknown)",
        "  kube-controllers-metrics: COMPLIANT; metrics disabled by KubeControllersConfiguration "
        "default spec.prometheusMetricsPort 0, port 9094; 1 target (1 pass, 0 fail, 0 unknown)"]
    assert any(line.startswith("  CRITICAL TYPHA-PORT-REACHABLE [typha-metrics] n1: ")
               for line in lines)
    start = lines.index(next(line for line in lines if line.startswith("lean: ")))
    assert lines[start + 1:start + 4] == [
        "  felix-metrics: COMPLIANT; metrics disabled by default (false), port 9091; 1 node "
        "(1 pass, 0 fail, 0 unknown)",
        "  typha-metrics: COMPLIANT; not installed (calico-system/calico-typha)",
        '  kube-controllers-metrics: ERROR; deployments.apps "calico-kube-controllers" is '
        "forbidden"]
    # the reason is on the control's line, not repeated at the end
    assert text.count('is forbidden') == 2  # the control's line and its finding


def test_a_cluster_that_checks_only_typha() -> None:
    only = tri()
    from dataclasses import replace

    typha = only.control("typha-metrics")
    assert typha is not None
    only = replace(only, controls=(typha,), nodes=(), declared=None,
                   findings=typha.findings)
    text = render_scan("text", scan_id=1, started_at=T0, finished_at=T0, clusters=[only])
    assert text.splitlines()[:2] == [
        "tri: NON-COMPLIANT [manifest]",
        "  typha-metrics: NON-COMPLIANT; metrics enabled by env TYPHA_PROMETHEUSMETRICSENABLED, "
        "port 9093; 2 targets (0 pass, 2 fail, 0 unknown)"]
    doc = scan_document(scan_id=1, started_at=T0, finished_at=T0, clusters=[only])
    jsonschema.Draft202012Validator(schema()).validate(json.loads(encode(doc, "json")))
    (suite,) = list(JUnitXml.fromstring(encode(doc, "junit").encode()))
    assert [c.name for c in suite] == ["typha-metrics", "n1/calico-typha-aaa",
                                       "n3/calico-typha-bbb"]


def test_every_known_rule_names_its_controls() -> None:
    for rule_id in RULES:
        assert set(rule_controls(rule_id)) <= set(CONTROLS), rule_id
    assert rule_controls("KUBE-CONTROLLERS-PORT-REACHABLE") == ("kube-controllers-metrics",)
    assert rule_controls("NODE-NOT-VERIFIED") == tuple(CONTROLS)


# --- end to end: a real scan of an emulated cluster that runs Typha and kube-controllers -----


@pytest.fixture
def emulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Harness, str]]:
    scan_harness.own_addresses(monkeypatch, "127.45.0.0")
    h = Harness(tmp_path)
    try:
        h.cluster("tc", ["closed", "closed", "closed"])
        h.typha("tc", env={"TYPHA_PROMETHEUSMETRICSENABLED": "true"})  # on tc-node-0, open
        h.kube_controllers("tc", kcc_port=0)
        yield h, f"sqlite:///{tmp_path / 'felixscan.db'}"
    finally:
        h.close()


def test_a_real_scan_and_report_carry_every_control(emulated: tuple[Harness, str],
                                                     tmp_path: Path,
                                                     sarif_validator: Any) -> None:
    h, db = emulated
    config = str(h.config())
    out = {fmt: felixscan("scan", "--config", config, "--db", db, "--format", fmt)
           for fmt in ("json", "sarif", "junit", "ocsf", "csv", "text")}
    assert {r.code for r in out.values()} == {1}, out["json"].stderr
    doc = json.loads(out["json"].stdout)
    jsonschema.Draft202012Validator(schema()).validate(doc)
    (c,) = doc["clusters"]
    controls = {k["id"]: k for k in c["controls"]}
    assert list(controls) == CONTROLS
    assert controls["felix-metrics"]["status"] == "compliant"
    typha = controls["typha-metrics"]
    assert (typha["status"], typha["declared"]["enabled"]) == ("non_compliant", True)
    assert [(t["node"], t["state"], t["verdict"]) for t in typha["targets"]] == [
        ("tc-node-0", "open", "fail")]
    assert typha["targets"][0]["pod"] and typha["targets"][0]["port"] == 9093
    kc = controls["kube-controllers-metrics"]
    assert kc["status"] == "compliant" and [t["verdict"] for t in kc["targets"]] == ["pass"]
    assert c["status"] == "non_compliant"  # the worst of its controls
    assert {f["control"] for f in c["findings"] if f["id"].startswith("TYPHA-")} == {
        "typha-metrics"}

    sarif_validator.validate(json.loads(out["sarif"].stdout))
    results = json.loads(out["sarif"].stdout)["runs"][0]["results"]
    assert {r["properties"]["control"] for r in results} >= {"typha-metrics"}
    suite = next(iter(JUnitXml.fromstring(out["junit"].stdout.encode())))
    failing = {(case.classname, case.name) for case in suite
               if any(isinstance(r, Failure) for r in case.result)}
    assert ("felixscan.tc.typha-metrics", "typha-metrics") in failing
    assert any(cls == "felixscan.tc.typha-metrics" and name.startswith("tc-node-0/")
               for cls, name in failing)
    for event in json.loads(out["ocsf"].stdout):
        ComplianceFinding.model_validate(event)
    rows = list(csv.DictReader(io.StringIO(out["csv"].stdout, newline="")))
    assert {r["control"] for r in rows if r["id"].startswith("TYPHA-")} == {"typha-metrics"}
    assert "  typha-metrics: NON-COMPLIANT; metrics enabled by " in out["text"].stdout

    # The same from the database: the report's JSON and its HTML
    report = felixscan("report", "--db", db, "--format", "json")
    assert report.code == 0, report.stderr
    stored = json.loads(report.stdout)
    jsonschema.Draft202012Validator(schema()).validate(stored)
    (sc,) = stored["clusters"]
    assert [(k["id"], k["status"]) for k in sc["controls"]] == [
        (k["id"], k["status"]) for k in c["controls"]]
    assert [(t["node"], t["pod"], t["verdict"]) for t in sc["controls"][1]["targets"]] == [
        (t["node"], t["pod"], t["verdict"]) for t in typha["targets"]]
    assert sorted((f["id"], f["control"]) for f in sc["findings"]) == sorted(
        (f["id"], f["control"]) for f in c["findings"])
    html = tmp_path / "r.html"
    assert felixscan("report", "--db", db, "--out", str(html)).code == 0
    text = html.read_text()
    assert "Typha targets (typha-metrics)" in text and typha["targets"][0]["pod"] in text
