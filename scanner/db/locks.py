"""Database locks that keep two `felixscan serve` replicas from scanning one cluster at once.

Part of the store layer. PostgreSQL: a session advisory lock (`pg_try_advisory_lock`, keyed by a
hash of the lock name) on a connection held for as long as the lock; the server drops it when
that session ends, so a crashed holder frees it at once. SQLite (no advisory locks): a row in
`leases` with an expiry, renewed by a thread while held; a crashed holder stops renewing and
the lease expires after `ttl` seconds, or at once when it was a process of this machine that is
gone. On both, the `leases` row names the holder (host, pid, since when).

A lock can vanish while held (the session ends in a PostgreSQL restart or failover, an idle
timeout or a NAT; a paused holder's lease expires and is taken over). So a held lock is also a
fence: `HeldLock.fence(conn)`, inside the transaction that stores a result, proves the lock is
still this holder's and keeps a new holder from taking it until that transaction ends, or
raises `LockLost`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, delete, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from scanner.core.errors import LockLost, StoreError
from scanner.db.models import Lease
from scanner.db.store import Store, redact_url

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def cluster_lock_name(cluster: str) -> str:
    """The one lock name for a cluster: scans and remediation of it take this same lock."""
    return f"cluster:{cluster}"


RUN_LOCK_PREFIX = "run:"


def run_lock_name(run_id: int) -> str:
    """The lock a scan run holds while it runs: a run whose lock is gone has no process left."""
    return f"{RUN_LOCK_PREFIX}{run_id}"


def advisory_key(name: str) -> int:
    """A signed 64-bit advisory lock key from the name (stable across processes and hosts)."""
    return int.from_bytes(hashlib.sha256(f"felixscan:{name}".encode()).digest()[:8],
                          "big", signed=True)


class HeldLock(Protocol):
    name: str
    holder: str
    acquired_at: datetime

    @property
    def lost(self) -> bool:
        """True when the lock is known to be lost (a lease taken over, a session ended)."""

    def fence(self, conn: Connection) -> None:
        """Inside the caller's transaction: prove the lock is still held by this holder and keep
        anyone from taking it over until that transaction ends; else raise LockLost."""

    def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds a lock now, as far as the database tells (for messages and reconciliation)."""

    name: str
    holder: str  # the acquisition's id ("" when no row names it)
    who: str  # "pid 123 on host-a", or what PostgreSQL knows of the session
    since: datetime | None  # when it took the lock
    gone: str | None = None  # why the holder is known to be gone; None: it may still hold it

    def describe(self) -> str:
        since = f", holding it since {_iso(self.since)}" if self.since else ""
        gone = f"; gone: {self.gone}" if self.gone else ""
        return f"{self.who}{since}{gone}"


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _who(host: str | None, pid: int | None, holder: str) -> str:
    return f"pid {pid} on {host}" if host and pid is not None else holder


