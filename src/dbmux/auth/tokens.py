"""Short-lived auth tokens a client sends as its password (`iam_auth`), as RDS Proxy accepts
the 15-minute tokens of `aws rds generate-db-auth-token`, but self-hosted.

Two kinds are accepted:

* A dbmux token, signed with Ed25519 so that proxies hold only public keys:

      HOST:PORT/?Action=connect&DBUser=USER&KeyId=KID&Date=UNIX&Expires=SECONDS&Signature=SIG

  USER is percent-encoded (RFC 3986 unreserved characters stay as they are), HOST is a DNS
  name or an IP address (IPv6 in brackets), KID is the signing key's id (`key_id`: 11
  characters of the SHA-256 of its raw public key, so no config names keys and several can
  be accepted at once), DATE the issue time and EXPIRES the lifetime in seconds (900 by
  default; the verifier refuses more than its `max_lifetime`). SIG is the unpadded base64url
  Ed25519 signature of `dbmux-auth-token-v1\\n` followed by everything before `&Signature=`.
  Only printable ASCII without spaces, quotes or backslashes, so every driver, connection
  string and environment variable carries it as a password; for a host and user of usual
  length it is about 180 bytes, under the 255 bytes a MySQL handshake response can carry
  with a one-byte length (clients without CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA) and far
  under PostgreSQL's 65,535-byte limit for a password message. HOST must be the address the
  client's connection arrived on or one of the proxy's `auth_tokens.hosts` (default: its
  listen addresses, plus localhost, 127.0.0.1 and ::1 when one is on loopback), PORT the
  port it arrived on; a start up to CLOCK_SKEW seconds ahead of this host's clock is
  tolerated, an end is not.
* A standard JWT from an OIDC issuer (a Kubernetes service-account token), checked against a
  JWKS file: signature (RSA, RSA-PSS, ECDSA or EdDSA only, and only the algorithm of the key
  its `kid` names), `iss`, `aud`, `exp`, `nbf` and `iat`; a configured claim (`sub` by
  default), optionally through a table, names the database user. Such a token is bound to
  the audience, not to a host and port.

A token is checked before anything else about it is believed: signature first, then host,
port, user and time, so a token altered in any part is refused as TAMPERED. Input is capped
in length before it is parsed and parsed by bounded patterns; parsed keys are cached and the
key files are read again when they change.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from dbmux.auth.files import file_stamp

# PyJWT and cryptography are imported where they are used: together they add some 14 MB to
# the proxy's resident memory, which a proxy that takes no tokens never needs.
if TYPE_CHECKING:
    import jwt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from dbmux.config import AuthTokens, OidcIssuer, ProxyConfig

log = logging.getLogger("dbmux.tokens")

DEFAULT_LIFETIME = 900  # seconds, as RDS's generate-db-auth-token
MAX_LIFETIME_LIMIT = 3600  # the most `max_lifetime` may allow (and the generator makes)
CLOCK_SKEW = 5  # seconds a token's start may lie ahead of this host's clock
MAX_TOKEN_LENGTH = 4096  # anything longer is refused unread (Kubernetes tokens are ~1 KB)
MAX_DBMUX_TOKEN_LENGTH = 1024

SIGNED_PREFIX = b"dbmux-auth-token-v1\n"
_ACTION = "/?Action=connect&DBUser="
# Bounded repeats between fixed separators: matched in linear time, one way only.
_DBMUX_TOKEN = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253}):(?P<port>[0-9]{1,5})"
    r"/\?Action=connect&DBUser=(?P<user>[A-Za-z0-9._~%-]{1,384})"
    r"&KeyId=(?P<kid>[A-Za-z0-9_-]{11})&Date=(?P<date>[0-9]{1,11})&Expires=(?P<expires>[0-9]{1,5})"
    r"(?P<signature>&Signature=(?P<sig>[A-Za-z0-9_-]{86}))"
)
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")
# (an empty signature too: `alg: none` is refused as TAMPERED, not taken for a password)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Asymmetric only: never `none`, never HS* (whose secret could be a public key).
JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class RefusalReason(StrEnum):
    """Why a token was refused: counted in metrics, never told to the client."""

    MALFORMED = "MALFORMED"  # not a token, or a part of it out of shape
    UNKNOWN_KEY = "UNKNOWN_KEY"  # signed by a key this proxy does not hold (any more)
    TAMPERED = "TAMPERED"  # the signature does not hold, or names an algorithm not accepted
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"  # issued or valid from later than now plus CLOCK_SKEW
    LIFETIME_TOO_LONG = "LIFETIME_TOO_LONG"  # a dbmux token valid longer than max_lifetime
    WRONG_HOST = "WRONG_HOST"
    WRONG_PORT = "WRONG_PORT"
    WRONG_USER = "WRONG_USER"
    WRONG_ISSUER = "WRONG_ISSUER"  # a JWT from another issuer
    WRONG_AUDIENCE = "WRONG_AUDIENCE"  # a JWT meant for another audience
    NO_TLS = "NO_TLS"  # the login's own: a token sent over plaintext


class TokenRefused(Exception):
    """A token that does not let its client in; the message is the reason, never the token."""

    def __init__(self, reason: RefusalReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class TokenKeyError(Exception):
    """A key file that cannot be used; the message names the file, never a key's bytes."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """The id a token names its signing key by: derived from the key itself."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).decode()[:11]


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key in a PEM file (unencrypted, as `dbmux token-key` writes it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as error:
        raise TokenKeyError(f"cannot read private key {path}: {error.strerror}") from None
    except (ValueError, TypeError):
        raise TokenKeyError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TokenKeyError(f"{path} is not an Ed25519 key")
    return key


def canonical_host(host: str) -> str:
    """A host as tokens name it: an IP address in its short form (an IPv4-mapped IPv6
    address, as a dual-stack socket reports an IPv4 client, as IPv4), a DNS name in lower
    case; ValueError if it is neither."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"host {host!r} is not a DNS name or an IP address") from None
        return host.lower()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def generate_auth_token(
    host: str,
    port: int,
    user: str,
    *,
    private_key: str | Path | Ed25519PrivateKey,
    lifetime: int = DEFAULT_LIFETIME,
    now: float | None = None,
) -> str:
    """A token for `user` at the proxy reached as `host`:`port`, valid `lifetime` seconds
    from `now`; the client sends it as its password (over TLS)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    if not user:
        raise ValueError("user must not be empty")
    if not 1 <= lifetime <= MAX_LIFETIME_LIMIT:
        raise ValueError(f"lifetime {lifetime} is not between 1 and {MAX_LIFETIME_LIMIT} seconds")
    if not isinstance(private_key, Ed25519PrivateKey):
        private_key = load_private_key(private_key)
    issued = int(time.time() if now is None else now)
    host = canonical_host(host)
    signed = (
        f"{f'[{host}]' if ':' in host else host}:{port}{_ACTION}{quote(user, safe='')}"
        f"&KeyId={key_id(private_key.public_key())}&Date={issued}&Expires={lifetime}"
    )
    signature = private_key.sign(SIGNED_PREFIX + signed.encode())
    token = f"{signed}&Signature={base64.urlsafe_b64encode(signature).decode().rstrip('=')}"
    if len(token) > MAX_DBMUX_TOKEN_LENGTH or not _DBMUX_TOKEN.fullmatch(token):
        raise ValueError("host and user are too long for a token")
    return token


def looks_like_token(password: str) -> bool:
    """Whether a password has a token's shape (dbmux token or JWT), without checking it: a
    login with iam_auth ENABLED tells tokens from passwords by this."""
    if len(password) > MAX_TOKEN_LENGTH:
        return False
    return _ACTION in password or _JWT.fullmatch(password) is not None


def _canonical_b64decode(text: str) -> bytes:
    """Unpadded base64url as its encoder writes it: a signature whose unused low bits are set
    decodes to the same bytes, and is refused so that a token has one spelling only (PyJWT
    refuses such a JWT as undecodable)."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=") != text.encode():
        raise TokenRefused(RefusalReason.TAMPERED)
    return data


def _check_times(now: float, start: float, expires: float) -> None:
    if start > now + CLOCK_SKEW:
        raise TokenRefused(RefusalReason.NOT_YET_VALID)
    if now >= expires:
        raise TokenRefused(RefusalReason.EXPIRED)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _arrival_host(host: str) -> str:
    try:
        return canonical_host(host)
    except ValueError:
        return ""  # matches no token


def default_hosts(listen_hosts: Iterable[str]) -> frozenset[str]:
    """The names a proxy is reached by when `hosts` is not configured: its listen addresses
    (a wildcard is none), and the loopback names when it listens on loopback."""
    hosts: set[str] = set()
    for listen in listen_hosts:
        try:
            host = canonical_host(listen)
            address = ipaddress.ip_address(host)
        except ValueError:  # a DNS name (or no name a token can hold)
            if _HOST_NAME.fullmatch(listen):
                hosts.add(listen.lower())
            if listen.lower() == "localhost":
                hosts.update(LOOPBACK_NAMES)
            continue
        if not address.is_unspecified:
            hosts.add(host)
        if address.is_loopback:
            hosts.update(LOOPBACK_NAMES)
    return frozenset(hosts)


def _stamp(paths: Sequence[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    return tuple(file_stamp(path) for path in paths)


_PEM_BLOCK = re.compile(
    rb"-----BEGIN PUBLIC KEY-----[A-Za-z0-9+/=\s]+?-----END PUBLIC KEY-----", re.DOTALL
)


def load_public_keys(paths: Sequence[Path]) -> dict[str, Ed25519PublicKey]:
    """Every Ed25519 public key in the files (PEM; a file may hold several), by key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            blocks = _PEM_BLOCK.findall(path.read_bytes())
        except OSError as error:
            raise TokenKeyError(f"cannot read public key file {path}: {error.strerror}") from None
        if not blocks:
            raise TokenKeyError(f"{path} holds no PEM public key")
        for block in blocks:
            try:
                key = serialization.load_pem_public_key(block)
            except ValueError:
                raise TokenKeyError(f"{path} holds a public key that does not load") from None
            if not isinstance(key, Ed25519PublicKey):
                raise TokenKeyError(f"{path} holds a key that is not Ed25519")
            keys[key_id(key)] = key
    return keys


def load_jwks(path: Path) -> dict[str | None, jwt.PyJWK]:
    """The usable keys of a JWKS file by `kid`: asymmetric signing keys only (an `oct` key,
    a key for encryption or for another algorithm, an RSA key under 2048 bits is left out)."""
    import jwt

    try:
        document = json.loads(path.read_bytes())
    except OSError as error:
        raise TokenKeyError(f"cannot read JWKS file {path}: {error.strerror}") from None
    except ValueError:
        raise TokenKeyError(f"{path} is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise TokenKeyError(f"{path} has no 'keys' list")
    keys: dict[str | None, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        if key.algorithm_name in JWT_ALGORITHMS and not key.Algorithm.check_key_length(key.key):
            keys[key.key_id] = key
    if not keys:
        raise TokenKeyError(f"{path} holds no usable signing key (RSA, EC or Ed25519)")
    return keys


class TokenVerifier:
    """Checks the tokens of one proxy. Holds public keys only; `reload_if_changed` (the
    janitor's, once a second) picks up key files that changed, and a set that does not load
    leaves the previous one in use."""

    def __init__(
        self, settings: AuthTokens, *, listen_hosts: Iterable[str], base_dir: Path
    ) -> None:
        self.hosts = (
            frozenset(map(canonical_host, settings.hosts))
            if settings.hosts
            else default_hosts(listen_hosts)
        )
        self.max_lifetime = settings.max_lifetime
        self.oidc: OidcIssuer | None = settings.oidc
        self.key_files = tuple(base_dir / path for path in settings.public_key_files)
        self.jwks_files = () if self.oidc is None else (base_dir / self.oidc.jwks_file,)
        self._stamp = _stamp(self.key_files + self.jwks_files)
        self.keys = load_public_keys(self.key_files)
        self.jwks = load_jwks(self.jwks_files[0]) if self.jwks_files else {}

    @classmethod
    def for_proxy(cls, proxy: ProxyConfig, base_dir: Path) -> TokenVerifier | None:
        """The verifier of a proxy's `auth_tokens` (None without them); its default host
        names come from the proxy's and its endpoints' listen addresses."""
        if proxy.auth_tokens is None:
            return None
        listen = [proxy.listen.host, *(endpoint.listen.host for endpoint in proxy.endpoints)]
        return cls(proxy.auth_tokens, listen_hosts=listen, base_dir=base_dir)

    def __repr__(self) -> str:
        issuer = None if self.oidc is None else self.oidc.issuer
        return (
            f"TokenVerifier(keys={sorted(self.keys)}, jwks_keys={len(self.jwks)}, "
            f"issuer={issuer!r}, hosts={sorted(self.hosts)})"
        )

    def reload_if_changed(self) -> bool:
        """Read the key files again if any changed since; True if the new keys are in use."""
        stamp = _stamp(self.key_files + self.jwks_files)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keys = load_public_keys(self.key_files)
            jwks = load_jwks(self.jwks_files[0]) if self.jwks_files else {}
        except TokenKeyError as error:
            log.warning("auth tokens: %s; the previous keys stay in use", error)
            return False
        self.keys, self.jwks = keys, jwks
        log.info("auth tokens: keys loaded again (%d Ed25519, %d JWKS)", len(keys), len(jwks))
        return True

    def verify(
        self, token: str, *, host: str, port: int, user: str, now: float | None = None
    ) -> None:
        """Let `user` in with `token` or raise TokenRefused. `host` and `port` are the local
        address the client's connection arrived on (never a name the client claims, such as
        its TLS SNI): a dbmux token must name that port, and that host or one of `hosts`."""
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise TokenRefused(RefusalReason.MALFORMED)
        at = time.time() if now is None else now
        if _ACTION in token:
            self._verify_dbmux(token, host=host, port=port, user=user, now=at)
        elif _JWT.fullmatch(token):
            self._verify_jwt(token, user=user, now=at)
        else:
            raise TokenRefused(RefusalReason.MALFORMED)

    def _verify_dbmux(self, token: str, *, host: str, port: int, user: str, now: float) -> None:
        from cryptography.exceptions import InvalidSignature

        match = _DBMUX_TOKEN.fullmatch(token) if len(token) <= MAX_DBMUX_TOKEN_LENGTH else None
        if match is None:
            raise TokenRefused(RefusalReason.MALFORMED)
        key = self.keys.get(match["kid"])
        if key is None:
            raise TokenRefused(RefusalReason.UNKNOWN_KEY)
        signature = _canonical_b64decode(match["sig"])
        try:
            key.verify(signature, SIGNED_PREFIX + token[: match.start("signature")].encode())
        except InvalidSignature:
            raise TokenRefused(RefusalReason.TAMPERED) from None
        # Signed by a key held here: what follows is what its holder wrote.
        token_host = match["host"].strip("[]")  # as generate_auth_token writes it
        if token_host not in self.hosts and token_host != _arrival_host(host):
            raise TokenRefused(RefusalReason.WRONG_HOST)
        if int(match["port"]) != port:
            raise TokenRefused(RefusalReason.WRONG_PORT)
        try:
            token_user = unquote(match["user"], errors="strict")
        except UnicodeDecodeError:
            raise TokenRefused(RefusalReason.MALFORMED) from None
        if token_user != user:
            raise TokenRefused(RefusalReason.WRONG_USER)
        lifetime = int(match["expires"])
        if lifetime > self.max_lifetime:
            raise TokenRefused(RefusalReason.LIFETIME_TOO_LONG)
        issued = int(match["date"])
        _check_times(now, issued, issued + lifetime)

    def _verify_jwt(self, token: str, *, user: str, now: float) -> None:
        import jwt

        oidc = self.oidc
        if oidc is None:
            raise TokenRefused(RefusalReason.UNKNOWN_KEY)
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, RecursionError):
            raise TokenRefused(RefusalReason.MALFORMED) from None
        if not isinstance(header.get("alg"), str):
            raise TokenRefused(RefusalReason.MALFORMED)
        kid = header.get("kid")
        key: jwt.PyJWK | None = None
        if kid is None and len(self.jwks) == 1:
            [key] = self.jwks.values()  # a lone key needs no name
        elif isinstance(kid, str):
            key = self.jwks.get(kid)
        if key is None:
            raise TokenRefused(RefusalReason.UNKNOWN_KEY)
        claims = self._decode(token, key, oidc)
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TokenRefused(RefusalReason.MALFORMED)
        _check_times(now, max(claims.get("nbf", 0), claims.get("iat", 0)), claims["exp"])
        subject = claims.get(oidc.user_claim)
        if not isinstance(subject, str):
            raise TokenRefused(RefusalReason.MALFORMED)
        if (oidc.users.get(subject) if oidc.users else subject) != user:
            raise TokenRefused(RefusalReason.WRONG_USER)

    @staticmethod
    def _decode(token: str, key: jwt.PyJWK, oidc: OidcIssuer) -> dict[str, Any]:
        """Signature (with the key's own algorithm only), issuer and audience; the times are
        checked by the caller against its `now`."""
        import jwt

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                issuer=oidc.issuer,
                audience=oidc.audience,
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "iss", "aud"],
                },
            )
        except (jwt.InvalidAlgorithmError, jwt.InvalidSignatureError):
            raise TokenRefused(RefusalReason.TAMPERED) from None
        except jwt.InvalidIssuerError:
            raise TokenRefused(RefusalReason.WRONG_ISSUER) from None
        except jwt.InvalidAudienceError:
            raise TokenRefused(RefusalReason.WRONG_AUDIENCE) from None
        except (jwt.PyJWTError, ValueError, RecursionError):
            raise TokenRefused(RefusalReason.MALFORMED) from None
        return claims


def write_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM, the private file readable by its owner only;
    neither file may exist yet. Returns the key id tokens will name."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    written: list[Path] = []
    for path, pem, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as error:
            for done in written:  # no private key left behind without its public half
                done.unlink()
            raise TokenKeyError(f"cannot create {path}: {error.strerror}") from None
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        written.append(path)
    return key_id(key.public_key())
