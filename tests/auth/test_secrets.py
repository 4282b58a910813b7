"""Secrets providers: a `secret:` reference (file:PATH, env:VAR, arn:...) becomes database
credentials, and every failure is a SecretError naming the reference as written in the
config, so the operator knows which entry to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbmux.auth.secrets import (
    Credentials,
    SecretError,
    SecretVersions,
    parse_secret,
    read_secret,
    secret_source,
)
from tests.auth.conftest import REGION, SecretsManager

APP = {"username": "app", "password": "app-secret", "engine": "postgres"}


def write_secret(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def secret_error(reference: str, base_dir: Path = Path(".")) -> str:
    with pytest.raises(SecretError) as caught:
        read_secret(reference, base_dir=base_dir)
    message = str(caught.value)
    assert reference in message
    return message


# ---------------------------------------------------------------------------------------------
# file:


def test_file_reference_is_relative_to_the_base_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_secret(tmp_path / "conf" / "secrets" / "app.json", APP)
    monkeypatch.chdir(tmp_path)  # not where the relative path points
    credentials = read_secret("file:secrets/app.json", base_dir=tmp_path / "conf")
    assert credentials == Credentials("app", "app-secret", "postgres")


def test_absolute_file_reference_ignores_the_base_dir(tmp_path: Path) -> None:
    write_secret(tmp_path / "app.json", APP)
    credentials = read_secret(f"file:{tmp_path / 'app.json'}", base_dir=tmp_path / "elsewhere")
    assert credentials.username == "app"


def test_missing_file_names_the_reference_and_the_resolved_path(tmp_path: Path) -> None:
    message = secret_error("file:secrets/absent.json", base_dir=tmp_path)
    assert str(tmp_path / "secrets" / "absent.json") in message


def test_directory_instead_of_file_is_a_secret_error(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    secret_error("file:secrets", base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# env:


def test_env_reference_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBMUX_TEST_SECRET", json.dumps(APP))
    assert read_secret("env:DBMUX_TEST_SECRET") == Credentials("app", "app-secret", "postgres")


def test_missing_env_var_names_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBMUX_TEST_ABSENT", raising=False)
    message = secret_error("env:DBMUX_TEST_ABSENT")
    assert "not set" in message


def test_invalid_json_in_env_names_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBMUX_TEST_SECRET", "username=app")
    assert "JSON" in secret_error("env:DBMUX_TEST_SECRET")


# ---------------------------------------------------------------------------------------------
# The document itself


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        pytest.param("{not json", "JSON", id="invalid-json"),
        pytest.param("", "JSON", id="empty-file"),
        pytest.param(["app", "secret"], "object", id="array"),
        pytest.param("null", "object", id="null"),
        pytest.param({"password": "x"}, "username", id="no-username"),
        pytest.param({"username": "", "password": "x"}, "username", id="empty-username"),
        pytest.param({"username": 7, "password": "x"}, "username", id="numeric-username"),
        pytest.param({"username": "app"}, "password", id="no-password"),
        pytest.param({"username": "app", "password": None}, "password", id="null-password"),
        pytest.param({"username": "app", "password": 1234}, "password", id="numeric-password"),
    ],
)
def test_unusable_secret_documents_name_the_reference_and_the_problem(
    tmp_path: Path, content: object, complaint: str
) -> None:
    write_secret(tmp_path / "bad.json", content)
    assert complaint in secret_error("file:bad.json", base_dir=tmp_path)


def test_engine_is_optional_and_extra_keys_are_ignored() -> None:
    text = json.dumps({"username": "app", "password": "pw", "host": "db", "port": 5432})
    assert parse_secret(text, source="test") == Credentials("app", "pw", "")


def test_non_string_engine_is_ignored() -> None:
    text = json.dumps({"username": "app", "password": "pw", "engine": 5})
    assert parse_secret(text, source="test").engine == ""


def test_parse_secret_errors_name_the_source() -> None:
    with pytest.raises(SecretError, match=r"^my-source: "):
        parse_secret("[]", source="my-source")


# ---------------------------------------------------------------------------------------------
# What changes, and what is never shown


def test_a_file_secret_changes_its_stamp_when_rewritten(tmp_path: Path) -> None:
    write_secret(tmp_path / "app.json", APP)
    source = secret_source("file:app.json", base_dir=tmp_path)
    before = source.stamp()
    write_secret(tmp_path / "app.json", {**APP, "password": "rotated-password-1"})
    assert source.stamp() != before
    assert source.fetch().current.password == "rotated-password-1"


def test_a_secret_file_others_can_read_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_secret(tmp_path / "app.json", APP)
    (tmp_path / "app.json").chmod(0o644)
    assert read_secret("file:app.json", base_dir=tmp_path).username == "app"
    assert any("can be read by other users" in r.getMessage() for r in caplog.records)
    caplog.clear()
    (tmp_path / "app.json").chmod(0o600)
    write_secret(tmp_path / "private.json", APP)
    (tmp_path / "private.json").chmod(0o600)
    read_secret("file:private.json", base_dir=tmp_path)
    assert not any("other users" in r.getMessage() for r in caplog.records)


def test_credentials_never_show_their_password() -> None:
    credentials = Credentials("app", "hunter2-do-not-print")
    assert "hunter2" not in repr(credentials)
    assert "hunter2" not in str(SecretVersions(credentials, credentials))


def test_a_malformed_secret_names_the_problem_not_the_contents(tmp_path: Path) -> None:
    write_secret(tmp_path / "bad.json", '{"username": "app", "password": "hunter2-leak"')
    message = secret_error("file:bad.json", base_dir=tmp_path)
    assert "hunter2" not in message


# ---------------------------------------------------------------------------------------------
# AWS Secrets Manager (moto's server, on a loopback port)


def test_an_aws_secret_gives_awscurrent_and_during_a_rotation_awspending(
    secrets_manager: SecretsManager,
) -> None:
    arn = secrets_manager.create("orders-app", APP)
    source = secret_source(arn, aws_endpoint_url=secrets_manager.endpoint_url)
    assert source.fetch() == SecretVersions(Credentials("app", "app-secret", "postgres"))
    secrets_manager.put_pending(arn, {**APP, "password": "next-password"})
    versions = source.fetch()
    assert versions.current.password == "app-secret"
    assert versions.pending is not None and versions.pending.password == "next-password"
    assert [c.password for c in versions.all] == ["app-secret", "next-password"]
    secrets_manager.finish(arn)
    versions = source.fetch()
    assert versions.current.password == "next-password"
    assert [c.password for c in versions.all] == ["next-password"]  # pending is current


def test_an_aws_secret_that_does_not_exist_names_the_reference(
    secrets_manager: SecretsManager,
) -> None:
    arn = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:absent-AbCdEf"
    with pytest.raises(SecretError) as caught:
        read_secret(arn, aws_endpoint_url=secrets_manager.endpoint_url)
    assert arn in str(caught.value) and "no such secret" in str(caught.value)


def test_an_aws_secret_holding_no_credentials_is_a_secret_error(
    secrets_manager: SecretsManager,
) -> None:
    arn = secrets_manager.create("orders-garbage", "not json at all")
    with pytest.raises(SecretError, match="not valid JSON"):
        read_secret(arn, aws_endpoint_url=secrets_manager.endpoint_url)


def test_an_unreachable_secrets_manager_is_a_secret_error() -> None:
    arn = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:orders-AbCdEf"
    with pytest.raises(SecretError) as caught:
        read_secret(arn, aws_endpoint_url="http://127.0.0.1:9")  # nothing listens there
    assert arn in str(caught.value)


@pytest.mark.parametrize(
    "reference", ["arn:aws:secretsmanager:", "arn:aws:secretsmanager::1:secret:x"]
)
def test_an_arn_without_region_or_name_is_refused(reference: str) -> None:
    secret_error(reference)


@pytest.mark.parametrize("reference", ["vault:app", "app.json", "FILE:app.json"])
def test_unknown_scheme_names_the_reference(reference: str) -> None:
    secret_error(reference)
