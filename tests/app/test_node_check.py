"""`felixscan node-check` as a user meets it: lines from a fake /proc (owners named, permission
denied, tables missing), flags and exit codes, and the real thing: this machine's /proc with a
socket we opened, a long-running process stopped by SIGTERM, and a reader that goes away."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scanner.app.cli import build_parser, main
from scanner.app.commands import COMMANDS, node_check, scan
from scanner.core.nodeview import NodeView, decode_line, encode_line
from scanner.nodecheck import take_view
from tests.helpers.paths import FIXTURES, ROOT

RECORDED = FIXTURES / "proc"
TCP = (RECORDED / "net" / "tcp").read_text(encoding="ascii")
TCP6 = (RECORDED / "net" / "tcp6").read_text(encoding="ascii")
NOBODY = 65534
# Recorded tables are little endian; on a big endian host they would read as other addresses.
pytestmark = pytest.mark.skipif(sys.byteorder != "little",
                                reason="recorded tables come from a little endian host")


# --- a fake /proc -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeProcess:
    comm: str | None = "calico-node"
    uid: int | None = 0  # written into status as "Uid: 0 uid uid uid"; None: no status file
    cmdline: bytes = b"calico-node\0-felix\0"
    fds: Mapping[int, str] = field(default_factory=dict)  # fd number -> link target


ProcBuilder = Callable[..., Path]


@pytest.fixture
def make_proc(tmp_path: Path) -> ProcBuilder:
    """Build a fake procfs: net/tcp and net/tcp6 (None: file absent) and pid directories whose
    fd/ holds symlinks like the kernel's (`socket:[INODE]`)."""

    def build(*, tcp: str | None = None, tcp6: str | None = None,
              processes: Mapping[int, FakeProcess] | None = None,
              root: Path | None = None) -> Path:
        proc = (root or tmp_path) / "proc"
        (proc / "net").mkdir(parents=True)
        if tcp is not None:
            (proc / "net" / "tcp").write_text(tcp, encoding="ascii")
        if tcp6 is not None:
            (proc / "net" / "tcp6").write_text(tcp6, encoding="ascii")
        # entries that are not pids must be ignored, as in the real /proc
        (proc / "self").mkdir()
        (proc / "sys").mkdir()
        for pid, process in (processes or {}).items():
            base = proc / str(pid)
            (base / "fd").mkdir(parents=True)
            if process.comm is not None:
                (base / "comm").write_text(process.comm + "\n", encoding="utf-8")
            if process.uid is not None:
                (base / "status").write_text(
                    f"Name:\t{process.comm}\nPid:\t{pid}\n"
                    f"Uid:\t0\t{process.uid}\t{process.uid}\t{process.uid}\n", encoding="utf-8")
            (base / "cmdline").write_bytes(process.cmdline)
            for fd, target in process.fds.items():
                os.symlink(target, base / "fd" / str(fd))
        return proc

    return build


