"""The admin API's routes: /metrics, /api/... and /api/openapi.json, behind the optional
bearer token.

A browser on the operator's machine can reach a loopback listener too, so requests a web
page could forge are refused: any request whose Origin is not the listener's own, and,
without a token, any whose Host is a name other than localhost (DNS rebinding). A client
with the token (curl, Prometheus, `dbmux describe`) is not a browser's forgery: a page
cannot make a browser send an Authorization header cross-origin without a preflight this
API never allows.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from dbmux.admin import views
from dbmux.admin.dashboard import dashboard_page
from dbmux.admin.http import HttpError, Request, Response
from dbmux.admin.openapi import openapi_document

if TYPE_CHECKING:
    from dbmux.proxy import Process, Proxy

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
MAX_ID_DIGITS = 18

Params = dict[str, str]
View = Callable[["AdminApi", Params], Awaitable[Response]]


class Reloader(Protocol):
    async def reload(self) -> dict[str, Any]: ...


class Across(StrEnum):
    """How a route is answered when several workers run (dbmux.workers.admin)."""

    HERE = "here"  # by the supervisor itself (the page, the document, a reload)
    METRICS = "metrics"  # every worker's metrics, merged
    FIRST = "first"  # by one worker: what all of them know alike (settings, targets)
    CONCAT = "concat"  # every worker's list, joined (clients, servers)
    ANY = "any"  # by the worker that has it (a client), else a 404
    SUM = "sum"  # by every worker, their counts added (pause, resume, drain)


@dataclass(frozen=True)
class Route:
    method: str
    pattern: tuple[str, ...]  # path segments; "{name}" takes any one segment
    view: View
    public: bool = False  # answered without the token: it holds no data (the dashboard page)
    across: Across = Across.FIRST

    def match(self, segments: list[str]) -> Params | None:
        if len(segments) != len(self.pattern):
            return None
        params: Params = {}
        for want, got in zip(self.pattern, segments, strict=True):
            if want.startswith("{"):
                params[want.strip("{}")] = got
            elif want != got:
                return None
        return params


ROUTES: list[Route] = []


def route(
    method: str, path: str, *, public: bool = False, across: Across = Across.FIRST
) -> Callable[[View], View]:
    def register(view: View) -> View:
        ROUTES.append(Route(method, tuple(path.strip("/").split("/")), view, public, across))
        return view

    return register


def _find(request: Request) -> tuple[Route | None, Params, list[str]]:
    """The route answering `request` with its parameters, or None and the methods the path
    allows."""
    segments = request.path.strip("/").split("/")
    allowed = []
    for candidate in ROUTES:
        params = candidate.match(segments)
        if params is None:
            continue
        if candidate.method == request.method:
            return candidate, params, []
        allowed.append(candidate.method)
    return None, {}, allowed


def _host_name(host: str) -> str:
    """The name part of a Host or Origin authority (without its port and brackets)."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


