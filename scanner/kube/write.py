"""The remediation side of the Kubernetes door: reads whole objects and patches them.

Besides `scanner.kube.read` (the read-only scanner), the only module that imports `kubernetes`,
and only for remediation. It can write exactly five kinds: the calico-node DaemonSet and the
calico-typha Deployment the configuration names, a FelixConfiguration, the operator
Installation, and KubeControllersConfiguration `default`. Every write is a PATCH carrying the
caller's resourceVersion and uid preconditions (a conflict comes back as
`ApiError(status=409)`, an object re-created under the same name as `ApiError(status=422)`),
except one: KubeControllersConfiguration `default` may be created when it does not exist
(`create`, which fails with 409 AlreadyExists when it appeared meanwhile). Every write sends
`fieldManager=felixscan`; a dry run adds `dryRun=All`. Besides the objects it may write it
reads the calico-kube-controllers Deployment and lists pods in calico-node's namespace (to see
kube-controllers restart). Every answer must be the object asked for (kind, name, namespace,
and for a patch the uid): an API that answers with another object is an error, never a new
target. docs/remediation.md lists the verbs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import urllib3
from kubernetes.client.exceptions import ApiException

from scanner.core.config import ClusterSettings
from scanner.core.errors import ApiError, ApiForbidden, ApiUnreachable, RemediationRefused
from scanner.kube.client import (
    MANIFEST_NAMESPACE,
    OPERATOR_NAMESPACE,
    Api,
    make_api,
    status_message,
)

PatchType = Literal["strategic", "merge", "json"]
FIELD_MANAGER = "felixscan"
_CONTENT_TYPES: dict[PatchType, str] = {
    "strategic": "application/strategic-merge-patch+json",
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
}
# (apiVersion, kind) -> (group, version, plural) for the custom resources remediation may patch
_CUSTOM = {
    ("crd.projectcalico.org/v1", "FelixConfiguration"):
        ("crd.projectcalico.org", "v1", "felixconfigurations"),
    ("projectcalico.org/v3", "FelixConfiguration"):
        ("projectcalico.org", "v3", "felixconfigurations"),
    ("operator.tigera.io/v1", "Installation"): ("operator.tigera.io", "v1", "installations"),
    ("crd.projectcalico.org/v1", "KubeControllersConfiguration"):
        ("crd.projectcalico.org", "v1", "kubecontrollersconfigurations"),
    ("projectcalico.org/v3", "KubeControllersConfiguration"):
        ("projectcalico.org", "v3", "kubecontrollersconfigurations"),
}
DAEMONSET = ("apps/v1", "DaemonSet")
DEPLOYMENT = ("apps/v1", "Deployment")
KCC = "KubeControllersConfiguration"
KCC_NAME = "default"  # kube-controllers reads this one only (runconfig.go)


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One object remediation reads or patches."""

    api_version: str
    kind: str
    name: str
    namespace: str | None = None

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"


