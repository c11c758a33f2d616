"""Typha and calico-kube-controllers in an emulated Calico cluster, with their controllers.

`add_typha` and `add_kube_controllers` store a component's real release Deployment
(tests/fixtures/calico/*-calico-typha-deployment-calico-typha.yaml,
*-calico-deployment-calico-kube-controllers.yaml) in a cluster made by
`scanner.emulator.fleet.build_calico_cluster`, with its pods, Deployment status and (for
kube-controllers) the KubeControllersConfiguration CRD and its `default` object. The returned
`ComponentHandle` plays the Deployment controller, kube-controllers' own restart on a
configuration change and (operator installs) the tigera operator's render of Typha, and keeps a
real listener on every address where the component would serve its metrics:

- Typha (host network, `hostNetwork: true`): on the InternalIP of every node one of its pods
  runs on, port `PrometheusMetricsPort` (9093), serving `typha_*` metrics, when Typha's own
  configuration says so. That is decided here, independently of the scanner, from the pod's
  spec as Typha reads it at start (typha/pkg/config: `typha_` env in any case, the rest
  lower-cased; /etc/calico/typha.cfg through gopkg.in/ini.v1; `Config.resolve`, whose source
  lookup by raw name lets a config-file key spelled other than `PrometheusMetricsEnabled`
  override the environment; `none` is the zero value, an invalid value the default).
- kube-controllers (pod network): on its pod IP, port KubeControllersConfiguration `default`
  spec.prometheusMetricsPort (absent: 0, off), serving `ipam_*` metrics
  (kube-controllers/pkg/kubecontrollers/run.go: `if runCfg.PrometheusPort != 0`). When
  `default` does not exist kube-controllers creates it with 9094 (`getOrCreateSnapshot`, the
  client's `validateAndFillDefaults`) the next time it starts; until then it serves 9094.

A component's process reads its configuration when its pod (re)starts, as the real ones do: a
ConfigMap edited under a running Typha changes nothing until its pod is replaced.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from scanner.emulator.apiserver import Change, JsonDict, KubeEmulator
from scanner.emulator.fleet import (
    _SAFE_ALPHABET,
    ClusterHandle,
    EnvValue,
    _apply_env,
    _owner,
    revision_hash,
)
from scanner.emulator.nodes import NodeFleet

__all__ = [
    "KCC_API",
    "Component",
    "ComponentHandle",
    "KccPort",
    "Serving",
    "add_kube_controllers",
    "add_typha",
    "find_component_fixture",
    "kcc_crd_fixture",
    "typha_serving",
]

Component = Literal["typha", "kube-controllers"]
KccPort = int | None | Literal["missing"]
"""KubeControllersConfiguration `default`'s spec.prometheusMetricsPort: a number (0 = off),
None (the field is absent: off), or "missing" (no `default` object at all)."""

KCC_API = "crd.projectcalico.org/v1"
TYPHA_CONFIG_FILE = "/etc/calico/typha.cfg"  # typha/pkg/daemon/daemon.go
TYPHA_PORT = 9093
KUBE_CONTROLLERS_PORT = 9094
_OPERATOR_NAMESPACE = "calico-system"
_INSTALLATION_API = "operator.tigera.io/v1"
_TYPHA_ENABLED = "TYPHA_PROMETHEUSMETRICSENABLED"
_TYPHA_PORT = "TYPHA_PROMETHEUSMETRICSPORT"
_STAMP = "2026-01-01T00:00:00Z"
# The releases the package ships (as fleet.py's calico-node DaemonSets); the tests hold every
# release in tests/fixtures/calico.
_DATA = Path(__file__).resolve().parent / "data"
_KIND_PATTERNS = {
    "typha": "{v}-calico-typha-deployment-calico-typha.yaml",
    "kube-controllers": "{v}-calico-deployment-calico-kube-controllers.yaml",
}


def find_component_fixture(component: Component, version: str, *,
                           folder: Path | None = None) -> Path:
    """The release Deployment of `component` for a Calico version (`v3.32.1`), from `folder`
    (default: this package's `data`, which ships v3.30.7 and v3.32.1)."""
    wanted = version if version.startswith("v") else f"v{version}"
    path = (folder or _DATA) / _KIND_PATTERNS[component].format(v=wanted)
    if not path.is_file():
        raise FileNotFoundError(f"no {component} Deployment fixture for Calico {version}: {path}")
    return path


def kcc_crd_fixture(folder: Path | None = None) -> Path:
    """The KubeControllersConfiguration CRD of crd.projectcalico.org (v3.32.1 manifests)."""
    return (folder or _DATA) / \
        "v3.32.1-crd-kubecontrollersconfigurations.crd.projectcalico.org.yaml"


# --- what the component would serve ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Serving:
    """What one pod's process serves, as it read its configuration when it started."""

    enabled: bool
    port: int  # the declared port (also when disabled: where a probe would aim)
    host: str = ""  # PrometheusMetricsHost ("" = every interface)
    tls: bool = False
    source: str = ""  # what decided `enabled`, for messages

    def listens_on(self, address: str) -> bool:
        """Whether a connection to address:port reaches the metrics server."""
        return self.enabled and self.port != 0 and self.host in ("", address)


_TYPHA_PARAMS = {p.lower(): p for p in (
    "PrometheusMetricsEnabled", "PrometheusMetricsPort", "PrometheusMetricsHost",
    "PrometheusMetricsCertFile", "PrometheusMetricsKeyFile")}
_HOST_RE = re.compile(r"^[a-zA-Z0-9:._+-]{1,64}$")


def _typha_parse(param: str, raw: str) -> object:
    """One raw value as Typha's param types parse it (typha/pkg/config/param_types.go), the
    zero value for `none`, the default when it does not parse."""
    defaults: dict[str, object] = {"PrometheusMetricsEnabled": False,
                                   "PrometheusMetricsPort": TYPHA_PORT}
    if raw.lower() == "none":
        return {"PrometheusMetricsEnabled": False, "PrometheusMetricsPort": 0}.get(param, "")
    if param == "PrometheusMetricsEnabled":
        low = raw.lower()
        if low in ("true", "1", "yes", "y", "t"):
            return True
        if low in ("false", "0", "no", "n", "f"):
            return False
        return defaults[param]
    if param == "PrometheusMetricsPort":
        try:
            value = int(raw, 0) if raw.strip() == raw else None
        except ValueError:
            value = None
        return value if value is not None and 0 <= value <= 65535 else defaults[param]
    if param == "PrometheusMetricsHost":
        return raw if _HOST_RE.match(raw) else ""
    return raw if "\n" not in raw else ""


def typha_serving(environ: Sequence[tuple[str, str]], config_file: Mapping[str, str] | None, *,
                  version: tuple[int, int, int] | None = None) -> Serving:
    """What Typha serves, from its environment (name, value in order) and the keys of its
    config file, by typha/pkg/config's `LoadConfigFromEnvironment`, `UpdateFrom` (empty values
    dropped) and `resolve` (sources highest first; the current source of a parameter is looked
    up by the *raw* name and recorded under the canonical one)."""
    env: dict[str, str] = {}
    for name, value in environ:
        low = name.lower()
        if low.startswith("typha_"):
            env[low.split("_", 1)[1]] = value
    sources = [("env", {k: v for k, v in env.items() if v != ""}),
               ("config file", {k: v for k, v in (config_file or {}).items() if v != ""})]
    rank = {"env": 4, "config file": 3}
    name_to_source: dict[str, int] = {}
    values: dict[str, object] = {}
    decided: dict[str, str] = {}
    for source, raw_config in sources:
        for raw_name, raw_value in raw_config.items():
            param = _TYPHA_PARAMS.get(raw_name.lower())
            if param is None:
                continue
            current = name_to_source.get(raw_name, 0)
            parsed = _typha_parse(param, raw_value)
            if rank[source] < current:
                continue
            values[param] = parsed
            name_to_source[param] = rank[source]
            decided[param] = f"{source} {raw_name}={raw_value}"
    tls_params = version is None or version >= (3, 32)
    cert = values.get("PrometheusMetricsCertFile") or values.get("PrometheusMetricsKeyFile")
    return Serving(enabled=bool(values.get("PrometheusMetricsEnabled", False)),
                   port=int(cast(int, values.get("PrometheusMetricsPort", TYPHA_PORT))),
                   host=str(values.get("PrometheusMetricsHost", "")),
                   tls=bool(cert) and tls_params,
                   source=decided.get("PrometheusMetricsEnabled", "default (false)"))


def _ini(text: str) -> dict[str, str]:
    """A config file's keys as gopkg.in/ini.v1 gives them to Typha, every section merged
    (the plain forms: `key = value`, `key: value`, comments, quotes)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or (line.startswith("[") and line.endswith("]")):
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut <= 0:
            continue
        key, value = line[:cut].strip(), line[cut + 1:].strip()
        for mark in (" #", " ;"):
            if mark in value and not value.startswith(('"', "'", "`")):
                value = value.split(mark, 1)[0].rstrip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'`":
            value = value[1:-1]
        out[key] = value
    return out


def _typha_config_path(container: Mapping[str, Any]) -> str:
    """`--config-file` / `-c` on Typha's command line, else /etc/calico/typha.cfg."""
    words = [str(w) for w in [*(container.get("command") or []), *(container.get("args") or [])]]
    path = TYPHA_CONFIG_FILE
    for i, word in enumerate(words):
        if word in ("--config-file", "-c") and i + 1 < len(words):
            path = words[i + 1]
        elif word.startswith("--config-file="):
            path = word.split("=", 1)[1]
    return path


def _image_version(image: str | None) -> tuple[int, int, int] | None:
    match = re.search(r":v(\d+)\.(\d+)\.(\d+)", image or "")
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


class _Kubelet:
    """What the kubelet hands a container: its environment and mounted files."""

    def __init__(self, emu: KubeEmulator, namespace: str) -> None:
        self.emu = emu
        self.namespace = namespace

    def data(self, kind: str, name: str) -> dict[str, str] | None:
        obj = self.emu.get_object("v1", kind, name, self.namespace)
        if obj is None:
            return None
        data = obj.get("data") or {}
        if kind == "Secret":
            out = {}
            for k, v in data.items():
                try:
                    out[k] = base64.b64decode(str(v)).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError):
                    continue
            return out
        return {str(k): str(v) for k, v in data.items()}

    def environ(self, container: Mapping[str, Any]) -> list[tuple[str, str]]:
        """envFrom first, then env (later entries win); `$(VAR)` expanded; references read."""
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            prefix = str(src.get("prefix") or "")
            for ref_kind, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                ref = src.get(ref_kind)
                if isinstance(ref, dict):
                    for key, value in (self.data(kind, str(ref.get("name"))) or {}).items():
                        env[prefix + key] = value
        for entry in container.get("env") or []:
            name = str(entry.get("name"))
            if "valueFrom" not in entry:
                env.pop(name, None)
                env[name] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                                   lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]),
                                   str(entry.get("value", "")))
                continue
            source = entry["valueFrom"]
            for ref_kind, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                ref = source.get(ref_kind)
                if isinstance(ref, dict):
                    found = (self.data(kind, str(ref.get("name"))) or {}).get(str(ref.get("key")))
                    if found is not None:
                        env.pop(name, None)
                        env[name] = found
        return list(env.items())

    def file(self, container: Mapping[str, Any], pod_spec: Mapping[str, Any],
             path: str) -> str | None:
        """The text of `path` when a ConfigMap or Secret volume provides it, else None."""
        best: Mapping[str, Any] | None = None
        for mount in container.get("volumeMounts") or []:
            at = str(mount.get("mountPath", "")).rstrip("/")
            if at and (at == path or path.startswith(at + "/")) and (
                    best is None or len(at) > len(str(best.get("mountPath")))):
                best = mount
        if best is None:
            return None
        volume = next((v for v in pod_spec.get("volumes") or []
                       if v.get("name") == best.get("name")), None)
        if volume is None:
            return None
        at = str(best.get("mountPath")).rstrip("/")
        for vol_kind, kind in (("configMap", "ConfigMap"), ("secret", "Secret")):
            ref = volume.get(vol_kind)
            if not isinstance(ref, dict):
                continue
            if at == path:
                key = str(best.get("subPath") or path.rsplit("/", 1)[-1])
            else:
                rel = path[len(at) + 1:]
                key = next((str(i.get("key")) for i in ref.get("items") or []
                            if i.get("path") == rel), rel)
            data = self.data(kind, str(ref.get("name") or ref.get("secretName")))
            return None if data is None else data.get(key)
        return None


