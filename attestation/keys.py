"""Ed25519 key files: make one, load one, and name what is wrong with a bad one.

Rules:
- A private key file is PEM PKCS#8 and is created with mode 0600, atomically and never over an
  existing file (losing a root key to a typo is not recoverable).
- Loading a file that is missing, unreadable, not PEM or not Ed25519 raises `KeyFileError` naming
  the file and the fix; no traceback reaches a user.
- Public keys travel as securesystemslib `SSlibKey`s (scheme `ed25519`), the form TUF metadata and
  DSSE envelopes use, so one key id means the same key everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey


class KeyFileError(Exception):
    """A key file that cannot be used, with the path and what to do."""


def generate_key_file(path: Path) -> CryptoSigner:
    """Create a new Ed25519 key at `path` (mode 0600) and return its signer."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())
    return signer_for(private_key)


def load_key_file(path: Path) -> CryptoSigner:
    """The signer for the Ed25519 private key in `path`."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc.strerror})") from None
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"{path} is not an unencrypted PEM private key ({exc}); give the key file that "
            "`fleetctl init` or `fleetctl keys generate` wrote"
        ) from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(private_key).__name__}, not an Ed25519 key")
    return signer_for(private_key)


def signer_for(private_key: Ed25519PrivateKey) -> CryptoSigner:
    public = SSlibKey.from_crypto(private_key.public_key(), scheme="ed25519")
    return CryptoSigner(private_key, public)


def public_key_of(signer: CryptoSigner) -> SSlibKey:
    key = signer.public_key
    assert isinstance(key, SSlibKey)
    return key


def raw_public_bytes(key: SSlibKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return bytes.fromhex(key.keyval["public"])


def key_from_raw(raw: bytes) -> SSlibKey:
    """An `SSlibKey` for 32 raw Ed25519 public key bytes (as a device registers them)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    return SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(raw), scheme="ed25519")


def public_key_pem(key: SSlibKey) -> bytes:
    """An Ed25519 public key as PEM (SubjectPublicKeyInfo), the form a publisher hands out."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(raw_public_bytes(key))
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key_file(path: Path) -> SSlibKey:
    """The Ed25519 public key in `path` (PEM), as an `SSlibKey`."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc.strerror or exc})") from None
    try:
        return public_key_from_pem(pem)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def public_key_from_pem(pem: bytes) -> SSlibKey:
    """The Ed25519 public key in `pem`, as an `SSlibKey`; `KeyFileError` for anything else."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"not a PEM public key ({exc}); give the .pub file `rune keygen` wrote"
        ) from None
    if not isinstance(public, Ed25519PublicKey):
        raise KeyFileError(f"a {type(public).__name__}, not an Ed25519 key")
    return SSlibKey.from_crypto(public, scheme="ed25519")
