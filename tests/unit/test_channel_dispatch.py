"""The broker link's concurrent dispatch on a real SQLite database: many devices' messages,
interleaved as a broker would deliver them, go through `BrokerLink.submit` and its workers, the
real `handle` path and real signed envelopes.

The broker is the only thing replaced: messages are submitted as the session would submit them,
and the outbox's `publish` records what it is handed.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from securesystemslib.signer import CryptoSigner, Key

from fleet.channel import BrokerLink, BrokerSettings, ChannelMetrics
from fleet.db import close_database, open_database
from fleet.db.models import Command, Device
from fleet.outbox import CommandChange, Outbox, Report
from ota.protocol import (
    COMMAND_TTL_S,
    CONTROLLER,
    Channel,
    Message,
    MessageType,
    seal_message,
    topic,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
COMMAND_SIGNER = CryptoSigner.generate_ed25519()
STEPS = ["received", "downloading", "verifying", "health-check", "installing", "succeeded"]


@dataclass
class FakeDevice:
    id: str
    signer: CryptoSigner
    command_id: str = ""
    status_seq: int = 0
    presence_seq: int = 0

    def seal(self, channel: Channel, type_: MessageType, body: dict[str, Any]) -> tuple[str, bytes]:
        if channel is Channel.PRESENCE:
            self.presence_seq += 1
            seq = self.presence_seq
        else:
            self.status_seq += 1
            seq = self.status_seq
        ts = NOW.timestamp()
        message = Message(self.id, CONTROLLER, seq, ts, ts + COMMAND_TTL_S, type_, body)
        return topic(self.id, channel), seal_message(message, self.signer)


class TrackedLink(BrokerLink):
    """Records how many messages are being handled at once, in all and per device."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight: Counter[str] = Counter()
        self.most_at_once = 0
        self.most_for_one_device = 0
        self.handled: list[str] = []

    async def handle_batch(self, items: Sequence[tuple[str, bytes, bool]]) -> list[Message]:
        devices = Counter(topic_name.split("/")[3] for topic_name, _, _ in items)
        self.in_flight.update(devices)
        self.most_at_once = max(self.most_at_once, sum(self.in_flight.values()))
        busy = [device for device in devices if self.in_flight[device] > devices[device]]
        self.most_for_one_device = max(self.most_for_one_device, 1 + len(busy))
        try:
            return await super().handle_batch(items)
        finally:
            self.in_flight.subtract(devices)
            self.handled += [topic_name for topic_name, _, _ in items]


@dataclass
class Fleet:
    link: TrackedLink
    outbox: Outbox
    registry: CollectorRegistry
    devices: list[FakeDevice]

    def total(self, name: str) -> float:
        return sum(
            sample.value
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == name
        )


async def _fleet(count: int, workers: int, queue_size: int) -> Fleet:
    devices = [
        FakeDevice(secrets.token_hex(8), CryptoSigner.generate_ed25519()) for _ in range(count)
    ]
    keys = {device.id: device.signer.public_key for device in devices}
    for device in devices:
        await Device.create(id=device.id, public_key=secrets.token_hex(32), state="enrolled")

    async def device_key(device_id: str) -> Key | None:
        return keys.get(device_id)

    outbox = Outbox(lambda: COMMAND_SIGNER, lambda: NOW)
    sent: list[str] = []

    async def publish(topic_name: str, _data: bytes) -> None:
        sent.append(topic_name)

    outbox.publish = publish
    for device in devices:
        command = await outbox.enqueue(device.id, MessageType.DEPLOY, {"rune": "sine"}, "test")
        device.command_id = command.id
    registry = CollectorRegistry()
    link = TrackedLink(
        BrokerSettings("mqtt://127.0.0.1:1"),
        outbox,
        device_key,
        ChannelMetrics(registry),
        lambda: NOW,
        workers=workers,
        queue_size=queue_size,
    )
    return Fleet(link, outbox, registry, devices)


def _deploy_messages(device: FakeDevice) -> list[tuple[str, bytes]]:
    """What one device sends during a deploy, in its order: presence, hello, six reports."""
    rune = {"ref": "old", "sha256": "0" * 64}
    messages = [
        device.seal(Channel.PRESENCE, MessageType.PRESENCE, {"online": True}),
        device.seal(
            Channel.STATUS,
            MessageType.HELLO,
            {"agent_version": "1.0", "active": rune, "results": [], "in_flight": None},
        ),
    ]
    for n, state in enumerate(STEPS):
        active = {"ref": f"{device.id}-{n}", "sha256": f"{n:064d}"}
        body = {"command_id": device.command_id, "state": state, "active": active}
        messages.append(device.seal(Channel.STATUS, MessageType.STATUS, body))
    messages.append(device.seal(Channel.PRESENCE, MessageType.PRESENCE, {"online": False}))
    return messages


def _interleave(streams: list[list[tuple[str, bytes]]], rng: random.Random) -> list[Any]:
    """One delivery order of all streams: random across streams, each stream in its own order."""
    pending = [list(reversed(stream)) for stream in streams if stream]
    order = []
    while pending:
        stream = rng.choice(pending)
        order.append(stream.pop())
        if not stream:
            pending.remove(stream)
    return order


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[None]:
    await open_database(f"sqlite://{tmp_path / 'fleet.sqlite3'}")
    try:
        yield
    finally:
        await close_database()


