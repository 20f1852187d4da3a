"""Health check: a rune has to load and run in the sandbox before the agent switches to it.

Rules:
- The rune is loaded with `load_rune` under the device's sandbox limits (and the capabilities its
  policy allows) and called `calls` times on synthetic, seeded inputs
  (`InputFiles(synthetic=True)`): every capability gets plausible data of exactly the size the
  rune asks for, the same data for the same seed.
- Neither the bundle format (`fleet-rune-bundle/1`) nor legacy `.rune` files carry test vectors,
  so outputs are not compared with expected values: a rune is healthy when it loads and every
  call returns without a trap, a limit, a refused capability or an error of its own. A rune that
  fails only on real data or only after many calls passes here; probation catches it.
- A bad rune never makes this raise: any `SandboxError` is a failed report with its message and
  the call it happened in. The duration is measured for the report only; the sandbox's per-call
  limits bound it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.sandbox.errors import SandboxError
from agent.sandbox.inputs import InputFiles, InputSources
from agent.sandbox.limits import SandboxLimits
from agent.sandbox.runner import load_rune
from ota.rune.runefile import CapabilityKind


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    reason: str
    calls: int
    duration: float


def health_check(
    data: bytes,
    name: str,
    limits: SandboxLimits | None,
    calls: int = 3,
    *,
    allowed: frozenset[CapabilityKind] | None = None,
    seed: int = 0,
) -> HealthReport:
    """Load `data` and run it `calls` times; `calls` in the report counts the calls completed."""
    if calls < 1:
        raise ValueError(f"a health check makes at least one call, not {calls}")
    sources = InputSources(InputFiles(seed=seed, synthetic=True))
    started = time.perf_counter()
    try:
        rune = load_rune(data, name=name, limits=limits, sources=sources, allowed=allowed)
    except SandboxError as exc:
        return HealthReport(False, f"{name} failed to load: {exc}", 0, _since(started))
    for done in range(calls):
        try:
            rune.call()
        except SandboxError as exc:
            reason = f"{name} failed call {done + 1} of {calls}: {exc}"
            return HealthReport(False, reason, done, _since(started))
    return HealthReport(True, f"{name} loaded and ran {calls} calls", calls, _since(started))


def _since(started: float) -> float:
    return time.perf_counter() - started
