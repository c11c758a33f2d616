"""`/api/trend` through the real app and HTTP, on SQLite and PostgreSQL: its body, byte for
byte, against a plain reference computed from the same stored rollup rows (ORM rows, filtered
and encoded in Python), across day ranges, cluster and control filters, gaps, empty scans,
awkward names and ratios."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import insert, select

from reports.cache import ReportCache
from scanner.core.evaluate import failed_cluster
from scanner.core.records import CONTROL_IDS
from scanner.db.models import DailyClusterSummary, DailyControlSummary
from scanner.db.queries.trends import trend, trend_table
from scanner.db.store import Store
from scanner.web.app import Auth, create_app
from scanner.web.state import json_response
from tests.db.test_trends import make_result
from tests.web.test_web import TOKEN, fetch, served

NOW = datetime(2026, 11, 27, 15, 30, tzinfo=UTC)
TODAY = NOW.date()
HISTORY = 40  # days of stored history before today
# Names a naive encoder gets wrong: quotes, backslashes, non-ASCII, a control character, a
# format sign, and a cluster called like a status.
CLUSTERS = ["alpha", "beta", 'q"uote\\back', "ünïcode-☃", "tab\there", "100%s", "compliant"]
# (passing, nodes): no node (ratio null), none passing, tiny and repeating ratios, all passing
COUNTS = [(0, 0), (0, 7), (1, 30000), (2, 3), (1, 3), (5, 5), (29999, 30000), (7, 8), (3, 1000)]
DAYS = [1, 2, 7, 20, 30, 365, 3660]


def _rows(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cluster_rows, control_rows = [], []
    sid = 1000
    for cluster in CLUSTERS:
        # A gap of days, and a row dated tomorrow (a scanner's clock ahead) that no
        # period ending today may show.
        for back in range(-1, HISTORY):
            if rng.random() < 0.2:
                continue
            day = TODAY - timedelta(days=back)
            sid += 1
            at = datetime(day.year, day.month, day.day, 2, tzinfo=UTC)
            passing, nodes = rng.choice(COUNTS)
            failing = rng.randint(0, nodes - passing)
            unknown = nodes - passing - failing
            status = ("error" if not nodes else "non_compliant" if failing
                      else "error" if unknown else "compliant")
            common = {"cluster": cluster, "day": day, "scans": rng.randint(1, 3),
                      "last_cluster_scan_id": sid, "last_started_at": at, "status": status,
                      "passing": passing, "failing": failing, "unknown": unknown,
                      "waived": rng.randint(0, 2)}
            cluster_rows.append({**common, "nodes": nodes})
            for control in CONTROL_IDS:
                if rng.random() < 0.8:  # not every control every day
                    p, n = rng.choice(COUNTS)
                    control_rows.append({**common, "control": control, "targets": n,
                                         "passing": p, "failing": n - p, "unknown": 0})
    return cluster_rows, control_rows


@pytest.fixture
def site(db_url: str, tmp_path: Path) -> Iterator[tuple[str, Store]]:
    store = Store(db_url)
    store.upgrade()
    cluster_rows, control_rows = _rows(random.Random(18))
    with store.session() as s:
        s.execute(insert(DailyClusterSummary), cluster_rows)
        s.execute(insert(DailyControlSummary), control_rows)
    # Two clusters written by the store itself: one scanned, one whose scan failed.
    for result in (make_result("saved-ok", NOW - timedelta(hours=3),
                               {"n1": "pass", "n2": "fail", "n3": "unknown"}),
                   failed_cluster("saved-failed", "API down", started_at=NOW - timedelta(hours=2),
                                  finished_at=NOW - timedelta(hours=2))):
        run = store.begin_run(trigger="test", started_at=result.started_at)
        store.save_cluster(run, result)
        store.finish_run(run, finished_at=result.finished_at)
    cache = ReportCache(tmp_path / "cache", entries=2)
    app = create_app(store=store, auth=Auth(token=TOKEN), reports=cache, clock=lambda: NOW)
    with served(app) as base:
        yield base, store
    cache.close()
    store.close()


def reference(store: Store, *, days: int, cluster: str | None, control: str | None) -> bytes:
    """The answer computed the plain way: every stored row, in the database's order."""
    first = TODAY - timedelta(days=days - 1)
    table = DailyClusterSummary if control is None else DailyControlSummary
    with store.reading() as s:
        rows: list[Any] = list(s.scalars(select(table).order_by(table.cluster, table.day)))
    out = []
    for r in rows:
        if not first <= r.day <= TODAY or (cluster is not None and r.cluster != cluster):
            continue
        if control is not None and r.control != control:
            continue
        nodes = r.nodes if control is None else r.targets
        point: dict[str, Any] = {
            "cluster": r.cluster, "day": r.day.isoformat(), "nodes": nodes,
            "failing": r.failing, "unknown": r.unknown,
            "ratio": round(r.passing / nodes, 6) if nodes else None, "status": r.status,
            "scans": r.scans, "waived": r.waived}
        if control is not None:
            point["control"] = control
        out.append(point)
    return json.dumps(out, ensure_ascii=False, allow_nan=False).encode()


