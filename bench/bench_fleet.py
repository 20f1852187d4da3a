"""Fleet simulator: how long a deploy takes to reach every device, and what the controller pays.

For each fleet size (default 100 and 1,000 devices) the bench makes a new fleet (`fleetctl init`,
SQLite), starts `fleetctl serve` as a subprocess against a Mosquitto broker (the local one at
`--mqtt-url`, default `$FLEET_BENCH_MQTT_URL` or mqtt://127.0.0.1:1883, or with `--private-broker`
a `mosquitto` of its own on a free port, so other traffic on the shared broker cannot interfere),
and runs that many real agents: `--workers` processes (`bench.fleet_agents`), each running its share
of `agent.daemon.Daemon`s on one asyncio loop, every one with its own Ed25519 identity, state dir,
MQTT session, TUF client and A/B slots, exactly as `fleet-agent run` builds them. The devices enroll
through the real API with one enrollment token (`agent.enroll.enroll`), connect, and sit idle; the
rune loop runs once a day (`run.interval_s`), so it adds nothing to the deploy.

Then a rune is pushed (the `sine` example bundle that `fleetctl demo` deploys, or with `--rune
legacy` a small legacy `.rune`), and one signed deploy command per device is sent through
`POST /api/v1/devices/{id}/deploy` (`--post-concurrency` requests at a time). Each device refreshes
TUF, downloads and verifies the rune, health-checks it in the sandbox, installs it into its
inactive slot, switches, and reports every state back over MQTT. The deploy has reached a device
when the controller recorded its command as `succeeded` (the command's `finished_at`); the time to
reach every device is the last `finished_at` minus the moment before the first deploy request.

Measured per size:
- enrollment time, and the time from starting the daemons to every device online at the controller;
- the time to reach 50%, 90% and 100% of the devices, the time to send the deploy requests, and on
  the agents' side when each command arrived and how long its update took;
- device messages the controller handled (`fleet_messages_{received,duplicate,refused}_total`) plus
  the commands it published, per second of the deploy, and its HTTP requests (TUF, downloads);
- the controller's CPU seconds (`/proc/PID/stat`, utime + stime) during the deploy, per device, and
  its idle CPU with every device connected; its RSS before enrollment, with all devices connected
  (growth per device) and at its peak during the deploy; the CPU of the agent workers and of the
  broker (when its pid is known) and of the bench itself over the same window, how busy the whole
  machine was, and so how much other processes used (the machine is shared: a deploy that had to
  share the cores is flagged), and the CPU floor: the fleet's CPU seconds over the cores;
- capacity: after the deploy, `--flood` K signed status reports per device (sealed beforehand with
  each device's own key and next `seq`s) are published straight to the broker, at most
  `FLOOD_WINDOW` not yet handled at a time, and timed until the controller counted them all: the
  reports per second the controller takes, and its CPU per report, with the agents idle.

The baseline, measured in the same run: a small fleet (`--baseline-devices`, default 5) deployed to
one device at a time, each waited for before the next: the single-device deploy time and the
controller's CPU per single deploy. Each size is reported as a ratio to it: the time to reach all N
devices over one device's, that per device (time / N / single: 1.0 would be fully serial, 1/N fully
parallel), and the controller CPU per device over the single deploy's. The machine is shared and
noisy, so compare runs only through these ratios and runs made together.

The agents share the machine's cores with the controller and the broker, so their CPU counts
against the deploy time: on a real fleet every device brings its own CPU.

Run: `.venv/bin/python -m bench.bench_fleet` (`--devices 100,1000`, `--quick` for a 20-device
smoke run, `--private-broker`, `--rune legacy`, `--json` or `-o json` for one JSON line, `--profile
DIR` to record py-spy profiles of the controller and one agent worker during the deploy when
`py-spy` is on PATH or in `$FLEET_BENCH_PY_SPY`). Everything it starts is stopped and every temp
dir removed on exit, Ctrl-C and failures included; on the shared broker it also clears the retained
presence messages of the devices it made.

`bench.bench_rollout` builds on this module: its fleets are set up by `open_fleet`, it takes the
options of `add_common_arguments`, records profiles with `start_profilers`, and its `main` runs
through `run_bench`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol, Self
from urllib.parse import urlencode, urlsplit

import urllib3
import yaml
from rich.console import Console
from rich.table import Table

from bench.fleet_agents import Event, Stats, WorkerSpec, worker_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MQTT_URL = os.environ.get("FLEET_BENCH_MQTT_URL", "mqtt://127.0.0.1:1883")
SHARED_MOSQUITTO_PID_FILE = Path("/run/mosquitto/mosquitto.pid")
ORG = "default"
TARGET_DEVICES = 1000
TARGET_S = 60.0
STATUS_COUNTERS = (
    'fleet_messages_received_total{type="status"}',
    "fleet_messages_duplicate_total",
)
MESSAGE_COUNTERS = (
    *(f'fleet_messages_received_total{{type="{t}"}}' for t in ("status", "hello", "presence")),
    'fleet_messages_received_total{type="security-event"}',
    "fleet_messages_duplicate_total",
    "fleet_messages_refused_total",
)
TERMINAL = frozenset({"succeeded", "failed", "refused", "rolled-back", "done", "timed-out"})
# The rune loop steps once at start (idle: no rune) and then once a day: the bench measures the
# deploy, not inference. `fleetctl demo` runs it every 0.25 s.
AGENT_RUN_CONFIG = {"run": {"input": {"kind": "random", "seed": 7}, "interval_s": 86_400}}
START_TIMEOUT_S = 90.0
FLOOD_WINDOW = 500
NOISY_CORES = 0.2
FLOOD_TIMEOUT_S = 120.0
SAMPLE_EVERY_S = 0.25
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class BenchError(Exception):
    """A step of the bench that could not be done; the message says which and why."""


# -- processes and their cost -------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the bench dies, however it dies."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and resident memory of one process at one moment."""

    cpu_s: float
    rss: int


