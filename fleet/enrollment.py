"""Enrollment: who may join the fleet, with which labels, and which certificate they get.

The HTTP layer (`fleet.api.enroll`) only moves bytes in and out; every decision is made here.

Rules:
- An enrollment request (`POST /api/v1/enroll`) proves possession of the key it carries: it is
  signed (`Fleet-Device`, `Fleet-Date`, `Fleet-Signature`) over `ota.request_auth.body_message`,
  the request line plus the SHA-256 of the body, so no byte of the body (key,
  CSR, token, labels, facts) can be changed. The device id is derived from the carried key, never
  taken from the client: a `Fleet-Device` that is not that id is refused (`id-mismatch`), as is a
  signature by any other key (`bad-signature`) and a `Fleet-Date` more than
  `MAX_CLOCK_SKEW_S` off the controller's clock (`clock`).
- A signed request is accepted once: the SHA-256 of its signed message is remembered until it is
  past the clock-skew window, and a replay is refused with 409 (`replayed`) before anything else
  happens, so it consumes no token use.
- The CSR must be for the device's own key and name exactly `CN=<device id>` (`fleet.ca`);
  otherwise the request is refused (`bad-csr`, `csr-key`, `csr-id`) and nothing is stored.
- Without a token a new device is `pending` until an operator approves or rejects it; at most
  `MAX_PENDING_DEVICES` wait at once (`pending-full`, 429). With a token that exists, is not
  revoked, has not expired and has a use left, the device is `enrolled` at once and the token's
  use is consumed atomically with the device's creation: a refusal (`token-unknown`,
  `token-revoked`, `token-expired`, `token-exhausted`, all 403) creates nothing and consumes
  nothing. A device that is already enrolled consumes no token use when it enrolls again.
- A device's own labels are applied when it is first seen; a token's labels are applied when the
  token enrolls it and win over the device's. After that, labels belong to the operator.
- A `rejected` device stays rejected (403 `rejected`) until an operator approves it or removes it;
  a removed device is forgotten and enrolls as a new one.
- An enrolled device gets a certificate from the fleet CA (CN = its id) for its CSR, valid for
  the configured `device_cert_lifetime`: at enrollment, at the first poll after approval, and on
  renewal (`POST /api/v1/enroll/renew`, signed like enrollment, for enrolled devices only).
- Enrollment tokens are 256 random bits, shown once, stored as SHA-256 only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Signature, SSlibKey
from tortoise.exceptions import IntegrityError
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from attestation.identity import device_id_for
from attestation.keys import key_from_raw
from fleet.ca import CsrError, FleetCA
from fleet.db.models import Device, EnrollmentSignature, EnrollmentToken
from ota.request_auth import (
    DATE_HEADER,
    DEVICE_HEADER,
    MAX_CLOCK_SKEW_S,
    SIGNATURE_HEADER,
    RequestAuthError,
    body_message,
    verify_request,
)

ENROLL_PATH = "/api/v1/enroll"
RENEW_PATH = "/api/v1/enroll/renew"
MAX_BODY_BYTES = 64 * 1024
MAX_PENDING_DEVICES = 1000
POLL_AFTER_S = 30
TOKEN_PREFIX = "fleet_enroll_"  # noqa: S105 (a prefix, not a secret)
MAX_TOKEN_USES = 100_000
MIN_TOKEN_TTL = timedelta(seconds=1)
MAX_TOKEN_TTL = timedelta(days=365)
MAX_TOKEN_CHARS = 128
MAX_LABELS = 64
MAX_FACTS = 32
MAX_FACT_CHARS = 256
STATES = ("pending", "enrolled", "rejected")

_LABEL_KEY = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._:@/+-]{0,128}$")
_FACT_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_VERSION = re.compile(r"^[0-9A-Za-z.+-]{1,32}$")
_DEVICE_ID = re.compile(r"^d[a-z2-7]{32}$")


class EnrollmentRefused(Exception):
    """A device request refused: the HTTP `status`, a `reason` tag for metrics, and a message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class DeviceError(Exception):
    """An operator request that cannot be done (unknown device, bad label...), with a status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# Labels and facts.


def validate_labels(labels: object, what: str = "labels") -> dict[str, str]:
    """`labels` if it maps label keys to label values (docs/enrollment.md); ValueError if not."""
    if not isinstance(labels, dict):
        raise ValueError(f"{what} must map strings to strings")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{what}: at most {MAX_LABELS} labels")
    for key, value in labels.items():
        validate_label_key(key)
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise ValueError(
                f"label {key}: the value must be at most 128 of A-Z a-z 0-9 . _ : @ / + -"
            )
    return dict(labels)


def validate_label_key(key: object) -> str:
    if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
        raise ValueError(
            f"label key {key!r} must be 1-63 of A-Z a-z 0-9 . _ / -, starting and ending with a "
            "letter or digit"
        )
    return key


def parse_label_selector(items: list[str]) -> dict[str, str]:
    """`k=v` strings to a mapping (all must match); ValueError naming a bad one."""
    selector: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"label selector {item!r} is not k=v")
        selector[validate_label_key(key)] = value
    return selector


def _validate_facts(facts: object) -> dict[str, object]:
    if not isinstance(facts, dict):
        raise ValueError("facts must be a JSON object")
    if len(facts) > MAX_FACTS:
        raise ValueError(f"at most {MAX_FACTS} facts")
    for key, value in facts.items():
        if not isinstance(key, str) or not _FACT_KEY.fullmatch(key):
            raise ValueError(f"fact name {key!r} must be 1-32 of a-z 0-9 _")
        if isinstance(value, str):
            if len(value) > MAX_FACT_CHARS:
                raise ValueError(f"fact {key} is longer than {MAX_FACT_CHARS} characters")
        elif value is not None and not isinstance(value, bool | int | float):
            raise ValueError(f"fact {key} must be a string, number, boolean or null")
    version = facts.get("agent_version")
    if version is not None and (not isinstance(version, str) or not _VERSION.fullmatch(version)):
        raise ValueError("fact agent_version must be a version of up to 32 characters")
    return dict(facts)


# Signed requests with a body.


@dataclass(frozen=True)
class SignedHeaders:
    device_id: str
    date: int
    signature: bytes


def signed_headers(headers: Mapping[str, str], now: float) -> SignedHeaders:
    """The three signature headers, present, well-formed and fresh; EnrollmentRefused if not."""
    device_id = headers.get(DEVICE_HEADER)
    date_text = headers.get(DATE_HEADER)
    signature_text = headers.get(SIGNATURE_HEADER)
    if not device_id or not date_text or not signature_text:
        raise EnrollmentRefused(
            401, "unsigned", "the request is not signed by a device (Fleet-* headers missing)"
        )
    try:
        date = int(date_text)
        signature = base64.b64decode(signature_text, validate=True)
    except (ValueError, binascii.Error):
        raise EnrollmentRefused(401, "malformed", "malformed signature headers") from None
    if not _DEVICE_ID.fullmatch(device_id):
        raise EnrollmentRefused(401, "malformed", "Fleet-Device is not a device id")
    if abs(now - date) > MAX_CLOCK_SKEW_S:
        raise EnrollmentRefused(
            401,
            "clock",
            f"the request time is {int(now - date)} s off the controller's clock (at most "
            f"{MAX_CLOCK_SKEW_S} s allowed); set the device's clock",
        )
    return SignedHeaders(device_id, date, signature)


def _verify(key: SSlibKey, message: bytes, signature: bytes, device_id: str) -> None:
    try:
        key.verify_signature(Signature(key.keyid, signature.hex()), message)
    except (UnverifiedSignatureError, VerificationError):
        raise EnrollmentRefused(
            401, "bad-signature", f"the request is not signed by the key of {device_id}"
        ) from None


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise EnrollmentRefused(400, "malformed", "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise EnrollmentRefused(400, "malformed", "the request body must be a JSON object")
    return data


def _csr_text(data: Mapping[str, Any]) -> bytes:
    csr = data.get("csr")
    if not isinstance(csr, str) or not csr:
        raise EnrollmentRefused(400, "bad-csr", "csr must be a PEM certificate signing request")
    return csr.encode()


@dataclass(frozen=True)
class EnrollRequest:
    """A verified enrollment request (signature, freshness and fields checked; not yet replay)."""

    device_id: str
    public_key: str
    csr: bytes
    facts: dict[str, object]
    labels: dict[str, str]
    token: str | None
    digest: str
    date: int


def parse_enroll_request(
    headers: Mapping[str, str], method: str, path: str, body: bytes, now: float
) -> EnrollRequest:
    """Check an enrollment request's proof of possession and fields (sans-I/O; see Rules)."""
    signed = signed_headers(headers, now)
    data = _json_body(body)
    public_key = data.get("public_key")
    try:
        if not isinstance(public_key, str):
            raise ValueError("not a string")
        key = key_from_raw(bytes.fromhex(public_key))
    except ValueError:
        raise EnrollmentRefused(
            400, "malformed", "public_key must be 64 hex digits (a raw Ed25519 key)"
        ) from None
    device_id = device_id_for(key)
    if signed.device_id != device_id:
        raise EnrollmentRefused(
            401,
            "id-mismatch",
            f"Fleet-Device {signed.device_id} is not the id of the key in the request "
            f"({device_id})",
        )
    message = body_message(method, path, signed.date, device_id, body)
    _verify(key, message, signed.signature, device_id)
    try:
        facts = _validate_facts(data.get("facts", {}))
        labels = validate_labels(data.get("labels", {}))
    except ValueError as exc:
        raise EnrollmentRefused(400, "malformed", str(exc)) from None
    token = data.get("token")
    if token is not None and (not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS):
        raise EnrollmentRefused(400, "malformed", "token must be a string")
    return EnrollRequest(
        device_id=device_id,
        public_key=public_key.lower(),
        csr=_csr_text(data),
        facts=facts,
        labels=labels,
        token=token or None,
        digest=hashlib.sha256(message).hexdigest(),
        date=signed.date,
    )


