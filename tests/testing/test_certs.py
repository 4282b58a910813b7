"""The throwaway CA's client context: it trusts that CA alone and checks the server's address
against the certificate, as libpq's verify-full does (the demo's clients rely on it)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from dbmux.testing.certs import CertFiles, TestCA


def _handshake(server_cert: CertFiles, client: ssl.SSLContext) -> str:
    """A TLS handshake on loopback: the server offers `server_cert`, the client connects to
    127.0.0.1 with `client`; the protocol version the client got."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert.certificate_file, server_cert.key_file)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    version = tls.version()
                    tls.sendall(b"x")
                    return version or ""
        finally:
            thread.join(timeout=10)


def test_client_context_accepts_a_certificate_of_its_ca_for_the_address(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    assert _handshake(ca.issue("proxy"), ca.client_context()).startswith("TLSv1.")


def test_client_context_refuses_another_cas_certificate(tmp_path: Path) -> None:
    ours, theirs = TestCA(tmp_path / "ours"), TestCA(tmp_path / "theirs")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(theirs.issue("proxy"), ours.client_context())


def test_client_context_refuses_a_certificate_for_another_name(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _handshake(ca.issue("proxy", names=("db.example",)), ca.client_context())
