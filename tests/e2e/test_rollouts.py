"""Rollouts end to end: a real `fleetctl serve` and real `fleet-agent run` processes.

- A healthy rollout to 20 devices (waves `1,50%,100%`, no soak) reaches `completed` with every
  running device `succeeded`, each with exactly one deploy command (`{rollout}.{device}.1`) that
  its agent ran, and the device that never came online `skipped` (offline); `/metrics` counts
  exactly those notifications, the skip, the three waves and the two transitions.
- A controller killed (`kill -9`) mid-rollout and started again resumes the rollout from its
  stored state to `completed`, without notifying any device twice.
- `fleetctl rollout` (create, dry run, status --watch, rollback, list, a refused pause) rolls a
  new version out and the whole fleet back: every device ends on the version it ran before,
  through its own A/B rollback.
- A targeted rollback (`"to": ORG/NAME@VERSION`) fails and changes nothing when the previous slot
  holds another version (or none), answers `done` when that version is already active, and the
  API refuses a `to` that is not a rune ref.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agents import AgentProcess, enroll_agents, get, post, wait_online
from tests.controller import RunningController, controller_for, wait_for, write_legacy_rune
from tests.mosquitto import free_port

RUNNING = 20


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningController, list[AgentProcess], AgentProcess]]:
    """A controller, twenty running agents, one enrolled device that never connects, and the
    rune `ticker` published at 1.0.0, 2.0.0 and 3.0.0."""
    tmp = tmp_path_factory.mktemp("rollouts")
    with contextlib.ExitStack() as stack:
        # The embedded broker on a fixed port, so agents find it again after a restart.
        listen = ("--mqtt-listen", f"127.0.0.1:{free_port()}")
        ctl = stack.enter_context(controller_for("sqlite", tmp, serve_args=listen))
        agents = enroll_agents(ctl, tmp, RUNNING + 1)
        running, offline = agents[:RUNNING], agents[RUNNING]
        for number, version in enumerate(("1.0.0", "2.0.0", "3.0.0"), start=1):
            rune = write_legacy_rune(tmp, f"ticker-{version}.rune", nbytes=number)
            ctl.push(rune, org="default", name="ticker", version=version)
        for agent in running:
            stack.callback(agent.stop)
            agent.start()
        wait_online(ctl, running)
        yield ctl, running, offline


def wait_finished(ctl: RunningController, rollout_id: str, timeout: float = 60) -> Any:
    def finished() -> Any:
        body = get(ctl, f"/api/v1/rollouts/{rollout_id}")
        return body if body["state"] in ("completed", "aborted", "rolled-back") else None

    return wait_for(finished, timeout=timeout, interval=0.2, message=f"rollout {rollout_id} ended")


def rollout_commands(ctl: RunningController, device_id: str, rollout_id: str) -> list[Any]:
    commands = get(ctl, f"/api/v1/devices/{device_id}/commands")["commands"]
    return [c for c in commands if c["id"].startswith(f"{rollout_id}.")]


def assert_notified_once(
    ctl: RunningController, agents: list[AgentProcess], rollout_id: str, version: str
) -> None:
    for agent in agents:
        commands = rollout_commands(ctl, agent.device_id, rollout_id)
        assert [c["id"] for c in commands] == [f"{rollout_id}.{agent.device_id}.1"], commands
        (command,) = commands
        assert command["state"] == "succeeded", command
        assert command["type"] == "deploy" and command["body"]["version"] == version, command
        results = {r["id"]: r for r in agent.channel().get("results", [])}
        assert results[command["id"]]["state"] == "succeeded", results
        device = get(ctl, f"/api/v1/devices/{agent.device_id}")
        assert device["active_rune"] == f"default/ticker@{version}", device


def test_a_healthy_rollout_completes_and_offline_devices_are_skipped(
    fleet: tuple[RunningController, list[AgentProcess], AgentProcess],
) -> None:
    ctl, agents, offline = fleet
    ids = [a.device_id for a in [*agents, offline]]
    created = post(
        ctl,
        "/api/v1/rollouts",
        {"rune": "ticker@1.0.0", "devices": ids, "waves": "1,50%,100%", "soak": "0"},
    )
    assert created["state"] == "scheduled" and created["selected"] == RUNNING + 1, created
    assert [len(w["devices"]) for w in created["plan"]] == [1, 10, 10]  # of 21: 1, 11, 21
    done = wait_finished(ctl, created["id"])
    assert done["state"] == "completed", done
    assert done["counts"]["succeeded"] == RUNNING and done["counts"]["skipped"] == 1, done
    assert [w["wave"] for w in done["waves"]] == [1, 2, 3]
    devices = {d["id"]: d for d in get(ctl, f"/api/v1/rollouts/{created['id']}/devices")["devices"]}
    assert devices[offline.device_id]["state"] == "skipped", devices
    assert devices[offline.device_id]["reason"] == "offline"
    assert devices[offline.device_id]["command_id"] is None
    for agent in agents:
        assert devices[agent.device_id]["state"] == "succeeded", devices
        assert devices[agent.device_id]["attempt"] == 1
    assert_notified_once(ctl, agents, created["id"], "1.0.0")
    assert rollout_commands(ctl, offline.device_id, created["id"]) == []

    # The first rollout of this controller: its counters hold exactly this rollout's decisions.
    assert ctl.metric("fleet_rollout_notifications_total", attempt="first") == RUNNING
    assert ctl.metric("fleet_rollout_notifications_total", attempt="retry") == 0
    assert ctl.metric("fleet_rollout_devices_skipped_total", reason="offline") == 1
    assert ctl.metric("fleet_rollout_waves_started_total") == 3
    assert ctl.metric("fleet_rollout_transitions_total", state="running") == 1
    assert ctl.metric("fleet_rollout_transitions_total", state="completed") == 1
    assert ctl.metric("fleet_rollout_scheduler_leading") == 1
    wait_for(
        lambda: (
            ctl.metric("fleet_rollouts", state="running") == 0
            and ctl.metric("fleet_rollout_devices", state="succeeded") == 0
        ),
        timeout=10,
        message="the finished rollout left the gauges",
    )


def test_a_controller_killed_mid_rollout_resumes_it_without_notifying_twice(
    fleet: tuple[RunningController, list[AgentProcess], AgentProcess],
) -> None:
    ctl, agents, _ = fleet
    created = post(
        ctl,
        "/api/v1/rollouts",
        # One notification a second, so the rollout is still going when the controller dies.
        {
            "rune": "ticker@2.0.0",
            "devices": [a.device_id for a in agents],
            "waves": "1,50%,100%",
            "soak": "0",
            "rate": "1/s",
        },
    )
    rollout_id = created["id"]

    def underway() -> bool:
        body = get(ctl, f"/api/v1/rollouts/{rollout_id}")
        return bool(body["state"] == "running" and body["counts"]["succeeded"] >= 2)

    wait_for(underway, timeout=60, interval=0.1, message="two devices updated")
    wait_for(
        lambda: (
            ctl.metric("fleet_rollouts", state="running") == 1
            and ctl.metric("fleet_rollout_devices", state="succeeded") >= 2
        ),
        timeout=10,
        message="the gauges show the running rollout",
    )
    ctl.kill()
    ctl.start()
    done = wait_finished(ctl, rollout_id, timeout=120)
    assert done["state"] == "completed", done
    assert done["counts"]["succeeded"] == RUNNING, done
    assert_notified_once(ctl, agents, rollout_id, "2.0.0")


def test_the_cli_rolls_out_then_rolls_the_fleet_back_to_the_previous_version(
    fleet: tuple[RunningController, list[AgentProcess], AgentProcess],
) -> None:
    """`fleetctl rollout` against the real controller: create, watch, rollback, refusals."""
    ctl, agents, _ = fleet
    devices = ",".join(a.device_id for a in agents)
    dry = ctl.cli("rollout", "create", "ticker@3.0.0", "--devices", devices, "--dry-run")
    assert "dry run:" in dry.stdout and "nothing was created" in dry.stdout, dry.stdout
    assert get(ctl, "/api/v1/rollouts?state=scheduled")["rollouts"] == []
    created = ctl.cli(
        "rollout", "create", "ticker@3.0.0", "--devices", devices,
        "--waves", "1,100%", "--soak", "0", "-o", "json",
    )  # fmt: skip
    rollout_id = json.loads(created.stdout)["id"]
    watched = ctl.cli("rollout", "status", rollout_id, "--watch", "-o", "json", timeout=120)
    assert json.loads(watched.stdout)["state"] == "completed"
    for agent in agents:
        assert get(ctl, f"/api/v1/devices/{agent.device_id}")["active_rune"].endswith("@3.0.0")

    ctl.cli("rollout", "rollback", rollout_id)
    back = ctl.cli(
        "rollout", "status", rollout_id, "--watch", "-o", "json", check=False, timeout=120
    )
    assert back.returncode == 1, back.stderr  # the rollout ended rolled back, not completed
    ended = json.loads(back.stdout)
    assert ended["state"] == "rolled-back", ended
    wait_for(
        lambda: all(
            get(ctl, f"/api/v1/devices/{a.device_id}")["active_rune"] == "default/ticker@2.0.0"
            for a in agents
        ),
        timeout=60,
        message="every device back on the previous version",
    )
    for agent in agents:
        commands = rollout_commands(ctl, agent.device_id, rollout_id)
        rollback = [c for c in commands if c["id"].endswith(".rollback")]
        assert len(rollback) == 1 and rollback[0]["type"] == "rollback", commands
        wait_for(
            lambda c=rollback[0], a=agent: (
                get(ctl, f"/api/v1/commands/{c['id']}")["state"] == "rolled-back"
            ),
            timeout=30,
            message="the rollback command ended rolled-back",
        )

    refused = ctl.cli("rollout", "pause", rollout_id, check=False)
    assert refused.returncode != 0
    assert refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    listed = ctl.cli("rollout", "list", "-o", "json")
    assert rollout_id in {r["id"] for r in json.loads(listed.stdout)["rollouts"]}


def test_a_targeted_rollback_changes_nothing_unless_the_previous_slot_holds_its_version(
    fleet: tuple[RunningController, list[AgentProcess], AgentProcess], tmp_path: Path
) -> None:
    """After the CLI test every device runs 2.0.0, and its previous slot is empty: a rollback
    retires the version it leaves."""
    ctl, agents, _ = fleet
    agent = agents[0]
    path = f"/api/v1/devices/{agent.device_id}"

    def rollback_to(to: str) -> Any:
        command = post(ctl, f"{path}/commands", {"type": "rollback", "to": to})
        return wait_for(
            lambda: (
                (c := get(ctl, f"/api/v1/commands/{command['id']}"))["state"]
                in ("done", "failed", "rolled-back")
                and c
            ),
            timeout=30,
            message=f"the rollback to {to} answered",
        )

    assert get(ctl, path)["active_rune"] == "default/ticker@2.0.0"
    empty = rollback_to("default/ticker@1.0.0")
    assert empty["state"] == "failed", empty
    assert "the previous slot holds nothing, not default/ticker@1.0.0" in empty["reason"]

    ctl.push(write_legacy_rune(tmp_path, "ticker-4.0.0.rune", nbytes=4), name="ticker",
             org="default", version="4.0.0")  # fmt: skip
    deployed = post(ctl, f"{path}/deploy", {"rune": "ticker@4.0.0"})
    wait_for(
        lambda: get(ctl, f"/api/v1/commands/{deployed['id']}")["state"] == "succeeded",
        timeout=30,
        message="4.0.0 deployed",
    )
    before = agent.slots_state()
    wrong = rollback_to("default/ticker@1.0.0")
    assert wrong["state"] == "failed", wrong
    assert "previous slot holds default/ticker@2.0.0, not default/ticker@1.0.0" in wrong["reason"]
    active = rollback_to("default/ticker@4.0.0")
    assert active["state"] == "done", active
    assert active["reason"] == "default/ticker@4.0.0 is already active"
    assert get(ctl, path)["active_rune"] == "default/ticker@4.0.0"
    assert agent.slots_state() == before

    status, body = ctl.api("POST", f"{path}/commands", {"type": "rollback", "to": "ticker"})
    assert status == 400 and "ORG/NAME@VERSION" in body["error"], body
