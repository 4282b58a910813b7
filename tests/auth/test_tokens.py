"""Signed auth tokens (iam_auth): a dbmux token lets in exactly the user, host and port it was
made for during its lifetime and nothing else; a JWT from the configured OIDC issuer lets in
the user its claim names; every refusal says why, and no input makes the verifier do anything
but accept or raise TokenRefused."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import mysql.connector
import psycopg
import pymysql
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dbmux.auth.tokens import (
    CLOCK_SKEW,
    MAX_TOKEN_LENGTH,
    RefusalReason,
    TokenKeyError,
    TokenRefused,
    TokenVerifier,
    generate_auth_token,
    looks_like_token,
    write_key_pair,
)
from dbmux.config import AuthTokens, parse_config
from dbmux.testing import PostgresCluster

NOW = 1_800_000_000.0
HOST, PORT, USER = "127.0.0.1", 6432, "app"
ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "dbmux"


class Keys:
    """An Ed25519 key pair written by `write_key_pair` in a folder."""

    def __init__(self, folder: Path, name: str = "signing") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.private = folder / f"{name}.pem"
        self.public = folder / f"{name}.pub"
        self.key_id = write_key_pair(self.private, self.public)

    def token(self, host: str = HOST, port: int = PORT, user: str = USER, **kw: Any) -> str:
        kw.setdefault("now", NOW)
        return generate_auth_token(host, port, user, private_key=self.private, **kw)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def verifier_of(
    tmp_path: Path, listen_hosts: tuple[str, ...] = (HOST,), **settings: Any
) -> TokenVerifier:
    return TokenVerifier(
        AuthTokens.model_validate(settings), listen_hosts=listen_hosts, base_dir=tmp_path
    )


@pytest.fixture
def verifier(tmp_path: Path, keys: Keys) -> TokenVerifier:
    return verifier_of(tmp_path, public_key_files=[str(keys.public)])


def refusal(verifier: TokenVerifier, token: str, **at: Any) -> RefusalReason:
    place = {"host": HOST, "port": PORT, "user": USER, "now": NOW, **at}
    with pytest.raises(TokenRefused) as caught:
        verifier.verify(token, **place)
    return caught.value.reason


def accepts(verifier: TokenVerifier, token: str, **at: Any) -> None:
    verifier.verify(token, **{"host": HOST, "port": PORT, "user": USER, "now": NOW, **at})


# ---------------------------------------------------------------------------------------------
# A dbmux token: what it looks like and whom it lets in


def test_a_token_lets_its_user_in_at_its_host_and_port(keys: Keys, verifier: TokenVerifier) -> None:
    accepts(verifier, keys.token())


def test_a_token_is_a_short_printable_password_any_driver_carries(keys: Keys) -> None:
    token = keys.token(host="orders-proxy.db.internal.example.com", user="orders_app")
    assert set(token) <= set(string.ascii_letters + string.digits + "-._~%:/?&=")
    # a MySQL handshake response with a one-byte length carries at most 255 bytes
    assert len(token) < 255
    assert token.startswith("orders-proxy.db.internal.example.com:6432/?Action=connect&")


def test_the_token_names_its_key_by_the_id_the_key_pair_was_written_with(keys: Keys) -> None:
    assert f"&KeyId={keys.key_id}&" in keys.token()


def test_the_application_api_is_importable_from_dbmux_auth(keys: Keys) -> None:
    from dbmux.auth import generate_auth_token as exported

    assert exported is generate_auth_token


def test_a_key_object_signs_as_the_key_file_does(tmp_path: Path, keys: Keys) -> None:
    key = serialization.load_pem_private_key(keys.private.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    token = generate_auth_token(HOST, PORT, USER, private_key=key, now=NOW)
    assert token == keys.token()


@pytest.mark.parametrize("user", ["app", "Üser with space", "o'brien\"x\\", "a&b=c%d"])
def test_any_user_name_round_trips_as_plain_ascii(
    keys: Keys, verifier: TokenVerifier, user: str
) -> None:
    token = keys.token(user=user)
    assert token.isascii()
    assert not set(" '\"\\") & set(token)
    accepts(verifier, token, user=user)


def test_an_ipv6_host_is_written_in_brackets_and_accepted(tmp_path: Path, keys: Keys) -> None:
    verifier = verifier_of(tmp_path, ("::1",), public_key_files=[str(keys.public)])
    token = keys.token(host="::1")
    assert token.startswith("[::1]:6432/?")
    accepts(verifier, token, host="::1")


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"user": ""}, "user"),
        ({"lifetime": 0}, "lifetime"),
        ({"lifetime": 7200}, "lifetime"),
        ({"host": "db host"}, "host"),
        ({"host": "db:5432"}, "host"),
        ({"host": "a" * 300}, "host"),
    ],
)
def test_generating_with_a_bad_argument_says_which(
    keys: Keys, arguments: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        keys.token(**arguments)


def test_generating_with_a_missing_or_foreign_key_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    with pytest.raises(TokenKeyError, match=str(missing)):
        generate_auth_token(HOST, PORT, USER, private_key=missing)
    rsa_file = tmp_path / "rsa.pem"
    rsa_file.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TokenKeyError, match="not an Ed25519 key"):
        generate_auth_token(HOST, PORT, USER, private_key=rsa_file)


def test_write_key_pair_keeps_the_private_key_to_its_owner_and_overwrites_nothing(
    tmp_path: Path, keys: Keys
) -> None:
    assert keys.private.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE" not in keys.public.read_bytes()
    before = keys.private.read_bytes()
    with pytest.raises(TokenKeyError, match=re.escape("signing.pem")):
        write_key_pair(keys.private, tmp_path / "other.pub")
    assert keys.private.read_bytes() == before
    assert not (tmp_path / "other.pub").exists()
    with pytest.raises(TokenKeyError, match=re.escape("signing.pub")):
        write_key_pair(tmp_path / "other.pem", keys.public)
    assert not (tmp_path / "other.pem").exists()  # no private half left without its public


# ---------------------------------------------------------------------------------------------
# looks_like_token: a token told from a password without checking it


def test_tokens_look_like_tokens(keys: Keys, tmp_path: Path) -> None:
    assert looks_like_token(keys.token())
    assert looks_like_token(Oidc(tmp_path).token())


@pytest.mark.parametrize(
    "password",
    ["app-secret", "", "eyJ", "correct horse battery staple", "a.b.c", "eyJ" + "a" * 5000 + ".b.c"],
)
def test_passwords_do_not_look_like_tokens(password: str) -> None:
    assert not looks_like_token(password)


# ---------------------------------------------------------------------------------------------
# Every refusal, produced for real


def test_expired_at_the_end_of_its_lifetime(keys: Keys, verifier: TokenVerifier) -> None:
    token = keys.token(lifetime=900)
    accepts(verifier, token, now=NOW + 899)
    assert refusal(verifier, token, now=NOW + 900) is RefusalReason.EXPIRED


def test_not_yet_valid_beyond_the_clock_skew(keys: Keys, verifier: TokenVerifier) -> None:
    token = keys.token()
    accepts(verifier, token, now=NOW - CLOCK_SKEW)
    assert refusal(verifier, token, now=NOW - CLOCK_SKEW - 1) is RefusalReason.NOT_YET_VALID


def test_a_lifetime_beyond_the_proxys_maximum_is_refused(tmp_path: Path, keys: Keys) -> None:
    token = keys.token(lifetime=1800)
    default = verifier_of(tmp_path, public_key_files=[str(keys.public)])
    assert refusal(default, token) is RefusalReason.LIFETIME_TOO_LONG
    longer = verifier_of(tmp_path, public_key_files=[str(keys.public)], max_lifetime=1800)
    accepts(longer, token, now=NOW + 1799)


def test_wrong_user(keys: Keys, verifier: TokenVerifier) -> None:
    assert refusal(verifier, keys.token(user="app"), user="admin") is RefusalReason.WRONG_USER
    assert refusal(verifier, keys.token(user="App"), user="app") is RefusalReason.WRONG_USER


def test_wrong_host(keys: Keys, verifier: TokenVerifier) -> None:
    token = keys.token(host="other-proxy.example.com")
    assert refusal(verifier, token) is RefusalReason.WRONG_HOST


def test_wrong_port(keys: Keys, verifier: TokenVerifier) -> None:
    assert refusal(verifier, keys.token(port=6433)) is RefusalReason.WRONG_PORT


@pytest.mark.parametrize(
    ("part", "forged"),
    [
        ("DBUser=app", "DBUser=admin"),
        ("Expires=900", "Expires=901"),
        ("Date=1800000000", "Date=1800000900"),
        ("6432/", "6433/"),
        ("127.0.0.1:", "127.0.0.2:"),
    ],
)
def test_a_changed_payload_is_tampered_whatever_it_claims(
    tmp_path: Path, keys: Keys, part: str, forged: str
) -> None:
    verifier = verifier_of(
        tmp_path, public_key_files=[str(keys.public)], hosts=["127.0.0.1", "127.0.0.2"]
    )
    token = keys.token()
    assert part in token
    forgery = token.replace(part, forged)
    assert refusal(verifier, forgery, user="admin", port=6433) is RefusalReason.TAMPERED


def test_a_changed_signature_is_tampered(keys: Keys, verifier: TokenVerifier) -> None:
    token = keys.token()
    head, _, signature = token.partition("&Signature=")
    flipped = signature[:10] + ("B" if signature[10] != "B" else "C") + signature[11:]
    assert refusal(verifier, f"{head}&Signature={flipped}") is RefusalReason.TAMPERED


def test_a_signature_with_its_unused_bits_set_is_tampered(
    keys: Keys, verifier: TokenVerifier
) -> None:
    """86 base64 characters carry 516 bits for 64 bytes: a token has one spelling only."""
    token = keys.token()
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    last = alphabet.index(token[-1])
    other = token[:-1] + alphabet[last ^ 1]
    assert base64.urlsafe_b64decode(other.rpartition("=")[2] + "==") == base64.urlsafe_b64decode(
        token.rpartition("=")[2] + "=="
    )
    assert refusal(verifier, other) is RefusalReason.TAMPERED


def test_a_key_the_proxy_does_not_hold_is_unknown(tmp_path: Path, verifier: TokenVerifier) -> None:
    stranger = Keys(tmp_path / "stranger")
    assert refusal(verifier, stranger.token()) is RefusalReason.UNKNOWN_KEY


def _garbage(token: str) -> list[str]:
    head, _, signature = token.partition("&Signature=")
    return [
        "",
        "app-secret",
        "x" * (MAX_TOKEN_LENGTH + 1),
        token + "&Extra=1",
        token[:-1],
        token.replace("&KeyId=", "&KeyID="),
        token.replace("Action=connect", "Action=drop"),
        token.replace("&Expires=900", ""),
        token.replace(":6432/", ":/"),
        token.replace("127.0.0.1", "127.0.0.1 "),
        token.replace("DBUser=app", "DBUser="),
        token.replace("DBUser=app", "DBUser=ä"),
        f"{head}&Signature={signature}=",
        f"{head}&Signature={signature}\n",
        "a" * 2000 + token,
    ]


def test_garbage_and_overlong_input_is_malformed(keys: Keys, verifier: TokenVerifier) -> None:
    for garbage in _garbage(keys.token()):
        assert refusal(verifier, garbage) is RefusalReason.MALFORMED, garbage[:80]


def test_a_refusal_and_the_verifier_never_show_the_token(
    keys: Keys, verifier: TokenVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = keys.token()
    signature = token.rpartition("=")[2]
    accepts(verifier, token)
    with pytest.raises(TokenRefused) as caught:
        verifier.verify(token, host=HOST, port=PORT, user="admin", now=NOW)
    for text in (str(caught.value), repr(caught.value), repr(verifier), str(verifier)):
        assert signature not in text
        assert "Signature" not in text
    assert signature not in caplog.text
    assert keys.key_id in repr(verifier)  # what it holds, by id only


# ---------------------------------------------------------------------------------------------
# Host names a token may name


def test_configured_hosts_are_the_names_accepted_besides_the_arrival_address(
    tmp_path: Path, keys: Keys
) -> None:
    verifier = verifier_of(
        tmp_path, public_key_files=[str(keys.public)], hosts=["Orders.DB.example.com"]
    )
    accepts(verifier, keys.token(host="orders.db.example.com"))
    accepts(verifier, keys.token(host="ORDERS.db.example.com"))
    accepts(verifier, keys.token(host=HOST))  # the address the connection arrived on
    assert refusal(verifier, keys.token(host="localhost")) is RefusalReason.WRONG_HOST


def test_a_loopback_listener_accepts_the_loopback_names_by_default(
    tmp_path: Path, keys: Keys
) -> None:
    verifier = verifier_of(tmp_path, ("127.0.0.1",), public_key_files=[str(keys.public)])
    for name in ("localhost", "127.0.0.1", "::1"):
        accepts(verifier, keys.token(host=name), host="127.0.0.1")
    assert refusal(verifier, keys.token(host="db.example.com")) is RefusalReason.WRONG_HOST


def test_a_wildcard_listener_accepts_only_the_arrival_address_by_default(
    tmp_path: Path, keys: Keys
) -> None:
    verifier = verifier_of(tmp_path, ("0.0.0.0",), public_key_files=[str(keys.public)])
    accepts(verifier, keys.token(host="10.1.2.3"), host="10.1.2.3")
    for name in ("0.0.0.0", "localhost", "10.1.2.4"):
        assert refusal(verifier, keys.token(host=name), host="10.1.2.3") is RefusalReason.WRONG_HOST


def test_ip_addresses_compare_in_their_short_form(tmp_path: Path, keys: Keys) -> None:
    verifier = verifier_of(
        tmp_path, ("::",), public_key_files=[str(keys.public)], hosts=["2001:DB8:0:0:0:0:0:1"]
    )
    accepts(verifier, keys.token(host="2001:db8::1"), host="::")
    # a dual-stack socket reports an IPv4 client's arrival address as IPv4-mapped IPv6
    accepts(verifier, keys.token(host="10.1.2.3"), host="::ffff:10.1.2.3")
    assert refusal(verifier, keys.token(host="10.1.2.3"), host="not a host") is (
        RefusalReason.WRONG_HOST
    )


def test_a_proxy_config_gives_its_verifier_and_its_endpoints_names(
    tmp_path: Path, keys: Keys
) -> None:
    config = parse_config(
        {
            "proxies": [
                {
                    "name": "orders",
                    "engine_family": "POSTGRESQL",
                    "listen": "192.0.2.10:6432",
                    "endpoints": [{"name": "ro", "listen": "db-ro.example.com:6433"}],
                    "auth": [{"secret": "env:APP"}],
                    "auth_tokens": {"public_key_files": ["keys/signing.pub"]},
                    "target_group": {"targets": [{"host": "127.0.0.1", "port": 5432}]},
                }
            ]
        },
        base_dir=tmp_path,
    )
    [proxy] = config.proxies
    verifier = TokenVerifier.for_proxy(proxy, config.base_dir)
    assert verifier is not None
    accepts(verifier, keys.token(host="db-ro.example.com", port=6433), host="0.0.0.0", port=6433)
    accepts(verifier, keys.token(host="192.0.2.10"), host="0.0.0.0")
    no_tokens = proxy.model_copy(update={"auth_tokens": None})
    assert TokenVerifier.for_proxy(no_tokens, tmp_path) is None


# ---------------------------------------------------------------------------------------------
# Key files: several keys at once, rotation, reload


def test_two_keys_are_accepted_at_once_from_two_files(tmp_path: Path) -> None:
    old, new = Keys(tmp_path, "old"), Keys(tmp_path, "new")
    verifier = verifier_of(tmp_path, public_key_files=["old.pub", "new.pub"])
    accepts(verifier, old.token())
    accepts(verifier, new.token())


def test_a_key_removed_from_its_file_is_refused_after_reload(tmp_path: Path) -> None:
    old, new = Keys(tmp_path, "old"), Keys(tmp_path, "new")
    bundle = tmp_path / "accepted.pub"
    bundle.write_bytes(old.public.read_bytes() + new.public.read_bytes())
    verifier = verifier_of(tmp_path, public_key_files=["accepted.pub"])
    accepts(verifier, old.token())
    accepts(verifier, new.token())
    assert verifier.reload_if_changed() is False  # nothing changed

    bundle.write_bytes(new.public.read_bytes())
    assert verifier.reload_if_changed() is True
    assert refusal(verifier, old.token()) is RefusalReason.UNKNOWN_KEY
    accepts(verifier, new.token())


def test_a_key_file_that_does_not_load_leaves_the_previous_keys_in_use(
    tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = verifier_of(tmp_path, public_key_files=[str(keys.public)])
    keys.public.write_bytes(b"-----BEGIN PUBLIC KEY-----\nhalf written")
    assert verifier.reload_if_changed() is False
    assert "previous keys stay in use" in caplog.text
    accepts(verifier, keys.token())
    keys.public.unlink()
    assert verifier.reload_if_changed() is False
    accepts(verifier, keys.token())


def test_a_rewritten_key_file_is_read_again(tmp_path: Path, keys: Keys) -> None:
    verifier = verifier_of(tmp_path, public_key_files=[str(keys.public)])
    replacement = Keys(tmp_path / "replacement")
    os.replace(replacement.public, keys.public)
    assert verifier.reload_if_changed() is True
    accepts(verifier, replacement.token())
    assert refusal(verifier, keys.token()) is RefusalReason.UNKNOWN_KEY


def test_key_files_that_cannot_be_used_are_named_at_start(tmp_path: Path) -> None:
    with pytest.raises(TokenKeyError, match=re.escape("absent.pub")):
        verifier_of(tmp_path, public_key_files=["absent.pub"])
    (tmp_path / "empty.pub").write_text("no key here\n")
    with pytest.raises(TokenKeyError, match=re.escape("empty.pub holds no PEM public key")):
        verifier_of(tmp_path, public_key_files=["empty.pub"])
    (tmp_path / "ec.pub").write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(TokenKeyError, match=re.escape("ec.pub holds a key that is not Ed25519")):
        verifier_of(tmp_path, public_key_files=["ec.pub"])


# ---------------------------------------------------------------------------------------------
# JWTs from an OIDC issuer (Kubernetes service-account tokens)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class Oidc:
    """An issuer's signing key, its JWKS file in `folder`, and tokens it signs."""

    def __init__(self, folder: Path, kind: str = "RSA", kid: str = "k8s-1") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "RSA":
            self.key: Any = rsa.generate_private_key(65537, 2048)
            self.algorithm = "RS256"
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())
            self.algorithm = "ES256"
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        self.kid = kid
        self.jwks_file = folder / "jwks.json"
        self.jwks = {"keys": [{**jwk, "kid": kid, "use": "sig"}]}
        self.jwks_file.write_text(json.dumps(self.jwks))

    def claims(self, **changes: Any) -> dict[str, Any]:
        claims = {
            "iss": ISSUER,
            "aud": ["https://kubernetes.default.svc", AUDIENCE],
            "sub": "system:serviceaccount:orders:app",
            "iat": int(NOW),
            "nbf": int(NOW),
            "exp": int(NOW) + 3600,
            **changes,
        }
        return {name: value for name, value in claims.items() if value is not None}

    def token(self, headers: dict[str, Any] | None = None, **changes: Any) -> str:
        return jwt.encode(
            self.claims(**changes),
            self.key,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **(headers or {})},
        )

    def settings(self, **changes: Any) -> dict[str, Any]:
        return {
            "jwks_file": str(self.jwks_file),
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "users": {"system:serviceaccount:orders:app": USER},
            **changes,
        }


