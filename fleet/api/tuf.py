"""`/tuf/metadata/...` and `/tuf/targets/...`: the signed repository, for registered devices only.

Rules:
- Every request must be signed by a registered device (`ota.request_auth`); anything else is a
  401 with no detail for the caller, and the reason is counted and logged.
- A target is served only at `{dir}/{sha256}.{basename}` where the hash is the *current* target's
  (consistent snapshots); a revoked or replaced rune is not served. `Range` is supported.
- A rune (`runes/...`) is served only to a device that presents a fresh affirming attestation
  result and is not quarantined (`fleet.attestation`); otherwise 428 with the reason.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from fleet.api.context import controller, signing_device
from fleet.db.models import Device
from fleet.logs import log
from fleet.tuf_store import utcnow
from ota.request_auth import PASSPORT_HEADER
from ota.targets import RUNES_PREFIX


async def metadata(request: web.Request) -> web.StreamResponse:
    await signing_device(request)
    repository = controller(request).repository
    filename = request.match_info["filename"]
    if filename == "timestamp.json":
        await repository.sync_for_serving()  # what another replica published (replicas only)
    data = repository.metadata(filename)
    if data is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=data, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def target(request: web.Request) -> web.StreamResponse:
    device_id, _ = await signing_device(request)
    ctl = controller(request)
    directory, _, filename = request.match_info["path"].rpartition("/")
    digest, dot, basename = filename.partition(".")
    path = f"{directory}/{basename}" if directory else basename
    if not dot or not ctl.repository.current_file(path, digest):
        raise web.HTTPNotFound()
    if path.startswith(f"{RUNES_PREFIX}/"):
        await _check_passport(request, device_id, path)
    return web.FileResponse(
        ctl.repository.blobs.path(digest),
        headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store"},
    )


async def _check_passport(request: web.Request, device_id: str, path: str) -> None:
    """Refuse a rune to a device without a fresh affirming attestation result, or quarantined."""
    ctl = controller(request)
    device = await Device.get_or_none(id=device_id)
    refusal = (
        "the device is not enrolled"
        if device is None
        else ctl.attestation.passport_refusal(
            request.headers.get(PASSPORT_HEADER), device, utcnow()
        )
    )
    if refusal is None:
        return
    ctl.metrics.device_requests_refused.labels("attestation").inc()
    log("security.download_refused", logging.WARNING, device=device_id, target=path, reason=refusal)
    raise web.HTTPPreconditionRequired(
        text=json.dumps({"error": f"rune downloads need a fresh affirming attestation: {refusal}"}),
        content_type="application/json",
    )


def install(app: web.Application) -> None:
    app.router.add_get("/tuf/metadata/{filename}", metadata)
    app.router.add_get("/tuf/targets/{path:.+}", target)
