"""Findings of an outside attack and a newcomer's first hour, each kept fixed by a test here.

Remediation patches only the object it asked for (name checked on every answer, the object's
uid as a precondition in every patch); a hanging exec credential plugin is stopped at the
cluster's deadline; and the command line says plainly what went wrong (bare database paths,
report formats and paths, unreachable API servers, credentials over plain HTTP, `-v`/`-q`
after the subcommand, YAML line numbers, exit codes in `scan --help`).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from scanner.core.config import ClusterSettings
from scanner.core.errors import ApiError, RemediationRefused
from scanner.db.store import Store
from scanner.emulator import KubeEmulator
from scanner.kube.write import KubeWriter, ObjectRef
from tests.helpers import scan_harness
from tests.helpers.scan_harness import Harness, Run, felixscan, felixscan_process

ENABLED = "FELIX_PROMETHEUSMETRICSENABLED"
ENABLED_OPTS = {"remediation": {"enabled": True}}
APPLY = ("--apply", "--yes", "--ignore-window", "--rollout-timeout", "10")
FELIX_API = "crd.projectcalico.org/v1"
EXEC_API = "client.authentication.k8s.io/v1beta1"


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.36.0.0")


def remediate_cli(h: Harness, db: str, *args: str) -> Run:
    return felixscan("remediate", "--config", str(h.config()), "--db", db, "--cluster", "c1",
                     *args)


def writes(emu: KubeEmulator) -> list[Any]:
    return [r for r in emu.requests if r.verb not in ("get", "list", "watch")]


def actions(db: str) -> list[Any]:
    with Store(db) as store:
        return list(reversed(store.remediations("c1")))


def cluster_settings(h: Harness, name: str = "c1") -> ClusterSettings:
    return ClusterSettings(name=name, kubeconfig=h.tmp / "kubeconfig", context=name,
                           api_timeout_seconds=2, deadline_seconds=20)


# --- 1. remediation patches only the object it asked for ---------------------------------------


def test_remediation_never_patches_the_object_a_forged_answer_names(harness: Harness,
                                                                    sqlite_url: str) -> None:
    """The attack: GET daemonsets/calico-node answered with `metadata.name: victim-ds`. The scan
    took the name from the answer, and `--apply` then patched victim-ds. Now remediation only
    touches the DaemonSet the configuration names, the scan refuses an answer naming another
    object, and victim-ds is never written."""
    handle = harness.cluster("c1", ["felix-http"] * 2, options=ENABLED_OPTS,
                             env={ENABLED: "true"})
    handle.simulate_controllers(roll_delay=0.01)
    emu = harness.emulators["c1"]
    emu.add({"apiVersion": "apps/v1", "kind": "DaemonSet",
             "metadata": {"name": "victim-ds", "namespace": "kube-system"},
             "spec": {"selector": {"matchLabels": {"app": "victim"}},
                      "template": {"metadata": {"labels": {"app": "victim"}},
                                   "spec": {"containers": [{
                                       "name": "calico-node", "image": "victim:1",
                                       "env": [{"name": ENABLED, "value": "true"}]}]}}}})
    victim = emu.get_object("apps/v1", "DaemonSet", "victim-ds", "kube-system")
    forged = handle.daemonset_object()
    forged["metadata"]["name"] = "victim-ds"
    emu.inject(r"/daemonsets/calico-node$", body=json.dumps(forged).encode())

    out = remediate_cli(harness, sqlite_url, *APPLY)

    # The scan before planning already refuses the answer (scanner/kube/read.py), so nothing is
    # planned; kube_write would refuse it too (test_an_answer_naming_another_object_is_refused).
    assert out.code == 1, out.stdout + out.stderr
    assert emu.get_object("apps/v1", "DaemonSet", "victim-ds", "kube-system") == victim
    assert [w for w in writes(emu) if w.name == "victim-ds"] == []
    assert "answered with another object (kube-system/victim-ds)" in out.stderr, out.stderr
    assert {"name": ENABLED, "value": "true"} in next(
        c for c in handle.daemonset_object()["spec"]["template"]["spec"]["containers"]
        if c["name"] == "calico-node")["env"]


def test_an_answer_naming_another_object_is_refused(harness: Harness) -> None:
    """The door checks every answer: a GET or a PATCH answered with another object (by name or
    by uid) is an error, and nothing is planned or believed from it."""
    handle = harness.cluster("c1", ["closed"], env={ENABLED: "true"}, felix_configs=[
        {"metadata": {"name": "other"}, "spec": {"logSeverityScreen": "Info"}}])
    emu = harness.emulators["c1"]
    ds = ObjectRef("apps/v1", "DaemonSet", "calico-node", "kube-system")
    default = ObjectRef(FELIX_API, "FelixConfiguration", "default")
    real_ds = handle.daemonset_object()
    other = emu.get_object(FELIX_API, "FelixConfiguration", "other")
    harness.config()
    with KubeWriter(cluster_settings(harness)) as writer:
        forged = copy.deepcopy(real_ds)
        forged["metadata"]["name"] = "victim-ds"
        fault = emu.inject(r"/daemonsets/calico-node$", body=json.dumps(forged).encode(),
                           times=1)
        with pytest.raises(ApiError, match=r"GET DaemonSet kube-system/calico-node: the API "
                           r"answered with another object \(name victim-ds\)"):
            writer.read(ds)
        assert fault.hits == 1
        emu.inject(r"/felixconfigurations/default$", body=json.dumps(other).encode(), times=1)
        with pytest.raises(ApiError, match=r"answered with another object \(name other\)"):
            writer.read(default)

        # a PATCH answered with another object: the dry run cannot be believed
        current = writer.read(ds)
        assert current is not None
        emu.inject(r"/daemonsets/calico-node\?", method="PATCH",
                   body=json.dumps({**real_ds, "metadata": {**real_ds["metadata"],
                                                            "uid": "not-the-uid"}}).encode())
        body = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"],
                             "uid": current["metadata"]["uid"]}}
        with pytest.raises(ApiError, match=r"answered with another object \(uid not-the-uid\)"):
            writer.patch(ds, body, patch_type="strategic", dry_run=True)


def test_every_remediation_patch_carries_the_objects_uid(harness: Harness,
                                                         sqlite_url: str) -> None:
    """DaemonSet, FelixConfiguration and Installation: each patch sent (and recorded) holds the
    uid of the object it was planned from, next to its resourceVersion."""
    handle = harness.cluster("c1", ["felix-http"] * 2, options=ENABLED_OPTS,
                             env={ENABLED: "true"})
    handle.simulate_controllers(roll_delay=0.01)
    out = remediate_cli(harness, sqlite_url, *APPLY)
    assert out.code in (0, 1), out.stdout + out.stderr
    [action] = actions(sqlite_url)
    [obj] = action.objects
    assert obj["patch"]["metadata"]["uid"] == handle.daemonset_object()["metadata"]["uid"]

    harness.close()
    other = Harness(harness.tmp / "operator")
    (harness.tmp / "operator").mkdir()
    try:
        handle = other.cluster("c1", ["felix-http"] * 2, options=ENABLED_OPTS,
                               install="operator", node_metrics_port=9091)
        handle.simulate_controllers(roll_delay=0.01)
        emu = other.emulators["c1"]
        db = f"sqlite:///{harness.tmp / 'operator.db'}"
        out = remediate_cli(other, db, *APPLY)
        assert out.code in (0, 1), out.stdout + out.stderr
        [action] = actions(db)
        uids = {(o["kind"], o["name"]): o["patch"]["metadata"].get("uid") for o in action.objects}
        assert uids == {
            ("FelixConfiguration", "default"):
                emu.get_object(FELIX_API, "FelixConfiguration", "default")["metadata"]["uid"],
            ("Installation", "default"):
                emu.get_object("operator.tigera.io/v1", "Installation",
                               "default")["metadata"]["uid"]}
    finally:
        other.close()


def test_the_door_refuses_a_patch_without_a_uid_precondition(harness: Harness) -> None:
    handle = harness.cluster("c1", ["closed"], env={ENABLED: "true"})
    emu = harness.emulators["c1"]
    rv = handle.daemonset_object()["metadata"]["resourceVersion"]
    harness.config()
    with KubeWriter(cluster_settings(harness)) as writer, \
            pytest.raises(ValueError, match="uid"):
        writer.patch(ObjectRef("apps/v1", "DaemonSet", "calico-node", "kube-system"),
                     {"metadata": {"resourceVersion": rv}}, patch_type="strategic",
                     dry_run=True)
    assert writes(emu) == []


def test_remediation_refuses_a_daemonset_the_config_does_not_name(harness: Harness) -> None:
    harness.cluster("c1", ["closed"], env={ENABLED: "true"})
    emu = harness.emulators["c1"]
    harness.config()
    with KubeWriter(cluster_settings(harness)) as writer, \
            pytest.raises(RemediationRefused, match=r"calico\.daemonset: calico-node"):
        writer.read(ObjectRef("apps/v1", "DaemonSet", "victim-ds", "kube-system"))
    assert [r for r in emu.requests if r.name == "victim-ds"] == []


@pytest.mark.parametrize("patch_type", ["merge", "strategic"])
def test_emulator_refuses_a_patch_whose_uid_differs_as_the_apiserver_does(
        patch_type: str) -> None:
    """kube-apiserver: a patch that changes metadata.uid fails validation (uid is immutable):
    422 Invalid, nothing written; the object's own uid passes."""
    with KubeEmulator() as emu:
        emu.add({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "cm", "namespace": "default"}, "data": {"a": "1"}})
        stored = emu.get_object("v1", "ConfigMap", "cm", "default")
        uid = stored["metadata"]["uid"]
        media = {"merge": "application/merge-patch+json",
                 "strategic": "application/strategic-merge-patch+json"}[patch_type]
        http = urllib3.PoolManager(cert_reqs="CERT_NONE")
        url = f"{emu.url}/api/v1/namespaces/default/configmaps/cm"
        headers = {"Content-Type": media, "Authorization": "Bearer emulator-token"}
        wrong = http.request("PATCH", url, headers=headers, body=json.dumps(
            {"metadata": {"uid": "0000-not-it"}, "data": {"a": "2"}}))
        assert wrong.status == 422, wrong.data
        status = json.loads(wrong.data)
        assert status["reason"] == "Invalid"
        assert status["message"] == ('ConfigMap "cm" is invalid: metadata.uid: Invalid value: '
                                     '"0000-not-it": field is immutable')
        assert emu.get_object("v1", "ConfigMap", "cm", "default") == stored
        right = http.request("PATCH", url, headers=headers, body=json.dumps(
            {"metadata": {"uid": uid}, "data": {"a": "2"}}))
        assert right.status == 200, right.data
        assert emu.get_object("v1", "ConfigMap", "cm", "default")["data"] == {"a": "2"}


