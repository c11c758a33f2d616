"""Database faults and concurrent writers, through `felixscan scan`.

Each fault must leave no half-written cluster scan (a cluster's rows are all there or none are),
exit 4 with a message that names the database problem, and let the next run work. Two scanner
processes writing to one database at once must lose and split nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, event, inspect, text

import scanner.db.store as store_module
from tests.helpers import scan_harness
from tests.helpers.scan_harness import Harness, Node


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.33.0.0")


# --- what is in the database ---------------------------------------------------------------------


def query(db: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def count(db: str, table: str) -> int:
    return int(query(db, f"SELECT count(*) FROM {table}")[0][0])


def assert_whole(db: str) -> None:
    """No half-written cluster scan: each one has exactly its nodes' probe rows."""
    for cs_id, cluster, total in query(db, "SELECT id, cluster, nodes_total FROM cluster_scans"):
        probes = query(db, "SELECT count(*) FROM node_probes WHERE cluster_scan_id = :i", i=cs_id)
        assert probes[0][0] == total, (cluster, cs_id, probes[0][0], total)
    if db.startswith("sqlite"):
        assert query(db, "PRAGMA integrity_check")[0][0] == "ok"


def schema_and_counts(db: str) -> tuple[dict[str, list[str]], dict[str, int], list[Any]]:
    engine = create_engine(db)
    try:
        insp = inspect(engine)
        tables = sorted(insp.get_table_names())
        columns = {t: sorted(c["name"] for c in insp.get_columns(t)) for t in tables}
        views = sorted(insp.get_view_names())
    finally:
        engine.dispose()
    counts = {t: count(db, t) for t in tables}
    return columns, counts, views


def short_busy_timeout(monkeypatch: pytest.MonkeyPatch, ms: int) -> None:
    """felixscan waits 30 s for a busy SQLite database; the tests wait `ms`."""
    make_engine = store_module.make_engine

    def quick(url: str) -> Engine:
        engine = make_engine(url)
        if engine.dialect.name == "sqlite":
            @event.listens_for(engine, "connect")
            def _busy(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.execute(f"PRAGMA busy_timeout={ms}")
        return engine

    monkeypatch.setattr(store_module, "make_engine", quick)


@contextlib.contextmanager
def on_statement(match: str, action: Callable[[Any], None]) -> Iterator[list[int]]:
    """Run `action(connection)` once, just before the first statement containing `match`."""
    fired: list[int] = []

    def hook(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
             executemany: bool) -> None:
        if match in statement and not fired:
            fired.append(1)
            action(conn)

    event.listen(Engine, "before_cursor_execute", hook)
    try:
        yield fired
    finally:
        event.remove(Engine, "before_cursor_execute", hook)


# --- PostgreSQL: the connection is terminated mid-scan --------------------------------------------


@pytest.mark.postgres
def test_postgresql_connection_terminated_mid_scan(harness: Harness, pg_url: str) -> None:
    harness.cluster("a", ["closed"] * 3)
    # Results are stored as they are ready: b answers late, so a is the first stored.
    harness.cluster("b", ["closed"] * 2).emu.inject(r"daemonsets", delay=0.5)
    admin = pg_url.replace("+psycopg", "")

    def terminate(conn: Any) -> None:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with psycopg.connect(admin, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))

    # The cluster's second statement, its control rows (the migration's own INSERT ... SELECT
    # into the table is no VALUES).
    with on_statement("workload, image) VALUES", terminate) as fired:
        out = harness.scan(pg_url)
    assert fired
    assert out.code == 4, out.stderr
    assert ("felixscan: a: result NOT stored: database write failed (postgresql+psycopg://"
            "postgres@127.0.0.1:5432/") in out.stderr
    assert "server closed the connection" in out.stderr
    # the scan itself was whole: both clusters are in the output
    assert {c["name"]: c["status"] for c in out.doc["clusters"]} == {"a": "compliant",
                                                                     "b": "compliant"}
    # nothing of `a` was kept; `b` went through on a new connection; the run was closed
    assert [r.cluster for r in query(pg_url, "SELECT cluster FROM cluster_scans")] == ["b"]
    assert count(pg_url, "node_probes") == 2
    assert [r.status for r in query(pg_url, "SELECT status FROM scan_runs")] == ["finished"]
    assert_whole(pg_url)

    again = harness.scan(pg_url)
    assert again.code == 0, again.stderr
    assert count(pg_url, "cluster_scans") == 3
    assert count(pg_url, "node_probes") == 7
    assert_whole(pg_url)


