"""Probation: a rune that passes its health check but fails in service is rolled back by itself.

The end-to-end tests run real legacy runes in the sandbox and report each run to the slots, as
the agent does; time is driven by the test. The pure rules (`agent.probation`) are tested on
their own below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.health import health_check
from agent.probation import (
    Probation,
    ProbationError,
    ProbationPolicy,
    Verdict,
    expire,
    record,
    start,
)
from agent.sandbox.errors import SandboxError
from agent.sandbox.runner import LoadedRune, load_rune
from agent.slots import EventKind, RunOutcome, RunResult, SlotRune, Slots, SlotStateError
from tests.legacy_runes import serial_rune
from tests.unit.test_health import failing_after_rune

T0 = 1_700_000_000.0
SHA = "ab" * 32
GOOD = serial_rune(b'{"type_name": "utf8", "elements": ["steady"], "dimensions": [1]}')
ALSO_GOOD = serial_rune(b'{"type_name": "utf8", "elements": ["fine"], "dimensions": [1]}')


def info(data: bytes, name: str, at: float) -> SlotRune:
    return SlotRune.for_bytes(
        data,
        org="acme",
        name=name,
        version="1.0.0",
        kind="legacy",
        capabilities=(),
        installed_at=at,
    )


def deploy(tmp_path: Path, new: bytes, policy: ProbationPolicy | None = None) -> Slots:
    """`GOOD` active and past probation in slot a, then `new` switched to in slot b at T0."""
    slots = Slots(tmp_path, policy=policy)
    slots.switch(slots.install(GOOD, info(GOOD, "steady", T0 - 7200)), T0 - 7200)
    assert slots.check_probation(T0 - 3600).outcome is RunOutcome.PASSED
    assert slots.install(new, info(new, "flaky", T0)) == "b"
    slots.switch("b", T0)
    return slots


def run_active(slots: Slots, rune: LoadedRune, now: float) -> RunResult:
    """One inference of the active rune, reported the way the agent reports it."""
    try:
        rune.call()
    except SandboxError as exc:
        return slots.record_run(False, str(exc), now)
    return slots.record_run(True, "", now)


def loaded(slots: Slots, now: float) -> LoadedRune:
    active = slots.active(now)
    assert active is not None
    return load_rune(active[0], name=active[1].ref)


# -- with real runes ------------------------------------------------------------------------------


def test_a_rune_that_passes_its_health_check_but_fails_in_service_is_rolled_back(
    tmp_path: Path,
) -> None:
    flaky = failing_after_rune(3)
    assert health_check(flaky, "flaky", None).ok
    slots = deploy(tmp_path, flaky)
    rune = loaded(slots, T0)
    outcomes = [run_active(slots, rune, T0 + 10 * i).outcome for i in range(1, 7)]
    assert outcomes == [RunOutcome.ON_PROBATION] * 5 + [RunOutcome.ROLLED_BACK]

    state = slots.state()
    assert state.active is not None and state.active.slot == "a" and state.probation is None
    event = state.history[-1]
    assert event.kind is EventKind.ROLLBACK and event.rune == "flaky@1.0.0"
    assert event.reason.startswith("3 failed runs within 600 s of probation: flaky@1.0.0 _call")
    assert "unreachable" in event.reason
    assert event.reason.endswith("now running steady@1.0.0 from slot a")
    back = slots.active(T0 + 70)
    assert back is not None and back[0] == GOOD
    assert run_active(slots, load_rune(back[0]), T0 + 80).outcome is RunOutcome.TRUSTED


def test_failures_spread_over_more_than_the_window_do_not_roll_back(tmp_path: Path) -> None:
    slots = deploy(tmp_path, failing_after_rune(0))
    rune = loaded(slots, T0)
    assert run_active(slots, rune, T0 + 1).outcome is RunOutcome.ON_PROBATION
    assert run_active(slots, rune, T0 + 300).outcome is RunOutcome.ON_PROBATION
    third = run_active(slots, rune, T0 + 601)
    assert third.outcome is RunOutcome.PASSED and third.active == "b"
    assert third.reason == "probation window of 600 s passed with 2 failed and 0 successful runs"
    assert slots.state().history[-1].kind is EventKind.PROBATION_PASSED
    # Out of probation, more failures are reported but roll nothing back.
    for i in range(5):
        assert run_active(slots, rune, T0 + 700 + i).outcome is RunOutcome.TRUSTED
    active = slots.state().active
    assert active is not None and active.slot == "b"


def test_enough_successful_runs_end_probation_early(tmp_path: Path) -> None:
    slots = deploy(tmp_path, ALSO_GOOD, ProbationPolicy(min_successes=5))
    rune = loaded(slots, T0)
    outcomes = [run_active(slots, rune, T0 + i).outcome for i in range(1, 6)]
    assert outcomes == [RunOutcome.ON_PROBATION] * 4 + [RunOutcome.PASSED]
    assert slots.state().probation is None
    assert slots.state().history[-1].reason == "5 successful runs on probation (0 failed)"


def test_probation_survives_a_restart(tmp_path: Path) -> None:
    flaky = failing_after_rune(0)
    slots = deploy(tmp_path, flaky)
    rune = loaded(slots, T0)
    run_active(slots, rune, T0 + 10)
    run_active(slots, rune, T0 + 20)
    del slots, rune

    restarted = Slots(tmp_path)
    state = restarted.recover(T0 + 100)
    assert state.probation is not None and len(state.probation.failures) == 2
    rune = loaded(restarted, T0 + 100)
    result = run_active(restarted, rune, T0 + 110)
    assert result.outcome is RunOutcome.ROLLED_BACK and result.active == "a"
    assert "3 failed runs within 600 s" in result.reason


def test_the_probation_policy_in_force_at_the_switch_is_the_one_kept(tmp_path: Path) -> None:
    slots = deploy(tmp_path, failing_after_rune(0), ProbationPolicy(window=60, max_failures=2))
    restarted = Slots(tmp_path)  # default policy now, but the record carries its own
    rune = loaded(restarted, T0)
    assert run_active(restarted, rune, T0 + 1).outcome is RunOutcome.ON_PROBATION
    assert run_active(restarted, rune, T0 + 2).outcome is RunOutcome.ROLLED_BACK
    assert slots.state().active is not None


def test_a_failing_first_rune_stays_active_and_the_failure_is_recorded(tmp_path: Path) -> None:
    slots = Slots(tmp_path, policy=ProbationPolicy(max_failures=2))
    bad = failing_after_rune(0)
    slots.switch(slots.install(bad, info(bad, "bad", T0)), T0)
    rune = loaded(slots, T0)
    assert run_active(slots, rune, T0 + 1).outcome is RunOutcome.ON_PROBATION
    result = run_active(slots, rune, T0 + 2)
    assert result.outcome is RunOutcome.FAILED and result.active == "a"
    assert result.reason.endswith(
        "cannot roll back: there is no previous rune, so bad@1.0.0 stays active"
    )
    assert slots.state().history[-1].kind is EventKind.PROBATION_FAILED
    assert slots.state().probation is None


def test_check_probation_ends_it_when_the_window_has_passed(tmp_path: Path) -> None:
    slots = deploy(tmp_path, ALSO_GOOD)
    assert slots.check_probation(T0 + 599).outcome is RunOutcome.ON_PROBATION
    assert slots.check_probation(T0 + 600).outcome is RunOutcome.PASSED
    assert slots.check_probation(T0 + 601).outcome is RunOutcome.TRUSTED


def test_a_garbage_probation_record_is_a_clear_error(tmp_path: Path) -> None:
    slots = deploy(tmp_path, ALSO_GOOD)
    state_file = tmp_path / "slots" / "state.json"
    stored = json.loads(state_file.read_text())
    stored["probation"]["max_failures"] = 0
    state_file.write_text(json.dumps(stored))
    with pytest.raises(SlotStateError, match="max_failures must be a whole number >= 1, not 0"):
        slots.record_run(True, "", T0 + 1)


# -- the rules on their own ------------------------------------------------------------------------


def test_failures_within_the_window_fail_probation() -> None:
    probation = start(SHA, T0)
    for at in (T0 + 1, T0 + 2):
        step = record(probation, False, f"trap at {at - T0:g}", at)
        assert step.verdict is Verdict.CONTINUE
        probation = step.probation
    step = record(probation, True, "", T0 + 3)
    assert step.verdict is Verdict.CONTINUE and step.probation.successes == 1
    step = record(step.probation, False, "trap at 4", T0 + 4)
    assert step.verdict is Verdict.FAILED
    assert step.reason == (
        "3 failed runs within 600 s of probation: trap at 1; trap at 2; trap at 4"
    )


def test_a_run_after_the_window_is_not_counted() -> None:
    probation = start(SHA, T0, ProbationPolicy(window=10, max_failures=1))
    step = record(probation, False, "late", T0 + 10)
    assert step.verdict is Verdict.PASSED
    assert step.probation.failures == ()


def test_a_clock_that_went_backwards_restarts_the_window() -> None:
    probation = start(SHA, T0, ProbationPolicy(window=100))
    step = record(probation, True, "", T0 - 5000)
    assert step.verdict is Verdict.CONTINUE and step.probation.started_at == T0 - 5000
    assert expire(step.probation, T0 - 4901).verdict is Verdict.CONTINUE
    assert expire(step.probation, T0 - 4900).verdict is Verdict.PASSED


def test_reasons_are_bounded() -> None:
    step = record(start(SHA, T0), False, "x" * 10_000, T0 + 1)
    assert len(step.probation.failures[0].reason) == 500
    assert record(start(SHA, T0), False, "", T0 + 1).probation.failures[0].reason == "failed"


def test_a_record_round_trips_through_json() -> None:
    probation = record(start(SHA, T0, ProbationPolicy(30, 4, 7)), False, "boom", T0 + 1).probation
    assert Probation.from_json(json.loads(json.dumps(probation.to_json()))) == probation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "XYZ"}, "names no valid sha256"),
        ({"started_at": float("nan")}, "started_at must be a number"),
        ({"started_at": True}, "started_at must be a number"),
        ({"successes": -1}, "successes must be a count"),
        ({"failures": {}}, "failures must be a list"),
        ({"failures": [{"at": 1}]}, "is not {at, reason}"),
        ({"window": 0}, "window must be positive seconds"),
        ({"min_successes": 1.5}, "min_successes must be a whole number"),
    ],
)
def test_a_malformed_record_is_refused(change: dict[str, object], message: str) -> None:
    data = {**start(SHA, T0).to_json(), **change}
    with pytest.raises(ProbationError, match=message):
        Probation.from_json(data)
    with pytest.raises(ProbationError, match="must be a JSON object"):
        Probation.from_json([data])