def _query(days: int, cluster: str | None, control: str | None) -> str:
    parts = [f"days={days}"]
    if cluster is not None:
        parts.append("cluster=" + quote(cluster, safe=""))
    if control is not None:
        parts.append("control=" + control)
    return "/api/trend?" + "&".join(parts)


def test_api_trend_is_the_reference_byte_for_byte(site: tuple[str, Store]) -> None:
    base, store = site
    seen_points = 0
    for control in (None, *CONTROL_IDS):
        for cluster in (None, "alpha", 'q"uote\\back', "ünïcode-☃", "100%s", "compliant",
                        "saved-failed", "no-such-cluster"):
            for days in DAYS:
                resp = fetch(base, _query(days, cluster, control))
                assert resp.status == 200, resp.body[:200]
                assert resp.headers["content-type"] == "application/json"
                expected = reference(store, days=days, cluster=cluster, control=control)
                assert resp.body == expected, (days, cluster, control)
                seen_points += len(json.loads(resp.body))
    assert seen_points > 3000  # the cases hold real data, not empty lists


def test_the_data_covers_the_edges(site: tuple[str, Store]) -> None:
    """The comparison above means something: the stored rows reach every edge case."""
    base = site[0]
    body = fetch(base, "/api/trend?days=3660").json()
    ratios = {p["ratio"] for p in body}
    assert {None, 0.0, 1.0, 3.3e-05, 0.666667, 0.333333, 0.999967} <= ratios
    assert set(CLUSTERS) | {"saved-ok", "saved-failed"} == {p["cluster"] for p in body}
    assert max(p["day"] for p in body) == TODAY.isoformat()  # tomorrow's row left out
    assert len(body) < (HISTORY + 1) * len(CLUSTERS)  # gaps
    failed = [p for p in body if p["cluster"] == "saved-failed"]
    assert failed == [{"cluster": "saved-failed", "day": TODAY.isoformat(), "nodes": 0,
                       "failing": 0, "unknown": 0, "ratio": None, "status": "error",
                       "scans": 1, "waived": 0}]
    raw = fetch(base, "/api/trend?days=3660").body.decode()
    assert '"cluster": "tab\\there"' in raw and '"cluster": "q\\"uote\\\\back"' in raw
    assert '"ratio": 3.3e-05' in raw and '"cluster": "ünïcode-☃"' in raw


def test_records_and_json_agree_with_the_old_encoding(site: tuple[str, Store]) -> None:
    """The points `felixscan trend` prints and the API's text are the same figures:
    `json_response` of each point's `as_dict` gives the API's bytes."""
    _, store = site
    for control in (None, "typha-metrics"):
        for days in (7, 365):
            table = trend_table(store, days=days, today=TODAY, control=control)
            points = trend(store, days=days, today=TODAY, control=control)
            assert table.points() == points
            assert all(isinstance(p.day, date) for p in points)
            assert table.json().encode() == json_response([p.as_dict() for p in points]).body
            assert table.json().encode() == reference(store, days=days, cluster=None,
                                                      control=control)
