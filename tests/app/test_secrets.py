"""No secret leaks: a full run with planted secrets, then every artefact searched for them.

Planted: Secret values read through `valueFrom`, `envFrom` and a Secret-mounted felix.cfg, the
kubeconfig bearer token and client key, a token the API refuses, and a PostgreSQL password in
the database URL. The run: `felixscan -vv scan --json`, HTML and PDF reports, `trend` (CSV, and
the failing nodes as JSON), `db current`, and a scan against a database that refuses the
connection. Searched: the database (SQLite file bytes, or the whole PostgreSQL database as
`pg_dump` writes it), every stdout and stderr (logs at -vv), the HTML, the PDF (raw bytes, text,
page streams, the embedded data).
"""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from pypdf import PdfReader

from scanner.emulator.certs import make_self_signed
from tests.helpers import scan_harness
from tests.helpers.scan_harness import Harness

TAG = uuid.uuid4().hex[:10]
SECRET_ENV = f"PLANTED-ENV-SECRET-{TAG}"  # FELIX_PROMETHEUSMETRICSENABLED by secretKeyRef
SECRET_ENVFROM = f"PLANTED-ENVFROM-SECRET-{TAG}"  # FELIX_PROMETHEUSMETRICSPORT by envFrom
SECRET_CFG = f"PLANTED-CFG-SECRET-{TAG}"  # in felix.cfg, mounted from a Secret
TOKEN = f"PLANTED-TOKEN-{TAG}"  # the kubeconfig's bearer token
REFUSED_TOKEN = f"PLANTED-REFUSED-TOKEN-{TAG}"  # a token the API answers 401 to
PASSWORD = f"PLANTED-PW-{TAG}"  # in the PostgreSQL URL


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.34.0.0")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def felixscan(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "scanner", "-vv", *args], capture_output=True,
                          text=True, timeout=180, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def secret_cluster(harness: Harness) -> None:
    """A cluster whose Felix settings come from three Secrets, and one that refuses our token."""
    handle = harness.cluster(
        "vault", ["closed", "felix-http"],
        env={"FELIX_PROMETHEUSMETRICSENABLED": {"secretKeyRef": {"name": "felix-metrics",
                                                                 "key": "enabled"}}},
        secrets=[
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "felix-metrics"},
             "data": {"enabled": b64(SECRET_ENV)}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "felix-env"},
             "data": {"FELIX_PROMETHEUSMETRICSPORT": b64(SECRET_ENVFROM)}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "felix-cfg"},
             "data": {"felix.cfg": b64(f"[global]\nPrometheusMetricsEnabled = {SECRET_CFG}\n")}},
        ])
    emu = handle.emu
    ds = emu.get_object("apps/v1", "DaemonSet", "calico-node", namespace="kube-system")
    assert ds is not None
    pod = ds["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "calico-node")
    container["envFrom"] = [*container.get("envFrom", []), {"secretRef": {"name": "felix-env"}}]
    container.setdefault("volumeMounts", []).append(
        {"name": "felix-cfg", "mountPath": "/etc/calico/felix.cfg", "subPath": "felix.cfg"})
    pod.setdefault("volumes", []).append({"name": "felix-cfg",
                                          "secret": {"secretName": "felix-cfg"}})
    emu.replace(ds)
    emu.token = TOKEN
    harness.cluster("refusing", ["closed"])


def client_key(harness: Harness) -> str:
    """Give the vault context a client certificate and key; return a piece of the key."""
    cert, key = make_self_signed("felixscan-client", hosts=[])
    kubeconfig = harness.tmp / "kubeconfig"
    doc = yaml.safe_load(kubeconfig.read_text())
    user = next(u for u in doc["users"] if u["name"] == "vault-user")
    user["user"]["client-certificate-data"] = base64.b64encode(cert).decode()
    user["user"]["client-key-data"] = base64.b64encode(key).decode()
    kubeconfig.write_text(yaml.safe_dump(doc))
    der = serialization.load_pem_private_key(key, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return base64.b64encode(der).decode()[20:60]


def pdf_texts(path: Path) -> list[str]:
    reader = PdfReader(path)
    out = [page.extract_text() for page in reader.pages]
    out += [page.get_contents().get_data().decode("latin-1") for page in reader.pages
            if page.get_contents() is not None]
    out += [f.content.decode("utf-8", "replace") for f in reader.attachment_list]
    out.append(repr(reader.metadata))
    return out


def database_dump(db: str) -> str:
    if db.startswith("sqlite"):
        path = Path(db.removeprefix("sqlite:///"))
        return "".join(p.read_bytes().decode("latin-1")
                       for p in path.parent.glob(path.name + "*"))
    plain = db.replace("+psycopg", "").replace(f":{PASSWORD}@", "@")
    dump = subprocess.run(["pg_dump", "--inserts", plain], capture_output=True, text=True,
                          check=True, timeout=60)
    assert "INSERT INTO public.node_probes" in dump.stdout  # the dump holds the data
    return dump.stdout


@pytest.mark.slow  # ten felixscan processes, at -vv (SQLAlchemy then logs every row it reads)
def test_no_planted_secret_appears_in_any_artefact(harness: Harness, db_url: str,
                                                   tmp_path: Path) -> None:
    db = db_url.replace("postgres@", f"postgres:{PASSWORD}@") if "postgresql" in db_url \
        else db_url
    secret_cluster(harness)
    config = harness.config()
    planted = {"secret via valueFrom": SECRET_ENV, "secret via envFrom": SECRET_ENVFROM,
               "secret felix.cfg": SECRET_CFG, "token": TOKEN,
               "refused token": REFUSED_TOKEN, "client key": client_key(harness)}
    if "postgresql" in db:
        planted["database password"] = PASSWORD
    for name in ("secret via valueFrom", "secret via envFrom", "secret felix.cfg", "token"):
        planted[f"{name} (base64)"] = b64(planted[name])
    harness.emulators["refusing"].token = f"not-{REFUSED_TOKEN}"
    kubeconfig = harness.tmp / "kubeconfig"
    kubeconfig.write_text(kubeconfig.read_text().replace("emulator-token", REFUSED_TOKEN))

    artefacts: dict[str, str] = {}

    def run(label: str, *args: str) -> int:
        code, out, err = felixscan(*args)
        artefacts[f"{label} stdout"] = out
        artefacts[f"{label} stderr (-vv)"] = err
        return code

    assert run("scan", "scan", "--config", str(config), "--db", db, "--json") == 1
    scan = yaml.safe_load(artefacts["scan stdout"])
    vault = next(c for c in scan["clusters"] if c["name"] == "vault")
    # the secrets were really read, and only their meaning kept
    assert vault["declared"]["source"] == \
        "env FELIX_PROMETHEUSMETRICSENABLED (secret kube-system/felix-metrics[enabled])"
    assert any(f["id"] == "FELIX-CONFIG-INVALID-VALUE" for f in vault["findings"])
    refusing = next(c for c in scan["clusters"] if c["name"] == "refusing")
    assert "401" in refusing["error"]
    assert "DEBUG" in artefacts["scan stderr (-vv)"]  # the logs were as verbose as they get

    html, pdf = tmp_path / "report.html", tmp_path / "report.pdf"
    assert run("html", "report", "--db", db, "--format", "html", "--out", str(html)) == 0
    assert run("pdf", "report", "--db", db, "--format", "pdf", "--out", str(pdf)) == 0
    assert run("trend csv", "trend", "--db", db, "--format", "csv") == 0
    assert run("trend --nodes json", "trend", "--db", db, "--nodes", "--format", "json") == 0
    assert run("db current", "db", "current", "--db", db) == 0
    bad_db = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/felixscan"
    assert run("unreachable database", "scan", "--config", str(config), "--db", bad_db) == 4
    assert "postgresql+psycopg://postgres@127.0.0.1:1/felixscan" in \
        artefacts["unreachable database stderr (-vv)"]
    planted.setdefault("database password", PASSWORD)

    artefacts["database"] = database_dump(db)
    artefacts["html"] = html.read_text()
    artefacts["pdf bytes"] = pdf.read_bytes().decode("latin-1")
    for i, part in enumerate(pdf_texts(pdf)):
        artefacts[f"pdf part {i}"] = part
    assert "<redacted>" in artefacts["database"]  # the Secret-sourced value is on record as such

    leaks: list[tuple[str, str]] = [(what, where) for what, secret in planted.items()
                                    for where, blob in artefacts.items() if secret in blob]
    assert leaks == [], leaks
    assert len(artefacts) >= 16


def test_kubeconfig_errors_do_not_quote_credentials(harness: Harness, sqlite_url: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A kubeconfig the client cannot use: the message names the problem, never the token."""
    harness.cluster("c", ["closed"])
    config = harness.config()
    kubeconfig = harness.tmp / "kubeconfig"
    doc: dict[str, Any] = yaml.safe_load(kubeconfig.read_text())
    doc["users"][0]["user"] = {"token": TOKEN, "client-key-data": f"{TOKEN}-not-base64!"}
    kubeconfig.write_text(yaml.safe_dump(doc))
    from scanner.app.cli import main

    code = main(["scan", "--config", str(config), "--db", sqlite_url, "--json"])
    out, err = capsys.readouterr()
    assert code == 3
    [cluster] = yaml.safe_load(out)["clusters"]
    assert cluster["error"] == "cannot load credentials (Error: Incorrect padding)"
    assert TOKEN not in out + err
    db = Path(sqlite_url.removeprefix("sqlite:///"))
    assert all(TOKEN.encode() not in p.read_bytes() for p in db.parent.glob(db.name + "*"))
