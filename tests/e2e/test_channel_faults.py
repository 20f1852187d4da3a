"""Faults on the command channel: every deploy ends, on both sides, once.

Real processes (`fleetctl serve`, `fleet-agent run`, a private plain Mosquitto), real signatures,
real TUF. Each test proves, for one fault hitting a deploy that is under way, that the command
ends in a terminal state on the controller (`GET /api/v1/commands/{id}`) and on the device (its
`channel.json` results), that nothing was lost, and that nothing was installed twice: the device
ran the command id once (its log; twice only when the agent itself was killed during the first
run), installed and switched to the rune once (the slots' history), and refused no message.

- The broker is restarted while the device works on the deploy: the device finishes while there
  is no broker, so its statuses go nowhere, and the controller still learns the result once the
  broker is back (the device's `hello` after its reconnection, or the outbox's re-send after the
  controller's, answered with the recorded result).
- The controller is killed (SIGKILL), or stopped gracefully, while the device works on the deploy,
  and started again: the device, finding the repository gone, keeps trying until it is back,
  installs, and the restarted controller learns the result.
- The agent is killed while it works on the deploy, and started again: the new process does not
  claim the command is in flight, so the controller sends it again, and it runs to the end once.
- A device is offline when the deploy is sent and comes back an hour later (the controller's
  channel clock is simulated: it runs in this process, started in the past, and is moved to the
  present before the device starts): the re-sends of that hour reach nobody, the device's `hello`
  gets a fresh envelope, and the deploy succeeds. A device that comes back after the command's
  deadline (6 h) finds it `timed-out` and gets nothing.

To hold a deploy "in progress" without timing, the device reaches the controller's HTTP
repository through `GatedProxy`, a TCP relay the test can pause: the device has the command (it is
in flight in `channel.json`) and waits on the repository while the fault happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
import urllib3
import yaml

from fleet.fleetdir import FleetDir
from fleet.server import MqttOptions, running_controller
from fleet.tuf_store import utcnow
from tests.agents import TERMINAL, AgentProcess, get, post
from tests.controller import (
    BACKEND_PARAMS,
    RunningController,
    controller_for,
    fleet_agent,
    init_fleet,
    wait_for,
    write_legacy_rune,
)
from tests.mosquitto import free_port, require_mosquitto
from tests.relay import GatedProxy

T = TypeVar("T")
RUNE = "counter@1.0.0"
RUNE_REF = "default/counter@1.0.0"
WAIT_S = 60.0
HELD = ("received", "downloading")  # what the controller knows of a held deploy


# A private Mosquitto that can be stopped and started again on the same port.


class PlainMosquitto:
    """`/usr/sbin/mosquitto` on 127.0.0.1:`port`: anonymous, plain MQTT, nothing persisted."""

    def __init__(self, directory: Path) -> None:
        self.binary = require_mosquitto()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            f"user {getpass.getuser()}\n"
            "log_dest stderr\n"
            "log_type all\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(
            path.read_text(errors="replace") for path in sorted(self.directory.glob("*.log"))
        )

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with (self.directory / f"broker-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "-c", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mosquitto did not come up on {self.port}:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def plain_mosquitto(directory: Path) -> Iterator[PlainMosquitto]:
    broker = PlainMosquitto(directory)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# Devices and what they hold.


def enroll_device(server: str, root_json: Path, token: str, state_dir: Path) -> AgentProcess:
    """Enroll a new device in `state_dir` with `server` (its repository URL from then on)."""
    state_dir.mkdir()
    (state_dir / "agent.yaml").write_text(
        yaml.safe_dump({"run": {"input": {"kind": "random", "seed": 1}, "interval_s": 0.2}})
    )
    command: list[str | Path] = ["enroll", "--server", server, "--root", root_json]
    enrolled = fleet_agent(*command, "--state-dir", state_dir, "--token", token, "-o", "json")
    assert enrolled.returncode == 0, enrolled.stderr
    return AgentProcess(state_dir, json.loads(enrolled.stdout)["device_id"])


def in_flight(agent: AgentProcess) -> str | None:
    flight = agent.channel().get("in_flight")
    return str(flight["id"]) if isinstance(flight, dict) else None


def results_for(agent: AgentProcess, command_id: str) -> list[dict[str, Any]]:
    return [r for r in agent.channel()["results"] if r["id"] == command_id]


def slot_events(agent: AgentProcess, kind: str) -> list[dict[str, Any]]:
    path = agent.state_dir / "slots" / "state.json"
    if not path.exists():
        return []
    history = json.loads(path.read_text()).get("history", [])
    return [event for event in history if event["kind"] == kind]


def held_runes(agent: AgentProcess) -> list[str]:
    """`ORG/NAME@VERSION` of every rune in the device's slots."""
    held = []
    for meta in sorted((agent.state_dir / "slots").glob("?/meta.json")):
        rune = json.loads(meta.read_text())
        held.append(f"{rune['org']}/{rune['name']}@{rune['version']}")
    return held


