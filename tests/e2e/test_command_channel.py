"""Enroll, connect, deploy: a real `fleetctl serve` and real `fleet-agent run` processes.

The same flow runs over every kind of broker Fleet supports and on both databases:
- the embedded broker (SQLite, and PostgreSQL in CI);
- the local Mosquitto named by FLEET_TEST_MQTT_URL (plain MQTT, the controller on `--mqtt-url`);
- a Mosquitto on the shipped hardened config (deploy/mosquitto: mutual TLS, CN as identity, the
  per-device ACL) with certificates from the fleet's own CA: the broker's server certificate, the
  controller's `CN=fleet-controller` client certificate, and the device certificates the agents
  got at enrollment.
Each device enrolls with a token, connects, gets a signed deploy, verifies the rune through TUF,
installs it into a slot, runs it and reports; the controller sees each command end `succeeded`.
Attacks on the channel are in tests/security/test_command_attacks.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.ca import FleetCA
from tests.agents import AgentProcess, deploy, enroll_agents, get, post, wait_online
from tests.conftest import _service
from tests.controller import RunningController, controller_for, wait_for, write_legacy_rune
from tests.mosquitto import require_mosquitto, run_mosquitto
from tests.pki import write_key

# (database, broker): every broker on SQLite, the embedded one on PostgreSQL as well.
SETUPS = [
    pytest.param(("sqlite", "embedded"), id="sqlite-embedded"),
    pytest.param(("postgres", "embedded"), id="postgres-embedded", marks=pytest.mark.service),
    pytest.param(("sqlite", "mosquitto"), id="sqlite-mosquitto", marks=pytest.mark.service),
    pytest.param(("sqlite", "mosquitto-mtls"), id="sqlite-mosquitto-mtls"),
]
CONTROLLER_CN = "fleet-controller"


def _new_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    write_key(key, path)
    return key


def _mtls_broker(stack: contextlib.ExitStack, work: Path) -> Callable[[Path], Sequence[str]]:
    """A `before_serve` hook: certificates from the new fleet CA, the hardened Mosquitto on them,
    and the serve arguments that point the controller (and, through fleet.yaml, devices) at it."""

    def prepare(fleet_dir: Path) -> Sequence[str]:
        settings = yaml.safe_load((fleet_dir / "fleet.yaml").read_text())
        ca = FleetCA.load_or_create(fleet_dir / "keys", settings["name"])
        now = datetime.now(UTC)
        pki = work / "pki"
        pki.mkdir()
        server_key = _new_key(pki / "server.key")
        server = ca.issue_server(["127.0.0.1"], server_key.public_key(), now, timedelta(days=1))
        (pki / "server.crt").write_bytes(server.pem)
        client_key = _new_key(pki / "controller.key")
        client = ca.issue_client(CONTROLLER_CN, client_key.public_key(), now, timedelta(days=1))
        (pki / "controller.crt").write_bytes(client.pem)
        ca_cert = fleet_dir / "keys" / "ca.crt"
        broker = stack.enter_context(
            run_mosquitto(
                work / "mosquitto",
                ca_cert=ca_cert,
                server_cert=pki / "server.crt",
                server_key=pki / "server.key",
            )
        )
        url = f"mqtts://127.0.0.1:{broker.port}"
        settings["device_broker_url"] = url
        (fleet_dir / "fleet.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        return (
            "--mqtt-url",
            url,
            "--mqtt-ca",
            str(ca_cert),
            "--mqtt-cert",
            str(pki / "controller.crt"),
            "--mqtt-key",
            str(pki / "controller.key"),
        )

    return prepare


@pytest.fixture(scope="module", params=SETUPS)
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningController, list[AgentProcess], str]]:
    """A controller, two agents enrolled with a token and running, and a published rune."""
    backend, broker = request.param
    tmp = tmp_path_factory.mktemp(f"channel-{backend}-{broker}")
    with contextlib.ExitStack() as stack:
        serve_args: tuple[str, ...] = ()
        before_serve: Callable[[Path], Sequence[str]] | None = None
        if broker == "mosquitto":
            serve_args = ("--mqtt-url", _service("FLEET_TEST_MQTT_URL"))
        elif broker == "mosquitto-mtls":
            require_mosquitto()
            before_serve = _mtls_broker(stack, tmp)
        ctl = stack.enter_context(
            controller_for(backend, tmp, serve_args=serve_args, before_serve=before_serve)
        )
        agents = enroll_agents(ctl, tmp, 2)
        rune = write_legacy_rune(tmp, "counter.rune")
        ctl.push(rune, org="default", name="counter", version="1.0.0")
        for agent in agents:
            stack.callback(agent.stop)
            agent.start()
        wait_online(ctl, agents)
        yield ctl, agents, "counter@1.0.0"


def test_a_deploy_reaches_every_device_verified_installed_and_running(
    fleet: tuple[RunningController, list[AgentProcess], str],
) -> None:
    ctl, agents, ref = fleet
    for agent in agents:
        command = deploy(ctl, agent.device_id, ref)
        assert command["state"] == "succeeded", command
        device = get(ctl, f"/api/v1/devices/{agent.device_id}")
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
    ping = post(ctl, f"/api/v1/devices/{agents[1].device_id}/commands", {"type": "ping"})
    wait_for(
        lambda: get(ctl, f"/api/v1/commands/{ping['id']}")["state"] == "done",
        timeout=30,
        message="pong",
    )
    missing = ctl.cli("devices", "deploy", agents[1].device_id, "nope@9.9.9", check=False)
    assert missing.returncode != 0 and "not published" in missing.stderr
