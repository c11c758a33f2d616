"""An RFC 3161 time-stamping authority on 127.0.0.1 for tests.

pyHanko's DummyTimeStamper builds and signs the responses; this puts it behind a small
`http.server` on an ephemeral loopback port, speaking RFC 3161's HTTP transport
(POST application/timestamp-query, answer application/timestamp-reply). certomancer's
Animator could serve one too, but needs werkzeug and its own YAML-described PKI, while the
tests make theirs with `cryptography`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from asn1crypto import tsp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pyhanko.keys import load_certs_from_pemder_data, load_private_key_from_pemder_data
from pyhanko.sign.timestamps import DummyTimeStamper
from pyhanko_certvalidator.registry import SimpleCertificateStore

LOOPBACK = "127.0.0.1"


class LoopbackTSA:
    """Serves timestamps signed by `key`/`cert` at `url` until `close()`."""

    def __init__(self, cert: x509.Certificate, key: PrivateKeyTypes,
                 chain: list[x509.Certificate]) -> None:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError("pyHanko's DummyTimeStamper signs with RSA keys only")
        asn1 = _asn1_certs([cert, *chain])
        self.stamper = DummyTimeStamper(
            tsa_cert=asn1[0],
            tsa_key=load_private_key_from_pemder_data(key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), None),
            certs_to_embed=SimpleCertificateStore.from_certs(asn1[1:]))
        self.requests = 0
        self._lock = threading.Lock()
        tsa = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Type") != "application/timestamp-query":
                    self.send_error(415, "expected application/timestamp-query")
                    return
                try:
                    reply = tsa.stamper.request_tsa_response(tsp.TimeStampReq.load(body))
                    data = reply.dump()
                except (ValueError, TypeError, KeyError):
                    self.send_error(400, "not a TimeStampReq")
                    return
                with tsa._lock:
                    tsa.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest's output clean

        # Port 0: the kernel picks a free port; bound to loopback only.
        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="loopback-tsa", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/tsa"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _asn1_certs(certs: list[x509.Certificate]) -> list[Any]:
    return [next(iter(load_certs_from_pemder_data(c.public_bytes(serialization.Encoding.DER))))
            for c in certs]


@contextmanager
def silent_server() -> Iterator[str]:
    """A loopback TCP port that accepts connections and never answers: a hung TSA."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(8)  # the kernel completes handshakes into the backlog; nobody reads
        yield f"http://{LOOPBACK}:{sock.getsockname()[1]}/tsa"


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    return f"http://{LOOPBACK}:{port}/tsa"


@contextmanager
def fixed_answer_server(status: int, content_type: str) -> Iterator[str]:
    """A loopback HTTP server answering every POST with `status` and `content_type`: a
    misconfigured TSA URL (a web page, a proxy error)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = b"<html>not a TSA</html>"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}/tsa"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
