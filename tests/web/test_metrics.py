"""`GET /metrics` of `felixscan serve` and the Prometheus objects of deploy/overlays/monitoring.

The scrape is parsed with prometheus_client's own parser and checked against the database,
read here with plain queries (not the collector's): a real `felixscan serve` that scans
emulated clusters (compliant, non-compliant, unreachable) and finds the scans of agents
elsewhere, and the app in-process for the token rules and a database that does not answer.
The alert rules are extracted from the rendered PrometheusRule and run through promtool with
series that make each alert fire and series that keep it quiet.
"""

from __future__ import annotations

import base64
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from reports.cache import ReportCache
from scanner import __version__
from scanner.app.serve import ScanScheduler, ServeStore
from scanner.core.config import ServeSettings, load_settings
from scanner.core.errors import StoreError
from scanner.core.evaluate import failed_cluster
from scanner.core.records import ClusterResult
from scanner.db.models import ClusterScan
from scanner.db.store import Fence, Store
from scanner.web.app import Auth, create_app
from scanner.web.metrics import DURATION_BUCKETS, ScanStats
from tests.app.test_serve_alerts import Receiver
from tests.app.test_serve_process import TOKEN as SERVE_TOKEN
from tests.app.test_serve_process import Serve, config, poll
from tests.helpers.paths import ROOT
from tests.helpers.rbac_rules import find, render, render_together
from tests.helpers.scan_harness import Harness
from tests.web.test_web import TOKEN, fetch, fill, make_result, served

METRICS_TOKEN = "metrics-token-0123456789abcdef"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- reading a scrape and the database --------------------------------------------------------


def parse(text: str) -> tuple[set[str], Samples]:
    """(family names, {(sample name, labels): value}) of a Prometheus text scrape."""
    names: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def from_database(url: str) -> dict[str, dict[str, Any]]:
    """Each cluster's latest scan and latest scan that was not an error, by plain reading."""
    out: dict[str, dict[str, Any]] = {}
    with Store(url) as store, store.sessions() as s:
        rows = s.execute(select(ClusterScan).order_by(ClusterScan.started_at, ClusterScan.id))
        for row in rows.scalars():
            entry = out.setdefault(row.cluster, {"success": None})
            entry.update(status=row.status, started=row.started_at, passing=row.nodes_pass,
                         failing=row.nodes_fail, unknown=row.nodes_unknown)
            if row.status != "error":
                entry["success"] = row.started_at
    return out


def assert_agrees(samples: Samples, db: dict[str, dict[str, Any]],
                  never_scanned: int = 0) -> None:
    """Every cluster and fleet figure of the scrape is what the database holds."""
    assert {dict(k)["cluster"] for k in series(samples, "felixscan_cluster_compliant")} == \
        set(db)
    for cluster, e in db.items():
        assert value(samples, "felixscan_cluster_compliant", cluster=cluster) == \
            (1.0 if e["status"] == "compliant" else 0.0), cluster
        for status in ("compliant", "non_compliant", "error"):
            assert value(samples, "felixscan_cluster_status", cluster=cluster, status=status) \
                == (1.0 if e["status"] == status else 0.0), (cluster, status)
        for verdict, field in (("pass", "passing"), ("fail", "failing"), ("unknown", "unknown")):
            assert value(samples, "felixscan_cluster_nodes", cluster=cluster,
                         verdict=verdict) == e[field], (cluster, verdict)
        assert value(samples, "felixscan_cluster_last_scan_timestamp_seconds",
                     cluster=cluster) == pytest.approx(e["started"].timestamp(), abs=1e-3)
        success = series(samples, "felixscan_cluster_last_successful_scan_timestamp_seconds")
        if e["success"] is None:
            assert frozenset({("cluster", cluster)}) not in success
        else:
            assert success[frozenset({("cluster", cluster)})] == \
                pytest.approx(e["success"].timestamp(), abs=1e-3)
    statuses = [e["status"] for e in db.values()]
    for status in ("compliant", "non_compliant", "error"):
        assert value(samples, "felixscan_fleet_clusters", status=status) == \
            statuses.count(status), status
    assert value(samples, "felixscan_fleet_clusters", status="never_scanned") == never_scanned
    for verdict, field in (("pass", "passing"), ("fail", "failing"), ("unknown", "unknown")):
        assert value(samples, "felixscan_fleet_nodes", verdict=verdict) == \
            sum(e[field] for e in db.values())
    assert value(samples, "felixscan_database_up") == 1.0


