"""`felixscan serve` as real processes: two replicas on one database, SIGTERM mid-scan, and
the refusals at start. The catch-up of a run missed a minute ago starts each scan at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from scanner.db.models import ClusterScan, Lease, ScanRun
from scanner.db.store import Store
from tests.helpers.paths import ROOT
from tests.helpers.scan_harness import Harness

TOKEN = "test-token-0123456789abcdef"


class Serve:
    """One `felixscan serve` process; its log goes to a file the test can read."""

    def __init__(self, tmp: Path, config: Path, db: str, name: str, *listen: str,
                 env: dict[str, str] | None = None) -> None:
        self.log = tmp / f"{name}.log"
        self._fh = self.log.open("w")
        environ = {**os.environ, "FELIXSCAN_WEB_TOKEN": TOKEN, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scanner", "-v", "serve", "--config", str(config), "--db", db,
             "--listen", *(listen or ("127.0.0.1:0",))],
            cwd=ROOT, env=environ, stdout=self._fh, stderr=subprocess.STDOUT, text=True)
        self.url = ""

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} in the log within {timeout} s:\n{self.text()}")

    def started(self) -> Serve:
        text = self.wait_for("listening on http://")
        self.url = text.split("listening on ", 1)[1].split()[0]
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()



def config(harness: Harness, **serve: Any) -> Path:
    """The harness's config with a daily schedule that fell due a minute ago (so serve
    catches it up at start, and the next run is a day away)."""
    path = harness.config()
    doc = yaml.safe_load(path.read_text())
    due = datetime.now(UTC) - timedelta(minutes=1)
    doc["schedule"] = f"{due.minute} {due.hour} * * *"
    doc["serve"] = {"misfire_grace_seconds": 3600, "lock_ttl_seconds": 5, **serve}
    path.write_text(yaml.safe_dump(doc))
    return path


def rows(db: str) -> tuple[list[Any], list[Any]]:
    with Store(db) as store, store.sessions() as s:
        runs = s.execute(select(ScanRun.id, ScanRun.status, ScanRun.finished_at)
                         .order_by(ScanRun.id)).all()
        scans = s.execute(select(ClusterScan.run_id, ClusterScan.cluster,
                                 ClusterScan.started_at, ClusterScan.finished_at)).all()
    return runs, scans


def poll(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_two_replicas_scan_a_cluster_once(harness: Harness, db_url: str, tmp_path: Path,
                                          serves: list[Serve]) -> None:
    harness.cluster("shared", ["closed", "closed"],
                    options={"api_timeout_seconds": 10}).emu.inject(r"daemonsets", delay=1.0,
                                                                    times=1)
    cfg = config(harness)
    Store(db_url).upgrade()  # as `felixscan db upgrade` before a rollout
    serves += [Serve(tmp_path, cfg, db_url, "a"), Serve(tmp_path, cfg, db_url, "b")]
    for s in serves:
        s.started()
    poll(lambda: any(r.status == "finished" for r in rows(db_url)[0]))
    # The other replica either found the lock taken or, later, the run already made.
    deadline = time.monotonic() + 10
    while not any("skipped" in s.text() or "already scanned" in s.text() for s in serves):
        assert time.monotonic() < deadline, [s.text() for s in serves]
        time.sleep(0.05)
    with urllib.request.urlopen(serves[0].url + "/readyz", timeout=5) as resp:
        assert resp.status == 200
    assert [s.stop() for s in serves] == [0, 0]
    runs, scans = rows(db_url)
    assert [c.cluster for c in scans] == ["shared"]  # one scan, by one of the two
    assert sorted(r.status for r in runs) in (["finished"], ["finished", "skipped"])


def test_sigterm_lets_a_running_scan_finish(harness: Harness, db_url: str, tmp_path: Path,
                                            serves: list[Serve]) -> None:
    harness.cluster("c1", ["closed"], options={"api_timeout_seconds": 10}).emu.inject(
        r"daemonsets", delay=1.0, times=1)
    serves.append(serve := Serve(tmp_path, config(harness, shutdown_grace_seconds=20), db_url,
                                 "one").started())
    poll(lambda: any(r.status == "running" for r in rows(db_url)[0]))
    t = time.monotonic()
    assert serve.stop() == 0
    assert time.monotonic() - t < 10
    runs, scans = rows(db_url)
    assert [r.status for r in runs] == ["finished"]
    assert [c.run_id for c in scans] == [runs[0].id]
    log = serve.text()
    assert "SIGTERM: no new scans; running scans have 20 s to finish" in log
    assert "aborted" not in log


def test_sigterm_marks_a_scan_past_the_grace_aborted(harness: Harness, db_url: str,
                                                     tmp_path: Path, serves: list[Serve]) -> None:
    harness.cluster("c1", ["closed"], options={"api_timeout_seconds": 20}).emu.inject(
        r"daemonsets", delay=8.0, times=1)
    serves.append(serve := Serve(tmp_path, config(harness, shutdown_grace_seconds=0.5), db_url,
                                 "one").started())
    poll(lambda: any(r.status == "running" for r in rows(db_url)[0]))
    t = time.monotonic()
    assert serve.stop() == 0
    assert time.monotonic() - t < 5  # the grace, not the scan's eight seconds
    runs, scans = rows(db_url)
    assert [r.status for r in runs] == ["aborted"]
    assert runs[0].finished_at is not None
    assert scans == []  # nothing half-written: the cluster's result was never committed
    with Store(db_url) as store, store.sessions() as s:
        assert s.scalars(select(Lease)).all() == []  # a restart need not wait for it
    assert f"scan run(s) {runs[0].id} aborted after the grace period" in serve.text()


def test_refuses_a_public_address_without_a_token(harness: Harness, sqlite_url: str,
                                                  tmp_path: Path) -> None:
    harness.cluster("c1", ["closed"])
    cfg = config(harness)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FELIXSCAN_WEB_TOKEN")}
    proc = subprocess.run([sys.executable, "-m", "scanner", "serve", "--config", str(cfg),
                           "--db", sqlite_url, "--listen", "0.0.0.0:0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert "refusing to serve on 0.0.0.0:0 without access control" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "scanner", "serve", "--db", sqlite_url],
                          cwd=ROOT, env={**env, "FELIXSCAN_WEB_TOKEN": "short"},
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert "FELIXSCAN_WEB_TOKEN: the token must be at least 16 characters" in proc.stderr
    assert not list(Path(sqlite_url.removeprefix("sqlite:///")).parent.glob("*.db-wal"))


def test_serve_help_names_the_token() -> None:
    proc = subprocess.run([sys.executable, "-m", "scanner", "serve", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=True)
    assert "FELIXSCAN_WEB_TOKEN" in proc.stdout and "--listen HOST:PORT" in proc.stdout
