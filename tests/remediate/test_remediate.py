"""`felixscan remediate` end to end: the real CLI and library against the emulated API (real
patch semantics, dryRun, 409s, RBAC), a simulated DaemonSet controller rolling pods one node at a
time, and a Felix stand-in that closes each node's real listener on 127.x when its Felix turns
metrics off. Assertions are on exit codes, objects, requests and the rows in the database."""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from scanner.app.cli import main
from scanner.core.calico import felix_param, resolve
from scanner.core.config import load_settings, parse_window
from scanner.core.errors import RemediationRefused
from scanner.core.records import (
    ClusterSnapshot,
    ConfigFile,
    EnvVar,
    FelixConfig,
    Installation,
    Rollout,
)
from scanner.core.records import Node as NodeRecord
from scanner.db.models import RemediationAction, ScanRun
from scanner.db.store import Store
from scanner.emulator import ClusterHandle, KubeEmulator, RecordedRequest
from scanner.remediate import (
    REMEDIATION_RBAC,
    RemediateOptions,
    diff_paths,
    in_window,
    max_unavailable,
    next_window_start,
    plan_fixes,
    remediate,
)
from tests.helpers.paths import ROOT
from tests.helpers.scan_harness import Harness, Node

FELIX_API = "crd.projectcalico.org/v1"
ENABLED = "FELIX_PROMETHEUSMETRICSENABLED"
ENABLED_OPTS = {"remediation": {"enabled": True}}


# --- the Felix stand-in -----------------------------------------------------------------------


class FelixSim:
    """Plays Felix on every node of one cluster: its listener stays open only while the node's
    calico-node pod (its env) and the FelixConfigurations leave metrics on.

    Hooked on the emulator's writes, so a pod the controller replaces (one node at a time) or a
    FelixConfiguration change closes the real listener at that moment, as Felix would.
    """

    def __init__(self, h: Harness, cluster: str) -> None:
        self.h = h
        self.emu: KubeEmulator = h.emulators[cluster]
        self.handle: ClusterHandle = h.handles[cluster]
        self.listeners = {n.node_name: n.address for n in h.fleet.nodes
                          if h.addresses.get((cluster, n.node_name)) == n.address}
        self.closed: list[str] = []
        self._lock = threading.Lock()
        self.unsubscribe = self.emu.on_change(self._on_change)

    def _on_change(self, change: Any) -> None:
        if change.resource.kind not in ("Pod", "FelixConfiguration") or change.type == "DELETED":
            return
        with self._lock:
            for node, address in self.listeners.items():
                if node not in self.closed and not self.enabled(node):
                    self.h.fleet.close_node(address)
                    self.closed.append(node)

    def open_nodes(self) -> list[str]:
        return sorted(n for n, a in self.listeners.items() if self.h.fleet.node(a).listening)

    def enabled(self, node: str) -> bool:
        pod = self.handle.pod_on(node)
        if pod is None:
            return False
        container = next(c for c in pod["spec"]["containers"]
                         if c["name"] == self.handle.container)
        values: dict[str, str | None] = {}
        for source in container.get("envFrom") or []:  # env entries beat envFrom
            ref = source.get("configMapRef") or {}
            obj = self.emu.get_object("v1", "ConfigMap", ref.get("name", ""),
                                      self.handle.namespace) or {}
            values.update(obj.get("data") or {})
        for entry in container.get("env") or []:
            values[entry["name"]] = self._value(entry)
        env = [EnvVar(name=name, value=value, origin="literal") for name, value in values.items()
               if (felix_param(name) or "").startswith("prometheusmetrics")]
        configs = tuple(
            FelixConfig(name=fc["metadata"]["name"],
                        spec={k: v for k, v in (fc.get("spec") or {}).items()
                              if k.startswith("prometheusMetrics")},
                        annotations=dict(fc["metadata"].get("annotations") or {}),
                        node_selector=(fc.get("spec") or {}).get("nodeSelector"),
                        created=fc["metadata"].get("creationTimestamp", ""))
            for fc in self.emu.list_objects(FELIX_API, "FelixConfiguration"))
        labels = self.emu.get_object("v1", "Node", node)["metadata"].get("labels") or {}
        snap = snapshot(env=tuple(env), configs=configs)
        return resolve(snap, NodeRecord(node, (), True, labels)).enabled is True

    def _value(self, entry: dict[str, Any]) -> str | None:
        if "valueFrom" not in entry:
            return str(entry.get("value", ""))
        for kind, ref_key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            ref = entry["valueFrom"].get(ref_key)
            if ref:
                obj = self.emu.get_object("v1", kind, ref["name"], self.handle.namespace) or {}
                raw = (obj.get("data") or {}).get(ref["key"])
                if raw is not None and kind == "Secret":
                    raw = base64.b64decode(raw).decode()
                return raw
        return None


def snapshot(*, env: tuple[EnvVar, ...] = (), configs: tuple[FelixConfig, ...] = (),
             install: str = "manifest", installation: Installation | None = None,
             nodes: tuple[NodeRecord, ...] = (), config_file: ConfigFile | None = None
             ) -> ClusterSnapshot:
    return ClusterSnapshot(
        cluster="c", install=install, namespace="kube-system",  # type: ignore[arg-type]
        daemonset="calico-node", container="calico-node", image=None, env=env,
        config_file=config_file or ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=configs, felix_crd=True, installation=installation,
        rollout=Rollout(generation=2, observed_generation=2, desired=1, updated=1, ready=1,
                        available=1, current_revision="r", strategy="RollingUpdate",
                        max_unavailable="1"),
        pods=(), nodes=nodes, collected_at=datetime.now(UTC))


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def cli(h: Harness, db: str, *args: str) -> Run:
    """`felixscan remediate` in this process; `--cluster c1` unless a rollback names an action."""
    target = [] if "--cluster" in args or "--rollback" in args else ["--cluster", "c1"]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["remediate", "--config", str(h.config()), "--db", db, *target, *args])
    return Run(code, out.getvalue(), err.getvalue())


