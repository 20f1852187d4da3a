"""Hostile and broken legacy runes are stopped with a clear `SandboxError`, never take the host
down, and leave it able to run other runes.

Every test here gets a check afterwards (the autouse `host_still_runs_runes` fixture): a
well-behaved rune still loads in this same process and produces exactly the right output. Many
also call the hostile instance again to show that it is still usable and that the failed call
wrote nothing into the rune's memory and produced nothing.
"""

from __future__ import annotations

import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from agent.sandbox import engine as sandbox_engine
from agent.sandbox.errors import (
    CapabilityDenied,
    GuestFault,
    InputError,
    LimitExceeded,
    ModelError,
    ModuleRejected,
    SandboxError,
)
from agent.sandbox.inputs import InputFiles, InputSources
from agent.sandbox.legacy import LegacyRune
from agent.sandbox.limits import MIB, SandboxLimits
from agent.sandbox.outputs import OutputRecord
from agent.sandbox.runner import load_rune
from examples.models import sine_tflite
from ota.rune.legacy import GRAPH_SECTION, RESOURCE_SECTION
from ota.rune.runefile import CapabilityKind
from ota.rune.wasm import with_custom_section
from tests.legacy_runes import (
    ONNX,
    PAGE,
    PROBE_RESOURCE,
    SENTINEL_HIGH,
    SENTINEL_LOW,
    TFLITE,
    big_memory_rune,
    build,
    call,
    capability_rune,
    host_call,
    importing_rune,
    looping_rune,
    manifest,
    memory_bomb_rune,
    model_rune,
    output_flood_rune,
    probe_rune,
    recursing_rune,
    removed_api_rune,
    start_function_rune,
    trapping_rune,
)

K = CapabilityKind
SMALL_FUEL = SandboxLimits(fuel_per_call=10_000_000)


def assert_host_runs_runes() -> None:
    """A well-behaved rune loads and gives exactly the seeded RAND bytes."""
    rune = LegacyRune(capability_rune(K.RAND, 16), sources=InputSources(InputFiles(seed=11)))
    expected = np.random.default_rng(11).bytes(16).hex()
    assert rune.call() == [OutputRecord(2, {"channel": 2, "bytes": expected})]


@pytest.fixture(autouse=True)
def host_still_runs_runes() -> Iterator[None]:
    yield
    assert_host_runs_runes()


def u32(records: list[OutputRecord]) -> int:
    (record,) = records
    value: int = struct.unpack("<I", bytes.fromhex(record.value["bytes"]))[0]
    return value


# -- time -----------------------------------------------------------------------------------------


def test_infinite_loop_runs_out_of_fuel() -> None:
    rune = LegacyRune(looping_rune(), limits=SMALL_FUEL, name="spin.rune")
    for _ in range(2):  # stopped every time, and the instance can be called again
        with pytest.raises(LimitExceeded, match=r"spin.rune _call ran out of fuel \(10000000 "):
            rune.call()


def test_infinite_loop_is_stopped_by_the_wall_clock() -> None:
    limits = SandboxLimits(fuel_per_call=10**12, wall_clock_ms=200)
    rune = LegacyRune(looping_rune(), limits=limits)
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match="ran past the 200 ms wall-clock limit"):
        rune.call()
    elapsed = time.monotonic() - started
    assert 0.15 < elapsed < 2.0


def test_infinite_loop_is_stopped_under_the_default_limits() -> None:
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match="fuel|wall-clock"):
        LegacyRune(looping_rune()).call()
    assert time.monotonic() - started < SandboxLimits().wall_clock_ms / 1000 + 3


def test_unbounded_recursion_is_a_stack_overflow() -> None:
    with pytest.raises(GuestFault, match="stack overflow"):
        LegacyRune(recursing_rune()).call()


def test_trap_is_a_guest_fault_naming_unreachable() -> None:
    rune = LegacyRune(trapping_rune(), name="panic.rune")
    with pytest.raises(GuestFault, match=r"panic.rune _call trapped: .*`unreachable`"):
        rune.call()


def test_instance_runs_again_after_a_trap() -> None:
    rune = LegacyRune(trapping_rune(first_call_only=True))
    with pytest.raises(GuestFault, match="unreachable"):
        rune.call()
    assert u32(rune.call()) == 2  # the second call ran to the end, with its state intact
    assert u32(rune.call()) == 3