def pid_scope() -> str | None:
    """The scope in which this process's pid means something: boot id and PID namespace.

    Processes with one hostname can still have PID namespaces of their own (containers on the
    host network), and pids are reused after a reboot; None where /proc does not tell.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}"


def gone_here(host: str | None, pid: int | None, scope: str | None,
              since: datetime) -> str | None:
    """Why the process `pid` of `host`, which took a lock at `since`, is known to be gone;
    None when it may be alive or is not a process this one can see."""
    if (pid is None or pid <= 0 or host != socket.gethostname() or scope is None
            or scope != pid_scope()):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return f"process {pid} no longer exists on {host}"
    except PermissionError:
        pass  # it exists (another user's)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(int(line.split()[1]) for line in
                    Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return f"process {pid} on {host} has exited"
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    # btime is whole seconds and the start time in clock ticks: allow for that.
    if started > since.timestamp() + 2:
        return (f"process {pid} on {host} is another process now (started "
                f"{_iso(datetime.fromtimestamp(started, UTC))}, after the lock was taken)")
    return None


class DatabaseLock:
    """Try-locks by name on the results database; `hold` is the usual way in."""

    def __init__(self, store: Store, *, ttl_seconds: float = 120.0,
                 clock: Clock | None = None) -> None:
        self.store = store
        self.ttl = timedelta(seconds=ttl_seconds)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.postgres = store.engine.dialect.name == "postgresql"
        self._held: set[_Lease | _AdvisoryLock] = set()
        self._held_lock = threading.Lock()

    def try_acquire(self, name: str) -> HeldLock | None:
        """The lock, or None at once when someone else holds it."""
        try:
            held = self._advisory(name) if self.postgres else self._lease(name)
        except (SQLAlchemyError, DBAPIError) as exc:
            raise StoreError(f"cannot take lock {name!r} on {redact_url(self.store.url)}: "
                             f"{exc}") from exc
        if held is not None:
            with self._held_lock:
                self._held.add(held)
        return held

    def _released(self, held: _Lease | _AdvisoryLock) -> None:
        with self._held_lock:
            self._held.discard(held)

    def release_all(self) -> None:
        """Give up every lock still held, e.g. for scans abandoned at shutdown: a restart
        should not wait for a lease of the process it replaces to expire."""
        with self._held_lock:
            held = list(self._held)
        for lock in held:
            lock.release()

    @contextmanager
    def hold(self, name: str) -> Iterator[HeldLock | None]:
        """Yields the held lock (released on exit) or None when another holder has it."""
        held = self.try_acquire(name)
        try:
            yield held
        finally:
            if held is not None:
                held.release()

    def holder(self, name: str) -> str | None:
        """Who holds the lock and since when, for messages (`pid 7 on host-a, holding it since
        ...`); None when it is free."""
        found = self.lookup(name)
        return found.describe() if found is not None else None

    def lookup(self, name: str) -> LockHolder | None:
        """Who holds the lock now (None: nobody), and whether that holder is known to be gone:
        a lease expired, a PostgreSQL session ended, a process of this machine that exited."""
        columns = (Lease.holder, Lease.host, Lease.pid, Lease.pid_scope, Lease.acquired_at,
                   Lease.expires_at)
        try:
            with self.store.engine.connect() as conn:
                row = conn.execute(select(*columns).where(Lease.name == name)).first()
                if self.postgres:
                    return self._pg_lookup(conn, name, row)
        except (SQLAlchemyError, DBAPIError) as exc:
            raise StoreError(f"cannot read lock {name!r} on {redact_url(self.store.url)}: "
                             f"{exc}") from exc
        if row is None:
            return None
        gone: str | None
        if row.holder in _UNRELEASED:
            gone = "this process gave it up (only the release failed)"
        elif row.expires_at < self.clock():
            gone = f"its lease expired at {_iso(row.expires_at)}"
        else:
            gone = gone_here(row.host, row.pid, row.pid_scope, row.acquired_at)
        return LockHolder(name=name, holder=row.holder, who=_who(row.host, row.pid, row.holder),
                          since=row.acquired_at, gone=gone)

    def _pg_lookup(self, conn: Connection, name: str, row: Any) -> LockHolder | None:
        pids = list(conn.execute(_PG_HOLDERS, _pg_key(name)).scalars())
        if row is not None:
            # The row is written after the lock is taken and deleted before it is given back:
            # a row without the lock is a session that ended without releasing it.
            gone = None if pids else ("its database session has ended, and PostgreSQL "
                                      "released the lock with it")
            return LockHolder(name=name, holder=row.holder,
                              who=_who(row.host, row.pid, row.holder), since=row.acquired_at,
                              gone=gone)
        if not pids:
            return None
        # A session that wrote no row: an older felixscan, or someone else on this key.
        info = conn.execute(text(
            "SELECT client_addr::text AS addr, backend_start FROM pg_stat_activity "
            "WHERE pid = :pid"), {"pid": pids[0]}).first()
        who = f"PostgreSQL backend pid {pids[0]}"
        if info is not None and info.backend_start is not None:
            who += (f" (client {info.addr or 'local socket'}, connected "
                    f"{_iso(info.backend_start)}; it names no felixscan process)")
        return LockHolder(name=name, holder="", who=who, since=None)

    def clear(self, found: LockHolder) -> bool:
        """Delete the row of a holder that is gone, if it still names that holder; True when
        deleted (a run's lock is never taken again, so nobody else would)."""
        try:
            with self.store.engine.begin() as conn:
                return conn.execute(delete(Lease).where(Lease.name == found.name,
                                                        Lease.holder == found.holder)
                                    ).rowcount > 0
        except (SQLAlchemyError, DBAPIError) as exc:
            raise StoreError(f"cannot clear lock {found.name!r} on "
                             f"{redact_url(self.store.url)}: {exc}") from exc

    def _row(self, name: str, holder: str, acquired_at: datetime,
             expires_at: datetime) -> dict[str, Any]:
        return {"name": name, "holder": holder, "acquired_at": acquired_at,
                "expires_at": expires_at, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_scope": pid_scope()}

    @staticmethod
    def _new_holder() -> str:
        # One id per acquisition, not per process: the same process taking the lock twice
        # (an overlapping run) must be refused like anybody else.
        return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    # --- PostgreSQL ------------------------------------------------------------------------

    def _advisory(self, name: str) -> _AdvisoryLock | None:
        conn = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                               {"k": advisory_key(name)}).scalar()
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return None
        try:
            backend = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
            now = self.clock()
            holder = self._new_holder()
            values = self._row(name, holder, now, now)
            stmt = pg_insert(Lease).values(values)
            # Waits while the previous holder's fenced write is still open (it holds the row):
            # its result is then in before anything of ours. Bounded: a try-lock must not hang
            # on a writer whose client vanished with its transaction open.
            conn.execute(text(f"SET lock_timeout = '{_PG_ROW_WAIT_MS}ms'"))
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["name"],
                set_={k: stmt.excluded[k] for k in values if k != "name"}))
            conn.execute(text("RESET lock_timeout"))
        except BaseException:
            # Never hand a connection holding the lock back to the pool: ending the session
            # releases it.
            conn.invalidate()
            conn.close()
            raise
        return _AdvisoryLock(self, name, conn, holder=holder, backend_pid=backend,
                             acquired_at=now)

    # --- SQLite ----------------------------------------------------------------------------

    def _lease(self, name: str) -> _Lease | None:
        holder = self._new_holder()
        now = self.clock()
        values = self._row(name, holder, now, now + self.ttl)
        with self.store.engine.connect() as conn:  # which stale holder may be replaced
            previous = conn.execute(select(Lease.holder, Lease.host, Lease.pid,
                                           Lease.pid_scope, Lease.acquired_at,
                                           Lease.expires_at)
                                    .where(Lease.name == name)).first()
        stale = set(_UNRELEASED)
        dead: str | None = None
        if previous is not None and previous.expires_at >= now and previous.holder not in stale:
            # A holder of this machine that is gone need not be waited for until it expires.
            dead = gone_here(previous.host, previous.pid, previous.pid_scope,
                             previous.acquired_at)
            if dead is not None:
                stale.add(previous.holder)
        stmt = sqlite_insert(Lease).values(values)
        # One statement decides, so two processes can never both win: it takes a free name,
        # a lease whose holder stopped renewing it, or one whose holder is known to be gone
        # (named exactly, so a holder that took it meanwhile is not replaced).
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={k: stmt.excluded[k] for k in values if k != "name"},
            where=or_(Lease.__table__.c.expires_at < now,
                      Lease.__table__.c.holder.in_(sorted(stale))))
        # Write first, then read back, in one transaction: a read before the write would make
        # SQLite refuse the upgrade to a write lock (SQLITE_BUSY) instead of waiting.
        with self.store.engine.begin() as conn:
            conn.execute(stmt)
            current = conn.execute(select(Lease.holder).where(Lease.name == name)).scalar()
        if current != holder:
            return None
        # `previous` was read before the write: a lease still running then was released
        # meanwhile (our insert found the name free), and nothing was taken over.
        if previous is not None and (previous.expires_at < now
                                     or previous.holder in _UNRELEASED):
            log.warning("lock %s: took over the expired lease of %s (expired %s)", name,
                        previous.holder, previous.expires_at.isoformat(timespec="seconds"))
        elif previous is not None and dead is not None:
            log.warning("lock %s: took over the lease of %s (since %s): %s", name,
                        _who(previous.host, previous.pid, previous.holder),
                        _iso(previous.acquired_at), dead)
        return _Lease(self, name, holder, now)


