"""The command outbox on a real SQLite database and a simulated clock: when a command is sent
again, when it times out, and how a device's `hello` is reconciled.

The broker is the only thing replaced: `publish` records what the outbox hands it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from attestation.envelope import parse
from fleet.db import close_database, open_database
from fleet.db.models import Command, Device
from fleet.outbox import RESEND_AFTER, RESEND_MAX, Outbox, resend_interval
from ota.protocol import (
    COMMAND_TTL_S,
    MAX_MESSAGE_BYTES,
    PAYLOAD_TYPE,
    Channel,
    Message,
    MessageType,
    open_message,
    topic,
)

START = datetime(2030, 1, 1, tzinfo=UTC)
SIGNER = CryptoSigner.generate_ed25519()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class Fleet:
    def __init__(self) -> None:
        self.clock = Clock()
        self.outbox = Outbox(lambda: SIGNER, self.clock)
        self.sent: list[tuple[str, bytes]] = []

        async def publish(topic_name: str, data: bytes) -> None:
            self.sent.append((topic_name, data))

        self.outbox.publish = publish

    def opened(self, device_id: str) -> list[Message]:
        """Every envelope sent to `device_id`, verified as the device would (at its `iat`)."""
        messages = []
        for topic_name, data in self.sent:
            if topic_name != topic(device_id, Channel.CMD):
                continue
            claimed = Message.from_payload(
                parse(data, PAYLOAD_TYPE, MAX_MESSAGE_BYTES).untrusted_payload
            )
            messages.append(
                open_message(
                    data,
                    audience=device_id,
                    channel=Channel.CMD,
                    key_for=lambda _iss: SIGNER.public_key,
                    last_seq=lambda _iss: 0,
                    now=claimed.iat,
                )
            )
        return messages


async def _device() -> str:
    device_id = secrets.token_hex(8)
    await Device.create(id=device_id, public_key=secrets.token_hex(32), state="enrolled")
    return device_id


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    await open_database(f"sqlite://{tmp_path / 'fleet.sqlite3'}")
    try:
        yield Fleet()
    finally:
        await close_database()


def test_the_resend_interval_doubles_up_to_its_cap() -> None:
    intervals = [resend_interval(attempts) for attempts in range(1, 9)]
    assert intervals[0] == RESEND_AFTER
    assert intervals[1:5] == [RESEND_AFTER * 2**n for n in range(1, 5)]
    assert intervals[5:] == [RESEND_MAX] * 3


async def test_an_unacknowledged_command_is_sent_again_ever_less_often(fleet: Fleet) -> None:
    device_id = await _device()
    command = await fleet.outbox.enqueue(device_id, MessageType.PING, {}, "test")
    for _ in range(60):
        fleet.clock.now += timedelta(minutes=1)
        await fleet.outbox.resend_due()
    messages = fleet.opened(device_id)
    minutes = [round((m.iat - START.timestamp()) / 60) for m in messages]
    assert minutes == [0, 1, 2, 4, 8, 16, 26, 36, 46, 56]
    assert [m.seq for m in messages] == list(range(1, 11))
    assert all(m.exp - m.iat == COMMAND_TTL_S for m in messages)
    assert {m.body["command_id"] for m in messages} == {command.id}
    stored = await Command.get(id=command.id)
    assert (stored.state, stored.attempts, stored.last_seq) == ("sent", 10, 10)


async def test_a_command_past_its_deadline_times_out_and_is_not_sent(fleet: Fleet) -> None:
    device_id = await _device()
    command = await fleet.outbox.enqueue(
        device_id, MessageType.PING, {}, "test", deadline=timedelta(minutes=20)
    )
    last = fleet.opened(device_id)[0]
    assert last.exp == (START + timedelta(minutes=10)).timestamp()  # the TTL, not the deadline
    fleet.clock.now += timedelta(minutes=15)
    await fleet.outbox.resend_due()
    resent = fleet.opened(device_id)[-1]
    assert resent.exp == (START + timedelta(minutes=20)).timestamp()  # never past the deadline
    fleet.clock.now += timedelta(hours=1)
    await fleet.outbox.resend_due()
    stored = await Command.get(id=command.id)
    assert stored.state == "timed-out" and stored.finished_at == fleet.clock.now
    assert len(fleet.opened(device_id)) == 2
    # A device that reports afterwards changes nothing, and a hello gets nothing sent.
    assert not await fleet.outbox.report(device_id, command.id, "succeeded", "late")
    assert await fleet.outbox.reconcile(device_id, {"results": [], "in_flight": None}) == 0
    assert (await Command.get(id=command.id)).state == "timed-out"


async def test_a_hello_ends_reported_commands_and_gets_the_unknown_ones_sent_again(
    fleet: Fleet,
) -> None:
    device_id, other_id = await _device(), await _device()
    done, running, lost = [
        await fleet.outbox.enqueue(device_id, MessageType.PING, {}, "test") for _ in range(3)
    ]
    others = await fleet.outbox.enqueue(other_id, MessageType.PING, {}, "test")
    hello = {
        "results": [
            {"id": done.id, "state": "done", "reason": "pong"},
            {"id": others.id, "state": "done", "reason": "not mine"},
            {"id": "old-command", "state": "succeeded", "reason": ""},
        ],
        "in_flight": {"id": running.id, "state": "downloading"},
    }
    assert await fleet.outbox.reconcile(device_id, hello) == 1
    states = {c.id: c.state for c in await Command.all()}
    assert states == {
        done.id: "done",
        running.id: "downloading",
        lost.id: "sent",
        others.id: "sent",
    }
    assert [m.body["command_id"] for m in fleet.opened(device_id)[3:]] == [lost.id]
    # Once the device knows nothing of the one in flight either (it restarted), it is sent again.
    assert await fleet.outbox.reconcile(device_id, {"results": [], "in_flight": None}) == 2
    assert [m.body["command_id"] for m in fleet.opened(device_id)[4:]] == [running.id, lost.id]
    assert len(fleet.opened(other_id)) == 1
