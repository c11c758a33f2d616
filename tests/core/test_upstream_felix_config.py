"""Upstream felix/config and go-ini test tables run against scanner.core.felix_params.

The case data lives in tests/upstream/felix_config_cases.py (carried over from
projectcalico/calico and go-ini/ini, commits there); the own cases at the end
pin Go behaviours the upstream tables do not cover.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from scanner.core import felix_params as fp
from scanner.core.felix_params import (
    DEFAULT_PORT,
    ConfigFileError,
    load_config_file,
    parse_bool,
    parse_client_auth,
    parse_host,
    parse_port,
    parse_value,
)
from tests.upstream import felix_config_cases as cases


def _id(case: dict[str, Any]) -> str:
    return f"{case.get('line')}-{case.get('entry') or case.get('test')}"


def _resolve(field: str, tag: str, raw: str) -> tuple[object, bool]:
    return fp._resolve_value(fp._param_for_tag(field, tag), raw)


def _same(actual: object, expected: object) -> bool:
    # bool is an int in Python: compare types too, as Gomega's Equal does.
    return type(actual) is type(expected) and actual == expected


# ---------------------------------------------------------------------------
# felix/config/config_params_test.go
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases.PARAM_CASES, ids=_id)
def test_config_parsing(case: dict[str, Any]) -> None:
    """felix/config/config_params.go: Config.resolve (none -> zero value, parse
    failure -> default) over param_types.go: BoolParam.Parse, BoolPtrParam.Parse,
    IntParam.Parse, RegexpParam.Parse, OneofListParam.Parse; cases from
    felix/config/config_params_test.go ("Config parsing" and friends)."""
    value, valid = _resolve(case["field"], case["tag"], case["raw"])
    assert _same(value, case["expected"]), (value, case["expected"])
    if case["error_expected"]:
        assert not valid
    assert valid is case["valid"]


PROMETHEUS_CASES = [c for c in cases.PARAM_CASES if c["field"].startswith("PrometheusMetrics")]


@pytest.mark.parametrize("case", PROMETHEUS_CASES, ids=_id)
def test_config_parsing_prometheus_public_api(case: dict[str, Any]) -> None:
    """felix/config/config_params.go: Config.resolve for the PrometheusMetrics*
    fields, through the public parse_value and the per-kind parsers
    (param_types.go: BoolParam.Parse, IntParam.Parse, RegexpParam.Parse)."""
    value, valid = parse_value(case["field"].lower(), case["raw"])
    assert _same(value, case["expected"])
    assert valid is case["valid"]
    per_kind = {
        "PrometheusMetricsEnabled": parse_bool,
        "PrometheusMetricsPort": parse_port,
        "PrometheusMetricsHost": parse_host,
    }[case["field"]]
    assert per_kind(case["raw"]) == (case["expected"], case["valid"])


def test_prometheus_tags_match_upstream() -> None:
    """felix/config/config_params.go: the PrometheusMetrics* struct tags the port
    builds its parameters from (master; v3.32.x differs only in ClientAuth's
    default)."""
    assert fp._PROMETHEUS_TAGS == {
        "PrometheusMetricsEnabled": "bool;false",
        "PrometheusMetricsHost": "host-address;",
        "PrometheusMetricsPort": "int(0:65535);9091",
        "PrometheusMetricsCAFile": "string;",
        "PrometheusMetricsCertFile": "string;",
        "PrometheusMetricsKeyFile": "string;",
        "PrometheusMetricsClientAuth": "oneof(RequireAndVerifyClientCert,RequireAnyClientCert,"
        "VerifyClientCertIfGiven,NoClientCert);NoClientCert",
    }


@pytest.mark.parametrize("case", cases.DEFAULT_CASES, ids=_id)
def test_tag_defaults(case: dict[str, Any]) -> None:
    """felix/config/config_params.go: loadParams (the default is the tag's default
    string run through Param.Parse)."""
    assert fp._param_for_tag(case["field"], case["tag"]).default == case["expected"]


@pytest.mark.parametrize(
    ("line", "entry", "raw", "ipip", "noencap"), cases.PROGRAM_CLUSTER_ROUTES_CASES
)
def test_program_cluster_routes(line: int, entry: str, raw: str, ipip: bool, noencap: bool) -> None:
    """felix/config/param_types.go: OneofListParam.Parse (case-insensitive, canonical
    spelling back), as config_params.go: ProgramIPIPClusterRoutes and
    ProgramNoEncapClusterRoutes read it."""
    value, valid = _resolve("ProgramClusterRoutes", cases.PROGRAM_CLUSTER_ROUTES_TAG, raw)
    assert valid
    assert (value in ("Enabled", "EnabledIPIPOnly")) is ipip
    assert (value in ("Enabled", "EnabledNoEncapOnly")) is noencap


@pytest.mark.parametrize(("line", "entry", "raw", "active"), cases.METADATA_PORT_CASES)
def test_metadata_port_openstack_heuristic(line: int, entry: str, raw: str, active: bool) -> None:
    """felix/config/config_params.go: Config.resolve ("none" -> zero value) and
    param_types.go: IntParam.Parse for MetadataPort int(0:65535), as
    Config.OpenstackActive reads it (port != 0 and != 8775)."""
    value, valid = _resolve("MetadataPort", cases.METADATA_PORT_TAG, raw)
    assert valid
    assert isinstance(value, int)
    assert (value not in (0, 8775)) is active


@pytest.mark.parametrize(
    ("line", "entry", "field", "tag", "ranges", "default_str", "flags"),
    cases.PARAM_FOR_FIELD_CASES,
)
def test_param_for_field(
    line: int,
    entry: str,
    field: str,
    tag: str,
    ranges: list[tuple[int, int]],
    default_str: str,
    flags: str,
) -> None:
    """felix/config/config_params.go: ParamForField (metaRegexp, int ranges via
    mustParseOptionalInt)."""
    param = fp._param_for_tag(field, tag)
    assert param.kind == "int"
    assert list(param.ranges) == ranges
    assert param.default_str == default_str
    assert param.flags == flags


# ---------------------------------------------------------------------------
# felix/config/file_loader_test.go
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases.FILE_LOADER_CASES, ids=_id)
def test_file_loader(case: dict[str, Any]) -> None:
    """felix/config/file_loader.go: LoadConfigFileData (ini.Load, every section's
    keys, key.Name() -> key.Value())."""
    if case["error"]:
        with pytest.raises(ConfigFileError):
            load_config_file(case["text"])
    else:
        assert load_config_file(case["text"]) == case["expected"]


# ---------------------------------------------------------------------------
# go-ini/ini
# ---------------------------------------------------------------------------


def _ini_text(case: dict[str, Any]) -> str:
    if "data" in case:
        return str(case["data"].decode("utf-8", "surrogateescape"))
    return str(case["text"])


@pytest.mark.parametrize("case", cases.INI_CASES, ids=_id)
def test_go_ini(case: dict[str, Any]) -> None:
    """go-ini/ini parser.go: File.parse, readKeyName, readValue (default
    LoadOptions), as felix/config/file_loader.go: LoadConfigFileData merges it."""
    text = _ini_text(case)
    if case["error"] is not None:
        with pytest.raises(ConfigFileError) as exc:
            load_config_file(text)
        if isinstance(case["error"], str):
            assert str(exc.value) == case["error"]
        return
    kvs = load_config_file(text)
    if case["exact"]:
        assert kvs == case["items"]
    else:
        for key, value in case["items"].items():
            assert kvs.get(key) == value, key
    for key in case["absent"]:
        assert key not in kvs


# ---------------------------------------------------------------------------
# Nothing silently dropped
# ---------------------------------------------------------------------------


def test_carried_over_case_counts() -> None:
    """felix/config/*_test.go and go-ini/ini *_test.go: every calico Entry/It is
    carried over or listed in SKIPPED, and the carried-over counts are pinned."""
    assert len(cases.PARAM_CASES) == 46
    assert len(cases.DEFAULT_CASES) == 2
    assert len(cases.PROGRAM_CLUSTER_ROUTES_CASES) == 5
    assert len(cases.METADATA_PORT_CASES) == 2
    assert len(cases.PARAM_FOR_FIELD_CASES) == 5
    assert len(cases.FILE_LOADER_CASES) == 8
    assert len(cases.INI_CASES) == 34
    assert len(PROMETHEUS_CASES) == 3

    carried = Counter(
        {
            cases.CONFIG_PARAMS_TEST: len(cases.PARAM_CASES)
            + len(cases.DEFAULT_CASES)
            + len(cases.PROGRAM_CLUSTER_ROUTES_CASES)
            + len(cases.METADATA_PORT_CASES)
            + len(cases.PARAM_FOR_FIELD_CASES),
            cases.FILE_LOADER_TEST: len(cases.FILE_LOADER_CASES),
        }
    )
    skipped: Counter[str] = Counter()
    for group in cases.SKIPPED:
        assert group["reason"]
        skipped[group["file"]] += len(group["entries"])
    for upstream_file, total in cases.UPSTREAM_TOTALS.items():
        assert carried[upstream_file] + skipped[upstream_file] == total, upstream_file
    assert dict(skipped) == {
        cases.CONFIG_PARAMS_TEST: 148,
        cases.PARAM_TYPES_TEST: 34,
        cases.FILE_LOADER_TEST: 1,
        cases.ENV_VAR_LOADER_TEST: 3,
        "parser_test.go": 1,
        "ini_test.go": 6,
        "file_test.go": 5,
        "key_test.go": 2,
        "section_test.go": 1,
        "struct_test.go": 8,
    }
    assert Counter(c["file"] for c in cases.INI_CASES) == {
        "parser_test.go": 10,
        "ini_test.go": 17,
        "file_test.go": 6,
        "key_test.go": 1,
    }
    # No calico line is both carried over and skipped.
    carried_lines = (
        {c["line"] for c in cases.PARAM_CASES}
        | {c["line"] for c in cases.DEFAULT_CASES}
        | {c[0] for c in cases.PROGRAM_CLUSTER_ROUTES_CASES}
        | {c[0] for c in cases.METADATA_PORT_CASES}
        | {c[0] for c in cases.PARAM_FOR_FIELD_CASES}
    )
    skipped_lines = {
        line
        for group in cases.SKIPPED
        if group["file"] == cases.CONFIG_PARAMS_TEST
        for line, _ in group["entries"]
    }
    assert len(carried_lines) == 60
    assert not carried_lines & skipped_lines


# ---------------------------------------------------------------------------
# Own cases: felix/config/param_types.go IntParam.Parse = strconv.ParseInt(s, 0, 64)
# ---------------------------------------------------------------------------

PORT_CASES = [
    ("0x2384", 9092, True),
    ("0X2384", 9092, True),
    ("+9092", 9092, True),
    ("9_092", 9092, True),  # base 0: underscores allowed between digits
    ("0x_23_84", 9092, True),  # ... and right after a base prefix
    ("010", 8, True),  # leading 0: octal
    ("0o17", 15, True),
    ("0b1", 1, True),
    ("0_10", 8, True),
    ("0", 0, True),
    ("-0", 0, True),
    ("65535", 65535, True),
    ("9091", 9091, True),
    (" 9092", DEFAULT_PORT, False),  # no trimming
    ("9092 ", DEFAULT_PORT, False),
    ("9092\n", DEFAULT_PORT, False),
    ("65536", DEFAULT_PORT, False),  # out of range
    ("-1", DEFAULT_PORT, False),
    ("08", DEFAULT_PORT, False),  # not octal
    ("0x", DEFAULT_PORT, False),
    ("_9092", DEFAULT_PORT, False),
    ("9092_", DEFAULT_PORT, False),
    ("9__092", DEFAULT_PORT, False),
    ("++9092", DEFAULT_PORT, False),
    ("9092.0", DEFAULT_PORT, False),
    ("1e3", DEFAULT_PORT, False),
    ("\uff19\uff10\uff19\uff12", DEFAULT_PORT, False),  # full-width digits: not Go digits
    ("99999999999999999999", DEFAULT_PORT, False),  # int64 overflow
    ("", DEFAULT_PORT, False),
    ("none", DEFAULT_PORT, False),  # "none" is parse_value's business
]


@pytest.mark.parametrize(("raw", "value", "valid"), PORT_CASES)
def test_parse_port_go_parseint(raw: str, value: int, valid: bool) -> None:
    """felix/config/param_types.go: IntParam.Parse (strconv.ParseInt(raw, 0, 64),
    then the int(0:65535) range; failure -> default 9091)."""
    assert parse_port(raw) == (value, valid)


BOOL_CASES = [
    ("true", True, True),
    ("True", True, True),
    ("1", True, True),
    ("yes", True, True),
    ("YES", True, True),
    ("y", True, True),
    ("Y", True, True),
    ("t", True, True),
    ("T", True, True),
    ("false", False, True),
    ("F", False, True),
    ("0", False, True),
    ("No", False, True),
    ("n", False, True),
    ("on", False, False),
    ("off", False, False),
    ("enabled", False, False),
    (" true", False, False),  # no trimming
    ("true\n", False, False),
    ("2", False, False),
    ("", False, False),
    ("none", False, False),
]


@pytest.mark.parametrize(("raw", "value", "valid"), BOOL_CASES)
def test_parse_bool(raw: str, value: bool, valid: bool) -> None:
    """felix/config/param_types.go: BoolParam.Parse (strings.ToLower, no trimming;
    failure -> default false)."""
    assert parse_bool(raw) == (value, valid)


HOST_CASES = [
    ("10.0.0.1", True),
    ("0.0.0.0", True),
    ("::1", True),
    ("fe80::1%eth0", False),  # "%" is not in the class
    ("[::1]", False),
    ("localhost", True),
    ("node-1.example.com", True),
    ("a" * 64, True),
    ("a" * 65, False),
    (" 10.0.0.1", False),
    ("10.0.0.1\n", False),  # Go's `$` is end of text, not before a final newline
    ("", False),
]


@pytest.mark.parametrize(("raw", "valid"), HOST_CASES)
def test_parse_host(raw: str, valid: bool) -> None:
    """felix/config/param_types.go: RegexpParam.Parse with config_params.go:
    HostAddressRegexp `^[a-zA-Z0-9:._+-]{1,64}$` (failure -> default "")."""
    assert parse_host(raw) == ((raw, True) if valid else ("", False))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("RequireAndVerifyClientCert", "RequireAndVerifyClientCert"),
        ("requireanyclientcert", "RequireAnyClientCert"),
        ("VERIFYCLIENTCERTIFGIVEN", "VerifyClientCertIfGiven"),
        ("noClientCert", "NoClientCert"),
        # Go's unicode.ToLower maps U+0130 to a plain "i" (Python's lower() does not).
        ("Requ\u0130reAnyClientCert", "RequireAnyClientCert"),
    ],
)
def test_parse_client_auth_valid(raw: str, expected: str) -> None:
    """felix/config/param_types.go: OneofListParam.Parse (case-insensitive, returns
    the canonical spelling)."""
    for default in ("NoClientCert", "RequireAndVerifyClientCert"):
        assert parse_client_auth(raw, default=default) == (expected, True)


@pytest.mark.parametrize("raw", ["", " NoClientCert", "NoClientCert ", "none", "tls", "No"])
def test_parse_client_auth_invalid(raw: str) -> None:
    """felix/config/param_types.go: OneofListParam.Parse failure -> the version's
    default (config_params.go: RequireAndVerifyClientCert in v3.32.x, NoClientCert
    on master)."""
    assert parse_client_auth(raw, default="NoClientCert") == ("NoClientCert", False)
    assert parse_client_auth(raw, default="RequireAndVerifyClientCert") == (
        "RequireAndVerifyClientCert",
        False,
    )
    assert parse_client_auth(raw, default="requireandverifyclientcert") == (
        "RequireAndVerifyClientCert",
        False,
    )


def test_parse_client_auth_bad_default() -> None:
    """felix/config/config_params.go: loadParams parses every default (panics on an
    invalid one)."""
    with pytest.raises(ValueError, match="not a PrometheusMetricsClientAuth option"):
        parse_client_auth("NoClientCert", default="Nope")


ZEROS = {
    "prometheusmetricsenabled": False,
    "prometheusmetricsport": 0,
    "prometheusmetricshost": "",
    "prometheusmetricscafile": "",
    "prometheusmetricscertfile": "",
    "prometheusmetricskeyfile": "",
    "prometheusmetricsclientauth": "",
}


@pytest.mark.parametrize("param", sorted(ZEROS))
@pytest.mark.parametrize("raw", ["none", "None", "NONE", "nOnE"])
def test_parse_value_none_is_zero(param: str, raw: str) -> None:
    """felix/config/config_params.go: Config.resolve (strings.ToLower(raw) == "none"
    -> metadata.ZeroValue; none of these fields is non-zero)."""
    value, valid = parse_value(param, raw)
    assert _same(value, ZEROS[param])
    assert valid


@pytest.mark.parametrize("raw", [" none", "none ", "'none'", "nil", "null"])
def test_parse_value_none_not_trimmed(raw: str) -> None:
    """felix/config/config_params.go: Config.resolve compares the untrimmed value
    with "none"."""
    assert parse_value("prometheusmetricsport", raw) == (DEFAULT_PORT, False)
    assert parse_value("prometheusmetricsenabled", raw) == (False, False)


def test_parse_value_dispatch() -> None:
    """felix/config/config_params.go: Config.resolve (knownParams by
    strings.ToLower(name); Parse; failure -> default)."""
    assert parse_value("prometheusmetricsenabled", "true") == (True, True)
    assert parse_value("PrometheusMetricsEnabled", "Yes") == (True, True)
    assert parse_value("prometheusmetricsport", "0x2384") == (9092, True)
    assert parse_value("prometheusmetricsport", "65536") == (9091, False)
    assert parse_value("prometheusmetricshost", "[::]") == ("", False)
    assert parse_value("prometheusmetricscertfile", "/etc/felix/cert.pem") == (
        "/etc/felix/cert.pem",
        True,
    )
    # StringRegexp `^.*$`: Go's `.` does not match a newline.
    assert parse_value("prometheusmetricskeyfile", "a\nb") == ("", False)
    assert parse_value("prometheusmetricscafile", " spaced ") == (" spaced ", True)
    assert parse_value("prometheusmetricsclientauth", "x") == ("NoClientCert", False)
    assert parse_value(
        "prometheusmetricsclientauth", "x", client_auth_default="RequireAndVerifyClientCert"
    ) == ("RequireAndVerifyClientCert", False)
    assert parse_value("prometheusmetricsclientauth", "requireanyclientcert") == (
        "RequireAnyClientCert",
        True,
    )


def test_parse_value_errors() -> None:
    """felix/config/config_params.go: UpdateFrom drops empty values before resolve;
    unknown parameter names are not PrometheusMetrics* parameters."""
    with pytest.raises(ValueError, match="empty"):
        parse_value("prometheusmetricsport", "")
    with pytest.raises(KeyError):
        parse_value("prometheusgometricsenabled", "true")
    with pytest.raises(KeyError):
        parse_value("healthport", "9099")


# ---------------------------------------------------------------------------
# Own cases: go-ini/ini v1.67.0 parser.go with default LoadOptions
# ---------------------------------------------------------------------------

INI_ERROR_MESSAGES = [
    ("[]", "empty section name"),
    ("[", "unclosed section: ["),
    ("[foobar\n", "unclosed section: [foobar\n"),
    ('"""name', 'missing closing key quote: """name'),
    ('"""name"""', 'key-value delimiter not found: """name"""'),
    ('""=1', "error creating new key: empty key name"),
    ("=", "empty key name: ="),
    (": x", "empty key name: : x"),
    ("name", "key-value delimiter not found: name"),
    ("  name  \n", "key-value delimiter not found: name  \n"),
    ('name="""Unknwon', 'missing closing key quote from "\\"\\"\\"Unknwon" to ""'),
    ("x = `abc", 'missing closing key quote from "`abc" to ""'),
    ("x = `abc\n\tdef\n", 'missing closing key quote from "`abc\\n" to ""'),
]


@pytest.mark.parametrize(("text", "message"), INI_ERROR_MESSAGES)
def test_ini_error_messages(text: str, message: str) -> None:
    """go-ini/ini parser.go: File.parse, readKeyName, readMultilines and
    file.go: NewSection / section.go: NewKey error texts."""
    with pytest.raises(ConfigFileError) as exc:
        load_config_file(text)
    assert str(exc.value) == message


INI_OWN_CASES = [
    # sections: visited in order of first appearance, so a reopened section
    # does not move to the end
    ("[a]\nx=1\n[b]\nx=2\n[a]\nx=3\n", {"x": "2"}),
    ("x=0\n[DEFAULT]\nx=1\n", {"x": "1"}),
    ("[default]\nx=1\n[DEFAULT]\nx=2\n", {"x": "1"}),  # section names case-sensitive
    ("[ a ]\nx=1\n[a] trailing\ny=2\n", {"x": "1", "y": "2"}),
    ("X=1\nx=2\n", {"X": "1", "x": "2"}),  # key names case-sensitive
    ("x=1\nx=2\n", {"x": "2"}),  # no shadows: last wins
    # delimiters: the first "=" or ":"
    ("x: 1", {"x": "1"}),
    ("x=a=b", {"x": "a=b"}),
    ("x:a=b", {"x": "a=b"}),
    ("key name = v", {"key name": "v"}),
    ('"x:y" = 1', {"x:y": "1"}),
    ("`x=y` = 1", {"x=y": "1"}),
    ("x =", {"x": ""}),
    ("x =   \n", {"x": ""}),
    # inline comments: first # or ;, no preceding space needed
    ("x = 1 # c", {"x": "1"}),
    ("x = a#b", {"x": "a"}),
    ("x = a;b", {"x": "a"}),
    ("x = http://h;p", {"x": "http://h"}),
    ("# x = 1\n; y = 2\n  # z = 3\n", {}),
    ("x = 'a # b'", {"x": "'a"}),  # quotes do not protect from comments
    ('x = "a ; b"', {"x": '"a'}),
    ("x = `a # b`", {"x": "a # b"}),  # backticks do
    ('x = """a # b"""', {"x": "a # b"}),
    ("x = `a` # c", {"x": "a"}),
    # surrounding quotes: only a single pair is removed
    ('x = "1"', {"x": "1"}),
    ("x = '1'", {"x": "1"}),
    ("x = '  1 '", {"x": "  1 "}),
    ("x = \"1'", {"x": "\"1'"}),
    ('x = "a"b"', {"x": '"a"b"'}),
    ('x = ""', {"x": ""}),
    ('x = "', {"x": '"'}),
    ('x = """', {"x": '"""'}),
    # multi-line backtick / triple-quote values
    ("x = `a\nb` tail\ny = 2\n", {"x": "a\nb", "y": "2"}),
    ('x = """a\n  b\n""" # c\n', {"x": "a\n  b\n"}),
    # continuation: joined trimmed lines, before any comment stripping
    ("x = foo \\\n  bar # c\ny=1", {"x": "foo bar # c", "y": "1"}),
    ("x = a\\\n\ny = 1", {"x": "a", "y": "1"}),
    ("x = \\", {"x": ""}),
    ("x = a # c \\\nb", {"x": "a # c b"}),
    # line endings, BOM, whitespace as Go's unicode.IsSpace sees it
    ("x=1\r\ny=2\r\n", {"x": "1", "y": "2"}),
    ("x=1\ry=2", {"x": "1\ry=2"}),
    ("\ufeffx=1", {"x": "1"}),
    ("\udcff\udcfex=1", {"x": "1"}),  # UTF-16 LE BOM bytes
    ("\u00a0x = \u3000 1\u2003", {"x": "1"}),
    ("\x1cx=1\x1c", {"\x1cx": "1\x1c"}),  # not a Go space (Python's isspace says it is)
    # auto-increment keys, counter reset at every section header
    ("-=a\n-:b\n[s]\n- = c\n", {"#1": "c", "#2": "b"}),
    ("", {}),
    ("\n\n  \n", {}),
]


@pytest.mark.parametrize(("text", "expected"), INI_OWN_CASES)
def test_ini_own_cases(text: str, expected: dict[str, str]) -> None:
    """go-ini/ini parser.go: File.parse, readKeyName, readValue,
    readMultilines, readContinuationLines, hasSurroundedQuote, BOM; merged as
    felix/config/file_loader.go: LoadConfigFileData."""
    assert load_config_file(text) == expected
