"""Power loss at every step of an install leaves a runnable rune, and the update can be retried.

For each crash point in `agent.faults.STEPS`, a device running power@1.0.0 (a legacy rune) updates
to power@2.0.0 (the same rune padded to 160 KiB, so its download takes several chunks) with
FLEET_AGENT_KILL_AT set: the agent SIGKILLs itself at that step. Then, as after a reboot:
`fleet-agent status` shows a consistent state (the active rune verifies), `fleet-agent run` runs
v1 (crashes before the switch) or v2 (after it), no temp file survives the start, and the retried
update completes. A download cut by the crash is resumed: the retry asks for the rest with
`Range` and transfers less than the whole file.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.faults import KILL_AT_ENV, STEPS
from ota.rune.runefile import CapabilityKind
from ota.rune.wasm import with_custom_section
from tests.controller import RunningController
from tests.legacy_runes import capability_rune
from tests.security.conftest import Agent, Runes, new_agent
from tests.security.mirror import Mirror, target_url_path

# Several 64 KiB fetcher chunks.
PADDING = 160 * 1024
SIGKILL = -9
_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass(frozen=True)
class Installed:
    """A device template running power@1.0.0; power@2.0.0 is published."""

    template: Path
    root_json: Path
    v2: bytes
    v2_url: str

    def copy_to(self, state_dir: Path) -> Agent:
        shutil.copytree(self.template, state_dir)
        return Agent(state_dir, self.root_json)


@pytest.fixture(scope="module")
def installed(
    controller: RunningController, runes: Runes, tmp_path_factory: pytest.TempPathFactory
) -> Installed:
    v1 = capability_rune(CapabilityKind.RAND, 16)
    padding = random.Random(0).randbytes(PADDING)
    v2 = with_custom_section(capability_rune(CapabilityKind.RAND, 16), "padding", padding)
    controller.push(runes.file("power-1.rune", v1), name="power", version="1.0.0")
    pushed = push_whole(controller, runes.file("power-2.rune", v2), name="power", version="2.0.0")
    template = tmp_path_factory.mktemp("power") / "device"
    device = new_agent(controller, template)
    device.install(controller.url, "power@1.0.0")
    ran = device.run()
    assert ran.returncode == 0, ran
    return Installed(
        template,
        controller.root_json,
        v2,
        target_url_path(pushed["target"], hashlib.sha256(v2).hexdigest()),
    )


def push_whole(controller: RunningController, path: Path, **params: str) -> dict[str, Any]:
    """Push `path` and check the controller published exactly its bytes."""
    data = path.read_bytes()
    status, body = controller.api(
        "POST", "/api/v1/runes", body=data, params={"org": "acme", **params}
    )
    assert status in (200, 201), body
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    result: dict[str, Any] = body
    return result


def temp_files(state_dir: Path) -> list[Path]:
    return [
        p for p in state_dir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".target-")
    ]


def ref(rune: dict[str, Any] | None) -> str | None:
    return None if rune is None else f"{rune['name']}@{rune['version']}"


@pytest.mark.parametrize("step", STEPS)
def test_power_loss_leaves_a_runnable_rune(
    step: str, installed: Installed, mirror: Mirror, tmp_path: Path
) -> None:
    device = installed.copy_to(tmp_path / "device")
    state_before = (device.state_dir / "slots" / "state.json").read_bytes()

    killed = device.update(mirror.url, "power@2.0.0", env={KILL_AT_ENV: step})

    assert killed.returncode == SIGKILL, killed
    switched = step == "probation"  # the switch is written; every earlier step is before it
    expected = "power@2.0.0" if switched else "power@1.0.0"
    state = json.loads((device.state_dir / "slots" / "state.json").read_bytes())
    partial = list((device.state_dir / "partial").glob("*.part"))
    if step in ("download", "verify"):  # the slots were not touched yet
        assert (device.state_dir / "slots" / "state.json").read_bytes() == state_before
    if step == "download":
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(installed.v2), partial
        stored = partial[0].stat().st_size
    else:
        assert partial == []
    if step == "write-slot":  # cut half-way through writing the rune into the inactive slot
        assert state["installing"] is not None
        assert list((device.state_dir / "slots").glob("*/rune.tmp"))
    if step == "switch":  # the slot is complete, the active pointer not moved
        assert state["history"][-1]["kind"] == "install"
    status = device.status()  # exit 0: the active slot verifies against its sha256
    assert ref(status["active"]) == expected
    if switched:
        assert ref(status["previous"]) == "power@1.0.0"
        assert status["probation"]["sha256"] == status["active"]["sha256"]

    ran = device.run()  # the next start: recovery, then one inference
    assert ran.returncode == 0, ran
    assert ran.stdout.strip(), ran
    assert [p for p in temp_files(device.state_dir) if p.parent.name != "downloads"] == []
    state = json.loads((device.state_dir / "slots" / "state.json").read_bytes())
    assert state["installing"] is None

    retried = device.update(mirror.url, "power@2.0.0")

    assert retried.returncode == 0, retried
    assert retried.json["status"] == ("already-active" if switched else "installed"), retried
    status = device.status()
    assert ref(status["active"]) == "power@2.0.0"
    assert status["active"]["sha256"] == hashlib.sha256(installed.v2).hexdigest()
    assert ref(status["previous"]) == "power@1.0.0"
    assert temp_files(device.state_dir) == []
    assert list((device.state_dir / "partial").glob("*")) == []

    downloads = mirror.exchanges_for(installed.v2_url)
    if step == "download":
        first, resumed = downloads
        assert first.range is None
        match = _RANGE.match(resumed.range or "")
        assert match is not None and int(match.group(1)) == stored, resumed
        assert resumed.status == 206
        assert resumed.sent == len(installed.v2) - stored < len(installed.v2)
    elif not switched:  # verified bytes are not kept: the retry downloads them again
        assert [d.range for d in downloads] == [None, None]
        assert [d.sent for d in downloads] == [len(installed.v2)] * 2


def test_large_rune_push_is_published_whole(controller: RunningController, runes: Runes) -> None:
    """A 2 MB rune (far below max_rune_bytes, 32 MiB) is published whole."""
    padding = random.Random(1).randbytes(2 * 1024 * 1024)
    data = with_custom_section(capability_rune(CapabilityKind.RAND, 16), "padding", padding)
    status, body = controller.api(
        "POST",
        "/api/v1/runes",
        body=runes.file("large.rune", data).read_bytes(),
        params={"org": "acme", "name": "large", "version": "1.0.0"},
    )
    assert status == 201, body
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
