"""Property-based tests: the resolver against an independent model of Calico's rules, and the
config parser against arbitrary documents (it either accepts or says clearly why not)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.core.calico import resolve
from scanner.core.config import load_settings
from scanner.core.errors import ConfigError
from scanner.core.records import ClusterSnapshot, ConfigFile, EnvVar, FelixConfig, Node, Rollout

# --- an independent model of Felix's rules ---------------------------------------------------
# Written from CALICO-FACTS.md "Rules that decide the value" and the upstream code it cites,
# not from scanner/core/calico.py. Sources: env (felix_ prefix in any case; names lower-cased into
# one key, so spellings that disagree, an empty one included, are undetermined) > per-node >
# selector-scoped (v3.32+, oldest wins, nodes without labels match nothing) > default > false.
# Each source drops empty values; "none" (any case) is false; Felix booleans are
# true 1 yes y t / false 0 no n f, case-insensitive, untrimmed, anything else is an invalid
# false that still hides lower sources. On a FelixConfiguration the exact-case annotation
# (prefix case-sensitive) replaces the spec field; another spelling is a second key.

TRUTHY = ("true", "1", "yes", "y", "t")
FALSY = ("false", "0", "no", "n", "f", "none")
PARAM = "felix_prometheusmetricsenabled"
PREFIX = "config.projectcalico.org/"
EXACT = PREFIX + "PrometheusMetricsEnabled"
UNDETERMINED = object()


def meaning(text: str) -> tuple[bool, bool]:
    low = text.lower()
    return low in TRUTHY, low in TRUTHY or low in FALSY


def decide(values: list[str], *, empties_compete: bool) -> object:
    """One source's value for the parameter: None (not set), UNDETERMINED, or the raw text."""
    if empties_compete and len(values) > 1 and "" in values and any(values):
        return UNDETERMINED
    values = [v for v in values if v]
    if not values:
        return None
    if len({meaning(v) for v in values}) > 1:
        return UNDETERMINED
    return values[-1]


def model(env: list[tuple[str, str]], configs: list[dict[str, Any]], node: str,
          labels: dict[str, str], version: tuple[int, int]) -> tuple[bool | None, str]:
    last_by_name: dict[str, str] = {}
    for name, value in env:
        if name.lower() == PARAM:
            last_by_name[name] = value
    found = decide(list(last_by_name.values()), empties_compete=True)
    if found is UNDETERMINED:
        return None, "env"
    if isinstance(found, str):
        return meaning(found)[0], "env"

    def value_of(cfg: dict[str, Any]) -> object:
        raw: dict[str, str] = {}
        if cfg["enabled"] is not None:
            raw["PrometheusMetricsEnabled"] = str(cfg["enabled"]).lower()
        for key, text in cfg["annotations"].items():
            if key.startswith(PREFIX):
                raw[key[len(PREFIX):]] = text  # the exact name overwrites the field
        return decide([v for k, v in raw.items() if k.lower() == "prometheusmetricsenabled"],
                      empties_compete=False)

    def result(value: object, kind: str) -> tuple[bool | None, str] | None:
        if value is None:
            return None
        if value is UNDETERMINED:
            return None, kind
        return meaning(str(value))[0], kind

    by_name = {c["name"]: c for c in configs}
    per_node = by_name.get(f"node.{node}")
    chosen = per_node is not None and result(value_of(per_node), "node")
    if chosen:
        return chosen
    scoped = [c for c in configs if c["name"] != "default" and not c["name"].startswith("node.")
              and c["selector"] and labels and matches(c["selector"], labels)]
    if scoped and version >= (3, 32):
        oldest = sorted(scoped, key=lambda c: (c["created"], c["name"]))[0]
        chosen = result(value_of(oldest), "selector")
        if chosen:
            return chosen
    default = by_name.get("default")
    chosen = default is not None and result(value_of(default), "default")
    if chosen:
        return chosen
    return False, "builtin"


