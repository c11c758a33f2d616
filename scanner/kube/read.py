"""Reads one cluster's Calico state from the Kubernetes API, read-only, into a ClusterSnapshot.

The only module that imports `kubernetes` for reading (scanner/kube/write.py is the other one,
and only for remediation). Requests go through the real client with raw JSON
answers (`_preload_content=False`): fast on lists of thousands of nodes and indifferent to CRD
schemas. Every request has a timeout and the whole collection a deadline; lists are paged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import exec_provider as k8s_exec_provider
from kubernetes.config.config_exception import ConfigException

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
from scanner.core.config import ClusterSettings
from scanner.core.errors import ApiError, ApiForbidden, ApiUnreachable, CalicoNotFound, ClusterError
from scanner.core.felix_params import ConfigFileError, load_config_file, parse_value
from scanner.core.records import (
    ClusterSnapshot,
    ConfigFile,
    EnvVar,
    FelixConfig,
    FelixConfigSet,
    Install,
    Installation,
    Node,
    Pod,
    Rollout,
)

PAGE_SIZE = 500
MANIFEST_NAMESPACE = "kube-system"
OPERATOR_NAMESPACE = "calico-system"
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_ATTEMPTS = 4
_MAX_RELISTS = 3
_RELEVANT = "prometheusmetrics"  # Felix parameters the scanner reads begin with this
NAME_LIMIT = 253  # a node name (DNS subdomain), and the database column that holds it
# C0/C1 controls, lone surrogates and bidi overrides: never in a valid name, and in a terminal,
# a report or a database they reorder, hide or break the text around them
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                          "\u2066-\u2069\ud800-\udfff]")


@dataclass
class Api:
    """A thin, deadline-aware door to one cluster's API server.

    Calls the typed methods of the real client with `_preload_content=False`, so answers are
    parsed as plain JSON (fast on thousands of nodes, indifferent to CRD schemas).
    """

    client: Any
    timeout: float
    deadline: float  # time.monotonic() by which the whole collection must end
    cluster: str
    requests: int = 0
    sleep: Any = field(default=time.sleep)

    @property
    def core(self) -> Any:
        return k8s_client.CoreV1Api(self.client)

    @property
    def apps(self) -> Any:
        return k8s_client.AppsV1Api(self.client)

    @property
    def custom(self) -> Any:
        return k8s_client.CustomObjectsApi(self.client)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ApiUnreachable(f"deadline exceeded: the API did not answer all requests in time "
                                 f"({self.requests} requests made)")
        return left

    def get(self, what: str, method: Any, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        """Call one read method and return its JSON; None on 404.

        Retries 429 and 5xx with backoff (Retry-After honoured), within the deadline.
        """
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            timeout = min(self.timeout, self.remaining())
            self.requests += 1
            try:
                resp = method(*args, **kwargs, _preload_content=False,
                              _request_timeout=(min(timeout, 5.0), timeout))
                body = resp.data
            except ApiException as exc:
                if exc.status == 404:
                    return None
                if exc.status == 0:  # the client wraps TLS failures this way
                    raise ApiUnreachable(f"{what}: {_transport_reason(exc, timeout)}") from None
                if exc.status in (401, 403):
                    hint = (" (the API server refused the credentials)" if exc.status == 401
                            else "")
                    raise ApiForbidden(f"{what}: {exc.status} {status_message(exc)}{hint}",
                                       status=exc.status) from None
                if exc.status in _RETRY_STATUS and attempt < _MAX_ATTEMPTS:
                    self._backoff(attempt, exc)
                    continue
                raise ApiError(f"{what}: {exc.status} {status_message(exc)}"
                               + (f" (after {attempt} attempts)" if attempt > 1 else ""),
                               status=exc.status) from None
            except urllib3.exceptions.HTTPError as exc:
                reason = _transport_reason(exc, timeout)
                if timeout < self.timeout and "timed out" in reason:
                    reason = (f"deadline exceeded: the cluster's deadline ran out during this "
                              f"request ({self.requests} requests made)")
                raise ApiUnreachable(f"{what}: {reason}") from None
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(f"{what}: the answer is not valid JSON ({exc})") from None
            if not isinstance(doc, dict):
                raise ApiError(f"{what}: expected a JSON object, got {type(doc).__name__}")
            return doc
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, exc: ApiException) -> None:
        retry_after = None
        headers = exc.headers or {}
        raw = headers.get("Retry-After") if hasattr(headers, "get") else None
        if raw and str(raw).isdigit():
            retry_after = float(raw)
        delay = retry_after if retry_after is not None else 0.2 * 2 ** (attempt - 1)
        delay += random.uniform(0, 0.1)
        left = self.remaining()
        if delay >= left:
            asked = f" (Retry-After: {raw} s)" if retry_after is not None else ""
            raise ApiUnreachable(f"deadline exceeded: HTTP {exc.status} asks to wait "
                                 f"{delay:.1f} s{asked}, the cluster's deadline is {left:.1f} s "
                                 f"away ({self.requests} requests made)")
        self.sleep(delay)

    def list(self, what: str, method: Any, *args: Any, **kwargs: Any
             ) -> Iterator[dict[str, Any]] | None:
        """Every item of a list, paged with limit/continue; None when the resource is not served.

        A continue token that expired (410 Gone) restarts the list, a few times at most, so a
        list that changes under us still yields one consistent view.
        """
        def page(token: str | None) -> dict[str, Any] | None:
            extra = {"_continue": token} if token else {}
            doc = self.get(what, method, *args, **kwargs, limit=PAGE_SIZE, **extra)
            if doc is not None and not isinstance(doc.get("items") or [], list):
                raise ApiError(f"{what}: `items` is not a list")
            return doc

        first = page(None)
        if first is None:
            return None
        return self._pages(what, page, first)

    def _pages(self, what: str, page: Any, first: dict[str, Any]) -> Iterator[dict[str, Any]]:
        relists = 0
        while True:
            items: list[dict[str, Any]] = []
            current: dict[str, Any] | None = first
            expired = False
            while current is not None:
                batch = current.get("items") or []
                if not all(isinstance(i, dict) for i in batch):
                    raise ApiError(f"{what}: `items` holds something that is not an object")
                items.extend(batch)
                token = (current.get("metadata") or {}).get("continue")
                if not token:
                    break
                try:
                    current = page(token)
                except ApiError as exc:
                    if exc.status != 410:
                        raise
                    expired = True
                    break
                if current is None:
                    raise ApiError(f"{what}: the list vanished while paging (404)")
            if not expired:
                yield from items
                return
            relists += 1
            if relists > _MAX_RELISTS:
                raise ApiError(f"{what}: the list kept changing while paging "
                               f"(410 Gone {relists} times)", status=410)
            restart = page(None)
            if restart is None:
                raise ApiError(f"{what}: the list vanished while paging (404)")
            first = restart


def _printable(text: str, limit: int = NAME_LIMIT) -> str:
    """`text` as it may be shown and stored: controls escaped (`\\x1b`), at most `limit` chars.

    Valid Kubernetes names never change. A longer name is cut and ends in a digest of the
    whole, so two long names that share a prefix stay distinct.
    """
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                            else f"\\u{ord(m.group()):04x}", text)
    if len(text) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        text = f"{text[:limit - 13]}\u2026{digest}"
    return text


def status_message(exc: ApiException) -> str:
    """The apiserver's Status message (never the request, which may carry credentials)."""
    reason = exc.reason or ""
    try:
        body = json.loads(exc.body or b"")
    except (ValueError, TypeError):
        return reason
    if isinstance(body, dict) and body.get("message"):
        return f"{reason}: {_printable(str(body['message']), 300)}"
    return reason


