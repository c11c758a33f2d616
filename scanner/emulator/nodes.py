"""Node stand-ins for tests, the demo and benches: what a prober finds on a node's port 9091.

Every emulated node is a listener (or a deliberate absence of one) on a loopback address
127.x.y.z, so a whole fleet fits on one machine and no traffic ever leaves it. A `NodeFleet` runs
its listeners on an asyncio loop in a background thread; `FleetProcess` runs one in a child process
so that thousands of listeners do not share a CPU-bound interpreter with the prober.

Kinds (the `kind` argument of `NodeFleet.add`):
  felix-tls    Felix metrics over HTTPS with a self-signed RSA-2048 certificate
  felix-http   Felix metrics over plain HTTP (Felix's default when no certificate is set)
  felix-mtls   Felix over TLS demanding a client certificate (Calico 3.32+ client auth)
  other        a non-Felix HTTP service on the port (Pushgateway-style metrics)
  closed       nothing listening: connects are refused
  silent       a listener whose accept queue is full: connects time out (a filtered port)
  mute         accepts and never says anything
  redirect     answers 301 to another URL
  endless      a Felix body that never ends
  drip         a Felix response sent one byte at a time
  banner       a non-HTTP service that speaks first (SSH-style banner)
  reset        accepts and resets the connection at once
  reset-mid    Felix over plain HTTP that resets the connection halfway through the body
  garbage      answers whatever it is sent (a TLS hello, a GET) with bytes that are neither
  tls-expired  Felix over TLS with a certificate that expired 30 days ago
  tls-wildcard Felix over TLS with a wildcard certificate (CN and SAN *.nodes.example)
  tls-nosubject  Felix over TLS with a certificate whose subject and issuer are empty
  tls-longchain  Felix over TLS presenting a chain of LONG_CHAIN certificates
  typha-http   Typha's metrics (`typha_*`) over plain HTTP (Typha's port 9093, host network)
  typha-tls    Typha's metrics over HTTPS (a metrics certificate or key file set, v3.32+)
  kube-controllers-http  calico-kube-controllers' metrics (`ipam_*`) over plain HTTP (9094)

Typha and kube-controllers listeners are usually managed by `scanner.emulator.components`,
which opens and closes them as the component's declared configuration says.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import json
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from scanner.emulator.certs import issue, server_ssl_context

__all__ = [
    "KINDS",
    "EmulatedNode",
    "FleetProcess",
    "ListenerSpec",
    "NodeFleet",
    "Request",
    "address_for",
    "felix_metrics",
    "kube_controllers_metrics",
    "other_metrics",
    "typha_metrics",
]

KINDS = frozenset(
    {
        "felix-tls",
        "felix-http",
        "felix-mtls",
        "other",
        "closed",
        "silent",
        "mute",
        "redirect",
        "endless",
        "drip",
        "banner",
        "reset",
        "reset-mid",
        "garbage",
        "tls-expired",
        "tls-wildcard",
        "tls-nosubject",
        "tls-longchain",
        "typha-http",
        "typha-tls",
        "kube-controllers-http",
    }
)
_TLS_KINDS = frozenset({"felix-tls", "felix-mtls", "typha-tls"})
# Felix over TLS with odd certificates: one certificate (chain) per kind, shared by its nodes
_ODD_TLS_KINDS = frozenset({"tls-expired", "tls-wildcard", "tls-nosubject", "tls-longchain"})
LONG_CHAIN = 24  # certificates in tls-longchain's chain: leaf, intermediates, root
GARBAGE = bytes((i * 131 + 7) % 256 for i in range(2048))  # neither TLS nor HTTP
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
REDIRECT_LOCATION = "http://127.0.0.2:9/elsewhere"  # loopback, so even a buggy follow stays local
BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_GO_CHUNKING = 2048  # Go's net/http switches to chunked encoding above this much unflushed output
_CHUNK = 4096
_MAX_HEAD = 65536
_ENDLESS_LIMIT = 256 * 1024 * 1024  # even an "endless" body stops somewhere
_SILENT_FILL = 8  # most kernels queue backlog+1 connections; more means something is off
_SILENT_CHECK = 0.25  # a SYN to a full queue is dropped; a queued one completes in microseconds
_T = TypeVar("_T")


def address_for(index: int, *, base: str = "127.10.0.0") -> str:
    """Node `index`'s address: distinct 127.x.y.z hosts from base's /24 on, skipping .0/.255."""
    if index < 0:
        raise ValueError(f"index must be >= 0, not {index}")
    start = ipaddress.IPv4Address(base)
    if start not in _LOOPBACK:
        raise ValueError(f"emulated nodes live in 127.0.0.0/8; {base} is outside it")
    block, host = divmod(index, 254)
    address = ipaddress.IPv4Address((int(start) & ~0xFF) + block * 256 + host + 1)
    if address not in _LOOPBACK:
        raise ValueError(f"index {index} from {base} runs past 127.255.255.254")
    return str(address)


# --- what the nodes serve ---------------------------------------------------------------------


def felix_metrics(node_name: str) -> bytes:
    """A Felix-style /metrics body (Prometheus text format 0.0.4) for one node."""
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float, **labels: str) -> None:
        metric = Gauge(name, doc, list(labels), registry=registry)
        (metric.labels(**labels) if labels else metric).set(value)

    gauge("felix_active_local_endpoints", "Number of active endpoints on this host.", 14)
    gauge("felix_active_local_policies", "Number of active policies on this host.", 9)
    gauge("felix_active_local_selectors", "Number of active selectors on this host.", 21)
    gauge("felix_cluster_num_host_endpoints", "Total number of host endpoints cluster-wide.", 0)
    gauge("felix_cluster_num_hosts", "Total number of Calico hosts in the cluster.", 250)
    gauge("felix_cluster_num_workload_endpoints", "Total number of workload endpoints.", 3120)
    gauge(
        "felix_host",
        "Configured Felix hostname (as a label), typically used in grouping/aggregating stats; "
        "the label defaults to the hostname of the host but can be overridden by configuration. "
        "The value of the gauge is always set to 1.",
        1,
        host=node_name,
    )
    rules = Gauge(
        "felix_iptables_rules",
        "Number of active iptables rules.",
        ["ip_version", "table"],
        registry=registry,
    )
    for table, count in (("filter", 412), ("nat", 57), ("mangle", 12), ("raw", 18)):
        rules.labels(ip_version="4", table=table).set(count)
    gauge("felix_resync_state", "Current datastore state.", 3)
    gauge("go_goroutines", "Number of goroutines that currently exist.", 187)
    gauge("go_threads", "Number of OS threads created.", 23)
    gauge("go_memstats_heap_alloc_bytes", "Number of heap bytes allocated and still in use.", 3.1e7)
    gauge("process_open_fds", "Number of open file descriptors.", 41)
    gauge("process_resident_memory_bytes", "Resident memory size in bytes.", 9.4e7)
    gauge("process_start_time_seconds", "Start time of the process since unix epoch.", 1.75e9)
    return generate_latest(registry)


def typha_metrics(node_name: str) -> bytes:
    """A Typha-style /metrics body: `typha_*` metrics (typha/pkg/syncserver, snapcache)."""
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float, **labels: str) -> None:
        metric = Gauge(name, doc, list(labels), registry=registry)
        (metric.labels(**labels) if labels else metric).set(value)

    gauge("typha_connections_accepted", "Total number of connections accepted over time.", 251)
    gauge("typha_connections_active", "Number of open client connections.", 250)
    gauge("typha_connections_dropped", "Total number of connections dropped due to rebalancing.",
          0)
    gauge("typha_snapshots_generated", "Number of snapshots generated.", 37)
    gauge("typha_snapshots_reused", "Number of snapshots sent to clients, reused.", 214)
    gauge("typha_breadcrumb_seq_number", "Current (server-local) sequence number; number of "
          "snapshot deltas processed.", 90210, syncer="felix")
    gauge("typha_cache_size", "Number of key/value pairs in Typha's in-memory cache.", 5120,
          syncer="felix")
    gauge("typha_updates_total", "Total number of updates received from the Syncer.", 183002)
    gauge("typha_log_errors", "Number of errors encountered while logging.", 0)
    gauge("go_goroutines", "Number of goroutines that currently exist.", 1340)
    gauge("process_open_fds", "Number of open file descriptors.", 262)
    gauge("process_start_time_seconds", "Start time of the process since unix epoch.", 1.75e9)
    del node_name  # Typha's metrics carry no host label
    return generate_latest(registry)


def kube_controllers_metrics() -> bytes:
    """A calico-kube-controllers /metrics body: its IPAM gauges (`ipam_*`,
    kube-controllers/pkg/controllers/node/ipam.go) plus the Go client's."""
    registry = CollectorRegistry()
    in_use = Gauge("ipam_allocations_in_use", "IPs currently allocated in IPAM to a workload "
                   "or tunnel endpoint.", ["ippool", "node"], registry=registry)
    blocks = Gauge("ipam_blocks", "IPAM blocks currently allocated for nodes.",
                   ["ippool", "node"], registry=registry)
    for n in range(3):
        in_use.labels(ippool="default-ipv4-ippool", node=f"worker-{n}").set(12 + n)
        blocks.labels(ippool="default-ipv4-ippool", node=f"worker-{n}").set(1)
    size = Gauge("ipam_ippool_size", "Total number of addresses in the IP Pool.", ["ippool"],
                 registry=registry)
    size.labels(ippool="default-ipv4-ippool").set(65536)
    Gauge("ipam_allocations_borrowed", "IPs currently allocated for a workload or tunnel "
          "endpoint, where the IP belongs to an affine block of another node.",
          ["ippool", "node"], registry=registry)
    Gauge("go_goroutines", "Number of goroutines that currently exist.", registry=registry
          ).set(96)
    return generate_latest(registry)


