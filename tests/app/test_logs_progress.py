"""Logs (--log-format text|json, library noise), progress (a redrawn line on a terminal, log
lines elsewhere, never on stdout) and shell completion, seen as a user sees them: real scans of
emulated clusters, a real pseudo-terminal, a real bash and zsh."""

from __future__ import annotations

import argparse
import contextvars
import fcntl
import io
import json
import logging
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from scanner.app.cli import build_parser, log_format
from scanner.app.commands.completion import script
from scanner.telemetry import logs, progress
from tests.helpers.paths import ROOT
from tests.helpers.scan_harness import Harness, Node, felixscan, felixscan_process

LIBRARIES = ("kubernetes", "urllib3", "asyncio", "alembic", "sqlalchemy")


def scan_args(h: Harness, db: str, *extra: str) -> list[str]:
    return ["scan", "--config", str(h.config()), "--db", db, *extra]


def two_clusters(h: Harness) -> None:
    h.cluster("east", ["closed", "closed", "felix-http", "silent"],
              env={"FELIX_PROMETHEUSMETRICSENABLED": "true"})
    h.cluster("west", ["closed", "closed", "closed"])


# --- 5. logs ---------------------------------------------------------------------------------


def test_json_logs_are_one_object_a_line_with_cluster_phase_and_scan_id(
        harness: Harness, sqlite_url: str) -> None:
    two_clusters(harness)
    out = felixscan_process(*scan_args(harness, sqlite_url, "--json", "-v",
                                       "--log-format", "json"))
    assert out.code == 1, out.stderr
    scan_id = json.loads(out.stdout)["scan_id"]
    lines = out.stderr.splitlines()
    assert lines, "no log lines at -v"
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    for doc in docs:
        assert isinstance(doc, dict)
        assert {"time", "level", "logger", "message"} <= doc.keys(), doc
        stamp = datetime.fromisoformat(doc["time"].replace("Z", "+00:00"))
        assert doc["time"].endswith("Z") and stamp.utcoffset() is not None, doc
        assert doc["level"] in ("debug", "info", "warning", "error", "critical"), doc
        # -v shows felixscan's own lines, none of the libraries' (they need -vv)
        assert not doc["logger"].startswith(LIBRARIES), doc

    def line(logger: str, phase: str, cluster: str) -> dict[str, Any]:
        [found] = [d for d in docs if d["logger"] == logger and d.get("phase") == phase
                   and d.get("cluster") == cluster and d["message"].startswith(phase)]
        return found

    for cluster, nodes in (("east", 4), ("west", 3)):
        collect = line("scanner.scan", "collect", cluster)
        assert collect["scan_id"] == scan_id and collect["level"] == "info"
        assert collect["nodes"] == nodes and collect["pods"] == nodes
        assert collect["requests"] >= 5 and collect["seconds"] > 0
        probe = line("scanner.scan", "probe", cluster)
        assert probe["scan_id"] == scan_id and probe["targets"] == nodes
        assert probe["open"] + probe["closed"] + probe["filtered"] == nodes
        assert probe["seconds"] >= 0
        store = line("scanner.scan", "store", cluster)
        assert store["scan_id"] == scan_id and store["rows"] > nodes
    east = line("scanner.scan", "probe", "east")
    assert (east["open"], east["closed"], east["filtered"]) == (1, 2, 1)
    done = [d for d in docs if d["logger"] == "scanner.progress" and "done" in d["message"]]
    assert {d["cluster"] for d in done} == {"east", "west"}
    assert all(d["scan_id"] == scan_id for d in done)


def test_log_format_goes_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    assert log_format(parser.parse_args(["scan"])) == "text"
    assert log_format(parser.parse_args(["--log-format", "json", "scan"])) == "json"
    assert log_format(parser.parse_args(["scan", "--log-format", "json"])) == "json"
    assert log_format(parser.parse_args(["db", "prune", "--log-format", "json"])) == "json"
    # both: the one after the subcommand, as with any later flag
    assert log_format(parser.parse_args(["--log-format", "json", "scan", "--log-format",
                                         "text"])) == "text"
    bad = felixscan("--log-format", "xml", "scan")
    assert bad.code == 2 and "invalid choice: 'xml'" in bad.stderr


