"""Hostile node endpoints and hostile data, end to end through `felixscan scan`.

Part one: one cluster whose nodes answer port 9091 in every bad way we know (scanner.emulator.nodes
kinds). An open port is open whatever it says: the verdict is FAIL, the node next to it is not
affected, and time and memory stay bounded (the scan runs in a child process whose peak RSS is
measured). Part two: node names, label values, FelixConfiguration values and a /metrics label
carrying HTML, SVG, CSS, control characters and very long strings go through a real scan into the
database, the HTML and PDF reports and `felixscan trend --format csv`, and come out as text.
"""

from __future__ import annotations

import csv
import html.parser
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader
from sqlalchemy import create_engine, select, text

from reports import build_report
from scanner.app.cli import main
from scanner.core.evaluate import failed_cluster
from scanner.db.models import NodeProbe
from scanner.db.store import Store
from scanner.emulator.nodes import LONG_CHAIN, REDIRECT_LOCATION
from tests.helpers import scan_harness
from tests.helpers.scan_harness import Harness, Node, Outcome

# connect 0.5 s, TLS 1 s, HTTP 1.5 s: the worst node costs 0.5 + 1 + 0.5 + 1.5 = 3.5 s
PROBE = {"timeout_seconds": 0.5, "tls_timeout_seconds": 1, "http_timeout_seconds": 1.5}
WORST_NODE_S = 3.5
RSS_LIMIT_MB = 200  # the scanner's peak, child process; an endless body would be unbounded

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec, so
# the child would report this test process's size once it is larger than the scanner
_MEASURED = (
    "import re, sys\n"
    "from pathlib import Path\n"
    "from scanner.app.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text())\n"
    "print(f'PEAK_RSS_KB={peak.group(1)}', file=sys.stderr)\n"
    "raise SystemExit(code)\n"
)


