"""`/tuf/metadata/...` and `/tuf/targets/...`: the signed repository, for registered devices only.

Rules:
- Every request must be signed by a registered device (`ota.request_auth`); anything else is a
  401 with no detail for the caller, and the reason is counted and logged.
- A target is served only at `{dir}/{sha256}.{basename}` where the hash is the *current* target's
  (consistent snapshots); a revoked or replaced rune is not served. `Range` is supported.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from fleet.api.context import controller
from fleet.logs import log
from ota.request_auth import DEVICE_HEADER, RequestAuthError, verify_request


async def _authenticate(request: web.Request) -> str:
    ctl = controller(request)
    device_id = request.headers.get(DEVICE_HEADER, "")
    key = await ctl.device_key(device_id) if device_id else None
    try:
        return verify_request(
            request.headers,
            request.method,
            request.path_qs,
            time.time(),
            lambda _: key,
        )
    except RequestAuthError as exc:
        ctl.metrics.device_requests_refused.labels(exc.kind).inc()
        log(
            "security.device_request_refused",
            logging.WARNING,
            reason=str(exc),
            path=request.path,
            peer=request.remote,
        )
        raise web.HTTPUnauthorized(
            text='{"error": "request not signed by a registered device"}',
            content_type="application/json",
        ) from None


async def metadata(request: web.Request) -> web.StreamResponse:
    await _authenticate(request)
    data = controller(request).repository.metadata(request.match_info["filename"])
    if data is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=data, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def target(request: web.Request) -> web.StreamResponse:
    await _authenticate(request)
    ctl = controller(request)
    directory, _, filename = request.match_info["path"].rpartition("/")
    digest, dot, basename = filename.partition(".")
    path = f"{directory}/{basename}" if directory else basename
    if not dot or not ctl.repository.current_file(path, digest):
        raise web.HTTPNotFound()
    return web.FileResponse(
        ctl.repository.blobs.path(digest),
        headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store"},
    )


def install(app: web.Application) -> None:
    app.router.add_get("/tuf/metadata/{filename}", metadata)
    app.router.add_get("/tuf/targets/{path:.+}", target)