def usage(pid: int) -> Usage | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3 of proc(5)): utime is 14, stime 15, rss 24.
    return Usage((int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE_SIZE)


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (`/proc/stat`)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class Snapshot:
    at: float
    procs: dict[str, Usage]
    jiffies: tuple[int, int]

    def cpu(self, later: Snapshot, prefix: str) -> float | None:
        """CPU seconds the processes named `prefix*` used between this and `later`."""
        names = [n for n in later.procs if n.startswith(prefix) and n in self.procs]
        if not names:
            return None
        return sum(later.procs[n].cpu_s - self.procs[n].cpu_s for n in names)

    def busy(self, later: Snapshot) -> float:
        """How busy the whole machine was in between, in cores."""
        busy = later.jiffies[0] - self.jiffies[0]
        total = later.jiffies[1] - self.jiffies[1]
        return (os.cpu_count() or 1) * busy / total if total else 0.0

    def others(self, later: Snapshot) -> float:
        """How busy the machine was in between with processes not watched, in cores."""
        known = self.cpu(later, "") or 0.0
        return max(self.busy(later) - known / (later.at - self.at), 0.0)


class Sampler:
    """Watches the bench's processes; `snapshot()` now, and `peak_rss` over a time range."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self._samples: list[Snapshot] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def snapshot(self) -> Snapshot:
        procs = {}
        for name, pid in list(self.pids.items()):
            found = usage(pid)
            if found is not None:
                procs[name] = found
        return Snapshot(time.time(), procs, machine_jiffies())

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            sample = self.snapshot()
            with self._lock:
                self._samples.append(sample)

    def peak_rss(self, name: str, start: float, end: float) -> int:
        with self._lock:
            values = [
                s.procs[name].rss for s in self._samples if start <= s.at <= end and name in s.procs
            ]
        return max(values, default=0)

    def peak_rss_mb(self, name: str, start: float, end: Snapshot) -> float:
        """The peak RSS of `name` from `start` to the snapshot `end` (included), in MiB."""
        return max(self.peak_rss(name, start, end.at), end.procs[name].rss) / 2**20

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def stop_process(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing is listening on {host}:{port} after {timeout:g} s")


@contextlib.contextmanager
def private_broker(folder: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `mosquitto` of the bench's own on a free port, with the shipped config's queue limits
    (deploy/mosquitto/mosquitto.conf): device reports reach the controller in bursts, and
    Mosquitto's default (1,000 queued QoS 1 messages per client) would drop some."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        raise BenchError(
            "the bench's own broker needs `mosquitto` (apt-get install mosquitto); or use a "
            "broker of yours with --mqtt-url URL (bench_rollout: --shared-broker --mqtt-url URL)"
        )
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_queued_bytes 134217728\n"
        f"log_dest file {folder / 'mosquitto.log'}\nlog_type error\nlog_type warning\n"
    )
    with (folder / "mosquitto.out").open("wb") as out:
        process = subprocess.Popen(
            [mosquitto, "-c", str(config)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        wait_port("127.0.0.1", port, 10, lambda: process.poll() is None)
        yield f"mqtt://127.0.0.1:{port}", process
    finally:
        stop_process(process, 5)


def open_broker(
    stack: contextlib.ExitStack, folder: Path, private: bool, shared_url: str, sampler: Sampler
) -> tuple[str, str]:
    """The broker of one fleet, its CPU sampled when its pid is known: (URL, name to report)."""
    if private:
        url, broker = stack.enter_context(private_broker(folder))
        sampler.pids["broker"] = broker.pid
        return url, f"private mosquitto ({url})"
    pid = shared_broker_pid(shared_url)
    if pid is not None:
        sampler.pids["broker"] = pid
    return shared_url, f"shared broker ({shared_url})"


def shared_broker_pid(url: str) -> int | None:
    """The local Mosquitto's pid when `url` is the one this machine's service listens on."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost") or (parts.port or 1883) != 1883:
        return None
    with contextlib.suppress(OSError, ValueError):
        return int(SHARED_MOSQUITTO_PID_FILE.read_text().strip())
    return None


def clear_retained_presence(url: str, device_ids: list[str]) -> None:
    """Remove the retained presence messages the devices left on a shared broker."""
    try:
        _clear_retained(url, device_ids)
    except Exception as exc:  # cleanup must not hide what went wrong before it
        print(f"could not clear the devices' retained presence on {url}: {exc!r}", file=sys.stderr)


