"""The configuration file: what it accepts, and the one clear message for what it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from scanner.app.cli import main
from scanner.core.config import load_settings, parse_window
from scanner.core.errors import ConfigError

KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: east
clusters:
- name: east
  cluster: {server: "https://127.0.0.1:1"}
contexts:
- name: east
  context: {cluster: east, user: u}
- name: west
  context: {cluster: east, user: u}
users:
- name: u
  user: {token: not-a-real-token}
"""


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "felixscan.yaml"
    path.write_text(text)
    return path


def test_full_file_is_read(tmp_path: Path, kubeconfig: Path) -> None:
    cfg = write(tmp_path, f"""
database: postgresql+psycopg://scanner@db/felixscan
schedule: "0 2 * * *"
clusters:
  - name: prod-east
    kubeconfig: {kubeconfig}
    context: east
    calico: {{namespace: kube-system, daemonset: calico-node, container: calico-node}}
    probe: {{address_type: ExternalIP, timeout_seconds: 1.5, concurrency: 64, extra_ports: [9093]}}
    remediation: {{enabled: true, window: "Sat 01:00-05:00 UTC"}}
  - name: prod-west
    kubeconfig: {kubeconfig}
    context: west
""")
    s = load_settings(cfg, environ={})
    assert s.database == "postgresql+psycopg://scanner@db/felixscan"
    assert [c.name for c in s.clusters] == ["prod-east", "prod-west"]
    east = s.clusters[0]
    assert east.context == "east"
    assert east.probe.address_type == "ExternalIP"
    assert east.probe.timeout_seconds == 1.5
    assert east.probe.extra_ports == (9093,)
    assert east.remediation.enabled
    assert east.remediation.window is not None
    assert east.remediation.window.days == frozenset({5})
    assert s.clusters[1].calico.namespace is None  # auto-detect


def test_database_precedence_flag_env_file_default(tmp_path: Path, kubeconfig: Path) -> None:
    cfg = write(tmp_path, f"database: sqlite:///file.db\nclusters:\n  - name: a\n"
                          f"    kubeconfig: {kubeconfig}\n")
    assert load_settings(cfg, environ={}).database == "sqlite:///file.db"
    assert load_settings(cfg, environ={"FELIXSCAN_DB": "sqlite:///env.db"}).database == \
        "sqlite:///env.db"
    assert load_settings(cfg, db_url="sqlite:///flag.db",
                         environ={"FELIXSCAN_DB": "sqlite:///env.db"}).database == \
        "sqlite:///flag.db"
    bare = write(tmp_path, f"clusters:\n  - name: a\n    kubeconfig: {kubeconfig}\n")
    assert load_settings(bare, environ={}).database == "sqlite:///felixscan.db"


def test_no_file_scans_current_context(kubeconfig: Path) -> None:
    s = load_settings(None, environ={"KUBECONFIG": str(kubeconfig)})
    assert [(c.name, c.context) for c in s.clusters] == [("east", "east")]


