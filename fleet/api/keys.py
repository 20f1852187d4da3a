"""`/api/v1/keys`: the repository's keys, the root for provisioning, and key rotation.

Rotating an online key or the root keys is two calls: the controller drafts the next root (making
the new online key itself), `fleetctl` signs the draft with the offline root keys where they are,
and the controller accepts it. The root keys never travel to the controller. The command key
needs no root signature: it is a TUF target, so rotating it is publishing a new target.
"""

from __future__ import annotations

import json
import secrets

from aiohttp import web
from securesystemslib.signer import SSlibKey

from attestation.keys import generate_key_file, public_key_of
from fleet.api.context import controller
from fleet.api.errors import ApiError, json_response, read_json
from fleet.api.routes import API
from fleet.logs import log
from fleet.tuf_store import utcnow
from ota.repository import ONLINE_ROLES, RepositoryError


@API.add("GET", "/api/v1/keys", "viewer", "Show the repository's roles, keys and expiries")
async def key_status(request: web.Request) -> web.StreamResponse:
    return json_response(controller(request).repository.status())


@API.add("GET", "/api/v1/keys/root.json", "viewer", "The current TUF root, to provision devices")
async def root_json(request: web.Request) -> web.StreamResponse:
    data = controller(request).repository.metadata("root.json")
    if data is None:
        raise ApiError(404, "the repository has no root")
    return web.Response(body=data, content_type="application/json")


@API.add(
    "POST",
    "/api/v1/keys/rotations",
    "admin",
    "Start rotating a role's key: the command key rotates at once; other roles return a root "
    "draft to sign offline",
    request_body="application/json",
)
async def start_rotation(request: web.Request) -> web.StreamResponse:
    ctl = controller(request)
    body = await read_json(request)
    role = body.get("role")
    now = utcnow()
    if role == "command":
        return json_response(await _rotate_command_key(request), status=201)
    if role not in (*ONLINE_ROLES, "root"):
        raise ApiError(400, "role must be root, targets, snapshot, timestamp or command")
    root_keys = None
    if body.get("root_keys") is not None:
        try:
            root_keys = [SSlibKey.from_dict(k["keyid"], dict(k["key"])) for k in body["root_keys"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError(400, f"root_keys must be a list of {{keyid, key}}: {exc}") from None
    threshold = body.get("threshold")
    if threshold is not None and not isinstance(threshold, int):
        raise ApiError(400, "threshold must be a number")
    try:
        draft = await ctl.repository.draft_rotation(role, now, root_keys, threshold)
    except RepositoryError as exc:
        raise ApiError(400, str(exc)) from None
    log("keys.rotation_drafted", role=role, rotation=draft.id)
    return json_response(
        {"id": draft.id, "role": role, "completed": False, "root": json.loads(draft.draft)},
        status=201,
    )


async def _rotate_command_key(request: web.Request) -> dict[str, object]:
    ctl = controller(request)
    keys = ctl.fleet_dir.keys
    now = utcnow()
    pending = keys / f"command.next-{int(now.timestamp())}-{secrets.token_hex(4)}.pem"
    signer = generate_key_file(pending)
    try:
        await ctl.repository.publish_command_key(now, signer)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    # Only a published key is put to use: devices learn it through TUF before it signs anything.
    pending.replace(ctl.fleet_dir.key_file("command"))
    await ctl.update_gauges()
    keyid = public_key_of(signer).keyid
    log("keys.rotated", role="command", keyid=keyid)
    return {"role": "command", "completed": True, "keyid": keyid}


@API.add(
    "POST",
    "/api/v1/keys/rotations/{id}",
    "admin",
    "Finish a rotation with the root draft signed by the offline root keys",
    request_body="application/json",
)
async def finish_rotation(request: web.Request) -> web.StreamResponse:
    ctl = controller(request)
    try:
        rotation_id = int(request.match_info["id"])
    except ValueError:
        raise ApiError(400, "a rotation id is a number") from None
    signed = await request.read()
    try:
        files = await ctl.repository.accept_rotation(rotation_id, signed, utcnow())
    except RepositoryError as exc:
        raise ApiError(400, str(exc)) from None
    await ctl.update_gauges()
    root = ctl.repository.repository.root.signed
    log("keys.rotated", rotation=rotation_id, root_version=root.version)
    return json_response(
        {
            "id": rotation_id,
            "completed": True,
            "root_version": root.version,
            "published": [f.filename for f in files],
        }
    )
