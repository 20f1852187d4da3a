"""`fleetctl rollout`: create, list, watch, pause, resume, abort and roll back rollouts.

The REST contract is docs/rollouts-api.md; the operator's guide is docs/rollouts.md.

Rules:
- Everything that can be checked without the controller is checked before any request, with the
  messages of `fleet.rollout_plan` (the same the controller would give): the rune reference, the
  wave spec, durations, percentages, the rate, the option ranges, `--start-at`, and that the
  selection is given by exactly one of `--selector`/`--devices` (or both) or `--all`. A bad one
  is one `error:` line on stderr and exit 2 (the command line is wrong), and nothing is sent.
- Only the options given are sent; the controller applies its defaults (shown in `--help`).
- `-o json` prints the API's answer, one JSON object, and nothing else on stdout.
- Exit codes are `fleetctl`'s: 0 done; 1 the controller refused (400, 404, 409) or, for
  `status --watch`, the rollout ended aborted or rolled-back; 2 the command line is wrong; 4 the
  controller cannot be reached; 5 the token is missing or lacks the role; 130 interrupted
  (Ctrl-C while watching: the rollout goes on).
- `status --watch` polls every `WATCH_INTERVAL_S` and returns once the rollout's state is final
  (completed, aborted, rolled-back); devices still in flight at an abort or a rollback finish
  afterwards, which `status` shows. A controller that cannot be reached while watching (a
  restart) is retried, and the view says so.
- The rendering functions (`plan_table`, `rollouts_table`, `rollout_view` and their parts) take
  the API's JSON as is and never print, so they are tested without a controller.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.box import SIMPLE
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

rollout_app: typer.Typer = typer.Typer(
    help="Roll a rune out in waves with health gates: create, list, status, pause, resume, "
    "abort, rollback.",
    no_args_is_help=True,
)

# `fleet.cli` registers `rollout_app`, so it is defined above this import: either module may be
# imported first.
from fleet.cli import (  # noqa: E402
    EXIT_REFUSED,
    EXIT_UNAUTHORIZED,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    _call,
    _emit_json,
    _fail,
    _ref,
    err,
    out,
)
from fleet.client import (  # noqa: E402
    DEFAULT_SERVER,
    ApiClient,
    ApiClientError,
    ControllerUnreachable,
)
from fleet.rollout_plan import (  # noqa: E402
    DEFAULT_WAVES,
    Options,
    PlanError,
    WaveSpec,
    parse_duration,
    parse_percent,
    parse_rate,
)
from ota.targets import DEFAULT_ORG  # noqa: E402

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
WATCH_INTERVAL_S = 1.0
API = "/api/v1/rollouts"

DEVICE_STATES = (
    "pending",
    "notified",
    "downloading",
    "verifying",
    "installing",
    "health-check",
    "succeeded",
    "failed",
    "rolled-back",
    "timed-out",
    "skipped",
)
IN_FLIGHT_STATES = ("notified", "downloading", "verifying", "installing", "health-check")
FAILURE_STATES = ("failed", "rolled-back", "timed-out")
TERMINAL_STATES = ("succeeded", *FAILURE_STATES, "skipped")
FINAL_ROLLOUT_STATES = ("completed", "aborted", "rolled-back")

_STATE_STYLE = {
    "pending": "dim",
    "notified": "cyan",
    "downloading": "cyan",
    "verifying": "cyan",
    "installing": "cyan",
    "health-check": "cyan",
    "succeeded": "green",
    "failed": "red",
    "rolled-back": "red",
    "timed-out": "red",
    "skipped": "yellow",
}
_ROLLOUT_STYLE = {
    "scheduled": "blue",
    "running": "cyan",
    "paused": "yellow",
    "completed": "green",
    "aborted": "red",
    "rolled-back": "red",
}
# One character per segment of the bar, so the bar also reads without colour.
_BAR_SEGMENTS = (("succeeded", "█", "green"), ("failures", "▓", "red"), ("skipped", "▒", "yellow"))
_BAR_EMPTY = "░"
BAR_WIDTH = 24
PLAN_IDS_SHOWN = 8
TOP_REASONS = 5


class RolloutStateFilter(StrEnum):
    scheduled = "scheduled"
    running = "running"
    paused = "paused"
    completed = "completed"
    aborted = "aborted"
    rolled_back = "rolled-back"


class OnFailureChoice(StrEnum):
    pause = "pause"
    abort = "abort"
    rollback = "rollback"


# Rendering: pure functions of the API's JSON.


def format_eta(seconds: float | None) -> str:
    """`42s`, `12m 05s`, `3h 02m`, `2d 04h`; `-` when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def finished_count(counts: Mapping[str, int]) -> int:
    """Devices in a terminal state (succeeded, failed, rolled-back, timed-out, skipped)."""
    return sum(int(counts.get(state, 0)) for state in TERMINAL_STATES)


