"""`felixscan serve`: the scan scheduler (APScheduler) and the web page, in one daemon.

`ScanScheduler` runs one cron job per cluster. A job takes the cluster's database lock and calls
the same `run_scan` as `felixscan scan`; a run still going when the next is due makes that next
one a `skipped` row. At most `serve.max_concurrent_scans` runs go at once (each scans one
cluster: `scan.max_concurrent_clusters` bounds a multi-cluster `felixscan scan` instead), and
their probe sockets share the process's budget (`scanner.scan.probe_sockets`). `run_serve`
starts the scheduler and the web server (uvicorn, own thread), then waits for SIGTERM/SIGINT:
no new runs, running scans get the grace period, whatever is still running after it is marked
aborted.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from apscheduler.events import (
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from scanner.app.alerts import AlertSender, build_alert, transition
from scanner.core.config import ClusterSettings, Settings, parse_listen
from scanner.core.errors import ConfigError, FelixscanError, StoreError
from scanner.db.locks import DatabaseLock, HeldLock, cluster_lock_name
from scanner.db.runs import (
    abort_runs,
    last_scan_started,
    previous_status,
    reconcile_runs,
    record_skipped,
)
from scanner.db.store import Store
from scanner.web.metrics import ScanStats
from scanner.web.state import JobInfo

if TYPE_CHECKING:
    from scanner.core.records import ClusterResult

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# The integration point for auto-remediation (issue 6): called after a non-compliant scan of a
# cluster whose `remediation.auto` (and `enabled`) is true, while the cluster's lock is held;
# a FelixscanError it raises is logged. Wired by passing `remediate=` to `run_serve`, e.g.
# `lambda cs, result, store, lock: remediate(settings, cs.name, store=store, apply=True,
# trigger="serve:auto", lock=lock)` with `scanner.remediate.remediate` (which takes no lock
# itself). Called with the cluster lock held (and given it, so that nothing is changed or
# stored once it is lost) after a non-compliant scheduled scan; returns the verifying scan's
# result and run id when it made one, so an alert can say whether it worked.
Remediator = Callable[[ClusterSettings, "ClusterResult", Store, "HeldLock | None"],
                      "tuple[ClusterResult, int] | None"]
TRIGGER = "schedule"
LOCK_BUSY = "another felixscan holds the cluster's lock"
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- triggers ------------------------------------------------------------------------------


def crontab_weekdays(field_text: str) -> str:
    """A crontab day-of-week field in APScheduler 3's terms.

    Crontab counts 0 (and 7) as Sunday, APScheduler 3 counts 0 as Monday; numeric fields are
    rewritten as day names so `0 2 * * 0` runs on Sunday as in any crontab.
    """
    if field_text == "*" or any(c.isalpha() for c in field_text):
        return field_text  # names mean the same to both
    days: set[int] = set()
    for part in field_text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            a, b = base.split("-", 1)
            first, last = int(a), int(b)
        else:
            first = int(base)
            last = 7 if step_text else first
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last and step >= 1):
            raise ValueError(f"bad day-of-week field {field_text!r}")
        days.update(d % 7 for d in range(first, last + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def cron_trigger(expr: str, *, timezone: str, jitter: int = 0) -> CronTrigger:
    """A 5-field crontab expression read in `timezone`, with up to `jitter` seconds of delay."""
    minute, hour, day, month, weekday = expr.split()
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=crontab_weekdays(weekday), timezone=timezone,
                       jitter=jitter or None)


def last_fire(trigger: CronTrigger, *, now: datetime, window: timedelta) -> datetime | None:
    """The trigger's last fire time in (now - window, now], without jitter; None if none."""
    exact = copy.copy(trigger)
    exact.jitter = None
    # APScheduler 3 only looks forward: start from the shortest look-back that holds a fire
    # time, so walking forward to `now` takes a few steps, not one per second of the window.
    for back in (timedelta(seconds=2), timedelta(minutes=2), timedelta(hours=2),
                 timedelta(days=2), timedelta(days=62), window):
        when = exact.get_next_fire_time(None, now - min(back, window))
        if when is not None and when <= now:
            break
    else:
        return None
    last = when
    while when is not None and when <= now:
        last = when
        when = exact.get_next_fire_time(when, when + timedelta(microseconds=1))
    result: datetime = last.astimezone(UTC)
    return result


# --- the store of a serving process --------------------------------------------------------


