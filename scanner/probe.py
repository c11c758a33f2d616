"""Knock on every node's Felix metrics port and record what answers.

This is the only module that opens sockets to nodes. For each `ProbeTarget` it makes a TCP connect
(closed / filtered / unreachable / open); on an open port it tries a TLS handshake and records the
certificate, falls back to plain HTTP on a new connection when the peer does not speak TLS, and
sends exactly one `GET /metrics` to tell a Felix endpoint from any other listener. Nothing else is
ever sent, redirects are recorded and never followed, and every phase has its own deadline, so time
and memory per node are bounded. A per-node problem never raises: it becomes a `ProbeResult`.

Two memories keep a fleet's repeated scans cheap without changing any result:

- The protocol each (address, port) spoke last time: an explicit `hints` mapping from the caller
  (the previous scan's stored results), else what earlier probes in this process learned (a
  bounded LRU). An endpoint that answered plain HTTP is asked in plain HTTP first, on one
  connection; when the answer is not HTTP (a TLS record, Go's "Client sent an HTTP request to an
  HTTPS server", a reset, silence...), the probe goes on exactly as without the hint: a TLS
  attempt on a new connection, and that plain answer stands for the plain retry. A wrong hint
  costs one connect; the result is the one an unhinted probe records.
- Certificate facts (subject, issuer, self-signed, validity, SHA-256) are parsed once per distinct
  certificate, keyed by its digest, after the connections are done: the event loop only keeps
  the DER bytes, the TLS version and the cipher, so parsing never delays another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import math
import os
import re
import resource
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from scanner import __version__
from scanner.core.records import ProbeResult, ProbeState, ProbeTarget, Protocol, TlsFacts

__all__ = [
    "ProbeSettings",
    "forget_learned",
    "probe_many",
    "probe_nodes",
    "raise_nofile_limit",
]

NO_ADDRESS = "node has no address of the configured type"

_UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
_MAX_HEAD = 64 * 1024  # status line + headers; Felix sends a few hundred bytes
_MAX_LINE = 4096  # chunk-size lines, trailers, and how much of one metrics line is scanned
_READ_SIZE = 65536  # one shared receive buffer of this size serves every connection
_TLS_READ = 16384  # a TLS record carries at most 16 KiB of plaintext
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_RAMP_BATCH = 256  # workers started per loop turn
_FD_RESERVE = 64  # descriptors left for the rest of the process (database, logs, ...)
_PEER_FIRST = 96  # first bytes of an answer kept: a TLS record header, Go's HTTPS refusal
_PROTOCOLS_KEPT = 65536  # (address, port) -> protocol entries learned in this process
_CERTS_KEPT = 16384  # parsed certificates kept in this process, by SHA-256 of the DER
# what Go's crypto/tls server (Felix, Typha) writes when a plain HTTP request reaches it
_GO_HTTPS_REFUSAL = b"Client sent an HTTP request to an HTTPS server"

_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? +(\d{3})(?:[ \t].*)?")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_FELIX_LINE = re.compile(rb"^(?:#[ \t]+(?:HELP|TYPE)[ \t]+)?felix_[A-Za-z0-9_:]", re.M)


@functools.lru_cache(maxsize=8)
def _metric_line(prefix: str) -> re.Pattern[bytes]:
    """A metrics line (or its HELP/TYPE comment) of a metric named `prefix...`."""
    return re.compile(rb"^(?:#[ \t]+(?:HELP|TYPE)[ \t]+)?" + re.escape(prefix.encode())
                      + rb"[A-Za-z0-9_:]", re.M)
_FELIX_HOST = re.compile(rb"^felix_host\{([^}\n]*)\}", re.M)
_HOST_LABEL = re.compile(rb'(?:^|,)[ \t]*host[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_HOST_LIMIT = 253  # felix_host is a node name
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True)
class ProbeSettings:
    """Timeouts (seconds), pool size and limits for one probe phase.

    The names are the YAML keys of `probe:` (`scanner.core.config.ProbeConfig`), kept as they
    are down to the stored scan. `timeout_seconds` bounds each TCP connect;
    `http_timeout_seconds` is the deadline for the whole GET: sending it and reading the
    response. One node costs at most connect + tls + connect + http timeouts (a TLS attempt
    that times out, then plain HTTP on a new connection), and at most `max_body_bytes` of body
    is read.
    """

    timeout_seconds: float = 2.0
    tls_timeout_seconds: float = 3.0
    http_timeout_seconds: float = 5.0
    concurrency: int = 256
    max_body_bytes: int = 1_048_576
    user_agent: str = f"felixscan/{__version__}"
    # The metric-name prefix that identifies the component behind an open port (a result's
    # `felix` field: `felix_` for Felix, `typha_` for Typha, ...).
    metric_prefix: str = "felix_"

    def __post_init__(self) -> None:
        for name in ("timeout_seconds", "tls_timeout_seconds", "http_timeout_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number of seconds, not {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"{name} must be a positive finite number of seconds, not {value!r}"
                )
        for name in ("concurrency", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, not {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value!r}")
        ua = self.user_agent
        if not isinstance(ua, str) or not ua or not ua.isascii() or not ua.isprintable():
            # it goes into a request header verbatim: no control characters, no header injection
            raise ValueError(f"user_agent must be non-empty printable ASCII, not {ua!r}")


@functools.cache
def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (once per process); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an unlimited hard limit is not a valid soft value everywhere; this is plenty for a scan
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass  # a container may forbid it; the pool is then sized to the lower limit
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


Hints = Mapping[tuple[str, int], str]


async def probe_many(targets: Sequence[ProbeTarget], settings: ProbeSettings, *,
                     on_result: Callable[[ProbeTarget, ProbeResult], None] | None = None,
                     hints: Hints | None = None,
                     ) -> list[ProbeResult]:
    """Probe every target with at most `settings.concurrency` in flight; results in target order.

    `on_result(target, result)` is called on the event loop as each target is done (progress);
    it must be quick and must not raise. A result that carries a certificate not seen before is
    handed over once the certificates are parsed, after the last connection.

    `hints` maps (address, port) to the protocol it spoke last time, "https" or "http" (other
    values are ignored); a target without a hint uses what earlier probes in this process
    learned. Hints only choose which protocol is asked first: they never change a result.
    """
    items = list(targets)
    if not items:
        return []
    # a probe holds one socket at a time (the TLS attempt is closed before a plain retry)
    fd_room = max(1, raise_nofile_limit() - _FD_RESERVE)
    pool = min(settings.concurrency, len(items), fd_room)
    prober = _Prober(settings, asyncio.get_running_loop())
    plain_first = _plain_first(items, hints)
    results: list[ProbeResult | None] = [None] * len(items)
    parked: list[tuple[int, _Unparsed]] = []
    indexes = iter(range(len(items)))

    # a fixed pool of workers is a semaphore without a parked task per waiting target
    async def worker() -> None:
        for i in indexes:
            done = await prober.probe(items[i], plain_first=plain_first[i])
            if isinstance(done, _Unparsed):
                parked.append((i, done))
                continue
            results[i] = done
            if on_result is not None:
                on_result(items[i], done)

    tasks: list[asyncio.Task[None]] = []
    try:
        for n in range(pool):
            tasks.append(asyncio.create_task(worker()))
            if n % _RAMP_BATCH == _RAMP_BATCH - 1:
                # let the loop read answers between batches: thousands of connects started in
                # one loop turn would delay reading the first answers by that whole turn
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for i, unparsed in parked:
        results[i] = result = unparsed.complete()
        if on_result is not None:
            on_result(items[i], result)
    done = [r for r in results if r is not None]
    assert len(done) == len(items)
    _PROTOCOLS.learn(done)
    return done


def probe_nodes(targets: Sequence[ProbeTarget], settings: ProbeSettings, *,
                on_result: Callable[[ProbeTarget, ProbeResult], None] | None = None,
                hints: Hints | None = None,
                ) -> list[ProbeResult]:
    """Synchronous `probe_many` for callers without an event loop."""
    return asyncio.run(probe_many(targets, settings, on_result=on_result, hints=hints))


def forget_learned() -> None:
    """Drop what probes in this process learned: protocols per endpoint, parsed certificates."""
    _PROTOCOLS.clear()
    _CERTS.clear()


# --- internals ------------------------------------------------------------------------------

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _Lru(Generic[_K, _V]):
    """A bounded map that forgets its least recently used entry; safe to share across threads
    (`serve` may probe several clusters at once, each on its own event loop)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._data: OrderedDict[_K, _V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: _K) -> _V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            self._put(key, value)

    def _put(self, key: _K, value: _V) -> None:
        data = self._data
        data[key] = value
        data.move_to_end(key)
        while len(data) > self._size:
            data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class _ProtocolMemory(_Lru[tuple[str, int], str]):
    """(address, port) -> "http" or "https": what the endpoint spoke when last probed."""

    def learn(self, results: Sequence[ProbeResult]) -> None:
        with self._lock:
            for r in results:
                if r.address is None:
                    continue
                key = (r.address, r.port)
                if r.protocol in ("http", "https"):
                    self._put(key, r.protocol)
                else:
                    self._data.pop(key, None)  # closed, gone or not HTTP: no longer a hint


