"""How Typha and calico-kube-controllers decide whether their metrics endpoints are on (pure).

These are the typha-metrics and kube-controllers-metrics controls; Felix's is scanner.core.calico.
docs/calico.md tabulates each rule with its upstream place and the test that pins it.

Typha (typha/pkg/daemon/daemon.go `LoadConfiguration`; typha/pkg/config): two sources only,
the environment (`LoadConfigFromEnvironment`: a `typha_` prefix in any case, the rest
lower-cased) and the config file `/etc/calico/typha.cfg` or `--config-file` (`LoadConfigFile`,
gopkg.in/ini.v1, every section merged). `Config.UpdateFrom` drops empty values; `resolve`
walks the sources environment first. Unlike Felix's, Typha's `resolve` looks a parameter's
current source up by the *raw* name but records it under the *canonical* one
(`nameToSource[rawName]` / `nameToSource[name]`), so a config-file key spelled other than
exactly `PrometheusMetricsEnabled` finds no source recorded under its spelling and overrides
the environment; the canonical spelling does not. `none` is the zero value; a value that does
not parse becomes the default. PrometheusMetricsEnabled `bool;false`, Port `int(0,65535);9093`
(`strconv.ParseInt(raw, 0, 32)`), Host `host-address;` (config_params.go `Config`). With a
cert or key file Typha serves HTTPS (daemon.go `Start`).

kube-controllers (kube-controllers/pkg/config/runconfig.go `mergeConfig`): the port is
KubeControllersConfiguration `default` `spec.prometheusMetricsPort` alone; nil is 0, and 0 is
off (kube-controllers/pkg/kubecontrollers/run.go `Run`: `if runCfg.PrometheusPort != 0`,
`ListenAndServe(":port")`, every interface of the pod). No environment variable sets it
(config.go `AllEnvs`). When `default` does not exist kube-controllers creates it
(`getOrCreateSnapshot`), and the client fills an absent port with 9094 on every Create and
Update (libcalico-go/lib/clientv3/kubecontrollersconfig.go `validateAndFillDefaults`): an absent
field is off only until the next update through a Calico client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from scanner.core.felix_params import (
    _HOST_ADDRESS_RE,
    _STRING_RE,
    _bool_parse,
    _go_parse_int64,
    _go_to_lower,
    _ParseError,
)
from scanner.core.records import (
    KUBE_CONTROLLERS,
    TYPHA,
    ComponentPod,
    ComponentSnapshot,
    ConfigFile,
    Declared,
    EnvVar,
    Installation,
    KubeControllersConfig,
    Node,
    ProbeTarget,
)

TYPHA_CONFIG_FILE = "/etc/calico/typha.cfg"  # typha/pkg/daemon/daemon.go DefaultConfigFile
TYPHA_DEFAULT_PORT = 9093
KUBE_CONTROLLERS_DEFAULT_PORT = 9094  # kubecontrollersconfig.go validateAndFillDefaults
TYPHA_TLS_SINCE = (3, 32)  # Typha's metrics certificate parameters exist from v3.32.0

_ENABLED = "PrometheusMetricsEnabled"
_PORT = "PrometheusMetricsPort"
_HOST = "PrometheusMetricsHost"
_CERT = "PrometheusMetricsCertFile"
_KEY = "PrometheusMetricsKeyFile"
_CLIENT_AUTH = "PrometheusMetricsClientAuth"
TYPHA_PARAMS = (_ENABLED, _PORT, _HOST, _CERT, _KEY, _CLIENT_AUTH)
_CLIENT_AUTH_OPTIONS = ("RequireAndVerifyClientCert", "RequireAnyClientCert",
                        "VerifyClientCertIfGiven", "NoClientCert")
_DEFAULTS: dict[str, object] = {_ENABLED: False, _PORT: TYPHA_DEFAULT_PORT, _HOST: "",
                                _CERT: "", _KEY: "", _CLIENT_AUTH: "NoClientCert"}
_ZERO: dict[str, object] = {_ENABLED: False, _PORT: 0, _HOST: "", _CERT: "", _KEY: "",
                            _CLIENT_AUTH: ""}
_INT32 = (-(1 << 31), (1 << 31) - 1)


def typha_param(env_name: str) -> str | None:
    """The Typha parameter (lower-cased) an env var sets: a `typha_` prefix in any case
    (typha/pkg/config/env_var_loader.go `LoadConfigFromEnvironment`)."""
    low = env_name.lower()
    return low[len("typha_"):] if low.startswith("typha_") else None


def typha_value(param: str, raw: str) -> tuple[object, bool]:
    """One value as Typha's `resolve` turns it into the field: (value, valid).

    `none` in any case is the zero value; otherwise the parameter's parser
    (typha/pkg/config/param_types.go), a failure giving the default."""
    if _go_to_lower(raw) == "none":
        return _ZERO[param], True
    try:
        if param == _ENABLED:
            return _bool_parse(raw), True
        if param == _PORT:
            value = _go_parse_int64(raw)  # base 0, underscores after a prefix, as ParseInt
            if value is None or not _INT32[0] <= value <= _INT32[1]:  # bitSize 32
                raise _ParseError(raw)
            if not 0 <= value <= 65535:
                raise _ParseError(raw)
            return value, True
        if param == _HOST:
            if _HOST_ADDRESS_RE.fullmatch(raw) is None:
                raise _ParseError(raw)
            return raw, True
        if param == _CLIENT_AUTH:
            if raw not in _CLIENT_AUTH_OPTIONS:  # OneofListParam: exact, case-insensitive
                low = {o.lower(): o for o in _CLIENT_AUTH_OPTIONS}
                if raw.lower() not in low:
                    raise _ParseError(raw)
                return low[raw.lower()], True
            return raw, True
        if _STRING_RE.fullmatch(raw) is None or "\n" in raw:
            raise _ParseError(raw)
        return raw, True
    except _ParseError:
        return _DEFAULTS[param], False


@dataclass(frozen=True, slots=True)
class _Hit:
    value: str | None
    source: str
    raw: str | None  # None when redacted or unreadable
    error: str | None = None


def _env_hit(param: str, env: Sequence[EnvVar]) -> _Hit | None:
    """The environment's value of `param`, as the loader's map holds it. Spellings of one name
    that disagree are undetermined: the kubelet builds a container's environment from a map."""
    hits = [e for e in env if typha_param(e.name) == param.lower()]
    bad = next((e for e in hits if e.error), None)
    if bad is not None:
        return _Hit(None, f"env {bad.name} ({bad.origin})", None, bad.error)
    if len({e.name for e in hits}) > 1 and any(not e.value for e in hits) \
            and any(e.value for e in hits):
        names = ", ".join(dict.fromkeys(e.name for e in hits))
        return _Hit(None, f"env {names}", None, f"{names} set the same Typha parameter, some "
                    "empty; which one Typha keeps depends on the order of its environment")
    hits = [e for e in hits if e.value]
    if not hits:
        return None
    meanings = {typha_value(param, e.value or "") for e in hits}
    if len(meanings) > 1:
        names = ", ".join(dict.fromkeys(e.name for e in hits))
        return _Hit(None, f"env {names}", None, f"{names} set the same Typha parameter to "
                    "different values; which one Typha takes is undetermined")
    e = hits[-1]
    origin = "" if e.origin in ("", "literal") else f" ({e.origin})"
    return _Hit(e.value, f"env {e.name}{origin}", None if e.redacted else e.value)


