"""Reads one cluster's Calico state from the Kubernetes API, read-only, into a ClusterSnapshot.

Requests go through `scanner.kube.client.Api` (raw JSON answers, `_preload_content=False`:
fast on lists of thousands of nodes and indifferent to CRD schemas). Every request has a timeout
and the whole collection a deadline; lists are paged.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from scanner.core.calico import (
    ANNOTATION_PREFIX,
    CONFIG_FILE,
    DATASTORE_VARS,
    PARAMS,
    SPEC_FIELDS,
    FelixInputs,
    api_group,
    discovered_group,
    felix_param,
    node_labels,
)
from scanner.core.components import (
    TYPHA_CONFIG_FILE,
    TYPHA_PARAMS,
    typha_param,
    typha_value,
)
from scanner.core.config import ClusterSettings, NodeCheckSettings
from scanner.core.errors import ApiError, ApiForbidden, CalicoNotFound
from scanner.core.felix_params import ConfigFileError, load_config_file, parse_value
from scanner.core.nodeview import latest_view
from scanner.core.records import (
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterSnapshot,
    ComponentPod,
    ComponentSnapshot,
    ConfigFile,
    EnvVar,
    FelixConfig,
    FelixConfigSet,
    Install,
    Installation,
    KubeControllersConfig,
    Node,
    NodeViewLine,
    NodeViews,
    Pod,
    Rollout,
)
from scanner.kube.client import (
    MANIFEST_NAMESPACE,
    NAME_LIMIT,
    OPERATOR_NAMESPACE,
    Api,
    clean_text,
    make_api,
    printable,
)

_LOG_BYTES = 256 * 1024  # of a node-check pod's log tail: a few lines of under a kilobyte
_RELEVANT = "prometheusmetrics"  # Felix parameters the scanner reads begin with this


# --- collection --------------------------------------------------------------------------


def collect(settings: ClusterSettings, *, api: Api | None = None) -> ClusterSnapshot:
    """Read the cluster's Calico state. Raises ClusterError subclasses on failure."""
    started = time.monotonic()
    if api is None:
        api = make_api(settings, deadline=started + settings.deadline_seconds)
    try:
        return _collect(settings, api, started)
    except (AttributeError, TypeError, ValueError) as exc:
        # Valid JSON of the wrong shape (a string where an object belongs, a non-numeric
        # count): this cluster cannot be read, and the others must not fall with it.
        raise ApiError(f"the API answered with an object of an unexpected shape "
                       f"({type(exc).__name__}: {clean_text(str(exc))})") from exc
    finally:
        close = getattr(api.client, "close", None)
        if close is not None:
            close()


def _collect(settings: ClusterSettings, api: Api, started: float) -> ClusterSnapshot:
    installation_doc = api.get("GET installations.operator.tigera.io/default",
                               api.custom.get_cluster_custom_object, "operator.tigera.io", "v1",
                               "installations", "default")
    installation = None
    if installation_doc is not None:
        ispec = installation_doc.get("spec") or {}
        port, typha_port = ispec.get("nodeMetricsPort"), ispec.get("typhaMetricsPort")
        installation = Installation(
            name="default", node_metrics_port=port if isinstance(port, int) else None,
            typha_metrics_port=typha_port if isinstance(typha_port, int)
            and not isinstance(typha_port, bool) else None)
    ds, namespace = _find_daemonset(settings, api, operator=installation is not None)
    install = _install_type(ds, namespace, installation)
    meta = ds.get("metadata") or {}
    spec = ds.get("spec") or {}
    pod_spec = ((spec.get("template") or {}).get("spec")) or {}
    container = next((c for c in pod_spec.get("containers") or []
                      if c.get("name") == settings.calico.container), None)
    if container is None:
        names = ", ".join(str(c.get("name")) for c in pod_spec.get("containers") or [])
        raise CalicoNotFound(f"DaemonSet {namespace}/{meta.get('name')} has no container "
                             f"{settings.calico.container!r} (it has: {names or 'none'})")
    readers = _PodReaders(api, namespace)
    template = readers.inputs(container, pod_spec)
    revisions = _newest_revisions(api, namespace)
    rollout = _rollout(ds, revisions.get(str(meta.get("uid"))))
    pod_items = list(api.list(f"LIST pods in {namespace}", api.core.list_namespaced_pod,
                              namespace) or [])
    pods = _pods(pod_items, settings.calico.container, readers, revisions)
    nodes = _nodes(api)
    groups = {api_group(env, "") for env in [template.env, *(p.env for p in pods if p.env)]}
    discovered = _discover_group(api)
    felix_sets = {g: _felix_configs(api, g) for g in sorted((groups - {""}) | {discovered})}
    main = felix_sets[discovered]
    node_views = _node_views(api, settings.node_check) if settings.node_check else None
    components = _components(settings, api, namespace, pod_items=pod_items,
                             objects=readers.objects, group=discovered)
    return ClusterSnapshot(
        cluster=settings.name, install=install, namespace=namespace,
        daemonset=settings.calico.daemonset, container=settings.calico.container,
        image=template.image, env=template.env, config_file=template.config_file,
        felix_configs=main.configs, felix_crd=main.error is None, installation=installation,
        rollout=rollout, pods=pods, nodes=nodes, collected_at=datetime.now(UTC),
        api_seconds=time.monotonic() - started, felix_sets=felix_sets, felix_group=discovered,
        node_views=node_views, controls=settings.controls, components=components)


