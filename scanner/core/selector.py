"""Calico's label-selector language: parse, evaluate and canonicalise selectors.

A port of libcalico-go/lib/selector from projectcalico/calico (Apache License 2.0,
Copyright Tigera, Inc.) at commit 87c15906f20c4ca1fda55af92295e7678b0cc0b2, from the files
tokenizer/tokenizer.go, parser/parser.go, parser/ast.go, parser/stringset.go and selector.go.
The label-restriction analysis, visitors and unique IDs of ast.go are not ported.

Upstream semantics kept here, some of them surprising:

* `""` (or only blanks) parses as `all()`; `all()` and `global()` match any labels.
* A missing label satisfies `k != 'v'` and `k not in {...}`, but not `==`, `in`,
  `contains`, `starts with` or `ends with`.
* A run of `!` binds to one whole operation: `!a == 'b'` is `!(a == 'b')`.
  `&&` binds tighter than `||`; both chains are flat (n-ary), not nested.
* Strings are quoted with `'` or `"`, with no escapes: a string runs to the next
  matching quote, so no literal can hold both quote characters.
* Label keys are runs of `[A-Za-z0-9_./-]` of at most 512 characters; label values
  (in quotes) may hold any character but their own quote.
* Only space and tab are blanks: a newline anywhere outside a string is an error.
* `starts with`, `ends with` and `not in` may be written as one word, and a set
  literal may end with a comma: `a notin {"x",}`. `has(`, `all(` and `global(` take no
  blank before the `(`.

Errors carry upstream's message followed by the offset (in characters) and the selector.
One deviation: nesting deeper than Python's recursion limit allows (some 300 levels of
parentheses) is rejected, where upstream accepts it.
"""

from __future__ import annotations

import string as _string
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Selector", "SelectorParseError", "parse"]

_MAX_LABEL_LENGTH = 512
_IDENTIFIER_CHARS = frozenset(_string.ascii_letters + _string.digits + "_./-")
_BLANKS = " \t"
_SINGLE_CHAR_TOKENS = {"(": "TokLParen", ")": "TokRParen", "{": "TokLBrace",
                       "}": "TokRBrace", ",": "TokComma"}
_DOUBLE_CHAR_TOKENS = {"=": ("==", "TokEq"), "&": ("&&", "TokAnd"), "|": ("||", "TokOr")}
# Operators that may follow a label, in the order the tokenizer tries them.
_LABEL_OPERATORS = (("TokContains", ("contains",)), ("TokStartsWith", ("starts", "with")),
                    ("TokEndsWith", ("ends", "with")), ("TokNotIn", ("not", "in")),
                    ("TokIn", ("in",)))
_FUNCTIONS = (("has(", "TokHas"), ("all(", "TokAll"), ("global(", "TokGlobal"))


class SelectorParseError(ValueError):
    """A selector that upstream's parser.Parse rejects; says what is wrong and where."""


def _error(message: str, text: str, offset: int) -> SelectorParseError:
    return SelectorParseError(f"{message} (at offset {offset} of selector {text!r})")


# --- tokenizer/tokenizer.go ---------------------------------------------------------------

class _Token(NamedTuple):
    kind: str  # upstream's Kind name, e.g. "TokLabel"
    value: str  # the label or string literal; "" for other kinds
    offset: int  # where the token starts in the selector text

    def __str__(self) -> str:  # Token.String(), as upstream's error messages show tokens
        return f"{self.kind}({self.value})"


def _skip_blanks(text: str, i: int) -> int:
    while i < len(text) and text[i] in _BLANKS:
        i += 1
    return i


def _is_word_boundary(text: str, i: int) -> bool:
    return i == len(text) or text[i] not in _IDENTIFIER_CHARS


def _cut_words(text: str, i: int, words: Sequence[str]) -> int | None:
    """End of the operator `words` at `i` if they end at a word boundary, else None.

    Like upstream, blanks are skipped after each word of a multi-word operator (so also
    before its boundary check: `a not in c` fails where `a in c` tokenizes) but not after
    a one-word operator (cutPrefixCheckBreak vs cutMultiWordPrefixCheckBreak).
    """
    for word in words:
        if not text.startswith(word, i):
            return None
        i += len(word)
        if len(words) > 1:
            i = _skip_blanks(text, i)
    return i if _is_word_boundary(text, i) else None


def _cut_identifier(text: str, i: int) -> tuple[str, int]:
    end = i
    while end < len(text) and text[end] in _IDENTIFIER_CHARS:
        end += 1
    ident = text[i:end]
    if len(ident) > _MAX_LABEL_LENGTH:
        raise _error(f"label too long: {ident}", text, i)
    if not ident:
        raise _error("expected identifier", text, i)
    return ident, end


