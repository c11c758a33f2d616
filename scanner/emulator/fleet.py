"""Builds realistic Calico clusters inside a `KubeEmulator`.

A cluster is what the scanner reads: the calico-node DaemonSet from a real release manifest
(manifest install in kube-system, or operator install in calico-system owned by the Installation),
its ControllerRevisions, one calico-node pod per node on the current or an old template revision,
the Nodes, FelixConfigurations and the ConfigMaps/Secrets env values point at. `ClusterHandle`
then plays the DaemonSet controller (and, optionally, the tigera operator): it rolls pods, flips
node readiness and keeps the DaemonSet status consistent with what it did.
"""

from __future__ import annotations

import ipaddress
import json
import random
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from scanner.emulator.apiserver import Change, JsonDict, KubeEmulator

__all__ = [
    "ClusterHandle",
    "EnvValue",
    "NodeSpec",
    "build_calico_cluster",
    "find_fixture",
    "make_nodes",
    "revision_hash",
]

PodRevision = Literal["current", "old"]
EnvValue = str | Mapping[str, Any] | None
"""An env override: a literal value, a raw entry body (`{"valueFrom": {...}}`, or the valueFrom
content itself such as `{"configMapKeyRef": {...}}`), or None to remove the variable."""

_SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand
_OPERATOR_NAMESPACE = "calico-system"
_INSTALLATION_API = "operator.tigera.io/v1"
_FELIX_API = "crd.projectcalico.org/v1"
_ENABLED = "FELIX_PROMETHEUSMETRICSENABLED"
_PORT = "FELIX_PROMETHEUSMETRICSPORT"
_DATA = Path(__file__).resolve().parent / "data"


@dataclass
class NodeSpec:
    """One node of an emulated cluster.

    `pod_revision` says which DaemonSet template revision its calico-node pod runs; None means
    the node has no calico-node pod. `pod_ready` None follows `ready`.
    """

    name: str
    address: str | None
    ready: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    address_type: str = "InternalIP"
    pod_revision: PodRevision | None = "current"
    pod_ready: bool | None = None
    extra_addresses: list[tuple[str, str]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)


def make_nodes(
    count: int,
    *,
    prefix: str = "worker",
    cidr: str = "127.30.0.0/16",
    first_host: int = 10,
    **overrides: Any,
) -> list[NodeSpec]:
    """`count` NodeSpecs named `<prefix>-0`, ... with consecutive addresses from `cidr`."""
    network = ipaddress.ip_network(cidr)
    base = int(network.network_address) + first_host
    if first_host + count > network.num_addresses:
        raise ValueError(f"{cidr} has no room for {count} nodes")
    return [
        NodeSpec(name=f"{prefix}-{n}", address=str(ipaddress.ip_address(base + n)), **overrides)
        for n in range(count)
    ]


def find_fixture(version: str, *, folder: Path | None = None) -> Path:
    """The calico-node DaemonSet manifest for a Calico version (`v3.32`, `v3.32.1`, `3.30`).

    Looks in `folder`, by default this package's `data` directory (the releases the demo
    ships); the last match in name order wins. FileNotFoundError when none matches.
    """
    wanted = version if version.startswith("v") else f"v{version}"
    base = folder if folder is not None else _DATA
    matches = sorted(
        p
        for p in base.glob("v*-calico-daemonset-calico-node.yaml")
        if p.name.startswith(f"{wanted}.") or p.name.startswith(f"{wanted}-")
    )
    if not matches:
        raise FileNotFoundError(f"no calico-node DaemonSet fixture for Calico {version} in {base}")
    return matches[-1]


def revision_hash(template: Mapping[str, Any]) -> str:
    """A controller-revision-hash for a pod template, shaped like the DaemonSet controller's.

    The controller hashes the template with FNV-32a and encodes the decimal digits with
    rand.SafeEncodeString; the input here is the template's canonical JSON.
    """
    digest = 0x811C9DC5
    for byte in json.dumps(template, sort_keys=True, separators=(",", ":")).encode():
        digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(_SAFE_ALPHABET[ord(ch) % len(_SAFE_ALPHABET)] for ch in str(digest))


