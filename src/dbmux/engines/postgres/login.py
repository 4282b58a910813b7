"""Startup and authentication of a PostgreSQL client: protocol negotiation, SCRAM or MD5
against the proxy's own credentials, and the session's startup settings in the server's
spelling."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from dbmux.auth.admission import source_address
from dbmux.auth.directory import User
from dbmux.auth.md5 import md5_password_hash, verify_md5_response
from dbmux.auth.scram import (
    ScramAuthFailed,
    ScramError,
    ScramServer,
    mock_verifier,
)
from dbmux.config import ClientPasswordAuthType, IamAuth
from dbmux.engines.base import BorrowTimeout, Lender, ServerError
from dbmux.engines.postgres import wire
from dbmux.session import ClientSession

if TYPE_CHECKING:
    from dbmux.engines.postgres.backend import PgServer
    from dbmux.engines.postgres.engine import PgContext
    from dbmux.engines.postgres.frontend import PgClient

log = logging.getLogger("dbmux.postgres")

# Startup parameters that describe the connection rather than session settings.
_NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})
NAMEDATALEN = 64
# Settings the server keeps as written (within NAMEDATALEN), so they need no round trip to
# learn their spelling; every client may have its own.
_VERBATIM = frozenset({"application_name"})
_AUTHENTICATION_OK = wire.authentication(wire.AUTH_OK)


class LoginRefused(Exception):
    """Login ends with this FATAL error sent to the client."""

    def __init__(self, code: str, text: str, hint: str = "") -> None:
        super().__init__(text)
        self.code, self.text, self.hint = code, text, hint


def parse_options(options: str) -> dict[str, str]:
    """The `-c name=value` / `--name=value` settings of the startup `options` parameter."""
    settings: dict[str, str] = {}
    words = options.replace("\\ ", "\0").split()
    i = 0
    while i < len(words):
        word = words[i].replace("\0", " ")
        if word == "-c" and i + 1 < len(words):
            word, i = "--" + words[i + 1].replace("\0", " "), i + 1
        elif word.startswith("-c"):
            word = "--" + word[2:]
        if not word.startswith("--") or "=" not in word:
            raise LoginRefused(
                "08P01",
                f"unsupported startup option {word!r}",
                "only -c name=value settings are accepted by the proxy",
            )
        name, _, value = word[2:].partition("=")
        settings[name.replace("-", "_")] = value
        i += 1
    return settings


def _server_spelling(settings: Mapping[str, str], facts: Mapping[str, str]) -> dict[str, str]:
    """`settings` by the names the server reports them by (datestyle is DateStyle), and
    application_name truncated as the server does."""
    names: dict[str, str] | None = None  # made only for a name not spelled as reported
    spelled = {}
    for name, value in settings.items():
        if name not in facts:
            if names is None:
                names = {reported.lower(): reported for reported in facts}
            name = names.get(name.lower(), name.lower())
        spelled[name] = value
    if "application_name" in spelled:
        truncated = spelled["application_name"].encode()[: NAMEDATALEN - 1]
        spelled["application_name"] = truncated.decode(errors="ignore")
    return spelled


def _unknown(settings: Mapping[str, str], canonical: Mapping[tuple[str, str], str]) -> list[str]:
    """The settings whose value's spelling on the server is not known yet."""
    return [k for k, v in settings.items() if k not in _VERBATIM and (k, v) not in canonical]