# Leases of this process whose release failed (the database was locked or gone): free for this
# process to take over before they expire.
_UNRELEASED: set[str] = set()

_PG_ROW_WAIT_MS = 30_000  # how long taking a lock waits for the previous holder's last write

# The backends of this database holding an advisory lock (a bigint key is classid, objid).
_PG_HOLDERS = text(
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND classid = CAST(:hi AS oid) AND objid = CAST(:lo AS oid) ORDER BY pid")


def _pg_key(name: str) -> dict[str, int]:
    key = advisory_key(name)
    return {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}


def _claim(conn: Connection, name: str, holder: str) -> bool:
    """Within the caller's transaction: True when `holder` still holds the row of `name`. The
    (no-op) update keeps the row, or SQLite's whole database, locked until that transaction
    ends, so a new holder cannot take the lock over before then."""
    return conn.execute(update(Lease).where(Lease.name == name, Lease.holder == holder)
                        .values(holder=Lease.holder)).rowcount > 0


def _taken_over(conn: Connection, name: str) -> str:
    row = conn.execute(select(Lease.holder, Lease.host, Lease.pid, Lease.acquired_at)
                       .where(Lease.name == name)).first()
    if row is None:
        return "another holder took it over and has released it since"
    return f"{_who(row.host, row.pid, row.holder)} took it over at {_iso(row.acquired_at)}"


def _lost(name: str, *reasons: str) -> LockLost:
    return LockLost(f"lock {name} was lost ({'; '.join(reasons)}); another process may hold "
                    "it now")


class _AdvisoryLock:
    def __init__(self, locks: DatabaseLock, name: str, conn: Connection, *, holder: str,
                 backend_pid: int, acquired_at: datetime) -> None:
        self.name = name
        self.holder = holder
        self.acquired_at = acquired_at
        self._locks = locks
        self._conn = conn
        self._backend_pid = backend_pid
        self._lost = False
        self._release_lock = threading.Lock()

    @property
    def lost(self) -> bool:
        return self._lost or self._conn.closed or self._conn.invalidated

    def fence(self, conn: Connection) -> None:
        # Both: the row must still name us, and our session must still hold the lock (the row
        # outlives a session that ended, until a new holder takes the lock).
        claimed = _claim(conn, self.name, self.holder)
        holders = conn.execute(_PG_HOLDERS, _pg_key(self.name)).scalars().all()
        if claimed and self._backend_pid in holders:
            return
        self._lost = True
        reasons = []
        if self._backend_pid not in holders:
            reasons.append(f"the database session that held it, PostgreSQL backend pid "
                           f"{self._backend_pid}, has ended")
        if not claimed:
            reasons.append(_taken_over(conn, self.name))
        raise _lost(self.name, *reasons)

    def release(self) -> None:
        with self._release_lock:  # the holder and release_all may both call this
            if self._conn.closed:
                return
            try:
                self._conn.execute(delete(Lease).where(Lease.name == self.name,
                                                       Lease.holder == self.holder))
                unlocked = self._conn.execute(text("SELECT pg_advisory_unlock(:k)"),
                                              {"k": advisory_key(self.name)}).scalar()
                if not unlocked:
                    log.warning("lock %s: this session no longer held it", self.name)
            except (SQLAlchemyError, DBAPIError) as exc:
                # The session is gone or broken; the server released the lock with it. Never
                # hand this connection back to the pool still holding a lock.
                log.warning("lock %s: unlock failed (%s); dropping the connection",
                            self.name, exc)
                self._conn.invalidate()
            finally:
                self._conn.close()
                self._locks._released(self)


class _Lease:
    def __init__(self, locks: DatabaseLock, name: str, holder: str,
                 acquired_at: datetime) -> None:
        self.name = name
        self.holder = holder
        self.acquired_at = acquired_at
        self._locks = locks
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(target=self._renew, name=f"lease-{name}", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        return self._lost

    def fence(self, conn: Connection) -> None:
        if not _claim(conn, self.name, self.holder):
            self._lost = True
            raise _lost(self.name, _taken_over(conn, self.name))

    def _renew(self) -> None:
        interval = self._locks.ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            now = self._locks.clock()
            try:
                with self._locks.store.engine.begin() as conn:
                    renewed = conn.execute(
                        update(Lease).where(Lease.name == self.name,
                                            Lease.holder == self.holder)
                        .values(expires_at=now + self._locks.ttl)).rowcount
            except SQLAlchemyError as exc:
                # Keep trying: the lease lasts `ttl`, three renewals' worth.
                log.warning("lock %s: renewal failed: %s", self.name, exc)
                continue
            if not renewed:
                self._lost = True
                log.error("lock %s: lease lost (it expired and another process took it)",
                          self.name)
                return

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        try:
            with self._locks.store.engine.begin() as conn:
                conn.execute(delete(Lease).where(Lease.name == self.name,
                                                 Lease.holder == self.holder))
        except SQLAlchemyError as exc:
            # This process knows the lease is dead: it may take it back at once, while
            # others wait for it to expire.
            _UNRELEASED.add(self.holder)
            log.warning("lock %s: release failed (%s); it expires by itself", self.name, exc)
        finally:
            self._locks._released(self)
