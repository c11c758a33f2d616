"""The Kubernetes API client of felixscan: one `Api` per cluster (raw JSON answers, a timeout
per request, a deadline per cluster, retries, paging), built from the cluster's kubeconfig or
in-cluster account by `make_api`, with exec credential plugins bounded by the deadline.
`scanner.kube.read` (the scan) and `scanner.kube.write` (remediation) both go through it; API
failures become the errors of `scanner.core.errors`.

Two transports under one `Api`. The scan's reads go straight over urllib3 (`_Rest`: the few
GET and LIST endpoints it uses, the requests the `kubernetes` client would send) when the
credentials are plain ones this module reads itself (`_light_connection`: a token, a client
certificate and key, a CA, insecure-skip-tls-verify, tls-server-name, the in-cluster service
account); importing the `kubernetes` client costs half a second, more than a scan's first
request should wait. Everything else (exec and auth-provider plugins, token files, proxies,
merged kubeconfigs, any kubeconfig the light reader does not take as it is, and remediation's
writes) goes through the real `kubernetes` client, imported then, so its messages stay its own.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import urllib3
import yaml

from scanner.core.config import ClusterSettings
from scanner.core.errors import ApiError, ApiForbidden, ApiUnreachable, ClusterError

PAGE_SIZE = 500
MANIFEST_NAMESPACE = "kube-system"
OPERATOR_NAMESPACE = "calico-system"
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_ATTEMPTS = 4
_MAX_RELISTS = 3
NAME_LIMIT = 253  # a node name (DNS subdomain), and the database column that holds it
# C0/C1 controls, lone surrogates and bidi overrides: never in a valid name, and in a terminal,
# a report or a database they reorder, hide or break the text around them
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                          "\u2066-\u2069\ud800-\udfff]")


class StatusError(Exception):
    """An answer that is not 2xx, or a TLS failure (status 0), from `_Rest`: what the
    `kubernetes` client's ApiException carries (status, reason, body, headers)."""

    def __init__(self, status: int, reason: str | None, body: str | None = None,
                 headers: Any = None) -> None:
        super().__init__(f"({status}) {reason}")
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = headers


@dataclass
class Api:
    """A thin, deadline-aware door to one cluster's API server.

    Calls read methods named as the `kubernetes` client names them (`api.core.list_node`) with
    `_preload_content=False`, so answers are parsed as plain JSON (fast on thousands of nodes,
    indifferent to CRD schemas). `client` is a `_Rest` (direct requests) or the `kubernetes`
    client's ApiClient; `errors` are the exceptions that carry an HTTP status for it.
    """

    client: Any
    timeout: float
    deadline: float  # time.monotonic() by which the whole collection must end
    cluster: str
    requests: int = 0
    sleep: Any = field(default=time.sleep)
    errors: tuple[type[BaseException], ...] = (StatusError,)

    @property
    def core(self) -> Any:
        if isinstance(self.client, _Rest):
            return self.client
        from kubernetes import client as k8s_client
        return k8s_client.CoreV1Api(self.client)

    @property
    def apps(self) -> Any:
        if isinstance(self.client, _Rest):
            return self.client
        from kubernetes import client as k8s_client
        return k8s_client.AppsV1Api(self.client)

    @property
    def custom(self) -> Any:
        if isinstance(self.client, _Rest):
            return self.client
        from kubernetes import client as k8s_client
        return k8s_client.CustomObjectsApi(self.client)

    @property
    def apis(self) -> Any:
        """The API groups (`get_api_versions`, GET /apis)."""
        if isinstance(self.client, _Rest):
            return self.client
        from kubernetes import client as k8s_client
        return k8s_client.ApisApi(self.client)

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
        body = self._call(what, method, *args, **kwargs)
        if body is None:
            return None
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(f"{what}: the answer is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ApiError(f"{what}: expected a JSON object, got {type(doc).__name__}")
        return doc

    def get_text(self, what: str, method: Any, *args: Any, **kwargs: Any) -> str | None:
        """Like `get`, for a plain-text answer (a pod's log); None on 404. Bytes that are
        not UTF-8 are replaced, not fatal: a log is read, never trusted."""
        body = self._call(what, method, *args, **kwargs)
        return None if body is None else bytes(body).decode("utf-8", "replace")

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> bytes | None:
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            timeout = min(self.timeout, self.remaining())
            self.requests += 1
            try:
                resp = method(*args, **kwargs, _preload_content=False,
                              _request_timeout=(min(timeout, 5.0), timeout))
                body: bytes = resp.data
            except self.errors as caught:
                exc: Any = caught  # StatusError or the kubernetes client's ApiException
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
            return body
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, exc: Any) -> None:
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


