"""Emulated clusters for end-to-end scans: API servers over HTTPS plus node listeners on 127.x.

`Harness.cluster()` builds one Calico cluster from a real fixture DaemonSet, gives every node a
fresh loopback address, and starts a listener of the requested kind on it. `Harness.scan()` runs
the real `felixscan scan` (in-process, or as a subprocess) and returns its exit code and JSON.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scanner.app.cli import main
from scanner.emulator import ClusterHandle, KubeEmulator, NodeSpec, build_calico_cluster
from scanner.emulator.apiserver import write_kubeconfig
from scanner.emulator.components import ComponentHandle, add_kube_controllers, add_typha
from scanner.emulator.fleet import revision_hash
from scanner.emulator.nodes import NodeFleet, address_for
from tests.helpers.paths import CALICO, ROOT

NODE_CHECK = ROOT / "deploy" / "overlays" / "node-check"
CALICO_VERSIONS = sorted(p.name.split("-", 1)[0] for p in CALICO.glob("*-calico-daemonset-*.yaml"))
# Fresh addresses: no reuse across tests, and a range of its own for each pytest process, so
# two runs on one machine never share a node address.
_addresses: Iterator[int] = itertools.count(1 + (os.getpid() % 64) * 10_000)


def next_address() -> str:
    return address_for(next(_addresses), base="127.20.0.0")


def own_addresses(monkeypatch: Any, base: str) -> None:
    """Give a test file node addresses of its own (`base`, e.g. 127.33.0.0), offset by process,
    so that suites running at the same time on this machine (the rest use 127.20.x.x) never
    share a listener's address. Call it from an autouse fixture."""
    counter = itertools.count((os.getpid() % 64) * 1016)
    monkeypatch.setattr(sys.modules[__name__], "next_address",
                        lambda: address_for(next(counter), base=base))


def daemonset(version: str = "v3.32.1") -> Path:
    return CALICO / f"{version}-calico-daemonset-calico-node.yaml"


def typha_deployment(version: str = "v3.32.1") -> Path:
    return CALICO / f"{version}-calico-typha-deployment-calico-typha.yaml"


def kube_controllers_deployment(version: str = "v3.32.1") -> Path:
    return CALICO / f"{version}-calico-deployment-calico-kube-controllers.yaml"


@dataclass
class Node:
    """One node of a test cluster: `kind` is a NodeFleet kind, or `noaddr` (no InternalIP)."""

    kind: str = "closed"
    name: str | None = None
    ready: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    pod: str | None = "current"  # "current", "old" or None (no calico-node pod)
    port: int = 9091
    annotations: dict[str, str] = field(default_factory=dict)
    # further (type, address) entries, e.g. ("InternalIP", "::1"), each with its listener kind
    extra: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Run:
    """What one `felixscan` invocation did."""

    code: int
    stdout: str
    stderr: str


def felixscan(*args: str, cwd: Path | None = None) -> Run:
    """The real CLI in this process (optionally from another working directory)."""
    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors, as the console script exits
                code = int(exc.code or 0)
    finally:
        os.chdir(before)
    return Run(code, out.getvalue(), err.getvalue())