@pytest.mark.parametrize(("body", "key", "expect"), [
    ("clusters:\n  - name: a\n    kubeconfg: x\n", "clusters[0].kubeconfg", "unknown key"),
    ("clusters:\n  - name: a\n    probe: {timeout_seconds: fast}\n",
     "clusters[0].probe.timeout_seconds", "expected a number"),
    ("clusters:\n  - name: a\n    probe: {concurrency: 2.5}\n", "clusters[0].probe.concurrency",
     "expected a whole number"),
    ("clusters:\n  - name: a\n    kubeconfig: /nonexistent/kubeconfig\n", "clusters[0].kubeconfig",
     "does not exist"),
    ("clusters:\n  - name: a\n    kubeconfig: KC\n    context: nowhere\n", "clusters[0].context",
     "'nowhere' is not in kubeconfig"),
    ("clusters:\n  - name: a\n    kubeconfig: KC\n  - name: a\n    kubeconfig: KC\n",
     "clusters[1].name", "duplicate cluster name 'a'"),
    ("clusters: []\n", "clusters", "non-empty list"),
    ("database: 12\nclusters:\n  - name: a\n    kubeconfig: KC\n", "database", "non-empty string"),
    ("schedule: every night\nclusters:\n  - name: a\n    kubeconfig: KC\n", "schedule", "cron"),
    ("clusters:\n  - name: a\n    kubeconfig: KC\n    remediation: {window: sometimes}\n",
     "clusters[0].remediation.window", "expected a window"),
    ("clusters:\n  - name: a\n    in_cluster: true\n    kubeconfig: KC\n",
     "clusters[0].kubeconfig", "not allowed with in_cluster"),
    ("clusters:\n  - name: 'bad name!'\n    kubeconfig: KC\n", "clusters[0].name",
     "expected letters"),
    ("clusters:\n  - name: a\n    probe: {address_type: Public}\n",
     "clusters[0].probe.address_type", "expected one of"),
    ("clusters: [\n", "", "not valid YAML at line"),
    ("[1, 2]\n", "(top level)", "expected a mapping"),
])
def test_bad_files_get_one_clear_message(tmp_path: Path, kubeconfig: Path, body: str, key: str,
                                         expect: str) -> None:
    cfg = write(tmp_path, body.replace("KC", str(kubeconfig)))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={"KUBECONFIG": str(kubeconfig)})
    message = str(info.value)
    assert message.startswith(str(cfg))
    assert key in message
    assert expect in message


def test_cli_exits_2_and_scans_nothing(tmp_path: Path, kubeconfig: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "clusters:\n  - name: a\n    kubeconfig: /nope\n")
    db = tmp_path / "out.db"
    code = main(["scan", "--config", str(cfg), "--db", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "configuration error" in err
    assert "clusters[0].kubeconfig" in err
    assert not db.exists()


def test_unknown_cluster_flag_is_a_usage_error(tmp_path: Path, kubeconfig: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, f"clusters:\n  - name: a\n    kubeconfig: {kubeconfig}\n")
    assert main(["scan", "--config", str(cfg), "--cluster", "zzz"]) == 2
    assert "unknown cluster zzz" in capsys.readouterr().err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "days"), [
    ("Sat 01:00-05:00 UTC", {5}),
    ("Mon-Fri 22:00-02:00 Europe/Berlin", {0, 1, 2, 3, 4}),
    ("Sat,Sun 00:00-06:00", {5, 6}),
    ("Fri-Mon 00:00-06:00", {4, 5, 6, 0}),
])
def test_windows(text: str, days: set[int]) -> None:
    assert parse_window(text).days == frozenset(days)


def test_scan_bound_is_read_and_defaults_to_eight(tmp_path: Path, kubeconfig: Path) -> None:
    clusters = f"clusters:\n  - name: a\n    kubeconfig: {kubeconfig}\n"
    assert load_settings(write(tmp_path, clusters), environ={}).scan.max_concurrent_clusters == 8
    cfg = write(tmp_path, "scan: {max_concurrent_clusters: 3}\n" + clusters)
    s = load_settings(cfg, environ={})
    assert s.scan.max_concurrent_clusters == 3
    assert s.serve.max_concurrent_scans == 4  # serve keeps its own bound


@pytest.mark.parametrize(("body", "key", "expect"), [
    ("scan: {max_concurrent_clusters: 0}\n", "scan.max_concurrent_clusters",
     "expected a whole number from 1 to 64, got 0"),
    ("scan: {max_concurrent_clusters: 2.5}\n", "scan.max_concurrent_clusters",
     "expected a whole number from 1 to 64"),
    ("scan: {max_concurrent_clusters: 65}\n", "scan.max_concurrent_clusters", "got 65"),
    ("scan: {max_clusters: 2}\n", "scan.max_clusters",
     "unknown key (expected one of: max_concurrent_clusters)"),
    ("scan: 4\n", "scan", "expected a mapping, got a number (4)"),
])
def test_bad_scan_bound_gets_one_clear_message(tmp_path: Path, kubeconfig: Path, body: str,
                                               key: str, expect: str) -> None:
    cfg = write(tmp_path, body + f"clusters:\n  - name: a\n    kubeconfig: {kubeconfig}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    message = str(info.value)
    assert message.startswith(str(cfg))
    assert key in message
    assert expect in message
