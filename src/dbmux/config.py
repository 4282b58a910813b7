"""The config file's shape (YAML, names after RDS Proxy's API) and all of its validation."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dbmux.auth.mysql import RsaKey, RsaKeyError
from dbmux.auth.tokens import DEFAULT_LIFETIME, MAX_LIFETIME_LIMIT, canonical_host
from dbmux.engines import ENGINES, engine_class
from dbmux.engines.base import MAX_WORKERS


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the bad field."""


class FieldError(ValueError):
    """A check across fields that blames one of them: `path` is relative to the model that
    ran the check (e.g. "auth.0.iam_auth"), so the report names the field itself."""

    def __init__(self, path: str, text: str) -> None:
        super().__init__(text)
        self.path = path


class IamAuth(StrEnum):
    DISABLED = "DISABLED"
    REQUIRED = "REQUIRED"
    ENABLED = "ENABLED"


class ClientPasswordAuthType(StrEnum):
    POSTGRES_SCRAM_SHA_256 = "POSTGRES_SCRAM_SHA_256"
    POSTGRES_MD5 = "POSTGRES_MD5"
    MYSQL_NATIVE_PASSWORD = "MYSQL_NATIVE_PASSWORD"
    MYSQL_CACHING_SHA2_PASSWORD = "MYSQL_CACHING_SHA2_PASSWORD"


class TlsVersion(StrEnum):
    TLS_1_2 = "TLSv1.2"
    TLS_1_3 = "TLSv1.3"


class TlsMode(StrEnum):
    """How the proxy's connections to a target group use TLS (libpq's sslmode meanings)."""

    DISABLE = "disable"  # plaintext
    REQUIRE = "require"  # encrypted; the certificate is not checked (unless ca_file is set)
    VERIFY_CA = "verify-ca"  # encrypted, and the certificate chains to ca_file
    VERIFY_FULL = "verify-full"  # verify-ca, and the certificate names the server


class PinningFilter(StrEnum):
    EXCLUDE_VARIABLE_SETS = "EXCLUDE_VARIABLE_SETS"


class SessionState(StrEnum):
    REPLAY = "replay"  # carry session settings to whichever server connection is borrowed
    PIN = "pin"  # pin a session that changes its settings, as RDS Proxy does


class TargetRole(StrEnum):
    READ_WRITE = "READ_WRITE"
    READ_ONLY = "READ_ONLY"


class _Model(BaseModel):
    """Unknown keys are errors: a typo in a setting must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _parse_host_port(value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:6432")
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number between 0 and 65535")
    return host.strip("[]") or "127.0.0.1", int(port)


class ClientTls(_Model):
    """The proxy's side of TLS with its clients: its certificate and the oldest version it
    accepts. Relative paths resolve against the config file's folder."""

    certificate_file: Path
    key_file: Path
    min_version: TlsVersion = TlsVersion.TLS_1_2


class OidcIssuer(_Model):
    """Standard JWTs (e.g. Kubernetes service-account tokens) accepted as tokens: signed by a
    key of `jwks_file` (read again when it changes), from `issuer`, for `audience`; the claim
    `user_claim` names the database user, through `users` (claim value -> user) if given."""

    jwks_file: Path
    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    user_claim: str = Field("sub", min_length=1)
    users: dict[str, str] = {}


class AuthTokens(_Model):
    """What signed auth tokens (iam_auth) are checked with: Ed25519 public keys (PEM files,
    several keys per file allowed, read again when they change) and/or an OIDC issuer; the
    host names dbmux tokens may name (default: the listen addresses, and the loopback names
    when listening on loopback); the longest lifetime a dbmux token may claim."""

    public_key_files: list[Path] = []
    oidc: OidcIssuer | None = None
    hosts: list[str] = []
    max_lifetime: int = Field(DEFAULT_LIFETIME, ge=1, le=MAX_LIFETIME_LIMIT)

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        return [canonical_host(host) for host in hosts]

    @model_validator(mode="after")
    def _something_to_check_with(self) -> AuthTokens:
        if not self.public_key_files and self.oidc is None:
            raise FieldError("public_key_files", "needs at least one file, or oidc")
        return self


class Address(_Model):
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _address(value: Any) -> Any:
    if isinstance(value, str):
        host, port = _parse_host_port(value)
        return {"host": host, "port": port}
    return value


ListenAddress = Annotated[Address, Field(description="HOST:PORT to listen on")]


