"""Rollouts that go wrong, end to end: real `fleetctl serve` and real `fleet-agent run` processes.

The failing rune (`ticker@2.0.0`) leaks about 19 MiB of wasm memory per inference, and panics
(`unreachable`) once the sandbox's 64 MiB memory limit refuses to grow it, on its 4th call. The
devices labelled `hw=small` have an owner policy that health-checks a new rune with 6 calls, so on
them the real health check fails and nothing is installed; the `hw=big` ones check 3 calls (the
default) and install it.

- A canary (`--waves 2,100%`, stratified: one `hw=big`, one `hw=small`) holding a device that
  fails its health check pauses the rollout (`--min-executed 1`): the API and `fleetctl rollout
  status` show `paused`, the reason names the failure and the health-check reason, the failed
  device was retried (`--retries 1`: attempts .1 and .2, both failed) and still runs what it ran
  before, and no device of the second wave got a command. `fleetctl rollout rollback` then puts
  the canary back on the previous version.
- `--on-failure rollback`: the canary passes (`--success 50%`), the 100% wave trips
  (`--min-executed 3 --max-failures 20%`), the rollout ends `rolled-back`, and every device it
  touched ends on the version it ran before: those that installed the rune through the rollout's
  `rollback` command (their A/B slot), those that failed the health check because nothing was
  ever installed (their rollback is `done`, already active).
- `--start-at` a few seconds ahead: the rollout stays `scheduled` and no device gets a command
  until then; then it runs to `completed`, having started no earlier than `start_at`.
- A device online when notified whose agent is then stopped (frozen, then killed) never answers:
  the controller's clock ends it `timed-out` after `--device-timeout` (reason `no result 3s after
  notification`), and the rollout still completes; a device never online is `skipped` (offline).
- The broker (a private Mosquitto, `--mqtt-url`) stopped mid-rollout (`--rate 1/s`) and started
  again on the same port: stopping, it delivers every device's last will, yet no pending device
  is skipped as offline during the outage (the scheduler waits until presence is known again);
  the rollout completes with every device updated, each notified exactly once (one command
  `{rollout}.{device}.1`, which its agent ran once).
- Two controller replicas on one PostgreSQL database and one Mosquitto (shared subscription):
  only the first holds the scheduler's advisory lock (`fleet_rollout_scheduler_leading`); a
  rollout created through the other one completes, each device notified once. The lock holder is
  killed (`kill -9`) mid-rollout: the other replica takes the lock over and finishes that rollout,
  still without notifying any device twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.limits import SandboxLimits
from tests.agents import AgentProcess, enroll_agents, get, post, wait_online
from tests.controller import (
    RunningController,
    controller_for,
    spawn_serve,
    wait_for,
    write_legacy_rune,
)
from tests.e2e.test_channel_faults import PlainMosquitto, plain_mosquitto
from tests.legacy_runes import Layout, build, call, emit, globals_, manifest, request_output
from tests.mosquitto import free_port

ENDED = ("completed", "aborted", "rolled-back")
WAIT_S = 60.0
LEAK_PAGES = 300  # 64 KiB pages grown per call: the 4th call no longer fits the memory limit
SMALL_POLICY = {"health_check_calls": 6}
# Probation passes after two good runs, so the big devices keep the leaking rune they installed
# (its later crashes are the run loop's problem, not a rollback) and the test decides who goes
# back.
POLICY = {"probation": {"min_successes": 2}}


def leaking_rune() -> bytes:
    """Each `_call` grows memory by LEAK_PAGES pages and panics (`unreachable`) once that fails."""
    page, limit = 65536, SandboxLimits().memory_bytes
    assert (1 + 3 * LEAK_PAGES) * page <= limit < (1 + 4 * LEAK_PAGES) * page
    layout = Layout()
    pages = layout.buffer(4)
    body = [
        globals_("$out"),
        manifest(request_output("$out")),
        call(
            f"(if (i32.eq (memory.grow (i32.const {LEAK_PAGES})) (i32.const -1))"
            " (then unreachable))",
            f"(i32.store (i32.const {pages.ptr}) (memory.size))",
            emit("$out", pages),
        ),
    ]
    return build(body, layout, capabilities={})


# Helpers over the REST API and the devices.


def rollout(ctl: RunningController, rollout_id: str) -> Any:
    return get(ctl, f"/api/v1/rollouts/{rollout_id}")


def rollout_devices(ctl: RunningController, rollout_id: str) -> dict[str, Any]:
    devices = get(ctl, f"/api/v1/rollouts/{rollout_id}/devices")["devices"]
    return {d["id"]: d for d in devices}


def wait_state(
    ctl: RunningController,
    rollout_id: str,
    states: tuple[str, ...] = ENDED,
    timeout: float = WAIT_S,
) -> Any:
    def reached() -> Any:
        body = rollout(ctl, rollout_id)
        return body if body["state"] in states else None

    return wait_for(reached, timeout, interval=0.2, message=f"rollout {rollout_id} in {states}")


def rollout_commands(ctl: RunningController, device_id: str, rollout_id: str) -> list[Any]:
    commands = get(ctl, f"/api/v1/devices/{device_id}/commands")["commands"]
    return sorted(
        (c for c in commands if c["id"].startswith(f"{rollout_id}.")), key=lambda c: c["id"]
    )


def active_rune(ctl: RunningController, agent: AgentProcess) -> Any:
    return get(ctl, f"/api/v1/devices/{agent.device_id}")["active_rune"]


def held_runes(agent: AgentProcess) -> list[str]:
    """`ORG/NAME@VERSION` of every rune in the device's slots."""
    held = []
    for meta in sorted((agent.state_dir / "slots").glob("?/meta.json")):
        rune = json.loads(meta.read_text())
        held.append(f"{rune['org']}/{rune['name']}@{rune['version']}")
    return held


