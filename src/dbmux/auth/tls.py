"""TLS contexts, each reloaded when one of its files changes (connections already open keep
theirs): the proxy's server side towards its clients, and its client side towards the
databases of its target group."""

from __future__ import annotations

import logging
import ssl
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from dbmux.auth.files import file_stamp
from dbmux.config import ClientTls, TargetTls, TlsMode, TlsVersion

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("dbmux.tls")

T = TypeVar("T")

VERSIONS = {TlsVersion.TLS_1_2: ssl.TLSVersion.TLSv1_2, TlsVersion.TLS_1_3: ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the files."""


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """A context and what channel binding needs of the certificate it presents."""

    context: ssl.SSLContext
    # RFC 5929 tls-server-end-point: the certificate's hash (SCRAM-SHA-256-PLUS binds to it)
    end_point: bytes


def end_point_hash(certificate: x509.Certificate) -> bytes:
    """The certificate's hash: with its signature's hash algorithm, SHA-256 where that is
    MD5 or SHA-1 (RFC 5929, 4.1)."""
    from cryptography.hazmat.primitives import hashes, serialization

    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


class _Reloaded(ABC, Generic[T]):
    """What is loaded from `files`: `current` is replaced, never changed, when they change."""

    def __init__(self, files: tuple[Path, ...]) -> None:
        self.files = files
        self._stamp = self._stamps()
        self.current = self._load()

    def _stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(file_stamp(path) for path in self.files)

    @abstractmethod
    def _load(self) -> T:
        """Load the files; raise TlsError naming them if they cannot be used."""

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed since; True if the new ones are in use. Files
        that do not load (half-written, mismatched) leave the old ones in use."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.current = self._load()
        except TlsError as error:
            log.warning("%s; the previous files stay in use", error)
            return False
        log.info("tls: %s loaded again", ", ".join(str(path) for path in self.files))
        return True


class ClientSideTls(_Reloaded[TlsIdentity]):
    """What clients' TLS is accepted with: a connection keeps the identity its handshake
    started with."""

    def __init__(self, tls: ClientTls, base_dir: Path, alpn: tuple[str, ...] = ()) -> None:
        self.min_version = VERSIONS[tls.min_version]
        self.alpn = alpn  # the engine's ALPN protocol names, if it has any
        super().__init__((base_dir / tls.certificate_file, base_dir / tls.key_file))

    def _load(self) -> TlsIdentity:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = self.min_version
        if self.alpn:
            context.set_alpn_protocols(self.alpn)
        certificate, key = self.files
        # (cryptography is imported only here, where TLS is configured: it adds some 10 MB
        # to the proxy's resident memory.)
        from cryptography import x509

        try:
            context.load_cert_chain(certificate, key)
            end_point = end_point_hash(x509.load_pem_x509_certificate(certificate.read_bytes()))
        except (OSError, ValueError, ssl.SSLError) as error:
            raise TlsError(
                f"tls: cannot load certificate {certificate} with key {key}: {error}"
            ) from None
        return TlsIdentity(context, end_point)


class TargetSideTls(_Reloaded[ssl.SSLContext]):
    """What the proxy's TLS to the databases of one target group is made with (libpq's
    sslmode meanings): `require` encrypts without checking the certificate (unless a CA file
    is given, as libpq does), `verify-ca` checks its chain, `verify-full` also its name."""

    def __init__(self, tls: TargetTls, base_dir: Path) -> None:
        assert tls.mode is not TlsMode.DISABLE
        self.mode = tls.mode
        self.server_name = tls.server_name
        self.min_version = VERSIONS[tls.min_version]
        self.ca_file = base_dir / tls.ca_file if tls.ca_file is not None else None
        self.client_files = (
            (base_dir / tls.certificate_file, base_dir / tls.key_file)
            if tls.certificate_file is not None and tls.key_file is not None
            else None
        )
        files = (self.ca_file,) if self.ca_file is not None else ()
        super().__init__(files + (self.client_files or ()))

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = self.min_version
        context.check_hostname = self.mode is TlsMode.VERIFY_FULL
        try:
            if self.ca_file is not None:
                context.load_verify_locations(cafile=self.ca_file)
            else:
                context.verify_mode = ssl.CERT_NONE
            if self.client_files is not None:
                context.load_cert_chain(*self.client_files)
        except (OSError, ValueError, ssl.SSLError) as error:
            names = ", ".join(str(path) for path in self.files)
            raise TlsError(f"target_group.tls: cannot load {names}: {error}") from None
        return context

    def server_hostname(self, host: str) -> str:
        """The name the server's certificate must carry (and SNI sends)."""
        return self.server_name or host