def _transport_reason(exc: BaseException, timeout: float) -> str:
    """Why a request got no answer, and from which API server (kubeconfig context)."""
    return f"{_failure(exc, timeout)}{_where(exc)}"


def _failure(exc: BaseException, timeout: float) -> str:
    text = str(getattr(exc, "reason", None) or exc)
    low = text.lower()
    if "timed out" in low or isinstance(exc, urllib3.exceptions.TimeoutError):
        return f"no answer within {timeout:.1f}s (timed out)"
    if "certificate" in low or "ssl" in low or isinstance(exc, urllib3.exceptions.SSLError):
        match = re.search(r"\[SSL[^\]]*\][^(')]*", text)
        return f"TLS failure: {match.group(0).strip() if match else 'handshake failed'}"
    if "refused" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "API host name does not resolve"
    return f"connection failed ({type(exc).__name__})"


def _where(exc: BaseException) -> str:
    """`; API server URL, kubeconfig context NAME`, from the pool the failure came from.

    urllib3's errors carry their connection pool, and the pool the `_Retry` that `make_api`
    made for this cluster, which knows both.
    """
    retries = getattr(getattr(exc, "pool", None), "retries", None)
    where = retries.where if isinstance(retries, _Retry) else ""
    return f"; {where}" if where else ""


