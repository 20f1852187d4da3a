"""Attacks on the command channel, from a client of the (untrusted) broker.

A real controller (embedded broker, SQLite) and two real `fleet-agent run` processes. The attacker
publishes straight to the broker: a command signed by a key the device never trusted, one signed
by the real command key but addressed to the other device, one that expired, a replay of an old
sequence number, one signed by the command key after `fleetctl keys rotate command` revoked it,
and a status message that spoofs the other device. Each is refused by its receiver, counted (the
device's persisted refusal counts and its security-event report in the controller's /metrics),
and changes nothing: the same slots, the same command sequence, no result for the command id.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import pytest
from securesystemslib.signer import CryptoSigner

from attestation.keys import load_key_file
from ota.protocol import CONTROLLER, Channel, Message, MessageType, seal_message, topic
from tests.agents import AgentProcess, broker_url, deploy, enroll_agents, get, wait_online
from tests.controller import RunningController, controller_for, wait_for, write_legacy_rune

ATTACKS = {
    "forged": "unknown-key",
    "other-device": "wrong-audience",
    "expired": "expired",
    "replayed": "replayed",
    "revoked-key": "unknown-key",
}


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningController, list[AgentProcess]]]:
    """A controller, two enrolled agents running, and `counter@1.0.0` active on the first."""
    tmp = tmp_path_factory.mktemp("command-attacks")
    with controller_for("sqlite", tmp) as ctl:
        agents = enroll_agents(ctl, tmp, 2)
        ctl.push(
            write_legacy_rune(tmp, "counter.rune"), org="default", name="counter", version="1.0.0"
        )
        try:
            for agent in agents:
                agent.start()
            wait_online(ctl, agents)
            assert deploy(ctl, agents[0].device_id, "counter@1.0.0")["state"] == "succeeded"
            yield ctl, agents
        finally:
            for agent in agents:
                agent.stop()


def _publish(broker: str, topic_name: str, payload: bytes) -> None:
    url = urlsplit(broker)

    async def publish() -> None:
        async with aiomqtt.Client(url.hostname or "", url.port or 1883, identifier="attacker") as c:
            await c.publish(topic_name, payload, qos=1)

    asyncio.run(publish())


def _command(victim: str, seq: int, iat: float, exp: float) -> Message:
    body = {"command_id": "attack", "org": "default", "name": "counter", "version": "9.9.9"}
    return Message(CONTROLLER, victim, seq, iat, exp, MessageType.DEPLOY, body)


def _sealed_attack(
    attack: str, ctl: RunningController, agents: list[AgentProcess], work: Path
) -> bytes:
    victim, other = agents
    command_key = load_key_file(ctl.fleet_dir / "keys" / "command.pem")
    seq = victim.channel()["command_seq"]
    now = time.time()
    if attack == "forged":
        return seal_message(_command(victim.device_id, seq + 1000, now, now + 600), _new_key())
    if attack == "other-device":
        return seal_message(_command(other.device_id, seq + 1000, now, now + 600), command_key)
    if attack == "expired":
        return seal_message(
            _command(victim.device_id, seq + 1000, now - 1200, now - 600), command_key
        )
    if attack == "replayed":
        return seal_message(_command(victim.device_id, max(seq, 1), now, now + 600), command_key)
    # The key leaked, so the operator rotated it: the old key must be worthless at once.
    leaked = work / "leaked-command.pem"
    shutil.copyfile(ctl.fleet_dir / "keys" / "command.pem", leaked)
    ctl.cli("keys", "rotate", "command")
    return seal_message(
        _command(victim.device_id, seq + 1000, now, now + 600), load_key_file(leaked)
    )


def _new_key() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_command_from_the_broker_side_is_refused_counted_and_changes_nothing(
    fleet: tuple[RunningController, list[AgentProcess]], attack: str, tmp_path: Path
) -> None:
    ctl, agents = fleet
    victim = agents[0]
    expected = ATTACKS[attack]
    before_channel = victim.channel()
    before_slots = victim.slots_state()
    refused_before = before_channel.get("refused", {}).get(expected, 0)
    reported_before = ctl.metric("fleet_device_security_events_total", kind=expected)
    data = _sealed_attack(attack, ctl, agents, tmp_path)

    _publish(broker_url(ctl), topic(victim.device_id, Channel.CMD), data)

    wait_for(
        lambda: victim.channel().get("refused", {}).get(expected, 0) == refused_before + 1,
        timeout=20,
        message=f"the device to refuse the {attack} command as {expected}",
    )
    wait_for(
        lambda: (
            ctl.metric("fleet_device_security_events_total", kind=expected) == reported_before + 1
        ),
        timeout=20,
        message="the refusal counted on the controller",
    )
    after = victim.channel()
    assert victim.slots_state() == before_slots
    assert after["command_seq"] == before_channel["command_seq"]
    assert all(result["id"] != "attack" for result in after["results"])
    assert after.get("in_flight") in (None, before_channel.get("in_flight"))
    assert get(ctl, f"/api/v1/devices/{victim.device_id}")["active_rune"] == "default/counter@1.0.0"


def test_after_a_rotation_the_new_command_key_still_commands_the_device(
    fleet: tuple[RunningController, list[AgentProcess]],
) -> None:
    """The revoked-key attack must not have cost the controller its channel."""
    ctl, agents = fleet
    ctl.cli("keys", "rotate", "command")
    for agent in agents:
        status, ping = ctl.api(
            "POST", f"/api/v1/devices/{agent.device_id}/commands", {"type": "ping"}
        )
        assert status == 201, ping
        wait_for(
            lambda p=ping: get(ctl, f"/api/v1/commands/{p['id']}")["state"] == "done",
            timeout=30,
            message="a ping signed by the new command key answered",
        )


def test_a_status_spoofing_another_device_is_refused_and_counted(
    fleet: tuple[RunningController, list[AgentProcess]],
) -> None:
    ctl, agents = fleet
    victim, liar = agents
    now = time.time()
    lie: dict[str, Any] = {"command_id": None, "state": "running", "active": None}
    status = Message(liar.device_id, CONTROLLER, 10**9, now, now + 60, MessageType.STATUS, lie)
    signer = load_key_file(liar.state_dir / "identity.pem")
    refused_before = ctl.metric("fleet_messages_refused_total", kind="spoofed")
    device_before = get(ctl, f"/api/v1/devices/{victim.device_id}")

    _publish(broker_url(ctl), topic(victim.device_id, Channel.STATUS), seal_message(status, signer))

    wait_for(
        lambda: ctl.metric("fleet_messages_refused_total", kind="spoofed") == refused_before + 1,
        timeout=20,
        message="the spoofed status refused",
    )
    device_after = get(ctl, f"/api/v1/devices/{victim.device_id}")
    assert device_after["active_rune"] == device_before["active_rune"] == "default/counter@1.0.0"
    for field in ("active_sha256", "previous_rune", "state", "online"):
        assert device_after[field] == device_before[field], field