def other_metrics() -> bytes:
    """A Pushgateway-style /metrics body: a Prometheus endpoint that is not Felix."""
    registry = CollectorRegistry()
    info = Gauge("pushgateway_build_info", "Build information.", ["version"], registry=registry)
    info.labels(version="1.9.0").set(1)
    pushed = Gauge(
        "push_time_seconds", "Last Unix time when changing this group.", ["job"], registry=registry
    )
    pushed.labels(job="nightly-backup").set(1.75e9)
    last = Gauge(
        "backup_last_success_unixtime", "Last successful backup.", ["job"], registry=registry
    )
    last.labels(job="nightly-backup").set(1.75e9)
    return generate_latest(registry)


def _fleet_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _node_certificate(key: rsa.RSAPrivateKey, common_name: str, address: str) -> bytes:
    """A self-signed certificate (PEM) for one node, for the fleet's shared key.

    A fresh RSA key per node costs ~40 ms: a bench fleet of 1,250 TLS nodes shares one key and
    still gets a distinct certificate and fingerprint per node.
    """
    return issue(common_name, key=key, hosts=[address])


def _odd_certificate(kind: str) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) for one of the odd-certificate kinds; EC keys, so it is quick."""
    now = datetime.now(UTC).replace(microsecond=0)

    def build(
        subject: x509.Name,
        issuer: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
        not_after: datetime,
        san: x509.SubjectAlternativeName | None = None,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(now - timedelta(minutes=5), not_after - timedelta(days=90)))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san is not None:
            # RFC 5280: with an empty subject the SAN carries the identity and is critical
            builder = builder.add_extension(san, critical=len(subject) == 0)
        return builder.sign(signer, hashes.SHA256())

    def cn(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    key = ec.generate_private_key(ec.SECP256R1())
    year = now + timedelta(days=365)
    chain: list[x509.Certificate] = []
    if kind == "tls-expired":
        chain.append(build(cn("expired.nodes.example"), cn("expired.nodes.example"), key, key,
                           ca=False, not_after=now - timedelta(days=30)))
    elif kind == "tls-wildcard":
        san = x509.SubjectAlternativeName([x509.DNSName("*.nodes.example")])
        chain.append(build(cn("*.nodes.example"), cn("*.nodes.example"), key, key, ca=False,
                           not_after=year, san=san))
    elif kind == "tls-nosubject":
        san = x509.SubjectAlternativeName([x509.DNSName("nosubject.nodes.example")])
        chain.append(build(x509.Name([]), x509.Name([]), key, key, ca=False, not_after=year,
                           san=san))
    elif kind == "tls-longchain":
        # root -> intermediates -> leaf; served leaf first, as TLS sends it
        signer, issuer = ec.generate_private_key(ec.SECP256R1()), cn("chain-root")
        chain.append(build(issuer, issuer, signer, signer, ca=True, not_after=year))
        for depth in range(1, LONG_CHAIN - 1):
            sub_key, subject = ec.generate_private_key(ec.SECP256R1()), cn(f"chain-ca-{depth}")
            chain.append(build(subject, issuer, sub_key, signer, ca=True, not_after=year))
            signer, issuer = sub_key, subject
        chain.append(build(cn("longchain.nodes.example"), issuer, key, signer, ca=False,
                           not_after=year))
        chain.reverse()
    else:
        raise ValueError(f"not an odd-certificate kind: {kind!r}")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return b"".join(pem(c) for c in chain), key_pem


# --- the fleet --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request head a listener received."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass(eq=False)
class EmulatedNode:
    """One emulated node's listener and what it has seen."""

    address: str
    port: int
    kind: str
    node_name: str
    delay: float = 0.0  # seconds to wait before answering a request
    body: bytes = b""
    cert_pem: bytes | None = None
    requests: list[Request] = field(default_factory=list)
    connections: int = 0  # connections accepted
    not_http: int = 0  # connections whose first bytes were not an HTTP request (e.g. a TLS hello)
    sni: list[str | None] = field(default_factory=list)  # server names sent in TLS hellos
    listening: bool = False
    shut: bool = False  # close_node() was called: stays closed, also across start()
    _server: asyncio.Server | None = field(default=None, repr=False)
    _ssl: ssl.SSLContext | None = field(default=None, repr=False)
    _silent: list[socket.socket] = field(default_factory=list, repr=False)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, repr=False)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)

    @property
    def cert_der(self) -> bytes | None:
        if self.cert_pem is None:
            return None
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
            serialization.Encoding.DER
        )


