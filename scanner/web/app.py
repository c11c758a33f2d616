"""The auditors' web page and JSON API of `felixscan serve` (Starlette, served by uvicorn).

Read-only: every page reads the results database through `scanner.db.queries.pages`; nothing here
holds or sees cluster credentials. Access needs the token of `FELIXSCAN_WEB_TOKEN` (or the file
named by `FELIXSCAN_WEB_TOKEN_FILE`) as a Bearer token, as the Basic-auth password, or through
the login form's session cookie. `/healthz`, `/readyz`, `/login` and the stylesheet are open.
`/metrics` (Prometheus, `scanner.web.metrics`) also takes the optional `FELIXSCAN_METRICS_TOKEN`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qs, quote

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reports.cache import ReportCache, history_chart, render_page, sparkline, stylesheet
from scanner import __version__
from scanner.app.alerts import AlertHealth, AlertSender
from scanner.app.serve import JobInfo, ScanScheduler, describe_jobs
from scanner.core.errors import ConfigError, ReportError, StoreError
from scanner.db.queries.pages import (
    ClusterOverview,
    LatestScan,
    cluster_page,
    fleet_overview,
    known_clusters,
    list_runs,
    list_scans,
    ping,
)
from scanner.db.queries.trends import trend
from scanner.db.store import Store
from scanner.web.metrics import exposition, metrics_registry

log = logging.getLogger(__name__)

MIN_TOKEN = 16
SESSION_COOKIE = "felixscan_session"
SESSION_SECONDS = 12 * 3600
OVERVIEW_DAYS = 90
CLUSTER_DAYS = (30, 90, 180, 365)
MAX_PERIOD_DAYS = 3660
DOWNLOAD_THREADS = 8  # report downloads prepared at once (found, or rendered, and opened)
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")  # as in scanner.core.config
# [0-9], not \d: \d also matches the digits of other scripts.
_DATE = "([0-9]{4}-[0-9]{2}-[0-9]{2})"
_PERIOD_FILE = re.compile(rf"^{_DATE}_{_DATE}\.(pdf|html)$")
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/assets/web.css"})
_HEALTH_PATHS = frozenset({"/healthz", "/readyz"})  # never read the token
METRICS_PATH = "/metrics"  # the web token, or FELIXSCAN_METRICS_TOKEN (this path only)
_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
_MAX_TOKEN_FILE = 4096  # bytes
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
# A downloaded HTML report carries its own inline stylesheet; it gets no script, no fetches,
# and a sandbox in case a browser renders it from here instead of saving it.
REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
              "frame-ancestors 'none'; base-uri 'none'; sandbox")


class ScheduleView(Protocol):
    """What the pages need of the scheduler (`scanner.app.serve.ScanScheduler`)."""

    def running(self) -> bool: ...

    def jobs(self) -> Mapping[str, JobInfo]: ...


class AlertView(Protocol):
    """What /readyz needs of the alert sender (`scanner.app.alerts.AlertSender`)."""

    def health(self) -> AlertHealth: ...


# --- access --------------------------------------------------------------------------------


class Auth:
    """The access token, from the environment or a mounted file.

    The file is read on each request that needs the token, so a rotated Secret takes effect
    at once. A file that cannot be read or holds no good token (empty, shorter than
    MIN_TOKEN, spaces) is refused at start; later, the last good token stays in use and the
    problem is logged once per change of the file, not per request.
    """

    def __init__(self, *, token: str | None = None, token_file: Path | None = None,
                 name: str = "FELIXSCAN_WEB_TOKEN") -> None:
        """`name`: the variable the token comes from (`name` or `name`_FILE), for messages."""
        self._token = token  # with a file: the last good token read from it
        self._file = token_file
        self._name = name
        self._seen: bytes | str | None = None  # the file's last content, or why it was unread
        self._file_bad = False  # its last change was refused (and logged)
        if token is not None:
            _check_token(token, name)
        if token_file is not None:
            self.token()  # fail at start, not at the first request

    @classmethod
    def from_environ(cls, env: Mapping[str, str], *,
                     name: str = "FELIXSCAN_WEB_TOKEN") -> Auth:
        """The token of `name` or of the file named by `name`_FILE (e.g. the optional
        FELIXSCAN_METRICS_TOKEN, which opens /metrics only)."""
        token, file = env.get(name), env.get(f"{name}_FILE")
        if token and file:
            raise ConfigError(f"set {name} or {name}_FILE, not both", key=name)
        return cls(token=token or None, token_file=Path(file) if file else None, name=name)

    @property
    def enabled(self) -> bool:
        return self._token is not None or self._file is not None

    def token(self) -> str | None:
        if self._file is None:
            return self._token
        seen: bytes | str
        try:
            with self._file.open("rb") as f:
                seen = f.read(_MAX_TOKEN_FILE + 1)
        except OSError as exc:
            seen = f"cannot be read ({exc.strerror or exc})"
        if seen != self._seen:
            self._seen = seen
            self._take(seen)
        return self._token

    def _take(self, seen: bytes | str) -> None:
        """Use the file's new content if it is a good token; else say why, once."""
        text = ""
        if isinstance(seen, str):
            problem: str | None = seen
        elif len(seen) > _MAX_TOKEN_FILE:
            problem = f"is longer than {_MAX_TOKEN_FILE} bytes"
        else:
            try:
                text = seen.decode("utf-8").strip()
            except UnicodeDecodeError:
                problem = "is not UTF-8 text"
            else:
                problem = _token_problem(text)
        if problem is None:
            if self._token is not None and (self._token != text or self._file_bad):
                log.info("token file %s holds a good token again%s", self._file,
                         ": a new one, now in use" if self._token != text else "")
            self._token = text
            self._file_bad = False
            return
        if self._token is None:
            raise ConfigError(f"the token file {self._file} {problem}",
                              key=f"{self._name}_FILE")
        # A Secret being rotated may be empty or gone for a moment: keep serving.
        self._file_bad = True
        log.warning("token file %s %s; the last good token stays in use", self._file, problem)

    def check(self, headers: Headers) -> tuple[bool, bool]:
        """(allowed, by session cookie) for a request's headers."""
        token = self.token()
        if token is None:
            return True, False
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return _same(value, token), False
        if scheme.lower() == "basic" and value:
            try:
                _user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8
                return False, False
            return _same(password, token), False
        cookie = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
        if cookie is not None and self._session_valid(cookie, token):
            return True, True
        return False, False

    def new_session(self, now: float | None = None) -> str:
        token = self.token()
        assert token is not None
        expires = int((now or time.time()) + SESSION_SECONDS)
        return f"{expires}.{_session_mac(token, expires)}"

    def _session_valid(self, cookie: str, token: str) -> bool:
        expires_text, _, mac = cookie.partition(".")
        # ASCII digits only (`isdigit` takes `²`, which `int` refuses), and few of them
        # (`int` refuses more than 4,300): anything else is no session, not an error.
        if not _ascii_number(expires_text, 12) or int(expires_text) < time.time():
            return False
        return hmac.compare_digest(mac.encode("utf-8"),
                                   _session_mac(token, int(expires_text)).encode("ascii"))

    def login(self, candidate: str) -> bool:
        token = self.token()
        return token is not None and _same(candidate, token)


