"""Immutable records passed between the pipeline stages.

collect -> ClusterSnapshot, probe -> ProbeResult, evaluate -> ClusterResult. No stage hands a
raw Kubernetes client model or an ORM row to another; only these dataclasses cross the seams.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Install = Literal["manifest", "operator", "unknown"]
ProbeState = Literal["closed", "filtered", "unreachable", "open", "error"]
Protocol = Literal["https", "http", "tcp"]
Verdict = Literal["pass", "fail", "unknown"]
ClusterStatus = Literal["compliant", "non_compliant", "error"]
Severity = Literal["critical", "high", "medium", "low", "info"]


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
    """A FelixConfiguration resource, reduced to what decides the metrics endpoint."""

    name: str
    enabled: bool | None  # spec.prometheusMetricsEnabled
    port: int | None  # spec.prometheusMetricsPort
    annotations: Mapping[str, str]  # only config.projectcalico.org/* keys
    node_selector: str | None
    created: str  # metadata.creationTimestamp as served (RFC 3339)
    cert_file: str | None = None  # spec.prometheusMetricsCertFile


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """What is known of Felix's config file (`/etc/calico/felix.cfg`) in the calico-node pod.

    The stock image has none with Prometheus keys. `known` is False when a volume replaces it
    with content the scanner cannot read, so the declared state cannot be decided.
    """

    known: bool
    values: Mapping[str, str]  # lower-cased parameter name -> raw value
    origin: str  # "image default", "configmap ns/name[key]", ...
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Installation:
    """The tigera-operator Installation `default`."""

    name: str
    node_metrics_port: int | None


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
    name: str
    node: str | None
    phase: str
    revision: str | None  # the pod's controller-revision-hash label
    ready: bool


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[tuple[str, str], ...]  # (type, address), in the order the node reports
    ready: bool | None
    labels: Mapping[str, str] = field(default_factory=dict)

    def address(self, kind: str) -> str | None:
        return next((addr for typ, addr in self.addresses if typ == kind), None)


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
    felix_configs: tuple[FelixConfig, ...]
    felix_crd: bool  # False when the FelixConfiguration API is not served (normal: no Calico CRDs)
    installation: Installation | None
    rollout: Rollout
    pods: tuple[Pod, ...]
    nodes: tuple[Node, ...]
    collected_at: datetime
    api_seconds: float = 0.0


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
    tls: bool = False  # a metrics certificate file is configured


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
class Finding:
    id: str
    severity: Severity
    message: str
    node: str | None = None
    evidence: Mapping[str, object] = field(default_factory=dict)
    remediation: str = ""


@dataclass(frozen=True, slots=True)
class NodeResult:
    node: str
    address: str | None
    port: int
    declared: Declared
    probe: ProbeResult
    pod_current: bool | None  # the node's calico-node pod runs the current template revision
    verdict: Verdict


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
