"""Secrets providers: a `secret:` reference (file:PATH, env:VAR, arn:...) becomes database
credentials, and every failure is a SecretError naming the reference as written in the
config, so the operator knows which entry to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbmux.auth.secrets import Credentials, SecretError, parse_secret, read_secret

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
# Other schemes


def test_aws_secrets_manager_is_not_supported_yet() -> None:
    reference = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:orders-AbCdEf"
    assert "not supported" in secret_error(reference)


@pytest.mark.parametrize("reference", ["vault:app", "app.json", "FILE:app.json"])
def test_unknown_scheme_names_the_reference(reference: str) -> None:
    secret_error(reference)
