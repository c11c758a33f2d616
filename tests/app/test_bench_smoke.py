"""The benchmarks still run: every script in bench/ is run with `--smoke` (a small size that
finishes in seconds, with no time target) and must exit 0 and print its figures lines, which
are parsed here: each must be there with numbers in it (their values are not judged). A bench
with an anchor prints it and the ratio in the same run (the probe: nmap, when installed; the
report's signing: the unsigned render); those lines are parsed too. A new script in bench/
without an entry in CASES fails `test_every_bench_has_a_smoke_case`.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT

BENCH = ROOT / "bench"
N = r"(-?\d[\d,]*(?:\.\d+)?)"  # a number as the benches print it: 1,234.5
FORMATS = ("text", "json", "sarif", "junit", "ocsf", "csv")

REPORT = [rf"^{fmt}\s+{N}\s+{N}\s+{N}\s+{N}\s+{N}\s+{N}\s+{N}$" for fmt in ("HTML", "PDF")] + [
    rf"^peak RSS {N} MB; imports {N} s$",
]
SIGNING = [
    rf"^  unsigned PDF render, build_report \(anchor\)\s+{N} s\s+{N}x$",
    rf"^  sign: reports\.signing\.sign_report\s+{N} s\s+{N}x$",
    rf"^  verify: reports\.signing\.verify_signature \(signature alone\)\s+{N} s\s+{N}x$",
    rf"^  verify: reports\.verify_report \(data hash \+ signature, after it\)\s+{N} s\s+{N}x$",
    rf"^  verify: felixscan report verify FILE --trust CA\.pem \(fresh process\)\s+{N} s\s+"
    rf"{N}x$",
    rf"^  signature size overhead: signed {N} B - unsigned {N} B = \+{N} B \(\+{N} %\)$",
    r"^  every signed report verified \(library and CLI\): yes$",
]
TREND = [rf"^node probes stored\s+{N}", rf"^write one 50-node scan \(s, target < 1\)\s+{N}",
         rf"^10-day trend, all clusters \(ms, target < 100\)\s+{N}",
         rf"^failing-streak query \(ms, target < 500\)\s+{N}",
         rf"^size per million probes \(MB\)\s+{N}",
         rf"^GET /api/trend\?days=365 median \(ms, no target\)\s+{N}",
         rf"^anchor: driver cursor fetch, same rows \(ms\)\s+{N}",
         rf"^ratio GET / anchor \(x\)\s+{N}"]
NMAP = ([rf"^\s+{N} s\s+ratio {N}x\s+1 s timeout, no retries, all hosts at once: ",
         rf"^\s+{N} s\s+ratio {N}x\s+fastest: "] if shutil.which("nmap")
        else [r"^nmap not found"])

# id -> (the bench, its arguments besides --smoke, the lines it must print)
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "scan": ("scan", [], [
        r"^20 nodes x 1 cluster on 127\.\d+\.\d+\.\d+\.\.127\.\d+\.\d+\.\d+, sqlite, 1 runs of "
        r"`felixscan scan --json`$",
        *(rf"^{phase}\s+{N} s\s+-$" for phase in ("api", "probe", "evaluate", "store")),
        rf"^total\s+{N} s\s+{N} s$", r"^smoke run: no target$",
        *([rf"^nmap -sT -Pn -n -p 9091 \(1 s timeout, no retries, all hosts at once\)\s+{N} s"
           rf"\s+{N} s$", rf"^ratio felixscan/nmap  wall {N}x  CPU {N}x"]
          if shutil.which("nmap") else [r"^nmap not found"])]),
    "scan-clusters": ("scan", ["--clusters", "3"], [
        r"^20 nodes x 3 clusters on 127\.\d+\.\d+\.\d+\.\.127\.\d+\.\d+\.\d+, sqlite, 1 runs "
        r"of `felixscan scan --json` \(default bound\)$",
        rf"^total\s+{N} s\s+{N} s$",
        rf"^sequential \(max_concurrent_clusters: 1\)\s+{N} s\s+{N} s$",
        rf"^ratio concurrent/sequential  wall {N}x  CPU {N}x$"]),
    "probe": ("probe", [], [
        r"^nodes: 50 on 127\.", rf"^  probe run 1:\s+{N} s .*, 0 unexpected results$",
        rf"^probe phase: median {N} s \(min {N}, max {N}\)$", rf"^prober peak RSS: {N} MB",
        rf"^throughput: {N} targets/s$", *NMAP]),
    "probe-sizes": ("probe", ["--sizes", "40,80"], [
        r"^nodes: 40 on 127\.", r"^nodes: 80 on 127\.",
        rf"^probe CPU: median {N} s, {N} s per 1,000 nodes$",
        r"^per size, each in one run \(nmap: 1 s timeout, no retries, all hosts at once",
        *([rf"^\s+{n}\s+{N}\s+{N}\s+{N}\s+{N}\s+{N}x\s+{N}x$" for n in (40, 80)]
          if shutil.which("nmap") else [r"^nmap not found"])]),
    "hostile": ("hostile", [], [
        r"^nodes: 28 on 127\.", rf"^  run 1: wall {N} s, listeners CPU {N} s, 0 unexpected$",
        rf"^open ports found: {N} of {N} listening",
        rf"^wall time: {N} s best, {N} s worst of 1 runs \(worst single node {N} s\)$",
        rf"^prober peak RSS: {N} MB", r"^  every verdict right: yes$"]),
    "report": ("report", [], [*REPORT, r"^smoke run: "]),
    "report-sign-tsa": ("report", ["--sign", "--tsa"], [
        *REPORT, r"^signing: PAdES B-T, timestamped by a TSA on 127\.0\.0\.1:\d+;", *SIGNING]),
    "trend": ("trend", [], [r"^2 clusters x 50 nodes x 10 nightly scans$", *TREND]),
    "trend-postgresql": ("trend", ["--backend", "both"], [
        r"^2 clusters x 50 nodes x 10 nightly scans$",
        *(f"{line}\\s+{N}" for line in TREND)]),
    "web": ("web", [], [
        r"^`felixscan serve` on 127\.0\.0\.1:\d+ over 3 clusters x 10 days \(sqlite\)",
        *(rf"^GET {re.escape(path)}\s+median\s+{N} ms\s+p95\s+{N} ms\s+max\s+{N} ms\s+"
          r"\(10 requests\)$"
          for path in ("/", "/clusters/prod-eu-00", "/api/clusters", "/api/trend?days=365")),
        rf"^serve RSS: idle {N} MB after start, {N} MB after the requests$"]),
    "metrics": ("metrics", [], [
        rf"^database: 3 clusters x 10 days \(sqlite\); one scrape: {N} samples, {N} KiB$",
        rf"^collector query alone\s+median\s+{N} ms\s+p95\s+{N} ms",
        rf"^GET /metrics \(serve\)\s+median\s+{N} ms\s+p95\s+{N} ms\s+max\s+{N} ms",
        rf"^ratio: scrape median / collector query median = {N}x",
        r"^smoke run: figures checked against the database"]),
    "outputs": ("outputs", [], [
        rf"^50 nodes per cluster, built and evaluated in memory in {N} s",
        *(rf"^{fmt}\s+{label}\s+{N}\s+{N}\s+{N}\s+" for fmt in FORMATS
          for label in ("non-compliant", "compliant")),
        r"^smoke: every format encoded and valid$"]),
    "controls": ("controls", [], [
        r"^20 nodes on 127\.\d+\.\d+\.\d+\.\.127\.\d+\.\d+\.\d+, sqlite, 1 runs each of "
        r"`felixscan scan --json`, alternating",
        rf"^felix-metrics alone \(anchor\)\s+median {N} s$",
        rf"^all three controls\s+median {N} s\s+ratio {N}x$", r"^smoke run: no target$"]),
    "downloads": ("downloads", [], [
        *(rf"^{name}: 50 downloads in {N} s, {N} rendered, {N} from the cache$"
          for name in ("cold cache", "warm cache")),
        rf"^  download latency\s+median\s+{N} s\s+p95\s+{N} s\s+max\s+{N} s$",
        rf"^  serve RSS\s+before\s+{N} MB\s+peak\s+{N} MB\s+after\s+{N} MB$",
        rf"^  /healthz\s+median\s+{N} ms\s+p95\s+{N} ms\s+max\s+{N} ms",
        rf"^renders in the log: 8 \(distinct reports: 8\); {N} distinct PDFs verified",
        r"^smoke run: one render per report, no errors: yes"]),
    "coldstart": ("coldstart", [], [
        r"^coldstart: 1 cluster, 20 nodes on 127\.\d+\.\d+\.\d+\.\., sqlite, 2 runs per "
        r"command",
        rf"^anchor: python -c pass, start to exit\s+median {N} s \(min {N}, max {N}\)$",
        *(rf"^{label}\n  first API request\s+median {N} s \(min {N}, max {N}\)\s+ratio {N}x "
          rf"anchor\n  whole process\s+median {N} s \(min {N}, max {N}\)\s+ratio {N}x anchor$"
          for label in (r"felixscan scan \(console script\)", r"python -m scanner scan")),
        r"^smoke run: no target$"]),
    "store": ("store", [], [
        r"^store: save_cluster of 200 nodes \(60% closed, 25% TLS open, 5% HTTP open, "
        r"10% filtered; a finding per open node\), median of 1 runs",
        rf"^sqlite\s+200 nodes  save_cluster median {N} s \(min {N}, max {N}\)  anchor "
        rf"executemany {N} s  ratio {N}x  no target$",
        r"^smoke run: no target$"]),
}


def _params() -> list[object]:
    marks = {"trend-postgresql": [pytest.mark.postgres]}
    return [pytest.param(case, id=case, marks=marks.get(case, [])) for case in CASES]


def test_every_bench_has_a_smoke_case() -> None:
    scripts = {p.name for p in BENCH.iterdir()
               if p.is_file() and not p.suffix and not p.name.startswith((".", "_"))}
    assert scripts == {bench for bench, _, _ in CASES.values()}


@pytest.mark.parametrize("case", _params())
def test_bench_smoke(case: str) -> None:
    bench, extra, lines = CASES[case]
    env = {k: v for k, v in os.environ.items() if k not in ("FELIXSCAN_CONFIG", "FELIXSCAN_DB")}
    proc = subprocess.run([sys.executable, str(BENCH / bench), "--smoke", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output
    for pattern in lines:
        match = re.search(pattern, proc.stdout, re.MULTILINE)
        assert match is not None, f"no line matches {pattern!r}\n{output}"
        for number in match.groups():
            assert math.isfinite(float(number.replace(",", ""))), (pattern, match.group(0))
