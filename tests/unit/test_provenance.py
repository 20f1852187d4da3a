"""Rune provenance without a controller: statements, their signatures, publisher documents, the
device's Sigstore binding check, and the admission policy against the real Sigstore bundles in
`../shared/testdata/sigstore` (staging-signed, verified offline)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from securesystemslib.signer import CryptoSigner, Key

from attestation.keys import public_key_of
from attestation.provenance import (
    Dependency,
    ProvenanceError,
    build_statement,
    check_bundle_binding,
    publishers_document,
    read_publishers,
    sign_statement,
    subject_of,
    verify_statement,
)
from fleet.provenance import (
    Evidence,
    OrgPolicy,
    PolicyError,
    admission_check,
    policy_change,
)
from ota.rune.bundle import sha256_hex

SIGSTORE_DIR = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "sigstore"
RUNE = b"the bytes of a rune"
OTHER = b"the bytes of another rune"


def statement_for(data: bytes, name: str = "sine.runebundle") -> dict[str, Any]:
    return build_statement(
        name,
        sha256_hex(data),
        [Dependency("Runefile.yml", sha256_hex(b"runefile"), "file:Runefile.yml")],
        {"runefile": "Runefile.yml"},
        {"fleet-tinyml": "0.1.0"},
    )


@pytest.fixture(scope="module")
def publisher() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@pytest.fixture(scope="module")
def stranger() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def keys_of(*signers: CryptoSigner) -> dict[str, Key]:
    return {public_key_of(s).keyid: public_key_of(s) for s in signers}


# Statements.


def test_a_signed_statement_verifies_and_says_what_the_rune_was_built_from(
    publisher: CryptoSigner,
) -> None:
    envelope = sign_statement(statement_for(RUNE), publisher)
    assert b"\n" not in envelope
    verified = verify_statement(envelope, sha256_hex(RUNE), keys_of(publisher))
    assert verified.sha256 == sha256_hex(RUNE)
    assert verified.keyid == public_key_of(publisher).keyid
    assert verified.builder == "urn:fleet:builder:rune"
    assert verified.dependencies[0].name == "Runefile.yml"


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("another-digest", "wrong-subject"),
        ("unknown-key", "unknown-key"),
        ("revoked-key", "revoked-key"),
        ("changed-payload", "bad-signature"),
        ("not-json", "malformed"),
    ],
)
def test_a_statement_that_does_not_vouch_for_this_rune_is_refused(
    case: str, kind: str, publisher: CryptoSigner, stranger: CryptoSigner
) -> None:
    keys, revoked = keys_of(publisher), frozenset[str]()
    envelope = sign_statement(statement_for(RUNE), publisher)
    if case == "another-digest":
        envelope = sign_statement(statement_for(OTHER), publisher)
    elif case == "unknown-key":
        envelope = sign_statement(statement_for(RUNE), stranger)
    elif case == "revoked-key":
        revoked = frozenset(keys)
    elif case == "changed-payload":
        document = json.loads(envelope)
        payload = json.loads(base64.b64decode(document["payload"]))
        payload["subject"][0]["name"] = "renamed.runebundle"
        document["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
        envelope = json.dumps(document).encode()
    else:
        envelope = b"{not json"
    with pytest.raises(ProvenanceError) as refused:
        verify_statement(envelope, sha256_hex(RUNE), keys, revoked)
    assert refused.value.kind == kind, refused.value


def test_a_statement_is_an_in_toto_v1_statement_with_one_subject() -> None:
    statement = statement_for(RUNE)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert subject_of(statement) == ("sine.runebundle", sha256_hex(RUNE))
    two = dict(statement, subject=[*statement["subject"], *statement_for(OTHER)["subject"]])
    with pytest.raises(ProvenanceError, match="exactly one subject"):
        subject_of(two)
    with pytest.raises(ProvenanceError, match="not an in-toto statement"):
        subject_of(dict(statement, subject=[]))


def test_publishers_documents_carry_the_accepted_keys_and_the_revoked_ids(
    publisher: CryptoSigner, stranger: CryptoSigner
) -> None:
    named = {keyid: ("name", key) for keyid, key in keys_of(publisher, stranger).items()}
    revoked_id = public_key_of(stranger).keyid
    document = publishers_document("acme", named, [revoked_id])
    keys, revoked = read_publishers(document, "acme")
    assert set(keys) == {public_key_of(publisher).keyid}
    assert revoked == {revoked_id}
    with pytest.raises(ProvenanceError, match="org 'acme', not 'evil'"):
        read_publishers(document, "evil")
    with pytest.raises(ProvenanceError, match="not a publisher keys document"):
        read_publishers(b'{"org": "acme"}', "acme")


# Sigstore: the real bundles.


def sigstore_file(name: str) -> bytes:
    path = SIGSTORE_DIR / name
    if not path.exists():
        pytest.skip(f"the Sigstore test data is not at {SIGSTORE_DIR} (../shared/testdata)")
    return path.read_bytes()


def signer_identity(bundle: bytes) -> tuple[str, str]:
    """(identity, issuer) of a bundle's signing certificate, read from the certificate."""
    material = json.loads(bundle)["verificationMaterial"]
    raw = base64.b64decode(material["certificate"]["rawBytes"])
    certificate = x509.load_der_x509_certificate(raw)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    identity = san.get_values_for_type(x509.RFC822Name)[0]
    issuer_oid = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # Fulcio's issuer (v2)
    issuer = certificate.extensions.get_extension_for_oid(issuer_oid).value
    assert isinstance(issuer, x509.UnrecognizedExtension)
    return identity, issuer.value[2:].decode()  # a DER UTF8String: tag, length, text


