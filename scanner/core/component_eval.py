"""The typha-metrics and kube-controllers-metrics controls: verdicts and findings. No I/O.

Each pod of the component is a target: its declared state comes from its own spec (Typha) or
the cluster's KubeControllersConfiguration (kube-controllers), and its endpoint is probed where
it would listen. A target passes only when its declared state is disabled *and* the probe shows
the port closed (or filtered while the pod is Ready), exactly as a Felix node does
(`scanner.core.evaluate.node_verdict`). kube-controllers switched off (port 0 or no port) has no
port of its own; its pods are probed on the default 9094. A component that is not deployed
exposes nothing; one that cannot be read is an error, never a pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from scanner.core.components import (
    KCC_PORT_FIELD,
    component_targets,
    declared_for,
    pod_addresses,
    running_pods,
)
from scanner.core.evaluate import (
    _hostport,
    _probe_evidence,
    deciding_probe,
    node_verdict,
)
from scanner.core.findings import RULES, SEVERITY_ORDER, component_remediation
from scanner.core.records import (
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterSnapshot,
    ClusterStatus,
    ComponentPod,
    ComponentSnapshot,
    ControlResult,
    Declared,
    Finding,
    Node,
    NodeResult,
    ProbeResult,
    ProbeTarget,
)

# What each control's findings are called, and how its metrics are recognised on the wire.
NAMES = {TYPHA: "Typha", KUBE_CONTROLLERS: "calico-kube-controllers"}
PREFIX = {TYPHA: "TYPHA", KUBE_CONTROLLERS: "KUBE-CONTROLLERS"}
METRIC_PREFIX = {TYPHA: "typha_", KUBE_CONTROLLERS: "ipam_"}
# Finding IDs every control shares (their `control` tells them apart); the others are the
# control's own, prefixed TYPHA- or KUBE-CONTROLLERS-.
_SHARED = frozenset({"DRIFT-DISABLED-BUT-OPEN", "DRIFT-ENABLED-BUT-CLOSED", "NODE-NOT-VERIFIED",
                     "CONTROL-NOT-CHECKED", "COMPONENT-NOT-INSTALLED"})


def component_declared(snapshot: ClusterSnapshot, component: ComponentSnapshot
                       ) -> dict[str, Declared]:
    """Each running pod's declared state, by pod name."""
    return {p.name: declared_for(component, p, snapshot.installation)
            for p in running_pods(component)}


def targets_for(snapshot: ClusterSnapshot, component: ComponentSnapshot,
                declared: Mapping[str, Declared], *,
                address_types: Sequence[str] = ("InternalIP",)) -> list[ProbeTarget]:
    nodes = {n.name: n for n in snapshot.nodes}
    return component_targets(component, declared, nodes, address_types=address_types)


def evaluate_component(snapshot: ClusterSnapshot, control: str,
                       declared: Mapping[str, Declared], probes: Sequence[ProbeResult], *,
                       address_types: Sequence[str] = ("InternalIP",),
                       started_at: datetime | None = None) -> ControlResult:
    """The control's result for one cluster from its snapshot and the probes of its targets."""
    component = snapshot.components.get(control)
    name = NAMES[control]
    findings: list[Finding] = []

    def add(suffix: str, message: str, *, node: str | None = None,
            evidence: Mapping[str, Any] | None = None, remediation: str | None = None) -> None:
        rule_id = suffix if suffix in _SHARED else f"{PREFIX[control]}-{suffix}"
        rule = RULES[rule_id]
        findings.append(Finding(
            id=rule_id, severity=rule.severity, message=message, node=node,
            evidence=dict(evidence or {}), control=control,
            remediation=remediation if remediation is not None else component_remediation(
                rule_id, control=control, install=snapshot.install,
                namespace=component.namespace if component else snapshot.namespace,
                deployment=component.deployment if component else "",
                container=component.container if component else "")))

    if component is None or component.error:
        why = (component.error if component is not None and component.error
               else f"the {name} Deployment was not read")
        add("CONTROL-NOT-CHECKED", f"{name} could not be checked: {why}",
            evidence={"error": why, "namespace": component.namespace if component else None,
                      "deployment": component.deployment if component else None})
        return _result(control, "error", None, (), findings, error=why, component=component)
    if not component.found:
        add("COMPONENT-NOT-INSTALLED",
            f"No {name} Deployment {component.namespace}/{component.deployment}: nothing "
            "serves its metrics in this cluster",
            evidence={"namespace": component.namespace, "deployment": component.deployment})
        return _result(control, "compliant", None, (), findings, component=component,
                       installed=False)

    template = declared_for(component, None, snapshot.installation)
    nodes = {n.name: n for n in snapshot.nodes}
    by_target: dict[tuple[str | None, int], ProbeResult] = {
        (p.address, p.port): p for p in probes}
    results: list[NodeResult] = []
    for pod in running_pods(component):
        d = declared.get(pod.name) or declared_for(component, pod, snapshot.installation)
        results.append(_target(pod, d, nodes, by_target=by_target, address_types=address_types,
                               add=add, name=name))

    _config_findings(control, component, template, declared=declared, snapshot=snapshot,
                     add=add, name=name)
    status, error = _status(control, results, template, snapshot)
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.id, f.node or ""))
    return _result(control, status, template, tuple(results), findings, error=error,
                   component=component)


