"""How Felix decides whether its Prometheus metrics endpoint is on, per node (pure functions).

Mirrors Felix's own code (docs/calico.md has the rules, each with its upstream place and test):
each parameter is resolved on its own from the first source that sets it, highest first:
environment > config file > FelixConfiguration `node.<name>` > selector-scoped > `default`
> built-in default (felix/config/config_params.go `SourcesInDescendingOrder`, `resolve`). Empty
values are dropped at every source before that (`Config.UpdateFrom`); `none` is the zero value;
a value that does not parse is replaced by the default and still hides lower sources.
A node's state is that of the calico-node pod(s) running on it, read from each pod's own spec.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from scanner.core.felix_params import DEFAULT_PORT, parse_bool, parse_value
from scanner.core.records import (
    ClusterSnapshot,
    ConfigFile,
    Declared,
    EnvVar,
    FelixConfig,
    FelixConfigSet,
    Node,
    Pod,
)
from scanner.core.selector import Selector, SelectorParseError
from scanner.core.selector import parse as parse_selector

__all__ = ["DEFAULT_PORT", "parse_bool", "parse_port"]

ENABLED = "prometheusmetricsenabled"
PORT = "prometheusmetricsport"
HOST = "prometheusmetricshost"
CERT_FILE = "prometheusmetricscertfile"
KEY_FILE = "prometheusmetricskeyfile"
CLIENT_AUTH = "prometheusmetricsclientauth"
PARAMS = (ENABLED, PORT, HOST, CERT_FILE, KEY_FILE, CLIENT_AUTH)
ANNOTATION_PREFIX = "config.projectcalico.org/"  # case-sensitive (configurationprocessor.go)
CONFIG_FILE = "/etc/calico/felix.cfg"
LABELS_ANNOTATION = "projectcalico.org/labels"
CRD_GROUP = "crd.projectcalico.org/v1"
V3_GROUP = "projectcalico.org/v3"
# Spec fields of FelixConfiguration (api/pkg/apis/projectcalico/v3/felixconfig.go): JSON name
# -> (the name Felix receives, the JSON type the field has).
SPEC_FIELDS: dict[str, tuple[str, type]] = {
    "prometheusMetricsEnabled": ("PrometheusMetricsEnabled", bool),
    "prometheusMetricsPort": ("PrometheusMetricsPort", int),
    "prometheusMetricsHost": ("PrometheusMetricsHost", str),
    "prometheusMetricsCertFile": ("PrometheusMetricsCertFile", str),
    "prometheusMetricsKeyFile": ("PrometheusMetricsKeyFile", str),
    "prometheusMetricsClientAuth": ("PrometheusMetricsClientAuth", str),
}
# Variables outside Felix's own that decide where its datastore configuration lives
# (libcalico-go/lib/apiconfig: envconfig prefix "calico", so CALICO_X or X).
DATASTORE_VARS = ("FELIX_DATASTORETYPE", "CALICO_DATASTORE_TYPE", "DATASTORE_TYPE",
                  "CALICO_ETCD_ENDPOINTS", "ETCD_ENDPOINTS", "FELIX_ETCDENDPOINTS",
                  "FELIX_ETCDADDR", "CALICO_API_GROUP")
TLS_SINCE = (3, 32)  # PrometheusMetricsCertFile/KeyFile/ClientAuth exist from v3.32.0
SELECTOR_SINCE = (3, 32)  # selector-scoped FelixConfiguration from v3.32.0


def parse_port(raw: str) -> tuple[int, bool]:
    """The port Felix uses for `raw` (non-empty): `none` is 0, invalid falls back to 9091."""
    value, valid = parse_value(PORT, raw)
    assert isinstance(value, int)
    return value, valid


def felix_param(env_name: str) -> str | None:
    """The Felix parameter an env var sets: any `felix_` prefix in any case, lower-cased rest
    (felix/config/env_var_loader.go `LoadConfigFromEnvironment`)."""
    low = env_name.lower()
    return low[len("felix_"):] if low.startswith("felix_") else None


def felix_version(image: str | None) -> tuple[int, int, int] | None:
    """Calico's version from a calico/node image reference (`...calico/node:v3.32.1`)."""
    return image_version(image, repo="calico/node")