@pytest.mark.parametrize(("workers", "queue_size"), [(8, 256), (3, 1)])
async def test_interleaved_devices_are_each_handled_in_order(
    db: None, workers: int, queue_size: int
) -> None:
    fleet = await _fleet(40, workers, queue_size)
    streams = [_deploy_messages(device) for device in fleet.devices]
    try:
        for topic_name, data in _interleave(streams, random.Random(7)):
            await fleet.link.submit(topic_name, data)
        await fleet.link.drain()
    finally:
        await fleet.link.stop()

    total = sum(len(stream) for stream in streams)
    assert len(fleet.link.handled) == total
    assert fleet.total("fleet_messages_refused_total") == 0
    assert fleet.total("fleet_messages_duplicate_total") == 0
    assert fleet.total("fleet_messages_received_total") == total
    assert fleet.link.most_for_one_device == 1
    assert fleet.link.most_at_once > 1  # different devices' messages did overlap
    for device in fleet.devices:
        stored = await Device.get(id=device.id)
        last = len(STEPS) - 1
        assert (stored.status_seq, stored.presence_seq) == (device.status_seq, 2)
        assert (stored.active_rune, stored.active_sha256) == (f"{device.id}-{last}", f"{last:064d}")
        assert (stored.online, stored.agent_version, stored.last_seen_at) == (False, "1.0", NOW)
        assert stored.last_hello == {
            "agent_version": "1.0",
            "active": {"ref": "old", "sha256": "0" * 64},
            "results": [],
            "in_flight": None,
        }
        command = await Command.get(id=device.command_id)
        assert (command.state, command.finished_at) == ("succeeded", NOW)


async def test_duplicates_are_ignored_and_replays_refused_through_the_workers(db: None) -> None:
    fleet = await _fleet(2, 2, 4)
    one, other = fleet.devices
    first = one.seal(Channel.STATUS, MessageType.STATUS, {"state": "running", "active": None})
    second = one.seal(Channel.STATUS, MessageType.STATUS, {"state": "running"})
    spoofed = other.seal(Channel.STATUS, MessageType.STATUS, {"state": "running"})
    try:
        for topic_name, data in [first, second, second, first, (first[0], spoofed[1])]:
            await fleet.link.submit(topic_name, data)
        await fleet.link.drain()
    finally:
        await fleet.link.stop()

    assert fleet.total("fleet_messages_received_total") == 2
    assert fleet.total("fleet_messages_duplicate_total") == 1
    refused = fleet.registry.get_sample_value
    assert refused("fleet_messages_refused_total", {"kind": "replayed"}) == 1
    assert refused("fleet_messages_refused_total", {"kind": "spoofed"}) == 1
    stored = await Device.get(id=one.id)
    assert (stored.status_seq, stored.active_rune) == (2, None)
    assert (await Device.get(id=other.id)).status_seq == 0


async def test_a_late_command_report_still_ends_its_command(db: None) -> None:
    """Replicas split a device's messages: its report on a command can be handled after its next
    status was. The report still ends the command; nothing else of it is recorded; one too far
    back is a replay, refused, and changes nothing."""
    fleet = await _fleet(2, 2, 4)
    one, other = fleet.devices
    report = one.seal(
        Channel.STATUS,
        MessageType.STATUS,
        {"command_id": one.command_id, "state": "succeeded", "active": None},
    )
    newer = one.seal(Channel.STATUS, MessageType.STATUS, {"state": "running"})
    stale = other.seal(
        Channel.STATUS,
        MessageType.STATUS,
        {"command_id": other.command_id, "state": "failed", "reason": "old"},
    )
    other.status_seq += 100  # the device has said much more since
    current = other.seal(Channel.STATUS, MessageType.STATUS, {"state": "running"})
    try:
        for topic_name, data in [newer, report, current, stale]:
            await fleet.link.submit(topic_name, data)
        await fleet.link.drain()
    finally:
        await fleet.link.stop()

    command = await Command.get(id=one.command_id)
    assert command.state == "succeeded"
    assert (await Device.get(id=one.id)).status_seq == 2  # the late report did not move it back
    assert fleet.total("fleet_messages_late_reports_total") == 1
    refused = fleet.registry.get_sample_value
    assert refused("fleet_messages_refused_total", {"kind": "replayed"}) == 1
    assert (await Command.get(id=other.command_id)).state == "sent"


async def test_a_message_that_fails_to_be_handled_does_not_stop_its_worker(db: None) -> None:
    fleet = await _fleet(1, 1, 1)
    (device,) = fleet.devices
    failing = True

    async def report_many(reports: Sequence[Report]) -> list[CommandChange]:
        nonlocal failing
        if failing:
            failing = False
            raise RuntimeError("the database is away")
        return []

    fleet.outbox.report_many = report_many  # type: ignore[method-assign]
    body = {"command_id": device.command_id, "state": "received"}
    try:
        for _ in range(2):
            topic_name, data = device.seal(Channel.STATUS, MessageType.STATUS, body)
            await fleet.link.submit(topic_name, data)
        await fleet.link.drain()
    finally:
        await fleet.link.stop()

    assert fleet.total("fleet_messages_received_total") == 2
    assert (await Device.get(id=device.id)).status_seq == 2
