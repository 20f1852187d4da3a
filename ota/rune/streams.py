"""Telemetry streams a rune declares: which output is aggregated how, and at what privacy cost.

A stream is what a device owner may opt in to (`fleet-agent consent`). The declaration travels
inside the bundle's manifest, so the agent, the controller and the owner all read the same one.

Rules:
- A Runefile declares streams in a top-level `telemetry` mapping, stream name -> `{kind, value,
  epsilon, ...}`; at most `MAX_STREAMS`, names `[a-z][a-z0-9_]{0,31}`.
- `value` names an input of an `out` stage (`stage` or `stage.N`): only what the rune outputs can
  be aggregated, never a sensor read directly.
- `kind` is one of:
  - `labels`: the share of each declared label among the window's outputs (`labels`: 1 to
    `MAX_KEYS - 1` distinct strings; any other value counts as `other`). The output must be UTF8.
  - `histogram`: the share of the window's values in each bin (`bins`: 2 to `MAX_KEYS + 1`
    strictly increasing finite edges; values outside are clamped into the outer bins).
  - `mean`: the mean of the window's values, each clamped into `bounds: [low, high]`.
  `histogram` and `mean` need a numeric output.
- `epsilon` is what one window's report costs, in (0, `MAX_EPSILON`]; `budget` is what a stream
  may spend per `period` (default one day, from `MIN_PERIOD_S` to `MAX_PERIOD_S`), at least one
  report's `epsilon` and by default `DEFAULT_BUDGET_REPORTS` reports. `mechanism` is `laplace`
  (pure epsilon-DP, the default) or `gaussian`, which needs `delta` in (0, `MAX_DELTA`].
- Numbers may be written as YAML numbers or as strings of one (`1e-6`, which YAML 1.1 reads as a
  string). Problems are collected, each naming the stream and what to change
  (`runefile.Problem`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ota.rune.runefile import INPUT_REF, InputRef, Problem, Stage, StageKind

MAX_STREAMS = 8
MAX_KEYS = 32
MAX_EPSILON = 10.0
MAX_DELTA = 1e-3
DEFAULT_BUDGET_REPORTS = 24
DEFAULT_PERIOD_S = 86400.0
MIN_PERIOD_S = 60.0
MAX_PERIOD_S = 366 * 86400.0
MAX_LABEL_CHARS = 64
OTHER = "other"
STREAM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_NUMERIC = frozenset({"u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"})


class StreamKind(StrEnum):
    LABELS = "labels"
    HISTOGRAM = "histogram"
    MEAN = "mean"


class Mechanism(StrEnum):
    LAPLACE = "laplace"
    GAUSSIAN = "gaussian"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    kind: StreamKind
    value: InputRef
    epsilon: float
    budget: float
    period_s: float = DEFAULT_PERIOD_S
    mechanism: Mechanism = Mechanism.LAPLACE
    delta: float = 0.0
    labels: tuple[str, ...] = ()
    bins: tuple[float, ...] = ()
    bounds: tuple[float, float] = (0.0, 0.0)

    @property
    def keys(self) -> tuple[str, ...]:
        """What each coordinate of a report's values is: a label, a bin, or the mean."""
        if self.kind is StreamKind.LABELS:
            return (*self.labels, OTHER)
        if self.kind is StreamKind.HISTOGRAM:
            edges = list(zip(self.bins, self.bins[1:], strict=False))
            last = len(edges) - 1
            return tuple(
                f"[{a:g},{b:g}{']' if n == last else ')'}" for n, (a, b) in enumerate(edges)
            )
        return ("mean",)

    @property
    def sensitivity_l1(self) -> float:
        """How far one device's window can move the released vector (L1): shares move by at
        most 2 in total, a clamped mean by the width of its bounds."""
        if self.kind is StreamKind.MEAN:
            return self.bounds[1] - self.bounds[0]
        return 2.0

    @property
    def sensitivity_l2(self) -> float:
        if self.kind is StreamKind.MEAN:
            return self.bounds[1] - self.bounds[0]
        return math.sqrt(2.0)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind.value,
            "value": str(self.value),
            "epsilon": self.epsilon,
            "budget": self.budget,
            "period_s": self.period_s,
            "mechanism": self.mechanism.value,
        }
        if self.mechanism is Mechanism.GAUSSIAN:
            document["delta"] = self.delta
        if self.kind is StreamKind.LABELS:
            document["labels"] = list(self.labels)
        elif self.kind is StreamKind.HISTOGRAM:
            document["bins"] = list(self.bins)
        else:
            document["bounds"] = list(self.bounds)
        return document