def _tokenize(text: str) -> list[_Token]:
    """tokenizer.Tokenize: the tokens of `text`, always ending with a TokEOF."""
    tokens: list[_Token] = []
    i = 0
    while True:
        i = _skip_blanks(text, i)
        if i == len(text):
            tokens.append(_Token("TokEOF", "", i))
            return tokens
        c = text[i]
        if c in _SINGLE_CHAR_TOKENS:
            tokens.append(_Token(_SINGLE_CHAR_TOKENS[c], "", i))
            i += 1
        elif c in "\"'":
            end = text.find(c, i + 1)
            if end == -1:
                raise _error("unterminated string", text, i)
            tokens.append(_Token("TokStringLiteral", text[i + 1:end], i))
            i = end + 1
        elif c in _DOUBLE_CHAR_TOKENS:
            op, kind = _DOUBLE_CHAR_TOKENS[c]
            if not text.startswith(op, i):
                raise _error(f"expected {op}", text, i)
            tokens.append(_Token(kind, "", i))
            i += 2
        elif c == "!":
            ne = text.startswith("!=", i)
            tokens.append(_Token("TokNe" if ne else "TokNot", "", i))
            i += 2 if ne else 1
        elif tokens and tokens[-1].kind == "TokLabel":
            # Just saw a label: only a word operator may follow.
            for kind, words in _LABEL_OPERATORS:
                end_of_op = _cut_words(text, i, words)
                if end_of_op is not None:
                    tokens.append(_Token(kind, "", i))
                    i = end_of_op
                    break
            else:
                raise _error(f'expected operator after label "{tokens[-1].value}"', text, i)
        else:
            for prefix, kind in _FUNCTIONS:
                if text.startswith(prefix, i):
                    j = _skip_blanks(text, i + len(prefix))
                    ident = ""
                    if kind == "TokHas":
                        ident, j = _cut_identifier(text, j)
                        j = _skip_blanks(text, j)
                    if not text.startswith(")", j):
                        raise _error(f"no closing ')' after {prefix}", text, j)
                    tokens.append(_Token(kind, ident, i))
                    i = j + 1
                    break
            else:
                ident, end = _cut_identifier(text, i)
                tokens.append(_Token("TokLabel", ident, i))
                i = end


# --- parser/ast.go ------------------------------------------------------------------------

def _quote(value: str) -> str:
    """appendLabelOpAndQuotedString: single quotes only if the value holds a double quote."""
    return f"'{value}'" if '"' in value else f'"{value}"'


class _Node(ABC):
    @abstractmethod
    def evaluate(self, labels: Mapping[str, str]) -> bool: ...

    @abstractmethod
    def string(self) -> str: ...


class _All(_Node):
    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return True

    def string(self) -> str:
        return "all()"


class _Global(_Node):
    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return True  # GlobalNode only marks a selector as global; it matches any labels.

    def string(self) -> str:
        return "global()"


@dataclass(frozen=True)
class _Has(_Node):
    label: str

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return self.label in labels

    def string(self) -> str:
        return f"has({self.label})"


# Operator of LabelEqValueNode, LabelNeValueNode, ... -> test of (actual, wanted) value.
_VALUE_TESTS: dict[str, Callable[[str, str], bool]] = {
    "==": lambda actual, wanted: actual == wanted,
    "!=": lambda actual, wanted: actual != wanted,
    "contains": lambda actual, wanted: wanted in actual,
    "starts with": lambda actual, wanted: actual.startswith(wanted),
    "ends with": lambda actual, wanted: actual.endswith(wanted),
}


@dataclass(frozen=True)
class _LabelValue(_Node):
    """LabelEqValueNode, LabelNeValueNode, LabelContains/StartsWith/EndsWithValueNode."""

    label: str
    op: str  # a key of _VALUE_TESTS
    value: str

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        if self.label not in labels:
            return self.op == "!="  # only != is true of a missing label
        return _VALUE_TESTS[self.op](labels[self.label], self.value)

    def string(self) -> str:
        return f"{self.label} {self.op} {_quote(self.value)}"


@dataclass(frozen=True)
class _LabelInSet(_Node):
    """LabelInSetNode and LabelNotInSetNode; `values` sorted and de-duplicated."""

    label: str
    values: tuple[str, ...]
    negated: bool

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        if self.label not in labels:
            return self.negated  # "not in" is true of a missing label
        return (labels[self.label] in self.values) != self.negated

    def string(self) -> str:
        op = "not in" if self.negated else "in"
        return f"{self.label} {op} {{{', '.join(_quote(v) for v in self.values)}}}"


@dataclass(frozen=True)
class _Not(_Node):
    operand: _Node

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.evaluate(labels)

    def string(self) -> str:
        return "!" + self.operand.string()


@dataclass(frozen=True)
class _And(_Node):
    operands: tuple[_Node, ...]

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return all(op.evaluate(labels) for op in self.operands)

    def string(self) -> str:
        return "(" + " && ".join(op.string() for op in self.operands) + ")"


@dataclass(frozen=True)
class _Or(_Node):
    operands: tuple[_Node, ...]

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return any(op.evaluate(labels) for op in self.operands)

    def string(self) -> str:
        return "(" + " || ".join(op.string() for op in self.operands) + ")"