def assert_no_felix_names(text: str) -> None:
    """Nothing a probe (felixscan's own, or anyone's) could take for Felix's metrics."""
    names, samples = parse(text)
    assert not [n for n in names if n.lower().startswith("felix_")]
    assert not [n for n, _ in samples if n.lower().startswith("felix_")]
    assert not re.search(r"^felix_", text, re.MULTILINE | re.IGNORECASE)


def seed_agent_scans(url: str, now: datetime) -> None:
    """Scans stored by agents elsewhere (not by the serve under test)."""
    with Store(url) as store:
        store.upgrade()
        for result in (
            make_result("agent-flaky", now - timedelta(days=2), [("a", "closed"), ("b", "closed")]),
            failed_cluster("agent-flaky", "API unreachable", started_at=now - timedelta(hours=1),
                           finished_at=now - timedelta(hours=1)),
            make_result("agent-bad", now - timedelta(hours=3),
                        [("x", "felix"), ("y", "filtered"), ("z", "closed")]),
        ):
            run = store.begin_run(trigger="cli", started_at=result.started_at)
            store.save_cluster(run, result)
            store.finish_run(run, finished_at=result.finished_at)


# --- a real `felixscan serve` ---------------------------------------------------------------



def test_a_real_serve_exports_the_database_and_its_own_scans(
        harness: Harness, db_url: str, tmp_path: Path, serves: list[Serve]) -> None:
    harness.cluster("good", ["closed", "closed"])
    harness.cluster("bad", ["felix-http", "closed"])
    harness.cluster("worse", ["felix-http", "felix-http", "closed"])
    harness.dead_cluster("gone")
    seed_agent_scans(db_url, datetime.now(UTC))
    receiver = Receiver([200, 400])  # two non-compliant clusters: one delivered, one refused
    try:
        cfg = config(harness)
        doc = yaml.safe_load(cfg.read_text())
        doc["alerts"] = {"webhook_url": receiver.url, "retries": 0, "timeout_seconds": 5}
        cfg.write_text(yaml.safe_dump(doc))
        serves.append(serve := Serve(tmp_path, cfg, db_url, "serve",
                                     env={"FELIXSCAN_METRICS_TOKEN": METRICS_TOKEN}))
        # As Serve.started(), with more time: two shared cores may be busy with other suites.
        log = serve.wait_for("listening on http://", timeout=60)
        serve.url = log.split("listening on ", 1)[1].split()[0]
        scanned = ("good", "bad", "worse", "gone")

        def done() -> bool:
            _, s = parse(fetch(serve.url, "/metrics", token=METRICS_TOKEN).text)
            return all(value(s, "felixscan_scan_duration_seconds_count", cluster=c) == 1
                       for c in scanned) and \
                value(s, "felixscan_alerts_delivered_total") + \
                value(s, "felixscan_alerts_failed_total") == 2 and \
                value(s, "felixscan_alerts_queued") == 0

        poll(done, timeout=120)
        r = fetch(serve.url, "/metrics", token=SERVE_TOKEN)  # the web token opens it too
        assert r.status == 200
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    finally:
        receiver.close()
    names, samples = parse(r.text)
    assert_no_felix_names(r.text)
    db = from_database(db_url)
    assert {c: e["status"] for c, e in db.items()} == {
        "good": "compliant", "bad": "non_compliant", "worse": "non_compliant", "gone": "error",
        "agent-flaky": "error", "agent-bad": "non_compliant"}
    assert_agrees(samples, db)
    assert value(samples, "felixscan_cluster_nodes", cluster="worse", verdict="fail") == 2
    # agent-flaky: its latest scan failed, its last successful one is two days old.
    assert db["agent-flaky"]["success"] < db["agent-flaky"]["started"] - timedelta(days=1)

    # This process's scans: one each, none for the agents' clusters.
    durations = series(samples, "felixscan_scan_duration_seconds_count")
    assert {dict(k)["cluster"] for k in durations} == set(scanned)
    for c in scanned:
        assert value(samples, "felixscan_scan_duration_seconds_bucket", cluster=c,
                     le="+Inf") == 1
        assert 0 < value(samples, "felixscan_scan_duration_seconds_sum", cluster=c) < 60
        for reason in ("scan", "store"):
            assert value(samples, "felixscan_scan_errors_total", cluster=c, reason=reason) == \
                (1.0 if (c, reason) == ("gone", "scan") else 0.0), (c, reason)
    assert value(samples, "felixscan_alerts_delivered_total") == 1
    assert value(samples, "felixscan_alerts_failed_total") == 1
    assert value(samples, "felixscan_alerts_dropped_total") == 0
    assert value(samples, "felixscan_alerts_queued") == 0
    assert value(samples, "felixscan_build_info", version=__version__,
                 python_version=platform.python_version()) == 1
    assert "process_resident_memory_bytes" in names

    # The metrics token opens /metrics and nothing else; no token, no metrics.
    assert fetch(serve.url, "/metrics", token=None).status == 401
    assert fetch(serve.url, "/api/clusters", token=METRICS_TOKEN).status == 401
    assert serve.stop() == 0