def test_looping_start_function_is_stopped() -> None:
    with pytest.raises(LimitExceeded, match="start function ran out of fuel"):
        LegacyRune(start_function_rune("(loop $forever (br $forever))"), limits=SMALL_FUEL)


def test_trapping_start_function_is_a_guest_fault() -> None:
    with pytest.raises(GuestFault, match="start function trapped: .*unreachable"):
        LegacyRune(start_function_rune("unreachable"))


# -- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("then", "error", "message"),
    [("loop", LimitExceeded, "ran out of fuel"), ("trap", GuestFault, "unreachable")],
)
def test_memory_grow_bomb_stops_at_the_memory_limit(
    then: str, error: type[SandboxError], message: str
) -> None:
    limits = SandboxLimits(memory_bytes=4 * MIB, fuel_per_call=10_000_000)
    rune = LegacyRune(memory_bomb_rune(then=then), limits=limits)
    with pytest.raises(error, match=message):
        rune.call()
    pages = u32(rune.call())  # later calls report memory.size
    assert pages * PAGE == limits.memory_bytes  # grew right up to the limit, never past it


def test_initial_memory_over_the_limit_is_refused_at_load() -> None:
    limits = SandboxLimits(memory_bytes=1 * MIB)
    with pytest.raises(LimitExceeded, match=r"could not start .*memory 1048576 bytes"):
        LegacyRune(big_memory_rune(pages=32), limits=limits)


def test_initial_memory_over_the_default_limit_is_refused() -> None:
    pages = SandboxLimits().memory_bytes // PAGE + 1
    with pytest.raises(LimitExceeded, match="could not start within the sandbox limits"):
        load_rune(big_memory_rune(pages=pages))


# -- output ---------------------------------------------------------------------------------------


def test_oversized_output_is_refused() -> None:
    rune = LegacyRune(output_flood_rune(1025), limits=SandboxLimits(output_bytes=1024))
    with pytest.raises(LimitExceeded, match="over 1024 bytes of output in one call"):
        rune.call()