# --- the handle ------------------------------------------------------------------------------


class ComponentHandle:
    """One Calico Deployment (Typha or kube-controllers) of an emulated cluster, with the
    controller moves and the listeners tests need."""

    def __init__(self, cluster: ClusterHandle, *, component: Component, name: str,
                 namespace: str, container: str, base_template: JsonDict,
                 render_env: Mapping[str, EnvValue], fleet: NodeFleet | None,
                 nodes: Sequence[str], pod_ip: str | None,
                 next_pod_ip: Callable[[], str] | None, ready: bool | Mapping[str, bool],
                 kcc_api: str, seed: int) -> None:
        self.cluster = cluster
        self.emu = cluster.emu
        self.component = component
        self.name = name
        self.namespace = namespace
        self.container = container
        self.fleet = fleet
        self.nodes = list(nodes)  # where the pods run (Typha: one per node)
        self.pod_ip = pod_ip
        self.kcc_api = kcc_api
        self.restarts = 0  # kube-controllers' container restarts (exit 129) so far
        self._next_pod_ip = next_pod_ip
        self._ready = ready
        self._base_template = base_template
        self._render_env = dict(render_env)
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._serving: dict[str, Serving] = {}  # pod name -> what its process serves
        self._listeners: dict[tuple[str, int], str] = {}  # ours in the fleet: kind
        self._override: dict[str | None, str] = {}  # address (None: all) -> listener kind
        self._unsubscribe: Callable[[], None] | None = None
        self._halt = threading.Event()
        self._rolling: threading.Thread | None = None
        self._own = threading.local()  # `writing`: a write of the emulated process itself
        self._create_kcc_on_start = False  # set once the initial pods are up

    # --- reading ---------------------------------------------------------------------------

    def deployment_object(self) -> JsonDict:
        obj = self.emu.get_object("apps/v1", "Deployment", self.name, self.namespace)
        if obj is None:
            raise KeyError(f"Deployment {self.namespace}/{self.name} is gone")
        return obj

    def pods(self) -> list[JsonDict]:
        """Copies of the Deployment's pods (every ReplicaSet's), by name."""
        return [json.loads(json.dumps(p)) for p in self._owned_pods()]

    def pod_names(self) -> list[str]:
        return [p["metadata"]["name"] for p in self._owned_pods()]

    def kcc_object(self) -> JsonDict | None:
        """KubeControllersConfiguration `default`, or None when there is none."""
        try:
            return self.emu.get_object(self.kcc_api, "KubeControllersConfiguration", "default")
        except KeyError:  # the resource is not served
            return None

    def serving(self) -> dict[str, Serving]:
        """What each running pod's process serves (by pod name), as it read it at start."""
        with self._lock:
            return dict(self._serving)

    def listening(self) -> dict[tuple[str, int], str]:
        """The listeners this component has open now: (address, port) -> NodeFleet kind."""
        with self._lock:
            return dict(self._listeners)

    @property
    def template_hash(self) -> str:
        return revision_hash(self.deployment_object()["spec"]["template"])

    # --- pods and listeners ----------------------------------------------------------------

    def set_pod_ready(self, pod_or_node: str, ready: bool) -> None:
        """Flip the Ready condition of the pod named `pod_or_node`, or of the pods on that
        node; the Deployment status follows."""
        with self._lock:
            for pod in list(self._owned_pods()):
                if pod_or_node in (pod["metadata"]["name"], pod["spec"].get("nodeName")):
                    status = json.loads(json.dumps(pod["status"]))
                    for condition in status["conditions"]:
                        if condition["type"] in ("Ready", "ContainersReady"):
                            condition["status"] = "True" if ready else "False"
                    for cs in status.get("containerStatuses") or []:
                        cs["ready"] = ready
                    self.emu.patch_object("v1", "Pod", pod["metadata"]["name"],
                                          {"status": status}, namespace=self.namespace)
            self.refresh_status()

    def set_listener(self, kind: str | None, *, address: str | None = None) -> None:
        """Force the listener at `address` (None: every address of the component) to a
        NodeFleet kind (`silent`, `other`, `closed`, `typha-tls`, ...) on the declared port,
        whatever the declared configuration says; None goes back to following it."""
        with self._lock:
            if kind is None:
                self._override.pop(address, None)
            else:
                self._override[address] = kind
            self.sync_listeners()

    def sync_listeners(self) -> None:
        """Open and close this component's listeners as its running pods serve."""
        if self.fleet is None:
            return
        with self._lock:
            wanted: dict[tuple[str, int], str] = {}
            for pod in self._owned_pods():
                serving = self._serving.get(pod["metadata"]["name"])
                address = self._address(pod)
                if serving is None or address is None:
                    continue
                forced = self._override.get(address, self._override.get(None))
                port = serving.port or (TYPHA_PORT if self.component == "typha"
                                        else KUBE_CONTROLLERS_PORT)
                if forced is not None:
                    if forced != "closed":
                        wanted[(address, port)] = forced
                elif serving.listens_on(address):
                    wanted[(address, serving.port)] = self._kind(serving)
            for key, kind in list(self._listeners.items()):
                if wanted.get(key) != kind:
                    self.fleet.remove(*key)
                    del self._listeners[key]
            for key, kind in wanted.items():
                if key in self._listeners:
                    continue
                try:
                    self.fleet.node(*key)
                except KeyError:
                    pass
                else:
                    raise ValueError(f"{key[0]}:{key[1]} already has a listener that is not "
                                     f"{self.name}'s")
                node = self._node_of(key[0])
                self.fleet.add(key[0], kind, port=key[1], node_name=node or self.name)
                self._listeners[key] = kind

    def close_listeners(self) -> None:
        """Close every listener of this component (the fleet goes on)."""
        with self._lock:
            if self.fleet is not None:
                for key in list(self._listeners):
                    self.fleet.remove(*key)
            self._listeners.clear()

    # --- template changes and controllers --------------------------------------------------

    def update_env(self, env: Mapping[str, EnvValue], *, roll: bool = True) -> str:
        """Change the container env as `kubectl set env` would; the new pod-template-hash.

        The Deployment controller's part follows at once (observedGeneration); with `roll`
        the pods are replaced by pods of the new template (else they keep running the old)."""
        with self._lock:
            deployment = self.deployment_object()
            deployment["spec"]["template"] = _apply_env(deployment["spec"]["template"],
                                                        self.container, env)
            self.emu.replace(deployment)
            self.reconcile()
            if roll:
                self.roll()
            return self.template_hash

    def reconcile(self) -> None:
        """One Deployment-controller pass: observedGeneration = generation, status recounted."""
        self.refresh_status(observe=True)

    def roll(self, *, finish: bool = True) -> list[str]:
        """Replace the pods not on the current template by pods that are; the new names.

        Typha (RollingUpdate, maxSurge 100%): the new pods start first, beside the old ones
        (on the same nodes), then the old ones go, unless `finish` is False (a rollout caught
        mid-way: `finish_rollout` ends it). kube-controllers (Recreate): the old pod goes
        first."""
        with self._lock:
            current = self.template_hash
            stale = [p for p in self._owned_pods()
                     if p["metadata"]["labels"].get("pod-template-hash") != current]
            fresh = [p for p in self._owned_pods()
                     if p["metadata"]["labels"].get("pod-template-hash") == current]
            if not stale and fresh:
                return []
            names: list[str] = []
            if self.component == "kube-controllers":
                for pod in stale:
                    self._delete_pod(pod["metadata"]["name"])
                if not fresh:
                    if self._next_pod_ip is not None:
                        self.pod_ip = self._next_pod_ip()
                    names.append(self._start_pod(self.nodes[0]))
            else:
                have = {p["spec"].get("nodeName") for p in fresh}
                for node in self.nodes:
                    if node not in have:
                        names.append(self._start_pod(node))
                if finish:
                    for pod in stale:
                        self._delete_pod(pod["metadata"]["name"])
            self.refresh_status(observe=True)
            return names

    def finish_rollout(self) -> None:
        """Delete the pods of older templates (the end of a surge)."""
        with self._lock:
            current = self.template_hash
            for pod in list(self._owned_pods()):
                if pod["metadata"]["labels"].get("pod-template-hash") != current:
                    self._delete_pod(pod["metadata"]["name"])
            self.refresh_status(observe=True)

    def restart(self, *, exit_code: int = 129) -> None:
        """The component's container exits and the kubelet restarts it in its pod: the
        process reads its configuration again (kube-controllers exits 129 when its
        KubeControllersConfiguration changes, kube-controllers/pkg/kubecontrollers)."""
        with self._lock:
            for pod in list(self._owned_pods()):
                name = pod["metadata"]["name"]
                status = json.loads(json.dumps(pod["status"]))
                for cs in status.get("containerStatuses") or []:
                    if cs.get("name") == self.container:
                        cs["restartCount"] = int(cs.get("restartCount") or 0) + 1
                        cs["lastState"] = {"terminated": {
                            "exitCode": exit_code, "reason": "Error",
                            "startedAt": _STAMP, "finishedAt": _STAMP}}
                self.emu.patch_object("v1", "Pod", name, {"status": status},
                                      namespace=self.namespace)
                self._serving[name] = self._process_start(self.emu.get_object(
                    "v1", "Pod", name, self.namespace) or pod)
            self.restarts += 1
            self.sync_listeners()

    def set_kcc_port(self, port: KccPort) -> None:
        """Write KubeControllersConfiguration `default`'s port as a user would (a number,
        None to drop the field, "missing" to delete the object)."""
        obj = self.kcc_object()
        if port == "missing":
            if obj is not None:
                self.emu.delete_object(self.kcc_api, "KubeControllersConfiguration", "default")
            return
        if obj is None:
            self.emu.add(_kcc_object(self.kcc_api, port))
            return
        spec = dict(obj.get("spec") or {})
        if port is None:
            spec.pop("prometheusMetricsPort", None)
        else:
            spec["prometheusMetricsPort"] = port
        obj["spec"] = spec
        self.emu.replace(obj)

    def refresh_status(self, *, observe: bool = False) -> JsonDict:
        """Recount the Deployment status from its stored pods and store it."""
        with self._lock:
            deployment = self.deployment_object()
            current = revision_hash(deployment["spec"]["template"])
            pods = list(self._owned_pods())
            updated = [p for p in pods
                       if p["metadata"]["labels"].get("pod-template-hash") == current]
            ready = sum(1 for p in pods if _pod_ready(p))
            want = int(deployment["spec"].get("replicas") or 0)
            generation = int(deployment["metadata"].get("generation") or 1)
            observed = generation if observe else \
                (deployment.get("status") or {}).get("observedGeneration")
            status: JsonDict = {"replicas": len(pods)}
            if observed:
                status["observedGeneration"] = observed
            if updated:
                status["updatedReplicas"] = len(updated)
            if ready:
                status["readyReplicas"] = ready
                status["availableReplicas"] = ready
            if want - ready > 0:
                status["unavailableReplicas"] = want - ready
            status["conditions"] = [
                {"type": "Available", "status": "True" if ready >= min(want, 1) else "False",
                 "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable",
                 "lastUpdateTime": _STAMP, "lastTransitionTime": _STAMP},
                {"type": "Progressing", "status": "True",
                 "reason": "NewReplicaSetAvailable" if len(updated) == len(pods) == want
                 else "ReplicaSetUpdated",
                 "lastUpdateTime": _STAMP, "lastTransitionTime": _STAMP}]
            if deployment.get("status") != status:
                deployment["status"] = status
                self.emu.replace(deployment)
            return status

    def simulate_controllers(self, *, roll_delay: float = 0.0) -> None:
        """React to API writes as the cluster's controllers would.

        A change of the Deployment's pod template gets a Deployment-controller pass and a
        rollout (at once, or `roll_delay` seconds later in a background thread, then
        `wait_rollout`). On operator installs the simulated tigera operator reverts manual
        edits of Typha's Deployment and re-renders TYPHA_PROMETHEUSMETRICSENABLED/PORT when
        the Installation's spec.typhaMetricsPort changes (tigera/operator pkg/render/typha.go).
        kube-controllers restarts (exit 129) when KubeControllersConfiguration `default`
        changes, and creates it with port 9094 when it is deleted."""
        self.stop_controllers()
        self._halt.clear()

        def on_change(change: Change) -> None:
            kind = change.resource.kind
            meta = change.object["metadata"]
            if kind == "Installation" and meta["name"] == "default" \
                    and self.component == "typha" and self._operator:
                if change.type != "DELETED":
                    self._render_operator(change.object)
                return
            if kind == "KubeControllersConfiguration" and meta["name"] == "default" \
                    and self.component == "kube-controllers":
                old = (change.old or {}).get("spec")
                if getattr(self._own, "writing", False) or (
                        change.type == "MODIFIED" and old == change.object.get("spec")):
                    return  # kube-controllers' own write, or a status write
                self.restart()
                return
            if kind != "Deployment" or change.type != "MODIFIED":
                return
            if meta["name"] != self.name or meta.get("namespace") != self.namespace:
                return
            old_spec = (change.old or {}).get("spec") or {}
            if old_spec.get("template") == change.object["spec"].get("template"):
                return
            if self._operator and self.component == "typha" and self._render_operator(None):
                return  # the operator's own write comes back through this callback
            self.reconcile()
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
        """Wait for a rollout started by the simulated controller; True when it is done."""
        rolling = self._rolling
        if rolling is not None:
            rolling.join(timeout)
            if rolling.is_alive():
                return False
        with self._lock:
            current = self.template_hash
            return all(p["metadata"]["labels"].get("pod-template-hash") == current
                       for p in self._owned_pods())

    # --- internals -------------------------------------------------------------------------

    @property
    def _operator(self) -> bool:
        return self.cluster.install == "operator"

    def _start_rollout(self, delay: float) -> None:
        if delay <= 0:
            self.roll()
            return

        def rollout() -> None:
            if not self._halt.wait(delay):
                self.roll()

        previous = self._rolling
        if previous is not None and previous.is_alive():
            previous.join()
        self._rolling = threading.Thread(target=rollout, name=f"{self.name}-rollout",
                                         daemon=True)
        self._rolling.start()

    def _render_operator(self, installation: Mapping[str, Any] | None) -> bool:
        """Make Typha's template what the operator renders; True when it had to write."""
        with self._lock:
            rendered = self._rendered_template(installation)
            deployment = self.deployment_object()
            if deployment["spec"]["template"] == rendered:
                return False
            deployment["spec"]["template"] = rendered
            self.emu.replace(deployment)
            return True

    def _rendered_template(self, installation: Mapping[str, Any] | None) -> JsonDict:
        if installation is None:
            installation = self.emu.get_object(_INSTALLATION_API, "Installation", "default")
        port = ((installation or {}).get("spec") or {}).get("typhaMetricsPort")
        env: dict[str, EnvValue] = {_TYPHA_ENABLED: None, _TYPHA_PORT: None}
        env.update(self._render_env)
        template = _apply_env(self._base_template, self.container, env)
        if isinstance(port, int) and not isinstance(port, bool):
            # appended after the rest, as typha.go's typhaEnvVars does
            template = _apply_env(template, self.container,
                                  {_TYPHA_ENABLED: "true", _TYPHA_PORT: str(port)})
        return template

    def _owned_pods(self) -> Iterator[JsonDict]:
        prefix = f"{self.name}-"
        for pod in self.emu.list_objects("v1", "Pod", self.namespace, copy=False):
            owners = pod["metadata"].get("ownerReferences") or []
            if any(o.get("kind") == "ReplicaSet" and str(o.get("name", "")).startswith(prefix)
                   and "pod-template-hash" in (pod["metadata"].get("labels") or {})
                   for o in owners):
                yield pod

    def _address(self, pod: Mapping[str, Any]) -> str | None:
        ip = (pod.get("status") or {}).get("podIP")
        return str(ip) if ip else None

    def _node_of(self, address: str) -> str | None:
        for pod in self._owned_pods():
            if self._address(pod) == address:
                return cast(str | None, pod["spec"].get("nodeName"))
        return None

    def _kind(self, serving: Serving) -> str:
        if self.component == "typha":
            return "typha-tls" if serving.tls else "typha-http"
        return "kube-controllers-http"

    def _delete_pod(self, name: str) -> None:
        self.emu.delete_object("v1", "Pod", name, self.namespace)
        self._serving.pop(name, None)
        self.sync_listeners()

    def _start_pod(self, node_name: str) -> str:
        """Create a pod of the current template on `node_name` and start its process."""
        deployment = self.deployment_object()
        template = deployment["spec"]["template"]
        node = self.emu.get_object("v1", "Node", node_name)
        if node is None:
            raise KeyError(f"no node {node_name}")
        addresses = node["status"].get("addresses") or []
        node_ip = next((a["address"] for a in addresses if a["type"] == "InternalIP"),
                       next((a["address"] for a in addresses if a["type"] != "Hostname"), None))
        host_network = bool(template["spec"].get("hostNetwork"))
        pod_ip = node_ip if host_network else self.pod_ip
        ready = self._ready if isinstance(self._ready, bool) else \
            self._ready.get(node_name, True)
        pod = self._pod_object(deployment, node_name, node_ip, pod_ip, ready)
        stored = self.emu.add(pod)
        self._serving[stored["metadata"]["name"]] = self._process_start(stored)
        self.sync_listeners()
        return str(stored["metadata"]["name"])

    def _process_start(self, pod: Mapping[str, Any]) -> Serving:
        """The component's process starts in `pod` and reads its configuration."""
        if self.component == "kube-controllers" and self._create_kcc_on_start \
                and self.kcc_object() is None and self._kcc_served():
            # getOrCreateSnapshot: kube-controllers writes `default` with the client's
            # defaults, port 9094 included; it does not restart for its own write.
            self._own.writing = True
            try:
                self.emu.add(_kcc_object(self.kcc_api, KUBE_CONTROLLERS_PORT))
            finally:
                self._own.writing = False
        return self._read_config(pod)

    def _kcc_served(self) -> bool:
        return any(r.kind == "KubeControllersConfiguration" and r.api_version == self.kcc_api
                   for r in self.emu.resources)

    def _read_config(self, pod: Mapping[str, Any]) -> Serving:
        spec = pod.get("spec") or {}
        container: Mapping[str, Any] = next((c for c in spec.get("containers") or []
                                             if c.get("name") == self.container), {})
        if self.component == "kube-controllers":
            kcc = self.kcc_object()
            if kcc is None:
                return Serving(True, KUBE_CONTROLLERS_PORT, source="no "
                               "KubeControllersConfiguration default: kube-controllers creates "
                               "it with 9094")
            port = (kcc.get("spec") or {}).get("prometheusMetricsPort")
            if not isinstance(port, int) or isinstance(port, bool) or port == 0:
                return Serving(False, 0, source=f"prometheusMetricsPort {port!r}")
            return Serving(True, port, source=f"prometheusMetricsPort {port}")
        kubelet = _Kubelet(self.emu, self.namespace)
        text = kubelet.file(container, spec, _typha_config_path(container))
        return typha_serving(kubelet.environ(container), _ini(text) if text else None,
                             version=_image_version(container.get("image")))

    def _pod_name(self, template_hash: str) -> str:
        taken = {p["metadata"]["name"] for p in
                 self.emu.list_objects("v1", "Pod", self.namespace, copy=False)}
        while True:
            suffix = "".join(self._rng.choice(_SAFE_ALPHABET) for _ in range(5))
            name = f"{self.name}-{template_hash}-{suffix}"
            if name not in taken:
                return name

    def _pod_object(self, deployment: Mapping[str, Any], node_name: str, node_ip: str | None,
                    pod_ip: str | None, ready: bool) -> JsonDict:
        template = json.loads(json.dumps(deployment["spec"]["template"]))
        template_hash = revision_hash(template)
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels["pod-template-hash"] = template_hash
        replica_set = f"{self.name}-{template_hash}"
        spec: JsonDict = dict(template["spec"])
        spec["nodeName"] = node_name
        flag = "True" if ready else "False"
        status: JsonDict = {
            "phase": "Running",
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True",
                 "lastTransitionTime": _STAMP},
                {"type": "Initialized", "status": "True", "lastTransitionTime": _STAMP},
                {"type": "Ready", "status": flag, "lastTransitionTime": _STAMP},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": _STAMP},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": _STAMP},
            ],
            "startTime": _STAMP,
            "containerStatuses": [{
                "name": c["name"], "image": c.get("image"), "imageID": "",
                "containerID": f"containerd://{self._rng.getrandbits(128):032x}",
                "ready": ready, "restartCount": 0, "started": True,
                "state": {"running": {"startedAt": _STAMP}}}
                for c in spec.get("containers") or []],
            "qosClass": "BestEffort",
        }
        if node_ip:
            status["hostIP"] = node_ip
        if pod_ip:
            status["podIP"] = pod_ip
            status["podIPs"] = [{"ip": pod_ip}]
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": self._pod_name(template_hash),
                "generateName": f"{replica_set}-",
                "namespace": self.namespace,
                "labels": labels,
                **({"annotations": template["metadata"]["annotations"]}
                   if template.get("metadata", {}).get("annotations") else {}),
                "ownerReferences": [_owner(
                    "apps/v1", "ReplicaSet", replica_set,
                    str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.namespace}/{replica_set}")))],
            },
            "spec": spec,
            "status": status,
        }


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


