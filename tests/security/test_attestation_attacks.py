"""Attacks on device attestation, against a real controller, real signatures and real agents.

Each attack is refused with the reason counted and logged, and nothing changes:
- evidence replayed for a nonce already answered; evidence signed by another device's key;
  evidence whose measurement was changed after the device signed it: no result, the device's
  record as it was, and (for the last two) its challenge still answerable;
- a rune download presenting an expired result, a result not signed by the controller's
  attestation key, or a fresh one older than the fleet's window for downloads: 428, no byte of
  the rune;
- a device whose agent code changed on disk after it enrolled (it runs from a copy of the agent
  packages, one file of which the test changes while it runs): its next attestation, which the
  deploy of a running rollout makes (the fleet's `deploy_attestation_age` is 2 s), is
  contraindicated, it is quarantined, and its deploy fails without a download while the other
  device updates; it then gets no command but `attest` until an admin releases it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

import attestation as attestation_package
from agent.attester import SoftwareEvidence, effective_config
from attestation.evidence import Evidence, seal_evidence
from attestation.identity import DeviceIdentity
from attestation.keys import load_key_file
from attestation.manifest import AGENT_PACKAGES
from attestation.policy import Status
from attestation.verifier import AttestationResult, seal_result
from ota.request_auth import PASSPORT_HEADER, sign_request
from tests.agents import enroll_agents, get, post, wait_online
from tests.controller import RunningController, controller_for, wait_for, write_legacy_rune

CHALLENGE = "/api/v1/attestation/challenge"
EVIDENCE = "/api/v1/attestation/evidence"


@dataclass
class Device:
    """A registered device that attests by hand, through the controller's real endpoints."""

    ctl: RunningController
    identity: DeviceIdentity
    state_dir: Path

    @property
    def id(self) -> str:
        return self.identity.device_id

    def post(self, path: str, body: bytes | None = None) -> tuple[int, Any]:
        headers = sign_request(self.identity.signer, self.id, "POST", path, time.time())
        response = self.ctl.request("POST", path, body=body, headers=headers)
        return response.status, json.loads(response.data)

    def challenge(self) -> str:
        status, body = self.post(CHALLENGE)
        assert status == 201, body
        return str(body["nonce"])

    def evidence(self, nonce: str) -> Evidence:
        producer = SoftwareEvidence(
            self.identity,
            "0.1.0",
            lambda: effective_config(self.state_dir, self.ctl.url),
            lambda: (None, None),
        )
        return producer.produce(nonce)

    def record(self) -> dict[str, Any]:
        """The controller's record of this device's attestation and quarantine."""
        device = get(self.ctl, f"/api/v1/devices/{self.id}")
        return {"attestation": device["attestation"], "quarantine": device["quarantine"]}

    def download(self, target: str, sha256: str, passport: bytes) -> tuple[int, bytes]:
        directory, _, basename = target.rpartition("/")
        path = f"/tuf/targets/{directory}/{sha256}.{basename}"
        headers = sign_request(self.identity.signer, self.id, "GET", path, time.time())
        headers[PASSPORT_HEADER] = base64.b64encode(passport).decode()
        response = self.ctl.request("GET", path, headers=headers)
        return response.status, response.data


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningController]:
    with controller_for("sqlite", tmp_path_factory.mktemp("attestation")) as running:
        yield running


def _device(ctl: RunningController, tmp_path: Path) -> Device:
    identity = DeviceIdentity.load_or_create(tmp_path)
    status, body = ctl.api(
        "POST", "/api/v1/devices", {"public_key": identity.public_key.keyval["public"]}
    )
    assert status == 201, body
    return Device(ctl, identity, tmp_path)


def _refused(ctl: RunningController, kind: str) -> float:
    return ctl.metric("fleet_attestation_refused_total", kind=kind)


