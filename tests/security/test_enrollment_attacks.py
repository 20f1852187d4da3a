"""Attacks on enrollment, against a real controller on SQLite and PostgreSQL.

Each attack sends real, correctly or deliberately wrongly signed requests (`agent.enroll` builds
them the way the agent does) and checks that it is refused with the right status, counted in
`fleet_enrollment_refused_total{reason}`, logged as a security event, and that nothing was
created: no device row, no token use consumed, no certificate issued.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.enroll import ENROLL_PATH, RENEW_PATH, device_facts, make_csr
from attestation.identity import DeviceIdentity, device_id_for
from attestation.keys import public_key_of, raw_public_bytes, signer_for
from ota.request_auth import (
    DATE_HEADER,
    DEVICE_HEADER,
    SIGNATURE_HEADER,
    body_message,
    sign_request,
)
from tests.controller import RunningController, is_error_body

REFUSED = "fleet_enrollment_refused_total"


@dataclass
class Applicant:
    """A would-be device: its own Ed25519 key, and the id derived from it."""

    key: Ed25519PrivateKey

    @classmethod
    def new(cls) -> Applicant:
        return cls(Ed25519PrivateKey.generate())

    @property
    def identity(self) -> DeviceIdentity:
        signer = signer_for(self.key)
        return DeviceIdentity(signer, device_id_for(public_key_of(signer)))

    @property
    def id(self) -> str:
        return self.identity.device_id

    @property
    def public_hex(self) -> str:
        return raw_public_bytes(self.identity.public_key).hex()

    def csr(self, common_name: str | None = None) -> str:
        name = self.id if common_name is None else common_name
        return (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(self.key, None)
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )

    def body(self, token: str | None = None, **changes: Any) -> bytes:
        """An enrollment body as the agent sends it (with a fresh nonce), plus `changes`."""
        data: dict[str, Any] = {
            "public_key": self.public_hex,
            "csr": make_csr(self.key, self.id).decode(),
            "facts": device_facts(),
            "labels": {},
            "nonce": secrets.token_hex(16),
        }
        if token is not None:
            data["token"] = token
        data.update(changes)
        return json.dumps(data).encode()

    def sign(
        self,
        body: bytes,
        *,
        claimed_id: str | None = None,
        date: float | None = None,
        path: str = ENROLL_PATH,
    ) -> dict[str, str]:
        """Fleet-* headers signed by this applicant's key (claiming `claimed_id` if given)."""
        device_id = claimed_id or self.id
        when = int(time.time() if date is None else date)
        signature = self.identity.signer.sign(body_message("POST", path, when, device_id, body))
        return {
            DEVICE_HEADER: device_id,
            DATE_HEADER: str(when),
            SIGNATURE_HEADER: base64.b64encode(bytes.fromhex(signature.signature)).decode(),
        }


def post(
    controller: RunningController, headers: dict[str, str], body: bytes, path: str = ENROLL_PATH
) -> tuple[int, Any]:
    response = controller.request(
        "POST", path, body=body, headers={**headers, "Content-Type": "application/json"}
    )
    return response.status, json.loads(response.data)


def make_token(controller: RunningController, uses: int = 1, ttl_s: float = 3600) -> dict[str, Any]:
    status, body = controller.api(
        "POST", "/api/v1/enrollment-tokens", json={"uses": uses, "ttl_s": ttl_s}
    )
    assert status == 201, body
    token: dict[str, Any] = body
    return token


def token_used(controller: RunningController, token_id: int) -> int:
    status, body = controller.api("GET", "/api/v1/enrollment-tokens")
    assert status == 200
    used: int = next(t["used"] for t in body["tokens"] if t["id"] == token_id)
    return used


def device_row(controller: RunningController, device_id: str) -> dict[str, Any] | None:
    status, body = controller.api("GET", f"/api/v1/devices/{device_id}")
    assert status in (200, 404), body
    return body if status == 200 else None


