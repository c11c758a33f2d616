"""`felixscan scan` end to end: real kubernetes client -> emulated API over HTTPS, real sockets
on 127.x for nodes, real SQLite and PostgreSQL. Assertions are on exit codes, JSON and rows."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from scanner import scan as scan_module
from scanner.core.errors import StoreError
from scanner.db.models import ClusterScan, FindingRow, NodeProbe
from scanner.db.store import Store
from scanner.probe import forget_learned
from tests.helpers.scan_harness import CALICO_VERSIONS, Harness, Node


def rows(db: str, model: type, **where: object) -> list:
    engine = create_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            stmt = select(model)
            for key, value in where.items():
                stmt = stmt.where(getattr(model, key) == value)
            return list(conn.execute(stmt))
    finally:
        engine.dispose()


def finding_ids(cluster: dict) -> set[tuple[str, str | None]]:
    return {(f["id"], f["node"]) for f in cluster["findings"]}


@pytest.mark.parametrize("version", CALICO_VERSIONS)
def test_stock_manifest_of_every_calico_version_is_compliant(harness: Harness, sqlite_url: str,
                                                             version: str) -> None:
    harness.cluster("c1", ["closed", "closed", "silent"], version=version)
    out = harness.scan(sqlite_url)
    assert out.code == 0, out.stderr
    c = out.cluster("c1")
    assert c["status"] == "compliant"
    assert c["install"] == "manifest"
    assert c["declared"] == {"enabled": False, "source": "built-in default (false)", "port": 9091,
                            "host": ""}
    assert [n["state"] for n in c["nodes"]] == ["closed", "closed", "filtered"]
    assert [n["verdict"] for n in c["nodes"]] == ["pass", "pass", "pass"]
    # Only calico-node is deployed here: Typha and kube-controllers are not, which their
    # controls say with an info finding each (tests/scan/test_components_e2e.py has them).
    assert [(f["id"], f["severity"], f.get("control")) for f in c["findings"]] == [
        ("COMPONENT-NOT-INSTALLED", "info", "kube-controllers-metrics"),
        ("COMPONENT-NOT-INSTALLED", "info", "typha-metrics")]


def test_seed_platform_felix_over_tls_is_non_compliant_and_stored(harness: Harness,
                                                                  db_url: str) -> None:
    handle = harness.cluster("seed", ["felix-tls", "felix-tls", "felix-tls"],
                             env={"FELIX_PROMETHEUSMETRICSENABLED": "true"})
    out = harness.scan(db_url)
    assert out.code == 1, out.stderr
    c = out.cluster("seed")
    assert c["status"] == "non_compliant"
    assert c["declared"] == {"enabled": True, "source": "env FELIX_PROMETHEUSMETRICSENABLED",
                             "port": 9091, "host": ""}
    assert {(n["state"], n["protocol"], n["felix"], n["verdict"]) for n in c["nodes"]} == \
        {("open", "https", True, "fail")}
    ids = finding_ids(c)
    assert ("FELIX-METRICS-ENABLED", None) in ids
    assert ("FELIX-TLS-SELF-SIGNED", None) in ids
    assert {n for i, n in ids if i == "FELIX-PORT-REACHABLE"} == {n["name"] for n in c["nodes"]}

    scans = rows(db_url, ClusterScan, cluster="seed")
    assert len(scans) == 1
    assert (scans[0].status, scans[0].nodes_total, scans[0].nodes_fail) == ("non_compliant", 3, 3)
    assert scans[0].run_id == out.doc["scan_id"]
    probes = rows(db_url, NodeProbe, cluster_scan_id=scans[0].id)
    node0 = harness.addresses[("seed", "seed-node-0")]
    served = harness.fleet.node(node0).cert_der
    assert served is not None
    stored = next(p for p in probes if p.address == node0)
    assert stored.tls_sha256 == hashlib.sha256(served).hexdigest()
    assert stored.tls_self_signed is True
    assert stored.felix_host == "seed-node-0"
    assert stored.verdict == "fail"
    assert handle.namespace == "kube-system"
    assert {r.finding_id for r in rows(db_url, FindingRow, cluster_scan_id=scans[0].id)} >= \
        {"FELIX-METRICS-ENABLED", "FELIX-PORT-REACHABLE"}


def test_every_kind_of_node_endpoint(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("mix", ["felix-tls", "felix-http", "other", "closed", "silent", "noaddr"])
    out = harness.scan(sqlite_url)
    c = out.cluster("mix")
    got = [(n["state"], n["protocol"], n["felix"], n["verdict"]) for n in c["nodes"]]
    assert got == [
        ("open", "https", True, "fail"),
        ("open", "http", True, "fail"),
        ("open", "http", False, "fail"),
        ("closed", None, None, "pass"),
        ("filtered", None, None, "pass"),
        ("error", None, None, "unknown"),
    ]
    assert c["nodes"][5]["address"] is None
    ids = finding_ids(c)
    assert ("PORT-OPEN-NOT-FELIX", "mix-node-2") in ids
    assert ("DRIFT-DISABLED-BUT-OPEN", "mix-node-0") in ids
    assert ("NODE-NOT-VERIFIED", "mix-node-5") in ids
    assert c["status"] == "non_compliant"
    assert out.code == 1


@pytest.mark.parametrize(("env", "enabled", "source", "invalid"), [
    ({"FELIX_PROMETHEUSMETRICSENABLED": "false"}, False, "env FELIX_PROMETHEUSMETRICSENABLED",
     False),
    ({}, False, "built-in default (false)", False),
    ({"FELIX_PROMETHEUSMETRICSENABLED": "on"}, False, "env FELIX_PROMETHEUSMETRICSENABLED", True),
    ({"felix_prometheusmetricsenabled": "t"}, True, "env felix_prometheusmetricsenabled", False),
    ({"FELIX_PrometheusMetricsEnabled": "Yes"}, True, "env FELIX_PrometheusMetricsEnabled", False),
])
def test_env_values(harness: Harness, sqlite_url: str, env: dict[str, str], enabled: bool,
                    source: str, invalid: bool) -> None:
    harness.cluster("c", ["closed"], env=env)
    c = harness.scan(sqlite_url).cluster("c")
    assert c["declared"]["enabled"] is enabled
    assert c["declared"]["source"] == source
    assert (("FELIX-CONFIG-INVALID-VALUE", None) in finding_ids(c)) is invalid
    assert c["status"] == ("non_compliant" if enabled else "compliant")


def test_value_from_configmap_and_secret(harness: Harness, sqlite_url: str) -> None:
    secret_text = "on-PLANTED-SECRET-7731"
    harness.cluster(
        "vf", ["closed"],
        env={"FELIX_PROMETHEUSMETRICSENABLED": {"secretKeyRef": {"name": "felix-metrics",
                                                                 "key": "enabled"}},
             "FELIX_PROMETHEUSMETRICSPORT": {"configMapKeyRef": {"name": "felix-port",
                                                                 "key": "port"}}},
        secrets=[{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "felix-metrics"},
                  "data": {"enabled": base64.b64encode(secret_text.encode()).decode()}}],
        configmaps=[{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "felix-port"},
                     "data": {"port": "9555"}}])
    out = harness.scan(sqlite_url)
    c = out.cluster("vf")
    assert c["declared"]["enabled"] is False  # invalid value: false, flagged
    assert c["declared"]["source"] == \
        "env FELIX_PROMETHEUSMETRICSENABLED (secret kube-system/felix-metrics[enabled])"
    assert c["declared"]["port"] == 9555
    assert c["nodes"][0]["port"] == 9555
    assert ("FELIX-CONFIG-INVALID-VALUE", None) in finding_ids(c)
    db_file = Path(sqlite_url.removeprefix("sqlite:///"))
    for blob in (out.stdout, out.stderr, *(p.read_bytes().decode("latin-1") for p in
                                           db_file.parent.glob(db_file.name + "*"))):
        assert "PLANTED-SECRET" not in blob


def test_value_from_missing_secret_is_unknown(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("vf", ["closed"], env={"FELIX_PROMETHEUSMETRICSENABLED": {
        "secretKeyRef": {"name": "absent", "key": "enabled"}}})
    out = harness.scan(sqlite_url)
    c = out.cluster("vf")
    assert c["declared"]["enabled"] is None
    assert c["nodes"][0]["verdict"] == "unknown"
    assert c["status"] == "error"
    assert out.code == 3
    assert ("FELIX-CONFIG-UNRESOLVED", None) in finding_ids(c)


def test_felixconfiguration_default_on_with_env_unset(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("fc", ["felix-http", "felix-http"], felix_configs=[
        {"metadata": {"name": "default"}, "spec": {"prometheusMetricsEnabled": True}}])
    c = harness.scan(sqlite_url).cluster("fc")
    assert c["declared"] == {"enabled": True, "source": "FelixConfiguration default",
                             "port": 9091, "host": ""}
    enabled = [f for f in c["findings"] if f["id"] == "FELIX-METRICS-ENABLED"]
    assert len(enabled) == 1


def test_per_node_override_and_annotation_override(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("pn", [Node("felix-http", name="a"), Node("closed", name="b"),
                           Node("closed", name="c")], felix_configs=[
        {"metadata": {"name": "default"}, "spec": {"prometheusMetricsEnabled": False}},
        {"metadata": {"name": "node.a"}, "spec": {"prometheusMetricsEnabled": True}},
        {"metadata": {"name": "node.c", "annotations": {
            "config.projectcalico.org/PrometheusMetricsEnabled": "true"}},
         "spec": {"prometheusMetricsEnabled": False}},
    ])
    c = harness.scan(sqlite_url).cluster("pn")
    nodes = {n["name"]: n for n in c["nodes"]}
    assert nodes["a"]["declared_source"] == "FelixConfiguration node.a"
    assert nodes["a"]["verdict"] == "fail"
    assert nodes["b"]["verdict"] == "pass"
    assert nodes["c"]["declared_enabled"] is True
    assert nodes["c"]["declared_source"] == ("FelixConfiguration node.c annotation "
                                             "config.projectcalico.org/PrometheusMetricsEnabled")
    assert ("DRIFT-ENABLED-BUT-CLOSED", "c") in finding_ids(c)
    assert c["declared"]["enabled"] is True
    assert c["status"] == "non_compliant"


def test_selector_scoped_felixconfiguration(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("sel", [Node("felix-http", name="gpu-1", labels={"pool": "gpu"}),
                            Node("closed", name="cpu-1", labels={"pool": "cpu"})],
                    felix_configs=[{"metadata": {"name": "gpu-metrics"}, "spec": {
                        "nodeSelector": "pool == 'gpu'", "prometheusMetricsEnabled": True}}])
    c = harness.scan(sqlite_url).cluster("sel")
    nodes = {n["name"]: n for n in c["nodes"]}
    assert nodes["gpu-1"]["declared_source"] == \
        "FelixConfiguration gpu-metrics (nodeSelector pool == 'gpu')"
    assert nodes["cpu-1"]["declared_enabled"] is False
    assert nodes["cpu-1"]["verdict"] == "pass"


def test_operator_install_with_node_metrics_port(harness: Harness, sqlite_url: str) -> None:
    handle = harness.cluster("op", ["felix-http", "felix-http"], install="operator",
                             node_metrics_port=9091)
    assert handle.namespace == "calico-system"
    out = harness.scan(sqlite_url)
    c = out.cluster("op")
    assert c["install"] == "operator"
    assert c["status"] == "non_compliant"
    ids = {i for i, _ in finding_ids(c)}
    assert {"OPERATOR-METRICS-PORT-SET", "FELIX-METRICS-ENABLED", "FELIX-PORT-REACHABLE"} <= ids
    stored = rows(sqlite_url, FindingRow, finding_id="FELIX-METRICS-ENABLED")
    assert "nodeMetricsPort" in stored[0].remediation
    assert "set env" not in stored[0].remediation


def test_rollout_incomplete_pods_on_old_revision(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("ro", [Node("felix-http", pod="old"), Node("closed"), Node("closed")],
                    env={"FELIX_PROMETHEUSMETRICSENABLED": "false"},
                    old_env={"FELIX_PROMETHEUSMETRICSENABLED": "true"})
    c = harness.scan(sqlite_url).cluster("ro")
    # The node on the old revision runs the old env (enabled): the cluster is declared on there.
    assert c["declared"]["enabled"] is True
    assert c["declared"]["source"] == "env FELIX_PROMETHEUSMETRICSENABLED (1 of 3 nodes)"
    assert c["status"] == "non_compliant"
    stale = c["nodes"][0]
    assert (stale["pod_current"], stale["verdict"]) == (False, "fail")
    # Not drift: the old pod's own spec declares metrics on, and says so.
    assert "DRIFT-DISABLED-BUT-OPEN" not in {f["id"] for f in c["findings"]}
    assert stale["declared_enabled"] is True and stale["pod"]
    assert ("ROLLOUT-INCOMPLETE", None) in finding_ids(c)
    assert ("FELIX-METRICS-ENABLED", None) in finding_ids(c)


def test_absent_felixconfiguration_crd_is_unknown_unless_env_decides(harness: Harness,
                                                                      sqlite_url: str) -> None:
    """On the Kubernetes datastore Felix needs FelixConfiguration; without it being served the
    datastore's values are unknown (tests/scan/test_scan_parity.py), but an env entry wins above."""
    harness.cluster("nocrd", ["closed"], felix_crd=False,
                    env={"FELIX_PROMETHEUSMETRICSENABLED": "false"})
    out = harness.scan(sqlite_url)
    assert out.code == 0, out.stderr
    assert out.cluster("nocrd")["status"] == "compliant"


