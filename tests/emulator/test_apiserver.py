"""The emulated API server and Calico fleet, exercised through the real `kubernetes` client."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from kubernetes import client, watch
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from scanner.core.nodeview import latest_view
from scanner.emulator import (
    KubeEmulator,
    NodeSpec,
    build_calico_cluster,
    find_fixture,
    make_nodes,
    make_self_signed,
    write_kubeconfig,
    write_pem_files,
)
from scanner.emulator.apiserver import (
    json_patch,
    merge_patch,
    parse_label_selector,
    strategic_merge_patch,
)
from scanner.emulator.certs import KeyType, server_ssl_context
from tests.helpers.rbac_rules import Permission, as_rbac_rules
from tests.helpers.scan_harness import Harness

CALICO = Path(__file__).resolve().parents[1] / "fixtures" / "calico"
DAEMONSETS = sorted(CALICO.glob("*-calico-daemonset-calico-node.yaml"))
FIXTURE = CALICO / "v3.32.1-calico-daemonset-calico-node.yaml"


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["http", "https"])
def emu(request: pytest.FixtureRequest) -> Iterator[KubeEmulator]:
    with KubeEmulator(tls=request.param) as server:
        yield server


@pytest.fixture
def http_emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as server:
        yield server


# the client's models make every field Optional; tests treat API answers as Any
config: Any = kube_config
Watch: Any = watch.Watch


class Clients:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core: Any = client.CoreV1Api(api)
        self.apps: Any = client.AppsV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)


def connect(emu: KubeEmulator, tmp_path: Path, **kwargs: Any) -> client.ApiClient:
    path = emu.write_kubeconfig(tmp_path / f"kubeconfig-{time.monotonic_ns()}", **kwargs)
    api: client.ApiClient = config.new_client_from_config(config_file=str(path), context="emulated")
    return api


@pytest.fixture
def kube(emu: KubeEmulator, tmp_path: Path) -> Iterator[Clients]:
    with connect(emu, tmp_path) as api:
        yield Clients(api)


@pytest.fixture
def http_kube(http_emu: KubeEmulator, tmp_path: Path) -> Iterator[Clients]:
    with connect(http_emu, tmp_path) as api:
        yield Clients(api)


def add_nodes(emu: KubeEmulator, count: int) -> list[str]:
    names = [f"node-{n:05d}" for n in range(count)]
    for name in names:
        emu.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    return names


def add_pod(emu: KubeEmulator, name: str, labels: dict[str, str], node: str = "n1") -> None:
    emu.add(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "kube-system", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Running"},
        }
    )


def status_of(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body or "null")
    assert isinstance(body, dict)
    return body


def raw_get(api: client.ApiClient, path: str) -> dict[str, Any]:
    response = api.call_api(
        *api.param_serialize(
            method="GET", resource_path=path, auth_settings=["BearerToken"], header_params={}
        )
    )
    raw: Any = response
    raw.read()
    data = json.loads(raw.data)
    assert isinstance(data, dict)
    return data


def ds_env(ds: dict[str, Any]) -> list[dict[str, Any]]:
    container = next(
        c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "calico-node"
    )
    env = container["env"]
    assert isinstance(env, list)
    return env


# --- basic reads, auth, errors -------------------------------------------------------------


def test_get_object_over_http_and_https(emu: KubeEmulator, kube: Clients) -> None:
    emu.load_yaml(FIXTURE)
    ds = kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    assert ds.metadata.name == "calico-node"
    assert ds.metadata.generation == 1
    assert ds.metadata.uid
    assert int(ds.metadata.resource_version) == emu.resource_version
    assert ds.spec.template.spec.containers[0].image == "quay.io/calico/node:v3.32.1"
    assert emu.url.startswith("https://" if emu.tls else "http://")
    assert (emu.ca_pem is not None) == emu.tls


def test_paged_list_of_1200_nodes(emu: KubeEmulator, kube: Clients) -> None:
    names = add_nodes(emu, 1200)
    seen: list[str] = []
    pages: list[Any] = []
    token = None
    while True:
        page = kube.core.list_node(limit=500, _continue=token)
        pages.append(page)
        seen.extend(n.metadata.name for n in page.items)
        token = page.metadata._continue
        if not token:
            break
    assert len(pages) == 3
    assert [len(p.items) for p in pages] == [500, 500, 200]
    assert [p.metadata.remaining_item_count for p in pages] == [700, 200, None]
    assert seen == sorted(names)  # each once, in key order
    assert len({p.metadata.resource_version for p in pages}) == 1


def test_paging_is_a_consistent_snapshot(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_nodes(http_emu, 10)
    first = http_kube.core.list_node(limit=4)
    http_emu.delete_object("v1", "Node", "node-00007")
    http_emu.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-00005a"}})
    rest = http_kube.core.list_node(limit=100, _continue=first.metadata._continue)
    names = [n.metadata.name for n in first.items + rest.items]
    assert names == [f"node-{n:05d}" for n in range(10)]
    assert rest.metadata.resource_version == first.metadata.resource_version
    fresh = [n.metadata.name for n in http_kube.core.list_node().items]
    assert "node-00007" not in fresh and "node-00005a" in fresh


def test_list_items_are_shaped_like_the_apiserver(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    add_nodes(http_emu, 2)
    http_emu.register_calico_crds()
    http_emu.add(
        {
            "apiVersion": "crd.projectcalico.org/v1",
            "kind": "FelixConfiguration",
            "metadata": {"name": "default"},
        }
    )
    nodes = raw_get(http_kube.api, "/api/v1/nodes")
    assert nodes["kind"] == "NodeList" and nodes["apiVersion"] == "v1"
    assert "kind" not in nodes["items"][0]  # built-in list items carry no kind
    felix = http_kube.custom.list_cluster_custom_object(
        "crd.projectcalico.org", "v1", "felixconfigurations"
    )
    assert felix["kind"] == "FelixConfigurationList"
    assert felix["apiVersion"] == "crd.projectcalico.org/v1"
    assert felix["items"][0]["kind"] == "FelixConfiguration"
    assert felix["items"][0]["metadata"]["generation"] == 1


def test_label_and_field_selectors(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_pod(http_emu, "a", {"k8s-app": "calico-node", "tier": "x"}, node="n1")
    add_pod(http_emu, "b", {"k8s-app": "calico-node", "tier": "y"}, node="n2")
    add_pod(http_emu, "c", {"k8s-app": "other"}, node="n1")
    add_pod(http_emu, "d", {}, node="n3")

    def names(**kwargs: Any) -> list[str]:
        return [
            p.metadata.name
            for p in http_kube.core.list_namespaced_pod("kube-system", **kwargs).items
        ]

    assert names(label_selector="k8s-app=calico-node") == ["a", "b"]
    assert names(label_selector="k8s-app==calico-node,tier=y") == ["b"]
    assert names(label_selector="k8s-app!=calico-node") == ["c", "d"]
    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="!tier") == ["c", "d"]
    assert names(label_selector="tier in (x, z)") == ["a"]
    assert names(label_selector="tier notin (x),k8s-app") == ["b", "c"]
    assert names(field_selector="spec.nodeName=n1") == ["a", "c"]
    assert names(field_selector="spec.nodeName!=n1,metadata.name!=d") == ["b"]
    assert names(label_selector="k8s-app=calico-node", field_selector="metadata.name=b") == ["b"]
    everywhere = http_kube.core.list_pod_for_all_namespaces(label_selector="k8s-app=calico-node")
    assert [p.metadata.name for p in everywhere.items] == ["a", "b"]
    with pytest.raises(ApiException) as bad_field:
        names(field_selector="spec.bogus=1")
    assert bad_field.value.status == 400
    assert status_of(bad_field.value)["message"] == "field label not supported: spec.bogus"
    with pytest.raises(ApiException) as bad_label:
        names(label_selector="tier in x")
    assert bad_label.value.status == 400 and status_of(bad_label.value)["reason"] == "BadRequest"


def test_selector_parser() -> None:
    labels = {"a": "1", "b": "2"}
    cases = {
        "a": True,
        "!a": False,
        "a=1,b=2": True,
        "a in (1,3)": True,
        "a notin (1)": False,
        "c!=x": True,
        "a>0": True,
        "b<2": False,
        "": True,
    }
    for text, expected in cases.items():
        assert all(r.matches(labels) for r in parse_label_selector(text)) is expected, text


def test_401_without_token(emu: KubeEmulator, tmp_path: Path) -> None:
    with connect(emu, tmp_path, token="") as api, pytest.raises(ApiException) as err:
        client.CoreV1Api(api).list_node()
    assert err.value.status == 401
    assert status_of(err.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    with connect(emu, tmp_path, token="wrong") as api, pytest.raises(ApiException) as wrong:
        client.CoreV1Api(api).list_node()
    assert wrong.value.status == 401


def test_404_missing_object_and_unregistered_crd(emu: KubeEmulator, kube: Clients) -> None:
    with pytest.raises(ApiException) as missing:
        kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    assert missing.value.status == 404
    assert status_of(missing.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'daemonsets.apps "calico-node" not found',
        "reason": "NotFound",
        "details": {"name": "calico-node", "group": "apps", "kind": "daemonsets"},
        "code": 404,
    }
    with pytest.raises(ApiException) as no_group:
        kube.custom.list_cluster_custom_object("crd.projectcalico.org", "v1", "felixconfigurations")
    assert no_group.value.status == 404
    assert no_group.value.body in ("404 page not found\n", b"404 page not found\n")
    emu.register_calico_crds()
    listing = kube.custom.list_cluster_custom_object(
        "crd.projectcalico.org", "v1", "felixconfigurations"
    )
    assert listing["items"] == []
    with pytest.raises(ApiException) as no_object:
        kube.custom.get_cluster_custom_object(
            "crd.projectcalico.org", "v1", "felixconfigurations", "default"
        )
    assert (
        status_of(no_object.value)["message"]
        == 'felixconfigurations.crd.projectcalico.org "default" not found'
    )
    with pytest.raises(ApiException) as no_resource:
        kube.custom.list_cluster_custom_object("apps", "v1", "felixconfigurations")
    assert no_resource.value.status == 404
    assert (
        status_of(no_resource.value)["message"]
        == "the server could not find the requested resource"
    )


def test_crd_manifest_registers_its_resource(http_emu: KubeEmulator, http_kube: Clients) -> None:
    http_emu.load_yaml(CALICO / "v3.32.1-crd-felixconfigurations.crd.projectcalico.org.yaml")
    http_emu.load_yaml(
        "apiVersion: crd.projectcalico.org/v1\nkind: FelixConfiguration\n"
        "metadata:\n  name: default\nspec:\n  prometheusMetricsEnabled: true\n"
    )
    got = http_kube.custom.get_cluster_custom_object(
        "crd.projectcalico.org", "v1", "felixconfigurations", "default"
    )
    assert got["spec"] == {"prometheusMetricsEnabled": True}
    crd = client.ApiextensionsV1Api(http_kube.api).read_custom_resource_definition(
        "felixconfigurations.crd.projectcalico.org"
    )
    assert crd.spec.names.kind == "FelixConfiguration"
    groups = client.ApisApi(http_kube.api).get_api_versions()
    assert "crd.projectcalico.org" in [g.name for g in groups.groups]


# --- faults --------------------------------------------------------------------------------


def test_fault_403_is_an_rbac_denial(http_emu: KubeEmulator, http_kube: Clients) -> None:
    fault = http_emu.inject(r"/api/v1/namespaces/kube-system/secrets", status=403)
    with pytest.raises(ApiException) as err:
        http_kube.core.list_namespaced_secret("kube-system")
    body = status_of(err.value)
    assert err.value.status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == (
        'secrets is forbidden: User "system:serviceaccount:felixscan:felixscan" cannot list '
        'resource "secrets" in API group "" in the namespace "kube-system"'
    )
    assert fault.hits == 1
    http_kube.core.list_namespaced_config_map("kube-system")  # other paths unaffected
    assert fault.hits == 1
    assert http_emu.requests[-2].fault and http_emu.requests[-2].status == 403


def test_fault_429_with_retry_after(http_emu: KubeEmulator, http_kube: Clients) -> None:
    once = http_emu.inject(r"/api/v1/nodes$", status=429, retry_after=0, times=1)
    add_nodes(http_emu, 2)
    # urllib3 honours Retry-After on 429 for GETs: one throttled answer is retried transparently
    assert len(http_kube.core.list_node().items) == 2
    assert once.hits == 1
    http_emu.clear_faults()
    always = http_emu.inject(r"/api/v1/nodes$", status=429, retry_after=0)
    with pytest.raises(ApiException) as err:
        http_kube.core.list_node()
    assert err.value.status == 429
    headers: Any = err.value.headers
    assert headers["Retry-After"] == "0"
    assert status_of(err.value)["reason"] == "TooManyRequests"
    assert always.hits == 4  # the first try and urllib3's three retries


@pytest.mark.parametrize(
    ("status", "reason"),
    [(500, "InternalError"), (503, "ServiceUnavailable"), (504, "Timeout"), (410, "Expired")],
)
def test_fault_status_codes(
    http_emu: KubeEmulator, http_kube: Clients, status: int, reason: str
) -> None:
    http_emu.inject(r"/apis/apps/v1/namespaces/kube-system/daemonsets/calico-node", status=status)
    with pytest.raises(ApiException) as err:
        http_kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    assert err.value.status == status
    assert status_of(err.value)["reason"] == reason


def test_fault_malformed_and_truncated_body(http_emu: KubeEmulator, http_kube: Clients) -> None:
    http_emu.inject(r"/api/v1/nodes$", body=b'{"kind":"NodeList","items":[{"metadata":', times=1)
    with pytest.raises(ValueError):
        http_kube.core.list_node()
    add_nodes(http_emu, 1)
    assert len(http_kube.core.list_node().items) == 1  # times=1: the next answer is normal


def test_fault_delay_and_client_timeout(http_emu: KubeEmulator, http_kube: Clients) -> None:
    fault = http_emu.inject(r"/api/v1/nodes$", delay=30)
    started = time.monotonic()
    with pytest.raises(Exception, match=r"[Tt]imed out"):
        http_kube.core.list_node(_request_timeout=0.3)
    assert time.monotonic() - started < 10
    assert fault.hits >= 1
    short = http_emu.inject(r"/api/v1/namespaces$", delay=0.2)
    started = time.monotonic()
    http_kube.core.list_namespace()
    assert time.monotonic() - started >= 0.2 and short.hits == 1


def test_fault_dropped_connection(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_nodes(http_emu, 1)
    fault = http_emu.inject(r"/api/v1/nodes$", drop=True, times=1)
    # the client's connection retry hides a single drop on an idempotent GET
    assert len(http_kube.core.list_node().items) == 1
    assert fault.hits == 1
    assert [r.status for r in http_emu.requests if r.path == "/api/v1/nodes"] == [0, 200]


def test_stop_does_not_wait_for_hanging_handlers() -> None:
    emu = KubeEmulator().start()
    fault = emu.inject(".*", delay=60, method="*")
    outcome: list[str] = []

    def hang() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=30)
        try:
            conn.request("GET", "/api/v1/nodes", headers={"Authorization": "Bearer emulator-token"})
            conn.getresponse().read()
            outcome.append("answered")
        except (OSError, http.client.HTTPException):
            outcome.append("dropped")
        finally:
            conn.close()

    worker = threading.Thread(target=hang)
    worker.start()
    deadline = time.monotonic() + 5
    while not any(f.hits for f in [fault]) and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    emu.stop()
    assert time.monotonic() - started < 2
    worker.join(5)
    assert not worker.is_alive() and outcome == ["dropped"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", emu.port), timeout=1).close()


def test_restart_keeps_port_and_objects(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_nodes(http_emu, 3)
    port = http_emu.port
    http_emu.stop()
    with pytest.raises(Exception):  # noqa: B017 - any connection error will do
        http_kube.core.list_node(_request_timeout=1)
    http_emu.start()
    assert http_emu.port == port
    assert len(http_kube.core.list_node().items) == 3


# --- continue tokens -----------------------------------------------------------------------


def test_410_on_expired_continue(emu: KubeEmulator, kube: Clients) -> None:
    add_nodes(emu, 20)
    first = kube.core.list_node(limit=5)
    emu.expire_continue_tokens()
    with pytest.raises(ApiException) as err:
        kube.core.list_node(limit=5, _continue=first.metadata._continue)
    assert err.value.status == 410
    body = status_of(err.value)
    assert body["reason"] == "Expired" and body["code"] == 410
    assert body["message"].startswith("The provided continue parameter is too old")
    # the token in the 410 continues (inconsistently) at the current revision
    rest = kube.core.list_node(limit=100, _continue=body["metadata"]["continue"])
    assert rest.items[0].metadata.name == "node-00005"
    fresh = kube.core.list_node(limit=5)  # a new list works straight after compaction
    assert len(kube.core.list_node(limit=100, _continue=fresh.metadata._continue).items) == 15


def test_continue_expires_after_configured_writes(tmp_path: Path) -> None:
    with KubeEmulator(continue_expiry_writes=5) as emu, connect(emu, tmp_path) as api:
        core: Any = client.CoreV1Api(api)
        add_nodes(emu, 10)
        first = core.list_node(limit=3)
        for n in range(3):
            emu.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{n}"}})
        assert len(core.list_node(limit=3, _continue=first.metadata._continue).items) == 3
        for n in range(3, 6):
            emu.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{n}"}})
        with pytest.raises(ApiException) as err:
            core.list_node(limit=3, _continue=first.metadata._continue)
        assert err.value.status == 410


def test_garbage_continue_token_is_a_bad_request(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    with pytest.raises(ApiException) as err:
        http_kube.core.list_node(limit=3, _continue="not-a-token")
    assert err.value.status == 400


# --- writes --------------------------------------------------------------------------------


def test_strategic_merge_patch_of_one_env_var(emu: KubeEmulator, kube: Clients) -> None:
    emu.load_yaml(FIXTURE)
    path = "/apis/apps/v1/namespaces/kube-system/daemonsets/calico-node"
    before = raw_get(kube.api, path)
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "calico-node",
                            "env": [{"name": "FELIX_PROMETHEUSMETRICSENABLED", "value": "false"}],
                        }
                    ]
                }
            }
        }
    }
    result = kube.apps.patch_namespaced_daemon_set("calico-node", "kube-system", patch)
    assert emu.requests[-1].content_type == "application/strategic-merge-patch+json"
    assert emu.requests[-1].verb == "patch"
    assert result.metadata.generation == 2
    after = raw_get(kube.api, path)
    old_env, new_env = ds_env(before), ds_env(after)
    assert [json.dumps(e) for e in new_env[:-1]] == [json.dumps(e) for e in old_env]
    assert new_env[-1] == {"name": "FELIX_PROMETHEUSMETRICSENABLED", "value": "false"}
    # nothing else in the object moved
    for doc in (before, after):
        del ds_env(doc)[len(old_env) :]
        del doc["metadata"]["resourceVersion"], doc["metadata"]["generation"]
    assert json.dumps(before) == json.dumps(after)

    # an existing entry is changed in place
    patch["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "FELIX_HEALTHENABLED", "value": "false"}
    ]
    kube.apps.patch_namespaced_daemon_set("calico-node", "kube-system", patch)
    env = ds_env(raw_get(kube.api, path))
    index = [e["name"] for e in old_env].index("FELIX_HEALTHENABLED")
    assert env[index] == {"name": "FELIX_HEALTHENABLED", "value": "false"}
    assert len(env) == len(old_env) + 1


def test_patch_status_is_ignored_on_the_main_resource(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    http_emu.load_yaml(FIXTURE)
    http_emu.patch_object(
        "apps/v1",
        "DaemonSet",
        "calico-node",
        {"status": {"numberReady": 3}},
        namespace="kube-system",
    )
    result = http_kube.apps.patch_namespaced_daemon_set(
        "calico-node",
        "kube-system",
        {"status": {"numberReady": 99}, "metadata": {"labels": {"x": "y"}}},
    )
    assert result.status.number_ready == 3
    assert result.metadata.labels["x"] == "y"
    assert result.metadata.generation == 1  # labels are metadata: no new generation
    status = http_kube.apps.patch_namespaced_daemon_set_status(
        "calico-node", "kube-system", {"status": {"numberReady": 7}}
    )
    assert status.status.number_ready == 7 and status.metadata.generation == 1


def test_dry_run_leaves_the_store_unchanged(emu: KubeEmulator, kube: Clients) -> None:
    emu.load_yaml(FIXTURE)
    before = emu.get_object("apps/v1", "DaemonSet", "calico-node", "kube-system")
    rv = emu.resource_version
    patch = [
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/env/-",
            "value": {"name": "FELIX_PROMETHEUSMETRICSENABLED", "value": "false"},
        }
    ]
    dry = kube.apps.patch_namespaced_daemon_set("calico-node", "kube-system", patch, dry_run="All")
    assert dry.spec.template.spec.containers[0].env[-1].value == "false"
    assert dry.metadata.generation == 2
    assert (
        emu.requests[-1].dry_run and emu.requests[-1].content_type == "application/json-patch+json"
    )
    created = kube.core.create_namespaced_config_map(
        "kube-system", {"metadata": {"name": "dry"}, "data": {"a": "b"}}, dry_run="All"
    )
    assert created.metadata.uid and not created.metadata.resource_version
    kube.apps.delete_namespaced_daemon_set("calico-node", "kube-system", dry_run="All")
    assert emu.get_object("apps/v1", "DaemonSet", "calico-node", "kube-system") == before
    assert emu.get_object("v1", "ConfigMap", "dry", "kube-system") is None
    assert emu.resource_version == rv
    with pytest.raises(ApiException) as err:
        kube.apps.delete_namespaced_daemon_set("calico-node", "kube-system", dry_run="Some")
    assert err.value.status == 400


def test_resource_version_conflicts(emu: KubeEmulator, kube: Clients) -> None:
    emu.load_yaml(FIXTURE)
    ds = kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    ds.metadata.labels["edited"] = "1"
    updated = kube.apps.replace_namespaced_daemon_set("calico-node", "kube-system", ds)
    assert int(updated.metadata.resource_version) > int(ds.metadata.resource_version)
    with pytest.raises(ApiException) as stale_put:
        kube.apps.replace_namespaced_daemon_set("calico-node", "kube-system", ds)
    assert stale_put.value.status == 409
    assert status_of(stale_put.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'Operation cannot be fulfilled on daemonsets.apps "calico-node": the object has '
        "been modified; please apply your changes to the latest version and try again",
        "reason": "Conflict",
        "details": {"name": "calico-node", "group": "apps", "kind": "daemonsets"},
        "code": 409,
    }
    stale_patch = {
        "metadata": {"resourceVersion": ds.metadata.resource_version, "labels": {"a": "b"}}
    }
    with pytest.raises(ApiException) as err:
        kube.apps.patch_namespaced_daemon_set("calico-node", "kube-system", stale_patch)
    assert err.value.status == 409
    fresh_patch = {
        "metadata": {"resourceVersion": updated.metadata.resource_version, "labels": {"a": "b"}}
    }
    assert (
        kube.apps.patch_namespaced_daemon_set(
            "calico-node", "kube-system", fresh_patch
        ).metadata.labels["a"]
        == "b"
    )
    # a no-op update stores nothing, like etcd3
    rv = emu.resource_version
    same = kube.apps.patch_namespaced_daemon_set(
        "calico-node", "kube-system", {"metadata": {"labels": {"a": "b"}}}
    )
    assert emu.resource_version == rv and int(same.metadata.resource_version) == rv


def test_create_replace_delete_and_custom_patches(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    http_emu.register_calico_crds()
    group, version, plural = "crd.projectcalico.org", "v1", "felixconfigurations"
    created = http_kube.custom.create_cluster_custom_object(
        group,
        version,
        plural,
        {
            "apiVersion": f"{group}/{version}",
            "kind": "FelixConfiguration",
            "metadata": {"name": "default"},
            "spec": {"prometheusMetricsEnabled": True, "logSeverityScreen": "Info"},
        },
    )
    assert created["metadata"]["generation"] == 1
    with pytest.raises(ApiException) as exists:
        http_kube.custom.create_cluster_custom_object(group, version, plural, created)
    assert exists.value.status == 409 and status_of(exists.value)["reason"] == "AlreadyExists"
    merged = http_kube.custom.patch_cluster_custom_object(
        group, version, plural, "default", {"spec": {"prometheusMetricsEnabled": None}}
    )
    assert merged["spec"] == {"logSeverityScreen": "Info"} and merged["metadata"]["generation"] == 2
    assert http_emu.requests[-1].content_type == "application/merge-patch+json"
    operations = [{"op": "replace", "path": "/spec/logSeverityScreen", "value": "Debug"}]
    with pytest.raises(ApiException) as list_as_merge:  # CustomObjectsApi sends merge patches
        http_kube.custom.patch_cluster_custom_object(group, version, plural, "default", operations)
    assert list_as_merge.value.status == 400
    jsonpatched = http_kube.custom.patch_cluster_custom_object(
        group, version, plural, "default", operations, _content_type="application/json-patch+json"
    )
    assert jsonpatched["spec"]["logSeverityScreen"] == "Debug"
    with pytest.raises(ApiException) as failed_test:
        http_kube.custom.patch_cluster_custom_object(
            group,
            version,
            plural,
            "default",
            [{"op": "test", "path": "/spec/logSeverityScreen", "value": "x"}],
            _content_type="application/json-patch+json",
        )
    assert failed_test.value.status == 422
    with pytest.raises(ApiException) as no_smp:
        http_kube.custom.patch_cluster_custom_object(
            group,
            version,
            plural,
            "default",
            {"spec": {}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert no_smp.value.status == 415
    http_kube.custom.delete_cluster_custom_object(group, version, plural, "default")
    assert http_emu.get_object(f"{group}/{version}", "FelixConfiguration", "default") is None

    with pytest.raises(ApiException) as no_ns:
        http_kube.core.create_namespaced_config_map("nowhere", {"metadata": {"name": "x"}})
    assert (
        no_ns.value.status == 404
        and status_of(no_ns.value)["message"] == 'namespaces "nowhere" not found'
    )
    http_kube.core.create_namespace({"metadata": {"name": "felixscan"}})
    http_kube.core.create_namespaced_secret(
        "felixscan", {"metadata": {"name": "s"}, "stringData": {"enabled": "true"}}
    )
    secret = http_kube.core.read_namespaced_secret("s", "felixscan")
    assert base64.b64decode(secret.data["enabled"]) == b"true"
    deleted = http_kube.core.delete_namespaced_secret("s", "felixscan")
    assert deleted["status"] == "Success"  # v37 types this answer as a plain dict
    generated = http_kube.core.create_namespaced_config_map(
        "felixscan", {"metadata": {"generateName": "cm-"}}
    )
    assert generated.metadata.name.startswith("cm-") and len(generated.metadata.name) == 8
    http_kube.core.delete_namespace("felixscan")
    assert http_emu.list_objects("v1", "ConfigMap", "felixscan") == []


def test_patch_helpers() -> None:
    original: dict[str, Any] = {
        "spec": {
            "containers": [
                {"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "b", "image": "i"},
            ],
            "tolerations": [{"operator": "Exists"}],
            "finalizers": ["one"],
            "keep": {"k": 1},
        }
    }
    patched = strategic_merge_patch(
        original,
        {
            "spec": {
                "containers": [
                    {
                        "name": "a",
                        "env": [{"name": "X", "$patch": "delete"}, {"name": "Z", "value": "3"}],
                    },
                    {"name": "b", "$patch": "delete"},
                ],
                "tolerations": [{"key": "k"}],
                "finalizers": ["two"],
                "keep": {"$patch": "replace", "n": 2},
                "$setElementOrder/containers": [{"name": "a"}],
            }
        },
    )
    assert patched["spec"] == {
        "containers": [
            {"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "Z", "value": "3"}]}
        ],
        "tolerations": [{"key": "k"}],
        "finalizers": ["one", "two"],
        "keep": {"n": 2},
    }
    assert original == {  # untouched
        "spec": {
            "containers": [
                {"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "b", "image": "i"},
            ],
            "tolerations": [{"operator": "Exists"}],
            "finalizers": ["one"],
            "keep": {"k": 1},
        }
    }
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {
        "a": {"c": 2, "d": 3}
    }
    doc = {"a": [1, 2], "b": {"c": 1}}
    assert json_patch(
        doc,
        [
            {"op": "add", "path": "/a/0", "value": 0},
            {"op": "move", "from": "/b/c", "path": "/d"},
            {"op": "copy", "from": "/d", "path": "/e~1f"},
            {"op": "remove", "path": "/a/2"},
        ],
    ) == {"a": [0, 1], "b": {}, "d": 1, "e/f": 1}
    assert doc == {"a": [1, 2], "b": {"c": 1}}


# --- watch, records, RBAC, kubeconfigs -----------------------------------------------------


def test_watch_streams_changes(http_emu: KubeEmulator, http_kube: Clients) -> None:
    http_emu.add(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "before", "namespace": "kube-system"},
        }
    )
    start = http_kube.core.list_namespaced_config_map("kube-system").metadata.resource_version

    def write() -> None:
        time.sleep(0.2)
        http_emu.add(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "after", "namespace": "kube-system"},
            }
        )
        http_emu.delete_object("v1", "ConfigMap", "before", "kube-system")

    writer = threading.Thread(target=write)
    writer.start()
    events: list[tuple[str, str]] = []
    stream = Watch()
    for event in stream.stream(
        http_kube.core.list_namespaced_config_map,
        "kube-system",
        resource_version=start,
        timeout_seconds=5,
    ):
        events.append((event["type"], event["object"].metadata.name))
        if len(events) == 2:
            stream.stop()
    writer.join()
    assert events == [("ADDED", "after"), ("DELETED", "before")]
    assert [r.verb for r in http_emu.requests][-1] == "watch"
    http_emu.expire_continue_tokens()
    with pytest.raises(ApiException) as err:
        for _ in Watch().stream(
            http_kube.core.list_namespaced_config_map,
            "kube-system",
            resource_version=start,
            timeout_seconds=2,
        ):
            pass
    assert err.value.status == 410


def test_requests_are_recorded_as_the_authorizer_sees_them(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    http_emu.load_yaml(FIXTURE)
    http_kube.core.list_node(limit=10)
    http_kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    http_kube.apps.patch_namespaced_daemon_set(
        "calico-node", "kube-system", {"metadata": {"labels": {"a": "b"}}}, dry_run="All"
    )
    http_kube.core.list_pod_for_all_namespaces(label_selector="k8s-app=calico-node")
    seen = [
        (r.verb, r.api_group, r.resource, r.namespace, r.name, r.dry_run, r.status)
        for r in http_emu.requests
    ]
    assert seen == [
        ("list", "", "nodes", None, None, False, 200),
        ("get", "apps", "daemonsets", "kube-system", "calico-node", False, 200),
        ("patch", "apps", "daemonsets", "kube-system", "calico-node", True, 200),
        ("list", "", "pods", None, None, False, 200),
    ]
    assert http_emu.requests[0].query == {"limit": "10"}
    http_emu.clear_requests()
    assert http_emu.requests == []


def test_rbac_rules_are_enforced(http_emu: KubeEmulator, http_kube: Clients) -> None:
    http_emu.load_yaml(FIXTURE)
    http_emu.set_rbac(
        [
            {
                "kind": "ClusterRole",
                "metadata": {"name": "felixscan"},
                "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}],
            },
            {
                "kind": "Role",
                "metadata": {"name": "felixscan", "namespace": "kube-system"},
                "rules": [
                    {
                        "apiGroups": ["apps"],
                        "resources": ["daemonsets"],
                        "verbs": ["get"],
                        "resourceNames": ["calico-node"],
                    }
                ],
            },
        ]
    )
    http_kube.core.list_node()
    http_kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    with pytest.raises(ApiException) as err:
        http_kube.apps.patch_namespaced_daemon_set(
            "calico-node", "kube-system", {"metadata": {"labels": {"a": "b"}}}
        )
    assert err.value.status == 403
    assert status_of(err.value)["message"] == (
        'daemonsets.apps "calico-node" is forbidden: '
        'User "system:serviceaccount:felixscan:felixscan" cannot patch resource "daemonsets" '
        'in API group "apps" in the namespace "kube-system"'
    )
    with pytest.raises(ApiException) as cluster_scope:
        http_kube.core.list_pod_for_all_namespaces()
    assert (
        'cannot list resource "pods" in API group "" at the cluster scope'
        in status_of(cluster_scope.value)["message"]
    )
    assert client.VersionApi(http_kube.api).get_code().git_version.startswith("v1.")
    http_emu.set_rbac(None)
    http_kube.core.list_pod_for_all_namespaces()


def test_one_kubeconfig_with_several_clusters(tmp_path: Path) -> None:
    with KubeEmulator(tls=True) as east, KubeEmulator(token="other-token") as west:
        east.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "east-1"}})
        west.add({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "west-1"}})
        path = write_kubeconfig(tmp_path / "kubeconfig", {"prod-east": east, "prod-west": west})
        loaded = yaml.safe_load(path.read_text())
        assert loaded["current-context"] == "prod-east"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for context, node in (("prod-east", "east-1"), ("prod-west", "west-1")):
            with config.new_client_from_config(config_file=str(path), context=context) as api:
                core: Any = client.CoreV1Api(api)
                assert [n.metadata.name for n in core.list_node().items] == [node]
        # the incremental form builds the same thing one emulator at a time
        other = tmp_path / "incremental"
        east.add_to_kubeconfig(other, context="prod-east")
        west.add_to_kubeconfig(other, context="prod-west")
        east.add_to_kubeconfig(other, context="prod-east")  # replacing, not duplicating
        config_doc = yaml.safe_load(other.read_text())
        assert [c["name"] for c in config_doc["contexts"]] == ["prod-west", "prod-east"]
        assert config_doc["current-context"] == "prod-east"


def test_many_nodes_page_fast(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_nodes(http_emu, 5000)
    started = time.monotonic()
    count, token = 0, None
    while True:
        page = http_kube.core.list_node(limit=500, _continue=token)
        count += len(page.items)
        token = page.metadata._continue
        if not token:
            break
    assert count == 5000
    assert time.monotonic() - started < 10
    assert http_emu.errors == []


def test_keep_alive_and_no_per_request_stall(emu: KubeEmulator, kube: Clients) -> None:
    emu.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    started = time.monotonic()
    for _ in range(100):
        kube.core.read_namespaced_config_map("x", "default")
    assert time.monotonic() - started < 2  # a Nagle/delayed-ACK stall would cost ~4 s
    assert emu.connections_accepted == 1


def test_concurrent_clients(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_nodes(http_emu, 50)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                assert len(http_kube.core.list_node(limit=20).items) == 20
        except BaseException as exc:  # collected for the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# --- certificates --------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_self_signed_certificates(key_type: KeyType, tmp_path: Path) -> None:
    past = datetime.now(UTC) - timedelta(days=3)
    cert_pem, key_pem = make_self_signed(
        "felix", hosts=["127.30.0.1", "worker-1"], key_type=key_type, not_after=past
    )
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject == cert.issuer
    assert cert.not_valid_after_utc < datetime.now(UTC)
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.30.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["worker-1"]
    files = write_pem_files(cert_pem, key_pem, tmp_path / "tls")
    assert files.cert.read_bytes() == cert_pem
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600

    good_cert, good_key = make_self_signed("felix", hosts=["127.0.0.1"], key_type=key_type)
    server_ctx = server_ssl_context(good_cert, good_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    server = threading.Thread(target=serve)
    server.start()
    client_ctx = ssl.create_default_context(cadata=good_cert.decode())
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        expected = x509.load_pem_x509_certificate(good_cert).public_bytes(Encoding.DER)
        assert tls.getpeercert(binary_form=True) == expected
        tls.send(b"x")
    server.join(5)
    listener.close()


# --- fleet ---------------------------------------------------------------------------------


def fleet_nodes() -> list[NodeSpec]:
    return [
        NodeSpec("worker-0", "127.30.0.10"),
        NodeSpec("worker-1", "127.30.0.11", pod_revision="old"),
        NodeSpec("worker-2", "127.30.0.12", ready=False),
        NodeSpec("worker-3", "127.30.0.13", pod_revision=None),
        NodeSpec("edge-0", "203.0.113.5", address_type="ExternalIP", labels={"role": "edge"}),
    ]


@pytest.mark.parametrize("install", ["manifest", "operator"])
@pytest.mark.parametrize("fixture", DAEMONSETS, ids=[p.name.split("-")[0] for p in DAEMONSETS])
def test_fleet_builds_each_calico_version(
    fixture: Path, install: str, http_emu: KubeEmulator, http_kube: Clients
) -> None:
    handle = build_calico_cluster(
        http_emu,
        daemonset_yaml=fixture,
        nodes=fleet_nodes(),
        install="operator" if install == "operator" else "manifest",
        node_metrics_port=9091 if install == "operator" else None,
        felix_configs=[
            {"metadata": {"name": "node.worker-0"}, "spec": {"prometheusMetricsEnabled": True}}
        ],
    )
    namespace = "calico-system" if install == "operator" else "kube-system"
    assert handle.namespace == namespace and handle.daemonset == "calico-node"
    version = fixture.name.split("-")[0]
    assert handle.calico_version == version

    ds = http_kube.apps.read_namespaced_daemon_set("calico-node", namespace)
    raw = raw_get(http_kube.api, f"/apis/apps/v1/namespaces/{namespace}/daemonsets/calico-node")
    source = yaml.safe_load(fixture.read_text())
    env_names = [e["name"] for e in ds_env(raw)]
    if install == "manifest":
        assert raw["spec"] == source["spec"]  # the fixture's DaemonSet, unmodified
        assert "FELIX_PROMETHEUSMETRICSENABLED" not in env_names
    else:
        owner = ds.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.controller) == ("Installation", "default", True)
        assert ds_env(raw)[-2:] == [
            {"name": "FELIX_PROMETHEUSMETRICSENABLED", "value": "true"},
            {"name": "FELIX_PROMETHEUSMETRICSPORT", "value": "9091"},
        ]
        installation = http_kube.custom.get_cluster_custom_object(
            "operator.tigera.io", "v1", "installations", "default"
        )
        assert installation["spec"]["nodeMetricsPort"] == 9091
        assert installation["metadata"]["uid"] == owner.uid
    assert (ds.metadata.generation, ds.status.observed_generation) == (2, 2)
    assert ds.status.desired_number_scheduled == 5
    assert ds.status.current_number_scheduled == 4
    assert ds.status.updated_number_scheduled == 3
    assert ds.status.number_ready == ds.status.number_available == 3
    assert ds.status.number_unavailable == 2

    revisions = http_kube.apps.list_namespaced_controller_revision(
        namespace, label_selector="k8s-app=calico-node"
    )
    by_number = {r.revision: r for r in revisions.items}
    assert sorted(by_number) == [1, 2]
    current = by_number[2].metadata.labels["controller-revision-hash"]
    assert (
        current == handle.current_revision
        and by_number[2].metadata.name == f"calico-node-{current}"
    )
    assert by_number[2].metadata.owner_references[0].uid == ds.metadata.uid

    pods = http_kube.core.list_namespaced_pod(namespace, label_selector="k8s-app=calico-node").items
    by_node = {p.spec.node_name: p for p in pods}
    assert sorted(by_node) == ["edge-0", "worker-0", "worker-1", "worker-2"]
    assert by_node["worker-1"].metadata.labels["controller-revision-hash"] == handle.old_revision
    assert by_node["worker-0"].metadata.labels["controller-revision-hash"] == current
    assert all(
        p.metadata.name.startswith("calico-node-") and len(p.metadata.name) == 17 for p in pods
    )
    ready = {
        p.spec.node_name: next(c.status for c in p.status.conditions if c.type == "Ready")
        for p in pods
    }
    assert ready == {"edge-0": "True", "worker-0": "True", "worker-1": "True", "worker-2": "False"}
    assert by_node["edge-0"].status.host_ip == "203.0.113.5"

    nodes = {n.metadata.name: n for n in http_kube.core.list_node().items}
    assert [(a.type, a.address) for a in nodes["edge-0"].status.addresses] == [
        ("ExternalIP", "203.0.113.5"),
        ("Hostname", "edge-0"),
    ]
    assert nodes["edge-0"].metadata.labels["role"] == "edge"
    assert nodes["worker-3"].metadata.labels["kubernetes.io/hostname"] == "worker-3"
    node_ready = {
        name: next(c.status for c in n.status.conditions if c.type == "Ready")
        for name, n in nodes.items()
    }
    assert node_ready["worker-2"] == "False" and node_ready["worker-0"] == "True"

    felix = http_kube.custom.list_cluster_custom_object(
        "crd.projectcalico.org", "v1", "felixconfigurations"
    )
    assert [f["metadata"]["name"] for f in felix["items"]] == ["default", "node.worker-0"]
    config_map = http_kube.core.read_namespaced_config_map("calico-config", namespace)
    assert config_map.data["calico_backend"] == "bird"


def test_fleet_env_overrides_and_handle_moves(http_emu: KubeEmulator, http_kube: Clients) -> None:
    handle = build_calico_cluster(
        http_emu,
        daemonset_yaml=find_fixture("v3.30", folder=CALICO),
        nodes=[*make_nodes(3), NodeSpec("old-0", "127.30.1.1", pod_revision="old")],
        env={
            "FELIX_PROMETHEUSMETRICSENABLED": {
                "configMapKeyRef": {"name": "felix-env", "key": "enabled"}
            },
            "FELIX_HEALTHENABLED": "false",
            "FELIX_IPV6SUPPORT": None,
        },
        configmaps=[{"metadata": {"name": "felix-env"}, "data": {"enabled": "true"}}],
        felix_crd=False,
    )
    ds = http_kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    env = {e.name: e for e in ds.spec.template.spec.containers[0].env}
    assert env["FELIX_PROMETHEUSMETRICSENABLED"].value_from.config_map_key_ref.name == "felix-env"
    assert env["FELIX_HEALTHENABLED"].value == "false"
    assert "FELIX_IPV6SUPPORT" not in env
    assert http_kube.core.read_namespaced_config_map("felix-env", "kube-system").data == {
        "enabled": "true"
    }
    with pytest.raises(ApiException):
        http_kube.custom.list_cluster_custom_object(
            "crd.projectcalico.org", "v1", "felixconfigurations"
        )

    old_pod = handle.pod_on("old-0")
    assert old_pod is not None
    new_name = handle.roll_pod("old-0")
    assert new_name != old_pod["metadata"]["name"]
    assert (
        http_kube.apps.read_namespaced_daemon_set(
            "calico-node", "kube-system"
        ).status.updated_number_scheduled
        == 4
    )

    handle.set_node_ready("worker-1", False)
    status = http_kube.apps.read_namespaced_daemon_set("calico-node", "kube-system").status
    assert status.number_ready == 3 and status.number_unavailable == 1
    node = http_kube.core.read_node("worker-1")
    assert next(c.status for c in node.status.conditions if c.type == "Ready") == "False"

    new_hash = handle.update_env({"FELIX_PROMETHEUSMETRICSENABLED": "false"})
    ds = http_kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    assert ds.metadata.generation == 3 and ds.status.observed_generation == 3
    assert ds.status.updated_number_scheduled is None  # no pod on the new template yet
    assert handle.current_revision == new_hash
    handle.roll_all()
    pods = http_kube.core.list_namespaced_pod(
        "kube-system", label_selector=f"controller-revision-hash={new_hash}"
    )
    assert len(pods.items) == 4
    handle.add_node(NodeSpec("late-0", "127.30.2.1"))
    assert (
        http_kube.apps.read_namespaced_daemon_set(
            "calico-node", "kube-system"
        ).status.desired_number_scheduled
        == 5
    )
    assert handle.remove_pod("late-0")
    assert (
        http_kube.apps.read_namespaced_daemon_set(
            "calico-node", "kube-system"
        ).status.current_number_scheduled
        == 4
    )


def test_simulated_daemonset_controller_rolls_out_api_patches(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    handle = build_calico_cluster(http_emu, daemonset_yaml=FIXTURE, nodes=make_nodes(4))
    handle.simulate_controllers(auto_roll=True)
    before = handle.current_revision
    http_kube.apps.patch_namespaced_daemon_set(
        "calico-node",
        "kube-system",
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "calico-node",
                                "env": [
                                    {"name": "FELIX_PROMETHEUSMETRICSENABLED", "value": "false"}
                                ],
                            }
                        ]
                    }
                }
            }
        },
    )
    assert handle.current_revision != before
    ds = http_kube.apps.read_namespaced_daemon_set("calico-node", "kube-system")
    assert ds.status.observed_generation == ds.metadata.generation == 3
    assert ds.status.updated_number_scheduled == ds.status.desired_number_scheduled == 4
    revisions = http_kube.apps.list_namespaced_controller_revision("kube-system").items
    assert sorted(r.revision for r in revisions) == [1, 2, 3]
    handle.stop_controllers()


def test_simulated_rollout_with_delay(http_emu: KubeEmulator, http_kube: Clients) -> None:
    handle = build_calico_cluster(http_emu, daemonset_yaml=FIXTURE, nodes=make_nodes(3))
    handle.simulate_controllers(roll_delay=0.5)
    http_kube.apps.patch_namespaced_daemon_set(
        "calico-node",
        "kube-system",
        {"spec": {"template": {"metadata": {"annotations": {"x": "1"}}}}},
    )
    # the rollout runs in the background, one pod every roll_delay seconds; right after the
    # patch the count may be absent (kube-apiserver omits a zero updatedNumberScheduled)
    assert (
        http_kube.apps.read_namespaced_daemon_set(
            "calico-node", "kube-system"
        ).status.updated_number_scheduled
        or 0
    ) < 3
    assert handle.wait_rollout(10)
    status = http_kube.apps.read_namespaced_daemon_set("calico-node", "kube-system").status
    assert status.updated_number_scheduled == 3
    handle.stop_controllers()


def test_simulated_operator_reverts_env_edits_and_renders_metrics_port(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    handle = build_calico_cluster(
        http_emu,
        daemonset_yaml=FIXTURE,
        nodes=make_nodes(2),
        install="operator",
        node_metrics_port=9091,
    )
    handle.simulate_controllers()

    def env() -> dict[str, str]:
        ds = http_kube.apps.read_namespaced_daemon_set("calico-node", "calico-system")
        return {e.name: e.value for e in ds.spec.template.spec.containers[0].env}

    http_kube.apps.patch_namespaced_daemon_set(
        "calico-node",
        "calico-system",
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "calico-node",
                                "env": [
                                    {"name": "FELIX_PROMETHEUSMETRICSENABLED", "value": "false"}
                                ],
                            }
                        ]
                    }
                }
            }
        },
    )
    assert env()["FELIX_PROMETHEUSMETRICSENABLED"] == "true"  # undone by the operator
    http_kube.custom.patch_cluster_custom_object(
        "operator.tigera.io", "v1", "installations", "default", {"spec": {"nodeMetricsPort": None}}
    )
    assert (
        "FELIX_PROMETHEUSMETRICSENABLED" not in env() and "FELIX_PROMETHEUSMETRICSPORT" not in env()
    )
    ds = http_kube.apps.read_namespaced_daemon_set("calico-node", "calico-system")
    assert (
        ds.status.updated_number_scheduled == 2
        and ds.status.observed_generation == ds.metadata.generation
    )
    handle.stop_controllers()


def test_load_yaml_keeps_header_comments_and_timestamps(http_emu: KubeEmulator) -> None:
    added = http_emu.load_yaml(
        "# a header line\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n"
        "  creationTimestamp: 2024-01-02T03:04:05Z\n---\n"
        "apiVersion: v1\nkind: List\nitems:\n"
        "- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: b}\n"
    )
    assert [o["metadata"]["name"] for o in added] == ["a", "b"]
    assert added[0]["metadata"]["creationTimestamp"] == "2024-01-02T03:04:05Z"
    for path in sorted(CALICO.glob("*.yaml")):
        (obj,) = KubeEmulator().load_yaml(path)  # each fixture holds one object
        assert obj["metadata"]["resourceVersion"]


# --- pods/log: the kubelet's logs, served as kube-apiserver serves them ----------------------

LOG_NS = "node-check"
VIEW_LINE = (
    '{"schema":"felixscan.node-view","schema_version":"1.0","node":"%s",'
    '"time":"2026-11-29T16:01:03Z","ports_checked":[9091],"complete":true,"listeners":[],'
    '"files":{"tcp":{"path":"/proc/net/tcp","status":"ok","error":null,"lines":1,'
    '"malformed_lines":0}},"malformed_lines":0}'
)
STAMPED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")  # the kubelet's RFC3339NanoFixed


def add_log_pod(
    emu: KubeEmulator,
    name: str = "p",
    containers: tuple[str, ...] = ("c",),
    *,
    node: str | None = "n1",
    init: tuple[str, ...] = (),
) -> None:
    spec: dict[str, Any] = {"containers": [{"name": c, "image": "felixscan"} for c in containers]}
    if init:
        spec["initContainers"] = [{"name": c, "image": "felixscan"} for c in init]
    if node:
        spec["nodeName"] = node
    emu.add(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": LOG_NS},
            "spec": spec,
            "status": {"phase": "Running"},
        }
    )


def log_error(kube: Clients, name: str = "p", **options: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiException) as err:
        kube.core.read_namespaced_pod_log(name, LOG_NS, **options)
    return err.value.status, status_of(err.value)


def raw_log(api: client.ApiClient, path: str) -> Any:
    """GET `path` as is (query included), for values the typed client would refuse to send."""
    response: Any = api.call_api(
        *api.param_serialize(
            method="GET", resource_path=path, auth_settings=["BearerToken"], header_params={}
        )
    )
    response.read()
    return response


def test_pod_log_is_text_plain_and_not_part_of_the_object(emu: KubeEmulator, kube: Clients) -> None:
    add_log_pod(emu)
    changes: list[Any] = []
    unsubscribe = emu.on_change(changes.append)
    before = emu.resource_version
    log = "starting\n" + VIEW_LINE % "n1" + "\n"
    emu.set_pod_log(LOG_NS, "p", log)
    unsubscribe()
    assert emu.resource_version == before and changes == []  # no write, no watch event
    assert emu.pod_log(LOG_NS, "p") == log
    # the decoded form: the client hands text/plain back as is (a JSON answer would be parsed)
    assert kube.core.read_namespaced_pod_log("p", LOG_NS) == log
    raw: Any = kube.core.read_namespaced_pod_log(
        "p", LOG_NS, container="c", tail_lines=1, _preload_content=False
    )
    assert raw.status == 200
    assert raw.headers["Content-Type"] == "text/plain"
    assert raw.data == (VIEW_LINE % "n1" + "\n").encode()
    # a container that has printed nothing: 200 and an empty body
    add_log_pod(emu, "quiet")
    assert kube.core.read_namespaced_pod_log("quiet", LOG_NS) == ""
    # a pod on no node has no kubelet to ask: the apiserver answers 204 No Content
    add_log_pod(emu, "pending", node=None)
    unscheduled: Any = kube.core.read_namespaced_pod_log("pending", LOG_NS, _preload_content=False)
    assert (unscheduled.status, unscheduled.data) == (204, b"")


def test_pod_log_tail_limit_and_timestamps(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_log_pod(http_emu)
    http_emu.set_pod_log(LOG_NS, "p", "one\ntwo\nthree\nlast, unterminated")
    read = http_kube.core.read_namespaced_pod_log
    assert read("p", LOG_NS, tail_lines=2) == "three\nlast, unterminated"
    assert read("p", LOG_NS, tail_lines=10) == "one\ntwo\nthree\nlast, unterminated"
    assert read("p", LOG_NS, tail_lines=0) == ""
    assert read("p", LOG_NS, limit_bytes=6) == "one\ntw"
    stamped = read("p", LOG_NS, timestamps=True, tail_lines=2)
    lines = stamped.split("\n")
    assert [STAMPED.match(line) is not None for line in lines] == [True, True]
    assert [line[31:] for line in lines] == ["three", "last, unterminated"]
    # limitBytes counts the timestamps too: the kubelet's writer bounds what it writes
    assert read("p", LOG_NS, timestamps=True, limit_bytes=31) == lines[0][:31]
    # all lines were written when set_pod_log ran
    assert read("p", LOG_NS, since_seconds=60) == "one\ntwo\nthree\nlast, unterminated"
    path = f"/api/v1/namespaces/{LOG_NS}/pods/p/log"
    future = raw_log(http_kube.api, f"{path}?sinceTime=2999-01-01T00:00:00Z")
    assert (future.status, future.data) == (200, b"")
    both = raw_log(http_kube.api, f"{path}?sinceTime=2000-01-01T00:00:00Z&sinceSeconds=5")
    assert both.status == 422
    assert json.loads(both.data)["message"] == (
        'PodLogOptions "p" is invalid: '
        ": Forbidden: at most one of `sinceTime` or `sinceSeconds` may be specified"
    )


def test_pod_log_options_are_validated_before_the_pod_is_read(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    # ValidatePodLogOptions: 422 Invalid, even for a pod that does not exist
    code, status = log_error(http_kube, "missing", tail_lines=-1)
    assert code == 422 and status["reason"] == "Invalid"
    assert status["message"] == (
        'PodLogOptions "missing" is invalid: '
        "tailLines: Invalid value: -1: must be greater than or equal to 0"
    )
    assert status["details"] == {
        "name": "missing",
        "kind": "PodLogOptions",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": "Invalid value: -1: must be greater than or equal to 0",
                "field": "tailLines",
            }
        ],
    }
    code, status = log_error(http_kube, limit_bytes=0)
    assert (
        code == 422
        and "limitBytes: Invalid value: 0: must be greater than 0" in (status["message"])
    )
    # what the parameter codec cannot convert is 400
    answer = raw_log(http_kube.api, f"/api/v1/namespaces/{LOG_NS}/pods/p/log?tailLines=ten")
    assert answer.status == 400
    assert json.loads(answer.data)["message"] == 'strconv.ParseInt: parsing "ten": invalid syntax'
    # the pod is read next: 404 NotFound, the pod's own Status
    code, status = log_error(http_kube, "missing")
    assert (code, status["reason"], status["message"]) == (
        404,
        "NotFound",
        'pods "missing" not found',
    )
    assert status["details"] == {"name": "missing", "kind": "pods"}


def test_pod_log_container_rules(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_log_pod(http_emu, containers=("felixscan", "sidecar"), init=("setup",))
    http_emu.set_pod_log(LOG_NS, "p", "main\n", container="felixscan")
    http_emu.set_pod_log(LOG_NS, "p", "side\n", container="sidecar")
    http_emu.set_pod_log(LOG_NS, "p", "init\n", container="setup")
    read = http_kube.core.read_namespaced_pod_log
    assert read("p", LOG_NS, container="felixscan") == "main\n"
    assert read("p", LOG_NS, container="sidecar") == "side\n"
    assert read("p", LOG_NS, container="setup") == "init\n"  # init containers have logs too
    code, status = log_error(http_kube)
    assert (code, status["reason"], status["message"]) == (
        400,
        "BadRequest",
        "a container name must be specified for pod p, choose one of: [setup felixscan sidecar]",
    )
    code, status = log_error(http_kube, container="nope")
    assert (code, status["message"]) == (400, "container nope is not valid for pod p")
    with pytest.raises(ValueError, match="a container name must be specified"):
        http_emu.set_pod_log(LOG_NS, "p", "x")
    with pytest.raises(ValueError, match="container nope is not valid for pod p"):
        http_emu.set_pod_log(LOG_NS, "p", "x", container="nope")
    with pytest.raises(KeyError):
        http_emu.set_pod_log(LOG_NS, "absent", "x")


def test_pod_log_of_the_previous_instance(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_log_pod(http_emu)
    read = http_kube.core.read_namespaced_pod_log
    http_emu.set_pod_log(LOG_NS, "p", "now\n")
    code, status = log_error(http_kube, previous=True)
    assert (code, status["reason"], status["message"]) == (
        400,
        "BadRequest",
        'previous terminated container "c" in pod "p" not found',
    )
    assert http_emu.pod_log(LOG_NS, "p", previous=True) is None
    http_emu.set_pod_log(LOG_NS, "p", "now\n", previous="before the crash\nlast words\n")
    assert read("p", LOG_NS, previous=True) == "before the crash\nlast words\n"
    assert read("p", LOG_NS, previous=True, tail_lines=1) == "last words\n"
    assert read("p", LOG_NS, previous=False) == "now\n"
    # the log belongs to the pod instance: created again under the same name, it has none
    http_emu.delete_object("v1", "Pod", "p", LOG_NS)
    add_log_pod(http_emu)
    assert read("p", LOG_NS) == ""
    assert http_emu.pod_log(LOG_NS, "p") is None


def test_pod_log_rbac_is_pods_log_get_and_comes_before_existence(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    add_log_pod(http_emu)
    http_emu.set_pod_log(LOG_NS, "p", "hello\n")

    def rules(*resources: str) -> list[dict[str, Any]]:
        return [{"apiGroups": [""], "resources": list(resources), "verbs": ["get"]}]

    # a rule for pods does not grant a subresource; nor does pods/* (RBAC matches "*",
    # the exact "pods/log" and "*/log" only: rbac/v1 evaluation_helpers ResourceMatches)
    for denied in (rules("pods"), rules("pods/*"), rules("pods/status")):
        http_emu.set_rbac(denied)
        for name in ("p", "missing"):  # 403 whether or not the pod exists
            code, status = log_error(http_kube, name)
            assert (code, status["reason"]) == (403, "Forbidden"), denied
            assert status["message"] == (
                f'pods "{name}" is forbidden: User "system:serviceaccount:felixscan:felixscan" '
                f'cannot get resource "pods/log" in API group "" in the namespace "{LOG_NS}"'
            )
    for allowed in (rules("pods/log"), rules("*/log"), rules("*")):
        http_emu.set_rbac(allowed)
        assert http_kube.core.read_namespaced_pod_log("p", LOG_NS) == "hello\n", allowed
        assert log_error(http_kube, "missing")[0] == 404
    http_emu.set_rbac([{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["list"]}])
    assert log_error(http_kube)[0] == 403  # reading a log is the verb get


def test_pod_log_requests_are_recorded_for_the_rbac_replay(
    http_emu: KubeEmulator, http_kube: Clients
) -> None:
    add_log_pod(http_emu)
    http_kube.core.read_namespaced_pod_log("p", LOG_NS, container="c", tail_lines=1)
    (req,) = http_emu.requests
    assert (req.method, req.path, req.query) == (
        "GET",
        f"/api/v1/namespaces/{LOG_NS}/pods/p/log",
        {"container": "c", "tailLines": "1"},
    )
    assert (req.verb, req.api_group, req.resource, req.subresource) == ("get", "", "pods", "log")
    assert (req.namespace, req.name, req.status, req.resource_request) == (LOG_NS, "p", 200, True)
    # tests/helpers/rbac_rules reads it as "get pods/log": granted by that rule alone
    log_rule = Permission("get", "", "pods/log", None, LOG_NS, "test")
    assert log_rule.allows(req)
    assert not Permission("get", "", "pods", None, LOG_NS, "test").allows(req)
    assert as_rbac_rules([log_rule]) == [
        {
            "kind": "Role",
            "metadata": {"name": "from-deploy", "namespace": LOG_NS},
            "rules": [{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}],
        }
    ]


def test_pod_log_faults(http_emu: KubeEmulator, http_kube: Clients) -> None:
    add_log_pod(http_emu)
    http_emu.set_pod_log(LOG_NS, "p", "hello\n")
    fault = http_emu.inject(r"pods/.*/log", status=500, times=1)
    code, status = log_error(http_kube)
    assert (code, status["reason"]) == (500, "InternalError")
    assert fault.hits == 1 and http_emu.requests[-1].fault
    assert http_kube.core.read_namespaced_pod_log("p", LOG_NS) == "hello\n"
    slow = http_emu.inject(r"pods/p/log\?.*tailLines=1", delay=30)
    started = time.monotonic()
    with pytest.raises(Exception, match=r"[Tt]imed out"):
        http_kube.core.read_namespaced_pod_log("p", LOG_NS, tail_lines=1, _request_timeout=0.3)
    assert time.monotonic() - started < 10 and slow.hits >= 1
    http_emu.clear_faults()
    http_emu.inject(r"pods/.*/log", body=b"cut sho", times=1)  # a truncated body, still text
    assert http_kube.core.read_namespaced_pod_log("p", LOG_NS) == "cut sho"


def test_harness_node_check_serves_a_log_per_node(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    try:
        harness.cluster("c", ["closed", "closed", "closed"])
        emu = harness.emulators["c"]
        NS = "felixscan-node-check"  # the namespace deploy/overlays/node-check uses
        harness.node_check(
            "c",
            {
                "c-node-0": "booting\n" + VIEW_LINE % "c-node-0" + "\n",
                "c-node-1": "",
                "c-node-2": None,
            },
        )
        with connect(emu, tmp_path) as api:
            kube = Clients(api)
            ds = kube.apps.read_namespaced_daemon_set("felixscan-node-check", NS)
            assert ds.spec.template.spec.host_network is True
            assert (ds.status.desired_number_scheduled, ds.status.number_ready) == (3, 2)
            selector = (
                "app.kubernetes.io/name=felixscan-node-check,app.kubernetes.io/component=node-check"
            )
            pods = kube.core.list_namespaced_pod(NS, label_selector=selector).items
            by_node = {p.spec.node_name: p for p in pods}
            assert sorted(by_node) == ["c-node-0", "c-node-1"]  # None: no pod on c-node-2
            for pod in pods:
                assert pod.status.phase == "Running"
                assert [c.name for c in pod.spec.containers] == ["felixscan"]
                (owner,) = pod.metadata.owner_references
                assert (owner.kind, owner.name, owner.uid) == (
                    "DaemonSet",
                    "felixscan-node-check",
                    ds.metadata.uid,
                )
            name = by_node["c-node-0"].metadata.name
            tail = kube.core.read_namespaced_pod_log(
                name, NS, container="felixscan", tail_lines=1, timestamps=True
            )
            view = latest_view(tail)
            assert view is not None and view.node == "c-node-0"
            empty = by_node["c-node-1"].metadata.name
            assert (
                kube.core.read_namespaced_pod_log(empty, NS, container="felixscan") == ""
            )
            # again: c-node-1 prints its first line, c-node-0's pod goes away
            harness.node_check("c", {"c-node-0": None, "c-node-1": VIEW_LINE % "c-node-1"})
            pods = kube.core.list_namespaced_pod(NS, label_selector=selector).items
            assert [p.metadata.name for p in pods] == [empty]
            line = kube.core.read_namespaced_pod_log(empty, NS, container="felixscan")
            assert latest_view(line) is not None
    finally:
        harness.close()
