"""Settings: the YAML configuration file, then the environment, then command-line flags.

One `Settings` object is built here and passed explicitly to every stage. Validation is strict:
an unknown key, a wrong type, a missing kubeconfig or context, or a duplicate cluster name raise
`ConfigError` naming the file, the key and what was expected, before anything is scanned.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from scanner.core.errors import ConfigError
from scanner.core.records import CONTROL_IDS

DEFAULT_DATABASE = "sqlite:///felixscan.db"
ADDRESS_TYPES = ("InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_VANTAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class CalicoSettings:
    """Where calico-node lives. `namespace=None` auto-detects (kube-system or calico-system)."""

    namespace: str | None = None
    daemonset: str = "calico-node"
    container: str = "calico-node"
    # The Deployments of the typha-metrics and kube-controllers-metrics controls, in the
    # namespace calico-node is found in (manifest and operator installs name them alike).
    typha: str = "calico-typha"
    typha_container: str = "calico-typha"
    kube_controllers: str = "calico-kube-controllers"
    kube_controllers_container: str = "calico-kube-controllers"


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """How nodes are probed."""

    address_type: str = "InternalIP"  # which Node.status.addresses entries to knock on
    # Every address of these types is probed (both families: Felix binds `:port`); the YAML
    # key `address_type` takes one type or a list, e.g. [InternalIP, ExternalIP].
    address_types: tuple[str, ...] = ("InternalIP",)
    timeout_seconds: float = 2.0  # TCP connect timeout; TLS and HTTP get their own below
    tls_timeout_seconds: float = 3.0
    http_timeout_seconds: float = 5.0  # deadline for the whole GET /metrics
    concurrency: int = 256  # connections open at once
    extra_ports: tuple[int, ...] = ()  # probed besides the effective Felix port


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """A weekly window such as `Sat 01:00-05:00 UTC` (days may be `Mon-Fri` or `Sat,Sun`)."""

    days: frozenset[int]  # 0 = Monday
    start: time
    end: time
    tz: str
    text: str


@dataclass(frozen=True, slots=True)
class RemediationSettings:
    enabled: bool = False  # remediation refuses to touch a cluster unless this is true
    window: MaintenanceWindow | None = None
    auto: bool = False  # `serve` remediates by itself after a non-compliant scan


@dataclass(frozen=True, slots=True)
class NodeCheckSettings:
    """Where the node-check DaemonSet (`felixscan node-check`, deploy/overlays/node-check) runs,
    so that the scan reads each node's own view of its listeners from the pods' logs
    (`node_check:` of a cluster; absent: no node view is read)."""

    namespace: str = "felixscan-node-check"
    selector: str = "app.kubernetes.io/component=node-check"  # label selector of its pods
    container: str = "felixscan"  # as deploy/overlays/node-check names it
    max_age_seconds: float = 300.0  # an older line is stale: the verdict does not rest on it
    tail_lines: int = 20  # log lines read per pod; the newest valid one counts


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    name: str
    kubeconfig: Path | None = None  # None with in_cluster: the pod's service account
    context: str | None = None  # None: the kubeconfig's current-context
    in_cluster: bool = False
    calico: CalicoSettings = field(default_factory=CalicoSettings)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    remediation: RemediationSettings = field(default_factory=RemediationSettings)
    api_timeout_seconds: float = 10.0  # per API request
    deadline_seconds: float = 120.0  # the whole collection of one cluster
    schedule: str | None = None  # overrides the global schedule for `serve`
    timezone: str | None = None  # zone of this cluster's schedule; None: serve.timezone
    node_check: NodeCheckSettings | None = None  # read node-check's view of each node
    # The controls checked (records.CONTROL_IDS order): every Calico metrics endpoint unless
    # the config narrows it (`controls:` per cluster, or at the top for every cluster).
    controls: tuple[str, ...] = CONTROL_IDS


@dataclass(frozen=True, slots=True)
class ScanSettings:
    """One `felixscan scan` run over several clusters (`scan:`)."""

    # Clusters scanned at the same time by one run: one collects while another probes. The
    # probe sockets of all of them share one process-wide budget (scanner.scan), so a high
    # bound never exhausts file descriptors. `serve` runs one cluster per run: its bound is
    # `serve.max_concurrent_scans`.
    max_concurrent_clusters: int = 8


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """`felixscan serve`: how scans are scheduled and the web page is served (`serve:`)."""

    listen: str = "127.0.0.1:8080"  # HOST:PORT of the web page; `--listen` wins
    timezone: str = "UTC"  # the zone cron schedules are read in
    jitter_seconds: int = 0  # each run starts up to this much later, to spread a fleet's load
    misfire_grace_seconds: int = 3600  # a run missed (downtime, busy) still starts within this
    coalesce: bool = True  # several missed runs of one cluster start only once
    # Clusters this process scans at the same time (each a run of its own; their probe
    # sockets share the process-wide budget of scanner.scan).
    max_concurrent_scans: int = 4
    shutdown_grace_seconds: float = 60.0  # on SIGTERM, running scans may finish within this
    lock_ttl_seconds: float = 120.0  # SQLite lease lifetime; renewed every third of it
    report_cache_dir: Path | None = None  # rendered reports, by data hash; None: a temp dir
    report_cache_entries: int = 64  # reports kept in that cache, newest first
    public_url: str | None = None  # the page's address as auditors reach it (alert links)


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Webhook alerts (`alerts:`) when a cluster turns non-compliant or recovers."""

    # A Slack webhook URL is itself the credential: kept out of repr and logs, and
    # $FELIXSCAN_ALERT_WEBHOOK_URL overrides the file so it can live in a Secret.
    webhook_url: str | None = field(default=None, repr=False)
    timeout_seconds: float = 5.0  # per attempt
    retries: int = 5  # attempts after the first, on network errors, 5xx and 429
    backoff_seconds: float = 2.0  # first wait between attempts; doubles each time