def assert_ran_once(agent: AgentProcess, command: dict[str, Any]) -> None:
    """The command ended `succeeded` on both sides, and the device installed the rune once."""
    assert command["state"] == "succeeded", command
    results = results_for(agent, command["id"])
    assert [r["state"] for r in results] == ["succeeded"], agent.channel()
    assert results[0]["reason"].startswith("installed in slot"), results
    assert in_flight(agent) is None
    assert agent.log().count(f"running command {command['id']} ") == 1, agent.log()
    assert held_runes(agent) == [RUNE_REF]
    assert len(slot_events(agent, "install")) == 1, slot_events(agent, "install")
    assert len(slot_events(agent, "switch")) == 1, slot_events(agent, "switch")
    assert agent.channel()["refused"] == {}, agent.channel()


# Scenarios 1 and 2: `fleetctl serve` against the private Mosquitto.


@dataclass
class Setup:
    ctl: RunningController
    broker: PlainMosquitto
    proxy: GatedProxy
    agent: AgentProcess

    def command(self, command_id: str) -> dict[str, Any]:
        return dict(get(self.ctl, f"/api/v1/commands/{command_id}"))

    def deploy_held(self) -> str:
        """Send the deploy with the repository held; return once the device is working on it
        (it has the command in flight, waiting on the repository) and the controller knows."""
        self.proxy.hold()
        body = post(self.ctl, f"/api/v1/devices/{self.agent.device_id}/deploy", {"rune": RUNE})
        command_id = str(body["id"])
        wait_for(
            lambda: in_flight(self.agent) == command_id,
            timeout=WAIT_S,
            message="the device to take the deploy",
        )
        # Where the device waits on the repository: refreshing TUF (`received`), or, when its
        # check of the command key refreshed TUF moments before, downloading the rune.
        wait_for(
            lambda: self.command(command_id)["state"] in HELD,
            timeout=WAIT_S,
            message="the controller to hear the device took it",
        )
        return command_id

    def wait_terminal(self, command_id: str) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            command = self.command(command_id)
            return command if command["state"] in TERMINAL else None

        result: dict[str, Any] = wait_for(
            ended, timeout=WAIT_S, message="the command to end on the controller"
        )
        return result


@pytest.fixture
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    """A controller (on SQLite unless parametrized with a backend) on a private Mosquitto, one
    device running (its repository behind a gated proxy) and the rune published; nothing
    deployed yet."""
    backend = getattr(request, "param", "sqlite")
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(plain_mosquitto(tmp_path / "mosquitto"))
        ctl = stack.enter_context(
            controller_for(backend, tmp_path, serve_args=("--mqtt-url", broker.url))
        )
        proxy = GatedProxy(("127.0.0.1", ctl.port))
        stack.callback(proxy.close)
        token = post(ctl, "/api/v1/enrollment-tokens", {"uses": 1, "ttl_s": 600})["token"]
        agent = enroll_device(proxy.url, ctl.root_json, token, tmp_path / "device")
        ctl.push(
            write_legacy_rune(tmp_path, "counter.rune"),
            org="default",
            name="counter",
            version="1.0.0",
        )
        stack.callback(agent.stop)
        agent.start()
        wait_for(
            lambda: get(ctl, f"/api/v1/devices/{agent.device_id}")["online"],
            timeout=WAIT_S,
            message="the device online",
        )
        yield Setup(ctl, broker, proxy, agent)


