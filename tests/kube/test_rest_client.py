"""The scan's direct REST transport (`scanner.kube.client._Rest`) and its credentials reader.

The same collection over the light transport and over the `kubernetes` client must send the
same requests and read the same snapshot; credentials the light reader does not take exactly
(exec and auth-provider plugins, token files, proxies, merged kubeconfigs, broken entries) go
to the `kubernetes` client.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from scanner.core.config import ClusterSettings, load_settings
from scanner.core.errors import ApiForbidden, ApiUnreachable
from scanner.kube import client as kube_client
from scanner.kube.client import _Rest, make_api
from scanner.kube.read import collect
from tests.helpers.scan_harness import Harness


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def settings_of(h: Harness, name: str) -> ClusterSettings:
    return next(c for c in load_settings(h.config()).clusters if c.name == name)


def deadline() -> float:
    return time.monotonic() + 30


def seen(h: Harness, name: str) -> list[tuple[str, str, tuple[tuple[str, str], ...], int]]:
    return [(r.method, r.path, tuple(sorted(r.query.items())), r.status)
            for r in h.emulators[name].requests]


def test_light_and_kubernetes_client_send_the_same_requests_and_read_the_same(
        harness: Harness) -> None:
    harness.cluster("c", ["closed", "closed", "closed"])
    cluster = settings_of(harness, "c")
    light = make_api(cluster, deadline=deadline())
    assert isinstance(light.client, _Rest)
    heavy = make_api(cluster, deadline=deadline(), writes=True)  # the kubernetes client
    assert not isinstance(heavy.client, _Rest)
    emu = harness.emulators["c"]
    emu.clear_requests()
    by_light = collect(cluster, api=light)
    light_requests = seen(harness, "c")
    emu.clear_requests()
    by_heavy = collect(cluster, api=heavy)
    assert light_requests == seen(harness, "c")
    assert light_requests and all(status in (200, 404) for *_r, status in light_requests)
    assert light.requests == heavy.requests == len(light_requests)
    assert replace(by_light, collected_at=by_heavy.collected_at, api_seconds=0.0) == \
        replace(by_heavy, api_seconds=0.0)
    assert [n.name for n in by_light.nodes] == ["c-node-0", "c-node-1", "c-node-2"]


def test_light_transport_maps_statuses_as_the_kubernetes_client_does(harness: Harness) -> None:
    harness.cluster("c", ["closed"])
    cluster = settings_of(harness, "c")
    emu = harness.emulators["c"]
    messages = []
    for api in (make_api(cluster, deadline=deadline()),
                make_api(cluster, deadline=deadline(), writes=True)):
        fault = emu.inject(r"/api/v1/nodes", status=403, times=1)
        with pytest.raises(ApiForbidden) as denied:
            api.get("LIST nodes", api.core.list_node)
        assert fault.hits == 1
        emu.inject(r"/api/v1/nodes", status=503, retry_after=0, times=1)
        assert api.get("LIST nodes", api.core.list_node) is not None  # retried
        assert api.get("GET configmap x", api.core.read_namespaced_config_map, "nope",
                       "kube-system") is None  # 404
        messages.append(str(denied.value))
    assert messages[0] == messages[1] and messages[0].startswith("LIST nodes: 403 Forbidden")


def test_light_transport_tls_failure_reads_as_before(harness: Harness, tmp_path: Path) -> None:
    harness.cluster("c", ["closed"])
    other = Harness(tmp_path / "other")
    try:
        other.cluster("o", ["closed"])
        ca = other.emulators["o"].ca_pem
        assert ca is not None
        harness.servers["c"] = {"certificate-authority-data": base64.b64encode(ca).decode()}
        cluster = settings_of(harness, "c")
        errors = []
        for api in (make_api(cluster, deadline=deadline()),
                    make_api(cluster, deadline=deadline(), writes=True)):
            with pytest.raises(ApiUnreachable) as failed:
                api.get("LIST nodes", api.core.list_node)
            errors.append(str(failed.value))
        assert isinstance(make_api(cluster, deadline=deadline()).client, _Rest)
        assert errors[0] == errors[1] and "TLS failure" in errors[0], errors
    finally:
        other.close()


def write_user(h: Harness, name: str, user: dict[str, Any],
               cluster: dict[str, Any] | None = None) -> ClusterSettings:
    h.users[name] = user
    if cluster is not None:
        h.servers[name] = cluster
    return settings_of(h, name)


@pytest.mark.parametrize(("user", "cluster"), [
    ({"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "true"}}, None),
    ({"auth-provider": {"name": "oidc", "config": {}}}, None),
    ({"tokenFile": "/nonexistent"}, None),
    ({"token": ""}, None),
    ({"token": "emulator-token", "as": "someone"}, None),
    ({"token": "emulator-token"}, {"proxy-url": "http://127.0.0.1:1"}),
    ({"token": "emulator-token", "client-certificate": "missing.pem"}, None),
    ({"token": "emulator-token"}, {"certificate-authority-data": "%%% not base64"}),
])
def test_credentials_the_light_reader_does_not_take_go_to_the_kubernetes_client(
        harness: Harness, user: dict[str, Any], cluster: dict[str, Any] | None) -> None:
    harness.cluster("c", ["closed"])
    settings = write_user(harness, "c", user, cluster)
    assert kube_client._light_connection(settings) is None


def test_light_reader_takes_token_certificates_and_tls_settings(harness: Harness) -> None:
    harness.cluster("c", ["closed"])
    settings = write_user(harness, "c", {
        "token": "emulator-token",
        "client-certificate-data": base64.b64encode(b"CERT").decode(),
        "client-key-data": base64.b64encode(b"KEY").decode()},
        {"insecure-skip-tls-verify": True, "tls-server-name": "kubernetes.default"})
    conn = kube_client._light_connection(settings)
    assert conn is not None
    assert conn.api_key == {"BearerToken": "Bearer emulator-token"}
    assert conn.verify_ssl is False and conn.tls_server_name == "kubernetes.default"
    assert conn.cert_file and Path(conn.cert_file).read_bytes() == b"CERT"
    assert conn.key_file and Path(conn.key_file).read_bytes() == b"KEY"
    assert conn.context == "c" and conn.host == harness.emulators["c"].url.rstrip("/")
    basic = write_user(harness, "c", {"username": "u", "password": "p"}, {})
    conn = kube_client._light_connection(basic)
    assert conn is not None
    assert conn.api_key == {"BearerToken": "Basic " + base64.b64encode(b"u:p").decode()}


def test_merged_kubeconfigs_go_to_the_kubernetes_client(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    harness.cluster("c", ["closed"])
    kubeconfig = harness.tmp / "kubeconfig"
    settings = replace(settings_of(harness, "c"), kubeconfig=None)
    monkeypatch.setenv("KUBECONFIG", f"{kubeconfig}:{kubeconfig}")
    assert kube_client._light_connection(settings) is None
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert kube_client._light_connection(settings) is not None


def test_in_cluster_service_account_over_the_light_transport(
        harness: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    harness.cluster("c", ["closed", "closed"])
    emu = harness.emulators["c"]
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(str(emu.token))
    assert emu.ca_pem is not None
    (account / "ca.crt").write_bytes(emu.ca_pem)
    monkeypatch.setattr(kube_client, "SERVICE_TOKEN_FILENAME", str(account / "token"))
    monkeypatch.setattr(kube_client, "SERVICE_CERT_FILENAME", str(account / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(emu.port))
    settings = ClusterSettings(name="in", kubeconfig=None, context=None, in_cluster=True)
    api = make_api(settings, deadline=deadline())
    assert isinstance(api.client, _Rest)
    assert api.client.connection.host == f"https://127.0.0.1:{emu.port}"
    snapshot = collect(settings, api=api)
    assert len(snapshot.nodes) == 2
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "")  # the kubernetes client says why
    assert kube_client._light_connection(settings) is None


def test_the_ca_given_as_data_is_a_private_file(harness: Harness) -> None:
    harness.cluster("c", ["closed"])
    settings = settings_of(harness, "c")
    doc = yaml.safe_load((harness.tmp / "kubeconfig").read_text())
    [entry] = [c["cluster"] for c in doc["clusters"] if c["name"] == "c"]
    assert "certificate-authority-data" in entry
    conn = kube_client._light_connection(settings)
    assert conn is not None and conn.ssl_ca_cert
    ca = Path(conn.ssl_ca_cert)
    assert ca.read_bytes() == base64.b64decode(entry["certificate-authority-data"])
    assert ca.stat().st_mode & 0o077 == 0