# --- building ----------------------------------------------------------------------------------


def _load_deployment(source: Path | str | Mapping[str, Any]) -> JsonDict:
    if isinstance(source, Mapping):
        return cast(JsonDict, json.loads(json.dumps(source)))
    text = Path(source).read_text(encoding="utf-8") \
        if isinstance(source, Path) or "\n" not in source else source
    found = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)
             and d.get("kind") == "Deployment"]
    if len(found) != 1:
        raise ValueError(f"expected exactly one Deployment in {source!s:.80}, found {len(found)}")
    return cast(JsonDict, found[0])


def _store_objects(emu: KubeEmulator, namespace: str, configmaps: Iterable[Mapping[str, Any]],
                   secrets: Iterable[Mapping[str, Any]]) -> None:
    for kind, group in (("ConfigMap", configmaps), ("Secret", secrets)):
        for obj in group:
            stored = json.loads(json.dumps(obj))
            stored.setdefault("apiVersion", "v1")
            stored.setdefault("kind", kind)
            stored.setdefault("metadata", {}).setdefault("namespace", namespace)
            existing = emu.get_object("v1", kind, stored["metadata"]["name"],
                                      stored["metadata"]["namespace"])
            if existing is None:
                emu.add(stored)
            else:
                emu.replace({**existing, **{k: v for k, v in stored.items()
                                            if k not in ("metadata",)}})