def image_version(image: str | None, *, repo: str | None = None
                  ) -> tuple[int, int, int] | None:
    """Calico's version from an image reference's `vX.Y.Z` tag; with `repo`, only when the
    image is that repository (`calico/node`)."""
    if not image:
        return None
    ref = image.split("@", 1)[0]
    name, _, tag = ref.rpartition(":")
    if "/" in tag or (repo is not None and not name.endswith(repo)):
        return None
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)(?:[-+].*)?", tag)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def node_labels(labels: Mapping[str, str] | None,
                annotations: Mapping[str, str]) -> dict[str, str] | None:
    """A node's Calico labels: the JSON of `projectcalico.org/labels`, Kubernetes labels over it
    (libcalico-go/lib/backend/k8s/resources/node.go `K8sNodeToCalico`,
    `mergeCalicoAndK8sLabels`; resources.go `SetCalicoMetadataFromK8sAnnotations`). None: the
    node has no labels at all, and then no selector matches it (config_batcher.go)."""
    merged: dict[str, str] | None = None
    raw = annotations.get(LABELS_ANNOTATION)
    if raw is not None:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None  # upstream logs "unable to parse labels annotation" and ignores it
        if isinstance(doc, dict) and all(isinstance(v, str) for v in doc.values()):
            merged = {str(k): v for k, v in doc.items()}
    if labels:
        merged = {**(merged or {}), **labels}
    return merged


# --- one source's raw values ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Raw:
    name: str  # the parameter as the source spells it
    value: str | None
    redacted: bool = False
    error: str | None = None
    origin: str = ""
    display: str = ""  # how the source names it, when not `name` (the full env var)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A source that sets a parameter. `raw is None` with `error` set: it cannot be read."""

    source: str
    raw: str | None
    redacted: bool = False
    error: str | None = None


def _pick(param: str, entries: Sequence[_Raw], source: str) -> _Candidate | None:
    """The value one source gives `param`.

    Names are matched lower-cased (config_params.go `resolve`); empty values are dropped
    (`UpdateFrom`). Two spellings of one parameter in one source with different meanings are
    undetermined: Felix holds each source in a Go map, whose order is random. In the
    environment the loader lower-cases names first (env_var_loader.go), so there an empty
    spelling competes too: it may be the one kept, and then dropped.
    """
    hits = [e for e in entries if e.name.lower() == param]
    bad = next((e for e in hits if e.error), None)
    if bad is not None:
        return _Candidate(source=_label(source, bad), raw=None, error=bad.error)
    if source == "env" and len({e.display for e in hits}) > 1 and any(not e.value for e in hits) \
            and any(e.value for e in hits):
        names = ", ".join(e.display or e.name for e in hits)
        return _Candidate(source=f"env {names}", raw=None,
                          error=f"{names} set the same Felix parameter, some empty; which one "
                          "Felix keeps depends on the order of its environment")
    hits = [e for e in hits if e.value]
    if not hits:
        return None
    meanings = {parse_value(param, e.value or "") for e in hits}
    chosen = hits[-1]
    if len(meanings) > 1:
        names = ", ".join(e.display or e.name for e in hits)
        return _Candidate(source=f"{source} {names}", raw=None,
                          error=f"{names} in {source} set the same Felix parameter to different "
                          "values; which one Felix takes is undetermined (Go map order)")
    return _Candidate(source=_label(source, chosen), raw=chosen.value, redacted=chosen.redacted)


def _label(source: str, entry: _Raw) -> str:
    if source == "env":
        origin = "" if entry.origin in ("", "literal") else f" ({entry.origin})"
        return f"env {entry.display or entry.name}{origin}"
    return source


def env_entries(env: Iterable[EnvVar]) -> list[_Raw]:
    """The container's env as Felix's environment loader sees it (felix_ names only)."""
    return [_Raw(name=e.name[len("felix_"):], value=e.value, redacted=e.redacted,
                 error=e.error, origin=e.origin, display=e.name)
            for e in env if felix_param(e.name) is not None]