def _load_daemonset(source: Path | str | Mapping[str, Any]) -> JsonDict:
    if isinstance(source, Mapping):
        return cast(JsonDict, json.loads(json.dumps(source)))
    if isinstance(source, Path) or "\n" not in source:
        text = Path(source).read_text(encoding="utf-8")
    else:
        text = source
    docs = [d for d in yaml.safe_load_all(text) if d]
    daemonsets = [d for d in docs if isinstance(d, dict) and d.get("kind") == "DaemonSet"]
    if len(daemonsets) != 1:
        raise ValueError(
            f"expected exactly one DaemonSet in {source!s:.80}, found {len(daemonsets)}"
        )
    return cast(JsonDict, daemonsets[0])


def _env_entry(name: str, value: EnvValue) -> JsonDict:
    if isinstance(value, str):
        return {"name": name, "value": value}
    assert value is not None
    body = dict(value)
    if "value" in body or "valueFrom" in body:
        return {"name": name, **body}
    return {"name": name, "valueFrom": body}


def _apply_env(template: JsonDict, container: str, env: Mapping[str, EnvValue]) -> JsonDict:
    """A copy of `template` with env entries set (in place when present), appended or removed."""
    result = cast(JsonDict, json.loads(json.dumps(template)))
    target = next(
        (c for c in result["spec"].get("containers") or [] if c.get("name") == container), None
    )
    if target is None:
        raise ValueError(f"the DaemonSet template has no container {container!r}")
    entries: list[JsonDict] = list(target.get("env") or [])
    for name, value in env.items():
        index = next((n for n, e in enumerate(entries) if e.get("name") == name), None)
        if value is None:
            if index is not None:
                del entries[index]
        elif index is not None:
            entries[index] = _env_entry(name, value)
        else:
            entries.append(_env_entry(name, value))
    target["env"] = entries
    return result


def _calico_version(template: Mapping[str, Any]) -> str:
    for container in template.get("spec", {}).get("containers") or []:
        image = str(container.get("image") or "")
        if "calico/node:" in image:
            return image.rsplit(":", 1)[1]
    return "unknown"


def _owner(api_version: str, kind: str, name: str, uid: str) -> JsonDict:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _node_object(spec: NodeSpec, kubelet_version: str) -> JsonDict:
    labels = {
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
    }
    labels.update(spec.labels)
    addresses: list[JsonDict] = []
    if spec.address is not None:
        addresses.append({"type": spec.address_type, "address": spec.address})
    addresses.extend({"type": t, "address": a} for t, a in spec.extra_addresses)
    addresses.append({"type": "Hostname", "address": spec.name})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels,
                     **({"annotations": dict(spec.annotations)} if spec.annotations else {})},
        "spec": {},
        "status": {
            "addresses": addresses,
            "conditions": [
                _condition("MemoryPressure", False, "KubeletHasSufficientMemory"),
                _condition("DiskPressure", False, "KubeletHasNoDiskPressure"),
                _condition("PIDPressure", False, "KubeletHasSufficientPID"),
                _condition(
                    "Ready",
                    spec.ready,
                    "KubeletReady" if spec.ready else "NodeStatusUnknown",
                    "kubelet is posting ready status"
                    if spec.ready
                    else "Kubelet stopped posting node status.",
                ),
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"boot.{spec.name}")),
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, f"machine.{spec.name}").hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"system.{spec.name}")),
                "containerRuntimeVersion": "containerd://1.7.27",
                "kernelVersion": "6.8.0-60-generic",
                "kubeProxyVersion": kubelet_version,
                "kubeletVersion": kubelet_version,
                "operatingSystem": "linux",
                "osImage": "Ubuntu 24.04.2 LTS",
            },
        },
    }


_STAMP = "2026-01-01T00:00:00Z"


def _condition(kind: str, status: bool, reason: str, message: str = "") -> JsonDict:
    condition: JsonDict = {
        "type": kind,
        "status": "True" if status else "False",
        "lastHeartbeatTime": _STAMP,
        "lastTransitionTime": _STAMP,
        "reason": reason,
    }
    if message:
        condition["message"] = message
    return condition


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def _selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass
class _Revision:
    hash: str
    number: int
    template: JsonDict


