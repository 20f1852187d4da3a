"""The dashboard with a large fleet: how long its pages take to render, against the controller's
cheapest request measured in the same run.

What is measured: a real `fleetctl serve` (SQLite by default, `--db-url` for PostgreSQL; a
`mosquitto` of the bench's own) whose database holds `--devices` devices (a realistic mix: 95%
enrolled, some pending and rejected, 80% online, attestation results affirming, warning,
contraindicated, expired and missing, a few quarantined) and `--events` security events in the
audit log's last hour. A viewer's session cookie asks for each page `--repeat` times, one after
another, over one keep-alive connection: the overview `/` (the issue's target: under a second for
10,000 devices), the device list `/devices` (its first page of 100, filtered from all of them), the
rollouts `/rollouts` and the audit log `/audit` (an operator's). Baseline: `/healthz` (one
`SELECT 1`), the same way.

Run: `.venv/bin/python -m bench.bench_dashboard` (`--devices 10000`, `--repeat 30`, `-o json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import urllib3
from rich.console import Console
from rich.table import Table

from bench.bench_fleet import BenchError, controller, private_broker

TARGET_S = 1.0
PAGES = ("/healthz", "/", "/devices", "/rollouts", "/audit")


@dataclass
class PageTiming:
    path: str
    median_ms: float
    p90_ms: float
    bytes: int


def populate(fleet_dir: Path, devices: int, events: int) -> None:
    """Add the devices and the audit log's security events to the fleet's database."""
    from fleet.audit import Entry
    from fleet.audit_log import AuditLog, load_audit_key
    from fleet.db import close_database, open_database
    from fleet.db.models import Device
    from fleet.fleetdir import FleetDir
    from fleet.tuf_store import utcnow

    async def run() -> None:
        folder = FleetDir(fleet_dir)
        await open_database(folder.db_url(None))
        try:
            now = utcnow()
            statuses = ["affirming"] * 90 + ["warning"] * 4 + ["contraindicated"] * 2 + [None] * 4
            rows = []
            for n in range(devices):
                state = "enrolled" if n % 20 else ("pending" if n % 40 else "rejected")
                status = statuses[n % len(statuses)]
                expires = now + timedelta(hours=1 if n % 50 else -1)
                rows.append(
                    Device(
                        id=f"bench{n:027d}", public_key=secrets.token_hex(32), state=state,
                        labels={"site": f"s{n % 10}", "hw": f"rev{n % 3}"}, online=n % 5 != 0,
                        active_rune="default/sine@0.1.0", attestation_status=status,
                        attestation_reasons=["bench"] if status else None,
                        attested_at=now if status else None,
                        attestation_expires_at=expires if status else None,
                        quarantined_at=now if status == "contraindicated" else None,
                        last_seen_at=now,
                    )
                )  # fmt: skip
            for start in range(0, len(rows), 1000):
                await Device.bulk_create(rows[start : start + 1000])
            audit = AuditLog(load_audit_key(folder))
            for n in range(events):
                audit.record(
                    Entry(
                        now,
                        f"device:bench{n % devices:027d}",
                        "security.message_refused",
                        "-",
                        "refused",
                        {"kind": "bad-signature"},
                    )
                )
            await audit.flush()
        finally:
            await close_database()

    asyncio.run(run())


def time_page(
    http: urllib3.PoolManager, server: str, path: str, cookie: str, repeat: int
) -> PageTiming:
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        response = http.request("GET", server + path, headers={"Cookie": f"fleet_session={cookie}"})
        times.append(time.perf_counter() - started)
        if response.status != 200:
            raise BenchError(f"GET {path}: HTTP {response.status}: {response.data[:300]!r}")
        size = len(response.data)
    times.sort()
    p90 = times[max(0, int(len(times) * 0.9) - 1)]
    return PageTiming(path, statistics.median(times) * 1000, p90 * 1000, size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    console = Console(stderr=args.output == "json")
    timings: list[PageTiming] = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        folder = Path(tmp)
        try:
            with (
                private_broker(folder) as (broker, _process),
                controller(folder, broker, "warning") as running,
            ):
                with console.status(f"adding {args.devices:,} devices"):
                    populate(folder / "fleet", args.devices, args.events)
                operator = running.api.call(
                    "POST", "/api/v1/tokens", {"name": "bench", "role": "operator"}
                )["token"]
                http = urllib3.PoolManager(maxsize=1, retries=False)
                for path in PAGES:
                    with console.status(f"GET {path}"):
                        timings.append(time_page(http, running.url, path, operator, args.repeat))
        except BenchError as exc:
            console.print(f"[red]bench failed:[/red] {exc}")
            return 1
    baseline = timings[0].median_ms
    if args.output == "json":
        print(json.dumps({
            "devices": args.devices, "events": args.events, "repeat": args.repeat,
            "pages": [asdict(t) | {"x_healthz": t.median_ms / baseline} for t in timings],
        }, indent=2))  # fmt: skip
        return 0
    table = Table(title=f"dashboard pages, {args.devices:,} devices ({args.repeat} requests each)")
    for column in ("page", "median", "p90", "x /healthz", "size"):
        table.add_column(column, justify="left" if column == "page" else "right")
    for t in timings:
        mark = ""
        if t.path == "/":
            mark = " (target 1 s: met)" if t.p90_ms < TARGET_S * 1000 else " (target 1 s: NOT met)"
        table.add_row(
            t.path, f"{t.median_ms:.1f} ms{mark}", f"{t.p90_ms:.1f} ms",
            f"{t.median_ms / baseline:.1f}", f"{t.bytes / 1024:.1f} KB",
        )  # fmt: skip
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