@dataclass(frozen=True, slots=True)
class SigningSettings:
    """How PDF reports are signed (`report.signing`): PAdES, timestamped when `tsa_url` is set.

    Paths and where the passphrase comes from, never the passphrase itself: it is read when a
    report is signed (`reports.signing`), so it is in no settings object, log or repr.
    """

    key: Path  # the private key (PEM or DER), or a PKCS#12 file holding key and certificate
    cert: Path | None = None  # the signer's certificate (PEM, DER or a bundle); None: PKCS#12
    passphrase_env: str | None = None  # the environment variable holding the key's passphrase
    passphrase_file: Path | None = None  # or a file holding it (a mounted Secret)
    tsa_url: str | None = None  # RFC 3161 time-stamping authority (PAdES B-T); None: B-B
    reason: str | None = None  # the signature's /Reason
    location: str | None = None  # the signature's /Location


@dataclass(frozen=True, slots=True)
class ReportSettings:
    """Reports (`report:`)."""

    signing: SigningSettings | None = None  # None: PDF reports are not signed
    # On the cover, for sign-off: who prepared the report, and who owns the control.
    preparer: str | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    database: str
    clusters: tuple[ClusterSettings, ...]
    schedule: str | None = None
    source: str | None = None  # the config file these came from, for messages
    scan: ScanSettings = field(default_factory=ScanSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    # Accepted risks (scanner.core.waivers): a YAML list, reviewed like code; relative to the
    # config file. Each waiver expires at most `waiver_max_days` after it was created.
    waivers_file: Path | None = None
    waiver_max_days: int = 365
    # Where the probes come from, by name (`vantage`, $FELIXSCAN_VANTAGE, `scan --vantage`):
    # e.g. corp-network for serve outside the clusters, pod-network for the in-cluster agent.
    # None: the host name. Each scan records it; a node fails if any vantage sees it fail.
    vantage: str | None = None

    def select(self, names: Sequence[str]) -> Settings:
        """Only the named clusters; an unknown name is a configuration error."""
        if not names:
            return self
        known = {c.name for c in self.clusters}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"unknown cluster {', '.join(unknown)} (configured: {', '.join(sorted(known))})",
                source=self.source,
                key="--cluster",
            )
        wanted = set(names)
        return replace(self, clusters=tuple(c for c in self.clusters if c.name in wanted))


# --- loading -------------------------------------------------------------------------------