class LoginMixin(ClientSession):
    """PgClient's login conversation (runs once, before the relay starts)."""

    if not TYPE_CHECKING:  # the slots are PgClient's (mypy would look for them here)
        __slots__ = ()

    channel_binding: bytes | None
    ctx: PgContext
    key: tuple[int, int]
    login_settings: Mapping[str, str]
    pid_bytes: bytes
    wanted: dict[str, str]

    if TYPE_CHECKING:  # provided by PgClient and the classes it mixes in

        def fatal(self, code: str, text: str, *, hint: str = "") -> None: ...
        def _forward_cancel(self, process_id: int, secret_key: int) -> None: ...

    async def log_in(self, deadline: asyncio.TimerHandle) -> None:
        try:
            await self._startup(deadline)
        except LoginRefused as refusal:
            self.fatal(refusal.code, refusal.text, hint=refusal.hint)

    async def _startup(self, deadline: asyncio.TimerHandle) -> None:
        ctx = self.ctx
        admission = ctx.runtime.admission
        if self.runtime.tls is not None and await self.read(wire.starts_tls):
            await self._direct_tls()
        while True:
            packet = await self.read(wire.split_startup)
            code, params = wire.parse_startup(packet)
            if code == wire.SSL_REQUEST and self.runtime.tls is not None and not self.tls:
                if self.inbox:  # sent before the handshake, so not protected by it
                    raise wire.ProtocolViolation("data after SSLRequest, before the TLS handshake")
                self.write(b"S")
                identity = self.runtime.tls.current
                await self.start_tls(identity.context, self.runtime.config.client_login_timeout)
                self.channel_binding = identity.end_point
                continue
            if code in (wire.SSL_REQUEST, wire.GSSENC_REQUEST):
                self.write(b"N")
                continue
            if code == wire.CANCEL_REQUEST:
                self._forward_cancel(*wire.parse_cancel(packet))
                self.close_transport()
                return
            if code >> 16 != 3:
                raise wire.ProtocolViolation(
                    f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}"
                )
            break
        # Refused only now, after SSLRequest and so on, so the client can read the reason;
        # cancel requests are still served when the proxy is full.
        refusal = admission.refusal()
        if refusal is not None:
            raise LoginRefused("53300", refusal.text, refusal.hint)
        unsupported = [name for name in params if name.startswith("_pq_.")]
        if code != wire.PROTOCOL_3_0 or unsupported:
            self.write(wire.negotiate_protocol_version(0, unsupported))
        if "replication" in params and params["replication"] not in ("false", "0", "off", "no"):
            raise LoginRefused("08P01", "replication connections are not supported by the proxy")
        if self.runtime.config.require_tls and not self.tls:
            raise LoginRefused(
                "28000",
                "this proxy accepts TLS connections only",
                "require_tls is set: connect with sslmode=require or stronger",
            )
        user = params.get("user", "")
        if not user:
            raise LoginRefused("28000", "no PostgreSQL user name specified in startup packet")
        self.user = sys.intern(user)  # one string for all the clients of a user
        greeting = await self._authenticate(user)
        refusal = self.admit(deadline)
        if refusal is not None:
            self.write(greeting)
            raise LoginRefused("53300", refusal.text, refusal.hint)
        database = params.get("database") or user
        settings = {k: v for k, v in params.items() if k not in _NOT_SETTINGS and k[:5] != "_pq_."}
        settings.update(parse_options(params.get("options", "")))
        self.pool = pool = ctx.pools.get(database, user)
        if not self._adopt_settings(pool, settings):
            # A server connection is needed: the client hears now that its password is
            # proved. Nothing is due from it until ReadyForQuery: what it sends meanwhile
            # (for up to connection_borrow_timeout) stays in the kernel's buffer.
            self.write(greeting)
            greeting = b""
            self.hold_reading()
            try:
                await self._learn_defaults(pool, settings)
            finally:
                self.release_reading()
        assert pool.server_facts is not None
        defaults = pool.server_facts
        own = {k: v for k, v in self.wanted.items() if k in defaults}
        reported = tuple({**defaults, **own}.items() if own else defaults.items())
        statuses = ctx.statuses.get(reported)
        if statuses is None:
            statuses = b"".join(wire.parameter_status(k, v) for k, v in reported)
            ctx.statuses[reported] = statuses
        process_id, secret_key = ctx.new_cancel_key(cast("PgClient", self))  # its only host
        self.pid_bytes = process_id.to_bytes(4, "big", signed=True)
        self.key = (process_id, secret_key)
        # One write for all of it: each write on loopback also runs the client's TCP stack.
        self.write(
            greeting
            + statuses
            + wire.backend_key_data(process_id, secret_key)
            + wire.ready_for_query()
        )
        self.start_serving()

    async def _direct_tls(self) -> None:
        """PostgreSQL 17's direct TLS (sslnegotiation=direct): the handshake starts at once,
        with no SSLRequest, and the startup packet follows over TLS. As PostgreSQL does, the
        client must have asked for ALPN "postgresql": a TLS client of another protocol (an
        HTTPS client sent to the wrong port) is not taken for a PostgreSQL one."""
        assert self.runtime.tls is not None
        received = bytes(self.inbox)  # the ClientHello, or its start
        self.inbox.clear()
        identity = self.runtime.tls.current
        timeout = self.runtime.config.client_login_timeout
        await self.start_tls(identity.context, timeout, received=received)
        self.channel_binding = identity.end_point
        assert self.transport is not None
        if self.transport.get_extra_info("ssl_object").selected_alpn_protocol() != wire.ALPN:
            raise wire.ProtocolViolation(
                f'direct TLS connection without ALPN protocol "{wire.ALPN}"'
            )

    async def _authenticate(self, user: str) -> bytes:
        """Prove the client's password; what then tells it so (AuthenticationOk, after
        SCRAM's final message), for the caller to send with what follows."""
        ctx = self.ctx
        throttle = ctx.runtime.throttle
        if len(throttle):  # (failures counted lately: else no address to look up)
            await throttle.sit_out(self, throttle.before_check(source_address(self.transport)))
        method = ctx.runtime.users.method_for(user)
        if method.iam_auth is IamAuth.REQUIRED and not self.tls:
            self.refuse_token_without_tls()
            raise LoginRefused(
                "28000",
                f'user "{user}" logs in with an auth token, which is accepted over TLS only',
                "connect with sslmode=require or stronger",
            )
        final: bytes | None  # what tells the client it is in, before AuthenticationOk
        if method.cleartext and self.tls:
            self.write(wire.authentication(wire.AUTH_CLEARTEXT))
            typed = await self.read(wire.split_password_message)
            ok = await self.check_cleartext(user, method, typed.removesuffix(b"\0"))
            final = b"" if ok else None
        elif method.auth_type is ClientPasswordAuthType.POSTGRES_MD5:
            salt = secrets.token_bytes(4)
            self.write(wire.authentication(wire.AUTH_MD5, salt))
            response = (await self.read(wire.split_password_message)).rstrip(b"\0")
            ok = await self.check_password(
                user,
                lambda known: any(
                    verify_md5_response(md5_password_hash(user, p), salt, response)
                    for p in known.passwords
                ),
            )
            final = b"" if ok else None
        else:
            final = await self._scram(user)
        if final is None:
            self.auth_failed(user)
            await throttle.sit_out(self, throttle.failed(user, source_address(self.transport)))
            raise LoginRefused("28P01", f'password authentication failed for user "{user}"')
        return final + _AUTHENTICATION_OK

    async def _scram(self, user: str) -> bytes | None:
        """SCRAM-SHA-256, and over TLS SCRAM-SHA-256-PLUS too: bound to this TLS connection
        by the proxy's certificate, so a man in the middle cannot relay the exchange. A
        name the proxy does not know goes through the same exchange (with the same salt
        each time), so the reply does not tell who exists. The server-final message, or
        None for a wrong proof."""
        login = self.ctx.login_for(user)
        verifiers = login.verifiers if login and login.verifiers else (mock_verifier(user),)
        binding = self.channel_binding
        offered = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"] if binding else ["SCRAM-SHA-256"]
        names = b"".join(m.encode() + b"\0" for m in offered) + b"\0"
        self.write(wire.authentication(wire.AUTH_SASL, names))
        payload = await self.read(wire.split_password_message)
        mechanism, data = wire.parse_sasl_initial(payload)
        if mechanism not in offered:
            raise LoginRefused(
                "28000",
                f"unsupported SASL mechanism {mechanism!r}",
                f"the proxy offers {' and '.join(offered)}",
            )
        if (mechanism == "SCRAM-SHA-256-PLUS") != data.startswith(b"p="):
            raise wire.ProtocolViolation(f"{mechanism} with a mismatched channel binding flag")
        server = ScramServer(verifiers[0], also=verifiers[1:], channel_binding=binding)
        try:
            self.write(
                wire.authentication(wire.AUTH_SASL_CONTINUE, server.handle_client_first(data))
            )
            payload = await self.read(wire.split_password_message)
            final = server.handle_client_final(payload)
        except ScramAuthFailed:
            final = b""

            def proof_fits(_: User) -> bool:
                nonlocal final
                newer = self.ctx.login_for(user)
                try:
                    final = server.check_proof(newer.verifiers if newer else ())
                except ScramAuthFailed:
                    return False
                return True

            if not await self.check_password(user, proof_fits):
                return None
        except ScramError as error:
            # Malformed whatever the user: says nothing about who exists.
            raise wire.ProtocolViolation(f"malformed SCRAM message: {error}") from None
        return wire.authentication(wire.AUTH_SASL_FINAL, final)

    def _adopt_settings(self, pool: Lender, settings: dict[str, str]) -> bool:
        """Take this session's own settings in the server's spelling (utf-8 is UTF8,
        datestyle is DateStyle), minus those equal to the pool's defaults, if all of that
        is known without asking a server (False: see _learn_defaults)."""
        facts = pool.server_facts
        if facts is None:
            return False
        if settings:
            canonical = self.ctx.canonical
            settings = _server_spelling(settings, facts)
            if _unknown(settings, canonical):
                return False
            wanted = {k: canonical.get((k, v), v) for k, v in settings.items()}
            self.wanted = {k: v for k, v in wanted.items() if facts.get(k) != v}
        if self.wanted:  # what RESET goes back to (else the shared NO_LOGIN_SETTINGS)
            self.login_settings = dict(self.wanted)
        return True

    async def _learn_defaults(self, pool: Lender, settings: dict[str, str]) -> None:
        """What _adopt_settings needs from a server connection, borrowed for it: the
        server's reported parameters (the first client of a pool), the spelling of setting
        values not seen before (which also checks that the server accepts them, as it would
        at login)."""
        server: PgServer | None = None
        try:
            if pool.server_facts is None:
                server = await self._borrow_for_login(pool)
                pool.server_facts = dict(server.params)
            facts = pool.server_facts
            spelled = _server_spelling(settings, facts)
            canonical = self.ctx.canonical
            unknown = _unknown(spelled, canonical)
            if unknown:
                server = server or await self._borrow_for_login(pool)
                await server.apply_settings(spelled, facts)
                for name in unknown:
                    value = spelled[name]
                    canonical[(name, value)] = server.params.get(name, value)
            adopted = self._adopt_settings(pool, settings)
            assert adopted
            if server is not None and unknown:
                server.applied = dict(self.wanted)
        except ServerError as error:
            raise LoginRefused(error.code or "22023", str(error)) from None
        finally:
            if server is not None:
                self.give_back(server=server)

    async def _borrow_for_login(self, pool: Lender) -> PgServer:
        try:
            server: PgServer = await pool.borrow()
            return server
        except BorrowTimeout:
            raise LoginRefused(
                "53300", "timed out waiting for a database connection", pool.borrow_hint()
            ) from None
