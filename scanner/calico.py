"""How Felix decides whether its Prometheus metrics endpoint is on, per node (pure functions).

Mirrors Felix's own rules (see docs/calico.md): environment > config file > per-node
FelixConfiguration > selector-scoped FelixConfiguration > global `default` > built-in default,
each parameter resolved on its own, booleans parsed the way Felix parses them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from scanner.records import ClusterSnapshot, Declared, EnvVar, FelixConfig, Node

DEFAULT_PORT = 9091
ENABLED = "prometheusmetricsenabled"
PORT = "prometheusmetricsport"
CERT_FILE = "prometheusmetricscertfile"
ANNOTATION_PREFIX = "config.projectcalico.org/"
CONFIG_FILE = "/etc/calico/felix.cfg"

_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f", "none"})


def parse_bool(raw: str) -> tuple[bool, bool]:
    """Felix's boolean parsing: `(value, valid)`.

    Lower-cased first, whitespace not trimmed. Anything outside the accepted words is invalid:
    Felix logs it and uses the default (false), and the source still hides lower ones.
    """
    low = raw.lower()
    if low in _TRUE:
        return True, True
    if low in _FALSE:
        return False, True
    return False, False


def parse_port(raw: str) -> tuple[int, bool]:
    """Felix's integer parsing for the port: `(port, valid)`; invalid falls back to 9091."""
    if raw.lower() == "none":
        return DEFAULT_PORT, True
    if re.fullmatch(r"[0-9]+", raw):
        port = int(raw)
        if 0 < port <= 65535:
            return port, True
    return DEFAULT_PORT, False


def felix_param(env_name: str) -> str | None:
    """The Felix parameter an env var sets: any `felix_` prefix in any case, lower-cased rest."""
    low = env_name.lower()
    return low[len("felix_"):] if low.startswith("felix_") else None


# --- one candidate value per source --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A source that sets a parameter. `raw is None` with `error` set: it cannot be read."""

    source: str
    raw: str | None
    redacted: bool = False
    error: str | None = None


def _env_candidates(env: Sequence[EnvVar], param: str) -> _Candidate | None:
    hits = [e for e in env if felix_param(e.name) == param]
    if not hits:
        return None
    # Kubernetes already made duplicate *names* last-wins; names differing only in case are
    # separate variables whose order in the process environment Felix sees is not ours to know.
    by_name: dict[str, EnvVar] = {}
    for e in hits:
        by_name[e.name] = e
    distinct = list(by_name.values())
    if any(e.error for e in distinct):
        bad = next(e for e in distinct if e.error)
        return _Candidate(source=f"env {bad.name} ({bad.origin})", raw=None, error=bad.error)
    values = {e.value for e in distinct}
    chosen = distinct[-1]
    if len(values) > 1:
        names = ", ".join(e.name for e in distinct)
        return _Candidate(source=f"env {names}", raw=None,
                          error=f"variables {names} set the same Felix parameter to different "
                          "values; which one Felix takes depends on environment order")
    origin = "" if chosen.origin == "literal" else f" ({chosen.origin})"
    return _Candidate(source=f"env {chosen.name}{origin}", raw=chosen.value,
                      redacted=chosen.redacted)


def _annotation(cfg: FelixConfig, param: str) -> str | None:
    for key, value in cfg.annotations.items():
        if key.lower() == ANNOTATION_PREFIX + param:
            return value
    return None


def _fc_candidate(cfg: FelixConfig, param: str, label: str) -> _Candidate | None:
    note = _annotation(cfg, param)
    if note is not None:
        name = next(k for k in cfg.annotations if k.lower() == ANNOTATION_PREFIX + param)
        return _Candidate(source=f"FelixConfiguration {label} annotation {name}", raw=note)
    spec = {ENABLED: cfg.enabled, PORT: cfg.port, CERT_FILE: cfg.cert_file}.get(param)
    if spec is None:
        return None
    raw = str(spec).lower() if isinstance(spec, bool) else str(spec)
    return _Candidate(source=f"FelixConfiguration {label}", raw=raw)


@dataclass(frozen=True, slots=True)
class _Chain:
    """The sources for one node, highest precedence first; each yields a candidate or None."""

    steps: tuple[Callable[[str], _Candidate | None], ...]

    def first(self, param: str) -> _Candidate | None:
        for step in self.steps:
            cand = step(param)
            if cand is not None:
                return cand
        return None


