"""Telemetry reports on the wire: what a device may say about its runes, and nothing more.

A report is a `telemetry` message on a device's `telemetry` topic (`ota.protocol`), signed by the
device and numbered in its own `seq` stream. Its body is checked here, field by field, by the
controller before anything of it is stored.

Rules:
- A body has exactly `window`, `ops`, `streams` and `paused`; every object in it has exactly
  the fields this module names, and any other field anywhere is refused (`raw-data`): there is no
  place in a report for a sample, an output or free text.
- `window` is `[start, end]`, end after start, at most `MAX_WINDOW_S` long.
- `ops` is operational state, never derived from a sensor value: agent version, uptime, the
  active rune, the deployment state, and the window's inference, failure and wait counts,
  sandbox errors by kind, latency percentiles, the agent's CPU seconds and memory, and how many
  reports the device dropped from its buffer. Counts are non-negative integers, strings are
  bounded, `sandbox_errors` has at most `MAX_ERROR_KINDS` kinds.
- Each entry of `streams` is one opted-in stream's noisy aggregate: the stream id
  (`RUNE/STREAM`), the rune reference, its kind, its keys (at most `MAX_KEYS`) and one finite
  value per key, and the mechanism with its epsilon, delta and the noise's standard deviation,
  which must be positive: a report without noise is raw data and is refused. At most
  `MAX_STREAMS` entries, each stream once.
- `paused` names streams the device stopped sending, and why (`budget`, `revoked`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ota.protocol import Refusal
from ota.rune.streams import MAX_DELTA, MAX_EPSILON, MAX_KEYS, MAX_STREAMS, Mechanism, StreamKind

FORMAT = "fleet-telemetry/1"
TELEMETRY_TTL_S = 7 * 86400.0
MAX_WINDOW_S = 86400.0
MAX_ERROR_KINDS = 16
MAX_KEY_CHARS = 80
PAUSE_REASONS = frozenset({"budget", "revoked"})
_STREAM_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}/[a-z][a-z0-9_]{0,31}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KIND = re.compile(r"^[a-z0-9_.-]{1,32}$")
_OPS_COUNTS = ("inferences", "failures", "waiting", "rss_bytes", "reports_dropped")
_OPS_FIELDS = frozenset(
    {"agent_version", "uptime_s", "active", "deployment", "sandbox_errors", "latency_ms", "cpu_s"}
    | set(_OPS_COUNTS)
)
_STREAM_FIELDS = frozenset(
    {"stream", "rune", "kind", "keys", "values", "mechanism", "epsilon", "delta", "noise_std"}
)


@dataclass(frozen=True)
class StreamValue:
    stream: str
    rune: str
    kind: StreamKind
    keys: tuple[str, ...]
    values: tuple[float, ...]
    mechanism: Mechanism
    epsilon: float
    delta: float
    noise_std: float

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "rune": self.rune,
            "kind": self.kind.value,
            "keys": list(self.keys),
            "values": list(self.values),
            "mechanism": self.mechanism.value,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "noise_std": self.noise_std,
        }


@dataclass(frozen=True)
class Report:
    window_start: float
    window_end: float
    ops: dict[str, Any]
    streams: tuple[StreamValue, ...]
    paused: tuple[tuple[str, str], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "window": [self.window_start, self.window_end],
            "ops": self.ops,
            "streams": [s.to_json() for s in self.streams],
            "paused": [{"stream": s, "reason": r} for s, r in self.paused],
        }


def check_report(body: Any) -> Report:
    """The report in a telemetry message's body if it follows every rule above; `Refusal`."""
    _exact(body, {"window", "ops", "streams", "paused"}, "the report")
    window = body["window"]
    if not (isinstance(window, list) and len(window) == 2 and all(_is_number(t) for t in window)):
        raise Refusal("malformed", "window must be [start, end] in seconds")
    start, end = float(window[0]), float(window[1])
    if not 0 < end - start <= MAX_WINDOW_S:
        raise Refusal(
            "malformed", f"a window ends after it starts and lasts at most {MAX_WINDOW_S:g} s"
        )
    ops = _ops(body["ops"])
    streams = body["streams"]
    if not isinstance(streams, list) or len(streams) > MAX_STREAMS:
        raise Refusal("raw-data", f"streams must be a list of at most {MAX_STREAMS} aggregates")
    values = tuple(_stream(entry) for entry in streams)
    if len({v.stream for v in values}) != len(values):
        raise Refusal("malformed", "a stream appears twice in one report")
    paused_raw = body["paused"]
    if not isinstance(paused_raw, list) or len(paused_raw) > MAX_STREAMS:
        raise Refusal("raw-data", f"paused must be a list of at most {MAX_STREAMS} streams")
    paused = []
    for entry in paused_raw:
        _exact(entry, {"stream", "reason"}, "a paused stream")
        if not _is_stream_id(entry["stream"]) or entry["reason"] not in PAUSE_REASONS:
            raise Refusal("malformed", "a paused stream names a stream id and budget or revoked")
        paused.append((str(entry["stream"]), str(entry["reason"])))
    return Report(start, end, ops, values, tuple(paused))


