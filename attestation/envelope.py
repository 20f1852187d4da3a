"""DSSE envelopes: sign a payload with one key, and open one only with the key expected for it.

Rules:
- An envelope is the DSSE JSON form (securesystemslib `dsse.Envelope`) with exactly one
  signature; its `payloadType` must be the one the caller expects.
- Opening needs the expected public key up front: a signature by any other key, or a second
  signature, is refused. An envelope is never trusted for naming its own key.
- Anything that is not a well-formed envelope within `max_bytes` raises `EnvelopeError` naming what
  was wrong; nothing here raises a library exception at its caller.
- An Ed25519 signature is verified over the DSSE PAE by `cryptography` with the public key object
  kept per key (securesystemslib does the same, but loads and wraps the key on every call: a
  sixth of a verify, on paths that verify thousands of messages a second). Other key types go
  through securesystemslib.
"""

from __future__ import annotations

import binascii
import functools
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import FormatError, VerificationError
from securesystemslib.signer import Key, Signer, SSlibKey


class EnvelopeError(Exception):
    """An envelope that cannot be accepted; `kind` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class SealedEnvelope:
    """A parsed, not yet verified envelope: the payload must not be trusted before `open`."""

    envelope: Envelope
    keyid: str

    @property
    def untrusted_payload(self) -> bytes:
        return self.envelope.payload

    def open(self, key: Key) -> bytes:
        """The payload, if the one signature is `key`'s; `EnvelopeError` otherwise."""
        if self.keyid != key.keyid:
            raise EnvelopeError("unknown-key", f"signed by key {self.keyid[:16]}, not the sender's")
        public = _ed25519(key)
        try:
            if public is None:
                self.envelope.verify([key], 1)
            else:
                signature = bytes.fromhex(self.envelope.signatures[self.keyid].signature)
                public.verify(signature, self.envelope.pae())
        except (VerificationError, InvalidSignature, ValueError):
            raise EnvelopeError("bad-signature", "the signature does not verify") from None
        return self.envelope.payload


def _ed25519(key: Key) -> Ed25519PublicKey | None:
    """`key` as a `cryptography` public key if it is an Ed25519 one (kept per key)."""
    if not isinstance(key, SSlibKey) or key.keytype != "ed25519" or key.scheme != "ed25519":
        return None
    public = key.keyval.get("public")
    return _ed25519_from_hex(public) if isinstance(public, str) else None


@functools.lru_cache(maxsize=65536)
def _ed25519_from_hex(public: str) -> Ed25519PublicKey | None:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
    except ValueError:
        return None


def seal(payload: bytes, payload_type: str, signer: Signer) -> bytes:
    """`payload` in a DSSE envelope signed by `signer`, as compact JSON bytes."""
    envelope = Envelope(payload, payload_type, {})
    envelope.sign(signer)
    return orjson.dumps(envelope.to_dict())


def parse(data: bytes, payload_type: str, max_bytes: int) -> SealedEnvelope:
    """Parse `data` as a one-signature DSSE envelope of `payload_type`, without verifying it."""
    if len(data) > max_bytes:
        raise EnvelopeError("oversized", f"{len(data)} bytes, more than the {max_bytes} allowed")
    try:
        document: Any = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError("malformed", f"not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise EnvelopeError("malformed", "not a JSON object")
    if not isinstance(document.get("payload"), str):
        raise EnvelopeError("malformed", "no base64 payload")
    if document.get("payloadType") != payload_type:
        raise EnvelopeError("malformed", f"payloadType is not {payload_type}")
    signatures = document.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise EnvelopeError("malformed", "an envelope carries exactly one signature")
    try:
        envelope = Envelope.from_dict(document)
    except (KeyError, TypeError, ValueError, FormatError, binascii.Error) as exc:
        raise EnvelopeError("malformed", f"not a DSSE envelope ({exc})") from None
    (keyid,) = envelope.signatures
    return SealedEnvelope(envelope, keyid)
