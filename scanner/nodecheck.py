"""The node's own view of the Calico metrics ports, for `felixscan node-check`: reads the socket
tables of /proc/net (the host's, in a hostNetwork pod), names the processes holding the
listeners where /proc lets it, and repeats that on an interval until told to stop.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from scanner.core.nodeview import (
    HOST_BYTEORDER,
    ByteOrder,
    Family,
    FileRead,
    FileStatus,
    NodeView,
    Ownership,
    ProcessInfo,
    TableScan,
    build_view,
    scan_table,
    status_uid,
)

DEFAULT_INTERVAL_SECONDS: Final = 60.0
# /proc/PID/comm is at most 16 bytes and status a few kilobytes; the caps only guard against a
# --proc that is not a procfs.
MAX_COMM_BYTES: Final = 64
MAX_STATUS_BYTES: Final = 64 * 1024

# (file, family, whether a missing file is normal): without IPv6 in the namespace the kernel
# has no tcp6 table, which says nothing about IPv4 listeners; a missing tcp table means the
# --proc given is not a /proc and nothing can be concluded.
TABLES: Final[tuple[tuple[str, Family, bool], ...]] = (
    ("tcp", "IPv4", False),
    ("tcp6", "IPv6", True),
)


# --- the socket tables --------------------------------------------------------------------------


def read_table(proc: Path, *, name: str, family: Family, ports: Collection[int],
               may_be_absent: bool,
               byteorder: ByteOrder = HOST_BYTEORDER) -> tuple[FileRead, TableScan]:
    """Read and scan {proc}/net/{name}; a read error is recorded, not raised."""
    path = proc / "net" / name
    scan = TableScan(rows=(), lines=0, malformed_lines=0)
    status: FileStatus = "ok"
    error: str | None = None
    try:
        # ASCII by the kernel's format; stray bytes become malformed lines, not an error.
        # Streamed line by line: a busy node's table runs to many megabytes.
        with path.open(encoding="ascii", errors="replace") as handle:
            scan = scan_table(handle, family=family, ports=ports, byteorder=byteorder)
    except FileNotFoundError as exc:
        status, error = ("absent", None) if may_be_absent else ("error", _describe(exc))
    except OSError as exc:
        # A read failing part way gives no rows at all: the file is an error and the view
        # incomplete, so a reader reports the node unknown rather than compliant.
        status, error = "error", _describe(exc)
    read = FileRead.from_scan(name=name, path=str(path), status=status, error=error, scan=scan)
    return read, scan


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror}" if name and exc.strerror else str(exc)


# --- which process holds a socket ---------------------------------------------------------------


@dataclass(frozen=True)
class OwnerSearch:
    """Which process holds each socket inode, and what the search could not see."""

    owners: Mapping[int, int]  # inode -> lowest pid holding it
    processes: int  # pid directories found
    denied: int  # of those, whose fd table could not be read (permission)
    error: str | None  # the pid directories themselves could not be listed


def search_owners(proc: Path, inodes: Collection[int]) -> OwnerSearch:
    """Walk {proc}/[pid]/fd/* for `socket:[INODE]` links. Only processes visible in this PID
    namespace are seen (the pod needs hostPID for the host's), and as non-root only those
    running as the same user; both limits are reported, never guessed around."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    owners: dict[int, int] = {}
    processes = denied = 0
    try:
        pids = sorted(int(entry.name) for entry in os.scandir(proc)
                      if entry.name.isascii() and entry.name.isdigit())
    except OSError as exc:
        return OwnerSearch(owners={}, processes=0, denied=0, error=_describe(exc))
    for pid in pids:
        if len(owners) == len(wanted):
            break
        processes += 1
        try:
            fds = list(os.scandir(proc / str(pid) / "fd"))
        except PermissionError:
            denied += 1
            continue
        except OSError:
            # the process exited between the listing and now (ENOENT), or is a kernel
            # thread without an fd table: nothing it could hold
            continue
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except PermissionError:
                denied += 1
                break
            except OSError:
                continue  # the fd was closed while we looked
            inode = wanted.get(target)
            if inode is not None:
                owners.setdefault(inode, pid)
    return OwnerSearch(owners=owners, processes=processes, denied=denied, error=None)


def describe_process(proc: Path, pid: int) -> ProcessInfo:
    """Name and effective uid of a pid; either is None when it cannot be read (exited, denied).
    Never the command line: see `ProcessInfo`."""
    base = proc / str(pid)
    comm = _read_text(base / "comm", MAX_COMM_BYTES)
    status = _read_text(base / "status", MAX_STATUS_BYTES)
    return ProcessInfo(pid=pid, comm=None if comm is None else comm.rstrip("\n"),
                       uid=None if status is None else status_uid(status))


def _read_text(path: Path, limit: int) -> str | None:
    try:
        with path.open("rb") as handle:
            return handle.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def ownerships(proc: Path, inodes: Collection[int]) -> dict[int, Ownership]:
    """Ownership of every inode: the process, or a note saying why it could not be named."""
    if not inodes:
        return {}
    search = search_owners(proc, inodes)
    result: dict[int, Ownership] = {}
    for inode in inodes:
        pid = search.owners.get(inode)
        if pid is not None:
            result[inode] = Ownership(process=describe_process(proc, pid), note=None)
        else:
            result[inode] = Ownership(
                process=None, note=_why_not_found(proc=proc, inode=inode, search=search))
    return result


def _why_not_found(*, proc: Path, inode: int, search: OwnerSearch) -> str:
    if search.error is not None:
        return f"process not named: cannot list {proc}: {search.error}"
    if search.denied:
        return (f"process not named: the open files of {search.denied} of {search.processes} "
                f"processes under {proc} could not be read (permission denied, expected when "
                f"not root)")
    return (f"process not named: none of the {search.processes} processes visible under {proc} "
            f"holds socket inode {inode} (without hostPID only the pod's own processes are "
            f"visible)")


# --- one view, and the loop ---------------------------------------------------------------------


def take_view(*, proc: Path, node: str, ports: Collection[int], now: datetime | None = None,
              byteorder: ByteOrder = HOST_BYTEORDER) -> NodeView:
    """Read the socket tables under `proc`, name the owners where possible, build the view."""
    reads = [read_table(proc, name=name, family=family, ports=ports, may_be_absent=optional,
                        byteorder=byteorder)
             for name, family, optional in TABLES]
    inodes = {row.inode for _, scan in reads for row in scan.rows}
    when = datetime.now(UTC) if now is None else now
    return build_view(node=node, time=when.replace(microsecond=0),
                      ports=ports, files=reads, owners=ownerships(proc, inodes))


def watch(*, proc: Path, node: str, ports: Collection[int], interval: float, once: bool,
          write: Callable[[NodeView], None], wait_for_stop: Callable[[float], bool]) -> None:
    """Take a view and `write` it, then again every `interval` seconds until `wait_for_stop`
    (given the seconds to wait) says a stop came; with `once`, one view and done."""
    due = time.monotonic()
    while True:
        write(take_view(proc=proc, node=node, ports=ports))
        if once:
            return
        # Fixed rate from the start; after an overrun (a slow /proc) the missed ticks are
        # dropped rather than run back to back.
        due += interval
        now = time.monotonic()
        if due <= now:
            due = now + interval
        if wait_for_stop(due - now):
            return
