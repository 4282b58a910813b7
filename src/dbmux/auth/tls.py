"""TLS contexts: the proxy's server side towards its clients, reloaded when its certificate
or key file changes (clients already connected keep their sessions)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from dbmux.config import ClientTls, TlsVersion

log = logging.getLogger("dbmux.tls")

VERSIONS = {TlsVersion.TLS_1_2: ssl.TLSVersion.TLSv1_2, TlsVersion.TLS_1_3: ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the files."""


class ClientSideTls:
    """What clients' TLS is accepted with. `context` is replaced, never changed, when the
    files change: a handshake in progress keeps the context it started with."""

    def __init__(self, tls: ClientTls, base_dir: Path) -> None:
        self.min_version = VERSIONS[tls.min_version]
        self.files = (base_dir / tls.certificate_file, base_dir / tls.key_file)
        self._stamp = self._stamps()
        self.context = self._load()

    def _stamps(self) -> tuple[float, ...]:
        try:
            return tuple(path.stat().st_mtime for path in self.files)
        except OSError:
            return ()

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = self.min_version
        certificate, key = self.files
        try:
            context.load_cert_chain(certificate, key)
        except (OSError, ssl.SSLError) as error:
            raise TlsError(
                f"tls: cannot load certificate {certificate} with key {key}: {error}"
            ) from None
        return context

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed since; True if the new ones are in use. A
        pair that does not load (half-written, mismatched) leaves the old context in use."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.context = self._load()
        except TlsError as error:
            log.warning("%s; the previous certificate stays in use", error)
            return False
        log.info("tls: certificate %s loaded again", self.files[0])
        return True
