"""One test per upstream rule of how Felix decides its metrics endpoint, on plain data.

Each docstring names the upstream file and function it pins (projectcalico/calico unless said
otherwise; read at master, August 2026). docs/calico.md links each rule here. End-to-end
versions through the real client and the emulated API are in tests/scan/test_scan_parity.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from scanner.core.calico import (
    CRD_GROUP,
    V3_GROUP,
    cluster_declared,
    datastore_type,
    discovered_group,
    felix_version,
    node_labels,
    resolve,
    resolve_nodes,
)
from scanner.core.evaluate import evaluate, probe_targets
from scanner.core.findings import remediation_for
from scanner.core.records import (
    ClusterSnapshot,
    ConfigFile,
    Declared,
    EnvVar,
    FelixConfig,
    FelixConfigSet,
    Installation,
    Node,
    Pod,
    ProbeResult,
    Rollout,
)
from tests.helpers.paths import ROOT

IMAGE = "quay.io/calico/node:v3.32.1"
N1 = Node(name="n1", addresses=(("InternalIP", "127.0.0.1"),), ready=True,
          labels={"role": "gpu", "zone": "a"})
N2 = Node(name="n2", addresses=(("InternalIP", "127.0.0.2"),), ready=True,
          labels={"role": "cpu", "zone": "b"})


def env(name: str, value: str | None, origin: str = "literal", **kw: object) -> EnvVar:
    return EnvVar(name=name, value=value, origin=origin, **kw)  # type: ignore[arg-type]


def fc(name: str, *, annotations: dict[str, str] | None = None, selector: str | None = None,
       created: str = "2026-01-01T00:00:00Z", **spec: object) -> FelixConfig:
    return FelixConfig(name=name, spec=spec, annotations=annotations or {},
                       node_selector=selector, created=created)


def cfgfile(values: dict[str, str] | None = None, **kw: object) -> ConfigFile:
    return ConfigFile(known=True, values=values or {},  # type: ignore[arg-type]
                      origin="configmap kube-system/felix[felix.cfg]", **kw)


def snap(*, env_: tuple[EnvVar, ...] = (), configs: tuple[FelixConfig, ...] = (),
         config_file: ConfigFile | None = None, image: str | None = IMAGE,
         nodes: tuple[Node, ...] = (N1, N2), pods: tuple[Pod, ...] = (),
         sets: dict[str, FelixConfigSet] | None = None, group: str = CRD_GROUP,
         install: str = "manifest", installation: Installation | None = None) -> ClusterSnapshot:
    return ClusterSnapshot(
        cluster="c", install=install, namespace="kube-system",  # type: ignore[arg-type]
        daemonset="calico-node", container="calico-node", image=image, env=env_,
        config_file=config_file or ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=configs, felix_crd=True, installation=installation,
        rollout=Rollout(2, 2, len(nodes), len(nodes), len(nodes), len(nodes), "new",
                        "RollingUpdate", "1"),
        pods=pods, nodes=nodes, collected_at=datetime.now(UTC),
        felix_sets=sets or {}, felix_group=group)


def on(s: ClusterSnapshot, node: Node = N1) -> Declared:
    return resolve(s, node)


# --- precedence and sources ------------------------------------------------------------------


def test_each_parameter_resolves_on_its_own() -> None:
    """felix/config/config_params.go `Config.resolve`: every parameter takes the highest source
    that sets it, independently (`SourcesInDescendingOrder`)."""
    d = on(snap(env_=(env("FELIX_PROMETHEUSMETRICSPORT", "9200"),),
                configs=(fc("default", prometheusMetricsEnabled=True,
                            prometheusMetricsPort=9300),)))
    assert (d.enabled, d.port) == (True, 9200)
    assert d.source == "FelixConfiguration default"
    assert d.port_source == "env FELIX_PROMETHEUSMETRICSPORT"


def test_precedence_env_file_host_selector_global() -> None:
    """config_params.go `SourcesInDescendingOrder` = InternalOverride, EnvironmentVariable,
    ConfigFile, DatastorePerHost, DatastorePerSelector, DatastoreGlobal."""
    configs = (fc("default", prometheusMetricsEnabled=False),
               fc("gpus", selector="role == 'gpu'", prometheusMetricsEnabled=True),
               fc("node.n1", prometheusMetricsEnabled=False))
    s = snap(configs=configs)
    assert on(s).source == "FelixConfiguration node.n1" and on(s).enabled is False
    s2 = snap(configs=configs[:2])
    assert on(s2).enabled is True and on(s2).source.startswith("FelixConfiguration gpus")
    s3 = replace(s, config_file=cfgfile({"PrometheusMetricsEnabled": "true"}))
    assert on(s3).enabled is True and on(s3).source.startswith("config file")
    s4 = replace(s3, env=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),))
    assert on(s4).enabled is False and on(s4).source == "env FELIX_PROMETHEUSMETRICSENABLED"


@pytest.mark.parametrize("where", ["env", "valueFrom", "file", "spec", "annotation"])
def test_empty_values_are_dropped_at_every_source(where: str) -> None:
    """config_params.go `Config.UpdateFrom`: "Ignoring empty configuration parameter" — an empty
    value from any source is dropped before precedence, so the next source decides. An exact
    annotation replaces the spec field first (configurationprocessor.go
    `processAddOrModified`), so an empty one drops the resource's value."""
    base = fc("default", prometheusMetricsEnabled=True)
    s = snap(configs=(base,))
    if where == "env":
        s = replace(s, env=(env("FELIX_PROMETHEUSMETRICSENABLED", ""),))
    elif where == "valueFrom":
        s = replace(s, env=(env("FELIX_PROMETHEUSMETRICSENABLED", "",
                                origin="configmap kube-system/x[k]"),))
    elif where == "file":
        s = replace(s, config_file=cfgfile({"PrometheusMetricsEnabled": ""}))
    elif where == "spec":
        s = snap(configs=(fc("node.n1", prometheusMetricsHost="", prometheusMetricsEnabled=True),
                          fc("default", prometheusMetricsHost="127.0.0.1")))
        assert on(s).host == "127.0.0.1"
        return
    else:
        s = snap(configs=(fc("node.n1", prometheusMetricsEnabled=False,
                             annotations={"config.projectcalico.org/PrometheusMetricsEnabled":
                                          ""}), base))
    d = on(s)
    assert d.enabled is True and d.source == "FelixConfiguration default", d


