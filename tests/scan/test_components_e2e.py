"""The typha-metrics and kube-controllers-metrics controls end to end: emulated clusters made
from each release's real Deployments (tests/fixtures/calico), served over HTTPS to the real
kubernetes client, real listeners on 127.x where Typha and kube-controllers would serve their
metrics (scanner.emulator.components decides that from the pods' specs, independently of the
scanner), and the real scan (`run_scan`, and `felixscan scan --format json`).

Upstream behaviour pinned here, with where it lives:
- Typha's metrics are off by default, port 9093, host network (typha/pkg/config/
  config_params.go `PrometheusMetricsEnabled bool;false`, `PrometheusMetricsPort
  int(0,65535);9093`; manifests/calico-typha.yaml `hostNetwork: true`).
- Typha's env: a `typha_` prefix in any case, the rest lower-cased (env_var_loader.go);
  empty values dropped, `none` the zero value, invalid values the default (config_params.go
  `UpdateFrom`, `resolve`).
- typha.cfg beats the environment when its key is spelled other than `PrometheusMetricsEnabled`
  (config_params.go `resolve`: `nameToSource[rawName]` looked up, `nameToSource[name]` set).
- The operator renders TYPHA_PROMETHEUSMETRICSENABLED/PORT from Installation
  spec.typhaMetricsPort (tigera/operator pkg/render/typha.go).
- kube-controllers' port is KubeControllersConfiguration `default` spec.prometheusMetricsPort
  alone, 0 or absent is off (kube-controllers/pkg/kubecontrollers/run.go `Run`); a missing
  `default` is created with 9094 (runconfig.go `getOrCreateSnapshot`, clientv3
  kubecontrollersconfig.go `validateAndFillDefaults`).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from scanner.core.records import (
    FELIX,
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterResult,
    ControlResult,
)
from scanner.emulator.components import ComponentHandle
from tests.helpers import scan_harness
from tests.helpers.scan_harness import (
    CALICO_VERSIONS,
    Harness,
    felixscan,
    typha_deployment,
)

ENABLED = "TYPHA_PROMETHEUSMETRICSENABLED"
INSTALLS = ("manifest", "operator")
NAMESPACE = {"manifest": "kube-system", "operator": "calico-system"}


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.38.0.0")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def _db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'felixscan.db'}"


def _scan(h: Harness, tmp_path: Path) -> dict[str, ClusterResult]:
    outcome = h.run_scan(_db(tmp_path))
    return {c.cluster: c for c in outcome.clusters}


def _control(result: ClusterResult, control: str) -> ControlResult:
    found = result.control(control)
    assert found is not None, (control, [c.control for c in result.controls])
    return found


def _ids(control: ControlResult) -> set[str]:
    return {f.id for f in control.findings}


def _nodes_with(control: ControlResult, finding: str) -> set[str | None]:
    return {f.node for f in control.findings if f.id == finding}


def _cluster(h: Harness, name: str, install: str, version: str, nodes: int = 2) -> list[str]:
    h.cluster(name, ["closed"] * nodes, version=version, install=install)
    return [f"{name}-node-{i}" for i in range(nodes)]


def _address(h: Harness, cluster: str, node: str) -> str:
    return h.addresses[(cluster, node)]


def _detail(result: ClusterResult) -> str:
    return "\n".join(f"{c.control}: {c.status} {c.error or ''} "
                     f"{[(f.id, f.node, f.message) for f in c.findings]}"
                     for c in result.controls)


# --- every release, both install types --------------------------------------------------------


@pytest.mark.parametrize("install", INSTALLS)
@pytest.mark.parametrize("version", CALICO_VERSIONS)
def test_each_release_typha_and_kube_controllers(h: Harness, tmp_path: Path, version: str,
                                                 install: str) -> None:
    """One scan of five clusters of one release: Typha off (its default) and on, and
    kube-controllers with its port 9094 (what it writes itself), 0, absent, or no
    KubeControllersConfiguration at all."""
    # Typha as released (metrics off), kube-controllers switched off: all compliant.
    quiet = _cluster(h, "quiet", install, version)
    h.typha("quiet", quiet, version=version)
    h.kube_controllers("quiet", version=version, kcc_port=0)
    # Typha with TYPHA_PROMETHEUSMETRICSENABLED=true on two nodes: both listen.
    loud = _cluster(h, "typha-on", install, version)
    typha_on = h.typha("typha-on", loud, version=version, env={ENABLED: "true"})
    h.kube_controllers("typha-on", version=version, kcc_port=0)
    # kube-controllers as it runs by default: prometheusMetricsPort 9094, listening.
    _cluster(h, "kc-9094", install, version, nodes=1)
    kc_on = h.kube_controllers("kc-9094", version=version, kcc_port=9094)
    # The field absent: off, until a Calico client's next update fills in 9094.
    _cluster(h, "kc-absent", install, version, nodes=1)
    h.kube_controllers("kc-absent", version=version, kcc_port=None)
    # No `default` at all: kube-controllers creates it with 9094, and serves 9094.
    _cluster(h, "kc-missing", install, version, nodes=1)
    kc_missing = h.kube_controllers("kc-missing", version=version, kcc_port="missing")

    assert set(typha_on.listening()) == {(_address(h, "typha-on", n), 9093) for n in loud}
    assert list(kc_on.listening()) == [(kc_on.pod_ip, 9094)]
    assert list(kc_missing.listening()) == [(kc_missing.pod_ip, 9094)]
    results = _scan(h, tmp_path)
    ns = NAMESPACE[install]

    r = results["quiet"]
    assert r.status == "compliant", _detail(r)
    assert [c.control for c in r.controls] == [FELIX, TYPHA, KUBE_CONTROLLERS]
    typha = _control(r, TYPHA)
    assert (typha.status, typha.installed, typha.namespace, typha.workload) == \
        ("compliant", True, ns, "calico-typha")
    assert typha.image is not None and typha.image.endswith(f"typha:{version}")
    assert typha.declared is not None and typha.declared.enabled is False
    assert sorted((t.node, t.address, t.port, t.verdict, t.probe.state)
                  for t in typha.targets) == sorted(
        (n, _address(h, "quiet", n), 9093, "pass", "closed") for n in quiet)
    kc = _control(r, KUBE_CONTROLLERS)
    assert (kc.status, kc.namespace, kc.workload) == \
        ("compliant", ns, "calico-kube-controllers")
    assert [t.verdict for t in kc.targets] == ["pass"]

    r = results["typha-on"]
    assert r.status == "non_compliant", _detail(r)
    typha = _control(r, TYPHA)
    assert typha.status == "non_compliant"
    assert {"TYPHA-PORT-REACHABLE", "TYPHA-METRICS-ENABLED"} <= _ids(typha)
    assert _nodes_with(typha, "TYPHA-PORT-REACHABLE") == set(loud)
    for f in typha.findings:
        if f.id == "TYPHA-PORT-REACHABLE":
            assert f.control == TYPHA
            assert f.evidence["address"] == _address(h, "typha-on", str(f.node))
            assert f.evidence["port"] == 9093 and f.evidence["felix"] is True  # typha_ metrics
    assert all(t.verdict == "fail" and t.probe.state == "open" for t in typha.targets)
    assert _control(r, FELIX).status == "compliant"
    assert _control(r, KUBE_CONTROLLERS).status == "compliant"

    r = results["kc-9094"]
    assert r.status == "non_compliant", _detail(r)
    kc = _control(r, KUBE_CONTROLLERS)
    assert {"KUBE-CONTROLLERS-PORT-REACHABLE", "KUBE-CONTROLLERS-METRICS-ENABLED"} <= _ids(kc)
    (target,) = kc.targets
    assert (target.address, target.port, target.verdict, target.probe.state) == \
        (kc_on.pod_ip, 9094, "fail", "open")
    assert target.probe.felix is True  # identified by its ipam_ metrics
    assert target.node == "kc-9094-node-0" and target.declared.pod == kc_on.pod_names()[0]
    assert _control(r, TYPHA).installed is False  # no Typha in this cluster
    assert "COMPONENT-NOT-INSTALLED" in _ids(_control(r, TYPHA))

    r = results["kc-absent"]
    kc = _control(r, KUBE_CONTROLLERS)
    assert (r.status, kc.status) == ("compliant", "compliant"), _detail(r)
    assert "KUBE-CONTROLLERS-METRICS-PORT-ABSENT" in _ids(kc)
    assert "KUBE-CONTROLLERS-PORT-REACHABLE" not in _ids(kc)

    r = results["kc-missing"]
    kc = _control(r, KUBE_CONTROLLERS)
    assert (r.status, kc.status) == ("non_compliant", "non_compliant"), _detail(r)
    assert kc.declared is not None and kc.declared.enabled is True
    assert kc.declared.port == 9094
    assert "KUBE-CONTROLLERS-PORT-REACHABLE" in _ids(kc)


# --- how Typha reads its environment ----------------------------------------------------------


def _cm(name: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
            "data": dict(data)}


def _secret(name: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def _typha_kwargs(add: Mapping[str, Any], version: str = "v3.32.1") -> dict[str, Any]:
    """add_typha's arguments for one case on one release: `env_from` (extra envFrom sources)
    and `typha_cfg` (the text of a typha.cfg ConfigMap mounted at /etc/calico/typha.cfg) are
    applied to that release's Deployment."""
    kwargs = copy.deepcopy(dict(add))
    sources = kwargs.pop("env_from", None)
    cfg = kwargs.pop("typha_cfg", None)
    if sources or cfg is not None:
        deployment = yaml.safe_load(typha_deployment(version).read_text())
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        if sources:
            container["envFrom"] = [*container.get("envFrom", []), *sources]
        if cfg is not None:
            pod.setdefault("volumes", []).append({"name": "typha-cfg",
                                                  "configMap": {"name": "typha-cfg"}})
            container.setdefault("volumeMounts", []).append(
                {"name": "typha-cfg", "mountPath": "/etc/calico/typha.cfg",
                 "subPath": "typha.cfg"})
            kwargs.setdefault("configmaps", []).append(_cm("typha-cfg", {"typha.cfg": cfg}))
        kwargs["deployment_yaml"] = deployment
    return kwargs


