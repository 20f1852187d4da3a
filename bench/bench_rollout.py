"""Rollouts: how fast a rollout in waves reaches a fleet, and how fast the controller can drive one.

Two figures, each on a fleet of its own (`fleetctl init`, SQLite, `fleetctl serve` as a
subprocess against a Mosquitto broker: a `mosquitto` of the bench's own on a free port, with the
queue limits of deploy/mosquitto/mosquitto.conf, or with `--shared-broker` the local one at
`--mqtt-url`, default `$FLEET_BENCH_MQTT_URL` or mqtt://127.0.0.1:1883. A broker with Mosquitto's
default limits, like the machine's own, keeps at most 1,000 messages queued for the controller and
drops the rest of a wave's burst of reports; those devices then wait for their next `hello`):

1. `real`, end to end (`--real-devices`, default 1,000): the devices are the fleet simulator's
   real agents (`bench.fleet_agents`, as in `bench.bench_fleet`: one `agent.daemon.Daemon` per
   device, own Ed25519 identity, state dir, MQTT session, TUF client and A/B slots). Each verifies
   the command, refreshes TUF, downloads and verifies the rune (the `sine` example bundle, or
   `--rune legacy`), health-checks it in the sandbox, installs and switches, and reports every
   state over MQTT.
2. `sim`, the controller's ceiling (`--sim-devices`, default 5,000): the devices are
   `bench.fleet_agents.SimDevice`s, which answer each step at once. Each holds a real Ed25519
   identity, is enrolled through the API like an agent, keeps its own MQTT session (client id =
   device id, signed `offline` last will), publishes a signed retained `online` presence and a
   `hello`, checks each command as the agent does (`ota.protocol.open_message` with the command
   key TUF publishes, which the bench reads from the fleet dir instead of through TUF), attests
   as the agent does before a deploy (`agent.attester`: a challenge and signed evidence over
   HTTP, appraised by the controller), and then publishes, in order and with its next `seq`s,
   signed `status` reports `received`, `downloading`, `verifying`, `installing`, `health-check`,
   `succeeded`: the same envelopes and bodies (runes included) a real agent sends, without TUF,
   download, sandbox or slot. So the rollout's pace is the controller's (and the broker's) alone.

For each, every device enrolls (one enrollment token, `agent.enroll.enroll`), connects and
attests (the controller asks it to when it connects: a rollout takes only attested devices), the
rune is pushed, and then:

- Baseline (same fleet, same run): `--baseline` (default 3) extra devices, each rolled out to alone
  (a rollout with `devices: [id]`), one after the other: the time from the `POST` to the rollout
  `completed` (its `finished_at`) and the controller's CPU for it.
- The rollout: `POST /api/v1/rollouts` with the N other devices' ids (`devices`), `waves`
  `10,50%,100%` (`--waves`), `soak` `0` (`--soak`), `rate` `100000/s` (`--rate`, far above what
  is reached), the other options at their defaults (success 95%, max failures 5%). Measured from
  just before the `POST` to the rollout's `finished_at` once it is `completed`: devices per
  minute (N / that time), per wave when it started and passed (the rollout's `waves`), when its
  last command reached a device (the devices' `received`, as the workers saw it) and when its last
  device was recorded finished (the commands' `updated_at` in `/rollouts/{id}/devices`), and the
  devices per minute of the last wave alone (from its start to its last device recorded: the
  pace once the waves' fixed steps are paid). The bench watches the devices (worker stats, free
  for the controller), and asks the controller for the rollout every `BUSY_POLL_S` while devices
  are still busy (it could have paused) and then every `--poll` s; that cost (a `GET` loads the
  whole state machine: about 0.2 s of the controller's event loop at 5,000 devices) is included.
- Cost: the controller's CPU seconds (`/proc/PID/stat` utime + stime) over that window, per
  device; its peak RSS; the CPU of the device workers, the broker (when its pid is known) and the
  bench; device messages the controller counted; how busy the machine was and how much of that
  was other processes (the machine is shared: a run beside more than `NOISY_CORES` of other load
  is flagged). Ratios are against the baseline of the same fleet: the rollout's time over a
  single-device rollout's, that per device (1.0 would be serial, 1/N fully parallel), and the
  controller's CPU per device over the single rollout's. Compare runs only through these ratios
  and runs made together.

Targets: `real` at least `TARGET_REAL_PER_MIN` devices/min (2x AWS IoT Jobs' 1,000/min), `sim`
at least `TARGET_SIM_PER_MIN`. The devices share the machine's cores with the controller and the
broker, so their CPU counts against the time (least in `sim`).

Devices attest when they connect, so by default their deploys present that result (the fleet's
`deploy_attestation_age` is 10 min); `--deploy-attestation-age 30s` makes every deploy attest first
(a device reuses a result for half the window; theirs are older by then), which is what a fleet
whose devices last attested longer ago than the window pays.

Run: `.venv/bin/python -m bench.bench_rollout` (`--modes real,sim`, `--quick` for a smoke run of
20 real and 200 simulated devices in under a minute, `--shared-broker`, `-o json` or `--json` for
one JSON line, `--profile DIR` for a py-spy profile of the controller during each rollout, raw
collapsed stacks, when `py-spy` is on PATH or in `$FLEET_BENCH_PY_SPY`). Everything it starts is
stopped and every temp dir removed on exit, Ctrl-C and failures included; on the shared broker it
also clears the retained presence messages of the devices it made.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.bench_fleet import (
    ORG,
    Api,
    BenchError,
    Controller,
    FleetOptions,
    RuneFile,
    Sampler,
    Snapshot,
    Workers,
    add_common_arguments,
    fmt,
    make_specs,
    online_devices,
    open_fleet,
    percentile,
    print_run_notes,
    push_rune,
    report_console,
    run_bench,
    start_profilers,
    stop_profilers,
    wait_until,
)
from bench.fleet_agents import WorkerSpec

TARGET_REAL_PER_MIN = 2000.0
TARGET_SIM_PER_MIN = 10_000.0
ROLLOUT_FINISHED = frozenset({"completed", "aborted", "rolled-back"})
ROLLOUT_STUCK = frozenset({"paused"})
DEVICE_TERMINAL = frozenset({"succeeded", "failed", "refused", "rolled-back", "done"})
ONLINE_TIMEOUT_S = 120.0
BUSY_POLL_S = 10.0
MODES = ("real", "sim")


# -- options and results --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options(FleetOptions):
    baseline: int
    waves: str
    soak: str
    rate: str
    poll_s: float
    deploy_attestation_age: str | None


@dataclass
class WaveResult:
    wave: int
    target: str
    size: int
    started_s: float | None = None  # all times: seconds after the POST
    passed_s: float | None = None
    last_command_at_device_s: float | None = None
    last_recorded_s: float | None = None
    duration_s: float | None = None  # started -> last device recorded
    devices_per_min: float | None = None


@dataclass
class RolloutResult:
    mode: str  # "real" or "sim"
    devices: int
    broker: str
    workers: int
    enroll_s: float = 0.0
    connect_s: float = 0.0
    # The baseline: single-device rollouts on the same fleet, one after the other.
    single_s: list[float] = field(default_factory=list)
    single_controller_cpu_ms: list[float] = field(default_factory=list)
    # The rollout.
    rollout_id: str = ""
    state: str = ""
    reason: str | None = None
    post_s: float = 0.0
    completed_s: float | None = None
    devices_per_min: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    waves: list[WaveResult] = field(default_factory=list)
    last_command_at_device_s: float | None = None
    notified_per_min: float | None = None
    last_recorded_s: float | None = None
    command_at_device_p50_s: float | None = None
    device_done_after_command_p50_s: float | None = None
    commands_published: int | None = None  # envelopes published for the rollout's commands
    commands_sent_again: int | None = None  # commands published more than once
    # Cost over the window (the POST -> completed, or the end of waiting).
    window_s: float = 0.0
    messages_in: float = 0.0
    messages_duplicate: float = 0.0
    messages_per_s: float = 0.0
    controller_cpu_s: float = 0.0
    controller_cpu_ms_per_device: float = 0.0
    controller_cpu_cores: float = 0.0
    controller_peak_rss_mb: float = 0.0
    devices_cpu_s: float = 0.0
    devices_cpu_ms_per_device: float = 0.0
    broker_cpu_s: float | None = None
    bench_cpu_s: float = 0.0
    machine_busy_cores: float = 0.0
    others_cores: float = 0.0
    agent_errors: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)

    @property
    def single_median_s(self) -> float | None:
        return statistics.median(self.single_s) if self.single_s else None

    @property
    def single_cpu_ms(self) -> float | None:
        values = self.single_controller_cpu_ms
        return statistics.median(values) if values else None

    def ratios(self) -> dict[str, float | None]:
        single, cpu = self.single_median_s, self.single_cpu_ms
        done = self.completed_s
        return {
            "rollout_over_single": done / single if done and single else None,
            "rollout_per_device_over_single": (
                done / self.devices / single if done and single else None
            ),
            "controller_cpu_per_device_over_single": (
                self.controller_cpu_ms_per_device / cpu if cpu else None
            ),
        }

    def target(self) -> dict[str, Any]:
        wanted = TARGET_REAL_PER_MIN if self.mode == "real" else TARGET_SIM_PER_MIN
        rate = self.devices_per_min
        return {
            "devices_per_min": rate,
            "target_per_min": wanted,
            "met": rate is not None and self.state == "completed" and rate >= wanted,
        }


def iso_s(value: object, t0: float) -> float | None:
    """An ISO time from the API as seconds after `t0`."""
    if not isinstance(value, str):
        return None
    return datetime.fromisoformat(value).timestamp() - t0


# -- one fleet ------------------------------------------------------------------------------------


class RolloutRun:
    """One fleet of `devices` real or simulated devices: set up, measured, torn down."""

    def __init__(
        self, mode: str, devices: int, rune: RuneFile, options: Options, console: Console
    ) -> None:
        self.mode = mode
        self.devices = devices
        self.rune = rune
        self.options = options
        self.console = console
        self.label = f"{mode} {devices}"

    def run(self) -> RolloutResult:
        options = self.options
        prefix = f"fleet-bench-rollout-{self.mode}-{self.devices}-"
        settings = (
            {"deploy_attestation_age": options.deploy_attestation_age}
            if options.deploy_attestation_age
            else None
        )
        with open_fleet(options, prefix, self.console, self.label, settings) as running:
            ctl, sampler = running.ctl, running.sampler
            pushed = push_rune(ctl.api, self.rune)
            sha256 = str(pushed.get("sha256") or hashlib.sha256(self.rune.data).hexdigest())
            total = self.devices + options.baseline
            workers = running.start_workers(self._specs(running.folder, total, sha256), "devices")
            result = RolloutResult(self.mode, self.devices, running.broker_name, len(workers.specs))
            self._connect(ctl, workers, result)
            ids = list(workers.device_ids)
            baseline, fleet = ids[: options.baseline], ids[options.baseline :]
            for number, device_id in enumerate(baseline, start=1):
                with self.console.status(f"{self.label}: baseline rollout {number} (1 device)"):
                    self._single(ctl, sampler, device_id, result)
            self._rollout(ctl, workers, sampler, fleet, result)
            result.agent_errors = workers.stop()
            return result

    def _specs(self, folder: Path, total: int, sha256: str) -> list[WorkerSpec]:
        command_key = None
        if self.mode == "sim":
            from attestation.keys import load_key_file, public_key_of

            key = public_key_of(load_key_file(folder / "fleet" / "keys" / "command.pem"))
            command_key = {"keyid": key.keyid, "key": key.to_dict()}
        return make_specs(
            folder,
            total,
            self.options,
            name="devices",
            simulated=self.mode == "sim",
            command_key=command_key,
            rune_sha256=sha256,
        )

    def _connect(self, ctl: Controller, workers: Workers, result: RolloutResult) -> None:
        api, total = ctl.api, sum(len(spec.state_dirs) for spec in workers.specs)
        token = api.call("POST", "/api/v1/enrollment-tokens", {"uses": total, "ttl_s": 3600})
        threads = max(1, self.options.enroll_threads // max(len(workers.specs), 1))
        with self.console.status(f"{self.label}: enrolling {total} devices through the API"):
            result.enroll_s = workers.enroll(ctl.url, ctl.root_json, token["token"], threads)
        with self.console.status(f"{self.label}: starting the devices, until online and attested"):
            started = time.monotonic()
            workers.run()
            wait_until(
                lambda: online_devices(api, attested=True) >= total,
                ONLINE_TIMEOUT_S + total * 0.05,
                "online",
                1.0,
            )
            result.connect_s = time.monotonic() - started
        self.console.print(
            f"{self.label}: {total} devices enrolled in {result.enroll_s:.1f} s, all online and "
            f"attested {result.connect_s:.1f} s after they started ({result.broker})"
        )
        time.sleep(2.0)  # the hellos' reconciliation is over

    def _body(self, devices: list[str]) -> dict[str, Any]:
        options = self.options
        return {
            "rune": f"{self.rune.name}@{self.rune.version}",
            "org": ORG,
            "devices": devices,
            "waves": options.waves,
            "soak": options.soak,
            "rate": options.rate,
        }

    def _single(
        self, ctl: Controller, sampler: Sampler, device_id: str, result: RolloutResult
    ) -> None:
        api = ctl.api
        start = sampler.snapshot()
        t0 = time.time()
        created = api.call("POST", "/api/v1/rollouts", self._body([device_id]))
        shown = self._await_state(api, created["id"], 0.02, lambda: True)
        end = sampler.snapshot()
        if shown["state"] != "completed":
            raise BenchError(f"the baseline rollout ended {shown['state']}: {shown['reason']}")
        done = iso_s(shown["finished_at"], t0)
        assert done is not None
        result.single_s.append(done)
        result.single_controller_cpu_ms.append((start.cpu(end, "controller") or 0.0) * 1000)

    def _await_state(
        self, api: Api, rollout_id: str, every: float, devices_done: Callable[[], bool]
    ) -> dict[str, Any]:
        """Poll the rollout until it finished or paused (every `BUSY_POLL_S` while
        `devices_done()` is false, then every `every`); the last answer."""
        deadline = time.monotonic() + self.options.timeout_s
        last_asked = 0.0
        shown: dict[str, Any] = {}
        while time.monotonic() < deadline:
            done = devices_done()
            if done or time.monotonic() - last_asked >= BUSY_POLL_S:
                last_asked = time.monotonic()
                shown = api.call("GET", f"/api/v1/rollouts/{rollout_id}")
                if shown["state"] in ROLLOUT_FINISHED or shown["state"] in ROLLOUT_STUCK:
                    return shown
            time.sleep(every if done else min(every, 0.25))
        raise BenchError(
            f"rollout {rollout_id} not finished within {self.options.timeout_s:g} s: "
            f"{shown.get('state')}, {shown.get('counts')}"
        )

    def _rollout(
        self,
        ctl: Controller,
        workers: Workers,
        sampler: Sampler,
        fleet: list[str],
        result: RolloutResult,
    ) -> None:
        api, n = ctl.api, len(fleet)
        time.sleep(1.0)
        metrics0 = api.metrics()
        profile = f"controller-rollout-{self.mode}-{self.devices}"
        profilers = start_profilers(self.options, {profile: ctl.process.pid})
        start = sampler.snapshot()
        t0 = time.time()
        created = api.call("POST", "/api/v1/rollouts", self._body(fleet))
        result.post_s = time.time() - t0
        result.rollout_id = created["id"]
        finished_before = self._finished(workers)

        with self.console.status(f"{self.label}: rolling out") as status:

            def devices_done() -> bool:
                done = self._finished(workers) - finished_before
                status.update(
                    f"{self.label}: rolling out {self.rune.ref}: "
                    f"{done} of {n} devices finished ({time.time() - t0:.0f} s)"
                )
                return done >= n

            shown = self._await_state(api, result.rollout_id, self.options.poll_s, devices_done)
        end = sampler.snapshot()
        metrics1 = api.metrics()
        result.profiles = stop_profilers(profilers)
        devices = api.call("GET", f"/api/v1/rollouts/{result.rollout_id}/devices")["devices"]
        events = workers.events()
        published = self._publishes(ctl, result.rollout_id)
        if published is not None:
            result.commands_published, result.commands_sent_again = published
        self._summarize(result, shown, devices, events, t0, start, end, metrics0, metrics1)
        result.controller_peak_rss_mb = sampler.peak_rss_mb("controller", t0, end)

    @staticmethod
    def _finished(workers: Workers) -> int:
        """Commands the devices finished, each once (whatever the number of its reports)."""
        answers = workers.ask(("stats",), timeout=60)
        return sum(int(answer[1].finished_commands) for answer in answers)

    @staticmethod
    def _publishes(ctl: Controller, rollout_id: str) -> tuple[int, int] | None:
        """(envelopes published, commands published more than once) for the rollout's commands,
        read from the fleet's SQLite database (read-only: the API shows one command at a time)."""
        database = ctl.root_json.parent / "fleet.sqlite3"
        if not database.exists():
            return None
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            row = db.execute(
                "SELECT coalesce(sum(attempts), 0), coalesce(sum(attempts > 1), 0) FROM command "
                "WHERE id LIKE ?",
                (f"{rollout_id}.%",),
            ).fetchone()
        return int(row[0]), int(row[1])

    # -- results --------------------------------------------------------------------------------

    def _summarize(
        self,
        result: RolloutResult,
        shown: dict[str, Any],
        devices: list[dict[str, Any]],
        events: list[Any],
        t0: float,
        start: Snapshot,
        end: Snapshot,
        metrics0: dict[str, float],
        metrics1: dict[str, float],
    ) -> None:
        n = self.devices
        result.state, result.reason = shown["state"], shown.get("reason")
        result.counts = {k: v for k, v in shown["counts"].items() if v}
        if shown["state"] == "completed":
            result.completed_s = iso_s(shown["finished_at"], t0)
            if result.completed_s:
                result.devices_per_min = n / result.completed_s * 60
        commands = {d["command_id"]: d for d in devices if d.get("command_id")}
        arrived = {
            e.command_id: e.at - t0
            for e in events
            if e.state == "received" and e.command_id in commands
        }
        finished = {
            e.command_id: e.at - t0
            for e in events
            if e.state in DEVICE_TERMINAL and e.command_id in commands
        }
        recorded = {
            cid: at
            for cid, d in commands.items()
            if d["state"] in DEVICE_TERMINAL | {"timed-out"}
            and (at := iso_s(d.get("updated_at"), t0)) is not None
        }
        result.last_command_at_device_s = max(arrived.values(), default=None)
        if result.last_command_at_device_s:
            result.notified_per_min = len(arrived) / result.last_command_at_device_s * 60
        result.last_recorded_s = max(recorded.values(), default=None)
        result.command_at_device_p50_s = percentile(list(arrived.values()), 50)
        result.device_done_after_command_p50_s = percentile(
            [finished[c] - at for c, at in arrived.items() if c in finished], 50
        )
        for wave in shown["waves"]:
            ids = [d["command_id"] for d in devices if d["wave"] == wave["wave"]]
            started = iso_s(wave["started_at"], t0)
            last = max((recorded[c] for c in ids if c in recorded), default=None)
            item = WaveResult(
                wave["wave"],
                wave["target"],
                wave["size"],
                started,
                iso_s(wave["passed_at"], t0),
                max((arrived[c] for c in ids if c in arrived), default=None),
                last,
            )
            if started is not None and last is not None and last > started:
                item.duration_s = last - started
                item.devices_per_min = wave["size"] / item.duration_s * 60
            result.waves.append(item)

        result.window_s = end.at - start.at
        received = "fleet_messages_received_total"
        duplicate = "fleet_messages_duplicate_total"
        result.messages_in = metrics1.get(received, 0.0) - metrics0.get(received, 0.0)
        result.messages_duplicate = metrics1.get(duplicate, 0.0) - metrics0.get(duplicate, 0.0)
        result.messages_per_s = (result.messages_in + result.messages_duplicate) / result.window_s
        result.controller_cpu_s = start.cpu(end, "controller") or 0.0
        result.controller_cpu_ms_per_device = result.controller_cpu_s / n * 1000
        result.controller_cpu_cores = result.controller_cpu_s / result.window_s
        result.devices_cpu_s = start.cpu(end, "devices-") or 0.0
        result.devices_cpu_ms_per_device = result.devices_cpu_s / n * 1000
        result.broker_cpu_s = start.cpu(end, "broker")
        result.bench_cpu_s = start.cpu(end, "bench") or 0.0
        result.machine_busy_cores = start.busy(end)
        result.others_cores = start.others(end)


