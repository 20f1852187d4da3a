"""What a device checks about a rune target before and after downloading it.

Rules:
- A check returns a `Verdict` with a reason, passed or not; a `Verdict` is truthy only when it
  passed, so `if policy.check(t):` cannot pass a failure by accident.
- `AllOf` passes only when every policy in it passes and reports the first failure; an `AllOf`
  with no policies is a configuration error, never a pass.
- Before download (from the signed `custom` metadata): the target is the one requested, of a kind
  this agent runs, reads only capabilities this device allows, and needs an agent no newer than
  this one. A minimum version that cannot be read is a failure, not "no minimum".
- After download, `rune_matches_target` checks the rune's own description against the signed
  metadata: same kind; for a bundle the manifest's name and version are the target's; and the
  capability kinds the rune reads are exactly those the metadata declares (so a device policy
  decided on the metadata holds for the code it runs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ota.rune.inspect import InspectError, describe_rune
from ota.targets import KINDS, RuneTarget, version_key


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class Policy(Protocol):
    def check(self, target: RuneTarget) -> Verdict: ...


class AllOf:
    """Passes when every one of `policies` passes."""

    def __init__(self, *policies: Policy) -> None:
        if not policies:
            raise ValueError("AllOf needs at least one policy; an empty AllOf would pass anything")
        self.policies = policies

    def check(self, target: RuneTarget) -> Verdict:
        reasons = []
        for policy in self.policies:
            verdict = policy.check(target)
            if not verdict.ok:
                return verdict
            reasons.append(verdict.reason)
        return Verdict(True, "; ".join(reasons))


@dataclass(frozen=True)
class RequestedTarget:
    """The metadata describes the rune that was asked for."""

    org: str
    name: str
    version: str

    def check(self, target: RuneTarget) -> Verdict:
        wanted = (self.org, self.name, self.version)
        got = (target.org, target.name, target.version)
        if got != wanted:
            return Verdict(
                False,
                f"asked for {self.org}/{self.name}@{self.version} but the metadata describes "
                f"{target.org}/{target.ref}",
            )
        return Verdict(True, f"{target.org}/{target.ref} is the requested rune")


@dataclass(frozen=True)
class KindSupported:
    """The rune is of a kind this agent can run."""

    kinds: frozenset[str] = frozenset(KINDS)

    def check(self, target: RuneTarget) -> Verdict:
        if target.kind not in self.kinds:
            supported = ", ".join(sorted(self.kinds)) or "none"
            return Verdict(
                False, f"{target.ref} is a {target.kind} rune; this agent runs {supported}"
            )
        return Verdict(True, f"{target.kind} runes are supported")


@dataclass(frozen=True)
class CapabilitiesAllowed:
    """Every capability the rune reads is allowed on this device (kinds such as `ACCEL`)."""

    allowed: frozenset[str]

    def check(self, target: RuneTarget) -> Verdict:
        allowed = {c.upper() for c in self.allowed}
        refused = sorted({c.upper() for c in target.capabilities} - allowed)
        if refused:
            return Verdict(
                False,
                f"{target.ref} reads {', '.join(refused)}, which this device does not allow "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'})",
            )
        used = ", ".join(sorted({c.upper() for c in target.capabilities})) or "no capabilities"
        return Verdict(True, f"{target.ref} reads {used}, all allowed")


@dataclass(frozen=True)
class MinimumAgentVersion:
    """The rune does not need a newer agent than this one."""

    agent_version: str

    def __post_init__(self) -> None:
        if not version_key(self.agent_version):
            raise ValueError(f"agent version {self.agent_version!r} is not a version like 1.2.0")

    def check(self, target: RuneTarget) -> Verdict:
        needed = version_key(target.min_agent_version)
        if not needed:
            return Verdict(
                False,
                f"{target.ref} names an unreadable minimum agent version "
                f"{target.min_agent_version!r}",
            )
        if version_key(self.agent_version) < needed:
            return Verdict(
                False,
                f"{target.ref} needs agent {target.min_agent_version} or newer; this agent is "
                f"{self.agent_version}",
            )
        return Verdict(
            True, f"agent {self.agent_version} meets the minimum {target.min_agent_version}"
        )


def rune_matches_target(target: RuneTarget, data: bytes) -> Verdict:
    """Whether the downloaded rune `data` is what the signed metadata of `target` describes."""
    try:
        description = describe_rune(data, fallback_name=target.name)
    except InspectError as exc:
        return Verdict(False, f"the downloaded {target.ref} is not a readable rune: {exc}")
    if description.kind != target.kind:
        return Verdict(
            False,
            f"the metadata says {target.ref} is a {target.kind} rune but the file is a "
            f"{description.kind} rune",
        )
    if description.kind == "bundle" and (description.name, description.version) != (
        target.name,
        target.version,
    ):
        return Verdict(
            False,
            f"the metadata describes {target.ref} but the bundle's manifest says "
            f"{description.name}@{description.version}",
        )
    declared = _kinds(target.capabilities)
    read = _kinds(str(c.get("kind", "")) for c in description.capabilities)
    if declared != read:
        return Verdict(
            False,
            f"the metadata says {target.ref} reads {_names(declared)} but the rune reads "
            f"{_names(read)}",
        )
    return Verdict(True, f"the downloaded {target.ref} matches its signed metadata")


def _kinds(names: Iterable[str]) -> frozenset[str]:
    return frozenset(name.upper() for name in names)


def _names(kinds: frozenset[str]) -> str:
    return ", ".join(sorted(kinds)) or "no capabilities"