def _is_local_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AdminApi:
    """The request handler of the admin listener, over one running Process."""

    def __init__(self, process: Process, token: str | None) -> None:
        self.process = process
        self.token = token

    @property
    def reloader(self) -> Reloader:
        """What POST /api/reload reloads."""
        return self.process

    async def __call__(self, request: Request) -> Response:
        self._check_origin(request)
        found, params, _ = _find(request)
        if found is not None and found.public:
            return await self.run(found, params, request)
        self._check_token(request)  # who has no token learns nothing of what exists
        return await self.dispatch(request)

    async def dispatch(self, request: Request) -> Response:
        """The answer to a request whose origin and token were checked."""
        found, params, allowed = _find(request)
        if found is not None:
            return await self.run(found, params, request)
        if allowed:
            raise HttpError(405, f"{request.method} is not allowed here", Allow=", ".join(allowed))
        raise HttpError(404, f"no such resource: {request.path[:200]}")

    async def run(self, found: Route, params: Params, request: Request) -> Response:
        return await found.view(self, params)

    def _check_origin(self, request: Request) -> None:
        host = request.headers.get("host")
        origin = request.headers.get("origin")
        if origin is not None and (host is None or urlsplit(origin).netloc != host):
            raise HttpError(403, "cross-origin requests are refused")
        if self.token is None and host is not None and not _is_local_name(_host_name(host)):
            raise HttpError(
                403, "without admin.token, only an IP address or localhost may be the Host"
            )

    def _check_token(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise HttpError(
                401, "a bearer token is required (admin.token)", **{"WWW-Authenticate": "Bearer"}
            )

    def proxy(self, params: Params) -> Proxy:
        name = params["name"]
        for proxy in self.process.proxies:
            if proxy.config.name == name:
                return proxy
        raise HttpError(404, f"no proxy named {name[:100]!r}")


@route("GET", "/", public=True, across=Across.HERE)
async def dashboard(api: AdminApi, params: Params) -> Response:
    """The live dashboard: a static page whose script reads the API below (with the token
    from its URL's #token=... fragment, which browsers never send)."""
    page = dashboard_page()
    return Response(200, page.body, "text/html; charset=utf-8", dict(page.headers))


@route("GET", "/metrics", across=Across.METRICS)
async def metrics(api: AdminApi, params: Params) -> Response:
    return Response(200, api.process.registry.render().encode(), PROMETHEUS_TEXT)


@route("GET", "/api/openapi.json", across=Across.HERE)
async def openapi(api: AdminApi, params: Params) -> Response:
    return Response.json(200, openapi_document())


@route("GET", "/api/proxies")
async def proxies(api: AdminApi, params: Params) -> Response:
    return Response.json(200, {"DBProxies": [views.describe_proxy(p) for p in api.process.proxies]})


@route("GET", "/api/proxies/{name}")
async def proxy(api: AdminApi, params: Params) -> Response:
    return Response.json(200, {"DBProxy": views.describe_proxy(api.proxy(params))})


@route("GET", "/api/proxies/{name}/targets")
async def targets(api: AdminApi, params: Params) -> Response:
    found = api.proxy(params)
    rows = [views.describe_target(found, i) for i in found.targets.instances]
    return Response.json(200, {"Targets": rows})


@route("GET", "/api/proxies/{name}/target-groups")
async def target_groups(api: AdminApi, params: Params) -> Response:
    return Response.json(200, {"TargetGroups": [views.describe_target_group(api.proxy(params))]})


@route("GET", "/api/proxies/{name}/events")
async def events(api: AdminApi, params: Params) -> Response:
    found = api.proxy(params)
    return Response.json(200, {"Events": [views.describe_event(e) for e in found.targets.events]})


@route("GET", "/api/proxies/{name}/clients", across=Across.CONCAT)
async def clients(api: AdminApi, params: Params) -> Response:
    return Response.json(200, {"Clients": views.describe_clients(api.proxy(params))})


@route("GET", "/api/proxies/{name}/servers", across=Across.CONCAT)
async def servers(api: AdminApi, params: Params) -> Response:
    return Response.json(200, {"Servers": views.describe_servers(api.proxy(params))})


@route("POST", "/api/proxies/{name}/clients/{id}/close", across=Across.ANY)
async def close_client(api: AdminApi, params: Params) -> Response:
    """Disconnect one client with the engine's error for a terminated connection (PostgreSQL
    57P01, MySQL's goodbye ERR), as idle_client_timeout does."""
    found = api.proxy(params)
    text = params["id"]
    wanted = int(text) if text.isdigit() and len(text) <= MAX_ID_DIGITS else None
    client = next((c for c in found.runtime.clients if c.id == wanted), None)
    if client is None:
        raise HttpError(404, f"no client {text[:30]!r} on proxy {found.config.name}")
    client.expire("closed by an operator (admin API)")
    return Response.json(200, {"Id": client.id, "Closed": True})


@route("POST", "/api/reload", across=Across.HERE)
async def reload(api: AdminApi, params: Params) -> Response:
    """Read the config file again, as SIGHUP does; a config that does not validate is refused
    (422, with the reason) and the running one stays."""
    outcome = await api.reloader.reload()
    return Response.json(422 if outcome["status"] == "refused" else 200, outcome)


@route("POST", "/api/proxies/{name}/pause", across=Across.SUM)
async def pause(api: AdminApi, params: Params) -> Response:
    """Let transactions under way finish; new ones wait (not fail) until resume."""
    return Response.json(200, await api.proxy(params).pause())


@route("POST", "/api/proxies/{name}/resume", across=Across.SUM)
async def resume(api: AdminApi, params: Params) -> Response:
    return Response.json(200, await api.proxy(params).resume())


@route("POST", "/api/proxies/{name}/drain", across=Across.SUM)
async def drain(api: AdminApi, params: Params) -> Response:
    """Stop accepting, let transactions finish (shutdown_timeout), end each client between
    transactions with the engine's shutdown error."""
    proxy = api.proxy(params)
    return Response.json(200, await proxy.drain(proxy.shutdown_timeout))
