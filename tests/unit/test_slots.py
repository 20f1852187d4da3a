"""A/B slots on a real disk with real runes: install, switch, rollback, revoke, recovery, locking.

Crashes are real where the agent has a crash point (a subprocess that `agent.faults` kills with
SIGKILL mid-install or mid-switch) and written directly where it has none (leftover temp files,
a half-written slot, a truncated or garbage `state.json`). After every crash, `recover` must leave
a state whose active rune loads and runs in the sandbox.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from agent.faults import KILL_AT_ENV
from agent.sandbox.runner import load_rune
from agent.slots import (
    HISTORY_LIMIT,
    EventKind,
    NoRollbackTarget,
    SlotCorrupted,
    SlotError,
    SlotRef,
    SlotRune,
    Slots,
    SlotsLocked,
    SlotState,
    SlotStateError,
)
from ota.rune.build import build_bundle
from tests.legacy_runes import serial_rune, trapping_rune

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def gesture(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "gesture" / "Runefile.yml").data


@pytest.fixture(scope="module")
def sine(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "sine" / "Runefile.yml").data


def bundle_info(data: bytes, name: str, at: float, capability: str) -> SlotRune:
    return SlotRune.for_bytes(
        data,
        org="acme",
        name=name,
        version="1.0.0",
        kind="bundle",
        capabilities=(capability,),
        installed_at=at,
    )


def legacy_info(data: bytes, name: str, at: float, version: str = "1.0.0") -> SlotRune:
    return SlotRune.for_bytes(
        data,
        org="acme",
        name=name,
        version=version,
        kind="legacy",
        capabilities=(),
        installed_at=at,
    )


def runs(data: bytes) -> bool:
    """The rune loads and one call runs (synthetic inputs)."""
    from agent.health import health_check

    return health_check(data, "slot", None, calls=1).ok


def two_installed(tmp_path: Path, gesture: bytes, sine: bytes) -> Slots:
    """gesture in a (switched to at T0), then sine in b (at T0 + 10): b active, a previous."""
    slots = Slots(tmp_path)
    assert slots.install(gesture, bundle_info(gesture, "gesture", T0, "ACCEL")) == "a"
    slots.switch("a", T0)
    assert slots.install(sine, bundle_info(sine, "sine", T0 + 5, "RAND")) == "b"
    slots.switch("b", T0 + 10)
    return slots


def kinds(slots: Slots) -> list[EventKind]:
    return [event.kind for event in slots.state().history]


# -- install, switch, rollback, revoke ----------------------------------------------------------


def test_install_writes_the_inactive_slot_and_never_touches_the_active_one(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = Slots(tmp_path)
    assert slots.active(T0) is None
    slot = slots.install(gesture, bundle_info(gesture, "gesture", T0, "ACCEL"))
    assert slot == "a"
    assert slots.state().active is None  # installed, not switched
    slots.switch("a", T0)

    folder = tmp_path / "slots" / "a"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert sorted(before) == ["meta.json", "rune"]
    for version in ("1.0.0", "1.0.1", "1.0.2"):
        info = replace(
            bundle_info(sine, "sine", T0 + 1, "RAND"),
            version=version,
            target=f"runes/acme/sine/{version}",
        )
        assert slots.install(sine, info) == "b"
        after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
        assert after == before
        active = slots.active(T0 + 2)
        assert active is not None and active[0] == gesture and active[1].name == "gesture"

    meta = json.loads((tmp_path / "slots" / "b" / "meta.json").read_text())
    assert meta["target"] == "runes/acme/sine/1.0.2" and meta["kind"] == "bundle"
    assert meta["capabilities"] == ["RAND"] and meta["length"] == len(sine)
    assert kinds(slots) == [EventKind.INSTALL, EventKind.SWITCH] + [EventKind.INSTALL] * 3
    assert slots.state().history[-1].reason == "replaces sine@1.0.1"
    assert not list((tmp_path / "slots").rglob("*.tmp"))


def test_install_refuses_bytes_that_do_not_match_their_metadata(
    tmp_path: Path, gesture: bytes
) -> None:
    slots = Slots(tmp_path)
    info = bundle_info(gesture, "gesture", T0, "ACCEL")
    with pytest.raises(SlotError, match="do not match the length and sha256"):
        slots.install(gesture + b"x", info)
    with pytest.raises(SlotError, match="declared a legacy rune but is not one"):
        slots.install(gesture, replace(info, kind="legacy"))
    with pytest.raises(SlotError, match="name 'Bad/..' must be"):
        SlotRune.for_bytes(
            gesture,
            org="acme",
            name="Bad/..",
            version="1",
            kind="bundle",
            capabilities=(),
            installed_at=T0,
        )
    with pytest.raises(SlotError, match="unknown capabilities 'GPS'"):
        replace(info, capabilities=("GPS",))
    assert slots.state() == SlotState()


def test_a_failed_write_is_a_clear_error_and_leaves_no_install_behind(
    tmp_path: Path, gesture: bytes
) -> None:
    slots = Slots(tmp_path)
    (tmp_path / "slots" / "a" / "rune").mkdir()  # os.replace cannot put a file there
    with pytest.raises(SlotError, match=r"cannot write .*slots/a/rune: "):
        slots.install(gesture, bundle_info(gesture, "gesture", T0, "ACCEL"))
    assert slots.state().installing is None
    assert not list((tmp_path / "slots").rglob("*.tmp"))
    with pytest.raises(SlotError, match="cannot switch: slot a holds no complete rune"):
        slots.switch("a", T0)


def test_switch_keeps_the_old_rune_as_previous_and_starts_probation(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    state = slots.state()
    assert state.active is not None and state.active.slot == "b"
    assert state.previous is not None and state.previous.slot == "a"
    assert state.probation is not None and state.probation.started_at == T0 + 10
    assert state.probation.sha256 == state.active.sha256
    active = slots.active(T0 + 11)
    assert active is not None and active[0] == sine and runs(active[0])
    with pytest.raises(SlotError, match="slot b is already active"):
        slots.switch("b", T0 + 12)
    with pytest.raises(SlotError, match="no slot 'c'"):
        slots.switch("c", T0 + 12)


def test_switch_refuses_a_slot_without_a_complete_rune(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    with pytest.raises(SlotError, match="cannot switch: slot a holds no complete rune"):
        slots.switch("a", T0)


def test_rollback_returns_to_the_previous_rune_once(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    assert slots.rollback("operator asked", T0 + 20) == "a"
    state = slots.state()
    assert state.active is not None and state.active.slot == "a"
    assert state.previous is None and state.probation is None
    event = state.history[-1]
    assert event.kind is EventKind.ROLLBACK and event.rune == "sine@1.0.0" and event.slot == "b"
    assert event.reason == "operator asked; now running gesture@1.0.0 from slot a"
    active = slots.active(T0 + 21)
    assert active is not None and active[0] == gesture
    # The rune rolled back from can come back neither by rollback nor by switch.
    assert not (tmp_path / "slots" / "b" / "meta.json").exists()
    with pytest.raises(NoRollbackTarget, match="there is no previous rune"):
        slots.rollback("again", T0 + 22)
    with pytest.raises(SlotError, match="cannot switch"):
        slots.switch("b", T0 + 22)


def test_rollback_needs_an_intact_previous_rune(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    rune = tmp_path / "slots" / "a" / "rune"
    rune.write_bytes(rune.read_bytes()[:-1] + b"\xff")
    with pytest.raises(NoRollbackTarget, match="previous rune is not intact.*does not match"):
        slots.rollback("bad", T0 + 20)
    assert slots.state().active == SlotRef("b", bundle_info(sine, "sine", 0, "RAND").sha256)
    with pytest.raises(NoRollbackTarget, match="no rune is active"):
        Slots(tmp_path / "empty").rollback("nothing", T0)


def test_installing_over_the_previous_rune_drops_it_as_a_rollback_target(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    good = serial_rune(b'{"type_name": "utf8", "elements": ["ok"], "dimensions": [1]}')
    assert slots.install(good, legacy_info(good, "serial", T0 + 30)) == "a"
    assert slots.state().previous is None
    with pytest.raises(NoRollbackTarget):
        slots.rollback("no", T0 + 31)


def test_deactivate_runs_the_previous_rune_unless_it_is_refused_too(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    assert slots.deactivate("sine@1.0.0 was revoked", T0 + 20) == "a"
    state = slots.state()
    assert state.active is not None and state.active.slot == "a" and state.previous is None
    event = state.history[-1]
    assert event.kind is EventKind.REVOKE and event.rune == "sine@1.0.0"
    assert event.reason == "sine@1.0.0 was revoked; now running gesture@1.0.0 from slot a"
    assert not (tmp_path / "slots" / "b" / "meta.json").exists()

    other = two_installed(tmp_path / "second", gesture, sine)
    refused: list[str] = []

    def refuse(info: SlotRune) -> bool:
        refused.append(info.ref)
        return info.name == "gesture"

    assert other.deactivate("acme revoked", T0 + 20, refuse=refuse) is None
    assert refused == ["gesture@1.0.0"]
    state = other.state()
    assert state.active is None and state.previous is None and state.probation is None
    assert state.history[-1].reason == (
        "acme revoked; no rune is active (the previous rune gesture@1.0.0 is refused too)"
    )
    assert other.active(T0 + 21) is None
    assert not list((tmp_path / "second" / "slots").glob("*/meta.json"))
    assert other.deactivate("again", T0 + 22) is None


def test_deactivate_without_a_previous_rune_leaves_none_active(
    tmp_path: Path, gesture: bytes
) -> None:
    slots = Slots(tmp_path)
    slots.switch(slots.install(gesture, bundle_info(gesture, "gesture", T0, "ACCEL")), T0)
    assert slots.deactivate("revoked", T0 + 1) is None
    assert slots.active(T0 + 2) is None
    assert slots.state().history[-1].reason == (
        "revoked; no rune is active (there is no previous rune)"
    )


# -- corruption ---------------------------------------------------------------------------------


def test_a_corrupted_active_slot_falls_back_to_the_previous_rune(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    rune = tmp_path / "slots" / "b" / "rune"
    data = bytearray(rune.read_bytes())
    data[len(data) // 2] ^= 0x01
    rune.write_bytes(bytes(data))

    active = slots.active(T0 + 20)
    assert active is not None and active[0] == gesture and runs(active[0])
    event = slots.state().history[-1]
    assert event.kind is EventKind.ROLLBACK and event.slot == "b"
    assert event.reason == (
        "slot b: sine@1.0.0 does not match its sha256; now running gesture@1.0.0 from slot a"
    )


def test_a_corrupted_active_slot_without_a_previous_leaves_none_active(
    tmp_path: Path, gesture: bytes
) -> None:
    slots = Slots(tmp_path)
    slots.switch(slots.install(gesture, bundle_info(gesture, "gesture", T0, "ACCEL")), T0)
    rune = tmp_path / "slots" / "a" / "rune"
    rune.write_bytes(rune.read_bytes()[:100])
    assert slots.active(T0 + 1) is None
    state = slots.state()
    assert state.active is None
    assert "slot a: gesture@1.0.0 is 100 bytes, its metadata says" in state.history[-1].reason
    assert "cannot roll back: there is no previous rune" in state.history[-1].reason


def test_a_slot_whose_metadata_is_garbage_is_not_intact(tmp_path: Path, gesture: bytes) -> None:
    slots = Slots(tmp_path)
    slots.install(gesture, bundle_info(gesture, "gesture", T0, "ACCEL"))
    meta = tmp_path / "slots" / "a" / "meta.json"
    for content, message in (
        ("{not json", "is not valid JSON"),
        ("[]", "must hold a JSON object"),
        (json.dumps({"target": "x", "capabilities": []}), "has no 'org'"),
        (meta.read_text().replace('"length": ', '"length": -'), "is not a byte count"),
    ):
        original = meta.read_text()
        meta.write_text(content)
        with pytest.raises(SlotCorrupted, match=message):
            slots.rune("a")
        meta.write_text(original)
    assert slots.rune("a").name == "gesture"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is not valid JSON"),
        ('{"format": "fleet-slots/1", "active": ', "is not valid JSON"),
        ("\xff\xfe", "is not valid JSON"),
        ('{"format": "other/2"}', "has format 'other/2', not fleet-slots/1"),
        ('{"format": "fleet-slots/1", "active": {"slot": "c"}}', "active must be null or"),
        ('{"format": "fleet-slots/1", "history": {}}', "history must be a list"),
        (
            '{"format": "fleet-slots/1", "history": [{"at": "noon", "kind": "switch"}]}',
            "a history event needs a time and a known kind",
        ),
        ('{"format": "fleet-slots/1", "probation": {"sha256": 1}}', "names no valid sha256"),
        (
            json.dumps({"format": "fleet-slots/1", "previous": {"slot": "a", "sha256": "0" * 64}}),
            "a previous rune but no active one",
        ),
    ],
)
def test_a_malformed_state_file_is_a_clear_error(
    tmp_path: Path, content: str, message: str
) -> None:
    slots = Slots(tmp_path)
    (tmp_path / "slots" / "state.json").write_text(content, encoding="latin-1")
    with pytest.raises(SlotStateError, match=message):
        slots.state()
    with pytest.raises(SlotStateError, match=message):
        slots.install(b"\0asm\x01\0\0\0", legacy_info(b"\0asm\x01\0\0\0", "x", T0))


def test_history_is_bounded(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    rune = serial_rune(b"{}")
    for i in range(HISTORY_LIMIT + 10):
        slots.install(rune, legacy_info(rune, "serial", T0 + i))
    history = slots.state().history
    assert len(history) == HISTORY_LIMIT
    assert history[-1].at == T0 + HISTORY_LIMIT + 9


# -- recovery after crashes -----------------------------------------------------------------------


CRASHING_INSTALL = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.slots import SlotRune, Slots
    from ota.targets import RuneTarget

    state_dir, rune_path, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    data = rune_path.read_bytes()
    target = RuneTarget("acme", "sine", "2.0.0", "bundle", ("RAND",), "0.1.0")
    info = SlotRune.for_target(data, target, installed_at=1_700_000_100.0)
    slots = Slots(state_dir)
    slots.recover(1_700_000_100.0)
    slot = slots.install(data, info)
    slots.switch(slot, 1_700_000_100.0)
    print("not killed")
    """
)


