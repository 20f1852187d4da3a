"""Telemetry ingest: signed reports per second stored by one and by two worker processes, against
the machine's raw Ed25519 verify rate measured in the same run.

What is measured, for `--workers` 1 and 2 (default both), each on a fresh database and a
`mosquitto` of the bench's own (the shipped config's queue limits):

- `--devices` registered devices (rows in the `device` table, each with its own Ed25519 key), and
  `--reports` telemetry reports signed by them, as an agent makes them (`ota.telemetry.Report`:
  the operational state and the `sine` example's two streams, a noisy mean and a noisy
  histogram), each device's with rising `seq`.
- The ingest workers are `fleetctl telemetry ingest --workers N` (the product, as an operator runs
  it: N processes on one MQTT shared subscription, persistent sessions). They are started once so
  the broker holds their sessions, stopped, and every report is published (QoS 1) while they are
  away, so the broker queues them; then they are started again. The time runs from the first
  worker's `telemetry.worker_connected` log line to the moment all reports are stored (the bench
  counts `telemetry_report` rows every `POLL_S`): each report received from the broker, its
  envelope verified with the device's key (one Ed25519 verify), its body checked, de-duplicated
  and stored with its two stream values, in batches, in one transaction per batch.
- The workers' CPU (user + system, from /proc) over that time, per report, and the broker's.

The floor, for two processes, the same way: what any ingest on this stack costs before it does
anything of its own. Two processes each with paho's network loop on the same shared subscription
(persistent sessions, QoS 1, as the workers), each message's envelope parsed and its signature
verified with the topic's device key (kept), then dropped: no payload parsing, no checks, no
database. The ingest cannot beat this line; if it is under the target, so is any ingest built on
this broker, client and verify.

Baseline, in the same run (before and after the ingest runs, the two averaged): the raw Ed25519
verify (`cryptography`, the key already loaded) of a report's signed bytes, in one process, and
in two processes at once (the machine's two-core rate). The target: two workers store at least
50% of the raw two-core rate.

Run: `.venv/bin/python -m bench.bench_telemetry` (`--reports`, `--devices`, `--workers 1,2`,
`--db-url postgres://...` for PostgreSQL (the bench makes and drops its own databases there),
`-o json`). About a minute with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiomqtt
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from attestation.envelope import parse
from attestation.identity import DeviceIdentity
from attestation.keys import key_from_raw, raw_public_bytes
from bench.bench_fleet import BenchError, private_broker, usage
from fleet.audit_log import load_audit_key
from fleet.fleetdir import FleetDir
from ota.protocol import (
    CONTROLLER,
    MAX_MESSAGE_BYTES,
    PAYLOAD_TYPE,
    Channel,
    Message,
    MessageType,
    device_subscriptions,
    parse_topic,
    seal_message,
    topic,
)
from ota.rune.streams import Mechanism, StreamKind
from ota.telemetry import Report, StreamValue

TARGET_RATIO = 0.5
POLL_S = 0.1
PUBLISH_CHUNK = 1000
RAW_SECONDS = 2.0
FLEETCTL = str(Path(sys.executable).with_name("fleetctl"))


@dataclass
class IngestRun:
    workers: int
    reports: int
    seconds: float
    per_second: float
    workers_cpu_s: float
    cpu_per_report_us: float
    stored: int
    broker_cpu_per_report_us: float
    floor: bool = False


@dataclass
class Result:
    devices: int
    reports: int
    database: str
    raw_one_core: list[float] = field(default_factory=list)
    raw_two_cores: list[float] = field(default_factory=list)
    runs: list[IngestRun] = field(default_factory=list)

    @property
    def raw_two_core_rate(self) -> float:
        return sum(self.raw_two_cores) / len(self.raw_two_cores)

    @property
    def raw_one_core_rate(self) -> float:
        return sum(self.raw_one_core) / len(self.raw_one_core)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["raw_one_core_rate"] = self.raw_one_core_rate
        document["raw_two_core_rate"] = self.raw_two_core_rate
        document["ratios"] = {
            ("floor-" if run.floor else "") + str(run.workers): run.per_second
            / self.raw_two_core_rate
            for run in self.runs
        }
        return document


# -- the baseline ----------------------------------------------------------------------------------


def _raw_verifies(seconds: float) -> float:
    """Ed25519 verifies per second of one signed report's bytes, in this process."""
    key = Ed25519PrivateKey.generate()
    message = json.dumps(_body(0.0)).encode()
    signature = key.sign(message)
    public = key.public_key()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            public.verify(signature, message)
        count += 100
    return count / (time.perf_counter() - started)


