"""Least privilege, proven: the real scanner and remediator run against emulated clusters whose
API server grants exactly what deploy/ grants (`KubeEmulator.set_rbac`, 403 for the rest).

Each scenario renders its overlays with `kubectl kustomize`, takes the permissions bound to one
ServiceAccount, and runs `felixscan scan` or `felixscan remediate`. Asserted: the run succeeds,
every request it sent is allowed by those permissions, and every permission deploy/ grants is
used by some request of a scenario that grants it. Removing any one permission breaks a scan.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from scanner.app.cli import main
from scanner.emulator import ClusterHandle, RecordedRequest
from tests.helpers.rbac_rules import (
    AGENT,
    OVERLAYS,
    REMEDIATOR,
    Permission,
    as_rbac_rules,
    describe,
    find,
    grants,
    render,
    render_together,
    resource_requests,
    site_valuefrom,
)
from tests.helpers.scan_harness import Harness, Node

HAS_REMEDIATION = importlib.util.find_spec("scanner.remediate") is not None
needs_remediation = pytest.mark.skipif(
    not HAS_REMEDIATION, reason="scanner/remediate.py is not there yet: nothing to prove the "
    "remediation overlays against")
REMEDIATE = ["--cluster", "c", "--apply", "--yes", "--ignore-window", "--rollout-timeout", "30"]
ENABLED = "FELIX_PROMETHEUSMETRICSENABLED"
PORT = "FELIX_PROMETHEUSMETRICSPORT"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _valuefrom_objects(enabled: str) -> dict[str, Any]:
    """A calico-node whose metrics settings come from a site Secret and ConfigMap."""
    return {
        "env": {ENABLED: {"secretKeyRef": {"name": "felix-metrics", "key": "enabled"}},
                PORT: {"configMapKeyRef": {"name": "felix-metrics-port", "key": "port"}}},
        "secrets": [{"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": "felix-metrics"}, "data": {"enabled": _b64(enabled)}}],
        "configmaps": [{"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "felix-metrics-port"}, "data": {"port": "9091"}}],
    }


@dataclass(frozen=True)
class Scenario:
    """One cluster `c`, built by `build`, and what runs against it with `account`'s rights."""

    id: str
    overlays: tuple[str, ...]
    account: tuple[str, str]
    build: Callable[[Harness], ClusterHandle]
    command: tuple[tuple[str, ...], ...] = (("scan",),)  # felixscan commands, in order
    calico_namespace: str = "kube-system"  # where the valuefrom-access Role is edited to live
    remediation: bool = False

    def objects(self) -> list[dict[str, Any]]:
        """The overlays' objects, valuefrom-access edited for this cluster's names."""
        return site_valuefrom(render_together(self.overlays), namespace=self.calico_namespace,
                              configmaps=["felix-metrics-port"], secrets=["felix-metrics"])


def _components(h: Harness, handle: ClusterHandle) -> ClusterHandle:
    """Typha (as released: metrics off) on every node and calico-kube-controllers with its
    metrics switched off (KubeControllersConfiguration port 0): a full three-control scan, every
    control compliant."""
    h.typha("c", [n.name for n in handle.nodes])
    h.kube_controllers("c", kcc_port=0)
    return handle


def _manifest(h: Harness) -> ClusterHandle:
    return _components(h, h.cluster("c", ["closed", Node("closed", name="edge")], felix_configs=[
        {"metadata": {"name": "node.edge"}, "spec": {"logSeverityScreen": "Info"}}]))


def _operator(h: Harness) -> ClusterHandle:
    return _components(h, h.cluster("c", ["closed", "closed"], install="operator"))


def _node_checked(h: Harness) -> ClusterHandle:
    from tests.scan.test_node_view import NS, line

    handle = h.cluster("c", [Node("closed", name="n1"), Node("closed", name="n2")])
    h.cluster_options.setdefault("c", {})["node_check"] = {"namespace": NS}
    h.node_check("c", {"n1": line("n1", listening=False), "n2": line("n2", listening=False)},
                 namespace=NS)
    return handle