# --- parser/parser.go ---------------------------------------------------------------------

_VALUE_OPS = {"TokEq": "==", "TokNe": "!=", "TokContains": "contains",
              "TokStartsWith": "starts with", "TokEndsWith": "ends with"}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)

    def fail(self, message: str, token: _Token) -> SelectorParseError:
        return _error(message, self.text, token.offset)

    def parse_root(self) -> _Node:
        if self.tokens[0].kind == "TokEOF":
            return _All()
        node, i = self.parse_or(0)
        if i != len(self.tokens) - 1:
            rest = " ".join(str(t) for t in self.tokens[i:])
            raise self.fail(f"unexpected content at end of selector [{rest}]", self.tokens[i])
        return node

    def parse_or(self, i: int) -> tuple[_Node, int]:
        """One or more `&&` chains separated by `||`."""
        node, i = self.parse_and(i)
        nodes = [node]
        while self.tokens[i].kind == "TokOr":
            node, i = self.parse_and(i + 1)
            nodes.append(node)
        return (nodes[0] if len(nodes) == 1 else _Or(tuple(nodes))), i

    def parse_and(self, i: int) -> tuple[_Node, int]:
        """One or more operations separated by `&&`."""
        node, i = self.parse_operation(i)
        nodes = [node]
        while self.tokens[i].kind == "TokAnd":
            node, i = self.parse_operation(i + 1)
            nodes.append(node)
        return (nodes[0] if len(nodes) == 1 else _And(tuple(nodes))), i

    def parse_operation(self, i: int) -> tuple[_Node, int]:
        """A single operation or parenthesised expression, after any number of `!`."""
        tokens = self.tokens
        negated = False
        while tokens[i].kind == "TokNot":
            negated = not negated
            i += 1
        first = tokens[i]
        node: _Node
        if first.kind == "TokHas":
            node, i = _Has(first.value), i + 1
        elif first.kind == "TokAll":
            node, i = _All(), i + 1
        elif first.kind == "TokGlobal":
            node, i = _Global(), i + 1
        elif first.kind == "TokLabel":
            node, i = self.parse_label_operation(i)
        elif first.kind == "TokLParen":
            node, i = self.parse_or(i + 1)
            if tokens[i].kind != "TokRParen":
                raise self.fail("expected )", tokens[i])
            i += 1
        else:
            raise self.fail(f"unexpected token: {first}", first)
        return (_Not(node) if negated else node), i

    def parse_label_operation(self, i: int) -> tuple[_Node, int]:
        """`label op "value"` or `label [not] in {"v", ...}`."""
        tokens = self.tokens
        label = tokens[i].value
        if len(tokens) - i < 3:
            raise self.fail("unexpected end of string looking for op", tokens[i + 1])
        op, operand = tokens[i + 1], tokens[i + 2]
        if op.kind in _VALUE_OPS:
            if operand.kind != "TokStringLiteral":
                raise self.fail("expected string", operand)
            return _LabelValue(label, _VALUE_OPS[op.kind], operand.value), i + 3
        if op.kind not in ("TokIn", "TokNotIn"):
            raise self.fail(f"expected == or != not: {op}", op)
        if operand.kind != "TokLBrace":
            raise self.fail("expected set literal", operand)
        i += 3
        values: list[str] = []
        while tokens[i].kind == "TokStringLiteral":  # a trailing comma is allowed
            values.append(tokens[i].value)
            i += 1
            if tokens[i].kind != "TokComma":
                break
            i += 1
        if tokens[i].kind != "TokRBrace":
            raise self.fail("expected }", tokens[i])
        # ConvertToStringSetInPlace sorts by UTF-8 bytes, which is code point order.
        return _LabelInSet(label, tuple(sorted(set(values))), op.kind == "TokNotIn"), i + 1


# --- selector.go / parser.Selector ---------------------------------------------------------

class Selector:
    """A parsed selector: `text` as given, `evaluate(labels)` and canonical `string()`."""

    __slots__ = ("_root", "_string", "text")

    def __init__(self, text: str, root: _Node) -> None:
        self.text = text
        self._root = root
        self._string = root.string()

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        """Selector.Evaluate: whether a resource with these labels is selected."""
        return self._root.evaluate(labels)

    def string(self) -> str:
        """Selector.String(): the canonical form, e.g. `(a == "b" && has(c))`."""
        return self._string

    def __repr__(self) -> str:
        return f"Selector({self.text!r})"


def parse(text: str) -> Selector:
    """parser.Parse: `text` as a Selector, or SelectorParseError where upstream rejects it.

    Nesting deeper than Python's recursion limit (a few hundred parentheses) is rejected
    here although upstream accepts it.
    """
    try:
        return Selector(text, _Parser(text).parse_root())
    except RecursionError:
        raise SelectorParseError(
            f"selector nested too deeply to parse (selector of {len(text)} characters)"
        ) from None
