"""Fixtures for the update attack suite: a real controller per backend, runes, a device, a mirror.

- `controller`: `fleetctl init` + `fleetctl serve` (tests/controller.py), module-scoped and
  parametrized over `sqlite` and `postgres` (a fresh database; skipped without
  FLEET_TEST_POSTGRES_URL, failed when CI requires it). Tests that change the fleet (push, revoke,
  rotate keys) use rune names of their own, so they can share it.
- `runes`: builds real rune files (sine/gesture bundles from the examples, legacy `.rune`s from
  tests/legacy_runes.py) once per session.
- `Agent`: one device, driven only through the real `fleet-agent` console script in a
  subprocess; `DeviceSnapshot` is what "nothing was installed" is checked against.
- `mirror`: a `tests.security.mirror.Mirror` in front of the controller, one per test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ota.rune.build import build_bundle
from tests.controller import BACKENDS, RunningController, controller_for
from tests.security.mirror import Mirror

FLEET_AGENT = str(Path(sys.executable).parent / "fleet-agent")
AGENT_TIMEOUT_S = 60.0
EXIT_REFUSED = 3
EXIT_FAILED = 1
# Variables that would point the agent at another state dir or server, or crash it.
_SCRUBBED_ENV = ("FLEET_AGENT_STATE_DIR", "FLEET_SERVER", "FLEET_AGENT_KILL_AT")


@pytest.fixture(scope="module", params=BACKENDS)
def controller(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningController]:
    backend: str = request.param
    with controller_for(backend, tmp_path_factory.mktemp(f"controller-{backend}")) as running:
        yield running


# Runes.


class Runes:
    """Real rune files, built once: `bundle("sine", "evil", "1.0.0")`, `legacy(...)`."""

    def __init__(self, examples_dir: Path, out: Path) -> None:
        self.examples_dir = examples_dir
        self.out = out

    def bundle(self, example: str, name: str, version: str) -> Path:
        """The `example` Runefile (sine or gesture) built as NAME@VERSION."""
        path = self.out / f"{example}-{name}-{version}.runebundle"
        if not path.exists():
            runefile = self.examples_dir / example / "Runefile.yml"
            path.write_bytes(build_bundle(runefile, name=name, version=version).data)
        return path

    def file(self, filename: str, data: bytes) -> Path:
        path = self.out / filename
        path.write_bytes(data)
        return path


@pytest.fixture(scope="session")
def runes(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runes:
    return Runes(examples_dir, tmp_path_factory.mktemp("runes"))


# The device.


@dataclass
class AgentResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    peak_rss_kib: int

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def error_line(self) -> str:
        """The agent's one `error:` line (and assert there is exactly one and no traceback)."""
        assert "Traceback" not in self.stderr, self.stderr
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"expected one error line:\n{self.stderr}"
        return errors[0]

    def __str__(self) -> str:
        return (
            f"fleet-agent {' '.join(self.args)} -> {self.returncode} in {self.elapsed:.2f}s\n"
            f"stdout: {self.stdout}\nstderr: {self.stderr}"
        )


def run_agent(
    *args: str | Path, env: Mapping[str, str] | None = None, timeout: float = AGENT_TIMEOUT_S
) -> AgentResult:
    """Run `fleet-agent ARGS`; its exit status, output, wall time and peak memory.

    The peak is the agent's own `VmHWM`, sampled every few ms while it runs (`ru_maxrss` would
    also count the pytest process it was forked from).
    """
    environment = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    environment.update(env or {})
    argv = [FLEET_AGENT, *map(str, args)]
    started = time.monotonic()
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Popen returns once the child has exec'd, so every sample below is the agent's.
        process = subprocess.Popen(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=environment
        )
        status_file = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            peak = max(peak, _high_water_kib(status_file))
            if time.monotonic() - started > timeout:
                process.kill()
                process.wait()
                raise AssertionError(f"fleet-agent {' '.join(argv[1:])} ran over {timeout}s")
            time.sleep(0.003)
        out.seek(0)
        err.seek(0)
        return AgentResult(
            tuple(argv[1:]),
            process.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            time.monotonic() - started,
            peak,
        )


def _high_water_kib(status_file: Path) -> int:
    try:
        for line in status_file.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass  # it exited (a zombie has no memory lines)
    return 0


@dataclass(frozen=True)
class DeviceSnapshot:
    """The bytes of a device's slots: `state.json` and each slot's `rune` and `meta.json`."""

    state: bytes | None
    files: dict[str, bytes]

    def history(self) -> list[dict[str, Any]]:
        return json.loads(self.state)["history"] if self.state else []


