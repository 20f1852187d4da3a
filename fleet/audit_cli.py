"""`fleetctl audit [--since] [--action] [--actor] [--limit] [--verify]`: read the audit log, and
check its hash chain.

Rules: both read the API (`/api/v1/audit`, operators). The list is a table, oldest first (the
newest `--limit` records); `-o json` prints the records as the API gives them. `--verify` asks
the controller to walk the whole chain and prints every break it found; it exits 1 when the chain
is broken (a record edited, deleted or re-ordered), 0 when it is intact.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from fleet.cli import (
    EXIT_REFUSED,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    _call,
    _emit_json,
    out,
)
from fleet.client import DEFAULT_SERVER


def audit(
    since: Annotated[
        str | None, typer.Option(help="Only records this recent (1h, 30m, 7d).")
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(help="Only actions starting with this ('security.', 'POST /api/v1/tokens')."),
    ] = None,
    actor: Annotated[
        str | None, typer.Option(help="Only this actor ('NAME (role)', 'device:ID').")
    ] = None,
    limit: Annotated[int, typer.Option(help="The newest N records.", min=1, max=5000)] = 100,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check the hash chain instead of listing records.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """The audit log: who changed what, when, with what outcome, and every security event."""
    if verify:
        _verify(server, token, output)
        return
    params: dict[str, Any] = {"limit": limit}
    for name, value in (("since", since), ("action", action), ("actor", actor)):
        if value:
            params[name] = value
    result = _call(server, token, lambda c: c.request("GET", "/api/v1/audit", params=params))
    if output is Output.json:
        _emit_json(result)
        return
    if not result["records"]:
        out.print("no audit records match")
        return
    table = Table("seq", "when (UTC)", "who", "what", "target", "outcome")
    for record in result["records"]:
        details = record["details"]
        outcome = record["outcome"]
        if "status" in details:
            outcome = f"{outcome} {details['status']}"
        if "error" in details:
            outcome = f"{outcome}: {details['error'][:80]}"
        table.add_row(
            str(record["seq"]),
            record["at"][:19].replace("T", " "),
            record["actor"],
            record["action"],
            record["target"],
            outcome,
        )
    out.print(table)


def _verify(server: str, token: str | None, output: Output) -> None:
    result = _call(server, token, lambda c: c.request("GET", "/api/v1/audit/verify"))
    if output is Output.json:
        _emit_json(result)
    elif result["intact"]:
        head = result["head"]
        out.print(
            f"audit log intact: {result['records']} records, head {head['seq']} "
            f"{head['hash'][:16]}",
            highlight=False,
        )
    else:
        out.print(f"[red]audit log BROKEN[/red]: {len(result['breaks'])} problem(s)")
        for item in result["breaks"]:
            out.print(f"  record {item['seq']}: {item['problem']}", highlight=False)
    if result.get("dropped"):
        out.print(f"{result['dropped']} entries were dropped (the buffer was full)")
    if not result["intact"]:
        raise typer.Exit(EXIT_REFUSED)