@pytest.fixture(scope="module")
def artifact() -> bytes:
    return sigstore_file("bundle_v3.txt")


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return sigstore_file("bundle_v3.txt.sigstore")


def sigstore_policy(identity: str, issuer: str) -> OrgPolicy:
    return OrgPolicy("acme", sigstore_identities=((identity, issuer),), trusted_root="staging")


def test_a_real_sigstore_bundle_is_admitted_for_its_identity(
    artifact: bytes, bundle: bytes
) -> None:
    identity, issuer = signer_identity(bundle)
    assert issuer.startswith("https://")
    verdict = admission_check(
        sigstore_policy(identity, issuer), Evidence(artifact, sha256_hex(artifact), bundle=bundle)
    )
    assert verdict, verdict.reason
    assert f"Sigstore bundle from {identity} ({issuer})" in verdict.reason


def test_a_sigstore_bundle_for_another_artifact_is_refused(bundle: bytes) -> None:
    identity, issuer = signer_identity(bundle)
    other = sigstore_file("bundle_v3_alt.txt")
    verdict = admission_check(
        sigstore_policy(identity, issuer), Evidence(other, sha256_hex(other), bundle=bundle)
    )
    assert not verdict
    assert "Sigstore bundle for" in verdict.reason


def test_a_changed_byte_in_the_artifact_is_refused(artifact: bytes, bundle: bytes) -> None:
    identity, issuer = signer_identity(bundle)
    changed = bytes([artifact[0] ^ 1]) + artifact[1:]
    verdict = admission_check(
        sigstore_policy(identity, issuer), Evidence(changed, sha256_hex(changed), bundle=bundle)
    )
    assert not verdict


@pytest.mark.parametrize("wrong", ["identity", "issuer"])
def test_a_sigstore_policy_with_another_identity_or_issuer_refuses_the_bundle(
    wrong: str, artifact: bytes, bundle: bytes
) -> None:
    identity, issuer = signer_identity(bundle)
    if wrong == "identity":
        identity = "someone-else@example.com"
    else:
        issuer = "https://accounts.google.com"
    verdict = admission_check(
        sigstore_policy(identity, issuer), Evidence(artifact, sha256_hex(artifact), bundle=bundle)
    )
    assert not verdict
    assert identity in verdict.reason and issuer in verdict.reason


def test_an_org_without_sigstore_identities_refuses_every_bundle(
    artifact: bytes, bundle: bytes
) -> None:
    verdict = admission_check(
        OrgPolicy("acme"), Evidence(artifact, sha256_hex(artifact), bundle=bundle)
    )
    assert not verdict
    assert "accepts no Sigstore identity" in verdict.reason


def test_the_device_binds_a_sigstore_bundle_to_the_rune_it_came_with(
    artifact: bytes, bundle: bytes
) -> None:
    identity, _ = signer_identity(bundle)
    assert identity in check_bundle_binding(bundle, artifact, sha256_hex(artifact))
    other = sigstore_file("bundle_v3_alt.txt")
    with pytest.raises(ProvenanceError) as another:
        check_bundle_binding(bundle, other, sha256_hex(other))
    assert another.value.kind == "wrong-subject"
    document = json.loads(bundle)
    signature = bytearray(base64.b64decode(document["messageSignature"]["signature"]))
    signature[-1] ^= 1
    document["messageSignature"]["signature"] = base64.b64encode(bytes(signature)).decode()
    with pytest.raises(ProvenanceError) as forged:
        check_bundle_binding(json.dumps(document).encode(), artifact, sha256_hex(artifact))
    assert forged.value.kind in ("bad-signature", "malformed")


# The admission policy.


def test_nothing_required_admits_a_rune_without_provenance_until_the_org_requires_it() -> None:
    evidence = Evidence(RUNE, sha256_hex(RUNE))
    assert admission_check(OrgPolicy("acme"), evidence)
    refused = admission_check(OrgPolicy("acme", require_provenance=True), evidence)
    assert not refused
    assert "org acme requires provenance" in refused.reason


def test_everything_given_must_verify(publisher: CryptoSigner, stranger: CryptoSigner) -> None:
    policy = policy_change(OrgPolicy("acme"), add_keys=[("release", public_key_of(publisher))])
    good = sign_statement(statement_for(RUNE), publisher)
    assert admission_check(policy, Evidence(RUNE, sha256_hex(RUNE), statement=good))
    both = Evidence(RUNE, sha256_hex(RUNE), statement=good, bundle=b"{}")
    verdict = admission_check(policy, both)
    assert not verdict and "Sigstore" in verdict.reason


def test_policy_changes_revoke_by_prefix_and_refuse_unknown_keys(publisher: CryptoSigner) -> None:
    key = public_key_of(publisher)
    policy = policy_change(OrgPolicy("acme"), add_keys=[("release", key)])
    revoked = policy_change(policy, revoke_keys=[key.keyid[:12]])
    assert revoked.revoked_keys == {key.keyid}
    assert key.keyid not in json.loads(revoked.publishers_document())["keys"]
    with pytest.raises(PolicyError, match="no publisher key"):
        policy_change(policy, revoke_keys=["0000"])
