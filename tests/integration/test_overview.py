"""The fleet overview and its gauges (`fleet.overview`) on a real database (SQLite, in this
process): each device counted once under each heading, an expired result as `expired`, the last
hour's security events from the audit log, and the same numbers on the gauges. (Rollouts in the
overview are checked with a real rollout, in tests/e2e/test_dashboard.py.)
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from prometheus_client import CollectorRegistry

from fleet.audit import Entry
from fleet.audit_log import AuditLog
from fleet.db.models import Device
from fleet.overview import FleetGauges, fleet_overview
from fleet.tuf_store import utcnow


async def _device(n: int, **fields: object) -> None:
    await Device.create(id=f"dev{n:08d}", public_key=f"{n:064x}", **fields)


async def test_the_overview_counts_each_device_once_per_heading(database: str) -> None:
    now = utcnow()
    fresh, old = now + timedelta(hours=1), now - timedelta(minutes=1)
    await _device(1, online=True, attestation_status="affirming", attestation_expires_at=fresh)
    await _device(2, online=True, attestation_status="affirming", attestation_expires_at=old)
    await _device(
        3, attestation_status="contraindicated", attestation_expires_at=fresh, quarantined_at=now
    )
    await _device(4, attestation_status="warning", attestation_expires_at=fresh)
    await _device(5)  # never attested
    await _device(6, state="pending")
    await _device(7, state="rejected", online=True)
    audit = AuditLog(secrets.token_bytes(32))
    audit.record(Entry(now, "device:dev00000003", "security.device_quarantined", "d", "q"))
    audit.record(Entry(now, "controller", "security.message_refused", "d", "refused"))
    audit.record(Entry(now, "controller", "security.message_refused", "d", "refused"))
    audit.record(Entry(now - timedelta(hours=2), "controller", "security.message_refused", "", ""))
    audit.record(Entry(now, "ops (operator)", "POST /api/v1/rollouts", "/", "ok"))
    await audit.flush()

    overview = await fleet_overview(now)
    devices = overview["devices"]
    assert devices["total"] == 7
    assert devices["by_state"] == {"enrolled": 5, "pending": 1, "rejected": 1}
    assert devices["online"] == 2  # the rejected device's flag does not count
    assert devices["quarantined"] == 1
    assert devices["attestation"] == {
        "affirming": 1, "warning": 1, "contraindicated": 1, "expired": 1, "none": 1,
    }  # fmt: skip
    assert overview["security_events"] == {
        "last_hour": 3, "by_event": {"device_quarantined": 1, "message_refused": 2}
    }  # fmt: skip
    assert overview["rollouts"] == []

    registry = CollectorRegistry()
    await FleetGauges(registry, lambda: now).update()
    value = registry.get_sample_value
    assert value("fleet_devices", {"state": "enrolled"}) == 5
    assert value("fleet_devices_online") == 2
    assert value("fleet_devices_in_quarantine") == 1
    assert value("fleet_devices_attestation", {"status": "expired"}) == 1
    assert value("fleet_devices_attestation", {"status": "none"}) == 1
