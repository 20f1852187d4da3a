"""What the API asks of stored telemetry: the streams seen, and fleet aggregates of one.

Rules:
- Only stored noisy aggregates are read (`telemetry_value`); the answer is always a fleet (or
  rollout, rune, label, wave) aggregate from `fleet.telemetry.aggregate`, never one device's
  values: the API has no per-device stream query.
- Filters combine: `since` (reports whose window ended since then), `rune` (the full reference
  `org/name@version` the device reported the stream for), `labels` (devices whose labels hold
  every `k=v`), `rollout` (the devices the rollout drew, reports for its rune since it started).
  With `rollout`, the answer also has one aggregate per wave (the canary first), so an operator
  can compare the canary's behaviour with the rest.
- `stream_series` is the same fleet aggregate per period of time, for the dashboard's charts.
- A group with no report gets no aggregate (`value` null), only its counts. A group of one device
  (a canary of one) gets that device's noisy reports averaged: each was made differentially
  private on the device, so that is no more than the device chose to send.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from fleet.db.models import Device, Rollout, RolloutDevice, TelemetryValue
from fleet.telemetry.aggregate import Entry, combine

MAX_ROWS = 200_000


class TelemetryQueryError(ValueError):
    """A query that names something that does not exist (a rollout); the API's 404."""


async def list_streams(since: datetime) -> list[dict[str, Any]]:
    rows = await TelemetryValue.filter(window_end__gte=since).values(
        "stream", "kind", "device_id", "rune", "window_end"
    )
    streams: dict[str, dict[str, Any]] = {}
    devices: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        entry = streams.setdefault(
            row["stream"],
            {"stream": row["stream"], "kind": row["kind"], "reports": 0, "runes": set()},
        )
        entry["reports"] += 1
        entry["runes"].add(row["rune"])
        last = row["window_end"].timestamp()
        entry["last_window_end"] = max(entry.get("last_window_end", last), last)
        devices[row["stream"]].add(row["device_id"])
    result = []
    for stream, entry in sorted(streams.items()):
        result.append(entry | {"runes": sorted(entry["runes"]), "devices": len(devices[stream])})
    return result


async def stream_aggregate(
    stream: str,
    since: datetime,
    *,
    rune: str | None = None,
    labels: dict[str, str] | None = None,
    rollout: str | None = None,
) -> dict[str, Any]:
    waves: dict[str, int] | None = None
    if rollout is not None:
        row = await Rollout.get_or_none(id=rollout)
        if row is None:
            raise TelemetryQueryError(f"no rollout {rollout}")
        rune = f"{row.org}/{row.rune_name}@{row.rune_version}"
        since = max(since, row.started_at or row.created_at)
        drawn = await RolloutDevice.filter(rollout_id=rollout, wave__not_isnull=True).values_list(
            "device_id", "wave"
        )
        waves = {str(device): int(wave) for device, wave in drawn}
    devices = None if waves is None else set(waves)
    if labels:
        devices = _intersect(devices, await _labelled(labels))
    entries = await _entries(stream, since, rune, devices)
    answer: dict[str, Any] = {
        "stream": stream,
        "since": since.timestamp(),
        "rune": rune,
        "labels": labels or {},
        "rollout": rollout,
        "aggregate": _summary(entries),
    }
    if waves is not None:
        by_wave: dict[int, list[Entry]] = defaultdict(list)
        for entry in entries:
            by_wave[waves[entry.device_id]].append(entry)
        sizes: dict[int, int] = defaultdict(int)
        for wave in waves.values():
            sizes[wave] += 1
        answer["waves"] = [
            {"wave": wave, "devices_drawn": sizes[wave], "aggregate": _summary(by_wave[wave])}
            for wave in sorted(sizes)
        ]
    return answer


async def stream_series(
    stream: str, since: datetime, until: datetime, buckets: int
) -> list[dict[str, Any]]:
    """The fleet aggregate of `stream` in each of `buckets` equal periods from `since` to
    `until` (by the reports' window end), oldest first; a period with no report has none."""
    if buckets < 1 or until <= since:
        return []
    start, step = since.timestamp(), (until - since).total_seconds() / buckets
    grouped: dict[int, list[Entry]] = defaultdict(list)
    for entry in await _entries(stream, since, None, None):
        index = min(int((entry.window_end - start) // step), buckets - 1)
        grouped[index].append(entry)
    return [
        {"until": start + step * (index + 1), "aggregate": _summary(grouped[index])}
        for index in sorted(grouped)
    ]


def _summary(entries: list[Entry]) -> dict[str, Any]:
    aggregate = combine(entries)
    if aggregate is None:
        return {"reports": 0, "devices": 0, "value": None}
    return aggregate.to_json()


async def _entries(
    stream: str, since: datetime, rune: str | None, devices: set[str] | None
) -> list[Entry]:
    if devices is not None and not devices:
        return []
    query = TelemetryValue.filter(stream=stream, window_end__gte=since)
    if rune is not None:
        query = query.filter(rune=rune)
    rows = (
        await query.order_by("-window_end")
        .limit(MAX_ROWS)
        .values("device_id", "keys", "vector", "noise_std", "window_end", "epsilon")
    )
    return [
        Entry(
            row["device_id"],
            tuple(row["keys"]),
            tuple(float(v) for v in row["vector"]),
            float(row["noise_std"]),
            row["window_end"].timestamp(),
            float(row["epsilon"]),
        )
        for row in rows
        if devices is None or row["device_id"] in devices
    ]


async def _labelled(labels: dict[str, str]) -> set[str]:
    rows = await Device.all().values_list("id", "labels")
    return {
        str(device)
        for device, held in rows
        if isinstance(held, dict) and all(held.get(k) == v for k, v in labels.items())
    }


def _intersect(devices: set[str] | None, others: set[str]) -> set[str]:
    return others if devices is None else devices & others
