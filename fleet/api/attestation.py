"""`/api/v1/attestation/...` and `/api/v1/devices/{id}/release`: attestation over HTTP.

Rules:
- A device asks for a challenge and answers it with evidence itself (`challenge`, `evidence`):
  both requests are signed by the device (`ota.request_auth`) and it must be enrolled; anything
  else is a 401 with no detail for the caller, counted and logged. Evidence that yields no result
  is answered with its status and reason (`fleet.attestation.AttestationRefused`); a result,
  whatever its status, is a 200 carrying the signed result, the device's passport.
- Reference values: viewers list them, admins add and remove them. An agent release is added as
  its version and manifest digest (`fleetctl attestation reference add` computes the digest from
  a wheel or a directory), a config constraint as a dot path and the value it must have.
- Releasing a quarantined device by hand needs an admin; asking a device to attest now is the
  `attest` command (`/api/v1/devices/{id}/commands`, operators).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from aiohttp import web

from fleet.api.access import device_json
from fleet.api.context import caller, controller, signing_device
from fleet.api.errors import ApiError, json_response, read_json
from fleet.api.routes import API, DEVICE
from fleet.attestation import AGENT, KINDS, AttestationRefused, add_reference
from fleet.db.models import AttestationReference, Device
from fleet.logs import log
from fleet.tuf_store import utcnow

CHALLENGE_PATH = "/api/v1/attestation/challenge"
EVIDENCE_PATH = "/api/v1/attestation/evidence"
MAX_EVIDENCE_BODY = 64 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONFIG_PATH = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@API.add("POST", CHALLENGE_PATH, DEVICE, "A fresh attestation challenge (nonce) for the device")
async def challenge(request: web.Request) -> web.StreamResponse:
    device_id, _ = await signing_device(request)
    nonce = await controller(request).attestation.challenge(device_id, utcnow())
    return json_response(
        {"nonce": nonce.nonce, "expires_at": nonce.expires_at.isoformat()}, status=201
    )


@API.add(
    "POST",
    EVIDENCE_PATH,
    DEVICE,
    "The device's signed evidence for its challenge; answers with the signed attestation result",
    request_body="application/json",
)
async def evidence(request: web.Request) -> web.StreamResponse:
    device_id, key = await signing_device(request)
    if request.content_length is not None and request.content_length > MAX_EVIDENCE_BODY:
        raise ApiError(413, f"evidence is at most {MAX_EVIDENCE_BODY} bytes")
    data = await request.content.read(MAX_EVIDENCE_BODY + 1)
    if len(data) > MAX_EVIDENCE_BODY:
        raise ApiError(413, f"evidence is at most {MAX_EVIDENCE_BODY} bytes")
    ctl = controller(request)
    try:
        result, sealed = await ctl.attestation.submit(device_id, key, data, utcnow())
    except AttestationRefused as exc:
        raise ApiError(exc.status, f"evidence refused ({exc.kind}): {exc.message}") from None
    return json_response(
        result.to_json()
        | {
            "result": base64.b64encode(sealed).decode(),
            "deploy_age_s": ctl.attestation.deploy_age.total_seconds(),
        }
    )


# Reference values.


def reference_json(row: AttestationReference) -> dict[str, Any]:
    value: Any = row.value if row.kind == AGENT else json.loads(row.value)
    return {
        "id": row.id,
        "kind": row.kind,
        "name": row.name,
        "value": value,
        "source": row.source,
        "created_by": row.created_by,
        "created_at": row.created_at.isoformat() if row.created_at else None,
    }


@API.add("GET", "/api/v1/attestation/references", "viewer", "List the reference values")
async def list_references(request: web.Request) -> web.StreamResponse:
    rows = await AttestationReference.all().order_by("kind", "name", "id")
    return json_response({"references": [reference_json(row) for row in rows]})


@API.add(
    "POST",
    "/api/v1/attestation/references",
    "admin",
    "Add a reference value: an agent release (version, manifest sha256) or a config constraint",
    request_body="application/json",
)
async def add_reference_value(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    kind, name, source = body.get("kind"), body.get("name"), body.get("source", "fleetctl")
    if kind not in KINDS:
        raise ApiError(400, f"kind must be {' or '.join(KINDS)}")
    if not isinstance(name, str) or not isinstance(source, str) or not 1 <= len(name) <= 128:
        raise ApiError(400, "name must be the agent version or the config setting's dot path")
    if kind == AGENT:
        value = body.get("value")
        if not isinstance(value, str) or not _SHA256.match(value):
            raise ApiError(400, "an agent reference's value is its manifest SHA-256 (64 hex)")
    else:
        if not _CONFIG_PATH.match(name):
            raise ApiError(400, f"{name!r} is not a dot path of a setting (like policy.x)")
        if "value" not in body:
            raise ApiError(400, "a config constraint needs the `value` the setting must have")
        value = json.dumps(body["value"], sort_keys=True, separators=(",", ":"))
        if len(value) > 255:
            raise ApiError(400, "a config constraint's value is at most 255 characters of JSON")
    row, created = await add_reference(kind, name, value, source, caller(request).name)
    controller(request).attestation.references_changed()
    if created:
        log("attestation.reference_added", kind=kind, name=name, by=caller(request).name)
    return json_response(reference_json(row), status=201 if created else 200)


@API.add("DELETE", "/api/v1/attestation/references/{id}", "admin", "Remove a reference value")
async def remove_reference(request: web.Request) -> web.StreamResponse:
    try:
        row = await AttestationReference.get_or_none(id=int(request.match_info["id"]))
    except ValueError:
        raise ApiError(400, "a reference id is a number") from None
    if row is None:
        raise ApiError(404, f"no reference {request.match_info['id']}")
    await row.delete()
    controller(request).attestation.references_changed()
    log("attestation.reference_removed", kind=row.kind, name=row.name, by=caller(request).name)
    return json_response(reference_json(row))


@API.add("POST", "/api/v1/devices/{id}/release", "admin", "Release a quarantined device")
async def release(request: web.Request) -> web.StreamResponse:
    device_id = request.match_info["id"]
    device = await Device.get_or_none(id=device_id)
    if device is None:
        raise ApiError(404, f"no device {device_id}")
    if device.quarantined_at is None:
        raise ApiError(409, f"device {device_id} is not quarantined")
    await Device.filter(id=device_id).update(quarantined_at=None, quarantine_reason=None)
    await device.refresh_from_db()
    log("device.released", device=device_id, by=caller(request).name)
    return json_response(device_json(device, detail=True))
