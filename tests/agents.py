"""Real `fleet-agent run` processes for tests, and the controller calls that follow them.

- `AgentProcess(state_dir, device_id)`: `start()` runs the daemon on an enrolled state dir (its
  output goes to `agent.log` there), `stop()` sends SIGTERM (SIGKILL after 15 s), `kill()` is the
  crash. `channel()` is its persisted channel state, `slots_state()` what its slots hold.
- `enroll_agents(ctl, tmp, count)` enrolls `count` devices with one token, each with an
  `agent.yaml` that runs the active rune on random input (plus the owner's `policy` settings,
  with the `labels` asked for), and returns them stopped.
- `broker_url(ctl)` is the device broker address the controller printed at start;
  `wait_online(ctl, agents)` waits until they are online and attested.
- `deploy(ctl, device_id, ref)` is `fleetctl devices deploy --wait -o json`; `get`/`post` are the
  REST API, asserting success.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.controller import FLEET_AGENT, RunningController, wait_for

TERMINAL = {"succeeded", "failed", "refused", "rolled-back", "done", "timed-out"}


@dataclass
class AgentProcess:
    state_dir: Path
    device_id: str
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None  # set for the agent process on top of ours

    def start(self) -> None:
        with (self.state_dir / "agent.log").open("ab") as log:
            self.process = subprocess.Popen(
                [FLEET_AGENT, "run", "--state-dir", str(self.state_dir)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
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


def enroll_agents(
    ctl: RunningController,
    tmp: Path,
    count: int,
    *,
    prefix: str = "device",
    labels: Mapping[str, str] | None = None,
    policy: Mapping[str, Any] | None = None,
    interval_s: float = 0.2,
) -> list[AgentProcess]:
    """`count` devices enrolled with one token (state dirs `tmp/{prefix}-N`), not started.

    `labels` are asked for at enrollment (`--label k=v`); `policy` is merged into each device's
    `agent.yaml` (the owner's settings: `health_check_calls`, `probation`...)."""
    token = post(ctl, "/api/v1/enrollment-tokens", {"uses": count, "ttl_s": 600})["token"]
    asked = [arg for k, v in (labels or {}).items() for arg in ("--label", f"{k}={v}")]
    agents = []
    for index in range(count):
        state_dir = tmp / f"{prefix}-{index}"
        state_dir.mkdir()
        run = {"input": {"kind": "random", "seed": 1}, "interval_s": interval_s}
        (state_dir / "agent.yaml").write_text(yaml.safe_dump({**(policy or {}), "run": run}))
        enrolled = ctl.enroll(state_dir, *asked, token=token)
        assert enrolled.returncode == 0, enrolled.stderr
        agents.append(AgentProcess(state_dir, json.loads(enrolled.stdout)["device_id"]))
    return agents


def wait_online(ctl: RunningController, agents: list[AgentProcess], timeout: float = 120) -> None:
    """Until every agent is online and has a fresh affirming attestation (the controller asks a
    device to attest when it connects), so a rollout may take it."""

    def ready(device: dict[str, Any]) -> bool:
        attested = device.get("attestation") or {}
        return bool(
            device["online"] and attested.get("status") == "affirming" and attested["fresh"]
        )

    def waiting() -> list[dict[str, Any]]:
        devices = [get(ctl, f"/api/v1/devices/{a.device_id}") for a in agents]
        return [
            {"id": d["id"], "online": d["online"], "attestation": d["attestation"]}
            for d in devices
            if not ready(d)
        ]

    try:
        wait_for(lambda: not waiting(), timeout=timeout, message="agents online and attested")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still waiting for {waiting()}") from None


def deploy(ctl: RunningController, device_id: str, ref: str) -> dict[str, Any]:
    done = ctl.cli(
        "devices", "deploy", device_id, ref, "--wait", "-o", "json", check=False, timeout=120
    )
    assert done.stdout, done.stderr
    return dict(json.loads(done.stdout))


def broker_url(ctl: RunningController) -> str:
    for stdout in sorted(ctl.fleet_dir.parent.glob("serve-*.stdout")):
        for line in stdout.read_text().splitlines():
            if line.startswith("broker "):
                return line.removeprefix("broker ").strip()
    raise AssertionError("the controller printed no broker URL")


def get(ctl: RunningController, path: str) -> Any:
    status, body = ctl.api("GET", path)
    assert status == 200, body
    return body


def post(ctl: RunningController, path: str, json_body: Any) -> Any:
    status, body = ctl.api("POST", path, json_body)
    assert status in (200, 201), body
    return body
