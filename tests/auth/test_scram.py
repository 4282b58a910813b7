"""Tests for dbmux.auth.scram: RFC 7677 vector, round trips, malformed input, real PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbmux.auth.scram import (
    ScramAuthFailed,
    ScramClient,
    ScramError,
    ScramServer,
    ScramVerifier,
    derived_keys,
    mock_verifier,
    saslprep,
)

# RFC 7677 section 3.
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

FAST_ITERATIONS = 16  # keeps the non-vector tests quick


def rfc_server() -> ScramServer:
    verifier = ScramVerifier.from_password(RFC_PASSWORD, 4096, salt=RFC_SALT)
    return ScramServer(verifier, nonce=RFC_SERVER_NONCE)


def rfc_client() -> ScramClient:
    return ScramClient(RFC_PASSWORD, username="user", nonce=RFC_CLIENT_NONCE)


def exchange(client: ScramClient, server: ScramServer) -> None:
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.verify_server_final(server_final)


def server_for(password: str, **kwargs: object) -> ScramServer:
    return ScramServer(ScramVerifier.from_password(password, FAST_ITERATIONS), **kwargs)


# --- RFC 7677 test vector -------------------------------------------------------------------


def test_rfc7677_client_side() -> None:
    client = rfc_client()
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_rfc7677_server_side() -> None:
    server = rfc_server()
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert not server.authenticated
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.authenticated


def test_rfc7677_full_exchange() -> None:
    exchange(rfc_client(), rfc_server())


# --- round trips ----------------------------------------------------------------------------


def test_round_trip_random_nonces() -> None:
    server = server_for("s3cret")
    client = ScramClient("s3cret")
    exchange(client, server)
    assert server.authenticated


def test_wrong_password_rejected_by_server() -> None:
    server = server_for("s3cret")
    client = ScramClient("wrong")
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(ScramError, match="wrong password"):
        server.handle_client_final(client.handle_server_first(server_first))
    assert not server.authenticated


def test_client_rejects_server_that_does_not_know_the_password() -> None:
    client = rfc_client()
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    forged = b"v=" + base64.b64encode(bytes(32))
    with pytest.raises(ScramError, match="server signature mismatch"):
        client.verify_server_final(forged)


def test_client_raises_on_server_error() -> None:
    client = rfc_client()
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_username_is_escaped_and_ignored_by_server() -> None:
    client = ScramClient("pw", username="a=b,c")
    first = client.client_first()
    assert first.startswith(b"n,,n=a=3Db=2Cc,r=")
    server = server_for("pw")
    server_final = server.handle_client_final(
        client.handle_server_first(server.handle_client_first(first))
    )
    client.verify_server_final(server_final)


def test_client_first_has_empty_username_and_random_nonce() -> None:
    first_a = ScramClient("pw").client_first()
    first_b = ScramClient("pw").client_first()
    assert first_a.startswith(b"n,,n=,r=")
    assert first_a != first_b
    nonce = first_a.split(b"r=", 1)[1]
    assert len(base64.b64decode(nonce, validate=True)) == 18


def test_server_nonce_is_18_random_bytes() -> None:
    server_first = server_for("pw").handle_client_first(b"n,,n=,r=abc")
    nonce = server_first.split(b",")[0].removeprefix(b"r=abc")
    assert len(base64.b64decode(nonce, validate=True)) == 18


@settings(max_examples=40, deadline=None)
@given(password=st.text(max_size=20), username=st.text(max_size=10))
def test_round_trip_any_password(password: str, username: str) -> None:
    exchange(ScramClient(password, username=username), server_for(password))


@settings(max_examples=20, deadline=None)
@given(password=st.text(max_size=12), other=st.text(max_size=12))
def test_different_password_fails(password: str, other: str) -> None:
    server = server_for(password)
    verifier_other = ScramVerifier.from_password(other, FAST_ITERATIONS, salt=b"fixed-salt")
    verifier_same = ScramVerifier.from_password(password, FAST_ITERATIONS, salt=b"fixed-salt")
    if verifier_other.stored_key == verifier_same.stored_key:
        return  # equivalent after SASLprep, e.g. U+00A0 vs space
    client = ScramClient(other)
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(ScramError):
        server.handle_client_final(client.handle_server_first(server_first))


def test_channel_binding_flag_y_accepted() -> None:
    server = rfc_server()
    server.handle_client_first(b"y,,n=user,r=" + RFC_CLIENT_NONCE.encode())
    # With "y" the proof covers c=eSws ("y,,"); just check the binding is validated against it.
    bad = RFC_CLIENT_FINAL  # carries c=biws ("n,,"), which does not match "y,,"
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_final(bad)


def _client_final(
    password: bytes, salt: bytes, client_bare: str, server_first: str, c: bytes = b"y,,"
) -> bytes:
    """A client-final-message whose c= carries `c` (a GS2 header, then any channel binding
    data), which ScramClient never sends."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, FAST_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    nonce = server_first.split(",")[0]
    without_proof = f"c={base64.b64encode(c).decode()},{nonce}"
    auth = f"{client_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def test_channel_binding_flag_y_full_exchange() -> None:
    salt = b"y-flag-salt"
    server = ScramServer(ScramVerifier.from_password("pw", FAST_ITERATIONS, salt=salt))
    server_first = server.handle_client_first(b"y,,n=,r=clientnonce").decode()
    final = _client_final(b"pw", salt, "n=,r=clientnonce", server_first)
    assert server.handle_client_final(final).startswith(b"v=")
    assert server.authenticated


