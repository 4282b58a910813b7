"""Login of a MySQL client: the handshake, the password checked against the proxy's own
secret (mysql_native_password, or caching_sha2_password with its RSA exchange), the pool it
joins and what the pool's first client learns from a server; COM_CHANGE_USER logs in again."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING, cast

from dbmux.auth import mysql as auth
from dbmux.auth.admission import source_address
from dbmux.config import IamAuth
from dbmux.engines.base import BorrowTimeout, Lender, ServerError
from dbmux.engines.mysql import handshake, wire
from dbmux.engines.mysql.backend import CLEAR, NATIVE
from dbmux.session import ClientSession

if TYPE_CHECKING:
    from dbmux.engines.mysql.engine import MyContext
    from dbmux.engines.mysql.frontend import MyClient

log = logging.getLogger("dbmux.mysql")

DEFAULT_COMMAND_LIMIT = 64 << 20  # until the server's max_allowed_packet is known


class LoginRefused(Exception):
    """Login ends with this ERR packet (sequence id `seq`) and the connection is closed."""

    def __init__(self, seq: int, error: tuple[int, str], message: str) -> None:
        super().__init__(message)
        self.seq, self.error, self.message = seq, error, message


def borrow_hint(pool: Lender) -> str:
    return f"timed out waiting for a database connection: {pool.borrow_hint()}"


def too_many(seq: int, text: str, hint: str) -> LoginRefused:
    """MySQL's "Too many connections" (1040), saying which limit was reached."""
    return LoginRefused(seq, wire.ER_CON_COUNT_ERROR, f"Too many connections: {text} ({hint})")


def command_limit(setting: int | None, facts: dict[str, str] | None) -> int:
    """Bytes of one command the proxy buffers: max_command_size, else the server's own
    max_allowed_packet (past which it refuses a command anyway)."""
    if setting is not None:
        return setting
    known = (facts or {}).get("max_allowed_packet", "")
    return int(known) if known.isdigit() else DEFAULT_COMMAND_LIMIT


def error_of(error: ServerError) -> tuple[int, str]:
    code = int(error.code) if error.code.isdigit() else wire.CR_SERVER_LOST[0]
    return code, str(error.fields.get("state", "HY000"))


