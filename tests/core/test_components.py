"""One test per upstream rule of how Typha and calico-kube-controllers decide their metrics
endpoints, on plain data (scanner.core.components).

Each docstring names the upstream file and function it pins (projectcalico/calico, read at
master of August 2026 and the release-v3.32 / release-v3.33 branches where they differ).
docs/calico.md ("Typha", "kube-controllers") links each rule here.
"""

from __future__ import annotations

import pytest

from scanner.core.components import (
    KUBE_CONTROLLERS_DEFAULT_PORT,
    TYPHA_CONFIG_FILE,
    TYPHA_DEFAULT_PORT,
    kube_controllers_declared,
    resolve_typha,
    typha_client_auth_default,
    typha_declared,
    typha_param,
    typha_value,
)
from scanner.core.felix_params import ConfigFileError, load_config_file
from scanner.core.records import (
    KUBE_CONTROLLERS,
    TYPHA,
    ComponentPod,
    ComponentSnapshot,
    ConfigFile,
    Declared,
    EnvVar,
    KubeControllersConfig,
)

IMAGE = "quay.io/calico/typha:v3.32.1"
ENABLED = "PrometheusMetricsEnabled"
PORT = "PrometheusMetricsPort"
HOST = "PrometheusMetricsHost"
CLIENT_AUTH = "PrometheusMetricsClientAuth"


def env(name: str, value: str | None, origin: str = "literal", **kw: object) -> EnvVar:
    return EnvVar(name=name, value=value, origin=origin, **kw)  # type: ignore[arg-type]


def en(value: str | None, *args: str, **kw: object) -> EnvVar:
    return env("TYPHA_PROMETHEUSMETRICSENABLED", value, *args, **kw)


def pt(value: str | None, *args: str, **kw: object) -> EnvVar:
    return env("TYPHA_PROMETHEUSMETRICSPORT", value, *args, **kw)


def cfg(values: dict[str, str] | None = None, **kw: object) -> ConfigFile:
    return ConfigFile(known=kw.pop("known", True), values=values or {},  # type: ignore[arg-type]
                      origin=kw.pop("origin", "configmap kube-system/typha-cfg[typha.cfg]"),  # type: ignore[arg-type]
                      **kw)  # type: ignore[arg-type]


def typha(*entries: EnvVar, file: ConfigFile | None = None, image: str | None = IMAGE,
          **kw: object) -> Declared:
    return resolve_typha(entries, file, image=image, **kw)  # type: ignore[arg-type]


def kc(kcc: KubeControllersConfig | None, *entries: EnvVar) -> Declared:
    component = ComponentSnapshot(control=KUBE_CONTROLLERS, namespace="kube-system",
                                  deployment="calico-kube-controllers",
                                  container="calico-kube-controllers", found=True,
                                  image="calico/kube-controllers:v3.32.1", env=entries, kcc=kcc)
    return kube_controllers_declared(component)


def kcc(port: object = None, *, exists: bool = True, error: str | None = None
        ) -> KubeControllersConfig:
    return KubeControllersConfig(exists=exists, port=port, resource_version="7", error=error)


# --- Typha: the environment --------------------------------------------------------------------


def test_typha_prefix_any_case_and_names_lower_cased() -> None:
    """typha/pkg/config/env_var_loader.go `LoadConfigFromEnvironment`: the name is lower-cased
    (strings.ToLower), must then start with `typha_`, and the rest is the parameter; resolve
    looks parameters up lower-cased (`knownParams[strings.ToLower(rawName)]`)."""
    assert typha_param("TYPHA_PROMETHEUSMETRICSENABLED") == "prometheusmetricsenabled"
    assert typha_param("Typha_PrometheusMetricsPort") == "prometheusmetricsport"
    assert typha_param("tYpHa_prometheusmetricshost") == "prometheusmetricshost"
    assert typha_param("TYPHAPROMETHEUSMETRICSENABLED") is None
    assert typha_param("FELIX_PROMETHEUSMETRICSENABLED") is None
    d = typha(env("typha_PrometheusMetricsEnabled", "true"),
              env("TYPHA_prometheusmetricsPORT", "9200"),
              env("FELIX_PROMETHEUSMETRICSENABLED", "false"))
    assert d.enabled is True and d.source == "env typha_PrometheusMetricsEnabled"
    assert d.port == 9200 and d.port_source == "env TYPHA_prometheusmetricsPORT"


