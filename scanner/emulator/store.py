"""The emulated apiserver's storage (etcd plus watch cache): registry, objects, resourceVersions.

History is kept for consistent paged lists and watches until compaction (then 410 Expired);
stored objects are never mutated, so readers can serialize them outside the lock.
"""

from __future__ import annotations

import base64
import bisect
import json
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Literal

from scanner.emulator.errors import ApiError, bad_request, status_body
from scanner.emulator.resources import (
    BUILTIN_RESOURCES,
    CRD_GROUP,
    CRDS_KEY,
    NAMESPACES_KEY,
    JsonDict,
    ResourceType,
    crd_object,
    dumps,
    object_key,
    prepare_new,
    prepare_update,
    resource_from_crd,
)
from scanner.emulator.selectors import Predicate

ChangeType = Literal["ADDED", "MODIFIED", "DELETED"]


@dataclass(frozen=True, slots=True)
class Change:
    """A committed write, as handed to `on_change` callbacks and watchers."""

    type: ChangeType
    resource: ResourceType
    object: JsonDict
    old: JsonDict | None
    resource_version: int


class _Collection:
    """MVCC history of one resource: sorted keys, each with its (resourceVersion, object) list."""

    __slots__ = ("keys", "versions")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.versions: dict[str, list[tuple[int, JsonDict | None]]] = {}

    def current(self, key: str) -> JsonDict | None:
        history = self.versions.get(key)
        return history[-1][1] if history else None

    def at(self, key: str, rv: int) -> JsonDict | None:
        history = self.versions[key]
        if history[-1][0] <= rv:
            return history[-1][1]
        for version, obj in reversed(history):
            if version <= rv:
                return obj
        return None

    def put(self, key: str, rv: int, obj: JsonDict | None) -> None:
        history = self.versions.get(key)
        if history is None:
            history = self.versions[key] = []
            if not self.keys or key > self.keys[-1]:
                self.keys.append(key)
            else:
                bisect.insort(self.keys, key)
        history.append((rv, obj))

    def compact(self, rv: int) -> None:
        """Forget versions older than `rv` that a read at `rv` or later can no longer see."""
        dead: list[str] = []
        for key, history in self.versions.items():
            keep_from = 0
            for n, (version, _) in enumerate(history):
                if version <= rv:
                    keep_from = n
            if keep_from:
                del history[:keep_from]
            if len(history) == 1 and history[0][1] is None and history[0][0] <= rv:
                dead.append(key)
        for key in dead:
            del self.versions[key]
        if dead:
            gone = set(dead)
            self.keys = [k for k in self.keys if k not in gone]


