"""`felixscan serve` under 50 concurrent report downloads, through real HTTP against a real
`felixscan serve` process with a token.

Fifty requests start at once: PDF and HTML, the fleet and single clusters, the same period many
times over and different periods. Every answer must be the right report (200, a PDF that
`felixscan report verify` accepts, or the HTML report), each distinct report rendered exactly
once (the rest come from the cache), the serve process's RSS bounded, `/healthz` answering
promptly all through the burst, and nothing logged as an error.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import yaml

from reports.cache import ReportCache
from scanner.db.store import Store
from tests.app.test_serve_process import ROOT, TOKEN, Serve
from tests.web.test_web import make_result

NOW = datetime.now(UTC).replace(microsecond=0)
TODAY = NOW.date()
CLUSTERS = ("prod-east", "prod-west", "stage-eu")
DAYS = 30
BURST = 50


def fill(url: str) -> None:
    """30 daily scans of three 12-node clusters; prod-west has a Felix port open some days."""
    with Store(url) as store:
        store.upgrade()
        for back in range(DAYS, 0, -1):
            when = NOW - timedelta(days=back)
            for c, name in enumerate(CLUSTERS):
                nodes = [(f"{name}-node-{i:02d}",
                          "felix" if name == "prod-west" and back % 7 == i else "closed")
                         for i in range(12)]
                result = make_result(name, when + timedelta(minutes=c), nodes)
                run = store.begin_run(trigger="schedule", started_at=result.started_at)
                store.save_cluster(run, result)
                store.finish_run(run, finished_at=result.finished_at)


def burst_paths() -> list[str]:
    """50 downloads of 7 distinct reports: most asked for many times at once, some once."""
    week, month = TODAY - timedelta(days=6), TODAY - timedelta(days=DAYS - 1)
    distinct = [
        f"/reports/fleet/{month}_{TODAY}.pdf",  # the popular one
        f"/reports/fleet/{month}_{TODAY}.html",
        f"/reports/fleet/{week}_{TODAY}.pdf",
        f"/reports/fleet/{week}_{TODAY}.html",
        f"/reports/cluster/prod-west/{month}_{TODAY}.pdf",
        f"/reports/cluster/prod-west/{week}_{TODAY}.html",
        f"/reports/cluster/stage-eu/{month}_{TODAY}.html",
    ]
    weights = [14, 10, 6, 8, 6, 5, 1]
    assert sum(weights) == BURST
    # Round robin, so the same report is asked for by requests spread over the burst.
    left = dict(zip(distinct, weights, strict=True))
    paths: list[str] = []
    while len(paths) < BURST:
        for p in distinct:
            if left[p]:
                paths.append(p)
                left[p] -= 1
    return paths


@dataclass
class Answer:
    path: str
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def get(host: str, port: int, path: str, timeout: float = 120) -> Answer:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    t = time.perf_counter()
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        body = r.read()
        return Answer(path, r.status, {k.lower(): v for k, v in r.getheaders()}, body,
                      time.perf_counter() - t)
    finally:
        conn.close()


class Sampler(threading.Thread):
    """RSS of the serve process (and of its PDF children, apart) every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.children_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                kids = 0
                for child in self.proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):  # a child that just ended
                        kids += child.memory_info().rss
                self.children_peak = max(self.children_peak, kids)
            except psutil.Error:
                return


