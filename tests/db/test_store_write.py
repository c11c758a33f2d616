"""How a cluster's result is written (Core inserts of converted values; executemany on SQLite,
COPY on PostgreSQL; one upsert for the node states) and how the schema is recognised without
Alembic; on SQLite and PostgreSQL.

The stored data is compared, column by column and as the database holds it, with what the
ORM-based writer of revision 3227946 stored for the same results: every probe state, TLS facts
with an aware non-UTC expiry, findings of all three controls, waivers, text COPY must escape
(tab, newline, backslash) and non-ASCII, None values, JSON null.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, select

import scanner.db.store as store_module
from scanner.core.errors import StoreError
from scanner.core.records import (
    FELIX,
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterResult,
    Declared,
    Finding,
    NodeObservation,
    NodeResult,
    ProbeResult,
    TlsFacts,
    Waiver,
)
from scanner.db.models import SCHEMA_REVISION, ClusterScan, NodeProbe, NodeState
from scanner.db.store import Store, alembic_config
from tests.db.test_controls import three_controls
from tests.helpers.paths import ROOT

BEFORE = "3227946d2285174947bd57580ef1002438c33afc"  # the ORM-based writer
WHEN = datetime(2026, 12, 1, 2, 0, 0, 123456, tzinfo=UTC)
TABLES = ("scan_runs", "cluster_scans", "control_scans", "node_probes", "findings",
          "node_states", "daily_cluster_summary", "daily_control_summary")
ODD = "tab\there, line\nbreak, back\\slash, quote ' \" , ünïcødé ✓ 東京"


def _declared(**kw: Any) -> Declared:
    values: dict[str, Any] = {"enabled": False, "source": "built-in default (false)",
                              "port": 9091, "port_source": "built-in default"}
    return Declared(**(values | kw))


def _node(name: str, verdict: Any, probe: ProbeResult, **kw: Any) -> NodeResult:
    return NodeResult(node=name, address=probe.address, port=probe.port,
                      declared=kw.pop("declared", _declared(pod=f"calico-node-{name}")),
                      probe=probe, pod_current=kw.pop("pod_current", True), verdict=verdict,
                      **kw)


def rich(cluster: str, when: datetime, *, flip: bool = False) -> ClusterResult:
    """Three controls, and Felix's nodes in every probe state with every optional field."""
    cest = timezone(timedelta(hours=2))
    tls = TlsFacts("TLSv1.3", "TLS_AES_256_GCM_SHA384", f"CN=n0,O={ODD}", "CN=ca\\,x",
                   False, datetime(2026, 1, 1, tzinfo=cest),
                   datetime(2027, 1, 1, 1, 2, 3, 456789, tzinfo=cest), "ab" * 32)
    both = (ProbeResult("n0", "10.0.0.1", 9091, "open", "https", True, 200, tls),
            ProbeResult("n0", "fd00::1", 9091, "open", "http", True, 200),
            ProbeResult("n0", "fd00::2", 9091, "closed", error=ODD))
    view = NodeObservation(state="listening", time=when - timedelta(minutes=1), pod="cn-n0",
                           listeners=("0.0.0.0:9091",))
    nodes = (
        _node("n0", "fail", replace(both[0], felix_host="n0", connect_ms=1.25, duration_ms=3.5,
                                    body_bytes=10), probes=both, view=view),
        _node("n1", "pass" if flip else "waived",
              ProbeResult("n1", "10.0.0.2", 9091, "open", "http", True, 200, connect_ms=0.5),
              waiver="W-1", pod_current=None),
        _node("n2", "fail", ProbeResult("n2", "10.0.0.3", 9091, "open", "tcp", None,
                                        error="no HTTP answer")),
        _node("n3", "pass", ProbeResult("n3", "10.0.0.4", 9091, "closed", connect_ms=0.1),
              pod_current=False),
        _node("n4", "unknown", ProbeResult("n4", "10.0.0.5", 9091, "filtered", error="timeout")),
        _node("nöde-✓", "unknown", ProbeResult("nöde-✓", None, 9091, "unreachable", error=ODD),
              declared=_declared(enabled=None, source=ODD, reason="unknown", host="::1")),
        _node("n6", "fail" if flip else "unknown",
              ProbeResult("n6", "10.0.0.7", 19091, "error", error="reset"),
              declared=_declared(enabled=True, port=19091, source="env", pod=None)),
    )
    base = three_controls(cluster, when)
    felix = replace(base.controls[0], targets=nodes, status="non_compliant")
    findings = (
        Finding(id="FELIX-PORT-REACHABLE", severity="critical", message=ODD, node="n0",
                evidence={"port": 9091, "tls": {"subject": ODD, "not_after": None},
                          "addresses": ["10.0.0.1", "fd00::1"], "ok": True, "ratio": 0.5},
                remediation="set it\nto false"),
        Finding(id="FELIX-PORT-REACHABLE", severity="critical", message="waived", node="n1",
                waiver="W-1"),
        Finding(id="FELIX-UNKNOWN", severity="medium", message="m", node=None, evidence={}),
        Finding(id="TYPHA-PORT-REACHABLE", severity="critical", message="t", node="n0",
                control=TYPHA, evidence={"pod": "typha-a"}),
        Finding(id="KCC-PORT-REACHABLE", severity="high", message="k", node="n2",
                control=KUBE_CONTROLLERS),
    )
    waiver = Waiver(id="W-1", finding="FELIX-PORT-REACHABLE", cluster=cluster, nodes="n1",
                    reason=ODD, approved_by="ops@example.com", created=date(2026, 11, 1),
                    expires=date(2027, 1, 1), source="waivers.yaml#1")
    return replace(base, nodes=nodes, findings=findings, controls=(felix, *base.controls[1:]),
                   status="non_compliant", waivers=(waiver,), error=None,
                   timings={"api": 0.123456789, "probe": 1.5},
                   method={"timeout_seconds": 1.0, "ports": [9091]},
                   finished_at=when + timedelta(seconds=2, microseconds=7))