# --- the app in-process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("metrics")
    url = f"sqlite:///{tmp / 'felixscan.db'}"
    store = Store(url)
    fill(store)  # test_web's: compliant, non-compliant, hostile names, an error
    cache = ReportCache(tmp / "cache", entries=2)
    app = create_app(store=store, auth=Auth(token=TOKEN), reports=cache,
                     clusters=["prod-east", "never-scanned"],
                     metrics_auth=Auth(token=METRICS_TOKEN, name="FELIXSCAN_METRICS_TOKEN"))
    with served(app) as base:
        yield base, url
    cache.close()
    store.close()


def test_scrape_agrees_with_the_database(site: tuple[str, str]) -> None:
    base, url = site
    r = fetch(base, "/metrics", token=METRICS_TOKEN)
    assert r.status == 200
    _, samples = parse(r.text)
    db = from_database(url)
    assert '<script>alert("c")</script>' in db  # label values are escaped, and read back
    assert_agrees(samples, db, never_scanned=1)
    assert_no_felix_names(r.text)
    # Without a scheduler this process runs no scans: no histogram, no error counters.
    assert not series(samples, "felixscan_scan_duration_seconds_count")
    assert value(samples, "felixscan_alerts_delivered_total") == 0


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "Bearer wrong-token-wrong-token"}, 401),
    ({"Authorization": f"Bearer {TOKEN}"}, 200),
    ({"Authorization": f"Bearer {METRICS_TOKEN}"}, 200),
    ({"Authorization": "Basic " + base64.b64encode(f"prometheus:{METRICS_TOKEN}".encode())
      .decode()}, 200),
])
def test_metrics_needs_a_token(site: tuple[str, str], headers: dict[str, str],
                               status: int) -> None:
    r = fetch(site[0], "/metrics", token=None, headers=headers)
    assert r.status == status
    if status == 401:
        assert r.json() == {"error": "unauthorized", "detail": "send Authorization: Bearer TOKEN"}
        assert [v for k, v in r.lines if k == "www-authenticate"] == [
            'Bearer realm="felixscan"', 'Basic realm="felixscan"']
        assert b"felixscan_" not in r.body


def test_the_metrics_token_opens_nothing_else(site: tuple[str, str]) -> None:
    for path in ("/", "/api/clusters", "/api/openapi.json", "/clusters/prod-west",
                 "/reports/fleet/2026-01-01_2026-01-02.pdf", "/metrics/", "/api/../metrics"):
        r = fetch(site[0], path, token=METRICS_TOKEN)
        assert r.status == 401, path
        assert b"prod-east" not in r.body and b"felixscan_cluster" not in r.body  # no data


