"""scanner.emulator.components: Typha and calico-kube-controllers in an emulated cluster, their
controllers' moves, and the listeners that follow what each pod's process would serve."""

from __future__ import annotations

import itertools
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from scanner.emulator import KubeEmulator, NodeSpec, build_calico_cluster, write_kubeconfig
from scanner.emulator.components import (
    Component,
    ComponentHandle,
    Serving,
    add_kube_controllers,
    add_typha,
    kcc_crd_fixture,
    typha_serving,
)
from scanner.emulator.components import find_component_fixture as _find
from scanner.emulator.fleet import ClusterHandle
from scanner.emulator.nodes import NodeFleet, address_for

CALICO = Path(__file__).resolve().parents[1] / "fixtures" / "calico"
VERSIONS = sorted(p.name.split("-", 1)[0] for p in CALICO.glob("*-calico-typha-deployment-*"))
ENABLED = "TYPHA_PROMETHEUSMETRICSENABLED"
# Listener addresses of this file's own: 127.39.x.y, offset by process (see scan_harness).
_addresses: Iterator[int] = itertools.count((os.getpid() % 64) * 1016)


def find_component_fixture(component: Component, version: str) -> Path:
    return _find(component, version, folder=CALICO)


def _address() -> str:
    return address_for(next(_addresses), base="127.39.0.0")


@pytest.fixture
def fleet() -> Iterator[NodeFleet]:
    with NodeFleet() as running:
        yield running


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as server:
        yield server


def _cluster(emu: KubeEmulator, install: str = "manifest", nodes: int = 2,
             version: str = "v3.32.1", **build: Any) -> ClusterHandle:
    specs = [NodeSpec(name=f"n{i}", address=_address()) for i in range(nodes)]
    return build_calico_cluster(
        emu, daemonset_yaml=CALICO / f"{version}-calico-daemonset-calico-node.yaml",
        nodes=specs, install=install, **build)  # type: ignore[arg-type]


def _address_of(emu: KubeEmulator, node: str) -> str:
    obj = emu.get_object("v1", "Node", node)
    assert obj is not None
    return str(next(a["address"] for a in obj["status"]["addresses"]
                    if a["type"] == "InternalIP"))