class _Retry(urllib3.Retry):
    """urllib3's Retry, plus where it retries: the API server and its kubeconfig context."""

    where: str = ""


# --- the client --------------------------------------------------------------------------


def make_api(settings: ClusterSettings, *, deadline: float) -> Api:
    """A client for the cluster from its kubeconfig context or in-cluster service account.

    An exec credential plugin gets what is left of `deadline` (here and when the client runs
    it again to refresh an expired token on this thread), then it is stopped: see
    `_BoundedPopen`.
    """
    configuration = k8s_client.Configuration()
    _bound_exec_plugins(seconds=deadline - time.monotonic())
    try:
        if settings.in_cluster:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
        else:
            with _CredentialErrors() as logged:
                k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=str(settings.kubeconfig) if settings.kubeconfig else None,
                    context=settings.context, client_configuration=configuration,
                    persist_config=False)
            stopped = _EXEC_LIMIT.stopped
            if stopped is not None:
                _EXEC_LIMIT.stopped = None
                raise ClusterError(f"the kubeconfig's credentials could not be obtained: "
                                   f"{stopped}")
            if logged.messages:
                raise ClusterError("the kubeconfig's credentials could not be obtained: "
                                   f"{_clean(logged.messages[0])}")
    except ConfigException as exc:
        raise ClusterError(f"cannot use the kubeconfig credentials: {_clean(str(exc))}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # An exec credential plugin that fails or prints garbage surfaces here.
        raise ClusterError(f"cannot load credentials ({type(exc).__name__}: "
                           f"{_clean(str(exc))})") from None
    _warn_plaintext_credentials(settings, configuration)
    # urllib3 retries connection failures itself (twice), never a read that timed out: a
    # hanging API costs one timeout, not four. Statuses are ours to retry (Api.get): left on,
    # urllib3 treats a 429/503 with Retry-After as a retry and, with status=0, fails it as
    # "MaxRetryError" before our backoff ever sees it.
    retries = _Retry(total=2, connect=2, read=0, status=0, redirect=0, backoff_factor=0.1,
                     respect_retry_after_header=False)
    retries.where = (f"API server {configuration.host}, "
                     + ("in-cluster service account" if settings.in_cluster
                        else f"kubeconfig context {_context_name(settings)}"))
    configuration.retries = retries
    api_client = k8s_client.ApiClient(configuration)
    return Api(client=api_client, timeout=settings.api_timeout_seconds, deadline=deadline,
               cluster=settings.name)


def _context_name(settings: ClusterSettings) -> str:
    if settings.context:
        return settings.context
    try:
        _contexts, current = k8s_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=str(settings.kubeconfig) if settings.kubeconfig else None)
        return str(current["name"])
    except (ConfigException, OSError, ValueError, KeyError, TypeError):
        return "(the current context)"


