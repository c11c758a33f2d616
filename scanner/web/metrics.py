"""Prometheus metrics of `felixscan serve` (`GET /metrics`), made afresh at each scrape.

Cluster and fleet figures come from the results database, so clusters that CronJob agents
scan elsewhere count like the ones this process scans: one query, for the newest
`daily_cluster_summary` row of each cluster (the rollup of its latest scan: one pass over that
table's clusters x days rows) and, one index probe per cluster, its newest `cluster_scans` row
that is not an error. Never the node probes: 50 clusters x 365 days take 3 ms on SQLite and
7 ms on PostgreSQL (`bench/metrics`). Scan durations and errors of the scans this process runs
(`ScanStats`) and its alert deliveries (`scanner.app.alerts.AlertSender`) are counted in memory.
Every name starts with `felixscan_` (or `process_`): never `felix_`, the prefix by which the
probe recognises Felix itself.
"""

from __future__ import annotations

import logging
import platform
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from scanner import __version__
from scanner.core.errors import StoreError
from scanner.db.queries.metrics import cluster_states
from scanner.db.store import Store
from scanner.web.state import AlertHealth

log = logging.getLogger(__name__)

PREFIX = "felixscan_"
STATUSES = ("compliant", "non_compliant", "error")
VERDICTS = (("pass", "passing"), ("fail", "failing"), ("unknown", "unknown"),
            ("waived", "waived"))
# Seconds. A scan is bounded by the cluster's deadline_seconds (default 120) plus probing.
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# scan: the cluster could not be scanned (its result is stored, as an error);
# store: no result was stored (database failure, the cluster's lock lost, the run failed).
ERROR_REASONS = ("scan", "store")
# felixscan_control_status: one value per status (the cluster is compliant only if every
# control it checks is 1)
CONTROL_VALUES = {"compliant": 1.0, "non_compliant": 0.0, "error": -1.0}


# --- scans run by this process -------------------------------------------------------------


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one: above every bound
        self.total = 0.0