class ServeStore(Store):
    """A `Store` that knows which scan runs this process has open, to abort them at exit."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._open: set[int] = set()
        self._open_lock = threading.Lock()

    def begin_run(self, *, trigger: str, started_at: datetime | None = None,
                  vantage: str | None = None) -> int:
        run_id = super().begin_run(trigger=trigger, started_at=started_at, vantage=vantage)
        with self._open_lock:
            self._open.add(run_id)
        return run_id

    def finish_run(self, run_id: int, *, status: str = "finished",
                   finished_at: datetime | None = None, note: str | None = None) -> None:
        super().finish_run(run_id, status=status, finished_at=finished_at, note=note)
        with self._open_lock:
            self._open.discard(run_id)

    def open_runs(self) -> set[int]:
        with self._open_lock:
            return set(self._open)


# --- the scheduler -------------------------------------------------------------------------


@dataclass
class _Job:
    cluster: ClusterSettings
    trigger: CronTrigger
    info: JobInfo
    busy: threading.Lock = field(default_factory=threading.Lock)


class ScanScheduler:
    """One APScheduler cron job per scheduled cluster; a job is `run_cluster(name)`."""

    def __init__(self, settings: Settings, store: Store, *, alerts: AlertSender | None = None,
                 remediate: Remediator | None = None, clock: Clock = utcnow,
                 triggers: Mapping[str, CronTrigger] | None = None,
                 stats: ScanStats | None = None) -> None:
        """`triggers` replaces the cron triggers of the named clusters (tests fire each second).
        `stats` counts this process's scans for /metrics (by default a fresh one)."""
        self.settings = settings
        self.store = store
        self.alerts = alerts
        self.remediate = remediate
        self.stats = stats if stats is not None else ScanStats()
        self.clock = clock
        self.locks = DatabaseLock(store, ttl_seconds=settings.serve.lock_ttl_seconds)
        serve = settings.serve
        self.grace = timedelta(seconds=serve.misfire_grace_seconds)
        self._jobs: dict[str, _Job] = {}
        for cluster in settings.clusters:
            expr = cluster.schedule or settings.schedule
            tz = cluster.timezone or serve.timezone
            if triggers and cluster.name in triggers:
                trigger = triggers[cluster.name]
            elif expr:
                trigger = cron_trigger(expr, timezone=tz, jitter=serve.jitter_seconds)
            else:
                continue
            self._jobs[cluster.name] = _Job(cluster, trigger, JobInfo(
                cluster=cluster.name, schedule=expr or str(trigger), timezone=tz))
            self.stats.expect(cluster.name)
        self._slots = threading.BoundedSemaphore(serve.max_concurrent_scans)
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._active = 0
        self._warned_remediation: set[str] = set()
        # Enough threads that a firing always reaches `run_cluster` at once (and is recorded
        # as skipped when its cluster is busy); the semaphore above caps concurrent scans.
        workers = min(64, 2 * len(self._jobs) + 2)
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
            job_defaults={"coalesce": serve.coalesce, "max_instances": 3,
                          "misfire_grace_time": serve.misfire_grace_seconds},
            timezone=serve.timezone)
        self._scheduler.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)

    # --- life cycle ------------------------------------------------------------------------

    def start(self, *, catch_up: bool = True) -> None:
        try:  # runs left `running` by a process that died (a serve killed before this one)
            reconcile_runs(self.store, self.locks)
        except StoreError as exc:
            log.error("runs of processes that are gone could not be marked aborted: %s", exc)
        for name, job in self._jobs.items():
            self._scheduler.add_job(self.run_cluster, job.trigger, args=[name], id=name,
                                    name=f"scan {name}")
        self._scheduler.start()
        if not self._jobs:
            log.warning("no cluster has a schedule: serve runs no scans (web page only)")
        if catch_up:
            for name, slot in self.missed(self.clock()):
                log.info("cluster %s: the %s run was missed; running it now", name,
                         slot.isoformat(timespec="minutes"))
                self._catch_up(name, slot)

    def _catch_up(self, name: str, slot: datetime, *, retry: bool = True,
                  at: datetime | None = None) -> None:
        self._scheduler.add_job(self._catch_up_run, "date", run_date=at, args=[name, slot],
                                kwargs={"retry": retry}, id=f"catch-up:{name}",
                                name=f"catch-up scan {name}", misfire_grace_time=None,
                                replace_existing=True)

    def _catch_up_run(self, name: str, slot: datetime, *, retry: bool) -> str:
        outcome = self.run_cluster(name, slot=slot)
        if outcome.startswith(f"skipped: {LOCK_BUSY}") and retry and not self._stopping.is_set():
            # Either a replica is scanning it (the retry then finds the scan and stops) or a
            # process that died left a SQLite lease behind: try once more after it expired.
            later = self.clock() + timedelta(seconds=self.settings.serve.lock_ttl_seconds + 1)
            log.info("cluster %s: catch-up retried at %s", name, later.isoformat())
            self._catch_up(name, slot, retry=False, at=later)
        return outcome

    def missed(self, now: datetime) -> list[tuple[str, datetime]]:
        """Clusters whose last due run (within the misfire grace) has no scan since.

        Read from the database, not from memory: this covers downtime of this process, and a
        run another replica made counts. Several missed runs give one catch-up (coalescing).
        """
        due: list[tuple[str, datetime]] = []
        for name, job in self._jobs.items():
            slot = last_fire(job.trigger, now=now, window=self.grace)
            if slot is None:
                continue
            last = last_scan_started(self.store, name)
            if last is None or last < slot:
                due.append((name, slot))
        return due

    def running(self) -> bool:
        """True while the scheduler accepts runs (for /readyz)."""
        return self._scheduler.running and not self._stopping.is_set()

    def stop_new(self) -> None:
        """Fire no more jobs; runs already going carry on."""
        self._stopping.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def wait_idle(self, timeout: float) -> bool:
        """Wait for running scans to end; False when some are still going after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def jobs(self) -> dict[str, JobInfo]:
        """Each scheduled cluster's next run and last outcome in this process."""
        for name, job in self._jobs.items():
            ap_job = self._scheduler.get_job(name) if self._scheduler.running else None
            job.info.next_run = ap_job.next_run_time if ap_job is not None else None
            job.info.running = job.busy.locked()
        return {name: job.info for name, job in self._jobs.items()}

    # --- one run ---------------------------------------------------------------------------

    def run_cluster(self, name: str, slot: datetime | None = None) -> str:
        """The job: scan one cluster unless it is already being (or was just) scanned.

        Returns what happened, for logs and tests: `scanned`, `skipped: ...`, `aborted: ...`
        (the lock was lost: nothing stored), `stopping`.
        """
        job = self._jobs[name]
        if self._stopping.is_set():
            return "stopping"
        now = self.clock()
        slot = slot or last_fire(job.trigger, now=now, window=self.grace) or now
        if not job.busy.acquire(blocking=False):
            return self._skip(job, now, "the previous run of this cluster is still going")
        with self._idle:
            self._active += 1
        try:
            return self._run_locked(job, slot)
        finally:
            job.busy.release()
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _run_locked(self, job: _Job, slot: datetime) -> str:
        name = job.cluster.name
        while not self._slots.acquire(timeout=0.5):  # max_concurrent_scans
            if self._stopping.is_set():
                return "stopping"
        try:
            if self._stopping.is_set():
                return "stopping"
            with self.locks.hold(cluster_lock_name(name)) as held:
                if held is None:
                    holder = self.locks.holder(cluster_lock_name(name))
                    return self._skip(job, self.clock(), f"{LOCK_BUSY}"
                                      f"{f' ({holder})' if holder else ''}: a run of it "
                                      "is still going")
                # A replica may have scanned it for this slot while we waited for the lock.
                last = last_scan_started(self.store, name)
                if last is not None and last >= slot:
                    log.info("cluster %s: already scanned at %s for the %s run", name,
                             last.isoformat(timespec="seconds"), slot.isoformat())
                    job.info.last_outcome = "already scanned by another replica"
                    return "skipped: already scanned"
                return self._scan(job, held)
        finally:
            self._slots.release()

    def _scan(self, job: _Job, held: HeldLock) -> str:
        from scanner.scan import run_scan  # the kubernetes client loads with the first scan

        name = job.cluster.name
        job.info.last_started = self.clock()
        log.info("cluster %s: scheduled scan starting", name)
        began = time.monotonic()
        try:
            outcome = run_scan(self.settings.select([name]), store=self.store, trigger=TRIGGER,
                               clock=self.clock, locks=self.locks, held={name: held})
        except Exception:
            # The run itself failed: nothing was stored.
            self.stats.scan_ended(name, time.monotonic() - began, results=None)
            raise
        self.stats.scan_ended(name, time.monotonic() - began, results=[
            (r.cluster, r.status, r.cluster in outcome.stored) for r in outcome.clusters])
        if name in outcome.lock_lost:
            # Not stored, and nothing more under a lock another process may hold now: no
            # alert, no remediation.
            reason = dict(outcome.store_errors).get(name, "the cluster's lock was lost")
            log.error("cluster %s: scheduled scan aborted: %s", name, reason)
            job.info.last_outcome = f"aborted: {reason}"
            return f"aborted: {reason}"
        for result in outcome.clusters:
            log.info("cluster %s: %s (scan %d)", result.cluster, result.status, outcome.scan_id)
            if result.cluster in outcome.stored:
                self._alert(result, outcome.scan_id)
            if result.status == "non_compliant":
                self._auto_remediate(job.cluster, result, held)
        status = outcome.clusters[0].status if outcome.clusters else "nothing scanned"
        job.info.last_outcome = f"scanned: {status}"
        return "scanned"

    def _alert(self, result: ClusterResult, scan_id: int) -> None:
        if self.alerts is None:
            return
        try:
            previous = previous_status(self.store, result.cluster, before=result.started_at)
        except StoreError as exc:
            log.error("cluster %s: no alert decision, the database failed: %s",
                      result.cluster, exc)
            return
        event = transition(previous, result.status)
        if event is None:
            return
        self.alerts.send(build_alert(
            event=event, cluster=result.cluster, status=result.status, previous=previous,
            scan_id=scan_id, started_at=result.started_at, nodes=len(result.nodes),
            failing=sum(1 for n in result.nodes if n.verdict == "fail"),
            unknown=sum(1 for n in result.nodes if n.verdict == "unknown"),
            findings=[(f.id, f.severity) for f in result.findings],
            public_url=self.settings.serve.public_url))

    def _auto_remediate(self, cluster: ClusterSettings, result: ClusterResult,
                        held: HeldLock | None) -> None:
        if not (cluster.remediation.auto and cluster.remediation.enabled):
            return
        if self.remediate is None:
            if cluster.name not in self._warned_remediation:
                self._warned_remediation.add(cluster.name)
                log.warning("cluster %s: remediation.auto is set, but this felixscan has no "
                            "auto-remediation yet; nothing was changed", cluster.name)
            return
        try:
            verified = self.remediate(cluster, result, self.store, held)
        except FelixscanError as exc:
            log.error("cluster %s: auto-remediation failed: %s", cluster.name, exc)
            return
        if verified is not None:
            self._alert(*verified)

    def _skip(self, job: _Job, at: datetime, reason: str) -> str:
        log.warning("cluster %s: scheduled run skipped: %s", job.cluster.name, reason)
        job.info.last_outcome = f"skipped: {reason}"
        try:
            run_id = record_skipped(self.store, trigger=TRIGGER, at=at, cluster=job.cluster.name,
                                    note=reason)
        except StoreError as exc:
            log.error("cluster %s: the skipped run could not be recorded: %s",
                      job.cluster.name, exc)
        else:
            log.info("cluster %s: skipped run recorded as scan run %d", job.cluster.name, run_id)
        return f"skipped: {reason}"

    def _on_event(self, event: JobEvent) -> None:
        job = self._jobs.get(str(event.job_id))
        if job is None:
            return
        reason = ("it was due longer ago than serve.misfire_grace_seconds"
                  if event.code == EVENT_JOB_MISSED else
                  "three runs of this cluster are already going")
        self._skip(job, self.clock(), reason)

    def abort_unfinished(self) -> list[int]:
        """Mark this process's still-running scan runs aborted; returns their ids."""
        if not isinstance(self.store, ServeStore):
            return []
        return abort_runs(self.store, self.store.open_runs())


