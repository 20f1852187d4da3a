"""`fleetctl telemetry streams|show|ingest`: the fleet's telemetry, and the workers that take it in.

Rules:
- `streams` and `show` read the API (`/api/v1/telemetry`); `show` prints each key's fleet value
  with its 95% error bar from the devices' noise, and with `--rollout` one table per wave.
- `ingest` runs `--workers` processes (`fleet.telemetry.consumer.run_worker`), each with its own
  MQTT session and database connection, consuming every device's telemetry topic through the
  shared-subscription group `--share-group`; run the controller with `--no-telemetry-ingest`
  then. It stops on Ctrl-C or SIGTERM; exit 3 when the database or broker settings are unusable.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import typer
from rich.table import Table

telemetry_app: typer.Typer = typer.Typer(
    help="Telemetry: the fleet's aggregates of opted-in streams, and the ingest workers.",
    no_args_is_help=True,
)

# `fleet.cli` registers this app, so it is defined above this import.
from fleet.cli import (  # noqa: E402
    EXIT_INVALID,
    DirOpt,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    _call,
    _emit_json,
    _fail,
    _need_controller_extra,
    out,
)
from fleet.client import DEFAULT_SERVER  # noqa: E402

SinceOpt = Annotated[str, typer.Option(help="Reports whose window ended this long ago or less.")]


def _age(seconds: float) -> str:
    ago = max(time.time() - seconds, 0)
    return f"{ago:.0f} s ago" if ago < 120 else f"{ago / 60:.0f} min ago"


@telemetry_app.command("streams")
def telemetry_streams(
    since: SinceOpt = "1h",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """The streams devices reported, with how many reports and devices."""
    result = _call(
        server,
        token,
        lambda c: c.request("GET", "/api/v1/telemetry/streams", params={"since": since}),
    )
    if output is Output.json:
        _emit_json(result)
        return
    if not result["streams"]:
        out.print(
            f"no telemetry in the last {since} (devices send only streams their owners "
            "granted: `fleet-agent consent grant`)"
        )
        return
    table = Table("stream", "kind", "reports", "devices", "runes", "last window")
    for entry in result["streams"]:
        table.add_row(
            entry["stream"],
            entry["kind"],
            str(entry["reports"]),
            str(entry["devices"]),
            ", ".join(entry["runes"]),
            _age(entry["last_window_end"]),
        )
    out.print(table)


def _aggregate_table(title: str, aggregate: dict[str, Any]) -> Table | str:
    if aggregate.get("value") is None:
        return f"{title}: no reports"
    table = Table(
        "key",
        "value",
        "± 95%",
        "",
        title=f"{title}: {aggregate['reports']} reports from {aggregate['devices']} devices",
    )
    share = aggregate["keys"] != ["mean"]
    for key, value, error in zip(
        aggregate["keys"], aggregate["value"], aggregate["error"], strict=True
    ):
        if share:
            bar = "█" * max(0, min(40, round(value * 40)))
            table.add_row(key, f"{value:.1%}", f"{error:.1%}", bar)
        else:
            table.add_row(key, f"{value:.4g}", f"{error:.3g}", "")
    return table


@telemetry_app.command("show")
def telemetry_show(
    stream: Annotated[str, typer.Argument(help="RUNE/STREAM, as `telemetry streams` lists it.")],
    rollout: Annotated[str | None, typer.Option(help="Only a rollout's devices, per wave.")] = None,
    rune: Annotated[str | None, typer.Option(help="Only reports for NAME@VERSION.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Only devices with label k=v.")] = None,
    since: SinceOpt = "1h",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """A stream's fleet aggregate with its error bar (per wave with --rollout)."""
    query: list[tuple[str, str]] = [("since", since)]
    query += [(k, v) for k, v in (("rollout", rollout), ("rune", rune)) if v]
    query += [("label", item) for item in label or []]
    path = stream_path(stream, query)
    result = _call(server, token, lambda c: c.request("GET", path))
    if output is Output.json:
        _emit_json(result)
        return
    aggregate = result["aggregate"]
    out.print(_aggregate_table(f"{stream} (fleet)", aggregate))
    if result.get("waves"):
        out.print(waves_table(result))