def test_a_broker_restarted_during_a_deploy_loses_nothing(setup: Setup) -> None:
    command_id = setup.deploy_held()
    setup.broker.stop()
    setup.proxy.release()
    # The device finishes while there is no broker: nothing it says can reach the controller.
    wait_for(
        lambda: results_for(setup.agent, command_id),
        timeout=WAIT_S,
        message="the device to finish the deploy",
    )
    assert setup.command(command_id)["state"] in HELD
    setup.broker.start()
    command = setup.wait_terminal(command_id)
    assert_ran_once(setup.agent, command)
    device = get(setup.ctl, f"/api/v1/devices/{setup.agent.device_id}")
    assert device["active_rune"] == RUNE_REF


@pytest.mark.parametrize("setup", BACKEND_PARAMS, indirect=True)
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_controller_restarted_during_a_deploy_loses_nothing(setup: Setup, how: str) -> None:
    command_id = setup.deploy_held()
    if how == "killed":
        setup.ctl.kill()
    else:
        setup.ctl.stop()
    # The device goes on with the deploy and finds the repository gone.
    setup.proxy.release()
    wait_for(
        lambda: setup.proxy.refused > 0,
        timeout=WAIT_S,
        message="the device to find the repository unreachable",
    )
    assert in_flight(setup.agent) == command_id
    assert results_for(setup.agent, command_id) == []
    setup.ctl.start()
    command = setup.wait_terminal(command_id)
    assert_ran_once(setup.agent, command)
    device = get(setup.ctl, f"/api/v1/devices/{setup.agent.device_id}")
    assert device["active_rune"] == RUNE_REF


def test_an_agent_killed_during_a_deploy_runs_it_again_once_restarted(setup: Setup) -> None:
    command_id = setup.deploy_held()
    setup.agent.kill()
    setup.proxy.release()
    assert in_flight(setup.agent) == command_id  # what the killed process left behind
    setup.agent.start()
    command = setup.wait_terminal(command_id)
    assert command["state"] == "succeeded", command
    assert command["attempts"] >= 2, command  # sent again for the new process
    # Both processes took the command; only the second got past the repository and installed.
    assert setup.agent.log().count(f"running command {command_id} ") == 2
    assert [r["state"] for r in results_for(setup.agent, command_id)] == ["succeeded"]
    assert in_flight(setup.agent) is None
    assert held_runes(setup.agent) == [RUNE_REF]
    assert len(slot_events(setup.agent, "install")) == 1
    assert setup.agent.channel()["refused"] == {}


# Scenario 3: the controller in this process, on a simulated clock.


class SimulatedClock:
    """The controller's channel clock: the real time plus `offset`."""

    def __init__(self, offset: timedelta) -> None:
        self.offset = offset

    def __call__(self) -> datetime:
        return utcnow() + self.offset


@dataclass
class Api:
    url: str
    token: str
    http: urllib3.PoolManager = field(default_factory=lambda: urllib3.PoolManager(retries=False))

    def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None, **params: str
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            raw = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif raw is not None:
            headers["Content-Type"] = "application/octet-stream"
        query = f"?{urlencode(params)}" if params else ""
        response = self.http.request(method, self.url + path + query, body=raw, headers=headers)
        assert response.status in (200, 201), (
            f"{method} {path}: {response.status} {response.data!r}"
        )
        return json.loads(response.data)

    def ended(self, command_id: str) -> dict[str, Any] | None:
        """The command, once it is in a terminal state."""
        command: dict[str, Any] = self.call("GET", f"/api/v1/commands/{command_id}")
        return command if command["state"] in TERMINAL else None


