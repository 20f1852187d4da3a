"""The fleet CA (fleet.ca): its files, what it issues, and every CSR it refuses.

Real keys and certificates throughout; where `openssl` is installed, chains are also verified by
it (Mosquitto's TLS is OpenSSL), not only by `cryptography`.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestation.identity import device_id_for
from attestation.keys import KeyFileError, key_from_raw
from fleet.ca import BACKDATE, CA_LIFETIME, CAError, CsrError, FleetCA
from fleet.fleetdir import FleetConfig, FleetDirError

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
DAY = timedelta(hours=24)


def device_key() -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    return key, device_id_for(key_from_raw(key.public_key().public_bytes_raw()))


def csr_for(
    key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, *names: x509.NameAttribute[str]
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(list(names)))
    algorithm = None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.load_or_create(tmp_path / "keys", "acme")


def openssl_verify(
    ca_cert: bytes, cert: bytes, tmp_path: Path, purpose: str, at: datetime = NOW
) -> None:
    """`openssl verify` the chain for `purpose` as of `at` (when openssl is installed)."""
    if shutil.which("openssl") is None:
        return
    (tmp_path / "ca.crt").write_bytes(ca_cert)
    (tmp_path / "leaf.crt").write_bytes(cert)
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            purpose,
            "-attime",
            str(int(at.timestamp())),
            "-CAfile",
            tmp_path / "ca.crt",
            tmp_path / "leaf.crt",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result


# Files.


def test_creates_key_and_self_signed_ca_certificate(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    ca = FleetCA.load_or_create(keys, "acme")
    key_file, cert_file = keys / "ca.pem", keys / "ca.crt"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert cert_file.read_bytes() == ca.certificate_pem
    assert not [p for p in keys.iterdir() if p.name not in ("ca.pem", "ca.crt")]  # no temp files

    cert = x509.load_pem_x509_certificate(ca.certificate_pem)
    assert cert.subject == cert.issuer
    assert "acme" in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == CA_LIFETIME + BACKDATE
    assert abs(cert.not_valid_before_utc + BACKDATE - datetime.now(UTC)) < timedelta(minutes=1)


def test_loading_again_gives_the_same_ca(tmp_path: Path) -> None:
    first = FleetCA.load_or_create(tmp_path, "acme")
    key_bytes = (tmp_path / "ca.pem").read_bytes()
    second = FleetCA.load_or_create(tmp_path, "another name")
    assert second.certificate_pem == first.certificate_pem
    assert (tmp_path / "ca.pem").read_bytes() == key_bytes


def test_a_key_without_its_certificate_gets_a_new_certificate(tmp_path: Path) -> None:
    first = FleetCA.load_or_create(tmp_path, "acme")
    (tmp_path / "ca.crt").unlink()
    second = FleetCA.load_or_create(tmp_path, "acme")
    assert second.certificate_pem != first.certificate_pem
    assert second.certificate.public_key() == first.certificate.public_key()


def test_unusable_ca_files_are_clear_errors(tmp_path: Path) -> None:
    FleetCA.load_or_create(tmp_path / "a", "acme")
    other = FleetCA.load_or_create(tmp_path / "b", "acme")

    (tmp_path / "a" / "ca.crt").write_bytes(other.certificate_pem)
    with pytest.raises(CAError, match="is not the certificate of the key"):
        FleetCA.load_or_create(tmp_path / "a", "acme")

    (tmp_path / "a" / "ca.crt").write_bytes(b"not a certificate")
    with pytest.raises(CAError, match="is not a PEM certificate"):
        FleetCA.load_or_create(tmp_path / "a", "acme")

    (tmp_path / "b" / "ca.pem").unlink()
    with pytest.raises(CAError, match="exists but its key"):
        FleetCA.load_or_create(tmp_path / "b", "acme")

    (tmp_path / "a" / "ca.pem").write_bytes(b"garbage")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        FleetCA.load_or_create(tmp_path / "a", "acme")

    rsa_like = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "a" / "ca.pem").write_bytes(rsa_like)
    with pytest.raises(CAError, match="not an Ed25519 key"):
        FleetCA.load_or_create(tmp_path / "a", "acme")


# Device certificates.


def test_issues_a_short_lived_client_certificate_for_the_device(
    ca: FleetCA, tmp_path: Path
) -> None:
    key, device_id = device_key()
    issued = ca.issue_device(csr_for(key, cn(device_id)), device_id, NOW, DAY)
    cert = x509.load_pem_x509_certificate(issued.pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
    assert cert.public_key() == key.public_key()
    assert cert.serial_number == issued.serial and issued.serial > 0
    assert issued.serial_hex == format(issued.serial, "x") and len(issued.serial_hex) <= 40
    assert cert.not_valid_after_utc == issued.not_after == NOW + DAY
    assert cert.not_valid_before_utc == issued.not_before == NOW - BACKDATE
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    openssl_verify(ca.certificate_pem, issued.pem, tmp_path, "sslclient")

    again = ca.issue_device(csr_for(key, cn(device_id)), device_id, NOW, DAY)
    assert again.serial != issued.serial


def test_what_the_csr_asks_for_beyond_key_and_name_is_ignored(ca: FleetCA) -> None:
    key, device_id = device_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([cn(device_id)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("broker.example")]), critical=False
        )
        .sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = x509.load_pem_x509_certificate(ca.issue_device(csr, device_id, NOW, DAY).pem)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_refuses_a_csr_for_someone_elses_id(ca: FleetCA) -> None:
    key, device_id = device_key()
    _, victim = device_key()
    with pytest.raises(CsrError, match=f"is for {victim}, not this device") as refused:
        ca.issue_device(csr_for(key, cn(victim)), device_id, NOW, DAY)
    assert refused.value.kind == "csr-id"


def test_refuses_a_csr_with_another_key(ca: FleetCA) -> None:
    _, device_id = device_key()
    other, _ = device_key()
    with pytest.raises(CsrError, match="not this device's key") as refused:
        ca.issue_device(csr_for(other, cn(device_id)), device_id, NOW, DAY)
    assert refused.value.kind == "csr-key"


@pytest.mark.parametrize(
    ("names", "why"),
    [
        ((), "no common name"),
        (("extra-ou",), "must be"),
        (("second-cn",), "must be"),
    ],
)
def test_refuses_a_subject_that_is_not_exactly_the_id(
    ca: FleetCA, names: tuple[str, ...], why: str
) -> None:
    key, device_id = device_key()
    attributes = [] if not names else [cn(device_id)]
    if "extra-ou" in names:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admins"))
    if "second-cn" in names:
        attributes.append(cn("fleet-controller"))
    with pytest.raises(CsrError, match=why) as refused:
        ca.issue_device(csr_for(key, *attributes), device_id, NOW, DAY)
    assert refused.value.kind == "csr-id"


def test_refuses_malformed_tampered_and_non_ed25519_csrs(ca: FleetCA) -> None:
    key, device_id = device_key()
    good = csr_for(key, cn(device_id))
    for garbage, why in (
        (b"hello", "not a PEM certificate signing request"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
        ),
        (b"x" * 9000, "larger than"),
    ):
        with pytest.raises(CsrError, match=why) as refused:
            ca.issue_device(garbage, device_id, NOW, DAY)
        assert refused.value.kind == "bad-csr"

    # Flip a bit of the signature: the CSR no longer verifies.
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrError, match="signature does not verify") as refused:
        ca.issue_device(tampered, device_id, NOW, DAY)
    assert refused.value.kind == "bad-csr"

    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CsrError, match="not Ed25519") as refused:
        ca.issue_device(csr_for(ec_key, cn(device_id)), device_id, NOW, DAY)
    assert refused.value.kind == "bad-csr"


# The controller's and the broker's certificates.


def test_issues_client_and_server_certificates(ca: FleetCA, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    client = ca.issue_client("fleet-controller", key.public_key(), NOW, DAY)
    cert = x509.load_pem_x509_certificate(client.pem)
    assert cert.subject.rfc4514_string() == "CN=fleet-controller"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.certificate)

    server = ca.issue_server(["broker.example", "127.0.0.1", "::1"], key.public_key(), NOW, DAY)
    cert = x509.load_pem_x509_certificate(server.pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca.certificate)
    openssl_verify(ca.certificate_pem, server.pem, tmp_path, "sslserver")
    openssl_verify(ca.certificate_pem, client.pem, tmp_path, "sslclient")

    with pytest.raises(ValueError, match="at least one host"):
        ca.issue_server([], key.public_key(), NOW, DAY)
    with pytest.raises(ValueError, match="positive"):
        ca.issue_client("x", key.public_key(), NOW, timedelta(0))


# The config keys.


def test_device_cert_lifetime_and_broker_url_are_validated() -> None:
    base = FleetConfig().to_yaml()
    assert "device_cert_lifetime: 24h" in base and "device_broker_url: null" in base
    assert FleetConfig().cert_lifetime() == DAY
    for value, expected in (
        (3600, timedelta(hours=1)),
        ("90m", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
    ):
        config = FleetConfig.from_mapping({"device_cert_lifetime": value}, "fleet.yaml")
        assert config.cert_lifetime() == expected
    for bad, why in (
        ("soon", "not a duration"),
        ("1s", "between 5m and 90d"),
        ("365d", "between 5m and 90d"),
        (True, "not a duration"),
    ):
        with pytest.raises(FleetDirError, match=f"device_cert_lifetime.*{why}"):
            FleetConfig.from_mapping({"device_cert_lifetime": bad}, "fleet.yaml")

    good = FleetConfig.from_mapping({"device_broker_url": "mqtts://broker.example:8883"}, "f")
    assert good.device_broker_url == "mqtts://broker.example:8883"
    for bad_url in ("http://broker", "broker:1883", "mqtt://", 42):
        with pytest.raises(FleetDirError, match="device_broker_url"):
            FleetConfig.from_mapping({"device_broker_url": bad_url}, "fleet.yaml")