def _target(pod: ComponentPod, d: Declared, nodes: Mapping[str, Node], *,
            by_target: Mapping[tuple[str | None, int], ProbeResult],
            address_types: Sequence[str], add: Any, name: str) -> NodeResult:
    node_name = pod.node or f"(pod {pod.name})"
    if d.random_port:
        on_port = [ProbeResult(node=node_name, address=pod.pod_ip, port=0, state="error",
                               error="the metrics port is 0: no probe can aim at it")]
    else:
        on_port = []
        for address in pod_addresses(pod, nodes, address_types):
            found = by_target.get((address, d.port)) if address is not None else None
            on_port.append(found if found is not None else ProbeResult(
                node=node_name, address=address, port=d.port, state="error",
                error="the pod has no address yet" if address is None
                else "target was not probed"))
    main = deciding_probe(on_port)
    node = nodes.get(pod.node or "")
    ready = pod.ready if not pod.host_network else (node.ready if node else None) and pod.ready
    verdict = node_verdict(d, main, ready=ready)
    evidence = {**_probe_evidence(main), "pod": pod.name, "host_network": pod.host_network}
    if main.state == "open":
        served = ("its metrics" if main.felix else "a listener that is not " + name
                  if main.felix is False else "a listener that could not be identified")
        add("PORT-REACHABLE", f"{_hostport(main)} (pod {pod.name}) is open over "
            f"{main.protocol or 'tcp'}, serving {served}, without authentication",
            node=node_name, evidence=evidence)
        if d.enabled is False:
            add("DRIFT-DISABLED-BUT-OPEN",
                f"Declared disabled ({d.source}), but port {main.port} of {name} pod "
                f"{pod.name} is open", node=node_name,
                evidence={**evidence, "declared_source": d.source})
    elif d.enabled and main.state in ("closed", "filtered"):
        add("DRIFT-ENABLED-BUT-CLOSED",
            f"Declared enabled ({d.source}), but port {d.port} of {name} pod {pod.name} is "
            f"{main.state} from the scanner: hidden, yet non-compliant in configuration",
            node=node_name, evidence={**evidence, "declared_source": d.source})
    if verdict == "unknown" and d.enabled is not None:
        reason = main.error or ("port filtered while the pod is not Ready"
                                if main.state == "filtered" else f"probe state {main.state}")
        add("NODE-NOT-VERIFIED", f"{name} pod {pod.name} could not be verified: {reason}",
            node=node_name, evidence={**evidence, "ready": ready})
    return NodeResult(node=node_name, address=main.address, port=d.port, declared=d,
                      probe=main, pod_current=None, verdict=verdict, probes=tuple(on_port))


