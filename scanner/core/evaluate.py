"""The compliance rules: (snapshot, declared state, probes) -> verdicts and findings. No I/O.

A node passes only when its declared state is disabled *and* its port was shown closed (or
filtered on a Ready node). Anything not proven is UNKNOWN, never PASS.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from scanner.core.calico import SELECTOR_SINCE, felix_version, selector_problems
from scanner.core.findings import RULES, SEVERITY_ORDER, remediation_for
from scanner.core.records import (
    CONTROL_IDS,
    FELIX,
    ClusterResult,
    ClusterSnapshot,
    ClusterStatus,
    ControlResult,
    Declared,
    Finding,
    Install,
    NodeObservation,
    NodeResult,
    NodeViews,
    Pod,
    ProbeResult,
    ProbeTarget,
    Verdict,
)

_EVIDENCE_NODES = 50  # cluster-level findings list at most this many node names


def probe_targets(snapshot: ClusterSnapshot, declared: Mapping[str, Declared], *,
                  address_type: str | Sequence[str] = "InternalIP",
                  extra_ports: Sequence[int] = ()) -> list[ProbeTarget]:
    """Every address of the wanted types of every node (both families: Felix binds `:port`, every
    interface), on the node's effective port, then on each extra port. A node with no such
    address gets one target without an address; a random port (0) is not aimed at."""
    types = (address_type,) if isinstance(address_type, str) else tuple(address_type)
    targets: list[ProbeTarget] = []
    for node in snapshot.nodes:
        addresses: list[str | None] = list(dict.fromkeys(
            addr for typ, addr in node.addresses if typ in types)) or [None]
        ports = [p for p in (declared[node.name].port, *extra_ports) if p]
        for address in addresses:
            targets.extend(ProbeTarget(node=node.name, address=address, port=p)
                           for p in dict.fromkeys(ports))
    return targets


# Which of a node's probes on one port speaks for it: an answer beats not knowing, which
# beats a silence, which beats a refusal (a node passes only if no address answers).
_STATE_RANK = {"open": 0, "error": 1, "unreachable": 2, "filtered": 3, "closed": 4}


def deciding_probe(probes: Sequence[ProbeResult]) -> ProbeResult:
    return min(probes, key=lambda p: (_STATE_RANK[p.state], p.felix is not True))


def node_verdict(declared: Declared, probe: ProbeResult, *, ready: bool | None,
                 view: NodeObservation | None = None) -> Verdict:
    """Three views: the declared configuration, the network probe, and (with node-check) the
    node's own listeners. docs/findings.md tabulates every combination."""
    listening = view is not None and view.state == "listening"
    not_listening = view is not None and view.state == "not_listening"
    if declared.enabled or probe.state == "open" or listening:
        # Listening on the node fails it even when the probe cannot reach the port; an open
        # port fails it even when nothing listens in the host namespace (another path).
        return "fail"
    if declared.enabled is None:
        return "unknown"
    if probe.state == "closed":
        return "pass"
    if not_listening:
        # Observed on the node, not inferred: a filtered, unreachable or unprobed port is no
        # longer a reason for doubt when nothing listens there.
        return "pass"
    if probe.state == "filtered" and ready:
        # A Ready node that drops the SYN is what Calico's deny policy looks like. A NotReady
        # node that drops it may simply be down, which proves nothing.
        return "pass"
    return "unknown"