def failures_count(counts: Mapping[str, int]) -> int:
    return sum(int(counts.get(state, 0)) for state in FAILURE_STATES)


def progress_bar(counts: Mapping[str, int], size: int, width: int = BAR_WIDTH) -> Text:
    """A stacked bar of `width` cells: succeeded █, failed/rolled-back/timed-out ▓, skipped ▒,
    unfinished ░, followed by `finished/size`.

    A segment with at least one device gets at least one cell, so a single failure shows.
    """
    parts = {
        "succeeded": int(counts.get("succeeded", 0)),
        "failures": failures_count(counts),
        "skipped": int(counts.get("skipped", 0)),
    }
    finished = sum(parts.values())
    cells = {name: 0 for name in parts}
    if size > 0:
        for name, value in parts.items():
            if value:
                cells[name] = max(1, round(width * value / size))
        while sum(cells.values()) > width:  # rounding up small segments can overflow
            widest = max(cells, key=lambda name: cells[name])
            cells[widest] -= 1
        if finished >= size:  # a finished wave fills the bar whatever the rounding
            widest = max(cells, key=lambda name: cells[name])
            cells[widest] += width - sum(cells.values())
    bar = Text()
    for name, char, style in _BAR_SEGMENTS:
        bar.append(char * cells[name], style=style)
    bar.append(_BAR_EMPTY * (width - sum(cells.values())), style="dim")
    bar.append(f" {finished}/{size}")
    return bar


def counts_text(counts: Mapping[str, int]) -> Text:
    """The non-zero device states, in life-cycle order: `succeeded 3 · failed 1`; `-` if none."""
    text = Text()
    for state in DEVICE_STATES:
        value = int(counts.get(state, 0))
        if value:
            if text:
                text.append(" · ", style="dim")
            text.append(f"{state} {value}", style=_STATE_STYLE[state])
    return text if text else Text("-", style="dim")


def top_reasons(
    reasons: Mapping[str, int], top: int = TOP_REASONS
) -> tuple[list[tuple[str, int]], int, int]:
    """The `top` most frequent reasons (most first, then by text), and how many other reasons
    and devices are left out."""
    ordered = sorted(reasons.items(), key=lambda item: (-int(item[1]), item[0]))
    shown = [(reason, int(n)) for reason, n in ordered[:top]]
    rest = ordered[top:]
    return shown, len(rest), sum(int(n) for _, n in rest)


def reasons_table(reasons: Mapping[str, int], top: int = TOP_REASONS) -> Table | None:
    """Failure reasons grouped with their device counts, or None when there is none."""
    if not reasons:
        return None
    shown, other_reasons, other_devices = top_reasons(reasons, top)
    total = sum(int(n) for n in reasons.values())
    table = Table(
        "devices",
        "reason",
        title=f"failure reasons ({total} device{'s' if total != 1 else ''})",
        title_justify="left",
        box=None,
        padding=(0, 2, 0, 0),
    )
    table.columns[0].justify = "right"
    for reason, count in shown:
        table.add_row(str(count), Text(reason, style="red"))
    if other_reasons:
        table.add_row(
            str(other_devices),
            Text(f"… {other_reasons} other reason{'s' if other_reasons != 1 else ''}", "dim"),
        )
    return table


