"""Feed telemetry reports from the broker to `TelemetryIngest`, in batches, in one or more
processes.

Rules:
- `TelemetryQueue` takes reports one at a time from the controller's broker link (`fleetctl
  serve` ingesting in-process) and hands them to `TelemetryIngest.handle_batch` in batches of up
  to `BATCH_MAX`, from `workers` tasks; its queue is bounded (`QUEUE_SIZE`), so a slow database
  slows the reading from the broker instead of filling memory. A batch that fails (the database
  locked by another writer, or away for a moment) is tried again `STORE_ATTEMPTS` times, waiting
  `STORE_RETRY_S` doubling; after that it is logged and dropped (the broker has had the reports
  acknowledged, so they are lost then).
- `run_worker` is one ingest worker process (`fleetctl telemetry ingest`): its own MQTT session
  subscribed to every device's `telemetry` topic, as an MQTT shared subscription
  (`$share/GROUP/...`) when a group is given, so that several workers (on any machines) split the
  reports between them and each report goes to one of them. Each verifies signatures itself.
  Its session is persistent (a fixed client id, `clean_session` false), so the broker keeps the
  reports that arrive while it restarts; two workers must not share a client id.
- A worker's session runs on paho's own network thread, not through aiomqtt: receiving a message
  costs about half as much CPU that way, and receiving is a third of what a report costs. The
  thread hands reports to the event loop through a bounded inbox and waits while it is full (so
  the broker queues instead of the worker's memory). A batch waits `LINGER_S` to fill unless it
  is full already: a batch costs a transaction and a few statements whatever its size, and
  reports arriving one by one would otherwise pay that each. Reports are acknowledged to the
  broker as they are received (QoS 1), so a worker killed mid-batch loses what it held unstored;
  a stopped worker stores everything it received first.
- paho reconnects the session forever, waiting 1 s doubling to `BACKOFF_CAP_S`.
- A worker looks device keys up in the database (`enrolled_key`); `TelemetryIngest` keeps them
  for its `KEY_CACHE_S`, so a device removed or rejected is refused within that time.
- A worker process records the reports it refuses in the fleet's audit log (`fleet.audit_log`),
  like the controller does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry
from securesystemslib.signer import Key

from attestation.keys import key_from_raw
from fleet.audit_log import audit_log
from fleet.channel import BrokerSettings
from fleet.db import close_database, open_database
from fleet.db.models import Device
from fleet.logs import log
from fleet.telemetry.ingest import BatchResult, TelemetryIngest
from fleet.telemetry.metrics import TelemetryMetrics
from fleet.tuf_store import utcnow
from ota.protocol import Channel, device_subscriptions

BATCH_MAX = 256
LINGER_S = 0.02
STORE_ATTEMPTS = 5
STORE_RETRY_S = 0.5
QUEUE_SIZE = 4096
BACKOFF_CAP_S = 30.0


class TelemetryQueue:
    def __init__(self, ingest: TelemetryIngest, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError("telemetry needs at least one worker task")
        self.ingest = ingest
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(QUEUE_SIZE)
        self._count = workers
        self._tasks: list[asyncio.Task[None]] = []

    async def submit(self, topic_name: str, data: bytes) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._work(), name=f"telemetry-ingest-{n}")
                for n in range(self._count)
            ]
        await self._queue.put((topic_name, data))

    async def drain(self) -> None:
        await self._queue.join()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _work(self) -> None:
        while True:
            batch: list[tuple[str, bytes]] = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await store_batch(self.ingest, batch)
            finally:
                for _ in batch:
                    self._queue.task_done()


async def store_batch(
    ingest: TelemetryIngest, batch: list[tuple[str, bytes]]
) -> BatchResult | None:
    """`ingest.handle_batch`, tried again while the database fails (locked, away), up to
    `STORE_ATTEMPTS` times; None (logged) when it never succeeded."""
    for attempt in range(STORE_ATTEMPTS):
        try:
            return await ingest.handle_batch(batch)
        except Exception as exc:
            if attempt + 1 == STORE_ATTEMPTS:
                log("telemetry.batch_failed", reports=len(batch), error=repr(exc))
                return None
            await asyncio.sleep(STORE_RETRY_S * 2**attempt)
    return None


def telemetry_subscriptions(share_group: str | None) -> Sequence[str]:
    return device_subscriptions(share_group, channels=[Channel.TELEMETRY])


class _Inbox:
    """Reports from paho's network thread to the event loop; the thread waits while it is full
    (it then stops reading from the broker, which queues for the session)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop = loop
        self.limit = limit
        self.items: deque[tuple[str, bytes]] = deque()
        self.ready = asyncio.Event()
        self._room = threading.Condition()

    def put(self, item: tuple[str, bytes]) -> None:  # paho's network thread
        with self._room:
            while len(self.items) >= self.limit:
                self._room.wait(1.0)
            self.items.append(item)
            if len(self.items) == 1:
                self.loop.call_soon_threadsafe(self.ready.set)

    def take(self, most: int) -> list[tuple[str, bytes]]:
        with self._room:
            batch = [self.items.popleft() for _ in range(min(most, len(self.items)))]
            self._room.notify_all()
            if not self.items:
                self.ready.clear()
            return batch