# --- the daemon ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServeResult:
    """How `run_serve` ended. `abandoned`: scans still running that the caller must end."""

    aborted: tuple[int, ...]
    abandoned: bool


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(listen: str) -> socket.socket:
    """The listening socket (bound here, so port 0 works and the real port can be printed)."""
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(str(exc), key="--listen") from exc
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say TCP, and
    # with Nagle on, every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}",
                          key="--listen") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_serve(settings: Settings, *, listen: str, environ: Mapping[str, str] | None = None,
              remediate: Remediator | None = None,
              announce: Callable[[str], None] | None = None) -> ServeResult:
    """Serve until SIGTERM/SIGINT, then shut down within `serve.shutdown_grace_seconds`."""
    import uvicorn

    from reports.cache import ReportCache
    from scanner.web.app import Auth, create_app

    env = os.environ if environ is None else environ
    host, _port = _listen_host(listen)
    auth = Auth.from_environ(env)
    # Optional: a second token that opens /metrics and nothing else, for Prometheus.
    metrics_auth = Auth.from_environ(env, name="FELIXSCAN_METRICS_TOKEN")
    if not auth.enabled and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {listen} without access control: set FELIXSCAN_WEB_TOKEN "
            "(or FELIXSCAN_WEB_TOKEN_FILE), or listen on 127.0.0.1", key="--listen")
    if not auth.enabled:
        log.warning("no FELIXSCAN_WEB_TOKEN: the web page is open to anyone on this machine")

    store = ServeStore(settings.database)
    stack: list[Callable[[], None]] = [store.close]
    try:
        store.ensure_schema()
        alerts = AlertSender(settings.alerts) if settings.alerts.webhook_url else None
        if alerts is not None:
            stack.append(lambda: alerts.close(timeout=5.0))
        scheduler = ScanScheduler(settings, store, alerts=alerts, remediate=remediate)
        cache = ReportCache(settings.serve.report_cache_dir or _default_cache_dir(),
                            entries=settings.serve.report_cache_entries,
                            signing=settings.report.signing, environ=env,
                            preparer=settings.report.preparer, owner=settings.report.owner)
        stack.append(cache.close)
        app = create_app(store=store, auth=auth, schedule=scheduler, alerts=alerts,
                         stats=scheduler.stats, reports=cache,
                         clusters=[c.name for c in settings.clusters],
                         metrics_auth=metrics_auth if metrics_auth.enabled else None)
        sock = bind(listen)
        stack.append(sock.close)
        grace = settings.serve.shutdown_grace_seconds
        config = uvicorn.Config(app, log_config=None, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=max(1, int(grace)))
        server = uvicorn.Server(config)
        stop = threading.Event()
        received: list[int] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore_signals() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        stack.append(restore_signals)
        web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="web")
        scheduler.start()
        web.start()
        address = _address(sock)
        log.info("felixscan serve: %d scheduled cluster(s), web page on %s",
                 len(scheduler.jobs()), address)
        if announce is not None:
            announce(address)
        while not stop.wait(1.0):
            if not web.is_alive():
                raise FelixscanError(f"the web server on {address} stopped")
        name = signal.Signals(received[0]).name if received else "stop"
        log.warning("%s: no new scans; running scans have %g s to finish", name, grace)
        scheduler.stop_new()
        server.should_exit = True
        deadline = time.monotonic() + grace
        stop.clear()
        # A second signal cuts the grace period short.
        finished = scheduler.wait_idle(0) or _wait(scheduler, deadline, stop)
        web.join(max(0.0, deadline - time.monotonic()) + 1.0)
        aborted: tuple[int, ...] = ()
        if not finished:
            aborted = tuple(scheduler.abort_unfinished())
            log.error("scans still running after the grace period; scan run(s) %s marked "
                      "aborted", ", ".join(map(str, aborted)) or "(none open)")
            # Last before the store closes (the stack unwinds backwards): the abandoned
            # scans' locks, so a restart need not wait for their SQLite leases to expire.
            stack.insert(1, scheduler.locks.release_all)
        return ServeResult(aborted=aborted, abandoned=not finished)
    finally:
        for undo in reversed(stack):
            undo()