def _ops(raw: Any) -> dict[str, Any]:
    _exact(raw, _OPS_FIELDS, "ops")
    for name in _OPS_COUNTS:
        if not _is_count(raw[name]):
            raise Refusal("malformed", f"ops.{name} must be a non-negative integer")
    for name in ("uptime_s", "cpu_s"):
        if not _is_number(raw[name]) or raw[name] < 0:
            raise Refusal("malformed", f"ops.{name} must be a non-negative number")
    if not _is_text(raw["agent_version"], 32) or not _is_text(raw["deployment"], 32):
        raise Refusal("malformed", "ops.agent_version and ops.deployment are short strings")
    active = raw["active"]
    if active is not None:
        _exact(active, {"ref", "sha256"}, "ops.active")
        if not _is_text(active["ref"], 255) or not _SHA256.match(str(active["sha256"])):
            raise Refusal("malformed", "ops.active is a rune reference and its SHA-256")
    errors = raw["sandbox_errors"]
    if not isinstance(errors, dict) or len(errors) > MAX_ERROR_KINDS:
        raise Refusal(
            "raw-data", f"ops.sandbox_errors maps at most {MAX_ERROR_KINDS} kinds to counts"
        )
    if not all(_KIND.match(str(k)) and _is_count(v) for k, v in errors.items()):
        raise Refusal("malformed", "ops.sandbox_errors maps error kinds to counts")
    latency = raw["latency_ms"]
    _exact(latency, {"p50", "p95"}, "ops.latency_ms")
    if not all(v is None or (_is_number(v) and v >= 0) for v in latency.values()):
        raise Refusal("malformed", "ops.latency_ms percentiles are milliseconds or null")
    return dict(raw)


def _stream(raw: Any) -> StreamValue:
    _exact(raw, _STREAM_FIELDS, "a stream")
    if not _is_stream_id(raw["stream"]) or not _is_text(raw["rune"], 255):
        raise Refusal("malformed", "a stream names its id (RUNE/STREAM) and its rune")
    try:
        kind, mechanism = StreamKind(raw["kind"]), Mechanism(raw["mechanism"])
    except ValueError:
        raise Refusal("malformed", "a stream's kind or mechanism is unknown") from None
    keys, values = raw["keys"], raw["values"]
    if not isinstance(keys, list) or not isinstance(values, list):
        raise Refusal("raw-data", "a stream's keys and values are lists")
    if not 1 <= len(keys) <= MAX_KEYS or len(values) != len(keys):
        raise Refusal(
            "raw-data",
            f"a stream has 1 to {MAX_KEYS} keys and one value per key, not {len(values)}",
        )
    if not all(_is_text(k, MAX_KEY_CHARS) for k in keys) or len(set(keys)) != len(keys):
        raise Refusal("malformed", "a stream's keys are distinct short strings")
    if not all(_is_number(v) for v in values):
        raise Refusal("raw-data", "a stream's values are finite numbers")
    epsilon, delta, std = raw["epsilon"], raw["delta"], raw["noise_std"]
    if not (_is_number(epsilon) and 0 < epsilon <= MAX_EPSILON):
        raise Refusal("malformed", f"a stream's epsilon is in (0, {MAX_EPSILON:g}]")
    if not (_is_number(delta) and 0 <= delta <= MAX_DELTA):
        raise Refusal("malformed", f"a stream's delta is in [0, {MAX_DELTA:g}]")
    if not (_is_number(std) and std > 0):
        raise Refusal("raw-data", "a stream without noise (noise_std must be positive) is raw data")
    return StreamValue(
        str(raw["stream"]),
        str(raw["rune"]),
        kind,
        tuple(str(k) for k in keys),
        tuple(float(v) for v in values),
        mechanism,
        float(epsilon),
        float(delta),
        float(std),
    )


def _exact(raw: Any, fields: frozenset[str] | set[str], what: str) -> None:
    if type(raw) is not dict:
        raise Refusal("malformed", f"{what} must be an object")
    if raw.keys() == fields:
        return
    unexpected = sorted(set(raw) - fields)
    if unexpected:
        raise Refusal(
            "raw-data",
            f"{what} has unexpected field(s) {_names(unexpected)}: reports carry aggregates only",
        )
    missing = sorted(fields - set(raw))
    if missing:
        raise Refusal("malformed", f"{what} lacks {', '.join(missing)}")


def _names(fields: list[str]) -> str:
    return ", ".join(repr(str(name)[:40]) for name in fields[:5])


# `type(x) is ...` rather than isinstance: JSON gives exactly these types, bool is not a number
# here, and this runs for every value of every report.
def _is_number(value: Any) -> bool:
    kind = type(value)
    return kind is int or (kind is float and math.isfinite(value))


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_text(value: Any, limit: int) -> bool:
    return type(value) is str and 0 < len(value) <= limit


def _is_stream_id(value: Any) -> bool:
    return isinstance(value, str) and _STREAM_ID.match(value) is not None
