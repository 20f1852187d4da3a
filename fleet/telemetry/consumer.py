"""Feed telemetry reports from the broker to `TelemetryIngest`, in batches, in one or more
processes.

Rules:
- `TelemetryQueue` takes reports one at a time (from the controller's broker link, or from a
  worker's own session) and hands them to `TelemetryIngest.handle_batch` in batches of up to
  `BATCH_MAX`, from `workers` tasks; its queue is bounded (`QUEUE_SIZE`), so a slow database
  slows the reading from the broker instead of filling memory. A batch that fails (the database
  away for a moment) is logged and dropped: the devices' reports are lost then, not retried,
  since the broker has already had them acknowledged.
- `run_worker` is one ingest worker process (`fleetctl telemetry ingest`): its own MQTT session
  subscribed to every device's `telemetry` topic, as an MQTT shared subscription
  (`$share/GROUP/...`) when a group is given, so that several workers (on any machines) split the
  reports between them and each report goes to one of them. Each verifies signatures itself.
  Its session is persistent (a fixed client id, `clean_session` false), so the broker keeps the
  reports that arrive while it restarts; two workers must not share a client id.
- The session reconnects forever with full-jitter exponential backoff, like the broker link.
- A worker looks device keys up in the database and keeps them `KEY_CACHE_S`, so a device
  removed or rejected is refused by every worker within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import ssl
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiomqtt
from prometheus_client import CollectorRegistry
from securesystemslib.signer import Key

from attestation.keys import key_from_raw
from fleet.channel import BrokerSettings
from fleet.db import close_database, open_database
from fleet.db.models import Device
from fleet.logs import log
from fleet.telemetry.ingest import TelemetryIngest
from fleet.telemetry.metrics import TelemetryMetrics
from fleet.tuf_store import utcnow
from ota.protocol import Channel, device_subscriptions

BATCH_MAX = 256
QUEUE_SIZE = 4096
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
KEY_CACHE_S = 60.0


class TelemetryQueue:
    def __init__(self, ingest: TelemetryIngest, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError("telemetry needs at least one worker task")
        self.ingest = ingest
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(QUEUE_SIZE)
        self._count = workers
        self._tasks: list[asyncio.Task[None]] = []
        self.stored = self.duplicates = self.refused = 0

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
                result = await self.ingest.handle_batch(batch)
                self.stored += result.stored
                self.duplicates += result.duplicates
                self.refused += result.refused
            except Exception as exc:
                log("telemetry.batch_failed", reports=len(batch), error=repr(exc))
            finally:
                for _ in batch:
                    self._queue.task_done()


def telemetry_subscriptions(share_group: str | None) -> Sequence[str]:
    return device_subscriptions(share_group, channels=[Channel.TELEMETRY])


async def run_worker(
    settings: BrokerSettings, queue: TelemetryQueue, client_id: str, stop: asyncio.Event
) -> None:
    """Consume reports until `stop` is set (see the module's rules)."""
    rng = random.Random()
    attempt = 0
    while not stop.is_set():
        session = asyncio.create_task(_session(settings, queue, client_id))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (session, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if stop.is_set():
            break
        error = session.exception() if session in done and not session.cancelled() else None
        log("telemetry.worker_disconnected", error=repr(error))
        cap = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 16))
        attempt += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0, cap))
    await queue.drain()


async def _session(settings: BrokerSettings, queue: TelemetryQueue, client_id: str) -> None:
    url = urlsplit(settings.url)
    tls = None
    if url.scheme == "mqtts":
        tls = ssl.create_default_context(cafile=str(settings.ca_cert) if settings.ca_cert else None)
        if settings.client_cert is not None:
            tls.load_cert_chain(
                str(settings.client_cert),
                str(settings.client_key) if settings.client_key else None,
            )
    async with aiomqtt.Client(
        url.hostname or "",
        url.port or (8883 if url.scheme == "mqtts" else 1883),
        identifier=client_id,
        username=url.username,
        password=url.password,
        keepalive=30,
        clean_session=False,
        tls_context=tls,
    ) as client:
        for topic_filter in telemetry_subscriptions(settings.share_group):
            await client.subscribe(topic_filter, qos=1)
        log("telemetry.worker_connected", client=client_id, group=settings.share_group or "-")
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes | bytearray) else b""
            await queue.submit(str(message.topic), bytes(data))


class DeviceKeys:
    """Enrolled devices' keys from the database, each kept for `KEY_CACHE_S`."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[float, Key | None]] = {}

    async def __call__(self, device_id: str) -> Key | None:
        cached = self._keys.get(device_id)
        if cached is not None and time.monotonic() - cached[0] < KEY_CACHE_S:
            return cached[1]
        device = await Device.get_or_none(id=device_id)
        key = None
        if device is not None and device.state == "enrolled":
            key = key_from_raw(bytes.fromhex(device.public_key))
        self._keys[device_id] = (time.monotonic(), key)
        return key


async def run_worker_process(settings: BrokerSettings, db_url: str, client_id: str) -> None:
    """One `fleetctl telemetry ingest` worker: until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await open_database(db_url)
    metrics = TelemetryMetrics(CollectorRegistry())
    queue = TelemetryQueue(TelemetryIngest(DeviceKeys(), metrics, utcnow))
    try:
        await run_worker(settings, queue, client_id, stop)
    finally:
        await queue.stop()
        await close_database()
        log(
            "telemetry.worker_stopped",
            client=client_id,
            stored=queue.stored,
            duplicates=queue.duplicates,
            refused=queue.refused,
        )
