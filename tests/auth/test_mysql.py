"""Tests for dbmux.auth.mysql against PyMySQL, mysql-connector-python and a real MariaDB."""

from __future__ import annotations

import secrets
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given
from hypothesis import strategies as st
from mysql.connector.plugins.caching_sha2_password import MySQLCachingSHA2PasswordAuthPlugin
from mysql.connector.plugins.mysql_native_password import MySQLNativePasswordAuthPlugin
from pymysql import _auth as pymysql_auth

from dbmux.auth.mysql import (
    NONCE_LENGTH,
    RsaKey,
    RsaKeyError,
    encrypt_password,
    native_scramble,
    new_nonce,
    sha2_scramble,
    verify_native,
    verify_sha2,
)
from dbmux.testing import MariaDBServer

NONCE = b"abcdefghij0123456789"
passwords = st.text(max_size=50)  # at most 200 UTF-8 bytes: fits RSA-2048 OAEP-SHA1 (214)
nonces = st.binary(min_size=NONCE_LENGTH, max_size=NONCE_LENGTH)
OAEP_SHA1 = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
)
# A key made by `cryptography` directly, standing in for a MySQL server's.
SERVER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SERVER_PEM = SERVER_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


@pytest.fixture(scope="module")
def rsa_key() -> RsaKey:
    return RsaKey.generate()


# --- nonces ----------------------------------------------------------------------------------


def test_new_nonce_is_twenty_printable_bytes_without_nul_or_dollar() -> None:
    seen = set()
    for _ in range(200):
        nonce = new_nonce()
        assert len(nonce) == NONCE_LENGTH == 20
        assert all(0x21 <= byte <= 0x7E for byte in nonce)
        assert b"\0" not in nonce
        assert b"$" not in nonce
        seen.add(nonce)
    assert len(seen) == 200


# --- mysql_native_password -------------------------------------------------------------------


@given(password=passwords, nonce=nonces)
def test_native_scramble_matches_pymysql_and_connector(password: str, nonce: bytes) -> None:
    ours = native_scramble(password, nonce)
    assert ours == pymysql_auth.scramble_native_password(password.encode(), nonce)
    assert ours == MySQLNativePasswordAuthPlugin("u", password).auth_response(nonce)
    assert len(ours) == (20 if password else 0)


@given(password=passwords, nonce=nonces)
def test_native_scramble_ignores_bytes_after_the_nonce(password: str, nonce: bytes) -> None:
    assert native_scramble(password, nonce + b"\0") == native_scramble(password, nonce)
    assert native_scramble(password, nonce + b"\0") == pymysql_auth.scramble_native_password(
        password.encode(), nonce + b"\0"
    )


def test_native_scramble_of_empty_password_is_empty() -> None:
    assert native_scramble("", NONCE) == b""


@given(password=passwords.filter(bool), nonce=nonces)
def test_verify_native_accepts_pymysql_response(password: str, nonce: bytes) -> None:
    response = pymysql_auth.scramble_native_password(password.encode(), nonce)
    assert verify_native(password, nonce, response)
    assert verify_native(password, nonce, bytearray(response))
    assert not verify_native(password + "x", nonce, response)
    assert not verify_native(password, bytes([nonce[0] ^ 1]) + nonce[1:], response)


@pytest.mark.parametrize(
    "response",
    [
        native_scramble("wrong", NONCE),
        native_scramble("secret", NONCE[::-1]),
        native_scramble("secret", NONCE)[:-1],
        native_scramble("secret", NONCE) + b"\0",
        bytes([native_scramble("secret", NONCE)[0] ^ 0x80]) + native_scramble("secret", NONCE)[1:],
        sha2_scramble("secret", NONCE),
        b"",
        b"\0" * 20,
        b"secret",
    ],
)
def test_verify_native_rejects_wrong_response(response: bytes) -> None:
    assert verify_native("secret", NONCE, native_scramble("secret", NONCE))
    assert not verify_native("secret", NONCE, response)


@pytest.mark.parametrize("response", [b"\0", b"\0" * 20, native_scramble("x", NONCE)])
def test_verify_native_empty_password_only_accepts_empty_response(response: bytes) -> None:
    assert verify_native("", NONCE, b"")
    assert not verify_native("", NONCE, response)


# --- caching_sha2_password fast authentication -----------------------------------------------