# id -> (add_typha arguments, as _typha_kwargs takes them; enabled as Typha reads it)
ENV_CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "upper": ({"env": {ENABLED: "true"}}, True),
    "lower-name": ({"env": {"typha_prometheusmetricsenabled": "true"}}, True),
    "mixed-name": ({"env": {"Typha_PrometheusMetricsEnabled": "TRUE"}}, True),
    "yes": ({"env": {ENABLED: "yes"}}, True),
    "one": ({"env": {ENABLED: "1"}}, True),
    "t": ({"env": {ENABLED: "T"}}, True),
    "false": ({"env": {ENABLED: "false"}}, False),
    "empty": ({"env": {ENABLED: ""}}, False),  # dropped: the default, false
    "none": ({"env": {ENABLED: "none"}}, False),  # the zero value
    "none-upper": ({"env": {ENABLED: "NONE"}}, False),
    "invalid-on": ({"env": {ENABLED: "on"}}, False),  # invalid: the default
    "configmap-valuefrom": ({"env": {ENABLED: {"configMapKeyRef": {
        "name": "typha-metrics", "key": "enabled"}}},
        "configmaps": [_cm("typha-metrics", {"enabled": "true"})]}, True),
    "secret-valuefrom": ({"env": {ENABLED: {"secretKeyRef": {
        "name": "typha-metrics", "key": "enabled"}}},
        "secrets": [_secret("typha-metrics", {"enabled": "true"})]}, True),
    "envfrom": ({"env_from": [{"configMapRef": {"name": "typha-env"}}],
                 "configmaps": [_cm("typha-env", {ENABLED: "true"})]}, True),
    "envfrom-prefix": ({"env_from": [{"prefix": "TYPHA_", "configMapRef": {"name": "typha-env"}}],
                        "configmaps": [_cm("typha-env", {"PrometheusMetricsEnabled": "true"})]},
                       True),
    # env wins over envFrom, and its empty value is then dropped by Typha: off
    "envfrom-overridden-empty": ({"env_from": [{"configMapRef": {"name": "typha-env"}}],
                                  "configmaps": [_cm("typha-env", {ENABLED: "true"})],
                                  "env": {ENABLED: ""}}, False),
    "port-9193": ({"env": {ENABLED: "true", "TYPHA_PROMETHEUSMETRICSPORT": "9193"}}, True),
    # typha.cfg against the environment (config_params.go resolve: the source is looked up
    # under the raw name and recorded under the canonical one): a key spelled other than
    # PrometheusMetricsEnabled beats the env's true; the canonical spelling loses to it.
    "cfg-lower-beats-env": ({"env": {ENABLED: "true"},
                             "typha_cfg": "[global]\nprometheusmetricsenabled = false\n"}, False),
    "cfg-upper-beats-env": ({"env": {ENABLED: "true"},
                             "typha_cfg": "PROMETHEUSMETRICSENABLED = false\n"}, False),
    "cfg-canonical-loses": ({"env": {ENABLED: "true"},
                             "typha_cfg": "[global]\nPrometheusMetricsEnabled = false\n"}, True),
    "cfg-alone": ({"typha_cfg": "PrometheusMetricsEnabled = true\n"}, True),
}


