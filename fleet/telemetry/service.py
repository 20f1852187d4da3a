"""Telemetry in the running controller: ingest, retention, and the fleet-level gauges.

Rules:
- With `ingest` on (the default), the controller's broker link hands it every device's reports;
  off, the link does not subscribe to them and `fleetctl telemetry ingest` workers take them.
- Retention: every `RETENTION_CHECK_S` (and at start) reports whose window ended more than
  `retention_s` ago are deleted with their values, in one transaction that first raises each
  device's `telemetry_floor` to the highest seq deleted, so a copy of a deleted report arriving
  later is refused as a replay instead of being stored again.
- Every `GAUGES_S` the `fleet_telemetry_stream_*` gauges are set to each stream's fleet aggregate
  over the last hour (streams with no report in that hour disappear from them).
- A failure of either loop is logged and retried at its next turn; it never stops the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from securesystemslib.signer import Key
from tortoise.transactions import in_transaction

from fleet.db import sql
from fleet.db.models import TelemetryReport, TelemetryValue
from fleet.logs import log
from fleet.telemetry.consumer import TelemetryQueue
from fleet.telemetry.ingest import TelemetryIngest
from fleet.telemetry.metrics import TelemetryMetrics
from fleet.telemetry.store import list_streams, stream_aggregate

DEFAULT_RETENTION_S = 30 * 86400.0
MIN_RETENTION_S = 3600.0
RETENTION_CHECK_S = 3600.0
GAUGES_S = 60.0
GAUGE_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class TelemetryOptions:
    ingest: bool = True
    retention_s: float = DEFAULT_RETENTION_S

    def __post_init__(self) -> None:
        if self.retention_s < MIN_RETENTION_S:
            raise ValueError(
                f"telemetry retention must be at least {MIN_RETENTION_S / 3600:g} h, not "
                f"{self.retention_s:g} s"
            )


class TelemetryService:
    def __init__(
        self,
        options: TelemetryOptions,
        device_key: Callable[[str], Awaitable[Key | None]],
        metrics: TelemetryMetrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.options = options
        self.metrics = metrics
        self.clock = clock
        self.ingest = TelemetryIngest(device_key, metrics, clock)
        self.queue = TelemetryQueue(self.ingest) if options.ingest else None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(
                self._every(RETENTION_CHECK_S, self.purge), name="telemetry-retention"
            ),
            asyncio.create_task(self._every(GAUGES_S, self.update_gauges), name="telemetry-gauges"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.queue is not None:
            await self.queue.stop()

    async def purge(self) -> int:
        """Delete what retention ended; how many reports were deleted."""
        cutoff = self.clock() - timedelta(seconds=self.options.retention_s)
        async with in_transaction():
            highest = await sql.fetch(
                "SELECT device_id, MAX(seq) AS seq FROM telemetry_report "
                "WHERE window_end < ? GROUP BY device_id",
                [cutoff],
            )
            for row in highest:
                await sql.fetch(
                    "UPDATE device SET telemetry_floor = ? "
                    "WHERE id = ? AND telemetry_floor < ? RETURNING id",
                    [int(row["seq"]), row["device_id"], int(row["seq"])],
                )
            await TelemetryValue.filter(window_end__lt=cutoff).delete()
            deleted = await TelemetryReport.filter(window_end__lt=cutoff).delete()
        if deleted:
            log("telemetry.purged", reports=deleted, before=cutoff.isoformat())
        return int(deleted)

    async def update_gauges(self) -> None:
        since = self.clock() - GAUGE_WINDOW
        streams = await list_streams(since)
        answers = [await stream_aggregate(s["stream"], since) for s in streams]
        self.metrics.stream_value.clear()
        self.metrics.stream_error.clear()
        self.metrics.stream_reports.clear()
        for answer in answers:
            aggregate = answer["aggregate"]
            self.metrics.stream_reports.labels(answer["stream"]).set(aggregate["reports"])
            if aggregate["value"] is None:
                continue
            for key, value, error in zip(
                aggregate["keys"], aggregate["value"], aggregate["error"], strict=True
            ):
                self.metrics.stream_value.labels(answer["stream"], key).set(value)
                self.metrics.stream_error.labels(answer["stream"], key).set(error)

    async def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await job()
            except Exception as exc:
                log("telemetry.job_failed", job=getattr(job, "__name__", "?"), error=repr(exc))
            await asyncio.sleep(seconds)
