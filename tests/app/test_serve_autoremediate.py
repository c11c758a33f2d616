"""Auto-remediation in `serve`, end to end: a scheduled scan finds the seed platform's metrics
on, the hook remediates inside the window with the cluster lock held, the rollout closes the
real listeners, the verifying scan is stored and the webhook says the cluster recovered."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from scanner.app.alerts import AlertSender
from scanner.app.serve import ScanScheduler, ServeStore, auto_remediator
from scanner.core.config import AlertSettings
from scanner.db.models import RemediationAction, ScanRun
from tests.app.test_serve import _settings
from tests.app.test_serve_alerts import Receiver
from tests.helpers.scan_harness import Harness
from tests.remediate.test_remediate import ENABLED, FelixSim


def _window(now: datetime, *, inside: bool) -> str:
    start = now + (timedelta(hours=-1) if inside else timedelta(hours=3))
    return f"Mon-Sun {start:%H:%M}-{start + timedelta(hours=2):%H:%M} UTC"


def test_serve_remediates_inside_the_window_and_alerts_recovery(harness: Harness,
                                                                sqlite_url: str) -> None:
    now = datetime.now(UTC)
    handle = harness.cluster("auto", ["felix-http", "felix-http", "felix-http"],
                             env={ENABLED: "true"},
                             options={"remediation": {"enabled": True, "auto": True,
                                                      "window": _window(now, inside=True)}})
    handle.simulate_controllers(roll_delay=0.02)
    felix = FelixSim(harness, "auto")
    receiver = Receiver()
    settings = replace(_settings(harness, sqlite_url),
                       alerts=AlertSettings(webhook_url=receiver.url, backoff_seconds=0.01))
    alerts = AlertSender(settings.alerts)
    store = ServeStore(sqlite_url)
    store.upgrade()
    sched = ScanScheduler(settings, store, alerts=alerts, remediate=auto_remediator(settings))
    try:
        assert sched.run_cluster("auto", slot=now) == "scanned"
        assert felix.open_nodes() == []
        with store.sessions() as s:
            [action] = s.scalars(select(RemediationAction)).all()
            assert (action.outcome, action.trigger) == ("succeeded", "serve:auto")
            triggers = [r.trigger for r in s.scalars(select(ScanRun).order_by(ScanRun.id))]
            assert triggers[0] == "schedule" and "remediation" in triggers
            assert action.verify_run_id is not None
        for _ in range(2):
            assert receiver.got.wait(10)
            receiver.got.clear()
            if len(receiver.bodies) == 2:
                break
        assert [b["felixscan"]["event"] for b in receiver.bodies] == ["non_compliant",
                                                                      "recovered"]
    finally:
        alerts.close()
        receiver.close()
        store.close()
        handle.stop_controllers()


def test_outside_the_window_serve_waits(harness: Harness, sqlite_url: str) -> None:
    now = datetime.now(UTC)
    handle = harness.cluster("later", ["felix-http"], env={ENABLED: "true"},
                             options={"remediation": {"enabled": True, "auto": True,
                                                      "window": _window(now, inside=False)}})
    before = handle.daemonset_object()
    settings = _settings(harness, sqlite_url)
    with ServeStore(sqlite_url) as store:
        store.upgrade()
        sched = ScanScheduler(settings, store, remediate=auto_remediator(settings))
        assert sched.run_cluster("later", slot=now) == "scanned"
        with store.sessions() as s:
            assert s.scalars(select(RemediationAction)).all() == []
    assert handle.daemonset_object() == before
