"""Enrollment and certificate renewal, on the device: `fleet-agent enroll` and `renew_if_due`.

Rules:
- The identity key (`identity.pem`, made on first use, mode 0600) never leaves the device. An
  enrollment request carries its public key, a CSR made with it (subject exactly `CN=<device
  id>`), the device's facts and optional token and labels, and is signed with it (proof of
  possession): `Fleet-Device`, `Fleet-Date` and `Fleet-Signature` over the request line and the
  SHA-256 of the body (`ota.request_auth.body_message`). A random nonce in the body makes every
  request unique, so the controller can refuse a replayed one.
- The fleet's `root.json` is made the device's TUF trust anchor (`agent.update.provision_root`,
  once) before anything is sent.
- What the controller answers is kept in `enrollment.json` (device id, server, broker URL, state,
  certificate serial and validity) and `mqtt/device.crt` + `mqtt/ca.crt`. Every file is replaced
  whole (temporary file, fsync, rename, directory fsync); `enrollment.json` is written last. A
  certificate is kept only if it names this device, holds this device's key and is issued by the
  CA certificate that came with it. A device that is not enrolled keeps no `device.crt`.
- A certificate is renewed once less than a third of its lifetime remains (`renew_if_due`).
- The controller refusing (bad token, rejected device, bad request) is `EnrollRefused`: do not
  retry as is. A controller that cannot be reached, is overloaded or fails is
  `EnrollUnavailable`: retry later. Unusable local state is `EnrollStateError`.
"""

from __future__ import annotations

import contextlib
import json
import platform
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from agent.durable import write_atomically
from attestation.identity import IDENTITY_FILE, DeviceIdentity
from attestation.keys import KeyFileError, raw_public_bytes
from ota.request_auth import sign_body_request, sign_request

ENROLLMENT_FILE = "enrollment.json"
MQTT_DIR = "mqtt"
DEVICE_CERT_FILE = "device.crt"
CA_CERT_FILE = "ca.crt"
ENROLL_PATH = "/api/v1/enroll"
RENEW_PATH = "/api/v1/enroll/renew"
RENEW_WHEN_LEFT = 1 / 3
HTTP_TIMEOUT_S = 30.0


class EnrollError(Exception):
    """Enrollment did not complete; `status` is the controller's HTTP status, if it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EnrollRefused(EnrollError):
    """The controller refused (or answered something unusable): retrying as is will not help."""


class EnrollUnavailable(EnrollError):
    """The controller could not be reached or could not answer now: try again later."""


class EnrollStateError(EnrollError):
    """The device's own state (identity key, enrollment file) cannot be used."""


@dataclass(frozen=True)
class Enrollment:
    """What the device knows about its enrollment (`enrollment.json`)."""

    device_id: str
    server: str
    state: str
    broker_url: str | None = None
    labels: dict[str, str] | None = None
    cert_serial: str | None = None
    cert_not_before: float | None = None
    cert_not_after: float | None = None
    updated_at: float | None = None

    @property
    def enrolled(self) -> bool:
        return self.state == "enrolled"

    def renewal_due(self, now: float) -> bool:
        """Whether less than a third of the certificate's lifetime is left (or it has none)."""
        if self.cert_not_before is None or self.cert_not_after is None:
            return True
        lifetime = self.cert_not_after - self.cert_not_before
        return self.cert_not_after - now < lifetime * RENEW_WHEN_LEFT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def enrollment_file(state_dir: Path) -> Path:
    return state_dir / ENROLLMENT_FILE


def device_cert_file(state_dir: Path) -> Path:
    """The device's MQTT client certificate (its key is `identity.pem`)."""
    return state_dir / MQTT_DIR / DEVICE_CERT_FILE


def ca_cert_file(state_dir: Path) -> Path:
    """The fleet CA certificate: the broker's certificate must chain to it."""
    return state_dir / MQTT_DIR / CA_CERT_FILE


def load_enrollment(state_dir: Path) -> Enrollment | None:
    """The saved enrollment, or None if this device never enrolled."""
    path = enrollment_file(state_dir)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EnrollStateError(f"{path}: cannot read it ({exc})") from None
    try:
        return Enrollment(**data)
    except TypeError as exc:
        raise EnrollStateError(f"{path} is not an enrollment record ({exc})") from None


