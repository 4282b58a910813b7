"""The admin API's OpenAPI 3.1 document (served at /api/openapi.json). Its schemas are strict
(no unknown fields), so the property-based API test notices when the code and this document
part ways."""

from __future__ import annotations

from typing import Any

from dbmux import __version__
from dbmux.config import IamAuth, PinningFilter, TargetRole
from dbmux.targets import EventKind, HealthReason, TargetHealth

JsonObject = dict[str, Any]


def _nullable(kind: str) -> JsonObject:
    return {"type": [kind, "null"]}


def _object(required: dict[str, JsonObject], **optional: JsonObject) -> JsonObject:
    return {
        "type": "object",
        "properties": {**required, **optional},
        "required": list(required),
        "additionalProperties": False,
    }


def _enum(values: list[str]) -> JsonObject:
    return {"type": "string", "enum": values}


def _ref(name: str) -> JsonObject:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(key: str, schema: str) -> JsonObject:
    return _object({key: {"type": "array", "items": _ref(schema)}})


STRING, INTEGER, NUMBER, BOOLEAN = (
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
)
PROXY_STATUS = _enum(["available", "suspended"])

SCHEMAS: dict[str, JsonObject] = {
    "Error": _object({"message": STRING}),
    # What a life-cycle operation did (Process.reload, Proxy.pause / resume / drain): its
    # fields depend on the operation, so this one schema is open.
    "Operation": {"type": "object"},
    "UserAuthConfigInfo": _object(
        {
            "Description": STRING,
            "AuthScheme": _enum(["SECRETS"]),
            "SecretArn": STRING,
            "IAMAuth": _enum([m.value for m in IamAuth]),
            "ClientPasswordAuthType": STRING,
        }
    ),
    "DBProxyEndpoint": _object(
        {
            "DBProxyEndpointName": STRING,
            "Endpoint": STRING,
            "TargetRole": _enum([r.value for r in TargetRole]),
            "IsDefault": BOOLEAN,
            "Status": PROXY_STATUS,
        }
    ),
    "DBProxy": _object(
        {
            "DBProxyName": STRING,
            "EngineFamily": STRING,
            "Status": PROXY_STATUS,
            "Endpoint": STRING,
            "RequireTLS": BOOLEAN,
            "IdleClientTimeout": NUMBER,
            "DebugLogging": BOOLEAN,
            "Auth": {"type": "array", "items": _ref("UserAuthConfigInfo")},
            "Endpoints": {"type": "array", "items": _ref("DBProxyEndpoint")},
            "MaxClientConnections": INTEGER,
            "SessionState": _enum(["replay", "pin"]),
            "TransactionReplay": BOOLEAN,
        }
    ),
    "DBProxyTargetGroup": _object(
        {
            "DBProxyName": STRING,
            "TargetGroupName": STRING,
            "IsDefault": BOOLEAN,
            "Status": PROXY_STATUS,
            "ConnectionPoolConfig": _object(
                {
                    "MaxConnectionsPercent": INTEGER,
                    "MaxIdleConnectionsPercent": INTEGER,
                    "ConnectionBorrowTimeout": NUMBER,
                    "SessionPinningFilters": {
                        "type": "array",
                        "items": _enum([f.value for f in PinningFilter]),
                    },
                    "InitQuery": STRING,
                }
            ),
            "MaxConnectionsAllowed": {
                **_nullable("integer"),
                "description": "the pool's size, once learned from the database",
            },
        }
    ),
    "DBProxyTarget": _object(
        {
            "Endpoint": STRING,
            "Port": INTEGER,
            "Type": _enum(["RDS_INSTANCE"]),
            "Role": _enum([*(r.value for r in TargetRole), "UNKNOWN"]),
            "TargetHealth": _object(
                {"State": _enum([h.value for h in TargetHealth])},
                Reason=_enum([r.value for r in HealthReason]),
                Description=STRING,
            ),
            "IsWriter": BOOLEAN,
            "ReplicaLag": _nullable("number"),
        }
    ),
    "Client": _object(
        {
            "Id": INTEGER,
            "Address": _nullable("string"),
            "Port": _nullable("integer"),
            "Endpoint": {**_nullable("string"), "description": "the listener it came to"},
            "User": _nullable("string"),
            "Database": _nullable("string"),
            "State": _enum(["login", "idle", "waiting", "active", "pinned"]),
            "PinReason": _nullable("string"),
            "TLS": BOOLEAN,
            "Age": {**NUMBER, "description": "seconds since it connected"},
            "TransactionAge": {
                **_nullable("number"),
                "description": "seconds it has held its server connection (to a second)",
            },
            "ServerId": _nullable("integer"),
        }
    ),
    "Server": _object(
        {
            "Id": INTEGER,
            "Target": _nullable("string"),
            "Database": _nullable("string"),
            "User": _nullable("string"),
            "State": _enum(["idle", "lent", "tested"]),
            "Age": {**NUMBER, "description": "seconds since it was opened"},
            "ClientId": _nullable("integer"),
        }
    ),
    "Event": _object(
        {
            "Time": {**STRING, "format": "date-time"},
            "Kind": _enum([k.value for k in EventKind]),
            "Description": STRING,
        }
    ),
    "ClientClosed": _object({"Id": INTEGER, "Closed": BOOLEAN}),
    "DBProxies": _list_of("DBProxies", "DBProxy"),
    "DBProxyResult": _object({"DBProxy": _ref("DBProxy")}),
    "Targets": _list_of("Targets", "DBProxyTarget"),
    "TargetGroups": _list_of("TargetGroups", "DBProxyTargetGroup"),
    "Clients": _list_of("Clients", "Client"),
    "Servers": _list_of("Servers", "Server"),
    "Events": _list_of("Events", "Event"),
}

