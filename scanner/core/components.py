"""How Typha and calico-kube-controllers decide whether their metrics endpoints are on (pure).

These are the typha-metrics and kube-controllers-metrics controls; Felix's is scanner.core.calico.
docs/calico.md tabulates each rule with its upstream place and the test that pins it.

Typha (typha/pkg/daemon/daemon.go `LoadConfiguration`; typha/pkg/config): two sources only,
the environment (`LoadConfigFromEnvironment`: a `typha_` prefix in any case, the rest
lower-cased, one map key per lower-cased name) and the config file `/etc/calico/typha.cfg` or
`--config-file` (typha/cmd/typha/command.go; `LoadConfigFile`, gopkg.in/ini.v1, every section
merged; a file ini rejects keeps Typha retrying for ever). `Config.UpdateFrom` drops empty
values; `resolve` walks the environment, then the file's map in Go's random order. Unlike
Felix's, Typha's `resolve` looks a parameter's current source up by the *raw* name but records
it under the *canonical* one (`nameToSource[rawName]` / `nameToSource[name]`), so a file key
spelled other than exactly `PrometheusMetricsEnabled` finds no source recorded under its
spelling and overrides the environment, while the canonical spelling loses to it; of the file
keys that apply, any may come last. Every outcome those orders allow is worked out: one value,
or undetermined (unknown). `none` is the zero value; a value that does not parse becomes the
default. PrometheusMetricsEnabled `bool;false`, Port `int(0,65535);9093`
(`strconv.ParseInt(raw, 0, 32)`), Host `host-address;` (config_params.go `Config`). With a
cert or key file Typha serves HTTPS (daemon.go), from v3.32.0; PrometheusMetricsClientAuth
defaults to RequireAndVerifyClientCert in v3.32.x and NoClientCert from v3.33.

kube-controllers (kube-controllers/pkg/config/runconfig.go `mergeConfig`): the port is
KubeControllersConfiguration `default` `spec.prometheusMetricsPort` alone; nil is 0, and 0 is
off (kube-controllers/pkg/kubecontrollers/run.go `Run`: `if runCfg.PrometheusPort != 0`,
`ListenAndServe(":port")`, every interface of the pod). No environment variable sets it
(config.go `AllEnvs`). When `default` does not exist kube-controllers creates it
(`getOrCreateSnapshot`), and the client fills an absent port with 9094 on every Create and
Update (libcalico-go/lib/clientv3/kubecontrollersconfig.go `validateAndFillDefaults`): an absent
field is off only until the next update through a Calico client. The resource is read from the
datastore `LoadClientConfigFromEnvironment` picks (CALICO_DATASTORE_TYPE, else DATASTORE_TYPE,
else etcdv3 when ETCD_ENDPOINTS is set, else kubernetes); with ENABLED_CONTROLLERS naming
`flannelmigration` it is not read and no metrics server starts (run.go `Run`). Off has no port
of its own: the pods are probed on the default 9094.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from scanner.core.calico import image_version
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
    """The Typha parameter (lower-cased) an env var sets: the name lower-cased by Go's
    strings.ToLower, then a `typha_` prefix (typha/pkg/config/env_var_loader.go
    `LoadConfigFromEnvironment`)."""
    low = _go_to_lower(env_name)
    return low[len("typha_"):] if low.startswith("typha_") else None


def typha_client_auth_default(version: tuple[int, int, int] | None) -> str | None:
    """PrometheusMetricsClientAuth's default: RequireAndVerifyClientCert in v3.32.x
    (release-v3.32 typha/pkg/config/config_params.go), NoClientCert from v3.33 (master, #13072);
    None when the image names no version."""
    if version is None:
        return None
    return "RequireAndVerifyClientCert" if version[:2] == TYPHA_TLS_SINCE else "NoClientCert"


def _typha_default(param: str, version: tuple[int, int, int] | None) -> object:
    return typha_client_auth_default(version) if param == _CLIENT_AUTH else _DEFAULTS[param]


def typha_value(param: str, raw: str, *,
                version: tuple[int, int, int] | None = None) -> tuple[object, bool]:
    """One value as Typha's `resolve` turns it into the field: (value, valid).

    `none` in any case is the zero value; otherwise the parameter's parser
    (typha/pkg/config/param_types.go), a failure giving the default (for ClientAuth the
    default of `version`, None when that is not known)."""
    if _go_to_lower(raw) == "none":
        return _ZERO[param], True
    default = _typha_default(param, version)
    try:
        if param == _ENABLED:
            return _bool_parse(raw), True
        if param == _PORT:
            # IntParam.Parse: strconv.ParseInt(raw, 0, 32) (base prefixes, `_` after one, a
            # sign), then the tag's range int(0,65535).
            value = _go_parse_int64(raw)
            if value is None or not _INT32[0] <= value <= _INT32[1]:
                raise _ParseError(raw)
            if not 0 <= value <= 65535:
                raise _ParseError(raw)
            return value, True
        if param == _HOST:
            if _HOST_ADDRESS_RE.fullmatch(raw) is None:  # HostAddressRegexp
                raise _ParseError(raw)
            return raw, True
        if param == _CLIENT_AUTH:  # OneofListParam: lower-cased, mapped to the canonical option
            canonical = {_go_to_lower(o): o for o in _CLIENT_AUTH_OPTIONS}.get(_go_to_lower(raw))
            if canonical is None:
                raise _ParseError(raw)
            return canonical, True
        if _STRING_RE.fullmatch(raw) is None:  # StringRegexp `^.*$`: no newline
            raise _ParseError(raw)
        return raw, True
    except _ParseError:
        return default, False


@dataclass(frozen=True, slots=True)
class _Hit:
    value: str | None
    source: str
    raw: str | None  # None when redacted or unreadable
    error: str | None = None
    who: str = ""  # short name of the entry, for messages: `env TYPHA_X`, `key X`


def _env_choices(param: str, env: Sequence[EnvVar]) -> list[_Hit | None]:
    """What the environment source may hold for `param`: one entry per spelling of its name
    (None: empty, which `UpdateFrom` drops). The loader keys its map by the lower-cased name
    and the last spelling in the environment wins; the kubelet builds a container's
    environment from a map, so any spelling may be last. The same name twice: the later
    entry wins (kubelet)."""
    by_name: dict[str, EnvVar] = {}
    for e in env:
        if typha_param(e.name) == param.lower():
            by_name.pop(e.name, None)
            by_name[e.name] = e
    choices: list[_Hit | None] = []
    for e in by_name.values():
        origin = "" if e.origin in ("", "literal") else f" ({e.origin})"
        if e.error:
            choices.append(_Hit(None, f"env {e.name}{origin}", None, e.error, f"env {e.name}"))
        elif not e.value:
            choices.append(None)
        else:
            choices.append(_Hit(e.value, f"env {e.name}{origin}",
                                None if e.redacted else e.value, who=f"env {e.name}"))
    return choices


_STAND_IN_SET = "<set>"  # the collector's stand-in for a valid string read from a Secret


def _hit_value(param: str, hit: _Hit, version: tuple[int, int, int] | None
               ) -> tuple[object, bool]:
    """typha_value of a hit; a Secret's valid string is known only as set: a host or client
    auth whose text is not known (`<set>`, None), a certificate path that is set."""
    if hit.raw is None and hit.value == _STAND_IN_SET and param in (_HOST, _CLIENT_AUTH):
        return (_STAND_IN_SET if param == _HOST else None), True
    return typha_value(param, hit.value or "", version=version)


def _typha_hit(param: str, env: Sequence[EnvVar], cf: ConfigFile | None, label: str, *,
               version: tuple[int, int, int] | None = None) -> _Hit | None:
    """The value Typha ends with for `param` (None: no source sets it, the default).

    typha/pkg/config/config_params.go `Config.resolve` walks the environment, then the file's
    map (random order), each value overriding the last unless `source < currentSource`, where
    `currentSource = nameToSource[rawName]` but the value is recorded as
    `nameToSource[name]` (the canonical field name). So the file's canonical spelling
    `PrometheusMetricsEnabled` loses to an environment value, while any other spelling
    (`prometheusmetricsenabled`) finds nothing recorded under its own name and overrides the
    environment; among the file keys that apply, Go's map order picks the last. Every outcome
    that order allows is worked out: one value, or undetermined."""
    if cf is not None and not cf.known:
        return _Hit(None, label, None, cf.error or "the config file's content cannot be read")
    canon: _Hit | None = None
    others: list[_Hit] = []
    if cf is not None:
        for key, value in cf.values.items():
            if not value or _go_to_lower(key) != param.lower():
                continue  # UpdateFrom drops empty values
            if key == param:
                canon = _Hit(value, f"{label} key {key}", value, who=f"config file key {key}")
            else:
                others.append(_Hit(value, f"{label} key {key} (spelled other than {param}, so "
                                   "it overrides the environment: typha/pkg/config/"
                                   "config_params.go resolve)", value,
                                   who=f"config file key {key}"))
    outcomes: list[_Hit | None] = []
    for choice in _env_choices(param, env) or [None]:
        if choice is None:  # nothing in the environment: every file key applies
            outcomes.extend([*others, *([canon] if canon else [])] or [None])
        elif choice.error:  # set or not, unknown: the other spellings override it anyway
            outcomes.extend([*others, *([canon] if canon else [])] if others else [choice])
        elif others:
            # Another spelling overrides the environment's value and records the canonical
            # name at file level, so a canonical key walked after it applies too.
            outcomes.extend([*others, *([canon] if canon else [])])
        else:  # the environment's value stands
            outcomes.append(choice)
    errors = [h for h in outcomes if h is not None and h.error]
    if errors:
        return errors[0]
    meanings = {_hit_value(param, h, version)[0] if h is not None and h.value
                else _typha_default(param, version) for h in outcomes}
    if len(meanings) > 1:
        names = ", ".join(dict.fromkeys(h.who if h is not None else "no value (the default)"
                                        for h in outcomes))
        return _Hit(None, names, None, f"{names} give {param} different values and which one "
                    "Typha takes is undetermined (the kubelet's environment order, Go's map "
                    "order in typha/pkg/config/config_params.go resolve)")
    return next((h for h in outcomes if h is not None), None)


def component_version(image: str | None) -> tuple[int, int, int] | None:
    """Calico's version from any calico image reference (`.../calico/typha:v3.32.1`)."""
    return image_version(image)


def _vtext(image: str | None) -> str | None:
    v = component_version(image)
    return ".".join(map(str, v)) if v else None


def resolve_typha(env: Sequence[EnvVar], config_file: ConfigFile | None, *,
                  image: str | None = None, pod: str | None = None,
                  config_path: str = TYPHA_CONFIG_FILE) -> Declared:
    """Typha's declared metrics setting from one container's env and config file
    (`--config-file` or /etc/calico/typha.cfg: typha/cmd/typha/command.go, daemon.go
    `LoadConfiguration`)."""
    origin = config_file.origin if config_file is not None else ""
    if origin.startswith(f"path {config_path}, "):
        origin = origin[len(f"path {config_path}, "):]
    label = f"config file {config_path}" + (f" ({origin})" if config_file else "")
    version = component_version(image)
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    unknown: dict[str, str] = {}
    enabled_hit: _Hit | None = None
    invalid = False
    for param in TYPHA_PARAMS:
        hit = _typha_hit(param, env, config_file, label, version=version)
        if hit is None:
            continue
        sources[param] = hit.source
        if hit.value is None:
            unknown[param] = hit.error or "cannot be read"
            continue
        value, valid = _hit_value(param, hit, version)
        values[param] = value
        if param == _ENABLED:
            enabled_hit, invalid = hit, not valid
    port = values.get(_PORT, TYPHA_DEFAULT_PORT)
    assert isinstance(port, int)
    # daemon.go: `PrometheusMetricsKeyFile != "" || PrometheusMetricsCertFile != ""` serves
    # HTTPS; the parameters exist from v3.32.0 (older Typha ignores them as unknown).
    tls = bool(values.get(_CERT) or values.get(_KEY)) and (
        version is None or version >= TYPHA_TLS_SINCE)
    client_auth = values.get(_CLIENT_AUTH) if _CLIENT_AUTH in values else (
        None if _CLIENT_AUTH in unknown else typha_client_auth_default(version))
    common: dict[str, object] = {
        "port": port, "port_source": sources.get(_PORT, "built-in default"),
        "host": str(values.get(_HOST, "")), "tls": tls,
        "client_auth": None if not tls or client_auth is None else str(client_auth),
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
    """The `--config-file` path the collector recorded as `path <path>, <origin>`."""
    if cf is not None and cf.origin.startswith("path "):
        return cf.origin[len("path "):].split(", ", 1)[0]
    return TYPHA_CONFIG_FILE


def kube_controllers_declared(component: ComponentSnapshot,
                              pod: ComponentPod | None = None) -> Declared:
    """kube-controllers' declared metrics port: KubeControllersConfiguration `default` alone
    (kube-controllers/pkg/config/runconfig.go `mergeConfig`; no environment variable sets it:
    config.go `AllEnvs`). Before it reads that resource, kube-controllers picks its datastore
    (`LoadClientConfigFromEnvironment`) and, with ENABLED_CONTROLLERS naming flannelmigration,
    skips it altogether (run.go `Run`)."""
    env = pod.env if pod is not None and pod.env is not None else component.env
    image = pod.image if pod is not None and pod.image else component.image
    common: dict[str, object] = {"pod": pod.name if pod else None, "felix_version": _vtext(image),
                                 "host": ""}
    kcc = component.kcc
    off = _kc_flannel_migration(env)
    if off is not None:
        return off(common)
    store, why = _kc_datastore(env)
    if store != "kubernetes":
        return Declared(enabled=None, source=why, port=KUBE_CONTROLLERS_DEFAULT_PORT,
                        port_source="unknown",
                        reason=f"kube-controllers reads KubeControllersConfiguration from etcd "
                        f"({why}), which felixscan cannot see" if store == "etcdv3" else
                        why if store is None else f"{why} is not a datastore type libcalico-go "
                        "knows (backend/client.go NewClient): kube-controllers exits",
                        **common)  # type: ignore[arg-type]
    if kcc is None or kcc.error:
        reason = kcc.error if kcc is not None else "KubeControllersConfiguration was not read"
        return Declared(enabled=None, source="KubeControllersConfiguration default",
                        port=KUBE_CONTROLLERS_DEFAULT_PORT, port_source="unknown",
                        reason=reason, **common)  # type: ignore[arg-type]
    if not kcc.exists:
        # runconfig.go getOrCreateSnapshot creates it from NewDefaultKubeControllersConfig (no
        # port), and the client's Create fills the absent port with 9094
        # (kubecontrollersconfig.go validateAndFillDefaults).
        return Declared(enabled=True, source="KubeControllersConfiguration default (absent: "
                        "kube-controllers creates it with prometheusMetricsPort 9094)",
                        port=KUBE_CONTROLLERS_DEFAULT_PORT, port_source="client default (9094)",
                        raw=None, **common)  # type: ignore[arg-type]
    return kcc_port_declared(kcc, common)


KCC_PORT_FIELD = "KubeControllersConfiguration default spec.prometheusMetricsPort"
_OFF_PROBED = (f"0 is off (run.go Run: `if runCfg.PrometheusPort != 0`); probed on the default "
               f"{KUBE_CONTROLLERS_DEFAULT_PORT}")


def kcc_port_declared(kcc: KubeControllersConfig, common: Mapping[str, object]) -> Declared:
    """What kube-controllers does with spec.prometheusMetricsPort as served. Off (nil or 0) has
    no port of its own, so the probe checks the default 9094, where a stale pod or the next
    update through a Calico client would open it."""
    field = KCC_PORT_FIELD
    port = kcc.port
    if port is None:  # mergeConfig copies the port only when the pointer is non-nil
        return Declared(enabled=False, source=f"{field} (absent: 0, off)",
                        port=KUBE_CONTROLLERS_DEFAULT_PORT,
                        port_source=f"{field} absent: {_OFF_PROBED}",
                        **common)  # type: ignore[arg-type]
    if isinstance(port, float) and port.is_integer():
        # The API server keeps a CR's JSON numbers as int64 or float64 and writes float64 9094
        # back as `9094`: what kube-controllers decodes is the integer.
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int):
        return Declared(enabled=None, source=field, port=KUBE_CONTROLLERS_DEFAULT_PORT,
                        port_source=field, reason=f"{field} holds {port!r}, not a number: "
                        "kube-controllers cannot decode the resource",
                        **common)  # type: ignore[arg-type]
    if port == 0:
        return Declared(enabled=False, source=field, port=KUBE_CONTROLLERS_DEFAULT_PORT,
                        port_source=f"{field} {_OFF_PROBED}", raw="0",
                        **common)  # type: ignore[arg-type]
    if not 0 < port <= 65535:
        return Declared(enabled=None, source=field, port=KUBE_CONTROLLERS_DEFAULT_PORT,
                        port_source=field, raw=str(port), reason=f"{field} is {port}, not a "
                        "port: kube-controllers' ListenAndServe fails and it exits",
                        **common)  # type: ignore[arg-type]
    return Declared(enabled=True, source=field, port=port, port_source=field, raw=str(port),
                    **common)  # type: ignore[arg-type]


def _kc_env(env: Iterable[EnvVar], name: str) -> EnvVar | None:
    """The entry os.LookupEnv(name) finds: the exact name, the later duplicate winning."""
    found: EnvVar | None = None
    for e in env:
        if e.name == name:
            found = e
    return found


def _kc_datastore(env: Iterable[EnvVar]) -> tuple[str | None, str]:
    """(datastore, why) as kube-controllers' Calico client picks it (libcalico-go/lib/apiconfig
    load.go `LoadClientConfigFromEnvironment`: envconfig with prefix `calico`, so
    CALICO_DATASTORE_TYPE, else DATASTORE_TYPE; `applyConfigDefaults`: when that is empty,
    etcdv3 if CALICO_ETCD_ENDPOINTS / ETCD_ENDPOINTS is set, else kubernetes). None: an
    entry that decides it cannot be read."""
    env = list(env)
    entry = _kc_env(env, "CALICO_DATASTORE_TYPE") or _kc_env(env, "DATASTORE_TYPE")
    if entry is not None:
        if entry.error:
            return None, f"env {entry.name} ({entry.origin}) cannot be read: {entry.error}"
        if entry.value:
            return entry.value, f"env {entry.name}={entry.value}"
    endpoints = _kc_env(env, "CALICO_ETCD_ENDPOINTS") or _kc_env(env, "ETCD_ENDPOINTS")
    if endpoints is not None:
        if endpoints.error:
            return None, (f"env {endpoints.name} ({endpoints.origin}) cannot be read: "
                          f"{endpoints.error}")
        if endpoints.value:
            return "etcdv3", f"env {endpoints.name} (no datastore type: etcdv3)"
    return "kubernetes", "kubernetes (the default)"


def _kc_flannel_migration(env: Iterable[EnvVar]) -> Callable[[Mapping[str, object]],
                                                             Declared] | None:
    """run.go `Run`: ENABLED_CONTROLLERS containing `flannelmigration` runs only the Flannel
    migration controller, whose run config has no metrics port (off); with any other
    controller beside it kube-controllers exits (Fatal). Either way nothing listens."""
    entry = _kc_env(env, "ENABLED_CONTROLLERS")
    if entry is None or entry.error or "flannelmigration" not in (entry.value or ""):
        return None
    alone = (entry.value or "").strip(" ,") == "flannelmigration"
    source = (f"env ENABLED_CONTROLLERS={entry.value} (Flannel migration mode: no metrics "
              "server)" if alone else f"env ENABLED_CONTROLLERS={entry.value} "
              "(flannelmigration with other controllers: kube-controllers exits)")

    def declare(common: Mapping[str, object]) -> Declared:
        return Declared(enabled=False, source=source, port=KUBE_CONTROLLERS_DEFAULT_PORT,
                        port_source=f"no metrics server; probed on the default "
                        f"{KUBE_CONTROLLERS_DEFAULT_PORT}", raw=entry.value,
                        **common)  # type: ignore[arg-type]
    return declare


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
