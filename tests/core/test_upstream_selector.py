"""Calico's own selector test tables (tests/upstream/calico_selector_cases.py) run against
scanner.core.selector, the port of libcalico-go/lib/selector."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from scanner.core.selector import Selector, SelectorParseError, _tokenize, parse
from tests.upstream.calico_selector_cases import (
    BAD_SELECTORS,
    CANONICALISATION_TESTS,
    LABEL_RESTRICTION_SELECTORS,
    SELECTOR_TESTS,
    SKIPPED,
    TOKEN_TESTS,
    VISITOR_PREFIX,
    VISITOR_TESTS,
)


def _short(text: str) -> str:
    """A selector as a readable test id, long ones cut."""
    return repr(text) if len(text) <= 60 else f"{text[:20]!r}...({len(text)} chars)"


def _upstream_unique_id(canonical: str) -> str:
    """libcalico-go/lib/hash/unique_id.go: MakeUniqueID("s", canonical), as ast.go's
    Selector.updateFields computes UniqueID() from String()."""
    digest = hashlib.sha224(f"s:{canonical}".encode()).digest()
    return "s:" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


_EVALUATIONS = [
    pytest.param(sel, labels, expected,
                 id=f"selectorTests[{i}] {_short(sel)} {'matches' if expected else 'rejects'} "
                    f"{labels}")
    for i, (sel, matches, non_matches) in enumerate(SELECTOR_TESTS)
    for expected, label_sets in ((True, matches), (False, non_matches))
    for labels in label_sets
]


@pytest.mark.parametrize(("sel", "labels", "expected"), _EVALUATIONS)
def test_selector_evaluates(sel: str, labels: dict[str, str], expected: bool) -> None:
    """libcalico-go/lib/selector/parser/parser_test.go: Describe("Parser"), selectorTests:
    "should match", "should not match" and both again "after canonicalising"."""
    selector = parse(sel)
    assert selector.evaluate(labels) is expected
    assert parse(selector.string()).evaluate(labels) is expected


@pytest.mark.parametrize(("sel", "comment"), [
    pytest.param(sel, comment, id=f"badSelectors[{i}] {_short(sel)} ({comment})")
    for i, (sel, comment) in enumerate(BAD_SELECTORS)
])
def test_bad_selector_rejected(sel: str, comment: str) -> None:
    """libcalico-go/lib/selector/parser/parser_test.go: It("Should reject bad selector"),
    badSelectors; the rejection is parser.go: Parse's."""
    with pytest.raises(SelectorParseError):
        parse(sel)


@pytest.mark.parametrize(("text", "canonical", "uid"), [
    pytest.param(text, canonical, uid, id=f"canonicalisationTests[{i}] {_short(text)}")
    for i, (text, canonical, uid) in enumerate(CANONICALISATION_TESTS)
])
def test_canonicalises_and_round_trips(text: str, canonical: str, uid: str) -> None:
    """libcalico-go/lib/selector/parser/parser_test.go: "should canonicalise %v as %v with UID
    %v and round-trip" and "should calculate the correct UID", canonicalisationTests."""
    selector = parse(text)
    assert selector.text == text
    assert selector.string() == canonical
    assert parse(canonical).string() == canonical
    if uid:
        assert _upstream_unique_id(selector.string()) == uid


@pytest.mark.parametrize(("description", "text", "visited"), [
    pytest.param(description, text, visited, id=description)
    for description, text, visited in VISITOR_TESTS
])
def test_visitor_table_canonical_form(description: str, text: str, visited: str) -> None:
    """libcalico-go/lib/selector/parser/parser_test.go: DescribeTable("Visitor tests"). The
    PrefixVisitor is not ported: the input must parse, and its String() must be upstream's
    output without VISITOR_PREFIX on label names; the output itself is canonical."""
    assert parse(text).string() == visited.replace(VISITOR_PREFIX, "")
    assert parse(visited).string() == visited


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(text, expected, id=f"tokenTests[{i}] {_short(text)}")
    for i, (text, expected) in enumerate(TOKEN_TESTS)
])
def test_tokenizes(text: str, expected: list[tuple[str, str]] | None) -> None:
    """libcalico-go/lib/selector/tokenizer/tokenizer_test.go: Describe("Token"), tokenTests,
    against the port of tokenizer.go: Tokenize. Every input the tokenizer rejects must also
    be rejected by parser.go: Parse, which tokenizes first."""
    if expected is None:
        with pytest.raises(SelectorParseError):
            _tokenize(text)
        with pytest.raises(SelectorParseError):
            parse(text)
    else:
        assert [(t.kind, t.value) for t in _tokenize(text)] == expected


@pytest.mark.parametrize("sel", [
    pytest.param(sel, id=f"labelRestrictionsTests[{i}] {_short(sel)}")
    for i, sel in enumerate(LABEL_RESTRICTION_SELECTORS)
])
def test_label_restriction_selectors_parse(sel: str) -> None:
    """libcalico-go/lib/selector/parser/label_restriction_test.go: TestLabelRestrictions,
    the parser.go: Parse calls only (of the selector, and of "all() && (<selector>)" with
    the same meaning); the restrictions themselves are in SKIPPED."""
    selector = parse(sel)
    assert isinstance(selector, Selector)
    if sel:
        prefixed = parse(f"all() && ({sel})")
        for labels in ({}, {"a": "value"}, {"a": "v1"}, {"a": "v2", "b": "v2"}):
            assert prefixed.evaluate(labels) is selector.evaluate(labels)


# What was carried over; a later edit may add cases but never silently drop one.
_CARRIED_OVER: dict[str, tuple[list[Any], int]] = {
    "parser_test.go selectorTests": (SELECTOR_TESTS, 58),
    "parser_test.go selectorTests label sets": (_EVALUATIONS, 98),
    "parser_test.go badSelectors": (BAD_SELECTORS, 26),
    "parser_test.go canonicalisationTests": (CANONICALISATION_TESTS, 17),
    "parser_test.go Visitor tests": (VISITOR_TESTS, 11),
    "tokenizer_test.go tokenTests": (TOKEN_TESTS, 49),
    "label_restriction_test.go labelRestrictionsTests": (LABEL_RESTRICTION_SELECTORS, 32),
}


@pytest.mark.parametrize("table", list(_CARRIED_OVER))
def test_no_carried_over_case_dropped(table: str) -> None:
    """The upstream tables (parser_test.go, tokenizer_test.go, label_restriction_test.go)
    keep at least as many cases as were ported."""
    cases, ported = _CARRIED_OVER[table]
    assert len(cases) >= ported


def test_skipped_cases_have_reasons() -> None:
    """Upstream cases not carried over (parser_test.go, label_restriction_test.go,
    stringset_test.go) are listed, each with its file and a reason."""
    assert len(SKIPPED) >= 37
    for upstream_file, case, reason in SKIPPED:
        assert upstream_file.startswith("libcalico-go/lib/selector/") and case and reason