def test_a_metrics_auth_without_a_token_opens_nothing(tmp_path: Path) -> None:
    """An Auth with no token allows every request; as the metrics token it must allow none."""
    with Store(f"sqlite:///{tmp_path / 'x.db'}") as store:
        store.upgrade()
        app = create_app(store=store, auth=Auth(token=TOKEN), reports=ReportCache(tmp_path / "c"),
                         metrics_auth=Auth())
        with served(app) as base:
            assert fetch(base, "/metrics", token=None).status == 401
            assert fetch(base, "/metrics").status == 200


def test_openmetrics_when_asked_for(site: tuple[str, str]) -> None:
    r = fetch(site[0], "/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"})
    assert r.status == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(r.text)}
    assert families["felixscan_alerts_delivered"].type == "counter"
    assert families["felixscan_build"].type == "info"
    assert families["felixscan_cluster_compliant"].type == "gauge"


def test_a_database_that_does_not_answer_is_a_metric_not_an_error(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    store = Store(f"sqlite:///{gone / 'felixscan.db'}")
    store.upgrade()
    app = create_app(store=store, auth=Auth(token=TOKEN), reports=ReportCache(tmp_path / "c"))
    with served(app) as base:
        _, before = parse(fetch(base, "/metrics").text)
        assert value(before, "felixscan_database_up") == 1
        store.close()
        shutil.rmtree(gone)  # the file and its directory: SQLite cannot open it again
        r = fetch(base, "/metrics")
    store.close()
    assert r.status == 200
    _, samples = parse(r.text)
    assert value(samples, "felixscan_database_up") == 0
    assert not series(samples, "felixscan_cluster_status")
    assert not series(samples, "felixscan_fleet_clusters")
    assert value(samples, "felixscan_build_info", version=__version__,
                 python_version=platform.python_version()) == 1


class _BrokenStore(ServeStore):
    """A database that takes runs but refuses every cluster result."""

    def save_cluster(self, run_id: int, result: ClusterResult, *,
                     lock: Fence | None = None) -> int:
        raise StoreError("database write failed: disk full")


def test_scheduled_scans_are_timed_and_their_errors_counted(harness: Harness, sqlite_url: str,
                                                             tmp_path: Path) -> None:
    harness.cluster("c1", ["closed"])
    harness.dead_cluster("gone")
    settings = replace(load_settings(harness.config(), db_url=sqlite_url, environ={}),
                       schedule="0 2 * * *", serve=ServeSettings())
    store = _BrokenStore(sqlite_url)
    store.upgrade()
    sched = ScanScheduler(settings, store)
    try:
        app = create_app(store=store, auth=Auth(token=TOKEN),
                         reports=ReportCache(tmp_path / "c"), schedule=sched)
        with served(app) as base:
            _, before = parse(fetch(base, "/metrics").text)
            # Both series exist at zero before the first scan, so increase() sees the first.
            for c in ("c1", "gone"):
                assert value(before, "felixscan_scan_errors_total", cluster=c,
                             reason="store") == 0
                assert value(before, "felixscan_scan_duration_seconds_count", cluster=c) == 0
            assert sched.run_cluster("c1", slot=datetime.now(UTC)) == "scanned"
            _, after = parse(fetch(base, "/metrics").text)
    finally:
        sched.stop_new()
        store.close()
    assert value(after, "felixscan_scan_errors_total", cluster="c1", reason="store") == 1
    assert value(after, "felixscan_scan_errors_total", cluster="c1", reason="scan") == 0
    assert value(after, "felixscan_scan_duration_seconds_count", cluster="c1") == 1
    assert value(after, "felixscan_scan_duration_seconds_count", cluster="gone") == 0
    assert not series(after, "felixscan_cluster_status")  # nothing stored: no scan of c1


def test_scan_stats_buckets_and_errors() -> None:
    stats = ScanStats(["a"])
    outcomes = [[("a", "error", True)], [("a", "compliant", False)],
                [("a", "non_compliant", True)], None, [("a", "compliant", True)]]
    for seconds, results in zip((0.2, 0.5, 3.0, 3.0, 700.0), outcomes, strict=True):
        stats.scan_ended("a", seconds, results=results)
    duration, errors = stats.families()
    buckets = {s.labels["le"]: s.value for s in duration.samples if s.name.endswith("_bucket")}
    assert buckets["0.5"] == 2 and buckets["2.5"] == 2 and buckets["5.0"] == 4
    assert buckets[repr(DURATION_BUCKETS[-1])] == 4 and buckets["+Inf"] == 5
    assert list(buckets.values()) == sorted(buckets.values())
    assert {s.labels["reason"]: s.value for s in errors.samples} == {"scan": 1, "store": 2}


# --- deploy/overlays/monitoring ----------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: the alert rules are tested with it "
                    "(apt-get install prometheus, or bash scripts/install-system-packages --test)")
    return path