def _clear_retained(url: str, device_ids: list[str]) -> None:
    if not device_ids:
        return
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from ota.protocol import Channel, topic

    parts = urlsplit(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    if parts.username:
        client.username_pw_set(parts.username, parts.password)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    try:
        infos = [
            client.publish(topic(device_id, Channel.PRESENCE), b"", qos=1, retain=True)
            for device_id in device_ids
        ]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


# -- the controller -------------------------------------------------------------------------------


class Api:
    """The controller's REST API with the admin token; a small connection pool for threads."""

    def __init__(self, server: str, token: str, pool: int = 16) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self._http = urllib3.PoolManager(
            maxsize=pool, timeout=urllib3.Timeout(connect=5.0, read=120.0), retries=False
        )

    def call(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
        auth: bool = True,
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        response = self._http.request(method, url, body=body, headers=headers)
        if response.status >= 400:
            raise BenchError(f"{method} {path}: HTTP {response.status}: {response.data[:300]!r}")
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(response.data)
        return response.data.decode()

    def metrics(self) -> dict[str, float]:
        """Every sample on /metrics by `name{label="value",...}`, and each name's sum over its
        labels by `name`."""
        from prometheus_client.parser import text_string_to_metric_families

        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(self.call("GET", "/metrics", auth=False)):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                if sample.labels:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    totals[f"{sample.name}{{{labels}}}"] = sample.value
        return totals


@dataclass
class Controller:
    url: str
    broker_url: str
    process: subprocess.Popen[bytes]
    root_json: Path
    api: Api


def init_fleet(fleet_dir: Path) -> dict[str, Any]:
    command = [sys.executable, "-c", "from fleet.cli import main; main()", "init"]
    command += ["--dir", str(fleet_dir), "--root-keys", "1", "--root-threshold", "1", "-o", "json"]
    done = subprocess.run(
        command,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"fleetctl init failed: {done.stderr.decode().strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@contextlib.contextmanager
def controller(
    folder: Path, mqtt_url: str, log_level: str, settings: Mapping[str, Any] | None = None
) -> Iterator[Controller]:
    """`fleetctl init` a fleet in `folder/fleet` (with `settings` in its fleet.yaml) and run
    `fleetctl serve` on it."""
    fleet = init_fleet(folder / "fleet")
    if settings:
        config_file = folder / "fleet" / "fleet.yaml"
        config = yaml.safe_load(config_file.read_text()) | dict(settings)
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    stdout_path, stderr_path = folder / "controller.stdout", folder / "controller.log"
    command = [sys.executable, "-c", "from fleet.cli import main; main()", "serve"]
    command += ["--dir", str(folder / "fleet"), "--listen", "127.0.0.1:0"]
    command += ["--mqtt-url", mqtt_url, "--log-level", log_level]
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        server = broker = None
        while not (server and broker):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = stderr_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"fleetctl serve did not start:\n{tail}")
            for line in stdout_path.read_text(errors="replace").splitlines():
                if line.startswith("listening on "):
                    server = line.removeprefix("listening on ").strip()
                elif line.startswith("broker "):
                    broker = line.removeprefix("broker ").strip()
            time.sleep(0.05)
        api = Api(server, str(fleet["admin_token"]))
        yield Controller(server, broker, process, Path(fleet["root"]), api)
    finally:
        stop_process(process)


# -- the agent workers ----------------------------------------------------------------------------


class Workers:
    """The agent worker processes (`bench.fleet_agents`), each with its share of devices."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.specs = specs
        self.processes: list[BaseProcess] = []
        self.pipes: list[Connection] = []
        self.device_ids: list[str] = []
        self.worker_of: dict[str, int] = {}

    def __enter__(self) -> Workers:
        context = multiprocessing.get_context("spawn")
        # Started with SIGINT blocked: a Ctrl-C is the bench's to handle, and the worker ignores
        # it from its first line on (the mask is inherited across exec).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for spec in self.specs:
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=worker_main, args=(theirs, spec), name=f"agents-{spec.index}"
                )
                process.daemon = True
                process.start()
                theirs.close()
                self.processes.append(process)
                self.pipes.append(ours)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def ask(self, request: tuple[Any, ...], timeout: float) -> list[tuple[Any, ...]]:
        """Send `request` to every worker; their answers, in order."""
        for pipe in self.pipes:
            pipe.send(request)
        answers = []
        deadline = time.monotonic() + timeout
        for index, pipe in enumerate(self.pipes):
            if not pipe.poll(max(deadline - time.monotonic(), 0.0)):
                raise BenchError(f"agent worker {index} did not answer {request[0]!r} in time")
            answer: tuple[Any, ...] = pipe.recv()
            if answer[0] == "error":
                raise BenchError(f"agent worker {index}: {answer[1]}")
            answers.append(answer)
        return answers

    def enroll(self, server: str, root_json: Path, token: str, threads: int) -> float:
        started = time.perf_counter()
        answers = self.ask(("enroll", server, str(root_json), token, threads), timeout=1800)
        self.device_ids[:] = [device_id for answer in answers for device_id in answer[1]]
        self.worker_of = {d: w for w, answer in enumerate(answers) for d in answer[1]}
        return time.perf_counter() - started

    def run(self) -> None:
        self.ask(("run",), timeout=300)

    def stats(self) -> Stats:
        total = Stats()
        for answer in self.ask(("stats",), timeout=60):
            stats: Stats = answer[1]
            total.devices += stats.devices
            total.connected += stats.connected
            total.connects += stats.connects
            total.refused += stats.refused
            total.failed_daemons += stats.failed_daemons
            for state, count in stats.states.items():
                total.states[state] = total.states.get(state, 0) + count
        return total

    def await_finished(self, worker: int, count: int, timeout: float) -> None:
        """Until worker `worker`'s daemons have reported `count` commands finished."""
        pipe = self.pipes[worker]
        pipe.send(("await", count))
        if not pipe.poll(timeout):
            raise BenchError(f"agent worker {worker}: {count} commands not finished in time")
        answer = pipe.recv()
        if answer[0] != "reached":
            raise BenchError(f"agent worker {worker}: {answer}")

    def events(self) -> list[Event]:
        return [event for answer in self.ask(("events",), timeout=60) for event in answer[1]]

    def stop(self) -> list[str]:
        errors: list[str] = []
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        deadline = time.monotonic() + 45
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError):
                if pipe.poll(max(deadline - time.monotonic(), 0.1)):
                    answer = pipe.recv()
                    if answer[0] == "stopped":
                        errors += answer[1]
        for process in self.processes:
            process.join(max(deadline - time.monotonic(), 1.0))
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self.pipes:
            pipe.close()
        self.pipes.clear()
        self.processes.clear()
        return errors


# -- profiles -------------------------------------------------------------------------------------

# A py-spy recording: its output file and its process.
ProfileRecording = tuple[Path, subprocess.Popen[bytes]]


def start_profilers(
    options: FleetOptions, pids: dict[str, int], gil_only: Collection[str] = ()
) -> list[ProfileRecording]:
    """py-spy recordings of the processes `pids` (profile name: pid) into `options.profile_dir`,
    none when not profiling; those in `gil_only` only while they hold the GIL."""
    if options.profile_dir is None or options.py_spy is None:
        return []
    options.profile_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for name, pid in pids.items():
        out = options.profile_dir / f"{name}.txt"
        command = [options.py_spy, "record", "-p", str(pid), "-o", str(out), "--format"]
        command += ["raw", "--rate", "100", "--nonblocking", "--threads"]
        if name in gil_only:
            command.append("--gil")
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        started.append((out, process))
    return started


def stop_profilers(started: list[ProfileRecording]) -> list[str]:
    """Stop the recordings, each writing its profile; the profiles' paths."""
    for _, process in started:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
    for _, process in started:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return [str(out) for out, _ in started]


# -- one fleet ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetOptions:
    """The options of `add_common_arguments`: the devices, the broker, the controller, profiles."""

    workers: int
    threads: int
    enroll_threads: int
    private_broker: bool
    mqtt_url: str
    timeout_s: float
    state_root: Path | None
    controller_log_level: str
    agent_log_level: str
    profile_dir: Path | None
    py_spy: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **bench_options: Any) -> Self:
        """These options from `args`, with the bench's own `bench_options`."""
        return cls(
            workers=args.workers,
            threads=args.threads,
            enroll_threads=args.enroll_threads,
            private_broker=args.private_broker,
            mqtt_url=args.mqtt_url,
            timeout_s=args.timeout,
            state_root=args.state_root,
            controller_log_level=args.controller_log_level,
            agent_log_level=args.agent_log_level,
            profile_dir=args.profile,
            py_spy=os.environ.get("FLEET_BENCH_PY_SPY") or shutil.which("py-spy"),
            **bench_options,
        )


@dataclass
class RunningFleet:
    """A fleet's temp dir, broker, controller and process sampler, up while `open_fleet` is."""

    stack: contextlib.ExitStack
    folder: Path
    mqtt_url: str
    broker_name: str
    ctl: Controller
    sampler: Sampler
    private_broker: bool

    def start_workers(self, specs: list[WorkerSpec], name: str) -> Workers:
        """The device workers of `specs`, sampled as `{name}-{index}`, stopped with the fleet."""
        workers = Workers(specs)
        if not self.private_broker:  # runs after the workers stopped (LIFO)
            self.stack.callback(clear_retained_presence, self.mqtt_url, workers.device_ids)
        self.stack.enter_context(workers)
        for spec, process in zip(workers.specs, workers.processes, strict=True):
            assert process.pid is not None
            self.sampler.pids[f"{name}-{spec.index}"] = process.pid
        return workers


@contextlib.contextmanager
def open_fleet(
    options: FleetOptions,
    prefix: str,
    console: Console,
    label: str,
    settings: Mapping[str, Any] | None = None,
) -> Iterator[RunningFleet]:
    """A new fleet in a temp dir named `prefix*`: its broker, `fleetctl init` and `serve`, and the
    sampler watching them and the bench. Everything is stopped and removed on the way out."""
    with contextlib.ExitStack() as stack:
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=options.state_root))
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        sampler = Sampler()
        mqtt_url, broker_name = open_broker(
            stack, folder, options.private_broker, options.mqtt_url, sampler
        )
        with console.status(f"{label}: fleetctl init and serve"):
            ctl = stack.enter_context(
                controller(folder, mqtt_url, options.controller_log_level, settings)
            )
        sampler.pids["controller"] = ctl.process.pid
        sampler.pids["bench"] = os.getpid()
        stack.enter_context(sampler)
        yield RunningFleet(
            stack, folder, mqtt_url, broker_name, ctl, sampler, options.private_broker
        )


