"""Secrets providers: turn a `secret:` reference into database credentials, and read it again
when it may have changed (a rotated password).

A secret is the JSON document AWS Secrets Manager keeps for an RDS database:
`{"username": ..., "password": ..., "engine": ...}` (other keys, host and port, are ignored:
the target group says where the database is). Three places hold one:

- `file:PATH`: read again when the file changes (size, time or inode);
- `env:VAR`: fixed for the life of the process;
- `arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME`: AWS Secrets Manager through boto3,
  read again every `secrets.refresh_interval`. During a rotation the version labelled
  AWSPENDING is read too: its password may already be the database's (the rotation's
  setSecret step) before AWSCURRENT moves to it (finishSecret).

Nothing here puts a password in a message or a repr: errors name the reference and the
reason only.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbmux.auth.files import file_stamp

log = logging.getLogger("dbmux.secrets")


class SecretError(Exception):
    """A secret that cannot be read or does not hold usable credentials."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A database login, as AWS Secrets Manager stores it."""

    username: str
    password: str = field(repr=False)
    engine: str = ""


@dataclass(frozen=True, slots=True)
class SecretVersions:
    """What a secret holds now: its current credentials and, while a rotation is under way,
    the pending ones (a different password, or a different user for alternating-users
    rotation)."""

    current: Credentials
    pending: Credentials | None = None

    @property
    def all(self) -> tuple[Credentials, ...]:
        pending = self.pending
        if pending is None or pending == self.current:
            return (self.current,)
        return (self.current, pending)


def parse_secret(text: str, *, source: str) -> Credentials:
    """Parse the JSON document of a database secret; the error says what is wrong with it,
    never what it holds."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SecretError(
            f"{source}: not valid JSON (line {error.lineno} column {error.colno})"
        ) from None
    if not isinstance(data, dict):
        raise SecretError(f"{source}: expected a JSON object with username and password")
    for key in ("username", "password"):
        if not isinstance(data.get(key), str) or (key == "username" and not data[key]):
            raise SecretError(f"{source}: missing or non-string '{key}'")
    engine = data.get("engine", "")
    return Credentials(
        data["username"], data["password"], engine if isinstance(engine, str) else ""
    )


class SecretSource:
    """Where one secret lives. `fetch` may block (files, the network): the proxy calls it
    from a worker thread. `stamp` is a cheap check that changes when the secret may have;
    None means it cannot tell, so the secret is fetched again on an interval."""

    reference: str

    def fetch(self) -> SecretVersions:
        raise NotImplementedError

    def stamp(self) -> object | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reference!r})"


class FileSecret(SecretSource):
    """A JSON file; a file others may read is used, with a warning."""

    def __init__(self, reference: str, path: Path) -> None:
        self.reference = reference
        self.path = path
        self._warned = False

    def stamp(self) -> object | None:
        return file_stamp(self.path)

    def fetch(self) -> SecretVersions:
        return SecretVersions(parse_secret(self.read_text(), source=self.reference))

    def read_text(self) -> str:
        try:
            with self.path.open() as file:
                mode = os.fstat(file.fileno()).st_mode
                text = file.read(MAX_SECRET_BYTES + 1)
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise SecretError(f"{self.reference}: cannot read {self.path}: {reason}") from None
        if len(text) > MAX_SECRET_BYTES:
            raise SecretError(f"{self.reference}: larger than {MAX_SECRET_BYTES} bytes")
        if mode & (stat.S_IRGRP | stat.S_IROTH) and not self._warned:
            self._warned = True
            log.warning(
                "secret file %s can be read by other users (mode %o); chmod 600 it",
                self.path,
                stat.S_IMODE(mode),
            )
        return text


class EnvSecret(SecretSource):
    """An environment variable holding the JSON document."""

    def __init__(self, reference: str, name: str) -> None:
        self.reference = reference
        self.name = name

    def stamp(self) -> object | None:
        return 0  # the process's environment does not change under it

    def fetch(self) -> SecretVersions:
        return SecretVersions(parse_secret(self.read_text(), source=self.reference))

    def read_text(self) -> str:
        if self.name not in os.environ:
            raise SecretError(f"{self.reference}: environment variable {self.name} is not set")
        return os.environ[self.name]


class AwsSecret(SecretSource):
    """AWS Secrets Manager: AWSCURRENT, and AWSPENDING while a rotation is under way. The
    region comes from the ARN; credentials from boto3's usual chain (environment, profile,
    instance role)."""

    def __init__(self, reference: str, endpoint_url: str | None) -> None:
        self.reference = reference
        parts = reference.split(":")
        if len(parts) < 7 or parts[5] != "secret" or not parts[3]:
            raise SecretError(
                f"{reference}: not a Secrets Manager ARN "
                "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME)"
            )
        self.region = parts[3]
        self.endpoint_url = endpoint_url
        self._client: Any = None

    def _secrets_manager(self) -> Any:
        if self._client is None:
            try:
                import boto3  # type: ignore[import-untyped]  # optional: pip install 'dbmux[aws]'
            except ImportError:
                raise SecretError(
                    f"{self.reference}: AWS Secrets Manager needs boto3 (pip install 'dbmux[aws]')"
                ) from None
            from botocore.config import Config  # type: ignore[import-untyped]

            # Bounded waits: a store that does not answer must not hold logins for long.
            bounds = Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2})
            self._client = boto3.session.Session().client(
                "secretsmanager",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=bounds,
            )
        return self._client

    def _stage(self, stage: str) -> Credentials | None:
        client = self._secrets_manager()
        try:
            answer = client.get_secret_value(SecretId=self.reference, VersionStage=stage)
        except client.exceptions.ResourceNotFoundException:
            if stage == "AWSCURRENT":
                raise SecretError(f"{self.reference}: no such secret") from None
            return None  # no rotation under way
        except Exception as error:  # botocore's errors: access denied, network, throttling
            raise SecretError(f"{self.reference}: {stage}: {_aws_reason(error)}") from None
        text = answer.get("SecretString")
        if not isinstance(text, str):
            raise SecretError(f"{self.reference}: {stage} holds no SecretString")
        return parse_secret(text, source=f"{self.reference} ({stage})")

    def fetch(self) -> SecretVersions:
        current = self._stage("AWSCURRENT")
        assert current is not None
        return SecretVersions(current, self._stage("AWSPENDING"))


def _aws_reason(error: Exception) -> str:
    """botocore's error code and message (they name the call, never the secret's value)."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        details = response.get("Error", {})
        return f"{details.get('Code', type(error).__name__)}: {details.get('Message', '')}"
    return f"{type(error).__name__}: {error}"