def rule_groups() -> list[dict[str, Any]]:
    rule, = find(render("monitoring"), "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def test_monitoring_overlay_scrapes_serve_with_the_token_serve_reads() -> None:
    objects = render_together(["serve", "monitoring"])
    monitor, = find(objects, "ServiceMonitor", "felixscan-serve")
    service, = find(objects, "Service", "felixscan-serve")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    endpoint, = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["honorLabels"] is True  # felixscan's `cluster` label is kept as it is
    # The Secret and key serve reads its token from (FELIXSCAN_WEB_TOKEN_FILE).
    pod = find(objects, "Deployment", "felixscan-serve")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    token_dir, _, token_name = env["FELIXSCAN_WEB_TOKEN_FILE"].rpartition("/")
    mount, = [m for m in container["volumeMounts"] if m["mountPath"] == token_dir]
    volume, = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    key, = [i["key"] for i in volume["secret"]["items"] if i["path"] == token_name]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {
        "name": volume["secret"]["secretName"], "key": key}}
    # An add-on: deleting it must leave the namespace (and serve) alone.
    assert {o["kind"] for o in render("monitoring")} == {"ServiceMonitor", "PrometheusRule"}
    readme = (ROOT / "deploy" / "README.md").read_text()
    for name in alerts():
        assert f"`{name}`" in readme, name


def test_rules_name_only_metrics_that_serve_exports(site: tuple[str, str]) -> None:
    _, samples = parse(fetch(site[0], "/metrics").text)
    exported = {n for n, _ in samples} | {"felixscan_scan_errors_total",
                                          "felixscan_scan_duration_seconds_count"}
    used = {m for r in alerts().values() for m in re.findall(r"felixscan_[a-z_]+", r["expr"])}
    assert used and used <= exported, used - exported
    assert not any("felix_" in r["expr"].replace("felixscan_", "") for r in alerts().values())


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "felixscan-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout
    return path


def expand(template: str, *, cluster: str = "", value: str = "", instance: str = "",
           control: str = "") -> str:
    """The few template forms the rules use, as Prometheus expands them."""
    out = (template.replace("{{ $labels.cluster }}", cluster)
           .replace("{{ $labels.control }}", control)
           .replace("{{ $labels.instance }}", instance)
           .replace("{{ $value | humanizeDuration }}", value)
           .replace("{{ $value }}", value))
    assert "{{" not in out, out
    return out


def fired(name: str, labels: dict[str, str], **values: str) -> dict[str, Any]:
    rule = alerts()[name]
    return {"exp_labels": {**rule.get("labels", {}), **labels},
            "exp_annotations": {k: expand(v, **values)
                                for k, v in rule.get("annotations", {}).items()}}


JOB = 'job="felixscan-serve",instance="10.0.0.7:8080"'


def cluster_series(cluster: str, status: str, *, fail: int, unknown: int,
                   success: str, controls: dict[str, int] | None = None) -> list[dict[str, str]]:
    """A cluster as /metrics exports it, for 30 hours of one-minute scrapes. `controls`: each
    control's felixscan_control_status (default: Felix's, from the cluster's status)."""
    out = [{"series": f'felixscan_cluster_status{{cluster="{cluster}",status="{s}",{JOB}}}',
            "values": f"{1 if s == status else 0}x1800"}
           for s in ("compliant", "non_compliant", "error")]
    out += [{"series": f'felixscan_cluster_nodes{{cluster="{cluster}",verdict="{v}",{JOB}}}',
             "values": f"{n}x1800"} for v, n in (("pass", 3), ("fail", fail),
                                                 ("unknown", unknown))]
    out.append({"series": f'felixscan_cluster_last_successful_scan_timestamp_seconds'
                          f'{{cluster="{cluster}",{JOB}}}', "values": success})
    felix = {"compliant": 1, "non_compliant": 0, "error": -1}[status]
    out += [{"series": f'felixscan_control_status{{cluster="{cluster}",control="{c}",{JOB}}}',
             "values": f"{v}x1800"}
            for c, v in (controls or {"felix-metrics": felix}).items()]
    return out


