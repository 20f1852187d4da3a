"""The rollout state machine: events and the clock in, decisions out, no I/O.

A `Rollout` is the whole state of one rollout. The scheduler feeds it events (`tick`, `on_report`,
`on_rollback_report` and the operator's `pause`, `resume`, `abort`, `rollback`), carries out the
`Decision`s each returns (notify a device, send it a rollback, record a skip...) and persists
`to_dict()`. What it needs from outside is an argument: `now` (POSIX seconds; a clock that goes
back counts as standing still) and a `FleetView` giving the current selection and whether a device
can be notified. The plan (wave spec, options, drawing) is `fleet.rollout_plan`.

Rules:
1. Life cycle: scheduled -> running (at `start_at`, or at the first tick) -> completed. Running
   and scheduled can be paused; resume returns to where it was. Scheduled, running or paused can
   be aborted; a started rollout that is not rolled back can be rolled back. Any other operator
   action raises `InvalidAction` saying why. An empty selection at the start aborts the rollout.
2. Waves are drawn when they start, from the selection of that moment (`rollout_plan`); a device
   belongs to one wave of a rollout, ever.
3. A device goes pending -> notified -> downloading -> verifying -> installing -> health-check ->
   succeeded | failed | rolled-back (its own probation) | timed-out, or pending -> skipped. States
   only move forward; reports about another attempt, an unknown or a finished device are ignored;
   a terminal state never changes.
4. Notifications go out only while running, in order of wave, attempt and draw, at most
   `rate.count` in any `rate.per_s` window. A device the fleet says is offline, quarantined or
   ineligible when its turn comes (the rate allows a notification) is skipped instead, without
   using the rate; a retry ends with its last failure instead.
5. Time is the controller's: a notified device without a result `device_timeout_s` after its
   notification has timed out. A failure or a timeout is retried up to `retries` more times while
   the rollout is running or paused, never after it ended.
6. Gates, per wave, while the rollout runs or is paused. success = succeeded / (devices -
   skipped); failures = (failed + rolled-back + timed-out) / finished. A wave passes once success
   reaches `success_percent` (it cannot fall back: succeeded only grows and skipped only grows).
   A wave trips once failures exceed `max_failures_percent` with at least `min_executed`
   finished, or when all its devices finished without passing; a trip applies `on_failure`
   (pause, abort or rollback) once. Resuming waives every tripped wave.
7. The next wave starts when the last one passed and soaked `soak_s` since (no soak when none of
   its devices succeeded), or was waived. The rollout completes once every wave has started, the
   last passed or was waived, and every device is terminal.
8. Abort and rollback cancel pending devices (skipped, `cancelled`) and follow in-flight ones to
   their end. Rollback sends the previous version to every device the rollout notified once its
   deployment ended, under the same rate limit and timeout, and follows each to done, failed or
   timed-out.
9. The same state and events give the same decisions; `from_dict(to_dict())` is the same rollout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from fleet.rollout_plan import OnFailure, Options, Selection, WaveSpec, draw_wave, group_of

FORMAT = 1


class DeviceState(StrEnum):
    PENDING = "pending"
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECK = "health-check"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    TIMED_OUT = "timed-out"
    SKIPPED = "skipped"


IN_FLIGHT = (
    DeviceState.NOTIFIED,
    DeviceState.DOWNLOADING,
    DeviceState.VERIFYING,
    DeviceState.INSTALLING,
    DeviceState.HEALTH_CHECK,
)
FAILURES = frozenset({DeviceState.FAILED, DeviceState.ROLLED_BACK, DeviceState.TIMED_OUT})
TERMINAL = frozenset({DeviceState.SUCCEEDED, DeviceState.SKIPPED, *FAILURES})
REPORTABLE = frozenset(
    {*IN_FLIGHT, DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.ROLLED_BACK}
)
EXECUTED = TERMINAL - {DeviceState.SKIPPED}


class SkipReason(StrEnum):
    OFFLINE = "offline"
    QUARANTINED = "quarantined"
    INELIGIBLE = "ineligible"
    CANCELLED = "cancelled"


class RolloutState(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"


FINISHED = frozenset({RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK})


class RollbackState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed-out"


ROLLBACK_TERMINAL = frozenset({RollbackState.DONE, RollbackState.FAILED, RollbackState.TIMED_OUT})


class RolloutError(Exception):
    """A rollout state that cannot be loaded, or an action it refuses; the text says why."""


class InvalidAction(RolloutError):
    """An operator action the rollout's state does not allow (pausing a finished rollout...)."""


