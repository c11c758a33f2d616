"""Immutable records passed between the pipeline stages.

collect -> ClusterSnapshot, probe -> ProbeResult, evaluate -> ClusterResult. No stage hands a
raw Kubernetes client model or an ORM row to another; only these dataclasses cross the seams.
Records are frozen and named for what they describe (`...Snapshot`, `...Result`, `...Target`);
the suffix `Row` belongs to the mutable ORM rows of `scanner.db.models` (the naming rule is
written out there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

Install = Literal["manifest", "operator", "unknown"]
ProbeState = Literal["closed", "filtered", "unreachable", "open", "error"]
Protocol = Literal["https", "http", "tcp"]
Verdict = Literal["pass", "fail", "unknown", "waived"]  # waived: failing, risk accepted
ClusterStatus = Literal["compliant", "non_compliant", "error"]
Severity = Literal["critical", "high", "medium", "low", "info"]
# The controls felixscan checks, one per Calico metrics endpoint (docs/controls.md):
# Felix's (9091, every node), Typha's (9093, the nodes Typha runs on, host network) and
# calico-kube-controllers' (9094, its pod IP). A cluster selects any of them (default: all).
FELIX = "felix-metrics"
TYPHA = "typha-metrics"
KUBE_CONTROLLERS = "kube-controllers-metrics"
CONTROL_IDS: tuple[str, ...] = (FELIX, TYPHA, KUBE_CONTROLLERS)


# --- collect -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One environment entry of the calico-node container that Felix would read.

    `value` is the text Felix sees. For a value read from a Secret the collector never keeps the
    text: it keeps only a canonical stand-in (`true`/`false` for a valid boolean, the digits of a
    valid port, `<redacted>` otherwise) and sets `redacted`.
    """

    name: str
    value: str | None
    # "literal", "configmap ns/name[key]", "secret ns/name[key]", "envFrom configmap ns/name[key]"
    origin: str
    redacted: bool = False
    error: str | None = None  # set when the value could not be resolved; `value` is then None


@dataclass(frozen=True, slots=True)
class FelixConfig:
    """A FelixConfiguration resource, reduced to what decides the metrics endpoint.

    `spec` holds the `prometheusMetrics*` fields exactly as served (JSON values, wrong types
    included); `annotations` the keys that start with `config.projectcalico.org/` (the prefix
    is case-sensitive upstream). scanner.core.calico turns both into the raw values Felix receives.
    """

    name: str
    spec: Mapping[str, object]
    annotations: Mapping[str, str]
    node_selector: str | None
    created: str  # metadata.creationTimestamp as served (RFC 3339)

    @property
    def enabled(self) -> object:
        return self.spec.get("prometheusMetricsEnabled")


@dataclass(frozen=True, slots=True)
class FelixConfigSet:
    """The FelixConfigurations of one API group, or why they cannot be known."""

    group: str  # "crd.projectcalico.org/v1" or "projectcalico.org/v3"
    configs: tuple[FelixConfig, ...] = ()
    error: str | None = None  # set: the group cannot be read, so datastore values are unknown


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """What is known of Felix's config file (`/etc/calico/felix.cfg`) in the calico-node pod.

    The stock image has none with Prometheus keys. `known` is False when a volume replaces it
    with content the scanner cannot read, so the declared state cannot be decided. `invalid`
    is set when the file is there but gopkg.in/ini.v1 rejects it: Felix does not start.
    """

    known: bool
    values: Mapping[str, str]  # key exactly as ini.v1 names it (all sections merged) -> value
    origin: str  # "image default", "configmap ns/name[key]", ...
    error: str | None = None
    invalid: str | None = None  # why ini.v1 rejects the file


@dataclass(frozen=True, slots=True)
class Installation:
    """The tigera-operator Installation `default`."""

    name: str
    node_metrics_port: int | None
    typha_metrics_port: int | None = None  # spec.typhaMetricsPort: the operator enables Typha's


