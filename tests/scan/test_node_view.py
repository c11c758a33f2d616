"""The node's own view end to end: node-check lines served as pod logs by the emulated API, read
by the real scanner, and each row of docs/findings.md's three-view table as a user sees it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from scanner.core.nodeview import Listener, NodeView, encode_line
from tests.helpers.scan_harness import Harness, Node

NS = "felixscan-node-check"
ENABLED = "FELIX_PROMETHEUSMETRICSENABLED"


def line(node: str, *, listening: bool, age: float = 5.0, port: int = 9091,
         complete: bool = True) -> str:
    """One node-check line, as `felixscan node-check` prints it."""
    listeners = (Listener(address="0.0.0.0", port=port, family="IPv4", inode=4242, uid=0,
                          wildcard=True, loopback=False, ipv4_mapped=None, process=None,
                          process_note="no hostPID: the owning process is not visible"),
                 ) if listening else ()
    view = NodeView(node=node, time=datetime.now(UTC) - timedelta(seconds=age),
                    ports_checked=(port,), listeners=listeners, files=(), malformed_lines=0,
                    complete=complete)
    return "node-check starting\n" + encode_line(view) + "\n"


def configure(harness: Harness, cluster: str, **node_check: Any) -> None:
    harness.cluster_options.setdefault(cluster, {})["node_check"] = {
        "namespace": NS, "max_age_seconds": 120, **node_check}


def by_node(out: Any, cluster: str) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in out.cluster(cluster)["nodes"]}


def ids(out: Any, cluster: str) -> set[tuple[str, str | None]]:
    return {(f["id"], f["node"]) for f in out.cluster(cluster)["findings"]}


def test_every_row_of_the_three_view_table(harness: Harness, db_url: str) -> None:
    """Declared disabled everywhere; the probe and the node view differ per node."""
    harness.cluster("c", [
        Node("silent", name="hidden"),              # filtered, but listening on the node
        Node("silent", name="confirmed", ready=False),  # filtered on a NotReady node, nothing there
        Node("felix-http", name="forwarded"),       # open, nothing in the host namespace
        Node("closed", name="plain"),               # closed, nothing listening
        Node("silent", name="no-pod", ready=False),  # no node-check pod: as without it
        Node("silent", name="old-line", ready=False),  # only a stale line: as without it
    ])
    harness.probe["timeout_seconds"] = 0.3
    configure(harness, "c")
    harness.node_check("c", {
        "hidden": line("hidden", listening=True),
        "confirmed": line("confirmed", listening=False),
        "forwarded": line("forwarded", listening=False),
        "plain": line("plain", listening=False),
        "old-line": line("old-line", listening=False, age=3600),
    }, namespace=NS)
    out = harness.scan(db_url)
    nodes = by_node(out, "c")
    verdicts = {name: n["verdict"] for name, n in nodes.items()}
    assert verdicts == {"hidden": "fail", "confirmed": "pass", "forwarded": "fail",
                        "plain": "pass", "no-pod": "unknown", "old-line": "unknown"}
    assert nodes["hidden"]["node_view"]["state"] == "listening"
    assert nodes["hidden"]["node_view"]["listeners"] == ["0.0.0.0:9091"]
    assert nodes["confirmed"]["node_view"]["state"] == "not_listening"
    assert nodes["no-pod"]["node_view"]["state"] == "no_view"
    assert "stale" in nodes["old-line"]["node_view"]["reason"]
    found = ids(out, "c")
    assert ("FELIX-LISTENING-NOT-REACHABLE", "hidden") in found
    assert ("PORT-OPEN-NOT-ON-NODE", "forwarded") in found
    assert ("NODE-VIEW-MISSING", None) in found and ("NODE-VIEW-STALE", None) in found
    missing = next(f for f in out.cluster("c")["findings"] if f["id"] == "NODE-VIEW-MISSING")
    assert missing["evidence"]["nodes"] == ["no-pod"]
    assert out.code == 1 and out.cluster("c")["status"] == "non_compliant"


def test_declared_enabled_still_fails_and_unknown_is_not_rescued(harness: Harness,
                                                                  sqlite_url: str) -> None:
    harness.cluster("on", [Node("closed", name="n1")], env={ENABLED: "true"})
    configure(harness, "on")
    harness.node_check("on", {"n1": line("n1", listening=False)}, namespace=NS)
    out = harness.scan(sqlite_url)
    assert by_node(out, "on")["n1"]["verdict"] == "fail"  # configuration decides first


def test_a_node_view_that_cannot_be_trusted_is_no_view(harness: Harness,
                                                      sqlite_url: str) -> None:
    harness.cluster("c", [Node("silent", name="other-port", ready=False),
                          Node("silent", name="partial", ready=False),
                          Node("silent", name="liar", ready=False),
                          Node("silent", name="garbage", ready=False)])
    harness.probe["timeout_seconds"] = 0.3
    configure(harness, "c")
    harness.node_check("c", {
        "other-port": line("other-port", listening=False, port=9099),
        "partial": line("partial", listening=False, complete=False),
        "liar": line("someone-else", listening=False),
        "garbage": "not json\n{\"schema\": \"felixscan.node-view\"\n",
    }, namespace=NS)
    nodes = by_node(harness.scan(sqlite_url), "c")
    assert {n["verdict"] for n in nodes.values()} == {"unknown"}
    reasons = {name: n["node_view"]["reason"] for name, n in nodes.items()}
    assert "does not check port 9091" in reasons["other-port"]
    assert "could not read every socket table" in reasons["partial"]
    assert "reports node someone-else" in reasons["liar"]
    assert "no valid line" in reasons["garbage"]


def test_without_node_check_nothing_changes(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("c", [Node("closed", name="n1")])
    out = harness.scan(sqlite_url)
    assert by_node(out, "c")["n1"]["node_view"] is None
    assert not any(f["id"].startswith("NODE-VIEW") for f in out.cluster("c")["findings"])


@pytest.mark.parametrize("status", [403, 500])
def test_node_check_pods_that_cannot_be_read_leave_the_verdict_as_before(
        harness: Harness, sqlite_url: str, status: int) -> None:
    harness.cluster("c", [Node("closed", name="n1")])
    configure(harness, "c")
    harness.node_check("c", {"n1": line("n1", listening=True)}, namespace=NS)
    harness.emulators["c"].inject(rf"namespaces/{NS}/pods\?", status=status, method="GET")
    out = harness.scan(sqlite_url)
    assert out.code == 0, out.stderr  # the scan goes on: closed and declared off
    n1 = by_node(out, "c")["n1"]
    assert n1["verdict"] == "pass" and n1["node_view"]["state"] == "no_view"
    assert "node-check could not be read" in n1["node_view"]["reason"]
    assert ("NODE-VIEW-MISSING", None) in ids(out, "c")


def test_the_defaults_find_what_deploy_installs() -> None:
    """`node_check: {}` reads the DaemonSet of deploy/overlays/node-check as it is rendered:
    its namespace, its pods' labels and its container's name."""
    from scanner.core.config import NodeCheckSettings
    from tests.helpers.rbac_rules import render

    [ds] = [o for o in render("node-check") if o["kind"] == "DaemonSet"]
    d = NodeCheckSettings()
    assert ds["metadata"]["namespace"] == d.namespace
    key, _, value = d.selector.partition("=")
    assert ds["spec"]["template"]["metadata"]["labels"][key] == value
    assert [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]] == [d.container]


def test_the_report_shows_the_node_view(harness: Harness, sqlite_url: str, tmp_path: Any) -> None:
    from pypdf import PdfReader

    from tests.helpers.scan_harness import felixscan

    harness.cluster("c", [Node("silent", name="hidden")])
    harness.probe["timeout_seconds"] = 0.3
    configure(harness, "c")
    harness.node_check("c", {"hidden": line("hidden", listening=True)}, namespace=NS)
    assert harness.scan(sqlite_url).code == 1
    pdf = tmp_path / "r.pdf"
    assert felixscan("report", "--db", sqlite_url, "--out", str(pdf)).code == 0
    words = " ".join(" ".join(p.extract_text().split()) for p in PdfReader(pdf).pages)
    assert "on the node: listening (0.0.0.0:9091)" in words
    assert "FELIX-LISTENING-NOT-REACHABLE" in words
    document = felixscan("report", "--db", sqlite_url, "--format", "json")
    assert '"state": "listening"' in document.stdout