_PROTOCOLS = _ProtocolMemory(_PROTOCOLS_KEPT)


def _plain_first(items: Sequence[ProbeTarget], hints: Hints | None) -> list[bool]:
    """Per target: ask in plain HTTP first (its hint, else what this process learned, is http)."""
    flags = []
    for target in items:
        if target.address is None:
            flags.append(False)
            continue
        key = (target.address, target.port)
        hint = hints.get(key) if hints is not None else None
        if hint not in ("http", "https"):
            hint = _PROTOCOLS.get(key)
        flags.append(hint == "http")
    return flags



@dataclass(frozen=True, slots=True)
class _Fail:
    """A probe step ended the probe with this state and error text.

    Returned, not raised: thousands of refused connects per scan would otherwise each build an
    exception chain and traceback cycle for the garbage collector to find.
    """

    state: ProbeState
    text: str
    connect_ms: float | None = None  # set when the connect was accepted, then reset


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # we record the certificate as evidence; trusting it is not the question
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # record facts from old or weak endpoints too instead of failing the handshake
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def _os_error_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason} ({name})" if name else reason


def _ssl_error_text(exc: ssl.SSLError) -> str:
    reason = exc.reason or exc.strerror or str(exc)
    return str(reason).lower().replace("_", " ")


def _fmt_seconds(value: float) -> str:
    return f"{value:g} s"


