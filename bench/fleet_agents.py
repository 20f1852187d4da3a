"""The fleet simulator's agent worker: many real `agent.daemon.Daemon`s in one process.

`bench.bench_fleet` starts a few of these processes (multiprocessing, `spawn`). Each holds a share
of the simulated devices and talks to the bench over a `Pipe`:

- `("enroll", server, root_json, token, threads)`: enroll every device of its share through the
  controller's API (`agent.enroll.enroll`, the code `fleet-agent enroll` runs: a fresh Ed25519
  identity, a CSR, a signed request with the token), `threads` at a time. Answers
  `("enrolled", [device ids], seconds)`.
- `("run",)`: build one `Daemon(SessionConfig(...))` per device exactly as `fleet-agent run` does
  and run them all on one asyncio loop (their blocking work, TUF and slot writes, goes to a thread
  pool of `WorkerSpec.threads`). Answers `("running",)`; from then on it answers `("stats",)`
  with `("stats", Stats)`, `("events",)` with `("events", [Event ...])`, and `("await", K)` with
  `("reached", K)` as soon as its daemons have reported K commands finished (deploy baselines
  wait on it instead of polling).
- `("stop",)`: stops every daemon the way SIGTERM stops `fleet-agent run` (goodbye presence, rune
  loop closed), answers `("stopped", [errors])` and exits.

Every device is a whole agent: its own key and state dir, its own MQTT session, TUF client and
A/B slots; only the process, the event loop and the thread pool are shared. The worker ignores
SIGINT (the bench stops it), and exits by itself when the bench's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

STOP_TIMEOUT_S = 30.0
TERMINAL = frozenset({"succeeded", "failed", "refused", "rolled-back", "done"})


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    state_dirs: tuple[str, ...]
    threads: int
    log_file: str
    log_level: str = "WARNING"


@dataclass(frozen=True)
class Event:
    """A command state one of this worker's daemons reported (queued for sending), and when."""

    device_id: str
    command_id: str
    state: str
    at: float