def test_failing_clusters_are_stored_as_errors_beside_a_healthy_one(harness: Harness,
                                                                    db_url: str) -> None:
    harness.cluster("healthy", ["closed", "closed"])
    harness.cluster("forbidden", ["closed"]).emu.inject(r"^/api/v1/nodes", status=403)
    harness.cluster("broken", ["closed"]).emu.inject(r"daemonsets", status=500)
    harness.cluster("hanging", ["closed"]).emu.inject(r"daemonsets", delay=8)
    harness.dead_cluster("gone")
    out = harness.scan(db_url)
    assert out.code == 3, out.stderr
    assert out.cluster("healthy")["status"] == "compliant"
    errors = {name: out.cluster(name)["error"] for name in ("forbidden", "broken", "hanging",
                                                            "gone")}
    assert all(out.cluster(n)["status"] == "error" for n in errors)
    assert "403" in errors["forbidden"]
    assert "500" in errors["broken"]
    assert "attempts" in errors["broken"]  # retried with backoff, bounded
    assert "timed out" in errors["hanging"] or "deadline" in errors["hanging"]
    assert "refused" in errors["gone"]
    stored = {r.cluster: (r.status, r.error) for r in rows(db_url, ClusterScan)}
    assert stored["healthy"] == ("compliant", None)
    for name, reason in errors.items():
        assert stored[name] == ("error", reason)
    assert "dead-cluster-token" not in out.stdout + out.stderr
    assert "emulator-token" not in out.stdout + out.stderr