def _add(cluster: ClusterHandle, component: Component, *, deployment_yaml: Path | str | Mapping[
        str, Any], nodes: Sequence[str], env: Mapping[str, EnvValue] | None,
         configmaps: Sequence[Mapping[str, Any]], secrets: Sequence[Mapping[str, Any]],
         fleet: NodeFleet | None, namespace: str | None, pod_ip: str | None,
         next_pod_ip: Callable[[], str] | None, ready: bool | Mapping[str, bool],
         kcc_api: str, listener: str | None, seed: int,
         before_pods: Callable[[ComponentHandle], None] | None = None) -> ComponentHandle:
    emu = cluster.emu
    deployment = _load_deployment(deployment_yaml)
    name = deployment["metadata"]["name"]
    operator = cluster.install == "operator"
    ns = namespace or (_OPERATOR_NAMESPACE if operator
                       else deployment["metadata"].get("namespace") or "kube-system")
    deployment["metadata"]["namespace"] = ns
    containers = deployment["spec"]["template"]["spec"].get("containers") or []
    container = str(containers[0]["name"]) if containers else name
    base_template: JsonDict = deployment["spec"]["template"]
    if operator:
        installation = emu.get_object(_INSTALLATION_API, "Installation", "default")
        if installation is not None:
            deployment["metadata"]["ownerReferences"] = [_owner(
                _INSTALLATION_API, "Installation", "default", installation["metadata"]["uid"])]
    _store_objects(emu, ns, configmaps, secrets)
    handle = ComponentHandle(cluster, component=component, name=name, namespace=ns,
                             container=container, base_template=base_template,
                             render_env=env or {}, fleet=fleet, nodes=nodes, pod_ip=pod_ip,
                             next_pod_ip=next_pod_ip, ready=ready, kcc_api=kcc_api, seed=seed)
    if operator and component == "typha":
        deployment["spec"]["template"] = handle._rendered_template(None)
    elif env:
        deployment["spec"]["template"] = _apply_env(base_template, container, env)
    replicas = len(nodes) if component == "typha" else 1
    deployment["spec"]["replicas"] = replicas
    emu.add(deployment)
    if listener is not None:
        handle._override[None] = listener
    if before_pods is not None:
        before_pods(handle)
    with handle._lock:
        for node in (nodes if component == "typha" else nodes[:1]):
            handle._start_pod(node)
        handle._create_kcc_on_start = True
        handle.refresh_status(observe=True)
    return handle