def printable(text: str, limit: int = NAME_LIMIT) -> str:
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


def status_message(exc: Any) -> str:
    """The apiserver's Status message (never the request, which may carry credentials)."""
    reason = exc.reason or ""
    try:
        body = json.loads(exc.body or b"")
    except (ValueError, TypeError):
        return reason
    if isinstance(body, dict) and body.get("message"):
        return f"{reason}: {printable(str(body['message']), 300)}"
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


def make_api(settings: ClusterSettings, *, deadline: float, writes: bool = False) -> Api:
    """A client for the cluster from its kubeconfig context or in-cluster service account.

    Reads go over `_Rest` when `_light_connection` takes the credentials; `writes=True` (and
    any credentials it does not take) get the `kubernetes` client. An exec credential plugin
    gets what is left of `deadline` (here and when the client runs it again to refresh an
    expired token on this thread), then it is stopped: see `_BoundedPopen`.
    """
    connection = None if writes else _light_connection(settings)
    if connection is None:
        return _kubernetes_api(settings, deadline=deadline)
    _warn_plaintext_credentials(settings, connection)
    retries = _retries(connection.host, settings, context=connection.context)
    return Api(client=_Rest(connection, retries), timeout=settings.api_timeout_seconds,
               deadline=deadline, cluster=settings.name)


def _retries(host: str, settings: ClusterSettings, *, context: str | None = None) -> _Retry:
    # urllib3 retries connection failures itself (twice), never a read that timed out: a
    # hanging API costs one timeout, not four. Statuses are ours to retry (Api.get): left on,
    # urllib3 treats a 429/503 with Retry-After as a retry and, with status=0, fails it as
    # "MaxRetryError" before our backoff ever sees it.
    retries = _Retry(total=2, connect=2, read=0, status=0, redirect=0, backoff_factor=0.1,
                     respect_retry_after_header=False)
    retries.where = (f"API server {host}, "
                     + ("in-cluster service account" if settings.in_cluster
                        else f"kubeconfig context {context or _context_name(settings)}"))
    return retries


def _kubernetes_api(settings: ClusterSettings, *, deadline: float) -> Api:
    """`make_api` over the real `kubernetes` client (imported here, on this path only)."""
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

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
                                   f"{clean_text(logged.messages[0])}")
    except ConfigException as exc:
        raise ClusterError("cannot use the kubeconfig credentials: "
                           f"{clean_text(str(exc))}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # An exec credential plugin that fails or prints garbage surfaces here.
        raise ClusterError(f"cannot load credentials ({type(exc).__name__}: "
                           f"{clean_text(str(exc))})") from None
    _warn_plaintext_credentials(settings, configuration)
    configuration.retries = _retries(str(configuration.host), settings)
    api_client = k8s_client.ApiClient(configuration)
    return Api(client=api_client, timeout=settings.api_timeout_seconds, deadline=deadline,
               cluster=settings.name, errors=(StatusError, ApiException))


def _context_name(settings: ClusterSettings) -> str:
    if settings.context:
        return settings.context
    from kubernetes import config as k8s_config
    from kubernetes.config.config_exception import ConfigException
    try:
        _contexts, current = k8s_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=str(settings.kubeconfig) if settings.kubeconfig else None)
        return str(current["name"])
    except (ConfigException, OSError, ValueError, KeyError, TypeError):
        return "(the current context)"


def _default_kubeconfig() -> str:
    """The kubeconfig the `kubernetes` client reads when none is named: $KUBECONFIG (which
    may list several, merged) or ~/.kube/config."""
    return os.path.expanduser(os.environ.get("KUBECONFIG", "~/.kube/config"))


def _kubeconfig_user(settings: ClusterSettings) -> dict[str, Any]:
    """The `user` entry of the cluster's kubeconfig context ({} when it cannot be found)."""
    try:
        path = settings.kubeconfig or _default_kubeconfig()
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        name = settings.context or doc.get("current-context")
        context = next(c["context"] for c in doc.get("contexts") or [] if c.get("name") == name)
        user = next(u["user"] for u in doc.get("users") or []
                    if u.get("name") == context.get("user"))
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, StopIteration):
        return {}
    return user if isinstance(user, dict) else {}