def test_typha_empty_values_are_dropped_and_the_next_source_decides() -> None:
    """typha/pkg/config/config_params.go `Config.UpdateFrom`: a `""` value is skipped before
    `resolve` ("Ignoring empty configuration parameter"), in the environment and in the file."""
    d = typha(en(""), file=cfg({ENABLED: "true"}))
    assert d.enabled is True and d.source.endswith(f"key {ENABLED}")
    d = typha(en("true"), file=cfg({"prometheusmetricsenabled": ""}))
    assert d.enabled is True and d.source == "env TYPHA_PROMETHEUSMETRICSENABLED"
    d = typha(en(""), pt(""))
    assert d.enabled is False and d.source == "built-in default (false)"
    assert d.port == TYPHA_DEFAULT_PORT and not d.invalid


def test_typha_env_spellings_that_disagree_are_undetermined() -> None:
    """env_var_loader.go `LoadConfigFromEnvironment` keys its map by the lower-cased name, so
    of two spellings the one later in the environment wins, and the kubelet builds that
    environment from a map (any order). Spellings that mean the same are determined; an empty
    one drops out (`UpdateFrom`), leaving the next source, which may or may not agree."""
    d = typha(en("true"),
              env("typha_prometheusmetricsenabled", "false"))
    assert d.enabled is None and "undetermined" in (d.reason or "")
    d = typha(en("true"),
              env("typha_prometheusmetricsenabled", "yes"))
    assert d.enabled is True
    d = typha(en("true"),
              env("typha_prometheusmetricsenabled", ""))
    assert d.enabled is None  # true, or (the empty one last) the default false
    d = typha(en("false"),
              env("typha_prometheusmetricsenabled", ""))
    assert d.enabled is False  # false either way
    d = typha(en("true"),
              en("false"))
    assert d.enabled is False  # the same name twice: the kubelet keeps the later


def test_typha_value_from_errors_are_unknown() -> None:
    """A `valueFrom` the scanner cannot read is a value Typha has (`UpdateFrom`, `resolve`) but
    felixscan does not: unknown, never guessed. An unreadable port with metrics on means the
    probe cannot be aimed; with metrics off it does not matter. A file key spelled other than
    the field overrides the environment whatever it says (config_params.go `resolve`)."""
    missing = en(None, "configmap kube-system/x[k]",
                  error="configmap kube-system/x is missing")
    d = typha(missing)
    assert d.enabled is None and "missing" in (d.reason or "")
    port = pt(None, "secret kube-system/s[p]", error="403")
    assert typha(en("true"), port).enabled is None
    assert typha(en("false"), port).enabled is False
    d = typha(missing, file=cfg({"prometheusMetricsEnabled": "false"}))
    assert d.enabled is False and "prometheusMetricsEnabled" in d.source
    assert typha(missing, file=cfg({ENABLED: "false"})).enabled is None


# --- Typha: the config file and the resolve quirk ----------------------------------------------


def test_typha_file_key_spelled_otherwise_overrides_env() -> None:
    """typha/pkg/config/config_params.go `Config.resolve`: `currentSource :=
    nameToSource[rawName]` but `nameToSource[name] = source` (the canonical name). An env
    value is recorded under `PrometheusMetricsEnabled`; the file key `prometheusmetricsenabled`
    finds no source under its own spelling, so it is applied after the env and wins."""
    d = typha(en("false"),
              file=cfg({"prometheusmetricsenabled": "true"}))
    assert d.enabled is True and "key prometheusmetricsenabled" in d.source
    assert "overrides the environment" in d.source
    d = typha(pt("9200"), en("true"),
              file=cfg({"PROMETHEUSMETRICSPORT": "9300"}))
    assert d.port == 9300


def test_typha_file_canonical_spelling_loses_to_env() -> None:
    """config_params.go `Config.resolve`: for the key `PrometheusMetricsEnabled`,
    `nameToSource[rawName]` is the environment's, so `source < currentSource` skips it; with
    nothing in the environment the file's value stands."""
    d = typha(en("false"), file=cfg({ENABLED: "true"}))
    assert d.enabled is False and d.source == "env TYPHA_PROMETHEUSMETRICSENABLED"
    d = typha(file=cfg({ENABLED: "true"}))
    assert d.enabled is True
    assert d.source == f"config file {TYPHA_CONFIG_FILE} (configmap kube-system/typha-cfg" \
        f"[typha.cfg]) key {ENABLED}"