def load_settings(
    config_path: str | Path | None,
    *,
    db_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings: the file (or the current kubeconfig context), the environment, flags."""
    env = os.environ if environ is None else environ
    if config_path is None and env.get("FELIXSCAN_CONFIG"):
        config_path = env["FELIXSCAN_CONFIG"]
    if config_path is None:
        settings = _settings_from_kubeconfig(env)
    else:
        settings = _settings_from_file(Path(config_path), env)
    database = db_url or env.get("FELIXSCAN_DB") or settings.database
    alerts = settings.alerts
    if env.get("FELIXSCAN_ALERT_WEBHOOK_URL"):
        webhook = env["FELIXSCAN_ALERT_WEBHOOK_URL"]
        if not _HTTP_URL.match(webhook):
            raise ConfigError("expected an http:// or https:// URL",
                              key="FELIXSCAN_ALERT_WEBHOOK_URL")
        alerts = replace(alerts, webhook_url=webhook)
    vantage = settings.vantage
    if env.get("FELIXSCAN_VANTAGE"):
        vantage = env["FELIXSCAN_VANTAGE"]
        if not _VANTAGE.match(vantage):
            raise ConfigError("expected a short name of letters, digits, '.', '_' or '-' (at "
                              "most 64), e.g. pod-network", key="FELIXSCAN_VANTAGE")
    return replace(settings, database=database, alerts=alerts, vantage=vantage)


def _settings_from_kubeconfig(env: Mapping[str, str]) -> Settings:
    path = _default_kubeconfig(env)
    if path is None or not path.exists():
        if env.get("KUBERNETES_SERVICE_HOST"):
            # The in-cluster agent (deploy/agent-base): FELIXSCAN_NODE_CHECK_NAMESPACE names
            # where node-check runs (deploy/overlays/node-check), so the scan reads its view.
            node_check = None
            if env.get("FELIXSCAN_NODE_CHECK_NAMESPACE"):
                namespace = env["FELIXSCAN_NODE_CHECK_NAMESPACE"]
                if not _NAME.match(namespace):
                    raise ConfigError("expected a Kubernetes namespace name",
                                      key="FELIXSCAN_NODE_CHECK_NAMESPACE")
                node_check = NodeCheckSettings(namespace=namespace)
            return Settings(
                database=DEFAULT_DATABASE,
                clusters=(ClusterSettings(name=env.get("FELIXSCAN_CLUSTER", "in-cluster"),
                                          in_cluster=True, node_check=node_check,
                                          controls=_env_controls(env)),),
            )
        raise ConfigError(
            "no --config given and no kubeconfig found (set KUBECONFIG, create ~/.kube/config, "
            "or pass --config FILE)"
        )
    context = _check_kubeconfig(path, None, source=str(path), key="current-context")
    return Settings(
        database=DEFAULT_DATABASE,
        clusters=(ClusterSettings(name=context, kubeconfig=path, context=context,
                                  controls=_env_controls(env)),),
    )


def _env_controls(env: Mapping[str, str]) -> tuple[str, ...]:
    """`$FELIXSCAN_CONTROLS` (comma-separated control IDs) when no config file is given."""
    raw = env.get("FELIXSCAN_CONTROLS", "").strip()
    if not raw:
        return CONTROL_IDS
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTROL_IDS]
    if unknown or not names:
        raise ConfigError(f"unknown control {', '.join(unknown) or raw!r}: expected a "
                          f"comma-separated list of {', '.join(CONTROL_IDS)}",
                          key="FELIXSCAN_CONTROLS")
    return tuple(c for c in CONTROL_IDS if c in names)


def _default_kubeconfig(env: Mapping[str, str]) -> Path | None:
    raw = env.get("KUBECONFIG")
    if raw:
        # Like kubectl, take the first file of a KUBECONFIG list.
        first = next((p for p in raw.split(os.pathsep) if p), None)
        return Path(first).expanduser() if first else None
    home = env.get("HOME")
    return Path(home, ".kube", "config") if home else None


def _settings_from_file(path: Path, env: Mapping[str, str]) -> Settings:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file ({exc})", source=source) from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML{_yaml_mistake(exc)}", source=source) from exc
    if doc is None:
        doc = {}
    reader = _Reader(source, path.parent, env)
    return reader.settings(doc)


class _Reader:
    """Walks the parsed YAML with the key path at hand, so every message can name it."""

    def __init__(self, source: str, base: Path, env: Mapping[str, str]) -> None:
        self.source = source
        self.base = base
        self.env = env

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, key=key)

    def mapping(self, value: object, key: str, allowed: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                path = f"{key}.{k}" if key else str(k)
                raise self.fail(path, f"unknown key (expected one of: {', '.join(allowed)})")
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {_kind(value)}")
        return value

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_kind(value)}")
        return value

    def number(self, value: object, key: str, *, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number from {low:g} to {high:g}, got {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(key, f"expected a number from {low:g} to {high:g}, got {value}")
        return float(value)

    def integer(self, value: object, key: str, *, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key,
                            f"expected a whole number from {low} to {high}, got {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(key, f"expected a whole number from {low} to {high}, got {value}")
        return value

    def settings(self, doc: object) -> Settings:
        top = self.mapping(doc, "", ("database", "schedule", "clusters", "scan", "serve",
                                     "alerts", "waivers_file", "waiver_max_days", "report",
                                     "vantage", "controls"))
        database = DEFAULT_DATABASE
        if "database" in top:
            database = self.string(top["database"], "database")
            if "://" not in database:
                raise self.fail("database", "expected a database URL such as "
                                "sqlite:///felixscan.db or postgresql+psycopg://user@host/db")
        schedule = None
        if "schedule" in top:
            schedule = self.cron(top["schedule"], "schedule")
        if "clusters" not in top:
            raise self.fail("clusters", "missing: expected a list of clusters to scan")
        raw = top["clusters"]
        if not isinstance(raw, list) or not raw:
            raise self.fail("clusters", f"expected a non-empty list, got {_kind(raw)}")
        clusters: list[ClusterSettings] = []
        seen: dict[str, int] = {}
        default_controls = (self.controls(top["controls"], "controls") if "controls" in top
                            else CONTROL_IDS)
        for i, item in enumerate(raw):
            cluster = self.cluster(item, f"clusters[{i}]", default_controls=default_controls)
            if cluster.name in seen:
                raise self.fail(
                    f"clusters[{i}].name",
                    f"duplicate cluster name {cluster.name!r} "
                    f"(also clusters[{seen[cluster.name]}]);"
                    " expected every name to be unique",
                )
            seen[cluster.name] = i
            clusters.append(cluster)
        waivers_file = None
        if "waivers_file" in top:
            raw_file = self.string(top["waivers_file"], "waivers_file")
            waivers_file = (self.base / Path(raw_file).expanduser()).resolve()
        waiver_max_days = self.integer(top.get("waiver_max_days", 365), "waiver_max_days",
                                       low=1, high=3660)
        return Settings(database=database, clusters=tuple(clusters), schedule=schedule,
                        source=self.source, scan=self.scan(top.get("scan", {}), "scan"),
                        serve=self.serve(top.get("serve", {}), "serve"),
                        alerts=self.alerts(top.get("alerts", {}), "alerts"),
                        waivers_file=waivers_file, waiver_max_days=waiver_max_days,
                        report=self.report(top.get("report", {}), "report"),
                        vantage=self.vantage(top["vantage"], "vantage")
                        if "vantage" in top else None)

    def scan(self, value: object, key: str) -> ScanSettings:
        item = self.mapping(value, key, ("max_concurrent_clusters",))
        d = ScanSettings()
        return ScanSettings(max_concurrent_clusters=self.integer(
            item.get("max_concurrent_clusters", d.max_concurrent_clusters),
            f"{key}.max_concurrent_clusters", low=1, high=64))

    def serve(self, value: object, key: str) -> ServeSettings:
        item = self.mapping(value, key, (
            "listen", "timezone", "jitter_seconds", "misfire_grace_seconds", "coalesce",
            "max_concurrent_scans", "shutdown_grace_seconds", "lock_ttl_seconds",
            "report_cache_dir", "report_cache_entries", "public_url"))
        d = ServeSettings()
        listen = self.string(item.get("listen", d.listen), f"{key}.listen")
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise self.fail(f"{key}.listen", str(exc)) from exc
        cache_dir = None
        if "report_cache_dir" in item:
            raw = self.string(item["report_cache_dir"], f"{key}.report_cache_dir")
            cache_dir = (self.base / Path(raw).expanduser()).resolve()
        public_url = None
        if "public_url" in item:
            public_url = self.url(item["public_url"], f"{key}.public_url")
        return ServeSettings(
            listen=listen,
            timezone=self.timezone(item.get("timezone", d.timezone), f"{key}.timezone"),
            jitter_seconds=self.integer(item.get("jitter_seconds", d.jitter_seconds),
                                        f"{key}.jitter_seconds", low=0, high=86400),
            misfire_grace_seconds=self.integer(
                item.get("misfire_grace_seconds", d.misfire_grace_seconds),
                f"{key}.misfire_grace_seconds", low=1, high=7 * 86400),
            coalesce=self.boolean(item.get("coalesce", d.coalesce), f"{key}.coalesce"),
            max_concurrent_scans=self.integer(
                item.get("max_concurrent_scans", d.max_concurrent_scans),
                f"{key}.max_concurrent_scans", low=1, high=64),
            shutdown_grace_seconds=self.number(
                item.get("shutdown_grace_seconds", d.shutdown_grace_seconds),
                f"{key}.shutdown_grace_seconds", low=0, high=3600),
            lock_ttl_seconds=self.number(item.get("lock_ttl_seconds", d.lock_ttl_seconds),
                                         f"{key}.lock_ttl_seconds", low=1, high=3600),
            report_cache_dir=cache_dir,
            report_cache_entries=self.integer(
                item.get("report_cache_entries", d.report_cache_entries),
                f"{key}.report_cache_entries", low=1, high=10000),
            public_url=public_url,
        )

    def alerts(self, value: object, key: str) -> AlertSettings:
        item = self.mapping(value, key, ("webhook_url", "timeout_seconds", "retries",
                                         "backoff_seconds"))
        d = AlertSettings()
        return AlertSettings(
            webhook_url=self.url(item["webhook_url"], f"{key}.webhook_url")
            if "webhook_url" in item else None,
            timeout_seconds=self.number(item.get("timeout_seconds", d.timeout_seconds),
                                        f"{key}.timeout_seconds", low=0.1, high=120),
            retries=self.integer(item.get("retries", d.retries), f"{key}.retries",
                                 low=0, high=20),
            backoff_seconds=self.number(item.get("backoff_seconds", d.backoff_seconds),
                                        f"{key}.backoff_seconds", low=0, high=600),
        )

    def report(self, value: object, key: str) -> ReportSettings:
        item = self.mapping(value, key, ("signing", "preparer", "owner"))
        preparer = self.string(item["preparer"], f"{key}.preparer") if "preparer" in item \
            else None
        owner = self.string(item["owner"], f"{key}.owner") if "owner" in item else None
        signing = self.signing(item["signing"], f"{key}.signing") if "signing" in item else None
        return ReportSettings(signing=signing, preparer=preparer, owner=owner)

    def signing(self, value: object, key: str) -> SigningSettings:
        if isinstance(value, dict) and "passphrase" in value:
            raise self.fail(f"{key}.passphrase", "a passphrase is never written in the config "
                            "file: name where it is with passphrase_env or passphrase_file")
        item = self.mapping(value, key, ("key", "cert", "passphrase_env", "passphrase_file",
                                         "tsa_url", "reason", "location"))
        if "key" not in item:
            raise self.fail(f"{key}.key", "missing: expected the path of the private key (PEM "
                            "or DER, with cert) or of a PKCS#12 file")
        if "passphrase_env" in item and "passphrase_file" in item:
            raise self.fail(key, "give passphrase_env or passphrase_file, not both")

        def path(name: str) -> Path | None:
            if name not in item:
                return None
            return (self.base / Path(self.string(item[name], f"{key}.{name}")).expanduser()
                    ).resolve()

        env = None
        if "passphrase_env" in item:
            env = self.string(item["passphrase_env"], f"{key}.passphrase_env")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
                # The value is not quoted back: it may be the passphrase, put in by mistake.
                raise self.fail(f"{key}.passphrase_env", "expected the name of an environment "
                                "variable (letters, digits, _), such as FELIXSCAN_SIGN_PASSPHRASE")
        key_path = path("key")
        assert key_path is not None  # checked above
        return SigningSettings(
            key=key_path, cert=path("cert"), passphrase_env=env,
            passphrase_file=path("passphrase_file"),
            tsa_url=self.url(item["tsa_url"], f"{key}.tsa_url") if "tsa_url" in item else None,
            reason=self.string(item["reason"], f"{key}.reason") if "reason" in item else None,
            location=(self.string(item["location"], f"{key}.location")
                      if "location" in item else None))

    def url(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if not _HTTP_URL.match(text):
            raise self.fail(key, "expected an http:// or https:// URL")
        return text

    def timezone(self, value: object, key: str) -> str:
        text = self.string(value, key)
        try:
            ZoneInfo(text)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise self.fail(key, f"unknown time zone {text!r} (expected an IANA name such as "
                            "UTC or Europe/Berlin)") from exc
        return text

    def cron(self, value: object, key: str) -> str:
        text = self.string(value, key)
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(text)
        except ValueError as exc:
            raise self.fail(key, f"expected a 5-field cron expression such as '0 2 * * *' ({exc})"
                            ) from exc
        return text

    def controls(self, value: object, key: str) -> tuple[str, ...]:
        """A non-empty list of control IDs, kept in catalogue order."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"expected a non-empty list of controls "
                            f"({', '.join(CONTROL_IDS)}), got {_kind(value)}")
        for i, item in enumerate(value):
            if item not in CONTROL_IDS:
                raise self.fail(f"{key}[{i}]", f"unknown control {item!r}: expected one of "
                                f"{', '.join(CONTROL_IDS)}")
        return tuple(c for c in CONTROL_IDS if c in value)

    def cluster(self, value: object, key: str, *,
                default_controls: tuple[str, ...] = CONTROL_IDS) -> ClusterSettings:
        allowed = ("name", "kubeconfig", "context", "in_cluster", "calico", "probe", "remediation",
                   "api_timeout_seconds", "deadline_seconds", "schedule", "timezone",
                   "node_check", "controls")
        item = self.mapping(value, key, allowed)
        if "name" not in item:
            raise self.fail(f"{key}.name", "missing: expected the cluster's name")
        name = self.string(item["name"], f"{key}.name")
        if not _NAME.match(name):
            raise self.fail(f"{key}.name", "expected letters, digits, '.', '_' or '-' "
                            "(at most 63, starting and ending with a letter or digit)")
        in_cluster = self.boolean(item.get("in_cluster", False), f"{key}.in_cluster")
        kubeconfig: Path | None = None
        context: str | None = None
        if in_cluster:
            for k in ("kubeconfig", "context"):
                if k in item:
                    raise self.fail(f"{key}.{k}", "not allowed with in_cluster: true")
        else:
            if "kubeconfig" in item:
                raw = self.string(item["kubeconfig"], f"{key}.kubeconfig")
                kubeconfig = (self.base / Path(raw).expanduser()).resolve()
            else:
                kubeconfig = _default_kubeconfig(self.env)
                if kubeconfig is None:
                    raise self.fail(f"{key}.kubeconfig", "missing: expected a kubeconfig path "
                                    "or in_cluster: true")
            if "context" in item:
                context = self.string(item["context"], f"{key}.context")
            context = _check_kubeconfig(kubeconfig, context, source=self.source,
                                        key=f"{key}.kubeconfig" if context is None
                                        else f"{key}.context")
        schedule = self.cron(item["schedule"], f"{key}.schedule") if "schedule" in item else None
        return ClusterSettings(
            name=name,
            kubeconfig=kubeconfig,
            context=context,
            in_cluster=in_cluster,
            calico=self.calico(item.get("calico", {}), f"{key}.calico"),
            probe=self.probe(item.get("probe", {}), f"{key}.probe"),
            remediation=self.remediation(item.get("remediation", {}), f"{key}.remediation"),
            api_timeout_seconds=self.number(item.get("api_timeout_seconds", 10.0),
                                            f"{key}.api_timeout_seconds", low=0.1, high=600),
            deadline_seconds=self.number(item.get("deadline_seconds", 120.0),
                                         f"{key}.deadline_seconds", low=1, high=86400),
            schedule=schedule,
            timezone=self.timezone(item["timezone"], f"{key}.timezone")
            if "timezone" in item else None,
            node_check=self.node_check(item["node_check"], f"{key}.node_check")
            if "node_check" in item else None,
            controls=self.controls(item["controls"], f"{key}.controls")
            if "controls" in item else default_controls,
        )

    def vantage(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if not _VANTAGE.match(text):
            raise self.fail(key, "expected a short name of letters, digits, '.', '_' or '-' "
                            "(at most 64), e.g. corp-network")
        return text

    def node_check(self, value: object, key: str) -> NodeCheckSettings:
        if value is True or value == {}:
            return NodeCheckSettings()
        item = self.mapping(value, key, ("namespace", "selector", "container",
                                         "max_age_seconds", "tail_lines"))
        d = NodeCheckSettings()
        namespace = self.string(item.get("namespace", d.namespace), f"{key}.namespace")
        if not _NAME.match(namespace):
            raise self.fail(f"{key}.namespace", "expected a Kubernetes namespace name")
        return NodeCheckSettings(
            namespace=namespace,
            selector=self.string(item.get("selector", d.selector), f"{key}.selector"),
            container=self.string(item.get("container", d.container), f"{key}.container"),
            max_age_seconds=self.number(item.get("max_age_seconds", d.max_age_seconds),
                                        f"{key}.max_age_seconds", low=1, high=86400),
            tail_lines=self.integer(item.get("tail_lines", d.tail_lines),
                                    f"{key}.tail_lines", low=1, high=1000))

    def calico(self, value: object, key: str) -> CalicoSettings:
        names = ("daemonset", "container", "typha", "typha_container", "kube_controllers",
                 "kube_controllers_container")
        item = self.mapping(value, key, ("namespace", *names))
        d = CalicoSettings()
        named = {n: self.string(item.get(n, getattr(d, n)), f"{key}.{n}") for n in names}
        return CalicoSettings(
            namespace=self.string(item["namespace"], f"{key}.namespace")
            if "namespace" in item else None, **named)

    def probe(self, value: object, key: str) -> ProbeConfig:
        item = self.mapping(value, key, ("address_type", "timeout_seconds", "tls_timeout_seconds",
                                         "http_timeout_seconds", "concurrency", "extra_ports"))
        raw_types = item.get("address_type", "InternalIP")
        types = raw_types if isinstance(raw_types, list) else [raw_types]
        for i, address_type in enumerate(types):
            if address_type not in ADDRESS_TYPES:
                where = f"{key}.address_type" + (f"[{i}]" if isinstance(raw_types, list) else "")
                raise self.fail(where, f"expected one of {', '.join(ADDRESS_TYPES)} (or a "
                                f"list of them), got {address_type!r}")
        if not types:
            raise self.fail(f"{key}.address_type", "expected at least one address type")
        address_types = tuple(dict.fromkeys(types))
        ports_raw = item.get("extra_ports", [])
        if not isinstance(ports_raw, list):
            raise self.fail(f"{key}.extra_ports",
                            f"expected a list of ports, got {_kind(ports_raw)}")
        ports = tuple(self.integer(p, f"{key}.extra_ports[{i}]", low=1, high=65535)
                      for i, p in enumerate(ports_raw))
        return ProbeConfig(
            address_type=address_types[0], address_types=address_types,
            timeout_seconds=self.number(item.get("timeout_seconds", 2.0),
                                        f"{key}.timeout_seconds", low=0.05, high=120),
            tls_timeout_seconds=self.number(item.get("tls_timeout_seconds", 3.0),
                                            f"{key}.tls_timeout_seconds", low=0.05, high=120),
            http_timeout_seconds=self.number(item.get("http_timeout_seconds", 5.0),
                                             f"{key}.http_timeout_seconds", low=0.05, high=300),
            concurrency=self.integer(item.get("concurrency", 256), f"{key}.concurrency",
                                     low=1, high=20000),
            extra_ports=ports,
        )

    def remediation(self, value: object, key: str) -> RemediationSettings:
        item = self.mapping(value, key, ("enabled", "window", "auto"))
        window = None
        if "window" in item:
            text = self.string(item["window"], f"{key}.window")
            try:
                window = parse_window(text)
            except ValueError as exc:
                raise self.fail(f"{key}.window", str(exc)) from exc
        return RemediationSettings(
            enabled=self.boolean(item.get("enabled", False), f"{key}.enabled"),
            window=window,
            auto=self.boolean(item.get("auto", False), f"{key}.auto"),
        )


# What PyYAML was reading when it met the end of the file or a stray token: something opened
# and never closed, whose start (not where PyYAML gave up) is the line to fix.
_UNCLOSED = {"while scanning a quoted scalar": "a quoted string",
             "while parsing a flow sequence": "a [ list",
             "while parsing a flow mapping": "a { mapping"}


def _yaml_line(mark: Any) -> str:
    # PyYAML's marks count lines and columns from 0; editors count from 1.
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_mistake(exc: yaml.YAMLError) -> str:
    """` at line L, column C: what is wrong`, for a parse error in the configuration file."""
    problem = getattr(exc, "problem", None)
    problem_mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    if problem_mark is None:
        return f": {problem}" if problem else ""
    unclosed = _UNCLOSED.get(str(getattr(exc, "context", "")))
    if unclosed and context_mark is not None:
        return (f" at {_yaml_line(context_mark)}: {unclosed} that is never closed "
                f"({problem} at {_yaml_line(problem_mark)})")
    return f" at {_yaml_line(problem_mark)}" + (f": {problem}" if problem else "")


def _check_kubeconfig(path: Path, context: str | None, *, source: str, key: str) -> str:
    """The kubeconfig exists, parses, and has the context; returns the context name to use."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"kubeconfig {path} does not exist (expected a readable kubeconfig file)",
                          source=source, key=key) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        # The line, never PyYAML's text: a kubeconfig holds credentials it could quote.
        mark = getattr(exc, "problem_mark", None)
        where = f" at {_yaml_line(mark)}" if mark is not None else ""
        raise ConfigError(f"kubeconfig {path} cannot be read as YAML ({type(exc).__name__}"
                          f"{where}); expected a kubeconfig file", source=source,
                          key=key) from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {path} is not a kubeconfig (expected a mapping)",
                          source=source, key=key)
    contexts = [c.get("name") for c in doc.get("contexts") or [] if isinstance(c, dict)]
    if context is None:
        current = doc.get("current-context")
        if not current:
            raise ConfigError(f"kubeconfig {path} has no current-context; expected a `context:` "
                              "to be named", source=source, key=key)
        context = str(current)
    if context not in contexts:
        names = ", ".join(str(c) for c in contexts) or "none"
        raise ConfigError(f"context {context!r} is not in kubeconfig {path} (it has: {names})",
                          source=source, key=key)
    return context


_WINDOW = re.compile(
    r"^\s*(?P<days>[A-Za-z]{3}(?:\s*[-,]\s*[A-Za-z]{3})*)\s+"
    r"(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})(?:\s+(?P<tz>\S+))?\s*$"
)


def parse_window(text: str) -> MaintenanceWindow:
    """Parse `Sat 01:00-05:00 UTC`, `Mon-Fri 22:00-02:00 Europe/Berlin`, `Sat,Sun 00:00-06:00`."""
    expected = "expected a window such as 'Sat 01:00-05:00 UTC' (days, HH:MM-HH:MM, time zone)"
    match = _WINDOW.match(text)
    if not match:
        raise ValueError(expected)
    days: set[int] = set()
    for part in re.split(r"\s*,\s*", match["days"].lower()):
        ends = [d.strip() for d in part.split("-")]
        if any(d not in DAYS for d in ends):
            raise ValueError(f"unknown day in {part!r}; {expected}")
        first, last = DAYS.index(ends[0]), DAYS.index(ends[-1])
        span = range(first, last + 1) if first <= last else [*range(first, 7), *range(0, last + 1)]
        days.update(span)
    try:
        start = time.fromisoformat(match["start"].zfill(5))
        end = time.fromisoformat(match["end"].zfill(5))
    except ValueError as exc:
        raise ValueError(f"bad time of day ({exc}); {expected}") from exc
    tz = match["tz"] or "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {tz!r}; {expected}") from exc
    if start == end:
        raise ValueError(f"the window is empty; {expected}")
    return MaintenanceWindow(days=frozenset(days), start=start, end=end, tz=tz, text=text.strip())


_HTTP_URL = re.compile(r"^https?://[^\s/?#@]+(?:[/?#]\S*)?$", re.IGNORECASE)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8080` for IPv6) as (host, port); port 0 picks a free one."""
    expected = f"expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got {text!r}"
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(expected)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(expected)
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(expected)
    if not host or any(c.isspace() for c in host):
        raise ValueError(expected)
    return host, int(port)


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) < 60 else "a long string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