def test_output_limit_counts_every_write_in_a_call() -> None:
    limits = SandboxLimits(output_bytes=1024)
    with pytest.raises(LimitExceeded, match="output size limit"):
        LegacyRune(output_flood_rune(600, times=2), limits=limits).call()
    # exactly the limit is fine, and the count starts again each call
    rune = LegacyRune(output_flood_rune(512, times=2), limits=limits)
    for _ in range(3):
        assert [len(r.value["bytes"]) // 2 for r in rune.call()] == [512, 512]


# -- pointers and ids -----------------------------------------------------------------------------

OUT_OF_BOUNDS = "outside the rune's 65536-byte memory"
WRAPS = 0xFFFFFFF0  # + 64 wraps to 48 in 32 bits: must not reach the start of memory
PAST_END = PAGE - 16  # + 64 runs past the end of the probe's one page
CAP, OUT, RES = "(global.get $cap)", "(global.get $out)", "(global.get $res)"


def bad(wat: str, message: str = OUT_OF_BOUNDS, *, id: str) -> object:
    return pytest.param(wat, message, id=id)


@pytest.mark.parametrize(
    ("bad_call", "message"),
    [
        bad(host_call("consume_output", OUT, WRAPS, 64), id="consume_output-wraps"),
        bad(host_call("consume_output", OUT, PAST_END, 64), id="consume_output-past-end"),
        bad(host_call("consume_output", OUT, 0, -1), id="consume_output-negative-length"),
        bad(host_call("request_provider_response", WRAPS, 64, CAP), id="provider-wraps"),
        bad(host_call("request_provider_response", PAST_END, 64, CAP), id="provider-past-end"),
        bad(host_call("_debug", WRAPS, 64), id="debug-wraps"),
        bad(host_call("_debug", PAST_END, 64), id="debug-past-end"),
        bad(host_call("rune_resource_read", RES, WRAPS, 64, drop=True), id="read-wraps"),
        bad(host_call("rune_resource_read", RES, PAST_END, 64, drop=True), id="read-past-end"),
        bad(host_call("rune_resource_open", WRAPS, 64, drop=True), id="open-wraps"),
        bad(
            host_call("request_capability_set_param", CAP, WRAPS, 64, 0, 4, 1),
            id="set_param-key-wraps",
        ),
        bad(
            host_call("rune_model_load", 0, 8, 0, 8, WRAPS, 1, 0, 1, drop=True),
            "not valid UTF-8",
            id="model_load-bad-strings",
        ),
        bad(
            host_call("consume_output", 77, 0, 4),
            "output 77, which it never requested",
            id="unknown-output",
        ),
        bad(
            host_call("request_provider_response", 0, 4, 2),
            "capability 2, which it never requested",
            id="unknown-capability",
        ),
        bad(
            host_call("rune_resource_read", 9, 0, 4, drop=True),
            "rune_resource_read on 9, which is not open",
            id="unknown-resource",
        ),
        bad(
            host_call("rune_model_infer", 1, 0, 0),
            "model 1, which it never loaded",
            id="unknown-model",
        ),
    ],
)
def test_bad_pointers_and_ids_fault_and_change_nothing(bad_call: str, message: str) -> None:
    rune = LegacyRune(probe_rune(bad_call), sources=InputSources(InputFiles(seed=5)))
    with pytest.raises(GuestFault, match=message):
        rune.call()
    # The same instance runs again; its memory is untouched, the failed call's earlier output
    # was dropped, and neither the RAND stream nor the resource cursor moved.
    records = rune.call()
    assert [r.channel for r in records] == [2, 2, 2, 2]
    low, high, noise, chunk = (bytes.fromhex(r.value["bytes"]) for r in records)
    assert low == SENTINEL_LOW
    assert high == SENTINEL_HIGH
    assert noise == np.random.default_rng(5).bytes(16)
    assert chunk == PROBE_RESOURCE[:8]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"hz": ("f32", float("nan"))}, "'hz' is nan, not a number"),
        ({"hz": ("f32", float("inf"))}, "'hz' is inf, not a number"),
        ({"colour": ("i32", 3)}, "SOUND takes no arg colour"),
        ({"hz": ("i32", -8000)}, "hz must be a positive whole number"),
    ],
)
def test_bad_capability_params_are_guest_faults(params: dict, message: str) -> None:
    # non-numbers are refused as `_manifest` sets them, other bad args when the rune reads
    with pytest.raises(GuestFault, match=message):
        LegacyRune(capability_rune(K.SOUND, 16, params)).call()


def test_param_of_unknown_type_or_wrong_size_is_refused() -> None:
    key = (1024, 2)  # "bl", from the probe's "blob" string
    for value, message in (
        ((0, 4, 9), "unknown value type 9"),
        ((0, 2, 1), "must be 4 bytes, not 2"),
    ):
        rune = LegacyRune(probe_rune(host_call("request_capability_set_param", CAP, *key, *value)))
        with pytest.raises(GuestFault, match=message):
            rune.call()
        assert len(rune.call()) == 4


# -- host work a rune can ask for -----------------------------------------------------------------


def test_huge_image_args_are_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = tmp_path / "small.png"
    Image.new("L", (16, 16), 7).save(png)
    opened: list[object] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    side = 30_000  # a 900 MB resize if the host did it before checking the size
    params = {"width": ("i32", side), "height": ("i32", side), "pixel_format": ("i32", 0)}
    rune = LegacyRune(
        capability_rune(K.FLOAT_IMAGE, 16, params), sources=InputSources(InputFiles(image=png))
    )
    started = time.monotonic()
    with pytest.raises(InputError, match=r"asks for 16 bytes of FLOAT_IMAGE, but a 30000x30000"):
        rune.call()
    assert opened == []
    assert time.monotonic() - started < 1.0


def test_absurd_sample_rate_is_refused(tmp_path: Path) -> None:
    import wave

    path = tmp_path / "one-second.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(16000))
    params = {"hz": ("i32", 2_000_000_000), "sample_duration_ms": ("i32", 1)}
    rune = LegacyRune(
        capability_rune(K.SOUND, 16, params), sources=InputSources(InputFiles(sound=path))
    )
    started = time.monotonic()
    with pytest.raises(InputError, match="SOUND at 2000000000 Hz"):
        rune.call()
    assert time.monotonic() - started < 1.0


