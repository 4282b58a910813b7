"""What the admin API reports about a running proxy, as JSON-ready dicts, computed when asked.

The proxy, target group and target shapes carry the field names of RDS Proxy's API
(DescribeDBProxies, DescribeDBProxyTargetGroups, DescribeDBProxyTargets), so tools written
for those read these too; the live connections are PgBouncer's SHOW CLIENTS / SHOW SERVERS
in the same spelling. Nothing here holds a password: an auth entry is reported by its secret
reference (env:VAR, file:PATH or an ARN), never by what the secret holds.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dbmux.config import TargetRole

if TYPE_CHECKING:
    import asyncio

    from dbmux.engines.base import ServerConnection
    from dbmux.proxy import Proxy
    from dbmux.session import ClientSession
    from dbmux.targets import Event, Instance

AUTH_SCHEME = "SECRETS"  # the only one RDS Proxy has
TARGET_GROUP = "default"  # a proxy has one target group, named as RDS Proxy names it


def _seconds(value: float) -> float:
    return round(value, 3)


def proxy_status(proxy: Proxy) -> str:
    """RDS Proxy's words: `available` while every listener accepts clients."""
    servers = [listener.server for listener in proxy.listeners]
    if servers and all(server is not None and server.is_serving() for server in servers):
        return "available"
    return "suspended"


def describe_proxy(proxy: Proxy) -> dict[str, Any]:
    """A DBProxy of DescribeDBProxies, plus dbmux's own settings and endpoints."""
    config = proxy.config
    default_auth = proxy.engine.auth_types[0]
    status = proxy_status(proxy)
    addresses = [f"{host}:{port}" for host, port in proxy.addresses]
    endpoint = addresses[0] if addresses else str(config.listen)
    endpoints = [
        {
            "DBProxyEndpointName": config.name,
            "Endpoint": endpoint,
            "TargetRole": TargetRole.READ_WRITE.value,
            "IsDefault": True,
            "Status": status,
        }
    ]
    for e in config.endpoints:
        bound = proxy.endpoint_addresses.get(e.name)
        endpoints.append(
            {
                "DBProxyEndpointName": e.name,
                "Endpoint": f"{bound[0]}:{bound[1]}" if bound else str(e.listen),
                "TargetRole": e.target_role.value,
                "IsDefault": False,
                "Status": status,
            }
        )
    return {
        "DBProxyName": config.name,
        "EngineFamily": config.engine_family,
        "Status": status,
        "Endpoint": endpoint,
        "RequireTLS": config.require_tls,
        "IdleClientTimeout": config.idle_client_timeout,
        "DebugLogging": config.debug_logging,
        "Auth": [
            {
                "Description": entry.description,
                "AuthScheme": AUTH_SCHEME,
                "SecretArn": entry.secret,
                "IAMAuth": entry.iam_auth.value,
                "ClientPasswordAuthType": (entry.client_password_auth_type or default_auth).value,
            }
            for entry in config.auth
        ],
        "Endpoints": endpoints,
        "MaxClientConnections": config.max_client_connections,
        "SessionState": config.session_state.value,
        "TransactionReplay": config.transaction_replay,
    }


def describe_target_group(proxy: Proxy) -> dict[str, Any]:
    """The proxy's one DBProxyTargetGroup, with the pool size learned from the database."""
    pool = proxy.pool_config
    return {
        "DBProxyName": proxy.config.name,
        "TargetGroupName": TARGET_GROUP,
        "IsDefault": True,
        "Status": proxy_status(proxy),
        "ConnectionPoolConfig": {
            "MaxConnectionsPercent": pool.max_connections_percent,
            "MaxIdleConnectionsPercent": pool.max_idle_connections_percent,
            "ConnectionBorrowTimeout": pool.connection_borrow_timeout,
            "SessionPinningFilters": [f.value for f in pool.session_pinning_filters],
            "InitQuery": pool.init_query,
        },
        "MaxConnectionsAllowed": proxy.pools.budget.limit,
    }