def _token_problem(token: str) -> str | None:
    if not token:
        return "is empty"
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        return (f"holds a bad token: the token must be at least {MIN_TOKEN} characters "
                "without spaces")
    return None


def _check_token(token: str, where: str) -> None:
    if _token_problem(token) is not None:
        raise ConfigError(f"the token must be at least {MIN_TOKEN} characters without spaces "
                          "(e.g. `openssl rand -hex 24`)", key=where)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _session_mac(token: str, expires: int) -> str:
    # Keyed by the token itself: rotating the token ends every session.
    key = hashlib.sha256(b"felixscan-web-session\0" + token.encode()).digest()
    return hmac.new(key, str(expires).encode(), hashlib.sha256).hexdigest()


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _loopback_host(host_header: str | None) -> bool:
    """The Host names a loopback address (DNS rebinding guard for the open, token-less mode).

    Only `localhost`, an IPv4 literal in 127.0.0.0/8 or `[::1]`, each with an optional port:
    a name that merely starts with `127.` is anyone's DNS name.
    """
    host = (host_header or "").lower()
    if host.startswith("["):
        literal, bracket, port = host[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and _ascii_number(port[1:], 5))):
            return False
        return literal == "::1"  # also refuses zones (`::1%lo`) and mapped IPv4
    name, colon, port = host.partition(":")
    if colon and not _ascii_number(port, 5):
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(name) in _LOOPBACK_V4
    except ValueError:
        return False


def _ascii_number(text: str, digits: int) -> bool:
    """1 to `digits` ASCII digits (`str.isdigit` also takes `²` and `٣`)."""
    return 0 < len(text) <= digits and text.isascii() and text.isdigit()


