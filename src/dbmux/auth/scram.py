"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it, for both sides of the proxy."""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_ITERATIONS",
    "MECHANISM",
    "ScramClient",
    "ScramError",
    "ScramServer",
    "ScramVerifier",
    "derived_keys",
    "mock_verifier",
    "salted_password",
    "saslprep",
    "user_salt",
]

MECHANISM = "SCRAM-SHA-256"
CHANNEL_BINDING = "tls-server-end-point"  # RFC 5929: a hash of the server's certificate
DEFAULT_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
# The most PBKDF2 iterations the proxy runs for a server that asks (256 times PostgreSQL's
# default, about half a second): a server, or whoever answers in its place, could otherwise
# hold the event loop for minutes, or make hashlib raise OverflowError past 2**31 - 1.
MAX_SERVER_ITERATIONS = 1 << 20

_NONCE_BYTES = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN
_SALT_BYTES = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
_KEY_BYTES = 32  # SHA-256 digest size
_GS2_HEADER = "n,,"  # no channel binding, no authzid
_ERROR_SNIPPET = 40  # how much of a peer's bad input we echo in error messages


class ScramError(Exception):
    """A SCRAM exchange failed: malformed message, protocol violation or wrong credentials."""


class ScramAuthFailed(ScramError):
    """A well-formed exchange whose proof is wrong: the password does not match."""


# --- SASLprep (RFC 4013) ---------------------------------------------------------------------

_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space (already mapped, but NFKC could reintroduce)
    stringprep.in_table_c21,  # ASCII control
    stringprep.in_table_c22,  # non-ASCII control
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogates
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties / deprecated
    stringprep.in_table_c9,  # tagging characters
    stringprep.in_table_a1,  # unassigned (SASLprep on stored strings, as PostgreSQL does)
)