def test_typha_file_spellings_that_disagree_are_undetermined() -> None:
    """config_params.go `Config.resolve` ranges over the file's map (Go map order): of the keys
    that apply, any may be applied last. Without an env value the canonical key applies too.
    With one, the canonical key is skipped when walked first (`source < currentSource`: the
    env value is recorded under the canonical name), but applies when walked after another
    spelling, which records the canonical name at the file's level: still undetermined."""
    d = typha(file=cfg({ENABLED: "true", "prometheusmetricsenabled": "false"}))
    assert d.enabled is None and "undetermined" in (d.reason or "")
    d = typha(file=cfg({ENABLED: "true", "prometheusmetricsenabled": "1"}))
    assert d.enabled is True
    # Canonical walked first: skipped, the other spelling sets true; walked after it: false.
    d = typha(en("false"),
              file=cfg({ENABLED: "false", "prometheusmetricsenabled": "true"}))
    assert d.enabled is None and "undetermined" in (d.reason or "")
    # Alone, the other spelling overrides the env value.
    d = typha(en("false"), file=cfg({"prometheusmetricsenabled": "true"}))
    assert d.enabled is True
    # Both spellings agree: decided, whatever the order.
    d = typha(en("false"), file=cfg({ENABLED: "true", "prometheusmetricsenabled": "yes"}))
    assert d.enabled is True
    d = typha(en("false"),
              file=cfg({"prometheusmetricsenabled": "true", "PROMETHEUSMETRICSENABLED": "no"}))
    assert d.enabled is None


def test_typha_invalid_ini_is_unknown_typha_never_starts() -> None:
    """typha/pkg/config/file_loader.go `LoadConfigFileData`: `ini.Load` fails and returns the
    error; typha/pkg/daemon/daemon.go `LoadConfiguration` logs it and retries (`continue
    configRetry`) for ever: Typha never starts. felixscan reports that as unknown."""
    with pytest.raises(ConfigFileError):
        load_config_file("[typha\nPrometheusMetricsEnabled = true\n")
    d = typha(en("false"),
              file=cfg(invalid="unclosed section: [typha"))
    assert d.enabled is None and "never starts" in (d.reason or "")


def test_typha_unknown_file_content_is_unknown() -> None:
    """A volume the scanner cannot read replaces the file `LoadConfigFile` reads: any key in it,
    spelled any way, could decide (`resolve`), even over the environment."""
    d = typha(en("false"),
              file=cfg(known=False, origin="hostPath volume cfg", error="a hostPath volume"))
    assert d.enabled is None and d.reason == "a hostPath volume"


def test_typha_config_file_path_from_the_command_line() -> None:
    """typha/cmd/typha/command.go `NewCommand`: `--config-file`/`-c` (default
    daemon.DefaultConfigFile /etc/calico/typha.cfg) names the file `LoadConfiguration` reads;
    the collector records it as `path <path>, <origin>`."""
    file = cfg({ENABLED: "true"}, origin="path /etc/typha/custom.cfg, configmap kube-system/t[c]")
    component = ComponentSnapshot(control=TYPHA, namespace="kube-system", deployment="calico-typha",
                                  container="calico-typha", found=True, image=IMAGE,
                                  config_file=file)
    d = typha_declared(component, None)
    assert d.enabled is True
    assert d.source == ("config file /etc/typha/custom.cfg (configmap kube-system/t[c]) "
                        f"key {ENABLED}")


# --- Typha: values ----------------------------------------------------------------------------


def test_typha_none_is_the_zero_value() -> None:
    """config_params.go `Config.resolve`: `strings.ToLower(rawValue) == "none"` sets the
    field's zero value (false, 0, ""), which is not the default (9093)."""
    assert typha_value(ENABLED, "None") == (False, True)
    assert typha_value(PORT, "NONE") == (0, True)
    assert typha_value(HOST, "none") == ("", True)
    d = typha(en("true"), pt("none"))
    assert d.enabled is True and d.port == 0 and d.random_port
    d = typha(en("none"), file=cfg({ENABLED: "true"}))
    assert d.enabled is False and not d.invalid


