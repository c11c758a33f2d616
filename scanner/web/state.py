"""What every handler of the web app shares: the state it reads from `request.app.state`, the
records the scheduler and alert sender hand it, and the small response and parameter helpers.

Handlers are module-level functions (`scanner.web.views`, `scanner.web.api`) over `WebState`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, Protocol

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from reports.cache import ReportCache
from scanner import __version__
from scanner.db.store import Store

MAX_PERIOD_DAYS = 3660
NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")  # as in scanner.core.config


@dataclass
class JobInfo:
    """What the web page shows about a cluster's schedule (in this process)."""

    cluster: str
    schedule: str
    timezone: str
    next_run: datetime | None = None
    running: bool = False
    last_started: datetime | None = None
    last_outcome: str | None = None  # scanned, skipped: ..., failed: ...


@dataclass(frozen=True, slots=True)
class AlertHealth:
    """The alert worker's state, for /readyz: `ok`, `stuck` or `stopped`."""

    state: Literal["ok", "stuck", "stopped"]
    queued: int  # alerts not yet delivered or given up, the one in hand included
    reason: str | None = None


class ScheduleView(Protocol):
    """What the pages need of the scheduler (`scanner.app.serve.ScanScheduler`)."""

    def running(self) -> bool: ...

    def jobs(self) -> Mapping[str, JobInfo]: ...


class AlertView(Protocol):
    """What /readyz needs of the alert sender (`scanner.app.alerts.AlertSender`)."""

    def health(self) -> AlertHealth: ...


@dataclass(frozen=True)
class WebState:
    """Everything a handler may use, set once by `create_app` as `app.state.web`."""

    store: Store
    reports: ReportCache
    open_access: bool  # no token configured: loopback only
    configured: tuple[str, ...]  # cluster names listed even before their first scan
    clock: Callable[[], datetime]
    schedule: ScheduleView | None
    alerts: AlertView | None
    registry: Any  # the app's own Prometheus registry (scanner.web.metrics)
    login: Any  # the web token's Auth (scanner.web.auth), for the login form
    # Downloads wait for renders and hold a report's data while hashing it: they get threads
    # of their own, so a burst of them queues here instead of taking every worker thread
    # from the pages and /healthz.
    downloads: anyio.CapacityLimiter

    def jobs(self) -> Mapping[str, JobInfo]:
        return self.schedule.jobs() if self.schedule is not None else {}


def web(request: Request) -> WebState:
    """The app's WebState."""
    state: WebState = request.app.state.web
    return state


def base(request: Request) -> dict[str, Any]:
    """The template context every page has."""
    return base_context(session=bool(request.scope.get("state", {}).get("session")),
                 open_access=web(request).open_access)


def describe_jobs(jobs: Any) -> list[dict[str, Any]]:
    """Jobs (JobInfo) as JSON-ready dicts (for the API)."""
    return [{"cluster": j.cluster, "schedule": j.schedule, "timezone": j.timezone,
             "next_run": j.next_run.astimezone(UTC).isoformat() if j.next_run else None,
             "running": j.running,
             "last_started": j.last_started.isoformat() if j.last_started else None,
             "last_outcome": j.last_outcome} for j in jobs]


def json_response(doc: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False, default=_jsonable)
    return Response(body, status, headers=dict(headers or {}), media_type="application/json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def text_response(status: int, text: str) -> Response:
    return Response(text + "\n", status, media_type="text/plain; charset=utf-8")


def base_context(*, session: bool, open_access: bool = False) -> dict[str, Any]:
    return {"version": __version__, "session": session, "open_access": open_access}




def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not ascii_number(raw, 20) or not low <= int(raw) <= high:
        raise HTTPException(400, f"{name}: expected a whole number from {low} to {high}")
    return int(raw)


def plausible_name(name: str) -> bool:
    """Could be a stored cluster name: no control character (PostgreSQL refuses NUL in a
    parameter, and the store escapes every control character), not over the column's size."""
    return 0 < len(name) <= 255 and not any(ord(c) < 32 or ord(c) == 127 for c in name)


def cluster_param(request: Request) -> str | None:
    name = request.query_params.get("cluster") or None
    if name is not None and not plausible_name(name):
        raise HTTPException(400, "cluster: not a cluster name")
    return name


def date_param(raw: str | None, name: str) -> date:
    try:
        return date.fromisoformat(raw or "")
    except ValueError:
        raise HTTPException(400, f"{name}: expected a date YYYY-MM-DD") from None



def check_period(since: date, until: date, today: date) -> None:
    if since > until:
        raise HTTPException(400, "the period is empty: since is after until")
    if until > today + timedelta(days=1):
        raise HTTPException(400, "until: the period cannot end in the future")
    if (until - since).days >= MAX_PERIOD_DAYS:
        raise HTTPException(400, f"the period is longer than {MAX_PERIOD_DAYS} days")



def ascii_number(text: str, digits: int) -> bool:
    """1 to `digits` ASCII digits (`str.isdigit` also takes `²` and `٣`)."""
    return 0 < len(text) <= digits and text.isascii() and text.isdigit()
