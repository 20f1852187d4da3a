"""`/api/v1/policy/{org}`: an org's admission policy for rune provenance (`fleet.provenance`).

Rules: viewers read policies, admins change them. A change names what it adds or removes
(publisher keys as PEM public keys, key ids or unique prefixes to revoke, Sigstore identities
with their issuer, the trusted root, whether provenance is required); anything malformed is a 400
naming it, and nothing is changed. After a change the org's accepted publisher keys are
published again through TUF (`publishers/{org}.json`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from securesystemslib.signer import Key

from attestation.keys import KeyFileError, public_key_from_pem
from fleet.api.context import caller, controller
from fleet.api.errors import ApiError, json_response, read_json
from fleet.api.routes import API
from fleet.provenance import (
    PolicyError,
    check_trusted_root,
    load_policy,
    policy_change,
    save_policy,
)
from fleet.tuf_store import utcnow
from ota.targets import TargetNameError, check_part, publishers_target_path


def _org(request: web.Request) -> str:
    try:
        return check_part("org", request.match_info["org"])
    except TargetNameError as exc:
        raise ApiError(400, str(exc)) from None


@API.add("GET", "/api/v1/policy/{org}", "viewer", "An org's admission policy for rune provenance")
async def show_policy(request: web.Request) -> web.StreamResponse:
    return json_response((await load_policy(_org(request))).to_json())


@API.add(
    "PUT",
    "/api/v1/policy/{org}",
    "admin",
    "Change an org's admission policy: publisher keys, Sigstore identities, trusted root, "
    "whether provenance is required",
    request_body="application/json",
)
async def change_policy(request: web.Request) -> web.StreamResponse:
    org = _org(request)
    body = await read_json(request)
    trusted_root = body.get("trusted_root")
    try:
        changed = policy_change(
            await load_policy(org),
            require_provenance=_bool(body, "require_provenance"),
            add_keys=[_key(entry) for entry in _list(body, "add_publisher_keys")],
            revoke_keys=[str(k) for k in _list(body, "revoke_keys")],
            identities=[_identity(e) for e in _list(body, "add_sigstore_identities")],
            remove_identities=[_identity(e) for e in _list(body, "remove_sigstore_identities")],
            trusted_root=None if trusted_root is None else check_trusted_root(str(trusted_root)),
        )
    except PolicyError as exc:
        raise ApiError(400, str(exc)) from None
    ctl = controller(request)
    await save_policy(changed, caller(request).name)
    await ctl.repository.add_or_replace(
        publishers_target_path(org),
        changed.publishers_document(),
        {"fleet-publishers": {"org": org}},
        utcnow(),
    )
    return json_response(changed.to_json())


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise PolicyError(f"{name} must be true or false")
    return value


def _list(body: dict[str, Any], name: str) -> list[Any]:
    value = body.get(name, [])
    if not isinstance(value, list):
        raise PolicyError(f"{name} must be a list")
    return value


def _key(entry: Any) -> tuple[str, Key]:
    """(name, key) of `{"name": ..., "public_pem": ...}`: an Ed25519 public key in PEM."""
    if not isinstance(entry, dict) or not isinstance(entry.get("public_pem"), str):
        raise PolicyError(
            "a publisher key is {name, public_pem} (the .pub file `rune keygen` wrote)"
        )
    try:
        key = public_key_from_pem(entry["public_pem"].encode())
    except KeyFileError as exc:
        raise PolicyError(f"a publisher key is {exc}") from None
    return str(entry.get("name") or "")[:64], key


def _identity(entry: Any) -> tuple[str, str]:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("identity"), str)
        or not isinstance(entry.get("issuer"), str)
        or not entry["identity"]
        or not entry["issuer"].startswith("https://")
    ):
        raise PolicyError("a Sigstore identity is {identity, issuer} (the issuer an https:// URL)")
    return entry["identity"], entry["issuer"]
