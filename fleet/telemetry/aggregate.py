"""Fleet aggregates of noisy per-device reports, with the error bar their noise implies. Pure.

Rules:
- Each device's report for a window is one noisy vector over the stream's keys (a share per
  label or bin, or a clamped mean), with the standard deviation of its noise. The aggregate of a
  set of such reports is their mean per key: every device-window counts once, whatever its
  inference rate (that is also the unit the device's noise protects).
- The noise of the mean has standard deviation `sqrt(sum(std_i^2)) / n` per key; the error bar
  is `Z95` times that (a 95% interval under the normal approximation, which the sum of many
  independent Laplace or Gaussian draws follows). It covers the noise the devices added, not the
  sampling of which devices or windows reported.
- Values are not clipped: a share may come out below 0 or above 1, which keeps the mean unbiased.
- Reports are only combined when they have the same keys: the most recent report's keys win, and
  the others (another rune version with other labels or bins) are counted as `skipped`.
- No report, no aggregate (None): never a number made from nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Entry:
    """One stored stream value: a device's noisy vector for one window."""

    device_id: str
    keys: tuple[str, ...]
    values: tuple[float, ...]
    noise_std: float
    window_end: float
    epsilon: float = 0.0


@dataclass(frozen=True)
class Aggregate:
    keys: tuple[str, ...]
    value: tuple[float, ...]
    error: tuple[float, ...]  # 95% half-width per key, from the devices' noise
    noise_std: float  # of the mean, per key
    reports: int
    devices: int
    skipped: int
    first_window_end: float
    last_window_end: float

    def to_json(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "value": list(self.value),
            "error": list(self.error),
            "noise_std": self.noise_std,
            "reports": self.reports,
            "devices": self.devices,
            "skipped": self.skipped,
            "first_window_end": self.first_window_end,
            "last_window_end": self.last_window_end,
        }


def combine(entries: Sequence[Entry]) -> Aggregate | None:
    if not entries:
        return None
    keys = max(entries, key=lambda e: e.window_end).keys
    used = [e for e in entries if e.keys == keys]
    n = len(used)
    value = tuple(math.fsum(e.values[k] for e in used) / n for k in range(len(keys)))
    std = math.sqrt(math.fsum(e.noise_std**2 for e in used)) / n
    return Aggregate(
        keys=keys,
        value=value,
        error=tuple(Z95 * std for _ in keys),
        noise_std=std,
        reports=n,
        devices=len({e.device_id for e in used}),
        skipped=len(entries) - n,
        first_window_end=min(e.window_end for e in used),
        last_window_end=max(e.window_end for e in used),
    )
