"""Webhook alerts: when they fire, what they carry, and delivery to a receiver on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from scanner.app.alerts import AlertSender, build_alert, payload, transition
from scanner.core.config import AlertSettings


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers the statuses it is told to, in order."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                receiver.headers.append(dict(self.headers))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                if status == 200:
                    receiver.got.set()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0/B0/secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def alert(event: str = "non_compliant", cluster: str = "prod-east") -> Any:
    return build_alert(event=event, cluster=cluster, status="non_compliant"  # type: ignore[arg-type]
                       if event == "non_compliant" else "compliant",
                       previous="compliant" if event == "non_compliant" else "non_compliant",
                       scan_id=42, started_at=datetime(2026, 3, 1, 2, 0, tzinfo=UTC), nodes=120,
                       failing=3, unknown=1,
                       findings=[("FELIX-PORT-REACHABLE", "critical"),
                                 ("FELIX-METRICS-ENABLED", "high"),
                                 ("FELIX-PORT-REACHABLE", "critical")],
                       public_url="https://felixscan.example.org")


@pytest.mark.parametrize(("previous", "current", "event"), [
    (None, "non_compliant", "non_compliant"),  # the first verdict is already bad
    ("compliant", "non_compliant", "non_compliant"),
    ("non_compliant", "non_compliant", None),  # still bad: no repeat
    ("non_compliant", "compliant", "recovered"),
    ("compliant", "compliant", None),
    (None, "compliant", None),
    ("compliant", "error", None),  # an error is no verdict
    ("non_compliant", "error", None),
])
def test_transition(previous: str | None, current: str, event: str | None) -> None:
    assert transition(previous, current) == event


def test_payload_is_slack_compatible_and_escaped() -> None:
    doc = payload(alert())
    assert doc["text"].startswith(":rotating_light: felixscan: cluster *prod-east* is "
                                  "NON-COMPLIANT: 3 failing and 1 unknown of 120 nodes (scan 42")
    assert "Findings: FELIX-PORT-REACHABLE, FELIX-METRICS-ENABLED." in doc["text"]
    assert doc["text"].endswith("<https://felixscan.example.org/clusters/prod-east|Details>")
    assert doc["felixscan"]["event"] == "non_compliant"
    assert doc["felixscan"]["findings"] == ["FELIX-PORT-REACHABLE", "FELIX-METRICS-ENABLED"]
    hostile = payload(alert(cluster="<!channel>&x"))
    assert "*&lt;!channel&gt;&amp;x*" in hostile["text"]
    assert "%3C%21channel%3E%26x" in hostile["text"]  # the link is percent-encoded
    recovered = payload(alert("recovered"))
    assert recovered["text"].startswith(":white_check_mark: felixscan: cluster *prod-east* "
                                        "recovered: COMPLIANT, 120 nodes pass")


def test_delivered_after_server_errors_with_backoff(receiver: Receiver) -> None:
    receiver.statuses = [503, 500, 429]
    sender = AlertSender(AlertSettings(webhook_url=receiver.url, retries=5, backoff_seconds=0.05))
    try:
        t = time.monotonic()
        assert sender.send(alert())
        assert time.monotonic() - t < 0.05  # send only queues
        assert receiver.got.wait(10)
    finally:
        sender.close()
    assert len(receiver.bodies) == 4
    assert all(b == receiver.bodies[0] for b in receiver.bodies)
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert sender.delivered == 1 and sender.failed == 0


def test_client_error_is_not_retried_and_redirect_not_followed(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [404, 302]
    sender = AlertSender(AlertSettings(webhook_url=receiver.url, retries=3, backoff_seconds=0.01))
    sender.send(alert())
    sender.send(alert("recovered"))
    sender.close(timeout=10)
    assert len(receiver.bodies) == 2  # one attempt each
    assert sender.failed == 2
    assert "refused the alert: HTTP 404" in caplog.text
    assert "secret" not in caplog.text  # the webhook URL's path is a credential


def test_unreachable_receiver_gives_up_without_blocking(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = AlertSender(AlertSettings(webhook_url=f"http://127.0.0.1:{port}/x", retries=2,
                                       backoff_seconds=0.01, timeout_seconds=1))
    sender.send(alert())
    sender.close(timeout=10)
    assert sender.failed == 1
    assert "NOT delivered to http://127.0.0.1/..." in caplog.text