# --- the direct transport -----------------------------------------------------------------

SERVICE_HOST_ENV_NAME = "KUBERNETES_SERVICE_HOST"
SERVICE_PORT_ENV_NAME = "KUBERNETES_SERVICE_PORT"
SERVICE_TOKEN_FILENAME = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105
SERVICE_CERT_FILENAME = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
_TOKEN_REREAD_SECONDS = 60.0  # the in-cluster token is read again after this (it rotates)
# What the light reader takes from a kubeconfig's cluster and user entries; any other key
# (exec, auth-provider, tokenFile, proxy-url, impersonation...) is the kubernetes client's.
_CLUSTER_KEYS = frozenset({"server", "certificate-authority", "certificate-authority-data",
                           "insecure-skip-tls-verify", "tls-server-name", "extensions"})
_USER_KEYS = frozenset({"token", "client-certificate", "client-certificate-data",
                        "client-key", "client-key-data", "username", "password",
                        "extensions"})


# libyaml's safe loader when PyYAML has it: a kubeconfig's base64 certificates are slow to scan
# in pure Python.
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class _Connection:
    """What `_Rest` needs of a cluster's credentials, named as the kubernetes client's
    Configuration names it (`_warn_plaintext_credentials` reads either)."""

    host: str
    api_key: dict[str, str] = field(default_factory=dict)
    ssl_ca_cert: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_ssl: bool = True
    tls_server_name: str | None = None
    context: str | None = None  # the kubeconfig context, for messages
    token_file: str | None = None  # in-cluster: the token is read again from here
    token_read_at: float = 0.0


def _light_connection(settings: ClusterSettings) -> _Connection | None:
    """The cluster's credentials as this module reads them, or None for the kubernetes client.

    None for anything the light reader does not take exactly as the kubernetes client would,
    including every kubeconfig the client would reject: the client then says why, as before.
    """
    try:
        if settings.in_cluster:
            return _incluster_connection()
        return _kubeconfig_connection(settings)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError):
        return None


def _incluster_connection() -> _Connection | None:
    host = os.environ.get(SERVICE_HOST_ENV_NAME)
    port = os.environ.get(SERVICE_PORT_ENV_NAME)
    if not host or not port or not os.path.isfile(SERVICE_TOKEN_FILENAME) \
            or not os.path.isfile(SERVICE_CERT_FILENAME):
        return None
    with open(SERVICE_CERT_FILENAME, encoding="utf-8") as fh:
        if not fh.read():
            return None
    with open(SERVICE_TOKEN_FILENAME, encoding="utf-8") as fh:
        token = fh.read()
    if not token:
        return None
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _Connection(host=f"https://{where}", api_key={"BearerToken": f"bearer {token}"},
                       ssl_ca_cert=SERVICE_CERT_FILENAME, token_file=SERVICE_TOKEN_FILENAME,
                       token_read_at=time.monotonic())


def _named(entries: Any, name: Any, key: str) -> dict[str, Any] | None:
    """The `key` mapping of the one entry called `name` in a kubeconfig list (None: not
    exactly one, or not a mapping)."""
    if not isinstance(entries, list) or not isinstance(name, str):
        return None
    found = [e for e in entries if isinstance(e, dict) and e.get("name") == name]
    if len(found) != 1 or not isinstance(found[0].get(key), dict):
        return None
    value: dict[str, Any] = found[0][key]
    return value