def _once(capsys: pytest.CaptureFixture[str], *args: str) -> NodeView:
    assert main(["node-check", "--once", "--node", "n1", *args]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 1
    return decode_line(lines[0])


# --- fake /proc: tables -------------------------------------------------------------------------


def test_once_on_recorded_tables(capsys: pytest.CaptureFixture[str]) -> None:
    view = _once(capsys, "--proc", str(RECORDED))
    assert view.node == "n1"
    assert view.ports_checked == (9091,)
    assert [(item.address, item.inode) for item in view.listeners] == [
        ("0.0.0.0", 1001), ("2001:db8::10", 1106), ("::", 1101), ("::ffff:0.0.0.0", 1105)]
    assert view.complete
    assert view.malformed_lines == 7
    files = {read.name: read for read in view.files}
    assert (files["tcp"].status, files["tcp"].malformed_lines, files["tcp"].lines) == \
        ("ok", 5, 22)
    assert files["tcp6"].path == str(RECORDED / "net" / "tcp6")
    assert abs((view.time - view.time.now(view.time.tzinfo)).total_seconds()) < 60
    assert view.time.microsecond == 0


def test_ports_flag_repeatable_and_merged(capsys: pytest.CaptureFixture[str]) -> None:
    view = _once(capsys, "--proc", str(RECORDED), "--ports", "9099,9094", "--ports",
                 " 9093,9099")
    assert view.ports_checked == (9093, 9094, 9099)
    assert {item.port for item in view.listeners} == {9093, 9094, 9099}
    assert len(view.listeners) == 6


def test_missing_tcp6_is_recorded_not_an_error(make_proc: ProcBuilder,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    proc = make_proc(tcp=TCP)  # IPv6 disabled: no tcp6 file at all
    view = _once(capsys, "--proc", str(proc))
    files = {read.name: read for read in view.files}
    assert (files["tcp6"].status, files["tcp6"].error) == ("absent", None)
    assert view.complete
    assert [item.inode for item in view.listeners] == [1001]


def test_missing_tcp_makes_the_view_incomplete(make_proc: ProcBuilder,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    proc = make_proc(tcp6=TCP6)
    view = _once(capsys, "--proc", str(proc))
    files = {read.name: read for read in view.files}
    assert files["tcp"].status == "error"
    assert files["tcp"].error is not None and files["tcp"].error.startswith("ENOENT")
    assert not view.complete
    assert len(view.listeners) == 3  # what tcp6 showed is still reported


def test_unreadable_tcp_is_an_error(make_proc: ProcBuilder,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    proc = make_proc(tcp6=TCP6)
    (proc / "net" / "tcp").mkdir()  # EISDIR: an OSError that root cannot read past either
    view = _once(capsys, "--proc", str(proc))
    read = next(read for read in view.files if read.name == "tcp")
    assert read.status == "error" and read.error == "EISDIR: Is a directory"
    assert not view.complete


def test_proc_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    view = _once(capsys, "--proc", str(tmp_path / "nowhere"))
    assert not view.complete and view.listeners == ()


def test_non_ascii_bytes_are_malformed_lines(make_proc: ProcBuilder) -> None:
    proc = make_proc(tcp="")
    (proc / "net" / "tcp").write_bytes(TCP.encode() + "   99: \u00e9t\u00e9\n".encode())
    view = take_view(proc=proc, node="n", ports=[9091])
    assert view.malformed_lines == 6


# --- fake /proc: owners -------------------------------------------------------------------------


def test_owner_is_named_from_fd_links(make_proc: ProcBuilder) -> None:
    proc = make_proc(tcp=TCP, tcp6=TCP6, processes={
        1: FakeProcess(comm="systemd", fds={0: "/dev/null"}),
        # pipe:[1001] is not socket 1001
        90: FakeProcess(comm="other", fds={3: "pipe:[1001]", 4: "anon_inode:[eventpoll]"}),
        4242: FakeProcess(fds={0: "/dev/null", 7: "socket:[999]", 12: "socket:[1001]"}),
        4243: FakeProcess(comm="calico-node", fds={12: "socket:[1001]"}),  # forked: shares it
        5000: FakeProcess(comm="pushgateway", uid=65534, fds={3: "socket:[1101]"}),
    })
    view = take_view(proc=proc, node="n", ports=[9091])
    owners = {item.inode: item for item in view.listeners}
    felix = owners[1001]
    assert felix.process is not None and felix.process_note is None
    assert (felix.process.pid, felix.process.comm, felix.process.uid) == (4242, "calico-node", 0)
    push = owners[1101].process
    assert push is not None
    assert (push.pid, push.comm, push.uid) == (5000, "pushgateway", 65534)
    for inode in (1105, 1106):
        assert owners[inode].process is None
        note = owners[inode].process_note
        assert note is not None and "none of the 5 processes visible" in note
        assert "hostPID" in note


def test_command_lines_stay_out_of_the_log(make_proc: ProcBuilder,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A command line can carry a secret; the pod log is read by many. Name and uid only."""
    proc = make_proc(tcp=TCP, processes={
        4242: FakeProcess(comm="exporter", cmdline=b"/bin/exporter\0--password=hunter2\0",
                          fds={3: "socket:[1001]"})})
    assert main(["node-check", "--once", "--node", "n1", "--proc", str(proc)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "/bin/exporter" not in out
    listener = json.loads(out)["listeners"][0]
    assert listener["process"] == {"pid": 4242, "comm": "exporter", "uid": 0}


def test_no_processes_visible(make_proc: ProcBuilder) -> None:
    view = take_view(proc=make_proc(tcp=TCP), node="n", ports=[9091])
    assert view.listeners[0].process is None
    assert "none of the 0 processes" in (view.listeners[0].process_note or "")


def test_process_that_vanished_or_has_no_fds(make_proc: ProcBuilder) -> None:
    proc = make_proc(tcp=TCP, processes={
        10: FakeProcess(comm=None, uid=None, fds={5: "socket:[1001]"}),
    })
    (proc / "11").mkdir()  # a pid directory without fd/, like a zombie
    view = take_view(proc=proc, node="n", ports=[9091])
    process = view.listeners[0].process
    assert process is not None
    assert (process.pid, process.comm, process.uid) == (10, None, None)


def test_permission_denied_fd_table_is_reported(make_proc: ProcBuilder,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    proc = make_proc(tcp=TCP, processes={
        1: FakeProcess(comm="systemd", fds={0: "/dev/null"}),
        4242: FakeProcess(fds={12: "socket:[1001]"}),
    })
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        # what a non-root reader gets for a root process's fd directory
        if str(path) == str(proc / "4242" / "fd"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listener = take_view(proc=proc, node="n", ports=[9091]).listeners[0]
    assert listener.process is None
    assert listener.process_note == (
        f"process not named: the open files of 1 of 2 processes under {proc} could not be "
        "read (permission denied, expected when not root)")


def test_unlistable_proc_is_reported(make_proc: ProcBuilder,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    proc = make_proc(tcp=TCP)
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if str(path) == str(proc):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    note = take_view(proc=proc, node="n", ports=[9091]).listeners[0].process_note
    assert note == f"process not named: cannot list {proc}: EACCES: Permission denied"


def _as_nobody(work: Callable[[], str]) -> str:
    """Run `work` in a child that has dropped root (as a non-root pod runs), or here if we
    are not root already; returns what it returned."""
    if os.geteuid() != 0:
        return work()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must never return into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with os.fdopen(write_end, "w", encoding="utf-8") as pipe:
                pipe.write(work())
            code = 0
        except BaseException as exc:  # reported through the exit code and stderr
            sys.stderr.write(f"child failed: {exc!r}\n")
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as pipe:
        result = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return result


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    # tmp_path sits under a 0700 directory of root's that nobody cannot enter
    path = Path(tempfile.mkdtemp(prefix="nodecheck-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in path.rglob("*"):
            if sub.is_dir() and not sub.is_symlink():
                sub.chmod(0o755)
        shutil.rmtree(path)


def test_permission_denied_for_real_in_a_fake_proc(make_proc: ProcBuilder,
                                                   world_readable_dir: Path) -> None:
    proc = make_proc(tcp=TCP, root=world_readable_dir, processes={
        4242: FakeProcess(fds={12: "socket:[1001]"})})
    for path in [world_readable_dir, *world_readable_dir.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    (proc / "4242" / "fd").chmod(0o000)
    view = decode_line(_as_nobody(
        lambda: encode_line(take_view(proc=proc, node="n", ports=[9091]))))
    assert view.listeners[0].process is None
    assert "permission denied" in (view.listeners[0].process_note or "")


# --- the real /proc -----------------------------------------------------------------------------


def _listening(family: socket.AddressFamily, address: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                            0 if address.startswith("::ffff:") else 1)
        sock.bind((address, 0))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "NODE_NAME"}
    return {**env, **extra}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "scanner", "node-check", *args]


def test_finds_a_real_listening_socket_with_its_inode() -> None:
    sockets = {"IPv4": _listening(socket.AF_INET, "127.0.0.1")}
    try:
        sockets["IPv6"] = _listening(socket.AF_INET6, "::1")
        sockets["mapped"] = _listening(socket.AF_INET6, "::ffff:127.0.0.1")
    except OSError:
        pass  # no IPv6 on this machine: the IPv4 socket is still checked
    # a connection to the IPv4 listener puts ESTABLISHED rows on its port, which must not count
    client = socket.create_connection(sockets["IPv4"].getsockname()[:2], timeout=5)
    server_side, _ = sockets["IPv4"].accept()
    try:
        ports = {kind: sock.getsockname()[1] for kind, sock in sockets.items()}
        done = subprocess.run(
            _command("--once", "--node", "n1", "--ports", ",".join(map(str, ports.values()))),
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False)
        assert (done.returncode, done.stderr) == (0, "")
        view = decode_line(done.stdout.strip())
        assert view.node == "n1" and view.complete
        comm = Path("/proc/self/comm").read_text().strip()
        for kind, sock in sockets.items():
            found = [item for item in view.listeners if item.port == ports[kind]]
            assert len(found) == 1, (kind, view.listeners)
            listener = found[0]
            assert listener.inode == os.fstat(sock.fileno()).st_ino
            assert listener.uid == os.geteuid()
            assert listener.loopback and not listener.wildcard
            # the test process holds the socket and is readable by the same user
            assert listener.process is not None, listener.process_note
            assert (listener.process.pid, listener.process.comm, listener.process.uid) == \
                (os.getpid(), comm, os.geteuid())
            expected = {"IPv4": ("127.0.0.1", "IPv4", None),
                        "IPv6": ("::1", "IPv6", None),
                        "mapped": ("::ffff:127.0.0.1", "IPv6", "127.0.0.1")}[kind]
            assert (listener.address, listener.family, listener.ipv4_mapped) == expected
    finally:
        for sock in (client, server_side, *sockets.values()):
            sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_non_root_reader_sees_the_socket_but_not_its_root_owner() -> None:
    sock = _listening(socket.AF_INET, "127.0.0.1")
    port = sock.getsockname()[1]

    def work() -> str:
        sock.close()  # the forked child's copy: only the root parent may hold it
        return encode_line(take_view(proc=Path("/proc"), node="n", ports=[port]))

    try:
        view = decode_line(_as_nobody(work))
        (listener,) = view.listeners
        assert listener.inode == os.fstat(sock.fileno()).st_ino
        assert listener.process is None
        assert "permission denied" in (listener.process_note or "")
    finally:
        sock.close()


# --- a long-running process ---------------------------------------------------------------------


class _Lines:
    """Lines of a child's stdout, read by a thread so that the test can wait with a timeout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout
        self._thread = threading.Thread(target=self._pump, args=(stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stdout: Any) -> None:
        for line in stdout:
            self._queue.put(line)

    def next(self, timeout: float = 30) -> str:
        return self._queue.get(timeout=timeout)


@pytest.fixture
def start() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def launch(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(_command(*args), cwd=ROOT, env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        return process

    yield launch
    for process in started:  # only if a test failed before stopping its own
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_interval_prints_lines_until_sigterm(start: Callable[..., subprocess.Popen[str]]
                                             ) -> None:
    process = start("--interval", "0.2", "--node", "n1", "--proc", str(RECORDED))
    lines = _Lines(process)
    views = [decode_line(lines.next()) for _ in range(3)]
    assert all(view.listeners == views[0].listeners for view in views)
    assert views[0].time <= views[1].time <= views[2].time
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert process.stderr is not None and process.stderr.read() == ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_ends_a_long_wait_at_once(start: Callable[..., subprocess.Popen[str]],
                                              signum: signal.Signals) -> None:
    process = start("--interval", "3600", "--node", "n1", "--proc", str(RECORDED))
    json.loads(_Lines(process).next())
    began = time.monotonic()
    process.send_signal(signum)
    assert process.wait(timeout=20) == 0
    assert time.monotonic() - began < 10
    assert process.stderr is not None and process.stderr.read() == ""


def test_closed_output_exits_1(start: Callable[..., subprocess.Popen[str]]) -> None:
    process = start("--interval", "0.05", "--node", "n1", "--proc", str(RECORDED))
    assert process.stdout is not None and process.stderr is not None
    json.loads(process.stdout.readline())
    process.stdout.close()
    assert process.wait(timeout=20) == 1
    assert process.stderr.read() == "felixscan node-check: output closed\n"


# --- flags and exit codes -----------------------------------------------------------------------


@pytest.mark.parametrize("ports", ["0", "65536", "abc", "9091,", "9091,,9093", "-1", "",
                                   "9091;9093", "1e3", "\u0663"])
def test_bad_ports_exit_2(ports: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["node-check", "--once", "--node", "n1", f"--ports={ports}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "argument --ports:" in err
    assert "1-65535" in err


@pytest.mark.parametrize("interval", ["0", "-1", "-0", "nan", "inf", "soon"])
def test_bad_interval_exits_2(interval: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["node-check", "--node", "n1", f"--interval={interval}"])
    assert caught.value.code == 2
    assert "argument --interval:" in capsys.readouterr().err


def test_no_node_name_exits_2(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert main(["node-check", "--once", "--proc", str(RECORDED)]) == 2
    monkeypatch.setenv("NODE_NAME", " ")
    assert main(["node-check", "--once", "--proc", str(RECORDED)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("felixscan: configuration error: no node name: pass --node NAME or set "
                     "NODE_NAME") == 2


def test_node_name_from_environment(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NODE_NAME", "from-downward-api")
    assert main(["node-check", "--once", "--proc", str(RECORDED)]) == 0
    assert decode_line(capsys.readouterr().out).node == "from-downward-api"
    assert _once(capsys, "--proc", str(RECORDED)).node == "n1"  # --node wins


def test_exit_codes_of_the_real_process() -> None:
    no_node = subprocess.run(_command("--once"), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=60, check=False)
    assert (no_node.returncode, no_node.stdout) == (2, "")
    assert "no node name" in no_node.stderr
    bad = subprocess.run(_command("--once", "--ports", "70000"), cwd=ROOT,
                         env=_env(NODE_NAME="n1"), capture_output=True, text=True, timeout=60,
                         check=False)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert "port 70000 is out of range 1-65535" in bad.stderr


def test_is_a_felixscan_command_listed_after_scan() -> None:
    assert COMMANDS.index(node_check) == COMMANDS.index(scan) + 1
    text = build_parser().format_help()
    assert "node-check" in text


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["node-check", "--help"])
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--ports", "--interval", "--once", "--node", "--proc", "NODE_NAME",
                 "hostNetwork", "Exit codes"):
        assert flag in text
    assert node_check.EXIT_CODES in text


def test_docs_name_every_flag_and_show_a_valid_line() -> None:
    doc = (ROOT / "docs" / "node-check.md").read_text()
    for words in ("--ports", "--interval", "--once", "--node", "--proc", "NODE_NAME",
                  "privileged", "hostPID", "kubectl apply -k deploy/overlays/node-check"):
        assert words in doc, words
    (example,) = [line for line in doc.splitlines() if line.startswith('{"schema":')]
    view = decode_line(example)
    assert (view.schema, view.schema_version) == ("felixscan.node-view", "1.0")
    line = json.loads(example)
    for key in line:  # every field is in the table
        assert f"`{key}`" in doc, key
    for key in [*line["listeners"][0], "pid", "comm"]:
        assert f"`{key}`" in doc or f"`listeners[].{key}`" in doc or f'"{key}"' in doc, key