def push_rune(api: Api, rune: RuneFile) -> dict[str, Any]:
    """Push `rune` to the controller; its answer (the rune's `target` and `sha256`)."""
    pushed: dict[str, Any] = api.call(
        "POST",
        "/api/v1/runes",
        body=rune.data,
        params={"org": ORG, "name": rune.name, "version": rune.version},
    )
    if pushed.get("target") is None:
        raise BenchError(f"pushing the rune gave {pushed}")
    return pushed


def online_devices(api: Api, attested: bool = False) -> int:
    """How many devices are online (and, with `attested`, hold a fresh affirming result: what a
    rollout needs of them)."""
    devices = api.call("GET", "/api/v1/devices")["devices"]
    return sum(
        bool(d.get("online"))
        and (
            not attested
            or (
                (d.get("attestation") or {}).get("status") == "affirming"
                and d["attestation"]["fresh"]
            )
        )
        for d in devices
    )


@dataclass(frozen=True)
class Options(FleetOptions):
    post_concurrency: int
    idle_s: float
    flood_per_device: int


@dataclass(frozen=True)
class RuneFile:
    name: str
    version: str
    kind: str
    data: bytes

    @property
    def ref(self) -> str:
        return f"{ORG}/{self.name}@{self.version}"


def percentile(values: list[float], percent: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


@dataclass
class FleetResult:
    devices: int
    mode: str  # "all at once" or "one at a time"
    broker: str
    workers: int
    enroll_s: float = 0.0
    connect_s: float = 0.0
    # Controller memory and idle CPU.
    rss_before_mb: float = 0.0
    rss_connected_mb: float = 0.0
    rss_per_device_kb: float = 0.0
    idle_cpu_cores: float = 0.0
    idle_cpu_us_per_device_s: float = 0.0
    enroll_connect_cpu_ms_per_device: float = 0.0
    # The deploy.
    succeeded: int = 0
    not_succeeded: dict[str, int] = field(default_factory=dict)
    posted_s: float = 0.0
    reach_50_s: float | None = None
    reach_90_s: float | None = None
    reach_all_s: float | None = None
    single_deploy_s: list[float] = field(default_factory=list)
    agent_received_p50_s: float | None = None
    agent_received_max_s: float | None = None
    agent_update_p50_s: float | None = None
    agent_update_p90_s: float | None = None
    report_lag_p50_s: float | None = None
    report_lag_max_s: float | None = None
    # Throughput and cost over the deploy window (from before the first request to the end).
    window_s: float = 0.0
    messages_in: dict[str, float] = field(default_factory=dict)
    commands_published: int = 0
    messages_per_s: float = 0.0
    http_requests: float = 0.0
    http_per_s: float = 0.0
    controller_cpu_s: float = 0.0
    controller_cpu_ms_per_device: float = 0.0
    controller_cpu_cores: float = 0.0
    controller_peak_rss_mb: float = 0.0
    agents_cpu_s: float = 0.0
    agents_cpu_ms_per_device: float = 0.0
    broker_cpu_s: float | None = None
    machine_busy_cores: float = 0.0
    bench_cpu_s: float = 0.0
    others_cores: float = 0.0
    cpu_floor_s: float = 0.0
    agents_idle_cpu_cores: float = 0.0
    # Capacity: a flood of signed status reports straight to the broker, the agents idle.
    flood_messages: int = 0
    flood_lost: int = 0
    flood_s: float | None = None
    flood_per_s: float | None = None
    flood_controller_cpu_ms_per_message: float | None = None
    flood_controller_cores: float | None = None
    agent_errors: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)


