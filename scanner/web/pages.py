"""The pages of `felixscan serve`: the `web_*.html.j2` templates beside this module (autoescaped;
no inline script or style, so the page's Content-Security-Policy can forbid both), their
stylesheet, and the small inline SVG charts they show.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from reports.charts import trend_chart
from scanner.db.queries.history import DayPoint

TEMPLATES = Path(__file__).resolve().parent / "templates"
FAIL, UNKNOWN, OK, ERROR, LINE = "#c62828", "#e0a100", "#2e7d32", "#8a8a8a", "#1f5fa8"


@cache
def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, ago=_ago, pct=_pct)
    return env


@cache
def stylesheet() -> bytes:
    """The page's stylesheet, served as a file so the CSP needs no 'unsafe-inline'."""
    return (TEMPLATES / "web.css").read_bytes()


def render_page(template: str, **context: Any) -> str:
    """One of the `web_*.html.j2` templates, autoescaped."""
    return _environment().get_template(template).render(**context)


def _when(value: datetime | date | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return value.isoformat()


def _ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return ""
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    if seconds < 0:
        seconds = -seconds
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                return f"in {int(seconds // size)} {unit}"
        return "in <1 min"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


def _pct(value: float | None) -> str:
    if value is None:
        return "—"
    text = f"{value * 100:.1f}"
    return ("100" if text == "100.0" else text) + " %"


def sparkline(points: Sequence[Any], *, since: date, until: date, width: int = 160,
              height: int = 28, unit: str = "nodes") -> Markup:
    """Compliance ratio per day (line) with failing days marked; error days as grey bars.

    `points` need `day`, `status`, `nodes`, `failing`, `unknown` and `ratio` (a cluster's day
    points, or one control's, whose `nodes` are its targets).
    """
    days = max((until - since).days + 1, 1)
    slot = width / days
    top, bottom = 3.0, height - 3.0

    def x(day: date) -> float:
        return ((day - since).days + 0.5) * slot

    def y(ratio: float) -> float:
        return bottom - ratio * (bottom - top)

    ratios = [p.ratio for p in points if p.ratio is not None]
    worst = min(ratios) if ratios else None
    failing_days = sum(1 for p in points if p.failing or p.unknown)
    label = (f"{days}-day trend: {len(points)} days scanned, {failing_days} with failing or "
             f"unknown {unit}, lowest compliance {_pct(worst)}")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="spark" viewBox="0 0 {width} '
           f'{height}" width="{width}" height="{height}" role="img" aria-label="{escape(label)}">',
           f"<title>{escape(label)}</title>",
           f'<line x1="0" x2="{width}" y1="{top}" y2="{top}" stroke="#dddddd" '
           'stroke-width="0.5"/>']
    run: list[str] = []
    runs: list[list[str]] = []
    previous: date | None = None
    for p in points:
        ratio = p.ratio
        if ratio is None:
            # Nothing probed: an error scan (grey); for one control, a component with nothing
            # to probe is compliant (nothing drawn) or non-compliant in configuration (red).
            if p.status in ("error", "non_compliant"):
                out.append(f'<rect x="{x(p.day) - max(slot / 2, 0.5):.1f}" y="{top}" '
                           f'width="{max(slot, 1.0):.1f}" height="{bottom - top}" '
                           f'fill="{ERROR if p.status == "error" else FAIL}" '
                           'fill-opacity="0.5"/>')
            previous = None
            continue
        px, py = x(p.day), y(ratio)
        point = f"{px:.1f},{py:.1f}"
        if previous is not None and (p.day - previous).days == 1:
            run.append(point)
        else:
            run = [point]
            runs.append(run)
        previous = p.day
        if p.failing or p.unknown:
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="1.6" '
                       f'fill="{FAIL if p.failing else UNKNOWN}"/>')
    for line in runs:
        if len(line) > 1:
            out.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{LINE}" '
                       'stroke-width="1.2" stroke-linejoin="round"/>')
        else:
            cx, cy = line[0].split(",")
            out.append(f'<circle cx="{cx}" cy="{cy}" r="1.2" fill="{LINE}"/>')
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - the only text in it is escaped above


def history_chart(series: Sequence[DayPoint], *, since: date, until: date) -> Markup:
    """The report's trend chart, for the cluster page."""
    return trend_chart(series, since=since, until=until)