def test_json_logs_carry_the_error_message_too(tmp_path: Path) -> None:
    """A configuration error with JSON logs is a JSON line as well, not a stray text line."""
    config = tmp_path / "felixscan.yaml"
    config.write_text("clusters: a: b\n")
    out = felixscan("--log-format", "json", "scan", "--config", str(config))
    assert out.code == 2
    [doc] = [json.loads(line) for line in out.stderr.splitlines()]
    assert doc["level"] == "error" and doc["logger"] == "felixscan"
    assert doc["message"].startswith(f"configuration error: {config}: not valid YAML")
    text = felixscan("scan", "--config", str(config))  # text: the line as it always was
    assert text.stderr.startswith(f"felixscan: configuration error: {config}")


def test_libraries_stay_quiet_at_v_and_speak_at_vv(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("c1", ["closed"])
    verbose = felixscan_process(*scan_args(harness, sqlite_url, "-v"))
    assert verbose.code == 0, verbose.stderr
    loggers = set(re.findall(r"^\S+ \S+ [A-Z]+ (\S+): ", verbose.stderr, re.M))
    assert "scanner.scan" in loggers, verbose.stderr
    assert not [n for n in loggers if n.startswith(LIBRARIES)], verbose.stderr
    assert "setup plugin" not in verbose.stderr  # alembic's announcements
    debug = felixscan_process(*scan_args(harness, sqlite_url, "-vv"))
    assert debug.code == 0, debug.stderr
    assert re.search(r" DEBUG urllib3\.\S+: ", debug.stderr), debug.stderr[-3000:]
    assert " DEBUG sqlalchemy" not in debug.stderr  # SQL only with -vvv


def test_json_formatter_fields_context_threads_and_exceptions() -> None:
    stream = io.StringIO()
    with logs.configured(verbosity=1, fmt="json", stream=stream):
        log = logging.getLogger("scanner.test")
        with logs.context(scan_id=7, cluster="c1"):
            ctx = contextvars.copy_context()
            with logs.context(phase="probe"):
                log.info("in %s", "probe", extra=logs.fields(targets=3))
            worker = threading.Thread(target=ctx.run, args=(log.warning, "from a thread"))
            worker.start()
            worker.join()
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"cluster": "c2"})
        log.debug("not at -v")
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {**first, "message": "in probe", "level": "info", "logger": "scanner.test",
                     "scan_id": 7, "cluster": "c1", "phase": "probe", "targets": 3}
    assert second == {**second, "message": "from a thread", "scan_id": 7, "cluster": "c1"}
    assert "phase" not in second
    assert third["cluster"] == "c2" and "scan_id" not in third
    assert third["exception"].startswith("Traceback") and "ValueError: boom" in third["exception"]
    # and logging is as it was before
    assert not logs.console_handlers()


# --- 6. progress -------------------------------------------------------------------------------


def test_scan_json_stdout_stays_pure_while_progress_and_logs_go_to_stderr(
        harness: Harness, sqlite_url: str) -> None:
    two_clusters(harness)
    out = felixscan_process(*scan_args(harness, sqlite_url, "--json", "-v"))
    assert out.code == 1, out.stderr
    doc = json.loads(out.stdout)  # all of stdout is the one document
    assert {c["name"] for c in doc["clusters"]} == {"east", "west"}
    assert "scanner.progress" not in out.stdout and "INFO" not in out.stdout
    assert re.search(r" INFO scanner\.progress: scan run \d+: east: done \(non_compliant\): "
                     r"4/4 nodes probed in [\d.]+ s; \d/2 clusters done", out.stderr), out.stderr
    assert " INFO scanner.scan: probe west: 3 targets (0 open, 3 closed" in out.stderr


