"""`fleetctl demo`: a whole fleet on this machine, end to end, on embedded defaults.

A temporary fleet (SQLite, the embedded broker inside the controller), N agents as separate
processes that enroll with a token and attest (evidence of their code, config and runes,
appraised by the controller), the example sine rune built with its in-toto statement, signed
by a publisher key the demo org's admission policy requires, pushed, and rolled out to every
device in two waves (a canary, then the rest; one wave for a single device) through signed
commands, then a summary of what each device attested, verified, installed and runs, and of the
rollout. The devices' owners opt in to the rune's two telemetry streams (visibly, as the first
thing each device does), so the demo ends with the fleet's noisy aggregate of the rune's output.

Rules:
- Everything lives in one temporary directory, removed on exit (Ctrl-C included) unless `--keep`;
  every process it started is stopped on exit, however it exits.
- Exit 0 only if the rollout completed and every device verified, installed and is running the
  rune (its outputs appear in the device's local sink); 1 if any did not, with the reason per
  device; 4 if a process of the demo could not start. The demo never prints a traceback for
  something that went wrong in it.
- "Running" is checked where the data is, on the device: the agent's output sink. No output
  leaves the device: the deployment status goes to the controller, and the telemetry streams the
  owners granted, as noisy per-window aggregates (`fleet.telemetry`). The demo's windows are
  `DEMO_WINDOW_S` long, so it has several reports per device within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from securesystemslib.signer import CryptoSigner
from urllib3 import encode_multipart_formdata

from attestation.keys import public_key_of, public_key_pem
from attestation.provenance import sign_statement
from fleet.client import ApiClient, ApiClientError, ControllerUnreachable
from ota.targets import DEFAULT_ORG

EXAMPLE = "sine"
EXAMPLE_VERSION = "0.1.0"
START_TIMEOUT_S = 90.0
FOLLOW_TIMEOUT_S = 300.0
DEMO_WAVES = "1,100%"  # a canary, then the rest
DEMO_SOAK = "0"
AGENT_RUN_CONFIG = {"input": {"kind": "random", "seed": 7}, "interval_s": 0.25}
DEMO_WINDOW_S = 1
DEMO_STREAMS = ("sine/sine_mean", "sine/sine_histogram")
TELEMETRY_REPORTS_PER_DEVICE = 5
TELEMETRY_TIMEOUT_S = 60.0
AGENT = "from agent.cli import main; main()"
FLEETCTL = "from fleet.cli import main; main()"


class DemoError(Exception):
    """A step of the demo that could not be done; the message says which and why."""


@dataclass
class DeviceRow:
    index: int
    state_dir: Path
    id: str = ""
    state: str = "enrolling"
    reason: str = ""
    active_rune: str | None = None
    outputs: int = 0
    attestation: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self.outputs > 0

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "reason": self.reason,
            "active_rune": self.active_rune,
            "verified": self.state == "succeeded",
            "installed": self.active_rune is not None,
            "running": self.running,
            "outputs": self.outputs,
            "attestation": self.attestation,
        }


@dataclass
class Processes:
    """The processes the demo started, stopped in reverse order whatever happens."""

    logs: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(
        self, name: str, code: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        # A Ctrl-C between the fork and the append would leave a process no one stops: hold it
        # until the process is recorded, then raise it.
        interrupted = False

        def hold(signum: int, frame: object) -> None:
            nonlocal interrupted
            interrupted = True

        previous = signal.signal(signal.SIGINT, hold)
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code, *args],
                stdout=subprocess.PIPE if name == "controller" else log,
                stderr=log,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
            self.started.append((name, process))
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt
        return process

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, process in reversed(self.started):
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run(ctx_console: Console, devices: int, keep: bool, as_json: bool) -> int:
    console = Console(stderr=True) if as_json else ctx_console
    workdir = Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    processes = Processes(workdir)
    finished = False
    try:
        summary = _demo(console, workdir, processes, devices, keep)
        finished = True
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}", highlight=False)
        console.print(f"logs: {workdir}" if keep else "(run with --keep to keep the logs)")
        return 4
    except KeyboardInterrupt:
        console.print("interrupted; stopping the demo")
        return 130
    finally:
        if not (keep and finished):
            processes.stop_all()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = summary["rollout"]["state"] == "completed" and all(
        d["verified"] and d["installed"] and d["running"] for d in summary["devices"]
    )
    if as_json:
        print(json.dumps(summary))
    else:
        _print_summary(console, summary)
    if keep:
        _keep_running(console, summary, processes, workdir)
    return 0 if ok else 1


def _demo(
    console: Console, workdir: Path, processes: Processes, count: int, keep: bool
) -> dict[str, Any]:
    import asyncio

    from fleet.fleetdir import FleetDir
    from fleet.init import create_fleet

    fleet_dir = FleetDir(workdir / "fleet")
    with console.status("creating a fleet (keys, TUF metadata, CA, SQLite)"):
        result = asyncio.run(create_fleet(fleet_dir, root_keys=1, root_threshold=1, name="demo"))
    console.print(f"fleet created in {fleet_dir.path} (root.json, keys, SQLite)")

    with console.status("starting the controller and its embedded MQTT broker"):
        controller = processes.start(
            "controller",
            FLEETCTL,
            "serve",
            "--dir",
            str(fleet_dir.path),
            "--listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        )
        server, broker = _controller_addresses(controller, workdir / "controller.log")
    console.print(f"controller on {server}, broker on {broker}")
    api = ApiClient(server, result.admin_token, timeout=30)

    with console.status(f"building and pushing the example rune {EXAMPLE}@{EXAMPLE_VERSION}"):
        bundle, statement = _build_example(workdir)
        publisher = CryptoSigner.generate_ed25519()
        _call(
            api,
            "PUT",
            f"/api/v1/policy/{DEFAULT_ORG}",
            json_body={
                "require_provenance": True,
                "add_publisher_keys": [
                    {
                        "name": "demo-publisher",
                        "public_pem": public_key_pem(public_key_of(publisher)).decode(),
                    }
                ],
            },
        )
        body, content_type = encode_multipart_formdata(
            {
                "rune": (f"{EXAMPLE}.runebundle", bundle, "application/octet-stream"),
                "attestation": ("statement", sign_statement(statement, publisher), "text/plain"),
            }
        )
        pushed = _call(
            api,
            "POST",
            "/api/v1/runes",
            body=body,
            content_type=content_type,
            params={"name": EXAMPLE, "version": EXAMPLE_VERSION},
        )
    console.print(f"pushed {pushed['target']} ({pushed['size']} bytes), signed as a TUF target")
    console.print(
        f"provenance: its in-toto statement, {pushed['provenance']['verified']}, "
        f"published as {pushed['provenance']['target']}",
        highlight=False,
    )

    token = _call(
        api,
        "POST",
        "/api/v1/enrollment-tokens",
        json_body={"uses": count, "ttl_s": 3600, "labels": {"demo": "yes"}},
    )["token"]
    rows = [DeviceRow(i + 1, workdir / "agents" / f"device-{i + 1}") for i in range(count)]
    with console.status(f"enrolling {count} devices with a single-use-each token"):
        for row in rows:
            row.id = _enroll(processes, row, server, fleet_dir.root_json, token)
            row.state = "enrolled"
    for row in rows:
        _opt_in(row)
    console.print(
        f"each device's owner opted in to {' and '.join(DEMO_STREAMS)} "
        f"(`fleet-agent consent grant`): noisy aggregates every {DEMO_WINDOW_S} s, no raw output"
    )
    with console.status("starting the agents"):
        for row in rows:
            processes.start(f"agent-{row.index}", AGENT, "run", "--state-dir", str(row.state_dir))
        _wait_online(api, rows)
    console.print(
        f"{count} agents enrolled, connected and attested (each its own process, key and "
        "measurement of its code)"
    )

    rollout = _call(
        api,
        "POST",
        "/api/v1/rollouts",
        json_body={
            "rune": f"{EXAMPLE}@{EXAMPLE_VERSION}",
            "selector": {"demo": "yes"},
            "waves": DEMO_WAVES if count > 1 else "100%",
            "soak": DEMO_SOAK,
        },
    )
    console.print(
        f"rollout {rollout['id']} created: "
        + ", then ".join(f"wave {w['wave']} {len(w['devices'])} device(s)" for w in rollout["plan"])
    )
    rollout = _follow(console, api, rollout["id"], rows)
    for row in rows:
        device = _call(api, "GET", f"/api/v1/devices/{row.id}")
        row.active_rune = device.get("active_rune")
        row.attestation = _attestation(device)
    _wait_running(rows)
    with console.status("waiting for the devices' telemetry reports"):
        telemetry = _telemetry(api, len(rows))
    return {
        "rune": f"default/{EXAMPLE}@{EXAMPLE_VERSION}",
        "provenance": pushed["provenance"],
        "controller": server,
        "broker": broker,
        "devices": [row.summary() for row in rows],
        "telemetry": telemetry,
        "rollout": {
            "id": rollout["id"],
            "state": rollout["state"],
            "waves": [
                {"wave": w["wave"], "size": w["size"], "counts": w["counts"]}
                for w in rollout["waves"]
            ],
        },
        **({"admin_token": result.admin_token, "workdir": str(workdir)} if keep else {}),
    }


def _controller_addresses(process: subprocess.Popen[bytes], log: Path) -> tuple[str, str]:
    assert process.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    server = broker = None
    while time.monotonic() < deadline and process.poll() is None:
        for line in list(lines):
            if line.startswith("listening on "):
                server = line.removeprefix("listening on ").strip()
            elif line.startswith("broker "):
                broker = line.removeprefix("broker ").strip()
        if server and broker:
            return server, broker
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise DemoError(f"the controller did not start within {START_TIMEOUT_S:.0f} s:\n{tail}")


def _read_lines(stream: IO[bytes], lines: list[str]) -> None:
    for raw in stream:
        lines.append(raw.decode(errors="replace"))


def _build_example(workdir: Path) -> tuple[bytes, dict[str, Any]]:
    """The example sine rune and its in-toto statement, built like `rune build` does from the
    repository's examples (their models are generated from code, so the demo needs a source
    checkout)."""
    import importlib.metadata
    import importlib.util

    from agent.sandbox.models import inspect_model
    from ota.rune.build import build_bundle, provenance_statement

    examples = Path(__file__).resolve().parent.parent / "examples"
    spec = importlib.util.spec_from_file_location("fleet_demo_models", examples / "models.py")
    if spec is None or spec.loader is None or not (examples / EXAMPLE).is_dir():
        raise DemoError(
            f"the demo builds the example rune from {examples}, which is missing: run it from a "
            "source checkout of Fleet (`python3 dev.py demo`)"
        )
    models = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(models)
    except ImportError as exc:
        raise DemoError(
            f"the example models need the dev tools ({exc}): `python3 dev.py demo`"
        ) from None
    scratch = workdir / "examples"
    shutil.copytree(examples, scratch, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    models.write_all(scratch)
    runefile = scratch / EXAMPLE / "Runefile.yml"
    result = build_bundle(runefile, inspect_model=inspect_model)
    statement = provenance_statement(
        result, f"{EXAMPLE}.runebundle", runefile, importlib.metadata.version("fleet-tinyml")
    )
    return result.data, statement


def _enroll(processes: Processes, row: DeviceRow, server: str, root: Path, token: str) -> str:
    row.state_dir.mkdir(parents=True)
    settings = {"run": AGENT_RUN_CONFIG, "telemetry": {"window_s": DEMO_WINDOW_S}}
    (row.state_dir / "agent.yaml").write_text(json.dumps(settings))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            AGENT,
            "enroll",
            "--server",
            server,
            "--root",
            str(root),
            "--token",
            token,
            "--state-dir",
            str(row.state_dir),
            "--label",
            f"slot={row.index}",
            "-o",
            "json",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise DemoError(f"device {row.index} could not enroll: {done.stderr.decode().strip()}")
    return str(json.loads(done.stdout)["device_id"])


def _opt_in(row: DeviceRow) -> None:
    """What a device owner does on the device: `fleet-agent consent grant STREAM...`."""
    done = subprocess.run(
        [sys.executable, "-c", AGENT, "consent", "grant", *DEMO_STREAMS,
         "--state-dir", str(row.state_dir)],
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise DemoError(f"device {row.index} could not opt in: {done.stderr.decode().strip()}")


def _telemetry(api: ApiClient, devices: int) -> dict[str, Any]:
    """Each demo stream's fleet aggregate, once every device sent a few reports of it."""
    wanted = devices * TELEMETRY_REPORTS_PER_DEVICE
    rune = f"{EXAMPLE}@{EXAMPLE_VERSION}"
    deadline = time.monotonic() + TELEMETRY_TIMEOUT_S
    while True:
        answers = {
            stream: _call(
                api,
                "GET",
                f"/api/v1/telemetry/streams/{stream}",
                params={"since": "1h", "rune": rune},
            )["aggregate"]
            for stream in DEMO_STREAMS
        }
        enough = all(a["devices"] == devices and a["reports"] >= wanted for a in answers.values())
        if enough or time.monotonic() > deadline:
            return answers
        time.sleep(0.5)


