"""Password algorithms of MySQL's authentication plugins, for both sides of the proxy.

dbmux holds each login's plaintext password (from a secret), so it can check what a MySQL
client sends and answer a MySQL/MariaDB server's challenge itself; the wire handling lives in
the MySQL engine, this module only does the arithmetic of mysql_native_password and
caching_sha2_password (fast authentication, and RSA full authentication without TLS), and
keeps the proxy's RSA key in a file so that clients can pin it.

Passwords go over the wire as UTF-8, as utf8mb4 clients send them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# cryptography is imported where it is used: it adds some 10 MB to the proxy's resident
# memory, which a proxy without MySQL's RSA key exchange never needs.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from dbmux.config import ProxyConfig

__all__ = [
    "NONCE_LENGTH",
    "RsaKey",
    "RsaKeyError",
    "encrypt_password",
    "load_public_key",
    "native_scramble",
    "new_nonce",
    "sha2_scramble",
    "verify_native",
    "verify_sha2",
]

NONCE_LENGTH = 20  # MySQL's SCRAMBLE_LENGTH

# What MySQL servers put in a nonce: printable ASCII, never NUL (part 2 of the greeting is
# NUL-terminated) nor '$' (the separator of stored caching_sha2_password hashes).
_NONCE_ALPHABET = bytes(c for c in range(0x21, 0x7F) if c != ord("$"))
_PUBLIC_EXPONENT = 65537
MIN_RSA_BITS = 2048  # what MySQL generates; shorter keys are refused


def _oaep() -> padding.OAEP:
    """RSA-OAEP with SHA-1, as MySQL 8.0.5+ servers and their clients use it."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
    )


def _sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _xor_cyclic(data: bytes, nonce: bytes) -> bytes:
    """data XOR the nonce's first NONCE_LENGTH bytes, repeated as needed (self-inverse)."""
    key = nonce[:NONCE_LENGTH]
    if not key:
        raise ValueError("empty nonce")
    return bytes(byte ^ key[i % len(key)] for i, byte in enumerate(data))


def new_nonce() -> bytes:
    """NONCE_LENGTH random bytes for a server greeting's auth-plugin-data, as MySQL makes them.

    Printable ASCII without NUL or '$': MySQL servers send such bytes, and part 2 of the
    greeting's nonce is NUL-terminated, so a NUL inside would cut it short.
    """
    return bytes(secrets.choice(_NONCE_ALPHABET) for _ in range(NONCE_LENGTH))


def native_scramble(password: str, nonce: bytes) -> bytes:
    """mysql_native_password client response: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))).

    b"" for an empty password. Only the first NONCE_LENGTH bytes of nonce count: servers
    sometimes send a trailing NUL after them.
    """
    if not password:
        return b""
    stage1 = _sha1(password.encode("utf-8"))
    return _xor(stage1, _sha1(nonce[:NONCE_LENGTH] + _sha1(stage1)))


def verify_native(password: str, nonce: bytes, response: bytes) -> bool:
    """Check a client's mysql_native_password response in constant time.

    For an empty password only an empty response matches.
    """
    return hmac.compare_digest(native_scramble(password, nonce), bytes(response))


def sha2_scramble(password: str, nonce: bytes) -> bytes:
    """caching_sha2_password fast-auth response: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce).

    b"" for an empty password. Like native_scramble, only the first NONCE_LENGTH bytes of nonce
    count (libmysqlclient and the server use exactly SCRAMBLE_LENGTH bytes).
    """
    if not password:
        return b""
    stage1 = _sha256(password.encode("utf-8"))
    return _xor(stage1, _sha256(_sha256(stage1) + nonce[:NONCE_LENGTH]))


def verify_sha2(password: str, nonce: bytes, response: bytes) -> bool:
    """Check a client's caching_sha2_password fast-auth response in constant time.

    For an empty password only an empty response matches.
    """
    return hmac.compare_digest(sha2_scramble(password, nonce), bytes(response))


class RsaKeyError(ValueError):
    """An RSA key file that cannot be used or kept; the message names the file."""