class LoginMixin(ClientSession):
    """MyClient's login and COM_CHANGE_USER."""

    if not TYPE_CHECKING:  # the slots are MyClient's (mypy would look for them here)
        __slots__ = ()

    capabilities: int
    connection_id: int
    ctx: MyContext
    nonce: bytes
    reader: wire.PacketReader
    schema: str
    variant: int

    if TYPE_CHECKING:  # provided by MyClient and the classes it mixes in

        def _end_command(self) -> None: ...
        def _reset_session(self) -> None: ...
        def reply(self, *payloads: bytes, seq: int = 1) -> None: ...
        def reply_error(self, error: tuple[int, str], message: str, *, seq: int = 1) -> None: ...

    async def log_in(self, deadline: asyncio.TimerHandle) -> None:
        try:
            await self._handshake(deadline)
        except LoginRefused as refusal:
            self.refuse_login(refusal)

    def refuse_login(self, refusal: LoginRefused) -> None:
        self.write(wire.packet(refusal.seq, wire.err_packet(refusal.error, refusal.message)))
        self.close_lingering()

    async def _handshake(self, deadline: asyncio.TimerHandle) -> None:
        ctx = self.ctx
        admission = ctx.runtime.admission
        refusal = admission.refusal()
        if refusal is not None:
            raise too_many(0, refusal.text, refusal.hint)
        self.hold_reading()  # nothing is due from the client before the greeting
        try:
            greeting = await ctx.server_greeting()
        except (OSError, TimeoutError, ServerError, wire.ProtocolViolation) as error:
            raise LoginRefused(0, (2003, "HY000"), f"cannot reach the database: {error}") from None
        finally:
            self.release_reading()
        self.nonce = auth.new_nonce()
        self.connection_id = ctx.new_connection_id(cast("MyClient", self))  # its only host
        offered = greeting.capabilities & handshake.PROXY_CAPABILITIES
        if self.runtime.tls is not None:
            offered |= handshake.CLIENT_SSL
        self.write(
            wire.packet(
                0,
                handshake.build_greeting(
                    handshake.Greeting(
                        greeting.version,
                        self.connection_id,
                        self.nonce,
                        offered,
                        greeting.charset,
                        wire.SERVER_STATUS_AUTOCOMMIT,
                        ctx.default_plugin,
                    )
                ),
            )
        )
        seq, payload = await self.read(wire.split_login_packet)
        response = handshake.parse_handshake_response(payload)
        if response.ssl_request:
            if self.runtime.tls is None:
                raise LoginRefused(seq + 1, wire.ER_NOT_SUPPORTED_AUTH_MODE, "TLS is not offered")
            # The client starts its handshake right behind the SSL request, unanswered: what
            # came with it is the ClientHello (TLS refuses anything else), not plaintext.
            received = bytes(self.inbox)
            self.inbox.clear()
            await self.start_tls(
                self.runtime.tls.current.context,
                self.runtime.config.client_login_timeout,
                received=received,
            )
            seq, payload = await self.read(wire.split_login_packet)
            response = handshake.parse_handshake_response(payload)
            if response.ssl_request:
                raise wire.ProtocolViolation("a second SSL request")
        if self.runtime.config.require_tls and not self.tls:
            raise LoginRefused(
                seq + 1,
                wire.ER_SECURE_TRANSPORT_REQUIRED,
                "Connections using insecure transport are prohibited by this proxy "
                "(require_tls): connect with TLS (ssl-mode REQUIRED)",
            )
        if response.capabilities & handshake.CLIENT_COMPRESS:
            raise LoginRefused(
                seq + 1, wire.ER_NOT_SUPPORTED_AUTH_MODE, "compression is not supported by dbmux"
            )
        self.capabilities = response.capabilities & offered
        self.user = response.user
        seq = await self._authenticate(response.user, response.plugin, response.auth_response, seq)
        refusal = self.admit(deadline)
        if refusal is not None:
            raise too_many(seq + 1, refusal.text, refusal.hint)
        database = response.database if self.capabilities & handshake.CLIENT_CONNECT_WITH_DB else ""
        await self._join_pool(database, response.charset, seq + 1)
        self.reply(wire.ok_packet(), seq=seq + 1)
        self.start_serving()

    async def _authenticate(self, user: str, plugin: str, response: bytes, seq: int) -> int:
        """Check the client's password against the proxy's secret with the user's plugin
        (switching plugins if the client started with another); the last sequence id."""
        ctx = self.ctx
        throttle = ctx.runtime.throttle
        address = source_address(self.transport)
        await throttle.sit_out(self, throttle.before_check(address))
        chosen = ctx.runtime.users.method_for(user)
        if chosen.iam_auth is IamAuth.REQUIRED and not self.tls:
            self.refuse_token_without_tls()
            raise LoginRefused(
                seq + 1,
                wire.ER_ACCESS_DENIED_ERROR,
                f"Access denied for user '{user}': it logs in with an auth token, which is "
                "accepted over TLS only (ssl-mode REQUIRED)",
            )
        # A token travels as the typed password (mysql_clear_password), over TLS only.
        method = CLEAR if chosen.cleartext and self.tls else ctx.plugin_for(chosen.auth_type)
        # Unknown users go through the same exchange, so the reply does not tell who exists.
        if (plugin or NATIVE) != method:
            if not self.capabilities & handshake.CLIENT_PLUGIN_AUTH:
                raise LoginRefused(
                    seq + 1, wire.ER_NOT_SUPPORTED_AUTH_MODE, f"the client cannot use {method}"
                )
            self.write(wire.packet(seq + 1, handshake.auth_switch_request(method, self.nonce)))
            seq, response = await self.read(wire.split_login_packet)
        nonce = self.nonce
        if method == CLEAR:
            ok = await self.check_cleartext(user, chosen, response.removesuffix(b"\0"))
        elif method == NATIVE:
            ok = await self.check_password(
                user,
                lambda known: any(auth.verify_native(p, nonce, response) for p in known.passwords),
            )
        elif await self.check_password(
            user, lambda known: any(auth.verify_sha2(p, nonce, response) for p in known.passwords)
        ):
            self.write(wire.packet(seq + 1, b"\x01\x03"))  # fast authentication succeeded
            seq += 1
            ok = True
        else:
            sent, seq = await self._full_sha2_auth(seq)
            ok = sent is not None and await self.check_password(
                user,
                lambda known: any(hmac.compare_digest(sent, p.encode()) for p in known.passwords),
            )
        if not ok:
            self.auth_failed(user)
            await throttle.sit_out(self, throttle.failed(user, address))
            using = "YES" if response else "NO"
            raise LoginRefused(
                seq + 1,
                wire.ER_ACCESS_DENIED_ERROR,
                f"Access denied for user '{user}'@'{address or '?'}' (using password: {using})",
            )
        return seq

    async def _full_sha2_auth(self, seq: int) -> tuple[bytes | None, int]:
        """caching_sha2_password full authentication, which yields the password the client
        typed (None: it sent none that can be read): over TLS the client sends it in the
        TLS channel (NUL-terminated); without TLS it sends it encrypted with the proxy's RSA
        key, asking for the key first unless it pinned it (a cleartext password does not
        decrypt, so it is refused)."""
        self.write(wire.packet(seq + 1, b"\x01\x04"))
        seq, data = await self.read(wire.split_login_packet)
        if self.tls:
            return (data[:-1] if data.endswith(b"\0") else None), seq
        if data == b"\x02":  # the key, please (a client that pinned it sends the password)
            self.write(wire.packet(seq + 1, b"\x01" + self.ctx.rsa_key.public_pem))
            seq, data = await self.read(wire.split_login_packet)
        sent = self.ctx.rsa_key.decrypt_password(data, self.nonce)
        return (sent.encode() if sent is not None else None), seq

    async def _join_pool(self, database: str, charset: int, seq: int) -> None:
        """Pick the pool of this (database, user, capabilities, charset); its first client
        checks with a real server connection that the database accepts the login."""
        self.variant = (self.capabilities & handshake.SESSION_CAPABILITIES) | charset << 48
        self.pool = pool = self.ctx.pools.get(database, self.user, self.variant)
        self.schema = database
        if pool.server_facts is None:
            # Nothing is due from the client until the OK: what it sends meanwhile (for up
            # to connection_borrow_timeout) stays in the kernel's buffer, not the proxy's.
            self.hold_reading()
            try:
                pool.server_facts = await self._read_server_facts(pool, seq)
            finally:
                self.release_reading()
        self.reader.limit = command_limit(self.ctx.config.max_command_size, pool.server_facts)

    async def _read_server_facts(self, pool: Lender, seq: int) -> dict[str, str]:
        """A pool's first client checks on a server connection that the database accepts
        the login, and learns what the server allows (max_allowed_packet)."""
        try:
            server = await pool.borrow()
        except BorrowTimeout:
            raise LoginRefused(seq, wire.ER_CON_COUNT_ERROR, borrow_hint(pool)) from None
        except ServerError as error:
            raise LoginRefused(seq, error_of(error), str(error)) from None
        try:
            facts: dict[str, str] = await server.read_facts()
            return facts
        finally:
            self.give_back(server=server)

    async def _change_user(self, payload: bytes) -> None:
        """COM_CHANGE_USER: log in again as another user (checked by the proxy, against the
        connection's nonce), then start over as a new session of that user's pool."""
        change = handshake.parse_change_user(payload, self.capabilities)
        try:
            seq = await self._authenticate(change.user, change.plugin, change.auth_response, 0)
        except LoginRefused as refusal:
            self.reply_error(refusal.error, refusal.message, seq=refusal.seq)
            self.close_lingering()
            return
        self._reset_session()
        self.user = change.user
        charset = change.charset if change.charset is not None else self.variant >> 48
        try:
            await self._join_pool(change.database, charset, seq + 1)
        except LoginRefused as refusal:
            self.reply_error(refusal.error, refusal.message, seq=refusal.seq)
            self.close_lingering()
            return
        self.reply(wire.ok_packet(), seq=seq + 1)
        self._end_command()
