"""The output sink: JSON lines on a real disk, bounded by rotation, private, and reopened when
something else moves the file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.sandbox.outputs import OutputRecord
from agent.sink import OutputSink, SinkError


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_strict_json_line_per_output(tmp_path: Path) -> None:
    sink = OutputSink(tmp_path / "logs" / "outputs.jsonl", 1 << 20)
    records = [
        OutputRecord(1, {"type_name": "f32", "elements": [0.5, float("nan")]}),
        OutputRecord(2, [{"x": float("inf")}, {"y": -float("inf")}]),
    ]
    assert sink.write(12.5, "sine@1.0.0", records) == 2
    assert sink.write(13.0, "sine@1.0.0", []) == 0
    sink.close()
    path = tmp_path / "logs" / "outputs.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "NaN" not in path.read_text().replace('"NaN"', "")  # strict JSON
    assert lines(path) == [
        {
            "t": 12.5,
            "rune": "sine@1.0.0",
            "channel": 1,
            "output": {"type_name": "f32", "elements": [0.5, "NaN"]},
        },
        {"t": 12.5, "rune": "sine@1.0.0", "channel": 2, "output": [{"x": "inf"}, {"y": "-inf"}]},
    ]


def test_the_sink_never_grows_past_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "outputs.jsonl"
    bound = 4096
    sink = OutputSink(path, bound)
    for i in range(500):
        sink.write(float(i), "r@1", [OutputRecord(1, {"i": i})])
        assert path.stat().st_size <= bound
        rotated = path.with_name("outputs.jsonl.1")
        assert not rotated.exists() or rotated.stat().st_size <= bound
    # Nothing lost between the two files but what older rotations dropped; the newest is last.
    newest = lines(rotated) + lines(path)
    assert [r["t"] for r in newest] == list(range(500 - len(newest), 500))
    assert len(newest) > 100


def test_an_output_larger_than_the_bound_is_replaced_by_a_marker(tmp_path: Path) -> None:
    path = tmp_path / "outputs.jsonl"
    sink = OutputSink(path, 4096)
    sink.write(1.0, "r@1", [OutputRecord(1, {"bytes": "ab" * 5000}), OutputRecord(2, 7)])
    first, second = lines(path)
    assert "output" not in first and "larger than the sink's max_bytes 4096" in str(
        first["dropped"]
    )
    assert second["output"] == 7


def test_appends_across_restarts_and_reopens_a_moved_file(tmp_path: Path) -> None:
    path = tmp_path / "outputs.jsonl"
    OutputSink(path, 1 << 20).write(1.0, "r@1", [OutputRecord(1, 1)])
    sink = OutputSink(path, 1 << 20)
    sink.write(2.0, "r@1", [OutputRecord(1, 2)])
    assert [r["t"] for r in lines(path)] == [1.0, 2.0]
    path.rename(tmp_path / "moved.jsonl")  # logrotate
    sink.write(3.0, "r@1", [OutputRecord(1, 3)])
    assert [r["t"] for r in lines(path)] == [3.0]
    path.unlink()
    sink.write(4.0, "r@1", [OutputRecord(1, 4)])
    assert [r["t"] for r in lines(path)] == [4.0]


def test_an_unwritable_sink_is_an_error_and_stays_usable(tmp_path: Path) -> None:
    path = tmp_path / "outputs.jsonl"
    path.mkdir()
    sink = OutputSink(path, 1 << 20)
    with pytest.raises(SinkError, match="cannot write the output sink"):
        sink.write(1.0, "r@1", [OutputRecord(1, 1)])
    path.rmdir()
    sink.write(2.0, "r@1", [OutputRecord(1, 2)])
    assert [r["t"] for r in lines(path)] == [2.0]