@dataclass(frozen=True)
class Unavailable:
    """Why a device cannot be notified now, with what the fleet knows about it."""

    reason: SkipReason
    detail: str | None = None

    @property
    def text(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


class FleetView(Protocol):
    """What the machine asks the fleet, when it needs it."""

    def selection(self) -> Selection:
        """The devices the rollout's selector matches now, with their labels."""
        ...

    def unavailable(self, device_id: str) -> Unavailable | None:
        """Why the device cannot be notified now (offline, quarantined, ineligible), or None."""
        ...


@dataclass
class FleetSnapshot:
    """A `FleetView` over plain dicts (tests, and a scheduler that loads the fleet first)."""

    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    unavailable_devices: dict[str, SkipReason | Unavailable] = field(default_factory=dict)

    def selection(self) -> Selection:
        return self.devices

    def unavailable(self, device_id: str) -> Unavailable | None:
        why = self.unavailable_devices.get(device_id)
        return Unavailable(why) if isinstance(why, SkipReason) else why


@dataclass(frozen=True)
class Notify:
    """Send the deploy command to `device` (attempt 1, 2, ...)."""

    device: str
    attempt: int


@dataclass(frozen=True)
class Skip:
    device: str
    reason: SkipReason


@dataclass(frozen=True)
class DeviceTimedOut:
    """`device` gave no result in time; `retry` says whether it is queued to be notified again."""

    device: str
    attempt: int
    retry: bool


@dataclass(frozen=True)
class SendRollback:
    """Deploy the version the device ran before this rollout to `device`."""

    device: str


@dataclass(frozen=True)
class RollbackTimedOut:
    device: str


@dataclass(frozen=True)
class WaveStarted:
    wave: int
    devices: tuple[str, ...]


@dataclass(frozen=True)
class WavePassed:
    wave: int


@dataclass(frozen=True)
class RolloutChanged:
    """The rollout entered `state` (started, paused, resumed, completed...), for `reason`."""

    state: RolloutState
    reason: str | None = None


Decision = (
    Notify | Skip | DeviceTimedOut | SendRollback | RollbackTimedOut | WaveStarted | WavePassed
) | RolloutChanged


@dataclass
class Target:
    """One device of a rollout: its deployment, and its rollback if the rollout is rolled back."""

    id: str
    wave: int
    group: str
    state: DeviceState = DeviceState.PENDING
    reason: str | None = None
    attempts: int = 0
    deadline: float | None = None
    last_failure: DeviceState | None = None
    rollback: RollbackState | None = None
    rollback_deadline: float | None = None
    rollback_reason: str | None = None


@dataclass
class Wave:
    number: int
    devices: list[str]
    selected: int
    started_at: float
    passed_at: float | None = None
    tripped_at: float | None = None
    waived: bool = False
    counts: Counter[DeviceState] = field(default_factory=Counter, compare=False, repr=False)


@dataclass(frozen=True)
class WaveSummary:
    number: int
    target: str
    size: int
    selected: int
    counts: dict[str, int]
    failure_reasons: dict[str, int]
    started_at: float
    passed_at: float | None
    tripped_at: float | None
    waived: bool


@dataclass(frozen=True)
class Summary:
    """What `rollout status` shows: counts by state per wave, failure reasons grouped, ETA."""

    state: str
    reason: str | None
    waves_planned: int
    waves: list[WaveSummary]
    counts: dict[str, int]
    failure_reasons: dict[str, int]
    rollback: dict[str, int]
    started_at: float | None
    finished_at: float | None
    eta_s: float | None


class Rollout:
    def __init__(self, spec: WaveSpec, options: Options, seed: str, created_at: float) -> None:
        self.spec = spec
        self.options = options
        self.seed = seed
        self.created_at = created_at
        self.clock = created_at
        self.state = RolloutState.SCHEDULED
        self.reason: str | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.waves: list[Wave] = []
        self.targets: dict[str, Target] = {}
        self.sends: list[float] = []  # notification times inside the current rate window

    # Events.

    def start(self, now: float, fleet: FleetView) -> list[Decision]:
        """Start now, whatever `start_at` says (`tick` calls this once `start_at` has come)."""
        now = self._now(now)
        if self.state is not RolloutState.SCHEDULED:
            raise InvalidAction(f"the rollout is {self.state}: only a scheduled one can start")
        self.state, self.started_at = RolloutState.RUNNING, now
        out: list[Decision] = [RolloutChanged(RolloutState.RUNNING)]
        self._settle(now, fleet, out)
        return out

    def tick(self, now: float, fleet: FleetView) -> list[Decision]:
        """The clock moved: start, time out, notify, advance waves, complete, as due."""
        now = self._now(now)
        if self.state is RolloutState.SCHEDULED:
            start_at = self.options.start_at
            return self.start(now, fleet) if start_at is None or now >= start_at else []
        out: list[Decision] = []
        for target in self.targets.values():
            if target.state in IN_FLIGHT and target.deadline is not None and now >= target.deadline:
                timeout = f"no result {self.options.device_timeout_s:g}s after notification"
                retry = self._fail(target, DeviceState.TIMED_OUT, timeout)
                out.append(DeviceTimedOut(target.id, target.attempts, retry))
            deadline = target.rollback_deadline
            if target.rollback is RollbackState.SENT and deadline is not None and now >= deadline:
                target.rollback, target.rollback_deadline = RollbackState.TIMED_OUT, None
                out.append(RollbackTimedOut(target.id))
        self._settle(now, fleet, out)
        return out

    def on_report(
        self,
        device_id: str,
        state: DeviceState | str,
        now: float,
        *,
        reason: str | None = None,
        attempt: int | None = None,
    ) -> list[Decision]:
        """A device reported progress or a result of its deployment (attempt, when known)."""
        now = self._now(now)
        state = DeviceState(state)
        if state not in REPORTABLE:
            raise ValueError(f"a device cannot report {state.value!r}")
        target = self.targets.get(device_id)
        if target is None or target.state not in IN_FLIGHT:
            return []
        if attempt is not None and attempt != target.attempts:
            return []
        if state in IN_FLIGHT:
            if IN_FLIGHT.index(state) > IN_FLIGHT.index(target.state):
                self._set(target, state)
            return []
        if state is DeviceState.FAILED:
            self._fail(target, state, reason or "failed")
        else:
            target.deadline = None
            default = "rolled back by the device" if state is DeviceState.ROLLED_BACK else None
            self._set(target, state, reason or default)
        out: list[Decision] = []
        self._settle(now, None, out)
        return out

    def on_rollback_report(
        self, device_id: str, ok: bool, now: float, *, reason: str | None = None
    ) -> list[Decision]:
        """A device reported the result of the rollback it was sent."""
        now = self._now(now)
        target = self.targets.get(device_id)
        if target is None or target.rollback is not RollbackState.SENT:
            return []
        target.rollback = RollbackState.DONE if ok else RollbackState.FAILED
        target.rollback_reason, target.rollback_deadline = reason, None
        out: list[Decision] = []
        self._settle(now, None, out)
        return out

    # Operator actions.

    def pause(self, now: float, reason: str = "paused by the operator") -> list[Decision]:
        self._now(now)
        if self.state not in (RolloutState.RUNNING, RolloutState.SCHEDULED):
            raise InvalidAction(
                self._refusal("pause", "only a scheduled or running rollout can be paused")
            )
        self.state, self.reason = RolloutState.PAUSED, reason
        return [RolloutChanged(self.state, reason)]

    def resume(self, now: float) -> list[Decision]:
        """Continue a paused rollout, past every wave that tripped; the next tick notifies."""
        self._now(now)
        if self.state is not RolloutState.PAUSED:
            raise InvalidAction(self._refusal("resume", "only a paused rollout can be resumed"))
        for wave in self.waves:
            wave.waived = wave.waived or wave.tripped_at is not None
        started = self.started_at is not None
        self.state = RolloutState.RUNNING if started else RolloutState.SCHEDULED
        self.reason = None
        return [RolloutChanged(self.state)]

    def abort(self, now: float, reason: str = "aborted by the operator") -> list[Decision]:
        now = self._now(now)
        if self.state in FINISHED:
            raise InvalidAction(self._refusal("abort", "only an unfinished rollout can be aborted"))
        out: list[Decision] = []
        self._end(RolloutState.ABORTED, reason, now, out)
        return out

    def rollback(self, now: float, reason: str = "rolled back by the operator") -> list[Decision]:
        """Deploy the previous version to every device this rollout notified."""
        now = self._now(now)
        if self.state is RolloutState.ROLLED_BACK:
            raise InvalidAction("the rollout is already rolled back")
        if self.started_at is None:
            raise InvalidAction(
                "the rollout has not started, so there is nothing to roll back (abort it instead)"
            )
        out: list[Decision] = []
        self._end(RolloutState.ROLLED_BACK, reason, now, out)
        self._send_rollbacks(now, out)
        return out

    # Queries.

    @property
    def settled(self) -> bool:
        """Finished, with every device and every rollback at its end."""
        return self.state in FINISHED and all(
            t.state in TERMINAL and (t.rollback is None or t.rollback in ROLLBACK_TERMINAL)
            for t in self.targets.values()
        )

    def next_wake(self) -> float | None:
        """The earliest time a `tick` can change something, if nothing else happens first."""
        if self.state is RolloutState.SCHEDULED:
            return self.options.start_at if self.options.start_at is not None else self.clock
        times = [t.deadline for t in self.targets.values() if t.deadline is not None]
        times += [
            t.rollback_deadline for t in self.targets.values() if t.rollback_deadline is not None
        ]
        rolling_back = self.state is RolloutState.ROLLED_BACK
        if (self.state is RolloutState.RUNNING and self._active(DeviceState.PENDING)) or (
            rolling_back and any(self._rollback_due(t) for t in self.targets.values())
        ):
            rate = self.options.rate
            recent = [t for t in self.sends if t > self.clock - rate.per_s]
            times.append(self.clock if len(recent) < rate.count else recent[0] + rate.per_s)
        if self._complete():
            times.append(self.clock)
        if self.state is RolloutState.RUNNING and self.waves and len(self.waves) < len(self.spec):
            last = self.waves[-1]
            if self._gate_open(last, self.clock):
                times.append(self.clock)
            elif last.passed_at is not None:
                times.append(last.passed_at + self.options.soak_s)
        return min(times, default=None)

    def summary(self, now: float) -> Summary:
        now = max(now, self.clock)
        waves = [
            WaveSummary(
                number=wave.number,
                target=str(self.spec.targets[wave.number - 1]),
                size=len(wave.devices),
                selected=wave.selected,
                counts={state.value: wave.counts[state] for state in DeviceState},
                failure_reasons=self._failure_reasons(wave),
                started_at=wave.started_at,
                passed_at=wave.passed_at,
                tripped_at=wave.tripped_at,
                waived=wave.waived,
            )
            for wave in self.waves
        ]
        totals: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for wave_summary in waves:
            totals.update(wave_summary.counts)
            reasons.update(wave_summary.failure_reasons)
        rollback = Counter(t.rollback.value for t in self.targets.values() if t.rollback)
        return Summary(
            state=self.state.value,
            reason=self.reason,
            waves_planned=len(self.spec),
            waves=waves,
            counts={state.value: totals[state.value] for state in DeviceState},
            failure_reasons=dict(reasons.most_common()),
            rollback=dict(sorted(rollback.items())),
            started_at=self.started_at,
            finished_at=self.finished_at,
            eta_s=self._eta(now),
        )

    # Persistence.

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "spec": str(self.spec),
            "options": self.options.to_dict(),
            "seed": self.seed,
            "created_at": self.created_at,
            "clock": self.clock,
            "state": self.state.value,
            "reason": self.reason,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "sends": list(self.sends),
            "waves": [
                {
                    "number": wave.number,
                    "selected": wave.selected,
                    "started_at": wave.started_at,
                    "passed_at": wave.passed_at,
                    "tripped_at": wave.tripped_at,
                    "waived": wave.waived,
                    "devices": [_target_dict(self.targets[d]) for d in wave.devices],
                }
                for wave in self.waves
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise RolloutError(f"not a rollout state of format {FORMAT}")
        try:
            rollout = cls(
                WaveSpec.parse(data["spec"]),
                Options.from_dict(data["options"]),
                str(data["seed"]),
                float(data["created_at"]),
            )
            rollout.clock = float(data["clock"])
            rollout.state = RolloutState(data["state"])
            rollout.reason = data["reason"]
            rollout.started_at = data["started_at"]
            rollout.finished_at = data["finished_at"]
            rollout.sends = [float(t) for t in data["sends"]]
            for wave_data in data["waves"]:
                number = int(wave_data["number"])
                targets = [_target_from(item, number) for item in wave_data["devices"]]
                wave = Wave(
                    number=number,
                    devices=[t.id for t in targets],
                    selected=int(wave_data["selected"]),
                    started_at=float(wave_data["started_at"]),
                    passed_at=wave_data["passed_at"],
                    tripped_at=wave_data["tripped_at"],
                    waived=bool(wave_data["waived"]),
                    counts=Counter(t.state for t in targets),
                )
                rollout.waves.append(wave)
                rollout.targets.update((t.id, t) for t in targets)
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"not a valid rollout state: {type(exc).__name__}: {exc}") from exc
        numbers = [wave.number for wave in rollout.waves]
        if numbers != list(range(1, len(numbers) + 1)) or len(numbers) > len(rollout.spec):
            raise RolloutError("not a valid rollout state: its waves are not numbered 1 to n")
        if sum(len(w.devices) for w in rollout.waves) != len(rollout.targets):
            raise RolloutError("not a valid rollout state: a device is in two waves")
        return rollout

    # The machine.

    def _now(self, now: float) -> float:
        self.clock = max(self.clock, now)
        return self.clock

    def _set(self, target: Target, state: DeviceState, reason: str | None = None) -> None:
        counts = self.waves[target.wave - 1].counts
        counts[target.state] -= 1
        counts[state] += 1
        target.state, target.reason = state, reason

    def _fail(self, target: Target, state: DeviceState, reason: str) -> bool:
        """End the attempt with `state`; True when the device is queued for another attempt."""
        target.deadline = None
        running = self.state in (RolloutState.RUNNING, RolloutState.PAUSED)
        if running and target.attempts <= self.options.retries:
            target.last_failure = state
            self._set(target, DeviceState.PENDING, reason)
            return True
        self._set(target, state, reason)
        return False

    def _give_up(self, target: Target, why: Unavailable, out: list[Decision]) -> None:
        """A pending device will not be notified: skipped, or its last failure if it had one."""
        if target.last_failure is not None:
            self._set(target, target.last_failure, target.reason)
        else:
            self._set(target, DeviceState.SKIPPED, why.text)
            out.append(Skip(target.id, why.reason))

    def _settle(self, now: float, fleet: FleetView | None, out: list[Decision]) -> None:
        while True:
            self._evaluate(now, out)
            if fleet is None or self.state is not RolloutState.RUNNING:
                break
            self._notify(now, fleet, out)
            self._evaluate(now, out)
            if not self._advance(now, fleet, out):
                break
        if self.state is RolloutState.ROLLED_BACK:
            self._send_rollbacks(now, out)
        if self._complete():
            self._end(RolloutState.COMPLETED, None, now, out)

    def _evaluate(self, now: float, out: list[Decision]) -> None:
        """Pass and trip the waves of a running or paused rollout."""
        if self.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
            return
        success = self.options.success_percent
        for wave in self.waves:
            eligible = len(wave.devices) - wave.counts[DeviceState.SKIPPED]
            if wave.passed_at is None and wave.counts[DeviceState.SUCCEEDED] * 100 >= (
                success * eligible
            ):
                wave.passed_at = now
                out.append(WavePassed(wave.number))
        for wave in self.waves:
            if self.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
                return
            if wave.tripped_at is not None or wave.waived:
                continue
            why = self._trip_reason(wave)
            if why is not None:
                wave.tripped_at = now
                self._on_failure(why, now, out)

    def _trip_reason(self, wave: Wave) -> str | None:
        counts, options = wave.counts, self.options
        failures = sum(counts[state] for state in FAILURES)
        succeeded = counts[DeviceState.SUCCEEDED]
        finished = failures + succeeded
        if finished >= max(1, options.min_executed) and (
            failures * 100 > options.max_failures_percent * finished
        ):
            return (
                f"wave {wave.number}: {failures} of {finished} finished devices failed "
                f"({_percent(failures, finished)}, more than {options.max_failures_percent:g}%)"
                f"{self._reasons_text(wave)}"
            )
        unfinished = counts[DeviceState.PENDING] + sum(counts[state] for state in IN_FLIGHT)
        if wave.passed_at is None and not unfinished:
            eligible = len(wave.devices) - counts[DeviceState.SKIPPED]
            return (
                f"wave {wave.number} ended with {succeeded} of {eligible} devices succeeded "
                f"({_percent(succeeded, eligible)}, below {options.success_percent:g}%)"
                f"{self._reasons_text(wave)}"
            )
        return None

    def _on_failure(self, reason: str, now: float, out: list[Decision]) -> None:
        policy = self.options.on_failure
        if policy is OnFailure.PAUSE:
            self.state, self.reason = RolloutState.PAUSED, reason
            out.append(RolloutChanged(self.state, reason))
        else:
            ending = RolloutState.ABORTED if policy is OnFailure.ABORT else RolloutState.ROLLED_BACK
            self._end(ending, reason, now, out)

    def _end(
        self, state: RolloutState, reason: str | None, now: float, out: list[Decision]
    ) -> None:
        """Finish: cancel what was never sent; a rollback covers every notified device."""
        for target in self.targets.values():
            if target.state is DeviceState.PENDING:
                self._give_up(target, Unavailable(SkipReason.CANCELLED), out)
            if state is RolloutState.ROLLED_BACK and target.attempts:
                target.rollback = RollbackState.PENDING
        self.state, self.reason, self.finished_at = state, reason, now
        out.append(RolloutChanged(state, reason))

    def _notify(self, now: float, fleet: FleetView, out: list[Decision]) -> None:
        queue = [
            (target.wave, target.attempts, position, target)
            for position, target in enumerate(self.targets.values())
            if target.state is DeviceState.PENDING
        ]
        queue.sort(key=lambda item: item[:3])
        for *_, target in queue:
            if not self._may_send(now):
                return
            unavailable = fleet.unavailable(target.id)
            if unavailable is not None:
                self._give_up(target, unavailable, out)
                continue
            self.sends.append(now)
            target.attempts += 1
            target.deadline = now + self.options.device_timeout_s
            target.last_failure = None
            self._set(target, DeviceState.NOTIFIED)
            out.append(Notify(target.id, target.attempts))

    def _advance(self, now: float, fleet: FleetView, out: list[Decision]) -> bool:
        """Start the next wave if it is due; True when one started."""
        if self.state is not RolloutState.RUNNING or len(self.waves) == len(self.spec):
            return False
        if self.waves and not self._gate_open(self.waves[-1], now):
            return False
        selection = fleet.selection()
        if not self.waves and not selection:
            self._end(RolloutState.ABORTED, "the selection was empty at the start", now, out)
            return False
        number = len(self.waves) + 1
        drawn = draw_wave(self.spec.targets[number - 1], selection, self.targets.keys(), self.seed)
        wave = Wave(number, drawn, len(selection), now)
        wave.counts[DeviceState.PENDING] = len(drawn)
        self.waves.append(wave)
        for device_id in drawn:
            self.targets[device_id] = Target(device_id, number, group_of(selection[device_id]))
        out.append(WaveStarted(number, tuple(drawn)))
        return True

    def _complete(self) -> bool:
        """Running, every wave started, the last passed or waived, and every device terminal."""
        return (
            self.state is RolloutState.RUNNING
            and len(self.waves) == len(self.spec)
            and (self.waves[-1].waived or self.waves[-1].passed_at is not None)
            and not self._active(DeviceState.PENDING, *IN_FLIGHT)
        )

    def _gate_open(self, wave: Wave, now: float) -> bool:
        if wave.waived:
            return True
        if wave.passed_at is None:
            return False
        soaked = now >= wave.passed_at + self.options.soak_s
        return soaked or wave.counts[DeviceState.SUCCEEDED] == 0

    def _may_send(self, now: float) -> bool:
        window_start = now - self.options.rate.per_s
        while self.sends and self.sends[0] <= window_start:
            self.sends.pop(0)
        return len(self.sends) < self.options.rate.count

    def _rollback_due(self, target: Target) -> bool:
        return target.rollback is RollbackState.PENDING and target.state in TERMINAL

    def _send_rollbacks(self, now: float, out: list[Decision]) -> None:
        for target in self.targets.values():
            if self._rollback_due(target):
                if not self._may_send(now):
                    return
                self.sends.append(now)
                target.rollback = RollbackState.SENT
                target.rollback_deadline = now + self.options.device_timeout_s
                out.append(SendRollback(target.id))

    def _active(self, *states: DeviceState) -> bool:
        return any(wave.counts[state] for wave in self.waves for state in states)

    def _failure_reasons(self, wave: Wave) -> dict[str, int]:
        reasons = Counter(
            self.targets[d].reason or self.targets[d].state.value
            for d in wave.devices
            if self.targets[d].state in FAILURES
        )
        return dict(reasons.most_common())

    def _reasons_text(self, wave: Wave) -> str:
        reasons = list(self._failure_reasons(wave).items())[:3]
        return "; " + ", ".join(f"{why} ({n})" for why, n in reasons) if reasons else ""

    def _eta(self, now: float) -> float | None:
        """Seconds left at the pace so far (never faster than the rate limit), plus the soaks."""
        if self.state is not RolloutState.RUNNING or self.started_at is None or not self.waves:
            return None
        unfinished = sum(t.state not in TERMINAL for t in self.targets.values())
        undrawn = max(0, self.waves[-1].selected - len(self.targets))
        finished = sum(t.state in EXECUTED for t in self.targets.values())
        limit = self.options.rate.count / self.options.rate.per_s
        elapsed = now - self.started_at
        pace = min(limit, finished / elapsed) if finished and elapsed > 0 else limit
        soaks = (len(self.spec) - len(self.waves)) * self.options.soak_s
        return (unfinished + undrawn) / pace + soaks

    def _refusal(self, action: str, allowed: str) -> str:
        if self.state in FINISHED:
            return f"cannot {action} the rollout: it is {self.state.value} (finished); {allowed}"
        return f"cannot {action} the rollout: it is {self.state.value}; {allowed}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.3g}%" if whole else "0%"


def _target_dict(target: Target) -> dict[str, Any]:
    return {
        "id": target.id,
        "group": target.group,
        "state": target.state.value,
        "reason": target.reason,
        "attempts": target.attempts,
        "deadline": target.deadline,
        "last_failure": target.last_failure.value if target.last_failure else None,
        "rollback": target.rollback.value if target.rollback else None,
        "rollback_deadline": target.rollback_deadline,
        "rollback_reason": target.rollback_reason,
    }


def _target_from(data: Mapping[str, Any], wave: int) -> Target:
    return Target(
        id=str(data["id"]),
        wave=wave,
        group=str(data["group"]),
        state=DeviceState(data["state"]),
        reason=data["reason"],
        attempts=int(data["attempts"]),
        deadline=data["deadline"],
        last_failure=DeviceState(data["last_failure"]) if data["last_failure"] else None,
        rollback=RollbackState(data["rollback"]) if data["rollback"] else None,
        rollback_deadline=data["rollback_deadline"],
        rollback_reason=data["rollback_reason"],
    )
