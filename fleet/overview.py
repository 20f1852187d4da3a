"""The fleet at a glance: devices by state, presence, attestation and quarantine; security events
of the last hour; rollouts not finished. The dashboard's first page and the fleet-level gauges
read it.

Rules:
- Counts come from a handful of `GROUP BY` queries, never by loading every device, so the
  overview of a large fleet costs the same few statements as that of a small one.
- A device's attestation is what its last result says (`affirming`, `warning`,
  `contraindicated`), `expired` once that result is past its expiry, and `none` before its first
  result. Quarantine is counted apart from it (a quarantined device also has a status).
- Online counts enrolled devices whose last presence said so; it is only as good as the broker
  link (`fleet.channel`).
- Security events are the audit log's `security.*` records (`fleet.audit_log`) of the last hour,
  by event.
- `FleetGauges` sets `fleet_devices{state}`, `fleet_devices_online`,
  `fleet_devices_attestation{status}` and `fleet_devices_in_quarantine` from it every `GAUGES_S`,
  for Prometheus and its alerts (`deploy/prometheus/`). Never a device id in a label.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from fleet.db import sql
from fleet.db.models import Rollout as RolloutRow
from fleet.logs import log
from fleet.rollout_service import load_machine, rollout_json
from fleet.rollouts import FINISHED

ATTESTATION_STATUSES = ("affirming", "warning", "contraindicated", "expired", "none")
DEVICE_STATES = ("enrolled", "pending", "rejected")
SECURITY_WINDOW = timedelta(hours=1)
GAUGES_S = 30.0


async def device_counts(now: datetime) -> dict[str, Any]:
    """Devices by state, online, by attestation status and quarantined (see the rules)."""
    by_state = {state: 0 for state in DEVICE_STATES}
    for row in await sql.fetch("SELECT state, COUNT(*) AS n FROM device GROUP BY state", []):
        by_state[str(row["state"])] = int(row["n"])
    rows = await sql.fetch(
        "SELECT "
        "SUM(CASE WHEN online THEN 1 ELSE 0 END) AS online, "
        "SUM(CASE WHEN quarantined_at IS NOT NULL THEN 1 ELSE 0 END) AS quarantined, "
        "SUM(CASE WHEN attestation_status IS NULL THEN 1 ELSE 0 END) AS none, "
        "SUM(CASE WHEN attestation_status IS NOT NULL AND attestation_expires_at < ? "
        "THEN 1 ELSE 0 END) AS expired "
        "FROM device WHERE state = 'enrolled'",
        [now],
    )
    totals = rows[0] if rows else {}
    attestation = {status: 0 for status in ATTESTATION_STATUSES}
    for row in await sql.fetch(
        "SELECT attestation_status AS status, COUNT(*) AS n FROM device "
        "WHERE state = 'enrolled' AND attestation_status IS NOT NULL "
        "AND attestation_expires_at >= ? GROUP BY attestation_status",
        [now],
    ):
        attestation[str(row["status"])] = int(row["n"])
    attestation["expired"] = int(totals.get("expired") or 0)
    attestation["none"] = int(totals.get("none") or 0)
    return {
        "total": sum(by_state.values()),
        "by_state": by_state,
        "online": int(totals.get("online") or 0),
        "quarantined": int(totals.get("quarantined") or 0),
        "attestation": attestation,
    }


async def security_events(now: datetime) -> dict[str, Any]:
    rows = await sql.fetch(
        "SELECT action, COUNT(*) AS n FROM audit_record "
        "WHERE action LIKE 'security.%' AND at >= ? GROUP BY action",
        [now - SECURITY_WINDOW],
    )
    by_event = {str(row["action"]).removeprefix("security."): int(row["n"]) for row in rows}
    return {"last_hour": sum(by_event.values()), "by_event": dict(sorted(by_event.items()))}


async def active_rollouts(now: datetime) -> list[dict[str, Any]]:
    """Rollouts not finished (scheduled, running, paused), newest first, with device counts."""
    rows = await RolloutRow.exclude(state__in=[s.value for s in FINISHED]).order_by("-created_at")
    rollouts = []
    for row in rows:
        full = rollout_json(row, load_machine(row), now)
        rollouts.append(
            {key: full[key] for key in ("id", "rune", "state", "reason", "selected", "counts")}
            | {"waves_planned": full["waves_planned"], "waves_started": len(full["waves"])}
        )
    return rollouts


async def fleet_overview(now: datetime) -> dict[str, Any]:
    return {
        "at": now.timestamp(),
        "devices": await device_counts(now),
        "security_events": await security_events(now),
        "rollouts": await active_rollouts(now),
    }


class FleetGauges:
    def __init__(self, registry: CollectorRegistry, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self.devices = Gauge("fleet_devices", "Devices by state", ["state"], registry=registry)
        self.online = Gauge(
            "fleet_devices_online", "Enrolled devices whose last presence was online",
            registry=registry,
        )  # fmt: skip
        self.attestation = Gauge(
            "fleet_devices_attestation",
            "Enrolled devices by their last attestation result (expired: past its expiry; "
            "none: never attested)",
            ["status"],
            registry=registry,
        )
        self.quarantined = Gauge(
            "fleet_devices_in_quarantine", "Devices in quarantine now", registry=registry
        )
        self._task: asyncio.Task[None] | None = None

    async def update(self) -> None:
        counts = await device_counts(self.clock())
        for state, count in counts["by_state"].items():
            self.devices.labels(state).set(count)
        self.online.set(counts["online"])
        for status, count in counts["attestation"].items():
            self.attestation.labels(status).set(count)
        self.quarantined.set(counts["quarantined"])

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fleet-gauges")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.update()
            except Exception as exc:
                log("fleet.gauges_failed", error=repr(exc))
            await asyncio.sleep(GAUGES_S)
