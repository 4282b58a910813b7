"""Session settings replay for a PostgreSQL client: after a transaction that changed
settings, learn their values and carry them to every server connection borrowed later."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from dbmux.engines.base import PoolKey, ServerError
from dbmux.engines.postgres import wire
from dbmux.engines.postgres.pinning import ALL_SETTINGS
from dbmux.session import ClientSession, Leftover

if TYPE_CHECKING:
    from dbmux.engines.postgres.backend import PgServer
    from dbmux.engines.postgres.engine import PgContext

log = logging.getLogger("dbmux.postgres")

# Settings a session may have the proxy carry to each server connection it borrows; past
# that it is pinned (SESSION_STATE_SIZE) and its server connection holds them, as directly.
MAX_CARRIED_SETTINGS = 1000
SESSION_STATE_SIZE = "session_state_size"
# A session's `touched` and `resets` while it has none: one immutable empty set for all.
NO_SETTINGS: frozenset[str] = frozenset()
# A session's `login_settings` when it gave none at login (most do not).
NO_LOGIN_SETTINGS: Mapping[str, str] = MappingProxyType({})


class SettingsMixin(ClientSession):
    """PgClient's part that follows session settings (session_state: replay or pin)."""

    if not TYPE_CHECKING:  # the slots are PgClient's (mypy would look for them here)
        __slots__ = ()

    ctx: PgContext
    errors_at_attach: int
    login_settings: Mapping[str, str]
    resets: frozenset[str]
    server_params_changed: bool
    set_texts: tuple[bytes, ...]
    touched: frozenset[str]
    unmemoizable: bool
    wanted: dict[str, str]

    if TYPE_CHECKING:  # provided by PgClient and the classes it mixes in

        def _flush_pending(self) -> None: ...
        @property
        def _has_waiting_requests(self) -> bool: ...

    def _follow_settings(self, server: PgServer) -> None:
        """The transaction changed session settings. Replay: learn their values and carry
        them from now on (the server stays with us meanwhile; requests wait). Pin mode: a
        changed setting pins the session to this connection."""
        self.server_params_changed = False
        if not self.ctx.classifier.replay_settings:
            if self._settings_drifted(server):
                self.attach(server)
                self.pin("set_variable")
                return
            self.give_back(server=server)
            return
        pool = self.pool
        assert pool is not None and pool.server_facts is not None
        names = {name.lower() for name in self.touched}
        if ALL_SETTINGS in names:
            names.discard(ALL_SETTINGS)
            names |= {name.lower() for name in self.wanted}
        names -= {name.lower() for name in pool.server_facts}  # reported by the server itself
        memo_key = self._memo_key(server)
        restore = self._login_values_to_restore()
        self.touched = NO_SETTINGS
        self.set_texts = ()
        self.unmemoizable = False
        known = self.ctx.set_results.outcome(*memo_key) if memo_key else None
        if not restore and (not names or known is not None):
            self._settle_settings(server, known or {})
        else:
            self.waiting = True
            self.run_own(self._learn_settings(server, names, memo_key, restore))

    def _login_values_to_restore(self) -> dict[str, str]:
        """RESET goes back to the session's default, which for a setting given at login is
        the login value; the server connection never saw the login, so the proxy puts it
        back itself."""
        resets, login = self.resets, self.login_settings
        self.resets = NO_SETTINGS
        if ALL_SETTINGS in resets:
            return dict(login)
        return {name: value for name, value in login.items() if name.lower() in resets}

    def _memo_key(self, server: PgServer) -> tuple[PoolKey, bytes] | None:
        """A SET statement's outcome is the same every time it succeeds on its own (outside a
        transaction block) for the same database and user, so one read of its result
        serves every later run of that text."""
        if self.unmemoizable or len(self.set_texts) != 1 or self.pool is None:
            return None
        if server.scanner.errors != self.errors_at_attach:
            return None
        return self.pool.key, self.set_texts[0]

    async def _learn_settings(
        self,
        server: PgServer,
        names: set[str],
        memo_key: tuple[PoolKey, bytes] | None,
        restore: dict[str, str],
    ) -> None:
        try:
            if restore:
                await server.apply_settings(restore, {}, force=True)
                reported = [n for n in restore if n in server.params]
                self.write(b"".join(wire.parameter_status(n, server.params[n]) for n in reported))
            values = await server.read_settings(names) if names else {}
        except ServerError as error:
            log.warning("could not read back session settings; closing that connection: %s", error)
            self.give_back(Leftover.UNKNOWN, server)
            self.waiting = False
            self._flush_pending()
            return
        except asyncio.CancelledError:
            self.give_back(Leftover.UNKNOWN, server)
            raise
        if memo_key is not None:
            self.ctx.set_results.remember(*memo_key, values)
        self._settle_settings(server, values)

    def _settle_settings(self, server: PgServer, values: dict[str, str | None]) -> None:
        """Take the session's settings from the server's reports and `values`, then carry
        on: relay what waited, or give the server back."""
        pool = self.pool
        assert pool is not None and pool.server_facts is not None
        facts = pool.server_facts
        wanted = self.wanted
        for name, reported in server.params.items():
            if name in facts:
                if reported != facts[name]:
                    wanted[name] = reported
                else:
                    wanted.pop(name, None)
        # Values equal to the default stay listed: knowing the default would cost a read of
        # pg_settings, while an entry too many costs at most a set_config on a borrow.
        for name, value in values.items():
            if value is None:
                wanted.pop(name, None)
            else:
                wanted[name] = value
        server.applied = dict(wanted)
        if len(wanted) > MAX_CARRIED_SETTINGS and self.pin_reason is None:
            self.pin(SESSION_STATE_SIZE)  # from now on this server connection holds them
        if self._has_waiting_requests:
            self.on_connection(server)  # what the client sent meanwhile runs right here
        elif self.pin_reason is not None:
            self.waiting = False
            self.attach(server)
        else:
            self.waiting = False
            self.give_back(server=server)

    def _settings_drifted(self, server: PgServer) -> bool:
        """A reported setting changed by something the classifier did not see (a function's
        SET, say): the session now has state, and only pinning keeps it."""
        defaults = self.pool.server_facts or {} if self.pool else {}
        for name, value in server.params.items():
            expected = self.wanted.get(name, defaults.get(name))
            if expected is not None and expected != value:
                return True
        return False
