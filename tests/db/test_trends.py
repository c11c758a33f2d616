"""Trends, streaks, views, retention and migrations, on SQLite and PostgreSQL.

The data is generated here and every expected answer is computed independently from it in
plain Python, then compared with what the database code returns.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import event, func, select, text

from scanner.app.cli import main
from scanner.core.errors import StoreError
from scanner.core.evaluate import failed_cluster
from scanner.core.records import ClusterResult, Declared, Finding, NodeResult, ProbeResult, Verdict
from scanner.db.models import ClusterScan, FindingRow, NodeProbe
from scanner.db.queries.retention import prune, record_report
from scanner.db.queries.trends import failing_streaks, trend
from scanner.db.store import Store, alembic_config

TODAY = date(2026, 11, 27)
OFF = Declared(enabled=False, source="built-in default (false)", port=9091,
               port_source="built-in default")


def make_result(cluster: str, when: datetime, verdicts: dict[str, Verdict]) -> ClusterResult:
    nodes = tuple(
        NodeResult(node=n, address="127.0.0.1", port=9091, declared=OFF,
                   probe=ProbeResult(node=n, address="127.0.0.1", port=9091,
                                     state="open" if v == "fail" else
                                     "error" if v == "unknown" else "closed"),
                   pod_current=True, verdict=v)
        for n, v in verdicts.items())
    findings = tuple(Finding(id="FELIX-PORT-REACHABLE", severity="critical", message="m",
                             node=n) for n, v in verdicts.items() if v == "fail")
    status = ("non_compliant" if "fail" in verdicts.values() else
              "error" if "unknown" in verdicts.values() else "compliant")
    return ClusterResult(cluster=cluster, status=status, install="manifest", declared=OFF,  # type: ignore[arg-type]
                         nodes=nodes, findings=findings, error=None, started_at=when,
                         finished_at=when, snapshot=None)


class History:
    """Random scans of a small fleet over some days, with the answers kept aside."""

    def __init__(self, store: Store, *, days: int = 12, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.days = days
        self.expected_days: dict[tuple[str, date], tuple[int, int, int, int]] = {}
        self.runs_by_day: dict[date, list[int]] = defaultdict(list)
        self.last: dict[str, dict[str, tuple[str, datetime, int]]] = defaultdict(dict)
        self.latest_nodes: dict[str, set[str]] = {}
        for d in range(days):
            day = TODAY - timedelta(days=days - 1 - d)
            for k in range(rng.choice([1, 1, 2])):  # some days have two scans
                when = datetime(day.year, day.month, day.day, 2 + 10 * k, tzinfo=UTC)
                run = store.begin_run(trigger="test", started_at=when)
                self.runs_by_day[day].append(run)
                for cluster in ("alpha", "beta"):
                    if cluster == "beta" and d == 3 and k == 0:
                        store.save_cluster(run, failed_cluster(
                            cluster, "API down", started_at=when, finished_at=when))
                        self.expected_days[(cluster, day)] = (0, 0, 0, 0)
                        continue
                    count = 6 if cluster == "alpha" else 4 + (d % 2)  # beta loses a node
                    verdicts: dict[str, Verdict] = {
                        f"{cluster}-{i}": rng.choice(["pass", "pass", "fail", "unknown"])
                        for i in range(count)}
                    if cluster == "alpha":
                        verdicts["alpha-0"] = "fail"  # fails every time: the longest streak
                    store.save_cluster(run, make_result(cluster, when, verdicts))
                    values = list(verdicts.values())
                    self.expected_days[(cluster, day)] = (
                        len(values), values.count("pass"), values.count("fail"),
                        values.count("unknown"))
                    self.latest_nodes[cluster] = set(verdicts)
                    for node, verdict in verdicts.items():
                        prev = self.last[cluster].get(node)
                        if prev and prev[0] == verdict:
                            self.last[cluster][node] = (verdict, prev[1], prev[2] + 1)
                        else:
                            self.last[cluster][node] = (verdict, when, 1)
                store.finish_run(run, finished_at=when)

    def streaks(self) -> list[tuple[str, str, datetime, int]]:
        out = [(c, n, since, scans)
               for c, nodes in self.last.items() for n, (v, since, scans) in nodes.items()
               if v == "fail" and n in self.latest_nodes[c]]
        return sorted(out, key=lambda r: (r[2], r[0], r[1]))


@pytest.fixture
def store(db_url: str):  # type: ignore[no-untyped-def]
    with Store(db_url) as s:
        s.upgrade()
        yield s


def test_trend_matches_an_independent_count(store: Store) -> None:
    h = History(store)
    points = trend(store, days=h.days, today=TODAY)
    got = {(p.cluster, p.day): (p.nodes, p.failing, p.unknown, p.ratio) for p in points}
    want = {key: (n, f, u, p / n if n else None)
            for key, (n, p, f, u) in h.expected_days.items()}
    assert got == want
    only = trend(store, clusters=["beta"], days=3, today=TODAY)
    assert {p.cluster for p in only} == {"beta"}
    assert len(only) == 3


def test_failing_streaks_match(store: Store) -> None:
    h = History(store)
    got = [(s.cluster, s.node, s.since, s.scans) for s in failing_streaks(store, limit=1000)]
    assert got == h.streaks()
    assert got[0][1] == "alpha-0"  # failing since the first scan
    assert got[0][3] == sum(len(v) for v in h.runs_by_day.values())


def test_views_give_the_same_answers(store: Store) -> None:
    h = History(store)
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT cluster, day, nodes, failing, unknown, ratio "
                                 "FROM daily_cluster_compliance")).all()
        got = {(r[0], r[1] if isinstance(r[1], date) else date.fromisoformat(r[1])):
               (r[2], r[3], r[4], None if r[5] is None else round(r[5], 6)) for r in rows}
        want = {k: (n, f, u, round(p / n, 6) if n else None)
                for k, (n, p, f, u) in h.expected_days.items()}
        assert got == want
        latest = dict(conn.execute(text(
            "SELECT cluster, nodes_total FROM latest_cluster_status")).all())
        last_day = TODAY
        assert latest == {c: h.expected_days[(c, last_day)][0] for c in ("alpha", "beta")}
        streak_nodes = {(r[0], r[1]) for r in conn.execute(text(
            "SELECT cluster, node FROM node_failure_streaks WHERE verdict = 'fail'"))}
        assert streak_nodes == {(c, n) for c, n, _, _ in h.streaks()}


def test_out_of_order_scan_does_not_roll_state_back(store: Store) -> None:
    late = datetime(2026, 11, 27, 12, tzinfo=UTC)
    early = datetime(2026, 11, 27, 3, tzinfo=UTC)
    run = store.begin_run(trigger="test", started_at=late)
    store.save_cluster(run, make_result("c", late, {"n": "pass"}))
    store.save_cluster(run, make_result("c", early, {"n": "fail"}))  # an agent reporting late
    [point] = trend(store, days=1, today=TODAY)
    assert (point.failing, point.scans) == (0, 2)
    assert failing_streaks(store) == []


def test_prune_keeps_rollups_and_reported_scans(store: Store) -> None:
    h = History(store, days=10)
    before = trend(store, days=10, today=TODAY)
    protected_day = TODAY - timedelta(days=8)
    record_report(store, fmt="pdf", sha256="0" * 64, location=None, clusters=["alpha"],
                  since=protected_day, until=protected_day,
                  scan_ids=h.runs_by_day[protected_day])
    now = datetime(2026, 11, 27, 23, tzinfo=UTC)
    cutoff = now - timedelta(days=5)
    with store.sessions() as s:
        old_ids = [i for i, run, started in s.execute(
            select(ClusterScan.id, ClusterScan.run_id, ClusterScan.started_at)).all()
            if started < cutoff and run not in h.runs_by_day[protected_day]]
        want_probes = s.scalar(select(func.count()).select_from(NodeProbe)
                               .where(NodeProbe.cluster_scan_id.in_(old_ids)))
        total = s.scalar(select(func.count()).select_from(NodeProbe))
    dry = prune(store, keep_days=5, now=now, dry_run=True)
    assert (dry.scans, dry.probes) == (len(old_ids), want_probes)
    result = prune(store, keep_days=5, now=now, batch_size=7)
    assert (result.scans, result.probes) == (len(old_ids), want_probes)
    assert result.kept_for_reports == 2 * len(h.runs_by_day[protected_day])
    assert result.batches > 1
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(NodeProbe)) == total - want_probes
        assert s.scalar(select(func.count()).select_from(FindingRow).where(
            FindingRow.cluster_scan_id.in_(old_ids), FindingRow.node.is_not(None))) == 0
        # cluster-level findings (here the failed scan's reason) are kept
        assert s.scalar(select(func.count()).select_from(FindingRow).where(
            FindingRow.cluster_scan_id.in_(old_ids))) == 1
        assert s.scalar(select(func.count()).select_from(ClusterScan)) > len(old_ids)
    assert trend(store, days=10, today=TODAY) == before  # rollups untouched
    again = prune(store, keep_days=5, now=now)
    assert again.probes == 0


def test_cli_trend_formats(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    History(store, days=3)
    run = store.begin_run(trigger="test", started_at=datetime(2026, 11, 27, 5, tzinfo=UTC))
    store.save_cluster(run, make_result("=HYPERLINK(evil)", datetime(2026, 11, 27, 5,
                                                                      tzinfo=UTC), {"n": "pass"}))
    assert main(["trend", "--db", store.url, "--days", "3000", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "cluster,day,nodes,failing,unknown,ratio,waived"
    assert any(line.startswith("'=HYPERLINK(evil)") for line in lines)
    assert main(["trend", "--db", store.url, "--days", "3000", "--format", "json",
                 "--cluster", "alpha"]) == 0
    out = capsys.readouterr().out
    assert '"cluster": "alpha"' in out and "beta" not in out
    assert main(["trend", "--db", store.url, "--nodes"]) == 0
    assert "alpha-0" in capsys.readouterr().out


def test_prune_needs_a_horizon(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    History(store, days=2)
    assert main(["db", "prune", "--db", store.url]) == 2
    assert "deletes nothing" in capsys.readouterr().err
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(NodeProbe)) > 0


def test_upgrade_backfills_rollups_from_older_scans(db_url: str) -> None:
    with Store(db_url) as store:
        command.upgrade(alembic_config(db_url), "0001")
        # Write scans the way 0001 did (no rollup tables), by hand.
        with store.engine.begin() as conn:
            run = conn.execute(text(
                "INSERT INTO scan_runs (started_at, status, trigger, tool_version, scanner_host)"
                " VALUES (:t, 'finished', 'cli', 'old', 'h') RETURNING id"),
                {"t": datetime(2026, 11, 26, 2)}).scalar()
            for day, verdict in ((26, "fail"), (27, "fail")):
                cs = conn.execute(text(
                    "INSERT INTO cluster_scans (run_id, cluster, started_at, finished_at, status,"
                    " install, nodes_total, nodes_pass, nodes_fail, nodes_unknown, snapshot,"
                    " timings) VALUES (:r, 'old', :t, :t, 'non_compliant', 'manifest', 1, 0, 1,"
                    " 0, '{}', '{}') RETURNING id"), {"r": run, "t": datetime(2026, 11, day, 2)}
                ).scalar()
                conn.execute(text(
                    "INSERT INTO node_probes (cluster_scan_id, node, port, state, verdict) "
                    "VALUES (:c, 'n1', 9091, 'open', :v)"), {"c": cs, "v": verdict})
        store.upgrade()
        [streak] = failing_streaks(store)
        assert (streak.node, streak.scans) == ("n1", 2)
        assert streak.since == datetime(2026, 11, 26, 2, tzinfo=UTC)
        assert [p.failing for p in trend(store, days=2, today=TODAY)] == [1, 1]


def test_two_processes_upgrade_at_once(db_url: str) -> None:
    code = ("import sys; from scanner.db.store import Store; "
            "Store(sys.argv[1]).upgrade(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    with Store(db_url) as store:
        assert store.current() == store.head()


@pytest.mark.postgres
def test_connection_lost_mid_write_fails_that_cluster_and_retry_works(pg_url: str) -> None:
    import psycopg

    with Store(pg_url) as store:
        store.upgrade()
        run = store.begin_run(trigger="test", started_at=datetime.now(UTC))
        killed = []

        def kill(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
            if "INSERT INTO control_scans" in statement and not killed:
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                killed.append(pid)

        event.listen(store.engine, "before_cursor_execute", kill)
        result = make_result("c", datetime.now(UTC), {"a": "pass", "b": "fail"})
        with pytest.raises(StoreError, match="database write failed"):
            store.save_cluster(run, result)
        event.remove(store.engine, "before_cursor_execute", kill)
        with store.sessions() as s:
            assert s.scalar(select(func.count()).select_from(ClusterScan)) == 0
        store.save_cluster(run, result)  # the pool reconnects; the retry is whole
        with store.sessions() as s:
            assert s.scalar(select(func.count()).select_from(NodeProbe)) == 2