# --- SQLite: another writer holds the lock --------------------------------------------------------


class OtherWriter:
    """A second process with its own SQLite connection that takes and holds the write lock."""

    def __init__(self, path: str) -> None:
        code = ("import sqlite3, sys\n"
                "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "for line in sys.stdin:\n"
                "    c.execute('BEGIN IMMEDIATE' if line.strip() == 'lock' else 'ROLLBACK')\n"
                "    print('ok', flush=True)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def _say(self, word: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def lock(self) -> None:
        self._say("lock")

    def release(self) -> None:
        self._say("release")

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture
def other_writer(sqlite_url: str) -> Iterator[OtherWriter]:
    writer = OtherWriter(sqlite_url.removeprefix("sqlite:///"))
    try:
        yield writer
    finally:
        writer.close()


def test_sqlite_locked_by_another_writer_longer_than_the_busy_timeout(
        harness: Harness, sqlite_url: str, other_writer: OtherWriter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    short_busy_timeout(monkeypatch, 300)
    harness.cluster("a", ["closed"] * 2)
    assert harness.scan(sqlite_url).code == 0  # the schema and a first scan
    other_writer.lock()
    out = harness.scan(sqlite_url)
    assert out.code == 4, out.stderr
    assert "felixscan: database error: database write failed" in out.stderr
    assert "database is locked" in out.stderr
    assert out.doc == {}  # nothing was scanned for a run that could not be recorded
    other_writer.release()
    assert count(sqlite_url, "scan_runs") == 1
    assert_whole(sqlite_url)
    again = harness.scan(sqlite_url)
    assert again.code == 0, again.stderr
    assert count(sqlite_url, "cluster_scans") == 2
    assert_whole(sqlite_url)


def test_sqlite_locked_mid_scan(harness: Harness, sqlite_url: str, other_writer: OtherWriter,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    short_busy_timeout(monkeypatch, 300)
    harness.cluster("a", ["closed"] * 3)
    harness.cluster("b", ["closed"] * 2)
    with on_statement("INSERT INTO cluster_scans", lambda _conn: other_writer.lock()) as fired:
        out = harness.scan(sqlite_url)
    assert fired
    assert out.code == 4, out.stderr
    for name in ("a", "b"):
        assert f"felixscan: {name}: result NOT stored: database write failed" in out.stderr
    assert "database is locked" in out.stderr
    other_writer.release()
    # no cluster row at all; the run could not even be closed, so it says "running", which
    # is what it is: a run that never finished
    assert count(sqlite_url, "cluster_scans") == 0
    assert [tuple(r) for r in query(sqlite_url, "SELECT status, finished_at FROM scan_runs")] \
        == [("running", None)]
    again = harness.scan(sqlite_url)
    assert again.code == 0, again.stderr
    assert sorted(r.cluster for r in query(sqlite_url, "SELECT cluster FROM cluster_scans")) \
        == ["a", "b"]
    assert_whole(sqlite_url)


def test_sqlite_lock_shorter_than_the_busy_timeout_is_waited_for(
        harness: Harness, sqlite_url: str, other_writer: OtherWriter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    short_busy_timeout(monkeypatch, 5000)
    harness.cluster("a", ["closed"] * 2)

    def lock_briefly(_conn: Any) -> None:
        other_writer.lock()
        threading.Timer(0.5, other_writer.release).start()

    with on_statement("INSERT INTO cluster_scans", lock_briefly):
        out = harness.scan(sqlite_url)
    assert out.code == 0, out.stderr
    assert out.cluster("a")["timings"]["store"] >= 0.4
    assert count(sqlite_url, "node_probes") == 2


# --- SQLite: the disk is full -------------------------------------------------------------------


def test_sqlite_disk_full_mid_write(harness: Harness, sqlite_url: str) -> None:
    """SQLITE_FULL, as a full disk gives it: the database may not grow past its current pages
    from the moment the node rows are written (PRAGMA max_page_count on that connection)."""
    harness.cluster("big", ["closed"] * 300)
    assert harness.scan(sqlite_url).code == 0
    before = count(sqlite_url, "node_probes")

    def fill(conn: Any) -> None:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
        conn.exec_driver_sql(f"PRAGMA max_page_count = {pages}")

    with on_statement("INSERT INTO node_probes", fill) as fired:
        out = harness.scan(sqlite_url)
    assert fired
    assert out.code == 4, out.stderr
    assert "big: result NOT stored: database write failed" in out.stderr
    assert "database or disk is full" in out.stderr
    assert count(sqlite_url, "cluster_scans") == 1
    assert count(sqlite_url, "node_probes") == before
    assert [r.status for r in query(sqlite_url, "SELECT status FROM scan_runs ORDER BY id")] \
        == ["finished", "finished"]  # the run itself was closed: an UPDATE needs no new page
    assert_whole(sqlite_url)
    again = harness.scan(sqlite_url)  # a new connection, a disk with room again
    assert again.code == 0, again.stderr
    assert count(sqlite_url, "node_probes") == 2 * before
    assert_whole(sqlite_url)


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root and a mount namespace that allows it; skipped otherwise)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_sqlite_on_a_full_filesystem(harness: Harness, tiny_filesystem: Path) -> None:
    db = f"sqlite:///{tiny_filesystem / 'felixscan.db'}"
    harness.cluster("big", ["closed"] * 400)
    first = harness.scan(db)
    assert first.code == 0, first.stderr
    runs, scans = count(db, "scan_runs"), count(db, "cluster_scans")
    filler = tiny_filesystem / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):  # take every last block
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    out = harness.scan(db)
    assert out.code == 4, out.stderr
    # full before the scan could even open the database (WAL recovery writes) or mid-write
    assert "database or disk is full" in out.stderr or "disk I/O error" in out.stderr
    assert "felixscan: database error: " in out.stderr or "result NOT stored" in out.stderr
    assert "Traceback" not in out.stderr
    filler.unlink()  # a full disk cannot even be read (WAL recovery writes): make room first
    assert count(db, "cluster_scans") == scans  # nothing new, nothing half
    assert count(db, "scan_runs") in (runs, runs + 1)
    assert_whole(db)
    again = harness.scan(db)
    assert again.code == 0, again.stderr
    assert count(db, "cluster_scans") == scans + 1
    assert_whole(db)


# --- a migration that fails --------------------------------------------------------------------

BROKEN = {
    "sql-error": ('    op.create_table("half_done", sa.Column("id", sa.Integer, '
                  'primary_key=True))\n'
                  '    op.add_column("scan_runs", sa.Column("extra", sa.Integer))\n'
                  '    op.execute("UPDATE no_such_table SET x = 1")\n'),
    "python-error": ('    op.create_table("half_done", sa.Column("id", sa.Integer, '
                     'primary_key=True))\n'
                     '    raise RuntimeError("the migration author forgot something")\n'),
}


def broken_migrations(tmp: Path, body: str) -> Path:
    """A copy of migrations/ with a revision 0003 on top of the real head that fails half-way."""
    copy = tmp / "migrations"
    shutil.copytree(store_module.MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    head = sorted(p.name for p in (copy / "versions").glob("0*.py"))[-1].split("_", 1)[0]
    (copy / "versions" / "9999_broken.py").write_text(
        '"""a broken migration"""\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f'revision = "9999"\ndown_revision = "{head}"\nbranch_labels = None\n'
        f'depends_on = None\n\n\ndef upgrade() -> None:\n{body}\n\ndef downgrade() -> None:\n'
        '    pass\n')
    return copy


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_failed_migration_leaves_the_database_unchanged(harness: Harness, db_url: str,
                                                        tmp_path: Path, kind: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    harness.cluster("a", ["closed"] * 2)
    assert harness.scan(db_url).code == 0
    before = schema_and_counts(db_url)
    [(revision,)] = query(db_url, "SELECT version_num FROM alembic_version")
    with monkeypatch.context() as m:
        m.setattr(store_module, "MIGRATIONS", broken_migrations(tmp_path, BROKEN[kind]))
        m.setattr(store_module, "SCHEMA_REVISION", "9999")  # as a release with it would say
        out = harness.scan(db_url)
    assert out.code == 4, out.stderr
    assert "felixscan: database error: cannot migrate database" in out.stderr
    assert f"rolled back, the database stays at revision {revision}" in out.stderr
    if kind == "python-error":
        assert "a migration failed (RuntimeError: the migration author forgot" in out.stderr
    assert "Traceback" not in out.stderr
    assert schema_and_counts(db_url) == before  # not a table, column or row more
    assert query(db_url, "SELECT version_num FROM alembic_version") == [(revision,)]
    again = harness.scan(db_url)  # the real migrations again: works, at the same revision
    assert again.code == 0, again.stderr
    assert count(db_url, "cluster_scans") == 2
    assert_whole(db_url)


# --- two scanner processes at once -----------------------------------------------------------

RUNS = 3  # per process


@pytest.mark.slow
def test_two_scan_processes_write_at_once(harness: Harness, db_url: str) -> None:
    harness.probe["timeout_seconds"] = 1
    nodes = {"a": [Node("closed")] * 40 + [Node("felix-http")] * 2, "b": [Node("closed")] * 25}
    for name, spec in nodes.items():
        harness.cluster(name, spec)
    config = harness.config()
    store_module.Store(db_url).upgrade()  # as `felixscan db upgrade` would, once

    codes: list[list[int]] = [[], []]
    errors: list[str] = []

    def lane(i: int) -> None:
        for _ in range(RUNS):
            proc = subprocess.run(
                [sys.executable, "-m", "scanner", "scan", "--config", str(config), "--db",
                 db_url], capture_output=True, text=True, timeout=120, check=False)
            codes[i].append(proc.returncode)
            if proc.returncode != 1:
                errors.append(proc.stderr[-2000:])

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [[1] * RUNS, [1] * RUNS], errors
    runs = query(db_url, "SELECT id, status FROM scan_runs")
    assert len(runs) == 2 * RUNS and {r.status for r in runs} == {"finished"}
    per_cluster = query(db_url, "SELECT cluster, count(*), min(nodes_total), max(nodes_total) "
                                "FROM cluster_scans GROUP BY cluster ORDER BY cluster")
    assert [tuple(r) for r in per_cluster] == [("a", 2 * RUNS, 42, 42), ("b", 2 * RUNS, 25, 25)]
    assert_whole(db_url)
    assert count(db_url, "node_probes") == 2 * RUNS * (42 + 25)
    # every run has both clusters, none twice
    assert query(db_url, "SELECT run_id FROM cluster_scans GROUP BY run_id "
                         "HAVING count(*) != 2") == []
    # the rollups saw every scan, and every node's state points at its cluster's latest scan
    assert [tuple(r) for r in query(db_url, "SELECT cluster, sum(scans) FROM "
                                            "daily_cluster_summary GROUP BY cluster "
                                            "ORDER BY cluster")] == [("a", 2 * RUNS),
                                                                     ("b", 2 * RUNS)]
    stale = query(db_url, "SELECT s.cluster, s.node FROM node_states s JOIN cluster_scans c "
                          "ON c.id = s.last_cluster_scan_id WHERE c.started_at < (SELECT "
                          "max(started_at) FROM cluster_scans WHERE cluster = s.cluster)")
    assert stale == []
    assert count(db_url, "node_states") == 42 + 25