class KubeWriter:
    """Reads and patches the objects remediation may change, in one cluster."""

    def __init__(self, settings: ClusterSettings, *, api: Api | None = None) -> None:
        self.settings = settings
        # The collection deadline of `make_api` is renewed per call: a remediation lasts as long
        # as its rollout, but every single request still has the configured timeout.
        self.api = api or make_api(settings, deadline=time.monotonic() + 60, writes=True)

    def close(self) -> None:
        close = getattr(self.api.client, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> KubeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _renew(self) -> None:
        self.api.deadline = time.monotonic() + self.api.timeout * 6

    def read(self, ref: ObjectRef) -> dict[str, Any] | None:
        """The object as served, or None when it does not exist.

        ApiError when the API answers with another object than `ref` (or one without a uid):
        remediation plans its patch from this answer, so it must be the object asked for.
        """
        self._allowed(ref)
        self._renew()
        if (ref.api_version, ref.kind) == DAEMONSET:
            doc = self.api.get(f"GET {ref}", self.api.apps.read_namespaced_daemon_set,
                               ref.name, ref.namespace)
        elif (ref.api_version, ref.kind) == DEPLOYMENT:
            doc = self.api.get(f"GET {ref}", self.api.apps.read_namespaced_deployment,
                               ref.name, ref.namespace)
        else:
            group, version, plural = _custom(ref)
            doc = self.api.get(f"GET {ref}", self.api.custom.get_cluster_custom_object,
                               group, version, plural, ref.name)
        if doc is not None:
            _check_identity(f"GET {ref}", ref, doc)
            if not str((doc.get("metadata") or {}).get("uid") or ""):
                raise ApiError(f"GET {ref}: the API answered without metadata.uid, so no "
                               "patch could be tied to this object")
        return doc

    def _allowed(self, ref: ObjectRef, *, write: bool = False) -> None:
        """Only the workloads the configuration names, wherever a name came from.

        The scan takes the DaemonSet's name from the API's answer; an answer naming another
        DaemonSet must not make remediation patch that one. Deployments: calico-typha (read
        and written) and calico-kube-controllers (read only); KubeControllersConfiguration:
        `default` only.
        """
        kind = (ref.api_version, ref.kind)
        calico = self.settings.calico
        namespaces = ((calico.namespace,) if calico.namespace
                      else (MANIFEST_NAMESPACE, OPERATOR_NAMESPACE))
        if kind == DAEMONSET:
            if ref.name != calico.daemonset or ref.namespace not in namespaces:
                raise RemediationRefused(
                    f"remediation only touches the DaemonSet the configuration names "
                    f"(calico.daemonset: {calico.daemonset}, in {' or '.join(namespaces)}), "
                    f"never {ref}: the scan took that name from the API's answer to its GET of "
                    f"{calico.daemonset} (or an older configuration named it)")
            return
        if kind == DEPLOYMENT:
            names = (calico.typha,) if write else (calico.typha, calico.kube_controllers)
            if ref.name not in names or ref.namespace not in namespaces:
                raise RemediationRefused(
                    f"remediation only {'patches' if write else 'reads'} the Deployment"
                    f"{'s' if len(names) > 1 else ''} the configuration names "
                    f"({', '.join(names)}, in {' or '.join(namespaces)}), never {ref}")
            return
        _custom(ref)
        if ref.kind == KCC and ref.name != KCC_NAME:
            raise RemediationRefused(f"remediation only touches KubeControllersConfiguration "
                                     f"{KCC_NAME}, never {ref}")

    def pods(self, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """The pods of calico-node's namespace that match `selector` (matchLabels), read-only
        (remediation watches kube-controllers restart with this)."""
        calico = self.settings.calico
        namespaces = ((calico.namespace,) if calico.namespace
                      else (MANIFEST_NAMESPACE, OPERATOR_NAMESPACE))
        if namespace not in namespaces or not selector:
            raise RemediationRefused(f"remediation only lists pods by a selector in "
                                     f"{' or '.join(namespaces)}, never in {namespace}")
        self._renew()
        text = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        items = self.api.list(f"LIST pods in {namespace} ({text})",
                              self.api.core.list_namespaced_pod, namespace, label_selector=text)
        return list(items or [])

    def patch(self, ref: ObjectRef, body: Mapping[str, Any] | list[dict[str, Any]], *,
              patch_type: PatchType, dry_run: bool) -> dict[str, Any]:
        """PATCH one object; returns the object the server answered (the would-be object for
        a dry run). Not retried here: the caller re-reads and re-plans on a 409.

        `body` must carry `metadata.resourceVersion` and `metadata.uid` of the object it was
        planned from: the API server then applies it to that object only (409 when it changed
        since, 422 when another object now has its name). A JSON patch (a list of operations)
        carries them as `test` of /metadata/uid and `replace` of /metadata/resourceVersion,
        first.
        """
        self._allowed(ref, write=True)
        uid = _preconditions(ref, body, patch_type)
        self._renew()
        what = f"PATCH {ref}" + (" (dry run)" if dry_run else "")
        kwargs: dict[str, Any] = {
            "field_manager": FIELD_MANAGER,
            "_content_type": _CONTENT_TYPES[patch_type],
            "_preload_content": False,
            "_request_timeout": (min(self.api.timeout, 5.0), self.api.timeout),
        }
        if dry_run:
            kwargs["dry_run"] = "All"
        sent: Any = list(body) if isinstance(body, list) else dict(body)
        if (ref.api_version, ref.kind) in (DAEMONSET, DEPLOYMENT):
            if patch_type != "strategic":
                raise ValueError(f"the {ref.kind} is patched with a strategic merge patch")
            method: Any = (self.api.apps.patch_namespaced_daemon_set
                           if ref.kind == "DaemonSet"
                           else self.api.apps.patch_namespaced_deployment)
            args: tuple[Any, ...] = (ref.name, ref.namespace, sent)
        else:
            if patch_type == "strategic":
                raise ValueError("custom resources take no strategic merge patch")
            method = self.api.custom.patch_cluster_custom_object
            args = (*_custom(ref), ref.name, sent)
        return self._send(what, ref, method, args, kwargs, uid=uid)

    def create(self, ref: ObjectRef, body: Mapping[str, Any], *,
               dry_run: bool) -> dict[str, Any]:
        """POST KubeControllersConfiguration `default` (the one object remediation may create,
        when it does not exist); 409 AlreadyExists when it appeared meanwhile."""
        self._allowed(ref, write=True)
        if ref.kind != KCC:
            raise RemediationRefused(f"remediation creates no {ref.kind} ({ref})")
        meta = body.get("metadata")
        if not (isinstance(meta, Mapping) and meta.get("name") == ref.name
                and body.get("kind") == ref.kind and body.get("apiVersion") == ref.api_version):
            raise ValueError(f"the body to create must be {ref} itself")
        self._renew()
        what = f"CREATE {ref}" + (" (dry run)" if dry_run else "")
        kwargs: dict[str, Any] = {
            "field_manager": FIELD_MANAGER,
            "_preload_content": False,
            "_request_timeout": (min(self.api.timeout, 5.0), self.api.timeout),
        }
        if dry_run:
            kwargs["dry_run"] = "All"
        return self._send(what, ref, self.api.custom.create_cluster_custom_object,
                          (*_custom(ref), dict(body)), kwargs, uid=None)

    def _send(self, what: str, ref: ObjectRef, method: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any], *, uid: str | None) -> dict[str, Any]:
        self.api.requests += 1
        try:
            data = method(*args, **kwargs).data
        except ApiException as exc:
            status = int(exc.status or 0)
            if status == 0:
                raise ApiUnreachable(f"{what}: {status_message(exc)}") from None
            if status in (401, 403):
                raise ApiForbidden(f"{what}: {status} {status_message(exc)}",
                                   status=status) from None
            message = status_message(exc)
            if status == 422 and uid and ("metadata.uid" in message
                                          or "/metadata/uid" in message):
                raise ApiError(f"{what}: {ref} is no longer the object the change was planned "
                               f"from (uid {uid}): it was deleted and created again; nothing "
                               f"was changed ({status} {message})", status=status) from None
            raise ApiError(f"{what}: {status} {message}", status=status) from None
        except urllib3.exceptions.HTTPError as exc:
            # The write may or may not have happened; the caller's precondition makes a retry
            # safe (it answers 409 when it did), so the caller decides.
            raise ApiUnreachable(f"{what}: connection failed ({type(exc).__name__})") from None
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(f"{what}: the answer is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ApiError(f"{what}: expected a JSON object, got {type(doc).__name__}")
        _check_identity(what, ref, doc, uid=uid)
        return doc


def _preconditions(ref: ObjectRef, body: Mapping[str, Any] | list[dict[str, Any]],
                   patch_type: PatchType) -> str:
    """The uid the patch is tied to; ValueError when it lacks either precondition."""
    missing = ValueError(f"a patch of {ref} must carry metadata.resourceVersion and "
                         "metadata.uid preconditions")
    if patch_type == "json":
        if not isinstance(body, list) or len(body) < 2:
            raise missing
        first, second = body[0], body[1]
        if not (first.get("op") == "test" and first.get("path") == "/metadata/uid"
                and first.get("value") and second.get("op") == "replace"
                and second.get("path") == "/metadata/resourceVersion" and second.get("value")):
            raise missing
        return str(first["value"])
    if not isinstance(body, Mapping):
        raise missing
    meta = body.get("metadata")
    uid = str(meta.get("uid") or "") if isinstance(meta, Mapping) else ""
    if not uid or not (isinstance(meta, Mapping) and meta.get("resourceVersion")):
        raise missing
    return uid


def _check_identity(what: str, ref: ObjectRef, doc: Mapping[str, Any], *,
                    uid: str | None = None) -> None:
    """The answer is the object asked for: kind, name, namespace (and uid, when known)."""
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    wanted = {"name": ref.name}
    if ref.namespace is not None:
        wanted["namespace"] = ref.namespace
    if uid is not None:
        wanted["uid"] = uid
    wrong = [f"{key} {meta.get(key) or 'missing'}" for key, value in wanted.items()
             if str(meta.get(key) or "") != value]
    if doc.get("kind") not in (None, ref.kind):  # an answer may leave out its kind
        wrong.insert(0, f"kind {doc.get('kind')}")
    if wrong:
        raise ApiError(f"{what}: the API answered with another object ({', '.join(wrong)}); "
                       "refusing to act on it")


def _custom(ref: ObjectRef) -> tuple[str, str, str]:
    try:
        return _CUSTOM[(ref.api_version, ref.kind)]
    except KeyError:
        # The door itself keeps remediation to its kinds, whatever a caller asks.
        raise RemediationRefused(f"remediation never touches {ref.api_version} {ref.kind} "
                                 f"objects ({ref})") from None
