"""Progress of scans and long steps, on stderr only (stdout carries --json and reports).

Library code reports to `current()`, which does nothing unless a command opened a `session()`:
`scanner.scan` reports each run, cluster, phase and probed target, `scanner.app.demo` its nights,
the CLI a report being rendered, `remediate` its rollout. On a terminal (stderr a TTY, text
logs) one line is redrawn in place while work goes on and cleared when it stops; log lines
print above it. Elsewhere (a CronJob, a pipe, JSON logs) progress is logged by
`scanner.progress` at INFO: one line per 10% of a cluster's targets (at most one a second), one
when a cluster is done, and a summary of what is still going on every 10 seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TextIO

from scanner.core.records import ProbeResult, ProbeTarget
from scanner.telemetry.logs import PROGRESS_LOGGER, console_handlers, fields

HEARTBEAT_SECONDS = 10.0  # a summary line this often while anything is going on (no terminal)
STEP_PERCENT = 10  # a line per this share of a cluster's targets probed (no terminal) ...
STEP_GAP_SECONDS = 1.0  # ... but not more often than this per cluster
REDRAW_SECONDS = 0.1  # the terminal line is redrawn at most this often
BAR_WIDTH = 20
_SPINNER = "|/-\\"
_ACTIVE = ("lock", "collect", "probe", "evaluate", "store")  # shown on the line, in this order

log = logging.getLogger(PROGRESS_LOGGER)


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """`[#####---------------]`: the bar of the scan line and of remediate's rollout."""
    done = round(width * min(1.0, max(0.0, fraction)))
    return f"[{'#' * done}{'-' * (width - done)}]"


def seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


# --- what the library calls ------------------------------------------------------------------


class ClusterProgress:
    """One cluster being scanned (`Progress.cluster`); this one reports to nobody."""

    def phase(self, phase: str) -> None:
        """lock, collect, probe, evaluate (store: `Progress.phase` from the run)."""

    def targets(self, targets: Sequence[ProbeTarget]) -> None:
        """The addresses about to be probed (several per node with extra ports or families)."""

    def probed(self, target: ProbeTarget, result: ProbeResult) -> None:
        """One target done: `scanner.probe.probe_many`'s `on_result`."""

    def scanned(self, status: str) -> None:
        """The cluster's verdict is known (stored later by the run, if there is one)."""


class Task:
    """A step without clusters (a report rendering, a rollout); this one reports to nobody."""

    def update(self, text: str, fraction: float | None = None) -> None:
        """New text (and share done) for the line; logged at once when there is no terminal."""

    def close(self) -> None:
        """The step is over."""


class Progress:
    """What is going on, as the library reports it; this base class shows nothing."""

    @contextmanager
    def run(self, run_id: int, clusters: Sequence[str]) -> Iterator[None]:
        """A scan run of these clusters (`scanner.scan.run_scan`)."""
        yield

    @contextmanager
    def cluster(self, name: str) -> Iterator[ClusterProgress]:
        """One cluster's collect, probe and evaluate (`scanner.scan.scan_cluster`)."""
        yield ClusterProgress()

    def phase(self, cluster: str, phase: str) -> None:
        """A cluster of the run moves to `phase` (lock, store)."""

    def finished(self, cluster: str, status: str) -> None:
        """A cluster of the run is done (stored, or not)."""

    def title(self, text: str) -> None:
        """What the line starts with (default: the command), e.g. the demo's night."""

    def task(self, text: str, *, fraction: float | None = None,
             log_updates: bool = False) -> Task:
        """Start a step without clusters (`fraction`: its share done, for a bar);
        `log_updates`: without a terminal, log its text now and at each update."""
        return Task()

    @contextmanager
    def step(self, text: str) -> Iterator[Task]:
        """`task(text)` until the end of the block."""
        t = self.task(text)
        try:
            yield t
        finally:
            t.close()


_NOTHING = Progress()
_current: ContextVar[Progress] = ContextVar("felixscan_progress", default=_NOTHING)


def current() -> Progress:
    """The progress of this command (inherited by threads started with a copied context)."""
    return _current.get()


