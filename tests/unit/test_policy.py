"""Composable policies: verdicts, `AllOf` and `AnyOf`, and the statuses' order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from attestation.policy import AllOf, AnyOf, Status, Verdict


@dataclass(frozen=True)
class Fixed:
    verdict: Verdict

    def check(self, _subject: object) -> Verdict:
        return self.verdict


OK = Fixed(Verdict.passed("fine"))
MEH = Fixed(Verdict.warning("so-so"))
BAD = Fixed(Verdict.failed("wrong"))


def test_a_verdict_is_truthy_only_when_it_affirms() -> None:
    assert Verdict.passed("fine")
    assert not Verdict.warning("so-so") and not Verdict.failed("wrong")
    assert Status.AFFIRMING < Status.WARNING < Status.CONTRAINDICATED
    assert [s.label for s in Status] == ["affirming", "warning", "contraindicated"]
    assert Status.from_label("warning") is Status.WARNING
    with pytest.raises(ValueError, match="not affirming, warning or contraindicated"):
        Status.from_label("fine")


def test_empty_combinations_are_configuration_errors() -> None:
    with pytest.raises(ValueError, match="empty AllOf would pass anything"):
        AllOf()
    with pytest.raises(ValueError, match="empty AnyOf would decide nothing"):
        AnyOf()


def test_all_of_is_as_trusted_as_its_least_trusted_policy() -> None:
    assert AllOf(OK, OK).check(None) == Verdict(Status.AFFIRMING, ("fine", "fine"))
    assert AllOf(OK, MEH).check(None) == Verdict(Status.WARNING, ("so-so",))
    assert AllOf(MEH, OK, BAD).check(None) == Verdict(Status.CONTRAINDICATED, ("so-so", "wrong"))


def test_any_of_is_as_trusted_as_its_most_trusted_policy() -> None:
    assert AnyOf(BAD, OK).check(None) == Verdict(Status.AFFIRMING, ("fine",))
    assert AnyOf(BAD, MEH).check(None) == Verdict(Status.WARNING, ("wrong", "so-so"))
    assert AnyOf(BAD).check(None) == Verdict(Status.CONTRAINDICATED, ("wrong",))
    nested = AllOf(AnyOf(BAD, OK), MEH)
    assert nested.check(None) == Verdict(Status.WARNING, ("so-so",))
