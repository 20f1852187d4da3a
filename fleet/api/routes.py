"""One table of API routes: aiohttp's router and the OpenAPI document are both built from it.

Rules: every `/api/v1` route names the least role it needs (`viewer`, `operator`, `admin`), so no
route can be added without deciding who may call it; the OpenAPI document lists exactly the routes
that are served. A route a device calls names the role `device`: it takes no API token, and its
handler authenticates the request by the device's signature (`ota.request_auth`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEVICE = "device"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: str
    summary: str
    request_body: str | None = None
    parameters: tuple[str, ...] = ()
    responses: dict[str, str] = field(default_factory=dict)


class RouteTable:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(
        self,
        method: str,
        path: str,
        role: str,
        summary: str,
        *,
        request_body: str | None = None,
        parameters: tuple[str, ...] = (),
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.routes.append(
                Route(method, path, handler, role, summary, request_body, parameters)
            )
            return handler

        return register

    def role_for(self, request: web.Request) -> str | None:
        info = request.match_info.route.resource
        canonical = info.canonical if info is not None else None
        for route in self.routes:
            if route.path == canonical and route.method == request.method:
                return None if route.role == DEVICE else route.role
        return None

    def install(self, app: web.Application) -> None:
        for route in self.routes:
            app.router.add_route(route.method, route.path, route.handler)


API = RouteTable()


def openapi_document(version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in API.routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "security": [{"device": []}] if route.role == DEVICE else [{"bearer": []}],
            "x-fleet-role": route.role,
            "responses": {
                "200": {"description": "OK"},
                "400": {"$ref": "#/components/responses/Error"},
                "401": {"$ref": "#/components/responses/Error"},
                "403": {"$ref": "#/components/responses/Error"},
            },
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_params(route.path)
        ]
        params += [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
            for name in route.parameters
        ]
        if params:
            operation["parameters"] = params
        if route.request_body:
            operation["requestBody"] = {
                "required": True,
                "content": {route.request_body: {"schema": {}}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Fleet controller API",
            "version": version,
            "description": "Operate a Fleet. Authenticate with `Authorization: Bearer TOKEN`; "
            "each operation's `x-fleet-role` is the least role it needs "
            "(viewer < operator < admin).",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "device": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Fleet-Signature",
                    "description": "Signed by the device's identity key, with Fleet-Device and "
                    "Fleet-Date (see docs/enrollment.md)",
                },
            },
            "responses": {
                "Error": {
                    "description": "What went wrong, in one line",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"error": {"type": "string"}},
                                "required": ["error"],
                            }
                        }
                    },
                }
            },
        },
        "paths": paths,
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]