def test_typha_booleans() -> None:
    """typha/pkg/config/param_types.go `BoolParam.Parse`: lower-cased, not trimmed."""
    for raw in ("true", "TRUE", "1", "yes", "Y", "t"):
        assert typha_value(ENABLED, raw) == (True, True), raw
    for raw in ("false", "0", "No", "n", "F"):
        assert typha_value(ENABLED, raw) == (False, True), raw
    for raw in ("on", "enabled", " true", "2"):
        assert typha_value(ENABLED, raw) == (False, False), raw


def test_typha_invalid_value_is_the_default_and_still_wins() -> None:
    """config_params.go `Config.resolve`: a parse failure is logged, the value becomes the
    default ("Replacing invalid value with default"), and it is still set from that source, so
    it hides the file's canonical key."""
    d = typha(en("on"), file=cfg({ENABLED: "true"}))
    assert d.enabled is False and d.invalid and d.raw == "on"
    assert d.source == "env TYPHA_PROMETHEUSMETRICSENABLED"


@pytest.mark.parametrize(("raw", "port"), [
    ("9093", 9093), ("0x2385", 9093), ("0X2385", 9093), ("0o21605", 9093), ("021605", 9093),
    ("9_093", 9093), ("0x_2385", 9093), ("+9093", 9093), ("010", 8), ("0", 0), ("65535", 65535),
])
def test_typha_ports_parse_like_go_parseint_base_0_bitsize_32(raw: str, port: int) -> None:
    """typha/pkg/config/param_types.go `IntParam.Parse`: `strconv.ParseInt(raw, 0, 32)` (base
    prefixes, `_` between digits, a sign, a leading 0 octal), then the tag's range
    `int(0,65535)`; 0 is valid (a port the kernel picks)."""
    assert typha_value(PORT, raw) == (port, True)


@pytest.mark.parametrize("raw", ["65536", "-1", "2147483647", "2147483648", "-2147483649",
                                 "9223372036854775808", " 9093", "9093 ", "9093.0", "_9093",
                                 "9__093", "0x", "port"])
def test_typha_out_of_range_or_unparseable_port_is_9093_and_invalid(raw: str) -> None:
    """param_types.go `IntParam.Parse`: a ParseInt error (syntax, or beyond int32 for bitSize
    32) or a value outside `int(0,65535)` fails, and `resolve` puts the default 9093 there."""
    assert typha_value(PORT, raw) == (TYPHA_DEFAULT_PORT, False)
    d = typha(en("true"), pt(raw))
    assert d.port == TYPHA_DEFAULT_PORT and d.port_source == "env TYPHA_PROMETHEUSMETRICSPORT"


def test_typha_host_address_validation() -> None:
    """config_params.go `HostAddressRegexp` `^[a-zA-Z0-9:._+-]{1,64}$` (tag `host-address;`):
    anything else is invalid and becomes the default "" (every interface: daemon.go serves on
    net.JoinHostPort(host, port))."""
    for raw in ("127.0.0.1", "::1", "fd00::1", "typha.example.com", "a" * 64):
        assert typha_value(HOST, raw) == (raw, True), raw
    for raw in ("a" * 65, "host name", "[::1]", "h/x", "h\n"):
        assert typha_value(HOST, raw) == ("", False), raw
    d = typha(en("true"), env("TYPHA_PROMETHEUSMETRICSHOST", "127.0.0.1"))
    assert d.host == "127.0.0.1" and d.loopback_only


def test_typha_secret_strings_are_known_only_as_set() -> None:
    """A Secret's text is never kept: the collector keeps a valid string as `<set>`
    (scanner/kube/read.py `_typha_stand_in`, after param_types.go `RegexpParam.Parse` accepted
    it). A host from a Secret is then some valid host, not "" (every interface); a certificate
    path from a Secret is set, so daemon.go serves HTTPS."""
    secret = "secret kube-system/typha-metrics[x]"
    d = typha(en("true"), env("TYPHA_PROMETHEUSMETRICSHOST", "<set>", secret, redacted=True),
              env("TYPHA_PROMETHEUSMETRICSCERTFILE", "<set>", secret, redacted=True),
              env("TYPHA_PROMETHEUSMETRICSCLIENTAUTH", "<set>", secret, redacted=True))
    assert d.host == "<set>" and not d.loopback_only
    assert d.tls and d.client_auth is None