APPLY = ("--apply", "--yes", "--ignore-window", "--rollout-timeout", "10")


def actions(db: str) -> list[RemediationAction]:
    with Store(db) as store:
        return list(reversed(store.remediations("c1")))


def scan_runs(db: str) -> list[Any]:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(ScanRun).order_by(ScanRun.id)))
    finally:
        engine.dispose()


def stripped(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without what the server keeps for itself (status, versions)."""
    out = copy.deepcopy(obj)
    out.pop("status", None)
    for key in ("resourceVersion", "generation", "managedFields"):
        out["metadata"].pop(key, None)
    return out


def env_of(ds: dict[str, Any], container: str = "calico-node") -> list[dict[str, Any]]:
    return next(c for c in ds["spec"]["template"]["spec"]["containers"]
                if c["name"] == container)["env"]


def writes(emu: KubeEmulator) -> list[RecordedRequest]:
    return [r for r in emu.requests if r.verb not in ("get", "list", "watch")]


def felix_configuration(name: str, spec: dict[str, Any] | None = None,
                        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"logSeverityScreen": "Info", **(spec or {})}}


def all_objects(emu: KubeEmulator) -> dict[str, dict[str, Any]]:
    found = {}
    for api_version, kind in (("apps/v1", "DaemonSet"), ("v1", "ConfigMap"), ("v1", "Pod"),
                              ("v1", "Node"), (FELIX_API, "FelixConfiguration"),
                              ("apps/v1", "ControllerRevision")):
        for obj in emu.list_objects(api_version, kind):
            meta = obj["metadata"]
            found[f"{kind} {meta.get('namespace')}/{meta['name']}"] = obj
    return found


# --- manifest install: the env var ------------------------------------------------------------


def test_env_manifest_apply_rolls_out_verifies_and_records(harness: Harness, db_url: str) -> None:
    handle = harness.cluster("c1", ["felix-tls"] * 3, options=ENABLED_OPTS,
                             env={ENABLED: "true", "FELIX_PROMETHEUSMETRICSPORT": "9091"})
    handle.simulate_controllers(roll_delay=0.02)
    felix = FelixSim(harness, "c1")
    emu = harness.emulators["c1"]
    original = stripped(handle.daemonset_object())

    out = cli(harness, db_url, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert "succeeded" in out.stdout
    assert "env/FELIX_PROMETHEUSMETRICSENABLED" in out.stdout
    assert '"value": "false"' in out.stdout  # the exact patch is shown
    # one node at a time, every listener closed by its restarted pod; progress in plain lines
    assert sorted(felix.closed) == ["c1-node-0", "c1-node-1", "c1-node-2"]
    assert felix.open_nodes() == []
    assert re.search(r"rollout: 3/3 updated, 3/3 available", out.stderr)

    # byte for byte: the one env entry changed, every other entry and field as it was
    after = stripped(handle.daemonset_object())
    expected = copy.deepcopy(original)
    index = next(i for i, e in enumerate(env_of(expected)) if e["name"] == ENABLED)
    env_of(expected)[index] = {"name": ENABLED, "value": "false"}
    assert json.dumps(after) == json.dumps(expected)
    assert all(p["metadata"]["labels"]["controller-revision-hash"] == handle.current_revision
               for p in handle.pods())

    # only the DaemonSet was written: one dry run and one patch, with the precondition
    assert [(w.verb, w.resource, w.name, w.dry_run) for w in writes(emu)] == [
        ("patch", "daemonsets", "calico-node", True), ("patch", "daemonsets", "calico-node", False)]
    assert {w.content_type for w in writes(emu)} == {"application/strategic-merge-patch+json"}

    [action] = actions(db_url)
    assert (action.mode, action.outcome, action.install) == ("apply", "succeeded", "manifest")
    assert action.trigger.startswith("cli:") and "@" in action.trigger
    assert action.finished_at is not None and action.finished_at >= action.started_at
    [obj] = action.objects
    assert (obj["kind"], obj["namespace"], obj["name"], obj["container"]) == \
        ("DaemonSet", "kube-system", "calico-node", "calico-node")
    assert obj["before"] == {f"env/{ENABLED}": {"name": ENABLED, "value": "true"}}
    assert obj["after"] == {f"env/{ENABLED}": {"name": ENABLED, "value": "false"}}
    assert obj["applied"] is True and obj["conflicts"] == 0
    assert obj["patch"]["metadata"]["resourceVersion"] == obj["resourceVersion"]
    runs = {r.id: r for r in scan_runs(db_url)}
    assert runs[action.verify_run_id].trigger == "remediation"
    assert runs[action.verify_run_id].status == "finished"
    assert "After: c1: COMPLIANT" in out.stdout


def test_dry_run_is_the_default_and_changes_nothing(harness: Harness, sqlite_url: str) -> None:
    handle = harness.cluster("c1", ["felix-tls", "felix-http"], options=ENABLED_OPTS,
                             env={ENABLED: "true"})
    handle.simulate_controllers(roll_delay=0.02)
    emu = harness.emulators["c1"]
    before, version = all_objects(emu), emu.resource_version

    out = cli(harness, sqlite_url, "--cluster", "c1")

    assert out.code == 0, out.stderr
    assert all_objects(emu) == before and emu.resource_version == version
    assert "server-side dry run (dryRun=All): accepted; generation 2 -> 3" in out.stdout
    assert '"resourceVersion"' in out.stdout and "strategic-merge-patch" in out.stdout
    assert "2 calico-node pod(s) restart, 1 at a time (RollingUpdate, maxUnavailable 1)" \
        in out.stdout
    assert "about 1m00s" in out.stdout
    assert "Dry run: nothing was changed" in out.stdout
    assert "--apply would be refused now: window" in out.stdout  # no window configured
    assert writes(emu) and all(w.dry_run for w in writes(emu))
    assert actions(sqlite_url) == []


def test_value_from_configmap_becomes_a_literal_and_rollback_restores_it(
        harness: Harness, sqlite_url: str) -> None:
    ref = {"configMapKeyRef": {"name": "felix-metrics", "key": "enabled"}}
    handle = harness.cluster(
        "c1", ["felix-http"] * 3, options=ENABLED_OPTS, env={ENABLED: ref},
        configmaps=[{"metadata": {"name": "felix-metrics"}, "data": {"enabled": "true"}}])
    handle.simulate_controllers(roll_delay=0.01)
    felix = FelixSim(harness, "c1")
    emu = harness.emulators["c1"]
    original = stripped(handle.daemonset_object())
    configmap = emu.get_object("v1", "ConfigMap", "felix-metrics", "kube-system")

    out = cli(harness, sqlite_url, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert {"name": ENABLED, "value": "false"} in env_of(handle.daemonset_object())
    assert emu.get_object("v1", "ConfigMap", "felix-metrics", "kube-system") == configmap
    assert felix.open_nodes() == []
    [action] = actions(sqlite_url)
    assert action.objects[0]["before"] == {f"env/{ENABLED}": {"name": ENABLED,
                                                              "valueFrom": ref}}
    assert action.objects[0]["patch"]["spec"]["template"]["spec"]["containers"][0]["env"] == \
        [{"name": ENABLED, "value": "false", "valueFrom": None}]

    back = cli(harness, sqlite_url, "--rollback", str(action.id), *APPLY)

    assert back.code == 0, back.stdout + back.stderr
    assert json.dumps(stripped(handle.daemonset_object())) == json.dumps(original)
    first, second = actions(sqlite_url)
    assert (second.mode, second.outcome, second.rollback_of) == ("rollback", "rolled_back",
                                                                 first.id)
    assert second.verify_run_id is not None and second.verify_run_id != first.verify_run_id
    assert second.objects[0]["after"] == {f"env/{ENABLED}": {"name": ENABLED, "valueFrom": ref}}

    again = cli(harness, sqlite_url, "--rollback", str(action.id), *APPLY)
    assert again.code == 2
    assert f"already rolled back by action {second.id}" in again.stderr


def test_env_from_envfrom_gets_a_literal_entry_that_rollback_removes(harness: Harness,
                                                                      sqlite_url: str) -> None:
    handle = harness.cluster(
        "c1", ["felix-http"] * 2, options=ENABLED_OPTS,
        configmaps=[{"metadata": {"name": "felix-env"}, "data": {ENABLED: "true"}}])
    ds = handle.daemonset_object()
    next(c for c in ds["spec"]["template"]["spec"]["containers"]
         if c["name"] == "calico-node")["envFrom"] = [{"configMapRef": {"name": "felix-env"}}]
    harness.emulators["c1"].replace(ds)
    handle.reconcile()
    handle.roll_all()
    handle.simulate_controllers(roll_delay=0.01)
    felix = FelixSim(harness, "c1")
    original = stripped(handle.daemonset_object())

    out = cli(harness, sqlite_url, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert env_of(handle.daemonset_object())[-1] == {"name": ENABLED, "value": "false"}
    assert felix.open_nodes() == []
    [action] = actions(sqlite_url)
    assert action.objects[0]["before"] == {}  # the entry was absent: rollback removes it

    back = cli(harness, sqlite_url, "--rollback", str(action.id), *APPLY)
    assert back.code == 0, back.stdout + back.stderr
    assert json.dumps(stripped(handle.daemonset_object())) == json.dumps(original)


# --- FelixConfiguration winners ---------------------------------------------------------------


@pytest.mark.parametrize(("case", "configs", "target", "field", "value"), [
    ("default", [felix_configuration("default", {"prometheusMetricsEnabled": True})],
     "default", ("spec", "prometheusMetricsEnabled"), False),
    ("per-node", [felix_configuration("default"),
                  felix_configuration("node.c1-node-1", {"prometheusMetricsEnabled": True})],
     "node.c1-node-1", ("spec", "prometheusMetricsEnabled"), False),
    ("annotation", [felix_configuration(
        "default", {"prometheusMetricsEnabled": False},
        {"config.projectcalico.org/PrometheusMetricsEnabled": "true"})],
     "default", ("annotation", "config.projectcalico.org/PrometheusMetricsEnabled"), "false"),
    ("selector", [felix_configuration("default"),
                  felix_configuration("gpu", {"prometheusMetricsEnabled": True,
                                              "nodeSelector": "role == 'gpu'"})],
     "gpu", ("spec", "prometheusMetricsEnabled"), False),
])
def test_felixconfiguration_winner_is_patched_in_place(
        harness: Harness, sqlite_url: str, case: str, configs: list[dict[str, Any]],
        target: str, field: tuple[str, str], value: Any) -> None:
    nodes = [Node("felix-http"), Node("felix-http", labels={"role": "gpu"}), Node("closed")]
    handle = harness.cluster("c1", nodes, options=ENABLED_OPTS, felix_configs=configs,
                             default_felix_config=False)
    handle.simulate_controllers(roll_delay=0.01)
    felix = FelixSim(harness, "c1")
    emu = harness.emulators["c1"]
    ds_version = handle.daemonset_object()["metadata"]["resourceVersion"]
    others = {c["metadata"]["name"]: emu.get_object(FELIX_API, "FelixConfiguration",
                                                     c["metadata"]["name"])
              for c in configs if c["metadata"]["name"] != target}
    original = emu.get_object(FELIX_API, "FelixConfiguration", target)

    out = cli(harness, sqlite_url, *APPLY)

    assert out.code == 0, f"{case}: {out.stdout}{out.stderr}"
    assert "Felix restarts inside its pod" in out.stdout
    assert felix.open_nodes() == []
    fixed = emu.get_object(FELIX_API, "FelixConfiguration", target)
    where = fixed["spec"] if field[0] == "spec" else fixed["metadata"]["annotations"]
    assert where[field[1]] == value
    # the rest of the object, the DaemonSet and the other FelixConfigurations as they were
    expected = stripped(original)
    (expected["spec"] if field[0] == "spec" else expected["metadata"]["annotations"])[
        field[1]] = value
    assert json.dumps(stripped(fixed)) == json.dumps(expected)
    assert handle.daemonset_object()["metadata"]["resourceVersion"] == ds_version
    for name, obj in others.items():
        assert emu.get_object(FELIX_API, "FelixConfiguration", name) == obj
    assert [(w.resource, w.name, w.dry_run, w.content_type) for w in writes(emu)] == [
        ("felixconfigurations", target, True, "application/merge-patch+json"),
        ("felixconfigurations", target, False, "application/merge-patch+json")]
    [action] = actions(sqlite_url)
    assert action.outcome == "succeeded"
    assert action.objects[0]["name"] == target

    back = cli(harness, sqlite_url, "--rollback", str(action.id), *APPLY)
    assert back.code == 0, back.stdout + back.stderr
    assert json.dumps(stripped(emu.get_object(FELIX_API, "FelixConfiguration", target))) == \
        json.dumps(stripped(original))


def test_per_node_and_default_both_on_are_fixed_in_one_action(harness: Harness,
                                                              sqlite_url: str) -> None:
    configs = [felix_configuration("default", {"prometheusMetricsEnabled": True}),
               felix_configuration("node.c1-node-0", {"prometheusMetricsEnabled": True})]
    handle = harness.cluster("c1", ["felix-http"] * 3, options=ENABLED_OPTS,
                             felix_configs=configs, default_felix_config=False)
    handle.simulate_controllers()
    felix = FelixSim(harness, "c1")

    out = cli(harness, sqlite_url, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert felix.open_nodes() == []
    [action] = actions(sqlite_url)
    assert sorted(o["name"] for o in action.objects) == ["default", "node.c1-node-0"]


# --- operator install -------------------------------------------------------------------------


def test_operator_install_changes_installation_and_felixconfiguration(harness: Harness,
                                                                      db_url: str) -> None:
    handle = harness.cluster("c1", ["felix-http"] * 3, options=ENABLED_OPTS, install="operator",
                             node_metrics_port=9091)
    handle.simulate_controllers(roll_delay=0.02)
    felix = FelixSim(harness, "c1")
    emu = harness.emulators["c1"]

    out = cli(harness, db_url, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    installation = emu.get_object("operator.tigera.io/v1", "Installation", "default")
    assert "nodeMetricsPort" not in installation["spec"]
    assert installation["spec"] == {"variant": "Calico"}
    assert emu.get_object(FELIX_API, "FelixConfiguration", "default")["spec"][
        "prometheusMetricsEnabled"] is False
    # the operator re-rendered the DaemonSet without the env vars; felixscan never patched it
    assert not any(e["name"].startswith("FELIX_PROMETHEUS") for e in
                   env_of(handle.daemonset_object()))
    assert "daemonsets" not in {w.resource for w in writes(emu)}
    assert felix.open_nodes() == []
    [action] = actions(db_url)
    assert (action.install, action.outcome) == ("operator", "succeeded")
    assert [(o["kind"], o["name"]) for o in action.objects] == [
        ("FelixConfiguration", "default"), ("Installation", "default")]
    assert action.objects[1]["before"] == {"spec/nodeMetricsPort": 9091}
    assert action.objects[1]["after"] == {}

    back = cli(harness, db_url, "--rollback", str(action.id), *APPLY)
    assert back.code == 0, back.stdout + back.stderr
    assert emu.get_object("operator.tigera.io/v1", "Installation", "default")["spec"][
        "nodeMetricsPort"] == 9091
    assert "prometheusMetricsEnabled" not in emu.get_object(
        FELIX_API, "FelixConfiguration", "default")["spec"]
    assert {"name": ENABLED, "value": "true"} in env_of(handle.daemonset_object())


# --- concurrency ------------------------------------------------------------------------------


def test_conflict_on_the_first_patch_is_reread_and_retried(harness: Harness,
                                                           sqlite_url: str) -> None:
    handle = harness.cluster("c1", ["felix-http"] * 2, options=ENABLED_OPTS, env={ENABLED: "1"})
    handle.simulate_controllers(roll_delay=0.01)
    FelixSim(harness, "c1")
    emu = harness.emulators["c1"]
    fault = emu.inject(r"daemonsets/calico-node\?fieldManager=felixscan$", status=409, times=1,
                       method="PATCH")

    out = cli(harness, sqlite_url, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert fault.hits == 1
    real = [w for w in writes(emu) if not w.dry_run]
    assert [w.status for w in real] == [409, 200]
    [action] = actions(sqlite_url)
    assert action.objects[0]["conflicts"] == 1
    assert action.outcome == "succeeded"


def test_a_concurrent_writer_is_kept_library_api(harness: Harness, sqlite_url: str) -> None:
    """The library as `serve` calls it; someone edits the DaemonSet between plan and patch."""
    handle = harness.cluster("c1", ["felix-http"] * 2, options=ENABLED_OPTS,
                             env={ENABLED: "true"})
    handle.simulate_controllers(roll_delay=0.01)
    FelixSim(harness, "c1")
    emu = harness.emulators["c1"]
    settings = load_settings(harness.config(database=sqlite_url))
    plans: list[Any] = []
    seen: list[Any] = []

    def confirm(plan: Any) -> bool:
        plans.append(plan)
        emu.patch_object("apps/v1", "DaemonSet", "calico-node",
                         {"metadata": {"annotations": {"example.com/owner": "team-net"}}},
                         namespace="kube-system")
        return True

    with Store(sqlite_url) as store:
        result = remediate(settings, "c1", store=store, apply=True, trigger="serve:auto",
                           ignore_window=True, confirm=confirm, progress=seen.append,
                           options=RemediateOptions(rollout_timeout=10))

    assert result.outcome == "succeeded" and result.done, result.message
    assert plans and plans[0].changes[0].ref.kind == "DaemonSet"
    ds = handle.daemonset_object()
    assert ds["metadata"]["annotations"]["example.com/owner"] == "team-net"
    assert {"name": ENABLED, "value": "false"} in env_of(ds)
    assert seen and seen[-1].updated == seen[-1].desired == 2
    [action] = actions(sqlite_url)
    assert action.trigger == "serve:auto"
    assert action.objects[0]["conflicts"] == 1
    assert result.verify_run_id == action.verify_run_id
    assert result.verify is not None and result.verify.status == "compliant"


# --- guards -----------------------------------------------------------------------------------


def _window_not_now() -> str:
    day = (datetime.now(UTC) + timedelta(days=3)).strftime("%a")
    return f"{day} 01:00-02:00 UTC"


def test_outside_the_window_is_refused_and_recorded(harness: Harness, sqlite_url: str) -> None:
    window = _window_not_now()
    handle = harness.cluster("c1", ["felix-http"] * 2, env={ENABLED: "true"},
                             options={"remediation": {"enabled": True, "window": window}})
    handle.simulate_controllers()
    emu = harness.emulators["c1"]
    version = emu.resource_version

    out = cli(harness, sqlite_url, "--apply", "--yes")

    assert out.code == 2
    assert f"outside the maintenance window {window}" in out.stderr
    assert "next opens" in out.stderr and "nothing was changed" in out.stderr
    assert emu.resource_version == version
    assert all(w.dry_run for w in writes(emu))
    [action] = actions(sqlite_url)
    assert action.outcome == "refused" and "window" in (action.message or "")
    assert action.objects[0]["applied"] is False


def test_inside_the_window_applies(harness: Harness, sqlite_url: str) -> None:
    now = datetime.now(UTC)
    window = (f"Mon-Sun {(now - timedelta(hours=1)):%H:%M}-"
              f"{(now + timedelta(hours=1)):%H:%M} UTC")
    handle = harness.cluster("c1", ["felix-http"], env={ENABLED: "true"},
                             options={"remediation": {"enabled": True, "window": window}})
    handle.simulate_controllers()
    FelixSim(harness, "c1")

    out = cli(harness, sqlite_url, "--apply", "--yes", "--rollout-timeout", "10")

    assert out.code == 0, out.stdout + out.stderr
    assert f"inside the maintenance window {window}" in out.stdout


@pytest.mark.parametrize(("case", "nodes", "options", "message"), [
    ("not enabled", ["felix-http"] * 3, {}, "remediation is not enabled for cluster c1"),
    ("rollout in progress", [Node("felix-http"), Node("felix-http", pod="old"),
                             Node("felix-http")], ENABLED_OPTS,
     "a calico-node rollout is in progress (generation 2, observed 2; 2 of 3 pods updated"),
    ("too many NotReady", [Node("felix-http"), Node("felix-http", ready=False),
                           Node("felix-http")], ENABLED_OPTS,
     "1 of 3 nodes NotReady (33%, limit 10%): c1-node-1"),
])
def test_guards_refuse_and_change_nothing(harness: Harness, sqlite_url: str, case: str,
                                          nodes: list[Any], options: dict[str, Any],
                                          message: str) -> None:
    handle = harness.cluster("c1", nodes, env={ENABLED: "true"}, options=options)
    handle.simulate_controllers()
    emu = harness.emulators["c1"]
    before = all_objects(emu)

    out = cli(harness, sqlite_url, *APPLY)

    assert out.code == 2, case
    assert message in out.stderr, out.stderr
    assert all_objects(emu) == before
    assert [a.outcome for a in actions(sqlite_url)] == ["refused"]


def test_not_ready_limit_is_a_flag(harness: Harness, sqlite_url: str) -> None:
    handle = harness.cluster("c1", [Node("felix-http"), Node("felix-http", ready=False)],
                             env={ENABLED: "true"}, options=ENABLED_OPTS)
    handle.simulate_controllers(roll_delay=0.01)
    FelixSim(harness, "c1")

    out = cli(harness, sqlite_url, *APPLY, "--max-not-ready", "50")

    assert out.code == 0, out.stdout + out.stderr
    assert "1 of 2 nodes NotReady (50%, limit 50%)" in out.stdout


def test_no_terminal_and_no_yes_is_refused_before_anything(harness: Harness, sqlite_url: str,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    harness.cluster("c1", ["felix-http"], env={ENABLED: "true"}, options=ENABLED_OPTS)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))

    out = cli(harness, sqlite_url, "--apply", "--ignore-window")

    assert out.code == 2
    assert "no terminal to ask on; pass --yes" in out.stderr
    assert harness.emulators["c1"].requests == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_prompt_wants_the_cluster_name(harness: Harness, sqlite_url: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    handle = harness.cluster("c1", ["felix-http"], env={ENABLED: "true"}, options=ENABLED_OPTS)
    handle.simulate_controllers()
    FelixSim(harness, "c1")
    emu = harness.emulators["c1"]

    monkeypatch.setattr(sys, "stdin", _Terminal("yes\n"))
    out = cli(harness, sqlite_url, "--apply", "--ignore-window")
    assert out.code == 2
    assert "Type the cluster name (c1)" in out.stderr and "not confirmed" in out.stderr
    assert all(w.dry_run for w in writes(emu))
    assert actions(sqlite_url) == []

    monkeypatch.setattr(sys, "stdin", _Terminal("c1\n"))
    out = cli(harness, sqlite_url, "--apply", "--ignore-window", "--rollout-timeout", "10")
    assert out.code == 0, out.stdout + out.stderr


def test_a_patch_the_server_rejects_is_a_failed_action(harness: Harness,
                                                      sqlite_url: str) -> None:
    handle = harness.cluster("c1", ["felix-http"], env={ENABLED: "true"}, options=ENABLED_OPTS)
    handle.simulate_controllers()
    emu = harness.emulators["c1"]
    emu.inject(r"daemonsets/calico-node\?fieldManager=felixscan$", status=422, method="PATCH")

    out = cli(harness, sqlite_url, *APPLY)

    assert out.code == 1
    [action] = actions(sqlite_url)
    assert action.outcome == "failed"
    assert "the change was not made: PATCH DaemonSet kube-system/calico-node: 422" in \
        (action.message or "")
    assert action.objects == [] and action.verify_run_id is None
    assert {"name": ENABLED, "value": "true"} in env_of(handle.daemonset_object())


def test_apply_is_refused_while_another_holds_the_cluster_lock(harness: Harness,
                                                         sqlite_url: str) -> None:
    from scanner.db.locks import DatabaseLock, cluster_lock_name

    handle = harness.cluster("c1", ["felix-http"], env={ENABLED: "true"}, options=ENABLED_OPTS)
    handle.simulate_controllers()
    with Store(sqlite_url) as store:
        store.ensure_schema()
        with DatabaseLock(store).hold(cluster_lock_name("c1")) as held:
            assert held is not None
            out = cli(harness, sqlite_url, *APPLY)
    assert out.code == 2
    assert "another felixscan process is scanning or remediating cluster c1" in out.stderr
    assert harness.emulators["c1"].requests == []


def test_the_library_takes_the_cluster_lock_itself(harness: Harness, sqlite_url: str) -> None:
    """`remediate(apply=True)` holds the cluster's lock on its own, as `run_scan` does: a
    caller that forgets it cannot race a scan; a dry run needs no lock."""
    from scanner.core.errors import RemediationRefused
    from scanner.db.locks import DatabaseLock, cluster_lock_name

    handle = harness.cluster("c1", ["felix-http"], env={ENABLED: "true"}, options=ENABLED_OPTS)
    handle.simulate_controllers()
    settings = load_settings(harness.config(database=sqlite_url))
    with Store(sqlite_url) as store:
        store.ensure_schema()
        with DatabaseLock(store).hold(cluster_lock_name("c1")) as held:
            assert held is not None
            with pytest.raises(RemediationRefused, match="another felixscan process"):
                remediate(settings, "c1", store=store, apply=True, trigger="test",
                          ignore_window=True, confirm=lambda plan: True)
            assert harness.emulators["c1"].requests == []
            dry = remediate(settings, "c1", store=store, apply=False, trigger="test")
        assert dry.outcome == "dry_run"
        applied = remediate(settings, "c1", store=store, apply=True, trigger="test",
                            ignore_window=True, confirm=lambda plan: True)
        # The patch was made under the lock (the listener here stays up, so the
        # verification scan fails: that part is tested elsewhere).
        assert applied.outcome in ("succeeded", "failed")
        assert [w for w in writes(harness.emulators["c1"]) if not w.dry_run]
        # Released at the end: the lock is free again.
        with DatabaseLock(store).hold(cluster_lock_name("c1")) as again:
            assert again is not None


def test_progress_is_a_bar_on_a_terminal_and_lines_in_logs() -> None:
    """The rollout is shown on the command's progress line (scanner.progress, like the scans
    before and after it): a bar redrawn in place on a terminal and taken off when it ends;
    without a terminal, one `scanner.progress` log line per change."""
    from scanner.app.commands.remediate import _ProgressView
    from scanner.remediate import RolloutProgress
    from scanner.telemetry import progress
    from scanner.telemetry.logs import configured

    step = RolloutProgress(generation=3, observed_generation=3, target_generation=3, desired=4,
                           updated=2, available=3, elapsed=5.0, timeout=60.0)
    tty = _Terminal()
    with configured(stream=tty), progress.session(tty, title="remediate", terminal=True):
        view = _ProgressView()
        view(step)
        view.end()
    assert tty.getvalue().startswith("\r| [" + "#" * 10 + "-" * 10 + "] rollout: 2/4 updated")
    assert tty.getvalue().endswith("\r\x1b[K")  # taken off the screen
    log = io.StringIO()
    with configured(stream=log), progress.session(log, title="remediate"):
        _ProgressView()(step)
    assert log.getvalue().endswith(" INFO scanner.progress: rollout: 2/4 updated, 3/4 "
                                   "available, generation 3/3 observed (5s of 60s)\n")


# --- a rollout that stalls --------------------------------------------------------------------


def test_stalled_rollout_is_a_failed_action_and_nothing_more_is_changed(
        harness: Harness, sqlite_url: str) -> None:
    handle = harness.cluster("c1", ["felix-http"] * 3, env={ENABLED: "true"},
                             options=ENABLED_OPTS)
    # The controller observes the new template but rolls nothing: pods stay on the old revision.
    handle.simulate_controllers(auto_roll=False)
    felix = FelixSim(harness, "c1")
    emu = harness.emulators["c1"]

    out = cli(harness, sqlite_url, "--apply", "--yes", "--ignore-window",
              "--rollout-timeout", "1")

    assert out.code == 1
    [action] = actions(sqlite_url)
    assert action.outcome == "failed"
    message = action.message or ""
    assert "the rollout did not finish within 1s" in message
    assert "0 of 3 pods updated, 3 available" in message
    assert "pods on an old revision: calico-node-" in message
    assert "changed nothing further" in message
    assert action.verify_run_id is None
    assert [r.trigger for r in scan_runs(sqlite_url)] == []
    assert f"Action {action.id} FAILED" in out.stdout
    real = [w for w in writes(emu) if not w.dry_run]
    assert len(real) == 1  # the one patch; after it only reads
    assert emu.requests[-1].verb in ("get", "list")
    assert felix.open_nodes() == ["c1-node-0", "c1-node-1", "c1-node-2"]


# --- rollback refusals ------------------------------------------------------------------------


def test_rollback_refuses_to_overwrite_a_later_change(harness: Harness,
                                                      sqlite_url: str) -> None:
    handle = harness.cluster("c1", ["felix-http"], env={ENABLED: "true"}, options=ENABLED_OPTS)
    handle.simulate_controllers()
    FelixSim(harness, "c1")
    assert cli(harness, sqlite_url, *APPLY).code == 0
    handle.update_env({ENABLED: "no"}, roll=True)
    emu = harness.emulators["c1"]
    version = emu.resource_version

    out = cli(harness, sqlite_url, "--rollback", "1", *APPLY)

    assert out.code == 2
    assert "changed since action 1" in out.stderr and '"value": "no"' in out.stderr
    assert emu.resource_version == version

    unknown = cli(harness, sqlite_url, "--rollback", "99", *APPLY)
    assert unknown.code == 2 and "no remediation action 99" in unknown.stderr


# --- least privilege --------------------------------------------------------------------------


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


def test_rbac_doc_matches_the_code() -> None:
    documented = _doc_table("Remediation (in addition)")
    assert documented == [{"apiGroups": [r.api_group], "resources": [r.resource],
                           "verbs": list(r.verbs), "resourceNames": list(r.names)}
                          for r in REMEDIATION_RBAC]
    assert _doc_table("Scanner (read-only)")


@pytest.mark.parametrize("install", ["manifest", "operator"])
def test_remediation_works_with_exactly_the_documented_rbac(harness: Harness, sqlite_url: str,
                                                            install: str) -> None:
    build: dict[str, Any] = ({"install": "operator", "node_metrics_port": 9091}
                             if install == "operator" else {"env": {ENABLED: "true"}})
    handle = harness.cluster("c1", ["felix-http"] * 2, options=ENABLED_OPTS, **build)
    handle.simulate_controllers(roll_delay=0.01)
    FelixSim(harness, "c1")
    emu = harness.emulators["c1"]
    emu.set_rbac(_doc_table("Scanner (read-only)") + _doc_table("Remediation (in addition)"))

    out = cli(harness, sqlite_url, *APPLY)

    assert out.code == 0, out.stdout + out.stderr
    assert all(r.status != 403 for r in emu.requests)
    for w in writes(emu):
        assert any(w.api_group == r.api_group and w.resource == r.resource and w.verb in r.verbs
                   and (not r.names or w.name in r.names) for r in REMEDIATION_RBAC), w
    assert {w.verb for w in writes(emu)} == {"patch"}


def test_the_scanners_read_only_role_cannot_remediate(harness: Harness,
                                                      sqlite_url: str) -> None:
    env_handle = harness.cluster("c1", ["felix-http"], env={ENABLED: "true"},
                                 options=ENABLED_OPTS)
    fc_handle = harness.cluster("c2", ["felix-http"], options=ENABLED_OPTS,
                                felix_configs=[felix_configuration(
                                    "default", {"prometheusMetricsEnabled": True})],
                                default_felix_config=False)
    for name in ("c1", "c2"):
        harness.emulators[name].set_rbac(_doc_table("Scanner (read-only)"))
    env_version = env_handle.emu.resource_version
    fc_version = fc_handle.emu.resource_version

    env_out = cli(harness, sqlite_url, *APPLY)
    fc_out = cli(harness, sqlite_url, *APPLY, "--cluster", "c2")

    # the env patch is refused by the server's answer to the dry run; nothing was sent for real
    assert env_out.code == 2
    assert "REJECTED: PATCH DaemonSet kube-system/calico-node (dry run): 403" in env_out.stdout
    assert "dry-run:" in env_out.stderr
    # reading a single FelixConfiguration is already remediation's own permission
    assert fc_out.code == 1
    assert "cluster c2: cannot plan the change, nothing was changed" in fc_out.stderr
    assert "403" in fc_out.stderr
    assert env_handle.emu.resource_version == env_version
    assert fc_handle.emu.resource_version == fc_version


# --- pure pieces ------------------------------------------------------------------------------


def test_windows_wrap_midnight_and_follow_their_time_zone() -> None:
    night = parse_window("Sat 23:00-02:00 UTC")
    assert in_window(night, datetime(2026, 1, 3, 23, 30, tzinfo=UTC))  # Saturday
    assert in_window(night, datetime(2026, 1, 4, 1, 59, tzinfo=UTC))  # Sunday morning
    assert not in_window(night, datetime(2026, 1, 4, 2, 0, tzinfo=UTC))
    assert not in_window(night, datetime(2026, 1, 3, 1, 0, tzinfo=UTC))  # Saturday morning
    berlin = parse_window("Mon-Fri 22:00-23:00 Europe/Berlin")
    assert in_window(berlin, datetime(2026, 1, 5, 21, 30, tzinfo=UTC))  # 22:30 in Berlin
    assert not in_window(berlin, datetime(2026, 1, 5, 22, 30, tzinfo=UTC))
    assert next_window_start(night, datetime(2026, 1, 5, 12, 0, tzinfo=UTC)) == \
        datetime(2026, 1, 10, 23, 0, tzinfo=UTC)


def test_max_unavailable_and_diff_paths() -> None:
    assert max_unavailable(None, 10) == 1
    assert max_unavailable("10%", 25) == 3
    assert max_unavailable("0", 5) == 1
    old = {"metadata": {"resourceVersion": "1", "annotations": {"a/b": "x"}},
           "spec": {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
           "status": {"x": 1}}
    new = copy.deepcopy(old)
    new["metadata"]["resourceVersion"] = "2"
    new["status"] = {"x": 2}
    new["spec"]["env"][1]["value"] = "3"
    new["metadata"]["annotations"]["a/b"] = "y"
    assert list(diff_paths(old, new)) == ["metadata.annotations[a/b]",
                                          "spec.env[name=B].value"]


def test_plan_refuses_what_it_does_not_change() -> None:
    felix_cfg = ConfigFile(known=True, values={"prometheusmetricsenabled": "true"},
                           origin="configmap kube-system/felix[felix.cfg]")
    with pytest.raises(RemediationRefused, match="config file"):
        plan_fixes(snapshot(config_file=felix_cfg))
    with pytest.raises(RemediationRefused, match="operator would revert"):
        plan_fixes(snapshot(env=(EnvVar(ENABLED, "true", "literal"),), install="operator",
                            installation=Installation("default", None)))
    # A selector Felix cannot parse drops only that resource (felix/calc/config_batcher.go
    # onFelixConfigResourceUpdate): it turns nothing on, so there is nothing to change.
    broken = FelixConfig("gpu", {"prometheusMetricsEnabled": True}, {}, "role == ",
                         "2026-01-01T00:00:00Z")
    assert plan_fixes(snapshot(configs=(broken,),
                               nodes=(NodeRecord("n", (), True, {"role": "x"}),)))[0] == ()


def test_plan_turns_off_every_spelling_and_what_lies_beneath() -> None:
    env = (EnvVar("FELIX_PrometheusMetricsEnabled", "true", "literal"),
           EnvVar("felix_prometheusmetricsenabled", "false", "literal"))
    fixes, _ = plan_fixes(snapshot(env=env))
    assert sorted(f.field for f in fixes) == ["env/FELIX_PrometheusMetricsEnabled",
                                              "env/felix_prometheusmetricsenabled"]
    # operator: removing nodeMetricsPort uncovers a per-node FelixConfiguration that is on
    configs = (FelixConfig("default", {}, {}, None, ""),
               FelixConfig("node.n", {"prometheusMetricsEnabled": True}, {}, None, ""))
    fixes, _ = plan_fixes(snapshot(
        env=(EnvVar(ENABLED, "true", "literal"),), install="operator",
        installation=Installation("default", 9091), configs=configs,
        nodes=(NodeRecord("n", (), True, {}),)))
    assert [(f.kind, f.name, f.field) for f in fixes] == [
        ("Installation", "default", "spec/nodeMetricsPort"),
        ("FelixConfiguration", "default", "spec/prometheusMetricsEnabled"),
        ("FelixConfiguration", "node.n", "spec/prometheusMetricsEnabled")]


def test_nothing_is_patched_once_the_cluster_lock_is_lost(harness: Harness,
                                                          sqlite_url: str) -> None:
    """A lock that vanished (PostgreSQL session ended, lease taken over) means another felixscan
    may be working on the cluster: remediation makes no change after that, and says why."""
    harness.cluster("c1", ["felix-http"] * 2, options=ENABLED_OPTS, env={ENABLED: "true"})
    emu = harness.emulators["c1"]
    settings = load_settings(harness.config(database=sqlite_url))

    class Lost:
        name = "cluster:c1"
        lost = True

        def fence(self, conn: Any) -> None:
            raise AssertionError("nothing may be stored under a lost lock")

        def release(self) -> None:
            pass

    with Store(sqlite_url) as store:
        result = remediate(settings, "c1", store=store, apply=True, trigger="cli",
                           ignore_window=True, confirm=lambda plan: True,
                           held=Lost())  # type: ignore[arg-type]
    assert result.outcome == "failed"
    assert "lock was lost" in result.message
    assert not [w for w in writes(emu) if not w.dry_run]
    assert [a.outcome for a in actions(sqlite_url)] == ["failed"]