class Guard:
    """ASGI middleware: access control and the security headers on every response.

    `metrics_auth`: a token that opens METRICS_PATH and nothing else (Prometheus's), besides
    the web token, which opens everything.
    """

    def __init__(self, app: ASGIApp, auth: Auth, metrics_auth: Auth | None = None) -> None:
        self.app = app
        self.auth = auth
        # An Auth without a token allows everyone: only one that has a token counts here.
        self.metrics_auth = metrics_auth if metrics_auth is not None and metrics_auth.enabled \
            else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h.setdefault("content-security-policy", PAGE_CSP)
                h.setdefault("x-content-type-options", "nosniff")
                h.setdefault("x-frame-options", "DENY")
                h.setdefault("referrer-policy", "no-referrer")
                h.setdefault("cross-origin-opener-policy", "same-origin")
                h.setdefault("cross-origin-resource-policy", "same-origin")
                h.setdefault("cache-control", "no-store")
            await send(message)

        if not self.auth.enabled and not _loopback_host(headers.get("host")):
            response: Response = _text_response(421, "open access is for loopback addresses "
                                                "only; set FELIXSCAN_WEB_TOKEN")
            await response(scope, receive, send_with_headers)
            return
        if path in _HEALTH_PATHS:
            # Probes never depend on the token (nor on its file being readable).
            await self.app(scope, receive, send_with_headers)
            return
        allowed, by_session = self.auth.check(headers)
        if not allowed and path == METRICS_PATH and self.metrics_auth is not None:
            allowed = self.metrics_auth.check(headers)[0]
        scope.setdefault("state", {})["session"] = by_session
        if not allowed and path not in _OPEN_PATHS:
            response = _unauthorized(path, scope)
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def _unauthorized(path: str, scope: Scope) -> Response:
    response: Response
    if path.startswith("/api/") or path == METRICS_PATH:  # machines: no login form
        response = _json({"error": "unauthorized",
                          "detail": "send Authorization: Bearer TOKEN"}, 401)
    else:
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + (f"?{query}" if query else "")
        body = render_page("web_login.html.j2", **_base(session=False), message=None,
                           next=target if _safe_next(target) else "/")
        response = HTMLResponse(body, 401)
    # Two challenges, on two lines (Firefox reads one per line): API clients send Bearer;
    # browsers know no Bearer, and only a Basic challenge makes them ask for the token
    # (as password, any user name). Cancelling the prompt shows the login form below.
    response.headers.append("www-authenticate", 'Bearer realm="felixscan"')
    response.headers.append("www-authenticate", 'Basic realm="felixscan"')
    return response


def _safe_next(target: str) -> bool:
    """Only a path on this site: `/x`, never `//host`, `/\\host` or `http://`."""
    return (target.startswith("/") and not target.startswith("//") and "\\" not in target
            and not any(ord(c) < 32 for c in target) and len(target) < 2000)


# --- helpers -------------------------------------------------------------------------------


