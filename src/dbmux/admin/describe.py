"""`dbmux describe`: the admin API's answers as aligned tables, for a terminal."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

DEFAULT_URL = "http://127.0.0.1:9187"
TIMEOUT = 10.0

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], Any]]


class AdminError(Exception):
    """The admin API could not be reached or refused the request; the message says which."""


def fetch_json(base_url: str, path: str, token: str | None = None) -> Any:
    request = urllib.request.Request(base_url.rstrip("/") + path)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            message = json.load(error).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        raise AdminError(f"{base_url}{path}: {error.code} {message or error.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise AdminError(f"cannot reach the admin API at {base_url}: {reason}") from None


def table(rows: list[Row], columns: list[Column]) -> str:
    """Rows as text columns, each as wide as its widest cell; None shows as "-"."""
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append(["-" if (v := get(row)) is None else _text(v) for _, get in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


PROXY_COLUMNS: list[Column] = [
    ("NAME", lambda p: p["DBProxyName"]),
    ("ENGINE", lambda p: p["EngineFamily"]),
    ("STATUS", lambda p: p["Status"]),
    ("ENDPOINT", lambda p: p["Endpoint"]),
    ("REQUIRE_TLS", lambda p: p["RequireTLS"]),
    ("IDLE_TIMEOUT", lambda p: p["IdleClientTimeout"]),
    ("ENDPOINTS", lambda p: ", ".join(e["DBProxyEndpointName"] for e in p["Endpoints"][1:])),
    ("SECRETS", lambda p: ", ".join(a["SecretArn"] for a in p["Auth"])),
]
TARGET_COLUMNS: list[Column] = [
    ("PROXY", lambda t: t["proxy"]),
    ("ENDPOINT", lambda t: t["Endpoint"]),
    ("PORT", lambda t: t["Port"]),
    ("ROLE", lambda t: t["Role"]),
    ("STATE", lambda t: t["TargetHealth"]["State"]),
    ("REASON", lambda t: t["TargetHealth"].get("Reason")),
    ("DESCRIPTION", lambda t: t["TargetHealth"].get("Description")),
]
CLIENT_COLUMNS: list[Column] = [
    ("PROXY", lambda c: c["proxy"]),
    ("ID", lambda c: c["Id"]),
    ("ADDRESS", lambda c: f"{c['Address']}:{c['Port']}" if c["Address"] else None),
    ("ENDPOINT", lambda c: c["Endpoint"]),
    ("USER", lambda c: c["User"]),
    ("DATABASE", lambda c: c["Database"]),
    ("STATE", lambda c: c["State"]),
    ("PIN_REASON", lambda c: c["PinReason"]),
    ("TLS", lambda c: c["TLS"]),
    ("AGE", lambda c: c["Age"]),
    ("TX_AGE", lambda c: c["TransactionAge"]),
]
SERVER_COLUMNS: list[Column] = [
    ("PROXY", lambda s: s["proxy"]),
    ("ID", lambda s: s["Id"]),
    ("TARGET", lambda s: s["Target"]),
    ("USER", lambda s: s["User"]),
    ("DATABASE", lambda s: s["Database"]),
    ("STATE", lambda s: s["State"]),
    ("AGE", lambda s: s["Age"]),
    ("CLIENT", lambda s: s["ClientId"]),
]

# What each `describe` word lists: the API path under each proxy, the list's key, the columns.
PER_PROXY: dict[str, tuple[str, str, list[Column]]] = {
    "targets": ("targets", "Targets", TARGET_COLUMNS),
    "clients": ("clients", "Clients", CLIENT_COLUMNS),
    "servers": ("servers", "Servers", SERVER_COLUMNS),
}
WHAT = ["proxies", *PER_PROXY]


def describe(what: str, base_url: str, token: str | None = None) -> str:
    """The table `dbmux describe WHAT` prints."""
    proxies = fetch_json(base_url, "/api/proxies", token)["DBProxies"]
    if what == "proxies":
        return table(proxies, PROXY_COLUMNS)
    path, key, columns = PER_PROXY[what]
    rows = []
    for proxy in proxies:
        name = proxy["DBProxyName"]
        found = fetch_json(base_url, f"/api/proxies/{quote(name, safe='')}/{path}", token)
        rows += [{"proxy": name, **row} for row in found[key]]
    return table(rows, columns)
