"""The health check runs real runes in the sandbox on synthetic inputs, and never raises for one.

Bundles are the examples built with `build_bundle`; legacy runes are real wasm from WAT
(tests/legacy_runes.py). The synthetic inputs are checked here too: exact sizes, plausible values,
the same bytes for the same seed, and no change for callers that do not ask for them.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from agent.health import health_check
from agent.sandbox.errors import InputError
from agent.sandbox.inputs import GRAVITY, InputFiles, InputSources
from agent.sandbox.legacy import LegacyRune
from agent.sandbox.limits import SandboxLimits
from ota.rune.build import build_bundle
from ota.rune.capabilities import CapabilitySpec, PixelFormat
from ota.rune.runefile import CapabilityKind
from ota.rune.tensors import ElementType
from tests.legacy_runes import (
    Layout,
    build,
    call,
    capability_rune,
    emit,
    globals_,
    looping_rune,
    manifest,
    request_output,
    serial_rune,
    trapping_rune,
)

K = CapabilityKind
SMALL_FUEL = SandboxLimits(fuel_per_call=10_000_000)


def failing_after_rune(calls: int) -> bytes:
    """Runs cleanly `calls` times (writing the call count as an i32 TENSOR output), then reaches
    `unreachable` on every later call: a rune that passes a short health check and then fails."""
    layout = Layout()
    count = layout.buffer(4)
    body = [
        globals_("$calls", "$out"),
        manifest(request_output("$out")),
        call(
            "(global.set $calls (i32.add (global.get $calls) (i32.const 1)))",
            f"(if (i32.gt_u (global.get $calls) (i32.const {calls})) (then unreachable))",
            f"(i32.store (i32.const {count.ptr}) (global.get $calls))",
            emit("$out", count),
        ),
    ]
    return build(body, layout, capabilities={})


@pytest.fixture(scope="module")
def gesture_bundle(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "gesture" / "Runefile.yml").data


@pytest.fixture(scope="module")
def sine_bundle(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "sine" / "Runefile.yml").data


# -- health check -------------------------------------------------------------------------------


def test_the_example_bundles_pass(gesture_bundle: bytes, sine_bundle: bytes) -> None:
    for name, data in (("gesture", gesture_bundle), ("sine", sine_bundle)):
        report = health_check(data, name, None)
        assert report.ok, report.reason
        assert report.calls == 3
        assert report.reason == f"{name} loaded and ran 3 calls"
        assert 0 < report.duration < 30


def test_a_gesture_bundle_reads_synthetic_accel_without_a_file(gesture_bundle: bytes) -> None:
    report = health_check(gesture_bundle, "gesture", SandboxLimits(), calls=5, seed=3)
    assert report.ok and report.calls == 5


@pytest.mark.parametrize(
    ("kind", "nbytes", "params"),
    [
        (K.IMAGE, 8 * 6 * 3, {"width": ("i32", 8), "height": ("i32", 6)}),
        (
            K.FLOAT_IMAGE,
            4 * 4 * 4,
            {"width": ("i32", 4), "height": ("i32", 4), "pixel_format": ("i32", 2)},
        ),
        (K.SOUND, 2 * 160, {"hz": ("i32", 16000), "sample_duration_ms": ("i32", 10)}),
        (K.ACCEL, 12 * 32, {"n": ("i32", 32)}),
        (K.RAW, 100, {}),
        (K.RAND, 64, {}),
    ],
)
def test_legacy_runes_of_every_capability_pass(
    kind: CapabilityKind, nbytes: int, params: dict[str, tuple[str, float]]
) -> None:
    report = health_check(capability_rune(kind, nbytes, params), f"{kind.name}.rune", None)
    assert report.ok, report.reason


def test_a_trapping_rune_fails_with_the_trap() -> None:
    report = health_check(trapping_rune(), "panic.rune", None)
    assert not report.ok
    assert report.calls == 0
    assert report.reason.startswith("panic.rune failed call 1 of 3: ")
    assert "unreachable" in report.reason


def test_a_looping_rune_fails_on_fuel() -> None:
    report = health_check(looping_rune(), "spin.rune", SMALL_FUEL, calls=2)
    assert not report.ok and report.calls == 0
    assert "ran out of fuel" in report.reason


def test_a_rune_failing_on_a_later_call_reports_how_far_it_got() -> None:
    report = health_check(failing_after_rune(1), "late.rune", None)
    assert not report.ok
    assert report.calls == 1
    assert report.reason.startswith("late.rune failed call 2 of 3: ")


def test_a_rune_failing_after_the_checked_calls_passes() -> None:
    data = failing_after_rune(3)
    assert health_check(data, "late.rune", None).ok
    assert not health_check(data, "late.rune", None, calls=4).ok


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"not a rune at all", "neither a rune bundle nor a legacy .rune"),
        (b"\0asm\x01\0\0\0\xff\xff", "junk.rune"),
        (b"PK\x03\x04 truncated zip", "not a readable zip archive"),
    ],
)
def test_malformed_runes_fail_to_load(data: bytes, expected: str) -> None:
    report = health_check(data, "junk.rune", None)
    assert not report.ok and report.calls == 0
    assert report.reason.startswith("junk.rune failed to load: ")
    assert expected in report.reason


def test_a_truncated_bundle_fails_to_load(gesture_bundle: bytes) -> None:
    report = health_check(gesture_bundle[: len(gesture_bundle) // 2], "gesture", None)
    assert not report.ok and report.reason.startswith("gesture failed to load: ")


def test_capabilities_the_policy_denies_fail(gesture_bundle: bytes) -> None:
    report = health_check(gesture_bundle, "gesture", None, allowed=frozenset({K.RAND}))
    assert not report.ok
    assert "needs ACCEL, which this device's policy does not allow" in report.reason


def test_at_least_one_call() -> None:
    with pytest.raises(ValueError, match="at least one call"):
        health_check(serial_rune(b"{}"), "x", None, calls=0)


# -- synthetic inputs ----------------------------------------------------------------------------


def synthetic(seed: int = 0) -> InputSources:
    return InputSources(InputFiles(seed=seed, synthetic=True))


def test_synthetic_images_are_random_pixels_of_the_exact_size() -> None:
    spec = CapabilitySpec(K.IMAGE, width=16, height=8, pixel_format=PixelFormat.RGB)
    first = synthetic(1).provide("cam", spec, None, 16 * 8 * 3)
    assert len(first) == 16 * 8 * 3
    assert first == synthetic(1).provide("cam", spec, None, 16 * 8 * 3)
    assert first != synthetic(2).provide("cam", spec, None, 16 * 8 * 3)
    assert len(set(first)) > 100  # noise, not a constant frame

    floats = CapabilitySpec(K.FLOAT_IMAGE, width=4, height=4, pixel_format=PixelFormat.GRAYSCALE)
    values = np.frombuffer(synthetic().provide("cam", floats, ElementType.F32, 64), "<f4")
    assert values.size == 16 and values.min() >= 0.0 and values.max() <= 1.0

    with pytest.raises(InputError, match="asks for 10 bytes of IMAGE"):
        synthetic().provide("cam", spec, None, 10)


def test_synthetic_sound_is_a_quiet_continuous_sine() -> None:
    spec = CapabilitySpec(K.SOUND, hz=8000, sample_duration_ms=100)
    sources = synthetic(5)
    first = np.frombuffer(sources.provide("mic", spec, None, 1600), "<i2").astype(float)
    second = np.frombuffer(sources.provide("mic", spec, None, 1600), "<i2").astype(float)
    assert first.size == 800
    assert 0 < np.abs(first).max() <= 0.06 * 32767
    whole = np.concatenate([first, second])
    spectrum = np.abs(np.fft.rfft(whole))
    assert spectrum.argmax() > 0 and spectrum.max() > 20 * np.median(spectrum)  # one tone
    again = np.frombuffer(synthetic(5).provide("mic", spec, None, 1600), "<i2")
    assert np.array_equal(again, first.astype("<i2"))
    with pytest.raises(InputError, match="whole number of 2-byte samples"):
        synthetic().provide("mic", spec, None, 3)


def test_synthetic_accel_is_small_noise_around_gravity() -> None:
    spec = CapabilitySpec(K.ACCEL, rows=64)
    rows = np.frombuffer(synthetic(9).provide("imu", spec, None, 64 * 12), "<f4").reshape(-1, 3)
    assert rows.shape == (64, 3)
    assert np.allclose(rows[:, 2].mean(), GRAVITY, atol=0.1)
    assert np.abs(rows[:, :2]).max() < 0.5 and rows[:, :2].std() > 0
    with pytest.raises(InputError, match="whole number of 12-byte samples"):
        synthetic().provide("imu", spec, None, 13)


def test_synthetic_raw_is_seeded_random_bytes() -> None:
    spec = CapabilitySpec(K.RAW, length=256)
    data = synthetic(4).provide("raw", spec, None, 256)
    assert len(data) == 256
    assert data == np.random.default_rng(4).bytes(256)


def test_a_file_still_wins_over_synthetic_data(tmp_path: Path) -> None:
    raw = tmp_path / "input.bin"
    raw.write_bytes(bytes(range(10)))
    sources = InputSources(InputFiles(raw=raw, synthetic=True))
    assert sources.provide("raw", CapabilitySpec(K.RAW), None, 4) == bytes([0, 1, 2, 3])


def test_without_synthetic_a_missing_file_is_still_an_error(tmp_path: Path) -> None:
    for kind, flag in ((K.IMAGE, "--image"), (K.SOUND, "--sound"), (K.ACCEL, "--accel")):
        spec = CapabilitySpec(kind, width=2, height=2, rows=2, hz=100)
        with pytest.raises(InputError, match=f"pass a file with {flag} FILE"):
            InputSources().provide("x", spec, None, 12)
    path = tmp_path / "one.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(100)
        wav.writeframes(np.arange(4, dtype="<i2").tobytes())
    sound = InputSources(InputFiles(sound=path))
    spec = CapabilitySpec(K.SOUND, hz=100, sample_duration_ms=40)
    assert np.array_equal(np.frombuffer(sound.provide("mic", spec, None, 8), "<i2"), [0, 1, 2, 3])


def test_a_legacy_rune_gets_synthetic_data_through_the_abi() -> None:
    rune = LegacyRune(
        capability_rune(K.ACCEL, 12 * 8, {"n": ("i32", 8)}), sources=synthetic(2), name="imu.rune"
    )
    (record,) = rune.call()
    values = np.frombuffer(bytes.fromhex(record.value["bytes"]), "<f4").reshape(8, 3)
    assert np.allclose(values[:, 2], GRAVITY, atol=0.5)
