"""Stream declarations, per-window aggregates and the report format, without a network.

- A Runefile's `telemetry` section is checked against its stages (only an out stage's input, the
  right element type, sane bounds, bins, labels and privacy parameters), every problem named;
  the streams travel in the bundle's manifest and read back the same.
- The window keeps aggregates only: shares per label or bin (outer bins take what is outside),
  a clamped mean; non-finite values are no observations; a new rune discards the window.
- `check_report` takes a device's report and refuses anything that could carry raw data: an
  unknown field anywhere, an unbounded array, a value without noise.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.outputs import OutputRecord
from agent.telemetry.windows import WindowAggregator, stream_sources
from ota.protocol import Refusal
from ota.rune.build import build_bundle
from ota.rune.bundle import read_bundle
from ota.rune.runefile import Problem, RunefileError, parse_runefile
from ota.rune.streams import parse_streams
from ota.telemetry import check_report

PIPELINE = """
version: 1
pipeline:
  rand:
    capability: RAND
    outputs: [{type: F32, dimensions: [1, 2]}]
  word:
    proc-block: "hotg-ai/proc-blocks@v0.11.3#label"
    inputs: [rand]
    outputs: [{type: UTF8, dimensions: [1]}]
    args: {wordlist: "a\\nb"}
  serial:
    out: serial
    inputs: [rand, word]
"""


def _problems(telemetry: str) -> list[str]:
    runefile = parse_runefile(PIPELINE + telemetry)
    problems: list[Problem] = []
    parse_streams(runefile.telemetry, runefile.stages, problems)
    return [str(p) for p in problems]


def test_good_streams_parse() -> None:
    assert (
        _problems(
            """
telemetry:
  level: {kind: mean, value: rand, bounds: [0, 1], epsilon: 0.5}
  spread: {kind: histogram, value: rand, bins: [0, 0.5, 1], epsilon: 1, budget: 4, period_s: 3600}
  words: {kind: labels, value: word, labels: [a, b], epsilon: 2, mechanism: gaussian, delta: 1e-6}