ERRORS = {
    "401": "no bearer token, or a wrong one (admin.token is set)",
    "403": "a cross-origin request, or a Host other than an IP address or localhost "
    "without admin.token",
    "404": "no such proxy (or client)",
    "422": "the new config is refused (the reason is given); the old one keeps running",
}


def _json(schema: JsonObject, description: str) -> JsonObject:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> JsonObject:
    return {status: _json(_ref("Error"), ERRORS[status]) for status in ("401", "403", *statuses)}


def _operation(summary: str, result: str | None, *errors: str) -> JsonObject:
    ok = {"200": _json(_ref(result), "OK")} if result else {}
    return {"summary": summary, "responses": {**ok, **_errors(*errors)}}


NAME = {"name": "name", "in": "path", "required": True, "schema": STRING}
CLIENT_ID = {"name": "id", "in": "path", "required": True, "schema": INTEGER}


def _paths() -> JsonObject:
    named = {"parameters": [NAME]}
    paths: JsonObject = {
        "/": {
            "get": {
                "summary": "The live dashboard: a page whose script reads this API every "
                "second (open it as /#token=... when admin.token is set)",
                "security": [{}],
                "responses": {
                    "200": {
                        "description": "A self-contained HTML page",
                        "content": {"text/html": {"schema": STRING}},
                    },
                    "403": _json(_ref("Error"), ERRORS["403"]),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics, named after RDS Proxy's CloudWatch metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": STRING}},
                    },
                    **_errors(),
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/api/proxies": {"get": _operation("The proxies (DescribeDBProxies)", "DBProxies")},
        "/api/proxies/{name}": {
            **named,
            "get": _operation("One proxy", "DBProxyResult", "404"),
        },
        "/api/proxies/{name}/targets": {
            **named,
            "get": _operation(
                "Its targets: role and health (DescribeDBProxyTargets)", "Targets", "404"
            ),
        },
        "/api/proxies/{name}/target-groups": {
            **named,
            "get": _operation(
                "Its target group's pool settings (DescribeDBProxyTargetGroups)",
                "TargetGroups",
                "404",
            ),
        },
        "/api/proxies/{name}/clients": {
            **named,
            "get": _operation("Live client connections (SHOW CLIENTS)", "Clients", "404"),
        },
        "/api/proxies/{name}/servers": {
            **named,
            "get": _operation("Live server connections (SHOW SERVERS)", "Servers", "404"),
        },
        "/api/proxies/{name}/events": {
            **named,
            "get": _operation(
                "Its last writer, role and health changes, oldest first (a bounded log)",
                "Events",
                "404",
            ),
        },
        "/api/proxies/{name}/clients/{id}/close": {
            "parameters": [NAME, CLIENT_ID],
            "post": _operation(
                "Disconnect one client with the engine's terminated-connection error",
                "ClientClosed",
                "404",
            ),
        },
        "/api/reload": {
            "post": {
                "summary": "Read the config file again",
                "responses": {
                    "200": _json(_ref("Operation"), "applied: what changed"),
                    "422": _json(_ref("Operation"), ERRORS["422"]),
                    **_errors(),
                },
            }
        },
    }
    for action in ("pause", "resume", "drain"):
        paths[f"/api/proxies/{{name}}/{action}"] = {
            **named,
            "post": _operation(f"{action.capitalize()} the proxy", "Operation", "404"),
        }
    return paths


def openapi_document() -> JsonObject:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dbmux admin API",
            "version": __version__,
            "description": "Field names follow RDS Proxy's API (DescribeDBProxies, "
            "DescribeDBProxyTargets, DescribeDBProxyTargetGroups); clients and servers "
            "follow PgBouncer's SHOW CLIENTS / SHOW SERVERS.",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": _paths(),
    }
