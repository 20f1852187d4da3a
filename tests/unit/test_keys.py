"""attestation.keys and attestation.identity: Ed25519 key files and self-certifying device ids."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from securesystemslib.signer import CryptoSigner, SSlibKey

from attestation.identity import IDENTITY_FILE, DeviceIdentity, device_id_for
from attestation.keys import (
    KeyFileError,
    generate_key_file,
    key_from_raw,
    load_key_file,
    public_key_of,
    raw_public_bytes,
    signer_for,
)

DEVICE_ID = re.compile(r"^d[a-z2-7]{32}$")


def _pkcs8(private_key: PrivateKeyTypes, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _signs_and_verifies(signer: CryptoSigner) -> None:
    signature = signer.sign(b"payload")
    public_key_of(signer).verify_signature(signature, b"payload")


# Key files.


def test_generate_key_file_writes_a_0600_pkcs8_pem(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "nested" / "root-1.pem"  # parent folders are made
    signer = generate_key_file(path)
    assert _mode(path) == 0o600
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pem.rstrip().endswith(b"-----END PRIVATE KEY-----")
    assert isinstance(serialization.load_pem_private_key(pem, None), Ed25519PrivateKey)
    _signs_and_verifies(signer)
    key = public_key_of(signer)
    assert (key.keytype, key.scheme) == ("ed25519", "ed25519")


def test_generate_key_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_key_file(tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k.pem") == 0o600


def test_each_generated_key_is_new(tmp_path: Path) -> None:
    first = public_key_of(generate_key_file(tmp_path / "a.pem"))
    second = public_key_of(generate_key_file(tmp_path / "b.pem"))
    assert first.keyid != second.keyid


def test_generate_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "root.pem"
    original = generate_key_file(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match=re.escape(str(path)) + ".*already exists"):
        generate_key_file(path)
    assert path.read_bytes() == before
    assert public_key_of(load_key_file(path)).keyid == public_key_of(original).keyid


def test_generate_key_file_refuses_to_overwrite_any_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(path)
    assert path.read_bytes() == b"precious"


def test_load_key_file_returns_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    generated = generate_key_file(path)
    loaded = load_key_file(path)
    assert public_key_of(loaded) == public_key_of(generated)
    signature = loaded.sign(b"m")
    public_key_of(generated).verify_signature(signature, b"m")


def test_load_key_file_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pem"
    with pytest.raises(KeyFileError, match=re.escape(str(path)) + ": no such key file"):
        load_key_file(path)


def test_load_key_file_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=re.escape(str(tmp_path)) + ": cannot read"):
        load_key_file(tmp_path)  # a directory


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello",
        b"\x00\x01\x02",
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    ],
)
def test_load_key_file_names_a_file_that_is_not_a_pem_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=re.escape(str(path)) + " is not an unencrypted PEM"):
        load_key_file(path)


def test_load_key_file_names_a_public_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pub"
    path.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match=re.escape(str(path))):
        load_key_file(path)


def test_load_key_file_names_an_encrypted_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(_pkcs8(Ed25519PrivateKey.generate(), password=b"secret"))
    with pytest.raises(KeyFileError, match=re.escape(str(path)) + " is not an unencrypted"):
        load_key_file(path)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "EC"),
        (x25519.X25519PrivateKey.generate, "X25519"),
    ],
)
def test_load_key_file_names_a_key_that_is_not_ed25519(
    tmp_path: Path, make: Callable[[], PrivateKeyTypes], name: str
) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(_pkcs8(make()))
    pattern = re.escape(str(path)) + f" holds a {name}\\w*PrivateKey, not an Ed25519 key"
    with pytest.raises(KeyFileError, match=pattern):
        load_key_file(path)


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN PRIVATE KEY-----\n" + body + b"-----END PRIVATE KEY-----\n"


def test_load_key_file_names_a_key_of_an_unknown_algorithm(tmp_path: Path) -> None:
    # PKCS#8 PrivateKeyInfo { version 0, AlgorithmIdentifier { OID 1.2.3.4 }, OCTET STRING }
    oid = bytes([0x06, 0x03, 0x2A, 0x03, 0x04])
    algorithm = bytes([0x30, len(oid)]) + oid
    key = bytes([0x04, 0x04, 0x04, 0x02, 0x00, 0x00])
    body = bytes([0x02, 0x01, 0x00]) + algorithm + key
    path = tmp_path / "k.pem"
    path.write_bytes(_pem(bytes([0x30, len(body)]) + body))
    with pytest.raises(KeyFileError, match=re.escape(str(path))):
        load_key_file(path)


# Raw public keys.


def test_raw_public_bytes_and_key_from_raw_round_trip() -> None:
    private_key = Ed25519PrivateKey.generate()
    key = public_key_of(signer_for(private_key))
    raw = raw_public_bytes(key)
    assert len(raw) == 32
    assert raw == private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    again = key_from_raw(raw)
    assert isinstance(again, SSlibKey)
    assert again == key
    assert again.keyid == key.keyid
    assert raw_public_bytes(again) == raw
    # A key rebuilt from raw bytes verifies the original signer's signatures.
    signature = signer_for(private_key).sign(b"m")
    again.verify_signature(signature, b"m")


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_key_from_raw_refuses_a_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match=f"32 bytes, not {length}"):
        key_from_raw(b"\x01" * length)


# Device identity.


def test_load_or_create_creates_once_then_loads(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = DeviceIdentity.load_or_create(state)
    path = state / IDENTITY_FILE
    assert path.is_file()
    assert _mode(path) == 0o600
    pem = path.read_bytes()

    second = DeviceIdentity.load_or_create(state)
    assert second.device_id == first.device_id
    assert second.public_key == first.public_key
    assert path.read_bytes() == pem
    _signs_and_verifies(second.signer)
    first.public_key.verify_signature(second.signer.sign(b"m"), b"m")


def test_the_device_id_is_derived_from_the_key(tmp_path: Path) -> None:
    identity = DeviceIdentity.load_or_create(tmp_path)
    assert DEVICE_ID.match(identity.device_id), identity.device_id
    assert device_id_for(identity.public_key) == identity.device_id
    raw = raw_public_bytes(identity.public_key)
    expected = base64.b32encode(hashlib.sha256(raw).digest()[:20]).decode().lower()
    assert identity.device_id == "d" + expected


def test_different_keys_have_different_ids(tmp_path: Path) -> None:
    ids = {DeviceIdentity.load_or_create(tmp_path / str(i)).device_id for i in range(5)}
    assert len(ids) == 5
    assert all(DEVICE_ID.match(device_id) for device_id in ids)


def test_device_id_for_is_deterministic() -> None:
    key = key_from_raw(bytes(range(32)))
    assert device_id_for(key) == device_id_for(key_from_raw(bytes(range(32))))
    assert device_id_for(key) != device_id_for(key_from_raw(bytes(range(1, 33))))
    assert DEVICE_ID.match(device_id_for(key))


def test_an_unusable_identity_is_an_error_and_is_kept(tmp_path: Path) -> None:
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(b"corrupted")
    with pytest.raises(KeyFileError, match=re.escape(str(path))):
        DeviceIdentity.load_or_create(tmp_path)
    assert path.read_bytes() == b"corrupted"  # never silently replaced: that changes the id