async def until(condition: Callable[[], T | None], message: str, timeout: float = WAIT_S) -> T:
    """Poll `condition` (blocking, so in a thread) while the controller runs in this loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{message} not met within {timeout}s")
        await asyncio.sleep(0.1)


async def test_a_device_offline_when_the_deploy_is_sent_gets_it_when_back_not_after_deadline(
    tmp_path: Path,
) -> None:
    # SQLite only: Tortoise takes one database backend per process (DESIGN.md), and other tests
    # in this process use SQLite. The outbox's clock logic is the same on both.
    fleet_dir = tmp_path / "fleet"
    made = await asyncio.to_thread(init_fleet, fleet_dir)
    root_json = Path(made["root"])
    clock = SimulatedClock(-timedelta(hours=7))
    mqtt = MqttOptions(listen="127.0.0.1:0")
    db_url = str(made["database"])
    async with running_controller(
        FleetDir(fleet_dir), "127.0.0.1:0", db_url, mqtt, clock=clock
    ) as server:
        api = Api(server.url, made["admin_token"])
        token = (
            await asyncio.to_thread(
                api.call, "POST", "/api/v1/enrollment-tokens", {"uses": 2, "ttl_s": 600}
            )
        )["token"]
        late, back = [
            await asyncio.to_thread(enroll_device, server.url, root_json, token, tmp_path / name)
            for name in ("late", "back")
        ]
        rune = write_legacy_rune(tmp_path, "counter.rune").read_bytes()
        await asyncio.to_thread(
            api.call,
            "POST",
            "/api/v1/runes",
            None,
            rune,
            org="default",
            name="counter",
            version="1.0.0",
        )

        async def command(command_id: str) -> dict[str, Any]:
            result: dict[str, Any] = await asyncio.to_thread(
                api.call, "GET", f"/api/v1/commands/{command_id}"
            )
            return result

        async def deploy(agent: AgentProcess) -> str:
            body = await asyncio.to_thread(
                api.call, "POST", f"/api/v1/devices/{agent.device_id}/deploy", {"rune": RUNE}
            )
            return str(body["id"])

        # Seven hours ago: a deploy to `late`, whose deadline is six hours later.
        late_id = await deploy(late)
        assert (await command(late_id))["state"] == "sent"
        # An hour ago: the deadline passed; a deploy to `back`, sent again for an hour.
        clock.offset = -timedelta(hours=1)
        await server.outbox.resend_due()
        timed_out = await command(late_id)
        assert timed_out["state"] == "timed-out", timed_out
        back_id = await deploy(back)
        for _ in range(12):
            clock.offset += timedelta(minutes=5)
            await server.outbox.resend_due()
        pending = await command(back_id)
        assert pending["state"] == "sent" and pending["attempts"] >= 6, pending
        # Now: both devices come back.
        clock.offset = timedelta(0)
        try:
            for agent in (late, back):
                agent.start()
            done = await until(lambda: api.ended(back_id), "the deploy to end")
            assert_ran_once(back, done)
            # The device accepted only the envelope sent after its hello: every earlier one
            # expired unseen (the broker keeps nothing for an offline device).
            assert back.channel()["command_seq"] == done["attempts"], (back.channel(), done)
            # `late` said hello and was sent nothing: a ping, sent after its hello, is the first
            # and only command it gets.
            await until(
                lambda: api.call("GET", f"/api/v1/devices/{late.device_id}")["last_hello"],
                "the late device's hello",
            )
            ping = await asyncio.to_thread(
                api.call, "POST", f"/api/v1/devices/{late.device_id}/commands", {"type": "ping"}
            )
            await until(
                lambda: api.call("GET", f"/api/v1/commands/{ping['id']}")["state"] == "done",
                "the ping answered",
            )
            channel = late.channel()
            assert [r["id"] for r in channel["results"]] == [ping["id"]], channel
            assert channel["refused"] == {} and channel["in_flight"] is None, channel
            assert held_runes(late) == [] and slot_events(late, "install") == []
            assert "running command" not in late.log()
            assert (await command(late_id))["state"] == "timed-out"
        finally:
            await asyncio.gather(*(asyncio.to_thread(a.stop) for a in (late, back)))