def ran(agent: AgentProcess, command_id: str) -> int:
    """How many times the agent started running `command_id` (its log)."""
    return agent.log().count(f"running command {command_id} ")


def assert_notified_once(
    ctl: RunningController, agents: list[AgentProcess], rollout_id: str, ref: str
) -> None:
    """Each agent got one deploy of the rollout (attempt 1), ran it once, and runs `ref`."""
    for agent in agents:
        commands = rollout_commands(ctl, agent.device_id, rollout_id)
        assert [c["id"] for c in commands] == [f"{rollout_id}.{agent.device_id}.1"], commands
        (command,) = commands
        assert command["state"] == "succeeded", command
        results = [r for r in agent.channel().get("results", []) if r["id"] == command["id"]]
        assert [r["state"] for r in results] == ["succeeded"], agent.channel()
        assert ran(agent, command["id"]) == 1, agent.log()
        assert active_rune(ctl, agent) == ref


def create(ctl: RunningController, rune: str, agents: list[AgentProcess], **options: Any) -> Any:
    body = {"rune": rune, "devices": [a.device_id for a in agents], "soak": "0", **options}
    created = post(ctl, "/api/v1/rollouts", body)
    assert created["selected"] == len(agents), created
    return created


def one_line(text: str) -> str:
    """`text` with every run of white space (rich's wrapping included) made one space."""
    return " ".join(text.split())


# One fleet on SQLite with the embedded broker: scenarios 1, 2, 5 and 3.


