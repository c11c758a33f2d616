"""The per-cluster database lock: PostgreSQL advisory locks and SQLite leases, across processes."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from scanner.db.locks import DatabaseLock, advisory_key, cluster_lock_name
from scanner.db.models import Lease
from scanner.db.store import Store
from tests.helpers.paths import ROOT

# A process that takes the lock, says so, and then hangs on to it until it is killed.
HOLDER = """
import sys, time
from scanner.db.locks import DatabaseLock
from scanner.db.store import Store
held = DatabaseLock(Store(sys.argv[1]), ttl_seconds=float(sys.argv[2])).try_acquire("cluster:c1")
print("held" if held else "busy", flush=True)
time.sleep(120)
"""

# A process that takes the lock five times, holding it 0.15 s each time, and reports when.
WORKER = """
import json, sys, time
from scanner.db.locks import DatabaseLock
from scanner.db.store import Store
locks = DatabaseLock(Store(sys.argv[1]), ttl_seconds=30)
spans = []
while len(spans) < 5:
    with locks.hold("cluster:c1") as held:
        if held is None:
            time.sleep(0.01)
            continue
        start = time.time()
        time.sleep(0.15)
        spans.append((start, time.time()))
    time.sleep(0.02)
print(json.dumps(spans))
"""


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    s.upgrade()
    yield s
    s.close()


def python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_second_taker_is_refused_until_release(store: Store, db_url: str) -> None:
    other = Store(db_url)
    try:
        a = DatabaseLock(store)
        b = DatabaseLock(other)
        with a.hold("cluster:c1") as held:
            assert held is not None
            assert b.try_acquire("cluster:c1") is None
            # The same process asking again is refused too: an overlapping run must not pass.
            assert a.try_acquire("cluster:c1") is None
            # Other names are independent.
            with b.hold("cluster:c2") as other_held:
                assert other_held is not None
        again = b.try_acquire("cluster:c1")
        assert again is not None
        again.release()
    finally:
        other.close()


def test_two_processes_never_hold_the_lock_at_once(store: Store, db_url: str) -> None:
    procs = [python(WORKER, db_url) for _ in range(2)]
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        spans += [tuple(s) for s in json.loads(out)]
    assert len(spans) == 10
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"two holders at once: {spans}"


def test_killed_holder_does_not_block_for_ever(store: Store, db_url: str) -> None:
    ttl = 1.0
    proc = python(HOLDER, db_url, str(ttl))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        locks = DatabaseLock(store, ttl_seconds=ttl)
        assert locks.try_acquire("cluster:c1") is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # PostgreSQL drops the lock with the dead session; SQLite's lease runs out after `ttl`.
        deadline = time.monotonic() + ttl + 5
        held = None
        while held is None and time.monotonic() < deadline:
            held = locks.try_acquire("cluster:c1")
            time.sleep(0.05)
        assert held is not None, "the lock of a killed holder was never freed"
        held.release()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_sqlite_lease_is_renewed_while_held(sqlite_url: str) -> None:
    with Store(sqlite_url) as store:
        store.upgrade()
        a, b = DatabaseLock(store, ttl_seconds=0.6), DatabaseLock(store, ttl_seconds=0.6)
        held = a.try_acquire("cluster:c1")
        assert held is not None
        time.sleep(1.5)  # two and a half lifetimes: only renewal keeps it
        assert b.try_acquire("cluster:c1") is None
        assert not held.lost
        held.release()
        assert b.holder("cluster:c1") is None


def test_sqlite_expired_lease_is_taken_over(sqlite_url: str, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    with Store(sqlite_url) as store:
        store.upgrade()
        past = datetime.now(UTC) - timedelta(minutes=5)
        with store.session() as s:
            s.add(Lease(name="cluster:c1", holder="crashed-host:1:abc", acquired_at=past,
                        expires_at=past + timedelta(seconds=120)))
        held = DatabaseLock(store).try_acquire("cluster:c1")
        assert held is not None
        held.release()
    assert "took over the expired lease of crashed-host:1:abc" in caplog.text


@pytest.mark.postgres
def test_advisory_lock_is_keyed_by_a_hash_of_the_cluster(pg_url: str) -> None:
    import psycopg

    key = advisory_key(cluster_lock_name("prod-east"))
    assert key == advisory_key("cluster:prod-east")
    assert -(2**63) <= key < 2**63
    with Store(pg_url) as store:
        store.upgrade()  # the lock names its holder in `leases`
        # Someone else (another replica) holds exactly that key: we must back off.
        with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            assert DatabaseLock(store).try_acquire("cluster:prod-east") is None
        held = DatabaseLock(store).try_acquire("cluster:prod-east")
        assert held is not None
        held.release()
