"""`felixscan demo`: a first look without a cluster.

Starts an emulated fleet on this machine (Kubernetes API servers on 127.0.0.1, node listeners on
a free 127.x.y.0/24 block, 127.50.0.x when nobody else uses it), replays a week of nightly scans
into a fresh SQLite database (one cluster is remediated, another regresses), and writes an HTML
and a PDF report marked as emulated data. Every scan is real: the real kubernetes client, real
sockets, the same `run_scan` as `felixscan scan`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from scanner.core.config import ClusterSettings, ProbeConfig, Settings
from scanner.core.errors import FelixscanError
from scanner.db.store import Store
from scanner.emulator import (
    ClusterHandle,
    ComponentHandle,
    KubeEmulator,
    NodeSpec,
    add_kube_controllers,
    add_typha,
    build_calico_cluster,
)
from scanner.emulator.apiserver import write_kubeconfig
from scanner.emulator.nodes import NodeFleet, address_for
from scanner.scan import ScanOutcome, run_scan
from scanner.telemetry import progress

DATA = Path(__file__).resolve().parents[1] / "emulator" / "data"
FELIX_API = "crd.projectcalico.org/v1"
DEMO_NODES = 26  # fits one /24 block, with the kube-controllers pod IPs
_BLOCKS = [f"127.{second}.{third}.0" for second in range(50, 60) for third in range(0, 256, 16)]


@dataclass(frozen=True, slots=True)
class DemoResult:
    database: Path
    html: Path
    pdf: Path
    scans: tuple[ScanOutcome, ...]


@dataclass
class _Cluster:
    name: str
    handle: ClusterHandle
    addresses: dict[str, str]  # node name -> address


class _Fleet:
    """The emulated fleet: three clusters and their node listeners."""

    def __init__(self, stack: ExitStack, workdir: Path, base: str) -> None:
        self.base = base
        self.nodes = NodeFleet()
        stack.callback(self.nodes.stop)
        self.nodes.start()
        self.stack = stack
        self.workdir = workdir
        self.clusters: dict[str, _Cluster] = {}
        self._next = 0

    def add(self, name: str, *, count: int, version: str, kind: str, **build: object) -> _Cluster:
        emu = KubeEmulator(tls=True)
        self.stack.callback(emu.stop)
        emu.start()
        addresses: dict[str, str] = {}
        specs = []
        for i in range(count):
            node = f"{name}-{'cp' if i == 0 else 'worker'}-{i}"
            address = address_for(self._next, base=self.base)
            self._next += 1
            addresses[node] = address
            specs.append(NodeSpec(name=node, address=address,
                                  labels={"topology.kubernetes.io/zone": f"zone-{i % 3}"}))
            if kind != "closed":
                self.nodes.add(address, kind, node_name=node)
        daemonset = DATA / f"{version}-calico-daemonset-calico-node.yaml"
        handle = build_calico_cluster(emu, daemonset_yaml=daemonset, nodes=specs,
                                      **build)  # type: ignore[arg-type]
        cluster = _Cluster(name=name, handle=handle, addresses=addresses)
        self.clusters[name] = cluster
        return cluster

    def components(self, cluster: _Cluster, *, version: str, typha_nodes: int,
                   kcc_port: int) -> ComponentHandle:
        """Typha (metrics off, as shipped) on the first nodes, and calico-kube-controllers with
        KubeControllersConfiguration `default` at `kcc_port` (9094 as shipped: on)."""
        nodes = list(cluster.addresses)
        add_typha(cluster.handle, deployment_yaml=DATA
                  / f"{version}-calico-typha-deployment-calico-typha.yaml",
                  nodes=nodes[:typha_nodes], fleet=self.nodes)
        pod_ip = address_for(self._next, base=self.base)
        self._next += 1
        return add_kube_controllers(
            cluster.handle, deployment_yaml=DATA
            / f"{version}-calico-deployment-calico-kube-controllers.yaml",
            pod_ip=pod_ip, kcc_port=kcc_port, fleet=self.nodes, node=nodes[-1])

    def settings(self, database: str) -> Settings:
        kubeconfig = write_kubeconfig(self.workdir / "demo-kubeconfig",
                                      {name: c.handle.emu for name, c in self.clusters.items()})
        probe = ProbeConfig(timeout_seconds=0.5, tls_timeout_seconds=2, http_timeout_seconds=3)
        return Settings(database=database, clusters=tuple(
            ClusterSettings(name=name, kubeconfig=kubeconfig, context=name, probe=probe,
                            api_timeout_seconds=5, deadline_seconds=60)
            for name in self.clusters))


def claim_block(stack: ExitStack, *, blocks: list[str] | None = None) -> str:
    """A /24 of loopback addresses no other demo (or other program) on this machine uses.

    Each candidate is claimed with an exclusive lock file in the temp directory (held until
    the demo ends), then checked: nothing may already listen on port 9091 of its addresses.
    The first free block is always the same, so results stay the same run after run.
    """
    lock_dir = Path(tempfile.gettempdir())
    for base in blocks or _BLOCKS:
        path = lock_dir / f"felixscan-demo-{base}.lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if all(_port_free(address_for(i, base=base)) for i in range(DEMO_NODES)):
            stack.callback(os.close, fd)  # the lock goes with the descriptor
            return base
        os.close(fd)
    raise FelixscanError(f"demo: no free loopback block for the emulated nodes (tried "
                         f"{len(blocks or _BLOCKS)} /24 blocks from 127.50.0.0; other demos or "
                         "programs listen on port 9091 there)")


def _port_free(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 9091))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _day_clock(base: datetime) -> Callable[[], datetime]:
    """Stamps a replayed night: the night's date, with the real seconds that pass during it."""
    start = time.monotonic()
    return lambda: base + timedelta(seconds=time.monotonic() - start)