def test_felix_prefix_any_case_and_names_lower_cased() -> None:
    """felix/config/env_var_loader.go `LoadConfigFromEnvironment`: `felix_` in any case, the rest
    lower-cased; config_params.go `resolve` matches names lower-cased."""
    assert on(snap(env_=(env("felix_PrometheusMetricsEnabled", "true"),))).enabled is True
    assert on(snap(config_file=cfgfile({"prometheusmetricsENABLED": "y"}))).enabled is True
    assert on(snap(env_=(env("PROMETHEUSMETRICSENABLED", "true"),))).enabled is False


def test_env_spellings_that_disagree_are_undetermined() -> None:
    """env_var_loader.go lower-cases names into one map key: which spelling survives depends
    on the order of the environment, not ours to know; an empty spelling competes too (it is
    then dropped by `UpdateFrom`)."""
    d = on(snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),
                      env("FELIX_PrometheusMetricsEnabled", "true"))))
    assert d.enabled is None
    same = on(snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                         env("FELIX_PrometheusMetricsEnabled", "yes"))))
    assert same.enabled is True
    empty = on(snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                          env("FELIX_PrometheusMetricsEnabled", ""))))
    assert empty.enabled is None


@pytest.mark.parametrize(("raw", "enabled", "port"), [
    ("none", False, None), ("NONE", False, None), ("None", False, None)])
def test_none_is_the_zero_value(raw: str, enabled: bool, port: int | None) -> None:
    """config_params.go `resolve`: "none" (any case) sets the zero value: false, port 0."""
    assert on(snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", raw),))).enabled is False
    d = on(snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                      env("FELIX_PROMETHEUSMETRICSPORT", raw))))
    assert d.port == 0 and d.random_port


