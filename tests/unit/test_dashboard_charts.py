"""The dashboard's SVG (`fleet.dashboard.charts`): hostile names are escaped, parts are in
proportion, a wave's devices not drawn yet show as such, and a series places its points in time
with their error bars."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree

import pytest

from fleet.dashboard.charts import WIDTH, Point, breakdown, series, wave_progress

SVG = "{http://www.w3.org/2000/svg}"


def parse(markup: str) -> ElementTree.Element:
    return ElementTree.fromstring(
        markup.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
    )


def test_names_are_escaped_and_parts_are_in_proportion() -> None:
    markup = str(breakdown([("<script>alert(1)</script>", 3), ("ok", 1)]))
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    rects = parse(markup).findall(f"{SVG}rect")
    widths = [float(r.get("width", 0)) for r in rects[1:]]
    assert widths == [WIDTH * 3 / 4, WIDTH / 4]


def test_an_empty_breakdown_is_an_empty_bar() -> None:
    rects = parse(str(breakdown([("a", 0), ("b", 0)]))).findall(f"{SVG}rect")
    assert [r.get("class") for r in rects] == ["c-empty"]


def test_a_wave_shows_the_devices_not_drawn_yet() -> None:
    markup = str(wave_progress({"succeeded": 2, "failed": 1, "pending": 0}, size=6))
    titles = [t.text for t in parse(markup).iter(f"{SVG}title")]
    assert titles == ["succeeded: 2", "failed: 1", "not drawn: 3"]
    assert 'aria-label="2 of 6 succeeded"' in markup


def test_a_series_places_points_in_time_with_error_bars() -> None:
    points = [Point(100.0, 0.5, 0.1), Point(200.0, 0.7, 0.2)]
    svg = parse(str(series(points, "s&t", span=(0.0, 400.0), span_labels=("6 h ago", "now"))))
    dots = svg.findall(f"{SVG}circle")
    xs = [float(d.get("cx", 0)) for d in dots]
    assert xs[0] < xs[1] < WIDTH / 2 + 48  # both in the first half of the span
    bars = svg.findall(f"{SVG}line")
    assert len(bars) == 2
    lengths = [abs(float(b.get("y1", 0)) - float(b.get("y2", 0))) for b in bars]
    assert lengths[1] == pytest.approx(2 * lengths[0], rel=1e-2)
    assert svg.get("aria-label") == "s&t"
    assert [t.text for t in svg.findall(f"{SVG}text")][-2:] == ["6 h ago", "now"]
    assert re.search(r"no reports for a&amp;b", str(series([], "a&b")))
