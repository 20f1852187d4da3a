"""`fleet-agent`: the device side of Fleet: identity, verified updates, slots and running the rune.

Exit codes: 0 done; 1 the controller is unavailable or the rune failed while running (try again
later); 2 the command line is wrong; 3 the update was refused (verification or policy: nothing
was installed), or enrollment was refused or the device rejected; 4 the new rune failed its
health check (nothing installed, the active rune kept running); 5 local state is unusable (state
dir locked, malformed file); 6 enrollment is pending an operator's approval. Errors are one clear
line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from agent.sandbox.engine import engine

if TYPE_CHECKING:
    from agent.attester import Attester

EXIT_FAILED = 1
EXIT_REFUSED = 3
EXIT_UNHEALTHY = 4
EXIT_STATE = 5
EXIT_PENDING = 6

app = typer.Typer(
    name="fleet-agent",
    help="The Fleet device agent: verifies and runs signed runes in a WebAssembly sandbox.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


class Output(StrEnum):
    text = "text"
    json = "json"


StateDirOpt = Annotated[
    Path,
    typer.Option(
        "--state-dir", envvar="FLEET_AGENT_STATE_DIR", help="The agent's state directory."
    ),
]
OutputOpt = Annotated[Output, typer.Option("-o", "--output", help="text, or json for scripts.")]
DEFAULT_STATE_DIR = Path("fleet-agent-state")


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def _emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


@app.command()
def doctor() -> None:
    """Check that this device can run runes: the sandbox starts and the model runtimes present."""
    from agent.sandbox.models import EXTRAS, runtime_available

    engine()
    typer.echo("sandbox: wasmtime ready")
    for mimetype, (module, extra) in EXTRAS.items():
        state = (
            "installed"
            if runtime_available(mimetype)
            else f"missing (pip install 'fleet-tinyml[{extra}]')"
        )
        typer.echo(f"{mimetype}: {module} {state}")


@app.command("id")
def identity(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    output: OutputOpt = Output.text,
) -> None:
    """Print this device's id and public key (made on first use, never leaves the device)."""
    from attestation.identity import DeviceIdentity
    from attestation.keys import KeyFileError, raw_public_bytes

    try:
        ident = DeviceIdentity.load_or_create(state_dir)
    except (KeyFileError, OSError) as exc:
        _fail(str(exc), EXIT_STATE)
    public = raw_public_bytes(ident.public_key).hex()
    if output is Output.json:
        _emit_json({"device_id": ident.device_id, "public_key": public})
        return
    out.print(f"device id   {ident.device_id}\npublic key  {public}")
    out.print(f"register it: fleetctl devices register {public}", highlight=False)


