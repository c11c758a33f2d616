"""The auditors' web page and JSON API of `felixscan serve` (Starlette, served by uvicorn):
the one route table, the error pages, and `create_app`, which sets `app.state.web`.

Read-only: every page reads the results database through `scanner.db.queries.pages`; nothing here
holds or sees cluster credentials. Access needs the token of `FELIXSCAN_WEB_TOKEN` (or the file
named by `FELIXSCAN_WEB_TOKEN_FILE`) as a Bearer token, as the Basic-auth password, or through
the login form's session cookie (`scanner.web.auth`). `/healthz`, `/readyz`, `/login` and the
stylesheet are open. `/metrics` (Prometheus, `scanner.web.metrics`) also takes the optional
`FELIXSCAN_METRICS_TOKEN`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from reports.cache import ReportCache
from scanner.core.errors import StoreError
from scanner.db.store import Store
from scanner.web import api, views
from scanner.web.auth import METRICS_PATH, Auth, Guard
from scanner.web.metrics import AlertCounts, ScanStats, metrics_registry
from scanner.web.openapi import openapi
from scanner.web.state import AlertView, JobInfo, ScheduleView, WebState, json_response

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8  # report downloads prepared at once (found, or rendered, and opened)

ROUTES = [
    Route("/", views.overview),
    Route("/clusters/{name:path}", views.cluster),
    Route("/download", views.download),
    Route("/reports/fleet/{file}", views.report_fleet),
    Route("/reports/cluster/{name}/{file}", views.report_cluster),
    Route("/login", views.login, methods=["GET", "POST"]),
    Route("/logout", views.logout, methods=["POST"]),
    Route("/assets/web.css", views.css),
    Route("/healthz", api.healthz),
    Route("/readyz", api.readyz),
    Route(METRICS_PATH, api.metrics),
    Route("/api/clusters", api.clusters),
    Route("/api/clusters/{name:path}", api.cluster),
    Route("/api/scans", api.scans),
    Route("/api/runs", api.runs),
    Route("/api/trend", api.trend_rows),
    Route("/api/schedule", api.schedule),
    Route("/api/openapi.json", api.openapi_document),
]


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        return json_response({"error": exc.detail}, exc.status_code)
    titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed"}
    return views.page_error(request, exc.status_code, titles.get(exc.status_code, "Error"),
                            exc.detail if exc.status_code != 404 or exc.detail != "Not Found"
                            else "There is no page at this address.")


async def store_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s: %s", request.method, request.url.path, exc)
    if request.url.path.startswith("/api/"):
        return json_response({"error": "the results database is not available"}, 503)
    return views.page_error(request, 503, "Database unavailable",
                            "The results database cannot be read right now; try again later.")


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HTTPException: http_error, StoreError: store_error}


def create_app(*, store: Store, auth: Auth, reports: ReportCache,
               schedule: ScheduleView | None = None, clusters: Sequence[str] = (),
               clock: Callable[[], datetime] | None = None,
               alerts: AlertView | None = None,
               metrics_auth: Auth | None = None,
               stats: ScanStats | None = None) -> ASGIApp:
    """The ASGI app. `clusters`: configured names, listed even before their first scan.

    `alerts`: the alert sender whose worker /readyz checks (and whose deliveries /metrics
    counts); by default the scheduler's. `stats`: this process's scan figures for /metrics;
    by default the scheduler's. `metrics_auth`: a token for /metrics only.
    """
    configured = tuple(clusters)
    if alerts is None:
        alerts = getattr(schedule, "alerts", None)
    if stats is None:
        stats = getattr(schedule, "stats", None)
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS)
    app.state.web = WebState(
        store=store, reports=reports, open_access=not auth.enabled, configured=configured,
        clock=clock or (lambda: datetime.now(UTC)), schedule=schedule, alerts=alerts,
        # This app's own registry: the figures are read from the database at each scrape.
        registry=metrics_registry(store, stats=stats, configured=configured,
                                  alerts=alerts if isinstance(alerts, AlertCounts) else None),
        login=auth, downloads=anyio.CapacityLimiter(DOWNLOAD_THREADS))
    return Guard(app, auth, metrics_auth)


__all__ = ["ROUTES", "Auth", "JobInfo", "create_app", "openapi"]