@dataclass(frozen=True)
class RenewRequest:
    device: Device
    csr: bytes
    digest: str
    date: int


async def parse_renew_request(
    headers: Mapping[str, str], method: str, path: str, body: bytes, now: float
) -> RenewRequest:
    """A renewal signed by an enrolled device's key, with a CSR; EnrollmentRefused if not."""
    signed = signed_headers(headers, now)
    device = await Device.get_or_none(id=signed.device_id)
    if device is None:
        raise EnrollmentRefused(
            401, "unknown-device", "not a device of this fleet; enroll with fleet-agent enroll"
        )
    message = body_message(method, path, signed.date, device.id, body)
    _verify(key_from_raw(bytes.fromhex(device.public_key)), message, signed.signature, device.id)
    if device.state != "enrolled":
        raise _not_enrolled(device)
    csr = _csr_text(_json_body(body))
    return RenewRequest(device, csr, hashlib.sha256(message).hexdigest(), signed.date)


async def authenticate_poll(
    headers: Mapping[str, str], method: str, path: str, now: float
) -> Device:
    """The device (in any state) that signed this body-less request (`ota.request_auth`)."""
    device_id = headers.get(DEVICE_HEADER, "")
    device = await Device.get_or_none(id=device_id) if _DEVICE_ID.fullmatch(device_id) else None
    key = key_from_raw(bytes.fromhex(device.public_key)) if device is not None else None
    try:
        verify_request(headers, method, path, now, lambda _: key)
    except RequestAuthError as exc:
        if exc.kind in ("unknown-device", "bad-signature"):
            raise EnrollmentRefused(
                401,
                exc.kind,
                "not a device of this fleet, or a bad signature; enroll with fleet-agent enroll",
            ) from None
        raise EnrollmentRefused(401, exc.kind, str(exc)) from None
    assert device is not None
    return device