def _check_env_case(h: Harness, cluster: str, case: str, typha: ComponentHandle,
                    r: ClusterResult) -> None:
    """The emulated Typha (its own reading of the spec), its listeners and the scanner agree
    on the case's expected state."""
    enabled = ENV_CASES[case][1]
    nodes = typha.nodes
    port = 9193 if case == "port-9193" else 9093
    assert {s.enabled for s in typha.serving().values()} == {enabled}, typha.serving()
    assert set(typha.listening()) == ({(_address(h, cluster, n), port) for n in nodes}
                                      if enabled else set())
    control = _control(r, TYPHA)
    assert control.declared is not None and control.declared.enabled is enabled, _detail(r)
    assert control.status == ("non_compliant" if enabled else "compliant"), _detail(r)
    if enabled:
        assert _nodes_with(control, "TYPHA-PORT-REACHABLE") == set(nodes), _detail(r)
        assert {t.port for t in control.targets} == {port}
    else:
        assert "TYPHA-PORT-REACHABLE" not in _ids(control)
    if case == "invalid-on":
        assert "TYPHA-CONFIG-INVALID-VALUE" in _ids(control)
    if case == "secret-valuefrom":
        assert control.declared.raw is None  # a Secret's value is never kept
    if case.startswith("cfg-"):
        assert ("config file" in control.declared.source) is (case != "cfg-canonical-loses")