def _resolve(fut: asyncio.Future[None]) -> None:
    # a future awaited under a deadline is cancelled when the deadline passes
    if not fut.done():
        fut.set_result(None)


class _Response:
    """Incremental HTTP/1.x response reader that keeps only what the verdict needs.

    The body is never stored: it is counted against the cap and scanned line by line for Felix
    metrics, so memory per connection stays at a few KiB whatever the peer sends.
    """

    __slots__ = (
        "_buf",
        "_chunked",
        "_identify",
        "_max_body",
        "_phase",
        "_remaining",
        "_tail",
        "body_bytes",
        "complete",
        "error",
        "felix",
        "felix_host",
        "first_bytes",
        "http_like",
        "status",
        "truncated",
    )

    # phases
    HEAD, LENGTH, UNTIL_CLOSE, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, DONE = range(8)

    def __init__(self, max_body: int, identify: re.Pattern[bytes] = _FELIX_LINE) -> None:
        self._identify = identify
        self._max_body = max_body
        self._buf = bytearray()
        self._phase = self.HEAD
        self._remaining = 0
        self._chunked = False
        self._tail = b""
        self.status: int | None = None
        self.http_like: bool | None = None  # None until the first bytes decide it
        self.felix = False
        self.felix_host: str | None = None
        self.body_bytes = 0
        self.complete = False
        self.truncated = False
        self.error: str | None = None
        self.first_bytes = b""

    @property
    def finished(self) -> bool:
        return self.complete or self.error is not None

    def feed(self, data: bytes) -> None:
        if len(self.first_bytes) < 16:
            self.first_bytes = (self.first_bytes + data)[:16]
        while data and not self.finished:
            phase = self._phase
            if phase == self.HEAD:
                data = self._feed_head(data)
            elif phase in (self.LENGTH, self.CHUNK_DATA):
                take = min(self._remaining, len(data))
                self._remaining -= take
                self._body(data[:take])
                data = data[take:]
                if self._remaining == 0 and not self.finished:
                    if phase == self.LENGTH:
                        self._finish()
                    else:
                        self._phase = self.CHUNK_END
            elif phase == self.UNTIL_CLOSE:
                self._body(data)
                data = b""
            else:  # CHUNK_SIZE, CHUNK_END, TRAILER: line oriented
                line, data = self._take_line(data)
                if line is not None:
                    self._on_line(line)

    def feed_eof(self) -> None:
        if self.finished:
            return
        if self._phase == self.UNTIL_CLOSE:
            self._finish()
        elif self._phase == self.HEAD:
            if not self._buf:
                self.http_like = False if self.http_like is None else self.http_like
                self.error = "connection closed without a response"
            elif self.http_like:
                self.error = "connection closed inside the response headers"
            else:
                self.http_like = False
                self.error = f"peer did not answer with HTTP (first bytes {self.first_bytes!r})"
        else:
            self.error = (
                f"connection closed before the response body was complete "
                f"({self.body_bytes} bytes read)"
            )
        self._scan_tail()

    # head ------------------------------------------------------------------------------------

    def _feed_head(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        if self.http_like is None:
            prefix = bytes(buf[:5])
            if len(prefix) == 5:
                self.http_like = prefix == b"HTTP/"
            elif not b"HTTP/".startswith(prefix):
                self.http_like = False
            if self.http_like is False:
                self.error = f"peer did not answer with HTTP (first bytes {self.first_bytes!r})"
                return b""
        match = _HEAD_END.search(buf)
        if match is None:
            if len(buf) > _MAX_HEAD:
                self.error = f"response headers longer than {_MAX_HEAD} bytes"
            return b""
        head = bytes(buf[: match.start()])
        rest = bytes(buf[match.end() :])
        buf.clear()
        self._on_head(head)
        return rest

    def _on_head(self, head: bytes) -> None:
        lines = head.split(b"\n")
        status_line = _STATUS_LINE.fullmatch(lines[0].rstrip(b"\r"))
        if status_line is None:
            self.error = f"malformed HTTP status line {lines[0][:80]!r}"
            return
        status = int(status_line.group(1))
        if 100 <= status < 200 and status != 101:
            return  # an interim response; the real one follows
        self.status = status
        headers: dict[bytes, bytes] = {}
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        coding = headers.get(b"transfer-encoding", b"").split(b",")[-1].strip().lower()
        if status in (101, 204, 304):
            self._finish()
        elif coding == b"chunked":
            self._chunked = True
            self._phase = self.CHUNK_SIZE
        elif b"content-length" in headers:
            raw_length = headers[b"content-length"]
            if not raw_length.isdigit():
                self.error = f"invalid Content-Length {raw_length[:40]!r}"
                return
            self._remaining = int(raw_length)
            self._phase = self.LENGTH
            if self._remaining == 0:
                self._finish()
        else:
            self._phase = self.UNTIL_CLOSE

    # chunked framing ---------------------------------------------------------------------------

    def _take_line(self, data: bytes) -> tuple[bytes | None, bytes]:
        end = data.find(b"\n")
        if end < 0:
            self._buf += data
            if len(self._buf) > _MAX_LINE:
                self.error = "chunked framing line too long"
            return None, b""
        line = bytes(self._buf) + data[:end]
        self._buf.clear()
        if len(line) > _MAX_LINE:
            self.error = "chunked framing line too long"
            return None, b""
        return line.rstrip(b"\r"), data[end + 1 :]

    def _on_line(self, line: bytes) -> None:
        if self._phase == self.CHUNK_SIZE:
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                size = -1
            if size < 0 or not size_text:
                self.error = f"malformed chunk size {line[:40]!r}"
            elif size == 0:
                self._phase = self.TRAILER
            else:
                self._remaining = size
                self._phase = self.CHUNK_DATA
        elif self._phase == self.CHUNK_END:
            if line:
                self.error = "malformed chunked body (missing CRLF after a chunk)"
            else:
                self._phase = self.CHUNK_SIZE
        elif not line:  # TRAILER: an empty line ends the message
            self._finish()

    # body --------------------------------------------------------------------------------------

    def _body(self, data: bytes) -> None:
        room = self._max_body - self.body_bytes
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.body_bytes += len(data)
        self._scan(data)
        if self.truncated:
            self._finish()

    def _scan(self, data: bytes) -> None:
        if self.felix and self.felix_host is not None:
            return  # everything the verdict needs is known; just count the rest
        if self._tail:
            data = self._tail + data
        cut = data.rfind(b"\n")
        if cut < 0:
            # only the start of a metrics line matters, so an endless line costs no memory
            self._tail = data[:_MAX_LINE]
            return
        self._tail = data[cut + 1 : cut + 1 + _MAX_LINE]
        self._scan_lines(data[: cut + 1])

    def _scan_tail(self) -> None:
        if self._tail:
            tail, self._tail = self._tail, b""
            self._scan_lines(tail)

    def _scan_lines(self, lines: bytes) -> None:
        if not self.felix and self._identify.search(lines):
            self.felix = True
        if self.felix_host is None:
            match = _FELIX_HOST.search(lines)
            if match is not None:
                label = _HOST_LABEL.search(match.group(1))
                if label is not None:
                    self.felix_host = _unescape_label(label.group(1))

    def _finish(self) -> None:
        self._phase = self.DONE
        self.complete = True
        self._scan_tail()


def _unescape_label(raw: bytes) -> str:
    # Prometheus text format escapes only backslash, double quote and newline in label values
    text = raw.decode("utf-8", "replace")
    text = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)
    # Whoever listens on the port writes this label; it is stored and shown as a node name
    # (at most 253 characters) and must not carry controls into a terminal or the database.
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                        else f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= _HOST_LIMIT else text[: _HOST_LIMIT - 1] + "\u2026"


