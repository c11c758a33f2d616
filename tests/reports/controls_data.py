"""Cluster results that check all three controls (felix-metrics, typha-metrics,
kube-controllers-metrics), made as the evaluator makes them, for the outputs, the report, the
web page and the CLI.

`tri`: Felix non-compliant on one node of three; Typha enabled by its env and open on one of its
two nodes; kube-controllers closed (compliant, with a low finding). `lean`: Felix compliant,
Typha not installed, kube-controllers could not be read (error). `big(n)`: a cluster of n nodes,
for the layout at scale.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from scanner.core.findings import RULES
from scanner.core.records import (
    FELIX,
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterResult,
    ClusterStatus,
    ControlResult,
    Declared,
    Finding,
    NodeResult,
    ProbeResult,
    ProbeState,
    Verdict,
)

T0 = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
FELIX_OFF = Declared(enabled=False, source="default (false)", port=9091,
                     port_source="default (9091)")
TYPHA_ON = Declared(enabled=True, source="env TYPHA_PROMETHEUSMETRICSENABLED", port=9093,
                    port_source="default (9093)", raw="true")
KC_OFF = Declared(enabled=False, source="KubeControllersConfiguration default "
                  "spec.prometheusMetricsPort 0", port=9094,
                  port_source="no metrics server; probed on the default 9094", raw="0")
ADDRESSES = {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"}


def finding(rule_id: str, message: str, *, control: str = FELIX, node: str | None = None,
            **evidence: object) -> Finding:
    rule = RULES[rule_id]
    return Finding(id=rule_id, severity=rule.severity, message=message, node=node,
                   evidence=evidence, remediation=rule.remediation, control=control)


def target(node: str, address: str | None, port: int, state: ProbeState, verdict: Verdict,
           declared: Declared, *, pod: str | None = None, served: bool | None = None,
           error: str | None = None) -> NodeResult:
    probe = ProbeResult(node=node, address=address, port=port, state=state,
                        protocol="http" if state == "open" else None, felix=served,
                        error=error)
    return NodeResult(node=node, address=address, port=port,
                      declared=replace(declared, pod=pod) if pod else declared, probe=probe,
                      pod_current=True if pod is None else None, verdict=verdict,
                      probes=(probe,))


def cluster(name: str, status: ClusterStatus, controls: tuple[ControlResult, ...], *,
            started_at: datetime = T0, error: str | None = None) -> ClusterResult:
    felix = next((c for c in controls if c.control == FELIX), None)
    findings = sorted((f for c in controls for f in c.findings),
                      key=lambda f: (["critical", "high", "medium", "low", "info"]
                                     .index(f.severity), f.id, f.node or "", f.control))
    return ClusterResult(
        cluster=name, status=status, install="manifest",
        declared=felix.declared if felix else None, nodes=felix.targets if felix else (),
        findings=tuple(findings), error=error, started_at=started_at,
        finished_at=started_at + timedelta(seconds=4), snapshot=None,
        timings={"api": 0.5, "probe": 1.5}, method={"address_type": "InternalIP"},
        controls=controls)


def tri(started_at: datetime = T0, *, name: str = "tri") -> ClusterResult:
    felix_nodes = (
        target("n1", ADDRESSES["n1"], 9091, "closed", "pass", FELIX_OFF),
        target("n2", ADDRESSES["n2"], 9091, "open", "fail", FELIX_OFF, served=True),
        target("n3", ADDRESSES["n3"], 9091, "closed", "pass", FELIX_OFF),
    )
    felix = ControlResult(
        control=FELIX, status="non_compliant", declared=FELIX_OFF, targets=felix_nodes,
        findings=(
            finding("FELIX-PORT-REACHABLE", "10.0.0.2:9091 is open over http, serving Felix's "
                    "metrics", node="n2", address="10.0.0.2", port=9091, state="open"),
            finding("DRIFT-DISABLED-BUT-OPEN", "Declared disabled (default (false)), but port "
                    "9091 is open", node="n2", address="10.0.0.2", port=9091),
        ), namespace="kube-system", workload="calico-node", image="calico/node:v3.32.1")
    typha_targets = (
        target("n1", ADDRESSES["n1"], 9093, "open", "fail", TYPHA_ON, pod="calico-typha-aaa",
               served=True),
        target("n3", ADDRESSES["n3"], 9093, "filtered", "fail", TYPHA_ON,
               pod="calico-typha-bbb"),
    )
    typha = ControlResult(
        control=TYPHA, status="non_compliant", declared=TYPHA_ON, targets=typha_targets,
        findings=(
            finding("TYPHA-METRICS-ENABLED", "Typha metrics enabled on port 9093 by env "
                    "TYPHA_PROMETHEUSMETRICSENABLED (the Deployment template)", control=TYPHA,
                    source="env TYPHA_PROMETHEUSMETRICSENABLED", port=9093),
            finding("TYPHA-PORT-REACHABLE", "10.0.0.1:9093 (pod calico-typha-aaa) is open over "
                    "http, serving its metrics, without authentication", control=TYPHA,
                    node="n1", pod="calico-typha-aaa", address="10.0.0.1", port=9093),
            finding("DRIFT-ENABLED-BUT-CLOSED", "Declared enabled (env "
                    "TYPHA_PROMETHEUSMETRICSENABLED), but port 9093 of Typha pod "
                    "calico-typha-bbb is filtered from the scanner", control=TYPHA, node="n3",
                    pod="calico-typha-bbb", port=9093),
        ), namespace="kube-system", workload="calico-typha", image="calico/typha:v3.32.1")
    kc = ControlResult(
        control=KUBE_CONTROLLERS, status="compliant", declared=KC_OFF,
        targets=(target("n2", "192.168.7.9", 9094, "closed", "pass", KC_OFF,
                        pod="calico-kube-controllers-ccc"),),
        findings=(finding("KUBE-CONTROLLERS-METRICS-PORT-ABSENT", "KubeControllersConfiguration "
                          "default has no spec.prometheusMetricsPort", control=KUBE_CONTROLLERS,
                          resource_version="42"),),
        namespace="kube-system", workload="calico-kube-controllers",
        image="calico/kube-controllers:v3.32.1")
    return cluster(name, "non_compliant", (felix, typha, kc), started_at=started_at)


def lean(started_at: datetime = T0, *, name: str = "lean") -> ClusterResult:
    felix = ControlResult(
        control=FELIX, status="compliant", declared=FELIX_OFF,
        targets=(target("m1", "10.0.1.1", 9091, "closed", "pass", FELIX_OFF),),
        findings=(), namespace="calico-system", workload="calico-node")
    typha = ControlResult(
        control=TYPHA, status="compliant", declared=None, targets=(), installed=False,
        findings=(finding("COMPONENT-NOT-INSTALLED", "No Typha Deployment "
                          "calico-system/calico-typha: nothing serves its metrics in this "
                          "cluster", control=TYPHA, namespace="calico-system",
                          deployment="calico-typha"),),
        namespace="calico-system", workload="calico-typha")
    why = "deployments.apps \"calico-kube-controllers\" is forbidden"
    kc = ControlResult(
        control=KUBE_CONTROLLERS, status="error", declared=None, targets=(), error=why,
        findings=(finding("CONTROL-NOT-CHECKED", f"calico-kube-controllers could not be "
                          f"checked: {why}", control=KUBE_CONTROLLERS, error=why),),
        namespace="calico-system", workload="calico-kube-controllers")
    return cluster(name, "error", (felix, typha, kc), started_at=started_at,
                   error=f"{KUBE_CONTROLLERS}: {why}")


def big(nodes: int, started_at: datetime = T0, *, name: str = "big",
        failing_every: int = 97) -> ClusterResult:
    """A cluster of `nodes` nodes, one in `failing_every` failing, with three controls."""
    felix_nodes = []
    felix_findings = []
    for i in range(nodes):
        node = f"node-{i:05d}"
        fail = i % failing_every == 3
        felix_nodes.append(target(node, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 9091,
                                  "open" if fail else "closed", "fail" if fail else "pass",
                                  FELIX_OFF, served=True if fail else None))
        if fail:
            felix_findings.append(finding("FELIX-PORT-REACHABLE", f"{node}:9091 is open",
                                          node=node, port=9091, state="open"))
    felix = ControlResult(control=FELIX, status="non_compliant" if felix_findings
                          else "compliant", declared=FELIX_OFF, targets=tuple(felix_nodes),
                          findings=tuple(felix_findings), namespace="kube-system",
                          workload="calico-node")
    typha_targets = tuple(
        target(f"node-{i:05d}", f"10.0.{i // 256 % 256}.{i % 256}", 9093, "closed", "pass",
               replace(TYPHA_ON, enabled=False, source="default (false)"),
               pod=f"calico-typha-{i:03d}") for i in range(min(nodes, 3)))
    typha = ControlResult(control=TYPHA, status="compliant",
                          declared=replace(TYPHA_ON, enabled=False, source="default (false)"),
                          targets=typha_targets, findings=(), namespace="kube-system",
                          workload="calico-typha")
    kc = ControlResult(control=KUBE_CONTROLLERS, status="compliant", declared=KC_OFF,
                       targets=(target("node-00000", "192.168.0.5", 9094, "closed", "pass",
                                       KC_OFF, pod="calico-kube-controllers-x"),),
                       findings=(), namespace="kube-system", workload="calico-kube-controllers")
    return cluster(name, felix.status, (felix, typha, kc), started_at=started_at)