def test_typha_tls_when_cert_or_key_file_from_v3_32() -> None:
    """typha/pkg/daemon/daemon.go: `PrometheusMetricsKeyFile != "" || PrometheusMetricsCertFile
    != ""` serves HTTPS (metricsserver.ServePrometheusMetricsHTTPS), else HTTP. The parameters
    exist from v3.32.0 (older Typha ignores them as unknown). PrometheusMetricsClientAuth's
    default is RequireAndVerifyClientCert on release-v3.32 and NoClientCert from v3.33
    (config_params.go, #13072); OneofListParam.Parse matches it case-insensitively."""
    cert = env("TYPHA_PROMETHEUSMETRICSCERTFILE", "/tls/tls.crt")
    key = env("TYPHA_PROMETHEUSMETRICSKEYFILE", "/tls/tls.key")
    on = en("true")
    d = typha(on, cert)
    assert d.tls and d.client_auth == "RequireAndVerifyClientCert"
    assert typha(on, key).tls
    assert not typha(on).tls and typha(on).client_auth is None
    assert not typha(on, cert, image="calico/typha:v3.31.7").tls
    assert typha(on, key, image="calico/typha:v3.33.0").client_auth == "NoClientCert"
    unversioned = typha(on, cert, image="calico/typha:latest")
    assert unversioned.tls and unversioned.client_auth is None
    assert not typha(on, env("TYPHA_PROMETHEUSMETRICSCERTFILE", "none")).tls
    d = typha(on, cert, env("TYPHA_PROMETHEUSMETRICSCLIENTAUTH", "noclientcert"))
    assert d.client_auth == "NoClientCert"
    d = typha(on, cert, env("TYPHA_PROMETHEUSMETRICSCLIENTAUTH", "bogus"))
    assert d.client_auth == "RequireAndVerifyClientCert"  # invalid: the version's default
    assert typha_client_auth_default((3, 32, 0)) == "RequireAndVerifyClientCert"
    assert typha_client_auth_default((3, 33, 1)) == "NoClientCert"


def test_typha_pod_spec_beats_the_template() -> None:
    """Each Typha pod runs its own spec (daemon.go reads os.Environ() of its own process): a pod
    on an old ReplicaSet still runs the old env."""
    component = ComponentSnapshot(control=TYPHA, namespace="kube-system", deployment="calico-typha",
                                  container="calico-typha", found=True, image=IMAGE,
                                  env=(en("false"),))
    old = ComponentPod(name="calico-typha-old", node="n1", pod_ip="127.0.0.1", host_network=True,
                       phase="Running", ready=True,
                       env=(en("true"),))
    assert typha_declared(component, old).enabled is True
    assert typha_declared(component, None).enabled is False
    assert typha_declared(component, old).pod == "calico-typha-old"


# --- kube-controllers -------------------------------------------------------------------------


def test_kcc_absent_object_is_created_with_9094() -> None:
    """kube-controllers/pkg/config/runconfig.go `getOrCreateSnapshot`: no `default` -> Create
    from NewDefaultKubeControllersConfig (no port), and libcalico-go/lib/clientv3/
    kubecontrollersconfig.go `validateAndFillDefaults` fills PrometheusMetricsPort with 9094."""
    d = kc(kcc(exists=False))
    assert d.enabled is True and d.port == KUBE_CONTROLLERS_DEFAULT_PORT == 9094
    assert "creates it" in d.source


def test_kcc_absent_field_is_zero_off() -> None:
    """runconfig.go `mergeConfig`: the port is copied only `if apiCfg.PrometheusMetricsPort !=
    nil`, so a nil field leaves 0, and kube-controllers/pkg/kubecontrollers/run.go `Run`
    starts no server (`if runCfg.PrometheusPort != 0`). The probe still checks 9094."""
    d = kc(kcc(None))
    assert d.enabled is False and "absent" in d.source
    assert d.port == 9094 and not d.random_port