def _before_module() -> ModuleType:
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:scanner/db/store.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the reference writer is not in this checkout's history: {exc}")
    spec = importlib.util.spec_from_loader("felixscan_store_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(ROOT / "scanner" / "db" / "store.py")
    exec(compile(source, "store_before.py", "exec"), module.__dict__)
    return module


def _dump(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the written tables as the database holds it (PostgreSQL: each value as its
    text), sorted."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in TABLES:
        if conn.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(f"SELECT * FROM {table}").all()
        else:
            columns = [r[0] for r in conn.exec_driver_sql(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                "AND table_schema = current_schema() ORDER BY ordinal_position", (table,))]
            rows = conn.exec_driver_sql("SELECT " + ", ".join(
                f"{c}::text" for c in columns) + f" FROM {table}").all()
        out[table] = sorted((tuple(r) for r in rows), key=repr)
    return out


def _write(store: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Three scans of one cluster: a first, a later one with verdicts changed, and one stored
    late (older than the state); then a second cluster."""
    for cluster, when, flip in (("c1", WHEN, False), ("c1", WHEN + timedelta(hours=1), True),
                                ("c1", WHEN - timedelta(hours=1), True), ("c2", WHEN, False)):
        run = store.begin_run(trigger="test", started_at=when, vantage="v")
        store.save_cluster(run, rich(cluster, when, flip=flip))
        store.finish_run(run, finished_at=when)
    with store.engine.connect() as conn:
        return _dump(conn)


def test_the_stored_data_is_what_the_orm_writer_stored(db_url: str) -> None:
    before = _before_module()
    with Store(db_url) as store:
        store.upgrade()
        new = _write(store)
        command.downgrade(alembic_config(db_url), "base")  # ids start again at 1
        store.upgrade()
    with before.Store(db_url) as old_store:
        old = _write(old_store)
    assert {t: len(rows) for t, rows in new.items()} == {t: len(rows) for t, rows in old.items()}
    assert len(new["node_probes"]) == 4 * 10 and len(new["node_states"]) == 14
    for table in TABLES:
        assert new[table] == old[table], table


def test_values_read_back_as_written(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=WHEN)
        result = rich("c1", WHEN)
        cid = store.save_cluster(run, result)
        with store.sessions() as s:
            scan = s.get(ClusterScan, cid)
            assert scan is not None
            assert (scan.nodes_total, scan.nodes_pass, scan.nodes_fail, scan.nodes_unknown,
                    scan.nodes_waived) == (7, 1, 2, 3, 1)
            assert scan.waivers is not None and scan.waivers[0]["reason"] == ODD
            assert scan.finished_at == result.finished_at
            probes = {p.node: p for p in s.scalars(select(NodeProbe).where(
                NodeProbe.control == FELIX))}
            n0 = probes["n0"]
            tls = result.nodes[0].probe.tls
            assert tls is not None and n0.tls_not_after == tls.not_after
            assert n0.tls_not_after is not None and n0.tls_not_after.tzinfo == UTC
            assert n0.tls_subject == f"CN=n0,O={ODD}" and n0.tls_issuer == "CN=ca\\,x"
            assert n0.addresses is not None and [a["address"] for a in n0.addresses] == [
                "10.0.0.1", "fd00::1", "fd00::2"]
            assert n0.addresses[2]["error"] == ODD
            assert n0.node_view is not None and n0.node_view["listeners"] == ["0.0.0.0:9091"]
            assert (n0.node_ready, probes["n1"].node_ready, probes["n3"].node_ready) == (
                True, False, None)
            odd = probes["nöde-✓"]
            assert (odd.address, odd.declared_enabled, odd.declared_source, odd.error,
                    odd.connect_ms, odd.addresses, odd.node_view) == (
                None, None, ODD, ODD, None, None, None)
            assert {p.state for p in probes.values()} == {"open", "closed", "filtered",
                                                          "unreachable", "error"}
            assert s.scalar(select(func.count()).select_from(NodeProbe)) == 7 + 3
            states = {n.node: (n.verdict, n.streak_scans, n.since) for n in
                      s.scalars(select(NodeState))}
            assert states == {n.node: (n.verdict, 1, WHEN) for n in result.nodes}


def test_a_node_named_twice_is_counted_as_two_scans(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=WHEN)
        result = rich("c1", WHEN)
        twice = replace(result, nodes=(*result.nodes, replace(result.nodes[0], verdict="pass")))
        store.save_cluster(run, twice)
        with store.sessions() as s:
            state = s.get(NodeState, ("c1", "n0"))
            assert state is not None and (state.verdict, state.streak_scans) == ("pass", 1)
            assert s.scalar(select(func.count()).select_from(NodeState)) == 7


def test_many_nodes_in_one_save(db_url: str) -> None:
    """More nodes than one SQLite statement takes parameters for."""
    with Store(db_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=WHEN)
        result = rich("big", WHEN)
        proto = result.nodes[3]
        nodes = tuple(replace(proto, node=f"n{i:05d}") for i in range(17_000))
        store.save_cluster(run, replace(result, nodes=nodes, controls=()))
        with store.sessions() as s:
            assert s.scalar(select(func.count()).select_from(NodeState)) == 17_000
            assert s.scalar(select(func.count()).select_from(NodeProbe)) == 17_000


# --- protocol hints ----------------------------------------------------------------------------


def test_last_protocols_of_the_latest_scan(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        assert store.last_protocols("c1") == {}
        for when, result in ((WHEN, rich("c1", WHEN)),
                             (WHEN - timedelta(days=1), rich("c1", WHEN - timedelta(days=1)))):
            run = store.begin_run(trigger="test", started_at=when)
            store.save_cluster(run, result)
        late = rich("c2", WHEN + timedelta(hours=1))
        run = store.begin_run(trigger="test", started_at=WHEN + timedelta(hours=1))
        store.save_cluster(run, replace(late, nodes=late.nodes[3:]))
        # c1's latest (not the older one stored after it): open probes of Felix's endpoint
        # only (Typha's open target on 10.0.0.1:9093 is not one), every open address.
        assert store.last_protocols("c1") == {("10.0.0.1", 9091): "https",
                                              ("fd00::1", 9091): "http",
                                              ("10.0.0.2", 9091): "http"}
        assert store.last_protocols("c2") == {}
        assert store.last_protocols("nope") == {}


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_connection_lost_during_copy_stores_nothing(pg_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    copy = store_module._copy
    killed: list[int] = []

    def terminate_then_copy(conn: Connection, statement: str, rows: Iterator[Any]) -> None:
        if "node_probes" in statement and not killed:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            assert isinstance(pid, int)
            with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            killed.append(pid)
        copy(conn, statement, rows)

    monkeypatch.setattr(store_module, "_copy", terminate_then_copy)
    with Store(pg_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=WHEN)
        with pytest.raises(StoreError, match=r"^database write failed \(postgresql\+psycopg://"
                                             r"postgres@127\.0\.0\.1:5432/.*terminat"):
            store.save_cluster(run, rich("c1", WHEN))
        assert killed
        with store.sessions() as s:  # a new connection: nothing of the cluster
            assert s.scalar(select(func.count()).select_from(ClusterScan)) == 0
        store.save_cluster(run, rich("c1", WHEN))
        with store.sessions() as s:
            assert s.scalar(select(func.count()).select_from(NodeProbe)) == 10


def test_a_value_the_database_cannot_take_stores_nothing(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=WHEN)
        result = rich("c1", WHEN)
        bad = replace(result.findings[0], evidence={"when": object()})
        with pytest.raises(StoreError, match=r"database write failed .*a value cannot be stored"):
            store.save_cluster(run, replace(result, findings=(bad,)))
        naive = replace(result.nodes[0].probe.tls, not_after=datetime(2027, 1, 1))  # type: ignore[type-var]
        node = replace(result.nodes[0], probe=replace(result.nodes[0].probe, tls=naive))
        with pytest.raises(StoreError, match="naive datetime"):
            store.save_cluster(run, replace(result, nodes=(node,)))
        with store.sessions() as s:
            assert s.scalar(select(func.count()).select_from(ClusterScan)) == 0


# --- the schema, recognised without Alembic ---------------------------------------------------


def test_schema_revision_is_the_migrations_head() -> None:
    """Moving the head (a new migration) without moving SCHEMA_REVISION fails here."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script.get_current_head() == SCHEMA_REVISION


def test_a_database_at_head_is_checked_without_importing_alembic(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
    code = ("import sys\n"
            "from scanner.db.store import Store\n"
            "assert 'alembic' not in sys.modules, 'imported by the store'\n"
            "with Store(sys.argv[1]) as s:\n"
            "    s.ensure_schema(); s.check_readable(); assert s.current() == sys.argv[2]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n")
    out = subprocess.run([sys.executable, "-c", code, db_url, SCHEMA_REVISION], cwd=ROOT,
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_older_or_empty_database_is_still_upgraded(sqlite_url: str) -> None:
    with Store(sqlite_url) as store:
        assert store.current() is None
        store.ensure_schema()
        assert store.current() == SCHEMA_REVISION
        command.downgrade(alembic_config(sqlite_url), "0007")
        assert store.current() == "0007"
        store.ensure_schema()
        assert store.current() == SCHEMA_REVISION


def test_a_database_file_that_is_not_there_yet(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'new.db'}") as store:
        assert store.current() is None