def _remediable(*, typha: dict[str, Any] | None = None, kube_controllers: dict[str, Any]
                | None = None, **build: Any) -> Callable[[Harness], ClusterHandle]:
    """A cluster to remediate; Typha and kube-controllers compliant unless `typha` /
    `kube_controllers` (add_typha / add_kube_controllers arguments) say otherwise. Their
    controllers run too: the re-scans read them with the remediator's rights."""
    def make(h: Harness) -> ClusterHandle:
        handle = h.cluster("c", ["closed", "closed"], options={"remediation": {"enabled": True}},
                           **build)
        handle.simulate_controllers(auto_roll=True)  # rollouts happen, as in a real cluster
        h.typha("c", [n.name for n in handle.nodes], **(typha or {})).simulate_controllers()
        h.kube_controllers("c", **(kube_controllers or {"kcc_port": 0})).simulate_controllers()
        return handle
    return make


SCENARIOS = [
    Scenario("scan-manifest", ("agent",), AGENT, _manifest),
    # Calico's native v3 CRDs only (v3.32+): Felix, and so the scanner, read projectcalico.org.
    Scenario("scan-manifest-v3crds", ("agent",), AGENT,
             lambda h: _components(h, h.cluster("c", ["closed"],
                                                felix_api="projectcalico.org/v3"))),
    Scenario("scan-operator", ("agent-operator",), AGENT, _operator),
    Scenario("scan-manifest-valuefrom", ("agent", "valuefrom-access"), AGENT,
             lambda h: h.cluster("c", ["closed"], **_valuefrom_objects("false"))),
    Scenario("scan-operator-valuefrom", ("agent-operator", "valuefrom-access"), AGENT,
             lambda h: h.cluster("c", ["closed"], install="operator",
                                 **_valuefrom_objects("false")),
             calico_namespace="calico-system"),
    # node-check's view of each node, read from its pods' logs in its own namespace.
    Scenario("scan-manifest-node-check", ("agent", "node-check-access"), AGENT,
             _node_checked),
    # The env of a manifest install, changed and then rolled back (patch, rollout, re-scan).
    Scenario("remediate-env", ("agent", "remediation"), REMEDIATOR,
             _remediable(env={ENABLED: "true"}),
             command=(("remediate", *REMEDIATE), ("remediate", "--rollback", "1",
                                                  *REMEDIATE[2:])), remediation=True),
    Scenario("remediate-felixconfiguration", ("agent", "remediation"), REMEDIATOR,
             _remediable(felix_configs=[{"metadata": {"name": "default"},
                                         "spec": {"prometheusMetricsEnabled": True}}]),
             command=(("remediate", *REMEDIATE),), remediation=True),
    Scenario("remediate-felixconfiguration-v3crds", ("agent", "remediation"), REMEDIATOR,
             _remediable(felix_api="projectcalico.org/v3",
                         felix_configs=[{"metadata": {"name": "default"},
                                         "spec": {"prometheusMetricsEnabled": True}}]),
             command=(("remediate", *REMEDIATE),), remediation=True),
    Scenario("remediate-valuefrom", ("agent", "remediation", "valuefrom-access"), REMEDIATOR,
             _remediable(**_valuefrom_objects("true")),
             command=(("remediate", *REMEDIATE),), remediation=True),
    Scenario("remediate-operator", ("agent-operator", "remediation-operator"), REMEDIATOR,
             _remediable(install="operator", node_metrics_port=9091),
             command=(("remediate", *REMEDIATE),), remediation=True),
    # Typha's env on a manifest install (the calico-typha Deployment, rolled out).
    Scenario("remediate-typha-env", ("agent", "remediation"), REMEDIATOR,
             _remediable(typha={"env": {"TYPHA_PROMETHEUSMETRICSENABLED": "true"}}),
             command=(("remediate", *REMEDIATE),), remediation=True),
    # Typha on an operator install: the Installation's typhaMetricsPort.
    Scenario("remediate-operator-typha", ("agent-operator", "remediation-operator"), REMEDIATOR,
             _remediable(install="operator", typha={"typha_metrics_port": 9093}),
             command=(("remediate", *REMEDIATE),), remediation=True),
    # kube-controllers: KubeControllersConfiguration `default`, in each API group.
    Scenario("remediate-kube-controllers", ("agent", "remediation"), REMEDIATOR,
             _remediable(kube_controllers={"kcc_port": 9094}),
             command=(("remediate", *REMEDIATE),), remediation=True),
    Scenario("remediate-kube-controllers-v3crds", ("agent-operator", "remediation-operator"),
             REMEDIATOR, _remediable(install="operator", felix_api="projectcalico.org/v3",
                                     kube_controllers={"kcc_port": 9094}),
             command=(("remediate", *REMEDIATE),), remediation=True),
]