def _get(address: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def _refused(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((address, port)) != 0


def _env(component: ComponentHandle) -> dict[str, Any]:
    container = component.deployment_object()["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container.get("env") or []}


_SERVER_FIELDS = ("uid", "creationTimestamp", "resourceVersion", "generation",
                  "ownerReferences", "namespace")


# --- the objects ----------------------------------------------------------------------------


@pytest.mark.parametrize("install", ["manifest", "operator"])
@pytest.mark.parametrize("version", VERSIONS)
def test_release_deployments_are_stored_as_released(emu: KubeEmulator, version: str,
                                                    install: str) -> None:
    handle = _cluster(emu, install, version=version)
    typha = add_typha(handle, deployment_yaml=find_component_fixture("typha", version),
                      nodes=["n0", "n1"])
    kc = add_kube_controllers(
        handle, deployment_yaml=find_component_fixture("kube-controllers", version),
        pod_ip=_address())
    namespace = "kube-system" if install == "manifest" else "calico-system"
    kinds: tuple[tuple[ComponentHandle, Component], ...] = (
        (typha, "typha"), (kc, "kube-controllers"))
    for component, kind in kinds:
        released = yaml.safe_load(find_component_fixture(kind, version).read_text())
        stored = component.deployment_object()
        assert stored["metadata"]["namespace"] == namespace
        owners = stored["metadata"].get("ownerReferences") or []
        assert [o["kind"] for o in owners] == (["Installation"] if install == "operator"
                                               else [])
        for key in _SERVER_FIELDS:
            stored["metadata"].pop(key, None)
        released["metadata"].pop("namespace")
        assert stored["metadata"] == released["metadata"]
        spec = dict(stored["spec"])
        assert spec.pop("replicas") == (2 if kind == "typha" else 1)
        released["spec"].pop("replicas")
        assert spec == released["spec"]  # template unmodified: no env asked for
        status = stored["status"]
        assert status["observedGeneration"] == component.deployment_object()["metadata"][
            "generation"]
        assert status["readyReplicas"] == status["replicas"] == status["updatedReplicas"]
    # KubeControllersConfiguration: the release's CRD, and `default` as kube-controllers
    # writes it
    crd = emu.get_object("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                         "kubecontrollersconfigurations.crd.projectcalico.org")
    released_crd = yaml.safe_load(kcc_crd_fixture(CALICO).read_text())
    assert crd is not None and crd["spec"] == released_crd["spec"]
    kcc = kc.kcc_object()
    assert kcc is not None and kcc["spec"]["prometheusMetricsPort"] == 9094
    assert kcc["status"]["environmentVars"]["DATASTORE_TYPE"] == "kubernetes"


def test_pods_as_the_deployment_controller_makes_them(emu: KubeEmulator) -> None:
    handle = _cluster(emu, nodes=3)
    typha = add_typha(handle, deployment_yaml=find_component_fixture("typha", "v3.32.1"),
                      nodes=["n0", "n2"], ready={"n2": False})
    pod_ip = _address()
    kc = add_kube_controllers(
        handle, deployment_yaml=find_component_fixture("kube-controllers", "v3.32.1"),
        pod_ip=pod_ip, node="n1")
    pods = {p["spec"]["nodeName"]: p for p in typha.pods()}
    assert set(pods) == {"n0", "n2"}
    template_hash = typha.template_hash
    for node, pod in pods.items():
        assert pod["spec"]["hostNetwork"] is True
        assert pod["status"]["podIP"] == pod["status"]["hostIP"] == _address_of(emu, node)
        assert pod["metadata"]["labels"] == {"k8s-app": "calico-typha",
                                             "pod-template-hash": template_hash}
        assert pod["metadata"]["name"].startswith(f"calico-typha-{template_hash}-")
        (owner,) = pod["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("ReplicaSet", f"calico-typha-{template_hash}")
    ready = {n: next(c["status"] for c in p["status"]["conditions"] if c["type"] == "Ready")
             for n, p in pods.items()}
    assert ready == {"n0": "True", "n2": "False"}
    assert typha.deployment_object()["status"]["readyReplicas"] == 1
    (pod,) = kc.pods()
    assert "hostNetwork" not in pod["spec"]
    assert (pod["spec"]["nodeName"], pod["status"]["podIP"], pod["status"]["hostIP"]) == \
        ("n1", pod_ip, _address_of(emu, "n1"))


def test_through_the_real_client(emu: KubeEmulator, tmp_path: Path) -> None:
    handle = _cluster(emu, "operator")
    add_typha(handle, deployment_yaml=find_component_fixture("typha", "v3.30.7"), nodes=["n1"])
    add_kube_controllers(handle, deployment_yaml=find_component_fixture("kube-controllers",
                                                                        "v3.30.7"),
                         pod_ip=_address(), kcc_port=None)
    from kubernetes import config as kube_config

    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"c": emu})
    api = kube_config.new_client_from_config(str(kubeconfig), context="c")
    try:
        deployment: Any = client.AppsV1Api(api).read_namespaced_deployment(
            "calico-typha", "calico-system")
        assert deployment.spec.template.spec.host_network is True
        assert deployment.status.ready_replicas == 1
        pods: Any = client.CoreV1Api(api).list_namespaced_pod(
            "calico-system", label_selector="k8s-app=calico-typha")
        assert [p.spec.node_name for p in pods.items] == ["n1"]
        kcc: Any = client.CustomObjectsApi(api).get_cluster_custom_object(
            "crd.projectcalico.org", "v1", "kubecontrollersconfigurations", "default")
        assert "prometheusMetricsPort" not in kcc["spec"]
    finally:
        api.close()


@pytest.mark.parametrize(("kcc_port", "stored"), [
    (9094, 9094), (0, 0), (None, "absent"), ("missing", None)])
def test_kube_controllers_configuration_variants(emu: KubeEmulator, fleet: NodeFleet,
                                                 kcc_port: Any, stored: Any) -> None:
    handle = _cluster(emu, nodes=1)
    kc = add_kube_controllers(
        handle, deployment_yaml=find_component_fixture("kube-controllers", "v3.32.1"),
        pod_ip=_address(), kcc_port=kcc_port, fleet=fleet)
    kcc = kc.kcc_object()
    if stored is None:
        assert kcc is None
    else:
        assert kcc is not None
        assert kcc["spec"].get("prometheusMetricsPort", "absent") == stored
    # it serves 9094 when the port says so, and without the object (it would create it)
    serves = kcc_port in (9094, "missing")
    assert [s.enabled for s in kc.serving().values()] == [serves]
    assert bool(kc.listening()) is serves
    if serves:
        assert "ipam_allocations_in_use" in _get(str(kc.pod_ip), 9094)
    else:
        assert _refused(str(kc.pod_ip), 9094)


def test_kcc_in_the_native_v3_group(emu: KubeEmulator) -> None:
    handle = _cluster(emu, nodes=1, felix_api="projectcalico.org/v3")
    kc = add_kube_controllers(
        handle, deployment_yaml=find_component_fixture("kube-controllers", "v3.32.1"),
        pod_ip=_address(), kcc_port=0)
    assert kc.kcc_api == "projectcalico.org/v3"
    assert not [r for r in emu.resources if r.group == "crd.projectcalico.org"]
    obj = emu.get_object("projectcalico.org/v3", "KubeControllersConfiguration", "default")
    assert obj is not None and obj["spec"]["prometheusMetricsPort"] == 0


# --- listeners --------------------------------------------------------------------------------


def test_typha_listeners_follow_the_declared_state(emu: KubeEmulator, fleet: NodeFleet) -> None:
    handle = _cluster(emu, nodes=2)
    typha = add_typha(handle, deployment_yaml=find_component_fixture("typha", "v3.32.1"),
                      nodes=["n0", "n1"], env={ENABLED: "true"}, fleet=fleet)
    for node in ("n0", "n1"):
        body = _get(_address_of(emu, node), 9093)
        assert "typha_connections_active" in body and "felix_" not in body
    typha.update_env({ENABLED: "false"})
    assert typha.listening() == {}
    assert all(_refused(_address_of(emu, n), 9093) for n in ("n0", "n1"))
    # forced kinds, per address or everywhere, whatever is declared
    typha.set_listener("silent", address=_address_of(emu, "n1"))
    assert typha.listening() == {(_address_of(emu, "n1"), 9093): "silent"}
    typha.set_listener(None, address=_address_of(emu, "n1"))
    typha.set_listener("typha-http")
    assert len(typha.listening()) == 2
    typha.set_listener(None)
    assert typha.listening() == {}


def test_a_listener_of_someone_else_is_not_taken_over(emu: KubeEmulator,
                                                      fleet: NodeFleet) -> None:
    handle = _cluster(emu, nodes=1)
    fleet.add(_address_of(emu, "n0"), "other", port=9093)
    with pytest.raises(ValueError, match="already has a listener"):
        add_typha(handle, deployment_yaml=find_component_fixture("typha", "v3.32.1"),
                  nodes=["n0"], env={ENABLED: "true"}, fleet=fleet)


def test_fleet_remove_frees_the_address_for_a_new_listener(fleet: NodeFleet) -> None:
    address = _address()
    fleet.add(address, "typha-http", port=9093)
    assert "typha_" in _get(address, 9093)
    assert fleet.remove(address, 9093) and not fleet.remove(address, 9093)
    assert _refused(address, 9093)
    fleet.add(address, "kube-controllers-http", port=9093)
    assert "ipam_blocks" in _get(address, 9093)


# --- the controllers --------------------------------------------------------------------------


def test_template_change_rolls_typha_with_surge(emu: KubeEmulator, fleet: NodeFleet) -> None:
    handle = _cluster(emu, nodes=2)
    typha = add_typha(handle, deployment_yaml=find_component_fixture("typha", "v3.29.7"),
                      nodes=["n0", "n1"], env={ENABLED: "true"}, fleet=fleet)
    typha.simulate_controllers(roll_delay=0.2)
    old = set(typha.pod_names())
    generation = typha.deployment_object()["metadata"]["generation"]
    deployment = typha.deployment_object()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != ENABLED]
    emu.replace(deployment)  # `kubectl edit`, as remediation's patch would
    assert typha.deployment_object()["status"]["observedGeneration"] == generation + 1
    assert set(typha.pod_names()) == old  # not yet: the rollout is 0.2 s away
    assert typha.wait_rollout(10)
    new = set(typha.pod_names())
    assert len(new) == 2 and not new & old
    assert typha.listening() == {}
    status = typha.deployment_object()["status"]
    assert status["updatedReplicas"] == status["readyReplicas"] == 2


def test_roll_can_stop_mid_surge(emu: KubeEmulator, fleet: NodeFleet) -> None:
    handle = _cluster(emu, nodes=1)
    typha = add_typha(handle, deployment_yaml=find_component_fixture("typha", "v3.32.1"),
                      nodes=["n0"], env={ENABLED: "true"}, fleet=fleet)
    typha.update_env({ENABLED: "false"}, roll=False)
    assert not typha.wait_rollout(0)
    typha.roll(finish=False)
    assert [p["spec"]["nodeName"] for p in typha.pods()] == ["n0", "n0"]
    assert sorted(s.enabled for s in typha.serving().values()) == [False, True]
    assert len(typha.listening()) == 1  # the old process still serves on the node
    typha.finish_rollout()
    assert typha.wait_rollout(0)
    assert [s.enabled for s in typha.serving().values()] == [False]
    assert typha.listening() == {}


def test_kcc_change_restarts_kube_controllers(emu: KubeEmulator, fleet: NodeFleet) -> None:
    handle = _cluster(emu, nodes=1)
    kc = add_kube_controllers(
        handle, deployment_yaml=find_component_fixture("kube-controllers", "v3.32.1"),
        pod_ip=_address(), fleet=fleet)
    kc.simulate_controllers()
    (name,) = kc.pod_names()
    kc.set_kcc_port(0)
    assert kc.pod_names() == [name]
    (status,) = kc.pods()[0]["status"]["containerStatuses"]
    assert (status["restartCount"], status["lastState"]["terminated"]["exitCode"]) == (1, 129)
    assert kc.listening() == {}
    kc.set_kcc_port(9095)
    assert list(kc.listening()) == [(kc.pod_ip, 9095)]
    # deleted: kube-controllers restarts and creates it again, with 9094
    kc.set_kcc_port("missing")
    kcc = kc.kcc_object()
    assert kcc is not None and kcc["spec"]["prometheusMetricsPort"] == 9094
    assert list(kc.listening()) == [(kc.pod_ip, 9094)]
    assert kc.restarts == 3
    # a status write by kube-controllers itself restarts nothing
    emu.patch_object("crd.projectcalico.org/v1", "KubeControllersConfiguration", "default",
                     {"status": {"runningConfig": {"healthChecks": "Enabled"}}})
    assert kc.restarts == 3
    kc.stop_controllers()
    kc.set_kcc_port(0)
    assert kc.restarts == 3 and kc.listening()  # nothing reacts any more


def test_missing_kcc_is_created_when_kube_controllers_starts_again(emu: KubeEmulator) -> None:
    handle = _cluster(emu, nodes=1)
    addresses = iter([_address(), _address()])
    kc = add_kube_controllers(
        handle, deployment_yaml=find_component_fixture("kube-controllers", "v3.26.4"),
        pod_ip=next(addresses), kcc_port="missing", next_pod_ip=lambda: next(addresses))
    assert kc.kcc_object() is None
    first = kc.pod_ip
    kc.update_env({"LOG_LEVEL": "debug"})  # Recreate: the old pod goes, a new one starts
    assert kc.pod_ip != first and len(kc.pod_names()) == 1
    kcc = kc.kcc_object()
    assert kcc is not None and kcc["spec"]["prometheusMetricsPort"] == 9094


def test_operator_renders_typha_metrics_from_the_installation(emu: KubeEmulator,
                                                              fleet: NodeFleet) -> None:
    handle = _cluster(emu, "operator", nodes=2)
    typha = add_typha(handle, deployment_yaml=find_component_fixture("typha", "v3.32.1"),
                      nodes=["n0", "n1"], fleet=fleet, typha_metrics_port=9093)
    env = typha.deployment_object()["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env[-2:]] == [ENABLED, "TYPHA_PROMETHEUSMETRICSPORT"]
    assert _env(typha)[ENABLED] == "true" and len(typha.listening()) == 2
    typha.simulate_controllers()
    handle.simulate_controllers()  # the calico-node side of the operator too
    # a manual edit is reverted by the operator
    typha.update_env({ENABLED: "false"}, roll=False)
    assert _env(typha)[ENABLED] == "true"
    # the Installation decides
    emu.patch_object("operator.tigera.io/v1", "Installation", "default",
                     {"spec": {"typhaMetricsPort": None}})
    assert typha.wait_rollout(10)
    assert ENABLED not in _env(typha) and typha.listening() == {}
    emu.patch_object("operator.tigera.io/v1", "Installation", "default",
                     {"spec": {"typhaMetricsPort": 9193}})
    assert typha.wait_rollout(10)
    assert _env(typha)["TYPHA_PROMETHEUSMETRICSPORT"] == "9193"
    assert {port for _a, port in typha.listening()} == {9193}
    handle.stop_controllers()


def test_typha_metrics_port_needs_an_operator_install(emu: KubeEmulator) -> None:
    handle = _cluster(emu, nodes=1)
    with pytest.raises(ValueError, match="operator"):
        add_typha(handle, deployment_yaml=find_component_fixture("typha", "v3.32.1"),
                  nodes=["n0"], typha_metrics_port=9093)


# --- Typha's own reading of its configuration -------------------------------------------------


@pytest.mark.parametrize(("environ", "cfg", "expected"), [
    ([], None, Serving(False, 9093, source="default (false)")),
    ([(ENABLED, "true")], None, Serving(True, 9093)),
    ([("typha_PrometheusMetricsEnabled", "Y")], None, Serving(True, 9093)),
    ([(ENABLED, "")], None, Serving(False, 9093)),  # dropped
    ([(ENABLED, "None")], None, Serving(False, 9093)),  # the zero value
    ([(ENABLED, "on")], None, Serving(False, 9093)),  # invalid: the default
    ([(ENABLED, "true"), ("TYPHA_PROMETHEUSMETRICSPORT", "0x23f5")], None, Serving(True, 9205)),
    ([(ENABLED, "true"), ("TYPHA_PROMETHEUSMETRICSPORT", "none")], None, Serving(True, 0)),
    ([(ENABLED, "true"), ("TYPHA_PROMETHEUSMETRICSPORT", "70000")], None, Serving(True, 9093)),
    ([(ENABLED, "true"), ("TYPHA_PROMETHEUSMETRICSHOST", "127.0.0.1")], None,
     Serving(True, 9093, host="127.0.0.1")),
    # config_params.go resolve: a file key spelled otherwise overrides the environment ...
    ([(ENABLED, "true")], {"prometheusmetricsenabled": "false"}, Serving(False, 9093)),
    # ... the canonical spelling does not
    ([(ENABLED, "true")], {"PrometheusMetricsEnabled": "false"}, Serving(True, 9093)),
    ([], {"PrometheusMetricsEnabled": "true"}, Serving(True, 9093)),
    ([(ENABLED, "false")], {"PROMETHEUSMETRICSENABLED": "true"}, Serving(True, 9093)),
])
def test_typha_serving(environ: list[tuple[str, str]], cfg: dict[str, str] | None,
                       expected: Serving) -> None:
    got = typha_serving(environ, cfg)
    assert (got.enabled, got.port, got.host, got.tls) == \
        (expected.enabled, expected.port, expected.host, expected.tls)


def test_the_package_ships_what_the_emulator_needs() -> None:
    """The demo has no tests/ folder: the KubeControllersConfiguration CRD and two releases'
    Deployments come with the package, identical to the test fixtures."""
    for name in ("v3.32.1-crd-kubecontrollersconfigurations.crd.projectcalico.org.yaml",
                 "v3.32.1-calico-typha-deployment-calico-typha.yaml",
                 "v3.30.7-calico-deployment-calico-kube-controllers.yaml"):
        shipped = Path(_find("typha", "v3.32.1").parent, name)
        assert shipped.read_bytes() == (CALICO / name).read_bytes()
    assert kcc_crd_fixture().parent == _find("kube-controllers", "v3.30.7").parent


def test_typha_tls_only_from_3_32() -> None:
    environ = [(ENABLED, "true"), ("TYPHA_PROMETHEUSMETRICSKEYFILE", "/k")]
    assert typha_serving(environ, None, version=(3, 32, 0)).tls is True
    assert typha_serving(environ, None, version=(3, 31, 7)).tls is False
    address = "127.0.0.1"
    assert Serving(True, 9093).listens_on(address)
    assert not Serving(True, 9093, host="127.0.0.2").listens_on(address)
    assert not Serving(True, 0).listens_on(address)
    assert not Serving(False, 9093).listens_on(address)