@pytest.mark.parametrize(("port", "enabled", "probed"), [
    (0, False, 9094), (9094, True, 9094), (8080, True, 8080), (65535, True, 65535),
    (9094.0, True, 9094),
])
def test_kcc_port_values(port: object, enabled: bool, probed: int) -> None:
    """runconfig.go `mergeConfig` takes spec.prometheusMetricsPort as is; run.go `Run` serves
    `ListenAndServe(":<port>")` (every interface of the pod) unless it is 0. A JSON 9094.0 is
    kept by the API server as float64 and written back as `9094`, the integer kube-controllers
    decodes."""
    d = kc(kcc(port))
    assert d.enabled is enabled and d.port == probed
    assert not d.random_port


@pytest.mark.parametrize("port", ["9094", -1, 65536, 9094.5, True, [9094]])
def test_kcc_port_that_cannot_run_is_unknown(port: object) -> None:
    """A field kube-controllers cannot decode into `*int` (api/pkg/apis/projectcalico/v3/
    kubecontrollersconfig.go `PrometheusMetricsPort *int`) stops it reading the resource; a
    negative or over-65535 port makes run.go `Run`'s ListenAndServe fail, and it exits. The
    CRD schema (minimum 0, maximum 65535, integer) normally rejects all of these: unknown."""
    d = kc(kcc(port))
    assert d.enabled is None and d.reason


def test_kcc_unreadable_is_unknown() -> None:
    """What cannot be read is unknown, never off (runconfig.go `syncDatastore` reads the
    resource before anything starts)."""
    assert kc(kcc(error="403 Forbidden")).enabled is None
    assert kc(None).enabled is None


def test_kcc_no_environment_variable_sets_the_port() -> None:
    """kube-controllers/pkg/config/config.go `AllEnvs` lists no metrics variable, and
    runconfig.go `mergeConfig` takes the port from the API config alone."""
    d = kc(kcc(9094), env("PROMETHEUS_METRICS_PORT", "0"),
           env("KUBE_CONTROLLERS_METRICS_PORT", "0"), en("false"))
    assert d.enabled is True and d.port == 9094


def test_kube_controllers_etcd_datastore_is_unknown() -> None:
    """libcalico-go/lib/apiconfig/load.go `LoadClientConfigFromEnvironment` (envconfig prefix
    `calico`: CALICO_DATASTORE_TYPE, else DATASTORE_TYPE) and `applyConfigDefaults` (empty:
    etcdv3 when CALICO_ETCD_ENDPOINTS/ETCD_ENDPOINTS is set, else kubernetes): with etcdv3
    the resource is in etcd, out of sight. libcalico-go/lib/backend/client.go `NewClient`
    knows no other type (kube-controllers exits)."""
    assert kc(kcc(0), env("DATASTORE_TYPE", "etcdv3")).enabled is None
    assert kc(kcc(0), env("DATASTORE_TYPE", "kubernetes")).enabled is False
    assert kc(kcc(0), env("DATASTORE_TYPE", "")).enabled is False
    assert kc(kcc(0), env("DATASTORE_TYPE", "kubernetes"),
              env("CALICO_DATASTORE_TYPE", "etcdv3")).enabled is None
    assert kc(kcc(0), env("ETCD_ENDPOINTS", "https://etcd:2379")).enabled is None
    assert kc(kcc(0), env("DATASTORE_TYPE", "kubernetes"),
              env("ETCD_ENDPOINTS", "https://etcd:2379")).enabled is False
    assert kc(kcc(0), env("DATASTORE_TYPE", "Kubernetes")).enabled is None
    assert kc(kcc(0), env("DATASTORE_TYPE", None, "configmap kube-system/x[k]",
                          error="missing")).enabled is None


def test_kube_controllers_flannel_migration_serves_no_metrics() -> None:
    """kube-controllers/pkg/kubecontrollers/run.go `Run`: ENABLED_CONTROLLERS containing
    `flannelmigration` runs the migration controller alone with a run config that has no
    metrics port; beside other controllers it is Fatal. Nothing listens either way."""
    d = kc(kcc(9094), env("ENABLED_CONTROLLERS", "flannelmigration"))
    assert d.enabled is False and "Flannel migration" in d.source
    d = kc(kcc(9094), env("ENABLED_CONTROLLERS", "node,flannelmigration"))
    assert d.enabled is False and "exits" in d.source
    assert kc(kcc(9094), env("ENABLED_CONTROLLERS", "node,policy")).enabled is True