def raw_rates(seconds: float) -> tuple[float, float]:
    """(one process, two processes at once) raw verify rates."""
    one = _raw_verifies(seconds)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        two = sum(pool.map(_raw_verifies, [seconds, seconds]))
    return one, two


# -- the reports -----------------------------------------------------------------------------------


def _body(now: float) -> dict[str, Any]:
    streams = (
        StreamValue(
            "sine/sine_mean", "default/sine@0.1.0", StreamKind.MEAN, ("mean",), (0.31,),
            Mechanism.LAPLACE, 4.0, 0.0, 0.707,
        ),
        StreamValue(
            "sine/sine_histogram", "default/sine@0.1.0", StreamKind.HISTOGRAM,
            ("[-1,-0.5)", "[-0.5,0)", "[0,0.5)", "[0.5,1]"), (0.12, -0.31, 0.83, 0.41),
            Mechanism.LAPLACE, 4.0, 0.0, 0.707,
        ),
    )  # fmt: skip
    ops = {
        "agent_version": "0.1.0",
        "uptime_s": 3600.0,
        "active": {"ref": "default/sine@0.1.0", "sha256": "ab" * 32},
        "deployment": "idle",
        "inferences": 300,
        "failures": 0,
        "waiting": 0,
        "sandbox_errors": {},
        "latency_ms": {"p50": 1.9, "p95": 3.2},
        "cpu_s": 0.4,
        "rss_bytes": 90_000_000,
        "reports_dropped": 0,
    }
    return Report(now - 300, now, ops, streams, ()).to_json()


def make_reports(
    scratch: Path, devices: int, reports: int
) -> tuple[list[DeviceIdentity], list[tuple[str, bytes]]]:
    identities = [DeviceIdentity.load_or_create(scratch / f"d{n}") for n in range(devices)]
    now = time.time()
    signed = []
    for index in range(reports):
        identity = identities[index % devices]
        seq = index // devices + 1
        message = Message(
            identity.device_id, CONTROLLER, seq, now, now + 3600, MessageType.TELEMETRY, _body(now)
        )
        signed.append(
            (topic(identity.device_id, Channel.TELEMETRY), seal_message(message, identity.signer))
        )
    return identities, signed


async def _publish(url: str, reports: list[tuple[str, bytes]]) -> None:
    parts = urlsplit(url)
    async with aiomqtt.Client(
        parts.hostname or "", parts.port or 1883, identifier="bench-publisher",
        max_queued_outgoing_messages=len(reports) + 10,
    ) as client:  # fmt: skip
        client.pending_calls_threshold = len(reports) + 10
        for start in range(0, len(reports), PUBLISH_CHUNK):
            chunk = reports[start : start + PUBLISH_CHUNK]
            await asyncio.gather(*(client.publish(name, data, qos=1) for name, data in chunk))


# -- the database ----------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(base: str | None, scratch: Path, name: str) -> Iterator[str]:
    if base is None:
        yield f"sqlite://{scratch / f'{name}.sqlite3'}"
        return
    import asyncpg

    admin = base

    async def run(statement: str) -> None:
        connection = await asyncpg.connect(admin)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    database = f"bench_telemetry_{name}_{os.getpid()}"
    asyncio.run(run(f'CREATE DATABASE "{database}"'))
    parts = urlsplit(base)
    try:
        yield urlunsplit(parts._replace(path=f"/{database}"))
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{database}"'))


def register(db_url: str, identities: list[DeviceIdentity]) -> None:
    from fleet.db import close_database, open_database
    from fleet.db.models import Device

    async def run() -> None:
        await open_database(db_url)
        try:
            await Device.bulk_create(
                [
                    Device(
                        id=identity.device_id,
                        public_key=raw_public_bytes(identity.public_key).hex(),
                        labels={},
                    )
                    for identity in identities
                ]
            )
        finally:
            await close_database()

    asyncio.run(run())


def stored(db_url: str) -> int:
    if db_url.startswith("sqlite://"):
        with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite://"), timeout=5)) as db:
            return int(db.execute("SELECT COUNT(*) FROM telemetry_report").fetchone()[0])
    import asyncpg

    async def run() -> int:
        connection = await asyncpg.connect(db_url)
        try:
            return int(await connection.fetchval("SELECT COUNT(*) FROM telemetry_report"))
        finally:
            await connection.close()

    return asyncio.run(run())


# -- one ingest run --------------------------------------------------------------------------------