# --- SCRAM-SHA-256-PLUS (tls-server-end-point) ----------------------------------------------

END_POINT = hashlib.sha256(b"the proxy's certificate").digest()
PLUS = b"p=tls-server-end-point,,"


def plus_server(salt: bytes) -> ScramServer:
    verifier = ScramVerifier.from_password("pw", FAST_ITERATIONS, salt=salt)
    return ScramServer(verifier, channel_binding=END_POINT)


def test_plus_binds_the_exchange_to_the_tls_connection() -> None:
    server = plus_server(b"plus-salt")
    server_first = server.handle_client_first(PLUS + b"n=,r=clientnonce").decode()
    final = _client_final(b"pw", b"plus-salt", "n=,r=clientnonce", server_first, PLUS + END_POINT)
    assert server.handle_client_final(final).startswith(b"v=")


def test_plus_with_another_connections_binding_is_refused() -> None:
    """A man in the middle relays the exchange over its own TLS connection to the proxy: the
    client bound it to the certificate it saw, which is not the proxy's."""
    server = plus_server(b"plus-salt")
    server_first = server.handle_client_first(PLUS + b"n=,r=clientnonce").decode()
    other = hashlib.sha256(b"the attacker's certificate").digest()
    final = _client_final(b"pw", b"plus-salt", "n=,r=clientnonce", server_first, PLUS + other)
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_final(final)


def test_flag_y_while_plus_was_offered_is_a_downgrade_and_refused() -> None:
    with pytest.raises(ScramError, match="channel binding was offered"):
        plus_server(b"s").handle_client_first(b"y,,n=,r=clientnonce")


def test_only_tls_server_end_point_binding_is_accepted() -> None:
    with pytest.raises(ScramError, match="unsupported channel binding type"):
        plus_server(b"s").handle_client_first(b"p=tls-unique,,n=,r=clientnonce")


def test_the_proxy_as_client_binds_to_the_servers_certificate() -> None:
    client = ScramClient("pw", channel_binding=END_POINT)
    assert client.mechanism == "SCRAM-SHA-256-PLUS"
    server = server_for("pw", channel_binding=END_POINT)
    first = client.client_first()
    assert first.startswith(PLUS)
    final = client.handle_server_first(server.handle_client_first(first))
    client.verify_server_final(server.handle_client_final(final))
    assert client.verified


def test_the_proxy_as_client_bound_to_another_certificate_is_refused() -> None:
    """A man in the middle of the proxy's TLS to the database shows his own certificate: the
    server sees a binding to a certificate that is not its own."""
    other = hashlib.sha256(b"the attacker's certificate").digest()
    client = ScramClient("pw", channel_binding=other)
    server = server_for("pw", channel_binding=END_POINT)
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_final(client.handle_server_first(server_first))


def test_the_proxy_as_client_on_tls_without_plus_says_it_could_bind() -> None:
    """Flag y: a server that did offer -PLUS (someone removed it from the offer) refuses."""
    client = ScramClient("pw", on_tls=True)
    assert client.mechanism == "SCRAM-SHA-256"
    assert client.client_first().startswith(b"y,,")
    with pytest.raises(ScramError, match="channel binding was offered"):
        server_for("pw", channel_binding=END_POINT).handle_client_first(
            ScramClient("pw", on_tls=True).client_first()
        )
    exchange(ScramClient("pw", on_tls=True), server_for("pw"))


