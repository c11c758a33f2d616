"""deploy/: the manifests as the API server and kubelet would take them, the image recipe, and
the package the image is built from.

Every overlay is rendered with `kubectl kustomize` and every object loaded into the kubernetes
client's models with unknown fields refused; pod templates are held to the restricted Pod
Security Standard plus a read-only root filesystem; names the pods refer to resolve. The
Dockerfile is parsed; the project's wheel is built and run in a clean virtualenv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.utils import parse_quantity
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from scanner.app.cli import build_parser
from scanner.app.commands import node_check
from scanner.core.config import DEFAULT_DATABASE
from tests.helpers.rbac_rules import (
    DEPLOY,
    OVERLAYS,
    PLACEHOLDER_CONFIGMAP,
    PLACEHOLDER_SECRET,
    find,
    grants,
    key,
    kubectl,
    render,
)

ROOT = DEPLOY.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"registry.example.com/felixscan:{VERSION}"
README = (DEPLOY / "README.md").read_text()
# Objects the pods need that the user creates (deploy/README.md): (kind, name) -> keys.
USER_CREATED = {
    ("Secret", "felixscan-db"): {"url"},
    ("ConfigMap", "felixscan-agent"): {"cluster"},
    ("Secret", "felixscan-web-token"): {"token"},
}
Obj = dict[str, Any]


# --- strict loading into the client's models --------------------------------------------------


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def api_class(api_version: str) -> Any:
    """The client's API class serving a group/version, named as kubernetes.utils names it."""
    group, _, version = api_version.rpartition("/")
    group = (group or "core").removesuffix(".k8s.io")
    name = "".join(w.capitalize() for w in group.split(".")) + version.capitalize() + "Api"
    return getattr(client, name)