def test_invalid_value_is_the_default_and_still_hides_lower_sources() -> None:
    """config_params.go `resolve`: "Replacing invalid value with default"; the source is
    recorded, so lower sources stay hidden."""
    s = snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "on"),
                   env("FELIX_PROMETHEUSMETRICSPORT", "http")),
             configs=(fc("default", prometheusMetricsEnabled=True, prometheusMetricsPort=1234),))
    d = on(s)
    assert (d.enabled, d.invalid, d.port) == (False, True, 9091)


@pytest.mark.parametrize(("raw", "value"), [
    ("true", True), ("T", True), ("YES", True), ("y", True), ("1", True),
    ("false", False), ("F", False), ("no", False), ("n", False), ("0", False),
    ("on", None), ("enabled", None), (" true", None), ("2", None)])
def test_booleans(raw: str, value: bool | None) -> None:
    """felix/config/param_types.go `BoolParam.Parse`: lower-cased, not trimmed."""
    d = on(snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", raw),)))
    assert d.enabled is (value or False)
    assert d.invalid is (value is None)


@pytest.mark.parametrize(("raw", "port"), [
    ("9092", 9092), ("0x2384", 9092), ("+9092", 9092), ("9_092", 9092), ("010", 8),
    ("0o17", 15), ("0", 0), (" 9092", 9091), ("65536", 9091), ("-1", 9091), ("x", 9091)])
def test_ports_parse_like_go_parseint_base_0(raw: str, port: int) -> None:
    """param_types.go `IntParam.Parse` (`strconv.ParseInt(raw, 0, 64)`, then the 0-65535 range
    of `int(0:65535)` in config_params.go)."""
    d = on(snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                      env("FELIX_PROMETHEUSMETRICSPORT", raw))))
    assert d.port == port


def test_port_zero_is_a_random_port_never_probed_as_9091() -> None:
    """config_params.go `PrometheusMetricsPort int(0:65535)`: 0 is valid and Felix listens on
    ":0", a port the kernel picks (felix/metricsserver)."""
    s = snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                   env("FELIX_PROMETHEUSMETRICSPORT", "0")))
    declared = resolve_nodes(s)
    assert probe_targets(s, declared) == []
    result = evaluate(s, declared, [], cluster_declared=cluster_declared(s, declared),
                      started_at=s.collected_at, finished_at=s.collected_at)
    assert {n.verdict for n in result.nodes} == {"fail"}
    assert all(n.probe.state == "error" and "random port" in (n.probe.error or "")
               for n in result.nodes)
    assert "FELIX-METRICS-RANDOM-PORT" in {f.id for f in result.findings}


def test_host_is_resolved_and_loopback_is_still_enabled() -> None:
    """config_params.go `PrometheusMetricsHost host-address`; felix/daemon/daemon.go serves on
    host:port, so 127.0.0.1 is loopback only, but metrics are on."""
    s = snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                   env("FELIX_PROMETHEUSMETRICSHOST", "127.0.0.1")))
    declared = resolve_nodes(s)
    assert declared["n1"].host == "127.0.0.1" and declared["n1"].loopback_only
    probes = [ProbeResult(node=n, address=a, port=9091, state="closed")
              for n, a in (("n1", "127.0.0.1"), ("n2", "127.0.0.2"))]
    result = evaluate(s, declared, probes, cluster_declared=cluster_declared(s, declared),
                      started_at=s.collected_at, finished_at=s.collected_at)
    assert result.status == "non_compliant"
    assert {"FELIX-METRICS-ENABLED", "FELIX-METRICS-LOOPBACK-ONLY"} <= {
        f.id for f in result.findings}


@pytest.mark.parametrize(("image", "files", "tls"), [
    (IMAGE, {"FELIX_PROMETHEUSMETRICSCERTFILE": "/c.pem"}, True),
    (IMAGE, {"FELIX_PROMETHEUSMETRICSKEYFILE": "/k.pem"}, True),
    (IMAGE, {"FELIX_PROMETHEUSMETRICSCERTFILE": "none"}, False),
    ("quay.io/calico/node:v3.31.7", {"FELIX_PROMETHEUSMETRICSCERTFILE": "/c.pem"}, False),
])
def test_https_when_cert_or_key_file_from_v3_32(image: str, files: dict[str, str],
                                                tls: bool) -> None:
    """felix/daemon/daemon.go: `PrometheusMetricsKeyFile != "" || PrometheusMetricsCertFile
    != ""` serves HTTPS (`ServePrometheusMetricsHTTPS`); the parameters exist from v3.32.0."""
    d = on(snap(image=image, env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
                                   *(env(k, v) for k, v in files.items()))))
    assert d.tls is tls


