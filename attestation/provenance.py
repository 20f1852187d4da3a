"""Rune provenance: in-toto statements about rune files, signed by their publishers.

Rules:
- A statement is an in-toto Statement v1 (`in_toto_attestation`) with exactly one subject, the
  rune file (its name and SHA-256), and a SLSA provenance v1 predicate: what it was built from
  (`buildDefinition.resolvedDependencies`: the Runefile and every part of the bundle, each with
  its SHA-256 and where it came from) and by what (`runDetails.builder`: `BUILDER_ID` and the
  builder's version). `build_statement` makes one; nothing else is put in it.
- A signed statement is a DSSE envelope (`attestation.envelope`) of `PAYLOAD_TYPE` with one
  signature, kept as one line of JSON (an `.intoto.jsonl` file).
- `verify_statement` accepts a signed statement for a rune only when: it is a well-formed
  envelope; its one signature is by one of the publisher keys given (a key that is not there is
  `unknown-key`, one that is there but revoked is `revoked-key`) and verifies; the payload is a
  valid in-toto statement of `PREDICATE_TYPE`; and its subject's SHA-256 is the rune's
  (`wrong-subject` otherwise). Each refusal is a `ProvenanceError` naming its kind and reason.
- An org's publisher keys reach devices as one document (`publishers_document`,
  `read_publishers`): the accepted keys, and the ids of the revoked ones.
- On a device a Sigstore bundle is only bound to the rune (`check_bundle_binding`: its message
  digest is the rune's and its signature verifies with its own certificate's key); its chain,
  transparency log entry and identity are the controller's to verify, offline, at admission.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import in_toto_attestation.v1.statement_pb2 as statement_pb
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format
from in_toto_attestation.v1.statement import Statement
from securesystemslib.signer import Key, Signer, SSlibKey

from attestation.envelope import EnvelopeError, parse, seal

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:fleet:rune-build:v1"
BUILDER_ID = "urn:fleet:builder:rune"
MAX_STATEMENT_BYTES = 1024 * 1024


class ProvenanceError(Exception):
    """A statement that cannot be accepted; `kind` is short, the text says what was wrong."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Dependency:
    """Something a rune was built from: its name, its SHA-256, and where it came from."""

    name: str
    sha256: str
    uri: str = ""


@dataclass(frozen=True)
class VerifiedStatement:
    """What a verified statement says: the rune it is about, who signed it, what it came from."""

    subject: str
    sha256: str
    keyid: str
    builder: str
    dependencies: tuple[Dependency, ...]


def build_statement(
    artifact: str,
    sha256: str,
    dependencies: Sequence[Dependency],
    parameters: Mapping[str, Any],
    builder_version: Mapping[str, str],
) -> dict[str, Any]:
    """The statement (as JSON) that `artifact` with this SHA-256 was built from `dependencies`."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": artifact, "digest": {"sha256": sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": dict(parameters),
                "resolvedDependencies": [
                    {
                        "name": d.name,
                        "digest": {"sha256": d.sha256},
                        **({"uri": d.uri} if d.uri else {}),
                    }
                    for d in dependencies
                ],
            },
            "runDetails": {"builder": {"id": BUILDER_ID, "version": dict(builder_version)}},
        },
    }
    _validated(statement)
    return statement


def statement_bytes(statement: Mapping[str, Any]) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def sign_statement(statement: Mapping[str, Any], signer: Signer) -> bytes:
    """The statement as a DSSE envelope signed by `signer` (one line of JSON, no newline)."""
    return seal(statement_bytes(statement), PAYLOAD_TYPE, signer)


def subject_of(statement: Mapping[str, Any]) -> tuple[str, str]:
    """(name, SHA-256) of a statement's one subject; `ProvenanceError` if it has no such one."""
    pb = _validated(statement)
    if len(pb.subject) != 1:
        raise ProvenanceError("malformed", "a rune statement has exactly one subject")
    subject = pb.subject[0]
    digest = subject.digest.get("sha256")
    if not digest:
        raise ProvenanceError("malformed", "the statement's subject has no sha256 digest")
    return subject.name, digest


