"""`fleetctl`: the operator's tool: create and serve a fleet, publish runes, manage keys and access.

Exit codes: 0 done; 1 the controller refused or failed the request; 2 the command line is wrong;
3 a local file is invalid (rune, key, fleet dir); 4 the controller cannot be reached; 5 the API
token is missing, unknown or lacks the role. Errors are one clear line on stderr, never a
traceback. Every command that prints takes `-o json` for scripts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Table
from urllib3 import encode_multipart_formdata

from fleet.client import DEFAULT_SERVER, ApiClient, ApiClientError, ControllerUnreachable
from ota.targets import DEFAULT_ORG, TargetNameError, parse_rune_ref

EXIT_REFUSED = 1
EXIT_INVALID = 3
EXIT_UNREACHABLE = 4
EXIT_UNAUTHORIZED = 5

out = Console()
err = Console(stderr=True)

app = typer.Typer(
    name="fleetctl",
    help="Operate a Fleet: create and serve it, publish runes, manage keys and access.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
runes_app = typer.Typer(help="Publish, list, show and revoke runes.", no_args_is_help=True)
keys_app = typer.Typer(help="The fleet's TUF keys: status, root, rotation.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens for people and scripts.", no_args_is_help=True)
devices_app = typer.Typer(
    help="Devices: list, show, approve or reject enrollments, label, remove.",
    no_args_is_help=True,
)
enroll_tokens_app = typer.Typer(
    help="Enrollment tokens: pre-authorize devices to enroll without approval.",
    no_args_is_help=True,
)
app.add_typer(runes_app, name="runes")
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="api-tokens")
app.add_typer(devices_app, name="devices")
app.add_typer(enroll_tokens_app, name="tokens")


class Output(StrEnum):
    text = "text"
    json = "json"


ServerOpt = Annotated[
    str, typer.Option("--server", envvar="FLEET_SERVER", help="The controller's URL.")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="FLEET_TOKEN", help="API token.", show_default=False)
]
OutputOpt = Annotated[Output, typer.Option("-o", "--output", help="text, or json for scripts.")]
DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", help="The fleet directory (default: $FLEET_DIR or ./fleet)."),
]
OrgOpt = Annotated[str, typer.Option("--org", help="The publishing organisation.")]


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def _call(server: str, token: str | None, action: Callable[[ApiClient], Any]) -> Any:
    client = ApiClient(server, token)
    try:
        return action(client)
    except ControllerUnreachable as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except ApiClientError as exc:
        code = EXIT_UNAUTHORIZED if exc.status in (401, 403) else EXIT_REFUSED
        _fail(str(exc), code)


def _need_controller_extra() -> None:
    import importlib.util

    missing = [m for m in ("aiohttp", "tortoise") if importlib.util.find_spec(m) is None]
    if missing:
        _fail(
            "this command runs the controller, which needs its extra: "
            "pip install 'fleet-tinyml[controller]'",
            2,
        )


def _emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _ref(ref: str) -> tuple[str, str]:
    try:
        return parse_rune_ref(ref)
    except TargetNameError as exc:
        _fail(str(exc), 2)


@app.command()
def version() -> None:
    """Print the installed Fleet version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("fleet-tinyml"))


