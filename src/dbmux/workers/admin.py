"""The admin API of several workers, served by their supervisor: each request goes to the
workers and their answers are merged as its route says (`Across`), so one address and one
/metrics describe the whole dbmux."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dbmux.admin.api import PROMETHEUS_TEXT, Across, AdminApi, Params, Reloader, Route
from dbmux.admin.http import HttpError, Request, Response
from dbmux.metrics import render

if TYPE_CHECKING:
    from dbmux.workers.supervisor import Supervisor

Answer = tuple[int, bytes, str]  # status, body, content type


class WorkersApi(AdminApi):
    """AdminApi over a Supervisor's workers."""

    def __init__(self, supervisor: Supervisor, token: str | None) -> None:
        self.supervisor = supervisor
        self.token = token

    @property
    def reloader(self) -> Reloader:
        return self.supervisor

    async def run(self, found: Route, params: Params, request: Request) -> Response:
        if found.across is Across.HERE:
            return await found.view(self, params)
        if found.across is Across.METRICS:
            snapshots = await self.supervisor.fan_out("metrics")
            snapshots.append(self.supervisor.registry.snapshot())
            return Response(200, render(snapshots).encode(), PROMETHEUS_TEXT)
        answers: list[Answer] = await self.supervisor.fan_out(
            "admin", request.method, request.path, request.body, timeout=_timeout(found)
        )
        if not answers:
            raise HttpError(503, "no worker is running")
        return merge(found.across, answers)


def _timeout(found: Route) -> float:
    """A drain answers once its clients are gone (shutdown_timeout, at most an hour)."""
    return 3600.0 if found.across is Across.SUM else 30.0


def merge(across: Across, answers: Sequence[Answer]) -> Response:
    """One response from the workers' answers to the same request."""
    ok = [a for a in answers if 200 <= a[0] < 300]
    if across is Across.FIRST or not ok:
        return Response(*answers[0])
    if across is Across.ANY:
        return Response(*ok[0])
    bodies = [json.loads(a[1]) for a in ok]
    if across is Across.CONCAT:  # {"Clients": [...]}: one list per worker
        (key,) = bodies[0]
        return Response.json(200, {key: [row for body in bodies for row in body[key]]})
    return Response.json(200, _added(bodies))


def _added(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts added up; everything else as the first worker says."""
    total = dict(bodies[0])
    for body in bodies[1:]:
        for key, value in body.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] += value
    return total
