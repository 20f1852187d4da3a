"""`rune`: the rune author's tool: build a Runefile into a bundle (with an in-toto provenance
statement), sign statements with a publisher key, run and inspect runes.

Exit codes: 0 done; 1 the rune failed while running (trap, limit, its own error, bad input data);
2 the command line is wrong; 3 the Runefile or rune file is invalid or was refused at load.
Errors are one clear message on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from agent.sandbox.errors import SandboxError
from agent.sandbox.inputs import InputFiles, InputSources
from agent.sandbox.models import inspect_model
from agent.sandbox.runner import load_rune
from ota.rune.build import build_bundle, provenance_statement
from ota.rune.bundle import sha256_hex
from ota.rune.inspect import InspectError, describe_rune
from ota.rune.runefile import CapabilityKind, RunefileError

EXIT_FAILED = 1
EXIT_INVALID = 3

app = typer.Typer(
    name="rune",
    help="Build, run and inspect runes (sandboxed TinyML apps).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_INVALID)


@app.command()
def build(
    runefile: Annotated[Path, typer.Argument(help="The Runefile to build.")] = Path("Runefile.yml"),
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write the bundle.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Rune name (default: the folder's).")] = None,
    version: Annotated[str, typer.Option(help="Rune version.")] = "0.1.0",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check a Runefile and write it, its models, resources and blocks into one bundle."""
    try:
        result = build_bundle(runefile, name=name, version=version, inspect_model=inspect_model)
    except RunefileError as exc:
        _fail(f"{runefile}: {exc}", EXIT_INVALID)
    manifest = result.manifest
    target = output or runefile.parent / f"{manifest.name}.runebundle"
    _write(target, result.data)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    digest = sha256_hex(result.data)
    statement = provenance_statement(result, target.name, runefile, _builder_version())
    statement_path = statement_file(target)
    _write(statement_path, json.dumps(statement, indent=2, sort_keys=True).encode() + b"\n")
    summary = {
        "path": str(target),
        "name": manifest.name,
        "version": manifest.version,
        "sha256": digest,
        "size": len(result.data),
        "stages": len(manifest.stages),
        "warnings": result.warnings,
        "statement": str(statement_path),
    }
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(
            f"built [bold]{manifest.name}@{manifest.version}[/] -> {target} "
            f"({len(result.data)} bytes, {len(manifest.stages)} stages, "
            f"sha256 {digest[:16]}...)",
            highlight=False,
        )
        out.print(f"provenance statement -> {statement_path} (sign it: rune sign)", highlight=False)


def statement_file(rune: Path) -> Path:
    """Where the unsigned statement about `rune` goes: `RUNE.intoto.json`."""
    return rune.with_name(rune.name + ".intoto.json")


def signed_statement_file(rune: Path) -> Path:
    """Where the signed statement about `rune` goes: `RUNE.intoto.jsonl`."""
    return rune.with_name(rune.name + ".intoto.jsonl")


def _write(path: Path, data: bytes) -> None:
    try:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(data)
        temporary.replace(path)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}", EXIT_FAILED)


def _builder_version() -> str:
    from importlib.metadata import version

    return version("fleet-tinyml")


@app.command()
def keygen(
    out_file: Annotated[
        Path, typer.Option("-o", "--out", help="The private key file to write (mode 0600).")
    ] = Path("publisher.pem"),
) -> None:
    """Make a publisher key: the private key (keep it secret) and its public key (`.pub`), which
    the fleet's admission policy lists (`fleetctl policy set --publisher-key`)."""
    from attestation.keys import KeyFileError, generate_key_file, public_key_of, public_key_pem

    public_file = out_file.with_suffix(".pub")
    if public_file.exists():
        _fail(f"{public_file} already exists; refusing to overwrite a key", EXIT_FAILED)
    try:
        signer = generate_key_file(out_file)
    except KeyFileError as exc:
        _fail(str(exc), EXIT_FAILED)
    key = public_key_of(signer)
    _write(public_file, public_key_pem(key))
    out.print(
        f"private key {out_file} (keep it secret)\npublic key  {public_file}", highlight=False
    )
    out.print(f"key id      {key.keyid}", highlight=False)


