"""A throwaway certificate authority for the tests, the demo and the benchmarks: a CA and
certificates it signs for loopback names, written as PEM files (what dbmux's `tls` settings,
PostgreSQL's `ssl_cert_file` and MariaDB's `ssl_cert` read)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its key on disk."""

    certificate_file: Path
    key_file: Path

    def as_tls(self) -> dict[str, str]:
        """As dbmux's `tls: {certificate_file, key_file}` setting."""
        return {"certificate_file": str(self.certificate_file), "key_file": str(self.key_file)}


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)  # PostgreSQL refuses a key file others can read


def _alt_names(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


class TestCA:
    """A certificate authority in `folder` (ca.pem), issuing certificates valid for a day."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, folder: Path, name: str = "dbmux test CA") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def client_context(self) -> ssl.SSLContext:
        """A client's context that trusts this CA alone and checks the server's name or
        address against its certificate (libpq's verify-full)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def issue(
        self,
        stem: str,
        names: tuple[str, ...] = LOOPBACK_NAMES,
        *,
        common_name: str | None = None,
        client: bool = False,
    ) -> CertFiles:
        """`stem`.pem and `stem`-key.pem: a server certificate for `names` (the subject
        alternative names a client's hostname check reads), or with `client` one for TLS
        client authentication whose common name is the user name."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name or names[0] or stem)]
        )
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(_alt_names(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        files = CertFiles(self.folder / f"{stem}.pem", self.folder / f"{stem}-key.pem")
        _write_key(key, files.key_file)
        files.certificate_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return files
