"""Database locks that keep two `felixscan serve` replicas from scanning one cluster at once.

Part of the store layer. PostgreSQL: a session advisory lock (`pg_try_advisory_lock`, keyed by a
hash of the lock name) on a connection held for as long as the lock; the server drops it when
that session ends, so a crashed holder frees it at once. SQLite (no advisory locks): a row in
`leases` with an expiry, renewed by a thread while held; a crashed holder stops renewing and
the lease expires after `ttl` seconds.
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
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import Connection, delete, or_, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from scanner.db import Lease
from scanner.errors import StoreError
from scanner.store import Store, redact_url

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def cluster_lock_name(cluster: str) -> str:
    """The one lock name for a cluster: scans and remediation of it take this same lock."""
    return f"cluster:{cluster}"


def advisory_key(name: str) -> int:
    """A signed 64-bit advisory lock key from the name (stable across processes and hosts)."""
    return int.from_bytes(hashlib.sha256(f"felixscan:{name}".encode()).digest()[:8],
                          "big", signed=True)


class HeldLock(Protocol):
    name: str
    holder: str

    @property
    def lost(self) -> bool:
        """True when the lock was taken away while held (an expired SQLite lease)."""

    def release(self) -> None: ...


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
        """Who holds a SQLite lease now (for messages); None for PostgreSQL or when free."""
        if self.postgres:
            return None
        with self.store.engine.connect() as conn:
            row = conn.execute(select(Lease.holder, Lease.expires_at)
                               .where(Lease.name == name)).first()
        return row.holder if row is not None and row.expires_at > self.clock() else None

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
        return _AdvisoryLock(self, name, conn)

    # --- SQLite ----------------------------------------------------------------------------

    def _lease(self, name: str) -> _Lease | None:
        # One id per acquisition, not per process: the same process taking the lock twice
        # (an overlapping run) must be refused like anybody else.
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        now = self.clock()
        stmt = sqlite_insert(Lease).values(name=name, holder=holder, acquired_at=now,
                                           expires_at=now + self.ttl)
        # One statement decides, so two processes can never both win: it takes a free name,
        # or a lease whose holder stopped renewing it.
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"holder": stmt.excluded.holder, "acquired_at": stmt.excluded.acquired_at,
                  "expires_at": stmt.excluded.expires_at},
            where=or_(Lease.__table__.c.expires_at < now,
                      Lease.__table__.c.holder.in_(sorted(_UNRELEASED))))
        with self.store.engine.connect() as conn:  # only for the message below
            previous = conn.execute(select(Lease.holder, Lease.expires_at)
                                    .where(Lease.name == name)).first()
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
        return _Lease(self, name, holder)


# Leases of this process whose release failed (the database was locked or gone): free for this
# process to take over before they expire.
_UNRELEASED: set[str] = set()


class _AdvisoryLock:
    def __init__(self, locks: DatabaseLock, name: str, conn: Connection) -> None:
        self.name = name
        self.holder = f"postgresql session {id(conn):x}"
        self._locks = locks
        self._conn = conn
        self._release_lock = threading.Lock()

    @property
    def lost(self) -> bool:
        return self._conn.closed or self._conn.invalidated

    def release(self) -> None:
        with self._release_lock:  # the holder and release_all may both call this
            if self._conn.closed:
                return
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"),
                                   {"k": advisory_key(self.name)})
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
    def __init__(self, locks: DatabaseLock, name: str, holder: str) -> None:
        self.name = name
        self.holder = holder
        self._locks = locks
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(target=self._renew, name=f"lease-{name}", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        return self._lost

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
