"""The legacy `.rune` host (Rune compiler v0.11 ABI) runs conforming runes correctly.

Each rune is real wasm built from WAT (tests/legacy_runes.py). Runes copy what the host gives
them into TENSOR outputs, so every test compares the exact bytes against what the input file
(or seed, model, resource) should produce, computed here independently of the host.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from agent.sandbox.errors import GuestFault, InputError, LimitExceeded, ModelError
from agent.sandbox.inputs import InputFiles, InputSources
from agent.sandbox.legacy import LegacyRune
from agent.sandbox.limits import SandboxLimits
from agent.sandbox.outputs import OutputRecord
from agent.sandbox.runner import load_rune
from examples.models import GESTURES, gesture_csv, gesture_onnx, sine_tflite
from ota.rune.bundle import sha256_hex
from ota.rune.inspect import describe_rune
from ota.rune.runefile import CapabilityKind
from tests.legacy_runes import (
    ONNX,
    TFLITE,
    capability_rune,
    debug_rune,
    model_rune,
    resource_rune,
    serial_rune,
    start_function_rune,
)

K = CapabilityKind


def files(**kwargs: object) -> InputSources:
    return InputSources(InputFiles(**kwargs))  # type: ignore[arg-type]


def tensor_bytes(records: list[OutputRecord], channel: int = 2) -> bytes:
    """The bytes of the one TENSOR output a rune wrote in a call."""
    assert len(records) == 1, records
    (record,) = records
    assert record.channel == channel
    assert record.value["channel"] == channel
    return bytes.fromhex(record.value["bytes"])


def f32s(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


# -- capabilities -------------------------------------------------------------------------------


def test_rand_gives_the_seeded_generator_stream() -> None:
    rune = LegacyRune(capability_rune(K.RAND, 32), sources=files(seed=7))
    expected = np.random.default_rng(7)
    first, second = tensor_bytes(rune.call()), tensor_bytes(rune.call())
    assert first == expected.bytes(32)
    assert second == expected.bytes(32)
    assert first != second


def test_rand_same_seed_same_bytes_other_seed_other_bytes() -> None:
    module = capability_rune(K.RAND, 32)

    def first_call(seed: int) -> bytes:
        return tensor_bytes(LegacyRune(module, sources=files(seed=seed)).call())

    assert first_call(1) == first_call(1)
    assert first_call(1) != first_call(2)


def test_raw_streams_the_file_and_wraps(tmp_path: Path) -> None:
    raw = tmp_path / "data.bin"
    raw.write_bytes(b"0123456789")
    rune = LegacyRune(capability_rune(K.RAW, 4), sources=files(raw=raw))
    assert [tensor_bytes(rune.call()) for _ in range(4)] == [b"0123", b"4567", b"8901", b"2345"]


def test_raw_without_a_file_names_the_flag() -> None:
    rune = LegacyRune(capability_rune(K.RAW, 4))
    with pytest.raises(InputError, match="--raw"):
        rune.call()


def test_accel_gives_interleaved_f32_rows_from_the_csv(tmp_path: Path) -> None:
    csv = tmp_path / "accel.csv"
    csv.write_text("x,y,z\n1.5,-2.25,9.81\n0.5,0.25,-1\n3,4,5\n")
    rows = np.array([[1.5, -2.25, 9.81], [0.5, 0.25, -1.0], [3.0, 4.0, 5.0]], dtype=np.float32)
    # n as an f32 param: two rows (24 bytes) per call
    rune = LegacyRune(capability_rune(K.ACCEL, 24, {"n": ("f32", 2.0)}), sources=files(accel=csv))
    calls = [f32s(tensor_bytes(rune.call())).reshape(-1, 3) for _ in range(3)]
    np.testing.assert_array_equal(calls[0], rows[[0, 1]])
    np.testing.assert_array_equal(calls[1], rows[[2, 0]])
    np.testing.assert_array_equal(calls[2], rows[[1, 2]])


def test_sound_gives_the_wav_samples_as_i16(tmp_path: Path) -> None:
    samples = (np.arange(-8, 8) * 1000).astype("<i2")
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(samples.tobytes())
    # 8000 Hz for 1 ms: 8 samples (16 bytes) per call
    params = {"hz": ("i32", 8000), "sample_duration_ms": ("i16", 1)}
    rune = LegacyRune(capability_rune(K.SOUND, 16, params), sources=files(sound=path))
    calls = [np.frombuffer(tensor_bytes(rune.call()), dtype="<i2") for _ in range(3)]
    np.testing.assert_array_equal(calls[0], samples[:8])
    np.testing.assert_array_equal(calls[1], samples[8:])
    np.testing.assert_array_equal(calls[2], samples[:8])


@pytest.fixture
def png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    ys, xs = np.mgrid[0:30, 0:40]
    pixels = np.stack([xs * 6, ys * 8, (xs + ys) * 3], axis=-1) + rng.integers(0, 20, (30, 40, 3))
    path = tmp_path / "picture.png"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB").save(path)
    return path


@pytest.mark.parametrize(
    ("pixel_format", "mode", "channels"),
    [(2, "L", 1), (0, "RGB", 3), (1, "BGR", 3)],
)
def test_image_is_resized_and_converted_like_pillow(
    png: Path, pixel_format: int, mode: str, channels: int
) -> None:
    width, height = 8, 6
    params = {
        "width": ("i32", width),
        "height": ("i32", height),
        "pixel_format": ("i32", pixel_format),
    }
    module = capability_rune(K.IMAGE, width * height * channels, params)
    got = tensor_bytes(LegacyRune(module, sources=files(image=png)).call())
    with Image.open(png) as image:
        resized = image.convert("L" if mode == "L" else "RGB").resize(
            (width, height), Image.Resampling.BICUBIC
        )
        expected = np.asarray(resized, dtype=np.uint8)
    if mode == "BGR":
        expected = expected[:, :, ::-1]
    assert got == expected.tobytes()


def test_float_image_is_u8_pixels_over_255(png: Path) -> None:
    # the same args in other value types: i16 width, i8 height, u8 pixel_format
    params = {"width": ("i16", 8), "height": ("i8", 6), "pixel_format": ("u8", 2)}
    rune = LegacyRune(capability_rune(K.FLOAT_IMAGE, 8 * 6 * 4, params), sources=files(image=png))
    got = f32s(tensor_bytes(rune.call()))
    with Image.open(png) as image:
        gray = np.asarray(image.convert("L").resize((8, 6), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(got, gray.reshape(-1).astype(np.float32) / 255.0, atol=1e-7)
    assert got.min() >= 0.0
    assert got.max() <= 1.0


def test_image_buffer_of_the_wrong_size_is_an_input_error(png: Path) -> None:
    params = {"width": ("i32", 8), "height": ("i32", 6), "pixel_format": ("i32", 2)}
    rune = LegacyRune(capability_rune(K.IMAGE, 40, params), sources=files(image=png))
    with pytest.raises(InputError, match=r"asks for 40 bytes of IMAGE, but a 8x6 GRAYSCALE image"):
        rune.call()


# -- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [0.0, 45.0, 90.0, 180.0, 270.0])
def test_tflite_sine_model(degrees: float) -> None:
    module = model_rune(
        sine_tflite(), TFLITE, "f32[1, 1]", "f32[1, 1]", input_data=struct.pack("<f", degrees)
    )
    rune = LegacyRune(module)
    for _ in range(2):  # loaded once in _manifest, inferred on every call
        (value,) = f32s(tensor_bytes(rune.call()))
        assert value == pytest.approx(math.sin(math.radians(degrees)), abs=0.05)


def test_model_descriptors_must_match_the_model() -> None:
    module = model_rune(sine_tflite(), TFLITE, "f32[1, 2]", "f32[1, 1]", input_data=bytes(8))
    with pytest.raises(ModelError, match=r"describes its inputs as f32\[1, 2\].*f32\[1, 1\]"):
        LegacyRune(module)


def test_unknown_model_type_is_a_model_error() -> None:
    module = model_rune(b"\0" * 16, "application/x-pickle", "f32[1]", "f32[1]", input_data=bytes(4))
    with pytest.raises(ModelError, match="unsupported type 'application/x-pickle'"):
        LegacyRune(module)


def test_onnx_gesture_model_fed_by_accel(tmp_path: Path) -> None:
    csv = tmp_path / "gesture.csv"
    csv.write_text(gesture_csv())
    module = model_rune(
        gesture_onnx(),
        ONNX,
        "f32[1, 128, 3]",
        "f32[1, 4]",
        feed=(K.ACCEL, {"n": ("i32", 128)}),
    )
    rune = LegacyRune(module, sources=files(accel=csv))
    rows = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.float32)
    session = onnxruntime.InferenceSession(gesture_onnx(), providers=["CPUExecutionProvider"])
    for index, gesture in enumerate(GESTURES):
        scores = f32s(tensor_bytes(rune.call(), channel=3))  # capability 1, model 2, output 3
        window = rows[index * 128 : (index + 1) * 128].reshape(1, 128, 3)
        (expected,) = session.run(None, {"accel": window})
        np.testing.assert_allclose(scores, expected.reshape(-1), rtol=1e-5)
        assert GESTURES[int(np.argmax(scores))] == gesture


# -- resources, logs, serial output ---------------------------------------------------------------


def test_resource_from_the_rune_resource_section() -> None:
    text = b"labels: wave, tilt, lift, rest\n" * 3
    rune = LegacyRune(resource_rune("labels", chunk=16, resources={"labels": text}))
    assert tensor_bytes(rune.call(), channel=1) == text
    assert tensor_bytes(rune.call(), channel=1) == text  # opened afresh each call


def test_resources_override_replaces_the_section() -> None:
    module = resource_rune("labels", resources={"labels": b"from the section"})
    rune = LegacyRune(module, resources={"labels": b"from the override"})
    assert tensor_bytes(rune.call(), channel=1) == b"from the override"


def test_resources_override_can_add_a_resource() -> None:
    rune = LegacyRune(resource_rune("extra"), resources={"extra": b"\x00\x01\x02"})
    assert tensor_bytes(rune.call(), channel=1) == b"\x00\x01\x02"


def test_missing_resource_is_named() -> None:
    rune = LegacyRune(resource_rune("nope", resources={"labels": b"x"}))
    with pytest.raises(GuestFault, match="resource 'nope'"):
        rune.call()


def test_resource_over_the_limit() -> None:
    rune = LegacyRune(
        resource_rune("big", resources={"big": bytes(2048)}),
        limits=SandboxLimits(resource_bytes=1024),
    )
    with pytest.raises(LimitExceeded, match="2048 bytes, over the 1024-byte resource limit"):
        rune.call()


def test_debug_json_record_is_logged_at_its_level(caplog: pytest.LogCaptureFixture) -> None:
    record = {"level": "warning", "message": "battery low", "target": "rune"}
    rune = LegacyRune(debug_rune(json.dumps(record).encode()), name="sensor.rune")
    with caplog.at_level(logging.DEBUG, logger="agent.sandbox.legacy"):
        assert rune.call() == []
    logged = [r for r in caplog.records if r.name == "agent.sandbox.legacy"]
    assert [(r.levelno, r.getMessage()) for r in logged] == [
        (logging.WARNING, "sensor.rune: battery low")
    ]


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (b"plain text, not JSON", "plain text, not JSON"),
        # not a logging level (logging.BASIC_FORMAT is a string): logged at INFO, no crash
        (b'{"level": "basic_format", "message": "odd level"}', "odd level"),
        (b'{"level": 40, "message": "numeric level"}', "numeric level"),
    ],
)
def test_debug_other_records_log_at_info(
    caplog: pytest.LogCaptureFixture, message: bytes, text: str
) -> None:
    rune = LegacyRune(debug_rune(message))
    with caplog.at_level(logging.DEBUG, logger="agent.sandbox.legacy"):
        rune.call()
    logged = [r for r in caplog.records if r.name == "agent.sandbox.legacy"]
    assert [(r.levelno, r.getMessage()) for r in logged] == [(logging.INFO, f"rune: {text}")]


def test_debug_is_cut_at_the_debug_limit(caplog: pytest.LogCaptureFixture) -> None:
    rune = LegacyRune(debug_rune(b"0123456789abcdef"), limits=SandboxLimits(max_debug_bytes=10))
    with caplog.at_level(logging.INFO, logger="agent.sandbox.legacy"):
        rune.call()
    assert [r.getMessage() for r in caplog.records if r.name == "agent.sandbox.legacy"] == [
        "rune: 0123456789"
    ]


def test_serial_output_is_parsed_json() -> None:
    value = {"type_name": "u8", "channel": 1, "elements": [3, 1, 4], "dimensions": [1, 3]}
    rune = LegacyRune(serial_rune(json.dumps(value).encode()))
    assert rune.call() == [OutputRecord(1, value)]


def test_serial_output_that_is_not_json_is_a_guest_fault() -> None:
    rune = LegacyRune(serial_rune(b"\xffnot json"))
    with pytest.raises(GuestFault, match="not UTF-8 JSON"):
        rune.call()


def test_start_function_runs_before_manifest() -> None:
    rune = LegacyRune(start_function_rune("(global.set $ready (i32.const 7))"))
    assert struct.unpack("<i", tensor_bytes(rune.call(), channel=1)) == (7,)


# -- loading and inspecting -----------------------------------------------------------------------


def test_load_rune_picks_the_legacy_host_for_wasm(tmp_path: Path) -> None:
    raw = tmp_path / "data.bin"
    raw.write_bytes(b"abcdef")
    rune = load_rune(capability_rune(K.RAW, 3), name="raw.rune", sources=files(raw=raw))
    assert isinstance(rune, LegacyRune)
    assert rune.name == "raw.rune"
    assert tensor_bytes(rune.call()) == b"abc"


def test_describe_rune_shows_legacy_metadata() -> None:
    module = resource_rune("labels", capabilities={"accel": K.ACCEL}, resources={"labels": b"abc"})
    desc = describe_rune(module, "fallback")
    assert desc.kind == "legacy"
    assert desc.name == "test-rune"  # from the graph's rune.name
    assert desc.version == "1"
    assert desc.capabilities == [{"kind": "ACCEL"}]
    assert desc.resources == [{"name": "labels", "sha256": sha256_hex(b"abc"), "size": 3}]
    assert "env.rune_resource_open" in desc.imports
    assert desc.sha256 == sha256_hex(module)
    assert desc.size == len(module)


# -- the rune CLI ---------------------------------------------------------------------------------


def rune_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("rune", path=str(Path(sys.executable).parent)) or shutil.which("rune")
    assert exe, "the rune console script is not installed"
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_run_streams_raw_as_json(tmp_path: Path) -> None:
    rune_file, raw = tmp_path / "raw.rune", tmp_path / "data.bin"
    rune_file.write_bytes(capability_rune(K.RAW, 4))
    raw.write_bytes(b"\x00\x01\x02\x03\x04\x05")
    result = rune_cli("run", rune_file, "--raw", raw, "-n", "2", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "rune": "raw.rune",
        "inferences": [
            {"inference": 1, "outputs": [{"channel": 2, "bytes": "00010203"}]},
            {"inference": 2, "outputs": [{"channel": 2, "bytes": "04050001"}]},
        ],
    }


def test_cli_run_seeds_rand(tmp_path: Path) -> None:
    rune_file = tmp_path / "noise.rune"
    rune_file.write_bytes(capability_rune(K.RAND, 8))
    result = rune_cli("run", rune_file, "--random", "42", "-o", "json")
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)["inferences"][0]["outputs"]
    assert outputs == [{"channel": 2, "bytes": np.random.default_rng(42).bytes(8).hex()}]


def test_cli_inspect_legacy_json(tmp_path: Path) -> None:
    rune_file = tmp_path / "accel.rune"
    rune_file.write_bytes(capability_rune(K.ACCEL, 12))
    result = rune_cli("inspect", rune_file, "-o", "json")
    assert result.returncode == 0, result.stderr
    desc = json.loads(result.stdout)
    assert desc["kind"] == "legacy"
    assert desc["version"] == "1"
    assert desc["capabilities"] == [{"kind": "ACCEL"}]
    assert desc["graph"]["capabilities"] == {"input": {"kind": "ACCEL"}}