SELECTORS = {
    "all()": lambda lb: True,
    "has(role)": lambda lb: "role" in lb,
    "!has(role)": lambda lb: "role" not in lb,
    "role == 'gpu'": lambda lb: lb.get("role") == "gpu",
    "role != 'gpu'": lambda lb: lb.get("role") != "gpu",
    "role in {'gpu', 'cpu'}": lambda lb: lb.get("role") in ("gpu", "cpu"),
    "role not in {'gpu'}": lambda lb: lb.get("role") != "gpu",
    "has(role) && zone == 'a'": lambda lb: "role" in lb and lb.get("zone") == "a",
    "role == 'gpu' || zone == 'b'": lambda lb: lb.get("role") == "gpu" or lb.get("zone") == "b",
    "zone starts with 'a'": lambda lb: lb.get("zone", "").startswith("a") and "zone" in lb,
    "role ends with 'pu' && !(zone == 'b')": lambda lb: (
        "role" in lb and lb["role"].endswith("pu") and lb.get("zone") != "b"),
    "role contains 'p'": lambda lb: "role" in lb and "p" in lb["role"],
    "global()": lambda lb: True,
}


def matches(selector: str, labels: dict[str, str]) -> bool:
    return bool(SELECTORS[selector](labels))


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
                                   "config.projectcalico.org/prometheusMetricsEnabled",
                                   "Config.projectcalico.org/PrometheusMetricsEnabled",
                                   "config.projectcalico.org/PrometheusMetricsPort",
                                   "example.com/unrelated"])
LABELS = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["gpu", "cpu", "x"]),
                                             "zone": st.sampled_from(["a", "b"])})
VERSIONS = st.sampled_from([(3, 31), (3, 32)])


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
             labels: dict[str, str], version: tuple[int, int] = (3, 32)
             ) -> tuple[ClusterSnapshot, Node]:
    node = Node(name="w1", addresses=(("InternalIP", "127.0.0.1"),), ready=True, labels=labels)
    # Kubernetes keeps the last entry of a duplicated name: the collector hands over that one.
    deduped = {name: value for name, value in env}
    snap = ClusterSnapshot(
        cluster="c", install="manifest", namespace="kube-system", daemonset="calico-node",
        container="calico-node", image=f"quay.io/calico/node:v{version[0]}.{version[1]}.1",
        env=tuple(EnvVar(name=n, value=v, origin="literal") for n, v in deduped.items()),
        config_file=ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=tuple(FelixConfig(name=c["name"], spec={} if c["enabled"] is None else
                                        {"prometheusMetricsEnabled": c["enabled"]},
                                        annotations=c["annotations"],
                                        node_selector=c["selector"], created=c["created"])
                            for c in configs),
        felix_crd=True, installation=None,
        rollout=Rollout(1, 1, 1, 1, 1, 1, "h", "RollingUpdate", "1"), pods=(), nodes=(node,),
        collected_at=datetime.now(UTC))
    return snap, node


SOURCE_PREFIX = {"env": "env ", "node": "FelixConfiguration node.w1",
                 "default": "FelixConfiguration default", "builtin": "built-in default"}


@settings(max_examples=1000, deadline=None)
@given(env=st.lists(st.tuples(NAMES, VALUES), max_size=4), configs=felix_configs(),
       labels=LABELS, version=VERSIONS)
def test_resolver_agrees_with_the_model(env: list[tuple[str, str]],
                                        configs: list[dict[str, Any]],
                                        labels: dict[str, str],
                                        version: tuple[int, int]) -> None:
    """The resolver (scanner/core/calico.py) against the model above, on the rules of
    felix/config/config_params.go `resolve`/`UpdateFrom`, env_var_loader.go,
    configurationprocessor.go and felix/calc/config_batcher.go `MergeSelectorConfigs`."""
    snap, node = snapshot(env, configs, labels, version)
    declared = resolve(snap, node)
    enabled, kind = model(env, configs, node.name, labels, version)
    assert declared.enabled == enabled, (declared, enabled, kind)
    if kind == "selector":
        assert declared.source.startswith("FelixConfiguration sel-"), declared.source
        assert "(nodeSelector " in declared.source
    else:
        assert declared.source.startswith(SOURCE_PREFIX[kind]), (declared.source, kind)
    if enabled is not None and kind != "builtin":
        # an invalid word is false and flagged, a valid one is not flagged
        assert declared.invalid == (declared.raw is not None and declared.raw.lower() not in
                                    (*TRUTHY, *FALSY))


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