def _kubeconfig_user(settings: ClusterSettings) -> dict[str, Any]:
    """The `user` entry of the cluster's kubeconfig context ({} when it cannot be found)."""
    try:
        path = settings.kubeconfig or os.path.expanduser(k8s_config.KUBE_CONFIG_DEFAULT_LOCATION)
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        name = settings.context or doc.get("current-context")
        context = next(c["context"] for c in doc.get("contexts") or [] if c.get("name") == name)
        user = next(u["user"] for u in doc.get("users") or []
                    if u.get("name") == context.get("user"))
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, StopIteration):
        return {}
    return user if isinstance(user, dict) else {}


# Clusters (with their server) already warned about sending credentials over plain HTTP: once
# per process is enough for a setting that only changes when the kubeconfig does.
_WARNED_PLAINTEXT: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


def _warn_plaintext_credentials(settings: ClusterSettings, configuration: Any) -> None:
    """Warn (never showing them) when credentials go to an http:// API server."""
    server = str(configuration.host or "")
    if not server.lower().startswith("http://"):
        return
    # The client keeps the Authorization value under "BearerToken" (older: "authorization").
    headers = [str(v) for v in (configuration.api_key or {}).values() if v]
    sends = ("a bearer token" if any(h.lower().startswith("bearer ") for h in headers)
             else "a basic-auth password" if any(h.lower().startswith("basic ") for h in headers)
             else "credentials" if headers else None)
    # For an http:// server the client loads no client certificate from the kubeconfig (an
    # exec plugin's is kept): look at the user entry itself.
    has_key = bool(configuration.cert_file or configuration.key_file
                   or {"client-key", "client-key-data"} & set(_kubeconfig_user(settings)))
    if sends is None and not has_key:
        return
    with _WARNED_LOCK:
        if (settings.name, server) in _WARNED_PLAINTEXT:
            return
        _WARNED_PLAINTEXT.add((settings.name, server))
    parts = []
    if sends:
        parts.append(f"sends {sends} to {server} over plain HTTP, in clear text: anyone on "
                     "the path can read and reuse it")
    if has_key:
        parts.append(f"{'also ' if sends else ''}gives a client certificate and key for "
                     f"{server}, which are never presented without TLS (the server sees no "
                     "client certificate)")
    logging.getLogger(__name__).warning(
        "cluster %s: the kubeconfig %s; use the server's https:// address", settings.name,
        "; it ".join(parts))


# --- exec credential plugins, time-limited -------------------------------------------------
#
# The kubernetes client runs an exec plugin with `subprocess.Popen(...).communicate()` and no
# timeout, in ExecProvider.run, both when the kubeconfig is loaded and whenever an expired token
# is refreshed before a request. A thread waiting on it cannot be interrupted, and a worker
# thread with a timeout would leave the plugin running. So the client's exec module is given
# a `subprocess` whose Popen bounds `communicate()` and, past the bound, kills the plugin's
# whole process group (a plugin is often a script whose child holds the pipes). Installed once
# for the process; the bound is per thread, set by `make_api` on the thread that then uses
# the client. Everything else of `subprocess` is the real module.

EXEC_PLUGIN_DEFAULT_SECONDS = 60.0  # for a thread on which make_api set no bound


class _ExecLimit(threading.local):
    seconds: float = EXEC_PLUGIN_DEFAULT_SECONDS
    stopped: str | None = None  # why the last plugin run on this thread was stopped


_EXEC_LIMIT = _ExecLimit()


