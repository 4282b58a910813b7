"""The installed `dbmux` command, run as a user runs it: help for every command,
`check-config` telling a good file from a bad one with a one-line reason, never a traceback,
and `token-key` / `token` making keys and tokens a proxy accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from dbmux.auth.tokens import TokenVerifier
from dbmux.config import AuthTokens, parse_config
from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import RunningProxy, proxy_config

DBMUX = Path(sys.executable).with_name("dbmux")

GOOD_YAML = """\
proxies:
  - name: orders
    engine_family: POSTGRESQL
    listen: 127.0.0.1:6432
    auth:
      - secret: file:secrets/app.json
        client_password_auth_type: POSTGRES_SCRAM_SHA_256
    target_group:
      targets:
        - {host: 127.0.0.1, port: 5432}
    endpoints:
      - {name: orders-ro, listen: 127.0.0.1:6433, target_role: READ_ONLY}
"""


def dbmux(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DBMUX), *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A folder with a good config and the secret it names, relative to the config."""
    (tmp_path / "secrets").mkdir()
    secret = {"username": "app", "password": "app-secret", "engine": "postgres"}
    (tmp_path / "secrets" / "app.json").write_text(json.dumps(secret))
    (tmp_path / "dbmux.yaml").write_text(GOOD_YAML)
    return tmp_path


def test_the_script_is_installed_next_to_the_interpreter() -> None:
    assert DBMUX.exists()


