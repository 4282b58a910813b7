"""The config file: defaults of a minimal file, and for each kind of mistake a ConfigError that
names the file and the bad field by its dotted path (e.g. proxies.0.listen)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dbmux.auth.mysql import RsaKey
from dbmux.config import (
    ClientPasswordAuthType,
    ConfigError,
    IamAuth,
    PinningFilter,
    TargetRole,
    TlsMode,
    TlsVersion,
    load_config,
    parse_config,
)

SOURCE = "dbmux.yaml"


def minimal() -> dict[str, Any]:
    return {
        "proxies": [
            {
                "name": "orders",
                "engine_family": "POSTGRESQL",
                "listen": "127.0.0.1:6432",
                "auth": [{"secret": "file:secrets/app.json"}],
                "target_group": {"targets": [{"host": "127.0.0.1", "port": 5432}]},
            }
        ]
    }


def config_error(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source=SOURCE)
    return str(caught.value)


def names_path(message: str, path: str) -> bool:
    """True when `path` appears as a whole dotted path, not as a prefix of a longer one."""
    return re.search(rf"(?<![\w.]){re.escape(path)}(?![\w.])", message) is not None


# ---------------------------------------------------------------------------------------------
# A minimal valid config and its defaults


def test_minimal_config_fills_in_the_documented_defaults() -> None:
    config = parse_config(minimal())
    assert (config.admin.listen.host, config.admin.listen.port) == ("127.0.0.1", 9187)
    [proxy] = config.proxies
    assert proxy.name == "orders"
    assert proxy.engine_family == "POSTGRESQL"
    assert (proxy.listen.host, proxy.listen.port) == ("127.0.0.1", 6432)
    assert str(proxy.listen) == "127.0.0.1:6432"
    assert proxy.require_tls is False
    assert proxy.idle_client_timeout == 1800
    assert proxy.debug_logging is False
    assert proxy.max_client_connections == 10000
    assert proxy.client_login_timeout == 15
    assert proxy.max_pending_logins == 1000
    assert proxy.max_login_failure_delay == 5
    assert proxy.endpoints == []
    [auth] = proxy.auth
    assert auth.secret == "file:secrets/app.json"
    assert auth.iam_auth is IamAuth.DISABLED
    assert auth.client_password_auth_type is None
    pool = proxy.target_group.connection_pool_config
    assert pool.max_connections_percent == 100
    assert pool.max_idle_connections_percent == 50
    assert pool.connection_borrow_timeout == 120
    assert pool.session_pinning_filters == []
    assert pool.init_query == ""
    [target] = proxy.target_group.targets
    assert (target.host, target.port) == ("127.0.0.1", 5432)


@pytest.mark.parametrize(("max_percent", "idle"), [(100, 50), (80, 40), (30, 15), (2, 1)])
def test_idle_connections_default_to_half_of_max_connections(max_percent: int, idle: int) -> None:
    data = minimal()
    data["proxies"][0]["target_group"]["connection_pool_config"] = {
        "max_connections_percent": max_percent
    }
    pool = parse_config(data).proxies[0].target_group.connection_pool_config
    assert pool.max_idle_connections_percent == idle


@pytest.mark.parametrize("idle", [0, 10, 40])
def test_explicit_idle_connections_are_kept_up_to_max(idle: int) -> None:
    data = minimal()
    data["proxies"][0]["target_group"]["connection_pool_config"] = {
        "max_connections_percent": 40,
        "max_idle_connections_percent": idle,
    }
    pool = parse_config(data).proxies[0].target_group.connection_pool_config
    assert pool.max_idle_connections_percent == idle


def test_the_full_documented_example_parses() -> None:
    data = {
        "admin": {"listen": "127.0.0.1:9188"},
        "proxies": [
            {
                "name": "orders",
                "engine_family": "POSTGRESQL",
                "listen": "127.0.0.1:6432",
                "require_tls": False,
                "idle_client_timeout": 1800,
                "debug_logging": False,
                "max_client_connections": 10000,
                "auth": [
                    {
                        "secret": "file:secrets/app.json",
                        "iam_auth": "DISABLED",
                        "client_password_auth_type": "POSTGRES_SCRAM_SHA_256",
                    }
                ],
                "target_group": {
                    "connection_pool_config": {
                        "max_connections_percent": 100,
                        "max_idle_connections_percent": 50,
                        "connection_borrow_timeout": 120,
                        "session_pinning_filters": ["EXCLUDE_VARIABLE_SETS"],
                        "init_query": "SET TIME ZONE 'UTC'",
                    },
                    "targets": [{"host": "127.0.0.1", "port": 5432}],
                },
                "endpoints": [
                    {"name": "orders-ro", "listen": "127.0.0.1:6433", "target_role": "READ_ONLY"}
                ],
            },
            {
                "name": "shop",
                "engine_family": "MYSQL",
                "listen": {"host": "127.0.0.1", "port": 3307},
                "auth": [
                    {
                        "secret": "env:SHOP_SECRET",
                        "client_password_auth_type": "MYSQL_CACHING_SHA2_PASSWORD",
                    }
                ],
                "target_group": {"targets": [{"host": "db", "port": 3306}]},
            },
        ],
    }
    config = parse_config(data)
    orders, shop = config.proxies
    assert config.admin.listen.port == 9188
    assert orders.auth[0].client_password_auth_type is ClientPasswordAuthType.POSTGRES_SCRAM_SHA_256
    pool = orders.target_group.connection_pool_config
    assert pool.session_pinning_filters == [PinningFilter.EXCLUDE_VARIABLE_SETS]
    assert orders.endpoints[0].target_role is TargetRole.READ_ONLY
    assert orders.endpoints[0].listen.port == 6433
    assert shop.engine_family == "MYSQL"
    assert str(shop.listen) == "127.0.0.1:3307"


def test_the_proxy_talks_plaintext_to_its_targets_unless_told_otherwise() -> None:
    group = parse_config(minimal()).proxies[0].target_group
    assert group.tls.mode is TlsMode.DISABLE
    assert group.allow_cleartext_password is False
    assert group.server_public_key_file is None


def test_target_tls_with_every_setting() -> None:
    data = minimal()
    _proxy(data).update(engine_family="MYSQL")
    _target_tls(
        data,
        mode="verify-full",
        ca_file="certs/db-ca.pem",
        certificate_file="certs/dbmux.pem",
        key_file="certs/dbmux-key.pem",
        server_name="db.internal",
        min_version="TLSv1.3",
    )
    _proxy(data)["target_group"].update(
        allow_cleartext_password=True, server_public_key_file="certs/db-rsa.pem"
    )
    group = parse_config(data).proxies[0].target_group
    assert group.tls.mode is TlsMode.VERIFY_FULL
    assert group.tls.ca_file == Path("certs/db-ca.pem")
    assert (group.tls.certificate_file, group.tls.key_file) == (
        Path("certs/dbmux.pem"),
        Path("certs/dbmux-key.pem"),
    )
    assert group.tls.server_name == "db.internal"
    assert group.tls.min_version is TlsVersion.TLS_1_3
    assert group.allow_cleartext_password is True
    assert group.server_public_key_file == Path("certs/db-rsa.pem")


def test_require_needs_no_ca() -> None:
    data = minimal()
    _target_tls(data, mode="require")
    assert parse_config(data).proxies[0].target_group.tls.ca_file is None


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:6432", "127.0.0.1", 6432),
        ("0.0.0.0:5432", "0.0.0.0", 5432),
        ("[::1]:6432", "::1", 6432),
        (":6432", "127.0.0.1", 6432),
        ("db.internal:0", "db.internal", 0),
    ],
)
def test_listen_addresses_are_host_colon_port(listen: str, host: str, port: int) -> None:
    data = minimal()
    data["proxies"][0]["listen"] = listen
    address = parse_config(data).proxies[0].listen
    assert (address.host, address.port) == (host, port)


def test_port_zero_may_be_shared_because_each_gets_its_own_free_port() -> None:
    data = minimal()
    data["proxies"][0]["listen"] = "127.0.0.1:0"
    data["proxies"][0]["endpoints"] = [{"name": "ro", "listen": "127.0.0.1:0"}]
    second = copy.deepcopy(data["proxies"][0])
    second["name"] = "billing"
    data["proxies"].append(second)
    assert len(parse_config(data).proxies) == 2


def test_endpoint_role_defaults_to_read_write() -> None:
    data = minimal()
    data["proxies"][0]["endpoints"] = [{"name": "extra", "listen": "127.0.0.1:6440"}]
    assert parse_config(data).proxies[0].endpoints[0].target_role is TargetRole.READ_WRITE


# ---------------------------------------------------------------------------------------------
# Signed auth tokens (iam_auth)


TLS = {"certificate_file": "certs/proxy.pem", "key_file": "certs/proxy-key.pem"}
TOKENS = {"public_key_files": ["keys/tokens.pub"]}
OIDC = {"jwks_file": "jwks.json", "issuer": "https://issuer.example", "audience": "dbmux"}


@pytest.mark.parametrize("mode", ["REQUIRED", "ENABLED"])
def test_iam_auth_is_accepted_with_auth_tokens_and_tls(mode: str) -> None:
    data = minimal()
    data["proxies"][0].update(
        tls=TLS,
        auth_tokens={**TOKENS, "oidc": OIDC},
        auth=[{"secret": "file:secrets/app.json", "iam_auth": mode}],
    )
    [proxy] = parse_config(data).proxies
    assert proxy.auth[0].iam_auth is IamAuth(mode)
    tokens = proxy.auth_tokens
    assert tokens is not None
    assert tokens.public_key_files == [Path("keys/tokens.pub")]
    assert tokens.hosts == []  # the listen addresses (see TokenVerifier)
    data["proxies"][0]["auth_tokens"]["hosts"] = ["Orders.Example.COM", "::FFFF:10.0.0.1"]
    tokens = parse_config(data).proxies[0].auth_tokens
    assert tokens is not None
    assert tokens.hosts == ["orders.example.com", "10.0.0.1"]  # as tokens write them
    assert tokens.max_lifetime == 900
    assert tokens.oidc is not None
    assert (tokens.oidc.user_claim, tokens.oidc.users) == ("sub", {})


def test_auth_tokens_may_check_jwts_only() -> None:
    data = minimal()
    data["proxies"][0]["auth_tokens"] = {"oidc": {**OIDC, "users": {"system:sa:app": "app"}}}
    tokens = parse_config(data).proxies[0].auth_tokens
    assert tokens is not None
    assert tokens.public_key_files == []
    assert tokens.oidc is not None
    assert tokens.oidc.users == {"system:sa:app": "app"}


def test_iam_auth_without_auth_tokens_says_what_is_missing() -> None:
    data = minimal()
    data["proxies"][0].update(tls=TLS, auth=[{"secret": "env:A", "iam_auth": "ENABLED"}])
    assert "needs auth_tokens" in config_error(data)


def test_iam_auth_without_tls_says_tokens_travel_in_cleartext() -> None:
    data = minimal()
    data["proxies"][0].update(
        auth_tokens=TOKENS, auth=[{"secret": "env:A", "iam_auth": "REQUIRED"}]
    )
    message = config_error(data)
    assert "needs tls" in message
    assert "cleartext" in message


# ---------------------------------------------------------------------------------------------
# Each mistake is named by its dotted path

Mutation = Callable[[dict[str, Any]], None]


def _proxy(data: dict[str, Any]) -> dict[str, Any]:
    return data["proxies"][0]


def _pool(data: dict[str, Any]) -> dict[str, Any]:
    return _proxy(data)["target_group"].setdefault("connection_pool_config", {})


def _target_tls(data: dict[str, Any], **tls: Any) -> None:
    _proxy(data)["target_group"]["tls"] = tls


def _second_proxy(data: dict[str, Any], **changes: Any) -> None:
    other = copy.deepcopy(_proxy(data))
    other.update({"name": "billing", "listen": "127.0.0.1:7432", **changes})
    data["proxies"].append(other)


BAD: list[tuple[str, Mutation, str]] = [
    ("unknown top-level key", lambda d: d.update(admn={}), "admn"),
    (
        "unknown proxy key",
        lambda d: _proxy(d).update(max_connections=5),
        "proxies.0.max_connections",
    ),
    (
        "misspelt pool setting",
        lambda d: _pool(d).update(max_conections_percent=50),
        "proxies.0.target_group.connection_pool_config.max_conections_percent",
    ),
    ("unknown auth key", lambda d: _proxy(d)["auth"][0].update(user="x"), "proxies.0.auth.0.user"),
    (
        "bad engine_family",
        lambda d: _proxy(d).update(engine_family="POSTGRES"),
        "proxies.0.engine_family",
    ),
    (
        "percent over 100",
        lambda d: _pool(d).update(max_connections_percent=101),
        "proxies.0.target_group.connection_pool_config.max_connections_percent",
    ),
    (
        "percent of 0",
        lambda d: _pool(d).update(max_connections_percent=0),
        "proxies.0.target_group.connection_pool_config.max_connections_percent",
    ),
    (
        "idle percent over 100",
        lambda d: _pool(d).update(max_idle_connections_percent=150),
        "proxies.0.target_group.connection_pool_config.max_idle_connections_percent",
    ),
    (
        "idle above max",
        lambda d: _pool(d).update(max_connections_percent=40, max_idle_connections_percent=41),
        "proxies.0.target_group.connection_pool_config.max_idle_connections_percent",
    ),
    (
        "negative borrow timeout",
        lambda d: _pool(d).update(connection_borrow_timeout=-1),
        "proxies.0.target_group.connection_pool_config.connection_borrow_timeout",
    ),
    (
        "no pending login allowed",
        lambda d: _proxy(d).update(max_pending_logins=0),
        "proxies.0.max_pending_logins",
    ),
    (
        "negative login failure delay",
        lambda d: _proxy(d).update(max_login_failure_delay=-1),
        "proxies.0.max_login_failure_delay",
    ),
    (
        "login timeout of 0",
        lambda d: _proxy(d).update(client_login_timeout=0),
        "proxies.0.client_login_timeout",
    ),
    (
        "probe interval of 0",
        lambda d: _proxy(d)["target_group"].update(probe_interval=0),
        "proxies.0.target_group.probe_interval",
    ),
    (
        "unknown pinning filter",
        lambda d: _pool(d).update(session_pinning_filters=["EXCLUDE_EVERYTHING"]),
        "proxies.0.target_group.connection_pool_config.session_pinning_filters.0",
    ),
    ("listen without port", lambda d: _proxy(d).update(listen="127.0.0.1"), "proxies.0.listen"),
    (
        "listen with a bad port",
        lambda d: _proxy(d).update(listen="127.0.0.1:pg"),
        "proxies.0.listen",
    ),
    (
        "listen port too big",
        lambda d: _proxy(d).update(listen="127.0.0.1:65536"),
        "proxies.0.listen",
    ),
    (
        "endpoint listen without port",
        lambda d: _proxy(d).update(endpoints=[{"name": "ro", "listen": "localhost"}]),
        "proxies.0.endpoints.0.listen",
    ),
    (
        "bad endpoint role",
        lambda d: _proxy(d).update(
            endpoints=[{"name": "ro", "listen": "127.0.0.1:6433", "target_role": "READER"}]
        ),
        "proxies.0.endpoints.0.target_role",
    ),
    (
        "replica lag limit on a read-write endpoint",
        lambda d: _proxy(d).update(
            endpoints=[{"name": "rw", "listen": "127.0.0.1:6433", "max_replica_lag": 5}]
        ),
        "proxies.0.endpoints.0.max_replica_lag",
    ),
    (
        "writer fallback on a read-write endpoint",
        lambda d: _proxy(d).update(
            endpoints=[{"name": "rw", "listen": "127.0.0.1:6433", "fallback_to_writer": True}]
        ),
        "proxies.0.endpoints.0.fallback_to_writer",
    ),
    (
        "replica lag limit of 0",
        lambda d: _proxy(d).update(
            endpoints=[
                {
                    "name": "ro",
                    "listen": "127.0.0.1:6433",
                    "target_role": "READ_ONLY",
                    "max_replica_lag": 0,
                }
            ]
        ),
        "proxies.0.endpoints.0.max_replica_lag",
    ),
    ("admin listen without port", lambda d: d.update(admin={"listen": "0.0.0.0"}), "admin.listen"),
    (
        "secret with unknown scheme",
        lambda d: _proxy(d)["auth"][0].update(secret="vault:app"),
        "proxies.0.auth.0.secret",
    ),
    (
        "bad iam_auth",
        lambda d: _proxy(d)["auth"][0].update(iam_auth="YES"),
        "proxies.0.auth.0.iam_auth",
    ),
    (
        "iam_auth without auth_tokens",
        lambda d: _proxy(d).update(tls=TLS, auth=[{"secret": "env:A", "iam_auth": "REQUIRED"}]),
        "proxies.0.auth.0.iam_auth",
    ),
    (
        "iam_auth without tls, second entry",
        lambda d: _proxy(d).update(
            auth_tokens=TOKENS,
            auth=[{"secret": "env:A"}, {"secret": "env:B", "iam_auth": "ENABLED"}],
        ),
        "proxies.0.auth.1.iam_auth",
    ),
    (
        "auth_tokens with nothing to check tokens with",
        lambda d: _proxy(d).update(auth_tokens={"hosts": ["db.example.com"]}),
        "proxies.0.auth_tokens.public_key_files",
    ),
    (
        "token host with a port",
        lambda d: _proxy(d).update(auth_tokens={**TOKENS, "hosts": ["db.example.com:6432"]}),
        "proxies.0.auth_tokens.hosts",
    ),
    (
        "token lifetime of 0",
        lambda d: _proxy(d).update(auth_tokens={**TOKENS, "max_lifetime": 0}),
        "proxies.0.auth_tokens.max_lifetime",
    ),
    (
        "token lifetime over an hour",
        lambda d: _proxy(d).update(auth_tokens={**TOKENS, "max_lifetime": 3601}),
        "proxies.0.auth_tokens.max_lifetime",
    ),
    (
        "oidc without an issuer",
        lambda d: _proxy(d).update(
            auth_tokens={"oidc": {"jwks_file": "jwks.json", "audience": "dbmux"}}
        ),
        "proxies.0.auth_tokens.oidc.issuer",
    ),
    (
        "unknown oidc key",
        lambda d: _proxy(d).update(auth_tokens={"oidc": {**OIDC, "jwks_url": "https://x"}}),
        "proxies.0.auth_tokens.oidc.jwks_url",
    ),
    (
        "MySQL auth type on PostgreSQL",
        lambda d: _proxy(d)["auth"][0].update(client_password_auth_type="MYSQL_NATIVE_PASSWORD"),
        "proxies.0.auth.0.client_password_auth_type",
    ),
    (
        "PostgreSQL auth type on MySQL, second entry",
        lambda d: _proxy(d).update(
            engine_family="MYSQL",
            auth=[
                {"secret": "env:A"},
                {"secret": "env:B", "client_password_auth_type": "POSTGRES_MD5"},
            ],
        ),
        "proxies.0.auth.1.client_password_auth_type",
    ),
    ("bad proxy name", lambda d: _proxy(d).update(name="1 orders"), "proxies.0.name"),
    (
        "duplicate proxy names",
        lambda d: _second_proxy(d, name="orders"),
        "proxies.1.name",
    ),
    (
        "duplicate listen addresses",
        lambda d: _second_proxy(d, listen="127.0.0.1:6432"),
        "proxies.1.listen",
    ),
    (
        "endpoint on the proxy's own address",
        lambda d: _proxy(d).update(endpoints=[{"name": "ro", "listen": "127.0.0.1:6432"}]),
        "proxies.0.endpoints.0.listen",
    ),
    (
        "empty targets",
        lambda d: _proxy(d)["target_group"].update(targets=[]),
        "proxies.0.target_group.targets",
    ),
    (
        "target port 0",
        lambda d: _proxy(d)["target_group"].update(targets=[{"host": "db", "port": 0}]),
        "proxies.0.target_group.targets.0.port",
    ),
    ("missing target group", lambda d: _proxy(d).pop("target_group"), "proxies.0.target_group"),
    ("empty auth", lambda d: _proxy(d).update(auth=[]), "proxies.0.auth"),
    (
        "unknown target tls mode",
        lambda d: _target_tls(d, mode="prefer"),
        "proxies.0.target_group.tls.mode",
    ),
    (
        "verify-full without a CA",
        lambda d: _target_tls(d, mode="verify-full"),
        "proxies.0.target_group.tls.ca_file",
    ),
    (
        "verify-ca without a CA",
        lambda d: _target_tls(d, mode="verify-ca"),
        "proxies.0.target_group.tls.ca_file",
    ),
    (
        "client certificate without its key",
        lambda d: _target_tls(d, mode="require", certificate_file="dbmux.pem"),
        "proxies.0.target_group.tls.key_file",
    ),
    (
        "client key without its certificate",
        lambda d: _target_tls(d, mode="require", key_file="dbmux-key.pem"),
        "proxies.0.target_group.tls.certificate_file",
    ),
    (
        "a CA that mode disable would ignore",
        lambda d: _target_tls(d, ca_file="ca.pem"),
        "proxies.0.target_group.tls.ca_file",
    ),
    (
        "an empty server name",
        lambda d: _target_tls(d, mode="verify-full", ca_file="ca.pem", server_name=""),
        "proxies.0.target_group.tls.server_name",
    ),
    (
        "target TLS 1.1",
        lambda d: _target_tls(d, mode="require", min_version="TLSv1.1"),
        "proxies.0.target_group.tls.min_version",
    ),
    (
        "a server public key for PostgreSQL",
        lambda d: _proxy(d)["target_group"].update(server_public_key_file="server.pem"),
        "proxies.0.target_group.server_public_key_file",
    ),
    ("no proxies", lambda d: d.update(proxies=[]), "proxies"),
]


@pytest.mark.parametrize(("mutate", "path"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_config_names_the_file_and_the_field(mutate: Mutation, path: str) -> None:
    data = minimal()
    mutate(data)
    message = config_error(data)
    assert message.startswith(SOURCE)
    assert names_path(message, path), message


def test_every_bad_field_is_reported_at_once() -> None:
    data = minimal()
    _proxy(data).update(engine_family="ORACLE", listen="nowhere")
    _pool(data).update(max_connections_percent=200)
    message = config_error(data)
    for path in (
        "proxies.0.engine_family",
        "proxies.0.listen",
        "proxies.0.target_group.connection_pool_config.max_connections_percent",
    ):
        assert names_path(message, path), message


@pytest.mark.parametrize("top", [None, [], ["proxies"], "proxies", 42])
def test_top_level_must_be_a_mapping(top: Any) -> None:
    message = config_error(top)
    assert message.startswith(SOURCE)
    assert "mapping" in message


def test_duplicate_proxy_names_say_which_name() -> None:
    data = minimal()
    _second_proxy(data, name="orders")
    assert "orders" in config_error(data)


def test_duplicate_listen_addresses_say_which_address() -> None:
    data = minimal()
    _second_proxy(data, listen="127.0.0.1:6432")
    assert "127.0.0.1:6432" in config_error(data)


# ---------------------------------------------------------------------------------------------
# load_config


MINIMAL_YAML = """\
proxies:
  - name: orders
    engine_family: POSTGRESQL
    listen: 127.0.0.1:6432
    auth:
      - secret: file:secrets/app.json
    target_group:
      targets:
        - {host: 127.0.0.1, port: 5432}
