"""One scan, top to bottom: collect -> declared state -> probe -> evaluate -> store, per cluster.

`run_scan` is the single library entry point; the CLI, the scheduler, the demo and the tests all
call it. Clusters are scanned concurrently, at most `scan.max_concurrent_clusters` at once (one
collects while another probes); one cluster's failure is stored as its ERROR result and never
stops the others. The probe sockets of every cluster probing in this process share one budget
(`probe_sockets`).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime

import yaml

from scanner import __version__
from scanner.core.calico import cluster_declared, resolve_nodes
from scanner.core.component_eval import (
    METRIC_PREFIX,
    component_declared,
    evaluate_component,
    targets_for,
)
from scanner.core.config import ClusterSettings, Settings
from scanner.core.errors import ClusterError, ConfigError, LockLost, StoreError
from scanner.core.evaluate import evaluate, failed_cluster, probe_targets, with_controls
from scanner.core.records import (
    FELIX,
    ClusterResult,
    ClusterSnapshot,
    Declared,
    ProbeResult,
    ProbeTarget,
)
from scanner.core.waivers import NO_WAIVERS, WaiverSet, apply_waivers, parse_waivers
from scanner.db.locks import DatabaseLock, HeldLock, cluster_lock_name, run_lock_name
from scanner.db.runs import reconcile_runs
from scanner.db.store import Store
from scanner.kube.client import Api, make_api
from scanner.kube.read import collect
from scanner.probe import Hints, ProbeSettings, probe_nodes, raise_nofile_limit
from scanner.telemetry import logs, progress

log = logging.getLogger(__name__)

Collector = Callable[[ClusterSettings], ClusterSnapshot]
# The protocol each Felix endpoint of a cluster answered with last time (`Store.last_protocols`):
# the probe speaks it first (a wrong one costs a connect, never a verdict).
HintSource = Callable[[str], Hints]
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ScanOutcome:
    scan_id: int
    started_at: datetime
    finished_at: datetime
    clusters: tuple[ClusterResult, ...]
    stored: tuple[str, ...]  # clusters whose result is in the database
    store_errors: tuple[tuple[str, str], ...] = ()  # (cluster, reason) not stored
    # Clusters whose lock was lost before their result was stored (also in store_errors):
    # another process may have scanned them meanwhile, so nothing was stored and the run is
    # aborted; nothing else may act on them under that lock either (auto-remediation).
    lock_lost: tuple[str, ...] = ()
    vantage: str | None = None  # where the probes came from (settings.vantage; None: this host)

    @property
    def status(self) -> str:
        """The run's worst outcome: `not_stored` (a result is not in the database: the record
        is incomplete), else `non_compliant`, else `error` (a cluster not scanned), else
        `compliant`. The CLI maps it to an exit code (`scanner.app.exitcodes`)."""
        if self.store_errors:
            return "not_stored"
        if any(c.status == "non_compliant" for c in self.clusters):
            return "non_compliant"
        if any(c.status == "error" for c in self.clusters):
            return "error"
        return "compliant"


def probe_settings(cluster: ClusterSettings) -> ProbeSettings:
    p = cluster.probe
    return ProbeSettings(timeout_seconds=p.timeout_seconds,
                         tls_timeout_seconds=p.tls_timeout_seconds,
                         http_timeout_seconds=p.http_timeout_seconds,
                         concurrency=p.concurrency, user_agent=f"felixscan/{__version__}")


class ProbeSockets:
    """A budget of probe sockets shared by every cluster probing in this process.

    Each cluster's probe opens up to `probe.concurrency` sockets at once, in its own thread and
    event loop; several clusters probing together (`scan.max_concurrent_clusters` in one run,
    `serve.max_concurrent_scans` runs in serve) would add theirs up past the open-files limit
    (RLIMIT_NOFILE is per process), and a connect that fails with EMFILE is a probe that did
    not happen. So a cluster reserves its sockets here before it probes, and gets
    min(concurrency, targets) when that many are free; when fewer are free it takes what there
    is, if that is at least `floor` (or all it wants), else it waits for another cluster to
    finish probing. A smaller pool only queues probes: each probe's own timeouts start at its
    connect, so no verdict depends on the share a cluster got. A budget (rather than the
    limit divided by the bound) lets one cluster probing alone use all of it, and covers
    serve's runs too, which are separate `run_scan` calls in one process.
    """

    def __init__(self, total: int, *, floor: int = 32) -> None:
        if total < 1:
            raise ValueError(f"a budget of at least one socket is needed, not {total}")
        self.total = total
        self.floor = max(1, min(floor, total))
        self._free = total
        self._changed = threading.Condition()

    @property
    def free(self) -> int:
        with self._changed:
            return self._free

    @contextmanager
    def reserve(self, want: int) -> Iterator[int]:
        """The sockets granted (1 to `want`), held until the block ends."""
        want = max(1, min(want, self.total))
        with self._changed:
            while self._free < min(want, self.floor):
                self._changed.wait()
            granted = min(want, self._free)
            self._free -= granted
        try:
            yield granted
        finally:
            with self._changed:
                self._free += granted
                self._changed.notify_all()


_FD_RESERVE = 256  # descriptors kept for the rest: database pool, API connections, event loops


@functools.cache
def probe_sockets() -> ProbeSockets:
    """This process's budget: the open-files limit (raised to its hard limit), less what the
    database, the API clients, the event loops and the logs need."""
    limit = raise_nofile_limit()
    return ProbeSockets(max(1, limit - min(_FD_RESERVE, limit // 2)))


def scan_cluster(cluster: ClusterSettings, *, collector: Collector = collect,
                 clock: Clock = utcnow, hints: HintSource | None = None) -> ClusterResult:
    """Collect, probe and evaluate one cluster; never raises for the cluster's own faults."""
    with logs.context(cluster=cluster.name), \
            progress.current().cluster(cluster.name) as track:
        result = _scan_cluster(cluster, collector=collector, clock=clock, track=track,
                               hints=hints)
        track.scanned(result.status)
        return result