class _BoundedPopen(subprocess.Popen[Any]):
    """Popen for exec credential plugins: `communicate()` ends within this thread's bound."""

    def __init__(self, args: Any, **kwargs: Any) -> None:
        # Its own process group, so that stopping it stops what it started. Not when it talks
        # to the user's terminal (interactive login): a background group reading the terminal
        # would be stopped by SIGTTIN.
        self._own_group = kwargs.get("stdin") is None
        if self._own_group:
            kwargs["process_group"] = 0
        self._command = str(args[0] if isinstance(args, list | tuple) and args else args)
        super().__init__(args, **kwargs)

    def communicate(self, input: Any = None,
                    timeout: float | None = None) -> tuple[Any, Any]:
        bound = max(_EXEC_LIMIT.seconds, 0.1) if timeout is None else timeout
        try:
            return super().communicate(input, timeout=bound)
        except subprocess.TimeoutExpired:
            self._stop()
            why = (f"exec: credential plugin {self._command} gave no answer within "
                   f"{bound:.1f} s (what was left of the cluster's deadline); it was stopped"
                   + (", with the processes it started" if self._own_group else ""))
            _EXEC_LIMIT.stopped = why
            raise ConfigException(why) from None
        except BaseException:
            self._stop()  # Ctrl-C: a plugin in its own group would not get the SIGINT
            raise

    def _stop(self) -> None:
        try:
            if self._own_group:
                os.killpg(self.pid, signal.SIGKILL)
            else:
                self.kill()
        except ProcessLookupError:
            pass
        try:
            super().communicate(timeout=2)
        except subprocess.TimeoutExpired:
            # Outside its group, a child of the plugin may still hold the pipes: let it.
            for stream in (self.stdout, self.stderr):
                if stream is not None:
                    stream.close()
            self.wait(timeout=2)


class _BoundedSubprocess:
    """`subprocess` as the kubernetes client's exec module sees it: only Popen differs."""

    Popen = _BoundedPopen

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def _bound_exec_plugins(*, seconds: float) -> None:
    """Install the bounded Popen (once) and set this thread's bound for exec plugins."""
    if not isinstance(getattr(k8s_exec_provider, "subprocess", None), _BoundedSubprocess):
        # setattr: the module does not export `subprocess`, and it is replaced on purpose
        setattr(k8s_exec_provider, "subprocess", _BoundedSubprocess())  # noqa: B010
    _EXEC_LIMIT.seconds = seconds
    _EXEC_LIMIT.stopped = None