def test_top_level_help_lists_every_command() -> None:
    result = dbmux("--help")
    assert result.returncode == 0, result.stderr
    commands = ("serve", "check-config", "describe", "token", "token-key", "rsa-public-key", "demo")
    for command in commands:
        assert command in result.stdout


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ("serve", ["--config", "--log-level"]),
        ("check-config", ["FILE"]),
        ("token", ["--host", "--port", "--user", "--key", "--lifetime", "900"]),
        ("token-key", ["--private", "--public", "0600"]),
        ("describe", ["proxies", "targets", "clients", "servers", "--admin", "--token"]),
        ("demo", ["--clients", "--skip-mysql", "--skip-failover", "--no-tls"]),
    ],
)
def test_command_help(command: str, mentions: list[str]) -> None:
    result = dbmux(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"dbmux {command}" in result.stdout
    for word in mentions:
        assert word in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = dbmux()
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_check_config_on_a_good_file_prints_a_summary_and_ok(config_dir: Path) -> None:
    path = config_dir / "dbmux.yaml"
    result = dbmux("check-config", str(path))
    assert result.returncode == 0, result.stderr
    summary, endpoint, ok = result.stdout.strip().splitlines()
    assert "orders" in summary
    assert "POSTGRESQL" in summary
    assert "127.0.0.1:6432" in summary
    assert "127.0.0.1:5432" in summary
    assert "app" in summary
    assert endpoint.split() == ["endpoint", "orders-ro:", "READ_ONLY", "on", "127.0.0.1:6433"]
    assert ok.startswith(f"{path}: OK (") and " worker" in ok


def test_check_config_refuses_port_0_with_several_workers(config_dir: Path) -> None:
    """Each worker would get a port of its own: the error names the field and the way out."""
    path = config_dir / "dbmux.yaml"
    path.write_text(GOOD_YAML.replace("127.0.0.1:6432", "127.0.0.1:0") + "workers: 2\n")
    result = dbmux("check-config", str(path))
    assert result.returncode == 1
    assert "proxies.0.listen: port 0 with 2 workers" in result.stderr
    assert "workers: 1" in result.stderr
    path.write_text(GOOD_YAML.replace("127.0.0.1:6432", "127.0.0.1:0") + "workers: 1\n")
    assert dbmux("check-config", str(path)).stdout.strip().endswith("OK (1 worker)")


def test_check_config_resolves_secrets_against_the_config_folder(
    config_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = dbmux("check-config", str(config_dir / "dbmux.yaml"), cwd=elsewhere)
    assert result.returncode == 0, result.stderr


def test_check_config_on_a_bad_file_names_the_field_without_a_traceback(
    config_dir: Path,
) -> None:
    path = config_dir / "dbmux.yaml"
    path.write_text(GOOD_YAML.replace("POSTGRESQL", "POSTGRES").replace("6433", "none"))
    result = dbmux("check-config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert str(path) in result.stderr
    assert "proxies.0.engine_family" in result.stderr
    assert "proxies.0.endpoints.0.listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_with_a_missing_secret_names_the_secret(config_dir: Path) -> None:
    (config_dir / "secrets" / "app.json").unlink()
    result = dbmux("check-config", str(config_dir / "dbmux.yaml"))
    assert result.returncode == 1
    assert "file:secrets/app.json" in result.stderr
    assert "OK" not in result.stdout
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    result = dbmux("check-config", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_rsa_public_key_prints_the_key_mysql_clients_pin_the_same_every_time(
    config_dir: Path,
) -> None:
    """The key is generated and kept in state_dir the first time (by this command or by
    serve), so what an operator hands to clients stays valid across restarts."""
    mysql = GOOD_YAML.replace("POSTGRESQL", "MYSQL").replace("POSTGRES_SCRAM_SHA_256", "")
    (config_dir / "my.yaml").write_text("state_dir: state\n" + mysql)
    first = dbmux("rsa-public-key", str(config_dir / "my.yaml"))
    assert first.returncode == 0, first.stderr
    assert f"# proxy orders: {config_dir / 'state' / 'orders.mysql-rsa-key.pem'}" in first.stdout
    assert "-----BEGIN PUBLIC KEY-----" in first.stdout
    assert dbmux("rsa-public-key", str(config_dir / "my.yaml")).stdout == first.stdout


def test_rsa_public_key_of_a_config_without_mysql_proxies_exits_1(config_dir: Path) -> None:
    result = dbmux("rsa-public-key", str(config_dir / "dbmux.yaml"))
    assert result.returncode == 1
    assert "has no MYSQL proxy" in result.stderr


# ---------------------------------------------------------------------------------------------
# token-key and token


def make_keys(folder: Path) -> tuple[Path, Path, str]:
    private, public = folder / "tokens.pem", folder / "tokens.pub"
    result = dbmux("token-key", "--private", str(private), "--public", str(public))
    assert result.returncode == 0, result.stderr
    return private, public, result.stdout


def test_token_key_writes_a_key_pair_with_the_private_half_kept_to_its_owner(
    tmp_path: Path,
) -> None:
    private, public, said = make_keys(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    verifier = TokenVerifier(
        AuthTokens(public_key_files=[public]), listen_hosts=[], base_dir=tmp_path
    )
    [key_id] = verifier.keys
    assert f"key id {key_id}" in said
    assert "public_key_files" in said


def test_token_key_never_overwrites_a_key(tmp_path: Path) -> None:
    private, _, _ = make_keys(tmp_path)
    before = private.read_bytes()
    result = dbmux("token-key", "--private", str(private), "--public", str(tmp_path / "x.pub"))
    assert result.returncode == 1
    assert str(private) in result.stderr
    assert "Traceback" not in result.stderr
    assert private.read_bytes() == before


def test_token_prints_one_token_the_proxy_accepts(tmp_path: Path) -> None:
    private, public, _ = make_keys(tmp_path)
    result = dbmux(
        "token", "--host", "db.example.com", "--port", "6432", "--user", "app",
        "--key", str(private),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = result.stdout.removesuffix("\n")
    assert "\n" not in token
    assert token.startswith("db.example.com:6432/?Action=connect&DBUser=app&")
    verifier = TokenVerifier(
        AuthTokens(public_key_files=[public], hosts=["db.example.com"]),
        listen_hosts=[],
        base_dir=tmp_path,
    )
    verifier.verify(token, host="10.0.0.1", port=6432, user="app")


def test_token_lifetime_is_written_into_the_token(tmp_path: Path) -> None:
    private, _, _ = make_keys(tmp_path)
    result = dbmux(
        "token", "--hostname", "127.0.0.1", "--port", "6432", "--username", "app",
        "--key", str(private), "--lifetime", "60",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "&Expires=60&" in result.stdout


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        (["--lifetime", "0"], "lifetime"),
        (["--port", "0"], "port"),
        (["--host", "no such host"], "host"),
        (["--key", "absent.pem"], "absent.pem"),
    ],
)
def test_token_with_a_bad_argument_says_which_without_a_traceback(
    tmp_path: Path, change: list[str], mentions: str
) -> None:
    private, _, _ = make_keys(tmp_path)
    arguments = {"--host": "127.0.0.1", "--port": "6432", "--user": "app", "--key": str(private)}
    arguments[change[0]] = str(tmp_path / change[1]) if change[0] == "--key" else change[1]
    result = dbmux("token", *[word for pair in arguments.items() for word in pair])
    assert result.returncode == 1
    assert result.stdout == ""
    assert mentions in result.stderr
    assert "Traceback" not in result.stderr


TOKENS_YAML = """\
    tls: {certificate_file: proxy.pem, key_file: proxy-key.pem}
    auth_tokens:
      public_key_files: [keys/tokens.pub]
      hosts: [orders.db.example.com]
"""


def test_check_config_reads_the_token_keys_and_names_them(config_dir: Path) -> None:
    (config_dir / "keys").mkdir()
    _, _, said = make_keys(config_dir / "keys")
    key_id = said.split()[2].rstrip(":")
    path = config_dir / "dbmux.yaml"
    path.write_text(
        GOOD_YAML.replace("    auth:\n", TOKENS_YAML + "    auth:\n").replace(
            "client_password_auth_type: POSTGRES_SCRAM_SHA_256", "iam_auth: REQUIRED"
        )
    )
    result = dbmux("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"  auth tokens: Ed25519 keys {key_id}; hosts orders.db.example.com" in result.stdout

    (config_dir / "keys" / "tokens.pub").unlink()
    result = dbmux("check-config", str(path))
    assert result.returncode == 1
    assert "tokens.pub" in result.stderr
    assert "Traceback" not in result.stderr


# -- dbmux describe: a running dbmux's admin API as tables -----------------------------------


def table_rows(output: str) -> list[list[str]]:
    """The rows under the header line, split into cells."""
    return [line.split() for line in output.splitlines()[1:]]


def test_describe_proxies_prints_one_row_per_proxy(proxy: RunningProxy) -> None:
    result = dbmux("describe", "--admin", proxy.embedded.admin_url)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "ENGINE", "STATUS", "ENDPOINT"]
    (row,) = rows
    assert row.split()[:4] == ["test", "POSTGRESQL", "available", f"{proxy.host}:{proxy.port}"]
    assert "app-secret" not in result.stdout


def test_describe_targets_shows_role_and_health(proxy: RunningProxy, pg: PostgresCluster) -> None:
    result = dbmux("describe", "targets", "--admin", proxy.embedded.admin_url)
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout) == [
        ["test", pg.host, str(pg.port), "READ_WRITE", "AVAILABLE", "-", "-"]
    ]


def test_describe_clients_lists_each_connected_client(proxy: RunningProxy) -> None:
    with (
        psycopg.connect(proxy.url(), autocommit=True) as idle,
        psycopg.connect(proxy.url(), autocommit=True) as pinned,
    ):
        idle.execute("SELECT 1")
        pinned.execute("LISTEN news")
        result = dbmux("describe", "clients", "--admin", proxy.embedded.admin_url)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert len(rows) == 2
    assert {(r[4], r[5], r[6], r[7]) for r in rows} == {
        ("app", "app", "idle", "-"),
        ("app", "app", "pinned", "listen"),
    }


def test_describe_finds_the_admin_api_and_its_token_through_the_config(
    pg: PostgresCluster, tmp_path: Path
) -> None:
    (tmp_path / "admin-token").write_text("describe-token-42\n")
    config = proxy_config(pg, tmp_path, {}, [])
    config["admin"] = {"listen": "127.0.0.1:0", "token": "file:admin-token"}
    with EmbeddedDbmux(parse_config(config, base_dir=tmp_path)) as running:
        host, port = running.process.admin_address
        config["admin"]["listen"] = f"{host}:{port}"
        path = tmp_path / "dbmux.yaml"
        path.write_text(json.dumps(config))
        result = dbmux("describe", "servers", "--config", str(path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [
            "PROXY",
            "ID",
            "TARGET",
            "USER",
            "DATABASE",
            "STATE",
            "AGE",
            "CLIENT",
        ]
        refused = dbmux("describe", "--admin", f"http://{host}:{port}")
    assert refused.returncode == 1
    assert "401" in refused.stderr and "Traceback" not in refused.stderr
    assert "describe-token-42" not in refused.stderr


def test_describe_without_a_running_dbmux_says_so(tmp_path: Path) -> None:
    result = dbmux("describe", "--admin", "http://127.0.0.1:1")
    assert result.returncode == 1
    assert "cannot reach the admin API at http://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_describe_never_takes_the_token_itself_on_the_command_line() -> None:
    result = dbmux("describe", "--admin", "http://127.0.0.1:1", "--token", "s3cret")
    assert result.returncode == 2
    assert "env:VAR or file:PATH" in result.stderr
