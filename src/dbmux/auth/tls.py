"""TLS contexts: the proxy's server side towards its clients."""

from __future__ import annotations

import ssl
from pathlib import Path

from dbmux.config import ClientTls, TlsVersion

VERSIONS = {TlsVersion.TLS_1_2: ssl.TLSVersion.TLSv1_2, TlsVersion.TLS_1_3: ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def client_side_context(tls: ClientTls, base_dir: Path) -> ssl.SSLContext:
    """The context the proxy accepts clients' TLS with (it is the server side of it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[tls.min_version]
    certificate = base_dir / tls.certificate_file
    key = base_dir / tls.key_file
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as error:
        raise TlsError(
            f"tls: cannot load certificate {certificate} with key {key}: {error}"
        ) from None
    return context