class _Exchange:
    """One connection: an optional TLS handshake, one request, one response.

    It drives a connected non-blocking socket straight from the event loop's reader callback
    instead of an asyncio transport: a probe needs none of a transport's flow control, and the
    transport and SSL-protocol layers cost more CPU than the handshake itself at fleet scale
    (and asyncio's SSL transport keeps a 256 KiB buffer per connection). TLS runs over
    `ssl.MemoryBIO`; every connection reads into one shared buffer and copies out what it got.
    """

    __slots__ = (
        "_buffer",
        "_fd",
        "_in",
        "_loop",
        "_out",
        "_pending",
        "_reading",
        "_request",
        "_sock",
        "_ssl",
        "bug",
        "done",
        "ended",
        "error",
        "handshake_done",
        "handshake_error",
        "handshaken",
        "peer_cert",
        "peer_first",
        "response",
        "timed_out",
        "tls_cipher",
        "tls_version",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        buffer: memoryview,
        request: bytes,
        *,
        response: _Response,
        tls: tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._buffer = buffer
        self._request = request
        self._ssl: ssl.SSLObject | None = None
        self._in: ssl.MemoryBIO | None = None
        self._out: ssl.MemoryBIO | None = None
        if tls is not None:
            self._ssl, self._in, self._out = tls
        self._pending = b""  # bytes the socket did not take yet
        self._reading = False
        self.response = response
        self.handshake_done: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.handshaken = False
        self.handshake_error: str | None = None
        self.peer_first = b""  # the first raw bytes the peer sent: TLS, plaintext, a refusal
        self.error: str | None = None  # a transport or TLS problem after the handshake
        self.timed_out = False  # the HTTP deadline passed before the response was whole
        self.ended = False  # nothing more to read: answered, failed or closed
        self.bug: BaseException | None = None
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.peer_cert: bytes | None = None

    @property
    def peer_spoke_tls(self) -> bool:
        # a TLS record starts with content type handshake (22) or alert (21), then version 3.x
        first = self.peer_first
        return len(first) >= 2 and first[0] in (21, 22) and first[1] == 3

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._guard, self._readable)
        self._reading = True
        if self._ssl is None:
            self._send(self._request)
        else:
            self._handshake()

    def close(self) -> None:
        """Unregister from the loop, then close: the fd number must not be reused while watched."""
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._pending:
            self._loop.remove_writer(self._fd)
            self._pending = b""
        # close with RST, as port scanners do: a FIN would park the ephemeral port in TIME_WAIT
        # for a minute, and a few nightly scans of thousands of nodes exhaust the port range
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self._sock.close()

    # socket events -----------------------------------------------------------------------------

    def _guard(self, callback: Callable[[], object]) -> None:
        # the loop would only log an exception raised in a callback; keep it for the probe
        try:
            callback()
        except BaseException as exc:  # re-raised by Prober._exchange, not swallowed
            self.bug = exc
            self._end()
            raise

    def _readable(self) -> bool:
        """Take what the socket holds now; False when there was nothing (more) to take."""
        try:
            nbytes = self._sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._lost(exc)
            return False
        if nbytes == 0:
            self._eof()
            return False
        data = bytes(self._buffer[:nbytes])
        if len(self.peer_first) < _PEER_FIRST:
            self.peer_first = (self.peer_first + data)[:_PEER_FIRST]
        if self._in is None:
            self.response.feed(data)
            if self.response.finished:
                self._end()
        else:
            self._in.write(data)
            if self.handshaken:
                self._read_tls()
            else:
                self._handshake()
        return True

    def drain(self) -> None:
        """At a deadline, process what already arrived before calling it a timeout.

        Our own event loop may run late (thousands of sockets, a busy CPU); what the kernel
        received in time is the peer's answer, and must not be reported as silence.
        """
        while self._reading and self._readable():
            pass

    def _eof(self) -> None:
        self._stop_reading()  # a level-triggered EOF would otherwise wake us forever
        if self._in is None:
            self.response.feed_eof()
        else:
            self._in.write_eof()
            if self.handshaken:
                self._read_tls()
            else:
                self._handshake()
        self._end()

    def _lost(self, exc: OSError) -> None:
        self._stop_reading()
        if self._ssl is not None and not self.handshaken:
            self.handshake_error = self.handshake_error or _lost_text(exc)
        elif not self.response.finished and self.error is None:
            self.error = _lost_text(exc)
        self._end()

    def _send(self, data: bytes) -> None:
        if self._pending:
            self._pending += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            # a few hundred bytes into an empty socket buffer: practically never happens
            self._pending = data[sent:]
            self._loop.add_writer(self._fd, self._guard, self._writable)

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._loop.remove_writer(self._fd)
            self._pending = b""
            self._lost(exc)
            return
        self._pending = self._pending[sent:]
        if not self._pending:
            self._loop.remove_writer(self._fd)

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    # TLS ---------------------------------------------------------------------------------------

    def _handshake(self) -> None:
        assert self._ssl is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLEOFError:
            self.handshake_error = "peer closed the connection during the TLS handshake"
            self._end()
            return
        except ssl.SSLError as exc:
            self.handshake_error = _ssl_error_text(exc)
            self._end()
            return
        self.handshaken = True
        self.tls_version = self._ssl.version()
        cipher = self._ssl.cipher()
        self.tls_cipher = cipher[0] if cipher else None
        self.peer_cert = self._ssl.getpeercert(binary_form=True)
        _resolve(self.handshake_done)
        self._ssl.write(self._request)
        self._flush()
        self._read_tls()  # the server may already have sent data after its Finished

    def _read_tls(self) -> None:
        assert self._ssl is not None
        response = self.response
        while not response.finished:
            try:
                chunk = self._ssl.read(_TLS_READ)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # most servers close without close_notify; the framing says if the body is whole
                response.feed_eof()
                break
            except ssl.SSLError as exc:
                self.error = f"TLS error after the handshake: {_ssl_error_text(exc)}"
                break
            if not chunk:
                response.feed_eof()
                break
            response.feed(chunk)
        self._flush()
        if response.finished or self.error is not None:
            self._end()

    def _flush(self) -> None:
        if self._out is not None:
            pending = self._out.read()
            if pending:
                self._send(pending)

    def _end(self) -> None:
        self.ended = True
        self._stop_reading()
        _resolve(self.handshake_done)
        _resolve(self.done)