def felix_config_values(cfg: FelixConfig) -> list[_Raw]:
    """What Felix receives from one FelixConfiguration.

    Spec fields become strings (`%v`; a nil or "" field is no value); an annotation
    `config.projectcalico.org/<Name>` with the field's exact name replaces the field, any other
    spelling is an extra key beside it (configurationprocessor.go `processAddOrModified`,
    `extractAnnotations`; felixconfigprocessor.go `ExtractFelixConfigFields`). A field of the
    wrong JSON type cannot be decoded: its value is unknown.
    """
    overrides = {k[len(ANNOTATION_PREFIX):]: v for k, v in cfg.annotations.items()
                 if k.startswith(ANNOTATION_PREFIX)}
    out: list[_Raw] = []
    for field_name, (name, kind) in SPEC_FIELDS.items():
        value = cfg.spec.get(field_name)
        if value is None:
            continue
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            # The client cannot decode the object, so nothing it holds reaches Felix as
            # written: every value of this resource is unknown, not just this one.
            wanted = "boolean" if kind is bool else "number" if kind is int else "string"
            error = (f"spec.{field_name} of FelixConfiguration {cfg.name} holds "
                     f"{json.dumps(value, default=str)[:60]}, not a {wanted}; Felix's client "
                     "cannot decode the resource")
            return [_Raw(name=n, value=None, error=error, origin=f"spec.{field_name}")
                    for n, _k in SPEC_FIELDS.values()]
        if name in overrides:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out.append(_Raw(name=name, value=text, origin=f"spec.{field_name}"))
    for name, _kind in SPEC_FIELDS.values():
        if name in overrides:
            out.append(_Raw(name=name, value=overrides.pop(name),
                            origin=f"annotation {ANNOTATION_PREFIX}{name}"))
    out.extend(_Raw(name=k, value=v, origin=f"annotation {ANNOTATION_PREFIX}{k}")
               for k, v in overrides.items())
    return out


def _fc_source(cfg: FelixConfig, label: str) -> Callable[[str], _Candidate | None]:
    entries = felix_config_values(cfg)

    def step(param: str) -> _Candidate | None:
        cand = _pick(param, entries, f"FelixConfiguration {label}")
        if cand is None or cand.error:
            return cand
        entry = next(e for e in reversed(entries) if e.name.lower() == param and e.value)
        where = (f" annotation {ANNOTATION_PREFIX}{entry.name}"
                 if entry.origin.startswith("annotation") else "")
        return replace(cand, source=f"FelixConfiguration {label}{where}")
    return step


def _error_source(source: str, error: str) -> Callable[[str], _Candidate | None]:
    return lambda _param: _Candidate(source=source, raw=None, error=error)


# --- the datastore ---------------------------------------------------------------------------


def datastore_type(env: Sequence[EnvVar], file_values: Mapping[str, str] | None = None) -> str:
    """`kubernetes` or `etcdv3`, as Felix decides it from its environment and config file
    (config_params.go `DatastoreConfig`, libcalico-go apiconfig
    `LoadClientConfigFromEnvironment`)."""
    values = {e.name.upper(): (e.value or "") for e in env if e.value is not None}
    from_file = {k.lower(): v for k, v in (file_values or {}).items() if v}
    felix = values.get("FELIX_DATASTORETYPE") or from_file.get("datastoretype", "")
    if any(from_file.get(k) for k in ("etcdendpoints", "etcdaddr")):
        values.setdefault("FELIX_ETCDENDPOINTS", "<set>")
    if felix.lower() in ("etcdv3", "kubernetes"):
        return felix.lower()
    if any(values.get(k) for k in ("FELIX_ETCDENDPOINTS", "FELIX_ETCDADDR")):
        return "etcdv3"
    explicit = values.get("CALICO_DATASTORE_TYPE") or values.get("DATASTORE_TYPE") or ""
    if explicit:
        return explicit
    if values.get("CALICO_ETCD_ENDPOINTS") or values.get("ETCD_ENDPOINTS"):
        return "etcdv3"
    return "kubernetes"


def api_group(env: Sequence[EnvVar], discovered: str) -> str:
    """The API group Felix reads: CALICO_API_GROUP when set, else libcalico-go's discovery
    (libcalico-go/lib/backend/k8s/discovery.go `UsingV3CRDs`)."""
    explicit = next((e.value for e in env if e.name.upper() == "CALICO_API_GROUP" and e.value),
                    None)
    if explicit:
        return V3_GROUP if explicit.lower() == V3_GROUP else CRD_GROUP
    return discovered


