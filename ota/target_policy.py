"""What a device checks about a rune target before and after downloading it.

Rules:
- Every check is an `attestation.policy` policy over a `RuneTarget`: it passes (`affirming`) or
  fails (`contraindicated`) with a reason, and they combine with `AllOf`, which reports every
  failure and is never empty.
- Before download (from the signed `custom` metadata): the target is the one requested, of a kind
  this agent runs, reads only capabilities this device allows, and needs an agent no newer than
  this one. A minimum version that cannot be read is a failure, not "no minimum".
- After download, `rune_matches_target` checks the rune's own description against the signed
  metadata: same kind; for a bundle the manifest's name and version are the target's; and the
  capability kinds the rune reads are exactly those the metadata declares (so a device policy
  decided on the metadata holds for the code it runs).
- It reads only what those checks need, from bytes TUF has already verified whole against the
  signed length and SHA-256: for a bundle, the archive's member list and `manifest.json`, held
  to what `read_bundle` accepts (no duplicates, a manifest, every listed part present and nothing
  else, a pipeline that refers only to its own stages and parts) without inflating or hashing
  the parts; for a legacy rune, its custom sections (`read_legacy_info`) and a validation of the
  module, without compiling it. Each part's size and SHA-256 and the compile are checked by the
  loader (`read_bundle`, the sandbox), which the health check runs before any switch and every
  later load repeats.
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import wasmtime

from attestation.policy import Verdict
from ota.rune.bundle import (
    DEFAULT_MAX_BYTES,
    MANIFEST,
    BundleError,
    Manifest,
    _check_references,
    is_bundle,
)
from ota.rune.legacy import LegacyRuneError, read_legacy_info
from ota.rune.runefile import StageKind
from ota.rune.wasm import is_wasm
from ota.targets import KINDS, RuneTarget, version_key

MAX_MANIFEST_BYTES = 1024 * 1024  # what `read_bundle` allows


class _Unreadable(ValueError):
    """The downloaded bytes are no rune this check can read; the message says why."""


@dataclass(frozen=True)
class _Described:
    """What the downloaded rune says about itself, as far as `rune_matches_target` needs."""

    kind: str
    name: str
    version: str
    capabilities: tuple[str, ...]


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
            return Verdict.failed(
                f"asked for {self.org}/{self.name}@{self.version} but the metadata describes "
                f"{target.org}/{target.ref}",
            )
        return Verdict.passed(f"{target.org}/{target.ref} is the requested rune")


@dataclass(frozen=True)
class KindSupported:
    """The rune is of a kind this agent can run."""

    kinds: frozenset[str] = frozenset(KINDS)

    def check(self, target: RuneTarget) -> Verdict:
        if target.kind not in self.kinds:
            supported = ", ".join(sorted(self.kinds)) or "none"
            return Verdict.failed(
                f"{target.ref} is a {target.kind} rune; this agent runs {supported}"
            )
        return Verdict.passed(f"{target.kind} runes are supported")


@dataclass(frozen=True)
class CapabilitiesAllowed:
    """Every capability the rune reads is allowed on this device (kinds such as `ACCEL`)."""

    allowed: frozenset[str]

    def check(self, target: RuneTarget) -> Verdict:
        allowed = {c.upper() for c in self.allowed}
        refused = sorted({c.upper() for c in target.capabilities} - allowed)
        if refused:
            return Verdict.failed(
                f"{target.ref} reads {', '.join(refused)}, which this device does not allow "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'})",
            )
        used = ", ".join(sorted({c.upper() for c in target.capabilities})) or "no capabilities"
        return Verdict.passed(f"{target.ref} reads {used}, all allowed")


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
            return Verdict.failed(
                f"{target.ref} names an unreadable minimum agent version "
                f"{target.min_agent_version!r}",
            )
        if version_key(self.agent_version) < needed:
            return Verdict.failed(
                f"{target.ref} needs agent {target.min_agent_version} or newer; this agent is "
                f"{self.agent_version}",
            )
        return Verdict.passed(
            f"agent {self.agent_version} meets the minimum {target.min_agent_version}"
        )


def rune_matches_target(target: RuneTarget, data: bytes) -> Verdict:
    """Whether the downloaded rune `data` is what the signed metadata of `target` describes."""
    try:
        description = _describe(data)
    except _Unreadable as exc:
        return Verdict.failed(f"the downloaded {target.ref} is not a readable rune: {exc}")
    if description.kind != target.kind:
        return Verdict.failed(
            f"the metadata says {target.ref} is a {target.kind} rune but the file is a "
            f"{description.kind} rune",
        )
    if description.kind == "bundle" and (description.name, description.version) != (
        target.name,
        target.version,
    ):
        return Verdict.failed(
            f"the metadata describes {target.ref} but the bundle's manifest says "
            f"{description.name}@{description.version}",
        )
    declared = _kinds(target.capabilities)
    read = _kinds(description.capabilities)
    if declared != read:
        return Verdict.failed(
            f"the metadata says {target.ref} reads {_names(declared)} but the rune reads "
            f"{_names(read)}",
        )
    return Verdict.passed(f"the downloaded {target.ref} matches its signed metadata")


def _kinds(names: Iterable[str]) -> frozenset[str]:
    return frozenset(name.upper() for name in names)


def _names(kinds: frozenset[str]) -> str:
    return ", ".join(sorted(kinds)) or "no capabilities"


def _describe(data: bytes) -> _Described:
    if is_bundle(data):
        try:
            manifest = _bundle_manifest(data)
        except BundleError as exc:
            raise _Unreadable(str(exc)) from None
        capabilities = tuple(
            entry.stage.target
            for entry in manifest.stages
            if entry.stage.kind is StageKind.CAPABILITY
        )
        return _Described("bundle", manifest.name, manifest.version, capabilities)
    if is_wasm(data):
        try:
            info = read_legacy_info(data)
            # Validation only: what a compile checks first, at a fraction of its cost.
            wasmtime.Module.validate(_validator(), data)
        except LegacyRuneError as exc:
            raise _Unreadable(str(exc)) from None
        except wasmtime.WasmtimeError as exc:
            raise _Unreadable(
                f"not a valid WebAssembly module: {str(exc).strip().splitlines()[0]}"
            ) from None
        version = str(info.version if info.version is not None else "?")
        return _Described("legacy", "", version, tuple(k.name for k in info.capabilities))
    raise _Unreadable("neither a rune bundle (zip) nor a legacy .rune (wasm module)")


@functools.cache
def _validator() -> wasmtime.Engine:
    """An engine for validating modules only, on the calling thread (no compile thread pool)."""
    config = wasmtime.Config()
    config.parallel_compilation = False
    return wasmtime.Engine(config)


def _bundle_manifest(data: bytes) -> Manifest:
    """The manifest of bundle `data`, from an archive whose member list `read_bundle` would
    accept, without inflating or hashing the parts (`read_bundle` does both at load)."""
    if len(data) > DEFAULT_MAX_BYTES:
        raise BundleError(
            f"the bundle is {len(data)} bytes, over the {DEFAULT_MAX_BYTES}-byte limit"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = [info.filename for info in archive.infolist()]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise BundleError(f"the bundle is not a readable zip archive: {exc}") from None
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BundleError(f"the bundle holds {', '.join(duplicates)} more than once")
    if MANIFEST not in names:
        raise BundleError("the bundle has no manifest.json")
    try:
        with archive.open(MANIFEST) as member:
            raw = member.read(MAX_MANIFEST_BYTES + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as exc:
        raise BundleError(f"{MANIFEST} in the bundle cannot be read: {exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST} in the bundle is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = Manifest.from_json(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"the bundle's manifest.json is not valid JSON: {exc}") from None
    listed = {part.path for part in manifest.parts}
    unlisted = sorted(set(names) - listed - {MANIFEST})
    if unlisted:
        raise BundleError(
            f"the bundle holds files its manifest does not list: {', '.join(unlisted)}"
        )
    missing = sorted(listed - set(names))
    if missing:
        raise BundleError(f"the bundle's manifest lists {missing[0]}, which is missing")
    # The pipeline's references need only the part names, all present (checked just above).
    _check_references(manifest, dict.fromkeys(listed, b""))
    return manifest
