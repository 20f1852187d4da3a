"""Probation: a rune the agent just switched to has to prove itself before it is trusted.

Rules:
- Probation starts when a switch makes a rune active and belongs to that rune (its SHA-256); a
  record for any other rune is void.
- The agent reports every run of the active rune, ok or failed with a reason. While on probation,
  `max_failures` failed runs end it as FAILED: the caller rolls back.
- Probation lasts `window` seconds from its start, so every failure it counts lies within one
  window. It ends as PASSED when the window has passed with fewer failures, or after
  `min_successes` successful runs, whichever comes first. A run reported after the window is not
  counted: probation was already over.
- A clock that went backwards (now before the start) restarts the window at `now`: a wrong clock
  can make probation longer, never shorter than its successes allow.
- Pure: time comes in as `now` (seconds), decisions go out; the record is plain data the slots
  persist in `state.json`, and `Probation.from_json` refuses a malformed record with the reason.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

MAX_REASON = 500
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ProbationError(ValueError):
    """A probation policy or persisted probation record that does not make sense."""


class Verdict(enum.StrEnum):
    CONTINUE = "continue"
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class ProbationPolicy:
    window: float = 600.0
    max_failures: int = 3
    min_successes: int = 20

    def __post_init__(self) -> None:
        if not _finite(self.window) or self.window <= 0:
            raise ProbationError(
                f"the probation window must be positive seconds, not {self.window}"
            )
        for what, value in (
            ("max_failures", self.max_failures),
            ("min_successes", self.min_successes),
        ):
            if not _count(value) or value < 1:
                raise ProbationError(f"probation {what} must be a whole number >= 1, not {value!r}")


@dataclass(frozen=True)
class Failure:
    at: float
    reason: str


@dataclass(frozen=True)
class Probation:
    sha256: str
    started_at: float
    policy: ProbationPolicy = ProbationPolicy()
    successes: int = 0
    failures: tuple[Failure, ...] = ()

    def ends_at(self) -> float:
        return self.started_at + self.policy.window

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "started_at": self.started_at,
            "window": self.policy.window,
            "max_failures": self.policy.max_failures,
            "min_successes": self.policy.min_successes,
            "successes": self.successes,
            "failures": [{"at": f.at, "reason": f.reason} for f in self.failures],
        }

    @classmethod
    def from_json(cls, data: Any) -> Probation:
        if not isinstance(data, dict):
            raise ProbationError("the probation record must be a JSON object")
        sha256, started_at = data.get("sha256"), data.get("started_at")
        successes, failures = data.get("successes"), data.get("failures")
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise ProbationError("the probation record names no valid sha256")
        if not _finite(started_at):
            raise ProbationError(f"probation started_at must be a number, not {started_at!r}")
        if not _count(successes):
            raise ProbationError(f"probation successes must be a count, not {successes!r}")
        if not isinstance(failures, list):
            raise ProbationError("probation failures must be a list")
        parsed = []
        for item in failures:
            at = item.get("at") if isinstance(item, dict) else None
            reason = item.get("reason") if isinstance(item, dict) else None
            if not _finite(at) or not isinstance(reason, str):
                raise ProbationError(f"a probation failure {item!r} is not {{at, reason}}")
            parsed.append(Failure(float(at), reason[:MAX_REASON]))
        window: Any = data.get("window")
        max_failures: Any = data.get("max_failures")
        min_successes: Any = data.get("min_successes")
        policy = ProbationPolicy(window, max_failures, min_successes)
        return cls(sha256, float(started_at), policy, successes, tuple(parsed))


@dataclass(frozen=True)
class Step:
    """What a report did to probation: the updated record and, when it ended, why."""

    verdict: Verdict
    probation: Probation
    reason: str


def start(sha256: str, now: float, policy: ProbationPolicy | None = None) -> Probation:
    return Probation(sha256, now, policy or ProbationPolicy())


def expire(probation: Probation, now: float) -> Step:
    """PASSED once the window is over; otherwise CONTINUE (with the clock check applied)."""
    if now < probation.started_at:
        return Step(Verdict.CONTINUE, replace(probation, started_at=now), "")
    if now >= probation.ends_at():
        failures = len(probation.failures)
        return Step(
            Verdict.PASSED,
            probation,
            f"probation window of {probation.policy.window:g} s passed with {failures} "
            f"failed and {probation.successes} successful runs",
        )
    return Step(Verdict.CONTINUE, probation, "")


def record(probation: Probation, ok: bool, reason: str, now: float) -> Step:
    """Count one run of the rune on probation."""
    step = expire(probation, now)
    if step.verdict is not Verdict.CONTINUE:
        return step
    current = step.probation
    policy = current.policy
    if ok:
        current = replace(current, successes=current.successes + 1)
        if current.successes >= policy.min_successes:
            return Step(
                Verdict.PASSED,
                current,
                f"{current.successes} successful runs on probation "
                f"({len(current.failures)} failed)",
            )
        return Step(Verdict.CONTINUE, current, "")
    failure = Failure(now, (reason or "failed")[:MAX_REASON])
    current = replace(current, failures=(*current.failures, failure))
    if len(current.failures) >= policy.max_failures:
        reasons = "; ".join(f.reason for f in current.failures[-policy.max_failures :])
        return Step(
            Verdict.FAILED,
            current,
            f"{len(current.failures)} failed runs within {policy.window:g} s of probation: "
            f"{reasons}",
        )
    return Step(Verdict.CONTINUE, current, "")