def wave_gate(wave: Mapping[str, Any]) -> Text:
    """What the wave's gate says: passed, tripped, waived (tripped, then resumed) or running."""
    if wave.get("waived"):
        return Text("waived", style="yellow")
    if wave.get("tripped_at"):
        return Text("tripped", style="bold red")
    if wave.get("passed_at"):
        return Text("passed", style="green")
    return Text("in progress", style="cyan")


def planned_targets(rollout: Mapping[str, Any]) -> list[str]:
    """The target of every planned wave (`1`, `10%`...), from the rollout's wave spec."""
    options = rollout.get("options") or {}
    try:
        return [str(t) for t in WaveSpec.parse(str(options.get("waves") or DEFAULT_WAVES)).targets]
    except PlanError:
        return []


def waves_table(rollout: Mapping[str, Any], bar_width: int = BAR_WIDTH) -> Table:
    """One row per wave: its target, a progress bar, counts by device state and its gate; waves
    not started yet are listed as such, and a last row totals the started ones."""
    table = Table("wave", "target", "progress", "%", "devices by state", "gate")
    table.columns[2].no_wrap = True
    table.columns[0].justify = "right"
    table.columns[3].justify = "right"
    waves = list(rollout.get("waves") or [])
    for wave in waves:
        size = int(wave.get("size", 0))
        counts = wave.get("counts") or {}
        done = finished_count(counts)
        percent = f"{100 * done // size}%" if size else "-"
        table.add_row(
            str(wave.get("wave", "?")),
            str(wave.get("target", "")),
            progress_bar(counts, size, bar_width),
            percent,
            counts_text(counts),
            wave_gate(wave),
        )
    targets = planned_targets(rollout)
    planned = int(rollout.get("waves_planned") or len(targets) or len(waves))
    for number in range(len(waves) + 1, planned + 1):
        target = targets[number - 1] if number <= len(targets) else ""
        table.add_row(str(number), target, Text("not started", style="dim"), "", "", "")
    if len(waves) > 1:
        counts = rollout.get("counts") or {}
        size = sum(int(w.get("size", 0)) for w in waves)
        done = finished_count(counts)
        table.add_section()
        table.add_row(
            "all",
            "",
            progress_bar(counts, size, bar_width),
            f"{100 * done // size}%" if size else "-",
            counts_text(counts),
            "",
        )
    return table


def rollout_header(rollout: Mapping[str, Any]) -> Text:
    """`rollout r-1 default/sine@0.1.0 running` and, on the next lines, the reason, the
    selection, waves started and the ETA (or when it finished)."""
    state = str(rollout.get("state", "?"))
    text = Text()
    text.append("rollout ", style="bold")
    text.append(str(rollout.get("id", "?")), style="bold")
    text.append(f"  {rollout.get('rune', '?')}  ")
    text.append(state, style=f"bold {_ROLLOUT_STYLE.get(state, 'white')}")
    if rollout.get("reason"):
        text.append(f"\nreason: {rollout['reason']}", style=_ROLLOUT_STYLE.get(state, "white"))
    started = len(rollout.get("waves") or [])
    planned = rollout.get("waves_planned") or started
    line = (
        f"\nselected {rollout.get('selected', '?')} devices · waves {started} of {planned} started"
    )
    if state in FINAL_ROLLOUT_STATES:
        line += f" · finished {_when(rollout.get('finished_at'))}"
    elif state == "scheduled":
        start_at = (rollout.get("options") or {}).get("start_at")
        line += f" · starts {_when(start_at) if start_at else 'at the next tick'}"
    else:
        eta = format_eta(rollout.get("eta_s"))
        line += f" · ETA {eta}" + (" (paused)" if state == "paused" else "")
    text.append(line)
    return text


