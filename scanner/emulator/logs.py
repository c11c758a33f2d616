"""Container logs of the emulated cluster: `GET .../pods/{name}/log`, answered as kube-apiserver
and the kubelet behind it answer it.

kube-apiserver keeps no logs. It decodes and validates the query (PodLogOptions), reads the pod,
picks the container, and proxies the kubelet's `/containerLogs` answer as `text/plain`; errors
are Status bodies. The emulator plays both parts. `PodLogs` holds what the kubelet would: per
pod uid and container, the lines of the running instance and, after a restart, those of the
previous one. It lives outside the store, so setting a log writes no resourceVersion and wakes
no watch, and a pod deleted and created again under the same name starts without a log.

Not emulated: `follow` (the log so far is answered and the stream ends, as when the container
exits), the kubelet's errors for containers that are waiting or terminated without a log (a
container without a log answers an empty one), `stream` and `insecureSkipTLSVerifyBackend`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from scanner.emulator.errors import ApiError, bad_request
from scanner.emulator.http import Response
from scanner.emulator.resources import JsonDict

CONTENT_TYPE = "text/plain"  # LogREST's LocationStreamer, without a charset
_INT64 = re.compile(r"[+-]?[0-9]+")
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class LogOptions:
    """One request's PodLogOptions (k8s.io/api/core/v1), decoded from the query."""

    container: str = ""
    previous: bool = False
    timestamps: bool = False
    follow: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None
    since_seconds: int | None = None
    since_time: datetime | None = None


def log_options(query: Mapping[str, str], pod: str) -> LogOptions:
    """Decode and validate the query as kube-apiserver does, before it reads the pod.

    A value the parameter codec cannot convert is 400 BadRequest; a value out of range is
    422 Invalid from ValidatePodLogOptions (so a negative tailLines is 422, not 400).
    """
    options = LogOptions(
        container=query.get("container", ""),
        previous=_flag(query, "previous"),
        timestamps=_flag(query, "timestamps"),
        follow=_flag(query, "follow"),
        tail_lines=_int64(query, "tailLines"),
        limit_bytes=_int64(query, "limitBytes"),
        since_seconds=_int64(query, "sinceSeconds"),
        since_time=_time(query, "sinceTime"),
    )
    causes: list[JsonDict] = []
    if options.tail_lines is not None and options.tail_lines < 0:
        causes.append(_cause("tailLines", options.tail_lines, "must be greater than or equal to 0"))
    if options.limit_bytes is not None and options.limit_bytes < 1:
        causes.append(_cause("limitBytes", options.limit_bytes, "must be greater than 0"))
    if options.since_seconds is not None and options.since_time is not None:
        causes.append(
            {
                "reason": "FieldValueForbidden",
                "message": "Forbidden: at most one of `sinceTime` or `sinceSeconds` may be "
                "specified",
                "field": "",
            }
        )
    elif options.since_seconds is not None and options.since_seconds < 1:
        causes.append(_cause("sinceSeconds", options.since_seconds, "must be greater than 0"))
    if causes:
        raise _invalid(pod, causes)
    return options


def container_for(pod: Mapping[str, Any], wanted: str) -> str:
    """The container a log request is for: pod/strategy.go validateContainer.

    No name is fine with exactly one (regular) container; a name must be one of the pod's
    init, regular or ephemeral containers. Otherwise 400 BadRequest, worded as kube's.
    """
    name = str((pod.get("metadata") or {}).get("name", ""))
    spec = pod.get("spec") or {}
    regular = _names(spec.get("containers"))
    every = [
        *_names(spec.get("initContainers")),
        *regular,
        *_names(spec.get("ephemeralContainers")),
    ]
    if not wanted:
        if len(regular) == 1:
            return regular[0]
        if not regular:
            raise bad_request(f"a container name must be specified for pod {name}")
        # Go prints the []string with %s: "[a b c]"
        raise bad_request(
            f"a container name must be specified for pod {name}, choose one of: [{' '.join(every)}]"
        )
    if wanted not in every:
        raise bad_request(f"container {wanted} is not valid for pod {name}")
    return wanted


@dataclass(frozen=True, slots=True)
class _Line:
    time: datetime  # when the runtime wrote it: what timestamps=true shows
    text: str  # with its "\n", except perhaps the last line of a log


@dataclass(frozen=True, slots=True)
class _ContainerLog:
    current: tuple[_Line, ...]
    previous: tuple[_Line, ...] | None  # None: the container has not restarted


def _lines(text: str, at: datetime) -> tuple[_Line, ...]:
    # The runtime splits on "\n" only (str.splitlines would also split on \r, \f, \u2028, ...)
    parts = text.split("\n")
    texts = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        texts.append(parts[-1])
    return tuple(_Line(at, line) for line in texts)