def test_client_auth_default_per_version() -> None:
    """config_params.go `PrometheusMetricsClientAuth oneof(...)`: RequireAndVerifyClientCert by
    default in v3.32.0/1, NoClientCert on master."""
    tls = (env("FELIX_PROMETHEUSMETRICSENABLED", "true"),
           env("FELIX_PROMETHEUSMETRICSCERTFILE", "/c.pem"))
    assert on(snap(env_=tls)).client_auth == "RequireAndVerifyClientCert"
    assert on(snap(env_=tls, image="quay.io/calico/node:v3.33.0")).client_auth == "NoClientCert"
    set_ = (*tls, env("FELIX_PROMETHEUSMETRICSCLIENTAUTH", "NoClientCert"))
    assert on(snap(env_=set_)).client_auth == "NoClientCert"


# --- the config file ---------------------------------------------------------------------------


def test_config_file_values_from_every_section() -> None:
    """felix/config/file_loader.go `LoadConfigFileData`: every ini.v1 section is merged
    (the keys are given here as the loader returns them)."""
    assert on(snap(config_file=cfgfile({"PrometheusMetricsEnabled": "true"}))).enabled is True


def test_config_file_ini_would_reject_is_unknown() -> None:
    """file_loader.go: `ini.Load` fails -> LoadConfigFile returns the error and felix/daemon/
    daemon.go does not start; felixscan cannot say what would run."""
    d = on(snap(config_file=cfgfile(invalid="key-value delimiter not found: oops"),
                env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),)))
    assert d.enabled is None and "does not start" in (d.reason or "")


# --- FelixConfiguration ------------------------------------------------------------------------


def test_exact_annotation_replaces_the_spec_field() -> None:
    """libcalico-go/lib/backend/syncersv1/updateprocessors/configurationprocessor.go
    `processAddOrModified`: an override with the field's exact name replaces it."""
    d = on(snap(configs=(fc("default", prometheusMetricsEnabled=False, annotations={
        "config.projectcalico.org/PrometheusMetricsEnabled": "true"}),)))
    assert d.enabled is True and "annotation" in d.source


def test_annotation_prefix_is_case_sensitive() -> None:
    """configurationprocessor.go `extractAnnotations`: `strings.HasPrefix(k,
    "config.projectcalico.org/")`."""
    d = on(snap(configs=(fc("default", annotations={
        "Config.ProjectCalico.org/PrometheusMetricsEnabled": "true"}),)))
    assert d.enabled is False


def test_differently_cased_annotation_beside_a_spec_value_is_undetermined() -> None:
    """configurationprocessor.go: any other spelling is an extra key; Felix lower-cases both
    into one parameter of one source, and Go map order picks the winner."""
    d = on(snap(configs=(fc("default", prometheusMetricsEnabled=False, annotations={
        "config.projectcalico.org/prometheusMetricsEnabled": "true"}),)))
    assert d.enabled is None and "undetermined" in (d.reason or "")
    alone = on(snap(configs=(fc("default", annotations={
        "config.projectcalico.org/prometheusmetricsenabled": "true"}),)))
    assert alone.enabled is True


@pytest.mark.parametrize("spec", [{"prometheusMetricsEnabled": "true"},
                                  {"prometheusMetricsEnabled": {"x": 1}},
                                  {"prometheusMetricsPort": "9091", "prometheusMetricsEnabled":
                                   False}])
def test_wrong_typed_fields_are_unknown(spec: dict[str, object]) -> None:
    """api/pkg/apis/projectcalico/v3/felixconfig.go: `PrometheusMetricsEnabled *bool`,
    `PrometheusMetricsPort *int`; a resource whose field has another JSON type cannot be
    decoded by Felix's client, so what it contributes is unknown, never "not set"."""
    d = on(snap(configs=(fc("default", **spec),)))
    assert d.enabled is None and "cannot decode" in (d.reason or "")