def test_non_compliant_wins_over_errors_in_the_exit_code(harness: Harness,
                                                         sqlite_url: str) -> None:
    harness.cluster("bad", ["felix-http"], env={"FELIX_PROMETHEUSMETRICSENABLED": "true"})
    harness.dead_cluster("gone")
    assert harness.scan(sqlite_url).code == 1


def test_paged_lists_of_many_nodes(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("big", ["closed"] * 1100, pod_detail="minimal")
    out = harness.scan(sqlite_url)
    c = out.cluster("big")
    assert len(c["nodes"]) == 1100
    assert c["status"] == "compliant"
    lists = [r for r in harness.emulators["big"].requests if r.path == "/api/v1/nodes"]
    assert len(lists) == 3  # 500 + 500 + 100
    assert all(r.query.get("limit") == "500" for r in lists)
    assert rows(sqlite_url, ClusterScan)[0].nodes_total == 1100


def test_only_reads(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("ro", ["closed"], env={"FELIX_PROMETHEUSMETRICSENABLED": {
        "configMapKeyRef": {"name": "m", "key": "k"}}}, configmaps=[
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m"},
         "data": {"k": "false"}}])
    harness.scan(sqlite_url)
    verbs = {r.verb for r in harness.emulators["ro"].requests if r.resource_request}
    assert verbs <= {"get", "list"}


def test_plain_http_api_and_module_entry_point(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("plain", ["closed"], tls=False)
    out = harness.scan_subprocess(sqlite_url)
    assert out.code == 0, out.stderr
    assert out.cluster("plain")["status"] == "compliant"
    for key in ("scan_id", "started_at", "finished_at", "clusters"):
        assert key in out.doc


def test_second_scan_appends(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("c", ["closed"])
    first = harness.scan(sqlite_url)
    second = harness.scan(sqlite_url)
    assert second.doc["scan_id"] > first.doc["scan_id"]
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cluster_scans")).scalar() == 2
        assert conn.execute(text("SELECT count(*) FROM scan_runs WHERE status='finished'")
                            ).scalar() == 2
    engine.dispose()


def test_a_cluster_locked_by_another_scanner_is_not_scanned_twice(
        harness: Harness, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from scanner.app.commands import scan as scan_command
    from scanner.db.locks import DatabaseLock, cluster_lock_name
    from scanner.db.store import Store

    harness.cluster("busy", ["closed"])
    harness.cluster("free", ["closed"])
    monkeypatch.setattr(scan_command, "LOCK_WAIT_SECONDS", 0.5)
    with Store(sqlite_url) as store:
        store.upgrade()
        with DatabaseLock(store).hold(cluster_lock_name("busy")) as held:
            assert held is not None
            out = harness.scan(sqlite_url)
    assert out.code == 3
    assert out.cluster("free")["status"] == "compliant"
    assert "another felixscan is scanning this cluster" in out.cluster("busy")["error"]
    assert harness.scan(sqlite_url).code == 0  # released: scanned normally


def test_second_scan_speaks_first_what_each_endpoint_spoke_last_time(
        harness: Harness, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous scan's protocols, read from the database (`Store.last_protocols`), are
    the probe's hints; the in-process memory is cleared first, as in a new process. The
    results are the same; a database that cannot say leaves the probe without hints."""
    harness.cluster("h", ["felix-tls", "felix-http", "other", "closed"])
    first = harness.scan(sqlite_url)
    seen: list[object] = []
    real = scan_module.probe_nodes

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("hints"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scan_module, "probe_nodes", spy)
    forget_learned()
    second = harness.scan(sqlite_url)
    nodes = first.cluster("h")["nodes"]
    assert seen[0] == {(nodes[0]["address"], 9091): "https", (nodes[1]["address"], 9091): "http",
                       (nodes[2]["address"], 9091): "http"}
    assert [(n["state"], n["protocol"], n["felix"], n["verdict"])
            for n in second.cluster("h")["nodes"]] == [
        (n["state"], n["protocol"], n["felix"], n["verdict"]) for n in nodes]

    def broken(self: Store, cluster: str) -> dict[tuple[str, int], str]:
        raise StoreError("database read failed (sqlite): disk I/O error")

    monkeypatch.setattr(Store, "last_protocols", broken)
    seen.clear()
    third = harness.scan(sqlite_url)
    assert seen[0] is None
    assert third.cluster("h")["status"] == first.cluster("h")["status"] == "non_compliant"