def _start_ingest(workers: int, broker: str, db_url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [FLEETCTL, "telemetry", "ingest", "--workers", str(workers), "--mqtt-url", broker,
             "--db-url", db_url, "--dir", str(log.parent), "--client-id", "bench-ingest",
             "--share-group", "bench"],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _connected_times(log: Path) -> list[float]:
    times = []
    for line in log.read_text(errors="replace").splitlines():
        if "telemetry.worker_connected" in line and line.startswith("{"):
            times.append(datetime.fromisoformat(json.loads(line)["ts"]).timestamp())
    return times


def _wait_connected(log: Path, count: int, process: subprocess.Popen[bytes], after: int) -> float:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        times = _connected_times(log)[after:]
        if len(times) >= count:
            return min(times)
        if process.poll() is not None:
            raise BenchError(f"the ingest workers exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise BenchError(f"the workers did not connect: {log.read_text()[-2000:]}")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def ingest_run(
    workers: int, reports: list[tuple[str, bytes]], identities: list[DeviceIdentity],
    db_url: str, scratch: Path,
) -> IngestRun:  # fmt: skip
    folder = scratch / f"run-{workers}"
    folder.mkdir()
    (folder / "fleet.yaml").write_text("name: bench\n")
    load_audit_key(FleetDir(folder))  # as the controller makes it; the workers need it
    register(db_url, identities)
    log = folder / "ingest.log"
    with private_broker(folder) as (broker, broker_process):
        first = _start_ingest(workers, broker, db_url, log)
        _wait_connected(log, workers, first, 0)
        _stop(first)
        asyncio.run(_publish(broker, reports))
        before = len(_connected_times(log))
        ingest = _start_ingest(workers, broker, db_url, log)
        try:
            started = _wait_connected(log, workers, ingest, before)
            pids = _children(ingest.pid)
            cpu_before = sum(u.cpu_s for u in map(usage, pids) if u is not None)
            broker_before = _cpu(broker_process.pid)
            deadline = time.monotonic() + 600
            count = 0
            while count < len(reports):
                if time.monotonic() > deadline or ingest.poll() is not None:
                    raise BenchError(f"{count} of {len(reports)} stored: {log.read_text()[-2000:]}")
                time.sleep(POLL_S)
                count = stored(db_url)
            finished = time.time()
            cpu = sum(u.cpu_s for u in map(usage, pids) if u is not None) - cpu_before
            broker_cpu = _cpu(broker_process.pid) - broker_before
        finally:
            _stop(ingest)
    seconds = finished - started
    return IngestRun(
        workers, len(reports), seconds, len(reports) / seconds, cpu,
        cpu / len(reports) * 1e6, count, broker_cpu / len(reports) * 1e6,
    )  # fmt: skip


def _cpu(pid: int) -> float:
    used = usage(pid)
    return 0.0 if used is None else used.cpu_s


# -- the floor: receive and verify, nothing else ---------------------------------------------------


def _floor_process(
    broker: str, index: int, keys: dict[str, str], received: Any, connected: Any, stop: Any,
) -> None:  # fmt: skip
    """One floor process (see the module docstring): until `stop` is set; it counts what it
    verified in `received[index]` (its own slot: no lock)."""
    cached = {device: key_from_raw(bytes.fromhex(public)) for device, public in keys.items()}
    parts = urlsplit(broker)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-floor-{index}", clean_session=False
    )

    def on_connect(client: mqtt.Client, *_args: object) -> None:
        client.subscribe(
            [(f, 1) for f in device_subscriptions("bench-floor", channels=[Channel.TELEMETRY])]
        )

    def on_subscribe(*_args: object) -> None:
        connected.set()

    def on_message(_client: mqtt.Client, _data: object, message: mqtt.MQTTMessage) -> None:
        parsed = parse_topic(message.topic)
        if parsed is None:
            return
        parse(bytes(message.payload), PAYLOAD_TYPE, MAX_MESSAGE_BYTES).open(cached[parsed[0]])
        received[index] += 1

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(parts.hostname or "", parts.port or 1883, 30)
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()