def make_specs(
    folder: Path,
    devices: int,
    options: FleetOptions,
    *,
    name: str = "agents",
    simulated: bool = False,
    command_key: dict[str, Any] | None = None,
    rune_sha256: str = "",
) -> list[WorkerSpec]:
    """The device workers' specs (logs in `folder/{name}-{index}.log`), and every device's state
    dir with its `agent.yaml`; the rest as in `WorkerSpec`."""
    workers = max(1, min(options.workers, devices))
    dirs = [folder / "devices" / f"device-{i:05d}" for i in range(devices)]
    for state_dir in dirs:
        state_dir.mkdir(parents=True)
        (state_dir / "agent.yaml").write_text(yaml.safe_dump(AGENT_RUN_CONFIG))
    return [
        WorkerSpec(
            index=w,
            state_dirs=tuple(str(d) for d in dirs[w::workers]),
            threads=options.threads,
            log_file=str(folder / f"{name}-{w}.log"),
            log_level=options.agent_log_level,
            simulated=simulated,
            command_key=command_key,
            rune_sha256=rune_sha256,
        )
        for w in range(workers)
    ]


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.25) -> float:
    """Poll `check` until true; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise BenchError(f"{what}: not done within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - started


def finished_at(command: dict[str, Any]) -> float | None:
    value = command.get("finished_at")
    return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else None


class FleetRun:
    """One fleet of `devices`: set up, measured, torn down (see the module docstring)."""

    def __init__(
        self, devices: int, serial: bool, rune: RuneFile, options: Options, console: Console
    ) -> None:
        self.devices = devices
        self.serial = serial
        self.rune = rune
        self.options = options
        self.console = console

    def run(self) -> FleetResult:
        options, label = self.options, f"{self.devices} devices"
        with open_fleet(options, f"fleet-bench-{self.devices}-", self.console, label) as fleet:
            result = FleetResult(
                self.devices,
                "one at a time" if self.serial else "all at once",
                fleet.broker_name,
                min(options.workers, self.devices),
            )
            workers = fleet.start_workers(make_specs(fleet.folder, self.devices, options), "agents")
            self._measure(fleet.ctl, workers, fleet.sampler, result)
            if options.flood_per_device > 0 and not self.serial:
                with self.console.status(f"{label}: a flood of status reports"):
                    self._flood(fleet.ctl, fleet.mqtt_url, workers, fleet.sampler, result)
            result.agent_errors = workers.stop()
            return result

    # -- phases ---------------------------------------------------------------------------------

    def _measure(
        self, ctl: Controller, workers: Workers, sampler: Sampler, result: FleetResult
    ) -> None:
        api, n = ctl.api, self.devices
        time.sleep(2.0)  # the controller's first renewal and imports are done
        before = sampler.snapshot()
        result.rss_before_mb = before.procs["controller"].rss / 2**20
        token = api.call("POST", "/api/v1/enrollment-tokens", {"uses": n, "ttl_s": 3600})["token"]
        with self.console.status(f"{n} devices: enrolling through the API"):
            result.enroll_s = workers.enroll(ctl.url, ctl.root_json, token, self._enroll_threads())
        with self.console.status(f"{n} devices: starting the daemons, waiting until online"):
            started = time.monotonic()
            workers.run()
            wait_until(lambda: online_devices(api) >= n, START_TIMEOUT_S + n * 0.2, "online", 1.0)
            result.connect_s = time.monotonic() - started
        self.console.print(
            f"{n} devices: enrolled in {result.enroll_s:.1f} s, all online "
            f"{result.connect_s:.1f} s after their daemons started ({result.broker})"
        )
        with self.console.status(f"{n} devices: idle for {self.options.idle_s:g} s"):
            time.sleep(3.0)
            idle_start = sampler.snapshot()
            time.sleep(self.options.idle_s)
            idle_end = sampler.snapshot()
        connected = idle_end.procs["controller"]
        result.rss_connected_mb = connected.rss / 2**20
        result.rss_per_device_kb = (connected.rss - before.procs["controller"].rss) / n / 1024
        idle_cpu = idle_start.cpu(idle_end, "controller") or 0.0
        result.idle_cpu_cores = idle_cpu / (idle_end.at - idle_start.at)
        result.idle_cpu_us_per_device_s = result.idle_cpu_cores / n * 1e6
        agents_idle = idle_start.cpu(idle_end, "agents-") or 0.0
        result.agents_idle_cpu_cores = agents_idle / (idle_end.at - idle_start.at)
        result.enroll_connect_cpu_ms_per_device = (
            (before.cpu(idle_start, "controller") or 0.0) / n * 1000
        )

        push_rune(api, self.rune)
        time.sleep(1.0)
        if self.serial:
            self._deploy_one_at_a_time(ctl, workers, sampler, result)
        else:
            self._deploy_all(ctl, workers, sampler, result)

    def _enroll_threads(self) -> int:
        return max(1, self.options.enroll_threads // max(self.options.workers, 1))

    def _post_deploy(self, api: Api, device_id: str) -> str:
        body = {"rune": f"{self.rune.name}@{self.rune.version}", "org": ORG}
        command = api.call("POST", f"/api/v1/devices/{device_id}/deploy", body)
        return str(command["id"])

    def _deploy_all(
        self, ctl: Controller, workers: Workers, sampler: Sampler, result: FleetResult
    ) -> None:
        api, n, options = ctl.api, self.devices, self.options
        metrics0 = api.metrics()
        start = sampler.snapshot()
        t0 = time.time()
        profilers = self._start_profilers(ctl, workers)
        with concurrent.futures.ThreadPoolExecutor(options.post_concurrency) as pool:
            commands = list(pool.map(lambda d: self._post_deploy(api, d), workers.device_ids))
        result.posted_s = time.time() - t0

        def agents_done() -> bool:
            stats = workers.stats()
            done = sum(stats.states.get(state, 0) for state in TERMINAL)
            status.update(
                f"{n} devices: deploying {self.rune.ref}: {stats.states.get('received', 0)} "
                f"received, {done} finished on the devices ({time.time() - t0:.0f} s)"
            )
            return done >= n

        with self.console.status(f"{n} devices: deploying") as status:
            wait_until(agents_done, options.timeout_s, "the deploy on every device", 0.25)
            # Every report the agents sent has been handled once the controller counted as many
            # status messages (accepted or duplicate); each is counted as its handling starts.
            sent = sum(workers.stats().states.values())

            def handled() -> bool:
                metrics = api.metrics()
                count = sum(metrics.get(k, 0.0) - metrics0.get(k, 0.0) for k in STATUS_COUNTERS)
                status.update(
                    f"{n} devices: the controller handled {count:.0f} of {sent} status reports"
                )
                return count >= sent

            with contextlib.suppress(BenchError):
                wait_until(handled, 120, "status reports handled", 0.25)
            shown = self._final_commands(api, commands, status)
        end = sampler.snapshot()
        metrics1 = api.metrics()
        result.profiles = stop_profilers(profilers)
        self._summarize(result, shown, workers.events(), t0, start, end, metrics0, metrics1)
        result.controller_peak_rss_mb = sampler.peak_rss_mb("controller", t0, end)

    def _final_commands(self, api: Api, ids: list[str], status: Any) -> list[dict[str, Any]]:
        """Every command as the controller has it, waiting (up to 30 s) for the last reports."""
        shown: dict[str, dict[str, Any]] = {}
        pending = list(ids)
        deadline = time.monotonic() + 30
        with concurrent.futures.ThreadPoolExecutor(self.options.post_concurrency) as pool:
            while pending:
                for command in pool.map(
                    lambda c: api.call("GET", f"/api/v1/commands/{c}"), pending
                ):
                    shown[command["id"]] = command
                pending = [c for c in pending if shown[c]["state"] not in TERMINAL]
                if not pending or time.monotonic() > deadline:
                    break
                status.update(f"{self.devices} devices: {len(pending)} commands not finished yet")
                time.sleep(0.1)
        return [shown[c] for c in ids]

    def _deploy_one_at_a_time(
        self, ctl: Controller, workers: Workers, sampler: Sampler, result: FleetResult
    ) -> None:
        api = ctl.api
        metrics0 = api.metrics()
        start = sampler.snapshot()
        t0 = time.time()
        shown, single = [], []
        finished = [0] * len(workers.pipes)
        for device_id in workers.device_ids:
            posted = time.time()
            command = self._post_deploy(api, device_id)
            worker = workers.worker_of[device_id]
            finished[worker] += 1
            workers.await_finished(worker, finished[worker], self.options.timeout_s)

            def recorded(command: str = command) -> bool:
                shown_command = api.call("GET", f"/api/v1/commands/{command}")
                if shown_command["state"] not in TERMINAL:
                    return False
                shown.append(shown_command)
                return True

            wait_until(recorded, 60, "a single deploy's report", 0.02)
            end_of_one = finished_at(shown[-1])
            if end_of_one is not None:
                single.append(end_of_one - posted)
        end = sampler.snapshot()
        metrics1 = api.metrics()
        result.single_deploy_s = single
        self._summarize(result, shown, workers.events(), t0, start, end, metrics0, metrics1)
        result.controller_peak_rss_mb = sampler.peak_rss_mb("controller", t0, end)

    # -- results --------------------------------------------------------------------------------

    def _summarize(
        self,
        result: FleetResult,
        commands: list[dict[str, Any]],
        events: list[Event],
        t0: float,
        start: Snapshot,
        end: Snapshot,
        metrics0: dict[str, float],
        metrics1: dict[str, float],
    ) -> None:
        n = self.devices
        states = [c["state"] for c in commands]
        result.succeeded = states.count("succeeded")
        result.not_succeeded = {s: states.count(s) for s in set(states) if s != "succeeded"}
        reached = sorted(
            at - t0
            for c in commands
            if c["state"] == "succeeded" and (at := finished_at(c)) is not None
        )
        if self.serial:  # one after the other: only each deploy's own time means something
            reached = []
        if result.succeeded == n and reached:
            result.reach_all_s = reached[-1]
        result.reach_50_s = reached[(n + 1) // 2 - 1] if len(reached) >= (n + 1) // 2 else None
        nine = -(-9 * n // 10)
        result.reach_90_s = reached[nine - 1] if len(reached) >= nine else None
        received = {e.command_id: e.at for e in events if e.state == "received"}
        finished = {e.command_id: e.at for e in events if e.state in TERMINAL}
        delivery = [at - t0 for at in received.values()]
        updates = [finished[c] - at for c, at in received.items() if c in finished]
        lag = [
            at - finished[c["id"]]
            for c in commands
            if c["id"] in finished and (at := finished_at(c)) is not None
        ]
        if self.serial:  # per deploy: from its own request, not from the first one
            posted = {
                c["id"]: datetime.fromisoformat(c["created_at"]).timestamp() for c in commands
            }
            delivery = [at - posted[c] for c, at in received.items() if c in posted]
        result.agent_received_p50_s = percentile(delivery, 50)
        result.agent_received_max_s = max(delivery, default=None)
        result.agent_update_p50_s = percentile(updates, 50)
        result.agent_update_p90_s = percentile(updates, 90)
        result.report_lag_p50_s = percentile(lag, 50)
        result.report_lag_max_s = max(lag, default=None)

        last = max((at for c in commands if (at := finished_at(c)) is not None), default=None)
        window_end = max(end.at if last is None else last, t0 + 1e-3)
        result.window_s = window_end - t0
        result.messages_in = {
            name.removeprefix("fleet_messages_").replace("_total", ""): metrics1.get(name, 0.0)
            - metrics0.get(name, 0.0)
            for name in MESSAGE_COUNTERS
        }
        result.commands_published = sum(int(c.get("attempts") or 0) for c in commands)
        handled = sum(result.messages_in.values()) + result.commands_published
        result.messages_per_s = handled / result.window_s
        http = "fleet_http_requests_total"
        result.http_requests = metrics1.get(http, 0.0) - metrics0.get(http, 0.0)
        result.http_per_s = result.http_requests / result.window_s
        result.controller_cpu_s = start.cpu(end, "controller") or 0.0
        result.controller_cpu_ms_per_device = result.controller_cpu_s / n * 1000
        result.controller_cpu_cores = result.controller_cpu_s / (end.at - start.at)
        result.agents_cpu_s = start.cpu(end, "agents-") or 0.0
        result.agents_cpu_ms_per_device = result.agents_cpu_s / n * 1000
        result.broker_cpu_s = start.cpu(end, "broker")
        result.bench_cpu_s = start.cpu(end, "bench") or 0.0
        result.machine_busy_cores = start.busy(end)
        result.others_cores = start.others(end)
        # What the deploy would take if the controller, the agents and the broker shared every
        # core of a quiet machine perfectly: their CPU seconds over the number of cores.
        fleet_cpu = result.controller_cpu_s + result.agents_cpu_s + (result.broker_cpu_s or 0.0)
        result.cpu_floor_s = fleet_cpu / (os.cpu_count() or 1)

    # -- capacity -------------------------------------------------------------------------------

    def _flood(
        self,
        ctl: Controller,
        mqtt_url: str,
        workers: Workers,
        sampler: Sampler,
        result: FleetResult,
    ) -> None:
        """Publish `flood_per_device` signed status reports per device (no command: what a
        device sends when its rune starts running or passes probation) straight to the broker,
        sealed beforehand with each device's own key and next `seq`s, and time the controller
        until it has handled them all. The agents are connected and idle meanwhile."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from attestation.identity import DeviceIdentity
        from ota.protocol import CONTROLLER, Channel, Message, MessageType, seal_message, topic

        api = ctl.api
        devices = {d["id"]: d for d in api.call("GET", "/api/v1/devices")["devices"]}
        batches: list[list[tuple[str, bytes]]] = []
        now = time.time()
        for state_dir in (Path(d) for spec in workers.specs for d in spec.state_dirs):
            identity = DeviceIdentity.load_or_create(state_dir)
            channel = json.loads((state_dir / "channel.json").read_text())
            seq = int(channel["sent"]["status"]) + 1000  # above anything the agent still sends
            device = devices[identity.device_id]
            active = {"ref": device["active_rune"], "sha256": device["active_sha256"]}
            body: dict[str, Any] = {"command_id": None, "state": "running"}
            body["reason"] = self.rune.ref
            body |= {"active": active, "previous": None}
            name = topic(identity.device_id, Channel.STATUS)
            batches.append(
                [
                    (
                        name,
                        seal_message(
                            Message(
                                identity.device_id,
                                CONTROLLER,
                                seq + i,
                                now,
                                now + 600,
                                MessageType.STATUS,
                                body,
                            ),
                            identity.signer,
                        ),
                    )
                    for i in range(self.options.flood_per_device)
                ]
            )
        messages = [m for round_ in zip(*batches, strict=True) for m in round_]
        parts = urlsplit(mqtt_url)
        client = mqtt.Client(CallbackAPIVersion.VERSION2)
        client.max_inflight_messages_set(FLOOD_WINDOW)
        if parts.username:
            client.username_pw_set(parts.username, parts.password)
        client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        client.loop_start()
        try:
            metrics0 = api.metrics()
            start = sampler.snapshot()
            sent = 0
            counted = 0.0
            deadline = time.monotonic() + FLOOD_TIMEOUT_S
            while time.monotonic() < deadline:
                # At most FLOOD_WINDOW reports not yet handled: the broker keeps a bounded
                # queue per subscriber (Mosquitto: 1,000 by default) and drops QoS 1 messages
                # beyond it, so an unpaced burst measures the broker's limit, not the controller.
                while sent < len(messages) and sent - counted < FLOOD_WINDOW:
                    name, data = messages[sent]
                    client.publish(name, data, qos=1)
                    sent += 1
                metrics = api.metrics()
                counted = sum(metrics.get(k, 0.0) - metrics0.get(k, 0.0) for k in STATUS_COUNTERS)
                if counted >= len(messages):
                    break
                time.sleep(0.05)
            end = sampler.snapshot()
        finally:
            client.disconnect()
            client.loop_stop()
        cpu = start.cpu(end, "controller") or 0.0
        handled = min(int(counted), len(messages))
        result.flood_messages = len(messages)
        result.flood_lost = len(messages) - handled
        result.flood_s = end.at - start.at
        result.flood_per_s = handled / result.flood_s
        result.flood_controller_cpu_ms_per_message = cpu / max(handled, 1) * 1000
        result.flood_controller_cores = cpu / result.flood_s

    # -- profiles -------------------------------------------------------------------------------

    def _start_profilers(self, ctl: Controller, workers: Workers) -> list[ProfileRecording]:
        """The controller's (all its time) and the first agent worker's (its time with the GIL)."""
        agents = f"agents-0-{self.devices}"
        pids = {f"controller-{self.devices}": ctl.process.pid}
        if workers.processes and workers.processes[0].pid is not None:
            pids[agents] = workers.processes[0].pid
        return start_profilers(self.options, pids, gil_only={agents})