# --- 2. an exec credential plugin that hangs ----------------------------------------------------


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left


def test_exec_credential_plugin_that_hangs_is_stopped_at_the_deadline(
        harness: Harness, sqlite_url: str, tmp_path: Path) -> None:
    """The kubernetes client runs an exec plugin without any time limit: one that hangs held
    its cluster's scan (and the whole run) for as long as it hung. Now it gets what is left of
    the cluster's deadline; then it is stopped with every process it started, the cluster is
    stored as an error naming the plugin and the limit, and the other clusters go on."""
    harness.cluster("healthy", ["closed", "closed"])
    harness.cluster("hang", ["closed"], options={"deadline_seconds": 3})
    pids = tmp_path / "plugin.pids"
    plugin = tmp_path / "hang-plugin"
    plugin.write_text(f"#!/bin/sh\necho $$ >> {pids}\nsleep 30 &\necho $! >> {pids}\nwait\n")
    plugin.chmod(0o755)
    harness.users["hang"] = {"exec": {"apiVersion": EXEC_API, "command": str(plugin)}}

    started = time.monotonic()
    out = harness.scan(sqlite_url)
    elapsed = time.monotonic() - started

    assert elapsed < 15, f"the scan waited {elapsed:.0f} s for the plugin"
    assert out.code == 3, out.stderr
    assert out.cluster("healthy")["status"] == "compliant"
    error = out.cluster("hang")["error"]
    assert re.search(r"^the kubeconfig's credentials could not be obtained: exec: credential "
                     r"plugin \S+/hang-plugin gave no answer within [23]\.\d s \(what was left "
                     r"of the cluster's deadline\); it was stopped, with the processes it "
                     r"started$", error), error
    assert harness.emulators["hang"].requests == []  # nothing sent without credentials
    deadline = time.monotonic() + 3
    while any(_running(int(p)) for p in pids.read_text().split()) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids.read_text().split() if _running(int(p))] == []


