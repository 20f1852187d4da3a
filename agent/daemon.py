"""`fleet-agent run`: the device's session with the controller over MQTT, and its rune loop.

Rules:
- The broker is untrusted transport. A command is acted on only after `ota.protocol.open_message`
  accepts it: signed by the command key the device learned through TUF, addressed to this device,
  fresh, and with a `seq` above the last accepted one (persisted first, `agent.channel_state`).
  An envelope signed by a key the device does not know makes it refresh TUF once (the command key
  may have rotated) before refusing; at most `UNKNOWN_KEY_REFRESHES_PER_MINUTE` times a minute, so
  garbage on the topic cannot make the device hammer the controller.
- A command signed by the key the device knows is accepted only once TUF confirms that key is
  still the published one: the device refreshes TUF first (a signed request for
  `timestamp.json` when nothing changed), so a rotated-out command key is refused at once
  (`unknown-key`), even by a device that has not heard from the controller since the rotation.
  If the refresh fails (the repository is unreachable, or slower than `KEY_CONFIRM_TIMEOUT_S`),
  the known key is used only when TUF confirmed it less than `KEY_GRACE_S` ago; otherwise the
  command is refused (`stale-key`). The deploy that follows looks its rune up in the metadata
  that check refreshed (if it is at most `REFRESHED_REUSE_S` old) instead of refreshing again.
- A refused message is counted, logged and reported to the controller as a `security-event`
  (at most `SECURITY_REPORTS_PER_MINUTE`, the rest counted in the next report); it changes
  nothing else. No message, however malformed, stops the daemon.
- A command id runs at most once; a re-sent command gets its recorded result again (which is how
  a result the controller missed reaches it). Deploy, rollback and config run one at a time, in
  arrival order; `ping` is answered at once.
- A command that was in flight when the agent stopped (a crash, a power loss) is not reported as
  in flight by the next process, which is not running it: the controller, not seeing it in
  `hello`, sends it again, and it runs again (every handler is idempotent; a deploy of the rune
  that is already active does nothing).
- A deploy's rune download presents an affirming attestation result: the one the agent holds
  if it was issued less than `ATTESTATION_REUSE_S` ago and less than half the controller's
  window for downloads, else a new one, made as the download starts (`agent.attester`); a deploy
  whose result is not affirming fails without a download. A download refused for an older
  result (428) makes the next try attest first. An `attest` command attests at once.
- A deploy that cannot reach the controller's repository (`UpdateUnavailable`: the controller is
  restarting, the network is down) is retried with backoff for up to `DEPLOY_RETRY_S` before it
  is reported `failed`; a refusal or an unauthorized request is not retried.
- Every state of a command and every change of the active rune is reported on `status`; on each
  connection the agent first says `hello` with its whole state (active and previous rune, the
  command in flight, recent results, last command seq), so the controller can reconcile, and it
  says `hello` again every `HELLO_INTERVAL_S` (jittered) while connected: the controller's
  session is not persistent, so a status sent while the controller was away from the broker is
  lost, and this bounds how long the controller can stay wrong about a device.
- Telemetry (`agent.telemetry.reporter`) makes a report every window whether or not the broker is
  reachable; while connected, its buffered reports are delivered alongside the session.
- Presence is retained on `presence`: `online` when connected, and a pre-signed `offline` last
  will the broker publishes if the session dies (its own sequence, see `ota.protocol`).
- The session reconnects forever with full-jitter exponential backoff (1 s doubling to 60 s).
- Messages are signed when they are published, never when queued, so their `seq` follows the
  order the controller sees them in; and what they say about the device (a `hello`, the runes in
  a `status`) is read then too, so a status queued while the broker was away cannot undo, on the
  controller, the newer state the `hello` of the next connection reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from securesystemslib.signer import Key, SSlibKey

from agent.attester import (
    AttestationFailed,
    AttestationRefused,
    AttestationUnavailable,
    attester_for,
    stored_attestation,
)
from agent.channel_state import ChannelState
from agent.enroll import EnrollError, load_enrollment, renew_if_due
from agent.policy import AgentPolicy
from agent.runconfig import RunConfig, RunConfigError, apply_config
from agent.runloop import RuneLoop, StepKind, StepResult
from agent.slots import NoRollbackTarget, SlotError, SlotRune, Slots
from agent.telemetry.reporter import Reporter
from agent.update import UpdateReport, agent_version, tuf_client, update
from attestation.identity import DeviceIdentity
from attestation.policy import Status
from ota.protocol import (
    CONTROLLER,
    PRESENCE_TTL_S,
    Channel,
    CommandState,
    Message,
    MessageType,
    Refusal,
    command_id,
    open_message,
    seal_message,
    topic,
)
from ota.targets import TargetNameError, check_part
from ota.updater import (
    TufClient,
    UpdateError,
    UpdateRefused,
    UpdateUnauthorized,
    UpdateUnavailable,
)

log = logging.getLogger("fleet.agent")

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
KEEPALIVE_S = 30
SECURITY_REPORTS_PER_MINUTE = 10
UNKNOWN_KEY_REFRESHES_PER_MINUTE = 6
KEY_GRACE_S = 3600.0
KEY_CONFIRM_TIMEOUT_S = 5.0
# A deploy presents an affirming result issued less than this long ago, or attests first; below the
# controller's default `deploy_attestation_age` (10 min), and a 428 for a rune makes it attest.
ATTESTATION_REUSE_S = 300.0
ATTESTATION_REQUIRED = "http-428"
REFRESHED_REUSE_S = 10.0
OUTGOING_LIMIT = 1000
RENEWAL_CHECK_S = 60.0
HELLO_INTERVAL_S = 300.0
DEPLOY_RETRY_S = 300.0
DEPLOY_RETRY_BASE_S = 1.0
DEPLOY_RETRY_CAP_S = 15.0


class DaemonError(Exception):
    """The daemon cannot start: names what is missing and what to do."""


@dataclass(frozen=True)
class SessionConfig:
    state_dir: Path
    server_url: str
    broker_url: str
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass(frozen=True)
class Outgoing:
    channel: Channel
    type: MessageType
    body: dict[str, Any]


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 16)))


def rune_summary(rune: SlotRune | None) -> dict[str, str] | None:
    if rune is None:
        return None
    return {"ref": f"{rune.org}/{rune.name}@{rune.version}", "sha256": rune.sha256}


class Daemon:
    def __init__(
        self,
        config: SessionConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.state_dir = config.state_dir
        self.identity = DeviceIdentity.load_or_create(config.state_dir)
        self.device_id = self.identity.device_id
        self.policy = AgentPolicy.load(config.state_dir)
        self.slots = Slots(config.state_dir, policy=self.policy.probation)
        self.slots.recover(clock())
        self.channel = ChannelState(config.state_dir)
        interrupted = self.channel.in_flight
        if interrupted is not None:
            log.warning(
                "command %s (%s) was interrupted in state %s by a restart; it runs again when "
                "the controller sends it again",
                interrupted.id,
                interrupted.type,
                interrupted.state,
            )
            self.channel.abandon(interrupted.id)
        self.loop = RuneLoop(
            config.state_dir, self.slots, self.policy, RunConfig.load(config.state_dir)
        )
        self._running_sha: str | None = None
        self.attester = attester_for(
            config.state_dir,
            config.server_url,
            slots=self.slots,
            broker_url=config.broker_url,
            clock=clock,
        )
        self.telemetry = Reporter(
            config.state_dir,
            self.identity,
            self.channel,
            self.loop,
            self.policy,
            agent_version=agent_version(),
            active=self._active_summary,
            deployment=self._deployment_state,
            clock=clock,
        )
        self.loop.on_outputs = self.telemetry.observe
        self.command_key: Key | None = None
        self._reuse_s = ATTESTATION_REUSE_S  # how old a result a deploy may still present
        self._unknown_key_refreshes: deque[float] = deque()
        self._key_confirmed_at: float | None = None
        # The client the last command-key check refreshed, and when (monotonic): the next deploy
        # takes it instead of refreshing again, if it is at most `REFRESHED_REUSE_S` old.
        self._refreshed: tuple[TufClient, float] | None = None
        self._outgoing: asyncio.Queue[Outgoing] = asyncio.Queue(OUTGOING_LIMIT)
        self._work: asyncio.Queue[Message] = asyncio.Queue()
        self._busy: str | None = None
        self._queued: set[str] = set()
        self._security_sent: deque[float] = deque()
        self._security_suppressed = 0
        self._rng = random.Random()
        self._on_event = on_event or (lambda _kind, _data: None)
        self.connected = asyncio.Event()
        self._renewed = asyncio.Event()

    # -- the session -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set: learn the command key, then keep a session open."""
        runner = asyncio.create_task(self.loop.run(stop, self._on_step), name="rune-loop")
        renewer = asyncio.create_task(self._renewal_loop(stop), name="certificate-renewal")
        reporter = asyncio.create_task(self.telemetry.run(stop), name="telemetry")
        await self._learn_command_key_until(stop)
        worker = asyncio.create_task(self._work_loop(), name="commands")
        try:
            attempt = 0
            while not stop.is_set():
                try:
                    await self._session(stop)
                    attempt = 0
                except aiomqtt.MqttError as exc:
                    log.warning("broker session lost: %s", exc)
                self.connected.clear()
                if stop.is_set():
                    break
                delay = backoff_delay(attempt, self._rng)
                attempt += 1
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            for task in (worker, renewer, reporter):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            stop.set()
            await runner

    async def _session(self, stop: asyncio.Event) -> None:
        url = urlsplit(self.config.broker_url)
        if url.scheme not in {"mqtt", "mqtts"} or not url.hostname:
            raise DaemonError(f"{self.config.broker_url} is not an mqtt:// or mqtts:// URL")
        online = self._sealed(Channel.PRESENCE, MessageType.PRESENCE, {"online": True})
        offline = self._sealed(
            Channel.PRESENCE, MessageType.PRESENCE, {"online": False}, ttl=PRESENCE_TTL_S
        )
        presence = topic(self.device_id, Channel.PRESENCE)
        async with aiomqtt.Client(
            url.hostname,
            url.port or (8883 if url.scheme == "mqtts" else 1883),
            identifier=self.device_id,
            username=url.username,
            password=url.password,
            keepalive=KEEPALIVE_S,
            will=aiomqtt.Will(presence, offline, qos=1, retain=True),
            tls_context=self._tls_context() if url.scheme == "mqtts" else None,
        ) as client:
            await client.subscribe(topic(self.device_id, Channel.CMD), qos=1)
            await client.publish(presence, online, qos=1, retain=True)
            await self._publish(client, Outgoing(Channel.STATUS, MessageType.HELLO, {}))
            self.connected.set()
            log.info("connected to %s as %s", url.hostname, self.device_id)
            self._on_event("connected", {})
            sender = asyncio.create_task(self._send_loop(client))
            receiver = asyncio.create_task(self._receive_loop(client))
            stopper = asyncio.create_task(stop.wait())
            renewed = asyncio.create_task(self._renewed.wait())
            greeter = asyncio.create_task(self._hello_loop())

            async def publish_report(name: str, data: bytes) -> None:
                await client.publish(name, data, qos=1)

            reports = asyncio.create_task(self.telemetry.deliver(publish_report))
            tasks = (sender, receiver, stopper, renewed, greeter, reports)
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if renewed in done:
                    self._renewed.clear()
                    log.info("the device certificate was renewed; reconnecting with it")
                for task in done:
                    if task is not stopper and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await task
            if stop.is_set():
                goodbye = self._sealed(Channel.PRESENCE, MessageType.PRESENCE, {"online": False})
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(presence, goodbye, qos=1, retain=True)

    def _tls_context(self) -> ssl.SSLContext:
        config = self.config
        if config.ca_cert is None:
            raise DaemonError("an mqtts:// broker needs the fleet CA certificate; enroll again")
        context = ssl.create_default_context(cafile=str(config.ca_cert))
        if config.client_cert is not None:
            key = config.client_key or self.state_dir / "identity.pem"
            context.load_cert_chain(str(config.client_cert), str(key))
        return context

    async def _hello_loop(self) -> None:
        """Say `hello` again now and then, so a controller that missed a status catches up."""
        while True:
            await asyncio.sleep(self._rng.uniform(0.5, 1.5) * HELLO_INTERVAL_S)
            self.send(MessageType.HELLO, {})  # the body is made when it is sent

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while True:
            item = await self._outgoing.get()
            await self._publish(client, item)

    async def _publish(self, client: aiomqtt.Client, item: Outgoing) -> None:
        body = item.body
        if item.type is MessageType.HELLO:
            body = self._hello()
        elif item.type is MessageType.STATUS:
            body = {**body, **self._runes()}
        data = self._sealed(item.channel, item.type, body)
        await client.publish(topic(self.device_id, item.channel), data, qos=1)

    def _sealed(
        self, channel: Channel, type_: MessageType, body: dict[str, Any], ttl: float = 300.0
    ) -> bytes:
        stream = "presence" if channel is Channel.PRESENCE else "status"
        now = self.clock()
        message = Message(
            self.device_id, CONTROLLER, self.channel.next_seq(stream), now, now + ttl, type_, body
        )
        return seal_message(message, self.identity.signer)

    def send(self, type_: MessageType, body: dict[str, Any]) -> None:
        """Queue a message for the controller; when the queue is full the oldest is dropped
        (`hello` on the next connection carries the state that matters)."""
        item = Outgoing(Channel.STATUS, type_, body)
        if self._outgoing.full():
            self._outgoing.get_nowait()
        self._outgoing.put_nowait(item)

    # -- receiving ---------------------------------------------------------------------------

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for mqtt_message in client.messages:
            payload = mqtt_message.payload
            data = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
            await self.receive(bytes(data), str(mqtt_message.topic))

    async def receive(self, data: bytes, topic_name: str) -> Message | None:
        """Check one command envelope and act on it; never raises for a bad message."""
        try:
            message = await self._open(data)
        except Refusal as refusal:
            self._refuse(refusal, topic_name)
            return None
        self.channel.accept_command_seq(message.seq)
        try:
            cid = command_id(message)
        except Refusal as refusal:
            self._refuse(refusal, topic_name)
            return None
        done = self.channel.result_of(cid)
        if done is not None:
            self._status(cid, done.state, done.reason)
            return message
        if self._busy == cid or cid in self._queued:
            return message
        if message.type is MessageType.PING:
            self._status(cid, CommandState.DONE, "pong")
            self.channel.finish(cid, message.type.value, CommandState.DONE, "pong", self.clock())
            return message
        self.channel.begin(cid, message.type.value, CommandState.RECEIVED, self.clock())
        self._status(cid, CommandState.RECEIVED, "")
        self._queued.add(cid)
        self._work.put_nowait(message)
        return message

    async def _open(self, data: bytes) -> Message:
        def attempt() -> Message:
            return open_message(
                data,
                audience=self.device_id,
                channel=Channel.CMD,
                key_for=lambda iss: self.command_key if iss == CONTROLLER else None,
                last_seq=lambda _iss: self.channel.command_seq,
                now=self.clock(),
            )

        try:
            message = attempt()
        except Refusal as refusal:
            if refusal.kind != "unknown-key":
                raise
            now = self.clock()
            while self._unknown_key_refreshes and now - self._unknown_key_refreshes[0] > 60.0:
                self._unknown_key_refreshes.popleft()
            if len(self._unknown_key_refreshes) >= UNKNOWN_KEY_REFRESHES_PER_MINUTE:
                raise
            self._unknown_key_refreshes.append(now)
            previous = self.command_key
            try:
                await asyncio.to_thread(self._learn_command_key)
            except UpdateError as exc:
                log.warning("could not refresh the command key: %s", exc)
                raise refusal from None
            if self.command_key == previous:
                raise
            log.info("the command key changed through TUF; checking the command again")
            return attempt()
        signed_by = self.command_key
        await self._confirm_command_key()
        return message if self.command_key == signed_by else attempt()

    async def _confirm_command_key(self) -> None:
        """Make sure the key that signed a command is still the one TUF publishes (see Rules)."""
        confirmed = self._key_confirmed_at
        try:
            await asyncio.to_thread(self._learn_command_key, KEY_CONFIRM_TIMEOUT_S)
        except UpdateError as exc:
            if confirmed is None or self.clock() - confirmed >= KEY_GRACE_S:
                raise Refusal(
                    "stale-key",
                    f"cannot confirm the command key through TUF ({exc}), and it was last "
                    f"confirmed more than {KEY_GRACE_S:.0f} s ago",
                ) from None
            log.warning("could not confirm the command key (%s); using the known one", exc)

    def _refuse(self, refusal: Refusal, topic_name: str) -> None:
        self.channel.count_refusal(refusal.kind)
        log.warning("refused a message on %s (%s): %s", topic_name, refusal.kind, refusal)
        self._on_event("refused", {"kind": refusal.kind, "reason": str(refusal)})
        now = self.clock()
        while self._security_sent and now - self._security_sent[0] > 60.0:
            self._security_sent.popleft()
        if len(self._security_sent) >= SECURITY_REPORTS_PER_MINUTE:
            self._security_suppressed += 1
            return
        self._security_sent.append(now)
        body = {
            "kind": refusal.kind,
            "reason": str(refusal)[:500],
            "topic": topic_name[:200],
            "suppressed": self._security_suppressed,
        }
        self._security_suppressed = 0
        self.send(MessageType.SECURITY, body)

    # -- acting ------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        while True:
            message = await self._work.get()
            cid = command_id(message)
            self._queued.discard(cid)
            self._busy = cid
            log.info("running command %s (%s)", cid, message.type.value)
            try:
                state, reason = await self._execute(message)
            except Exception as exc:  # a handler bug must not stop the daemon
                log.exception("command %s failed unexpectedly", cid)
                state, reason = CommandState.FAILED, f"agent error: {exc}"
            finally:
                self._busy = None
            self.channel.finish(cid, message.type.value, state, reason, self.clock())
            log.info("command %s ended %s: %s", cid, state, reason)
            self._status(cid, state, reason)

    async def _execute(self, message: Message) -> tuple[CommandState, str]:
        if message.type is MessageType.DEPLOY:
            return await self._deploy(message)
        if message.type is MessageType.ROLLBACK:
            return await asyncio.to_thread(self._rollback, message)
        if message.type is MessageType.CONFIG:
            return await self._configure(message)
        if message.type is MessageType.ATTEST:
            return await self._attest()
        return CommandState.REFUSED, f"{message.type.value} is not a command this agent runs"

    async def _deploy(self, message: Message) -> tuple[CommandState, str]:
        cid = command_id(message)
        body = message.body
        try:
            org, name, version = (check_part(p, str(body[p])) for p in ("org", "name", "version"))
        except KeyError as exc:
            return CommandState.REFUSED, f"malformed deploy: no {exc}"
        except TargetNameError as exc:
            return CommandState.REFUSED, f"malformed deploy: {exc}"
        loop = asyncio.get_running_loop()

        def on_phase(phase: str) -> None:
            loop.call_soon_threadsafe(self._progress, cid, phase)

        try:
            report = await self._update_retrying(cid, org, name, version, on_phase)
        except UpdateRefused as exc:
            return CommandState.REFUSED, f"{exc.kind}: {exc}"
        except (UpdateError, SlotError) as exc:
            return CommandState.FAILED, str(exc)
        except AttestationFailed as exc:
            return CommandState.FAILED, f"attestation: {exc}"
        if report.status == "health-check-failed":
            reason = report.health.reason if report.health else "health check failed"
            return CommandState.FAILED, f"health check: {reason}"
        if report.status == "already-active":
            return CommandState.SUCCEEDED, "already active"
        return CommandState.SUCCEEDED, f"installed in slot {report.slot}"

    async def _update_retrying(
        self, cid: str, org: str, name: str, version: str, on_phase: Callable[[str], None]
    ) -> UpdateReport:
        """Attest, then `update`; both tried again while the controller is unreachable, for up
        to DEPLOY_RETRY_S."""
        give_up = time.monotonic() + DEPLOY_RETRY_S
        attempt = 0
        fresh, self._refreshed = self._refreshed, None
        refreshed = fresh[0] if fresh and time.monotonic() - fresh[1] <= REFRESHED_REUSE_S else None
        self._reuse_s = ATTESTATION_REUSE_S
        while True:
            try:
                return await asyncio.to_thread(
                    update,
                    self.state_dir,
                    self.config.server_url,
                    org,
                    name,
                    version,
                    policy=self.policy,
                    clock=self.clock,
                    slots=self.slots,
                    on_phase=on_phase,
                    refreshed=refreshed,
                    passport=self._deploy_passport,
                )
            except UpdateUnauthorized:
                raise
            except (UpdateUnavailable, AttestationUnavailable) as exc:
                refreshed = None  # a retry refreshes
                if isinstance(exc, UpdateUnavailable) and exc.kind == ATTESTATION_REQUIRED:
                    self._reuse_s = 0.0  # the controller wants a newer result
                ceiling = min(DEPLOY_RETRY_CAP_S, DEPLOY_RETRY_BASE_S * 2 ** min(attempt, 16))
                delay = self._rng.uniform(ceiling / 2, ceiling)
                if time.monotonic() + delay > give_up:
                    raise
                attempt += 1
                log.warning("command %s: %s; trying again in %.1f s", cid, exc, delay)
                await asyncio.sleep(delay)

    def _deploy_passport(self) -> str:
        """The result a deploy's rune download presents, made when the download starts (in the
        update's thread): the stored one while it is recent enough, else a new attestation;
        `AttestationFailed` unless it is affirming."""
        stored = stored_attestation(self.state_dir)
        if stored is None or not stored.recent(self.clock(), self._reuse_s):
            stored = self.attester.attest()
        passport = stored.passport(self.clock())
        if passport is None:
            raise AttestationRefused(
                f"the controller's attestation result is {stored.status.label}: "
                + "; ".join(stored.reasons)
            )
        return passport

    async def _attest(self) -> tuple[CommandState, str]:
        """The `attest` command: attest now; `done` with the result's status and reasons."""
        try:
            result = await asyncio.to_thread(self.attester.attest)
        except AttestationFailed as exc:
            return CommandState.FAILED, f"attestation: {exc}"
        reasons = "" if result.status is Status.AFFIRMING else ": " + "; ".join(result.reasons)
        return CommandState.DONE, f"{result.status.label}{reasons}"

    def _progress(self, cid: str, phase: str) -> None:
        self.channel.progress(phase, self.clock())
        self._status(cid, CommandState(phase), "")

    def _rollback(self, message: Message) -> tuple[CommandState, str]:
        """Make the previous slot active again. With `to` (a rune ref), only if that is the rune
        the previous slot holds; if it is already active, there is nothing to do."""
        reason = str(message.body.get("reason") or "rollback requested by the controller")
        wanted = message.body.get("to")
        if wanted is not None:
            runes = self._runes()
            active, previous = ((runes.get(key) or {}).get("ref") for key in ("active", "previous"))
            if active == wanted:
                return CommandState.DONE, f"{wanted} is already active"
            if previous != wanted:
                return CommandState.FAILED, (
                    f"the previous slot holds {previous or 'nothing'}, not {wanted}; "
                    "deploy it instead"
                )
        try:
            slot = self.slots.rollback(reason[:200], self.clock())
        except NoRollbackTarget as exc:
            return CommandState.FAILED, str(exc)
        except SlotError as exc:
            return CommandState.FAILED, str(exc)
        return CommandState.ROLLED_BACK, f"slot {slot} is active again"

    async def _configure(self, message: Message) -> tuple[CommandState, str]:
        changes = message.body.get("config")
        if not isinstance(changes, dict):
            return CommandState.REFUSED, "a config command carries a `config` object"
        try:
            config = await asyncio.to_thread(apply_config, self.state_dir, changes)
        except RunConfigError as exc:
            return CommandState.REFUSED, str(exc)
        self.loop.reconfigure(config)
        return CommandState.DONE, f"input {config.input.kind}, every {config.interval_s:g} s"

    def _on_step(self, step: StepResult) -> None:
        """Report what the rune loop changed: probation's verdicts, and a new rune running."""
        if step.kind is StepKind.ROLLED_BACK:
            self.report_rune_change(CommandState.ROLLED_BACK, f"probation failed: {step.reason}")
        elif step.kind is StepKind.PASSED_PROBATION:
            self.report_rune_change("probation-passed", step.rune or "")
        elif step.kind is StepKind.OK and step.sha256 != self._running_sha:
            self._running_sha = step.sha256
            self.report_rune_change("running", step.rune or "")

    # -- reports -----------------------------------------------------------------------------

    def _status(self, cid: str | None, state: str, reason: str) -> None:
        body: dict[str, Any] = {"command_id": cid, "state": str(state), "reason": reason[:1000]}
        self.send(MessageType.STATUS, body)  # the runes are added when it is sent
        self._on_event("status", body)

    def report_rune_change(self, state: str, reason: str) -> None:
        """A change of the active rune that no command caused (probation, revocation)."""
        self._status(None, state, reason)

    def _runes(self) -> dict[str, Any]:
        try:
            state = self.slots.state()
            active = self.slots.rune(state.active.slot) if state.active else None
            previous = self.slots.rune(state.previous.slot) if state.previous else None
        except SlotError as exc:
            return {"active": None, "previous": None, "slots_error": str(exc)}
        stats = self.loop.stats()
        runs = {
            "inferences": stats.inferences,
            "failures": stats.failures,
            "latency_p50_ms": None if stats.latency_p50_s is None else stats.latency_p50_s * 1000,
            "latency_p95_ms": None if stats.latency_p95_s is None else stats.latency_p95_s * 1000,
            "input": stats.input,
        }
        return {"active": rune_summary(active), "previous": rune_summary(previous), "runs": runs}

    def _active_summary(self) -> dict[str, str] | None:
        try:
            state = self.slots.state()
            return rune_summary(self.slots.rune(state.active.slot) if state.active else None)
        except SlotError:
            return None

    def _deployment_state(self) -> str:
        flight = self.channel.in_flight
        return "idle" if flight is None else f"{flight.type}:{flight.state}"

    def _hello(self) -> dict[str, Any]:
        flight = self.channel.in_flight
        return {
            "agent_version": agent_version(),
            **self._runes(),
            "in_flight": None if flight is None else flight.to_json(),
            "results": [r.to_json() for r in self.channel.recent_results()],
            "command_seq": self.channel.command_seq,
            "refused": self.channel.refused,
        }

    # -- the certificate ---------------------------------------------------------------------

    async def _renewal_loop(self, stop: asyncio.Event) -> None:
        """Renew the broker certificate when a third of its lifetime is left, then reconnect."""
        while not stop.is_set():
            enrollment = load_enrollment(self.state_dir)
            if enrollment is not None and enrollment.renewal_due(self.clock()):
                try:
                    if await asyncio.to_thread(renew_if_due, self.state_dir, self.clock()):
                        self._renewed.set()
                except EnrollError as exc:
                    log.warning("could not renew the device certificate yet: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RENEWAL_CHECK_S)

    # -- the command key ---------------------------------------------------------------------

    async def _learn_command_key_until(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                await asyncio.to_thread(self._learn_command_key)
                return
            except UpdateError as exc:
                delay = backoff_delay(attempt, self._rng)
                attempt += 1
                log.warning("cannot learn the command key yet (%s); retrying in %.1f s", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    def _learn_command_key(self, timeout_s: float | None = None) -> None:
        client = tuf_client(
            self.state_dir, self.config.server_url, self.identity, self.attester.passport
        )
        with client.fetcher.limited(timeout_s) if timeout_s else contextlib.nullcontext():
            client.refresh()
            document = client.command_key()
        try:
            key = SSlibKey.from_dict(str(document["keyid"]), dict(document["key"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UpdateRefused(
                f"the published command key is malformed ({exc})", "malformed-target"
            ) from None
        self.command_key = key
        self._key_confirmed_at = self.clock()
        self._refreshed = (client, time.monotonic())