def observe(views: NodeViews | None, node: str, port: int, *,
            now: datetime) -> NodeObservation | None:
    """What node-check's newest line says of `node`'s metrics `port`; None: not configured."""
    if views is None:
        return None
    if views.error is not None:
        return NodeObservation("no_view", reason=f"node-check could not be read: {views.error}")
    line = views.lines.get(node)
    if line is None:
        return NodeObservation("no_view", reason=views.problems.get(node)
                               or "no node-check pod runs on this node")
    age = (now - line.time).total_seconds()
    if age > views.max_age_seconds:
        return NodeObservation("no_view", reason=f"node-check's newest line is {age:.0f} s old "
                               f"(more than {views.max_age_seconds:.0f} s): stale",
                               time=line.time, pod=line.pod)
    if port not in line.ports_checked:
        return NodeObservation("no_view", reason=f"node-check does not check port {port} "
                               f"(it checks {', '.join(map(str, line.ports_checked))})",
                               time=line.time, pod=line.pod)
    found = tuple(f"{address}:{p}" if ":" not in address else f"[{address}]:{p}"
                  for address, p in line.listeners if p == port)
    if found:
        return NodeObservation("listening", time=line.time, pod=line.pod, listeners=found)
    if not line.complete:
        return NodeObservation("no_view", reason="node-check could not read every socket table",
                               time=line.time, pod=line.pod)
    return NodeObservation("not_listening", time=line.time, pod=line.pod)


def _finding(rule_id: str, message: str, *, node: str | None = None,
             evidence: Mapping[str, Any] | None = None, remediation: str | None = None,
             install: Install = "unknown", snapshot: ClusterSnapshot | None = None) -> Finding:
    rule = RULES[rule_id]
    if remediation is None:
        remediation = remediation_for(
            rule_id, install=install,
            namespace=snapshot.namespace if snapshot else "kube-system",
            daemonset=snapshot.daemonset if snapshot else "calico-node",
            container=snapshot.container if snapshot else "calico-node")
    return Finding(id=rule_id, severity=rule.severity, message=message, node=node,
                   evidence=dict(evidence or {}), remediation=remediation)


def _names(nodes: Sequence[str]) -> dict[str, Any]:
    return {"nodes": list(nodes[:_EVIDENCE_NODES]), "node_count": len(nodes)}