@app.command()
def init(
    directory: DirOpt = None,
    root_keys: Annotated[int, typer.Option(help="How many offline root keys (n).")] = 3,
    root_threshold: Annotated[
        int, typer.Option(help="How many root keys must sign a root change (k).")
    ] = 2,
    db_url: Annotated[
        str | None,
        typer.Option(envvar="FLEET_DB_URL", help="Database URL (default: SQLite in the dir)."),
    ] = None,
    name: Annotated[str, typer.Option(help="A name for this fleet.")] = "fleet",
    output: OutputOpt = Output.text,
) -> None:
    """Create a fleet: root and online keys, the first TUF metadata, an admin API token."""
    _need_controller_extra()
    from attestation.keys import KeyFileError
    from fleet.db import DatabaseError
    from fleet.fleetdir import FleetDir, FleetDirError
    from fleet.init import create_fleet

    fleet_dir = FleetDir.from_option(directory)
    try:
        result = asyncio.run(
            create_fleet(
                fleet_dir,
                root_keys=root_keys,
                root_threshold=root_threshold,
                db_url=db_url,
                name=name,
            )
        )
    except (FleetDirError, KeyFileError, DatabaseError) as exc:
        _fail(str(exc), EXIT_INVALID)
    if output is Output.json:
        _emit_json(
            {
                "fleet_dir": str(result.fleet_dir),
                "config": str(result.config_file),
                "root": str(result.root_json),
                "offline_root_keys": [str(p) for p in result.offline_keys],
                "root_threshold": result.root_threshold,
                "online_keys": {role: str(p) for role, p in result.online_keys.items()},
                "database": result.db_url,
                "admin_token": result.admin_token,
            }
        )
        return
    out.print(f"[bold green]created fleet[/] in {result.fleet_dir}")
    out.print(f"  config        {result.config_file}")
    out.print(f"  device root   {result.root_json}  (provision devices with this file)")
    for role, path in result.online_keys.items():
        out.print(f"  {role:<13} {path}")
    out.print(
        f"\n[bold yellow]warning:[/] the {len(result.offline_keys)} root keys "
        f"({result.root_threshold} needed to sign) are in {result.offline_keys[0].parent}. "
        "Move them off this machine, to separate offline media, now. Anyone holding "
        f"{result.root_threshold} of them controls every device in the fleet.",
        soft_wrap=True,
    )
    out.print(
        f"\nadmin API token (shown once, stored hashed): [bold]{result.admin_token}[/]",
        soft_wrap=True,
    )
    out.print(f"next: fleetctl serve --dir {result.fleet_dir}")


@app.command()
def serve(
    directory: DirOpt = None,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT to listen on (default: from fleet.yaml).")
    ] = None,
    db_url: Annotated[
        str | None, typer.Option(envvar="FLEET_DB_URL", help="Database URL (default: config).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    mqtt_url: Annotated[
        str | None,
        typer.Option(
            envvar="FLEET_MQTT_URL",
            help="An external broker (mqtt:// or mqtts://, credentials in the URL). "
            "Default: the embedded broker.",
        ),
    ] = None,
    mqtt_listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of the embedded broker (default: fleet.yaml, 1884)."),
    ] = None,
    mqtt_ca: Annotated[
        Path | None,
        typer.Option(
            help="The CA certificate that the mqtts:// broker's certificate must chain to."
        ),
    ] = None,
    mqtt_cert: Annotated[
        Path | None, typer.Option(help="The controller's client certificate (CN fleet-controller).")
    ] = None,
    mqtt_key: Annotated[Path | None, typer.Option(help="The key of --mqtt-cert.")] = None,
    mqtt_share_group: Annotated[
        str | None,
        typer.Option(help="Consume device topics as this MQTT 5 shared-subscription group."),
    ] = None,
    telemetry_ingest: Annotated[
        bool,
        typer.Option(
            help="Take devices' telemetry reports in this process; --no-telemetry-ingest when "
            "`fleetctl telemetry ingest` workers take them."
        ),
    ] = True,
    telemetry_retention: Annotated[
        str, typer.Option(help="Keep telemetry reports this long (30d, 12h...).")
    ] = "30d",
) -> None:
    """Run the controller: the API, the signed repository, the renewal schedule, and the link
    to the MQTT broker (an embedded one unless --mqtt-url names another)."""
    _need_controller_extra()
    from attestation.keys import KeyFileError
    from fleet import logs
    from fleet.broker import BrokerError
    from fleet.db import DatabaseError
    from fleet.fleetdir import FleetDir, FleetDirError
    from fleet.rollout_plan import parse_duration
    from fleet.server import MqttOptions
    from fleet.server import serve as run_server
    from fleet.telemetry.service import TelemetryOptions
    from ota.repository import RepositoryError

    logs.configure(log_level)
    mqtt = MqttOptions(mqtt_url, mqtt_listen, mqtt_ca, mqtt_cert, mqtt_key, mqtt_share_group)
    try:
        retention = parse_duration(telemetry_retention, "telemetry-retention")
        telemetry = TelemetryOptions(telemetry_ingest, retention)
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        asyncio.run(run_server(FleetDir.from_option(directory), listen, db_url, mqtt, telemetry))
    except BrokerError as exc:
        _fail(str(exc), EXIT_REFUSED)
    except ValueError as exc:
        _fail(str(exc), 2)
    except (FleetDirError, KeyFileError, DatabaseError, RepositoryError) as exc:
        _fail(str(exc), EXIT_INVALID)
    except OSError as exc:
        _fail(f"cannot listen: {exc.strerror or exc}", EXIT_REFUSED)


