"""Enroll, connect, deploy: real `fleetctl serve` (embedded broker) and real `fleet-agent run`
processes, on SQLite and PostgreSQL; and attacks on the channel from a client of that broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import pytest
import yaml

from attestation.keys import load_key_file
from ota.protocol import CONTROLLER, Channel, Message, MessageType, seal_message, topic
from tests.controller import (
    BACKEND_PARAMS,
    FLEET_AGENT,
    RunningController,
    controller_for,
    wait_for,
    write_legacy_rune,
)

TERMINAL = {"succeeded", "failed", "refused", "rolled-back", "done", "timed-out"}


@dataclass
class AgentProcess:
    state_dir: Path
    device_id: str
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.state_dir / "agent.log").open("ab")
        self.process = subprocess.Popen(
            [FLEET_AGENT, "run", "--state-dir", str(self.state_dir)], stdout=log, stderr=log
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return (self.state_dir / "agent.log").read_text(errors="replace")

    def channel(self) -> dict[str, Any]:
        return dict(json.loads((self.state_dir / "channel.json").read_text()))

    def slots_state(self) -> str:
        """Which runes the slots hold and run (not the probation counters, which move)."""
        path = self.state_dir / "slots" / "state.json"
        if not path.exists():
            return ""
        state = json.loads(path.read_text())
        slots = sorted((self.state_dir / "slots").glob("?/meta.json"))
        held = [(m.parent.name, m.read_text()) for m in slots]
        return json.dumps([state.get("active"), state.get("previous"), held])


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningController, list[AgentProcess], str]]:
    """A controller, two enrolled agents running, and a published legacy rune."""
    tmp = tmp_path_factory.mktemp(f"channel-{request.param}")
    with controller_for(request.param, tmp) as ctl:
        token = _post(ctl, "/api/v1/enrollment-tokens", {"uses": 2, "ttl_s": 600})["token"]
        agents = []
        for index in range(2):
            state_dir = tmp / f"device-{index}"
            state_dir.mkdir()
            (state_dir / "agent.yaml").write_text(
                yaml.safe_dump({"run": {"input": {"kind": "random", "seed": 1}, "interval_s": 0.2}})
            )
            enrolled = ctl.enroll(state_dir, token=token)
            assert enrolled.returncode == 0, enrolled.stderr
            agents.append(AgentProcess(state_dir, json.loads(enrolled.stdout)["device_id"]))
        rune = write_legacy_rune(tmp, "counter.rune")
        ctl.push(rune, org="default", name="counter", version="1.0.0")
        for agent in agents:
            agent.start()
        try:
            wait_for(
                lambda: all(_get(ctl, f"/api/v1/devices/{a.device_id}")["online"] for a in agents),
                timeout=60,
                message="agents online",
            )
            yield ctl, agents, "counter@1.0.0"
        finally:
            for agent in agents:
                agent.stop()


def deploy(ctl: RunningController, device_id: str, ref: str) -> dict[str, Any]:
    done = ctl.cli(
        "devices", "deploy", device_id, ref, "--wait", "-o", "json", check=False, timeout=120
    )
    assert done.stdout, done.stderr
    return dict(json.loads(done.stdout))


def test_a_deploy_reaches_every_device_verified_installed_and_running(
    fleet: tuple[RunningController, list[AgentProcess], str],
) -> None:
    ctl, agents, ref = fleet
    for agent in agents:
        command = deploy(ctl, agent.device_id, ref)
        assert command["state"] == "succeeded", command
        device = _get(ctl, f"/api/v1/devices/{agent.device_id}")
        assert device["active_rune"] == "default/counter@1.0.0"
        assert "counter" in agent.slots_state()
        wait_for(
            lambda a=agent: (a.state_dir / "outputs.jsonl").exists(),
            timeout=20,
            message="outputs in the device's sink",
        )
    again = deploy(ctl, agents[0].device_id, ref)
    assert again["state"] == "succeeded" and again["reason"] == "already active"


def test_ping_is_answered_and_an_unknown_rune_is_refused_by_the_api(
    fleet: tuple[RunningController, list[AgentProcess], str],
) -> None:
    ctl, agents, _ = fleet
    ping = _post(ctl, f"/api/v1/devices/{agents[1].device_id}/commands", {"type": "ping"})
    wait_for(
        lambda: _get(ctl, f"/api/v1/commands/{ping['id']}")["state"] == "done",
        timeout=30,
        message="pong",
    )
    missing = ctl.cli("devices", "deploy", agents[1].device_id, "nope@9.9.9", check=False)
    assert missing.returncode != 0 and "not published" in missing.stderr


def _attack(broker: str, topic_name: str, payload: bytes) -> None:
    url = urlsplit(broker)

    async def publish() -> None:
        async with aiomqtt.Client(
            url.hostname or "", url.port or 1883, identifier="attacker"
        ) as client:
            await client.publish(topic_name, payload, qos=1)

    asyncio.run(publish())


def _refusals(agent: AgentProcess) -> dict[str, int]:
    return dict(agent.channel().get("refused", {}))


@pytest.mark.parametrize("attack", ["forged", "other-device", "expired", "replayed"])
def test_a_command_from_the_broker_side_is_refused_and_changes_nothing(
    fleet: tuple[RunningController, list[AgentProcess], str], attack: str
) -> None:
    ctl, agents, _ = fleet
    victim = agents[0]
    broker_url = _broker_url(ctl)
    now = time.time()
    command_key = load_key_file(ctl.fleet_dir / "keys" / "command.pem")
    seq = victim.channel()["command_seq"]
    body = {
        "command_id": f"attack-{attack}",
        "org": "default",
        "name": "counter",
        "version": "9.9.9",
    }
    message = Message(
        CONTROLLER, victim.device_id, seq + 1000, now, now + 600, MessageType.DEPLOY, body
    )
    expected = {
        "forged": "unknown-key",
        "other-device": "wrong-audience",
        "expired": "expired",
        "replayed": "replayed",
    }[attack]
    if attack == "forged":
        from securesystemslib.signer import CryptoSigner

        data = seal_message(message, CryptoSigner.generate_ed25519())
    elif attack == "other-device":
        message = Message(
            CONTROLLER, agents[1].device_id, seq + 1000, now, now + 600, MessageType.DEPLOY, body
        )
        data = seal_message(message, command_key)
    elif attack == "expired":
        message = Message(
            CONTROLLER,
            victim.device_id,
            seq + 1000,
            now - 1200,
            now - 600,
            MessageType.DEPLOY,
            body,
        )
        data = seal_message(message, command_key)
    else:
        message = Message(
            CONTROLLER, victim.device_id, max(seq, 1), now, now + 600, MessageType.DEPLOY, body
        )
        data = seal_message(message, command_key)
    before_slots = victim.slots_state()
    before = _refusals(victim).get(expected, 0)
    reported = ctl.metric("fleet_device_security_events_total", kind=expected)
    _attack(broker_url, topic(victim.device_id, Channel.CMD), data)
    wait_for(
        lambda: _refusals(victim).get(expected, 0) == before + 1,
        timeout=20,
        message=f"the device to refuse the {attack} command",
    )
    wait_for(
        lambda: ctl.metric("fleet_device_security_events_total", kind=expected) == reported + 1,
        timeout=20,
        message="the refusal counted on the controller",
    )
    assert victim.slots_state() == before_slots
    assert victim.channel()["command_seq"] == seq
    assert all(r["id"] != body["command_id"] for r in victim.channel()["results"])


def test_a_status_spoofing_another_device_is_refused_and_counted(
    fleet: tuple[RunningController, list[AgentProcess], str],
) -> None:
    ctl, agents, _ = fleet
    liar, victim = agents
    now = time.time()
    signer = load_key_file(liar.state_dir / "identity.pem")
    status = Message(
        liar.device_id,
        CONTROLLER,
        10**9,
        now,
        now + 60,
        MessageType.STATUS,
        {"command_id": None, "state": "running", "active": None},
    )
    before = ctl.metric("fleet_messages_refused_total", kind="spoofed")
    device_before = _get(ctl, f"/api/v1/devices/{victim.device_id}")
    _attack(_broker_url(ctl), topic(victim.device_id, Channel.STATUS), seal_message(status, signer))
    wait_for(
        lambda: ctl.metric("fleet_messages_refused_total", kind="spoofed") == before + 1,
        timeout=20,
        message="the spoofed status refused",
    )
    device_after = _get(ctl, f"/api/v1/devices/{victim.device_id}")
    assert device_after["active_rune"] == device_before["active_rune"]


def _broker_url(ctl: RunningController) -> str:
    for line in ctl.fleet_dir.parent.glob("serve-*.stdout"):
        for text in line.read_text().splitlines():
            if text.startswith("broker "):
                return text.removeprefix("broker ").strip()
    raise AssertionError("the controller printed no broker URL")


def _get(ctl: RunningController, path: str) -> Any:
    status, body = ctl.api("GET", path)
    assert status == 200, body
    return body


def _post(ctl: RunningController, path: str, json_body: Any) -> Any:
    status, body = ctl.api("POST", path, json_body)
    assert status in (200, 201), body
    return body