@dataclass(frozen=True, slots=True)
class Rollout:
    """The calico-node DaemonSet's rollout state as its status reports it."""

    generation: int
    observed_generation: int
    desired: int
    updated: int
    ready: int
    available: int
    current_revision: str | None  # controller-revision-hash of the newest ControllerRevision
    strategy: str
    max_unavailable: str | None

    @property
    def complete(self) -> bool:
        return (
            self.observed_generation >= self.generation
            and self.updated == self.desired
            and self.available == self.desired
        )


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod running the calico-node container, with what its own spec gives Felix.

    `env`, `config_file` and `image` are read from the Pod itself (mid-rollout a pod on an old
    revision still runs the old env); None means "as the DaemonSet template".
    """

    name: str
    node: str | None
    phase: str
    revision: str | None  # the pod's controller-revision-hash label
    ready: bool
    owner: str | None = None  # the DaemonSet that owns it; None: no DaemonSet owner
    current: bool | None = None  # runs its DaemonSet's newest revision (None: not known)
    env: tuple[EnvVar, ...] | None = None
    config_file: ConfigFile | None = None
    image: str | None = None
    terminating: bool = False  # metadata.deletionTimestamp is set: still running until gone


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[tuple[str, str], ...]  # (type, address), in the order the node reports
    ready: bool | None
    labels: Mapping[str, str] = field(default_factory=dict)

    def address(self, kind: str) -> str | None:
        return next((addr for typ, addr in self.addresses if typ == kind), None)


@dataclass(frozen=True, slots=True)
class NodeViewLine:
    """The newest node-check line read from one node's pod: what listened on the node."""

    node: str
    pod: str
    time: datetime  # when node-check looked (its own clock)
    ports_checked: tuple[int, ...]
    listeners: tuple[tuple[str, int], ...]  # (address, port) of LISTEN sockets on those ports
    complete: bool  # every socket table read: an empty `listeners` means nothing listens


@dataclass(frozen=True, slots=True)
class NodeViews:
    """What the node-check pods of a cluster said, as collected."""

    namespace: str
    max_age_seconds: float
    lines: Mapping[str, NodeViewLine]  # by node name: the newest valid line of its pod
    problems: Mapping[str, str] = field(default_factory=dict)  # node -> why it has no line
    error: str | None = None  # the pods or their logs could not be read at all (RBAC, API)