class AuthEntry(_Model):
    """One credential the proxy accepts from clients and uses towards the database."""

    secret: str
    iam_auth: IamAuth = IamAuth.DISABLED
    client_password_auth_type: ClientPasswordAuthType | None = None
    description: str = ""

    @field_validator("secret")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("file:", "env:", "arn:aws:secretsmanager:")):
            raise ValueError("must start with file:, env: or arn:aws:secretsmanager:")
        return value


class ConnectionPoolConfig(_Model):
    max_connections_percent: int = Field(100, ge=1, le=100)
    # Default: half of max_connections_percent, as RDS Proxy does.
    max_idle_connections_percent: int | None = Field(None, ge=0, le=100)
    connection_borrow_timeout: float = Field(120, ge=0)
    session_pinning_filters: list[PinningFilter] = []
    init_query: str = ""
    # Prepared statements kept per server connection (least recently used closed first).
    max_prepared_statements: int = Field(500, ge=1)
    # Server connections idle longer than this are closed by the janitor.
    idle_server_timeout: float = Field(600, gt=0)
    # Seconds a pooled connection may sit idle before the janitor pings it (a peer that
    # vanished without closing is found before a client is handed the connection).
    idle_check_interval: float = Field(30, gt=0)

    @model_validator(mode="after")
    def _idle_within_max(self) -> ConnectionPoolConfig:
        if self.max_idle_connections_percent is None:
            object.__setattr__(
                self, "max_idle_connections_percent", self.max_connections_percent // 2
            )
        elif self.max_idle_connections_percent > self.max_connections_percent:
            raise FieldError(
                "max_idle_connections_percent", "must not exceed max_connections_percent"
            )
        return self


class Target(_Model):
    host: str
    port: int = Field(ge=1, le=65535)


