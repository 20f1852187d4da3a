"""Target policies: each verdict and its reason, AllOf, and a downloaded rune vs its metadata."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from attestation.policy import AllOf
from ota.rune.build import build_bundle
from ota.rune.runefile import CapabilityKind
from ota.target_policy import (
    CapabilitiesAllowed,
    KindSupported,
    MinimumAgentVersion,
    RequestedTarget,
    rune_matches_target,
)
from ota.targets import RuneTarget
from tests.legacy_runes import capability_rune

SINE = RuneTarget("acme", "sine", "1.0.0", "bundle", ("RAND",), "0.2.0")


@pytest.fixture(scope="module")
def sine_bundle(examples_dir: Path) -> bytes:
    return build_bundle(examples_dir / "sine" / "Runefile.yml", name="sine", version="1.0.0").data


def test_all_of_needs_every_policy_and_reports_every_failure() -> None:
    passing = AllOf(KindSupported(), MinimumAgentVersion("1.0.0"))
    verdict = passing.check(SINE)
    assert verdict.ok
    assert verdict.reason == "bundle runes are supported; agent 1.0.0 meets the minimum 0.2.0"
    failing = AllOf(
        KindSupported(),
        CapabilitiesAllowed(frozenset()),
        MinimumAgentVersion("0.1.0"),
    )
    verdict = failing.check(SINE)
    assert not verdict.ok
    assert verdict.reasons == (
        "sine@1.0.0 reads RAND, which this device does not allow (allowed: none)",
        "sine@1.0.0 needs agent 0.2.0 or newer; this agent is 0.1.0",
    )


def test_requested_target_compares_org_name_and_version() -> None:
    assert RequestedTarget("acme", "sine", "1.0.0").check(SINE).ok
    for wanted in (("other", "sine", "1.0.0"), ("acme", "cos", "1.0.0"), ("acme", "sine", "1.0")):
        verdict = RequestedTarget(*wanted).check(SINE)
        assert not verdict.ok
        assert verdict.reason == (
            f"asked for {wanted[0]}/{wanted[1]}@{wanted[2]} but the metadata describes "
            "acme/sine@1.0.0"
        )


def test_capabilities_must_all_be_allowed() -> None:
    two = dataclasses.replace(SINE, capabilities=("RAND", "ACCEL"))
    assert CapabilitiesAllowed(frozenset({"rand", "ACCEL", "SOUND"})).check(two).ok
    verdict = CapabilitiesAllowed(frozenset({"RAND"})).check(two)
    assert verdict.reason == (
        "sine@1.0.0 reads ACCEL, which this device does not allow (allowed: RAND)"
    )
    none = dataclasses.replace(SINE, capabilities=())
    assert CapabilitiesAllowed(frozenset()).check(none).reason == (
        "sine@1.0.0 reads no capabilities, all allowed"
    )


def test_minimum_agent_version_compares_numerically() -> None:
    newer = dataclasses.replace(SINE, min_agent_version="1.10.0")
    assert MinimumAgentVersion("1.10.0").check(newer).ok
    assert MinimumAgentVersion("1.10.1-rc1").check(newer).ok
    verdict = MinimumAgentVersion("1.9.9").check(newer)
    assert not verdict.ok
    assert verdict.reason == "sine@1.0.0 needs agent 1.10.0 or newer; this agent is 1.9.9"
    garbage = dataclasses.replace(SINE, min_agent_version="latest")
    assert MinimumAgentVersion("9.9.9").check(garbage).reason == (
        "sine@1.0.0 names an unreadable minimum agent version 'latest'"
    )
    with pytest.raises(ValueError, match="not a version"):
        MinimumAgentVersion("dev")


def test_kind_supported() -> None:
    legacy = dataclasses.replace(SINE, kind="legacy")
    assert KindSupported().check(legacy).ok
    verdict = KindSupported(frozenset({"bundle"})).check(legacy)
    assert verdict.reason == "sine@1.0.0 is a legacy rune; this agent runs bundle"


def test_a_downloaded_bundle_must_match_its_metadata(sine_bundle: bytes) -> None:
    verdict = rune_matches_target(SINE, sine_bundle)
    assert verdict.ok and verdict.reason == "the downloaded sine@1.0.0 matches its signed metadata"

    renamed = dataclasses.replace(SINE, name="cosine")
    assert rune_matches_target(renamed, sine_bundle).reason == (
        "the metadata describes cosine@1.0.0 but the bundle's manifest says sine@1.0.0"
    )
    other_version = dataclasses.replace(SINE, version="1.0.1")
    assert not rune_matches_target(other_version, sine_bundle).ok
    understated = dataclasses.replace(SINE, capabilities=())
    assert rune_matches_target(understated, sine_bundle).reason == (
        "the metadata says sine@1.0.0 reads no capabilities but the rune reads RAND"
    )
    overstated = dataclasses.replace(SINE, capabilities=("RAND", "ACCEL"))
    assert not rune_matches_target(overstated, sine_bundle).ok
    as_legacy = dataclasses.replace(SINE, kind="legacy")
    assert rune_matches_target(as_legacy, sine_bundle).reason == (
        "the metadata says sine@1.0.0 is a legacy rune but the file is a bundle rune"
    )


def test_a_downloaded_legacy_rune_must_declare_the_same_capabilities() -> None:
    rune = capability_rune(CapabilityKind.ACCEL, 4)
    target = RuneTarget("acme", "tilt", "3", "legacy", ("ACCEL",), "0.1.0")
    assert rune_matches_target(target, rune).ok
    wrong = dataclasses.replace(target, capabilities=("RAND",))
    assert rune_matches_target(wrong, rune).reason == (
        "the metadata says tilt@3 reads RAND but the rune reads ACCEL"
    )
    assert not rune_matches_target(dataclasses.replace(target, kind="bundle"), rune).ok


def test_bytes_that_are_no_rune_fail_with_the_reason() -> None:
    verdict = rune_matches_target(SINE, b"<html>not found</html>")
    assert not verdict.ok
    assert verdict.reason.startswith("the downloaded sine@1.0.0 is not a readable rune: neither")