def rollback_text(rollback: Mapping[str, int]) -> Text | None:
    """The rollback's progress (`rollback: done 3 · sent 1`), or None without a rollback."""
    if not rollback:
        return None
    text = Text("rollback: ", style="bold")
    order = ("pending", "sent", "done", "failed", "timed-out")
    styles = {"done": "green", "failed": "red", "timed-out": "red", "sent": "cyan"}
    items = sorted(rollback.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)
    for index, (state, count) in enumerate(items):
        if index:
            text.append(" · ", style="dim")
        text.append(f"{state} {count}", style=styles.get(state, "dim"))
    return text


def rollout_view(
    rollout: Mapping[str, Any],
    *,
    top: int = TOP_REASONS,
    note: str | None = None,
    bar_width: int = BAR_WIDTH,
) -> RenderableType:
    """The whole `rollout status` view of one rollout as the API returns it."""
    parts: list[RenderableType] = [rollout_header(rollout), waves_table(rollout, bar_width)]
    reasons = reasons_table(rollout.get("failure_reasons") or {}, top)
    if reasons is not None:
        parts.append(reasons)
    rollback = rollback_text(rollout.get("rollback") or {})
    if rollback is not None:
        parts.append(rollback)
    in_flight = sum(int((rollout.get("counts") or {}).get(s, 0)) for s in IN_FLIGHT_STATES)
    if rollout.get("state") in FINAL_ROLLOUT_STATES and in_flight:
        parts.append(
            Text(f"{in_flight} device(s) still in flight; they finish on their own", "yellow")
        )
    if note:
        parts.append(Text(note, style="yellow"))
    return Group(*parts)


def plan_table(plan: Sequence[Mapping[str, Any]], ids_shown: int = PLAN_IDS_SHOWN) -> Table:
    """The plan: per wave its target, its devices, the running total and, when few, their ids
    (else the first ones and how many more)."""
    table = Table("wave", "target", "devices", "total", "device ids")
    for column in table.columns[:4]:
        column.justify = "right"
    total = 0
    for wave in plan:
        devices = [str(d) for d in wave.get("devices") or []]
        total += len(devices)
        if len(devices) <= ids_shown:
            ids = ", ".join(devices) or "-"
        else:
            ids = ", ".join(devices[:3]) + f", … +{len(devices) - 3} more"
        table.add_row(
            str(wave.get("wave", "?")),
            str(wave.get("target", "")),
            str(len(devices)),
            str(total),
            ids,
        )
    return table


def rollouts_table(rollouts: Sequence[Mapping[str, Any]]) -> Table:
    """`rollout list`: one row per rollout, newest first as the API gives them: its state, waves
    started of planned, devices selected, succeeded, failed (failed, rolled-back or timed-out)
    and in flight."""
    table = Table(
        "id", "rune", "state", "waves", "devices", "ok", "failed", "active", "created", box=SIMPLE
    )
    for column in table.columns[:3]:
        column.no_wrap = True
    for r in rollouts:
        counts = r.get("counts") or {}
        state = str(r.get("state", "?"))
        in_flight = sum(int(counts.get(s, 0)) for s in IN_FLIGHT_STATES)
        table.add_row(
            str(r.get("id", "?")),
            str(r.get("rune", "?")),
            Text(state, style=_ROLLOUT_STYLE.get(state, "white")),
            f"{r.get('waves_started', 0)}/{r.get('waves_planned', '?')}",
            str(r.get("selected", "?")),
            str(counts.get("succeeded", 0)),
            str(failures_count(counts)),
            str(in_flight),
            _when(r.get("created_at"))[:16],
        )
    return table


def _when(value: object) -> str:
    """An ISO time from the API as `YYYY-MM-DD HH:MM:SS` (UTC), or `-`."""
    return str(value)[:19].replace("T", " ") if value else "-"


# Local validation.


