"""The OpenAPI 3.1 description of the JSON API (`/api/openapi.json`), `/metrics` and the probes."""

from __future__ import annotations

from typing import Any

from scanner import __version__
from scanner.core.records import CONTROL_IDS
from scanner.web.state import MAX_PERIOD_DAYS

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
  `fail`, `unknown`, `waived`)
* `felixscan_control_status{cluster,control}`: each control the latest scan checked
  (`felix-metrics`, `typha-metrics`, `kube-controllers-metrics`): 1 compliant, 0
  non-compliant, -1 could not be checked (error); the cluster is compliant only if every one
  is 1
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
        "waived": {"type": "integer", "description": "failing nodes whose risk a waiver in "
                   "force accepted (not counted in failing)"},
        "error": {"type": ["string", "null"]},
        "controls": {"type": "object", "description": "each control the scan checked -> its "
                     "status; `status` is the worst of them (compliant only if every one is). "
                     "The node counts and `declared` are felix-metrics'.",
                     "propertyNames": {"type": "string"}, "additionalProperties": status}}}
    target = {"type": "object", "properties": {
        "node": {"type": "string"}, "pod": {"type": ["string", "null"]},
        "address": {"type": ["string", "null"]}, "port": integer, "state": {"type": "string"},
        "protocol": {"type": ["string", "null"]}, "metrics": {"type": ["boolean", "null"]},
        "verdict": {"type": "string", "enum": ["pass", "fail", "unknown", "waived"]},
        "declared_enabled": {"type": ["boolean", "null"]},
        "declared_source": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]}}}
    control = {"type": "object", "properties": {
        "id": {"type": "string", "enum": list(CONTROL_IDS)}, "status": status,
        "installed": {"type": "boolean"},
        "declared": {"type": "object", "properties": {
            "enabled": {"type": ["boolean", "null"]}, "source": {"type": ["string", "null"]},
            "port": {"type": ["integer", "null"]}, "host": {"type": ["string", "null"]}}},
        "targets": {"type": "array", "items": target,
                    "description": "every control but felix-metrics"},
        "targets_in": {"const": "nodes_not_passing",
                       "description": "felix-metrics: its targets are the cluster's nodes"},
        "error": {"type": ["string", "null"]}, "namespace": {"type": ["string", "null"]},
        "workload": {"type": ["string", "null"]}, "image": {"type": ["string", "null"]},
        "totals": {"type": "object", "properties": {
            "targets": integer, "pass": integer, "fail": integer, "unknown": integer,
            "waived": integer}}}}
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
            "schemas": {"Latest": latest, "Scan": scan, "Control": control,
                        "Target": target},
        },
        "paths": {
            "/api/clusters": {"get": {
                "summary": "Every cluster and its latest scan",
                "responses": ok({"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "latest": ref("Latest"), "next_run": nts}}},
                    "clusters, by name")}},
            "/api/clusters/{name}": {"get": {
                "summary": "One cluster: latest scan, its controls (`controls`, each with "
                           "its declared state and targets), nodes not passing, findings "
                           "(each naming its `control`), scans, remediation actions, schedule",
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
                           "trend --format json`); with `control`, that control's figures "
                           "(`nodes` are its targets) and each row names the control",
                "parameters": [param("cluster", "only this cluster", {"type": "string"}), days,
                               param("control", "one control's trend (default: each cluster "
                                     "as a whole, as before controls existed)",
                                     {"type": "string", "enum": list(CONTROL_IDS)})],
                "responses": {**ok({"type": "array", "items": {"type": "object", "properties": {
                    "cluster": {"type": "string"}, "day": {"type": "string", "format": "date"},
                    "nodes": integer, "failing": integer, "unknown": integer,
                    "ratio": {"type": ["number", "null"]}, "status": status,
                    "scans": integer, "waived": integer,
                    "control": {"type": "string", "description": "with ?control= only"}}}},
                    "trend rows"), "400": {"description": "an unknown control"}}}},
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
