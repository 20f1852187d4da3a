"""ota.request_auth: devices sign their HTTP requests; the controller says why it refuses one."""

from __future__ import annotations

import base64
import hashlib

import pytest
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey

from attestation.identity import device_id_for
from ota.request_auth import (
    DATE_HEADER,
    DEVICE_HEADER,
    MAX_CLOCK_SKEW_S,
    SIGNATURE_HEADER,
    RequestAuthError,
    body_message,
    request_message,
    sign_body_request,
    sign_request,
    verify_request,
)

NOW = 1_800_000_000.0
PATH = "/tuf/targets/runes/acme/sine/abc.1.0.0?mirror=1"


class Device:
    def __init__(self) -> None:
        self.signer = CryptoSigner.generate_ed25519()
        key = self.signer.public_key
        assert isinstance(key, SSlibKey)
        self.key = key
        self.id = device_id_for(key)

    def sign(self, method: str = "GET", path: str = PATH, now: float = NOW) -> dict[str, str]:
        return sign_request(self.signer, self.id, method, path, now)


@pytest.fixture
def device() -> Device:
    return Device()


@pytest.fixture
def other() -> Device:
    return Device()


@pytest.fixture
def registry(device: Device, other: Device) -> dict[str, SSlibKey]:
    return {device.id: device.key, other.id: other.key}


def _refused(
    headers: dict[str, str],
    registry: dict[str, SSlibKey],
    *,
    method: str = "GET",
    path: str = PATH,
    now: float = NOW,
) -> RequestAuthError:
    with pytest.raises(RequestAuthError) as caught:
        verify_request(headers, method, path, now, registry.get)
    return caught.value


def test_a_signed_request_verifies(device: Device, registry: dict[str, SSlibKey]) -> None:
    headers = device.sign()
    assert set(headers) == {DEVICE_HEADER, DATE_HEADER, SIGNATURE_HEADER}
    assert headers[DEVICE_HEADER] == device.id
    assert headers[DATE_HEADER] == str(int(NOW))
    assert len(base64.b64decode(headers[SIGNATURE_HEADER], validate=True)) == 64
    assert verify_request(headers, "GET", PATH, NOW, registry.get) == device.id


def test_the_method_is_case_insensitive(device: Device, registry: dict[str, SSlibKey]) -> None:
    assert verify_request(device.sign("get"), "GET", PATH, NOW, registry.get) == device.id
    assert verify_request(device.sign("GET"), "get", PATH, NOW, registry.get) == device.id


def test_the_date_is_whole_seconds(device: Device, registry: dict[str, SSlibKey]) -> None:
    headers = device.sign(now=NOW + 0.9)
    assert headers[DATE_HEADER] == str(int(NOW))
    assert verify_request(headers, "GET", PATH, NOW + 0.9, registry.get) == device.id


def test_the_signed_message_has_one_field_a_line() -> None:
    assert request_message("get", "/a?b=c", 12, "dabc") == b"fleet-request/1\nGET\n/a?b=c\n12\ndabc"


def test_a_body_request_signs_the_request_line_and_the_body_digest(device: Device) -> None:
    body = b'{"csr": "x"}'
    message = body_message("post", "/api/v1/enroll", 12, "dabc", body)
    assert message == request_message("POST", "/api/v1/enroll", 12, "dabc") + (
        b"\n" + hashlib.sha256(body).hexdigest().encode()
    )
    assert body_message("POST", "/api/v1/enroll", 12, "dabc", body + b" ") != message
    headers = sign_body_request(device.signer, device.id, "POST", "/api/v1/enroll", body, NOW)
    signature = Signature(device.key.keyid, base64.b64decode(headers[SIGNATURE_HEADER]).hex())
    signed = body_message("POST", "/api/v1/enroll", int(NOW), device.id, body)
    device.key.verify_signature(signature, signed)
    assert headers[DEVICE_HEADER] == device.id and headers[DATE_HEADER] == str(int(NOW))


@pytest.mark.parametrize("header", [DEVICE_HEADER, DATE_HEADER, SIGNATURE_HEADER])
def test_a_missing_header_is_unsigned(
    device: Device, registry: dict[str, SSlibKey], header: str
) -> None:
    headers = device.sign()
    del headers[header]
    assert _refused(headers, registry).kind == "unsigned"
    headers[header] = ""
    assert _refused(headers, registry).kind == "unsigned"


def test_no_headers_is_unsigned(registry: dict[str, SSlibKey]) -> None:
    error = _refused({}, registry)
    assert error.kind == "unsigned"
    assert str(error) == "unsigned request"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (DATE_HEADER, "soon"),
        (DATE_HEADER, "1800000000.5"),
        (DATE_HEADER, "0x6b49d200"),
        (SIGNATURE_HEADER, "not base64!"),
        (SIGNATURE_HEADER, "abc"),  # bad padding
        (SIGNATURE_HEADER, "YWJj\nZGVm"),  # characters outside the alphabet
    ],
)
def test_malformed_headers(
    device: Device, registry: dict[str, SSlibKey], header: str, value: str
) -> None:
    headers = device.sign()
    headers[header] = value
    assert _refused(headers, registry).kind == "malformed"