# --- malformed messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        (b"q,,n=,r=abc", "channel binding flag"),
        (b"n,a=admin,n=,r=abc", "authorization identity"),
        (b"n,,m=ext,n=,r=abc", "mandatory extension"),
        (b"n,,r=abc", "'n'"),
        (b"n,,n=", "'r'"),
        (b"n,,n=,r=", "nonce"),
        (b"n,,n=,r=a\x7fb", "nonce"),
        (b"n,,n=,abc", "malformed attribute"),
        (b"n,n=,r=abc", "authorization identity"),  # "n=" lands in the authzid slot
        (b"n,,", "malformed attribute"),
        (b"n", "GS2 header"),
        (b"", "GS2 header"),
        (b"n,,n=\xff,r=abc", "UTF-8"),
    ],
)
def test_malformed_client_first(message: bytes, match: str) -> None:
    with pytest.raises(ScramError, match=match):
        rfc_server().handle_client_first(message)


def _final_with(**changes: str) -> bytes:
    attrs = dict(part.split("=", 1) for part in RFC_CLIENT_FINAL.decode().split(","))
    attrs.update(changes)
    return ",".join(f"{k}={v}" for k, v in attrs.items() if v != "<drop>").encode()


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (_final_with(c="<drop>"), "'c'"),
        (_final_with(r="<drop>"), "'r'"),
        (_final_with(p="<drop>"), "proof"),
        (_final_with(r="rOprNGfwEbeRWgbNEkqO"), "nonce"),  # client nonce only
        (_final_with(r=RFC_CLIENT_NONCE + "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k1"), "nonce"),
        (_final_with(c="eSws"), "channel binding"),  # "y,," but client-first said "n"
        (_final_with(c="cD10bHMtc2VydmVyLWVuZC1wb2ludCwsAAAA"), "channel binding"),
        (_final_with(c="b!ws"), "base64"),
        (_final_with(p="dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ"), "base64"),  # no padding
        (_final_with(p="dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7And?Q="), "base64"),
        (_final_with(p="AAAA"), "length"),
        (_final_with(p="dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVA="), "wrong password"),
        (RFC_CLIENT_FINAL + b",x=ext", "proof"),  # proof must be last
        (b"garbage", "malformed attribute"),
    ],
)
def test_malformed_client_final(message: bytes, match: str) -> None:
    server = rfc_server()
    server.handle_client_first(RFC_CLIENT_FIRST)
    with pytest.raises(ScramError, match=match):
        server.handle_client_final(message)
    assert not server.authenticated


def test_client_final_extension_before_proof_is_ignored() -> None:
    # An extension between r= and p= changes AuthMessage, so the RFC proof no longer verifies:
    # this checks that the server includes it in AuthMessage rather than rejecting the syntax.
    server = rfc_server()
    server.handle_client_first(RFC_CLIENT_FIRST)
    message = RFC_CLIENT_FINAL.replace(b",p=", b",x=ext,p=")
    with pytest.raises(ScramError, match="wrong password"):
        server.handle_client_final(message)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (RFC_SERVER_FIRST.replace(b"r=rOprNG", b"r=XOprNG"), "nonce"),
        (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
        (RFC_SERVER_FIRST.replace(b",s=W22ZaJ0SNY7soEsUEjb6gQ==", b""), "'s'"),
        (RFC_SERVER_FIRST.replace(b",i=4096", b""), "'i'"),
        (RFC_SERVER_FIRST.replace(b"s=W22ZaJ0SNY7soEsUEjb6gQ==", b"s=W22Z@J0"), "base64"),
        (RFC_SERVER_FIRST.replace(b"s=W22ZaJ0SNY7soEsUEjb6gQ==", b"s="), "empty salt"),
        (RFC_SERVER_FIRST.replace(b"i=4096", b"i=0"), "at least 1"),
        (RFC_SERVER_FIRST.replace(b"i=4096", b"i=-1"), "iteration"),
        (RFC_SERVER_FIRST.replace(b"i=4096", b"i=lots"), "iteration"),
        (b"m=ext," + RFC_SERVER_FIRST, "mandatory extension"),
        (b"", "malformed attribute"),
    ],
)
def test_malformed_server_first(message: bytes, match: str) -> None:
    client = rfc_client()
    client.client_first()
    with pytest.raises(ScramError, match=match):
        client.handle_server_first(message)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"", "malformed attribute"),
        (b"x=abc", "'v'"),
        (b"v=not base64!", "base64"),
    ],
)
def test_malformed_server_final(message: bytes, match: str) -> None:
    client = rfc_client()
    client.client_first()
    client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError, match=match):
        client.verify_server_final(message)


