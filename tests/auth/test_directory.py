"""The users a proxy knows, kept current as their secrets rotate; a secret that cannot be
used costs its own users only, and says why without saying what it holds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbmux.auth.directory import REREAD_AFTER_FAILURE, UserDirectory
from dbmux.auth.secrets import Credentials, FileSecret
from dbmux.config import AuthEntry, ClientPasswordAuthType, SecretsConfig
from dbmux.targets import HealthReason
from dbmux.testing.embedded import EmbeddedDbmux
from tests.auth.conftest import SecretsManager
from tests.conftest import APP_PASSWORD, APP_USER, proxy_config, wait_until

MD5 = ClientPasswordAuthType.POSTGRES_MD5
SCRAM = ClientPasswordAuthType.POSTGRES_SCRAM_SHA_256


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def directory_of(
    tmp_path: Path, *docs: object, types: tuple[Any, ...] = (), clock: Clock | None = None
) -> UserDirectory:
    entries = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"secret-{i}.json"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        path.chmod(0o600)
        kind = types[i] if i < len(types) else None
        entries.append(
            (
                AuthEntry(secret=f"file:{path}", client_password_auth_type=kind),
                FileSecret(f"file:{path}", path),
            )
        )
    directory = UserDirectory(entries, SecretsConfig(), clock or Clock())
    directory.load()
    return directory


def rewrite(tmp_path: Path, i: int, doc: object) -> None:
    (tmp_path / f"secret-{i}.json").write_text(json.dumps(doc))


def test_each_entry_gives_its_user_and_the_credentials_to_log_in_with(tmp_path: Path) -> None:
    directory = directory_of(
        tmp_path, {"username": "a", "password": "pa"}, {"username": "b", "password": "pb"}
    )
    user = directory.get("a")
    assert user is not None and user.passwords == ("pa",)
    assert directory.logins("b") == (Credentials("b", "pb"),)
    assert directory.get("c") is None and directory.logins("c") == ()


def test_no_repr_of_a_user_or_its_logins_shows_a_password(tmp_path: Path) -> None:
    directory = directory_of(tmp_path, {"username": "a", "password": "hunter2-in-repr"})
    shown = repr(directory.get("a")) + repr(directory.logins("a")) + repr(directory._entries)
    assert "hunter2" not in shown


def test_a_changed_file_is_read_again_and_changes_the_version(tmp_path: Path) -> None:
    directory = directory_of(tmp_path, {"username": "a", "password": "old"})
    version = directory.version
    assert not asyncio.run(directory.refresh())  # nothing changed
    rewrite(tmp_path, 0, {"username": "a", "password": "new"})
    assert asyncio.run(directory.refresh())
    user = directory.get("a")
    assert user is not None and user.passwords == ("new",)
    assert directory.version != version


def test_a_secret_that_cannot_be_read_leaves_its_users_out_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = directory_of(
        tmp_path,
        '{"username": "a", "password": "hunter2-partial',
        {"username": "b", "password": "pb"},
    )
    assert directory.get("a") is None and directory.get("b") is not None
    assert len(directory.problems) == 1 and "not valid JSON" in directory.problems[0]
    assert "hunter2" not in directory.problems[0]
    assert all("hunter2" not in r.getMessage() for r in caplog.records)
    rewrite(tmp_path, 0, {"username": "a", "password": "pa"})
    assert asyncio.run(directory.refresh())  # fixed: read again (stamps moved)
    assert directory.get("a") is not None and directory.problems == []


def test_credentials_once_read_stay_in_use_while_the_secret_cannot_be_read(
    tmp_path: Path,
) -> None:
    directory = directory_of(tmp_path, {"username": "a", "password": "pa"})
    (tmp_path / "secret-0.json").write_text("{")
    asyncio.run(directory.refresh())
    user = directory.get("a")
    assert user is not None and user.passwords == ("pa",)
    assert directory.problems  # but the problem is reported


def test_a_failed_login_reads_the_secrets_again_but_not_more_often_than_every_2_s(
    tmp_path: Path,
) -> None:
    clock = Clock()
    directory = directory_of(tmp_path, {"username": "a", "password": "old"}, clock=clock)
    rewrite(tmp_path, 0, {"username": "a", "password": "new"})
    assert asyncio.run(directory.reread_after_failure())
    rewrite(tmp_path, 0, {"username": "a", "password": "newer"})
    assert not asyncio.run(directory.reread_after_failure())  # too soon
    clock.now += REREAD_AFTER_FAILURE
    assert asyncio.run(directory.reread_after_failure())
    user = directory.get("a")
    assert user is not None and user.passwords == ("newer",)


def test_the_database_login_that_worked_is_tried_first(tmp_path: Path) -> None:
    directory = directory_of(tmp_path, {"username": "a", "password": "one"})
    directory._entries[0].versions = type(directory._entries[0].versions)(  # a rotation
        Credentials("a", "one"), Credentials("a", "two")
    )
    directory._rebuild()
    assert [c.password for c in directory.logins("a")] == ["one", "two"]
    directory.worked(Credentials("a", "two"))
    assert [c.password for c in directory.logins("a")] == ["two", "one"]


def test_a_name_no_entry_holds_is_asked_for_a_configured_method_fixed_per_name(
    tmp_path: Path,
) -> None:
    directory = directory_of(
        tmp_path,
        {"username": "md5user", "password": "p"},
        {"username": "scramuser", "password": "p"},
        types=(MD5, SCRAM),
    )
    assert directory.method_for("md5user").auth_type is MD5
    assert directory.method_for("scramuser").auth_type is SCRAM
    unknown = {
        name: directory.method_for(name).auth_type for name in (f"nobody{i}" for i in range(64))
    }
    assert set(unknown.values()) == {MD5, SCRAM}  # either, so neither tells who exists
    assert all(directory.method_for(name).auth_type is kind for name, kind in unknown.items())


def test_two_entries_with_one_user_name_keep_the_first(tmp_path: Path) -> None:
    directory = directory_of(
        tmp_path, {"username": "a", "password": "first"}, {"username": "a", "password": "second"}
    )
    user = directory.get("a")
    assert user is not None and user.passwords == ("first",)


# ---------------------------------------------------------------------------------------------
# Through the proxy


def test_a_proxy_whose_secret_is_malformed_starts_refuses_logins_and_reports_auth_failure(
    start_proxy: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"username": APP_USER}))  # no password
    bad.chmod(0o600)
    proxy = start_proxy(auth=[{"secret": f"file:{bad}"}])
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(proxy.url(), connect_timeout=10)
    assert "password authentication failed" in str(refused.value)
    instance = proxy.embedded.proxy().targets.instances[0]
    wait_until(lambda: instance.reason is HealthReason.AUTH_FAILURE, "AUTH_FAILURE reported")
    assert "missing or non-string 'password'" in instance.description
    assert any("cannot be used" in r.getMessage() for r in caplog.records)
    # Fixed in place: the proxy reads it again and serves.
    bad.write_text(json.dumps({"username": APP_USER, "password": APP_PASSWORD}))
    wait_until(lambda: proxy.embedded.proxy().users.get(APP_USER) is not None, "secret read")
    with psycopg.connect(proxy.url(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_client_with_a_password_the_proxy_has_not_read_yet_gets_in(
    start_proxy: Any, tmp_path: Path, pg: Any, pg_role: str
) -> None:
    """The file changes and the client logs in with the new password before the janitor's
    next look: the failed check reads the secret again."""
    pg.create_user(pg_role, "before-rotation")
    secret = tmp_path / "role.json"
    secret.write_text(json.dumps({"username": pg_role, "password": "before-rotation"}))
    secret.chmod(0o600)
    proxy = start_proxy(auth=[{"secret": f"file:{secret}"}])
    secret.write_text(json.dumps({"username": pg_role, "password": "after-rotation"}))
    pg.psql(f"ALTER ROLE \"{pg_role}\" PASSWORD 'after-rotation'")
    url = proxy.url(user=pg_role, password="after-rotation", db="postgres")
    with psycopg.connect(url, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (pg_role,)


def test_an_aws_secret_in_a_rotation_accepts_both_passwords(
    secrets_manager: SecretsManager, pg: Any, pg_role: str, tmp_path: Path
) -> None:
    pg.create_user(pg_role, "current-pw")
    arn = secrets_manager.create(pg_role, {"username": pg_role, "password": "current-pw"})
    secrets_manager.put_pending(arn, {"username": pg_role, "password": "pending-pw"})
    config = proxy_config(pg, tmp_path, {}, [{"secret": arn}])
    config["secrets"] = {"aws_endpoint_url": secrets_manager.endpoint_url}
    with EmbeddedDbmux(config) as dbmux:
        host, port = dbmux.address()
        for password in ("current-pw", "pending-pw"):
            url = f"postgresql://{pg_role}:{password}@{host}:{port}/postgres"
            with psycopg.connect(url, connect_timeout=10) as conn:
                assert conn.execute("SELECT current_user").fetchone() == (pg_role,)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"postgresql://{pg_role}:other@{host}:{port}/postgres")