@dataclass
class Agent:
    """One device (its state dir), driven through the `fleet-agent` CLI."""

    state_dir: Path
    root_json: Path

    def cli(self, *args: str | Path, env: Mapping[str, str] | None = None) -> AgentResult:
        return run_agent(*args, "--state-dir", self.state_dir, env=env)

    def update(
        self, server: str, ref: str, org: str = "acme", env: Mapping[str, str] | None = None
    ) -> AgentResult:
        """`fleet-agent update ... -o json` (with --root: it is only used the first time)."""
        return self.cli(
            "update",
            "--server",
            server,
            "--target",
            ref,
            "--org",
            org,
            "--root",
            self.root_json,
            "-o",
            "json",
            env=env,
        )

    def install(self, server: str, ref: str, org: str = "acme") -> AgentResult:
        result = self.update(server, ref, org)
        assert result.returncode == 0, result
        assert result.json["status"] == "installed", result
        return result

    def check(self, server: str) -> AgentResult:
        return self.cli("check", "--server", server)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "-o", "json")
        assert result.returncode == 0, result
        status: dict[str, Any] = result.json
        return status

    def active_ref(self) -> str | None:
        active = self.status()["active"]
        return None if active is None else f"{active['name']}@{active['version']}"

    def run(self, count: int = 1) -> AgentResult:
        return self.cli("infer", "--count", str(count))

    def snapshot(self) -> DeviceSnapshot:
        slots = self.state_dir / "slots"
        state = slots / "state.json"
        files = {
            str(p.relative_to(slots)): p.read_bytes()
            for p in sorted(slots.glob("*/*"))
            if p.is_file()
        }
        return DeviceSnapshot(state.read_bytes() if state.exists() else None, files)

    def trusted(self, filename: str) -> dict[str, Any]:
        """A trusted TUF metadata file of the device (`root.json`, `timestamp.json`...)."""
        data: dict[str, Any] = json.loads((self.state_dir / "tuf" / filename).read_bytes())
        return data


def new_agent(controller: RunningController, state_dir: Path) -> Agent:
    """A device registered with `controller`, with its identity in `state_dir`."""
    controller.device(state_dir)
    return Agent(state_dir, controller.root_json)


def assert_refused(result: AgentResult, kind: str) -> str:
    """Exit 3, `-o json` says refused with `kind`, and one clear error line; that line."""
    assert result.returncode == EXIT_REFUSED, result
    body = result.json
    assert (body["status"], body["kind"]) == ("refused", kind), result
    assert body["reason"] and "\n" not in body["reason"], result
    line = result.error_line()
    assert line.startswith(f"error: update refused ({kind}): "), line
    assert line.endswith("nothing was installed"), line
    return line


def assert_nothing_installed(
    agent: Agent, before: DeviceSnapshot, *attacker: bytes, partial_ok: bool = False
) -> None:
    """The slots are byte for byte what they were, no slot holds the attacker's bytes, no rune
    was installed or switched to, and no downloaded bytes were left behind."""
    after = agent.snapshot()
    assert after.state == before.state, "slots/state.json changed"
    assert after.files == before.files, "a slot changed"
    new_events = after.history()[len(before.history()) :]
    assert new_events == [], new_events
    for data in attacker:
        for name, content in after.files.items():
            assert content != data, f"slots/{name} holds the attacker's bytes"
    if not partial_ok:
        leftovers = list((agent.state_dir / "partial").glob("*"))
        leftovers += list((agent.state_dir / "tuf" / "downloads").glob("*"))
        assert leftovers == [], leftovers


# The baseline device: sine@1.0.0 installed legitimately, sine@2.0.0 published.


@dataclass(frozen=True)
class Baseline:
    template: Path
    root_json: Path
    v1: bytes
    v2: bytes
    v2_target: str
    v2_sha256: str

    def copy_to(self, state_dir: Path) -> Agent:
        """The same device (same identity) with v1 installed, in a state dir of its own."""
        shutil.copytree(self.template, state_dir)
        return Agent(state_dir, self.root_json)


@pytest.fixture(scope="module")
def baseline(
    controller: RunningController, runes: Runes, tmp_path_factory: pytest.TempPathFactory
) -> Baseline:
    v1 = runes.bundle("sine", "sine", "1.0.0")
    v2 = runes.bundle("sine", "sine", "2.0.0")
    controller.push(v1)
    pushed = controller.push(v2)
    template = tmp_path_factory.mktemp("baseline") / "device"
    agent = new_agent(controller, template)
    agent.install(controller.url, "sine@1.0.0")
    return Baseline(
        template,
        controller.root_json,
        v1.read_bytes(),
        v2.read_bytes(),
        pushed["target"],
        pushed["sha256"],
    )


@pytest.fixture
def device(baseline: Baseline, tmp_path: Path) -> Agent:
    """A device with sine@1.0.0 installed (acme); sine@2.0.0 is published."""
    return baseline.copy_to(tmp_path / "device")


@pytest.fixture
def mirror(controller: RunningController) -> Iterator[Mirror]:
    with Mirror(controller.url) as running:
        yield running