def add_typha(
    handle: ClusterHandle,
    *,
    deployment_yaml: Path | str | Mapping[str, Any],
    nodes: Sequence[str],
    env: Mapping[str, EnvValue] | None = None,
    configmaps: Sequence[Mapping[str, Any]] = (),
    secrets: Sequence[Mapping[str, Any]] = (),
    fleet: NodeFleet | None = None,
    namespace: str | None = None,
    ready: bool | Mapping[str, bool] = True,
    typha_metrics_port: int | None = None,
    listener: str | None = None,
    seed: int = 0,
) -> ComponentHandle:
    """Add Typha to a cluster made by `build_calico_cluster`: its Deployment, one pod per node
    of `nodes` (host network: podIP = the node's InternalIP), and, with `fleet`, a listener on
    each of those nodes' address where Typha would serve its metrics.

    `deployment_yaml`: one of tests/fixtures/calico/*-calico-typha-deployment-calico-typha.yaml
    (a path, the YAML text, or the parsed object), stored unmodified but for `env` (as
    `build_calico_cluster`'s), the namespace (manifest installs: its own, kube-system;
    operator installs: calico-system, owned by the Installation), replicas and status. On an
    operator install with `typha_metrics_port` (or an Installation that has
    spec.typhaMetricsPort) the template carries the operator's TYPHA_PROMETHEUSMETRICSENABLED
    and PORT env. ConfigMaps/Secrets without a namespace go to the Deployment's (an existing
    one is replaced). `ready`: every pod's readiness, or by node name. `listener`: a NodeFleet
    kind forced on every Typha address (see `ComponentHandle.set_listener`)."""
    if typha_metrics_port is not None:
        if handle.install != "operator":
            raise ValueError("typha_metrics_port is an operator Installation setting")
        handle.emu.patch_object(_INSTALLATION_API, "Installation", "default",
                                {"spec": {"typhaMetricsPort": typha_metrics_port}})
    if not nodes:
        raise ValueError("Typha needs at least one node to run on")
    return _add(handle, "typha", deployment_yaml=deployment_yaml, nodes=nodes, env=env,
                configmaps=configmaps, secrets=secrets, fleet=fleet, namespace=namespace,
                pod_ip=None, next_pod_ip=None, ready=ready, kcc_api=KCC_API,
                listener=listener, seed=seed)


