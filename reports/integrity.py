"""Integrity of a report: the canonical JSON of its data, its SHA-256, and checking a PDF.

The hash printed in a report is `sha256(canonical_json(data))`. The PDF embeds those exact
bytes as the attachment `felixscan-report-data.json` and records the hash twice more, where
`verify_pdf` looks for it: in the document keywords (`sha256:<hex>`, Info dictionary and XMP)
and in the attachment's description. The printed page footers carry it for a human reader.
`report_data` reads the embedded bytes back into the `ReportData` they were made from.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from scanner.core.errors import ReportError
from scanner.db.queries.history import ReportData

ATTACHMENT_NAME = "felixscan-report-data.json"
HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"sha256:([0-9a-f]{64})")


def to_jsonable(value: Any) -> Any:
    """Dataclasses, dates and tuples as the plain JSON values the hash is computed over."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def canonical_json(data: Any) -> bytes:
    """The canonical form: sorted keys, no whitespace, UTF-8 (not \\u-escaped), no NaN."""
    return json.dumps(to_jsonable(data), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def report_hash(data: Any) -> str:
    """Hex SHA-256 over `canonical_json(data)`; `data` may also be the canonical bytes."""
    raw = data if isinstance(data, bytes) else canonical_json(data)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of `verify_pdf`: `matched` only when every recorded hash agrees."""

    matched: bool
    expected: str | None  # the hash the PDF records (keywords, else attachment description)
    actual: str | None  # the hash of the embedded data, recomputed
    printed: bool  # the expected hash appears in the text of the first page
    canonical: bool  # the embedded data is in canonical form
    reason: str
    # the embedded data itself, for `report_data` (None: there is no attachment)
    content: bytes | None = field(default=None, repr=False, compare=False)


def verify_pdf(path: str | Path) -> VerifyResult:
    """Recompute the hash of the data embedded in a felixscan PDF and compare it."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as exc:  # pragma: no cover - pypdf is a dependency
        raise ReportError("verifying a PDF needs pypdf (pip install pypdf)") from exc
    try:
        with open(path, "rb") as fh:
            if fh.read(5) != b"%PDF-":  # say so plainly, before pypdf logs its own complaints
                raise ReportError(f"{path}: not a PDF file")
        reader = PdfReader(str(path))
        embedded = next((f for f in reader.attachment_list if f.name == ATTACHMENT_NAME), None)
        info = reader.metadata
        keywords = str(info.get("/Keywords") or "") if info is not None else ""
        first_page = reader.pages[0].extract_text() if reader.pages else ""
        content = embedded.content if embedded is not None else None
        description = (embedded.description or "") if embedded is not None else ""
    except (OSError, PdfReadError, ValueError, KeyError) as exc:
        raise ReportError(f"{path}: not a readable PDF: {exc}") from exc
    found = _HASH_RE.search(keywords) or _HASH_RE.search(description)
    expected = found.group(1) if found else None
    if content is None:
        return VerifyResult(False, expected, None, False, False,
                            f"no {ATTACHMENT_NAME} attachment: not a felixscan report PDF, or "
                            "made with a PDF variant that drops attachments")
    actual = report_hash(content)
    canonical = _is_canonical(content)
    # Text extraction may break the 64 digits over lines; compare without whitespace.
    printed = expected is not None and expected in re.sub(r"\s+", "", first_page)
    if expected is None:
        reason = "the PDF records no SHA-256 to compare with"
    elif actual != expected:
        reason = "the embedded data does not match the recorded SHA-256: it was altered"
    elif not printed:
        reason = "the embedded data matches, but the hash printed on the report differs"
    else:
        reason = "the embedded data matches the SHA-256 recorded and printed in the report"
    return VerifyResult(matched=actual == expected and printed, expected=expected,
                        actual=actual, printed=printed, canonical=canonical, reason=reason,
                        content=content)


def _is_canonical(raw: bytes) -> bool:
    try:
        return canonical_json(json.loads(raw)) == raw
    except (UnicodeDecodeError, ValueError):
        return False


def report_data(raw: bytes) -> ReportData:
    """The `ReportData` that `canonical_json` made `raw` from, rebuilt (dates, tuples and
    nested records included). Raises ReportError when `raw` does not fit this felixscan's
    report data, or does not encode back to exactly `raw` (so nothing was lost on the way).
    """
    try:
        data = _decode(ReportData, json.loads(raw), "data")
    except (ValueError, TypeError, KeyError) as exc:
        raise ReportError(f"the embedded data does not fit this felixscan's report data: "
                          f"{exc}") from exc
    if not isinstance(data, ReportData) or canonical_json(data) != raw:
        raise ReportError("the embedded data does not read back to the same bytes")
    return data


@functools.cache
def _fields(tp: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A record type's field types and names, worked out once per type (not per record: a
    5,000-node report holds 5,000 node records)."""
    return typing.get_type_hints(tp), frozenset(f.name for f in dataclasses.fields(tp))


def _decode(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as the type `tp` of a report data field; the inverse of
    `to_jsonable`. Values are not coerced (an int stays an int in a float field) so that the
    result encodes back to the same bytes."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) != 1:
            raise TypeError(f"{where}: cannot tell which of {tp} it is")
        return _decode(options[0], value, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object for {tp.__name__}")
        hints, names = _fields(tp)
        if set(value) - names:
            raise TypeError(f"{where}: unknown field(s) {', '.join(sorted(set(value) - names))}")
        return tp(**{k: _decode(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list")
        (item, *_) = typing.get_args(tp)
        items = [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object")
        return value  # free-form (Mapping[str, Any]): kept as parsed
    if tp is datetime:
        return datetime.fromisoformat(value)
    if tp is date:
        return date.fromisoformat(value)
    expected = (int, float) if tp is float else tp
    if not isinstance(value, expected) or (tp is not bool and isinstance(value, bool)):
        raise TypeError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value
