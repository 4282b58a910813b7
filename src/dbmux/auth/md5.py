"""PostgreSQL MD5 password authentication (AuthenticationMD5Password) helpers."""

from __future__ import annotations

import hashlib
import hmac

__all__ = [
    "md5_password_hash",
    "md5_response",
    "md5_response_from_hash",
    "verify_md5_response",
]

_PREFIX = "md5"
_SALT_BYTES = 4  # PostgreSQL always sends a 4-byte salt
_HEX_DIGITS = frozenset("0123456789abcdef")


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _check_salt(salt: bytes) -> None:
    if len(salt) != _SALT_BYTES:
        raise ValueError(f"MD5 salt must be {_SALT_BYTES} bytes, got {len(salt)}")


def md5_password_hash(user: str, password: str) -> str:
    """Return the stored form "md5" + md5(password + user), as in pg_authid.rolpassword."""
    return _PREFIX + _md5_hex((password + user).encode("utf-8"))


def md5_response_from_hash(stored_hash: str, salt: bytes) -> bytes:
    """Answer a challenge from the stored hash alone: for MD5 it is password-equivalent."""
    _check_salt(salt)
    digest = stored_hash[len(_PREFIX) :]
    if not stored_hash.startswith(_PREFIX) or len(digest) != 32 or not set(digest) <= _HEX_DIGITS:
        raise ValueError("not an MD5 password hash ('md5' + 32 lowercase hex digits)")
    return (_PREFIX + _md5_hex(digest.encode("ascii") + salt)).encode("ascii")


def md5_response(user: str, password: str, salt: bytes) -> bytes:
    """Return what a client sends in PasswordMessage (without the trailing NUL)."""
    return md5_response_from_hash(md5_password_hash(user, password), salt)


def verify_md5_response(stored_hash: str, salt: bytes, response: bytes) -> bool:
    """Check a client's PasswordMessage against the stored hash, in constant time."""
    expected = md5_response_from_hash(stored_hash, salt)
    return hmac.compare_digest(expected, bytes(response).removesuffix(b"\0"))