@app.command()
def update(
    server: Annotated[str, typer.Option("--server", envvar="FLEET_SERVER", help="Controller URL.")],
    target: Annotated[str, typer.Option("--target", help="NAME@VERSION to install.")],
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    org: Annotated[str, typer.Option("--org", help="The rune's organisation.")] = "default",
    root: Annotated[
        Path | None,
        typer.Option("--root", help="The fleet's root.json (needed the first time only)."),
    ] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Perform one verified update end to end and print what it did."""
    from agent.policy import AgentPolicy, PolicyError
    from agent.slots import SlotError
    from agent.update import provision_root
    from agent.update import update as run_update
    from attestation.keys import KeyFileError
    from ota.targets import TargetNameError, parse_rune_ref
    from ota.updater import UpdateError, UpdateRefused, UpdaterSetupError

    try:
        name, version = parse_rune_ref(target)
    except TargetNameError as exc:
        _fail(str(exc), 2)
    try:
        policy = AgentPolicy.load(state_dir)
        if root is not None and provision_root(state_dir, root):
            err.print(f"trusting the fleet root from {root}", highlight=False)
        attester = _attested(state_dir, server, output, target)
        report = run_update(
            state_dir, server, org, name, version, policy=policy, passport=attester.passport
        )
    except ValueError as exc:
        _fail(str(exc), 2 if not isinstance(exc, PolicyError) else EXIT_STATE)
    except UpdaterSetupError as exc:
        _fail(f"{exc} (pass --root FILE the first time)", EXIT_STATE)
    except UpdateRefused as exc:
        _emit_failure(output, target, "refused", exc.kind, str(exc))
        _fail(f"update refused ({exc.kind}): {exc}; nothing was installed", EXIT_REFUSED)
    except UpdateError as exc:
        _emit_failure(output, target, "unavailable", exc.kind, str(exc))
        _fail(f"update not possible now ({exc.kind}): {exc}", EXIT_FAILED)
    except (SlotError, KeyFileError, TargetNameError) as exc:
        _fail(str(exc), EXIT_STATE)
    if output is Output.json:
        health = report.health
        _emit_json(
            {
                "target": report.target,
                "status": report.status,
                "slot": report.slot,
                "sha256": report.sha256,
                "steps": report.steps,
                "health": None
                if health is None
                else {"ok": health.ok, "reason": health.reason, "calls": health.calls},
            }
        )
    else:
        for step in report.steps:
            out.print(f"- {step}", highlight=False)
        out.print(f"[bold]{report.status}[/]: {target}", highlight=False)
    if report.status == "health-check-failed":
        raise typer.Exit(EXIT_UNHEALTHY)


@app.command()
def check(
    server: Annotated[str, typer.Option("--server", envvar="FLEET_SERVER", help="Controller URL.")],
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """Refresh the signed metadata; stop running the active rune if it was revoked."""
    from agent.slots import SlotError
    from agent.update import check as run_check
    from ota.updater import UpdateError, UpdateRefused

    try:
        stopped = run_check(state_dir, server)
    except UpdateRefused as exc:
        _fail(f"metadata refused ({exc.kind}): {exc}", EXIT_REFUSED)
    except UpdateError as exc:
        _fail(f"cannot check now ({exc.kind}): {exc}", EXIT_FAILED)
    except (SlotError, ValueError) as exc:
        _fail(str(exc), EXIT_STATE)
    out.print(stopped or "the active rune is still published", highlight=False)


@app.command()
def enroll(
    server: Annotated[str, typer.Option("--server", envvar="FLEET_SERVER", help="Controller URL.")],
    root: Annotated[
        Path, typer.Option("--root", help="The fleet's root.json: becomes this device's anchor.")
    ],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="FLEET_ENROLL_TOKEN",
            help="An enrollment token (`fleetctl tokens create`); without one, an operator must "
            "approve the device.",
            show_default=False,
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="k=v to ask for (repeatable; a token's labels win)."),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(help="Seconds to wait for an operator's approval while pending (0: none)."),
    ] = 0.0,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    output: OutputOpt = Output.text,
) -> None:
    """Enroll this device: prove its key, send its facts and a CSR, and get its certificate.

    Exit codes: 0 enrolled (certificate in STATE_DIR/mqtt); 6 pending: an operator must approve
    it (`fleetctl devices approve ID`), then run this again or pass --wait; 3 refused (bad token,
    rejected device, bad request); 1 the controller is unavailable (try again later); 2 bad
    arguments (server URL, root.json, labels); 5 local state is unusable.
    """
    from agent.enroll import (
        Enrollment,
        EnrollRefused,
        EnrollStateError,
        EnrollUnavailable,
        iso,
        poll,
    )
    from agent.enroll import enroll as run_enroll

    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--label {item!r} is not k=v", 2)
        labels[key] = value
    if wait < 0:
        _fail("--wait must not be negative", 2)
    try:
        result: Enrollment = run_enroll(state_dir, server, root, token, labels)
        deadline = time.monotonic() + wait
        while result.state == "pending" and time.monotonic() < deadline:
            time.sleep(min(3.0, max(deadline - time.monotonic(), 0.0)))
            result = poll(state_dir)
    except ValueError as exc:
        _fail(str(exc), 2)
    except EnrollStateError as exc:
        _fail(str(exc), EXIT_STATE)
    except EnrollRefused as exc:
        _fail(f"enrollment refused: {exc}", EXIT_REFUSED)
    except EnrollUnavailable as exc:
        _fail(f"cannot enroll now: {exc}", EXIT_FAILED)
    attested = _attest_after_enrollment(state_dir, result.server) if result.enrolled else None
    if output is Output.json:
        _emit_json(
            result.to_json()
            | {
                "cert_not_before": iso(result.cert_not_before),
                "cert_not_after": iso(result.cert_not_after),
                "updated_at": iso(result.updated_at),
                "attestation": attested,
            }
        )
    elif result.state == "enrolled":
        out.print(f"device {result.device_id} [bold green]enrolled[/]", highlight=False)
        if result.cert_not_after is not None:
            out.print(f"certificate valid until {iso(result.cert_not_after)}", highlight=False)
        out.print(f"broker {result.broker_url or '(none given)'}", highlight=False)
        if attested is not None:
            out.print(f"attestation {_attestation_text(attested)}", highlight=False)
    elif result.state == "pending":
        out.print(f"device {result.device_id} [bold yellow]pending[/]", highlight=False)
        out.print(
            f"an operator must approve it: fleetctl devices approve {result.device_id}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        out.print(f"device {result.device_id} [bold red]{result.state}[/]", highlight=False)
    if result.state == "pending":
        raise typer.Exit(EXIT_PENDING)
    if result.state != "enrolled":
        _fail(f"device {result.device_id} is {result.state}", EXIT_REFUSED)


def _attested(state_dir: Path, server: str, output: Output, target: str) -> Attester:
    """Attest before an update (the controller serves runes only to attested devices)."""
    from agent.attester import (
        AttestationFailed,
        AttestationUnauthorized,
        AttestationUnavailable,
        attester_for,
    )
    from attestation.policy import Status

    attester = attester_for(state_dir, server)
    try:
        result = attester.attest()
    except AttestationUnauthorized as exc:
        _emit_failure(output, target, "unavailable", "unauthorized", str(exc))
        _fail(f"update not possible now (unauthorized): {exc}", EXIT_FAILED)
    except AttestationUnavailable as exc:
        _emit_failure(output, target, "unavailable", "attestation", str(exc))
        _fail(f"cannot attest now: {exc}", EXIT_FAILED)
    except AttestationFailed as exc:
        _emit_failure(output, target, "refused", "attestation", str(exc))
        _fail(f"attestation refused: {exc}; nothing was installed", EXIT_REFUSED)
    if result.status is not Status.AFFIRMING:
        reasons = "; ".join(result.reasons)
        _emit_failure(output, target, "refused", "attestation", reasons)
        _fail(
            f"the controller's attestation result is {result.status.label}: {reasons}; "
            "nothing was installed",
            EXIT_REFUSED,
        )
    return attester


def _attest_after_enrollment(state_dir: Path, server: str) -> dict[str, Any]:
    """Attest once enrolled; a failure is reported, not fatal (the controller asks again)."""
    from agent.attester import AttestationFailed, attester_for

    try:
        result = attester_for(state_dir, server).attest()
    except AttestationFailed as exc:
        return {"status": None, "error": str(exc)}
    return {"status": result.status.label, "reasons": list(result.reasons)}


def _attestation_text(attested: dict[str, Any]) -> str:
    if attested.get("status") is None:
        return f"not done: {attested.get('error')} (the controller will ask again)"
    status, reasons = str(attested["status"]), attested.get("reasons") or []
    return status + (f": {'; '.join(reasons)}" if status != "affirming" else "")


def _emit_failure(output: Output, target: str, status: str, kind: str, reason: str) -> None:
    if output is Output.json:
        _emit_json({"target": target, "status": status, "kind": kind, "reason": reason})


@app.command()
def attest(
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            envvar="FLEET_SERVER",
            help="Controller URL (default: where the device enrolled).",
        ),
    ] = None,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    output: OutputOpt = Output.text,
) -> None:
    """Attest to the controller now and show the result it gave.

    Exit codes: 0 affirming; 3 warning, contraindicated or refused (the reasons say why); 1 the
    controller is unavailable; 5 the device is not enrolled.
    """
    from agent.attester import AttestationFailed, AttestationUnavailable, attester_for
    from agent.enroll import load_enrollment
    from attestation.policy import Status

    enrollment = load_enrollment(state_dir)
    target = server or (enrollment.server if enrollment is not None else None)
    if not target:
        _fail(f"{state_dir} holds no enrollment; enroll first or pass --server", EXIT_STATE)
    try:
        result = attester_for(state_dir, target).attest()
    except AttestationUnavailable as exc:
        _fail(f"cannot attest now: {exc}", EXIT_FAILED)
    except AttestationFailed as exc:
        _fail(f"attestation refused: {exc}", EXIT_REFUSED)
    if output is Output.json:
        _emit_json(
            {
                "status": result.status.label,
                "reasons": list(result.reasons),
                "issued_at": result.issued_at,
                "expires_at": result.expires_at,
            }
        )
    else:
        colour = {"affirming": "green", "warning": "yellow"}.get(result.status.label, "red")
        out.print(f"[bold {colour}]{result.status.label}[/]", highlight=False)
        for reason in result.reasons:
            out.print(f"- {reason}", highlight=False)
        out.print(f"fresh until {time.ctime(result.expires_at)}", highlight=False)
    if result.status is not Status.AFFIRMING:
        raise typer.Exit(EXIT_REFUSED)


@app.command()
def status(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    output: OutputOpt = Output.text,
) -> None:
    """Show the slots: the active and previous rune, probation, the recent history, and the
    last attestation result."""
    from agent.attester import stored_attestation
    from agent.slots import SlotError, Slots

    try:
        slots = Slots(state_dir)
        state = slots.state()
        runes = {}
        for name, ref in (("active", state.active), ("previous", state.previous)):
            runes[name] = slots.rune(ref.slot).to_json() | {"slot": ref.slot} if ref else None
    except SlotError as exc:
        _fail(str(exc), EXIT_STATE)
    stored = stored_attestation(state_dir)
    attestation = None
    if stored is not None:
        attestation = {
            "status": stored.status.label,
            "reasons": list(stored.reasons),
            "issued_at": stored.issued_at,
            "expires_at": stored.expires_at,
            "passport": stored.passport(time.time()) is not None,
        }
    if output is Output.json:
        _emit_json(
            runes
            | {
                "probation": state.probation.to_json() if state.probation else None,
                "history": [e.to_json() for e in state.history],
                "attestation": attestation,
            }
        )
        return
    for name, rune in runes.items():
        text = (
            f"{rune['name']}@{rune['version']} ({rune['org']}, slot {rune['slot']})"
            if rune
            else "-"
        )
        out.print(f"{name:<9} {text}", highlight=False)
    if state.probation is not None:
        out.print(f"probation until {time.ctime(state.probation.ends_at())}", highlight=False)
    if stored is None:
        out.print("attested  never", highlight=False)
    else:
        fresh = "fresh" if time.time() < stored.expires_at else "expired"
        out.print(
            f"attested  {stored.status.label} at {time.ctime(stored.issued_at)} "
            f"({fresh} until {time.ctime(stored.expires_at)})",
            highlight=False,
        )
    table = Table("when", "event", "rune", "slot", "reason")
    for event in state.history[-10:]:
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at)),
            event.kind.value,
            event.rune or "-",
            event.slot or "-",
            event.reason or "",
        )
    out.print(table)


@app.command()
def rollback(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    reason: Annotated[str, typer.Option(help="Why, for the history.")] = "asked by the owner",
) -> None:
    """Switch back to the previous rune."""
    from agent.slots import SlotError, Slots

    try:
        slot = Slots(state_dir).rollback(reason, time.time())
    except SlotError as exc:
        _fail(str(exc), EXIT_STATE)
    out.print(f"rolled back: slot {slot} is active")


@app.command()
def run(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """The daemon: keep a session with the controller's broker, run the commands it sends
    (deploy, rollback, ping, config) and run the active rune continuously on the configured
    input source. Needs an enrolled device (`fleet-agent enroll`). Stops on SIGINT/SIGTERM."""
    import asyncio
    import logging
    import signal

    from agent.channel_state import ChannelStateError
    from agent.daemon import Daemon, DaemonError, SessionConfig
    from agent.enroll import ca_cert_file, device_cert_file, load_enrollment
    from agent.policy import PolicyError
    from agent.runconfig import RunConfigError
    from agent.slots import SlotError
    from agent.telemetry.budget import BudgetError

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    enrollment = load_enrollment(state_dir)
    if enrollment is None or not enrollment.enrolled or not enrollment.broker_url:
        _fail(
            f"{state_dir} holds no enrolled device; run `fleet-agent enroll --server URL "
            f"--root ROOT.json --state-dir {state_dir}` first",
            EXIT_STATE,
        )
    cert = device_cert_file(state_dir)
    config = SessionConfig(
        state_dir=state_dir,
        server_url=enrollment.server,
        broker_url=enrollment.broker_url,
        ca_cert=ca_cert_file(state_dir) if ca_cert_file(state_dir).exists() else None,
        client_cert=cert if cert.exists() else None,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Daemon(config).run(stop)

    try:
        asyncio.run(main())
    except (
        DaemonError,
        PolicyError,
        SlotError,
        ChannelStateError,
        RunConfigError,
        BudgetError,
    ) as exc:
        _fail(str(exc), EXIT_STATE)


@app.command()
def infer(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    count: Annotated[int, typer.Option(help="How many inferences to run.")] = 1,
    interval: Annotated[float, typer.Option(help="Seconds between inferences.")] = 0.0,
) -> None:
    """Run the active rune COUNT times on synthetic inputs; each run counts for probation.

    Outputs go to stdout as JSON lines. (`fleet-agent run` is the daemon, which runs the rune
    continuously on its configured input source.)
    """
    from agent.policy import AgentPolicy, PolicyError
    from agent.sandbox.errors import SandboxError
    from agent.sandbox.inputs import InputFiles, InputSources
    from agent.sandbox.runner import load_rune
    from agent.slots import RunOutcome, SlotError, Slots

    if count < 1:
        _fail("--count must be at least 1", 2)
    try:
        policy = AgentPolicy.load(state_dir)
        slots = Slots(state_dir, policy=policy.probation)
        slots.recover(time.time())
    except (PolicyError, SlotError) as exc:
        _fail(str(exc), EXIT_STATE)
    failures = 0
    loaded: tuple[str, Any] | None = None
    sources = InputSources(InputFiles(synthetic=True))
    for index in range(count):
        active = slots.active(time.time())
        if active is None:
            _fail("no rune is active; install one with `fleet-agent update`", EXIT_FAILED)
        data, info = active
        try:
            if loaded is None or loaded[0] != info.sha256:
                rune = load_rune(
                    data, name=info.ref, sources=sources, allowed=policy.allowed_kinds()
                )
                loaded = (info.sha256, rune)
            for record in loaded[1].call():
                sys.stdout.write(json.dumps(record.value) + "\n")
            result = slots.record_run(True, "", time.time())
        except SandboxError as exc:
            failures += 1
            loaded = None
            err.print(f"run {index + 1}: {info.ref} failed: {exc}", highlight=False)
            result = slots.record_run(False, str(exc), time.time())
        if result.outcome is RunOutcome.ROLLED_BACK:
            err.print(f"probation failed, rolled back: {result.reason}", highlight=False)
        elif result.outcome is RunOutcome.PASSED:
            err.print(f"{info.ref} passed probation", highlight=False)
        sys.stdout.flush()
        if interval > 0 and index + 1 < count:
            time.sleep(interval)
    if failures:
        raise typer.Exit(EXIT_FAILED)


def main() -> None:
    from agent.consent_cli import consent_app

    app.add_typer(consent_app, name="consent")
    app()