@contextmanager
def _fresh_database(path: Path) -> Iterator[str]:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    yield f"sqlite:///{path}"


def run_demo(out_dir: Path, *, days: int = 7, echo: Callable[[str], None] = print,
             today: datetime | None = None) -> DemoResult:
    """Replay `days` nightly scans of the emulated fleet and write the reports into `out_dir`."""
    from reports import build_report
    from scanner.db.queries.retention import record_report

    days = max(days, 5)
    out_dir.mkdir(parents=True, exist_ok=True)
    today = (today or datetime.now(UTC)).replace(hour=2, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days - 1)
    fix_day, done_day, regress_day = days - 4, days - 3, days - 2
    outcomes: list[ScanOutcome] = []
    with ExitStack() as stack, _fresh_database(out_dir / "felixscan-demo.db") as db:
        base = claim_block(stack)
        fleet = _Fleet(stack, Path(stack.enter_context(tempfile.TemporaryDirectory())), base)
        echo(f"Starting an emulated fleet: 3 clusters, {DEMO_NODES} nodes on "
             f"{base.rsplit('.', 1)[0]}.x ...")
        east = fleet.add("prod-east", count=12, version="v3.32.1", kind="felix-tls",
                         env={"FELIX_PROMETHEUSMETRICSENABLED": "true"})
        west = fleet.add("prod-west", count=8, version="v3.32.1", kind="closed",
                         install="operator")
        staging = fleet.add("staging", count=6, version="v3.30.7", kind="closed")
        fleet.components(east, version="v3.32.1", typha_nodes=3, kcc_port=0)
        fleet.components(west, version="v3.32.1", typha_nodes=2, kcc_port=0)
        staging_kc = fleet.components(staging, version="v3.30.7", typha_nodes=2, kcc_port=9094)
        settings = fleet.settings(db)
        store = stack.enter_context(Store(db))
        for day in range(days):
            when = first + timedelta(days=day)
            if day == 2:
                echo("  staging: kube-controllers' metrics (on by default) turned off: "
                     "prometheusMetricsPort: 0; kube-controllers restarts")
                staging_kc.set_kcc_port(0)
                staging_kc.restart()
            if day == fix_day:
                echo("  prod-east: FELIX_PROMETHEUSMETRICSENABLED=false set on the DaemonSet; "
                     "the rollout reaches 9 of 12 nodes tonight")
                east.handle.update_env({"FELIX_PROMETHEUSMETRICSENABLED": "false"})
                for node in list(east.addresses)[:9]:
                    _restart_without_metrics(fleet, east, node)
            elif day == done_day:
                echo("  prod-east: the rollout completes")
                for node in list(east.addresses)[9:]:
                    _restart_without_metrics(fleet, east, node)
            elif day == regress_day:
                echo("  prod-west: someone sets prometheusMetricsEnabled: true in "
                     "FelixConfiguration default; Felix restarts with metrics on")
                west.handle.emu.patch_object(FELIX_API, "FelixConfiguration", "default",
                                             {"spec": {"prometheusMetricsEnabled": True}})
                for node, address in west.addresses.items():
                    fleet.nodes.add(address, "felix-http", node_name=node)
            progress.current().title(f"night {day + 1}/{days}")
            outcome = run_scan(settings, store=store, trigger="demo", clock=_day_clock(when))
            outcomes.append(outcome)
            statuses = ", ".join(f"{c.cluster} {c.status.upper().replace('_', '-')}"
                                 for c in outcome.clusters)
            echo(f"{when:%Y-%m-%d} scan {outcome.scan_id}: {statuses}")
        # Generated now (the real time), over the replayed nights.
        with progress.current().step("demo: rendering demo-report.html"):
            html = build_report(store, fmt="html", out=out_dir / "demo-report.html",
                                since=first.date(), until=today.date())
        with progress.current().step("demo: rendering demo-report.pdf"):
            pdf = build_report(store, fmt="pdf", out=out_dir / "demo-report.pdf",
                               since=first.date(), until=today.date())
        for info in (html, pdf):
            record_report(store, fmt=info.format, sha256=info.sha256, location=str(info.path),
                          clusters=info.clusters, since=info.since, until=info.until,
                          scan_ids=info.scan_ids, created_at=datetime.now(UTC))
        echo(f"Report data SHA-256 {pdf.sha256}")
    return DemoResult(database=out_dir / "felixscan-demo.db", html=html.path, pdf=pdf.path,
                      scans=tuple(outcomes))


def _restart_without_metrics(fleet: _Fleet, cluster: _Cluster, node: str) -> None:
    """The DaemonSet controller replaces the node's pod; the new Felix serves no metrics."""
    cluster.handle.roll_pod(node)
    fleet.nodes.close_node(cluster.addresses[node])
