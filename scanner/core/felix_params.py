"""How Calico's Felix reads its Prometheus metrics parameters and its config file.

A faithful, pure (standard library, no I/O) port of:

* projectcalico/calico ``felix/config`` at commit
  87c15906f20c4ca1fda55af92295e7678b0cc0b2 (master, 2026-08-22), cross-checked
  against tags v3.32.0 (eb1cf57823a1dd8d25c48b82fd023ea9e3e17996) and v3.32.1
  (0ca9d1b93644778cafdf1812f3dda02ac0c361e8):

  - ``param_types.go``: ``BoolParam.Parse`` (``BoolPtrParam`` uses the same token
    table), ``IntParam.Parse`` (``strconv.ParseInt(raw, 0, 64)`` then the range
    check), ``RegexpParam.Parse`` as used for the ``host-address``
    (``HostAddressRegexp``) and ``string`` (``StringRegexp``) kinds, and
    ``OneofListParam.Parse``;
  - ``config_params.go``: the struct tags of the ``PrometheusMetrics*`` fields,
    ``ParamForField``/``loadParams`` (how a tag becomes a parser, a default and a
    zero value), ``UpdateFrom`` (empty values are dropped before parsing) and
    ``resolve()`` (a value of ``none`` in any case gives the field's zero value;
    a value that fails to parse is replaced by the default);
  - ``file_loader.go``: ``LoadConfigFileData`` (``ini.Load(data)``, then every
    section in order, every key by ``key.Name()`` -> ``key.Value()``, later
    sections overwriting earlier ones).

* go-ini/ini (``gopkg.in/ini.v1``) ``parser.go``/``file.go``/``section.go``/
  ``key.go`` at tag v1.67.0 (b2f570e5b5b844226bbefe6fb521d891f529a951), with the
  default ``LoadOptions{}`` that ``ini.Load([]byte)`` uses.  Calico v3.32.x pins
  ``github.com/go-ini/ini v1.67.0`` (exactly this code); calico master pins
  ``gopkg.in/ini.v1 v1.67.3``, which the available go-ini mirror does not have,
  so master's file parsing is assumed unchanged from v1.67.0.

Only the parameter kinds the PrometheusMetrics* parameters use are ported
(``bool``, ``*bool``, ``int``, ``host-address``, ``string``, ``oneof``), and only
the default ini load options.  Strings are Python ``str``: a config file is the
file's bytes decoded as UTF-8 (undecodable bytes as ``surrogateescape``
surrogates, which then behave like Go's invalid bytes: never whitespace, never
digits).  Upstream copyright Tigera, Inc. and the go-ini authors, Apache License
2.0.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

__all__ = [
    "DEFAULT_PORT",
    "ConfigFileError",
    "load_config_file",
    "parse_bool",
    "parse_client_auth",
    "parse_host",
    "parse_port",
    "parse_value",
]

DEFAULT_PORT = 9091

# Default of PrometheusMetricsClientAuth on calico master; v3.32.0 and v3.32.1
# default to "RequireAndVerifyClientCert".
_CLIENT_AUTH_DEFAULT_MASTER = "NoClientCert"

_MIN_INT = -(1 << 63)  # Go math.MinInt on 64-bit
_MAX_INT = (1 << 63) - 1  # Go math.MaxInt on 64-bit
_MAX_UINT64 = (1 << 64) - 1

# --------------------------------------------------------------------------
# Go string helpers
# --------------------------------------------------------------------------

# unicode.IsSpace: the Latin-1 spaces plus the White_Space property.  (Python's
# str.isspace() differs: it also counts U+001C..U+001F.)
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)


def _go_trim_space(s: str) -> str:
    """strings.TrimSpace."""
    return s.strip(_GO_SPACE)


def _go_trim_left_space(s: str) -> str:
    """strings.TrimLeftFunc(s, unicode.IsSpace)."""
    return s.lstrip(_GO_SPACE)


def _go_to_lower(s: str) -> str:
    """strings.ToLower: unicode.ToLower (simple case mapping) per rune.

    Python's str.lower() uses the full mapping, which differs for U+0130 (Go maps
    it to a plain "i") and applies the final-sigma context rule.
    """
    return "".join("i" if c == "\u0130" else c.lower() for c in s)


def _go_index_any(s: str, chars: str) -> int:
    """strings.IndexAny."""
    for i, c in enumerate(s):
        if c in chars:
            return i
    return -1


_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def _go_quote(s: str) -> str:
    """strconv.Quote (what fmt's %q prints for a string)."""
    out = ['"']
    for c in s:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # a surrogateescape'd invalid byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif c in ('"', "\\"):
            out.append("\\" + c)
        elif c.isprintable():  # Go IsPrint: L, M, N, P, S and ASCII space
            out.append(c)
        elif c in _GO_ESCAPES:
            out.append(_GO_ESCAPES[c])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


# --------------------------------------------------------------------------
# strconv.ParseInt(s, 0, 64)
# --------------------------------------------------------------------------


def _go_lower_byte(c: str) -> str:
    """strconv's lower(): c | ('x' - 'X'), for an ASCII character."""
    return chr(ord(c) | 0x20)


def _go_underscore_ok(s: str) -> bool:
    """strconv.underscoreOK: underscores only between digits or after a base prefix."""
    saw = "^"
    i = 0
    if len(s) >= 1 and s[0] in "+-":
        s = s[1:]
    hexadecimal = False
    if len(s) >= 2 and s[0] == "0" and _go_lower_byte(s[1]) in "box":
        i = 2
        saw = "0"
        hexadecimal = _go_lower_byte(s[1]) == "x"
    while i < len(s):
        c = s[i]
        if "0" <= c <= "9" or (hexadecimal and "a" <= _go_lower_byte(c) <= "f"):
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
        i += 1
    return saw != "_"


def _go_parse_uint_base0(s: str) -> int | None:
    """strconv.ParseUint(s, 0, 64); None for a syntax or range error."""
    if s == "":
        return None
    s0 = s
    base = 10
    if s[0] == "0":
        if len(s) >= 3 and _go_lower_byte(s[1]) == "b":
            base, s = 2, s[2:]
        elif len(s) >= 3 and _go_lower_byte(s[1]) == "o":
            base, s = 8, s[2:]
        elif len(s) >= 3 and _go_lower_byte(s[1]) == "x":
            base, s = 16, s[2:]
        else:
            base, s = 8, s[1:]
    n = 0
    underscores = False
    for c in s:
        if c == "_":  # base0 is always true here
            underscores = True
            continue
        if "0" <= c <= "9":
            d = ord(c) - ord("0")
        elif "a" <= _go_lower_byte(c) <= "z":
            d = ord(_go_lower_byte(c)) - ord("a") + 10
        else:
            return None
        if d >= base:
            return None
        n = n * base + d
        if n > _MAX_UINT64:
            return None
    if underscores and not _go_underscore_ok(s0):
        return None
    return n


def _go_parse_int64(s: str) -> int | None:
    """strconv.ParseInt(s, 0, 64); None where Go returns an error."""
    if s == "" or not s.isascii():
        # Every byte of a non-ASCII rune is a syntax error in strconv.
        return None
    neg = False
    if s[0] == "+":
        s = s[1:]
    elif s[0] == "-":
        neg, s = True, s[1:]
    un = _go_parse_uint_base0(s)
    if un is None:
        return None
    cutoff = 1 << 63
    if (not neg and un >= cutoff) or (neg and un > cutoff):
        return None
    return -un if neg else un


def _go_atoi(s: str) -> int | None:
    """strconv.Atoi (base 10, optional sign, no underscores, int64 range)."""
    if not re.fullmatch(r"[+-]?[0-9]+", s, flags=re.ASCII):
        return None
    value = int(s)
    if value < _MIN_INT or value > _MAX_INT:
        return None
    return value


# --------------------------------------------------------------------------
# felix/config/param_types.go
# --------------------------------------------------------------------------


class _ParseError(Exception):
    """Param.Parse returned an error (Metadata.parseFailed)."""


_BOOL_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_BOOL_FALSE = frozenset({"false", "0", "no", "n", "f"})

# config_params.go: HostAddressRegexp `^[a-zA-Z0-9:._+-]{1,64}$`, StringRegexp
# `^.*$`.  Go's `.` does not match "\n" and `$` is end of text, so fullmatch.
_HOST_ADDRESS_RE = re.compile(r"[a-zA-Z0-9:._+-]{1,64}")
_STRING_RE = re.compile(r".*")


def _bool_parse(raw: str) -> bool:
    """BoolParam.Parse / BoolPtrParam.Parse: lower-cased, not trimmed."""
    low = _go_to_lower(raw)
    if low in _BOOL_TRUE:
        return True
    if low in _BOOL_FALSE:
        return False
    raise _ParseError("invalid boolean")


def _int_parse(raw: str, ranges: tuple[tuple[int, int], ...]) -> int:
    """IntParam.Parse."""
    value = _go_parse_int64(raw)
    if value is None:
        raise _ParseError("invalid int")
    if len(ranges) == 1:
        lo, hi = ranges[0]
        if value < lo:
            raise _ParseError(f"value must be at least {lo}")
        if value > hi:
            raise _ParseError(f"value must be at most {hi}")
    elif not any(lo <= value <= hi for lo, hi in ranges):
        raise _ParseError("value must be one of the ranges")
    return value


def _regexp_parse(raw: str, pattern: re.Pattern[str], msg: str) -> str:
    """RegexpParam.Parse: the raw value itself if it matches, untrimmed."""
    if pattern.fullmatch(raw) is None:
        raise _ParseError(msg)
    return raw


def _oneof_parse(raw: str, lower_to_canonical: Mapping[str, str]) -> str:
    """OneofListParam.Parse: case-insensitive match, canonical spelling back."""
    try:
        return lower_to_canonical[_go_to_lower(raw)]
    except KeyError:
        raise _ParseError("unknown option") from None


# --------------------------------------------------------------------------
# felix/config/config_params.go: ParamForField / loadParams / resolve
# --------------------------------------------------------------------------

_META_RE = re.compile(r"([^;(]+)(?:\(([^)]*)\))?;([^;]*)(?:;([^;]*))?")


@dataclasses.dataclass(frozen=True)
class _Param:
    """A known parameter: the parser and metadata loadParams derives from a tag."""

    name: str
    kind: str
    parse: Callable[[str], object]  # raises _ParseError
    default: object
    zero: object
    default_str: str
    flags: str
    ranges: tuple[tuple[int, int], ...] = ()
    options: tuple[str, ...] = ()

    @property
    def non_zero(self) -> bool:
        return "non-zero" in self.flags

    @property
    def die_on_fail(self) -> bool:
        return "die-on-fail" in self.flags


def _must_parse_optional_int(raw: str, default: int, field: str) -> int:
    raw = _go_trim_space(raw)
    if raw == "":
        return default
    value = _go_atoi(raw)
    if value is None:
        raise ValueError(f"Failed to parse value {raw!r} for {field}")
    return value


def _param_for_tag(field: str, tag: str) -> _Param:
    """ParamForField + loadParams, for the kinds this module ports."""
    m = _META_RE.fullmatch(tag)
    if m is None:
        raise ValueError(f"Failed to parse metadata for config param {field}")
    kind = m.group(1)
    kind_params = m.group(2) or ""
    default_str = m.group(3)
    flags = m.group(4) or ""
    ranges: tuple[tuple[int, int], ...] = ()
    options: tuple[str, ...] = ()
    parse: Callable[[str], object]
    zero: object
    if kind in ("bool", "*bool"):
        parse = _bool_parse
        zero = False if kind == "bool" else None
    elif kind == "int":
        built: list[tuple[int, int]] = []
        for r in kind_params.split(","):
            min_and_max = r.split(":")
            lo = _must_parse_optional_int(min_and_max[0], _MIN_INT, field)
            hi = _MAX_INT
            if len(min_and_max) == 2:
                hi = _must_parse_optional_int(min_and_max[1], _MAX_INT, field)
            built.append((lo, hi))
        ranges = tuple(built)
        bound_ranges = ranges

        def parse(raw: str) -> object:
            return _int_parse(raw, bound_ranges)

        zero = 0
    elif kind in ("host-address", "string"):
        pattern = _HOST_ADDRESS_RE if kind == "host-address" else _STRING_RE
        msg = "invalid host address" if kind == "host-address" else "invalid string"

        def parse(raw: str) -> object:
            return _regexp_parse(raw, pattern, msg)

        zero = ""
    elif kind == "oneof":
        options = tuple(kind_params.split(","))
        lower_to_canonical = {_go_to_lower(o): o for o in options}

        def parse(raw: str) -> object:
            return _oneof_parse(raw, lower_to_canonical)

        zero = ""
    else:
        raise ValueError(f"parameter kind {kind!r} of {field} is not ported")
    default: object = zero
    if default_str != "":
        if "skip-default-validation" in flags:
            default = default_str
        else:
            try:
                default = parse(default_str)
            except _ParseError as exc:
                raise ValueError(f"Invalid default value for {field}: {exc}") from None
    return _Param(
        name=field,
        kind=kind,
        parse=parse,
        default=default,
        zero=zero,
        default_str=default_str,
        flags=flags,
        ranges=ranges,
        options=options,
    )


def _resolve_value(param: _Param, raw: str) -> tuple[object, bool]:
    """The per-value part of Config.resolve(): (value Felix uses, valid).

    "none" in any case gives the zero value (an error for non-zero params, which
    then keep their default); a parse failure gives the default (die-on-fail
    params make the whole config invalid instead; either way not valid here).
    """
    if _go_to_lower(raw) == "none":
        if param.non_zero:
            return param.default, False
        return param.zero, True
    try:
        return param.parse(raw), True
    except _ParseError:
        return param.default, False


# Struct tags of the PrometheusMetrics* fields, verbatim from config_params.go
# (master); v3.32.x differs only in PrometheusMetricsClientAuth's default.
_PROMETHEUS_TAGS = {
    "PrometheusMetricsEnabled": "bool;false",
    "PrometheusMetricsHost": "host-address;",
    "PrometheusMetricsPort": "int(0:65535);9091",
    "PrometheusMetricsCAFile": "string;",
    "PrometheusMetricsCertFile": "string;",
    "PrometheusMetricsKeyFile": "string;",
    "PrometheusMetricsClientAuth": (
        "oneof(RequireAndVerifyClientCert,RequireAnyClientCert,"
        "VerifyClientCertIfGiven,NoClientCert);" + _CLIENT_AUTH_DEFAULT_MASTER
    ),
}

# knownParams: keyed by strings.ToLower(field name).
_KNOWN_PARAMS = {
    _go_to_lower(name): _param_for_tag(name, tag) for name, tag in _PROMETHEUS_TAGS.items()
}
_PORT = _KNOWN_PARAMS["prometheusmetricsport"]
_CLIENT_AUTH = _KNOWN_PARAMS["prometheusmetricsclientauth"]


_CLIENT_AUTH_OPTIONS = {_go_to_lower(o): o for o in _CLIENT_AUTH.options}


def _client_auth_default(default: str) -> str:
    """A version's PrometheusMetricsClientAuth default, parsed as loadParams parses
    every default (it panics on an invalid one; ValueError here)."""
    try:
        return _oneof_parse(default, _CLIENT_AUTH_OPTIONS)
    except _ParseError:
        raise ValueError(
            f"{default!r} is not a PrometheusMetricsClientAuth option {_CLIENT_AUTH.options}"
        ) from None


def _client_auth_param(default: str) -> _Param:
    """PrometheusMetricsClientAuth with a version's default."""
    return dataclasses.replace(
        _CLIENT_AUTH, default=_client_auth_default(default), default_str=default
    )


# --------------------------------------------------------------------------
# Public parsers
# --------------------------------------------------------------------------


def parse_bool(raw: str) -> tuple[bool, bool]:
    """BoolParam.Parse: (value, valid); invalid -> (False, False), Felix's default.

    Case-insensitive, untrimmed: true/1/yes/y/t and false/0/no/n/f only.
    Does not handle "none" (see parse_value).
    """
    try:
        return _bool_parse(raw), True
    except _ParseError:
        return False, False


def parse_port(raw: str) -> tuple[int, bool]:
    """PrometheusMetricsPort, ``int(0:65535);9091``: (port, valid).

    strconv.ParseInt(raw, 0, 64) (sign, 0x/0o/0b prefixes, leading-0 octal,
    underscores as Go literals allow, no spaces), then 0..65535; invalid ->
    (9091, False).
    """
    try:
        return _int_parse(raw, _PORT.ranges), True
    except _ParseError:
        return DEFAULT_PORT, False


def parse_host(raw: str) -> tuple[str, bool]:
    """PrometheusMetricsHost, ``host-address;``: (host, valid); invalid -> ("", False).

    Valid is 1 to 64 characters from ``a-zA-Z0-9:._+-``, untrimmed.
    """
    try:
        return _regexp_parse(raw, _HOST_ADDRESS_RE, "invalid host address"), True
    except _ParseError:
        return "", False


def parse_client_auth(raw: str, *, default: str) -> tuple[str, bool]:
    """PrometheusMetricsClientAuth (oneof): (canonical option, valid).

    Matched case-insensitively (untrimmed) against RequireAndVerifyClientCert,
    RequireAnyClientCert, VerifyClientCertIfGiven and NoClientCert; invalid ->
    (default, False).  The default is "RequireAndVerifyClientCert" in v3.32.0 and
    v3.32.1 and "NoClientCert" on master; it must be one of the options
    (ValueError otherwise) and is returned in its canonical spelling.
    """
    canonical_default = _client_auth_default(default)
    try:
        return _oneof_parse(raw, _CLIENT_AUTH_OPTIONS), True
    except _ParseError:
        return canonical_default, False


def parse_value(
    param: str, raw: str, *, client_auth_default: str = _CLIENT_AUTH_DEFAULT_MASTER
) -> tuple[object, bool]:
    """One PrometheusMetrics* value as Config.resolve() sees it: (value, valid).

    ``param`` is the Felix parameter name, matched as resolve() does after
    strings.ToLower (e.g. "prometheusmetricsport"); an unknown name raises
    KeyError.  ``raw`` must be non-empty: UpdateFrom drops empty values before
    resolve() (so the default applies), and an empty ``raw`` raises ValueError.
    "none" in any case gives the zero value (False, 0 or "") as valid; otherwise
    the parameter's parser, a failure giving (default, False).
    ``client_auth_default`` is PrometheusMetricsClientAuth's default (master's
    "NoClientCert" unless given; "RequireAndVerifyClientCert" for v3.32.x).
    """
    known = _KNOWN_PARAMS[_go_to_lower(param)]
    if raw == "":
        raise ValueError(f"empty value for {known.name}: Felix drops empty values before parsing")
    if known is _CLIENT_AUTH:
        known = _client_auth_param(client_auth_default)
    return _resolve_value(known, raw)


# --------------------------------------------------------------------------
# gopkg.in/ini.v1 parser (default LoadOptions) and file_loader.go
# --------------------------------------------------------------------------


class ConfigFileError(ValueError):
    """ini.Load failed; the message is ini.v1's error text."""


_INI_DEFAULT_SECTION = "DEFAULT"
_INI_KEY_VALUE_DELIMITERS = "=:"


class _IniReader:
    """bufio.Reader.ReadBytes('\\n') as parser.readUntil uses it."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self.eof = False

    def read_until_newline(self) -> str:
        i = self._text.find("\n", self._pos)
        if i == -1:
            data = self._text[self._pos :]
            self._pos = len(self._text)
            self.eof = True
        else:
            data = self._text[self._pos : i + 1]
            self._pos = i + 1
        return data


def _ini_strip_bom(text: str) -> str:
    """parser.BOM: skip a UTF-16 (FE FF / FF FE) or UTF-8 (EF BB BF) byte-order mark."""
    if text.startswith(("\udcfe\udcff", "\udcff\udcfe")):
        return text[2:]
    if text.startswith("\ufeff"):
        return text[1:]
    return text


def _ini_read_key_name(line: str) -> tuple[str, int]:
    """readKeyName: (trimmed key name, offset just past the delimiter)."""
    key_quote = ""
    if line[0] == '"':
        # len(line) counts bytes in Go.
        if len(line.encode("utf-8", "surrogateescape")) > 6 and line[0:3] == '"""':
            key_quote = '"""'
        else:
            key_quote = '"'
    elif line[0] == "`":
        key_quote = "`"

    if key_quote:
        start = len(key_quote)
        pos = line.find(key_quote, start)
        if pos == -1:
            raise ConfigFileError(f"missing closing key quote: {line}")
        i = _go_index_any(line[pos + start :], _INI_KEY_VALUE_DELIMITERS)
        if i < 0:
            raise ConfigFileError(f"key-value delimiter not found: {line}")
        end = pos + i
        return _go_trim_space(line[start:pos]), end + start + 1

    end = _go_index_any(line, _INI_KEY_VALUE_DELIMITERS)
    if end < 0:
        raise ConfigFileError(f"key-value delimiter not found: {line}")
    if end == 0:
        raise ConfigFileError(f"empty key name: {line}")
    return _go_trim_space(line[:end]), end + 1


def _ini_read_multilines(reader: _IniReader, line: str, val: str, val_quote: str) -> str:
    """readMultilines: a `...` or \"\"\"...\"\"\" value continued on later lines."""
    while True:
        nxt = reader.read_until_newline()
        pos = nxt.rfind(val_quote)
        if pos > -1:
            return val + nxt[:pos]  # the rest of that line is a comment
        val += nxt
        if reader.eof:
            raise ConfigFileError(
                f"missing closing key quote from {_go_quote(line)} to {_go_quote(nxt)}"
            )


def _ini_read_continuation_lines(reader: _IniReader, val: str) -> str:
    """readContinuationLines: lines joined, trimmed, until one without a trailing '\\'."""
    while True:
        nxt = _go_trim_space(reader.read_until_newline())
        if not nxt:
            return val
        val += nxt
        if val[-1] != "\\":
            return val
        val = val[:-1]


def _ini_has_surrounded_quote(s: str, quote: str) -> bool:
    """hasSurroundedQuote: quote first and last, and nowhere in between."""
    return len(s) >= 2 and s[0] == quote and s[-1] == quote and quote not in s[1:-1]


def _ini_read_value(reader: _IniReader, data: str) -> str:
    """readValue with IgnoreContinuation, IgnoreInlineComment,
    UnescapeValueDoubleQuotes, UnescapeValueCommentSymbols,
    PreserveSurroundedQuote and AllowPythonMultilineValues all false."""
    line = _go_trim_left_space(data)
    if not line:
        return ""

    val_quote = ""
    if len(line) > 3 and line[0:3] == '"""':
        val_quote = '"""'
    elif line[0] == "`":
        val_quote = "`"
    if val_quote:
        start = len(val_quote)
        pos = line.rfind(val_quote, start)
        if pos == -1:
            return _ini_read_multilines(reader, line, line[start:], val_quote)
        return line[start:pos]  # verbatim; anything after the closing quote is dropped

    line = _go_trim_space(line)
    if line[-1] == "\\":
        return _ini_read_continuation_lines(reader, line[:-1])

    i = _go_index_any(line, "#;")
    if i > -1:
        line = _go_trim_space(line[:i])

    if _ini_has_surrounded_quote(line, "'") or _ini_has_surrounded_quote(line, '"'):
        line = line[1:-1]
    return line


def _ini_parse(text: str) -> dict[str, dict[str, str]]:
    """File.parse with default options: {section name: {key name: value}}, both in
    the order ini.v1 keeps them (sections by first appearance, keys likewise)."""
    reader = _IniReader(_ini_strip_bom(text))
    sections: dict[str, dict[str, str]] = {_INI_DEFAULT_SECTION: {}}
    section = sections[_INI_DEFAULT_SECTION]
    count = 1  # auto-increment counter for "-" keys, reset at every section header

    while not reader.eof:
        line = _go_trim_left_space(reader.read_until_newline())
        if not line:
            continue
        if line[0] in "#;":
            continue
        if line[0] == "[":
            close = line.rfind("]")
            if close == -1:
                raise ConfigFileError(f"unclosed section: {line}")
            name = line[1:close]  # not trimmed; text after "]" is ignored
            if not name:
                raise ConfigFileError("empty section name")
            section = sections.setdefault(name, {})
            count = 1
            continue

        key_name, offset = _ini_read_key_name(line)
        if key_name == "-":
            key_name = f"#{count}"
            count += 1
        value = _ini_read_value(reader, line[offset:])
        if not key_name:
            raise ConfigFileError("error creating new key: empty key name")
        section[key_name] = value  # a repeated key keeps its place, last value wins
    return sections


def load_config_file(text: str) -> dict[str, str]:
    """LoadConfigFileData: every key of every section, key.Name() -> key.Value().

    Sections are visited in order of first appearance (a reopened section keeps
    its first place), so a key in a later section overrides one in an earlier
    section, and within a section the last value wins.  Names are case-sensitive
    and values are raw (no %(var)s expansion).  Raises ConfigFileError with
    ini.v1's message where ini.Load fails.
    """
    kvs: dict[str, str] = {}
    for keys in _ini_parse(text).values():
        kvs.update(keys)
    return kvs