def test_steps_out_of_order_raise() -> None:
    server = rfc_server()
    with pytest.raises(ScramError, match="step"):
        server.handle_client_final(RFC_CLIENT_FINAL)
    client = rfc_client()
    with pytest.raises(ScramError, match="step"):
        client.handle_server_first(RFC_SERVER_FIRST)
    client.client_first()
    with pytest.raises(ScramError, match="step"):
        client.client_first()


def test_failed_exchange_stays_failed() -> None:
    server = rfc_server()
    server.handle_client_first(RFC_CLIENT_FIRST)
    with pytest.raises(ScramError):
        server.handle_client_final(b"garbage")
    with pytest.raises(ScramError, match="failed"):
        server.handle_client_final(RFC_CLIENT_FINAL)  # the right proof is too late now
    assert not server.authenticated


def test_invalid_injected_nonces() -> None:
    verifier = ScramVerifier.from_password("pw", FAST_ITERATIONS)
    with pytest.raises(ValueError):
        ScramServer(verifier, nonce="has,comma")
    with pytest.raises(ValueError):
        ScramClient("pw", nonce="")


# --- verifier -------------------------------------------------------------------------------


# The keys are pinned by the RFC vector tests above (the server accepts the RFC proof with them).
RFC_VERIFIER_TEXT = (
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    "$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
)


def test_verifier_from_rfc_password() -> None:
    verifier = ScramVerifier.from_password(RFC_PASSWORD, 4096, salt=RFC_SALT)
    assert str(verifier) == RFC_VERIFIER_TEXT


def test_verifier_text_round_trip() -> None:
    verifier = ScramVerifier.from_password("pw", FAST_ITERATIONS)
    assert len(verifier.salt) == 16
    assert ScramVerifier.parse(str(verifier)) == verifier
    assert ScramVerifier.parse(RFC_VERIFIER_TEXT).iterations == 4096


def test_verifier_random_salts_differ() -> None:
    a = ScramVerifier.from_password("pw", FAST_ITERATIONS)
    b = ScramVerifier.from_password("pw", FAST_ITERATIONS)
    assert a.salt != b.salt
    assert a.stored_key != b.stored_key


def test_verifier_repr_hides_keys() -> None:
    verifier = ScramVerifier.parse(RFC_VERIFIER_TEXT)
    assert "stored_key" not in repr(verifier)
    assert "server_key" not in repr(verifier)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abcdef",
        RFC_VERIFIER_TEXT.replace("SCRAM-SHA-256", "SCRAM-SHA-1"),
        RFC_VERIFIER_TEXT.replace("4096", "x"),
        RFC_VERIFIER_TEXT.replace("4096", "0"),
        RFC_VERIFIER_TEXT.replace("4096:", "4096"),
        RFC_VERIFIER_TEXT.replace("=:", "=$"),
        RFC_VERIFIER_TEXT.replace("WG5d", "W!5d"),
        RFC_VERIFIER_TEXT + "$extra",
        RFC_VERIFIER_TEXT.replace("wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=", "AAAA"),
        RFC_VERIFIER_TEXT.replace("W22ZaJ0SNY7soEsUEjb6gQ==", ""),
    ],
)
def test_verifier_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        ScramVerifier.parse(text)


# --- SASLprep and the PBKDF2 cache ----------------------------------------------------------


SASLPREP_SALT = b"saslprep-salt"


def _stored_key(password: str) -> bytes:
    return ScramVerifier.from_password(password, FAST_ITERATIONS, salt=SASLPREP_SALT).stored_key


def _raw_stored_key(raw: bytes) -> bytes:
    """StoredKey computed from exact password bytes, bypassing any normalisation."""
    salted = hashlib.pbkdf2_hmac("sha256", raw, SASLPREP_SALT, FAST_ITERATIONS)
    return hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()


def test_saslprep_non_ascii_space_maps_to_space() -> None:
    assert _stored_key("pass\u00a0word") == _stored_key("pass word")
    assert _stored_key("pass\u00a0word") != _stored_key("password")
    # U+1680 is a non-ASCII space that NFKC leaves alone, so only the mapping step catches it.
    assert saslprep("pass\u1680word") == "pass word"
    assert _stored_key("pass\u1680word") == _stored_key("pass word")