def test_without_a_terminal_progress_is_logged_by_steps_and_periodically(
        harness: Harness, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CronJob's log: a line per 10% of a cluster's targets (at most one per gap), a summary
    of what is going on every HEARTBEAT_SECONDS, and a line per cluster done."""
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.5)
    monkeypatch.setattr(progress, "STEP_GAP_SECONDS", 0.2)
    harness.probe.update(timeout_seconds=0.3, concurrency=1)  # ~3 s of silent nodes
    harness.cluster("slow", [Node("silent")] * 10)
    out = felixscan(*scan_args(harness, sqlite_url))  # default verbosity, as a CronJob runs it
    assert out.code == 0, out.stderr
    assert out.stdout.startswith("slow: COMPLIANT")
    lines = out.stderr.splitlines()
    assert lines and all(" INFO scanner.progress: " in line for line in lines), out.stderr
    steps = [int(m.group(1)) for m in re.finditer(
        r"slow: probed \d+/10 nodes, \d+/10 targets \((\d+)%\)", out.stderr)]
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] < 100, out.stderr
    assert re.search(r"scan run \d+: 0/1 clusters done, \d+/10 nodes probed; going on: "
                     r"slow probe \d+/10 \(", out.stderr), out.stderr
    assert re.search(r"slow: done \(compliant\): 10/10 nodes probed in [\d.]+ s; 1/1 clusters "
                     "done$", out.stderr, re.M), out.stderr


def test_quiet_shows_no_progress(harness: Harness, sqlite_url: str) -> None:
    harness.cluster("c1", ["closed", "silent"])
    for args in (("-q", *scan_args(harness, sqlite_url)), (*scan_args(harness, sqlite_url),
                                                            "-q")):
        out = felixscan(*args)
        assert out.code == 0 and out.stderr == "", out.stderr
    term = on_terminals(scan_args(harness, sqlite_url, "--json", "-q"))
    assert term.code == 0 and term.stderr == b"", term.stderr
    assert json.loads(term.stdout)["clusters"][0]["status"] == "compliant"


@dataclass
class TermRun:
    code: int
    stdout: bytes
    stderr: bytes


def _pty(columns: int) -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def on_terminals(args: list[str], *, stdout_tty: bool = False, columns: int = 100,
                 timeout: float = 120) -> TermRun:
    """`felixscan ARGS` with stderr on a pseudo-terminal (and stdout too, if asked)."""
    err_master, err_slave = _pty(columns)
    out_master, out_slave = _pty(columns) if stdout_tty else os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "scanner", *args], stdin=subprocess.DEVNULL,
                            stdout=out_slave, stderr=err_slave, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm"})
    os.close(err_slave)
    os.close(out_slave)
    got = {err_master: b"", out_master: b""}
    open_fds = set(got)
    deadline = time.monotonic() + timeout
    try:
        while open_fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_fds), [], [], 0.2)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    data = b""
                if data:
                    got[fd] += data
                else:
                    open_fds.discard(fd)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(err_master)
        os.close(out_master)
    return TermRun(code, got[out_master], got[err_master])


def frames(stderr: bytes) -> list[str]:
    """What was drawn: each `\\r...\\x1b[K` redraw of the line, without the clearing ones."""
    text = stderr.decode()
    return [f.removesuffix("\x1b[K") for f in text.split("\r")[1:] if f != "\x1b[K"]


def test_a_terminal_gets_a_redrawn_line_on_stderr_and_nothing_on_stdout(
        harness: Harness, sqlite_url: str) -> None:
    harness.probe.update(timeout_seconds=0.3, concurrency=2)
    harness.cluster("east", ["closed"] * 6 + ["silent"] * 6)
    harness.cluster("west", ["closed"] * 3)
    run = on_terminals(scan_args(harness, sqlite_url, "--json"), stdout_tty=True, columns=90)
    assert run.code == 0, run.stderr
    stdout = run.stdout.decode().replace("\r\n", "\n")
    assert json.loads(stdout)["clusters"]  # stdout: the document, and only it
    assert "\x1b" not in stdout and "clusters |" not in stdout
    drawn = frames(run.stderr)
    assert drawn, run.stderr
    assert "\n" not in run.stderr.decode()  # one line, redrawn in place: no log lines here
    assert all(len(f) <= 89 for f in drawn), [f for f in drawn if len(f) > 89]  # never wraps
    assert all(re.match(r"[|/\\-] scan \[[#-]{20}\] \d/2 clusters", f) for f in drawn), drawn
    assert any(re.search(r"\| \d+/15 nodes probed \| [\d.]+ s \| .*east probe \d+/12", f)
               for f in drawn), drawn
    assert run.stderr.endswith(b"\r\x1b[K")  # taken off the screen at the end
    # the report command shows its step the same way
    report = on_terminals(["report", "--db", sqlite_url, "--out", str(harness.tmp / "r.html")],
                          columns=300)
    assert report.code == 0, report.stderr
    assert any(f.startswith("| report: rendering ") and f.endswith(" s") for f in
               frames(report.stderr)), report.stderr
    assert b"wrote " in report.stdout and b"\x1b" not in report.stdout


def test_log_lines_go_above_the_terminal_line() -> None:
    """A line logged while progress is drawn takes the line off, prints, then redraws it."""
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    with logs.configured(stream=tty), progress.session(tty, title="scan",
                                                       terminal=True) as shown, \
            shown.run(1, ["c1"]), shown.cluster("c1"):
        logging.getLogger("scanner.test").warning("careful")
    text = tty.getvalue()
    assert re.search(r"\r\x1b\[K\S+ \S+ WARNING scanner.test: careful\n\r[|/\\-] scan ", text), \
        text
    assert text.endswith("\r\x1b[K")


# --- 7. completion -----------------------------------------------------------------------------


def completion(shell: str) -> str:
    out = felixscan("completion", shell)
    assert out.code == 0, out.stderr
    return out.stdout


def bash_complete(script_path: Path, *words: str) -> list[str]:
    """Call the completion function as bash's programmable completion would."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c",
         f'source {script_path}; COMP_WORDS=({quoted}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); '
         '_felixscan; printf "%s\\n" "${COMPREPLY[@]}"'],
        capture_output=True, text=True, timeout=30, check=True)
    assert proc.stderr == "", proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_subcommands_options_and_values(tmp_path: Path) -> None:
    path = tmp_path / "felixscan.bash"
    path.write_text(completion("bash"))
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert bash_complete(path, "felixscan", "") == list(commands.choices)  # from the parser
    assert bash_complete(path, "felixscan", "sc") == ["scan"]
    assert bash_complete(path, "felixscan", "scan", "--fo") == ["--format"]
    assert bash_complete(path, "felixscan", "scan", "--format", "j") == ["json", "junit"]
    assert bash_complete(path, "felixscan", "scan", "--format", "=", "s") == ["sarif"]
    assert bash_complete(path, "felixscan", "-v", "--log-format", "json", "sc") == ["scan"]
    assert bash_complete(path, "felixscan", "scan", "--log-format", "") == ["text", "json"]
    assert bash_complete(path, "felixscan", "trend", "--format", "") == ["table", "csv", "json"]
    assert bash_complete(path, "felixscan", "db", "pr") == ["prune"]
    assert bash_complete(path, "felixscan", "db", "prune", "--k") == ["--keep-days"]
    assert bash_complete(path, "felixscan", "completion", "") == ["bash", "zsh"]
    assert bash_complete(path, "felixscan", "remediate", "--app") == ["--apply"]
    # a value is skipped, even one that looks like a subcommand
    assert "--json" in bash_complete(path, "felixscan", "scan", "--cluster", "db", "--")
    (tmp_path / "felixscan.yaml").write_text("clusters: []\n")
    assert bash_complete(path, "felixscan", "scan", "--config", str(tmp_path / "felixscan.y")) \
        == [str(tmp_path / "felixscan.yaml")]
    assert bash_complete(path, "felixscan", "scan", "--db", "") == []  # a URL: no guess