@app.command()
def sign(
    rune_file: Annotated[Path, typer.Argument(metavar="FILE", help="The rune (bundle or .rune).")],
    key: Annotated[Path, typer.Option("--key", help="The publisher's private key (rune keygen).")],
    statement: Annotated[
        Path | None,
        typer.Option(help="The statement to sign (default FILE.intoto.json, from rune build)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write (FILE.intoto.jsonl).")
    ] = None,
) -> None:
    """Sign the in-toto statement about a rune with a publisher key, as a DSSE envelope.

    A rune built elsewhere (a legacy .rune) without a statement gets one that names the file only.
    """
    from attestation.keys import KeyFileError, load_key_file, public_key_of
    from attestation.provenance import ProvenanceError, build_statement, sign_statement, subject_of

    data = _read(rune_file)
    digest = sha256_hex(data)
    path = statement or statement_file(rune_file)
    if path.exists():
        try:
            document = json.loads(_read(path))
            name, subject = subject_of(document)
        except (ValueError, ProvenanceError) as exc:
            _fail(f"{path} is not an in-toto statement: {exc}", EXIT_INVALID)
        if subject != digest:
            _fail(
                f"{path} is about {name} ({subject[:16]}...), not {rune_file} ({digest[:16]}...): "
                "rebuild the rune, or give its own statement",
                EXIT_INVALID,
            )
    elif statement is not None:
        _fail(f"{statement}: no such statement", EXIT_INVALID)
    else:
        document = build_statement(
            rune_file.name,
            digest,
            [],
            {"signed": rune_file.name},
            {"fleet-tinyml": _builder_version()},
        )
    try:
        signer = load_key_file(key)
    except KeyFileError as exc:
        _fail(str(exc), EXIT_INVALID)
    target = output or signed_statement_file(rune_file)
    _write(target, sign_statement(document, signer) + b"\n")
    out.print(
        f"signed the statement about {rune_file.name} with key "
        f"{public_key_of(signer).keyid[:16]}... -> {target}",
        highlight=False,
    )


def _allowed(allow: str | None) -> frozenset[CapabilityKind] | None:
    if allow is None:
        return None
    kinds = []
    for item in filter(None, (a.strip().upper() for a in allow.split(","))):
        if item not in CapabilityKind.__members__:
            _fail(
                f"--allow {item}: not a capability; use {', '.join(CapabilityKind.__members__)}", 2
            )
        kinds.append(CapabilityKind[item])
    return frozenset(kinds)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="A bundle or a legacy .rune.")],
    image: Annotated[Path | None, typer.Option(help="Image file for IMAGE.")] = None,
    sound: Annotated[Path | None, typer.Option(help="WAV file for SOUND.")] = None,
    accel: Annotated[Path | None, typer.Option(help="CSV of X,Y,Z rows for ACCEL.")] = None,
    raw: Annotated[Path | None, typer.Option(help="File whose bytes feed RAW.")] = None,
    random: Annotated[int, typer.Option(help="Seed for RAND.")] = 0,
    count: Annotated[int, typer.Option("-n", min=1, help="How many inferences.")] = 1,
    allow: Annotated[
        str | None,
        typer.Option(help="Capabilities this run allows, e.g. ACCEL,RAND (default: all)."),
    ] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="text or json")] = "text",
) -> None:
    """Run a rune in the sandbox and print each output in the Rune serial format."""
    if output not in ("text", "json"):
        _fail(f"-o {output}: use text or json", 2)
    data = _read(file)
    sources = InputSources(InputFiles(image, sound, accel, raw, random))
    try:
        rune = load_rune(data, name=file.name, sources=sources, allowed=_allowed(allow))
    except SandboxError as exc:
        _fail(str(exc), EXIT_INVALID)
    results: list[dict[str, Any]] = []
    for index in range(count):
        try:
            records = rune.call()
        except SandboxError as exc:
            _fail(f"inference {index + 1}: {exc}", EXIT_FAILED)
        if output == "json":
            results.append({"inference": index + 1, "outputs": [r.value for r in records]})
        else:
            for record in records:
                sys.stdout.write(json.dumps(record.value) + "\n")
            sys.stdout.flush()
    if output == "json":
        sys.stdout.write(json.dumps({"rune": rune.name, "inferences": results}) + "\n")


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A bundle or a legacy .rune.")],
    output: Annotated[str, typer.Option("-o", "--output", help="text or json")] = "text",
) -> None:
    """Show what a rune holds: kind, name, version, capabilities, models, blocks, digests."""
    if output not in ("text", "json"):
        _fail(f"-o {output}: use text or json", 2)
    try:
        desc = describe_rune(_read(file), file.stem)
    except InspectError as exc:
        _fail(f"{file}: {exc}", EXIT_INVALID)
    if output == "json":
        sys.stdout.write(json.dumps(desc.to_json(), indent=2) + "\n")
        return
    out.print(
        f"[bold]{desc.name}[/] {desc.version}  ({desc.kind}, {desc.size} bytes)", highlight=False
    )
    out.print(f"sha256 {desc.sha256}", highlight=False)
    sections = (
        ("capabilities", desc.capabilities),
        ("blocks", desc.blocks),
        ("models", desc.models),
        ("outputs", desc.outputs),
        ("resources", desc.resources),
        ("parts", desc.parts),
    )
    for title, rows in sections:
        if not rows:
            continue
        table = Table(title=title, title_justify="left", show_edge=False)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(row.get(c)) for c in columns))
        out.print(table)
    if desc.imports:
        out.print(f"imports: {', '.join(desc.imports)}", highlight=False)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def main() -> None:
    app()