class _Collection:
    """The collector; the default one gets its API client from here, so that the number of
    requests it made can be logged (with the deadline `collect` would give itself)."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.api: Api | None = None

    def __call__(self, cluster: ClusterSettings) -> ClusterSnapshot:
        if self.collector is not collect:
            return self.collector(cluster)
        self.api = make_api(cluster, deadline=time.monotonic() + cluster.deadline_seconds)
        return collect(cluster, api=self.api)

    @property
    def requests(self) -> int | None:
        return self.api.requests if self.api is not None else None


def _scan_cluster(cluster: ClusterSettings, *, collector: Collector, clock: Clock,
                  track: progress.ClusterProgress, hints: HintSource | None = None,
                  ) -> ClusterResult:
    started_at = clock()
    t0 = time.monotonic()
    collection = _Collection(collector)
    with logs.context(phase="collect"):
        try:
            snapshot = collection(cluster)
        except ClusterError as exc:
            log.warning("cluster %s: %s", cluster.name, exc, extra=logs.fields(
                requests=collection.requests, seconds=round(time.monotonic() - t0, 3)))
            return failed_cluster(cluster.name, str(exc), kind=type(exc).__name__,
                                  started_at=started_at, finished_at=clock(),
                                  timings={"api": time.monotonic() - t0},
                                  controls=cluster.controls)
        t1 = time.monotonic()
        requests = collection.requests
        log.info("collect %s: %s requests, %d nodes, %d pods in %.2f s", cluster.name,
                 "?" if requests is None else requests, len(snapshot.nodes), len(snapshot.pods),
                 t1 - t0, extra=logs.fields(requests=requests, nodes=len(snapshot.nodes),
                                            pods=len(snapshot.pods), seconds=round(t1 - t0, 3)))
    felix = FELIX in cluster.controls
    # Without the felix-metrics control nothing of Felix is resolved, probed or evaluated.
    declared = resolve_nodes(snapshot) if felix else {}
    targets = probe_targets(snapshot, declared, address_type=cluster.probe.address_types,
                            extra_ports=cluster.probe.extra_ports) if felix else []
    # Typha's and kube-controllers' pods, probed where each would listen (a few targets).
    parts: dict[str, tuple[dict[str, Declared], list[ProbeTarget]]] = {}
    for control in cluster.controls:
        component = snapshot.components.get(control)
        if control == FELIX or component is None or not component.found or component.error:
            continue
        pod_declared = component_declared(snapshot, component)
        parts[control] = (pod_declared, targets_for(snapshot, component, pod_declared,
                                                    address_types=cluster.probe.address_types))
    with logs.context(phase="probe"):
        track.phase("probe")
        track.targets(targets)
        probes, part_probes = _probe(cluster, targets, parts, track,
                                     _hints(cluster.name, hints) if targets else None)
        t2 = time.monotonic()
        states = Counter(p.state for p in probes)
        log.info("probe %s: %d targets (%d open, %d closed, %d filtered, %d unreachable, "
                 "%d error) in %.2f s", cluster.name, len(targets), states["open"],
                 states["closed"], states["filtered"], states["unreachable"], states["error"],
                 t2 - t1, extra=logs.fields(
                     targets=len(targets), open=states["open"], closed=states["closed"],
                     filtered=states["filtered"], unreachable=states["unreachable"],
                     error=states["error"], seconds=round(t2 - t1, 3)))
    track.phase("evaluate")
    with logs.context(phase="evaluate"):
        timings = {"api": t1 - t0, "probe": t2 - t1}
        if felix:
            result = evaluate(snapshot, declared, probes,
                              cluster_declared=cluster_declared(snapshot, declared),
                              started_at=started_at, finished_at=clock(), timings=timings)
        else:  # what with_controls keeps of Felix's result when Felix is not checked
            result = ClusterResult(cluster=snapshot.cluster, status="compliant",
                                   install=snapshot.install, declared=None, nodes=(),
                                   findings=(), error=None, started_at=started_at,
                                   finished_at=clock(), snapshot=snapshot, timings=timings)
        result = with_controls(result, snapshot, cluster.controls, {
            control: evaluate_component(snapshot, control, parts.get(control, ({}, []))[0],
                                        part_probes.get(control, []),
                                        address_types=cluster.probe.address_types,
                                        started_at=started_at)
            for control in cluster.controls if control != FELIX})
    p = cluster.probe
    return replace(result, timings={**timings, "evaluate": time.monotonic() - t2}, method={
        "address_type": p.address_type, "address_types": list(p.address_types),
        "timeout_seconds": p.timeout_seconds, "tls_timeout_seconds": p.tls_timeout_seconds,
        "http_timeout_seconds": p.http_timeout_seconds,
        "concurrency": p.concurrency, "extra_ports": list(p.extra_ports),
        "targets": len(targets), "api_timeout_seconds": cluster.api_timeout_seconds})


def _probe(cluster: ClusterSettings, targets: list[ProbeTarget],
           parts: Mapping[str, tuple[dict[str, Declared], list[ProbeTarget]]],
           track: progress.ClusterProgress, hints: Hints | None = None,
           ) -> tuple[list[ProbeResult], dict[str, list[ProbeResult]]]:
    """Felix's probes and the other controls' (one after the other), within the sockets this
    cluster reserved from the process's budget."""
    want = max(len(targets), *(len(t) for _d, t in parts.values()), 0)
    if not want:
        return [], {control: [] for control in parts}
    settings = probe_settings(cluster)
    with probe_sockets().reserve(min(settings.concurrency, want)) as granted:
        if granted < min(settings.concurrency, want):
            log.info("probe %s: %d sockets at once, not %d: other clusters' probes hold the "
                     "rest of this process's budget", cluster.name, granted,
                     min(settings.concurrency, want))
        settings = replace(settings, concurrency=granted)
        probes = probe_nodes(targets, settings, on_result=track.probed, hints=hints) \
            if targets else []
        part_probes = {control: probe_nodes(
            part_targets, replace(settings, metric_prefix=METRIC_PREFIX[control]))
            if part_targets else [] for control, (_d, part_targets) in parts.items()}
    return probes, part_probes