def stream_path(stream: str, query: list[tuple[str, str]]) -> str:
    """The API path of a stream's aggregate; exit 2 for a name that is not RUNE/STREAM."""
    rune_part, sep, name = stream.partition("/")
    if not sep or not rune_part or not name or "/" in name:
        _fail(f"{stream!r} is not a stream; streams are RUNE/STREAM such as sine/sine_mean", 2)
    return f"/api/v1/telemetry/streams/{rune_part}/{name}?{urlencode(query)}"


def waves_table(answer: dict[str, Any]) -> Table | str:
    """A rollout's stream per wave: one row per wave, one column per key (value ± error)."""
    waves = answer.get("waves") or []
    keys = next((w["aggregate"]["keys"] for w in waves if w["aggregate"].get("value")), None)
    if keys is None:
        return f"{answer['stream']}: no report from the rollout's devices yet"
    share = keys != ["mean"]
    table = Table("wave", "devices", "reports", *keys, title=f"{answer['stream']} per wave")
    for wave in waves:
        aggregate = wave["aggregate"]
        cells = ["-"] * len(keys)
        if aggregate.get("value") is not None and aggregate["keys"] == keys:
            cells = [
                _cell(v, e, share)
                for v, e in zip(aggregate["value"], aggregate["error"], strict=True)
            ]
        table.add_row(
            str(wave["wave"]), str(aggregate["devices"]), str(aggregate["reports"]), *cells
        )
    return table


def _cell(value: float, error: float, share: bool) -> str:
    return f"{value:.1%} ± {error:.1%}" if share else f"{value:.4g} ± {error:.3g}"


@telemetry_app.command("ingest")
def telemetry_ingest(
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 2,
    mqtt_url: Annotated[
        str | None,
        typer.Option(envvar="FLEET_MQTT_URL", help="The broker (mqtt:// or mqtts://)."),
    ] = None,
    mqtt_ca: Annotated[Path | None, typer.Option(help="CA certificate for mqtts://.")] = None,
    mqtt_cert: Annotated[Path | None, typer.Option(help="Client certificate.")] = None,
    mqtt_key: Annotated[Path | None, typer.Option(help="The key of --mqtt-cert.")] = None,
    share_group: Annotated[
        str, typer.Option(help="The MQTT shared-subscription group the workers split reports in.")
    ] = "fleet-telemetry",
    client_id: Annotated[
        str, typer.Option(help="Prefix of the workers' MQTT client ids (one per worker).")
    ] = f"fleet-telemetry-{os.uname().nodename[:24]}",
    db_url: Annotated[
        str | None, typer.Option(envvar="FLEET_DB_URL", help="Database URL (default: config).")
    ] = None,
    directory: DirOpt = None,
) -> None:
    """Take devices' telemetry reports in: verify, de-duplicate and store them, in WORKERS
    processes sharing one MQTT subscription (run the controller with --no-telemetry-ingest)."""
    _need_controller_extra()
    from fleet.audit_log import AuditKeyError, load_audit_key
    from fleet.channel import BrokerSettings
    from fleet.fleetdir import FleetDir, FleetDirError

    try:
        fleet_dir = FleetDir.from_option(directory)
        config = fleet_dir.load_config()
        url = fleet_dir.db_url(db_url)
        audit_key = load_audit_key(fleet_dir, create=False)
    except (FleetDirError, AuditKeyError) as exc:
        _fail(str(exc), EXIT_INVALID)
    broker = mqtt_url or config.mqtt_url
    if not broker:
        _fail("name the broker: --mqtt-url (or mqtt_url in fleet.yaml)", EXIT_INVALID)
    settings = BrokerSettings(broker, mqtt_ca, mqtt_cert, mqtt_key, share_group)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker_main,
            args=(settings, url, f"{client_id}-{n}", audit_key),
            name=f"ingest-{n}",
        )
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    out.print(f"{workers} telemetry ingest worker(s) on {broker}, group {share_group}")
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(p.is_alive() for p in processes):
        time.sleep(0.2)
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    for process in processes:
        process.join(10)
    failed = [p.name for p in processes if p.exitcode not in (0, -signal.SIGTERM)]
    if failed and not stopping:
        _fail(f"worker(s) {', '.join(failed)} stopped; see their log lines above", EXIT_INVALID)


def _worker_main(settings: Any, db_url: str, client_id: str, audit_key: bytes) -> None:
    from fleet import logs
    from fleet.telemetry.consumer import run_worker_process

    logs.configure("info")
    asyncio.run(run_worker_process(settings, db_url, client_id, audit_key))
