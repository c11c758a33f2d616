"""The HTML pages of `felixscan serve`: the fleet overview, a cluster's page, report downloads
and the login form. Module-level handlers over `WebState` (`scanner.web.state.web(request)`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote

import anyio
import anyio.to_thread
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from reports.outputs import CONTROL_NAMES, CONTROL_PORTS, CONTROL_SHORT
from scanner.core.errors import ReportError, SigningError
from scanner.core.records import CONTROL_IDS, FELIX
from scanner.db.queries.history import ControlEntry
from scanner.db.queries.pages import (
    ClusterOverview,
    LatestScan,
    cluster_page,
    fleet_overview,
    known_clusters,
)
from scanner.db.queries.trends import trend
from scanner.web.auth import SESSION_COOKIE, SESSION_SECONDS, safe_next
from scanner.web.pages import history_chart, render_page, sparkline, stylesheet
from scanner.web.state import (
    MAX_PERIOD_DAYS,
    NAME,
    JobInfo,
    base,
    check_period,
    date_param,
    int_param,
    plausible_name,
    web,
)

OVERVIEW_DAYS = 90
# [0-9], not \d: \d also matches the digits of other scripts.
_DATE = "([0-9]{4}-[0-9]{2}-[0-9]{2})"
_PERIOD_FILE = re.compile(rf"^{_DATE}_{_DATE}\.(pdf|html)$")
# A downloaded HTML report carries its own inline stylesheet; it gets no script, no fetches,
# and a sandbox in case a browser renders it from here instead of saving it.
REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
              "frame-ancestors 'none'; base-uri 'none'; sandbox")


@dataclass(frozen=True, slots=True)
class _ClusterLine:
    name: str
    href: str
    latest: LatestScan | None
    status_text: str
    spark: Any
    job: JobInfo | None
    # (control, its status or None when the latest scan did not check it), per column
    controls: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class _ControlColumn:
    id: str
    short: str  # the heading: Felix, Typha, kube-controllers
    name: str
    port: int  # the endpoint's default port


@dataclass(frozen=True, slots=True)
class _ControlView:
    """One control of a cluster's latest scan, as the cluster page shows it."""

    c: ControlEntry
    name: str
    status_text: str
    declared: str  # enabled / disabled / unknown / not installed
    spark: Any  # the control's own trend over the days shown
    targets: tuple[Any, ...]  # not passing first


CONTROL_COLUMNS = tuple(_ControlColumn(c, CONTROL_SHORT[c], CONTROL_NAMES[c], CONTROL_PORTS[c])
                        for c in CONTROL_IDS)
_VERDICT_ORDER = {"fail": 0, "unknown": 1, "waived": 2, "pass": 3}


def cluster_href(name: str) -> str:
    return "/clusters/" + quote(name, safe="")


