"""The fleet simulator's agent worker: many real `agent.daemon.Daemon`s in one process.

`bench.bench_fleet` starts a few of these processes (multiprocessing, `spawn`). Each holds a share
of the simulated devices and talks to the bench over a `Pipe`:

- `("enroll", server, root_json, token, threads)`: enroll every device of its share through the
  controller's API (`agent.enroll.enroll`, the code `fleet-agent enroll` runs: a fresh Ed25519
  identity, a CSR, a signed request with the token), `threads` at a time. Answers
  `("enrolled", [device ids], seconds)`.
- `("run",)`: build one `Daemon(SessionConfig(...))` per device exactly as `fleet-agent run` does
  (or, with `WorkerSpec.simulated`, one `SimDevice`: see its docstring) and run them all on one
  asyncio loop (their blocking work, TUF and slot writes, goes to a thread
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

STOP_TIMEOUT_S = 30.0
TERMINAL = frozenset({"succeeded", "failed", "refused", "rolled-back", "done"})


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    state_dirs: tuple[str, ...]
    threads: int
    log_file: str
    log_level: str = "WARNING"
    # Simulated devices (`bench.bench_rollout`): `SimDevice`s instead of `Daemon`s, checking
    # commands with this command key (`{"keyid": ..., "key": {...}}`, what TUF publishes) and
    # reporting this sha256 as the deployed rune's.
    simulated: bool = False
    command_key: dict[str, Any] | None = None
    rune_sha256: str = ""


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
    # Commands that reached a terminal state, each counted once (`states` counts every report,
    # and a command sent again gets its result reported again).
    finished_commands: int = 0


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
        self.daemons: list[Daemon | SimDevice] = []
        self.events: list[Event] = []
        self.finished_ids: set[str] = set()
        self.stats = Stats()
        self.errors: list[str] = []
        if spec.simulated:
            assert spec.command_key is not None
            for state_dir in map(Path, spec.state_dirs):
                device = SimDevice(state_dir, spec.command_key, spec.rune_sha256)
                device.on_event = self._listener(device.device_id)
                self.daemons.append(device)
            self.stats.devices = len(self.daemons)
            return
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
                    self.finished_ids.add(data["command_id"])
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
            len(self.finished_ids),
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


# -- simulated devices ----------------------------------------------------------------------------

SIM_CONNECTS_IN_FLIGHT = 64
ATTESTATION_REUSE_S = 300.0  # as the agent's (`agent.daemon.ATTESTATION_REUSE_S`)
SIM_DEPLOY_STATES = ("received", "downloading", "verifying", "installing", "health-check")


class SimDevice:
    """A device that answers every step at once (`bench.bench_rollout`'s controller ceiling).

    What the controller sees is what a real agent sends: the device's own Ed25519 identity and
    enrollment (`agent.enroll`), its own MQTT session (client id = device id, a signed `offline`
    last will), a retained signed `online` presence and a `hello` on connecting, and for each
    command a signed `status` per state, with the next `seq` of its status stream and the runes in
    the body. A command is checked as the agent checks it (`open_message`: the command key, this
    device as audience, fresh, `seq` above the last one), but then nothing is done: a deploy is
    reported `received`, `downloading`, `verifying`, `installing`, `health-check` and `succeeded`
    at once (a rollback `rolled-back`, anything else `refused`), with no TUF, download, sandbox or
    slot. Like the agent it attests (`agent.attester`: a challenge, signed evidence, the result)
    when it gets an `attest` command, and before a deploy unless it holds an affirming result
    issued less than `ATTESTATION_REUSE_S` ago; the deploy fails unless the result is affirming.
    A command id it already ran gets its result again, as the agent does. Sequence numbers live
    in memory: a simulated device is enrolled afresh for every run.
    """

    def __init__(self, state_dir: Path, command_key: dict[str, Any], rune_sha256: str) -> None:
        from securesystemslib.signer import SSlibKey

        from agent.enroll import load_enrollment
        from attestation.identity import DeviceIdentity

        enrollment = load_enrollment(state_dir)
        if enrollment is None or not enrollment.enrolled or not enrollment.broker_url:
            raise RuntimeError(f"{state_dir} holds no enrolled device")
        self.broker_url = enrollment.broker_url
        self.identity = DeviceIdentity.load_or_create(state_dir)
        self.device_id = self.identity.device_id
        self.command_key = SSlibKey.from_dict(str(command_key["keyid"]), dict(command_key["key"]))
        self.rune_sha256 = rune_sha256
        self.connected = asyncio.Event()
        self.on_event: Any = lambda _kind, _data: None
        self.seqs = {"status": 0, "presence": 0}
        self.command_seq = 0
        self.results: dict[str, tuple[str, str]] = {}
        self.active: dict[str, str] | None = None
        self.previous: dict[str, str] | None = None
        self.attester = _sim_attester(state_dir, enrollment.server, self.identity, self._claims)

    def _claims(self) -> tuple[Any, Any]:
        from attestation.evidence import RuneClaim

        def claim(rune: dict[str, str] | None) -> Any:
            return RuneClaim(rune["ref"], rune["sha256"]) if rune else None

        return claim(self.active), claim(self.previous)

    async def _attested(self, reuse_s: float = 0.0) -> tuple[bool, str]:
        """Attest, as the agent does (not again within `reuse_s` of an affirming result):
        (affirming?, why not)."""
        from agent.attester import AttestationFailed, stored_attestation
        from attestation.policy import Status

        stored = stored_attestation(self.attester.state_dir)
        if stored is not None and stored.recent(time.time(), reuse_s):
            return True, stored.status.label
        try:
            result = await asyncio.to_thread(self.attester.attest)
        except AttestationFailed as exc:
            return False, f"attestation: {exc}"
        if result.status is not Status.AFFIRMING:
            return False, f"attestation: {result.status.label}: {'; '.join(result.reasons)}"
        return True, result.status.label

    async def run(self, stop: asyncio.Event) -> None:
        import aiomqtt

        attempt = 0
        while not stop.is_set():
            try:
                await self._session(stop)
                attempt = 0
            except aiomqtt.MqttError as exc:
                logging.getLogger("bench.sim").warning("%s: session lost: %s", self.device_id, exc)
            self.connected.clear()
            if stop.is_set():
                break
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(30.0, 0.5 * 2 ** min(attempt, 6)))

    async def _session(self, stop: asyncio.Event) -> None:
        import aiomqtt

        from ota.protocol import PRESENCE_TTL_S, Channel, MessageType, topic

        url = urlsplit(self.broker_url)
        presence = topic(self.device_id, Channel.PRESENCE)
        online = self._sealed(Channel.PRESENCE, MessageType.PRESENCE, {"online": True})
        offline = self._sealed(
            Channel.PRESENCE, MessageType.PRESENCE, {"online": False}, ttl=PRESENCE_TTL_S
        )
        async with contextlib.AsyncExitStack() as stack:
            async with _connect_slot():  # only the connection, not the session
                client = await stack.enter_async_context(
                    aiomqtt.Client(
                        url.hostname or "127.0.0.1",
                        url.port or 1883,
                        identifier=self.device_id,
                        username=url.username,
                        password=url.password,
                        keepalive=60,
                        will=aiomqtt.Will(presence, offline, qos=1, retain=True),
                    )
                )
                await client.subscribe(topic(self.device_id, Channel.CMD), qos=1)
                await client.publish(presence, online, qos=1, retain=True)
                await self._send(client, MessageType.HELLO, self._hello())
            self.connected.set()
            self.on_event("connected", {})
            receiver = asyncio.create_task(self._receive_loop(client))
            stopper = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait(
                    (receiver, stopper), return_when=asyncio.FIRST_COMPLETED
                )
                if receiver in done and receiver.exception() is not None:
                    raise receiver.exception()  # type: ignore[misc]
            finally:
                for task in (receiver, stopper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await task
            goodbye = self._sealed(Channel.PRESENCE, MessageType.PRESENCE, {"online": False})
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(presence, goodbye, qos=1, retain=True)

    async def _receive_loop(self, client: Any) -> None:
        async for mqtt_message in client.messages:
            payload = mqtt_message.payload
            if isinstance(payload, bytes | bytearray):
                await self._command(client, bytes(payload))

    async def _command(self, client: Any, data: bytes) -> None:
        from ota.protocol import (
            CONTROLLER,
            Channel,
            MessageType,
            Refusal,
            command_id,
            open_message,
        )

        try:
            message = open_message(
                data,
                audience=self.device_id,
                channel=Channel.CMD,
                key_for=lambda iss: self.command_key if iss == CONTROLLER else None,
                last_seq=lambda _iss: self.command_seq,
                now=time.time(),
            )
            self.command_seq = message.seq
            cid = command_id(message)
        except Refusal as refusal:
            self.on_event("refused", {"kind": refusal.kind, "reason": str(refusal)})
            return
        done = self.results.get(cid)
        if done is not None:
            await self._status(client, cid, *done)
            return
        if message.type is MessageType.DEPLOY:
            body = message.body
            ref = f"{body.get('org')}/{body.get('name')}@{body.get('version')}"
            await self._status(client, cid, "received", "")
            attested, why = await self._attested(ATTESTATION_REUSE_S)
            if attested:
                for state in SIM_DEPLOY_STATES[1:]:
                    await self._status(client, cid, state, "")
                self.previous, self.active = self.active, {"ref": ref, "sha256": self.rune_sha256}
                result = ("succeeded", "installed in slot b (simulated)")
            else:
                result = ("failed", why)
        elif message.type is MessageType.ATTEST:
            await self._status(client, cid, "received", "")
            attested, why = await self._attested()
            result = ("done", why) if attested else ("failed", why)
        elif message.type is MessageType.ROLLBACK:
            await self._status(client, cid, "received", "")
            self.previous, self.active = self.active, self.previous
            result = ("rolled-back", "simulated")
        else:
            await self._status(client, cid, "received", "")
            result = ("refused", f"{message.type.value} is not simulated")
        self.results[cid] = result
        await self._status(client, cid, *result)

    async def _status(self, client: Any, cid: str, state: str, reason: str) -> None:
        from ota.protocol import MessageType

        body: dict[str, Any] = {"command_id": cid, "state": state, "reason": reason}
        await self._send(client, MessageType.STATUS, body | self._runes())
        self.on_event("status", body)

    async def _send(self, client: Any, type_: Any, body: dict[str, Any]) -> None:
        from ota.protocol import Channel, topic

        data = self._sealed(Channel.STATUS, type_, body)
        await client.publish(topic(self.device_id, Channel.STATUS), data, qos=1)

    def _sealed(self, channel: Any, type_: Any, body: dict[str, Any], ttl: float = 300.0) -> bytes:
        from ota.protocol import CONTROLLER, Channel, Message, seal_message

        stream = "presence" if channel is Channel.PRESENCE else "status"
        self.seqs[stream] += 1
        now = time.time()
        message = Message(
            self.device_id, CONTROLLER, self.seqs[stream], now, now + ttl, type_, body
        )
        return seal_message(message, self.identity.signer)

    def _runes(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous}

    def _hello(self) -> dict[str, Any]:
        results = [
            {"id": cid, "type": "deploy", "state": s, "reason": r, "at": time.time()}
            for cid, (s, r) in self.results.items()
        ]
        return {
            "agent_version": "bench-simulated",
            **self._runes(),
            "in_flight": None,
            "results": results[-20:],
            "command_seq": self.command_seq,
            "refused": {},
        }


_connects: asyncio.Semaphore | None = None
_agent_code: Any = None
_attest_http: Any = None


def _sim_attester(state_dir: Path, server: str, identity: Any, runes: Any) -> Any:
    """The product's attester for a simulated device; the worker's devices share one measurement
    of the agent code and one HTTP pool (thousands of pools would be thousands of sockets)."""
    global _agent_code, _attest_http
    import urllib3

    from agent.attester import AgentCode, Attester, SoftwareEvidence, effective_config
    from agent.update import agent_version

    if _agent_code is None:
        _agent_code = AgentCode()
        _attest_http = urllib3.PoolManager(
            num_pools=4, maxsize=16, timeout=urllib3.Timeout(connect=10.0, read=60.0), retries=False
        )
    config = effective_config(state_dir, server)
    producer = SoftwareEvidence(identity, agent_version(), lambda: config, runes, code=_agent_code)
    return Attester(state_dir, server, identity, producer, http=_attest_http)


@contextlib.asynccontextmanager
async def _connect_slot() -> AsyncIterator[None]:
    """At most `SIM_CONNECTS_IN_FLIGHT` simulated devices of this worker connecting at once."""
    global _connects
    if _connects is None:  # made on first use: it belongs to the worker's event loop
        _connects = asyncio.Semaphore(SIM_CONNECTS_IN_FLIGHT)
    async with _connects:
        yield
