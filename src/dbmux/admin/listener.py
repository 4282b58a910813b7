"""The admin listener of a dbmux process: where it listens and the token it asks for."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from dbmux.admin.http import Handler, HttpServer
from dbmux.auth.secrets import SecretError, read_reference
from dbmux.config import Config, ConfigError


class Configured(Protocol):
    config: Config


log = logging.getLogger("dbmux.admin")


def read_token(reference: str, base_dir: Path) -> str:
    """The bearer token an admin.token reference (env:VAR or file:PATH) holds; the error
    names the reference, never what it holds."""
    try:
        token = read_reference(reference, base_dir).strip()
    except SecretError as error:
        raise SecretError(f"admin.token: {error}") from None
    if not token:
        raise SecretError(f"admin.token: {reference} holds nothing")
    return token


class AdminListener:
    """Serves the admin API on admin.listen of `owner`'s config, from start() to stop();
    `make_api` makes the request handler, given the token it asks for."""

    def __init__(self, owner: Configured, make_api: Callable[[str | None], Handler]) -> None:
        self.owner = owner
        self.make_api = make_api
        self.http: HttpServer | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where it listens (the port chosen, for port 0), once started."""
        return self.http.address if self.http is not None else None

    async def start(self) -> None:
        config = self.owner.config
        token = None
        if config.admin.token is not None:
            token = read_token(config.admin.token, config.base_dir)
        listen = config.admin.listen
        http = HttpServer(self.make_api(token))
        try:
            await http.start(listen.host, listen.port)
        except OSError as error:
            raise ConfigError(
                f"admin.listen {listen}: cannot listen: {error.strerror or error}"
            ) from None
        self.http = http
        host, port = http.address or (listen.host, listen.port)
        log.info("admin API on http://%s:%d%s", host, port, " (bearer token)" if token else "")

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None