@dataclass(frozen=True, slots=True)
class NodeObservation:
    """A node's own view as the verdict uses it (scanner.core.evaluate.observe)."""

    state: Literal["listening", "not_listening", "no_view"]
    reason: str | None = None  # no_view: missing, stale, incomplete, port not checked
    time: datetime | None = None
    pod: str | None = None
    listeners: tuple[str, ...] = ()  # "address:port" listening on the metrics port

    def as_json(self) -> dict[str, object]:
        """As stored with the node's probe and shown in JSON."""
        return {"state": self.state, "reason": self.reason,
                "time": self.time.isoformat() if self.time else None, "pod": self.pod,
                "listeners": list(self.listeners)}


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Everything read from one cluster's API in one scan."""

    cluster: str
    install: Install
    namespace: str
    daemonset: str
    container: str
    image: str | None
    env: tuple[EnvVar, ...]
    config_file: ConfigFile
    felix_configs: tuple[FelixConfig, ...]  # of the group Felix reads by discovery
    felix_crd: bool  # the FelixConfiguration API is served in that group
    installation: Installation | None
    rollout: Rollout
    pods: tuple[Pod, ...]
    nodes: tuple[Node, ...]
    collected_at: datetime
    api_seconds: float = 0.0
    # Every group read, by name; a pod whose CALICO_API_GROUP names another group reads that.
    felix_sets: Mapping[str, FelixConfigSet] = field(default_factory=dict)
    felix_group: str = "crd.projectcalico.org/v1"  # libcalico-go's discovery answer
    # What node-check said on each node (scanner.core.nodeview), when the cluster has
    # `node_check` configured; None: not configured, nothing was read.
    node_views: NodeViews | None = None
    # The controls this cluster checks (ClusterSettings.controls), and the Deployments behind
    # Typha's and kube-controllers' (by control ID) when those controls are checked.
    controls: tuple[str, ...] = (FELIX,)
    components: Mapping[str, ComponentSnapshot] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ComponentPod:
    """A pod of a Calico Deployment (Typha, kube-controllers), with what its own spec gives the
    component: mid-rollout an old pod still runs the old env."""

    name: str
    node: str | None
    pod_ip: str | None
    host_network: bool
    phase: str
    ready: bool
    env: tuple[EnvVar, ...] | None = None  # the container's env; None: as the template
    config_file: ConfigFile | None = None  # Typha's /etc/calico/typha.cfg, from the pod's spec
    image: str | None = None
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class KubeControllersConfig:
    """The KubeControllersConfiguration `default`, reduced to what decides the metrics port.

    `port` is spec.prometheusMetricsPort exactly as served (None: the field is absent, which
    kube-controllers reads as 0, off); `running` and `environment` are status.runningConfig and
    status.environmentVars as kube-controllers last wrote them (evidence; the running config
    has no metrics port upstream)."""

    exists: bool
    port: object = None
    running: Mapping[str, object] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    resource_version: str | None = None
    error: str | None = None  # set: it could not be read, so the declared port is unknown


@dataclass(frozen=True, slots=True)
class ComponentSnapshot:
    """One Calico Deployment whose metrics endpoint is a control of its own (Typha,
    calico-kube-controllers), as read from the API.

    `found` False with no `error`: the Deployment is not in the namespace (Typha is optional in
    manifest installs). `error` set: it could not be read, so nothing about it is known.
    """

    control: str  # TYPHA or KUBE_CONTROLLERS
    namespace: str
    deployment: str
    container: str
    found: bool
    image: str | None = None
    env: tuple[EnvVar, ...] = ()  # the Deployment template's container env, resolved
    config_file: ConfigFile | None = None  # Typha only
    pods: tuple[ComponentPod, ...] = ()
    replicas: int | None = None
    ready_replicas: int | None = None
    kcc: KubeControllersConfig | None = None  # kube-controllers only
    error: str | None = None


# --- declared state ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Declared:
    """Felix's declared metrics setting for one node, decided by Felix's precedence.

    `enabled` is None when a source that would win could not be read (unknown, never guessed).
    `source` names the winning source, e.g. `env FELIX_PROMETHEUSMETRICSENABLED`,
    `FelixConfiguration node.worker-1`, `default (false)`.
    """

    enabled: bool | None
    source: str
    port: int
    port_source: str
    raw: str | None = None  # the winning raw text, when it is not redacted
    invalid: bool = False  # the winning value was not a valid Felix boolean (counted as false)
    reason: str | None = None  # why enabled is None
    tls: bool = False  # HTTPS: a metrics certificate or key file is configured (v3.32+)
    host: str = ""  # PrometheusMetricsHost: "" = every interface
    client_auth: str | None = None  # PrometheusMetricsClientAuth when tls (None: not known)
    pod: str | None = None  # the calico-node pod whose spec decided it (None: the template)
    felix_version: str | None = None  # from the calico-node image tag, when it names one

    @property
    def random_port(self) -> bool:
        """PrometheusMetricsPort 0: Felix binds a port the kernel picks; no probe can aim."""
        return self.port == 0

    @property
    def loopback_only(self) -> bool:
        return self.host.lower() in ("localhost", "::1", "[::1]") or self.host.startswith("127.")


# --- probe ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    node: str
    address: str | None  # None: the node has no address of the configured type
    port: int