class Store:
    """Registry, MVCC object store and change feed behind one `KubeEmulator`.

    `lock` guards everything; methods documented as *locked* expect the caller to hold it, so
    that a read, its precondition checks and the write form one transaction. Changes are
    announced to `on_change` callbacks by `fire_pending`, called after the lock is released.
    """

    def __init__(self, *, continue_expiry_writes: int | None) -> None:
        self.continue_expiry_writes = continue_expiry_writes
        self.lock = threading.Condition(threading.RLock())
        self._local = threading.local()  # changes committed by this thread, not yet announced
        self._rv = 1
        self._compacted_rv = 0
        self._types: dict[tuple[str, str], ResourceType] = {}
        self._kinds: dict[tuple[str, str], ResourceType] = {}
        self._collections: dict[tuple[str, str], _Collection] = {}
        self._events: list[Change] = []
        self._event_rvs: list[int] = []
        self._callbacks: list[Callable[[Change], None]] = []
        for rtype in BUILTIN_RESOURCES:
            self._register(rtype)

    @property
    def resource_version(self) -> int:
        with self.lock:
            return self._rv

    # --- registry ----------------------------------------------------------------------------

    @property
    def resources(self) -> tuple[ResourceType, ...]:
        with self.lock:
            return tuple(self._types.values())

    def resource_for(self, api_version: str, kind: str) -> ResourceType:
        with self.lock:
            rtype = self._kinds.get((api_version, kind))
        if rtype is None:
            raise KeyError(f"no resource serves {kind} in {api_version}; register it first")
        return rtype

    def type_at(self, key: tuple[str, str]) -> ResourceType:
        """The registered resource of a (group, plural) key (*locked*); KeyError when none."""
        return self._types[key]

    def _register(self, rtype: ResourceType) -> None:
        existing = self._types.get(rtype.key)
        if existing is not None and existing.version != rtype.version:
            raise ValueError(
                f"{rtype.group_resource} is already served as {existing.api_version}; "
                "one version per resource"
            )
        self._types[rtype.key] = rtype
        self._kinds[(rtype.api_version, rtype.kind)] = rtype
        self._collections.setdefault(rtype.key, _Collection())

    def _unregister(self, rtype: ResourceType) -> None:
        self._types.pop(rtype.key, None)
        self._kinds.pop((rtype.api_version, rtype.kind), None)
        self._collections.pop(rtype.key, None)

    def register_custom(self, rtype: ResourceType, *, with_crd: bool) -> None:
        """Serve a custom resource; `with_crd` also stores its CRD object unless one exists."""
        with self.lock:
            self._register(rtype)
            crds = self._types[CRDS_KEY]
            if with_crd and self.current(crds, None, f"{rtype.plural}.{rtype.group}") is None:
                self.write_new(crds, crd_object(rtype))
        self.fire_pending()

    def unregister_custom(self, group: str, plural: str) -> None:
        """Stop serving a custom resource: its CRD object (if any) and objects go."""
        with self.lock:
            rtype = self._types.get((group, plural))
            if rtype is None:
                return
            if rtype.builtin:
                raise ValueError(f"{rtype.group_resource} is built in")
            crds = self._types[CRDS_KEY]
            crd = self.current(crds, None, f"{plural}.{group}")
            if crd is not None:
                self.delete(crds, crd)
            self._unregister(rtype)
        self.fire_pending()

    def _register_from_crd(self, crd: JsonDict) -> None:
        rtype = resource_from_crd(crd)
        if rtype is not None and rtype.key not in self._types:
            self._register(rtype)

    # --- reads -------------------------------------------------------------------------------

    def current(self, rtype: ResourceType, namespace: str | None, name: str) -> JsonDict | None:
        """The stored object or None (*locked*)."""
        coll = self._collections.get(rtype.key)
        if coll is None:
            return None
        return coll.current(object_key(rtype, namespace, name))

    def current_objects(self, rtype: ResourceType, namespace: str | None) -> list[JsonDict]:
        """The stored objects of a resource, in key order (all namespaces when None)."""
        prefix = f"{namespace}/" if rtype.namespaced and namespace is not None else ""
        with self.lock:
            coll = self._collections[rtype.key]
            start = bisect.bisect_left(coll.keys, prefix)
            found: list[JsonDict] = []
            for key in coll.keys[start:]:
                if not key.startswith(prefix):
                    break
                obj = coll.current(key)
                if obj is not None:
                    found.append(obj)
        return found

    # --- writes (locked) ---------------------------------------------------------------------

    def add(self, new: JsonDict) -> JsonDict:
        """Store a new object as an admin would (see `add_locked`) and announce it."""
        with self.lock:
            stored = self.add_locked(new)
        self.fire_pending()
        return stored

    def add_locked(self, new: JsonDict) -> JsonDict:
        """Store a new object, creating its namespace if needed (*locked*); takes `new` over.

        ValueError when it has no name or exists already.
        """
        rtype = self.resource_for(str(new.get("apiVersion")), str(new.get("kind")))
        meta = new.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError(f"{rtype.kind} without metadata.name")
        if rtype.namespaced:
            meta.setdefault("namespace", "default")
            namespaces = self._types[NAMESPACES_KEY]
            if self.current(namespaces, None, meta["namespace"]) is None:
                namespace = {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": meta["namespace"]},
                }
                self.add_locked(namespace)
        else:
            meta.pop("namespace", None)
        if self.current(rtype, meta.get("namespace"), meta["name"]) is not None:
            raise ValueError(f'{rtype.group_resource} "{meta["name"]}" already exists')
        prepare_new(rtype, new)
        return self.write_new(rtype, new)

    def write_new(self, rtype: ResourceType, obj: JsonDict) -> JsonDict:
        """Store a prepared new object (*locked*); storing a CRD serves its resource."""
        meta = obj["metadata"]
        key = object_key(rtype, meta.get("namespace"), meta["name"])
        self._write(rtype, key, obj, None)
        if rtype.group == CRD_GROUP:
            self._register_from_crd(obj)
        return obj

    def update(
        self,
        rtype: ResourceType,
        old: JsonDict,
        new: JsonDict,
        *,
        subresource: str | None,
        preserve_status: bool,
        dry_run: bool = False,
    ) -> JsonDict:
        """Finish an update (see `prepare_update`) and store it (*locked*).

        A no-op update stores nothing and returns the old object, as etcd3's GuaranteedUpdate.
        """
        new = prepare_update(
            rtype, old, new, subresource=subresource, preserve_status=preserve_status
        )
        if new == old:
            return old
        if dry_run:
            return new
        meta = new["metadata"]
        self._write(rtype, object_key(rtype, meta.get("namespace"), meta["name"]), new, old)
        return new

    def delete(self, rtype: ResourceType, old: JsonDict) -> None:
        """Delete a stored object (*locked*), with what the apiserver's controllers then do."""
        meta = old["metadata"]
        self._write(rtype, object_key(rtype, meta.get("namespace"), meta["name"]), None, old)
        if rtype.key == NAMESPACES_KEY:
            # namespace deletion ends, after finalization, with its contents gone
            for other in list(self._types.values()):
                if not other.namespaced:
                    continue
                coll = self._collections[other.key]
                prefix = f"{meta['name']}/"
                for key in [k for k in coll.keys if k.startswith(prefix)]:
                    obj = coll.current(key)
                    if obj is not None:
                        self._write(other, key, None, obj)
        if rtype.group == CRD_GROUP:
            spec = old.get("spec") or {}
            crd_key = (spec.get("group", ""), (spec.get("names") or {}).get("plural", ""))
            victim = self._types.get(crd_key)
            if victim is not None and not victim.builtin:
                self._unregister(victim)

    def _write(
        self,
        rtype: ResourceType,
        key: str,
        obj: JsonDict | None,
        old: JsonDict | None,
    ) -> None:
        self._rv += 1
        rv = self._rv
        coll = self._collections[rtype.key]
        if obj is not None:
            obj["metadata"]["resourceVersion"] = str(rv)
        coll.put(key, rv, obj)
        if obj is None:
            assert old is not None
            deleted = dict(old)
            deleted["metadata"] = {**old["metadata"], "resourceVersion": str(rv)}
            change = Change("DELETED", rtype, deleted, old, rv)
        else:
            change = Change("ADDED" if old is None else "MODIFIED", rtype, obj, old, rv)
        self._events.append(change)
        self._event_rvs.append(rv)
        self._pending.append(change)
        if (
            self.continue_expiry_writes is not None
            and rv % max(self.continue_expiry_writes, 64) == 0
        ):
            self._compact(rv - self.continue_expiry_writes)
        self.lock.notify_all()

    # --- change feed -------------------------------------------------------------------------

    @property
    def _pending(self) -> list[Change]:
        pending: list[Change] | None = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        return pending

    def fire_pending(self) -> None:
        """Hand this thread's committed changes to the callbacks (call without the lock)."""
        pending = self._pending
        if not pending:
            return
        changes = list(pending)
        pending.clear()
        with self.lock:
            callbacks = list(self._callbacks)
        for change in changes:
            for callback in callbacks:
                callback(change)

    def on_change(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        with self.lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self.lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def wake(self) -> None:
        """Wake every waiting watch (so that it sees a stop)."""
        with self.lock:
            self.lock.notify_all()

    # --- compaction --------------------------------------------------------------------------

    def expire_continue_tokens(self) -> None:
        with self.lock:
            self._rv += 1
            self._compact(self._rv)

    def _compact(self, rv: int) -> None:
        self._compacted_rv = max(self._compacted_rv, rv)
        for coll in self._collections.values():
            coll.compact(rv)
        cut = bisect.bisect_left(self._event_rvs, rv)
        if cut:
            del self._events[:cut]
            del self._event_rvs[:cut]

    def _oldest_readable_rv(self) -> int:
        floor = self._compacted_rv
        if self.continue_expiry_writes is not None:
            floor = max(floor, self._rv - self.continue_expiry_writes)
        return floor

    # --- list and watch ----------------------------------------------------------------------

    def list_page(
        self,
        rtype: ResourceType,
        namespace: str | None,
        pred: Predicate,
        *,
        limit: int,
        token: str,
    ) -> JsonDict:
        """A List body: one page of `limit` (0 = all) at one resourceVersion, from `token` on."""
        prefix = f"{namespace}/" if namespace is not None else ""
        with self.lock:
            coll = self._collections[rtype.key]
            if token:
                rv, start = _decode_continue(token)
                if rv <= 0:
                    rv = self._rv  # an "inconsistent" token continues at the current revision
                elif rv < self._oldest_readable_rv():
                    raise _expired_continue(start)
                start = prefix + start
            else:
                rv, start = self._rv, prefix
            keys = coll.keys
            index = bisect.bisect_left(keys, start)
            items: list[JsonDict] = []
            last_key = ""
            more = False
            remaining = 0
            for key in keys[index:]:
                if prefix and not key.startswith(prefix):
                    break
                obj = coll.at(key, rv)
                if obj is None or not pred.matches(obj):
                    continue
                if limit and len(items) >= limit:
                    more = True
                    if not pred.empty:
                        break
                    remaining += 1
                    continue
                items.append(obj)
                last_key = key
        metadata: JsonDict = {"resourceVersion": str(rv)}
        if more:
            metadata["continue"] = _encode_continue(rv, last_key[len(prefix) :] + "\x00")
            if pred.empty:
                metadata["remainingItemCount"] = remaining
        if rtype.builtin:
            # the apiserver drops kind/apiVersion from the items of built-in lists
            items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items]
        return {
            "kind": rtype.list_kind,
            "apiVersion": rtype.api_version,
            "metadata": metadata,
            "items": items,
        }

    def watch(
        self,
        rtype: ResourceType,
        namespace: str | None,
        pred: Predicate,
        *,
        resource_version: str,
        timeout: float,
        stopping: threading.Event,
    ) -> Generator[bytes, None, None]:
        """The watch event lines from `resource_version` on ("" or "0": current objects first).

        The start is fixed now, when the request arrives; a malformed resourceVersion is 400.
        """
        initial: list[JsonDict] = []
        with self.lock:
            if resource_version in ("", "0"):
                since = self._rv
                coll = self._collections[rtype.key]
                prefix = f"{namespace}/" if namespace is not None else ""
                for key in coll.keys:
                    obj = coll.current(key)
                    if obj is not None and key.startswith(prefix) and pred.matches(obj):
                        initial.append(obj)
                expired = False
            else:
                try:
                    since = int(resource_version)
                except ValueError as exc:
                    raise bad_request(f"invalid resource version: {resource_version}") from exc
                expired = since < self._oldest_readable_rv()
        return self._watch_stream(
            rtype=rtype,
            namespace=namespace,
            pred=pred,
            since=since,
            initial=initial,
            expired=expired,
            timeout=timeout,
            stopping=stopping,
        )

    def _watch_stream(
        self,
        *,
        rtype: ResourceType,
        namespace: str | None,
        pred: Predicate,
        since: int,
        initial: list[JsonDict],
        expired: bool,
        timeout: float,
        stopping: threading.Event,
    ) -> Generator[bytes, None, None]:
        if expired:
            status = status_body(
                410, "Expired", f"too old resource version: {since} ({self._oldest_readable_rv()})"
            )
            yield dumps({"type": "ERROR", "object": status}) + b"\n"
            return
        for obj in initial:
            yield dumps({"type": "ADDED", "object": obj}) + b"\n"
        deadline = time.monotonic() + timeout
        last = since
        while not stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self.lock:
                start = bisect.bisect_right(self._event_rvs, last)
                if start >= len(self._events):
                    self.lock.wait(min(remaining, 0.5))
                    start = bisect.bisect_right(self._event_rvs, last)
                batch = self._events[start:]
            for change in batch:
                last = change.resource_version
                event = _watch_event(change, rtype, namespace, pred)
                if event is not None:
                    yield dumps(event) + b"\n"