def test_completion_scripts_follow_the_parser() -> None:
    """Every subcommand and option of the parser is in both scripts."""
    parser = build_parser()
    bash, zsh = script(parser, "bash"), script(parser, "zsh")
    for flag in ("--log-format", "--keep-days", "--rollback", "--out-dir", "--pdf-variant"):
        assert flag in bash and flag in zsh
    assert "'db:manage the results database'" in zsh
    assert "'(--log-format)--log-format=[" in zsh and ":(text json)'" in zsh


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh (apt-get install zsh)")
def test_zsh_completion_parses_and_completes(tmp_path: Path) -> None:
    path = tmp_path / "_felixscan"
    path.write_text(completion("zsh"))
    check = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True,
                           timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    # A real interactive zsh on a pseudo-terminal: type, press TAB, then put `echo BUF:` in
    # front of what the line became (Ctrl-A) and run it, to read the completed line back.
    master, slave = _pty(120)
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.Popen(["zsh", "-f", "-i"], stdin=slave, stdout=slave, stderr=slave,
                            env={"PATH": os.environ["PATH"], "TERM": "xterm", "HOME": str(home)})
    os.close(slave)

    def until(pattern: str, timeout: float = 15) -> str:
        seen, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 65536)
                if re.search(pattern, seen.decode(errors="replace")):
                    return seen.decode(errors="replace")
        raise AssertionError(f"no {pattern!r} in {seen!r}")

    try:
        os.write(master, f"autoload -Uz compinit && compinit -u -D; source {path}; bindkey -e; "
                         "PS1='READY> '\n".encode())
        until("READY> ")
        for typed, expected in (("felixscan sc", "felixscan scan"),
                                ("felixscan scan --fo", "felixscan scan --format"),
                                ("felixscan db pr", "felixscan db prune"),
                                ("felixscan -v --log-format j", "felixscan -v --log-format json"),
                                ("felixscan completion z", "felixscan completion zsh")):
            os.write(master, typed.encode() + b"\t\x01echo BUF:\n")
            until(r"\nBUF:" + re.escape(expected))
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
