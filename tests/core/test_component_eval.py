"""The typha-metrics and kube-controllers-metrics controls on hand-built records: verdicts per
pod, findings, the control's status, and a cluster's result over several controls."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from scanner.core.calico import cluster_declared, resolve_nodes
from scanner.core.component_eval import (
    component_declared,
    evaluate_component,
    targets_for,
)
from scanner.core.evaluate import evaluate, failed_cluster, with_controls, worst
from scanner.core.records import (
    FELIX,
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterSnapshot,
    ComponentPod,
    ComponentSnapshot,
    ConfigFile,
    ControlResult,
    EnvVar,
    Installation,
    KubeControllersConfig,
    Node,
    Pod,
    ProbeResult,
    ProbeTarget,
    Rollout,
)

NOW = datetime(2026, 11, 27, tzinfo=UTC)
NODES = (Node(name="n1", addresses=(("InternalIP", "127.0.0.1"),), ready=True),
         Node(name="n2", addresses=(("InternalIP", "127.0.0.2"),), ready=True))
ON = (EnvVar(name="TYPHA_PROMETHEUSMETRICSENABLED", value="true", origin="literal"),)


def typha_pod(name: str = "calico-typha-a", node: str | None = "n1", *, ready: bool = True,
              ip: str | None = "127.0.0.1", **kw: object) -> ComponentPod:
    return ComponentPod(name=name, node=node, pod_ip=ip, host_network=True, phase="Running",
                        ready=ready, **kw)  # type: ignore[arg-type]


def kc_pod(name: str = "calico-kube-controllers-a", node: str | None = "n2", *,
           ready: bool = True, ip: str | None = "127.0.1.5", **kw: object) -> ComponentPod:
    return ComponentPod(name=name, node=node, pod_ip=ip, host_network=False, phase="Running",
                        ready=ready, **kw)  # type: ignore[arg-type]


def typha(env: tuple[EnvVar, ...] = (), pods: tuple[ComponentPod, ...] = (typha_pod(),),
          **kw: object) -> ComponentSnapshot:
    return ComponentSnapshot(control=TYPHA, namespace="kube-system", deployment="calico-typha",
                             container="calico-typha", found=kw.pop("found", True),  # type: ignore[arg-type]
                             image="calico/typha:v3.32.1", env=env,
                             config_file=ConfigFile(known=True, values={}, origin="image default"),
                             pods=pods, **kw)  # type: ignore[arg-type]


def kube_controllers(port: object = 0, pods: tuple[ComponentPod, ...] = (kc_pod(),), *,
                     exists: bool = True, **kw: object) -> ComponentSnapshot:
    return ComponentSnapshot(control=KUBE_CONTROLLERS, namespace="kube-system",
                             deployment="calico-kube-controllers",
                             container="calico-kube-controllers", found=kw.pop("found", True),  # type: ignore[arg-type]
                             image="calico/kube-controllers:v3.32.1", pods=pods,
                             kcc=KubeControllersConfig(exists=exists, port=port), **kw)  # type: ignore[arg-type]


def snapshot(*components: ComponentSnapshot, installation: Installation | None = None,
             install: str = "manifest") -> ClusterSnapshot:
    return ClusterSnapshot(
        cluster="c1", install=install, namespace="kube-system", daemonset="calico-node",  # type: ignore[arg-type]
        container="calico-node", image="calico/node:v3.32.1", env=(),
        config_file=ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=(), felix_crd=True, installation=installation,
        rollout=Rollout(1, 1, 2, 2, 2, 2, "new", "RollingUpdate", "1"),
        pods=tuple(Pod(name=f"calico-node-{n.name}", node=n.name, phase="Running",
                       revision="new", ready=True, owner="calico-node") for n in NODES),
        nodes=NODES, collected_at=NOW, controls=(FELIX, TYPHA, KUBE_CONTROLLERS),
        components={c.control: c for c in components})


def run(snap: ClusterSnapshot, control: str, state: str = "closed", *,
        felix: bool | None = None) -> tuple[ControlResult, list[ProbeTarget]]:
    """Evaluate `control` with every target probed as `state` (what scan.py does)."""
    component = snap.components.get(control)
    declared = component_declared(snap, component) if component is not None else {}
    targets = targets_for(snap, component, declared) if component is not None else []
    probes = [ProbeResult(node=t.node, address=t.address, port=t.port, state=state,  # type: ignore[arg-type]
                          felix=felix, protocol="http" if state == "open" else None)
              for t in targets]
    result = evaluate_component(snap, control, declared, probes, started_at=NOW)
    assert all(f.control == control for f in result.findings), result.findings
    assert result.control == control
    return result, targets


def ids(result: ControlResult) -> set[str]:
    return {f.id for f in result.findings}


def test_not_installed_is_compliant_and_says_so() -> None:
    for control, component in ((TYPHA, typha(found=False, pods=())),
                               (KUBE_CONTROLLERS, kube_controllers(found=False, pods=()))):
        result, targets = run(snapshot(component), control)
        assert result.status == "compliant" and not result.installed and not targets
        assert ids(result) == {"COMPONENT-NOT-INSTALLED"}


def test_unreadable_component_is_an_error_never_a_pass() -> None:
    result, _ = run(snapshot(typha(error="403 Forbidden: deployments")), TYPHA)
    assert result.status == "error" and "403" in (result.error or "")
    assert ids(result) == {"CONTROL-NOT-CHECKED"}
    result, _ = run(snapshot(), KUBE_CONTROLLERS)  # not collected at all
    assert result.status == "error" and ids(result) == {"CONTROL-NOT-CHECKED"}


def test_typha_enabled_and_open_is_non_compliant() -> None:
    result, targets = run(snapshot(typha(ON)), TYPHA, "open", felix=True)
    assert targets == [ProbeTarget(node="n1", address="127.0.0.1", port=9093)]  # node address
    assert result.status == "non_compliant"
    assert {"TYPHA-PORT-REACHABLE", "TYPHA-METRICS-ENABLED"} <= ids(result)
    assert result.targets[0].verdict == "fail"


def test_kube_controllers_enabled_and_open_is_non_compliant() -> None:
    result, targets = run(snapshot(kube_controllers(9094)), KUBE_CONTROLLERS, "open", felix=True)
    assert targets == [ProbeTarget(node="n2", address="127.0.1.5", port=9094)]  # the pod IP
    assert result.status == "non_compliant"
    assert {"KUBE-CONTROLLERS-PORT-REACHABLE", "KUBE-CONTROLLERS-METRICS-ENABLED"} <= ids(result)


@pytest.mark.parametrize(("control", "component"), [
    (TYPHA, typha()), (KUBE_CONTROLLERS, kube_controllers(0)),
])
def test_disabled_and_closed_is_compliant(control: str, component: ComponentSnapshot) -> None:
    result, targets = run(snapshot(component), control, "closed")
    assert result.status == "compliant" and not result.findings
    assert [r.verdict for r in result.targets] == ["pass"]
    assert targets[0].port == (9093 if control == TYPHA else 9094)  # port 0 (off) probes 9094


def test_kube_controllers_absent_port_field_is_compliant_with_a_warning() -> None:
    result, targets = run(snapshot(kube_controllers(None)), KUBE_CONTROLLERS, "closed")
    assert result.status == "compliant" and targets[0].port == 9094
    assert ids(result) == {"KUBE-CONTROLLERS-METRICS-PORT-ABSENT"}


def test_kube_controllers_absent_resource_is_enabled() -> None:
    result, _ = run(snapshot(kube_controllers(exists=False)), KUBE_CONTROLLERS, "closed")
    assert result.status == "non_compliant"
    assert {"KUBE-CONTROLLERS-METRICS-ENABLED", "DRIFT-ENABLED-BUT-CLOSED"} <= ids(result)


@pytest.mark.parametrize(("control", "component"), [
    (TYPHA, typha()), (KUBE_CONTROLLERS, kube_controllers(0)),
])
def test_disabled_but_open_is_drift(control: str, component: ComponentSnapshot) -> None:
    result, _ = run(snapshot(component), control, "open")
    assert result.status == "non_compliant"
    drift = [f for f in result.findings if f.id == "DRIFT-DISABLED-BUT-OPEN"]
    assert drift and all(f.control == control for f in drift)


@pytest.mark.parametrize(("control", "component"), [
    (TYPHA, typha(ON)), (KUBE_CONTROLLERS, kube_controllers(9094)),
])
def test_enabled_but_closed_is_drift_and_non_compliant(control: str,
                                                       component: ComponentSnapshot) -> None:
    for state in ("closed", "filtered"):
        result, _ = run(snapshot(component), control, state)
        assert result.status == "non_compliant"
        assert "DRIFT-ENABLED-BUT-CLOSED" in ids(result)


@pytest.mark.parametrize(("control", "make"), [
    (TYPHA, lambda ready: typha(pods=(typha_pod(ready=ready),))),
    (KUBE_CONTROLLERS, lambda ready: kube_controllers(0, pods=(kc_pod(ready=ready),))),
])
def test_disabled_and_filtered_passes_only_while_the_pod_is_ready(control: str, make) -> None:  # type: ignore[no-untyped-def]
    result, _ = run(snapshot(make(True)), control, "filtered")
    assert result.status == "compliant" and result.targets[0].verdict == "pass"
    result, _ = run(snapshot(make(False)), control, "filtered")
    assert result.targets[0].verdict == "unknown"
    assert result.status == "error" and "NODE-NOT-VERIFIED" in ids(result)


def test_filtered_typha_on_a_not_ready_node_is_unknown() -> None:
    snap = snapshot(typha())
    snap = replace(snap, nodes=(replace(NODES[0], ready=False), NODES[1]))
    result, _ = run(snap, TYPHA, "filtered")
    assert result.status == "error" and result.targets[0].verdict == "unknown"


@pytest.mark.parametrize(("control", "component"), [
    (TYPHA, typha(pods=(typha_pod(node=None, ip=None),))),
    (KUBE_CONTROLLERS, kube_controllers(0, pods=(kc_pod(node=None, ip=None),))),
])
def test_pod_without_node_or_address_is_unknown(control: str,
                                                component: ComponentSnapshot) -> None:
    result, targets = run(snapshot(component), control, "closed")
    assert [t.address for t in targets] == [None]  # the probe answers error for these
    [target] = result.targets
    assert target.verdict == "unknown" and target.probe.state == "error"
    assert result.status == "error"


def test_typha_on_a_node_unknown_to_the_snapshot_is_probed_on_its_pod_ip() -> None:
    component = typha(pods=(typha_pod(node="gone", ip="127.0.9.9"),))
    result, targets = run(snapshot(component), TYPHA, "closed")
    assert targets == [ProbeTarget(node="gone", address="127.0.9.9", port=9093)]
    assert result.status == "compliant"


def test_typha_port_zero_enabled_is_an_error_target() -> None:
    env = (*ON, EnvVar(name="TYPHA_PROMETHEUSMETRICSPORT", value="0", origin="literal"))
    result, targets = run(snapshot(typha(env)), TYPHA, "closed")
    assert not targets  # nothing to aim at
    [target] = result.targets
    assert target.probe.state == "error" and target.port == 0
    assert target.verdict == "fail" and result.status == "non_compliant"


def test_typha_operator_metrics_port_is_non_compliant() -> None:
    inst = Installation(name="default", node_metrics_port=None, typha_metrics_port=9093)
    env = (*ON, EnvVar(name="TYPHA_PROMETHEUSMETRICSPORT", value="9093", origin="literal"))
    result, _ = run(snapshot(typha(env), installation=inst, install="operator"), TYPHA, "closed")
    assert result.status == "non_compliant"
    assert {"TYPHA-OPERATOR-METRICS-PORT-SET", "TYPHA-METRICS-ENABLED"} <= ids(result)
    enabled = next(f for f in result.findings if f.id == "TYPHA-METRICS-ENABLED")
    assert "typhaMetricsPort" in enabled.remediation
    # Before the operator re-renders the Deployment, the Installation alone fails the control.
    result, _ = run(snapshot(typha(), installation=inst, install="operator"), TYPHA, "closed")
    assert result.status == "non_compliant" and "TYPHA-OPERATOR-METRICS-PORT-SET" in ids(result)


def test_typha_unknown_and_invalid_values_are_reported() -> None:
    unreadable = (EnvVar(name="TYPHA_PROMETHEUSMETRICSENABLED", value=None,
                         origin="secret kube-system/s[k]", error="403"),)
    result, _ = run(snapshot(typha(unreadable)), TYPHA, "closed")
    assert result.status == "error" and "TYPHA-CONFIG-UNRESOLVED" in ids(result)
    invalid = (EnvVar(name="TYPHA_PROMETHEUSMETRICSENABLED", value="on", origin="literal"),)
    result, _ = run(snapshot(typha(invalid)), TYPHA, "closed")
    assert result.status == "compliant" and ids(result) == {"TYPHA-CONFIG-INVALID-VALUE"}


def test_an_old_typha_pod_with_metrics_fails_the_control() -> None:
    pods = (typha_pod("calico-typha-new", "n1"),
            typha_pod("calico-typha-old", "n2", ip="127.0.0.2", env=ON))
    result, targets = run(snapshot(typha(pods=pods)), TYPHA, "closed")
    assert {t.address for t in targets} == {"127.0.0.1", "127.0.0.2"}
    assert {r.declared.pod: r.verdict for r in result.targets} == {
        "calico-typha-new": "pass", "calico-typha-old": "fail"}
    assert result.status == "non_compliant"


def test_worst_status() -> None:
    assert worst(["compliant", "error", "non_compliant"]) == "non_compliant"
    assert worst(["compliant", "error"]) == "error"
    assert worst(["compliant", "compliant"]) == "compliant"


# --- a cluster over several controls (scanner.core.evaluate) -----------------------------------


def felix_result(snap: ClusterSnapshot):  # type: ignore[no-untyped-def]
    declared = resolve_nodes(snap)
    probes = [ProbeResult(node=n.name, address=n.address("InternalIP"), port=9091,
                          state="closed") for n in snap.nodes]
    return evaluate(snap, declared, probes, cluster_declared=cluster_declared(snap, declared),
                    started_at=NOW, finished_at=NOW)


def test_with_controls_status_is_the_worst_and_findings_are_all_of_theirs() -> None:
    snap = snapshot(typha(ON), kube_controllers(0))
    felix = felix_result(snap)
    assert felix.status == "compliant"
    others = {TYPHA: run(snap, TYPHA, "closed")[0],
              KUBE_CONTROLLERS: run(snap, KUBE_CONTROLLERS, "closed")[0]}
    result = with_controls(felix, snap, (FELIX, TYPHA, KUBE_CONTROLLERS), others)
    assert result.status == "non_compliant"
    assert [c.control for c in result.controls] == [FELIX, TYPHA, KUBE_CONTROLLERS]
    assert [c.status for c in result.controls] == ["compliant", "non_compliant", "compliant"]
    assert {f.id for f in result.findings} >= {"TYPHA-METRICS-ENABLED",
                                               "DRIFT-ENABLED-BUT-CLOSED"}
    assert {f.control for f in result.findings} == {TYPHA}
    assert len(result.nodes) == 2 and result.declared is not None
    # Only an error beside compliant ones: error.
    errored = {TYPHA: run(snapshot(typha(error="boom")), TYPHA)[0],
               KUBE_CONTROLLERS: others[KUBE_CONTROLLERS]}
    result = with_controls(felix, snap, (FELIX, TYPHA, KUBE_CONTROLLERS), errored)
    assert result.status == "error" and "typha-metrics: " in (result.error or "")


def test_with_controls_without_felix_has_no_nodes() -> None:
    snap = snapshot(typha(), kube_controllers(0))
    felix = felix_result(snap)
    others = {KUBE_CONTROLLERS: run(snap, KUBE_CONTROLLERS, "closed")[0]}
    result = with_controls(felix, snap, (KUBE_CONTROLLERS,), others)
    assert result.nodes == () and result.declared is None
    assert [c.control for c in result.controls] == [KUBE_CONTROLLERS]
    assert result.status == "compliant" and not result.findings


def test_failed_cluster_reports_every_control_checked() -> None:
    result = failed_cluster("c1", "connection refused", started_at=NOW, finished_at=NOW,
                            controls=(FELIX, TYPHA, KUBE_CONTROLLERS))
    assert result.status == "error"
    assert [(c.control, c.status) for c in result.controls] == [
        (FELIX, "error"), (TYPHA, "error"), (KUBE_CONTROLLERS, "error")]
    assert [(f.id, f.control) for f in result.findings] == [
        ("CLUSTER-SCAN-FAILED", FELIX), ("CLUSTER-SCAN-FAILED", TYPHA),
        ("CLUSTER-SCAN-FAILED", KUBE_CONTROLLERS)]
    assert all(c.findings[0].control == c.control for c in result.controls)
