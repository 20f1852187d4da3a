"""fleet.rollouts and fleet.rollout_plan by example: one test (or a few) for every rule.

The machine is driven the way the scheduler drives it: `tick` with the clock and a fleet view,
`on_report` for device status, operator actions, and the decisions each call returns.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import pytest

from fleet.rollout_plan import (
    DEFAULT_WAVES,
    OnFailure,
    Options,
    PlanError,
    Rate,
    WaveSpec,
    WaveTarget,
    draw,
    group_of,
    parse_duration,
    parse_percent,
    parse_rate,
    plan_waves,
)
from fleet.rollouts import (
    TERMINAL,
    Decision,
    DeviceState,
    DeviceTimedOut,
    FleetSnapshot,
    InvalidAction,
    Notify,
    RollbackState,
    RollbackTimedOut,
    Rollout,
    RolloutChanged,
    RolloutError,
    RolloutState,
    SendRollback,
    Skip,
    SkipReason,
    WavePassed,
    WaveStarted,
)

# Options for examples: no soak, a rate that never binds, no retries, a one minute timeout, and
# every failure counts.
FAST = Options(
    soak_s=0,
    success_percent=100,
    max_failures_percent=0,
    min_executed=1,
    rate=Rate(1000, 60),
    device_timeout_s=60,
    retries=0,
)


def fleet_of(count: int, groups: tuple[str, ...] = ("a",), prefix: str = "d") -> FleetSnapshot:
    return FleetSnapshot(
        {f"{prefix}{i:03}": {"hw": groups[i % len(groups)]} for i in range(count)},
    )


def rollout(spec: str = "1,50%,100%", seed: str = "seed", **options: object) -> Rollout:
    fields = {**FAST.to_dict(), "rate": FAST.rate, "on_failure": FAST.on_failure, **options}
    return Rollout(WaveSpec.parse(spec), Options(**fields), seed, created_at=0.0)  # type: ignore[arg-type]


def paused(reason: str) -> RolloutChanged:
    return RolloutChanged(RolloutState.PAUSED, reason)


def aborted(reason: str) -> RolloutChanged:
    return RolloutChanged(RolloutState.ABORTED, reason)


def rolled_back(reason: str) -> RolloutChanged:
    return RolloutChanged(RolloutState.ROLLED_BACK, reason)


def notified(decisions: Sequence[Decision]) -> list[str]:
    return [d.device for d in decisions if isinstance(d, Notify)]


def succeed(r: Rollout, devices: list[str], now: float) -> list[Decision]:
    out: list[Decision] = []
    for device in devices:
        out += r.on_report(device, DeviceState.SUCCEEDED, now)
    return out


def state_of(r: Rollout, device: str) -> DeviceState:
    return r.targets[device].state


def in_state(r: Rollout, state: DeviceState) -> list[str]:
    return [t.id for t in r.targets.values() if t.state is state]


# Wave specs.


def test_the_default_spec_is_a_canary_then_cumulative_percentages() -> None:
    spec = WaveSpec.parse(DEFAULT_WAVES)
    assert spec.targets == (
        WaveTarget(count=1),
        WaveTarget(percent=Fraction(10)),
        WaveTarget(percent=Fraction(50)),
        WaveTarget(percent=Fraction(100)),
    )
    assert str(spec) == DEFAULT_WAVES


def test_a_spec_allows_spaces_decimals_and_no_canary() -> None:
    assert str(WaveSpec.parse(" 2 , 12.5% ,100 % ")) == "2,12.5%,100%"
    assert str(WaveSpec.parse("100%")) == "100%"
    assert str(WaveSpec.parse("0.001%,33.333333%,100%")) == "0.001%,33.333333%,100%"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "the wave spec is empty"),
        ("  ", "the wave spec is empty"),
        ("1,,100%", "wave 2 is empty"),
        ("1,ten%,100%", r"wave 2 \('ten%'\) is neither a device count"),
        ("1,10,100%", r"wave 2 \('10'\) is a device count: only the first wave"),
        ("0,100%", "the canary must be at least 1 device"),
        ("0%,100%", "must be more than 0%"),
        ("1,150%", r"wave 2 \('150%'\) is over 100%"),
        ("1,50%,50%,100%", r"wave 3 \('50%'\) is not above wave 2 \(50%\)"),
        ("1,50%,10%,100%", "percentages are cumulative"),
        ("1,10%,50%", "the last wave is 50%, not 100%"),
        ("5", "the last wave is 5, not 100%"),
        ("1,10.1234567%,100%", "neither a device count"),
        ("-1,100%", "neither a device count"),
    ],
)
def test_a_bad_spec_is_refused_saying_why(spec: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        WaveSpec.parse(spec)


def test_cumulative_targets_round_up_and_never_exceed_the_selection() -> None:
    assert WaveTarget(count=5).cumulative(3) == 3
    assert WaveTarget(count=5).cumulative(30) == 5
    assert WaveTarget(percent=Fraction(10)).cumulative(15) == 2
    assert WaveTarget(percent=Fraction(1)).cumulative(1) == 1
    assert WaveTarget(percent=Fraction(100)).cumulative(7) == 7
    assert WaveTarget(percent=Fraction(50)).cumulative(0) == 0


# Options.


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"soak_s": -1}, "--soak must not be negative"),
        ({"success_percent": 0}, "--success must be above 0%"),
        ({"success_percent": 101}, "--success"),
        ({"max_failures_percent": -1}, "--max-failures"),
        ({"min_executed": -1}, "--min-executed"),
        ({"rate": Rate(0, 60)}, "--rate"),
        ({"rate": Rate(5, 0)}, "--rate"),
        ({"device_timeout_s": 0}, "--device-timeout"),
        ({"retries": -1}, "--retries"),
    ],
)
def test_bad_options_are_refused_naming_the_option(fields: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Options(**fields)  # type: ignore[arg-type]


def test_options_round_trip_through_json() -> None:
    options = Options(rate=Rate(10, 1), on_failure=OnFailure.ROLLBACK, start_at=1234.5)
    assert Options.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    assert Options(on_failure="abort").on_failure is OnFailure.ABORT  # type: ignore[arg-type]


def test_option_parsers() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("10m") == 600
    assert parse_duration("1.5h") == 5400
    assert parse_duration("250ms") == 0.25
    assert parse_duration("0") == 0
    assert parse_percent("95%") == 95
    assert parse_percent("2.5") == 2.5
    assert parse_rate("500/min") == Rate(500, 60)
    assert parse_rate("10/s") == Rate(10, 1)
    assert parse_rate("1000 / h") == Rate(1000, 3600)
    assert str(Rate(500, 60)) == "500/min"
    with pytest.raises(PlanError, match="--soak '10 minutes' is not a duration"):
        parse_duration("10 minutes", "soak")
    with pytest.raises(PlanError, match="--success '120%' is not a percentage"):
        parse_percent("120%", "success")
    with pytest.raises(PlanError, match="--rate '0/min'"):
        parse_rate("0/min")
    with pytest.raises(PlanError, match="--rate 'fast'"):
        parse_rate("fast")


# Drawing.


def test_a_wave_holds_every_label_group_when_it_has_room() -> None:
    selection = {f"d{i}": {"hw": hw} for i, hw in enumerate("a" * 80 + "b" * 15 + "c" * 5)}
    wave = draw(selection, 10, "seed")
    groups = Counter(selection[d]["hw"] for d in wave)
    assert len(wave) == len(set(wave)) == 10
    assert set(groups) == {"a", "b", "c"}
    assert groups["a"] > groups["b"] >= groups["c"]  # the rest in proportion


def test_a_small_wave_takes_distinct_groups_and_waves_take_turns() -> None:
    selection = {f"d{i}": {"hw": hw} for i, hw in enumerate("a" * 6 + "b" * 3 + "c")}
    two = draw(selection, 2, "seed")
    assert {selection[d]["hw"] for d in two} == {"a", "b"}  # the largest groups first
    spec = WaveSpec.parse("1,20%,30%,100%")
    waves = plan_waves(spec, selection, "seed")
    assert [[selection[d]["hw"] for d in wave] for wave in waves[:3]] == [["a"], ["b"], ["c"]]


def test_the_group_is_the_full_label_set() -> None:
    assert group_of({"site": "x", "hw": "a"}) == "hw=a,site=x"
    assert group_of({}) == ""


def test_drawing_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    selection = fleet_of(50, ("a", "b", "c")).devices
    spec = WaveSpec.parse(DEFAULT_WAVES)
    assert plan_waves(spec, selection, "one") == plan_waves(spec, dict(selection), "one")
    assert plan_waves(spec, selection, "one") != plan_waves(spec, selection, "two")


def test_a_plan_covers_every_selected_device_once() -> None:
    selection = fleet_of(37, ("a", "b"))
    waves = plan_waves(WaveSpec.parse(DEFAULT_WAVES), selection.devices, "seed")
    assert [len(wave) for wave in waves] == [1, 3, 15, 18]
    assert sorted(d for wave in waves for d in wave) == sorted(selection.devices)
    with pytest.raises(PlanError, match="the selection is empty"):
        plan_waves(WaveSpec.parse(DEFAULT_WAVES), {}, "seed")


def test_the_machine_draws_what_the_plan_predicts() -> None:
    fleet = fleet_of(30, ("a", "b", "c"))
    r = rollout(DEFAULT_WAVES)
    r.tick(0, fleet)
    for now in range(1, 10):
        succeed(r, in_state(r, DeviceState.NOTIFIED), now)
        r.tick(now, fleet)
    assert r.state is RolloutState.COMPLETED
    assert [w.devices for w in r.waves] == plan_waves(r.spec, fleet.devices, "seed")


# Starting.


def test_a_rollout_starts_at_start_at_and_start_overrides_it() -> None:
    fleet = fleet_of(3)
    r = rollout(start_at=100.0)
    assert r.state is RolloutState.SCHEDULED
    assert r.next_wake() == 100.0
    assert r.tick(99.9, fleet) == []
    out = r.tick(100, fleet)
    assert out[0] == RolloutChanged(RolloutState.RUNNING)
    assert isinstance(out[1], WaveStarted) and out[1].wave == 1 and len(out[1].devices) == 1
    assert out[2] == Notify(out[1].devices[0], 1)
    assert r.summary(100).state == "running" and r.started_at == 100
    early = rollout(start_at=100.0)
    assert early.start(5, fleet)[0] == RolloutChanged(RolloutState.RUNNING)
    with pytest.raises(InvalidAction, match="only a scheduled one can start"):
        early.start(6, fleet)


def test_an_empty_selection_at_the_start_aborts() -> None:
    r = rollout()
    assert r.tick(0, FleetSnapshot()) == [
        RolloutChanged(RolloutState.RUNNING),
        aborted("the selection was empty at the start"),
    ]
    assert r.state is RolloutState.ABORTED and r.settled


# Waves and gates.


def test_the_next_wave_waits_for_success_and_soak() -> None:
    fleet = fleet_of(10)
    r = rollout("1,50%,100%", soak_s=300, success_percent=100)
    out = r.tick(0, fleet)
    canary = notified(out)
    assert len(canary) == 1 and isinstance(out[1], WaveStarted)
    assert r.tick(50, fleet) == []  # nothing before the canary succeeds
    assert succeed(r, canary, 50) == [WavePassed(1)]
    assert r.next_wake() == 350
    assert r.tick(349, fleet) == []
    out = r.tick(350, fleet)
    assert isinstance(out[0], WaveStarted) and out[0].wave == 2 and len(notified(out)) == 4


def test_a_wave_advances_at_its_threshold_and_completion_waits_for_stragglers() -> None:
    fleet = fleet_of(21)
    r = rollout("1,100%", success_percent=90, max_failures_percent=50)
    succeed(r, notified(r.tick(0, fleet)), 1)
    second = notified(r.tick(1, fleet))
    assert len(second) == 20
    succeed(r, second[:17], 2)
    assert r.waves[1].passed_at is None
    assert succeed(r, second[17:18], 2) == [WavePassed(2)]  # 18 of 20 = 90%
    assert r.state is RolloutState.RUNNING  # two still in flight
    r.on_report(second[18], "failed", 3, reason="disk full")
    assert r.on_report(second[19], "succeeded", 3) == [RolloutChanged(RolloutState.COMPLETED)]


def test_a_wave_that_ends_below_its_success_threshold_trips() -> None:
    fleet = fleet_of(4)
    r = rollout("100%", success_percent=100, max_failures_percent=100, min_executed=100)
    devices = notified(r.tick(0, fleet))
    succeed(r, devices[:3], 1)
    out = r.on_report(devices[3], "failed", 1, reason="health check failed")
    assert out == [
        paused(
            "wave 1 ended with 3 of 4 devices succeeded (75%, below 100%); health check failed (1)"
        )
    ]


def test_a_canary_that_fails_pauses_with_the_device_reason() -> None:
    fleet = fleet_of(10, ("a", "b"))
    r = rollout(DEFAULT_WAVES, min_executed=10, max_failures_percent=5, success_percent=95)
    canary = notified(r.tick(0, fleet))
    out = r.on_report(canary[0], "failed", 5, reason="health check failed on hw=a")
    assert r.state is RolloutState.PAUSED
    assert out == [paused(r.reason or "")]
    assert "wave 1 ended with 0 of 1" in (r.reason or "")
    assert "health check failed on hw=a (1)" in (r.reason or "")
    assert r.tick(10_000, fleet) == []  # no second wave


def test_failures_stop_a_wave_early_only_after_min_executed() -> None:
    fleet = fleet_of(20)
    r = rollout("100%", min_executed=3, max_failures_percent=50, success_percent=50)
    devices = notified(r.tick(0, fleet))
    assert r.on_report(devices[0], "failed", 1, reason="bad") == []
    assert r.on_report(devices[1], "failed", 1, reason="bad") == []  # 2 finished < 3
    out = r.on_report(devices[2], "succeeded", 1)
    assert out == [paused("wave 1: 2 of 3 finished devices failed (66.7%, more than 50%); bad (2)")]
    assert r.waves[0].tripped_at == 1


def test_on_failure_abort_cancels_pending_and_follows_in_flight() -> None:
    fleet = fleet_of(6)
    r = rollout("100%", rate=Rate(3, 60), on_failure=OnFailure.ABORT)
    first = notified(r.tick(0, fleet))
    assert len(first) == 3
    out = r.on_report(first[0], "failed", 1, reason="broken")
    pending = in_state(r, DeviceState.SKIPPED)
    assert out[:3] == [Skip(d, SkipReason.CANCELLED) for d in pending]
    assert out[-1] == aborted(r.reason or "") and r.state is RolloutState.ABORTED
    assert len(pending) == 3 and r.targets[pending[0]].reason == "cancelled"
    assert r.on_report(first[1], "succeeded", 2) == []  # still followed after the abort
    assert r.targets[first[1]].state is DeviceState.SUCCEEDED
    assert r.tick(61, fleet) == [DeviceTimedOut(first[2], 1, retry=False)]
    assert r.settled


def test_on_failure_rollback_rolls_back_every_notified_device_once_it_ended() -> None:
    fleet = fleet_of(4)
    r = rollout("100%", rate=Rate(3, 60), on_failure=OnFailure.ROLLBACK, device_timeout_s=100)
    first = notified(r.tick(0, fleet))
    r.on_report(first[1], "succeeded", 1)
    out = r.on_report(first[0], "failed", 2, reason="broken")
    never = in_state(r, DeviceState.SKIPPED)
    assert out[0] == Skip(never[0], SkipReason.CANCELLED)
    assert out[1] == rolled_back(r.reason or "") and "broken (1)" in (r.reason or "")
    # The rate window (3 a minute) is full; the in-flight device waits for its deployment to end.
    assert r.tick(59, fleet) == []
    assert r.tick(60, fleet) == [SendRollback(first[0]), SendRollback(first[1])]
    assert r.targets[never[0]].rollback is None
    assert r.on_report(first[2], "succeeded", 61) == [SendRollback(first[2])]
    assert r.on_rollback_report(first[0], True, 62) == []
    r.on_rollback_report(first[1], False, 62, reason="slot corrupted")
    assert r.tick(200, fleet) == [RollbackTimedOut(first[2])]
    assert [r.targets[d].rollback for d in first] == [
        RollbackState.DONE,
        RollbackState.FAILED,
        RollbackState.TIMED_OUT,
    ]
    assert r.summary(200).rollback == {"done": 1, "failed": 1, "timed-out": 1}
    assert r.settled


# Devices.


def test_the_selection_is_evaluated_when_each_wave_starts() -> None:
    fleet = fleet_of(4)
    r = rollout("1,100%")
    canary = notified(r.tick(0, fleet))
    del fleet.devices["d003" if canary != ["d003"] else "d002"]
    fleet.devices["new"] = {"hw": "a"}  # enrolled during the rollout
    succeed(r, canary, 1)
    out = r.tick(1, fleet)
    assert isinstance(out[0], WaveStarted)
    assert set(out[0].devices) == set(fleet.devices) - set(canary)
    assert r.waves[1].selected == 4


def test_the_rate_limit_spreads_notifications() -> None:
    fleet = fleet_of(5)
    r = rollout("100%", rate=Rate(2, 60), device_timeout_s=1000)
    assert len(notified(r.tick(0, fleet))) == 2
    assert r.next_wake() == 60
    assert notified(r.tick(59.9, fleet)) == []
    assert len(notified(r.tick(60, fleet))) == 2
    assert len(notified(r.tick(120, fleet))) == 1


def test_unavailable_devices_are_skipped_when_their_turn_comes() -> None:
    fleet = fleet_of(4)
    fleet.unavailable_devices = {
        "d000": SkipReason.OFFLINE,
        "d001": SkipReason.QUARANTINED,
        "d002": SkipReason.INELIGIBLE,
    }
    r = rollout("100%", rate=Rate(1, 60), device_timeout_s=1000)
    out = r.tick(0, fleet)
    assert notified(out) == ["d003"]
    out += r.tick(59, fleet)
    assert len([d for d in out if isinstance(d, Skip)]) < 3  # turns come with the rate
    out += r.tick(60, fleet)
    assert {d for d in out if isinstance(d, Skip)} == {
        Skip("d000", SkipReason.OFFLINE),
        Skip("d001", SkipReason.QUARANTINED),
        Skip("d002", SkipReason.INELIGIBLE),
    }
    assert r.sends == []  # the skips at 60 used none of the rate window
    assert r.targets["d000"].reason == "offline"
    assert r.on_report("d003", "succeeded", 61) == [
        WavePassed(1),
        RolloutChanged(RolloutState.COMPLETED),
    ]
    assert r.summary(61).counts["skipped"] == 3


def test_failures_and_timeouts_are_retried_then_final() -> None:
    fleet = fleet_of(1)
    r = rollout("100%", retries=2, device_timeout_s=60)
    assert r.tick(0, fleet)[-1] == Notify("d000", 1)
    assert r.on_report("d000", "failed", 10, reason="download failed") == []
    assert state_of(r, "d000") is DeviceState.PENDING
    assert r.tick(11, fleet) == [Notify("d000", 2)]
    assert r.tick(71, fleet) == [DeviceTimedOut("d000", 2, retry=True), Notify("d000", 3)]
    out = r.tick(131, fleet)
    assert out[0] == DeviceTimedOut("d000", 3, retry=False)
    assert out[1] == paused(r.reason or "")
    assert state_of(r, "d000") is DeviceState.TIMED_OUT


def test_a_retry_of_a_device_gone_offline_ends_with_its_last_failure() -> None:
    fleet = fleet_of(1)
    r = rollout("100%", retries=1)
    r.tick(0, fleet)
    r.on_report("d000", "failed", 1, reason="verification failed")
    fleet.unavailable_devices["d000"] = SkipReason.OFFLINE
    r.tick(2, fleet)
    assert state_of(r, "d000") is DeviceState.FAILED
    assert r.targets["d000"].reason == "verification failed"


def test_reports_only_move_a_device_forward() -> None:
    fleet = fleet_of(2)
    r = rollout("100%", retries=1)
    r.tick(0, fleet)
    r.on_report("d000", "installing", 1)
    r.on_report("d000", "downloading", 2)  # arrived late
    assert state_of(r, "d000") is DeviceState.INSTALLING
    assert r.on_report("d000", "succeeded", 3, attempt=2) == []  # not this attempt
    assert r.on_report("unknown", "succeeded", 3) == []
    r.on_report("d000", "succeeded", 3, attempt=1)
    r.on_report("d000", "failed", 4)  # a finished device stays finished
    assert state_of(r, "d000") is DeviceState.SUCCEEDED
    r.on_report("d001", "failed", 5)
    assert r.on_report("d001", "succeeded", 5) == []  # pending for its retry: nothing in flight
    with pytest.raises(ValueError, match="a device cannot report 'skipped'"):
        r.on_report("d001", "skipped", 6)
    with pytest.raises(ValueError):
        r.on_report("d001", "exploded", 6)


def test_a_device_rollback_by_probation_is_a_failure_with_a_default_reason() -> None:
    fleet = fleet_of(1)
    r = rollout("100%", retries=2)
    r.tick(0, fleet)
    r.on_report("d000", "rolled-back", 1)  # never retried: the rune ran and failed
    assert state_of(r, "d000") is DeviceState.ROLLED_BACK
    assert r.summary(1).failure_reasons == {"rolled back by the device": 1}


# Operator actions.


def test_pause_stops_notifications_but_not_the_clock() -> None:
    fleet = fleet_of(4)
    r = rollout("100%", rate=Rate(2, 60), retries=1)
    first = notified(r.tick(0, fleet))
    assert r.pause(1) == [paused("paused by the operator")]
    assert r.tick(100, fleet) == [
        DeviceTimedOut(first[0], 1, retry=True),
        DeviceTimedOut(first[1], 1, retry=True),
    ]
    assert r.resume(101) == [RolloutChanged(RolloutState.RUNNING)]
    assert len(notified(r.tick(101, fleet))) == 2  # the two never notified go first


def test_resume_waives_a_tripped_wave() -> None:
    fleet = fleet_of(5)
    r = rollout("1,100%")
    r.on_report(notified(r.tick(0, fleet))[0], "failed", 1, reason="boom")
    assert r.state is RolloutState.PAUSED
    r.resume(2)
    out = r.tick(2, fleet)
    assert isinstance(out[0], WaveStarted) and len(notified(out)) == 4
    assert r.waves[0].waived


def test_a_scheduled_rollout_can_be_paused_and_resumed() -> None:
    r = rollout(start_at=100.0)
    r.pause(1)
    assert r.tick(200, fleet_of(2)) == []
    r.resume(201)
    assert r.state is RolloutState.SCHEDULED
    assert r.tick(202, fleet_of(2))[0] == RolloutChanged(RolloutState.RUNNING)


def test_refused_actions_say_why() -> None:
    fleet = fleet_of(1)
    r = rollout("100%")
    with pytest.raises(InvalidAction, match="the rollout has not started"):
        r.rollback(0)
    with pytest.raises(InvalidAction, match="cannot resume the rollout: it is scheduled"):
        r.resume(0)
    r.tick(0, fleet)
    r.pause(1)
    with pytest.raises(InvalidAction, match="cannot pause the rollout: it is paused"):
        r.pause(1)
    r.resume(2)
    r.tick(2, fleet)
    r.on_report("d000", "succeeded", 3)
    assert r.state is RolloutState.COMPLETED
    finished = r"it is completed \(finished\); only a scheduled or running rollout can be paused$"
    with pytest.raises(InvalidAction, match=f"cannot pause the rollout: {finished}"):
        r.pause(4)
    with pytest.raises(InvalidAction, match="cannot abort the rollout: it is completed"):
        r.abort(4)
    assert r.rollback(4) == [rolled_back("rolled back by the operator"), SendRollback("d000")]
    with pytest.raises(InvalidAction, match="already rolled back"):
        r.rollback(5)


def test_abort_of_a_scheduled_rollout() -> None:
    r = rollout()
    assert r.abort(3, reason="wrong version") == [aborted("wrong version")]
    assert r.state is RolloutState.ABORTED and r.finished_at == 3 and r.settled


# Summary, clock and persistence.


def test_summary_counts_reasons_and_eta() -> None:
    fleet = fleet_of(10)
    r = rollout("2,100%", success_percent=50, max_failures_percent=100, soak_s=60)
    canary = notified(r.tick(0, fleet))
    r.on_report(canary[0], "succeeded", 10)
    r.on_report(canary[1], "failed", 10, reason="no space")
    summary = r.summary(10)
    assert summary.state == "running" and summary.waves_planned == 2
    assert summary.waves[0].counts["succeeded"] == 1
    assert summary.waves[0].failure_reasons == {"no space": 1}
    assert summary.failure_reasons == {"no space": 1}
    assert sum(summary.counts.values()) == 2
    # 2 finished in 10 s; 8 devices still to draw; one soak to go.
    assert summary.eta_s == pytest.approx(8 / 0.2 + 60)
    r.pause(11)
    assert r.summary(11).eta_s is None


def test_an_empty_wave_passes_at_once_without_a_soak() -> None:
    fleet = fleet_of(3)
    r = rollout("5,50%,100%", soak_s=1000)
    succeed(r, notified(r.tick(0, fleet)), 1)
    out = r.tick(1001, fleet)
    completed = RolloutChanged(RolloutState.COMPLETED)
    assert out == [WaveStarted(2, ()), WavePassed(2), WaveStarted(3, ()), WavePassed(3), completed]


def test_a_clock_that_goes_back_stands_still() -> None:
    fleet = fleet_of(1)
    r = rollout("100%", device_timeout_s=60)
    r.tick(100, fleet)
    r.tick(50, fleet)
    assert r.clock == 100
    assert r.targets["d000"].deadline == 160


def test_the_state_round_trips_through_json_mid_rollout() -> None:
    fleet = fleet_of(12, ("a", "b"))
    fleet.unavailable_devices["d005"] = SkipReason.OFFLINE
    r = rollout(DEFAULT_WAVES, rate=Rate(3, 60), retries=1, success_percent=50)
    r.tick(0, fleet)
    for now in (1, 2, 61, 62, 121):
        for device in in_state(r, DeviceState.NOTIFIED)[:2]:
            r.on_report(device, "failed" if device.endswith("1") else "succeeded", now, reason="x")
        r.tick(now, fleet)
    data = r.to_dict()
    copy = Rollout.from_dict(json.loads(json.dumps(data)))
    assert copy.to_dict() == data
    assert [w.counts for w in copy.waves] == [w.counts for w in r.waves]
    for now in (200, 400, 800):
        assert copy.tick(now, fleet) == r.tick(now, fleet)
    assert copy.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"format": 2},
        {"format": 1},
        "nonsense",
    ],
)
def test_a_broken_state_is_refused(data: object) -> None:
    with pytest.raises(RolloutError, match="rollout state"):
        Rollout.from_dict(data)  # type: ignore[arg-type]


def test_a_state_with_a_device_in_two_waves_is_refused() -> None:
    fleet = fleet_of(4)
    r = rollout("1,100%")
    succeed(r, notified(r.tick(0, fleet)), 1)
    r.tick(1, fleet)
    data = r.to_dict()
    data["waves"][1]["devices"].append(data["waves"][0]["devices"][0])
    with pytest.raises(RolloutError, match="a device is in two waves"):
        Rollout.from_dict(data)
    data["waves"][1]["devices"].pop()
    data["waves"][1]["number"] = 3
    with pytest.raises(RolloutError, match="its waves are not numbered 1 to n"):
        Rollout.from_dict(data)


def test_every_device_ends_terminal_when_devices_go_silent() -> None:
    fleet = fleet_of(30, ("a", "b", "c"))
    r = rollout(DEFAULT_WAVES, success_percent=1, max_failures_percent=100, retries=1)
    now = 0.0
    r.tick(now, fleet)
    while r.state is RolloutState.RUNNING:
        r.tick(now, fleet)
        succeed(r, in_state(r, DeviceState.NOTIFIED)[:1], now)
        now += 61
    assert r.state is RolloutState.COMPLETED
    assert all(t.state in TERMINAL for t in r.targets.values())
