"""`/api/v1/tokens` and `/api/v1/devices`: who may call the API, and which devices may fetch.

Devices are registered here by key until enrollment (with proof of possession) replaces it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from attestation.identity import device_id_for
from attestation.keys import key_from_raw
from fleet.api.context import controller
from fleet.api.errors import ApiError, json_response, read_json
from fleet.api.routes import API
from fleet.db.models import ApiToken, Device
from fleet.logs import log
from fleet.tokens import ROLES, hash_token, new_token
from fleet.tuf_store import utcnow


def token_json(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "created_at": token.created_at.isoformat() if token.created_at else None,
        "last_used_at": token.last_used_at.isoformat() if token.last_used_at else None,
        "revoked": token.revoked_at is not None,
    }


@API.add(
    "POST",
    "/api/v1/tokens",
    "admin",
    "Create an API token (shown once)",
    request_body="application/json",
)
async def create_token(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = body.get("name")
    role = body.get("role", "viewer")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise ApiError(400, "a token needs a name of 1-64 characters")
    if role not in ROLES:
        raise ApiError(400, f"role must be one of {', '.join(ROLES)}")
    token = new_token()
    row = await ApiToken.create(name=name, role=role, token_hash=hash_token(token))
    log("token.created", name=name, role=role)
    return json_response(token_json(row) | {"token": token}, status=201)


@API.add("GET", "/api/v1/tokens", "admin", "List API tokens (never the tokens themselves)")
async def list_tokens(request: web.Request) -> web.StreamResponse:
    return json_response({"tokens": [token_json(t) for t in await ApiToken.all().order_by("id")]})


@API.add("DELETE", "/api/v1/tokens/{id}", "admin", "Revoke an API token")
async def revoke_token(request: web.Request) -> web.StreamResponse:
    try:
        token_id = int(request.match_info["id"])
    except ValueError:
        raise ApiError(400, "a token id is a number") from None
    row = await ApiToken.get_or_none(id=token_id)
    if row is None:
        raise ApiError(404, f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        await row.save()
        log("token.revoked", name=row.name)
    return json_response(token_json(row))


def device_json(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "public_key": device.public_key,
        "state": device.state,
        "labels": device.labels,
        "created_at": device.created_at.isoformat() if device.created_at else None,
        "last_seen_at": device.last_seen_at.isoformat() if device.last_seen_at else None,
    }


@API.add(
    "POST",
    "/api/v1/devices",
    "admin",
    "Register a device by its Ed25519 public key (hex), before enrollment exists",
    request_body="application/json",
)
async def register_device(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    public_key = body.get("public_key")
    labels = body.get("labels", {})
    try:
        key = key_from_raw(bytes.fromhex(str(public_key)))
    except ValueError:
        raise ApiError(400, "public_key must be 64 hex digits (a raw Ed25519 key)") from None
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ApiError(400, "labels must map strings to strings")
    device_id = device_id_for(key)
    device, created = await Device.get_or_create(
        id=device_id, defaults={"public_key": str(public_key), "labels": labels}
    )
    controller(request).forget_device(device_id)
    if created:
        log("device.registered", device=device_id)
    return json_response(device_json(device), status=201 if created else 200)


@API.add("GET", "/api/v1/devices", "viewer", "List devices")
async def list_devices(request: web.Request) -> web.StreamResponse:
    return json_response({"devices": [device_json(d) for d in await Device.all().order_by("id")]})