def test_saslprep_mappings() -> None:
    assert saslprep("I\u00adX") == "IX"  # soft hyphen: mapped to nothing
    assert saslprep("\u2168") == "IX"  # NFKC
    assert saslprep("\ufb01") == "fi"
    assert _stored_key("\u2168") == _stored_key("IX")
    assert _stored_key("caf\u00e9") == _stored_key("cafe\u0301")  # NFKC composes


@pytest.mark.parametrize(
    "text",
    [
        "\u00ad",  # maps to empty
        "a\u0007\u00e9",  # ASCII control
        "\ue000\u00e9",  # private use
        "\u0221",  # unassigned in Unicode 3.2
        "\u0627a",  # RandALCat mixed with LCat
        "\u06271",  # RandALCat not last
    ],
)
def test_saslprep_rejections_fall_back_to_raw_bytes(text: str) -> None:
    with pytest.raises(ValueError):
        saslprep(text)
    assert _stored_key(text) == _raw_stored_key(text.encode("utf-8"))


def test_saslprep_bidi_ok() -> None:
    assert saslprep("\u0627\u0628") == "\u0627\u0628"


def test_ascii_passwords_bypass_saslprep() -> None:
    # PostgreSQL skips SASLprep for pure ASCII, so control characters are kept.
    assert _stored_key("a\tb") == _raw_stored_key(b"a\tb")


def test_pbkdf2_is_cached_across_clients() -> None:
    salt = secrets.token_bytes(16)
    verifier = ScramVerifier.from_password("cached", FAST_ITERATIONS, salt=salt)
    hits, misses = derived_keys.hits, derived_keys.misses
    for _ in range(3):
        exchange(ScramClient("cached"), ScramServer(verifier))
    assert derived_keys.hits - hits >= 3
    assert derived_keys.misses == misses
    assert (b"cached", salt, FAST_ITERATIONS) in derived_keys
    assert len(derived_keys) <= derived_keys.capacity <= 4096


def test_an_unknown_user_is_challenged_alike_each_time_and_never_admitted() -> None:
    """A salt that changed from one try to the next would tell a name is unknown; a verifier
    derived from a random password would cost PBKDF2 and a place among the derived keys."""
    keys, misses = set(derived_keys), derived_keys.misses
    first, again = mock_verifier("nobody"), mock_verifier("nobody")
    assert first.salt == again.salt and len(first.salt) == 16
    assert first.iterations == 4096
    assert mock_verifier("somebody").salt != first.salt
    assert set(derived_keys) == keys and derived_keys.misses == misses
    for password in ("", "nobody", "app-secret"):
        client, server = ScramClient(password), ScramServer(mock_verifier("nobody"))
        server_first = server.handle_client_first(client.client_first())
        with pytest.raises(ScramAuthFailed):
            server.handle_client_final(client.handle_server_first(server_first))


# --- against a real PostgreSQL ---------------------------------------------------------------


def test_postgresql_verifier(pg, pg_role: str) -> None:
    pg.psql(
        f"SET password_encryption = 'scram-sha-256'; "
        f"CREATE ROLE \"{pg_role}\" LOGIN PASSWORD 'secret'"
    )
    text = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{pg_role}'")
    assert text.startswith("SCRAM-SHA-256$")
    verifier = ScramVerifier.parse(text)
    assert str(verifier) == text
    # Same salt and iterations must reproduce PostgreSQL's keys.
    assert ScramVerifier.from_password("secret", verifier.iterations, verifier.salt) == verifier

    server = ScramServer(verifier)
    exchange(ScramClient("secret"), server)
    assert server.authenticated

    server = ScramServer(verifier)
    client = ScramClient("wrong")
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(ScramError, match="wrong password"):
        server.handle_client_final(client.handle_server_first(server_first))


def test_postgresql_verifier_saslprep(pg, pg_role: str) -> None:
    # PostgreSQL SASLpreps the password when hashing it: U+00A0 is stored as a plain space.
    pg.psql(
        f"SET password_encryption = 'scram-sha-256'; "
        f"CREATE ROLE \"{pg_role}\" LOGIN PASSWORD 'pass\u00a0word\u00ad'"
    )
    verifier = ScramVerifier.parse(
        pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{pg_role}'")
    )
    exchange(ScramClient("pass word"), ScramServer(verifier))
    exchange(ScramClient("pass\u00a0word"), ScramServer(verifier))