# -- capabilities ---------------------------------------------------------------------------------


def test_undeclared_capability_is_denied() -> None:
    module = capability_rune(K.ACCEL, 12, declare={"noise": K.RAND})
    with pytest.raises(CapabilityDenied, match=r"sneaky.rune asked for ACCEL, which its manifest"):
        LegacyRune(module, name="sneaky.rune")


def test_rune_without_a_graph_may_use_no_capability() -> None:
    no_graph = build([manifest("(drop (call $request_capability (i32.const 1)))"), call()])
    with pytest.raises(CapabilityDenied, match=r"asked for RAND, which its manifest"):
        LegacyRune(no_graph)


def test_capability_denied_by_policy() -> None:
    module = capability_rune(K.ACCEL, 12)
    with pytest.raises(CapabilityDenied, match="asked for ACCEL, which this device's policy"):
        LegacyRune(module, allowed=frozenset({K.RAND}))
    with pytest.raises(CapabilityDenied, match="policy"):
        load_rune(module, allowed=frozenset({K.RAND}))


def test_unknown_capability_and_output_kinds_are_refused() -> None:
    unknown_cap = build([manifest("(drop (call $request_capability (i32.const 99)))"), call()])
    with pytest.raises(CapabilityDenied, match="unknown capability 99"):
        LegacyRune(unknown_cap)
    ble = build([manifest("(drop (call $request_output (i32.const 2)))"), call()])
    with pytest.raises(CapabilityDenied, match="output BLE, which this host does not provide"):
        LegacyRune(ble)


# -- what a module may import and must be ---------------------------------------------------------

MISSILES = '(import "env" "launch_missiles" (func (param i32)))'
FD_WRITE = (
    '(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))'
)


def test_unknown_import_is_refused_by_name() -> None:
    with pytest.raises(ModuleRejected, match=r"does not provide: env\.launch_missiles$"):
        LegacyRune(importing_rune(MISSILES))


def test_wasi_import_is_refused_by_name() -> None:
    with pytest.raises(
        ModuleRejected, match=r"wasi_snapshot_preview1\.fd_write \(WASI is not available\)"
    ):
        LegacyRune(importing_rune(FD_WRITE))


def test_every_refused_import_is_named() -> None:
    others = [
        '(import "env" "request_capability" (func (param f32) (result i32)))',
        '(import "env" "heap" (global i32))',
    ]
    with pytest.raises(ModuleRejected) as raised:
        LegacyRune(importing_rune(MISSILES, FD_WRITE, *others))
    message = str(raised.value)
    for name in (
        "env.launch_missiles",
        "wasi_snapshot_preview1.fd_write",
        "env.request_capability (wrong signature)",
        "env.heap",
    ):
        assert name in message


def test_removed_tflite_micro_api_fails_with_a_pointer_to_rune_model_load() -> None:
    with pytest.raises(ModuleRejected, match="tfm_model_invoke.*uses rune_model_load"):
        LegacyRune(removed_api_rune())


def valid_module() -> bytes:
    return capability_rune(K.RAND, 4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\0asm\x01\0\0\0" + bytes(range(7, 64)), r"section \d+ runs past the end"),
        (b"\0asm\x01\0\0\0\x01\xff\xff\xff\xff\xff", "LEB128"),
        (b"\0asm\x02\0\0\0", "unsupported WebAssembly version 02000000"),
        (b"#!/bin/sh\nrm -rf /\n", "not a legacy rune|not a WebAssembly module"),
        (b"", "not a legacy rune|not a WebAssembly module"),
    ],
    ids=["garbage-after-magic", "bad-leb128", "wasm-version-2", "shell-script", "empty"],
)
def test_malformed_modules_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ModuleRejected, match=message):
        LegacyRune(data)