class RsaKey:
    """The proxy's RSA key pair for caching_sha2_password full authentication without TLS.

    The client asks for the public key, then sends RSA-OAEP(password + NUL XOR nonce); a
    client that pins the key (mysql --server-public-key-path, PyMySQL server_public_key)
    skips the request, so the key must outlive the process: configured, or generated once
    and kept (`kept_in`).
    """

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        from cryptography.hazmat.primitives import serialization

        self._private_key = private_key
        self._public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def generate(cls, bits: int = 2048) -> RsaKey:
        """A fresh key pair (2048 bits, like MySQL's auto-generated keys)."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        return cls(rsa.generate_private_key(public_exponent=_PUBLIC_EXPONENT, key_size=bits))

    @classmethod
    def from_file(cls, path: Path) -> RsaKey:
        """The unencrypted PEM private key in `path`: RSA of at least MIN_RSA_BITS bits."""
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        try:
            data = path.read_bytes()
        except OSError as error:
            raise RsaKeyError(f"cannot read {path}: {error.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise RsaKeyError(f"{path} holds no unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise RsaKeyError(f"{path} holds a {type(key).__name__}, not an RSA key")
        if key.key_size < MIN_RSA_BITS:
            raise RsaKeyError(
                f"{path} holds an RSA key of {key.key_size} bits; {MIN_RSA_BITS} at least"
            )
        return cls(key)

    @classmethod
    def kept_in(cls, path: Path) -> RsaKey:
        """The key in `path`, generated and written there first (mode 0600) when there is
        none, so that a restart keeps it. Of proxies starting at once, the first to write
        wins and the others load its key."""
        from cryptography.hazmat.primitives import serialization

        if path.exists():
            return cls.from_file(path)
        key = cls.generate()
        pem = key._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
        except OSError as error:
            raise RsaKeyError(f"cannot keep the RSA key in {path}: {error.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
            os.link(temporary, path)  # never replaces a key another process wrote
        except FileExistsError:
            return cls.from_file(path)
        except OSError as error:
            raise RsaKeyError(f"cannot keep the RSA key in {path}: {error.strerror}") from None
        finally:
            os.unlink(temporary)
        return key

    @property
    def public_pem(self) -> bytes:
        """The public key as PEM SubjectPublicKeyInfo ("BEGIN PUBLIC KEY"), as MySQL sends it."""
        return self._public_pem

    def decrypt_password(self, ciphertext: bytes, nonce: bytes) -> str | None:
        """The client's password, or None when the ciphertext does not decrypt to one.

        None covers a wrong key or garbage (OAEP fails), a plaintext without the trailing NUL,
        and a password that is not UTF-8.
        """
        try:
            plaintext = self._private_key.decrypt(bytes(ciphertext), _oaep())
        except ValueError:
            return None
        password = _xor_cyclic(plaintext, nonce)
        if not password.endswith(b"\0"):
            return None
        try:
            return password[:-1].decode("utf-8")
        except UnicodeDecodeError:
            return None


def load_public_key(public_pem: bytes) -> rsa.RSAPublicKey:
    """A server's RSA public key from PEM; ValueError if it is not one."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        public_key = serialization.load_pem_public_key(bytes(public_pem))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError(f"not an RSA public key: {type(public_key).__name__}")
    return public_key


def encrypt_password(password: str, nonce: bytes, public_pem: bytes) -> bytes:
    """What a client sends in full authentication: RSA-OAEP-SHA1((password + NUL) XOR nonce).

    The nonce repeats cyclically; public_pem is the server's key. Raise ValueError if public_pem
    is not a usable RSA public key (or the password is too long for it).
    """
    public_key = load_public_key(public_pem)
    return public_key.encrypt(_xor_cyclic(password.encode("utf-8") + b"\0", nonce), _oaep())


def rsa_key_file(config: ProxyConfig, base_dir: Path, state_dir: Path) -> Path:
    """Where a MySQL proxy's RSA key is: the configured file, or the one kept in the state
    dir."""
    if config.rsa_private_key_file is not None:
        return base_dir / config.rsa_private_key_file
    return state_dir / f"{config.name}.mysql-rsa-key.pem"


def load_rsa_key(config: ProxyConfig, base_dir: Path, state_dir: Path) -> RsaKey:
    """A MySQL proxy's RSA key for caching_sha2_password full authentication without TLS,
    stable across restarts so that clients can pin its public half."""
    path = rsa_key_file(config, base_dir, state_dir)
    try:
        if config.rsa_private_key_file is not None:
            return RsaKey.from_file(path)
        return RsaKey.kept_in(path)
    except RsaKeyError as error:
        raise RsaKeyError(
            f"proxy {config.name}: {error} (set rsa_private_key_file or state_dir)"
        ) from None
