"""The web page and JSON API through real HTTP: uvicorn on 127.0.0.1, a random port."""

from __future__ import annotations

import base64
import http.client
import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import uvicorn

from reports import verify_pdf
from reports.cache import ReportCache
from scanner.app.serve import bind
from scanner.core.evaluate import evaluate, failed_cluster
from scanner.core.records import (
    ClusterResult,
    ClusterSnapshot,
    ConfigFile,
    Declared,
    EnvVar,
    Node,
    Pod,
    ProbeResult,
    Rollout,
)
from scanner.db.models import RemediationAction
from scanner.db.runs import record_skipped
from scanner.db.store import Store
from scanner.web.app import Auth, create_app, openapi
from scanner.web.state import JobInfo

TOKEN = "web-test-token-0123456789"
NOW = datetime.now(UTC).replace(microsecond=0)
TODAY = NOW.date()
HOSTILE_CLUSTER = '<script>alert("c")</script>'
HOSTILE_NODE = "<img src=x onerror=alert(1)>"
DISABLED = Declared(enabled=False, source="env FELIX_PROMETHEUSMETRICSENABLED", port=9091,
                    port_source="built-in default", raw="false")


def make_result(cluster: str, when: datetime, nodes: Sequence[tuple[str, str]]) -> ClusterResult:
    """A scan result evaluated by the real rules; node states: closed, felix, filtered
    (on a NotReady node: unknown)."""
    snap_nodes, pods, probes = [], [], []
    for i, (name, state) in enumerate(nodes):
        address = f"10.0.{i // 250}.{i % 250 + 1}"
        ready = state != "filtered"  # a NotReady node that drops the SYN proves nothing
        snap_nodes.append(Node(name=name, addresses=(("InternalIP", address),), ready=ready))
        pods.append(Pod(f"calico-node-{i}", name, "Running", "rev1", ready, owner="calico-node"))
        if state == "felix":
            probes.append(ProbeResult(name, address, 9091, "open", "http", True, 200,
                                      felix_host=name))
        elif state == "filtered":
            probes.append(ProbeResult(name, address, 9091, "filtered", error="timed out"))
        else:
            probes.append(ProbeResult(name, address, 9091, "closed"))
    n = len(nodes)
    snapshot = ClusterSnapshot(
        cluster=cluster, install="manifest", namespace="kube-system", daemonset="calico-node",
        container="calico-node", image="quay.io/calico/node:v3.29.7",
        env=(EnvVar("FELIX_PROMETHEUSMETRICSENABLED", "false", "literal"),),
        config_file=ConfigFile(True, {}, "image default"), felix_configs=(), felix_crd=True,
        installation=None, rollout=Rollout(1, 1, n, n, n, n, "rev1", "RollingUpdate", "1"),
        pods=tuple(pods), nodes=tuple(snap_nodes), collected_at=when)
    return evaluate(snapshot, {name: DISABLED for name, _ in nodes}, probes,
                    cluster_declared=DISABLED, started_at=when,
                    finished_at=when + timedelta(seconds=3))


def fill(store: Store) -> None:
    store.upgrade()

    def save(result: ClusterResult) -> None:
        run = store.begin_run(trigger="schedule", started_at=result.started_at)
        store.save_cluster(run, result)
        store.finish_run(run, finished_at=result.finished_at)

    for back in (3, 2, 1):
        when = NOW - timedelta(days=back)
        save(make_result("prod-east", when, [(f"east-{i}", "closed") for i in range(3)]))
        west = [("west-1", "closed"), ("west-2", "felix" if back == 1 else "closed"),
                ("west-3", "filtered" if back == 1 else "closed")]
        save(make_result("prod-west", when, west))
    save(make_result("evil-nodes", NOW - timedelta(hours=5),
                     [(HOSTILE_NODE, "felix"), ("fine", "closed")]))
    save(failed_cluster(HOSTILE_CLUSTER, "API said <b>no</b>", started_at=NOW - timedelta(hours=4),
                        finished_at=NOW - timedelta(hours=4)))
    record_skipped(store, trigger="schedule", at=NOW - timedelta(hours=3))
    with store.session() as s:
        s.add(RemediationAction(
            cluster="prod-west", started_at=NOW - timedelta(hours=2),
            finished_at=NOW - timedelta(hours=1), trigger="cli:ops@bastion", install="manifest",
            mode="apply", outcome="succeeded", message="<i>patched</i> calico-node env",
            objects=[{"kind": "DaemonSet", "name": "calico-node"}]))