def _not_enrolled(device: Device) -> EnrollmentRefused:
    if device.state == "rejected":
        return EnrollmentRefused(
            403, "rejected", f"device {device.id} was rejected by an operator of this fleet"
        )
    return EnrollmentRefused(
        403, "not-enrolled", f"device {device.id} is {device.state}, not enrolled"
    )


# Replays.


async def remember_request(digest: str, device_id: str, date: int, now: datetime) -> None:
    """Record a signed request as seen; EnrollmentRefused(409) if it was seen before."""
    await EnrollmentSignature.filter(expires_at__lt=now - timedelta(seconds=5)).delete()
    expires_at = datetime.fromtimestamp(date + MAX_CLOCK_SKEW_S, now.tzinfo)
    try:
        await EnrollmentSignature.create(digest=digest, device_id=device_id, expires_at=expires_at)
    except IntegrityError:
        raise EnrollmentRefused(
            409, "replayed", "this signed request was already received (a replay)"
        ) from None


# Enrollment.


@dataclass(frozen=True)
class Issuer:
    """What enrollment needs from the controller: the CA and the certificate lifetime."""

    ca: FleetCA
    cert_lifetime: timedelta

    def issue(self, device: Device, csr: bytes, now: datetime) -> None:
        """Issue `device` a certificate for `csr` and set its cert fields (not saved)."""
        try:
            issued = self.ca.issue_device(csr, device.id, now, self.cert_lifetime)
        except CsrError as exc:
            raise EnrollmentRefused(400, exc.kind, str(exc)) from None
        device.csr = csr.decode()
        device.cert = issued.pem.decode()
        device.cert_serial = issued.serial_hex
        device.cert_not_after = issued.not_after


