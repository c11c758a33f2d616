"""The scheduler of `felixscan serve`: cron semantics, catch-up after downtime, overlap skips,
alerts and the auto-remediation hook, with real scans of emulated clusters."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import select

from scanner.app.serve import (
    ScanScheduler,
    ServeStore,
    cron_trigger,
    crontab_weekdays,
    last_fire,
)
from scanner.core.config import (
    AlertSettings,
    ClusterSettings,
    ServeSettings,
    Settings,
    load_settings,
)
from scanner.core.evaluate import failed_cluster
from scanner.db.models import ClusterScan, Lease, ScanRun
from scanner.db.store import Store
from tests.app.test_serve_alerts import Receiver
from tests.helpers.scan_harness import Harness


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(("field", "expected"), [
    ("*", "*"), ("0", "sun"), ("7", "sun"), ("1-5", "mon,tue,wed,thu,fri"),
    ("0,6", "sun,sat"), ("*/2", "sun,tue,thu,sat"), ("0-7", "*"), ("mon-fri", "mon-fri"),
    ("5-7", "sun,fri,sat"),
])
def test_crontab_weekdays_count_sunday_as_zero(field: str, expected: str) -> None:
    assert crontab_weekdays(field) == expected


def test_cron_runs_in_its_time_zone_on_the_crontab_weekday() -> None:
    trigger = cron_trigger("0 2 * * 0", timezone="Europe/Berlin")
    fire = trigger.get_next_fire_time(None, at("2026-03-02T12:00:00"))  # a Monday
    assert fire is not None
    assert fire.strftime("%A %H:%M %Z") == "Sunday 02:00 CET"
    assert fire.astimezone(UTC) == at("2026-03-08T01:00:00")


def test_last_fire_ignores_jitter_and_looks_back_within_the_window() -> None:
    trigger = cron_trigger("*/5 * * * *", timezone="UTC", jitter=240)
    assert last_fire(trigger, now=at("2026-03-02T02:31:10"),
                     window=timedelta(hours=1)) == at("2026-03-02T02:30:00")
    daily = cron_trigger("0 2 * * *", timezone="UTC")
    assert last_fire(daily, now=at("2026-03-02T02:59:00"),
                     window=timedelta(hours=1)) == at("2026-03-02T02:00:00")
    assert last_fire(daily, now=at("2026-03-02T03:00:01"), window=timedelta(hours=1)) is None
    # Jitter delays each run by up to its seconds, never runs it early.
    now = at("2026-03-02T02:31:10")
    fires = {trigger.get_next_fire_time(None, now) for _ in range(20)}
    assert all(f is not None and at("2026-03-02T02:35:00") <= f <= at("2026-03-02T02:39:00")
               for f in fires)
    assert len(fires) > 1
    seconds = CronTrigger(second="*", timezone="UTC")
    assert last_fire(seconds, now=at("2026-03-02T02:00:07.5"),
                     window=timedelta(hours=1)) == at("2026-03-02T02:00:07")


def _stored_scan(store: Store, cluster: str, when: datetime) -> None:
    run = store.begin_run(trigger="schedule", started_at=when)
    store.save_cluster(run, failed_cluster(cluster, "unreachable", started_at=when,
                                           finished_at=when + timedelta(seconds=1)))
    store.finish_run(run, finished_at=when + timedelta(seconds=1))


def test_missed_runs_are_caught_up_once_within_the_grace(db_url: str) -> None:
    settings = Settings(database=db_url, schedule="0 2 * * *",
                        serve=ServeSettings(misfire_grace_seconds=3600),
                        clusters=(ClusterSettings(name="daily"),
                                  ClusterSettings(name="often", schedule="*/5 * * * *"),
                                  ClusterSettings(name="berlin", timezone="Europe/Berlin")))
    with Store(db_url) as store:
        store.upgrade()
        sched = ScanScheduler(settings, store)
        # Down from 01:50 to 02:31 (UTC): "daily" missed its run, "often" eight of them (one
        # catch-up); "berlin" ran at 02:00 Berlin time, 01:00 UTC: beyond the hour of grace.
        due = dict(sched.missed(at("2026-03-02T02:31:00")))
        assert due == {"daily": at("2026-03-02T02:00:00"), "often": at("2026-03-02T02:30:00")}
        assert dict(sched.missed(at("2026-03-02T01:40:00"))) == {
            "often": at("2026-03-02T01:40:00"), "berlin": at("2026-03-02T01:00:00")}
        # A scan since the due time (by anyone: another replica, the CLI) settles it.
        _stored_scan(store, "daily", at("2026-03-02T02:00:40"))
        _stored_scan(store, "often", at("2026-03-02T01:00:00"))  # too old to count
        due = dict(sched.missed(at("2026-03-02T02:31:00")))
        assert set(due) == {"often"}
        # Beyond the misfire grace nothing is caught up: the next regular run will do.
        assert dict(sched.missed(at("2026-03-02T03:30:00"))) == {
            "often": at("2026-03-02T03:30:00")}


def test_cluster_without_schedule_gets_no_job(sqlite_url: str) -> None:
    settings = Settings(database=sqlite_url, clusters=(ClusterSettings(name="manual"),))
    with Store(sqlite_url) as store:
        store.upgrade()
        sched = ScanScheduler(settings, store)
        sched.start()
        try:
            assert sched.jobs() == {}
            assert sched.running()
        finally:
            sched.stop_new()
        assert not sched.running()


def _settings(harness: Harness, db_url: str, **serve: Any) -> Settings:
    settings = load_settings(harness.config(), db_url=db_url, environ={})
    return replace(settings, schedule="0 2 * * *", serve=ServeSettings(**serve))


def test_overlapping_run_is_skipped_and_recorded(harness: Harness, db_url: str) -> None:
    harness.cluster("slow", ["closed"], options={"api_timeout_seconds": 10}).emu.inject(
        r"daemonsets", delay=1.0)
    store = ServeStore(db_url)
    store.upgrade()
    sched = ScanScheduler(_settings(harness, db_url), store,
                          triggers={"slow": CronTrigger(second="*", timezone="UTC")})
    try:
        sched.start(catch_up=False)
        time.sleep(2.6)
        sched.stop_new()
        assert sched.wait_idle(10)
        with store.sessions() as s:
            scans = s.execute(select(ClusterScan.started_at, ClusterScan.finished_at)
                              .where(ClusterScan.cluster == "slow")
                              .order_by(ClusterScan.started_at)).all()
            runs = s.execute(select(ScanRun.status, ScanRun.trigger, ScanRun.cluster,
                                    ScanRun.note)).all()
    finally:
        store.close()
    assert 1 <= len(scans) <= 2
    for (_, end), (start, _) in itertools.pairwise(scans):
        assert start >= end, "two scans of one cluster overlapped"
    skipped = [r for r in runs if r.status == "skipped"]
    assert skipped and all(r.trigger == "schedule" for r in skipped)
    assert all(r.cluster == "slow" and "still going" in (r.note or "") for r in skipped)
    assert sum(1 for r in runs if r.status == "finished") == len(scans)
    assert not any(r.status == "running" for r in runs)
    assert sched.jobs()["slow"].last_outcome is not None


def test_alerts_and_auto_remediation_hook(harness: Harness, sqlite_url: str) -> None:
    handle = harness.cluster("flip", ["felix-http", "closed"],
                             options={"remediation": {"enabled": True, "auto": True}})
    assert handle is not None
    receiver = Receiver()
    calls: list[tuple[str, str]] = []
    settings = replace(_settings(harness, sqlite_url, public_url="https://fs.example.org"),
                       alerts=AlertSettings(webhook_url=receiver.url, backoff_seconds=0.01))
    from scanner.app.alerts import AlertSender

    alerts = AlertSender(settings.alerts)
    store = ServeStore(sqlite_url)
    store.upgrade()
    sched = ScanScheduler(settings, store, alerts=alerts,
                          remediate=lambda c, r, s, lock: calls.append((c.name, r.status)))
    try:
        assert sched.run_cluster("flip", slot=datetime.now(UTC)) == "scanned"
        assert receiver.got.wait(10)
        receiver.got.clear()
        assert calls == [("flip", "non_compliant")]
        first = receiver.bodies[0]
        assert first["felixscan"]["event"] == "non_compliant"
        assert first["felixscan"]["failing"] == 1
        assert "<https://fs.example.org/clusters/flip|Details>" in first["text"]

        # The same slot again: another run (here: ours) already scanned it.
        assert sched.run_cluster("flip", slot=datetime.now(UTC) - timedelta(minutes=1)) == \
            "skipped: already scanned"

        harness.fleet.close_node(harness.addresses[("flip", "flip-node-0")])
        assert sched.run_cluster("flip", slot=datetime.now(UTC)) == "scanned"
        assert receiver.got.wait(10)
        assert [b["felixscan"]["event"] for b in receiver.bodies] == ["non_compliant",
                                                                      "recovered"]
        assert calls == [("flip", "non_compliant")]  # compliant: nothing to remediate
    finally:
        alerts.close()
        receiver.close()
        store.close()


def test_auto_remediation_without_a_hook_only_warns(harness: Harness, sqlite_url: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    harness.cluster("drift", ["felix-http"],
                    options={"remediation": {"enabled": True, "auto": True}})
    with ServeStore(sqlite_url) as store:
        store.upgrade()
        sched = ScanScheduler(_settings(harness, sqlite_url), store)
        assert sched.run_cluster("drift", slot=datetime.now(UTC)) == "scanned"
    assert "remediation.auto is set, but this felixscan has no auto-remediation yet" in caplog.text


def test_no_new_runs_after_stop(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("c1", ["closed"])
    with ServeStore(sqlite_url) as store:
        store.upgrade()
        sched = ScanScheduler(_settings(harness, sqlite_url), store)
        sched.start(catch_up=False)
        assert sched.jobs()["c1"].next_run is not None
        sched.stop_new()
        assert not sched.running()
        assert sched.run_cluster("c1") == "stopping"
        with store.sessions() as s:
            assert s.scalars(select(ScanRun)).all() == []


def test_catch_up_waits_out_a_dead_processs_lease(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("c1", ["closed"])
    due = datetime.now(UTC) - timedelta(minutes=1)
    settings = replace(_settings(harness, sqlite_url, lock_ttl_seconds=1),
                       schedule=f"{due.minute} {due.hour} * * *")
    with ServeStore(sqlite_url) as store:
        store.upgrade()
        now = datetime.now(UTC)
        with store.session() as s:  # left behind by a serve that was killed a moment ago
            s.add(Lease(name="cluster:c1", holder="gone:1:dead", acquired_at=now,
                        expires_at=now + timedelta(seconds=1)))
        sched = ScanScheduler(settings, store)
        sched.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with store.sessions() as s:
                    if s.scalars(select(ClusterScan.id)).first() is not None:
                        break
                time.sleep(0.1)
            with store.sessions() as s:
                statuses = sorted(s.scalars(select(ScanRun.status)))
        finally:
            sched.stop_new()
            sched.wait_idle(10)
    assert statuses == ["finished", "skipped"]  # refused once, then scanned after expiry


def test_a_run_apscheduler_reports_missed_is_recorded_as_skipped(
        sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent

    settings = Settings(database=sqlite_url, schedule="0 2 * * *",
                        clusters=(ClusterSettings(name="c1"),))
    with Store(sqlite_url) as store:
        store.upgrade()
        sched = ScanScheduler(settings, store)
        # What APScheduler emits when the host slept through a run beyond the misfire grace.
        sched._on_event(JobExecutionEvent(EVENT_JOB_MISSED, "c1", "default",
                                          at("2026-03-02T02:00:00")))
        with store.sessions() as s:
            assert list(s.scalars(select(ScanRun.status))) == ["skipped"]
    assert "cluster c1: scheduled run skipped: it was due longer ago than " \
           "serve.misfire_grace_seconds" in caplog.text
