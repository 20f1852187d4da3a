"""`/api/v1/tokens` and `/api/v1/devices`: who may call the API, and which devices may fetch.

Rules:
- Devices normally join by enrolling (`fleet.api.enroll`); registering a key here (admin only)
  enrolls it directly, for tests and devices provisioned out of band.
- Viewers may list and show devices; approving, rejecting, relabelling and removing need an
  operator. Every change of a device's state drops its cached key (`Controller.forget_device`),
  so a rejected or removed device is refused its next download.
- Listing filters by `state` and by `label=k=v` (repeatable; all must match).
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import Any, TypeVar

from aiohttp import web

from attestation.identity import device_id_for
from attestation.keys import key_from_raw
from fleet.api.context import caller, controller
from fleet.api.errors import ApiError, json_response, read_json
from fleet.api.routes import API
from fleet.db.models import ApiToken, Device
from fleet.enrollment import (
    STATES,
    DeviceError,
    approve,
    get_device,
    matches,
    parse_label_selector,
    reject,
    relabel,
    remove,
    validate_labels,
)
from fleet.logs import log
from fleet.tokens import ROLES, hash_token, new_token
from fleet.tuf_store import utcnow

T = TypeVar("T")


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


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def attestation_json(device: Device, now: datetime) -> dict[str, Any] | None:
    """The device's last attestation result: status, reasons, age, and whether it is fresh."""
    if device.attestation_status is None or device.attested_at is None:
        return None
    expires = device.attestation_expires_at
    return {
        "status": device.attestation_status,
        "reasons": list(device.attestation_reasons or []),
        "attested_at": _iso(device.attested_at),
        "expires_at": _iso(expires),
        "age_s": round((now - device.attested_at).total_seconds(), 1),
        "fresh": expires is not None and now < expires,
    }


def device_json(device: Device, *, detail: bool = False) -> dict[str, Any]:
    """A device as the API shows it; `detail` adds its facts and last hello."""
    data: dict[str, Any] = {
        "id": device.id,
        "public_key": device.public_key,
        "state": device.state,
        "labels": device.labels,
        "created_at": _iso(device.created_at),
        "enrolled_at": _iso(device.enrolled_at),
        "last_seen_at": _iso(device.last_seen_at),
        "online": device.online,
        "agent_version": device.agent_version,
        "active_rune": device.active_rune,
        "active_sha256": device.active_sha256,
        "previous_rune": device.previous_rune,
        "cert_serial": device.cert_serial,
        "cert_not_after": _iso(device.cert_not_after),
        "enrollment_token_id": device.enrollment_token_id,
        "attestation": attestation_json(device, utcnow()),
        "quarantine": (
            {"since": _iso(device.quarantined_at), "reason": device.quarantine_reason}
            if device.quarantined_at is not None
            else None
        ),
    }
    if detail:
        data["facts"] = device.facts
        data["last_hello"] = device.last_hello
    return data


async def _device_call(action: Awaitable[T]) -> T:
    try:
        return await action
    except DeviceError as exc:
        raise ApiError(exc.status, exc.message) from None


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
    try:
        labels = validate_labels(labels)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    device_id = device_id_for(key)
    device, created = await Device.get_or_create(
        id=device_id,
        defaults={"public_key": str(public_key).lower(), "labels": labels, "enrolled_at": utcnow()},
    )
    controller(request).forget_device(device_id)
    if created:
        log("device.registered", device=device_id)
    return json_response(device_json(device), status=201 if created else 200)


@API.add(
    "GET",
    "/api/v1/devices",
    "viewer",
    "List devices, optionally only one state and those with every label=k=v given",
    parameters=("state", "label"),
)
async def list_devices(request: web.Request) -> web.StreamResponse:
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}")
    try:
        selector = parse_label_selector(request.query.getall("label", []))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    query = Device.all() if state is None else Device.filter(state=state)
    devices = [d for d in await query.order_by("id") if matches(d, state, selector)]
    return json_response({"devices": [device_json(d) for d in devices]})


@API.add("GET", "/api/v1/devices/{id}", "viewer", "Show one device, with the facts it reported")
async def show_device(request: web.Request) -> web.StreamResponse:
    device = await _device_call(get_device(request.match_info["id"]))
    return json_response(device_json(device, detail=True))


@API.add("POST", "/api/v1/devices/{id}/approve", "operator", "Approve a pending device")
async def approve_device(request: web.Request) -> web.StreamResponse:
    device, changed = await _device_call(approve(request.match_info["id"], utcnow()))
    controller(request).forget_device(device.id)
    if changed:
        log("device.approved", device=device.id, by=caller(request).name)
    return json_response(device_json(device, detail=True))


@API.add(
    "POST",
    "/api/v1/devices/{id}/reject",
    "operator",
    "Reject a device: it may no longer enroll or fetch updates",
)
async def reject_device(request: web.Request) -> web.StreamResponse:
    device, changed = await _device_call(reject(request.match_info["id"]))
    controller(request).forget_device(device.id)
    if changed:
        log("device.rejected", device=device.id, by=caller(request).name)
    return json_response(device_json(device, detail=True))


@API.add(
    "PATCH",
    "/api/v1/devices/{id}/labels",
    "operator",
    'Change a device\'s labels: {"set": {k: v}, "remove": [k]}',
    request_body="application/json",
)
async def label_device(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    device = await _device_call(
        relabel(request.match_info["id"], body.get("set", {}), body.get("remove", []))
    )
    log("device.labelled", device=device.id, by=caller(request).name)
    return json_response(device_json(device, detail=True))


@API.add(
    "DELETE",
    "/api/v1/devices/{id}",
    "operator",
    "Remove a device: it is forgotten and must enroll again",
)
async def remove_device(request: web.Request) -> web.StreamResponse:
    device = await _device_call(remove(request.match_info["id"]))
    controller(request).forget_device(device.id)
    log("device.removed", device=device.id, by=caller(request).name)
    return json_response({"id": device.id, "removed": True})