@pytest.mark.parametrize("install", INSTALLS)
@pytest.mark.parametrize("case", list(ENV_CASES))
def test_typha_env_spellings_and_sources(h: Harness, tmp_path: Path, case: str,
                                         install: str) -> None:
    nodes = _cluster(h, "c", install, "v3.32.1")
    typha = h.typha("c", nodes, **_typha_kwargs(ENV_CASES[case][0]))
    _check_env_case(h, "c", case, typha, _scan(h, tmp_path)["c"])


@pytest.mark.parametrize("install", INSTALLS)
@pytest.mark.parametrize("version", CALICO_VERSIONS)
def test_each_release_every_typha_case(h: Harness, tmp_path: Path, version: str,
                                       install: str) -> None:
    """Every Typha case on every release and install type, one scan of a cluster per case:
    the env spellings and sources and typha.cfg above, one node of several listening, silent
    listeners, a 403 on the Deployment, `controls: [felix-metrics]`, and (operator) the
    Installation's typhaMetricsPort."""
    checks: dict[str, Callable[[ClusterResult], None]] = {}
    for i, case in enumerate(ENV_CASES):
        name = f"e{i}"
        typha = h.typha(name, _cluster(h, name, install, version),
                        version=version, **_typha_kwargs(ENV_CASES[case][0], version))
        checks[name] = functools.partial(_check_env_case, h, name, case, typha)

    drift = _cluster(h, "drift", install, version, nodes=3)
    h.typha("drift", drift, version=version).set_listener(
        "typha-http", address=_address(h, "drift", drift[1]))

    def check_drift(r: ClusterResult) -> None:
        control = _control(r, TYPHA)
        assert control.status == "non_compliant"
        assert _nodes_with(control, "TYPHA-PORT-REACHABLE") == {drift[1]}
        assert {t.node: t.verdict for t in control.targets} == {
            n: "fail" if n == drift[1] else "pass" for n in drift}
    checks["drift"] = check_drift

    for name, ready, verdict in (("silent-ready", True, "pass"),
                                 ("silent-unready", False, "unknown")):
        h.typha(name, _cluster(h, name, install, version, nodes=1), version=version,
                ready=ready, listener="silent")

        def check_silent(r: ClusterResult, verdict: str = verdict) -> None:
            control = _control(r, TYPHA)
            assert [(t.probe.state, t.verdict) for t in control.targets] == \
                [("filtered", verdict)]
            assert control.status == ("compliant" if verdict == "pass" else "error")
        checks[name] = check_silent

    h.typha("forbidden", _cluster(h, "forbidden", install, version), version=version)
    h.emulators["forbidden"].inject(r"/deployments/calico-typha$", status=403)

    def check_forbidden(r: ClusterResult) -> None:
        assert (r.status, _control(r, TYPHA).status) == ("error", "error")
        assert "CONTROL-NOT-CHECKED" in _ids(_control(r, TYPHA))
        assert [t.verdict for t in _control(r, FELIX).targets] == ["pass", "pass"]
    checks["forbidden"] = check_forbidden

    h.typha("felix-only", _cluster(h, "felix-only", install, version), version=version,
            env={ENABLED: "true"})
    h.cluster_options["felix-only"] = {"controls": [FELIX]}

    def check_felix_only(r: ClusterResult) -> None:
        assert ([c.control for c in r.controls], r.status) == ([FELIX], "compliant")
    checks["felix-only"] = check_felix_only

    if install == "operator":
        h.typha("inst-port", _cluster(h, "inst-port", install, version), version=version,
                typha_metrics_port=9093)

        def check_installation(r: ClusterResult) -> None:
            control = _control(r, TYPHA)
            assert control.status == "non_compliant"
            assert {"TYPHA-OPERATOR-METRICS-PORT-SET", "TYPHA-PORT-REACHABLE"} <= _ids(control)
        checks["inst-port"] = check_installation

    results = _scan(h, tmp_path)
    failures = []
    for name, check in checks.items():
        try:
            check(results[name])
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_typha_on_several_nodes_one_listening(h: Harness, tmp_path: Path) -> None:
    """Declared off everywhere, but one node's port 9093 answers with Typha's metrics (a
    stale process, a port forward): only that node fails, and the finding names it."""
    nodes = _cluster(h, "c", "manifest", "v3.32.1", nodes=4)
    typha = h.typha("c", nodes)
    odd = _address(h, "c", nodes[2])
    typha.set_listener("typha-http", address=odd)
    assert list(typha.listening()) == [(odd, 9093)]
    r = _scan(h, tmp_path)["c"]
    control = _control(r, TYPHA)
    assert control.status == "non_compliant", _detail(r)
    assert _nodes_with(control, "TYPHA-PORT-REACHABLE") == {nodes[2]}
    assert _nodes_with(control, "DRIFT-DISABLED-BUT-OPEN") == {nodes[2]}
    assert {t.node: t.verdict for t in control.targets} == {
        n: "fail" if n == nodes[2] else "pass" for n in nodes}