@pytest.fixture(params=["RSA", "EC"])
def oidc(request: pytest.FixtureRequest, tmp_path: Path) -> Oidc:
    return Oidc(tmp_path / "oidc", request.param)


def oidc_verifier(tmp_path: Path, oidc: Oidc, **changes: Any) -> TokenVerifier:
    return verifier_of(tmp_path, oidc=oidc.settings(**changes))


def test_a_service_account_token_lets_its_mapped_user_in(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    accepts(verifier, oidc.token())
    # not bound to a host or port: the audience says which proxies it is for
    accepts(verifier, oidc.token(), host="db.example.com", port=1)


def test_without_a_table_the_claim_is_the_user(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc, users={}, user_claim="preferred_username")
    accepts(verifier, oidc.token(preferred_username="app"))
    assert refusal(verifier, oidc.token(preferred_username="bob")) is RefusalReason.WRONG_USER
    assert refusal(verifier, oidc.token()) is RefusalReason.MALFORMED  # no such claim


def test_a_jwt_for_another_user_is_wrong_user(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    assert refusal(verifier, oidc.token(), user="admin") is RefusalReason.WRONG_USER
    unmapped = oidc.token(sub="system:serviceaccount:other:app")
    assert refusal(verifier, unmapped) is RefusalReason.WRONG_USER


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "https://evil.example.com"}, RefusalReason.WRONG_ISSUER),
        ({"aud": "someone-else"}, RefusalReason.WRONG_AUDIENCE),
        ({"aud": ["a", "b"]}, RefusalReason.WRONG_AUDIENCE),
        ({"exp": int(NOW)}, RefusalReason.EXPIRED),
        ({"nbf": int(NOW) + CLOCK_SKEW + 1}, RefusalReason.NOT_YET_VALID),
        ({"iat": int(NOW) + CLOCK_SKEW + 1}, RefusalReason.NOT_YET_VALID),
        ({"exp": None}, RefusalReason.MALFORMED),
        ({"aud": None}, RefusalReason.MALFORMED),
        ({"exp": "tomorrow"}, RefusalReason.MALFORMED),
        ({"nbf": True}, RefusalReason.MALFORMED),
    ],
)
def test_jwt_claims_are_checked(
    tmp_path: Path, oidc: Oidc, changes: dict[str, Any], reason: RefusalReason
) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    assert refusal(verifier, oidc.token(**changes)) is reason