def _lost_text(exc: BaseException | None) -> str:
    if exc is None:
        return "peer closed the connection"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, OSError):
        return _os_error_text(exc)
    return repr(exc)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    family: socket.AddressFamily
    sockaddr: tuple[str, int] | tuple[str, int, int, int]
    host_header: str
    sni: str | None


def _late_connect_result(sock: socket.socket) -> int:
    """The errno of a connect whose deadline passed: 0 when it did connect after all.

    The kernel may have finished the handshake (or taken the RST) in time while our loop was
    busy elsewhere; its verdict is the peer's, so ask it before calling the port filtered.
    """
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        return err
    try:
        sock.getpeername()
    except OSError:
        return errno.ETIMEDOUT  # still SYN_SENT: no answer at all
    return 0


def _ip_endpoint(address: str, port: int) -> _Endpoint | _Fail | None:
    """The endpoint for an IP literal; None when `address` is a DNS name."""
    # inet_pton instead of ipaddress: this runs once per node and is 20x cheaper
    try:
        socket.inet_pton(socket.AF_INET, address)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        pass
    else:
        return _Endpoint(socket.AF_INET, (address, port), f"{address}:{port}", None)
    bare, _, scope = address.partition("%")
    try:
        socket.inet_pton(socket.AF_INET6, bare)
    except (OSError, ValueError):
        return None
    scope_id = 0
    if scope:
        try:
            scope_id = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
        except OSError:
            return _Fail("error", f"unknown IPv6 scope in {address!r}")
    return _Endpoint(socket.AF_INET6, (bare, port, 0, scope_id), f"[{bare}]:{port}", None)


