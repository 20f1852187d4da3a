"""`fleetctl attestation reference ...`, `fleetctl devices attest` and `devices release`.

Rules:
- `reference add --agent-version V --from PATH` measures a release (a wheel or a directory holding
  the agent packages) here, with the same manifest the agents use (`attestation.manifest`), and
  registers its digest; `--sha256` registers a digest measured elsewhere. `--config PATH=VALUE`
  registers a constraint on a setting (VALUE is JSON: `false`, `3`, `"random"`).
- `devices attest ID` sends the `attest` command; with `--wait` it follows it and prints the
  result's status and reasons, exiting 1 unless the device attested `affirming`.
- A release that cannot be measured, or a bad constraint, fails before any request (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from attestation.manifest import ManifestError, manifest_of_release

attestation_app: typer.Typer = typer.Typer(
    help="Device attestation: the reference values evidence is appraised against.",
    no_args_is_help=True,
)
reference_app = typer.Typer(
    help="Reference values: agent releases (code digests) and config constraints.",
    no_args_is_help=True,
)
attestation_app.add_typer(reference_app, name="reference")

# `fleet.cli` registers these commands, so the apps are defined above this import.
from fleet.cli import (  # noqa: E402
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    _call,
    _emit_json,
    _fail,
    _follow_command,
    attestation_cell,
    devices_app,
    out,
)
from fleet.client import DEFAULT_SERVER  # noqa: E402

EXIT_USAGE = 2
REFERENCES = "/api/v1/attestation/references"


@reference_app.command("add")
def reference_add(
    agent_version: Annotated[
        str | None,
        typer.Option(
            "--agent-version", help="The agent version the release is (with --from or --sha256)."
        ),
    ] = None,
    release: Annotated[
        Path | None,
        typer.Option("--from", help="A wheel (.whl) or a directory holding the agent packages."),
    ] = None,
    sha256: Annotated[
        str | None,
        typer.Option("--sha256", help="The release's manifest digest, measured elsewhere."),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="A constraint PATH=VALUE (VALUE in JSON), like policy.allow_downgrade=false.",
        ),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Register a reference value: an agent release, or a config constraint."""
    body = _reference_body(agent_version, release, sha256, config)
    row = _call(server, token, lambda c: c.request("POST", REFERENCES, json_body=body))
    if output is Output.json:
        _emit_json(row)
        return
    out.print(
        f"reference {row['id']}: {row['kind']} {row['name']} = {row['value']}", highlight=False
    )


def _reference_body(
    agent_version: str | None, release: Path | None, sha256: str | None, config: str | None
) -> dict[str, Any]:
    if config is not None:
        if agent_version or release or sha256:
            _fail(
                "--config is a constraint of its own; add an agent release separately", EXIT_USAGE
            )
        path, sep, text = config.partition("=")
        if not sep or not path:
            _fail(f"--config {config!r} is not PATH=VALUE", EXIT_USAGE)
        try:
            value = json.loads(text)
        except ValueError:
            _fail(f'--config {path}: {text!r} is not JSON (false, 3, "random")', EXIT_USAGE)
        return {"kind": "config", "name": path, "value": value, "source": "fleetctl"}
    if not agent_version or (release is None) == (sha256 is None):
        _fail(
            "give --agent-version and one of --from PATH or --sha256 DIGEST (or --config)",
            EXIT_USAGE,
        )
    if release is not None:
        try:
            digest = manifest_of_release(release).sha256
        except ManifestError as exc:
            _fail(str(exc), EXIT_USAGE)
        return {
            "kind": "agent",
            "name": agent_version,
            "value": digest,
            "source": f"release {release.name}",
        }
    return {"kind": "agent", "name": agent_version, "value": sha256, "source": "fleetctl --sha256"}


@reference_app.command("list")
def reference_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """List the reference values."""
    result = _call(server, token, lambda c: c.request("GET", REFERENCES))
    if output is Output.json:
        _emit_json(result)
        return
    table = Table("id", "kind", "name", "value", "source", "by")
    for row in result["references"]:
        table.add_row(
            str(row["id"]),
            row["kind"],
            row["name"],
            json.dumps(row["value"]) if row["kind"] == "config" else row["value"],
            row["source"],
            row["created_by"],
        )
    out.print(table)


@reference_app.command("remove")
def reference_remove(
    reference_id: Annotated[int, typer.Argument(metavar="ID", help="The reference's id.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Remove a reference value (devices that matched only it then attest warning or worse)."""
    row = _call(server, token, lambda c: c.request("DELETE", f"{REFERENCES}/{reference_id}"))
    if output is Output.json:
        _emit_json(row)
        return
    out.print(f"reference {row['id']} removed", highlight=False)


@devices_app.command("attest")
def devices_attest(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id.")],
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow it until the device attested.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Ask a device to attest now (the `attest` command).

    Exit 0 when sent (with --wait: when the device attested affirming), 1 otherwise.
    """
    path = f"/api/v1/devices/{quote(device_id, safe='')}/commands"
    command = _call(server, token, lambda c: c.request("POST", path, json_body={"type": "attest"}))
    if wait:
        command = _follow_command(server, token, command, output)
    device = _call(
        server, token, lambda c: c.request("GET", f"/api/v1/devices/{quote(device_id, safe='')}")
    )
    if output is Output.json:
        _emit_json({"command": command, "device": device})
    else:
        out.print(f"command {command['id']}: {command['state']}", highlight=False)
        if wait:
            out.print(f"attestation: {attestation_cell(device)}")
            for reason in (device.get("attestation") or {}).get("reasons", []):
                out.print(f"  {reason}", highlight=False)
    if wait and not (command["state"] == "done" and command["reason"] == "affirming"):
        raise typer.Exit(1)


@devices_app.command("release")
def devices_release(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Release a quarantined device (admin); it still needs to attest clean for rollouts."""
    path = f"/api/v1/devices/{quote(device_id, safe='')}/release"
    device = _call(server, token, lambda c: c.request("POST", path))
    if output is Output.json:
        _emit_json(device)
        return
    out.print(f"device {device['id']} released from quarantine", highlight=False)
