"""Webhook alerts when a cluster turns non-compliant or recovers (Slack-compatible JSON).

`transition` decides (pure); `AlertSender` posts from its own thread with retries and
exponential backoff, so a slow or dead receiver never delays a scan. Each attempt has a total
deadline (`timeout_seconds`: connect, send and the whole answer), and no answer can stop the
thread. The webhook URL is a credential (Slack's holds a token): only its scheme and host are
ever logged.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import logging
import queue
import random
import socket
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from scanner import __version__
from scanner.core.config import AlertSettings
from scanner.web.state import AlertHealth

log = logging.getLogger(__name__)

Event = Literal["non_compliant", "recovered"]
MAX_BACKOFF = 300.0  # seconds: a receiver down for long gets one try every five minutes
QUEUE_SIZE = 1000


def transition(previous: str | None, current: str) -> Event | None:
    """Whether a scan's status is news: turning non-compliant, or compliant again.

    `previous` is the last status that was not an error (None: the first verdict). An error
    scan is no verdict, so it neither alerts nor resets: compliant -> error -> non_compliant
    alerts once, non_compliant -> error -> non_compliant does not.
    """
    if current == "non_compliant" and previous != "non_compliant":
        return "non_compliant"
    if current == "compliant" and previous == "non_compliant":
        return "recovered"
    return None


@dataclass(frozen=True, slots=True)
class Alert:
    event: Event
    cluster: str
    status: str
    previous_status: str | None
    scan_id: int
    started_at: datetime
    nodes: int
    failing: int
    unknown: int
    findings: tuple[str, ...]  # distinct finding IDs of the scan, worst first
    url: str | None = None  # the cluster's page, when serve.public_url is set


def cluster_url(public_url: str | None, cluster: str) -> str | None:
    if not public_url:
        return None
    return f"{public_url.rstrip('/')}/clusters/{quote(cluster, safe='')}"


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn needs exactly these three escaped; anything else is shown as typed.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def payload(alert: Alert) -> dict[str, Any]:
    """Slack's incoming-webhook shape (`text`), plus the facts under `felixscan` for machines."""
    name = _slack_escape(alert.cluster)
    when = alert.started_at.strftime("%Y-%m-%d %H:%M UTC")
    if alert.event == "non_compliant":
        text = (f":rotating_light: felixscan: cluster *{name}* is NON-COMPLIANT: "
                f"{alert.failing} failing and {alert.unknown} unknown of {alert.nodes} nodes "
                f"(scan {alert.scan_id}, {when}).")
        if alert.findings:
            shown = ", ".join(_slack_escape(f) for f in alert.findings[:5])
            more = f" and {len(alert.findings) - 5} more" if len(alert.findings) > 5 else ""
            text += f" Findings: {shown}{more}."
    else:
        text = (f":white_check_mark: felixscan: cluster *{name}* recovered: COMPLIANT, "
                f"{alert.nodes} nodes pass (scan {alert.scan_id}, {when}).")
    if alert.url:
        text += f" <{alert.url}|Details>"
    return {
        "text": text,
        "felixscan": {
            "event": alert.event, "cluster": alert.cluster, "status": alert.status,
            "previous_status": alert.previous_status, "scan_id": alert.scan_id,
            "started_at": alert.started_at.isoformat(), "nodes": alert.nodes,
            "failing": alert.failing, "unknown": alert.unknown,
            "findings": list(alert.findings), "url": alert.url, "version": __version__,
        },
    }