def discovered_group(groups: Iterable[str]) -> str:
    """`projectcalico.org/v3` only when it is served and `crd.projectcalico.org` is not."""
    names = set(groups)
    return V3_GROUP if "projectcalico.org" in names and "crd.projectcalico.org" not in names \
        else CRD_GROUP


# --- selector-scoped FelixConfiguration ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SelectorProblem:
    config: str
    selector: str
    message: str


def compiled_selectors(configs: Iterable[FelixConfig]
                       ) -> tuple[list[tuple[FelixConfig, Selector]], list[SelectorProblem]]:
    """The selector-scoped resources (any name but `default` and `node.*`, with a non-empty
    nodeSelector) with their parsed selectors; one that does not parse is dropped on its own
    (felix/calc/config_batcher.go `onFelixConfigResourceUpdate`)."""
    good: list[tuple[FelixConfig, Selector]] = []
    bad: list[SelectorProblem] = []
    for cfg in configs:
        if cfg.name == "default" or cfg.name.startswith("node.") or not cfg.node_selector:
            continue
        try:
            good.append((cfg, parse_selector(cfg.node_selector)))
        except SelectorParseError as exc:
            bad.append(SelectorProblem(cfg.name, cfg.node_selector, str(exc)))
    return good, bad


def selector_winner(selectors: Sequence[tuple[FelixConfig, Selector]],
                    labels: Mapping[str, str] | None) -> tuple[FelixConfig | None, list[str]]:
    """The matching resource Felix uses, and the names of all that match: the oldest by
    creationTimestamp, ties by name (config_batcher.go `MergeSelectorConfigs`)."""
    if labels is None:
        return None, []
    matches = [cfg for cfg, sel in selectors if sel.evaluate(labels)]
    if not matches:
        return None, []
    return min(matches, key=lambda c: (c.created, c.name)), [c.name for c in matches]


# --- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FelixInputs:
    """What one Felix reads: its container's env and config file, and its version."""

    env: tuple[EnvVar, ...]
    config_file: ConfigFile
    image: str | None
    pod: str | None = None


def _chain(inputs: FelixInputs, sets: Mapping[str, FelixConfigSet], group: str,
           node: Node | None, scoped: FelixConfig | None
           ) -> list[Callable[[str], _Candidate | None]]:
    env = env_entries(inputs.env)
    cf = inputs.config_file
    steps: list[Callable[[str], _Candidate | None]] = [lambda p: _pick(p, env, "env")]
    file_source = f"config file {CONFIG_FILE} ({cf.origin})"
    if not cf.known:
        steps.append(_error_source(file_source,
                                   cf.error or "the config file's content cannot be read"))
    else:
        file_entries = [_Raw(name=k, value=v) for k, v in cf.values.items()]
        steps.append(lambda p: _pick(p, file_entries, file_source))
    store = datastore_type(inputs.env, cf.values if cf.known else None)
    chosen = api_group(inputs.env, group)
    found = sets.get(chosen)
    if store != "kubernetes":
        steps.append(_error_source(
            f"datastore ({store})",
            f"DATASTORE_TYPE is {store}: Felix reads FelixConfiguration from etcd, which "
            "felixscan cannot see" if store == "etcdv3" else
            f"datastore type {store!r} is not one Felix knows; Felix does not start"))
    elif found is None or found.error:
        reason = (found.error if found is not None and found.error
                  else f"{chosen} was not read")
        steps.append(_error_source(f"FelixConfiguration ({chosen})", reason))
    else:
        configs = {c.name: c for c in found.configs}
        if node is not None and f"node.{node.name}" in configs:
            steps.append(_fc_source(configs[f"node.{node.name}"], f"node.{node.name}"))
        if scoped is not None:
            steps.append(_fc_source(scoped, f"{scoped.name} (nodeSelector "
                                            f"{scoped.node_selector})"))
        if "default" in configs:
            steps.append(_fc_source(configs["default"], "default"))
    return steps


