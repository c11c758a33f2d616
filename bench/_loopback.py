"""Loopback addresses for the benches' node listeners, claimed so two runs never share them.

Not a bench: the helper that bench/scan, bench/probe and bench/hostile import (`from
bench._loopback import claim_nodes`). A bench with N listeners needs ceil(N / 254) /24 blocks
of 127.0.0.0/8 (scanner.emulator.nodes.address_for skips .0 and .255). Each block is claimed the
way `felixscan demo` claims its one block (scanner.app.demo.claim_block): an exclusive lock on
`felixscan-demo-<block>.lock` in the temp directory, held until the bench ends, then a check
that nothing listens on the port at any of its addresses. The lock name is the demo's on
purpose, so benches and demos exclude each other too. The first free run of blocks from the
bench's default base is taken, so an undisturbed bench always uses the same addresses.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import tempfile
from contextlib import ExitStack
from pathlib import Path

from scanner.emulator.nodes import address_for

PER_BLOCK = 254  # address_for's hosts per /24
LOCK_PREFIX = "felixscan-demo-"  # scanner.app.demo.claim_block's lock files: one per /24


def claim_nodes(stack: ExitStack, count: int, *, first: str, port: int = 9091) -> str:
    """The base address of a free run of /24 blocks holding `count` nodes (address_for(i,
    base=...) for i < count), searched from `first` up to 127.255.255.0; the locks are
    released when `stack` closes (close it after the listeners stop). Raises RuntimeError
    when every candidate run is taken."""
    blocks = max(1, -(-count // PER_BLOCK))
    start = int(ipaddress.IPv4Address(first)) & ~0xFF
    end = int(ipaddress.IPv4Address("127.255.255.0"))
    if ipaddress.IPv4Address(start) not in ipaddress.IPv4Network("127.0.0.0/8"):
        raise ValueError(f"node listeners stay in 127.0.0.0/8; {first} is outside it")
    base = start
    while base + (blocks - 1) * 256 <= end:
        held = _lock_run(base, blocks)
        if held is not None:
            bases = str(ipaddress.IPv4Address(base))
            if all(_port_free(address_for(i, base=bases), port) for i in range(count)):
                for fd in held:
                    stack.callback(os.close, fd)  # each lock goes with its descriptor
                return bases
            for fd in held:
                os.close(fd)
        base += blocks * 256
    raise RuntimeError(f"no {blocks} free consecutive /24 blocks of loopback addresses from "
                       f"{first} on: other benches or demos hold them, or something listens "
                       f"on port {port} there")


def _lock_run(base: int, blocks: int) -> list[int] | None:
    """Exclusive locks on the `blocks` /24s from `base`, or None (and none held) if one is
    taken."""
    held: list[int] = []
    lock_dir = Path(tempfile.gettempdir())
    for k in range(blocks):
        block = ipaddress.IPv4Address(base + k * 256)
        fd = os.open(lock_dir / f"{LOCK_PREFIX}{block}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            for other in held:
                os.close(other)
            return None
        held.append(fd)
    return held


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the listeners bind: TIME_WAIT leftovers of an earlier run do not count as busy,
        # a socket listening there does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True