@dataclass
class Fleet:
    ctl: RunningController
    big: list[AgentProcess]
    small: list[AgentProcess]
    spare: AgentProcess  # for the timeout: frozen and killed by that test
    never: AgentProcess  # enrolled, never started

    @property
    def tickers(self) -> list[AgentProcess]:
        return [*self.big, *self.small]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three `hw=big` and two `hw=small` agents running `ticker@1.0.0` (deployed by a first
    rollout), a running `hw=spare` agent with nothing, one enrolled device never started;
    published: `ticker` 1.0.0 (good), 2.0.0 (the leak), 3.0.0 (good), `beacon@1.0.0` (good)."""
    tmp = tmp_path_factory.mktemp("rollout-failures")
    with contextlib.ExitStack() as stack:
        ctl = stack.enter_context(controller_for("sqlite", tmp))
        big = enroll_agents(ctl, tmp, 3, prefix="big", labels={"hw": "big"}, policy=POLICY)
        small = enroll_agents(
            ctl, tmp, 2, prefix="small", labels={"hw": "small"}, policy=POLICY | SMALL_POLICY
        )
        spare, never = enroll_agents(ctl, tmp, 2, prefix="spare", labels={"hw": "spare"})
        for version, nbytes in (("1.0.0", 1), ("3.0.0", 3)):
            good = write_legacy_rune(tmp, f"ticker-{version}.rune", nbytes=nbytes)
            ctl.push(good, org="default", name="ticker", version=version)
        leak = tmp / "ticker-2.0.0.rune"
        leak.write_bytes(leaking_rune())
        ctl.push(leak, org="default", name="ticker", version="2.0.0")
        beacon = write_legacy_rune(tmp, "beacon-1.0.0.rune", nbytes=5)
        ctl.push(beacon, org="default", name="beacon", version="1.0.0")
        running = [*big, *small, spare]
        for agent in running:
            stack.callback(agent.stop)
            agent.start()
        wait_online(ctl, running)
        fleet = Fleet(ctl, big, small, spare, never)
        for agent in [*big, *small]:
            labels = get(ctl, f"/api/v1/devices/{agent.device_id}")["labels"]
            assert labels == {"hw": "small" if agent in small else "big"}, labels
        baseline = create(ctl, "ticker@1.0.0", fleet.tickers, waves="100%")
        assert wait_state(ctl, baseline["id"])["state"] == "completed"
        assert_notified_once(ctl, fleet.tickers, baseline["id"], "default/ticker@1.0.0")
        yield fleet


def test_a_canary_failing_its_health_check_pauses_the_rollout_before_the_next_wave(
    fleet: Fleet,
) -> None:
    ctl = fleet.ctl
    created = create(
        ctl, "ticker@2.0.0", fleet.tickers,
        waves="2,100%", min_executed=1, max_failures="10%", retries=1,
    )  # fmt: skip
    rollout_id = created["id"]
    canary = set(created["plan"][0]["devices"])
    (big,) = [a for a in fleet.big if a.device_id in canary]
    (small,) = [a for a in fleet.small if a.device_id in canary]
    later = [a for a in fleet.tickers if a.device_id not in canary]
    assert len(later) == 3

    paused = wait_state(ctl, rollout_id, ("paused", *ENDED))
    assert paused["state"] == "paused", paused
    health = "ticker@2.0.0 failed call 4 of 6: ticker@2.0.0 _call trapped: it reached `unreachable`"
    assert paused["reason"].startswith("wave 1: 1 of "), paused["reason"]
    assert "finished devices failed" in paused["reason"], paused["reason"]
    assert f"health check: {health}" in paused["reason"], paused["reason"]
    assert [w["wave"] for w in paused["waves"]] == [1], paused["waves"]
    assert paused["waves"][0]["tripped_at"] is not None and paused["waves"][0]["passed_at"] is None
    (reason,) = paused["failure_reasons"]
    assert health in reason and paused["failure_reasons"][reason] == 1, paused

    # The failed device was tried twice, both times refused by its own health check, and still
    # runs what it ran before: the new rune never reached a slot.
    devices = rollout_devices(ctl, rollout_id)
    assert set(devices) == canary, devices  # the second wave was never drawn
    assert devices[small.device_id]["state"] == "failed", devices
    assert devices[small.device_id]["attempt"] == 2
    assert health in devices[small.device_id]["reason"], devices
    commands = rollout_commands(ctl, small.device_id, rollout_id)
    assert [c["id"] for c in commands] == [f"{rollout_id}.{small.device_id}.{n}" for n in (1, 2)]
    assert all(c["state"] == "failed" and health in c["reason"] for c in commands), commands
    assert active_rune(ctl, small) == "default/ticker@1.0.0"
    assert held_runes(small) == ["default/ticker@1.0.0"]
    # The healthy-looking device installed it.
    wait_for(
        lambda: rollout_devices(ctl, rollout_id)[big.device_id]["state"] == "succeeded",
        WAIT_S,
        message="the big canary succeeded",
    )
    assert active_rune(ctl, big) == "default/ticker@2.0.0"

    status = ctl.cli("rollout", "status", rollout_id)
    text = one_line(status.stdout)
    assert f"rollout {rollout_id} default/ticker@2.0.0 paused" in text, status.stdout
    assert f"reason: {one_line(paused['reason'])}" in text, status.stdout
    assert "tripped" in text and "failure reasons (1 device)" in text, status.stdout
    assert health in text, status.stdout
    as_json = json.loads(ctl.cli("rollout", "status", rollout_id, "-o", "json").stdout)
    assert as_json["state"] == "paused" and as_json["reason"] == paused["reason"]

    # Paused: the devices of the second wave were never notified.
    for agent in later:
        assert rollout_commands(ctl, agent.device_id, rollout_id) == []
        assert active_rune(ctl, agent) == "default/ticker@1.0.0"
    assert rollout(ctl, rollout_id)["state"] == "paused"

    # The operator rolls it back: the canary returns to the version it ran before.
    ctl.cli("rollout", "rollback", rollout_id)
    wait_for(
        lambda: active_rune(ctl, big) == "default/ticker@1.0.0",
        WAIT_S,
        message="the big canary back on 1.0.0",
    )
    back = wait_for(
        lambda: rollout(ctl, rollout_id)["rollback"].get("done") == 2 and rollout(ctl, rollout_id),
        WAIT_S,
        message="both rollbacks done",
    )
    assert back["state"] == "rolled-back", back
    for agent in later:
        assert rollout_commands(ctl, agent.device_id, rollout_id) == []


def test_on_failure_rollback_returns_every_touched_device_to_its_previous_version(
    fleet: Fleet,
) -> None:
    ctl = fleet.ctl
    created = create(
        ctl, "ticker@2.0.0", fleet.tickers,
        waves="2,100%", success="50%", min_executed=3, max_failures="20%", retries=0,
        on_failure="rollback",
    )  # fmt: skip
    rollout_id = created["id"]
    assert [len(w["devices"]) for w in created["plan"]] == [2, 3]
    done = wait_state(ctl, rollout_id)
    assert done["state"] == "rolled-back", done
    assert done["reason"].startswith("wave 2: 1 of 3 finished devices failed"), done["reason"]
    assert [w["wave"] for w in done["waves"]] == [1, 2]
    assert done["waves"][0]["passed_at"] is not None and done["waves"][1]["tripped_at"] is not None
    assert done["counts"]["succeeded"] == 3 and done["counts"]["failed"] == 2, done

    devices = rollout_devices(ctl, rollout_id)
    health = "failed call 4 of 6"
    for agent in fleet.tickers:
        commands = {c["id"]: c for c in rollout_commands(ctl, agent.device_id, rollout_id)}
        deploy, back = (
            f"{rollout_id}.{agent.device_id}.1",
            f"{rollout_id}.{agent.device_id}.rollback",
        )
        assert set(commands) == {deploy, back}, commands
        assert commands[back]["type"] == "rollback", commands
        assert commands[back]["body"]["to"] == "default/ticker@1.0.0", commands
        if agent in fleet.small:
            assert devices[agent.device_id]["state"] == "failed", devices
            assert health in devices[agent.device_id]["reason"], devices
            assert commands[deploy]["state"] == "failed", commands
            assert held_runes(agent) == ["default/ticker@1.0.0"]  # nothing was installed
        else:
            assert devices[agent.device_id]["state"] == "succeeded", devices
            assert commands[deploy]["state"] == "succeeded", commands
    # Every rollback ends: back through the device's previous slot, or nothing to do.
    wait_for(
        lambda: rollout(ctl, rollout_id)["rollback"].get("done") == 5,
        WAIT_S,
        message="all five rollbacks done",
    )
    for agent in fleet.tickers:
        back = get(ctl, f"/api/v1/commands/{rollout_id}.{agent.device_id}.rollback")
        expected = "done" if agent in fleet.small else "rolled-back"
        assert back["state"] == expected, back
        assert active_rune(ctl, agent) == "default/ticker@1.0.0"
        results = {r["id"]: r for r in agent.channel()["results"]}
        assert results[back["id"]]["state"] == expected, results


def test_a_rollout_starting_later_notifies_nobody_until_then(fleet: Fleet) -> None:
    ctl = fleet.ctl
    ids = ",".join(a.device_id for a in fleet.tickers)
    made = ctl.cli(
        "rollout", "create", "ticker@3.0.0", "--devices", ids,
        "--waves", "1,100%", "--soak", "0", "--start-at", "+5s", "-o", "json",
    )  # fmt: skip
    created = json.loads(made.stdout)
    rollout_id = created["id"]
    start_at = datetime.fromisoformat(created["options"]["start_at"])
    assert created["state"] == "scheduled" and created["started_at"] is None, created

    seen_scheduled = 0

    def started() -> Any:
        nonlocal seen_scheduled
        # Commands first, then the state: if it is still scheduled after, there were none.
        commands = [
            c for a in fleet.tickers for c in rollout_commands(ctl, a.device_id, rollout_id)
        ]
        body = rollout(ctl, rollout_id)
        if body["state"] != "scheduled":
            return body
        seen_scheduled += 1
        assert commands == [], commands
        assert body["waves"] == [] and body["counts"]["pending"] == 0, body
        return None

    wait_for(started, WAIT_S, interval=0.2, message="the rollout to start")
    assert seen_scheduled >= 1
    done = wait_state(ctl, rollout_id)
    assert done["state"] == "completed", done
    assert datetime.fromisoformat(done["started_at"]) >= start_at, done
    assert_notified_once(ctl, fleet.tickers, rollout_id, "default/ticker@3.0.0")
    for agent in fleet.tickers:
        (command,) = rollout_commands(ctl, agent.device_id, rollout_id)
        assert datetime.fromisoformat(command["created_at"]) >= start_at, command


def test_a_device_that_stops_answering_times_out_and_the_rollout_still_ends(
    fleet: Fleet,
) -> None:
    ctl = fleet.ctl
    spare, healthy = fleet.spare, fleet.small[0]
    assert spare.process is not None
    # Frozen: still connected (online) when notified, but it will never act on the command.
    os.kill(spare.process.pid, signal.SIGSTOP)
    try:
        created = create(
            ctl, "beacon@1.0.0", [spare, healthy, fleet.never],
            waves="100%", success="50%", device_timeout="3s", retries=0,
        )  # fmt: skip
        rollout_id = created["id"]
        wait_for(
            lambda: (
                rollout_devices(ctl, rollout_id).get(spare.device_id, {}).get("state") == "notified"
            ),
            WAIT_S,
            message="the frozen device notified",
        )
    finally:
        spare.kill()  # and then gone for good
    done = wait_state(ctl, rollout_id)
    assert done["state"] == "completed", done
    assert done["counts"]["timed-out"] == 1 and done["counts"]["succeeded"] == 1, done
    assert done["counts"]["skipped"] == 1, done
    devices = rollout_devices(ctl, rollout_id)
    assert devices[spare.device_id]["state"] == "timed-out", devices
    assert devices[spare.device_id]["reason"] == "no result 3s after notification", devices
    assert devices[spare.device_id]["attempt"] == 1
    assert devices[fleet.never.device_id]["state"] == "skipped", devices
    assert devices[fleet.never.device_id]["reason"] == "offline", devices
    assert rollout_commands(ctl, fleet.never.device_id, rollout_id) == []
    # The outbox's own sweep ends the command too (its deadline is the device timeout), and that
    # late news changes nothing in the finished rollout.
    (command,) = rollout_commands(ctl, spare.device_id, rollout_id)
    wait_for(
        lambda: get(ctl, f"/api/v1/commands/{command['id']}")["state"] == "timed-out",
        WAIT_S,
        message="the command timed out",
    )
    assert rollout(ctl, rollout_id)["counts"] == done["counts"]
    assert done["failure_reasons"] == {"no result 3s after notification": 1}, done
    assert_notified_once(ctl, [healthy], rollout_id, "default/beacon@1.0.0")


# The broker restarted mid-rollout.


@pytest.fixture(scope="module")
def brokered(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningController, PlainMosquitto, list[AgentProcess]]]:
    """A controller on a private Mosquitto (`--mqtt-url`), five running agents, `ticker@1.0.0`."""
    tmp = tmp_path_factory.mktemp("rollout-broker")
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(plain_mosquitto(tmp / "mosquitto"))
        ctl = stack.enter_context(
            controller_for("sqlite", tmp, serve_args=("--mqtt-url", broker.url))
        )
        agents = enroll_agents(ctl, tmp, 5)
        ctl.push(
            write_legacy_rune(tmp, "ticker.rune"), org="default", name="ticker", version="1.0.0"
        )
        for agent in agents:
            stack.callback(agent.stop)
            agent.start()
        wait_online(ctl, agents)
        yield ctl, broker, agents


def test_a_broker_restarted_mid_rollout_notifies_every_device_once(
    brokered: tuple[RunningController, PlainMosquitto, list[AgentProcess]],
) -> None:
    ctl, broker, agents = brokered
    created = create(ctl, "ticker@1.0.0", agents, waves="1,100%", rate="1/s")
    rollout_id = created["id"]

    def underway() -> Any:
        body = rollout(ctl, rollout_id)
        counts = body["counts"]
        return len(body["waves"]) == 2 and counts["succeeded"] >= 1 and counts["pending"] >= 1

    wait_for(underway, WAIT_S, interval=0.05, message="a device updated, the last wave started")
    failures_before = broker_failures(ctl)
    broker.stop()
    try:
        # Stopping, the broker delivered every device's last will: the controller's presence
        # says offline. The outage lasts three failed reconnections of the controller (scheduler
        # ticks happen meanwhile); no device is skipped as offline, nothing ends.
        wait_for(
            lambda: broker_failures(ctl) >= failures_before + 3,
            WAIT_S,
            message="the controller failing to reconnect",
        )
        middle = rollout(ctl, rollout_id)
        assert middle["state"] == "running", middle
        assert middle["counts"]["skipped"] == 0 and middle["counts"]["pending"] >= 1, middle
    finally:
        broker.start()
    done = wait_state(ctl, rollout_id)
    assert done["state"] == "completed", done
    assert done["counts"]["succeeded"] == len(agents), rollout_devices(ctl, rollout_id)
    assert_notified_once(ctl, agents, rollout_id, "default/ticker@1.0.0")
    assert broker.starts == 2


def broker_failures(ctl: RunningController) -> int:
    """How many times the controller's broker link lost or could not reach the broker."""
    events = [json.loads(line).get("event") for line in ctl.stderr.splitlines() if line]
    return sum(e in ("broker.disconnected", "broker.unreachable") for e in events)