def evaluate(snapshot: ClusterSnapshot, declared: Mapping[str, Declared],
             probes: Sequence[ProbeResult], *, cluster_declared: Declared,
             started_at: datetime, finished_at: datetime,
             timings: Mapping[str, float] | None = None) -> ClusterResult:
    """Verdicts per node, findings, and the cluster status."""
    install = snapshot.install
    by_node: dict[str, list[ProbeResult]] = defaultdict(list)
    for probe in probes:
        by_node[probe.node].append(probe)
    pods: dict[str, list[Pod]] = defaultdict(list)
    for p in snapshot.pods:
        if p.node and p.phase not in ("Succeeded", "Failed"):
            pods[p.node].append(p)
    current = snapshot.rollout.current_revision
    findings: list[Finding] = []

    def add(rule_id: str, message: str, **kw: Any) -> None:
        findings.append(_finding(rule_id, message, install=install, snapshot=snapshot, **kw))

    results: list[NodeResult] = []
    stale: list[str] = []
    self_signed: list[str] = []
    loopback: list[str] = []
    random_port: list[str] = []
    no_view: list[tuple[str, str]] = []  # (node, why) without a usable node-check line
    for node in snapshot.nodes:
        d = declared[node.name]
        node_probes = by_node.get(node.name, [])
        on_port = [p for p in node_probes if p.port == d.port]
        if d.random_port:
            on_port = [ProbeResult(node=node.name, address=node.address("InternalIP"), port=0,
                                   state="error", error="PrometheusMetricsPort is 0: Felix "
                                   "binds a random port, which no probe can aim at")]
            random_port.append(node.name)
        elif not on_port:
            on_port = [ProbeResult(node=node.name, address=node.address("InternalIP"),
                                   port=d.port, state="error", error="node was not probed")]
        main = deciding_probe(on_port)
        node_pods = sorted(pods.get(node.name, []), key=lambda p: p.name)
        pod = next((p for p in node_pods if p.name == d.pod), node_pods[0] if node_pods else None)
        currents = [_pod_current(p, current) for p in node_pods]
        pod_current = (False if False in currents else None if None in currents or not currents
                       else True)
        if pod_current is False:
            stale.append(node.name)
        if d.enabled and d.loopback_only:
            loopback.append(node.name)
        view = observe(snapshot.node_views, node.name, d.port, now=started_at)
        if view is not None and view.state == "no_view":
            no_view.append((node.name, view.reason or ""))
        verdict = node_verdict(d, main, ready=node.ready, view=view)
        results.append(NodeResult(node=node.name, address=main.address, port=d.port,
                                  declared=d, probe=main, pod_current=pod_current,
                                  verdict=verdict, probes=tuple(on_port), view=view))
        if view is not None and view.state == "listening" and main.state != "open":
            add("FELIX-LISTENING-NOT-REACHABLE",
                f"Port {d.port} is listening on the node itself ({', '.join(view.listeners)}, "
                f"node-check pod {view.pod}) but {main.state} from the scanner: hidden from "
                "this vantage point, not closed", node=node.name,
                evidence={**_probe_evidence(main), "listeners": list(view.listeners),
                          "node_check_pod": view.pod, "node_check_time": _iso(view.time)})
        if view is not None and view.state == "not_listening" and main.state == "open":
            add("PORT-OPEN-NOT-ON-NODE",
                f"Port {main.port} answers at {main.address}, but nothing listens on it in the "
                f"node's host network namespace (node-check pod {view.pod}): the port is "
                "reachable by another path, e.g. a forwarded port or a NAT rule", node=node.name,
                evidence={**_probe_evidence(main), "node_check_pod": view.pod,
                          "node_check_time": _iso(view.time)})
        evidence = _probe_evidence(main)
        if len(on_port) > 1:
            evidence["addresses"] = [{"address": p.address, "state": p.state} for p in on_port]
        if main.state == "open":
            if main.felix:
                add("FELIX-PORT-REACHABLE",
                    f"Felix metrics are served on {_hostport(main)} "
                    f"over {main.protocol or 'tcp'} without authentication", node=node.name,
                    evidence=evidence)
                if main.tls and main.tls.self_signed:
                    self_signed.append(node.name)
            else:
                what = ("a listener that is not Felix" if main.felix is False
                        else "a listener that could not be identified")
                add("PORT-OPEN-NOT-FELIX",
                    f"Port {main.port} on {main.address} is open, served by {what}",
                    node=node.name, evidence=evidence)
            if d.enabled is False:
                old = next((p for p, c in zip(node_pods, currents, strict=True) if c is False),
                           None)
                cause = (f"calico-node pod {old.name} still runs an old template revision"
                         if old is not None else
                         "no calico-node pod runs there" if pod is None else
                         "the listener is not Felix" if main.felix is False else
                         "the running Felix does not match the declared configuration")
                add("DRIFT-DISABLED-BUT-OPEN",
                    f"Declared disabled ({d.source}), but port {main.port} is open: {cause}",
                    node=node.name,
                    evidence={**evidence, "declared_source": d.source,
                              "pod": pod.name if pod else None, "pod_revision": pod.revision
                              if pod else None, "current_revision": current,
                              "pods": [p.name for p in node_pods]})
        elif d.enabled and main.state in ("closed", "filtered"):
            add("DRIFT-ENABLED-BUT-CLOSED",
                f"Declared enabled ({d.source}), but port {d.port} is {main.state} from the "
                "scanner: hidden, yet non-compliant in configuration"
                + (f" (bound to {d.host} only)" if d.loopback_only else ""), node=node.name,
                evidence={**evidence, "declared_source": d.source, "host": d.host})
        if verdict == "unknown" and d.enabled is not None:
            reason = main.error or (
                "port filtered on a node that is not Ready" if main.state == "filtered"
                else f"probe state {main.state}")
            add("NODE-NOT-VERIFIED", f"Node could not be verified: {reason}", node=node.name,
                evidence={**evidence, "ready": node.ready})
        if pod is None:
            add("NODE-NO-CALICO-POD", "No calico-node pod runs on this node; its declared "
                "state is what the DaemonSet template would run, and the port was still probed",
                node=node.name, evidence={"ready": node.ready})
        for extra in node_probes:
            if extra.port != d.port and extra.state == "open":
                add("EXTRA-PORT-OPEN", f"Extra port {extra.port} is open on {extra.address}",
                    node=node.name, evidence=_probe_evidence(extra))

    if loopback:
        add("FELIX-METRICS-LOOPBACK-ONLY",
            f"Felix metrics are enabled but bound to loopback only on {len(loopback)} node(s): "
            "not reachable from the network, still enabled in configuration",
            evidence={"host": declared[loopback[0]].host, **_names(loopback)})
    if random_port:
        add("FELIX-METRICS-RANDOM-PORT",
            f"PrometheusMetricsPort is 0 on {len(random_port)} node(s): Felix binds a random "
            "port, so the probe cannot check it",
            evidence={"enabled": sorted({str(declared[n].enabled) for n in random_port}),
                      **_names(random_port)})
    for problem in selector_problems(snapshot):
        add("FELIX-CONFIG-SELECTOR-INVALID",
            f"FelixConfiguration {problem.config} has a nodeSelector Felix cannot parse "
            f"({problem.message}); Felix drops this resource, the others still apply",
            evidence={"config": problem.config, "selector": problem.selector})
    outside = sorted((p for p in snapshot.pods if p.owner != snapshot.daemonset),
                     key=lambda p: p.name)
    if outside:
        owners = sorted({p.owner or "(no DaemonSet)" for p in outside})
        add("CALICO-POD-OUTSIDE-DAEMONSET",
            f"{len(outside)} calico-node pod(s) not owned by DaemonSet {snapshot.namespace}/"
            f"{snapshot.daemonset} (owned by: {', '.join(owners)}); each is evaluated from its "
            "own spec",
            evidence={"pods": [{"name": p.name, "node": p.node, "owner": p.owner}
                               for p in outside[:_EVIDENCE_NODES]], "pod_count": len(outside)})
    ignored = _ignored_selectors(snapshot)
    if ignored:
        add("FELIX-CONFIG-SELECTOR-IGNORED",
            f"Selector-scoped FelixConfiguration(s) {', '.join(ignored['configs'])} are "
            f"ignored by calico-node {', '.join(ignored['versions'])} (supported from v3.32)",
            evidence=ignored)
    _config_findings(snapshot, declared, add)
    if not snapshot.rollout.complete or stale:
        r = snapshot.rollout
        add("ROLLOUT-INCOMPLETE",
            f"calico-node rollout incomplete: {r.updated}/{r.desired} pods updated, "
            f"{r.available} available, generation {r.observed_generation}/{r.generation}"
            + (f"; {len(stale)} node(s) run an old revision" if stale else ""),
            evidence={"generation": r.generation, "observed_generation": r.observed_generation,
                      "desired": r.desired, "updated": r.updated, "ready": r.ready,
                      "available": r.available, "current_revision": r.current_revision,
                      **_names(stale)})
    if no_view:
        views = snapshot.node_views
        stale = [n for n, why in no_view if why.endswith(": stale")]
        missing = [(n, why) for n, why in no_view if not why.endswith(": stale")]
        if stale:
            add("NODE-VIEW-STALE",
                f"node-check's view is stale on {len(stale)} node(s) (older than "
                f"{views.max_age_seconds if views else 0:.0f} s): their verdicts rest on the "
                "configuration and the probe alone", evidence=_names(stale))
        if missing:
            add("NODE-VIEW-MISSING",
                f"No usable node-check view for {len(missing)} node(s): their verdicts rest on "
                f"the configuration and the probe alone ({missing[0][1]}"
                + (", ..." if len({w for _, w in missing}) > 1 else "") + ")",
                evidence={**_names([n for n, _ in missing]),
                          "reasons": sorted({w for _, w in missing})[:10],
                          "namespace": views.namespace if views else None})
    if self_signed:
        add("FELIX-TLS-SELF-SIGNED",
            f"{len(self_signed)} node(s) serve metrics over TLS with a self-signed certificate",
            evidence=_names(self_signed))

    status, error = _status(results, snapshot)
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.id, f.node or ""))
    return ClusterResult(cluster=snapshot.cluster, status=status, install=install,
                         declared=cluster_declared, nodes=tuple(results),
                         findings=tuple(findings), error=error, started_at=started_at,
                         finished_at=finished_at, snapshot=snapshot, timings=dict(timings or {}))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _pod_current(pod: Pod, current: str | None) -> bool | None:
    if pod.current is not None:
        return pod.current
    return None if current is None or pod.revision is None else pod.revision == current


