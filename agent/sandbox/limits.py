"""The limits every rune runs under; one place to read and tune them.

A call is one crossing into wasm (`_manifest`, `_call`, a block's configure or transform) with
everything the rune asks of the host meanwhile. Fuel bounds instructions (deterministic), the wall
clock bounds time including host work, and byte caps bound what a rune can make the host hold.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    fuel_per_call: int = 500_000_000
    wall_clock_ms: int = 2_000
    memory_bytes: int = 64 * MIB
    module_bytes: int = 16 * MIB
    output_bytes: int = 1 * MIB
    model_bytes: int = 32 * MIB
    resource_bytes: int = 8 * MIB
    max_instances: int = 64
    max_tensors: int = 16
    max_debug_bytes: int = 4096
