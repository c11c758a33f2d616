"""Property-based tests: the resolver against an independent model of Calico's rules, and the
config parser against arbitrary documents (it either accepts or says clearly why not)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.calico import resolve
from scanner.config import load_settings
from scanner.errors import ConfigError
from scanner.records import ClusterSnapshot, ConfigFile, EnvVar, FelixConfig, Node, Rollout

# --- an independent model of CALICO-FACTS.md -----------------------------------------------
# Written from the facts, not from scanner/calico.py: env (any case of the felix_ prefix and
# the name) > per-node > selector-scoped (oldest wins) > default > false. Felix booleans:
# true = true 1 yes y t, false = false 0 no n f none, case-insensitive, untrimmed, anything
# else is false (and still wins over lower sources).

TRUTHY = ("true", "1", "yes", "y", "t")
PARAM = "felix_prometheusmetricsenabled"
ANNOTATION = "config.projectcalico.org/prometheusmetricsenabled"


def felix_true(text: str) -> bool:
    return text.lower() in TRUTHY


def model(env: list[tuple[str, str]], configs: list[dict[str, Any]], node: str,
          labels: dict[str, str]) -> tuple[bool | None, str]:
    last_by_name: dict[str, str] = {}
    for name, value in env:
        if name.lower() == PARAM:
            last_by_name[name] = value
    if last_by_name:
        if len(set(last_by_name.values())) > 1:
            return None, "env"
        return felix_true(next(iter(last_by_name.values()))), "env"

    def value_of(cfg: dict[str, Any]) -> bool | None:
        for key, text in cfg["annotations"].items():
            if key.lower() == ANNOTATION:
                return felix_true(text)
        return cfg["enabled"]

    by_name = {c["name"]: c for c in configs}
    per_node = by_name.get(f"node.{node}")
    if per_node is not None and value_of(per_node) is not None:
        return value_of(per_node), "node"
    scoped = [c for c in configs if c["name"] not in ("default",)
              and not c["name"].startswith("node.") and c["selector"]
              and matches(c["selector"], labels)]
    if scoped:
        oldest = sorted(scoped, key=lambda c: (c["created"], c["name"]))[0]
        if value_of(oldest) is not None:
            return value_of(oldest), "selector"
    default = by_name.get("default")
    if default is not None and value_of(default) is not None:
        return value_of(default), "default"
    return False, "builtin"


SELECTORS = {
    "all()": lambda lb: True,
    "has(role)": lambda lb: "role" in lb,
    "!has(role)": lambda lb: "role" not in lb,
    "role == 'gpu'": lambda lb: lb.get("role") == "gpu",
    "role != 'gpu'": lambda lb: lb.get("role") != "gpu",
    "role in {'gpu', 'cpu'}": lambda lb: lb.get("role") in ("gpu", "cpu"),
    "has(role) && zone == 'a'": lambda lb: "role" in lb and lb.get("zone") == "a",
    "role == 'gpu' || zone == 'b'": lambda lb: lb.get("role") == "gpu" or lb.get("zone") == "b",
}


def matches(selector: str, labels: dict[str, str]) -> bool:
    return SELECTORS[selector](labels)


# --- strategies ----------------------------------------------------------------------------

VALUES = st.sampled_from(["true", "false", "TRUE", "False", "1", "0", "yes", "no", "y", "n",
                          "t", "f", "T", "none", "None", "on", "off", "enabled", "", " true",
                          "true ", "2", "Yes"])
NAMES = st.sampled_from(["FELIX_PROMETHEUSMETRICSENABLED", "felix_prometheusmetricsenabled",
                         "FELIX_PrometheusMetricsEnabled", "Felix_PROMETHEUSMETRICSENABLED",
                         "FELIX_PROMETHEUSMETRICSPORT", "FELIX_LOGSEVERITYSCREEN",
                         "XFELIX_PROMETHEUSMETRICSENABLED", "PROMETHEUSMETRICSENABLED"])
ANNOTATION_KEYS = st.sampled_from(["config.projectcalico.org/PrometheusMetricsEnabled",
                                   "config.projectcalico.org/prometheusmetricsenabled",
                                   "config.projectcalico.org/PrometheusMetricsPort",
                                   "example.com/unrelated"])
LABELS = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["gpu", "cpu", "x"]),
                                             "zone": st.sampled_from(["a", "b"])})


@st.composite
def felix_configs(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(st.sampled_from(["default", "node.w1", "node.w2", "sel-a", "sel-b",
                                           "sel-c"]), unique=True, max_size=5))
    out = []
    for name in names:
        out.append({
            "name": name,
            "enabled": draw(st.sampled_from([None, True, False])),
            "annotations": draw(st.dictionaries(ANNOTATION_KEYS, VALUES, max_size=2)),
            "selector": draw(st.sampled_from([None, *SELECTORS])) if name.startswith("sel")
            else None,
            "created": f"2026-0{draw(st.integers(1, 3))}-01T00:00:00Z",
        })
    return out


def snapshot(env: list[tuple[str, str]], configs: list[dict[str, Any]],
             labels: dict[str, str]) -> tuple[ClusterSnapshot, Node]:
    node = Node(name="w1", addresses=(("InternalIP", "127.0.0.1"),), ready=True, labels=labels)
    # Kubernetes keeps the last entry of a duplicated name: the collector hands over that one.
    deduped = {name: value for name, value in env}
    snap = ClusterSnapshot(
        cluster="c", install="manifest", namespace="kube-system", daemonset="calico-node",
        container="calico-node", image=None,
        env=tuple(EnvVar(name=n, value=v, origin="literal") for n, v in deduped.items()),
        config_file=ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=tuple(FelixConfig(name=c["name"], enabled=c["enabled"], port=None,
                                        annotations=c["annotations"],
                                        node_selector=c["selector"], created=c["created"])
                            for c in configs),
        felix_crd=True, installation=None,
        rollout=Rollout(1, 1, 1, 1, 1, 1, "h", "RollingUpdate", "1"), pods=(), nodes=(node,),
        collected_at=datetime.now(UTC))
    return snap, node


SOURCE_PREFIX = {"env": "env ", "node": "FelixConfiguration node.w1",
                 "default": "FelixConfiguration default", "builtin": "built-in default"}


@settings(max_examples=600, deadline=None)
@given(env=st.lists(st.tuples(NAMES, VALUES), max_size=4), configs=felix_configs(),
       labels=LABELS)
def test_resolver_agrees_with_the_model(env: list[tuple[str, str]],
                                        configs: list[dict[str, Any]],
                                        labels: dict[str, str]) -> None:
    snap, node = snapshot(env, configs, labels)
    declared = resolve(snap, node)
    enabled, kind = model(env, configs, node.name, labels)
    assert declared.enabled == enabled, (declared, enabled, kind)
    if kind == "selector":
        assert declared.source.startswith("FelixConfiguration sel-"), declared.source
        assert "(nodeSelector " in declared.source
    else:
        assert declared.source.startswith(SOURCE_PREFIX[kind]), (declared.source, kind)
    if enabled is not None and kind != "builtin":
        # an invalid word is false and flagged, a valid one is not flagged
        assert declared.invalid == (declared.raw is not None and declared.raw.lower() not in
                                    (*TRUTHY, "false", "0", "no", "n", "f", "none"))


# --- config parsing ------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=20), st.sampled_from(["prod", "0 2 * * *", "kube-system",
                                                           "InternalIP", "Sat 01:00-05:00 UTC"]))
KEYS = st.sampled_from(["database", "schedule", "clusters", "name", "kubeconfig", "context",
                        "in_cluster", "calico", "probe", "remediation", "namespace",
                        "timeout_seconds", "concurrency", "address_type", "extra_ports",
                        "enabled", "window", "auto", "bogus", "api_timeout_seconds"])
DOCS = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=DOCS)
def test_config_parser_never_crashes(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        settings_ = load_settings(path, environ={"HOME": str(tmp_path)})
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(str(path))
        assert "\n" not in message
        assert len(message) < 600
    else:
        assert settings_.clusters


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_config_parser_on_arbitrary_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_settings(path, environ={"HOME": str(tmp_path)})
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
