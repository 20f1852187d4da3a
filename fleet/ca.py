"""The fleet CA: an Ed25519 X.509 authority that issues short-lived certificates for MQTT mTLS.

Rules:
- The CA key is `keys/ca.pem` (PEM PKCS#8, mode 0600, created atomically and never over an
  existing file) and its self-signed certificate `keys/ca.crt` (ten years; BasicConstraints CA
  with path length 0, KeyUsage keyCertSign and cRLSign, both critical). A key without its
  certificate gets a new certificate; a certificate without its key, or one that does not match
  its key, is a `CAError` (a subclass of `KeyFileError`), never silently replaced: devices trust
  that certificate.
- A device certificate is issued only for a CSR whose signature verifies, whose key is Ed25519,
  whose public key is the device's own (the device id derived from the CSR's key is the id being
  issued for) and whose subject is exactly `CN=<device id>`. Anything else is a `CsrError` with a
  short `kind` (for metrics) and a one-line reason. Nothing the CSR asks for beyond its key and
  name is copied: the CA decides every extension (clientAuth only, not a CA).
- Every certificate is back-dated by `BACKDATE` (clock skew between the controller, the broker
  and the device) and gets a random 159-bit serial.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestation.identity import device_id_for
from attestation.keys import KeyFileError, key_from_raw

CA_KEY_FILE = "ca.pem"
CA_CERT_FILE = "ca.crt"
CA_LIFETIME = timedelta(days=3650)
BACKDATE = timedelta(minutes=5)
MAX_CSR_BYTES = 8 * 1024


class CAError(KeyFileError):
    """The CA's key or certificate cannot be used, with the path and what to do."""


class CsrError(Exception):
    """Why a CSR was refused; `kind` is a short tag for metrics (`bad-csr`, `csr-key`, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class IssuedCertificate:
    pem: bytes
    serial: int
    not_after: datetime
    not_before: datetime

    @property
    def serial_hex(self) -> str:
        """The serial as lowercase hex (at most 40 digits), as the database stores it."""
        return format(self.serial, "x")


def _ca_name(fleet_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{fleet_name} fleet CA"[:64]),
        ]
    )


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class FleetCA:
    def __init__(self, key: Ed25519PrivateKey, certificate: x509.Certificate) -> None:
        self.key = key
        self.certificate = certificate

    # Files.

    @classmethod
    def load_or_create(cls, keys_dir: Path, fleet_name: str) -> FleetCA:
        """The CA in `keys_dir`, made (key and certificate) if there is none yet."""
        key_path = keys_dir / CA_KEY_FILE
        cert_path = keys_dir / CA_CERT_FILE
        if not key_path.exists():
            if cert_path.exists():
                raise CAError(
                    f"{cert_path} exists but its key {key_path} does not; restore the key "
                    "(devices trust that certificate) or remove both to make a new CA"
                )
            with contextlib.suppress(FileExistsError):  # another replica made it first
                _create_key_file(key_path)
        key = _load_key_file(key_path)
        if not cert_path.exists():
            certificate = _self_signed(key, fleet_name, datetime.now(UTC))
            write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except OSError as exc:
            raise CAError(f"{cert_path}: cannot read the CA certificate ({exc.strerror})") from None
        except ValueError as exc:
            raise CAError(f"{cert_path} is not a PEM certificate ({exc})") from None
        public = certificate.public_key()
        if not isinstance(public, Ed25519PublicKey) or _raw_public(public) != _raw_public(
            key.public_key()
        ):
            raise CAError(f"{cert_path} is not the certificate of the key in {key_path}")
        return cls(key, certificate)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    # Devices.

    def check_device_csr(self, csr_pem: bytes, device_id: str) -> x509.CertificateSigningRequest:
        """The parsed CSR if the CA would issue `device_id` a certificate for it; else CsrError."""
        if len(csr_pem) > MAX_CSR_BYTES:
            raise CsrError("bad-csr", f"the CSR is larger than {MAX_CSR_BYTES} bytes")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CsrError("bad-csr", "the CSR is not a PEM certificate signing request") from None
        try:
            public = csr.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise CsrError("bad-csr", "the CSR's public key cannot be read") from None
        if not isinstance(public, Ed25519PublicKey):
            raise CsrError("bad-csr", "the CSR's key is not Ed25519 (use the device identity key)")
        try:
            signed = csr.is_signature_valid
        except (InvalidSignature, UnsupportedAlgorithm, ValueError):
            signed = False
        if not signed:
            raise CsrError("bad-csr", "the CSR's signature does not verify")
        if device_id_for(key_from_raw(_raw_public(public))) != device_id:
            raise CsrError("csr-key", "the CSR's public key is not this device's key")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(csr.subject) != 1 or len(names) != 1 or names[0].value != device_id:
            claimed = names[0].value if names else "no common name"
            raise CsrError(
                "csr-id",
                f"the CSR is for {claimed!s}, not this device; its subject must be "
                f"exactly CN={device_id}",
            )
        return csr

    def issue_device(
        self, csr_pem: bytes, device_id: str, now: datetime, lifetime: timedelta
    ) -> IssuedCertificate:
        """A client certificate `CN=<device id>` for the key in the CSR (see Rules)."""
        csr = self.check_device_csr(csr_pem, device_id)
        public = csr.public_key()
        assert isinstance(public, Ed25519PublicKey)
        return self._issue(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
            public,
            now,
            lifetime,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            [],
        )

    # The controller and the broker.

    def issue_client(
        self,
        common_name: str,
        public_key: CertificatePublicKeyTypes,
        now: datetime,
        lifetime: timedelta,
    ) -> IssuedCertificate:
        """A TLS client certificate (the controller's own broker identity, CN fleet-controller)."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        return self._issue(name, public_key, now, lifetime, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def issue_server(
        self,
        hostnames: list[str],
        public_key: CertificatePublicKeyTypes,
        now: datetime,
        lifetime: timedelta,
    ) -> IssuedCertificate:
        """A TLS server certificate (a broker) with a DNS or IP SAN for each of `hostnames`."""
        if not hostnames:
            raise ValueError("a server certificate needs at least one host name or address")
        sans: list[x509.GeneralName] = []
        for host in hostnames:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0][:64])])
        return self._issue(name, public_key, now, lifetime, ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def _issue(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        now: datetime,
        lifetime: timedelta,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> IssuedCertificate:
        if lifetime <= timedelta(0):
            raise ValueError("a certificate lifetime must be positive")
        not_before = now - BACKDATE
        not_after = now + lifetime
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = builder.sign(self.key, None)
        return IssuedCertificate(
            certificate.public_bytes(serialization.Encoding.PEM),
            serial,
            certificate.not_valid_after_utc,
            certificate.not_valid_before_utc,
        )


def _self_signed(key: Ed25519PrivateKey, fleet_name: str, now: datetime) -> x509.Certificate:
    name = _ca_name(fleet_name)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, None)
    )


def _create_key_file(path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_new(path, pem, 0o600)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `path` whole (temp file, fsync, link into place); FileExistsError if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, path)  # fails if `path` appeared meanwhile: never overwrite
    finally:
        temporary.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise CAError(f"{path}: cannot read the CA key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CAError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CAError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
