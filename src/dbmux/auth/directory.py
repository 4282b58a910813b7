"""The users one proxy knows, from its `auth` entries' secrets, kept current as the secrets
rotate.

A rotation must not fail anyone: while it runs, a user may have two passwords (AWSCURRENT
and AWSPENDING), and the database may already have switched to the pending one before the
secret's AWSCURRENT label moves. So clients may log in to the proxy with either, and the
proxy logs in to the database with whichever the database takes, the one that worked last
first. A secret that cannot be read leaves its entry without users (clients are refused as
for a wrong password, the log says why, the targets report AUTH_FAILURE) and is tried again,
never stopping the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dbmux.auth.scram import user_salt
from dbmux.auth.secrets import (
    Credentials,
    SecretError,
    SecretSource,
    SecretVersions,
    secret_source,
)
from dbmux.config import AuthEntry, ClientPasswordAuthType, IamAuth, SecretsConfig

log = logging.getLogger("dbmux.secrets")

# A failed login may mean the proxy has not seen a new password yet: the secrets are read
# again then, at most this often (each read of an AWS secret is two API calls).
REREAD_AFTER_FAILURE = 2.0


@dataclass(frozen=True, slots=True)
class Method:
    """How a user proves who it is: its password auth type (None: the engine's default), and
    whether it may (ENABLED) or must (REQUIRED) send a signed token instead."""

    auth_type: ClientPasswordAuthType | None
    iam_auth: IamAuth

    @property
    def cleartext(self) -> bool:
        """Tokens travel as cleartext passwords, so such a user is asked for one."""
        return self.iam_auth is not IamAuth.DISABLED


@dataclass(frozen=True, slots=True)
class User:
    """A user clients may log in as: the passwords it has now (more than one during a
    rotation), and how it logs in."""

    name: str
    passwords: tuple[str, ...] = field(repr=False)
    auth_type: ClientPasswordAuthType | None
    iam_auth: IamAuth
    method: Method = field(init=False, repr=False, compare=False)  # made once, read per login

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.auth_type, self.iam_auth))


@dataclass(slots=True)
class _Entry:
    config: AuthEntry
    source: SecretSource
    versions: SecretVersions | None = None
    problem: str | None = None  # why the secret could not be used, for logs and health
    stamp: object | None = None
    read_at: float = float("-inf")


class UserDirectory:
    """Every user of one proxy's `auth` entries. `version` changes whenever a user or a
    password does, so that what an engine derives from passwords (SCRAM keys) is derived
    again only then."""

    def __init__(
        self,
        entries: list[tuple[AuthEntry, SecretSource]],
        settings: SecretsConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries = [_Entry(config, source) for config, source in entries]
        # The configured methods, once each (an unknown name is asked for one of them).
        self._methods = list(
            dict.fromkeys(
                Method(config.client_password_auth_type, config.iam_auth) for config, _ in entries
            )
        )
        self._settings = settings
        self._clock = clock
        self._users: dict[str, User] = {}
        self._logins: dict[str, tuple[Credentials, ...]] = {}
        self._worked: dict[str, Credentials] = {}  # the database took these last
        self._lock = asyncio.Lock()
        self._last_forced = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None
        self.on_change: Callable[[], None] = lambda: None  # after a user or password changed
        self.version = 0

    @classmethod
    def from_config(
        cls, auth: list[AuthEntry], settings: SecretsConfig, base_dir: Path
    ) -> UserDirectory:
        return cls(
            [
                (
                    entry,
                    secret_source(
                        entry.secret, base_dir=base_dir, aws_endpoint_url=settings.aws_endpoint_url
                    ),
                )
                for entry in auth
            ],
            settings,
        )

    # -- what logins read ---------------------------------------------------------------------

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def __len__(self) -> int:
        return len(self._users)

    def method_for(self, name: str) -> Method:
        """How a login as `name` is asked for its password. A name no entry holds gets one
        of the configured methods, picked by the name and fixed for the process's life: the
        method (MD5 or SCRAM, a plugin switch or not, a token or not) must not tell who
        exists."""
        user = self._users.get(name)
        if user is not None:
            return user.method
        methods = self._methods
        return methods[int.from_bytes(user_salt(name)[:4], "big") % len(methods)]

    def logins(self, name: str) -> tuple[Credentials, ...]:
        """The credentials to log in to the database as `name` with, in the order to try."""
        found = self._logins.get(name, ())
        worked = self._worked.get(name)
        if worked in found and found[0] != worked:
            return (worked, *[c for c in found if c != worked])
        return found

    def worked(self, credentials: Credentials) -> None:
        """The database took these: try them first next time."""
        if len(self._logins.get(credentials.username, ())) > 1:
            self._worked[credentials.username] = credentials

    def any_logins(self) -> tuple[Credentials, ...]:
        """Credentials to probe the targets with: the first user's."""
        for name in self._users:
            return self.logins(name)
        return ()

    @property
    def problems(self) -> list[str]:
        """Why entries have no usable secret (no secret contents in these)."""
        return [entry.problem for entry in self._entries if entry.problem]

    # -- reading the secrets ------------------------------------------------------------------

    def load(self) -> None:
        """Read every secret once, blocking (at start): one that fails is logged and left
        for the next refresh; the proxy starts either way."""
        for entry in self._entries:
            self._apply(entry, self._read(entry), self._clock())
        self._rebuild()

    async def refresh(self, *, force: bool = False) -> bool:
        """Read again what may have changed: files whose stamp moved, AWS secrets after
        `refresh_interval`, anything that failed after `retry_interval`; with `force`,
        everything. True if a user or password changed."""
        async with self._lock:
            now = self._clock()
            due = [entry for entry in self._entries if force or self._due(entry, now)]
            if not due:
                return False
            results = await asyncio.gather(*(asyncio.to_thread(self._read, e) for e in due))
            changed = False
            for entry, result in zip(due, results, strict=True):
                changed |= self._apply(entry, result, now)
            if changed:
                self._rebuild()
            return changed

    def refresh_in_background(self) -> None:
        """Start a `refresh` unless one runs (the janitor's pass must not wait on a secrets
        store that answers slowly)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_logged())

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:  # a bug here must not go unseen, nor stop later refreshes
            log.exception("reading the secrets again failed")

    async def reread_after_failure(self) -> bool:
        """A login failed: read the secrets again, if not done in the last moments, in case
        one was rotated. True if anything changed (the login may be checked again)."""
        now = self._clock()
        if now - self._last_forced < REREAD_AFTER_FAILURE:
            return False
        self._last_forced = now
        return await self.refresh(force=True)

    def _due(self, entry: _Entry, now: float) -> bool:
        stamp = entry.source.stamp()
        if stamp is not None and stamp != entry.stamp:
            return True  # the file changed
        if entry.problem is not None:
            return now - entry.read_at >= self._settings.retry_interval
        return stamp is None and now - entry.read_at >= self._settings.refresh_interval

    @staticmethod
    def _read(entry: _Entry) -> tuple[object | None, SecretVersions | SecretError]:
        stamp = entry.source.stamp()  # before the read: a change during it is seen next time
        try:
            return stamp, entry.source.fetch()
        except SecretError as error:
            return stamp, error

    def _apply(
        self,
        entry: _Entry,
        result: tuple[object | None, SecretVersions | SecretError],
        now: float,
    ) -> bool:
        stamp, outcome = result
        entry.stamp, entry.read_at = stamp, now
        if isinstance(outcome, SecretError):
            if entry.problem != str(outcome):
                entry.problem = str(outcome)
                log.error("secret %s cannot be used: %s", entry.config.secret, outcome)
            # Credentials once read stay in use: a store that is down for a moment must not
            # lock everyone out; a secret never read leaves its users unknown.
            return False
        if entry.problem is not None:
            log.info("secret %s can be used again", entry.config.secret)
        entry.problem = None
        if outcome == entry.versions:
            return False
        if entry.versions is not None:
            log.info(
                "secret %s changed%s",
                entry.config.secret,
                "; a rotation is under way" if outcome.pending is not None else "",
            )
        entry.versions = outcome
        return True

    def _rebuild(self) -> None:
        logins: dict[str, tuple[Credentials, ...]] = {}
        owners: dict[str, AuthEntry] = {}  # a name two entries hold belongs to the first
        for entry in self._entries:
            for credentials in entry.versions.all if entry.versions else ():
                name = credentials.username
                if owners.setdefault(name, entry.config) is entry.config:
                    logins[name] = (*logins.get(name, ()), credentials)
        self._users = {
            name: User(
                name,
                tuple(c.password for c in found),
                owners[name].client_password_auth_type,
                owners[name].iam_auth,
            )
            for name, found in logins.items()
        }
        self._logins = logins
        self._worked = {k: v for k, v in self._worked.items() if v in logins.get(k, ())}
        self.version += 1
        self.on_change()