# -- the rune -------------------------------------------------------------------------------------


def make_rune(kind: str, folder: Path) -> RuneFile:
    if kind == "legacy":
        from ota.rune.runefile import CapabilityKind
        from tests.legacy_runes import capability_rune

        return RuneFile("bench-legacy", "1.0.0", kind, capability_rune(CapabilityKind.RAND, 16))
    from agent.sandbox.models import inspect_model
    from examples import models
    from ota.rune.build import build_bundle

    scratch = folder / "examples"
    ignored = shutil.ignore_patterns("__pycache__", "*.py")
    shutil.copytree(ROOT / "examples", scratch, ignore=ignored)
    models.write_all(scratch)
    built = build_bundle(
        scratch / "sine" / "Runefile.yml", name="sine", version="0.1.0", inspect_model=inspect_model
    )
    return RuneFile("sine", "0.1.0", kind, built.data)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Hide what native code prints on fd 2 (TFLite's delegate notice when the model is built)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with Path(os.devnull).open("wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# -- output ---------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def print_run_notes(
    console: Console,
    others_cores: float,
    errors: list[str],
    profiles: list[str],
    *,
    during: str,
    errors_of: str,
) -> None:
    """The notes under a run's line: a machine that was not quiet `during` it, the first errors
    of its devices (`errors_of`: what they are), its profiles."""
    if others_cores > NOISY_CORES:
        console.print(
            f"  [yellow]the machine was not quiet:[/yellow] other processes used "
            f"{others_cores:.2f} cores during the {during}; times are inflated"
        )
    for error in errors[:5]:
        console.print(f"  [red]{errors_of} error:[/red] {error}", highlight=False)
    for profile in profiles:
        console.print(f"  profile: {profile}")