def saslprep(text: str) -> str:
    """Normalise a password per RFC 4013; raise ValueError where SASLprep forbids the string."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    if not mapped:
        # PostgreSQL refuses an empty result here too (and then uses the raw password).
        raise ValueError("SASLprep: empty string")
    # PostgreSQL normalises with its current Unicode tables, not Unicode 3.2; so do we.
    normalized = unicodedata.normalize("NFKC", mapped)
    for ch in normalized:
        if any(in_table(ch) for in_table in _PROHIBITED):
            raise ValueError(f"SASLprep: prohibited character U+{ord(ch):04X}")
    # Bidi rules, RFC 3454 section 6.
    if any(stringprep.in_table_d1(ch) for ch in normalized):
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            raise ValueError("SASLprep: mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise ValueError("SASLprep: right-to-left string must start and end with RandALCat")
    return normalized


def _normalize_password(password: str) -> bytes:
    """SASLprep the password, falling back to the raw bytes when that fails, like PostgreSQL."""
    if password.isascii():
        return password.encode("ascii")  # PostgreSQL skips SASLprep for pure ASCII
    try:
        return saslprep(password).encode("utf-8")
    except ValueError:
        return password.encode("utf-8", "surrogateescape")


# --- key derivation --------------------------------------------------------------------------


class DerivedKeys:
    """PBKDF2 results by (password, salt, iterations), least recently used dropped first:
    many server connections with one login pay the derivation once. Only the proxy's own
    logins belong here; what a client can make up (an unknown user's name) must stay out,
    or cycling through names would push the proxy's keys out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[tuple[bytes, bytes, int], bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, entry: tuple[bytes, bytes, int]) -> bool:
        return entry in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[tuple[bytes, bytes, int]]:
        return iter(list(self._keys))

    def get(self, password: bytes, salt: bytes, iterations: int) -> bytes:
        entry = (password, salt, iterations)
        key = self._keys.get(entry)
        if key is not None:
            self.hits += 1
            self._keys.move_to_end(entry)
            return key
        self.misses += 1
        key = self._keys[entry] = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return key


derived_keys = DerivedKeys(capacity=1024)


def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA-256 through the cache of derived keys."""
    return derived_keys.get(password, salt, iterations)


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("xor of byte strings of different lengths")
    return (int.from_bytes(a) ^ int.from_bytes(b)).to_bytes(len(a))


# --- message helpers -------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(value: str, what: str) -> bytes:
    """Strict base64 decode: a lenient one would silently skip garbage from the peer."""
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ScramError(f"invalid base64 in {what}") from exc


def _decode(data: bytes, what: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScramError(f"{what} is not valid UTF-8") from exc


def _parse_attrs(text: str, what: str) -> list[tuple[str, str]]:
    """Split "a=1,b=2" into [("a", "1"), ("b", "2")], insisting on single-letter names."""
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not ("a" <= part[0] <= "z" or "A" <= part[0] <= "Z"):
            raise ScramError(f"malformed attribute {part[:_ERROR_SNIPPET]!r} in {what}")
        attrs.append((part[0], part[2:]))
    return attrs


def _expect(attrs: list[tuple[str, str]], index: int, name: str, what: str) -> str:
    if index >= len(attrs) or attrs[index][0] != name:
        raise ScramError(f"{what}: expected attribute '{name}' at position {index + 1}")
    return attrs[index][1]


def _check_mandatory_extension(attrs: list[tuple[str, str]], what: str) -> None:
    if attrs and attrs[0][0] == "m":
        raise ScramError(f"{what}: mandatory extensions ('m=') are not supported")


def _is_valid_nonce(nonce: str) -> bool:
    """RFC 5802 'printable': ASCII 0x21-0x7E except ','."""
    return (
        bool(nonce)
        and nonce.isascii()
        and nonce.isprintable()
        and " " not in nonce
        and "," not in nonce
    )


def _parse_iterations(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ScramError(f"{what}: invalid iteration count {text[:_ERROR_SNIPPET]!r}")
    iterations = int(text)
    if iterations < 1:
        raise ScramError(f"{what}: iteration count must be at least 1")
    return iterations


def _random_nonce() -> str:
    return _b64encode(secrets.token_bytes(_NONCE_BYTES))


def _saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class _Step(enum.Enum):
    CLIENT_FIRST = "client-first"
    SERVER_FIRST = "server-first"
    CLIENT_FINAL = "client-final"
    SERVER_FINAL = "server-final"
    DONE = "done"
    FAILED = "failed"


class _Exchange:
    """Shared state-machine bookkeeping: any error leaves the exchange FAILED for good."""

    _step: _Step

    def _enter(self, expected: _Step) -> None:
        if self._step is not expected:
            raise ScramError(
                f"SCRAM exchange is at step {self._step.value!r}, not {expected.value!r}"
            )
        self._step = _Step.FAILED  # until the step completes successfully


# --- stored verifier -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScramVerifier:
    """What a server stores instead of the password (pg_authid.rolpassword for SCRAM roles)."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)  # keep secrets out of logs
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.salt:
            raise ValueError("SCRAM verifier: empty salt")
        if self.iterations < 1:
            raise ValueError("SCRAM verifier: iteration count must be at least 1")
        if len(self.stored_key) != _KEY_BYTES or len(self.server_key) != _KEY_BYTES:
            raise ValueError(f"SCRAM verifier: keys must be {_KEY_BYTES} bytes")

    @classmethod
    def from_password(
        cls, password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
    ) -> ScramVerifier:
        """Derive a verifier; a fresh random salt is used (and not cached) when none is given."""
        if iterations < 1:
            raise ValueError("SCRAM verifier: iteration count must be at least 1")
        normalized = _normalize_password(password)
        if salt is None:
            salt = secrets.token_bytes(_SALT_BYTES)
            salted = hashlib.pbkdf2_hmac("sha256", normalized, salt, iterations)
        else:
            salted = salted_password(normalized, salt, iterations)
        return cls(
            salt=salt,
            iterations=iterations,
            stored_key=_sha256(_hmac(salted, b"Client Key")),
            server_key=_hmac(salted, b"Server Key"),
        )

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse 'SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>'; ValueError if malformed."""
        prefix = MECHANISM + "$"
        if not text.startswith(prefix):
            raise ValueError("not a SCRAM-SHA-256 verifier")
        sections = text[len(prefix) :].split("$")
        if len(sections) != 2:
            raise ValueError("SCRAM verifier: expected '<iter>:<salt>$<StoredKey>:<ServerKey>'")
        params, keys = (section.split(":") for section in sections)
        if len(params) != 2 or len(keys) != 2:
            raise ValueError("SCRAM verifier: expected '<iter>:<salt>$<StoredKey>:<ServerKey>'")
        try:
            iterations = _parse_iterations(params[0], "SCRAM verifier")
            salt, stored_key, server_key = (
                _b64decode(value, "SCRAM verifier") for value in (params[1], *keys)
            )
        except ScramError as exc:
            raise ValueError(str(exc)) from None
        return cls(salt=salt, iterations=iterations, stored_key=stored_key, server_key=server_key)

    def __str__(self) -> str:
        return (
            f"{MECHANISM}${self.iterations}:{_b64encode(self.salt)}"
            f"${_b64encode(self.stored_key)}:{_b64encode(self.server_key)}"
        )


_name_secret = secrets.token_bytes(32)


def name_secret() -> bytes:
    """What user_salt derives from: random per process, or the supervisor's (workers)."""
    return _name_secret


def use_name_secret(secret: bytes) -> None:
    """Derive from `secret` from now on: the workers of one dbmux share their supervisor's,
    so that a name gets the same salt (and method) whichever worker a login lands on."""
    global _name_secret
    _name_secret = secret


def user_salt(user: str) -> bytes:
    """The salt a user's SCRAM exchange shows, known user or not: fixed per name for the
    process's life, so the salt tells nothing about who exists, and the same for all of a
    user's passwords, so one exchange can be checked against each (during a rotation)."""
    name = user.encode("utf-8", "surrogateescape")
    return hmac.digest(_name_secret, b"salt:" + name, "sha256")[:_SALT_BYTES]


def mock_verifier(user: str, iterations: int = DEFAULT_ITERATIONS) -> ScramVerifier:
    """What a user the proxy does not know is challenged with, as PostgreSQL's mock
    authentication does: the same salt for the same name for the process's life (a salt
    that changed on each try would tell that the name is unknown) and keys no proof
    matches. Nothing is derived, so guessing names costs no PBKDF2 on the event loop and
    puts nothing among the derived keys."""
    return ScramVerifier(
        salt=user_salt(user),
        iterations=iterations,
        stored_key=secrets.token_bytes(_KEY_BYTES),
        server_key=secrets.token_bytes(_KEY_BYTES),
    )


# --- the proxy as SCRAM server (authenticating clients) --------------------------------------


class ScramServer(_Exchange):
    """Server side of one exchange: client-first -> server-first, client-final -> server-final."""

    def __init__(
        self,
        verifier: ScramVerifier,
        *,
        also: Sequence[ScramVerifier] = (),
        channel_binding: bytes | None = None,
        nonce: str | None = None,
    ) -> None:
        """`also`: other verifiers with the same salt and iteration count whose passwords
        are accepted too (a user's pending password during a rotation).
        `channel_binding`: the tls-server-end-point data of the TLS connection the exchange
        runs on, when SCRAM-SHA-256-PLUS was offered (None: plaintext, only SCRAM-SHA-256).
        `nonce` is the server's nonce suffix; only tests should pass it."""
        self._verifier = verifier
        self._verifiers = (verifier, *also)
        self._proof = b""
        self._auth_message = b""
        self._proven = False
        self._binding = channel_binding
        self._bound = b""  # what the client's c= must carry after the GS2 header
        self._server_nonce = _random_nonce() if nonce is None else nonce
        if not _is_valid_nonce(self._server_nonce):
            raise ValueError("server nonce must be non-empty printable ASCII without ','")
        self._step = _Step.CLIENT_FIRST
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    @property
    def authenticated(self) -> bool:
        """True once the client's proof has been verified."""
        return self._proven

    def handle_client_first(self, data: bytes) -> bytes:
        """Parse client-first-message and return server-first-message."""
        self._enter(_Step.CLIENT_FIRST)
        what = "client-first-message"
        text = _decode(data, what)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError(f"{what}: missing GS2 header")
        flag, authzid, bare = parts
        if flag.startswith("p="):
            if self._binding is None:
                raise ScramError(
                    f"client requires channel binding ({flag[2:][:_ERROR_SNIPPET]!r}), but "
                    f"only {MECHANISM} without channel binding is offered on plaintext"
                )
            if flag != f"p={CHANNEL_BINDING}":
                raise ScramError(f"{what}: unsupported channel binding type {flag[2:12]!r}")
            self._bound = self._binding
        elif flag == "y" and self._binding is not None:
            # The client could bind and believes the server cannot, though it offered
            # -PLUS: someone removed it from the offer on the way (RFC 5802, 6).
            raise ScramError(f"{what}: channel binding was offered but the client says it was not")
        elif flag not in ("n", "y"):
            raise ScramError(f"{what}: invalid channel binding flag {flag[:_ERROR_SNIPPET]!r}")
        if authzid:
            raise ScramError(f"{what}: authorization identity is not supported")
        attrs = _parse_attrs(bare, what)
        _check_mandatory_extension(attrs, what)
        # The user name is ignored: PostgreSQL uses the one from the startup packet.
        _expect(attrs, 0, "n", what)
        client_nonce = _expect(attrs, 1, "r", what)
        if not _is_valid_nonce(client_nonce):
            raise ScramError(f"{what}: invalid client nonce")
        # Any further attributes are extensions; we support none, so ignore them like PostgreSQL.

        self._gs2_header = f"{flag},,"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = (
            f"r={self._nonce},s={_b64encode(self._verifier.salt)},i={self._verifier.iterations}"
        )
        self._step = _Step.CLIENT_FINAL
        return self._server_first.encode("ascii")

    def handle_client_final(self, data: bytes) -> bytes:
        """Verify the client's proof and return server-final-message ("v=...")."""
        self._enter(_Step.CLIENT_FINAL)
        what = "client-final-message"
        text = _decode(data, what)
        attrs = _parse_attrs(text, what)
        channel_binding = _expect(attrs, 0, "c", what)
        expected = self._gs2_header.encode("ascii") + self._bound
        if not hmac.compare_digest(_b64decode(channel_binding, "channel binding"), expected):
            raise ScramError(f"{what}: channel binding data does not match the GS2 header")
        if _expect(attrs, 1, "r", what) != self._nonce:
            raise ScramError(f"{what}: nonce does not match")
        if len(attrs) < 3 or attrs[-1][0] != "p":
            raise ScramError(f"{what}: proof ('p=') missing or not last")
        proof = _b64decode(attrs[-1][1], "client proof")
        if len(proof) != _KEY_BYTES:
            raise ScramError(f"{what}: client proof has the wrong length")

        without_proof = text.rsplit(",", 1)[0]
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        self._proof, self._auth_message = proof, auth_message.encode("utf-8")
        self._step = _Step.DONE  # unless the proof fails below
        return self.check_proof(self._verifiers)

    def check_proof(self, verifiers: Sequence[ScramVerifier]) -> bytes:
        """server-final-message if the client's proof fits one of `verifiers`; raises
        ScramAuthFailed otherwise. Called again after a failure with verifiers of passwords
        learned since (a secret read again), sharing the salt the client was given."""
        if self._step is not _Step.DONE:
            raise ScramError("no client-final-message to check")
        for verifier in verifiers:
            if (verifier.salt, verifier.iterations) != (
                self._verifier.salt,
                self._verifier.iterations,
            ):
                continue  # another salt: the client's proof cannot fit
            client_key = _xor(self._proof, _hmac(verifier.stored_key, self._auth_message))
            if hmac.compare_digest(_sha256(client_key), verifier.stored_key):
                server_signature = _hmac(verifier.server_key, self._auth_message)
                self._proven = True
                return f"v={_b64encode(server_signature)}".encode("ascii")
        raise ScramAuthFailed("invalid client proof: wrong password")


# --- the proxy as SCRAM client (authenticating to PostgreSQL) --------------------------------


class ScramClient(_Exchange):
    """Client side of one exchange, as libpq does it (empty user name; channel binding on
    TLS when the server offers SCRAM-SHA-256-PLUS)."""

    def __init__(
        self,
        password: str,
        *,
        channel_binding: bytes | None = None,
        on_tls: bool = False,
        username: str = "",
        nonce: str | None = None,
    ) -> None:
        """`channel_binding`: the tls-server-end-point hash of the server's certificate, to
        bind the exchange to the TLS connection (SCRAM-SHA-256-PLUS). `on_tls` without it:
        the client could bind but the server did not offer to, which the server checks (a
        -PLUS offer removed on the way is caught). `username` and `nonce` exist for test
        vectors; PostgreSQL ignores the user name."""
        self._password = _normalize_password(password)
        self._username = username
        self._client_nonce = _random_nonce() if nonce is None else nonce
        if not _is_valid_nonce(self._client_nonce):
            raise ValueError("client nonce must be non-empty printable ASCII without ','")
        self._binding = channel_binding or b""
        if channel_binding is not None:
            self._gs2_header = f"p={CHANNEL_BINDING},,"
        else:
            self._gs2_header = "y,," if on_tls else _GS2_HEADER
        self._step = _Step.CLIENT_FIRST
        self._client_first_bare = ""
        self._server_signature = b""

    @property
    def mechanism(self) -> str:
        """The SASL mechanism this exchange runs."""
        return f"{MECHANISM}-PLUS" if self._gs2_header.startswith("p=") else MECHANISM

    @property
    def verified(self) -> bool:
        """The server proved it knows the password (its v= checked out)."""
        return self._step is _Step.DONE

    def client_first(self) -> bytes:
        """Return client-first-message."""
        self._enter(_Step.CLIENT_FIRST)
        self._client_first_bare = f"n={_saslname(self._username)},r={self._client_nonce}"
        self._step = _Step.SERVER_FIRST
        return (self._gs2_header + self._client_first_bare).encode("utf-8")

    def handle_server_first(self, data: bytes) -> bytes:
        """Check server-first-message and return client-final-message with our proof."""
        self._enter(_Step.SERVER_FIRST)
        what = "server-first-message"
        server_first = _decode(data, what)
        attrs = _parse_attrs(server_first, what)
        _check_mandatory_extension(attrs, what)
        nonce = _expect(attrs, 0, "r", what)
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise ScramError(f"{what}: server nonce does not extend the client nonce")
        if not _is_valid_nonce(nonce):
            raise ScramError(f"{what}: invalid nonce")
        salt = _b64decode(_expect(attrs, 1, "s", what), "salt")
        if not salt:
            raise ScramError(f"{what}: empty salt")
        iterations = _parse_iterations(_expect(attrs, 2, "i", what), what)
        if iterations > MAX_SERVER_ITERATIONS:
            raise ScramError(
                f"{what}: iteration count {iterations} is more than {MAX_SERVER_ITERATIONS}"
            )

        salted = salted_password(self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        bound = self._gs2_header.encode("ascii") + self._binding
        without_proof = f"c={_b64encode(bound)},r={nonce}"
        auth_message = ",".join((self._client_first_bare, server_first, without_proof))
        auth_message_bytes = auth_message.encode("utf-8")
        proof = _xor(client_key, _hmac(_sha256(client_key), auth_message_bytes))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message_bytes)
        self._step = _Step.SERVER_FINAL
        return f"{without_proof},p={_b64encode(proof)}".encode("ascii")

    def verify_server_final(self, data: bytes) -> None:
        """Check the server's signature, proving it knows the password too."""
        self._enter(_Step.SERVER_FINAL)
        what = "server-final-message"
        text = _decode(data, what)
        if text.startswith("e="):
            error = text[2:].split(",", 1)[0]
            raise ScramError(f"server reported SCRAM error: {error[:_ERROR_SNIPPET]}")
        attrs = _parse_attrs(text, what)
        signature = _b64decode(_expect(attrs, 0, "v", what), "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("server signature mismatch: the server does not know the password")
        self._step = _Step.DONE
