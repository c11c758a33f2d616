"""An emulated Kubernetes API server for tests and `felixscan demo`: the `KubeEmulator` facade.

It serves the REST protocol over real HTTP(S) to the real `kubernetes` client by composing its
sibling modules: store, rest, logs, selectors, patches, faults, rbac, discovery, http, kubeconfig.
"""

from __future__ import annotations

import base64
import random
import re
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

from scanner.emulator.certs import make_ca, make_signed, server_ssl_context
from scanner.emulator.discovery import HEALTH_PATHS, non_resource
from scanner.emulator.errors import ApiError, status_body
from scanner.emulator.faults import Fault, FaultInjector, fault_answer
from scanner.emulator.http import (
    ApiHttpServer,
    Connections,
    RecordedRequest,
    Request,
    Response,
    error_response,
    record_of,
)
from scanner.emulator.kubeconfig import merge_entries, write_config, write_kubeconfig
from scanner.emulator.logs import PodLogs, container_for
from scanner.emulator.patches import (
    JsonPatchError,
    apply_patch,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)
from scanner.emulator.rbac import Authorizer, RbacRules, bearer_matches, unauthorized
from scanner.emulator.resources import (
    BUILTIN_RESOURCES,
    JsonDict,
    ResourceType,
    clone,
    manifest_objects,
)
from scanner.emulator.rest import RestApi
from scanner.emulator.selectors import LabelRequirement, parse_label_selector
from scanner.emulator.store import Change, ChangeType, Store

# names that lived here before the split stay importable from here
__all__ = [
    "BUILTIN_RESOURCES",
    "KUBERNETES_VERSION",
    "ApiError",
    "Change",
    "ChangeType",
    "Fault",
    "JsonDict",
    "JsonPatchError",
    "KubeEmulator",
    "LabelRequirement",
    "RecordedRequest",
    "ResourceType",
    "json_patch",
    "merge_patch",
    "parse_label_selector",
    "status_body",
    "strategic_merge_patch",
    "write_kubeconfig",
]

KUBERNETES_VERSION = "v1.33.1"


