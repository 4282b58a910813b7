"""Talking to the admin API as an operator's tools do: plain HTTP, status codes, JSON."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(url: str, method: str = "GET", token: str | None = None, **headers: str) -> Answer:
    """One request; a 4xx or 5xx is an Answer too, not an exception."""
    request = urllib.request.Request(url, method=method, headers=headers)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if method == "POST":
        request.data = b""
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read())


def get_json(url: str, token: str | None = None) -> Any:
    answer = call(url, token=token)
    assert answer.status == 200, (answer.status, answer.body)
    assert answer.headers["Content-Type"] == "application/json"
    return answer.json