@app.command()
def demo(
    devices: Annotated[int, typer.Option(help="How many agents to start.", min=1, max=50)] = 5,
    keep: Annotated[
        bool, typer.Option(help="Keep the fleet running and print its address and token.")
    ] = False,
    output: OutputOpt = Output.text,
) -> None:
    """Run a whole fleet on this machine: a controller with its embedded broker, N agents that
    enroll, and a signed rollout of the example rune to all of them (a canary, then the rest).
    Exit 0 when the rollout completed and every device verified, installed and runs it."""
    _need_controller_extra()
    from fleet.demo import run

    raise typer.Exit(run(out, devices, keep, output is Output.json))


# Runes.


def _rune_table(runes: list[dict[str, Any]]) -> Table:
    table = Table("org", "rune", "kind", "capabilities", "size", "sha256", "state")
    for r in runes:
        state = "[red]revoked[/]" if r["state"] == "revoked" else "published"
        table.add_row(
            r["org"],
            r["ref"],
            r["kind"],
            ",".join(r["capabilities"]) or "-",
            f"{r['size']:,}",
            r["sha256"][:12],
            state,
        )
    return table


@runes_app.command("push")
def runes_push(
    file: Annotated[Path, typer.Argument(help="A .runebundle or legacy .rune file.")],
    org: OrgOpt = DEFAULT_ORG,
    name: Annotated[str | None, typer.Option(help="Name (required for a legacy .rune).")] = None,
    rune_version: Annotated[
        str | None, typer.Option("--version", help="Version (required for a legacy .rune).")
    ] = None,
    min_agent_version: Annotated[
        str | None, typer.Option(help="Oldest agent that may install it.")
    ] = None,
    attestation: Annotated[
        Path | None,
        typer.Option(
            "--attestation",
            help="Its signed in-toto statement (FILE.intoto.jsonl from `rune sign`).",
        ),
    ] = None,
    sigstore_bundle: Annotated[
        Path | None,
        typer.Option("--sigstore-bundle", help="Its Sigstore bundle (FILE.sigstore)."),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Upload a rune and its provenance; the controller checks both against the org's admission
    policy and publishes them as signed targets."""
    data = _read_file(file)
    provenance = {
        part: _read_file(path)
        for part, path in (("attestation", attestation), ("sigstore_bundle", sigstore_bundle))
        if path is not None
    }
    params = {
        "org": org,
        "name": name,
        "version": rune_version,
        "min_agent_version": min_agent_version,
    }
    body, content_type = data, "application/octet-stream"
    if provenance:
        fields = {"rune": (file.name, data, "application/octet-stream")}
        fields |= {
            part: (part, content, "application/json") for part, content in provenance.items()
        }
        body, content_type = encode_multipart_formdata(fields)
    result = _call(
        server,
        token,
        lambda c: c.request(
            "POST", "/api/v1/runes", body=body, params=params, content_type=content_type
        ),
    )
    if output is Output.json:
        _emit_json(result)
        return
    verb = "published" if result["created"] else "already published (same bytes)"
    out.print(f"{result['ref']} {verb} as [bold]{result['target']}[/]  sha256 {result['sha256']}")
    if result.get("provenance"):
        out.print(f"provenance: {result['provenance']['verified']}", highlight=False)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_INVALID)


@runes_app.command("list")
def runes_list(
    org: Annotated[str | None, typer.Option("--org", help="Only this org.")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """List rune versions and whether each is published or revoked."""
    result = _call(server, token, lambda c: c.request("GET", "/api/v1/runes", params={"org": org}))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(_rune_table(result["runes"]))


@runes_app.command("show")
def runes_show(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    org: OrgOpt = DEFAULT_ORG,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Show one rune version: its target, digest, capabilities and contents."""
    name, ver = _ref(ref)
    result = _call(server, token, lambda c: c.request("GET", f"/api/v1/runes/{org}/{name}/{ver}"))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(_rune_table([result]))
    description = result.get("description") or {}
    for what in ("capabilities", "models", "blocks", "outputs"):
        items = description.get(what) or []
        if items:
            out.print(f"[bold]{what}[/]: " + ", ".join(str(i.get("stage") or i) for i in items))
    provenance = result.get("provenance")
    if provenance:
        out.print(
            f"[bold]provenance[/]: {provenance['kind']}, {provenance['verified']} "
            f"(target {provenance['target']})",
            highlight=False,
        )
    else:
        out.print("[bold]provenance[/]: none")


@runes_app.command("revoke")
def runes_revoke(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    org: OrgOpt = DEFAULT_ORG,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Revoke a rune version: agents refuse to install it and stop running it."""
    name, ver = _ref(ref)
    result = _call(
        server, token, lambda c: c.request("DELETE", f"/api/v1/runes/{org}/{name}/{ver}")
    )
    if output is Output.json:
        _emit_json(result)
        return
    out.print(f"{result['ref']} revoked; its target {result['target']} is no longer published")


# Keys.


@keys_app.command("status")
def keys_status(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Show each TUF role's version, keys, threshold and expiry."""
    result = _call(server, token, lambda c: c.request("GET", "/api/v1/keys"))
    if output is Output.json:
        _emit_json(result)
        return
    table = Table("role", "version", "expires", "threshold", "key ids")
    for role, info in result["roles"].items():
        table.add_row(
            role,
            str(info["version"]),
            info["expires"],
            f"{info['threshold']} of {len(info['keyids'])}",
            " ".join(k[:12] for k in info["keyids"]),
        )
    out.print(table)


@keys_app.command("root")
def keys_root(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Print the current root.json, to provision devices with."""
    data = _call(server, token, lambda c: c.request("GET", "/api/v1/keys/root.json"))
    typer.echo(json.dumps(data, indent=1, sort_keys=True))


@keys_app.command("generate")
def keys_generate(
    path: Annotated[Path, typer.Argument(help="Where to write the new Ed25519 key (0600).")],
) -> None:
    """Make a new root key file, for `keys rotate root --new-root-key`."""
    from attestation.keys import KeyFileError, generate_key_file, public_key_of

    try:
        signer = generate_key_file(path)
    except (KeyFileError, OSError) as exc:
        _fail(str(exc), EXIT_INVALID)
    out.print(f"wrote {path} (key id {public_key_of(signer).keyid})")


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[str, typer.Argument(help="targets, snapshot, timestamp, root or command.")],
    root_key: Annotated[
        list[Path] | None,
        typer.Option("--root-key", help="A current offline root key file (repeat for k of n)."),
    ] = None,
    new_root_key: Annotated[
        list[Path] | None,
        typer.Option("--new-root-key", help="For `root`: the new set of root key files."),
    ] = None,
    root_threshold: Annotated[
        int | None, typer.Option(help="For `root`: how many new root keys must sign.")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Rotate a key. Online roles and the root need the offline root keys to sign the new root."""
    from fleet.rotation import RotationError, rotate

    try:
        result = _call(
            server,
            token,
            lambda c: rotate(
                c, role, list(root_key or []), list(new_root_key or []), root_threshold
            ),
        )
    except RotationError as exc:
        _fail(str(exc), EXIT_INVALID)
    if output is Output.json:
        _emit_json(result)
        return
    if role == "command":
        out.print(f"command key rotated (key id {result['keyid'][:12]}); devices learn it via TUF")
    else:
        out.print(f"{role} key rotated: root is now version {result['root_version']}")


# API tokens.


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="Who or what the token is for.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Create an API token; it is shown once."""
    body = {"name": name, "role": role}
    result = _call(server, token, lambda c: c.request("POST", "/api/v1/tokens", json_body=body))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(f"token {result['id']} ({result['role']}) for {result['name']}: {result['token']}")


@tokens_app.command("list")
def tokens_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """List API tokens (their names and roles, never the tokens)."""
    result = _call(server, token, lambda c: c.request("GET", "/api/v1/tokens"))
    if output is Output.json:
        _emit_json(result)
        return
    table = Table("id", "name", "role", "created", "last used", "state")
    for t in result["tokens"]:
        table.add_row(
            str(t["id"]),
            t["name"],
            t["role"],
            t["created_at"] or "-",
            t["last_used_at"] or "-",
            "revoked" if t["revoked"] else "active",
        )
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[int, typer.Argument(help="The token's id (from `api-tokens list`).")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Revoke an API token."""
    _call(server, token, lambda c: c.request("DELETE", f"/api/v1/tokens/{token_id}"))
    out.print(f"token {token_id} revoked")


# Devices.


@devices_app.command("register")
def devices_register(
    public_key: Annotated[str, typer.Argument(help="The device's Ed25519 public key, hex.")],
    label: Annotated[list[str] | None, typer.Option("--label", help="k=v (repeatable).")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Register a device key (`fleet-agent id` prints it) so the device may fetch updates."""
    body = {"public_key": public_key, "labels": _parse_labels(label)}
    result = _call(server, token, lambda c: c.request("POST", "/api/v1/devices", json_body=body))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(f"device {result['id']} registered")


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _when(value: str | None) -> str:
    """An ISO time from the API as `YYYY-MM-DD HH:MM:SS` (UTC), or `-`."""
    return value[:19].replace("T", " ") if value else "-"


def _parse_labels(items: list[str] | None, option: str = "--label") -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"{option} {item!r} is not k=v", 2)
        labels[key] = value
    return labels


def _device_table(devices: list[dict[str, Any]]) -> Table:
    table = Table("id", "state", "attestation", "labels", "last seen", "agent", "active rune")
    colours = {"enrolled": "green", "pending": "yellow", "rejected": "red"}
    for d in devices:
        colour = colours.get(d["state"], "white")
        table.add_row(
            d["id"],
            f"[{colour}]{d['state']}[/]",
            attestation_cell(d),
            _labels_text(d["labels"]),
            _when(d["last_seen_at"]),
            d.get("agent_version") or "-",
            d.get("active_rune") or "-",
        )
    return table


ATTESTATION_COLOURS = {"affirming": "green", "warning": "yellow", "contraindicated": "red"}


def attestation_cell(device: dict[str, Any]) -> str:
    """A device's attestation in one cell: quarantined in red, else its last status and age."""
    if device.get("quarantine"):
        return "[bold red]QUARANTINED[/]"
    result = device.get("attestation")
    if not result:
        return "[dim]none yet[/]"
    colour = ATTESTATION_COLOURS.get(result["status"], "white")
    stale = "" if result["fresh"] else " [yellow](stale)[/]"
    return f"[{colour}]{result['status']}[/] {_age(result['age_s'])}{stale}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


@devices_app.command("list")
def devices_list(
    state: Annotated[
        str | None, typer.Option("--state", help="Only pending, enrolled or rejected devices.")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="Only devices with this label k=v (repeatable: all)."),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """List devices: state, attestation, labels, last seen, agent version, active rune."""
    _parse_labels(label)
    params: list[tuple[str, str]] = [("label", item) for item in label or []]
    if state:
        params.append(("state", state))
    query = "&".join(f"{k}={quote(v, safe='=')}" for k, v in params)
    path = "/api/v1/devices" + (f"?{query}" if query else "")
    result = _call(server, token, lambda c: c.request("GET", path))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(_device_table(result["devices"]))


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device id.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Show one device: state, labels, certificate, attestation, and the facts it reported."""
    d = _call(
        server, token, lambda c: c.request("GET", f"/api/v1/devices/{quote(device_id, safe='')}")
    )
    if output is Output.json:
        _emit_json(d)
        return
    table = Table("", "", show_header=False, box=None)
    for name, value in (
        ("id", d["id"]),
        ("state", d["state"]),
        ("labels", _labels_text(d["labels"])),
        ("online", "yes" if d["online"] else "no"),
        ("last seen", _when(d["last_seen_at"])),
        ("enrolled", _when(d["enrolled_at"])),
        ("agent", d["agent_version"] or "-"),
        ("active rune", d["active_rune"] or "-"),
        ("previous rune", d["previous_rune"] or "-"),
        ("certificate", d["cert_serial"] or "-"),
        ("cert expires", _when(d["cert_not_after"])),
        ("public key", d["public_key"]),
    ):
        table.add_row(name, str(value))
    table.add_row("attestation", attestation_cell(d))
    result = d.get("attestation")
    if result:
        table.add_row(
            "  attested",
            f"{_when(result['attested_at'])} (fresh until {_when(result['expires_at'])})",
        )
        for reason in result["reasons"]:
            table.add_row("  reason", reason)
    quarantine = d.get("quarantine")
    if quarantine:
        table.add_row(
            "[bold red]quarantined[/]",
            f"[red]since {_when(quarantine['since'])}: {quarantine['reason']}[/]",
        )
    for name, value in sorted((d.get("facts") or {}).items()):
        table.add_row(f"fact {name}", "-" if value is None else str(value))
    out.print(table)


def _device_action(
    device_id: str, action: str, server: str, token: str | None, output: Output
) -> None:
    path = f"/api/v1/devices/{quote(device_id, safe='')}/{action}"
    result = _call(server, token, lambda c: c.request("POST", path))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(f"device {result['id']} is {result['state']}", highlight=False)


@devices_app.command("deploy")
def devices_deploy(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id.")],
    rune: Annotated[str, typer.Argument(metavar="NAME@VERSION", help="A published rune.")],
    org: Annotated[str, typer.Option(help="The rune's org.")] = "default",
    timeout: Annotated[
        float, typer.Option(help="Seconds the device has to finish before it is timed out.")
    ] = 6 * 3600,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the command until it ends.")
    ] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Send one signed deploy command to a device (rollouts do many at once).

    Exit 0 when sent (with --wait: when the device installed it), 1 when the device reports
    failure, refusal or the command timed out.
    """
    path = f"/api/v1/devices/{quote(device_id, safe='')}/deploy"
    body = {"rune": rune, "org": org, "timeout_s": timeout}
    command = _call(server, token, lambda c: c.request("POST", path, json_body=body))
    if wait:
        command = _follow_command(server, token, command, output)
    if output is Output.json:
        _emit_json(command)
    else:
        reason = f" ({command['reason']})" if command["reason"] else ""
        out.print(f"command {command['id']}: {command['state']}{reason}", highlight=False)
    if command["state"] in {"failed", "refused", "timed-out", "rolled-back"}:
        raise typer.Exit(1)


def _follow_command(
    server: str, token: str | None, command: dict[str, Any], output: Output
) -> dict[str, Any]:
    import time

    terminal = {"succeeded", "failed", "refused", "rolled-back", "done", "timed-out"}
    path = f"/api/v1/commands/{command['id']}"
    seen = command["state"]
    with err.status(f"{command['type']} to {command['device_id']}: {seen}") as status:
        while command["state"] not in terminal:
            time.sleep(0.3)
            command = _call(server, token, lambda c: c.request("GET", path))
            if command["state"] != seen:
                seen = command["state"]
                status.update(f"{command['type']} to {command['device_id']}: {seen}")
    return command


@devices_app.command("approve")
def devices_approve(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The pending device's id.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Approve a pending device: it gets its certificate at its next poll."""
    _device_action(device_id, "approve", server, token, output)


@devices_app.command("reject")
def devices_reject(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Reject a device: it may no longer enroll or fetch updates."""
    _device_action(device_id, "reject", server, token, output)


@devices_app.command("label")
def devices_label(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id.")],
    changes: Annotated[
        list[str], typer.Argument(metavar="k=v|k-...", help="Set k to v, or remove k with k-.")
    ],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Set labels (k=v) and remove them (k-) on a device."""
    set_labels: dict[str, str] = {}
    remove: list[str] = []
    for item in changes:
        if "=" in item:
            set_labels.update(_parse_labels([item], "label"))
        elif item.endswith("-") and len(item) > 1:
            remove.append(item[:-1])
        else:
            _fail(f"{item!r} is neither k=v (set) nor k- (remove)", 2)
    body = {"set": set_labels, "remove": remove}
    path = f"/api/v1/devices/{quote(device_id, safe='')}/labels"
    result = _call(server, token, lambda c: c.request("PATCH", path, json_body=body))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(f"device {result['id']} labels: {_labels_text(result['labels'])}", highlight=False)


@devices_app.command("remove")
def devices_remove(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device's id.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Remove a device: it is forgotten, and must enroll (and be approved) again."""
    path = f"/api/v1/devices/{quote(device_id, safe='')}"
    result = _call(server, token, lambda c: c.request("DELETE", path))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(f"device {result['id']} removed", highlight=False)


# Enrollment tokens.


@enroll_tokens_app.command("create")
def enroll_tokens_create(
    uses: Annotated[int, typer.Option("--uses", help="How many devices may enroll with it.")] = 1,
    ttl: Annotated[
        str, typer.Option("--ttl", help="How long it is valid: seconds, or like 30m, 1h, 7d.")
    ] = "1h",
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="k=v given to every device it enrolls (repeatable)."),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Create an enrollment token; it is shown once. Devices pass it to `fleet-agent enroll`."""
    from fleet.fleetdir import parse_duration

    try:
        ttl_s = parse_duration(ttl).total_seconds()
    except ValueError as exc:
        _fail(f"--ttl: {exc}", 2)
    if uses < 1:
        _fail("--uses must be at least 1", 2)
    body = {"uses": uses, "ttl_s": ttl_s, "labels": _parse_labels(label)}
    result = _call(
        server, token, lambda c: c.request("POST", "/api/v1/enrollment-tokens", json_body=body)
    )
    if output is Output.json:
        _emit_json(result)
        return
    out.print(
        f"enrollment token {result['id']} ({result['uses']} use(s), expires "
        f"{_when(result['expires_at'])} UTC, labels {_labels_text(result['labels'])}), "
        "shown once:",
        highlight=False,
    )
    out.print(result["token"], highlight=False, soft_wrap=True)
    out.print(
        "enroll a device: fleet-agent enroll --server URL --root root.json --token TOKEN",
        highlight=False,
    )


@enroll_tokens_app.command("list")
def enroll_tokens_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """List enrollment tokens: uses, labels, expiry and state (never the tokens)."""
    result = _call(server, token, lambda c: c.request("GET", "/api/v1/enrollment-tokens"))
    if output is Output.json:
        _emit_json(result)
        return
    table = Table("id", "state", "used", "labels", "expires", "created by")
    for t in result["tokens"]:
        table.add_row(
            str(t["id"]),
            t["state"],
            f"{t['used']}/{t['uses']}",
            _labels_text(t["labels"]),
            _when(t["expires_at"]),
            t["created_by"],
        )
    out.print(table)


@enroll_tokens_app.command("revoke")
def enroll_tokens_revoke(
    token_id: Annotated[int, typer.Argument(metavar="ID", help="The id (from `tokens list`).")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Revoke an enrollment token: no device may enroll with it any more."""
    path = f"/api/v1/enrollment-tokens/{token_id}"
    result = _call(server, token, lambda c: c.request("DELETE", path))
    if output is Output.json:
        _emit_json(result)
        return
    out.print(f"enrollment token {token_id} revoked", highlight=False)


# Rollouts (fleet/rollout_cli.py uses the helpers above).
from fleet.rollout_cli import rollout_app  # noqa: E402

app.add_typer(rollout_app, name="rollout")


# Attestation (fleet/attestation_cli.py adds `devices attest` and `devices release` too).
from fleet.attestation_cli import attestation_app  # noqa: E402

app.add_typer(attestation_app, name="attestation")


# Telemetry (fleet/telemetry_cli.py).
from fleet.telemetry_cli import telemetry_app  # noqa: E402

app.add_typer(telemetry_app, name="telemetry")

# Admission policy (fleet/policy_cli.py).
from fleet.policy_cli import policy_app  # noqa: E402

app.add_typer(policy_app, name="policy")

# The audit log (fleet/audit_cli.py).
from fleet.audit_cli import audit as audit_command  # noqa: E402

app.command("audit")(audit_command)


def main() -> None:
    app()