def _node_views(api: Api, settings: NodeCheckSettings) -> NodeViews:
    """The newest node-check line of each node, from the logs of its pods (`pods/log` with
    `tailLines`, in node-check's namespace only). A view that cannot be read is recorded as
    missing, with why, never guessed: the verdict then rests on the other two views."""
    namespace = settings.namespace

    def views(**kw: Any) -> NodeViews:
        return NodeViews(namespace=namespace, max_age_seconds=settings.max_age_seconds, **kw)

    try:
        items = list(api.list(f"LIST pods in {namespace} ({settings.selector})",
                              api.core.list_namespaced_pod, namespace,
                              label_selector=settings.selector) or [])
    except (ApiForbidden, ApiError) as exc:
        return views(lines={}, error=str(exc))
    lines: dict[str, NodeViewLine] = {}
    problems: dict[str, str] = {}
    # Newest pod first per node: during a rollout a node may run an old and a new pod.
    for item in sorted(items, key=lambda i: str((i.get("metadata") or {})
                                                  .get("creationTimestamp") or ""),
                       reverse=True):
        meta, spec = item.get("metadata") or {}, item.get("spec") or {}
        node, pod = _name(spec.get("nodeName")), _name(meta.get("name"))
        if node is None or pod is None or node in lines:
            continue
        if (item.get("status") or {}).get("phase") != "Running":
            problems.setdefault(node, f"node-check pod {pod} is not running")
            continue
        try:
            text = api.get_text(f"GET pods/{pod}/log in {namespace}",
                                api.core.read_namespaced_pod_log, pod, namespace,
                                container=settings.container, tail_lines=settings.tail_lines,
                                limit_bytes=_LOG_BYTES)
        except (ApiForbidden, ApiError) as exc:
            problems[node] = f"the log of node-check pod {pod} could not be read: {exc}"
            continue
        view = latest_view(text or "")
        if view is None:
            problems[node] = f"node-check pod {pod} has logged no valid line yet"
            continue
        if view.node != node:
            problems[node] = (f"node-check pod {pod} runs on {node} but reports node "
                              f"{printable(view.node)}")
            continue
        lines[node] = NodeViewLine(
            node=node, pod=pod, time=view.time, ports_checked=tuple(view.ports_checked),
            listeners=tuple((item_.address, item_.port) for item_ in view.listeners),
            complete=view.complete)
        problems.pop(node, None)
    return views(lines=lines, problems=problems)


def _find_daemonset(settings: ClusterSettings, api: Api, *, operator: bool
                    ) -> tuple[dict[str, Any], str]:
    name = settings.calico.daemonset
    if settings.calico.namespace:
        candidates = [settings.calico.namespace]
    elif operator:
        candidates = [OPERATOR_NAMESPACE, MANIFEST_NAMESPACE]
    else:
        candidates = [MANIFEST_NAMESPACE, OPERATOR_NAMESPACE]
    for ns in candidates:
        doc = api.get(f"GET daemonset {ns}/{name}", api.apps.read_namespaced_daemon_set, name, ns)
        if doc is not None:
            meta = doc.get("metadata") or {}
            if meta.get("name") != name or meta.get("namespace", ns) != ns:
                raise ApiError(f"GET daemonset {ns}/{name}: the API answered with another "
                               f"object ({printable(str(meta.get('namespace')))}/"
                               f"{printable(str(meta.get('name')))})")
            return doc, ns
    raise CalicoNotFound(f"no DaemonSet {name!r} in namespace {' or '.join(candidates)}; "
                         "set calico.namespace/daemonset in the config if Calico is elsewhere")


