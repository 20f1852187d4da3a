"""Per-window aggregates of a rune's outputs, for the streams its manifest declares.

Rules:
- A stream reads one output: the record of the `out` stage that takes the stream's `value` (out
  stages are the output channels, numbered from 1 in manifest order), and in it the tensor at
  that input's position. Every element of that tensor is one observation.
- What is kept per window is the aggregate only, never an observation: a count per label (and
  `other`) or per bin (values outside the edges go to the outer bins), or the sum of the values
  clamped into the bounds and their count. Non-finite numbers are not observations.
- `close` ends the window: per stream, the vector the stream releases (shares of the window's
  observations, or the clamped mean), and nothing for a stream that observed nothing. Each
  device's window thereby contributes exactly one bounded vector, whatever its inference rate:
  that is the contribution bound the noise is calibrated to.
- Observing is thread-safe (the rune loop calls it from its worker thread).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ota.rune.bundle import Manifest
from ota.rune.runefile import StageKind
from ota.rune.streams import StreamKind, StreamSpec


@dataclass(frozen=True)
class StreamSource:
    """Where a stream's observations are in a rune's output records."""

    spec: StreamSpec
    channel: int
    position: int
    items: int  # how many tensors the out stage writes per record


def stream_sources(manifest: Manifest) -> list[StreamSource]:
    sources = []
    outs = manifest.of_kind(StageKind.OUT)
    for spec in manifest.streams:
        for channel, out in enumerate(outs, start=1):
            inputs = out.stage.inputs
            if spec.value in inputs:
                sources.append(StreamSource(spec, channel, inputs.index(spec.value), len(inputs)))
                break
    return sources


@dataclass
class _Tally:
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0


class WindowAggregator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[StreamSource] = []
        self._rune: str | None = None
        self._tallies: dict[str, _Tally] = {}

    def use(self, rune: str, sources: Sequence[StreamSource]) -> None:
        """Aggregate `rune`'s streams from now on (a window holds one rune's observations)."""
        with self._lock:
            if rune != self._rune:
                self._rune = rune
                self._sources = list(sources)
                self._tallies = {}

    def observe(self, records: Sequence[Any]) -> None:
        """Add one inference's output records (`OutputRecord`s: `.channel`, `.value`)."""
        with self._lock:
            for source in self._sources:
                for record in records:
                    if record.channel == source.channel:
                        self._add(source, _elements(record.value, source))

    def close(self) -> tuple[str | None, dict[str, tuple[float, ...]]]:
        """The rune and each stream's vector for the window that ends now; starts the next."""
        with self._lock:
            tallies, self._tallies = self._tallies, {}
            released: dict[str, tuple[float, ...]] = {}
            for source in self._sources:
                tally = tallies.get(source.spec.name)
                if tally is None or tally.n == 0:
                    continue
                if source.spec.kind is StreamKind.MEAN:
                    released[source.spec.name] = (tally.total / tally.n,)
                else:
                    released[source.spec.name] = tuple(c / tally.n for c in tally.counts)
            return self._rune, released

    def _add(self, source: StreamSource, elements: list[Any]) -> None:
        spec = source.spec
        tally = self._tallies.get(spec.name)
        if tally is None:
            tally = self._tallies[spec.name] = _Tally([0] * len(spec.keys))
        for element in elements:
            if spec.kind is StreamKind.LABELS:
                label = element if isinstance(element, str) else None
                index = spec.labels.index(label) if label in spec.labels else len(spec.labels)
                tally.counts[index] += 1
                tally.n += 1
                continue
            number = _finite(element)
            if number is None:
                continue
            if spec.kind is StreamKind.HISTOGRAM:
                index = bisect.bisect_right(spec.bins, number) - 1
                tally.counts[min(max(index, 0), len(spec.keys) - 1)] += 1
            else:
                low, high = spec.bounds
                tally.total += min(max(number, low), high)
            tally.n += 1


def _elements(value: Any, source: StreamSource) -> list[Any]:
    item = value
    if source.items > 1:
        if not isinstance(value, list) or len(value) <= source.position:
            return []
        item = value[source.position]
    if not isinstance(item, dict):
        return []
    elements = item.get("elements")
    return list(elements) if isinstance(elements, list) else []


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
