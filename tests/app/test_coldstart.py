"""What `felixscan scan`'s path to the API server imports: the command line, the settings, the
cluster reader and the scan's light Kubernetes client, never the `kubernetes` client, the report
renderers or anything of the database (the command opens the database itself, before its first
request: the clusters are read under their database lock). Structural, not timed:
bench/coldstart times the whole command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from reports.outputs import FORMATS
from scanner.app.options import OUTPUT_FORMATS
from tests.helpers.paths import ROOT

HEAVY = ("kubernetes", "sqlalchemy", "alembic", "weasyprint", "pyhanko", "jinja2", "pydantic",
         "starlette", "apscheduler", "scanner.db", "scanner.scan", "scanner.probe", "reports")

# The steps of `felixscan scan` up to its first request, the database aside: parse, load the
# settings, import the cluster reader and make the cluster's client.
SCRIPT = """
import json, sys, time
from scanner.app.cli import build_parser
from scanner.app.options import settings_of
args = build_parser().parse_args(sys.argv[1:])
settings = settings_of(args).select(args.cluster)
import scanner.kube.read
from scanner.kube.client import make_api
api = make_api(settings.clusters[0], deadline=time.monotonic() + 5)
print(json.dumps({"client": type(api.client).__name__, "modules": sorted(sys.modules)}))
"""


def run(script: str, *args: str, tmp: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=tmp,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def scan_config(tmp: Path, user: dict[str, object]) -> Path:
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "c", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "c"}}]}))
    config = tmp / "felixscan.yaml"
    config.write_text(yaml.safe_dump({"clusters": [
        {"name": "c", "kubeconfig": str(kubeconfig), "context": "c"}]}))
    return config


def loaded(modules: object) -> list[str]:
    assert isinstance(modules, list)
    return sorted(m for m in modules if m.startswith(HEAVY)
                  and (m in HEAVY or m.startswith(tuple(f"{h}." for h in HEAVY))))


def test_scan_reaches_its_first_request_without_the_heavy_libraries(tmp_path: Path) -> None:
    config = scan_config(tmp_path, {"token": "t"})
    doc = run(SCRIPT, "scan", "--config", str(config), "--db", "sqlite:///x.db", "--json",
              tmp=tmp_path)
    assert doc["client"] == "_Rest"
    assert loaded(doc["modules"]) == []


def test_exotic_credentials_still_get_the_kubernetes_client(tmp_path: Path) -> None:
    """The structural check above is not vacuous: an auth-provider user takes the other path."""
    config = scan_config(tmp_path, {"auth-provider": {"name": "oidc", "config": {
        "id-token": "x", "idp-issuer-url": "https://127.0.0.1:1", "client-id": "c"}}})
    script = SCRIPT.replace("api = make_api", "try:\n    api = make_api").replace(
        'print(json.dumps({"client": type(api.client).__name__, ',
        "except Exception:\n    api = None\nprint(json.dumps({\"client\": "
        "type(getattr(api, 'client', None)).__name__, ")
    doc = run(script, "scan", "--config", str(config), "--db", "sqlite:///x.db", tmp=tmp_path)
    assert doc["client"] != "_Rest"
    assert "kubernetes" in loaded(doc["modules"])


def test_cli_parser_alone_loads_no_output_writer_or_version_metadata(tmp_path: Path) -> None:
    script = ("import json, sys\nfrom scanner.app.cli import build_parser\nbuild_parser()\n"
              "print(json.dumps({'modules': sorted(sys.modules)}))")
    modules = run(script, tmp=tmp_path)["modules"]
    assert isinstance(modules, list)
    assert not {"reports.outputs", "importlib.metadata", "scanner.kube.read"} & set(modules)
    assert loaded(modules) == []


def test_output_formats_named_by_the_cli_are_the_writers() -> None:
    assert OUTPUT_FORMATS == FORMATS


def test_reexported_and_lazy_names_still_import() -> None:
    from reports import build_report, render_html
    from scanner import __version__
    from scanner.app.cli import cluster_json, summary_line

    assert callable(cluster_json) and callable(summary_line)
    assert callable(build_report) and callable(render_html)
    assert __version__
    version = subprocess.run([sys.executable, "-m", "scanner", "--version"],
                             capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert version.returncode == 0 and version.stdout == f"felixscan {__version__}\n"