@dataclass(frozen=True)
class EnrollOutcome:
    device: Device
    created: bool
    via_token: int | None


async def enroll(issuer: Issuer, request: EnrollRequest, now: datetime) -> EnrollOutcome:
    """Decide an enrollment request that passed `parse_enroll_request` (see Rules)."""
    await remember_request(request.digest, request.device_id, request.date, now)
    try:
        issuer.ca.check_device_csr(request.csr, request.device_id)
    except CsrError as exc:
        raise EnrollmentRefused(400, exc.kind, str(exc)) from None
    known = await Device.get_or_none(id=request.device_id)
    if known is not None and known.state == "rejected":
        raise _not_enrolled(known)
    # A token is checked only when it would be used: an enrolled device enrolling again (say a
    # provisioning script run at every boot) neither needs nor consumes one.
    wanted = request.token is not None and (known is None or known.state == "pending")
    token = await _usable_token(request.token, now) if wanted and request.token else None
    try:
        return await _enroll(issuer, request, token, now)
    except IntegrityError:
        # Another request created the device meanwhile: decide again, as for a known device.
        return await _enroll(issuer, request, token, now)


async def _enroll(
    issuer: Issuer, request: EnrollRequest, token: EnrollmentToken | None, now: datetime
) -> EnrollOutcome:
    async with in_transaction():
        device = await Device.get_or_none(id=request.device_id)
        created = device is None
        if device is None:
            if token is None and await Device.filter(state="pending").count() >= (
                MAX_PENDING_DEVICES
            ):
                raise EnrollmentRefused(
                    429,
                    "pending-full",
                    f"{MAX_PENDING_DEVICES} devices already wait for approval; try again later "
                    "or enroll with a token",
                )
            device = await Device.create(
                id=request.device_id,
                public_key=request.public_key,
                state="pending",
                labels=request.labels,
            )
        elif device.public_key.lower() != request.public_key:
            raise EnrollmentRefused(409, "key-conflict", "another key holds this device id")
        if device.state == "rejected":
            raise _not_enrolled(device)
        used_token: int | None = None
        if device.state == "pending" and token is not None:
            await _consume(token, now)
            device.labels = {**device.labels, **token.labels}
            device.state = "enrolled"
            device.enrolled_at = now
            device.enrollment_token_id = token.id
            used_token = token.id
        device.facts = request.facts
        version = request.facts.get("agent_version")
        device.agent_version = version if isinstance(version, str) else None
        device.last_seen_at = now
        device.csr = request.csr.decode()
        if device.state == "enrolled":
            issuer.issue(device, request.csr, now)
        await device.save()
    return EnrollOutcome(device, created, used_token)


