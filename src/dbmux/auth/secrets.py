"""Secrets providers: turn a `secret:` reference into database credentials."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class SecretError(Exception):
    """A secret that cannot be read or does not hold usable credentials."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A database login, as AWS Secrets Manager stores it."""

    username: str
    password: str
    engine: str = ""


def parse_secret(text: str, *, source: str) -> Credentials:
    """Parse the JSON document of a database secret."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SecretError(f"{source}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise SecretError(f"{source}: expected a JSON object with username and password")
    for key in ("username", "password"):
        if not isinstance(data.get(key), str) or (key == "username" and not data[key]):
            raise SecretError(f"{source}: missing or non-string '{key}'")
    engine = data.get("engine", "")
    return Credentials(
        data["username"], data["password"], engine if isinstance(engine, str) else ""
    )


def read_secret(reference: str, *, base_dir: Path = Path(".")) -> Credentials:
    """Resolve `file:PATH` (relative to the config's folder) or `env:VAR`."""
    scheme, _, rest = reference.partition(":")
    if scheme == "file":
        path = Path(rest)
        if not path.is_absolute():
            path = base_dir / path
        try:
            text = path.read_text()
        except OSError as error:
            raise SecretError(f"{reference}: cannot read {path}: {error.strerror}") from None
        return parse_secret(text, source=reference)
    if scheme == "env":
        if rest not in os.environ:
            raise SecretError(f"{reference}: environment variable {rest} is not set")
        return parse_secret(os.environ[rest], source=reference)
    if scheme == "arn":
        raise SecretError(f"{reference}: AWS Secrets Manager is not supported yet")
    raise SecretError(f"{reference}: unknown secret scheme {scheme!r}")