def _wait(scheduler: ScanScheduler, deadline: float, interrupt: threading.Event) -> bool:
    while time.monotonic() < deadline:
        if scheduler.wait_idle(min(0.2, max(0.0, deadline - time.monotonic()))):
            return True
        if interrupt.is_set():
            log.warning("second signal: not waiting for running scans")
            return False
    return scheduler.wait_idle(0)


def _listen_host(listen: str) -> tuple[str, int]:
    try:
        return parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(str(exc), key="--listen") from exc


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _default_cache_dir() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / f"felixscan-reports-{os.getuid()}"


def auto_remediator(settings: Settings, *, clock: Clock = utcnow) -> Remediator:
    """The `remediation.auto` hook: remediate inside the maintenance window, verify, report.

    Outside the window it does nothing (the next scheduled scan inside the window will act).
    Refusals and failures are recorded by the remediation itself as actions.
    """
    def run(cluster: ClusterSettings, result: ClusterResult, store: Store,
            lock: HeldLock | None) -> tuple[ClusterResult, int] | None:
        from scanner.remediate import in_window, remediate

        window = cluster.remediation.window
        now = clock()
        if window is None or not in_window(window, now):
            log.info("cluster %s: non-compliant; auto-remediation waits for its maintenance "
                     "window (%s)", cluster.name, window.text if window else "none configured")
            return None
        outcome = remediate(settings, cluster.name, store=store, apply=True,
                            trigger="serve:auto", now=now, held=lock)
        log.warning("cluster %s: auto-remediation %s (action %s): %s", cluster.name,
                    outcome.outcome, outcome.action_id, outcome.message)
        if outcome.verify is not None and outcome.verify_run_id is not None:
            return outcome.verify, outcome.verify_run_id
        return None

    return run