def felixscan_process(*args: str, cwd: Path | None = None, timeout: float = 120) -> Run:
    """`python -m scanner ...` as a child process: its own logging set-up, its own stderr."""
    proc = subprocess.run([sys.executable, "-m", "scanner", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return Run(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class Outcome:
    code: int
    doc: dict[str, Any]
    stdout: str
    stderr: str

    def cluster(self, name: str) -> dict[str, Any]:
        return next(c for c in self.doc["clusters"] if c["name"] == name)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.stack = ExitStack()
        self.fleet = self.stack.enter_context(_started(NodeFleet()))
        self.emulators: dict[str, KubeEmulator] = {}
        self.handles: dict[str, ClusterHandle] = {}
        self.addresses: dict[tuple[str, str], str] = {}
        self.extra_contexts: dict[str, str] = {}  # context -> server URL, for dead clusters
        self.top_level: dict[str, Any] = {}  # more top-level config keys (waivers_file, ...)
        self.probe: dict[str, Any] = {"timeout_seconds": 0.5, "tls_timeout_seconds": 2,
                                      "http_timeout_seconds": 3}
        self.cluster_options: dict[str, dict[str, Any]] = {}
        # Kubeconfig entries replaced per context (token, CA, exec plugin, server keys).
        self.users: dict[str, dict[str, Any]] = {}  # context -> the whole `user` entry
        self.servers: dict[str, dict[str, Any]] = {}  # context -> keys merged into `cluster`
        # (cluster, "typha" | "kube-controllers") -> the component added by typha() and
        # kube_controllers()
        self.components: dict[tuple[str, str], ComponentHandle] = {}

    def close(self) -> None:
        self.stack.close()

    def cluster(self, name: str, nodes: Sequence[Node | str], *, version: str = "v3.32.1",
                tls: bool = True, options: Mapping[str, Any] | None = None,
                **build: Any) -> ClusterHandle:
        emu = self.stack.enter_context(_started(KubeEmulator(tls=tls)))
        specs = []
        for i, raw in enumerate(nodes):
            node = Node(kind=raw) if isinstance(raw, str) else raw
            node_name = node.name or f"{name}-node-{i}"
            address = next_address()
            self.addresses[(name, node_name)] = address
            specs.append(NodeSpec(name=node_name,
                                  address=None if node.kind == "noaddr" else address,
                                  ready=node.ready, labels=dict(node.labels),
                                  annotations=dict(node.annotations),
                                  extra_addresses=[(t, a) for t, a, _k in node.extra],
                                  pod_revision=node.pod))  # type: ignore[arg-type]
            if node.kind not in ("closed", "noaddr"):
                self.fleet.add(address, node.kind, port=node.port, node_name=node_name)
            for _t, extra_address, kind in node.extra:
                if kind != "closed":
                    self.fleet.add(extra_address, kind, port=node.port, node_name=node_name)
        build.setdefault("daemonset_yaml", daemonset(version))
        handle = build_calico_cluster(emu, nodes=specs, **build)
        self.emulators[name] = emu
        self.handles[name] = handle
        if options:
            self.cluster_options[name] = dict(options)
        return handle

    def typha(self, cluster: str, nodes: Sequence[str] | None = None, *,
              version: str = "v3.32.1", **add: Any) -> ComponentHandle:
        """Typha in `cluster` (scanner.emulator.components.add_typha) from the release
        Deployment of `version`, on `nodes` (default: the cluster's first node), its listeners
        in this harness's fleet."""
        handle = self.handles[cluster]
        add.setdefault("deployment_yaml", typha_deployment(version))
        component = add_typha(handle, nodes=list(nodes or [handle.nodes[0].name]),
                              fleet=self.fleet, **add)
        self.stack.callback(component.stop_controllers)
        self.components[(cluster, "typha")] = component
        return component

    def kube_controllers(self, cluster: str, *, version: str = "v3.32.1",
                         pod_ip: str | None = None, **add: Any) -> ComponentHandle:
        """calico-kube-controllers in `cluster` (scanner.emulator.components.
        add_kube_controllers) from the release Deployment of `version`, its pod on a fresh
        address of this harness (`next_address`), its listener in this harness's fleet."""
        handle = self.handles[cluster]
        add.setdefault("deployment_yaml", kube_controllers_deployment(version))
        component = add_kube_controllers(handle, pod_ip=pod_ip or next_address(),
                                         fleet=self.fleet, **add)
        self.stack.callback(component.stop_controllers)
        self.components[(cluster, "kube-controllers")] = component
        return component

    def run_scan(self, db: str) -> Any:
        """`run_scan` over this harness's config (the library entry point the CLI calls):
        the ScanOutcome, with each cluster's ClusterResult and its `controls`."""
        from scanner.core.config import load_settings
        from scanner.db.store import Store
        from scanner.scan import run_scan

        settings = load_settings(self.config(), db_url=db, environ={})
        with Store(db) as store:
            return run_scan(settings, store=store)

    def dead_cluster(self, name: str, url: str = "https://127.0.0.1:1") -> None:
        """A context whose API server is not there at all (connection refused)."""
        self.extra_contexts[name] = url

    def node_check(self, cluster: str, views: Mapping[str, str | None], *,
                   namespace: str = "felixscan-node-check",
                   container: str = "felixscan") -> None:
        """`felixscan node-check` running in `cluster`, as the API server shows it.

        Adds DaemonSet felixscan-node-check to `namespace` (created if missing), made from
        deploy/overlays/node-check (daemonset.yaml with the kustomization's commonLabels, its
        container renamed `container`), and for each node of `views` (node name -> log text)
        sets the log of that node's pod: a Running pod of the DaemonSet, with its labels,
        created when missing. None: no pod on that node (removed if there was one); "": a pod
        that has printed nothing yet. Calling it again updates only the nodes it names.
        """
        emu = self.emulators[cluster]
        if emu.get_object("v1", "Namespace", namespace) is None:
            emu.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        ds = emu.get_object("apps/v1", "DaemonSet", "felixscan-node-check", namespace)
        if ds is None:
            ds = yaml.safe_load((NODE_CHECK / "daemonset.yaml").read_text())
            common = yaml.safe_load((NODE_CHECK / "kustomization.yaml").read_text())
            # what `kubectl kustomize` does with commonLabels: objects, selector and template
            for labels in (ds["metadata"].setdefault("labels", {}),
                           ds["spec"]["selector"]["matchLabels"],
                           ds["spec"]["template"]["metadata"]["labels"]):
                labels.update(common["commonLabels"])
            ds["metadata"]["namespace"] = namespace
            ds["spec"]["template"]["spec"]["containers"][0]["name"] = container
            ds = emu.add(ds)
        name, uid, template = ds["metadata"]["name"], ds["metadata"]["uid"], ds["spec"]["template"]
        owned = {p["spec"].get("nodeName"): p["metadata"]["name"]
                 for p in emu.list_objects("v1", "Pod", namespace)
                 if any(o.get("uid") == uid for o in p["metadata"].get("ownerReferences") or [])}
        for node, text in views.items():
            pod_name = owned.get(node)
            if text is None:
                if pod_name is not None:
                    emu.delete_object("v1", "Pod", pod_name, namespace)
                    del owned[node]
                continue
            if pod_name is None:
                # a DaemonSet pod's name is generateName plus five random characters; a hash of
                # the node keeps it stable from run to run
                pod_name = f"{name}-{hashlib.sha256(node.encode()).hexdigest()[:5]}"
                address = self.addresses.get((cluster, node))  # hostNetwork: the node's IP
                running = {"type": "Ready", "status": "True"}
                emu.add({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {
                        "name": pod_name, "generateName": f"{name}-", "namespace": namespace,
                        "labels": {**template["metadata"]["labels"],
                                   "controller-revision-hash": revision_hash(template),
                                   "pod-template-generation": "1"},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                             "name": name, "uid": uid, "controller": True,
                                             "blockOwnerDeletion": True}]},
                    "spec": {**template["spec"], "nodeName": node},
                    "status": {
                        "phase": "Running",
                        "conditions": [running, {**running, "type": "ContainersReady"},
                                       {**running, "type": "PodScheduled"}],
                        **({"hostIP": address, "podIP": address} if address else {}),
                        "containerStatuses": [{
                            "name": container, "ready": True, "restartCount": 0,
                            "started": True, "image": template["spec"]["containers"][0]["image"],
                            "imageID": "", "state": {"running": {}}}]}})
                owned[node] = pod_name
            emu.set_pod_log(namespace, pod_name, text, container=container)
        # what the DaemonSet controller would report: one pod wanted per node (it tolerates
        # every taint), the ones above scheduled and ready
        wanted, scheduled = len(emu.list_objects("v1", "Node", copy=False)), len(owned)
        emu.patch_object("apps/v1", "DaemonSet", name, namespace=namespace, patch={"status": {
            "desiredNumberScheduled": wanted, "currentNumberScheduled": scheduled,
            "updatedNumberScheduled": scheduled, "numberReady": scheduled,
            "numberAvailable": scheduled, "observedGeneration": ds["metadata"]["generation"]}})

    def config(self, *, database: str | None = None) -> Path:
        kubeconfig = self.tmp / "kubeconfig"
        write_kubeconfig(kubeconfig, dict(self.emulators))
        if self.extra_contexts or self.users or self.servers:
            doc = yaml.safe_load(kubeconfig.read_text())
            for ctx, url in self.extra_contexts.items():
                doc["clusters"].append({"name": ctx, "cluster": {
                    "server": url, "insecure-skip-tls-verify": True}})
                doc["users"].append({"name": ctx, "user": {"token": "dead-cluster-token"}})
                doc["contexts"].append({"name": ctx, "context": {"cluster": ctx, "user": ctx}})
            for user in doc["users"]:
                context = user["name"].removesuffix("-user")
                if context in self.users:
                    user["user"] = self.users[context]
            for cluster in doc["clusters"]:
                cluster["cluster"].update(self.servers.get(cluster["name"], {}))
            kubeconfig.write_text(yaml.safe_dump(doc))
        clusters = []
        for name in [*self.emulators, *self.extra_contexts]:
            entry: dict[str, Any] = {"name": name, "kubeconfig": str(kubeconfig),
                                     "context": name, "probe": dict(self.probe),
                                     "api_timeout_seconds": 2, "deadline_seconds": 20}
            entry.update(self.cluster_options.get(name, {}))
            clusters.append(entry)
        doc: dict[str, Any] = {"clusters": clusters, **self.top_level}
        if database:
            doc["database"] = database
        path = self.tmp / "felixscan.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def scan(self, db: str, *extra: str) -> Outcome:
        """`felixscan scan --json` in this process (the real CLI entry point)."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["scan", "--config", str(self.config()), "--db", db, "--json", *extra])
        text = out.getvalue()
        return Outcome(code=code, doc=json.loads(text) if text.strip() else {}, stdout=text,
                       stderr=err.getvalue())

    def scan_subprocess(self, db: str, *extra: str) -> Outcome:
        proc = subprocess.run(
            [sys.executable, "-m", "scanner", "scan", "--config", str(self.config()), "--db", db,
             "--json", *extra], capture_output=True, text=True, timeout=120, check=False)
        return Outcome(code=proc.returncode,
                       doc=json.loads(proc.stdout) if proc.stdout.strip() else {},
                       stdout=proc.stdout, stderr=proc.stderr)


class _started:
    """Start on enter, stop on exit, for objects with start()/stop()."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __enter__(self) -> Any:
        self.obj.start()
        return self.obj

    def __exit__(self, *exc: object) -> None:
        self.obj.stop()