def _encode_continue(rv: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
        rv = int(data["rv"])
        start = str(data["start"])
    except (ValueError, KeyError, TypeError) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from exc
    if start.startswith("/") or ".." in start.split("/"):
        raise bad_request("continue key is not valid: key must be relative")
    return rv, start


def _expired_continue(start: str) -> ApiError:
    return ApiError(
        410,
        "Expired",
        "The provided continue parameter is too old to display a consistent list result. You can "
        "start a new list without the continue parameter, or use the continue token in this "
        "response to retrieve the remainder of the results. Continuing with the provided token "
        "results in an inconsistent list - objects that were created, modified, or deleted between "
        "the time the first chunk was returned and now may show up in the list.",
        metadata={"continue": _encode_continue(-1, start)},
    )


def _watch_event(
    change: Change, rtype: ResourceType, namespace: str | None, pred: Predicate
) -> JsonDict | None:
    if change.resource.key != rtype.key:
        return None
    if namespace is not None and change.object["metadata"].get("namespace") != namespace:
        return None
    now = pred.matches(change.object) if change.type != "DELETED" else False
    before = change.old is not None and pred.matches(change.old)
    if change.type == "DELETED":
        return {"type": "DELETED", "object": change.object} if before else None
    if now:
        return {"type": "ADDED" if not before else change.type, "object": change.object}
    if before:
        # leaving the selector looks like a deletion to a filtered watcher
        return {"type": "DELETED", "object": change.object}
    return None