def test_typha_pods_on_some_nodes_only(h: Harness, tmp_path: Path) -> None:
    """Typha runs on two of five nodes: only those are its targets."""
    nodes = _cluster(h, "c", "operator", "v3.31.7", nodes=5)
    h.typha("c", [nodes[1], nodes[3]], version="v3.31.7", env={ENABLED: "true"})
    r = _scan(h, tmp_path)["c"]
    control = _control(r, TYPHA)
    assert sorted(t.node for t in control.targets) == [nodes[1], nodes[3]]
    assert _nodes_with(control, "TYPHA-PORT-REACHABLE") == {nodes[1], nodes[3]}
    assert [t.verdict for t in _control(r, FELIX).targets] == ["pass"] * 5


# --- the operator's Installation --------------------------------------------------------------


def test_operator_typha_metrics_port(h: Harness, tmp_path: Path) -> None:
    """Installation spec.typhaMetricsPort: the operator renders TYPHA_PROMETHEUSMETRICSENABLED
    =true and the port (pkg/render/typha.go); Typha listens there."""
    nodes = _cluster(h, "c", "operator", "v3.32.1")
    typha = h.typha("c", nodes, typha_metrics_port=9193)
    env = {e["name"]: e.get("value") for e in
           typha.deployment_object()["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[ENABLED] == "true" and env["TYPHA_PROMETHEUSMETRICSPORT"] == "9193"
    r = _scan(h, tmp_path)["c"]
    control = _control(r, TYPHA)
    assert control.status == "non_compliant", _detail(r)
    assert "TYPHA-OPERATOR-METRICS-PORT-SET" in _ids(control)
    assert _nodes_with(control, "TYPHA-PORT-REACHABLE") == set(nodes)
    assert {t.port for t in control.targets} == {9193}


def test_operator_renders_typha_again_when_the_installation_changes(
        h: Harness, tmp_path: Path) -> None:
    """Removing spec.typhaMetricsPort (the operator-install fix) re-renders Typha's env,
    rolls its pods and closes the port; setting it opens it again."""
    nodes = _cluster(h, "c", "operator", "v3.30.7")
    typha = h.typha("c", nodes, version="v3.30.7", typha_metrics_port=9093)
    typha.simulate_controllers()
    before = set(typha.pod_names())
    assert len(typha.listening()) == 2
    emu = h.emulators["c"]
    emu.patch_object("operator.tigera.io/v1", "Installation", "default",
                     {"spec": {"typhaMetricsPort": None}})
    assert typha.wait_rollout(10)
    assert not set(typha.pod_names()) & before  # new pods
    assert typha.listening() == {}
    r = _scan(h, tmp_path)["c"]
    assert _control(r, TYPHA).status == "compliant", _detail(r)
    emu.patch_object("operator.tigera.io/v1", "Installation", "default",
                     {"spec": {"typhaMetricsPort": 9093}})
    assert typha.wait_rollout(10)
    assert len(typha.listening()) == 2
    r = _rescan(h, tmp_path, "again")
    assert _control(r, TYPHA).status == "non_compliant", _detail(r)


# --- typha.cfg --------------------------------------------------------------------------------


def test_typha_cfg_with_both_spellings_is_undetermined(h: Harness, tmp_path: Path) -> None:
    """env true, typha.cfg `prometheusmetricsenabled = false` and `PrometheusMetricsEnabled =
    true`. config_params.go `resolve`: the env value is recorded under the canonical name
    (source 4); the file's map is walked in Go's random order. Lower-case key first: it finds
    nothing under its raw name, sets false and records the canonical name at source 3; the
    canonical key then finds 3, not less than 3, and sets true. Canonical key first: it finds
    4 and is skipped; the lower-case key sets false. Typha ends true or false: undetermined.
    (The emulated Typha takes the file's order: lower-case first, so true, and it listens.)"""
    nodes = _cluster(h, "c", "manifest", "v3.32.1", nodes=1)
    text = "prometheusmetricsenabled = false\nPrometheusMetricsEnabled = true\n"
    typha = h.typha("c", nodes, **_typha_kwargs({"env": {ENABLED: "true"}, "typha_cfg": text}))
    assert [s.enabled for s in typha.serving().values()] == [True]
    r = _scan(h, tmp_path)["c"]
    control = _control(r, TYPHA)
    assert control.status == "non_compliant", _detail(r)  # the open port decides anyway
    assert control.declared is not None and control.declared.enabled is None, \
        control.declared
    assert "TYPHA-CONFIG-UNRESOLVED" in _ids(control)


def _typha_cfg_elsewhere(*, directory: bool, args: list[str] | None = None,
                         path: str = "/etc/calico") -> dict[str, Any]:
    deployment = yaml.safe_load(typha_deployment().read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if args:
        container["args"] = args
    pod.setdefault("volumes", []).append({"name": "typha-cfg",
                                          "configMap": {"name": "typha-cfg"}})
    mount: dict[str, Any] = {"name": "typha-cfg", "mountPath": path}
    if not directory:
        mount["subPath"] = "typha.cfg"
    container.setdefault("volumeMounts", []).append(mount)
    return dict(deployment)


@pytest.mark.parametrize("layout", ["directory", "config-file-flag"])
def test_typha_cfg_mounted_as_a_directory_or_named_by_flag(h: Harness, tmp_path: Path,
                                                           layout: str) -> None:
    """/etc/calico as a ConfigMap directory, or `--config-file` naming another file
    (typha/cmd/typha: `-c, --config-file`): the file is found either way."""
    if layout == "directory":
        deployment = _typha_cfg_elsewhere(directory=True)
    else:
        deployment = _typha_cfg_elsewhere(directory=False, path="/etc/typha/alt.cfg",
                                          args=["--config-file", "/etc/typha/alt.cfg"])
    nodes = _cluster(h, "c", "manifest", "v3.32.1", nodes=1)
    typha = h.typha("c", nodes, deployment_yaml=deployment, env={ENABLED: "true"},
                    configmaps=[_cm("typha-cfg", {"typha.cfg": "prometheusMetricsEnabled=no\n"})])
    assert typha.listening() == {}
    r = _scan(h, tmp_path)["c"]
    control = _control(r, TYPHA)
    assert control.status == "compliant", _detail(r)
    assert control.declared is not None and "config file" in control.declared.source


@pytest.mark.parametrize("version", CALICO_VERSIONS)
def test_typha_metrics_certificate(h: Harness, tmp_path: Path, version: str) -> None:
    """A metrics certificate and key make Typha serve HTTPS from v3.32.0; older Typha does
    not know the parameters and serves plain HTTP."""
    nodes = _cluster(h, "c", "manifest", version, nodes=1)
    typha = h.typha("c", nodes, version=version, env={
        ENABLED: "true", "TYPHA_PROMETHEUSMETRICSCERTFILE": "/etc/typha-metrics/tls.crt",
        "TYPHA_PROMETHEUSMETRICSKEYFILE": "/etc/typha-metrics/tls.key"})
    tls = version >= "v3.32"
    assert list(typha.listening().values()) == ["typha-tls" if tls else "typha-http"]
    r = _scan(h, tmp_path)["c"]
    control = _control(r, TYPHA)
    assert control.status == "non_compliant", _detail(r)
    (target,) = control.targets
    assert target.declared.tls is tls
    assert (target.probe.state, target.probe.protocol) == ("open", "https" if tls else "http")
    assert target.probe.felix is True  # typha_ metrics behind TLS too


def test_typha_caught_mid_rollout(h: Harness, tmp_path: Path) -> None:
    """maxSurge 100%: the new (disabled) pods start beside the old (enabled) ones on the same
    nodes. While both run, the port is open and each node fails; the old pods are what is
    still enabled. Once the old pods are gone the control passes."""
    nodes = _cluster(h, "c", "manifest", "v3.32.1")
    typha = h.typha("c", nodes, env={ENABLED: "true"})
    old = set(typha.pod_names())
    typha.update_env({ENABLED: None}, roll=False)
    typha.roll(finish=False)
    pods = typha.pods()
    assert len(pods) == 4 and old < {p["metadata"]["name"] for p in pods}
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(nodes * 2)
    assert len(typha.listening()) == 2  # the old processes still serve
    r = _rescan(h, tmp_path, "surge")
    control = _control(r, TYPHA)
    assert control.status == "non_compliant", _detail(r)
    enabled = {t.declared.pod for t in control.targets if t.declared.enabled}
    assert enabled == old
    assert _nodes_with(control, "DRIFT-DISABLED-BUT-OPEN") == set(nodes)  # the new pods
    typha.finish_rollout()
    assert typha.listening() == {} and not set(typha.pod_names()) & old
    r = _rescan(h, tmp_path, "done")
    assert _control(r, TYPHA).status == "compliant", _detail(r)


@pytest.mark.parametrize(("kcc_port", "status"), [(9094, "non_compliant"), (0, "compliant")])
def test_kube_controllers_on_native_v3_crds(h: Harness, tmp_path: Path, kcc_port: int,
                                            status: str) -> None:
    """A cluster serving only Calico's native v3 CRDs (v3.32+): KubeControllersConfiguration
    is read from projectcalico.org/v3, as libcalico-go's discovery picks it."""
    h.cluster("c", ["closed"], felix_api="projectcalico.org/v3")
    kc = h.kube_controllers("c", kcc_port=kcc_port)
    assert kc.kcc_api == "projectcalico.org/v3"
    r = _scan(h, tmp_path)["c"]
    assert _control(r, KUBE_CONTROLLERS).status == status, _detail(r)
    asked = {(q.api_group, q.name) for q in h.emulators["c"].requests
             if q.resource == "kubecontrollersconfigurations"}
    assert asked == {("projectcalico.org", "default")}


# --- which controls, what is installed --------------------------------------------------------


def test_controls_felix_only_skips_the_others(h: Harness, tmp_path: Path) -> None:
    nodes = _cluster(h, "c", "manifest", "v3.32.1")
    h.typha("c", nodes, env={ENABLED: "true"})
    h.kube_controllers("c")
    h.cluster_options["c"] = {"controls": [FELIX]}
    r = _scan(h, tmp_path)["c"]
    assert r.status == "compliant", _detail(r)
    assert [c.control for c in r.controls] == [FELIX]
    assert not [q for q in h.emulators["c"].requests
                if q.resource in ("deployments", "kubecontrollersconfigurations")]


def test_top_level_controls_without_felix(h: Harness, tmp_path: Path) -> None:
    """`controls:` at the top names the controls of every cluster: here Typha's and
    kube-controllers' only; Felix's nodes are neither probed nor judged."""
    nodes = _cluster(h, "c", "operator", "v3.32.1")
    h.typha("c", nodes)
    h.kube_controllers("c", kcc_port=9094)
    felix = h.fleet.add(_address(h, "c", nodes[0]), "felix-http", node_name=nodes[0])
    h.top_level["controls"] = [TYPHA, KUBE_CONTROLLERS]
    r = _scan(h, tmp_path)["c"]
    assert [c.control for c in r.controls] == [TYPHA, KUBE_CONTROLLERS]
    assert (r.status, r.nodes) == ("non_compliant", ()), _detail(r)
    assert _control(r, TYPHA).status == "compliant"
    assert _control(r, KUBE_CONTROLLERS).status == "non_compliant"
    assert not [f for f in r.findings if f.control == FELIX]
    assert felix.connections == 0  # Felix's port was not probed


def test_no_typha_deployment_is_not_installed_and_compliant(h: Harness, tmp_path: Path) -> None:
    _cluster(h, "c", "manifest", "v3.29.7")
    h.kube_controllers("c", version="v3.29.7", kcc_port=0)
    r = _scan(h, tmp_path)["c"]
    typha = _control(r, TYPHA)
    assert (r.status, typha.status, typha.installed) == ("compliant", "compliant", False)
    assert _ids(typha) == {"COMPONENT-NOT-INSTALLED"}
    assert typha.targets == ()


# --- listeners that do not answer -------------------------------------------------------------


@pytest.mark.parametrize(("declared_on", "ready", "status", "verdict"), [
    (False, True, "compliant", "pass"),  # filtered on a Ready pod: Calico's deny policy
    (False, False, "error", "unknown"),  # filtered while not Ready proves nothing
    (True, True, "non_compliant", "fail"),  # enabled in configuration fails whatever answers
])
def test_typha_silent_listener(h: Harness, tmp_path: Path, declared_on: bool, ready: bool,
                               status: str, verdict: str) -> None:
    nodes = _cluster(h, "c", "manifest", "v3.32.1", nodes=1)
    h.typha("c", nodes, env={ENABLED: "true"} if declared_on else None, ready=ready,
            listener="silent")
    r = _scan(h, tmp_path)["c"]
    control = _control(r, TYPHA)
    (target,) = control.targets
    assert (control.status, target.verdict, target.probe.state) == \
        (status, verdict, "filtered"), _detail(r)
    if verdict == "unknown":
        assert "NODE-NOT-VERIFIED" in _ids(control)
    if declared_on:
        assert "DRIFT-ENABLED-BUT-CLOSED" in _ids(control)


@pytest.mark.parametrize(("kcc_port", "ready", "status"), [
    (0, True, "compliant"),
    (0, False, "error"),
    (9094, True, "non_compliant"),
])
def test_kube_controllers_silent_listener(h: Harness, tmp_path: Path, kcc_port: int,
                                          ready: bool, status: str) -> None:
    _cluster(h, "c", "operator", "v3.32.1", nodes=1)
    kc = h.kube_controllers("c", kcc_port=kcc_port, ready=ready, listener="silent")
    assert list(kc.listening()) == [(kc.pod_ip, 9094)]
    r = _scan(h, tmp_path)["c"]
    control = _control(r, KUBE_CONTROLLERS)
    assert control.status == status, _detail(r)
    assert [t.probe.state for t in control.targets] == ["filtered"]


# --- what the scanner may not read ------------------------------------------------------------


@pytest.mark.parametrize(("path", "control_id"), [
    (r"/deployments/calico-typha$", TYPHA),
    (r"/deployments/calico-kube-controllers$", KUBE_CONTROLLERS),
])
def test_forbidden_deployment_is_an_error_of_that_control_only(
        h: Harness, tmp_path: Path, path: str, control_id: str) -> None:
    nodes = _cluster(h, "c", "manifest", "v3.32.1")
    h.typha("c", nodes)
    h.kube_controllers("c", kcc_port=0)
    h.emulators["c"].inject(path, status=403)
    r = _scan(h, tmp_path)["c"]
    assert r.status == "error", _detail(r)
    control = _control(r, control_id)
    assert control.status == "error"
    assert "CONTROL-NOT-CHECKED" in _ids(control)
    assert "403" in (control.error or "")
    felix = _control(r, FELIX)
    assert felix.status == "compliant"
    assert [t.verdict for t in felix.targets] == ["pass", "pass"]
    other = _control(r, KUBE_CONTROLLERS if control_id == TYPHA else TYPHA)
    assert other.status == "compliant"


def test_forbidden_kube_controllers_configuration_is_unknown(h: Harness, tmp_path: Path) -> None:
    _cluster(h, "c", "manifest", "v3.32.1", nodes=1)
    h.kube_controllers("c", kcc_port=0)
    h.emulators["c"].inject(r"/kubecontrollersconfigurations/default$", status=403)
    r = _scan(h, tmp_path)["c"]
    control = _control(r, KUBE_CONTROLLERS)
    assert (r.status, control.status) == ("error", "error"), _detail(r)
    assert control.declared is not None and control.declared.enabled is None
    assert "KUBE-CONTROLLERS-CONFIG-UNRESOLVED" in _ids(control)


# --- the controllers' moves, seen by the scanner ----------------------------------------------


def _rescan(h: Harness, tmp_path: Path, step: str) -> ClusterResult:
    folder = tmp_path / step
    folder.mkdir()
    return _scan(h, folder)["c"]


def test_env_fix_rolls_typha_and_closes_the_port(h: Harness, tmp_path: Path) -> None:
    nodes = _cluster(h, "c", "manifest", "v3.28.5")
    typha = h.typha("c", nodes, version="v3.28.5", env={ENABLED: "true"})
    typha.simulate_controllers()
    assert _control(_rescan(h, tmp_path, "before"), TYPHA).status == "non_compliant"
    old = set(typha.pod_names())
    typha.update_env({ENABLED: "false"}, roll=False)  # the write; the controller rolls
    assert typha.wait_rollout(10)
    assert not set(typha.pod_names()) & old and len(typha.pod_names()) == 2
    assert typha.listening() == {}
    r = _rescan(h, tmp_path, "after")
    assert _control(r, TYPHA).status == "compliant", _detail(r)


def test_kcc_fix_restarts_kube_controllers_and_closes_the_port(h: Harness,
                                                               tmp_path: Path) -> None:
    _cluster(h, "c", "manifest", "v3.27.5", nodes=1)
    kc = h.kube_controllers("c", version="v3.27.5", kcc_port=9094)
    kc.simulate_controllers()
    assert _control(_rescan(h, tmp_path, "before"), KUBE_CONTROLLERS).status == "non_compliant"
    pod = kc.pod_names()
    h.emulators["c"].patch_object("crd.projectcalico.org/v1", "KubeControllersConfiguration",
                                  "default", {"spec": {"prometheusMetricsPort": 0}})
    assert kc.pod_names() == pod  # the container restarts in its pod
    (status,) = kc.pods()[0]["status"]["containerStatuses"]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 129
    assert kc.listening() == {}
    r = _rescan(h, tmp_path, "after")
    assert _control(r, KUBE_CONTROLLERS).status == "compliant", _detail(r)


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_json_carries_the_component_findings(h: Harness, tmp_path: Path) -> None:
    nodes = _cluster(h, "c", "manifest", "v3.32.1")
    h.typha("c", nodes[:1], env={ENABLED: "true"})
    h.kube_controllers("c", kcc_port=0)
    run = felixscan("scan", "--config", str(h.config()), "--db", _db(tmp_path),
                    "--format", "json")
    assert run.code == 1, run.stderr
    (cluster,) = json.loads(run.stdout)["clusters"]
    assert cluster["status"] == "non_compliant"
    reachable = [f for f in cluster["findings"] if f["id"] == "TYPHA-PORT-REACHABLE"]
    assert [f["node"] for f in reachable] == [nodes[0]]
    if "controls" in cluster:  # schema 1.2: per-control results (added by the outputs work)
        by_id = {c.get("id", c.get("control")): c for c in cluster["controls"]}
        assert by_id[TYPHA]["status"] == "non_compliant"
        assert by_id[KUBE_CONTROLLERS]["status"] == "compliant"
        assert by_id[FELIX]["status"] == "compliant"
