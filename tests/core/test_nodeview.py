"""scanner.core.nodeview: /proc/net/tcp{,6} parsing on recorded tables (every state, mapped,
wildcard and loopback binds, malformed lines, both byte orders) and the JSON line: round trip,
validation, and picking the latest view out of a pod log."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest

from scanner.core.errors import FelixscanError
from scanner.core.nodeview import (
    SCHEMA,
    SCHEMA_VERSION,
    FileRead,
    Listener,
    MalformedLine,
    NodeView,
    NodeViewError,
    Ownership,
    ProcessInfo,
    TableScan,
    TcpState,
    address_facts,
    build_view,
    decode_ipv4,
    decode_ipv6,
    decode_line,
    decode_port,
    encode_line,
    latest_view,
    parse_socket_line,
    scan_table,
    status_uid,
    view_to_dict,
)
from tests.helpers.paths import FIXTURES

CALICO_PORTS = (9091, 9093, 9094, 9099)
TCP = (FIXTURES / "proc" / "net" / "tcp").read_text(encoding="ascii")
TCP6 = (FIXTURES / "proc" / "net" / "tcp6").read_text(encoding="ascii")


def _summary(scan: TableScan) -> set[tuple[str, int, int]]:
    return {(str(row.local_address), row.local_port, row.inode) for row in scan.rows}


# --- addresses and byte order -------------------------------------------------------------------


def test_ipv4_is_host_order_words_on_little_endian() -> None:
    # the kernel printed the network-order bytes 7F 00 00 01 as a little-endian u32
    assert decode_ipv4("0100007F", byteorder="little") == IPv4Address("127.0.0.1")
    assert decode_ipv4("0500000A", byteorder="little") == IPv4Address("10.0.0.5")
    assert decode_ipv4("1401A8C0", byteorder="little") == IPv4Address("192.168.1.20")


def test_ipv4_on_big_endian_host() -> None:
    assert decode_ipv4("7F000001", byteorder="big") == IPv4Address("127.0.0.1")
    assert decode_ipv4("C0A80114", byteorder="big") == IPv4Address("192.168.1.20")


def test_ipv6_is_four_host_order_words() -> None:
    assert decode_ipv6("00000000000000000000000001000000", byteorder="little") == \
        IPv6Address("::1")
    assert decode_ipv6("B80D0120000000000000000010000000", byteorder="little") == \
        IPv6Address("2001:db8::10")
    assert decode_ipv6("0000000000000000FFFF00000500000A", byteorder="little") == \
        IPv6Address("::ffff:10.0.0.5")
    assert decode_ipv6("20010DB8000000000000000000000010", byteorder="big") == \
        IPv6Address("2001:db8::10")
    assert decode_ipv6("00000000000000000000000000000001", byteorder="big") == \
        IPv6Address("::1")


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("address", ["0.0.0.0", "127.0.0.1", "10.1.2.3", "255.254.253.252",
                                     "::", "::1", "fe80::1:2:3:4", "::ffff:192.0.2.7",
                                     "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff"])
def test_decode_inverts_what_the_kernel_prints(address: str, byteorder: Any) -> None:
    # what %08X of each host-order 32-bit word prints, written out independently of nodeview
    expected = ip_address(address)
    packed = expected.packed
    text = "".join(f"{int.from_bytes(packed[i:i + 4], byteorder):08X}"
                   for i in range(0, len(packed), 4))
    decode = decode_ipv4 if expected.version == 4 else decode_ipv6
    assert decode(text, byteorder=byteorder) == expected


def test_port_is_big_endian_hex() -> None:
    assert decode_port("2383") == 9091
    assert decode_port("238B") == 9099
    assert decode_port("0016") == 22


@pytest.mark.parametrize("text", ["0x00007F", "+100007F", "0100007", "0100007F0", "0100_07F",
                                  " 100007F", "0100007G"])
def test_ipv4_rejects_what_is_not_8_hex_digits(text: str) -> None:
    with pytest.raises(MalformedLine):
        decode_ipv4(text)


def test_address_facts() -> None:
    mapped = address_facts(IPv6Address("::ffff:10.0.0.5"))
    assert mapped.text == "::ffff:10.0.0.5"  # not Python 3.11's "::ffff:a00:5"
    assert mapped.ipv4_mapped == "10.0.0.5"
    assert not mapped.wildcard and not mapped.loopback
    assert address_facts(IPv6Address("::ffff:127.0.0.1")).loopback
    assert address_facts(IPv6Address("::ffff:0.0.0.0")).wildcard
    assert address_facts(IPv4Address("0.0.0.0")).wildcard
    assert address_facts(IPv6Address("::")).wildcard
    assert address_facts(IPv4Address("127.0.0.53")).loopback
    assert address_facts(IPv6Address("::1")).loopback
    plain = address_facts(IPv6Address("2001:db8::10"))
    assert (plain.wildcard, plain.loopback, plain.ipv4_mapped) == (False, False, None)


# --- lines and tables ---------------------------------------------------------------------------


def test_every_state_code_is_parsed() -> None:
    rows = []
    for line in TCP.splitlines()[1:]:
        try:
            rows.append(parse_socket_line(line, family="IPv4", byteorder="little"))
        except MalformedLine:
            continue
    assert {row.state for row in rows} == {state.value for state in TcpState}
    assert {row.state_name for row in rows} == {state.name for state in TcpState}
    assert [row.listening for row in rows].count(True) == 5  # only the 0A rows


def test_one_line_in_full() -> None:
    row = parse_socket_line(
        "   6: 0500000A:A028 0700000A:2383 01 00000000:00000000 00:00000000 00000000  1000"
        "        0 2002 1 0000000000000000 100 0 0 10 0", family="IPv4", byteorder="little")
    assert (row.local_address, row.local_port) == (IPv4Address("10.0.0.5"), 41000)
    assert (row.remote_address, row.remote_port) == (IPv4Address("10.0.0.7"), 9091)
    assert (row.state_name, row.uid, row.inode) == ("ESTABLISHED", 1000, 2002)


def test_only_listen_sockets_on_checked_ports_count() -> None:
    scan = scan_table(TCP.splitlines(), family="IPv4", ports=CALICO_PORTS, byteorder="little")
    assert _summary(scan) == {("0.0.0.0", 9091, 1001), ("127.0.0.1", 9099, 1002),
                              ("10.0.0.5", 9093, 1003), ("192.168.1.20", 9094, 1004)}
    # the ESTABLISHED, TIME_WAIT, CLOSE_WAIT... rows on local port 9091 and the client
    # connection to a remote 9091 are all in the table, and none of them counts
    assert not {row.inode for row in scan.rows} & {2001, 2002, 2003, 2008, 2009, 2010, 2011}


def test_default_port_only() -> None:
    scan = scan_table(TCP.splitlines(), family="IPv4", ports=[9091], byteorder="little")
    assert _summary(scan) == {("0.0.0.0", 9091, 1001)}


def test_malformed_lines_are_skipped_and_counted() -> None:
    scan = scan_table(TCP.splitlines(), family="IPv4", ports=CALICO_PORTS, byteorder="little")
    # 17 good rows; short line, bad hex, IPv6-width address, bad inode, free text
    assert (scan.lines, scan.malformed_lines) == (22, 5)
    scan6 = scan_table(TCP6.splitlines(), family="IPv6", ports=CALICO_PORTS,
                       byteorder="little")
    assert (scan6.lines, scan6.malformed_lines) == (13, 2)  # IPv4 width, 31 digits


def test_header_and_blank_lines_are_not_data() -> None:
    scan = scan_table(["", TCP.splitlines()[0], "   ", "\n"], family="IPv4", ports=[9091])
    assert (scan.lines, scan.malformed_lines, scan.rows) == (0, 0, ())


def test_unknown_state_is_not_malformed_and_not_listening() -> None:
    line = ("   0: 00000000:2383 00000000:0000 0D 00000000:00000000 00:00000000 00000000"
            "     0        0 77 1 0000000000000000 100 0 0 10 0")
    assert parse_socket_line(line, family="IPv4").state_name == "UNKNOWN_0D"
    scan = scan_table([line], family="IPv4", ports=[9091])
    assert (scan.rows, scan.malformed_lines) == ((), 0)


def test_ipv6_table() -> None:
    scan = scan_table(TCP6.splitlines(), family="IPv6", ports=CALICO_PORTS, byteorder="little")
    found = {(row.local_address, row.local_port, row.inode) for row in scan.rows}
    assert found == {
        (IPv6Address("::"), 9091, 1101), (IPv6Address("::1"), 9099, 1102),
        (IPv6Address("::ffff:10.0.0.5"), 9093, 1103),
        (IPv6Address("::ffff:127.0.0.1"), 9094, 1104),
        (IPv6Address("::ffff:0.0.0.0"), 9091, 1105), (IPv6Address("2001:db8::10"), 9091, 1106)}
    assert all(row.family == "IPv6" for row in scan.rows)  # fe80::1:8080 is not checked


def test_listeners_flags_from_recorded_tables() -> None:
    scan = scan_table(TCP.splitlines(), family="IPv4", ports=CALICO_PORTS, byteorder="little")
    scan6 = scan_table(TCP6.splitlines(), family="IPv6", ports=CALICO_PORTS, byteorder="little")
    files = [(FileRead.from_scan(name="tcp", path="/proc/net/tcp", status="ok", error=None,
                                 scan=scan), scan),
             (FileRead.from_scan(name="tcp6", path="/proc/net/tcp6", status="ok", error=None,
                                 scan=scan6), scan6)]
    view = build_view(node="n1", time=datetime(2026, 11, 29, 15, 0, tzinfo=UTC),
                      ports=[9099, 9091, 9093, 9094, 9091], files=files, owners={})
    flags = {(item.address, item.port): (item.family, item.wildcard, item.loopback,
                                         item.ipv4_mapped)
             for item in view.listeners}
    assert flags == {
        ("0.0.0.0", 9091): ("IPv4", True, False, None),
        ("127.0.0.1", 9099): ("IPv4", False, True, None),
        ("10.0.0.5", 9093): ("IPv4", False, False, None),
        ("192.168.1.20", 9094): ("IPv4", False, False, None),
        ("::", 9091): ("IPv6", True, False, None),
        ("::1", 9099): ("IPv6", False, True, None),
        ("::ffff:10.0.0.5", 9093): ("IPv6", False, False, "10.0.0.5"),
        ("::ffff:127.0.0.1", 9094): ("IPv6", False, True, "127.0.0.1"),
        ("::ffff:0.0.0.0", 9091): ("IPv6", True, False, "0.0.0.0"),
        ("2001:db8::10", 9091): ("IPv6", False, False, None),
    }
    assert view.ports_checked == (9091, 9093, 9094, 9099)
    assert view.malformed_lines == 7
    assert view.complete
    assert [item.port for item in view.listeners] == sorted(item.port for item in view.listeners)
    uid = {item.inode: item.uid for item in view.listeners}
    assert uid[1003] == 999
    assert all(item.process is None and item.process_note for item in view.listeners)


def _read(name: str, status: Any = "ok", lines: int = 0, malformed: int = 0) -> FileRead:
    return FileRead(name=name, path=f"/proc/net/{name}", status=status,
                    error=None if status != "error" else "EACCES: Permission denied",
                    lines=lines, malformed_lines=malformed)


def test_incomplete_when_a_required_table_failed() -> None:
    empty = TableScan(rows=(), lines=0, malformed_lines=0)
    ok = build_view(node="n", time=datetime.now(UTC), ports=[9091], owners={},
                    files=[(_read("tcp"), empty), (_read("tcp6", "absent"), empty)])
    assert ok.complete
    failed = build_view(node="n", time=datetime.now(UTC), ports=[9091], owners={},
                        files=[(_read("tcp", "error"), empty), (_read("tcp6"), empty)])
    assert not failed.complete


# --- the JSON line ------------------------------------------------------------------------------


def _view(**changes: Any) -> NodeView:
    felix = ProcessInfo(pid=4242, comm="calico-node", uid=0)
    listeners = (
        Listener(address="0.0.0.0", port=9091, family="IPv4", inode=1001, uid=0, wildcard=True,
                 loopback=False, ipv4_mapped=None, process=felix, process_note=None),
        Listener(address="::ffff:10.0.0.5", port=9093, family="IPv6", inode=1103, uid=0,
                 wildcard=False, loopback=False, ipv4_mapped="10.0.0.5", process=None,
                 process_note="process not named: permission denied"),
        Listener(address="::1", port=9099, family="IPv6", inode=1102, uid=0, wildcard=False,
                 loopback=True, ipv4_mapped=None,
                 process=ProcessInfo(pid=7, comm=None, uid=None), process_note=None),
    )
    view = NodeView(node="worker-1", time=datetime(2026, 11, 29, 15, 27, 3, tzinfo=UTC),
                    ports_checked=(9091, 9093, 9099), listeners=listeners,
                    files=(_read("tcp", lines=20, malformed=1), _read("tcp6", "absent")),
                    malformed_lines=1, complete=True)
    return replace(view, **changes)


def test_round_trip() -> None:
    view = _view()
    line = encode_line(view)
    assert "\n" not in line
    assert decode_line(line) == view


def test_round_trip_keeps_microseconds_and_empty_listeners() -> None:
    view = _view(time=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), listeners=())
    assert decode_line(encode_line(view)) == view


def test_line_layout() -> None:
    data = json.loads(encode_line(_view()))
    assert (data["schema"], data["schema_version"]) == ("felixscan.node-view", "1.0")
    assert (SCHEMA, SCHEMA_VERSION) == ("felixscan.node-view", "1.0")
    assert data["time"] == "2026-11-29T15:27:03Z"
    assert data["node"] == "worker-1"
    assert data["ports_checked"] == [9091, 9093, 9099]
    assert data["files"]["tcp6"] == {"path": "/proc/net/tcp6", "status": "absent",
                                     "error": None, "lines": 0, "malformed_lines": 0}
    assert data["listeners"][0] == {
        "address": "0.0.0.0", "port": 9091, "family": "IPv4", "inode": 1001, "uid": 0,
        "wildcard": True, "loopback": False, "ipv4_mapped": None,
        "process": {"pid": 4242, "comm": "calico-node", "uid": 0},
        "process_note": None}
    assert data["listeners"][1]["process"] is None
    assert data["listeners"][1]["process_note"].startswith("process not named")


def test_a_process_is_named_but_its_command_line_never_written() -> None:
    # Arguments can hold passwords and tokens, and the line goes to a pod log.
    process = json.loads(encode_line(_view()))["listeners"][0]["process"]
    assert set(process) == {"pid", "comm", "uid"}
    assert "cmdline" not in {f.name for f in fields(ProcessInfo)}


STATUS = """Name:\tcalico-node
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Pid:\t4242
PPid:\t4200
Uid:\t1000\t0\t0\t0
Gid:\t0\t0\t0\t0
"""


def test_status_uid_is_the_effective_uid() -> None:
    assert status_uid(STATUS) == 0
    assert status_uid(STATUS.replace("1000\t0\t0\t0", "0\t10001\t10001\t10001")) == 10001


@pytest.mark.parametrize("text", ["", "Name:\tx\n", "Uid:\t1 2 3\n", "Uid:\ta b c d\n",
                                  "Uid:\t1 -2 3 4\n", "Uid:\t\u0663 1 1 1\n"])
def test_status_uid_unknown(text: str) -> None:
    assert status_uid(text) is None


def test_time_in_another_zone_is_written_in_utc() -> None:
    local = datetime(2026, 11, 29, 17, 27, 3, tzinfo=timezone(timedelta(hours=2)))
    assert json.loads(encode_line(_view(time=local)))["time"] == "2026-11-29T15:27:03Z"
    decoded = decode_line(encode_line(_view(time=local)))
    assert decoded.time == local and decoded.time.tzinfo == UTC


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _view(time=datetime(2026, 1, 1))


def test_view_is_immutable() -> None:
    view = _view()
    with pytest.raises(AttributeError):
        view.node = "other"  # type: ignore[misc]
    assert isinstance(view.listeners, tuple)


def _mutated(change: Any) -> str:
    data = view_to_dict(_view())
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: d.update(schema="felixscan.scan-result"), "schema"),
    (lambda d: d.update(schema_version="2.0"), "schema_version"),
    (lambda d: d.update(schema_version="1"), "schema_version"),
    (lambda d: d.update(schema_version="one.zero"), "schema_version"),
    (lambda d: d.update(schema_version=1.0), "schema_version"),
    (lambda d: d.pop("schema"), "schema"),
    (lambda d: d.pop("schema_version"), "schema_version"),
    (lambda d: d.pop("node"), "node"),
    (lambda d: d.pop("time"), "time"),
    (lambda d: d.pop("ports_checked"), "ports_checked"),
    (lambda d: d.pop("listeners"), "listeners"),
    (lambda d: d.pop("files"), "files"),
    (lambda d: d.pop("malformed_lines"), "malformed_lines"),
    (lambda d: d.pop("complete"), "complete"),
    (lambda d: d.update(node="  "), "node"),
    (lambda d: d.update(time="yesterday"), "time"),
    (lambda d: d.update(time="2026-11-29T15:27:03"), "time"),
    (lambda d: d.update(complete="yes"), "complete"),
    (lambda d: d.update(malformed_lines=-1), "malformed_lines"),
    (lambda d: d.update(malformed_lines=True), "malformed_lines"),
    (lambda d: d.update(ports_checked=[9091, 0]), "ports_checked[1]"),
    (lambda d: d.update(ports_checked=["9091"]), "ports_checked[0]"),
    (lambda d: d.update(listeners={}), "listeners"),
    (lambda d: d["listeners"].append("x"), "listeners[3]"),
    (lambda d: d["listeners"][0].pop("inode"), "listeners[0].inode"),
    (lambda d: d["listeners"][0].pop("process"), "listeners[0].process"),
    (lambda d: d["listeners"][0].update(port=70000), "listeners[0].port"),
    (lambda d: d["listeners"][0].update(port=True), "listeners[0].port"),
    (lambda d: d["listeners"][0].update(inode=-5), "listeners[0].inode"),
    (lambda d: d["listeners"][0].update(family="IPv5"), "listeners[0].family"),
    (lambda d: d["listeners"][0].update(family="IPv6"), "listeners[0].address"),
    (lambda d: d["listeners"][0].update(address="localhost"), "listeners[0].address"),
    (lambda d: d["listeners"][0].update(wildcard=1), "listeners[0].wildcard"),
    (lambda d: d["listeners"][1].update(ipv4_mapped="10.0.0.6"), "listeners[1].ipv4_mapped"),
    (lambda d: d["listeners"][0].update(process={"pid": 0}), "listeners[0].process.pid"),
    (lambda d: d["listeners"][0]["process"].update(uid=-1), "listeners[0].process.uid"),
    (lambda d: d["listeners"][0]["process"].update(uid="0"), "listeners[0].process.uid"),
    (lambda d: d["listeners"][0]["process"].pop("uid"), "listeners[0].process.uid"),
    (lambda d: d["listeners"][0]["process"].pop("comm"), "listeners[0].process.comm"),
    (lambda d: d["files"]["tcp"].update(status="fine"), "files.tcp.status"),
    (lambda d: d["files"]["tcp"].pop("path"), "files.tcp.path"),
    (lambda d: d["files"].update(tcp=[]), "files.tcp"),
])
def test_invalid_lines_name_the_field(change: Any, field: str) -> None:
    with pytest.raises(NodeViewError) as caught:
        decode_line(_mutated(change))
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ": ")
    # a ValueError for callers that parse, and one of ours for the CLI's error handling
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, FelixscanError)


@pytest.mark.parametrize("line", ["", "not json", "[]", '"a string"', "null", "{",
                                  '{"schema": NaN}', "x" * 1_000_001])
def test_not_a_view_at_all(line: str) -> None:
    with pytest.raises(NodeViewError):
        decode_line(line)


def test_a_newer_minor_version_with_more_fields_is_read() -> None:
    def newer(data: dict[str, Any]) -> None:
        data.update(schema_version="1.3", kernel="6.8.0")
        data["listeners"][0]["netns"] = "host"

    view = decode_line(_mutated(newer))
    assert view.schema_version == "1.3"
    assert view.listeners == _view().listeners


# --- latest_view --------------------------------------------------------------------------------


def test_latest_view_takes_the_last_valid_line() -> None:
    first = encode_line(_view(node="n1"))
    last = encode_line(_view(node="n1", time=datetime(2026, 11, 29, 15, 28, 3, tzinfo=UTC),
                             listeners=()))
    log = "\n".join([
        "starting node-check",
        first,
        "Traceback (most recent call last):",
        '{"schema": "felixscan.node-view", "oops": true}',
        last,
        '{"schema": "something.else", "schema_version": "1.0"}',
        json.dumps({**view_to_dict(_view()), "schema_version": "9.0"}),
        last[: len(last) // 2],  # cut by log rotation
        "",
        "   ",
    ])
    view = latest_view(log)
    assert view is not None
    assert view == decode_line(last)
    assert view.listeners == ()


def test_latest_view_reads_lines_with_kubelet_timestamps() -> None:
    line = encode_line(_view())
    log = (f"2026-11-29T15:27:03.123456789Z {line}\n"
           f"2026-11-29T15:27:04.000000001Z some noise\r\n")
    assert latest_view(log) == _view()


def test_latest_view_none() -> None:
    assert latest_view("") is None
    assert latest_view("hello\nworld\n{}\n{not json}\n") is None
    assert latest_view("a {b} " + encode_line(_view())) is None  # more than one prefix token


def test_owner_mapping_is_used() -> None:
    scan = scan_table(TCP.splitlines(), family="IPv4", ports=[9091], byteorder="little")
    felix = Ownership(process=ProcessInfo(pid=1, comm="calico-node", uid=0), note=None)
    view = build_view(node="n", time=datetime.now(UTC), ports=[9091],
                      files=[(_read("tcp"), scan)], owners={1001: felix})
    assert view.listeners[0].process == felix.process
    assert view.listeners[0].process_note is None