def _kubeconfig_connection(settings: ClusterSettings) -> _Connection | None:
    path = str(settings.kubeconfig) if settings.kubeconfig else _default_kubeconfig()
    if not settings.kubeconfig and os.pathsep in os.environ.get("KUBECONFIG", ""):
        return None  # several files, merged by the kubernetes client
    with open(path, encoding="utf-8") as fh:
        doc = yaml.load(fh, Loader=_SAFE_LOADER)  # noqa: S506 (a safe loader)
    if not isinstance(doc, dict):
        return None
    name = settings.context or doc.get("current-context")
    context = _named(doc.get("contexts"), name, "context")
    if context is None:
        return None
    cluster = _named(doc.get("clusters"), context.get("cluster"), "cluster")
    user: dict[str, Any] | None = {}
    if "user" in context:
        user = _named(doc.get("users"), context.get("user"), "user")
    if cluster is None or user is None or set(cluster) - _CLUSTER_KEYS \
            or set(user) - _USER_KEYS or not isinstance(cluster.get("server"), str):
        return None
    if not all(isinstance(v, str) for k, v in user.items() if k != "extensions"):
        return None
    base = os.path.abspath(os.path.dirname(path))
    conn = _Connection(host=cluster["server"].rstrip("/"), context=str(name))
    if user.get("token"):
        conn.api_key["BearerToken"] = f"Bearer {user['token']}"
    elif "token" not in user and "username" in user and "password" in user:
        conn.api_key["BearerToken"] = str(urllib3.util.make_headers(
            basic_auth=f"{user['username']}:{user['password']}")["authorization"])
    elif "token" in user:
        return None  # an empty token: the kubernetes client's rules from here on
    if conn.host.startswith("https"):
        conn.ssl_ca_cert = _file_or_data(cluster, "certificate-authority", base)
        conn.cert_file = _file_or_data(user, "client-certificate", base)
        conn.key_file = _file_or_data(user, "client-key", base)
    if "insecure-skip-tls-verify" in cluster:
        if not isinstance(cluster["insecure-skip-tls-verify"], bool):
            return None
        conn.verify_ssl = not cluster["insecure-skip-tls-verify"]
    if "tls-server-name" in cluster:
        if not isinstance(cluster["tls-server-name"], str):
            return None
        conn.tls_server_name = cluster["tls-server-name"] or None
    return conn


# Files written for certificates and keys given as data, by content: removed at exit.
_TEMP_FILES: dict[bytes, str] = {}
_TEMP_LOCK = threading.Lock()


def _file_or_data(entry: Mapping[str, Any], key: str, base: str) -> str | None:
    """The file for `key` (relative to the kubeconfig's folder) or for `key`-data (base64,
    written to a private temporary file), as the kubernetes client reads them; OSError when
    the file is missing (the client's "File does not exist")."""
    if f"{key}-data" in entry:
        data = entry[f"{key}-data"]
        if not data:
            return None
        if not isinstance(data, str):
            raise TypeError(f"{key}-data")
        return _temp_file(base64.standard_b64decode(data.encode()))
    if key in entry:
        if not isinstance(entry[key], str):
            raise TypeError(key)
        path = os.path.normpath(os.path.join(base, str(entry[key])))
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return path
    return None