@dataclass(frozen=True, slots=True)
class _CertInfo:
    subject: str | None
    issuer: str | None
    self_signed: bool | None
    not_before: datetime | None
    not_after: datetime | None
    error: str | None


_CERTS: _Lru[str, _CertInfo] = _Lru(_CERTS_KEPT)  # by the SHA-256 of the DER


@dataclass(frozen=True, slots=True)
class _Unparsed:
    """A TLS result whose certificate facts are still to be read from the DER.

    `result.tls` has the version, cipher and fingerprint only, and `result.error` lacks the
    certificate's; `complete()` parses (once per distinct certificate) and fills both in.
    """

    result: ProbeResult
    der: bytes
    http_errors: tuple[str, ...]

    def complete(self) -> ProbeResult:
        tls = self.result.tls
        assert tls is not None and tls.sha256 is not None
        info = _CERTS.get(tls.sha256)
        if info is None:
            info = _parse_cert(self.der)
            _CERTS.put(tls.sha256, info)
        return _with_cert(self.result, info, self.http_errors)


def _with_cert(result: ProbeResult, info: _CertInfo, http_errors: Sequence[str]) -> ProbeResult:
    assert result.tls is not None
    tls = replace(
        result.tls,
        subject=info.subject,
        issuer=info.issuer,
        self_signed=info.self_signed,
        not_before=info.not_before,
        not_after=info.not_after,
    )
    return replace(result, tls=tls, error=_join(info.error, *http_errors))