class KubeEmulator:
    """An in-process Kubernetes API server on 127.0.0.1 for the real `kubernetes` client.

    ::

        with KubeEmulator(tls=True) as emu:
            emu.register_calico_crds()
            emu.load_yaml(Path("tests/fixtures/calico/v3.32.1-calico-daemonset-calico-node.yaml"))
            kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")

    The store is usable before `start()`; `url` and the kubeconfig need a started server. The
    server can be stopped and started again (same port, same objects) to emulate an outage.
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        token: str | None = "emulator-token",  # noqa: S107 - a well-known test credential
        host: str = "127.0.0.1",
        port: int = 0,
        user: str = "system:serviceaccount:felixscan:felixscan",
        continue_expiry_writes: int | None = None,
        kubernetes_version: str = KUBERNETES_VERSION,
        seed: int | None = None,
        cert_not_after: datetime | None = None,
    ) -> None:
        """`continue_expiry_writes`: a continue token (or watch resourceVersion) older than that
        many writes answers 410 Expired, like after an etcd compaction; None = only after
        `expire_continue_tokens()`. `user` is the identity named in RBAC 403 messages.
        `cert_not_after` in the past serves an expired certificate (from the kubeconfig's CA)."""
        self.tls = tls
        self.token = token
        self.host = host
        self.user = user
        self.kubernetes_version = kubernetes_version
        self._port = port
        self._store = Store(continue_expiry_writes=continue_expiry_writes)
        self._stopping = threading.Event()
        self._logs = PodLogs()
        self._rest = RestApi(
            self._store, rng=random.Random(seed), stopping=self._stopping, logs=self._logs
        )
        self._faults = FaultInjector()
        self._authorizer = Authorizer()
        self._connections = Connections()
        self._lock = threading.Lock()  # guards the request records and `errors`
        self._requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # handler bugs answered with 500 InternalError
        self._server: ApiHttpServer | None = None
        self._thread: threading.Thread | None = None
        self.ca_pem: bytes | None = None
        self._ssl_context: ssl.SSLContext | None = None
        if tls:
            ca_cert, ca_key = make_ca("felixscan-emulator-ca")
            cert, key = make_signed(
                "kube-apiserver",
                ca_cert_pem=ca_cert,
                ca_key_pem=ca_key,
                hosts=["127.0.0.1", "localhost", "::1", "kubernetes", "kubernetes.default.svc"],
                not_after=cert_not_after,
            )
            self.ca_pem = ca_cert
            self._ssl_context = server_ssl_context(cert, key)
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> KubeEmulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = ApiHttpServer(
            (self.host, self._port), self._serve, self._ssl_context, self._connections
        )
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"kube-emulator-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; returns promptly even while handlers sleep in injected delays."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        self._store.wake()
        server.shutdown()
        server.server_close()
        self._connections.shut_down_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the emulator has not been started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def resource_version(self) -> int:
        """The store's current (global) resourceVersion."""
        return self._store.resource_version

    @property
    def continue_expiry_writes(self) -> int | None:
        return self._store.continue_expiry_writes

    @continue_expiry_writes.setter
    def continue_expiry_writes(self, writes: int | None) -> None:
        self._store.continue_expiry_writes = writes

    @property
    def connections_accepted(self) -> int:
        """How many TCP connections were served (keep-alive reuse keeps this low)."""
        return self._connections.accepted

    @property
    def failed_handshakes(self) -> int:
        """How many TLS handshakes failed (e.g. the client did not trust the certificate)."""
        return self._connections.failed_handshakes

    # --- registry ----------------------------------------------------------------------------

    def register_resource(
        self,
        group: str,
        version: str,
        plural: str,
        kind: str,
        namespaced: bool,
        *,
        status_subresource: bool = False,
        singular: str | None = None,
        short_names: Sequence[str] = (),
        crd_object: bool = True,
    ) -> ResourceType:
        """Serve a custom resource, as if its CRD had been applied.

        With `crd_object` the matching CustomResourceDefinition object is stored as well, so
        clients that check `apiextensions.k8s.io` see it. Storing a CRD object (for example by
        `load_yaml` of a CRD manifest) registers its resource the same way.
        """
        rtype = ResourceType(
            group=group,
            version=version,
            plural=plural,
            kind=kind,
            namespaced=namespaced,
            status_subresource=status_subresource,
            has_generation=True,
            builtin=False,
            singular=singular or kind.lower(),
            short_names=tuple(short_names),
        )
        self._store.register_custom(rtype, with_crd=crd_object)
        return rtype

    def unregister_resource(self, group: str, plural: str) -> None:
        """Stop serving a custom resource and drop its objects (like deleting the CRD)."""
        self._store.unregister_custom(group, plural)

    def register_calico_crds(self, api_version: str = "crd.projectcalico.org/v1") -> ResourceType:
        """Serve felixconfigurations (cluster-scoped) in `api_version`: `crd.projectcalico.org/v1`
        (every release) or `projectcalico.org/v3` (Calico's native v3 CRDs, v3.32+)."""
        group, version = api_version.split("/")
        return self.register_resource(
            group,
            version,
            "felixconfigurations",
            "FelixConfiguration",
            namespaced=False,
            singular="felixconfiguration",
        )

    def register_operator_crds(self) -> ResourceType:
        """Serve operator.tigera.io/v1 installations (cluster-scoped, with a status subresource)."""
        return self.register_resource(
            "operator.tigera.io",
            "v1",
            "installations",
            "Installation",
            namespaced=False,
            status_subresource=True,
            singular="installation",
        )

    def resource_for(self, api_version: str, kind: str) -> ResourceType:
        """The registered resource serving `kind` in `api_version`; KeyError when none does."""
        return self._store.resource_for(api_version, kind)

    @property
    def resources(self) -> tuple[ResourceType, ...]:
        return self._store.resources

    # --- direct store access (for tests and fleet builders; no auth, no faults) --------------

    def add(self, obj: Mapping[str, Any], *, copy: bool = True) -> JsonDict:
        """Create an object as an admin would (namespace auto-created); returns the stored copy.

        Fills metadata.uid, creationTimestamp and (for resources with generations) generation=1
        when missing; resourceVersion is always assigned by the store. `copy=False` hands the
        dict over to the store, which then owns it (faster for large fleets). ValueError when
        the object exists already.
        """
        new = cast(JsonDict, clone(obj)) if copy else cast(JsonDict, obj)
        stored = self._store.add(new)
        return cast(JsonDict, clone(stored)) if copy else stored

    def add_all(self, objs: Iterable[Mapping[str, Any]]) -> list[JsonDict]:
        return [self.add(obj) for obj in objs]

    def get_object(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JsonDict | None:
        """A copy of the stored object, or None (`namespace` defaults to "default")."""
        rtype = self.resource_for(api_version, kind)
        ns = (namespace or "default") if rtype.namespaced else None
        with self._store.lock:
            obj = self._store.current(rtype, ns, name)
        return cast(JsonDict, clone(obj)) if obj is not None else None

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None = None, *, copy: bool = True
    ) -> list[JsonDict]:
        """The stored objects of a kind (all namespaces when `namespace` is None).

        With `copy=False` the store's own dicts are returned: cheap, and strictly read-only.
        """
        found = self._store.current_objects(self.resource_for(api_version, kind), namespace)
        return cast(list[JsonDict], clone(found)) if copy else found

    def replace(self, obj: Mapping[str, Any]) -> JsonDict:
        """Overwrite an object as a controller would (status included, no preconditions).

        uid and creationTimestamp are kept; generation is bumped when anything but metadata and
        status changed. KeyError when the object does not exist.
        """
        new = cast(JsonDict, clone(obj))
        rtype = self.resource_for(str(new.get("apiVersion")), str(new.get("kind")))
        meta = new.setdefault("metadata", {})
        namespace = (meta.get("namespace") or "default") if rtype.namespaced else None
        return self._update(rtype, namespace, meta.get("name", ""), lambda _: new)

    def patch_object(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Any,
        *,
        namespace: str | None = None,
        patch_type: Literal["merge", "strategic", "json"] = "merge",
    ) -> JsonDict:
        """Patch an object in the store (as a controller; status may be patched too)."""
        rtype = self.resource_for(api_version, kind)
        ns = (namespace or "default") if rtype.namespaced else None
        return self._update(rtype, ns, name, lambda old: apply_patch(patch_type, old, patch))

    def _update(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        change: Callable[[JsonDict], JsonDict],
    ) -> JsonDict:
        # the read, `change` and the write are one transaction under the store lock
        with self._store.lock:
            old = self._store.current(rtype, namespace, name)
            if old is None:
                raise KeyError(f'{rtype.group_resource} "{name}" not found')
            new = change(old)
            stored = self._store.update(rtype, old, new, subresource=None, preserve_status=False)
        self._store.fire_pending()
        return cast(JsonDict, clone(stored))

    def delete_object(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> bool:
        """Delete an object; False when it did not exist."""
        rtype = self.resource_for(api_version, kind)
        ns = (namespace or "default") if rtype.namespaced else None
        with self._store.lock:
            old = self._store.current(rtype, ns, name)
            if old is None:
                return False
            self._store.delete(rtype, old)
        self._store.fire_pending()
        return True

    def load_yaml(self, source: Path | str) -> list[JsonDict]:
        """Add every object of a (multi-document) YAML file or text; `kind: List` is unpacked.

        A str without a newline is a file name (comment headers and `---` separators are fine).
        """
        return [self.add(obj) for obj in manifest_objects(source)]

    # --- container logs (the kubelets' side of pods/log) -------------------------------------

    def set_pod_log(
        self,
        namespace: str,
        name: str,
        text: str,
        *,
        container: str | None = None,
        previous: str | None = None,
    ) -> None:
        """Set the log of one container of a pod, as its kubelet would hold it.

        `GET .../pods/{name}/log` serves it. `container` None means the pod's only container.
        `previous` is the log of the container's previous instance, what `previous=true`
        reads; None means the container has not restarted (`previous=true` is then 400).
        Every line is stamped with the time of this call (`timestamps=true` shows it).
        Each call replaces both. Logs are not part of the object: no resourceVersion, no watch
        event, and they belong to this pod's uid (a pod created again starts without one).
        KeyError when the pod does not exist; ValueError when it has no such container.
        """
        pod = self._pod_for_log(namespace, name)
        chosen = self._log_container(pod, container)
        self._logs.set(pod["metadata"]["uid"], chosen, text, previous=previous)

    def pod_log(
        self, namespace: str, name: str, *, container: str | None = None, previous: bool = False
    ) -> str | None:
        """The log set by `set_pod_log` (no timestamps), or None when none was set (with
        `previous`: when the container has no previous instance). KeyError, ValueError as
        for `set_pod_log`."""
        pod = self._pod_for_log(namespace, name)
        chosen = self._log_container(pod, container)
        return self._logs.text(pod["metadata"]["uid"], chosen, previous=previous)

    def _pod_for_log(self, namespace: str, name: str) -> JsonDict:
        pod = self.get_object("v1", "Pod", name, namespace)
        if pod is None:
            raise KeyError(f'pods "{name}" not found in namespace "{namespace}"')
        return pod

    @staticmethod
    def _log_container(pod: JsonDict, container: str | None) -> str:
        # the apiserver's own rules, so a test cannot set a log no request could read
        try:
            return container_for(pod, container or "")
        except ApiError as err:
            raise ValueError(err.message) from None

    # --- continue tokens, watches, hooks -----------------------------------------------------

    def expire_continue_tokens(self) -> None:
        """Compact history: every continue token and watch resourceVersion issued so far expires."""
        self._store.expire_continue_tokens()

    def on_change(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call `callback` after every committed write (in the writer's thread, outside the
        store lock, so it may write itself). Returns a function that unsubscribes it."""
        return self._store.on_change(callback)

    # --- faults, RBAC and records ------------------------------------------------------------

    def inject(
        self,
        path_regex: str,
        *,
        status: int | None = None,
        delay: float = 0.0,
        body: bytes | None = None,
        times: int | None = None,
        retry_after: int | None = None,
        method: str = "GET",
        drop: bool = False,
    ) -> Fault:
        """Answer matching requests with a fault instead of (or before) the normal answer.

        `path_regex` is searched in the path and in path?query. `status` answers a Status body
        shaped as the apiserver does (403 Forbidden names the user and verb); `body` replaces the
        answer's bytes (status 200 unless `status` is set; typed text/plain on pods/log, as the
        answer it stands for, else JSON); `delay` sleeps first (then answers normally unless
        status/body/drop is set); `drop` closes the connection without answering; `retry_after`
        adds the Retry-After header; `times` limits how many requests it answers; `method` "*"
        matches any method. The first matching fault wins.
        """
        return self._faults.add(
            Fault(
                pattern=re.compile(path_regex),
                method=method.upper(),
                status=status,
                delay=delay,
                body=body,
                times=times,
                retry_after=retry_after,
                drop=drop,
            )
        )

    def clear_faults(self) -> None:
        self._faults.clear()

    def set_rbac(self, rules: RbacRules | None) -> None:
        """Authorize resource requests against RBAC rules; None switches RBAC off (allow all).

        Accepts PolicyRule dicts, a Role/ClusterRole object, or a list of those (a Role's rules
        apply in its namespace only). Denied requests get the apiserver's 403 Forbidden.
        Discovery and other non-resource URLs stay allowed, as for any authenticated user.
        """
        self._authorizer.configure(rules)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # --- kubeconfig --------------------------------------------------------------------------

    def kubeconfig_entries(
        self,
        *,
        context: str = "emulated",
        cluster_name: str | None = None,
        token: str | None = None,
        user_extra: Mapping[str, Any] | None = None,
        namespace: str | None = None,
    ) -> tuple[JsonDict, JsonDict, JsonDict]:
        """The (cluster, user, context) entries for this emulator, named after `context`.

        `token=None` uses the emulator's token; `token=""` writes a user without a token.
        """
        cluster_name = cluster_name or context
        user_name = f"{context}-user"
        cluster: JsonDict = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        user: JsonDict = {}
        bearer = self.token if token is None else token
        if bearer:
            user["token"] = bearer
        user.update(user_extra or {})
        ctx: JsonDict = {"cluster": cluster_name, "user": user_name}
        if namespace:
            ctx["namespace"] = namespace
        return (
            {"name": cluster_name, "cluster": cluster},
            {"name": user_name, "user": user},
            {"name": context, "context": ctx},
        )

    def write_kubeconfig(
        self,
        path: Path | str,
        *,
        context: str = "emulated",
        cluster_name: str | None = None,
        token: str | None = None,
        user_extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a kubeconfig with this emulator as its only (and current) context."""
        target = Path(path)
        write_config(target, {"clusters": [], "users": [], "contexts": []})
        return self.add_to_kubeconfig(
            target,
            context=context,
            cluster_name=cluster_name,
            token=token,
            user_extra=user_extra,
            current=True,
        )

    def add_to_kubeconfig(
        self,
        path: Path | str,
        *,
        context: str = "emulated",
        cluster_name: str | None = None,
        token: str | None = None,
        user_extra: Mapping[str, Any] | None = None,
        current: bool = False,
    ) -> Path:
        """Add (or replace) this emulator's context in a kubeconfig, creating the file if needed.

        The first context added becomes current-context; `current=True` forces it.
        """
        entries = self.kubeconfig_entries(
            context=context, cluster_name=cluster_name, token=token, user_extra=user_extra
        )
        return merge_entries(Path(path), entries, context=context, current=current)

    # --- answering requests ------------------------------------------------------------------

    def _serve(self, request: Request) -> Response:
        response = self._answer(request)
        with self._lock:
            self._requests.append(record_of(request, response))
        return response

    def _answer(self, request: Request) -> Response:
        # the order of kube-apiserver's filter chain: (faults stand for the network before it)
        # health and version without auth, then authentication, authorization, the resource
        fault = self._faults.take(request.method, request.path, request.target)
        if fault is not None:
            answer = fault_answer(fault, request.info, self.user, self._stopping)
            if answer is not None:
                return answer
        if request.path in (*HEALTH_PATHS, "/version"):
            return self._non_resource(request.path)
        if self.token is not None and not bearer_matches(request.authorization, self.token):
            return error_response(unauthorized())
        try:
            if not request.info.is_resource:
                return self._non_resource(request.path)
            self._authorizer.authorize(request.info, self.user)
            response = self._rest.serve(request)
        except ApiError as err:
            return error_response(err)
        except Exception as exc:  # answer like the apiserver's panic recovery, and keep it
            with self._lock:
                self.errors.append(exc)
            return error_response(
                ApiError(
                    500,
                    "InternalError",
                    f"Internal error occurred: {exc!r}",
                    details={"causes": [{"message": repr(exc)}]},
                )
            )
        finally:
            try:
                self._store.fire_pending()
            except Exception as exc:  # a broken on_change callback must not eat the answer
                with self._lock:
                    self.errors.append(exc)
        return response

    def _non_resource(self, path: str) -> Response:
        return non_resource(
            path,
            self._store.resources,
            kubernetes_version=self.kubernetes_version,
            server_address=f"{self.host}:{self.port}",
        )
