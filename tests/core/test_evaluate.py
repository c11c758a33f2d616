"""The compliance rules on plain data: verdicts, cluster status and findings."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from scanner.core.calico import cluster_declared, resolve_nodes
from scanner.core.evaluate import evaluate, failed_cluster, node_verdict
from scanner.core.records import (
    ClusterResult,
    ClusterSnapshot,
    ConfigFile,
    Declared,
    EnvVar,
    Installation,
    Node,
    Pod,
    ProbeResult,
    Rollout,
    TlsFacts,
)

NOW = datetime(2026, 11, 27, tzinfo=UTC)
OFF = Declared(enabled=False, source="built-in default (false)", port=9091,
               port_source="built-in default")
ON = replace(OFF, enabled=True, source="env FELIX_PROMETHEUSMETRICSENABLED")
UNKNOWN = replace(OFF, enabled=None, reason="secret missing")


def probe(state: str, *, felix: bool | None = None, node: str = "n1", **kw: object) -> ProbeResult:
    return ProbeResult(node=node, address="127.0.0.1", port=9091, state=state,  # type: ignore[arg-type]
                       felix=felix, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("declared", "state", "ready", "verdict"), [
    (OFF, "closed", True, "pass"),
    (OFF, "filtered", True, "pass"),
    (OFF, "filtered", False, "unknown"),
    (OFF, "filtered", None, "unknown"),
    (OFF, "unreachable", True, "unknown"),
    (OFF, "error", True, "unknown"),
    (OFF, "open", True, "fail"),
    (ON, "closed", True, "fail"),
    (ON, "open", True, "fail"),
    (UNKNOWN, "closed", True, "unknown"),
    (UNKNOWN, "open", True, "fail"),
])
def test_node_verdicts(declared: Declared, state: str, ready: bool | None, verdict: str) -> None:
    assert node_verdict(declared, probe(state), ready=ready) == verdict


def snap(*, env: tuple[EnvVar, ...] = (), nodes: int = 3, stale: tuple[str, ...] = (),
         installation: Installation | None = None, install: str = "manifest",
         rollout: Rollout | None = None) -> ClusterSnapshot:
    names = [f"n{i + 1}" for i in range(nodes)]
    return ClusterSnapshot(
        cluster="c1", install=install, namespace="kube-system", daemonset="calico-node",  # type: ignore[arg-type]
        container="calico-node", image="calico/node:v3.32.1", env=env,
        config_file=ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=(), felix_crd=True, installation=installation,
        rollout=rollout or Rollout(2, 2, nodes, nodes, nodes, nodes, "new", "RollingUpdate", "1"),
        pods=tuple(Pod(name=f"calico-node-{n}", node=n, phase="Running",
                       revision="old" if n in stale else "new", ready=True,
                       owner="calico-node") for n in names),
        nodes=tuple(Node(name=n, addresses=(("InternalIP", f"127.0.0.{i + 1}"),), ready=True)
                    for i, n in enumerate(names)),
        collected_at=NOW)


def run(s: ClusterSnapshot, probes: list[ProbeResult]) -> ClusterResult:
    declared = resolve_nodes(s)
    return evaluate(s, declared, probes, cluster_declared=cluster_declared(s, declared),
                    started_at=NOW, finished_at=NOW)


def ids(result: ClusterResult) -> list[tuple[str, str | None]]:
    return [(f.id, f.node) for f in result.findings]


def test_all_closed_and_disabled_is_compliant() -> None:
    r = run(snap(), [probe("closed", node=f"n{i}") for i in (1, 2, 3)])
    assert r.status == "compliant"
    assert r.findings == ()
    assert [n.verdict for n in r.nodes] == ["pass"] * 3


def test_declared_off_but_felix_open_on_a_stale_pod() -> None:
    s = snap(stale=("n2",), rollout=Rollout(3, 3, 3, 2, 3, 3, "new", "RollingUpdate", "1"))
    r = run(s, [probe("closed", node="n1"), probe("open", felix=True, protocol="https",
                                                     node="n2"), probe("closed", node="n3")])
    assert r.status == "non_compliant"
    assert ("FELIX-PORT-REACHABLE", "n2") in ids(r)
    drift = next(f for f in r.findings if f.id == "DRIFT-DISABLED-BUT-OPEN")
    assert "old template revision" in drift.message
    assert drift.evidence["pod_revision"] == "old"
    rollout = next(f for f in r.findings if f.id == "ROLLOUT-INCOMPLETE")
    assert rollout.evidence["nodes"] == ["n2"]
    assert r.nodes[1].pod_current is False


def test_declared_on_but_port_closed_is_still_non_compliant() -> None:
    s = snap(env=(EnvVar("FELIX_PROMETHEUSMETRICSENABLED", "true", "literal"),), nodes=1)
    r = run(s, [probe("closed")])
    assert r.status == "non_compliant"
    assert ("DRIFT-ENABLED-BUT-CLOSED", "n1") in ids(r)
    enabled = next(f for f in r.findings if f.id == "FELIX-METRICS-ENABLED")
    assert "kubectl -n kube-system set env ds/calico-node -c calico-node" in enabled.remediation


def test_non_felix_listener_fails_the_node() -> None:
    r = run(snap(nodes=1), [probe("open", felix=False, protocol="http", http_status=200)])
    assert r.status == "non_compliant"
    assert ("PORT-OPEN-NOT-FELIX", "n1") in ids(r)
    drift = next(f for f in r.findings if f.id == "DRIFT-DISABLED-BUT-OPEN")
    assert "not Felix" in drift.message


def test_unknown_is_never_pass_and_makes_the_cluster_error() -> None:
    r = run(snap(nodes=2), [probe("closed", node="n1"),
                            probe("error", node="n2", error="node has no address")])
    assert r.status == "error"
    assert r.error == "1 of 2 nodes could not be verified"
    assert ("NODE-NOT-VERIFIED", "n2") in ids(r)


def test_unresolved_declared_state_is_unknown() -> None:
    s = snap(env=(EnvVar("FELIX_PROMETHEUSMETRICSENABLED", None, "secret kube-system/x[y]",
                         error="secret kube-system/x does not exist"),), nodes=1)
    r = run(s, [probe("closed")])
    assert r.status == "error"
    assert r.nodes[0].verdict == "unknown"
    f = next(f for f in r.findings if f.id == "FELIX-CONFIG-UNRESOLVED")
    assert "does not exist" in f.message


def test_operator_metrics_port_makes_the_cluster_non_compliant() -> None:
    s = snap(nodes=1, install="operator", installation=Installation("default", 9091))
    r = run(s, [probe("closed")])
    assert r.status == "non_compliant"
    f = next(f for f in r.findings if f.id == "OPERATOR-METRICS-PORT-SET")
    assert "nodeMetricsPort" in f.remediation


def test_self_signed_tls_is_summarised_once() -> None:
    tls = TlsFacts("TLSv1.3", "x", "CN=n", "CN=n", True, None, None, "ab" * 32)
    r = run(snap(nodes=2), [probe("open", felix=True, node="n1", protocol="https", tls=tls),
                            probe("open", felix=True, node="n2", protocol="https", tls=tls)])
    selfs = [f for f in r.findings if f.id == "FELIX-TLS-SELF-SIGNED"]
    assert len(selfs) == 1
    assert selfs[0].evidence["node_count"] == 2


def test_findings_are_ordered_worst_first() -> None:
    s = snap(stale=("n1",), nodes=1)
    r = run(s, [probe("open", felix=True)])
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}
    ranks = [order[f.severity] for f in r.findings]
    assert ranks == sorted(ranks)
    assert r.findings[0].id == "FELIX-PORT-REACHABLE"


def test_no_nodes_is_an_error() -> None:
    r = run(snap(nodes=0), [])
    assert (r.status, r.error) == ("error", "the cluster reports no nodes")


def test_failed_cluster_carries_its_reason() -> None:
    r = failed_cluster("c9", "GET /api/v1/nodes: 403 Forbidden", started_at=NOW, finished_at=NOW)
    assert r.status == "error"
    assert r.findings[0].id == "CLUSTER-SCAN-FAILED"
    assert "403" in r.findings[0].message