def _file_hits(param: str, cf: ConfigFile, label: str) -> tuple[_Hit | None, _Hit | None]:
    """(canonical spelling, other spellings) of `param` in the config file, empties dropped.
    Other spellings are returned only as one agreed value, or an undetermined error."""
    canon = cf.values.get(param) or None
    others = [(k, v) for k, v in cf.values.items() if k.lower() == param.lower() and k != param
              and v]
    canon_hit = _Hit(canon, f"{label} key {param}", canon) if canon else None
    if not others:
        return canon_hit, None
    # Typha walks the file's map in random order: every other spelling, and the canonical
    # one with them, may be the one kept (`resolve`, see the module docstring).
    competing = [*others, *([(param, canon)] if canon else [])]
    names = ", ".join(k for k, _ in competing)
    if len({typha_value(param, v) for _, v in competing}) > 1:
        return canon_hit, _Hit(None, f"{label} keys {names}", None,
                               f"{label} spells {param} as {names} with different values; "
                               "which one Typha takes is undetermined (Go map order)")
    key, value = others[-1]
    return canon_hit, _Hit(value, f"{label} key {key} (spelled other than {param}, so it "
                           "overrides the environment: typha/pkg/config/config_params.go "
                           "resolve)", value)


def _typha_hit(param: str, env: Sequence[EnvVar], cf: ConfigFile | None,
               label: str) -> _Hit | None:
    if cf is not None and not cf.known:
        return _Hit(None, label, None, cf.error or "the config file's content cannot be read")
    canon, other = _file_hits(param, cf, label) if cf is not None else (None, None)
    if other is not None:
        return other
    return _env_hit(param, env) or canon


