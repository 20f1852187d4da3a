"""The controller's aiohttp application: middlewares, health, metrics, OpenAPI and the routes.

Rules:
- Every `/api/v1` route except the OpenAPI document needs `Authorization: Bearer TOKEN` (or the
  dashboard's session cookie with its header, `fleet.dashboard.session`) for a token that exists,
  is not revoked and has at least the route's role; a refusal is one JSON line
  with 401 (who are you?) or 403 (you may not).
- Every error, expected or not, is `{"error": "..."}` with a meaningful status; an unexpected one
  is logged with its traceback and shown to the caller as a 500 without internals.
- `/healthz` says whether the database answers and the timestamp is still valid; `/metrics` is
  Prometheus text and, like `/healthz`, needs no token (keep the controller's port off the
  internet or put both behind your proxy's auth).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from tortoise import connections

import fleet.api.access
import fleet.api.attestation
import fleet.api.audit
import fleet.api.commands
import fleet.api.enroll
import fleet.api.keys
import fleet.api.policy
import fleet.api.rollouts
import fleet.api.runes
import fleet.api.telemetry  # noqa: F401  (registers routes)
from fleet.api import tuf
from fleet.api.audit import audit_middleware
from fleet.api.context import CONTROLLER, REQUEST_TOKEN, controller
from fleet.api.errors import ApiError, error_response, json_response
from fleet.api.routes import API, Handler, openapi_document
from fleet.controller import Controller
from fleet.dashboard import views as dashboard
from fleet.dashboard.session import api_bearer, token_row
from fleet.logs import log
from fleet.tokens import role_allows
from fleet.tuf_store import utcnow

OPENAPI_PATH = "/api/v1/openapi.json"
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, f"the request body is too large ({exc.text})")
    except web.HTTPException as exc:
        # aiohttp's own errors (no such route, wrong method) are text; make them JSON too.
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        response = error_response(exc.status, exc.reason.lower())
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log("http.unhandled", logging.ERROR, path=request.path, method=request.method)
        logging.getLogger("fleet").exception("unhandled error serving %s", request.path)
        return error_response(500, "internal error; the controller log has the details")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics = controller(request).metrics
        metrics.http_requests.labels(request.method, route, str(status)).inc()
        metrics.http_seconds.labels(route).observe(time.perf_counter() - started)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/v1/") or request.path == OPENAPI_PATH:
        return await handler(request)
    needed = API.role_for(request)
    if needed is None:
        return await handler(request)
    refused = controller(request).metrics.api_auth_refused
    token = api_bearer(request)
    if token is None:
        refused.labels("missing").inc()
        return error_response(401, "missing API token: pass --token or set FLEET_TOKEN")
    row = await token_row(token)
    if row is None:
        refused.labels("unknown").inc()
        return error_response(401, "the API token is unknown or revoked")
    request[REQUEST_TOKEN] = row  # also who the audit log names when the role is refused
    if not role_allows(row.role, needed):
        refused.labels("role").inc()
        return error_response(
            403, f"this needs the {needed} role; the token {row.name!r} is {row.role}"
        )
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > TOKEN_TOUCH_INTERVAL:
        row.last_used_at = now
        await row.save(update_fields=["last_used_at"])
    return await handler(request)


async def healthz(request: web.Request) -> web.StreamResponse:
    ctl = controller(request)
    checks: dict[str, str] = {}
    try:
        await connections.get("default").execute_query("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"failing: {exc}"
    timestamp = ctl.repository.repository.timestamp.signed
    checks["timestamp"] = "ok" if not timestamp.is_expired(utcnow()) else "expired"
    healthy = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ok" if healthy else "failing", "version": ctl.version, "checks": checks},
        status=200 if healthy else 503,
    )


async def openapi(request: web.Request) -> web.StreamResponse:
    return json_response(openapi_document(controller(request).version))


async def not_found(request: web.Request) -> web.StreamResponse:
    return error_response(404, f"no such endpoint: {request.method} {request.path}")


def make_app(ctl: Controller) -> web.Application:
    app = web.Application(
        middlewares=[audit_middleware, errors_middleware, metrics_middleware, auth_middleware],
        client_max_size=ctl.config.max_rune_bytes + 64 * 1024,
    )
    app[CONTROLLER] = ctl
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", make_aiohttp_handler(ctl.metrics.registry))
    app.router.add_get(OPENAPI_PATH, openapi)
    API.install(app)
    tuf.install(app)
    dashboard.install(app)
    app.router.add_route("*", "/api/v1/{tail:.*}", not_found)
    return app
