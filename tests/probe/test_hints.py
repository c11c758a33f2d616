"""Protocol hints and the in-process memory choose what is asked first, never what is recorded.

Every kind of endpoint is probed without hints, with a hint of "http" and with a hint of
"https" (right for some, wrong for the others), and from what an earlier probe learned: each
result must be the unhinted one, field by field, timings aside. Certificates are parsed once
per distinct certificate, after the connections, and the result is the same as parsing each.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from scanner import probe as probe_module
from scanner.core.records import ProbeResult, ProbeTarget
from scanner.emulator.certs import make_self_signed, server_ssl_context
from scanner.emulator.nodes import NodeFleet, address_for
from scanner.probe import ProbeSettings, forget_learned, probe_nodes

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")

FAST = ProbeSettings(timeout_seconds=0.5, tls_timeout_seconds=0.5, http_timeout_seconds=1.0)
# for comparing runs: deadlines a loaded machine does not hit by chance on a healthy endpoint
STEADY = ProbeSettings(timeout_seconds=1.0, tls_timeout_seconds=1.5, http_timeout_seconds=2.0)

# every kind the probe tells apart, the hostile ones included
KINDS = [
    "felix-tls", "felix-http", "felix-mtls", "other", "redirect", "banner", "reset", "mute",
    "closed", "silent", "garbage", "drip", "reset-mid", "tls-expired", "tls-nosubject",
    "typha-http", "typha-tls",
]
# kinds whose error text depends on timing, hinted or not, with what it always says: whether a
# reset lands on the connect or on the first read is the kernel's race; how many bytes of a drip
# arrive before the deadline is the clock's
RACY = {"reset": "reset by peer", "drip": "response incomplete"}
GO_REFUSAL = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"


def addr(block: int, index: int) -> str:
    return address_for(index, base=f"127.77.{block}.0")


def comparable(result: ProbeResult) -> ProbeResult:
    """The result without its timings (they differ from run to run)."""
    return replace(result, duration_ms=0.0, connect_ms=None if result.connect_ms is None else 0.0)


@pytest.fixture
def fleet() -> Iterator[NodeFleet]:
    with NodeFleet() as running:
        yield running


@pytest.fixture
def every_kind(fleet: NodeFleet) -> list[ProbeTarget]:
    targets = []
    for i, kind in enumerate(KINDS):
        node = fleet.add(addr(201, i), kind, node_name=f"worker-{kind}")
        targets.append(ProbeTarget(node.node_name, node.address, node.port))
    return targets


def test_hints_right_or_wrong_never_change_a_result(
    fleet: NodeFleet, every_kind: list[ProbeTarget]
) -> None:
    unhinted = [comparable(r) for r in probe_nodes(every_kind, STEADY)]
    by_kind = dict(zip(KINDS, unhinted, strict=True))
    # the reference is what the probe has always recorded for these kinds
    assert by_kind["felix-http"].protocol == "http" and by_kind["felix-http"].felix is True
    assert by_kind["felix-tls"].protocol == "https" and by_kind["felix-tls"].tls is not None
    assert by_kind["mute"].protocol == "tcp"
    assert by_kind["closed"].state == "closed" and by_kind["silent"].state == "filtered"
    for protocol in ("http", "https"):
        forget_learned()
        hints = {(t.address or "", t.port): protocol for t in every_kind}
        hinted = [comparable(r) for r in probe_nodes(every_kind, STEADY, hints=hints)]
        for kind, want, got in zip(KINDS, unhinted, hinted, strict=True):
            if kind in RACY:
                # hinted or not, the verdict is the same; the text may differ from run to run
                assert replace(got, error=None, body_bytes=0) == replace(
                    want, error=None, body_bytes=0), (protocol, kind)
                assert RACY[kind] in (got.error or ""), (protocol, kind)
                continue
            assert got == want, (protocol, kind)


def test_a_right_http_hint_saves_the_tls_attempt(fleet: NodeFleet) -> None:
    node = fleet.add(addr(202, 0), "felix-http", node_name="worker-1")
    target = ProbeTarget(node.node_name, node.address, node.port)
    [cold] = probe_nodes([target], FAST)
    assert node.connections == 2 and node.not_http == 1  # a TLS hello, then plain HTTP
    forget_learned()
    [hinted] = probe_nodes([target], FAST, hints={(node.address, node.port): "http"})
    assert node.connections == 3 and node.not_http == 1  # one plain connection, no TLS hello
    assert comparable(hinted) == comparable(cold)
    assert hinted.felix is True and hinted.felix_host == "worker-1"


def test_a_wrong_http_hint_costs_one_connect(fleet: NodeFleet) -> None:
    node = fleet.add(addr(202, 1), "felix-tls", node_name="worker-2")
    target = ProbeTarget(node.node_name, node.address, node.port)
    [cold] = probe_nodes([target], FAST)
    assert node.connections == 1
    forget_learned()
    [hinted] = probe_nodes([target], FAST, hints={(node.address, node.port): "http"})
    # the listener counts a TLS connection once handshaken: the refused plain attempt is not
    assert node.connections == 2 and node.not_http == 0
    assert comparable(hinted) == comparable(cold)
    assert hinted.protocol == "https" and hinted.tls is not None


def test_the_process_remembers_what_an_endpoint_spoke(fleet: NodeFleet) -> None:
    http = fleet.add(addr(202, 2), "felix-http", node_name="worker-3")
    tls = fleet.add(addr(202, 3), "felix-tls", node_name="worker-4")
    targets = [ProbeTarget(n.node_name, n.address, n.port) for n in (http, tls)]
    first = probe_nodes(targets, FAST)
    assert (http.connections, tls.connections) == (2, 1)
    second = probe_nodes(targets, FAST)  # no hints: the memory of the first run
    assert (http.connections, tls.connections) == (3, 2)
    assert [comparable(r) for r in second] == [comparable(r) for r in first]
    # an explicit hint wins over the memory (here a wrong one: one extra connect, same result)
    third = probe_nodes(targets, FAST, hints={(http.address, http.port): "https"})
    assert (http.connections, tls.connections) == (5, 3)
    assert [comparable(r) for r in third] == [comparable(r) for r in first]


def test_an_endpoint_that_changed_protocol_is_relearned(fleet: NodeFleet) -> None:
    address = addr(202, 4)
    node = fleet.add(address, "felix-http", node_name="worker-5")
    target = ProbeTarget(node.node_name, address, node.port)
    probe_nodes([target], FAST)
    fleet.close_node(address)
    [closed] = probe_nodes([target], FAST)  # learned http: asks plain first, is refused
    assert (closed.state, closed.error) == ("closed", "connection refused")
    assert probe_module._PROTOCOLS.get((address, node.port)) is None


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = probe_module._ProtocolMemory(3)
    results = [
        ProbeResult(node=f"n{i}", address=f"127.0.0.{i}", port=9091, state="open",
                    protocol="http", felix=True, http_status=200, tls=None, felix_host=None,
                    error=None, connect_ms=1.0, duration_ms=1.0, body_bytes=10)
        for i in range(1, 6)
    ]
    memory.learn(results)
    assert len(memory) == 3
    assert memory.get(("127.0.0.1", 9091)) is None
    assert memory.get(("127.0.0.5", 9091)) == "http"
    memory.learn([replace(results[-1], state="closed", protocol=None)])
    assert memory.get(("127.0.0.5", 9091)) is None


class GoLikeTls:
    """A TLS listener that answers plain HTTP the way Go's crypto/tls server does."""

    def __init__(self, address: str, body: bytes) -> None:
        cert, key = make_self_signed("go-like", hosts=[address])
        self.cert_pem = cert
        self._ctx = server_ssl_context(cert, key)
        self._body = body
        self.connections = 0
        self.refused_plain = 0
        self._sock = socket.create_server((address, 0))
        self._sock.settimeout(0.2)
        self.address, self.port = address, self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2.0)
                first = conn.recv(1, socket.MSG_PEEK)
                if first != b"\x16":
                    conn.recv(65536)
                    conn.sendall(GO_REFUSAL)
                    self.refused_plain += 1
                    continue
                with self._ctx.wrap_socket(conn, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                                b"\r\n\r\n%s" % (len(self._body), self._body))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def test_gos_plain_http_refusal_sends_the_probe_to_tls() -> None:
    body = b'# HELP felix_host x\nfelix_host{host="go-node"} 1\n'
    server = GoLikeTls(addr(203, 1), body)
    try:
        target = ProbeTarget("go-node", server.address, server.port)
        [cold] = probe_nodes([target], FAST)
        forget_learned()
        [hinted] = probe_nodes([target], FAST, hints={(server.address, server.port): "http"})
    finally:
        server.close()
    assert (cold.state, cold.protocol, cold.felix, cold.felix_host) == (
        "open", "https", True, "go-node")
    assert comparable(hinted) == comparable(cold)
    assert server.refused_plain == 1 and server.connections == 3