def component_version(image: str | None) -> tuple[int, int, int] | None:
    """Calico's version from any calico image reference (`.../calico/typha:v3.32.1`)."""
    import re

    if not image:
        return None
    ref = image.split("@", 1)[0]
    _repo, _, tag = ref.rpartition(":")
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)(?:[-+].*)?", tag)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def _vtext(image: str | None) -> str | None:
    v = component_version(image)
    return ".".join(map(str, v)) if v else None


def resolve_typha(env: Sequence[EnvVar], config_file: ConfigFile | None, *,
                  image: str | None = None, pod: str | None = None,
                  config_path: str = TYPHA_CONFIG_FILE) -> Declared:
    """Typha's declared metrics setting from one container's env and config file."""
    label = f"config file {config_path}" + (f" ({config_file.origin})" if config_file else "")
    version = component_version(image)
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    unknown: dict[str, str] = {}
    enabled_hit: _Hit | None = None
    invalid = False
    for param in TYPHA_PARAMS:
        hit = _typha_hit(param, env, config_file, label)
        if hit is None:
            continue
        sources[param] = hit.source
        if hit.value is None:
            unknown[param] = hit.error or "cannot be read"
            continue
        value, valid = typha_value(param, hit.value)
        values[param] = value
        if param == _ENABLED:
            enabled_hit, invalid = hit, not valid
    port = values.get(_PORT, TYPHA_DEFAULT_PORT)
    assert isinstance(port, int)
    tls = bool(values.get(_CERT) or values.get(_KEY)) and (
        version is None or version >= TYPHA_TLS_SINCE)
    common: dict[str, object] = {
        "port": port, "port_source": sources.get(_PORT, "built-in default"),
        "host": str(values.get(_HOST, "")), "tls": tls,
        "client_auth": str(values.get(_CLIENT_AUTH, "NoClientCert")) if tls else None,
        "pod": pod, "felix_version": _vtext(image)}
    if config_file is not None and config_file.invalid:
        return Declared(enabled=None, source=label, reason="the config file is not valid INI "
                        f"({config_file.invalid}); Typha retries loading it and never starts",
                        **common)  # type: ignore[arg-type]
    if _ENABLED in unknown:
        return Declared(enabled=None, source=sources[_ENABLED], reason=unknown[_ENABLED],
                        **common)  # type: ignore[arg-type]
    if enabled_hit is None:
        declared = Declared(enabled=False, source="built-in default (false)",
                            **common)  # type: ignore[arg-type]
    else:
        declared = Declared(enabled=bool(values[_ENABLED]), source=enabled_hit.source,
                            raw=enabled_hit.raw, invalid=invalid,
                            **common)  # type: ignore[arg-type]
    if declared.enabled:
        for param in (_PORT, _HOST):
            if param in unknown:
                return Declared(enabled=None, source=declared.source,
                                reason=f"{param}: {unknown[param]}",
                                **common)  # type: ignore[arg-type]
    return declared


def typha_declared(component: ComponentSnapshot, pod: ComponentPod | None,
                   installation: Installation | None = None) -> Declared:
    """A Typha pod's declared state from its own spec (None: the Deployment's template)."""
    env = pod.env if pod is not None and pod.env is not None else component.env
    cf = pod.config_file if pod is not None and pod.config_file is not None \
        else component.config_file
    image = pod.image if pod is not None and pod.image else component.image
    return resolve_typha(env, cf, image=image, pod=pod.name if pod else None,
                         config_path=_config_path(cf))


def _config_path(cf: ConfigFile | None) -> str:
    if cf is not None and cf.origin.startswith("path "):
        return cf.origin.split(" ", 2)[1]
    return TYPHA_CONFIG_FILE


def kube_controllers_declared(component: ComponentSnapshot,
                              pod: ComponentPod | None = None) -> Declared:
    """kube-controllers' declared metrics port: KubeControllersConfiguration `default` alone."""
    env = pod.env if pod is not None and pod.env is not None else component.env
    image = pod.image if pod is not None and pod.image else component.image
    common: dict[str, object] = {"pod": pod.name if pod else None, "felix_version": _vtext(image),
                                 "host": ""}
    kcc = component.kcc
    store = _kc_datastore(env)
    if store is not None and store != "kubernetes":
        return Declared(enabled=None, source=f"env DATASTORE_TYPE={store}",
                        port=KUBE_CONTROLLERS_DEFAULT_PORT, port_source="unknown",
                        reason=f"kube-controllers reads KubeControllersConfiguration from "
                        f"{store}, which felixscan cannot see", **common)  # type: ignore[arg-type]
    if kcc is None or kcc.error:
        reason = kcc.error if kcc is not None else "KubeControllersConfiguration was not read"
        return Declared(enabled=None, source="KubeControllersConfiguration default",
                        port=KUBE_CONTROLLERS_DEFAULT_PORT, port_source="unknown",
                        reason=reason, **common)  # type: ignore[arg-type]
    if not kcc.exists:
        return Declared(enabled=True, source="KubeControllersConfiguration default (absent: "
                        "kube-controllers creates it with prometheusMetricsPort 9094)",
                        port=KUBE_CONTROLLERS_DEFAULT_PORT, port_source="client default (9094)",
                        raw=None, **common)  # type: ignore[arg-type]
    return kcc_port_declared(kcc, common)


