"""A local AWS Secrets Manager (moto's server on a loopback port) for the secrets tests."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import boto3
import pytest
from moto.server import ThreadedMotoServer

REGION = "eu-west-1"


class SecretsManager:
    """A Secrets Manager endpoint, with the steps of a rotation as AWS's rotation functions
    take them (createSecret puts AWSPENDING, finishSecret moves AWSCURRENT)."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self.client: Any = boto3.client(
            "secretsmanager", region_name=REGION, endpoint_url=endpoint_url
        )

    def create(self, name: str, document: object) -> str:
        """A new secret holding `document` (JSON unless a str); its ARN."""
        text = document if isinstance(document, str) else json.dumps(document)
        arn: str = self.client.create_secret(Name=name, SecretString=text)["ARN"]
        return arn

    def put_pending(self, arn: str, document: object) -> None:
        """createSecret: a new version labelled AWSPENDING."""
        self.client.put_secret_value(
            SecretId=arn, SecretString=json.dumps(document), VersionStages=["AWSPENDING"]
        )

    def finish(self, arn: str) -> None:
        """finishSecret: AWSCURRENT moves to the pending version."""
        stages = self.client.describe_secret(SecretId=arn)["VersionIdsToStages"]
        pending = next(v for v, labels in stages.items() if "AWSPENDING" in labels)
        current = next(v for v, labels in stages.items() if "AWSCURRENT" in labels)
        self.client.update_secret_version_stage(
            SecretId=arn,
            VersionStage="AWSCURRENT",
            MoveToVersionId=pending,
            RemoveFromVersionId=current,
        )

    def current(self, arn: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            self.client.get_secret_value(SecretId=arn, VersionStage="AWSCURRENT")["SecretString"]
        )
        return document


@pytest.fixture(scope="session")
def secrets_manager() -> Iterator[SecretsManager]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with mock.patch.dict(os.environ, credentials):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield SecretsManager(f"http://{host}:{port}")
        finally:
            server.stop()
