"""End to end in Debian's headless Chromium (apt package `chromium`): the overview loads, its
cluster link leads to the cluster page, and both are saved as screenshots.

Skipped only when Chromium is not installed. The screenshots stay in the test's tmp directory
(`--basetemp DIR` keeps them) for a person to look at.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from reports.cache import ReportCache
from scanner.db.store import Store
from scanner.web.app import Auth, create_app
from tests.web.test_web import TOKEN, fill, served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")


def chromium(tmp_path: Path, *args: str) -> str:
    assert CHROMIUM is not None
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1280,1500", *args],
        capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_overview_then_cluster_page_in_chromium(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'felixscan.db'}") as store:
        fill(store)
        cache = ReportCache(tmp_path / "cache")
        # Chromium cannot send a Bearer header from its command line: the token-less mode,
        # which serve allows on loopback only, stands in for a signed-in auditor.
        app = create_app(store=store, auth=Auth(), reports=cache,
                         clusters=["prod-east", "prod-west"])
        with served(app) as base:
            dom = chromium(tmp_path, "--dump-dom", f"{base}/")
            assert "Fleet compliance" in dom
            assert "<script" not in dom.replace('&lt;script', '')
            links = re.findall(r'<a class="cluster" href="([^"]+)">([^<]+)</a>', dom)
            href = dict((name, link) for link, name in links)["prod-west"]
            overview = tmp_path / "overview.png"
            chromium(tmp_path, f"--screenshot={overview}", f"{base}/")
            page = tmp_path / "cluster-prod-west.png"
            chromium(tmp_path, f"--screenshot={page}", f"{base}{href}")
            cluster_dom = chromium(tmp_path, "--dump-dom", f"{base}{href}")
        cache.close()
    assert "Nodes not passing (2)" in cluster_dom
    assert "Compliance ratio and failing/unknown nodes per day" in cluster_dom
    for shot in (overview, page):
        assert png_size(shot) == (1280, 1500)
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    assert TOKEN not in dom


def test_control_columns_render_in_chromium(tmp_path: Path) -> None:
    """The overview's column per control and a cluster page's control sections, as a browser
    lays them out (screenshots kept in the test's tmp directory)."""
    from datetime import timedelta

    from tests.reports.controls_data import lean, tri
    from tests.web.test_web import NOW

    with Store(f"sqlite:///{tmp_path / 'felixscan.db'}") as store:
        fill(store)
        for back in (2, 1, 0):
            at = NOW - timedelta(days=back, minutes=30)
            run = store.begin_run(trigger="schedule", started_at=at)
            for result in (tri(at), lean(at)):
                store.save_cluster(run, result)
            store.finish_run(run, finished_at=at + timedelta(seconds=5))
        cache = ReportCache(tmp_path / "cache")
        app = create_app(store=store, auth=Auth(), reports=cache, clusters=["tri"])
        with served(app) as base:
            dom = chromium(tmp_path, "--dump-dom", f"{base}/")
            overview = tmp_path / "overview-controls.png"
            chromium(tmp_path, f"--screenshot={overview}", f"{base}/")
            page = tmp_path / "cluster-tri-controls.png"
            chromium(tmp_path, f"--screenshot={page}", f"{base}/clusters/tri")
            cluster_dom = chromium(tmp_path, "--dump-dom", f"{base}/clusters/tri")
        cache.close()
    headings = re.findall(r'<th class="control"[^>]*>([^<]+)<br>', dom)
    assert headings == ["Felix", "Typha", "kube-controllers"]
    assert "Typha targets" not in dom and "calico-typha-aaa" in cluster_dom
    assert cluster_dom.count('<svg xmlns="http://www.w3.org/2000/svg" class="spark"') == 3
    for shot in (overview, page):
        assert png_size(shot) == (1280, 1500)
        assert shot.stat().st_size > 20_000