# Two replicas on one PostgreSQL database.


def second_replica(first: RunningController, tmp: Path, serve_args: tuple[str, ...]) -> Any:
    """Another `fleetctl serve` of `first`'s fleet dir and database, on another port."""
    process, url = spawn_serve(
        first.fleet_dir, first.db_url, f"127.0.0.1:{free_port()}", tmp / "serve-101", serve_args
    )
    return replace(first, url=url, process=process, serve_args=serve_args, _starts=101)


def leading(ctl: RunningController) -> float:
    return ctl.metric("fleet_rollout_scheduler_leading")


def test_two_replicas_schedule_once_and_the_survivor_takes_over(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(plain_mosquitto(tmp_path / "mosquitto"))
        serve_args = ("--mqtt-url", broker.url, "--mqtt-share-group", "replicas")
        first = stack.enter_context(controller_for("postgres", tmp_path, serve_args=serve_args))
        for version, nbytes in (("1.0.0", 1), ("2.0.0", 2)):
            rune = write_legacy_rune(tmp_path, f"ticker-{version}.rune", nbytes=nbytes)
            first.push(rune, org="default", name="ticker", version=version)
        wait_for(lambda: leading(first) == 1, WAIT_S, message="the first replica leading")
        second: RunningController = second_replica(first, tmp_path, serve_args)
        stack.callback(second.stop)
        # The devices use the second replica's repository: it is the one that survives.
        agents = enroll_agents(second, tmp_path, 4)
        for agent in agents:
            stack.callback(agent.stop)
            agent.start()
        wait_online(second, agents)
        assert leading(first) == 1 and leading(second) == 0

        # A rollout created through the replica that does not schedule.
        created = create(second, "ticker@1.0.0", agents, waves="1,100%", rate="2/s")
        done = wait_state(second, created["id"])
        assert done["state"] == "completed", done
        assert_notified_once(second, agents, created["id"], "default/ticker@1.0.0")
        assert leading(first) == 1 and leading(second) == 0
        assert "rollout.scheduler_leading" in first.stderr
        assert "rollout.scheduler_leading" not in second.stderr

        # The lock holder dies mid-rollout; the other replica takes over.
        created = create(second, "ticker@2.0.0", agents, waves="1,100%", rate="1/s")
        rollout_id = created["id"]
        underway = wait_for(
            lambda: (body := rollout(second, rollout_id))["counts"]["succeeded"] >= 1 and body,
            WAIT_S,
            message="a first device updated",
        )
        first.kill()
        assert underway["state"] == "running", underway
        assert underway["counts"]["succeeded"] < len(agents), underway
        wait_for(lambda: leading(second) == 1, WAIT_S, message="the second replica leading")
        assert "rollout.scheduler_leading" in second.stderr
        done = wait_state(second, rollout_id)
        assert done["state"] == "completed", done
        assert done["counts"]["succeeded"] == len(agents), rollout_devices(second, rollout_id)
        assert_notified_once(second, agents, rollout_id, "default/ticker@2.0.0")
