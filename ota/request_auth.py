"""Signed HTTP requests from devices: what is signed, and how the controller checks it.

Rules:
- A device signs `fleet-request/1`, the method, the path with its query, the time and its device
  id, each on its own line, with its identity key; the signature and the two values go in the
  `Fleet-Device`, `Fleet-Date` and `Fleet-Signature` headers.
- The controller accepts a request only when the device is known, the signature verifies with that
  device's key and the time is within `MAX_CLOCK_SKEW_S` of its own. The reason for a refusal is
  returned so it can be logged and counted; the client only learns "401".
- A request with a body (enrollment, renewal) signs the same lines plus the body's SHA-256
  (`body_message`), so no byte of the body can be changed; device and controller both use this
  one definition.
- Only the request line is signed, not `Range`: the response bytes are TUF-verified anyway, so a
  replay within the skew window gains an eavesdropper nothing it could not fetch by replaying.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Mapping

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey

DEVICE_HEADER = "Fleet-Device"
DATE_HEADER = "Fleet-Date"
SIGNATURE_HEADER = "Fleet-Signature"
# Not part of the signature: a device's attestation result, signed by the controller itself.
PASSPORT_HEADER = "Fleet-Attestation"
MAX_CLOCK_SKEW_S = 300


class RequestAuthError(Exception):
    """Why a signed request was refused; `kind` is a short tag for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def request_message(method: str, path: str, date: int, device_id: str) -> bytes:
    return f"fleet-request/1\n{method.upper()}\n{path}\n{date}\n{device_id}".encode()


def body_message(method: str, path: str, date: int, device_id: str, body: bytes) -> bytes:
    """What a device signs for a request with a body: the request line and the body's SHA-256."""
    digest = hashlib.sha256(body).hexdigest()
    return request_message(method, path, date, device_id) + b"\n" + digest.encode()


def sign_request(
    signer: CryptoSigner, device_id: str, method: str, path: str, now: float
) -> dict[str, str]:
    date = int(now)
    return _headers(signer.sign(request_message(method, path, date, device_id)), device_id, date)


def sign_body_request(
    signer: CryptoSigner, device_id: str, method: str, path: str, body: bytes, now: float
) -> dict[str, str]:
    """The `Fleet-*` headers for a request with `body` (see `body_message`)."""
    date = int(now)
    message = body_message(method, path, date, device_id, body)
    return _headers(signer.sign(message), device_id, date)


def _headers(signature: Signature, device_id: str, date: int) -> dict[str, str]:
    encoded = base64.b64encode(bytes.fromhex(signature.signature)).decode()
    return {DEVICE_HEADER: device_id, DATE_HEADER: str(date), SIGNATURE_HEADER: encoded}


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    now: float,
    key_for: Callable[[str], SSlibKey | None],
) -> str:
    """The device id of a correctly signed request; `RequestAuthError` otherwise."""
    device_id = headers.get(DEVICE_HEADER)
    date_text = headers.get(DATE_HEADER)
    signature_text = headers.get(SIGNATURE_HEADER)
    if not device_id or not date_text or not signature_text:
        raise RequestAuthError("unsigned", "unsigned request")
    try:
        date = int(date_text)
        raw_signature = base64.b64decode(signature_text, validate=True)
    except (ValueError, binascii.Error):
        raise RequestAuthError("malformed", "malformed signature headers") from None
    if abs(now - date) > MAX_CLOCK_SKEW_S:
        raise RequestAuthError(
            "clock", f"request time is {int(now - date)} s off the controller's clock"
        )
    key = key_for(device_id)
    if key is None:
        raise RequestAuthError("unknown-device", f"unknown device {device_id}")
    signature = Signature(key.keyid, raw_signature.hex())
    try:
        key.verify_signature(signature, request_message(method, path, date, device_id))
    except (UnverifiedSignatureError, VerificationError):
        raise RequestAuthError("bad-signature", f"bad signature from {device_id}") from None
    return device_id
