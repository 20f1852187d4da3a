"""Property tests of the rollout machine's invariants (hypothesis).

Random fleets with labels, random wave specs and options, and random interleavings of device
reports (current, stale and out of order), clock ticks, operator actions, enrolments, relabels and
devices going offline. After every step:
- no device is in two waves, and every wave's counts add up to its size;
- a terminal device state never changes; attempts never exceed 1 + retries;
- a wave starts only after the one before passed its success threshold and soaked (or was waived
  by a resume); a running rollout never has an unwaived wave past its failure threshold (after
  min-executed) or finished below its success threshold;
- a wave is drawn from the selection of that moment, has the planned size, and holds as many
  label groups as it has room for;
- notifications (deploys and rollbacks) never exceed the rate in any window;
- the state round-trips through JSON, and the restored copy makes the same decisions.
At the end, with devices silent and the clock passing every timeout, every device is terminal.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleet.rollout_plan import (
    OnFailure,
    Options,
    PlanError,
    Rate,
    WaveSpec,
    draw,
    group_of,
    plan_waves,
)
from fleet.rollouts import (
    EXECUTED,
    FAILURES,
    FINISHED,
    IN_FLIGHT,
    REPORTABLE,
    ROLLBACK_TERMINAL,
    TERMINAL,
    DeviceState,
    FleetSnapshot,
    InvalidAction,
    Notify,
    RollbackState,
    Rollout,
    RolloutChanged,
    RolloutState,
    SendRollback,
    Skip,
    SkipReason,
    WaveStarted,
)

# No example database: nothing is written into the work tree. A failure prints its example.
SETTINGS = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

HARDWARE = ("esp32", "nrf52", "rp2040")
labels = st.fixed_dictionaries(
    {"hw": st.sampled_from(HARDWARE)}, optional={"site": st.sampled_from(("x", "y"))}
)
fleets = st.lists(labels, min_size=1, max_size=24).map(
    lambda items: {f"dev{i:02}": dict(item) for i, item in enumerate(items)}
)


@st.composite
def specs(draw_: st.DrawFn) -> str:
    canary = draw_(st.integers(0, 4))
    percents = draw_(st.sets(st.sampled_from((1, 5, 10, 25, 50, 75, 90)), min_size=1, max_size=3))
    percents = draw_(st.sampled_from((set(), percents, percents)))
    items = ([str(canary)] if canary else []) + [f"{p}%" for p in sorted(percents)] + ["100%"]
    return ",".join(items)


options = st.builds(
    Options,
    soak_s=st.sampled_from((0.0, 0.0, 30.0, 120.0)),
    success_percent=st.sampled_from((50.0, 80.0, 95.0, 100.0)),
    max_failures_percent=st.sampled_from((0.0, 5.0, 20.0, 50.0, 100.0)),
    min_executed=st.integers(0, 5),
    rate=st.builds(Rate, st.integers(1, 6), st.sampled_from((1.0, 30.0, 60.0))),
    device_timeout_s=st.sampled_from((20.0, 60.0, 200.0)),
    retries=st.integers(0, 2),
    on_failure=st.sampled_from(OnFailure),
    start_at=st.one_of(st.none(), st.none(), st.sampled_from((0.0, 50.0, 300.0))),
)

# Mostly results for devices in flight, some progress, stale and misdirected reports.
REPORTS = [DeviceState.SUCCEEDED] * 4 + [DeviceState.FAILED] * 2
REPORTS += sorted(REPORTABLE - {DeviceState.SUCCEEDED})
ticks = st.tuples(st.just("tick"), st.sampled_from((0.0, 1.0, 10.0, 30.0, 61.0, 150.0, 300.0)))
reports = st.tuples(
    st.just("report"),
    st.integers(0, 40),
    st.sampled_from(REPORTS),
    st.sampled_from(("in-flight", "in-flight", "in-flight", "stale", "any")),
)
others = st.one_of(
    st.tuples(st.just("rollback-report"), st.integers(0, 40), st.booleans()),
    st.tuples(st.sampled_from(("pause", "resume", "pause", "resume", "abort", "rollback"))),
    st.tuples(st.just("enroll"), labels),
    st.tuples(st.just("relabel"), st.integers(0, 40), labels),
    st.tuples(st.just("unselect"), st.integers(0, 40)),
    st.tuples(
        st.just("availability"),
        st.integers(0, 40),
        st.none() | st.sampled_from((SkipReason.OFFLINE, SkipReason.QUARANTINED)),
    ),
)
steps = st.lists(
    st.one_of(reports, reports, reports, ticks, ticks, others), min_size=5, max_size=80
)


def allowed(r: Rollout, action: str) -> bool:
    if action == "pause":
        return r.state in (RolloutState.RUNNING, RolloutState.SCHEDULED)
    if action == "resume":
        return r.state is RolloutState.PAUSED
    if action == "abort":
        return r.state not in FINISHED
    return r.state is not RolloutState.ROLLED_BACK and r.started_at is not None


@dataclass
class Run:
    """One rollout under test, its fleet, and what the invariants need to remember."""

    rollout: Rollout
    fleet: FleetSnapshot
    now: float = 0.0
    sends: list[float] | None = None

    def __post_init__(self) -> None:
        self.sends = []

    def apply(self, r: Rollout, step: tuple[Any, ...]) -> list[Any]:
        kind = step[0]
        if kind == "tick":
            return list(r.tick(self.now, self.fleet))
        if kind == "report":
            _, index, state, which = step
            in_flight = sorted(t.id for t in r.targets.values() if t.state in IN_FLIGHT)
            if which == "in-flight" and in_flight:
                device = in_flight[index % len(in_flight)]
            else:
                device = self.pick(index)
            attempts = r.targets[device].attempts if device in r.targets else 0
            attempt = None if which == "any" else attempts - (which == "stale")
            reason = f"reason {index % 3}"
            return list(r.on_report(device, state, self.now, reason=reason, attempt=attempt))
        if kind == "rollback-report":
            sent = sorted(t.id for t in r.targets.values() if t.rollback is RollbackState.SENT)
            device = sent[step[1] % len(sent)] if sent else self.pick(step[1])
            return list(r.on_rollback_report(device, step[2], self.now))
        action = getattr(r, kind)
        return list(action(self.now))

    def pick(self, index: int) -> str:
        known = sorted({*self.fleet.devices, *self.rollout.targets}) or ["nobody"]
        return known[index % len(known)]

    def change_fleet(self, step: tuple[Any, ...]) -> bool:
        kind = step[0]
        if kind == "enroll":
            self.fleet.devices[f"new{len(self.fleet.devices) + len(self.rollout.targets):03}"] = (
                dict(step[1])
            )
        elif kind == "relabel":
            self.fleet.devices[self.pick(step[1])] = dict(step[2])
        elif kind == "unselect":
            self.fleet.devices.pop(self.pick(step[1]), None)
        elif kind == "availability":
            device = self.pick(step[1])
            if step[2] is None:
                self.fleet.unavailable_devices.pop(device, None)
            else:
                self.fleet.unavailable_devices[device] = step[2]
        else:
            return False
        return True


def check_step(run: Run, before: dict[str, Any], decisions: list[Any]) -> None:
    r, options = run.rollout, run.rollout.options
    targets_before = {t["id"]: t for w in before["waves"] for t in w["devices"]}

    # No device in two waves; counts add up.
    drawn = [d for wave in r.waves for d in wave.devices]
    assert len(drawn) == len(set(drawn)) == len(r.targets)
    for wave in r.waves:
        recount = Counter(r.targets[d].state for d in wave.devices)
        assert +wave.counts == recount
        assert sum(wave.counts.values()) == len(wave.devices)
        assert all(r.targets[d].wave == wave.number for d in wave.devices)

    # A terminal state never changes; attempts are bounded; deadlines match states.
    for device, old in targets_before.items():
        if DeviceState(old["state"]) in TERMINAL:
            assert r.targets[device].state.value == old["state"]
            assert r.targets[device].reason == old["reason"]
        if old["rollback"] in {s.value for s in ROLLBACK_TERMINAL}:
            assert r.targets[device].rollback == old["rollback"]
    for target in r.targets.values():
        assert target.attempts <= options.retries + 1
        assert (target.deadline is not None) == (target.state in IN_FLIGHT)
        if target.state is DeviceState.SKIPPED:
            assert target.attempts == 0
        if target.rollback is not None:
            assert target.attempts >= 1 and r.state is RolloutState.ROLLED_BACK

    # Decisions follow the rollout's state as it changes within the step, and the state they
    # leave agrees with them.
    state = RolloutState(before["state"])
    for decision in decisions:
        if isinstance(decision, RolloutChanged):
            state = decision.state
        if isinstance(decision, Notify | WaveStarted):
            assert state is RolloutState.RUNNING
        if isinstance(decision, SendRollback):
            assert state is RolloutState.ROLLED_BACK
        if isinstance(decision, Skip) and decision.reason is not SkipReason.CANCELLED:
            assert state is RolloutState.RUNNING
        if isinstance(decision, Notify):
            target = r.targets[decision.device]
            old_attempts = targets_before.get(decision.device, {"attempts": 0})["attempts"]
            assert target.attempts == decision.attempt == old_attempts + 1
            assert decision.device not in run.fleet.unavailable_devices
        if isinstance(decision, Skip):
            assert r.targets[decision.device].state is DeviceState.SKIPPED
            unavailable = run.fleet.unavailable(decision.device)
            known = unavailable.reason if unavailable is not None else None
            assert decision.reason in (known, SkipReason.CANCELLED)

    # The rate limit holds in every window.
    assert run.sends is not None
    run.sends += [run.now for d in decisions if isinstance(d, Notify | SendRollback)]
    window = [t for t in run.sends if t > run.now - options.rate.per_s]
    assert len(window) <= options.rate.count

    # Waves: drawn from the selection of the moment, planned size, stratified, gated.
    already = set(targets_before)
    for decision in decisions:
        if not isinstance(decision, WaveStarted):
            continue
        wave = r.waves[decision.wave - 1]
        selection = run.fleet.devices
        assert set(decision.devices) <= set(selection)
        assert not set(decision.devices) & already
        candidates = {d: selection[d] for d in selection if d not in already}
        wave_target = r.spec.targets[decision.wave - 1]
        planned = wave_target.cumulative(len(selection)) - len(already & set(selection))
        assert len(decision.devices) == max(0, min(planned, len(candidates)))
        groups = {group_of(labels) for labels in candidates.values()}
        assert len({group_of(selection[d]) for d in decision.devices}) == min(
            len(decision.devices), len(groups)
        )
        already |= set(decision.devices)
        if decision.wave > 1:
            previous = r.waves[decision.wave - 2]
            assert previous.waived or previous.passed_at is not None
            if not previous.waived and previous.counts[DeviceState.SUCCEEDED]:
                assert run.now >= previous.passed_at + options.soak_s  # type: ignore[operator]
        assert wave.started_at == run.now

    # Thresholds: a trip applies on-failure; a passed wave really passed; a running rollout has
    # no unwaived trip.
    tripped_before = {w["number"] for w in before["waves"] if w["tripped_at"] is not None}
    ends = {
        OnFailure.PAUSE: (RolloutState.PAUSED,),
        OnFailure.ABORT: (RolloutState.ABORTED,),
        OnFailure.ROLLBACK: (RolloutState.ROLLED_BACK,),
    }
    for wave in r.waves:
        if wave.tripped_at is not None and wave.number not in tripped_before:
            assert r.state in ends[options.on_failure]
        if r.state is RolloutState.RUNNING:
            assert wave.tripped_at is None or wave.waived
        counts = wave.counts
        eligible = len(wave.devices) - counts[DeviceState.SKIPPED]
        succeeded = counts[DeviceState.SUCCEEDED]
        if wave.passed_at is not None:
            assert succeeded * 100 >= options.success_percent * eligible
        if r.state is RolloutState.RUNNING and not wave.waived:
            failures = sum(counts[s] for s in FAILURES)
            finished = sum(counts[s] for s in EXECUTED)
            if finished >= max(1, options.min_executed):
                assert failures * 100 <= options.max_failures_percent * finished
            unfinished = counts[DeviceState.PENDING] + sum(counts[s] for s in IN_FLIGHT)
            assert unfinished or wave.passed_at is not None

    assert sum(r.summary(run.now).counts.values()) == len(r.targets)
    if r.state is RolloutState.COMPLETED:
        assert all(t.state in TERMINAL for t in r.targets.values())
        assert len(r.waves) == len(r.spec)
    if r.state in FINISHED:
        assert not any(t.state is DeviceState.PENDING for t in r.targets.values())


def check_next_wake(run: Run) -> None:
    """Nothing happens on a tick before `next_wake()` (never, when it is None)."""
    wake = run.rollout.next_wake()
    quiet_until = run.now + 1e6 if wake is None else wake - 0.001
    if quiet_until > run.now:
        assert restored(run.rollout).tick(quiet_until, run.fleet) == []


def restored(r: Rollout) -> Rollout:
    data = json.loads(json.dumps(r.to_dict()))
    copy = Rollout.from_dict(data)
    assert copy.to_dict() == r.to_dict()
    return copy


@settings(SETTINGS, max_examples=800)
@given(fleet=fleets, spec=specs(), options=options, seed=st.text(max_size=8), steps=steps)
def test_invariants_hold_for_any_interleaving(
    fleet: dict[str, dict[str, str]], spec: str, options: Options, seed: str, steps: list[Any]
) -> None:
    run = Run(Rollout(WaveSpec.parse(spec), options, seed, created_at=0.0), FleetSnapshot(fleet))
    for step in [("tick", 0.0), *steps]:
        if step[0] == "tick":
            run.now += step[1]
        if run.change_fleet(step):
            continue
        r = run.rollout
        twin = restored(r)
        before = r.to_dict()
        if step[0] in ("pause", "resume", "abort", "rollback"):
            ok = allowed(r, step[0])
            try:
                decisions = run.apply(r, step)
            except InvalidAction:
                assert not ok
                assert r.to_dict() == before  # a refused action changes nothing
                continue
            assert ok
        else:
            decisions = run.apply(r, step)
        assert run.apply(twin, step) == decisions
        assert twin.to_dict() == r.to_dict()
        check_step(run, before, decisions)
        check_next_wake(run)

    r = run.rollout
    event(f"after the steps: {r.state.value}, {len(r.waves)} waves")
    event(f"tripped {any(w.tripped_at for w in r.waves)}, waived {any(w.waived for w in r.waves)}")
    event(f"retried {any(t.attempts > 1 for t in r.targets.values())}")
    event(f"rolled back {any(t.rollback in ROLLBACK_TERMINAL for t in r.targets.values())}")
    # The end: devices silent, operators resume what pauses, the clock passes every timeout.
    r = run.rollout
    for _ in range(2000):
        if r.settled:
            break
        if r.state is RolloutState.PAUSED:
            r.resume(run.now)
        run.now += max(options.device_timeout_s, options.rate.per_s, options.soak_s) + 1
        before = r.to_dict()
        check_step(run, before, r.tick(run.now, run.fleet))
    event(f"at the end: {r.state.value}, {len(r.waves)} waves")
    assert r.settled
    assert all(t.state in TERMINAL for t in r.targets.values())
    assert r.next_wake() is None
    summary = r.summary(run.now)
    assert sum(summary.counts.values()) == len(r.targets)
    assert summary.failure_reasons.keys() == {
        t.reason or t.state.value for t in r.targets.values() if t.state in FAILURES
    }


@SETTINGS
@given(selection=fleets, spec=specs(), seed=st.text(max_size=8))
def test_a_plan_draws_every_selected_device_once_in_stratified_waves(
    selection: dict[str, dict[str, str]], spec: str, seed: str
) -> None:
    parsed = WaveSpec.parse(spec)
    assert str(parsed) == spec
    if not selection:
        return
    waves = plan_waves(parsed, selection, seed)
    assert len(waves) == len(parsed)
    drawn = [d for wave in waves for d in wave]
    assert sorted(drawn) == sorted(selection)
    reversed_selection = dict(reversed(list(selection.items())))
    assert plan_waves(parsed, reversed_selection, seed) == waves  # order of the input is irrelevant


@SETTINGS
@given(selection=fleets, count=st.integers(0, 30), seed=st.text(max_size=8))
def test_a_draw_holds_as_many_groups_as_it_has_room_for(
    selection: dict[str, dict[str, str]], count: int, seed: str
) -> None:
    wave = draw(selection, count, seed)
    groups = Counter(group_of(labels) for labels in selection.values())
    assert len(wave) == len(set(wave)) == min(count, len(selection))
    drawn_groups = Counter(group_of(selection[d]) for d in wave)
    assert len(drawn_groups) == min(len(wave), len(groups))
    if len(wave) >= len(groups):
        # One of each group, the rest by largest remainder: floor or ceiling of the fair share.
        extra, spare = len(wave) - len(groups), len(selection) - len(groups)
        for group, n in drawn_groups.items():
            share = Fraction(extra * (groups[group] - 1), spare) if spare else Fraction(0)
            assert math.floor(share) <= n - 1 <= math.ceil(share)
    else:
        # One device from each of the largest groups.
        assert all(n == 1 for n in drawn_groups.values())
        smallest_drawn = min((groups[g] for g in drawn_groups), default=len(selection))
        assert all(groups[g] <= smallest_drawn for g in groups if g not in drawn_groups)


@SETTINGS
@given(text=st.text(alphabet="0123456789%,. x-", max_size=16))
def test_a_spec_either_parses_to_itself_or_is_refused_with_a_message(text: str) -> None:
    try:
        spec = WaveSpec.parse(text)
    except PlanError as exc:
        assert str(exc)
        return
    assert WaveSpec.parse(str(spec)) == spec
    assert spec.targets[-1].percent == 100