class FakeSchedule:
    def __init__(self) -> None:
        self.is_running = True

    def running(self) -> bool:
        return self.is_running

    def jobs(self) -> Mapping[str, JobInfo]:
        return {"prod-east": JobInfo(cluster="prod-east", schedule="0 2 * * *", timezone="UTC",
                                     next_run=NOW + timedelta(hours=6))}


@contextmanager
def served(app: Any) -> Iterator[str]:
    """The app on 127.0.0.1 with a random port, in a thread."""
    sock = bind("127.0.0.1:0")
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off",
                                          server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.01)
            assert thread.is_alive()
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@dataclass
class Resp:
    status: int
    headers: dict[str, str]  # the last line of each header
    body: bytes
    lines: list[tuple[str, str]] = field(default_factory=list)  # every header line

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json")
        return json.loads(self.body)


def fetch(base: str, path: str, *, token: str | None = TOKEN, method: str = "GET",
          headers: Mapping[str, str] | None = None, body: bytes | None = None) -> Resp:
    """One request with the path sent exactly as given (no client-side normalising)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        h = dict(headers or {})
        if token is not None:
            h.setdefault("Authorization", f"Bearer {token}")
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read(),
                    [(k.lower(), v) for k, v in r.getheaders()])
    finally:
        conn.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Store, FakeSchedule]]:
    tmp = tmp_path_factory.mktemp("web")
    store = Store(f"sqlite:///{tmp / 'felixscan.db'}")
    fill(store)
    schedule = FakeSchedule()
    cache = ReportCache(tmp / "cache", entries=8)
    app = create_app(store=store, auth=Auth(token=TOKEN), reports=cache, schedule=schedule,
                     clusters=["prod-east", "prod-west", "never-scanned"])
    with served(app) as base:
        yield base, store, schedule
    cache.close()
    store.close()


@pytest.fixture
def base(site: tuple[str, Store, FakeSchedule]) -> str:
    return site[0]


PROTECTED = ["/", "/clusters/prod-west", "/clusters/nope", "/download?since=2026-01-01",
             f"/reports/fleet/{TODAY}_{TODAY}.html", "/api/clusters", "/api/clusters/prod-west",
             "/api/scans", "/api/runs", "/api/trend", "/api/schedule", "/api/openapi.json",
             "/no/such/page", "/reports/cluster/prod-west/x.pdf"]


@pytest.mark.parametrize("path", PROTECTED)
def test_every_page_needs_the_token(base: str, path: str) -> None:
    for token in (None, "wrong-token-wrong-token"):
        r = fetch(base, path, token=token)
        assert r.status == 401
        assert [v for k, v in r.lines if k == "www-authenticate"] == [
            'Bearer realm="felixscan"', 'Basic realm="felixscan"']  # Basic: browsers prompt
        assert r.headers["cache-control"] == "no-store"
        if path.startswith("/api/"):
            assert r.json()["error"] == "unauthorized"
        else:
            assert '<form method="post" action="/login">' in r.text
            assert "prod-west" not in r.text.split("name=\"next\"")[0]  # no data leaks
    basic = base64.b64encode(f"auditor:{TOKEN}".encode()).decode()
    assert fetch(base, path, headers={"Authorization": f"Basic {basic}"}).status != 401


def test_health_needs_no_token(site: tuple[str, Store, FakeSchedule]) -> None:
    base, _, schedule = site
    assert fetch(base, "/healthz", token=None).json() == {"status": "ok"}
    ready = fetch(base, "/readyz", token=None)
    assert ready.status == 200
    assert ready.json() == {"status": "ready", "database": "ok", "scheduler": "running"}
    schedule.is_running = False
    try:
        stopped = fetch(base, "/readyz", token=None)
        assert stopped.status == 503
        assert stopped.json()["scheduler"] == "stopped"
    finally:
        schedule.is_running = True


def test_security_headers(base: str) -> None:
    r = fetch(base, "/")
    assert r.status == 200
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "script-src" not in csp  # no script at all
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"
    assert "server" not in r.headers
    assert "<script" not in r.text and " style=" not in r.text and "<style" not in r.text


def test_overview_shows_each_clusters_latest_state(base: str) -> None:
    html = fetch(base, "/").text
    rows = {m[1]: m[0] for m in re.findall(r'(<tr>\s*<td><a class="cluster" href="([^"]+)">'
                                           r'.*?</tr>)', html, re.S)}
    west = rows["/clusters/prod-west"]
    assert "non-compliant" in west
    # failing, unknown, nodes; last scan time; the 90-day sparkline
    assert re.search(r'class="n bad">1</td>\s*<td class="n warn">1</td>\s*<td class="n">3</td>',
                     west)
    assert (NOW - timedelta(days=1)).strftime("%Y-%m-%d %H:%M UTC") in west
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="spark"' in west
    assert "3 days scanned, 1 with failing or unknown nodes, lowest compliance 33.3 %" in west
    east = rows["/clusters/prod-east"]
    assert ">compliant<" in east
    assert (NOW + timedelta(hours=6)).strftime("%Y-%m-%d %H:%M UTC") in east  # next scan
    assert "never scanned" in rows["/clusters/never-scanned"]
    assert ">scan error<" in rows["/clusters/" + quote(HOSTILE_CLUSTER, safe="")]
    assert '<span class="num">5</span> clusters' in html
    assert '<form method="get" action="/download"' in html


def test_cluster_page(base: str) -> None:
    r = fetch(base, "/clusters/prod-west")
    assert r.status == 200
    html = r.text
    assert "<h1>prod-west <span class=\"badge non_compliant\">non-compliant</span></h1>" in html
    assert "Compliance ratio and failing/unknown nodes per day" in html  # the history chart
    assert "Nodes not passing (2)" in html
    assert re.search(r"west-2</td><td><span class=\"badge fail\">fail", html)
    assert re.search(r"west-3</td><td><span class=\"badge unknown\">unknown", html)
    assert "FELIX-PORT-REACHABLE" in html
    assert html.count("<td>schedule</td>") == 3  # recent scans
    assert "&lt;i&gt;patched&lt;/i&gt; calico-node env" in html  # remediation, escaped
    assert "cli:ops@bastion" in html and "succeeded" in html
    assert 'name="cluster" value="prod-west"' in html  # download of this cluster
    assert fetch(base, "/clusters/prod-west?days=365").status == 200
    assert fetch(base, "/clusters/prod-west?days=0").status == 400
    missing = fetch(base, "/clusters/never-scanned")
    assert missing.status == 404 and "configured but has no scan yet" in missing.text
    assert fetch(base, "/clusters/nope").status == 404


def test_hostile_names_are_escaped(base: str) -> None:
    overview = fetch(base, "/").text
    assert HOSTILE_CLUSTER not in overview
    assert "&lt;script&gt;alert(&#34;c&#34;)&lt;/script&gt;" in overview
    href = "/clusters/" + quote(HOSTILE_CLUSTER, safe="")
    assert f'href="{href}"' in overview
    page = fetch(base, href)
    assert page.status == 200
    assert HOSTILE_CLUSTER not in page.text and "<b>no</b>" not in page.text
    assert "API said &lt;b&gt;no&lt;/b&gt;" in page.text
    # No download form for a name that cannot be a file name; the fleet report has it.
    assert "cannot be used in a download name" in page.text
    nodes = fetch(base, "/clusters/evil-nodes").text
    assert HOSTILE_NODE not in nodes
    assert "&lt;img src=x onerror=alert(1)&gt;" in nodes
    api = fetch(base, "/api/clusters/" + quote(HOSTILE_CLUSTER, safe="")).json()
    assert api["name"] == HOSTILE_CLUSTER  # JSON carries the real name, served as JSON
    assert api["latest"]["error"] == "API said <b>no</b>"


def test_download_pdf_and_html_are_cached_by_data_hash(base: str, tmp_path: Path) -> None:
    since = TODAY - timedelta(days=7)
    r = fetch(base, f"/download?cluster=prod-west&since={since}&until={TODAY}&format=pdf")
    assert r.status == 303
    assert r.headers["location"] == f"/reports/cluster/prod-west/{since}_{TODAY}.pdf"
    first = fetch(base, r.headers["location"])
    assert first.status == 200
    assert first.headers["content-type"] == "application/pdf"
    assert first.headers["content-disposition"] == (
        f'attachment; filename="felixscan-prod-west-{since}-{TODAY}.pdf"')
    assert first.headers["x-felixscan-cache"] == "miss"
    (tmp_path / "r.pdf").write_bytes(first.body)
    check = verify_pdf(tmp_path / "r.pdf")
    assert check.matched and check.expected == first.headers["x-felixscan-report-sha256"]
    again = fetch(base, r.headers["location"])
    assert again.headers["x-felixscan-cache"] == "hit"
    assert again.body == first.body

    fleet = fetch(base, f"/download?since={since}&until={TODAY}&format=html")
    assert fleet.headers["location"] == f"/reports/fleet/{since}_{TODAY}.html"
    html = fetch(base, fleet.headers["location"])
    assert html.status == 200 and html.headers["content-type"].startswith("text/html")
    assert "sandbox" in html.headers["content-security-policy"]
    assert "prod-east" in html.text and "prod-west" in html.text
    assert HOSTILE_CLUSTER not in html.text  # the report escapes too


def test_download_errors(base: str) -> None:
    assert fetch(base, f"/download?since={TODAY}&until=2020-01-01").status == 400
    assert fetch(base, f"/download?since=yesterday&until={TODAY}").status == 400
    assert fetch(base, f"/download?since={TODAY}&until={TODAY}&format=docx").status == 400
    far = TODAY + timedelta(days=30)
    assert fetch(base, f"/download?since={TODAY}&until={far}").status == 400
    empty = fetch(base, "/reports/fleet/2001-01-01_2001-01-31.pdf")
    assert empty.status == 404 and "no scans" in empty.text
    assert fetch(base, f"/reports/cluster/never-scanned/{TODAY}_{TODAY}.pdf").status == 404


@pytest.mark.parametrize("path", [
    "/reports/fleet/../../../etc/passwd",
    "/reports/fleet/..%2F..%2F..%2Fetc%2Fpasswd",
    "/reports/fleet/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/reports/cluster/..%2F..%2Fetc/2026-01-01_2026-01-02.pdf",
    "/reports/cluster/../../etc/passwd",
    "/reports/cluster/prod-west/..%5C..%5Cetc%5Cpasswd",
    "/reports/cluster/prod-west/2026-01-01_2026-01-02.pdf%00.html",
    "/reports/cluster/prod-west/2026-01-01_2026-01-02.pdf/../../x",
    "/reports/cluster/.hidden/2026-01-01_2026-01-02.pdf",
    "/reports/fleet/%2Fetc%2Fpasswd",
    "/reports/fleet//etc/passwd",
    "/assets/../../../../etc/passwd",
    "/download?cluster=../../etc&since=2026-01-01&until=2026-01-02",
])
def test_path_traversal_is_refused(base: str, path: str) -> None:
    r = fetch(base, path)
    assert r.status in (400, 404)
    assert b"root:" not in r.body


def test_cached_files_are_not_reachable_by_their_names(base: str,
                                                       site: tuple[str, Store, FakeSchedule]
                                                       ) -> None:
    since = TODAY - timedelta(days=2)
    r = fetch(base, f"/reports/fleet/{since}_{TODAY}.html")
    assert r.status == 200
    digest = r.headers["x-felixscan-report-sha256"]
    assert fetch(base, f"/reports/fleet/{digest}.html").status == 404


def test_login_form_sets_a_session_cookie(base: str) -> None:
    form = "application/x-www-form-urlencoded"
    bad = fetch(base, "/login", token=None, method="POST", headers={"Content-Type": form},
                body=b"token=nope&next=/clusters/prod-west")
    assert bad.status == 401 and "That token is not valid." in bad.text
    ok = fetch(base, "/login", token=None, method="POST", headers={"Content-Type": form},
               body=f"token={TOKEN}&next=/clusters/prod-west".encode())
    assert ok.status == 303 and ok.headers["location"] == "/clusters/prod-west"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=43200" in cookie
    assert TOKEN not in cookie
    session = cookie.split(";", 1)[0]
    page = fetch(base, "/clusters/prod-west", token=None, headers={"Cookie": session})
    assert page.status == 200 and "Sign out" in page.text
    forged = session[:-4] + "0000"
    assert fetch(base, "/", token=None, headers={"Cookie": forged}).status == 401
    # `next` never leaves the site.
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        r = fetch(base, "/login", token=None, method="POST", headers={"Content-Type": form},
                  body=f"token={TOKEN}&next={quote(target)}".encode())
        assert r.headers["location"] == "/"
    out = fetch(base, "/logout", token=None, method="POST", headers={"Cookie": session})
    assert out.status == 303 and 'felixscan_session="";' in out.headers["set-cookie"]


def test_api(site: tuple[str, Store, FakeSchedule]) -> None:
    base = site[0]
    clusters = {c["name"]: c for c in fetch(base, "/api/clusters").json()}
    assert set(clusters) == {"prod-east", "prod-west", "never-scanned", "evil-nodes",
                             HOSTILE_CLUSTER}
    west = clusters["prod-west"]["latest"]
    assert (west["status"], west["nodes"], west["failing"], west["unknown"]) == (
        "non_compliant", 3, 1, 1)
    assert clusters["never-scanned"]["latest"] is None
    assert clusters["prod-east"]["next_run"] == (NOW + timedelta(hours=6)).isoformat()

    detail = fetch(base, "/api/clusters/prod-west").json()
    assert detail["nodes_not_passing"]["total"] == 2
    assert {n["node"] for n in detail["nodes_not_passing"]["items"]} == {"west-2", "west-3"}
    assert detail["remediation_actions"][0]["outcome"] == "succeeded"
    assert len(detail["scans"]) == 3

    scans = fetch(base, "/api/scans?cluster=prod-east&limit=2").json()
    assert [s["cluster"] for s in scans] == ["prod-east", "prod-east"]
    older = fetch(base, f"/api/scans?cluster=prod-east&before={scans[-1]['cluster_scan_id']}")
    assert len(older.json()) == 1
    runs = fetch(base, "/api/runs?limit=500").json()
    assert [r["status"] for r in runs].count("skipped") == 1

    trend = fetch(base, "/api/trend?cluster=prod-west&days=7").json()
    assert [t["day"] for t in trend] == [str((NOW - timedelta(days=d)).date())
                                         for d in (3, 2, 1)]
    assert trend[-1] == {"cluster": "prod-west", "day": str(TODAY - timedelta(days=1)),
                         "nodes": 3, "failing": 1, "unknown": 1, "ratio": 0.333333,
                         "status": "non_compliant", "scans": 1, "waived": 0}
    assert fetch(base, "/api/schedule").json()["jobs"][0]["cluster"] == "prod-east"
    for bad in ("/api/scans?limit=0", "/api/scans?limit=x", "/api/trend?days=99999",
                "/api/runs?before=-1"):
        r = fetch(base, bad)
        assert r.status == 400 and "error" in r.json()
    assert fetch(base, "/api/clusters/nope").status == 404
    assert fetch(base, "/api/nope").json() == {"error": "Not Found"}


def test_openapi_describes_every_api_route(site: tuple[str, Store, FakeSchedule],
                                           tmp_path: Path) -> None:
    doc = fetch(site[0], "/api/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert doc == json.loads(json.dumps(openapi()))
    app = create_app(store=site[1], auth=Auth(token=TOKEN), reports=ReportCache(tmp_path))
    routes = {r.path.replace(":path", "") for r in app.app.routes  # type: ignore[attr-defined]
              if r.path.startswith("/api/") or r.path in ("/healthz", "/readyz", "/metrics")}
    assert routes == set(doc["paths"])


def test_open_access_only_for_loopback_hosts(site: tuple[str, Store, FakeSchedule],
                                             tmp_path: Path) -> None:
    app = create_app(store=site[1], auth=Auth(), reports=ReportCache(tmp_path / "c"))
    with served(app) as base:
        r = fetch(base, "/", token=None)
        assert r.status == 200 and "open access" in r.text
        # A page from elsewhere reaching us through DNS rebinding names its own host.
        rebound = fetch(base, "/api/clusters", token=None, headers={"Host": "evil.example"})
        assert rebound.status == 421
        assert fetch(base, "/", token=None, headers={"Host": "localhost:8080"}).status == 200


def test_token_file_is_reread_when_rotated(site: tuple[str, Store, FakeSchedule],
                                           tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token-0123456789\n")
    auth = Auth.from_environ({"FELIXSCAN_WEB_TOKEN_FILE": str(token_file)})
    app = create_app(store=site[1], auth=auth, reports=ReportCache(tmp_path / "c"))
    with served(app) as base:
        assert fetch(base, "/api/runs", token="first-token-0123456789").status == 200
        token_file.write_text("second-token-0123456789")
        assert fetch(base, "/api/runs", token="first-token-0123456789").status == 401
        assert fetch(base, "/api/runs", token="second-token-0123456789").status == 200


def test_page_queries_agree_on_both_backends(db_url: str) -> None:
    from scanner.db.queries.pages import cluster_page, fleet_overview, list_runs, list_scans

    with Store(db_url) as store:
        fill(store)
        rows = {o.name: o for o in fleet_overview(store, since=TODAY - timedelta(days=89),
                                                  configured=["later"])}
        assert rows["later"].latest is None
        west = rows["prod-west"]
        assert west.latest is not None
        assert (west.latest.status, west.latest.failing, west.latest.unknown) == (
            "non_compliant", 1, 1)
        assert [p.ratio for p in west.points] == [1.0, 1.0, pytest.approx(1 / 3)]
        page = cluster_page(store, "prod-west", since=TODAY - timedelta(days=29))
        assert page is not None
        assert [(n.node, n.verdict, n.state) for n in page.issues] == [
            ("west-2", "fail", "open"), ("west-3", "unknown", "filtered")]
        assert page.findings[0].severity == "critical"
        assert [a.outcome for a in page.remediation] == ["succeeded"]
        assert len(page.series) == 3 and page.series[-1].failing == 1
        assert cluster_page(store, "nope", since=TODAY) is None
        assert [r.status for r in list_runs(store)].count("skipped") == 1
        assert len(list_scans(store, limit=100)) == 8


def test_report_cache_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    from scanner.core.errors import ConfigError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=r"serve\.report_cache_dir: .* writable by no one else"):
        ReportCache(shared)
