"""A device's identity: an Ed25519 key made on the device, and the id derived from it.

Rules:
- The private key never leaves the device's state dir; the file is mode 0600.
- A device id is self-certifying: `d` + the first 160 bits of SHA-256 over the raw public key, in
  lowercase base32. Nobody can claim an id without the key behind it, and the id is safe in MQTT
  topics and URLs.
- `load_or_create` makes the key only when none exists; an existing but unusable key is an error,
  never silently replaced (that would change the device's id).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner, SSlibKey

from attestation.keys import generate_key_file, load_key_file, public_key_of, raw_public_bytes

IDENTITY_FILE = "identity.pem"


def device_id_for(key: SSlibKey) -> str:
    digest = hashlib.sha256(raw_public_bytes(key)).digest()[:20]
    return "d" + base64.b32encode(digest).decode().lower()


@dataclass(frozen=True)
class DeviceIdentity:
    signer: CryptoSigner
    device_id: str

    @property
    def public_key(self) -> SSlibKey:
        return public_key_of(self.signer)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> DeviceIdentity:
        path = state_dir / IDENTITY_FILE
        signer = load_key_file(path) if path.exists() else generate_key_file(path)
        return cls(signer, device_id_for(public_key_of(signer)))