def test_per_host_config_applies_to_its_node_only() -> None:
    """felix/calc/config_batcher.go `OnUpdate` (HostConfigKey for this hostname only) and
    configurationprocessor.go `extractNode` (`node.<name>`)."""
    s = snap(configs=(fc("node.n2", prometheusMetricsEnabled=True),))
    assert resolve(s, N1).enabled is False and resolve(s, N2).enabled is True


# --- selector-scoped ---------------------------------------------------------------------------


def test_selector_matches_calico_labels() -> None:
    """libcalico-go/lib/backend/k8s/resources/node.go `mergeCalicoAndK8sLabels` and
    resources.go `SetCalicoMetadataFromK8sAnnotations`: Calico labels are the JSON of
    `projectcalico.org/labels`, Kubernetes labels copied over them."""
    assert node_labels({"a": "k8s"}, {"projectcalico.org/labels": '{"a": "c", "b": "c"}'}) == {
        "a": "k8s", "b": "c"}
    assert node_labels({}, {"projectcalico.org/labels": "not json"}) is None
    assert node_labels({}, {}) is None
    labelled = replace(N1, labels=node_labels({"zone": "a"},
                                              {"projectcalico.org/labels": '{"pool": "gpu"}'})
                       or {})
    s = snap(nodes=(labelled,), configs=(fc("p", selector="pool == 'gpu'",
                                            prometheusMetricsEnabled=True),))
    assert resolve(s, labelled).enabled is True


def test_node_without_labels_matches_no_selector() -> None:
    """felix/calc/config_batcher.go `MergeSelectorConfigs`: nil labels -> no match, not even
    `all()`."""
    bare = replace(N1, labels={})
    s = snap(nodes=(bare,), configs=(fc("all", selector="all()", prometheusMetricsEnabled=True),))
    assert resolve(s, bare).enabled is False


def test_oldest_matching_selector_wins_ties_by_name() -> None:
    """config_batcher.go `MergeSelectorConfigs`: `slices.MinFunc` by CreationTime, then name."""
    configs = (fc("b-new", selector="all()", created="2026-02-01T00:00:00Z",
                  prometheusMetricsEnabled=True),
               fc("z-old", selector="all()", created="2026-01-01T00:00:00Z",
                  prometheusMetricsEnabled=False),
               fc("a-old", selector="has(role)", created="2026-01-01T00:00:00Z",
                  prometheusMetricsEnabled=True))
    d = on(snap(configs=configs))
    assert d.enabled is True and d.source.startswith("FelixConfiguration a-old")


def test_unparseable_selector_drops_only_that_resource() -> None:
    """config_batcher.go `onFelixConfigResourceUpdate`: "Failed to parse nodeSelector ...,
    removing selector-scoped config"; the others still apply."""
    configs = (fc("broken", selector="role == ", prometheusMetricsEnabled=False),
               fc("gpus", selector="role == 'gpu'", prometheusMetricsEnabled=True))
    s = snap(configs=configs)
    assert on(s).enabled is True
    declared = resolve_nodes(s)
    result = evaluate(s, declared, [], cluster_declared=cluster_declared(s, declared),
                      started_at=s.collected_at, finished_at=s.collected_at)
    assert [f.evidence["config"] for f in result.findings
            if f.id == "FELIX-CONFIG-SELECTOR-INVALID"] == ["broken"]


def test_selector_scoped_ignored_before_v3_32() -> None:
    """Selector-scoped FelixConfiguration arrived in v3.32.0 (config_batcher.go
    `SelectorConfigEntry`); older Felix reads only `default` and `node.*`."""
    configs = (fc("gpus", selector="all()", prometheusMetricsEnabled=True),)
    assert on(snap(configs=configs, image="quay.io/calico/node:v3.31.7")).enabled is False
    assert on(snap(configs=configs)).enabled is True
    unknown = on(snap(configs=configs, image="registry.local/node:custom"))
    assert unknown.enabled is None and "v3.32" in (unknown.reason or "")


