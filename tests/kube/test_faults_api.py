"""Kubernetes API faults, each beside a healthy cluster in the same `felixscan scan`.

Every fault must end as a stored error (or an unknown declared state) with a clear reason, leave
the healthy cluster's result whole, and cost a bounded number of requests: counted here from the
emulator's request log (`emu.requests`, `Fault.hits`, failed TLS handshakes).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from scanner.db.models import ClusterScan, FindingRow, NodeProbe
from scanner.emulator import KubeEmulator
from scanner.emulator.certs import make_ca
from scanner.kube import client as kube_client
from tests.helpers import scan_harness
from tests.helpers.paths import ROOT, TESTS
from tests.helpers.scan_harness import Harness, Outcome

EXEC_API = "client.authentication.k8s.io/v1beta1"


class FaultHarness(Harness):
    """A Harness with a healthy control cluster and request listings."""

    def healthy(self) -> None:
        self.cluster("healthy", ["closed", "closed"])

    def requests(self, cluster: str, path_part: str = "") -> list[tuple[str, int]]:
        return [(r.path, r.status) for r in self.emulators[cluster].requests
                if path_part in r.path]


@pytest.fixture
def fh(tmp_path: Path) -> Iterator[FaultHarness]:
    h = FaultHarness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def stored(db: str) -> dict[str, dict[str, Any]]:
    """Per cluster: its cluster_scans row, node_probes count and finding kinds, as stored."""
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            out: dict[str, dict[str, Any]] = {}
            for row in conn.execute(select(ClusterScan)):
                probes = conn.execute(select(func.count()).select_from(NodeProbe).where(
                    NodeProbe.cluster_scan_id == row.id)).scalar()
                findings = list(conn.execute(select(FindingRow).where(
                    FindingRow.cluster_scan_id == row.id)))
                out[row.cluster] = {"status": row.status, "error": row.error,
                                    "nodes_total": row.nodes_total, "probes": probes,
                                    "findings": {f.finding_id: f for f in findings}}
            return out
    finally:
        engine.dispose()


def assert_isolated(out: Outcome, db: str, faulty: dict[str, str], *,
                    healthy_nodes: int = 2) -> dict[str, dict[str, Any]]:
    """The healthy cluster passed and is stored whole; each faulty cluster is a stored error
    whose reason contains the given text, with no node rows; the exit code says so (3)."""
    assert out.code == 3, out.stderr
    healthy = out.cluster("healthy")
    assert healthy["status"] == "compliant"
    assert [n["verdict"] for n in healthy["nodes"]] == ["pass"] * healthy_nodes
    rows = stored(db)
    assert rows["healthy"]["status"] == "compliant"
    assert rows["healthy"]["probes"] == rows["healthy"]["nodes_total"] == healthy_nodes
    for name, reason in faulty.items():
        c = out.cluster(name)
        assert c["status"] == "error", (name, c)
        assert reason in c["error"], (name, c["error"])
        assert rows[name]["status"] == "error"
        assert rows[name]["error"] == c["error"]
        assert rows[name]["probes"] == 0
        assert "CLUSTER-SCAN-FAILED" in rows[name]["findings"]
    assert "Traceback" not in out.stderr
    return rows


def error_kind(rows: dict[str, dict[str, Any]], cluster: str) -> str:
    return str(rows[cluster]["findings"]["CLUSTER-SCAN-FAILED"].evidence["kind"])


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.31.0.0")


# --- transport: refused, TLS, credentials ---------------------------------------------------


def test_connection_refused(fh: FaultHarness, db_url: str) -> None:
    fh.healthy()
    fh.dead_cluster("gone")
    out = fh.scan(db_url)
    rows = assert_isolated(out, db_url, {"gone": "connection refused"})
    assert error_kind(rows, "gone") == "ApiUnreachable"
    # urllib3 retries a refused connect twice, quickly: bounded, and fast
    assert out.cluster("gone")["timings"]["api"] < 2


def test_tls_wrong_ca_in_kubeconfig(fh: FaultHarness, sqlite_url: str) -> None:
    fh.healthy()
    fh.cluster("wrongca", ["closed"])
    other_ca, _ = make_ca("some-other-ca")
    fh.servers["wrongca"] = {"certificate-authority-data": base64.b64encode(other_ca).decode()}
    out = fh.scan(sqlite_url)
    rows = assert_isolated(out, sqlite_url, {
        "wrongca": "TLS failure: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                   "unable to get local issuer certificate"})
    assert error_kind(rows, "wrongca") == "ApiUnreachable"
    emu = fh.emulators["wrongca"]
    assert emu.requests == []  # no request was ever sent over the untrusted connection
    assert 1 <= emu.failed_handshakes <= 3  # urllib3's own connect retries, bounded


def test_tls_expired_server_certificate(fh: FaultHarness, sqlite_url: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fh.healthy()
    expired = datetime.now(UTC) - timedelta(days=3)
    with monkeypatch.context() as m:
        m.setattr(scan_harness, "KubeEmulator",
                  lambda **kw: KubeEmulator(cert_not_after=expired, **kw))
        fh.cluster("expired", ["closed"])
    out = fh.scan(sqlite_url)
    rows = assert_isolated(out, sqlite_url, {"expired": "certificate has expired"})
    assert error_kind(rows, "expired") == "ApiUnreachable"
    assert fh.emulators["expired"].requests == []
    assert 1 <= fh.emulators["expired"].failed_handshakes <= 3


def test_401_bad_token(fh: FaultHarness, sqlite_url: str) -> None:
    fh.healthy()
    fh.cluster("badtoken", ["closed"])
    fh.users["badtoken"] = {"token": "not-the-token"}
    out = fh.scan(sqlite_url)
    rows = assert_isolated(out, sqlite_url, {
        "badtoken": "401 Unauthorized: Unauthorized (the API server refused the credentials)"})
    assert error_kind(rows, "badtoken") == "ApiForbidden"
    assert [s for _, s in fh.requests("badtoken")] == [401]  # never retried


@pytest.mark.parametrize(("script", "reason"), [
    ("echo 'token service unavailable' >&2\nexit 1\n",
     "exec: process returned 1. token service unavailable"),
    ("echo '<html>proxy login</html>'\n",
     "exec: failed to decode process output: Expecting value"),
], ids=["exits-1", "prints-garbage"])
def test_exec_credential_plugin_that_fails(fh: FaultHarness, sqlite_url: str, tmp_path: Path,
                                           script: str, reason: str) -> None:
    fh.healthy()
    fh.cluster("exec", ["closed"])
    plugin = tmp_path / "credential-plugin"
    plugin.write_text("#!/bin/sh\n" + script)
    plugin.chmod(0o755)
    fh.users["exec"] = {"exec": {"apiVersion": EXEC_API, "command": str(plugin)}}
    out = fh.scan(sqlite_url)
    rows = assert_isolated(out, sqlite_url, {
        "exec": f"the kubeconfig's credentials could not be obtained: {reason}"})
    assert error_kind(rows, "exec") == "ClusterError"
    assert fh.requests("exec") == []  # no request without credentials, no bare 401


def test_exec_credential_plugin_that_works(fh: FaultHarness, sqlite_url: str,
                                           tmp_path: Path) -> None:
    """The control for the two above: the same path with a plugin that answers properly."""
    fh.cluster("exec", ["closed"])
    plugin = tmp_path / "credential-plugin"
    plugin.write_text('#!/bin/sh\necho \'{"apiVersion": "' + EXEC_API + '", "kind": '
                      '"ExecCredential", "status": {"token": "emulator-token"}}\'\n')
    plugin.chmod(0o755)
    fh.users["exec"] = {"exec": {"apiVersion": EXEC_API, "command": str(plugin)}}
    out = fh.scan(sqlite_url)
    assert out.code == 0, out.stderr
    assert out.cluster("exec")["status"] == "compliant"


# --- RBAC: 403 on one resource ----------------------------------------------------------------


def test_403_on_felixconfigurations_is_unknown_not_none(fh: FaultHarness,
                                                        sqlite_url: str) -> None:
    """FelixConfiguration we may not list could set anything: the datastore's values are
    unknown (never "none set"), the nodes are still probed, and the reason is named."""
    fh.healthy()
    fault = fh.cluster("rbac", ["closed"]).emu.inject(r"felixconfigurations", status=403)
    out = fh.scan(sqlite_url)
    c = out.cluster("rbac")
    assert (c["status"], out.code) == ("error", 3)
    assert [n["verdict"] for n in c["nodes"]] == ["unknown"]
    unresolved = next(f for f in c["findings"] if f["id"] == "FELIX-CONFIG-UNRESOLVED")
    assert "LIST felixconfigurations.crd.projectcalico.org: 403 Forbidden" in unresolved["message"]
    assert out.cluster("healthy")["status"] == "compliant"
    assert fault.hits == 1  # a 403 is never retried


def _roll_spec_into_pods(handle: Any, ds: dict[str, Any]) -> None:
    """The pods run what the DaemonSet now says (as after a rollout): felixscan reads each
    pod's own spec."""
    for pod in handle.pods():
        pod["spec"]["containers"] = ds["spec"]["template"]["spec"]["containers"]
        pod["spec"]["volumes"] = ds["spec"]["template"]["spec"].get("volumes") or []
        handle.emu.replace(pod)