def _install_type(ds: Mapping[str, Any], namespace: str,
                  installation: Installation | None) -> Install:
    owners = (ds.get("metadata") or {}).get("ownerReferences") or []
    if any(o.get("kind") == "Installation" and str(o.get("apiVersion", "")).startswith(
            "operator.tigera.io/") for o in owners):
        return "operator"
    if installation is not None and namespace == OPERATOR_NAMESPACE:
        return "operator"
    if namespace == OPERATOR_NAMESPACE:
        return "unknown"
    return "manifest"


# --- env ---------------------------------------------------------------------------------


class _Objects:
    """ConfigMaps and Secrets of one namespace, each fetched once.

    A 403 on one of them makes what it holds unknown (`denied`), not the cluster an error: the
    rest of the cluster can still be read and probed.
    """

    def __init__(self, api: Api, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.cache: dict[tuple[str, str], dict[str, Any] | None] = {}
        self.denied: dict[tuple[str, str], str] = {}

    def why(self, kind: str, name: str) -> str | None:
        """Why `data(kind, name)` is None though the object may exist: it may not be read."""
        return self.denied.get((kind, name))

    def data(self, kind: str, name: str) -> dict[str, str] | None:
        key = (kind, name)
        if key not in self.cache:
            read = (self.api.core.read_namespaced_config_map if kind == "configmap"
                    else self.api.core.read_namespaced_secret)
            try:
                self.cache[key] = self.api.get(f"GET {kind} {self.namespace}/{name}", read,
                                               name, self.namespace)
            except ApiForbidden as exc:
                if exc.status != 403:
                    raise
                self.cache[key] = None
                self.denied[key] = (f"the scanner may not read {kind} {self.namespace}/{name} "
                                    "(403 Forbidden), so the value it gives is unknown")
        doc = self.cache[key]
        if doc is None:
            return None
        data = doc.get("data") or {}
        if kind == "secret":
            out: dict[str, str] = {}
            for k, v in data.items():
                try:
                    out[k] = base64.b64decode(str(v), validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError):
                    out[k] = "\x00<undecodable>"
            return out
        return {str(k): str(v) for k, v in data.items()}


def _secret_stand_in(name: str, value: str) -> str:
    """What is kept of a Secret value: its meaning for Felix, never its text.

    `name` is the Felix parameter (lower-cased) or another variable Felix's datastore
    settings read. Empty stays empty: Felix drops it, so the next source decides.
    """
    if not value:
        return ""
    if name in PARAMS:
        parsed, valid = parse_value(name, value)
        if not valid:
            return "<redacted>"
        if isinstance(parsed, bool):
            return str(parsed).lower()
        if isinstance(parsed, int):
            return str(parsed)
        return "none" if not parsed else "<set>"
    return value if value.lower() in ("kubernetes", "etcdv3", "crd.projectcalico.org/v1",
                                      "projectcalico.org/v3") else "<set>"


def _relevant(env_name: str) -> str | None:
    """The name under which a variable matters to the metrics decision, or None."""
    param = felix_param(env_name)
    if param is not None and param.startswith(_RELEVANT):
        return param
    return env_name.lower() if env_name.upper() in DATASTORE_VARS else None


@dataclass(frozen=True, slots=True)
class _EnvProfile:
    """Which variables of a container matter, and what of a Secret's value may be kept."""

    relevant: Callable[[str], str | None]  # env name -> the parameter it sets, or None
    params: tuple[str, ...]  # full names an unreadable envFrom source could still set
    stand_in: Callable[[str, str], str]


def _typha_relevant(env_name: str) -> str | None:
    param = typha_param(env_name)
    return param if param is not None and param.startswith(_RELEVANT) else None


def _typha_stand_in(param: str, value: str) -> str:
    if not value:
        return ""
    canonical = next((p for p in TYPHA_PARAMS if p.lower() == param), None)
    if canonical is None:
        return "<set>"
    parsed, valid = typha_value(canonical, value)
    if not valid:
        return "<redacted>"
    if isinstance(parsed, bool):
        return str(parsed).lower()
    if isinstance(parsed, int):
        return str(parsed)
    return "none" if not parsed else "<set>"


# What decides kube-controllers' datastore (libcalico-go/lib/apiconfig/load.go
# `LoadClientConfigFromEnvironment`) and whether it serves metrics at all (run.go `Run`:
# flannel migration mode starts no metrics server).
_KC_VARS = ("CALICO_DATASTORE_TYPE", "DATASTORE_TYPE", "CALICO_ETCD_ENDPOINTS", "ETCD_ENDPOINTS",
            "ENABLED_CONTROLLERS")


def _kc_relevant(env_name: str) -> str | None:
    return env_name.lower() if env_name in _KC_VARS else None


def _kc_stand_in(param: str, value: str) -> str:
    if not value:
        return ""
    if param == "enabled_controllers":
        return value if re.fullmatch(r"[a-z,]*", value) else "<set>"
    return value if value in ("kubernetes", "etcdv3") else "<set>"


_FELIX_ENV = _EnvProfile(_relevant, tuple(f"FELIX_{p.upper()}" for p in PARAMS),
                         _secret_stand_in)
_TYPHA_ENV = _EnvProfile(_typha_relevant, tuple(f"TYPHA_{p.upper()}" for p in TYPHA_PARAMS),
                         _typha_stand_in)
_KC_ENV = _EnvProfile(_kc_relevant, _KC_VARS, _kc_stand_in)


class _PodReaders:
    """Reads what Felix sees in a calico-node container: env, config file, image.

    Pods of one revision share a spec, so each distinct container spec is read once and every
    pod of it gets the same records (cheap on thousands of nodes).
    """

    def __init__(self, api: Api, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.objects = _Objects(api, namespace)
        self.cache: dict[str, FelixInputs] = {}

    def inputs(self, container: Mapping[str, Any], pod_spec: Mapping[str, Any]) -> FelixInputs:
        key = json.dumps([container.get("env"), container.get("envFrom"),
                          container.get("volumeMounts"), container.get("image"),
                          pod_spec.get("volumes")], sort_keys=True, default=str)
        found = self.cache.get(key)
        if found is None:
            found = FelixInputs(
                env=_resolve_env(self.objects, self.namespace, container),
                config_file=_config_file(self.objects, self.namespace, container, pod_spec),
                image=_name(container.get("image"), 1000))
            self.cache[key] = found
        return found


def _resolve_env(objects: _Objects, namespace: str, container: Mapping[str, Any],
                 profile: _EnvProfile = _FELIX_ENV) -> tuple[EnvVar, ...]:
    """The container's Felix metrics variables with Kubernetes' own semantics.

    envFrom first, then env (later entries win); `$(VAR)` references expanded; ConfigMap and
    Secret references read. Only `felix_prometheusmetrics*` variables and those that choose
    Felix's datastore are kept.
    """
    resolved: dict[str, EnvVar] = {}
    plain: dict[str, str] = {}  # every literal value, for $(VAR) expansion

    for src in container.get("envFrom") or []:
        prefix = str(src.get("prefix") or "")
        for kind in ("configMapRef", "secretRef"):
            ref = src.get(kind)
            if not isinstance(ref, dict):
                continue
            what = "configmap" if kind == "configMapRef" else "secret"
            name = str(ref.get("name"))
            data = objects.data(what, name)
            origin = f"envFrom {what} {namespace}/{name}"
            if data is None:
                denied = objects.why(what, name)
                if denied:
                    # It may set any variable: each Felix parameter we read that its prefix
                    # can still spell is unknown (optional or not: it exists, we cannot see it).
                    for full in profile.params:
                        if full.lower().startswith(prefix.lower()):
                            env_name = prefix + full[len(prefix):]
                            resolved[env_name] = EnvVar(name=env_name, value=None,
                                                        origin=origin, error=denied)
                elif not ref.get("optional"):
                    resolved[f"{prefix}<envFrom {name}>"] = EnvVar(
                        name=f"{prefix}* (envFrom {what} {name})", value=None, origin=origin,
                        error=f"{what} {namespace}/{name} named by envFrom does not exist; "
                        "the pod cannot start with it")
                continue
            for key, value in data.items():
                env_name = prefix + key
                param = profile.relevant(env_name)
                if what == "configmap":
                    plain[env_name] = value
                if param:
                    redacted = what == "secret"
                    resolved[env_name] = EnvVar(
                        name=env_name, origin=f"{origin}[{key}]", redacted=redacted,
                        value=profile.stand_in(param, value) if redacted else value)
    for entry in container.get("env") or []:
        if not isinstance(entry, dict) or "name" not in entry:
            continue
        env_name = str(entry["name"])
        param = profile.relevant(env_name)
        relevant = param is not None
        if "valueFrom" not in entry:
            value = _expand(str(entry.get("value", "")), plain)
            plain[env_name] = value
            if relevant:
                resolved[env_name] = EnvVar(name=env_name, value=value, origin="literal")
            else:
                resolved.pop(env_name, None)
            continue
        plain.pop(env_name, None)
        if not relevant:
            continue
        var = _value_from(objects, env_name, param or "", entry["valueFrom"], profile)
        if var.value is not None or var.error:
            resolved[env_name] = var
        # An optional reference that is missing sets nothing: an envFrom value stays.
    return tuple(v for v in resolved.values() if v.value is not None or v.error)


def _value_from(objects: _Objects, env_name: str, param: str, spec: Any,
                profile: _EnvProfile = _FELIX_ENV) -> EnvVar:
    ns = objects.namespace
    for kind, what in (("configMapKeyRef", "configmap"), ("secretKeyRef", "secret")):
        ref = spec.get(kind) if isinstance(spec, dict) else None
        if not isinstance(ref, dict):
            continue
        name, key = str(ref.get("name")), str(ref.get("key"))
        origin = f"{what} {ns}/{name}[{key}]"
        data = objects.data(what, name)
        denied = objects.why(what, name)
        if denied:
            return EnvVar(name=env_name, value=None, origin=origin, error=denied)
        if data is None or key not in data:
            if ref.get("optional"):
                return EnvVar(name=env_name, value=None, origin=origin)  # unset: dropped
            missing = (f"{what} {ns}/{name}" if data is None
                       else f"key {key!r} in {what} {ns}/{name}")
            return EnvVar(name=env_name, value=None, origin=origin,
                          error=f"{missing} does not exist or is not readable by the scanner")
        if what == "secret":
            return EnvVar(name=env_name, value=profile.stand_in(param, data[key]),
                          origin=origin, redacted=True)
        return EnvVar(name=env_name, value=data[key], origin=origin)
    source = next(iter(spec), "unknown") if isinstance(spec, dict) else "unknown"
    return EnvVar(name=env_name, value=None, origin=f"valueFrom {source}",
                  error=f"value comes from {source}, which the scanner cannot evaluate")


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(value: str, known: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return known.get(m.group(1), m.group(0))
    return _REF.sub(sub, value)


# --- the config file -----------------------------------------------------------------------


def _config_file(objects: _Objects, namespace: str, container: Mapping[str, Any],
                 pod_spec: Mapping[str, Any], *, path: str = CONFIG_FILE,
                 parse: Callable[[str], dict[str, str]] | None = None,
                 stand_in: Callable[[str, str], str] | None = None) -> ConfigFile:
    """Whether a volume replaces the config file at `path` (Felix's /etc/calico/felix.cfg by
    default), and what it says when we can read it."""
    parse = parse or _parse_felix_cfg
    stand_in = stand_in or (lambda k, v: _secret_stand_in(k.lower(), v))
    mount = None
    for m in container.get("volumeMounts") or []:
        at = str(m.get("mountPath", "")).rstrip("/")
        covers = bool(at) and (at == path or path.startswith(at + "/"))
        if covers and (mount is None or len(at) > len(str(mount.get("mountPath")))):
            mount = m
    if mount is None:
        return ConfigFile(known=True, values={}, origin="image default, sets no Prometheus keys")
    volume = next((v for v in pod_spec.get("volumes") or [] if v.get("name") == mount.get("name")),
                  None)
    mount_path = str(mount.get("mountPath")).rstrip("/")
    if volume is None:
        return ConfigFile(known=False, values={}, origin=f"volume {mount.get('name')}",
                          error="the mounted volume is not declared in the pod")
    for kind, what in (("configMap", "configmap"), ("secret", "secret")):
        ref = volume.get(kind)
        if not isinstance(ref, dict):
            continue
        name = str(ref.get("name") or ref.get("secretName"))
        if mount_path == path:
            key = str(mount.get("subPath") or path.rsplit("/", 1)[-1])
        else:
            rel = path[len(mount_path) + 1:]
            key = rel
            for item in ref.get("items") or []:
                if item.get("path") == rel:
                    key = str(item.get("key"))
        origin = f"{what} {namespace}/{name}[{key}]"
        data = objects.data(what, name)
        if data is None:
            return ConfigFile(known=False, values={}, origin=origin,
                              error=objects.why(what, name)
                              or f"{what} {namespace}/{name} is not readable by the scanner")
        if key not in data:
            return ConfigFile(known=True, values={}, origin=f"{origin} (absent)")
        try:
            values = parse(data[key])
        except ConfigFileError as exc:
            return ConfigFile(known=True, values={}, origin=origin, invalid=str(exc)[:300])
        if what == "secret":
            values = {k: stand_in(k, v) for k, v in values.items()}
        return ConfigFile(known=True, values=values, origin=origin)
    kind = next((k for k in volume if k != "name"), "unknown")
    return ConfigFile(known=False, values={}, origin=f"{kind} volume {volume.get('name')}",
                      error=f"{path} comes from a {kind} volume whose content the "
                      "scanner cannot read through the API")


def _parse_felix_cfg(text: str) -> dict[str, str]:
    """The keys of felix.cfg that matter here, as Felix's loader reads the file: every section
    merged by gopkg.in/ini.v1 (felix/config/file_loader.go `LoadConfigFileData`)."""
    return {k: v for k, v in load_config_file(text).items()
            if k.lower().startswith(_RELEVANT) or k.lower() in ("datastoretype",
                                                               "etcdendpoints", "etcdaddr")}


# --- FelixConfiguration, rollout, pods, nodes ------------------------------------------------


def _discover_group(api: Api) -> str:
    """Which group Felix reads FelixConfiguration from when nothing names one: libcalico-go
    asks the server's API groups (discovery.go `UsingV3CRDs`)."""
    doc = api.get("GET /apis", api.apis.get_api_versions)
    groups = [str(g.get("name")) for g in (doc or {}).get("groups") or []
              if isinstance(g, dict)]
    return discovered_group(groups)


def _felix_configs(api: Api, group: str) -> FelixConfigSet:
    """Every FelixConfiguration of `group`, or why they cannot be known.

    On the Kubernetes datastore Felix needs the resource: a group that does not serve it, or
    that the scanner may not read, leaves the datastore's values unknown, never "none set".
    """
    name, version = group.split("/")
    what = f"LIST felixconfigurations.{name}"
    try:
        items = api.list(what, api.custom.list_cluster_custom_object, name, version,
                         "felixconfigurations")
    except ApiForbidden as exc:
        return FelixConfigSet(group=group, error=f"{what}: {exc}")
    if items is None:
        return FelixConfigSet(group=group, error=(
            f"FelixConfiguration is not served in {group}, the API group Felix reads; on the "
            "Kubernetes datastore Felix needs it, so its values there are unknown"))
    configs = []
    for item in items:
        meta = item.get("metadata") or {}
        spec = item.get("spec") or {}
        if not isinstance(spec, dict):
            spec = {}
        notes = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()
                 if str(k).startswith(ANNOTATION_PREFIX)}
        selector = spec.get("nodeSelector")
        configs.append(FelixConfig(
            name=printable(str(meta.get("name"))),
            spec={k: v for k, v in spec.items() if k in SPEC_FIELDS},
            annotations=notes,
            node_selector=str(selector) if selector else None,
            created=str(meta.get("creationTimestamp") or "")))
    return FelixConfigSet(group=group, configs=tuple(sorted(configs, key=lambda c: c.name)))


def _newest_revisions(api: Api, namespace: str) -> dict[str, str]:
    """The controller-revision-hash of each DaemonSet's newest ControllerRevision, by its uid."""
    revisions = api.list(f"LIST controllerrevisions in {namespace}",
                         api.apps.list_namespaced_controller_revision, namespace)
    best: dict[str, tuple[int, str]] = {}
    for rev in revisions or []:
        rmeta = rev.get("metadata") or {}
        number = rev.get("revision")
        if not isinstance(number, int):
            continue
        digest = (rmeta.get("labels") or {}).get("controller-revision-hash") \
            or str(rmeta.get("name", "")).rsplit("-", 1)[-1]
        for owner in rmeta.get("ownerReferences") or []:
            uid = str(owner.get("uid"))
            if owner.get("kind") == "DaemonSet" and number > best.get(uid, (-1, ""))[0]:
                best[uid] = (number, str(digest))
    return {uid: digest for uid, (_n, digest) in best.items()}


def _rollout(ds: Mapping[str, Any], current: str | None) -> Rollout:
    meta = ds.get("metadata") or {}
    status = ds.get("status") or {}
    strategy = ((ds.get("spec") or {}).get("updateStrategy")) or {}
    max_unavailable = (strategy.get("rollingUpdate") or {}).get("maxUnavailable")
    return Rollout(
        generation=int(meta.get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        desired=int(status.get("desiredNumberScheduled") or 0),
        updated=int(status.get("updatedNumberScheduled") or 0),
        ready=int(status.get("numberReady") or 0),
        available=int(status.get("numberAvailable") or 0),
        current_revision=current,
        strategy=str(strategy.get("type") or "RollingUpdate"),
        max_unavailable=None if max_unavailable is None else str(max_unavailable))


def _pods(items: list[dict[str, Any]], container: str, readers: _PodReaders,
          revisions: Mapping[str, str]) -> tuple[Pod, ...]:
    """Every pod of the namespace that runs the calico-node container, whoever owns it, each
    with the env and config file of its own spec (an old revision runs its old env)."""
    pods = []
    for item in items:
        meta = item.get("metadata") or {}
        spec = item.get("spec") or {}
        felix = next((c for c in spec.get("containers") or []
                      if isinstance(c, dict) and c.get("name") == container), None)
        if felix is None:
            continue
        owner = next((o for o in meta.get("ownerReferences") or []
                      if o.get("kind") == "DaemonSet"), None)
        revision = (meta.get("labels") or {}).get("controller-revision-hash")
        newest = revisions.get(str(owner.get("uid"))) if owner else None
        status = item.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        inputs = readers.inputs(felix, spec)
        pods.append(Pod(name=printable(str(meta.get("name"))),
                        node=_name(spec.get("nodeName")),
                        phase=str(status.get("phase") or "Unknown"),
                        revision=revision, ready=ready,
                        owner=_name(owner.get("name")) if owner else None,
                        current=None if newest is None or revision is None
                        else revision == newest,
                        env=inputs.env, config_file=inputs.config_file, image=inputs.image,
                        terminating=bool(meta.get("deletionTimestamp"))))
    return tuple(pods)


def _name(value: Any, limit: int = NAME_LIMIT) -> str | None:
    return None if value is None else printable(str(value), limit)


def _nodes(api: Api) -> tuple[Node, ...]:
    items = api.list("LIST nodes", api.core.list_node)
    if items is None:
        raise ApiError("LIST nodes: not served (404)")
    nodes = []
    for item in items:
        meta = item.get("metadata") or {}
        status = item.get("status") or {}
        ready: bool | None = None
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Ready":
                ready = cond.get("status") == "True"
        addresses = tuple((printable(str(a.get("type")), 64), printable(str(a.get("address"))))
                          for a in status.get("addresses") or [] if a.get("address"))
        labels = node_labels({str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
                             {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()})
        nodes.append(Node(name=printable(str(meta.get("name"))), addresses=addresses, ready=ready,
                          labels=labels or {}))
    return tuple(nodes)


# --- Typha and kube-controllers (the typha-metrics and kube-controllers-metrics controls) ----


def _components(settings: ClusterSettings, api: Api, namespace: str, *,
                pod_items: list[dict[str, Any]], objects: _Objects,
                group: str) -> dict[str, ComponentSnapshot]:
    """The Deployments of the checked component controls, in calico-node's namespace (both
    install types put Typha and kube-controllers beside it), with their pods."""
    c = settings.calico
    out: dict[str, ComponentSnapshot] = {}
    if TYPHA in settings.controls:
        out[TYPHA] = _component(api, namespace, TYPHA, name=c.typha,
                                container_name=c.typha_container, pod_items=pod_items,
                                objects=objects)
    if KUBE_CONTROLLERS in settings.controls:
        comp = _component(api, namespace, KUBE_CONTROLLERS, name=c.kube_controllers,
                          container_name=c.kube_controllers_container, pod_items=pod_items,
                          objects=objects)
        if comp.found and not comp.error:
            comp = replace(comp, kcc=_kube_controllers_config(api, group))
        out[KUBE_CONTROLLERS] = comp
    return out


_PROFILES = {TYPHA: _TYPHA_ENV, KUBE_CONTROLLERS: _KC_ENV}


def _component(api: Api, namespace: str, control: str, *, name: str, container_name: str,
               pod_items: list[dict[str, Any]], objects: _Objects) -> ComponentSnapshot:
    base = ComponentSnapshot(control=control, namespace=namespace, deployment=name,
                             container=container_name, found=False)
    try:
        doc = api.get(f"GET deployment {namespace}/{name}", api.apps.read_namespaced_deployment,
                      name, namespace)
    except ApiForbidden as exc:
        return replace(base, error=f"the scanner may not get deployment {namespace}/{name} "
                       f"({exc})")
    if doc is None:
        return base
    spec = doc.get("spec") or {}
    pod_spec = ((spec.get("template") or {}).get("spec")) or {}
    container = next((c for c in pod_spec.get("containers") or []
                      if isinstance(c, dict) and c.get("name") == container_name), None)
    if container is None:
        names = ", ".join(str(c.get("name")) for c in pod_spec.get("containers") or [])
        return replace(base, found=True, error=f"Deployment {namespace}/{name} has no container "
                       f"{container_name!r} (it has: {names or 'none'})")
    reader = _ComponentReader(objects, namespace, control)
    env, config_file, image = reader.inputs(container, pod_spec)
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    pods = []
    for item in pod_items:
        meta = item.get("metadata") or {}
        labels = meta.get("labels") or {}
        pspec = item.get("spec") or {}
        own = next((c for c in pspec.get("containers") or []
                    if isinstance(c, dict) and c.get("name") == container_name), None)
        if own is None or not selector or any(labels.get(k) != v for k, v in selector.items()):
            continue
        status = item.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        penv, pcf, pimage = reader.inputs(own, pspec)
        pods.append(ComponentPod(
            name=printable(str(meta.get("name"))), node=_name(pspec.get("nodeName")),
            pod_ip=_name(status.get("podIP"), 64), host_network=bool(pspec.get("hostNetwork")),
            phase=str(status.get("phase") or "Unknown"), ready=ready, env=penv,
            config_file=pcf, image=pimage, terminating=bool(meta.get("deletionTimestamp"))))
    dstatus = doc.get("status") or {}
    replicas = spec.get("replicas")
    return replace(base, found=True, image=image, env=env, config_file=config_file,
                   pods=tuple(sorted(pods, key=lambda p: p.name)),
                   replicas=replicas if isinstance(replicas, int) else None,
                   ready_replicas=int(dstatus.get("readyReplicas") or 0))


class _ComponentReader:
    """A component container's env, config file (Typha's) and image; each distinct spec once."""

    def __init__(self, objects: _Objects, namespace: str, control: str) -> None:
        self.objects = objects
        self.namespace = namespace
        self.control = control
        self.cache: dict[str, tuple[tuple[EnvVar, ...], ConfigFile | None, str | None]] = {}

    def inputs(self, container: Mapping[str, Any], pod_spec: Mapping[str, Any]
               ) -> tuple[tuple[EnvVar, ...], ConfigFile | None, str | None]:
        key = json.dumps([container.get("env"), container.get("envFrom"),
                          container.get("volumeMounts"), container.get("image"),
                          container.get("args"), container.get("command"),
                          pod_spec.get("volumes")], sort_keys=True, default=str)
        found = self.cache.get(key)
        if found is None:
            env = _resolve_env(self.objects, self.namespace, container, _PROFILES[self.control])
            cf = None
            if self.control == TYPHA:
                path = _typha_config_path(container)
                cf = _config_file(self.objects, self.namespace, container, pod_spec, path=path,
                                  parse=_parse_typha_cfg, stand_in=_typha_stand_in)
                if path != TYPHA_CONFIG_FILE:
                    cf = replace(cf, origin=f"path {path}, {cf.origin}")
            found = (env, cf, _name(container.get("image"), 1000))
            self.cache[key] = found
        return found


def _typha_config_path(container: Mapping[str, Any]) -> str:
    """The config file Typha loads: `--config-file`/`-c` on its command line, else
    /etc/calico/typha.cfg (typha/cmd/typha/command.go)."""
    words = [str(w) for w in [*(container.get("command") or []), *(container.get("args") or [])]]
    path = TYPHA_CONFIG_FILE
    for i, word in enumerate(words):
        if word in ("--config-file", "-c") and i + 1 < len(words):
            path = words[i + 1]
        elif word.startswith("--config-file="):
            path = word.split("=", 1)[1]
        elif word.startswith("-c") and len(word) > 2 and not word.startswith("--"):
            path = word[2:].lstrip("=")
    return path


def _parse_typha_cfg(text: str) -> dict[str, str]:
    """typha.cfg's Prometheus keys as Typha's loader reads the file: every section merged by
    gopkg.in/ini.v1 (typha/pkg/config/file_loader.go `LoadConfigFileData`)."""
    return {k: v for k, v in load_config_file(text).items() if k.lower().startswith(_RELEVANT)}


def _kube_controllers_config(api: Api, group: str) -> KubeControllersConfig:
    """KubeControllersConfiguration `default`, from the group Calico's clients read."""
    g, _, version = group.partition("/")
    try:
        doc = api.get(f"GET kubecontrollersconfigurations.{g}/default",
                      api.custom.get_cluster_custom_object, g, version,
                      "kubecontrollersconfigurations", "default")
    except ApiForbidden as exc:
        return KubeControllersConfig(exists=False, error=f"the scanner may not get "
                                     f"kubecontrollersconfigurations.{g} default ({exc})")
    if doc is None:
        return KubeControllersConfig(exists=False)
    spec = doc.get("spec") or {}
    status = doc.get("status") or {}
    running = status.get("runningConfig") or {}
    environment = status.get("environmentVars") or {}
    return KubeControllersConfig(
        exists=True, port=spec.get("prometheusMetricsPort"),
        running=running if isinstance(running, dict) else {},
        environment={str(k): printable(str(v)) for k, v in environment.items()}
        if isinstance(environment, dict) else {},
        resource_version=_name((doc.get("metadata") or {}).get("resourceVersion")))