async def run_worker(
    settings: BrokerSettings, ingest: TelemetryIngest, client_id: str, stop: asyncio.Event
) -> WorkerCounts:
    """Consume reports until `stop` is set (see the module's rules); what it did."""
    url = urlsplit(settings.url)
    counts = WorkerCounts()
    inbox = _Inbox(asyncio.get_running_loop(), QUEUE_SIZE)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.scheme == "mqtts":
        client.tls_set_context(_tls_context(settings))
    client.reconnect_delay_set(min_delay=1, max_delay=int(BACKOFF_CAP_S))

    def on_connect(
        client: mqtt.Client, _data: object, _flags: object, reason: Any, _props: object
    ) -> None:
        if reason.is_failure:
            log("telemetry.worker_refused", client=client_id, reason=str(reason))
            return
        client.subscribe([(f, 1) for f in telemetry_subscriptions(settings.share_group)])

    def on_subscribe(
        _client: mqtt.Client, _data: object, _mid: int, reasons: Any, _props: object
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            log("telemetry.worker_refused", client=client_id, reason=str(reasons))
            return
        log("telemetry.worker_connected", client=client_id, group=settings.share_group or "-")

    def on_disconnect(
        _client: mqtt.Client, _data: object, _flags: object, reason: Any, _props: object
    ) -> None:
        if not stop.is_set():
            log("telemetry.worker_disconnected", client=client_id, reason=str(reason))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = lambda _c, _d, message: inbox.put((message.topic, bytes(message.payload)))
    client.connect_async(
        url.hostname or "", url.port or (8883 if url.scheme == "mqtts" else 1883), 30
    )
    client.loop_start()
    try:
        while not stop.is_set() or inbox.items:
            if not inbox.items:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(inbox.ready.wait(), 0.5)
                continue
            if len(inbox.items) < BATCH_MAX and not stop.is_set():
                await asyncio.sleep(LINGER_S)  # let a batch fill: each costs a transaction
            batch = inbox.take(BATCH_MAX)
            result = await store_batch(ingest, batch)
            if result is not None:
                counts.add(result)
            if stop.is_set() and not inbox.items:
                break
    finally:
        client.disconnect()
        client.loop_stop()
    return counts


@dataclass
class WorkerCounts:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0

    def add(self, result: BatchResult) -> None:
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.refused += result.refused


def _tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.ca_cert) if settings.ca_cert else None)
    if settings.client_cert is not None:
        context.load_cert_chain(
            str(settings.client_cert), str(settings.client_key) if settings.client_key else None
        )
    return context


async def enrolled_key(device_id: str) -> Key | None:
    """The key of an enrolled device, from the database; None for any other id."""
    device = await Device.get_or_none(id=device_id)
    if device is None or device.state != "enrolled":
        return None
    return key_from_raw(bytes.fromhex(device.public_key))


async def run_worker_process(
    settings: BrokerSettings, db_url: str, client_id: str, audit_key: bytes
) -> None:
    """One `fleetctl telemetry ingest` worker: until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await open_database(db_url)
    ingest = TelemetryIngest(enrolled_key, TelemetryMetrics(CollectorRegistry()), utcnow)
    counts = WorkerCounts()
    try:
        async with audit_log(audit_key):
            counts = await run_worker(settings, ingest, client_id, stop)
    finally:
        await close_database()
        log(
            "telemetry.worker_stopped",
            client=client_id,
            stored=counts.stored,
            duplicates=counts.duplicates,
            refused=counts.refused,
        )
