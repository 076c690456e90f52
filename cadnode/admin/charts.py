"""Charts drawn on the server as inline SVG: no script, nothing fetched from elsewhere."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 720, 240
LEFT, BOTTOM, TOP, RIGHT = 48, 36, 16, 12
SERIES_COLOURS = ("#2b7bb9", "#e08a00", "#c0392b")


def bar_chart(
    bars: Sequence[tuple[str, float]], *, title: str, unit: str = "", every_nth_label: int = 1
) -> Markup:
    """One bar per (label, value), a labelled y axis from zero."""
    return grouped_bar_chart(
        [(label, [value]) for label, value in bars],
        series=[title],
        title=title,
        unit=unit,
        every_nth_label=every_nth_label,
        legend=False,
    )


def grouped_bar_chart(
    groups: Sequence[tuple[str, Sequence[float]]],
    *,
    series: Sequence[str],
    title: str,
    unit: str = "",
    every_nth_label: int = 1,
    legend: bool = True,
) -> Markup:
    """Groups of bars side by side, one colour per series."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = _nice_ceiling(max((v for _, values in groups for v in values), default=0.0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" class="chart"><title>{escape(title)}</title>'
    ]
    for tick in range(5):
        value = top * tick / 4
        y = TOP + plot_h - plot_h * tick / 4
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{_format(value)}{escape(unit)}</text>"
        )
    slot = plot_w / max(len(groups), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(groups):
        x0 = LEFT + index * slot + slot * 0.1
        for s, value in enumerate(values):
            height = 0.0 if top == 0 else plot_h * value / top
            parts.append(
                f'<rect x="{x0 + s * bar:.1f}" y="{TOP + plot_h - height:.1f}" '
                f'width="{max(bar - 1, 1):.1f}" height="{height:.1f}" '
                f'fill="{SERIES_COLOURS[s % len(SERIES_COLOURS)]}">'
                f"<title>{escape(label)} {escape(series[s])}: {_format(value)}{escape(unit)}"
                "</title></rect>"
            )
        if index % every_nth_label == 0:
            parts.append(
                f'<text x="{x0 + slot * 0.4:.1f}" y="{HEIGHT - BOTTOM + 14}" '
                f'text-anchor="middle" font-size="11">{escape(label)}</text>'
            )
    if legend:
        for s, name in enumerate(series):
            x = LEFT + 8 + s * 90
            parts.append(
                f'<rect x="{x}" y="{HEIGHT - 14}" width="10" height="10" '
                f'fill="{SERIES_COLOURS[s % len(SERIES_COLOURS)]}"/>'
                f'<text x="{x + 14}" y="{HEIGHT - 5}" font-size="11">{escape(name)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def hour_label(moment: dt.datetime) -> str:
    return moment.strftime("%H:00")


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten at or above `value` (1 for 0)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** _floor_log10(value)
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _floor_log10(value: float) -> int:
    exponent = 0
    while value >= 10:
        value /= 10
        exponent += 1
    while value < 1:
        value *= 10
        exponent -= 1
    return exponent


def _format(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"
