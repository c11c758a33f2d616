"""Fault injection for the emulated apiserver: delays, error answers, garbage bodies, drops.

Faults are matched before anything else runs (authentication included), like network failures.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from scanner.emulator.errors import ApiError
from scanner.emulator.http import RequestInfo, Response, error_response
from scanner.emulator.rbac import forbidden
from scanner.emulator.resources import JsonDict

_FAULT_REASONS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "the server rejected our request for an unknown reason"),
    401: ("Unauthorized", "Unauthorized"),
    404: ("NotFound", "the server could not find the requested resource"),
    405: ("MethodNotAllowed", "the server does not allow this method on the requested resource"),
    409: ("Conflict", "the server reported a conflict"),
    410: ("Expired", "the resource version is too old"),
    413: ("RequestEntityTooLarge", "the request entity is too large"),
    422: ("Invalid", "the server rejected our request due to an error in our request"),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: injected fault"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "Timeout: request did not complete within the allotted timeout"),
}


@dataclass(eq=False)
class Fault:
    """An injected fault; `hits` counts the requests it answered."""

    pattern: re.Pattern[str]
    method: str
    status: int | None
    delay: float
    body: bytes | None
    times: int | None
    retry_after: int | None
    drop: bool
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str, target: str) -> bool:
        if self.exhausted:
            return False
        if self.method not in ("*", "ANY") and self.method != method:
            return False
        return bool(self.pattern.search(path) or self.pattern.search(target))


class FaultInjector:
    """The injected faults, in order; the first one matching a request answers it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str, target: str) -> Fault | None:
        """The first matching fault, counted as a hit; None when no fault applies."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, target):
                    fault.hits += 1
                    return fault
        return None


def fault_answer(
    fault: Fault, info: RequestInfo, user: str, stopping: threading.Event
) -> Response | None:
    """Play `fault` (sleeping out its delay); None when the normal answer should follow."""
    if fault.delay and stopping.wait(fault.delay):
        return Response(0, drop=True, fault=True)
    if fault.drop:
        return Response(0, drop=True, fault=True)
    if fault.status is None and fault.body is None:
        return None
    status = fault.status or 200
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    if fault.body is not None:
        # the bytes stand in for the normal answer, so they keep its type: text for pods/log
        text = info.resource == "pods" and info.subresource == "log" and status < 300
        content_type = "text/plain" if text else "application/json"
        return Response(status, fault.body, content_type=content_type, headers=headers, fault=True)
    if status == 403:
        err = forbidden(info, user)
    else:
        reason, message = _FAULT_REASONS.get(status, ("", f"injected status {status}"))
        details: JsonDict | None = None
        if status == 429 and fault.retry_after is not None:
            details = {
                "causes": [
                    {
                        "reason": "UnexpectedServerResponse",
                        "message": "Too many requests, please try again later.",
                    }
                ],
                "retryAfterSeconds": fault.retry_after,
            }
        err = ApiError(status, reason, message, details=details)
    err.headers.update(headers)
    response = error_response(err)
    response.fault = True
    return response