def test_jwt_times_allow_the_clock_skew(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    accepts(verifier, oidc.token(nbf=int(NOW) + CLOCK_SKEW, iat=int(NOW) + CLOCK_SKEW))


def test_a_jwt_signed_by_another_key_with_the_same_kid_is_tampered(
    tmp_path: Path, oidc: Oidc
) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    impostor = Oidc(tmp_path / "impostor", "RSA" if oidc.algorithm == "RS256" else "EC")
    assert refusal(verifier, impostor.token()) is RefusalReason.TAMPERED


def test_a_jwt_with_a_changed_payload_is_tampered(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    header, _, signature = oidc.token().split(".")
    claims = _b64(json.dumps(oidc.claims(sub="system:serviceaccount:orders:admin")).encode())
    assert refusal(verifier, f"{header}.{claims}.{signature}") is RefusalReason.TAMPERED


def test_alg_none_is_tampered(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": oidc.kid}).encode())
    claims = _b64(json.dumps(oidc.claims()).encode())
    assert refusal(verifier, f"{header}.{claims}.") is RefusalReason.TAMPERED


def test_hs256_with_the_public_key_as_secret_is_tampered(tmp_path: Path, oidc: Oidc) -> None:
    """The classic confusion: the public key (which anyone may read) used as an HMAC secret."""
    verifier = oidc_verifier(tmp_path, oidc)
    public_pem = oidc.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": oidc.kid}).encode())
    claims = _b64(json.dumps(oidc.claims()).encode())
    mac = hmac.new(public_pem, f"{header}.{claims}".encode(), hashlib.sha256).digest()
    assert refusal(verifier, f"{header}.{claims}.{_b64(mac)}") is RefusalReason.TAMPERED


def test_a_symmetric_key_in_the_jwks_is_never_used(tmp_path: Path, oidc: Oidc) -> None:
    secret = b"shared-secret-of-32-bytes-length"
    oidc.jwks["keys"].append({"kty": "oct", "k": _b64(secret), "kid": "hmac", "alg": "HS256"})
    oidc.jwks_file.write_text(json.dumps(oidc.jwks))
    verifier = oidc_verifier(tmp_path, oidc)
    forged = jwt.encode(oidc.claims(), secret, algorithm="HS256", headers={"kid": "hmac"})
    assert refusal(verifier, forged) is RefusalReason.UNKNOWN_KEY
    oidc.jwks_file.write_text(json.dumps({"keys": [oidc.jwks["keys"][-1]]}))
    with pytest.raises(TokenKeyError, match="no usable signing key"):
        oidc_verifier(tmp_path, oidc)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the forger's
def test_a_weak_rsa_key_in_the_jwks_is_never_used(tmp_path: Path, oidc: Oidc) -> None:
    weak = rsa.generate_private_key(65537, 1024)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(weak.public_key()))
    oidc.jwks["keys"].append({**jwk, "kid": "weak"})
    oidc.jwks_file.write_text(json.dumps(oidc.jwks))
    verifier = oidc_verifier(tmp_path, oidc)
    forged = jwt.encode(oidc.claims(), weak, algorithm="RS256", headers={"kid": "weak"})
    assert refusal(verifier, forged) is RefusalReason.UNKNOWN_KEY


def test_a_jwt_naming_an_unknown_kid_is_unknown_key(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    assert refusal(verifier, oidc.token(headers={"kid": "k8s-2"})) is RefusalReason.UNKNOWN_KEY


def test_a_jwt_without_kid_uses_a_lone_key(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    token = jwt.encode(oidc.claims(), oidc.key, algorithm=oidc.algorithm)
    assert "kid" not in jwt.get_unverified_header(token)
    accepts(verifier, token)


def test_a_jwt_without_oidc_configured_is_unknown_key(
    tmp_path: Path, oidc: Oidc, verifier: TokenVerifier
) -> None:
    assert refusal(verifier, oidc.token()) is RefusalReason.UNKNOWN_KEY


def test_the_jwks_file_is_read_again_when_the_issuer_rotates(tmp_path: Path, oidc: Oidc) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    successor = Oidc(tmp_path / "next", "EC", kid="k8s-2")
    oidc.jwks_file.write_text(json.dumps(successor.jwks))
    assert verifier.reload_if_changed() is True
    accepts(verifier, successor.token())
    assert refusal(verifier, oidc.token()) is RefusalReason.UNKNOWN_KEY


@pytest.mark.parametrize(
    "header",
    [
        b'{"alg": ',  # not JSON
        b'{"a": ' + b"[" * 2000,  # nested past the interpreter's recursion limit
        b'{"kid": "k8s-1"}',  # no algorithm
        b'{"alg": 256}',
        b'{"alg": "ES256", "kid": 7}',
    ],
)
def test_a_jwt_with_a_bad_header_is_malformed(tmp_path: Path, header: bytes) -> None:
    oidc = Oidc(tmp_path, "EC")
    verifier = oidc_verifier(tmp_path, oidc)
    signature = oidc.token().rpartition(".")[2]
    token = f"{_b64(header)}.{_b64(json.dumps(oidc.claims()).encode())}.{signature}"
    assert token.startswith("eyJ")
    assert refusal(verifier, token) is RefusalReason.MALFORMED


@pytest.mark.parametrize("cut", [1, 2])
def test_a_jwt_signature_of_a_length_or_spelling_no_encoder_writes_is_malformed(
    tmp_path: Path, oidc: Oidc, cut: int
) -> None:
    verifier = oidc_verifier(tmp_path, oidc)
    token = oidc.token()
    signature = token.rpartition(".")[2]
    while len(signature) % 4 != cut:  # 1: not base64 at all; 2: its last character's unused bits
        signature = signature[:-1]
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    if cut == 2:
        signature = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]
    assert refusal(verifier, f"{token.rpartition('.')[0]}.{signature}") is RefusalReason.MALFORMED


def test_a_signed_jwt_whose_claims_nest_past_recursion_is_malformed(tmp_path: Path) -> None:
    oidc = Oidc(tmp_path, "EC")
    verifier = oidc_verifier(tmp_path, oidc)
    header = _b64(json.dumps({"alg": "ES256", "kid": oidc.kid}).encode())
    claims = _b64(b"[" * 2500)
    r, s = decode_dss_signature(
        oidc.key.sign(f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    )
    token = f"{header}.{claims}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    assert len(token) < MAX_TOKEN_LENGTH
    assert refusal(verifier, token) is RefusalReason.MALFORMED


def test_oidc_files_that_cannot_be_used_are_named_at_start(tmp_path: Path, oidc: Oidc) -> None:
    oidc.jwks_file.write_text("{not json")
    with pytest.raises(TokenKeyError, match=re.escape("jwks.json is not JSON")):
        oidc_verifier(tmp_path, oidc)
    oidc.jwks_file.write_text('{"keys": 5}')
    with pytest.raises(TokenKeyError, match="no 'keys' list"):
        oidc_verifier(tmp_path, oidc)


# ---------------------------------------------------------------------------------------------
# Real drivers carry a token as a password, unchanged and unquoted


@pytest.fixture(scope="module")
def cleartext_pg() -> Iterator[PostgresCluster]:
    """PostgreSQL asking for the password in cleartext, as dbmux asks a token of a client."""
    with PostgresCluster(auth_method="password") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def driver_tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("driver-tokens")
    keys, oidc = Keys(folder), Oidc(folder, "RSA")
    return {"dbmux": keys.token(host="orders.db.example.com"), "jwt": oidc.token()}


@pytest.fixture(params=["dbmux", "jwt"])
def pg_token_role(
    request: pytest.FixtureRequest, cleartext_pg: PostgresCluster, driver_tokens: dict[str, str]
) -> Iterator[tuple[str, str]]:
    """A role whose password is a token of each kind."""
    role, token = f"tok_{secrets.token_hex(4)}", driver_tokens[request.param]
    cleartext_pg.create_user(role, token)
    yield role, token
    cleartext_pg.psql(f'DROP ROLE "{role}"')


def test_libpq_takes_a_token_unquoted_in_a_conninfo_string(
    cleartext_pg: PostgresCluster, pg_token_role: tuple[str, str]
) -> None:
    role, token = pg_token_role
    conninfo = (
        f"host={cleartext_pg.host} port={cleartext_pg.port} dbname=postgres user={role} "
        f"password={token} sslmode=disable connect_timeout=10"
    )
    with psycopg.connect(conninfo) as connection:
        assert connection.execute("SELECT current_user").fetchone() == (role,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(conninfo.replace(f"password={token}", f"password={token[:-1]}"))


def test_asyncpg_sends_a_token_as_its_cleartext_password(
    cleartext_pg: PostgresCluster, pg_token_role: tuple[str, str]
) -> None:
    role, token = pg_token_role

    async def login() -> str:
        connection = await asyncpg.connect(
            host=cleartext_pg.host, port=cleartext_pg.port, user=role, password=token,
            database="postgres", ssl=False, timeout=10,
        )  # fmt: skip
        try:
            return str(await connection.fetchval("SELECT current_user"))
        finally:
            await connection.close()

    assert asyncio.run(asyncio.wait_for(login(), 30)) == role


@pytest.mark.parametrize("driver", ["pymysql", "mysql-connector"])
def test_mysql_drivers_carry_a_token_as_their_password(
    driver_tokens: dict[str, str], driver: str
) -> None:
    """Through the shared MariaDB: a user whose password is the token logs in with it."""
    token, user = driver_tokens["dbmux"], f"tok_{secrets.token_hex(4)}"
    root = pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=10)
    try:
        with root.cursor() as cursor:
            cursor.execute(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY %s", (token,))
        login: Any = pymysql.connect if driver == "pymysql" else mysql.connector.connect
        options = {"connect_timeout": 10} if driver == "pymysql" else {"use_pure": True}
        connection = login(host="127.0.0.1", port=3306, user=user, password=token, **options)
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT CURRENT_USER()")
            assert cursor.fetchone() == (f"{user}@127.0.0.1",)
        finally:
            connection.close()
    finally:
        with root.cursor() as cursor:
            cursor.execute(f"DROP USER IF EXISTS '{user}'@'127.0.0.1'")
        root.close()


# ---------------------------------------------------------------------------------------------
# Any input: accepted or TokenRefused, nothing else


@pytest.fixture(scope="module")
def one_of_each(tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenVerifier, list[str]]:
    """A verifier of both kinds and a valid token of each, shared by the property tests
    (hypothesis runs a test many times over one fixture value)."""
    folder = tmp_path_factory.mktemp("tokens")
    keys, oidc = Keys(folder), Oidc(folder, "EC")
    verifier = verifier_of(folder, public_key_files=[str(keys.public)], oidc=oidc.settings())
    return verifier, [keys.token(), oidc.token()]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=600))
def test_arbitrary_text_is_only_ever_refused(
    one_of_each: tuple[TokenVerifier, list[str]], text: str
) -> None:
    verifier, _ = one_of_each
    with pytest.raises(TokenRefused):
        verifier.verify(text, host=HOST, port=PORT, user=USER, now=NOW)


TOKEN_ALPHABET = string.ascii_letters + string.digits + "-_.~%:/?&=[]"


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_any_change_to_a_valid_token_is_refused(
    one_of_each: tuple[TokenVerifier, list[str]], data: st.DataObject
) -> None:
    verifier, tokens = one_of_each
    for token in tokens:
        verifier.verify(token, host=HOST, port=PORT, user=USER, now=NOW)
    original = data.draw(st.sampled_from(tokens))
    start = data.draw(st.integers(0, len(original) - 1))
    end = data.draw(st.integers(start, min(len(original), start + 8)))
    changed = original[:start] + data.draw(st.text(TOKEN_ALPHABET, max_size=8)) + original[end:]
    assume(changed != original)
    with pytest.raises(TokenRefused):
        verifier.verify(changed, host=HOST, port=PORT, user=USER, now=NOW)
