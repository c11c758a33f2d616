"""What one node says about its own listening sockets: /proc/net/tcp{,6} parsed from text, the
immutable NodeView record and its one-line JSON form (written by `felixscan node-check`, read
back from pod logs). No I/O: `scanner.nodecheck` reads /proc and hands the text in.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, Literal, NamedTuple, TypeVar

from scanner.core.errors import FelixscanError

SCHEMA: Final = "felixscan.node-view"
SCHEMA_VERSION: Final = "1.0"
# Readers accept any 1.x line: a minor version only adds fields, and the DaemonSet image may be
# upgraded before (or after) the scanner that reads its logs.
SCHEMA_MAJOR: Final = 1

DEFAULT_PORTS: Final = (9091,)
# Longer lines are not ours (a few listeners make well under a kilobyte); skipping them keeps
# one runaway log line from costing a full JSON parse.
MAX_LINE_CHARS: Final = 1_000_000

Family = Literal["IPv4", "IPv6"]
ByteOrder = Literal["little", "big"]
FileStatus = Literal["ok", "absent", "error"]
HOST_BYTEORDER: Final[ByteOrder] = sys.byteorder

_T = TypeVar("_T")


class TcpState(IntEnum):
    """The `st` column of /proc/net/tcp (include/net/tcp_states.h)."""

    ESTABLISHED = 0x01
    SYN_SENT = 0x02
    SYN_RECV = 0x03
    FIN_WAIT1 = 0x04
    FIN_WAIT2 = 0x05
    TIME_WAIT = 0x06
    CLOSE = 0x07
    CLOSE_WAIT = 0x08
    LAST_ACK = 0x09
    LISTEN = 0x0A
    CLOSING = 0x0B
    NEW_SYN_RECV = 0x0C


def state_name(code: int) -> str:
    """The kernel's name for a state code; codes newer than this module are named, not dropped."""
    try:
        return TcpState(code).name
    except ValueError:
        return f"UNKNOWN_{code:02X}"


class MalformedLine(FelixscanError, ValueError):
    """A /proc/net/tcp line that does not have the kernel's layout."""