@given(password=passwords, nonce=nonces)
def test_sha2_scramble_matches_pymysql_and_connector(password: str, nonce: bytes) -> None:
    ours = sha2_scramble(password, nonce)
    assert ours == pymysql_auth.scramble_caching_sha2(password.encode(), nonce)
    assert ours == MySQLCachingSHA2PasswordAuthPlugin("u", password).auth_response(nonce)
    assert len(ours) == (32 if password else 0)


def test_sha2_scramble_ignores_bytes_after_the_nonce() -> None:
    assert sha2_scramble("secret", NONCE + b"\0") == sha2_scramble("secret", NONCE)


def test_sha2_scramble_of_empty_password_is_empty() -> None:
    assert sha2_scramble("", NONCE) == b""


@given(password=passwords.filter(bool), nonce=nonces)
def test_verify_sha2_accepts_pymysql_response(password: str, nonce: bytes) -> None:
    response = pymysql_auth.scramble_caching_sha2(password.encode(), nonce)
    assert verify_sha2(password, nonce, response)
    assert not verify_sha2(password + "x", nonce, response)
    assert not verify_sha2(password, bytes([nonce[0] ^ 1]) + nonce[1:], response)


@pytest.mark.parametrize(
    "response",
    [
        sha2_scramble("wrong", NONCE),
        sha2_scramble("secret", NONCE[::-1]),
        sha2_scramble("secret", NONCE)[:-1],
        sha2_scramble("secret", NONCE)[:20],
        sha2_scramble("secret", NONCE) + b"\0",
        native_scramble("secret", NONCE),
        b"",
        b"\0" * 32,
        b"secret\0",
    ],
)
def test_verify_sha2_rejects_wrong_response(response: bytes) -> None:
    assert verify_sha2("secret", NONCE, sha2_scramble("secret", NONCE))
    assert not verify_sha2("secret", NONCE, response)


@pytest.mark.parametrize("response", [b"\0", b"\0" * 32, sha2_scramble("x", NONCE)])
def test_verify_sha2_empty_password_only_accepts_empty_response(response: bytes) -> None:
    assert verify_sha2("", NONCE, b"")
    assert not verify_sha2("", NONCE, response)


# --- caching_sha2_password full authentication (RSA) ----------------------------------------


def test_public_pem_is_subject_public_key_info(rsa_key: RsaKey) -> None:
    assert rsa_key.public_pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert rsa_key.public_pem.rstrip().endswith(b"-----END PUBLIC KEY-----")
    loaded = serialization.load_pem_public_key(rsa_key.public_pem)
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.key_size == 2048


def test_generate_honours_bits() -> None:
    key = RsaKey.generate(bits=1024)
    loaded = serialization.load_pem_public_key(key.public_pem)
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.key_size == 1024
    ciphertext = pymysql_auth.sha2_rsa_encrypt(b"secret", NONCE, key.public_pem)
    assert key.decrypt_password(ciphertext, NONCE) == "secret"


@given(password=passwords, nonce=nonces)
def test_decrypt_password_of_pymysql_ciphertext(
    rsa_key: RsaKey, password: str, nonce: bytes
) -> None:
    ciphertext = pymysql_auth.sha2_rsa_encrypt(password.encode(), nonce, rsa_key.public_pem)
    assert rsa_key.decrypt_password(ciphertext, nonce) == password


def test_decrypt_password_ignores_bytes_after_the_nonce(rsa_key: RsaKey) -> None:
    # PyMySQL uses the first 20 bytes too; a greeting's trailing NUL must not matter, even
    # where the nonce repeats (password longer than 20 bytes).
    password = "longer than the twenty-byte nonce"
    ciphertext = pymysql_auth.sha2_rsa_encrypt(password.encode(), NONCE + b"\0", rsa_key.public_pem)
    assert rsa_key.decrypt_password(ciphertext, NONCE + b"\0") == password
    assert rsa_key.decrypt_password(ciphertext, NONCE) == password
    ours = encrypt_password(password, NONCE + b"\0", rsa_key.public_pem)
    assert rsa_key.decrypt_password(ours, NONCE) == password


def test_decrypt_password_longer_than_nonce_repeats_it(rsa_key: RsaKey) -> None:
    password = "a much longer password than twenty bytes: \u00e4\u00f6\u00fc \u2603 " * 3
    ciphertext = pymysql_auth.sha2_rsa_encrypt(password.encode(), NONCE, rsa_key.public_pem)
    assert rsa_key.decrypt_password(ciphertext, NONCE) == password