def test_certificates_are_parsed_once_each_after_the_connections(
    fleet: NodeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = [fleet.add(addr(204, i), "felix-tls", node_name=f"worker-{i}") for i in range(4)]
    nodes += [fleet.add(addr(204, 4 + i), "tls-expired", node_name=f"old-{i}") for i in range(3)]
    targets = [ProbeTarget(n.node_name, n.address, n.port) for n in nodes]
    parsed: list[str] = []
    real_parse = probe_module._parse_cert
    in_flight = {"connections": 0}
    real_exchange = probe_module._Prober._exchange

    async def counting_exchange(self: object, *args: object, **kwargs: object) -> object:
        in_flight["connections"] += 1
        try:
            return await real_exchange(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            in_flight["connections"] -= 1

    def parse(der: bytes) -> object:
        assert in_flight["connections"] == 0, "certificate parsed while connections are open"
        parsed.append(x509.load_der_x509_certificate(der).subject.rfc4514_string())
        return real_parse(der)

    monkeypatch.setattr(probe_module, "_parse_cert", parse)
    monkeypatch.setattr(probe_module._Prober, "_exchange", counting_exchange)
    seen: list[ProbeResult] = []
    results = probe_nodes(targets, FAST, on_result=lambda _t, r: seen.append(r))
    # four per-node certificates and one shared by the three expired nodes
    assert len(parsed) == 5
    assert sorted(seen, key=lambda r: r.node) == sorted(results, key=lambda r: r.node)
    for node, result in zip(nodes, results, strict=True):
        assert node.cert_pem is not None and result.tls is not None
        served = x509.load_pem_x509_certificate(node.cert_pem)
        assert result.tls.sha256 == served.fingerprint(hashes.SHA256()).hex()
        assert result.tls.subject == served.subject.rfc4514_string()
        assert result.tls.issuer == served.issuer.rfc4514_string()
        assert result.tls.not_after == served.not_valid_after_utc
        assert result.tls.self_signed is (served.issuer == served.subject)
        assert result.felix is True
    # the next run finds every certificate parsed already: no parsing at all
    again = probe_nodes(targets, FAST)
    assert len(parsed) == 5
    assert [comparable(r) for r in again] == [comparable(r) for r in results]