def scan_measured(harness: Harness, db: str) -> tuple[Outcome, float]:
    """`felixscan scan --json` in a child process; its outcome and peak RSS in MB."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, "scan", "--config", str(harness.config()), "--db", db,
         "--json"], capture_output=True, text=True, timeout=120, check=False)
    peak = re.search(r"PEAK_RSS_KB=(\d+)", proc.stderr)
    assert peak is not None, proc.stderr
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return Outcome(code=proc.returncode, doc=doc, stdout=proc.stdout,
                   stderr=proc.stderr), int(peak.group(1)) / 1024


def probe_rows(db: str) -> dict[str, Any]:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return {r.node: r for r in conn.execute(select(NodeProbe))}
    finally:
        engine.dispose()


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.32.0.0")


# --- hostile endpoints ---------------------------------------------------------------------------

# node kind -> (state, protocol, felix, error contains); every one of them is a FAIL but silent
HOSTILE = {
    "mute": ("open", "tcp", None, "no response within the 1.5 s deadline"),
    "drip": ("open", "http", None, "response incomplete"),
    "endless": ("open", "http", True,
                "body larger than max_body_bytes; reading stopped at 1048576 bytes"),
    "garbage": ("open", "tcp", None, "peer did not answer with HTTP"),
    "banner": ("open", "tcp", None, "peer did not answer with HTTP (first bytes b'SSH-2.0"),
    "tls-expired": ("open", "https", True, None),
    "tls-wildcard": ("open", "https", True, None),
    "tls-nosubject": ("open", "https", True, None),
    "tls-longchain": ("open", "https", True, None),
    "felix-mtls": ("open", "https", None, "connection closed without a response"),
    "redirect": ("open", "http", False, None),
    "reset": ("open", "tcp", None, "connection reset by peer"),
    "reset-mid": ("open", "http", True, "connection reset by peer"),
    "silent": ("filtered", None, None, "no answer to connect within 0.5 s"),
}


def test_hostile_endpoints_are_open_ports_and_bounded(harness: Harness,
                                                      sqlite_url: str) -> None:
    harness.probe = dict(PROBE)
    kinds = ["closed", *HOSTILE, "felix-http"]
    harness.cluster("hostile", [Node(kind, name=f"n-{kind}") for kind in kinds]
                    + [Node("closed", name="n-closed-last")])
    out, peak_mb = scan_measured(harness, sqlite_url)
    assert out.code == 1, out.stderr  # open ports: non-compliant
    c = out.cluster("hostile")
    assert c["status"] == "non_compliant"
    nodes = {n["name"].removeprefix("n-"): n for n in c["nodes"]}
    for kind, (state, protocol, felix, error) in HOSTILE.items():
        n = nodes[kind]
        assert (n["state"], n["protocol"], n["felix"]) == (state, protocol, felix), (kind, n)
        assert n["verdict"] == ("pass" if state == "filtered" else "fail"), (kind, n)
        if error:
            assert error in (n["error"] or ""), (kind, n["error"])
    # the neighbours are not affected
    assert nodes["felix-http"]["felix"] is True and nodes["felix-http"]["verdict"] == "fail"
    assert [(n["name"], n["verdict"]) for n in c["nodes"] if n["state"] == "closed"] == [
        ("n-closed", "pass"), ("n-closed-last", "pass")]
    # time: all nodes at once, so the probe phase costs about the worst node, not the sum
    assert c["timings"]["probe"] < WORST_NODE_S + 1.5, c["timings"]
    # memory: the endless body (up to 256 MiB offered) is counted, not kept
    assert peak_mb < RSS_LIMIT_MB, peak_mb
    assert "Traceback" not in out.stderr

    rows = probe_rows(sqlite_url)
    assert len(rows) == len(kinds) + 1
    assert rows["n-redirect"].http_status == 301 and rows["n-redirect"].felix is False
    assert REDIRECT_LOCATION not in (rows["n-redirect"].error or "")  # recorded, not followed
    expired = rows["n-tls-expired"]
    assert expired.tls_not_after < datetime.now(UTC) - timedelta(days=29)
    assert expired.tls_subject == "CN=expired.nodes.example"
    assert rows["n-tls-wildcard"].tls_subject == "CN=*.nodes.example"
    assert rows["n-tls-nosubject"].tls_subject == ""
    assert rows["n-tls-nosubject"].tls_sha256 is not None
    chain = rows["n-tls-longchain"]
    assert chain.tls_subject == "CN=longchain.nodes.example"
    assert chain.tls_issuer == f"CN=chain-ca-{LONG_CHAIN - 2}"
    assert chain.tls_self_signed is False
    assert {r.verdict for name, r in rows.items()
            if name not in ("n-closed", "n-closed-last", "n-silent")} \
        == {"fail"}
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        findings = {(r[0], r[1]) for r in conn.execute(text(
            "SELECT finding_id, node FROM findings"))}
    engine.dispose()
    for kind in HOSTILE:
        if kind != "silent":
            assert ("FELIX-PORT-REACHABLE", f"n-{kind}") in findings or \
                ("DRIFT-DISABLED-BUT-OPEN", f"n-{kind}") in findings, kind


# --- hostile data --------------------------------------------------------------------------------

SCRIPT = "<script>alert(1)</script>"
SVG = "<svg/onload=alert(2)><circle/r=9></svg>"
CSS = "</style><style>*{display:none}</style>"
FORMULA = '=HYPERLINK("http://x.invalid","y")'
CONTROLS = "ctl-\x1b[31mred\x07bell\u202eevil\x00nul"
LONG = "long-" + "x" * 5000

HOSTILE_NODES = {
    SCRIPT: "felix-http",
    SVG: "closed",
    CSS: "felix-http",
    FORMULA: "felix-http",
    "@SUM(1+1)": "closed",
    "+1-1": "felix-http",
    "-2+3": "closed",
    CONTROLS: "other",  # not Felix: its name is not in a /metrics body
    LONG: "felix-http",
    LONG[:-1] + "y": "felix-http",  # shares 5,000 characters with LONG: must stay distinct
}
# what a node name becomes once read: controls escaped, at most 253 characters
SHOWN_CONTROLS = "ctl-\\x1b[31mred\\x07bell\\u202eevil\\x00nul"
HOSTILE_HOST = "<img src=x onerror=alert(3)>\n\x1b]0;pwned\x07" + "h" * 600
HOSTILE_CLUSTERS = ["=cmd|' /C calc'!A0", "@SUM(A1)", "+1+1", "-1+1", "\t=1+1",
                    "<b>not-a-cluster</b>"]


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _felix_body(host: str) -> bytes:
    escaped = host.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return (f'# HELP felix_host Configured Felix hostname\n# TYPE felix_host gauge\n'
            f'felix_host{{host="{escaped}"}} 1\n').encode()


@pytest.fixture
def hostile_store(harness: Harness, db_url: str) -> Iterator[tuple[Store, Outcome]]:
    """A database holding a real scan of hostile names, plus clusters named like formulas."""
    nodes = [Node(kind, name=name, labels={"pool": "<b>pool</b>", "note": CSS})
             for name, kind in HOSTILE_NODES.items()]
    harness.cluster("hostile", nodes, felix_configs=[
        {"metadata": {"name": "default", "annotations": {
            "config.projectcalico.org/PrometheusMetricsEnabled": SCRIPT}},
         "spec": {"prometheusMetricsEnabled": False}},
        {"metadata": {"name": "pool-select"},
         "spec": {"nodeSelector": f"pool == '{SVG}'", "prometheusMetricsEnabled": True}}])
    address = harness.addresses[("hostile", SCRIPT)]
    harness.fleet.node(address).body = _felix_body(HOSTILE_HOST)
    out = harness.scan(db_url)
    with Store(db_url) as store:
        run = store.begin_run(trigger="test", started_at=datetime.now(UTC))
        for name in HOSTILE_CLUSTERS:  # config refuses such names; another writer might not
            now = datetime.now(UTC)
            store.save_cluster(run, failed_cluster(name, f"{SCRIPT} {CSS}", started_at=now,
                                                   finished_at=now))
        store.finish_run(run)
        yield store, out


def test_config_refuses_a_cluster_name_with_markup(harness: Harness, sqlite_url: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    harness.cluster("ok", ["closed"])
    config = harness.config()
    config.write_text(config.read_text().replace("name: ok", f"name: '{SCRIPT}'"))
    assert main(["scan", "--config", str(config), "--db", sqlite_url]) == 2
    err = capsys.readouterr().err
    assert "clusters[0].name" in err and "expected letters, digits" in err


def test_hostile_names_are_scanned_and_stored_as_text(
        hostile_store: tuple[Store, Outcome], db_url: str) -> None:
    _, out = hostile_store
    assert out.code == 1, out.stderr
    c = out.cluster("hostile")
    names = [n["name"] for n in c["nodes"]]
    assert len(names) == len(HOSTILE_NODES) == len(set(names))  # nothing lost, nothing merged
    assert SHOWN_CONTROLS in names
    longs = [n for n in names if n.startswith("long-")]
    assert len(longs) == 2 and all(len(n) == 253 and "\u2026" in n for n in longs)
    for name in (SCRIPT, SVG, CSS, FORMULA):
        assert name in names
    assert {n["verdict"] for n in c["nodes"]} == {"pass", "fail"}
    # the FelixConfiguration annotation is an invalid boolean: reported with its text quoted
    invalid = [f for f in c["findings"] if f["id"] == "FELIX-CONFIG-INVALID-VALUE"]
    assert invalid and SCRIPT in invalid[0]["message"]
    rows = probe_rows(db_url)
    assert set(rows) == set(names)
    host = rows[SCRIPT].felix_host
    assert host is not None and len(host) <= 253 and "\x1b" not in host and "\x07" not in host
    assert host.startswith("<img src=x onerror=alert(3)>\\x0a\\x1b]0;pwned\\x07hhh")
    assert not any("\x00" in (r.node + (r.felix_host or "")) for r in rows.values())


def _check_html(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert "script" not in tags
    assert tags.count("style") == 1  # the report's own
    for tag, attrs in parser.tags:
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
        assert tag != "img", attrs
    for raw in ("\x1b", "\x07", "\x00", "\u202e"):
        assert raw not in page
    return parser


def test_html_and_pdf_reports_show_hostile_values_as_text(hostile_store: tuple[Store, Outcome],
                                                          tmp_path: Path) -> None:
    store, _ = hostile_store
    page_path = build_report(store, fmt="html", out=tmp_path / "r.html").path
    page = page_path.read_text()
    parser = _check_html(page)
    shown = "".join(parser.text)
    for value in (SCRIPT, SVG, CSS, FORMULA, SHOWN_CONTROLS, *HOSTILE_CLUSTERS[:5]):
        assert value in shown, value
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page

    pdf = build_report(store, fmt="pdf", out=tmp_path / "r.pdf").path
    reader = PdfReader(pdf)
    words = re.sub(r"\s+", "", "".join(p.extract_text() for p in reader.pages))
    for value in (SCRIPT, SVG, CSS, "=cmd|'/C calc'!A0", "ctl-\\x1b[31mred"):
        assert re.sub(r"\s+", "", value) in words, value


def test_trend_csv_neutralises_formulas(hostile_store: tuple[Store, Outcome],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = hostile_store
    cells: list[str] = []
    for extra in ([], ["--nodes"]):
        assert main(["trend", "--db", store.url, "--format", "csv", *extra]) == 0
        cells += [cell for row in csv.reader(io.StringIO(capsys.readouterr().out))
                  for cell in row]
    for name in HOSTILE_CLUSTERS[:5]:
        assert "'" + name in cells, name
    for name in (FORMULA, "+1-1"):
        assert "'" + name in cells, name
    for cell in cells:
        if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
            float(cell)  # only a plain number may start so