def add_kube_controllers(
    handle: ClusterHandle,
    *,
    deployment_yaml: Path | str | Mapping[str, Any],
    pod_ip: str,
    kcc_port: KccPort = KUBE_CONTROLLERS_PORT,
    env: Mapping[str, EnvValue] | None = None,
    configmaps: Sequence[Mapping[str, Any]] = (),
    secrets: Sequence[Mapping[str, Any]] = (),
    fleet: NodeFleet | None = None,
    namespace: str | None = None,
    node: str | None = None,
    ready: bool = True,
    kcc_api: str | None = None,
    kcc_crd: bool = True,
    next_pod_ip: Callable[[], str] | None = None,
    listener: str | None = None,
    seed: int = 0,
) -> ComponentHandle:
    """Add calico-kube-controllers to a cluster made by `build_calico_cluster`: its
    Deployment, one pod with `pod_ip` (a free 127.x address the test owns) on `node` (default:
    the cluster's first node), the KubeControllersConfiguration CRD and its `default` object,
    and, with `fleet`, a listener on pod_ip where kube-controllers would serve its metrics.

    `kcc_port`: `default`'s spec.prometheusMetricsPort (9094 as kube-controllers writes it, 0,
    None for an absent field, or "missing" for no object: the running kube-controllers then
    serves 9094, and creates the object with 9094 the next time it starts). `kcc_api`: the
    group/version serving KubeControllersConfiguration (default: the one the cluster serves
    FelixConfiguration in); `kcc_crd` False serves none. A pod replaced by a rollout gets
    `next_pod_ip()` when given, else the same pod_ip (Recreate: the old pod is gone first)."""
    emu = handle.emu
    api = kcc_api or _felix_api(emu)
    if kcc_crd:
        _serve_kcc(emu, api)
    node_name = node or _first_node(emu)

    def store_kcc(_h: ComponentHandle) -> None:
        if kcc_crd and kcc_port != "missing" and _h.kcc_object() is None:
            emu.add(_kcc_object(api, kcc_port))

    return _add(handle, "kube-controllers", deployment_yaml=deployment_yaml, nodes=[node_name],
                env=env, configmaps=configmaps, secrets=secrets, fleet=fleet,
                namespace=namespace, pod_ip=pod_ip, next_pod_ip=next_pod_ip, ready=ready,
                kcc_api=api, listener=listener, seed=seed, before_pods=store_kcc)