# The request.


def device_facts() -> dict[str, object]:
    """What the device tells the controller about itself (no sensor data, nothing secret)."""
    from agent.update import agent_version

    boot_id = None
    with contextlib.suppress(OSError):
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    facts: dict[str, object] = {
        "agent_version": agent_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "boot_id": boot_id,
        "hostname": socket.gethostname(),
    }
    return {k: v[:256] if isinstance(v, str) else v for k, v in facts.items()}


def _private_key(state_dir: Path, identity: DeviceIdentity) -> Ed25519PrivateKey:
    path = state_dir / IDENTITY_FILE
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise EnrollStateError(f"{path}: cannot load the identity key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey) or key.public_key().public_bytes_raw() != (
        raw_public_bytes(identity.public_key)
    ):
        raise EnrollStateError(f"{path} is not this device's Ed25519 identity key")
    return key


def make_csr(key: Ed25519PrivateKey, device_id: str) -> bytes:
    """A CSR for the identity key, subject exactly CN=<device id>."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, None)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def enrollment_body(
    identity: DeviceIdentity,
    csr: bytes,
    facts: Mapping[str, object],
    token: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "public_key": raw_public_bytes(identity.public_key).hex(),
        "csr": csr.decode(),
        "facts": dict(facts),
        "labels": dict(labels or {}),
        "nonce": secrets.token_hex(16),
    }
    if token:
        body["token"] = token
    return json.dumps(body, sort_keys=True).encode()


# Talking to the controller.


def _check_server(server: str) -> str:
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--server {server!r} is not an http:// or https:// URL")
    return server.rstrip("/")


def _call(
    server: str, method: str, path: str, headers: dict[str, str], body: bytes | None
) -> dict[str, Any]:
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10.0, read=HTTP_TIMEOUT_S), retries=False
    )
    if body is not None:
        headers = {**headers, "Content-Type": "application/json"}
    try:
        response = http.request(method, server + path, body=body, headers=headers)
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise EnrollUnavailable(f"cannot reach the controller at {server} ({reason})") from None
    message = f"HTTP {response.status}"
    try:
        data = json.loads(response.data)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        message = data["error"]
    if response.status == 429 or response.status >= 500:
        raise EnrollUnavailable(f"the controller cannot enroll now: {message}", response.status)
    if response.status >= 400:
        raise EnrollRefused(message, response.status)
    if not isinstance(data, dict) or not isinstance(data.get("state"), str):
        raise EnrollRefused(f"the controller's answer is not an enrollment ({message})")
    return data


def _store(
    state_dir: Path, server: str, identity: DeviceIdentity, answer: dict[str, Any], now: float
) -> Enrollment:
    """Check the controller's answer and keep it (see Rules)."""
    if answer.get("device_id") != identity.device_id:
        raise EnrollRefused("the controller answered for another device id")
    state = answer["state"]
    ca_pem = answer.get("ca_certificate")
    cert_pem = answer.get("certificate")
    if not isinstance(ca_pem, str):
        raise EnrollRefused("the controller's answer has no CA certificate")
    ca = _load_cert(ca_pem, "CA certificate")
    cert = None
    if state == "enrolled" and isinstance(cert_pem, str):
        cert = _load_cert(cert_pem, "device certificate")
        _check_cert(cert, ca, identity)
    _write_atomic(ca_cert_file(state_dir), ca_pem.encode())
    not_before = not_after = None
    serial = None
    if cert is not None:
        serial = format(cert.serial_number, "x")
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
        _write_atomic(device_cert_file(state_dir), cert.public_bytes(serialization.Encoding.PEM))
    elif state != "enrolled":
        device_cert_file(state_dir).unlink(missing_ok=True)
    else:  # enrolled by key (`fleetctl devices register`) and no certificate issued yet
        previous = load_enrollment(state_dir)
        if previous is not None and previous.enrolled:
            serial = previous.cert_serial
            not_before, not_after = previous.cert_not_before, previous.cert_not_after
    broker = answer.get("broker_url")
    labels = answer.get("labels")
    enrollment = Enrollment(
        device_id=identity.device_id,
        server=server,
        state=str(state),
        broker_url=broker if isinstance(broker, str) else None,
        labels=labels if isinstance(labels, dict) else None,
        cert_serial=serial,
        cert_not_before=not_before,
        cert_not_after=not_after,
        updated_at=now,
    )
    _write_atomic(
        enrollment_file(state_dir),
        json.dumps(enrollment.to_json(), indent=1, sort_keys=True).encode(),
    )
    return enrollment


