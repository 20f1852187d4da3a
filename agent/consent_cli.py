"""`fleet-agent consent`: the device owner opts in to telemetry streams, or out, on the device.

Streams are named `RUNE/STREAM` (`sine/sine_mean`); `list` shows the ones the installed runes
declare, with what each costs in privacy and what it has spent. Nothing is granted by default,
and the controller cannot grant anything (`agent.telemetry.consent`).
Exit codes: 0 done; 2 not a stream name or a bad budget; 5 the consent or budget file is
unusable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from agent.telemetry.budget import BudgetError, BudgetLedger
from agent.telemetry.consent import ConsentError, ConsentStore, check_stream_id
from ota.rune.bundle import BundleError, is_bundle, read_bundle
from ota.rune.streams import StreamSpec

EXIT_USAGE = 2
EXIT_STATE = 5

consent_app = typer.Typer(
    help="Opt in to (or out of) telemetry streams: noisy aggregates of the rune's outputs.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

StateDirOpt = Annotated[
    Path,
    typer.Option(
        "--state-dir", envvar="FLEET_AGENT_STATE_DIR", help="The agent's state directory."
    ),
]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="text, or json for scripts.")]
DEFAULT_STATE_DIR = Path("fleet-agent-state")


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def declared_streams(state_dir: Path) -> dict[str, StreamSpec]:
    """The streams the runes in the slots declare, by stream id (the active rune's first)."""
    from agent.slots import SlotError, Slots

    streams: dict[str, StreamSpec] = {}
    try:
        slots = Slots(state_dir)
        state = slots.state()
        refs = [ref for ref in (state.active, state.previous) if ref is not None]
        for ref in refs:
            data = slots.contents(ref.slot)
            if not is_bundle(data):
                continue
            manifest = read_bundle(data).manifest
            for spec in manifest.streams:
                streams.setdefault(f"{manifest.name}/{spec.name}", spec)
    except (SlotError, BundleError):
        pass
    return streams


def _describe(spec: StreamSpec) -> str:
    what = {"labels": "share of each label", "histogram": "share per bin", "mean": "clamped mean"}
    return f"{what[spec.kind.value]} of {spec.value}, {', '.join(spec.keys)}"


@consent_app.command("list")
def list_streams(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    output: OutputOpt = "text",
) -> None:
    """The streams the installed runes declare and the ones granted, with their privacy cost."""
    try:
        grants = ConsentStore(state_dir).grants()
        ledger = BudgetLedger(state_dir)
    except (ConsentError, BudgetError) as exc:
        _fail(str(exc), EXIT_STATE)
    declared = declared_streams(state_dir)
    now = time.time()
    rows: list[dict[str, Any]] = []
    for stream in sorted(set(declared) | set(grants)):
        spec, grant = declared.get(stream), grants.get(stream)
        row: dict[str, Any] = {
            "stream": stream,
            "granted": grant is not None,
            "granted_at": grant.at if grant else None,
            "declared": spec is not None,
        }
        if spec is not None:
            budget = spec.budget
            if grant is not None and grant.budget is not None:
                budget = min(spec.budget, grant.budget)
            spent = ledger.spent(stream, spec.period_s, now)
            row |= {
                "kind": spec.kind.value,
                "what": _describe(spec),
                "epsilon_per_report": spec.epsilon,
                "mechanism": spec.mechanism.value,
                "budget": budget,
                "period_s": spec.period_s,
                "spent": spent.epsilon,
                "reports_this_period": spent.reports,
            }
        rows.append(row)
    if output == "json":
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        out.print("no rune installed here declares a telemetry stream, and none is granted")
        return
    table = Table("stream", "granted", "what", "epsilon / report", "spent / budget per period")
    for row in rows:
        granted = "[green]yes[/]" if row["granted"] else "no"
        if not row["declared"]:
            table.add_row(row["stream"], granted, "(not declared by an installed rune)", "", "")
            continue
        period = f"{row['period_s'] / 3600:g} h"
        table.add_row(
            row["stream"],
            granted,
            row["what"],
            f"{row['epsilon_per_report']:g} ({row['mechanism']})",
            f"{row['spent']:g} / {row['budget']:g} per {period}",
        )
    out.print(table)


@consent_app.command()
def grant(
    streams: Annotated[
        list[str], typer.Argument(help="RUNE/STREAM names, as `consent list` shows them.")
    ],
    budget: Annotated[
        float | None,
        typer.Option(help="Spend at most this epsilon per period (below the rune's own budget)."),
    ] = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """Let the agent send each STREAM's noisy aggregate, from the next report on."""
    try:
        for stream in streams:
            check_stream_id(stream)
        if budget is not None and not budget > 0:
            raise ConsentError(f"--budget must be a positive epsilon, not {budget:g}")
    except ConsentError as exc:
        _fail(str(exc), EXIT_USAGE)
    try:
        ConsentStore(state_dir).grant_all(streams, time.time(), budget)
    except ConsentError as exc:
        _fail(str(exc), EXIT_STATE)
    declared = declared_streams(state_dir)
    for stream in streams:
        spec = declared.get(stream)
        if spec is None:
            out.print(
                f"granted {stream}; no installed rune declares it yet, so nothing is sent until "
                "one does",
                highlight=False,
            )
            continue
        cap = spec.budget if budget is None else min(budget, spec.budget)
        out.print(
            f"granted {stream}: the {_describe(spec)}, with {spec.mechanism.value} noise for "
            f"epsilon {spec.epsilon:g} per report and at most {cap:g} per "
            f"{spec.period_s / 3600:g} h",
            highlight=False,
        )


@consent_app.command()
def revoke(
    streams: Annotated[list[str], typer.Argument(help="RUNE/STREAM names.")],
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """Stop sending each STREAM, from the next report on."""
    try:
        for stream in streams:
            check_stream_id(stream)
    except ConsentError as exc:
        _fail(str(exc), EXIT_USAGE)
    try:
        revoked = ConsentStore(state_dir).revoke_all(streams)
    except ConsentError as exc:
        _fail(str(exc), EXIT_STATE)
    for stream in streams:
        was = stream in revoked
        out.print(f"revoked {stream}" if was else f"{stream} was not granted; nothing changed")
