"""felixscan's logging: one handler on stderr, as text or as one JSON object a line.

`configured()` installs it for one command and takes it away afterwards (tests call the CLI
many times in one process). `context(cluster=..., phase=..., scan_id=...)` binds the fields a
JSON line carries for everything logged inside it: in this thread, and in the threads and
asyncio tasks started from it with a copy of the context (`scanner.scan` does that per cluster).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("cluster", "phase", "scan_id")
PROGRESS_LOGGER = "scanner.progress"  # progress lines: shown unless -q; the name log filters know

# Libraries that log their internals: at WARNING (urllib3 at ERROR) unless -vv, SQL with -vvv.
# urllib3 warns of each connection it retries ("Retrying (Retry(total=1, ...))"); the cluster's
# error already says what failed, and where. Alembic announces its plugins and dialect at INFO.
_LIBRARIES: tuple[tuple[str, int, int], ...] = (
    ("kubernetes", 2, logging.WARNING),
    ("urllib3", 2, logging.ERROR),
    ("asyncio", 2, logging.WARNING),
    ("alembic", 2, logging.WARNING),
    ("sqlalchemy", 3, logging.WARNING),
)

_context: ContextVar[Mapping[str, Any] | None] = ContextVar("felixscan_log_context",
                                                           default=None)


@contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Bind `cluster`, `phase` and `scan_id` (None leaves a field as it is) until the end."""
    bound = {k: v for k, v in fields.items() if v is not None}
    token = _context.set({**current_context(), **bound})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> Mapping[str, Any]:
    return _context.get() or {}


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: further fields of its JSON line (counts, seconds)."""
    return {"fields": values}


def level_for(verbosity: int) -> int:
    """-q: errors; default: warnings; -v: info; -vv and more: debug."""
    levels = (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)
    return levels[max(-1, min(verbosity, 2)) + 1]


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, and when known
    cluster, phase, scan_id; then the call's `fields`, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound = current_context()  # formatting runs in the thread, and context, that logged
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)  # extra={"cluster": ...} wins over the context
            if value is None:
                value = bound.get(key)
            if value is not None:
                doc[key] = value
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                doc.setdefault(str(key), value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class Overlay(Protocol):
    """A line drawn on the terminal that a log line must not write over."""

    def suspended(self) -> AbstractContextManager[None]: ...


class ConsoleHandler(logging.StreamHandler[TextIO]):
    """stderr; while a progress line is drawn there, each log line goes above it."""

    overlay: Overlay | None = None

    def emit(self, record: logging.LogRecord) -> None:
        overlay = self.overlay
        if overlay is None:
            super().emit(record)
            return
        with overlay.suspended():
            super().emit(record)


def say(text: str, *, level: int = logging.ERROR) -> None:
    """A message for whoever runs felixscan (`felixscan: database error: ...`): the line as it
    is on stderr, or, with JSON logs, one JSON line like every other (logger `felixscan`)."""
    if any(isinstance(h.formatter, JsonFormatter) for h in console_handlers()):
        logging.getLogger("felixscan").log(level, "%s", text.removeprefix("felixscan: "))
    else:
        print(text, file=sys.stderr)


def console_handlers(stream: TextIO | None = None) -> list[ConsoleHandler]:
    """The handlers `configured` installed (on `stream`, when given)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, ConsoleHandler)
            and (stream is None or h.stream is stream)]


@contextmanager
def configured(*, verbosity: int = 0, fmt: str = "text", stream: TextIO | None = None,
               progress: bool = True) -> Iterator[ConsoleHandler]:
    """Log to `stream` (default stderr) as `fmt` at the level of `verbosity` until the end.

    Progress lines (`PROGRESS_LOGGER`, at INFO) show unless `progress` is false or -q. What
    was set before (levels, handlers) is restored afterwards.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    root = logging.getLogger()
    level = level_for(verbosity)
    handler = ConsoleHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    names = [name for name, _, _ in _LIBRARIES] + [PROGRESS_LOGGER]
    saved = {name: logging.getLogger(name).level for name in names}
    saved_root = root.level
    root.setLevel(level)
    for name, verbose_from, quiet_level in _LIBRARIES:
        logging.getLogger(name).setLevel(
            logging.NOTSET if verbosity >= verbose_from else max(quiet_level, level))
    if progress and verbosity >= 0:
        logging.getLogger(PROGRESS_LOGGER).setLevel(min(logging.INFO, level))
    root.addHandler(handler)
    if fmt == "json":  # a Python warning on stderr would be the one line that is not JSON
        logging.captureWarnings(True)
    try:
        yield handler
    finally:
        if fmt == "json":
            logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.overlay = None
        root.setLevel(saved_root)
        for name, value in saved.items():
            logging.getLogger(name).setLevel(value)