@dataclass
class Run:
    permissions: list[Permission]
    requests: list[RecordedRequest]
    codes: list[int]
    stdout: list[str]
    stderr: list[str]

    def cluster(self) -> dict[str, Any]:
        """Cluster `c` from the JSON of the first command, a scan."""
        clusters = json.loads(self.stdout[0])["clusters"]
        assert [c["name"] for c in clusters] == ["c"]
        return dict(clusters[0])


def _felixscan(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def run_scenario(scenario: Scenario, tmp: Path, *,
                 drop: Permission | None = None) -> Run:
    """Build the cluster, enforce the scenario's permissions (less `drop`), run its commands."""
    permissions = grants(scenario.objects(), scenario.account)
    enforced = [p for p in permissions if p != drop]
    harness = Harness(tmp)
    try:
        scenario.build(harness)
        emu = harness.emulators["c"]
        emu.set_rbac(as_rbac_rules(enforced))
        config, db = harness.config(), f"sqlite:///{tmp / 'felixscan.db'}"
        run = Run(permissions, [], [], [], [])
        for command in scenario.command:
            extra = ["--json"] if command[0] == "scan" else []
            code, out, err = _felixscan([command[0], "--config", str(config), "--db", db,
                                         *command[1:], *extra])
            run.codes.append(code)
            run.stdout.append(out)
            run.stderr.append(err)
        run.requests = resource_requests(emu.requests)
        return run
    finally:
        harness.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every scenario, run once for the whole module."""
    done: dict[str, Run] = {}
    for scenario in SCENARIOS:
        if scenario.remediation and not HAS_REMEDIATION:
            continue
        done[scenario.id] = run_scenario(scenario, tmp_path_factory.mktemp(scenario.id))
    yield done


def _param(s: Scenario) -> Any:
    return pytest.param(s, id=s.id, marks=[needs_remediation] if s.remediation else [])


@pytest.mark.parametrize("scenario", [_param(s) for s in SCENARIOS])
def test_runs_succeed_with_only_the_deployed_permissions(runs: dict[str, Run],
                                                         scenario: Scenario) -> None:
    run = runs[scenario.id]
    for code, out, err in zip(run.codes, run.stdout, run.stderr, strict=True):
        assert code == 0, out + err
    denied = [describe(r) for r in run.requests if r.status == 403]
    assert not denied, f"{scenario.id}: refused by the deployed RBAC: {denied}"
    if scenario.remediation:
        assert any(r.verb in ("patch", "create") and not r.dry_run for r in run.requests)
    else:
        assert run.cluster()["status"] == "compliant"
        assert {r.verb for r in run.requests} == {"get", "list"}


@pytest.mark.parametrize(("scenario_id", "namespace", "group"), [
    ("scan-manifest", "kube-system", "crd.projectcalico.org"),
    ("scan-operator", "calico-system", "crd.projectcalico.org"),
    ("scan-manifest-v3crds", "kube-system", "projectcalico.org"),
])
def test_the_scans_read_all_three_controls(runs: dict[str, Run], scenario_id: str,
                                           namespace: str, group: str) -> None:
    """A full three-control scan under the deployed rights: Typha's and kube-controllers'
    Deployments read in calico-node's namespace, KubeControllersConfiguration `default` in the
    group Calico's clients read, each answered (200), and no finding says a control was not
    checked or not installed."""
    run = runs[scenario_id]
    answered = {(r.verb, r.api_group, r.resource, r.name, r.namespace) for r in run.requests
                if r.status == 200}
    assert {("get", "apps", "deployments", "calico-typha", namespace),
            ("get", "apps", "deployments", "calico-kube-controllers", namespace),
            ("get", group, "kubecontrollersconfigurations", "default", None)} <= answered
    ids = {f["id"] for f in run.cluster()["findings"]}
    assert not ids & {"CONTROL-NOT-CHECKED", "COMPONENT-NOT-INSTALLED"}, ids


@pytest.mark.parametrize("scenario", [_param(s) for s in SCENARIOS])
def test_every_request_is_allowed_by_the_rules_in_deploy(runs: dict[str, Run],
                                                         scenario: Scenario) -> None:
    # Checked with our own reading of RBAC too, not only the emulator's: two implementations
    # of the matching rules must agree.
    run = runs[scenario.id]
    assert run.requests, "the scenario sent no request"
    unallowed = [describe(r) for r in run.requests
                 if not any(p.allows(r) for p in run.permissions)]
    assert not unallowed, f"{scenario.id}: requests deploy/ does not allow: {unallowed}"


def test_every_permission_in_deploy_is_used(runs: dict[str, Run]) -> None:
    """A permission that no scenario granting it ever needed is one too many."""
    used: dict[Permission, bool] = {}
    for run in runs.values():
        for p in run.permissions:
            used[p] = used.get(p, False) or any(p.allows(r) for r in run.requests)
    unused = sorted(str(p) for p, hit in used.items() if not hit)
    assert not unused, "granted in deploy/ but never used:\n  " + "\n  ".join(unused)


def test_every_overlay_with_rbac_is_proven_by_a_scenario() -> None:
    covered = {o for s in SCENARIOS for o in s.overlays}
    with_rbac = {o for o in OVERLAYS
                 if any(obj["kind"] in ("Role", "ClusterRole", "RoleBinding",
                                        "ClusterRoleBinding") for obj in render(o))}
    assert with_rbac <= covered, f"overlays whose RBAC no scenario exercises: " \
        f"{sorted(with_rbac - covered)}"
    assert {"agent", "agent-operator", "remediation", "remediation-operator",
            "valuefrom-access"} <= with_rbac


def test_only_felixscan_accounts_are_bound_and_nothing_is_wildcarded() -> None:
    """The proof covers the agent and the remediator; any other subject would escape it."""
    for overlay in OVERLAYS:
        for obj in render(overlay):
            if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                subjects = {(s["kind"], s.get("namespace"), s["name"]) for s in obj["subjects"]}
                assert subjects <= {("ServiceAccount", *AGENT), ("ServiceAccount",
                                                                  *REMEDIATOR)}, (overlay, obj)
            for rule in obj.get("rules") or []:
                flat = [*rule["verbs"], *rule["apiGroups"], *rule["resources"]]
                assert "*" not in flat, (overlay, rule)
                assert not set(rule["verbs"]) & {"create", "update", "delete",
                                                 "deletecollection", "escalate", "bind",
                                                 "impersonate"}, (overlay, rule)
    agent_verbs = {p.verb for o in ("agent", "agent-operator") for p in grants(render(o), AGENT)}
    assert agent_verbs == {"get", "list"}  # the nightly agent can never write


@pytest.mark.parametrize("scenario_id", ["scan-manifest", "scan-operator",
                                         "scan-manifest-v3crds"])
def test_removing_any_one_permission_makes_the_scan_fail(tmp_path: Path, runs: dict[str, Run],
                                                         scenario_id: str) -> None:
    """Each permission a scan uses is needed: without it the cluster ends as an error, never
    compliant: Felix's nodes unknown, or, for what only Typha's or kube-controllers' control
    reads (their Deployments, KubeControllersConfiguration), that control an error while
    Felix's nodes are still verified. (The FelixConfiguration and KubeControllersConfiguration
    group a cluster does not serve is used by another scenario.)"""
    scenario = next(s for s in SCENARIOS if s.id == scenario_id)
    permissions = grants(scenario.objects(), scenario.account)
    used = [p for p in permissions if any(p.allows(r) for r in runs[scenario_id].requests)]
    # nodes, FelixConfigurations, Installation, KubeControllersConfiguration; in calico:
    # calico-node, two Deployments, revisions, pods, a ConfigMap
    assert len(used) >= 10
    for i, missing in enumerate(used):
        run = run_scenario(scenario, tmp_path / str(i), drop=missing)
        assert run.codes == [3], f"without {missing}: exit {run.codes}\n{run.stderr[0]}"
        cluster = run.cluster()
        assert cluster["status"] == "error", missing
        # The reason names the refusal: the cluster's error, or (for a ConfigMap the scanner
        # may not read) the finding that leaves the declared state unknown.
        said = [cluster["error"] or "", *(f["message"] for f in cluster["findings"])]
        assert any("403" in text for text in said), (missing, said)
        if missing.resource in ("deployments", "kubecontrollersconfigurations"):
            control = "typha-metrics" if missing.name == "calico-typha" \
                else "kube-controllers-metrics"
            assert any(f["id"] in ("CONTROL-NOT-CHECKED", "KUBE-CONTROLLERS-CONFIG-UNRESOLVED")
                       and f.get("control", control) == control
                       for f in cluster["findings"]), (missing, cluster["findings"])
            assert all(n["verdict"] == "pass" for n in cluster["nodes"]), missing
        else:
            assert all(n["verdict"] == "unknown" for n in cluster["nodes"]), missing


def test_a_valuefrom_reference_without_the_opt_in_is_unknown(tmp_path: Path) -> None:
    """The base grants no Secret and no site ConfigMap: a calico-node reading its metrics
    switch from them is scanned, but its declared state is unknown, with a finding naming the
    Secret and the 403; nothing is reported compliant."""
    scenario = Scenario("secret-without-opt-in", ("agent",), AGENT,
                        lambda h: h.cluster("c", ["closed"], **_valuefrom_objects("false")))
    run = run_scenario(scenario, tmp_path)
    assert run.codes == [3], run.stderr[0]
    cluster = run.cluster()
    assert cluster["status"] == "error"
    assert [n["verdict"] for n in cluster["nodes"]] == ["unknown"]
    unresolved = [f["message"] for f in cluster["findings"]
                  if f["id"] == "FELIX-CONFIG-UNRESOLVED"]
    assert any("felix-metrics" in m and "403" in m for m in unresolved), cluster["findings"]
    assert {(r.resource, r.name) for r in run.requests if r.status == 403} == \
        {("secrets", "felix-metrics"), ("configmaps", "felix-metrics-port")}


@needs_remediation
@pytest.mark.parametrize("felix_api", ["crd.projectcalico.org/v1", "projectcalico.org/v3"])
def test_creating_a_missing_kcc_is_refused_without_an_opt_in(tmp_path: Path,
                                                              felix_api: str) -> None:
    """No KubeControllersConfiguration `default` (kube-controllers would create it with 9094):
    the fix creates it with port 0, which needs `create` on the kind, and deploy/ grants no
    `create` at all. The dry run is refused (403) and nothing is written."""
    scenario = Scenario("remediate-kcc-missing", ("agent", "remediation"), REMEDIATOR,
                        _remediable(felix_api=felix_api,
                                    kube_controllers={"kcc_port": "missing"}),
                        command=(("remediate", *REMEDIATE),), remediation=True)
    run = run_scenario(scenario, tmp_path)
    assert run.codes != [0], run.stdout[0]
    creates = [r for r in run.requests if r.verb == "create"]
    assert creates and all(r.status == 403 and r.dry_run for r in creates), \
        [describe(r) for r in creates]
    assert not [describe(r) for r in run.requests
                if r.verb in ("create", "patch") and not r.dry_run], "something was written"


def test_agent_cronjob_as_a_pod_runs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """The CronJob's own args and env, in-cluster credentials from the service account files,
    and only the agent's permissions: the scan lands in the database under the cluster name
    from ConfigMap felixscan-agent."""
    from kubernetes.config import incluster_config

    objects = render("agent")
    cronjob = find(objects, "CronJob", "felixscan-agent")[0]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "command" not in container  # the image's entrypoint, felixscan, runs the args
    harness = Harness(tmp_path)
    try:
        harness.cluster("c", ["closed", "closed"])
        emu = harness.emulators["c"]
        emu.set_rbac(as_rbac_rules(grants(objects, AGENT)))
        account = tmp_path / "serviceaccount"
        account.mkdir()
        (account / "token").write_text(str(emu.token))
        assert emu.ca_pem is not None
        (account / "ca.crt").write_bytes(emu.ca_pem)
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(account / "token"))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(account / "ca.crt"))
        for name in ("KUBECONFIG", "FELIXSCAN_CONFIG", "FELIXSCAN_DB", "FELIXSCAN_CLUSTER"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config, as in the image
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(emu.port))
        db = f"sqlite:///{tmp_path / 'fleet.db'}"
        # What the kubelet resolves from the objects the README has the user create.
        user_objects = {("secretKeyRef", "felixscan-db", "url"): db,
                        ("configMapKeyRef", "felixscan-agent", "cluster"): "prod-east"}
        for entry in container.get("env") or []:
            if "value" in entry:
                monkeypatch.setenv(entry["name"], entry["value"])
                continue
            (ref_kind, ref), = entry["valueFrom"].items()
            monkeypatch.setenv(entry["name"], user_objects[(ref_kind, ref["name"], ref["key"])])
        code, out, err = _felixscan(container["args"])
    finally:
        harness.close()
    assert code == 0, out + err
    assert out.startswith("prod-east: COMPLIANT"), out
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT cluster, status FROM cluster_scans")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in stored] == [("prod-east", "compliant")]