@contextmanager
def session(stream: TextIO, *, title: str, enabled: bool = True,
            terminal: bool | None = None) -> Iterator[Progress]:
    """Show progress on `stream` for the block: redrawn in place if `terminal` (default: the
    stream is a TTY and TERM is not dumb), else as `scanner.telemetry.progress` log lines; nothing
    at all unless `enabled`."""
    if not enabled:
        yield _NOTHING
        return
    if terminal is None:
        terminal = _is_terminal(stream)
    shown = _Session(stream, title=title, terminal=terminal)
    token = _current.set(shown)
    shown.start()
    try:
        yield shown
    finally:
        _current.reset(token)
        shown.stop()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (OSError, ValueError):  # a closed or detached stream
        return False


# --- the session -----------------------------------------------------------------------------


@dataclass
class _Cluster:
    name: str
    phase: str = "waiting"
    started: float = 0.0
    nodes: int = 0
    targets: int = 0
    probed: int = 0
    nodes_done: int = 0
    left: dict[str, int] = field(default_factory=dict)  # node -> targets not probed yet
    status: str | None = None
    next_step: int = 1  # the next STEP_PERCENT step worth a line
    last_line: float = 0.0

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def fraction(self) -> float:
        if self.phase in ("waiting", "lock", "collect"):
            return 0.0
        if self.phase == "probe":
            return self.probed / self.targets if self.targets else 0.0
        return 1.0


@dataclass
class _Task:
    text: str
    started: float
    fraction: float | None = None
    log_updates: bool = False


class _ClusterView(ClusterProgress):
    def __init__(self, session: _Session, name: str) -> None:
        self.session = session
        self.name = name

    def phase(self, phase: str) -> None:
        self.session.phase(self.name, phase)

    def targets(self, targets: Sequence[ProbeTarget]) -> None:
        self.session.set_targets(self.name, targets)

    def probed(self, target: ProbeTarget, result: ProbeResult) -> None:
        self.session.probed_one(self.name, target)

    def scanned(self, status: str) -> None:
        self.session.scanned(self.name, status)


class _TaskView(Task):
    def __init__(self, session: _Session, task: _Task) -> None:
        self.session = session
        self.task = task

    def update(self, text: str, fraction: float | None = None) -> None:
        self.session.update_task(self.task, text, fraction)

    def close(self) -> None:
        self.session.close_task(self.task)