@pytest.mark.parametrize(("path", "what"), [
    (r"^/api/v1/nodes", "LIST nodes: 403 Forbidden"),
    (r"daemonsets/calico-node", "GET daemonset kube-system/calico-node: 403 Forbidden"),
    (r"/pods", "LIST pods in kube-system: 403 Forbidden"),
])
def test_403_on_one_cluster_resource_is_a_cluster_error(fh: FaultHarness, sqlite_url: str,
                                                        path: str, what: str) -> None:
    fh.healthy()
    fault = fh.cluster("rbac", ["closed"]).emu.inject(path, status=403)
    out = fh.scan(sqlite_url)
    rows = assert_isolated(out, sqlite_url, {"rbac": what})
    assert 'cannot ' in out.cluster("rbac")["error"]  # the apiserver's reason is kept
    assert error_kind(rows, "rbac") == "ApiForbidden"
    assert fault.hits == 1  # a 403 is never retried


def _secret(name: str, key: str, value: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {key: base64.b64encode(value.encode()).decode()}}


@pytest.mark.parametrize("ref", [
    {"secretKeyRef": {"name": "felix-metrics", "key": "enabled"}},
    {"secretKeyRef": {"name": "felix-metrics", "key": "enabled", "optional": True}},
], ids=["required", "optional"])
def test_403_on_a_secret_named_by_value_from_makes_the_declared_state_unknown(
        fh: FaultHarness, db_url: str, ref: dict[str, Any]) -> None:
    fh.healthy()
    fault = fh.cluster(
        "vf", ["closed", "felix-http"], env={"FELIX_PROMETHEUSMETRICSENABLED": {**ref}},
        secrets=[_secret("felix-metrics", "enabled", "true")]).emu.inject(
        r"/secrets/felix-metrics", status=403)
    out = fh.scan(db_url)
    assert out.code == 1, out.stderr  # the open port is still found: non-compliant wins
    c = out.cluster("vf")
    assert c["declared"]["enabled"] is None  # unknown, never "disabled"
    # the cluster was still read and every node probed
    assert [(n["state"], n["verdict"]) for n in c["nodes"]] == [("closed", "unknown"),
                                                                 ("open", "fail")]
    unresolved = next(f for f in c["findings"] if f["id"] == "FELIX-CONFIG-UNRESOLVED")
    assert ("the scanner may not read secret kube-system/felix-metrics (403 Forbidden)"
            in unresolved["message"])
    rows = stored(db_url)
    assert rows["vf"]["probes"] == 2
    assert rows["vf"]["status"] == "non_compliant"
    assert "FELIX-CONFIG-UNRESOLVED" in rows["vf"]["findings"]
    assert rows["healthy"]["status"] == "compliant"
    assert fault.hits == 1