@dataclass(frozen=True, slots=True)
class TlsFacts:
    version: str | None
    cipher: str | None
    subject: str | None
    issuer: str | None
    self_signed: bool | None
    not_before: datetime | None
    not_after: datetime | None
    sha256: str | None  # hex fingerprint of the leaf certificate (DER)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    node: str
    address: str | None
    port: int
    state: ProbeState
    protocol: Protocol | None = None
    felix: bool | None = None  # None when no HTTP body could be read
    http_status: int | None = None
    tls: TlsFacts | None = None
    felix_host: str | None = None  # the host label of felix_host{host=...}, if served
    error: str | None = None
    connect_ms: float | None = None
    duration_ms: float = 0.0
    body_bytes: int = 0


# --- evaluate ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Waiver:
    """An accepted risk from `waivers_file` (scanner.core.waivers): a finding on a cluster's
    nodes (a glob), who approved it, why, and until when (an expiry is required)."""

    id: str  # W- and a hash of what it waives and when: stable across scans and file edits
    finding: str
    cluster: str
    nodes: str
    reason: str
    approved_by: str
    created: date
    expires: date
    source: str  # the file and the entry's number, for messages


@dataclass(frozen=True, slots=True)
class Finding:
    id: str
    severity: Severity
    message: str
    node: str | None = None
    evidence: Mapping[str, object] = field(default_factory=dict)
    remediation: str = ""
    waiver: str | None = None  # the id of the waiver in force that accepts this finding
    control: str = FELIX  # the control whose check raised it (CONTROL_IDS)


@dataclass(frozen=True, slots=True)
class NodeResult:
    node: str
    address: str | None
    port: int
    declared: Declared
    probe: ProbeResult
    pod_current: bool | None  # the node's calico-node pod runs the current template revision
    verdict: Verdict
    probes: tuple[ProbeResult, ...] = ()  # every address probed on the effective port
    waiver: str | None = None  # verdict `waived`: the id(s) of the waiver(s) accepting it
    view: NodeObservation | None = None  # node-check's view; None: node_check not configured


@dataclass(frozen=True, slots=True)
class ControlResult:
    """One control's result in one cluster scan.

    For FELIX, `declared`, `targets` and `findings` are the ClusterResult's own Felix fields.
    For Typha and kube-controllers a target is one (node, address, port) where a pod of the
    component runs: Typha's node addresses (host network), kube-controllers' pod IP; the
    target's `node` is the node the pod runs on and `declared.pod` names the pod.
    """

    control: str
    status: ClusterStatus
    declared: Declared | None  # the component-wide declared state; None: not known
    targets: tuple[NodeResult, ...]
    findings: tuple[Finding, ...]  # also in ClusterResult.findings
    error: str | None = None
    installed: bool = True  # False: the component is not deployed (nothing to expose)
    namespace: str | None = None
    workload: str | None = None  # DaemonSet or Deployment name
    image: str | None = None


@dataclass(frozen=True, slots=True)
class ClusterResult:
    cluster: str
    status: ClusterStatus
    install: Install
    declared: Declared | None  # the cluster-wide declared state (None when collection failed)
    nodes: tuple[NodeResult, ...]
    findings: tuple[Finding, ...]
    error: str | None
    started_at: datetime
    finished_at: datetime
    snapshot: ClusterSnapshot | None
    timings: Mapping[str, float] = field(default_factory=dict)  # api / probe / store seconds
    method: Mapping[str, object] = field(default_factory=dict)  # how it was probed, for reports
    waivers: tuple[Waiver, ...] = ()  # the waivers in force that applied to this result
    # One per control checked, in CONTROL_IDS order; `status` is the worst of theirs (a cluster
    # is compliant only if every checked control is). Empty: Felix's alone (older callers).
    controls: tuple[ControlResult, ...] = ()

    def control(self, control_id: str) -> ControlResult | None:
        return next((c for c in self.controls if c.control == control_id), None)