class _CredentialErrors(logging.Filter):
    """What the kubernetes client logs at ERROR, on this thread, while loading a kubeconfig.

    A failing exec credential plugin (non-zero exit, garbage on stdout) is logged there and the
    client goes on without credentials, which would surface later as a bare "401 Unauthorized".
    The records are kept here, and not printed, so the cluster's error can say what failed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or record.levelno < logging.ERROR:
            return True
        self.messages.append(record.getMessage())
        return False

    def __enter__(self) -> _CredentialErrors:
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self)


def _clean(text: str) -> str:
    # Kubeconfig errors can quote file content; keep the first line and cut tokens short.
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return re.sub(r"[A-Za-z0-9+/=_\-.]{40,}", "<redacted>", first)[:300]


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
                       f"({type(exc).__name__}: {_clean(str(exc))})") from exc
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
        port = (installation_doc.get("spec") or {}).get("nodeMetricsPort")
        installation = Installation(name="default",
                                    node_metrics_port=port if isinstance(port, int) else None)
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
    pods = _pods(api, namespace, settings.calico.container, readers, revisions)
    nodes = _nodes(api)
    groups = {api_group(env, "") for env in [template.env, *(p.env for p in pods if p.env)]}
    discovered = _discover_group(api)
    felix_sets = {g: _felix_configs(api, g) for g in sorted((groups - {""}) | {discovered})}
    main = felix_sets[discovered]
    return ClusterSnapshot(
        cluster=settings.name, install=install, namespace=namespace,
        daemonset=settings.calico.daemonset, container=settings.calico.container,
        image=template.image, env=template.env, config_file=template.config_file,
        felix_configs=main.configs, felix_crd=main.error is None, installation=installation,
        rollout=rollout, pods=pods, nodes=nodes, collected_at=datetime.now(UTC),
        api_seconds=time.monotonic() - started, felix_sets=felix_sets, felix_group=discovered)


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
                               f"object ({_printable(str(meta.get('namespace')))}/"
                               f"{_printable(str(meta.get('name')))})")
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


def _resolve_env(objects: _Objects, namespace: str,
                 container: Mapping[str, Any]) -> tuple[EnvVar, ...]:
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
                    for read in PARAMS:
                        full = f"FELIX_{read.upper()}"
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
                param = _relevant(env_name)
                if what == "configmap":
                    plain[env_name] = value
                if param:
                    redacted = what == "secret"
                    resolved[env_name] = EnvVar(
                        name=env_name, origin=f"{origin}[{key}]", redacted=redacted,
                        value=_secret_stand_in(param, value) if redacted else value)
    for entry in container.get("env") or []:
        if not isinstance(entry, dict) or "name" not in entry:
            continue
        env_name = str(entry["name"])
        param = _relevant(env_name)
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
        var = _value_from(objects, env_name, param or "", entry["valueFrom"])
        if var.value is not None or var.error:
            resolved[env_name] = var
        # An optional reference that is missing sets nothing: an envFrom value stays.
    return tuple(v for v in resolved.values() if v.value is not None or v.error)


def _value_from(objects: _Objects, env_name: str, param: str, spec: Any) -> EnvVar:
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
            return EnvVar(name=env_name, value=_secret_stand_in(param, data[key]), origin=origin,
                          redacted=True)
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
                 pod_spec: Mapping[str, Any]) -> ConfigFile:
    """Whether a volume replaces /etc/calico/felix.cfg, and what it says when we can read it."""
    mount = None
    for m in container.get("volumeMounts") or []:
        path = str(m.get("mountPath", "")).rstrip("/")
        covers = bool(path) and (path == CONFIG_FILE or CONFIG_FILE.startswith(path + "/"))
        if covers and (mount is None or len(path) > len(str(mount.get("mountPath")))):
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
        if mount_path == CONFIG_FILE:
            key = str(mount.get("subPath") or "felix.cfg")
        else:
            rel = CONFIG_FILE[len(mount_path) + 1:]
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
            values = _parse_felix_cfg(data[key])
        except ConfigFileError as exc:
            return ConfigFile(known=True, values={}, origin=origin, invalid=str(exc)[:300])
        if what == "secret":
            values = {k: _secret_stand_in(k.lower(), v) for k, v in values.items()}
        return ConfigFile(known=True, values=values, origin=origin)
    kind = next((k for k in volume if k != "name"), "unknown")
    return ConfigFile(known=False, values={}, origin=f"{kind} volume {volume.get('name')}",
                      error=f"{CONFIG_FILE} comes from a {kind} volume whose content the "
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
    doc = api.get("GET /apis", k8s_client.ApisApi(api.client).get_api_versions)
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
            name=_printable(str(meta.get("name"))),
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


def _pods(api: Api, namespace: str, container: str, readers: _PodReaders,
          revisions: Mapping[str, str]) -> tuple[Pod, ...]:
    """Every pod of the namespace that runs the calico-node container, whoever owns it, each
    with the env and config file of its own spec (an old revision runs its old env)."""
    items = api.list(f"LIST pods in {namespace}", api.core.list_namespaced_pod, namespace)
    pods = []
    for item in items or []:
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
        pods.append(Pod(name=_printable(str(meta.get("name"))),
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
    return None if value is None else _printable(str(value), limit)


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
        addresses = tuple((_printable(str(a.get("type")), 64), _printable(str(a.get("address"))))
                          for a in status.get("addresses") or [] if a.get("address"))
        labels = node_labels({str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
                             {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()})
        nodes.append(Node(name=_printable(str(meta.get("name"))), addresses=addresses, ready=ready,
                          labels=labels or {}))
    return tuple(nodes)
