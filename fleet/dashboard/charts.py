"""SVG pictures for the dashboard: a breakdown bar, a wave's progress, a series with error bars.

Rules: every function returns finished SVG markup (`Markup`), built with `Markup.format`, which
escapes every value put into it (names, labels, numbers alike); sizes are
in the SVG's own units and the picture scales to its container (`viewBox`, width 100%), so it
works at a phone's width. Colours are CSS classes (`dashboard.css`), never inline styles, so the
page's content security policy can forbid inline styles. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup

WIDTH = 600.0


def _class(name: str) -> str:
    return "c-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())


def breakdown(parts: Sequence[tuple[str, int]], height: float = 18.0, label: str = "") -> Markup:
    """One horizontal bar split into `parts` (name, count), each in its own class, with a title
    per part for hovering; an empty bar when everything is 0."""
    total = sum(count for _, count in parts)
    shapes = [
        Markup('<rect class="c-empty" x="0" y="0" width="{}" height="{}"/>').format(
            f"{WIDTH:g}", f"{height:g}"
        )
    ]
    x = 0.0
    for name, count in parts:
        if count <= 0 or total == 0:
            continue
        width = WIDTH * count / total
        shapes.append(
            Markup(
                '<rect class="{}" x="{}" y="0" width="{}" height="{}"><title>{}: {}</title></rect>'
            ).format(_class(name), f"{x:.2f}", f"{width:.2f}", f"{height:g}", name, count)
        )
        x += width
    title = label or ", ".join(f"{name} {count}" for name, count in parts)
    return Markup(
        '<svg class="bar" role="img" aria-label="{}" viewBox="0 0 {} {}" '
        'preserveAspectRatio="none">{}</svg>'
    ).format(title, f"{WIDTH:g}", f"{height:g}", Markup("").join(shapes))


def wave_progress(counts: dict[str, int], size: int) -> Markup:
    """A wave's devices by state, against the wave's size (devices not drawn yet are empty)."""
    order = ("succeeded", "failed", "rolled-back", "timed-out", "skipped", "health-check",
             "installing", "verifying", "downloading", "notified", "pending")  # fmt: skip
    parts = [(state, counts.get(state, 0)) for state in order]
    parts += [(s, n) for s, n in sorted(counts.items()) if s not in order]
    drawn = sum(n for _, n in parts)
    if size > drawn:
        parts.append(("not drawn", size - drawn))
    done = counts.get("succeeded", 0)
    return breakdown(parts, label=f"{done} of {size} succeeded")


@dataclass(frozen=True)
class Point:
    at: float  # Unix time
    value: float
    error: float  # the 95% half-width


def series(
    points: Sequence[Point],
    title: str,
    span: tuple[float, float] | None = None,
    span_labels: tuple[str, str] = ("", ""),
    height: float = 160.0,
) -> Markup:
    """A line through `points` with each point's error bar (and a shaded band between them),
    time on x over `span` (default: the points' own), the value range on y; a note instead when
    there are no points."""
    if not points:
        return Markup('<p class="muted">no reports for {} in this period</p>').format(title)
    pad_left, pad, pad_bottom = 48.0, 8.0, 18.0
    low = min(p.value - p.error for p in points)
    high = max(p.value + p.error for p in points)
    if high - low < 1e-9:
        low, high = low - 1.0, high + 1.0
    start, end = span if span is not None else (points[0].at, points[-1].at)
    width = end - start

    def x(at: float) -> float:
        share = (at - start) / width if width > 0 else 0.5
        return pad_left + (WIDTH - pad_left - pad) * share

    def y(value: float) -> float:
        return pad + (height - pad - pad_bottom) * (1 - (value - low) / (high - low))

    band = " ".join(f"{x(p.at):.1f},{y(p.value + p.error):.1f}" for p in points)
    band += " " + " ".join(f"{x(p.at):.1f},{y(p.value - p.error):.1f}" for p in reversed(points))
    line = " ".join(f"{x(p.at):.1f},{y(p.value):.1f}" for p in points)
    marks = Markup("").join(
        Markup(
            '<line class="err" x1="{x}" x2="{x}" y1="{top}" y2="{bottom}"/>'
            '<circle class="dot" cx="{x}" cy="{y}" r="3"><title>{text}</title></circle>'
        ).format(
            x=f"{x(p.at):.1f}",
            y=f"{y(p.value):.1f}",
            top=f"{y(p.value + p.error):.1f}",
            bottom=f"{y(p.value - p.error):.1f}",
            text=f"{p.value:.4g} ± {p.error:.3g}",
        )
        for p in points
    )
    base = height - 4
    return Markup(
        '<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {} {}">'
        '<text class="axis" x="2" y="{}">{}</text><text class="axis" x="2" y="{}">{}</text>'
        '<text class="axis" x="{}" y="{}">{}</text>'
        '<text class="axis" x="{}" y="{}" text-anchor="end">{}</text>'
        '<polygon class="band" points="{}"/><polyline class="line" points="{}"/>{}</svg>'
    ).format(
        title, f"{WIDTH:g}", f"{height:g}", f"{pad + 10:.0f}", f"{high:.3g}",
        f"{height - pad_bottom:.0f}", f"{low:.3g}", f"{pad_left:.0f}", f"{base:.0f}",
        span_labels[0], f"{WIDTH - pad:.0f}", f"{base:.0f}", span_labels[1], band, line, marks,
    )  # fmt: skip