class NodeFleet:
    """Emulated nodes listening on loopback addresses, served by a background event loop.

    Use as a context manager (or call start()/stop()). Nodes may be added before or after start.
    `in_flight`/`max_in_flight` count requests being answered at once, across the fleet.
    """

    def __init__(self) -> None:
        self._nodes: dict[tuple[str, int], EmulatedNode] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._key: rsa.RSAPrivateKey | None = None
        self._key_pem: bytes | None = None
        self._odd: dict[str, tuple[bytes, ssl.SSLContext]] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    # public API --------------------------------------------------------------------------------

    def add(
        self,
        address: str,
        kind: str,
        *,
        port: int = 9091,
        node_name: str | None = None,
        delay: float = 0.0,
    ) -> EmulatedNode:
        """Add a node; it listens at once when the fleet is running, else on start()."""
        if kind not in KINDS:
            raise ValueError(f"unknown node kind {kind!r}; expected one of {sorted(KINDS)}")
        ip = ipaddress.ip_address(address)
        if ip not in _LOOPBACK and ip != ipaddress.IPv6Address("::1"):
            raise ValueError(f"emulated nodes live in 127.0.0.0/8 or on ::1; {address} is "
                             "outside them")
        if (address, port) in self._nodes:
            raise ValueError(f"a node already uses {address}:{port}")
        if not 0 < port < 65536 or delay < 0:
            raise ValueError(f"bad port {port} or delay {delay}")
        name = node_name or f"node-{address.replace('.', '-')}"
        node = EmulatedNode(address=address, port=port, kind=kind, node_name=name, delay=delay)
        if kind.startswith(("felix-", "tls-")) or kind in ("endless", "drip", "reset-mid"):
            node.body = felix_metrics(name)
        elif kind.startswith("typha-"):
            node.body = typha_metrics(name)
        elif kind == "kube-controllers-http":
            node.body = kube_controllers_metrics()
        elif kind == "other":
            node.body = other_metrics()
        if kind in _TLS_KINDS:
            self._prepare_tls(node)
        elif kind in _ODD_TLS_KINDS:
            node.cert_pem, node._ssl = self._odd_tls(kind)
        self._nodes[(address, port)] = node
        if self._loop is not None:
            self._call(self._open([node]))
        return node

    def node(self, address: str, port: int = 9091) -> EmulatedNode:
        return self._nodes[(address, port)]

    @property
    def nodes(self) -> list[EmulatedNode]:
        return list(self._nodes.values())

    def close_node(self, address: str, port: int = 9091) -> None:
        """Stop listening (and drop open connections): the node's port is now closed."""
        node = self._nodes[(address, port)]
        node.shut = True
        if self._loop is not None:
            self._call(self._close(node))

    def remove(self, address: str, port: int = 9091) -> bool:
        """Close the listener on address:port (if any) and forget it, so that the address and
        port may be given a listener again (`add`); False when there was none."""
        node = self._nodes.pop((address, port), None)
        if node is None:
            return False
        node.shut = True
        if self._loop is not None:
            self._call(self._close(node))
        return True

    def start(self) -> None:
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="node-fleet", daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop
        try:
            self._call(self._open(list(self._nodes.values())))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._close_all())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> NodeFleet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # plumbing ----------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _prepare_tls(self, node: EmulatedNode) -> None:
        if self._key is None:
            self._key = _fleet_key()
            self._key_pem = self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        assert self._key_pem is not None
        node.cert_pem = _node_certificate(self._key, node.node_name, node.address)
        ctx = server_ssl_context(node.cert_pem, self._key_pem)

        def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            node.sni.append(name)

        ctx.sni_callback = record_sni
        if node.kind == "felix-mtls":
            # RequireAndVerifyClientCert: the prober has no client certificate, so it is refused
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=node.cert_pem.decode("ascii"))
        node._ssl = ctx

    def _odd_tls(self, kind: str) -> tuple[bytes, ssl.SSLContext]:
        """The leaf certificate (PEM) and server context of an odd-certificate kind."""
        if kind not in self._odd:
            chain, key = _odd_certificate(kind)
            leaf = chain.split(b"-----END CERTIFICATE-----", 1)[0] + b"-----END CERTIFICATE-----\n"
            self._odd[kind] = (leaf, server_ssl_context(chain, key))
        return self._odd[kind]

    async def _open(self, nodes: list[EmulatedNode]) -> None:
        await asyncio.gather(*(self._listen(n) for n in nodes if not n.listening and not n.shut))

    async def _listen(self, node: EmulatedNode) -> None:
        if node.kind == "closed":
            return
        if node.kind == "silent":
            node._silent = await _silent_listener(node.address, node.port)
        else:
            node._server = await asyncio.start_server(
                functools.partial(self._serve, node),
                node.address,
                node.port,
                ssl=node._ssl,
                ssl_handshake_timeout=10.0 if node._ssl else None,
                ssl_shutdown_timeout=1.0 if node._ssl else None,
            )
        node.listening = True

    async def _close(self, node: EmulatedNode) -> None:
        if node._server is not None:
            node._server.close()
            node._server = None
        for sock in node._silent:
            sock.close()
        node._silent = []
        for writer in list(node._writers):
            writer.transport.abort()  # the handlers see EOF or a reset and return
        tasks = list(node._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:  # e.g. one sleeping out a long delay
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        node.listening = False

    async def _close_all(self) -> None:
        await asyncio.gather(*(self._close(n) for n in self._nodes.values()))
        # aborted transports release their sockets on the next loop turns
        for _ in range(3):
            await asyncio.sleep(0)

    async def _serve(
        self, node: EmulatedNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        node._tasks.add(task)
        node._writers.add(writer)
        node.connections += 1
        try:
            await self._answer(node, reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the prober hung up or reset: that is its right
        except asyncio.CancelledError:
            # only close()/stop() cancel a handler; Python 3.11's streams would log a cancelled
            # handler task as an error, so end it quietly
            pass
        finally:
            node._writers.discard(writer)
            node._tasks.discard(task)
            writer.transport.abort()

    async def _answer(
        self, node: EmulatedNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        kind = node.kind
        if kind == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # the abort in _serve now sends RST
        if kind == "garbage":
            if await reader.read(4096):
                writer.write(GARBAGE)
                await writer.drain()
            while await reader.read(65536):
                pass
            return
        if kind == "banner":
            writer.write(BANNER)
        if kind in ("mute", "banner"):
            while await reader.read(65536):
                pass
            return
        head = await _read_head(reader)
        if head is None or isinstance(head, bytes):
            node.not_http += 1
            if head:
                # what most plain HTTP servers say to a TLS hello or other garbage
                writer.write(_response(400, b"Bad Request\n", content_type=b"text/plain"))
                await writer.drain()
            return
        node.requests.append(head)
        if head.method != "GET" or head.target != "/metrics":
            payload = _response(404, b"404 page not found\n", content_type=b"text/plain")
        elif kind == "drip":
            await _drip(writer, node.body)
            return
        elif kind == "endless":
            await _endless(writer, node.body)
            return
        elif kind == "redirect":
            payload = _response(301, b"", location=REDIRECT_LOCATION.encode())
        elif kind == "reset-mid":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                % (_CONTENT_TYPE, len(node.body), node.body[: len(node.body) // 2])
            )
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # the abort in _serve now sends RST, halfway through the body
        else:
            payload = _response(200, node.body, content_type=_CONTENT_TYPE)
        # counted from the request to the write: the prober cannot finish a probe before it
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if node.delay:
                await asyncio.sleep(node.delay)
            writer.write(payload)
        finally:
            self.in_flight -= 1
        await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> Request | bytes | None:
    """The request head, the first bytes when they are not HTTP, or None on a silent close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await reader.read(4096)
        if not chunk:
            return data or None
        data += chunk
        if not data[:1].isalpha() or len(data) > _MAX_HEAD:
            return data  # a TLS hello starts with 0x16; no request line starts with a non-letter
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return data
    headers = tuple(
        (k.strip(), v.strip()) for k, sep, v in (h.partition(":") for h in lines[1:]) if sep
    )
    return Request(method=parts[0], target=parts[1], version=parts[2], headers=headers)


def _response(
    status: int, body: bytes, *, content_type: bytes | None = None, location: bytes | None = None
) -> bytes:
    reason = {200: b"OK", 301: b"Moved Permanently", 400: b"Bad Request", 404: b"Not Found"}
    head = [b"HTTP/1.1 %d %s" % (status, reason[status])]
    if content_type:
        head.append(b"Content-Type: " + content_type)
    if location:
        head.append(b"Location: " + location)
    head.append(b"Connection: close")
    if len(body) > _GO_CHUNKING:
        head.append(b"Transfer-Encoding: chunked")
        chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in _pieces(body, _CHUNK)]
        return b"\r\n".join(head) + b"\r\n\r\n" + b"".join(chunks) + b"0\r\n\r\n"
    head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def _drip(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (_CONTENT_TYPE, len(body))
    )
    for i in range(len(body)):
        writer.write(body[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0.1)


async def _endless(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % _CONTENT_TYPE
    )
    chunk = b"%x\r\n%s\r\n" % (len(body), body)
    sent = 0
    while sent < _ENDLESS_LIMIT:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)


async def _silent_listener(address: str, port: int) -> list[socket.socket]:
    """A listener whose accept queue is full, then the connections that fill it.

    With listen(0) Linux queues one connection; a SYN to a full queue is dropped, so a further
    connect hears nothing until it times out. The fill is checked, not assumed: connects are made
    until one gets no answer within _SILENT_CHECK.
    """
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets = [listener]
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(0)
        for _ in range(_SILENT_FILL):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            try:
                async with asyncio.timeout(_SILENT_CHECK):
                    await loop.sock_connect(filler, (address, port))
            except TimeoutError:
                filler.close()
                return sockets
            except BaseException:
                filler.close()
                raise
            # closed with RST at stop, so a fleet leaves no client ports in TIME_WAIT
            filler.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sockets.append(filler)
        raise RuntimeError(
            f"{address}:{port}: the accept queue never filled; cannot emulate silent"
        )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise


# --- a fleet in another process -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    address: str
    kind: str
    port: int = 9091
    node_name: str | None = None


class FleetProcess:
    """A NodeFleet served by a child Python process; a context manager.

    Benches use it so the listeners' CPU (TLS handshakes, HTTP answers) is not charged to the
    prober's interpreter. The child exits when stopped or when this process goes away.
    """

    def __init__(self, specs: Iterable[ListenerSpec], *, ready_timeout: float = 600.0) -> None:
        self._specs = list(specs)
        self._ready_timeout = ready_timeout
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from scanner.emulator.nodes import _child; _child()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        specs = [[s.address, s.kind, s.port, s.node_name] for s in self._specs]
        try:
            self._send(json.dumps(specs))
            self._expect("ready", self._ready_timeout)
        except BaseException:
            self.stop()
            raise

    def close_node(self, address: str, port: int = 9091) -> None:
        self._send(f"close {address} {port}")
        self._expect("ok", 60.0)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()  # EOF tells the child to stop its fleet and exit
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def __enter__(self) -> FleetProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def _expect(self, word: str, timeout: float) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        readable, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline().strip() if readable else ""
        if line != word:
            raise RuntimeError(f"node fleet process: expected {word!r}, got {line or 'nothing'!r}")


def _child() -> None:
    """Entry point of FleetProcess's child: specs on the first stdin line, then commands."""
    import asyncio.sslproto

    from scanner.probe import raise_nofile_limit

    raise_nofile_limit()
    # This process only serves the fleet, so it may tune the stdlib for that: asyncio's SSL
    # protocol zero-fills a 256 KiB read buffer per connection, which was a third of the CPU
    # of 1,250 handshakes; TLS records are at most 16 KiB. Full collections over the listeners'
    # long-lived objects were another tenth.
    asyncio.sslproto.SSLProtocol.max_size = 16 * 1024
    gc.set_threshold(100_000, 50, 100)
    fleet = NodeFleet()
    for address, kind, port, node_name in json.loads(sys.stdin.readline()):
        fleet.add(address, kind, port=port, node_name=node_name)
    with fleet:
        # the setup garbage would otherwise be walked by full collections while serving
        gc.collect()
        gc.freeze()
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["close"] and len(words) == 3:
                fleet.close_node(words[1], int(words[2]))
                print("ok", flush=True)
            elif words[:1] == ["stop"]:
                break