def _chain(snapshot: ClusterSnapshot, node: Node | None) -> _Chain:
    configs = {c.name: c for c in snapshot.felix_configs}
    steps: list[Callable[[str], _Candidate | None]] = [
        lambda p: _env_candidates(snapshot.env, p),
        lambda p: _file_candidate(snapshot, p),
    ]
    if node is not None:
        per_node = configs.get(f"node.{node.name}")
        if per_node is not None:
            steps.append(lambda p: _fc_candidate(per_node, p, per_node.name))
        scoped = _selector_config(snapshot.felix_configs, node)
        if isinstance(scoped, SelectorError):
            err = scoped

            def broken(param: str) -> _Candidate | None:
                return _Candidate(source=f"FelixConfiguration {err.config}", raw=None,
                                  error=str(err))

            steps.append(broken)
        elif scoped is not None:
            chosen = scoped
            steps.append(lambda p: _fc_candidate(
                chosen, p, f"{chosen.name} (nodeSelector {chosen.node_selector})"))
    default = configs.get("default")
    if default is not None:
        steps.append(lambda p: _fc_candidate(default, p, "default"))
    return _Chain(tuple(steps))


def _file_candidate(snapshot: ClusterSnapshot, param: str) -> _Candidate | None:
    cfg = snapshot.config_file
    if not cfg.known:
        return _Candidate(source=f"config file {CONFIG_FILE} ({cfg.origin})", raw=None,
                          error=cfg.error or "the config file's content cannot be read")
    if param in cfg.values:
        return _Candidate(source=f"config file {CONFIG_FILE} ({cfg.origin})",
                          raw=cfg.values[param])
    return None


def resolve(snapshot: ClusterSnapshot, node: Node | None) -> Declared:
    """The declared metrics state for one node (None: the global chain, no node overrides)."""
    chain = _chain(snapshot, node)
    enabled_c = chain.first(ENABLED)
    port_c = chain.first(PORT)
    cert_c = chain.first(CERT_FILE)

    port, port_source = DEFAULT_PORT, "built-in default"
    port_unknown = None
    if port_c is not None:
        port_source = port_c.source
        if port_c.raw is None:
            port_unknown = port_c.error
        else:
            port, _valid = parse_port(port_c.raw)
    tls = cert_c is not None and bool(cert_c.raw)

    if enabled_c is None:
        declared = Declared(enabled=False, source="built-in default (false)", port=port,
                            port_source=port_source, tls=tls)
    elif enabled_c.raw is None:
        declared = Declared(enabled=None, source=enabled_c.source, port=port,
                            port_source=port_source, reason=enabled_c.error, tls=tls)
    else:
        value, valid = parse_bool(enabled_c.raw)
        declared = Declared(
            enabled=value,
            source=enabled_c.source,
            port=port,
            port_source=port_source,
            raw=None if enabled_c.redacted else enabled_c.raw,
            invalid=not valid,
            tls=tls,
        )
    if port_unknown and declared.enabled is not False:
        # An unknown port matters only where the endpoint may be on: we cannot aim the probe.
        return Declared(enabled=declared.enabled, source=declared.source, port=port,
                        port_source=port_source, raw=declared.raw, invalid=declared.invalid,
                        reason=declared.reason or f"port: {port_unknown}", tls=tls)
    return declared


def resolve_nodes(snapshot: ClusterSnapshot) -> dict[str, Declared]:
    return {node.name: resolve(snapshot, node) for node in snapshot.nodes}


def cluster_declared(snapshot: ClusterSnapshot, per_node: Mapping[str, Declared]) -> Declared:
    """The cluster's declared state: the worst of its nodes, else the global chain."""
    base = resolve(snapshot, None)
    enabled = [d for d in per_node.values() if d.enabled]
    if enabled:
        first = enabled[0]
        if len(enabled) == len(per_node) and all(d.source == first.source for d in enabled):
            return first
        if base.enabled:
            return base
        return Declared(enabled=True, source=f"{first.source} ({len(enabled)} of "
                        f"{len(per_node)} nodes)", port=first.port, port_source=first.port_source,
                        raw=first.raw, invalid=first.invalid, tls=first.tls)
    unknown = [d for d in per_node.values() if d.enabled is None]
    if unknown and base.enabled is not None:
        first = unknown[0]
        return Declared(enabled=None, source=f"{first.source} ({len(unknown)} of "
                        f"{len(per_node)} nodes)", port=first.port, port_source=first.port_source,
                        reason=first.reason)
    return base


# --- selector-scoped FelixConfiguration ----------------------------------------------------


class SelectorError(ValueError):
    def __init__(self, config: str, message: str) -> None:
        self.config = config
        super().__init__(f"nodeSelector of FelixConfiguration {config} cannot be evaluated: "
                         f"{message}")


