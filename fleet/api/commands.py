"""`/api/v1/devices/{id}/deploy`, `/commands`: send one signed command to a device and follow it.

Rules: a deploy names a published, not revoked rune version; the command goes through the outbox
(stored, then signed and published; re-sent until the device answers or its deadline passes), so
the response is the stored command, not a promise about the device.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web

from fleet.api.context import caller, controller
from fleet.api.errors import ApiError, json_response, read_json
from fleet.api.routes import API
from fleet.db.models import Command, Device, Rune
from fleet.logs import log
from fleet.outbox import DEFAULT_DEADLINE, OutboxError
from ota.protocol import MessageType
from ota.targets import DEFAULT_ORG, TargetNameError, check_part, parse_rune_ref

MAX_DEADLINE = timedelta(days=30)
SIMPLE_COMMANDS = {
    "ping": MessageType.PING,
    "rollback": MessageType.ROLLBACK,
    "config": MessageType.CONFIG,
    "attest": MessageType.ATTEST,
}


def command_json(command: Command) -> dict[str, Any]:
    return {
        "id": command.id,
        "device_id": command.device_id,
        "type": command.type,
        "body": command.body,
        "state": command.state,
        "reason": command.reason,
        "created_by": command.created_by,
        "created_at": command.created_at.isoformat() if command.created_at else None,
        "sent_at": command.sent_at.isoformat() if command.sent_at else None,
        "attempts": command.attempts,
        "deadline": command.deadline.isoformat(),
        "finished_at": command.finished_at.isoformat() if command.finished_at else None,
    }


def _deadline(body: dict[str, Any]) -> timedelta:
    value = body.get("timeout_s")
    if value is None:
        return DEFAULT_DEADLINE
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 1:
        raise ApiError(400, "timeout_s must be a number of seconds, at least 1")
    deadline = timedelta(seconds=float(value))
    if deadline > MAX_DEADLINE:
        raise ApiError(400, f"timeout_s is at most {int(MAX_DEADLINE.total_seconds())}")
    return deadline


async def _enrolled(device_id: str) -> Device:
    device = await Device.get_or_none(id=device_id)
    if device is None:
        raise ApiError(404, f"no device {device_id}")
    if device.state != "enrolled":
        raise ApiError(409, f"device {device_id} is {device.state}, not enrolled")
    return device


@API.add(
    "POST",
    "/api/v1/devices/{id}/deploy",
    "operator",
    "Send one signed deploy command for a published rune version to a device",
    request_body="application/json",
)
async def deploy(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    device = await _enrolled(request.match_info["id"])
    ref, org = body.get("rune"), body.get("org", DEFAULT_ORG)
    if not isinstance(ref, str) or not isinstance(org, str):
        raise ApiError(400, "a deploy needs `rune` (NAME@VERSION) and optionally `org`")
    try:
        name, version = parse_rune_ref(ref)
        check_part("org", org)
    except TargetNameError as exc:
        raise ApiError(400, str(exc)) from None
    rune = await Rune.get_or_none(org=org, name=name, version=version)
    if rune is None:
        raise ApiError(404, f"{org}/{name}@{version} is not published; push it first")
    if rune.revoked_at is not None:
        raise ApiError(409, f"{org}/{name}@{version} is revoked")
    command = await _enqueue(
        request, device, MessageType.DEPLOY, {"org": org, "name": name, "version": version}, body
    )
    return json_response(command_json(command), status=201)


@API.add(
    "POST",
    "/api/v1/devices/{id}/commands",
    "operator",
    "Send a ping, rollback, config or attest command to a device",
    request_body="application/json",
)
async def send_command(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    device = await _enrolled(request.match_info["id"])
    kind = SIMPLE_COMMANDS.get(str(body.get("type")))
    if kind is None:
        raise ApiError(400, f"type must be one of {', '.join(SIMPLE_COMMANDS)} (deploy: /deploy)")
    payload: dict[str, Any] = {}
    if kind is MessageType.CONFIG:
        if not isinstance(body.get("config"), dict):
            raise ApiError(400, "a config command needs a `config` object")
        payload["config"] = body["config"]
    if kind is MessageType.ROLLBACK:
        if isinstance(body.get("reason"), str):
            payload["reason"] = body["reason"][:200]
        if "to" in body:
            payload["to"] = _rollback_target(body["to"])
    command = await _enqueue(request, device, kind, payload, body)
    return json_response(command_json(command), status=201)


def _rollback_target(value: Any) -> str:
    """A rollback's `to`: the `ORG/NAME@VERSION` the device's previous slot must hold."""
    org, sep, rest = value.partition("/") if isinstance(value, str) else ("", "", "")
    try:
        if not sep:
            raise TargetNameError("no org")
        check_part("org", org)
        parse_rune_ref(rest)
    except TargetNameError:
        raise ApiError(
            400, f"`to` must be ORG/NAME@VERSION (the rune the previous slot holds), not {value!r}"
        ) from None
    return str(value)


async def _enqueue(
    request: web.Request,
    device: Device,
    kind: MessageType,
    payload: dict[str, Any],
    body: dict[str, Any],
) -> Command:
    outbox = controller(request).outbox
    if outbox is None:
        raise ApiError(503, "the controller has no broker link yet; try again in a moment")
    try:
        command = await outbox.enqueue(
            device.id, kind, payload, caller(request).name, _deadline(body)
        )
    except OutboxError as exc:
        raise ApiError(409, str(exc)) from None
    log(
        "command.created",
        command=command.id,
        device=device.id,
        type=kind.value,
        by=caller(request).name,
    )
    return command


@API.add("GET", "/api/v1/commands/{id}", "viewer", "Show one command and its state")
async def show_command(request: web.Request) -> web.StreamResponse:
    command = await Command.get_or_none(id=request.match_info["id"])
    if command is None:
        raise ApiError(404, f"no command {request.match_info['id']}")
    return json_response(command_json(command))


@API.add(
    "GET",
    "/api/v1/devices/{id}/commands",
    "viewer",
    "A device's commands, newest first",
    parameters=("limit",),
)
async def device_commands(request: web.Request) -> web.StreamResponse:
    try:
        limit = min(max(int(request.query.get("limit", "50")), 1), 500)
    except ValueError:
        raise ApiError(400, "limit must be a number") from None
    rows = (
        await Command.filter(device_id=request.match_info["id"])
        .order_by("-created_at")
        .limit(limit)
    )
    return json_response({"commands": [command_json(c) for c in rows]})
