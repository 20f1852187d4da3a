"""Telemetry's storage on a real database (SQLite, in this process): real
signed reports through `TelemetryIngest`, then the queries, retention and the gauges.

- Aggregates filter by rune version and by labels, and never mix other streams in.
- A report and its copy in one batch are stored once, values included.
- Retention deletes what is older than its window with its values, raises each device's floor,
  and a copy of a deleted report that arrives later is refused as a replay, not stored again.
- The gauges on /metrics carry the last hour's fleet aggregate per stream and key.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from attestation.identity import DeviceIdentity
from attestation.keys import raw_public_bytes
from fleet.db.models import Device, TelemetryReport, TelemetryValue
from fleet.telemetry.consumer import enrolled_key
from fleet.telemetry.metrics import TelemetryMetrics
from fleet.telemetry.service import TelemetryOptions, TelemetryService
from fleet.telemetry.store import stream_aggregate
from ota.protocol import CONTROLLER, Channel, Message, MessageType, seal_message, topic
from ota.rune.streams import Mechanism, StreamKind
from ota.telemetry import Report, StreamValue

OPS = {
    "agent_version": "0.1.0",
    "uptime_s": 1.0,
    "active": None,
    "deployment": "idle",
    "inferences": 3,
    "failures": 0,
    "waiting": 0,
    "sandbox_errors": {"limit-exceeded": 2},
    "latency_ms": {"p50": None, "p95": None},
    "cpu_s": 0.0,
    "rss_bytes": 1,
    "reports_dropped": 0,
}


def _signed(identity: DeviceIdentity, seq: int, end: float, rune: str, value: float) -> bytes:
    stream = StreamValue(
        "sine/sine_mean", rune, StreamKind.MEAN, ("mean",), (value,), Mechanism.LAPLACE,
        1.0, 0.0, 0.5,
    )  # fmt: skip
    body = Report(end - 60, end, OPS, (stream,), ()).to_json()
    now = time.time()
    message = Message(
        identity.device_id, CONTROLLER, seq, now, now + 600, MessageType.TELEMETRY, body
    )
    return seal_message(message, identity.signer)


async def test_retention_deletes_old_reports_and_refuses_their_replay(
    database: str, tmp_path: Path
) -> None:
    devices = []
    for n, site in enumerate(("lab", "lab", "field")):
        identity = DeviceIdentity.load_or_create(tmp_path / f"d{n}")
        await Device.create(
            id=identity.device_id,
            public_key=raw_public_bytes(identity.public_key).hex(),
            labels={"site": site},
        )
        devices.append(identity)
    now = datetime.now(UTC)
    day = 86400.0
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry)
    service = TelemetryService(
        TelemetryOptions(ingest=False, retention_s=2 * day), enrolled_key, metrics, lambda: now
    )
    old = now.timestamp() - 3 * day
    recent = now.timestamp() - 600
    items = []
    for n, identity in enumerate(devices):
        name = topic(identity.device_id, Channel.TELEMETRY)
        items.append((name, _signed(identity, 1, old, "default/sine@0.1.0", 0.9)))
        items.append((name, _signed(identity, 2, recent, "default/sine@0.2.0", 0.1 * n)))
    result = await service.ingest.handle_batch(items)
    assert (result.stored, result.duplicates, result.refused) == (6, 0, 0)
    # Fleet-level operational counts.
    assert registry.get_sample_value("fleet_telemetry_inferences_total") == 18
    errors = {"kind": "limit-exceeded"}
    assert registry.get_sample_value("fleet_telemetry_sandbox_errors_total", errors) == 12

    since = now - timedelta(days=7)
    everything = (await stream_aggregate("sine/sine_mean", since))["aggregate"]
    assert (everything["reports"], everything["devices"]) == (6, 3)
    newer = await stream_aggregate("sine/sine_mean", since, rune="default/sine@0.2.0")
    assert newer["aggregate"]["value"] == pytest.approx([0.1])  # (0 + 0.1 + 0.2) / 3
    lab = await stream_aggregate("sine/sine_mean", since, labels={"site": "lab"})
    assert lab["aggregate"]["devices"] == 2 and lab["aggregate"]["reports"] == 4
    other = await stream_aggregate("sine/other", since)
    assert other["aggregate"]["value"] is None

    assert await service.purge() == 3
    assert await TelemetryReport.all().count() == 3
    assert await TelemetryValue.all().count() == 3
    floors = await Device.all().values_list("telemetry_floor", flat=True)
    assert sorted(floors) == [1, 1, 1]
    # The deleted reports arriving again are replays; the kept ones duplicates.
    again = await service.ingest.handle_batch(items)
    assert (again.stored, again.duplicates, again.refused) == (0, 3, 3)
    assert await TelemetryReport.all().count() == 3

    await service.update_gauges()
    key = {"stream": "sine/sine_mean", "key": "mean"}
    assert registry.get_sample_value("fleet_telemetry_stream_value", key) == pytest.approx(0.1)
    assert registry.get_sample_value("fleet_telemetry_stream_error", key) > 0
    reports = {"stream": "sine/sine_mean"}
    assert registry.get_sample_value("fleet_telemetry_stream_reports", reports) == 3


async def test_a_report_and_its_copy_in_one_batch_are_stored_once(
    database: str, tmp_path: Path
) -> None:
    identity = DeviceIdentity.load_or_create(tmp_path / "d")
    await Device.create(
        id=identity.device_id, public_key=raw_public_bytes(identity.public_key).hex(), labels={}
    )
    now = datetime.now(UTC)
    service = TelemetryService(
        TelemetryOptions(ingest=False),
        enrolled_key,
        TelemetryMetrics(CollectorRegistry()),
        lambda: now,
    )
    report = (
        topic(identity.device_id, Channel.TELEMETRY),
        _signed(identity, 7, now.timestamp(), "default/sine@0.1.0", 0.5),
    )
    result = await service.ingest.handle_batch([report, report, report])
    assert (result.stored, result.duplicates, result.refused) == (1, 2, 0)
    assert await TelemetryReport.all().count() == 1
    assert await TelemetryValue.all().count() == 1