def test_403_on_an_envfrom_configmap_is_unknown_even_when_optional(fh: FaultHarness,
                                                                    sqlite_url: str) -> None:
    """An optional source that is absent sets nothing; one we may not read could set anything."""
    fh.healthy()
    handle = fh.cluster("ef", ["closed"], configmaps=[
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "felix-env"},
         "data": {"FELIX_PROMETHEUSMETRICSENABLED": "true"}}])
    ds = handle.emu.get_object("apps/v1", "DaemonSet", "calico-node", namespace="kube-system")
    assert ds is not None
    container = next(c for c in ds["spec"]["template"]["spec"]["containers"]
                     if c["name"] == "calico-node")
    container["envFrom"] = [{"configMapRef": {"name": "felix-env", "optional": True}}]
    handle.emu.replace(ds)
    _roll_spec_into_pods(handle, ds)
    handle.emu.inject(r"/configmaps/felix-env", status=403)
    out = fh.scan(sqlite_url)
    c = out.cluster("ef")
    assert c["declared"]["enabled"] is None
    assert c["status"] == "error" and out.code == 3
    assert c["nodes"][0]["verdict"] == "unknown"
    assert any("may not read configmap kube-system/felix-env (403 Forbidden)" in f["message"]
               for f in c["findings"] if f["id"] == "FELIX-CONFIG-UNRESOLVED")
    assert out.cluster("healthy")["status"] == "compliant"