def crash(tmp_path: Path, data: bytes, step: str) -> None:
    """Install and switch `data` in a subprocess the crash point `step` kills."""
    rune_path = tmp_path / "new.rune"
    rune_path.write_bytes(data)
    env = {**os.environ, KILL_AT_ENV: step, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_INSTALL, str(tmp_path), str(rune_path), step],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "not killed" not in result.stdout


def one_active(tmp_path: Path, gesture: bytes) -> Slots:
    slots = Slots(tmp_path)
    slots.switch(slots.install(gesture, bundle_info(gesture, "gesture", T0, "ACCEL")), T0)
    slots.record_run(True, "", T0 + 1)
    slots.check_probation(T0 + 3600)
    assert slots.state().probation is None
    return slots


def test_power_loss_while_writing_a_slot_keeps_the_active_rune(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = one_active(tmp_path, gesture)
    crash(tmp_path, sine, "write-slot")
    partial = tmp_path / "slots" / "b" / "rune.tmp"
    assert 0 < partial.stat().st_size < len(sine)
    assert not (tmp_path / "slots" / "b" / "meta.json").exists()
    assert slots.state().installing is not None

    state = slots.recover(T0 + 200)
    assert not partial.exists()
    assert state.installing is None and state.active is not None and state.active.slot == "a"
    assert state.history[-1].kind is EventKind.RECOVER
    assert state.history[-1].reason == "the install into slot b was interrupted; the slot is empty"
    active = slots.active(T0 + 200)
    assert active is not None and active[0] == gesture and runs(active[0])
    with pytest.raises(SlotError, match="cannot switch: slot b holds no complete rune"):
        slots.switch("b", T0 + 201)

    # The device carries on: the same install succeeds afterwards.
    slots.switch(slots.install(sine, bundle_info(sine, "sine", T0 + 202, "RAND")), T0 + 203)
    active = slots.active(T0 + 204)
    assert active is not None and active[0] == sine


def test_power_loss_before_the_switch_leaves_the_install_inactive(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = one_active(tmp_path, gesture)
    crash(tmp_path, sine, "switch")
    before = slots.state()
    state = slots.recover(T0 + 200)
    assert state == before  # nothing to repair
    assert state.active is not None and state.active.slot == "a"
    assert state.history[-1].kind is EventKind.INSTALL and state.history[-1].rune == "sine@2.0.0"
    assert slots.rune("b").version == "2.0.0"
    active = slots.active(T0 + 200)
    assert active is not None and active[0] == gesture and runs(active[0])


def test_power_loss_after_the_switch_continues_probation(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = one_active(tmp_path, gesture)
    crash(tmp_path, sine, "probation")
    state = slots.recover(T0 + 200)
    assert state.active is not None and state.active.slot == "b"
    assert state.previous is not None and state.previous.slot == "a"
    assert state.probation is not None and state.probation.sha256 == state.active.sha256
    active = slots.active(T0 + 200)
    assert active is not None and active[0] == sine and runs(active[0])


def test_power_loss_between_writing_a_slot_and_recording_it(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    """The slot's files are complete but state.json still says the install is running."""
    slots = one_active(tmp_path, gesture)
    info = bundle_info(sine, "sine", T0 + 50, "RAND")
    slots.install(sine, info)
    state_file = tmp_path / "slots" / "state.json"
    stored = json.loads(state_file.read_text())
    stored["installing"] = {"slot": "b", "sha256": info.sha256}
    stored["history"] = stored["history"][:-1]
    state_file.write_text(json.dumps(stored))

    state = slots.recover(T0 + 60)
    assert state.installing is None and state.active is not None and state.active.slot == "a"
    assert state.history[-1].reason == (
        "the install of sine@1.0.0 into slot b finished; it is not active"
    )
    slots.switch("b", T0 + 61)
    active = slots.active(T0 + 62)
    assert active is not None and active[0] == sine


def test_leftover_temp_files_are_removed(tmp_path: Path, gesture: bytes, sine: bytes) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    before = slots.state()
    root = tmp_path / "slots"
    for leftover, content in (
        (root / "state.json.tmp", b'{"format": "fleet-sl'),
        (root / "a" / "meta.json.tmp", b"{}"),
        (root / "b" / "rune.tmp", sine[:1000]),
    ):
        leftover.write_bytes(content)
    assert slots.recover(T0 + 20) == before
    assert not list(root.rglob("*.tmp"))


@pytest.mark.parametrize(
    "garbage",
    [b"", b'{"format": "fleet-slots/1", "active": {"slot": "b", "sha', b"\x00" * 512, b"[1, 2]"],
)
def test_a_truncated_or_garbage_state_file_is_rebuilt_from_intact_slots(
    tmp_path: Path, gesture: bytes, sine: bytes, garbage: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    (tmp_path / "slots" / "state.json").write_bytes(garbage)
    state = slots.recover(T0 + 20)
    # gesture (slot a) was installed first: the rune that ran before, never an unswitched one.
    assert state.active is not None and state.active.slot == "a"
    assert state.previous is None and state.probation is None
    (event,) = state.history
    assert event.kind is EventKind.RECOVER and event.rune == "gesture@1.0.0"
    assert "rebuilt it with gesture@1.0.0, the intact rune installed first, active" in event.reason
    active = slots.active(T0 + 21)
    assert active is not None and active[0] == gesture and runs(active[0])
    assert Slots(tmp_path).state() == state


def test_a_rebuild_skips_half_written_and_refused_slots(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    state_file = tmp_path / "slots" / "state.json"
    state_file.unlink()
    state = slots.recover(T0 + 20, refuse=lambda info: info.name == "gesture")
    assert state.active is not None and state.active.slot == "b"
    assert "state.json is missing; rebuilt it with sine@1.0.0" in state.history[0].reason

    # A half-written slot: its metadata survived but its rune is short.
    state_file.write_text("garbage")
    rune = tmp_path / "slots" / "a" / "rune"
    rune.write_bytes(rune.read_bytes()[:500])
    state = slots.recover(T0 + 30)
    assert state.active is not None and state.active.slot == "b"
    active = slots.active(T0 + 31)
    assert active is not None and active[0] == sine and runs(active[0])

    # Nothing intact at all: no active rune, and the agent still starts.
    state_file.write_text("garbage")
    (tmp_path / "slots" / "b" / "meta.json").unlink()
    state = slots.recover(T0 + 40)
    assert state.active is None
    assert "no intact rune, none active" in state.history[0].reason
    assert slots.active(T0 + 41) is None


def test_recover_drops_pointers_to_slots_that_are_no_longer_intact(
    tmp_path: Path, gesture: bytes, sine: bytes
) -> None:
    slots = two_installed(tmp_path, gesture, sine)
    (tmp_path / "slots" / "b" / "rune").write_bytes(b"")
    state = slots.recover(T0 + 20)
    assert state.active is not None and state.active.slot == "a"
    assert state.previous is None and state.probation is None
    assert state.history[-1].kind is EventKind.ROLLBACK

    (tmp_path / "slots" / "a" / "meta.json").unlink()
    state = slots.recover(T0 + 30)
    assert state.active is None
    assert "slot a holds no complete rune" in state.history[-1].reason


def test_recover_on_a_fresh_device_writes_an_empty_state(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    assert slots.recover(T0) == SlotState()
    assert json.loads((tmp_path / "slots" / "state.json").read_text())["format"] == (
        "fleet-slots/1"
    )


# -- locking --------------------------------------------------------------------------------------


def test_a_second_holder_of_the_lock_is_refused(tmp_path: Path, gesture: bytes) -> None:
    slots = Slots(tmp_path)
    lock = tmp_path / "slots" / ".lock"
    info = bundle_info(gesture, "gesture", T0, "ACCEL")
    with lock.open("a") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SlotsLocked, match="in use by another process"):
            slots.install(gesture, info)
        with pytest.raises(SlotsLocked):
            slots.recover(T0)
        assert slots.state() == SlotState()  # reading needs no lock
    assert slots.install(gesture, info) == "a"


def test_a_lock_held_by_another_process_is_refused(tmp_path: Path, gesture: bytes) -> None:
    slots = Slots(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys\n"
            "f = open(sys.argv[1], 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
            str(tmp_path / "slots" / ".lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(SlotsLocked, match="run one agent per state directory"):
            slots.switch("a", T0)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    slots.switch(slots.install(gesture, bundle_info(gesture, "gesture", T0, "ACCEL")), T0)


def test_a_trapping_rune_is_still_installable_and_revocable(tmp_path: Path) -> None:
    """Slots do not judge runes (the health check and probation do); they only keep them."""
    slots = Slots(tmp_path)
    bad = trapping_rune()
    slots.switch(slots.install(bad, legacy_info(bad, "panic", T0)), T0)
    active = slots.active(T0)
    assert active is not None
    with pytest.raises(Exception, match="unreachable"):
        load_rune(active[0]).call()
    assert slots.deactivate("revoked", T0 + 1) is None