def _temp_file(content: bytes) -> str:
    with _TEMP_LOCK:
        name = _TEMP_FILES.get(content)
        if name is not None and os.path.isfile(name):
            return name
        if not _TEMP_FILES:
            atexit.register(_remove_temp_files)
        fd, name = tempfile.mkstemp(prefix="felixscan-kube-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        _TEMP_FILES[content] = name
        return name


def _remove_temp_files() -> None:
    with _TEMP_LOCK:
        for name in _TEMP_FILES.values():
            with contextlib.suppress(OSError):
                os.remove(name)
        _TEMP_FILES.clear()


# Query parameters by the kubernetes client's argument names, in the order it sends them.
_QUERY = {"_continue": "continue", "field_selector": "fieldSelector",
          "label_selector": "labelSelector", "limit": "limit", "container": "container",
          "limit_bytes": "limitBytes", "tail_lines": "tailLines"}


class _Rest:
    """The read endpoints the scan uses, as direct GETs over one urllib3 pool manager.

    Each method takes the arguments of the `kubernetes` client method of the same name and
    sends the request it would send (path, query, Accept, Authorization); an answer that is
    not 2xx raises `StatusError` with its status, reason, body and headers, a TLS failure
    `StatusError(0, "SSLError\n...")`, and urllib3's own errors pass through: `Api._call`
    maps them all as it maps the kubernetes client's.
    """

    def __init__(self, connection: _Connection, retries: _Retry) -> None:
        self.connection = connection
        self._lock = threading.Lock()
        pool_args: dict[str, Any] = {
            "cert_reqs": ssl.CERT_REQUIRED if connection.verify_ssl else ssl.CERT_NONE,
            "ca_certs": connection.ssl_ca_cert,
            "cert_file": connection.cert_file,
            "key_file": connection.key_file,
            "retries": retries,
            "maxsize": (os.cpu_count() or 1) * 5,
        }
        if connection.tls_server_name:
            pool_args["server_hostname"] = connection.tls_server_name
        self.pool_manager = urllib3.PoolManager(**pool_args)

    def close(self) -> None:
        self.pool_manager.clear()

    # -- core/v1
    def list_node(self, **kw: Any) -> Any:
        return self._get("/api/v1/nodes", kw)

    def list_namespaced_pod(self, namespace: str, **kw: Any) -> Any:
        return self._get(f"/api/v1/namespaces/{_p(namespace)}/pods", kw)

    def read_namespaced_pod_log(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._get(f"/api/v1/namespaces/{_p(namespace)}/pods/{_p(name)}/log", kw)

    def read_namespaced_config_map(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._get(f"/api/v1/namespaces/{_p(namespace)}/configmaps/{_p(name)}", kw)

    def read_namespaced_secret(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._get(f"/api/v1/namespaces/{_p(namespace)}/secrets/{_p(name)}", kw)

    # -- apps/v1
    def read_namespaced_daemon_set(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._get(f"/apis/apps/v1/namespaces/{_p(namespace)}/daemonsets/{_p(name)}", kw)

    def read_namespaced_deployment(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._get(f"/apis/apps/v1/namespaces/{_p(namespace)}/deployments/{_p(name)}",
                         kw)

    def list_namespaced_controller_revision(self, namespace: str, **kw: Any) -> Any:
        return self._get(f"/apis/apps/v1/namespaces/{_p(namespace)}/controllerrevisions", kw)

    # -- custom objects and discovery
    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                  **kw: Any) -> Any:
        return self._get(f"/apis/{_p(group)}/{_p(version)}/{_p(plural)}/{_p(name)}", kw)

    def list_cluster_custom_object(self, group: str, version: str, plural: str,
                                   **kw: Any) -> Any:
        return self._get(f"/apis/{_p(group)}/{_p(version)}/{_p(plural)}", kw)

    def get_api_versions(self, **kw: Any) -> Any:
        return self._get("/apis/", kw)

    def _get(self, path: str, kw: dict[str, Any]) -> Any:
        timeout = kw.pop("_request_timeout", None)
        kw.pop("_preload_content", None)
        unknown = set(kw) - set(_QUERY)
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        query = "&".join(f"{_QUERY[k]}={quote(_q(kw[k]))}" for k in _QUERY
                         if kw.get(k) is not None)
        url = self.connection.host + path + (f"?{query}" if query else "")
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        authorization = self._authorization()
        if authorization:
            headers["authorization"] = authorization
        try:
            resp = self.pool_manager.request(
                "GET", url, headers=headers, preload_content=False,
                timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]) if timeout
                else None)
        except urllib3.exceptions.SSLError as exc:
            raise StatusError(0, f"{type(exc).__name__}\n{exc}") from None
        if not 200 <= resp.status <= 299:
            data = resp.data
            try:
                body: str | None = data.decode("utf-8")
            except UnicodeDecodeError:
                body = None
            raise StatusError(resp.status, resp.reason, body, resp.headers)
        return resp

    def _authorization(self) -> str | None:
        conn = self.connection
        if conn.token_file and time.monotonic() - conn.token_read_at >= _TOKEN_REREAD_SECONDS:
            with self._lock:
                try:
                    with open(conn.token_file, encoding="utf-8") as fh:
                        token = fh.read()
                except OSError:
                    token = ""
                if token:
                    conn.api_key["BearerToken"] = f"bearer {token}"
                conn.token_read_at = time.monotonic()
        return conn.api_key.get("BearerToken")


USER_AGENT = "OpenAPI-Generator/37.0.2/python"  # what the kubernetes client this replaces sends


def _p(value: str) -> str:
    """A path segment, every reserved character encoded (as the kubernetes client does)."""
    return quote(str(value), safe="")


def _q(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


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
            from kubernetes.config.config_exception import ConfigException
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
    from kubernetes.config import exec_provider as k8s_exec_provider
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


def clean_text(text: str) -> str:
    # Kubeconfig errors can quote file content; keep the first line and cut tokens short.
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return re.sub(r"[A-Za-z0-9+/=_\-.]{40,}", "<redacted>", first)[:300]