@dataclass
class Report:
    rune: dict[str, Any]
    options: dict[str, Any]
    baseline: FleetResult | None
    sizes: list[FleetResult]

    @property
    def single_s(self) -> float | None:
        if self.baseline is None or not self.baseline.single_deploy_s:
            return None
        return statistics.median(self.baseline.single_deploy_s)

    def ratios(self, result: FleetResult) -> dict[str, float | None]:
        single = self.single_s
        base = self.baseline
        reach = result.reach_all_s
        ratios: dict[str, float | None] = {
            "reach_all_over_single": None,
            "reach_all_per_device_over_single": None,
            "controller_cpu_per_device_over_single": None,
            "agents_cpu_per_device_over_single": None,
        }
        if single and reach is not None:
            ratios["reach_all_over_single"] = reach / single
            ratios["reach_all_per_device_over_single"] = reach / result.devices / single
        if base is not None and base.controller_cpu_ms_per_device:
            ratios["controller_cpu_per_device_over_single"] = (
                result.controller_cpu_ms_per_device / base.controller_cpu_ms_per_device
            )
        if base is not None and base.agents_cpu_ms_per_device:
            ratios["agents_cpu_per_device_over_single"] = (
                result.agents_cpu_ms_per_device / base.agents_cpu_ms_per_device
            )
        return ratios

    def target(self) -> dict[str, Any] | None:
        for result in self.sizes:
            if result.devices >= TARGET_DEVICES:
                met = result.reach_all_s is not None and result.reach_all_s <= TARGET_S
                return {
                    "devices": result.devices,
                    "reach_all_s": result.reach_all_s,
                    "target_s": TARGET_S,
                    "met": met,
                }
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "rune": self.rune,
            "options": self.options,
            "single_deploy_s": self.single_s,
            "baseline": None if self.baseline is None else asdict(self.baseline),
            "sizes": [asdict(r) | {"ratios": self.ratios(r)} for r in self.sizes],
            "target": self.target(),
        }

    def print(self, console: Console) -> None:
        columns = ([self.baseline] if self.baseline else []) + self.sizes
        table = Table(
            title=f"Deploy of {self.rune['ref']} ({self.rune['kind']}, "
            f"{self.rune['bytes']:,} bytes) to a simulated fleet"
        )
        table.add_column("")
        for result in columns:
            table.add_column(
                f"{result.devices} devices\n{result.mode}"
                + ("\n(baseline)" if result is self.baseline else ""),
                justify="right",
            )

        def row(title: str, value: Callable[[FleetResult], str]) -> None:
            table.add_row(title, *(value(r) for r in columns))

        row("agent worker processes", lambda r: str(r.workers))
        row("enrollment (s)", lambda r: fmt(r.enroll_s))
        row("daemons started -> all online (s)", lambda r: fmt(r.connect_s))
        row("succeeded / devices", lambda r: f"{r.succeeded}/{r.devices}")
        row(
            "not succeeded",
            lambda r: ", ".join(f"{k} {v}" for k, v in r.not_succeeded.items()) or "-",
        )
        row(
            "single deploy, median (s)",
            lambda r: (
                fmt(statistics.median(r.single_deploy_s), ".3f") if r.single_deploy_s else "-"
            ),
        )
        row("deploy requests sent (s)", lambda r: fmt(r.posted_s, ".2f"))
        row("reached 50% of devices (s)", lambda r: fmt(r.reach_50_s, ".2f"))
        row("reached 90% (s)", lambda r: fmt(r.reach_90_s, ".2f"))
        row("reached every device (s)", lambda r: fmt(r.reach_all_s, ".2f"))
        row(
            "command at the device, p50 / max (s)",
            lambda r: (
                f"{fmt(r.agent_received_p50_s, '.2f')} / {fmt(r.agent_received_max_s, '.2f')}"
            ),
        )
        row(
            "update on the device, p50 / p90 (s)",
            lambda r: f"{fmt(r.agent_update_p50_s, '.2f')} / {fmt(r.agent_update_p90_s, '.2f')}",
        )
        row(
            "report recorded after sent, p50 / max (s)",
            lambda r: f"{fmt(r.report_lag_p50_s, '.3f')} / {fmt(r.report_lag_max_s, '.2f')}",
        )
        row("device messages handled", lambda r: fmt(sum(r.messages_in.values()), ".0f"))
        row(
            "  of which hello (reconnects)",
            lambda r: fmt(r.messages_in.get('received{type="hello"}'), ".0f"),
        )
        row("commands published", lambda r: str(r.commands_published))
        row("messages / s through the controller", lambda r: fmt(r.messages_per_s, ".0f"))
        row("HTTP requests / s (TUF, downloads)", lambda r: fmt(r.http_per_s, ".0f"))
        row("controller CPU in the deploy (s)", lambda r: fmt(r.controller_cpu_s, ".2f"))
        row("  per device (ms)", lambda r: fmt(r.controller_cpu_ms_per_device, ".1f"))
        row("  cores busy", lambda r: fmt(r.controller_cpu_cores, ".2f"))
        row("agents CPU per device (ms)", lambda r: fmt(r.agents_cpu_ms_per_device, ".1f"))
        row("broker CPU in the deploy (s)", lambda r: fmt(r.broker_cpu_s, ".2f"))
        row("bench process CPU in the deploy (s)", lambda r: fmt(r.bench_cpu_s, ".2f"))
        row("other processes on the machine (cores)", lambda r: fmt(r.others_cores, ".2f"))
        row("CPU floor: fleet CPU / cores (s)", lambda r: fmt(r.cpu_floor_s, ".1f"))
        row(f"machine busy (cores of {os.cpu_count()})", lambda r: fmt(r.machine_busy_cores, ".2f"))
        row("controller RSS before devices (MiB)", lambda r: fmt(r.rss_before_mb))
        row("controller RSS, all connected (MiB)", lambda r: fmt(r.rss_connected_mb))
        row("  growth per device (KiB)", lambda r: fmt(r.rss_per_device_kb))
        row("controller RSS peak in deploy (MiB)", lambda r: fmt(r.controller_peak_rss_mb))
        row("controller idle CPU per device (us/s)", lambda r: fmt(r.idle_cpu_us_per_device_s))
        row(
            "controller CPU, enroll + connect / device (ms)",
            lambda r: fmt(r.enroll_connect_cpu_ms_per_device),
        )
        row("agents idle CPU, all connected (cores)", lambda r: fmt(r.agents_idle_cpu_cores, ".2f"))
        row("flood: signed status reports", lambda r: str(r.flood_messages or "-"))
        row("flood: not handled (lost)", lambda r: str(r.flood_lost) if r.flood_messages else "-")
        row("flood: handled / s", lambda r: fmt(r.flood_per_s, ".0f"))
        row(
            "flood: controller CPU / report (ms)",
            lambda r: fmt(r.flood_controller_cpu_ms_per_message, ".2f"),
        )
        row("flood: controller cores busy", lambda r: fmt(r.flood_controller_cores, ".2f"))
        console.print(table)
        single = self.single_s
        if single is not None:
            console.print(f"baseline: a single-device deploy takes {single:.3f} s (median)")
        for result in self.sizes:
            ratios = self.ratios(result)
            console.print(
                f"{result.devices} devices: every device reached in "
                f"{fmt(ratios['reach_all_over_single'], '.1f', 'x')} a single deploy's time = "
                f"{fmt(ratios['reach_all_per_device_over_single'], '.3f', 'x')} per device; "
                f"controller CPU per device "
                f"{fmt(ratios['controller_cpu_per_device_over_single'], '.2f', 'x')} a single "
                f"deploy's, agents' CPU per device "
                f"{fmt(ratios['agents_cpu_per_device_over_single'], '.2f', 'x')}"
            )
            print_run_notes(
                console,
                result.others_cores,
                result.agent_errors,
                result.profiles,
                during="deploy",
                errors_of="agent",
            )
        target = self.target()
        if target is not None:
            verdict = "[green]met[/green]" if target["met"] else "[red]NOT met[/red]"
            console.print(
                f"target: {target['devices']} devices verified, installed and reported within "
                f"{TARGET_S:g} s: {fmt(target['reach_all_s'], '.1f', ' s')} -> {verdict}"
            )