def parse_items(values: Sequence[str] | None) -> list[str]:
    """Repeatable options that also take comma-separated lists: `a,b --x c` is a, b, c."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def parse_start_at(text: str, now: datetime | None = None) -> str:
    """`--start-at`: an ISO 8601 time (local time when it has no zone) or `+DURATION` from now,
    as ISO 8601 UTC (`2026-11-25T10:00:00Z`)."""
    now = now or datetime.now(UTC)
    if text.startswith("+"):
        when = now + timedelta(seconds=parse_duration(text[1:], "start-at"))
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise PlanError(
                f"--start-at {text!r} is neither a time such as 2026-11-25T10:00:00Z nor +10m"
            ) from None
        if when.tzinfo is None:
            when = when.astimezone()  # the operator's local time
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_create_body(
    ref: str,
    *,
    org: str,
    selector: Sequence[str] | None,
    devices: Sequence[str] | None,
    all_devices: bool,
    waves: str | None,
    soak: str | None,
    success: str | None,
    max_failures: str | None,
    min_executed: int | None,
    rate: str | None,
    device_timeout: str | None,
    retries: int | None,
    on_failure: str | None,
    start_at: str | None,
    dry_run: bool,
) -> dict[str, Any]:
    """The `POST /api/v1/rollouts` body, after every local check (`PlanError` saying why)."""
    from fleet.enrollment import parse_label_selector

    selector_items = parse_items(selector)
    device_ids = parse_items(devices)
    if all_devices and (selector_items or device_ids):
        raise PlanError("--all means every enrolled device: give it alone, or drop it")
    if not (all_devices or selector_items or device_ids):
        raise PlanError(
            "say which devices: --selector k=v[,k=v], --devices ID[,ID], or --all for every "
            "enrolled device"
        )
    try:
        labels = parse_label_selector(selector_items)
    except ValueError as exc:
        raise PlanError(f"--selector: {exc}") from None
    if waves is not None:
        WaveSpec.parse(waves)
    defaults = Options()
    Options(  # checks the ranges, with the messages the controller gives
        soak_s=parse_duration(soak, "soak") if soak is not None else defaults.soak_s,
        success_percent=(
            parse_percent(success, "success") if success is not None else defaults.success_percent
        ),
        max_failures_percent=(
            parse_percent(max_failures, "max-failures")
            if max_failures is not None
            else defaults.max_failures_percent
        ),
        min_executed=min_executed if min_executed is not None else defaults.min_executed,
        rate=parse_rate(rate) if rate is not None else defaults.rate,
        device_timeout_s=(
            parse_duration(device_timeout, "device-timeout")
            if device_timeout is not None
            else defaults.device_timeout_s
        ),
        retries=retries if retries is not None else defaults.retries,
    )
    body: dict[str, Any] = {"rune": ref, "org": org, "selector": labels}
    if device_ids:
        body["devices"] = device_ids
    given = {
        "waves": waves,
        "soak": soak,
        "success": success,
        "max_failures": max_failures,
        "min_executed": min_executed,
        "rate": rate,
        "device_timeout": device_timeout,
        "retries": retries,
        "on_failure": on_failure,
        "start_at": parse_start_at(start_at) if start_at is not None else None,
    }
    body.update({key: value for key, value in given.items() if value is not None})
    if dry_run:
        body["dry_run"] = True
    return body


# Commands.


IdArg = Annotated[str, typer.Argument(metavar="ID", help="The rollout's id (r-...).")]


def _path(rollout_id: str, action: str = "") -> str:
    return f"{API}/{quote(rollout_id, safe='')}" + (f"/{action}" if action else "")


@rollout_app.command("create")
def rollout_create(
    ref: Annotated[str, typer.Argument(metavar="NAME@VERSION", help="A published rune.")],
    selector: Annotated[
        list[str] | None,
        typer.Option("--selector", help="k=v[,k=v]: devices with all these labels (repeatable)."),
    ] = None,
    devices: Annotated[
        list[str] | None,
        typer.Option("--devices", help="ID[,ID]: only these devices (repeatable)."),
    ] = None,
    all_devices: Annotated[
        bool, typer.Option("--all", help="Every enrolled device (instead of a selection).")
    ] = False,
    waves: Annotated[
        str | None,
        typer.Option(help=f"Canary count, then cumulative percentages (default {DEFAULT_WAVES})."),
    ] = None,
    soak: Annotated[
        str | None, typer.Option(help="Wait after a wave passed (default 10m).")
    ] = None,
    success: Annotated[
        str | None, typer.Option(help="Succeeded share for a wave to pass (default 95%).")
    ] = None,
    max_failures: Annotated[
        str | None, typer.Option(help="Failed share that trips a wave (default 5%).")
    ] = None,
    min_executed: Annotated[
        int | None,
        typer.Option(help="Finished devices before a wave can trip (default 10).", min=0),
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Notifications per s, min or h (default 500/min).")
    ] = None,
    device_timeout: Annotated[
        str | None, typer.Option(help="Time a device has to finish (default 15m).")
    ] = None,
    retries: Annotated[
        int | None, typer.Option(help="Retries of a failed device (default 2).", min=0)
    ] = None,
    on_failure: Annotated[
        OnFailureChoice | None,
        typer.Option(help="When a wave trips: pause, abort or rollback (default pause)."),
    ] = None,
    start_at: Annotated[
        str | None,
        typer.Option(help="Start later: ISO 8601 time (local without a zone), or +DURATION."),
    ] = None,
    org: Annotated[str, typer.Option("--org", help="The rune's org.")] = DEFAULT_ORG,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; create nothing.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Create a rollout and print its id and plan (devices per wave as drawn now)."""
    _ref(ref)
    try:
        body = build_create_body(
            ref,
            org=org,
            selector=selector,
            devices=devices,
            all_devices=all_devices,
            waves=waves,
            soak=soak,
            success=success,
            max_failures=max_failures,
            min_executed=min_executed,
            rate=rate,
            device_timeout=device_timeout,
            retries=retries,
            on_failure=on_failure.value if on_failure else None,
            start_at=start_at,
            dry_run=dry_run,
        )
    except PlanError as exc:
        _fail(str(exc), EXIT_USAGE)
    result = _call(server, token, lambda c: c.request("POST", API, json_body=body))
    if output is Output.json:
        _emit_json(result)
        return
    plan = result.get("plan") or []
    if dry_run:
        out.print(
            f"dry run: {result.get('selected', '?')} device(s) selected for {ref} in "
            f"{len(plan)} wave(s); nothing was created",
            highlight=False,
        )
    else:
        out.print(
            f"rollout [bold]{result['id']}[/] created: {result.get('rune', ref)} to "
            f"{result.get('selected', '?')} device(s) in {len(plan)} wave(s), "
            f"{result.get('state', '?')}",
            highlight=False,
        )
    out.print(plan_table(plan))
    if not dry_run:
        out.print(
            "waves are drawn again from the selection when each starts; "
            f"follow it: fleetctl rollout status {result['id']} --watch",
            highlight=False,
        )