def test_403_on_the_secret_holding_felix_cfg_makes_the_file_unknown(fh: FaultHarness,
                                                                     sqlite_url: str) -> None:
    fh.healthy()
    handle = fh.cluster("cfg", ["closed"], secrets=[
        _secret("felix-cfg", "felix.cfg", "[global]\nPrometheusMetricsEnabled = true\n")])
    ds = handle.emu.get_object("apps/v1", "DaemonSet", "calico-node", namespace="kube-system")
    assert ds is not None
    pod = ds["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "calico-node")
    container.setdefault("volumeMounts", []).append(
        {"name": "felix-cfg", "mountPath": "/etc/calico/felix.cfg", "subPath": "felix.cfg"})
    pod.setdefault("volumes", []).append({"name": "felix-cfg",
                                          "secret": {"secretName": "felix-cfg"}})
    handle.emu.replace(ds)
    _roll_spec_into_pods(handle, ds)
    handle.emu.inject(r"/secrets/felix-cfg", status=403)
    out = fh.scan(sqlite_url)
    c = out.cluster("cfg")
    assert c["declared"]["enabled"] is None
    assert (c["status"], out.code) == ("error", 3)
    assert c["nodes"][0]["verdict"] == "unknown"
    assert any("may not read secret kube-system/felix-cfg (403 Forbidden)" in f["message"]
               for f in c["findings"] if f["id"] == "FELIX-CONFIG-UNRESOLVED")
    assert out.cluster("healthy")["status"] == "compliant"


def test_404_of_the_daemonset_names_the_namespaces_tried(fh: FaultHarness,
                                                         sqlite_url: str) -> None:
    fh.healthy()
    fh.cluster("nocalico", ["closed"]).emu.inject(r"daemonsets/calico-node", status=404)
    out = fh.scan(sqlite_url)
    rows = assert_isolated(out, sqlite_url, {
        "nocalico": "no DaemonSet 'calico-node' in namespace kube-system or calico-system; set "
                    "calico.namespace/daemonset in the config if Calico is elsewhere"})
    assert error_kind(rows, "nocalico") == "CalicoNotFound"
    assert [p for p, _ in fh.requests("nocalico", "daemonsets")] == [
        "/apis/apps/v1/namespaces/kube-system/daemonsets/calico-node",
        "/apis/apps/v1/namespaces/calico-system/daemonsets/calico-node"]


# --- throttling and server errors: retried with backoff, bounded --------------------------------


def test_429_with_retry_after_is_retried_until_it_clears(fh: FaultHarness,
                                                         sqlite_url: str) -> None:
    fh.healthy()
    fh.cluster("throttled", ["closed"]).emu.inject(r"^/api/v1/nodes", status=429,
                                                   retry_after=1, times=2)
    out = fh.scan(sqlite_url)
    assert out.code == 0, out.stderr
    c = out.cluster("throttled")
    assert c["status"] == "compliant"
    assert [s for _, s in fh.requests("throttled", "/nodes")] == [429, 429, 200]
    assert c["timings"]["api"] >= 2.0  # Retry-After: 1 was honoured, twice
    assert stored(sqlite_url)["throttled"]["probes"] == 1


def test_429_that_persists_is_an_error_after_bounded_attempts(fh: FaultHarness,
                                                              sqlite_url: str) -> None:
    fh.healthy()
    fh.cluster("throttled", ["closed"]).emu.inject(r"^/api/v1/nodes", status=429, retry_after=1)
    # a Retry-After beyond the cluster's deadline (20 s here) is not slept through
    fh.cluster("toolong", ["closed"]).emu.inject(r"^/api/v1/nodes", status=429, retry_after=600)
    started = time.monotonic()
    out = fh.scan(sqlite_url)
    assert time.monotonic() - started < 10
    rows = assert_isolated(out, sqlite_url, {
        "throttled": "LIST nodes: 429 Too Many Requests: Too many requests, please try again "
                     "later. (after 4 attempts)",
        "toolong": "deadline exceeded: HTTP 429 asks to wait 600.",
    })
    assert "(Retry-After: 600 s)" in out.cluster("toolong")["error"]
    assert error_kind(rows, "throttled") == "ApiError"
    assert error_kind(rows, "toolong") == "ApiUnreachable"
    assert [s for _, s in fh.requests("throttled", "/nodes")] == [429] * 4
    assert [s for _, s in fh.requests("toolong", "/nodes")] == [429]


def test_5xx_is_retried_with_backoff_and_bounded(fh: FaultHarness, sqlite_url: str) -> None:
    fh.healthy()
    for status in (500, 503):
        fh.cluster(f"blip{status}", ["closed"]).emu.inject(r"^/api/v1/nodes", status=status,
                                                            times=2)
        fh.cluster(f"down{status}", ["closed"]).emu.inject(r"^/api/v1/nodes", status=status)
    out = fh.scan(sqlite_url)
    assert_isolated(out, sqlite_url, {
        "down500": "LIST nodes: 500 Internal Server Error: Internal error occurred: injected "
                   "fault (after 4 attempts)",
        "down503": "LIST nodes: 503 Service Unavailable: the server is currently unable to "
                   "handle the request (after 4 attempts)"})
    for status in (500, 503):
        assert out.cluster(f"blip{status}")["status"] == "compliant"
        assert [s for _, s in fh.requests(f"blip{status}", "/nodes")] == [status] * 2 + [200]
        assert [s for _, s in fh.requests(f"down{status}", "/nodes")] == [status] * 4
        # backoff 0.2 + 0.4 + 0.8 s (plus jitter) between the four attempts
        assert out.cluster(f"down{status}")["timings"]["api"] >= 1.4


# --- hanging and slow APIs ----------------------------------------------------------------------


def test_hanging_api_costs_one_request_timeout(fh: FaultHarness, sqlite_url: str) -> None:
    fh.healthy()
    fault = fh.cluster("hanging", ["closed"]).emu.inject(r"daemonsets", delay=30)
    started = time.monotonic()
    out = fh.scan(sqlite_url)
    assert time.monotonic() - started < 6
    rows = assert_isolated(out, sqlite_url, {
        "hanging": "GET daemonset kube-system/calico-node: no answer within 2.0s (timed out)"})
    assert error_kind(rows, "hanging") == "ApiUnreachable"
    assert fault.hits == 1  # a read that timed out is not retried


def test_slow_api_is_cut_by_the_cluster_deadline(fh: FaultHarness, sqlite_url: str) -> None:
    fh.healthy()
    # every request answers, slowly (0.9 s, under the 2 s request timeout): only the 3 s
    # deadline of the whole collection stops it
    fault = fh.cluster("slow", ["closed"], options={"deadline_seconds": 3}).emu.inject(
        r".", delay=0.9)
    out = fh.scan(sqlite_url)
    rows = assert_isolated(out, sqlite_url, {"slow": "deadline exceeded"})
    assert error_kind(rows, "slow") == "ApiUnreachable"
    assert 3.0 <= out.cluster("slow")["timings"]["api"] < 4.0
    assert fault.hits <= 4  # 3 s / 0.9 s, and the one cut short


# --- bodies that are not what they should be -----------------------------------------------------


BODIES = {
    "truncated": (b'{"kind": "NodeList", "items": [{"metadata": {"name": "a"',
                  "LIST nodes: the answer is not valid JSON (Expecting ',' delimiter"),
    "not-an-object": (b"[1, 2, 3]", "LIST nodes: expected a JSON object, got list"),
    "items-not-a-list": (b'{"kind": "NodeList", "items": {"a": 1}}',
                         "LIST nodes: `items` is not a list"),
    "item-not-an-object": (b'{"kind": "NodeList", "items": ["node-a", 7]}',
                           "LIST nodes: `items` holds something that is not an object"),
    "wrong-shape": (b'{"kind": "NodeList", "items": [{"metadata": "node-a"}]}',
                    "the API answered with an object of an unexpected shape (AttributeError"),
    "not-utf8": (b'{"kind": "NodeList", "items": [], "x": "\xff\xfe"}',
                 "LIST nodes: the answer is not valid JSON"),
    "html": (b"<html><body>502 Bad Gateway</body></html>",
             "LIST nodes: the answer is not valid JSON (Expecting value"),
}


def test_truncated_and_malformed_json(fh: FaultHarness, db_url: str) -> None:
    fh.healthy()
    for name, (body, _) in BODIES.items():
        fh.cluster(name, ["closed"]).emu.inject(r"^/api/v1/nodes", body=body)
    out = fh.scan(db_url)
    rows = assert_isolated(out, db_url, {name: reason for name, (_, reason) in BODIES.items()})
    for name in BODIES:
        assert error_kind(rows, name) == "ApiError"
        assert len(fh.requests(name, "/api/v1/nodes")) == 1  # garbage is not retried


def test_a_daemonset_of_the_wrong_shape(fh: FaultHarness, sqlite_url: str) -> None:
    fh.healthy()
    fh.cluster("odd", ["closed"]).emu.inject(
        r"daemonsets/calico-node", body=b'{"kind": "DaemonSet", "metadata": {"name": '
        b'"calico-node"}, "spec": {"template": {"spec": {"containers": "calico-node"}}}}')
    out = fh.scan(sqlite_url)
    assert_isolated(out, sqlite_url, {"odd": "unexpected shape"})


# --- a list that changes between pages ----------------------------------------------------------


def test_a_list_that_changes_between_pages_is_listed_again(fh: FaultHarness, sqlite_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_client, "PAGE_SIZE", 2)  # five nodes: three pages
    fh.cluster("healthy", ["closed"] * 5)
    fh.cluster("once", ["closed"] * 5).emu.inject(r"^/api/v1/nodes\?.*continue=", status=410,
                                                  times=1)
    fh.cluster("always", ["closed"] * 5).emu.inject(r"^/api/v1/nodes\?.*continue=", status=410)
    out = fh.scan(sqlite_url)
    rows = assert_isolated(out, sqlite_url, {
        "always": "LIST nodes: the list kept changing while paging (410 Gone 4 times)"},
        healthy_nodes=5)
    once = out.cluster("once")
    assert once["status"] == "compliant"
    names = [n["name"] for n in once["nodes"]]
    assert sorted(names) == [f"once-node-{i}" for i in range(5)]  # one consistent view
    assert [s for _, s in fh.requests("once", "/api/v1/nodes")] == [200, 410, 200, 200, 200]
    assert rows["once"]["probes"] == 5
    # first page + expired continue, four times over; then it gives up
    assert [s for _, s in fh.requests("always", "/api/v1/nodes")] == [200, 410] * 4


def test_node_names_a_hostile_api_sends_are_stored_as_text(fh: FaultHarness,
                                                           db_url: str) -> None:
    """Names no apiserver would accept (a lone surrogate, a NUL, 300 characters): PostgreSQL
    refuses the first two and the column holds 253, so they are escaped and cut when read."""
    fh.healthy()
    fh.cluster("odd", ["closed"])
    address = fh.addresses[("odd", "odd-node-0")]
    names = ["lone-\udc80-surrogate", "nul-\x00-byte", "x" * 300]
    fh.emulators["odd"].inject(r"^/api/v1/nodes", body=json.dumps({
        "kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": [
            {"metadata": {"name": name}, "status": {
                "addresses": [{"type": "InternalIP", "address": address}],
                "conditions": [{"type": "Ready", "status": "True"}]}} for name in names]}
    ).encode())
    out = fh.scan(db_url)
    shown = [n["name"] for n in out.cluster("odd")["nodes"]]
    assert shown[:2] == ["lone-\\udc80-surrogate", "nul-\\x00-byte"]
    assert len(shown[2]) == 253 and shown[2].startswith("x" * 240)
    assert {n["state"] for n in out.cluster("odd")["nodes"]} == {"closed"}
    assert "result NOT stored" not in out.stderr
    assert stored(db_url)["odd"]["probes"] == 3
    assert out.cluster("healthy")["status"] == "compliant"


# --- the table in docs/hardening.md names these tests -------------------------------------------


def test_hardening_doc_lists_every_fault_test() -> None:
    """docs/hardening.md's table is made from these suites: every test there is named in it, and
    every test it names exists."""
    import ast

    tests = {p.name: p for p in TESTS.rglob("test_*.py")}
    defined = set()
    for name in ("test_faults_api.py", "test_faults_nodes.py", "test_faults_db.py",
                 "test_faults_concurrency.py", "test_web_load.py", "test_secrets.py",
                 "test_hardening_locks.py", "test_hardening_web.py", "test_hardening_cli.py",
                 "test_demo.py", "test_scan_parity.py", "test_remediate.py"):
        tree = ast.parse(tests[name].read_text())
        defined |= {f.name for f in tree.body
                    if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
    doc = (ROOT / "docs" / "hardening.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)(?:\[[^\]`]*\])?`", doc))
    # Of the suites that are not all about faults, only the tests the page names are checked.
    partial = ("test_demo.py", "test_scan_parity.py", "test_remediate.py")
    whole = {f.name for name in partial
             for f in ast.parse(tests[name].read_text()).body
             if isinstance(f, ast.FunctionDef)}
    assert defined - whole - named == set(), "tests missing from docs/hardening.md"
    assert named - defined == set(), "docs/hardening.md names tests that do not exist"


def test_a_daemonset_answer_naming_another_object_is_an_error(fh: FaultHarness,
                                                              sqlite_url: str) -> None:
    """The scan reads the DaemonSet it asked for, or none: an answer naming another object is
    the cluster's error, never evaluated (or shown) in its place."""
    fh.healthy()
    fh.cluster("forged", ["closed"]).emu.inject(
        r"daemonsets/calico-node", body=b'{"kind": "DaemonSet", "metadata": {"name": '
        b'"victim-ds", "namespace": "kube-system"}, "spec": {}}')
    out = fh.scan(sqlite_url)
    assert_isolated(out, sqlite_url, {"forged": "the API answered with another object "
                                                "(kube-system/victim-ds)"})
