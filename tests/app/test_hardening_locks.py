"""A cluster lock that is lost mid-scan, and a scan process that is killed: real processes.

Item 1: a PostgreSQL advisory lock whose session is terminated (a restart, failover or idle
timeout does the same), and a SQLite lease that expired while its holder was paused and was
taken over. The holder must not store its result once another process may have scanned the
cluster: the write is fenced inside the storing transaction, and the run says why it is aborted.
Item 2: a `felixscan scan` killed with SIGKILL leaves its run `running`; the next scan marks it
aborted (its process is gone) and, on this host, does not wait for the dead process's lease.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

import scanner.app.commands.scan
from scanner.app.cli import main
from scanner.app.serve import ScanScheduler, ServeStore
from scanner.core.config import ServeSettings, load_settings
from scanner.core.errors import LockLost
from scanner.core.evaluate import failed_cluster
from scanner.core.records import ClusterResult
from scanner.db.locks import DatabaseLock, advisory_key, cluster_lock_name
from scanner.db.store import Store
from tests.helpers import scan_harness
from tests.helpers.paths import ROOT
from tests.helpers.scan_harness import Harness, Node, Outcome

HOST = socket.gethostname()

# A process that takes cluster a's lock, says so, and hangs on to it until it is killed.
HOLDER = """
import sys, time
from scanner.db.locks import DatabaseLock
from scanner.db.store import Store
held = DatabaseLock(Store(sys.argv[1])).try_acquire("cluster:a")
print("held" if held else "busy", flush=True)
time.sleep(120)
"""


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.36.0.0")


@pytest.fixture
def lock_wait(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """`felixscan scan` waits 60 s for a cluster another process holds; tests wait less."""
    return lambda seconds: monkeypatch.setattr(scanner.app.commands.scan, "LOCK_WAIT_SECONDS",
                                               seconds)


# --- helpers ---------------------------------------------------------------------------------


def query(db: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(db)
    try:
        with engine.begin() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def execute(db: str, sql: str, **params: Any) -> None:
    engine = create_engine(db)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def runs(db: str) -> list[Any]:
    return query(db, "SELECT id, status, trigger, note FROM scan_runs ORDER BY id")


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pg_lock_pids(pg_url: str, name: str) -> list[int]:
    """Backends of this database that hold the advisory lock `name` now."""
    key = advisory_key(name)
    with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchall()]


def terminate(pg_url: str, pid: int) -> None:
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def start_scan(config: Path, db: str) -> subprocess.Popen[str]:
    """`felixscan scan --json` as a real process."""
    return subprocess.Popen([sys.executable, "-m", "scanner", "scan", "--config", str(config),
                             "--db", db, "--json"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str]) -> Outcome:
    out, err = proc.communicate(timeout=60)
    return Outcome(code=proc.returncode, doc=json.loads(out) if out.strip() else {},
                   stdout=out, stderr=err)


def scan_here(config: Path, db: str) -> Outcome:
    """`felixscan scan --json` in this process, on the given config file."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["scan", "--config", str(config), "--db", db, "--json"])
    return Outcome(code=code, doc=json.loads(out.getvalue()) if out.getvalue().strip() else {},
                   stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.communicate()


def scans_of(db: str, cluster: str) -> list[Any]:
    return query(db, "SELECT run_id, started_at, finished_at FROM cluster_scans "
                     "WHERE cluster = :c ORDER BY id", c=cluster)


# --- 1. the lock is lost mid-scan ------------------------------------------------------------


@pytest.mark.postgres
def test_postgresql_lock_lost_mid_scan_is_not_stored_twice(
        harness: Harness, pg_url: str, procs: list[subprocess.Popen[str]]) -> None:
    slow = harness.cluster("a", ["closed"] * 2, options={"api_timeout_seconds": 20})
    fault = slow.emu.inject(r"daemonsets", delay=3.0, times=1)  # only the first scan is slow
    config = harness.config()
    Store(pg_url).upgrade()
    procs.append(first := start_scan(config, pg_url))
    wait_until("the first scan inside its collection", lambda: fault.hits == 1)
    [holder] = pg_lock_pids(pg_url, cluster_lock_name("a"))
    terminate(pg_url, holder)  # what a PostgreSQL restart or an idle-session timeout does

    second = scan_here(config, pg_url)  # takes the freed lock at once, scans and stores
    assert second.code == 0, second.stderr
    got = finish(first)

    assert got.code == 4, got.stderr
    assert "felixscan: a: result NOT stored: lock cluster:a was lost" in got.stderr
    assert got.cluster("a")["status"] == "compliant"  # the verdict is still shown
    # Only the second scan is on record; no two scans of the cluster overlap.
    [(run_id, _, _)] = scans_of(pg_url, "a")
    assert run_id == second.doc["scan_id"]
    statuses = {r.id: (r.status, r.note) for r in runs(pg_url)}
    assert statuses[second.doc["scan_id"]] == ("finished", None)
    status, note = statuses[got.doc["scan_id"]]
    assert status == "aborted"
    assert "lock cluster:a was lost" in note and "not stored" in note
    assert pg_lock_pids(pg_url, cluster_lock_name("a")) == []


@pytest.mark.postgres
def test_postgresql_lock_whose_session_ended_fences_the_write_even_without_a_new_holder(
        pg_url: str) -> None:
    with Store(pg_url) as store:
        store.upgrade()
        held = DatabaseLock(store).try_acquire(cluster_lock_name("a"))
        assert held is not None
        [backend] = pg_lock_pids(pg_url, cluster_lock_name("a"))
        terminate(pg_url, backend)
        wait_until("the lock freed", lambda: pg_lock_pids(pg_url, "cluster:a") == [])
        now = datetime.now(UTC)
        run = store.begin_run(trigger="test", started_at=now)
        with pytest.raises(LockLost, match=rf"lock cluster:a was lost \(the database session "
                                           rf"that held it, PostgreSQL backend pid {backend}, "
                                           r"has ended\); another process may hold it now"):
            store.save_cluster(run, failed_cluster("a", "x", started_at=now, finished_at=now),
                               lock=held)
        assert held.lost
        held.release()
    assert query(pg_url, "SELECT count(*) FROM cluster_scans") == [(0,)]
    assert query(pg_url, "SELECT count(*) FROM daily_cluster_summary") == [(0,)]


def test_sqlite_lease_taken_over_while_its_holder_was_paused_is_not_stored(
        harness: Harness, sqlite_url: str, procs: list[subprocess.Popen[str]],
        lock_wait: Callable[[float], None]) -> None:
    slow = harness.cluster("a", ["closed"] * 2, options={"api_timeout_seconds": 20})
    fault = slow.emu.inject(r"daemonsets", delay=1.0, times=1)
    config = harness.config()
    Store(sqlite_url).upgrade()
    procs.append(first := start_scan(config, sqlite_url))
    wait_until("the first scan inside its collection", lambda: fault.hits == 1)
    # The holder stops (a paused VM, a stopped container, a GC pause): it renews nothing.
    first.send_signal(signal.SIGSTOP)
    # Its lease runs out meanwhile: as if its TTL had passed (not 120 s of waiting here).
    execute(sqlite_url, "UPDATE leases SET expires_at = '2000-01-01 00:00:00.000000' "
                        "WHERE name = 'cluster:a'")
    lock_wait(10)
    second = scan_here(config, sqlite_url)  # takes the expired lease over, scans and stores
    assert second.code == 0, second.stderr
    first.send_signal(signal.SIGCONT)
    got = finish(first)

    assert got.code == 4, got.stderr
    assert "felixscan: a: result NOT stored: lock cluster:a was lost" in got.stderr
    [(run_id, _, _)] = scans_of(sqlite_url, "a")
    assert run_id == second.doc["scan_id"]
    status, note = {r.id: (r.status, r.note) for r in runs(sqlite_url)}[got.doc["scan_id"]]
    assert status == "aborted" and "lock cluster:a was lost" in note
    assert query(sqlite_url, "SELECT name FROM leases") == []


@pytest.mark.postgres
def test_scheduled_scan_that_loses_its_lock_stores_nothing_and_remediates_nothing(
        harness: Harness, pg_url: str) -> None:
    slow = harness.cluster("drift", [Node("felix-http"), Node("closed")],
                           options={"api_timeout_seconds": 20,
                                    "remediation": {"enabled": True, "auto": True}})
    fault = slow.emu.inject(r"daemonsets", delay=2.0, times=1)
    settings = replace(load_settings(harness.config(), db_url=pg_url, environ={}),
                       schedule="0 2 * * *", serve=ServeSettings())
    calls: list[str] = []

    def remediate(cluster: Any, result: ClusterResult, store: Store, lock: Any) -> None:
        calls.append(cluster.name)

    store = ServeStore(pg_url)
    store.upgrade()
    sched = ScanScheduler(settings, store, remediate=remediate)
    outcome: list[str] = []
    job = threading.Thread(target=lambda: outcome.append(
        sched.run_cluster("drift", slot=datetime.now(UTC))))
    replica = DatabaseLock(Store(pg_url))
    try:
        job.start()
        wait_until("the scheduled scan inside its collection", lambda: fault.hits == 1)
        [holder] = pg_lock_pids(pg_url, cluster_lock_name("drift"))
        terminate(pg_url, holder)
        # Another replica takes the freed lock (and would scan the cluster now).
        wait_until("the lock freed", lambda: pg_lock_pids(pg_url, "cluster:drift") == [])
        taken = replica.try_acquire(cluster_lock_name("drift"))
        assert taken is not None
        job.join(30)
        assert not job.is_alive()
        taken.release()
    finally:
        replica.store.close()
        store.close()
    assert outcome and outcome[0].startswith("aborted"), outcome
    assert "lock cluster:drift was lost" in outcome[0]
    assert calls == []  # never remediate a cluster whose lock another process may hold
    assert scans_of(pg_url, "drift") == []
    [(_, status, trigger, note)] = runs(pg_url)
    assert (status, trigger) == ("aborted", "schedule")
    assert "lock cluster:drift was lost" in note


# --- 2. a killed scan ------------------------------------------------------------------------


def test_killed_scan_is_marked_aborted_and_does_not_block_the_next(
        harness: Harness, db_url: str, procs: list[subprocess.Popen[str]],
        lock_wait: Callable[[float], None]) -> None:
    slow = harness.cluster("a", ["closed"] * 2, options={"api_timeout_seconds": 60})
    fault = slow.emu.inject(r"daemonsets", delay=60.0, times=1)
    config = harness.config()
    Store(db_url).upgrade()
    procs.append(first := start_scan(config, db_url))
    wait_until("the first scan inside its collection", lambda: fault.hits == 1)
    [(killed_run, status, _, _)] = runs(db_url)
    assert status == "running"
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    if db_url.startswith("postgresql"):  # the server notices the closed session
        wait_until("the dead session's lock freed",
                   lambda: pg_lock_pids(pg_url=db_url, name="cluster:a") == [])

    lock_wait(5)  # 60 s in real life; before the fix the dead process's lease outlived it
    t0 = time.monotonic()
    again = scan_here(config, db_url)
    assert again.code == 0, again.stderr
    assert time.monotonic() - t0 < 4, "the next scan waited for a process that is gone"
    by_id = {r.id: r for r in runs(db_url)}
    assert by_id[again.doc["scan_id"]].status == "finished"
    dead = by_id[killed_run]
    assert dead.status == "aborted"
    assert f"pid {first.pid} on {HOST}" in dead.note, dead.note
    assert "gone" in dead.note
    [(run_id, _, _)] = scans_of(db_url, "a")
    assert run_id == again.doc["scan_id"]
    # Nothing of the dead process is left: no lease rows, no running run.
    assert query(db_url, "SELECT name FROM leases") == []


def test_locked_message_names_the_holder_and_since_when(
        harness: Harness, db_url: str, procs: list[subprocess.Popen[str]],
        lock_wait: Callable[[float], None]) -> None:
    harness.cluster("a", ["closed"])
    config = harness.config()
    Store(db_url).upgrade()
    before = datetime.now(UTC).replace(microsecond=0)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db_url], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    lock_wait(0.5)
    out = scan_here(config, db_url)
    assert out.code == 3, out.stderr
    error = out.cluster("a")["error"]
    assert f"pid {holder.pid} on {HOST}" in error, error
    since = error.split(" since ", 1)[1][:20]
    assert before <= datetime.fromisoformat(since) <= datetime.now(UTC), error
    assert "not scanned twice at once" in error
    # A live holder is not reconciled away: the lock and its run are left alone.
    assert [r.status for r in runs(db_url)] == ["finished"]