def _load_cert(pem: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise EnrollRefused(f"the controller sent a {what} that is not PEM X.509") from None


def _check_cert(cert: x509.Certificate, ca: x509.Certificate, identity: DeviceIdentity) -> None:
    public = cert.public_key()
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not isinstance(public, Ed25519PublicKey) or public.public_bytes_raw() != raw_public_bytes(
        identity.public_key
    ):
        raise EnrollRefused("the controller's certificate is not for this device's key")
    if [n.value for n in names] != [identity.device_id]:
        raise EnrollRefused("the controller's certificate does not name this device")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise EnrollRefused("the controller's certificate is not issued by its CA") from None


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, data, mode)


def _identity(state_dir: Path) -> DeviceIdentity:
    try:
        return DeviceIdentity.load_or_create(state_dir)
    except (KeyFileError, OSError) as exc:
        raise EnrollStateError(str(exc)) from None


# What the CLI and the daemon call.


def enroll(
    state_dir: Path,
    server: str,
    root_json: Path,
    token: str | None = None,
    labels: Mapping[str, str] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Enrollment:
    """Enroll (or enroll again) with `server`; the enrollment as the controller decided it.

    ValueError for a bad server URL or root.json (nothing sent); see Rules for the rest.
    """
    from agent.update import provision_root

    server = _check_server(server)
    identity = _identity(state_dir)
    provision_root(state_dir, root_json)
    key = _private_key(state_dir, identity)
    body = enrollment_body(
        identity, make_csr(key, identity.device_id), device_facts(), token, labels
    )
    now = clock()
    headers = sign_body_request(identity.signer, identity.device_id, "POST", ENROLL_PATH, body, now)
    answer = _call(server, "POST", ENROLL_PATH, headers, body)
    return _store(state_dir, server, identity, answer, now)


def poll(state_dir: Path, *, clock: Callable[[], float] = time.time) -> Enrollment:
    """Ask the controller for this device's state (and, once enrolled, its certificate)."""
    saved = _saved(state_dir)
    identity = _identity(state_dir)
    now = clock()
    headers = sign_request(identity.signer, identity.device_id, "GET", ENROLL_PATH, now)
    answer = _call(saved.server, "GET", ENROLL_PATH, headers, None)
    return _store(state_dir, saved.server, identity, answer, now)


def renew(state_dir: Path, *, clock: Callable[[], float] = time.time) -> Enrollment:
    """A new certificate for the identity key, whatever the current one's age."""
    saved = _saved(state_dir)
    identity = _identity(state_dir)
    key = _private_key(state_dir, identity)
    body = json.dumps(
        {"csr": make_csr(key, identity.device_id).decode(), "nonce": secrets.token_hex(16)}
    ).encode()
    now = clock()
    headers = sign_body_request(identity.signer, identity.device_id, "POST", RENEW_PATH, body, now)
    answer = _call(saved.server, "POST", RENEW_PATH, headers, body)
    return _store(state_dir, saved.server, identity, answer, now)


def renew_if_due(state_dir: Path, now: float, *, clock: Callable[[], float] = time.time) -> bool:
    """Renew the certificate if less than a third of its lifetime is left at `now` (Unix time).

    True if it was renewed. False if it is not due, or the device is not enrolled (nothing to
    renew; `poll` learns about an approval). Raises `EnrollUnavailable` (try again later) or
    `EnrollRefused` (the controller will not renew: rejected or removed). Requests are signed at
    `clock()`, the real time, whatever `now` is.
    """
    saved = load_enrollment(state_dir)
    if saved is None or not saved.enrolled or not saved.renewal_due(now):
        return False
    renew(state_dir, clock=clock)
    return True


def _saved(state_dir: Path) -> Enrollment:
    saved = load_enrollment(state_dir)
    if saved is None:
        raise EnrollStateError(
            f"{state_dir} holds no enrollment; run `fleet-agent enroll --server URL --root FILE`"
        )
    return saved


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()