class HealthProbe(threading.Thread):
    """GET /healthz every 50 ms on a new connection, timing each answer."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                answer = get(self.host, self.port, "/healthz", timeout=30)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if answer.status != 200 or answer.body != b'{"status": "ok"}':
                self.failures.append(f"{answer.status} {answer.body[:100]!r}")
            self.latencies.append(answer.seconds)



def mb(n: float) -> float:
    return n / 2**20


@dataclass
class Burst:
    answers: list[Answer]
    wall: float
    rss_before: int
    rss_peak: int
    rss_after: int
    children_peak: int
    health: list[float]
    serve: Serve
    cache: Path

    def summary(self) -> str:
        latencies = sorted(a.seconds for a in self.answers)
        p95 = statistics.quantiles(latencies, n=20)[18]
        return (f"{BURST} downloads in {self.wall:.1f} s: median "
                f"{statistics.median(latencies):.2f} s, p95 {p95:.2f} s, max "
                f"{latencies[-1]:.2f} s; serve RSS before {mb(self.rss_before):.0f} MB, peak "
                f"{mb(self.rss_peak):.0f} MB, after {mb(self.rss_after):.0f} MB; PDF children "
                f"peak {mb(self.children_peak):.0f} MB; /healthz x{len(self.health)} median "
                f"{statistics.median(self.health) * 1000:.1f} ms, max "
                f"{max(self.health) * 1000:.1f} ms")


def burst(tmp_path: Path, serves: list[Serve], *, cache_entries: int) -> Burst:
    """A serve of the filled database, hit by the 50 downloads at once while /healthz is
    polled and the process's memory sampled; the serve is stopped (SIGTERM) afterwards."""
    db = f"sqlite:///{tmp_path / 'felixscan.db'}"
    fill(db)
    cache = tmp_path / "cache"
    config = tmp_path / "felixscan.yaml"
    # Clusters without a schedule: this serve runs no scans, the data (and so every report's
    # cache key) stays the same through the burst.
    config.write_text(yaml.safe_dump({
        "clusters": [{"name": n, "in_cluster": True} for n in CLUSTERS],
        "serve": {"report_cache_dir": str(cache), "report_cache_entries": cache_entries}}))
    serves.append(serve := Serve(tmp_path, config, db, "serve").started())
    host, port = serve.url.removeprefix("http://").rsplit(":", 1)
    assert get(host, int(port), "/").status == 200  # templates and queries warmed up
    rss_before = psutil.Process(serve.proc.pid).memory_info().rss

    sampler = Sampler(serve.proc.pid)
    health = HealthProbe(host, int(port))
    paths = burst_paths()
    answers: list[Answer | BaseException] = [RuntimeError("not run")] * BURST
    start = threading.Barrier(BURST + 1)

    def download(i: int) -> None:
        start.wait()
        try:
            answers[i] = get(host, int(port), paths[i])
        except BaseException as exc:  # reported below with the others
            answers[i] = exc

    threads = [threading.Thread(target=download, args=(i,), daemon=True) for i in range(BURST)]
    sampler.start()
    for t in threads:
        t.start()
    health.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join(180)
    wall = time.perf_counter() - t0
    health.stop.set()
    health.join()
    time.sleep(0.5)
    sampler.stop.set()
    sampler.join()
    rss_after = psutil.Process(serve.proc.pid).memory_info().rss
    # Every report file opened for a download was closed (deleted ones included).
    open_files = []
    for fd in Path(f"/proc/{serve.proc.pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # a socket closed meanwhile
            open_files.append(os.readlink(fd))
    assert [f for f in open_files if f.startswith(str(cache))] == []
    assert serve.stop() == 0

    bad = [a if not isinstance(a, Answer) else (a.path, a.status, a.body[:300])
           for a in answers if not isinstance(a, Answer) or a.status != 200]
    assert bad == []
    assert health.failures == []
    assert len(health.latencies) >= 10
    log = serve.text()
    for word in ("ERROR", "Traceback", "Exception", "exception"):
        assert word not in log, log
    return Burst([a for a in answers if isinstance(a, Answer)], wall, rss_before,
                 sampler.peak, rss_after, sampler.children_peak, health.latencies, serve, cache)


def check_report(answer: Answer, tmp_path: Path) -> None:
    """A PDF that `felixscan report verify` accepts, or the HTML report of the right clusters."""
    digest = answer.headers["x-felixscan-report-sha256"]
    if answer.path.endswith(".pdf"):
        assert answer.headers["content-type"] == "application/pdf"
        assert answer.body.startswith(b"%PDF-") and b"%%EOF" in answer.body[-1024:]
        out = tmp_path / f"{digest}.pdf"
        out.write_bytes(answer.body)
        verify = subprocess.run([sys.executable, "-m", "scanner", "report", "verify", str(out)],
                                cwd=ROOT, capture_output=True, text=True, timeout=60,
                                check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f"{out}: OK: " in verify.stdout
        assert f"recorded SHA-256   {digest}" in verify.stdout
    else:
        assert answer.headers["content-type"] == "text/html; charset=utf-8"
        assert "sandbox" in answer.headers["content-security-policy"]
        text = answer.body.decode("utf-8")
        assert text.lstrip().lower().startswith("<!doctype html>")
        assert text.rstrip().endswith("</html>")
        assert digest in text
        names = [n for n in CLUSTERS if f"/{n}/" in answer.path] or list(CLUSTERS)
        assert all(n in text for n in names), answer.path
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert answer.headers["content-disposition"].startswith('attachment; filename="felixscan-')


@pytest.mark.slow
def test_fifty_concurrent_report_downloads(tmp_path: Path, serves: list[Serve]) -> None:
    """The default cache: each of the 7 distinct reports rendered once, the other 43
    downloads served from the cache, everyone asking for a report getting the same bytes."""
    b = burst(tmp_path, serves, cache_entries=64)
    print(f"\n{b.summary()}")
    by_path: dict[str, list[Answer]] = {}
    for a in b.answers:
        by_path.setdefault(a.path, []).append(a)
    assert len(by_path) == 7
    for path, same in by_path.items():
        assert len({a.body for a in same}) == 1, path
        check_report(same[0], tmp_path)
    # Rendered once each: one miss per report, one "rendered" line each, one file each.
    misses = Counter(a.path for a in b.answers if a.headers["x-felixscan-cache"] == "miss")
    assert misses == Counter(set(by_path)), misses
    log = b.serve.text()
    assert log.count("rendered pdf report") == 3 and log.count("rendered html report") == 4
    assert len(list(b.cache.glob("*.pdf"))) == 3 and len(list(b.cache.glob("*.html"))) == 4
    assert list(b.cache.glob(".render-*")) == []
    # Memory and liveness during the burst.
    assert b.rss_peak - b.rss_before < 100 * 2**20
    assert max(b.health) < 1.0, sorted(b.health)[-5:]


@pytest.mark.slow
def test_fifty_concurrent_downloads_through_a_two_report_cache(tmp_path: Path,
                                                              serves: list[Serve]) -> None:
    """`report_cache_entries: 2` with 7 reports asked for at once: reports are evicted while
    other requests are about to send them. Every download still gets a whole, valid report
    (was: 10 of 50 answered 500, FileResponse finding its file evicted)."""
    b = burst(tmp_path, serves, cache_entries=2)
    renders = b.serve.text().count("rendered ")
    print(f"\n{b.summary()}; {renders} renders")
    seen: set[bytes] = set()
    for a in b.answers:
        if a.body not in seen:
            seen.add(a.body)
            check_report(a, tmp_path)
    assert renders >= 7
    assert renders == sum(a.headers["x-felixscan-cache"] == "miss" for a in b.answers)
    assert len([p for p in b.cache.iterdir() if not p.name.startswith(".")]) <= 2
    assert max(b.health) < 1.0, sorted(b.health)[-5:]


def test_thirty_distinct_reports_rendered_at_once(tmp_path: Path) -> None:
    """Renders of different reports finishing together, in one ReportCache (no HTTP): each
    render lists the cache directory to evict while the others rename their files into it.
    Was: 20 of 90 renders (three such rounds) failed with FileNotFoundError, a 500 for the
    download, the listing's stat finding a file another render had just renamed."""
    db = f"sqlite:///{tmp_path / 'felixscan.db'}"
    fill(db)
    cache = ReportCache(tmp_path / "cache")
    failures: list[BaseException] = []
    sizes: list[int] = []

    def render(i: int) -> None:
        try:
            report = cache.get(store, clusters=[CLUSTERS[i % 3]],
                               since=TODAY - timedelta(days=i // 3 + 1), until=TODAY,
                               fmt="html")
            with report.file:
                sizes.append(len(report.file.read()))
        except BaseException as exc:
            failures.append(exc)

    with Store(db) as store:
        threads = [threading.Thread(target=render, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    cache.close()
    assert failures == []
    assert len(sizes) == 30 and min(sizes) > 1000
    assert len(list((tmp_path / "cache").glob("*.html"))) == 30
