"""Webhook alerts when a cluster turns non-compliant or recovers (Slack-compatible JSON).

`transition` decides (pure); `AlertSender` posts from its own thread with retries and
exponential backoff, so a slow or dead receiver never delays a scan. The webhook URL is a
credential (Slack's holds a token): only its scheme and host are ever logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from scanner import __version__
from scanner.config import AlertSettings

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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is misconfigured; following it could post the alert anywhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class AlertSender:
    """Posts alerts from a background thread; `send` only queues and never blocks."""

    def __init__(self, settings: AlertSettings, *,
                 sleep: Callable[[float], object] | None = None) -> None:
        if not settings.webhook_url:
            raise ValueError("AlertSender needs alerts.webhook_url")
        self.settings = settings
        self._url = settings.webhook_url
        self._queue: queue.Queue[Alert | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait  # waits end early on close()
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._thread = threading.Thread(target=self._work, name="alerts", daemon=True)
        self.delivered = 0
        self.failed = 0
        self._thread.start()

    def send(self, alert: Alert) -> bool:
        """Queue the alert; False (and an error in the log) when the queue is full."""
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            log.error("alert for %s dropped: %d alerts are waiting for %s", alert.cluster,
                      QUEUE_SIZE, redact_webhook(self._url))
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within `timeout`, then stop retrying."""
        # When the queue is full, the stop below ends the worker between two alerts instead.
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
            self._deliver(alert)

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
        try:
            with self._opener.open(request, timeout=self.settings.timeout_seconds) as resp:
                resp.read(65536)
                return None
        except urllib.error.HTTPError as exc:
            status = exc.code
            if status == 429 or status >= 500:
                log.warning("alert webhook %s answered %d; retrying", where, status)
                retry_after = exc.headers.get("Retry-After", "")
                return min(float(retry_after), MAX_BACKOFF) if retry_after.isdigit() else 0.0
            log.error("alert webhook %s refused the alert: HTTP %d", where, status)
            return -1.0
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            log.warning("alert webhook %s unreachable (%s); retrying", where, reason)
            return 0.0


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