def _json(doc: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False, default=_jsonable)
    return Response(body, status, headers=dict(headers or {}), media_type="application/json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def _text_response(status: int, text: str) -> Response:
    return Response(text + "\n", status, media_type="text/plain; charset=utf-8")


def _base(*, session: bool, open_access: bool = False) -> dict[str, Any]:
    return {"version": __version__, "session": session, "open_access": open_access}


def _status_text(status: str) -> str:
    return {"compliant": "compliant", "non_compliant": "non-compliant",
            "error": "scan error"}.get(status, status)


def _declared_text(latest: LatestScan) -> str:
    if latest.declared_enabled is None:
        return "unknown"
    return "enabled" if latest.declared_enabled else "disabled"


def cluster_href(name: str) -> str:
    return "/clusters/" + quote(name, safe="")


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not _ascii_number(raw, 20) or not low <= int(raw) <= high:
        raise HTTPException(400, f"{name}: expected a whole number from {low} to {high}")
    return int(raw)


def _plausible_name(name: str) -> bool:
    """Could be a stored cluster name: no control character (PostgreSQL refuses NUL in a
    parameter, and the store escapes every control character), not over the column's size."""
    return 0 < len(name) <= 255 and not any(ord(c) < 32 or ord(c) == 127 for c in name)


def _cluster_param(request: Request) -> str | None:
    name = request.query_params.get("cluster") or None
    if name is not None and not _plausible_name(name):
        raise HTTPException(400, "cluster: not a cluster name")
    return name


def _date_param(raw: str | None, name: str) -> date:
    try:
        return date.fromisoformat(raw or "")
    except ValueError:
        raise HTTPException(400, f"{name}: expected a date YYYY-MM-DD") from None


def latest_json(latest: LatestScan | None) -> dict[str, Any] | None:
    if latest is None:
        return None
    return {"scan_id": latest.scan_id, "cluster_scan_id": latest.cluster_scan_id,
            "status": latest.status, "started_at": latest.started_at,
            "finished_at": latest.finished_at, "install": latest.install,
            "declared": {"enabled": latest.declared_enabled, "source": latest.declared_source,
                         "port": latest.declared_port, "host": latest.declared_host},
            "nodes": latest.nodes, "passing": latest.passing, "failing": latest.failing,
            "unknown": latest.unknown, "error": latest.error}


# --- the application -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    name: str
    href: str
    latest: LatestScan | None
    status_text: str
    spark: Any
    job: JobInfo | None


def create_app(*, store: Store, auth: Auth, reports: ReportCache,
               schedule: ScheduleView | None = None, clusters: Sequence[str] = (),
               clock: Callable[[], datetime] | None = None,
               alerts: AlertView | None = None,
               metrics_auth: Auth | None = None) -> ASGIApp:
    """The ASGI app. `clusters`: configured names, listed even before their first scan.

    `alerts`: the alert sender whose worker /readyz checks (and whose deliveries /metrics
    counts); by default the scheduler's. `metrics_auth`: a token for /metrics only.
    """
    now_fn = clock or (lambda: datetime.now(UTC))
    configured = tuple(clusters)
    if alerts is None and isinstance(schedule, ScanScheduler):
        alerts = schedule.alerts
    # This app's own registry: the figures are read from the database at each scrape.
    registry = metrics_registry(
        store, stats=schedule.stats if isinstance(schedule, ScanScheduler) else None,
        alerts=alerts if isinstance(alerts, AlertSender) else None, configured=configured)

    def base(request: Request) -> dict[str, Any]:
        return _base(session=bool(request.scope.get("state", {}).get("session")),
                     open_access=not auth.enabled)

    def jobs() -> Mapping[str, JobInfo]:
        return schedule.jobs() if schedule is not None else {}

    def page_error(request: Request, status: int, title: str, message: str) -> HTMLResponse:
        return HTMLResponse(render_page("web_error.html.j2", **base(request), title=title,
                                        message=message), status)

    def download_defaults(now: datetime, cluster: str | None) -> dict[str, Any]:
        today = now.date()
        return {"cluster": cluster, "since": today - timedelta(days=29), "until": today}

    # --- pages -----------------------------------------------------------------------------

    def overview(request: Request) -> Response:
        now = now_fn()
        today = now.date()
        since = today - timedelta(days=OVERVIEW_DAYS - 1)
        overviews = fleet_overview(store, since=since, configured=configured)
        job_map = jobs()
        rows = [_Row(name=o.name, href=cluster_href(o.name), latest=o.latest,
                     status_text=_status_text(o.latest.status) if o.latest else "",
                     spark=sparkline(o.points, since=since, until=today),
                     job=job_map.get(o.name)) for o in overviews]
        return HTMLResponse(render_page(
            "web_overview.html.j2", **base(request), rows=rows, now=now, days=OVERVIEW_DAYS,
            summary=_summary(overviews), download=download_defaults(now, None)))

    def cluster(request: Request) -> Response:
        name = request.path_params["name"]
        days = _int_param(request, "days", 90, 1, MAX_PERIOD_DAYS)
        now = now_fn()
        today = now.date()
        since = today - timedelta(days=days - 1)
        page = cluster_page(store, name, since=since) if _plausible_name(name) else None
        if page is None:
            if name in configured:
                return page_error(request, 404, "Not scanned yet",
                                  f"Cluster {name} is configured but has no scan yet.")
            return page_error(request, 404, "Unknown cluster",
                              "The database has no scan of this cluster.")
        return HTMLResponse(render_page(
            "web_cluster.html.j2", **base(request), page=page, now=now, days=days,
            since=since, until=today, status_text=_status_text(page.latest.status),
            declared=_declared_text(page.latest), job=jobs().get(name),
            chart=history_chart(page.series, since=since, until=today),
            download=download_defaults(now, name) if _NAME.match(name) else None))

    def download(request: Request) -> Response:
        """The download form's target: redirect to the report's canonical, named URL."""
        q = request.query_params
        since = _date_param(q.get("since"), "since")
        until = _date_param(q.get("until"), "until")
        fmt = q.get("format", "pdf")
        if fmt not in ("pdf", "html"):
            raise HTTPException(400, "format: expected pdf or html")
        _check_period(since, until, now_fn().date())
        name = q.get("cluster") or None
        file = f"{since}_{until}.{fmt}"
        if name is None:
            return RedirectResponse(f"/reports/fleet/{file}", 303)
        if not _NAME.match(name):
            raise HTTPException(404, "no report of such a cluster")
        return RedirectResponse(f"/reports/cluster/{name}/{file}", 303)

    # Downloads wait for renders and hold a report's data while hashing it: they get threads
    # of their own, so a burst of them queues here instead of taking every worker thread
    # from the pages and /healthz.
    downloads = anyio.CapacityLimiter(DOWNLOAD_THREADS)

    async def report_fleet(request: Request) -> Response:
        return await anyio.to_thread.run_sync(serve_report, request, None,
                                              request.path_params["file"], limiter=downloads)

    async def report_cluster(request: Request) -> Response:
        name = request.path_params["name"]
        if not _NAME.match(name):
            raise HTTPException(404, "no report of such a cluster")
        return await anyio.to_thread.run_sync(serve_report, request, name,
                                              request.path_params["file"], limiter=downloads)

    def serve_report(request: Request, cluster_name: str | None, file: str) -> Response:
        match = _PERIOD_FILE.match(file)
        if match is None:
            raise HTTPException(404, "no such report")
        since = _date_param(match[1], "since")
        until = _date_param(match[2], "until")
        fmt = match[3]
        now = now_fn()
        _check_period(since, until, now.date())
        if cluster_name is not None and cluster_name not in known_clusters(store):
            raise HTTPException(404, "no report of such a cluster")
        try:
            report = reports.get(store, clusters=[cluster_name] if cluster_name else [],
                                 since=since, until=until, fmt=fmt, now=now)
        except ReportError as exc:
            return page_error(request, 404, "No report for this period", str(exc))
        scope = cluster_name or "fleet"
        headers = {"x-felixscan-report-sha256": report.sha256,
                   "x-felixscan-cache": "hit" if report.cached else "miss"}
        if fmt == "html":
            headers["content-security-policy"] = REPORT_CSP
        # The name is made of a cluster name (`_NAME`) and dates: nothing to quote.
        headers["content-disposition"] = (
            f'attachment; filename="felixscan-{scope}-{since}-{until}.{fmt}"')
        return _OpenFileResponse(report.file, report.size, headers=headers,
                                 media_type="application/pdf" if fmt == "pdf"
                                 else "text/html; charset=utf-8")

    async def login(request: Request) -> Response:
        if not auth.enabled:
            return RedirectResponse("/", 303)
        if request.method == "GET":
            target = request.query_params.get("next", "/")
            return HTMLResponse(render_page("web_login.html.j2", **base(request), message=None,
                                            next=target if _safe_next(target) else "/"))
        form = await _form(request)
        target = form.get("next", "/")
        target = target if _safe_next(target) else "/"
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
        response = RedirectResponse("/login" if auth.enabled else "/", 303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    def css(request: Request) -> Response:
        return Response(stylesheet(), media_type="text/css; charset=utf-8",
                        headers={"cache-control": "public, max-age=3600"})

    # --- health ----------------------------------------------------------------------------

    async def healthz(request: Request) -> Response:
        # On the event loop, not a worker thread: alive means answering, whatever the
        # threads are busy with.
        return _json({"status": "ok"})

    def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            ping(store)
            checks["database"] = "ok"
        except StoreError as exc:
            log.warning("readyz: %s", exc)
            checks["database"] = "unreachable"
        if schedule is not None:
            checks["scheduler"] = "running" if schedule.running() else "stopped"
        if alerts is not None:
            # A dead or stuck worker would let every later alert wait in silence.
            health = alerts.health()
            checks["alerts"] = health.state
            if health.reason:
                checks["reason"] = health.reason
        ready = (checks["database"] == "ok" and checks.get("scheduler", "running") == "running"
                 and checks.get("alerts", "ok") == "ok")
        return _json({"status": "ready" if ready else "not ready", **checks},
                     200 if ready else 503)

    # --- API -------------------------------------------------------------------------------

    def api_clusters(request: Request) -> Response:
        today = now_fn().date()
        job_map = jobs()
        return _json([{"name": o.name, "latest": latest_json(o.latest),
                       "next_run": _utc(job_map[o.name].next_run) if o.name in job_map
                       else None}
                      for o in fleet_overview(store, since=today, configured=configured)])

    def api_cluster(request: Request) -> Response:
        name = request.path_params["name"]
        days = _int_param(request, "days", 90, 1, MAX_PERIOD_DAYS)
        since = now_fn().date() - timedelta(days=days - 1)
        page = cluster_page(store, name, since=since) if _plausible_name(name) else None
        if page is None:
            raise HTTPException(404, "the database has no scan of this cluster")
        return _json({
            "name": page.name, "latest": latest_json(page.latest),
            "nodes_not_passing": {"total": page.issues_total, "items": [
                {"node": n.node, "verdict": n.verdict, "since": n.since,
                 "streak_scans": n.streak_scans, "address": n.address, "port": n.port,
                 "state": n.state, "error": n.error} for n in page.issues]},
            "findings": {"total": page.findings_total, "items": [
                {"id": f.id, "severity": f.severity, "node": f.node, "message": f.message,
                 "remediation": f.remediation} for f in page.findings]},
            "scans": [_scan_json(s) for s in page.scans],
            "remediation_actions": [
                {"id": a.id, "started_at": a.started_at, "finished_at": a.finished_at,
                 "trigger": a.trigger, "mode": a.mode, "outcome": a.outcome,
                 "message": a.message, "objects": a.objects} for a in page.remediation],
            "schedule": describe_jobs([jobs()[name]])[0] if name in jobs() else None,
        })

    def api_scans(request: Request) -> Response:
        limit = _int_param(request, "limit", 50, 1, 500)
        before = _int_param(request, "before", 0, 1, 2**62) or None
        cluster_name = _cluster_param(request)
        return _json([_scan_json(s) for s in list_scans(store, cluster=cluster_name,
                                                          limit=limit, before=before)])

    def api_runs(request: Request) -> Response:
        limit = _int_param(request, "limit", 50, 1, 500)
        before = _int_param(request, "before", 0, 1, 2**62) or None
        return _json([{"scan_id": r.scan_id, "started_at": r.started_at,
                       "finished_at": r.finished_at, "status": r.status, "trigger": r.trigger,
                       "scanner_host": r.scanner_host, "clusters": r.clusters}
                      for r in list_runs(store, limit=limit, before=before)])

    def api_trend(request: Request) -> Response:
        days = _int_param(request, "days", 30, 1, MAX_PERIOD_DAYS)
        cluster_name = _cluster_param(request)
        return _json([t.as_dict() for t in trend(store, clusters=[cluster_name] if cluster_name
                                                 else (), days=days, today=now_fn().date())])

    def api_schedule(request: Request) -> Response:
        return _json({"running": schedule.running() if schedule is not None else False,
                      "jobs": describe_jobs(jobs().values())})

    def api_openapi(request: Request) -> Response:
        return _json(openapi())

    def metrics(request: Request) -> Response:
        # A worker thread, as every page that reads the database.
        body, content_type = exposition(registry, request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    # --- errors ----------------------------------------------------------------------------

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/api/"):
            return _json({"error": exc.detail}, exc.status_code)
        titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed"}
        return page_error(request, exc.status_code, titles.get(exc.status_code, "Error"),
                          exc.detail if exc.status_code != 404 or exc.detail != "Not Found"
                          else "There is no page at this address.")

    async def store_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        if request.url.path.startswith("/api/"):
            return _json({"error": "the results database is not available"}, 503)
        return page_error(request, 503, "Database unavailable",
                          "The results database cannot be read right now; try again later.")

    routes = [
        Route("/", overview),
        Route("/clusters/{name:path}", cluster),
        Route("/download", download),
        Route("/reports/fleet/{file}", report_fleet),
        Route("/reports/cluster/{name}/{file}", report_cluster),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/assets/web.css", css),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route(METRICS_PATH, metrics),
        Route("/api/clusters", api_clusters),
        Route("/api/clusters/{name:path}", api_cluster),
        Route("/api/scans", api_scans),
        Route("/api/runs", api_runs),
        Route("/api/trend", api_trend),
        Route("/api/schedule", api_schedule),
        Route("/api/openapi.json", api_openapi),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: http_error, StoreError: store_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return Guard(app, auth, metrics_auth)


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


def _check_period(since: date, until: date, today: date) -> None:
    if since > until:
        raise HTTPException(400, "the period is empty: since is after until")
    if until > today + timedelta(days=1):
        raise HTTPException(400, "until: the period cannot end in the future")
    if (until - since).days >= MAX_PERIOD_DAYS:
        raise HTTPException(400, f"the period is longer than {MAX_PERIOD_DAYS} days")


def _summary(rows: Sequence[ClusterOverview]) -> dict[str, int]:
    latest = [r.latest for r in rows if r.latest is not None]
    return {"clusters": len(rows),
            "compliant": sum(1 for x in latest if x.status == "compliant"),
            "non_compliant": sum(1 for x in latest if x.status == "non_compliant"),
            "error": sum(1 for x in latest if x.status == "error"),
            "never": len(rows) - len(latest),
            "failing": sum(x.failing for x in latest),
            "unknown": sum(x.unknown for x in latest)}


def _scan_json(s: Any) -> dict[str, Any]:
    return {"scan_id": s.scan_id, "cluster_scan_id": s.cluster_scan_id, "cluster": s.cluster,
            "started_at": s.started_at, "finished_at": s.finished_at, "status": s.status,
            "nodes": s.nodes, "passing": s.passing, "failing": s.failing,
            "unknown": s.unknown, "trigger": s.trigger, "scanner_host": s.scanner_host,
            "error": s.error}


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


# --- OpenAPI -------------------------------------------------------------------------------

_METRICS_DOC = """\
Needs the web token, or the optional FELIXSCAN_METRICS_TOKEN, which opens this path only
(Prometheus: `authorization: {type: Bearer}`). The cluster and fleet figures come from the
database, so clusters scanned by CronJob agents count too; the scan and alert counters are this
process's own. Names (no `felix_` prefix: that is how the probe recognises Felix):

* `felixscan_cluster_compliant{cluster}`: 1 when the latest scan found the cluster compliant,
  else 0 (non-compliant, or the scan failed)
* `felixscan_cluster_status{cluster,status}`: 1 for the latest scan's status, 0 for the others
  (`compliant`, `non_compliant`, `error`)
* `felixscan_cluster_nodes{cluster,verdict}`: nodes of the latest scan by verdict (`pass`,
  `fail`, `unknown`)
* `felixscan_cluster_last_scan_timestamp_seconds{cluster}`,
  `felixscan_cluster_last_successful_scan_timestamp_seconds{cluster}`: when the latest scan, and
  the latest scan that was not an error, started (the latter absent while there is none)
* `felixscan_fleet_clusters{status}` (also `never_scanned`), `felixscan_fleet_nodes{verdict}`
* `felixscan_database_up`: 0 when the database did not answer (cluster and fleet figures left out)
* `felixscan_scan_duration_seconds{cluster}` (histogram) and
  `felixscan_scan_errors_total{cluster,reason}` (`scan`: stored as an error; `store`: not
  stored) for the scans this process ran
* `felixscan_alerts_delivered_total`, `felixscan_alerts_failed_total`,
  `felixscan_alerts_dropped_total`, `felixscan_alerts_queued`
* `felixscan_build_info{version,python_version}`, and the standard `process_*` metrics
"""


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 description of `/api/`, `/metrics`, `/healthz` and `/readyz`."""
    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def ok(schema: dict[str, Any], text: str) -> dict[str, Any]:
        return {"200": {"description": text, "content": {"application/json": {"schema": schema}}},
                "401": {"description": "no or wrong token"}}

    def param(name: str, text: str, schema: dict[str, Any], where: str = "query",
              required: bool = False) -> dict[str, Any]:
        return {"name": name, "in": where, "required": required, "description": text,
                "schema": schema}

    limit = param("limit", "rows to return", {"type": "integer", "minimum": 1, "maximum": 500,
                                              "default": 50})
    before = param("before", "page on: only ids below this", {"type": "integer", "minimum": 1})
    days = param("days", "days back from today (UTC), today included",
                 {"type": "integer", "minimum": 1, "maximum": MAX_PERIOD_DAYS})
    ts = {"type": "string", "format": "date-time"}
    nts = {"type": ["string", "null"], "format": "date-time"}
    status = {"type": "string", "enum": ["compliant", "non_compliant", "error"]}
    integer = {"type": "integer"}
    latest = {"type": ["object", "null"], "properties": {
        "scan_id": integer, "cluster_scan_id": integer, "status": status, "started_at": ts,
        "finished_at": ts, "install": {"type": "string"},
        "declared": {"type": "object", "properties": {
            "enabled": {"type": ["boolean", "null"]}, "source": {"type": ["string", "null"]},
            "port": {"type": ["integer", "null"]},
            "host": {"type": ["string", "null"],
                     "description": "PrometheusMetricsHost: empty = every interface"}}},
        "nodes": integer, "passing": integer, "failing": integer, "unknown": integer,
        "error": {"type": ["string", "null"]}}}
    scan = {"type": "object", "properties": {
        "scan_id": integer, "cluster_scan_id": integer, "cluster": {"type": "string"},
        "started_at": ts, "finished_at": ts, "status": status, "nodes": integer,
        "passing": integer, "failing": integer, "unknown": integer,
        "trigger": {"type": "string"}, "scanner_host": {"type": "string"},
        "error": {"type": ["string", "null"]}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "felixscan", "version": __version__,
                 "description": "Read-only results of the Calico Felix metrics endpoint "
                 "compliance scans. Send `Authorization: Bearer TOKEN`."},
        "security": [{"bearer": []}, {"basic": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "basic": {"type": "http", "scheme": "basic",
                                          "description": "any user name; the token as "
                                          "password"},
                                "metrics": {"type": "http", "scheme": "bearer",
                                            "description": "FELIXSCAN_METRICS_TOKEN (or "
                                            "_FILE), optional: opens /metrics only"}},
            "schemas": {"Latest": latest, "Scan": scan},
        },
        "paths": {
            "/api/clusters": {"get": {
                "summary": "Every cluster and its latest scan",
                "responses": ok({"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "latest": ref("Latest"), "next_run": nts}}},
                    "clusters, by name")}},
            "/api/clusters/{name}": {"get": {
                "summary": "One cluster: latest scan, nodes not passing, findings, scans, "
                           "remediation actions, schedule",
                "parameters": [param("name", "cluster name", {"type": "string"}, "path", True),
                               days],
                "responses": {**ok({"type": "object"}, "the cluster"),
                              "404": {"description": "no scan of this cluster"}}}},
            "/api/scans": {"get": {
                "summary": "Cluster scans, newest first",
                "parameters": [param("cluster", "only this cluster", {"type": "string"}),
                               limit, before],
                "responses": ok({"type": "array", "items": ref("Scan")}, "cluster scans")}},
            "/api/runs": {"get": {
                "summary": "Scan runs, newest first, including skipped and aborted ones",
                "parameters": [limit, before],
                "responses": ok({"type": "array", "items": {"type": "object", "properties": {
                    "scan_id": integer, "started_at": ts, "finished_at": nts,
                    "status": {"type": "string", "enum": ["running", "finished", "aborted",
                                                          "skipped"]},
                    "trigger": {"type": "string"}, "scanner_host": {"type": "string"},
                    "clusters": integer}}}, "scan runs")}},
            "/api/trend": {"get": {
                "summary": "Per cluster and UTC day: the day's last scan (as `felixscan "
                           "trend --format json`)",
                "parameters": [param("cluster", "only this cluster", {"type": "string"}), days],
                "responses": ok({"type": "array", "items": {"type": "object", "properties": {
                    "cluster": {"type": "string"}, "day": {"type": "string", "format": "date"},
                    "nodes": integer, "failing": integer, "unknown": integer,
                    "ratio": {"type": ["number", "null"]}, "status": status,
                    "scans": integer}}},
                    "trend rows")}},
            "/api/schedule": {"get": {
                "summary": "This process's scheduled clusters, next runs, last outcomes",
                "responses": ok({"type": "object"}, "the schedule")}},
            "/api/openapi.json": {"get": {"summary": "This description",
                                          "responses": ok({"type": "object"}, "OpenAPI")}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics, read from the database at each scrape",
                "description": _METRICS_DOC,
                "security": [{"bearer": []}, {"basic": []}, {"metrics": []}],
                "responses": {
                    "200": {"description": "Prometheus text format 0.0.4, or OpenMetrics "
                                           "1.0.0 when the Accept header asks for it",
                            "content": {
                                "text/plain; version=0.0.4": {"schema": {"type": "string"}},
                                "application/openmetrics-text; version=1.0.0":
                                    {"schema": {"type": "string"}}}},
                    "401": {"description": "no or wrong token"}}}},
            "/healthz": {"get": {"summary": "The process is alive (no token needed)",
                                 "security": [],
                                 "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Database reachable, scheduler running, alert "
                                           "worker alive and not stuck (no token needed)",
                                "security": [],
                                "responses": {"200": {"description": "ready"},
                                              "503": {"description": "not ready"}}}},
        },
    }