def test_default_and_node_configs_ignore_their_node_selector() -> None:
    """configurationprocessor.go `extractNode`: `default` is global and `node.*` per host
    whatever nodeSelector they carry."""
    s = snap(configs=(fc("default", selector="role == 'none'", prometheusMetricsEnabled=True),))
    assert on(s).enabled is True


# --- where the configuration lives -----------------------------------------------------------


@pytest.mark.parametrize(("groups", "chosen"), [
    (["crd.projectcalico.org"], CRD_GROUP), (["projectcalico.org"], V3_GROUP),
    (["crd.projectcalico.org", "projectcalico.org"], CRD_GROUP), ([], CRD_GROUP)])
def test_api_group_discovery(groups: list[str], chosen: str) -> None:
    """libcalico-go/lib/backend/k8s/discovery.go `UsingV3CRDs`: v3 only when projectcalico.org
    is served and crd.projectcalico.org is not."""
    assert discovered_group(groups) == chosen


def test_v3_group_is_read_and_calico_api_group_overrides() -> None:
    """discovery.go `UsingV3CRDs`: an explicit CALICO_API_GROUP (apiconfig `CalicoAPIGroup`)
    wins over discovery."""
    sets = {V3_GROUP: FelixConfigSet(V3_GROUP, (fc("default", prometheusMetricsEnabled=True),)),
            CRD_GROUP: FelixConfigSet(CRD_GROUP, (fc("default"),))}
    assert on(snap(sets=sets, group=V3_GROUP)).enabled is True
    pinned = snap(sets=sets, group=V3_GROUP,
                  env_=(env("CALICO_API_GROUP", "crd.projectcalico.org/v1"),))
    assert on(pinned).enabled is False


def test_a_group_that_cannot_be_read_is_unknown_not_empty() -> None:
    """On the Kubernetes datastore Felix reads FelixConfiguration (felix/daemon/daemon.go loads
    global/selector/host config from the datastore); a group not served or not readable is
    unknown, unless a higher source decides."""
    sets = {CRD_GROUP: FelixConfigSet(CRD_GROUP, error="not served")}
    assert on(snap(sets=sets)).enabled is None
    decided = snap(sets=sets, env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),))
    assert on(decided).enabled is False


def test_etcd_datastore_is_out_of_sight() -> None:
    """felix/config/config_params.go `DatastoreConfig` and libcalico-go apiconfig
    `LoadClientConfigFromEnvironment`: DATASTORE_TYPE=etcdv3 keeps FelixConfiguration in
    etcd."""
    assert datastore_type([env("DATASTORE_TYPE", "etcdv3")]) == "etcdv3"
    assert datastore_type([env("ETCD_ENDPOINTS", "https://e:2379")]) == "etcdv3"
    assert datastore_type([env("DATASTORE_TYPE", "kubernetes")]) == "kubernetes"
    assert datastore_type([env("DATASTORE_TYPE", "etcdv3"),
                           env("FELIX_DATASTORETYPE", "kubernetes")]) == "kubernetes"
    d = on(snap(env_=(env("DATASTORE_TYPE", "etcdv3"),),
                configs=(fc("default", prometheusMetricsEnabled=False),)))
    assert d.enabled is None and "etcd" in (d.reason or "")


def test_felix_version_from_the_image() -> None:
    assert felix_version("quay.io/calico/node:v3.32.1") == (3, 32, 1)
    assert felix_version("docker.io/calico/node:v3.30.0@sha256:ab") == (3, 30, 0)
    assert felix_version("quay.io/tigera/node:v3.21.0") is None
    assert felix_version("calico/node@sha256:ab") is None


# --- the pods that run ----------------------------------------------------------------------


def pod(name: str, node: str, *, env_: tuple[EnvVar, ...] = (), current: bool = True,
        image: str = IMAGE, **kw: object) -> Pod:
    return Pod(name=name, node=node, phase="Running", revision="new" if current else "old",
               ready=True, owner="calico-node", current=current, env=env_,
               config_file=ConfigFile(known=True, values={}, origin="image default"),
               image=image, **kw)  # type: ignore[arg-type]


