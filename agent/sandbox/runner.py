"""Load any rune from its bytes: a bundle (zip) or a legacy `.rune` (wasm), told apart by magic.

Rule: malformed input of either kind is a `SandboxError` (`ModuleRejected`) with the reason, so
callers have one error type to handle.
"""

from __future__ import annotations

from typing import Protocol

from agent.sandbox.errors import ModuleRejected
from agent.sandbox.inputs import InputSources
from agent.sandbox.legacy import LegacyRune
from agent.sandbox.limits import SandboxLimits
from agent.sandbox.outputs import OutputRecord
from agent.sandbox.pipeline import BundleRune
from ota.rune.bundle import BundleError, is_bundle, read_bundle
from ota.rune.runefile import CapabilityKind
from ota.rune.wasm import is_wasm


class LoadedRune(Protocol):
    name: str

    def call(self) -> list[OutputRecord]: ...


def load_rune(
    data: bytes,
    *,
    name: str = "rune",
    limits: SandboxLimits | None = None,
    sources: InputSources | None = None,
    allowed: frozenset[CapabilityKind] | None = None,
) -> LoadedRune:
    limits = limits or SandboxLimits()
    if is_bundle(data):
        try:
            bundle = read_bundle(data)
        except BundleError as exc:
            raise ModuleRejected(f"{name}: {exc}") from None
        return BundleRune(bundle, limits=limits, sources=sources, allowed=allowed)
    if is_wasm(data):
        return LegacyRune(data, limits=limits, sources=sources, allowed=allowed, name=name)
    raise ModuleRejected(f"{name} is neither a rune bundle nor a legacy .rune (wasm) file")