@given(password=passwords, nonce=nonces)
def test_encrypt_password_decrypts_with_cryptography(password: str, nonce: bytes) -> None:
    ciphertext = encrypt_password(password, nonce, SERVER_PEM)
    assert len(ciphertext) == 256
    plaintext = SERVER_KEY.decrypt(ciphertext, OAEP_SHA1)
    # PyMySQL's own XOR undoes ours: XOR with the repeated nonce is its own inverse.
    assert pymysql_auth._xor_password(plaintext, nonce) == password.encode() + b"\0"


def test_encrypt_password_accepts_pkcs1_pem() -> None:
    pkcs1_pem = SERVER_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )
    assert pkcs1_pem.startswith(b"-----BEGIN RSA PUBLIC KEY-----")
    plaintext = SERVER_KEY.decrypt(encrypt_password("pw", NONCE, pkcs1_pem), OAEP_SHA1)
    assert pymysql_auth._xor_password(plaintext, NONCE) == b"pw\0"


def test_encrypt_password_is_randomised(rsa_key: RsaKey) -> None:
    first = encrypt_password("secret", NONCE, rsa_key.public_pem)
    second = encrypt_password("secret", NONCE, rsa_key.public_pem)
    assert first != second
    assert rsa_key.decrypt_password(first, NONCE) == rsa_key.decrypt_password(second, NONCE)


def test_encrypt_then_decrypt(rsa_key: RsaKey) -> None:
    for password in ("", "secret", "p\u00e4ss\0word\0"):
        ciphertext = encrypt_password(password, NONCE, rsa_key.public_pem)
        assert rsa_key.decrypt_password(ciphertext, NONCE) == password


def test_decrypt_password_with_wrong_nonce_is_not_the_password(rsa_key: RsaKey) -> None:
    ciphertext = encrypt_password("secret", NONCE, rsa_key.public_pem)
    assert rsa_key.decrypt_password(ciphertext, NONCE[::-1]) != "secret"


def test_decrypt_password_refuses_other_keys_ciphertext(rsa_key: RsaKey) -> None:
    ciphertext = encrypt_password("secret", NONCE, RsaKey.generate().public_pem)
    assert rsa_key.decrypt_password(ciphertext, NONCE) is None


@pytest.mark.parametrize(
    "ciphertext",
    [b"", b"\0", b"garbage", b"\0" * 256, b"\xff" * 256, secrets.token_bytes(256), b"\1" * 512],
)
def test_decrypt_password_refuses_garbage(rsa_key: RsaKey, ciphertext: bytes) -> None:
    assert rsa_key.decrypt_password(ciphertext, NONCE) is None


def test_decrypt_password_refuses_pkcs1v15_ciphertext(rsa_key: RsaKey) -> None:
    # MySQL before 8.0.5 padded with PKCS#1 v1.5; that is not what we accept.
    public_key = serialization.load_pem_public_key(rsa_key.public_pem)
    assert isinstance(public_key, rsa.RSAPublicKey)
    message = pymysql_auth._xor_password(b"secret\0", NONCE)
    ciphertext = public_key.encrypt(message, padding.PKCS1v15())
    assert rsa_key.decrypt_password(ciphertext, NONCE) is None


@pytest.mark.parametrize(
    "plaintext",
    [
        b"secret",  # no trailing NUL
        b"",
        b"\xff\xfe\0",  # not UTF-8
    ],
)
def test_decrypt_password_refuses_malformed_plaintext(rsa_key: RsaKey, plaintext: bytes) -> None:
    public_key = serialization.load_pem_public_key(rsa_key.public_pem)
    assert isinstance(public_key, rsa.RSAPublicKey)
    ciphertext = public_key.encrypt(pymysql_auth._xor_password(plaintext, NONCE), OAEP_SHA1)
    assert rsa_key.decrypt_password(ciphertext, NONCE) is None


def _ec_public_pem() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _private_pem() -> bytes:
    return SERVER_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    "public_pem",
    [
        b"",
        b"garbage",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        _ec_public_pem(),
        _private_pem(),
    ],
)
def test_encrypt_password_refuses_unusable_key(public_pem: bytes) -> None:
    with pytest.raises(ValueError):
        encrypt_password("secret", NONCE, public_pem)


def test_encrypt_password_too_long_for_key() -> None:
    small = RsaKey.generate(bits=1024)  # OAEP-SHA1 fits 128 - 42 = 86 bytes
    with pytest.raises(ValueError):
        encrypt_password("x" * 86, NONCE, small.public_pem)
    assert small.decrypt_password(encrypt_password("x" * 85, NONCE, small.public_pem), NONCE)


