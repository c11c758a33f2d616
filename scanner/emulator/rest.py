"""The REST verbs of the emulated apiserver on resource paths, over the `Store`.

Routing, validation, preconditions (resourceVersion, uid), dry runs, the status subresource and
pods/log (answered from `PodLogs`).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Mapping
from typing import Any

from scanner.emulator.errors import (
    MODIFIED,
    NAMESPACE_MISMATCH,
    ApiError,
    bad_request,
    conflict,
    details,
    invalid,
    method_not_allowed,
    not_found,
    resource_not_found,
)
from scanner.emulator.http import Request, Response, json_response, not_found_page
from scanner.emulator.logs import PodLogs, log_options
from scanner.emulator.patches import apply_patch, patch_type_for
from scanner.emulator.resources import (
    NAMESPACES_KEY,
    JsonDict,
    ResourceType,
    prepare_new,
    reset_status_on_create,
)
from scanner.emulator.selectors import predicate_from_query
from scanner.emulator.store import Store

_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand
_PODS_KEY = ("", "pods")
_WATCH_DEFAULT_TIMEOUT = 1800.0


class RestApi:
    """Answers resource requests (already authenticated and authorized) from a `Store`.

    `rng` makes generateName suffixes; `stopping` ends open watches when the server stops;
    `logs` holds the container logs that pods/log serves (a fresh, empty one by default).
    """

    def __init__(
        self,
        store: Store,
        *,
        rng: random.Random,
        stopping: threading.Event,
        logs: PodLogs | None = None,
    ) -> None:
        self._store = store
        self._random = rng
        self._stopping = stopping
        self.logs = logs if logs is not None else PodLogs()

    def serve(self, request: Request) -> Response:
        info = request.info
        types = self._store.resources
        rtype = next((t for t in types if t.key == (info.group, info.resource or "")), None)
        if (info.group, info.version) not in {(t.group, t.version) for t in types}:
            return not_found_page()
        if rtype is None or rtype.version != info.version:
            raise resource_not_found()
        if info.namespace is not None and not rtype.namespaced and rtype.plural != "namespaces":
            raise resource_not_found()
        if info.subresource is not None and not (
            (info.subresource == "status" and rtype.status_subresource)
            or (info.subresource == "log" and rtype.key == _PODS_KEY)
        ):
            raise resource_not_found()
        dry_run = _dry_run(request.query)
        namespace = info.namespace if rtype.namespaced else None
        if info.name is None:
            return self._collection(request, rtype, namespace, dry_run)
        if rtype.namespaced and namespace is None:
            raise resource_not_found()
        name = info.name
        method = request.method
        if info.subresource == "log":
            return self._log(request, rtype, namespace, name)
        if method == "GET":
            with self._store.lock:
                obj = self._store.current(rtype, namespace, name)
            if obj is None:
                raise not_found(rtype, name)
            return json_response(200, obj)
        if method == "PUT":
            body = _decode(request.body)
            return json_response(
                200,
                self._replace(
                    rtype=rtype,
                    namespace=namespace,
                    name=name,
                    body=body,
                    subresource=info.subresource,
                    dry_run=dry_run,
                ),
            )
        if method == "PATCH":
            return json_response(200, self._patch(request, rtype, namespace, name, dry_run))
        if method == "DELETE":
            return json_response(
                200, self._delete_one(rtype, namespace, name, request.body, dry_run)
            )
        raise method_not_allowed()

    def _log(
        self, request: Request, rtype: ResourceType, namespace: str | None, name: str
    ) -> Response:
        # LogREST is a getter only; its order: decode and validate the options (400, 422),
        # read the pod (404), then the container and the kubelet (pod_logs.answer)
        if request.method != "GET":
            raise method_not_allowed()
        options = log_options(request.query, name)
        with self._store.lock:
            pod = self._store.current(rtype, namespace, name)
        if pod is None:
            raise not_found(rtype, name)
        return self.logs.answer(pod, options)

    def _collection(
        self, request: Request, rtype: ResourceType, namespace: str | None, dry_run: bool
    ) -> Response:
        query = request.query
        if request.method == "GET":
            if request.info.verb == "watch":
                return self._watch(rtype, namespace, query)
            return json_response(200, self._list(rtype, namespace, query))
        if request.method == "POST":
            if rtype.namespaced and namespace is None:
                raise resource_not_found()
            created = self._create(rtype, namespace, _decode(request.body), dry_run)
            return json_response(201, created)
        if request.method == "DELETE":
            return json_response(200, self._delete_collection(rtype, namespace, query, dry_run))
        raise method_not_allowed()

    def _list(
        self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]
    ) -> JsonDict:
        pred = predicate_from_query(query, rtype)
        try:
            limit = int(query.get("limit") or 0)
        except ValueError as exc:
            raise bad_request(f"limit: invalid value {query.get('limit')!r}") from exc
        token = query.get("continue") or ""
        return self._store.list_page(rtype, namespace, pred, limit=limit, token=token)

    def _watch(
        self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]
    ) -> Response:
        pred = predicate_from_query(query, rtype)
        try:
            timeout = float(query.get("timeoutSeconds") or _WATCH_DEFAULT_TIMEOUT)
        except ValueError as exc:
            raise bad_request("timeoutSeconds must be a number") from exc
        stream = self._store.watch(
            rtype,
            namespace,
            pred,
            resource_version=query.get("resourceVersion") or "",
            timeout=timeout,
            stopping=self._stopping,
        )
        return Response(200, stream=stream)

    def _create(
        self, rtype: ResourceType, namespace: str | None, body: Any, dry_run: bool
    ) -> JsonDict:
        obj = _expect_object(body, rtype)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if rtype.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request(NAMESPACE_MISMATCH)
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        store = self._store
        with store.lock:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise invalid(
                        rtype,
                        "",
                        "metadata.name",
                        "name or generateName is required",
                        "FieldValueRequired",
                    )
                meta["name"] = meta["generateName"] + "".join(
                    self._random.choice(_GENERATE_ALPHABET) for _ in range(5)
                )
            name = meta["name"]
            if rtype.namespaced:
                namespaces = store.type_at(NAMESPACES_KEY)
                if store.current(namespaces, None, str(namespace)) is None:
                    raise not_found(namespaces, str(namespace))
            if store.current(rtype, namespace, name) is not None:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rtype.group_resource} "{name}" already exists',
                    details=details(rtype, name),
                )
            for system in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
            ):
                meta.pop(system, None)
            reset_status_on_create(rtype, obj)
            prepare_new(rtype, obj)
            if dry_run:
                meta.pop("resourceVersion", None)
                return obj
            store.write_new(rtype, obj)
        return obj

    def _replace(
        self,
        *,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        subresource: str | None,
        dry_run: bool,
    ) -> JsonDict:
        new = _expect_object(body, rtype)
        meta = new.setdefault("metadata", {})
        _check_identity(meta, name, namespace if rtype.namespaced else None)
        with self._store.lock:
            old = self._store.current(rtype, namespace, name)
            if old is None:
                raise not_found(rtype, name)
            _check_resource_version(rtype, name, old, meta)
            return self._store.update(
                rtype, old, new, subresource=subresource, preserve_status=True, dry_run=dry_run
            )

    def _patch(
        self,
        request: Request,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        dry_run: bool,
    ) -> JsonDict:
        patch_type = patch_type_for(request.content_type, rtype)
        patch = _decode(request.body)
        with self._store.lock:
            old = self._store.current(rtype, namespace, name)
            if old is None:
                raise not_found(rtype, name)
            new = apply_patch(patch_type, old, patch)
            meta = new.get("metadata")
            if not isinstance(meta, dict):
                raise bad_request("metadata must be an object")
            _check_identity(meta, name, namespace if rtype.namespaced else None)
            # a resourceVersion left in (or put in) the patched object is an update precondition
            _check_resource_version(rtype, name, old, meta)
            # A uid in the patch is a precondition too, checked where kube-apiserver checks
            # it: after the resourceVersion, by update validation (rest.BeforeUpdate: uid is
            # immutable), so a mismatch is 422 Invalid, not the 409 that PUT and DELETE
            # preconditions give. Controllers rely on this (controller_ref_manager.go).
            uid = meta.get("uid")
            if uid and uid != old["metadata"].get("uid"):
                raise invalid(
                    rtype,
                    name,
                    "metadata.uid",
                    f'Invalid value: "{uid}": field is immutable',
                    "FieldValueInvalid",
                )
            return self._store.update(
                rtype,
                old,
                new,
                subresource=request.info.subresource,
                preserve_status=True,
                dry_run=dry_run,
            )

    def _delete_one(
        self, rtype: ResourceType, namespace: str | None, name: str, body: bytes, dry_run: bool
    ) -> JsonDict:
        options = _decode(body) if body.strip() else {}
        preconditions = (options.get("preconditions") or {}) if isinstance(options, dict) else {}
        with self._store.lock:
            old = self._store.current(rtype, namespace, name)
            if old is None:
                raise not_found(rtype, name)
            meta = old["metadata"]
            for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
                wanted = preconditions.get(key)
                if wanted and wanted != meta.get(key):
                    raise conflict(
                        rtype,
                        name,
                        f"Precondition failed: {label} in precondition: {wanted}, "
                        f"{label} in object meta: {meta.get(key)}",
                    )
            if not dry_run:
                self._store.delete(rtype, old)
        if rtype.kind == "Pod":
            return old
        found = details(rtype, name)
        found["uid"] = meta.get("uid")
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": found,
        }

    def _delete_collection(
        self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str], dry_run: bool
    ) -> JsonDict:
        listing = self._list(
            rtype,
            namespace,
            {k: v for k, v in query.items() if k in ("labelSelector", "fieldSelector")},
        )
        with self._store.lock:
            for item in listing["items"]:
                meta = item["metadata"]
                old = self._store.current(rtype, meta.get("namespace"), meta["name"])
                if old is not None and not dry_run:
                    self._store.delete(rtype, old)
        return listing


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from exc


def _dry_run(query: Mapping[str, str]) -> bool:
    value = query.get("dryRun")
    if value is None or value == "":
        return False
    if value != "All":
        raise bad_request(f'Invalid dryRun value: "{value}": supported values: "All"')
    return True


def _expect_object(body: Any, rtype: ResourceType) -> JsonDict:
    if not isinstance(body, dict):
        raise bad_request("the body of the request must be an object")
    kind = body.get("kind")
    api_version = body.get("apiVersion")
    if api_version and api_version != rtype.api_version:
        raise bad_request(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({rtype.api_version})"
        )
    if kind and kind != rtype.kind:
        raise bad_request(
            f"the kind in the data ({kind}) does not match the expected kind ({rtype.kind})"
        )
    body["apiVersion"] = rtype.api_version
    body["kind"] = rtype.kind
    return body


def _check_identity(meta: JsonDict, name: str, namespace: str | None) -> None:
    if meta.get("name") and meta["name"] != name:
        raise bad_request(
            f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
        )
    if namespace is not None and meta.get("namespace") and meta["namespace"] != namespace:
        raise bad_request(NAMESPACE_MISMATCH)


def _check_resource_version(rtype: ResourceType, name: str, old: JsonDict, meta: JsonDict) -> None:
    # a resourceVersion in an update is the optimistic-concurrency precondition (409 on mismatch)
    wanted = meta.get("resourceVersion")
    if wanted and wanted != old["metadata"]["resourceVersion"]:
        raise conflict(rtype, name, MODIFIED)