# -- main -----------------------------------------------------------------------------------------


def add_common_arguments(
    parser: argparse.ArgumentParser, *, private_broker: bool, workers_help: str, timeout_help: str
) -> None:
    """The options every fleet bench takes, after its own; `private_broker`: whether a mosquitto
    of the bench's own is the default (then `--shared-broker`, else `--private-broker`)."""
    parser.add_argument("--workers", type=int, default=2, help=workers_help)
    parser.add_argument("--threads", type=int, default=16, help="update threads per worker")
    parser.add_argument(
        "--enroll-threads", type=int, default=8, help="enrollments in flight, over all workers"
    )
    parser.add_argument("--rune", choices=("sine", "legacy"), default="sine")
    parser.add_argument(
        "--mqtt-url",
        default=DEFAULT_MQTT_URL,
        help="the shared broker (default $FLEET_BENCH_MQTT_URL or mqtt://127.0.0.1:1883)",
    )
    if private_broker:
        parser.add_argument(
            "--shared-broker",
            dest="private_broker",
            action="store_false",
            help="use the broker at --mqtt-url instead of a mosquitto of our own per fleet",
        )
    else:
        parser.add_argument(
            "--private-broker", action="store_true", help="start a mosquitto of our own per fleet"
        )
    parser.add_argument("--timeout", type=float, default=900.0, help=timeout_help)
    parser.add_argument(
        "--state-root", type=Path, default=None, help="where fleets and device dirs go (a tmp dir)"
    )
    parser.add_argument("--controller-log-level", default="info")
    parser.add_argument("--agent-log-level", default="warning")
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR", help="py-spy profiles to DIR"
    )
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser.add_argument("--json", action="store_true", help="same as -o json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_fleet",
        description="Time a deploy to a simulated fleet of real agents (see the module docstring).",
    )
    parser.add_argument("--devices", default="100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 devices")
    parser.add_argument(
        "--baseline-devices",
        type=int,
        default=5,
        help="devices deployed one at a time for the baseline (0: no baseline)",
    )
    parser.add_argument("--post-concurrency", type=int, default=8, help="deploy requests in flight")
    parser.add_argument(
        "--flood",
        type=int,
        default=5,
        metavar="K",
        help="after the deploy, K signed status reports per device straight to the broker (0: no)",
    )
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle window per fleet")
    add_common_arguments(
        parser,
        private_broker=False,
        workers_help="agent worker processes",
        timeout_help="seconds per deploy",
    )
    return parser.parse_args(argv)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _json_output(args: argparse.Namespace) -> bool:
    return bool(args.json or args.output == "json")


def report_console(args: argparse.Namespace, width: int | None = None) -> Console:
    """The console for progress and the text report: stderr when stdout gets the JSON report."""
    return Console(stderr=True, width=width) if _json_output(args) else Console(width=width)


class BenchReport(Protocol):
    def to_json(self) -> dict[str, Any]: ...

    def print(self, console: Console) -> None: ...


def run_bench(
    args: argparse.Namespace,
    options: FleetOptions,
    console: Console,
    measure: Callable[[RuneFile], BenchReport],
) -> int:
    """`main` of a fleet bench: build the rune of `--rune`, `measure` with it, and print the
    report as text or JSON; the exit status (1: a step failed, 130: interrupted)."""
    if options.profile_dir is not None and options.py_spy is None:
        console.print("--profile needs py-spy on PATH or in $FLEET_BENCH_PY_SPY")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-bench-rune-") as scratch, quiet_stderr():
            rune = make_rune(args.rune, Path(scratch))
        report = measure(rune)
    except BenchError as exc:
        console.print(f"[red]bench failed:[/red] {exc}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; everything the bench started was stopped")
        return 130
    if _json_output(args):
        print(json.dumps(report.to_json()))
    else:
        report.print(console)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = report_console(args)
    sizes = [20] if args.quick else [int(s) for s in args.devices.split(",") if s.strip()]
    baseline_devices = min(args.baseline_devices, 2) if args.quick else args.baseline_devices
    options = Options.from_args(
        args,
        post_concurrency=args.post_concurrency,
        idle_s=args.idle_s,
        flood_per_device=args.flood,
    )

    def measure(rune: RuneFile) -> Report:
        baseline = None
        if baseline_devices > 0:
            baseline = FleetRun(baseline_devices, True, rune, options, console).run()
        results = [FleetRun(n, False, rune, options, console).run() for n in sizes]
        return Report(
            {"ref": rune.ref, "kind": rune.kind, "bytes": len(rune.data)},
            {
                "workers": options.workers,
                "threads_per_worker": options.threads,
                "broker": "private" if options.private_broker else options.mqtt_url,
                "state_root": str(options.state_root or tempfile.gettempdir()),
                "cpus": os.cpu_count(),
            },
            baseline,
            results,
        )

    return run_bench(args, options, console, measure)


if __name__ == "__main__":
    sys.exit(main())
