"""Felix's precedence and value parsing, on plain data (no cluster, no network)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from scanner.core.calico import (
    cluster_declared,
    felix_param,
    parse_bool,
    parse_port,
    resolve,
    resolve_nodes,
)
from scanner.core.records import (
    ClusterSnapshot,
    ConfigFile,
    EnvVar,
    FelixConfig,
    Installation,
    Node,
    Rollout,
)
from scanner.core.selector import parse as parse_selector

NODES = (
    Node(name="w1", addresses=(("InternalIP", "127.0.0.1"),), ready=True,
         labels={"role": "gpu", "zone": "a"}),
    Node(name="w2", addresses=(("InternalIP", "127.0.0.2"),), ready=True,
         labels={"role": "cpu", "zone": "b"}),
)


def snapshot(*, env: tuple[EnvVar, ...] = (), configs: tuple[FelixConfig, ...] = (),
             config_file: ConfigFile | None = None, install: str = "manifest",
             installation: Installation | None = None) -> ClusterSnapshot:
    return ClusterSnapshot(
        cluster="c", install=install, namespace="kube-system", daemonset="calico-node",  # type: ignore[arg-type]
        container="calico-node", image="quay.io/calico/node:v3.32.1", env=env,
        config_file=config_file or ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=configs, felix_crd=True, installation=installation,
        rollout=Rollout(1, 1, 2, 2, 2, 2, "abc", "RollingUpdate", "1"), pods=(), nodes=NODES,
        collected_at=datetime.now(UTC))


def env(name: str, value: str | None, **kw: object) -> EnvVar:
    return EnvVar(name=name, value=value, origin=str(kw.pop("origin", "literal")), **kw)  # type: ignore[arg-type]


def fc(name: str, enabled: bool | None = None, port: int | None = None, *,
       annotations: dict[str, str] | None = None, selector: str | None = None,
       created: str = "2026-01-01T00:00:00Z") -> FelixConfig:
    spec: dict[str, object] = {}
    if enabled is not None:
        spec["prometheusMetricsEnabled"] = enabled
    if port is not None:
        spec["prometheusMetricsPort"] = port
    return FelixConfig(name=name, spec=spec, annotations=annotations or {},
                       node_selector=selector, created=created)


@pytest.mark.parametrize(("raw", "value", "valid"), [
    ("true", True, True), ("TRUE", True, True), ("1", True, True), ("yes", True, True),
    ("y", True, True), ("t", True, True), ("T", True, True),
    ("false", False, True), ("0", False, True), ("no", False, True), ("n", False, True),
    ("f", False, True),
    ("on", False, False), ("enabled", False, False), ("", False, False),
    (" true", False, False), ("true ", False, False), ("2", False, False),
])
def test_parse_bool_is_felix_parsing(raw: str, value: bool, valid: bool) -> None:
    assert parse_bool(raw) == (value, valid)


@pytest.mark.parametrize(("raw", "port", "valid"), [
    ("9091", 9091, True), ("19091", 19091, True), ("0", 0, True), ("65536", 9091, False),
    ("x", 9091, False), (" 9091", 9091, False), ("none", 0, True),
])
def test_parse_port(raw: str, port: int, valid: bool) -> None:
    assert parse_port(raw) == (port, valid)


def test_felix_prefix_is_case_insensitive() -> None:
    assert felix_param("FELIX_PROMETHEUSMETRICSENABLED") == "prometheusmetricsenabled"
    assert felix_param("felix_PrometheusMetricsEnabled") == "prometheusmetricsenabled"
    assert felix_param("Felix_prometheusmetricsport") == "prometheusmetricsport"
    assert felix_param("XFELIX_PROMETHEUSMETRICSENABLED") is None


def test_default_is_disabled_on_9091() -> None:
    d = resolve(snapshot(), NODES[0])
    assert (d.enabled, d.source, d.port) == (False, "built-in default (false)", 9091)


def test_env_beats_every_felixconfiguration() -> None:
    snap = snapshot(env=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),),
                    configs=(fc("default", True), fc("node.w1", True)))
    d = resolve(snap, NODES[0])
    assert d.enabled is False
    assert d.source == "env FELIX_PROMETHEUSMETRICSENABLED"


def test_lowercase_env_name_counts() -> None:
    d = resolve(snapshot(env=(env("felix_prometheusmetricsenabled", "t"),)), NODES[0])
    assert d.enabled is True
    assert d.source == "env felix_prometheusmetricsenabled"


def test_invalid_env_value_is_false_but_flagged_and_hides_lower_sources() -> None:
    snap = snapshot(env=(env("FELIX_PROMETHEUSMETRICSENABLED", "on"),),
                    configs=(fc("default", True),))
    d = resolve(snap, NODES[0])
    assert d.enabled is False
    assert d.invalid is True
    assert d.raw == "on"
    assert d.source.startswith("env")


def test_unresolved_value_from_is_unknown_never_guessed() -> None:
    snap = snapshot(env=(env("FELIX_PROMETHEUSMETRICSENABLED", None,
                             origin="secret kube-system/m[k]", error="secret missing"),),
                    configs=(fc("default", False),))
    d = resolve(snap, NODES[0])
    assert d.enabled is None
    assert d.reason == "secret missing"


def test_case_variant_env_names_that_disagree_are_unknown() -> None:
    snap = snapshot(env=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),
                         env("felix_prometheusmetricsenabled", "true")))
    assert resolve(snap, NODES[0]).enabled is None
    agree = snapshot(env=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                          env("felix_prometheusmetricsenabled", "true")))
    assert resolve(agree, NODES[0]).enabled is True


def test_config_file_sits_between_env_and_felixconfiguration() -> None:
    cfg = ConfigFile(known=True, values={"prometheusmetricsenabled": "true"},
                     origin="configmap kube-system/felix[felix.cfg]")
    d = resolve(snapshot(config_file=cfg, configs=(fc("default", False),)), NODES[0])
    assert d.enabled is True
    assert d.source.startswith("config file /etc/calico/felix.cfg")
    unreadable = ConfigFile(known=False, values={}, origin="hostPath volume etc",
                            error="cannot read")
    assert resolve(snapshot(config_file=unreadable), NODES[0]).enabled is None
    # ...but an env var still decides above an unreadable file.
    d2 = resolve(snapshot(config_file=unreadable,
                          env=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),)), NODES[0])
    assert d2.enabled is False


def test_global_default_felixconfiguration() -> None:
    d = resolve(snapshot(configs=(fc("default", True, 9191),)), NODES[0])
    assert (d.enabled, d.source, d.port) == (True, "FelixConfiguration default", 9191)


def test_per_node_override_beats_global() -> None:
    snap = snapshot(configs=(fc("default", False), fc("node.w2", True)))
    per = resolve_nodes(snap)
    assert per["w1"].enabled is False
    assert per["w2"].enabled is True
    assert per["w2"].source == "FelixConfiguration node.w2"
    whole = cluster_declared(snap, per)
    assert whole.enabled is True
    assert "1 of 2 nodes" in whole.source


def test_annotation_overrides_the_spec_field_of_its_resource() -> None:
    snap = snapshot(configs=(fc("default", False, annotations={
        "config.projectcalico.org/PrometheusMetricsEnabled": "true"}),))
    d = resolve(snap, NODES[0])
    assert d.enabled is True
    assert d.source == ("FelixConfiguration default annotation "
                        "config.projectcalico.org/PrometheusMetricsEnabled")


def test_each_parameter_falls_through_on_its_own() -> None:
    snap = snapshot(env=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),),
                    configs=(fc("default", None, 9999),))
    d = resolve(snap, NODES[0])
    assert (d.enabled, d.port, d.port_source) == (True, 9999, "FelixConfiguration default")


def test_selector_scoped_sits_between_node_and_global() -> None:
    snap = snapshot(configs=(
        fc("default", False),
        fc("gpu", True, selector="role == 'gpu'"),
        fc("node.w2", None, 9200),
    ))
    per = resolve_nodes(snap)
    assert per["w1"].enabled is True
    assert per["w1"].source == "FelixConfiguration gpu (nodeSelector role == 'gpu')"
    assert per["w2"].enabled is False
    assert per["w2"].port == 9200


def test_oldest_matching_selector_config_wins() -> None:
    snap = snapshot(configs=(
        fc("newer", False, selector="all()", created="2026-05-01T00:00:00Z"),
        fc("older", True, selector="has(role)", created="2026-01-01T00:00:00Z"),
    ))
    assert resolve(snap, NODES[0]).source.startswith("FelixConfiguration older")


def test_unparseable_selector_drops_only_that_resource() -> None:
    snap = snapshot(configs=(fc("broken", True, selector="role === gpu"),))
    d = resolve(snap, NODES[0])
    assert d.enabled is False
    assert d.source == "built-in default (false)"


@pytest.mark.parametrize(("text", "w1", "w2"), [
    ("all()", True, True),
    ("role == 'gpu'", True, False),
    ('role != "gpu"', False, True),
    ("has(role)", True, True),
    ("!has(role)", False, False),
    ("role in {'gpu', 'tpu'}", True, False),
    ("role not in {'gpu'}", False, True),
    ("role == 'gpu' || zone == 'b'", True, True),
    ("role == 'gpu' && zone == 'b'", False, False),
    ("!(role == 'gpu')", False, True),
    ("zone contains 'a'", True, False),
    ("role starts with 'cp'", False, True),
    ("role ends with 'pu'", True, True),
])
def test_calico_selectors(text: str, w1: bool, w2: bool) -> None:
    sel = parse_selector(text)
    assert (sel.evaluate(NODES[0].labels), sel.evaluate(NODES[1].labels)) == (w1, w2)


def test_secret_stand_in_is_used_but_never_shown_as_raw() -> None:
    snap = snapshot(env=(env("FELIX_PROMETHEUSMETRICSENABLED", "true",
                             origin="secret kube-system/s[k]", redacted=True),))
    d = resolve(snap, NODES[0])
    assert d.enabled is True
    assert d.raw is None


def test_cluster_declared_all_nodes_same_source() -> None:
    snap = snapshot(env=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),))
    per = resolve_nodes(snap)
    whole = cluster_declared(snap, per)
    assert whole.enabled is True
    assert whole.source == "env FELIX_PROMETHEUSMETRICSENABLED"
    unknown = replace(snap, env=(env("FELIX_PROMETHEUSMETRICSENABLED", None, error="x"),))
    assert cluster_declared(unknown, resolve_nodes(unknown)).enabled is None