class TargetTls(_Model):
    """The proxy's side of TLS with its databases (independent of its clients' TLS): the
    mode, the CA that vouches for the servers, an optional client certificate, and the name
    checked against the server's certificate (default: each target's host). Relative paths
    resolve against the config file's folder."""

    mode: TlsMode = TlsMode.DISABLE
    ca_file: Path | None = None
    certificate_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = Field(None, min_length=1)
    min_version: TlsVersion = TlsVersion.TLS_1_2

    @model_validator(mode="after")
    def _complete(self) -> TargetTls:
        verifies = self.mode in (TlsMode.VERIFY_CA, TlsMode.VERIFY_FULL)
        if verifies and self.ca_file is None:
            raise FieldError(
                "ca_file", f"is needed to verify the servers' certificates ({self.mode})"
            )
        if (self.certificate_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "certificate_file"
            raise FieldError(missing, "certificate_file and key_file go together")
        if self.mode is TlsMode.DISABLE:
            for name in ("ca_file", "certificate_file", "server_name"):
                if getattr(self, name) is not None:
                    raise FieldError(name, "has no effect with mode disable; set mode or remove it")
        return self


class TargetGroupConfig(_Model):
    connection_pool_config: ConnectionPoolConfig = ConnectionPoolConfig()
    targets: list[Target] = Field(min_length=1)
    # Seconds between probes of each target's role and health (sub-second allowed).
    probe_interval: float = Field(1.0, gt=0, le=3600)
    tls: TargetTls = TargetTls()
    # A password the database asks for in cleartext (PostgreSQL password auth, MySQL
    # mysql_clear_password) is sent only over TLS unless this is true.
    allow_cleartext_password: bool = False
    # MySQL caching_sha2_password: the servers' RSA public key (PEM), to send the password
    # encrypted without TLS; the proxy never asks a server for it over plaintext.
    server_public_key_file: Path | None = None


class Endpoint(_Model):
    name: str
    listen: Address
    target_role: TargetRole = TargetRole.READ_WRITE
    # READ_ONLY only: seconds of replication lag above which a replica is skipped (none:
    # no limit), and whether the writer serves the endpoint (its sessions read-only by
    # default) while no replica can.
    max_replica_lag: float | None = Field(None, gt=0)
    fallback_to_writer: bool = False

    _listen = field_validator("listen", mode="before")(_address)

    @model_validator(mode="after")
    def _replica_settings_need_replicas(self) -> Endpoint:
        if self.target_role is TargetRole.READ_WRITE:
            if self.max_replica_lag is not None:
                raise FieldError("max_replica_lag", "applies to READ_ONLY endpoints only")
            if self.fallback_to_writer:
                raise FieldError("fallback_to_writer", "applies to READ_ONLY endpoints only")
        return self


class ProxyConfig(_Model):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    engine_family: str  # a key of dbmux.engines.ENGINES
    listen: Address
    require_tls: bool = False  # plaintext clients are refused before any password is exchanged
    tls: ClientTls | None = None
    # Signed auth tokens, for the auth entries with iam_auth REQUIRED or ENABLED.
    auth_tokens: AuthTokens | None = None
    idle_client_timeout: float = Field(1800, gt=0)
    # Time a client may take from TCP connect to proving its password before it is dropped
    # (waiting for a server connection after that is connection_borrow_timeout's).
    client_login_timeout: float = Field(15, gt=0)
    # Connections that have not proved a password yet, bounded apart from
    # max_client_connections: one more drops the oldest of them.
    max_pending_logins: int = Field(1000, ge=1)
    # Failed logins slow down after five per user or per source address: each later one
    # waits twice as long as the one before, up to this many seconds (0: no slow-down);
    # the waits count against client_login_timeout.
    max_login_failure_delay: float = Field(5, ge=0)
    debug_logging: bool = False
    session_state: SessionState = SessionState.REPLAY
    max_client_connections: int = Field(10000, ge=1)
    # MySQL: bytes of one command the proxy buffers before it forwards it; a bigger one is
    # refused (ERR 1153) and the connection closed. None: the server's max_allowed_packet.
    max_command_size: int | None = Field(None, ge=1024, le=1 << 30)
    # MySQL: the RSA private key (PEM, at least 2048 bits; relative to the config's folder)
    # of caching_sha2_password full authentication without TLS, whose public half clients
    # may pin. None: one generated once and kept in state_dir.
    rsa_private_key_file: Path | None = None
    auth: list[AuthEntry] = Field(min_length=1)
    target_group: TargetGroupConfig
    endpoints: list[Endpoint] = []
    # What died with a server connection runs again on the next writer when that is safe:
    # MySQL whole open transactions, PostgreSQL a read in flight (engines/*/replay.py).
    transaction_replay: bool = False
    # The query latency histograms (QueryResponseLatency, QueryDatabaseResponseLatency): two
    # clock reads per request. Off, they stay empty; every other metric is kept.
    latency_histograms: bool = True

    _listen = field_validator("listen", mode="before")(_address)

    @field_validator("engine_family")
    @classmethod
    def _registered_engine(cls, family: str) -> str:
        if family not in ENGINES:
            raise ValueError(f"unknown engine family {family!r}; use one of {', '.join(ENGINES)}")
        return family

    @model_validator(mode="after")
    def _only_what_exists(self) -> ProxyConfig:
        """Settings that cannot work without another are refused, never silently ignored: a
        proxy told to require TLS must not accept plaintext, and a token (a cleartext
        password) must not travel without TLS."""
        if self.require_tls and self.tls is None:
            raise FieldError(
                "require_tls", "needs tls (certificate_file and key_file) to offer TLS with"
            )
        if self.rsa_private_key_file is not None and self.engine_family != "MYSQL":
            raise FieldError("rsa_private_key_file", "applies to MYSQL proxies only")
        for i, entry in enumerate(self.auth):
            if entry.iam_auth is IamAuth.DISABLED:
                continue
            if self.auth_tokens is None:
                raise FieldError(
                    f"auth.{i}.iam_auth",
                    f"{entry.iam_auth.value} needs auth_tokens (public_key_files or oidc) "
                    "to check tokens with",
                )
            if self.tls is None:
                raise FieldError(
                    f"auth.{i}.iam_auth",
                    f"{entry.iam_auth.value} needs tls: a token is sent as a cleartext "
                    "password, so it is accepted over TLS only",
                )
        return self

    @model_validator(mode="after")
    def _public_key_for_mysql(self) -> ProxyConfig:
        if self.target_group.server_public_key_file is not None and self.engine_family != "MYSQL":
            raise FieldError(
                "target_group.server_public_key_file",
                "applies to engine_family MYSQL only (caching_sha2_password)",
            )
        return self

    @model_validator(mode="after")
    def _auth_types_fit_engine(self) -> ProxyConfig:
        accepted = engine_class(self.engine_family).auth_types
        for i, entry in enumerate(self.auth):
            kind = entry.client_password_auth_type
            if kind is not None and kind not in accepted:
                raise FieldError(
                    f"auth.{i}.client_password_auth_type",
                    f"{kind.value} does not fit engine_family {self.engine_family}; "
                    f"use one of {', '.join(a.value for a in accepted)}",
                )
        return self


class SecretsConfig(_Model):
    """How secrets are read again: files when they change (checked each second), AWS
    Secrets Manager every refresh_interval seconds, and a secret that could not be read
    every retry_interval seconds. A failed login also reads them again (at most every two
    seconds), so a rotated password is seen at once."""

    refresh_interval: float = Field(60, gt=0)
    retry_interval: float = Field(10, gt=0)
    # Another Secrets Manager endpoint (a VPC endpoint, or a local one for tests).
    aws_endpoint_url: str | None = None


class AdminConfig(_Model):
    """The admin HTTP listener (/metrics, /api/...): loopback by default; `token` (env:VAR or
    file:PATH, relative to the config's folder) holds the bearer token every request must
    carry, if set."""

    listen: Address = Address(host="127.0.0.1", port=9187)
    token: str | None = None

    _listen = field_validator("listen", mode="before")(_address)

    @field_validator("token")
    @classmethod
    def _token_reference(cls, value: str | None) -> str | None:
        scheme, _, rest = (value or "env:-").partition(":")
        if scheme not in ("env", "file") or not rest:
            raise ValueError("must be env:VAR or file:PATH (the token itself never goes here)")
        return value


class Config(_Model):
    admin: AdminConfig = AdminConfig()
    secrets: SecretsConfig = SecretsConfig()
    proxies: list[ProxyConfig] = Field(min_length=1)
    # Relative secret paths (file:...) resolve against the config file's folder.
    base_dir: Path = Path(".")
    # Where dbmux keeps what it generates and a restart must find again (MySQL proxies' RSA
    # keys); relative to the config's folder. None: $XDG_STATE_HOME/dbmux, by default
    # ~/.local/state/dbmux.
    state_dir: Path | None = None
    # Seconds a drain (SIGTERM, SIGINT, a proxy or listener a reload removed) lets
    # transactions under way finish before their clients are cut off.
    shutdown_timeout: float = Field(30, ge=0)
    # Processes `dbmux serve` runs, sharing the listening ports (SO_REUSEPORT) and one
    # connection budget per target. None: one per core.
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS)

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers is not None else os.cpu_count() or 1

    @property
    def state_path(self) -> Path:
        if self.state_dir is not None:
            return self.base_dir / self.state_dir
        xdg = os.environ.get("XDG_STATE_HOME", "")
        home = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
        return home / "dbmux"

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names: set[str] = set()
        for i, proxy in enumerate(self.proxies):
            if proxy.name in names:
                raise FieldError(f"proxies.{i}.name", f"proxy name {proxy.name!r} is used twice")
            names.add(proxy.name)
        listens: dict[str, str] = {}
        for path, address in self.listen_addresses():
            if address.port == 0:
                continue
            if str(address) in listens:
                raise FieldError(
                    path, f"{address} is already the listen address of {listens[str(address)]}"
                )
            listens[str(address)] = path
        return self

    def listen_addresses(self) -> list[tuple[str, Address]]:
        """Every proxy's and endpoint's listen address, with the field that names it."""
        return [
            (path, address)
            for i, proxy in enumerate(self.proxies)
            for path, address in [(f"proxies.{i}.listen", proxy.listen)]
            + [
                (f"proxies.{i}.endpoints.{j}.listen", e.listen)
                for j, e in enumerate(proxy.endpoints)
            ]
        ]

    @model_validator(mode="after")
    def _rsa_keys_usable(self) -> Config:
        for i, proxy in enumerate(self.proxies):
            if proxy.rsa_private_key_file is not None:
                try:
                    RsaKey.from_file(self.base_dir / proxy.rsa_private_key_file)
                except RsaKeyError as error:
                    raise FieldError(f"proxies.{i}.rsa_private_key_file", str(error)) from None
        return self


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        parts = [str(part) for part in item["loc"]]
        message = item["msg"]
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            parts.append(cause.path)
            message = str(cause)
        lines.append(f"  {'.'.join(parts) or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "config", base_dir: Path | None = None) -> Config:
    """Validate an already-loaded mapping; errors name each bad field by its path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'proxies' list")
    if base_dir is not None:
        data = {**data, "base_dir": base_dir}
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)
