"""Take device telemetry reports in: verify, check, de-duplicate and store them.

Rules:
- A report is kept only if its envelope verifies with the key of the enrolled device whose topic
  it came on (`ota.protocol.open_message`: `unknown-sender`, `bad-signature`, `spoofed`,
  `wrong-audience`, `wrong-type`, `expired`...) and its body is an aggregate report
  (`ota.telemetry.check_report`: a field that could carry a sample, an unbounded array or a
  value without noise is `raw-data`). A refused report is counted
  (`fleet_telemetry_refused_total{kind}`), logged as a security event, and nothing of it is
  stored.
- A report is stored once per (device, seq), which the table enforces: a copy (QoS 1
  redelivery, a device re-sending after a lost acknowledgement, a replay by whoever recorded it)
  is counted as a duplicate and changes nothing, also when both copies are in one batch.
  Reports need not arrive in order: several workers may take one device's reports at once. A
  seq at or below the device's `telemetry_floor` (reports retention deleted) is refused as
  `replayed`.
- A batch is stored in one transaction: one multi-row `INSERT ... ON CONFLICT DO NOTHING
  RETURNING` for the reports, one statement for all their streams' values.
- Device keys are looked up through `device_key` and kept `KEY_CACHE_S` (a device removed or
  rejected is refused within that time); a message from a device not seen in that time costs one
  lookup.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from securesystemslib.signer import Key
from tortoise.transactions import in_transaction

from fleet.db import sql
from fleet.db.models import Device
from fleet.logs import log
from fleet.telemetry.metrics import TelemetryMetrics
from ota.protocol import CONTROLLER, Channel, Refusal, claimed_issuer, open_message, parse_topic
from ota.telemetry import Report, check_report

_REPORT_COLUMNS = (
    "device_id",
    "seq",
    "window_start",
    "window_end",
    "received_at",
    "active_rune",
    "ops",
    "paused",
)
_VALUE_COLUMNS = (
    "report_id",
    "device_id",
    "stream",
    "rune",
    "kind",
    "keys",
    "vector",
    "mechanism",
    "epsilon",
    "delta",
    "noise_std",
    "window_end",
)
_INSERT_VALUES = (
    f"INSERT INTO telemetry_value ({', '.join(_VALUE_COLUMNS)}) "  # noqa: S608
    f"VALUES ({sql.marks(len(_VALUE_COLUMNS))})"
)
_CHUNK = 100  # reports per INSERT: 8 values each, far below either database's parameter limit
KEY_CACHE_S = 60.0


@dataclass(frozen=True)
class Checked:
    device_id: str
    seq: int
    report: Report


@dataclass(frozen=True)
class BatchResult:
    stored: int
    duplicates: int
    refused: int


class TelemetryIngest:
    def __init__(
        self,
        device_key: Callable[[str], Awaitable[Key | None]],
        metrics: TelemetryMetrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.device_key = device_key
        self.metrics = metrics
        self.clock = clock
        self._keys: dict[str, tuple[float, Key | None]] = {}

    async def handle_batch(self, items: Sequence[tuple[str, bytes]]) -> BatchResult:
        """Check and store `(topic, data)` reports; refusals are counted, never raised."""
        checked: list[Checked] = []
        refused = 0
        for topic_name, data in items:
            item = await self._check(topic_name, data)
            if item is None:
                refused += 1
            else:
                checked.append(item)
        floors = await _floors({c.device_id for c in checked})
        fresh: list[Checked] = []
        in_batch: set[tuple[str, int]] = set()
        for item in checked:
            floor = floors.get(item.device_id, 0)
            if (item.device_id, item.seq) in in_batch:
                continue  # a copy within this batch: a duplicate, counted below
            in_batch.add((item.device_id, item.seq))
            if item.seq <= floor:
                refused += 1
                reason = f"seq {item.seq} is at or below {floor}, whose reports were deleted"
                self._refuse(Refusal("replayed", reason), item.device_id)
            else:
                fresh.append(item)
        stored = await self._store(fresh) if fresh else 0
        duplicates = (len(checked) - len(in_batch)) + (len(fresh) - stored)
        self.metrics.duplicates.inc(duplicates)
        return BatchResult(stored, duplicates, refused)

    async def _check(self, topic_name: str, data: bytes) -> Checked | None:
        parsed = parse_topic(topic_name)
        if parsed is None or parsed[1] is not Channel.TELEMETRY:
            self._refuse(Refusal("malformed", f"not a telemetry topic: {topic_name[:100]}"), None)
            return None
        device_id = parsed[0]
        await self._remember(device_id)
        for attempt in (1, 2):
            try:
                message = open_message(
                    data,
                    audience=CONTROLLER,
                    channel=Channel.TELEMETRY,
                    key_for=self._known,
                    last_seq=lambda _iss: 0,  # de-duplicated by (device, seq) when stored
                    now=self.clock().timestamp(),
                    topic_sender=device_id,
                )
                return Checked(device_id, message.seq, check_report(message.body))
            except Refusal as refusal:
                # Signed by a device other than the topic's, whose key is not cached yet: learn
                # it, so the message is refused for what it is (`spoofed`), not as unknown.
                claimed = claimed_issuer(data) if refusal.kind == "unknown-sender" else None
                other = claimed if claimed != device_id else None
                if attempt == 1 and other is not None and await self._remember(other):
                    continue
                self._refuse(refusal, device_id)
                return None
        return None

    async def _remember(self, device_id: str) -> bool:
        """Look `device_id`'s key up unless it is cached and fresh; whether it has one."""
        cached = self._keys.get(device_id)
        if cached is None or time.monotonic() - cached[0] > KEY_CACHE_S:
            cached = (time.monotonic(), await self.device_key(device_id))
            self._keys[device_id] = cached
        return cached[1] is not None

    def _known(self, device_id: str) -> Key | None:
        cached = self._keys.get(device_id)
        return None if cached is None else cached[1]

    async def _store(self, items: Sequence[Checked]) -> int:
        now = self.clock()
        stored = 0
        async with in_transaction():
            for chunk in sql.chunks(items, _CHUNK):
                rows = await sql.fetch(
                    f"INSERT INTO telemetry_report ({', '.join(_REPORT_COLUMNS)}) VALUES "  # noqa: S608
                    + ", ".join(f"({sql.marks(len(_REPORT_COLUMNS))})" for _ in chunk)
                    + " ON CONFLICT (device_id, seq) DO NOTHING RETURNING id, device_id, seq",
                    [value for item in chunk for value in _report_row(item, now)],
                )
                ids = {(row["device_id"], int(row["seq"])): int(row["id"]) for row in rows}
                values = []
                for item in chunk:
                    report_id = ids.get((item.device_id, item.seq))
                    if report_id is not None:
                        values += _value_rows(report_id, item)
                        self._count(item.report)
                await sql.execute_many(_INSERT_VALUES, values)
                stored += len(ids)
        self.metrics.reports.inc(stored)
        return stored

    def _count(self, report: Report) -> None:
        self.metrics.inferences.inc(int(report.ops["inferences"]))
        for kind, count in report.ops["sandbox_errors"].items():
            self.metrics.sandbox_errors.labels(kind).inc(count)

    def _refuse(self, refusal: Refusal, device_id: str | None) -> None:
        self.metrics.refused.labels(refusal.kind).inc()
        log(
            "security.telemetry_refused",
            kind=refusal.kind,
            device=device_id or "-",
            reason=str(refusal)[:300],
        )


async def _floors(device_ids: set[str]) -> dict[str, int]:
    if not device_ids:
        return {}
    floors: dict[str, int] = {}
    for chunk in sql.chunks(sorted(device_ids)):
        rows = await Device.filter(id__in=list(chunk)).values_list("id", "telemetry_floor")
        floors.update({str(device): int(floor) for device, floor in rows})
    return floors


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _report_row(item: Checked, now: datetime) -> list[Any]:
    report = item.report
    active = report.ops.get("active")
    return [
        item.device_id,
        item.seq,
        _time(report.window_start),
        _time(report.window_end),
        now,
        active["ref"] if isinstance(active, dict) else None,
        orjson.dumps(report.ops).decode(),
        orjson.dumps([{"stream": s, "reason": r} for s, r in report.paused]).decode(),
    ]


def _value_rows(report_id: int, item: Checked) -> list[list[Any]]:
    end = _time(item.report.window_end)
    return [
        [
            report_id,
            item.device_id,
            value.stream,
            value.rune,
            value.kind.value,
            orjson.dumps(value.keys).decode(),
            orjson.dumps(value.values).decode(),
            value.mechanism.value,
            value.epsilon,
            value.delta,
            value.noise_std,
            end,
        ]
        for value in item.report.streams
    ]