# --- 3d, 3e, 3g. what a scan prints about the API server ----------------------------------------


def test_unreachable_api_names_the_server_and_context_without_retry_warnings(
        harness: Harness, sqlite_url: str) -> None:
    """A refused connection said only `connection refused`, and urllib3 printed its own
    `Retrying (Retry(total=1, ...))` warnings on stderr. Now the cluster's error names the API
    server and the kubeconfig context, and stderr holds nothing but felixscan's lines."""
    harness.cluster("healthy", ["closed"])
    harness.dead_cluster("gone", "https://127.0.0.1:1")
    out = felixscan_process("scan", "--config", str(harness.config()), "--db", sqlite_url,
                            "--json")
    assert out.code == 3, out.stderr
    [gone] = [c for c in json.loads(out.stdout)["clusters"] if c["name"] == "gone"]
    assert re.search(r": connection refused; API server https://127\.0\.0\.1:1, kubeconfig "
                     r"context gone$", gone["error"]), gone["error"]
    assert "Retrying" not in out.stderr and "urllib3" not in out.stderr, out.stderr


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_credentials_for_a_plain_http_api_server_are_warned_about_once(
        harness: Harness, sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A bearer token sent to an http:// API server travels in clear text; a client key given
    for one is never presented. Each gets one warning per cluster (not one per request, nor
    per scan of a long-running process), and the token itself is never shown."""
    harness.cluster("plain", ["closed"], tls=False)
    harness.cluster("plainkey", ["closed"], tls=False)
    harness.cluster("tls", ["closed"])
    harness.users["plainkey"] = {"token": "emulator-token",
                            "client-certificate-data": _b64("not a certificate\n"),
                            "client-key-data": _b64("not a key\n")}
    config = str(harness.config())
    caplog.set_level("WARNING")
    for _ in range(2):
        out = felixscan("scan", "--config", config, "--db", sqlite_url)
        assert out.code == 0, out.stdout + out.stderr
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    plain = harness.emulators["plain"].url
    assert [w for w in warnings if "cluster plain:" in w] == [
        f"cluster plain: the kubeconfig sends a bearer token to {plain} over plain HTTP, in "
        "clear text: anyone on the path can read and reuse it; use the server's https:// "
        "address"], warnings
    [key] = [w for w in warnings if "cluster plainkey:" in w]
    assert "bearer token" in key and "client certificate and key" in key, key
    assert "never presented" in key, key
    assert not any("cluster tls:" in w for w in warnings)
    assert "emulator-token" not in caplog.text


def test_verbosity_flags_work_after_the_subcommand(harness: Harness, sqlite_url: str) -> None:
    """`felixscan scan -v` was a usage error (the flag was only known before the subcommand),
    and there was no -q. Both now work on either side, and -q keeps warnings off stderr."""
    harness.cluster("plain", ["closed"], tls=False)
    config = str(harness.config())
    verbose = felixscan_process("scan", "-v", "--config", config, "--db", sqlite_url)
    assert verbose.code == 0, verbose.stderr
    assert " INFO " in verbose.stderr and "over plain HTTP" in verbose.stderr
    both = felixscan_process("-v", "scan", "-v", "--config", config, "--db", sqlite_url)
    assert both.code == 0 and " DEBUG " in both.stderr, both.stderr  # -v twice: -vv
    for args in (("-q", "scan"), ("scan", "-q")):
        quiet = felixscan_process(*args, "--config", config, "--db", sqlite_url)
        assert quiet.code == 0, quiet.stderr
        assert quiet.stderr == "", quiet.stderr
    trend = felixscan_process("trend", "--db", sqlite_url, "-q")
    assert trend.code == 0, trend.stderr


# --- 3a-c, 3f, 3h. the database and report flags -------------------------------------------------


@pytest.fixture
def scanned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A SQLite database holding one scan of a one-node cluster; no FELIXSCAN_* in the env."""
    for name in ("FELIXSCAN_DB", "FELIXSCAN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    h = Harness(tmp_path / "cluster")
    (tmp_path / "cluster").mkdir()
    try:
        h.cluster("c1", ["closed"])
        db = f"sqlite:///{tmp_path / 'results.db'}"
        assert h.scan(db).code == 0
        yield db
    finally:
        h.close()


@pytest.mark.parametrize("args", [
    ("scan",), ("report", "--out", "r.html"), ("trend",), ("db", "upgrade"),
    ("remediate", "--cluster", "c1")], ids=lambda a: a[0])
def test_a_database_path_without_a_scheme_is_a_usage_error_with_a_hint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]) -> None:
    """`--db foo.db` was taken for a URL: `cannot use database foo.db: Could not parse
    SQLAlchemy URL` (exit 4), or for scan a kubeconfig complaint first."""
    monkeypatch.delenv("FELIXSCAN_DB", raising=False)
    out = felixscan(*args, "--db", "foo.db", cwd=tmp_path)
    assert out.code == 2, out.stderr
    assert "--db foo.db is a file path, not a database URL; for a SQLite file use " \
        "--db sqlite:///foo.db" in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []
    absolute = felixscan(*args, "--db", "/var/tmp/x.db", cwd=tmp_path)
    assert "--db sqlite:////var/tmp/x.db" in absolute.stderr, absolute.stderr