def _config_findings(control: str, component: ComponentSnapshot, template: Declared, *,
                     declared: Mapping[str, Declared], snapshot: ClusterSnapshot, add: Any,
                     name: str) -> None:
    states = [("the Deployment template", template),
              *((f"pod {pod}", d) for pod, d in declared.items())]
    groups: dict[tuple[str, str], list[str]] = {}
    details: dict[tuple[str, str], Declared] = {}
    for who, d in states:
        kind = "enabled" if d.enabled else "unknown" if d.enabled is None else \
            "invalid" if d.invalid else ""
        if kind:
            groups.setdefault((kind, d.source), []).append(who)
            details[(kind, d.source)] = d
    for (kind, source), where in groups.items():
        d = details[(kind, source)]
        evidence = {"source": source, "raw": d.raw, "port": d.port, "port_source": d.port_source,
                    "host": d.host, "tls": d.tls, "version": d.felix_version,
                    "where": where[:50], "namespace": component.namespace,
                    "deployment": component.deployment}
        scope = ", ".join(where[:5]) + (", ..." if len(where) > 5 else "")
        if kind == "enabled":
            add("METRICS-ENABLED", f"{name} metrics enabled on port {d.port} by {source} "
                f"({scope})", evidence=evidence,
                remediation=component_remediation(
                    f"{PREFIX[control]}-METRICS-ENABLED", control=control,
                    install=snapshot.install, source=source, namespace=component.namespace,
                    deployment=component.deployment, container=component.container,
                    operator_port=_operator_port(control, snapshot) is not None))
        elif kind == "unknown":
            add("CONFIG-UNRESOLVED", f"{name}'s declared metrics state is unknown ({scope}): "
                f"{d.reason}", evidence=evidence)
        elif control == TYPHA:
            add("CONFIG-INVALID-VALUE", f"{source} holds {d.raw!r}, not a boolean; Typha "
                f"treats it as false ({scope})", evidence=evidence)
    port = _operator_port(control, snapshot)
    if port is not None and snapshot.installation is not None:
        add("OPERATOR-METRICS-PORT-SET",
            f"Installation {snapshot.installation.name} sets spec.typhaMetricsPort={port}: the "
            "operator renders TYPHA_PROMETHEUSMETRICSENABLED=true", evidence={
                "installation": snapshot.installation.name, "typha_metrics_port": port})
    kcc = component.kcc
    if control == KUBE_CONTROLLERS and kcc is not None and kcc.exists and kcc.port is None \
            and not kcc.error and template.source.startswith(KCC_PORT_FIELD):
        add("METRICS-PORT-ABSENT",
            "KubeControllersConfiguration default has no spec.prometheusMetricsPort: off now, "
            "but any update through a Calico client (calicoctl, the operator's API) fills in "
            "9094 and turns the endpoint on", evidence={"resource_version": kcc.resource_version})


def _operator_port(control: str, snapshot: ClusterSnapshot) -> int | None:
    inst = snapshot.installation
    if control == TYPHA and inst is not None:
        return inst.typha_metrics_port
    return None


def _status(control: str, results: Sequence[NodeResult], template: Declared,
            snapshot: ClusterSnapshot) -> tuple[ClusterStatus, str | None]:
    if (any(r.verdict == "fail" for r in results) or template.enabled
            or _operator_port(control, snapshot) is not None):
        return "non_compliant", None
    unknown = sum(1 for r in results if r.verdict == "unknown")
    if template.enabled is None:
        return "error", f"the declared state is unknown: {template.reason}"
    if unknown:
        return "error", f"{unknown} of {len(results)} {NAMES[control]} pods could not be verified"
    return "compliant", None


def _result(control: str, status: ClusterStatus, declared: Declared | None,
            targets: tuple[NodeResult, ...], findings: Sequence[Finding], *,
            component: ComponentSnapshot | None, error: str | None = None,
            installed: bool = True) -> ControlResult:
    return ControlResult(control=control, status=status, declared=declared, targets=targets,
                         findings=tuple(findings), error=error, installed=installed,
                         namespace=component.namespace if component else None,
                         workload=component.deployment if component else None,
                         image=component.image if component else None)