class ScanStats:
    """Durations and errors of the scans this process runs, per cluster (thread-safe)."""

    def __init__(self, clusters: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._durations: dict[str, _Histogram] = {}
        self._errors: dict[tuple[str, str], int] = {}
        for cluster in clusters:
            self.expect(cluster)

    def expect(self, cluster: str) -> None:
        """Export the cluster's series at zero before its first scan, so that `increase()`
        and `rate()` see the first error, not only the second."""
        with self._lock:
            self._durations.setdefault(cluster, _Histogram())
            for reason in ERROR_REASONS:
                self._errors.setdefault((cluster, reason), 0)

    def scan_ended(self, cluster: str, seconds: float, *,
                   results: Iterable[tuple[str, str, bool]] | None) -> None:
        """A scan of `cluster` that took `seconds`, with each result as (cluster, status,
        stored); None when the run itself failed (nothing stored). A result not stored, or
        stored as an error, is an error. Counted at once: a scrape sees the scan's duration
        and its errors together, or neither."""
        reasons = [(cluster, "store")] if results is None else [
            (name, "store" if not stored else "scan") for name, status, stored in results
            if not stored or status == "error"]
        with self._lock:
            h = self._durations.setdefault(cluster, _Histogram())
            h.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
            h.total += seconds
            for name, reason in reasons:
                for r in ERROR_REASONS:
                    self._errors.setdefault((name, r), 0)
                self._errors[(name, reason)] += 1

    def families(self) -> list[Metric]:
        duration = HistogramMetricFamily(
            f"{PREFIX}scan_duration_seconds",
            "Wall time of the scans this process ran, per cluster (scans by agents elsewhere "
            "are not here)", labels=["cluster"])
        errors = CounterMetricFamily(
            f"{PREFIX}scan_errors_total",
            "Scans this process ran that ended in an error: reason=scan, the cluster could not "
            "be scanned (stored as an error scan); reason=store, no result was stored "
            "(database failure, the cluster's lock was lost, the run failed)",
            labels=["cluster", "reason"])
        with self._lock:
            histograms = [(c, list(h.counts), h.total) for c, h in self._durations.items()]
            counts = list(self._errors.items())
        for cluster, bins, total in sorted(histograms):
            cumulative, buckets = 0, []
            for bound, n in zip([*map(_number, DURATION_BUCKETS), "+Inf"], bins, strict=True):
                cumulative += n
                buckets.append((bound, float(cumulative)))
            duration.add_metric([cluster], buckets, sum_value=total)
        for (cluster, reason), n in sorted(counts):
            errors.add_metric([cluster, reason], float(n))
        return [duration, errors]


def _number(value: float) -> str:
    return repr(float(value))


# --- the database's figures ----------------------------------------------------------------


# --- the collector -------------------------------------------------------------------------


@runtime_checkable
class AlertCounts(Protocol):
    """What /metrics reads of the alert sender (`scanner.app.alerts.AlertSender`)."""

    delivered: int
    failed: int
    dropped: int

    def health(self) -> AlertHealth: ...


class FelixscanCollector(Collector):
    """The `felixscan_*` metrics, computed at each `collect()` (one database query)."""

    def __init__(self, store: Store, *, stats: ScanStats | None = None,
                 alerts: AlertCounts | None = None, configured: Sequence[str] = ()) -> None:
        self.store = store
        self.stats = stats
        self.alerts = alerts
        self.configured = tuple(configured)

    def collect(self) -> Iterable[Metric]:
        yield from self._database()
        if self.stats is not None:
            yield from self.stats.families()
        yield from self._alerts()
        yield InfoMetricFamily(f"{PREFIX}build", "The felixscan version serving these metrics",
                               value={"version": __version__,
                                      "python_version": platform.python_version()})

    def _database(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}database_up",
                               "1 when the results database answered this scrape; 0 when not "
                               "(the cluster and fleet figures are then left out)")
        try:
            states = cluster_states(self.store)
        except StoreError as exc:
            log.warning("/metrics: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        compliant = GaugeMetricFamily(
            f"{PREFIX}cluster_compliant",
            "1 when the cluster's latest scan found it compliant; 0 when non-compliant or when "
            "that scan failed (a failed scan proves nothing)", labels=["cluster"])
        status = GaugeMetricFamily(
            f"{PREFIX}cluster_status",
            "Status of the cluster's latest scan: 1 for the one it has, 0 for the others "
            "(compliant, non_compliant, error)", labels=["cluster", "status"])
        nodes = GaugeMetricFamily(
            f"{PREFIX}cluster_nodes",
            "Nodes of the cluster's latest scan by verdict: pass, fail (Felix metrics enabled "
            "or reachable), unknown (could not be verified), waived (failing, risk accepted by a "
            "waiver in force)", labels=["cluster", "verdict"])
        last = GaugeMetricFamily(
            f"{PREFIX}cluster_last_scan_timestamp_seconds",
            "When the cluster's latest scan started, whatever its outcome (Unix time)",
            labels=["cluster"])
        success = GaugeMetricFamily(
            f"{PREFIX}cluster_last_successful_scan_timestamp_seconds",
            "When the cluster's latest scan that was not an error started (Unix time); absent "
            "while the cluster has none", labels=["cluster"])
        controls = GaugeMetricFamily(
            f"{PREFIX}control_status",
            "Each control the cluster's latest scan checked (felix-metrics, typha-metrics, "
            "kube-controllers-metrics): 1 compliant, 0 non-compliant, -1 could not be checked "
            "(error); the cluster is compliant only if every one is 1",
            labels=["cluster", "control"])
        fleet = dict.fromkeys((*STATUSES, "never_scanned"), 0)
        fleet_nodes = dict.fromkeys((v for v, _ in VERDICTS), 0)
        for st in states:
            compliant.add_metric([st.cluster], 1.0 if st.status == "compliant" else 0.0)
            for name in STATUSES if st.status in STATUSES else (*STATUSES, st.status):
                status.add_metric([st.cluster, name], 1.0 if st.status == name else 0.0)
            for verdict, field in VERDICTS:
                count = getattr(st, field)
                nodes.add_metric([st.cluster, verdict], float(count))
                fleet_nodes[verdict] += count
            for control, control_status in st.controls.items():
                controls.add_metric([st.cluster, control],
                                    CONTROL_VALUES.get(control_status, -1.0))
            last.add_metric([st.cluster], st.last_scan.timestamp())
            if st.last_success is not None:
                success.add_metric([st.cluster], st.last_success.timestamp())
            fleet[st.status] = fleet.get(st.status, 0) + 1
        fleet["never_scanned"] = len(set(self.configured) - {st.cluster for st in states})
        clusters = GaugeMetricFamily(
            f"{PREFIX}fleet_clusters",
            "Clusters by the status of their latest scan; never_scanned: configured in this "
            "serve, no scan stored yet", labels=["status"])
        for name, count in fleet.items():
            clusters.add_metric([name], float(count))
        fleet_verdicts = GaugeMetricFamily(
            f"{PREFIX}fleet_nodes", "Nodes of every cluster's latest scan, by verdict",
            labels=["verdict"])
        for verdict, count in fleet_nodes.items():
            fleet_verdicts.add_metric([verdict], float(count))
        yield from (compliant, status, nodes, controls, last, success, clusters,
                    fleet_verdicts)

    def _alerts(self) -> Iterable[Metric]:
        alerts = self.alerts
        counters = (
            ("delivered", "Alerts this process delivered to the webhook"),
            ("failed", "Alerts this process gave up on after its retries (refused, or no "
                       "answer)"),
            ("dropped", "Alerts this process dropped unsent because its queue was full"),
        )
        for field, text in counters:
            family = CounterMetricFamily(f"{PREFIX}alerts_{field}_total", text)
            family.add_metric([], float(getattr(alerts, field) if alerts is not None else 0))
            yield family
        queued = GaugeMetricFamily(f"{PREFIX}alerts_queued",
                                   "Alerts waiting for delivery, the one in hand included")
        queued.add_metric([], float(alerts.health().queued if alerts is not None else 0))
        yield queued


def metrics_registry(store: Store, *, stats: ScanStats | None = None,
                     alerts: AlertCounts | None = None,
                     configured: Sequence[str] = ()) -> CollectorRegistry:
    """A registry of this app's own (never the process-global one): felixscan's metrics and
    the standard `process_*` ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FelixscanCollector(store, stats=stats, alerts=alerts,
                                         configured=configured))
    registry.register(ProcessCollector(registry=None))
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape's body and content type: Prometheus text, or OpenMetrics when asked for."""
    encoder, content_type = choose_encoder(accept or "")
    body: bytes = encoder(registry)
    return body, content_type