def _hostport(probe: ProbeResult) -> str:
    address = probe.address or "?"
    return f"[{address}]:{probe.port}" if ":" in address else f"{address}:{probe.port}"


def _ignored_selectors(snapshot: ClusterSnapshot) -> dict[str, list[str]]:
    """Selector-scoped resources next to calico-node images older than v3.32, which ignore
    them (the feature arrived in v3.32.0)."""
    scoped = [c.name for c in snapshot.felix_configs if c.node_selector and c.name != "default"
              and not c.name.startswith("node.")]
    if not scoped:
        return {}
    images = {p.image or snapshot.image for p in snapshot.pods} or {snapshot.image}
    old = sorted({".".join(map(str, v)) for v in (felix_version(i) for i in images)
                  if v is not None and v < SELECTOR_SINCE})
    return {"configs": scoped, "versions": [f"v{v}" for v in old]} if old else {}


def _config_findings(snapshot: ClusterSnapshot, declared: Mapping[str, Declared],
                     add: Any) -> None:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    details: dict[tuple[str, str], Declared] = {}
    for name, d in declared.items():
        kind = "enabled" if d.enabled else "unknown" if d.enabled is None else \
            "invalid" if d.invalid else ""
        if kind:
            groups[(kind, d.source)].append(name)
            details[(kind, d.source)] = d
    total = len(declared)
    for (kind, source), nodes in groups.items():
        d = details[(kind, source)]
        scope = "all nodes" if len(nodes) == total else f"{len(nodes)} of {total} nodes"
        evidence = {"source": source, "raw": d.raw, "port": d.port, "port_source": d.port_source,
                    "host": d.host, "tls": d.tls, "client_auth": d.client_auth,
                    "felix_version": d.felix_version, **_names(nodes)}
        if kind == "enabled":
            add("FELIX-METRICS-ENABLED",
                f"Felix metrics enabled on port {d.port} by {source} ({scope})",
                evidence=evidence,
                remediation=remediation_for("FELIX-METRICS-ENABLED", install=snapshot.install,
                                            source=source, namespace=snapshot.namespace,
                                            daemonset=snapshot.daemonset,
                                            container=snapshot.container,
                                            operator_port=snapshot.installation is not None
                                            and snapshot.installation.node_metrics_port
                                            is not None))
        elif kind == "unknown":
            add("FELIX-CONFIG-UNRESOLVED",
                f"Declared state unknown for {scope}: {d.reason}", evidence=evidence)
        else:
            add("FELIX-CONFIG-INVALID-VALUE",
                f"{source} holds {d.raw!r}, not a Felix boolean; Felix treats it as false "
                f"({scope})" if d.raw is not None else
                f"{source} holds a value that is not a Felix boolean; Felix treats it as false "
                f"({scope})", evidence=evidence)
    inst = snapshot.installation
    if inst is not None and inst.node_metrics_port is not None:
        add("OPERATOR-METRICS-PORT-SET",
            f"Installation {inst.name} sets spec.nodeMetricsPort={inst.node_metrics_port}: the "
            "operator keeps Felix metrics enabled", evidence={"installation": inst.name,
                                                             "node_metrics_port":
                                                             inst.node_metrics_port})