def test_report_without_a_database_points_at_the_demo_database(
        scanned: str, tmp_path: Path) -> None:
    """After `felixscan demo`, a first `felixscan report` looked for felixscan.db and said only
    that it does not exist."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "felixscan-demo.db").write_bytes(Path(scanned.removeprefix("sqlite:///")).read_bytes())
    for args in (("report", "--out", "r.html"), ("trend",)):
        out = felixscan(*args, cwd=here)
        assert out.code == 4, out.stderr
        assert "database sqlite:///felixscan.db does not exist" in out.stderr
        assert "`felixscan demo` wrote felixscan-demo.db here: add --db " \
            "sqlite:///felixscan-demo.db" in out.stderr, out.stderr
    good = felixscan("report", "--out", "r.html", "--db", "sqlite:///felixscan-demo.db",
                     cwd=here)
    assert good.code == 0, good.stderr


def test_report_format_follows_the_extension_of_out(scanned: str, tmp_path: Path) -> None:
    """`report --out x.html` wrote a PDF into x.html (the format defaulted to pdf)."""
    for name in ("r.html", "r.htm", "R.HTML"):
        out = felixscan("report", "--db", scanned, "--out", str(tmp_path / name))
        assert out.code == 0, out.stderr
        assert (tmp_path / name).read_text().lstrip().startswith("<!DOCTYPE html>")
        assert "(html," in out.stdout
    for fmt, name in (("pdf", "x.html"), ("html", "x.pdf"), ("pdf", "x.htm")):
        out = felixscan("report", "--db", scanned, "--format", fmt, "--out",
                        str(tmp_path / name))
        assert out.code == 2, out.stderr
        assert f"--format {fmt} does not match --out {tmp_path / name}" in out.stderr
        assert not (tmp_path / name).exists()


def test_report_verify_checks_every_file_it_is_given(scanned: str, tmp_path: Path) -> None:
    """The help said `verify FILE.pdf` took files; a second file was a usage error."""
    first, second = tmp_path / "a.pdf", tmp_path / "b.pdf"
    assert felixscan("report", "--db", scanned, "--out", str(first)).code == 0
    second.write_bytes(first.read_bytes())
    both = felixscan("report", "verify", str(first), str(second))
    assert both.code == 0, both.stdout + both.stderr
    assert both.stdout.count(": OK: ") == 2
    altered = tmp_path / "c.pdf"
    altered.write_text("not a pdf")
    mixed = felixscan("report", "verify", str(first), str(altered), str(second))
    assert mixed.code == 2, mixed.stdout + mixed.stderr
    assert mixed.stdout.count(": OK: ") == 2  # every file is checked, whatever came before
    assert f"{altered}: not a PDF file" in mixed.stderr
    single = felixscan("report", "verify", str(first))
    assert single.code == 0 and single.stdout.startswith(f"{first}: OK: ")
    assert felixscan("report", "verify").code == 2


def test_report_into_a_missing_directory_fails_before_rendering(
        scanned: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import reports

    def must_not_render(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("rendered a report that cannot be written")

    monkeypatch.setattr(reports, "build_report", must_not_render)
    target = tmp_path / "missing" / "x.pdf"
    out = felixscan("report", "--db", scanned, "--out", str(target))
    assert out.code == 2, out.stderr
    assert f"--out {target}: the directory {target.parent} does not exist" in out.stderr
    not_dir = tmp_path / "a-file"
    not_dir.write_text("")
    out = felixscan("report", "--db", scanned, "--out", str(not_dir / "x.pdf"))
    assert out.code == 2 and "is not a directory" in out.stderr, out.stderr
    out = felixscan("report", "--db", scanned, "--out", str(tmp_path))
    assert out.code == 2 and "is a directory" in out.stderr, out.stderr


# --- 3i, 3j. the config's YAML errors, the exit codes in --help ----------------------------------


@pytest.mark.parametrize(("text", "where"), [
    # an unclosed quote: PyYAML notices at the end of the file (line 5, past the last line)
    ('database: "sqlite:///x.db\nclusters:\n  - name: a\n    context: a\n',
     "line 1, column 11: a quoted string that is never closed (found unexpected end of stream "
     "at line 5, column 1)"),
    ("clusters:\n  - name: a\n    context: [a, b\n  - name: b\n",
     "line 3, column 14: a [ list that is never closed (expected ',' or ']', but got ':' at "
     "line 4, column 9)"),
    ("clusters:\n  - name: a\n\tcontext: a\n",
     "line 3, column 1: found character '\\t' that cannot start any token"),
    ("clusters: a: b\n", "line 1, column 12: mapping values are not allowed here"),
], ids=["unclosed-quote", "unclosed-bracket", "tab", "first-line"])
def test_invalid_yaml_names_the_line_of_the_mistake(tmp_path: Path, text: str,
                                                    where: str) -> None:
    config = tmp_path / "felixscan.yaml"
    config.write_text(text)
    out = felixscan("scan", "--config", str(config))
    assert out.code == 2
    assert out.stderr.strip() == (f"felixscan: configuration error: {config}: not valid YAML "
                                  f"at {where}"), out.stderr


def test_scan_help_lists_every_exit_code() -> None:
    out = felixscan_process("scan", "--help")
    assert out.code == 0
    text = " ".join(out.stdout.split())
    for code, meaning in ((0, "all compliant"), (1, "at least one non-compliant"),
                          (2, "usage or configuration error"),
                          (3, "at least one cluster could not be scanned"),
                          (4, "the results database cannot be used")):
        assert f"{code} {meaning}" in text, text