def test_evidence_for_an_answered_challenge_is_refused_as_a_replay(
    ctl: RunningController, tmp_path: Path
) -> None:
    device = _device(ctl, tmp_path)
    sealed = seal_evidence(device.evidence(device.challenge()), device.identity.signer)
    status, first = device.post(EVIDENCE, sealed)
    assert status == 200 and first["status"] == "affirming", first
    recorded = device.record()
    before = _refused(ctl, "replayed")
    status, again = device.post(EVIDENCE, sealed)
    assert status == 409 and "answers a challenge already answered" in again["error"], again
    assert _refused(ctl, "replayed") == before + 1
    assert device.record() == recorded
    assert f'"device": "{device.id}", "kind": "replayed"' in ctl.stderr


def test_evidence_signed_by_another_device_is_refused_and_the_challenge_stays_open(
    ctl: RunningController, tmp_path: Path
) -> None:
    device = _device(ctl, tmp_path / "victim")
    intruder = CryptoSigner.generate_ed25519()
    nonce = device.challenge()
    forged = seal_evidence(device.evidence(nonce), intruder)
    before = _refused(ctl, "unknown-key")
    status, body = device.post(EVIDENCE, forged)
    assert status == 400 and "not the sender's" in body["error"], body
    assert _refused(ctl, "unknown-key") == before + 1
    assert device.record() == {"attestation": None, "quarantine": None}
    # The device's own answer to the same challenge still counts.
    status, body = device.post(
        EVIDENCE, seal_evidence(device.evidence(nonce), device.identity.signer)
    )
    assert status == 200 and body["status"] == "affirming", body


def test_evidence_whose_measurement_was_changed_is_refused(
    ctl: RunningController, tmp_path: Path
) -> None:
    device = _device(ctl, tmp_path)
    nonce = device.challenge()
    envelope = json.loads(seal_evidence(device.evidence(nonce), device.identity.signer))
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["agent_sha256"] = "0" * 64  # what a compromised agent would like the verifier to see
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    before = _refused(ctl, "bad-signature")
    status, body = device.post(EVIDENCE, json.dumps(envelope).encode())
    assert status == 400 and "does not verify" in body["error"], body
    assert _refused(ctl, "bad-signature") == before + 1
    assert device.record() == {"attestation": None, "quarantine": None}


def _passport(
    ctl: RunningController, device: Device, *, issued: float, expires: float, key: Any = None
) -> bytes:
    """A result for `device`, signed by the controller's own attestation key unless `key`."""
    signer = key or load_key_file(ctl.fleet_dir / "keys" / "attestation.pem")
    result = AttestationResult(
        device_id=device.id,
        status=Status.AFFIRMING,
        reasons=("forged for the test",),
        issued_at=issued,
        expires_at=expires,
        nonce="00" * 16,
        evidence_sha256="0" * 64,
        agent_version="0.1.0",
        verifier="fleet test",
    )
    return seal_result(result, signer)


@pytest.mark.parametrize(
    ("case", "expected"),
    [("expired", "expired"), ("not-the-verifier", "not-the-verifier"), ("too-old", "60 min old")],
)
def test_a_rune_is_not_served_for_an_expired_or_foreign_result(
    ctl: RunningController, tmp_path: Path, case: str, expected: str
) -> None:
    device = _device(ctl, tmp_path)
    pushed = ctl.push(
        write_legacy_rune(tmp_path, f"gate-{case}.rune"), name=f"gate-{case}", version="1.0.0"
    )
    now = time.time()
    valid = _passport(ctl, device, issued=now, expires=now + 600)
    status, data = device.download(pushed["target"], pushed["sha256"], valid)
    assert status == 200 and len(data) == pushed["size"]  # the gate opens for a real passport
    passports = {
        "expired": _passport(ctl, device, issued=now - 7200, expires=now - 3600),
        "not-the-verifier": _passport(
            ctl, device, issued=now, expires=now + 600, key=CryptoSigner.generate_ed25519()
        ),
        # Still fresh, but older than the fleet's window for downloads (10 min).
        "too-old": _passport(ctl, device, issued=now - 3600, expires=now + 3600),
    }
    passport = passports[case]
    before = ctl.metric("fleet_device_requests_refused_total", reason="attestation")
    status, data = device.download(pushed["target"], pushed["sha256"], passport)
    assert status == 428, data
    error = json.loads(data)["error"]
    assert (
        error.startswith("rune downloads need a fresh affirming attestation") and expected in error
    )
    assert ctl.metric("fleet_device_requests_refused_total", reason="attestation") == before + 1