class Refusals:
    """Asserts a request was refused with `status`, counted once under `reason` and logged."""

    def __init__(self, controller: RunningController) -> None:
        self.controller = controller

    def expect(
        self, reason: str, status: int, headers: dict[str, str], body: bytes, **kw: Any
    ) -> str:
        before = self.controller.metric(REFUSED, reason=reason)
        got, answer = post(self.controller, headers, body, **kw)
        assert got == status and is_error_body(answer), (got, answer)
        assert self.controller.metric(REFUSED, reason=reason) == before + 1
        logged = [
            json.loads(line)
            for line in self.controller.stderr.splitlines()
            if '"security.enrollment_refused"' in line
        ]
        assert logged and logged[-1]["reason"] == reason, logged[-1:]
        message: str = answer["error"]
        return message


@pytest.fixture
def refusals(controller: RunningController) -> Refusals:
    return Refusals(controller)


def assert_nothing_created(controller: RunningController, device_id: str) -> None:
    assert device_row(controller, device_id) is None


# Replays.


def test_a_replayed_enrollment_is_refused_and_consumes_no_token_use(
    controller: RunningController, refusals: Refusals
) -> None:
    token = make_token(controller, uses=3)
    device = Applicant.new()
    body = device.body(token["token"])
    headers = device.sign(body)
    status, first = post(controller, headers, body)
    assert status == 201 and first["state"] == "enrolled", first
    serial = first["cert_serial"]
    assert token_used(controller, token["id"]) == 1

    message = refusals.expect("replayed", 409, headers, body)
    assert "already received" in message
    assert token_used(controller, token["id"]) == 1
    row = device_row(controller, device.id)
    assert row is not None and row["cert_serial"] == serial  # no certificate issued

    # The same signed bytes after the device was removed: the replay would enroll it again.
    status, _ = controller.api("DELETE", f"/api/v1/devices/{device.id}")
    assert status == 200
    refusals.expect("replayed", 409, headers, body)
    assert_nothing_created(controller, device.id)
    assert token_used(controller, token["id"]) == 1

    # A pending request replayed changes nothing either.
    waiting = Applicant.new()
    pending_body = waiting.body()
    pending_headers = waiting.sign(pending_body)
    status, answer = post(controller, pending_headers, pending_body)
    assert status == 201 and answer["state"] == "pending" and answer["certificate"] is None
    refusals.expect("replayed", 409, pending_headers, pending_body)


def test_a_replayed_renewal_is_refused(controller: RunningController, refusals: Refusals) -> None:
    token = make_token(controller)
    device = Applicant.new()
    body = device.body(token["token"])
    assert post(controller, device.sign(body), body)[0] == 201
    renew_body = json.dumps({"csr": device.csr(), "nonce": "n1"}).encode()
    renew_headers = device.sign(renew_body, path=RENEW_PATH)
    status, renewed = post(controller, renew_headers, renew_body, path=RENEW_PATH)
    assert status == 200 and renewed["certificate"], renewed
    refusals.expect("replayed", 409, renew_headers, renew_body, path=RENEW_PATH)
    row = device_row(controller, device.id)
    assert row is not None and row["cert_serial"] == renewed["cert_serial"]


# Certificate signing requests.


def test_a_csr_for_someone_elses_id_is_refused(
    controller: RunningController, refusals: Refusals
) -> None:
    token = make_token(controller)
    victim = Applicant.new()
    victim_body = victim.body(make_token(controller)["token"])
    assert post(controller, victim.sign(victim_body), victim_body)[0] == 201
    victim_serial = (device_row(controller, victim.id) or {})["cert_serial"]

    attacker = Applicant.new()
    body = attacker.body(token["token"], csr=attacker.csr(common_name=victim.id))
    message = refusals.expect("csr-id", 400, attacker.sign(body), body)
    assert f"the CSR is for {victim.id}, not this device" in message
    assert_nothing_created(controller, attacker.id)
    assert token_used(controller, token["id"]) == 0
    assert (device_row(controller, victim.id) or {})["cert_serial"] == victim_serial