# -- output ---------------------------------------------------------------------------------------


@dataclass
class Report:
    rune: dict[str, Any]
    options: dict[str, Any]
    results: list[RolloutResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "rune": self.rune,
            "options": self.options,
            "runs": [
                asdict(r)
                | {
                    "single_median_s": r.single_median_s,
                    "ratios": r.ratios(),
                    "target": r.target(),
                }
                for r in self.results
            ],
        }

    def print(self, console: Console) -> None:
        results = self.results
        table = Table(
            title=f"Rollout of {self.rune['ref']} ({self.rune['kind']}, {self.rune['bytes']:,} "
            f"bytes), waves {self.options['waves']}, soak {self.options['soak']}, deploys backed "
            f"by an attestation at most {self.options['deploy_attestation_age']} old"
        )
        table.add_column("")
        for result in results:
            devices = "real agents" if result.mode == "real" else "simulated devices"
            table.add_column(f"{result.devices} {devices}", justify="right")

        def row(title: str, value: Callable[[RolloutResult], str]) -> None:
            table.add_row(title, *(value(r) for r in results))

        row("device worker processes", lambda r: str(r.workers))
        row("enrollment (s)", lambda r: fmt(r.enroll_s))
        row("devices started -> all online (s)", lambda r: fmt(r.connect_s))
        row(
            "single-device rollout, median (s)",
            lambda r: (
                fmt(r.single_median_s, ".3f") + (f" ({len(r.single_s)})" if r.single_s else "")
            ),
        )
        row("  controller CPU each, median (ms)", lambda r: fmt(r.single_cpu_ms, ".0f"))
        row("rollout state", lambda r: r.state + (f": {r.reason}" if r.reason else ""))
        row("device states", lambda r: ", ".join(f"{k} {v}" for k, v in r.counts.items()))
        row("POST /rollouts answered (s)", lambda r: fmt(r.post_s, ".2f"))
        row("POST -> completed (s)", lambda r: fmt(r.completed_s, ".2f"))
        row("[bold]devices / min[/bold]", lambda r: fmt(r.devices_per_min, ",.0f"))
        row("last command at a device (s)", lambda r: fmt(r.last_command_at_device_s, ".2f"))
        row("  = devices notified / min", lambda r: fmt(r.notified_per_min, ",.0f"))
        row("last device recorded finished (s)", lambda r: fmt(r.last_recorded_s, ".2f"))
        row("command at the device, p50 (s)", lambda r: fmt(r.command_at_device_p50_s, ".2f"))
        row(
            "command -> device finished, p50 (s)",
            lambda r: fmt(r.device_done_after_command_p50_s, ".2f"),
        )
        waves = max((len(r.waves) for r in results), default=0)
        for index in range(waves):

            def wave_row(r: RolloutResult, index: int = index) -> str:
                if index >= len(r.waves):
                    return "-"
                w = r.waves[index]
                return (
                    f"{w.size} dev: {fmt(w.started_s, '.1f')} -> {fmt(w.last_recorded_s, '.1f')}"
                    f" s ({fmt(w.devices_per_min, ',.0f')}/min)"
                )

            row(f"wave {index + 1}: start -> last finished", wave_row)
        row(
            "commands published (sent more than once)",
            lambda r: (
                f"{r.commands_published} ({r.commands_sent_again})"
                if r.commands_published is not None
                else "-"
            ),
        )
        row("device messages handled", lambda r: fmt(r.messages_in + r.messages_duplicate, ".0f"))
        row("  messages / s", lambda r: fmt(r.messages_per_s, ".0f"))
        row("controller CPU (s)", lambda r: fmt(r.controller_cpu_s, ".2f"))
        row("  per device (ms)", lambda r: fmt(r.controller_cpu_ms_per_device, ".2f"))
        row("  cores busy", lambda r: fmt(r.controller_cpu_cores, ".2f"))
        row("controller RSS peak (MiB)", lambda r: fmt(r.controller_peak_rss_mb))
        row("devices' CPU per device (ms)", lambda r: fmt(r.devices_cpu_ms_per_device, ".2f"))
        row("broker CPU (s)", lambda r: fmt(r.broker_cpu_s, ".2f"))
        row("bench process CPU (s)", lambda r: fmt(r.bench_cpu_s, ".2f"))
        row("other processes (cores)", lambda r: fmt(r.others_cores, ".2f"))
        row(f"machine busy (cores of {os.cpu_count()})", lambda r: fmt(r.machine_busy_cores, ".2f"))
        console.print(table)
        for result in results:
            ratios = result.ratios()
            target = result.target()
            verdict = "[green]met[/green]" if target["met"] else "[red]NOT met[/red]"
            console.print(
                f"{result.mode} {result.devices}: the rollout took "
                f"{fmt(ratios['rollout_over_single'], '.1f', 'x')} a single-device rollout = "
                f"{fmt(ratios['rollout_per_device_over_single'], '.4f', 'x')} per device; "
                f"controller CPU per device "
                f"{fmt(ratios['controller_cpu_per_device_over_single'], '.3f', 'x')} the single "
                f"rollout's; target >= {target['target_per_min']:,.0f} devices/min: "
                f"{fmt(target['devices_per_min'], ',.0f')} -> {verdict}"
            )
            print_run_notes(
                console,
                result.others_cores,
                result.agent_errors,
                result.profiles,
                during="rollout",
                errors_of="device",
            )


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_rollout",
        description="Time a rollout in waves to real agents and to simulated devices "
        "(see the module docstring).",
    )
    parser.add_argument("--modes", default="real,sim", help="real, sim or both, comma-separated")
    parser.add_argument("--real-devices", type=int, default=1000, help="real agents")
    parser.add_argument("--sim-devices", type=int, default=5000, help="simulated devices")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 20 real, 200 simulated devices"
    )
    parser.add_argument(
        "--baseline", type=int, default=3, help="single-device rollouts for the baseline"
    )
    parser.add_argument("--waves", default="10,50%,100%")
    parser.add_argument("--soak", default="0")
    parser.add_argument("--rate", default="100000/s", help="the rollout's rate limit")
    parser.add_argument(
        "--poll", type=float, default=0.25, help="seconds between rollout polls near the end"
    )
    parser.add_argument(
        "--deploy-attestation-age",
        default=None,
        help="the fleet's window for a deploy's attestation (30s: every deploy attests)",
    )
    add_common_arguments(
        parser,
        private_broker=True,
        workers_help="device worker processes",
        timeout_help="seconds per rollout",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Wide enough for the table when the output is not a terminal (a log, a pipe).
    console = report_console(args, width=None if sys.stdout.isatty() else 132)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        console.print(f"--modes takes {' and/or '.join(MODES)}, comma-separated")
        return 2
    sizes = (
        {"real": 20, "sim": 200}
        if args.quick
        else {
            "real": args.real_devices,
            "sim": args.sim_devices,
        }
    )
    options = Options.from_args(
        args,
        baseline=max(0, min(args.baseline, 1) if args.quick else args.baseline),
        waves=args.waves,
        soak=args.soak,
        rate=args.rate,
        poll_s=args.poll,
        deploy_attestation_age=args.deploy_attestation_age,
    )

    def measure(rune: RuneFile) -> Report:
        results = [RolloutRun(m, sizes[m], rune, options, console).run() for m in modes]
        return Report(
            {"ref": rune.ref, "kind": rune.kind, "bytes": len(rune.data)},
            {
                "waves": options.waves,
                "soak": options.soak,
                "rate": options.rate,
                "workers": options.workers,
                "broker": "private" if options.private_broker else options.mqtt_url,
                "cpus": os.cpu_count(),
                "deploy_attestation_age": options.deploy_attestation_age or "10m (default)",
            },
            results,
        )

    return run_bench(args, options, console, measure)


if __name__ == "__main__":
    sys.exit(main())