def _wait_online(api: ApiClient, rows: list[DeviceRow]) -> None:
    """Until every agent is connected and has attested (the controller asks each at connection);
    a device without a fresh affirming result would be skipped by the rollout."""
    deadline = time.monotonic() + START_TIMEOUT_S
    wanted = {row.id for row in rows}
    while time.monotonic() < deadline:
        devices = _call(api, "GET", "/api/v1/devices")["devices"]
        if wanted <= {d["id"] for d in devices if d.get("online") and _attestation(d)}:
            return
        time.sleep(0.2)
    raise DemoError(
        f"not every agent connected to the broker and attested within {START_TIMEOUT_S:.0f} s"
    )


def _attestation(device: dict[str, Any]) -> dict[str, Any] | None:
    """A device's attestation as the summary shows it: status and age (None: not yet)."""
    result = device.get("attestation")
    if not result:
        return None
    return {"status": result["status"], "age_s": result["age_s"], "reasons": result["reasons"]}


def _follow(console: Console, api: ApiClient, rollout_id: str, rows: list[DeviceRow]) -> Any:
    """Show the rollout (its waves, then each device) until it ends; the final rollout."""
    from fleet.rollout_cli import FINAL_ROLLOUT_STATES, rollout_view

    path = f"/api/v1/rollouts/{rollout_id}"
    deadline = time.monotonic() + FOLLOW_TIMEOUT_S
    rollout = _call(api, "GET", path)
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        while True:
            rollout = _call(api, "GET", path)
            by_id = {d["id"]: d for d in _call(api, "GET", f"{path}/devices")["devices"]}
            for row in rows:
                device = by_id.get(row.id)
                if device is not None:
                    row.state, row.reason = device["state"], device["reason"] or ""
            live.update(Group(rollout_view(rollout, bar_width=24), _table(rows)))
            # Nobody is there to resume a paused demo rollout: it ends the demo too.
            if rollout["state"] in (*FINAL_ROLLOUT_STATES, "paused"):
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"rollout {rollout_id} did not finish within {FOLLOW_TIMEOUT_S:.0f} s "
                    f"(it is {rollout['state']})"
                )
            time.sleep(0.25)
    console.print()
    return rollout


