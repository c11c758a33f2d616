"""Verdict parity with upstream Felix, end to end: the real `felixscan scan` through the real
kubernetes client against the emulated API, with node listeners that do NOT answer (silent:
the SYN is dropped, as behind a firewall), so each verdict rests on the declared state alone.

A node that Felix would serve metrics on must FAIL here; before these rules were followed each
of these cases was a PASS that was false. The rules themselves are pinned, with their upstream
places, in tests/core/test_calico_conformance.py.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import yaml

from tests.helpers.scan_harness import Harness, Node, daemonset

ON = {"FELIX_PROMETHEUSMETRICSENABLED": "true"}
OFF = {"FELIX_PROMETHEUSMETRICSENABLED": "false"}


def silent(**kw: Any) -> Node:
    return Node("silent", **kw)


def verdicts(c: dict[str, Any]) -> list[str]:
    return [n["verdict"] for n in c["nodes"]]


def ids(c: dict[str, Any]) -> set[str]:
    return {f["id"] for f in c["findings"]}


def fc(name: str, spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, **meta}, "spec": spec or {}}


def test_baseline_disabled_behind_a_firewall_passes(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("base", [silent(), silent()], env=OFF)
    out = harness.scan(sqlite_url)
    assert out.code == 0, out.stderr
    assert verdicts(out.cluster("base")) == ["pass", "pass"]


# 1. empty values ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["literal", "configmap"])
def test_empty_env_value_leaves_the_decision_to_felixconfiguration(harness: Harness,
                                                                   sqlite_url: str,
                                                                   how: str) -> None:
    env: dict[str, Any] = {"FELIX_PROMETHEUSMETRICSENABLED": ""}
    configmaps = []
    if how == "configmap":
        env = {"FELIX_PROMETHEUSMETRICSENABLED": {"configMapKeyRef": {"name": "felix-env",
                                                                      "key": "metrics"}}}
        configmaps = [{"metadata": {"name": "felix-env"}, "data": {"metrics": ""}}]
    harness.cluster("empty", [silent()], env=env, configmaps=configmaps,
                    felix_configs=[fc("default", {"prometheusMetricsEnabled": True})])
    out = harness.scan(sqlite_url)
    c = out.cluster("empty")
    assert out.code == 1 and verdicts(c) == ["fail"]
    assert c["declared"]["source"] == "FelixConfiguration default"


# 2. felix.cfg ---------------------------------------------------------------------------------


def with_felix_cfg(text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ds = yaml.safe_load(daemonset().read_text())
    spec = ds["spec"]["template"]["spec"]
    spec.setdefault("volumes", []).append({"name": "felix-cfg",
                                           "configMap": {"name": "felix-cfg"}})
    node = next(c for c in spec["containers"] if c["name"] == "calico-node")
    node.setdefault("volumeMounts", []).append({"name": "felix-cfg",
                                                "mountPath": "/etc/calico/felix.cfg",
                                                "subPath": "felix.cfg"})
    return ds, [{"metadata": {"name": "felix-cfg"}, "data": {"felix.cfg": text}}]


@pytest.mark.parametrize("text", [
    "PrometheusMetricsEnabled = true\n",
    "[DEFAULT]\nPrometheusMetricsEnabled = true\n",
    "[global]\nLogSeverityScreen = info\n[other]\nPrometheusMetricsEnabled = \"true\" # on\n",
])
def test_felix_cfg_keys_in_any_section_count(harness: Harness, sqlite_url: str,
                                             text: str) -> None:
    ds, cms = with_felix_cfg(text)
    harness.cluster("cfg", [silent()], daemonset_yaml=ds, configmaps=cms)
    out = harness.scan(sqlite_url)
    assert verdicts(out.cluster("cfg")) == ["fail"], out.cluster("cfg")


def test_felix_cfg_that_ini_rejects_is_unknown(harness: Harness, sqlite_url: str) -> None:
    ds, cms = with_felix_cfg("[global\nPrometheusMetricsEnabled = false\n")
    harness.cluster("badcfg", [silent()], daemonset_yaml=ds, configmaps=cms, env=OFF)
    out = harness.scan(sqlite_url)
    c = out.cluster("badcfg")
    assert out.code == 3 and verdicts(c) == ["unknown"]
    assert "FELIX-CONFIG-UNRESOLVED" in ids(c)


# 3. API groups --------------------------------------------------------------------------------


def test_cluster_serving_only_projectcalico_org_v3(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("v3", [silent(), silent()], felix_api="projectcalico.org/v3",
                    felix_configs=[fc("default", {"prometheusMetricsEnabled": True})])
    out = harness.scan(sqlite_url)
    c = out.cluster("v3")
    assert out.code == 1 and verdicts(c) == ["fail", "fail"]


def test_cluster_serving_felixconfiguration_in_no_group_is_unknown(harness: Harness,
                                                                   sqlite_url: str) -> None:
    harness.cluster("nofc", [silent()], felix_crd=False)
    out = harness.scan(sqlite_url)
    c = out.cluster("nofc")
    assert out.code == 3 and c["status"] == "error" and verdicts(c) == ["unknown"]
    assert "not served" in c["nodes"][0]["declared_reason"]


def test_etcd_datastore_is_reported_out_of_sight(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("etcd", [silent()], env={"DATASTORE_TYPE": "etcdv3"})
    c = harness.scan(sqlite_url).cluster("etcd")
    assert verdicts(c) == ["unknown"] and "etcd" in c["nodes"][0]["declared_reason"]


# 4. selector-scoped ---------------------------------------------------------------------------


def test_selector_matches_calico_labels_and_a_broken_one_drops_alone(harness: Harness,
                                                                     sqlite_url: str) -> None:
    labels = json.dumps({"pool": "gpu"})
    harness.cluster("sel", [silent(annotations={"projectcalico.org/labels": labels}),
                            silent(labels={"pool": "cpu"})],
                    felix_configs=[fc("broken", {"nodeSelector": "pool ==",
                                                 "prometheusMetricsEnabled": False}),
                                   fc("gpus", {"nodeSelector": "pool in {'gpu'} && "
                                               "!has(spot) && kubernetes.io/os starts with 'lin'",
                                               "prometheusMetricsEnabled": True})])
    out = harness.scan(sqlite_url)
    c = out.cluster("sel")
    assert verdicts(c) == ["fail", "pass"], c
    assert out.code == 1
    assert "FELIX-CONFIG-SELECTOR-INVALID" in ids(c)


def test_selector_scoped_ignored_by_calico_before_v3_32(harness: Harness,
                                                        sqlite_url: str) -> None:
    harness.cluster("old", [silent()], version="v3.31.7",
                    felix_configs=[fc("all", {"nodeSelector": "all()",
                                              "prometheusMetricsEnabled": True})])
    out = harness.scan(sqlite_url)
    c = out.cluster("old")
    assert verdicts(c) == ["pass"] and "FELIX-CONFIG-SELECTOR-IGNORED" in ids(c)


# 5-7. port, host, TLS -------------------------------------------------------------------------


def test_port_zero_is_a_random_port(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("zero", [Node("felix-http")],
                    env={**ON, "FELIX_PROMETHEUSMETRICSPORT": "0x0"})
    c = harness.scan(sqlite_url).cluster("zero")
    node = c["nodes"][0]
    assert (node["verdict"], node["port"], node["state"]) == ("fail", 0, "error")
    assert "random port" in node["error"]
    assert "FELIX-METRICS-RANDOM-PORT" in ids(c)


@pytest.mark.parametrize("raw", ["0x2384", "+9092", "9_092"])
def test_port_parsed_like_go(harness: Harness, sqlite_url: str, raw: str) -> None:
    harness.cluster("hex", [silent()], env={**ON, "FELIX_PROMETHEUSMETRICSPORT": raw})
    node = harness.scan(sqlite_url).cluster("hex")["nodes"][0]
    assert (node["port"], node["verdict"]) == (9092, "fail")


def test_loopback_host_is_still_enabled_and_shown(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("lo", [silent()], env={**ON, "FELIX_PROMETHEUSMETRICSHOST": "127.0.0.1"})
    out = harness.scan(sqlite_url)
    c = out.cluster("lo")
    assert out.code == 1 and verdicts(c) == ["fail"]
    assert c["declared"]["host"] == "127.0.0.1" and c["declared_detail"]["loopback_only"]
    assert "FELIX-METRICS-LOOPBACK-ONLY" in ids(c)


def test_tls_when_only_the_key_file_is_set(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("tls", [silent()],
                    env={**ON, "FELIX_PROMETHEUSMETRICSKEYFILE": "/etc/felix/key.pem"})
    c = harness.scan(sqlite_url).cluster("tls")
    assert c["declared_detail"]["tls"] is True
    assert c["declared_detail"]["client_auth"] == "RequireAndVerifyClientCert"


# 8-9. annotations and types -------------------------------------------------------------------


def test_differently_cased_annotation_beside_a_spec_value_is_unknown(harness: Harness,
                                                                     sqlite_url: str) -> None:
    harness.cluster("case", [silent()], felix_configs=[fc(
        "default", {"prometheusMetricsEnabled": False},
        annotations={"config.projectcalico.org/prometheusMetricsEnabled": "true"})])
    out = harness.scan(sqlite_url)
    c = out.cluster("case")
    assert out.code == 3 and verdicts(c) == ["unknown"]


def test_exact_annotation_wins_over_the_spec(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("exact", [silent()], felix_configs=[fc(
        "default", {"prometheusMetricsEnabled": False},
        annotations={"config.projectcalico.org/PrometheusMetricsEnabled": "true"})])
    c = harness.scan(sqlite_url).cluster("exact")
    assert verdicts(c) == ["fail"]
    fix = next(f for f in c["findings"] if f["id"] == "FELIX-METRICS-ENABLED")
    assert "annotation" in fix["message"]


def test_wrong_typed_field_is_unknown(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("typed", [silent()], felix_configs=[fc(
        "default", {"prometheusMetricsEnabled": "true"})])
    out = harness.scan(sqlite_url)
    assert out.code == 3 and verdicts(out.cluster("typed")) == ["unknown"]


# 10. the pods that actually run ---------------------------------------------------------------


def test_old_revision_pod_behind_a_firewall_fails(harness: Harness, sqlite_url: str) -> None:
    """The procedure felixscan automates: env set false, rollout in progress."""
    harness.cluster("roll", [silent(pod="old"), silent()], env=OFF, old_env=ON)
    out = harness.scan(sqlite_url)
    c = out.cluster("roll")
    assert out.code == 1 and c["status"] == "non_compliant"
    assert verdicts(c) == ["fail", "pass"]
    assert c["nodes"][0]["pod_current"] is False
    assert {"ROLLOUT-INCOMPLETE", "FELIX-METRICS-ENABLED"} <= ids(c)


def _extra_pod(harness: Harness, cluster: str, node: str, name: str, *, owned: bool,
               env: dict[str, str], owner: dict[str, Any] | None = None) -> None:
    handle = harness.handles[cluster]
    pod = handle.pod_on(node)
    assert pod is not None
    pod["metadata"]["name"] = name
    for key in ("uid", "resourceVersion", "creationTimestamp"):
        pod["metadata"].pop(key, None)
    if owner is not None:
        pod["metadata"]["ownerReferences"] = [owner]
    elif not owned:
        pod["metadata"].pop("ownerReferences", None)
        pod["metadata"]["labels"] = {"app": "felix-debug"}
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "calico-node")
    container["env"] = [e for e in container.get("env") or []
                        if e["name"] not in env] + [{"name": k, "value": v}
                                                    for k, v in env.items()]
    harness.emulators[cluster].add(pod)


@pytest.mark.parametrize("first", ["calico-node-aaaa", "calico-node-zzzz"])
def test_two_pods_on_one_node_any_listing_order(harness: Harness, sqlite_url: str,
                                                first: str) -> None:
    """A surge rollout: the old pod (enabled) and the new one share the node."""
    harness.cluster("surge", [silent()], env=OFF)
    node = next(iter(harness.handles["surge"].nodes)).name
    _extra_pod(harness, "surge", node, first, owned=True, env=ON)
    c = harness.scan(sqlite_url).cluster("surge")
    assert verdicts(c) == ["fail"]
    assert c["nodes"][0]["pod"] == first


def test_calico_node_pod_not_owned_by_the_daemonset_is_read(harness: Harness,
                                                            sqlite_url: str) -> None:
    harness.cluster("stray", [silent(), silent()], env=OFF)
    node = harness.handles["stray"].nodes[1].name
    _extra_pod(harness, "stray", node, "felix-debug", owned=False, env=ON)
    c = harness.scan(sqlite_url).cluster("stray")
    assert verdicts(c) == ["pass", "fail"]
    named = next(f for f in c["findings"] if f["id"] == "CALICO-POD-OUTSIDE-DAEMONSET")
    assert "1 calico-node pod(s)" in named["message"] and "(no DaemonSet)" in named["message"]


def test_a_second_calico_node_daemonset_is_read(harness: Harness, sqlite_url: str) -> None:
    """One DaemonSet per node pool: the pods of the one felixscan did not pick count too."""
    handle = harness.cluster("pools", [silent(), silent()], env=OFF)
    emu = harness.emulators["pools"]
    second = json.loads(json.dumps(handle.daemonset_object()))
    second["metadata"] = {"name": "calico-node-pool-b", "namespace": handle.namespace}
    second.pop("status", None)
    stored = emu.add(second)
    owner = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "calico-node-pool-b",
             "uid": stored["metadata"]["uid"], "controller": True}
    _extra_pod(harness, "pools", handle.nodes[0].name, "calico-node-pool-b-x1", owned=True,
               env=ON, owner=owner)
    c = harness.scan(sqlite_url).cluster("pools")
    assert verdicts(c) == ["fail", "pass"]
    assert c["nodes"][0]["pod"] == "calico-node-pool-b-x1"
    assert "calico-node-pool-b" in next(f["message"] for f in c["findings"]
                                        if f["id"] == "CALICO-POD-OUTSIDE-DAEMONSET")


def test_node_without_calico_pod_is_said_and_still_probed(harness: Harness,
                                                          sqlite_url: str) -> None:
    harness.cluster("nopod", [Node("felix-http", pod=None), silent()], env=OFF)
    c = harness.scan(sqlite_url).cluster("nopod")
    assert verdicts(c) == ["fail", "pass"]
    assert "NODE-NO-CALICO-POD" in ids(c) and c["nodes"][0]["state"] == "open"


# 11. every address ----------------------------------------------------------------------------


def _free_ipv6_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def test_dual_stack_node_answering_only_on_ipv6_fails(harness: Harness, sqlite_url: str) -> None:
    port = _free_ipv6_port()
    harness.cluster("dual", [Node("silent", port=port,
                                  extra=[("InternalIP", "::1", "felix-http")])],
                    env={**OFF, "FELIX_PROMETHEUSMETRICSPORT": str(port)})
    out = harness.scan(sqlite_url)
    c = out.cluster("dual")
    node = c["nodes"][0]
    assert out.code == 1 and node["verdict"] == "fail"
    assert node["address"] == "::1"
    assert sorted(a["state"] for a in node["addresses"]) == ["filtered", "open"]
    assert "DRIFT-DISABLED-BUT-OPEN" in ids(c)


# 12. the fix follows the source ---------------------------------------------------------------


def test_operator_install_with_felixconfiguration_source(harness: Harness,
                                                         sqlite_url: str) -> None:
    harness.cluster("op", [silent()], install="operator",
                    felix_configs=[fc("default", {"prometheusMetricsEnabled": True})])
    c = harness.scan(sqlite_url).cluster("op")
    assert verdicts(c) == ["fail"]
    assert "OPERATOR-METRICS-PORT-SET" not in ids(c)
