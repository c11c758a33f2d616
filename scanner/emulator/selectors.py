"""Label and field selectors, parsed as kube-apiserver parses them and matched against objects.

`Predicate` filters list, watch and deletecollection; parse errors are 400 BadRequest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scanner.emulator.errors import ApiError, bad_request
from scanner.emulator.resources import JsonDict, ResourceType


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """One term of a label selector; `op` is one of = != in notin exists !exists gt lt."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        try:
            number = int(value or "")
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if self.op == "gt" else number < bound


_SELECTOR_TOKEN = re.compile(r"\s*(?:(!=|==|=|!|\(|\)|,|<|>)|([^\s,()=!<>]+))")


def _tokenize_selector(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _SELECTOR_TOKEN.match(text, pos)
        if match is None:
            raise bad_request(f"unable to parse requirement: invalid character at {text[pos:]!r}")
        tokens.append(match.group(1) or match.group(2))
        pos = match.end()
    return tokens


def parse_label_selector(text: str) -> tuple[LabelRequirement, ...]:
    """Parse a Kubernetes label selector (equality-, set-based, existence; comma = AND)."""
    tokens = _tokenize_selector(text)
    reqs: list[LabelRequirement] = []
    pos = 0

    def take() -> str | None:
        nonlocal pos
        token = tokens[pos] if pos < len(tokens) else None
        pos += 1
        return token

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def fail(found: str | None, expected: str) -> ApiError:
        return bad_request(
            f"unable to parse requirement: found '{found or ''}', expected: {expected}"
        )

    while pos < len(tokens):
        word = take()
        if word == "!":
            key = take()
            if key is None or not _is_word(key):
                raise fail(key, "identifier")
            reqs.append(LabelRequirement(key, "!exists"))
        elif word is not None and _is_word(word):
            key = word
            nxt = peek()
            if nxt is None or nxt == ",":
                reqs.append(LabelRequirement(key, "exists"))
            elif nxt in ("=", "==", "!="):
                take()
                value = peek()
                if value is None or value == ",":
                    value = ""
                else:
                    take()
                    if not _is_word(value):
                        raise fail(value, "identifier")
                reqs.append(LabelRequirement(key, "!=" if nxt == "!=" else "=", (value,)))
            elif nxt in ("in", "notin"):
                take()
                if take() != "(":
                    raise fail(tokens[pos - 1] if pos <= len(tokens) else None, "'('")
                values: list[str] = []
                while True:
                    item = take()
                    if item == ")":
                        break
                    if item is None:
                        raise fail(None, "')'")
                    if item == ",":
                        continue
                    if not _is_word(item):
                        raise fail(item, "identifier")
                    values.append(item)
                if not values:
                    raise fail(")", "identifier")
                reqs.append(LabelRequirement(key, nxt, tuple(values)))
            elif nxt in ("<", ">"):
                take()
                value = take()
                if value is None or not value.lstrip("-").isdigit():
                    raise fail(value, "integer")
                reqs.append(LabelRequirement(key, "gt" if nxt == ">" else "lt", (value,)))
            else:
                raise fail(nxt, "=, !=, ==, in, notin")
        else:
            raise fail(word, "identifier or '!'")
        sep = take()
        if sep not in (None, ","):
            raise fail(sep, "','")
    return tuple(reqs)


def _is_word(token: str) -> bool:
    return token not in ("!=", "==", "=", "!", "(", ")", ",", "<", ">")


@dataclass(frozen=True, slots=True)
class _FieldRequirement:
    path: str
    negate: bool
    value: str


def _parse_field_selector(text: str, rtype: ResourceType) -> tuple[_FieldRequirement, ...]:
    reqs: list[_FieldRequirement] = []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        for op in ("!=", "==", "="):
            if op in term:
                path, value = term.split(op, 1)
                break
        else:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        path = path.strip()
        if path not in rtype.field_labels:
            raise bad_request(f"field label not supported: {path}")
        reqs.append(_FieldRequirement(path, op == "!=", value.strip()))
    return tuple(reqs)


def _field_value(obj: JsonDict, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


@dataclass(frozen=True, slots=True)
class Predicate:
    """A parsed label and field selector; every requirement must hold (an empty one matches all)."""

    labels: tuple[LabelRequirement, ...] = ()
    fields: tuple[_FieldRequirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.labels and not self.fields

    def matches(self, obj: JsonDict) -> bool:
        if self.labels:
            labels = obj.get("metadata", {}).get("labels") or {}
            if not all(req.matches(labels) for req in self.labels):
                return False
        for freq in self.fields:
            if (_field_value(obj, freq.path) == freq.value) == freq.negate:
                return False
        return True


def predicate_from_query(query: Mapping[str, str], rtype: ResourceType) -> Predicate:
    """The `labelSelector` and `fieldSelector` of a list or watch request."""
    return Predicate(
        parse_label_selector(query.get("labelSelector") or ""),
        _parse_field_selector(query.get("fieldSelector") or "", rtype),
    )
