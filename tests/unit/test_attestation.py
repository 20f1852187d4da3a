"""The attestation core, sans I/O: the agent code manifest, evidence, appraisal and results, with
real Ed25519 keys and the project's own agent code."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

import agent
from attestation.envelope import seal
from attestation.evidence import (
    PAYLOAD_TYPE,
    Evidence,
    EvidenceError,
    RuneClaim,
    config_digest,
    open_evidence,
    seal_evidence,
)
from attestation.manifest import (
    AGENT_PACKAGES,
    ManifestError,
    manifest_of_release,
    manifest_of_tree,
)
from attestation.policy import Status
from attestation.verifier import (
    MAX_CLOCK_SKEW_S,
    AttestationResult,
    Challenge,
    ReferenceValues,
    ResultError,
    Verifier,
    open_result,
    seal_result,
)

NOW = 1_900_000_000.0
DEVICE = CryptoSigner.generate_ed25519()
OTHER = CryptoSigner.generate_ed25519()
VERIFIER_KEY = CryptoSigner.generate_ed25519()
DEVICE_ID = "d" + "a" * 32
CONFIG = {"policy": {"allow_downgrade": False, "health_check_calls": 3}, "run": {"input": "random"}}
SINE = RuneClaim("acme/sine@1.0.0", "1" * 64)
OLD = RuneClaim("acme/sine@0.9.0", "2" * 64)
AGENT_DIGEST = "a" * 64


def evidence(**changes: Any) -> Evidence:
    fields: dict[str, Any] = {
        "nonce": "0f" * 16,
        "device_id": DEVICE_ID,
        "agent_version": "0.1.0",
        "agent_sha256": AGENT_DIGEST,
        "config": CONFIG,
        "config_sha256": config_digest(CONFIG),
        "active": SINE,
        "previous": OLD,
        "platform": {"system": "Linux", "machine": "x86_64"},
        "boot_id": "b" * 36,
        "produced_at": NOW,
    }
    return Evidence(**(fields | changes))


REFERENCE = ReferenceValues(
    agent={"0.1.0": frozenset({AGENT_DIGEST})},
    runes_current=frozenset({SINE.sha256}),
    runes_known=frozenset({SINE.sha256, OLD.sha256}),
    config={"policy.allow_downgrade": False},
)
CHALLENGE = Challenge("0f" * 16, DEVICE_ID)


def appraise(
    item: Evidence, reference: ReferenceValues = REFERENCE, challenge: Challenge = CHALLENGE
) -> AttestationResult:
    verifier = Verifier(VERIFIER_KEY, "test-verifier", result_ttl_s=600)
    result, sealed = verifier.appraise(
        seal_evidence(item, DEVICE), DEVICE.public_key, challenge, reference, NOW
    )
    assert open_result(sealed, VERIFIER_KEY.public_key, device_id=DEVICE_ID, now=NOW) == result
    return result


# The manifest.


def copy_agent_code(to: Path) -> Path:
    source = Path(agent.__file__).resolve().parent.parent
    for name in AGENT_PACKAGES:
        shutil.copytree(source / name, to / name)
    return to


def test_the_manifest_is_the_agent_packages_files_and_nothing_else(tmp_path: Path) -> None:
    tree = copy_agent_code(tmp_path / "release")
    manifest = manifest_of_tree(tree)
    paths = [path for path, _ in manifest.files]
    assert "agent/daemon.py" in paths and "ota/rune/blocks/wat/softmax.wat" in paths
    assert all(path.split("/")[0] in AGENT_PACKAGES for path in paths)
    assert not any("__pycache__" in path or path.endswith(".pyc") for path in paths)
    assert paths == sorted(paths)
    assert manifest.text.splitlines()[0].endswith(f"  {paths[0]}")
    # Where the files are, bytecode beside them and other packages do not change it.
    (tree / "agent" / "__pycache__").mkdir(exist_ok=True)
    (tree / "agent" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    (tree / "fleet").mkdir()
    (tree / "fleet" / "cli.py").write_text("print('controller')\n")
    moved = shutil.copytree(tree, tmp_path / "elsewhere")
    assert manifest_of_release(moved).sha256 == manifest.sha256
    # One changed byte changes it.
    daemon = tree / "agent" / "daemon.py"
    daemon.write_bytes(daemon.read_bytes() + b"\n")
    assert manifest_of_tree(tree).sha256 != manifest.sha256


def test_a_release_without_the_agent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="holds no agent, attestation, ota package"):
        manifest_of_tree(tmp_path)
    (tmp_path / "empty.whl").write_bytes(b"not a zip")
    with pytest.raises(ManifestError, match="cannot read the wheel"):
        manifest_of_release(tmp_path / "empty.whl")
    with pytest.raises(ManifestError, match="neither a wheel"):
        manifest_of_release(tmp_path / "notes.txt")


# Evidence.


def test_evidence_opens_only_with_the_device_key_and_intact() -> None:
    item = evidence()
    sealed = seal_evidence(item, DEVICE)
    assert open_evidence(sealed, DEVICE.public_key) == item
    with pytest.raises(EvidenceError) as refused:
        open_evidence(sealed, OTHER.public_key)
    assert refused.value.kind == "unknown-key"
    forged = seal_evidence(item, OTHER)  # another device signing this device's evidence
    with pytest.raises(EvidenceError, match="not the sender's"):
        open_evidence(forged, DEVICE.public_key)
    envelope = json.loads(sealed)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["config"]["policy"]["allow_downgrade"] = True  # changed after the device signed it
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(EvidenceError, match="does not verify"):
        open_evidence(json.dumps(envelope).encode(), DEVICE.public_key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"nonce": "00" * 8}, "nonce must be 32 to 128 lowercase hex digits"),
        ({"agent_sha256": "xyz"}, "agent_sha256 must be a SHA-256 in hex"),
        ({"produced_at": "now"}, "produced_at must be a time"),
        ({"active": {"ref": "x"}}, "active must be null or {ref, sha256}"),
        ({"platform": {"cores": 2}}, "platform must map names to strings"),
        ({"extra": 1}, "unknown extra"),
        ({"format": "other/1"}, "not of format fleet-evidence/1"),
    ],
)
def test_malformed_evidence_is_refused_naming_the_field(
    change: dict[str, Any], message: str
) -> None:
    document = evidence().to_json() | change
    with pytest.raises(EvidenceError, match=message):
        open_evidence(seal(json.dumps(document).encode(), PAYLOAD_TYPE, DEVICE), DEVICE.public_key)


def test_evidence_missing_a_field_is_refused_naming_it() -> None:
    document = evidence().to_json()
    del document["boot_id"]
    with pytest.raises(EvidenceError, match="missing boot_id"):
        Evidence.from_json(document)


# Appraisal.


def test_evidence_that_matches_every_reference_value_is_affirming() -> None:
    result = appraise(evidence())
    assert result.status is Status.AFFIRMING
    assert "the agent code is release 0.1.0" in result.reasons
    assert (result.device_id, result.nonce, result.expires_at) == (DEVICE_ID, "0f" * 16, NOW + 600)
    assert result.fresh(NOW + 599) and not result.fresh(NOW + 600)


@pytest.mark.parametrize(
    ("item", "reference", "status", "reason"),
    [
        (evidence(agent_sha256="b" * 64), REFERENCE, Status.CONTRAINDICATED,
         "the agent code differs from every release of agent 0.1.0"),
        (evidence(agent_version="0.2.0"), REFERENCE, Status.WARNING,
         "no reference values for agent 0.2.0"),
        (evidence(active=RuneClaim("evil/x@1", "9" * 64)), REFERENCE, Status.CONTRAINDICATED,
         "the active rune evil/x@1 (9999999999999999...) was never admitted by this fleet"),
        (evidence(active=OLD, previous=SINE), REFERENCE, Status.WARNING,
         "the active rune acme/sine@0.9.0 is no longer published"),
        (evidence(previous=RuneClaim("evil/x@1", "9" * 64)), REFERENCE, Status.WARNING,
         "the previous rune evil/x@1 was never admitted here"),
        (evidence(produced_at=NOW - MAX_CLOCK_SKEW_S - 60), REFERENCE, Status.WARNING,
         "the device's clock is 360 s behind"),
        (evidence(kind="tpm2-quote"), REFERENCE, Status.CONTRAINDICATED,
         "this verifier cannot appraise tpm2-quote evidence"),
    ],
)  # fmt: skip
def test_each_check_says_what_it_found(
    item: Evidence, reference: ReferenceValues, status: Status, reason: str
) -> None:
    result = appraise(item, reference)
    assert result.status is status, result.reasons
    assert any(reason in text for text in result.reasons), result.reasons


def test_config_constraints_warn_for_each_setting_off() -> None:
    loose = {"policy": {"allow_downgrade": True}}
    item = evidence(config=loose, config_sha256=config_digest(loose))
    strict = dataclasses.replace(REFERENCE, config={"policy.allow_downgrade": False, "run.x": 1})
    result = appraise(item, strict)
    assert result.status is Status.WARNING
    assert result.reasons == (
        "config policy.allow_downgrade is true; the fleet requires false",
        "config run.x is unset; the fleet requires 1",
    )


def test_evidence_for_another_challenge_is_contraindicated() -> None:
    other = Challenge(secrets.token_hex(16), DEVICE_ID)
    result = appraise(evidence(), challenge=other)
    assert result.status is Status.CONTRAINDICATED
    assert result.reasons == ("the evidence answers another challenge (its nonce differs)",)


# Results.


def test_a_result_is_relied_on_only_from_the_verifier_for_its_device_while_fresh() -> None:
    result = appraise(evidence())
    sealed = seal_result(result, VERIFIER_KEY)
    opened = open_result(sealed, VERIFIER_KEY.public_key, device_id=DEVICE_ID, now=NOW + 1)
    assert opened == result
    cases = [
        (seal_result(result, OTHER), VERIFIER_KEY.public_key, DEVICE_ID, NOW, "not-the-verifier"),
        (sealed, VERIFIER_KEY.public_key, "d" + "b" * 32, NOW, "other-device"),
        (sealed, VERIFIER_KEY.public_key, DEVICE_ID, NOW + 600, "expired"),
        (b"{}", VERIFIER_KEY.public_key, DEVICE_ID, NOW, "malformed"),
    ]
    for data, key, device, now, kind in cases:
        with pytest.raises(ResultError) as refused:
            open_result(data, key, device_id=device, now=now)
        assert refused.value.kind == kind