class ClusterHandle:
    """A built Calico cluster: its emulator plus the controller moves tests need."""

    def __init__(
        self,
        emu: KubeEmulator,
        *,
        install: Literal["manifest", "operator"],
        namespace: str,
        daemonset: str,
        container: str,
        calico_version: str,
        base_template: JsonDict,
        render_env: Mapping[str, EnvValue],
        pod_detail: Literal["full", "minimal"],
        seed: int,
    ) -> None:
        self.emu = emu
        self.install = install
        self.namespace = namespace
        self.daemonset = daemonset
        self.container = container
        self.calico_version = calico_version
        self.nodes: list[NodeSpec] = []  # as built (and added); readiness changes are not mirrored
        self.revisions: list[_Revision] = []
        self._base_template = base_template
        self._render_env = dict(render_env)  # the env the (simulated) operator renders
        self._pod_detail = pod_detail
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._unsubscribe: Callable[[], None] | None = None
        self._halt = threading.Event()
        self._rolling: threading.Thread | None = None
        self._names: set[str] | None = None  # pod names handed out, to keep them unique

    # --- reading -------------------------------------------------------------------------------

    @property
    def current_revision(self) -> str:
        """The controller-revision-hash of the newest template revision."""
        return self.revisions[-1].hash

    @property
    def old_revision(self) -> str | None:
        """The hash of the revision before the current one."""
        return self.revisions[-2].hash if len(self.revisions) > 1 else None

    def daemonset_object(self) -> JsonDict:
        obj = self.emu.get_object("apps/v1", "DaemonSet", self.daemonset, self.namespace)
        if obj is None:
            raise KeyError(f"DaemonSet {self.namespace}/{self.daemonset} is gone")
        return obj

    def pods(self) -> list[JsonDict]:
        """Copies of the DaemonSet's pods."""
        return [json.loads(json.dumps(p)) for p in self._owned_pods()]

    def pod_on(self, node_name: str) -> JsonDict | None:
        return next(
            (json.loads(json.dumps(p)) for p in self._owned_pods() if _pod_node(p) == node_name),
            None,
        )

    def _owned_pods(self) -> Iterator[JsonDict]:
        uid = self._ds_uid()
        for pod in self.emu.list_objects("v1", "Pod", self.namespace, copy=False):
            owners = pod["metadata"].get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                yield pod

    def _ds_uid(self) -> str:
        stored = self.emu.list_objects("apps/v1", "DaemonSet", self.namespace, copy=False)
        for ds in stored:
            if ds["metadata"]["name"] == self.daemonset:
                return str(ds["metadata"]["uid"])
        raise KeyError(f"DaemonSet {self.namespace}/{self.daemonset} is gone")

    # --- pods ----------------------------------------------------------------------------------

    def roll_pod(self, node_name: str, *, ready: bool | None = None) -> str:
        """Replace the node's calico-node pod with one on the current revision; its new name.

        The pod is ready when its node is, unless `ready` says otherwise.
        """
        with self._lock:
            name = self._replace_pod(node_name, self.revisions[-1], ready, self._pod_map())
            self.refresh_status()
        return name

    def roll_all(self, *, only_old: bool = True) -> list[str]:
        """Roll every pod (only those not on the current revision when `only_old`)."""
        with self._lock:
            current = self.current_revision
            pods = self._pod_map()
            names: list[str] = []
            for node, pod in list(pods.items()):
                labels = pod["metadata"].get("labels") or {}
                if only_old and labels.get("controller-revision-hash") == current:
                    continue
                names.append(self._replace_pod(node, self.revisions[-1], None, pods))
            self.refresh_status()
        return names

    def remove_pod(self, node_name: str) -> bool:
        """Delete the node's calico-node pod (a node the DaemonSet has not reached)."""
        with self._lock:
            pod = next((p for p in self._owned_pods() if _pod_node(p) == node_name), None)
            if pod is None:
                return False
            self.emu.delete_object("v1", "Pod", pod["metadata"]["name"], self.namespace)
            self.refresh_status()
        return True

    def add_pod(
        self, node_name: str, revision: PodRevision = "current", *, ready: bool | None = None
    ) -> str:
        """Put a calico-node pod on a node (replacing any), on the current or old revision."""
        with self._lock:
            chosen = self.revisions[-1] if revision == "current" else self.revisions[-2]
            name = self._replace_pod(node_name, chosen, ready, self._pod_map())
            self.refresh_status()
        return name

    def set_node_ready(self, node_name: str, ready: bool, *, pod_ready: bool | None = None) -> None:
        """Flip a node's Ready condition; its calico-node pod follows unless `pod_ready` is set."""
        with self._lock:
            node = self.emu.get_object("v1", "Node", node_name)
            if node is None:
                raise KeyError(f"no node {node_name}")
            for condition in node["status"]["conditions"]:
                if condition["type"] == "Ready":
                    condition["status"] = "True" if ready else "False"
                    condition["reason"] = "KubeletReady" if ready else "NodeStatusUnknown"
            self.emu.replace(node)
            self._set_pod_ready(node_name, ready if pod_ready is None else pod_ready)
            self.refresh_status()

    def set_pod_ready(self, node_name: str, ready: bool) -> None:
        with self._lock:
            self._set_pod_ready(node_name, ready)
            self.refresh_status()

    def add_node(self, spec: NodeSpec) -> None:
        """Add a node (and, per `spec.pod_revision`, its calico-node pod)."""
        with self._lock:
            self.emu.add(_node_object(spec, self.emu.kubernetes_version), copy=False)
            self.nodes.append(spec)
            if spec.pod_revision is not None:
                chosen = (
                    self.revisions[-1] if spec.pod_revision == "current" else self.revisions[-2]
                )
                self._replace_pod(spec.name, chosen, spec.pod_ready, self._pod_map())
            self.refresh_status()

    # --- template changes and controllers ------------------------------------------------------

    def update_env(self, env: Mapping[str, EnvValue], *, roll: bool = False) -> str:
        """Change the container env as `kubectl set env` would; returns the new revision hash.

        The DaemonSet controller's part follows at once (new ControllerRevision, observed
        generation); pods stay on their revision unless `roll`.
        """
        with self._lock:
            ds = self.daemonset_object()
            ds["spec"]["template"] = _apply_env(ds["spec"]["template"], self.container, env)
            self.emu.replace(ds)
            new_hash = self.reconcile()
            if roll:
                self.roll_all()
        return new_hash

    def reconcile(self) -> str:
        """One DaemonSet-controller pass: a ControllerRevision for the stored template (when it
        is new), observedGeneration = generation, status recounted. Returns the current hash."""
        with self._lock:
            ds = self.daemonset_object()
            template = ds["spec"]["template"]
            known = next((r for r in self.revisions if r.template == template), None)
            if known is None:
                known = _Revision(revision_hash(template), self.revisions[-1].number + 1, template)
                self.emu.add(self._revision_object(ds, known), copy=False)
                self.revisions.append(known)
            elif known is not self.revisions[-1]:
                # back to an earlier template: the controller re-numbers that revision newest
                self.revisions.remove(known)
                known.number = self.revisions[-1].number + 1
                self.revisions.append(known)
                self.emu.patch_object(
                    "apps/v1",
                    "ControllerRevision",
                    f"{self.daemonset}-{known.hash}",
                    {"revision": known.number},
                    namespace=self.namespace,
                )
            self.refresh_status(observe=True)
            return known.hash

    def refresh_status(self, *, observe: bool = False) -> JsonDict:
        """Recount the DaemonSet status from the stored nodes and pods and store it."""
        with self._lock:
            ds = self.daemonset_object()
            template = ds["spec"]["template"]
            selector = template["spec"].get("nodeSelector") or {}
            desired = {
                n["metadata"]["name"]
                for n in self.emu.list_objects("v1", "Node", copy=False)
                if _selector_matches(selector, n["metadata"].get("labels") or {})
            }
            pods = list(self._owned_pods())
            scheduled = [p for p in pods if _pod_node(p) in desired]
            current = self.current_revision
            updated = sum(
                1
                for p in scheduled
                if (p["metadata"].get("labels") or {}).get("controller-revision-hash") == current
            )
            ready = sum(1 for p in scheduled if _pod_ready(p))
            generation = int(ds["metadata"].get("generation") or 1)
            observed = generation if observe else (ds.get("status") or {}).get("observedGeneration")
            status: JsonDict = {
                "currentNumberScheduled": len(scheduled),
                "numberMisscheduled": len(pods) - len(scheduled),
                "desiredNumberScheduled": len(desired),
                "numberReady": ready,
            }
            # the apiserver omits these when zero (omitempty)
            if observed:
                status["observedGeneration"] = observed
            if updated:
                status["updatedNumberScheduled"] = updated
            if ready:
                status["numberAvailable"] = ready
            if len(desired) - ready > 0:
                status["numberUnavailable"] = len(desired) - ready
            if ds.get("status") != status:
                ds["status"] = status
                self.emu.replace(ds)
            return status

    def simulate_controllers(self, *, auto_roll: bool = True, roll_delay: float = 0.0) -> None:
        """React to API writes as the cluster's controllers would.

        A DaemonSet template change gets a controller pass (new revision, observedGeneration)
        and, with `auto_roll`, a rollout one pod at a time, `roll_delay` seconds apart (in a
        background thread when > 0). For operator installs the simulated tigera operator also
        reverts manual edits of the DaemonSet template and re-renders the metrics env vars when
        the Installation's spec.nodeMetricsPort changes.
        """
        self.stop_controllers()
        self._halt.clear()

        def on_change(change: Change) -> None:
            kind = change.resource.kind
            meta = change.object["metadata"]
            if self.install == "operator" and kind == "Installation" and meta["name"] == "default":
                if change.type != "DELETED":
                    self._render_operator(change.object)
                return
            if kind != "DaemonSet" or change.type != "MODIFIED":
                return
            if meta["name"] != self.daemonset or meta.get("namespace") != self.namespace:
                return
            old = change.old or {}
            if old.get("spec") == change.object.get("spec"):
                return
            if self.install == "operator" and self._render_operator(None):
                return  # the operator's own write comes back through this callback
            self.reconcile()
            if auto_roll:
                self._start_rollout(roll_delay)

        self._unsubscribe = self.emu.on_change(on_change)

    def stop_controllers(self) -> None:
        self._halt.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        rolling, self._rolling = self._rolling, None
        if rolling is not None:
            rolling.join(timeout=5)

    def wait_rollout(self, timeout: float = 10.0) -> bool:
        """Wait for a background rollout started by the simulated controller to finish."""
        rolling = self._rolling
        if rolling is None:
            return True
        rolling.join(timeout)
        return not rolling.is_alive()

    # --- internals -----------------------------------------------------------------------------

    def _render_operator(self, installation: Mapping[str, Any] | None) -> bool:
        """Make the DaemonSet template what the operator renders; True when it had to write."""
        with self._lock:
            if installation is None:
                installation = self.emu.get_object(_INSTALLATION_API, "Installation", "default")
            port = ((installation or {}).get("spec") or {}).get("nodeMetricsPort")
            wanted_env: dict[str, EnvValue] = {_ENABLED: None, _PORT: None}
            if port:
                wanted_env = {_ENABLED: "true", _PORT: str(port)}
            wanted_env.update(self._render_env)
            rendered = _apply_env(self._base_template, self.container, wanted_env)
            ds = self.daemonset_object()
            if ds["spec"]["template"] == rendered:
                return False
            ds["spec"]["template"] = rendered
            self.emu.replace(ds)
            return True

    def _start_rollout(self, delay: float) -> None:
        if delay <= 0:
            self.roll_all()
            return

        def rollout() -> None:
            while not self._halt.is_set():
                with self._lock:
                    current = self.current_revision
                    stale = next(
                        (
                            p
                            for p in self._owned_pods()
                            if (p["metadata"].get("labels") or {}).get("controller-revision-hash")
                            != current
                        ),
                        None,
                    )
                    if stale is None:
                        return
                    node = _pod_node(stale)
                    if node is not None:
                        self.roll_pod(node)
                if self._halt.wait(delay):
                    return

        previous = self._rolling
        if previous is not None and previous.is_alive():
            return  # that thread picks up the newest revision itself
        self._rolling = threading.Thread(target=rollout, name="calico-node-rollout", daemon=True)
        self._rolling.start()

    def _set_pod_ready(self, node_name: str, ready: bool) -> None:
        pod = next((p for p in self._owned_pods() if _pod_node(p) == node_name), None)
        if pod is None:
            return
        status = json.loads(json.dumps(pod["status"]))
        for condition in status["conditions"]:
            if condition["type"] in ("Ready", "ContainersReady"):
                condition["status"] = "True" if ready else "False"
        for container in status.get("containerStatuses") or []:
            container["ready"] = ready
        self.emu.patch_object(
            "v1", "Pod", pod["metadata"]["name"], {"status": status}, namespace=self.namespace
        )

    def _pod_map(self) -> dict[str, JsonDict]:
        return {node: p for p in self._owned_pods() if (node := _pod_node(p)) is not None}

    def _replace_pod(
        self,
        node_name: str,
        revision: _Revision,
        ready: bool | None,
        pods: dict[str, JsonDict],
    ) -> str:
        """Swap the node's pod for a new one on `revision`; keeps `pods` (node -> pod) current."""
        node = self.emu.get_object("v1", "Node", node_name)
        if node is None:
            raise KeyError(f"no node {node_name}")
        old = pods.pop(node_name, None)
        if old is not None:
            self.emu.delete_object("v1", "Pod", old["metadata"]["name"], self.namespace)
        node_ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in node["status"].get("conditions") or []
        )
        pod = self._pod_object(node, revision, node_ready if ready is None else ready)
        pods[node_name] = self.emu.add(pod, copy=False)
        return str(pod["metadata"]["name"])

    def _pod_name(self) -> str:
        if self._names is None:
            pods = self.emu.list_objects("v1", "Pod", self.namespace, copy=False)
            self._names = {p["metadata"]["name"] for p in pods}
        while True:
            suffix = "".join(self._rng.choice(_SAFE_ALPHABET) for _ in range(5))
            name = f"{self.daemonset}-{suffix}"
            if name not in self._names:
                self._names.add(name)
                return name

    def _pod_object(self, node: Mapping[str, Any], revision: _Revision, ready: bool) -> JsonDict:
        ds_uid = self._ds_uid()
        node_name = node["metadata"]["name"]
        address = next(
            (
                a["address"]
                for a in node["status"].get("addresses") or []
                if a["type"] != "Hostname"
            ),
            None,
        )
        template = revision.template
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels["controller-revision-hash"] = revision.hash
        labels["pod-template-generation"] = str(revision.number)
        if self._pod_detail == "full":
            spec: JsonDict = dict(template["spec"])
        else:
            # Small, but with what decides Felix's configuration: env, mounts and volumes.
            keep = ("name", "image", "env", "envFrom", "volumeMounts")
            spec = {
                "hostNetwork": template["spec"].get("hostNetwork", False),
                "containers": [
                    {k: c[k] for k in keep if k in c}
                    for c in template["spec"].get("containers") or []
                ],
                "volumes": template["spec"].get("volumes") or [],
            }
        spec["nodeName"] = node_name
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [node_name]}
                            ]
                        }
                    ]
                }
            }
        }
        flag = "True" if ready else "False"
        containers = template["spec"].get("containers") or []
        status: JsonDict = {
            "phase": "Running",
            "conditions": [
                {
                    "type": "PodReadyToStartContainers",
                    "status": "True",
                    "lastTransitionTime": _STAMP,
                },
                {"type": "Initialized", "status": "True", "lastTransitionTime": _STAMP},
                {"type": "Ready", "status": flag, "lastTransitionTime": _STAMP},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": _STAMP},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": _STAMP},
            ],
            "hostIP": address,
            "podIP": address,
            "startTime": _STAMP,
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c.get("image"),
                    "imageID": "",
                    "containerID": f"containerd://{self._rng.getrandbits(128):032x}",
                    "ready": ready,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": _STAMP}},
                }
                for c in containers
            ],
            "qosClass": "Burstable",
        }
        if address is None:
            del status["hostIP"], status["podIP"]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self._pod_name(),
                "generateName": f"{self.daemonset}-",
                "namespace": self.namespace,
                "labels": labels,
                "ownerReferences": [_owner("apps/v1", "DaemonSet", self.daemonset, ds_uid)],
            },
            "spec": spec,
            "status": status,
        }

    def _revision_object(self, ds: Mapping[str, Any], revision: _Revision) -> JsonDict:
        labels = dict(revision.template.get("metadata", {}).get("labels") or {})
        labels["controller-revision-hash"] = revision.hash
        return {
            "apiVersion": "apps/v1",
            "kind": "ControllerRevision",
            "metadata": {
                "name": f"{self.daemonset}-{revision.hash}",
                "namespace": self.namespace,
                "labels": labels,
                "ownerReferences": [
                    _owner("apps/v1", "DaemonSet", self.daemonset, ds["metadata"]["uid"])
                ],
            },
            "data": {"spec": {"template": {**revision.template, "$patch": "replace"}}},
            "revision": revision.number,
        }