# --- against a real MariaDB ------------------------------------------------------------------

CLIENT_LONG_PASSWORD = 0x1
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH = 0x80000
UTF8MB4_GENERAL_CI = 45
ER_ACCESS_DENIED_ERROR = 1045


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDBServer]:
    with MariaDBServer() as server:
        yield server


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    header = _recv_exact(sock, 4)
    return header[3], _recv_exact(sock, int.from_bytes(header[:3], "little"))


def _parse_greeting(greeting: bytes) -> tuple[bytes, bytes]:
    """(auth-plugin-data as sent, including part 2's terminating NUL; plugin name)."""
    assert greeting[0] == 10  # protocol version
    pos = greeting.index(b"\0", 1) + 1 + 4  # server version, thread id
    part1 = greeting[pos : pos + 8]
    pos += 8 + 1  # filler
    cap_low, _charset, _status, cap_high, auth_len = struct.unpack_from("<HBHHB", greeting, pos)
    pos += 8 + 10  # reserved
    capabilities = cap_low | cap_high << 16
    assert capabilities & CLIENT_SECURE_CONNECTION and capabilities & CLIENT_PLUGIN_AUTH
    part2_len = max(13, auth_len - 8)
    part2 = greeting[pos : pos + part2_len]
    assert part2.endswith(b"\0")
    pos += part2_len
    return part1 + part2, greeting[pos : greeting.index(b"\0", pos)]


def _login(port: int, user: str, password: str) -> bytes:
    """Log in with mysql_native_password by hand; the server's reply payload."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        seq, greeting = _read_packet(sock)
        nonce, plugin = _parse_greeting(greeting)
        assert plugin == b"mysql_native_password"
        assert len(nonce) == NONCE_LENGTH + 1  # native_scramble must skip the NUL itself
        response = native_scramble(password, nonce)
        capabilities = (
            CLIENT_LONG_PASSWORD
            | CLIENT_PROTOCOL_41
            | CLIENT_SECURE_CONNECTION
            | CLIENT_PLUGIN_AUTH
        )
        payload = (
            struct.pack("<IIB23x", capabilities, 1 << 24, UTF8MB4_GENERAL_CI)
            + user.encode()
            + b"\0"
            + bytes([len(response)])
            + response
            + plugin
            + b"\0"
        )
        sock.sendall(len(payload).to_bytes(3, "little") + bytes([seq + 1]) + payload)
        _seq, reply = _read_packet(sock)
        return reply


def _error_code(reply: bytes) -> int:
    assert reply[0] == 0xFF, reply
    return int.from_bytes(reply[1:3], "little")


@pytest.mark.parametrize("password", ["secret", "p\u00e4ss w\u00f6rd \u2603", ""])
def test_native_scramble_logs_in_to_mariadb(mariadb: MariaDBServer, password: str) -> None:
    user = f"u_{secrets.token_hex(6)}"
    mariadb.create_user(user, password)
    assert _login(mariadb.port, user, password)[0] == 0x00  # OK
    assert _error_code(_login(mariadb.port, user, password + "x")) == ER_ACCESS_DENIED_ERROR
    if password:
        assert _error_code(_login(mariadb.port, user, "")) == ER_ACCESS_DENIED_ERROR


# --- the RSA key kept across restarts ------------------------------------------------------


def pem_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_a_kept_key_is_generated_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dbmux" / "p.mysql-rsa-key.pem"
    first = RsaKey.kept_in(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert RsaKey.kept_in(path).public_pem == first.public_pem  # the next start: the same
    assert RsaKey.from_file(path).public_pem == first.public_pem
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_key_that_cannot_be_kept_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the folder should be")
    path = tmp_path / "state" / "key.pem"
    with pytest.raises(RsaKeyError, match=f"cannot keep the RSA key in {path}"):
        RsaKey.kept_in(path)


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "cannot read"),
        (b"not a key", "no unencrypted PEM private key"),
        (pem_of(ec.generate_private_key(ec.SECP256R1())), "not an RSA key"),
        (pem_of(rsa.generate_private_key(65537, 1024)), "1024 bits; 2048 at least"),
    ],
    ids=["missing", "garbage", "ec", "rsa-1024"],
)
def test_a_key_file_that_is_not_a_usable_rsa_key_is_refused_naming_it(
    tmp_path: Path, content: bytes | None, complaint: str
) -> None:
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RsaKeyError) as refused:
        RsaKey.from_file(path)
    assert str(path) in str(refused.value) and complaint in str(refused.value)