class PodLogs:
    """The logs the kubelets of the emulated cluster hold, by pod uid and container name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logs: dict[tuple[str, str], _ContainerLog] = {}

    def set(
        self,
        pod_uid: str,
        container: str,
        text: str,
        *,
        previous: str | None = None,
        at: datetime | None = None,
    ) -> None:
        """Replace one container's log; `previous` is the previous instance's (None: none).

        Every line is stamped `at` (default now, UTC), as if written at that instant.
        """
        stamp = at if at is not None else datetime.now(UTC)
        entry = _ContainerLog(
            current=_lines(text, stamp),
            previous=None if previous is None else _lines(previous, stamp),
        )
        with self._lock:
            self._logs[(pod_uid, container)] = entry

    def text(self, pod_uid: str, container: str, *, previous: bool = False) -> str | None:
        """The log as set (no timestamps); None when none was set, or no previous instance."""
        with self._lock:
            entry = self._logs.get((pod_uid, container))
        if entry is None:
            return None
        lines = entry.previous if previous else entry.current
        return None if lines is None else "".join(line.text for line in lines)

    def answer(self, pod: Mapping[str, Any], options: LogOptions) -> Response:
        """The answer to a validated request for an existing `pod`: what the apiserver sends
        after asking the pod's kubelet."""
        container = container_for(pod, options.container)
        meta = pod.get("metadata") or {}
        if not (pod.get("spec") or {}).get("nodeName"):
            # No node, so no kubelet to ask: LogLocation gives no location, and the
            # apiserver's StreamObject answers 204 No Content.
            return Response(204, b"", content_type=CONTENT_TYPE)
        with self._lock:
            entry = self._logs.get((str(meta.get("uid", "")), container))
        lines: Sequence[_Line] = ()
        if options.previous:
            if entry is None or entry.previous is None:
                # kubelet validateContainerLogStatus, turned into a BadRequest by the
                # apiserver's GenericHttpResponseChecker
                raise bad_request(
                    f'previous terminated container "{container}" in pod '
                    f'"{meta.get("name", "")}" not found'
                )
            lines = entry.previous
        elif entry is not None:
            lines = entry.current
        return Response(200, _render(lines, options), content_type=CONTENT_TYPE)


def _render(lines: Sequence[_Line], options: LogOptions) -> bytes:
    # The kubelet's order (kuberuntime/logs ReadLogs): the tail is found in the file first,
    # then lines older than since are skipped, then each line is written (with its timestamp),
    # through a writer that stops after limitBytes.
    if options.tail_lines is not None:
        lines = lines[len(lines) - options.tail_lines :] if options.tail_lines else ()
    since = options.since_time
    if options.since_seconds is not None:
        since = datetime.now(UTC) - timedelta(seconds=options.since_seconds)
    if since is not None:
        lines = [line for line in lines if line.time >= since]
    out = "".join(
        f"{_stamp(line.time)} {line.text}" if options.timestamps else line.text for line in lines
    ).encode()
    return out if options.limit_bytes is None else out[: options.limit_bytes]


def _stamp(when: datetime) -> str:
    # RFC3339NanoFixed, the kubelet's timeFormatOut: always nine fraction digits
    utc = when.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond:06d}000Z"


def _names(containers: Any) -> list[str]:
    return [str(c.get("name")) for c in containers or [] if isinstance(c, dict)]


# --- query decoding, as k8s.io/apimachinery's conversions from url.Values ------------------


def _flag(query: Mapping[str, str], key: str) -> bool:
    # Convert_Slice_string_To_bool: only "0" and "false" (any case) are false, "" is true
    if key not in query:
        return False
    return query[key] != "0" and query[key].lower() != "false"


def _int64(query: Mapping[str, str], key: str) -> int | None:
    # Convert_Slice_string_To_Pointer_int64: an empty value is 0; else strconv.ParseInt
    if key not in query:
        return None
    raw = query[key]
    if raw == "":
        return 0
    if not _INT64.fullmatch(raw):
        raise bad_request(f'strconv.ParseInt: parsing "{raw}": invalid syntax')
    value = int(raw)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise bad_request(f'strconv.ParseInt: parsing "{raw}": value out of range')
    return value


def _time(query: Mapping[str, str], key: str) -> datetime | None:
    # metav1.Time.UnmarshalQueryParameter: "" and "null" are the zero time, else RFC 3339
    raw = query.get(key)
    if raw is None:
        return None
    if raw in ("", "null"):
        return datetime.min.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or "T" not in raw:
        raise bad_request(
            f'parsing time "{raw}" as "2006-01-02T15:04:05Z07:00": cannot parse "{raw}"'
        )
    return parsed


def _cause(field: str, value: int, message: str) -> JsonDict:
    return {
        "reason": "FieldValueInvalid",
        "message": f"Invalid value: {value}: {message}",
        "field": field,
    }


def _invalid(pod: str, causes: list[JsonDict]) -> ApiError:
    # errors.NewInvalid(Kind("PodLogOptions"), name, errs): one error is quoted as is, several
    # as an aggregate "[a, b]"; a cause with an empty field omits it (omitempty)
    texts = [f"{c['field']}: {c['message']}" for c in causes]
    summary = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
    return ApiError(
        422,
        "Invalid",
        f'PodLogOptions "{pod}" is invalid: {summary}',
        details={
            "name": pod,
            "kind": "PodLogOptions",
            "causes": [{k: v for k, v in c.items() if v != "" or k != "field"} for c in causes],
        },
    )
