"""The results database on SQLite and PostgreSQL: schema only from migrations, atomic writes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import func, select, text

from scanner.core.errors import SchemaMismatch, StoreError
from scanner.core.evaluate import failed_cluster
from scanner.core.records import (
    ClusterResult,
    Declared,
    Finding,
    NodeResult,
    ProbeResult,
    TlsFacts,
)
from scanner.db.models import ClusterScan, FindingRow, NodeProbe, ScanRun
from scanner.db.store import Store, alembic_config, redact_url

NOW = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)


def result(cluster: str = "c1", nodes: int = 3) -> ClusterResult:
    declared = Declared(enabled=False, source="built-in default (false)", port=9091,
                        port_source="built-in default")
    tls = TlsFacts("TLSv1.3", "TLS_AES_256_GCM_SHA384", "CN=n0", "CN=n0", True, NOW, NOW,
                   "ab" * 32)
    rows = tuple(
        NodeResult(node=f"n{i}", address=f"127.0.0.{i + 1}", port=9091, declared=declared,
                   probe=ProbeResult(node=f"n{i}", address=f"127.0.0.{i + 1}", port=9091,
                                     state="open" if i == 0 else "closed",
                                     protocol="https" if i == 0 else None,
                                     felix=True if i == 0 else None, tls=tls if i == 0 else None),
                   pod_current=True, verdict="fail" if i == 0 else "pass")
        for i in range(nodes))
    finding = Finding(id="FELIX-PORT-REACHABLE", severity="critical", message="served",
                      node="n0", evidence={"port": 9091}, remediation="fix it")
    return ClusterResult(cluster=cluster, status="non_compliant", install="manifest",
                         declared=declared, nodes=rows, findings=(finding,), error=None,
                         started_at=NOW, finished_at=NOW, snapshot=None)


def test_schema_comes_from_migrations_and_matches_models(db_url: str) -> None:
    with Store(db_url) as store:
        assert store.current() is None
        before, after = store.upgrade()
        assert (before, after) == (None, store.head())
        # Fails when models and migrations drift apart.
        command.check(alembic_config(db_url))
        assert store.upgrade() == (after, after)


def test_migrations_downgrade_and_upgrade_again(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        command.downgrade(alembic_config(db_url), "base")
        assert store.current() is None
        with store.engine.connect() as conn:
            names = {r[0] for r in conn.execute(text(
                "SELECT name FROM sqlite_master WHERE type='table'" if db_url.startswith("sqlite")
                else "SELECT tablename FROM pg_tables WHERE schemaname='public'"))}
        assert not names & {"scan_runs", "cluster_scans", "node_probes", "findings"}
        store.upgrade()
        assert store.current() == store.head()


def test_cluster_result_is_stored_whole(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=NOW)
        cid = store.save_cluster(run, result(nodes=4))
        store.finish_run(run, finished_at=NOW)
        with store.sessions() as s:
            scan = s.get(ClusterScan, cid)
            assert scan is not None
            assert (scan.nodes_total, scan.nodes_pass, scan.nodes_fail, scan.nodes_unknown) == \
                (4, 3, 1, 0)
            assert scan.started_at == NOW  # tz-aware UTC back out, on SQLite too
            assert scan.started_at.tzinfo is not None
            probes = s.scalars(select(NodeProbe).where(NodeProbe.cluster_scan_id == cid)
                               .order_by(NodeProbe.node)).all()
            assert [p.state for p in probes] == ["open", "closed", "closed", "closed"]
            assert probes[0].tls_self_signed is True
            assert probes[0].tls_sha256 == "ab" * 32
            assert probes[0].tls_not_after == NOW
            finding = s.scalars(select(FindingRow)).one()
            assert (finding.finding_id, finding.evidence) == ("FELIX-PORT-REACHABLE",
                                                              {"port": 9091})
            run_row = s.get(ScanRun, run)
            assert run_row is not None
            assert run_row.status == "finished"


def test_a_failing_write_leaves_nothing_of_that_cluster(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=NOW)
        store.save_cluster(run, result("good"))
        bad = replace(result("bad"), findings=(Finding(
            id="X", severity="info", message="m", evidence={"oops": object()}),))
        with pytest.raises(StoreError, match="not JSON serializable"):
            store.save_cluster(run, bad)
        with store.sessions() as s:
            clusters = s.scalars(select(ClusterScan.cluster)).all()
            assert clusters == ["good"]
            assert s.scalar(select(func.count()).select_from(NodeProbe)) == 3


def test_error_result_is_stored_with_its_reason(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=NOW)
        cid = store.save_cluster(run, failed_cluster("down", "connection refused",
                                                     started_at=NOW, finished_at=NOW))
        with store.sessions() as s:
            scan = s.get(ClusterScan, cid)
            assert scan is not None
            assert (scan.status, scan.error, scan.nodes_total) == ("error", "connection refused", 0)


def test_database_newer_than_the_code_is_refused(sqlite_url: str) -> None:
    with Store(sqlite_url) as store:
        store.upgrade()
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num='9999_future'"))
        with pytest.raises(SchemaMismatch, match="newer version"):
            store.ensure_schema()


def test_unreachable_database_is_a_store_error() -> None:
    with Store("postgresql+psycopg://nobody:secret-pw@127.0.0.1:1/none") as store, \
            pytest.raises(StoreError) as info:
        store.current()
    assert "secret-pw" not in str(info.value)


def test_redact_url_drops_the_password() -> None:
    assert redact_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u@h/db"
    assert redact_url("sqlite:///x.db") == "sqlite:///x.db"
