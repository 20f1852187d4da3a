"""The run loop with real runes in real slots: every input source, the sink, probation and
rollback, reconfiguration, and the asyncio loop the daemon runs.

Runes: the sine (RAND -> TFLite) and gesture (ACCEL -> ONNX) example bundles, and legacy `.rune`
modules from tests/legacy_runes.py: `capability_rune` writes the exact bytes the host gave it, so
a test can check what a source fed it; `trapping_rune` traps on every call.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.policy import AgentPolicy
from agent.probation import ProbationPolicy
from agent.runconfig import (
    AccelerometerInput,
    RandomInput,
    ReplayInput,
    RunConfig,
    SampleFormat,
    apply_config,
)
from agent.runloop import RuneLoop, StepKind, StepResult
from agent.slots import RunOutcome, SlotRune, Slots
from ota.rune.build import build_bundle
from ota.rune.runefile import CapabilityKind
from tests.legacy_runes import capability_rune, trapping_rune

T0 = 1_700_000_000.0
PROBATION = ProbationPolicy(window=600, max_failures=3, min_successes=50)


@pytest.fixture(scope="module")
def gesture(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "gesture" / "Runefile.yml").data


@pytest.fixture(scope="module")
def sine(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "sine" / "Runefile.yml").data


def accel_rune(rows: int) -> bytes:
    """A legacy rune that reads `rows` ACCEL rows and outputs their bytes."""
    return capability_rune(CapabilityKind.ACCEL, rows * 12, {"n": ("i32", rows)})


def raw_rune(length: int) -> bytes:
    return capability_rune(CapabilityKind.RAW, length, {"length": ("i32", length)})


def deploy(slots: Slots, data: bytes, name: str, at: float, version: str = "1.0.0") -> SlotRune:
    """Install `data` into the inactive slot and switch to it (probation starts at `at`)."""
    kind = "legacy" if data[:4] == b"\0asm" else "bundle"
    info = SlotRune.for_bytes(
        data,
        org="acme",
        name=name,
        version=version,
        kind=kind,
        capabilities=(),
        installed_at=at,
    )
    return slots.switch(slots.install(data, info), at)


def loop_for(state: Path, config: RunConfig, policy: AgentPolicy | None = None) -> RuneLoop:
    slots = Slots(state, policy=PROBATION)
    return RuneLoop(state, slots, policy or AgentPolicy(), config)


def with_input(state: Path, source: Any, **changes: Any) -> RunConfig:
    return replace(RunConfig.defaults(state), input=source, **changes)


def sink_lines(state: Path) -> list[dict[str, Any]]:
    path = state / "outputs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def legacy_bytes(record: dict[str, Any]) -> bytes:
    return bytes.fromhex(record["output"]["bytes"])


def labels(state: Path) -> list[str]:
    return [line["output"][0]["elements"][0] for line in sink_lines(state)]


def steps(loop: RuneLoop, count: int, start: float = T0 + 20) -> list[StepResult]:
    return [loop.step(start + i) for i in range(count)]


# -- sources ------------------------------------------------------------------------------------


def test_idle_until_a_rune_is_active_then_random_inputs_feed_it(
    tmp_path: Path, sine: bytes
) -> None:
    loop = loop_for(tmp_path, with_input(tmp_path, RandomInput(seed=1)))
    idle = loop.step(T0)
    assert idle.kind is StepKind.IDLE and idle.reason == "no rune is active"
    assert sink_lines(tmp_path) == []

    deploy(loop.slots, sine, "sine", T0 + 10)
    results = steps(loop, 5)
    assert [r.kind for r in results] == [StepKind.OK] * 5
    assert all(r.rune == "sine@1.0.0" and r.outputs == 1 for r in results)
    assert all(r.probation is RunOutcome.ON_PROBATION for r in results)
    records = sink_lines(tmp_path)
    assert [r["t"] for r in records] == [T0 + 20 + i for i in range(5)]
    assert {r["rune"] for r in records} == {"sine@1.0.0"}
    degrees = [r["output"][0]["elements"][0] for r in records]
    assert all(0 <= d < 360 for d in degrees) and len(set(degrees)) == 5
    probation = loop.slots.state().probation
    assert probation is not None and probation.successes == 5

    stats = loop.stats()
    assert (stats.inferences, stats.failures, stats.idle) == (5, 0, 1)
    assert stats.latency_samples == 5 and stats.rune == "sine@1.0.0"
    assert stats.latency_p50_s is not None and stats.latency_p95_s is not None
    assert 0 < stats.latency_p50_s <= stats.latency_p95_s

    # The same seed makes the same inputs: another device replays this one exactly.
    other = tmp_path / "other"
    twin = loop_for(other, with_input(other, RandomInput(seed=1)))
    deploy(twin.slots, sine, "sine", T0 + 10)
    steps(twin, 5)
    assert [r["output"] for r in sink_lines(other)] == [r["output"] for r in records]


def test_the_simulated_accelerometer_drives_the_gesture_rune(
    tmp_path: Path, gesture: bytes
) -> None:
    still = tmp_path / "still"
    loop = loop_for(still, with_input(still, AccelerometerInput(seed=3, burst_every_s=0)))
    deploy(loop.slots, gesture, "gesture", T0)
    assert {r.kind for r in steps(loop, 10)} == {StepKind.OK}
    assert set(labels(still)) == {"rest"}

    moving = tmp_path / "moving"
    config = AccelerometerInput(seed=3, burst_every_s=2.0)
    loop = loop_for(moving, with_input(moving, config))
    deploy(loop.slots, gesture, "gesture", T0)
    assert {r.kind for r in steps(loop, 30)} == {StepKind.OK}
    seen = labels(moving)
    assert len(set(seen)) >= 3 and "rest" in seen  # gestures now and then, rest in between


def test_replaying_a_csv_recording_loops_through_it(
    tmp_path: Path, gesture: bytes, examples_dir: Path
) -> None:
    recording = examples_dir / "gesture" / "gesture.csv"  # wave, tilt, lift, rest: 128 rows each
    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.yaml").write_text(f"run:\n  input: {{kind: replay, path: '{recording}'}}\n")
    config = RunConfig.load(state)
    assert config.input == ReplayInput(recording, SampleFormat.CSV)
    loop = loop_for(state, config)
    deploy(loop.slots, gesture, "gesture", T0)
    assert {r.kind for r in steps(loop, 10)} == {StepKind.OK}
    assert labels(state) == ["wave", "tilt", "lift", "rest"] * 2 + ["wave", "tilt"]


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "accel.fifo"
    os.mkfifo(path)
    yield path


def test_replaying_a_fifo_waits_for_data_and_reads_it_in_order(tmp_path: Path, fifo: Path) -> None:
    state = tmp_path / "state"
    source = ReplayInput(fifo, SampleFormat.F32LE, timeout_s=0.05)
    loop = loop_for(state, with_input(state, source))
    deploy(loop.slots, accel_rune(4), "accel", T0)

    # No writer yet: the loop waits, and waiting is not a run (nothing for probation).
    waiting = steps(loop, 3)
    assert {r.kind for r in waiting} == {StepKind.WAITING}
    assert all("waiting for input" in r.reason for r in waiting)
    assert all(r.probation is None for r in waiting)
    probation = loop.slots.state().probation
    assert probation is not None and (probation.successes, probation.failures) == (0, ())

    values = np.arange(36, dtype="<f4")  # three windows of 4 rows
    writer = threading.Thread(target=lambda: write_slowly(fifo, values.tobytes()))
    writer.start()
    results: list[StepResult] = []
    while len([r for r in results if r.kind is StepKind.OK]) < 3 and len(results) < 200:
        results.append(loop.step(T0 + 30 + len(results)))
    writer.join(5)
    assert {r.kind for r in results} <= {StepKind.OK, StepKind.WAITING}
    got = b"".join(legacy_bytes(r) for r in sink_lines(state))
    assert got == values.tobytes()  # every value once, in order, none lost while waiting
    probation = loop.slots.state().probation
    assert probation is not None and probation.successes == 3
    assert loop.stats().waiting >= 3
    loop.close()


def write_slowly(path: Path, data: bytes) -> None:
    """One writer sending `data` in small pieces, so windows arrive split."""
    fd = os.open(path, os.O_WRONLY)
    with os.fdopen(fd, "wb", buffering=0) as handle:
        for start in range(0, len(data), 20):
            handle.write(data[start : start + 20])
            threading.Event().wait(0.01)


# -- failures, probation, rollback --------------------------------------------------------------


def test_a_trapping_rune_fails_and_probation_rolls_back_to_the_previous_one(
    tmp_path: Path, sine: bytes
) -> None:
    loop = loop_for(tmp_path, with_input(tmp_path, RandomInput(seed=2)))
    deploy(loop.slots, sine, "sine", T0)
    deploy(loop.slots, trapping_rune(), "trap", T0 + 10)

    results = steps(loop, 5)
    kinds = [r.kind for r in results]
    assert kinds == [
        StepKind.FAILED,
        StepKind.FAILED,
        StepKind.ROLLED_BACK,
        StepKind.OK,
        StepKind.OK,
    ]
    assert all(r.rune == "trap@1.0.0" for r in results[:3])
    assert "reached `unreachable`" in results[0].error
    assert results[2].probation is RunOutcome.ROLLED_BACK
    assert "3 failed runs within 600 s of probation" in results[2].reason
    assert "now running sine@1.0.0" in loop.slots.state().history[-1].reason
    assert results[3].rune == "sine@1.0.0"
    assert {r["rune"] for r in sink_lines(tmp_path)} == {"sine@1.0.0"}
    stats = loop.stats()
    assert (stats.failures, stats.inferences) == (3, 2)
    assert "unreachable" in stats.last_error and stats.last_error_at == T0 + 22


def test_a_rune_the_policy_refuses_counts_as_failed_runs(
    tmp_path: Path, sine: bytes, gesture: bytes
) -> None:
    policy = AgentPolicy(allowed_capabilities=frozenset({"RAND"}))
    loop = loop_for(tmp_path, with_input(tmp_path, AccelerometerInput(seed=1)), policy)
    deploy(loop.slots, sine, "sine", T0)
    deploy(loop.slots, gesture, "gesture", T0 + 10)
    results = steps(loop, 4)
    assert [r.kind for r in results] == [StepKind.FAILED] * 2 + [StepKind.ROLLED_BACK, StepKind.OK]
    assert "failed to load" in results[0].error and "ACCEL" in results[0].error


def test_input_failures_are_not_the_runes_and_never_roll_it_back(
    tmp_path: Path, sine: bytes
) -> None:
    missing = tmp_path / "no-such-sensor.csv"
    state = tmp_path / "state"
    loop = loop_for(state, with_input(state, ReplayInput(missing, SampleFormat.CSV)))
    deploy(loop.slots, sine, "sine", T0)
    deploy(loop.slots, accel_rune(2), "accel", T0 + 10)
    results = steps(loop, 6)
    assert {r.kind for r in results} == {StepKind.FAILED}
    assert all("not counted for probation" in r.reason for r in results)
    assert all("no such file or device" in r.error for r in results)
    state_now = loop.slots.state()
    assert state_now.probation is not None and state_now.probation.failures == ()
    assert state_now.active is not None
    assert loop.slots.rune(state_now.active.slot).name == "accel"

    # A source that cannot make what the rune reads is the device's problem too.
    loop.reconfigure(with_input(state, RandomInput(seed=1)))
    assert loop.step(T0 + 40).kind is StepKind.OK
    sound_args: dict[str, tuple[str, float]] = {
        "hz": ("i32", 16),
        "sample_duration_ms": ("i32", 1000),
    }
    sound = capability_rune(CapabilityKind.SOUND, 32, sound_args)
    deploy(loop.slots, sound, "mic", T0 + 50)
    loop.reconfigure(with_input(state, AccelerometerInput(seed=1)))
    result = loop.step(T0 + 60)
    assert result.kind is StepKind.FAILED and "reads SOUND" in result.error
    assert result.probation is None
    assert loop.stats().failures == 7


def test_reconfigure_switches_the_source_at_the_next_step(tmp_path: Path) -> None:
    first, second = tmp_path / "a.u8", tmp_path / "b.u8"
    first.write_bytes(bytes(range(0, 8)))
    second.write_bytes(bytes(range(100, 108)))
    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.yaml").write_text(
        f"run:\n  input: {{kind: replay, path: '{first}', format: u8}}\n"
        f"  remote_replay_paths: ['{second}']\n"
    )
    loop = loop_for(state, RunConfig.load(state))
    deploy(loop.slots, raw_rune(4), "raw", T0)
    steps(loop, 2)
    # The controller's `config` command: saved, then handed to the loop.
    changed = apply_config(
        state, {"input": {"kind": "replay", "path": str(second), "format": "u8"}}
    )
    loop.reconfigure(changed)
    assert loop.config == changed
    steps(loop, 2, start=T0 + 30)
    assert [legacy_bytes(r) for r in sink_lines(state)] == [
        bytes(range(0, 4)),
        bytes(range(4, 8)),
        bytes(range(100, 104)),
        bytes(range(104, 108)),
    ]
    assert loop.stats().input == f"replay {second} (u8)"

    # A new sink bound applies to the open sink.
    bounded = apply_config(state, {"sink": {"max_bytes": 4096}})
    loop.reconfigure(bounded)
    steps(loop, 100, start=T0 + 100)
    assert (state / "outputs.jsonl").stat().st_size <= 4096
    assert (state / "outputs.jsonl.1").exists()


# -- the asyncio loop ---------------------------------------------------------------------------


async def test_run_steps_at_the_interval_until_stopped(tmp_path: Path, sine: bytes) -> None:
    loop = loop_for(tmp_path, with_input(tmp_path, RandomInput(seed=4), interval_s=0.02))
    deploy(loop.slots, sine, "sine", T0)
    stop = asyncio.Event()
    events: list[StepResult] = []

    def on_event(result: StepResult) -> None:
        events.append(result)
        if len(events) == 3:
            raise RuntimeError("a broken handler does not stop the loop")
        if len(events) == 6:
            stop.set()

    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(loop.run(stop, on_event), timeout=10)
    elapsed = asyncio.get_running_loop().time() - started
    assert len(events) == 6 and elapsed >= 5 * 0.02
    assert {e.kind for e in events} <= {StepKind.OK, StepKind.PASSED_PROBATION}
    assert len(sink_lines(tmp_path)) == 6
    assert loop.stats().inferences == 6


async def test_run_survives_failures_and_a_shorter_interval_cuts_the_wait(
    tmp_path: Path, sine: bytes
) -> None:
    loop = loop_for(tmp_path, with_input(tmp_path, RandomInput(seed=4), interval_s=3600))
    deploy(loop.slots, sine, "sine", time.time() - 10)
    deploy(loop.slots, trapping_rune(), "trap", time.time())  # run() steps on the real clock
    stop = asyncio.Event()
    events: list[StepResult] = []

    def on_event(result: StepResult) -> None:
        events.append(result)
        if len(events) == 1:  # an hour's wait has begun: a config command shortens it
            loop.reconfigure(replace(loop.config, interval_s=0.01))
        if len(events) == 5:
            stop.set()

    await asyncio.wait_for(loop.run(stop, on_event), timeout=10)
    kinds = [e.kind for e in events]
    assert kinds[:3] == [StepKind.FAILED, StepKind.FAILED, StepKind.ROLLED_BACK]
    assert kinds[3:] == [StepKind.OK, StepKind.OK]


async def test_stopping_during_a_long_wait_returns_at_once(tmp_path: Path) -> None:
    loop = loop_for(tmp_path, with_input(tmp_path, RandomInput(), interval_s=3600))
    stop = asyncio.Event()
    events: list[StepResult] = []
    task = asyncio.create_task(loop.run(stop, events.append))
    while not events:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, timeout=2)
    assert [e.kind for e in events] == [StepKind.IDLE]