class StreamError(ValueError):
    """A stream declaration that cannot be used; the message says which and why."""


def parse_streams(
    raw: object, stages: dict[str, Stage], problems: list[Problem]
) -> list[StreamSpec]:
    """The streams of a Runefile's `telemetry` section, checked against its stages."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        problems.append(Problem("telemetry", "must map stream names to {kind, value, epsilon}"))
        return []
    if len(raw) > MAX_STREAMS:
        problems.append(Problem("telemetry", f"at most {MAX_STREAMS} streams, not {len(raw)}"))
    streams: list[StreamSpec] = []
    for name, body in raw.items():
        before = len(problems)
        spec = _parse_one(str(name), body, problems)
        if spec is not None and len(problems) == before:
            _check_value(spec, stages, problems)
            streams.append(spec)
    return streams


def stream_from_json(data: Any) -> StreamSpec:
    """A stream as a manifest stores it; `StreamError` if it is not one."""
    problems: list[Problem] = []
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise StreamError("a manifest stream must be an object with a name")
    body = {k: v for k, v in data.items() if k != "name"}
    spec = _parse_one(data["name"], body, problems)
    if spec is None or problems:
        raise StreamError("; ".join(str(p) for p in problems) or "a malformed stream")
    return spec


def _parse_one(name: str, body: object, problems: list[Problem]) -> StreamSpec | None:
    where = f"telemetry {name}"
    if not STREAM_NAME.match(name):
        problems.append(Problem(where, "stream names are a-z, 0-9 and _, starting with a letter"))
        return None
    if not isinstance(body, dict):
        problems.append(Problem(where, "must be a mapping with kind, value and epsilon"))
        return None
    try:
        kind = StreamKind(str(body.get("kind")))
    except ValueError:
        kinds = ", ".join(k.value for k in StreamKind)
        problems.append(Problem(where, f"kind must be one of {kinds}, not {body.get('kind')!r}"))
        return None
    extra = {"labels": "labels", "histogram": "bins", "mean": "bounds"}[kind.value]
    allowed = {"kind", "value", "epsilon", "budget", "period_s", "mechanism", "delta", extra}
    for key in body:
        if key not in allowed:
            problems.append(
                Problem(where, f"unknown key {key!r}; a {kind} stream takes {sorted(allowed)}")
            )
    ref = INPUT_REF.match(str(body.get("value", "")))
    if ref is None:
        problems.append(
            Problem(where, "value must name an output stage's input, as stage or stage.N")
        )
        return None
    value = InputRef(ref.group(1), int(ref.group(2) or 0))
    epsilon = _number(body.get("epsilon"), where, "epsilon", problems)
    if epsilon is not None and not 0 < epsilon <= MAX_EPSILON:
        problems.append(Problem(where, f"epsilon must be in (0, {MAX_EPSILON:g}], not {epsilon:g}"))
    period = _number(body.get("period_s", DEFAULT_PERIOD_S), where, "period_s", problems)
    if period is not None and not MIN_PERIOD_S <= period <= MAX_PERIOD_S:
        problems.append(
            Problem(where, f"period_s must be from {MIN_PERIOD_S:g} to {MAX_PERIOD_S:g} seconds")
        )
    default_budget = (epsilon or 0.0) * DEFAULT_BUDGET_REPORTS
    budget = _number(body.get("budget", default_budget), where, "budget", problems)
    if budget is not None and epsilon is not None and budget < epsilon:
        problems.append(Problem(where, f"budget {budget:g} is less than one report's epsilon"))
    try:
        mechanism = Mechanism(body.get("mechanism", "laplace"))
    except ValueError:
        problems.append(Problem(where, "mechanism must be laplace or gaussian"))
        return None
    delta = 0.0
    if mechanism is Mechanism.GAUSSIAN:
        delta = _number(body.get("delta"), where, "delta", problems) or 0.0
        if not 0 < delta <= MAX_DELTA:
            problems.append(Problem(where, f"a gaussian stream needs delta in (0, {MAX_DELTA:g}]"))
    elif "delta" in body:
        problems.append(Problem(where, "delta is only for mechanism: gaussian"))
    labels: tuple[str, ...] = ()
    bins: tuple[float, ...] = ()
    bounds = (0.0, 0.0)
    if kind is StreamKind.LABELS:
        labels = _labels(body.get("labels"), where, problems)
    elif kind is StreamKind.HISTOGRAM:
        bins = _bins(body.get("bins"), where, problems)
    else:
        bounds = _bounds(body.get("bounds"), where, problems)
    if epsilon is None or budget is None or period is None:
        return None
    return StreamSpec(
        name, kind, value, epsilon, budget, period, mechanism, delta, labels, bins, bounds
    )


def _number(raw: object, where: str, key: str, problems: list[Problem]) -> float | None:
    if isinstance(raw, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        with contextlib.suppress(ValueError):
            raw = float(raw)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        problems.append(Problem(where, f"{key} must be a finite number, not {raw!r}"))
        return None
    return float(raw)


def _labels(raw: object, where: str, problems: list[Problem]) -> tuple[str, ...]:
    ok = isinstance(raw, list) and 1 <= len(raw) < MAX_KEYS
    if ok and isinstance(raw, list):
        ok = all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in raw)
        ok = ok and len(set(raw)) == len(raw) and OTHER not in raw
    if not ok or not isinstance(raw, list):
        problems.append(
            Problem(
                where,
                f"labels must list 1 to {MAX_KEYS - 1} distinct strings of up to "
                f"{MAX_LABEL_CHARS} characters (not {OTHER!r}, which counts everything else)",
            )
        )
        return ()
    return tuple(raw)


def _bins(raw: object, where: str, problems: list[Problem]) -> tuple[float, ...]:
    edges: list[float] = []
    items = raw if isinstance(raw, list) and 2 <= len(raw) <= MAX_KEYS + 1 else []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            break
        edges.append(float(x))
    if (
        len(edges) < 2
        or len(edges) != len(items)
        or any(a >= b for a, b in itertools.pairwise(edges))
    ):
        problems.append(
            Problem(where, f"bins must be 2 to {MAX_KEYS + 1} strictly increasing finite edges")
        )
        return ()
    return tuple(edges)


def _bounds(raw: object, where: str, problems: list[Problem]) -> tuple[float, float]:
    if (
        isinstance(raw, list)
        and len(raw) == 2
        and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in raw
        )
        and raw[0] < raw[1]
    ):
        return float(raw[0]), float(raw[1])
    problems.append(Problem(where, "bounds must be [low, high], finite, low below high"))
    return 0.0, 0.0


def _check_value(spec: StreamSpec, stages: dict[str, Stage], problems: list[Problem]) -> None:
    where = f"telemetry {spec.name}"
    outs = [s for s in stages.values() if s.kind is StageKind.OUT and spec.value in s.inputs]
    if not outs:
        problems.append(
            Problem(
                where,
                f"value {spec.value} is not an input of an out stage; only outputs "
                "can be aggregated",
            )
        )
        return
    source = stages.get(spec.value.stage)
    if source is None or spec.value.index >= len(source.outputs):
        problems.append(Problem(where, f"value {spec.value} names no stage output"))
        return
    element = source.outputs[spec.value.index].element.type_name
    if spec.kind is StreamKind.LABELS and element != "utf8":
        problems.append(Problem(where, f"a labels stream needs a UTF8 output, not {element}"))
    if spec.kind is not StreamKind.LABELS and element not in _NUMERIC:
        problems.append(
            Problem(where, f"a {spec.kind} stream needs a numeric output, not {element}")
        )