def test_alert_rules_fire_and_stay_quiet(rules_file: Path, tmp_path: Path) -> None:
    fresh = "0+60x1800"  # a successful scan just now, at every step
    clusters = [
        *cluster_series("good", "compliant", fail=0, unknown=0, success=fresh),
        *cluster_series("bad", "non_compliant", fail=2, unknown=1, success=fresh),
        *cluster_series("broken", "error", fail=0, unknown=3, success=fresh),
        *cluster_series("stale", "compliant", fail=0, unknown=0, success="0x1800"),
        # non-compliant by Typha alone: Felix's alert stays quiet, the control's fires
        *cluster_series("typha", "non_compliant", fail=0, unknown=0, success=fresh, controls={
            "felix-metrics": 1, "typha-metrics": 0, "kube-controllers-metrics": -1}),
        {"series": f'felixscan_build_info{{version="{__version__}",{JOB}}}',
         "values": "1x1800"},
        {"series": f"felixscan_database_up{{{JOB}}}", "values": "1x1800"},
    ]
    counters = [
        # serve could not store a result of c1 at 30 min; c2's scan failed (stored: no alert)
        {"series": f'felixscan_scan_errors_total{{cluster="c1",reason="store",{JOB}}}',
         "values": "0x30 1x150"},
        {"series": f'felixscan_scan_errors_total{{cluster="c2",reason="scan",{JOB}}}',
         "values": "0x30 4x150"},
        {"series": f'felixscan_scan_errors_total{{cluster="c2",reason="store",{JOB}}}',
         "values": "0x180"},
        # one alert refused at 30 min; three dropped on another replica at 30 min
        {"series": f"felixscan_alerts_failed_total{{{JOB}}}", "values": "0x30 1x150"},
        {"series": f"felixscan_alerts_dropped_total{{{JOB}}}", "values": "0x180"},
        {"series": 'felixscan_alerts_failed_total{job="felixscan-serve",instance="b:8080"}',
         "values": "0x180"},
        {"series": 'felixscan_alerts_dropped_total{job="felixscan-serve",instance="b:8080"}',
         "values": "0x30 3x150"},
        # the database stops answering at 20 min
        {"series": f"felixscan_database_up{{{JOB}}}", "values": "1x20 0x160"},
    ]
    delivery = [fired("FelixscanAlertDeliveryFailing", {"instance": i, "job": "felixscan-serve"},
                      instance=i) for i in ("10.0.0.7:8080", "b:8080")]
    tests = [
        {"interval": "1m", "input_series": clusters, "alert_rule_test": [
            {"eval_time": "5m", "alertname": "FelixscanFelixMetricsExposed",
             "exp_alerts": [fired("FelixscanFelixMetricsExposed", {"cluster": "bad"},
                                  cluster="bad", value="2")]},
            {"eval_time": "5m", "alertname": "FelixscanControlNonCompliant",
             "exp_alerts": [fired("FelixscanControlNonCompliant",
                                  {"cluster": "typha", "control": "typha-metrics"},
                                  cluster="typha", control="typha-metrics")]},
            {"eval_time": "5m", "alertname": "FelixscanControlNotVerified", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "FelixscanControlNotVerified", "exp_alerts": [
                fired("FelixscanControlNotVerified", {"cluster": c, "control": k}, cluster=c,
                      control=k) for c, k in (("broken", "felix-metrics"),
                                              ("typha", "kube-controllers-metrics"))]},
            {"eval_time": "5m", "alertname": "FelixscanScanFailing", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "FelixscanScanFailing",
             "exp_alerts": [fired("FelixscanScanFailing", {"cluster": "broken"},
                                  cluster="broken")]},
            {"eval_time": "25h", "alertname": "FelixscanScanOverdue", "exp_alerts": []},
            {"eval_time": "27h", "alertname": "FelixscanScanOverdue",
             "exp_alerts": [fired("FelixscanScanOverdue", {"cluster": "stale"},
                                  cluster="stale", value="1d 3h 0m 0s")]},
            {"eval_time": "27h", "alertname": "FelixscanFelixMetricsExposed",
             "exp_alerts": [fired("FelixscanFelixMetricsExposed", {"cluster": "bad"},
                                  cluster="bad", value="2")]},
            {"eval_time": "20m", "alertname": "FelixscanMetricsAbsent", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "FelixscanDatabaseUnreachable", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "FelixscanScanNotStored", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "FelixscanAlertDeliveryFailing",
             "exp_alerts": []},
        ]},
        {"interval": "1m", "input_series": counters, "alert_rule_test": [
            {"eval_time": "20m", "alertname": "FelixscanScanNotStored", "exp_alerts": []},
            {"eval_time": "40m", "alertname": "FelixscanScanNotStored",
             "exp_alerts": [fired("FelixscanScanNotStored", {"cluster": "c1"}, cluster="c1")]},
            {"eval_time": "100m", "alertname": "FelixscanScanNotStored", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "FelixscanAlertDeliveryFailing",
             "exp_alerts": []},
            {"eval_time": "40m", "alertname": "FelixscanAlertDeliveryFailing",
             "exp_alerts": delivery},
            {"eval_time": "100m", "alertname": "FelixscanAlertDeliveryFailing",
             "exp_alerts": []},
            {"eval_time": "25m", "alertname": "FelixscanDatabaseUnreachable", "exp_alerts": []},
            {"eval_time": "35m", "alertname": "FelixscanDatabaseUnreachable",
             "exp_alerts": [fired("FelixscanDatabaseUnreachable",
                                  {"instance": "10.0.0.7:8080", "job": "felixscan-serve"})]},
            # no felixscan_build_info at all here: Prometheus scrapes no felixscan
            {"eval_time": "10m", "alertname": "FelixscanMetricsAbsent", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "FelixscanMetricsAbsent",
             "exp_alerts": [fired("FelixscanMetricsAbsent", {})]},
            {"eval_time": "5m", "alertname": "FelixscanFelixMetricsExposed", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "FelixscanControlNonCompliant", "exp_alerts": []},
            {"eval_time": "27h", "alertname": "FelixscanScanOverdue", "exp_alerts": []},
        ]},
    ]
    # Every alert is shown both firing and quiet.
    for name in alerts():
        cases = [c for t in tests for c in t["alert_rule_test"] if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases) and any(not c["exp_alerts"] for c in cases), \
            name
    path = tmp_path / "felixscan-rules.test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [rules_file.name],
                                    "evaluation_interval": "1m", "tests": tests}))
    proc = subprocess.run([promtool(), "test", "rules", path.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize(("env", "message"), [
    ({"FELIXSCAN_METRICS_TOKEN": "short"},
     "FELIXSCAN_METRICS_TOKEN: the token must be at least 16 characters"),
    ({"FELIXSCAN_METRICS_TOKEN_FILE": "/nonexistent/token"},
     "FELIXSCAN_METRICS_TOKEN_FILE: the token file /nonexistent/token cannot be read"),
    ({"FELIXSCAN_METRICS_TOKEN": METRICS_TOKEN, "FELIXSCAN_METRICS_TOKEN_FILE": "/x"},
     "set FELIXSCAN_METRICS_TOKEN or FELIXSCAN_METRICS_TOKEN_FILE, not both"),
])
def test_a_bad_metrics_token_stops_serve_at_start(sqlite_url: str, env: dict[str, str],
                                                  message: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FELIXSCAN_")}
    proc = subprocess.run([sys.executable, "-m", "scanner", "serve", "--db", sqlite_url],
                          cwd=ROOT, env={**environ, "FELIXSCAN_WEB_TOKEN": TOKEN, **env},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
