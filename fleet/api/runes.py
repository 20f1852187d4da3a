"""`/api/v1/runes`: push, list, show and revoke rune versions.

A push is the rune's bytes as the body (`application/octet-stream`), or `multipart/form-data`
with the part `rune` and, for its provenance, `attestation` (a signed in-toto statement, one
line of JSON) or `sigstore_bundle` (a Sigstore bundle); each provenance part is at most
`MAX_PROVENANCE_BYTES`.
"""

from __future__ import annotations

import logging

from aiohttp import BodyPartReader, web

from fleet.admission import AdmissionError, admit_rune, revoke_rune, rune_json
from fleet.api.context import caller, controller
from fleet.api.errors import ApiError, json_response
from fleet.api.routes import API
from fleet.db.models import Rune
from fleet.logs import log
from fleet.tuf_store import utcnow
from ota.targets import DEFAULT_ORG

PARTS = ("rune", "attestation", "sigstore_bundle")
MAX_PROVENANCE_BYTES = 1024 * 1024


@API.add(
    "POST",
    "/api/v1/runes",
    "operator",
    "Push a rune (bundle or legacy .rune), with its provenance, and publish it as a signed target",
    request_body="application/octet-stream or multipart/form-data (rune, attestation, "
    "sigstore_bundle)",
    parameters=("org", "name", "version", "min_agent_version"),
)
async def push_rune(request: web.Request) -> web.StreamResponse:
    ctl = controller(request)
    limit = ctl.config.max_rune_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(
            413, f"the rune is {request.content_length} bytes; this fleet accepts {limit}"
        )
    parts = await _parts(request, limit)
    data = parts.get("rune", b"")
    query = request.query
    try:
        admitted = await admit_rune(
            ctl.repository,
            data,
            org=query.get("org", DEFAULT_ORG),
            name=query.get("name"),
            version=query.get("version"),
            min_agent_version=query.get("min_agent_version", ctl.config.min_agent_version),
            pushed_by=caller(request).name,
            max_bytes=limit,
            now=utcnow(),
            statement=parts.get("attestation"),
            bundle=parts.get("sigstore_bundle"),
        )
    except AdmissionError as exc:
        ctl.metrics.runes_refused.labels(exc.kind).inc()
        log(
            "rune.refused", logging.WARNING, kind=exc.kind, reason=str(exc), by=caller(request).name
        )
        raise ApiError(exc.status, str(exc)) from None
    rune = admitted.rune
    if admitted.created:
        log("rune.published", target=rune.target_path, sha256=rune.sha256, by=rune.pushed_by)
        ctl.attestation.references_changed()
        await ctl.update_gauges()
    body = rune_json(rune) | {"created": admitted.created}
    return json_response(body, status=201 if admitted.created else 200)


async def _parts(request: web.Request, limit: int) -> dict[str, bytes]:
    """The push's parts: `rune` (the whole body when it is not multipart), and the provenance."""
    if request.content_type != "multipart/form-data":
        return {"rune": await request.read()}
    parts: dict[str, bytes] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name not in PARTS:
            raise ApiError(400, f"a push takes the parts {', '.join(PARTS)}")
        cap = limit if part.name == "rune" else MAX_PROVENANCE_BYTES
        data = bytearray()
        while chunk := await part.read_chunk():
            data += chunk
            if len(data) > cap:
                raise ApiError(413, f"the part {part.name} is over {cap} bytes")
        parts[part.name] = bytes(data)
    if "rune" not in parts:
        raise ApiError(400, "a multipart push needs the part `rune`")
    return parts


@API.add("GET", "/api/v1/runes", "viewer", "List rune versions", parameters=("org", "name"))
async def list_runes(request: web.Request) -> web.StreamResponse:
    query = Rune.all().order_by("org", "name", "created_at")
    if "org" in request.query:
        query = query.filter(org=request.query["org"])
    if "name" in request.query:
        query = query.filter(name=request.query["name"])
    return json_response({"runes": [rune_json(r) for r in await query]})


async def _rune(request: web.Request) -> Rune:
    info = request.match_info
    rune = await Rune.get_or_none(org=info["org"], name=info["name"], version=info["version"])
    if rune is None:
        raise ApiError(404, f"no rune {info['name']}@{info['version']} in org {info['org']}")
    return rune


@API.add("GET", "/api/v1/runes/{org}/{name}/{version}", "viewer", "Show one rune version")
async def show_rune(request: web.Request) -> web.StreamResponse:
    rune = await _rune(request)
    return json_response(rune_json(rune) | {"description": rune.description})


@API.add(
    "DELETE",
    "/api/v1/runes/{org}/{name}/{version}",
    "operator",
    "Revoke a rune version: its target is removed, agents refuse it and stop running it",
)
async def revoke(request: web.Request) -> web.StreamResponse:
    ctl = controller(request)
    rune = await _rune(request)
    try:
        rune = await revoke_rune(ctl.repository, rune, caller(request).name, utcnow())
    except AdmissionError as exc:
        raise ApiError(exc.status, str(exc)) from None
    log("rune.revoked", target=rune.target_path, by=rune.revoked_by)
    ctl.attestation.references_changed()
    await ctl.update_gauges()
    return json_response(rune_json(rune))
