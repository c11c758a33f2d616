"""scanner.probe against real listeners (scanner.emulator.nodes) on 127.0.0.0/8 only."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import time
from collections.abc import Iterator
from datetime import UTC

import pytest
from cryptography import x509

from scanner import probe as probe_module
from scanner.core.records import ProbeResult, ProbeTarget
from scanner.emulator.nodes import (
    REDIRECT_LOCATION,
    FleetProcess,
    ListenerSpec,
    NodeFleet,
    address_for,
)
from scanner.probe import NO_ADDRESS, ProbeSettings, probe_many, probe_nodes

# unclosed sockets must fail these tests even though the project ignores ResourceWarning globally
pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")

FAST = ProbeSettings(timeout_seconds=0.5, tls_timeout_seconds=0.5, http_timeout_seconds=1.0)


def addr(block: int, index: int) -> str:
    return address_for(index, base=f"127.77.{block}.0")


def probe_one(address: str | None, settings: ProbeSettings = FAST, port: int = 9091) -> ProbeResult:
    [result] = probe_nodes([ProbeTarget("n", address, port)], settings)
    return result


@pytest.fixture
def fleet() -> Iterator[NodeFleet]:
    with NodeFleet() as running:
        yield running


# (kind, state, protocol, felix, http_status)
KIND_EXPECTATIONS = [
    ("felix-tls", "open", "https", True, 200),
    ("felix-http", "open", "http", True, 200),
    ("felix-mtls", "open", "https", None, None),
    ("other", "open", "http", False, 200),
    ("redirect", "open", "http", False, 301),
    ("banner", "open", "tcp", None, None),
    ("reset", "open", "tcp", None, None),
    ("mute", "open", "tcp", None, None),
    ("closed", "closed", None, None, None),
    ("silent", "filtered", None, None, None),
]


def test_each_kind_of_listener_is_classified(fleet: NodeFleet) -> None:
    targets = []
    for i, (kind, *_) in enumerate(KIND_EXPECTATIONS):
        node = fleet.add(addr(1, i), kind, node_name=f"worker-{kind}")
        targets.append(ProbeTarget(node.node_name, node.address, node.port))
    results = probe_nodes(targets, FAST)
    for (kind, state, protocol, felix, status), result in zip(
        KIND_EXPECTATIONS, results, strict=True
    ):
        got = (result.state, result.protocol, result.felix, result.http_status)
        assert got == (state, protocol, felix, status), (kind, result)
        assert result.node == f"worker-{kind}"
        if state == "open":
            assert result.connect_ms is not None and result.connect_ms >= 0
        if felix:
            assert result.felix_host == f"worker-{kind}"
            assert result.error is None
            assert result.body_bytes == len(fleet.node(result.address or "").body)
        else:
            assert result.felix_host is None
    by_kind = {kind: r for (kind, *_), r in zip(KIND_EXPECTATIONS, results, strict=True)}
    assert by_kind["closed"].error == "connection refused"
    assert by_kind["silent"].error == "no answer to connect within 0.5 s"
    assert "TLS handshake timed out" in (by_kind["mute"].error or "")
    assert "no response within the 1 s deadline" in (by_kind["mute"].error or "")
    assert "did not answer with HTTP" in (by_kind["banner"].error or "")
    assert "SSH-2.0" in (by_kind["banner"].error or "")
    assert "reset" in (by_kind["reset"].error or "")
    # the mTLS endpoint still shows its certificate before refusing the request
    assert by_kind["felix-mtls"].tls is not None and by_kind["felix-mtls"].error
    # a plain HTTP endpoint is tried over TLS first, then on a new connection
    assert fleet.node(addr(1, 1)).connections == 2
    assert fleet.node(addr(1, 0)).connections == 1


def test_mute_listener_costs_tls_plus_http_deadline(fleet: NodeFleet) -> None:
    fleet.add(addr(2, 0), "mute")
    settings = ProbeSettings(timeout_seconds=0.5, tls_timeout_seconds=0.3, http_timeout_seconds=0.4)
    result = probe_one(addr(2, 0), settings)
    assert (result.state, result.protocol, result.felix) == ("open", "tcp", None)
    assert 700 <= result.duration_ms < 2500  # generous upper bound: a busy CI machine


def test_tls_facts_match_the_served_certificate(fleet: NodeFleet) -> None:
    node = fleet.add(addr(3, 0), "felix-tls", node_name="worker-7")
    result = probe_one(node.address)
    assert result.tls is not None and node.cert_pem is not None
    served = x509.load_pem_x509_certificate(node.cert_pem)
    der = node.cert_der
    assert der is not None
    tls = result.tls
    assert tls.sha256 == hashlib.sha256(der).hexdigest()
    assert tls.subject == "CN=worker-7" == tls.issuer
    assert tls.self_signed is True
    assert tls.not_after == served.not_valid_after_utc
    assert tls.not_before == served.not_valid_before_utc
    assert tls.not_after is not None and tls.not_after.tzinfo == UTC
    assert tls.version in ("TLSv1.3", "TLSv1.2")
    assert tls.cipher
    assert result.felix_host == "worker-7"


def test_request_is_one_get_metrics_with_fixed_headers(fleet: NodeFleet) -> None:
    node = fleet.add(addr(4, 0), "felix-tls")
    settings = ProbeSettings(timeout_seconds=0.5, user_agent="felixscan/test")
    probe_one(node.address, settings)
    [request] = node.requests
    assert (request.method, request.target, request.version) == ("GET", "/metrics", "HTTP/1.1")
    assert dict(request.headers) == {
        "Host": f"{node.address}:9091",
        "User-Agent": "felixscan/test",
        "Accept": "text/plain",
        "Connection": "close",
    }


def test_redirect_is_recorded_and_not_followed(fleet: NodeFleet) -> None:
    node = fleet.add(addr(5, 0), "redirect")
    # a listener where the redirect points, to prove nobody knocks there
    target_host, target_port = REDIRECT_LOCATION.removeprefix("http://").split("/")[0].split(":")
    elsewhere = fleet.add(target_host, "felix-http", port=int(target_port))
    result = probe_one(node.address)
    assert (result.state, result.protocol, result.http_status, result.felix) == (
        "open",
        "http",
        301,
        False,
    )
    assert [(r.method, r.target) for r in node.requests] == [("GET", "/metrics")]
    assert node.not_http == 1  # the TLS hello that found plain HTTP
    assert elsewhere.connections == 0


def test_endless_body_stays_bounded(fleet: NodeFleet) -> None:
    node = fleet.add(addr(6, 0), "endless", node_name="worker-endless")
    settings = ProbeSettings(timeout_seconds=0.5, http_timeout_seconds=5.0, max_body_bytes=65536)
    started = time.perf_counter()
    result = probe_one(node.address, settings)
    assert time.perf_counter() - started < 4.0  # far below the 5 s deadline
    assert result.body_bytes == 65536
    assert (result.state, result.felix, result.felix_host) == ("open", True, "worker-endless")
    assert "max_body_bytes" in (result.error or "")


def test_slow_drip_is_cut_at_the_http_deadline(fleet: NodeFleet) -> None:
    node = fleet.add(addr(7, 0), "drip")
    settings = ProbeSettings(timeout_seconds=0.5, tls_timeout_seconds=0.5, http_timeout_seconds=0.6)
    result = probe_one(node.address, settings)
    assert result.state == "open" and result.protocol == "http" and result.http_status == 200
    assert result.felix is None  # a few bytes of a body decide nothing
    assert 600 <= result.duration_ms < 2500
    assert "within the 0.6 s deadline" in (result.error or "")
    assert 0 < result.body_bytes < 20


def test_concurrency_cap_is_respected(fleet: NodeFleet) -> None:
    targets = []
    for i in range(12):
        node = fleet.add(addr(8, i), "felix-http", delay=0.2)
        targets.append(ProbeTarget(node.node_name, node.address, node.port))
    settings = ProbeSettings(timeout_seconds=0.5, concurrency=3)
    started = time.perf_counter()
    results = probe_nodes(targets, settings)
    elapsed = time.perf_counter() - started
    assert all(r.felix for r in results)
    assert fleet.max_in_flight == 3
    assert elapsed >= 0.8  # 12 answers of 0.2 s, three at a time


def test_a_late_event_loop_does_not_turn_answers_into_timeouts(fleet: NodeFleet) -> None:
    fleet.add(addr(13, 1), "felix-tls", node_name="tls-node")
    targets = [ProbeTarget("closed", addr(13, 0), 9091), ProbeTarget("tls", addr(13, 1), 9091)]
    settings = ProbeSettings(timeout_seconds=0.3, tls_timeout_seconds=0.3, http_timeout_seconds=0.3)

    async def main() -> list[ProbeResult]:
        probing = asyncio.create_task(probe_many(targets, settings))
        await asyncio.sleep(0)  # probe_many has queued its workers
        # right after the workers' connects, the prober's own loop stalls past every deadline;
        # the peers answer in time, so their answers and the expired deadlines meet in one turn
        asyncio.get_running_loop().call_soon(time.sleep, 0.7)
        return await probing

    closed, tls = asyncio.run(main())
    assert (closed.state, closed.error) == ("closed", "connection refused")
    assert (tls.state, tls.protocol, tls.felix, tls.error) == ("open", "https", True, None)


def test_results_keep_target_order(fleet: NodeFleet) -> None:
    kinds = ["closed", "felix-http", "closed", "other", "felix-tls", "closed"]
    targets = []
    for i, kind in enumerate(kinds):
        fleet.add(addr(9, i), kind)
        targets.append(ProbeTarget(f"node-{i}", addr(9, i), 9091))
    targets.insert(2, ProbeTarget("no-address", None, 9091))
    results = probe_nodes(targets, ProbeSettings(timeout_seconds=0.5, concurrency=2))
    assert [r.node for r in results] == [t.node for t in targets]
    assert [r.address for r in results] == [t.address for t in targets]
    assert [r.state for r in results] == [
        "closed",
        "open",
        "error",
        "closed",
        "open",
        "open",
        "closed",
    ]


def test_no_address_is_an_error_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_connect(*args: object, **kwargs: object) -> int:
        raise AssertionError("a node without an address must not be connected to")

    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    result = probe_one(None)
    assert (result.state, result.error, result.protocol, result.felix) == (
        "error",
        NO_ADDRESS,
        None,
        None,
    )
    assert result.connect_ms is None


@pytest.mark.parametrize(
    ("err", "state"),
    [
        (errno.EHOSTUNREACH, "unreachable"),
        (errno.ENETUNREACH, "unreachable"),
        (errno.EHOSTDOWN, "unreachable"),
        (errno.EACCES, "error"),
    ],
)
@pytest.mark.parametrize("how", ["raise", "return"])
def test_connect_errors_are_mapped(
    monkeypatch: pytest.MonkeyPatch, err: int, state: str, how: str
) -> None:
    def failing_connect_ex(self: socket.socket, address: object) -> int:
        if how == "raise":
            raise OSError(err, "simulated")
        return err

    # 127.0.0.1 even though connect never really happens: no traffic can leave loopback
    monkeypatch.setattr(socket.socket, "connect_ex", failing_connect_ex)
    result = probe_one("127.0.0.1")
    assert result.state == state
    assert errno.errorcode[err] in (result.error or "")
    if state == "error":
        assert (result.error or "").startswith("connect failed:")


def no_resolver(*args: object, **kwargs: object) -> list[object]:
    # a guard: a lookup that slipped past the patched loop would ask a resolver off loopback
    raise AssertionError("no DNS lookups in tests")


def test_no_sni_is_sent_for_an_ip_address(fleet: NodeFleet) -> None:
    node = fleet.add(addr(12, 0), "felix-tls")
    assert probe_one(node.address).felix is True
    assert node.sni == [None]


def test_a_dns_name_is_resolved_and_named_in_sni_and_host(
    fleet: NodeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = fleet.add(addr(12, 1), "felix-tls")
    asked: list[str] = []

    async def fake_getaddrinfo(
        self: object, host: str, port: int, **kwargs: object
    ) -> list[object]:
        # no resolver is ever asked: the name maps to the emulated node on loopback
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (node.address, port))]

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", no_resolver)
    result = probe_one("worker-3.nodes.example")
    assert asked == ["worker-3.nodes.example"]
    assert (result.state, result.felix) == ("open", True)
    assert node.sni == ["worker-3.nodes.example"]
    assert node.requests[0].header("Host") == "worker-3.nodes.example:9091"


@pytest.mark.parametrize("address", ["bad\x00host", "a b", "-x.example", "[::1]"])
def test_junk_addresses_are_errors_without_a_lookup(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    async def no_lookup(*args: object, **kwargs: object) -> list[object]:
        raise AssertionError("junk must not reach the resolver")

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", no_lookup)
    monkeypatch.setattr(socket, "getaddrinfo", no_resolver)
    result = probe_one(address)
    assert result.state == "error"
    assert (result.error or "").startswith("not an IP address or DNS name")


def test_invalid_port_is_an_error() -> None:
    result = probe_one("127.0.0.1", port=70000)
    assert (result.state, result.error) == ("error", "invalid port 70000")


def test_closing_a_node_closes_its_port(fleet: NodeFleet) -> None:
    fleet.add(addr(10, 0), "felix-http")
    fleet.add(addr(10, 1), "silent")
    assert probe_one(addr(10, 0)).state == "open"
    fleet.close_node(addr(10, 0))
    fleet.close_node(addr(10, 1))
    assert probe_one(addr(10, 0)).state == "closed"
    assert probe_one(addr(10, 1)).state == "closed"


def test_a_fleet_in_another_process() -> None:
    specs = [
        ListenerSpec(addr(14, 0), "felix-tls", node_name="far-tls"),
        ListenerSpec(addr(14, 1), "silent"),
        ListenerSpec(addr(14, 2), "closed"),
    ]
    targets = [ProbeTarget(s.node_name or s.address, s.address, s.port) for s in specs]
    with FleetProcess(specs) as far:
        assert far.pid is not None
        results = probe_nodes(targets, FAST)
        assert [(r.state, r.felix) for r in results] == [
            ("open", True),
            ("filtered", None),
            ("closed", None),
        ]
        assert results[0].felix_host == "far-tls"
        far.close_node(addr(14, 0))
        assert probe_one(addr(14, 0)).state == "closed"
    assert far.pid is None


def test_nodes_added_after_start_listen_at_once(fleet: NodeFleet) -> None:
    assert probe_one(addr(11, 0)).state == "closed"
    fleet.add(addr(11, 0), "felix-tls")
    assert probe_one(addr(11, 0)).felix is True


def test_probe_many_in_a_running_loop_and_empty_input() -> None:
    async def main() -> tuple[list[ProbeResult], list[ProbeResult]]:
        empty = await probe_many([], FAST)
        one = await probe_many([ProbeTarget("x", None, 9091)], FAST)
        return empty, one

    empty, one = asyncio.run(main())
    assert empty == []
    assert one[0].state == "error"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout_seconds": 0},
        {"tls_timeout_seconds": -1.0},
        {"http_timeout_seconds": float("inf")},
        {"http_timeout_seconds": float("nan")},
        {"concurrency": 0},
        {"max_body_bytes": 0},
        {"user_agent": ""},
        {"user_agent": "felixscan\r\nX-Injected: 1"},
    ],
)
def test_settings_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProbeSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"concurrency": 2.5}, {"timeout_seconds": "1"}])
def test_settings_reject_wrong_types(kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError):
        ProbeSettings(**kwargs)  # type: ignore[arg-type]


def test_default_user_agent_names_felixscan() -> None:
    assert ProbeSettings().user_agent.startswith("felixscan/")


# --- the response reader, fed byte by byte ---------------------------------------------------

FELIX_BODY = (
    b"# HELP felix_active_local_endpoints Number of active endpoints on this host.\n"
    b"# TYPE felix_active_local_endpoints gauge\n"
    b"felix_active_local_endpoints 3\n"
    b'felix_host{host="node \\"a\\"\\\\b"} 1\n'
    b"go_goroutines 12"
)


def read(raw: bytes, *, max_body: int = 1 << 20, step: int = 1, eof: bool = True) -> object:
    response = probe_module._Response(max_body)
    for i in range(0, len(raw), step):
        response.feed(raw[i : i + step])
    if eof:
        response.feed_eof()
    return response


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return (
        b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: y\r\n\r\n"
    )


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_reader_handles_chunked_bodies(step: int) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(FELIX_BODY, 17)
    response = read(raw, step=step, eof=False)
    assert isinstance(response, probe_module._Response)
    assert response.complete and response.error is None
    assert (response.status, response.felix, response.felix_host) == (200, True, 'node "a"\\b')
    assert response.body_bytes == len(FELIX_BODY)


@pytest.mark.parametrize("step", [1, 5000])
def test_reader_handles_content_length_and_close_delimited(step: int) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(FELIX_BODY)
    response = read(head + FELIX_BODY + b"ignored", step=step, eof=False)
    assert isinstance(response, probe_module._Response)
    assert response.complete and response.body_bytes == len(FELIX_BODY) and response.felix
    response = read(b"HTTP/1.0 200 OK\r\n\r\n" + FELIX_BODY, step=step)
    assert isinstance(response, probe_module._Response)
    assert response.complete and response.body_bytes == len(FELIX_BODY)
    assert response.felix_host == 'node "a"\\b'  # found on the last, unterminated line too


def test_reader_skips_interim_responses_and_spots_non_http() -> None:
    response = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", eof=False)
    assert isinstance(response, probe_module._Response)
    assert response.status == 204 and response.complete
    response = read(b"SSH-2.0-x\r\n", eof=False)
    assert isinstance(response, probe_module._Response)
    assert response.http_like is False and response.error
    response = read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", eof=False)
    assert isinstance(response, probe_module._Response)
    assert response.error and "chunk size" in response.error
    response = read(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfelix_x 1\n")
    assert isinstance(response, probe_module._Response)
    assert response.error and "before the response body was complete" in response.error
    assert response.felix and not response.complete


def test_reader_cap_counts_only_what_it_kept() -> None:
    raw = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000 + b"\nfelix_late 1\n"
    response = read(raw, max_body=4096, step=1000, eof=False)
    assert isinstance(response, probe_module._Response)
    assert response.complete and response.truncated and response.body_bytes == 4096
    assert not response.felix  # the felix line came after the cap


def test_address_for_skips_network_and_broadcast_and_stays_on_loopback() -> None:
    addresses = [address_for(i) for i in range(600)]
    assert addresses[0] == "127.10.0.1" and addresses[253] == "127.10.0.254"
    assert addresses[254] == "127.10.1.1"
    assert len(set(addresses)) == 600
    assert not any(a.endswith((".0", ".255")) for a in addresses)
    with pytest.raises(ValueError):
        address_for(0, base="10.0.0.0")
    with pytest.raises(ValueError):
        address_for(254 * 256, base="127.255.0.0")
    with pytest.raises(ValueError):
        NodeFleet().add("192.0.2.1", "felix-http")