class _Session(Progress):
    """Progress shown on one stream; every method may be called from any thread."""

    def __init__(self, stream: TextIO, *, title: str, terminal: bool) -> None:
        self.stream = stream
        self.terminal = terminal
        self._title = title
        self._lock = threading.RLock()
        self._clusters: dict[str, _Cluster] = {}
        self._run: int | None = None
        self._run_started = 0.0
        self._tasks: list[_Task] = []
        self._drawn = False  # the line is on the screen
        self._broken = False  # the terminal went away: draw no more
        self._last_draw = 0.0
        self._spin = 0
        self._next_summary = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # --- life ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.terminal:
            for handler in console_handlers(self.stream):
                handler.overlay = self
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._clear()
        if self.terminal:
            for handler in console_handlers(self.stream):
                if handler.overlay is self:
                    handler.overlay = None

    def _tick(self) -> None:
        while not self._stop.wait(REDRAW_SECONDS if self.terminal else 0.5):
            if self.terminal:
                with self._lock:
                    if self._active():
                        self._spin += 1
                        self._draw()
            else:
                self._summary_if_due()

    # --- reports from the library ----------------------------------------------------------

    @contextmanager
    def run(self, run_id: int, clusters: Sequence[str]) -> Iterator[None]:
        now = time.monotonic()
        with self._lock:
            self._run, self._run_started = run_id, now
            self._clusters = {name: _Cluster(name=name, started=now, last_line=now)
                              for name in clusters}
            self._next_summary = now + HEARTBEAT_SECONDS
            self._changed()
        try:
            yield
        finally:
            with self._lock:
                for c in self._clusters.values():
                    c.phase = "done"
                self._run = None
                self._changed()

    @contextmanager
    def cluster(self, name: str) -> Iterator[ClusterProgress]:
        now = time.monotonic()
        with self._lock:
            if self._run is None and all(c.done for c in self._clusters.values()):
                # a scan outside a run (remediation): counted on its own
                self._clusters = {}
                self._next_summary = now + HEARTBEAT_SECONDS
            c = self._clusters.setdefault(name, _Cluster(name=name))
            c.phase, c.started, c.last_line = "collect", now, now
            self._changed()
        try:
            yield _ClusterView(self, name)
        finally:
            with self._lock:
                ended = self._clusters.get(name)
                in_run = self._run is not None
            if ended is not None and not ended.done:
                if in_run:
                    self.phase(name, "store")  # the run stores it next
                else:
                    self.finished(name, ended.status or "interrupted")

    def phase(self, cluster: str, phase: str) -> None:
        with self._lock:
            c = self._clusters.get(cluster)
            if c is not None and not c.done:
                c.phase = phase
                self._changed()

    def set_targets(self, cluster: str, targets: Sequence[ProbeTarget]) -> None:
        with self._lock:
            c = self._clusters.get(cluster)
            if c is None:
                return
            c.left = {}
            for t in targets:
                c.left[t.node] = c.left.get(t.node, 0) + 1
            c.nodes, c.targets, c.probed, c.nodes_done = len(c.left), len(targets), 0, 0
            self._changed()

    def probed_one(self, cluster: str, target: ProbeTarget) -> None:
        line: tuple[str, dict[str, Any]] | None = None
        with self._lock:
            c = self._clusters.get(cluster)
            if c is None:
                return
            c.probed += 1
            left = c.left.get(target.node, 0) - 1
            c.left[target.node] = left
            if left == 0:
                c.nodes_done += 1
            now = time.monotonic()
            if self.terminal:
                self._changed(now)
            elif c.targets and c.probed < c.targets:
                step = c.probed * 100 // c.targets // STEP_PERCENT
                if step >= c.next_step and now - c.last_line >= STEP_GAP_SECONDS:
                    c.next_step, c.last_line = step + 1, now
                    line = self._step_line(c, now)
        if line is not None:
            log.info(line[0], extra=line[1])

    def scanned(self, cluster: str, status: str) -> None:
        with self._lock:
            c = self._clusters.get(cluster)
            if c is not None:
                c.status = status

    def finished(self, cluster: str, status: str) -> None:
        line: tuple[str, dict[str, Any]] | None = None
        with self._lock:
            c = self._clusters.get(cluster)
            if c is None or c.done:
                return
            c.phase, c.status = "done", status
            self._changed()
            if not self.terminal:
                line = self._done_line(c, time.monotonic())
        if line is not None:
            log.info(line[0], extra=line[1])

    def title(self, text: str) -> None:
        with self._lock:
            self._title = text

    def task(self, text: str, *, fraction: float | None = None,
             log_updates: bool = False) -> Task:
        t = _Task(text=text, started=time.monotonic(), fraction=fraction,
                  log_updates=log_updates)
        with self._lock:
            if not self._active():
                self._next_summary = t.started + HEARTBEAT_SECONDS
            self._tasks.append(t)
            self._changed()
        if log_updates and not self.terminal:
            log.info("%s", text)
        return _TaskView(self, t)

    def update_task(self, task: _Task, text: str, fraction: float | None) -> None:
        with self._lock:
            task.text, task.fraction = text, fraction
            self._changed()
        if task.log_updates and not self.terminal:
            log.info("%s", text)

    def close_task(self, task: _Task) -> None:
        with self._lock:
            if task in self._tasks:
                self._tasks.remove(task)
                self._changed()

    # --- the terminal line -------------------------------------------------------------------

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Take the line off while something else writes to the terminal, then put it back."""
        with self._lock:
            self._clear()
            try:
                yield
            finally:
                if self._active():
                    self._draw()

    def _active(self) -> bool:
        return self._run is not None or bool(self._tasks) or any(c.phase != "waiting" and not c.done
                                        for c in self._clusters.values())

    def _changed(self, now: float | None = None) -> None:
        """Redraw soon (now, if the last drawing is old enough); off the screen when idle."""
        if not self.terminal:
            return
        if not self._active():
            self._clear()
            return
        now = time.monotonic() if now is None else now
        if not self._drawn or now - self._last_draw >= REDRAW_SECONDS:
            self._draw(now)

    def _draw(self, now: float | None = None) -> None:
        if self._broken:
            return
        now = time.monotonic() if now is None else now
        width = _columns(self.stream) - 1  # a line that wraps cannot be redrawn with \r
        text = f"{_SPINNER[self._spin % len(_SPINNER)]} {self._line(now)}"
        self._write(f"\r{text[:width]}\x1b[K")
        self._drawn, self._last_draw = True, now

    def _clear(self) -> None:
        if self._drawn and not self._broken:
            self._write("\r\x1b[K")
        self._drawn = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal closed: the work goes on without it
            self._broken = True

    def _line(self, now: float) -> str:
        if self._tasks:
            t = self._tasks[-1]
            shown = f"{bar(t.fraction)} " if t.fraction is not None else ""
            return f"{shown}{t.text} | {seconds(now - t.started)}"
        clusters = list(self._clusters.values())
        fraction = sum(c.fraction for c in clusters) / len(clusters) if clusters else 0.0
        start = self._run_started if self._run is not None else min(
            (c.started for c in clusters), default=now)
        parts = [f"{self._title} {bar(fraction)} {sum(c.done for c in clusters)}/"
                 f"{len(clusters)} clusters"]
        if any(c.targets for c in clusters):  # nodes are counted once a cluster is read
            parts.append(f"{sum(c.nodes_done for c in clusters)}/"
                         f"{sum(c.nodes for c in clusters)} nodes probed")
        parts.append(seconds(now - start))  # before the details, which the width may cut
        parts += [self._doing(c) for c in sorted(
            (c for c in clusters if c.phase in _ACTIVE), key=lambda c: c.started)]
        return " | ".join(parts)

    @staticmethod
    def _doing(c: _Cluster) -> str:
        if c.phase == "probe":
            return f"{c.name} probe {c.nodes_done}/{c.nodes}"
        if c.phase == "lock":
            return f"{c.name} waiting for its lock"
        return f"{c.name} {c.phase}"

    # --- log lines (no terminal) -------------------------------------------------------------

    def _prefix(self) -> str:
        return f"scan run {self._run}: " if self._run is not None else ""

    def _step_line(self, c: _Cluster, now: float) -> tuple[str, dict[str, Any]]:
        pct = c.probed * 100 // c.targets
        return (f"{self._prefix()}{c.name}: probed {c.nodes_done}/{c.nodes} nodes, "
                f"{c.probed}/{c.targets} targets ({pct}%), {seconds(now - c.started)}",
                {"cluster": c.name, "phase": "probe", "scan_id": self._run,
                 **fields(nodes=c.nodes, nodes_probed=c.nodes_done, targets=c.targets,
                          targets_probed=c.probed, percent=pct)})

    def _done_line(self, c: _Cluster, now: float) -> tuple[str, dict[str, Any]]:
        clusters = list(self._clusters.values())
        done = sum(x.done for x in clusters)
        return (f"{self._prefix()}{c.name}: done ({c.status}): {c.nodes_done}/{c.nodes} nodes "
                f"probed in {seconds(now - c.started)}; {done}/{len(clusters)} clusters done",
                {"cluster": c.name, "scan_id": self._run,
                 **fields(status=c.status, nodes=c.nodes, nodes_probed=c.nodes_done,
                          clusters_done=done, clusters=len(clusters),
                          seconds=round(now - c.started, 3))})

    def _summary_if_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._active() or now < self._next_summary:
                return
            self._next_summary = now + HEARTBEAT_SECONDS
            if self._tasks:
                text = "; ".join(f"{t.text} ({seconds(now - t.started)})" for t in self._tasks)
                extra: dict[str, Any] = {}
            else:
                clusters = list(self._clusters.values())
                going = ", ".join(f"{self._doing(c)} ({seconds(now - c.started)})"
                                  for c in clusters if c.phase in _ACTIVE)
                nodes = sum(c.nodes for c in clusters)
                probed = sum(c.nodes_done for c in clusters)
                done = sum(c.done for c in clusters)
                text = (f"{self._prefix()}{done}/{len(clusters)} clusters done, {probed}/"
                        f"{nodes} nodes probed; going on: {going or 'nothing'}")
                extra = {"scan_id": self._run,
                         **fields(clusters_done=done, clusters=len(clusters), nodes=nodes,
                                  nodes_probed=probed)}
        log.info("%s", text, extra=extra)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80