def _selector_config(configs: Iterable[FelixConfig],
                     node: Node) -> FelixConfig | SelectorError | None:
    """The selector-scoped FelixConfiguration that applies to `node`.

    Felix takes the oldest (by creation time) when several match; names break ties so the
    answer is stable.
    """
    matching: list[FelixConfig] = []
    for cfg in configs:
        if cfg.name == "default" or cfg.name.startswith("node.") or not cfg.node_selector:
            continue
        try:
            if Selector(cfg.node_selector).matches(node.labels):
                matching.append(cfg)
        except ValueError as exc:
            return SelectorError(cfg.name, str(exc))
    if not matching:
        return None
    return min(matching, key=lambda c: (c.created, c.name))


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"[^"]*"|'[^']*')
      | (?P<op>==|!=|&&|\|\||!|\(|\)|\{|\}|,)
      | (?P<word>[A-Za-z0-9_./-]+(?:\(\))?)
    )""",
    re.VERBOSE,
)


class Selector:
    """Calico's label selector language, e.g. `role == 'gpu' && !has(spot)`.

    Supports all(), has(k), ==, !=, in {...}, not in {...}, contains, starts with, ends with,
    !, &&, || and parentheses: the grammar of libcalico-go's selector parser.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = self._tokenize(text)
        self.pos = 0
        self.tree = self._or()
        if self.pos != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.pos]!r} in selector {text!r}")

    @staticmethod
    def _tokenize(text: str) -> list[str]:
        tokens: list[str] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if not match or match.end() == pos:
                raise ValueError(f"cannot parse selector {text!r} at position {pos}")
            tokens.append(match.group(match.lastgroup or "word"))
            pos = match.end()
        return tokens

    def _peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> str:
        tok = self._peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'more'} in selector {self.text!r}")
        self.pos += 1
        return tok

    def _or(self) -> Callable[[Mapping[str, str]], bool]:
        left = self._and()
        while self._peek() == "||":
            self._take()
            right = self._and()
            left = _either(left, right)
        return left

    def _and(self) -> Callable[[Mapping[str, str]], bool]:
        left = self._unary()
        while self._peek() == "&&":
            self._take()
            right = self._unary()
            left = _both(left, right)
        return left

    def _unary(self) -> Callable[[Mapping[str, str]], bool]:
        tok = self._peek()
        if tok == "!":
            self._take()
            inner = self._unary()
            return lambda lb: not inner(lb)
        if tok == "(":
            self._take()
            inner = self._or()
            self._take(")")
            return inner
        return self._term()

    def _string(self) -> str:
        tok = self._take()
        if len(tok) < 2 or tok[0] not in "'\"" or tok[-1] != tok[0]:
            raise ValueError(f"expected a quoted string, got {tok!r} in {self.text!r}")
        return tok[1:-1]

    def _set(self) -> frozenset[str]:
        self._take("{")
        values: set[str] = set()
        if self._peek() != "}":
            values.add(self._string())
            while self._peek() == ",":
                self._take()
                values.add(self._string())
        self._take("}")
        return frozenset(values)

    def _term(self) -> Callable[[Mapping[str, str]], bool]:
        tok = self._take()
        if tok in ("all()", "global()"):
            return lambda lb: True
        if tok == "has":  # has(key) arrives as has ( key )
            self._take("(")
            key = self._take()
            self._take(")")
            return lambda lb: key in lb
        if tok.startswith("has(") or not re.fullmatch(r"[A-Za-z0-9_./-]+", tok):
            raise ValueError(f"unexpected {tok!r} in selector {self.text!r}")
        key = tok
        op = self._take()
        if op == "==":
            value = self._string()
            return lambda lb: lb.get(key) == value
        if op == "!=":
            value = self._string()
            return lambda lb: lb.get(key) != value
        if op == "in":
            values = self._set()
            return lambda lb: lb.get(key) in values
        if op == "not" and self._peek() == "in":
            self._take()
            values = self._set()
            return lambda lb: lb.get(key) not in values
        if op == "contains":
            value = self._string()
            return lambda lb: key in lb and value in lb[key]
        if op in ("starts", "ends") and self._peek() == "with":
            self._take()
            value = self._string()
            if op == "starts":
                return lambda lb: key in lb and lb[key].startswith(value)
            return lambda lb: key in lb and lb[key].endswith(value)
        raise ValueError(f"unknown operator {op!r} in selector {self.text!r}")

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.tree(labels)


_Test = Callable[[Mapping[str, str]], bool]


def _either(a: _Test, b: _Test) -> _Test:
    return lambda labels: a(labels) or b(labels)


def _both(a: _Test, b: _Test) -> _Test:
    return lambda labels: a(labels) and b(labels)