def _first(steps: Sequence[Callable[[str], _Candidate | None]], param: str
           ) -> _Candidate | None:
    for step in steps:
        cand = step(param)
        if cand is not None:
            return cand
    return None


def _declare(inputs: FelixInputs, steps: Sequence[Callable[[str], _Candidate | None]]
             ) -> Declared:
    version = felix_version(inputs.image)
    vtext = ".".join(map(str, version)) if version else None
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    unknown: dict[str, str] = {}
    raw_enabled: _Candidate | None = None
    invalid = False
    for param in PARAMS:
        cand = _first(steps, param)
        if cand is None:
            continue
        sources[param] = cand.source
        if cand.raw is None:
            unknown[param] = cand.error or "cannot be read"
            continue
        value, valid = parse_value(param, cand.raw)
        values[param] = value
        if param == ENABLED:
            raw_enabled, invalid = cand, not valid
    port = values.get(PORT, DEFAULT_PORT)
    assert isinstance(port, int)
    host = str(values.get(HOST, ""))
    tls_files = bool(values.get(CERT_FILE) or values.get(KEY_FILE))
    tls = tls_files and (version is None or version >= TLS_SINCE)
    client_auth: str | None = None
    if tls:
        if CLIENT_AUTH in values:
            client_auth = str(values[CLIENT_AUTH])
        elif version is not None:
            client_auth = ("RequireAndVerifyClientCert" if version[:2] == TLS_SINCE
                           else "NoClientCert")
    common = {"port": port, "port_source": sources.get(PORT, "built-in default"), "tls": tls,
              "host": host, "client_auth": client_auth, "pod": inputs.pod,
              "felix_version": vtext}
    if inputs.config_file.invalid:
        return Declared(enabled=None, source=f"config file {CONFIG_FILE} "
                        f"({inputs.config_file.origin})", reason="the config file is not valid "
                        f"INI ({inputs.config_file.invalid}); Felix does not start with it",
                        **common)  # type: ignore[arg-type]
    if ENABLED in unknown:
        return Declared(enabled=None, source=sources[ENABLED], reason=unknown[ENABLED],
                        **common)  # type: ignore[arg-type]
    if raw_enabled is None:
        declared = Declared(enabled=False, source="built-in default (false)",
                            **common)  # type: ignore[arg-type]
    else:
        declared = Declared(enabled=bool(values[ENABLED]), source=raw_enabled.source,
                            raw=None if raw_enabled.redacted else raw_enabled.raw,
                            invalid=invalid, **common)  # type: ignore[arg-type]
    if declared.enabled:
        # Where metrics are on, an unreadable port or host means we cannot aim the probe.
        for param in (PORT, HOST):
            if param in unknown:
                return replace(declared, enabled=None, reason=f"{param}: {unknown[param]}")
    return declared


