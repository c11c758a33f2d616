"""Who may do what on the emulated apiserver: bearer-token authentication and RBAC rules.

Authorization runs before the object is looked up, as in kube-apiserver, so a denied request is
403 Forbidden whether or not the object exists.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scanner.emulator.errors import ApiError
from scanner.emulator.http import RequestInfo
from scanner.emulator.resources import JsonDict

RbacRules = Sequence[Mapping[str, Any]] | Mapping[str, Any]


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`; the scheme is case-insensitive, as in the apiserver."""
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and value.strip() == token


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def forbidden(info: RequestInfo, user: str) -> ApiError:
    """The apiserver's 403 for `user`, worded for a resource or a non-resource URL."""
    if not info.is_resource:
        path = "/" + "/".join(info.parts)
        return ApiError(
            403,
            "Forbidden",
            f'forbidden: User "{user}" cannot {info.verb} path "{path}"',
            details={},
        )
    resource = info.resource or ""
    full = f"{resource}/{info.subresource}" if info.subresource else resource
    shown = resource if not info.group else f"{resource}.{info.group}"
    subject = f'{shown} "{info.name}"' if info.name else shown
    scope = f'in the namespace "{info.namespace}"' if info.namespace else "at the cluster scope"
    message = (
        f'{subject} is forbidden: User "{user}" cannot {info.verb} resource "{full}" '
        f'in API group "{info.group}" {scope}'
    )
    details: JsonDict = {}
    if info.name:
        details["name"] = info.name
    if info.group:
        details["group"] = info.group
    details["kind"] = resource
    return ApiError(403, "Forbidden", message, details=details)


@dataclass(frozen=True, slots=True)
class _RbacRule:
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str]
    namespace: str | None  # set for rules of a namespaced Role

    def allows(self, info: RequestInfo) -> bool:
        if self.namespace is not None and info.namespace != self.namespace:
            return False
        if "*" not in self.groups and info.group not in self.groups:
            return False
        if "*" not in self.verbs and info.verb not in self.verbs:
            return False
        wanted = info.resource or ""
        if info.subresource:
            wanted = f"{wanted}/{info.subresource}"
        candidates = {"*", wanted}
        if info.subresource:
            candidates.add(f"*/{info.subresource}")
        if not candidates & self.resources:
            return False
        return not self.names or info.name in self.names


def _compile(rules: RbacRules) -> tuple[_RbacRule, ...]:
    sources: list[tuple[Mapping[str, Any], str | None]] = []
    for item in [rules] if isinstance(rules, Mapping) else list(rules):
        kind = item.get("kind")
        if kind in ("Role", "ClusterRole"):
            ns = item.get("metadata", {}).get("namespace") if kind == "Role" else None
            sources.extend((rule, ns) for rule in item.get("rules") or [])
        else:
            sources.append((item, None))
    return tuple(
        _RbacRule(
            groups=frozenset(rule.get("apiGroups") or []),
            resources=frozenset(rule.get("resources") or []),
            verbs=frozenset(rule.get("verbs") or []),
            names=frozenset(rule.get("resourceNames") or []),
            namespace=ns,
        )
        for rule, ns in sources
        if rule.get("resources")
    )


class Authorizer:
    """The RBAC rule set resource requests are checked against; None allows everything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: tuple[_RbacRule, ...] | None = None

    def configure(self, rules: RbacRules | None) -> None:
        """PolicyRule dicts, Role/ClusterRole objects or a list of those; None switches off."""
        compiled = None if rules is None else _compile(rules)
        with self._lock:
            self._rules = compiled

    def authorize(self, info: RequestInfo, user: str) -> None:
        """Raise the apiserver's 403 Forbidden unless a rule allows the request."""
        with self._lock:
            rules = self._rules
        if rules is None or any(rule.allows(info) for rule in rules):
            return
        raise forbidden(info, user)