def _pod_node(pod: Mapping[str, Any]) -> str | None:
    node = (pod.get("spec") or {}).get("nodeName")
    return str(node) if node else None


def build_calico_cluster(
    emu: KubeEmulator,
    *,
    daemonset_yaml: Path | str | Mapping[str, Any],
    nodes: Sequence[NodeSpec],
    install: Literal["manifest", "operator"] = "manifest",
    env: Mapping[str, EnvValue] | None = None,
    old_env: Mapping[str, EnvValue] | None = None,
    felix_crd: bool = True,
    felix_api: str = _FELIX_API,
    felix_configs: Sequence[Mapping[str, Any]] = (),
    default_felix_config: bool = True,
    node_metrics_port: int | None = None,
    configmaps: Sequence[Mapping[str, Any]] = (),
    secrets: Sequence[Mapping[str, Any]] = (),
    objects: Sequence[Mapping[str, Any]] = (),
    calico_config: bool = True,
    pod_detail: Literal["full", "minimal"] = "full",
    container: str = "calico-node",
    seed: int = 0,
) -> ClusterHandle:
    """Store a Calico cluster in `emu` and return the handle that controls it.

    `daemonset_yaml`: one of tests/fixtures/calico/*-calico-daemonset-calico-node.yaml (a path,
    the YAML text, or the parsed object); the DaemonSet is stored unmodified except for `env`
    (entries set in place or appended on `container`), the operator's changes, and status.
    `old_env` is applied to the fixture template to make the old revision (revision 1) that
    pods with `pod_revision="old"` run; when it yields the current template the old one gets a
    distinguishing annotation. `felix_configs` are FelixConfiguration objects (apiVersion/kind
    may be omitted); with `felix_crd` and `default_felix_config` a `default` one as calico-node
    creates it is added unless given; `felix_api` is the group/version that serves them
    (`projectcalico.org/v3` for a cluster on Calico's native v3 CRDs). ConfigMaps/Secrets
    without a namespace go to the DaemonSet's namespace. `pod_detail="minimal"` keeps pod
    specs small for huge clusters.
    """
    if node_metrics_port is not None and install != "operator":
        raise ValueError("node_metrics_port is an operator Installation setting")
    ds = _load_daemonset(daemonset_yaml)
    name = ds["metadata"]["name"]
    base_template: JsonDict = ds["spec"]["template"]
    namespace = (
        _OPERATOR_NAMESPACE
        if install == "operator"
        else ds["metadata"].get("namespace") or "kube-system"
    )

    operator_env: dict[str, EnvValue] = {}
    if node_metrics_port is not None:
        operator_env = {_ENABLED: "true", _PORT: str(node_metrics_port)}
    rendered_env = {**operator_env, **(env or {})}
    template = _apply_env(base_template, container, rendered_env) if rendered_env else base_template

    old_template = _apply_env(base_template, container, old_env or {})
    if old_template == template:
        annotations = old_template.setdefault("metadata", {}).setdefault("annotations", {})
        annotations["kubectl.kubernetes.io/restartedAt"] = "2025-12-01T00:00:00Z"

    if install == "operator":
        emu.register_operator_crds()
        for ns in ("tigera-operator", _OPERATOR_NAMESPACE):
            if emu.get_object("v1", "Namespace", ns) is None:
                emu.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        installation_spec: JsonDict = {"variant": "Calico"}
        if node_metrics_port is not None:
            installation_spec["nodeMetricsPort"] = node_metrics_port
        installation = emu.add(
            {
                "apiVersion": _INSTALLATION_API,
                "kind": "Installation",
                "metadata": {"name": "default"},
                "spec": installation_spec,
                "status": {"variant": "Calico", "calicoVersion": _calico_version(template)},
            }
        )
        ds["metadata"]["namespace"] = namespace
        ds["metadata"]["ownerReferences"] = [
            _owner(_INSTALLATION_API, "Installation", "default", installation["metadata"]["uid"])
        ]
    else:
        ds["metadata"]["namespace"] = namespace

    if calico_config and not any(
        c.get("metadata", {}).get("name") == "calico-config" for c in configmaps
    ):
        emu.add(_calico_config(namespace))
    for kind, group in (("ConfigMap", configmaps), ("Secret", secrets)):
        for obj in group:
            stored = json.loads(json.dumps(obj))
            stored.setdefault("apiVersion", "v1")
            stored.setdefault("kind", kind)
            stored.setdefault("metadata", {}).setdefault("namespace", namespace)
            emu.add(stored)
    for obj in objects:
        emu.add(obj)

    if felix_crd:
        emu.register_calico_crds(felix_api)
        configs = [dict(c) for c in felix_configs]
        if default_felix_config and not any(
            c.get("metadata", {}).get("name") == "default" for c in configs
        ):
            configs.insert(0, {**_default_felix_config(), "apiVersion": felix_api})
        for config in configs:
            config.setdefault("apiVersion", felix_api)
            config.setdefault("kind", "FelixConfiguration")
            emu.add(config)
    elif felix_configs:
        raise ValueError("felix_configs need felix_crd=True")

    for spec in nodes:
        emu.add(_node_object(spec, emu.kubernetes_version), copy=False)

    ds["spec"]["template"] = template
    ds["metadata"]["generation"] = 2  # revision 2 is current: the template changed once
    ds_stored = emu.add(ds)

    handle = ClusterHandle(
        emu,
        install=install,
        namespace=namespace,
        daemonset=name,
        container=container,
        calico_version=_calico_version(template),
        base_template=base_template,
        render_env=env or {},
        pod_detail=pod_detail,
        seed=seed,
    )
    old_revision = _Revision(revision_hash(old_template), 1, old_template)
    current_revision = _Revision(revision_hash(template), 2, ds_stored["spec"]["template"])
    handle.revisions = [old_revision, current_revision]
    handle.nodes = list(nodes)
    for revision in handle.revisions:
        emu.add(handle._revision_object(ds_stored, revision), copy=False)
    for spec in nodes:
        if spec.pod_revision is None:
            continue
        chosen = current_revision if spec.pod_revision == "current" else old_revision
        ready = spec.ready if spec.pod_ready is None else spec.pod_ready
        node = {
            "metadata": {"name": spec.name},
            "status": {"addresses": _node_object(spec, "")["status"]["addresses"]},
        }
        emu.add(handle._pod_object(node, chosen, ready), copy=False)
    handle.refresh_status(observe=True)
    return handle


def _calico_config(namespace: str) -> JsonDict:
    cni = {
        "name": "k8s-pod-network",
        "cniVersion": "0.3.1",
        "plugins": [
            {
                "type": "calico",
                "log_level": "info",
                "datastore_type": "kubernetes",
                "nodename": "__KUBERNETES_NODE_NAME__",
                "mtu": "__CNI_MTU__",
                "ipam": {"type": "calico-ipam"},
                "policy": {"type": "k8s"},
                "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__"},
            },
            {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "calico-config", "namespace": namespace},
        "data": {
            "typha_service_name": "none",
            "calico_backend": "bird",
            "veth_mtu": "0",
            "cni_network_config": json.dumps(cni, indent=2),
        },
    }


def _default_felix_config() -> JsonDict:
    # what calico-node writes on first start
    return {
        "apiVersion": _FELIX_API,
        "kind": "FelixConfiguration",
        "metadata": {"name": "default"},
        "spec": {
            "bpfConnectTimeLoadBalancing": "TCP",
            "bpfHostNetworkedNATWithoutCTLB": "Enabled",
            "bpfLogLevel": "",
            "floatingIPs": "Disabled",
            "logSeverityScreen": "Info",
            "reportingInterval": "0s",
        },
    }