def test_truncated_module_is_rejected() -> None:
    module = valid_module()
    for cut in (9, len(module) // 3, len(module) // 2, len(module) - 1):
        with pytest.raises(ModuleRejected):
            LegacyRune(module[:cut])


def test_load_rune_rejects_what_is_neither_bundle_nor_wasm() -> None:
    with pytest.raises(ModuleRejected, match="neither a rune bundle nor a legacy .rune"):
        load_rune(b"MZ\x90\x00 not a rune")


def test_missing_exports_are_named() -> None:
    no_call = build([manifest()])
    with pytest.raises(ModuleRejected, match="does not export _call"):
        LegacyRune(no_call)


@pytest.mark.parametrize(
    ("section", "payload", "message"),
    [
        (GRAPH_SECTION, b"{not json", "section is not valid JSON"),
        (GRAPH_SECTION, b'{"capabilities": {"x": {"kind": "LASER"}}}', "unknown capability"),
        (RESOURCE_SECTION, b"\0\0\0\x04name\0\0\x10\0short", "runs past the end"),
    ],
)
def test_malformed_metadata_is_rejected(section: str, payload: bytes, message: str) -> None:
    with pytest.raises(ModuleRejected, match=message):
        LegacyRune(with_custom_section(valid_module(), section, payload))


# -- models ---------------------------------------------------------------------------------------


def test_model_over_the_limit_is_refused_before_parsing() -> None:
    garbage = bytes(range(256)) * 8  # 2048 bytes no runtime can parse
    module = model_rune(garbage, TFLITE, "f32[1, 1]", "f32[1, 1]", input_data=bytes(4))
    with pytest.raises(LimitExceeded, match="2048 bytes is over the 1024-byte limit"):
        LegacyRune(module, limits=SandboxLimits(model_bytes=1024))
    with pytest.raises(ModelError, match="could not be loaded"):  # so nothing parsed it above
        LegacyRune(module)


def test_a_real_model_over_the_limit_is_refused() -> None:
    model = sine_tflite()
    module = model_rune(model, TFLITE, "f32[1, 1]", "f32[1, 1]", input_data=bytes(4))
    with pytest.raises(LimitExceeded, match=f"{len(model)} bytes is over the 100-byte limit"):
        LegacyRune(module, limits=SandboxLimits(model_bytes=100))


def growing_model() -> bytes:
    """An ONNX model whose signature says f32[1] -> f32[1] (dynamic dims) but makes 4 values."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"])],
        "grow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        initializer=[numpy_helper.from_array(np.array([4], dtype=np.int64), "repeats")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_model_output_larger_than_declared_is_not_written() -> None:
    module = model_rune(growing_model(), ONNX, "f32[1]", "f32[1]", input_data=struct.pack("<f", 2))
    rune = LegacyRune(module)
    for _ in range(2):
        # The same error each time: the first call did not overwrite the rune's tensor
        # pointers past its 4-byte output (which would make the next call a bounds fault).
        with pytest.raises(ModelError, match=r"made 16 bytes for its output f32\[1\] \(4 bytes\)"):
            rune.call()


# -- the host process -----------------------------------------------------------------------------


def rune_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("rune", path=str(Path(sys.executable).parent)) or shutil.which("rune")
    assert exe, "the rune console script is not installed"
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("module", "code", "message"),
    [
        (looping_rune, 1, "inference 1: spin.rune _call ran"),
        (trapping_rune, 1, "unreachable"),
        (lambda: importing_rune(MISSILES), 3, "env.launch_missiles"),
        (lambda: capability_rune(K.ACCEL, 12, declare={}), 3, "does not declare"),
    ],
    ids=["loop", "trap", "unknown-import", "undeclared-capability"],
)
def test_cli_reports_hostile_runes_without_a_traceback(
    tmp_path: Path, module: object, code: int, message: str
) -> None:
    path = tmp_path / "spin.rune"
    path.write_bytes(module())  # type: ignore[operator]
    result = rune_cli("run", path, "-o", "json")
    assert result.returncode == code
    assert "error:" in result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_idle_host_does_not_spin_after_short_calls() -> None:
    rune = LegacyRune(capability_rune(K.RAND, 4))
    for _ in range(20):
        rune.call()
    time.sleep(0.05)

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = cpu_seconds()
    time.sleep(0.5)
    assert cpu_seconds() - before < 0.25, "the epoch ticker spins while no call runs"
    assert sandbox_engine._ticker is not None
    assert not sandbox_engine._ticker._wake.is_set()
