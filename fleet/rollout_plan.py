"""A rollout's plan: the wave spec, the options, and which devices each wave draws.

Rules:
- A wave spec is a comma-separated list such as `1,10%,50%,100%`. Only the first item may be a
  device count (the canary, at least 1); every other item is a percentage of the selected devices,
  cumulative, strictly increasing, above 0% and at most 100%, and the last one is 100%: a rollout
  always covers its whole selection (narrow the selector to reach fewer devices).
- A wave is drawn when it starts, from the selection as it is then. Its size is its cumulative
  target for that selection (`ceil(percent * selected / 100)`, or the canary count) minus the
  selected devices earlier waves already drew, never below zero; the 100% wave takes every
  selected device not drawn yet. A device is drawn at most once per rollout.
- Drawing is stratified by label group (a device's full label set): a wave of `k` devices from `g`
  groups holds one device of each group when `k >= g`, and the rest in proportion to what each
  group has left (largest remainder); when `k < g` it takes one device from each of `k` groups,
  those earlier waves drew least from first, then the largest. So no wave is all one hardware
  model when the selection has several and the wave has room for two, and single-device waves
  take turns across the groups.
- Drawing is deterministic: a device's rank in its group, and a group's rank among equal-sized
  groups, come from a hash of the rollout's seed and the device id (or group), so the same seed,
  selection and earlier draws give the same wave, and `plan_waves` predicts the machine's draws
  while the selection does not change.
- Options are validated when made (`PlanError` with the option's name and the rule). Durations are
  seconds; `now` and `start_at` are POSIX seconds.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Mapping, Set
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any

Labels = Mapping[str, str]
Selection = Mapping[str, Labels]
"""The devices a rollout's selector matches now: device id -> that device's labels."""

DEFAULT_WAVES = "1,10%,50%,100%"

_PERCENT = re.compile(r"^(\d+(?:\.\d{1,6})?)\s*%$")
_COUNT = re.compile(r"^\d+$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)$")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_RATE_UNITS |= {"h": 3600, "hour": 3600}


class PlanError(ValueError):
    """A wave spec, option or selection a rollout cannot be planned with; the text says why."""


@dataclass(frozen=True)
class WaveTarget:
    """One item of a wave spec: a device count (the canary) or a cumulative percentage."""

    count: int | None = None
    percent: Fraction | None = None

    def cumulative(self, selected: int) -> int:
        """How many of `selected` devices the rollout has reached once this wave is drawn."""
        if self.count is not None:
            return min(self.count, selected)
        assert self.percent is not None
        return min(selected, math.ceil(self.percent * selected / 100))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        assert self.percent is not None
        return f"{_decimal(self.percent)}%"


@dataclass(frozen=True)
class WaveSpec:
    targets: tuple[WaveTarget, ...]

    @classmethod
    def parse(cls, text: str) -> WaveSpec:
        items = [item.strip() for item in text.split(",")]
        if not text.strip():
            raise PlanError(f"the wave spec is empty; expected something like {DEFAULT_WAVES}")
        targets: list[WaveTarget] = []
        for number, item in enumerate(items, start=1):
            where = f"wave {number} ({item!r})" if item else f"wave {number}"
            if not item:
                raise PlanError(f"{where} is empty in {text!r}; expected e.g. {DEFAULT_WAVES}")
            if _COUNT.match(item):
                if number > 1:
                    raise PlanError(
                        f"{where} is a device count: only the first wave (the canary) may be a "
                        "count; later waves are cumulative percentages such as 50%"
                    )
                if int(item) < 1:
                    raise PlanError(f"{where}: the canary must be at least 1 device")
                targets.append(WaveTarget(count=int(item)))
                continue
            match = _PERCENT.match(item)
            if match is None:
                raise PlanError(
                    f"{where} is neither a device count (e.g. 5) nor a percentage (e.g. 10%)"
                )
            percent = Fraction(match.group(1))
            if percent <= 0:
                raise PlanError(f"{where} must be more than 0%")
            if percent > 100:
                raise PlanError(f"{where} is over 100%")
            previous = targets[-1].percent if targets else None
            if previous is not None and percent <= previous:
                raise PlanError(
                    f"{where} is not above wave {number - 1} ({_decimal(previous)}%): "
                    "percentages are cumulative, so each wave must be larger than the one before"
                )
            targets.append(WaveTarget(percent=percent))
        if targets[-1].percent != 100:
            raise PlanError(
                f"the last wave is {targets[-1]}, not 100%: a rollout covers every selected device "
                "(add 100% as the last wave, or narrow the selector)"
            )
        return cls(tuple(targets))

    def __str__(self) -> str:
        return ",".join(str(target) for target in self.targets)

    def __len__(self) -> int:
        return len(self.targets)


class OnFailure(StrEnum):
    PAUSE = "pause"
    ABORT = "abort"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Rate:
    """At most `count` device notifications in any window of `per_s` seconds."""

    count: int = 500
    per_s: float = 60.0

    def __str__(self) -> str:
        units = {1.0: "s", 60.0: "min", 3600.0: "h"}
        return f"{self.count}/{units.get(self.per_s, f'{_decimal(self.per_s)}s')}"


@dataclass(frozen=True)
class Options:
    """How a rollout proceeds. The defaults are `fleetctl rollout create`'s."""

    soak_s: float = 600.0
    success_percent: float = 95.0
    max_failures_percent: float = 5.0
    min_executed: int = 10
    rate: Rate = field(default_factory=Rate)
    device_timeout_s: float = 900.0
    retries: int = 2
    on_failure: OnFailure = OnFailure.PAUSE
    start_at: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.soak_s >= 0, "soak", "must not be negative"),
            (0 < self.success_percent <= 100, "success", "must be above 0% and at most 100%"),
            (0 <= self.max_failures_percent <= 100, "max-failures", "must be 0% to 100%"),
            (self.min_executed >= 0, "min-executed", "must not be negative"),
            (self.rate.count >= 1 and self.rate.per_s > 0, "rate", "must be at least 1 a period"),
            (self.device_timeout_s > 0, "device-timeout", "must be more than 0"),
            (self.retries >= 0, "retries", "must not be negative"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise PlanError(f"--{name} {rule}")
        object.__setattr__(self, "on_failure", OnFailure(self.on_failure))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "on_failure": self.on_failure.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Options:
        fields = dict(data)
        fields["rate"] = Rate(int(data["rate"]["count"]), float(data["rate"]["per_s"]))
        fields["on_failure"] = OnFailure(data["on_failure"])
        return cls(**fields)


def group_of(labels: Labels) -> str:
    """A device's label group: its labels as sorted `k=v` pairs (`""` for none)."""
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels))


