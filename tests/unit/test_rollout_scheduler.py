"""The rollout scheduler and service in-process, on a real SQLite database: the command-state
mapping, idempotent enqueueing by command id, and recovery after a scheduler dies.

The broker is the only thing replaced: `publish` records what the outbox hands it, and the tests
report on the devices' behalf through `Outbox.report`, as the broker link does.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

from fleet import rollout_service
from fleet.db import close_database, open_database
from fleet.db.models import Command, Device, Rune
from fleet.db.models import Rollout as RolloutRow
from fleet.outbox import Outbox
from fleet.rollout_service import device_state, parse_command_id, rollback_result
from fleet.rollouts import DeviceState
from fleet.scheduler import Scheduler
from fleet.tuf_store import utcnow
from ota.protocol import MessageType

SIGNER = CryptoSigner.generate_ed25519()


class Fleet:
    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.outbox = Outbox(lambda: SIGNER, utcnow)
        self.published: list[str] = []

        async def publish(topic_name: str, data: bytes) -> None:
            self.published.append(topic_name)

        self.outbox.publish = publish


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    url = f"sqlite://{tmp_path / 'fleet.sqlite3'}"
    await open_database(url)
    try:
        yield Fleet(url)
    finally:
        await close_database()


async def _device(online: bool = True, attestation: str | None = "affirming", **labels: str) -> str:
    """An enrolled device; attested `attestation` a minute ago (None: never), fresh for an hour."""
    device_id = "d" + secrets.token_hex(16)
    now = utcnow()
    await Device.create(
        id=device_id,
        public_key=secrets.token_hex(32),
        state="enrolled",
        labels=labels,
        online=online,
        active_rune="default/app@0.9.0",
        attestation_status=attestation,
        attested_at=now - timedelta(minutes=1) if attestation else None,
        attestation_expires_at=now + timedelta(hours=1) if attestation else None,
    )
    return device_id


async def _rune(name: str, version: str) -> None:
    await Rune.create(
        org="default",
        name=name,
        version=version,
        kind="legacy",
        sha256="0" * 64,
        size=1,
        capabilities=[],
        min_agent_version="0",
        description={},
        target_path=f"default/{name}/{version}/{name}.rune",
        pushed_by="test",
    )


async def _until(condition: Callable[[], Any], timeout: float = 20) -> Any:
    for _ in range(int(timeout / 0.02)):
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_command_states_map_to_device_states_as_the_contract_says() -> None:
    expected = {
        "queued": "notified",
        "sent": "notified",
        "received": "notified",
        "downloading": "downloading",
        "verifying": "verifying",
        "installing": "installing",
        "health-check": "health-check",
        "succeeded": "succeeded",
        "failed": "failed",
        "refused": "failed",
        "rolled-back": "rolled-back",
        "timed-out": "timed-out",
    }
    assert {state: device_state(state) for state in expected} == {
        state: DeviceState(value) for state, value in expected.items()
    }
    assert device_state("done") is None
    assert [rollback_result(s) for s in ("succeeded", "done", "failed", "timed-out", "sent")] == [
        True,
        True,
        False,
        False,
        None,
    ]
    assert parse_command_id("r-ab12.dxyz.3") == ("r-ab12", "dxyz", 3)
    assert parse_command_id("r-ab12.dxyz.rollback") == ("r-ab12", "dxyz", None)
    assert parse_command_id("0123456789abcdef") is None
    assert parse_command_id("r-ab12.dxyz.x") is None


async def test_enqueue_with_a_command_id_returns_the_existing_command(fleet: Fleet) -> None:
    device_id = await _device()
    first = await fleet.outbox.enqueue(
        device_id, MessageType.PING, {}, "test", command_id="r-1.x.1"
    )
    again = await fleet.outbox.enqueue(
        device_id, MessageType.PING, {}, "test", command_id="r-1.x.1"
    )
    assert again.id == first.id == "r-1.x.1"
    assert await Command.filter(device_id=device_id).count() == 1
    assert len(fleet.published) == 1  # sent once, not again
    unsent = await fleet.outbox.enqueue(
        device_id, MessageType.PING, {}, "test", command_id="r-1.x.2", send=False
    )
    assert unsent.state == "queued" and len(fleet.published) == 1


async def test_a_scheduler_that_dies_is_resumed_without_losing_reports_or_notifying_twice(
    fleet: Fleet,
) -> None:
    await _rune("app", "1.0.0")
    online = [await _device(suite="recover", model=m) for m in ("a", "a", "b", "b")]
    offline = await _device(online=False, suite="recover", model="a")
    created = await rollout_service.create(
        {"rune": "app@1.0.0", "selector": {"suite": "recover"}, "waves": "1,100%", "soak": "0"},
        "test",
        utcnow(),
    )
    rid = created["id"]
    as_created = await RolloutRow.get(id=rid)

    async def commands() -> list[Command]:
        return list(await Command.filter(id__startswith=f"{rid}.").order_by("id"))

    first = Scheduler(fleet.outbox, utcnow, fleet.db_url)
    first.start()

    # The first command: the canary's (or, when the offline device was drawn as the canary and
    # skipped, one of the second wave's).
    async def sent() -> list[Command]:
        return [c for c in await commands() if c.state == "sent"]

    canary = (await _until(sent))[0]
    assert canary.id.endswith(".1") and canary.body["version"] == "1.0.0"
    await fleet.outbox.report(canary.device_id, canary.id, "downloading", "")
    await fleet.outbox.report(canary.device_id, canary.id, "succeeded", "")

    async def wave_two() -> list[Command]:
        found = await commands()
        sent = len(found) == len(online) and all(c.state != "queued" for c in found)
        return found if sent else []

    notified = await _until(wave_two)
    await first.stop()
    # Reports that arrive while no scheduler runs...
    for command in notified:
        if command.id != canary.id:
            await fleet.outbox.report(command.device_id, command.id, "succeeded", "")
    # ...and a crash that recorded none of the scheduler's work: the row is as created, while
    # every command it enqueued exists.
    await RolloutRow.filter(id=rid).update(machine=as_created.machine, version=100)

    second = Scheduler(fleet.outbox, utcnow, fleet.db_url)
    second.start()
    try:

        async def completed() -> dict[str, Any] | None:
            shown = await rollout_service.show(rid, utcnow())
            return shown if shown["state"] == "completed" else None

        done = await _until(completed)
    finally:
        await second.stop()
    assert done["counts"]["succeeded"] == 4 and done["counts"]["skipped"] == 1, done
    final = await commands()
    assert sorted(c.device_id for c in final) == sorted(online)
    assert all(c.id.endswith(".1") and c.state == "succeeded" for c in final)
    assert len(fleet.published) == len(online)  # each deploy was published once
    devices = await rollout_service.device_list(rid)
    states = {d["id"]: (d["state"], d["reason"]) for d in devices["devices"]}
    assert states[offline] == ("skipped", "offline")


async def test_no_device_is_notified_or_skipped_while_presence_is_unknown(fleet: Fleet) -> None:
    """The broker away (or just back): every device looks offline, so a tick would skip them all
    and end the rollout `completed` without them. The scheduler waits for presence instead."""
    await _rune("app", "1.0.0")
    devices = [await _device(online=False, suite="presence") for _ in range(3)]
    created = await rollout_service.create(
        {"rune": "app@1.0.0", "selector": {"suite": "presence"}, "waves": "100%", "soak": "0"},
        "test",
        utcnow(),
    )
    rid = created["id"]
    known = False
    scheduler = Scheduler(fleet.outbox, utcnow, fleet.db_url, presence_known=lambda: known)
    scheduler.start()
    try:
        await asyncio.sleep(2.5)  # several refreshes, passes and ticks' worth
        shown = await rollout_service.show(rid, utcnow())
        assert shown["state"] == "scheduled" and shown["counts"]["skipped"] == 0, shown
        assert rid in scheduler.rollouts  # loaded, and waiting
        assert await Command.filter(id__startswith=f"{rid}.").count() == 0
        # The devices say `online` again, and then presence is known.
        await Device.filter(id__in=devices).update(online=True)
        known = True

        async def notified() -> int:
            return await Command.filter(id__startswith=f"{rid}.").count()

        assert await _until(lambda: _at_least(notified, len(devices)))
    finally:
        await scheduler.stop()
    shown = await rollout_service.show(rid, utcnow())
    assert shown["counts"]["skipped"] == 0 and shown["counts"]["notified"] == len(devices), shown


async def _at_least(count: Callable[[], Any], n: int) -> bool:
    return bool(await count() >= n)


async def test_only_devices_with_a_fresh_affirming_attestation_are_notified(fleet: Fleet) -> None:
    await _rune("app", "1.0.0")
    good = await _device(suite="attested")
    never = await _device(attestation=None, suite="attested")
    warned = await _device(attestation="warning", suite="attested")
    stale = await _device(suite="attested")
    await Device.filter(id=stale).update(attestation_expires_at=utcnow() - timedelta(minutes=3))
    jailed = await _device(suite="attested")
    await Device.filter(id=jailed).update(
        attestation_status="contraindicated", quarantined_at=utcnow(), quarantine_reason="tampered"
    )
    created = await rollout_service.create(
        {"rune": "app@1.0.0", "selector": {"suite": "attested"}, "waves": "100%", "soak": "0"},
        "test",
        utcnow(),
    )
    rid = created["id"]
    scheduler = Scheduler(fleet.outbox, utcnow, fleet.db_url)
    scheduler.start()
    try:

        async def decided() -> list[Command]:
            shown = await rollout_service.show(rid, utcnow())
            return shown["counts"]["skipped"] == 4 and await Command.filter(device_id=good)

        assert await _until(decided)
    finally:
        await scheduler.stop()
    devices = await rollout_service.device_list(rid)
    states = {d["id"]: (d["state"], d["reason"]) for d in devices["devices"]}
    assert states[good] == ("notified", None)
    assert states[never] == ("skipped", "ineligible: it has not attested yet")
    assert states[warned] == ("skipped", "ineligible: its last attestation result is warning")
    assert states[stale] == ("skipped", "ineligible: its attestation result expired 3 min ago")
    assert states[jailed] == ("skipped", "quarantined: tampered")
    assert {c.device_id for c in await Command.filter(id__startswith=f"{rid}.")} == {good}