def floor_run(
    processes: int, reports: list[tuple[str, bytes]], identities: list[DeviceIdentity],
    scratch: Path,
) -> IngestRun:  # fmt: skip
    folder = scratch / f"floor-{processes}"
    folder.mkdir()
    keys = {i.device_id: raw_public_bytes(i.public_key).hex() for i in identities}
    spawn = multiprocessing.get_context("spawn")

    def start(received: Any) -> tuple[list[Any], Any, list[Any]]:
        stop = spawn.Event()
        connected = [spawn.Event() for _ in range(processes)]
        started = [
            spawn.Process(
                target=_floor_process,
                args=(broker, n, keys, received, connected[n], stop),
                daemon=True,
            )
            for n in range(processes)
        ]
        for process in started:
            process.start()
        for event in connected:
            if not event.wait(60):
                raise BenchError("a floor process did not connect")
        return started, stop, connected

    def finish(started: list[Any], stop: Any) -> None:
        stop.set()
        for process in started:
            process.join(30)

    with private_broker(folder) as (broker, broker_process):
        received = spawn.RawArray("q", processes)
        first, stop, _ = start(received)
        finish(first, stop)
        asyncio.run(_publish(broker, reports))
        received[:] = [0] * processes
        running, stop, _ = start(received)
        try:
            started = time.time()
            pids = [p.pid for p in running if p.pid is not None]
            cpu_before = sum(_cpu(pid) for pid in pids)
            broker_before = _cpu(broker_process.pid)
            deadline = time.monotonic() + 600
            while sum(received) < len(reports):
                if time.monotonic() > deadline:
                    raise BenchError(f"the floor received {sum(received)} of {len(reports)}")
                time.sleep(POLL_S / 10)
            finished = time.time()
            cpu = sum(_cpu(pid) for pid in pids) - cpu_before
            broker_cpu = _cpu(broker_process.pid) - broker_before
        finally:
            finish(running, stop)
    seconds = finished - started
    count = len(reports)
    return IngestRun(
        processes, count, seconds, count / seconds, cpu, cpu / count * 1e6, 0,
        broker_cpu / count * 1e6, floor=True,
    )  # fmt: skip


# -- main ------------------------------------------------------------------------------------------


def report(result: Result, console: Console) -> None:
    table = Table(title="telemetry ingest: signed reports stored per second")
    table.add_column("")
    table.add_column("per second", justify="right")
    table.add_column("x raw two-core verify", justify="right")
    table.add_column("CPU per report", justify="right")
    table.add_column("broker CPU per report", justify="right")
    raw2 = result.raw_two_core_rate
    table.add_row(
        "raw Ed25519 verify, 1 process",
        f"{result.raw_one_core_rate:,.0f}",
        f"{result.raw_one_core_rate / raw2:.2f}",
        "",
        "",
    )
    table.add_row("raw Ed25519 verify, 2 processes", f"{raw2:,.0f}", "1.00", "", "")
    for run in result.runs:
        ratio = run.per_second / raw2
        mark = (
            ""
            if run.workers != 2 or run.floor
            else (" (target 0.50: met)" if ratio >= TARGET_RATIO else " (target 0.50: NOT met)")
        )
        what = "floor (receive + verify only)" if run.floor else "ingest"
        table.add_row(
            f"{what}, {run.workers} process(es), {run.reports:,} reports in {run.seconds:.2f} s",
            f"{run.per_second:,.0f}",
            f"{ratio:.2f}{mark}",
            f"{run.cpu_per_report_us:.0f} us",
            f"{run.broker_cpu_per_report_us:.0f} us",
        )
    console.print(table)
    console.print(f"database {result.database}, {result.devices} devices")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--reports", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--floor", action=argparse.BooleanOptionalAction, default=True,
        help="also measure the floor: two processes that only receive and verify",
    )  # fmt: skip
    parser.add_argument("--db-url", default=None, help="a PostgreSQL server URL (default SQLite)")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    console = Console(stderr=args.output == "json")
    result = Result(args.devices, args.reports, "postgres" if args.db_url else "sqlite")
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        scratch = Path(tmp)
        try:
            one, two = raw_rates(RAW_SECONDS)
            result.raw_one_core.append(one)
            result.raw_two_cores.append(two)
            with console.status(f"signing {args.reports:,} reports from {args.devices} devices"):
                identities, reports = make_reports(scratch, args.devices, args.reports)
            for workers in (int(w) for w in args.workers.split(",")):
                with (
                    console.status(f"ingesting with {workers} worker(s)"),
                    fresh_database(args.db_url, scratch, f"w{workers}") as db_url,
                ):
                    result.runs.append(ingest_run(workers, reports, identities, db_url, scratch))
            if args.floor:
                with console.status("the floor: receiving and verifying in two processes"):
                    result.runs.append(floor_run(2, reports, identities, scratch))
            one, two = raw_rates(RAW_SECONDS)
            result.raw_one_core.append(one)
            result.raw_two_cores.append(two)
        except BenchError as exc:
            console.print(f"[red]bench failed:[/red] {exc}")
            return 1
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=2))
    else:
        report(result, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