def run_scan(settings: Settings, *, store: Store, trigger: str = "cli",
             collector: Collector = collect, clock: Clock = utcnow,
             lock_wait: float | None = None, locks: DatabaseLock | None = None,
             held: Mapping[str, HeldLock] | None = None) -> ScanOutcome:
    """Scan every configured cluster and store each result in its own transaction.

    At most `settings.scan.max_concurrent_clusters` clusters are scanned at once, each in a
    thread of its own (collect, probe, evaluate); results are stored here, one at a time, as
    they come, so one cluster is stored while others are still collecting or probing.

    `clock` stamps the run and its results (the demo replays several days with it). With
    `lock_wait` (seconds) each cluster is scanned under the database lock `serve` uses, so a
    CronJob agent and a scheduler never scan one cluster at the same moment; a cluster still
    locked after that wait is reported as an error, not scanned twice. Callers that already
    hold the lock (the scheduler, remediation) leave it None, and pass the locks they hold as
    `held` (by cluster name). A result is stored only while its cluster's lock is still held
    (the write is fenced); one whose lock was lost is not stored, and the run is aborted.

    The run holds a lock of its own while it runs (`run:<id>`), so that a run whose process
    died is recognised and marked aborted: each run does that for those it finds. `locks`
    takes them all (default: a `DatabaseLock` on `store`).
    """
    waivers = load_waivers(settings, today=clock().date())  # a bad file: nothing is scanned
    store.ensure_schema()
    locks = locks or DatabaseLock(store)
    try:
        reconcile_runs(store, locks)
    except StoreError as exc:  # others' bookkeeping: this scan goes on (or fails on its own)
        log.error("runs of processes that are gone could not be marked aborted: %s", exc)
    started_at = clock()
    vantage = settings.vantage or socket.gethostname()  # where this run probes from
    run_id = store.begin_run(trigger=trigger, started_at=started_at, vantage=vantage)
    shown = progress.current()
    scope = ExitStack()  # the run's log fields and progress, until the run is closed
    results: dict[int, ClusterResult] = {}
    stored: dict[int, str] = {}
    store_errors: dict[int, tuple[str, str]] = {}
    lost: dict[int, str] = {}
    status = "aborted"
    note: str | None = None
    alive: HeldLock | None = None
    futures: dict[Future[tuple[ClusterResult, HeldLock | None]], int] = {}
    try:
        scope.enter_context(logs.context(scan_id=run_id))
        scope.enter_context(shown.run(run_id, [c.name for c in settings.clusters]))
        alive = locks.try_acquire(run_lock_name(run_id))
        if alive is None:  # a row left by a dead run with this id (ids can be reused)
            log.warning("scan run %d: its own lock is taken; it cannot be told apart from a "
                        "run whose process died", run_id)
        workers = max(1, min(len(settings.clusters), settings.scan.max_concurrent_clusters))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cluster") as pool:
            scan = _unlocked_scan if lock_wait is None else functools.partial(
                _locked_scan, locks=locks, wait=lock_wait)
            # Each cluster's thread gets a copy of this context: its log lines carry the
            # run's id, and its progress is shown with the run's.
            futures = {pool.submit(contextvars.copy_context().run, scan, c,
                                   collector=collector, clock=clock,
                                   hints=store.last_protocols): i
                       for i, c in enumerate(settings.clusters)}
            # Each result is stored as soon as it is ready, and only then is the cluster's
            # lock released: the next scan of that cluster (another process's) is stored
            # after it, so the rollups see a cluster's scans in the order they were made.
            for future in as_completed(futures):
                i = futures[future]
                result, taken = future.result()
                result = apply_waivers(result, waivers)
                fence = taken or (held or {}).get(result.cluster)
                shown.phase(result.cluster, "store")
                t = time.monotonic()
                with logs.context(cluster=result.cluster, phase="store"):
                    try:
                        store.save_cluster(run_id, result, lock=fence)
                    except LockLost as exc:
                        log.error("cluster %s: result not stored: %s", result.cluster, exc)
                        store_errors[i] = (result.cluster, str(exc))
                        lost[i] = result.cluster
                    except StoreError as exc:
                        log.error("cluster %s: result not stored: %s", result.cluster, exc)
                        store_errors[i] = (result.cluster, str(exc))
                    else:
                        stored[i] = result.cluster
                        rows = 1 + len(result.nodes) + len(result.findings)
                        log.info("store %s: %d rows in %.3f s", result.cluster, rows,
                                 time.monotonic() - t, extra=logs.fields(
                                     rows=rows, seconds=round(time.monotonic() - t, 3)))
                    finally:
                        if taken is not None:
                            taken.release()
                    shown.finished(result.cluster, result.status if i in stored
                                   else "not stored")
                timings = {**result.timings, "store": time.monotonic() - t}
                results[i] = _with_timings(result, timings)
        if lost:
            note = "; ".join(f"cluster {store_errors[i][0]} not stored: {store_errors[i][1]}"
                             for i in sorted(lost))
        else:
            status = "finished"
    finally:
        _release_unstored(futures)
        finished_at = clock()
        try:
            store.finish_run(run_id, status=status, finished_at=finished_at, note=note)
        except StoreError as exc:
            log.error("scan run %s could not be closed: %s", run_id, exc)
        if alive is not None:  # after the run is closed: until then it is still going
            alive.release()
        scope.close()
    return ScanOutcome(scan_id=run_id, started_at=started_at, finished_at=finished_at,
                       clusters=tuple(results[i] for i in sorted(results)),
                       stored=tuple(stored[i] for i in sorted(stored)),
                       store_errors=tuple(store_errors[i] for i in sorted(store_errors)),
                       lock_lost=tuple(lost[i] for i in sorted(lost)),
                       vantage=vantage)