def _felix_api(emu: KubeEmulator) -> str:
    for group in ("crd.projectcalico.org", "projectcalico.org"):
        for rtype in emu.resources:
            if rtype.group == group and rtype.plural == "felixconfigurations":
                return rtype.api_version
    return KCC_API


def _serve_kcc(emu: KubeEmulator, api: str) -> None:
    if any(r.plural == "kubecontrollersconfigurations" and r.api_version == api
           for r in emu.resources):
        return
    if api == KCC_API:
        emu.load_yaml(kcc_crd_fixture())
        return
    group, version = api.split("/")
    emu.register_resource(group, version, "kubecontrollersconfigurations",
                          "KubeControllersConfiguration", namespaced=False,
                          status_subresource=True, singular="kubecontrollersconfiguration")


def _first_node(emu: KubeEmulator) -> str:
    nodes = emu.list_objects("v1", "Node", copy=False)
    if not nodes:
        raise ValueError("the cluster has no node for kube-controllers to run on")
    return str(nodes[0]["metadata"]["name"])


def _kcc_object(api: str, port: int | None) -> JsonDict:
    """KubeControllersConfiguration `default` as kube-controllers creates it
    (kube-controllers/pkg/config/runconfig.go `getOrCreateSnapshot`, then the client's
    defaults), with its status as the running controllers report it."""
    spec: JsonDict = {
        "controllers": {
            "node": {"reconcilerPeriod": "5m0s", "syncLabels": "Enabled",
                     "leakGracePeriod": "15m0s"},
            "policy": {"reconcilerPeriod": "5m0s"},
            "workloadEndpoint": {"reconcilerPeriod": "5m0s"},
            "serviceAccount": {"reconcilerPeriod": "5m0s"},
            "namespace": {"reconcilerPeriod": "5m0s"},
            "loadBalancer": {"assignIPs": "AllServices"},
        },
        "etcdV3CompactionPeriod": "10m0s",
        "healthChecks": "Enabled",
        "logSeverityScreen": "Info",
    }
    if port is not None:
        spec["prometheusMetricsPort"] = port
    running = {k: v for k, v in spec.items() if k != "prometheusMetricsPort"}
    return {
        "apiVersion": api, "kind": "KubeControllersConfiguration",
        "metadata": {"name": "default"},
        "spec": spec,
        "status": {"runningConfig": running,
                   "environmentVars": {"DATASTORE_TYPE": "kubernetes",
                                       "ENABLED_CONTROLLERS": "node,loadbalancer"}},
    }