def verify_statement(
    data: bytes, sha256: str, keys: Mapping[str, Key], revoked: frozenset[str] = frozenset()
) -> VerifiedStatement:
    """The statement in the envelope `data` if it is about the rune with this SHA-256 and signed
    by one of `keys` (by key id) that is not `revoked`; `ProvenanceError` otherwise."""
    try:
        sealed = parse(data.strip(), PAYLOAD_TYPE, MAX_STATEMENT_BYTES)
    except EnvelopeError as exc:
        raise ProvenanceError(exc.kind, f"the statement is not a signed envelope: {exc}") from None
    if sealed.keyid in revoked:
        raise ProvenanceError(
            "revoked-key", f"the statement is signed by revoked key {sealed.keyid[:16]}"
        )
    key = keys.get(sealed.keyid)
    if key is None:
        raise ProvenanceError(
            "unknown-key",
            f"the statement is signed by key {sealed.keyid[:16]}, which is not a publisher key "
            "of this org",
        )
    try:
        payload = sealed.open(key)
    except EnvelopeError as exc:
        raise ProvenanceError(exc.kind, f"the statement's signature: {exc}") from None
    try:
        statement = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProvenanceError("malformed", "the statement is not JSON") from None
    name, digest = subject_of(statement)
    if digest != sha256:
        raise ProvenanceError(
            "wrong-subject",
            f"the statement is about {name} ({digest[:16]}...), not this rune ({sha256[:16]}...)",
        )
    predicate = statement.get("predicate") or {}
    builder = ((predicate.get("runDetails") or {}).get("builder") or {}).get("id", "")
    resolved = (predicate.get("buildDefinition") or {}).get("resolvedDependencies") or []
    dependencies = tuple(
        Dependency(
            str(d.get("name", "")),
            str((d.get("digest") or {}).get("sha256", "")),
            str(d.get("uri", "")),
        )
        for d in resolved
        if isinstance(d, dict)
    )
    return VerifiedStatement(name, digest, sealed.keyid, str(builder), dependencies)


def _validated(statement: Mapping[str, Any]) -> Any:
    """The statement as in_toto_attestation's protobuf, checked by its `validate`."""
    try:
        pb = json_format.ParseDict(dict(statement), statement_pb.Statement())
        Statement.copy_from_pb(pb).validate()
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise ProvenanceError("malformed", f"not an in-toto statement v1: {exc}") from None
    if pb.predicate_type != PREDICATE_TYPE:
        raise ProvenanceError(
            "malformed", f"the statement's predicate is {pb.predicate_type!r}, not {PREDICATE_TYPE}"
        )
    return pb


def publishers_document(
    org: str, keys: Mapping[str, tuple[str, Key]], revoked: Iterable[str]
) -> bytes:
    """An org's publisher keys (key id -> (name, key)) as published to devices: the accepted
    ones, and the ids of the revoked ones."""
    revoked_ids = frozenset(revoked)
    document = {
        "org": org,
        "keys": [
            {"keyid": keyid, "name": name, "key": key.to_dict()}
            for keyid, (name, key) in sorted(keys.items())
            if keyid not in revoked_ids
        ],
        "revoked": sorted(revoked_ids),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def read_publishers(data: bytes, org: str) -> tuple[dict[str, Key], frozenset[str]]:
    """(accepted keys by id, revoked ids) from a publishers document of `org`;
    `ProvenanceError` if it is not one."""
    try:
        document = json.loads(data)
        if document["org"] != org:
            raise ProvenanceError(
                "malformed", f"the publisher keys are for org {document['org']!r}, not {org!r}"
            )
        keys: dict[str, Key] = {}
        for entry in document["keys"]:
            key = SSlibKey.from_dict(str(entry["keyid"]), dict(entry["key"]))
            keys[key.keyid] = key
        revoked = frozenset(str(k) for k in document["revoked"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProvenanceError("malformed", f"not a publisher keys document ({exc})") from None
    return keys, revoked


def check_bundle_binding(bundle: bytes, data: bytes, sha256: str) -> str:
    """The certificate subject of a Sigstore bundle whose message signature is over `data` (SHA-256
    `sha256`), made with the key of the bundle's own signing certificate; `ProvenanceError`
    otherwise. This binds the bundle to the rune; it does not check the certificate's chain, the
    transparency log or the identity, which the controller verified against its trusted root."""
    try:
        document = json.loads(bundle)
        signature = document["messageSignature"]
        digest = signature["messageDigest"]
        material = document["verificationMaterial"]
        raw = (
            material["certificate"]["rawBytes"]
            if "certificate" in material
            else material["x509CertificateChain"]["certificates"][0]["rawBytes"]
        )
        certificate = x509.load_der_x509_certificate(base64.b64decode(raw))
        signed_digest = base64.b64decode(digest["digest"]).hex()
        signature_bytes = base64.b64decode(signature["signature"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ProvenanceError(
            "malformed", f"not a Sigstore message-signature bundle ({exc})"
        ) from None
    if digest.get("algorithm") != "SHA2_256" or signed_digest != sha256:
        raise ProvenanceError(
            "wrong-subject", "the Sigstore bundle signs another artifact, not this rune"
        )
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ProvenanceError(
            "malformed", f"the bundle's certificate has a {type(public).__name__}, not an EC key"
        )
    hashing = hashes.SHA384() if public.curve.key_size >= 384 else hashes.SHA256()
    try:
        public.verify(signature_bytes, data, ec.ECDSA(hashing))
    except InvalidSignature:
        raise ProvenanceError(
            "bad-signature", "the Sigstore bundle's signature does not verify for this rune"
        ) from None
    names: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.RFC822Name)]
        names += [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    return ", ".join(names) or certificate.subject.rfc4514_string() or "(no identity)"
