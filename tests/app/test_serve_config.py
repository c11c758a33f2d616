"""The `serve:` and `alerts:` configuration keys, and a cluster's own schedule time zone."""

from __future__ import annotations

from pathlib import Path

import pytest

from scanner.core.config import AlertSettings, ServeSettings, load_settings, parse_listen
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
users:
- name: u
  user: {token: not-a-real-token}
"""


def write(tmp_path: Path, extra: str, cluster_extra: str = "") -> Path:
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    path = tmp_path / "felixscan.yaml"
    path.write_text(f"""
schedule: "0 2 * * *"
clusters:
  - name: prod-east
    kubeconfig: kubeconfig
{cluster_extra}
{extra}
""")
    return path


def test_serve_and_alerts_sections_are_read(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
serve:
  listen: "0.0.0.0:9000"
  timezone: Europe/Berlin
  jitter_seconds: 300
  misfire_grace_seconds: 7200
  coalesce: false
  max_concurrent_scans: 2
  shutdown_grace_seconds: 90
  lock_ttl_seconds: 30
  report_cache_dir: cache
  report_cache_entries: 10
  public_url: https://felixscan.example.org/
alerts:
  webhook_url: https://hooks.slack.com/services/T000/B000/XXXX
  timeout_seconds: 3
  retries: 2
  backoff_seconds: 0.5
""", cluster_extra="    schedule: \"30 1 * * 1-5\"\n    timezone: America/New_York")
    s = load_settings(cfg, environ={})
    assert s.serve == ServeSettings(
        listen="0.0.0.0:9000", timezone="Europe/Berlin", jitter_seconds=300,
        misfire_grace_seconds=7200, coalesce=False, max_concurrent_scans=2,
        shutdown_grace_seconds=90, lock_ttl_seconds=30,
        report_cache_dir=(tmp_path / "cache").resolve(), report_cache_entries=10,
        public_url="https://felixscan.example.org/")
    assert s.alerts == AlertSettings(webhook_url="https://hooks.slack.com/services/T000/B000/XXXX",
                                     timeout_seconds=3, retries=2, backoff_seconds=0.5)
    assert s.clusters[0].schedule == "30 1 * * 1-5"
    assert s.clusters[0].timezone == "America/New_York"
    # The sections survive narrowing to some clusters (the scheduler's jobs do that).
    assert s.select(["prod-east"]).serve == s.serve
    assert s.select(["prod-east"]).alerts == s.alerts


def test_defaults_without_the_sections(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""), environ={})
    assert s.serve == ServeSettings()
    assert s.serve.listen == "127.0.0.1:8080" and s.serve.timezone == "UTC"
    assert s.alerts.webhook_url is None
    assert s.clusters[0].timezone is None


def test_webhook_url_from_the_environment_wins_and_is_not_in_repr(tmp_path: Path) -> None:
    cfg = write(tmp_path, "alerts: {webhook_url: 'https://example.invalid/file'}")
    secret = "https://hooks.slack.com/services/T1/B1/secret-part"
    s = load_settings(cfg, environ={"FELIXSCAN_ALERT_WEBHOOK_URL": secret})
    assert s.alerts.webhook_url == secret
    assert "secret-part" not in repr(s)
    with pytest.raises(ConfigError, match="FELIXSCAN_ALERT_WEBHOOK_URL: expected an http"):
        load_settings(cfg, environ={"FELIXSCAN_ALERT_WEBHOOK_URL": "file:///etc/passwd"})


@pytest.mark.parametrize(("extra", "key", "expected"), [
    ("serve: {timezone: Mars/Olympus}", "serve.timezone", "unknown time zone 'Mars/Olympus'"),
    ("serve: {listen: '8080'}", "serve.listen", "expected HOST:PORT"),
    ("serve: {listen: '::1:8080'}", "serve.listen", "expected HOST:PORT"),
    ("serve: {jitter_seconds: -1}", "serve.jitter_seconds", "from 0 to 86400"),
    ("serve: {misfire_grace_seconds: 0}", "serve.misfire_grace_seconds", "from 1 to"),
    ("serve: {coalesce: 'yes'}", "serve.coalesce", "expected true or false"),
    ("serve: {max_concurrent_scans: 0}", "serve.max_concurrent_scans", "from 1 to 64"),
    ("serve: {public_url: 'javascript:alert(1)'}", "serve.public_url", "http:// or https://"),
    ("serve: {port: 8080}", "serve.port", "unknown key"),
    ("alerts: {webhook_url: 'ftp://x/y'}", "alerts.webhook_url", "http:// or https://"),
    ("alerts: {retries: 100}", "alerts.retries", "from 0 to 20"),
    ("alerts: {url: 'https://x'}", "alerts.url", "unknown key"),
    ("serve: [1]", "serve", "expected a mapping"),
])
def test_bad_values_name_the_key(tmp_path: Path, extra: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, extra), environ={})
    assert f"felixscan.yaml: {key}: " in str(err.value)
    assert expected in str(err.value)


def test_cluster_timezone_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"clusters\[0\]\.timezone: unknown time zone"):
        load_settings(write(tmp_path, "", cluster_extra="    timezone: Nowhere/Town"),
                      environ={})


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:0", ("::1", 0)),
    ("localhost:80", ("localhost", 80)), ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:", "host:99999", "[::1:80", "a b:80", "::1:80"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen(text)