@pytest.mark.parametrize("offset", [MAX_CLOCK_SKEW_S + 1, -(MAX_CLOCK_SKEW_S + 1), 86_400, -86_400])
def test_a_request_too_far_off_the_clock_is_refused(
    device: Device, registry: dict[str, SSlibKey], offset: int
) -> None:
    headers = device.sign(now=NOW + offset)
    error = _refused(headers, registry)
    assert error.kind == "clock"
    assert str(-offset) in str(error)


@pytest.mark.parametrize("offset", [MAX_CLOCK_SKEW_S, -MAX_CLOCK_SKEW_S, 1, -1, 0])
def test_a_request_just_inside_the_skew_is_accepted(
    device: Device, registry: dict[str, SSlibKey], offset: int
) -> None:
    headers = device.sign(now=NOW + offset)
    assert verify_request(headers, "GET", PATH, NOW, registry.get) == device.id


def test_the_clock_is_checked_before_the_key_is_looked_up(device: Device) -> None:
    looked_up: list[str] = []

    def key_for(device_id: str) -> SSlibKey | None:
        looked_up.append(device_id)
        return device.key

    with pytest.raises(RequestAuthError) as caught:
        verify_request(device.sign(now=NOW - 3600), "GET", PATH, NOW, key_for)
    assert caught.value.kind == "clock"
    assert looked_up == []


def test_an_unknown_device_is_refused(device: Device) -> None:
    error = _refused(device.sign(), {})
    assert error.kind == "unknown-device"
    assert device.id in str(error)


def test_a_tampered_path_is_a_bad_signature(device: Device, registry: dict[str, SSlibKey]) -> None:
    error = _refused(device.sign(), registry, path=PATH.replace("sine", "evil"))
    assert error.kind == "bad-signature"
    assert device.id in str(error)
    assert _refused(device.sign(), registry, path=PATH + "&x=1").kind == "bad-signature"
    assert _refused(device.sign(), registry, path=PATH.split("?")[0]).kind == "bad-signature"


def test_a_tampered_method_is_a_bad_signature(
    device: Device, registry: dict[str, SSlibKey]
) -> None:
    assert _refused(device.sign("GET"), registry, method="POST").kind == "bad-signature"
    assert _refused(device.sign("GET"), registry, method="HEAD").kind == "bad-signature"


def test_a_tampered_date_is_a_bad_signature(device: Device, registry: dict[str, SSlibKey]) -> None:
    headers = device.sign()
    headers[DATE_HEADER] = str(int(NOW) + 1)  # still well inside the skew window
    assert _refused(headers, registry).kind == "bad-signature"


def test_another_devices_id_is_a_bad_signature(
    device: Device, other: Device, registry: dict[str, SSlibKey]
) -> None:
    headers = device.sign()
    headers[DEVICE_HEADER] = other.id  # claim to be another known device
    error = _refused(headers, registry)
    assert error.kind == "bad-signature"
    assert other.id in str(error)


def test_a_signature_by_another_key_is_a_bad_signature(
    device: Device, other: Device, registry: dict[str, SSlibKey]
) -> None:
    # The other device signs a request naming `device`.
    headers = sign_request(other.signer, device.id, "GET", PATH, NOW)
    assert _refused(headers, registry).kind == "bad-signature"


@pytest.mark.parametrize(
    "signature",
    [b"", b"\x00" * 64, b"\x01" * 63, b"\x01" * 65],
)
def test_a_forged_signature_is_a_bad_signature(
    device: Device, registry: dict[str, SSlibKey], signature: bytes
) -> None:
    headers = device.sign()
    headers[SIGNATURE_HEADER] = base64.b64encode(signature).decode()
    kind = _refused(headers, registry).kind
    # An empty header is "unsigned"; every other value fails the signature check.
    assert kind == ("unsigned" if not signature else "bad-signature")


def test_a_flipped_signature_bit_is_a_bad_signature(
    device: Device, registry: dict[str, SSlibKey]
) -> None:
    headers = device.sign()
    raw = bytearray(base64.b64decode(headers[SIGNATURE_HEADER]))
    raw[10] ^= 0x01
    headers[SIGNATURE_HEADER] = base64.b64encode(bytes(raw)).decode()
    assert _refused(headers, registry).kind == "bad-signature"


def test_request_auth_error_is_an_exception_with_a_kind() -> None:
    error = RequestAuthError("clock", "too late")
    assert isinstance(error, Exception)
    assert error.kind == "clock"
    assert str(error) == "too late"
