"""TLS contexts: the proxy's server side towards its clients, reloaded when its certificate
or key file changes (clients already connected keep their sessions)."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from dbmux.config import ClientTls, TlsVersion

log = logging.getLogger("dbmux.tls")

VERSIONS = {TlsVersion.TLS_1_2: ssl.TLSVersion.TLSv1_2, TlsVersion.TLS_1_3: ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the files."""


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """A context and what channel binding needs of the certificate it presents."""

    context: ssl.SSLContext
    # RFC 5929 tls-server-end-point: the certificate's hash (SCRAM-SHA-256-PLUS binds to it)
    end_point: bytes


def end_point_hash(certificate_pem: bytes) -> bytes:
    """The hash of the (first) certificate: with its signature's hash algorithm, SHA-256 where
    that is MD5 or SHA-1 (RFC 5929, 4.1)."""
    cert = x509.load_pem_x509_certificate(certificate_pem)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


class ClientSideTls:
    """What clients' TLS is accepted with. `current` is replaced, never changed, when the
    files change: a connection keeps the identity its handshake started with."""

    def __init__(self, tls: ClientTls, base_dir: Path, alpn: tuple[str, ...] = ()) -> None:
        self.min_version = VERSIONS[tls.min_version]
        self.alpn = alpn  # the engine's ALPN protocol names, if it has any
        self.files = (base_dir / tls.certificate_file, base_dir / tls.key_file)
        self._stamp = self._stamps()
        self.current = self._load()

    def _stamps(self) -> tuple[float, ...]:
        try:
            return tuple(path.stat().st_mtime for path in self.files)
        except OSError:
            return ()

    def _load(self) -> TlsIdentity:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = self.min_version
        if self.alpn:
            context.set_alpn_protocols(self.alpn)
        certificate, key = self.files
        try:
            context.load_cert_chain(certificate, key)
            end_point = end_point_hash(certificate.read_bytes())
        except (OSError, ValueError, ssl.SSLError) as error:
            raise TlsError(
                f"tls: cannot load certificate {certificate} with key {key}: {error}"
            ) from None
        return TlsIdentity(context, end_point)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed since; True if the new ones are in use. A
        pair that does not load (half-written, mismatched) leaves the old context in use."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.current = self._load()
        except TlsError as error:
            log.warning("%s; the previous certificate stays in use", error)
            return False
        log.info("tls: certificate %s loaded again", self.files[0])
        return True