class _Prober:
    """Per-call state shared by all probes: settings, one TLS context, one receive buffer."""

    def __init__(self, settings: ProbeSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.ctx = _client_context()
        self.buffer = memoryview(bytearray(_READ_SIZE))

    async def probe(self, target: ProbeTarget, *, plain_first: bool = False
                    ) -> ProbeResult | _Unparsed:
        """The target's result; `_Unparsed` when its certificate has not been parsed yet.

        `plain_first`: the endpoint spoke plain HTTP last time, so ask it that way first; any
        answer that is not HTTP sends the probe down the TLS path as if unhinted.
        """
        start = time.perf_counter()

        def result(
            state: ProbeState,
            *,
            error: str | None,
            connect_ms: float | None = None,
            protocol: Protocol | None = None,
            tls: TlsFacts | None = None,
            response: _Response | None = None,
        ) -> ProbeResult:
            felix, status, host, body = _http_verdict(response)
            return ProbeResult(
                node=target.node,
                address=target.address,
                port=target.port,
                state=state,
                protocol=protocol,
                felix=felix,
                http_status=status,
                tls=tls,
                felix_host=host,
                error=error,
                connect_ms=connect_ms,
                duration_ms=(time.perf_counter() - start) * 1000.0,
                body_bytes=body,
            )

        if target.address is None:
            return result("error", error=NO_ADDRESS)
        if not 0 < target.port < 65536:
            return result("error", error=f"invalid port {target.port}")
        endpoint = _ip_endpoint(target.address, target.port)
        if endpoint is None:
            if not _DNS_NAME.fullmatch(target.address):
                # never hand junk to the resolver (a NUL would even truncate the name)
                return result("error", error=f"not an IP address or DNS name: {target.address!r}")
            endpoint = await self._lookup(target.address, target.port)
        if isinstance(endpoint, _Fail):
            return result(endpoint.state, error=endpoint.text)
        connected = await self._connect(endpoint)
        if isinstance(connected, _Fail):
            protocol: Protocol | None = "tcp" if connected.state == "open" else None
            return result(
                connected.state,
                protocol=protocol,
                connect_ms=connected.connect_ms,
                error=connected.text,
            )
        sock, connect_ms = connected

        plain: _Exchange | None = None
        if plain_first:
            plain = await self._exchange(sock, endpoint, tls=False)
            if plain.response.http_like and _GO_HTTPS_REFUSAL not in plain.peer_first:
                return result(
                    "open",
                    connect_ms=connect_ms,
                    protocol="http",
                    response=plain.response,
                    error=_join(*self._http_errors(plain)),
                )
            # not plain HTTP (any more): the TLS attempt an unhinted probe starts with
            connected = await self._connect(endpoint)
            if isinstance(connected, _Fail):
                # the port accepted a connection a moment ago: it stays open
                return result(
                    "open",
                    connect_ms=connect_ms,
                    protocol="tcp" if connected.state == "open" else None,
                    error=_join(
                        *self._http_errors(plain),
                        f"reconnect for TLS failed: {connected.state}: {connected.text}",
                    ),
                )
            sock = connected[0]

        first = await self._exchange(sock, endpoint, tls=True)
        if first.handshaken:
            tls = TlsFacts(
                version=first.tls_version,
                cipher=first.tls_cipher,
                subject=None,
                issuer=None,
                self_signed=None,
                not_before=None,
                not_after=None,
                sha256=None,
            )
            http_errors = self._http_errors(first)
            der = first.peer_cert
            if not der:
                return result(
                    "open",
                    connect_ms=connect_ms,
                    protocol="https",
                    tls=tls,
                    response=first.response,
                    error=_join(*http_errors),
                )
            # only the digest here; the certificate is parsed once, after the connections
            tls = replace(tls, sha256=hashlib.sha256(der).hexdigest())
            done = result(
                "open",
                connect_ms=connect_ms,
                protocol="https",
                tls=tls,
                response=first.response,
                error=None,
            )
            info = _CERTS.get(tls.sha256 or "")
            if info is not None:
                return _with_cert(done, info, http_errors)
            return _Unparsed(done, der, tuple(http_errors))
        if first.peer_spoke_tls:
            # a TLS server that refused us (e.g. it demands a client certificate): no plain retry
            return result(
                "open",
                connect_ms=connect_ms,
                protocol="https",
                error=f"TLS handshake failed: {first.handshake_error}",
            )
        tls_note = f"no TLS ({first.handshake_error})"
        if plain is None:
            connected = await self._connect(endpoint)
            if isinstance(connected, _Fail):
                if connected.state == "open":
                    return result(
                        "open",
                        connect_ms=connect_ms,
                        protocol="tcp",
                        error=f"{tls_note}; {connected.text}",
                    )
                return result(
                    "open",
                    connect_ms=connect_ms,
                    error=f"{tls_note}; reconnect for plain HTTP failed: "
                    f"{connected.state}: {connected.text}",
                )
            plain = await self._exchange(connected[0], endpoint, tls=False)
        if not plain.response.http_like:
            return result(
                "open",
                connect_ms=connect_ms,
                protocol="tcp",
                error=_join(tls_note, *self._http_errors(plain)),
            )
        return result(
            "open",
            connect_ms=connect_ms,
            protocol="http",
            response=plain.response,
            error=_join(*self._http_errors(plain)),
        )

    def _http_errors(self, exchange: _Exchange) -> list[str]:
        """Why the GET did not yield a whole response, if it did not."""
        response = exchange.response
        errors = [e for e in (exchange.error, response.error) if e]
        if exchange.timed_out:
            got = (
                f"response incomplete ({response.body_bytes} body bytes read)"
                if response.first_bytes
                else "no response"
            )
            deadline = _fmt_seconds(self.settings.http_timeout_seconds)
            errors.append(f"{got} within the {deadline} deadline")
        if response.truncated:
            errors.append(
                f"body larger than max_body_bytes; reading stopped at {response.body_bytes} bytes"
            )
        return errors

    async def _lookup(self, host: str, port: int) -> _Endpoint | _Fail:
        # a node address of a DNS type (Hostname, InternalDNS): resolve it within timeout_seconds
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            return _Fail("error", f"cannot resolve {host!r}: timed out")
        except (OSError, ValueError) as exc:  # ValueError: IDNA or an embedded NUL
            text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            return _Fail("error", f"cannot resolve {host!r}: {text}")
        if not infos:
            return _Fail("error", f"cannot resolve {host!r}: no addresses")
        family, _, _, _, sockaddr = infos[0]
        return _Endpoint(family, sockaddr, f"{host}:{port}", host)  # type: ignore[arg-type]

    async def _connect(self, endpoint: _Endpoint) -> tuple[socket.socket, float] | _Fail:
        loop = self.loop
        try:
            sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
        except OSError as exc:
            return _Fail("error", f"cannot open a socket: {_os_error_text(exc)}")
        started = time.perf_counter()
        try:
            sock.setblocking(False)
            # the request follows the handshake at once; never let Nagle hold it back
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # connect_ex + a writer callback: loop.sock_connect does the same with more layers
            err = sock.connect_ex(endpoint.sockaddr)
            if err in (errno.EINPROGRESS, errno.EINTR):
                fd = sock.fileno()
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_writer(fd, _resolve, ready)
                try:
                    async with asyncio.timeout(self.settings.timeout_seconds):
                        await ready
                finally:
                    loop.remove_writer(fd)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except TimeoutError:
            err = _late_connect_result(sock)  # ETIMEDOUT unless it got through after all
        except OSError as exc:
            sock.close()
            return self._connect_failure(exc.errno or 0, exc)
        except BaseException:
            sock.close()
            raise
        elapsed = (time.perf_counter() - started) * 1000.0
        if err:
            sock.close()
            return self._connect_failure(err, connect_ms=elapsed)
        return sock, elapsed

    def _connect_failure(
        self, err: int, exc: OSError | None = None, *, connect_ms: float | None = None
    ) -> _Fail:
        if err == errno.ECONNREFUSED:
            return _Fail("closed", "connection refused")
        if err == errno.ECONNRESET:
            # a RST to the SYN is ECONNREFUSED; a reset connect was accepted, then dropped
            text = "connection reset by peer right after it was accepted"
            return _Fail("open", text, connect_ms)
        if err == errno.ETIMEDOUT:
            wait = _fmt_seconds(self.settings.timeout_seconds)
            return _Fail("filtered", f"no answer to connect within {wait}")
        text = _os_error_text(exc if exc is not None else OSError(err, os.strerror(err)))
        if err in _UNREACHABLE_ERRNOS:
            return _Fail("unreachable", text)
        return _Fail("error", f"connect failed: {text}")

    async def _exchange(self, sock: socket.socket, endpoint: _Endpoint, *, tls: bool) -> _Exchange:
        settings = self.settings
        request = (
            f"GET /metrics HTTP/1.1\r\nHost: {endpoint.host_header}\r\n"
            f"User-Agent: {settings.user_agent}\r\nAccept: text/plain\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        tls_parts = None
        if tls:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            # Python never sends an IP address as SNI; a DNS name is sent
            sslobj = self.ctx.wrap_bio(incoming, outgoing, server_hostname=endpoint.sni)
            tls_parts = (sslobj, incoming, outgoing)
        exchange = _Exchange(
            self.loop,
            sock,
            self.buffer,
            request,
            response=_Response(settings.max_body_bytes, _metric_line(settings.metric_prefix)),
            tls=tls_parts,
        )
        try:
            exchange.start()
            if tls:
                try:
                    async with asyncio.timeout(settings.tls_timeout_seconds):
                        await exchange.handshake_done
                except TimeoutError:
                    exchange.drain()
                    if not (exchange.handshaken or exchange.ended):
                        wait = _fmt_seconds(settings.tls_timeout_seconds)
                        exchange.handshake_error = f"TLS handshake timed out after {wait}"
            if exchange.handshaken or not tls:
                try:
                    async with asyncio.timeout(settings.http_timeout_seconds):
                        await exchange.done
                except TimeoutError:
                    exchange.drain()
                    exchange.timed_out = not exchange.ended
        finally:
            exchange.close()
        if exchange.bug is not None:
            raise exchange.bug
        return exchange


def _parse_cert(der: bytes) -> _CertInfo:
    try:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        issuer = cert.issuer.rfc4514_string()
        not_before = cert.not_valid_before_utc
        not_after = cert.not_valid_after_utc
    except ValueError as exc:
        return _CertInfo(None, None, None, None, None, f"peer certificate unreadable: {exc}")
    self_signed: bool | None
    if cert.issuer != cert.subject:
        self_signed = False
    else:
        try:
            cert.verify_directly_issued_by(cert)
            self_signed = True
        except InvalidSignature:
            self_signed = False
        except (ValueError, TypeError, UnsupportedAlgorithm):
            self_signed = None  # a signature scheme cryptography cannot check
    return _CertInfo(subject, issuer, self_signed, not_before, not_after, None)


def _http_verdict(response: _Response | None) -> tuple[bool | None, int | None, str | None, int]:
    """(felix, http status, felix host, body bytes) from a response, if one was read."""
    if response is None or response.status is None:
        return None, None, None, response.body_bytes if response is not None else 0
    felix: bool | None
    if response.status != 200:
        felix = False
    elif response.felix:
        felix = True
    else:
        # a whole (or capped) body without felix_ is not Felix; a cut-off one is undecided
        felix = False if response.complete else None
    return felix, response.status, response.felix_host if felix else None, response.body_bytes


def _join(*parts: str | None) -> str | None:
    text = "; ".join(p for p in parts if p)
    return text or None