def page_error(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    return HTMLResponse(render_page("web_error.html.j2", **base(request), title=title,
                                    message=message), status)


def _download_defaults(now: datetime, cluster: str | None) -> dict[str, Any]:
    today = now.date()
    return {"cluster": cluster, "since": today - timedelta(days=29), "until": today}


def _status_text(status: str) -> str:
    return {"compliant": "compliant", "non_compliant": "non-compliant",
            "error": "scan error"}.get(status, status)


def _control_text(status: str) -> str:
    """A control's status in words: an error means it could not be verified."""
    return {"compliant": "compliant", "non_compliant": "non-compliant",
            "error": "not verified"}.get(status, status)


def _declared_text(latest: LatestScan) -> str:
    if latest.declared_enabled is None:
        return "unknown"
    return "enabled" if latest.declared_enabled else "disabled"


def _control_summary(rows: Sequence[ClusterOverview]) -> list[dict[str, Any]]:
    """Per control: how many clusters' latest scans found it compliant, non-compliant,
    unverified, or did not check it."""
    out = []
    for col in CONTROL_COLUMNS:
        statuses = [r.controls.get(col.id) for r in rows if r.latest is not None]
        out.append({"column": col, "compliant": statuses.count("compliant"),
                    "non_compliant": statuses.count("non_compliant"),
                    "error": statuses.count("error"), "unchecked": statuses.count(None)})
    return out


def _summary(rows: Sequence[ClusterOverview]) -> dict[str, int]:
    latest = [r.latest for r in rows if r.latest is not None]
    return {"clusters": len(rows),
            "compliant": sum(1 for x in latest if x.status == "compliant"),
            "non_compliant": sum(1 for x in latest if x.status == "non_compliant"),
            "error": sum(1 for x in latest if x.status == "error"),
            "never": len(rows) - len(latest),
            "failing": sum(x.failing for x in latest),
            "unknown": sum(x.unknown for x in latest),
            "waived": sum(x.waived for x in latest)}


# --- pages ---------------------------------------------------------------------------------


def overview(request: Request) -> Response:
    st = web(request)
    now = st.clock()
    today = now.date()
    since = today - timedelta(days=OVERVIEW_DAYS - 1)
    overviews = fleet_overview(st.store, since=since, configured=st.configured)
    job_map = st.jobs()
    rows = [_ClusterLine(name=o.name, href=cluster_href(o.name), latest=o.latest,
                 status_text=_status_text(o.latest.status) if o.latest else "",
                 spark=sparkline(o.points, since=since, until=today),
                 job=job_map.get(o.name),
                 controls=tuple((c.id, o.controls.get(c.id)) for c in CONTROL_COLUMNS))
            for o in overviews]
    return HTMLResponse(render_page(
        "web_overview.html.j2", **base(request), rows=rows, now=now, days=OVERVIEW_DAYS,
        summary=_summary(overviews), download=_download_defaults(now, None),
        columns=CONTROL_COLUMNS, control_summary=_control_summary(overviews),
        status_label=_control_text))


def _control_views(store: Any, name: str, controls: Sequence[ControlEntry], *,
                   days: int, since: date, until: date) -> list[_ControlView]:
    """Each control of the latest scan with its own trend over the days shown (one query per
    control, on the day rollups)."""
    out = []
    for c in controls:
        points = trend(store, clusters=[name], days=days, today=until, control=c.control)
        declared = ("not installed" if not c.installed else "unknown"
                    if c.declared_enabled is None else
                    "enabled" if c.declared_enabled else "disabled")
        out.append(_ControlView(
            c=c, name=CONTROL_NAMES.get(c.control, c.control),
            status_text=_control_text(c.status), declared=declared,
            spark=sparkline(points, since=since, until=until,
                            unit="nodes" if c.control == FELIX else "targets"),
            targets=tuple(sorted(c.targets, key=lambda t: (_VERDICT_ORDER.get(t.verdict, 9),
                                                           t.name, t.pod or "")))))
    return out


def cluster(request: Request) -> Response:
    st = web(request)
    name = request.path_params["name"]
    days = int_param(request, "days", 90, 1, MAX_PERIOD_DAYS)
    now = st.clock()
    today = now.date()
    since = today - timedelta(days=days - 1)
    page = cluster_page(st.store, name, since=since) if plausible_name(name) else None
    if page is None:
        if name in st.configured:
            return page_error(request, 404, "Not scanned yet",
                              f"Cluster {name} is configured but has no scan yet.")
        return page_error(request, 404, "Unknown cluster",
                          "The database has no scan of this cluster.")
    return HTMLResponse(render_page(
        "web_cluster.html.j2", **base(request), page=page, now=now, days=days,
        since=since, until=today, status_text=_status_text(page.latest.status),
        declared=_declared_text(page.latest), job=st.jobs().get(name),
        chart=history_chart(page.series, since=since, until=today),
        controls=_control_views(st.store, name, page.controls, days=days, since=since,
                                until=today),
        felix=FELIX,
        download=_download_defaults(now, name) if NAME.match(name) else None))


def download(request: Request) -> Response:
    """The download form's target: redirect to the report's canonical, named URL."""
    q = request.query_params
    since = date_param(q.get("since"), "since")
    until = date_param(q.get("until"), "until")
    fmt = q.get("format", "pdf")
    if fmt not in ("pdf", "html"):
        raise HTTPException(400, "format: expected pdf or html")
    check_period(since, until, web(request).clock().date())
    name = q.get("cluster") or None
    file = f"{since}_{until}.{fmt}"
    if name is None:
        return RedirectResponse(f"/reports/fleet/{file}", 303)
    if not NAME.match(name):
        raise HTTPException(404, "no report of such a cluster")
    return RedirectResponse(f"/reports/cluster/{name}/{file}", 303)


async def report_fleet(request: Request) -> Response:
    return await anyio.to_thread.run_sync(_serve_report, request, None,
                                          request.path_params["file"],
                                          limiter=web(request).downloads)


async def report_cluster(request: Request) -> Response:
    name = request.path_params["name"]
    if not NAME.match(name):
        raise HTTPException(404, "no report of such a cluster")
    return await anyio.to_thread.run_sync(_serve_report, request, name,
                                          request.path_params["file"],
                                          limiter=web(request).downloads)


def _serve_report(request: Request, cluster_name: str | None, file: str) -> Response:
    st = web(request)
    match = _PERIOD_FILE.match(file)
    if match is None:
        raise HTTPException(404, "no such report")
    since = date_param(match[1], "since")
    until = date_param(match[2], "until")
    fmt = match[3]
    now = st.clock()
    check_period(since, until, now.date())
    if cluster_name is not None and cluster_name not in known_clusters(st.store):
        raise HTTPException(404, "no report of such a cluster")
    try:
        report = st.reports.get(st.store, clusters=[cluster_name] if cluster_name else [],
                                since=since, until=until, fmt=fmt, now=now)
    except SigningError:
        # Never an unsigned copy instead; the reason (key, passphrase, TSA) is in the log.
        return page_error(request, 503, "Report not signed", "The report could not be signed; "
                          "the server's log says why. Try again later.")
    except ReportError as exc:
        return page_error(request, 404, "No report for this period", str(exc))
    scope = cluster_name or "fleet"
    headers = {"x-felixscan-report-sha256": report.sha256,
               "x-felixscan-cache": "hit" if report.cached else "miss",
               "x-felixscan-signed": "yes" if report.signed else "no"}
    if fmt == "html":
        headers["content-security-policy"] = REPORT_CSP
    # The name is made of a cluster name (`NAME`) and dates: nothing to quote.
    headers["content-disposition"] = (
        f'attachment; filename="felixscan-{scope}-{since}-{until}.{fmt}"')
    return _OpenFileResponse(report.file, report.size, headers=headers,
                             media_type="application/pdf" if fmt == "pdf"
                             else "text/html; charset=utf-8")


async def login(request: Request) -> Response:
    auth = web(request).login
    if not auth.enabled:
        return RedirectResponse("/", 303)
    if request.method == "GET":
        target = request.query_params.get("next", "/")
        return HTMLResponse(render_page("web_login.html.j2", **base(request), message=None,
                                        next=target if safe_next(target) else "/"))
    form = await _form(request)
    target = form.get("next", "/")
    target = target if safe_next(target) else "/"
    if not auth.login(form.get("token", "")):
        return HTMLResponse(render_page("web_login.html.j2", **base(request),
                                        message="That token is not valid.", next=target),
                            401)
    response = RedirectResponse(target, 303)
    response.set_cookie(SESSION_COOKIE, auth.new_session(), max_age=SESSION_SECONDS,
                        httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


def logout(request: Request) -> Response:
    response = RedirectResponse("/login" if web(request).login.enabled else "/", 303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def css(request: Request) -> Response:
    return Response(stylesheet(), media_type="text/css; charset=utf-8",
                    headers={"cache-control": "public, max-age=3600"})


async def _form(request: Request, limit: int = 8192) -> dict[str, str]:
    """A small urlencoded form, parsed without a multipart dependency."""
    if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"):
        raise HTTPException(400, "expected a form")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(400, "form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


class _OpenFileResponse(Response):
    """A report's already open file (`CachedReport.file`), sent in chunks and then closed.

    Not Starlette's FileResponse, which opens the file by name when it starts sending: by
    then another download may have evicted that name from the cache.
    """

    chunk_size = 64 * 1024

    def __init__(self, file: BinaryIO, size: int, *, headers: Mapping[str, str],
                 media_type: str) -> None:
        super().__init__(None, headers={**headers, "content-length": str(size)},
                         media_type=media_type)
        self.file = file
        self.size = size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            left = 0 if scope["method"] == "HEAD" else self.size
            while True:
                chunk = await anyio.to_thread.run_sync(self.file.read,
                                                       min(left, self.chunk_size))
                left -= len(chunk)
                more = bool(chunk) and left > 0
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not more:
                    break
        finally:
            self.file.close()