def test_a_node_runs_what_its_pod_spec_says_not_the_template() -> None:
    """The procedure felixscan automates: env set false on the DaemonSet, rollout in progress;
    a pod on the old revision still runs the old env (Felix reads its own process environment,
    env_var_loader.go)."""
    s = snap(env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),),
             pods=(pod("a", "n1", env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),),
                       current=False),
                   pod("b", "n2", env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),))))
    declared = resolve_nodes(s)
    assert declared["n1"].enabled is True and declared["n1"].pod == "a"
    assert declared["n2"].enabled is False
    assert resolve_nodes(s, use_pods=False)["n1"].enabled is False


@pytest.mark.parametrize("order", [0, 1])
def test_every_pod_on_a_node_counts_whatever_the_order(order: int) -> None:
    """A surge rollout (maxSurge) or a terminating pod puts two calico-node pods on one node."""
    pods = [pod("old", "n1", env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "true"),),
                current=False, terminating=True),
            pod("new", "n1", env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),))]
    s = snap(pods=tuple(pods if order else reversed(pods)))
    assert resolve_nodes(s)["n1"].enabled is True


def test_every_address_is_probed_and_any_answer_fails() -> None:
    """Felix serves on `PrometheusMetricsHost:port`, "" = every interface and both families
    (felix/daemon/daemon.go `ServePrometheusMetricsHTTP`)."""
    dual = Node(name="n1", addresses=(("InternalIP", "127.0.0.1"), ("InternalIP", "::1"),
                                      ("ExternalIP", "127.0.0.9")), ready=True, labels={"a": "b"})
    s = snap(nodes=(dual,), env_=(env("FELIX_PROMETHEUSMETRICSENABLED", "false"),))
    declared = resolve_nodes(s)
    targets = probe_targets(s, declared)
    assert [t.address for t in targets] == ["127.0.0.1", "::1"]
    assert len(probe_targets(s, declared, address_type=["InternalIP", "ExternalIP"])) == 3
    probes = [ProbeResult(node="n1", address="127.0.0.1", port=9091, state="filtered"),
              ProbeResult(node="n1", address="::1", port=9091, state="open", protocol="http",
                          felix=True)]
    result = evaluate(s, declared, probes, cluster_declared=cluster_declared(s, declared),
                      started_at=s.collected_at, finished_at=s.collected_at)
    assert result.nodes[0].verdict == "fail" and result.nodes[0].address == "::1"
    assert len(result.nodes[0].probes) == 2


# --- the fix follows the source ------------------------------------------------------------


def test_operator_install_with_felixconfiguration_source_is_not_told_about_node_metrics_port(
) -> None:
    """tigera/operator pkg/render/node.go: only `Installation.spec.nodeMetricsPort` renders
    FELIX_PROMETHEUSMETRICSENABLED; it never writes FelixConfiguration's Prometheus fields."""
    text = remediation_for("FELIX-METRICS-ENABLED", install="operator",
                           source="FelixConfiguration default")
    assert "nodeMetricsPort" not in text and "felixconfiguration default" in text
    op = remediation_for("FELIX-METRICS-ENABLED", install="operator",
                         source="env FELIX_PROMETHEUSMETRICSENABLED", operator_port=True)
    assert "nodeMetricsPort" in op
    ann = remediation_for("FELIX-METRICS-ENABLED", install="manifest",
                          source="FelixConfiguration gpus (nodeSelector all()) annotation "
                          "config.projectcalico.org/PrometheusMetricsEnabled")
    assert "kubectl annotate felixconfiguration gpus" in ann
    cm = remediation_for("FELIX-METRICS-ENABLED", install="manifest",
                         source="env FELIX_PROMETHEUSMETRICSENABLED (configmap kube-system/x[k])")
    assert "configmap kube-system/x[k]" in cm


def test_every_test_named_in_docs_calico_exists() -> None:
    """docs/calico.md links each rule to its tests: a renamed test must not leave a dead link."""
    import re

    root = ROOT
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", (root / "docs" / "calico.md").read_text()))
    defined = set(re.findall(r"^def (test_[a-z0-9_]+)\(", "\n".join(
        p.read_text() for p in (root / "tests").rglob("test_*.py")), re.MULTILINE))
    assert named and named <= defined, sorted(named - defined)