def load_waivers(settings: Settings, *, today: date) -> WaiverSet:
    """The accepted risks of `settings.waivers_file` as of `today` (none without one).

    A file that cannot be read or is not a YAML list is a ConfigError: nothing is scanned. A
    bad entry is not: it is reported as a WAIVER-INVALID finding and applies to nothing.
    """
    path = settings.waivers_file
    if path is None:
        return NO_WAIVERS
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}",
                          source=settings.source, key="waivers_file") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", source=settings.source,
                          key="waivers_file") from exc
    try:
        return parse_waivers(data, source=path.name, today=today,
                             max_days=settings.waiver_max_days)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}", source=settings.source,
                          key="waivers_file") from exc


def _hints(cluster: str, source: HintSource | None) -> Hints | None:
    """What the database says each endpoint spoke last time; None when it cannot say (the
    probe then learns as it goes: the hints only save connects)."""
    if source is None:
        return None
    try:
        return source(cluster)
    except StoreError as exc:
        log.warning("cluster %s: the previous scan's protocols could not be read, probing "
                    "without them: %s", cluster, exc)
        return None


def _unlocked_scan(cluster: ClusterSettings, *, collector: Collector, clock: Clock,
                   hints: HintSource | None = None) -> tuple[ClusterResult, HeldLock | None]:
    return scan_cluster(cluster, collector=collector, clock=clock, hints=hints), None


