"""The JSON API of `felixscan serve` (`/api/...`), the health probes and `/metrics`.
Module-level handlers over `WebState` (`scanner.web.state.web(request)`); the OpenAPI
description of these routes is `scanner.web.openapi`.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from reports.outputs import report_control
from scanner.core.errors import StoreError
from scanner.core.records import CONTROL_IDS
from scanner.db.queries.history import ControlEntry
from scanner.db.queries.pages import (
    LatestScan,
    cluster_page,
    fleet_overview,
    list_runs,
    list_scans,
    ping,
)
from scanner.db.queries.trends import trend_table
from scanner.web.metrics import exposition
from scanner.web.openapi import openapi
from scanner.web.state import (
    MAX_PERIOD_DAYS,
    cluster_param,
    describe_jobs,
    int_param,
    json_response,
    plausible_name,
    utc,
    web,
)

log = logging.getLogger(__name__)


def latest_json(latest: LatestScan | None) -> dict[str, Any] | None:
    if latest is None:
        return None
    return {"scan_id": latest.scan_id, "cluster_scan_id": latest.cluster_scan_id,
            "status": latest.status, "started_at": latest.started_at,
            "finished_at": latest.finished_at, "install": latest.install,
            "declared": {"enabled": latest.declared_enabled, "source": latest.declared_source,
                         "port": latest.declared_port, "host": latest.declared_host},
            "nodes": latest.nodes, "passing": latest.passing, "failing": latest.failing,
            "unknown": latest.unknown, "waived": latest.waived, "error": latest.error,
            # control -> status; `status` above is the worst of them
            "controls": dict(latest.controls)}


def control_json(c: ControlEntry) -> dict[str, Any]:
    """One control of a cluster's latest scan, as the JSON report writes it, Felix's targets
    being the cluster's nodes not passing (this API's `nodes_not_passing`)."""
    return dict(report_control(c, targets_in="nodes_not_passing"))


def _scan_json(s: Any) -> dict[str, Any]:
    return {"scan_id": s.scan_id, "cluster_scan_id": s.cluster_scan_id, "cluster": s.cluster,
            "started_at": s.started_at, "finished_at": s.finished_at, "status": s.status,
            "nodes": s.nodes, "passing": s.passing, "failing": s.failing,
            "unknown": s.unknown, "trigger": s.trigger, "scanner_host": s.scanner_host,
            "error": s.error}


# --- health --------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    # On the event loop, not a worker thread: alive means answering, whatever the threads
    # are busy with.
    return json_response({"status": "ok"})


def readyz(request: Request) -> Response:
    st = web(request)
    checks: dict[str, str] = {}
    try:
        ping(st.store)
        checks["database"] = "ok"
    except StoreError as exc:
        log.warning("readyz: %s", exc)
        checks["database"] = "unreachable"
    if st.schedule is not None:
        checks["scheduler"] = "running" if st.schedule.running() else "stopped"
    if st.alerts is not None:
        # A dead or stuck worker would let every later alert wait in silence.
        health = st.alerts.health()
        checks["alerts"] = health.state
        if health.reason:
            checks["reason"] = health.reason
    ready = (checks["database"] == "ok" and checks.get("scheduler", "running") == "running"
             and checks.get("alerts", "ok") == "ok")
    return json_response({"status": "ready" if ready else "not ready", **checks},
                         200 if ready else 503)


def metrics(request: Request) -> Response:
    # A worker thread, as every page that reads the database.
    body, content_type = exposition(web(request).registry, request.headers.get("accept"))
    return Response(body, headers={"content-type": content_type})


# --- API -----------------------------------------------------------------------------------


def clusters(request: Request) -> Response:
    st = web(request)
    today = st.clock().date()
    job_map = st.jobs()
    return json_response([
        {"name": o.name, "latest": latest_json(o.latest),
         "next_run": utc(job_map[o.name].next_run) if o.name in job_map else None}
        for o in fleet_overview(st.store, since=today, configured=st.configured)])


def cluster(request: Request) -> Response:
    st = web(request)
    name = request.path_params["name"]
    days = int_param(request, "days", 90, 1, MAX_PERIOD_DAYS)
    since = st.clock().date() - timedelta(days=days - 1)
    page = cluster_page(st.store, name, since=since) if plausible_name(name) else None
    if page is None:
        raise HTTPException(404, "the database has no scan of this cluster")
    jobs = st.jobs()
    return json_response({
        "name": page.name, "latest": latest_json(page.latest),
        "nodes_not_passing": {"total": page.issues_total, "items": [
            {"node": n.node, "verdict": n.verdict, "since": n.since,
             "streak_scans": n.streak_scans, "address": n.address, "port": n.port,
             "state": n.state, "error": n.error} for n in page.issues]},
        "findings": {"total": page.findings_total, "items": [
            {"id": f.id, "severity": f.severity, "node": f.node, "message": f.message,
             "remediation": f.remediation, "control": f.control} for f in page.findings]},
        "controls": [control_json(c) for c in page.controls],
        "scans": [_scan_json(s) for s in page.scans],
        "remediation_actions": [
            {"id": a.id, "started_at": a.started_at, "finished_at": a.finished_at,
             "trigger": a.trigger, "mode": a.mode, "outcome": a.outcome,
             "message": a.message, "objects": a.objects} for a in page.remediation],
        "schedule": describe_jobs([jobs[name]])[0] if name in jobs else None,
        "vantages": [{"vantage": v.vantage, "scan_id": v.scan.scan_id,
                      "started_at": v.scan.started_at, "status": v.scan.status,
                      "failing": list(v.failing), "unknown": v.unknown}
                     for v in page.vantages],
    })


def scans(request: Request) -> Response:
    limit = int_param(request, "limit", 50, 1, 500)
    before = int_param(request, "before", 0, 1, 2**62) or None
    cluster_name = cluster_param(request)
    return json_response([_scan_json(s) for s in list_scans(
        web(request).store, cluster=cluster_name, limit=limit, before=before)])


def runs(request: Request) -> Response:
    limit = int_param(request, "limit", 50, 1, 500)
    before = int_param(request, "before", 0, 1, 2**62) or None
    return json_response([{"scan_id": r.scan_id, "started_at": r.started_at,
                           "finished_at": r.finished_at, "status": r.status,
                           "trigger": r.trigger, "scanner_host": r.scanner_host,
                           "clusters": r.clusters}
                          for r in list_runs(web(request).store, limit=limit, before=before)])


def trend_rows(request: Request) -> Response:
    st = web(request)
    days = int_param(request, "days", 30, 1, MAX_PERIOD_DAYS)
    cluster_name = cluster_param(request)
    control = request.query_params.get("control")
    if control is not None and control not in CONTROL_IDS:
        raise HTTPException(400, f"control: expected one of {', '.join(CONTROL_IDS)}")
    # Without `control`: each cluster as a whole, exactly as before controls existed. The
    # points go from the database's tuples to the JSON text directly (the same bytes as
    # `json_response` of their `as_dict`): a fleet's year is tens of thousands of points.
    table = trend_table(st.store, clusters=[cluster_name] if cluster_name else (), days=days,
                        today=st.clock().date(), control=control)
    return Response(table.json(), media_type="application/json")


def schedule(request: Request) -> Response:
    st = web(request)
    return json_response({"running": st.schedule.running() if st.schedule is not None
                          else False, "jobs": describe_jobs(st.jobs().values())})


def openapi_document(request: Request) -> Response:
    return json_response(openapi())