def kcc_port_declared(kcc: KubeControllersConfig, common: Mapping[str, object]) -> Declared:
    field = "KubeControllersConfiguration default spec.prometheusMetricsPort"
    port = kcc.port
    if port is None:
        return Declared(enabled=False, source=f"{field} (absent: 0, off)", port=0,
                        port_source=f"{field} (absent)", **common)  # type: ignore[arg-type]
    if isinstance(port, float) and port.is_integer():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int):
        return Declared(enabled=None, source=field, port=KUBE_CONTROLLERS_DEFAULT_PORT,
                        port_source=field, reason=f"{field} holds {port!r}, not a number: "
                        "kube-controllers cannot decode the resource",
                        **common)  # type: ignore[arg-type]
    if port == 0:
        return Declared(enabled=False, source=field, port=0, port_source=field, raw="0",
                        **common)  # type: ignore[arg-type]
    if not 0 < port <= 65535:
        return Declared(enabled=None, source=field, port=KUBE_CONTROLLERS_DEFAULT_PORT,
                        port_source=field, raw=str(port), reason=f"{field} is {port}, not a "
                        "port: kube-controllers cannot listen there and exits",
                        **common)  # type: ignore[arg-type]
    return Declared(enabled=True, source=field, port=port, port_source=field, raw=str(port),
                    **common)  # type: ignore[arg-type]


def _kc_datastore(env: Iterable[EnvVar]) -> str | None:
    """DATASTORE_TYPE as kube-controllers' envconfig reads it (kube-controllers/pkg/config/
    config.go `DatastoreType`, default etcdv3 upstream; the manifests set kubernetes)."""
    value: str | None = None
    for e in env:
        if e.name == "DATASTORE_TYPE" and e.value:
            value = e.value
    return value if value is not None else None


def declared_for(component: ComponentSnapshot, pod: ComponentPod | None,
                 installation: Installation | None = None) -> Declared:
    if component.control == TYPHA:
        return typha_declared(component, pod, installation)
    if component.control == KUBE_CONTROLLERS:
        return kube_controllers_declared(component, pod)
    raise ValueError(f"not a component control: {component.control}")


def running_pods(component: ComponentSnapshot) -> list[ComponentPod]:
    """The pods that may be serving: not finished (a terminating pod still runs)."""
    return sorted((p for p in component.pods if p.phase not in ("Succeeded", "Failed")),
                  key=lambda p: p.name)


def component_targets(component: ComponentSnapshot, declared: Mapping[str, Declared],
                      nodes: Mapping[str, Node], *,
                      address_types: Sequence[str] = ("InternalIP",)) -> list[ProbeTarget]:
    """Where each pod's endpoint would listen: the node's addresses for a host-network pod
    (Typha), the pod IP otherwise (kube-controllers); on the port the pod's spec declares. A
    pod that is not on a node yet, or has no address, gets a target without an address."""
    targets: list[ProbeTarget] = []
    for pod in running_pods(component):
        d = declared[pod.name]
        if not d.port:
            continue
        for address in pod_addresses(pod, nodes, address_types):
            targets.append(ProbeTarget(node=pod.node or f"(pod {pod.name})", address=address,
                                       port=d.port))
    return list(dict.fromkeys(targets))


def pod_addresses(pod: ComponentPod, nodes: Mapping[str, Node],
                  address_types: Sequence[str]) -> list[str | None]:
    if not pod.host_network:
        return [pod.pod_ip] if pod.pod_ip else [None]
    node = nodes.get(pod.node or "")
    if node is None:
        return [pod.pod_ip] if pod.pod_ip else [None]
    found: list[str | None] = list(dict.fromkeys(
        addr for typ, addr in node.addresses if typ in address_types))
    return found or ([pod.pod_ip] if pod.pod_ip else [None])
