"""Inline SVG charts for reports, drawn on the server so they print (no JavaScript).

Every text that goes into the SVG is passed through `markupsafe.escape`, like the templates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Protocol

from markupsafe import Markup, escape


class DayPoint(Protocol):
    """What a chart reads of a day: a cluster's (history.DayPoint) or one control's
    (history.ControlPoint)."""

    @property
    def day(self) -> date: ...
    @property
    def failing(self) -> int: ...
    @property
    def unknown(self) -> int: ...
    @property
    def ratio(self) -> float | None: ...
    @property
    def status(self) -> str: ...

WIDTH, HEIGHT = 700, 230
LEFT, RIGHT, TOP, BOTTOM = 46, 50, 12, 46
RATIO, FAIL, UNKNOWN, ERROR = "#1f5fa8", "#c62828", "#e0a100", "#8a8a8a"
GRID, INK = "#dddddd", "#333333"


def _nice_max(value: int) -> int:
    """A round axis top at or above value that splits into 4 round grid steps."""
    target = max(value, 1) / 4
    magnitude = 1
    while True:
        for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8):
            candidate = step * magnitude
            if candidate >= target and float(candidate).is_integer():
                return int(candidate * 4)
        magnitude *= 10


def _ticks(since: date, days: int) -> list[tuple[int, str]]:
    """Day offsets to label: every day, week or month, whichever keeps labels apart."""
    if days <= 14:
        return [(i, (since + timedelta(i)).strftime("%m-%d")) for i in range(days)]
    if days <= 92:
        return [(i, (since + timedelta(i)).strftime("%m-%d")) for i in range(days)
                if (since + timedelta(i)).weekday() == 0]
    step = 1 if days <= 450 else 3 if days <= 1400 else 12
    ticks: list[tuple[int, str]] = []
    for i in range(days):
        d = since + timedelta(i)
        if d.day == 1 and (d.month - 1) % step == 0:
            ticks.append((i, d.strftime("%b %Y") if d.month == 1 or not ticks
                          else d.strftime("%b")))
    return ticks


@dataclass(frozen=True, slots=True)
class Scale:
    """The axes several charts share, so that they read alike side by side: where the ratio
    axis starts, and the top of the node axis."""

    ratio_floor: float
    nodes_top: int


def shared_scale(serieses: Iterable[Sequence[DayPoint]]) -> Scale:
    """One scale for every chart of a report: the lowest floor and the highest top any needs."""
    points = [p for series in serieses for p in series]
    ratios = [p.ratio for p in points if p.ratio is not None]
    return Scale(ratio_floor=_floor(ratios),
                 nodes_top=_nice_max(max((p.failing + p.unknown for p in points), default=0)))


def _floor(ratios: Sequence[float]) -> float:
    # The ratio axis starts at 0 unless every day stayed high; then it zooms (and says so on
    # the axis) so that a dip from 100 % to 99 % stays visible at 5,000 nodes.
    return min(0.9, math.floor(min(ratios) * 10) / 10) if ratios else 0.0


def trend_chart(series: Sequence[DayPoint], *, since: date, until: date,
                scale: Scale | None = None, height: int = HEIGHT,
                title: str = "Compliance ratio and failing/unknown nodes per day",
                unit: str = "nodes") -> Markup:
    """Compliance ratio (line, left axis) and failing/unknown nodes (stacked bars, right axis)
    for each day of the period; days without a scan are left as gaps. `scale`: axes shared with
    the other charts of the same report (default: this series' own). A smaller `height` makes
    the compact chart of one control, whose `unit` is what its targets are."""
    days = (until - since).days + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, height - TOP - BOTTOM
    base = TOP + plot_h
    slot = plot_w / days
    bar = max(min(slot * 0.8, 14.0), 0.6)
    scale = scale or shared_scale([series])
    low, top_nodes = scale.ratio_floor, scale.nodes_top

    def x(day: date) -> float:
        return LEFT + ((day - since).days + 0.5) * slot

    def y_ratio(r: float) -> float:
        return base - (r - low) / (1 - low) * plot_h

    def y_nodes(n: int) -> float:
        return base - n / top_nodes * plot_h

    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" font-family="DejaVu Sans, sans-serif" '
        'font-size="9">',
        f"<title>{escape(title)}</title>",
    ]
    steps = 4 if plot_h >= 100 else 2  # grid lines a compact chart has room for
    for i in range(steps + 1):
        frac = i / steps
        yy = base - frac * plot_h
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" '
                   f'stroke="{GRID}" stroke-width="0.6"/>')
        value = f"{(low + frac * (1 - low)) * 100:.1f}".removesuffix(".0")
        ratio_label = escape(f"{value} %")
        out.append(f'<text x="{LEFT - 4}" y="{yy + 3:.1f}" text-anchor="end" fill="{RATIO}">'
                   f"{ratio_label}</text>")
        out.append(f'<text x="{LEFT + plot_w + 4}" y="{yy + 3:.1f}" fill="{FAIL}">'
                   f"{escape(str(int(top_nodes * frac)))}</text>")
    # The frame first: a ratio of 100 % runs along its top edge and must stay visible.
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               f'stroke="{INK}" stroke-width="0.6"/>')
    for offset, label in _ticks(since, days):
        xx = LEFT + (offset + 0.5) * slot
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{base}" y2="{base + 3}" '
                   f'stroke="{INK}" stroke-width="0.6"/>')
        out.append(f'<text x="{xx:.1f}" y="{base + 13}" text-anchor="middle" fill="{INK}">'
                   f"{escape(label)}</text>")

    for p in series:
        left = x(p.day) - bar / 2
        if p.failing:
            out.append(f'<rect x="{left:.2f}" y="{y_nodes(p.failing):.2f}" width="{bar:.2f}" '
                       f'height="{base - y_nodes(p.failing):.2f}" fill="{FAIL}"/>')
        if p.unknown:
            y0, y1 = y_nodes(p.failing), y_nodes(p.failing + p.unknown)
            out.append(f'<rect x="{left:.2f}" y="{y1:.2f}" width="{bar:.2f}" '
                       f'height="{y0 - y1:.2f}" fill="{UNKNOWN}"/>')
        if p.ratio is None and p.status == "error":  # nothing was verified that day
            wide = max(bar, 2.0)
            out.append(f'<rect x="{x(p.day) - wide / 2:.2f}" y="{TOP}" width="{wide:.2f}" '
                       f'height="{plot_h}" fill="{ERROR}" fill-opacity="0.6"/>')
        elif p.ratio is None and p.status == "non_compliant":
            # Nothing to probe, yet non-compliant in configuration (a control declared enabled
            # with no pod running): a red mark along the top.
            wide = max(bar, 2.0)
            out.append(f'<rect x="{x(p.day) - wide / 2:.2f}" y="{TOP}" width="{wide:.2f}" '
                       f'height="4" fill="{FAIL}"/>')

    # The ratio line breaks wherever a day has no scan or its scan verified no node.
    runs: list[list[str]] = []
    previous: date | None = None
    for p in series:
        if p.ratio is None:
            previous = None
            continue
        point = f"{x(p.day):.2f},{y_ratio(p.ratio):.2f}"
        if previous is not None and (p.day - previous).days == 1:
            runs[-1].append(point)
        else:
            runs.append([point])
        previous = p.day
    for run in runs:
        if len(run) == 1:
            cx, cy = run[0].split(",")
            out.append(f'<circle cx="{cx}" cy="{cy}" r="1.8" fill="{RATIO}"/>')
        else:
            out.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{RATIO}" '
                       'stroke-width="1.4" stroke-linejoin="round"/>')

    legend_y = height - 10
    items = [(RATIO, "line", "compliance ratio (left axis)"),
             (FAIL, "box", f"failing {unit}"),
             (UNKNOWN, "box", f"unknown {unit} (bars: right axis)"),
             (ERROR, "box", "scan error (nothing verified)")]
    lx = LEFT
    for color, kind, label in items:
        if kind == "line":
            out.append(f'<line x1="{lx}" x2="{lx + 14}" y1="{legend_y - 3}" y2="{legend_y - 3}" '
                       f'stroke="{color}" stroke-width="2"/>')
        else:
            out.append(f'<rect x="{lx}" y="{legend_y - 8}" width="10" height="8" '
                       f'fill="{color}"/>')
        out.append(f'<text x="{lx + 18}" y="{legend_y}" fill="{INK}">{escape(label)}</text>')
        lx += 18 + int(len(label) * 5.2) + 16
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every interpolated text is escaped above