MAX_SECRET_BYTES = 64 * 1024  # far above any credentials document; a bound on what is read


def secret_source(
    reference: str, *, base_dir: Path = Path("."), aws_endpoint_url: str | None = None
) -> SecretSource:
    """The source a `secret:` reference names; relative files resolve against `base_dir`
    (the config file's folder)."""
    scheme, _, rest = reference.partition(":")
    if scheme == "file":
        path = Path(rest)
        return FileSecret(reference, path if path.is_absolute() else base_dir / path)
    if scheme == "env":
        return EnvSecret(reference, rest)
    if reference.startswith("arn:aws:secretsmanager:"):
        return AwsSecret(reference, aws_endpoint_url)
    raise SecretError(f"{reference}: unknown secret scheme {scheme!r}")


def read_reference(reference: str, base_dir: Path) -> str:
    """The text an `env:VAR` or `file:PATH` reference holds (a file relative to `base_dir`),
    for a setting that is one string rather than credentials (admin.token). SecretError
    names the reference, never the text."""
    source = secret_source(reference, base_dir=base_dir)
    if not isinstance(source, FileSecret | EnvSecret):
        raise SecretError(f"{reference}: must be env:VAR or file:PATH")
    return source.read_text()


def read_secret(
    reference: str, *, base_dir: Path = Path("."), aws_endpoint_url: str | None = None
) -> Credentials:
    """The current credentials of a secret, read once (`dbmux check-config`)."""
    source = secret_source(reference, base_dir=base_dir, aws_endpoint_url=aws_endpoint_url)
    return source.fetch().current
