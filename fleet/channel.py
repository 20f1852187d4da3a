"""The controller's link to the broker: verify what devices send, publish what the outbox sends.

Rules:
- Nothing a device sends is trusted for arriving on its topic. `ota.protocol.open_message` checks
  each envelope against the key of the enrolled device it claims to come from; a message on
  another device's topic is `spoofed`, an unknown or not enrolled sender `unknown-sender`.
- Each stream's last accepted `seq` is stored with the device and advanced with a conditional
  update (`WHERE seq < new`), so two copies of one message (a QoS 1 redelivery, a retained
  presence seen again after a restart) are handled once: the same `seq` again is a duplicate,
  ignored and counted; a lower one is a replay, refused, with one exception: a late command
  report (below). What a message changes on the device row
  (`last_seen_at`; `online` for a presence; the runes a status or a `hello` reports, and a
  `hello`'s `last_hello` and agent version) is written by that same update, so a message is
  accepted and recorded in one statement, or neither; only then is it acted on (the outbox).
- Messages are taken in batches: a worker takes every message waiting in its queue (up to
  `BATCH_MAX`). A run of `status` and `presence` messages is recorded in one transaction, one
  update per device and stream for all of them (`WHERE seq < first`, advancing to the last, when
  their seqs rise; otherwise, or if that update changes nothing, one at a time as above), and
  the command reports among them go to the outbox together (`Outbox.report_many`). A `hello` or
  a `security-event` is recorded and acted on alone, in its place in the order.
- A late command report: a `status` naming a command, with a `seq` at most `REORDER_WINDOW` below
  the stored one. Controller replicas on one MQTT shared subscription split a device's messages
  between them, so a device's report can be handled after its next message was, by another
  replica; refusing it would lose the end of a command until the device's next `hello`. Its
  report still goes to the outbox, and nothing else of it is recorded (the device row, its seq).
  This gives a replay nothing: the message verified (the device signed it, for this controller,
  and it has not expired), the outbox takes a report only for that device's own command and only
  moves a command forward (the first terminal report ends it), so a copy can only repeat what the
  device already said about that same command, which a broker could have delayed anyway. Counted
  in `fleet_messages_late_reports_total`, not as a refusal.
- Device messages are handled concurrently by `DISPATCH_WORKERS` tasks. Each device is hashed to
  one of them, so one device's messages are handled one at a time, in the order the broker
  delivered them (the conditional update would refuse an older `seq` handled late, so order is
  what keeps a device's messages from being refused); different devices' database round trips
  overlap. Each worker's queue holds at most `DISPATCH_QUEUE_SIZE` messages: when one is full the
  link stops reading from the broker until it has room (backpressure, not unbounded memory). The
  workers outlive a broker session, so a reconnect never runs two handlers for one device.
- Every refusal is counted in `fleet_messages_refused_total{kind}` and logged as a security event;
  it changes nothing. A message whose handling fails (the database away for a moment) is logged
  and dropped; it never stops its worker or the link.
- Telemetry reports are handed to `telemetry` (`fleet.telemetry.consumer`) as they come; with no
  `telemetry` the link does not subscribe to them (separate ingest workers take them).
- On every (re)connection the link subscribes to the device channels and asks the outbox to send
  every unfinished command again; while connected it re-sends what was not acknowledged and
  times out what passed its deadline (`Outbox.resend_due`) every `RESEND_INTERVAL_S`.
- The link reconnects forever with full-jitter exponential backoff; the API keeps working while
  the broker is away (commands stay queued).
- Presence (`Device.online`) is only as good as the link: a broker that shuts down delivers every
  device's last will (`offline`) before it drops the controller, and while the link is down no
  presence arrives at all. `presence_known()` says whether the stored flags can be trusted: not
  while the link is down, nor for `PRESENCE_SETTLE_S` after a reconnection (the devices, which
  reconnect with their own backoff, need that long to say `online` again); at once on the first
  connection, where the broker's retained presence arrives with the subscription. The rollout
  scheduler waits for it before it notifies or skips a device as offline.
- The session is clean, under a random client id: replicas and overlapping reconnects must not
  take each other's session over (docs/broker.md), and the embedded broker keeps no session
  anyway. So what devices publish while the controller is away from the broker (its restart, a
  broker restart, a network cut) is lost, and nothing depends on it: on every (re)connection the
  outbox sends each unfinished command again and a device answers a command it already ran with
  its recorded result; a device says `hello` (its whole state, recent results included) on each
  of its own connections and every few minutes while connected (`agent.daemon`), and the outbox
  reconciles from it. A missed status delays what the controller shows; it never loses the end
  of a command. (A persistent session would also queue stale envelopes: after a long outage the
  controller would refuse them as expired and count each as a security refusal.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import ssl
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from prometheus_client import CollectorRegistry, Counter
from securesystemslib.signer import Key
from tortoise.transactions import in_transaction

from fleet.db import redact, sql
from fleet.db.models import Device
from fleet.logs import log
from fleet.outbox import Outbox, Report
from ota.protocol import (
    CONTROLLER,
    Channel,
    Message,
    MessageType,
    Refusal,
    claimed_issuer,
    device_subscriptions,
    open_message,
    parse_topic,
)

RESEND_INTERVAL_S = 5.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
PRESENCE_SETTLE_S = 10.0
CLIENT_ID = "fleet-controller"
DISPATCH_WORKERS = 8
DISPATCH_QUEUE_SIZE = 256
BATCH_MAX = 256
REORDER_WINDOW = 64  # how far below the stored seq a late command report may be
PUBLISH_PENDING_WARNING = 2 * sql.CHUNK
_SEQ_FIELD = {Channel.STATUS: "status_seq", Channel.PRESENCE: "presence_seq"}
# What is recorded in runs: the messages whose recorded fields are plain columns (a hello's
# `last_hello` is JSON, and it is reconciled).
_IN_RUNS = frozenset({MessageType.STATUS, MessageType.PRESENCE})


class ChannelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "fleet_messages_received_total",
            "Device messages accepted, by type",
            ["type"],
            registry=registry,
        )
        self.refused = Counter(
            "fleet_messages_refused_total",
            "Device messages refused: bad signature, unknown sender, spoofed, replayed, expired",
            ["kind"],
            registry=registry,
        )
        self.late_reports = Counter(
            "fleet_messages_late_reports_total",
            "Command reports that arrived after a newer message of their device (replicas "
            "splitting its messages): given to the outbox, nothing else recorded",
            registry=registry,
        )
        self.duplicates = Counter(
            "fleet_messages_duplicate_total",
            "Device messages seen again with the same seq (QoS 1 redelivery, retained presence)",
            registry=registry,
        )
        self.device_security_events = Counter(
            "fleet_device_security_events_total",
            "Messages devices refused and reported (forged, replayed or stale commands)",
            ["kind"],
            registry=registry,
        )
        self.broker_connections = Counter(
            "fleet_broker_connections_total",
            "Times the controller (re)connected to the broker",
            registry=registry,
        )


class Recorded(Enum):
    ACCEPTED = "accepted"
    LATE_REPORT = "late-report"
    NOT = "not"


@dataclass(frozen=True)
class Opened:
    """A device message whose envelope verified, not yet checked against the stored seq."""

    device_id: str
    topic: str
    field: str  # the device column holding its stream's last seq
    message: Message


@dataclass(frozen=True)
class BrokerSettings:
    url: str
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    share_group: str | None = None


class BrokerLink:
    def __init__(
        self,
        settings: BrokerSettings,
        outbox: Outbox,
        device_key: Callable[[str], Awaitable[Key | None]],
        metrics: ChannelMetrics,
        clock: Callable[[], datetime],
        workers: int = DISPATCH_WORKERS,
        queue_size: int = DISPATCH_QUEUE_SIZE,
    ) -> None:
        url = urlsplit(settings.url)
        if url.scheme not in {"mqtt", "mqtts"} or not url.hostname:
            raise ValueError(
                f"{settings.url!r} is not a broker URL (mqtt://HOST:PORT or mqtts://HOST:PORT)"
            )
        self.settings = settings
        self.outbox = outbox
        self.device_key = device_key
        self.metrics = metrics
        self.clock = clock
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self._rng = random.Random()
        self._was_up = False
        self._sessions = 0
        self._up_since: datetime | None = None
        if workers < 1 or queue_size < 1:
            raise ValueError("the link needs at least one worker with room for one message")
        self._queues: list[asyncio.Queue[tuple[str, bytes, bool]]] = [
            asyncio.Queue(queue_size) for _ in range(workers)
        ]
        self._workers: list[asyncio.Task[None]] = []
        # What else a device's `hello` starts (the controller asks it to attest if it is due).
        self.on_hello: Callable[[str], Awaitable[None]] = _nothing
        # Where telemetry reports go (`fleet.telemetry`); None: this link does not subscribe to
        # them (separate ingest workers take them).
        self.telemetry: Callable[[str, bytes], Awaitable[None]] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="broker-link")

    def presence_known(self) -> bool:
        """Whether the devices' stored `online` flags can be trusted now (see Rules)."""
        if self._up_since is None:
            return False
        settled = self.clock() - self._up_since >= timedelta(seconds=PRESENCE_SETTLE_S)
        return self._sessions == 1 or settled

    async def stop(self) -> None:
        self.outbox.publish = None
        tasks = [self._task] if self._task is not None else []
        tasks += self._workers
        # A cancellation that lands while aiomqtt is connecting can be swallowed by it (the
        # session then runs on), so cancel again until each task has really ended.
        while pending := [task for task in tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        self._task = None
        self._workers = []

    # -- the session -------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                log("broker.disconnected", error=str(exc))
            except (OSError, ssl.SSLError) as exc:
                log("broker.unreachable", error=str(exc))
            self.connected.clear()
            self._up_since = None
            self.outbox.publish = None
            attempt = 0 if self._was_up else attempt + 1
            cap = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 16))
            await asyncio.sleep(self._rng.uniform(0, cap))

    async def _session(self) -> None:
        url = urlsplit(self.settings.url)
        self._was_up = False
        async with aiomqtt.Client(
            url.hostname or "",
            url.port or (8883 if url.scheme == "mqtts" else 1883),
            identifier=f"{CLIENT_ID}-{random.getrandbits(32):08x}",
            username=url.username,
            password=url.password,
            keepalive=30,
            tls_context=self._tls_context() if url.scheme == "mqtts" else None,
            max_queued_outgoing_messages=100_000,
        ) as client:
            # aiomqtt warns from 10 publishes awaiting their PUBACK; a wave's commands are
            # published together (`Outbox.send_many`), so warn only past that.
            client.pending_calls_threshold = PUBLISH_PENDING_WARNING
            channels = set(_SEQ_FIELD) | ({Channel.TELEMETRY} if self.telemetry else set())
            for topic_filter in device_subscriptions(self.settings.share_group, channels):
                await client.subscribe(topic_filter, qos=1)

            async def publish(topic_name: str, data: bytes) -> None:
                await client.publish(topic_name, data, qos=1)

            self.outbox.publish = publish
            self._was_up = True
            self._sessions += 1
            self._up_since = self.clock()
            self.connected.set()
            self.metrics.broker_connections.inc()
            log("broker.connected", url=redact(self.settings.url))
            resender = asyncio.create_task(self._resend_loop())
            try:
                async for message in client.messages:
                    payload = message.payload
                    data = payload if isinstance(payload, bytes | bytearray) else b""
                    await self.submit(str(message.topic), bytes(data), message.retain)
            finally:
                resender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await resender

    async def _resend_loop(self) -> None:
        await self.outbox.resend_all()
        while True:
            await asyncio.sleep(RESEND_INTERVAL_S)
            try:
                await self.outbox.resend_due()
            except Exception as exc:  # the database may be away for a moment
                log("outbox.resend_failed", error=repr(exc))

    def _tls_context(self) -> ssl.SSLContext:
        settings = self.settings
        context = ssl.create_default_context(
            cafile=str(settings.ca_cert) if settings.ca_cert else None
        )
        if settings.client_cert is not None:
            context.load_cert_chain(
                str(settings.client_cert),
                str(settings.client_key) if settings.client_key else None,
            )
        return context

    # -- dispatch ----------------------------------------------------------------------------

    async def submit(self, topic_name: str, data: bytes, retained: bool = False) -> None:
        """Hand one message to its device's worker, waiting while that worker's queue is full."""
        parsed = parse_topic(topic_name)
        if parsed is not None and parsed[1] is Channel.TELEMETRY and self.telemetry is not None:
            await self.telemetry(topic_name, data)
            return
        if parsed is None or parsed[1] not in _SEQ_FIELD:
            return  # not a device topic the link handles; `handle_batch` would ignore it too
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(queue), name=f"broker-link-worker-{n}")
                for n, queue in enumerate(self._queues)
            ]
        shard = zlib.crc32(parsed[0].encode()) % len(self._queues)
        await self._queues[shard].put((topic_name, data, retained))

    async def drain(self) -> None:
        """Wait until every message submitted so far has been handled."""
        for queue in self._queues:
            await queue.join()

    async def _work(self, queue: asyncio.Queue[tuple[str, bytes, bool]]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < BATCH_MAX and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self.handle_batch(batch)
            except Exception as exc:  # a batch that fails (the database away) must not end it
                log("channel.handler_failed", messages=len(batch), error=repr(exc))
            finally:
                for _ in batch:
                    queue.task_done()

    # -- messages ----------------------------------------------------------------------------

    async def handle_batch(self, items: Sequence[tuple[str, bytes, bool]]) -> list[Message]:
        """Check device messages (topic, data, retained), in the order the broker delivered
        them, and act on them; the accepted ones. Refusals are counted, never raised."""
        opened = [item for item in [await self._open(t, d) for t, d, _ in items] if item]
        accepted: list[Opened] = []
        run: list[Opened] = []
        for item in opened:
            if item.message.type in _IN_RUNS:
                run.append(item)
                continue
            accepted += await self._accept_run(run)
            run = []
            if await self._record_one(item) is Recorded.ACCEPTED:
                accepted.append(item)
                self.metrics.received.labels(item.message.type.value).inc()
                await self._act(item)
        accepted += await self._accept_run(run)
        return [item.message for item in accepted]

    async def _open(self, topic_name: str, data: bytes) -> Opened | None:
        """The message, if its envelope verifies for the device it claims to come from."""
        parsed = parse_topic(topic_name)
        if parsed is None:
            return None
        device_id, channel = parsed
        field = _SEQ_FIELD.get(channel)
        if field is None:
            return None  # evidence and telemetry have their own consumers
        claimed = claimed_issuer(data)
        keys: dict[str, Key] = {}
        if claimed is not None:
            key = await self.device_key(claimed)
            if key is not None:
                keys[claimed] = key
        try:
            # The seq is checked when the message is recorded, against the stored one.
            message = open_message(
                data,
                audience=CONTROLLER,
                channel=channel,
                key_for=keys.get,
                last_seq=lambda _iss: 0,
                now=self.clock().timestamp(),
                topic_sender=device_id,
            )
        except Refusal as refusal:
            self._refuse(refusal, device_id, topic_name)
            return None
        return Opened(device_id, topic_name, field, message)

    async def _accept_run(self, run: Sequence[Opened]) -> list[Opened]:
        """Record a run of status reports and presence in one transaction, then act on them."""
        if not run:
            return []
        streams: dict[tuple[str, str], list[Opened]] = {}
        for item in run:
            streams.setdefault((item.device_id, item.field), []).append(item)
        now = self.clock()
        accepted: list[Opened] = []
        late: list[Opened] = []
        async with in_transaction():
            for (device_id, field), items in streams.items():
                seqs = [item.message.seq for item in items]
                if all(a < b for a, b in itertools.pairwise(seqs)):
                    recorded: dict[str, Any] = {}
                    for item in items:
                        recorded.update(_recorded(item.message))
                    columns = {field: seqs[-1], "last_seen_at": now, **recorded}
                    rows = await sql.fetch(
                        f"UPDATE device SET {', '.join(f'{c} = ?' for c in columns)} "  # noqa: S608
                        f"WHERE id = ? AND {field} < ? RETURNING id",
                        [*columns.values(), device_id, seqs[0]],
                    )
                    if rows:
                        accepted += items
                        continue
                # Some were seen before, or are out of order: one at a time, as they came.
                for item in items:
                    outcome = await self._record_one(item, now)
                    if outcome is Recorded.ACCEPTED:
                        accepted.append(item)
                    elif outcome is Recorded.LATE_REPORT:
                        late.append(item)
        reports = [_report(item) for item in late]
        for item in accepted:
            self.metrics.received.labels(item.message.type.value).inc()
            if _is_report(item.message):
                reports.append(_report(item))
            else:
                await self._act(item)
        await self.outbox.report_many(reports)
        return accepted

    async def _record_one(self, item: Opened, now: datetime | None = None) -> Recorded:
        """Advance the stream's seq to this message's and record what it says, if it is new;
        a late command report is told apart from a replay (see the module's rules)."""
        message, field, device_id = item.message, item.field, item.device_id
        advanced = await Device.filter(id=device_id, **{f"{field}__lt": message.seq}).update(
            **{field: message.seq, "last_seen_at": now or self.clock()}, **_recorded(message)
        )
        if advanced:
            return Recorded.ACCEPTED
        stored = await Device.filter(id=device_id).only("id", field).first()
        last = int(getattr(stored, field)) if stored is not None else None
        if message.seq == last:
            self.metrics.duplicates.inc()
            return Recorded.NOT
        if last is not None and _is_report(message) and last - message.seq <= REORDER_WINDOW:
            self.metrics.late_reports.inc()
            log("channel.late_report", device=device_id, seq=message.seq, last=last)
            return Recorded.LATE_REPORT
        reason = f"seq {message.seq} is not above {last}" if last is not None else "no device"
        self._refuse(Refusal("replayed", reason), device_id, item.topic)
        return Recorded.NOT

    async def _act(self, item: Opened) -> None:
        """What an accepted message does beyond the device row `_recorded` already updated."""
        device_id, message = item.device_id, item.message
        body = message.body
        if message.type is MessageType.PRESENCE:
            log("device.presence", device=device_id, online=body.get("online") is True)
        elif message.type is MessageType.HELLO:
            resent = await self.outbox.reconcile(device_id, body)
            log("device.hello", device=device_id, resent=resent)
            await self.on_hello(device_id)
        elif message.type is MessageType.STATUS:  # one a command's report is not
            log(
                "device.rune_changed",
                device=device_id,
                state=str(body.get("state")),
                reason=str(body.get("reason", ""))[:200],
            )
        elif message.type is MessageType.SECURITY:
            kind = str(body.get("kind", "unknown"))[:32]
            self.metrics.device_security_events.labels(kind).inc()
            log(
                "security.device_refused",
                device=device_id,
                kind=kind,
                reason=str(body.get("reason", ""))[:300],
            )

    def _refuse(self, refusal: Refusal, device_id: str, topic_name: str) -> None:
        self.metrics.refused.labels(refusal.kind).inc()
        log(
            "security.message_refused",
            kind=refusal.kind,
            topic=topic_name,
            device=device_id,
            reason=str(refusal)[:300],
        )


async def _nothing(_device_id: str) -> None:
    return None


def _is_report(message: Message) -> bool:
    """Whether `message` is a device's report on one of its commands."""
    return message.type is MessageType.STATUS and isinstance(message.body.get("command_id"), str)


def _report(item: Opened) -> Report:
    body = item.message.body
    return Report(
        item.device_id, str(body["command_id"]), str(body.get("state")),
        str(body.get("reason", "")),
    )  # fmt: skip


def _recorded(message: Message) -> dict[str, Any]:
    """The device fields an accepted message sets, besides its seq and `last_seen_at`."""
    body = message.body
    if message.type is MessageType.PRESENCE:
        return {"online": body.get("online") is True}
    if message.type is MessageType.HELLO:
        return {
            "online": True,
            "last_hello": body,
            **_runes(body),
            "agent_version": str(body.get("agent_version", ""))[:32] or None,
        }
    if message.type is MessageType.STATUS:
        return _runes(body)
    return {}


def _runes(body: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, ref_field, sha_field in (
        ("active", "active_rune", "active_sha256"),
        ("previous", "previous_rune", None),
    ):
        if name not in body:
            continue
        rune = body[name]
        ref = rune.get("ref") if isinstance(rune, dict) else None
        fields[ref_field] = str(ref)[:255] if isinstance(ref, str) else None
        if sha_field is not None:
            sha = rune.get("sha256") if isinstance(rune, dict) else None
            fields[sha_field] = str(sha)[:64] if isinstance(sha, str) else None
    return fields