def test_a_csr_with_another_key_is_refused(
    controller: RunningController, refusals: Refusals
) -> None:
    token = make_token(controller)
    device = Applicant.new()
    other = Applicant.new()
    csr = make_csr(other.key, device.id).decode()  # the device's name, someone else's key
    body = device.body(token["token"], csr=csr)
    message = refusals.expect("csr-key", 400, device.sign(body), body)
    assert "not this device's key" in message
    assert_nothing_created(controller, device.id)
    assert_nothing_created(controller, other.id)
    assert token_used(controller, token["id"]) == 0

    for bad_csr, reason in (("not a csr", "bad-csr"), ("", "bad-csr")):
        body = device.body(token["token"], csr=bad_csr)
        refusals.expect(reason, 400, device.sign(body), body)
    assert_nothing_created(controller, device.id)
    assert token_used(controller, token["id"]) == 0


# Proof of possession.


def test_a_request_signed_by_another_key_than_it_carries_is_refused(
    controller: RunningController, refusals: Refusals
) -> None:
    token = make_token(controller)
    victim = Applicant.new()
    attacker = Applicant.new()

    # The victim's public key (and even a CSR the attacker could not have made), the victim's
    # id, the attacker's signature.
    body = victim.body(token["token"])
    message = refusals.expect("bad-signature", 401, attacker.sign(body, claimed_id=victim.id), body)
    assert victim.id in message
    assert_nothing_created(controller, victim.id)

    # The attacker's own key, claiming the victim's id: the id comes from the key, not the client.
    body = attacker.body(token["token"])
    message = refusals.expect("id-mismatch", 401, attacker.sign(body, claimed_id=victim.id), body)
    assert f"is not the id of the key in the request ({attacker.id})" in message
    assert_nothing_created(controller, victim.id)
    assert_nothing_created(controller, attacker.id)

    # A body changed after it was signed (a token swapped in on the way).
    signed_body = attacker.body()
    headers = attacker.sign(signed_body)
    tampered = signed_body.replace(
        b'"labels": {}', b'"labels": {}, "token": "' + token["token"].encode() + b'"'
    )
    assert tampered != signed_body
    refusals.expect("bad-signature", 401, headers, tampered)
    assert_nothing_created(controller, attacker.id)
    assert token_used(controller, token["id"]) == 0


def test_stale_future_unsigned_and_malformed_requests_are_refused(
    controller: RunningController, refusals: Refusals
) -> None:
    token = make_token(controller)
    device = Applicant.new()
    body = device.body(token["token"])
    message = refusals.expect("clock", 401, device.sign(body, date=time.time() - 600), body)
    assert "off the controller's clock" in message
    refusals.expect("clock", 401, device.sign(body, date=time.time() + 600), body)
    refusals.expect("unsigned", 401, {}, body)
    garbled = {**device.sign(body), SIGNATURE_HEADER: "not base64!"}
    refusals.expect("malformed", 401, garbled, body)
    refusals.expect("malformed", 400, device.sign(b"[1, 2]"), b"[1, 2]")
    no_key = device.body(token["token"], public_key="zz")
    refusals.expect("malformed", 400, device.sign(no_key), no_key)
    bad_labels = device.body(token["token"], labels={"bad key": "x"})
    refusals.expect("malformed", 400, device.sign(bad_labels), bad_labels)
    huge = device.body(token["token"], facts={"hostname": "x" * 70_000})
    refusals.expect("too-large", 413, device.sign(huge), huge)
    assert_nothing_created(controller, device.id)
    assert token_used(controller, token["id"]) == 0


# Tokens.


def test_expired_exhausted_revoked_and_unknown_tokens_are_refused(
    controller: RunningController, refusals: Refusals
) -> None:
    expired = make_token(controller, ttl_s=1)
    exhausted = make_token(controller, uses=1)
    revoked = make_token(controller, uses=5)
    first = Applicant.new()
    first_body = first.body(exhausted["token"])
    assert post(controller, first.sign(first_body), first_body)[0] == 201
    assert controller.api("DELETE", f"/api/v1/enrollment-tokens/{revoked['id']}")[0] == 200
    time.sleep(1.2)

    device = Applicant.new()
    for token, reason in (
        (expired, "token-expired"),
        (exhausted, "token-exhausted"),
        (revoked, "token-revoked"),
    ):
        body = device.body(token["token"])
        message = refusals.expect(reason, 403, device.sign(body), body)
        assert f"enrollment token {token['id']}" in message
        assert_nothing_created(controller, device.id)
    assert token_used(controller, expired["id"]) == 0
    assert token_used(controller, exhausted["id"]) == 1
    assert token_used(controller, revoked["id"]) == 0

    body = device.body("fleet_enroll_guessed")
    refusals.expect("token-unknown", 403, device.sign(body), body)
    assert_nothing_created(controller, device.id)