async def _usable_token(token: str, now: datetime) -> EnrollmentToken:
    row = await EnrollmentToken.get_or_none(token_hash=hash_token(token))
    if row is None:
        raise EnrollmentRefused(403, "token-unknown", "the enrollment token is not known")
    _check_token(row, now)
    return row


def _check_token(row: EnrollmentToken, now: datetime) -> None:
    if row.revoked_at is not None:
        raise EnrollmentRefused(403, "token-revoked", f"enrollment token {row.id} was revoked")
    if row.expires_at <= now:
        raise EnrollmentRefused(403, "token-expired", f"enrollment token {row.id} has expired")
    if row.used >= row.uses:
        raise EnrollmentRefused(
            403, "token-exhausted", f"enrollment token {row.id} has no uses left"
        )


async def _consume(token: EnrollmentToken, now: datetime) -> None:
    """Take one use of `token`, atomically with its checks (two devices cannot share a use)."""
    taken = await EnrollmentToken.filter(
        id=token.id, revoked_at=None, expires_at__gt=now, used__lt=F("uses")
    ).update(used=F("used") + 1, last_used_at=now)
    if taken != 1:
        fresh = await EnrollmentToken.get(id=token.id)
        _check_token(fresh, now)
        raise EnrollmentRefused(
            403, "token-exhausted", f"enrollment token {token.id} has no uses left"
        )


async def poll(issuer: Issuer, device: Device, now: datetime) -> Device:
    """A device asks for its state: once enrolled, it gets a certificate if it has none valid."""
    device.last_seen_at = now
    fields = ["last_seen_at"]
    current = device.cert is not None and (
        device.cert_not_after is not None and device.cert_not_after > now
    )
    if device.state == "enrolled" and device.csr and not current:
        issuer.issue(device, device.csr.encode(), now)
        fields += ["csr", "cert", "cert_serial", "cert_not_after"]
    await device.save(update_fields=fields)
    return device


async def renew(issuer: Issuer, request: RenewRequest, now: datetime) -> Device:
    """A new certificate for an enrolled device's CSR (after `parse_renew_request`)."""
    await remember_request(request.digest, request.device.id, request.date, now)
    device = request.device
    issuer.issue(device, request.csr, now)
    device.last_seen_at = now
    await device.save(
        update_fields=["csr", "cert", "cert_serial", "cert_not_after", "last_seen_at"]
    )
    return device


def enrollment_json(device: Device, ca_pem: bytes, broker_url: str | None) -> dict[str, Any]:
    """What a device learns about itself: state, labels, and once enrolled its certificate."""
    enrolled = device.state == "enrolled"
    return {
        "device_id": device.id,
        "state": device.state,
        "labels": device.labels,
        "certificate": device.cert if enrolled else None,
        "cert_serial": device.cert_serial if enrolled else None,
        "cert_not_after": _iso(device.cert_not_after) if enrolled else None,
        "ca_certificate": ca_pem.decode(),
        "broker_url": broker_url if enrolled else None,
        "poll_after_s": POLL_AFTER_S if device.state == "pending" else None,
    }


