"""A throwaway X.509 PKI for tests that need mutual TLS but have no fleet CA.

`CertificateAuthority.create(directory)` makes an Ed25519 CA (self-signed, `pathlen=0`) and writes
its certificate to `<directory>/<slug>-ca.crt`. It issues:
- `server(...)`: a TLS server certificate (EKU serverAuth) with SANs for 127.0.0.1 and localhost by
  default, as a broker needs so clients can verify its host name;
- `client(cn)`: a TLS client certificate (EKU clientAuth) whose subject CN is `cn`, the MQTT
  identity when the broker runs with `use_identity_as_username`.

Every certificate is valid from one hour ago (clock skew) for one day, and every key is Ed25519,
written unencrypted as PKCS#8 PEM next to its certificate. This is test material only: keys sit in
the test's temporary directory and nothing here is meant for a real fleet.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=1)
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "cert"


def write_key(key: ed25519.Ed25519PrivateKey, path: Path) -> None:
    """`key` as unencrypted PKCS#8 PEM in `path`, mode 0600."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


@dataclass(frozen=True)
class CertificateAuthority:
    """An Ed25519 test CA that writes what it issues into `directory`."""

    directory: Path
    name: str
    cert_path: Path
    certificate: x509.Certificate
    _key: ed25519.Ed25519PrivateKey

    @classmethod
    def create(cls, directory: Path, name: str = "Fleet test CA") -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ed25519.Ed25519PrivateKey.generate()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALIDITY)
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, None)
        )
        cert_path = directory / f"{_slug(name)}-ca.crt"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return cls(directory, name, cert_path, certificate, key)

    def _issue(
        self,
        common_name: str,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
        stem: str,
    ) -> Issued:
        key = ed25519.Ed25519PrivateKey.generate()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALIDITY)
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
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = builder.sign(self._key, None)
        issued = Issued(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        issued.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        write_key(key, issued.key)
        return issued

    def server(
        self, common_name: str = "broker", hosts: Iterable[str] = ("127.0.0.1", "localhost")
    ) -> Issued:
        """A server certificate whose SANs are `hosts` (IP addresses become IP SANs)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        stem = f"{_slug(self.name)}-server-{_slug(common_name)}"
        return self._issue(common_name, ExtendedKeyUsageOID.SERVER_AUTH, sans, stem)

    def client(self, common_name: str) -> Issued:
        """A client certificate with subject CN `common_name` and no SANs."""
        stem = f"{_slug(self.name)}-client-{_slug(common_name)}"
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [], stem)


def client_tls_context(ca_cert: Path, identity: Issued | None = None) -> ssl.SSLContext:
    """A client context that trusts only `ca_cert` and checks the host name, presenting `identity`.

    With `identity=None` the client offers no certificate (what a broker requiring one must refuse).
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    return context