class NodeViewError(FelixscanError, ValueError):
    """A node-view JSON line that is not valid: not JSON, another schema or version, or a
    missing or mistyped field. `field` names the offending field (dotted path) when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


# --- decoding /proc/net/tcp ---------------------------------------------------------------------
#
# The kernel prints each address as the 32-bit words of the in-memory (network order) address,
# formatted with %08X, i.e. read as a *host order* integer (net/ipv4/tcp_ipv4.c get_tcp4_sock,
# net/ipv6/tcp_ipv6.c get_tcp6_sock). Turning each word back into bytes in the host's byte order
# therefore restores the network-order bytes: on little endian x86/arm64 "0100007F" becomes
# 7F 00 00 01 = 127.0.0.1, on a big endian host the same address is printed "7F000001". The port
# is printed after ntohs(), so it is plain big-endian hex on every host.


def decode_ipv4(text: str, *, byteorder: ByteOrder = HOST_BYTEORDER) -> IPv4Address:
    """Decode the 8 hex digits of an IPv4 address as /proc/net/tcp prints it on a host of
    `byteorder` (default: this host's, which is what the running kernel used)."""
    if len(text) != 8:
        raise MalformedLine(f"IPv4 address must be 8 hex digits, got {text!r}")
    return IPv4Address(_hex_word(text).to_bytes(4, byteorder))


def decode_ipv6(text: str, *, byteorder: ByteOrder = HOST_BYTEORDER) -> IPv6Address:
    """Decode the 32 hex digits of an IPv6 address as /proc/net/tcp6 prints it: four 32-bit
    words, each in the byte order of the host that printed it."""
    if len(text) != 32:
        raise MalformedLine(f"IPv6 address must be 32 hex digits, got {text!r}")
    packed = b"".join(
        _hex_word(text[i:i + 8]).to_bytes(4, byteorder) for i in range(0, 32, 8))
    return IPv6Address(packed)


def decode_port(text: str) -> int:
    """Decode the 4 hex digits of a port (already in network order when printed)."""
    if len(text) != 4:
        raise MalformedLine(f"port must be 4 hex digits, got {text!r}")
    return _hex_word(text)


def _hex_word(text: str) -> int:
    # int(x, 16) alone would accept "0x1f", "+1f", "1_f" and surrounding blanks
    if not text or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise MalformedLine(f"not hex: {text!r}")
    return int(text, 16)


@dataclass(frozen=True)
class SocketRow:
    """One parsed line of /proc/net/tcp or /proc/net/tcp6."""

    family: Family
    local_address: IPv4Address | IPv6Address
    local_port: int
    remote_address: IPv4Address | IPv6Address
    remote_port: int
    state: int
    uid: int
    inode: int

    @property
    def state_name(self) -> str:
        return state_name(self.state)

    @property
    def listening(self) -> bool:
        return self.state == TcpState.LISTEN


class _RawRow(NamedTuple):
    """A line split and checked, with the addresses not yet decoded: most lines of a busy node
    are connections that are dropped right after the state and port are known."""

    local_hex: str
    local_port: int
    remote_hex: str
    remote_port: int
    state: int
    uid: int
    inode: int


def _split_row(line: str, *, family: Family) -> _RawRow:
    fields = line.split()
    # sl local rem st tx:rx tr:when retrnsmt uid timeout inode [more, version dependent]
    if len(fields) < 10:
        raise MalformedLine(f"expected at least 10 fields, got {len(fields)}")
    sl = fields[0]
    if not (sl.endswith(":") and _decimal(sl[:-1])):
        raise MalformedLine(f"bad slot field {sl!r}")
    width = 8 if family == "IPv4" else 32
    local_hex, local_port = _split_endpoint(fields[1], width=width)
    remote_hex, remote_port = _split_endpoint(fields[2], width=width)
    if len(fields[3]) != 2:
        raise MalformedLine(f"state must be 2 hex digits, got {fields[3]!r}")
    state = _hex_word(fields[3])
    if not (_decimal(fields[7]) and _decimal(fields[9])):
        raise MalformedLine(f"uid and inode must be decimal, got {fields[7]!r} {fields[9]!r}")
    return _RawRow(local_hex, local_port, remote_hex, remote_port, state,
                   int(fields[7]), int(fields[9]))


def _decimal(text: str) -> bool:
    # str.isdigit() alone accepts non-ASCII digits ("٣"), which int() then reads
    return text.isascii() and text.isdigit()


def _split_endpoint(text: str, *, width: int) -> tuple[str, int]:
    address, sep, port = text.partition(":")
    if not sep or len(address) != width:
        raise MalformedLine(f"endpoint must be {width} hex digits, ':', 4 hex digits: {text!r}")
    _hex_word(address)
    return address, decode_port(port)


def _decode_row(raw: _RawRow, *, family: Family, byteorder: ByteOrder) -> SocketRow:
    decode = decode_ipv4 if family == "IPv4" else decode_ipv6
    return SocketRow(
        family=family,
        local_address=decode(raw.local_hex, byteorder=byteorder),
        local_port=raw.local_port,
        remote_address=decode(raw.remote_hex, byteorder=byteorder),
        remote_port=raw.remote_port,
        state=raw.state, uid=raw.uid, inode=raw.inode)


def _is_header(line: str) -> bool:
    return line.lstrip().startswith("sl ")


def parse_socket_line(line: str, *, family: Family,
                      byteorder: ByteOrder = HOST_BYTEORDER) -> SocketRow:
    """Parse one data line; raises MalformedLine."""
    return _decode_row(_split_row(line, family=family), family=family, byteorder=byteorder)


@dataclass(frozen=True)
class TableScan:
    """The LISTEN sockets on the asked ports found in one table, and how much was read."""

    rows: tuple[SocketRow, ...]
    lines: int  # data lines seen, malformed ones included
    malformed_lines: int


def scan_table(lines: Iterable[str], *, family: Family, ports: Iterable[int],
               byteorder: ByteOrder = HOST_BYTEORDER) -> TableScan:
    """Keep the LISTEN (0A) sockets whose local port is in `ports`. Every line is checked, so a
    malformed one is counted whatever its state; headers and blank lines are not data."""
    wanted = frozenset(ports)
    rows: list[SocketRow] = []
    seen = malformed = 0
    for line in lines:
        if not line.strip() or _is_header(line):
            continue
        seen += 1
        try:
            raw = _split_row(line, family=family)
        except MalformedLine:
            malformed += 1
            continue
        if raw.state == TcpState.LISTEN and raw.local_port in wanted:
            rows.append(_decode_row(raw, family=family, byteorder=byteorder))
    return TableScan(rows=tuple(rows), lines=seen, malformed_lines=malformed)


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """The process holding a socket, as far as /proc let us read it (None: could not read).

    Deliberately no command line: arguments can carry passwords and tokens, and these lines
    end up in pod logs that many people can read. The process name is evidence enough.
    """

    pid: int
    comm: str | None  # /proc/PID/comm, the kernel's 15-character task name
    uid: int | None  # effective uid, from the Uid: line of /proc/PID/status


def status_uid(text: str) -> int | None:
    """The effective uid in the text of /proc/PID/status ("Uid: real effective saved fs"),
    or None when there is no well-formed Uid: line."""
    for line in text.splitlines():
        name, _, values = line.partition(":")
        if name == "Uid":
            fields = values.split()
            if len(fields) == 4 and all(_decimal(f) for f in fields):
                return int(fields[1])
            return None
    return None


@dataclass(frozen=True)
class Ownership:
    """Outcome of looking for a socket's process: a process, or a note saying why there is none."""

    process: ProcessInfo | None
    note: str | None


@dataclass(frozen=True)
class AddressFacts:
    text: str
    wildcard: bool
    loopback: bool
    ipv4_mapped: str | None


def address_facts(address: IPv4Address | IPv6Address) -> AddressFacts:
    """How a bind address is written and what it reaches. Mapped addresses are judged by their
    IPv4 part and written ::ffff:a.b.c.d, which Python 3.11's str() does not do."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        v4 = address.ipv4_mapped
        return AddressFacts(text=f"::ffff:{v4}", wildcard=v4.is_unspecified,
                            loopback=v4.is_loopback, ipv4_mapped=str(v4))
    return AddressFacts(text=str(address), wildcard=address.is_unspecified,
                        loopback=address.is_loopback, ipv4_mapped=None)


@dataclass(frozen=True)
class Listener:
    """A LISTEN socket on one of the checked ports."""

    address: str
    port: int
    family: Family
    inode: int
    uid: int
    wildcard: bool
    loopback: bool
    ipv4_mapped: str | None
    process: ProcessInfo | None
    process_note: str | None

    @classmethod
    def from_row(cls, row: SocketRow, ownership: Ownership) -> Listener:
        facts = address_facts(row.local_address)
        return cls(address=facts.text, port=row.local_port, family=row.family,
                   inode=row.inode, uid=row.uid, wildcard=facts.wildcard,
                   loopback=facts.loopback, ipv4_mapped=facts.ipv4_mapped,
                   process=ownership.process, process_note=ownership.note)


@dataclass(frozen=True)
class FileRead:
    """How reading one socket table went. `absent` is only used where a missing file is
    normal (tcp6 when IPv6 is disabled); elsewhere a missing file is an `error`."""

    name: str
    path: str
    status: FileStatus
    error: str | None
    lines: int
    malformed_lines: int

    @classmethod
    def from_scan(cls, *, name: str, path: str, status: FileStatus, error: str | None,
                  scan: TableScan) -> FileRead:
        return cls(name=name, path=path, status=status, error=error, lines=scan.lines,
                   malformed_lines=scan.malformed_lines)


@dataclass(frozen=True)
class NodeView:
    """One node-check result: the checked ports' listeners in the host network namespace."""

    node: str
    time: datetime  # timezone-aware, UTC
    ports_checked: tuple[int, ...]
    listeners: tuple[Listener, ...]
    files: tuple[FileRead, ...]
    malformed_lines: int
    # True when every table that must exist was read to the end: only then does an empty
    # `listeners` mean "nothing listens" rather than "could not tell".
    complete: bool
    schema: str = SCHEMA
    schema_version: str = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.time.utcoffset() is None:
            raise ValueError("NodeView.time must be timezone-aware")


def build_view(*, node: str, time: datetime, ports: Iterable[int],
               files: Sequence[tuple[FileRead, TableScan]],
               owners: Mapping[int, Ownership]) -> NodeView:
    """Assemble a NodeView from the tables read and the owner lookups (keyed by inode)."""
    unknown = Ownership(process=None, note="process lookup did not run")
    listeners = sorted(
        (Listener.from_row(row, owners.get(row.inode, unknown))
         for _, scan in files for row in scan.rows),
        key=lambda item: (item.port, item.family, item.address, item.inode))
    return NodeView(
        node=node,
        time=time.astimezone(UTC),
        ports_checked=tuple(sorted(set(ports))),
        listeners=tuple(listeners),
        files=tuple(read for read, _ in files),
        malformed_lines=sum(read.malformed_lines for read, _ in files),
        complete=bool(files) and all(read.status != "error" for read, _ in files))


# --- the JSON line ------------------------------------------------------------------------------


def format_time(value: datetime) -> str:
    """UTC ISO 8601 with a Z (microseconds only when there are some)."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def view_to_dict(view: NodeView) -> dict[str, Any]:
    return {
        "schema": view.schema,
        "schema_version": view.schema_version,
        "node": view.node,
        "time": format_time(view.time),
        "ports_checked": list(view.ports_checked),
        "complete": view.complete,
        "listeners": [_listener_to_dict(item) for item in view.listeners],
        "files": {read.name: {"path": read.path, "status": read.status, "error": read.error,
                              "lines": read.lines, "malformed_lines": read.malformed_lines}
                  for read in view.files},
        "malformed_lines": view.malformed_lines,
    }


def _listener_to_dict(item: Listener) -> dict[str, Any]:
    process = None
    if item.process is not None:
        process = {"pid": item.process.pid, "comm": item.process.comm,
                   "uid": item.process.uid}
    return {"address": item.address, "port": item.port, "family": item.family,
            "inode": item.inode, "uid": item.uid, "wildcard": item.wildcard,
            "loopback": item.loopback, "ipv4_mapped": item.ipv4_mapped,
            "process": process, "process_note": item.process_note}


def encode_line(view: NodeView) -> str:
    """The view as one line of JSON (no newline; json escapes any in the values)."""
    return json.dumps(view_to_dict(view), separators=(",", ":"), allow_nan=False)


def decode_line(line: str) -> NodeView:
    """Parse one JSON line back into a NodeView; raises NodeViewError (a ValueError)."""
    if len(line) > MAX_LINE_CHARS:
        raise NodeViewError(f"line longer than {MAX_LINE_CHARS} characters")
    try:
        data = json.loads(line, parse_constant=_reject_constant)
    except ValueError as exc:  # json.JSONDecodeError and the NaN/Infinity refusal
        raise NodeViewError(f"not JSON: {exc}") from exc
    return view_from_dict(data)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def view_from_dict(data: object) -> NodeView:
    """Validate a decoded JSON object and build the NodeView; raises NodeViewError."""
    obj = _object(data, "")
    schema = _get(obj, "schema", str)
    if schema != SCHEMA:
        raise NodeViewError(f"expected {SCHEMA!r}, got {schema!r}", field="schema")
    version = _get(obj, "schema_version", str)
    major, dot, minor = version.partition(".")
    if not (dot and _decimal(major) and _decimal(minor)) or int(major) != SCHEMA_MAJOR:
        raise NodeViewError(f"unsupported version {version!r} (this reader reads "
                            f"{SCHEMA_MAJOR}.x)", field="schema_version")
    node = _get(obj, "node", str)
    if not node.strip():
        raise NodeViewError("empty", field="node")
    ports = tuple(_port(value, f"ports_checked[{i}]")
                  for i, value in enumerate(_get(obj, "ports_checked", list)))
    listeners = tuple(_listener_from(value, f"listeners[{i}]")
                      for i, value in enumerate(_get(obj, "listeners", list)))
    files = tuple(_file_from(name, value)
                  for name, value in _get(obj, "files", dict).items())
    return NodeView(
        node=node, time=_time(_get(obj, "time", str)), ports_checked=ports,
        listeners=listeners, files=files,
        malformed_lines=_count(_get(obj, "malformed_lines", int), "malformed_lines"),
        complete=_get(obj, "complete", bool), schema=schema, schema_version=version)


def latest_view(log_text: str) -> NodeView | None:
    """The last valid node-view line of a pod log, or None. Other lines (startup noise, a line
    cut by log rotation, another schema) are skipped. A leading timestamp as added by
    `kubectl logs --timestamps` (the API's timestamps=true) is allowed."""
    for line in reversed(log_text.splitlines()):
        text = line.strip()
        if not text.endswith("}"):
            continue
        if not text.startswith("{"):
            prefix, _, rest = text.partition(" ")
            if not rest.startswith("{") or "{" in prefix:
                continue
            text = rest
        try:
            return decode_line(text)
        except NodeViewError:
            continue
    return None


# --- validation helpers -------------------------------------------------------------------------

_FAMILIES: Final[dict[str, Family]] = {"IPv4": "IPv4", "IPv6": "IPv6"}
_STATUSES: Final[dict[str, FileStatus]] = {"ok": "ok", "absent": "absent", "error": "error"}


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise NodeViewError(f"expected an object, got {_kind(value)}", field=where or None)
    return value


def _get(obj: Mapping[str, Any], key: str, kind: type[_T], *, where: str = "") -> _T:
    field = f"{where}.{key}" if where else key
    if key not in obj:
        raise NodeViewError("missing", field=field)
    value = obj[key]
    # bool is an int subclass: true is not a count, 1 is not a flag
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise NodeViewError(f"expected {kind.__name__}, got {_kind(value)}", field=field)
    return value


def _get_optional(obj: Mapping[str, Any], key: str, kind: type[_T], *, where: str) -> _T | None:
    if obj.get(key) is None:
        if key not in obj:
            raise NodeViewError("missing", field=f"{where}.{key}")
        return None
    return _get(obj, key, kind, where=where)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _port(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise NodeViewError(f"expected a port 1-65535, got {value!r}", field=field)
    return value


def _count(value: int, field: str) -> int:
    if value < 0:
        raise NodeViewError(f"expected 0 or more, got {value}", field=field)
    return value


def _time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise NodeViewError(f"not ISO 8601: {text!r}", field="time") from exc
    if value.utcoffset() is None:
        raise NodeViewError(f"no timezone in {text!r}", field="time")
    return value.astimezone(UTC)


def _listener_from(value: object, where: str) -> Listener:
    obj = _object(value, where)
    family_text = _get(obj, "family", str, where=where)
    family = _FAMILIES.get(family_text)
    if family is None:
        raise NodeViewError(f"expected IPv4 or IPv6, got {family_text!r}",
                            field=f"{where}.family")
    text = _get(obj, "address", str, where=where)
    try:
        address = ip_address(text)
    except ValueError as exc:
        raise NodeViewError(f"not an IP address: {text!r}", field=f"{where}.address") from exc
    if (address.version == 4) != (family == "IPv4"):
        raise NodeViewError(f"{text} is not an {family} address", field=f"{where}.address")
    mapped = _get_optional(obj, "ipv4_mapped", str, where=where)
    if mapped is not None and (not isinstance(address, IPv6Address)
                               or str(address.ipv4_mapped) != mapped):
        raise NodeViewError(f"{mapped!r} is not the IPv4 part of {text}",
                            field=f"{where}.ipv4_mapped")
    return Listener(
        address=text, port=_port(_get(obj, "port", int, where=where), f"{where}.port"),
        family=family,
        inode=_count(_get(obj, "inode", int, where=where), f"{where}.inode"),
        uid=_count(_get(obj, "uid", int, where=where), f"{where}.uid"),
        wildcard=_get(obj, "wildcard", bool, where=where),
        loopback=_get(obj, "loopback", bool, where=where),
        ipv4_mapped=mapped,
        process=_process_from(obj, where),
        process_note=_get_optional(obj, "process_note", str, where=where))


def _process_from(listener: Mapping[str, Any], where: str) -> ProcessInfo | None:
    value = _get_optional(listener, "process", dict, where=where)
    if value is None:
        return None
    here = f"{where}.process"
    pid = _get(value, "pid", int, where=here)
    if pid < 1:
        raise NodeViewError(f"expected a pid, got {pid}", field=f"{here}.pid")
    uid = _get_optional(value, "uid", int, where=here)
    return ProcessInfo(pid=pid, comm=_get_optional(value, "comm", str, where=here),
                       uid=None if uid is None else _count(uid, f"{here}.uid"))


def _file_from(name: str, value: object) -> FileRead:
    where = f"files.{name}"
    obj = _object(value, where)
    text = _get(obj, "status", str, where=where)
    status = _STATUSES.get(text)
    if status is None:
        raise NodeViewError(f"expected ok, absent or error, got {text!r}",
                            field=f"{where}.status")
    return FileRead(
        name=name, path=_get(obj, "path", str, where=where),
        status=status,
        error=_get_optional(obj, "error", str, where=where),
        lines=_count(_get(obj, "lines", int, where=where), f"{where}.lines"),
        malformed_lines=_count(_get(obj, "malformed_lines", int, where=where),
                               f"{where}.malformed_lines"))