@rollout_app.command("list")
def rollout_list(
    state: Annotated[
        RolloutStateFilter | None, typer.Option("--state", help="Only rollouts in this state.")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """List rollouts, newest first: state, waves started, device counts."""
    params = {"state": state.value if state else None}
    result = _call(server, token, lambda c: c.request("GET", API, params=params))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(rollouts_table(result["rollouts"]))


def _exit_code(rollout: Mapping[str, Any]) -> int:
    return 0 if rollout.get("state") == "completed" else EXIT_REFUSED


@rollout_app.command("status")
def rollout_status(
    rollout_id: IdArg,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Refresh until the rollout is completed (exit 0), aborted or rolled-back (1).",
        ),
    ] = False,
    stream: Annotated[
        str | None,
        typer.Option(
            help="Also a telemetry stream (RUNE/STREAM) per wave: the canary against the rest."
        ),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Show a rollout: waves with progress bars, counts by state, failure reasons, ETA.

    With --watch, follow it live until it ends: exit 0 when completed, 1 when aborted or
    rolled back, 130 on Ctrl-C (the rollout goes on). With --stream, then the stream's
    aggregate per wave (reports of the rollout's rune since it started).
    """
    path = _path(rollout_id)
    rollout = _call(server, token, lambda c: c.request("GET", path))
    if watch:
        try:
            rollout = _watch(ApiClient(server, token), path, rollout, live=output is Output.text)
        except KeyboardInterrupt:
            err.print("stopped watching; the rollout goes on", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    telemetry = None
    if stream is not None:
        from fleet.telemetry_cli import stream_path

        telemetry_path = stream_path(stream, [("since", "366d"), ("rollout", rollout_id)])
        telemetry = _call(server, token, lambda c: c.request("GET", telemetry_path))
    if output is Output.json:
        _emit_json(rollout if telemetry is None else {**rollout, "telemetry": telemetry})
    else:
        if not watch:
            out.print(rollout_view(rollout, bar_width=_bar_width()))
        if telemetry is not None:
            from fleet.telemetry_cli import waves_table

            out.print(waves_table(telemetry))
    if watch:
        raise typer.Exit(_exit_code(rollout))


def _watch(client: ApiClient, path: str, rollout: Any, *, live: bool) -> Any:
    """Poll until the rollout's state is final; show it live when `live`. The last rollout."""
    from rich.live import Live

    def poll(current: Any) -> tuple[Any, str | None]:
        try:
            return client.request("GET", path), None
        except ControllerUnreachable:
            return current, f"cannot reach the controller at {client.server}; retrying"
        except ApiClientError as exc:
            _fail(str(exc), EXIT_UNAUTHORIZED if exc.status in (401, 403) else EXIT_REFUSED)

    if not live or not out.is_terminal:  # a log or a pipe gets the last view only
        while rollout.get("state") not in FINAL_ROLLOUT_STATES:
            time.sleep(WATCH_INTERVAL_S)
            rollout, _ = poll(rollout)
        if live:
            out.print(rollout_view(rollout, bar_width=_bar_width()))
        return rollout
    with Live(
        rollout_view(rollout, bar_width=_bar_width()), console=out, auto_refresh=False
    ) as view:
        while rollout.get("state") not in FINAL_ROLLOUT_STATES:
            time.sleep(WATCH_INTERVAL_S)
            rollout, note = poll(rollout)
            view.update(rollout_view(rollout, note=note, bar_width=_bar_width()), refresh=True)
    return rollout


def _bar_width() -> int:
    """Narrower bars on a narrow terminal, so the counts keep their room."""
    return max(8, min(BAR_WIDTH, out.width - 84))


def _action(rollout_id: str, action: str, server: str, token: str | None, output: Output) -> None:
    path = _path(rollout_id, action)
    result = _call(server, token, lambda c: c.request("POST", path))
    if output is Output.json:
        _emit_json(result)
        return
    reason = f" ({result['reason']})" if result.get("reason") else ""
    out.print(f"rollout {result['id']} is {result['state']}{reason}", highlight=False)


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: IdArg,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Pause a scheduled or running rollout: no new device is notified; in-flight ones finish."""
    _action(rollout_id, "pause", server, token, output)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: IdArg,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Resume a paused rollout, past every wave that tripped (they are waived)."""
    _action(rollout_id, "resume", server, token, output)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: IdArg,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Abort a rollout: pending devices are skipped (cancelled); in-flight ones finish."""
    _action(rollout_id, "abort", server, token, output)


@rollout_app.command("rollback")
def rollout_rollback(
    rollout_id: IdArg,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Roll back: every device the rollout notified returns to the rune it ran before."""
    _action(rollout_id, "rollback", server, token, output)