@dataclass
class Resolver:
    """Resolves every node of one snapshot, sharing the work that nodes have in common."""

    snapshot: ClusterSnapshot
    use_pods: bool = True  # False: as the DaemonSet template would run (remediation planning)

    def __post_init__(self) -> None:
        snap = self.snapshot
        self.sets: dict[str, FelixConfigSet] = dict(snap.felix_sets) or {
            snap.felix_group: FelixConfigSet(group=snap.felix_group,
                                             configs=snap.felix_configs)}
        self.selectors: dict[str, tuple[list[tuple[FelixConfig, Selector]],
                                        list[SelectorProblem]]] = {
            g: compiled_selectors(s.configs) for g, s in self.sets.items()}
        self.template = FelixInputs(env=snap.env, config_file=snap.config_file, image=snap.image)
        self.pods: dict[str, list[Pod]] = {}
        for pod in snap.pods:
            if pod.node and pod.phase not in ("Succeeded", "Failed"):
                self.pods.setdefault(pod.node, []).append(pod)
        self._cache: dict[tuple[object, ...], Declared] = {}

    def inputs(self, pod: Pod | None) -> FelixInputs:
        if pod is None or not self.use_pods:
            return self.template
        return FelixInputs(env=pod.env if pod.env is not None else self.template.env,
                           config_file=pod.config_file or self.template.config_file,
                           image=pod.image or self.template.image, pod=pod.name)

    def resolve_inputs(self, inputs: FelixInputs, node: Node | None) -> Declared:
        group = api_group(inputs.env, self.snapshot.felix_group)
        selectors = self.selectors.get(group, ([], []))[0]
        labels = None if node is None else (node.labels or None)  # none at all: nil upstream
        winner, _ = selector_winner(selectors, labels)
        version = felix_version(inputs.image)
        per_host = node is not None and any(
            c.name == f"node.{node.name}" for c in (self.sets.get(group) or
                                                     FelixConfigSet(group)).configs)
        key = (id(inputs.env), id(inputs.config_file), inputs.image, group,
               node.name if per_host and node is not None else None,
               winner.name if winner else None)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._resolve(inputs, node, group, winner, version)
            self._cache[key] = cached
        return replace(cached, pod=inputs.pod) if cached.pod != inputs.pod else cached

    def _resolve(self, inputs: FelixInputs, node: Node | None, group: str,
                 winner: FelixConfig | None, version: tuple[int, int, int] | None) -> Declared:
        def run(scoped: FelixConfig | None) -> Declared:
            return _declare(inputs, _chain(inputs, self.sets, group, node, scoped))

        if winner is None or (version is not None and version >= SELECTOR_SINCE):
            return run(winner)
        ignored = run(None)
        if version is not None:
            return ignored  # older Felix ignores selector-scoped resources
        applied = run(winner)
        if applied.enabled == ignored.enabled:
            return applied
        return replace(ignored, enabled=None, source=f"FelixConfiguration {winner.name}",
                       reason=f"FelixConfiguration {winner.name} (nodeSelector) applies only "
                       "from Calico v3.32 and the calico-node image "
                       f"({inputs.image or 'none'}) names no version; with it metrics are "
                       f"{'on' if applied.enabled else 'off'}, without it "
                       f"{'on' if ignored.enabled else 'off'}")

    def node(self, node: Node) -> Declared:
        """A node's state: every calico-node pod on it (a surge rollout or a terminating pod
        can put two there); on if any is on, unknown if any is unknown. A node without one
        gets the template's state (what would run there)."""
        pods = sorted(self.pods.get(node.name, []), key=lambda p: p.name)
        if not pods or not self.use_pods:
            return self.resolve_inputs(self.template, node)
        states = [self.resolve_inputs(self.inputs(p), node) for p in pods]
        return (next((d for d in states if d.enabled), None)
                or next((d for d in states if d.enabled is None), None) or states[0])


def resolve(snapshot: ClusterSnapshot, node: Node | None, *, use_pods: bool = True) -> Declared:
    """The declared metrics state for one node (None: the template's global chain)."""
    resolver = Resolver(snapshot, use_pods=use_pods)
    return resolver.node(node) if node is not None else resolver.resolve_inputs(
        resolver.template, None)


def resolve_nodes(snapshot: ClusterSnapshot, *, use_pods: bool = True) -> dict[str, Declared]:
    resolver = Resolver(snapshot, use_pods=use_pods)
    return {node.name: resolver.node(node) for node in snapshot.nodes}


def selector_problems(snapshot: ClusterSnapshot) -> list[SelectorProblem]:
    sets = dict(snapshot.felix_sets) or {snapshot.felix_group: FelixConfigSet(
        group=snapshot.felix_group, configs=snapshot.felix_configs)}
    return [p for s in sets.values() for p in compiled_selectors(s.configs)[1]]


def cluster_declared(snapshot: ClusterSnapshot, per_node: Mapping[str, Declared]) -> Declared:
    """The cluster's declared state: the worst of its nodes, else the global chain."""
    base = resolve(snapshot, None)
    enabled = [d for d in per_node.values() if d.enabled]
    if enabled:
        first = enabled[0]
        if len(enabled) == len(per_node) and all(d.source == first.source for d in enabled):
            return first
        if base.enabled:
            return base
        return replace(first, source=f"{first.source} ({len(enabled)} of {len(per_node)} "
                       "nodes)")
    unknown = [d for d in per_node.values() if d.enabled is None]
    if unknown and base.enabled is not None:
        first = unknown[0]
        return replace(first, source=f"{first.source} ({len(unknown)} of {len(per_node)} "
                       "nodes)")
    return base
