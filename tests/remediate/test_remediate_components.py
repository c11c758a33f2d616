"""Remediation of the typha-metrics and kube-controllers-metrics controls.

Planning and guards on hand-built snapshots (pure), the exact patches checked against the
emulated API server (real patch semantics and dryRun), and the real CLI end to end against
emulated clusters made from the release Deployments (tests/fixtures/calico), with
scanner.emulator.components playing the Deployment controller, the tigera operator's render of
Typha, kube-controllers' own restart (exit 129) on a configuration change, and real listeners
on 127.x that close when the component's configuration turns metrics off.

Upstream behaviour relied on: Typha's metrics are on when TYPHA_PROMETHEUSMETRICSENABLED (any
case of the prefix) or typha.cfg says so (typha/pkg/config); the operator renders
TYPHA_PROMETHEUSMETRICSENABLED=true + PORT from Installation spec.typhaMetricsPort and reverts a
Deployment env edit (tigera/operator pkg/render/typha.go); kube-controllers' port is
KubeControllersConfiguration `default` spec.prometheusMetricsPort alone, 0 is off, a missing
`default` is created with 9094 (runconfig.go getOrCreateSnapshot), and it restarts on a change
(run.go, exit 129).
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from scanner.app.cli import main
from scanner.core.config import load_settings
from scanner.core.errors import RemediationError, RemediationRefused
from scanner.core.records import (
    FELIX,
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterResult,
    ClusterSnapshot,
    ComponentPod,
    ComponentSnapshot,
    ConfigFile,
    ControlResult,
    EnvVar,
    Installation,
    KubeControllersConfig,
    Rollout,
)
from scanner.core.records import Node as NodeRecord
from scanner.db.models import RemediationAction
from scanner.db.store import Store
from scanner.emulator import KubeEmulator, RecordedRequest
from scanner.emulator.components import ComponentHandle
from scanner.kube.write import KubeWriter, ObjectRef
from scanner.remediate import (
    REMEDIATION_RBAC,
    plan_controls,
    plan_kube_controllers,
    plan_typha,
    remediate,
    select_controls,
)
from scanner.remediate.plan import KCC_DEFAULT_SPEC, materialize, object_change
from scanner.remediate.records import REMOVE
from tests.helpers import scan_harness
from tests.helpers.paths import ROOT
from tests.helpers.scan_harness import Harness

TYPHA_ENABLED = "TYPHA_PROMETHEUSMETRICSENABLED"
FELIX_ENABLED = "FELIX_PROMETHEUSMETRICSENABLED"
KCC_API = "crd.projectcalico.org/v1"
INSTALLATION_API = "operator.tigera.io/v1"
ENABLED_OPTS = {"remediation": {"enabled": True}}
APPLY = ("--apply", "--yes", "--ignore-window", "--rollout-timeout", "10")


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.41.0.0")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'felixscan.db'}"


# --- hand-built snapshots -----------------------------------------------------------------------


def component(control: str, *, env: tuple[EnvVar, ...] = (), found: bool = True,
              config_file: ConfigFile | None = None, kcc: KubeControllersConfig | None = None,
              error: str | None = None, namespace: str = "kube-system") -> ComponentSnapshot:
    name = "calico-typha" if control == TYPHA else "calico-kube-controllers"
    image = f"quay.io/calico/{'typha' if control == TYPHA else 'kube-controllers'}:v3.32.1"
    pods = (ComponentPod(name=f"{name}-abc", node="n1", pod_ip="10.0.0.1",
                         host_network=control == TYPHA, phase="Running", ready=True),)
    return ComponentSnapshot(control=control, namespace=namespace, deployment=name,
                             container=name, found=found, image=image, env=env,
                             config_file=config_file, pods=pods if found else (), replicas=1,
                             ready_replicas=1, kcc=kcc, error=error)


def snapshot(*, typha: ComponentSnapshot | None = None,
             kube_controllers: ComponentSnapshot | None = None, install: str = "manifest",
             installation: Installation | None = None,
             controls: tuple[str, ...] = (FELIX, TYPHA, KUBE_CONTROLLERS)) -> ClusterSnapshot:
    components = {}
    if typha is not None:
        components[TYPHA] = typha
    if kube_controllers is not None:
        components[KUBE_CONTROLLERS] = kube_controllers
    return ClusterSnapshot(
        cluster="c", install=install,  # type: ignore[arg-type]
        namespace="kube-system" if install == "manifest" else "calico-system",
        daemonset="calico-node", container="calico-node", image=None, env=(),
        config_file=ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=(), felix_crd=True, installation=installation,
        rollout=Rollout(generation=2, observed_generation=2, desired=1, updated=1, ready=1,
                        available=1, current_revision="r", strategy="RollingUpdate",
                        max_unavailable="1"),
        pods=(), nodes=(NodeRecord("n1", (("InternalIP", "10.0.0.1"),), True, {}),),
        collected_at=datetime.now(UTC), controls=controls, components=components)


def result(snap: ClusterSnapshot, statuses: dict[str, str]) -> ClusterResult:
    now = datetime.now(UTC)
    controls = tuple(ControlResult(control=c, status=s, declared=None, targets=(),  # type: ignore[arg-type]
                                   findings=()) for c, s in statuses.items())
    worst = "non_compliant" if "non_compliant" in statuses.values() else \
        "error" if "error" in statuses.values() else "compliant"
    return ClusterResult(cluster=snap.cluster, status=worst, install=snap.install,  # type: ignore[arg-type]
                         declared=None, nodes=(), findings=(), error=None, started_at=now,
                         finished_at=now, snapshot=snap, controls=controls)


def literal(name: str, value: str) -> EnvVar:
    return EnvVar(name=name, value=value, origin="literal")


def typha_cfg(values: dict[str, str]) -> ConfigFile:
    return ConfigFile(known=True, values=values,
                      origin="configmap kube-system/typha-config[typha.cfg]")


def kcc(port: object = 9094, *, exists: bool = True) -> KubeControllersConfig:
    return KubeControllersConfig(exists=exists, port=port)


def fixes_of(found: tuple[Any, ...]) -> list[tuple[str, str, str, Any]]:
    return [(f.kind, f.name, f.field, f.value) for f in found]


# --- planning: Typha -----------------------------------------------------------------------------


def test_typha_env_winner_is_set_false_in_every_spelling() -> None:
    snap = snapshot(typha=component(TYPHA, env=(
        literal("TYPHA_PROMETHEUSMETRICSENABLED", "true"),
        literal("typha_PrometheusMetricsEnabled", "true"),
        literal("TYPHA_LOGSEVERITYSCREEN", "info"))))

    fixes, notes = plan_typha(snap)

    assert fixes_of(fixes) == [
        ("Deployment", "calico-typha", "env/TYPHA_PROMETHEUSMETRICSENABLED",
         {"name": "TYPHA_PROMETHEUSMETRICSENABLED", "value": "false"}),
        ("Deployment", "calico-typha", "env/typha_PrometheusMetricsEnabled",
         {"name": "typha_PrometheusMetricsEnabled", "value": "false"})]
    assert {f.control for f in fixes} == {TYPHA} and notes == ()
    assert "env TYPHA_PROMETHEUSMETRICSENABLED" in fixes[0].reason


def test_typha_value_from_and_env_from_winners_become_literals() -> None:
    from_configmap = EnvVar(TYPHA_ENABLED, "true", "configmap kube-system/typha-env[enabled]")
    fixes, _ = plan_typha(snapshot(typha=component(TYPHA, env=(from_configmap,))))
    assert fixes_of(fixes) == [("Deployment", "calico-typha", f"env/{TYPHA_ENABLED}",
                                {"name": TYPHA_ENABLED, "value": "false"})]
    # an entry the kubelet could not resolve leaves Typha's state unknown: a literal fixes it
    broken = EnvVar(TYPHA_ENABLED, None, "secret kube-system/gone[enabled]",
                    error="secret kube-system/gone does not exist")
    fixes, _ = plan_typha(snapshot(typha=component(TYPHA, env=(broken,))))
    assert [f.field for f in fixes] == [f"env/{TYPHA_ENABLED}"]


@pytest.mark.parametrize(("values", "key"), [
    ({"PrometheusMetricsEnabled": "true"}, "PrometheusMetricsEnabled"),
    # spelled otherwise it overrides even an env that says false (config_params.go resolve)
    ({"prometheusmetricsenabled": "true"}, "prometheusmetricsenabled"),
])
def test_typha_config_file_winner_is_refused_naming_the_configmap_key(
        values: dict[str, str], key: str) -> None:
    snap = snapshot(typha=component(TYPHA, env=(literal(TYPHA_ENABLED, "false"),)
                                    if key != "PrometheusMetricsEnabled" else (),
                                    config_file=typha_cfg(values)))
    with pytest.raises(RemediationRefused) as caught:
        plan_typha(snap)
    message = str(caught.value)
    assert f"set {key} to false" in message
    assert "ConfigMap kube-system/typha-config, key typha.cfg" in message
    assert "felixscan does not edit config files" in message
    assert "rollout restart deployment/calico-typha" in message


def test_typha_env_beats_the_canonical_file_key_so_the_env_is_fixed() -> None:
    """The file's canonical `PrometheusMetricsEnabled` loses to the environment (resolve looks
    the source up by the raw name): fixing the env turns Typha off, the file is left alone."""
    snap = snapshot(typha=component(TYPHA, env=(literal(TYPHA_ENABLED, "true"),),
                                    config_file=typha_cfg({"PrometheusMetricsEnabled": "true"})))
    fixes, _ = plan_typha(snap)
    assert [f.field for f in fixes] == [f"env/{TYPHA_ENABLED}"]  # env beats the canonical key


def test_typha_operator_removes_typha_metrics_port_and_never_the_deployment() -> None:
    operator_env = (literal(TYPHA_ENABLED, "true"), literal("TYPHA_PROMETHEUSMETRICSPORT", "9093"))
    snap = snapshot(typha=component(TYPHA, env=operator_env, namespace="calico-system"),
                    install="operator",
                    installation=Installation("default", None, typha_metrics_port=9093))

    fixes, _ = plan_typha(snap)

    assert fixes_of(fixes) == [("Installation", "default", "spec/typhaMetricsPort", REMOVE)]
    assert "typhaMetricsPort=9093" in fixes[0].reason


@pytest.mark.parametrize(("install", "installation", "message"), [
    ("operator", Installation("default", None), "the operator would revert an env patch"),
    ("unknown", None, "looks operator-managed but no Installation was found"),
])
def test_typha_env_the_operator_owns_is_refused(install: str,
                                                installation: Installation | None,
                                                message: str) -> None:
    snap = snapshot(typha=component(TYPHA, env=(literal(TYPHA_ENABLED, "true"),),
                                    namespace="calico-system"),
                    install=install, installation=installation)
    with pytest.raises(RemediationRefused, match=message):
        plan_typha(snap)


def test_typha_not_installed_or_off_changes_nothing() -> None:
    assert plan_typha(snapshot(typha=component(TYPHA, found=False))) == (
        (), ("no Typha Deployment kube-system/calico-typha: nothing to change",))
    assert plan_typha(snapshot(typha=component(TYPHA))) == ((), ())
    with pytest.raises(RemediationError, match="cannot be read"):
        plan_typha(snapshot(typha=component(TYPHA, error="403 forbidden")))


# --- planning: kube-controllers ------------------------------------------------------------------


@pytest.mark.parametrize(("state", "reason"), [
    (kcc(9094), "sets spec.prometheusMetricsPort=9094: kube-controllers serves its metrics"),
    (kcc(70000), "not a port"),
    (kcc(None), "has no spec.prometheusMetricsPort"),
    (kcc(exists=False), "does not exist: kube-controllers creates it with prometheusMetricsPort "
                        "9094"),
])
def test_kube_controllers_port_is_set_to_zero(state: KubeControllersConfig, reason: str) -> None:
    snap = snapshot(kube_controllers=component(
        KUBE_CONTROLLERS, kcc=state, env=(literal("DATASTORE_TYPE", "kubernetes"),)))

    fixes, notes = plan_kube_controllers(snap)

    assert fixes_of(fixes) == [("KubeControllersConfiguration", "default",
                                "spec/prometheusMetricsPort", 0)]
    assert reason in fixes[0].reason and fixes[0].control == KUBE_CONTROLLERS and notes == ()


def test_kube_controllers_nothing_to_do_or_refused() -> None:
    off = snapshot(kube_controllers=component(KUBE_CONTROLLERS, kcc=kcc(0)))
    assert plan_kube_controllers(off)[0] == ()
    etcd = snapshot(kube_controllers=component(
        KUBE_CONTROLLERS, kcc=kcc(9094), env=(literal("DATASTORE_TYPE", "etcdv3"),)))
    with pytest.raises(RemediationRefused, match="only a KubeControllersConfiguration"):
        plan_kube_controllers(etcd)
    unreadable = snapshot(kube_controllers=component(
        KUBE_CONTROLLERS, kcc=KubeControllersConfig(exists=False, error="403")))
    with pytest.raises(RemediationError, match="cannot be read: 403"):
        plan_kube_controllers(unreadable)


# --- planning: which controls, in which order ----------------------------------------------------


def test_default_selection_is_every_checked_control_that_fails() -> None:
    snap = snapshot(typha=component(TYPHA), kube_controllers=component(KUBE_CONTROLLERS,
                                                                        kcc=kcc(0)))
    before = result(snap, {FELIX: "compliant", TYPHA: "non_compliant",
                           KUBE_CONTROLLERS: "error"})
    assert select_controls(before, None) == (TYPHA, KUBE_CONTROLLERS)
    assert select_controls(before, [KUBE_CONTROLLERS, FELIX]) == (FELIX, KUBE_CONTROLLERS)
    narrowed = replace(snap, controls=(FELIX,))
    with pytest.raises(RemediationRefused, match="does not check typha-metrics"):
        select_controls(result(narrowed, {FELIX: "compliant"}), [TYPHA])


def test_controls_are_planned_least_disruptive_first_and_refusals_name_theirs() -> None:
    snap = snapshot(typha=component(TYPHA, env=(literal(TYPHA_ENABLED, "true"),)),
                    kube_controllers=component(KUBE_CONTROLLERS, kcc=kcc(9094)))
    fixes, _ = plan_controls(snap, (FELIX, TYPHA, KUBE_CONTROLLERS), explicit=False)
    assert [f.control for f in fixes] == [KUBE_CONTROLLERS, TYPHA]

    refused = replace(snap, components={**snap.components, TYPHA: component(
        TYPHA, config_file=typha_cfg({"PrometheusMetricsEnabled": "true"}))})
    with pytest.raises(RemediationRefused, match=r"^typha-metrics: Typha's metrics are "):
        plan_controls(refused, (TYPHA, KUBE_CONTROLLERS), explicit=False)

    # unreadable: skipped with a note when picked by default, refused when asked for
    broken = replace(snap, components={**snap.components, TYPHA: component(
        TYPHA, error="the scanner may not get deployment kube-system/calico-typha (403)")})
    fixes, notes = plan_controls(broken, (TYPHA, KUBE_CONTROLLERS), explicit=False)
    assert [f.control for f in fixes] == [KUBE_CONTROLLERS]
    assert notes == ("typha-metrics: not changed: the scanner may not get deployment "
                     "kube-system/calico-typha (403)",)
    with pytest.raises(RemediationError, match=r"^typha-metrics: it cannot be read"):
        plan_controls(broken, (TYPHA,), explicit=True)


# --- the exact patches, against the emulated API server ------------------------------------------


def _writer(h: Harness, cluster: str = "c1") -> KubeWriter:
    settings = load_settings(h.config())
    return KubeWriter(settings.select([cluster]).clusters[0])


def test_installation_patch_is_a_json_patch_with_tests_and_preconditions(h: Harness) -> None:
    handle = h.cluster("c1", ["closed"], install="operator")
    h.typha("c1", typha_metrics_port=9093)
    emu = handle.emu
    installation = emu.get_object(INSTALLATION_API, "Installation", "default")
    ref = ObjectRef(INSTALLATION_API, "Installation", "default")
    change = object_change(ref, installation, None, {"spec/typhaMetricsPort": REMOVE},
                           reason="test", control=TYPHA)
    assert change is not None
    meta = installation["metadata"]
    assert change.patch_type == "json"
    assert change.patch == [
        {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
        {"op": "replace", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]},
        {"op": "test", "path": "/spec/typhaMetricsPort", "value": 9093},
        {"op": "remove", "path": "/spec/typhaMetricsPort"}]
    assert change.before == {"spec/typhaMetricsPort": 9093} and change.after == {}

    with _writer(h) as writer:
        dry = writer.patch(ref, change.patch, patch_type="json", dry_run=True)
        assert "typhaMetricsPort" not in dry["spec"]
        assert emu.get_object(INSTALLATION_API, "Installation", "default") == installation
        # someone else set another port since: the test op refuses (422), nothing changes
        emu.patch_object(INSTALLATION_API, "Installation", "default",
                         {"spec": {"typhaMetricsPort": 9999}})
        with pytest.raises(Exception, match="422"):
            writer.patch(ref, change.patch, patch_type="json", dry_run=False)
        assert emu.get_object(INSTALLATION_API, "Installation", "default")["spec"][
            "typhaMetricsPort"] == 9999
        # the restore: `add` on the absent field, with the preconditions
        emu.patch_object(INSTALLATION_API, "Installation", "default",
                         {"spec": {"typhaMetricsPort": None}})
        now = emu.get_object(INSTALLATION_API, "Installation", "default")
        restore = object_change(ref, now, None, {"spec/typhaMetricsPort": 9093},
                                reason="restore", control=TYPHA)
        assert restore is not None and restore.patch[2:] == [  # type: ignore[index]
            {"op": "add", "path": "/spec/typhaMetricsPort", "value": 9093}]
        writer.patch(ref, restore.patch, patch_type="json", dry_run=False)
        assert emu.get_object(INSTALLATION_API, "Installation", "default")["spec"][
            "typhaMetricsPort"] == 9093


def test_kcc_is_created_with_port_zero_and_kube_controllers_defaults(h: Harness) -> None:
    handle = h.cluster("c1", ["closed"])
    h.kube_controllers("c1", kcc_port="missing")
    emu = handle.emu
    snap = snapshot(kube_controllers=component(KUBE_CONTROLLERS, kcc=kcc(exists=False)))
    fixes, _ = plan_kube_controllers(snap)
    with _writer(h) as writer:
        [change] = materialize(snap, fixes, writer)
        assert change.create and change.before == {}
        assert change.after == {"spec/prometheusMetricsPort": 0}
        assert change.patch == {"apiVersion": KCC_API, "kind": "KubeControllersConfiguration",
                                "metadata": {"name": "default"},
                                "spec": {**KCC_DEFAULT_SPEC, "prometheusMetricsPort": 0}}
        dry = writer.create(change.ref, change.patch, dry_run=True)  # type: ignore[arg-type]
        assert dry["spec"]["prometheusMetricsPort"] == 0
        assert emu.get_object(KCC_API, "KubeControllersConfiguration", "default") is None
        with pytest.raises(RemediationRefused, match="only touches KubeControllersConfiguration "
                           "default"):
            writer.create(ObjectRef(KCC_API, "KubeControllersConfiguration", "other"),
                          {**change.patch, "metadata": {"name": "other"}},  # type: ignore[dict-item]
                          dry_run=True)
        with pytest.raises(RemediationRefused, match="only patches the Deployment"):
            writer.patch(ObjectRef("apps/v1", "Deployment", "calico-kube-controllers",
                                   "kube-system"), {"metadata": {"uid": "u",
                                                                 "resourceVersion": "1"}},
                         patch_type="strategic", dry_run=True)


# --- end to end: the CLI -------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def cli(h: Harness, db: str, *args: str) -> Run:
    target = [] if "--cluster" in args or "--rollback" in args else ["--cluster", "c1"]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(["remediate", "--config", str(h.config()), "--db", db, *target, *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return Run(code, out.getvalue(), err.getvalue())


def actions(db: str, cluster: str = "c1") -> list[RemediationAction]:
    with Store(db) as store:
        return list(reversed(store.remediations(cluster)))


def writes(emu: KubeEmulator) -> list[RecordedRequest]:
    return [r for r in emu.requests if r.verb not in ("get", "list", "watch")]


def stripped(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out.pop("status", None)
    for key in ("resourceVersion", "generation", "managedFields"):
        out["metadata"].pop(key, None)
    return out


def env_of(obj: dict[str, Any], container: str) -> list[dict[str, Any]]:
    return next(c for c in obj["spec"]["template"]["spec"]["containers"]
                if c["name"] == container).get("env") or []


def typha_cluster(h: Harness, *, nodes: int = 2, install: str = "manifest",
                  options: dict[str, Any] | None = None, **add: Any) -> ComponentHandle:
    """Felix off (closed nodes), Typha on every node with `add`, controllers simulated."""
    handle = h.cluster("c1", ["closed"] * nodes, install=install,
                       options=ENABLED_OPTS if options is None else options)
    handle.simulate_controllers()
    typha = h.typha("c1", [n.name for n in handle.nodes], **add)
    typha.simulate_controllers()
    h.kube_controllers("c1", kcc_port=0).simulate_controllers()
    return typha


def test_typha_dry_run_shows_the_exact_change_and_changes_nothing(h: Harness, db: str) -> None:
    typha = typha_cluster(h, env={TYPHA_ENABLED: "true"})
    emu = typha.emu
    before = emu.resource_version

    out = cli(h, db)

    assert out.code == 0, out.stdout + out.stderr
    assert "Before: c1: NON-COMPLIANT" in out.stdout
    assert "Plan for cluster c1 (manifest install; typha-metrics):" in out.stdout
    assert "1. [typha-metrics] Deployment kube-system/calico-typha (container calico-typha)" \
        in out.stdout
    assert (f'env/{TYPHA_ENABLED}: {{"name": "{TYPHA_ENABLED}", "value": "true"}} -> '
            f'{{"name": "{TYPHA_ENABLED}", "value": "false"}}') in out.stdout
    assert "patch (application/strategic-merge-patch+json):" in out.stdout
    assert ("server-side dry run (dryRun=All): accepted; generation 1 -> 2; changes "
            "spec.template.spec.containers[name=calico-typha].env[name="
            f"{TYPHA_ENABLED}].value") in out.stdout
    assert "Rollout [typha-metrics]: the calico-typha Deployment rolls: 2 Typha pod(s) replaced" \
        in out.stdout
    assert "ok      typha-rollout: no Deployment kube-system/calico-typha rollout in progress" \
        in out.stdout
    assert "Dry run: nothing was changed" in out.stdout
    assert "--apply would be refused now: window" in out.stdout
    assert emu.resource_version == before
    assert writes(emu) and all(w.dry_run for w in writes(emu))
    assert actions(db) == []


def test_typha_manifest_apply_rolls_out_verifies_records_and_rolls_back(h: Harness,
                                                                         db: str) -> None:
    typha = typha_cluster(h, env={TYPHA_ENABLED: "true"})
    emu = typha.emu
    original = stripped(typha.deployment_object())
    assert typha.listening()  # Typha serves its metrics on both nodes

    out = cli(h, db, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert typha.listening() == {}
    after = stripped(typha.deployment_object())
    expected = copy.deepcopy(original)
    entries = env_of(expected, "calico-typha")
    entries[next(i for i, e in enumerate(entries) if e["name"] == TYPHA_ENABLED)] = \
        {"name": TYPHA_ENABLED, "value": "false"}
    assert json.dumps(after) == json.dumps(expected)  # that one entry and nothing else
    assert [(w.verb, w.resource, w.name, w.dry_run) for w in writes(emu)] == [
        ("patch", "deployments", "calico-typha", True),
        ("patch", "deployments", "calico-typha", False)]
    assert "rolled out in" in out.stdout and "[typha-metrics]" in out.stdout
    [action] = actions(db)
    assert (action.mode, action.outcome, action.install) == ("apply", "succeeded", "manifest")
    assert action.message.startswith(  # type: ignore[union-attr]
        "[typha-metrics] verification scan ")
    assert "typha-metrics compliant (2 pass, 0 fail, 0 unknown)" in (action.message or "")
    [obj] = action.objects
    assert (obj["control"], obj["kind"], obj["namespace"], obj["name"], obj["container"],
            obj["verb"], obj["patch_type"]) == (TYPHA, "Deployment", "kube-system",
                                                 "calico-typha", "calico-typha", "patch",
                                                 "strategic")
    assert obj["before"] == {f"env/{TYPHA_ENABLED}": {"name": TYPHA_ENABLED, "value": "true"}}
    assert obj["after"] == {f"env/{TYPHA_ENABLED}": {"name": TYPHA_ENABLED, "value": "false"}}

    back = cli(h, db, "--rollback", str(action.id), *APPLY)

    assert back.code == 0, back.stdout + back.stderr
    assert json.dumps(stripped(typha.deployment_object())) == json.dumps(original)
    assert typha.listening()  # on again, as before
    first, second = actions(db)
    assert (second.mode, second.outcome, second.rollback_of) == ("rollback", "rolled_back",
                                                                 first.id)
    assert second.objects[0]["control"] == TYPHA
    assert (second.message or "").startswith("[typha-metrics] previous values restored")


def test_typha_value_from_becomes_a_literal_and_rollback_restores_the_reference(
        h: Harness, db: str) -> None:
    ref = {"configMapKeyRef": {"name": "typha-metrics", "key": "enabled"}}
    typha = typha_cluster(h, env={TYPHA_ENABLED: ref}, configmaps=[
        {"metadata": {"name": "typha-metrics"}, "data": {"enabled": "true"}}])
    configmap = typha.emu.get_object("v1", "ConfigMap", "typha-metrics", "kube-system")
    original = stripped(typha.deployment_object())

    out = cli(h, db, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert {"name": TYPHA_ENABLED, "value": "false"} in env_of(typha.deployment_object(),
                                                                "calico-typha")
    assert typha.emu.get_object("v1", "ConfigMap", "typha-metrics", "kube-system") == configmap
    [action] = actions(db)
    assert action.objects[0]["before"] == {f"env/{TYPHA_ENABLED}": {"name": TYPHA_ENABLED,
                                                                    "valueFrom": ref}}
    patch_env = action.objects[0]["patch"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert patch_env == [{"name": TYPHA_ENABLED, "value": "false", "valueFrom": None}]

    back = cli(h, db, "--rollback", str(action.id), *APPLY)
    assert back.code == 0, back.stdout + back.stderr
    assert json.dumps(stripped(typha.deployment_object())) == json.dumps(original)


def test_typha_config_file_winner_is_refused_and_nothing_is_sent(h: Harness, db: str) -> None:
    cfg = {"metadata": {"name": "typha-config"},
           "data": {"typha.cfg": "[global]\nPrometheusMetricsEnabled = true\n"}}
    handle = h.cluster("c1", ["closed"], options=ENABLED_OPTS)
    deployment = scan_harness.typha_deployment()
    import yaml

    doc = yaml.safe_load(deployment.read_text())
    spec = doc["spec"]["template"]["spec"]
    spec["volumes"] = [{"name": "typha-config", "configMap": {"name": "typha-config"}}]
    spec["containers"][0]["volumeMounts"] = [{"name": "typha-config",
                                              "mountPath": "/etc/calico/typha.cfg",
                                              "subPath": "typha.cfg"}]
    typha = h.typha("c1", [n.name for n in handle.nodes], deployment_yaml=doc, configmaps=[cfg])
    typha.simulate_controllers()
    h.kube_controllers("c1", kcc_port=0)
    version = typha.emu.resource_version

    out = cli(h, db, *APPLY)

    assert out.code == 2, out.stdout + out.stderr
    assert "typha-metrics: Typha's metrics are decided by its config file" in out.stderr
    assert "set PrometheusMetricsEnabled to false (or remove it) in ConfigMap " \
        "kube-system/typha-config, key typha.cfg" in out.stderr
    assert writes(typha.emu) == [] and typha.emu.resource_version == version
    assert actions(db) == []


def test_typha_operator_removes_typha_metrics_port_and_rollback_restores_it(h: Harness,
                                                                             db: str) -> None:
    typha = typha_cluster(h, install="operator", typha_metrics_port=9093)
    emu = typha.emu
    assert any(e["name"] == TYPHA_ENABLED for e in env_of(typha.deployment_object(),
                                                          "calico-typha"))

    out = cli(h, db, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert "application/json-patch+json" in out.stdout
    assert "the operator re-renders the calico-typha Deployment, which then rolls" in out.stdout
    installation = emu.get_object(INSTALLATION_API, "Installation", "default")
    assert "typhaMetricsPort" not in installation["spec"]
    # the operator re-rendered Typha without its env; felixscan never patched the Deployment
    assert not any(e["name"].startswith("TYPHA_PROMETHEUS") for e in
                   env_of(typha.deployment_object(), "calico-typha"))
    assert [(w.resource, w.name, w.dry_run, w.content_type) for w in writes(emu)] == [
        ("installations", "default", True, "application/json-patch+json"),
        ("installations", "default", False, "application/json-patch+json")]
    assert typha.listening() == {}
    [action] = actions(db)
    assert (action.install, action.outcome) == ("operator", "succeeded")
    [obj] = action.objects
    assert (obj["control"], obj["kind"], obj["patch_type"]) == (TYPHA, "Installation", "json")
    assert obj["before"] == {"spec/typhaMetricsPort": 9093} and obj["after"] == {}

    back = cli(h, db, "--rollback", str(action.id), *APPLY)

    assert back.code == 0, back.stdout + back.stderr
    assert emu.get_object(INSTALLATION_API, "Installation", "default")["spec"][
        "typhaMetricsPort"] == 9093
    assert {"name": TYPHA_ENABLED, "value": "true"} in env_of(typha.deployment_object(),
                                                              "calico-typha")
    assert typha.listening()


def kc_cluster(h: Harness, *, kcc_port: Any = 9094, install: str = "manifest",
               options: dict[str, Any] | None = None) -> ComponentHandle:
    handle = h.cluster("c1", ["closed"], install=install,
                       options=ENABLED_OPTS if options is None else options)
    handle.simulate_controllers()
    h.typha("c1", [n.name for n in handle.nodes]).simulate_controllers()
    kc = h.kube_controllers("c1", kcc_port=kcc_port)
    kc.simulate_controllers()
    return kc


@pytest.mark.parametrize("install", ["manifest", "operator"])
def test_kube_controllers_port_set_to_zero_waits_for_the_restart_and_rolls_back(
        h: Harness, db: str, install: str) -> None:
    kc = kc_cluster(h, install=install)
    emu = kc.emu
    original = stripped(kc.kcc_object() or {})
    assert kc.listening()

    dry = cli(h, db)
    assert dry.code == 0, dry.stdout + dry.stderr
    assert "1. [kube-controllers-metrics] KubeControllersConfiguration default" in dry.stdout
    assert "spec/prometheusMetricsPort: 9094 -> 0" in dry.stdout
    assert '"prometheusMetricsPort": 0' in dry.stdout
    assert "Rollout [kube-controllers-metrics]: calico-kube-controllers exits when " \
        "KubeControllersConfiguration default changes" in dry.stdout
    assert kc.restarts == 0 and all(w.dry_run for w in writes(emu))
    emu.clear_requests()

    out = cli(h, db, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert kc.restarts == 1 and kc.listening() == {}
    assert "calico-kube-controllers restarted in" in out.stdout
    expected = copy.deepcopy(original)
    expected["spec"]["prometheusMetricsPort"] = 0
    assert json.dumps(stripped(kc.kcc_object() or {})) == json.dumps(expected)
    assert [(w.verb, w.resource, w.name, w.dry_run, w.content_type) for w in writes(emu)] == [
        ("patch", "kubecontrollersconfigurations", "default", True,
         "application/merge-patch+json"),
        ("patch", "kubecontrollersconfigurations", "default", False,
         "application/merge-patch+json")]
    [action] = actions(db)
    assert action.outcome == "succeeded" and action.install == install
    [obj] = action.objects
    assert (obj["control"], obj["kind"], obj["name"]) == (KUBE_CONTROLLERS,
                                                          "KubeControllersConfiguration",
                                                          "default")
    assert obj["before"] == {"spec/prometheusMetricsPort": 9094}
    assert obj["after"] == {"spec/prometheusMetricsPort": 0}

    back = cli(h, db, "--rollback", str(action.id), *APPLY)

    assert back.code == 0, back.stdout + back.stderr
    assert json.dumps(stripped(kc.kcc_object() or {})) == json.dumps(original)
    assert kc.restarts == 2 and kc.listening()


def test_missing_kcc_is_created_with_port_zero_and_rollback_sets_9094(h: Harness,
                                                                       db: str) -> None:
    kc = kc_cluster(h, kcc_port="missing")
    emu = kc.emu
    assert kc.kcc_object() is None and kc.listening()

    out = cli(h, db, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert "does not exist: created" in out.stdout and "body (POST, application/json)" \
        in out.stdout
    created = kc.kcc_object()
    assert created is not None and created["spec"] == {**KCC_DEFAULT_SPEC,
                                                       "prometheusMetricsPort": 0}
    assert [(w.verb, w.resource, w.dry_run) for w in writes(emu)] == [
        ("create", "kubecontrollersconfigurations", True),
        ("create", "kubecontrollersconfigurations", False)]
    assert kc.listening() == {}
    [action] = actions(db)
    assert action.outcome == "succeeded"
    assert (action.objects[0]["verb"], action.objects[0]["before"]) == ("create", {})

    back = cli(h, db, "--rollback", str(action.id), *APPLY)

    assert back.code == 0, back.stdout + back.stderr
    assert "felixscan does not delete it" in back.stdout
    assert (kc.kcc_object() or {})["spec"]["prometheusMetricsPort"] == 9094
    assert kc.listening()


def test_absent_port_is_set_only_when_asked_and_nothing_restarts(h: Harness, db: str) -> None:
    kc = kc_cluster(h, kcc_port=None)

    default = cli(h, db, *APPLY)
    assert default.code == 0, default.stdout + default.stderr
    assert "Nothing to change: the cluster is compliant" in default.stdout

    out = cli(h, db, *APPLY, "--control", "kube-controllers-metrics")

    assert out.code == 0, out.stdout + out.stderr
    assert "spec/prometheusMetricsPort: (absent) -> 0" in out.stdout
    assert "absent and 0 are both off): nothing restarts" in out.stdout
    assert (kc.kcc_object() or {})["spec"]["prometheusMetricsPort"] == 0
    assert kc.restarts == 1  # the emulator restarts on any spec change; nothing waited for it
    assert [a.outcome for a in actions(db)] == ["succeeded"]


def test_every_failing_control_in_one_action_least_disruptive_first(h: Harness,
                                                                    db: str) -> None:
    handle = h.cluster("c1", ["felix-http"] * 2, options=ENABLED_OPTS,
                       env={FELIX_ENABLED: "true"})
    handle.simulate_controllers(roll_delay=0.01)
    from tests.remediate.test_remediate import FelixSim

    felix = FelixSim(h, "c1")
    typha = h.typha("c1", [n.name for n in handle.nodes], env={TYPHA_ENABLED: "true"})
    typha.simulate_controllers()
    kc = h.kube_controllers("c1", kcc_port=9094)
    kc.simulate_controllers()
    emu = handle.emu

    out = cli(h, db, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert "(manifest install; kube-controllers-metrics, typha-metrics, felix-metrics)" \
        in out.stdout
    real = [(w.resource, w.name) for w in writes(emu) if not w.dry_run]
    assert real == [("kubecontrollersconfigurations", "default"),
                    ("deployments", "calico-typha"), ("daemonsets", "calico-node")]
    assert felix.open_nodes() == [] and typha.listening() == {} and kc.listening() == {}
    [action] = actions(db)
    assert action.outcome == "succeeded"
    assert [o["control"] for o in action.objects] == [KUBE_CONTROLLERS, TYPHA, FELIX]
    assert (action.message or "").startswith(
        "[kube-controllers-metrics, typha-metrics, felix-metrics] verification scan")


def test_control_option_picks_and_other_controls_are_left_alone(h: Harness, db: str) -> None:
    handle = h.cluster("c1", ["felix-http"], options=ENABLED_OPTS, env={FELIX_ENABLED: "true"})
    handle.simulate_controllers()
    typha = h.typha("c1", [handle.nodes[0].name], env={TYPHA_ENABLED: "true"})
    typha.simulate_controllers()
    h.kube_controllers("c1", kcc_port=0)
    emu = handle.emu
    ds_version = handle.daemonset_object()["metadata"]["resourceVersion"]

    out = cli(h, db, *APPLY, "--control", "typha-metrics")

    # Felix still fails, but the action is judged on the control it was asked for
    assert out.code == 0, out.stdout + out.stderr
    assert handle.daemonset_object()["metadata"]["resourceVersion"] == ds_version
    assert {w.resource for w in writes(emu)} == {"deployments"}
    [action] = actions(db)
    assert action.outcome == "succeeded" and [o["control"] for o in action.objects] == [TYPHA]

    both = cli(h, db, "--rollback", str(action.id), "--control", "felix-metrics", *APPLY)
    assert both.code == 2 and "--control does not go with it" in both.stderr
    unchecked = h.cluster_options["c1"]
    unchecked["controls"] = ["felix-metrics"]
    narrowed = cli(h, db, "--control", "typha-metrics")
    assert narrowed.code == 2
    assert "cluster c1 does not check typha-metrics (its controls: felix-metrics)" \
        in narrowed.stderr


def _window_not_now() -> str:
    day = (datetime.now(UTC) + timedelta(days=3)).strftime("%a")
    return f"{day} 01:00-02:00 UTC"


@pytest.mark.parametrize(("control", "options", "message"), [
    (TYPHA, {"remediation": {"enabled": True, "window": _window_not_now()}},
     "outside the maintenance window"),
    (TYPHA, {}, "remediation is not enabled for cluster c1"),
    (KUBE_CONTROLLERS, {"remediation": {"enabled": True, "window": _window_not_now()}},
     "outside the maintenance window"),
    (KUBE_CONTROLLERS, {}, "remediation is not enabled for cluster c1"),
])
def test_guards_refuse_record_and_change_nothing(h: Harness, db: str, control: str,
                                                 options: dict[str, Any],
                                                 message: str) -> None:
    if control == TYPHA:
        component_handle = typha_cluster(h, options=options, env={TYPHA_ENABLED: "true"})
    else:
        component_handle = kc_cluster(h, options=options)
    emu = component_handle.emu
    version = emu.resource_version

    out = cli(h, db, "--apply", "--yes")

    assert out.code == 2, out.stdout + out.stderr
    assert message in out.stderr and "nothing was changed" in out.stderr
    assert emu.resource_version == version and all(w.dry_run for w in writes(emu))
    [action] = actions(db)
    assert action.outcome == "refused"
    assert (action.message or "").startswith(f"[{control}] refused: ")
    assert [o["control"] for o in action.objects] == [control]
    assert action.objects[0]["applied"] is False


def test_a_typha_rollout_in_progress_or_recreate_is_refused(h: Harness, db: str) -> None:
    typha = typha_cluster(h, env={TYPHA_ENABLED: "true"})
    deployment = typha.deployment_object()
    deployment["spec"]["strategy"] = {"type": "Recreate"}
    typha.emu.replace(deployment)  # a new generation the controller has not observed yet
    out = cli(h, db, *APPLY)
    assert out.code == 2, out.stdout + out.stderr
    assert "typha-rollout: a Deployment kube-system/calico-typha rollout is in progress" \
        in out.stderr
    assert "typha-strategy: Deployment kube-system/calico-typha has strategy Recreate" \
        in out.stderr


# --- least privilege -----------------------------------------------------------------------------


def _doc_table(heading: str) -> list[dict[str, Any]]:
    text = (ROOT / "docs" / "remediation.md").read_text(encoding="utf-8")
    section = text.split(f"### {heading}", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        group = "" if cells[0].startswith('""') else cells[0]
        names = [] if cells[3] == "any" else [n.strip() for n in cells[3].split(",")]
        rows.append({"apiGroups": [group], "resources": [cells[1]],
                     "verbs": [v.strip() for v in cells[2].split(",")],
                     "resourceNames": names})
    return rows


@pytest.mark.parametrize("case", ["typha-manifest", "typha-operator", "kcc-patch",
                                  "kcc-create"])
def test_component_remediation_works_with_exactly_the_documented_rbac(h: Harness, db: str,
                                                                      case: str) -> None:
    if case == "typha-manifest":
        typha_cluster(h, env={TYPHA_ENABLED: "true"})
    elif case == "typha-operator":
        typha_cluster(h, install="operator", typha_metrics_port=9093)
    else:
        kc_cluster(h, kcc_port="missing" if case == "kcc-create" else 9094)
    emu = h.emulators["c1"]
    emu.set_rbac(_doc_table("Scanner (read-only)") + _doc_table("Remediation (in addition)"))

    out = cli(h, db, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert all(r.status != 403 for r in emu.requests), [
        (r.verb, r.resource, r.name) for r in emu.requests if r.status == 403]
    for w in writes(emu):
        assert any(w.api_group == r.api_group and w.resource == r.resource and w.verb in r.verbs
                   and (not r.names or w.name in r.names) for r in REMEDIATION_RBAC), w
    assert {w.verb for w in writes(emu)} == ({"create"} if case == "kcc-create" else {"patch"})


def test_library_conflicting_writer_on_the_installation_is_reread_and_replanned(
        h: Harness, db: str) -> None:
    """`remediate(controls=...)` as `serve` calls it; between plan and patch someone sets
    another typhaMetricsPort: the JSON patch's `test` fails (422), felixscan reads the
    Installation again and removes what it holds now."""
    typha = typha_cluster(h, install="operator", typha_metrics_port=9093)
    emu = typha.emu
    settings = load_settings(h.config(database=db))
    plans: list[Any] = []

    def confirm(plan: Any) -> bool:
        plans.append(plan)
        emu.patch_object(INSTALLATION_API, "Installation", "default",
                         {"spec": {"typhaMetricsPort": 9999}})
        return True

    with Store(db) as store:
        dry = remediate(settings, "c1", store=store, apply=False, trigger="test",
                        controls=[TYPHA])
        assert dry.outcome == "dry_run" and dry.plan.controls == (TYPHA,)
        assert [c.control for c in dry.plan.changes] == [TYPHA]
        result = remediate(settings, "c1", store=store, apply=True, trigger="serve:auto",
                           ignore_window=True, confirm=confirm, controls=[TYPHA])

    assert result.outcome == "succeeded" and result.done, result.message
    assert "typhaMetricsPort" not in emu.get_object(INSTALLATION_API, "Installation",
                                                    "default")["spec"]
    real = [w for w in writes(emu) if not w.dry_run and w.resource == "installations"]
    assert [w.status for w in real] == [422, 200]
    [action] = actions(db)
    assert action.objects[0]["conflicts"] == 1
    assert action.objects[0]["before"] == {"spec/typhaMetricsPort": 9999}
    assert [r.control for r in result.rollouts] == [TYPHA]


def test_without_the_opt_in_create_rows_a_missing_kcc_is_refused_by_the_dry_run(
        h: Harness, db: str) -> None:
    """deploy/ grants no `create`: on a cluster without KubeControllersConfiguration `default`
    the server's answer to the dry run (403) refuses --apply, and nothing is changed."""
    kc = kc_cluster(h, kcc_port="missing")
    emu = kc.emu
    rules = [r for r in _doc_table("Remediation (in addition)") if r["verbs"] != ["create"]]
    emu.set_rbac(_doc_table("Scanner (read-only)") + rules)
    version = emu.resource_version

    out = cli(h, db, *APPLY)

    assert out.code == 2, out.stdout + out.stderr
    assert "REJECTED: CREATE KubeControllersConfiguration default (dry run): 403" in out.stdout
    assert "dry-run:" in out.stderr
    assert emu.resource_version == version and kc.kcc_object() is None
    assert [a.outcome for a in actions(db)] == ["refused"]
