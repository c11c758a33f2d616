"""The emulated apiserver's errors: `ApiError` and the `Status` bodies it answers with.

Reasons, messages and details match kube-apiserver's, because clients branch on them.
"""

from __future__ import annotations

from collections.abc import Mapping

from scanner.emulator.resources import JsonDict, ResourceType

NAMESPACE_MISMATCH = (
    "the namespace of the provided object does not match the namespace sent on the request"
)
MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def status_body(
    code: int,
    reason: str,
    message: str,
    *,
    details: JsonDict | None = None,
    metadata: JsonDict | None = None,
) -> JsonDict:
    """A `Status` object shaped exactly as the apiserver writes it (key order included)."""
    body: JsonDict = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": metadata or {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


class ApiError(Exception):
    """An error the emulator answers with a Status body."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: JsonDict | None = None,
        metadata: JsonDict | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.metadata = metadata
        self.headers = dict(headers or {})

    def body(self) -> JsonDict:
        return status_body(
            self.code, self.reason, self.message, details=self.details, metadata=self.metadata
        )


def details(rtype: ResourceType, name: str, *, kind: str | None = None) -> JsonDict:
    """The `details` of a Status about one object (`kind` is the plural unless given)."""
    found: JsonDict = {"name": name}
    if rtype.group:
        found["group"] = rtype.group
    found["kind"] = kind or rtype.plural
    return found


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{rtype.group_resource} "{name}" not found', details=details(rtype, name)
    )


def resource_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", details={})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed() -> ApiError:
    return ApiError(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        details={},
    )


def conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": {why}',
        details=details(rtype, name),
    )


def invalid(rtype: ResourceType, name: str, field_path: str, message: str, reason: str) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'{rtype.kind} "{name}" is invalid: {field_path}: {message}',
        details={
            **details(rtype, name, kind=rtype.kind),
            "causes": [{"reason": reason, "message": message, "field": field_path}],
        },
    )
