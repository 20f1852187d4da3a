"""`fleetctl serve`: run the controller until SIGINT or SIGTERM, then shut down gracefully.

Rules:
- Startup order: database (with migrations), repository, an immediate renewal (the controller may
  have been down past a timestamp's expiry), the broker (the embedded one unless a broker URL is
  given), this controller's agent release as an attestation reference, the link to the broker,
  then the HTTP listener, the rollout scheduler (`fleet.scheduler`), the attestation schedule and
  telemetry's retention and gauges (`fleet.telemetry.service`), the fleet's gauges
  (`fleet.overview`); the audit log (`fleet.audit_log`)
  records from the moment the repository is open until the database closes;
  the first line on stdout is `listening on http://HOST:PORT` once requests are accepted (port 0
  picks a free port), the second `broker mqtt://HOST:PORT` (the URL devices are given).
- Shutdown: stop accepting, let in-flight requests finish (up to `SHUTDOWN_GRACE_S`), stop the
  rollout scheduler, telemetry, the broker link, the embedded broker and the renewal task, close
  the database.
- `running_controller` is all of that as an async context manager yielding a `ServerHandle`;
  `serve` only adds the two stdout lines and waits for a signal. Its `clock` drives the command
  channel (the outbox's deadlines and resends, the broker link's freshness checks), so a test can
  run the channel at another time; TUF metadata, enrollment and certificates stay on the real
  clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version as dist_version
from pathlib import Path

from aiohttp import web

from fleet.api.app import make_app
from fleet.attestation import AttestationSchedule, register_own_release
from fleet.audit_log import audit_log, load_audit_key
from fleet.broker import EmbeddedBroker
from fleet.channel import BrokerLink, BrokerSettings, ChannelMetrics
from fleet.controller import Controller
from fleet.db import close_database, open_database, redact
from fleet.fleetdir import FleetDir
from fleet.logs import log
from fleet.outbox import CommandKey, Outbox
from fleet.overview import FleetGauges
from fleet.scheduler import Scheduler
from fleet.telemetry.metrics import TelemetryMetrics
from fleet.telemetry.service import TelemetryOptions, TelemetryService
from fleet.tuf_store import FleetRepository, utcnow

SHUTDOWN_GRACE_S = 10.0


@dataclass(frozen=True)
class MqttOptions:
    """The broker: `url` for an external one, else the embedded one on `listen`."""

    url: str | None = None
    listen: str | None = None
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    share_group: str | None = None


@dataclass(frozen=True)
class ServerHandle:
    """A controller that `running_controller` started: where it listens and its parts."""

    url: str  # http://HOST:PORT of the API and the TUF repository
    broker_url: str  # the broker address devices are given
    controller: Controller
    outbox: Outbox
    link: BrokerLink
    embedded_broker: EmbeddedBroker | None


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {listen!r} is not HOST:PORT (for example 127.0.0.1:8470)")
    return host.strip("[]") or "127.0.0.1", int(port)


@contextlib.asynccontextmanager
async def running_controller(
    fleet_dir: FleetDir,
    listen: str | None,
    db_url: str | None,
    mqtt: MqttOptions | None = None,
    *,
    clock: Callable[[], datetime] = utcnow,
    telemetry_options: TelemetryOptions | None = None,
) -> AsyncIterator[ServerHandle]:
    """Start the controller (see the module docstring for the order); stop it on exit."""
    config = fleet_dir.load_config()
    host, port = parse_listen(listen or config.listen)
    mqtt = mqtt or MqttOptions()
    url = fleet_dir.db_url(db_url)
    audit_key = load_audit_key(fleet_dir)
    await open_database(url)
    audits = contextlib.AsyncExitStack()
    runner: web.AppRunner | None = None
    ctl: Controller | None = None
    broker: EmbeddedBroker | None = None
    link: BrokerLink | None = None
    scheduler: Scheduler | None = None
    schedule: AttestationSchedule | None = None
    telemetry: TelemetryService | None = None
    gauges: FleetGauges | None = None
    try:
        repository = await FleetRepository.open(fleet_dir, config.lifetimes(), url)
        ctl = Controller(fleet_dir, config, repository, version=dist_version("fleet-tinyml"))
        ctl.audit = await audits.enter_async_context(audit_log(audit_key))
        await ctl.renew_once(utcnow())
        ctl.start()
        broker_url = mqtt.url or config.mqtt_url
        if broker_url is None:
            broker_host, broker_port = parse_listen(mqtt.listen or config.mqtt_listen)
            broker = EmbeddedBroker(broker_host, broker_port)
            await broker.start()
            broker_url = broker.url
        outbox = Outbox(CommandKey(fleet_dir.key_file("command")), clock)
        ctl.outbox = outbox
        await register_own_release(ctl.version)
        schedule = AttestationSchedule(outbox, config.attestation_times()[0], clock)
        settings = BrokerSettings(
            broker_url, mqtt.ca_cert, mqtt.client_cert, mqtt.client_key, mqtt.share_group
        )
        link = BrokerLink(
            settings, outbox, ctl.device_key, ChannelMetrics(ctl.metrics.registry), clock
        )
        link.on_hello = schedule.hello
        telemetry = TelemetryService(
            telemetry_options or TelemetryOptions(),
            ctl.device_key,
            TelemetryMetrics(ctl.metrics.registry),
            clock,
        )
        ctl.telemetry = telemetry
        if telemetry.queue is not None:
            link.telemetry = telemetry.queue.submit
        ctl.device_broker_url = config.device_broker_url or broker_url
        runner = web.AppRunner(
            make_app(ctl), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S, handle_signals=False
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        link.start()
        scheduler = Scheduler(
            outbox, clock, url, ctl.metrics.rollouts, presence_known=link.presence_known
        )
        ctl.scheduler = scheduler
        scheduler.start()
        schedule.start()
        telemetry.start()
        gauges = FleetGauges(ctl.metrics.registry, utcnow)
        gauges.start()
        bound = runner.addresses[0]
        url_host = f"[{host}]" if ":" in host else host  # an IPv6 address needs brackets in a URL
        log(
            "controller.started",
            listen=f"{host}:{bound[1]}",
            db=redact(url),
            fleet=config.name,
            broker=redact(broker_url),
            embedded_broker=broker is not None,
        )
        yield ServerHandle(
            url=f"http://{url_host}:{bound[1]}",
            broker_url=ctl.device_broker_url,
            controller=ctl,
            outbox=outbox,
            link=link,
            embedded_broker=broker,
        )
        log("controller.stopping")
    finally:
        if runner is not None:
            await runner.cleanup()
        if gauges is not None:
            await gauges.stop()
        if schedule is not None:
            await schedule.stop()
        if scheduler is not None:
            await scheduler.stop()
        if telemetry is not None:
            await telemetry.stop()
        if link is not None:
            await link.stop()
        if broker is not None:
            await broker.stop()
        if ctl is not None:
            await ctl.stop()
            await ctl.repository.close()
        await audits.aclose()
        await close_database()
        log("controller.stopped")


async def serve(
    fleet_dir: FleetDir,
    listen: str | None,
    db_url: str | None,
    mqtt: MqttOptions | None = None,
    telemetry: TelemetryOptions | None = None,
) -> None:
    # Before anything starts: a SIGTERM that arrives while starting (or just after the address
    # is printed) stops the controller gracefully once it is up, instead of killing it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with running_controller(
            fleet_dir, listen, db_url, mqtt, telemetry_options=telemetry
        ) as server:
            print(f"listening on {server.url}", flush=True)
            print(f"broker {server.broker_url}", flush=True)
            await stop.wait()
    finally:
        sys.stdout.flush()
