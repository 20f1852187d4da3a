"""`fleetctl serve`: run the controller until SIGINT or SIGTERM, then shut down gracefully.

Rules:
- Startup order: database (with migrations), repository, an immediate renewal (the controller may
  have been down past a timestamp's expiry), then the HTTP listener; the first line on stdout is
  `listening on http://HOST:PORT` once requests are accepted (port 0 picks a free port).
- Shutdown: stop accepting, let in-flight requests finish (up to `SHUTDOWN_GRACE_S`), stop the
  renewal task, close the database.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from importlib.metadata import version as dist_version

from aiohttp import web

from fleet.api.app import make_app
from fleet.controller import Controller
from fleet.db import close_database, open_database, redact
from fleet.fleetdir import FleetDir
from fleet.logs import log
from fleet.tuf_store import FleetRepository, utcnow

SHUTDOWN_GRACE_S = 10.0


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {listen!r} is not HOST:PORT (for example 127.0.0.1:8470)")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(fleet_dir: FleetDir, listen: str | None, db_url: str | None) -> None:
    config = fleet_dir.load_config()
    host, port = parse_listen(listen or config.listen)
    url = fleet_dir.db_url(db_url)
    await open_database(url)
    runner: web.AppRunner | None = None
    ctl: Controller | None = None
    try:
        repository = await FleetRepository.open(fleet_dir, config.lifetimes())
        ctl = Controller(fleet_dir, config, repository, version=dist_version("fleet-tinyml"))
        await ctl.renew_once(utcnow())
        ctl.start()
        runner = web.AppRunner(
            make_app(ctl), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S, handle_signals=False
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        url_host = f"[{host}]" if ":" in host else host  # an IPv6 address needs brackets in a URL
        print(f"listening on http://{url_host}:{bound[1]}", flush=True)
        log("controller.started", listen=f"{host}:{bound[1]}", db=redact(url), fleet=config.name)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log("controller.stopping")
    finally:
        if runner is not None:
            await runner.cleanup()
        if ctl is not None:
            await ctl.stop()
        await close_database()
        log("controller.stopped")
        sys.stdout.flush()
