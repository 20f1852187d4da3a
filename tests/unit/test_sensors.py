"""Input sources: the simulated accelerometer, replayed files and FIFOs, and how they feed
capabilities through the sandbox's `InputSources` interface.

Files and FIFOs are real (a temp dir, `os.mkfifo`, a writer in this process); the capability specs
are what the sandbox parses from a rune's args.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.runconfig import AccelerometerInput, RandomInput, ReplayInput, SampleFormat
from agent.sandbox.errors import InputError
from agent.sandbox.inputs import GRAVITY, InputFiles, InputSources
from agent.sensors import AccelSimulator, InputPending, LiveSources, ReplayStream, SourceError
from ota.rune.capabilities import CapabilitySpec, parse_capability
from ota.rune.runefile import CapabilityKind
from ota.rune.tensors import ElementType

ACCEL4 = parse_capability(CapabilityKind.ACCEL, {"n": 4})
RAW = parse_capability(CapabilityKind.RAW, {})
SOUND = parse_capability(CapabilityKind.SOUND, {"hz": 8, "sample_duration_ms": 1000})
RAND = parse_capability(CapabilityKind.RAND, {})


def f32(values: bytes) -> list[float]:
    return [float(v) for v in np.frombuffer(values, dtype="<f4")]


def i16(values: bytes) -> list[int]:
    return [int(v) for v in np.frombuffer(values, dtype="<i2")]


def replay(path: Path, fmt: SampleFormat, **options: float) -> LiveSources:
    return LiveSources(ReplayInput(path, fmt, seed=5, **options))


# -- the simulated accelerometer ----------------------------------------------------------------


def test_the_simulator_is_deterministic_whatever_the_window_sizes() -> None:
    whole = AccelSimulator(3, 100, 0.05, 2.0).rows(1000)
    assert whole.shape == (1000, 3) and whole.dtype == np.float32
    pieces = AccelSimulator(3, 100, 0.05, 2.0)
    split = np.vstack([pieces.rows(n) for n in (1, 127, 128, 300, 44, 400)])
    assert np.array_equal(whole, split)
    assert not np.array_equal(whole, AccelSimulator(4, 100, 0.05, 2.0).rows(1000))


def test_the_simulator_at_rest_reads_gravity_with_noise() -> None:
    rows = AccelSimulator(1, 100, 0.05, 0.0).rows(2000).astype(np.float64)
    magnitude = np.linalg.norm(rows, axis=1)
    assert abs(magnitude.mean() - GRAVITY) < 0.05
    assert 0.03 < rows[:, 0].std() < 0.07  # the noise asked for, no bursts
    assert np.abs(magnitude - GRAVITY).max() < 0.5


def test_the_simulator_makes_gesture_like_bursts_now_and_then() -> None:
    hz, seconds = 100, 60
    rows = AccelSimulator(2, hz, 0.05, 3.0).rows(hz * seconds).astype(np.float64)
    moving = np.abs(np.linalg.norm(rows - rows.mean(axis=0), axis=1)) > 2.0
    assert moving.any()
    # Bursts are short and separated: most of the time the device is at rest.
    assert moving.mean() < 0.3
    starts = np.flatnonzero(moving[1:] & ~moving[:-1])
    assert len(starts) >= 5


# -- random and the always-seeded RAND -----------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "nbytes"),
    [
        (ACCEL4, 48),
        (SOUND, 16),
        (RAW, 10),
        (parse_capability(CapabilityKind.IMAGE, {"width": 2, "height": 2}), 12),
    ],
)
def test_random_is_the_sandbox_synthetic_data(spec: CapabilitySpec, nbytes: int) -> None:
    live = LiveSources(RandomInput(seed=11))
    reference = InputSources(InputFiles(seed=11, synthetic=True))
    for _ in range(3):
        assert live.provide("s", spec, None, nbytes) == reference.provide("s", spec, None, nbytes)


def test_rand_is_seeded_for_every_source(tmp_path: Path) -> None:
    data = tmp_path / "d.u8"
    data.write_bytes(b"\x01\x02")
    reference = InputSources(InputFiles(seed=5, synthetic=True))
    expected = reference.provide("r", RAND, ElementType.F32, 16)
    for config in (
        RandomInput(seed=5),
        AccelerometerInput(seed=5),
        ReplayInput(data, SampleFormat.U8, seed=5),
    ):
        assert LiveSources(config).provide("r", RAND, ElementType.F32, 16) == expected
    unseeded = LiveSources(RandomInput()), LiveSources(RandomInput())
    assert unseeded[0].seed != unseeded[1].seed


# -- the accelerometer source -------------------------------------------------------------------


def test_accelerometer_feeds_accel_and_refuses_other_sensors() -> None:
    live = LiveSources(AccelerometerInput(seed=8, hz=50, noise=0.1, burst_every_s=1))
    simulator = AccelSimulator(8, 50, 0.1, 1)
    for _ in range(3):
        assert live.provide("a", ACCEL4, ElementType.F32, 48) == simulator.rows(4).tobytes()
    with pytest.raises(SourceError, match="reads SOUND, but this device's input is a simulated"):
        live.provide("s", SOUND, None, 16)
    with pytest.raises(InputError, match="not a whole number of 12-byte samples") as caught:
        live.provide("a", ACCEL4, None, 40)
    assert not isinstance(caught.value, SourceError)  # the rune's fault, not the device's


# -- replayed files -----------------------------------------------------------------------------


def test_a_binary_file_replays_and_loops_at_its_end(tmp_path: Path) -> None:
    path = tmp_path / "samples.f32"
    values = [float(v) for v in range(7)]
    path.write_bytes(struct.pack("<7f", *values) + b"\x00\x01")  # a trailing partial sample
    live = replay(path, SampleFormat.F32LE)
    first = f32(live.provide("a", ACCEL4, ElementType.F32, 48))
    second = f32(live.provide("a", ACCEL4, ElementType.F32, 48))
    assert first == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    assert second == [5, 6, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]


def test_i16_and_u8_files_pass_through_exactly(tmp_path: Path) -> None:
    pcm = tmp_path / "audio.pcm"
    pcm.write_bytes(struct.pack("<8h", -32768, -2, -1, 0, 1, 2, 1000, 32767))
    assert i16(replay(pcm, SampleFormat.I16LE).provide("s", SOUND, None, 16)) == [
        -32768,
        -2,
        -1,
        0,
        1,
        2,
        1000,
        32767,
    ]
    raw = tmp_path / "frames.bin"
    raw.write_bytes(bytes(range(256)))
    live = replay(raw, SampleFormat.U8)
    assert live.provide("r", RAW, ElementType.U8, 200) == bytes(range(200))
    assert live.provide("r", RAW, ElementType.U8, 100) == bytes(range(200, 256)) + bytes(range(44))


def test_csv_rows_become_interleaved_values_with_header_and_comments_skipped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "accel.csv"
    path.write_text(
        "x,y,z\n# calibration run\n0.5, 1.5, 9.75\n\n1 2 3\n4,5,6\r\n7,8,9\n10,11,12"
    )  # no newline at the very end: the last line still counts
    live = replay(path, SampleFormat.CSV)
    assert f32(live.provide("a", ACCEL4, None, 48)) == [0.5, 1.5, 9.75, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    # Around the end, back to the start: the header is skipped again.
    assert f32(live.provide("a", ACCEL4, None, 48))[:6] == [10, 11, 12, 0.5, 1.5, 9.75]


def test_jsonl_lines_are_numbers_or_arrays(tmp_path: Path) -> None:
    path = tmp_path / "accel.jsonl"
    lines = [[0.0, 0.0, 9.8], [[1, 2, 3], [4, 5, 6]], 7, 8.5, [9]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    values = f32(replay(path, SampleFormat.JSONL).provide("a", ACCEL4, None, 48))
    assert values == pytest.approx([0, 0, 9.8, 1, 2, 3, 4, 5, 6, 7, 8.5, 9])


def test_values_are_scaled_rounded_and_clipped_to_the_capability_type(tmp_path: Path) -> None:
    path = tmp_path / "audio.csv"
    path.write_text("0.5,-0.5,1.0,-1.0,2.0,-2.0,0.25,0.00001\n")
    sound = replay(path, SampleFormat.CSV, scale=32767.0).provide("s", SOUND, None, 16)
    assert i16(sound) == [16384, -16384, 32767, -32767, 32767, -32768, 8192, 0]
    raw = replay(path, SampleFormat.CSV, scale=300.0).provide("r", RAW, None, 8)
    assert list(raw) == [150, 0, 255, 0, 255, 0, 75, 0]


def test_the_sizes_the_sandbox_checks_are_checked_for_replay_too(tmp_path: Path) -> None:
    path = tmp_path / "pixels.u8"
    path.write_bytes(bytes(range(12)))
    image = parse_capability(CapabilityKind.IMAGE, {"width": 2, "height": 2})
    live = replay(path, SampleFormat.U8)
    assert live.provide("i", image, ElementType.U8, 12) == bytes(range(12))
    with pytest.raises(InputError, match="a 2x2 RGB image is 12 bytes"):
        live.provide("i", image, ElementType.U8, 13)
    with pytest.raises(InputError, match="whole number of 2-byte samples"):
        live.provide("s", SOUND, None, 15)


def test_a_malformed_line_is_reported_once_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "accel.csv"
    path.write_text("1,2,3\n4,five,6\n7,8,9\n10,11,12\n13,14,15\n[1]\n")
    live = replay(path, SampleFormat.CSV)
    with pytest.raises(SourceError, match=r"accel.csv: line 2: could not convert"):
        live.provide("a", ACCEL4, None, 48)
    # The good values read around the bad line were kept, in order.
    assert f32(live.provide("a", ACCEL4, None, 48)) == [1, 2, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[1, 2]\n{"x": 1}\ntrue\n[NaN]\n[3]\n')
    with pytest.raises(SourceError, match="line 2: {'x': 1} is not a number") as caught:
        replay(bad, SampleFormat.JSONL).provide("r", RAW, None, 3)
    assert "(and 2 more)" in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"x,y,z\n", b"\n# nothing\n"])
def test_a_file_without_values_is_an_error_not_a_busy_loop(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(SourceError, match="holds no csv values"):
        replay(path, SampleFormat.CSV).provide("a", ACCEL4, None, 48)


def test_a_missing_path_or_a_directory_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or device"):
        replay(tmp_path / "gone.csv", SampleFormat.CSV).provide("a", ACCEL4, None, 48)
    with pytest.raises(SourceError, match="not a regular file, a FIFO or a character device"):
        replay(tmp_path, SampleFormat.U8).provide("r", RAW, None, 4)
    long_line = tmp_path / "long.csv"
    long_line.write_text("1," * 40_000 + "\n1,2,3\n")
    with pytest.raises(SourceError, match="line 1 is longer than"):
        replay(long_line, SampleFormat.CSV).provide("r", RAW, None, 3)


# -- FIFOs and devices --------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "sensor.fifo"
    os.mkfifo(path)
    yield path


def write_fifo(path: Path, data: bytes) -> None:
    """Open the FIFO as its writer, write `data`, close (the reader must be open)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_a_fifo_is_a_stream_that_waits_for_its_writers(fifo: Path) -> None:
    live = replay(fifo, SampleFormat.CSV, timeout_s=0.05)
    assert live.prepare() is False  # no writer yet: nothing, and no busy loop
    with pytest.raises(InputPending, match="waiting for input: 0 of 12 values"):
        live.provide("a", ACCEL4, None, 48)

    write_fifo(fifo, b"x,y,z\n1,2,3\n4,5,6\n")  # a writer comes and goes with half a window
    assert live.prepare(timeout=1.0) is False  # knows the last call wanted 12 values
    assert "6 of 12 values" in live.pending_reason()
    write_fifo(fifo, b"7,8,9\n10,11,")  # another writer (its own header-less stream)
    write_fifo(fifo, b"12\n13,14,15\n")
    assert live.prepare(timeout=1.0) is True
    assert f32(live.provide("a", ACCEL4, None, 48)) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_a_call_that_stops_on_pending_input_puts_back_what_it_took(fifo: Path) -> None:
    live = replay(fifo, SampleFormat.U8, timeout_s=0.0)
    raw4 = parse_capability(CapabilityKind.RAW, {"length": 4})
    assert live.prepare() is False
    write_fifo(fifo, bytes(range(6)))
    assert live.prepare(timeout=1.0) is True
    live.begin()
    assert live.provide("first", raw4, None, 4) == bytes(range(4))
    with pytest.raises(InputPending, match="2 of 4 values"):
        live.provide("second", raw4, None, 4)
    live.abort()
    write_fifo(fifo, bytes(range(6, 8)))
    assert live.prepare(timeout=1.0) is True
    live.begin()
    assert live.provide("first", raw4, None, 4) == bytes(range(4))
    assert live.provide("second", raw4, None, 4) == bytes(range(4, 8))
    live.commit()
    live.close()


def test_a_stream_writer_that_keeps_writing_is_read_in_order(fifo: Path) -> None:
    stream = ReplayStream(fifo, SampleFormat.I16LE)
    assert stream.is_stream
    values = np.arange(-5000, 5000, dtype="<i2")
    done = threading.Event()

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)
        with os.fdopen(fd, "wb") as handle:
            for chunk in np.array_split(values, 37):
                handle.write(chunk.tobytes())
                handle.flush()
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    got: list[np.ndarray] = []
    while sum(len(g) for g in got) < len(values):
        if stream.fill(1000, timeout=5.0):
            got.append(stream.take(1000))
        stream.commit()
    thread.join(5)
    assert done.is_set()
    assert np.array_equal(np.concatenate(got), values.astype(np.float64))
    stream.close()