def snake(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def load_strictly(obj: Obj) -> Any:
    """The object as the client's model; raises on an unknown field, a wrong type, a field in
    the wrong spelling, or a kind its apiVersion does not serve.

    The generated `from_dict` silently drops unknown keys, and the models also take Python
    field names (`run_as_non_root`) that the API server rejects; so validate the dict with
    pydantic directly (the models forbid extra fields) and require that serializing the model
    gives back exactly what was written.
    """
    group_version, kind = obj["apiVersion"], obj["kind"]
    version = group_version.rpartition("/")[2]
    model = getattr(client, f"{version.capitalize()}{kind}")
    loaded = model.model_validate(obj)
    back = client.ApiClient().sanitize_for_serialization(loaded)
    if back != _drop_nulls(obj):
        raise ValueError(f"{kind} {obj['metadata'].get('name')}: fields the model does not "
                         f"know or spells differently: {_diff(_drop_nulls(obj), back)}")
    api = api_class(group_version)
    namespaced = hasattr(api, f"create_namespaced_{snake(kind)}")
    if not namespaced and not hasattr(api, f"create_{snake(kind)}"):
        raise ValueError(f"{group_version} serves no {kind}")
    if namespaced != bool(obj["metadata"].get("namespace")):
        raise ValueError(f"{kind} {obj['metadata']['name']}: "
                         + ("needs a namespace" if namespaced else "is cluster-scoped"))
    return loaded


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in (_diff(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b
                          else [f"{path}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "(top)"]


# Prometheus Operator custom resources (overlays/monitoring): the client has no models for
# them; tests/web/test_metrics.py checks them (promtool on the rules, what the ServiceMonitor
# selects and the token it sends).
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                    ("monitoring.coreos.com/v1", "PrometheusRule")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_valid_objects(overlay: str) -> None:
    objects = render(overlay)
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_RESOURCES:
            load_strictly(obj)
    keys = [key(o) for o in objects]
    assert len(keys) == len(set(keys))
    # node-check's pods are selected by the scan under a name of their own
    name = "felixscan-node-check" if overlay == "node-check" else "felixscan"
    assert all(o["metadata"]["labels"].get("app.kubernetes.io/name") == name
               for o in objects)


@pytest.mark.parametrize(("path", "value"), [
    ("spec.concurrencypolicy", "Forbid"),  # a typo
    ("spec.concurrency_policy", "Forbid"),  # the Python name, not the API's
    ("spec.jobTemplate.spec.template.spec.containers.0.securityContext.runAsNonRoot", "yes"),
    ("spec.jobTemplate.spec.template.spec.containers.0.resources.limits.memory", 512),
    ("kind", "CronJobs"),
    ("apiVersion", "apps/v1"),
    ("metadata.namespace", None),
])
def test_strict_loading_refuses_what_the_api_server_would(path: str, value: Any) -> None:
    """The checker above is only worth something if it fails: one bad field at a time."""
    cronjob = find(render("agent"), "CronJob", "felixscan-agent")[0]
    load_strictly(cronjob)
    *parents, last = path.split(".")
    node: Any = cronjob
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value
    with pytest.raises((ValueError, AttributeError)):
        load_strictly(cronjob)


# --- pods ------------------------------------------------------------------------------------


def pod_templates(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for obj in objects:
        spec = obj.get("spec") or {}
        template = (spec.get("jobTemplate") or {}).get("spec", {}).get("template") \
            or spec.get("template")
        if template:
            yield f"{obj['kind']} {obj['metadata']['name']}", template


def test_pods_are_in_the_overlays_that_should_have_them() -> None:
    pods = {o: [n for n, _ in pod_templates(render(o))] for o in OVERLAYS}
    assert pods["agent"] == pods["agent-operator"] == ["CronJob felixscan-agent"]
    assert pods["serve"] == ["Deployment felixscan-serve"]
    assert not pods["remediation"] and not pods["remediation-operator"]
    assert not pods["valuefrom-access"]
    assert pods["node-check"] == ["DaemonSet felixscan-node-check"]


def _writable_mounts(pod: Obj, container: Obj) -> dict[str, str]:
    """mountPath -> volume kind, for the mounts the container can write to."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    out = {}
    for m in container.get("volumeMounts") or []:
        volume = volumes[m["name"]]
        kind = next(k for k in volume if k != "name")
        if not m.get("readOnly") and kind in ("emptyDir", "persistentVolumeClaim"):
            out[m["mountPath"]] = kind
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security(overlay: str) -> None:
    uid, gid = dockerfile_user()
    for name, template in pod_templates(render(overlay)):
        pod = template["spec"]
        pod_sc = pod.get("securityContext") or {}
        # node-check reads the node's socket tables: the host network and nothing else of it
        host = {"hostNetwork"} if overlay == "node-check" else set()
        assert {"hostNetwork", "hostPID", "hostIPC"} & {k for k, v in pod.items() if v} == host, \
            name
        assert not any("hostPath" in v for v in pod.get("volumes") or []), name
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            sc = {**pod_sc, **(c.get("securityContext") or {})}  # the container's wins
            where = f"{overlay}: {name} container {c['name']}"
            assert sc.get("runAsNonRoot") is True, where
            assert (sc.get("runAsUser"), sc.get("runAsGroup")) == (uid, gid), where
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities") == {"drop": ["ALL"]}, where
            assert not sc.get("privileged"), where
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) >= {"cpu", "memory"}, (where, bound)
            assert c["image"] == IMAGE, where
            # HOME, caches and temp files of the image go to /tmp (Dockerfile ENV).
            assert _writable_mounts(pod, c).get("/tmp") == "emptyDir", where


def test_agent_cronjob() -> None:
    objects = render("agent")
    cronjob = find(objects, "CronJob", "felixscan-agent")[0]
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # a non-compliant exit is a result, not a crash to retry
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "felixscan-agent"
    assert pod["automountServiceAccountToken"] is True  # in-cluster credentials
    container = pod["containers"][0]
    assert container["args"] == ["scan"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) == {"FELIXSCAN_DB", "FELIXSCAN_CLUSTER", "FELIXSCAN_VANTAGE"}
    assert env["FELIXSCAN_VANTAGE"]["value"] == "pod-network"  # the agent's vantage point
    # Required on purpose: without them the pod does not start, rather than writing to a
    # SQLite file in the pod or under the name "in-cluster" that every cluster would share.
    assert env["FELIXSCAN_DB"]["valueFrom"]["secretKeyRef"] == {"name": "felixscan-db",
                                                                "key": "url"}
    assert env["FELIXSCAN_CLUSTER"]["valueFrom"]["configMapKeyRef"] == {
        "name": "felixscan-agent", "key": "cluster"}
    assert find(render("agent-operator"), "CronJob") == [cronjob]


def serve_container(objects: list[Obj]) -> tuple[Obj, Obj]:
    """(pod spec, container) of the serve Deployment."""
    pod = find(objects, "Deployment", "felixscan-serve")[0]["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_serve_deployment_probes_service_and_storage() -> None:
    objects = render("serve")
    deployment = find(objects, "Deployment", "felixscan-serve")[0]
    pod, c = serve_container(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # a ReadWriteOnce volume
    assert pod["automountServiceAccountToken"] is False  # serve reads no Kubernetes API
    args = c["args"]
    assert args[0] == "serve" and "--config" not in args and "--db" not in args
    listen = args[args.index("--listen") + 1]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert listen == f"0.0.0.0:{ports['http']}" and ports["http"] == 8080
    assert {(p, c[p]["httpGet"]["path"], c[p]["httpGet"]["port"]) for p in (
        "startupProbe", "livenessProbe", "readinessProbe")} == {
        ("startupProbe", "/healthz", "http"), ("livenessProbe", "/healthz", "http"),
        ("readinessProbe", "/readyz", "http")}
    service = find(objects, "Service", "felixscan-serve")[0]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    env = {e["name"]: e for e in c["env"]}
    assert env["FELIXSCAN_DB"]["valueFrom"]["secretKeyRef"]["optional"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_file = PurePosixPath(env["FELIXSCAN_WEB_TOKEN_FILE"]["value"])
    token_volume = volumes[mounts[str(token_file.parent)]["name"]]["secret"]
    assert token_volume["secretName"] == "felixscan-web-token"
    assert [i["path"] for i in token_volume["items"]] == [token_file.name]
    # Without FELIXSCAN_DB, the default SQLite file (relative to the working directory) lies on
    # the PersistentVolumeClaim.
    assert DEFAULT_DATABASE == "sqlite:///felixscan.db"
    assert _writable_mounts(pod, c).get(c["workingDir"]) == "persistentVolumeClaim"
    claim = volumes[mounts[c["workingDir"]]["name"]]["persistentVolumeClaim"]["claimName"]
    assert find(objects, "PersistentVolumeClaim", claim)


def test_network_policies_never_restrict_egress() -> None:
    """A probe dropped by an egress rule reads as `filtered`, which passes: a NetworkPolicy
    that limited felixscan's egress would turn open metrics ports into compliant ones."""
    policies = [(o, p) for o in OVERLAYS for p in find(render(o), "NetworkPolicy")]
    assert [(o, p["metadata"]["name"]) for o, p in policies] == [("serve", "felixscan-serve")]
    for _, policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert "egress" not in policy["spec"]
    policy = policies[0][1]["spec"]
    serve = find(render("serve"), "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    agent = find(render("agent"), "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= serve.items()
    assert not policy["podSelector"]["matchLabels"].items() <= agent["metadata"]["labels"].items()
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    for overlay in ("agent", "agent-operator", "serve"):
        namespace = find(render(overlay), "Namespace", "felixscan")[0]
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == \
            "restricted"
    # The add-on overlays leave the namespace alone: deleting them must not delete it.
    for overlay in ("remediation", "remediation-operator", "valuefrom-access"):
        assert not find(render(overlay), "Namespace")


# --- node-check (docs/node-check.md) --------------------------------------------------------

NODE_CHECK = ("felixscan-node-check", "felixscan-node-check")  # its namespace and its names


def test_node_check_daemonset() -> None:
    objects = render("node-check")
    daemonset = find(objects, "DaemonSet", "felixscan-node-check")[0]
    template = daemonset["spec"]["template"]
    pod, labels = template["spec"], template["metadata"]["labels"]
    # what the scan selects the pods by
    assert labels["app.kubernetes.io/name"] == "felixscan-node-check"
    assert labels["app.kubernetes.io/component"] == "node-check"
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # the node's network namespace, nothing else of the host
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not {"hostPID", "hostIPC", "initContainers"} & set(pod)
    assert not any("hostPath" in v for v in pod["volumes"])
    # no Kubernetes API: no token, no role
    assert pod["automountServiceAccountToken"] is False
    account = find(objects, "ServiceAccount", pod["serviceAccountName"])[0]
    assert account["automountServiceAccountToken"] is False
    assert not grants([o for other in OVERLAYS for o in render(other)], NODE_CHECK)
    # every node, whatever its taints
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    uid, gid = dockerfile_user()
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    (c,) = pod["containers"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert "ports" not in c  # on the host network a containerPort would be a host port
    assert c["env"] == [{"name": "NODE_NAME",
                         "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    assert c["args"] == ["node-check", "--interval", "60"]
    args = build_parser().parse_args(c["args"])  # what the image's entrypoint accepts
    assert (args.handler, args.interval, args.once) == (node_check.run, 60.0, False)
    # tiny: one process reading two small files a minute
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert parse_quantity(limits["cpu"]) <= parse_quantity("100m")
    assert parse_quantity(limits["memory"]) <= parse_quantity("128Mi")
    assert all(parse_quantity(requests[r]) <= parse_quantity(limits[r]) for r in limits)


def test_node_check_has_a_privileged_namespace_of_its_own() -> None:
    """hostNetwork is admitted by the `privileged` level only; felixscan stays `restricted`."""
    objects = render("node-check")
    (namespace,) = find(objects, "Namespace")
    assert namespace["metadata"]["name"] == NODE_CHECK[0] != "felixscan"
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert {o["metadata"].get("namespace") for o in objects if o is not namespace} == \
        {NODE_CHECK[0]}
    for words in ("kubectl apply -k deploy/overlays/node-check", "privileged", "baseline",
                  "host namespaces", "hostpid-patch.yaml"):
        assert words in README, words


def test_node_check_hostpid_patch_adds_hostpid_and_nothing_else(tmp_path: Path) -> None:
    """What the comment in its kustomization.yaml tells the user to uncomment, applied."""
    overlay = tmp_path / "node-check"
    shutil.copytree(DEPLOY / "overlays" / "node-check", overlay)
    kustomization = overlay / "kustomization.yaml"
    commented = "# patchesStrategicMerge:\n# - hostpid-patch.yaml\n"
    assert commented in kustomization.read_text()
    kustomization.write_text(kustomization.read_text().replace(
        commented, "patchesStrategicMerge:\n- hostpid-patch.yaml\n"))
    proc = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    patched = [d for d in yaml.safe_load_all(proc.stdout) if d]
    pod = find(patched, "DaemonSet", "felixscan-node-check")[0]["spec"]["template"]["spec"]
    assert pod.pop("hostPID") is True
    assert patched == render("node-check")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_names_the_objects_refer_to_exist(overlay: str) -> None:
    objects = render(overlay, with_prerequisites=True)
    have = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for name, template in pod_templates(objects):
        pod = template["spec"]
        assert ("ServiceAccount", pod["serviceAccountName"]) in have, name
        wanted: list[tuple[str, str, str | None]] = []
        for v in pod.get("volumes") or []:
            if "configMap" in v:
                wanted.append(("ConfigMap", v["configMap"]["name"], None))
            if "secret" in v:
                wanted += [("Secret", v["secret"]["secretName"], i["key"])
                           for i in v["secret"].get("items") or [{"key": None}]]
            if "persistentVolumeClaim" in v:
                wanted.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"],
                               None))
        for c in pod["containers"]:
            for e in c.get("env") or []:
                for ref_kind, kind in (("secretKeyRef", "Secret"),
                                       ("configMapKeyRef", "ConfigMap")):
                    ref = (e.get("valueFrom") or {}).get(ref_kind)
                    if ref:
                        wanted.append((kind, ref["name"], ref["key"]))
        for kind, ref_name, ref_key in wanted:
            if (kind, ref_name) in have:
                continue
            keys = USER_CREATED.get((kind, ref_name))
            assert keys is not None, f"{name} needs {kind} {ref_name}, which nothing creates"
            assert ref_key is None or ref_key in keys, (name, kind, ref_name, ref_key)
            # ... and the README tells the user to create it, with that key.
            assert ref_name in README and all(f"--from-literal={k}=" in README for k in keys), \
                f"deploy/README.md does not say how to create {kind} {ref_name}"
    roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    # A binding may name an account of another overlay (valuefrom-access names the remediator
    # too); Kubernetes allows that, but the account must be one deploy/ creates.
    accounts = {key(o) for other in OVERLAYS for o in render(other)
                if o["kind"] == "ServiceAccount"}
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace", "") if ref["kind"] == "Role" else ""
        assert (ref["kind"], namespace, ref["name"]) in roles, key(binding)
        for s in binding["subjects"]:
            assert ("ServiceAccount", s["namespace"], s["name"]) in accounts, key(binding)


def test_serve_is_bound_to_no_role() -> None:
    objects = [o for overlay in OVERLAYS for o in render(overlay)]
    assert not grants(objects, ("felixscan", "felixscan-serve"))


def test_every_image_is_this_version() -> None:
    images = {c["image"] for o in OVERLAYS for _, t in pod_templates(render(o))
              for c in t["spec"]["containers"]}
    assert images == {IMAGE}


def test_readme_installs_upgrades_and_uninstalls_every_overlay() -> None:
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/overlays/{overlay}" in README, overlay
    for words in ("kubectl delete -k", "Upgrade", "Uninstall", "hostNetwork", "InternalIP",
                  "docker build -f deploy/Dockerfile"):
        assert words in README, words


# --- the image -----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in dockerfile():
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def dockerfile_user() -> tuple[int, int]:
    user = [args for word, args in stages()[-1] if word == "USER"]
    uid, _, gid = user[-1].partition(":")
    return int(uid), int(gid or uid)


def test_dockerfile() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "multi-stage"
    build, final = all_stages[0], all_stages[-1]
    arg = dict(a.partition("=")[::2] for w, a in dockerfile() if w == "ARG" and "=" in a)
    base = final[0][1].replace("${PYTHON_IMAGE}", arg.get("PYTHON_IMAGE", ""))
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    build_name = build[0][1].split()[-1]
    assert ("COPY", f"--from={build_name} /opt/felixscan /opt/felixscan") in final
    final_text = " ".join(args for _, args in final)
    for tool in ("gcc", "g++", "build-essential", "make", "-dev ", "pip install"):
        assert tool not in final_text + " ", f"{tool} in the final stage"
    for package in ("libpango-1.0-0", "libpangoft2-1.0-0", "fonts-dejavu-core"):
        assert package in final_text
    uid, gid = dockerfile_user()
    assert uid > 0 and gid > 0  # numeric, so runAsNonRoot can check it
    assert ("ENTRYPOINT", '["felixscan"]') in final
    env = " ".join(args for word, args in final if word == "ENV")
    assert "HOME=/tmp" in env  # the emptyDir of every pod; the root filesystem is read-only


def build_context() -> list[str]:
    """What the build stage copies from the repository (the image's sources)."""
    return [source for word, args in stages()[0] if word == "COPY" and not args.startswith("--")
            for source in args.split()[:-1]]


def test_image_gets_every_package_the_project_ships() -> None:
    copied = set(build_context())
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} | {"pyproject.toml", PYPROJECT["project"]["readme"]} \
        == copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for path in copied:
        assert f"!{path}" in ignore or f"!{path}/**" in ignore, path


def _requirement(text: str) -> tuple[str, frozenset[str], SpecifierSet]:
    req = Requirement(text)
    return canonicalize_name(req.name), frozenset(req.extras), req.specifier


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    env: dict[str, str]

    def run(self, *cmd: str | Path, cwd: Path | None = None) -> str:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                              cwd=cwd or self.venv.parent, env=self.env, timeout=600,
                              check=False)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """What the image build does, minus the container: the project's wheel built from exactly
    the files the Dockerfile copies, installed with its declared dependencies (and nothing
    else) into a fresh virtualenv without pip."""
    tmp = tmp_path_factory.mktemp("image")
    src = tmp / "src"
    for path in build_context():
        source = ROOT / path
        if source.is_dir():
            shutil.copytree(source, src / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(source, src / path)
    # HOME as in the image; no PYTHONPATH or VIRTUAL_ENV leaking this checkout in.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "LANG": "C.UTF-8"}
    pip = Installed(Path(), tmp / "venv", {**os.environ, "PYTHONPATH": ""})
    # pip's own cache is used on purpose: this is about the dependency set, not the network.
    pip.run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", src)
    wheel, = (tmp / "dist").glob("felixscan-*.whl")
    pip.run(sys.executable, "-m", "venv", "--without-pip", pip.venv)
    pip.run(sys.executable, "-m", "pip", "--python", pip.venv / "bin" / "python", "install",
            "-q", "--no-compile", wheel)
    return Installed(wheel, pip.venv, env)


def _requirement(text: str) -> tuple[str, frozenset[str], SpecifierSet]:
    req = Requirement(text)
    return canonicalize_name(req.name), frozenset(req.extras), req.specifier


@pytest.mark.slow
def test_wheel_declares_the_dependencies_of_pyproject(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        meta = z.read(f"felixscan-{VERSION}.dist-info/METADATA").decode()
    requires = {_requirement(line.split(":", 1)[1]) for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert requires == {_requirement(d) for d in PYPROJECT["project"]["dependencies"]}


@pytest.mark.slow
def test_cli_runs_from_the_clean_virtualenv(installed: Installed) -> None:
    felixscan, python = installed.venv / "bin" / "felixscan", installed.venv / "bin" / "python"
    assert "scan" in installed.run(felixscan, "--help")
    # Every module imports: a dependency used in the code but missing from pyproject (so
    # missing from the image) fails here.
    where = installed.run(python, "-c", "import importlib, pkgutil, reports, scanner\n"
                          "for pkg in (scanner, reports):\n"
                          "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
                          "        if not m.name.endswith('__main__'):\n"
                          "            importlib.import_module(m.name)\n"
                          "print(scanner.__file__)")
    assert where.startswith(str(installed.venv)), where  # the wheel's code, not this checkout
    db = f"sqlite:///{installed.venv.parent / 'fresh.db'}"
    upgraded = installed.run(felixscan, "db", "upgrade", "--db", db)
    assert "from empty to" in upgraded
    assert installed.run(felixscan, "db", "current", "--db", db).strip() == upgraded.split()[-1]


@pytest.mark.slow
def test_serve_runs_as_its_deployment_says(installed: Installed, tmp_path: Path) -> None:
    """The Deployment's args and env, with its mounts mapped to directories: the probes answer,
    the token from the Secret's file guards the API, SQLite lands on the volume."""
    _, c = serve_container(render("serve"))
    data = tmp_path / "data"  # the PersistentVolumeClaim, c["workingDir"]
    data.mkdir()
    env = dict(installed.env)
    for entry in c["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        # valueFrom: only the optional FELIXSCAN_DB, absent as when its Secret is absent
    token_file = tmp_path / PurePosixPath(env["FELIXSCAN_WEB_TOKEN_FILE"]).name
    token_file.write_text("0123456789abcdef0123456789abcdef\n")
    env["FELIXSCAN_WEB_TOKEN_FILE"] = str(token_file)
    host, _, port = c["args"][c["args"].index("--listen") + 1].rpartition(":")
    args = [a.replace(f"{host}:{port}", f"{host}:0") for a in c["args"]]  # any free port
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([installed.venv / "bin" / "felixscan", *args], cwd=data,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "listening on http://" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        port = log.read_text().split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}"

        def get(path: str, token: str | None = None) -> int:
            request = urllib.request.Request(base + path)
            if token:
                request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert get(c[probe]["httpGet"]["path"]) == 200, probe
        assert get("/api/clusters") == 401
        assert get("/api/clusters", token_file.read_text().strip()) == 200
        assert (data / "felixscan.db").exists()  # on the volume, not in the image
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()


def test_every_manifest_file_is_rendered_by_some_overlay() -> None:
    """A file that no kustomization lists would be silently left out of every install."""
    rendered = {key(o) for overlay in OVERLAYS for o in render(overlay)}
    for path in DEPLOY.rglob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert key(doc) in rendered, (str(path.relative_to(DEPLOY)), key(doc))


def test_valuefrom_access_ships_placeholders_only() -> None:
    """What users edit (README): the Role's names, and its namespace for operator installs."""
    role = find(render("valuefrom-access"), "Role", "felixscan-valuefrom")[0]
    assert role["metadata"]["namespace"] == "kube-system"
    assert {r["resources"][0]: r["resourceNames"] for r in role["rules"]} == {
        "configmaps": [PLACEHOLDER_CONFIGMAP], "secrets": [PLACEHOLDER_SECRET]}
    assert "deploy/overlays/valuefrom-access/role.yaml" in README
