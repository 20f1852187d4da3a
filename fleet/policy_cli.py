"""`fleetctl policy show|set`: an org's admission policy for rune provenance.

Rules:
- `set` sends one change (`PUT /api/v1/policy/{org}`) built from its options; with no option it
  is a usage error (exit 2), not an empty request. Files it reads (publisher keys, a trusted
  root) are read and checked here first: one that cannot be read or is not what it should be
  fails with exit 3 before anything is sent.
- `--trusted-root` is `production`, `staging` or the path of a Sigstore trusted root JSON file.
- `--sigstore-identity` and `--sigstore-issuer` pair up in order; their counts must match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

policy_app: typer.Typer = typer.Typer(
    help="Admission policy: which publisher keys and Sigstore identities an org accepts.",
    no_args_is_help=True,
)

# `fleet.cli` registers this app, so it is defined above this import.
from fleet.cli import (  # noqa: E402
    EXIT_INVALID,
    OrgOpt,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    _call,
    _emit_json,
    _fail,
    _read_file,
    out,
)
from fleet.client import DEFAULT_SERVER  # noqa: E402
from ota.targets import DEFAULT_ORG  # noqa: E402

EXIT_USAGE = 2
TRUSTED_ROOTS = ("production", "staging")


def _print_policy(policy: dict[str, Any]) -> None:
    required = "[bold]required[/]" if policy["require_provenance"] else "optional"
    out.print(f"org [bold]{policy['org']}[/]: provenance {required}", highlight=False)
    revoked = set(policy["revoked_keys"])
    keys = Table("publisher key", "key id", "state", title="publisher keys (in-toto statements)")
    for key in policy["publisher_keys"]:
        state = "[red]revoked[/]" if key["keyid"] in revoked else "accepted"
        keys.add_row(key["name"] or "-", key["keyid"][:16], state)
    out.print(keys if policy["publisher_keys"] else "publisher keys: none")
    if policy["sigstore_identities"]:
        identities = Table("identity", "issuer", title="Sigstore identities")
        for identity in policy["sigstore_identities"]:
            identities.add_row(identity["identity"], identity["issuer"])
        out.print(identities)
    else:
        out.print("Sigstore identities: none")
    out.print(f"Sigstore trusted root: {policy['trusted_root']}", highlight=False)


@policy_app.command("show")
def policy_show(
    org: OrgOpt = DEFAULT_ORG,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Show an org's admission policy."""
    result = _call(server, token, lambda c: c.request("GET", f"/api/v1/policy/{org}"))
    if output is Output.json:
        _emit_json(result)
        return
    _print_policy(result)


@policy_app.command("set")
def policy_set(
    org: OrgOpt = DEFAULT_ORG,
    require_provenance: Annotated[
        bool | None,
        typer.Option(
            "--require-provenance/--no-require-provenance",
            help="Refuse runes pushed without provenance (or accept them).",
            show_default=False,
        ),
    ] = None,
    publisher_key: Annotated[
        list[Path] | None,
        typer.Option("--publisher-key", help="Accept statements signed by this public key (.pub)."),
    ] = None,
    key_name: Annotated[
        str | None, typer.Option("--key-name", help="A name for the key(s) added.")
    ] = None,
    revoke_key: Annotated[
        list[str] | None,
        typer.Option("--revoke-key", help="Revoke a publisher key (its id or a unique prefix)."),
    ] = None,
    sigstore_identity: Annotated[
        list[str] | None,
        typer.Option(
            "--sigstore-identity",
            help="Accept bundles from this identity (an email "
            "or a workflow URL), with the --sigstore-issuer in the same position.",
        ),
    ] = None,
    sigstore_issuer: Annotated[
        list[str] | None,
        typer.Option("--sigstore-issuer", help="The OIDC issuer of each --sigstore-identity."),
    ] = None,
    remove_sigstore_identity: Annotated[
        list[str] | None,
        typer.Option(
            "--remove-sigstore-identity",
            help="Stop accepting IDENTITY (every issuer it is listed with).",
        ),
    ] = None,
    trusted_root: Annotated[
        str | None,
        typer.Option(
            "--trusted-root",
            help="Verify Sigstore bundles against production, staging or a trusted root file.",
        ),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Change an org's admission policy."""
    identities = sigstore_identity or []
    issuers = sigstore_issuer or []
    if len(identities) != len(issuers):
        _fail("give one --sigstore-issuer for each --sigstore-identity, in the same order", 2)
    change: dict[str, Any] = {}
    if require_provenance is not None:
        change["require_provenance"] = require_provenance
    if publisher_key:
        change["add_publisher_keys"] = [
            {"name": key_name or path.stem, "public_pem": _public_pem(path)}
            for path in publisher_key
        ]
    if revoke_key:
        change["revoke_keys"] = revoke_key
    if identities:
        change["add_sigstore_identities"] = [
            {"identity": identity, "issuer": issuer}
            for identity, issuer in zip(identities, issuers, strict=True)
        ]
    if remove_sigstore_identity:
        current = _call(server, token, lambda c: c.request("GET", f"/api/v1/policy/{org}"))
        removed = [
            entry
            for entry in current["sigstore_identities"]
            if entry["identity"] in set(remove_sigstore_identity)
        ]
        missing = set(remove_sigstore_identity) - {e["identity"] for e in removed}
        if missing:
            _fail(f"org {org} does not accept the identity {', '.join(sorted(missing))}", 1)
        change["remove_sigstore_identities"] = removed
    if trusted_root is not None:
        change["trusted_root"] = _trusted_root(trusted_root)
    if not change:
        _fail("nothing to change: give at least one option (see --help)", EXIT_USAGE)
    result = _call(
        server, token, lambda c: c.request("PUT", f"/api/v1/policy/{org}", json_body=change)
    )
    if output is Output.json:
        _emit_json(result)
        return
    _print_policy(result)


def _public_pem(path: Path) -> str:
    text = _read_file(path)
    if b"PUBLIC KEY" not in text:
        hint = " (that is a private key; give its .pub)" if b"PRIVATE KEY" in text else ""
        _fail(f"{path} is not a PEM public key{hint}", EXIT_INVALID)
    return text.decode("ascii", "replace")


def _trusted_root(value: str) -> str:
    if value in TRUSTED_ROOTS:
        return value
    path = Path(value)
    if not path.is_file():
        _fail(
            f"--trusted-root is production, staging or a trusted root file; {value} is none",
            EXIT_INVALID,
        )
    return _read_file(path).decode("utf-8", "replace")