"""


def test_load_config_reads_yaml_and_resolves_secrets_against_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "dbmux.yaml"
    path.parent.mkdir()
    path.write_text(MINIMAL_YAML)
    config = load_config(path)
    assert config.proxies[0].name == "orders"
    assert config.base_dir == path.parent.resolve()


def test_load_config_of_a_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_load_config_of_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("proxies: [unclosed\n  - name: x\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))) as caught:
        load_config(path)
    assert "YAML" in str(caught.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_load_config_of_a_non_mapping_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path))) as caught:
        load_config(path)
    assert "mapping" in str(caught.value)


def test_load_config_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL_YAML.replace("POSTGRESQL", "POSTGRES"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert names_path(message, "proxies.0.engine_family")


# ---------------------------------------------------------------------------------------------
# MySQL's RSA key and the state folder


def mysql_minimal() -> dict[str, Any]:
    data = minimal()
    data["proxies"][0].update(engine_family="MYSQL", listen="127.0.0.1:6033")
    return data


def test_a_configured_rsa_key_resolves_against_the_config_folder_and_is_checked_at_load(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dbmux.yaml"
    path.write_text(
        MINIMAL_YAML.replace("POSTGRESQL", "MYSQL") + "    rsa_private_key_file: keys/rsa.pem\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert names_path(message, "proxies.0.rsa_private_key_file")
    assert str(tmp_path / "keys" / "rsa.pem") in message and "cannot read" in message
    (tmp_path / "keys").mkdir()
    RsaKey.kept_in(tmp_path / "keys" / "rsa.pem")
    assert load_config(path).proxies[0].rsa_private_key_file == Path("keys/rsa.pem")


def test_an_rsa_key_on_a_postgresql_proxy_is_refused() -> None:
    data = minimal()
    data["proxies"][0]["rsa_private_key_file"] = "rsa.pem"
    assert "applies to MYSQL proxies only" in config_error(data)


def test_state_dir_defaults_to_xdg_state_home_or_the_users_local_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert parse_config(mysql_minimal()).state_path == tmp_path / "xdg" / "dbmux"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert parse_config(mysql_minimal()).state_path == Path.home() / ".local/state/dbmux"
    relative = parse_config({**mysql_minimal(), "state_dir": "state"}, base_dir=tmp_path)
    assert relative.state_path == tmp_path / "state"


@pytest.mark.parametrize("reference", ["env:DBMUX_ADMIN_TOKEN", "file:secrets/admin-token"])
def test_the_admin_token_is_a_reference(reference: str) -> None:
    config = parse_config({**minimal(), "admin": {"token": reference}})
    assert config.admin.token == reference
    assert parse_config(minimal()).admin.token is None


@pytest.mark.parametrize("token", ["hunter2", "env:", "file:", "arn:aws:secretsmanager:x"])
def test_an_admin_token_written_in_the_file_is_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**minimal(), "admin": {"token": token}})
    assert "admin.token: " in str(caught.value) and "env:VAR or file:PATH" in str(caught.value)
    assert "hunter2" not in str(caught.value)