"""
        )
        == []
    )


@pytest.mark.parametrize(
    ("telemetry", "expected"),
    [
        ("x: {kind: median, value: rand, epsilon: 1}", "kind must be one of"),
        ("x: {kind: mean, value: nowhere, bounds: [0, 1], epsilon: 1}", "not an input of an out"),
        ("x: {kind: mean, value: word, bounds: [0, 1], epsilon: 1}", "numeric output"),
        ("x: {kind: labels, value: rand, labels: [a], epsilon: 1}", "UTF8 output"),
        ("x: {kind: mean, value: rand, bounds: [1, 0], epsilon: 1}", "low below high"),
        ("x: {kind: histogram, value: rand, bins: [0, 0, 1], epsilon: 1}", "strictly increasing"),
        ("x: {kind: labels, value: word, labels: [a, other], epsilon: 1}", "counts everything"),
        ("x: {kind: mean, value: rand, bounds: [0, 1], epsilon: 0}", "epsilon must be in"),
        ("x: {kind: mean, value: rand, bounds: [0, 1], epsilon: 50}", "epsilon must be in"),
        ("x: {kind: mean, value: rand, bounds: [0, 1], epsilon: 1, budget: 0.5}", "less than"),
        ("x: {kind: mean, value: rand, bounds: [0, 1], epsilon: 1, mechanism: gaussian}", "delta"),
        ("x: {kind: mean, value: rand, bounds: [0, 1], epsilon: 1, samples: 3}", "unknown key"),
        ("Bad: {kind: mean, value: rand, bounds: [0, 1], epsilon: 1}", "stream names"),
    ],
)
def test_bad_streams_are_named(telemetry: str, expected: str) -> None:
    problems = _problems("telemetry:\n  " + telemetry + "\n")
    assert any(expected in p for p in problems), problems


def test_streams_travel_in_the_manifest(examples_dir: Path) -> None:
    built = build_bundle(examples_dir / "sine" / "Runefile.yml")
    streams = read_bundle(built.data).manifest.streams
    assert [s.name for s in streams] == ["sine_mean", "sine_histogram"]
    assert streams == built.manifest.streams
    with pytest.raises(RunefileError, match="sine_mean: value serial is not an input of an out"):
        text = (examples_dir / "sine" / "Runefile.yml").read_text()
        folder = examples_dir / "sine"
        bad = folder / "Bad.yml"
        bad.write_text(text.replace("value: sine\n    bounds", "value: serial\n    bounds"))
        try:
            build_bundle(bad)
        finally:
            bad.unlink()


def _sine_window(examples_dir: Path) -> WindowAggregator:
    manifest = build_bundle(examples_dir / "sine" / "Runefile.yml").manifest
    window = WindowAggregator()
    window.use("default/sine@0.1.0", stream_sources(manifest))
    return window


def _record(angle: float, sine: Any) -> OutputRecord:
    tensor = {"type_name": "f32", "channel": 1, "dimensions": [1, 1]}
    return OutputRecord(1, [{**tensor, "elements": [angle]}, {**tensor, "elements": [sine]}])


def test_a_window_keeps_shares_and_a_clamped_mean(examples_dir: Path) -> None:
    window = _sine_window(examples_dir)
    for sine in (-0.9, -0.2, 0.1, 0.7, 3.0, "NaN"):
        window.observe([_record(10.0, sine)])
    rune, vectors = window.close()
    assert rune == "default/sine@0.1.0"
    # Five finite values; 3.0 is clamped to the bound 1 for the mean and into the last bin.
    assert vectors["sine_mean"] == pytest.approx(((-0.9 - 0.2 + 0.1 + 0.7 + 1.0) / 5,))
    assert vectors["sine_histogram"] == pytest.approx((0.2, 0.2, 0.2, 0.4))
    # The next window starts empty, and a window with nothing releases nothing.
    assert window.close()[1] == {}


def test_a_new_rune_discards_the_window(examples_dir: Path) -> None:
    window = _sine_window(examples_dir)
    window.observe([_record(1.0, 0.5)])
    window.use("default/other@1.0.0", [])
    assert window.close() == ("default/other@1.0.0", {})


def _report() -> dict[str, Any]:
    return {
        "window": [100.0, 400.0],
        "ops": {
            "agent_version": "0.1.0",
            "uptime_s": 900.0,
            "active": {"ref": "default/sine@0.1.0", "sha256": "ab" * 32},
            "deployment": "idle",
            "inferences": 300,
            "failures": 0,
            "waiting": 0,
            "sandbox_errors": {"limit-exceeded": 1},
            "latency_ms": {"p50": 1.5, "p95": None},
            "cpu_s": 2.0,
            "rss_bytes": 80_000_000,
            "reports_dropped": 0,
        },
        "streams": [
            {
                "stream": "sine/sine_histogram",
                "rune": "default/sine@0.1.0",
                "kind": "histogram",
                "keys": ["a", "b"],
                "values": [0.7, 0.1],
                "mechanism": "laplace",
                "epsilon": 1.0,
                "delta": 0.0,
                "noise_std": 2.83,
            }
        ],
        "paused": [{"stream": "sine/sine_mean", "reason": "budget"}],
    }


def test_a_report_of_aggregates_passes() -> None:
    report = check_report(_report())
    assert report.streams[0].values == (0.7, 0.1)
    assert report.paused == (("sine/sine_mean", "budget"),)
    assert check_report(report.to_json()) == report


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    target: Any = changed
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value", "kind"),
    [
        ("samples", [0.1, 0.2], "raw-data"),
        ("ops.last_output", 0.42, "raw-data"),
        ("streams.0.raw", [0.1], "raw-data"),
        ("streams.0.values", [0.5] * 40, "raw-data"),
        ("streams.0.noise_std", 0.0, "raw-data"),
        ("streams.0.values", [0.5, math.inf], "raw-data"),
        ("streams.0.values", [0.5, "0.1"], "raw-data"),
        ("streams.0.epsilon", 100.0, "malformed"),
        ("streams.0.stream", "sine", "malformed"),
        ("ops.inferences", -1, "malformed"),
        ("ops.deployment", "x" * 100, "malformed"),
        ("window", [400.0, 100.0], "malformed"),
        ("paused", [{"stream": "sine/sine_mean", "reason": "because"}], "malformed"),
    ],
)
def test_a_report_that_could_carry_raw_data_is_refused(path: str, value: Any, kind: str) -> None:
    with pytest.raises(Refusal) as refused:
        check_report(_set(_report(), path, value))
    assert refused.value.kind == kind


def test_too_many_streams_or_error_kinds_are_refused() -> None:
    many = _set(_report(), "streams", [_report()["streams"][0]] * 9)
    with pytest.raises(Refusal, match="at most 8"):
        check_report(many)
    errors = _set(_report(), "ops.sandbox_errors", {f"k{i}": 1 for i in range(20)})
    with pytest.raises(Refusal, match="at most 16"):
        check_report(errors)
