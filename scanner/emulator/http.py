"""HTTP/1.1 (optionally TLS) transport of the emulated apiserver, and what a request is.

Parses requests into `Request`, hands them to one answering function and writes its `Response`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from scanner.emulator.errors import ApiError
from scanner.emulator.resources import dumps

# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What k8s.io/apiserver's RequestInfoFactory makes of a request (verb, resource, ...)."""

    is_resource: bool
    verb: str
    prefix: str = ""
    group: str = ""
    version: str = ""
    namespace: str | None = None
    resource: str | None = None
    name: str | None = None
    subresource: str | None = None
    parts: tuple[str, ...] = ()


_METHOD_VERBS = {
    "GET": "get",
    "HEAD": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


def request_info(method: str, path: str, query: Mapping[str, str]) -> RequestInfo:
    """Mirror of k8s.io/apiserver's RequestInfoFactory for the paths the emulator serves."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return RequestInfo(False, method.lower(), parts=tuple(parts))
    if parts[0] == "api":
        if len(parts) < 2:
            return RequestInfo(False, method.lower(), parts=tuple(parts))
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) < 3:
            return RequestInfo(False, method.lower(), parts=tuple(parts))
        group, version, rest = parts[1], parts[2], parts[3:]
    if not rest:
        return RequestInfo(False, method.lower(), parts=tuple(parts))
    verb = _METHOD_VERBS.get(method, method.lower())
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if name is None:
        if verb == "get":
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
        elif verb == "delete":
            verb = "deletecollection"
    return RequestInfo(
        True,
        verb,
        prefix=parts[0],
        group=group,
        version=version,
        namespace=namespace,
        resource=resource,
        name=name,
        subresource=subresource,
        parts=tuple(parts),
    )


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request: `path` normalized, `target` as sent, the first value of each query."""

    method: str
    path: str
    target: str
    query: Mapping[str, str]
    info: RequestInfo
    body: bytes
    content_type: str | None
    authorization: str | None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the apiserver's authorizer would see it, plus the answer's status."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str  # RBAC verb: get list watch create update patch delete deletecollection
    api_group: str | None  # None for non-resource URLs (discovery, /version)
    api_version: str | None
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    dry_run: bool
    status: int  # 0 when no answer was sent (dropped connection, server stopped)
    content_type: str | None = None
    fault: bool = False

    @property
    def resource_request(self) -> bool:
        return self.api_group is not None


def record_of(request: Request, response: Response) -> RecordedRequest:
    info = request.info
    return RecordedRequest(
        method=request.method,
        path=request.path,
        query=dict(request.query),
        verb=info.verb,
        api_group=info.group if info.is_resource else None,
        api_version=info.version if info.is_resource else None,
        resource=info.resource,
        subresource=info.subresource,
        namespace=info.namespace,
        name=info.name,
        dry_run=request.query.get("dryRun") == "All",
        status=0 if response.drop else response.status,
        content_type=request.content_type,
        fault=response.fault,
    )


# --- responses -----------------------------------------------------------------------------


@dataclass(slots=True)
class Response:
    """An answer: a body, or a `stream` of chunks, or `drop` (close without answering)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: Generator[bytes, None, None] | None = None
    drop: bool = False
    fault: bool = False


def json_response(status: int, obj: Any) -> Response:
    return Response(status, dumps(obj))


def error_response(err: ApiError) -> Response:
    return Response(err.code, dumps(err.body()), headers=dict(err.headers))


def not_found_page() -> Response:
    # what the apiserver's NotFoundHandler answers for paths no API group serves
    return Response(404, b"404 page not found\n", content_type="text/plain; charset=utf-8")


# --- server --------------------------------------------------------------------------------


class Connections:
    """The server's open connections and counters; they outlive a stop and restart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self.accepted = 0
        self.failed_handshakes = 0

    def opened(self, conn: Any) -> None:
        with self._lock:
            self.accepted += 1
            self._open.add(conn)

    def closed(self, conn: Any) -> None:
        with self._lock:
            self._open.discard(conn)

    def handshake_failed(self) -> None:
        with self._lock:
            self.failed_handshakes += 1

    def shut_down_all(self) -> None:
        """Shut every open connection down, which also ends handlers blocked on them."""
        with self._lock:
            connections = list(self._open)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class ApiHttpServer(ThreadingHTTPServer):
    """Serves `answer(request)` on `address`, one thread per connection."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        answer: Callable[[Request], Response],
        context: ssl.SSLContext | None,
        connections: Connections,
    ) -> None:
        self.answer = answer
        self.ssl_context = context
        self.connections = connections
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # headers and body leave in separate writes; without NODELAY, Nagle plus the client's
        # delayed ACK would add ~40 ms to every answer
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = request
        if self.ssl_context is not None:
            # the handshake runs here, in the connection's own thread, so a client that connects
            # and never speaks TLS cannot stall the accept loop
            request.settimeout(10)
            try:
                conn = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                self.connections.handshake_failed()
                return
            conn.settimeout(None)
        self.connections.opened(conn)
        try:
            _Handler(conn, client_address, self)
        finally:
            self.connections.closed(conn)
            if conn is not request:
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients going away mid-answer are normal here; handler bugs are recorded by `answer`
        return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        path = split.path
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"  # the apiserver's mux serves /version/ as /version
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        info = request_info(method, path, query)
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        response = self.server.answer(
            Request(
                method=method,
                path=path,
                target=self.path,
                query=query,
                info=info,
                body=body,
                content_type=self.headers.get("Content-Type"),
                authorization=self.headers.get("Authorization"),
            )
        )
        if response.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            self._send(response)
        except (OSError, ssl.SSLError):
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.stream is None:
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in response.stream:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            response.stream.close()