def test_concurrent_enrollments_never_overuse_a_token(controller: RunningController) -> None:
    token = make_token(controller, uses=2)
    applicants = [Applicant.new() for _ in range(8)]
    requests = []
    for applicant in applicants:
        body = applicant.body(token["token"])
        requests.append((applicant.sign(body), body))
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda request: post(controller, *request), requests))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [201, 201] + [403] * 6, answers
    assert token_used(controller, token["id"]) == 2
    created = [a for a in applicants if device_row(controller, a.id) is not None]
    assert len(created) == 2


# Renewal.


def test_only_enrolled_devices_renew_for_their_own_key(
    controller: RunningController, refusals: Refusals
) -> None:
    pending = Applicant.new()
    body = pending.body()
    assert post(controller, pending.sign(body), body)[0] == 201
    renew = json.dumps({"csr": pending.csr()}).encode()
    refusals.expect(
        "not-enrolled", 403, pending.sign(renew, path=RENEW_PATH), renew, path=RENEW_PATH
    )
    assert (device_row(controller, pending.id) or {})["cert_serial"] is None

    stranger = Applicant.new()
    renew = json.dumps({"csr": stranger.csr()}).encode()
    refusals.expect(
        "unknown-device", 401, stranger.sign(renew, path=RENEW_PATH), renew, path=RENEW_PATH
    )

    device = Applicant.new()
    body = device.body(make_token(controller)["token"])
    assert post(controller, device.sign(body), body)[0] == 201
    serial = (device_row(controller, device.id) or {})["cert_serial"]
    other = Applicant.new()
    renew = json.dumps({"csr": make_csr(other.key, device.id).decode()}).encode()
    refusals.expect("csr-key", 400, device.sign(renew, path=RENEW_PATH), renew, path=RENEW_PATH)
    renew = json.dumps({"csr": device.csr()}).encode()
    forged = other.sign(renew, claimed_id=device.id, path=RENEW_PATH)
    refusals.expect("bad-signature", 401, forged, renew, path=RENEW_PATH)
    assert (device_row(controller, device.id) or {})["cert_serial"] == serial

    controller.api("POST", f"/api/v1/devices/{device.id}/reject")
    renew = json.dumps({"csr": device.csr()}).encode()
    refusals.expect("rejected", 403, device.sign(renew, path=RENEW_PATH), renew, path=RENEW_PATH)


def test_polling_needs_the_devices_own_signature(controller: RunningController) -> None:
    device = Applicant.new()
    body = device.body()
    assert post(controller, device.sign(body), body)[0] == 201
    other = Applicant.new()
    forged = sign_request(other.identity.signer, device.id, "GET", ENROLL_PATH, time.time())
    before = controller.metric(REFUSED, reason="bad-signature")
    response = controller.request("GET", ENROLL_PATH, headers=forged)
    assert response.status == 401 and is_error_body(json.loads(response.data))
    assert controller.metric(REFUSED, reason="bad-signature") == before + 1
    own = sign_request(device.identity.signer, device.id, "GET", ENROLL_PATH, time.time())
    response = controller.request("GET", ENROLL_PATH, headers=own)
    assert response.status == 200 and json.loads(response.data)["state"] == "pending"
    # A pending device is not a device of the fleet yet: no updates.
    tuf = sign_request(
        device.identity.signer, device.id, "GET", "/tuf/metadata/timestamp.json", time.time()
    )
    assert controller.request("GET", "/tuf/metadata/timestamp.json", headers=tuf).status == 401