def draw(
    candidates: Selection, count: int, seed: str, drawn_before: Mapping[str, int] | None = None
) -> list[str]:
    """`count` devices from `candidates`, stratified by label group, in notification order.

    `drawn_before` counts the devices earlier waves drew per group. The order interleaves the
    groups (one device of each in turn), so that under a rate limit the first notifications
    already reach every group.
    """
    drawn_before = drawn_before or {}
    groups: dict[str, list[str]] = {}
    for device_id in candidates:
        groups.setdefault(group_of(candidates[device_id]), []).append(device_id)
    for members in groups.values():
        members.sort(key=lambda device_id: _rank(seed, device_id))
    order = sorted(
        groups,
        key=lambda group: (drawn_before.get(group, 0), -len(groups[group]), _rank(seed, group)),
    )
    count = max(0, min(count, len(candidates)))
    if count < len(order):
        shares = {group: int(i < count) for i, group in enumerate(order)}
    else:
        shares = {group: 1 for group in order}
        rest = count - len(order)
        spare = {group: len(groups[group]) - 1 for group in order}
        spare_total = sum(spare.values())
        if rest:
            quotas = {group: divmod(rest * spare[group], spare_total) for group in order}
            for group in order:
                shares[group] += quotas[group][0]
            left = count - sum(shares.values())
            by_remainder = sorted(order, key=lambda group: -quotas[group][1])
            for group in by_remainder[:left]:
                shares[group] += 1
    drawn: list[str] = []
    for turn in range(max(shares.values(), default=0)):
        drawn.extend(groups[group][turn] for group in order if turn < shares[group])
    return drawn


def draw_wave(target: WaveTarget, selection: Selection, drawn: Set[str], seed: str) -> list[str]:
    """The devices the wave with `target` draws from `selection`, given the already `drawn`."""
    reached = Counter(group_of(labels) for d, labels in selection.items() if d in drawn)
    candidates = {d: labels for d, labels in selection.items() if d not in drawn}
    count = target.cumulative(len(selection)) - reached.total()
    return draw(candidates, count, seed, reached)


def plan_waves(spec: WaveSpec, selection: Selection, seed: str) -> list[list[str]]:
    """The devices of every wave if the selection stays as it is (what `--dry-run` prints)."""
    if not selection:
        raise PlanError("the selection is empty: no device matches the selector")
    drawn: set[str] = set()
    waves: list[list[str]] = []
    for target in spec.targets:
        wave = draw_wave(target, selection, drawn, seed)
        drawn.update(wave)
        waves.append(wave)
    return waves


def parse_duration(text: str, option: str = "duration") -> float:
    """`90s`, `10m`, `1.5h`, `2d`, `250ms` or bare seconds, as seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise PlanError(f"--{option} {text!r} is not a duration such as 90s, 10m, 1h or 2d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_percent(text: str, option: str = "percent") -> float:
    """`95%` or `95` as 95.0."""
    match = re.match(r"^(\d+(?:\.\d+)?)\s*%?$", text.strip())
    if match is None or float(match.group(1)) > 100:
        raise PlanError(f"--{option} {text!r} is not a percentage from 0% to 100%")
    return float(match.group(1))


def parse_rate(text: str) -> Rate:
    """`500/min`, `10/s` or `1000/h`."""
    match = _RATE.match(text.strip())
    if match is None or int(match.group(1)) < 1:
        raise PlanError(f"--rate {text!r} is not a rate such as 500/min, 10/s or 1000/h")
    return Rate(int(match.group(1)), float(_RATE_UNITS[match.group(2)]))


def _rank(seed: str, name: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()


def _decimal(value: Fraction | float) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    exact = Decimal(value.numerator) / Decimal(value.denominator)  # a parsed decimal terminates
    return format(exact.normalize(), "f")
