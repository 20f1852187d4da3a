"""Policies as small composable objects: each check says how far it trusts a subject, and why.

The vocabulary is the IETF RATS one (an attestation result's trustworthiness): `affirming`,
`warning`, `contraindicated`. A yes/no policy (a rune target a device accepts, a provenance
statement the controller admits) uses `affirming` for yes and `contraindicated` for no.

Rules:
- A check returns a `Verdict`, never a bare bool: its `status` and the `reasons` for it. A
  verdict is truthy only when it is `affirming`, so `if policy.check(x):` cannot let a warning or
  a failure pass by accident.
- `AllOf` runs every policy and takes the worst status; its reasons are those of the policies that
  were not affirming (or, when all were, what each affirmed). `AnyOf` takes the best status; its
  reasons are those of the best policies, or, when none affirmed, every policy's. An `AllOf` or
  `AnyOf` with no policies is a configuration error, never a pass.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

Subject = TypeVar("Subject", contravariant=True)
Checked = TypeVar("Checked")


class Status(enum.IntEnum):
    """How far a subject is trusted, best first (the order is what `max` and `min` use)."""

    AFFIRMING = 0
    WARNING = 1
    CONTRAINDICATED = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Status:
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"{label!r} is not affirming, warning or contraindicated") from None


@dataclass(frozen=True)
class Verdict:
    status: Status
    reasons: tuple[str, ...]

    @classmethod
    def passed(cls, reason: str) -> Verdict:
        return cls(Status.AFFIRMING, (reason,))

    @classmethod
    def warning(cls, reason: str) -> Verdict:
        return cls(Status.WARNING, (reason,))

    @classmethod
    def failed(cls, reason: str) -> Verdict:
        return cls(Status.CONTRAINDICATED, (reason,))

    @property
    def ok(self) -> bool:
        return self.status is Status.AFFIRMING

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def __bool__(self) -> bool:
        return self.ok


class Policy(Protocol[Subject]):
    def check(self, subject: Subject, /) -> Verdict: ...


class AllOf(Generic[Checked]):
    """As trusted as the least trusted of `policies`."""

    def __init__(self, *policies: Policy[Checked]) -> None:
        if not policies:
            raise ValueError("AllOf needs at least one policy; an empty AllOf would pass anything")
        self.policies = policies

    def check(self, subject: Checked) -> Verdict:
        return worst_of([policy.check(subject) for policy in self.policies])


class AnyOf(Generic[Checked]):
    """As trusted as the most trusted of `policies`."""

    def __init__(self, *policies: Policy[Checked]) -> None:
        if not policies:
            raise ValueError("AnyOf needs at least one policy; an empty AnyOf would decide nothing")
        self.policies = policies

    def check(self, subject: Checked) -> Verdict:
        verdicts = [policy.check(subject) for policy in self.policies]
        best = min(verdict.status for verdict in verdicts)
        shown = verdicts if best is not Status.AFFIRMING else [v for v in verdicts if v.ok]
        return Verdict(best, _reasons(shown))


def worst_of(verdicts: Sequence[Verdict]) -> Verdict:
    """The verdicts as one, the way `AllOf` combines them."""
    worst = max(verdict.status for verdict in verdicts)
    shown = verdicts if worst is Status.AFFIRMING else [v for v in verdicts if not v.ok]
    return Verdict(worst, _reasons(shown))


def _reasons(verdicts: Sequence[Verdict]) -> tuple[str, ...]:
    return tuple(reason for verdict in verdicts for reason in verdict.reasons)