def redact_webhook(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/..."


def retry_after_seconds(value: str, *, now: datetime) -> float | None:
    """The wait a `Retry-After` header asks for, at most MAX_BACKOFF; None when it is neither
    delta-seconds in ASCII digits nor an HTTP date (RFC 9110, 10.2.3).

    `str.isdigit` is not the test: it accepts `²` and `٣`, which `int` and `float` refuse,
    and `int` refuses more than 4,300 digits.
    """
    text = value.strip()
    if text.isascii() and text.isdigit():
        return MAX_BACKOFF if len(text) > 6 else min(float(int(text)), MAX_BACKOFF)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, OverflowError):  # not a date, or an impossible one
        return None
    if when.tzinfo is None:  # "-0000": a date in UTC with no zone stated
        when = when.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), MAX_BACKOFF)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is misconfigured; following it could post the alert anywhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Deadline:
    """One attempt's total time. When it runs out, the sockets of the attempt are shut down,
    which ends at once a TLS handshake, a send or a read blocked on them: a socket timeout
    alone bounds each read, and a receiver sending a byte a second never trips it.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._handles: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        # A second descriptor of the same socket: shutting it down also ends I/O on the
        # original after TLS has wrapped it (wrapping moves the original's descriptor).
        with self._lock:
            self._handles.append(sock.dup())
            if self.expired:
                self._cut()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._cut()

    def _cut(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(OSError):  # already closed by the peer
                handle.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for handle in self._handles:
                handle.close()
            self._handles.clear()


class _WatchedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, /, *, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._create_connection = _watched_connect(deadline)


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, /, *, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._create_connection = _watched_connect(deadline)


def _watched_connect(deadline: _Deadline) -> Callable[..., socket.socket]:
    def connect(address: tuple[str, int], timeout: Any,
                source_address: tuple[str, int] | None = None) -> socket.socket:
        sock = socket.create_connection(address, timeout, source_address)
        deadline.watch(sock)
        return sock
    return connect


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        def connection(host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
            return _WatchedHTTPConnection(host, deadline=self._deadline, **kwargs)
        return self.do_open(connection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        # No context given: http.client makes its default one, as urllib's own handler does.
        def connection(host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
            return _WatchedHTTPSConnection(host, deadline=self._deadline, **kwargs)
        return self.do_open(connection, req)


class AlertSender:
    """Posts alerts from a background thread; `send` only queues and never blocks.

    `stuck_after`: seconds one alert may stay in hand before `health()` calls the worker
    stuck; by default the longest a delivery can take (every attempt's deadline, every wait
    at its longest), plus a minute.
    """

    def __init__(self, settings: AlertSettings, *,
                 sleep: Callable[[float], object] | None = None,
                 stuck_after: float | None = None) -> None:
        if not settings.webhook_url:
            raise ValueError("AlertSender needs alerts.webhook_url")
        self.settings = settings
        self._url = settings.webhook_url
        self._queue: queue.Queue[Alert | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait  # waits end early on close()
        self._thread = threading.Thread(target=self._work, name="alerts", daemon=True)
        # Read by /metrics (scanner.web.metrics); the worker alone writes the first two.
        self.delivered = 0
        self.failed = 0
        self.dropped = 0  # queue full: never sent
        self.stuck_after = stuck_after if stuck_after is not None else (
            (settings.retries + 1) * settings.timeout_seconds
            + settings.retries * MAX_BACKOFF * 1.1 + 60.0)
        self._pending: deque[float] = deque()  # monotonic time each unfinished alert was queued
        self._pending_lock = threading.Lock()
        self._in_hand_since: float | None = None
        self._reported_stuck = False
        self._closing = False
        self._thread.start()

    def send(self, alert: Alert) -> bool:
        """Queue the alert; False (and an error in the log) when the queue is full."""
        with self._pending_lock:
            self._pending.append(time.monotonic())
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            with self._pending_lock:
                self._pending.pop()
                self.dropped += 1
            log.error("alert for %s dropped: %d alerts are waiting for %s", alert.cluster,
                      QUEUE_SIZE, redact_webhook(self._url))
            return False
        if not self.alive() and not self._closing:
            log.error("alert for %s queued, but the alert worker is not running: it will not "
                      "be sent", alert.cluster)
        return True

    def alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> AlertHealth:
        """For /readyz: `stopped` once the worker thread is gone, `stuck` while one alert has
        been in hand longer than `stuck_after`, else `ok`."""
        with self._pending_lock:
            queued = len(self._pending)
        if not self.alive():
            return AlertHealth("stopped", queued, "the alert worker is not running; "
                               f"{queued} alert(s) waiting will not be sent")
        since = self._in_hand_since
        held = time.monotonic() - since if since is not None else 0.0
        if held <= self.stuck_after:
            return AlertHealth("ok", queued)
        with self._pending_lock:
            oldest = time.monotonic() - self._pending[0] if self._pending else held
        reason = (f"an alert has been in delivery for {held:.1f} s (any delivery ends within "
                  f"{self.stuck_after:g} s); {queued - 1} more waiting, the oldest queued "
                  f"{oldest:.0f} s ago")
        if not self._reported_stuck:
            self._reported_stuck = True
            log.error("alert worker stuck: %s", reason)
        return AlertHealth("stuck", queued, reason)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within `timeout`, then stop retrying."""
        # When the queue is full, the stop below ends the worker between two alerts instead.
        self._closing = True
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(1.0)

    def _work(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is None or self._stop.is_set():
                return
            self._in_hand_since = time.monotonic()
            try:
                self._deliver(alert)
            except Exception as exc:
                # This thread is the only one posting: one alert, whatever went wrong with it,
                # must not stop the alerts after it.
                self.failed += 1
                log.error("alert %s for %s NOT delivered to %s: unexpected error\n%s",
                          alert.event, alert.cluster, redact_webhook(self._url),
                          self._redact("".join(traceback.format_exception(exc)).rstrip()))
            finally:
                self._in_hand_since = None
                self._reported_stuck = False
                with self._pending_lock:
                    self._pending.popleft()

    def _redact(self, text: str) -> str:
        """`text` without the webhook URL or its path (the credential)."""
        text = text.replace(self._url, redact_webhook(self._url))
        path = urlsplit(self._url).path
        return text.replace(path, "/...") if len(path) > 1 else text

    def _deliver(self, alert: Alert) -> None:
        body = json.dumps(payload(alert)).encode("utf-8")
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            if attempt and self._stop.is_set():
                break
            wait = self._post(body)
            if wait is None:
                self.delivered += 1
                log.info("alert %s for %s delivered", alert.event, alert.cluster)
                return
            if wait < 0 or attempt == attempts - 1:
                break
            backoff = min(self.settings.backoff_seconds * 2 ** attempt, MAX_BACKOFF)
            backoff *= 1 + random.random() / 10  # replicas' retries should not line up
            self._sleep(max(wait, backoff))
        self.failed += 1
        log.error("alert %s for %s NOT delivered to %s", alert.event, alert.cluster,
                  redact_webhook(self._url))

    def _post(self, body: bytes) -> float | None:
        """None when delivered; seconds to wait before a retry; -1 when retrying is useless."""
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in config
            self._url, data=body, method="POST",
            headers={"Content-Type": "application/json",
                     "User-Agent": f"felixscan/{__version__}"})
        where = redact_webhook(self._url)
        limit = self.settings.timeout_seconds
        deadline = _Deadline(limit)
        opener = urllib.request.build_opener(
            _NoRedirect, _DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline))
        try:
            with opener.open(request, timeout=limit) as resp:
                # The status said delivered; the rest of the answer is not worth a retry.
                with contextlib.suppress(OSError, http.client.HTTPException):
                    resp.read(65536)
                return None
        except urllib.error.HTTPError as exc:
            status = exc.code
            if status == 429 or status >= 500:
                log.warning("alert webhook %s answered %d; retrying", where, status)
                wait = retry_after_seconds(exc.headers.get("Retry-After", ""),
                                           now=datetime.now(UTC))
                return 0.0 if wait is None else wait
            log.error("alert webhook %s refused the alert: HTTP %d", where, status)
            return -1.0
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            if deadline.expired:
                log.warning("alert webhook %s: no whole answer within %g s; retrying", where,
                            limit)
            else:
                # The receiver writes some of these messages (a bad status line): quoted, cut.
                reason = self._redact(str(getattr(exc, "reason", None) or exc))
                log.warning("alert webhook %s unreachable or answering garbage (%s: %.200r); "
                            "retrying", where, type(exc).__name__, reason)
            return 0.0
        finally:
            deadline.close()


def build_alert(*, event: Event, cluster: str, status: str, previous: str | None,
                scan_id: int, started_at: datetime, nodes: int, failing: int, unknown: int,
                findings: Sequence[tuple[str, str]], public_url: str | None) -> Alert:
    """`findings` as (id, severity) pairs; the alert lists each ID once, worst first."""
    order = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}
    worst: dict[str, int] = {}
    for fid, severity in findings:
        worst[fid] = min(worst.get(fid, 9), order.get(severity, 9))
    ids = tuple(sorted(worst, key=lambda f: (worst[f], f)))
    return Alert(event=event, cluster=cluster, status=status, previous_status=previous,
                 scan_id=scan_id, started_at=started_at, nodes=nodes, failing=failing,
                 unknown=unknown, findings=ids, url=cluster_url(public_url, cluster))