# Enrollment tokens.


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_state(row: EnrollmentToken, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at <= now:
        return "expired"
    if row.used >= row.uses:
        return "exhausted"
    return "active"


def token_json(row: EnrollmentToken, now: datetime) -> dict[str, Any]:
    return {
        "id": row.id,
        "uses": row.uses,
        "used": row.used,
        "labels": row.labels,
        "expires_at": _iso(row.expires_at),
        "created_by": row.created_by,
        "created_at": _iso(row.created_at),
        "last_used_at": _iso(row.last_used_at),
        "revoked_at": _iso(row.revoked_at),
        "state": token_state(row, now),
    }


async def create_token(
    uses: object, ttl_s: object, labels: object, created_by: str, now: datetime
) -> tuple[EnrollmentToken, str]:
    """A new enrollment token (its row, and the token itself, to be shown once)."""
    if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_TOKEN_USES:
        raise DeviceError(400, f"uses must be a whole number from 1 to {MAX_TOKEN_USES}")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float):
        raise DeviceError(400, "ttl_s must be a number of seconds")
    if not MIN_TOKEN_TTL.total_seconds() <= ttl_s <= MAX_TOKEN_TTL.total_seconds():
        raise DeviceError(400, "ttl_s must be from 1 second to 365 days")
    try:
        checked = validate_labels(labels)
    except ValueError as exc:
        raise DeviceError(400, str(exc)) from None
    token = new_token()
    row = await EnrollmentToken.create(
        token_hash=hash_token(token),
        uses=uses,
        labels=checked,
        expires_at=now + timedelta(seconds=ttl_s),
        created_by=created_by,
    )
    return row, token


async def revoke_token(token_id: str, now: datetime) -> EnrollmentToken:
    row = await EnrollmentToken.get_or_none(id=int(token_id)) if token_id.isdigit() else None
    if row is None:
        raise DeviceError(404, f"no enrollment token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = now
        await row.save(update_fields=["revoked_at"])
    return row


# Operators' decisions about devices.


async def get_device(device_id: str) -> Device:
    device = await Device.get_or_none(id=device_id) if _DEVICE_ID.fullmatch(device_id) else None
    if device is None:
        raise DeviceError(404, f"no device {device_id}")
    return device


async def approve(device_id: str, now: datetime) -> tuple[Device, bool]:
    """Enroll a pending (or rejected) device; (the device, whether it changed)."""
    device = await get_device(device_id)
    if device.state == "enrolled":
        return device, False
    device.state = "enrolled"
    device.enrolled_at = now
    await device.save(update_fields=["state", "enrolled_at"])
    return device, True


async def reject(device_id: str) -> tuple[Device, bool]:
    """Reject a pending or enrolled device: it may no longer fetch updates or enroll."""
    device = await get_device(device_id)
    if device.state == "rejected":
        return device, False
    device.state = "rejected"
    await device.save(update_fields=["state"])
    return device, True


async def relabel(device_id: str, set_labels: object, remove: object) -> Device:
    """Set and remove labels of a device (removing a label it does not have is fine)."""
    device = await get_device(device_id)
    try:
        changes = validate_labels(set_labels, "set")
        if not isinstance(remove, list):
            raise ValueError("remove must be a list of label keys")
        removed = [validate_label_key(key) for key in remove]
        labels = {k: v for k, v in device.labels.items() if k not in removed} | changes
        validate_labels(labels)
    except ValueError as exc:
        raise DeviceError(400, str(exc)) from None
    device.labels = labels
    await device.save(update_fields=["labels"])
    return device


async def remove(device_id: str) -> Device:
    """Forget a device: it can no longer fetch anything; enrolling again makes it a new device."""
    device = await get_device(device_id)
    await device.delete()
    return device


def matches(device: Device, state: str | None, selector: Mapping[str, str]) -> bool:
    if state is not None and device.state != state:
        return False
    return all(device.labels.get(key) == value for key, value in selector.items())


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
