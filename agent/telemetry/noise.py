"""Differentially private release of one window's aggregate, with OpenDP's samplers.

Rules:
- Noise comes only from OpenDP (`opendp.measurements`): its Laplace and Gaussian samplers draw
  exactly (integer arithmetic on a discretized grid, then rounded), so the low bits of a noisy
  float say nothing about the true value (Mironov's floating-point attack on textbook Laplace).
- The scale is calibrated by OpenDP itself (`binary_search_param`) so the measurement's privacy
  map at the stream's sensitivity is at most the stream's `epsilon` (and `delta`): L1 with
  Laplace (pure epsilon-DP), L2 with Gaussian (zCDP converted to (epsilon, delta)-DP). The
  sensitivity is the stream's (`StreamSpec.sensitivity_l1/_l2`): what one device's whole window
  can change.
- The values released are the vector of the stream's keys (shares, or the clamped mean), each
  clamped to its domain first; the noise's standard deviation goes with it, so the controller can
  state an error bar without learning anything else.
- A measurement is built once per stream declaration and reused.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import opendp.prelude as dp

from ota.rune.streams import Mechanism, StreamSpec

dp.enable_features("contrib")


@dataclass(frozen=True)
class Noisy:
    values: tuple[float, ...]
    noise_std: float  # of each coordinate
    scale: float  # the mechanism's own parameter (Laplace b, Gaussian sigma)


@dataclass(frozen=True)
class _Calibrated:
    measure: Callable[[Any], Any]
    scale: float
    noise_std: float


def release(spec: StreamSpec, values: Sequence[float]) -> Noisy:
    """`values` (one per key of `spec`) with noise for the stream's epsilon (and delta)."""
    if len(values) != len(spec.keys):
        raise ValueError(f"{spec.name} has {len(spec.keys)} keys, not {len(values)} values")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"{spec.name}: values must be finite")
    calibrated = _calibrate(spec)
    noisy = calibrated.measure([float(v) for v in values])
    return Noisy(tuple(float(v) for v in noisy), calibrated.noise_std, calibrated.scale)


def noise_std(spec: StreamSpec) -> float:
    """The standard deviation of the noise each released coordinate of `spec` carries."""
    return _calibrate(spec).noise_std


@functools.lru_cache(maxsize=256)
def _calibrate(spec: StreamSpec) -> _Calibrated:
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=len(spec.keys))
    if spec.mechanism is Mechanism.LAPLACE:

        def laplace(scale: float) -> Any:
            return dp.m.make_laplace(domain, dp.l1_distance(T=float), scale=scale)

        scale = dp.binary_search_param(laplace, d_in=spec.sensitivity_l1, d_out=spec.epsilon)
        return _Calibrated(laplace(scale), scale, math.sqrt(2.0) * scale)

    def gaussian(scale: float) -> Any:
        measurement = dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale=scale)
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(measurement), spec.delta)

    scale = dp.binary_search_param(
        gaussian, d_in=spec.sensitivity_l2, d_out=(spec.epsilon, spec.delta)
    )
    return _Calibrated(gaussian(scale), scale, scale)