@dataclass
class Stats:
    devices: int = 0
    connected: int = 0
    connects: int = 0
    refused: int = 0
    states: dict[str, int] = field(default_factory=dict)
    failed_daemons: int = 0


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """The worker process's entry point (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # What native code prints (TFLite's delegate notices) goes to the log, not the bench's output.
    log_fd = os.open(spec.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    logging.basicConfig(
        filename=spec.log_file,
        level=getattr(logging, spec.log_level.upper(), logging.WARNING),
        format=f"%(asctime)s w{spec.index} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    try:
        while True:
            request = conn.recv()
            if request[0] == "enroll":
                _, server, root_json, token, threads = request
                conn.send(_enroll_all(spec, server, Path(root_json), token, threads))
            elif request[0] == "run":
                asyncio.run(_run_daemons(conn, spec))
                return
            elif request[0] == "stop":
                conn.send(("stopped", []))
                return
            else:
                conn.send(("error", f"unknown request {request[0]!r}"))
    except (EOFError, OSError, KeyboardInterrupt):
        return
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))


# -- enrollment -----------------------------------------------------------------------------------


def _enroll_all(
    spec: WorkerSpec, server: str, root_json: Path, token: str, threads: int
) -> tuple[Any, ...]:
    from agent.enroll import EnrollError, enroll

    def one(state_dir: str) -> str:
        folder = Path(state_dir)
        for attempt in range(5):
            try:
                enrollment = enroll(folder, server, root_json, token)
            except EnrollError as exc:
                if exc.status is not None and exc.status < 500 and exc.status != 429:
                    raise
                time.sleep(0.2 * 2**attempt)
                continue
            if not enrollment.enrolled:
                raise RuntimeError(f"{state_dir}: the controller answered {enrollment.state}")
            return enrollment.device_id
        raise RuntimeError(f"{state_dir}: the controller stayed unavailable for enrollment")

    started = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
            ids = list(pool.map(one, spec.state_dirs))
    except Exception as exc:
        return ("error", f"worker {spec.index}: enrollment failed: {exc!r}")
    return ("enrolled", ids, time.perf_counter() - started)


# -- the daemons ----------------------------------------------------------------------------------


class _Fleet:
    """This worker's daemons, their stop event, and what they reported."""

    def __init__(self, spec: WorkerSpec, conn: Connection) -> None:
        from agent.daemon import Daemon, SessionConfig
        from agent.enroll import ca_cert_file, device_cert_file, load_enrollment

        self.conn = conn
        self.finished = 0
        self.waiting_for: int | None = None
        self.stop = asyncio.Event()
        self.daemons: list[Daemon] = []
        self.events: list[Event] = []
        self.stats = Stats()
        self.errors: list[str] = []
        for state_dir in map(Path, spec.state_dirs):
            enrollment = load_enrollment(state_dir)
            if enrollment is None or not enrollment.enrolled or not enrollment.broker_url:
                raise RuntimeError(f"{state_dir} holds no enrolled device")
            cert = device_cert_file(state_dir)
            config = SessionConfig(  # what `fleet-agent run` builds
                state_dir=state_dir,
                server_url=enrollment.server,
                broker_url=enrollment.broker_url,
                ca_cert=ca_cert_file(state_dir) if ca_cert_file(state_dir).exists() else None,
                client_cert=cert if cert.exists() else None,
            )
            device_id = enrollment.device_id
            self.daemons.append(Daemon(config, on_event=self._listener(device_id)))
        self.stats.devices = len(self.daemons)

    def _listener(self, device_id: str) -> Any:
        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "connected":
                self.stats.connects += 1
            elif kind == "refused":
                self.stats.refused += 1
            elif kind == "status" and isinstance(data.get("command_id"), str):
                state = str(data.get("state"))
                self.stats.states[state] = self.stats.states.get(state, 0) + 1
                self.events.append(Event(device_id, data["command_id"], state, time.time()))
                if state in TERMINAL:
                    self.finished += 1
                    self.check_waiter()

        return on_event

    def check_waiter(self) -> None:
        if self.waiting_for is not None and self.finished >= self.waiting_for:
            self.waiting_for = None
            self.conn.send(("reached", self.finished))

    def snapshot(self) -> Stats:
        self.stats.connected = sum(d.connected.is_set() for d in self.daemons)
        return Stats(
            self.stats.devices,
            self.stats.connected,
            self.stats.connects,
            self.stats.refused,
            dict(self.stats.states),
            self.stats.failed_daemons,
        )


async def _run_daemons(conn: Connection, spec: WorkerSpec) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(spec.threads))
    fleet = _Fleet(spec, conn)
    tasks = [
        asyncio.create_task(daemon.run(fleet.stop), name=f"daemon-{daemon.device_id}")
        for daemon in fleet.daemons
    ]
    requests: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

    def listen() -> None:  # the pipe is read in a thread of its own, never in the pool
        try:
            while True:
                request = conn.recv()
                loop.call_soon_threadsafe(requests.put_nowait, request)
        except (EOFError, OSError):
            loop.call_soon_threadsafe(requests.put_nowait, None)

    threading.Thread(target=listen, name="bench-pipe", daemon=True).start()
    conn.send(("running",))
    while True:
        request = await requests.get()
        if request is None or request[0] == "stop":
            break
        if request[0] == "stats":
            fleet.stats.failed_daemons = sum(t.done() for t in tasks)
            conn.send(("stats", fleet.snapshot()))
        elif request[0] == "events":
            conn.send(("events", list(fleet.events)))
        elif request[0] == "await":
            fleet.waiting_for = int(request[1])
            fleet.check_waiter()
    fleet.stop.set()
    done, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
    for task in pending:
        task.cancel()
    errors = [
        f"{task.get_name()}: {task.exception()!r}"
        for task in done
        if not task.cancelled() and task.exception() is not None
    ]
    errors += [f"{task.get_name()}: did not stop in {STOP_TIMEOUT_S:g} s" for task in pending]
    if request is not None:
        with contextlib.suppress(OSError):
            conn.send(("stopped", errors))