def _status(results: Sequence[NodeResult], snapshot: ClusterSnapshot
            ) -> tuple[ClusterStatus, str | None]:
    if not results:
        return "error", "the cluster reports no nodes"
    inst = snapshot.installation
    failing = sum(1 for r in results if r.verdict == "fail")
    if failing or (inst is not None and inst.node_metrics_port is not None):
        return "non_compliant", None
    unknown = sum(1 for r in results if r.verdict == "unknown")
    if unknown:
        return "error", f"{unknown} of {len(results)} nodes could not be verified"
    return "compliant", None


def failed_cluster(cluster: str, error: str, *, started_at: datetime, finished_at: datetime,
                   kind: str = "ClusterError",
                   timings: Mapping[str, float] | None = None,
                   controls: Sequence[str] = (FELIX,)) -> ClusterResult:
    """The result of a cluster whose collection failed: status error, with its reason, for
    every control it checks (each gets the finding, so each control's view shows why)."""
    finding = _finding("CLUSTER-SCAN-FAILED", f"Cluster could not be scanned: {error}",
                       evidence={"error": error, "kind": kind})
    results = tuple(ControlResult(control=c, status="error", declared=None, targets=(),
                                  findings=(replace(finding, control=c),), error=error)
                    for c in controls)
    return ClusterResult(cluster=cluster, status="error", install="unknown", declared=None,
                         nodes=(), findings=tuple(f for r in results for f in r.findings),
                         error=error, started_at=started_at, finished_at=finished_at,
                         snapshot=None, timings=dict(timings or {}), controls=results)