def _wait_running(rows: list[DeviceRow], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for row in rows:
            row.outputs = _count_outputs(row.state_dir)
        if all(row.running for row in rows if row.state == "succeeded"):
            return
        time.sleep(0.25)


def _count_outputs(state_dir: Path) -> int:
    sink = state_dir / "outputs.jsonl"
    try:
        with sink.open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def _table(rows: list[DeviceRow]) -> Table:
    table = Table(title=f"devices ({EXAMPLE}@{EXAMPLE_VERSION})")
    for column in ("#", "device", "state", "reason"):
        table.add_column(column)
    for row in rows:
        color = {"succeeded": "green", "pending": "dim"}.get(row.state, "yellow")
        if row.state in ("failed", "rolled-back", "timed-out", "skipped"):
            color = "red"
        table.add_row(str(row.index), row.id, f"[{color}]{row.state}[/{color}]", row.reason)
    return table


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title=f"Fleet demo: {summary['rune']}")
    table.add_column("device", no_wrap=True)
    for column in ("attested", "verified", "installed", "running", "outputs"):
        table.add_column(column)
    table.add_column("active rune", no_wrap=True)
    mark = {True: "[green]yes[/green]", False: "[red]no[/red]"}
    for device in summary["devices"]:
        attested = (device["attestation"] or {}).get("status")
        colour = {"affirming": "green", "warning": "yellow"}.get(attested or "", "red")
        table.add_row(
            device["id"],
            f"[{colour}]{attested or 'no'}[/]",
            mark[device["verified"]],
            mark[device["installed"]],
            mark[device["running"]],
            str(device["outputs"]),
            device["active_rune"] or "-",
        )
    console.print(table)
    for stream, aggregate in summary["telemetry"].items():
        if aggregate.get("value") is None:
            console.print(f"{stream}: no report yet", highlight=False)
            continue
        view = Table(
            title=f"telemetry {stream}",
            caption=f"the fleet's mean of {aggregate['reports']} noisy reports from "
            f"{aggregate['devices']} devices; ± is the 95% error bar of their noise",
        )
        for column in ("key", "value", "±"):
            view.add_column(column)
        for key, value, error in zip(
            aggregate["keys"], aggregate["value"], aggregate["error"], strict=True
        ):
            view.add_row(key, f"{value:.3f}", f"{error:.3f}")
        console.print(view)


def _keep_running(
    console: Console, summary: dict[str, Any], processes: Processes, workdir: Path
) -> None:
    console.print(
        f"the fleet keeps running: API and dashboard {summary['controller']} (sign in with the "
        f"admin token {summary['admin_token']}), files in {workdir}. Ctrl-C stops it and "
        "removes them.",
        highlight=False,
    )
    try:
        while all(p.poll() is None for _, p in processes.started):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def _call(api: ApiClient, method: str, path: str, **kwargs: Any) -> Any:
    try:
        return api.request(method, path, **kwargs)
    except (ApiClientError, ControllerUnreachable) as exc:
        raise DemoError(f"{method} {path}: {exc}") from None