# A device whose agent code changes after it enrolled.


def _agent_code_copy(to: Path) -> Path:
    source = Path(attestation_package.__file__).resolve().parent.parent
    for name in AGENT_PACKAGES:
        shutil.copytree(source / name, to / name, ignore=shutil.ignore_patterns("__pycache__"))
    return to


def test_a_device_whose_agent_code_changed_is_quarantined_and_drops_out_of_a_rollout(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        # Every deploy attests: a rune download takes only a result from the last 2 s.
        fleet = {"deploy_attestation_age": "2s"}
        ctl = stack.enter_context(controller_for("sqlite", tmp_path / "fleet", config=fleet))
        honest, tampered = enroll_agents(ctl, tmp_path, 2)
        code = _agent_code_copy(tmp_path / "code")
        tampered.env = {"PYTHONPATH": str(code)}
        for agent in (honest, tampered):
            stack.callback(agent.stop)
            agent.start()
        wait_online(ctl, [honest, tampered])  # both attested affirming
        ctl.push(
            write_legacy_rune(tmp_path, "app-1.rune"), org="default", name="app", version="1.0.0"
        )
        before = tampered.slots_state()

        # The agent it runs changes on disk: its next evidence measures other code.
        daemon = code / "agent" / "daemon.py"
        daemon.write_text(daemon.read_text() + "\n# changed after enrollment\n")
        time.sleep(2.5)  # the results the devices hold are older than the fleet's window now
        created = post(
            ctl,
            "/api/v1/rollouts",
            {
                "rune": "app@1.0.0",
                "devices": [honest.device_id, tampered.device_id],
                "waves": "100%",
                "soak": "0",
                "success": "50%",
            },
        )
        done = wait_for(
            lambda: (
                (body := get(ctl, f"/api/v1/rollouts/{created['id']}"))["state"]
                in ("completed", "paused", "aborted")
                and body
            ),
            timeout=90,
            message="the rollout ended",
        )
        assert done["state"] == "completed", done
        devices = {
            d["id"]: d for d in get(ctl, f"/api/v1/rollouts/{created['id']}/devices")["devices"]
        }
        assert devices[honest.device_id]["state"] == "succeeded", devices
        dropped = devices[tampered.device_id]
        assert dropped["state"] == "failed", dropped
        assert "contraindicated" in dropped["reason"], dropped
        assert "the agent code differs from every release of agent" in dropped["reason"], dropped

        record = get(ctl, f"/api/v1/devices/{tampered.device_id}")
        assert record["attestation"]["status"] == "contraindicated", record
        assert (
            record["quarantine"] is not None
            and "agent code differs" in record["quarantine"]["reason"]
        )
        assert tampered.slots_state() == before  # nothing was installed
        assert ctl.metric("fleet_devices_quarantined_total") == 1
        shown = ctl.cli("devices", "show", tampered.device_id)
        assert "QUARANTINED" in shown.stdout
        # The audit log has the failed attestation and the quarantine, naming the device.
        audited = json.loads(ctl.cli("audit", "--action", "security.", "-o", "json").stdout)
        events = {(r["action"], r["actor"]) for r in audited["records"]}
        actor = f"device:{tampered.device_id}"
        assert ("security.attestation_failed", actor) in events, events
        assert ("security.device_quarantined", actor) in events, events

        # Quarantined: nothing but `attest` is sent, until an admin releases it.
        status, body = ctl.api(
            "POST", f"/api/v1/devices/{tampered.device_id}/deploy", {"rune": "app@1.0.0"}
        )
        assert status == 409 and "is quarantined" in body["error"], body
        status, body = ctl.api(
            "POST", f"/api/v1/devices/{tampered.device_id}/commands", {"type": "attest"}
        )
        assert status == 201, body
        ctl.cli("devices", "release", tampered.device_id)
        assert get(ctl, f"/api/v1/devices/{tampered.device_id}")["quarantine"] is None