def worst(statuses: Sequence[ClusterStatus]) -> ClusterStatus:
    """A cluster's status from its controls': compliant only if every one is."""
    if "non_compliant" in statuses:
        return "non_compliant"
    if "error" in statuses:
        return "error"
    return "compliant"


def felix_control(result: ClusterResult) -> ControlResult:
    """Felix's own fields of a ClusterResult as its felix-metrics control result."""
    snapshot = result.snapshot
    return ControlResult(
        control=FELIX, status=result.status, declared=result.declared, targets=result.nodes,
        findings=tuple(f for f in result.findings if f.control == FELIX), error=result.error,
        namespace=snapshot.namespace if snapshot else None,
        workload=snapshot.daemonset if snapshot else None,
        image=snapshot.image if snapshot else None)


def with_controls(result: ClusterResult, snapshot: ClusterSnapshot, controls: Sequence[str],
                  others: Mapping[str, ControlResult]) -> ClusterResult:
    """The cluster's result over every control it checks: Felix's (`result`, when checked)
    and the others'; its status is the worst of theirs, its findings all of theirs."""
    results: list[ControlResult] = []
    for control in CONTROL_IDS:
        if control not in controls:
            continue
        results.append(felix_control(result) if control == FELIX else others[control])
    findings = [f for r in results for f in r.findings]
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.id, f.node or "", f.control))
    status = worst([r.status for r in results])
    errors = [f"{r.control}: {r.error}" for r in results if r.error]
    felix = FELIX in controls
    return replace(result, status=status, controls=tuple(results), findings=tuple(findings),
                   nodes=result.nodes if felix else (),
                   declared=result.declared if felix else None,
                   error=result.error if felix and len(errors) <= 1 and result.error
                   else "; ".join(errors) or None)


def _probe_evidence(probe: ProbeResult) -> dict[str, Any]:
    evidence: dict[str, Any] = {"address": probe.address, "port": probe.port,
                                "state": probe.state, "protocol": probe.protocol,
                                "felix": probe.felix, "http_status": probe.http_status}
    if probe.felix_host:
        evidence["felix_host"] = probe.felix_host
    if probe.error:
        evidence["error"] = probe.error
    if probe.tls:
        evidence["tls"] = {"subject": probe.tls.subject, "issuer": probe.tls.issuer,
                           "self_signed": probe.tls.self_signed,
                           "not_after": probe.tls.not_after.isoformat()
                           if probe.tls.not_after else None,
                           "sha256": probe.tls.sha256, "version": probe.tls.version}
    return evidence
