"""`/api/v1/enroll` (devices) and `/api/v1/enrollment-tokens` (operators).

Rules:
- The enrollment routes take no API token: each request is signed by the device's key and checked
  by `fleet.enrollment`, which makes every decision. A refusal is one JSON error line with its
  status (401 unsigned, badly signed or stale; 400 malformed or a bad CSR; 403 a bad token or a
  rejected device; 409 a replay; 413 too large; 429 too many pending devices), counted in
  `fleet_enrollment_refused_total{reason}` and logged as `security.enrollment_refused`.
- The body is read only after the signature headers are present and fresh, and never past
  `MAX_BODY_BYTES`.
- Enrollment tokens are shown once, when made; listing shows their uses, labels and state only.
"""

from __future__ import annotations

import logging

from aiohttp import web

from fleet.api.context import REQUEST_DEVICE, caller, controller
from fleet.api.errors import ApiError, error_response, json_response, read_json
from fleet.api.routes import API, DEVICE
from fleet.controller import Controller
from fleet.db.models import EnrollmentToken
from fleet.enrollment import (
    ENROLL_PATH,
    MAX_BODY_BYTES,
    RENEW_PATH,
    DeviceError,
    EnrollmentRefused,
    Issuer,
    authenticate_poll,
    create_token,
    enroll,
    enrollment_json,
    parse_enroll_request,
    parse_renew_request,
    poll,
    renew,
    revoke_token,
    signed_headers,
    token_json,
)
from fleet.logs import log
from fleet.tuf_store import utcnow


def _issuer(ctl: Controller) -> Issuer:
    return Issuer(ctl.ca, ctl.config.cert_lifetime())


def broker_url(ctl: Controller) -> str | None:
    """The broker URL devices are given: fleet.yaml's, else the one the controller serves."""
    return ctl.config.device_broker_url or ctl.device_broker_url


def _refused(request: web.Request, exc: EnrollmentRefused) -> web.Response:
    controller(request).metrics.enrollment_refused.labels(exc.reason).inc()
    log(
        "security.enrollment_refused",
        logging.WARNING,
        reason=exc.reason,
        detail=exc.message,
        claimed_device=request.headers.get("Fleet-Device", "")[:40],
        path=request.path,
        peer=request.remote,
    )
    return error_response(exc.status, exc.message)


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise EnrollmentRefused(
            413, "too-large", f"the request body is larger than {MAX_BODY_BYTES} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(16 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise EnrollmentRefused(
                413, "too-large", f"the request body is larger than {MAX_BODY_BYTES} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


@API.add(
    "POST",
    ENROLL_PATH,
    DEVICE,
    "Enroll a device: its key, a CSR and facts, signed by that key; optionally a token",
    request_body="application/json",
)
async def post_enroll(request: web.Request) -> web.StreamResponse:
    ctl = controller(request)
    now = utcnow()
    try:
        signed_headers(request.headers, now.timestamp())
        body = await _body(request)
        parsed = parse_enroll_request(
            request.headers, request.method, request.path_qs, body, now.timestamp()
        )
        outcome = await enroll(_issuer(ctl), parsed, now)
    except EnrollmentRefused as exc:
        return _refused(request, exc)
    device = outcome.device
    request[REQUEST_DEVICE] = device.id  # it proved its key: the audit record's actor
    ctl.forget_device(device.id)
    if outcome.via_token is not None:
        log("device.enrolled", device=device.id, token=outcome.via_token)
    elif outcome.created:
        log("device.pending", device=device.id, peer=request.remote)
    return json_response(
        enrollment_json(device, ctl.ca.certificate_pem, broker_url(ctl)),
        status=201 if outcome.created else 200,
    )


@API.add(
    "GET", ENROLL_PATH, DEVICE, "A device's enrollment state, and once enrolled its certificate"
)
async def get_enroll(request: web.Request) -> web.StreamResponse:
    ctl = controller(request)
    now = utcnow()
    try:
        device = await authenticate_poll(
            request.headers, request.method, request.path_qs, now.timestamp()
        )
        device = await poll(_issuer(ctl), device, now)
    except EnrollmentRefused as exc:
        return _refused(request, exc)
    return json_response(enrollment_json(device, ctl.ca.certificate_pem, broker_url(ctl)))


@API.add(
    "POST",
    RENEW_PATH,
    DEVICE,
    "Renew an enrolled device's certificate for a new CSR, signed by the device's key",
    request_body="application/json",
)
async def post_renew(request: web.Request) -> web.StreamResponse:
    ctl = controller(request)
    now = utcnow()
    try:
        signed_headers(request.headers, now.timestamp())
        body = await _body(request)
        parsed = await parse_renew_request(
            request.headers, request.method, request.path_qs, body, now.timestamp()
        )
        device = await renew(_issuer(ctl), parsed, now)
    except EnrollmentRefused as exc:
        return _refused(request, exc)
    request[REQUEST_DEVICE] = device.id
    log("device.cert_renewed", device=device.id, serial=device.cert_serial)
    return json_response(enrollment_json(device, ctl.ca.certificate_pem, broker_url(ctl)))


# Enrollment tokens.


@API.add(
    "POST",
    "/api/v1/enrollment-tokens",
    "operator",
    "Create an enrollment token (shown once): uses, ttl_s, labels for the devices it enrolls",
    request_body="application/json",
)
async def post_token(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    now = utcnow()
    try:
        row, token = await create_token(
            body.get("uses", 1),
            body.get("ttl_s"),
            body.get("labels", {}),
            caller(request).name,
            now,
        )
    except DeviceError as exc:
        raise ApiError(exc.status, exc.message) from None
    log("enrollment_token.created", id=row.id, uses=row.uses, by=row.created_by)
    return json_response(token_json(row, now) | {"token": token}, status=201)


@API.add(
    "GET",
    "/api/v1/enrollment-tokens",
    "operator",
    "List enrollment tokens: uses, labels, expiry and state (never the tokens themselves)",
)
async def list_tokens(request: web.Request) -> web.StreamResponse:
    now = utcnow()
    rows = await EnrollmentToken.all().order_by("id")
    return json_response({"tokens": [token_json(row, now) for row in rows]})


@API.add("DELETE", "/api/v1/enrollment-tokens/{id}", "operator", "Revoke an enrollment token")
async def delete_token(request: web.Request) -> web.StreamResponse:
    now = utcnow()
    try:
        row = await revoke_token(request.match_info["id"], now)
    except DeviceError as exc:
        raise ApiError(exc.status, exc.message) from None
    log("enrollment_token.revoked", id=row.id, by=caller(request).name)
    return json_response(token_json(row, now))
