"""`fleetctl demo`, the README's main command, run as a user runs it.

- `fleetctl demo --devices 2 -o json` exits 0 and prints one JSON object: every device verified,
  installed and running the example rune, with its id, state and active rune, and the rollout
  completed in two waves (the canary, then the other device), and each telemetry stream's fleet
  aggregate of the two devices' noisy reports with its error bar; the temporary
  directory it worked in is gone afterwards and none of its processes are left.
- Ctrl-C (SIGINT) in the middle stops every process the demo started and removes its files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.controller import FLEETCTL, _env, wait_for


def _leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes mentioning `marker` (the demo's temporary directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if marker in cmdline and "\nState:\tZ" not in status:
            found.append(cmdline)
    return found


def _demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FLEETCTL, "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env({"TMPDIR": str(tmp_path)}),
    )


def test_the_demo_deploys_to_every_device_and_cleans_up(tmp_path: Path) -> None:
    demo = _demo(tmp_path, "--devices", "2", "-o", "json")
    stdout, stderr = demo.communicate(timeout=300)

    assert demo.returncode == 0, stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["rune"] == "default/sine@0.1.0"
    assert summary["provenance"]["kind"] == "dsse"
    assert "demo-publisher" in summary["provenance"]["verified"]
    assert len(summary["devices"]) == 2
    assert len({device["id"] for device in summary["devices"]}) == 2
    for device in summary["devices"]:
        assert device["state"] == "succeeded", device
        assert device["active_rune"] == "default/sine@0.1.0"
        assert device["verified"] and device["installed"] and device["running"], device
        assert device["outputs"] > 0
    rollout = summary["rollout"]
    assert rollout["id"].startswith("r-") and rollout["state"] == "completed", rollout
    # A canary, then the rest: one device in each wave, both succeeded.
    assert [(w["wave"], w["size"], w["counts"]["succeeded"]) for w in rollout["waves"]] == [
        (1, 1, 1),
        (2, 1, 1),
    ], rollout
    assert all(sum(w["counts"].values()) == w["size"] for w in rollout["waves"]), rollout
    # The owners opted in: each stream's fleet aggregate of both devices' noisy reports.
    for stream in ("sine/sine_mean", "sine/sine_histogram"):
        aggregate = summary["telemetry"][stream]
        assert aggregate["devices"] == 2 and aggregate["reports"] >= 10, aggregate
        assert len(aggregate["value"]) == len(aggregate["error"]) == len(aggregate["keys"])
        assert all(error > 0 for error in aggregate["error"])
    assert "admin_token" not in summary
    assert list(tmp_path.iterdir()) == []
    assert _leftover_processes(str(tmp_path)) == []


def test_ctrl_c_stops_the_demo_and_removes_everything(tmp_path: Path) -> None:
    demo = _demo(tmp_path, "--devices", "2")
    try:
        # Interrupt once the agents exist: the controller and the agents are all running then.
        wait_for(
            lambda: list(tmp_path.glob("fleet-demo-*/agents/device-2")),
            timeout=120,
            message="the demo to reach its agents",
        )
        time.sleep(0.5)
        demo.send_signal(signal.SIGINT)
        stdout, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stdout + stderr
    assert list(tmp_path.iterdir()) == []
    assert _leftover_processes(str(tmp_path)) == []