def _locked_scan(cluster: ClusterSettings, *, collector: Collector, clock: Clock,
                 locks: DatabaseLock, wait: float, hints: HintSource | None = None,
                 ) -> tuple[ClusterResult, HeldLock | None]:
    """The result and the cluster's lock, still held: the caller releases it once the result
    is stored."""
    name = cluster_lock_name(cluster.name)
    started_at = clock()
    deadline = time.monotonic() + wait
    while True:
        held = locks.try_acquire(name)
        if held is None:
            progress.current().phase(cluster.name, "lock")
        else:
            try:
                return scan_cluster(cluster, collector=collector, clock=clock,
                                    hints=hints), held
            except BaseException:
                held.release()
                raise
        if time.monotonic() >= deadline:
            holder = locks.holder(name)
            return failed_cluster(
                cluster.name, f"another felixscan is scanning this cluster"
                f"{f' ({holder})' if holder else ''} and still was after {wait:g}s; "
                "not scanned twice at once", kind="Locked", started_at=started_at,
                finished_at=clock(), controls=cluster.controls), None
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def _release_unstored(futures: Iterable[Future[tuple[ClusterResult, HeldLock | None]]]) -> None:
    """The locks of results never stored (the run ended on an error first); releasing one
    twice does nothing."""
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is None:
            _result, held = future.result()
            if held is not None:
                held.release()


def _with_timings(result: ClusterResult, timings: dict[str, float]) -> ClusterResult:
    return replace(result, timings=timings)