def describe_target(proxy: Proxy, instance: Instance) -> dict[str, Any]:
    """A DBProxyTarget: where it is, its role and its health, as the last probe found them."""
    health: dict[str, Any] = {"State": instance.health.value}
    if instance.reason is not None:
        health["Reason"] = instance.reason.value
    if instance.description:
        health["Description"] = instance.description
    return {
        "Endpoint": instance.target.host,
        "Port": instance.target.port,
        "Type": "RDS_INSTANCE",
        "Role": instance.role.value if instance.role is not None else "UNKNOWN",
        "TargetHealth": health,
        "IsWriter": instance is proxy.targets.writer,
        "ReplicaLag": instance.lag,
    }


def describe_event(event: Event) -> dict[str, Any]:
    """One entry of the target group's event log, its time in ISO 8601 UTC."""
    when = datetime.fromtimestamp(event.time, UTC).isoformat(timespec="milliseconds")
    return {
        "Time": when.replace("+00:00", "Z"),
        "Kind": event.kind.value,
        "Description": event.description,
    }


def _peer(transport: asyncio.BaseTransport | None) -> tuple[str | None, int | None]:
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None, None


def describe_client(
    client: ClientSession, listeners: dict[int, str], now: float, clock_now: float
) -> dict[str, Any]:
    """One live client, as PgBouncer's SHOW CLIENTS shows it. `listeners` names each listen
    port; `clock_now` is the coarse clock the attach time was taken from."""
    host, port = _peer(client.transport)
    local = client.transport.get_extra_info("sockname") if client.transport else None
    server = client.server
    state = client.state
    if client.logged_in and client.pin_reason is not None:
        state = "pinned"
    return {
        "Id": client.id,
        "Address": host,
        "Port": port,
        "Endpoint": listeners.get(local[1]) if isinstance(local, tuple) else None,
        "User": client.user or None,
        "Database": client.pool.key.database if client.pool is not None else None,
        "State": state,
        "PinReason": client.pin_reason,
        "TLS": client.tls,
        "Age": _seconds(now - client.connected_at),
        "TransactionAge": (
            _seconds(max(0.0, clock_now - client.attached_at)) if server is not None else None
        ),
        "ServerId": server.id if server is not None else None,
    }


def describe_clients(proxy: Proxy) -> list[dict[str, Any]]:
    names = [proxy.config.name] + [e.name for e in proxy.config.endpoints]
    listeners = {port: name for name, (_, port) in zip(names, proxy.addresses, strict=False)}
    now, clock_now = time.monotonic(), proxy.runtime.clock.now
    clients = sorted(proxy.runtime.clients, key=lambda c: c.id)
    return [describe_client(c, listeners, now, clock_now) for c in clients]


def describe_server(conn: ServerConnection, state: str, now: float) -> dict[str, Any]:
    """One server connection, as PgBouncer's SHOW SERVERS shows it: idle in its pool, lent
    to a client, or `tested` (lent to the proxy itself: a reset or a health check)."""
    client = getattr(conn, "client", None)
    if state == "lent" and client is None:
        state = "tested"
    host, port = _peer(getattr(conn, "transport", None))
    key = getattr(conn.pool, "key", None)
    return {
        "Id": conn.id,
        "Target": f"{host}:{port}" if host is not None else None,
        "Database": key.database if key is not None else None,
        "User": key.user if key is not None else None,
        "State": state,
        "Age": _seconds(now - conn.created_at),
        "ClientId": getattr(client, "id", None),
    }


def describe_servers(proxy: Proxy) -> list[dict[str, Any]]:
    now = time.monotonic()
    rows = [
        describe_server(conn, state, now)
        for pools in proxy.pool_sets
        for pool in pools.pools.values()
        for state, conns in (("idle", pool.idle), ("lent", pool.lent))
        for conn in conns
    ]
    return sorted(rows, key=lambda row: row["Id"])
