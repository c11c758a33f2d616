"""The emulated apiserver's non-resource endpoints: health, /version and API discovery.

Discovery is built from the registered resources, so a custom resource appears once it is served.
"""

from __future__ import annotations

from collections.abc import Sequence

from scanner.emulator.http import Response, json_response, not_found_page
from scanner.emulator.resources import JsonDict, ResourceType

HEALTH_PATHS = ("/healthz", "/livez", "/readyz")
_ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def non_resource(
    path: str,
    types: Sequence[ResourceType],
    *,
    kubernetes_version: str,
    server_address: str,
) -> Response:
    """The answer to a non-resource path (404 page for those no API group serves)."""
    parts = [p for p in path.strip("/").split("/") if p]
    if path in HEALTH_PATHS:
        return Response(200, b"ok", content_type="text/plain; charset=utf-8")
    if path == "/version":
        major, minor = kubernetes_version.lstrip("v").split(".")[:2]
        return json_response(
            200,
            {
                "major": major,
                "minor": minor,
                "gitVersion": kubernetes_version,
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            },
        )
    if parts == ["api"]:
        return json_response(
            200,
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
                ],
            },
        )
    if parts == ["api", "v1"]:
        return json_response(200, _resource_list("v1", [t for t in types if t.group == ""]))
    if parts == ["apis"]:
        groups: dict[str, list[str]] = {}
        for t in types:
            if t.group and t.version not in groups.setdefault(t.group, []):
                groups[t.group].append(t.version)
        return json_response(
            200,
            {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_api_group(g, vs) for g, vs in sorted(groups.items())],
            },
        )
    if len(parts) == 2 and parts[0] == "apis":
        versions = sorted({t.version for t in types if t.group == parts[1]})
        if versions:
            return json_response(
                200, {"kind": "APIGroup", "apiVersion": "v1", **_api_group(parts[1], versions)}
            )
    if len(parts) == 3 and parts[0] == "apis":
        served = [t for t in types if t.group == parts[1] and t.version == parts[2]]
        if served:
            return json_response(200, _resource_list(f"{parts[1]}/{parts[2]}", served))
    return not_found_page()


def _resource_list(group_version: str, types: Sequence[ResourceType]) -> JsonDict:
    resources: list[JsonDict] = []
    for t in sorted(types, key=lambda t: t.plural):
        entry: JsonDict = {
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": list(_ALL_VERBS),
        }
        if t.short_names:
            entry["shortNames"] = list(t.short_names)
        resources.append(entry)
        if t.status_subresource:
            resources.append(
                {
                    "name": f"{t.plural}/status",
                    "singularName": "",
                    "namespaced": t.namespaced,
                    "kind": t.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def _api_group(group: str, versions: Sequence[str]) -> JsonDict:
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}
